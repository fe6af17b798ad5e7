#!/usr/bin/env bash
# The GPU checks of issues 4, 5 and 8 in one prepared run, for a session lent a GPU machine
# (15 minutes of device time, start included). Here:   scripts/gpu-pack.sh
# (../shared/tools/gpu-pack.sh's CUDA Release build and pack, slimmed to ~43 MiB: with ICU
# and OpenBLAS the libraries alone are ~93 MiB, over the 64 MiB that may travel, so the
# largest travel xz-compressed). Then one device call, from the repo root, carrying .gpupack:
#   .gpupack/run.sh scripts/gpu-check.sh "$OUT"        (timeout_s 600; every phase ends by
#   ZO2_GPU_DEADLINE, 540 s; ZO2_GPU_PHASES picks phases, ZO2_GPU_TEST_FILTER the tests)
# The call prepared on 2026-12-06 (not run: no machine was lent at the time), for issues 19,
# 21 and 23 in that order:
#   export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib | tr '\n' ':')
#   ZO2_GPU_DEADLINE=510 ZO2_GPU_PHASES="tests goldens streamed_175b streamed_175b_tiles resident
#     resident_13b streamed_fp8 micro sanitize anchors streamed_6.7b" .gpupack/run.sh scripts/gpu-check.sh "$OUT"
# On an H100 80GB HBM3 (2026-11-26, e4931a4, deadline 555) everything ran in 550 s: tests
# 20 s, resident 38, resident_13b 45, resident_30b 16, streamed_175b 23, each resident A/B
# ~24, streamed_fp8(_regenerate) 12, micro 73, sanitize ~60, streamed_6.7b 50,
# streamed_13b 12, streamed_1.3b 12, streamed_30b 31, sweep_6.7b 64; the machine's start
# and the transfers ~30 s. Every phase has its own time limit and writes its results as it
# goes, so a phase that runs long loses only itself. OUT gets summary.txt, gpu_tests.log
# and results.tgz, which holds:
#   device.txt         nvidia-smi's view of the device
#   gpu_tests_*.xml/log  every *Cuda* test (kernels vs CPU twins, Philox bit-identity,
#                      golden parity fp32/bf16, the scheduler's bitwise invariant on the GPU)
#   micro_*.json/log   zo2_microbench's CUDA kernels with the default kernels, and the
#                      attention/linear layer with their predecessors
#   sanitize_*.log     compute-sanitizer racecheck/memcheck of the fused attention, the
#                      linear-epilogue and the fp8 update tests
#   bench_*.jsonl/md   zo2-bench at batch 1 × 2048: OPT-1.3B/6.7B/13B resident with the
#                      PyTorch MeZO baseline where torch imports, OPT-30B resident
#                      (synthetic); OPT-1.3B, 6.7B, 13B, 30B fully streamed at ZO2's
#                      footprint with fp16/bf16/fp8 storage; OPT-30B at 6 GB and OPT-175B at
#                      12 GB (the GPU-memory targets); the 1.3B/6.7B resident rows again
#                      with the chunked attention (resident_chunked), without the GEMM
#                      epilogues (resident_no_epilogue), with neither (the old default) and
#                      with the block-per-row softmax (resident_block); a cap sweep for 6.7B
#   bench_streamed_175b_tiles  OPT-175B at 4 GB by weight tiles (issue 21, sub-block streaming)
#   bench_disk_*       the disk tier (issue 21): the disk probe, and OPT-1.3B streamed with
#                      its weights in RAM and half of them on disk (--disk-lag 1 and 4)
#   summary.txt        the tail of each phase
set -uo pipefail
out="${1:?usage: scripts/gpu-check.sh OUT_DIR}"
mkdir -p "$out"
# The device tool returns at most 8 files from OUT: everything is written to a work folder,
# packed into OUT/results.tgz after every phase (so a run cut short still returns what it
# finished), with summary.txt beside it.
work="${ZO2_GPU_WORK:-/tmp/zo2-gpu-check}"
rm -rf "$work"; mkdir -p "$work"
pack_results() { tar czf "$out/results.tgz.tmp" -C "$work" . && mv "$out/results.tgz.tmp" "$out/results.tgz"; }
deadline="${ZO2_GPU_DEADLINE:-540}"   # seconds after start by which every phase has ended
export ZO2_BENCH_DIR="${ZO2_BENCH_DIR:-$(cd "$(dirname "$0")/../bench" && pwd)}"  # mezo_torch.py, plot_bench.py
budget_tests="${ZO2_GPU_TEST_TIMEOUT:-90}"
budget_bench="${ZO2_GPU_BENCH_TIMEOUT:-70}"
# Which phases to run (they run in the order of the code below; a rerun after a fix names
# only what it needs):
phases="${ZO2_GPU_PHASES:-tests goldens streamed_175b streamed_175b_tiles resident generate disk disk_ram disk_lag1 disk_lag4 resident_13b resident_30b resident_chunked resident_no_epilogue resident_chunked_no_epilogue streamed_fp8 streamed_fp8_regenerate resident_block micro sanitize anchors streamed_6.7b streamed_13b streamed_1.3b streamed_30b sweep_6.7b}"
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

