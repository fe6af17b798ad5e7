// Low-bit storage (issue: bf16/fp16/fp8 storage and transfer): tiny ZO updates survive in
// expectation thanks to stochastic rounding, bytes moved scale with the storage width,
// and a tiny model's loss trajectory with bf16 storage stays close to fp32 storage.
#include "api/session.h"
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
  for (int k = 0; k < K; ++k) {
    UpdateArgs a{42, lr, 0.0f, &gv, static_cast<std::uint64_t>(1000 + k)};
    cpu::update({bf.data(), DType::bf16, nullptr, 1, n, 7}, a);
    cpu::update({f32.data(), DType::f32, nullptr, 1, n, 7}, a);
    for (std::int64_t i = 0; i < n; ++i) {  // what round-to-nearest storage would do
      const float w = bf16_to_f32(rtn[static_cast<std::size_t>(i)]);
      rtn[static_cast<std::size_t>(i)] = f32_to_bf16(updated(w, noise_normal(42, 7, static_cast<std::uint64_t>(i)), g, lr, 0.0f));
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
  ModelConfig c;
  c.family = ModelFamily::opt;
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.num_layers = 4;
  c.num_heads = 4;
  c.num_kv_heads = 4;
  c.head_dim = 8;
  c.ffn_dim = 64;
  c.max_positions = 32;
  c.word_embed_proj_dim = 32;
  return c;
}

struct Losses {
  std::vector<float> loss;
  std::vector<std::size_t> h2d, d2h;
};

Losses train(const std::filesystem::path& dir, DType storage, int steps, bool streamed) {
  SessionConfig cfg;
  cfg.storage = storage;
  cfg.max_batch = 4;
  cfg.max_seq = 16;
  cfg.run_seed = 3;
  if (streamed) {
    cfg.offload = OffloadMode::all;
    cfg.gpu_mem = std::size_t{1} << 30;
  }
  const ModelConfig c = ModelConfig::load(dir);
  Session s(dir, cfg);
  Losses out;
  for (int t = 0; t < steps; ++t) {
    std::vector<std::int32_t> ids(64);
    for (int i = 0; i < 64; ++i) ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(((i % 16) * 5 + (i / 16) * 3 + t % 4) % c.vocab_size);
    const StepResult r = s.step(make_batch(c, 4, 16, ids), 5e-3f, 1e-3f, 0.0f);
    out.loss.push_back(0.5f * (r.loss_plus + r.loss_minus));
    out.h2d.push_back(r.h2d_bytes);
    out.d2h.push_back(r.d2h_bytes);
  }
  return out;
}

TEST(Storage, BytesMovedPerStepScaleWithTheStorageWidth) {
  test::TempDir tmp;
  test::write_random_checkpoint(tmp.path(), tiny(), 1);
  const Losses f32 = train(tmp.path(), DType::f32, 3, true);
  const Losses bf16 = train(tmp.path(), DType::bf16, 3, true);
  const Losses f16 = train(tmp.path(), DType::f16, 3, true);
  const Losses fp8 = train(tmp.path(), DType::f8_e4m3, 3, true);
  // Step 2 uploads and offloads every block (step 1 has no update to write back).
  const auto ratio = [&](const Losses& l) { return static_cast<double>(l.d2h[2]) / static_cast<double>(f32.d2h[2]); };
  EXPECT_GT(f32.d2h[2], 0u);
  EXPECT_NEAR(ratio(bf16), 0.5, 0.03);
  EXPECT_NEAR(ratio(f16), 0.5, 0.03);
  // fp8: a quarter for matrices, plus row scales and bf16 vectors.
  EXPECT_GT(ratio(fp8), 0.25);
  EXPECT_LT(ratio(fp8), 0.33);
  EXPECT_EQ(f32.h2d[2] - f32.d2h[2], bf16.h2d[2] - bf16.d2h[2]) << "the batch upload does not depend on storage";
}

TEST(Storage, Bf16LossTrajectoryStaysCloseToFp32) {
  test::TempDir tmp;
  test::write_random_checkpoint(tmp.path(), tiny(), 2);
  const int steps = 60;
  const Losses f32 = train(tmp.path(), DType::f32, steps, false);
  const Losses bf16 = train(tmp.path(), DType::bf16, steps, false);
  const Losses fp8 = train(tmp.path(), DType::f8_e4m3, steps, false);
  double mean_diff = 0, mean_diff_fp8 = 0;
  for (int t = 0; t < steps; ++t) {
    mean_diff += std::fabs(bf16.loss[static_cast<std::size_t>(t)] - f32.loss[static_cast<std::size_t>(t)]) / steps;
    mean_diff_fp8 += std::fabs(fp8.loss[static_cast<std::size_t>(t)] - f32.loss[static_cast<std::size_t>(t)]) / steps;
  }
  const double drop = f32.loss.front() - f32.loss.back();
  RecordProperty("mean_abs_loss_diff_bf16", std::to_string(mean_diff));
  RecordProperty("mean_abs_loss_diff_fp8", std::to_string(mean_diff_fp8));
  std::printf("loss %f -> %f (fp32); mean |Δloss| bf16 %.4f, fp8 %.4f\n", f32.loss.front(), f32.loss.back(), mean_diff, mean_diff_fp8);
  EXPECT_LT(mean_diff, 0.05) << "bf16 storage tracks fp32 storage";
  EXPECT_GT(drop, 0.0);
}

}  // namespace
}  // namespace zo2
