// Ops::update_state (StateUpdateArgs in runtime/ops.h): the deferred update of
// zo-sgd-momentum and zo-adam, on every available backend through one test body (CPU
// always, CUDA when present), plus CUDA against the CPU twin bit for bit (skipped without
// a device). The element math is Note [State update arithmetic] in runtime/element.h.
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/device.h"
#include "runtime/dtype_convert.h"
#include "runtime/element.h"
#include "runtime/philox.h"
#include "tests/device_fixture.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace zo2 {
namespace {

std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// One stored tensor on the host: bytes in its dtype and, for fp8, per-row scales.
struct HostTensor {
  DType dtype = DType::f32;
  std::int64_t rows = 0, cols = 0;
  std::vector<std::uint8_t> bytes;
  std::vector<float> scales;

  // v rounded to nearest in dt (fp8: scale = row absmax / 448, as a checkpoint load does).
  static HostTensor from(const std::vector<float>& v, std::int64_t rows, std::int64_t cols, DType dt) {
    HostTensor t{dt, rows, cols, std::vector<std::uint8_t>(v.size() * dtype_size(dt)), {}};
    if (dt == DType::f8_e4m3) {
      t.scales.resize(static_cast<std::size_t>(rows));
      for (std::int64_t r = 0; r < rows; ++r) {
        float mx = 0;
        for (std::int64_t c = 0; c < cols; ++c) mx = std::max(mx, std::fabs(v[static_cast<std::size_t>(r * cols + c)]));
        const float s = fp8_row_scale(mx);
        t.scales[static_cast<std::size_t>(r)] = s;
        for (std::int64_t c = 0; c < cols; ++c)
          t.bytes[static_cast<std::size_t>(r * cols + c)] = f32_to_e4m3(v[static_cast<std::size_t>(r * cols + c)] / s);
      }
    } else {
      for (std::size_t i = 0; i < v.size(); ++i) store_element(t.bytes.data(), dt, static_cast<std::int64_t>(i), v[i]);
    }
    return t;
  }
  std::int64_t numel() const { return rows * cols; }
  float scale(std::int64_t e) const { return scales.empty() ? 1.0f : scales[static_cast<std::size_t>(e / cols)]; }
  float at(std::int64_t e) const { return load_element(bytes.data(), dtype, e, scale(e)); }
  std::vector<float> values() const {
    std::vector<float> v(static_cast<std::size_t>(numel()));
    for (std::int64_t e = 0; e < numel(); ++e) v[static_cast<std::size_t>(e)] = at(e);
    return v;
  }
  // The tensor's values re-stored as fp32 (the "wide" twin of a narrow tensor).
  HostTensor as_f32() const { return from(values(), rows, cols, DType::f32); }
  StoredTensor view(std::uint64_t key) {
    return {bytes.data(), dtype, scales.empty() ? nullptr : scales.data(), rows, cols, key};
  }
  bool operator==(const HostTensor&) const = default;
};

// W, m and (Adam) v of one weight.
struct State {
  HostTensor w, m;
  std::optional<HostTensor> v;
  bool operator==(const State&) const = default;
};

constexpr std::uint64_t kKey = 0x5EEDF00Dull;

State make_state(std::int64_t rows, std::int64_t cols, DType wdt, DType sdt, bool adam, std::uint32_t seed,
                 bool zero_state = false) {
  const std::size_t n = static_cast<std::size_t>(rows * cols);
  State s;
  s.w = HostTensor::from(random_floats(n, seed), rows, cols, wdt);
  s.m = HostTensor::from(zero_state ? std::vector<float>(n) : random_floats(n, seed + 1, 0.3f), rows, cols, sdt);
  if (adam) {
    std::vector<float> v = zero_state ? std::vector<float>(n) : random_floats(n, seed + 2, 0.2f);
    for (float& x : v) x = x * x;  // v ≥ 0
    s.v = HostTensor::from(v, rows, cols, sdt);
  }
  return s;
}

// One call's hyper-parameters (the host computes the bias corrections for step t).
StateUpdateArgs make_args(bool adam, int q, std::uint64_t seed, int t, float lr, float wd) {
  StateUpdateArgs a;
  a.directions = q;
  for (int j = 0; j < q; ++j) a.seeds[j] = seed * 1000 + static_cast<std::uint64_t>(j) * 7 + 1;
  a.lr = lr;
  a.weight_decay = wd;
  a.adam = adam;
  a.beta1 = 0.9f;
  a.beta2 = 0.999f;
  a.adam_eps = 1e-8f;
  a.bias1 = adam ? 1.0f - std::pow(a.beta1, static_cast<float>(t)) : 1.0f;
  a.bias2 = adam ? 1.0f - std::pow(a.beta2, static_cast<float>(t)) : 1.0f;
  a.rounding_seed = seed + 99;
  return a;
}

std::vector<float> make_g(int q, std::uint32_t seed) { return random_floats(static_cast<std::size_t>(q), seed, 3.0f); }

// Runs update_state on a device: uploads s (data shifted by `misalign` elements, to reach
// the unvectorized paths), runs — on the whole tensors, or with tile_rows > 0 on tiles of
// that many rows (StoredTensor::first_row), one call per tile — downloads.
State run_on(Device& device, Stream& stream, State s, StateUpdateArgs a, const std::vector<float>& g,
             std::int64_t misalign = 0, std::int64_t tile_rows = 0) {
  std::vector<DeviceBuffer> keep;
  auto up = [&](const void* p, std::size_t bytes, std::size_t offset) -> char* {
    keep.push_back(device.arena().allocate(bytes + offset + 16, "update_state test"));
    char* d = static_cast<char*>(keep.back().data()) + offset;
    if (bytes > 0) stream.copy_h2d(d, p, bytes);
    return d;
  };
  auto dev_tensor = [&](HostTensor& t) {
    StoredTensor st{up(t.bytes.data(), t.bytes.size(), static_cast<std::size_t>(misalign) * dtype_size(t.dtype)),
                    t.dtype, nullptr, t.rows, t.cols, kKey};
    if (!t.scales.empty()) st.row_scales = reinterpret_cast<float*>(up(t.scales.data(), t.scales.size() * 4, 0));
    return st;
  };
  const StoredTensor w = dev_tensor(s.w), m = dev_tensor(s.m);
  std::optional<StoredTensor> v;
  if (s.v) v = dev_tensor(*s.v);
  a.g = reinterpret_cast<const float*>(up(g.data(), g.size() * 4, 0));
  stream.synchronize();
  if (tile_rows == 0) {
    device.ops().update_state(stream, w, m, v ? &*v : nullptr, a);
  } else {
    for (std::int64_t r0 = 0; r0 < w.rows; r0 += tile_rows) {
      const std::int64_t r1 = std::min(w.rows, r0 + tile_rows);
      std::optional<StoredTensor> vt;
      if (v) vt = test::tile(*v, r0, r1);
      device.ops().update_state(stream, test::tile(w, r0, r1), test::tile(m, r0, r1), vt ? &*vt : nullptr, a);
    }
  }
  auto down = [&](HostTensor& t, const StoredTensor& st) {
    if (!t.bytes.empty()) stream.copy_d2h(t.bytes.data(), st.data, t.bytes.size());
    if (!t.scales.empty()) stream.copy_d2h(t.scales.data(), st.row_scales, t.scales.size() * 4);
  };
  down(s.w, w);
  down(s.m, m);
  if (s.v) down(*s.v, *v);
  stream.synchronize();
  return s;
}

// The plain double-precision reference of ops.h's formulas (torch.optim.SGD with momentum
// and dampening 0; torch.optim.Adam with L2 weight decay), z being the kernels' normals.
struct Reference {
  std::vector<double> w, m, v;
  void step(const StateUpdateArgs& a, const std::vector<float>& g) {
    for (std::size_t e = 0; e < w.size(); ++e) {
      double u = static_cast<double>(a.weight_decay) * w[e];
      for (int j = 0; j < a.directions; ++j)
        u += static_cast<double>(g[static_cast<std::size_t>(j)]) / a.directions * noise_normal(a.seeds[j], kKey, e);
      if (!a.adam) {
        m[e] = static_cast<double>(a.beta1) * m[e] + u;
        w[e] -= static_cast<double>(a.lr) * m[e];
      } else {
        m[e] = static_cast<double>(a.beta1) * m[e] + (1.0 - static_cast<double>(a.beta1)) * u;
        v[e] = static_cast<double>(a.beta2) * v[e] + (1.0 - static_cast<double>(a.beta2)) * u * u;
        const double denom = std::sqrt(v[e]) / std::sqrt(static_cast<double>(a.bias2)) + a.adam_eps;
        w[e] -= static_cast<double>(a.lr) / a.bias1 * m[e] / denom;
      }
    }
  }
};

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// max |a − b| / max |b|.
double max_rel(const std::vector<float>& a, const std::vector<double>& b) {
  double err = 0, ref = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    err = std::max(err, std::fabs(a[i] - b[i]));
    ref = std::max(ref, std::fabs(b[i]));
  }
  return ref > 0 ? err / ref : err;
}

