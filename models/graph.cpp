#include "models/graph.h"

#include "runtime/common.h"
#include "runtime/device.h"
#include "runtime/error.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace zo2 {

const StoredTensor& WeightSet::at(Role r) const {
  const StoredTensor* t = find(r);
  if (!t) fail(ErrorKind::internal, "weight set lacks tensor of role {}", static_cast<int>(r));
  return *t;
}

std::size_t WorkspacePlan::total() const {
  std::size_t n = 0;
  for (const auto& i : items) n += align_up(i.bytes);
  return n;
}

ModelGraph::ModelGraph(const ModelConfig& config, DType compute, GraphLimits limits)
    : config_(config), compute_(compute), limits_(limits) {
  const ImageLayout block = block_layout(config_, 0, DType::f32);
  for (const auto& t : block.tensors()) {
    if (t.ndim == 2) max_tensor_elems_ = std::max(max_tensor_elems_, t.numel());
    else max_vector_ = std::max(max_vector_, t.cols);
  }
  const ImageLayout globals = globals_layout(config_, DType::f32);
  for (const auto& t : globals.tensors()) {
    if (t.ndim == 1) max_vector_ = std::max(max_vector_, t.cols);
    else if (t.role == Role::project_in || t.role == Role::project_out)
      max_tensor_elems_ = std::max(max_tensor_elems_, t.numel());
  }
  if (limits_.vocab_tile <= 0) limits_.vocab_tile = config_.vocab_size;
  limits_.vocab_tile = std::min(limits_.vocab_tile, config_.vocab_size);
  if (limits_.weight_tile_elems > 0) {
    // A tile holds at least one row of the widest tensor.
    const std::int64_t widest = std::max({config_.hidden_size, config_.ffn_dim, config_.q_dim(),
                                          config_.word_embed_proj_dim});
    limits_.weight_tile_elems = std::max(limits_.weight_tile_elems, widest);
    // The LM head's vocabulary tiles are perturbed into the same scratch, so they are no
    // larger than a weight tile either (before, a head of 8192 rows × 4096 columns — LLaMA-7B's
    // — overran the 2^24-element scratch), in rows of a multiple of 128 where that many fit.
    const std::int64_t rows = limits_.weight_tile_elems / config_.word_embed_proj_dim;
    limits_.vocab_tile = std::min(limits_.vocab_tile, rows >= 128 ? rows / 128 * 128 : rows);
  }
  max_tensor_elems_ = std::max(max_tensor_elems_, limits_.vocab_tile * config_.word_embed_proj_dim);
  if (limits_.weight_tile_elems > 0) max_tensor_elems_ = std::min(max_tensor_elems_, limits_.weight_tile_elems);
  inv_freq_host_ = config_.rope_inv_freq();
  if (config_.gemma3()) inv_freq_local_host_ = config_.rope_inv_freq(config_.rope_local);
}

WorkspacePlan ModelGraph::workspace_plan(int branches, int batch, int seq) const {
  WorkspacePlan p;
  const std::size_t n = static_cast<std::size_t>(batch) * static_cast<std::size_t>(seq);
  const std::size_t cb = dtype_size(compute_);
  const auto& c = config_;
  for (int b = 0; b < branches; ++b) {
    const std::string tag = branches == 1 ? "" : (b == 0 ? " (+eps)" : " (-eps)");
    auto act = [&](const char* what, std::int64_t cols) {
      p.items.push_back({std::string(what) + tag, n * static_cast<std::size_t>(cols) * cb});
    };
    act("hidden", c.hidden_size);
    act("x", std::max(c.hidden_size, c.word_embed_proj_dim));
    act("q", c.q_dim());
    act("k", c.kv_dim());
    act("v", c.kv_dim());
    act("attention out", c.q_dim());
    act("mlp", c.ffn_dim);
    if (c.family == ModelFamily::llama) act("mlp up", c.ffn_dim);
    if (c.has_projections()) act("projected embeddings", c.word_embed_proj_dim);
    if (limits_.lora_rank > 0) act("LoRA x·Aᵀ", limits_.lora_rank);
    if (limits_.prefix_tokens > 0) {
      const std::size_t rows = static_cast<std::size_t>(batch) * static_cast<std::size_t>(seq + limits_.prefix_tokens);
      for (const auto& [what, cols] : {std::pair<const char*, std::int64_t>{"prefix q", c.q_dim()},
                                       {"prefix k", c.kv_dim()}, {"prefix v", c.kv_dim()},
                                       {"prefix attention out", c.q_dim()}})
        p.items.push_back({std::string(what) + tag, rows * static_cast<std::size_t>(cols) * cb});
    }
    p.items.push_back({"cross-entropy state" + tag, n * 3 * sizeof(float)});
    p.items.push_back({"token losses" + tag, n * sizeof(float)});
    p.items.push_back({"loss" + tag, sizeof(float)});
  }
  const int scratch_copies = branches == 1 ? 1 : 2;
  p.items.push_back({"perturbed weights",
                     static_cast<std::size_t>(scratch_copies) *
                         static_cast<std::size_t>(max_tensor_elems_) * cb});
  p.items.push_back({"perturbed vectors", 8 * static_cast<std::size_t>(max_vector_) * cb});
  p.items.push_back({"logits tile", n * static_cast<std::size_t>(limits_.vocab_tile) * sizeof(float)});
  if (!inv_freq_host_.empty())
    p.items.push_back({"rope frequencies", inv_freq_host_.size() * sizeof(float)});
  if (!inv_freq_local_host_.empty())
    p.items.push_back({"local rope frequencies", inv_freq_local_host_.size() * sizeof(float)});
  return p;
}

