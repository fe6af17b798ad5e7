// Low-bit storage (issue: bf16/fp16/fp8 storage and transfer): tiny ZO updates survive in
// expectation thanks to stochastic rounding, bytes moved scale with the storage width,
// and a tiny model's loss trajectory with bf16 storage stays close to fp32 storage.
#include "api/session.h"
#include "models/checkpoint.h"
#include "models/init.h"
#include "models/layout.h"
#include "models/presets.h"
#include "offload/block_store.h"
#include "offload/planner.h"
#include "runtime/device.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/dtype_convert.h"
#include "runtime/element.h"
#include "runtime/philox.h"
#include "tests/reference_model.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace zo2 {
namespace {

// Slope of the least-squares fit of `moved` on `expected` (through the origin).
double slope(const std::vector<double>& moved, const std::vector<double>& expected) {
  double xy = 0, xx = 0;
  for (std::size_t i = 0; i < moved.size(); ++i) {
    xy += moved[i] * expected[i];
    xx += expected[i] * expected[i];
  }
  return xy / xx;
}

// The host side of narrow hidden states (the scheduler's eval on a bf16/fp16 device):
// n packed elements at the front of a float buffer widen in place to exactly their values.
TEST(Storage, PackedNarrowValuesWidenInPlace) {
  for (DType dt : {DType::bf16, DType::f16}) {
    for (std::int64_t n : {0, 1, 2, 3, 7, 1000}) {
      std::vector<float> want(static_cast<std::size_t>(n)), v(static_cast<std::size_t>(n), -1.0f);
      for (std::int64_t i = 0; i < n; ++i) {
        const float x = std::sin(0.37f * static_cast<float>(i)) * 100.0f + static_cast<float>(i);
        store_element(v.data(), dt, i, x);  // packed at the front, like the d2h copy
        want[static_cast<std::size_t>(i)] = load_element(v.data(), dt, i, 1.0f);
      }
      widen_packed_in_place(v.data(), n, dt);
      EXPECT_EQ(v, want) << dtype_name(dt) << " n=" << n;
    }
  }
  std::vector<float> f{1.5f, -2.0f};
  widen_packed_in_place(f.data(), 2, DType::f32);
  EXPECT_EQ(f, (std::vector<float>{1.5f, -2.0f}));
}

TEST(Storage, Bf16StochasticRoundingKeepsUpdatesFarBelowResolutionInExpectation) {
  // 65536 weights at 1.0 (bf16 spacing 2^-7 there), K = 10000 updates of ≈1e-7 each in a
  // fixed direction z (same noise seed every step, fresh rounding bits): each update is
  // 1/78000 of a bf16 step. Round-to-nearest never moves; stochastic rounding moves the
  // weights by K·Δ in expectation, as fp32 storage does.
  const std::int64_t n = 65536;
  const int K = 10000;
  const float lr = 1e-7f, g = 1.0f;
  std::vector<std::uint16_t> bf(static_cast<std::size_t>(n), f32_to_bf16(1.0f)), rtn = bf;
  std::vector<float> f32(static_cast<std::size_t>(n), 1.0f);
  std::vector<double> expected(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) expected[static_cast<std::size_t>(i)] = -static_cast<double>(K) * lr * g * noise_normal(42, 7, static_cast<std::uint64_t>(i));
  const float gv = g;
  std::vector<float> z(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) z[static_cast<std::size_t>(i)] = noise_normal(42, 7, static_cast<std::uint64_t>(i));
  for (int k = 0; k < K; ++k) {
    UpdateArgs a{42, lr, 0.0f, &gv, static_cast<std::uint64_t>(1000 + k)};
    cpu::update({bf.data(), DType::bf16, nullptr, 1, n, 7}, a);
    cpu::update({f32.data(), DType::f32, nullptr, 1, n, 7}, a);
    if (k < 100)  // round-to-nearest storage: a step below half a spacing never moves a weight
      for (std::int64_t i = 0; i < n; ++i) {
        const float w = bf16_to_f32(rtn[static_cast<std::size_t>(i)]);
        rtn[static_cast<std::size_t>(i)] = f32_to_bf16(updated(w, z[static_cast<std::size_t>(i)], g, lr, 0.0f));
      }
  }
  std::vector<double> moved_sr(static_cast<std::size_t>(n)), moved_f32(static_cast<std::size_t>(n)), moved_rtn(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < moved_sr.size(); ++i) {
    moved_sr[i] = bf16_to_f32(bf[i]) - 1.0;
    moved_f32[i] = f32[i] - 1.0;
    moved_rtn[i] = bf16_to_f32(rtn[i]) - 1.0;
  }
  const double s_f32 = slope(moved_f32, expected), s_sr = slope(moved_sr, expected), s_rtn = slope(moved_rtn, expected);
  EXPECT_NEAR(s_f32, 1.0, 0.01) << "fp32 storage follows the updates";
  // Bound: per element the SR noise variance after K steps is ≤ K·spacing·|Δ|, which makes
  // the slope's standard error ≈ 0.011 here; 6 standard errors.
  EXPECT_NEAR(s_sr, s_f32, 0.07) << "bf16 + stochastic rounding drifts like fp32 in expectation";
  EXPECT_EQ(s_rtn, 0.0) << "round-to-nearest loses every update";
}

ModelConfig tiny() {
  // Wide enough that 256-byte alignment padding does not blur the byte ratios.
  ModelConfig c;
  c.family = ModelFamily::opt;
  c.vocab_size = 64;
  c.hidden_size = 128;
  c.num_layers = 3;
  c.num_heads = 4;
  c.num_kv_heads = 4;
  c.head_dim = 32;
  c.ffn_dim = 256;
  c.max_positions = 32;
  c.word_embed_proj_dim = 128;
  return c;
}

struct Losses {
  std::vector<float> loss;
  std::vector<std::size_t> h2d, d2h;
};

// Init-style weights (models/init.h), so a learning rate that trains fp32 trains all dtypes.
Losses train(DType storage, int steps, bool streamed) {
  SessionConfig cfg;
  cfg.storage = storage;
  cfg.max_batch = 4;
  cfg.max_seq = 16;
  cfg.run_seed = 3;
  if (streamed) {
    cfg.offload = OffloadMode::all;
    cfg.gpu_mem = std::size_t{1} << 30;
  }
  const ModelConfig c = tiny();
  Session s(c, cfg, 11, false);
  Losses out;
  for (int t = 0; t < steps; ++t) {
    std::vector<std::int32_t> ids(64);
    for (int i = 0; i < 64; ++i) ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(((i % 16) * 5 + (i / 16) * 3 + t % 4) % c.vocab_size);
    const StepResult r = s.step(make_batch(c, 4, 16, ids), 1e-2f, 1e-3f, 0.0f);
    out.loss.push_back(0.5f * (r.loss_plus + r.loss_minus));
    out.h2d.push_back(r.h2d_bytes);
    out.d2h.push_back(r.d2h_bytes);
  }
  return out;
}

TEST(Storage, BytesMovedPerStepScaleWithTheStorageWidth) {
  const Losses f32 = train(DType::f32, 3, true);
  const Losses bf16 = train(DType::bf16, 3, true);
  const Losses f16 = train(DType::f16, 3, true);
  const Losses fp8 = train(DType::f8_e4m3, 3, true);
  // Step 2 uploads and offloads every block (step 1 has no update to write back).
  const auto ratio = [&](const Losses& l) { return static_cast<double>(l.d2h[2]) / static_cast<double>(f32.d2h[2]); };
  EXPECT_GT(f32.d2h[2], 0u);
  EXPECT_NEAR(ratio(bf16), 0.5, 0.01);
  EXPECT_NEAR(ratio(f16), 0.5, 0.01);
  // fp8: a quarter for matrices, plus row scales and bf16 vectors.
  EXPECT_GT(ratio(fp8), 0.25);
  EXPECT_LT(ratio(fp8), 0.28);
  std::printf("bytes offloaded per step: fp32 %zu, bf16 %zu, fp16 %zu, fp8 %zu\n", f32.d2h[2], bf16.d2h[2], f16.d2h[2], fp8.d2h[2]);
  EXPECT_EQ(f32.h2d[2] - f32.d2h[2], bf16.h2d[2] - bf16.d2h[2]) << "the batch upload does not depend on storage";
}

// The host block store checks the host memory before it allocates: with less available than
// the master weights need it refuses, naming the numbers (and fp8's), and allocates nothing;
// with exactly enough it is built, at the size the planner predicts.
TEST(Storage, TheBlockStoreRefusesMasterWeightsLargerThanTheHostMemoryAvailable) {
  const ModelConfig c = find_preset("opt-tiny").config;
  DeviceOptions o;
  o.kind = DeviceKind::cpu;
  o.mem_cap = std::size_t{64} << 20;
  auto device = make_device(o);
  const std::size_t need = host_image_bytes(c, DType::bf16, c.num_layers);
  {
    const test::ScopedEnv limit("ZO2_HOST_MEM_AVAILABLE", std::to_string(need - 1).c_str());
    try {
      BlockStore::synthetic(c, DType::bf16, *device, 1);
      ADD_FAILURE() << "a store larger than the host memory available was built";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::out_of_memory);
      const std::string m = e.what();
      for (const char* piece : {"host memory", "bf16 storage", "ZO2_HOST_MEM_AVAILABLE", "--storage-dtype fp8 would need",
                                ", which fits"})
        EXPECT_NE(m.find(piece), std::string::npos) << piece << " in: " << m;
    }
    EXPECT_EQ(device->pinned_host_bytes(), 0u);
    // Aliased blocks (benchmarks) need one block image only.
    EXPECT_NO_THROW(BlockStore::synthetic(c, DType::bf16, *device, 1, /*alias_blocks=*/true));
  }
  {
    const test::ScopedEnv limit("ZO2_HOST_MEM_AVAILABLE", std::to_string(need).c_str());
    const BlockStore store = BlockStore::synthetic(c, DType::bf16, *device, 1);
    EXPECT_EQ(store.host_bytes(), need);
    PlanRequest r;
    r.cap = std::size_t{64} << 20;
    r.storage = DType::bf16;
    r.seq = 16;
    EXPECT_EQ(plan_placement(c, r).host_bytes, need) << "the planner's prediction is the store's size";
  }
  const test::ScopedEnv bad("ZO2_HOST_MEM_AVAILABLE", "lots");
  try {
    BlockStore::synthetic(c, DType::bf16, *device, 1);
    ADD_FAILURE() << "a bad ZO2_HOST_MEM_AVAILABLE was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ZO2_HOST_MEM_AVAILABLE"), std::string::npos) << e.what();
  }
}

