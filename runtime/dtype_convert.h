// Scalar conversions between fp32 and the narrow float formats zo2 stores weights in
// (DESIGN.md §5): bf16, IEEE fp16 and OCP fp8-e4m3 ("e4m3fn"). Header-only, usable from
// host C++ and from CUDA device code (ZO2_HD), no lookup tables.
//
// Every function is written with integer/bit arithmetic only (no float arithmetic at
// all), so the results do not depend on FMA contraction, flush-to-zero (-ftz, fast math)
// or the rounding mode: the CPU and the GPU give the same bits for the same inputs.
//
// Round-to-nearest-even (RNE):
//   f32_to_bf16   IEEE-style: NaN -> quiet NaN (sign kept), overflow -> +-inf.
//   f32_to_f16    IEEE binary16: |x| >= 65520 -> +-inf, NaN -> quiet NaN (sign kept),
//                 subnormal results exact.
//   f32_to_e4m3   OCP e4m3fn (bias 7, 3 mantissa bits, no infinities, max 448 = 0x7E,
//                 NaN = 0x7F/0xFF, subnormals m*2^-9). SATURATING, like CUDA's
//                 __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3): finite values
//                 beyond 448 and +-inf become +-448; NaN becomes 0x7F with the sign kept
//                 (0x7F or 0xFF; CUDA's conversion gives 0x7F for every NaN, and both are
//                 NaN). Weights never need an infinity, and a saturated weight is far less
//                 harmful than a NaN.
//
// Stochastic rounding (SR), one uniformly random uint32 r per element: for lo < x < hi
// (adjacent representable values) the result is hi iff r < floor(frac * 2^32), where
// frac = (x - lo) / (hi - lo), i.e. hi with probability frac, else lo. This is exact for
// every bf16 result and every normal fp16/e4m3 result (frac has at most 16/13/20 bits);
// in the fp16/e4m3 subnormal range it is exact for |x| >= 2^-9 of the smallest subnormal,
// and tinier inputs keep the top 32 bits of frac (a bias below 2^-32 of an ulp).
// Representable x (frac = 0) come back unchanged for every r. NaN and inf behave as with
// RNE. A finite bf16/fp16 x beyond the largest finite value rounds to it or to +-inf
// (inf standing for the next power of two, as in IEEE overflow), |x| >= 2^16 gives fp16
// +-inf; e4m3 saturates: |x| >= 448 and +-inf give +-448.
#pragma once
#include <cstdint>

#include "runtime/common.h"

#if !defined(__CUDA_ARCH__)
#include <bit>
#endif
#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace zo2 {

inline constexpr float kE4M3Max = 448.0f;

ZO2_HD std::uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return std::bit_cast<std::uint32_t>(x);
#endif
}

ZO2_HD float f32_from_bits(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return std::bit_cast<float>(u);
#endif
}

namespace detail {

// Number of bits needed to represent v (0 for v == 0).
ZO2_HD int bit_width32(std::uint32_t v) {
#if defined(__CUDA_ARCH__)
  return 32 - __clz(static_cast<int>(v));
#else
  return std::bit_width(v);
#endif
}

// |x| (a = the bits of a finite non-negative fp32) in units of 2^-k (the smallest
// subnormal of a narrow format), split into the integer part and a 32-bit fixed-point
// fraction. value = mant * 2^(e-150) with the implicit bit (e >= 1), or mant * 2^-149
// (e == 0), so the value has s = 150 - k - e (or 149 - k) fraction bits in these units;
// fractions finer than 2^-32 are truncated.
struct FixedSplit {
  std::uint32_t integer;
  std::uint32_t fraction;  // floor(frac * 2^32)
};

ZO2_HD FixedSplit split_fixed(std::uint32_t a, int k) {
  const int e = static_cast<int>(a >> 23);
  const std::uint32_t mant = (a & 0x7fffffu) | (e != 0 ? 0x800000u : 0u);
  const int s = (e != 0 ? 150 : 149) - k - e;  // >= 1 for every caller's subnormal range
  const std::uint64_t v = s < 64 ? (static_cast<std::uint64_t>(mant) << 32) >> s : 0u;
  return {static_cast<std::uint32_t>(v >> 32), static_cast<std::uint32_t>(v)};
}

// Shifts mant right by s (1 <= s <= 31) rounding to nearest, ties to even.
ZO2_HD std::uint32_t shift_rne(std::uint32_t mant, int s) {
  const std::uint32_t half_minus_1 = (1u << (s - 1)) - 1u;
  return (mant + half_minus_1 + ((mant >> s) & 1u)) >> s;
}

}  // namespace detail