void ModelGraph::allocate(Device& device, Stream& s, int nbranches, int batch, int seq) {
  buffers_.clear();
  branches_.assign(static_cast<std::size_t>(nbranches), Branch{});
  const WorkspacePlan plan = workspace_plan(nbranches, batch, seq);
  const std::int64_t n = static_cast<std::int64_t>(batch) * seq;
  capacity_tokens_ = static_cast<int>(n);
  std::size_t item = 0;
  auto next = [&]() -> void* {
    const auto& it = plan.items[item++];
    buffers_.push_back(device.arena().allocate(it.bytes, it.what));
    return buffers_.back().data();
  };
  const auto& c = config_;
  for (auto& b : branches_) {
    auto act = [&](std::int64_t cols) { return Mat::dense(next(), compute_, n, cols); };
    b.hidden = act(c.hidden_size);
    b.x = act(c.hidden_size);
    b.q = act(c.q_dim());
    b.k = act(c.kv_dim());
    b.v = act(c.kv_dim());
    b.attn = act(c.q_dim());
    b.m1 = act(c.ffn_dim);
    if (c.family == ModelFamily::llama) b.m2 = act(c.ffn_dim);
    if (c.has_projections()) b.emb = act(c.word_embed_proj_dim);
    if (limits_.lora_rank > 0) b.lora = act(limits_.lora_rank);
    if (limits_.prefix_tokens > 0) {
      const std::int64_t rows = static_cast<std::int64_t>(batch) * (seq + limits_.prefix_tokens);
      b.qx = Mat::dense(next(), compute_, rows, c.q_dim());
      b.kx = Mat::dense(next(), compute_, rows, c.kv_dim());
      b.vx = Mat::dense(next(), compute_, rows, c.kv_dim());
      b.ax = Mat::dense(next(), compute_, rows, c.q_dim());
    }
    b.ce_state = static_cast<float*>(next());
    b.row_loss = static_cast<float*>(next());
    b.loss = static_cast<float*>(next());
  }
  weight_scratch_[0] = next();
  weight_scratch_[1] = nbranches == 1
                           ? nullptr
                           : static_cast<char*>(weight_scratch_[0]) +
                                 static_cast<std::size_t>(max_tensor_elems_) * dtype_size(compute_);
  vector_scratch_ = next();
  logits_tile_ = Mat::dense(next(), DType::f32, n, limits_.vocab_tile);
  if (!inv_freq_host_.empty()) {
    inv_freq_ = static_cast<float*>(next());
    s.copy_h2d(inv_freq_, inv_freq_host_.data(), inv_freq_host_.size() * sizeof(float));
    s.synchronize();  // the host vector may not outlive an asynchronous copy otherwise
  }
  if (!inv_freq_local_host_.empty()) {
    inv_freq_local_ = static_cast<float*>(next());
    s.copy_h2d(inv_freq_local_, inv_freq_local_host_.data(), inv_freq_local_host_.size() * sizeof(float));
    s.synchronize();
  }
}

// Rows per materialized tile. A tile's GEMM writes the output columns [r0, r1), so r0 must
// keep that slice's pointer 16-byte aligned, or cuBLAS falls back to its unaligned kernels
// (measured on an H200 with OPT-13B's 3276-row tiles: sm75 "align1" kernels at about a
// third of the aligned rate). Tiles are therefore multiples of kTileRowAlign rows, and of
// near-equal size, so no GEMM is left with a sliver.
std::int64_t ModelGraph::tile_rows(std::int64_t rows, std::int64_t cols) const {
  constexpr std::int64_t kTileRowAlign = 128;
  std::int64_t most = std::clamp<std::int64_t>(max_tensor_elems_ / std::max<std::int64_t>(cols, 1), 1, rows);
  if (most >= rows) return most;
  if (most < kTileRowAlign) {
    // A tile starts at a multiple of 4 elements (a Philox group), so a streamed tile draws
    // its noise from whole groups (Note [Sub-block streaming]).
    const std::int64_t step = 4 / std::gcd<std::int64_t>(cols, 4);
    return most >= step ? most / step * step : most;
  }
  const std::int64_t tiles = (rows + most - 1) / most;
  const std::int64_t even = ((rows + tiles - 1) / tiles + kTileRowAlign - 1) / kTileRowAlign * kTileRowAlign;
  return even <= most ? even : most / kTileRowAlign * kTileRowAlign;
}

