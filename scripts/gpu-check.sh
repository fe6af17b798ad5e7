#!/usr/bin/env bash
# The GPU checks of issues 4, 5 and 8 in one prepared run, for a session lent a GPU machine
# (15 minutes of device time, start included). Here:   ../shared/tools/gpu-pack.sh
# (measured 2026-11-26: the pack is 56 MiB, the tracked tree 2.7 MB — under the 64 MiB that
# may travel; OpenBLAS is 36 MiB of it). Then one device call, from the repo root, carrying .gpupack:
#   .gpupack/run.sh scripts/gpu-check.sh "$OUT"        (timeout_s 590; phases add up to at most 520 s)
# Every phase has its own time limit and writes its results into OUT as it goes, so a
# phase that runs long loses only itself:
#   device.txt         nvidia-smi's view of the device
#   gpu_tests.xml/log  every *Cuda* test (kernels vs CPU twins, Philox bit-identity, golden
#                      parity fp32/bf16, the scheduler's bitwise invariant on the GPU)
#   bench_*.jsonl/md   zo2-bench at batch 1 × 2048: OPT-1.3B/6.7B resident, and OPT-1.3B, 6.7B,
#                      13B, 30B fully streamed at ZO2's footprint, fp16/bf16/fp8 storage, with
#                      the PyTorch MeZO baseline where torch imports
#   summary.txt        the tail of each phase
set -uo pipefail
out="${1:?usage: scripts/gpu-check.sh OUT_DIR}"
mkdir -p "$out"
export ZO2_BENCH_DIR="${ZO2_BENCH_DIR:-$(cd "$(dirname "$0")/../bench" && pwd)}"  # mezo_torch.py, plot_bench.py
budget_tests="${ZO2_GPU_TEST_TIMEOUT:-120}"
budget_bench="${ZO2_GPU_BENCH_TIMEOUT:-80}"
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

nvidia-smi > "$out/device.txt" 2>&1 || true
note "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
note "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# 1. GPU tests (they skip nothing here: a device exists).
start=$(date +%s)
timeout "$budget_tests" zo2_tests --gtest_filter='*Cuda*' --gtest_output="xml:$out/gpu_tests.xml" \
  > "$out/gpu_tests.log" 2>&1
rc=$?
note "gpu tests: rc=$rc in $(( $(date +%s) - start )) s; $(grep -E '^\[  (PASSED|FAILED) ' "$out/gpu_tests.log" | tr '\n' ' ')"
grep -E '^\[  FAILED  \]' "$out/gpu_tests.log" | head -20 >> "$summary"

# 2. zo2-bench rows (synthesized weights; 13B/30B with aliased blocks to save host memory
#    and init time, labelled synthetic). Three measured steps after one warm-up.
bench() {  # name, then zo2-bench flags
  local name=$1; shift
  local t0; t0=$(date +%s)
  timeout "$budget_bench" zo2-bench --device cuda --batch-size 1 --seq-len 2048 --steps 3 --warmup 1 \
    --jsonl "$out/bench_$name.jsonl" --markdown "$out/bench_$name.md" "$@" > "$out/bench_$name.log" 2>&1
  note "bench $name: rc=$? in $(( $(date +%s) - t0 )) s"
  [ -f "$out/bench_$name.md" ] && cat "$out/bench_$name.md" >> "$summary"
}
bench resident --presets opt-1.3b,opt-6.7b --gpu-mem none --offload none \
  --storage-dtype fp16,bf16 --compute-dtype fp16 --mezo-baseline auto
bench streamed_small --presets opt-1.3b --gpu-mem 2.6G --offload all \
  --storage-dtype fp16,bf16,fp8 --compute-dtype fp16 --mezo-baseline off
bench streamed_6.7b --presets opt-6.7b --gpu-mem 4.3G --offload all \
  --storage-dtype fp16,bf16,fp8 --compute-dtype fp16 --mezo-baseline off
bench streamed_13b --presets opt-13b --gpu-mem 5.5G --offload all --alias-blocks \
  --storage-dtype fp16,bf16,fp8 --compute-dtype fp16 --mezo-baseline off
bench streamed_30b --presets opt-30b --gpu-mem 8.1G --offload all --alias-blocks \
  --storage-dtype bf16,fp8 --compute-dtype bf16 --mezo-baseline off
note "done in $SECONDS s"