// ---------------------------------------------------------------------------- bf16

ZO2_HD float bf16_to_f32(std::uint16_t h) {
  return f32_from_bits(static_cast<std::uint32_t>(h) << 16);
}

ZO2_HD std::uint16_t f32_to_bf16(float x) {
  std::uint32_t u = f32_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u)  // NaN: keep sign and top payload, force quiet
    return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  // bf16 shares fp32's exponent, so one RNE shift handles subnormals, and the carry
  // out of the largest finite value produces the inf pattern 0x7F80.
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

ZO2_HD std::uint16_t f32_to_bf16_sr(float x, std::uint32_t r) {
  const std::uint32_t u = f32_bits(x);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  if (a == 0x7f800000u) return static_cast<std::uint16_t>(u >> 16);
  // Between two adjacent bf16 values (consecutive patterns, subnormals included) the
  // fp32 pattern is linear in the value, so the discarded 16 bits are exactly frac * 2^16.
  const std::uint32_t frac = (u & 0xffffu) << 16;
  return static_cast<std::uint16_t>((u >> 16) + (r < frac ? 1u : 0u));
}

// ---------------------------------------------------------------------------- fp16
//
// Note [Hardware fp16 conversions on the GPU]
//   The code below is the specification, and what the CPU runs. On the GPU it costs ~10
//   integer operations per element with branches, which makes fp16 element-wise kernels
//   (bias, residual, ReLU, norms, W± in fp16) integer-bound: on an H200 bf16 compute ran
//   OPT-6.7B at 12.9k tok/s and fp16 at 10.8k. So device code converts every non-NaN
//   value with the hardware instruction (cvt.rn.f16.f32 / cvt.f32.f16): IEEE
//   round-to-nearest-even with overflow to ±inf, subnormals kept (no -ftz), exact
//   widening — the same bits as the code below for every non-NaN input. NaN keeps the
//   code below, which keeps the payload where the hardware would give a canonical NaN.
//   CudaTest.Fp16ConversionsEqualTheCpuOnEveryPatternAndEdge checks it on the GPU.

ZO2_HD float f16_to_f32(std::uint16_t h) {
#if defined(__CUDA_ARCH__)
  if ((h & 0x7fffu) <= 0x7c00u) return __half2float(__ushort_as_half(h));
#endif
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1fu;
  const std::uint32_t m = h & 0x3ffu;
  std::uint32_t bits;
  if (e == 0x1fu) {
    bits = sign | 0x7f800000u | (m << 13);  // inf, NaN (payload kept)
  } else if (e != 0) {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  } else if (m == 0) {
    bits = sign;
  } else {  // subnormal m * 2^-24 = 2^(p-24) * (1.f), p = position of the leading bit
    const int p = detail::bit_width32(m) - 1;
    bits = sign | (static_cast<std::uint32_t>(p + 103) << 23) | ((m << (23 - p)) & 0x7fffffu);
  }
  return f32_from_bits(bits);
}

ZO2_HD std::uint16_t f32_to_f16(float x) {
#if defined(__CUDA_ARCH__)
  if ((__float_as_uint(x) & 0x7fffffffu) <= 0x7f800000u) return __half_as_ushort(__float2half_rn(x));
#endif
  const std::uint32_t u = f32_bits(x);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u)  // NaN -> quiet NaN, sign and top payload bits kept
    return static_cast<std::uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520, inf
  if (a >= 0x38800000u) {  // >= 2^-14: normal; rebias the exponent (127 -> 15), RNE
    const std::uint32_t b = a - 0x38000000u;
    return static_cast<std::uint16_t>(sign | ((b + 0xfffu + ((b >> 13) & 1u)) >> 13));
  }
  if (a < 0x33000000u) return sign;  // < 2^-25, below half the smallest subnormal
  // Subnormal result m * 2^-24: mant * 2^(e-150) / 2^-24 = mant >> (126 - e), 14..24.
  const int e = static_cast<int>(a >> 23);
  const std::uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  return static_cast<std::uint16_t>(sign | detail::shift_rne(mant, 126 - e));
}