ModelGraph::Views ModelGraph::materialize(Ops& ops, Stream& s, const StoredTensor& w,
                                          std::int64_t r0, std::int64_t r1,
                                          const NoiseArgs* noise, void* scratch0, void* scratch1) {
  Views v;
  if (!noise && w.dtype == compute_ && !w.row_scales) {
    v.w[0] = Mat{static_cast<char*>(w.data) + r0 * w.cols * static_cast<std::int64_t>(dtype_size(w.dtype)),
                 w.dtype, r1 - r0, w.cols, w.cols};
    v.w[1] = v.w[0];
    return v;
  }
  ops.perturb(s, w, r0, r1, noise, scratch0, noise ? scratch1 : nullptr, compute_);
  v.w[0] = Mat::dense(scratch0, compute_, r1 - r0, w.cols);
  v.w[1] = Mat::dense(noise ? scratch1 : scratch0, compute_, r1 - r0, w.cols);
  return v;
}

ModelGraph::Views ModelGraph::vector(Ops& ops, Stream& s, const StoredTensor* w,
                                     const NoiseArgs* noise, int slot) {
  if (!w) return {};
  const std::size_t stride = static_cast<std::size_t>(max_vector_) * dtype_size(compute_);
  char* base = static_cast<char*>(vector_scratch_) + static_cast<std::size_t>(slot) * 2 * stride;
  return materialize(ops, s, *w, 0, w->rows, noise, base, base + stride);
}

void ModelGraph::linear(Ops& ops, Stream& s, const WeightSet& ws, Role weight, Role bias,
                        Mat Branch::*in, Mat Branch::*out, const NoiseArgs* noise, int nb, bool relu,
                        Mat Branch::*residual) {
  const StoredTensor& w = ws.at(weight);
  // An adapted layer adds its adapter after W's tiles; the ReLU waits for it.
  const bool adapted = lora_ && lora_->prefix_tokens == 0 && lora_->a.find(weight);
  const bool fused_relu = relu && !adapted;
  // The bias first: each output tile's op adds its slice of it (and applies the ReLU).
  const StoredTensor* bt = ws.find(bias);
  const Views bv = vector(ops, s, bt, noise, 0);
  const auto esize = static_cast<std::int64_t>(dtype_size(compute_));
  const std::int64_t tile = tile_rows(w);
  for (std::int64_t r0 = 0; r0 < w.rows; r0 += tile) {
    const std::int64_t r1 = std::min(w.rows, r0 + tile);
    // Streamed by tiles, the rows arrive now and are given back after both branches' GEMMs.
    const Views v = tiles_ ? materialize(ops, s, tiles_->acquire(weight, r0, r1), 0, r1 - r0, noise,
                                         weight_scratch_[0], weight_scratch_[1])
                           : materialize(ops, s, w, r0, r1, noise, weight_scratch_[0], weight_scratch_[1]);
    for (int b = 0; b < nb; ++b) {
      Branch& br = branches_[static_cast<std::size_t>(b)];
      const void* bias_tile = bt ? static_cast<const char*>(bv.w[b].data) + r0 * esize : nullptr;
      const Mat residual_tile = residual ? (br.*residual).cols_range(r0, r1) : Mat{};
      ops.linear(s, br.*in, v.w[b], (br.*out).cols_range(r0, r1), bias_tile, fused_relu,
                 residual ? &residual_tile : nullptr);
    }
    if (tiles_) tiles_->release();
  }
  if (adapted) {
    lora_add(ops, s, weight, in, out, nb, residual);
    if (relu)
      for (int b = 0; b < nb; ++b) ops.relu(s, branches_[static_cast<std::size_t>(b)].*out);
  }
}