// On the CPU backend the device is host memory too: a session needs the master weights and
// the plan's device peak together, and one that cannot have both is refused before it
// allocates, saying so and what helps (pass 62: a model of half the free memory was accepted,
// everything resident beside its own master weights); capped with gpu_mem it streams and fits.
TEST(Storage, ACpuSessionNeedsTheMasterWeightsAndItsDevicePeakInHostMemory) {
  const ModelConfig c = find_preset("opt-tiny").config;
  SessionConfig cfg;
  cfg.device = "cpu";
  cfg.max_batch = 2;
  cfg.max_seq = 16;
  cfg.threads = 1;
  const std::size_t images = host_image_bytes(c, DType::f32, c.num_layers);
  std::size_t peak = 0;
  {
    Session probe(c, cfg, 1, false);
    peak = probe.placement().total_bytes;
    EXPECT_EQ(probe.placement().resident_count, c.num_layers);
  }
  {
    const test::ScopedEnv limit("ZO2_HOST_MEM_AVAILABLE", std::to_string(images + peak - 1).c_str());
    const Error e = test::error_of([&] { Session s(c, cfg, 1, false); });
    EXPECT_EQ(e.kind(), ErrorKind::out_of_memory) << e.what();
    for (const char* piece : {"the master weights", "the CPU backend's device memory", "--gpu-mem"})
      EXPECT_NE(std::string(e.what()).find(piece), std::string::npos) << piece << " in: " << e.what();
  }
  {
    const test::ScopedEnv limit("ZO2_HOST_MEM_AVAILABLE", std::to_string(images + peak).c_str());
    EXPECT_NO_THROW(Session(c, cfg, 1, false));
  }
  {
    // Capped below the all-resident peak, the blocks stream and the two fit in less.
    const test::ScopedEnv limit("ZO2_HOST_MEM_AVAILABLE", std::to_string(images + peak - 1).c_str());
    SessionConfig capped = cfg;
    capped.offload = OffloadMode::all;
    capped.window = 1;  // (opt-tiny has two blocks)
    const Placement streamed = Session(c, capped, 1, false).placement();
    EXPECT_LT(streamed.total_bytes, peak);
  }
}

