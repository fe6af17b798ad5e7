// Counter-based random numbers shared bit for bit by the CPU and the GPU (DESIGN.md §5).
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) maps
// a 128-bit counter and a 64-bit key to 128 random bits. On the GPU the rounds come from
// cuRAND's curand_Philox4x32_10; on the host from the copy below; both follow Random123.
//
// Note [Noise stream layout]
//   key     = the step seed (k0 = low 32 bits, k1 = high 32 bits)
//   counter = (q low, q high | domain << 24, tensor key low, tensor key high)
//   where q = element index / 4: one Philox call yields the four values of elements
//   4q .. 4q+3. The domain separates independent streams over the same (seed, tensor):
//   perturbation normals, stochastic-rounding bits, step-seed derivation.
//   So a normal depends only on (seed, tensor key, element index, domain) — never on
//   placement, tiling, or which device computes it.
//
// Note [Deterministic normals]
//   Box–Muller needs log, sqrt, sin and cos. Library versions differ between glibc and
//   CUDA (and between CUDA versions), so the transform below uses its own polynomials,
//   written with explicit fused multiply-adds and round-to-nearest products that nvcc cannot
//   contract differently from the host compiler. With IEEE sqrt on both sides, the CPU and
//   the GPU produce identical normals, not merely close ones.
#pragma once
#include "runtime/common.h"

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <curand_philox4x32_x.h>
#endif

namespace zo2 {

struct Philox4 {
  std::uint32_t x, y, z, w;
};

enum class NoiseDomain : std::uint32_t {
  normal = 0,       // perturbation z ~ N(0, 1)
  rounding = 1,     // stochastic rounding of updated weights
  step_seed = 2,    // deriving step seeds from the run seed
  state_m = 3,      // stochastic rounding of a rule's first state buffer (momentum, Adam m)
  state_v = 4,      // ... and of its second (Adam v)
  sampling = 5,     // generation: the draw of each sampled token (api/generate.h)
};

namespace detail {

ZO2_HD std::uint32_t mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t* hi) {
  const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  *hi = static_cast<std::uint32_t>(p >> 32);
  return static_cast<std::uint32_t>(p);
}

ZO2_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
ZO2_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
ZO2_HD float ffma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
ZO2_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
ZO2_HD float fsqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
ZO2_HD float bits_to_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}
ZO2_HD std::uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(std::uint32_t, f);
#endif
}

}  // namespace detail

