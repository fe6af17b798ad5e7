// Tests of the scalar float conversions (runtime/dtype_convert.h) and of the bulk
// convert() / load_as_f32() of runtime/dtype.h. The fp32 -> fp16 and fp32 -> bf16
// round-to-nearest-even conversions are checked on all 2^32 fp32 bit patterns.
#include <gtest/gtest.h>
#include <immintrin.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "runtime/dtype.h"
#include "runtime/dtype_convert.h"
#include "runtime/error.h"

namespace zo2 {
namespace {

using u8 = std::uint8_t;
using u16 = std::uint16_t;
using u32 = std::uint32_t;
using u64 = std::uint64_t;

float f(u32 bits) { return std::bit_cast<float>(bits); }
u32 bits(float x) { return std::bit_cast<u32>(x); }

bool f16_is_nan(u16 h) { return (h & 0x7fffu) > 0x7c00u; }
bool bf16_is_nan(u16 h) { return (h & 0x7fffu) > 0x7f80u; }
bool e4m3_is_nan(u8 v) { return (v & 0x7fu) == 0x7fu; }

// A deterministic stream of uniformly distributed uint32 (splitmix64, upper half).
class Rng {
 public:
  explicit Rng(u64 seed) : s_(seed) {}
  u32 next() {
    u64 z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return static_cast<u32>((z ^ (z >> 31)) >> 32);
  }

 private:
  u64 s_;
};

// Checks every uint32 u, in parallel over fixed chunks of 2^22: count_bad(begin, count)
// returns how many of begin .. begin+count-1 fail (a fast form of ok), ok(u) says whether
// one pattern passes (used only to list the first few failures). Returns the number of
// failing patterns; *first gets (up to) the first 8 of them.
template <class Ok, class CountBad>
u64 count_failures_over_all_u32(Ok ok, CountBad count_bad, std::vector<u32>* first) {
  constexpr u64 kChunk = u64{1} << 22;
  constexpr u64 kChunks = (u64{1} << 32) / kChunk;
  std::vector<u64> fails(kChunks, 0);
  tbb::parallel_for(u64{0}, kChunks, [&](u64 c) {
    fails[c] = count_bad(static_cast<u32>(c * kChunk), static_cast<u32>(kChunk));
  });
  u64 total = 0;
  for (u64 c = 0; c < kChunks; ++c) {
    total += fails[c];
    for (u32 i = 0; fails[c] != 0 && i < kChunk && first->size() < 8; ++i) {
      const u32 u = static_cast<u32>(c * kChunk) + i;
      if (!ok(u)) first->push_back(u);
    }
  }
  return total;
}

std::string hex_list(const std::vector<u32>& v) {
  std::string s;
  for (u32 u : v) s += fmt::format("0x{:08x} ", u);
  return s;
}

// ------------------------------------------------------------------- references

// The bf16 nearest to float x with exact (double) arithmetic, ties to the even
// mantissa; beyond the largest finite value the next step is inf, standing for 2^128
// as IEEE's overflow rule says. NaN gives 0x7FC0 (only NaN-ness is compared).
u16 reference_bf16(float x) {
  if (std::isnan(x)) return 0x7fc0;
  const u16 sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(x));
  if (std::isinf(a)) return sign | 0x7f80;
  const u16 lo = static_cast<u16>(bits(std::fabs(x)) >> 16);  // largest bf16 <= |x|
  const u16 hi = static_cast<u16>(lo + 1);
  const double dlo = bf16_to_f32(lo);
  const double dhi = hi == 0x7f80 ? std::ldexp(1.0, 128) : static_cast<double>(bf16_to_f32(hi));
  const double below = a - dlo, above = dhi - a;  // both exact
  const u16 r = below < above ? lo : above < below ? hi : ((lo & 1) ? hi : lo);
  return sign | r;
}

// Value of e4m3 code c (0..0x7E, no sign) from the format's definition, in double.
double e4m3_formula(int c) {
  const int e = (c >> 3) & 0xf, m = c & 7;
  return e == 0 ? std::ldexp(m, -9) : std::ldexp(1.0 + m / 8.0, e - 7);
}

const std::array<double, 127>& e4m3_values() {
  static const std::array<double, 127> v = [] {
    std::array<double, 127> t{};
    for (int c = 0; c < 127; ++c) t[c] = e4m3_formula(c);
    return t;
  }();
  return v;
}

// The e4m3 code nearest to x (double arithmetic, ties to the even code), saturating:
// |x| >= 448 and inf give +-448, NaN gives 0x7F with x's sign.
u8 reference_e4m3(float x) {
  const u8 sign = std::signbit(x) ? 0x80 : 0;
  if (std::isnan(x)) return sign | 0x7f;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 448.0) return sign | 0x7e;
  const auto& v = e4m3_values();
  const int lo = static_cast<int>(std::upper_bound(v.begin(), v.end(), a) - v.begin()) - 1;
  const int hi = lo + 1;  // a < 448 so lo <= 0x7D
  const double below = a - v[lo], above = v[hi] - a;
  const int r = below < above ? lo : above < below ? hi : ((lo & 1) ? hi : lo);
  return static_cast<u8>(sign | r);
}