// opt-tiny on a permutation-chain task (as `zo2-tune synth-data` makes): learnable in a
// hundred steps at lr 3e-3.
Losses train_tiny(DType storage, int steps) {
  const ModelConfig c = find_preset("opt-tiny").config;
  SessionConfig cfg;
  cfg.storage = storage;
  cfg.max_batch = 8;
  cfg.max_seq = 32;
  cfg.run_seed = 5;
  Session s(c, cfg, 1, false);
  std::vector<std::int32_t> perm(16);
  for (int i = 0; i < 16; ++i) perm[static_cast<std::size_t>(i)] = (i * 7 + 3) % 16;
  Losses out;
  for (int t = 0; t < steps; ++t) {
    std::vector<std::int32_t> ids(8 * 32);
    for (int r = 0; r < 8; ++r) {
      int cur = (t * 8 + r) * 5 % 16;
      for (int k = 0; k < 32; ++k) {
        ids[static_cast<std::size_t>(r * 32 + k)] = cur * 32;  // 16 letters spread over 512 ids
        cur = perm[static_cast<std::size_t>(cur)];
      }
    }
    const StepResult r = s.step(make_batch(c, 8, 32, ids), 3e-3f, 1e-3f, 0.0f);
    out.loss.push_back(0.5f * (r.loss_plus + r.loss_minus));
  }
  return out;
}