std::string combo(DType wdt, DType sdt, bool adam) {
  return std::string(dtype_name(wdt)) + " W, " + std::string(dtype_name(sdt)) + " state, " + (adam ? "adam" : "momentum");
}

constexpr DType kWeightDtypes[] = {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3};
constexpr DType kStateDtypes[] = {DType::f32, DType::bf16, DType::f8_e4m3};

class StateUpdateTest : public test::BackendTest {
 protected:
  State run(const State& s, const StateUpdateArgs& a, const std::vector<float>& g, std::int64_t misalign = 0,
            std::int64_t tile_rows = 0) {
    return run_on(*device, *stream, s, a, g, misalign, tile_rows);
  }
};

// (1) fp32 weights and state over consecutive calls against the double reference. Not bit
// for bit: the kernel rounds every operation to fp32 (Note [State update arithmetic]) and
// the reference rounds nothing, so they drift apart by a few fp32 ulps per step; 1e-5 of
// the largest value is ~80 ulps, far below the size of one update (~1e-3 of the values).
TEST_P(StateUpdateTest, Fp32MomentumAndAdamFollowTheDoubleReferenceOverSteps) {
  const std::int64_t R = 6, C = 45;  // groups of four straddle rows
  for (bool adam : {false, true}) {
    State s = make_state(R, C, DType::f32, DType::f32, adam, 11, /*zero_state=*/true);
    Reference ref{to_double(s.w.values()), to_double(s.m.values()), adam ? to_double(s.v->values()) : std::vector<double>{}};
    const std::vector<float> w0 = s.w.values();
    const int qs[] = {1, 3, 1, 3, 3};
    for (int t = 1; t <= 5; ++t) {
      const int q = qs[t - 1];
      const StateUpdateArgs a = make_args(adam, q, 40 + static_cast<std::uint64_t>(t), t, adam ? 2e-3f : 1e-2f, 0.05f);
      const std::vector<float> g = make_g(q, 100 + static_cast<std::uint32_t>(t));
      s = run(s, a, g);
      ref.step(a, g);
      EXPECT_LT(max_rel(s.w.values(), ref.w), 1e-5) << (adam ? "adam" : "momentum") << " W after step " << t;
      EXPECT_LT(max_rel(s.m.values(), ref.m), 1e-5) << (adam ? "adam" : "momentum") << " m after step " << t;
      if (adam) {
        EXPECT_LT(max_rel(s.v->values(), ref.v), 1e-5) << "adam v after step " << t;
      }
    }
    // The updates are far larger than the tolerance (the test would notice a missing step).
    EXPECT_GT(max_rel(w0, ref.w), 1e-3);
  }
}