// --------------------------------------------------------------- decode / round trip

TEST(DTypeConvert, Bf16RoundTripsEveryBitPattern) {
  for (u32 h = 0; h < 65536; ++h) {
    const float x = bf16_to_f32(static_cast<u16>(h));
    ASSERT_EQ(bits(x), h << 16);
    const u16 back = f32_to_bf16(x);
    if (bf16_is_nan(static_cast<u16>(h))) {
      ASSERT_TRUE(bf16_is_nan(back)) << std::hex << h;
      ASSERT_EQ(back & 0x8000u, h & 0x8000u);
    } else {
      ASSERT_EQ(back, h) << std::hex << h;
    }
  }
}

TEST(DTypeConvert, Fp16RoundTripsEveryBitPattern) {
  for (u32 h = 0; h < 65536; ++h) {
    const float x = f16_to_f32(static_cast<u16>(h));
    // Decoding agrees with the hardware (F16C) decoder.
    const float hw = _cvtsh_ss(static_cast<unsigned short>(h));
    if (f16_is_nan(static_cast<u16>(h))) {
      ASSERT_TRUE(std::isnan(x)) << std::hex << h;
      ASSERT_EQ(std::signbit(x), (h & 0x8000u) != 0);
    } else {
      ASSERT_EQ(bits(x), bits(hw)) << std::hex << h;
    }
    const u16 back = f32_to_f16(x);
    if (f16_is_nan(static_cast<u16>(h))) {
      ASSERT_TRUE(f16_is_nan(back)) << std::hex << h;
      ASSERT_EQ(back & 0x8000u, h & 0x8000u);
    } else {
      ASSERT_EQ(back, h) << std::hex << h;
    }
  }
}

TEST(DTypeConvert, E4m3DecodesEveryBitPatternToItsValue) {
  for (int v = 0; v < 256; ++v) {
    const float x = e4m3_to_f32(static_cast<u8>(v));
    if ((v & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(x)) << v;
      EXPECT_EQ(std::signbit(x), v >= 0x80) << v;
      continue;
    }
    const double mag = e4m3_formula(v & 0x7f);
    const double want = v >= 0x80 ? -mag : mag;
    EXPECT_EQ(static_cast<double>(x), want) << v;
    EXPECT_EQ(std::signbit(x), v >= 0x80) << v;  // 0x80 is -0
  }
  EXPECT_EQ(e4m3_to_f32(0x7e), kE4M3Max);
  EXPECT_EQ(e4m3_to_f32(0xfe), -kE4M3Max);
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // smallest normal
}

// fp8 e5m2 (a checkpoint dtype zo2 reads): bias 15, 2 mantissa bits, subnormals m·2^-16,
// S.11111.00 infinity and S.11111.xx (xx ≠ 0) NaN, as in IEEE fp16 whose top byte it is.
TEST(DTypeConvert, E5m2DecodesEveryBitPatternToItsValue) {
  for (int v = 0; v < 256; ++v) {
    const float x = e5m2_to_f32(static_cast<u8>(v));
    const int e = (v >> 2) & 0x1f, m = v & 3;
    EXPECT_EQ(std::signbit(x), v >= 0x80) << v;
    if (e == 31) {
      EXPECT_TRUE(m == 0 ? std::isinf(x) : std::isnan(x)) << v;
      continue;
    }
    const double mag = e == 0 ? std::ldexp(m, -16) : std::ldexp(1.0 + m / 4.0, e - 15);
    EXPECT_EQ(static_cast<double>(x), v >= 0x80 ? -mag : mag) << v;
  }
  EXPECT_EQ(e5m2_to_f32(0x38), 0.5f);
  EXPECT_EQ(e5m2_to_f32(0x7b), 57344.0f);  // the largest finite value
  EXPECT_EQ(e5m2_to_f32(0x01), std::ldexp(1.0f, -16));
}

