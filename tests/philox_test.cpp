// Tests of the counter-based generator (runtime/philox.h): the Philox4x32-10 rounds against
// Random123's published known answers, the noise-stream layout of Note [Noise stream
// layout], the hand-written log and sin/cos of Note [Deterministic normals], the
// distribution of the Box–Muller normals, the stochastic-rounding bits and step seeds.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <set>
#include <vector>

#include <fmt/format.h>

#include "runtime/philox.h"

namespace zo2 {
namespace {

using u32 = std::uint32_t;
using u64 = std::uint64_t;

struct Kat {
  Philox4 counter;
  u32 k0, k1;
  Philox4 expected;
};

// Random123's kat_vectors for philox4x32_10 (as copied into DEShawResearch/Random123-Boost,
// libs/random/test/test_philox.cpp, and TensorFlow's stateful_random_ops_test.py).
constexpr Kat kKats[] = {
    {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
     0x00000000u,
     0x00000000u,
     {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     0xffffffffu,
     0xffffffffu,
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     0xa4093822u,
     0x299f31d0u,
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};

std::string hex4(const Philox4& p) {
  return fmt::format("{{{:08x} {:08x} {:08x} {:08x}}}", p.x, p.y, p.z, p.w);
}

TEST(Philox, MatchesRandom123KnownAnswerVectors) {
  for (const Kat& k : kKats) {
    const Philox4 got = philox4x32_10(k.counter, k.k0, k.k1);
    EXPECT_EQ(hex4(got), hex4(k.expected)) << "counter " << hex4(k.counter) << " key "
                                           << fmt::format("{{{:08x} {:08x}}}", k.k0, k.k1);
  }
}

TEST(Philox, NoiseBitsUseTheDocumentedCounterAndKeyLayout) {
  // Note [Noise stream layout]: key = (seed low, seed high); counter = (q low,
  // q high | domain << 24, tensor key low, tensor key high).
  const u64 seed = 0x0123456789abcdefull, key = 0xfedcba9876543210ull;
  for (u64 q : {u64{0}, u64{1}, u64{0xffffffffull}, u64{0x100000000ull}, u64{0x00ab00001234ull}}) {
    for (NoiseDomain d : {NoiseDomain::normal, NoiseDomain::rounding, NoiseDomain::step_seed}) {
      const Philox4 counter{static_cast<u32>(q),
                            static_cast<u32>(q >> 32) | (static_cast<u32>(d) << 24),
                            static_cast<u32>(key), static_cast<u32>(key >> 32)};
      const Philox4 want = philox4x32_10(counter, static_cast<u32>(seed), static_cast<u32>(seed >> 32));
      EXPECT_EQ(hex4(noise_bits(seed, key, q, d)), hex4(want))
          << "q " << q << " domain " << static_cast<int>(d);
    }
  }
}

// ---- the hand-written log and sin/cos ----

// Distance of x from the exact value `ref`, in units of the float spacing at `ref`.
double ulp_error(float x, double ref) {
  if (ref == 0) return x == 0 ? 0.0 : INFINITY;
  const int e = std::ilogb(static_cast<float>(ref));
  const double ulp = std::ldexp(1.0, std::max(e, -126) - 23);
  return std::fabs(static_cast<double>(x) - ref) / ulp;
}

TEST(NoiseLog, MatchesStdLogWithinTwoUlpOnEveryBoxMullerInput) {
  // Box–Muller feeds u = k · 2^-24, k = 1 .. 2^24: check all of them.
  double worst = 0;
  u32 worst_k = 0;
  for (u32 k = 1; k <= (1u << 24); ++k) {
    const float u = static_cast<float>(k) * 5.9604644775390625e-8f;
    const double err = ulp_error(noise_log(u), std::log(static_cast<double>(u)));
    if (err > worst) {
      worst = err;
      worst_k = k;
    }
  }
  EXPECT_LE(worst, 2.0) << "worst at u = " << worst_k << " * 2^-24";
  EXPECT_EQ(noise_log(1.0f), 0.0f);
  EXPECT_NEAR(noise_log(5.9604644775390625e-8f), -16.635532333438686, 4e-6);
}

TEST(NoiseLog, MatchesStdLogWithinTwoUlpAcrossAllFloatsFrom2ToMinus24To1) {
  // Every 7th float bit pattern between 2^-24 and 1 (all binades, all mantissa residues).
  const u32 lo = std::bit_cast<u32>(0x1p-24f), hi = std::bit_cast<u32>(1.0f);
  double worst = 0;
  float worst_u = 0;
  for (u32 b = lo; b <= hi; b += 7) {
    const float u = std::bit_cast<float>(b);
    const double err = ulp_error(noise_log(u), std::log(static_cast<double>(u)));
    if (err > worst) {
      worst = err;
      worst_u = u;
    }
  }
  EXPECT_LE(worst, 2.0) << fmt::format("worst at u = {:a}", worst_u);
}

TEST(NoiseSinCosTurns, MatchesStdSinCosOfTwoPiTWithin2e7InEveryQuadrant) {
  constexpr double kTwoPi = 2 * std::numbers::pi;
  double worst_s = 0, worst_c = 0;
  u32 worst_ms = 0, worst_mc = 0;
  int quadrant_hits[4] = {0, 0, 0, 0};
  auto check = [&](u32 m) {
    float s, c;
    noise_sincos_turns(m, &s, &c);
    const double t = static_cast<double>(m) * 0x1p-24;
    const double es = std::fabs(s - std::sin(kTwoPi * t));
    const double ec = std::fabs(c - std::cos(kTwoPi * t));
    if (es > worst_s) worst_s = es, worst_ms = m;
    if (ec > worst_c) worst_c = ec, worst_mc = m;
    ++quadrant_hits[m >> 22];
  };
  for (u32 m = 0; m < (1u << 24); m += 5) check(m);
  // Every quadrant boundary (where the reduction switches) and the wrap-around at 2^24.
  for (u32 q = 0; q <= 4; ++q)
    for (int d = -300; d <= 300; ++d) {
      const std::int64_t m = static_cast<std::int64_t>(q) * (1 << 22) + d;
      if (m >= 0 && m < (1 << 24)) check(static_cast<u32>(m));
    }
  for (int q = 0; q < 4; ++q) EXPECT_GT(quadrant_hits[q], 0) << "quadrant " << q;
  EXPECT_LE(worst_s, 2e-7) << "sin worst at m = " << worst_ms;
  EXPECT_LE(worst_c, 2e-7) << "cos worst at m = " << worst_mc;
}

TEST(NoiseSinCosTurns, QuarterTurnsAreExact) {
  const struct {
    u32 m;
    float s, c;
  } cases[] = {{0, 0.0f, 1.0f}, {1u << 22, 1.0f, 0.0f}, {2u << 22, 0.0f, -1.0f}, {3u << 22, -1.0f, 0.0f}};
  for (const auto& k : cases) {
    float s, c;
    noise_sincos_turns(k.m, &s, &c);
    EXPECT_EQ(s, k.s) << "m = " << k.m;
    EXPECT_EQ(c, k.c) << "m = " << k.m;
  }
}

// ---- the normals ----

double normal_cdf(double x) { return 0.5 * std::erfc(-x / std::numbers::sqrt2); }

// 2^20 normals: 4 seeds × 4 tensor keys × 65536 consecutive elements.
std::vector<float> sample_normals() {
  std::vector<float> z;
  z.reserve(1u << 20);
  const u64 seeds[] = {0, 1, 0xdeadbeefcafef00dull, u64{1} << 40};
  const u64 keys[] = {0, 7, 0x9e3779b97f4a7c15ull, 0xffffffffffffffffull};
  for (u64 s : seeds)
    for (u64 k : keys)
      for (u64 q = 0; q < 16384; ++q) {
        const Normal4 n = noise_normal4(s, k, q);
        z.insert(z.end(), n.v, n.v + 4);
      }
  return z;
}

TEST(NoiseNormal, MomentsOfAMillionSamplesMatchTheStandardNormal) {
  const std::vector<float> z = sample_normals();
  const double n = static_cast<double>(z.size());
  ASSERT_GE(n, 1e6);
  double sum = 0;
  for (float v : z) {
    ASSERT_TRUE(std::isfinite(v));
    sum += v;
  }
  const double mean = sum / n;
  double m2 = 0, m3 = 0, m4 = 0, lag1 = 0, tail3 = 0;
  for (std::size_t i = 0; i < z.size(); ++i) {
    const double d = z[i] - mean;
    m2 += d * d;
    m3 += d * d * d;
    m4 += d * d * d * d;
    if (i + 1 < z.size()) lag1 += static_cast<double>(z[i]) * z[i + 1];
    if (std::fabs(z[i]) > 3) ++tail3;
  }
  m2 /= n;
  m3 /= n;
  m4 /= n;
  const double skew = m3 / std::pow(m2, 1.5), kurt = m4 / (m2 * m2) - 3;
  // Standard errors under N(0, 1): mean 1/√n, variance √(2/n), skewness √(6/n),
  // excess kurtosis √(24/n), lag-1 correlation 1/√n.
  EXPECT_LT(std::fabs(mean), 5 / std::sqrt(n)) << "mean " << mean;
  EXPECT_LT(std::fabs(m2 - 1), 5 * std::sqrt(2 / n)) << "variance " << m2;
  EXPECT_LT(std::fabs(skew), 5 * std::sqrt(6 / n)) << "skewness " << skew;
  EXPECT_LT(std::fabs(kurt), 5 * std::sqrt(24 / n)) << "excess kurtosis " << kurt;
  EXPECT_LT(std::fabs(lag1 / (n - 1)), 5 / std::sqrt(n)) << "lag-1 correlation " << lag1 / (n - 1);
  // P(|z| > 3) = 0.0026998; binomial standard error.
  const double p3 = 2 * normal_cdf(-3);
  EXPECT_LT(std::fabs(tail3 / n - p3), 5 * std::sqrt(p3 * (1 - p3) / n)) << "P(|z|>3) " << tail3 / n;
}

TEST(NoiseNormal, KolmogorovSmirnovStatisticIsBelowTheOnePercentCriticalValue) {
  std::vector<float> z = sample_normals();
  std::sort(z.begin(), z.end());
  const double n = static_cast<double>(z.size());
  double d = 0;
  for (std::size_t i = 0; i < z.size(); ++i) {
    const double f = normal_cdf(z[i]);
    d = std::max({d, static_cast<double>(i + 1) / n - f, f - static_cast<double>(i) / n});
  }
  EXPECT_LT(d, 1.63 / std::sqrt(n)) << "KS statistic D = " << d;
}

TEST(NoiseNormal, EachNormalDependsOnlyOnSeedKeyAndIndex) {
  const u64 seed = 0x5eed5eed5eedull, key = 0x1234abcd5678ef90ull;
  for (u64 base : {u64{0}, u64{4096}, (u64{1} << 32) * 4 - 8, u64{1} << 40}) {
    for (u64 i = base; i < base + 64; ++i) {
      const float one = noise_normal(seed, key, i);
      const float four = noise_normal4(seed, key, i / 4).v[i % 4];
      EXPECT_EQ(std::bit_cast<u32>(one), std::bit_cast<u32>(four)) << "index " << i;
    }
  }
  // Group q is Box–Muller on the Philox output of counter q in the normal domain.
  const Philox4 r = noise_bits(seed, key, 77, NoiseDomain::normal);
  float a, b, c, d;
  box_muller(r.x, r.y, &a, &b);
  box_muller(r.z, r.w, &c, &d);
  const Normal4 n = noise_normal4(seed, key, 77);
  EXPECT_EQ(n.v[0], a);
  EXPECT_EQ(n.v[1], b);
  EXPECT_EQ(n.v[2], c);
  EXPECT_EQ(n.v[3], d);
  // Computing in another order (reverse) gives the same bits: no hidden state.
  std::vector<float> fwd, rev(256);
  for (u64 i = 0; i < 256; ++i) fwd.push_back(noise_normal(seed, key, i));
  for (u64 i = 256; i-- > 0;) rev[i] = noise_normal(seed, key, i);
  EXPECT_EQ(fwd, rev);
}

// How many of the first 1024 elements of two streams are equal.
template <class F, class G>
int equal_count(F a, G b) {
  int same = 0;
  for (u64 i = 0; i < 1024; ++i) same += a(i) == b(i) ? 1 : 0;
  return same;
}

TEST(NoiseNormal, DifferentKeysSeedsAndGroupsGiveDifferentStreams) {
  const u64 s = 42, k = 0xabcdef0123456789ull;
  auto stream = [](u64 seed, u64 key) { return [=](u64 i) { return noise_normal(seed, key, i); }; };
  const auto base = stream(s, k);
  EXPECT_LE(equal_count(base, stream(s + 1, k)), 1) << "seed + 1";
  EXPECT_LE(equal_count(base, stream(s | (u64{1} << 63), k)), 1) << "seed high bit";
  EXPECT_LE(equal_count(base, stream(s, k + 1)), 1) << "key + 1";
  EXPECT_LE(equal_count(base, stream(s, k ^ (u64{1} << 63))), 1) << "key high bit";
  // The element index's high 32 bits of q are part of the counter.
  const u64 far = u64{1} << 34;  // q = 2^32: same low word as q = 0
  EXPECT_LE(equal_count(base, [&](u64 i) { return noise_normal(s, k, far + i); }), 1);
}

TEST(NoiseDomains, NormalRoundingAndStepSeedStreamsAreIndependent) {
  const u64 s = 9, k = 0x77;
  for (u64 q = 0; q < 256; ++q) {
    const Philox4 n = noise_bits(s, k, q, NoiseDomain::normal);
    const Philox4 r = noise_bits(s, k, q, NoiseDomain::rounding);
    const Philox4 t = noise_bits(s, k, q, NoiseDomain::step_seed);
    EXPECT_NE(hex4(n), hex4(r)) << q;
    EXPECT_NE(hex4(n), hex4(t)) << q;
    EXPECT_NE(hex4(r), hex4(t)) << q;
  }
  // rounding_bits(i) is word i % 4 of group i / 4 in the rounding domain.
  for (u64 i = 0; i < 64; ++i) {
    const Philox4 r = noise_bits(s, k, i / 4, NoiseDomain::rounding);
    const u32 words[4] = {r.x, r.y, r.z, r.w};
    EXPECT_EQ(rounding_bits(s, k, i), words[i % 4]) << "index " << i;
  }
}

TEST(DeriveStepSeed, IsDeterministicAndDistinctAcrossStepsAndRunSeeds) {
  std::set<u64> seen;
  for (u64 run : {u64{0}, u64{1}, u64{0xfeedfacecafebeefull}}) {
    for (u64 t = 0; t < 20000; ++t) {
      const u64 s = derive_step_seed(run, t);
      EXPECT_EQ(s, derive_step_seed(run, t));
      EXPECT_TRUE(seen.insert(s).second) << "run seed " << run << " step " << t << " repeats " << s;
    }
  }
  // Steps beyond 2^32 do not alias the low 32 bits, and seeds use both halves.
  EXPECT_NE(derive_step_seed(5, 3), derive_step_seed(5, (u64{1} << 32) + 3));
  int high_set = 0;
  for (u64 t = 0; t < 64; ++t) high_set += (derive_step_seed(5, t) >> 32) != 0 ? 1 : 0;
  EXPECT_GT(high_set, 56);
}

TEST(RoundingBits, TopByteIsUniformByChiSquareOverAMillionDraws) {
  constexpr int kDraws = 1 << 20;
  std::vector<double> top(256, 0), low(256, 0);
  for (int i = 0; i < kDraws; ++i) {
    const u32 r = rounding_bits(0xc0ffee, 0x5151, static_cast<u64>(i));
    top[r >> 24] += 1;
    low[r & 0xffu] += 1;
  }
  auto chi2 = [](const std::vector<double>& bins) {
    const double e = static_cast<double>(kDraws) / 256;
    double c = 0;
    for (double o : bins) c += (o - e) * (o - e) / e;
    return c;
  };
  // 1% critical value of chi-square with 255 degrees of freedom: 310.46.
  EXPECT_LT(chi2(top), 310.46) << "top byte";
  EXPECT_LT(chi2(low), 310.46) << "low byte";
}

}  // namespace
}  // namespace zo2