TEST(Storage, Bf16LossTrajectoryStaysCloseToFp32) {
  const int steps = 120;
  const Losses f32 = train_tiny(DType::f32, steps);
  const Losses bf16 = train_tiny(DType::bf16, steps);
  const Losses fp8 = train_tiny(DType::f8_e4m3, steps);
  auto mean = [](const std::vector<float>& v, std::size_t a, std::size_t b) {
    double m = 0;
    for (std::size_t i = a; i < b; ++i) m += v[i];
    return m / static_cast<double>(b - a);
  };
  double diff = 0, diff_fp8 = 0;
  for (int t = 0; t < steps; ++t) {
    diff += std::fabs(bf16.loss[static_cast<std::size_t>(t)] - f32.loss[static_cast<std::size_t>(t)]) / steps;
    diff_fp8 += std::fabs(fp8.loss[static_cast<std::size_t>(t)] - f32.loss[static_cast<std::size_t>(t)]) / steps;
  }
  const double first = mean(f32.loss, 0, 20), last = mean(f32.loss, steps - 20, steps);
  std::printf("fp32 loss %.3f -> %.3f; last-20 mean bf16 %.3f, fp8 %.3f; mean |Δloss| vs fp32: bf16 %.4f, fp8 %.4f\n", first,
              last, mean(bf16.loss, steps - 20, steps), mean(fp8.loss, steps - 20, steps), diff, diff_fp8);
  EXPECT_LT(last, first - 0.2) << "the task is learnable at this rate";
  // Bound: within 5% of the loss scale at every step on average.
  EXPECT_LT(diff, 0.05 * first) << "bf16 storage tracks fp32 storage";
  EXPECT_LT(mean(bf16.loss, steps - 20, steps), first - 0.2) << "and learns too";
}

}  // namespace
}  // namespace zo2