// Every e5m2 pattern converts to each type zo2 stores (and to f64) exactly as its fp32 value
// does; e5m2 is a source only.
TEST(DTypeConvert, ConvertReadsE5m2IntoEveryFloatType) {
  std::array<u8, 256> src{};
  for (int v = 0; v < 256; ++v) src[static_cast<std::size_t>(v)] = static_cast<u8>(v);
  for (DType d : {DType::f64, DType::f32, DType::bf16, DType::f16, DType::f8_e4m3}) {
    std::vector<u8> dst(256 * dtype_size(d)), want(dst.size());
    convert(src.data(), DType::f8_e5m2, dst.data(), d, 256);
    for (std::size_t i = 0; i < 256; ++i) {
      const float x = e5m2_to_f32(src[i]);
      u8* w = want.data() + i * dtype_size(d);
      switch (d) {
        case DType::f64: { const double y = x; std::memcpy(w, &y, 8); break; }
        case DType::f32: std::memcpy(w, &x, 4); break;
        case DType::bf16: { const u16 h = f32_to_bf16(x); std::memcpy(w, &h, 2); break; }
        case DType::f16: { const u16 h = f32_to_f16(x); std::memcpy(w, &h, 2); break; }
        default: *w = f32_to_e4m3(x); break;
      }
      EXPECT_EQ(bits(load_as_f32(src.data(), DType::f8_e5m2, i)), bits(x)) << i;
    }
    EXPECT_EQ(dst, want) << "e5m2 -> " << dtype_name(d);
  }
  // To fp16 it is exact: the byte is the top byte of the fp16.
  std::array<u16, 256> h{};
  convert(src.data(), DType::f8_e5m2, h.data(), DType::f16, 256);
  for (int v = 0; v < 256; ++v)
    if ((v & 0x7f) <= 0x7c) EXPECT_EQ(h[static_cast<std::size_t>(v)], v << 8) << v;
  EXPECT_THROW(convert(h.data(), DType::f32, src.data(), DType::f8_e5m2, 1), Error);
}

TEST(DTypeConvert, E4m3RoundTripsEveryBitPattern) {
  for (int v = 0; v < 256; ++v) {
    // Finite values come back exactly; NaN comes back as 0x7F / 0xFF (sign kept).
    EXPECT_EQ(f32_to_e4m3(e4m3_to_f32(static_cast<u8>(v))), v) << v;
  }
  EXPECT_TRUE(e4m3_is_nan(0x7f));
  EXPECT_TRUE(e4m3_is_nan(0xff));
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0xff)));
}

// ------------------------------------------------------------- exhaustive RNE checks

// Whether fp32 -> fp16 of pattern u agrees with the F16C instruction (NaN: any NaN).
bool f16_matches_f16c(u32 u) {
  const float x = f(u);
  const u16 got = f32_to_f16(x);
  const u16 want = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
  // Branch-free form of: want is NaN ? got is NaN : got == want.
  return static_cast<bool>(static_cast<u32>(got == want) |
                           (static_cast<u32>(f16_is_nan(want)) & static_cast<u32>(f16_is_nan(got))));
}

TEST(DTypeConvert, Fp16RoundsEveryFloatLikeTheF16cInstruction) {
  std::vector<u32> first;
  const u64 fails = count_failures_over_all_u32(
      f16_matches_f16c,
      [](u32 begin, u32 count) __attribute__((flatten)) {  // flatten: inline the conversion
        u64 bad = 0;
        for (u32 i = 0; i < count; ++i) bad += f16_matches_f16c(begin + i) ? 0 : 1;
        return bad;
      },
      &first);
  EXPECT_EQ(fails, 0u) << "first failing fp32 patterns: " << hex_list(first);
}

TEST(DTypeConvert, Bf16RoundsEveryFloatToTheNearestEven) {
  std::vector<u32> first;
  const u64 fails = count_failures_over_all_u32(
      [](u32 u) {
        const float x = f(u);
        const u16 got = f32_to_bf16(x);
        const u16 want = reference_bf16(x);
        return bf16_is_nan(want) ? bf16_is_nan(got) : got == want;
      },
      [](u32 begin, u32 count) __attribute__((flatten)) {
        // reference_bf16 with its neighbours lo, hi computed once per 2^16 floats that
        // share them (the same top 16 bits).
        u64 bad = 0;
        for (u32 top = begin >> 16; top < (begin >> 16) + (count >> 16); ++top) {
          const u16 sign = static_cast<u16>(top & 0x8000u);
          const u16 lo = static_cast<u16>(top & 0x7fffu);
          const u32 base = top << 16;
          if (lo >= 0x7f80) {  // +-inf (low bits 0) and NaN
            if (lo == 0x7f80) bad += f32_to_bf16(f(base)) == (sign | 0x7f80) ? 0 : 1;
            for (u32 low = lo == 0x7f80 ? 1 : 0; low < 65536; ++low)
              bad += bf16_is_nan(f32_to_bf16(f(base | low))) ? 0 : 1;
            continue;
          }
          const u16 hi = static_cast<u16>(lo + 1);
          const double dlo = bf16_to_f32(lo);
          const double dhi =
              hi == 0x7f80 ? std::ldexp(1.0, 128) : static_cast<double>(bf16_to_f32(hi));
          const u16 tie = (lo & 1) ? hi : lo;
          for (u32 low = 0; low < 65536; ++low) {
            const double a = std::fabs(static_cast<double>(f(base | low)));
            const double below = a - dlo, above = dhi - a;
            const u16 want = sign | (below < above ? lo : above < below ? hi : tie);
            bad += static_cast<u32>(f32_to_bf16(f(base | low)) != want);
          }
        }
        return bad;
      },
      &first);
  EXPECT_EQ(fails, 0u) << "first failing fp32 patterns: " << hex_list(first);
}

