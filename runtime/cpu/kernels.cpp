// CPU kernels for the forward pass (fp32). GEMMs go to OpenBLAS (single-threaded per
// call, split across TBB tasks by output columns in a fixed way); everything else is plain
// loops over rows, parallel over fixed chunks. Reductions accumulate in double.
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/noise_simd.h"

#include "runtime/common.h"
#include "runtime/element.h"
#include "runtime/error.h"

#include <cblas.h>
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/partitioner.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace zo2::cpu {

#if defined(ZO2_TSAN)
namespace {
// oneTBB from Debian is not instrumented for ThreadSanitizer: its task hand-offs would read
// as races. The TSan build keeps TBB on the calling thread; zo2's own threads (the
// streams), which are what TSan is there to judge, stay concurrent.
tbb::global_control g_tsan_serial_tbb(tbb::global_control::max_allowed_parallelism, 1);
}  // namespace
#endif

void parallel_for(std::int64_t n, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& body) {
  if (n <= 0) return;
  grain = std::max<std::int64_t>(grain, 1);
  const std::int64_t chunks = ceil_div(n, grain);
#if defined(ZO2_TSAN)
  // oneTBB from Debian is not instrumented for ThreadSanitizer; run chunks in order so
  // TSan judges only zo2's own threads (the streams), which is what it is there for.
  for (std::int64_t c = 0; c < chunks; ++c) body(c * grain, std::min(n, (c + 1) * grain));
#else
  if (chunks == 1) {
    body(0, n);
    return;
  }
  tbb::parallel_for(
      tbb::blocked_range<std::int64_t>(0, chunks, 1),
      [&](const tbb::blocked_range<std::int64_t>& r) {
        for (std::int64_t c = r.begin(); c != r.end(); ++c)
          body(c * grain, std::min(n, (c + 1) * grain));
      },
      tbb::simple_partitioner());
#endif
}

namespace {

void require_f32(const Mat& m, const char* op, const char* what) {
  if (m.dtype != DType::f32)
    fail(ErrorKind::unsupported, "cpu {}: {} is {}; the CPU backend computes in fp32", op, what,
         dtype_name(m.dtype));
}

float* f32(const Mat& m) { return static_cast<float*>(m.data); }

// max that propagates NaN, as torch.max and softmax do (std::max(a, NaN) returns a): the
// softmax and cross-entropy maxima use it, so a NaN score or logit is never skipped.
float max_nan(float a, float b) { return a > b || std::isnan(a) ? a : b; }

}  // namespace

void gemm(const Mat& a, bool trans_a, const Mat& b, bool trans_b, const Mat& c, float alpha,
          float beta) {
  require_f32(a, "gemm", "A");
  require_f32(b, "gemm", "B");
  require_f32(c, "gemm", "C");
  const std::int64_t m = trans_a ? a.cols : a.rows;
  const std::int64_t k = trans_a ? a.rows : a.cols;
  const std::int64_t kb = trans_b ? b.cols : b.rows;
  const std::int64_t n = trans_b ? b.rows : b.cols;
  if (kb != k || c.rows != m || c.cols != n)
    fail(ErrorKind::internal, "cpu gemm: shapes do not match (A {}x{}{}, B {}x{}{}, C {}x{})",
         a.rows, a.cols, trans_a ? "ᵀ" : "", b.rows, b.cols, trans_b ? "ᵀ" : "", c.rows, c.cols);
  if (m == 0 || n == 0) return;
  const auto ta = trans_a ? CblasTrans : CblasNoTrans;
  const auto tb = trans_b ? CblasTrans : CblasNoTrans;
  const float* pa = static_cast<const float*>(a.data);
  const float* pb = static_cast<const float*>(b.data);
  float* pc = f32(c);
  // Split the output columns into fixed chunks of 64·j columns when the work is large.
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  std::int64_t chunk = n;
  if (flops > 4e6 && n >= 128) chunk = std::max<std::int64_t>(64, align_up(ceil_div(n, 16), 64));
  parallel_for(n, chunk, [&](std::int64_t n0, std::int64_t n1) {
    const float* pb0 = trans_b ? pb + n0 * b.ld : pb + n0;
    cblas_sgemm(CblasRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n1 - n0),
                static_cast<int>(k), alpha, pa, static_cast<int>(a.ld), pb0,
                static_cast<int>(b.ld), beta, pc + n0, static_cast<int>(c.ld));
  });
}

