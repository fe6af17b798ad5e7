#!/usr/bin/env bash
# SIGKILL at random moments of a training run that saves every step (single-file and
# sharded checkpoints, and a run whose blocks live on the disk tier: --host-mem below the
# model, every block in a block file in --disk-dir, each killed run its own): after each
# kill the run directory must hold exactly the weights of its recorded step (eval loads it;
# replaying the seed log to that step gives the same bytes), and `--resume` must finish with
# the bytes of the uninterrupted run (for the disk layout, also the bytes of the RAM run).
# Usage: sigkill.sh ZO2_TUNE WORK_DIR [KILLS_PER_LAYOUT (default 30; env ZO2_FAULT_KILLS)]
source "$(dirname "$0")/common.sh"
KILLS=${3:-${ZO2_FAULT_KILLS:-30}}
inconsistent=0 failed_resume=0 divergent=0 before_first_save=0 adopted_first_save=0 total=0 past_checkpoint=0
# The disk layout's flags for run directory $1: opt-tiny's two 195 KiB blocks do not fit
# beside its 145 KiB of globals and one staging buffer under 400K, so both live on disk;
# a block is written back every second update, and the run saves every 4th step, so most
# kills leave images and a seed log past the checkpoint, which a resume applies (Note [Disk
# tier resume] in api/session.cpp).
# ZO2_FAULT_DISK_FLAGS adds flags to that layout (e.g. --tile 64M: the blocks go from the
# staging buffer to the device by weight tiles, Note [Sub-block streaming]); ZO2_FAULT_LAYOUTS
# picks the layouts (default: single sharded disk).
disk_flags() {
  echo --offload all --window 2 --host-mem 400K --disk-staging 1 --disk-lag 2 --disk-dir "$1.blocks" \
    ${ZO2_FAULT_DISK_FLAGS:-}
}
for layout in ${ZO2_FAULT_LAYOUTS:-single sharded disk}; do
  shard=5G
  [ "$layout" = sharded ] && shard=100K
  extra() { [ "$layout" = disk ] && disk_flags "$1"; true; }
  common=("${COMMON[@]}")
  [ "$layout" = disk ] && common=(--data data.safetensors --steps "$STEPS" --batch-size 4 --lr 3e-3 --save-every 4)
  start=$(date +%s%N)
  # shellcheck disable=SC2046
  "$T" -q train --model base "${common[@]}" --shard-size "$shard" --out "ref-$layout" $(extra "ref-$layout")
  dur_ms=$(( ($(date +%s%N) - start) / 1000000 ))
  [ "$layout" = sharded ] && [ "$(ls ref-sharded/current/*.safetensors | wc -l)" -gt 1 ]
  say "$layout: the uninterrupted run takes ${dur_ms} ms; killing $KILLS runs at random moments in it"
  for i in $(seq 1 "$KILLS"); do
    d="run-$layout-$i"
    delay_ms=$(( RANDOM % (dur_ms + 1) ))
    # shellcheck disable=SC2046
    "$T" -q train --model base "${common[@]}" --shard-size "$shard" --out "$d" $(extra "$d") 2>/dev/null &
    pid=$!
    sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    total=$((total + 1))
    step=$(state_step "$d")
    if [ -z "$step" ]; then
      # Killed before the first save was committed: either nothing is published and a resume
      # is refused (then --overwrite starts again), or the first save's step directory was
      # whole and the resume commits it (api/run_dir.cpp clean_run_dir) and goes on from it;
      # either way the run must end with the uninterrupted run's weights (checked below).
      before_first_save=$((before_first_save + 1))
      # shellcheck disable=SC2046
      if "$T" -q train --resume "$d" --out "$d" $(extra "$d") 2>/dev/null; then
        adopted_first_save=$((adopted_first_save + 1))
      else
        # shellcheck disable=SC2046
        "$T" -q train --model base "${common[@]}" --shard-size "$shard" --out "$d" --overwrite $(extra "$d") 2>/dev/null ||
          { say "$d: --overwrite after a kill before the first save failed"; failed_resume=$((failed_resume + 1)); continue; }
      fi
    else
      if ! check_dir "$d" "$shard"; then
        say "$d: killed at ${delay_ms} ms: the directory does not hold the weights of its step $step"
        inconsistent=$((inconsistent + 1))
        continue
      fi
      # A seed log that runs past the checkpoint: the disk layout's resume applies it.
      [ "$(grep -c '"step"' "$d/seed_log.jsonl")" -gt "$step" ] && past_checkpoint=$((past_checkpoint + 1))
      # shellcheck disable=SC2046
      if ! "$T" -q train --resume "$d" --out "$d" $(extra "$d") 2>"$d.err"; then
        say "$d: --resume from step $step failed: $(cat "$d.err")"; failed_resume=$((failed_resume + 1)); continue
      fi
    fi
    if ! same_weights "$d" "ref-$layout"; then
      say "$d: killed at ${delay_ms} ms (step ${step:-none}): the resumed run differs from the uninterrupted one"
      divergent=$((divergent + 1)); continue
    fi
    clean_dir "$d" || { say "$d: leftovers of the interrupted save remain"; inconsistent=$((inconsistent + 1)); }
    rm -rf "$d" "$d.err" "$d.blocks"
  done
  # The disk tier gives the all-in-RAM run's bytes.
  if [ "$layout" = disk ] && ! same_weights ref-disk ref-single; then
    say "the run through the disk tier differs from the run in RAM"; divergent=$((divergent + 1))
  fi
done
say "kills: $total ($before_first_save before the first save, $adopted_first_save of them resumed from its uncommitted step, $past_checkpoint with a seed log past the checkpoint);" \
  "inconsistent directories: $inconsistent; failed resumes: $failed_resume; divergent resumes: $divergent"
[ $((inconsistent + failed_resume + divergent)) -eq 0 ]