bool ModelGraph::lora_add(Ops& ops, Stream& s, Role weight, Mat Branch::*in, Mat Branch::*out, int nb,
                          Mat Branch::*residual) {
  const StoredTensor* a = lora_->a.find(weight);
  if (!a) return false;
  const StoredTensor& b = lora_->b.at(weight);
  ZO2_CHECK(a->rows <= limits_.lora_rank && b.cols == a->rows);
  // lora = in·A±ᵀ, A's rows (the rank) in tiles.
  const std::int64_t ta = tile_rows(*a);
  for (std::int64_t r0 = 0; r0 < a->rows; r0 += ta) {
    const std::int64_t r1 = std::min(a->rows, r0 + ta);
    const Views v = materialize(ops, s, *a, r0, r1, lora_noise_, weight_scratch_[0], weight_scratch_[1]);
    for (int i = 0; i < nb; ++i) {
      Branch& br = branches_[static_cast<std::size_t>(i)];
      ops.gemm(s, br.*in, false, v.w[i], true, br.lora.cols_range(0, a->rows).cols_range(r0, r1), 1.0f, 0.0f);
    }
  }
  // out (or the residual stream) += scale·lora·B±ᵀ, B's rows (the layer's outputs) in tiles.
  const std::int64_t tb = tile_rows(b);
  for (std::int64_t r0 = 0; r0 < b.rows; r0 += tb) {
    const std::int64_t r1 = std::min(b.rows, r0 + tb);
    const Views v = materialize(ops, s, b, r0, r1, lora_noise_, weight_scratch_[0], weight_scratch_[1]);
    for (int i = 0; i < nb; ++i) {
      Branch& br = branches_[static_cast<std::size_t>(i)];
      const Mat target = (br.*(residual ? residual : out)).cols_range(r0, r1);
      ops.gemm(s, br.lora.cols_range(0, a->rows), false, v.w[i], true, target, lora_->scale, 1.0f);
    }
  }
  return true;
}

void ModelGraph::norm(Ops& ops, Stream& s, const WeightSet& ws, Role weight, Role bias,
                      Mat Branch::*in, Mat Branch::*out, const NoiseArgs* noise, int nb) {
  const Views w = vector(ops, s, &ws.at(weight), noise, 0);
  const Views b = vector(ops, s, ws.find(bias), noise, 1);
  for (int i = 0; i < nb; ++i) {
    Branch& br = branches_[static_cast<std::size_t>(i)];
    if (config_.family == ModelFamily::opt)
      ops.layernorm(s, br.*in, w.w[i].data, b.w[i].data, config_.norm_eps, br.*out);
    else
      ops.rmsnorm(s, br.*in, w.w[i].data, config_.norm_eps, br.*out, config_.gemma3() ? 1.0f : 0.0f);
  }
}

// Qwen3's (and Gemma 3's, with 1 + w) q_norm/k_norm: each head's head_dim values normalized on their own, i.e. an
// RMSNorm over the rows of q and k seen as [tokens·heads, head_dim].
void ModelGraph::qk_norm(Ops& ops, Stream& s, const WeightSet& ws, const NoiseArgs* noise, int nb) {
  const std::int64_t D = config_.head_dim;
  for (const auto& [role, m] : {std::pair{Role::q_norm_w, &Branch::q}, std::pair{Role::k_norm_w, &Branch::k}}) {
    const Views w = vector(ops, s, &ws.at(role), noise, 0);
    for (int i = 0; i < nb; ++i) {
      const Mat& x = branches_[static_cast<std::size_t>(i)].*m;
      ZO2_CHECK(x.contiguous() && x.cols % D == 0);
      const Mat heads = Mat::dense(x.data, x.dtype, x.rows * (x.cols / D), D);
      ops.rmsnorm(s, heads, w.w[i].data, config_.norm_eps, heads, config_.gemma3() ? 1.0f : 0.0f);
    }
  }
}

void ModelGraph::attention(Ops& ops, Stream& s, const BatchView& batch, int nb) {
  for (int i = 0; i < nb; ++i) {
    Branch& br = branches_[static_cast<std::size_t>(i)];
    if (config_.family == ModelFamily::llama) {
      const float* inv = layer_inv_freq_ ? layer_inv_freq_ : inv_freq_;
      ops.rope(s, br.q, static_cast<int>(config_.head_dim), batch.positions, inv);
      ops.rope(s, br.k, static_cast<int>(config_.head_dim), batch.positions, inv);
    }
  }
  if (kv_capture_) {
    const Branch& br = branches_[0];
    for (const Mat* m : {&br.k, &br.v}) {
      ZO2_CHECK(m->contiguous());
      kv_capture_->emplace_back(static_cast<std::size_t>(m->rows * m->cols));
      s.copy_d2h(kv_capture_->back().data(), m->data, kv_capture_->back().size() * dtype_size(m->dtype));
    }
  }
  if (kv_cache_) {
    cached_attention(ops, s, batch, nb);
    return;
  }
  if (lora_ && lora_->prefix_tokens > 0) {
    prefix_attention(ops, s, batch, nb);
    return;
  }
  for (int i = 0; i < nb; ++i) {
    Branch& br = branches_[static_cast<std::size_t>(i)];
    AttentionArgs a;
    a.q = br.q;
    a.k = br.k;
    a.v = br.v;
    a.out = br.attn;
    a.batch = batch.batch;
    a.seq = batch.seq;
    a.heads = static_cast<int>(config_.num_heads);
    a.kv_heads = static_cast<int>(config_.num_kv_heads);
    a.head_dim = static_cast<int>(config_.head_dim);
    a.key_mask = batch.key_mask;
    a.scale = config_.attention_scale();
    a.causal = true;
    a.window = window_;
    a.softcap = config_.attn_softcap;
    ops.attention(s, a);
  }
}