void add_bias(const Mat& y, const void* bias) {
  require_f32(y, "add_bias", "y");
  const float* b = static_cast<const float*>(bias);
  parallel_for(y.rows, std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(y.cols, 1)),
               [&](std::int64_t r0, std::int64_t r1) {
                 for (std::int64_t r = r0; r < r1; ++r) {
                   float* row = f32(y) + r * y.ld;
                   for (std::int64_t c = 0; c < y.cols; ++c) row[c] += b[c];
                 }
               });
}

void add(const Mat& y, const Mat& x) {
  require_f32(y, "add", "y");
  require_f32(x, "add", "x");
  parallel_for(y.rows, std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(y.cols, 1)),
               [&](std::int64_t r0, std::int64_t r1) {
                 for (std::int64_t r = r0; r < r1; ++r) {
                   float* dst = f32(y) + r * y.ld;
                   const float* src = f32(x) + r * x.ld;
                   for (std::int64_t c = 0; c < y.cols; ++c) dst[c] += src[c];
                 }
               });
}

void layernorm(const Mat& x, const void* weight, const void* bias, float eps, const Mat& y) {
  require_f32(x, "layernorm", "x");
  require_f32(y, "layernorm", "y");
  const float* w = static_cast<const float*>(weight);
  const float* b = static_cast<const float*>(bias);
  const std::int64_t n = x.cols;
  parallel_for(x.rows, 8, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const float* in = f32(x) + r * x.ld;
      float* out = f32(y) + r * y.ld;
      double sum = 0;
      for (std::int64_t c = 0; c < n; ++c) sum += in[c];
      const double mean = sum / static_cast<double>(n);
      double var = 0;
      for (std::int64_t c = 0; c < n; ++c) {
        const double d = in[c] - mean;
        var += d * d;
      }
      var /= static_cast<double>(n);
      const double inv = 1.0 / std::sqrt(var + static_cast<double>(eps));
      for (std::int64_t c = 0; c < n; ++c) {
        const float v = static_cast<float>((in[c] - mean) * inv);
        out[c] = b ? v * w[c] + b[c] : v * w[c];
      }
    }
  });
}

void rmsnorm(const Mat& x, const void* weight, float eps, const Mat& y, float weight_offset) {
  require_f32(x, "rmsnorm", "x");
  require_f32(y, "rmsnorm", "y");
  const float* w = static_cast<const float*>(weight);
  const std::int64_t n = x.cols;
  parallel_for(x.rows, 8, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const float* in = f32(x) + r * x.ld;
      float* out = f32(y) + r * y.ld;
      double ss = 0;
      for (std::int64_t c = 0; c < n; ++c) ss += static_cast<double>(in[c]) * in[c];
      const float inv =
          static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + static_cast<double>(eps)));
      if (weight_offset == 0.0f) {
        for (std::int64_t c = 0; c < n; ++c) out[c] = w[c] * (in[c] * inv);
      } else {  // Gemma 3: (x·inv)·(offset + w), the factor in fp32
        for (std::int64_t c = 0; c < n; ++c) out[c] = (in[c] * inv) * (weight_offset + w[c]);
      }
    }
  });
}