// Momentum with β1 = 0 from m = 0 and q = 1 is the plain ZO-SGD update, bit for bit, in
// every weight dtype (the same u, the same W rounding stream and fp8 rescaling).
TEST_P(StateUpdateTest, MomentumWithoutMomentumIsTheSgdUpdateBitForBit) {
  const std::int64_t R = 5, C = 37;
  for (DType wdt : kWeightDtypes) {
    State s = make_state(R, C, wdt, DType::f32, false, 21, /*zero_state=*/true);
    StateUpdateArgs a = make_args(false, 1, 7, 1, 1e-2f, 0.1f);
    a.beta1 = 0.0f;
    const std::vector<float> g{-2.5f};
    const State out = run(s, a, g);

    // The same weight through Ops::update on this backend.
    const HostTensor& w = s.w;
    DeviceBuffer dg = upload(g), dw = upload(w.bytes), dsc;
    if (!w.scales.empty()) dsc = upload(w.scales);
    const StoredTensor st{dw.data(), wdt, w.scales.empty() ? nullptr : dsc.as<float>(), R, C, kKey};
    const UpdateArgs ua{a.seeds[0], a.lr, a.weight_decay, dg.as<float>(), a.rounding_seed};
    ops().update(*stream, st, ua);
    EXPECT_EQ(download<std::uint8_t>(dw, w.bytes.size()), out.w.bytes) << dtype_name(wdt);
    if (!w.scales.empty()) {
      EXPECT_EQ(download<float>(dsc, w.scales.size()), out.w.scales) << dtype_name(wdt);
    }
  }
}

