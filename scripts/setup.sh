#!/usr/bin/env bash
# One command that sets zo2 up: installs the Debian packages it builds with (when run as
# root, or with sudo available), configures and builds into build/ (CUDA backend too when
# nvcc is found). Extra arguments go to CMake, e.g. scripts/setup.sh -DZO2_CUDA=OFF.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="${ZO2_BUILD_DIR:-$root/build}"
packages=(cmake g++ make pkg-config libtbb-dev libhwloc-dev liburing-dev libfmt-dev nlohmann-json3-dev
          libcli11-dev libopenblas-dev libsentencepiece-dev libpcre2-dev libicu-dev libgtest-dev
          libbenchmark-dev python3-matplotlib zlib1g-dev
          libopenmpi-dev openmpi-bin
          python3-dev python3-pybind11 python3-pytest python3-numpy
          locales)
if [ "${ZO2_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi
# nvcc lives outside PATH in a default CUDA install.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE="${ZO2_BUILD_TYPE:-Release}" "$@"
cmake --build "$build" -j "$(nproc)"
echo "zo2 built in $build (zo2-tune: $build/tools/zo2-tune)"