// Note [Prefix tuning under ZO]: each sequence's rows behind its P prefix rows, attention
// over P + T rows (the P dummy queries are zeros, their outputs dropped), then the T
// outputs back in place.
void ModelGraph::prefix_attention(Ops& ops, Stream& s, const BatchView& batch, int nb) {
  const std::int64_t P = lora_->prefix_tokens, B = batch.batch, T = batch.seq, S = P + T;
  ZO2_CHECK(batch.prefix_key_mask != nullptr && P <= limits_.prefix_tokens);
  const std::size_t cb = dtype_size(compute_);
  const std::int64_t qd = config_.q_dim(), kd = config_.kv_dim();
  auto rows = [cb](const Mat& m, std::int64_t r) { return static_cast<char*>(m.data) + r * m.ld * static_cast<std::int64_t>(cb); };
  // The prefix keys, then values, perturbed per branch, into each sequence's first P rows.
  for (int kv = 0; kv < 2; ++kv) {
    const StoredTensor& t = kv == 0 ? lora_->a.at(Role::k_w) : lora_->b.at(Role::v_w);
    const Views v = materialize(ops, s, t, 0, P, lora_noise_, weight_scratch_[0], weight_scratch_[1]);
    for (int i = 0; i < nb; ++i) {
      Branch& br = branches_[static_cast<std::size_t>(i)];
      const Mat& dst = kv == 0 ? br.kx : br.vx;
      for (std::int64_t b = 0; b < B; ++b)
        s.copy_d2d(rows(dst, b * S), v.w[i].data, static_cast<std::size_t>(P * kd) * cb);
    }
  }
  for (int i = 0; i < nb; ++i) {
    Branch& br = branches_[static_cast<std::size_t>(i)];
    for (std::int64_t b = 0; b < B; ++b) {
      s.memset(rows(br.qx, b * S), 0, static_cast<std::size_t>(P * qd) * cb);
      s.copy_d2d(rows(br.qx, b * S + P), rows(br.q, b * T), static_cast<std::size_t>(T * qd) * cb);
      s.copy_d2d(rows(br.kx, b * S + P), rows(br.k, b * T), static_cast<std::size_t>(T * kd) * cb);
      s.copy_d2d(rows(br.vx, b * S + P), rows(br.v, b * T), static_cast<std::size_t>(T * kd) * cb);
    }
    AttentionArgs a;
    a.q = br.qx.rows_range(0, B * S);
    a.k = br.kx.rows_range(0, B * S);
    a.v = br.vx.rows_range(0, B * S);
    a.out = br.ax.rows_range(0, B * S);
    a.batch = static_cast<int>(B);
    a.seq = static_cast<int>(S);
    a.heads = static_cast<int>(config_.num_heads);
    a.kv_heads = static_cast<int>(config_.num_kv_heads);
    a.head_dim = static_cast<int>(config_.head_dim);
    a.key_mask = batch.prefix_key_mask;
    a.scale = config_.attention_scale();
    a.causal = true;
    a.window = window_;
    a.softcap = config_.attn_softcap;
    ops.attention(s, a);
    for (std::int64_t b = 0; b < B; ++b)
      s.copy_d2d(rows(br.attn, b * T), rows(br.ax, b * S + P), static_cast<std::size_t>(T * qd) * cb);
  }
}

