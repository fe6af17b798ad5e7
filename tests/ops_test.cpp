// Every op of the table on every available backend (CPU always, CUDA when present), on
// awkward shapes: odd sizes, leading dimensions wider than rows, T not a multiple of tiles,
// padding rows. Each result is checked against a plain double-precision reference written
// here; on CUDA also against the CPU twin (bit for bit for the noise kernels).
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/dtype_convert.h"
#include "runtime/element.h"
#include "runtime/philox.h"
#include "tests/device_fixture.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <utility>

namespace zo2 {
namespace {

using test::BackendTest;

std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

double max_rel(const std::vector<float>& a, const std::vector<double>& b) {
  double err = 0, ref = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    err = std::max(err, std::fabs(a[i] - b[i]));
    ref = std::max(ref, std::fabs(b[i]));
  }
  return ref > 0 ? err / ref : err;
}

class OpsTest : public BackendTest {};

TEST_P(OpsTest, GemmMatchesReferenceForEveryTransposeAndLeadingDimension) {
  const std::int64_t M = 37, N = 131, K = 45;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const std::int64_t a_rows = ta ? K : M, a_cols = ta ? M : K, b_rows = tb ? N : K, b_cols = tb ? K : N;
      const std::int64_t lda = a_cols + 3, ldb = b_cols + 5, ldc = N + 7;
      auto A = random_floats(static_cast<std::size_t>(a_rows * lda), 1);
      auto B = random_floats(static_cast<std::size_t>(b_rows * ldb), 2);
      auto C = random_floats(static_cast<std::size_t>(M * ldc), 3);
      const float alpha = 0.75f, beta = 0.5f;
      std::vector<double> ref(static_cast<std::size_t>(M * ldc));
      for (std::int64_t i = 0; i < M; ++i)
        for (std::int64_t j = 0; j < ldc; ++j) {
          if (j >= N) {
            ref[static_cast<std::size_t>(i * ldc + j)] = C[static_cast<std::size_t>(i * ldc + j)];  // untouched
            continue;
          }
          double s = 0;
          for (std::int64_t k = 0; k < K; ++k) {
            const double a = ta ? A[static_cast<std::size_t>(k * lda + i)] : A[static_cast<std::size_t>(i * lda + k)];
            const double b = tb ? B[static_cast<std::size_t>(j * ldb + k)] : B[static_cast<std::size_t>(k * ldb + j)];
            s += a * b;
          }
          ref[static_cast<std::size_t>(i * ldc + j)] = alpha * s + beta * C[static_cast<std::size_t>(i * ldc + j)];
        }
      auto da = upload(A), db = upload(B), dc = upload(C);
      ops().gemm(*stream, {da.data(), DType::f32, a_rows, a_cols, lda}, ta, {db.data(), DType::f32, b_rows, b_cols, ldb},
                 tb, {dc.data(), DType::f32, M, N, ldc}, alpha, beta);
      const auto out = download<float>(dc, C.size());
      EXPECT_LT(max_rel(out, ref), 1e-5) << "ta=" << ta << " tb=" << tb;
      for (std::int64_t i = 0; i < M; ++i)
        for (std::int64_t j = N; j < ldc; ++j)
          ASSERT_EQ(out[static_cast<std::size_t>(i * ldc + j)], C[static_cast<std::size_t>(i * ldc + j)]) << "wrote past N";
    }
}

// Ops::linear on tiles of a wider output, as models/graph.cpp calls it: x·wᵀ, + bias, ReLU,
// or added to a residual. On CUDA both ways (ZO2_CUDA_GEMM_EPILOGUE: the default path and
// the cuBLASLt epilogue); the CPU ignores the switch.
TEST_P(OpsTest, LinearIsGemmPlusBiasThenReluOrResidualOnEveryTile) {
  const std::int64_t M = 23, K = 70, N = 150, ldx = 75, ldy = 160, tile = 64;
  const auto x = random_floats(static_cast<std::size_t>(M * ldx), 21);
  const auto w = random_floats(static_cast<std::size_t>(N * K), 22, 0.2f);
  const auto b = random_floats(static_cast<std::size_t>(N), 23);
  const auto h = random_floats(static_cast<std::size_t>(M * ldy), 24);  // the residual stream
  auto dx = upload(x), dw = upload(w), db = upload(b);
  for (const char* epilogue : {"0", "1"}) {
    const test::ScopedEnv use("ZO2_CUDA_GEMM_EPILOGUE", epilogue);
    // bias; bias + ReLU; ReLU alone; bias + residual; residual alone
    for (int mode = 0; mode < 5; ++mode) {
      const bool bias = mode != 2 && mode != 4, relu = mode == 1 || mode == 2, residual = mode >= 3;
      auto dy = upload(std::vector<float>(static_cast<std::size_t>(M * ldy), 7.0f));
      auto dh = upload(h);
      for (std::int64_t r0 = 0; r0 < N; r0 += tile) {
        const std::int64_t r1 = std::min(N, r0 + tile);
        const Mat h_tile = Mat{dh.data(), DType::f32, M, N, ldy}.cols_range(r0, r1);
        ops().linear(*stream, {dx.data(), DType::f32, M, K, ldx},
                     Mat::dense(static_cast<float*>(dw.data()) + r0 * K, DType::f32, r1 - r0, K),
                     Mat{dy.data(), DType::f32, M, N, ldy}.cols_range(r0, r1),
                     bias ? static_cast<const float*>(db.data()) + r0 : nullptr, relu, residual ? &h_tile : nullptr);
      }
      const auto out = download<float>(residual ? dh : dy, static_cast<std::size_t>(M * ldy));
      std::vector<float> got;
      std::vector<double> ref;
      for (std::int64_t i = 0; i < M; ++i) {
        for (std::int64_t j = 0; j < N; ++j) {
          double s = bias ? b[static_cast<std::size_t>(j)] : 0.0;
          for (std::int64_t k = 0; k < K; ++k)
            s += static_cast<double>(x[static_cast<std::size_t>(i * ldx + k)]) * w[static_cast<std::size_t>(j * K + k)];
          if (relu) s = std::max(s, 0.0);
          if (residual) s += h[static_cast<std::size_t>(i * ldy + j)];
          ref.push_back(s);
          got.push_back(out[static_cast<std::size_t>(i * ldy + j)]);
        }
        for (std::int64_t j = N; j < ldy; ++j)
          ASSERT_EQ(out[static_cast<std::size_t>(i * ldy + j)], residual ? h[static_cast<std::size_t>(i * ldy + j)] : 7.0f)
              << "wrote past N";
      }
      EXPECT_LT(max_rel(got, ref), 1e-5) << "epilogue " << epilogue << " bias " << bias << " relu " << relu
                                         << " residual " << residual;
    }
  }
}

TEST_P(OpsTest, AddBiasAndResidualAddAreExact) {
  const std::int64_t R = 5, Cn = 19;
  auto y = random_floats(static_cast<std::size_t>(R * Cn), 4), x = random_floats(static_cast<std::size_t>(R * Cn), 5),
       b = random_floats(static_cast<std::size_t>(Cn), 6);
  auto dy = upload(y), dx = upload(x), dbias = upload(b);
  const Mat my = Mat::dense(dy.data(), DType::f32, R, Cn);
  ops().add_bias(*stream, my, dbias.data());
  ops().add(*stream, my, Mat::dense(dx.data(), DType::f32, R, Cn));
  const auto out = download<float>(dy, y.size());
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t c = 0; c < Cn; ++c) {
      const std::size_t i = static_cast<std::size_t>(r * Cn + c);
      EXPECT_EQ(out[i], (y[i] + b[static_cast<std::size_t>(c)]) + x[i]);
    }
}