TEST(DTypeConvert, Bf16HandlesNanInfOverflowAndSubnormals) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f32_to_bf16(inf), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-inf), 0xff80);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to inf
  EXPECT_EQ(f32_to_bf16(f(0x7f7f7fff)), 0x7f7f);                    // just below the tie
  EXPECT_EQ(f32_to_bf16(f(0x7f7f8000)), 0x7f80);                    // tie, odd -> inf
  EXPECT_EQ(f32_to_bf16(f(0xff7f8000)), 0xff80);
  EXPECT_EQ(f32_to_bf16(f(0x00008000)), 0x0000);  // subnormal tie -> even (zero)
  EXPECT_EQ(f32_to_bf16(f(0x00018000)), 0x0002);  // subnormal tie -> even
  EXPECT_EQ(f32_to_bf16(f(0x00008001)), 0x0001);
  EXPECT_EQ(f32_to_bf16(f(0x007fffff)), 0x0080);  // largest subnormal -> smallest normal
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  const u16 qnan = f32_to_bf16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(bf16_is_nan(qnan));
  EXPECT_EQ(qnan & 0x8000, 0);
  // A signalling NaN whose payload lies only in the discarded bits stays a NaN.
  EXPECT_TRUE(bf16_is_nan(f32_to_bf16(f(0x7f800001))));
  EXPECT_EQ(f32_to_bf16(f(0xff800001)) & 0x8000, 0x8000);
  EXPECT_EQ(f32_to_bf16(f(0xff800001)) & 0x0040, 0x0040);  // quiet
}

TEST(DTypeConvert, Fp16HandlesNanInfOverflowAndSubnormals) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f32_to_f16(inf), 0x7c00);
  EXPECT_EQ(f32_to_f16(-inf), 0xfc00);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65519.996f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);
  EXPECT_EQ(f32_to_f16(-1e10f), 0xfc00);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // tie -> even
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 ulp tie -> even
  EXPECT_EQ(f32_to_f16(-std::ldexp(1.0f, -25) * 1.0000001f), 0x8001);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_TRUE(f16_is_nan(f32_to_f16(f(0x7f800001))));
  EXPECT_EQ(f32_to_f16(f(0xff800001)) & 0x8200, 0x8200);  // sign kept, quiet
}