// (2) Narrow W and state: every stored value is one of the two neighbours of the fp32
// result (the same update run on fp32 copies of the same values), chosen by the bits of its
// own stream — rounding (W), state_m, state_v from (rounding_seed, W's key) — and fp8 rows
// get the new scale absmax/448 of that fp32 row. Stochastic rounding is unbiased: the mean
// of (stored − fp32)/(gap between the neighbours) over ~16k elements is ~0.
TEST_P(StateUpdateTest, NarrowDtypesRoundStochasticallyWithinOneStepAndUnbiased) {
  const std::int64_t R = 64, C = 257;
  for (DType wdt : kWeightDtypes)
    for (DType sdt : kStateDtypes)
      for (bool adam : {false, true}) {
        if (wdt == DType::f32 && sdt == DType::f32) continue;
        const std::string what = combo(wdt, sdt, adam);
        const State s = make_state(R, C, wdt, sdt, adam, 31);
        State wide{s.w.as_f32(), s.m.as_f32(), {}};
        if (adam) wide.v = s.v->as_f32();
        const StateUpdateArgs a = make_args(adam, 3, 5, 4, 1e-3f, 0.01f);
        const std::vector<float> g = make_g(3, 77);
        const State narrow = run(s, a, g);
        const State exact = run(wide, a, g);

        auto check = [&](const HostTensor& out, const HostTensor& ex, NoiseDomain domain, const char* name) {
          const std::size_t es = dtype_size(out.dtype);
          double bias_sum = 0;
          std::int64_t inexact = 0;
          for (std::int64_t r = 0; r < R; ++r) {
            float absmax = 0;
            for (std::int64_t c = 0; c < C; ++c) absmax = std::max(absmax, std::fabs(ex.at(r * C + c)));
            const float scale = out.dtype == DType::f8_e4m3 ? fp8_row_scale(absmax) : 1.0f;
            if (out.dtype == DType::f8_e4m3) {
              ASSERT_EQ(out.scales[static_cast<std::size_t>(r)], scale) << what << " " << name << " row " << r;
            }
            for (std::int64_t c = 0; c < C; ++c) {
              const std::int64_t e = r * C + c;
              const float x = out.dtype == DType::f8_e4m3 ? ex.at(e) / scale : ex.at(e);
              std::uint8_t lo[4], hi[4], want[4];
              store_element_sr(lo, out.dtype, 0, x, 0xFFFFFFFFu);  // never rounds up
              store_element_sr(hi, out.dtype, 0, x, 0u);           // rounds up whenever inexact
              const Philox4 b = noise_bits(a.rounding_seed, kKey, static_cast<std::uint64_t>(e / 4), domain);
              const std::uint32_t bits[4] = {b.x, b.y, b.z, b.w};
              store_element_sr(want, out.dtype, 0, x, bits[e % 4]);
              const std::uint8_t* got = out.bytes.data() + static_cast<std::size_t>(e) * es;
              ASSERT_TRUE(std::memcmp(got, lo, es) == 0 || std::memcmp(got, hi, es) == 0)
                  << what << " " << name << " element " << e << " is not a neighbour of " << x;
              ASSERT_EQ(std::memcmp(got, want, es), 0) << what << " " << name << " element " << e << ": wrong bits";
              const float flo = load_element(lo, out.dtype, 0, 1.0f), fhi = load_element(hi, out.dtype, 0, 1.0f);
              if (flo != fhi) {
                bias_sum += (static_cast<double>(load_element(got, out.dtype, 0, 1.0f)) - x) / (static_cast<double>(fhi) - flo);
                ++inexact;
              }
            }
          }
          if (inexact > 4000) {
            EXPECT_LT(std::fabs(bias_sum / static_cast<double>(inexact)), 0.03)
                << what << " " << name << ": biased rounding over " << inexact << " elements";
          }
        };
        if (wdt != DType::f32) check(narrow.w, exact.w, NoiseDomain::rounding, "W");
        else EXPECT_EQ(narrow.w.values(), exact.w.values()) << what;
        if (sdt != DType::f32) {
          check(narrow.m, exact.m, NoiseDomain::state_m, "m");
          if (adam) check(*narrow.v, *exact.v, NoiseDomain::state_v, "v");
        } else {
          EXPECT_EQ(narrow.m.values(), exact.m.values()) << what;
          if (adam) {
            EXPECT_EQ(narrow.v->values(), exact.v->values()) << what;
          }
        }
      }
}