TEST_P(OpsTest, LayerNormAndRmsNormMatchReferenceInPlaceAndOutOfPlace) {
  const std::int64_t R = 7, Cn = 133;
  auto x = random_floats(static_cast<std::size_t>(R * Cn), 7, 3.0f);
  for (auto& v : x) v += 1.5f;  // a mean far from zero
  auto w = random_floats(static_cast<std::size_t>(Cn), 8), b = random_floats(static_cast<std::size_t>(Cn), 9);
  std::vector<double> ln(x.size()), rms(x.size());
  const float eps = 1e-5f;
  for (std::int64_t r = 0; r < R; ++r) {
    double mean = 0, var = 0, ss = 0;
    for (std::int64_t c = 0; c < Cn; ++c) mean += x[static_cast<std::size_t>(r * Cn + c)];
    mean /= Cn;
    for (std::int64_t c = 0; c < Cn; ++c) {
      const double d = x[static_cast<std::size_t>(r * Cn + c)] - mean;
      var += d * d;
      ss += static_cast<double>(x[static_cast<std::size_t>(r * Cn + c)]) * x[static_cast<std::size_t>(r * Cn + c)];
    }
    var /= Cn;
    for (std::int64_t c = 0; c < Cn; ++c) {
      const std::size_t i = static_cast<std::size_t>(r * Cn + c);
      ln[i] = (x[i] - mean) / std::sqrt(var + eps) * w[static_cast<std::size_t>(c)] + b[static_cast<std::size_t>(c)];
      rms[i] = x[i] / std::sqrt(ss / Cn + eps) * w[static_cast<std::size_t>(c)];
    }
  }
  auto dx = upload(x), dw = upload(w), db = upload(b);
  auto dy = zeros(x.size() * 4);
  const Mat mx = Mat::dense(dx.data(), DType::f32, R, Cn), my = Mat::dense(dy.data(), DType::f32, R, Cn);
  ops().layernorm(*stream, mx, dw.data(), db.data(), eps, my);
  EXPECT_LT(max_rel(download<float>(dy, x.size()), ln), 1e-6);
  ops().rmsnorm(*stream, mx, dw.data(), eps, mx);  // in place
  EXPECT_LT(max_rel(download<float>(dx, x.size()), rms), 1e-6);
}

// Gemma 3's RMSNorm (Gemma3RMSNorm): (x·inv)·(1 + w), the factor in fp32; offset 0 is
// LLaMA's bit for bit. Also on [rows·heads, head_dim] views, as the q/k norms run it.
TEST_P(OpsTest, RmsNormWithWeightOffsetOneMultipliesByOnePlusTheWeight) {
  const std::int64_t R = 6, Cn = 96;
  auto x = random_floats(static_cast<std::size_t>(R * Cn), 21, 3.0f);
  auto w = random_floats(static_cast<std::size_t>(Cn), 22, 0.5f);
  const float eps = 1e-6f;
  std::vector<double> want(x.size());
  for (std::int64_t r = 0; r < R; ++r) {
    double ss = 0;
    for (std::int64_t c = 0; c < Cn; ++c) ss += static_cast<double>(x[static_cast<std::size_t>(r * Cn + c)]) * x[static_cast<std::size_t>(r * Cn + c)];
    for (std::int64_t c = 0; c < Cn; ++c) {
      const std::size_t i = static_cast<std::size_t>(r * Cn + c);
      want[i] = x[i] / std::sqrt(ss / Cn + eps) * (1.0 + w[static_cast<std::size_t>(c)]);
    }
  }
  auto dx = upload(x), dw = upload(w), dy = zeros(x.size() * 4), dz = zeros(x.size() * 4);
  const Mat mx = Mat::dense(dx.data(), DType::f32, R, Cn), my = Mat::dense(dy.data(), DType::f32, R, Cn);
  ops().rmsnorm(*stream, mx, dw.data(), eps, my, 1.0f);
  EXPECT_LT(max_rel(download<float>(dy, x.size()), want), 1e-6);
  // Offset 0 is the plain RMSNorm.
  const Mat mz = Mat::dense(dz.data(), DType::f32, R, Cn);
  ops().rmsnorm(*stream, mx, dw.data(), eps, mz, 0.0f);
  const auto plain = download<float>(dz, x.size());
  ops().rmsnorm(*stream, mx, dw.data(), eps, mz);
  EXPECT_EQ(download<float>(dz, x.size()), plain);
  // In place over heads of 32: each row of 32 normalized on its own.
  auto hw = random_floats(32, 23, 0.5f);
  auto dhw = upload(hw);
  const Mat heads = Mat::dense(dx.data(), DType::f32, R * Cn / 32, 32);
  ops().rmsnorm(*stream, heads, dhw.data(), eps, heads, 1.0f);
  const auto got = download<float>(dx, x.size());
  std::vector<double> hwant(x.size());
  for (std::int64_t r = 0; r < R * Cn / 32; ++r) {
    double ss = 0;
    for (int c = 0; c < 32; ++c) ss += static_cast<double>(x[static_cast<std::size_t>(r * 32 + c)]) * x[static_cast<std::size_t>(r * 32 + c)];
    for (int c = 0; c < 32; ++c)
      hwant[static_cast<std::size_t>(r * 32 + c)] = x[static_cast<std::size_t>(r * 32 + c)] / std::sqrt(ss / 32 + eps) * (1.0 + hw[static_cast<std::size_t>(c)]);
  }
  EXPECT_LT(max_rel(got, hwant), 1e-6);
}

// Gemma 3's MLP activation: gelu_pytorch_tanh(gate)·up, in place over gate too; and the
// embedding scale.
TEST_P(OpsTest, GeluTanhGateAndScaleMatchReference) {
  const std::int64_t R = 3, Cn = 77;
  auto g = random_floats(static_cast<std::size_t>(R * Cn), 24, 4.0f), u = random_floats(static_cast<std::size_t>(R * Cn), 25);
  std::vector<double> gelu(g.size()), scaled(g.size());
  const double k = std::sqrt(2.0 / M_PI);
  for (std::size_t i = 0; i < g.size(); ++i) {
    const double x = g[i];
    gelu[i] = 0.5 * x * (1 + std::tanh(k * (x + 0.044715 * x * x * x))) * u[i];
    scaled[i] = static_cast<double>(u[i]) * 8.0;
  }
  auto dg = upload(g), du = upload(u), dout = zeros(g.size() * 4);
  const Mat mg = Mat::dense(dg.data(), DType::f32, R, Cn), mu = Mat::dense(du.data(), DType::f32, R, Cn);
  ops().gelu_tanh_mul(*stream, mg, mu, Mat::dense(dout.data(), DType::f32, R, Cn));
  EXPECT_LT(max_rel(download<float>(dout, g.size()), gelu), 1e-5);
  ops().gelu_tanh_mul(*stream, mg, mu, mg);  // in place
  EXPECT_EQ(download<float>(dg, g.size()), download<float>(dout, g.size()));
  ops().scale(*stream, mu, 8.0f);  // a power of two: exact
  EXPECT_LT(max_rel(download<float>(du, g.size()), scaled), 1e-30);
  // A row slice (ld > cols) leaves the other columns alone.
  auto dv = upload(u);
  ops().scale(*stream, Mat{dv.data(), DType::f32, R, 10, Cn}, 3.0f);
  const auto v = download<float>(dv, g.size());
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t c = 0; c < Cn; ++c) {
      const std::size_t i = static_cast<std::size_t>(r * Cn + c);
      EXPECT_EQ(v[i], c < 10 ? u[i] * 3.0f : u[i]) << r << "," << c;
    }
}

