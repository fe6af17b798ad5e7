#!/usr/bin/env bash
# --log-json under the disk tier: a run killed just before or just after a step's seed-log
# line (ZO2_TEST_KILL_AT_LOG_LINE, api/session.cpp) and resumed logs every step and every
# evaluation exactly once, with the uninterrupted run's losses (Note [Records before the log
# line]). The resume applies the logged steps past the checkpoint instead of running them
# again (Note [Disk tier resume]), so a record written after the line would be lost for good,
# and so would an evaluation due after the last logged step.
# Usage: records.sh ZO2_TUNE WORK_DIR
STEPS=8
source "$(dirname "$0")/common.sh"
"$T" -q synth-data --model base --out dev.safetensors --rows 8 --seq 16 --seed 5
disk() { echo --offload all --window 2 --host-mem 400K --disk-staging 1 --disk-lag 2 --disk-dir "$1.blocks"; }
flags() {
  echo --data data.safetensors --steps "$STEPS" --batch-size 4 --lr 3e-3 --save-every 4 \
    --eval dev.safetensors --eval-every 3 --log-json "$1.log" $(disk "$1")
}
# What a log says, in order: each record's step or evaluation and its loss (timings differ).
summary() {
  python3 -c '
import json, sys
for line in open(sys.argv[1]):
    j = json.loads(line)
    if "step" in j: print("step", j["step"], j["loss"], j["g"])
    else: print("eval", j["eval_after_step"], j["eval_loss"])' "$1"
}
# shellcheck disable=SC2046
"$T" -q train --model base $(flags ref) --out ref
summary ref.log > ref.summary
[ "$(grep -c '^step' ref.summary)" -eq "$STEPS" ] && [ "$(grep -c '^eval' ref.summary)" -eq 3 ]
failures=0
# Step index 4 is past the checkpoint of step 4; index 5 ends at step 6, when an evaluation is due.
for at in 4:before 4:after 5:before 5:after; do
  d="run-${at/:/-}"
  set +e
  # shellcheck disable=SC2046
  ZO2_TEST_KILL_AT_LOG_LINE=$at "$T" -q train --model base $(flags "$d") --out "$d" 2>/dev/null
  rc=$?
  set -e
  [ "$rc" -eq 137 ] || { say "$at: the run was not killed (exit $rc)"; failures=$((failures + 1)); continue; }
  # The killed run's log runs past its checkpoint (step 4) when the kill came after step
  # index 4's line: the resume applies those steps instead of running them.
  want=${at%:*}
  [ "${at#*:}" = after ] && want=$((want + 1))
  logged=$(grep -c '"step"' "$d/seed_log.jsonl")
  if [ "$(state_step "$d")" != 4 ] || [ "$logged" -ne "$want" ]; then
    say "$at: killed at step $(state_step "$d") with $logged logged steps (expected 4 and $want)"; failures=$((failures + 1))
  fi
  # shellcheck disable=SC2046
  "$T" -q train --resume "$d" --out "$d" $(disk "$d") 2>"$d.err" || { cat "$d.err"; failures=$((failures + 1)); continue; }
  if ! same_weights "$d" ref; then say "$at: the resumed run differs from the uninterrupted one"; failures=$((failures + 1)); fi
  summary "$d.log" > "$d.summary"
  if ! diff -u ref.summary "$d.summary"; then
    say "$at: the log of the resumed run is not the uninterrupted run's"; failures=$((failures + 1))
  fi
done
# Killed after the last evaluation's record, before the final save: the resume applies every
# logged step and must not evaluate (or log) step 8 again.
d=run-final-eval
set +e
# shellcheck disable=SC2046
ZO2_TEST_KILL_AFTER_RECORD=eval:$STEPS "$T" -q train --model base $(flags "$d") --out "$d" 2>/dev/null
rc=$?
set -e
if [ "$rc" -ne 137 ]; then say "final eval: the run was not killed (exit $rc)"; failures=$((failures + 1)); else
  # shellcheck disable=SC2046
  "$T" -q train --resume "$d" --out "$d" $(disk "$d") 2>"$d.err" || { cat "$d.err"; failures=$((failures + 1)); }
  same_weights "$d" ref || { say "final eval: the resumed run differs from the uninterrupted one"; failures=$((failures + 1)); }
  summary "$d.log" > "$d.summary"
  diff -u ref.summary "$d.summary" || { say "final eval: the log of the resumed run is not the uninterrupted run's"; failures=$((failures + 1)); }
fi
say "kills: 5; failures: $failures"
[ "$failures" -eq 0 ]
