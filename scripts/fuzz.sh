#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang, ASan+UBSan) into build-fuzz/ and runs each for
# a bounded time, two at a time: scripts/fuzz.sh [SECONDS [TARGET...]] (default 60 s, every
# target). Each starts from its seed corpus (fuzz/corpus/<target>/, never written to) plus
# what earlier runs found (build-fuzz/fuzz-corpus/<target>/). Any crash, sanitizer report,
# leak, timeout or out-of-memory fails the script; the input that did it is written to
# build-fuzz/fuzz-artifacts/ and the end of the target's log is printed (fuzz/README.md
# says how it becomes a corpus file). Environment: ZO2_FUZZ_BUILD_DIR, ZO2_FUZZ_JOBS
# (targets at once, default 2), ZO2_FUZZ_ARGS (more libFuzzer flags), ZO2_FUZZ_NO_BUILD=1,
# ZO2_SKIP_APT=1 (installs clang and libclang-rt-14-dev otherwise, when missing).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="${ZO2_FUZZ_BUILD_DIR:-$root/build-fuzz}"
seconds="${1:-60}"
shift || true
jobs="${ZO2_FUZZ_JOBS:-2}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors safetensors_index config tokenizer_gpt2 tokenizer_json sentencepiece tokenizer_dir
           dataset seed_log state)
fi

if [ "${ZO2_FUZZ_NO_BUILD:-0}" != 1 ]; then
  # Debian's clang and its libFuzzer runtime (the other packages come from scripts/setup.sh).
  if [ "${ZO2_SKIP_APT:-0}" != 1 ]; then
    missing=()
    for p in clang libclang-rt-14-dev; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
      sudo=""
      [ "$(id -u)" -ne 0 ] && sudo="sudo"
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
  fi
  if [ ! -f "$build/CMakeCache.txt" ]; then
    # -O1 with line tables, as the ASan stage of .ci/run; asserts stay on.
    CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g1" \
      -DZO2_FUZZ=ON -DZO2_CUDA=OFF -DZO2_BUILD_BENCH=OFF -DZO2_BUILD_TESTS=OFF
  fi
  cmake --build "$build" -j "$(nproc)" --target fuzz
fi

mkdir -p "$build/fuzz-corpus" "$build/fuzz-artifacts" "$build/fuzz-logs" "$build/fuzz-dict"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"

run_one() {  # target -> exit status of the fuzzer; its output goes to fuzz-logs/<target>.log
  local t=$1 dict="$build/fuzz-dict/$1.dict" args=()
  mkdir -p "$build/fuzz-corpus/$t"
  cat "$root/fuzz/dict/json.dict" > "$dict"
  [ -f "$root/fuzz/dict/$t.dict" ] && cat "$root/fuzz/dict/$t.dict" >> "$dict"
  [ "$t" = sentencepiece ] || args+=(-dict="$dict")
  # shellcheck disable=SC2086
  "$build/fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$build/fuzz-artifacts/$t-" "${args[@]}" ${ZO2_FUZZ_ARGS:-} \
    "$build/fuzz-corpus/$t" "$root/fuzz/corpus/$t" > "$build/fuzz-logs/$t.log" 2>&1
}

failed=()
declare -A pid_of=()
report() {  # target status
  local t=$1 rc=$2 log="$build/fuzz-logs/$1.log"
  local execs
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  if [ "$rc" -eq 0 ]; then
    echo "fuzz $t: ok, $execs inputs in ${seconds} s, corpus $(find "$build/fuzz-corpus/$t" -type f | wc -l) + $(find "$root/fuzz/corpus/$t" -type f | wc -l) seeds"
  else
    echo "fuzz $t: FAILED (exit $rc) — the end of $log:"
    tail -n 80 "$log"
    echo "fuzz $t: reproduce with $build/fuzz/fuzz_$t <the artifact above>; see fuzz/README.md"
    failed+=("$t")
  fi
}

running=0
for t in "${targets[@]}"; do
  if [ ! -x "$build/fuzz/fuzz_$t" ]; then
    echo "fuzz $t: no such target in $build/fuzz" >&2
    failed+=("$t")
    continue
  fi
  run_one "$t" &
  pid_of[$!]=$t
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    rc=0
    wait -n -p done_pid "${!pid_of[@]}" || rc=$?
    report "${pid_of[$done_pid]}" "$rc"
    unset "pid_of[$done_pid]"
    running=$((running - 1))
  fi
done
while [ "$running" -gt 0 ]; do
  rc=0
  wait -n -p done_pid "${!pid_of[@]}" || rc=$?
  report "${pid_of[$done_pid]}" "$rc"
  unset "pid_of[$done_pid]"
  running=$((running - 1))
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, no crash"