// Gemma's final_logit_softcapping: x → cap·tanh(x / cap), in place, over a row slice too.
TEST_P(OpsTest, SoftcapMatchesReferenceAndLeavesOtherColumnsAlone) {
  const std::int64_t R = 4, Cn = 53;
  const auto x = random_floats(static_cast<std::size_t>(R * Cn), 26, 6.0f);
  std::vector<double> ref(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) ref[i] = 2.5 * std::tanh(static_cast<double>(x[i]) / 2.5);
  auto dx = upload(x);
  ops().softcap(*stream, Mat::dense(dx.data(), DType::f32, R, Cn), 2.5f);
  const auto got = download<float>(dx, x.size());
  EXPECT_LT(max_rel(got, ref), 1e-6);
  for (float v : got) EXPECT_LE(std::fabs(v), 2.5f);
  auto dy = upload(x);
  ops().softcap(*stream, Mat{dy.data(), DType::f32, R, 7, Cn}, 2.5f);
  const auto y = download<float>(dy, x.size());
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t c = 0; c < Cn; ++c) {
      const std::size_t i = static_cast<std::size_t>(r * Cn + c);
      if (c < 7) EXPECT_EQ(y[i], got[i]) << r << "," << c;
      else EXPECT_EQ(y[i], x[i]) << r << "," << c;
    }
}

TEST_P(OpsTest, RopeRotatesEveryHeadByPositionTimesFrequency) {
  const int heads = 3, D = 10;
  const std::int64_t R = 9;
  auto x = random_floats(static_cast<std::size_t>(R * heads * D), 10);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(R));
  for (std::int64_t r = 0; r < R; ++r) pos[static_cast<std::size_t>(r)] = static_cast<std::int32_t>((r * 7) % 50);
  std::vector<float> freq(D / 2);
  for (int i = 0; i < D / 2; ++i) freq[static_cast<std::size_t>(i)] = std::pow(10000.0f, -2.0f * i / D);
  std::vector<double> ref(x.size());
  for (std::int64_t r = 0; r < R; ++r)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < D / 2; ++i) {
        const double ang = static_cast<double>(static_cast<float>(pos[static_cast<std::size_t>(r)]) * freq[static_cast<std::size_t>(i)]);
        const std::size_t a = static_cast<std::size_t>(r * heads * D + h * D + i), b = a + D / 2;
        ref[a] = x[a] * std::cos(ang) - x[b] * std::sin(ang);
        ref[b] = x[b] * std::cos(ang) + x[a] * std::sin(ang);
      }
  auto dx = upload(x), dp = upload(pos), df = upload(freq);
  ops().rope(*stream, Mat::dense(dx.data(), DType::f32, R, heads * D), D, dp.as<std::int32_t>(), df.as<float>());
  EXPECT_LT(max_rel(download<float>(dx, x.size()), ref), 1e-6);
}

struct AttnCase {
  int batch, seq, heads, kv_heads, head_dim;
  bool causal;
  int window = 0;  // sliding window (AttentionArgs::window): keys j > i − window only
  float softcap = 0;  // AttentionArgs::softcap: scores s → softcap·tanh(s / softcap)
};

TEST_P(OpsTest, AttentionMatchesReferenceWithPaddingAndGroupedHeads) {
  // The last four: sliding windows (Mistral) shorter than the sequence, across the CPU's
  // 64-query tiles, of one key (a row sees itself only; left-padded rows see none), and
  // longer than the sequence (no effect).
  for (const AttnCase& c : {AttnCase{2, 70, 4, 2, 8, true}, AttnCase{3, 130, 3, 1, 5, true},
                            AttnCase{1, 17, 2, 2, 16, false}, AttnCase{2, 70, 4, 2, 8, true, 9},
                            AttnCase{3, 130, 3, 1, 5, true, 66}, AttnCase{3, 40, 2, 1, 8, true, 1},
                            AttnCase{2, 33, 4, 4, 8, true, 500}, AttnCase{2, 70, 4, 2, 8, true, 0, 0.7f},
                            AttnCase{3, 130, 3, 1, 5, true, 66, 1.5f}, AttnCase{1, 17, 2, 2, 16, false, 0, 0.3f}}) {
    const std::int64_t N = static_cast<std::int64_t>(c.batch) * c.seq;
    const std::int64_t qd = c.heads * c.head_dim, kd = c.kv_heads * c.head_dim;
    auto q = random_floats(static_cast<std::size_t>(N * qd), 11), k = random_floats(static_cast<std::size_t>(N * kd), 12),
         v = random_floats(static_cast<std::size_t>(N * kd), 13);
    std::vector<std::int32_t> mask(static_cast<std::size_t>(N), 1);
    if (c.batch > 1)
      for (int t = c.seq - 9; t < c.seq; ++t) mask[static_cast<std::size_t>(c.seq + t)] = 0;  // right padding
    if (c.batch > 2)
      for (int t = 0; t < 5; ++t) mask[static_cast<std::size_t>(2 * c.seq + t)] = 0;  // left padding
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
    std::vector<double> ref(static_cast<std::size_t>(N * qd), 0.0);
    for (int b = 0; b < c.batch; ++b)
      for (int h = 0; h < c.heads; ++h) {
        const int kh = h / (c.heads / c.kv_heads);
        for (int i = 0; i < c.seq; ++i) {
          std::vector<double> s(static_cast<std::size_t>(c.seq));
          double mx = -1e300;
          bool any = false;
          for (int j = 0; j < c.seq; ++j) {
            if ((c.causal && j > i) || (c.window > 0 && j <= i - c.window) || !mask[static_cast<std::size_t>(b * c.seq + j)]) continue;
            double d = 0;
            for (int e = 0; e < c.head_dim; ++e)
              d += static_cast<double>(q[static_cast<std::size_t>((b * c.seq + i) * qd + h * c.head_dim + e)]) *
                   k[static_cast<std::size_t>((b * c.seq + j) * kd + kh * c.head_dim + e)];
            s[static_cast<std::size_t>(j)] = d * scale;
            if (c.softcap > 0) s[static_cast<std::size_t>(j)] = c.softcap * std::tanh(s[static_cast<std::size_t>(j)] / c.softcap);
            mx = std::max(mx, s[static_cast<std::size_t>(j)]);
            any = true;
          }
          if (!any) continue;
          double sum = 0;
          for (int j = 0; j < c.seq; ++j)
            if (!((c.causal && j > i) || (c.window > 0 && j <= i - c.window) || !mask[static_cast<std::size_t>(b * c.seq + j)])) sum += std::exp(s[static_cast<std::size_t>(j)] - mx);
          for (int j = 0; j < c.seq; ++j) {
            if ((c.causal && j > i) || (c.window > 0 && j <= i - c.window) || !mask[static_cast<std::size_t>(b * c.seq + j)]) continue;
            const double p = std::exp(s[static_cast<std::size_t>(j)] - mx) / sum;
            for (int e = 0; e < c.head_dim; ++e)
              ref[static_cast<std::size_t>((b * c.seq + i) * qd + h * c.head_dim + e)] +=
                  p * v[static_cast<std::size_t>((b * c.seq + j) * kd + kh * c.head_dim + e)];
          }
        }
      }
    auto dq = upload(q), dk = upload(k), dv = upload(v), dm = upload(mask);
    auto dout = upload(std::vector<float>(static_cast<std::size_t>(N * qd), 7.0f));  // garbage to overwrite
    AttentionArgs a;
    a.q = Mat::dense(dq.data(), DType::f32, N, qd);
    a.k = Mat::dense(dk.data(), DType::f32, N, kd);
    a.v = Mat::dense(dv.data(), DType::f32, N, kd);
    a.out = Mat::dense(dout.data(), DType::f32, N, qd);
    a.batch = c.batch;
    a.seq = c.seq;
    a.heads = c.heads;
    a.kv_heads = c.kv_heads;
    a.head_dim = c.head_dim;
    a.key_mask = dm.as<std::int32_t>();
    a.scale = static_cast<float>(scale);
    a.causal = c.causal;
    a.window = c.window;
    a.softcap = c.softcap;
    ops().attention(*stream, a);
    const auto out = download<float>(dout, ref.size());
    EXPECT_LT(max_rel(out, ref), 1e-5) << "T=" << c.seq << " heads " << c.heads << "/" << c.kv_heads << " window "
                                       << c.window << " softcap " << c.softcap;
    if (c.batch > 2) {  // rows with no visible key (left padding) are zero
      for (int e = 0; e < qd; ++e) EXPECT_EQ(out[static_cast<std::size_t>((2 * c.seq) * qd + e)], 0.0f);
    }
  }
}