// (2b) Updates below half a step of the narrow dtype survive in the mean (round-to-nearest
// would drop them all): W = m = 1 everywhere, momentum with β1 = 1, so m' = 1 + g·z and
// W' = 1 − lr·m' move every element by ~0.3 of a step. Σ (stored − 1)·sign(exact − 1) over
// Σ |exact − 1| must be ~1 (σ ≈ 1.5% here); round-to-nearest would give 0.
TEST_P(StateUpdateTest, SubStepUpdatesSurviveInTheMean) {
  const std::int64_t R = 32, C = 513;
  const std::size_t n = static_cast<std::size_t>(R * C);
  for (DType wdt : {DType::bf16, DType::f16})
    for (DType sdt : {DType::f32, DType::bf16}) {
      const std::string what = combo(wdt, sdt, false);
      const float w_step = wdt == DType::bf16 ? 0x1p-8f : 0x1p-11f;  // the gap just below 1
      State s{HostTensor::from(std::vector<float>(n, 1.0f), R, C, wdt),
              HostTensor::from(std::vector<float>(n, 1.0f), R, C, sdt), {}};
      StateUpdateArgs a = make_args(false, 1, 13, 1, 0.3f * w_step, 0.0f);
      a.beta1 = 1.0f;
      const std::vector<float> g{0.3f * 0x1p-8f};  // m moves by ~0.3 of a bf16 step
      const State out = run(s, a, g);
      const State exact = run(State{s.w.as_f32(), s.m.as_f32(), {}}, a, g);
      auto ratio = [&](const HostTensor& got, const HostTensor& ex) {
        double moved = 0, want = 0;
        for (std::int64_t e = 0; e < R * C; ++e) {
          const double d = static_cast<double>(ex.at(e)) - 1.0;
          moved += (static_cast<double>(got.at(e)) - 1.0) * (d > 0 ? 1.0 : -1.0);
          want += std::fabs(d);
        }
        return moved / want;
      };
      EXPECT_NEAR(ratio(out.w, exact.w), 1.0, 0.1) << what << ": W";
      if (sdt != DType::f32) {
        EXPECT_NEAR(ratio(out.m, exact.m), 1.0, 0.1) << what << ": m";
      }
    }
}

// (3) A non-finite g (any of the directions) leaves W, m, v and the row scales unchanged.
TEST_P(StateUpdateTest, NonFiniteGLeavesEverythingBitIdentical) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (DType wdt : kWeightDtypes)
    for (DType sdt : kStateDtypes)
      for (bool adam : {false, true}) {
        const State s = make_state(5, 23, wdt, sdt, adam, 41);
        for (const std::vector<float>& g : {std::vector<float>{nan}, std::vector<float>{0.5f, inf, 1.0f},
                                            std::vector<float>{0.5f, 1.0f, -inf}}) {
          const StateUpdateArgs a = make_args(adam, static_cast<int>(g.size()), 3, 2, 1e-2f, 0.1f);
          EXPECT_TRUE(run(s, a, g) == s) << combo(wdt, sdt, adam) << ", q = " << g.size();
        }
      }
}

// (4) The same inputs give the same bits, on tensors of several chunks (CPU) and rows.
TEST_P(StateUpdateTest, RepeatedRunsGiveTheSameBits) {
  for (DType wdt : kWeightDtypes)
    for (DType sdt : kStateDtypes)
      for (bool adam : {false, true}) {
        const bool fp8 = wdt == DType::f8_e4m3 || sdt == DType::f8_e4m3;
        const std::int64_t R = fp8 ? 40 : 3, C = fp8 ? 523 : 7001;  // 3·7001 > one CPU chunk
        const State s = make_state(R, C, wdt, sdt, adam, 51);
        const StateUpdateArgs a = make_args(adam, 3, 9, 3, 1e-2f, 0.1f);
        const std::vector<float> g = make_g(3, 52);
        const State first = run(s, a, g), second = run(s, a, g);
        EXPECT_TRUE(first == second) << combo(wdt, sdt, adam);
        EXPECT_FALSE(first == s) << combo(wdt, sdt, adam) << ": nothing changed";
      }
}

