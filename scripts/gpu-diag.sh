#!/usr/bin/env bash
# GPU diagnosis when scripts/gpu-check.sh reports a failure or a slow row: every *Cuda* test
# in its own process (a crash loses only itself), a cuda-gdb backtrace of the first two that
# crash (build-gpu/tests/zo2_tests unstripped: copy it over .gpupack/bin/zo2_tests first),
# OPT-13B rows streamed and resident, and an ncu per-kernel time summary of the first 900
# kernels of one step for OPT-1.3B (resident) and OPT-13B (streamed). Results in
# OUT/diag.tgz. One device call, from the repo root (about 110 s on an H200):
#   PATH=$PATH:/usr/local/cuda/bin .gpupack/run.sh scripts/gpu-diag.sh "$OUT"
# Summarize an ncu file with:  grep -A3 'Invocations' ncu_opt-1.3b.txt
set -uo pipefail
out=$1; work=/tmp/diag; rm -rf $work; mkdir -p $work
pk() { tar czf $out/diag.tgz.tmp -C $work . && mv $out/diag.tgz.tmp $out/diag.tgz; }
T=$(command -v zo2_tests)
$T --gtest_list_tests --gtest_filter='*Cuda*' | awk '/^[^ ]/{s=$1} /^ /{print s $1}' > $work/list.txt
crashes=0; t0=$SECONDS
while read -r t; do
  [ $((SECONDS - t0)) -gt 60 ] && { echo "SKIPPED $t (time)" >> $work/tests.txt; continue; }
  timeout 30 $T --gtest_filter="$t" > $work/one.log 2>&1; rc=$?
  if [ $rc -eq 0 ]; then echo "PASS $t" >> $work/tests.txt; else
    echo "FAIL rc=$rc $t" >> $work/tests.txt
    { echo "=== $t rc=$rc"; grep -vE '^\[ (RUN|      OK) ' $work/one.log | tail -40; } >> $work/failures.txt
    if [ $rc -ge 128 ] && [ $crashes -lt 2 ]; then crashes=$((crashes+1))
      timeout 30 cuda-gdb -q -batch -ex run -ex bt --args $T --gtest_filter="$t" > $work/bt_$crashes.txt 2>&1
    fi
  fi
done < $work/list.txt
grep -c PASS $work/tests.txt; grep -v PASS $work/tests.txt; pk
B="zo2-bench --device cuda --batch-size 1 --seq-len 2048 --mezo-baseline off --compute-dtype fp16 --storage-dtype fp16"
timeout 40 $B --presets opt-13b --gpu-mem 5.5G --offload all --steps 2 --warmup 1 --markdown $work/b13s.md > $work/b13s.log 2>&1
cat $work/b13s.md; pk
timeout 35 $B --presets opt-13b --gpu-mem none --offload none --steps 2 --warmup 1 --markdown $work/b13r.md > $work/b13r.log 2>&1
cat $work/b13r.md; pk
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for p in opt-1.3b:none:none opt-13b:5.5G:all; do IFS=: read -r m cap off <<< "$p"
  a=""; [ $m = opt-13b ] && a=--alias-blocks
  timeout 40 $NCU --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel --launch-count 900 \
    $B --presets $m --gpu-mem $cap --offload $off $a --steps 1 --warmup 0 > $work/ncu_$m.txt 2>&1
  echo "ncu $m rc=$?"; pk
done
echo done $SECONDS