// Generation's attention (AttentionArgs kv_seq/kv_stride, models/graph.h Note [KV cache]):
// T query rows per sequence after `past` cached ones, keys kv_stride rows apart, equal the
// last T rows of attention over the whole sequence. Rows past kv_seq hold NaN: never read.
TEST_P(OpsTest, AttentionOverAKvCacheEqualsTheLastRowsOfFullAttention) {
  // window 0: none; 9: a sliding window counted in absolute key positions, so the cached
  // call's query t (key position S − T + t) sees what row S − T + t of the full call sees.
  for (const int window : {0, 9}) {
    SCOPED_TRACE(window);
    const int B = 3, S = 70, H = 4, KVH = 2, D = 8, KS = S + 6;
    const std::int64_t qd = H * D, kd = KVH * D;
    auto q = random_floats(static_cast<std::size_t>(B * S * qd), 21), k = random_floats(static_cast<std::size_t>(B * S * kd), 22),
         v = random_floats(static_cast<std::size_t>(B * S * kd), 23);
    std::vector<std::int32_t> mask(static_cast<std::size_t>(B * S), 1);
    for (int t = 0; t < 7; ++t) mask[static_cast<std::size_t>(S + t)] = 0;  // left padding of sequence 1
    auto full = [&] {
      auto dq = upload(q), dk = upload(k), dv = upload(v), dm = upload(mask);
      auto dout = upload(std::vector<float>(static_cast<std::size_t>(B * S * qd), 7.0f));
      AttentionArgs a;
      a.q = Mat::dense(dq.data(), DType::f32, B * S, qd);
      a.k = Mat::dense(dk.data(), DType::f32, B * S, kd);
      a.v = Mat::dense(dv.data(), DType::f32, B * S, kd);
      a.out = Mat::dense(dout.data(), DType::f32, B * S, qd);
      a.batch = B;
      a.seq = S;
      a.heads = H;
      a.kv_heads = KVH;
      a.head_dim = D;
      a.key_mask = dm.as<std::int32_t>();
      a.scale = 0.35f;
      a.window = window;
      ops().attention(*stream, a);
      return download<float>(dout, static_cast<std::size_t>(B * S * qd));
    }();
    for (int T : {1, 3, S}) {
      std::vector<float> qc(static_cast<std::size_t>(B * T * qd));
      std::vector<float> kc(static_cast<std::size_t>(B * KS * kd), std::nanf("")), vc = kc;
      std::vector<std::int32_t> mc(static_cast<std::size_t>(B * KS), 1);
      for (int b = 0; b < B; ++b) {
        for (int t = 0; t < T; ++t)
          std::copy_n(q.begin() + (b * S + S - T + t) * qd, qd, qc.begin() + (b * T + t) * qd);
        std::copy_n(k.begin() + b * S * kd, S * kd, kc.begin() + b * KS * kd);
        std::copy_n(v.begin() + b * S * kd, S * kd, vc.begin() + b * KS * kd);
        std::copy_n(mask.begin() + b * S, S, mc.begin() + b * KS);
      }
      auto dq = upload(qc), dk = upload(kc), dv = upload(vc), dm = upload(mc);
      auto dout = upload(std::vector<float>(qc.size(), 7.0f));
      AttentionArgs a;
      a.q = Mat::dense(dq.data(), DType::f32, B * T, qd);
      a.k = Mat::dense(dk.data(), DType::f32, B * KS, kd);
      a.v = Mat::dense(dv.data(), DType::f32, B * KS, kd);
      a.out = Mat::dense(dout.data(), DType::f32, B * T, qd);
      a.batch = B;
      a.seq = T;
      a.kv_seq = S;
      a.kv_stride = KS;
      a.heads = H;
      a.kv_heads = KVH;
      a.head_dim = D;
      a.key_mask = dm.as<std::int32_t>();
      a.scale = 0.35f;
      a.window = window;
      ops().attention(*stream, a);
      const auto out = download<float>(dout, qc.size());
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t)
          for (int e = 0; e < qd; ++e) {
            const float want = full[static_cast<std::size_t>((b * S + S - T + t) * qd + e)];
            const float got = out[static_cast<std::size_t>((b * T + t) * qd + e)];
            ASSERT_NEAR(got, want, 1e-5f * (1.0f + std::fabs(want))) << "T=" << T << " b=" << b << " t=" << t << " e=" << e;
          }
    }
  }
}

