# Shared by the fault-injection tests: a tiny model, a dataset, and checks that a run
# directory holds exactly the weights of its recorded step.
set -euo pipefail
T="$1"           # zo2-tune
W="$2"           # work directory (recreated)
rm -rf "$W"
mkdir -p "$W"
cd "$W"
"$T" -q init --preset opt-tiny --out base --seed 1
"$T" -q synth-data --model base --out data.safetensors --rows 64 --seq 16
STEPS=${STEPS:-60}
COMMON=(--data data.safetensors --steps "$STEPS" --batch-size 4 --lr 3e-3 --save-every 1)

say() { echo "[$(basename "$0")] $*"; }

# The step a run directory's checkpoint is at (its manifest), or "" when it has none.
state_step() {
  [ -L "$1/current" ] || { echo ""; return; }
  sed -n 's/^  "next_step": \([0-9]*\),*$/\1/p' "$1/current/zo2_state.json"
}

# Whether two run directories hold byte-identical checkpoints (every safetensors file).
same_weights() {
  local a="$1/current" b="$2/current" f
  [ -d "$a" ] && [ -d "$b" ] || return 1
  local na nb
  na=$(cd "$a" && ls *.safetensors | sort | tr '\n' ' ')
  nb=$(cd "$b" && ls *.safetensors | sort | tr '\n' ' ')
  [ "$na" = "$nb" ] || return 1
  for f in $na; do cmp -s "$a/$f" "$b/$f" || return 1; done
}

# The directory loads (eval) and holds exactly what replaying its seed log to its step gives.
check_dir() {
  local d="$1" shard="$2" step
  step=$(state_step "$d")
  [ -n "$step" ] || return 1
  # DIR itself reads as an HF checkpoint: its links resolve to the current step's files.
  [ -f "$d/config.json" ] && [ -f "$d/zo2_state.json" ] || return 1
  for f in "$d"/current/*.safetensors*; do [ -f "$d/$(basename "$f")" ] || return 1; done
  "$T" -q eval --model "$d" --data data.safetensors >/dev/null || return 1
  rm -rf "$d.replay"
  "$T" -q replay --model base --seed-log "$d/seed_log.jsonl" --until-step "$step" --shard-size "$shard" \
    --out "$d.replay" || return 1
  same_weights "$d" "$d.replay" || return 1
  rm -rf "$d.replay"
}

# No leftovers of an interrupted save once a writer has run: no hidden step directories, no
# temporary files, one step directory.
clean_dir() {
  local d="$1"
  [ -z "$(find "$d" -maxdepth 1 -name '.*' ! -name '.' | head -1)" ] || return 1
  [ -z "$(find "$d" -maxdepth 1 -name '*.tmp*' | head -1)" ] || return 1
  [ "$(find "$d" -maxdepth 1 -type d -name 'step-*' | wc -l)" -eq 1 ] || return 1
}
