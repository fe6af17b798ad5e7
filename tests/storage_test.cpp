// Low-bit storage (issue: bf16/fp16/fp8 storage and transfer): tiny ZO updates survive in
// expectation thanks to stochastic rounding, bytes moved scale with the storage width,
// and a tiny model's loss trajectory with bf16 storage stays close to fp32 storage.
#include "api/session.h"
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

}  // namespace
}  // namespace zo2