// NaN propagates as softmax does in PyTorch: a NaN score makes its row's probabilities,
// hence its output, NaN — a row whose every score is NaN included (it used to be taken for
// "no visible key" and written as zeros, so one NaN weight gave a finite loss). Rows that
// see no NaN are unchanged, and a row with no visible key is still zeros. T = 70 crosses
// the CPU's 64-query tile.
TEST_P(OpsTest, AttentionPropagatesNanScoresToTheRowsThatSeeThem) {
  const int B = 2, T = 70, H = 2, KVH = 1, D = 8;
  const std::int64_t N = std::int64_t{B} * T, qd = H * D, kd = KVH * D;
  const auto q0 = random_floats(static_cast<std::size_t>(N * qd), 21), k0 = random_floats(static_cast<std::size_t>(N * kd), 22),
             v = random_floats(static_cast<std::size_t>(N * kd), 23);
  std::vector<std::int32_t> mask(static_cast<std::size_t>(N), 1);
  for (int t = 0; t < 3; ++t) mask[static_cast<std::size_t>(T + t)] = 0;  // batch 1: left padding
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto run = [&](const std::vector<float>& q, const std::vector<float>& k) {
    auto dq = upload(q), dk = upload(k), dv = upload(v), dm = upload(mask);
    auto dout = upload(std::vector<float>(static_cast<std::size_t>(N * qd), 7.0f));
    AttentionArgs a;
    a.q = Mat::dense(dq.data(), DType::f32, N, qd);
    a.k = Mat::dense(dk.data(), DType::f32, N, kd);
    a.v = Mat::dense(dv.data(), DType::f32, N, kd);
    a.out = Mat::dense(dout.data(), DType::f32, N, qd);
    a.batch = B;
    a.seq = T;
    a.heads = H;
    a.kv_heads = KVH;
    a.head_dim = D;
    a.key_mask = dm.as<std::int32_t>();
    a.scale = 0.35f;
    a.causal = true;
    ops().attention(*stream, a);
    return download<float>(dout, static_cast<std::size_t>(N * qd));
  };
  const auto base = run(q0, k0);
  auto at = [&](const std::vector<float>& o, std::int64_t row, int h, int e) {
    return o[static_cast<std::size_t>(row * qd + h * D + e)];
  };
  // (1) Query row 5 of head 1 (batch 0) all NaN: every score of that row is NaN.
  {
    auto q = q0;
    for (int e = 0; e < D; ++e) q[static_cast<std::size_t>(5 * qd + D + e)] = nan;
    const auto out = run(q, k0);
    for (std::int64_t r = 0; r < N; ++r)
      for (int h = 0; h < H; ++h)
        for (int e = 0; e < D; ++e) {
          if (r == 5 && h == 1) {
            EXPECT_TRUE(std::isnan(at(out, r, h, e))) << "row 5 head 1 col " << e << " = " << at(out, r, h, e);
          } else {
            EXPECT_TRUE(std::isfinite(at(out, r, h, e))) << "row " << r << " head " << h;
            EXPECT_NEAR(at(out, r, h, e), at(base, r, h, e), 1e-6) << "row " << r << " head " << h;
          }
        }
  }
  // (2) One element of key 40 (batch 0) NaN: rows 40..69 of batch 0 see it (both heads share
  // the kv head) and are NaN; rows before 40 never read a masked key's score (transformers's
  // eager attention adds the mask, NaN + min = NaN, and turns them NaN too: never fewer
  // NaN rows there than here). Batch 1 is untouched. Batch 1's first row (left padding, no
  // visible key) stays zeros.
  {
    auto k = k0;
    k[static_cast<std::size_t>(40 * kd + 3)] = nan;
    const auto out = run(q0, k);
    for (std::int64_t r = 0; r < N; ++r)
      for (int h = 0; h < H; ++h)
        for (int e = 0; e < D; ++e) {
          if (r >= 40 && r < T) {
            EXPECT_TRUE(std::isnan(at(out, r, h, e))) << "row " << r << " head " << h;
          } else {
            EXPECT_TRUE(std::isfinite(at(out, r, h, e))) << "row " << r << " head " << h;
            EXPECT_NEAR(at(out, r, h, e), at(base, r, h, e), 1e-6) << "row " << r << " head " << h;
          }
        }
    for (int h = 0; h < H; ++h)
      for (int e = 0; e < D; ++e) EXPECT_EQ(at(out, T, h, e), 0.0f);
  }
}

TEST_P(OpsTest, ReluAndSiluGateMatchReference) {
  const std::int64_t R = 3, Cn = 77;
  auto g = random_floats(static_cast<std::size_t>(R * Cn), 14, 4.0f), u = random_floats(static_cast<std::size_t>(R * Cn), 15);
  std::vector<double> silu(g.size()), relu(g.size());
  for (std::size_t i = 0; i < g.size(); ++i) {
    silu[i] = g[i] / (1 + std::exp(-static_cast<double>(g[i]))) * u[i];
    relu[i] = std::max(0.0f, g[i]);
  }
  auto dg = upload(g), du = upload(u), dout = zeros(g.size() * 4);
  ops().silu_mul(*stream, Mat::dense(dg.data(), DType::f32, R, Cn), Mat::dense(du.data(), DType::f32, R, Cn),
                 Mat::dense(dout.data(), DType::f32, R, Cn));
  EXPECT_LT(max_rel(download<float>(dout, g.size()), silu), 1e-6);
  ops().relu(*stream, Mat::dense(dg.data(), DType::f32, R, Cn));
  EXPECT_LT(max_rel(download<float>(dg, g.size()), relu), 0.0 + 1e-30);
}

TEST_P(OpsTest, EmbeddingGathersRowsAddsSignedNoiseAndZerosBadIds) {
  const std::int64_t V = 23, H = 13;
  auto table = random_floats(static_cast<std::size_t>(V * H), 16);
  const std::vector<std::int32_t> ids{3, 0, 22, 3, -1, 23, 7};
  const std::uint64_t key = 0xabcdef;
  auto dt = upload(table), di = upload(ids);
  StoredTensor st{dt.data(), DType::f32, nullptr, V, H, key};
  const NoiseArgs noise{77, 0.25f};
  for (float sign : {1.0f, -1.0f}) {
    auto dout = zeros(ids.size() * H * 4);
    ops().embedding(*stream, st, di.as<std::int32_t>(), static_cast<std::int64_t>(ids.size()),
                    Mat::dense(dout.data(), DType::f32, static_cast<std::int64_t>(ids.size()), H), &noise, sign);
    const auto out = download<float>(dout, ids.size() * H);
    for (std::size_t r = 0; r < ids.size(); ++r)
      for (std::int64_t c = 0; c < H; ++c) {
        const float got = out[r * H + static_cast<std::size_t>(c)];
        const std::int32_t id = ids[r];
        if (id < 0 || id >= V) {
          EXPECT_EQ(got, 0.0f);
          continue;
        }
        const std::uint64_t idx = static_cast<std::uint64_t>(id * H + c);
        const float want = std::fma(sign * noise.eps, noise_normal(noise.seed, key, idx),
                                    table[static_cast<std::size_t>(id * H + c)]);
        EXPECT_EQ(got, want) << "row " << r << " col " << c;
      }
  }
}

TEST_P(OpsTest, CrossEntropyOverVocabularyTilesMatchesOneShotReference) {
  const std::int64_t R = 6, V = 1001;
  auto logits = random_floats(static_cast<std::size_t>(R * V), 17, 5.0f);
  const std::vector<std::int32_t> targets{0, 1000, -100, 500, 17, 999};
  std::vector<double> ref(static_cast<std::size_t>(R), 0.0);
  double mean = 0;
  int count = 0;
  for (std::int64_t r = 0; r < R; ++r) {
    if (targets[static_cast<std::size_t>(r)] < 0) continue;
    double mx = -1e300, s = 0;
    for (std::int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(logits[static_cast<std::size_t>(r * V + v)]));
    for (std::int64_t v = 0; v < V; ++v) s += std::exp(logits[static_cast<std::size_t>(r * V + v)] - mx);
    ref[static_cast<std::size_t>(r)] = mx + std::log(s) - logits[static_cast<std::size_t>(r * V + targets[static_cast<std::size_t>(r)])];
    mean += ref[static_cast<std::size_t>(r)];
    ++count;
  }
  mean /= count;
  auto dl = upload(logits), dt = upload(targets);
  auto state = zeros(static_cast<std::size_t>(R * 3 * 4)), rowloss = zeros(static_cast<std::size_t>(R * 4)), loss = zeros(4);
  const Mat full = Mat::dense(dl.data(), DType::f32, R, V);
  for (std::int64_t v0 = 0; v0 < V; v0 += 128)
    ops().ce_accumulate(*stream, full.cols_range(v0, std::min(V, v0 + 128)), v0, dt.as<std::int32_t>(), state.as<float>(), v0 == 0);
  ops().ce_finish(*stream, state.as<float>(), dt.as<std::int32_t>(), R, rowloss.as<float>());
  ops().loss_mean(*stream, rowloss.as<float>(), dt.as<std::int32_t>(), R, loss.as<float>());
  const auto rl = download<float>(rowloss, static_cast<std::size_t>(R));
  for (std::int64_t r = 0; r < R; ++r) EXPECT_NEAR(rl[static_cast<std::size_t>(r)], ref[static_cast<std::size_t>(r)], 1e-4);
  EXPECT_NEAR(download<float>(loss, 1)[0], mean, 1e-5 * std::fabs(mean));
  EXPECT_EQ(rl[2], 0.0f);  // ignored target
}