namespace zo2 {
namespace {

// Random init as transformers does it: Gemma 3's (1 + w) RMSNorm weights start at 0 (a scale of
// 1), every other family's norm weights at 1; matrices and biases are the same for both.
TEST(Storage, RandomInitStartsGemmaNormsAtZeroAndOthersAtOne) {
  DeviceOptions o;
  o.kind = DeviceKind::cpu;
  o.mem_cap = std::size_t{64} << 20;
  auto device = make_device(o);
  for (const char* preset : {"gemma3-tiny", "llama-tiny"}) {
    const ModelConfig c = find_preset(preset).config;
    BlockStore store = BlockStore::synthetic(c, DType::f32, *device, 1);
    const float want = c.gemma3() ? 0.0f : 1.0f;
    int norms = 0;
    for (const TensorSlot& s : store.block_layout(0).tensors()) {
      if (s.name.find("norm") == std::string::npos) continue;
      const float* w = reinterpret_cast<const float*>(static_cast<const std::byte*>(store.block_image(0)) + s.offset);
      EXPECT_EQ(w[0], want) << preset << " " << s.name;
      ++norms;
    }
    EXPECT_GE(norms, c.gemma3() ? 6 : 2) << preset;
    EXPECT_EQ(init_norm_value(c), want);
  }
}


// ---- fp8 rows whose largest value is tiny (Note [Tiny fp8 rows] in runtime/element.h) ----
//
// absmax / 448 underflowed to 0 for absmax ≤ ~3e-43 (the row was divided by 0: NaN weights
// from a finite checkpoint, NaN momentum from a tiny weight decay), and a subnormal quotient
// rounded down let absmax / scale exceed 448 (the largest values saturated).

constexpr float kTiny = 1.4e-45f;  // 2^-149, the smallest subnormal

// The decoded value of x after quantizing with `scale` is within fp8's relative precision
// (2^-4: 3 mantissa bits, round to nearest) plus the rounding of the fp32 product itself.
void expect_fp8_close(float x, float scale, const char* what) {
  const float q = detail::fdiv(x, scale);
  EXPECT_LE(std::fabs(q), kE4M3Max) << what << " x=" << x << " scale=" << scale;
  const float d = load_element(std::array<std::uint8_t, 1>{f32_to_e4m3(q)}.data(), DType::f8_e4m3, 0, scale);
  ASSERT_TRUE(std::isfinite(d)) << what << " x=" << x << " scale=" << scale;
  EXPECT_LE(std::fabs(static_cast<double>(d) - x), std::fabs(static_cast<double>(x)) / 16 + kTiny)
      << what << " x=" << x << " scale=" << scale << " decoded " << d;
}

TEST(Storage, Fp8RowScaleIsPositiveAndNeverSaturatesARowWithASubnormalMaximum) {
  // Every absmax whose quotient is subnormal (or 0): every fp32 below 448·2^-126, and a few beyond.
  const std::uint32_t last = std::bit_cast<std::uint32_t>(kE4M3Max * std::numeric_limits<float>::min());
  for (std::uint32_t b = 1; b <= last + 4096; ++b) {
    const float absmax = std::bit_cast<float>(b);
    const float scale = fp8_row_scale(absmax);
    const float quotient = absmax / kE4M3Max;
    // A normal quotient is kept (its absmax / scale may round to 448 + 1 ulp: e4m3 saturates
    // that to 448, as it always did); a subnormal one never lets absmax / scale pass 448.
    const bool ok = quotient >= std::numeric_limits<float>::min()
                        ? scale == quotient
                        : scale > 0.0f && detail::fdiv(absmax, scale) <= kE4M3Max;
    if (!ok) {
      ADD_FAILURE() << "absmax " << absmax << " (bits " << b << "): scale " << scale;
      break;
    }
    if (b % 4099 == 0 || b < 2048) expect_fp8_close(absmax, scale, "absmax");
  }
  // A normal quotient is absmax / 448 exactly, as before: the rows of every real model.
  for (const float absmax : {kE4M3Max * std::numeric_limits<float>::min(), 1e-30f, 1e-3f, 0.02f, 1.0f, 448.0f,
                             3e38f, std::numeric_limits<float>::max()})
    EXPECT_EQ(fp8_row_scale(absmax), absmax / kE4M3Max) << absmax;
  EXPECT_EQ(fp8_row_scale(0.0f), 1.0f);
  EXPECT_EQ(fp8_row_scale(kTiny), kTiny);
  EXPECT_EQ(fp8_row_scale(1e-42f), 2 * kTiny);  // 714 · 2^-149 / 448 = 1.59 units: 2, not saturated
  EXPECT_EQ(fp8_row_scale(671 * kTiny), 2 * kTiny) << "1.498 rounds to 1 unit, 671 > 448: one more";
}

TEST(Storage, Fp8QuantizationOfACheckpointRowWithATinyMaximumStaysFinite) {
  const std::int64_t cols = 6;
  const std::vector<float> src = {
      kTiny, 0, 0, 0, 0, 0,                            // absmax 1e-45: its scale underflowed to 0
      1e-42f, -3e-43f, 0, kTiny, 0, 0,                 // 1e-42: so did this one
      671 * kTiny, -kTiny, 0, 0, 0, 300 * kTiny,       // a subnormal quotient rounded down
      3e-39f, 1e-40f, -2e-39f, 0, 0, 0,                // subnormal absmax, subnormal quotient
      0, 0, 0, 0, 0, 0,                                // all zero: scale 1
      0.02f, -0.013f, 0.5f, 1e-3f, -0.25f, 0.125f,     // an ordinary row
  };
  const std::int64_t rows = static_cast<std::int64_t>(src.size()) / cols;
  std::vector<std::uint8_t> q(src.size());
  std::vector<float> scales(static_cast<std::size_t>(rows));
  quantize_rows_e4m3(src.data(), rows, cols, q.data(), scales.data());
  for (std::int64_t r = 0; r < rows; ++r) {
    const float scale = scales[static_cast<std::size_t>(r)];
    EXPECT_TRUE(scale > 0.0f && std::isfinite(scale)) << "row " << r << ": " << scale;
    for (std::int64_t c = 0; c < cols; ++c) {
      const std::size_t i = static_cast<std::size_t>(r * cols + c);
      const float d = load_element(q.data(), DType::f8_e4m3, static_cast<std::int64_t>(i), scale);
      ASSERT_TRUE(std::isfinite(d)) << "row " << r << " col " << c;
      EXPECT_NE(q[i] & 0x7f, 0x7f) << "row " << r << " col " << c;  // no NaN code
      EXPECT_LE(std::fabs(static_cast<double>(d) - src[i]), std::fabs(static_cast<double>(src[i])) / 16 + kTiny)
          << "row " << r << " col " << c << ": " << src[i] << " decodes as " << d;
    }
  }
  EXPECT_EQ(load_element(q.data(), DType::f8_e4m3, 0, scales[0]), kTiny) << "2^-149 is exact";
  EXPECT_EQ(scales[4], 1.0f);
  const float absmax = 0.5f;  // the ordinary row: the same bits as before
  EXPECT_EQ(scales[5], absmax / kE4M3Max);
  for (std::int64_t c = 0; c < cols; ++c)
    EXPECT_EQ(q[static_cast<std::size_t>(5 * cols + c)], f32_to_e4m3(src[static_cast<std::size_t>(5 * cols + c)] / (absmax / kE4M3Max)));
}

// The CPU update of an fp8 row whose values are tiny (g = 0: the values stay, and so must
// their encoding); it rescaled the row by absmax / 448 = 0.
TEST(Storage, Fp8UpdateOfARowWithATinyMaximumStaysFinite) {
  const std::int64_t rows = 3, cols = 8;
  std::vector<std::uint8_t> w(static_cast<std::size_t>(rows * cols), 0);
  std::vector<float> scales = {kTiny, 5 * kTiny, 1.0f};
  w[0] = f32_to_e4m3(1.0f);     // row 0: {2^-149, 0, ...}
  w[8] = f32_to_e4m3(128.0f);   // row 1: {640·2^-149, −5·2^-149, 0, ...}
  w[9] = f32_to_e4m3(-1.0f);
  w[16] = f32_to_e4m3(0.875f);  // row 2: ordinary (0.875 / 448 = 2^-9 exactly)
  const std::vector<std::uint8_t> before = w;
  const float g = 0.0f;
  StoredTensor t{w.data(), DType::f8_e4m3, scales.data(), rows, cols, 77};
  cpu::update(t, UpdateArgs{5, 1e-3f, 0.0f, &g, 6});
  for (std::int64_t e = 0; e < rows * cols; ++e) {
    const float old_scale = e < 8 ? kTiny : e < 16 ? 5 * kTiny : 1.0f;
    const float was = load_element(before.data(), DType::f8_e4m3, e, old_scale);
    const float now = load_element(w.data(), DType::f8_e4m3, e, scales[static_cast<std::size_t>(e / cols)]);
    ASSERT_TRUE(std::isfinite(now)) << "element " << e;
    EXPECT_EQ(now, was) << "element " << e;
  }
  EXPECT_EQ(scales[0], kTiny);
  EXPECT_EQ(scales[1], 2 * kTiny);  // 640/448 = 1.43 units rounds to 1, 640 > 448: 2
  EXPECT_EQ(scales[2], 0.875f / kE4M3Max);
}

// fp8 optimizer state (--state-dtype fp8): momentum m' = wd·W when g = 0, so a tiny weight
// decay made a row of m whose maximum is ~1e-44, and its scale 0 (NaN momentum, NaN weights).
TEST(Storage, Fp8MomentumStateWithTinyValuesStaysFinite) {
  const std::int64_t rows = 2, cols = 4;
  std::vector<float> w = {1.0f, -0.5f, 0.25f, 0.0f, 0.75f, 1.0f, -1.0f, 0.5f};
  std::vector<std::uint8_t> m(w.size(), 0);
  std::vector<float> m_scales = {1.0f, 1.0f};
  const float g = 0.0f;
  StoredTensor tw{w.data(), DType::f32, nullptr, rows, cols, 3};
  StoredTensor tm{m.data(), DType::f8_e4m3, m_scales.data(), rows, cols, 3};
  StateUpdateArgs a;
  a.g = &g;
  a.seeds[0] = 9;
  a.lr = 1e-3f;
  a.weight_decay = 1e-44f;  // u = wd·W: 7·2^-149 and below
  a.beta1 = 0.9f;
  a.rounding_seed = 11;
  const std::vector<float> w0 = w;
  cpu::update_state(tw, tm, nullptr, a);
  for (std::size_t i = 0; i < w.size(); ++i) {
    const float mi = load_element(m.data(), DType::f8_e4m3, static_cast<std::int64_t>(i), m_scales[i / cols]);
    ASSERT_TRUE(std::isfinite(mi)) << "m " << i;
    ASSERT_TRUE(std::isfinite(w[i])) << "W " << i;
    EXPECT_EQ(w[i], w0[i]) << "lr·m is far below W's ulp";
  }
  for (const float s : m_scales) EXPECT_TRUE(s > 0.0f && std::isfinite(s)) << s;
  // Row 0: u = {7, −4, 2, 0}·2^-149 (exact products): stored exactly with scale 2^-149.
  EXPECT_EQ(load_element(m.data(), DType::f8_e4m3, 0, m_scales[0]), 7 * kTiny);
  EXPECT_EQ(load_element(m.data(), DType::f8_e4m3, 1, m_scales[0]), -4 * kTiny);
}

// End to end: `eval --storage-dtype fp8` of a finite checkpoint with a row {1e-45, 0, ...}
// reports a finite loss (it printed "loss -nan" with exit status 0).
TEST(Storage, EvalWithFp8StorageOfACheckpointWithATinyRowIsFinite) {
  test::TempDir tmp;
  const std::string tune = test::zo2_tune_path().string();
  const std::string model = (tmp / "m").string(), data = (tmp / "d.safetensors").string();
  std::string out;
  ASSERT_EQ(test::run_command(tune + " init --preset opt-tiny --out " + model + " --seed 1 -q", &out), 0) << out;
  ASSERT_EQ(test::run_command(tune + " synth-data --model " + model + " --out " + data + " --rows 8 --seq 16 -q", &out), 0)
      << out;
  const std::int64_t hidden = find_preset("opt-tiny").config.hidden_size;
  const std::string tensor = "model.decoder.layers.0.fc1.weight";  // [ffn, hidden]: row 3
  for (std::int64_t c = 0; c < hidden; ++c)
    test::poke_safetensors(tmp / "m" / "model.safetensors", tensor, 3 * hidden + c, c == 0 ? kTiny : 0.0f);
  for (std::int64_t c = 0; c < hidden; ++c)  // row 4: a maximum of 1e-42
    test::poke_safetensors(tmp / "m" / "model.safetensors", tensor, 4 * hidden + c, c == 1 ? 1e-42f : c == 2 ? -3e-43f : 0.0f);
  for (const char* sd : {"fp32", "fp8"}) {
    out.clear();
    ASSERT_EQ(test::run_command(tune + " eval --model " + model + " --data " + data + " --storage-dtype " + sd, &out), 0)
        << out;
    EXPECT_NE(out.find("eval: loss "), std::string::npos) << sd << ": " << out;
    EXPECT_EQ(out.find("nan"), std::string::npos) << sd << ": " << out;
  }
}

}  // namespace
}  // namespace zo2

