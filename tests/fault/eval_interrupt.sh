#!/usr/bin/env bash
# Ctrl-C during an evaluation (Note [An interrupted evaluation], tools/cmd_train.cpp): the
# evaluation stops before its next batch, the run saves and exits 130 without recording the
# partial numbers, and a --resume runs the owed evaluation first, so the resumed run's log
# and weights are the uninterrupted run's. SIGINT is raised by the test hook
# ZO2_TEST_SIGINT_IN_EVAL=STEP:K as the evaluation after STEP asks for the K-th time whether
# to stop (once before each batch).
# Usage: eval_interrupt.sh ZO2_TUNE WORK_DIR
STEPS=6
source "$(dirname "$0")/common.sh"
# 40 rows in batches of 4: 10 batches an evaluation.
"$T" -q synth-data --model base --out dev.safetensors --rows 40 --seq 16 --seed 5
flags() {
  echo --data data.safetensors --steps "$STEPS" --batch-size 4 --lr 3e-3 --save-every 2 \
    --eval dev.safetensors --eval-every 3 --log-json "$1.log"
}
summary() {
  python3 -c '
import json, sys
for line in open(sys.argv[1]):
    j = json.loads(line)
    if "step" in j: print("step", j["step"], j["loss"], j["g"])
    else: print("eval", j["eval_after_step"], j["eval_loss"], j["eval_examples"], j["eval_tokens"])' "$1"
}
owed() { sed -n 's/^  "eval_owed_after_step": \([0-9]*\),*$/\1/p' "$1/current/zo2_state.json"; }
# The manifest's version: 4 when it owes an evaluation (a zo2 reading 1 to 3 would skip it),
# else 3 (Note [State versions]).
version() { sed -n 's/^  "zo2_state": \([0-9]*\),*$/\1/p' "$1/current/zo2_state.json"; }
# shellcheck disable=SC2046
"$T" -q train --model base $(flags ref) --out ref
summary ref.log > ref.summary
[ "$(grep -c '^eval' ref.summary)" -eq 2 ] || { say "the reference run did not evaluate twice"; exit 1; }
[ -z "$(owed ref)" ] || { say "an uninterrupted run owes an evaluation"; exit 1; }
failures=0
# After step 3 (mid-run, between saves: the stop saves step 3) and after step 6 (the final
# evaluation); the 1st ask (before any batch) and the 4th (after 3 of 10 batches).
for at in 3:1 3:4 6:4; do
  d="run-${at/:/-}"
  set +e
  # shellcheck disable=SC2046
  ZO2_TEST_SIGINT_IN_EVAL=$at "$T" train --model base $(flags "$d") --out "$d" 2>"$d.err1"
  rc=$?
  set -e
  step=${at%:*}
  [ "$rc" -eq 130 ] || { say "$at: exit $rc, not 130"; cat "$d.err1"; failures=$((failures + 1)); continue; }
  grep -q "the evaluation after step $step was interrupted" "$d.err1" ||
    { say "$at: no word of the interrupted evaluation"; cat "$d.err1"; failures=$((failures + 1)); }
  if [ "$(state_step "$d")" != "$step" ] || [ "$(owed "$d")" != "$step" ] || [ "$(version "$d")" != 4 ]; then
    say "$at: saved at step $(state_step "$d") owing '$(owed "$d")', version $(version "$d") (expected $step, $step and 4)"
    failures=$((failures + 1))
  fi
  if grep -q "\"eval_after_step\":$step" "$d.log"; then say "$at: the partial evaluation was recorded"; failures=$((failures + 1)); fi
  "$T" -q train --resume "$d" --out "$d" 2>"$d.err2" || { cat "$d.err2"; failures=$((failures + 1)); continue; }
  same_weights "$d" ref || { say "$at: the resumed run differs from the uninterrupted one"; failures=$((failures + 1)); }
  [ -z "$(owed "$d")" ] && [ "$(version "$d")" = 3 ] ||
    { say "$at: the finished run still owes an evaluation, or its version is not 3"; failures=$((failures + 1)); }
  summary "$d.log" > "$d.summary"
  diff -u ref.summary "$d.summary" || { say "$at: the log of the resumed run is not the uninterrupted run's"; failures=$((failures + 1)); }
done
say "interrupts: 3; failures: $failures"
[ "$failures" -eq 0 ]