nvidia-smi > "$work/device.txt" 2>&1 || true
note "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
note "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

has() { case " $phases " in *" $1 "*) return 0 ;; esac; return 1; }
limit() {  # a phase's time limit: its budget, cut to what is left before the deadline
  local left=$(( deadline - SECONDS ))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

# 1. GPU tests (they skip nothing here: a device exists). The kernels written without a GPU
#    run in processes of their own, so that a fault in one (a CUDA error is sticky for the
#    process) neither hides the others' results nor fails tests that did nothing wrong; the
#    default kernels (the fused attention, the GEMM epilogues, the fp8 update that keeps
#    its values) are switched to their predecessors for the later rows where their tests
#    fail.
gpu_tests() {  # name, filter
  local name=$1 filter=$2 start rc
  start=$(date +%s)
  timeout "$(limit "$budget_tests")" "$(command -v zo2_tests)" --gtest_filter="$filter" \
    --gtest_output="xml:$work/gpu_tests_$name.xml" > "$work/gpu_tests_$name.log" 2>&1
  rc=$?
  note "gpu tests ($name): rc=$rc in $(( $(date +%s) - start )) s; $(grep -E '^\[  (PASSED|FAILED) ' "$work/gpu_tests_$name.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]' "$work/gpu_tests_$name.log" | head -20 >> "$summary"
  if [ $rc -gt 1 ]; then  # a crash or a timeout: name the test it was in
    note "gpu tests ($name): ended in $(grep -E '^\[ RUN      \]' "$work/gpu_tests_$name.log" | tail -1)"
    tail -5 "$work/gpu_tests_$name.log" >> "$summary"
  fi
  cat "$work/gpu_tests_$name.log" >> "$out/gpu_tests.log"
  return $rc
}
fused_ok=1
if has tests; then
  : > "$out/gpu_tests.log"
  if [ -n "${ZO2_GPU_TEST_FILTER:-}" ]; then
    gpu_tests filtered "$ZO2_GPU_TEST_FILTER"
  else
    gpu_tests fused '*CudaFusedAttention*' ||
      { fused_ok=0; export ZO2_CUDA_ATTENTION=chunked; note "fused attention tests failed: later rows use ZO2_CUDA_ATTENTION=chunked"; }
    gpu_tests epilogue '*CudaLinear*:*OpsTest.Linear*/Cuda' ||
      { export ZO2_CUDA_GEMM_EPILOGUE=0; note "linear/epilogue tests failed: later rows use ZO2_CUDA_GEMM_EPILOGUE=0"; }
    gpu_tests fp8 '*Fp8Update*:CudaTest.PerturbAndUpdateEqualCpuBitForBit*' ||
      { export ZO2_CUDA_FP8_UPDATE=regenerate; note "fp8 update tests failed: later rows use ZO2_CUDA_FP8_UPDATE=regenerate"; }
    gpu_tests rest '*Cuda*:-*CudaFusedAttention*:*CudaLinear*:*OpsTest.Linear*/Cuda:*Fp8Update*:CudaTest.PerturbAndUpdateEqualCpuBitForBit*'
  fi
  pack_results
fi

