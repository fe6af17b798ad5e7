#!/usr/bin/env bash
# Prefix tuning on the reviews example (README "Prefix tuning"). A prefix only steers what
# the frozen base already computes, so on a random-initialized opt-micro it cannot learn
# the task; this script first gives the base a weak sentiment signal (100 full ZO steps,
# dev accuracy about 0.57), then evaluates that base, and prefix-tunes it for 300 steps.
# Usage: scripts/prefix-reviews.sh [OUT_DIR]   (ZO2_TUNE=path picks the binary; default
# build/tools/zo2-tune). One CPU thread, as measured; another CPU or build may round
# differently and end near, not at, the README's numbers.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tune="${ZO2_TUNE:-$root/build/tools/zo2-tune}"
out="${1:-$root/out/prefix-reviews}"
d="$root/data/examples"
mkdir -p "$out"
"$tune" init --preset opt-micro --tokenizer "$root/data/gpt2" --out "$out/micro" --overwrite
# The base: the first 100 steps of the momentum run of "Update rules" (a 300-step schedule).
"$tune" train --model "$out/micro" --data "$d/reviews-train.jsonl" --out "$out/base" --overwrite \
  --optimizer zo-sgd-momentum --lr 2e-4 --lr-schedule linear --steps 300 --stop-at 100 \
  --batch-size 16 --threads 1
echo "base (no tuning):"; "$tune" eval --model "$out/base" --data "$d/reviews-dev.jsonl" --threads 1
"$tune" train --model "$out/base" --data "$d/reviews-train.jsonl" --eval "$d/reviews-dev.jsonl" \
  --eval-every 100 --out "$out/prefix" --overwrite --prefix-tuning --num-prefix 5 \
  --lr 1e-1 --eps 1e-1 --lr-schedule linear --steps 300 --batch-size 16 --threads 1
echo "base + prefix:"; "$tune" eval --model "$out/base" --adapter "$out/prefix" --data "$d/reviews-dev.jsonl" --threads 1
