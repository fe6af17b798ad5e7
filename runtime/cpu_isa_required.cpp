// Which instruction-set extensions the compiler may use in this build (Note [The CPU this
// build needs], runtime/cpu_isa.h): compiled with zo2's CPU flags like all of zo2, and only
// data, so it runs nothing. The bit order is cpu_isa_check.cpp's table.
#include "runtime/cpu_isa.h"

namespace zo2::detail {

extern const unsigned kCpuIsaRequired = 0u
#ifdef __SSE3__
    | (1u << 0)
#endif
#ifdef __SSSE3__
    | (1u << 1)
#endif
#ifdef __SSE4_1__
    | (1u << 2)
#endif
#ifdef __SSE4_2__
    | (1u << 3)
#endif
#ifdef __POPCNT__
    | (1u << 4)
#endif
#ifdef __AVX__
    | (1u << 5)
#endif
#ifdef __AVX2__
    | (1u << 6)
#endif
#ifdef __FMA__
    | (1u << 7)
#endif
#ifdef __F16C__
    | (1u << 8)
#endif
#ifdef __BMI__
    | (1u << 9)
#endif
#ifdef __BMI2__
    | (1u << 10)
#endif
#ifdef __LZCNT__
    | (1u << 11)
#endif
#ifdef __MOVBE__
    | (1u << 12)
#endif
#ifdef __AVX512F__
    | (1u << 13)
#endif
#ifdef __AVX512BW__
    | (1u << 14)
#endif
#ifdef __AVX512DQ__
    | (1u << 15)
#endif
#ifdef __AVX512VL__
    | (1u << 16)
#endif
#ifdef __AVX512CD__
    | (1u << 17)
#endif
    ;

}  // namespace zo2::detail
