// The AVX-512 twin of noise_simd.cpp's AVX2 loops: sixteen Philox groups per iteration.
// Compiled for any x86-64 target with GCC/Clang function attributes and chosen at run time
// (noise_simd.cpp, Note [Noise ISA]), so one binary runs on CPUs with and without AVX-512.
// Every operation is the same exact IEEE operation, in the same order, as noise_normal4
// (runtime/philox.h) and the AVX2 path — only the lane count and the blends (mask
// registers instead of blendv) differ — so the results are bit-identical; tests/
// noise_simd_test.cpp checks that against the scalar code.
#include "runtime/cpu/noise_simd.h"

#if ZO2_NOISE_AVX512
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip
// -Wmaybe-uninitialized when inlined into target("avx512f") functions (a known false
// positive of those headers); nothing here reads an undefined value.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define ZO2_AVX512 __attribute__((target("avx512f")))

namespace zo2::cpu {
namespace {

ZO2_AVX512 inline __m512i splat(std::uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
ZO2_AVX512 inline __m512 splat(float v) { return _mm512_set1_ps(v); }

// High 32 bits of the 32×32 products a·m, lane-wise.
ZO2_AVX512 inline __m512i mulhi_epu32(__m512i a, __m512i m) {
  const __m512i even = _mm512_mul_epu32(a, m);                        // lanes 0, 2, … → 64 bit
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1, 3, …
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// Philox4x32-10 on sixteen consecutive groups q .. q+15 (lane j = group q + j).
ZO2_AVX512 inline void philox16(std::uint64_t seed, std::uint64_t key, std::uint64_t q, NoiseDomain domain,
                                __m512i* r) {
  const __m512i base = splat(static_cast<std::uint32_t>(q));
  const __m512i lo = _mm512_add_epi32(base, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  // q + j carries into the high word where the low word wrapped (unsigned lo < base).
  const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, base);
  const __m512i high = splat(static_cast<std::uint32_t>(q >> 32) | (static_cast<std::uint32_t>(domain) << 24));
  __m512i c0 = lo;
  __m512i c1 = _mm512_mask_add_epi32(high, carry, high, splat(1u));
  __m512i c2 = splat(static_cast<std::uint32_t>(key));
  __m512i c3 = splat(static_cast<std::uint32_t>(key >> 32));
  const __m512i m0 = splat(0xD2511F53u), m1 = splat(0xCD9E8D57u);
  std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m512i hi0 = mulhi_epu32(c0, m0), lo0 = _mm512_mullo_epi32(c0, m0);
    const __m512i hi1 = mulhi_epu32(c2, m1), lo1 = _mm512_mullo_epi32(c2, m1);
    // 0x96: a ^ b ^ c in one instruction.
    const __m512i n0 = _mm512_ternarylogic_epi32(hi1, c1, splat(k0), 0x96);
    const __m512i n2 = _mm512_ternarylogic_epi32(hi0, c3, splat(k1), 0x96);
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  r[0] = c0;
  r[1] = c1;
  r[2] = c2;
  r[3] = c3;
}

// noise_log, lane-wise (the same polynomial and steps as simd::log8).
ZO2_AVX512 inline __m512 log16(__m512 u) {
  const __m512i bits = _mm512_castps_si512(u);
  __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 23), splat(0xFFu)), splat(126u));
  const __m512 m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, splat(0x007FFFFFu)), splat(0x3F000000u)));
  const __mmask16 low = _mm512_cmp_ps_mask(m, splat(noise_poly::kSqrtHalf), _CMP_LT_OQ);
  e = _mm512_mask_sub_epi32(e, low, e, splat(1u));
  const __m512 x = _mm512_add_ps(_mm512_mask_blend_ps(low, m, _mm512_add_ps(m, m)), splat(-1.0f));
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = splat(noise_poly::kLog[0]);
  for (int i = 1; i < 9; ++i) y = _mm512_fmadd_ps(y, x, splat(noise_poly::kLog[i]));
  y = _mm512_mul_ps(_mm512_mul_ps(y, x), z);
  const __m512 fe = _mm512_cvtepi32_ps(e);
  y = _mm512_fmadd_ps(fe, splat(noise_poly::kLn2Lo), y);
  y = _mm512_fmadd_ps(z, splat(-0.5f), y);
  return _mm512_fmadd_ps(fe, splat(noise_poly::kLn2Hi), _mm512_add_ps(x, y));
}

