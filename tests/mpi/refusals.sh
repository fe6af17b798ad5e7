#!/usr/bin/env bash
# What an MPI launch refuses or cleans up (runtime/comm.h Note [One job] and Note [Rank faults],
# runtime/shared_host.h), on the CPU backend:
#   - ranks launched with another --seed, --steps, data file or model (MPMD, as node-local
#     files that differ would be) are refused on every rank, exit 2, naming what differs and
#     the rank; copies of the same files with per-rank --threads are not
#   - a rank that hangs or fails while the shared host image is being mapped leaves no
#     /dev/shm/zo2-* segment behind
#   - --resume under mpirun keeps the run's --parallel and ends with the uninterrupted run's bytes
#   - subcommands other than train refuse an mpirun launch (exit 2) and write nothing
#   - --host-mem with ranks exits 2; --parallel is echoed as typed
#   - a C host program's ranks with other models are refused by the session
# Usage: refusals.sh ZO2_TUNE WORK_DIR [MPIRUN [ZO2_CAPI_RANKS]]
source "$(cd "$(dirname "$0")" && pwd)/common.sh" "$@"
launch=("$mpirun" --oversubscribe --allow-run-as-root)
fail() { echo "FAIL: $*" >&2; exit 1; }
# refused NAME PATTERN CMD...: CMD exits 2 within 60 s and its output matches PATTERN.
refused() {
  local name=$1 pattern=$2
  shift 2
  local start rc
  start=$(date +%s)
  set +e
  timeout 120 "$@" >"$name.log" 2>&1
  rc=$?
  set -e
  [ $rc -eq 2 ] || { cat "$name.log"; fail "$name: exit $rc, expected 2"; }
  grep -qE -e "$pattern" "$name.log" || { cat "$name.log"; fail "$name: no '$pattern' in the output"; }
  [ $(( $(date +%s) - start )) -le 60 ] || fail "$name: took more than 60 s"
  echo "ok: $name: $(grep -m1 -oE -e "$pattern.*" "$name.log" | cut -c1-150)"
}

"$tune" init --preset opt-tiny --out m --seed 3 -q
"$tune" init --preset opt-tiny --out m-other --seed 4 -q  # the same shapes, other weights
cp -r m m-copy
"$tune" synth-data --model m --out d.safetensors --rows 64 --seq 16 --seed 1 -q
"$tune" synth-data --model m --out d-other.safetensors --rows 64 --seq 16 --seed 2 -q
cp d.safetensors d-copy.safetensors
run=(train --data d.safetensors --batch-size 4 --lr 1e-3 --device cpu --offload all -q --parallel perturbation=2)

# Ranks that do not run the same job (Note [One job]): every rank refuses, naming the part.
refused seed "--seed: 8 on rank 1 but 7 on rank 0" \
  "${launch[@]}" -np 1 "$tune" "${run[@]}" --model m --steps 4 --seed 7 --out a : \
  -np 1 "$tune" "${run[@]}" --model m --steps 4 --seed 8 --out b
refused steps "--steps: 5 on rank 1 but 4 on rank 0" \
  "${launch[@]}" -np 1 "$tune" "${run[@]}" --model m --steps 4 --out a : -np 1 "$tune" "${run[@]}" --model m --steps 5 --out b
refused data "the training data \(--data\): 64 examples, digest [0-9a-f]+ on rank 1 but" \
  "${launch[@]}" -np 1 "$tune" "${run[@]}" --model m --steps 4 --out a : \
  -np 1 "$tune" train --data d-other.safetensors --batch-size 4 --lr 1e-3 --device cpu --offload all -q \
  --parallel perturbation=2 --model m --steps 4 --out b
refused model "the model's weights: .* on rank 1 but" \
  "${launch[@]}" -np 1 "$tune" "${run[@]}" --model m --steps 4 --out a : -np 1 "$tune" "${run[@]}" --model m-other --steps 4 --out b
[ ! -e a ] && [ ! -e b ] || fail "a refused job wrote its --out"
grep -q "rank 0 of 2: the ranks do not run the same job" seed.log && grep -q "rank 1 of 2: the ranks do not run the same job" seed.log ||
  { cat seed.log; fail "not every rank refused"; }
# Copies of the same files, per-rank --threads: one job, the bits of the plain launch.
"${launch[@]}" -np 2 "$tune" "${run[@]}" --model m --steps 4 --threads 1 --out same
"${launch[@]}" -np 1 "$tune" "${run[@]}" --model m --steps 4 --threads 1 --out copies : \
  -np 1 "$tune" train --data d-copy.safetensors --batch-size 4 --lr 1e-3 --device cpu --offload all -q \
  --parallel perturbation=2 --model m-copy --steps 4 --threads 2 --out copies-1