TEST(DTypeConvert, E4m3RoundsToTheNearestEvenAndSaturates) {
  // Every float in [-600, 600] whose bit pattern is a multiple of 97 (~23.5 million).
  constexpr u64 kSamples = ((u64{1} << 32) + 96) / 97;
  constexpr u64 kChunk = u64{1} << 18;
  std::vector<u64> fails((kSamples + kChunk - 1) / kChunk, 0), checked(fails.size(), 0);
  tbb::parallel_for(std::size_t{0}, fails.size(), [&](std::size_t c) {
    const u64 end = std::min(kSamples, (c + 1) * kChunk);
    for (u64 k = c * kChunk; k < end; ++k) {
      const float x = f(static_cast<u32>(k * 97));
      if (!(std::fabs(x) <= 600.0f)) continue;
      ++checked[c];
      fails[c] += f32_to_e4m3(x) == reference_e4m3(x) ? 0 : 1;
    }
  });
  u64 total = 0, n_checked = 0;
  for (std::size_t c = 0; c < fails.size(); ++c) total += fails[c], n_checked += checked[c];
  EXPECT_EQ(total, 0u) << "of " << n_checked << " sampled floats";
  EXPECT_GT(n_checked, 20'000'000u);

  std::vector<float> xs;
  // Every e4m3 value, the midpoints between neighbours and the floats around them.
  const auto& v = e4m3_values();
  for (int c = 0; c < 127; ++c) {
    xs.push_back(static_cast<float>(v[c]));
    const double mid = c < 126 ? (v[c] + v[c + 1]) / 2 : 464.0;  // 464: midpoint to 480
    const float m = static_cast<float>(mid);
    ASSERT_EQ(static_cast<double>(m), mid);
    xs.push_back(m);
    xs.push_back(std::nextafter(m, 0.0f));
    xs.push_back(std::nextafter(m, 1e9f));
  }
  // Subnormals of fp32 and e4m3, zeros, infinities, NaN, huge values.
  for (float x : {0.0f, std::ldexp(1.0f, -149), std::ldexp(1.0f, -126), std::ldexp(1.0f, -10),
                  std::nextafter(std::ldexp(1.0f, -10), 1.0f), std::ldexp(1.0f, -6),
                  std::nextafter(std::ldexp(1.0f, -6), 0.0f), 448.0f, 449.0f, 479.0f, 480.0f,
                  1e6f, 1e30f, std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::quiet_NaN(), f(0x7f800001)})
    xs.push_back(x);
  const std::size_t n = xs.size();
  for (std::size_t i = 0; i < n; ++i) xs.push_back(-xs[i]);
  for (float x : xs)
    EXPECT_EQ(f32_to_e4m3(x), reference_e4m3(x)) << "x=" << x << " (0x" << std::hex << bits(x)
                                                 << ")";
  // Saturation, spelled out.
  EXPECT_EQ(f32_to_e4m3(std::numeric_limits<float>::infinity()), 0x7e);
  EXPECT_EQ(f32_to_e4m3(-std::numeric_limits<float>::infinity()), 0xfe);
  EXPECT_EQ(f32_to_e4m3(1e30f), 0x7e);
  EXPECT_EQ(f32_to_e4m3(-500.0f), 0xfe);
  EXPECT_EQ(f32_to_e4m3(std::numeric_limits<float>::quiet_NaN()), 0x7f);
  EXPECT_EQ(f32_to_e4m3(-std::numeric_limits<float>::quiet_NaN()), 0xff);
  EXPECT_EQ(f32_to_e4m3(-1e-10f), 0x80);
}

// ------------------------------------------------------------- stochastic rounding

// One narrow format seen through its code: encode (RNE and SR), decode, and the value a
// code stands for when rounding (inf counts as the next power of two).
struct Format {
  const char* name;
  u32 (*rne)(float);
  u32 (*sr)(float, u32);
  double (*value)(u32);  // of a non-negative code
  u32 sign_bit;
};

const Format kBf16{
    "bf16", [](float x) -> u32 { return f32_to_bf16(x); },
    [](float x, u32 r) -> u32 { return f32_to_bf16_sr(x, r); },
    [](u32 c) -> double { return c == 0x7f80 ? std::ldexp(1.0, 128) : bf16_to_f32(u16(c)); },
    0x8000};
const Format kF16{
    "fp16", [](float x) -> u32 { return f32_to_f16(x); },
    [](float x, u32 r) -> u32 { return f32_to_f16_sr(x, r); },
    [](u32 c) -> double { return c == 0x7c00 ? 65536.0 : f16_to_f32(u16(c)); }, 0x8000};
const Format kE4m3{
    "e4m3", [](float x) -> u32 { return f32_to_e4m3(x); },
    [](float x, u32 r) -> u32 { return f32_to_e4m3_sr(x, r); },
    [](u32 c) -> double { return e4m3_to_f32(u8(c)); }, 0x80};

// Rounds each x stochastically 2^20 times and checks that every result is one of the two
// neighbours lo < |x| < hi and that the mean is x within 5 standard errors.
void expect_unbiased(const Format& fmt, const std::vector<float>& xs) {
  constexpr int kN = 1 << 20;
  Rng rng(12345);
  for (float x : xs) {
    const double a = std::fabs(static_cast<double>(x));
    const u32 sign = std::signbit(x) ? fmt.sign_bit : 0;
    u32 lo = fmt.rne(std::fabs(x));
    if (fmt.value(lo) > a) --lo;
    const u32 hi = lo + 1;
    const double vlo = fmt.value(lo), vhi = fmt.value(hi);
    ASSERT_LT(vlo, a) << fmt.name << " x=" << x << " must not be representable";
    ASSERT_GT(vhi, a) << fmt.name << " x=" << x;
    const double p = (a - vlo) / (vhi - vlo);
    u64 ups = 0;
    for (int i = 0; i < kN; ++i) {
      const u32 c = fmt.sr(x, rng.next());
      if (c == (sign | hi)) {
        ++ups;
      } else {
        ASSERT_EQ(c, sign | lo) << fmt.name << " x=" << x;
      }
    }
    // mean = sign * (vlo + (vhi - vlo) * ups / N); its standard error
    // (vhi - vlo) * sqrt(p (1 - p) / N).
    const double mean_minus_x = (vhi - vlo) * (static_cast<double>(ups) / kN - p);
    const double se = (vhi - vlo) * std::sqrt(p * (1 - p) / kN);
    EXPECT_LE(std::fabs(mean_minus_x), 5 * se)
        << fmt.name << " x=" << x << " p=" << p << " ups=" << ups;
  }
}