void rope(const Mat& x, int head_dim, const std::int32_t* positions, const float* inv_freq) {
  require_f32(x, "rope", "x");
  const int half = head_dim / 2;
  const std::int64_t heads = x.cols / head_dim;
  parallel_for(x.rows, 4, [&](std::int64_t r0, std::int64_t r1) {
    std::vector<float> cs(static_cast<std::size_t>(half)), sn(static_cast<std::size_t>(half));
    for (std::int64_t r = r0; r < r1; ++r) {
      const float pos = static_cast<float>(positions[r]);
      for (int i = 0; i < half; ++i) {
        const float angle = pos * inv_freq[i];  // fp32, as transformers computes it
        cs[static_cast<std::size_t>(i)] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sn[static_cast<std::size_t>(i)] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
      float* row = f32(x) + r * x.ld;
      for (std::int64_t h = 0; h < heads; ++h) {
        float* v = row + h * head_dim;
        for (int i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          const float c = cs[static_cast<std::size_t>(i)], s = sn[static_cast<std::size_t>(i)];
          v[i] = a * c - b * s;
          v[i + half] = b * c + a * s;
        }
      }
    }
  });
}

void attention(const AttentionArgs& p) {
  require_f32(p.q, "attention", "q");
  require_f32(p.k, "attention", "k");
  require_f32(p.v, "attention", "v");
  require_f32(p.out, "attention", "out");
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0)
    fail(ErrorKind::internal, "cpu attention: {} heads not a multiple of {} kv heads", p.heads,
         p.kv_heads);
  const int T = p.seq, D = p.head_dim;
  const int S = p.keys(), KS = p.key_stride(), off = p.query_offset();  // keys, their stride, q's offset
  if (S < T || KS < S)
    fail(ErrorKind::internal, "cpu attention: {} keys (stride {}) for {} queries per sequence", S, KS, T);
  const int group = p.heads / p.kv_heads;
  constexpr int kTile = 64;  // query rows per task: scores use kTile·T floats, not T·T per head
  const std::int64_t tiles = ceil_div(T, kTile);
  const std::int64_t tasks = static_cast<std::int64_t>(p.batch) * p.heads * tiles;
  parallel_for(tasks, 1, [&](std::int64_t t0, std::int64_t t1) {
    std::vector<float> scores;
    for (std::int64_t task = t0; task < t1; ++task) {
      const int tile = static_cast<int>(task % tiles);
      const int h = static_cast<int>((task / tiles) % p.heads);
      const int b = static_cast<int>(task / tiles / p.heads);
      const int kvh = h / group;
      const int q0 = tile * kTile, q1 = std::min(T, q0 + kTile);
      const int nq = q1 - q0;
      const int nk = p.causal ? off + q1 : S;  // keys any row of this tile can see
      scores.assign(static_cast<std::size_t>(nq) * nk, 0.0f);
      const float* q = f32(p.q) + (static_cast<std::int64_t>(b) * T + q0) * p.q.ld + h * D;
      const float* k = f32(p.k) + static_cast<std::int64_t>(b) * KS * p.k.ld + kvh * D;
      const float* v = f32(p.v) + static_cast<std::int64_t>(b) * KS * p.v.ld + kvh * D;
      float* o = f32(p.out) + (static_cast<std::int64_t>(b) * T + q0) * p.out.ld + h * D;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, D, p.scale, q,
                  static_cast<int>(p.q.ld), k, static_cast<int>(p.k.ld), 0.0f, scores.data(), nk);
      const std::int32_t* mask = p.key_mask ? p.key_mask + static_cast<std::int64_t>(b) * KS : nullptr;
      for (int i = 0; i < nq; ++i) {
        float* s = scores.data() + static_cast<std::size_t>(i) * nk;
        const int last = p.causal ? off + q0 + i : nk - 1;
        const int first = p.first_key(off + q0 + i);  // sliding window (0: none)
        if (p.softcap > 0)
          for (int j = first; j <= last; ++j) s[j] = softcap_of(s[j], p.softcap);
        // The max propagates NaN (std::max would skip it): a NaN score makes the row's
        // P and output NaN, as softmax does in PyTorch — never "no visible key" (zeros).
        float mx = -std::numeric_limits<float>::infinity();
        for (int j = first; j <= last; ++j)
          if (!mask || mask[j]) mx = max_nan(mx, s[j]);
        if (mx == -std::numeric_limits<float>::infinity()) {
          std::fill(s, s + nk, 0.0f);  // no visible key: a zero output row
          continue;
        }
        double sum = 0;
        for (int j = 0; j < nk; ++j) {
          if (j >= first && j <= last && (!mask || mask[j])) {
            s[j] = std::exp(s[j] - mx);
            sum += s[j];
          } else {
            s[j] = 0.0f;
          }
        }
        const float inv = static_cast<float>(1.0 / sum);
        for (int j = 0; j <= last; ++j) s[j] *= inv;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, D, nk, 1.0f, scores.data(), nk,
                  v, static_cast<int>(p.v.ld), 0.0f, o, static_cast<int>(p.out.ld));
    }
  });
}

