#include "tests/reference_model.h"

#include "models/layout.h"
#include "models/safetensors.h"
#include "runtime/dtype.h"
#include "runtime/philox.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <limits>
#include <stdexcept>

namespace zo2::test {
namespace {

using Vec = std::vector<double>;

// y[n, out] = x[n, in] · W[out, in]ᵀ (+ b)
Vec linear(const Vec& x, std::int64_t n, std::int64_t in, const Vec& W, std::int64_t out,
           const Vec* b) {
  Vec y(static_cast<std::size_t>(n * out));
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t o = 0; o < out; ++o) {
      double s = b ? (*b)[static_cast<std::size_t>(o)] : 0.0;
      for (std::int64_t i = 0; i < in; ++i)
        s += x[static_cast<std::size_t>(r * in + i)] * W[static_cast<std::size_t>(o * in + i)];
      y[static_cast<std::size_t>(r * out + o)] = s;
    }
  return y;
}

Vec layer_norm(const Vec& x, std::int64_t n, std::int64_t d, const Vec& w, const Vec& b, double eps) {
  Vec y(x.size());
  for (std::int64_t r = 0; r < n; ++r) {
    double mean = 0, var = 0;
    for (std::int64_t i = 0; i < d; ++i) mean += x[static_cast<std::size_t>(r * d + i)];
    mean /= static_cast<double>(d);
    for (std::int64_t i = 0; i < d; ++i) {
      const double t = x[static_cast<std::size_t>(r * d + i)] - mean;
      var += t * t;
    }
    var /= static_cast<double>(d);
    for (std::int64_t i = 0; i < d; ++i)
      y[static_cast<std::size_t>(r * d + i)] =
          (x[static_cast<std::size_t>(r * d + i)] - mean) / std::sqrt(var + eps) * w[static_cast<std::size_t>(i)] +
          b[static_cast<std::size_t>(i)];
  }
  return y;
}

// Gemma 3 (Gemma3RMSNorm): offset 1, the factor (1 + w).
Vec rms_norm(const Vec& x, std::int64_t n, std::int64_t d, const Vec& w, double eps, double offset = 0) {
  Vec y(x.size());
  for (std::int64_t r = 0; r < n; ++r) {
    double ss = 0;
    for (std::int64_t i = 0; i < d; ++i) ss += x[static_cast<std::size_t>(r * d + i)] * x[static_cast<std::size_t>(r * d + i)];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(d) + eps);
    for (std::int64_t i = 0; i < d; ++i)
      y[static_cast<std::size_t>(r * d + i)] = x[static_cast<std::size_t>(r * d + i)] * inv * (offset + w[static_cast<std::size_t>(i)]);
  }
  return y;
}

// Rotary inverse frequencies from the definitions (transformers' _compute_*_parameters).
Vec inv_freq(const ModelConfig& c, const RopeConfig& rope) {
  const std::int64_t d = c.head_dim;
  Vec f(static_cast<std::size_t>(d / 2));
  for (std::int64_t i = 0; i < d / 2; ++i) {
    double v = 1.0 / std::pow(rope.theta, static_cast<double>(2 * i) / static_cast<double>(d));
    if (rope.type == RopeType::linear) v /= rope.factor;
    if (rope.type == RopeType::llama3) {
      const double lo = static_cast<double>(rope.original_max_positions) / rope.low_freq_factor;
      const double hi = static_cast<double>(rope.original_max_positions) / rope.high_freq_factor;
      const double wl = 2 * M_PI / v;
      if (wl > lo) {
        v = v / rope.factor;
      } else if (!(wl < hi)) {
        const double s = (static_cast<double>(rope.original_max_positions) / wl - rope.low_freq_factor) /
                         (rope.high_freq_factor - rope.low_freq_factor);
        v = (1 - s) * v / rope.factor + s * v;
      }
    }
    f[static_cast<std::size_t>(i)] = v;
  }
  return f;
}

}  // namespace

ReferenceModel::ReferenceModel(const std::filesystem::path& dir) : c_(ModelConfig::load(dir)) {
  const auto ckpt = SafetensorsCheckpoint::open(dir);
  for (const auto& name : ckpt.names()) {
    const auto& e = ckpt.at(name);
    const auto n = static_cast<std::size_t>(e.info->numel());
    std::vector<float> f(n);
    convert(e.file->read(*e.info).data(), e.info->dtype, f.data(), DType::f32, n);
    w_[name] = Vec(f.begin(), f.end());
  }
}

