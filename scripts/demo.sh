#!/usr/bin/env bash
# The main job on a model the repo makes itself: a random OPT checkpoint (opt-tiny), a
# learnable synthetic dataset, MeZO fine-tuning with every block streamed through a small
# device window (CPU backend by default), then evaluation of the tuned model.
# Usage: scripts/demo.sh [OUT_DIR] [extra zo2-tune train flags, e.g. --device cuda]
# Works on a fresh clone: a build directory that is not configured yet is set up first
# (scripts/setup.sh: packages, configure, build); an existing one gets zo2-tune rebuilt
# if its sources changed (a no-op when it is up to date).
# Environment: ZO2_TUNE=PATH runs that zo2-tune binary (no setup, no build);
# ZO2_BUILD_DIR=DIR is the build directory to set up or rebuild (default: build/ in the repo).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="${ZO2_BUILD_DIR:-$root/build}"
if [ -n "${ZO2_TUNE:-}" ]; then
  tune="$ZO2_TUNE"
else
  tune="$build/tools/zo2-tune"
  if [ ! -f "$build/CMakeCache.txt" ]; then
    echo "demo: no build in $build yet: running scripts/setup.sh first" >&2
    ZO2_BUILD_DIR="$build" "$root/scripts/setup.sh"
  fi
  cmake --build "$build" -j "$(nproc)" --target zo2-tune
fi
out="${1:-$root/out/demo}"
shift || true
mkdir -p "$out"
"$tune" init --preset opt-tiny --out "$out/base" --seed 1 --overwrite
"$tune" synth-data --model "$out/base" --out "$out/data.safetensors" --rows 256 --seq 32 --overwrite
"$tune" plan --model "$out/base" --gpu-mem 4M --batch-size 8 --seq-len 32 --offload all --device cpu
"$tune" train --model "$out/base" --data "$out/data.safetensors" --out "$out/tuned" --overwrite \
  --steps 400 --batch-size 8 --lr 3e-3 --eps 1e-3 --gpu-mem 4M --offload all \
  --log-json "$out/train.jsonl" "$@"
echo "before tuning:"; "$tune" eval --model "$out/base" --data "$out/data.safetensors"
echo "after tuning:";  "$tune" eval --model "$out/tuned" --data "$out/data.safetensors"