// A NaN logit makes its row's loss NaN (wherever it is: in the target's tile or another, at
// column 0 or later) and the mean NaN, as cross_entropy does in PyTorch; other rows keep
// their finite loss.
TEST_P(OpsTest, CrossEntropyPropagatesNanLogits) {
  const std::int64_t R = 4, V = 300;
  auto logits = random_floats(static_cast<std::size_t>(R * V), 18, 3.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  logits[static_cast<std::size_t>(0 * V + 0)] = nan;    // row 0: the first column, not the target
  logits[static_cast<std::size_t>(1 * V + 200)] = nan;  // row 1: another tile than its target
  for (std::int64_t c = 0; c < V; ++c) logits[static_cast<std::size_t>(2 * V + c)] = nan;  // row 2: all
  const std::vector<std::int32_t> targets{7, 5, 9, 11};
  auto dl = upload(logits), dt = upload(targets);
  auto state = zeros(static_cast<std::size_t>(R * 3 * 4)), rowloss = zeros(static_cast<std::size_t>(R * 4)), loss = zeros(4);
  const Mat full = Mat::dense(dl.data(), DType::f32, R, V);
  for (std::int64_t v0 = 0; v0 < V; v0 += 128)
    ops().ce_accumulate(*stream, full.cols_range(v0, std::min(V, v0 + 128)), v0, dt.as<std::int32_t>(), state.as<float>(), v0 == 0);
  ops().ce_finish(*stream, state.as<float>(), dt.as<std::int32_t>(), R, rowloss.as<float>());
  ops().loss_mean(*stream, rowloss.as<float>(), dt.as<std::int32_t>(), R, loss.as<float>());
  const auto rl = download<float>(rowloss, static_cast<std::size_t>(R));
  for (int r = 0; r < 3; ++r) EXPECT_TRUE(std::isnan(rl[static_cast<std::size_t>(r)])) << "row " << r << ": " << rl[static_cast<std::size_t>(r)];
  EXPECT_TRUE(std::isfinite(rl[3])) << rl[3];
  EXPECT_TRUE(std::isnan(download<float>(loss, 1)[0]));
}

TEST_P(OpsTest, LossMeanWithoutTargetsIsNan) {
  const std::vector<float> rl{1, 2};
  const std::vector<std::int32_t> t{-100, -100};
  auto drl = upload(rl), dt = upload(t), out = zeros(4);
  ops().loss_mean(*stream, drl.as<float>(), dt.as<std::int32_t>(), 2, out.as<float>());
  EXPECT_TRUE(std::isnan(download<float>(out, 1)[0]));
}

// MeZO's multiple-choice loss: groups of 2, 3 and 1 candidates of odd length, some
// positions without a target, against a two-pass reference in double.
TEST_P(OpsTest, OptionLossIsCrossEntropyOverMeanLogLikelihoods) {
  const int B = 6, T = 7;
  const auto rl = random_floats(static_cast<std::size_t>(B * T), 41);
  std::vector<float> row_loss(rl.size());
  for (std::size_t i = 0; i < rl.size(); ++i) row_loss[i] = 2.0f + 1.5f * rl[i];  // positive, like CE
  std::vector<std::int32_t> targets(row_loss.size());
  for (std::size_t i = 0; i < targets.size(); ++i) targets[i] = (i % T) < 3 ? -100 : static_cast<std::int32_t>(i);
  const std::vector<std::int32_t> info{0 * 2 + 0, 0 * 2 + 1, 1 * 2 + 1, 1 * 2, 1 * 2, 2 * 2 + 1};
  double expect = 0;
  for (const auto& [r0, r1] : std::vector<std::pair<int, int>>{{0, 2}, {2, 5}, {5, 6}}) {
    std::vector<double> score;
    double label = 0;
    for (int r = r0; r < r1; ++r) {
      double sum = 0;
      int n = 0;
      for (int t = 0; t < T; ++t)
        if (targets[static_cast<std::size_t>(r * T + t)] >= 0) sum += row_loss[static_cast<std::size_t>(r * T + t)], ++n;
      score.push_back(-sum / n);
      if (info[static_cast<std::size_t>(r)] & 1) label = score.back();
    }
    double se = 0;
    for (double x : score) se += std::exp(x);
    expect += std::log(se) - label;
  }
  expect /= 3;
  auto drl = upload(row_loss), dt = upload(targets), di = upload(info), out = zeros(4);
  ops().option_loss(*stream, drl.as<float>(), dt.as<std::int32_t>(), B, T, di.as<std::int32_t>(), out.as<float>());
  EXPECT_NEAR(download<float>(out, 1)[0], expect, 1e-6 * std::fabs(expect));

  // A group without its label, or a candidate without targets, gives NaN.
  const std::vector<std::int32_t> no_label{1, 0, 2, 2, 2, 5};
  auto dn = upload(no_label);
  ops().option_loss(*stream, drl.as<float>(), dt.as<std::int32_t>(), B, T, dn.as<std::int32_t>(), out.as<float>());
  EXPECT_TRUE(std::isnan(download<float>(out, 1)[0]));
  std::vector<std::int32_t> t2 = targets;
  for (int t = 0; t < T; ++t) t2[static_cast<std::size_t>(4 * T + t)] = -100;
  auto dt2 = upload(t2);
  ops().option_loss(*stream, drl.as<float>(), dt2.as<std::int32_t>(), B, T, di.as<std::int32_t>(), out.as<float>());
  EXPECT_TRUE(std::isnan(download<float>(out, 1)[0]));
}

// Stored tensors of each storage dtype built from fp32 values.
struct Stored {
  std::vector<std::uint8_t> bytes;
  std::vector<float> scales;
};
Stored store_as(const std::vector<float>& v, std::int64_t rows, std::int64_t cols, DType dt) {
  Stored s;
  s.bytes.resize(v.size() * dtype_size(dt));
  if (dt == DType::f8_e4m3) {
    s.scales.resize(static_cast<std::size_t>(rows));
    for (std::int64_t r = 0; r < rows; ++r) {
      float m = 0;
      for (std::int64_t c = 0; c < cols; ++c) m = std::max(m, std::fabs(v[static_cast<std::size_t>(r * cols + c)]));
      s.scales[static_cast<std::size_t>(r)] = m / kE4M3Max;
      for (std::int64_t c = 0; c < cols; ++c)
        s.bytes[static_cast<std::size_t>(r * cols + c)] = f32_to_e4m3(v[static_cast<std::size_t>(r * cols + c)] / s.scales[static_cast<std::size_t>(r)]);
    }
    return s;
  }
  for (std::size_t i = 0; i < v.size(); ++i) store_element(s.bytes.data(), dt, static_cast<std::int64_t>(i), v[i]);
  return s;
}

TEST_P(OpsTest, PerturbWritesWPlusAndWMinusForEveryStorageAndComputeDtype) {
  const std::int64_t R = 9, Cn = 11;  // 99 elements: groups of four cross rows
  const auto w = random_floats(static_cast<std::size_t>(R * Cn), 18);
  const NoiseArgs noise{12345, 1e-2f};
  const std::uint64_t key = 99;
  for (DType sdt : {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3})
    for (DType cdt : {DType::f32, DType::bf16, DType::f16}) {
      const Stored s = store_as(w, R, Cn, sdt);
      auto dw = upload(s.bytes);
      DeviceBuffer dsc;
      if (!s.scales.empty()) dsc = upload(s.scales);
      StoredTensor st{dw.data(), sdt, s.scales.empty() ? nullptr : dsc.as<float>(), R, Cn, key};
      const std::int64_t r0 = 2, r1 = 7, n = (r1 - r0) * Cn;
      auto plus = zeros(static_cast<std::size_t>(n) * 4), minus = zeros(static_cast<std::size_t>(n) * 4);
      ops().perturb(*stream, st, r0, r1, &noise, plus.data(), minus.data(), cdt);
      const auto p = download<std::uint8_t>(plus, static_cast<std::size_t>(n) * dtype_size(cdt));
      const auto m = download<std::uint8_t>(minus, static_cast<std::size_t>(n) * dtype_size(cdt));
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t e = r0 * Cn + i;
        const float x = load_element(s.bytes.data(), sdt, e, s.scales.empty() ? 1.0f : s.scales[static_cast<std::size_t>(e / Cn)]);
        const float z = noise_normal(noise.seed, key, static_cast<std::uint64_t>(e));
        std::vector<std::uint8_t> want(4);
        store_element(want.data(), cdt, 0, std::fma(noise.eps, z, x));
        ASSERT_EQ(std::memcmp(p.data() + i * static_cast<std::int64_t>(dtype_size(cdt)), want.data(), dtype_size(cdt)), 0)
            << dtype_name(sdt) << "→" << dtype_name(cdt) << " element " << e;
        store_element(want.data(), cdt, 0, std::fma(-noise.eps, z, x));
        ASSERT_EQ(std::memcmp(m.data() + i * static_cast<std::int64_t>(dtype_size(cdt)), want.data(), dtype_size(cdt)), 0);
      }
      // Without noise: a plain dequantization.
      ops().perturb(*stream, st, 0, R, nullptr, plus.data(), nullptr, DType::f32);
      const auto d = download<float>(plus, static_cast<std::size_t>(R * Cn) > static_cast<std::size_t>(n) ? static_cast<std::size_t>(n) : static_cast<std::size_t>(n));
      for (std::int64_t i = 0; i < n && i < R * Cn; ++i)
        ASSERT_EQ(d[static_cast<std::size_t>(i)], load_element(s.bytes.data(), sdt, i, s.scales.empty() ? 1.0f : s.scales[static_cast<std::size_t>(i / Cn)]));
    }
}