const Vec& ReferenceModel::w(const std::string& name) const {
  auto it = w_.find(name);
  if (it == w_.end()) throw std::runtime_error("reference: missing tensor " + name);
  return it->second;
}

ReferenceOutput ReferenceModel::forward(int B, int T, const std::vector<std::int32_t>& ids,
                                        const std::vector<std::int32_t>& mask) const {
  const ModelConfig& c = c_;
  const std::int64_t N = static_cast<std::int64_t>(B) * T, h = c.hidden_size;
  const bool opt = c.family == ModelFamily::opt;
  const std::string root = opt ? "model.decoder." : "model.";
  ReferenceOutput out;
  // Embeddings.
  const std::int64_t wd = c.word_embed_proj_dim;
  Vec emb(static_cast<std::size_t>(N * wd));
  const Vec& E = w(root + "embed_tokens.weight");
  for (std::int64_t r = 0; r < N; ++r)
    for (std::int64_t i = 0; i < wd; ++i)
      emb[static_cast<std::size_t>(r * wd + i)] = E[static_cast<std::size_t>(ids[static_cast<std::size_t>(r)] * wd + i)];
  Vec x = emb;
  // Gemma 3 (Gemma3TextScaledWordEmbedding): embeddings × √hidden_size.
  const bool gemma = c.model_type == "gemma3_text";
  const double norm_offset = gemma ? 1.0 : 0.0;
  if (gemma)
    for (double& e : x) e *= std::sqrt(static_cast<double>(h));
  if (opt && c.has_projections()) x = linear(emb, N, wd, w(root + "project_in.weight"), h, nullptr);
  if (opt) {
    const Vec& P = w(root + "embed_positions.weight");
    for (int b = 0; b < B; ++b) {
      int cum = 0;
      for (int t = 0; t < T; ++t) {
        const std::int64_t r = static_cast<std::int64_t>(b) * T + t;
        cum += mask[static_cast<std::size_t>(r)];
        const std::int64_t pos = static_cast<std::int64_t>(cum) * mask[static_cast<std::size_t>(r)] - 1 + 2;
        for (std::int64_t i = 0; i < h; ++i) x[static_cast<std::size_t>(r * h + i)] += P[static_cast<std::size_t>(pos * h + i)];
      }
    }
  }
  out.hidden_states.push_back(x);
  const Vec global_freqs = opt ? Vec{} : inv_freq(c, c.rope);
  const std::int64_t H = c.num_heads, KV = c.num_kv_heads, D = c.head_dim;
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = root + "layers." + std::to_string(l) + ".";
    auto opt_bias = [&](const std::string& n) -> const Vec* {
      auto it = w_.find(p + n);
      return it == w_.end() ? nullptr : &it->second;
    };
    const int window = static_cast<int>(c.attention_window(l));
    // Gemma 3: a local (sliding_attention) layer rotates with rope_local_base_freq.
    const Vec freqs = gemma && !c.sliding_layers.empty() && c.sliding_layers[static_cast<std::size_t>(l)]
                          ? inv_freq(c, c.rope_local)
                          : global_freqs;
    auto attention = [&](const Vec& in) {
      const std::string a = p + "self_attn.";
      Vec q = linear(in, N, h, w(a + "q_proj.weight"), H * D, opt_bias("self_attn.q_proj.bias"));
      Vec k = linear(in, N, h, w(a + "k_proj.weight"), KV * D, opt_bias("self_attn.k_proj.bias"));
      Vec v = linear(in, N, h, w(a + "v_proj.weight"), KV * D, opt_bias("self_attn.v_proj.bias"));
      // Qwen3: q_norm / k_norm, an RMSNorm of each head's D values, before RoPE.
      if (const Vec* qn = opt_bias("self_attn.q_norm.weight")) {
        q = rms_norm(q, N * H, D, *qn, c.norm_eps, norm_offset);
        k = rms_norm(k, N * KV, D, w(a + "k_norm.weight"), c.norm_eps, norm_offset);
      }
      if (!opt) {
        for (std::int64_t r = 0; r < N; ++r) {
          const double pos = static_cast<double>(r % T);
          auto rot = [&](Vec& m, std::int64_t heads) {
            for (std::int64_t hh = 0; hh < heads; ++hh)
              for (std::int64_t i = 0; i < D / 2; ++i) {
                const double ang = pos * freqs[static_cast<std::size_t>(i)];
                double& a0 = m[static_cast<std::size_t>(r * heads * D + hh * D + i)];
                double& a1 = m[static_cast<std::size_t>(r * heads * D + hh * D + i + D / 2)];
                const double x0 = a0, x1 = a1;
                a0 = x0 * std::cos(ang) - x1 * std::sin(ang);
                a1 = x1 * std::cos(ang) + x0 * std::sin(ang);
              }
          };
          rot(q, H);
          rot(k, KV);
        }
      }
      Vec o(static_cast<std::size_t>(N * H * D), 0.0);
      // Gemma 3: query_pre_attn_scalar^-0.5.
      const double scale = 1.0 / std::sqrt(gemma ? c.query_pre_attn_scalar : static_cast<double>(D));
      for (int b = 0; b < B; ++b)
        for (std::int64_t hh = 0; hh < H; ++hh) {
          const std::int64_t kh = hh / (H / KV);
          for (int i = 0; i < T; ++i) {
            std::vector<double> s(static_cast<std::size_t>(T), -std::numeric_limits<double>::infinity());
            double mx = -std::numeric_limits<double>::infinity();
            // A sliding window W: keys j with i − W < j ≤ i (transformers' masking_utils).
            const int j0 = window > 0 ? std::max(0, i - window + 1) : 0;
            for (int j = j0; j <= i; ++j) {
              if (!mask[static_cast<std::size_t>(b * T + j)]) continue;
              double d = 0;
              for (std::int64_t e = 0; e < D; ++e)
                d += q[static_cast<std::size_t>((b * T + i) * H * D + hh * D + e)] *
                     k[static_cast<std::size_t>((b * T + j) * KV * D + kh * D + e)];
              s[static_cast<std::size_t>(j)] = d * scale;
              // Soft-capping (Gemma's attn_logit_softcapping) after the scale, before the mask.
              if (c.attn_softcap > 0)
                s[static_cast<std::size_t>(j)] = c.attn_softcap * std::tanh(s[static_cast<std::size_t>(j)] / c.attn_softcap);
              mx = std::max(mx, s[static_cast<std::size_t>(j)]);
            }
            if (mx == -std::numeric_limits<double>::infinity()) continue;
            double sum = 0;
            for (int j = j0; j <= i; ++j)
              if (mask[static_cast<std::size_t>(b * T + j)]) sum += std::exp(s[static_cast<std::size_t>(j)] - mx);
            for (int j = j0; j <= i; ++j) {
              if (!mask[static_cast<std::size_t>(b * T + j)]) continue;
              const double pj = std::exp(s[static_cast<std::size_t>(j)] - mx) / sum;
              for (std::int64_t e = 0; e < D; ++e)
                o[static_cast<std::size_t>((b * T + i) * H * D + hh * D + e)] +=
                    pj * v[static_cast<std::size_t>((b * T + j) * KV * D + kh * D + e)];
            }
          }
        }
      return linear(o, N, H * D, w(a + (opt ? "out_proj.weight" : "o_proj.weight")), h,
                    opt_bias(opt ? "self_attn.out_proj.bias" : "self_attn.o_proj.bias"));
    };
    auto add = [](Vec& a, const Vec& b) {
      for (std::size_t i = 0; i < a.size(); ++i) a[i] += b[i];
    };
    if (opt) {
      const double eps = 1e-5;
      auto ln = [&](const Vec& in, const std::string& n) {
        return layer_norm(in, N, h, w(p + n + ".weight"), w(p + n + ".bias"), eps);
      };
      auto mlp = [&](const Vec& in) {
        Vec f = linear(in, N, h, w(p + "fc1.weight"), c.ffn_dim, opt_bias("fc1.bias"));
        for (double& e : f) e = std::max(e, 0.0);
        return linear(f, N, c.ffn_dim, w(p + "fc2.weight"), h, opt_bias("fc2.bias"));
      };
      if (c.pre_layer_norm) {
        add(x, attention(ln(x, "self_attn_layer_norm")));
        add(x, mlp(ln(x, "final_layer_norm")));
      } else {
        add(x, attention(x));
        x = ln(x, "self_attn_layer_norm");
        add(x, mlp(x));
        x = ln(x, "final_layer_norm");
      }
    } else if (gemma) {
      // Gemma3DecoderLayer: norms around attention and around the GELU-tanh MLP.
      const double eps = c.norm_eps;
      auto rn = [&](const Vec& in, const std::string& n) { return rms_norm(in, N, h, w(p + n), eps, 1.0); };
      add(x, rn(attention(rn(x, "input_layernorm.weight")), "post_attention_layernorm.weight"));
      const Vec y = rn(x, "pre_feedforward_layernorm.weight");
      Vec g = linear(y, N, h, w(p + "mlp.gate_proj.weight"), c.ffn_dim, nullptr);
      const Vec u = linear(y, N, h, w(p + "mlp.up_proj.weight"), c.ffn_dim, nullptr);
      const double k0 = std::sqrt(2.0 / M_PI);
      for (std::size_t i = 0; i < g.size(); ++i)
        g[i] = 0.5 * g[i] * (1 + std::tanh(k0 * (g[i] + 0.044715 * g[i] * g[i] * g[i]))) * u[i];
      add(x, rn(linear(g, N, c.ffn_dim, w(p + "mlp.down_proj.weight"), h, nullptr), "post_feedforward_layernorm.weight"));
    } else {
      const double eps = c.norm_eps;
      add(x, attention(rms_norm(x, N, h, w(p + "input_layernorm.weight"), eps)));
      const Vec y = rms_norm(x, N, h, w(p + "post_attention_layernorm.weight"), eps);
      Vec g = linear(y, N, h, w(p + "mlp.gate_proj.weight"), c.ffn_dim, opt_bias("mlp.gate_proj.bias"));
      const Vec u = linear(y, N, h, w(p + "mlp.up_proj.weight"), c.ffn_dim, opt_bias("mlp.up_proj.bias"));
      for (std::size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
      add(x, linear(g, N, c.ffn_dim, w(p + "mlp.down_proj.weight"), h, opt_bias("mlp.down_proj.bias")));
    }
    out.hidden_states.push_back(x);
  }
  Vec f = x;
  if (opt) {
    if (c.final_layer_norm)
      f = layer_norm(f, N, h, w(root + "final_layer_norm.weight"), w(root + "final_layer_norm.bias"), 1e-5);
    if (c.has_projections()) f = linear(f, N, h, w(root + "project_out.weight"), wd, nullptr);
  } else {
    f = rms_norm(f, N, h, w(root + "norm.weight"), c.norm_eps, norm_offset);
  }
  out.hidden_states.back() = f;
  const Vec& head = c.tie_word_embeddings ? E : w("lm_head.weight");
  out.logits = linear(f, N, wd, head, c.vocab_size, nullptr);
  if (c.final_softcap > 0)  // final_logit_softcapping, before the loss
    for (double& x : out.logits) x = c.final_softcap * std::tanh(x / c.final_softcap);
  out.token_loss.assign(static_cast<std::size_t>(N), 0.0);
  double sum = 0;
  std::int64_t count = 0;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t + 1 < T; ++t) {
      const std::int64_t r = static_cast<std::int64_t>(b) * T + t;
      // Neither a padding target nor a padding position's prediction (make_batch: a masked
      // position predicts nothing; transformers would score a left-padded row's last pad).
      if (!mask[static_cast<std::size_t>(r)] || !mask[static_cast<std::size_t>(r + 1)]) continue;
      const auto* row = &out.logits[static_cast<std::size_t>(r * c.vocab_size)];
      double mx = row[0];
      for (std::int64_t v = 1; v < c.vocab_size; ++v) mx = std::max(mx, row[v]);
      double se = 0;
      for (std::int64_t v = 0; v < c.vocab_size; ++v) se += std::exp(row[v] - mx);
      const double l = mx + std::log(se) - row[ids[static_cast<std::size_t>(r + 1)]];
      out.token_loss[static_cast<std::size_t>(r)] = l;
      sum += l;
      ++count;
    }
  out.loss = sum / static_cast<double>(count);
  return out;
}