// The Random123 Philox4x32-10 bijection.
ZO2_HD Philox4 philox4x32_10(Philox4 c, std::uint32_t k0, std::uint32_t k1) {
#if defined(__CUDA_ARCH__)
  uint4 r = curand_Philox4x32_10(make_uint4(c.x, c.y, c.z, c.w), make_uint2(k0, k1));
  return {r.x, r.y, r.z, r.w};
#else
  constexpr std::uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr std::uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0, hi1;
    const std::uint32_t lo0 = detail::mulhilo32(kM0, c.x, &hi0);
    const std::uint32_t lo1 = detail::mulhilo32(kM1, c.z, &hi1);
    c = {hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
#endif
}

ZO2_HD Philox4 noise_bits(std::uint64_t seed, std::uint64_t tensor_key, std::uint64_t q,
                          NoiseDomain domain) {
  const Philox4 c{static_cast<std::uint32_t>(q),
                  static_cast<std::uint32_t>(q >> 32) |
                      (static_cast<std::uint32_t>(domain) << 24),
                  static_cast<std::uint32_t>(tensor_key),
                  static_cast<std::uint32_t>(tensor_key >> 32)};
  return philox4x32_10(c, static_cast<std::uint32_t>(seed),
                       static_cast<std::uint32_t>(seed >> 32));
}

// ln(u) for u in [2^-24, 1]: u = m·2^e with m in [sqrt(1/2), sqrt(2)), then a degree-9
// minimax polynomial in (m − 1) (the Cephes single-precision coefficients). ≤ 2 ulp.
ZO2_HD float noise_log(float u) {
  using namespace detail;
  std::uint32_t bits = float_to_bits(u);
  int e = static_cast<int>((bits >> 23) & 0xFFu) - 126;  // u = m·2^e, m in [0.5, 1)
  float m = bits_to_float((bits & 0x007FFFFFu) | 0x3F000000u);
  // Move m into [sqrt(1/2), sqrt(2)): m < sqrt(1/2) → 2m, e − 1.
  const bool low = m < 0.70710678118654752f;
  e -= low ? 1 : 0;
  const float x = fadd(low ? fadd(m, m) : m, -1.0f);
  const float z = fmul(x, x);
  float y = 7.0376836292e-2f;
  y = ffma(y, x, -1.1514610310e-1f);
  y = ffma(y, x, 1.1676998740e-1f);
  y = ffma(y, x, -1.2420140846e-1f);
  y = ffma(y, x, 1.4249322787e-1f);
  y = ffma(y, x, -1.6668057665e-1f);
  y = ffma(y, x, 2.0000714765e-1f);
  y = ffma(y, x, -2.4999993993e-1f);
  y = ffma(y, x, 3.3333331174e-1f);
  y = fmul(fmul(y, x), z);
  const float fe = static_cast<float>(e);
  y = ffma(fe, -2.12194440e-4f, y);
  y = ffma(z, -0.5f, y);
  return ffma(fe, 0.693359375f, fadd(x, y));
}

// sin and cos of 2π·t for t = m·2^-24, m in [0, 2^24): exact reduction to a quadrant and an
// angle in [−π/4, π/4], then the Cephes minimax polynomials.
ZO2_HD void noise_sincos_turns(std::uint32_t m, float* s, float* c) {
  using namespace detail;
  const std::uint32_t quadrant = (m + (1u << 21)) >> 22;  // round(4t), 0..4
  const int rem = static_cast<int>(m) - static_cast<int>(quadrant << 22);  // |rem| ≤ 2^21
  const float x = fmul(static_cast<float>(rem), 3.7450702e-07f);  // 2π / 2^24
  const float z = fmul(x, x);
  float ps = -1.9515295891e-4f;
  ps = ffma(ps, z, 8.3321608736e-3f);
  ps = ffma(ps, z, -1.6666654611e-1f);
  const float sn = ffma(fmul(ps, z), x, x);
  float pc = 2.443315711809948e-5f;
  pc = ffma(pc, z, -1.388731625493765e-3f);
  pc = ffma(pc, z, 4.166664568298827e-2f);
  const float cs = ffma(fmul(pc, z), z, ffma(z, -0.5f, 1.0f));
  // Rotate by the quadrant without branches (so CPU loops vectorize): odd quadrants swap
  // sin and cos; the signs follow from bits of the quadrant. Sign flips are exact.
  const bool odd = (quadrant & 1u) != 0;
  const std::uint32_t s_sign = (quadrant & 2u) << 30;          // quadrants 2, 3: −
  const std::uint32_t c_sign = ((quadrant + 1u) & 2u) << 30;   // quadrants 1, 2: −
  *s = bits_to_float(float_to_bits(odd ? cs : sn) ^ s_sign);
  *c = bits_to_float(float_to_bits(odd ? sn : cs) ^ c_sign);
}

// Box–Muller on two uint32: u1 in (0, 1] (24 bits), angle 2π·u2.
ZO2_HD void box_muller(std::uint32_t a, std::uint32_t b, float* z0, float* z1) {
  using namespace detail;
  const float u1 = fmul(static_cast<float>((a >> 8) + 1u), 5.9604644775390625e-8f);  // 2^-24
  const float r = fsqrt(fmul(-2.0f, noise_log(u1)));
  float s, c;
  noise_sincos_turns(b >> 8, &s, &c);
  *z0 = fmul(r, c);
  *z1 = fmul(r, s);
}

// The four standard normals of group q (elements 4q..4q+3) of tensor `tensor_key` at `seed`.
struct Normal4 {
  float v[4];
};
ZO2_HD Normal4 noise_normal4(std::uint64_t seed, std::uint64_t tensor_key, std::uint64_t q) {
  const Philox4 r = noise_bits(seed, tensor_key, q, NoiseDomain::normal);
  Normal4 out;
  box_muller(r.x, r.y, &out.v[0], &out.v[1]);
  box_muller(r.z, r.w, &out.v[2], &out.v[3]);
  return out;
}

// One normal (slow path; kernels use noise_normal4 over whole groups).
ZO2_HD float noise_normal(std::uint64_t seed, std::uint64_t tensor_key, std::uint64_t index) {
  return noise_normal4(seed, tensor_key, index / 4).v[index % 4];
}

// Random bits for stochastic rounding of element `index`.
ZO2_HD std::uint32_t rounding_bits(std::uint64_t seed, std::uint64_t tensor_key,
                                   std::uint64_t index) {
  const Philox4 r = noise_bits(seed, tensor_key, index / 4, NoiseDomain::rounding);
  switch (index % 4) {
    case 0: return r.x;
    case 1: return r.y;
    case 2: return r.z;
    default: return r.w;
  }
}

// Step seeds derive from the run seed and the step index, so a resumed run needs no RNG
// state (DESIGN.md §5).
ZO2_HD std::uint64_t derive_step_seed(std::uint64_t run_seed, std::uint64_t step) {
  const Philox4 r = noise_bits(run_seed, 0, step, NoiseDomain::step_seed);
  return (static_cast<std::uint64_t>(r.y) << 32) | r.x;
}

}  // namespace zo2