namespace zo2 {
namespace {

// A save asks for a tensor in pieces (models/safetensors.h): image_tensor's conversion of any
// piece — starting and ending inside rows, crossing rows — equals that part of the whole
// tensor's, for fp8 (row scales folded in, or widened) and for fp32 narrowed. And a disk
// block's piece (convert_slot_range over the piece's own bytes and its rows' scales) too.
TEST(Storage, ASavedTensorsPiecesEqualTheWholeConversion) {
  const std::int64_t rows = 37, cols = 101;
  std::vector<float> values(static_cast<std::size_t>(rows * cols));
  for (std::size_t i = 0; i < values.size(); ++i)
    values[i] = std::sin(static_cast<float>(i) * 0.37f) * static_cast<float>(1 + i % 7) * (i % 101 == 5 ? 1e-3f : 1.0f);
  for (const auto& [storage, save] : {std::pair{DType::f8_e4m3, DType::f8_e4m3}, std::pair{DType::f8_e4m3, DType::f32},
                                      std::pair{DType::f8_e4m3, DType::bf16}, std::pair{DType::f32, DType::bf16},
                                      std::pair{DType::f32, DType::f16}}) {
    SCOPED_TRACE(std::string(dtype_name(storage)) + " saved as " + std::string(dtype_name(save)));
    TensorSlot s{};
    s.name = "w";
    s.dtype = storage;
    s.rows = rows;
    s.cols = cols;
    s.offset = 64;  // not at the image's start
    s.bytes = static_cast<std::size_t>(rows * cols) * dtype_size(storage);
    s.scale_offset = s.offset + ((s.bytes + 63) / 64) * 64;
    std::vector<std::byte> image(s.scale_offset + static_cast<std::size_t>(rows) * sizeof(float));
    if (storage == DType::f8_e4m3)
      quantize_rows_e4m3(values.data(), rows, cols, reinterpret_cast<std::uint8_t*>(image.data() + s.offset),
                         reinterpret_cast<float*>(image.data() + s.scale_offset));
    else
      std::memcpy(image.data() + s.offset, values.data(), s.bytes);
    const TensorToWrite t = image_tensor(s, image.data(), save);
    ASSERT_TRUE(t.fill);
    const std::size_t out_size = dtype_size(save);
    std::vector<std::byte> whole(static_cast<std::size_t>(rows * cols) * out_size);
    t.fill(whole, 0);
    for (const auto& [first, count] : {std::pair<std::int64_t, std::int64_t>{0, 1}, {3, 98}, {100, 2}, {101, 101},
                                       {150, 1000}, {rows * cols - 7, 7}}) {
      SCOPED_TRACE(fmt::format("elements [{}, {})", first, first + count));
      std::vector<std::byte> piece(static_cast<std::size_t>(count) * out_size);
      t.fill(piece, static_cast<std::uint64_t>(first) * out_size);
      EXPECT_EQ(std::memcmp(piece.data(), whole.data() + first * out_size, piece.size()), 0);
      // From the piece's own bytes and scales, as a disk block's are read.
      std::vector<std::byte> own(static_cast<std::size_t>(count) * dtype_size(storage));
      std::memcpy(own.data(), image.data() + s.offset + first * dtype_size(storage), own.size());
      const float* scales = storage == DType::f8_e4m3
                                ? reinterpret_cast<const float*>(image.data() + s.scale_offset) + first / cols
                                : nullptr;
      std::vector<float> own_scales;
      if (scales) own_scales.assign(scales, scales + ((first + count - 1) / cols - first / cols + 1));
      std::fill(piece.begin(), piece.end(), std::byte{0x55});
      convert_slot_range(s, own.data(), scales ? own_scales.data() : nullptr, save, first, count, piece.data());
      EXPECT_EQ(std::memcmp(piece.data(), whole.data() + first * out_size, piece.size()), 0);
    }
  }
}

// init writes a checkpoint in pieces too: a piece's random values are the whole tensor's at
// those elements, wherever the piece starts (Philox groups of 4 split across pieces).
TEST(Storage, InitsPiecesEqualTheWholeTensorsValues) {
  const std::int64_t n = 1003;
  for (const DType dt : {DType::f32, DType::bf16}) {
    for (const auto& [name, ndim] : {std::pair{"model.layers.0.mlp.up_proj.weight", 2}, std::pair{"x.bias", 1}}) {
      std::vector<std::byte> whole(static_cast<std::size_t>(n) * dtype_size(dt));
      fill_init(name, ndim, n, 9, dt, whole);
      for (const auto& [first, count] : {std::pair<std::int64_t, std::int64_t>{0, 5}, {1, 1}, {2, 7}, {401, 602}}) {
        std::vector<std::byte> piece(static_cast<std::size_t>(count) * dtype_size(dt));
        fill_init_range(name, ndim, first, count, 9, dt, piece);
        EXPECT_EQ(std::memcmp(piece.data(), whole.data() + first * dtype_size(dt), piece.size()), 0)
            << name << " [" << first << ", " << first + count << ") " << dtype_name(dt);
      }
    }
  }
}

}  // namespace
}  // namespace zo2