void write_random_checkpoint(const std::filesystem::path& dir, const ModelConfig& config,
                             std::uint64_t seed) {
  std::filesystem::create_directories(dir);
  std::vector<std::vector<float>> storage;
  std::vector<TensorToWrite> tensors;
  std::uint64_t key = 1;
  for (const NamedShape& t : checkpoint_tensors(config)) {
    std::int64_t n = 1;
    for (auto d : t.shape) n *= d;
    std::vector<float> v(static_cast<std::size_t>(n));
    const bool matrix = t.shape.size() == 2;
    const bool is_weight = t.name.size() > 7 && t.name.substr(t.name.size() - 7) == ".weight";
    const double scale = matrix ? 1.0 / std::sqrt(static_cast<double>(t.shape[1])) : 0.3;
    for (std::int64_t i = 0; i < n; ++i) {
      const float z = noise_normal(seed, key, static_cast<std::uint64_t>(i));
      v[static_cast<std::size_t>(i)] = static_cast<float>((matrix || !is_weight ? 0.0 : 1.0) + scale * z);
    }
    // Position/token embeddings get unit spread like the goldens.
    if (t.name.find("embed") != std::string::npos)
      for (std::int64_t i = 0; i < n; ++i)
        v[static_cast<std::size_t>(i)] = noise_normal(seed, key + 1000, static_cast<std::uint64_t>(i));
    ++key;
    storage.push_back(std::move(v));
    tensors.push_back({t.name, DType::f32, t.shape, storage.back().data(), {}});
  }
  write_safetensors(dir / "model.safetensors", tensors);
  std::ofstream(dir / "config.json") << config.to_json().dump(2);
}

}  // namespace zo2::test