// (5) Sub-block streaming (StoredTensor::first_row): updating W, m and v tile by tile
// equals updating them whole, bit for bit — the z draws of both directions and the three
// rounding streams at the whole tensor's indices, and the fp8 row scales. Tiles start on a
// group of four (r0·cols % 4 == 0); each tiling ends with a partial tile. 13 columns: groups
// straddle rows and tiles start on rows ≡ 0 mod 4; 6 columns: even rows; 260 columns: a tile
// spans several CPU chunks.
TEST_P(StateUpdateTest, TileByTileEqualsTheWholeTensorBitForBit) {
  struct Tiling {
    std::int64_t rows, cols, tile;
  };
  for (const Tiling& t : {Tiling{148, 13, 40}, Tiling{150, 6, 18}, Tiling{148, 260, 100}})
    for (DType wdt : kWeightDtypes)
      for (DType sdt : kStateDtypes)
        for (bool adam : {false, true}) {
          const State s = make_state(t.rows, t.cols, wdt, sdt, adam, 71);
          const StateUpdateArgs a = make_args(adam, 2, 13, 2, 1e-2f, 0.05f);
          const std::vector<float> g = make_g(2, 72);
          const State whole = run(s, a, g), tiled = run(s, a, g, 0, t.tile);
          const std::string what = combo(wdt, sdt, adam) + ", " + std::to_string(t.cols) + " columns";
          EXPECT_FALSE(whole == s) << what << ": nothing changed";
          EXPECT_TRUE(tiled.w == whole.w) << what << ": W";
          EXPECT_TRUE(tiled.m == whole.m) << what << ": m";
          if (adam) {
            EXPECT_TRUE(*tiled.v == *whole.v) << what << ": v";
          }
        }
}

TEST_P(StateUpdateTest, BadArgumentsAreInternalErrors) {
  State s = make_state(4, 8, DType::f32, DType::f32, true, 61);
  DeviceBuffer dw = upload(s.w.bytes), dm = upload(s.m.bytes), dv = upload(s.v->bytes), dg = upload(std::vector<float>{1.0f});
  const StoredTensor w{dw.data(), DType::f32, nullptr, 4, 8, kKey}, m{dm.data(), DType::f32, nullptr, 4, 8, kKey},
      v{dv.data(), DType::f32, nullptr, 4, 8, kKey}, m_bad{dm.data(), DType::f32, nullptr, 8, 4, kKey};
  StateUpdateArgs a = make_args(true, 1, 1, 1, 1e-3f, 0.0f);
  a.g = dg.as<float>();
  auto expect_internal = [&](auto fn, const char* what) {
    const Error e = test::error_of(fn);
    EXPECT_EQ(e.kind(), ErrorKind::internal) << what << ": " << e.what();
    EXPECT_NE(std::string(e.what()).find("update_state"), std::string::npos) << e.what();
  };
  expect_internal([&] { ops().update_state(*stream, w, m_bad, &v, a); }, "m shape");
  expect_internal([&] { ops().update_state(*stream, w, m, &m_bad, a); }, "v shape");
  expect_internal([&] { ops().update_state(*stream, w, m, nullptr, a); }, "Adam without v");
  StateUpdateArgs b = a;
  b.adam = false;
  expect_internal([&] { ops().update_state(*stream, w, m, &v, b); }, "momentum with v");
  for (int q : {0, StateUpdateArgs::kMaxDirections + 1}) {
    b = a;
    b.directions = q;
    expect_internal([&] { ops().update_state(*stream, w, m, &v, b); }, "directions");
  }
  // Tiles: W's must start on a group of four; m and v must be tiles of the same rows.
  const StoredTensor w6{dw.data(), DType::f32, nullptr, 4, 6, kKey}, m6{dm.data(), DType::f32, nullptr, 4, 6, kKey},
      v6{dv.data(), DType::f32, nullptr, 4, 6, kKey};
  const StoredTensor v6_off = test::tile(v6, 1, 3);
  expect_internal([&] { ops().update_state(*stream, test::tile(w6, 1, 3), test::tile(m6, 1, 3), &v6_off, a); },
                  "tile off a group");
  const StoredTensor v6_tile = test::tile(v6, 0, 2);
  expect_internal([&] { ops().update_state(*stream, test::tile(w6, 2, 4), test::tile(m6, 2, 4), &v6_tile, a); },
                  "v from other rows");
  StateUpdateArgs momentum = a;
  momentum.adam = false;
  expect_internal([&] { ops().update_state(*stream, test::tile(w6, 2, 4), test::tile(m6, 0, 2), nullptr, momentum); },
                  "m from other rows");
}

