#include "runtime/cpu/noise_simd.h"

#include "runtime/error.h"

#include <cstdlib>

namespace zo2::cpu {

namespace {

#if defined(__AVX2__) && defined(__FMA__)
// Philox4x32-10 on eight consecutive groups q .. q+7 (lane j = group q + j).
inline void philox8(std::uint64_t seed, std::uint64_t key, std::uint64_t q, NoiseDomain domain, __m256i* r0,
                    __m256i* r1, __m256i* r2, __m256i* r3) {
  using namespace simd;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i base = _mm256_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(q)));
  const __m256i lo = _mm256_add_epi32(base, lane);
  // q + j may carry into the high word: unsigned lo < base means it wrapped.
  const __m256i flip = _mm256_set1_epi32(INT32_MIN);
  const __m256i carry = _mm256_and_si256(
      _mm256_cmpgt_epi32(_mm256_xor_si256(base, flip), _mm256_xor_si256(lo, flip)), _mm256_set1_epi32(1));
  __m256i c0 = lo;
  __m256i c1 = _mm256_add_epi32(
      _mm256_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(q >> 32) | (static_cast<std::uint32_t>(domain) << 24))),
      carry);
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(key)));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(key >> 32)));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i hi0 = mulhi_epu32(c0, m0), lo0 = _mm256_mullo_epi32(c0, m0);
    const __m256i hi1 = mulhi_epu32(c2, m1), lo1 = _mm256_mullo_epi32(c2, m1);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  *r0 = c0;
  *r1 = c1;
  *r2 = c2;
  *r3 = c3;
}

