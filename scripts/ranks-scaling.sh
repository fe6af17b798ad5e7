#!/usr/bin/env bash
# Scaling of the parallel modes (issue 18) on the CPU backend: zo2-tune train under mpirun
# with 1, 2 and 4 ranks per mode, every block streamed, ZO2_CPU_LINK_GBPS emulating one
# host↔device link per rank (each rank's copies take bytes / R seconds on its own streams).
# Prints one row per run: the global tokens/s and step time (steady state: steps after the
# first 5), the stream busy times of rank 0 per step (upload, compute, write-back), its
# traffic per step, and the ranks' summed PSS. The speed-up is against the one-process run
# with the same rule (directions: one process with --directions q).
# Usage: scripts/ranks-scaling.sh [PRESET (opt-micro)] [LINK_GBPS (0.5; 0 = none)] [STEPS (30)]
#        ZO2_SCALING_ROWS=REGEX runs only the multi-rank rows whose name matches.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tune=${ZO2_TUNE:-$root/build/tools/zo2-tune}
preset=${1:-opt-micro}
link=${2:-0.5}
steps=${3:-30}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$tune" init --preset "$preset" --out "$work/m" -q
"$tune" synth-data --model "$work/m" --out "$work/d.safetensors" --rows 256 --seq 64 -q
printf "%-34s %5s %10s %10s %9s %9s %9s %10s %10s %8s\n" mode ranks "tok/s" "s/step" "upload" compute "write" "up/step" "down/step" speedup
run() {  # name ranks directions layout [extra train flags...]
  local name=$1 n=$2 q=$3 layout=$4
  shift 4
  local extra=("$@")
  # ZO2_SCALING_ROWS: a regular expression picking rows by name (the base rows always run).
  if [ -n "${ZO2_SCALING_ROWS:-}" ] && [ "$n" -gt 1 ] && ! [[ "$name" =~ $ZO2_SCALING_ROWS ]]; then return; fi
  local out="$work/$name-$n"
  local launch=()
  local env=()
  [ "$link" != 0 ] && env=(env ZO2_CPU_LINK_GBPS="$link")  # 0: no emulated link (memory speed)
  [ "$n" -gt 1 ] && launch=(mpirun --oversubscribe --allow-run-as-root -np "$n")
  local par=()
  [ "$layout" != single ] && par=(--parallel "$layout")
  "${env[@]}" "${launch[@]}" "$tune" train --model "$work/m" --data "$work/d.safetensors" --out "$out" \
    --steps "$steps" --batch-size 8 --device cpu --offload all --window 2 --directions "$q" "${par[@]}" "${extra[@]}" \
    --log-json "$out.jsonl" -q
  python3 - "$out.jsonl" "$name" "$n" "${base_tok:-0}" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"step"' in l]
steady = rows[5:] or rows
def mean(k): return sum(r[k] for r in steady) / len(steady)
# Steady state: each record's tokens and step_time_s are its own step's; sum them from step 6 on.
span = sum(r["step_time_s"] for r in steady)
tok_s = sum(r["tokens"] for r in steady) / span if span > 0 else steady[-1]["tokens_per_s"]
step_s = span / len(steady)
base = float(sys.argv[4])
speed = f"{tok_s / base:.2f}×" if base > 0 else "1.00×"
mb = lambda b: f"{b / 2**20:.1f} MB"
print(f"{sys.argv[2]:<34} {sys.argv[3]:>5} {tok_s:>10.0f} {step_s:>10.4f} {mean('upload_busy_s'):>9.4f} "
      f"{mean('compute_busy_s'):>9.4f} {mean('offload_busy_s'):>9.4f} {mb(mean('h2d_bytes')):>10} {mb(mean('d2h_bytes')):>10} {speed:>8}")
open(sys.argv[1] + ".tok", "w").write(str(tok_s))
PY
}
base_tok=""; run "one process, q=1" 1 1 single; base_tok=$(cat "$work/one process, q=1-1.jsonl.tok")
run "data" 2 1 data=2
run "data" 4 1 data=4
run "perturbation" 2 1 perturbation=2
run "data × perturbation" 4 1 data=2,perturbation=2
run "data, sliced upload" 2 1 data=2 --upload sliced
run "data, sliced upload" 4 1 data=4 --upload sliced
run "perturbation, sliced upload" 2 1 perturbation=2 --upload sliced
run "data × perturbation, sliced upload" 4 1 data=2,perturbation=2 --upload sliced
base_tok=""; run "one process, q=4" 1 4 single; base_tok=$(cat "$work/one process, q=4-1.jsonl.tok")
run "directions (q=4)" 2 4 directions=2
run "directions (q=4)" 4 4 directions=4
run "perturbation × directions (q=4)" 4 4 perturbation=2,directions=2
echo "($preset, batch 8 × 64 tokens, every block streamed through 2 slots, emulated link ${link} GB/s per rank, $steps steps; $(nproc) cores)"