// noise_sincos_turns, lane-wise (m < 2^24).
ZO2_AVX512 inline void sincos16(__m512i m, __m512* s, __m512* c) {
  const __m512i quadrant = _mm512_srli_epi32(_mm512_add_epi32(m, splat(1u << 21)), 22);
  const __m512i rem = _mm512_sub_epi32(m, _mm512_slli_epi32(quadrant, 22));
  const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(rem), splat(noise_poly::kTurnToRadian));
  const __m512 z = _mm512_mul_ps(x, x);
  const __m512 ps = _mm512_fmadd_ps(_mm512_fmadd_ps(splat(noise_poly::kSin[0]), z, splat(noise_poly::kSin[1])), z,
                                    splat(noise_poly::kSin[2]));
  const __m512 sn = _mm512_fmadd_ps(_mm512_mul_ps(ps, z), x, x);
  const __m512 pc = _mm512_fmadd_ps(_mm512_fmadd_ps(splat(noise_poly::kCos[0]), z, splat(noise_poly::kCos[1])), z,
                                    splat(noise_poly::kCos[2]));
  const __m512 cs = _mm512_fmadd_ps(_mm512_mul_ps(pc, z), z, _mm512_fmadd_ps(z, splat(-0.5f), splat(1.0f)));
  const __mmask16 odd = _mm512_test_epi32_mask(quadrant, splat(1u));
  const __m512i s_sign = _mm512_slli_epi32(_mm512_and_si512(quadrant, splat(2u)), 30);
  const __m512i c_sign = _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(quadrant, splat(1u)), splat(2u)), 30);
  *s = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mask_blend_ps(odd, sn, cs)), s_sign));
  *c = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mask_blend_ps(odd, cs, sn)), c_sign));
}

ZO2_AVX512 inline void box_muller16(__m512i a, __m512i b, __m512* z0, __m512* z1) {
  const __m512 u1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_srli_epi32(a, 8), splat(1u))),
                                  splat(noise_poly::kU24));
  const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(splat(-2.0f), log16(u1)));
  __m512 s, c;
  sincos16(_mm512_srli_epi32(b, 8), &s, &c);
  *z0 = _mm512_mul_ps(r, c);
  *z1 = _mm512_mul_ps(r, s);
}

// Stores four 16-lane vectors (words a, b, c, d of groups 0..15) group-major: out[4j + i].
ZO2_AVX512 inline void store_interleaved(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
  const __m512 ab_lo = _mm512_unpacklo_ps(a, b), ab_hi = _mm512_unpackhi_ps(a, b);
  const __m512 cd_lo = _mm512_unpacklo_ps(c, d), cd_hi = _mm512_unpackhi_ps(c, d);
  // gK's 128-bit lane L holds group K + 4·L.
  const __m512 g0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab_lo), _mm512_castps_pd(cd_lo)));
  const __m512 g1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab_lo), _mm512_castps_pd(cd_lo)));
  const __m512 g2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab_hi), _mm512_castps_pd(cd_hi)));
  const __m512 g3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab_hi), _mm512_castps_pd(cd_hi)));
  const __m512 t0 = _mm512_shuffle_f32x4(g0, g1, 0x44);  // groups 0, 4, 1, 5
  const __m512 t1 = _mm512_shuffle_f32x4(g2, g3, 0x44);  // 2, 6, 3, 7
  const __m512 t2 = _mm512_shuffle_f32x4(g0, g1, 0xEE);  // 8, 12, 9, 13
  const __m512 t3 = _mm512_shuffle_f32x4(g2, g3, 0xEE);  // 10, 14, 11, 15
  _mm512_storeu_ps(out + 0, _mm512_shuffle_f32x4(t0, t1, 0x88));   // 0, 1, 2, 3
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));  // 4, 5, 6, 7
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));  // 8, 9, 10, 11
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));  // 12, 13, 14, 15
}

}  // namespace

ZO2_AVX512 std::int64_t noise_groups_avx512(std::uint64_t seed, std::uint64_t key, std::uint64_t q0,
                                             std::int64_t n, float* z, NoiseDomain domain) {
  std::int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512i r[4];
    philox16(seed, key, q0 + static_cast<std::uint64_t>(j), domain, r);
    __m512 a, b, c, d;
    box_muller16(r[0], r[1], &a, &b);
    box_muller16(r[2], r[3], &c, &d);
    store_interleaved(a, b, c, d, z + 4 * j);
  }
  return j;
}

ZO2_AVX512 std::int64_t noise_groups_avx512(std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t n,
                                           std::uint32_t* bits, NoiseDomain domain) {
  std::int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512i r[4];
    philox16(seed, key, q0 + static_cast<std::uint64_t>(j), domain, r);
    store_interleaved(_mm512_castsi512_ps(r[0]), _mm512_castsi512_ps(r[1]), _mm512_castsi512_ps(r[2]),
                      _mm512_castsi512_ps(r[3]), reinterpret_cast<float*>(bits + 4 * j));
  }
  return j;
}

}  // namespace zo2::cpu
#pragma GCC diagnostic pop
#endif  // ZO2_NOISE_AVX512