cmp -s same/model.safetensors copies/model.safetensors || fail "copies of the files gave other weights"
echo "ok: copies of the same files with per-rank --threads run as one job"

# A rank that hangs or fails while the shared host image is mapped: no segment stays in /dev/shm.
leftovers() {  # zo2 segments whose creator (rank 0, its pid in the name) is gone
  local f pid
  for f in /dev/shm/zo2-*; do
    [ -e "$f" ] || continue
    pid=$(basename "$f" | cut -d- -f2)
    kill -0 "$pid" 2>/dev/null || echo "$f"
  done
}
before=$(leftovers | sort)
for fault in hang:1 hang:0 fail:1 fail:0; do
  set +e
  ZO2_TEST_MAPPING_FAULT=$fault timeout 120 "${launch[@]}" -np 2 -x ZO2_TEST_MAPPING_FAULT \
    "$tune" "${run[@]}" --model m --steps 2 --threads 1 --out shm --rank-timeout 3 >shm.log 2>&1
  rc=$?
  set -e
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || { cat shm.log; fail "mapping fault $fault: exit $rc"; }
  grep -qE "no word from rank|ZO2_TEST_MAPPING_FAULT" shm.log || { cat shm.log; fail "mapping fault $fault: no error"; }
  new=$(comm -13 <(echo "$before") <(leftovers | sort))
  [ -z "$new" ] || { rm -f $new; fail "mapping fault $fault left $new in /dev/shm"; }
  echo "ok: a rank that fails mapping the shared image ($fault) leaves nothing in /dev/shm"
done

# --resume under mpirun keeps the run's --parallel (not the default data=N).
"${launch[@]}" -np 2 "$tune" "${run[@]}" --model m --steps 6 --seed 7 --out whole
"${launch[@]}" -np 2 "$tune" "${run[@]}" --model m --steps 6 --seed 7 --out resumed --stop-at 3
"${launch[@]}" -np 2 "$tune" train --resume resumed --out resumed -q
cmp -s whole/model.safetensors resumed/model.safetensors || fail "the resumed perturbation=2 run differs"
echo "ok: --resume keeps the run's --parallel perturbation=2 and ends with the uninterrupted run's bytes"
refused resume-ranks "--resume resumed: the run used --parallel perturbation=2 \(with 2 ranks\) but this job has 4 ranks" \
  "${launch[@]}" -np 4 "$tune" train --resume resumed --out resumed -q --steps 8

# Subcommands other than train run as one process.
refused init-ranks "init runs as one process, but this one was started by an MPI launcher as one of 2 ranks" \
  "${launch[@]}" -np 2 "$tune" init --preset opt-tiny --out init-ranks -q
[ ! -e init-ranks ] || fail "init under mpirun wrote its --out"
refused replay-ranks "replay runs as one process" \
  "${launch[@]}" -np 2 "$tune" replay --model m --seed-log whole/seed_log.jsonl --out replay-ranks -q
[ ! -e replay-ranks ] || fail "replay under mpirun wrote its --out"
refused eval-ranks "eval runs as one process" "${launch[@]}" -np 2 "$tune" eval --model m --data d.safetensors --device cpu -q
refused plan-ranks "plan runs as one process" "${launch[@]}" -np 2 "$tune" plan --preset opt-tiny --gpu-mem 1G -q

# Usage errors with ranks exit 2, echoing what was typed.
refused host-mem "--host-mem: the disk tier serves one process" \
  "${launch[@]}" -np 2 "$tune" "${run[@]}" --model m --steps 2 --out hm --host-mem 1G --disk-dir "$work/disk"
refused typed "--parallel data=1,perturbation=1: the factors multiply to 1 but the run has 2 ranks" \
  "${launch[@]}" -np 2 "$tune" train --data d.safetensors --batch-size 4 --device cpu -q --model m --steps 2 --out t \
  --parallel data=1,perturbation=1

# A C host program: the session compares its ranks' models.
if [ -n "$capi" ]; then
  set +e
  timeout 120 "${launch[@]}" -np 1 "$capi" m capi-a perturbation=2 2 : -np 1 "$capi" m-other capi-b perturbation=2 2 \
    >capi.log 2>&1
  rc=$?
  set -e
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || { cat capi.log; fail "C API ranks with other models: exit $rc"; }
  grep -q "session: zo2_session_init: the ranks do not run the same job: the model.s weights" capi.log || { cat capi.log; fail "C API: no refusal"; }
  echo "ok: C API ranks with other models are refused by the session"
fi
echo "all refusal tests passed"
