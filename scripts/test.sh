#!/usr/bin/env bash
# One command that runs zo2's tests (CUDA tests skip themselves without a GPU). Works on a
# fresh clone: a build directory that is not configured yet is set up first
# (scripts/setup.sh: packages, configure, build); an existing one is brought up to date
# (cmake --build: only what changed is rebuilt), so the tests never run stale binaries.
# Arguments go to ctest, e.g. scripts/test.sh -L gpu, scripts/test.sh -R Cli.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="${ZO2_BUILD_DIR:-$root/build}"
if [ ! -f "$build/CMakeCache.txt" ]; then
  echo "test: no build in $build yet: running scripts/setup.sh first" >&2
  ZO2_BUILD_DIR="$build" "$root/scripts/setup.sh"
fi
if ! grep -q '^ZO2_BUILD_TESTS:BOOL=ON' "$build/CMakeCache.txt"; then
  echo "test: $build was configured with ZO2_BUILD_TESTS=OFF: turning the tests on" >&2
  cmake "$build" -DZO2_BUILD_TESTS=ON >/dev/null
fi
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" "$@"