TEST(DTypeConvert, Bf16StochasticRoundingIsUnbiased) {
  expect_unbiased(kBf16, {1.0f + std::ldexp(1.0f, -10), 3.14159265f, -2.7182818f, 1e-3f, -0.1f,
                          1e-39f,                  // subnormal
                          std::ldexp(1.0f, -149),  // smallest fp32 subnormal, p = 2^-16
                          -1e-40f, 3.3e38f,        // near the largest finite bf16
                          3.39e38f});              // beyond it: max or inf
}

TEST(DTypeConvert, Fp16StochasticRoundingIsUnbiased) {
  expect_unbiased(kF16, {1.0f + std::ldexp(1.0f, -12), 0.3f, -1234.567f, 1e-7f, 3e-5f,
                         std::nextafter(std::ldexp(1.0f, -14), 0.0f),  // below min normal
                         1e-9f, -2e-8f, 1e-12f, 65500.0f, -65503.0f,
                         65520.0f, 65535.0f});  // beyond 65504: max or inf
}

TEST(DTypeConvert, E4m3StochasticRoundingIsUnbiased) {
  expect_unbiased(kE4m3, {1.1f, 0.3f, -3.7f, 440.0f, -300.0f, 0.003f, 1e-4f, -0.0155f, 1e-6f,
                          std::ldexp(1.0f, -10)});
}

TEST(DTypeConvert, StochasticRoundingKeepsRepresentableValues) {
  std::vector<u32> rs = {0u, 1u, 0x7fffffffu, 0x80000000u, 0xfffffffeu, 0xffffffffu};
  Rng rng(7);
  while (rs.size() < 64) rs.push_back(rng.next());
  for (u32 c = 0; c < 65536; ++c) {
    if (!bf16_is_nan(u16(c))) {
      const float x = bf16_to_f32(u16(c));
      for (u32 r : rs) ASSERT_EQ(f32_to_bf16_sr(x, r), c) << std::hex << c << " r=" << r;
    }
    if (!f16_is_nan(u16(c))) {
      const float x = f16_to_f32(u16(c));
      for (u32 r : rs) ASSERT_EQ(f32_to_f16_sr(x, r), c) << std::hex << c << " r=" << r;
    }
  }
  for (u32 c = 0; c < 256; ++c) {
    if (e4m3_is_nan(u8(c))) continue;
    const float x = e4m3_to_f32(u8(c));
    for (u32 r : rs) ASSERT_EQ(f32_to_e4m3_sr(x, r), c) << std::hex << c << " r=" << r;
    for (int i = 0; i < 4096; ++i) ASSERT_EQ(f32_to_e4m3_sr(x, rng.next()), c);
  }
}

TEST(DTypeConvert, StochasticRoundingHandlesNanInfAndOverflow) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (u32 r : {0u, 0x12345678u, 0xffffffffu}) {
    EXPECT_EQ(f32_to_bf16_sr(inf, r), 0x7f80);
    EXPECT_EQ(f32_to_bf16_sr(-inf, r), 0xff80);
    EXPECT_TRUE(bf16_is_nan(f32_to_bf16_sr(nan, r)));
    EXPECT_TRUE(bf16_is_nan(f32_to_bf16_sr(f(0xff800001), r)));
    EXPECT_EQ(f32_to_bf16_sr(f(0xff800001), r) & 0x8000, 0x8000);
    EXPECT_EQ(f32_to_f16_sr(inf, r), 0x7c00);
    EXPECT_EQ(f32_to_f16_sr(-inf, r), 0xfc00);
    EXPECT_EQ(f32_to_f16_sr(65536.0f, r), 0x7c00);
    EXPECT_EQ(f32_to_f16_sr(-1e20f, r), 0xfc00);
    EXPECT_TRUE(f16_is_nan(f32_to_f16_sr(nan, r)));
    EXPECT_TRUE(f16_is_nan(f32_to_f16_sr(f(0x7f800001), r)));
    EXPECT_EQ(f32_to_e4m3_sr(inf, r), 0x7e);
    EXPECT_EQ(f32_to_e4m3_sr(-inf, r), 0xfe);
    EXPECT_EQ(f32_to_e4m3_sr(448.5f, r), 0x7e);
    EXPECT_EQ(f32_to_e4m3_sr(-1e30f, r), 0xfe);
    EXPECT_EQ(f32_to_e4m3_sr(nan, r), 0x7f);
    EXPECT_EQ(f32_to_e4m3_sr(-nan, r), 0xff);
    EXPECT_EQ(f32_to_f16_sr(-0.0f, r), 0x8000);
    EXPECT_EQ(f32_to_e4m3_sr(-0.0f, r), 0x80);
  }
  // r = 0 always rounds up an inexact value, r = 0xffffffff never (for a fraction below 1).
  EXPECT_EQ(f32_to_f16_sr(1.0f + std::ldexp(1.0f, -20), 0), 0x3c01);
  EXPECT_EQ(f32_to_f16_sr(1.0f + std::ldexp(1.0f, -20), 0xffffffffu), 0x3c00);
  EXPECT_EQ(f32_to_e4m3_sr(std::ldexp(1.0f, -30), 0), 0x01);
  EXPECT_EQ(f32_to_e4m3_sr(std::ldexp(1.0f, -30), 0xffffffffu), 0x00);
}

