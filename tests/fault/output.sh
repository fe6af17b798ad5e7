#!/usr/bin/env bash
# Lost output (Note [Standard streams] in tools/cli.h, Note [A stopped seed log] in
# api/session.cpp): a train whose progress pipe loses its reader, a --log-json pipe that does,
# a file past `ulimit -f`, and zo2-bench's files on a full disk. Each must end with exit 1 (not
# SIGABRT 134, SIGXFSZ 153 or a silent 0), leave no temporary files, and — for train — a run
# directory whose seed log has no hole and which `--resume` finishes.
# Usage: output.sh ZO2_TUNE WORK_DIR [ZO2_BENCH]
source "$(dirname "$0")/common.sh"
BENCH="${3:-}"
failures=0
bad() { say "$*"; failures=$((failures + 1)); }

# The seed log's steps are 0, 1, …, N−1 with no hole; prints N.
log_steps() {
  python3 - "$1" <<'EOF'
import json, sys
steps = [json.loads(l)["step"] for l in open(sys.argv[1]).read().splitlines()[1:]]
if steps != list(range(len(steps))):
    sys.exit("the seed log's steps are %s" % steps)
print(len(steps))
EOF
}
no_temps() { [ -z "$(find "$1" -name '*.tmp*' | head -1)" ]; }

# 1. The progress goes to a pipe whose reader exits: train stops after the step, saves, exit 1.
set +e
"$T" train --model base --data data.safetensors --out p --steps 200 --batch-size 4 --lr 1e-3 --threads 1 \
  --save-every 7 --log-every 1 2>&1 | head -25 >/dev/null
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 1 ]; then
  bad "progress pipe: exit $rc, not 1"
elif ! n=$(log_steps p/seed_log.jsonl); then
  bad "progress pipe: the seed log has a hole"
elif [ "$(state_step p)" != "$n" ]; then
  bad "progress pipe: saved at step $(state_step p), the log ends at step $n"
elif ! "$T" -q train --resume p --out p --steps 40 2>p.err; then
  bad "progress pipe: --resume failed: $(cat p.err)"
elif [ "$(log_steps p/seed_log.jsonl)" != 40 ] || ! no_temps p; then
  bad "progress pipe: the resumed run's log or directory is wrong"
else
  say "progress pipe: stopped and saved at step $n; the resume finished"
fi

# 2. --log-json to a pipe whose reader exits: the same, and the error says what happened.
"$T" train --model base --data data.safetensors --out j --steps 200 --batch-size 4 --lr 1e-3 --threads 1 \
  --log-json >(head -c 1 >/dev/null) 2>j.err && rc=0 || rc=$?
if [ "$rc" != 1 ]; then
  bad "--log-json pipe: exit $rc, not 1: $(cat j.err)"
elif ! grep -q "cannot write step [0-9]*'s record (Broken pipe: the program reading it exited)" j.err ||
     grep -q "once the disk has room" j.err; then
  bad "--log-json pipe: the error does not say what happened: $(cat j.err)"
elif ! log_steps j/seed_log.jsonl >/dev/null || ! "$T" -q train --resume j --out j --steps 20 2>>j.err; then
  bad "--log-json pipe: the run does not resume: $(cat j.err)"
else
  say "--log-json pipe: stopped, saved, named the broken pipe; the resume finished"
fi

# 3. A file past `ulimit -f`: "File too large" and exit 1 (not SIGXFSZ), no temporary files.
"$T" -q train --model base --data data.safetensors --out fz --steps 3 --batch-size 2 --threads 1
# 400 KiB: the seed log and the state fit, the 540 KiB model does not.
(ulimit -f 400; "$T" -q train --resume fz --out fz --steps 12 --threads 1 --save-every 3) 2>fz.err &&
  rc=0 || rc=$?
if [ "$rc" != 1 ] || ! grep -q "File too large" fz.err; then
  bad "ulimit -f: train exit $rc: $(cat fz.err)"
elif ! no_temps fz || [ "$(state_step fz)" != 3 ]; then
  bad "ulimit -f: train left temporary files or lost its checkpoint: $(ls -a fz)"
else
  say "ulimit -f: train failed with 'File too large', its checkpoint kept, nothing left behind"
fi
(ulimit -f 16; "$T" -q init --preset opt-tiny --out small) 2>init.err && rc=0 || rc=$?
if [ "$rc" != 1 ] || ! grep -q "File too large" init.err || [ -e small ]; then
  bad "ulimit -f: init exit $rc, or the directory it made is left: $(cat init.err) $(ls -a small 2>/dev/null)"
fi
# ... and a directory that was there before stays, with what it had.
mkdir -p had && echo "notes" > had/notes.txt
(ulimit -f 16; "$T" -q init --preset opt-tiny --out had) 2>init.err && rc=0 || rc=$?
if [ "$rc" != 1 ] || ! no_temps had || [ "$(cat had/notes.txt)" != notes ]; then
  bad "ulimit -f: init into an existing directory exit $rc, or it lost its files: $(cat init.err) $(ls -a had)"
fi

# 4. zo2-bench: its files on a full disk are errors naming them; stderr full or closed is not;
#    no TMPDIR is needed when nothing runs Python.
if [ -n "$BENCH" ]; then
  B0=(--presets opt-tiny --steps 1 --warmup 0 --seq-len 8 --link-probe off -q)
  B=("${B0[@]}" --mezo-baseline off)
  "$BENCH" "${B[@]}" --jsonl /dev/full --markdown /dev/full >/dev/null 2>b.err && rc=0 || rc=$?
  if [ "$rc" != 1 ] || ! grep -q -- "--jsonl /dev/full: cannot write: No space left on device" b.err ||
     ! grep -q -- "--markdown /dev/full: cannot write: No space left on device" b.err; then
    bad "zo2-bench on a full disk: exit $rc: $(cat b.err)"
  fi
  "$BENCH" "${B[@]}" >/dev/full 2>b.err && rc=0 || rc=$?
  [ "$rc" = 1 ] && grep -q "cannot write the standard output" b.err || bad "zo2-bench >/dev/full: exit $rc: $(cat b.err)"
  for redirect in "2>&-" "2>/dev/full"; do
    eval '"$BENCH" "${B[@]}" >/dev/null '"$redirect" && rc=0 || rc=$?
    [ "$rc" = 0 ] || bad "zo2-bench $redirect: exit $rc"
  done
  TMPDIR=/nonexistent "$BENCH" "${B[@]}" >/dev/null 2>b.err && rc=0 || rc=$?
  [ "$rc" = 0 ] || bad "zo2-bench without a TMPDIR it needs: exit $rc: $(cat b.err)"
  TMPDIR=/nonexistent "$BENCH" "${B0[@]}" --mezo-baseline on >/dev/null 2>b.err && rc=0 || rc=$?
  [ "$rc" = 1 ] && grep -q "TMPDIR=/nonexistent" b.err || bad "zo2-bench with a missing TMPDIR it needs: exit $rc: $(cat b.err)"
  say "zo2-bench: lost files and output are errors; a lost stderr and an unneeded TMPDIR are not"
fi

[ "$failures" = 0 ] || { say "$failures failure(s)"; exit 1; }
say "ok"
