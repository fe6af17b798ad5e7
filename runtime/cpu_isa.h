// Note [The CPU this build needs]
//   zo2's CPU code is compiled for ZO2_CPU_ARCH (CMakeLists.txt; x86-64-v3 by default: AVX2,
//   FMA, F16C, BMI1/2, LZCNT, MOVBE), and the compiler uses those instructions anywhere,
//   static initializers included, so on a CPU without them any program holding zo2 died with
//   SIGILL before main (or at `import zo2`), with no word. cpu_isa_required.cpp, compiled
//   with those flags, records as data (no code) which extensions the compiler was told it
//   may use; cpu_isa_check.cpp, compiled for the baseline x86-64, reads this CPU's (cpuid,
//   and xgetbv for the register state the OS saves) in a constructor that runs before every
//   other static initializer, and if one is missing writes what is missing and how to build
//   for this CPU (-DZO2_CPU_ARCH=), then ends the process with status 1: nothing of zo2 can
//   run there, and the alternative is the signal. Checked are the extensions of x86-64-v2,
//   -v3 and -v4 (cpu_isa_check.cpp's table); a `native` build on a newer CPU may use more
//   (AVX-512 VNNI/BF16/FP16, GFNI, VAES...), which are not. ZO2_CPU_ISA_PRETEND=ext,ext...
//   (tests) makes the check see a CPU without those extensions.
#pragma once

namespace zo2::detail {

// Bit i set: extension kCpuIsaNames[i] is used by this build's code.
extern const unsigned kCpuIsaRequired;
// Referenced by runtime/error.cpp, so that the check is linked into every program that
// holds zo2 (a static archive member nothing refers to would be left out).
extern const int kCpuIsaCheckAnchor;

}  // namespace zo2::detail