ZO2_HD std::uint16_t f32_to_f16_sr(float x, std::uint32_t r) {
  const std::uint32_t u = f32_bits(x);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x47800000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 2^16, inf
  if (a >= 0x38800000u) {  // normal: the 13 discarded bits are frac * 2^13
    const std::uint32_t b = a - 0x38000000u;
    const std::uint32_t frac = (b & 0x1fffu) << 19;
    // 65504 < x < 65536 carries into 0x7C00 = inf with probability frac.
    return static_cast<std::uint16_t>(sign | ((b >> 13) + (r < frac ? 1u : 0u)));
  }
  const detail::FixedSplit v = detail::split_fixed(a, 24);  // units of 2^-24
  return static_cast<std::uint16_t>(sign | (v.integer + (r < v.fraction ? 1u : 0u)));
}

// ------------------------------------------------------------------------ fp8 e5m2

// OCP fp8 e5m2 (bias 15, 2 mantissa bits, IEEE-like: 0x7C is inf, 0x7D..0x7F NaN) is the
// top byte of an IEEE fp16, so widening it is exact. Read-only: zo2 accepts e5m2 in a
// checkpoint (converted to the storage dtype at load) but never stores or writes it.
ZO2_HD float e5m2_to_f32(std::uint8_t v) { return f16_to_f32(static_cast<std::uint16_t>(v << 8)); }

// ------------------------------------------------------------------------ fp8 e4m3

ZO2_HD float e4m3_to_f32(std::uint8_t v) {
  const std::uint32_t sign = static_cast<std::uint32_t>(v & 0x80u) << 24;
  const std::uint32_t e = (v >> 3) & 0xfu;
  const std::uint32_t m = v & 0x7u;
  std::uint32_t bits;
  if ((v & 0x7fu) == 0x7fu) {
    bits = sign | 0x7fc00000u;  // the only NaN encodings
  } else if (e != 0) {
    bits = sign | ((e + 120u) << 23) | (m << 20);
  } else if (m == 0) {
    bits = sign;
  } else {  // subnormal m * 2^-9 = 2^(p-9) * (1.f)
    const int p = detail::bit_width32(m) - 1;
    bits = sign | (static_cast<std::uint32_t>(p + 118) << 23) | ((m << (23 - p)) & 0x7fffffu);
  }
  return f32_from_bits(bits);
}

// Saturating (finite values beyond 448 and +-inf -> +-448), see the comment at the top.
ZO2_HD std::uint8_t f32_to_e4m3(float x) {
  const std::uint32_t u = f32_bits(x);
  const std::uint8_t sign = static_cast<std::uint8_t>((u >> 24) & 0x80u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint8_t>(sign | 0x7fu);   // NaN
  if (a >= 0x43e00000u) return static_cast<std::uint8_t>(sign | 0x7eu);  // >= 448, inf: 448
  if (a >= 0x3c800000u) {  // >= 2^-6: normal; rebias (127 -> 7), RNE; < 448 stays <= 0x7E
    const std::uint32_t b = a - 0x3c000000u;
    return static_cast<std::uint8_t>(sign | ((b + 0x7ffffu + ((b >> 20) & 1u)) >> 20));
  }
  if (a < 0x3a800000u) return sign;  // < 2^-10 (below half the smallest subnormal)
  // Subnormal result m * 2^-9: mant * 2^(e-150) / 2^-9 = mant >> (141 - e), 21..24.
  const int e = static_cast<int>(a >> 23);
  const std::uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  return static_cast<std::uint8_t>(sign | detail::shift_rne(mant, 141 - e));
}

ZO2_HD std::uint8_t f32_to_e4m3_sr(float x, std::uint32_t r) {
  const std::uint32_t u = f32_bits(x);
  const std::uint8_t sign = static_cast<std::uint8_t>((u >> 24) & 0x80u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint8_t>(sign | 0x7fu);
  if (a >= 0x43e00000u) return static_cast<std::uint8_t>(sign | 0x7eu);
  if (a >= 0x3c800000u) {  // normal: the 20 discarded bits are frac * 2^20; 416 < x < 448
    const std::uint32_t b = a - 0x3c000000u;  // rounds to 0x7D or 0x7E, never to NaN
    const std::uint32_t frac = (b & 0xfffffu) << 12;
    return static_cast<std::uint8_t>(sign | ((b >> 20) + (r < frac ? 1u : 0u)));
  }
  const detail::FixedSplit v = detail::split_fixed(a, 9);  // units of 2^-9
  return static_cast<std::uint8_t>(sign | (v.integer + (r < v.fraction ? 1u : 0u)));
}

}  // namespace zo2