// ---------------------------------------------------------------- bulk conversion

constexpr std::array<DType, 5> kConvertible = {DType::f64, DType::f32, DType::bf16, DType::f16,
                                               DType::f8_e4m3};

// Element i of an array of type dt built from float x with the scalar functions.
void put(std::vector<unsigned char>& buf, std::size_t off, DType dt, std::size_t i, float x) {
  unsigned char* p = buf.data() + off + i * dtype_size(dt);
  switch (dt) {
    case DType::f64: { const double d = x; std::memcpy(p, &d, 8); break; }
    case DType::f32: std::memcpy(p, &x, 4); break;
    case DType::bf16: { const u16 h = f32_to_bf16(x); std::memcpy(p, &h, 2); break; }
    case DType::f16: { const u16 h = f32_to_f16(x); std::memcpy(p, &h, 2); break; }
    case DType::f8_e4m3: *p = f32_to_e4m3(x); break;
    default: FAIL();
  }
}

// The expected bytes of element i of dst: the scalar conversion of the source element.
void put_expected(std::vector<unsigned char>& out, DType src_dt, const unsigned char* src,
                  DType dst_dt, std::size_t i) {
  const std::size_t ss = dtype_size(src_dt), ds = dtype_size(dst_dt);
  unsigned char* p = out.data() + i * ds;
  if (src_dt == dst_dt) {
    std::memcpy(p, src + i * ss, ss);
    return;
  }
  if (dst_dt == DType::f64) {
    const double d = load_as_f32(src, src_dt, i);
    std::memcpy(p, &d, 8);
    return;
  }
  float x;  // source values are exact in fp32 except those f64 values beyond its range
  if (src_dt == DType::f64) {
    double d;
    std::memcpy(&d, src + i * 8, 8);
    x = static_cast<float>(d);
  } else {
    x = load_as_f32(src, src_dt, i);
  }
  std::vector<unsigned char> tmp(8);
  put(tmp, 0, dst_dt, 0, x);
  std::memcpy(p, tmp.data(), ds);
}

std::vector<float> sample_values(std::size_t n) {
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, 0.1f, -0.3f, 65504.0f, 65520.0f, 70000.0f,
                          1e-7f, 1e-40f, 448.0f, 500.0f, -1e30f, 3e38f,
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(), 1.0f + std::ldexp(1.0f, -8),
                          1.0f + std::ldexp(3.0f, -8), std::ldexp(1.0f, -10)};
  Rng rng(99);
  while (v.size() < n) {
    const u32 r = rng.next();
    // Mostly moderate magnitudes, some arbitrary bit patterns.
    v.push_back((r & 7) == 0 ? f(rng.next())
                             : std::ldexp(static_cast<float>(rng.next() >> 8) / 16777216.0f - 0.5f,
                                          static_cast<int>(r % 40) - 20));
  }
  v.resize(n);
  return v;
}

void check_convert_pair(DType s, DType d, std::size_t n, const std::vector<double>& extra_f64) {
  const std::vector<float> vals = sample_values(n);
  const std::size_t ss = dtype_size(s), ds = dtype_size(d);
  // Offset by one byte: convert must not assume aligned elements.
  std::vector<unsigned char> src(1 + n * ss), dst(1 + n * ds, 0xAB), want(n * ds);
  for (std::size_t i = 0; i < n; ++i) put(src, 1, s, i, vals[i]);
  if (s == DType::f64)  // values beyond the fp32 range
    for (std::size_t i = 0; i < extra_f64.size() && i < n; ++i)
      std::memcpy(src.data() + 1 + (n - 1 - i) * 8, &extra_f64[i], 8);
  convert(src.data() + 1, s, dst.data() + 1, d, n);
  for (std::size_t i = 0; i < n; ++i) put_expected(want, s, src.data() + 1, d, i);
  for (std::size_t i = 0; i < n; ++i)
    ASSERT_EQ(std::memcmp(dst.data() + 1 + i * ds, want.data() + i * ds, ds), 0)
        << dtype_name(s) << " -> " << dtype_name(d) << " element " << i << " x=" << vals[i];
  EXPECT_EQ(dst[0], 0xAB);
}

