#!/usr/bin/env bash
# Host memory of N ranks on one node with a private host image per rank and with one shared
# image (issue 18; Note [One host image per node] in offload/block_store.h). Trains PRESET
# (random weights from `zo2-tune init`) data-parallel on the CPU backend with every block
# streamed, samples each rank's /proc/PID/smaps_rollup once the run is stepping, and prints
# per-rank RSS and the ranks' summed PSS (proportional set size: a page mapped by k processes
# counts 1/k in each, so the sum is what the node really holds).
# Usage: scripts/ranks-memory.sh [PRESET (opt-125m)] [RANKS (4)]   ZO2_TUNE: the zo2-tune binary
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tune=${ZO2_TUNE:-$root/build/tools/zo2-tune}
preset=${1:-opt-125m}
n=${2:-4}
work=$(mktemp -d)
trap 'pkill -9 -f "$work/" 2>/dev/null || true; rm -rf "$work"' EXIT
"$tune" init --preset "$preset" --out "$work/m" -q
"$tune" synth-data --model "$work/m" --out "$work/d.safetensors" --rows 64 --seq 32 -q
model=$(du -cb "$work"/m/*.safetensors | tail -1 | cut -f1)
printf "%-8s %6s %14s %14s %14s\n" image ranks "RSS per rank" "PSS summed" "× model"
for image in private shared; do
  out="$work/r-$image"
  mpirun --oversubscribe --allow-run-as-root -np "$n" "$tune" train --model "$work/m" --data "$work/d.safetensors" \
    --out "$out" --steps 1000000 --batch-size "$n" --device cpu --threads 1 --offload all --window 2 \
    --parallel "data=$n" --host-image "$image" -q >"$work/$image.log" 2>&1 &
  job=$!
  for _ in $(seq 1 1200); do
    [ -f "$out/seed_log.jsonl" ] && [ "$(wc -l <"$out/seed_log.jsonl")" -ge 4 ] && break
    kill -0 $job 2>/dev/null || { cat "$work/$image.log"; exit 1; }
    sleep 0.1
  done
  rss=0 pss=0 ranks=0
  for pid in $(pgrep -f "^[^ ]*zo2-tune train .*--out $out "); do
    r=$(awk '/^Rss:/ {print $2}' /proc/$pid/smaps_rollup)
    p=$(awk '/^Pss:/ {print $2}' /proc/$pid/smaps_rollup)
    rss=$((rss + r)) pss=$((pss + p)) ranks=$((ranks + 1))
  done
  kill -9 $job 2>/dev/null || true
  pkill -9 -f "zo2-tune train .*--out $out " 2>/dev/null || true
  wait $job 2>/dev/null || true
  [ $ranks -eq "$n" ] || { echo "found $ranks of $n ranks" >&2; exit 1; }
  printf "%-8s %6d %11.1f MB %11.1f MB %14.2f\n" $image $n $(echo "$rss / $n / 1024" | bc -l) \
    $(echo "$pss / 1024" | bc -l) $(echo "$pss * 1024 / $model" | bc -l)
  eval "pss_$image=$((pss * 1024))"
done
echo "model weights: $(echo "$model / 1048576" | bc -l | xargs printf '%.1f') MB ($preset, fp32)"
echo "SUMMARY model=$model private_pss=$pss_private shared_pss=$pss_shared ranks=$n"
