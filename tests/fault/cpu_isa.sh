#!/usr/bin/env bash
# A CPU without the instruction-set extensions the build uses (pass 68; Note [The CPU this
# build needs] in runtime/cpu_isa.h). zo2 is compiled for ZO2_CPU_ARCH (x86-64-v3 by default)
# and the compiler uses AVX2 anywhere, static initializers included: every program holding
# zo2 (zo2-tune, a C host of libzo2, `import zo2`) died of SIGILL before main, with no word.
# Now each stops with exit 1 and a message naming what is missing and ZO2_CPU_ARCH.
# ZO2_CPU_ISA_PRETEND makes the check see a CPU without the named extensions; where
# qemu-x86_64 is installed (Debian qemu-user) the real thing runs too: an emulated Nehalem
# (SSE4.2, no AVX) executes the actual binary, so an instruction run before the check would
# be SIGILL there.
# Usage: cpu_isa.sh ZO2_TUNE WORK_DIR C_HOST [PYTHON_DIR]
set -uo pipefail
T="$1"
W="$2"
HOST="$3"
PYDIR="${4:-}"
rm -rf "$W" && mkdir -p "$W" && cd "$W" || exit 1
say() { echo "[cpu_isa.sh] $*"; }
failures=0
bad() { say "$*"; failures=$((failures + 1)); }

all="sse3,ssse3,sse4.1,sse4.2,popcnt,avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,movbe,avx512f,avx512bw,avx512dq,avx512vl,avx512cd"
if ZO2_CPU_ISA_PRETEND="$all" "$T" --version > /dev/null 2>&1; then
  say "this build uses no extension beyond x86-64 (ZO2_CPU_ARCH empty): nothing to check"
  exit 0
fi

# expect NAME EXPECTED_MISSING CMD...: exit 1 (not a signal), one message naming the missing
# extensions and the option, and nothing of the program itself ran.
expect() {
  local name="$1" missing="$2"
  shift 2
  "$@" > "$name.out" 2> "$name.err"
  local rc=$?
  [ "$rc" = 1 ] || bad "$name: exit $rc (expected 1): $(cat "$name.err")"
  grep -q "zo2: this build of zo2 uses instructions this CPU does not have (missing: $missing)" "$name.err" ||
    bad "$name: the message: $(cat "$name.err")"
  grep -q "ZO2_CPU_ARCH=native" "$name.err" || bad "$name: names no way out: $(cat "$name.err")"
  [ ! -s "$name.out" ] || bad "$name: the program ran: $(cat "$name.out")"
}
expect tune "avx2 fma" env ZO2_CPU_ISA_PRETEND=fma,avx2 "$T" --version
expect host "avx2" env ZO2_CPU_ISA_PRETEND=avx2 "$HOST" "$W/none"
if [ -n "$PYDIR" ] && [ -d "$PYDIR/zo2" ]; then
  expect python "avx2" env ZO2_CPU_ISA_PRETEND=avx2 PYTHONPATH="$PYDIR" python3 -c 'import zo2; print(zo2.__version__)'
fi
# Not pretending, the same programs run.
"$T" --version > /dev/null || bad "zo2-tune --version without a pretence: exit $?"

if ldd "$T" | grep -qE 'lib(asan|tsan|ubsan)'; then
  say "a sanitized build: its shadow memory does not map under qemu's user mode; the emulated CPUs were not run"
elif command -v qemu-x86_64 > /dev/null; then
  # An emulated CPU with SSE4.2 but no AVX: the whole binary runs on it, from its first
  # instruction. (qemu's user mode emulates x86-64 up to AVX2 on any host.)
  expect qemu-nehalem "avx avx2 fma f16c bmi1 bmi2 lzcnt movbe" qemu-x86_64 -cpu Nehalem "$T" --version
  # and one that has every extension x86-64-v3 asks for runs it.
  qemu-x86_64 -cpu Haswell "$T" --version > qemu-haswell.out 2>&1 || bad "an emulated Haswell: exit $?: $(cat qemu-haswell.out)"
else
  say "qemu-x86_64 not installed (Debian qemu-user): the emulated CPUs were not run"
fi
[ "$failures" = 0 ] && say "ok" || { say "$failures failure(s)"; exit 1; }
