#!/usr/bin/env bash
# Ranks as real MPI processes (issue 18; zo/parallel.h Note [Parallel modes]): zo2-tune train
# under `mpirun --oversubscribe --allow-run-as-root -np 2` and `-np 4` on the CPU backend.
#   - perturbation=2 equals one process bit for bit (the checkpoint's bytes, the seed log's g)
#   - directions=2 and =4 equal one process with --directions 4
#   - data=2 × perturbation=2 (4 ranks) equals data=2 (2 ranks); data=2 follows one process
#     on the same global batch within 1e-5 over 20 steps
#   - replay reproduces each run's checkpoint from its seed log
#   - a rank killed with SIGKILL mid-run ends the job within 60 s naming it; the last saved
#     checkpoint resumes; a hung rank stops the others within --rank-timeout, naming it
#   - a resume with another layout is refused by name
#   - 4 ranks with one shared host image hold about (4 − 1) × the model less than 4 private ones
#   - sliced uploads (each rank its slice, exchanged over MPI) give the same bits
#   - a C host program (tests/capi_ranks.c) as the ranks: perturbation=2 equals its one-process run
# Usage: ranks.sh ZO2_TUNE WORK_DIR [MPIRUN [ZO2_CAPI_RANKS]]
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh" "$@"
mpi() { local n=$1; shift; "$mpirun" --oversubscribe --allow-run-as-root -np "$n" "$@"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
same() { cmp -s "$1/model.safetensors" "$2/model.safetensors" || fail "$3: $1 and $2 differ"; echo "ok: $3"; }

"$tune" init --preset opt-tiny --out m --seed 3 -q
"$tune" synth-data --model m --out d.safetensors --rows 64 --seq 16 --seed 1 -q
common=(--model m --data d.safetensors --batch-size 4 --device cpu --threads 1 -q)
lr=(--lr 1e-3)

# Perturbation pairs.
"$tune" train "${common[@]}" "${lr[@]}" --steps 8 --out one
mpi 2 "$tune" train "${common[@]}" "${lr[@]}" --steps 8 --out pert2 --parallel perturbation=2 --offload all --window 2
same one pert2 "perturbation=2 == one process"
# The logs agree too (the header's first line aside).
diff <(tail -n +2 one/seed_log.jsonl) <(tail -n +2 pert2/seed_log.jsonl) >/dev/null || fail "seed logs differ"

# Sliced uploads (Note [Sliced upload]): each rank uploads its slice, the ranks exchange the rest.
mpi 2 "$tune" train "${common[@]}" "${lr[@]}" --steps 8 --out pert2-sliced --parallel perturbation=2 --upload sliced --offload all --window 2
same one pert2-sliced "perturbation=2 with sliced uploads == one process"

# Direction groups.
"$tune" train "${common[@]}" "${lr[@]}" --steps 6 --directions 4 --out q4
mpi 2 "$tune" train "${common[@]}" "${lr[@]}" --steps 6 --directions 4 --out dir2 --parallel directions=2
mpi 4 "$tune" train "${common[@]}" "${lr[@]}" --steps 6 --directions 4 --out dir4 --parallel directions=4
same q4 dir2 "directions=2 == one process with --directions 4"
same q4 dir4 "directions=4 == one process with --directions 4"

# Data shards. Each shard's mean loss rounds differently from the global batch's, and
# (L+ − L−)/(2·eps) magnifies a last-bit difference 500-fold, so the runs part by about
# 1e-4 of the update: at --lr 1e-4 (MeZO tunes at 1e-7..1e-5) that stays under 1e-5.
"$tune" train "${common[@]}" --lr 1e-4  --steps 20 --out one20
mpi 2 "$tune" train "${common[@]}" --lr 1e-4  --steps 20 --out data2 --parallel data=2
mpi 4 "$tune" train "${common[@]}" --lr 1e-4  --steps 20 --out data2p2 --parallel data=2,perturbation=2
mpi 4 "$tune" train "${common[@]}" --lr 1e-4  --steps 20 --out data2p2s --parallel data=2,perturbation=2 --upload sliced --offload all --window 2
same data2 data2p2s "data=2 × perturbation=2, sliced uploads, == data=2"
same data2 data2p2 "data=2 × perturbation=2 == data=2"
python3 - one20/model.safetensors data2/model.safetensors <<'EOF'
import json, struct, sys
def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", t["dtype"]
        a, b = t["data_offsets"]
        out[name] = struct.unpack(f"<{(b - a) // 4}f", data[a:b])
    return out
x, y = tensors(sys.argv[1]), tensors(sys.argv[2])
assert x.keys() == y.keys()
worst = max(abs(p - q) for k in x for p, q in zip(x[k], y[k]))
base = tensors("m/model.safetensors")
moved = max(abs(p - q) for k in x for p, q in zip(x[k], base[k]))
print(f"ok: data=2 vs one process after 20 steps: max |Δw| = {worst:.3g} (the run moved weights by up to {moved:.3g})")
assert worst <= 1e-5, f"data=2 drifted {worst} from one process"
EOF

# Replay reproduces every mode.
for run in pert2 dir4 data2; do
  "$tune" replay --model m --seed-log $run/seed_log.jsonl --out replay-$run -q
  same $run replay-$run "replay of $run"
done

# A layout that does not fit, and a resume with another layout: refused by name (exit 2).
set +e
mpi 2 "$tune" train "${common[@]}" "${lr[@]}" --steps 2 --out bad --parallel data=4 >bad.log 2>&1
rc=$?
set -e
[ $rc -ne 0 ] || fail "data=4 on 2 ranks was accepted"
grep -q "the factors multiply to 4 but the run has 2 ranks" bad.log || { cat bad.log; fail "no clear layout error"; }
echo "ok: a layout that does not fit is refused"

# Kill one rank mid-run: the job ends within 60 s naming it; the last checkpoint resumes.
mpi 2 "$tune" train "${common[@]}" "${lr[@]}" --steps 1000000 --save-every 50 --out killed --parallel data=2 >killed.log 2>&1 &
job=$!
for _ in $(seq 1 600); do [ -e killed/current ] && break; sleep 0.1; done
[ -e killed/current ] || { kill -9 $job; cat killed.log; fail "no checkpoint was saved"; }
victim=$(pgrep -f "zo2-tune train .*--out killed" | tail -1)
kill -9 "$victim"
start=$(date +%s)
set +e
timeout 120 tail --pid=$job -f /dev/null
wait $job
rc=$?
set -e
took=$(( $(date +%s) - start ))
[ $took -le 60 ] || fail "the job took ${took}s to end after a rank was killed"
[ $rc -ne 0 ] || fail "the job succeeded after a rank was killed"
grep -qiE "rank [0-9]+.*(killed|signal 9)|no word from rank" killed.log || { cat killed.log; fail "the error does not name the rank"; }
echo "ok: a killed rank ends the job in ${took}s with: $(grep -iE 'signal 9|no word' killed.log | head -1)"
done_steps=$(python3 -c "import json;print(json.load(open('killed/zo2_state.json'))['step'])" 2>/dev/null ||
             python3 -c "import json,glob;print(json.load(open(glob.glob('killed/current/zo2_state.json')[0]))['step'])")
mpi 2 "$tune" train --resume killed --out killed --steps $((done_steps + 3)) --device cpu --threads 1 -q --parallel data=2
echo "ok: the last checkpoint (step $done_steps) resumes"
# No rank holds the checkpoint it resumed from (Note [Readers of a live run]): the save
# removed it, as it does in one process.
steps_left=$(find killed -maxdepth 1 -type d -name 'step-*' | wc -l)
[ "$steps_left" -eq 1 ] || { ls -la killed; fail "the resumed run keeps $steps_left step directories"; }
set +e
mpi 2 "$tune" train --resume killed --out killed --steps $((done_steps + 6)) --device cpu --threads 1 -q \
  --parallel perturbation=2 >relayout.log 2>&1
rc=$?
set -e
[ $rc -ne 0 ] && grep -q "used data=2" relayout.log || { cat relayout.log; fail "a resume with another layout was not refused"; }
echo "ok: a resume with another layout is refused"

# A hung rank: the others stop within --rank-timeout, naming it.
start=$(date +%s)
set +e
ZO2_TEST_HANG_RANK=1 ZO2_TEST_HANG_AT_STEP=3 timeout 120 \
  "$mpirun" --oversubscribe --allow-run-as-root -np 2 -x ZO2_TEST_HANG_RANK -x ZO2_TEST_HANG_AT_STEP \
  "$tune" train "${common[@]}" "${lr[@]}" --steps 50 --out hung --parallel perturbation=2 --rank-timeout 5 >hung.log 2>&1
rc=$?
set -e
took=$(( $(date +%s) - start ))
[ $rc -ne 0 ] && [ $rc -ne 124 ] || { cat hung.log; fail "a hung rank: exit $rc"; }
grep -q "no word from rank 1" hung.log || { cat hung.log; fail "the error does not name the hung rank"; }
[ $took -le 60 ] || fail "the job took ${took}s to stop after a rank hung"
echo "ok: a hung rank stops the job in ${took}s: $(grep -m1 'no word from rank 1' hung.log)"
# A whole job suspended (SIGSTOP to every rank: Slurm's scontrol suspend, Ctrl-Z) for longer
# than --rank-timeout and continued: the time the ranks were stopped is not a peer's silence.
mpi 2 "$tune" train "${common[@]}" "${lr[@]}" --steps 1000000 --out suspended --parallel perturbation=2 \
  --rank-timeout 2 --log-json suspended.jsonl >suspended.log 2>&1 &
job=$!
for _ in $(seq 1 600); do [ -s suspended.jsonl ] && break; sleep 0.1; done
ranks=$(pgrep -f "zo2-tune train .*--out suspended" | tr '\n' ' ')
kill -STOP $ranks; sleep 4; kill -CONT $ranks
sleep 2
kill -INT $ranks 2>/dev/null || true
set +e
timeout 120 tail --pid=$job -f /dev/null
wait $job
rc=$?
set -e
# (mpirun reports the ranks' 130 as its own 1)
[ $rc -ne 0 ] && ! grep -q "no word" suspended.log && grep -q "SIGINT" suspended.log && [ -e suspended/current ] ||
  { cat suspended.log; fail "a suspended job: exit $rc"; }
echo "ok: a job suspended for twice --rank-timeout continues, and stops saved on SIGINT"
# The C API as ranks.
if [ -n "$capi" ]; then
  "$capi" m capi-one single 6 >/dev/null
  mpi 2 "$capi" m capi-pert2 perturbation=2 6 | sort
  mpi 4 "$capi" m capi-dir-data data=2,perturbation=2 6 >/dev/null
  same capi-one capi-pert2 "C API: perturbation=2 == one process"
  ZO2_CAPI_SLICED=1 "$mpirun" --oversubscribe --allow-run-as-root -np 2 -x ZO2_CAPI_SLICED "$capi" m capi-pert2s \
    perturbation=2 6 >/dev/null
  same capi-one capi-pert2s "C API: perturbation=2 with sliced uploads == one process"
  [ -e capi-dir-data/current ] || fail "the C API data=2 × perturbation=2 run saved nothing"
fi

# zo2-bench rows as ranks: rank 0 reports the global tok/s, the breakdown and the ranks' memory.
bench="$(dirname "$tune")/../bench/zo2-bench"
if [ -x "$bench" ]; then
  mpi 2 "$bench" --presets opt-tiny --batch-size 4 --seq-len 16 --offload all --steps 2 --warmup 1 --directions 2 \
    --parallel directions=2 --mezo-baseline off --link-probe off --jsonl bench.jsonl -q >/dev/null
  python3 - bench.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert len(rows) == 1, rows
r = rows[0]
assert r["ok"] and r["ranks"] == 2 and r["parallel"] == "directions=2" and r["ranks_pss_bytes"] > 0, r
print(f"ok: zo2-bench as 2 ranks: {r['tokens_per_s']:.0f} tok/s, ranks' PSS {r['ranks_pss_bytes'] / 2**20:.1f} MB")
PY
fi

# One host image per node: 4 ranks hold the weights once, not 4 times (summed PSS).
summary=$(ZO2_TUNE="$tune" "$here/../../scripts/ranks-memory.sh" opt-micro 4 2>/dev/null | grep '^SUMMARY')
echo "$summary"
python3 - "$summary" <<'PY'
import sys
f = dict(kv.split("=") for kv in sys.argv[1].split()[1:])
model, private, shared, n = (int(f[k]) for k in ("model", "private_pss", "shared_pss", "ranks"))
saved = private - shared
assert saved >= 0.8 * (n - 1) * model, f"sharing saved {saved} bytes, expected about {(n - 1) * model}"
print(f"ok: a shared image saves {saved / 2**20:.1f} MB of {n} ranks' memory ({saved / model:.2f} × the model)")
PY
echo "all rank tests passed"
