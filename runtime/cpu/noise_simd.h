// Normals for many Philox groups at once on the CPU: the same arithmetic as
// noise_normal4 (runtime/philox.h), lane by lane in AVX2 registers, so the results are
// bit-identical to the scalar (and the CUDA) path — every operation here is an exact IEEE
// operation that the scalar code also performs (mul, add, fma, sqrt, int→float, bit ops),
// in the same order. Regenerating z is the CPU backend's main cost, hence the SIMD.
#pragma once
#include "runtime/philox.h"

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

// The AVX-512 loops (noise_avx512.cpp) are compiled on every x86-64 GCC/Clang build and
// chosen at run time, whatever -march the rest of the code has.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ZO2_NOISE_AVX512 1
#else
#define ZO2_NOISE_AVX512 0
#endif

#include <string_view>

namespace zo2::cpu {

// Note [Noise ISA]
//   The same normals come from three loops: scalar (noise_normal4), AVX2 (8 groups per
//   iteration; compiled when the build's -march has AVX2+FMA, the default x86-64-v3) and
//   AVX-512F (16 groups; compiled on any x86-64 build, used only where the CPU reports
//   AVX-512F). All three give the same bits. noise_normals/noise_words use the widest the
//   CPU runs, or the one named by ZO2_CPU_NOISE=scalar|avx2|avx512 when that is available
//   (an unknown or unavailable name is an error) — for measuring one against another.
//   Measured on a Zen 4 core (bench/RESULTS.md): AVX2 1.52 ns per normal, AVX-512 1.01 ns.
enum class NoiseIsa { scalar, avx2, avx512 };
std::string_view noise_isa_name(NoiseIsa isa);
bool noise_isa_available(NoiseIsa isa);
NoiseIsa noise_isa();  // what noise_normals/noise_words use (decided once per process)
// The choice for a value of ZO2_CPU_NOISE (null or empty: the widest available).
NoiseIsa noise_isa_from(const char* env);

// z[4·j + i] = noise_normal4(seed, key, q0 + j).v[i] for j < n.
void noise_normals(std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t n,
                   float* z, NoiseDomain domain = NoiseDomain::normal);
// bits[4·j + i] = the four words of noise_bits(seed, key, q0 + j, domain) for j < n.
void noise_words(std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t n,
                 std::uint32_t* bits, NoiseDomain domain);
// The same with a given loop (tests compare them); fails if `isa` is not available here.
void noise_normals(NoiseIsa isa, std::uint64_t seed, std::uint64_t key, std::uint64_t q0,
                   std::int64_t n, float* z, NoiseDomain domain);
void noise_words(NoiseIsa isa, std::uint64_t seed, std::uint64_t key, std::uint64_t q0,
                 std::int64_t n, std::uint32_t* bits, NoiseDomain domain);

#if ZO2_NOISE_AVX512
// Normals (float) or Philox words (uint32) of groups [0, r) of the request, r = n rounded
// down to 16; the caller does the rest (noise_avx512.cpp; call only where
// noise_isa_available(NoiseIsa::avx512)).
std::int64_t noise_groups_avx512(std::uint64_t seed, std::uint64_t key, std::uint64_t q0,
                                  std::int64_t n, float* z, NoiseDomain domain);
std::int64_t noise_groups_avx512(std::uint64_t seed, std::uint64_t key, std::uint64_t q0,
                                std::int64_t n, std::uint32_t* bits, NoiseDomain domain);
#endif

// The constants of noise_log and noise_sincos_turns (runtime/philox.h, which spells them
// out for the GPU), shared by the AVX2 and AVX-512 loops; each loop applies them in
// philox.h's order, so all three give the same bits.
namespace noise_poly {
inline constexpr float kSqrtHalf = 0.70710678118654752f;
inline constexpr float kLog[] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                                 -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                                 2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
inline constexpr float kLn2Lo = -2.12194440e-4f, kLn2Hi = 0.693359375f;
inline constexpr float kTurnToRadian = 3.7450702e-07f;  // 2π / 2^24
inline constexpr float kSin[] = {-1.9515295891e-4f, 8.3321608736e-3f, -1.6666654611e-1f};
inline constexpr float kCos[] = {2.443315711809948e-5f, -1.388731625493765e-3f, 4.166664568298827e-2f};
inline constexpr float kU24 = 5.9604644775390625e-8f;  // 2^-24
}  // namespace noise_poly

#if defined(__AVX2__) && defined(__FMA__)
namespace simd {

inline __m256i mulhi_epu32(__m256i a, __m256i m) {
  const __m256i even = _mm256_mul_epu32(a, m);                             // lanes 0,2,4,6 → 64 bit
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);       // lanes 1,3,5,7
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline __m256 fadd(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 fmul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 ffma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256 set(float v) { return _mm256_set1_ps(v); }

// noise_log, lane-wise.
inline __m256 log8(__m256 u) {
  const __m256i bits = _mm256_castps_si256(u);
  __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xFF)),
                               _mm256_set1_epi32(126));
  const __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                       _mm256_set1_epi32(0x3F000000)));
  const __m256 low = _mm256_cmp_ps(m, set(noise_poly::kSqrtHalf), _CMP_LT_OQ);
  e = _mm256_sub_epi32(e, _mm256_and_si256(_mm256_castps_si256(low), _mm256_set1_epi32(1)));
  const __m256 x = fadd(_mm256_blendv_ps(m, fadd(m, m), low), set(-1.0f));
  const __m256 z = fmul(x, x);
  __m256 y = set(noise_poly::kLog[0]);
  for (int i = 1; i < 9; ++i) y = ffma(y, x, set(noise_poly::kLog[i]));
  y = fmul(fmul(y, x), z);
  const __m256 fe = _mm256_cvtepi32_ps(e);
  y = ffma(fe, set(noise_poly::kLn2Lo), y);
  y = ffma(z, set(-0.5f), y);
  return ffma(fe, set(noise_poly::kLn2Hi), fadd(x, y));
}

