// The CPU's vectorized normal generators (runtime/cpu/noise_simd.h, Note [Noise ISA]):
// the AVX2 and AVX-512 loops must give exactly the bits of the scalar definition in
// runtime/philox.h — for every group count (full vectors and remainders), across the 2^32
// carry of the group counter, for every domain — and ZO2_CPU_NOISE must name a loop or
// fail clearly.
#include "runtime/cpu/noise_simd.h"
#include "runtime/error.h"
#include "runtime/philox.h"

#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <string>
#include <vector>

namespace zo2::cpu {
namespace {

using u64 = std::uint64_t;

struct Case {
  u64 seed, key, q0;
};

// Starts that put the 2^32 carry of the group index at every lane position of a 16- or
// 8-wide vector, plus ordinary ones.
std::vector<Case> cases() {
  std::vector<Case> out = {{0, 0, 0}, {1, 7, 5}, {0xdeadbeefcafef00dull, 0x9e3779b97f4a7c15ull, 4096},
                           {u64{1} << 40, ~u64{0}, u64{1} << 40}};
  for (u64 back = 1; back <= 17; ++back) out.push_back({42 + back, 0x1234abcd5678ef90ull, (u64{3} << 32) - back});
  return out;
}

const std::int64_t kCounts[] = {0, 1, 3, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 47, 100};

class NoiseIsaTest : public ::testing::TestWithParam<NoiseIsa> {
 protected:
  void SetUp() override {
    if (!noise_isa_available(GetParam()))
      GTEST_SKIP() << "the " << noise_isa_name(GetParam()) << " loop does not run on this build and CPU";
  }
};

TEST_P(NoiseIsaTest, NormalsAreBitIdenticalToTheScalarDefinition) {
  for (const Case& c : cases()) {
    for (std::int64_t n : kCounts) {
      std::vector<float> z(static_cast<std::size_t>(4 * n + 4), -7.0f);
      noise_normals(GetParam(), c.seed, c.key, c.q0, n, z.data(), NoiseDomain::normal);
      for (std::int64_t j = 0; j < n; ++j) {
        const Normal4 want = noise_normal4(c.seed, c.key, c.q0 + static_cast<u64>(j));
        for (int i = 0; i < 4; ++i)
          ASSERT_EQ(std::bit_cast<std::uint32_t>(z[static_cast<std::size_t>(4 * j + i)]),
                    std::bit_cast<std::uint32_t>(want.v[i]))
              << noise_isa_name(GetParam()) << " q0 " << c.q0 << " n " << n << " group " << j << " word " << i;
      }
      // Nothing past the request is written.
      for (int i = 0; i < 4; ++i) EXPECT_EQ(z[static_cast<std::size_t>(4 * n + i)], -7.0f) << "n " << n;
    }
  }
}

TEST_P(NoiseIsaTest, WordsAreThePhiloxOutputOfEachGroupInEveryDomain) {
  for (NoiseDomain domain : {NoiseDomain::normal, NoiseDomain::rounding}) {
    for (const Case& c : cases()) {
      for (std::int64_t n : kCounts) {
        std::vector<std::uint32_t> bits(static_cast<std::size_t>(4 * n + 4), 0xA5A5A5A5u);
        noise_words(GetParam(), c.seed, c.key, c.q0, n, bits.data(), domain);
        for (std::int64_t j = 0; j < n; ++j) {
          const Philox4 want = noise_bits(c.seed, c.key, c.q0 + static_cast<u64>(j), domain);
          const std::uint32_t w[4] = {want.x, want.y, want.z, want.w};
          for (int i = 0; i < 4; ++i)
            ASSERT_EQ(bits[static_cast<std::size_t>(4 * j + i)], w[i])
                << noise_isa_name(GetParam()) << " q0 " << c.q0 << " n " << n << " group " << j;
        }
        for (int i = 0; i < 4; ++i) EXPECT_EQ(bits[static_cast<std::size_t>(4 * n + i)], 0xA5A5A5A5u);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, NoiseIsaTest, ::testing::Values(NoiseIsa::scalar, NoiseIsa::avx2, NoiseIsa::avx512),
                         [](const ::testing::TestParamInfo<NoiseIsa>& info) {
                           return std::string(noise_isa_name(info.param));
                         });

TEST(NoiseIsaChoice, DefaultIsTheWidestAvailableAndTheEnvironmentNamesOne) {
  const NoiseIsa widest = noise_isa_from(nullptr);
  EXPECT_TRUE(noise_isa_available(widest));
  EXPECT_EQ(noise_isa_from(""), widest);
  if (noise_isa_available(NoiseIsa::avx512)) {
    EXPECT_EQ(widest, NoiseIsa::avx512);
  } else if (noise_isa_available(NoiseIsa::avx2)) {
    EXPECT_EQ(widest, NoiseIsa::avx2);
  }
  EXPECT_EQ(noise_isa_from("scalar"), NoiseIsa::scalar);
  for (NoiseIsa isa : {NoiseIsa::avx2, NoiseIsa::avx512}) {
    const std::string name(noise_isa_name(isa));
    if (noise_isa_available(isa)) {
      EXPECT_EQ(noise_isa_from(name.c_str()), isa);
    } else {
      try {
        noise_isa_from(name.c_str());
        ADD_FAILURE() << "an unavailable loop was accepted: " << name;
      } catch (const Error& e) {
        EXPECT_EQ(e.kind(), ErrorKind::unsupported);
        EXPECT_NE(std::string(e.what()).find("ZO2_CPU_NOISE=" + name), std::string::npos) << e.what();
      }
    }
  }
  try {
    noise_isa_from("avx1024");
    ADD_FAILURE() << "an unknown name was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("ZO2_CPU_NOISE=avx1024"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("scalar, avx2 or avx512"), std::string::npos) << e.what();
  }
  // The process-wide choice is one of them and is what the default overloads use.
  EXPECT_TRUE(noise_isa_available(noise_isa()));
  std::vector<float> a(64 * 4), b(64 * 4);
  noise_normals(7, 9, (u64{1} << 32) - 5, 64, a.data());
  noise_normals(NoiseIsa::scalar, 7, 9, (u64{1} << 32) - 5, 64, b.data(), NoiseDomain::normal);
  EXPECT_EQ(a, b);
}

}  // namespace
}  // namespace zo2::cpu
