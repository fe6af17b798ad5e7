// The CPU check of Note [The CPU this build needs] (runtime/cpu_isa.h). CMakeLists.txt
// compiles this file for the baseline x86-64 (no AVX), and its constructor runs before every
// other static initializer of the program or library it is linked into, so it runs even
// where the rest of zo2 cannot. Plain C and system calls only: nothing else is set up yet.
#include "runtime/cpu_isa.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace zo2::detail {

extern const int kCpuIsaCheckAnchor = 1;

namespace {

constexpr const char* kNames[] = {"sse3",  "ssse3", "sse4.1", "sse4.2",  "popcnt",   "avx",      "avx2",
                                  "fma",   "f16c",  "bmi1",   "bmi2",    "lzcnt",    "movbe",    "avx512f",
                                  "avx512bw", "avx512dq", "avx512vl", "avx512cd"};
constexpr int kCount = sizeof(kNames) / sizeof(kNames[0]);

#if defined(__x86_64__) || defined(__i386__)
unsigned this_cpu() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const unsigned c1 = c;
  unsigned have = 0;
  auto set = [&have](int bit, bool on) { have |= on ? (1u << bit) : 0u; };
  set(0, c1 & (1u << 0));
  set(1, c1 & (1u << 9));
  set(2, c1 & (1u << 19));
  set(3, c1 & (1u << 20));
  set(4, c1 & (1u << 23));
  set(12, c1 & (1u << 22));
  // AVX needs the OS to save the YMM state (OSXSAVE, then XCR0 bits 1 and 2); AVX-512 the
  // opmask and ZMM states too (XCR0 bits 5-7).
  unsigned xcr0 = 0;
  if (c1 & (1u << 27)) {
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = lo;
  }
  const bool ymm = (xcr0 & 0x6u) == 0x6u;
  const bool zmm = ymm && (xcr0 & 0xe0u) == 0xe0u;
  set(5, ymm && (c1 & (1u << 28)));
  set(7, ymm && (c1 & (1u << 12)));
  set(8, ymm && (c1 & (1u << 29)));
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    set(6, ymm && (b & (1u << 5)));
    set(9, b & (1u << 3));
    set(10, b & (1u << 8));
    set(13, zmm && (b & (1u << 16)));
    set(14, zmm && (b & (1u << 30)));
    set(15, zmm && (b & (1u << 17)));
    set(16, zmm && (b & (1u << 31)));
    set(17, zmm && (b & (1u << 28)));
  }
  if (__get_cpuid(0x80000001u, &a, &b, &c, &d)) set(11, c & (1u << 5));
  return have;
}
#else
unsigned this_cpu() { return ~0u; }  // not x86: ZO2_CPU_ARCH names no x86 extension
#endif

void put(const char* s) {
  for (std::size_t n = std::strlen(s); n > 0;) {
    const ssize_t w = ::write(2, s, n);
    if (w <= 0) return;
    s += w;
    n -= static_cast<std::size_t>(w);
  }
}

// ZO2_CPU_ISA_PRETEND=avx2,fma: see a CPU without these (the test of this check).
unsigned pretend_missing() {
  const char* env = std::getenv("ZO2_CPU_ISA_PRETEND");
  if (env == nullptr) return 0;
  unsigned off = 0;
  for (int i = 0; i < kCount; ++i) {
    const std::size_t n = std::strlen(kNames[i]);
    for (const char* p = env; (p = std::strstr(p, kNames[i])) != nullptr; p += n)
      if ((p == env || p[-1] == ',') && (p[n] == '\0' || p[n] == ',')) off |= 1u << i;
  }
  return off;
}

[[gnu::constructor(101)]] void check_cpu_isa() {
  const unsigned missing = kCpuIsaRequired & ~(this_cpu() & ~pretend_missing());
  if (missing == 0) return;
  put("zo2: this build of zo2 uses instructions this CPU does not have (missing:");
  for (int i = 0; i < kCount; ++i)
    if (missing & (1u << i)) {
      put(" ");
      put(kNames[i]);
    }
  put("). It was compiled with -march=" ZO2_CPU_ARCH_NAME
      " (ZO2_CPU_ARCH); build zo2 for this CPU with cmake -DZO2_CPU_ARCH=native, or for any x86-64 with "
      "-DZO2_CPU_ARCH= (empty: the compiler's default).\n");
  ::_exit(1);
}

}  // namespace
}  // namespace zo2::detail