namespace zo2::test {

Zo2Output run_forward(const std::filesystem::path& dir, int batch, int seq,
                      const std::vector<std::int32_t>& ids, const std::vector<std::int32_t>& mask,
                      SessionConfig cfg) {
  const ModelConfig config = ModelConfig::load(dir);
  cfg.training = false;
  cfg.logits_out = true;
  cfg.max_batch = batch;
  cfg.max_seq = seq;
  Session session(dir, cfg);
  const HostBatch b = make_batch(config, batch, seq, ids, mask);
  Zo2Output out;
  out.logits.resize(static_cast<std::size_t>(b.tokens() * config.vocab_size));
  out.token_loss.resize(static_cast<std::size_t>(b.tokens()));
  EvalOptions eo;
  eo.logits = out.logits.data();
  eo.token_loss = out.token_loss.data();
  eo.hidden_states = &out.hidden_states;
  out.loss = session.eval(b, eo);
  return out;
}

double masked_rel_error(const std::vector<float>& a, const std::vector<double>& b,
                        const std::vector<std::int32_t>& mask, std::int64_t width) {
  double err = 0, ref = 0;
  for (std::size_t r = 0; r < mask.size(); ++r) {
    if (!mask[r]) continue;
    for (std::int64_t i = 0; i < width; ++i) {
      const std::size_t k = r * static_cast<std::size_t>(width) + static_cast<std::size_t>(i);
      err = std::max(err, std::fabs(static_cast<double>(a[k]) - b[k]));
      ref = std::max(ref, std::fabs(b[k]));
    }
  }
  return ref > 0 ? err / ref : err;
}

ModelConfig small_opt(std::int64_t layers) {
  ModelConfig c;
  c.family = ModelFamily::opt;
  c.vocab_size = 61;
  c.hidden_size = 32;
  c.num_layers = layers;
  c.num_heads = 4;
  c.num_kv_heads = 4;
  c.head_dim = 8;
  c.ffn_dim = 72;
  c.max_positions = 32;
  c.word_embed_proj_dim = 32;
  return c;
}

ModelConfig small_llama(std::int64_t layers) {
  ModelConfig c;
  c.family = ModelFamily::llama;
  c.vocab_size = 67;
  c.hidden_size = 32;
  c.num_layers = layers;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.ffn_dim = 56;
  c.max_positions = 32;
  c.word_embed_proj_dim = 32;
  c.linear_bias = false;
  c.tie_word_embeddings = false;
  c.rope.type = RopeType::default_;
  c.norm_eps = 1e-6f;
  return c;
}

std::vector<HostBatch> patterned_batches(const ModelConfig& c, int n, int batch, int seq, int padded, int mul,
                                         int step) {
  std::vector<HostBatch> out;
  const int tokens = batch * seq;
  for (int b = 0; b < n; ++b) {
    std::vector<std::int32_t> ids(static_cast<std::size_t>(tokens)), mask(static_cast<std::size_t>(tokens), 1);
    for (int i = 0; i < tokens; ++i)
      ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i * mul + b * step + i * i) % c.vocab_size);
    for (int t = seq - padded; t < seq; ++t) mask[static_cast<std::size_t>(seq + t)] = 0;
    out.push_back(make_batch(c, batch, seq, ids, mask));
  }
  return out;
}

}  // namespace zo2::test