TEST_P(OpsTest, SpsaGradIsTheLossDifferenceOverTwoEps) {
  const std::vector<float> lp{2.5f}, lm{2.25f};
  auto dp = upload(lp), dm = upload(lm), g = zeros(4);
  ops().spsa_grad(*stream, dp.as<float>(), dm.as<float>(), 1e-3f, g.as<float>());
  EXPECT_EQ(download<float>(g, 1)[0], (2.5f - 2.25f) / (2 * 1e-3f));
}

TEST_P(OpsTest, Fp32UpdateIsExactlyTheFormulaAndSkipsNonFiniteG) {
  const std::int64_t R = 5, Cn = 7;
  const auto w = random_floats(static_cast<std::size_t>(R * Cn), 19);
  auto dw = upload(w);
  const std::vector<float> g{3.5f};
  auto dg = upload(g);
  StoredTensor st{dw.data(), DType::f32, nullptr, R, Cn, 4242};
  UpdateArgs a{777, 1e-3f, 0.1f, dg.as<float>(), 777};
  ops().update(*stream, st, a);
  const auto out = download<float>(dw, w.size());
  for (std::size_t i = 0; i < w.size(); ++i) {
    const float z = noise_normal(777, 4242, i);
    EXPECT_EQ(out[i], std::fma(-1e-3f, std::fma(0.1f, w[i], 3.5f * z), w[i])) << i;
  }
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto dbad = upload(std::vector<float>{bad});
    a.g = dbad.as<float>();
    ops().update(*stream, st, a);
    EXPECT_EQ(download<float>(dw, w.size()), out) << "a non-finite g must leave W unchanged";
  }
}

TEST_P(OpsTest, NarrowStorageUpdatesRoundStochasticallyAndFp8RescalesRows) {
  const std::int64_t R = 4, Cn = 33;
  const auto w = random_floats(static_cast<std::size_t>(R * Cn), 20);
  const std::vector<float> g{-50.0f};
  auto dg = upload(g);
  for (DType sdt : {DType::bf16, DType::f16, DType::f8_e4m3}) {
    const Stored s = store_as(w, R, Cn, sdt);
    auto dw = upload(s.bytes);
    DeviceBuffer dsc;
    if (!s.scales.empty()) dsc = upload(s.scales);
    StoredTensor st{dw.data(), sdt, s.scales.empty() ? nullptr : dsc.as<float>(), R, Cn, 31337};
    const UpdateArgs a{5, 1e-2f, 0.0f, dg.as<float>(), 6};
    ops().update(*stream, st, a);
    const auto out = download<std::uint8_t>(dw, s.bytes.size());
    std::vector<float> scales = s.scales;
    if (!scales.empty()) scales = download<float>(dsc, scales.size());
    for (std::int64_t r = 0; r < R; ++r) {
      float absmax = 0;
      std::vector<float> exact(static_cast<std::size_t>(Cn));
      for (std::int64_t c = 0; c < Cn; ++c) {
        const std::int64_t e = r * Cn + c;
        const float x = load_element(s.bytes.data(), sdt, e, s.scales.empty() ? 1.0f : s.scales[static_cast<std::size_t>(r)]);
        exact[static_cast<std::size_t>(c)] = updated(x, noise_normal(5, 31337, static_cast<std::uint64_t>(e)), -50.0f, 1e-2f, 0.0f);
        absmax = std::max(absmax, std::fabs(exact[static_cast<std::size_t>(c)]));
      }
      if (sdt == DType::f8_e4m3) {
        EXPECT_EQ(scales[static_cast<std::size_t>(r)], absmax / kE4M3Max) << "row " << r;
      }
      for (std::int64_t c = 0; c < Cn; ++c) {
        const std::int64_t e = r * Cn + c;
        const float scale = sdt == DType::f8_e4m3 ? scales[static_cast<std::size_t>(r)] : 1.0f;
        const float v = sdt == DType::f8_e4m3 ? exact[static_cast<std::size_t>(c)] / scale : exact[static_cast<std::size_t>(c)];
        std::vector<std::uint8_t> want(4);
        store_element_sr(want.data(), sdt, 0, v, rounding_bits(6, 31337, static_cast<std::uint64_t>(e)));
        ASSERT_EQ(std::memcmp(out.data() + e * static_cast<std::int64_t>(dtype_size(sdt)), want.data(), dtype_size(sdt)), 0)
            << dtype_name(sdt) << " element " << e;
      }
    }
  }
}