// Stores four 8-lane vectors (a, b, c, d per group) in group-major order: out[4j+i].
inline void store_interleaved(__m256 a, __m256 b, __m256 c, __m256 d, float* out) {
  const __m256 ab_lo = _mm256_unpacklo_ps(a, b), ab_hi = _mm256_unpackhi_ps(a, b);
  const __m256 cd_lo = _mm256_unpacklo_ps(c, d), cd_hi = _mm256_unpackhi_ps(c, d);
  const __m256 g0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab_lo), _mm256_castps_pd(cd_lo)));
  const __m256 g1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab_lo), _mm256_castps_pd(cd_lo)));
  const __m256 g2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab_hi), _mm256_castps_pd(cd_hi)));
  const __m256 g3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab_hi), _mm256_castps_pd(cd_hi)));
  _mm256_storeu_ps(out + 0, _mm256_permute2f128_ps(g0, g1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(g2, g3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(g0, g1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(g2, g3, 0x31));
}
#endif

void scalar_loop(std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t j, std::int64_t n,
                    float* z, NoiseDomain domain) {
  for (; j < n; ++j) {
    const Philox4 r = noise_bits(seed, key, q0 + static_cast<std::uint64_t>(j), domain);
    box_muller(r.x, r.y, &z[4 * j], &z[4 * j + 1]);
    box_muller(r.z, r.w, &z[4 * j + 2], &z[4 * j + 3]);
  }
}

void scalar_loop(std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t j, std::int64_t n,
                  std::uint32_t* bits, NoiseDomain domain) {
  for (; j < n; ++j) {
    const Philox4 r = noise_bits(seed, key, q0 + static_cast<std::uint64_t>(j), domain);
    bits[4 * j] = r.x;
    bits[4 * j + 1] = r.y;
    bits[4 * j + 2] = r.z;
    bits[4 * j + 3] = r.w;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
std::int64_t avx2_loop(std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t n, float* z,
                          NoiseDomain domain) {
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256i c0, c1, c2, c3;
    philox8(seed, key, q0 + static_cast<std::uint64_t>(j), domain, &c0, &c1, &c2, &c3);
    __m256 a, b, c, d;
    simd::box_muller8(c0, c1, &a, &b);
    simd::box_muller8(c2, c3, &c, &d);
    store_interleaved(a, b, c, d, z + 4 * j);
  }
  return j;
}

std::int64_t avx2_loop(std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t n,
                        std::uint32_t* bits, NoiseDomain domain) {
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256i c0, c1, c2, c3;
    philox8(seed, key, q0 + static_cast<std::uint64_t>(j), domain, &c0, &c1, &c2, &c3);
    store_interleaved(_mm256_castsi256_ps(c0), _mm256_castsi256_ps(c1), _mm256_castsi256_ps(c2),
                      _mm256_castsi256_ps(c3), reinterpret_cast<float*>(bits + 4 * j));
  }
  return j;
}
#endif

void require_available(NoiseIsa isa) {
  if (!noise_isa_available(isa))
    fail(ErrorKind::unsupported, "cpu noise: the {} loop is not available on this build and CPU",
         noise_isa_name(isa));
}

// Groups [0, n) with loop `isa` (available): the widest loop takes what it can, AVX2 the
// AVX-512 loop's remainder of 8 or more groups, the scalar code the rest. T is float
// (normals) or std::uint32_t (Philox words); four values per group.
template <class T>
void generate(NoiseIsa isa, std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t n, T* out,
              NoiseDomain domain) {
  std::int64_t j = 0;
#if ZO2_NOISE_AVX512
  if (isa == NoiseIsa::avx512) j = noise_groups_avx512(seed, key, q0, n, out, domain);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (isa != NoiseIsa::scalar) j += avx2_loop(seed, key, q0 + static_cast<std::uint64_t>(j), n - j, out + 4 * j, domain);
#endif
  scalar_loop(seed, key, q0, j, n, out, domain);
}

}  // namespace

NoiseIsa noise_isa_from(const char* env) {
  if (env != nullptr && *env != '\0') {
    const std::string_view want(env);
    for (NoiseIsa isa : {NoiseIsa::scalar, NoiseIsa::avx2, NoiseIsa::avx512}) {
      if (want != noise_isa_name(isa)) continue;
      if (!noise_isa_available(isa))
        fail(ErrorKind::unsupported, "ZO2_CPU_NOISE={}: this {} cannot run it", want,
             isa == NoiseIsa::avx2 ? "build (compiled without AVX2+FMA)" : "CPU (no AVX-512F)");
      return isa;
    }
    fail(ErrorKind::invalid_argument, "ZO2_CPU_NOISE={}: expected scalar, avx2 or avx512", want);
  }
  for (NoiseIsa isa : {NoiseIsa::avx512, NoiseIsa::avx2})
    if (noise_isa_available(isa)) return isa;
  return NoiseIsa::scalar;
}

std::string_view noise_isa_name(NoiseIsa isa) {
  switch (isa) {
    case NoiseIsa::scalar: return "scalar";
    case NoiseIsa::avx2: return "avx2";
    case NoiseIsa::avx512: return "avx512";
  }
  return "?";
}

bool noise_isa_available(NoiseIsa isa) {
  switch (isa) {
    case NoiseIsa::scalar: return true;
    case NoiseIsa::avx2:
#if defined(__AVX2__) && defined(__FMA__)
      return true;  // the whole build requires it
#else
      return false;
#endif
    case NoiseIsa::avx512:
#if ZO2_NOISE_AVX512
      return __builtin_cpu_supports("avx512f") != 0;
#else
      return false;
#endif
  }
  return false;
}

NoiseIsa noise_isa() {
  static const NoiseIsa isa = noise_isa_from(std::getenv("ZO2_CPU_NOISE"));
  return isa;
}

void noise_normals(NoiseIsa isa, std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t n,
                   float* z, NoiseDomain domain) {
  require_available(isa);
  generate(isa, seed, key, q0, n, z, domain);
}

void noise_words(NoiseIsa isa, std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t n,
                 std::uint32_t* bits, NoiseDomain domain) {
  require_available(isa);
  generate(isa, seed, key, q0, n, bits, domain);
}

// The process's choice was checked once, when noise_isa() made it.
void noise_normals(std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t n, float* z,
                   NoiseDomain domain) {
  generate(noise_isa(), seed, key, q0, n, z, domain);
}

void noise_words(std::uint64_t seed, std::uint64_t key, std::uint64_t q0, std::int64_t n, std::uint32_t* bits,
                 NoiseDomain domain) {
  generate(noise_isa(), seed, key, q0, n, bits, domain);
}

}  // namespace zo2::cpu
