#!/usr/bin/env bash
# One command that runs the tests of a build made by scripts/setup.sh (CUDA tests skip
# themselves without a GPU). Arguments go to ctest, e.g. scripts/test.sh -L gpu.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="${ZO2_BUILD_DIR:-$root/build}"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" "$@"