// Note [KV cache]: the batch's keys and values into the cache behind each sequence's past
// rows, then attention over everything the cache holds.
void ModelGraph::cached_attention(Ops& ops, Stream& s, const BatchView& batch, int nb) {
  const KvCache& c = *kv_cache_;
  const std::int64_t B = batch.batch, T = batch.seq;
  const std::int64_t P = lora_ ? lora_->prefix_tokens : 0;  // prefix tuning: P rows before the sequence's own
  ZO2_CHECK(nb == 1 && c.past >= 0 && P + c.past + T <= c.capacity && c.key_mask != nullptr);
  const std::size_t cb = dtype_size(compute_);
  const std::int64_t kd = config_.kv_dim();
  const std::size_t row = static_cast<std::size_t>(kd) * cb;
  const Branch& br = branches_[0];
  ZO2_CHECK(br.k.contiguous() && br.v.contiguous());
  const std::size_t pitch = static_cast<std::size_t>(c.capacity) * row;
  if (P > 0 && c.past == 0) {
    for (int kv = 0; kv < 2; ++kv) {
      const StoredTensor& t = kv == 0 ? lora_->a.at(Role::k_w) : lora_->b.at(Role::v_w);
      const Views v = materialize(ops, s, t, 0, P, nullptr, weight_scratch_[0], weight_scratch_[1]);
      char* dst = static_cast<char*>(kv == 0 ? c.k : c.v);
      for (std::int64_t b = 0; b < B; ++b)
        s.copy_d2d(dst + static_cast<std::size_t>(b) * pitch, v.w[0].data, static_cast<std::size_t>(P) * row);
    }
  }
  const std::size_t past_bytes = static_cast<std::size_t>(P + c.past) * row;
  const std::size_t width = static_cast<std::size_t>(T) * row;
  s.copy_2d(Stream::CopyKind::d2d, static_cast<char*>(c.k) + past_bytes, pitch, br.k.data, width, width,
            static_cast<std::size_t>(B));
  s.copy_2d(Stream::CopyKind::d2d, static_cast<char*>(c.v) + past_bytes, pitch, br.v.data, width, width,
            static_cast<std::size_t>(B));
  AttentionArgs a;
  a.q = br.q;
  a.k = Mat::dense(c.k, compute_, B * c.capacity, kd);
  a.v = Mat::dense(c.v, compute_, B * c.capacity, kd);
  a.out = br.attn;
  a.batch = static_cast<int>(B);
  a.seq = static_cast<int>(T);
  a.kv_seq = static_cast<int>(P + c.past + T);
  a.kv_stride = c.capacity;
  a.heads = static_cast<int>(config_.num_heads);
  a.kv_heads = static_cast<int>(config_.num_kv_heads);
  a.head_dim = static_cast<int>(config_.head_dim);
  a.key_mask = c.key_mask;
  a.scale = config_.attention_scale();
  a.causal = true;
  a.window = window_;
  a.softcap = config_.attn_softcap;
  ops.attention(s, a);
}

namespace {
// Restricts a branch's activations to the batch's tokens (the workspace may be larger).
Branch rows_of(const Branch& b, std::int64_t n) {
  Branch r = b;
  for (Mat Branch::*m : {&Branch::hidden, &Branch::x, &Branch::q, &Branch::k, &Branch::v, &Branch::attn,
                         &Branch::m1, &Branch::m2, &Branch::emb, &Branch::lora, &Branch::final})
    if ((r.*m).data) r.*m = (r.*m).rows_range(0, n);
  return r;
}
}  // namespace

void ModelGraph::embed(Ops& ops, Stream& s, const WeightSet& g, const BatchView& batch,
                       const NoiseArgs* noise, int nb) {
  ZO2_CHECK(batch.tokens() <= capacity_tokens_);
  const std::int64_t n = batch.tokens();
  std::vector<Branch> saved(branches_.begin(), branches_.begin() + nb);
  for (int i = 0; i < nb; ++i) branches_[static_cast<std::size_t>(i)] = rows_of(saved[static_cast<std::size_t>(i)], n);
  const float sign[2] = {1.0f, noise ? noise->minus : -1.0f};
  for (int i = 0; i < nb; ++i) {
    Branch& br = branches_[static_cast<std::size_t>(i)];
    const Mat& tok_out = config_.has_projections() ? br.emb : br.hidden;
    ops.embedding(s, g.at(Role::embed_tokens), batch.ids, n, tok_out, noise, sign[i]);
  }
  if (config_.has_projections())
    linear(ops, s, g, Role::project_in, Role::count_, &Branch::emb, &Branch::hidden, noise, nb);
  if (config_.family == ModelFamily::opt) {
    for (int i = 0; i < nb; ++i) {
      Branch& br = branches_[static_cast<std::size_t>(i)];
      ops.embedding(s, g.at(Role::embed_positions), batch.positions, n, br.x, noise, sign[i]);
      ops.add(s, br.hidden, br.x);
    }
  }
  if (config_.gemma3()) {
    // × √hidden_size, the scale rounded to the embeddings' dtype (Note [Gemma 3]).
    const float scale = config_.embed_scale();
    float rounded = scale;
    if (compute_ != DType::f32) {
      std::uint16_t narrow = 0;
      convert(&scale, DType::f32, &narrow, compute_, 1);
      rounded = load_as_f32(&narrow, compute_, 0);
    }
    for (int i = 0; i < nb; ++i) ops.scale(s, branches_[static_cast<std::size_t>(i)].hidden, rounded);
  }
  for (int i = 0; i < nb; ++i) branches_[static_cast<std::size_t>(i)] = saved[static_cast<std::size_t>(i)];
}

