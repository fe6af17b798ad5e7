#!/usr/bin/env bash
# Machines that lack a feature (adversarial pass 61): a container whose seccomp profile
# refuses io_uring (Docker's and containerd's defaults answer io_uring_setup with EPERM; so
# does kernel.io_uring_disabled), and a cluster file system that refuses file locks (Lustre
# without -o flock answers flock(2) with ENOSYS, NFS without a lock daemon ENOLCK). A disk-tier
# run there trains, resumes and evaluates to the unrestricted run's exact bytes, saying once
# what it does instead (Note [Disk I/O without io_uring] in offload/io_queue.h, Note [File
# systems without locks] in runtime/file_util.h); zo2-bench's disk probe runs too. Before,
# train stopped at "cannot set up io_uring" or "zo2.lock: cannot lock". And a file system
# without symbolic links (exFAT, an SMB share) is refused before the first step instead of
# at the first save.
# Usage: features.sh ZO2_TUNE WORK_DIR DENY_SYSCALLS [ZO2_BENCH]
STEPS=6
source "$(dirname "$0")/common.sh"
DENY="$3"
BENCH="${4:-}"
"$DENY" flock=ENOSYS -- true || { rc=$?; [ "$rc" = 77 ] && { say "no seccomp filters here: skipped"; exit 0; }; exit 1; }
failures=0
bad() { say "$*"; failures=$((failures + 1)); }
disk() { echo --offload all --window 2 --host-mem 400K --disk-staging 1 --disk-lag 2 --disk-dir "$1.blocks"; }
flags() { echo --data data.safetensors --steps "${2:-$STEPS}" --batch-size 4 --lr 3e-3 --save-every 3 --log-json "$1.log" $(disk "$1"); }
# What a JSON log says of the training, in order: each step's loss and projected gradient.
summary() { python3 -c 'import json, sys; [print(j.get("step"), j.get("loss"), j.get("g")) for j in map(json.loads, open(sys.argv[1]))]' "$1"; }
# shellcheck disable=SC2046
"$T" -q train --model base $(flags ref) --out ref

for lock_errno in ENOSYS ENOLCK; do
  d="run-$lock_errno"
  denied=("$DENY" io_uring_setup=EPERM flock="$lock_errno" --)
  # shellcheck disable=SC2046
  "${denied[@]}" "$T" -q train --model base $(flags "$d") --out "$d" 2>"$d.err" && rc=0 || rc=$?
  if [ "$rc" != 0 ]; then bad "$lock_errno: train exit $rc: $(cat "$d.err")"; continue; fi
  same_weights "$d" ref || bad "$lock_errno: the weights differ from the unrestricted run's"
  [ "$(summary "$d.log")" = "$(summary ref.log)" ] || bad "$lock_errno: the JSON log differs"
  # What it says: once each, the cause and what it does instead.
  [ "$(grep -c 'refuses file locks' "$d.err")" = 1 ] && grep -q "$(python3 -c "import os,errno; print(os.strerror(errno.$lock_errno))")" "$d.err" ||
    bad "$lock_errno: the lock warning: $(cat "$d.err")"
  [ "$(grep -c 'cannot set up io_uring' "$d.err")" = 1 ] && grep -q "threads instead" "$d.err" ||
    bad "$lock_errno: the io_uring warning: $(cat "$d.err")"
  # A resume from the step-3 checkpoint, there too: cut the run back to it and go on.
  r="$d-resume"
  # shellcheck disable=SC2046
  "${denied[@]}" "$T" -q train --model base $(flags "$r" 3) --out "$r" 2>/dev/null || bad "$lock_errno: first half"
  # shellcheck disable=SC2046
  "${denied[@]}" "$T" -q train --resume "$r" --out "$r" --steps "$STEPS" $(disk "$r") 2>"$r.err" ||
    bad "$lock_errno: resume: $(cat "$r.err")"
  same_weights "$r" ref || bad "$lock_errno: the resumed run differs from the uninterrupted one"
  # A reader of the run directory (its step directory unpinned: no lock to hold it).
  "${denied[@]}" "$T" -q eval --model "$d" --data data.safetensors --batch-size 8 >"$d.eval" 2>"$d.eval.err" ||
    bad "$lock_errno: eval: $(cat "$d.eval.err")"
  "$T" -q eval --model ref --data data.safetensors --batch-size 8 >ref.eval
  cmp -s "$d.eval" ref.eval || bad "$lock_errno: eval says $(cat "$d.eval"), not $(cat ref.eval)"
done

# A file system without symbolic links (exFAT, an SMB share): refused before the first step,
# not at the first save (Note [Run directories need links] in api/run_dir.cpp).
"$DENY" symlink=EPERM symlinkat=EPERM -- "$T" -q train --model base $(flags nolinks) --out nolinks 2>nolinks.err &&
  rc=0 || rc=$?
[ "$rc" = 1 ] && grep -q "cannot create a symbolic link there (Operation not permitted)" nolinks.err ||
  bad "a run directory without links: exit $rc: $(cat nolinks.err)"
! grep -qs '"step"' nolinks.log || bad "a run directory without links: it trained before refusing"

if [ -n "$BENCH" ]; then
  "$DENY" io_uring_setup=EPERM -- "$BENCH" --disk-probe --disk-dir . --disk-probe-bytes 8M -q >probe.out 2>probe.err &&
    rc=0 || rc=$?
  [ "$rc" = 0 ] && grep -q "O_DIRECT, threads" probe.out && grep -q "threads instead" probe.err ||
    bad "zo2-bench --disk-probe without io_uring: exit $rc: $(cat probe.out probe.err)"
  "$DENY" io_uring_setup=EPERM -- "$BENCH" --disk-probe --disk-dir . --disk-probe-bytes 8M --disk-io io_uring -q \
    >/dev/null 2>probe.err && rc=0 || rc=$?
  [ "$rc" = 1 ] && grep -q "cannot set up io_uring (32 entries): Operation not permitted" probe.err ||
    bad "zo2-bench --disk-io io_uring without io_uring: exit $rc: $(cat probe.err)"
fi
[ "$failures" = 0 ] || { say "$failures failure(s)"; exit 1; }
say "ok"