// noise_sincos_turns, lane-wise (m < 2^24).
inline void sincos8(__m256i m, __m256* s, __m256* c) {
  const __m256i quadrant = _mm256_srli_epi32(_mm256_add_epi32(m, _mm256_set1_epi32(1 << 21)), 22);
  const __m256i rem = _mm256_sub_epi32(m, _mm256_slli_epi32(quadrant, 22));
  const __m256 x = fmul(_mm256_cvtepi32_ps(rem), set(noise_poly::kTurnToRadian));
  const __m256 z = fmul(x, x);
  const __m256 ps = ffma(ffma(set(noise_poly::kSin[0]), z, set(noise_poly::kSin[1])), z, set(noise_poly::kSin[2]));
  const __m256 sn = ffma(fmul(ps, z), x, x);
  const __m256 pc = ffma(ffma(set(noise_poly::kCos[0]), z, set(noise_poly::kCos[1])), z, set(noise_poly::kCos[2]));
  const __m256 cs = ffma(fmul(pc, z), z, ffma(z, set(-0.5f), set(1.0f)));
  const __m256 odd = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(quadrant, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
  const __m256i s_sign = _mm256_slli_epi32(_mm256_and_si256(quadrant, _mm256_set1_epi32(2)), 30);
  const __m256i c_sign =
      _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(quadrant, _mm256_set1_epi32(1)), _mm256_set1_epi32(2)), 30);
  *s = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(_mm256_blendv_ps(sn, cs, odd)), s_sign));
  *c = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(_mm256_blendv_ps(cs, sn, odd)), c_sign));
}

inline void box_muller8(__m256i a, __m256i b, __m256* z0, __m256* z1) {
  const __m256 u1 = fmul(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_srli_epi32(a, 8), _mm256_set1_epi32(1))),
                         set(noise_poly::kU24));
  const __m256 r = _mm256_sqrt_ps(fmul(set(-2.0f), log8(u1)));
  __m256 s, c;
  sincos8(_mm256_srli_epi32(b, 8), &s, &c);
  *z0 = fmul(r, c);
  *z1 = fmul(r, s);
}

}  // namespace simd
#endif

}  // namespace zo2::cpu