void ModelGraph::block(Ops& ops, Stream& s, const WeightSet& w, const BatchView& batch,
                       const NoiseArgs* noise, int nb, const LoraSet* lora, const NoiseArgs* lora_noise,
                       std::int64_t layer, TileFeed* tiles) {
  ZO2_CHECK(batch.tokens() <= capacity_tokens_);
  ZO2_CHECK(!lora || (lora->prefix_tokens > 0 ? limits_.prefix_tokens >= lora->prefix_tokens : limits_.lora_rank > 0));
  lora_ = lora;
  lora_noise_ = lora_noise;
  tiles_ = tiles;
  window_ = static_cast<int>(config_.attention_window(layer));
  layer_inv_freq_ = config_.local_layer(layer) ? inv_freq_local_ : inv_freq_;
  const bool gemma = config_.gemma3();
  std::vector<Branch> saved(branches_.begin(), branches_.begin() + nb);
  for (int i = 0; i < nb; ++i) branches_[static_cast<std::size_t>(i)] = rows_of(saved[static_cast<std::size_t>(i)], batch.tokens());
  const bool opt = config_.family == ModelFamily::opt;
  const bool pre = config_.pre_layer_norm;
  // Attention.
  Mat Branch::*attn_in = &Branch::x;
  if (pre) norm(ops, s, w, Role::attn_norm_w, Role::attn_norm_b, &Branch::hidden, &Branch::x, noise, nb);
  else attn_in = &Branch::hidden;
  linear(ops, s, w, Role::q_w, Role::q_b, attn_in, &Branch::q, noise, nb);
  linear(ops, s, w, Role::k_w, Role::k_b, attn_in, &Branch::k, noise, nb);
  linear(ops, s, w, Role::v_w, Role::v_b, attn_in, &Branch::v, noise, nb);
  if (config_.qk_norm) qk_norm(ops, s, w, noise, nb);
  attention(ops, s, batch, nb);
  if (gemma) {
    // Gemma 3: hidden += post_attention_layernorm(attn·Woᵀ + bo).
    linear(ops, s, w, Role::o_w, Role::o_b, &Branch::attn, &Branch::x, noise, nb);
    norm(ops, s, w, Role::post_attn_norm_w, Role::count_, &Branch::x, &Branch::x, noise, nb);
    for (int i = 0; i < nb; ++i) ops.add(s, branches_[static_cast<std::size_t>(i)].hidden, branches_[static_cast<std::size_t>(i)].x);
  } else {
    // hidden += attn·Woᵀ + bo (x is the tiles' scratch).
    linear(ops, s, w, Role::o_w, Role::o_b, &Branch::attn, &Branch::x, noise, nb, false, &Branch::hidden);
  }
  if (!pre) norm(ops, s, w, Role::attn_norm_w, Role::attn_norm_b, &Branch::hidden, &Branch::hidden, noise, nb);
  // MLP.
  Mat Branch::*mlp_in = &Branch::x;
  if (pre) norm(ops, s, w, Role::mlp_norm_w, Role::mlp_norm_b, &Branch::hidden, &Branch::x, noise, nb);
  else mlp_in = &Branch::hidden;
  if (opt) {
    linear(ops, s, w, Role::fc1_w, Role::fc1_b, mlp_in, &Branch::m1, noise, nb, /*relu=*/true);
    linear(ops, s, w, Role::fc2_w, Role::fc2_b, &Branch::m1, &Branch::x, noise, nb, false, &Branch::hidden);
  } else {
    linear(ops, s, w, Role::gate_w, Role::gate_b, mlp_in, &Branch::m1, noise, nb);
    linear(ops, s, w, Role::up_w, Role::up_b, mlp_in, &Branch::m2, noise, nb);
    for (int i = 0; i < nb; ++i) {
      Branch& br = branches_[static_cast<std::size_t>(i)];
      if (gemma) ops.gelu_tanh_mul(s, br.m1, br.m2, br.m1);
      else ops.silu_mul(s, br.m1, br.m2, br.m1);
    }
    if (gemma) {
      // Gemma 3: hidden += post_feedforward_layernorm(mlp).
      linear(ops, s, w, Role::down_w, Role::down_b, &Branch::m1, &Branch::x, noise, nb);
      norm(ops, s, w, Role::post_mlp_norm_w, Role::count_, &Branch::x, &Branch::x, noise, nb);
      for (int i = 0; i < nb; ++i) ops.add(s, branches_[static_cast<std::size_t>(i)].hidden, branches_[static_cast<std::size_t>(i)].x);
    } else {
      linear(ops, s, w, Role::down_w, Role::down_b, &Branch::m1, &Branch::x, noise, nb, false, &Branch::hidden);
    }
  }
  if (!pre) norm(ops, s, w, Role::mlp_norm_w, Role::mlp_norm_b, &Branch::hidden, &Branch::hidden, noise, nb);
  for (int i = 0; i < nb; ++i) branches_[static_cast<std::size_t>(i)] = saved[static_cast<std::size_t>(i)];
  lora_ = nullptr;
  lora_noise_ = nullptr;
  tiles_ = nullptr;
  window_ = 0;
  layer_inv_freq_ = nullptr;
}