TEST(DTypeConvert, ConvertMatchesTheScalarFunctionsForEveryPair) {
  const std::vector<double> beyond = {1e39, -1e300, 1e-50, -1e-300};
  for (DType s : kConvertible)
    for (DType d : kConvertible) check_convert_pair(s, d, 1001, beyond);
}

TEST(DTypeConvert, ConvertSplitsLargeArraysIntoChunks) {
  const std::size_t n = 3 * (std::size_t{1} << 16) + 12345;
  check_convert_pair(DType::f32, DType::bf16, n, {});
  check_convert_pair(DType::f64, DType::f16, n, {});
  check_convert_pair(DType::f8_e4m3, DType::f32, n, {});
}

TEST(DTypeConvert, ConvertFromF64RoundsOnlyOnce) {
  // 1 + 2^-8 + 2^-30 lies just above the bf16 tie 1 + 2^-8; rounding through fp32 (RNE)
  // would land on the tie and then on 1.0.
  const double xs[] = {1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30),
                       1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40),
                       1.0 + std::ldexp(1.0, -4) + std::ldexp(1.0, -35),
                       -(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30))};
  u16 b[4], h[4];
  u8 e[4];
  convert(xs, DType::f64, b, DType::bf16, 4);
  convert(xs, DType::f64, h, DType::f16, 4);
  convert(xs, DType::f64, e, DType::f8_e4m3, 4);
  EXPECT_EQ(b[0], 0x3f81);  // 1 + 2^-7
  EXPECT_EQ(h[1], 0x3c01);  // 1 + 2^-10
  EXPECT_EQ(e[2], 0x39);    // 1.125
  EXPECT_EQ(b[3], 0xbf81);
  // And exactly representable / out of range values behave as through static_cast.
  const double ys[] = {0.5, 1e39, -1e39, 1e-60};
  convert(ys, DType::f64, b, DType::bf16, 4);
  EXPECT_EQ(b[0], 0x3f00);
  EXPECT_EQ(b[1], 0x7f80);
  EXPECT_EQ(b[2], 0xff80);
  EXPECT_EQ(b[3], 0x0000);
  float g[4];
  convert(ys, DType::f64, g, DType::f32, 4);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(bits(g[i]), bits(static_cast<float>(ys[i])));
}

TEST(DTypeConvert, LoadAsF32ReadsSingleElements) {
  const unsigned char raw[9] = {0xAB, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xF0, 0x3F};
  EXPECT_EQ(load_as_f32(raw + 1, DType::f64, 0), 1.0f);  // unaligned
  const u16 h[3] = {0x3c00, 0xc000, 0x7c00};
  EXPECT_EQ(load_as_f32(h, DType::f16, 1), -2.0f);
  EXPECT_EQ(load_as_f32(h, DType::f16, 2), std::numeric_limits<float>::infinity());
  const u16 b[2] = {0x3f80, 0x4049};
  EXPECT_EQ(load_as_f32(b, DType::bf16, 1), bf16_to_f32(0x4049));
  const u8 e[2] = {0x7e, 0x01};
  EXPECT_EQ(load_as_f32(e, DType::f8_e4m3, 0), 448.0f);
  EXPECT_EQ(load_as_f32(e, DType::f8_e4m3, 1), std::ldexp(1.0f, -9));
  const float x[2] = {1.5f, -7.25f};
  EXPECT_EQ(load_as_f32(x, DType::f32, 1), -7.25f);
  const std::int32_t i32[1] = {3};
  EXPECT_THROW(load_as_f32(i32, DType::i32, 0), Error);
}

TEST(DTypeConvert, ConvertRejectsUnsupportedPairs) {
  float src[3] = {1, 2, 3};
  std::int32_t dst[3];
  try {
    convert(src, DType::f32, dst, DType::i32, 3);
    FAIL() << "no exception";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::unsupported);
    EXPECT_NE(std::string(e.what()).find("fp32"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("i32"), std::string::npos) << e.what();
  }
  EXPECT_THROW(convert(src, DType::f32, dst, DType::f8_e5m2, 0), Error);  // e5m2 is read, never written
  EXPECT_THROW(convert(src, DType::u8, dst, DType::bf16, 3), Error);
  EXPECT_THROW(convert(src, DType::f32, dst, DType::boolean, 3), Error);
}

}  // namespace
}  // namespace zo2