// Sub-block streaming (StoredTensor::first_row) tiles a tensor into row ranges that start on
// a group of four elements (r0·cols % 4 == 0); each tiling below ends with a partial tile.
// 13 columns: groups of four straddle rows and tiles start on rows ≡ 0 mod 4; 6 columns:
// tiles start on even rows; 260 columns: a tile spans several CPU chunks.
struct Tiling {
  std::int64_t rows, cols, tile;
};
constexpr Tiling kTilings[] = {{148, 13, 40}, {150, 6, 18}, {148, 260, 100}};

// Perturbing a tile equals perturbing the same rows of the whole tensor, bit for bit: the
// whole tile and rows inside it (the range itself need not start on a group).
TEST_P(OpsTest, PerturbOfATileEqualsTheWholeTensorsRowsBitForBit) {
  const NoiseArgs noise{4242, 1e-2f};
  for (const Tiling& t : kTilings)
    for (DType sdt : {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3}) {
      const Stored s = store_as(random_floats(static_cast<std::size_t>(t.rows * t.cols), 21), t.rows, t.cols, sdt);
      auto dw = upload(s.bytes);
      DeviceBuffer dsc;
      if (!s.scales.empty()) dsc = upload(s.scales);
      const StoredTensor whole{dw.data(), sdt, s.scales.empty() ? nullptr : dsc.as<float>(), t.rows, t.cols, 0x7a11};
      for (DType cdt : {DType::f32, DType::bf16, DType::f16}) {
        const std::size_t bytes = static_cast<std::size_t>(t.tile * t.cols) * dtype_size(cdt);
        auto want_plus = zeros(bytes), want_minus = zeros(bytes), got_plus = zeros(bytes), got_minus = zeros(bytes);
        for (std::int64_t r0 = 0; r0 < t.rows; r0 += t.tile) {
          const std::int64_t r1 = std::min(t.rows, r0 + t.tile);
          const StoredTensor part = test::tile(whole, r0, r1);
          for (const auto& [b, e] : {std::pair{std::int64_t{0}, r1 - r0}, std::pair{std::int64_t{1}, r1 - r0 - 1}}) {
            ops().perturb(*stream, whole, r0 + b, r0 + e, &noise, want_plus.data(), want_minus.data(), cdt);
            ops().perturb(*stream, part, b, e, &noise, got_plus.data(), got_minus.data(), cdt);
            const std::size_t n = static_cast<std::size_t>((e - b) * t.cols) * dtype_size(cdt);
            const std::string what = std::string(dtype_name(sdt)) + "→" + std::string(dtype_name(cdt)) + ", " +
                                     std::to_string(t.cols) + " columns, tile rows [" + std::to_string(r0) + ", " +
                                     std::to_string(r1) + "), local rows [" + std::to_string(b) + ", " +
                                     std::to_string(e) + ")";
            ASSERT_EQ(download<std::uint8_t>(got_plus, n), download<std::uint8_t>(want_plus, n)) << what << ": W + eps·z";
            ASSERT_EQ(download<std::uint8_t>(got_minus, n), download<std::uint8_t>(want_minus, n)) << what << ": W − eps·z";
          }
        }
      }
    }
}

// Updating a tensor tile by tile equals updating it whole, bit for bit: the values (z and,
// for narrow dtypes, the rounding bits at the whole tensor's indices) and the fp8 row scales.
TEST_P(OpsTest, UpdateTileByTileEqualsTheWholeTensorUpdateBitForBit) {
  auto dg = upload(std::vector<float>{-7.5f});
  const UpdateArgs a{11, 1e-2f, 0.1f, dg.as<float>(), 12};
  for (const Tiling& t : kTilings)
    for (DType sdt : {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3}) {
      const Stored s = store_as(random_floats(static_cast<std::size_t>(t.rows * t.cols), 22), t.rows, t.cols, sdt);
      auto whole_w = upload(s.bytes), tiled_w = upload(s.bytes);
      DeviceBuffer whole_sc, tiled_sc;
      if (!s.scales.empty()) {
        whole_sc = upload(s.scales);
        tiled_sc = upload(s.scales);
      }
      auto stored = [&](DeviceBuffer& w, DeviceBuffer& sc) {
        return StoredTensor{w.data(), sdt, s.scales.empty() ? nullptr : sc.as<float>(), t.rows, t.cols, 0xb10c};
      };
      ops().update(*stream, stored(whole_w, whole_sc), a);
      const StoredTensor tiled = stored(tiled_w, tiled_sc);
      for (std::int64_t r0 = 0; r0 < t.rows; r0 += t.tile)
        ops().update(*stream, test::tile(tiled, r0, std::min(t.rows, r0 + t.tile)), a);
      const std::string what = std::string(dtype_name(sdt)) + ", " + std::to_string(t.cols) + " columns";
      const auto want = download<std::uint8_t>(whole_w, s.bytes.size());
      ASSERT_NE(want, s.bytes) << what << ": nothing changed";
      ASSERT_EQ(download<std::uint8_t>(tiled_w, s.bytes.size()), want) << what;
      if (!s.scales.empty())
        ASSERT_EQ(download<float>(tiled_sc, s.scales.size()), download<float>(whole_sc, s.scales.size())) << what;
    }
}

TEST_P(OpsTest, TilesOffAGroupOfFourAndTiledEmbeddingTablesAreInternalErrors) {
  const std::int64_t R = 8, Cn = 6;
  auto dw = upload(random_floats(static_cast<std::size_t>(R * Cn), 23));
  auto dg = upload(std::vector<float>{1.0f});
  auto out = zeros(static_cast<std::size_t>(R * Cn) * 4);
  const StoredTensor whole{dw.data(), DType::f32, nullptr, R, Cn, 5};
  const StoredTensor off = test::tile(whole, 1, 5);  // starts at element 6
  auto expect_internal = [&](auto fn, const char* what) {
    const Error e = test::error_of(fn);
    EXPECT_EQ(e.kind(), ErrorKind::internal) << what << ": " << e.what();
  };
  const NoiseArgs noise{1, 1e-3f};
  expect_internal([&] { ops().perturb(*stream, off, 0, 4, &noise, out.data(), nullptr, DType::f32); }, "perturb");
  expect_internal([&] { ops().update(*stream, off, UpdateArgs{1, 1e-3f, 0.0f, dg.as<float>(), 2}); }, "update");
  // Ids index the whole table: an embedding table is never a tile, even on a group.
  auto ids = upload(std::vector<std::int32_t>{0, 1});
  expect_internal([&] {
    ops().embedding(*stream, test::tile(whole, 2, 6), ids.as<std::int32_t>(), 2,
                    Mat::dense(out.data(), DType::f32, 2, Cn), &noise, 1.0f);
  }, "embedding");
}

INSTANTIATE_TEST_SUITE_P(Backends, OpsTest, ::testing::ValuesIn(test::backend_names()), test::backend_test_name);

}  // namespace
}  // namespace zo2