void ModelGraph::finish(Ops& ops, Stream& s, const WeightSet& g, const BatchView& batch,
                        const NoiseArgs* noise, int nb) {
  std::vector<Branch> saved(branches_.begin(), branches_.begin() + nb);
  for (int i = 0; i < nb; ++i) branches_[static_cast<std::size_t>(i)] = rows_of(saved[static_cast<std::size_t>(i)], batch.tokens());
  Mat Branch::*cur = &Branch::hidden;
  if (g.find(Role::final_norm_w)) {
    norm(ops, s, g, Role::final_norm_w, Role::final_norm_b, &Branch::hidden, &Branch::x, noise, nb);
    cur = &Branch::x;
  }
  if (config_.has_projections()) {
    linear(ops, s, g, Role::project_out, Role::count_, cur, &Branch::emb, noise, nb);
    cur = &Branch::emb;
  }
  for (int i = 0; i < nb; ++i) {
    Branch& full = saved[static_cast<std::size_t>(i)];
    full.final = full.*cur;  // full-capacity view of the same buffer
  }
  for (int i = 0; i < nb; ++i) branches_[static_cast<std::size_t>(i)] = saved[static_cast<std::size_t>(i)];
}

void ModelGraph::last_logits(Ops& ops, Stream& s, const WeightSet& g, const BatchView& batch, const Mat& logits) {
  const std::int64_t B = batch.batch, T = batch.seq;
  Branch& br = branches_[0];
  const Mat fin = br.final;
  const std::size_t row = static_cast<std::size_t>(fin.cols) * dtype_size(compute_);
  ZO2_CHECK(fin.contiguous() && logits.rows >= B && logits.cols == config_.vocab_size && logits.dtype == DType::f32);
  // Each sequence's last row, gathered into the MLP buffer (free after the blocks).
  ZO2_CHECK(br.m1.rows * br.m1.cols >= B * fin.cols);
  const Mat last = Mat::dense(br.m1.data, compute_, B, fin.cols);
  s.copy_2d(Stream::CopyKind::d2d, last.data, row, static_cast<const char*>(fin.data) + static_cast<std::size_t>(T - 1) * row,
            static_cast<std::size_t>(T) * row, row, static_cast<std::size_t>(B));
  const StoredTensor& w = g.find(Role::lm_head) ? g.at(Role::lm_head) : g.at(Role::embed_tokens);
  for (std::int64_t v0 = 0; v0 < w.rows; v0 += limits_.vocab_tile) {
    const std::int64_t v1 = std::min(w.rows, v0 + limits_.vocab_tile);
    const Views v = materialize(ops, s, w, v0, v1, nullptr, weight_scratch_[0], weight_scratch_[1]);
    const Mat out = logits.rows_range(0, B).cols_range(v0, v1);
    ops.gemm(s, last, false, v.w[0], true, out, 1.0f, 0.0f);
    if (config_.final_softcap > 0) ops.softcap(s, out, config_.final_softcap);
  }
}

void ModelGraph::head(Ops& ops, Stream& s, const WeightSet& g, const BatchView& batch,
                      const NoiseArgs* noise, int nb, const Mat* logits) {
  ZO2_CHECK(!logits || nb == 1);
  const std::int64_t n = batch.tokens();
  const StoredTensor& w = g.find(Role::lm_head) ? g.at(Role::lm_head) : g.at(Role::embed_tokens);
  const std::int64_t tile = limits_.vocab_tile;
  for (std::int64_t v0 = 0; v0 < w.rows; v0 += tile) {
    const std::int64_t v1 = std::min(w.rows, v0 + tile);
    const Views v = materialize(ops, s, w, v0, v1, noise, weight_scratch_[0], weight_scratch_[1]);
    for (int i = 0; i < nb; ++i) {
      Branch& br = branches_[static_cast<std::size_t>(i)];
      const Mat out = logits ? logits->cols_range(v0, v1).rows_range(0, n)
                             : logits_tile_.rows_range(0, n).cols_range(0, v1 - v0);
      ops.gemm(s, br.final.rows_range(0, n), false, v.w[i], true, out, 1.0f, 0.0f);
      if (config_.final_softcap > 0) ops.softcap(s, out, config_.final_softcap);  // before the loss, as transformers
      ops.ce_accumulate(s, out, v0, batch.targets, br.ce_state, v0 == 0);
    }
  }
  for (int i = 0; i < nb; ++i) {
    Branch& br = branches_[static_cast<std::size_t>(i)];
    ops.ce_finish(s, br.ce_state, batch.targets, n, br.row_loss);
    if (batch.option_info)
      ops.option_loss(s, br.row_loss, batch.targets, batch.batch, batch.seq, batch.option_info, br.loss);
    else
      ops.loss_mean(s, br.row_loss, batch.targets, n, br.loss);
  }
}

}  // namespace zo2