INSTANTIATE_TEST_SUITE_P(Backends, StateUpdateTest, ::testing::ValuesIn(test::backend_names()),
                         test::backend_test_name);

// (6) CUDA against the CPU twin, bit for bit: every weight × state dtype, momentum and
// Adam, q = 1, 3 and 64, two consecutive calls; aligned (vectorized) and misaligned data;
// fp8 rows with their values kept in shared memory and regenerated, and a row too wide to
// keep. Skips without a CUDA device.
class StateUpdateCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
    DeviceOptions o;
    o.kind = DeviceKind::cuda;
    o.mem_cap = std::size_t{512} << 20;
    device = make_device(o);
    stream = device->make_stream("test");
  }
  void TearDown() override {
    if (stream) stream->synchronize();
    stream.reset();
  }
  // Two calls on the device and on the CPU twin; both sides must stay identical.
  void expect_twins(State s, bool adam, int q, std::int64_t misalign, const std::string& what) {
    State host = s;
    for (int t = 1; t <= 2; ++t) {
      const StateUpdateArgs a = make_args(adam, q, 70 + static_cast<std::uint64_t>(t), t, 1e-2f, 0.05f);
      std::vector<float> g = make_g(q, 80 + static_cast<std::uint32_t>(t));
      s = run_on(*device, *stream, s, a, g, misalign);
      StateUpdateArgs ha = a;
      ha.g = g.data();
      std::optional<StoredTensor> hv;
      if (host.v) hv = host.v->view(kKey);
      cpu::update_state(host.w.view(kKey), host.m.view(kKey), hv ? &*hv : nullptr, ha);
      ASSERT_TRUE(s.w == host.w) << what << ", W after call " << t;
      ASSERT_TRUE(s.m == host.m) << what << ", m after call " << t;
      if (adam) {
        ASSERT_TRUE(*s.v == *host.v) << what << ", v after call " << t;
      }
    }
  }
  std::unique_ptr<Device> device;
  std::unique_ptr<Stream> stream;
};

TEST_F(StateUpdateCudaTest, CudaEqualsTheCpuTwinBitForBitForEveryDtype) {
  for (DType wdt : kWeightDtypes)
    for (DType sdt : kStateDtypes)
      for (bool adam : {false, true})
        for (int q : {1, 3, StateUpdateArgs::kMaxDirections})
          for (std::int64_t misalign : {0, 1}) {
            const std::string what = combo(wdt, sdt, adam) + ", q = " + std::to_string(q) +
                                     (misalign ? ", misaligned" : "");
            expect_twins(make_state(7, 131, wdt, sdt, adam, 91), adam, q, misalign, what);
            if (HasFatalFailure()) return;
          }
}

TEST_F(StateUpdateCudaTest, CudaFp8RowsKeptRegeneratedAndTooWideEqualTheCpu) {
  for (const char* mode : {"kept", "regenerate"}) {
    const test::ScopedEnv env("ZO2_CUDA_FP8_UPDATE", mode);
    for (DType wdt : kWeightDtypes)
      for (DType sdt : kStateDtypes)
        for (bool adam : {false, true}) {
          if (wdt != DType::f8_e4m3 && sdt != DType::f8_e4m3) continue;
          expect_twins(make_state(9, 1029, wdt, sdt, adam, 93), adam, 3, 0, combo(wdt, sdt, adam) + ", " + mode);
          if (HasFatalFailure()) return;
        }
  }
  // Rows of 60k columns: three fp8 tensors' values (~720 KiB) exceed any shared memory.
  expect_twins(make_state(2, 60001, DType::f8_e4m3, DType::f8_e4m3, true, 95), true, 2, 0, "wide fp8 rows");
}

}  // namespace
}  // namespace zo2