void relu(const Mat& x) {
  require_f32(x, "relu", "x");
  parallel_for(x.rows, std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(x.cols, 1)),
               [&](std::int64_t r0, std::int64_t r1) {
                 for (std::int64_t r = r0; r < r1; ++r) {
                   float* row = f32(x) + r * x.ld;
                   for (std::int64_t c = 0; c < x.cols; ++c) row[c] = std::max(row[c], 0.0f);
                 }
               });
}

namespace {
// The gated MLP's act(gate)·up, row by row.
template <class Act>
void gated_mul(const Mat& gate, const Mat& up, const Mat& out, const char* name, Act act) {
  require_f32(gate, name, "gate");
  require_f32(up, name, "up");
  require_f32(out, name, "out");
  parallel_for(out.rows, std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(out.cols, 1)),
               [&](std::int64_t r0, std::int64_t r1) {
                 for (std::int64_t r = r0; r < r1; ++r) {
                   const float* g = f32(gate) + r * gate.ld;
                   const float* u = f32(up) + r * up.ld;
                   float* o = f32(out) + r * out.ld;
                   for (std::int64_t c = 0; c < out.cols; ++c) o[c] = act(g[c]) * u[c];
                 }
               });
}
}  // namespace

void silu_mul(const Mat& gate, const Mat& up, const Mat& out) {
  gated_mul(gate, up, out, "silu_mul", [](float g) { return g / (1.0f + std::exp(-g)); });
}

void gelu_tanh_mul(const Mat& gate, const Mat& up, const Mat& out) {
  gated_mul(gate, up, out, "gelu_tanh_mul", [](float x) {
    const float inner = kGeluTanhK * (x + kGeluTanhC * (x * x * x));
    return (0.5f * x) * (1.0f + std::tanh(inner));
  });
}

namespace {
// In place, element for element: x = op(x) (scale, softcap).
template <class Op>
void map_in_place(const Mat& x, const char* name, Op op) {
  require_f32(x, name, "x");
  parallel_for(x.rows, std::max<std::int64_t>(1, 16384 / std::max<std::int64_t>(x.cols, 1)),
               [&](std::int64_t r0, std::int64_t r1) {
                 for (std::int64_t r = r0; r < r1; ++r) {
                   float* row = f32(x) + r * x.ld;
                   for (std::int64_t c = 0; c < x.cols; ++c) row[c] = op(row[c]);
                 }
               });
}
}  // namespace

void scale(const Mat& x, float alpha) {
  map_in_place(x, "scale", [alpha](float v) { return v * alpha; });
}

void softcap(const Mat& x, float cap) {
  map_in_place(x, "softcap", [cap](float v) { return softcap_of(v, cap); });
}

void check_embedding_table(const StoredTensor& table) {
  // Ids index the whole table, so a tile of it has no meaning here.
  if (table.first_row != 0)
    fail(ErrorKind::internal, "cpu embedding: the table is a tile from row {}; embedding takes whole tables",
         table.first_row);
}

void embedding(const StoredTensor& table, const std::int32_t* ids, std::int64_t n,
               const Mat& out, const NoiseArgs* noise, float sign) {
  check_embedding_table(table);
  const std::int64_t h = table.cols;
  parallel_for(n, 4, [&](std::int64_t r0, std::int64_t r1) {
    std::vector<float> z;
    for (std::int64_t r = r0; r < r1; ++r) {
      const std::int64_t id = ids[r];
      void* dst = static_cast<char*>(out.data) +
                  r * out.ld * static_cast<std::int64_t>(dtype_size(out.dtype));
      if (id < 0 || id >= table.rows) {
        for (std::int64_t c = 0; c < h; ++c) store_element(dst, out.dtype, c, 0.0f);
        continue;
      }
      const float scale = table.row_scales ? table.row_scales[id] : 1.0f;
      const std::int64_t base = id * h;
      const std::int64_t q0 = base / 4, q1 = (base + h + 3) / 4;
      if (noise) {
        z.resize(static_cast<std::size_t>((q1 - q0) * 4));
        noise_normals(noise->seed, table.key, static_cast<std::uint64_t>(q0), q1 - q0, z.data());
      }
      const float signed_eps = noise ? sign * noise->eps : 0.0f;
      for (std::int64_t c = 0; c < h; ++c) {
        float w = load_element(table.data, table.dtype, base + c, scale);
        if (noise) w = perturbed(w, z[static_cast<std::size_t>(base + c - q0 * 4)], signed_eps);
        store_element(dst, out.dtype, c, w);
      }
    }
  });
}

