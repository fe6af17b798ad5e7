#!/usr/bin/env bash
# A full disk (ENOSPC, injected by enospc_shim.so) at the seed log's append and at each file
# of a save: the run fails with exit 1 and a message naming the file and the reason, the run
# directory keeps its last consistent checkpoint (the one of the step before), no torn seed
# log line is left, and once space is back `--resume` finishes with the bytes of the
# uninterrupted run.
# Usage: enospc.sh ZO2_TUNE WORK_DIR SHIM_SO
source "$(dirname "$0")/common.sh"
SHIM="$3"
# A sanitizer runtime must come first in LD_PRELOAD; the shim only wraps libc calls.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}verify_asan_link_order=0"
"$T" -q train --model base "${COMMON[@]}" --shard-size 100K --out ref
failures=0
# Each case: a file name to fill the disk at, and how many bytes of it succeed first.
# Budgets let a few saves through first; shards are reserved whole (fallocate), the others
# are cut mid-write.
cases=("seed_log.jsonl 3000" "seed_log.jsonl 3100" "model-00003-of 200000" "model.safetensors.index.json 9000"
       "config.json 2000" "zo2_state.json 5000" "zo2_state.json 200")
n=0
for c in "${cases[@]}"; do
  read -r match after <<<"$c"
  n=$((n + 1))
  d="case-$n"
  # Two saves go through first (the budget is spent only by writes of the matching file).
  if ZO2_ENOSPC_MATCH="$match" ZO2_ENOSPC_AFTER="$after" LD_PRELOAD="$SHIM" \
     "$T" -q train --model base "${COMMON[@]}" --shard-size 100K --out "$d" 2>"$d.err"; then
    say "$match after $after bytes: the run succeeded although its disk was full"; failures=$((failures + 1)); continue
  fi
  if ! grep -q "No space left on device" "$d.err" || ! grep -q "$match" "$d.err"; then
    say "$match after $after bytes: the error does not name the file and the reason: $(cat "$d.err")"
    failures=$((failures + 1))
  fi
  if [ -f "$d/seed_log.jsonl" ] && [ -n "$(tail -c 1 "$d/seed_log.jsonl")" ]; then
    say "$match after $after bytes: the seed log ends in a torn line"; failures=$((failures + 1))
  fi
  step=$(state_step "$d")
  if [ -n "$step" ]; then
    check_dir "$d" 100K || { say "$match after $after bytes: the directory does not hold its step $step"; failures=$((failures + 1)); continue; }
    "$T" -q train --resume "$d" --out "$d" 2>>"$d.err" ||
      { say "$match after $after bytes: --resume failed: $(cat "$d.err")"; failures=$((failures + 1)); continue; }
  else
    "$T" -q train --model base "${COMMON[@]}" --shard-size 100K --out "$d" --overwrite
  fi
  same_weights "$d" ref || { say "$match after $after bytes: the resumed run differs"; failures=$((failures + 1)); continue; }
  clean_dir "$d" || { say "$match after $after bytes: leftovers remain"; failures=$((failures + 1)); }
  say "$match after $after bytes: failed cleanly at step ${step:-none}; the resume matches the uninterrupted run"
done
# The JSON log: a record that does not fit stops the run after its step (saved, exit 1,
# naming the log and the record), with no torn line; the resume continues the log.
rm -rf jl jl.json
if ZO2_ENOSPC_MATCH="jl.json" ZO2_ENOSPC_AFTER=3000 LD_PRELOAD="$SHIM" \
   "$T" -q train --model base "${COMMON[@]}" --shard-size 100K --out jl --log-json jl.json 2>jl.err; then
  say "--log-json on a full disk: the run succeeded"; failures=$((failures + 1))
elif ! grep -q -- "--log-json jl.json: cannot write step [0-9]*'s record (No space left on device)" jl.err; then
  say "--log-json on a full disk: the error does not name the log and the reason: $(cat jl.err)"; failures=$((failures + 1))
elif [ -n "$(tail -c 1 jl.json)" ]; then
  say "--log-json on a full disk: the log ends in a torn line"; failures=$((failures + 1))
else
  step=$(state_step jl)
  "$T" -q train --resume jl --out jl 2>>jl.err || { say "--log-json: --resume failed: $(cat jl.err)"; failures=$((failures + 1)); }
  same_weights jl ref || { say "--log-json: the resumed run differs"; failures=$((failures + 1)); }
  records=$(grep -c '"step"' jl.json)
  # The record that did not fit is missing (and the step in flight's, if one was), as the
  # error said; every other step has its record.
  { [ "$records" -lt "$STEPS" ] && [ "$records" -ge $((STEPS - 2)) ]; } ||
    { say "--log-json: $records step records after the resume, expected $((STEPS - 2))..$((STEPS - 1))"; failures=$((failures + 1)); }
  say "--log-json on a full disk: stopped and saved at step $step; the resume finished"
fi
cases+=("jl.json")
# A --log-json pipe whose reader goes away (tee, a collector): the same stop and save, not a
# SIGPIPE that ends the run with nothing saved.
rm -rf pj pj.fifo; mkfifo pj.fifo
(head -c 300 pj.fifo >/dev/null) &
# The reader waits in its open(2) before train starts: a train that opened the FIFO twice
# (a probe, then the stream) let it read end-of-file and leave in between, and then waited
# for ever for a reader (the CI of e4bebcc). A hang fails here (timeout's 124), not in CI's.
sleep 0.5
rc=0; timeout 300 "$T" -q train --model base "${COMMON[@]}" --shard-size 100K --out pj --log-json pj.fifo 2>pj.err || rc=$?
kill %1 2>/dev/null || true
wait
if [ "$rc" -ne 1 ] || ! grep -q -- "--log-json pj.fifo: cannot write" pj.err || [ -z "$(state_step pj)" ]; then
  say "--log-json to a closed pipe: exit $rc, no clean stop and save: $(cat pj.err)"; failures=$((failures + 1))
else
  timeout 300 "$T" -q train --resume pj --out pj 2>>pj.err || { say "closed pipe: --resume failed: $(cat pj.err)"; failures=$((failures + 1)); }
  same_weights pj ref || { say "closed pipe: the resumed run differs"; failures=$((failures + 1)); }
  say "--log-json to a closed pipe: stopped and saved at step $(state_step pj) (exit 1); the resume finished"
fi
cases+=("pj.fifo")
say "ENOSPC cases: ${#cases[@]}; failures: $failures"
[ "$failures" -eq 0 ]