# 1b. Goldens from transformers for the LLaMA-family variants (issue 19): the GPU machine
#     has torch and transformers; scripts/make-goldens.py writes them (CPU, fp32, eager) into
#     results.tgz's goldens/ — copy its folders into tests/data/golden/ to test them.
#     Then the goldens just made are tested in the same call, on the CPU and on the GPU (fp32
#     and bf16, streamed = resident): RepoGoldenParity(Cuda) in tests/golden_test.cpp read
#     ZO2_REPO_GOLDEN_DIR.
if has goldens; then
  start=$(date +%s)
  timeout "$(limit 90)" python3 "$(dirname "$0")/make-goldens.py" "$work/goldens" > "$work/goldens.log" 2>&1
  note "goldens: rc=$? in $(( $(date +%s) - start )) s; $(grep -E '^(transformers|made|[a-z0-9-]+: (loss|FAILED))' "$work/goldens.log" | tr '\n' ' ')"
  if ls "$work"/goldens/*/golden.safetensors > /dev/null 2>&1; then
    start=$(date +%s)
    ZO2_REPO_GOLDEN_DIR="$work/goldens" timeout "$(limit 60)" "$(command -v zo2_tests)" \
      --gtest_filter='Repo/RepoGoldenParity*' --gtest_output="xml:$work/gpu_tests_repo_goldens.xml" \
      > "$work/gpu_tests_repo_goldens.log" 2>&1
    note "repo goldens (cpu + cuda): rc=$? in $(( $(date +%s) - start )) s; $(grep -E '^\[  (PASSED|FAILED) ' "$work/gpu_tests_repo_goldens.log" | tr '\n' ' ')"
    grep -E '^\[  FAILED  \]|Expected|Which is|actual|error' "$work/gpu_tests_repo_goldens.log" | head -30 >> "$summary"
  fi
  pack_results
fi

# 2. zo2-bench rows (synthesized weights; 13B/30B/175B with aliased blocks to save host
#    memory and init time, labelled synthetic). Three measured steps after one warm-up.
bench() {  # name, then zo2-bench flags
  local name=$1; shift
  has "$name" || return 0
  local lim; lim=$(limit "$budget_bench")
  if [ "$lim" -lt 15 ]; then note "bench $name: skipped, $lim s left before the deadline"; return 0; fi
  local t0; t0=$(date +%s)
  timeout "$lim" zo2-bench --device cuda --batch-size 1 --seq-len 2048 --steps "${ZO2_GPU_STEPS:-3}" --warmup 1 \
    --jsonl "$work/bench_$name.jsonl" --markdown "$work/bench_$name.md" "$@" > "$work/bench_$name.log" 2>&1
  note "bench $name: rc=$? in $(( $(date +%s) - t0 )) s"
  [ -f "$work/bench_$name.md" ] && cat "$work/bench_$name.md" >> "$summary"
  grep -iE 'error|fail' "$work/bench_$name.log" | grep -v '^[|{]' | head -5 >> "$summary"
  pack_results
}
# OPT-175B in 12 GB: --offload auto takes 2 slots (the planner: 9.11 GiB); ~7 s a step at
# the PCIe floor, so one warm-up and one measured step.
ZO2_GPU_STEPS=1 budget_bench=90 bench streamed_175b --presets opt-175b --gpu-mem 12G --offload auto --alias-blocks \
  --storage-dtype bf16 --compute-dtype bf16 --mezo-baseline off
# The same under 4G (issue 21): two whole-block slots do not fit, so the planner streams
# weight tiles (Note [Sub-block streaming]; a 2.48 GiB arena); the target is >= 90 % of
# the 12G row's tok/s with the process (arena + context) within 4 GiB.
ZO2_GPU_STEPS=1 budget_bench=90 bench streamed_175b_tiles --presets opt-175b --gpu-mem 4G --offload auto --alias-blocks \
  --storage-dtype bf16 --compute-dtype bf16 --mezo-baseline off
budget_bench=60 bench resident --presets opt-1.3b,opt-6.7b --gpu-mem none --offload none \
  --storage-dtype fp16 --compute-dtype fp16 --mezo-baseline auto
# 1c. Generation (issue 20): generated tokens/s for 8 prompts of 128 tokens, 64 new tokens,
#     OPT-1.3B fp16, resident and streamed at ZO2's footprint (KV cache where the planner puts it).
if has generate; then
  start=$(date +%s)
  timeout "$(limit "$budget_bench")" zo2-bench --device cuda --presets opt-1.3b --gpu-mem none,2.6G \
    --storage-dtype fp16 --compute-dtype fp16 --batch-size 8 --seq-len 128 --generate 64 -q --link-probe off \
    --jsonl "$work/bench_generate.jsonl" --markdown "$work/bench_generate.md" > "$work/bench_generate.log" 2>&1
  note "generate: rc=$? in $(( $(date +%s) - start )) s"
  cat "$work/bench_generate.md" >> "$summary" 2>/dev/null
  pack_results
fi

# The disk tier (issue 21): this machine's disk through the tier's own path, then OPT-1.3B
# (fp16, 2.6 GB) streamed at 2.6 GB of GPU memory with its master weights in RAM, and under
# --host-mem 1.6G (about half its blocks in the block file) at --disk-lag 1 and 4.
if has disk; then
  start=$(date +%s)
  timeout "$(limit 40)" zo2-bench --disk-probe --disk-dir "$work" --disk-probe-bytes 2G -q \
    --jsonl "$work/bench_disk_probe.jsonl" > "$work/bench_disk_probe.log" 2>&1
  note "disk probe: rc=$? in $(( $(date +%s) - start )) s"
  cat "$work/bench_disk_probe.log" >> "$summary"
  pack_results
fi
budget_bench=40 bench disk_ram --presets opt-1.3b --gpu-mem 2.6G --offload all --storage-dtype fp16 \
  --compute-dtype fp16 --mezo-baseline off
for lag in 1 4; do
  budget_bench=50 bench "disk_lag$lag" --presets opt-1.3b --gpu-mem 2.6G --offload all --storage-dtype fp16 \
    --compute-dtype fp16 --mezo-baseline off --host-mem 1.6G --disk-dir "$work/disk" --disk-lag "$lag"
done
# OPT-13B resident with its own master weights (26 GB of pinned host memory, synthesized):
# the slowest row to set up, and the one issue 8 still lacks.
budget_bench=110 bench resident_13b --presets opt-13b --gpu-mem none --offload none \
  --storage-dtype fp16 --compute-dtype fp16 --mezo-baseline auto
budget_bench=80 bench resident_30b --presets opt-30b --gpu-mem none --offload none --alias-blocks \
  --storage-dtype bf16,fp8 --compute-dtype bf16 --mezo-baseline off
# The resident rows again with the predecessors of today's default kernels, for a same-run
# measure of each (first run on an H100 at e4931a4, bench/RESULTS.md): the chunked
# attention path instead of the register-resident kernel of Note [Fused attention]
# (runtime/cuda/attention.cu), separate bias/ReLU/residual passes instead of the cuBLASLt
# epilogues of Note [GEMM epilogues] (runtime/cuda/gemm.cpp), and both (the old default).
ZO2_CUDA_ATTENTION=chunked bench resident_chunked --presets opt-1.3b,opt-6.7b --gpu-mem none --offload none \
  --storage-dtype fp16 --compute-dtype fp16 --mezo-baseline off
ZO2_CUDA_GEMM_EPILOGUE=0 bench resident_no_epilogue --presets opt-1.3b,opt-6.7b --gpu-mem none --offload none \
  --storage-dtype fp16 --compute-dtype fp16 --mezo-baseline off
ZO2_CUDA_ATTENTION=chunked ZO2_CUDA_GEMM_EPILOGUE=0 bench resident_chunked_no_epilogue --presets opt-1.3b,opt-6.7b \
  --gpu-mem none --offload none --storage-dtype fp16 --compute-dtype fp16 --mezo-baseline off
# fp8 storage, streamed at ZO2's footprint: compute-bound rows, the closest to the ≥ 2× ZO2
# target (30B: 1.91×). The fp8 update now generates z once per element (noise.cu, the fp8
# note); this is its measure.
bench streamed_fp8 --presets opt-6.7b,opt-30b --gpu-mem 8.1G --offload all --alias-blocks \
  --storage-dtype fp8 --compute-dtype bf16 --mezo-baseline off
# The same rows with the old fp8 update (z regenerated in its second pass): the same-run
# measure of that change.
ZO2_CUDA_FP8_UPDATE=regenerate bench streamed_fp8_regenerate --presets opt-6.7b,opt-30b --gpu-mem 8.1G \
  --offload all --alias-blocks --storage-dtype fp8 --compute-dtype bf16 --mezo-baseline off
# The same resident rows with the block-per-row softmax that the row softmax replaced (Note
# [Row softmax in registers], runtime/cuda/attention.cu): the same-run measure of its gain.
ZO2_CUDA_ATTENTION=chunked-block ZO2_CUDA_GEMM_EPILOGUE=0 bench resident_block --presets opt-1.3b,opt-6.7b --gpu-mem none --offload none \
  --storage-dtype fp16 --compute-dtype fp16 --mezo-baseline off
# Kernel microbenchmarks on the GPU (Google Benchmark): the attention at 2048 tokens with
# the row softmax (default), the block-per-row softmax and the fused kernel; GEMM, perturb,
# update.
micro() {
  has micro || return 0
  local start lim path filter
  start=$(date +%s)
  for path in fused chunked chunked-block; do
    if [ "$path" = fused ] && [ "$fused_ok" = 0 ]; then note "micro (fused): skipped, its tests failed"; continue; fi
    lim=$(limit "$([ "$path" = fused ] && echo 70 || echo 30)")
    if [ "$lim" -lt 15 ]; then note "micro ($path): skipped, $lim s left before the deadline"; continue; fi
    # every kernel once with the defaults (the fused attention, the cuBLASLt epilogues);
    # then the attention and the linear layer with their predecessors (the chunked path with
    # the row or the block softmax, separate bias/ReLU/residual passes)
    filter='/cuda/'
    [ "$path" != fused ] && filter='^Kernel\.(Attention|Linear).*/cuda/'
    [ "$path" = chunked-block ] && filter='^Kernel\.Attention.*/cuda/'
    ZO2_CUDA_GEMM_EPILOGUE=$([ "$path" = fused ] && echo 1 || echo 0) \
    ZO2_CUDA_ATTENTION=$path timeout "$lim" zo2_microbench --benchmark_filter="$filter" \
      --benchmark_min_time=0.05 --benchmark_out_format=json --benchmark_out="$work/micro_$path.json" \
      > "$work/micro_$path.log" 2>&1
    note "micro ($path): rc=$?"
    grep -E '^Kernel\.(Attention|Linear|Perturb|Gemm)' "$work/micro_$path.log" | head -16 >> "$summary"
  done
  note "micro: $(( $(date +%s) - start )) s"
  pack_results
}
micro
# compute-sanitizer on the kernels written without a GPU: racecheck (shared memory: the
# fused attention's and the fp8 update's barriers) and memcheck (tail tiles, the
# epilogue's bias reads, the fp8 update's kept values).
sanitize() {
  has sanitize || return 0
  local cs lim tool filter
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [ ! -x "$cs" ]; then note "sanitize: no compute-sanitizer"; return 0; fi
  for tool in racecheck memcheck; do
    lim=$(limit 60)
    if [ "$lim" -lt 15 ]; then note "sanitize ($tool): skipped, $lim s left before the deadline"; continue; fi
    filter='*CudaFusedAttention*FusedAndChunked*:*Fp8UpdateOfWideRows*'
    [ "$tool" = memcheck ] && filter='*CudaFusedAttention*:*CudaLinear*:*Fp8UpdateOfWideRows*'
    timeout "$lim" "$cs" --tool "$tool" --error-exitcode 3 "$(command -v zo2_tests)" --gtest_filter="$filter" \
      > "$work/sanitize_$tool.log" 2>&1
    note "sanitize ($tool): rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$work/sanitize_$tool.log" | tail -1)"
  done
  pack_results
}
sanitize
# Upstream ZO2 in the same run (issue 23): its own speed test (../shared/anchors/zo2-baseline.sh,
# under ZO2_SHARED_DIR in the pack) for OPT-1.3B and 6.7B, MeZO resident (zo) and ZO2
# offloaded (zo2), beside zo2's resident and streamed rows of this run.
anchors() {
  has anchors || return 0
  local base="${ZO2_SHARED_DIR:-$(dirname "$0")/../../shared}/anchors/zo2-baseline.sh" model method lim
  if [ ! -f "$base" ]; then note "anchors: no $base"; return 0; fi
  for model in opt_1_3b opt_6_7b; do
    for method in zo zo2; do
      lim=$(limit 60)
      if [ "$lim" -lt 20 ]; then note "anchors ($model $method): skipped, $lim s left before the deadline"; continue; fi
      bash "$base" "$model" "$method" 4 "$lim" > "$work/anchor_${model}_$method.log" 2>&1
      note "anchors: $(grep '^RESULT' "$work/anchor_${model}_$method.log" || tail -2 "$work/anchor_${model}_$method.log" | tr '\n' ' ')"
    done
  done
  pack_results
}
anchors
bench streamed_6.7b --presets opt-6.7b --gpu-mem 4.3G --offload all \
  --storage-dtype fp16,bf16,fp8 --compute-dtype fp16 --mezo-baseline off
bench streamed_13b --presets opt-13b --gpu-mem 5.5G --offload all --alias-blocks \
  --storage-dtype fp16,bf16,fp8 --compute-dtype fp16 --mezo-baseline off
bench streamed_1.3b --presets opt-1.3b --gpu-mem 2.6G --offload all \
  --storage-dtype fp16,bf16,fp8 --compute-dtype fp16 --mezo-baseline off
bench streamed_30b --presets opt-30b --gpu-mem 8.1G,6G --offload all --alias-blocks \
  --storage-dtype bf16,fp8 --compute-dtype bf16 --mezo-baseline off
bench sweep_6.7b --presets opt-6.7b --gpu-mem 4.3G,8G,12G,none --offload auto \
  --storage-dtype bf16 --compute-dtype bf16 --mezo-baseline off
note "done in $SECONDS s"
cp "$summary" "$work/summary.txt"; pack_results