void ce_accumulate(const Mat& logits, std::int64_t col_offset, const std::int32_t* targets,
                   float* state, bool first) {
  require_f32(logits, "ce_accumulate", "logits");
  const std::int64_t v = logits.cols;
  parallel_for(logits.rows, 1, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      float* st = state + 3 * r;
      const float* x = f32(logits) + r * logits.ld;
      float mx = x[0];
      for (std::int64_t c = 1; c < v; ++c) mx = max_nan(mx, x[c]);
      double sum = 0;
      for (std::int64_t c = 0; c < v; ++c) sum += std::exp(static_cast<double>(x[c] - mx));
      const std::int64_t t = targets[r] - col_offset;
      const bool has_target = t >= 0 && t < v;
      if (first) {
        st[0] = mx;
        st[1] = static_cast<float>(sum);
        st[2] = has_target ? x[t] : 0.0f;
        continue;
      }
      const float m_new = max_nan(st[0], mx);
      const double combined = static_cast<double>(st[1]) * std::exp(static_cast<double>(st[0] - m_new)) +
                              sum * std::exp(static_cast<double>(mx - m_new));
      st[0] = m_new;
      st[1] = static_cast<float>(combined);
      if (has_target) st[2] = x[t];
    }
  });
}

void ce_finish(const float* state, const std::int32_t* targets, std::int64_t rows, float* row_loss) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* st = state + 3 * r;
    row_loss[r] = targets[r] < 0
                      ? 0.0f
                      : static_cast<float>(static_cast<double>(st[0]) +
                                           std::log(static_cast<double>(st[1])) - st[2]);
  }
}

void loss_mean(const float* row_loss, const std::int32_t* targets, std::int64_t n, float* out) {
  double sum = 0;
  std::int64_t count = 0;
  for (std::int64_t i = 0; i < n; ++i)
    if (targets[i] >= 0) {
      sum += row_loss[i];
      ++count;
    }
  out[0] = count > 0 ? static_cast<float>(sum / static_cast<double>(count))
                     : std::numeric_limits<float>::quiet_NaN();
}

void option_loss(const float* row_loss, const std::int32_t* targets, int batch, int seq,
                 const std::int32_t* info, float* out) {
  // Rows in order; a group's logsumexp is kept online (as the CUDA twin does), in double.
  const double inf = std::numeric_limits<double>::infinity();
  double total = 0, mx = -inf, se = 0, label = 0;
  int groups = 0, labels = 0;
  bool ok = true;
  for (int r = 0; r < batch; ++r) {
    double sum = 0;
    std::int64_t count = 0;
    for (int t = 0; t < seq; ++t) {
      const std::int64_t i = static_cast<std::int64_t>(r) * seq + t;
      if (targets[i] >= 0) {
        sum += row_loss[i];
        ++count;
      }
    }
    ok = ok && count > 0;
    const double score = count > 0 ? -sum / static_cast<double>(count) : 0.0;
    if (score > mx) {
      se = se * std::exp(mx - score) + 1.0;
      mx = score;
    } else {
      se += std::exp(score - mx);
    }
    if (info[r] & 1) {
      label = score;
      ++labels;
    }
    if (r + 1 == batch || (info[r + 1] >> 1) != (info[r] >> 1)) {  // the group ends
      ok = ok && labels == 1;
      total += mx + std::log(se) - label;
      ++groups;
      mx = -inf;
      se = 0;
      labels = 0;
    }
  }
  out[0] = ok && groups > 0 ? static_cast<float>(total / groups) : std::numeric_limits<float>::quiet_NaN();
}

}  // namespace zo2::cpu
