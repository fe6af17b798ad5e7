# Shared by the rank tests (ranks.sh, refusals.sh): their arguments and a fresh work
# directory. Usage in a test: source "$(dirname "$0")/common.sh" "$@"
set -euo pipefail
tune=$1
work=$2
mpirun=${3:-mpirun}
capi=${4:-}
rm -rf "$work"
mkdir -p "$work"
cd "$work"
