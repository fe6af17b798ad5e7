// The op table every backend implements (DESIGN.md §3). Each op enqueues work on a
// Stream and returns at once; pointers are device pointers of that backend. The CPU
// backend (runtime/cpu/) is the reference: each CUDA kernel is tested against its twin.
//
// Conventions: matrices are row-major with a leading dimension; activations are
// [tokens, features]; weights follow Hugging Face's nn.Linear layout [out, in], so a
// linear layer is gemm(x, false, W, true, y). Reductions run in fp32 (or wider) with a
// fixed order, so every op gives the same bits for the same inputs whatever the timing.
#pragma once
#include "runtime/dtype.h"

#include <cstddef>
#include <cstdint>

namespace zo2 {

class Stream;

// gelu_tanh's constants (torch's gelu(approximate="tanh")): √(2/π) and 0.044715.
inline constexpr float kGeluTanhK = 0.7978845608028654f;
inline constexpr float kGeluTanhC = 0.044715f;

// A row-major 2-D view of device memory.
struct Mat {
  void* data = nullptr;
  DType dtype = DType::f32;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t ld = 0;  // elements between the starts of consecutive rows

  static Mat dense(void* data, DType dtype, std::int64_t rows, std::int64_t cols) {
    return {data, dtype, rows, cols, cols};
  }
  Mat rows_range(std::int64_t r0, std::int64_t r1) const {
    return {static_cast<char*>(data) + r0 * ld * static_cast<std::int64_t>(dtype_size(dtype)),
            dtype, r1 - r0, cols, ld};
  }
  Mat cols_range(std::int64_t c0, std::int64_t c1) const {
    return {static_cast<char*>(data) + c0 * static_cast<std::int64_t>(dtype_size(dtype)), dtype,
            rows, c1 - c0, ld};
  }
  bool contiguous() const { return ld == cols; }
};

// A weight as stored in a block image or the globals image: storage dtype, per-row fp32
// scales for fp8 (value = scale[row] · e4m3), and the tensor key its noise is drawn with.
// 1-D tensors (biases, norm weights) have rows = 1.
struct StoredTensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  float* row_scales = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::uint64_t key = 0;
  // Sub-block streaming (Note [Sub-block streaming] in offload/scheduler.h): this view holds
  // rows [first_row, first_row + rows) of a larger tensor (data and row_scales point at its
  // own first row), and noise and rounding bits are drawn at the whole tensor's indices,
  // (first_row + r)·cols + c, so a tile perturbs and updates exactly as the rows of the whole
  // tensor do. first_row·cols must be a multiple of 4 (a Philox group).
  std::int64_t first_row = 0;
  std::int64_t numel() const { return rows * cols; }
  std::int64_t first_element() const { return first_row * cols; }
};

// Perturbation parameters of a forward pass over two branches: the first sees W + eps·z,
// the second W + minus·eps·z (z = z(seed, key, index)). minus = −1 is the central
// difference (W ± eps·z); 0 leaves the second branch unperturbed (forward difference).
struct NoiseArgs {
  std::uint64_t seed = 0;
  float eps = 0;
  float minus = -1.0f;
  float eps_minus() const { return minus * eps; }
};

// The deferred ZO update of one tensor: W ← W − lr·(g·z(seed) + wd·W), with g read from
// device memory when the kernel runs (so the host need not wait for the loss). A
// non-finite g leaves W unchanged. Narrow storage dtypes are written back with
// stochastic rounding drawn from (rounding_seed, key, index).
struct UpdateArgs {
  std::uint64_t seed = 0;
  float lr = 0;
  float weight_decay = 0;  // 0 for biases and norm weights
  const float* g = nullptr;
  std::uint64_t rounding_seed = 0;
  bool sign = false;  // use sign(g) ∈ {−1, 0, 1} instead of g (zo-sgd-sign)
};

// The deferred update of a rule that keeps state (zo/rule.h: zo-sgd-momentum, zo-adam),
// one tensor, in place. With q = directions and c_j = g[j] / q:
//   u = wd·W + Σ_j c_j·z(seeds[j])        (accumulated in j order, fp32)
//   momentum (torch.optim.SGD, dampening 0):  m ← beta1·m + u;  W ← W − lr·m
//   adam (torch.optim.Adam, L2 decay):        m ← beta1·m + (1 − beta1)·u
//                                             v ← beta2·v + (1 − beta2)·u²
//                                             W ← W − (lr / bias1)·m / (√v / √bias2 + adam_eps)
// bias_k = 1 − beta_k^t for the step's t (the host computes them). The g[j] are read from
// device memory when the kernel runs; if any is not finite, W, m and v stay unchanged.
// m (and v, for Adam) have W's shape, in the state dtype (f32 | bf16 | f8_e4m3 with
// per-row scales, like a weight). Narrow dtypes are written with stochastic rounding:
// W from (rounding_seed, key), m and v from their own streams (NoiseDomain::state_m/_v).
struct StateUpdateArgs {
  static constexpr int kMaxDirections = 64;
  int directions = 1;
  std::uint64_t seeds[kMaxDirections] = {};
  const float* g = nullptr;  // device, [directions]
  float lr = 0;
  float weight_decay = 0;  // 0 for biases and norm weights
  bool adam = false;       // false: momentum
  float beta1 = 0.9f;      // momentum: the momentum factor
  float beta2 = 0.999f;
  float adam_eps = 1e-8f;
  float bias1 = 1.0f;
  float bias2 = 1.0f;
  std::uint64_t rounding_seed = 0;
};

// Attention of `seq` query rows per sequence over `keys()` key rows per sequence. Without
// a KV cache (kv_seq = 0) queries and keys are the same rows. With one (generation), the
// keys of sequence b are rows [b·kv_stride, b·kv_stride + kv_seq) of k, v and key_mask, and
// its seq queries are the last seq of them: query i sits at key position kv_seq − seq + i
// and, causal, sees keys 0..kv_seq − seq + i. With a sliding window W > 0 (Mistral; Note
// [LLaMA-family variants] in models/config.cpp) a query at key position p sees only keys
// j > p − W (transformers' sliding_window_overlay): positions are absolute (rows of the
// sequence or of its cache), so the window holds with a KV cache too.
struct AttentionArgs {
  Mat q;    // [batch·seq, heads·head_dim]
  Mat k;    // [batch·seq (or batch·kv_stride), kv_heads·head_dim]
  Mat v;    // [batch·seq (or batch·kv_stride), kv_heads·head_dim]
  Mat out;  // [batch·seq, heads·head_dim]
  int batch = 0;
  int seq = 0;
  int heads = 0;
  int kv_heads = 0;  // heads % kv_heads == 0 (grouped-query; 1 = multi-query)
  int head_dim = 0;
  // [batch·seq] (or [batch·kv_stride]), 1 = attend, 0 = padding; null = all
  const std::int32_t* key_mask = nullptr;
  float scale = 1;
  bool causal = true;
  int kv_seq = 0;     // keys per sequence, ≥ seq (0: seq, no cache)
  int kv_stride = 0;  // rows between sequences' keys (0: keys())
  int window = 0;     // sliding window: keys j > p − window only (0: none)
  // Soft-capping (Gemma's attn_logit_softcapping): each scaled score s becomes
  // softcap·tanh(s / softcap) before the mask and the softmax (0: none).
  float softcap = 0;
  int keys() const { return kv_seq > 0 ? kv_seq : seq; }
  int key_stride() const { return kv_stride > 0 ? kv_stride : keys(); }
  int query_offset() const { return keys() - seq; }
  // The first key a query at key position p may see (0 without a window).
  int first_key(int p) const { return window > 0 && p - window + 1 > 0 ? p - window + 1 : 0; }
};

class Ops {
 public:
  virtual ~Ops() = default;

  // C = alpha·op(A)·op(B) + beta·C with op(A) [M,K], op(B) [K,N], C [M,N]; fp32
  // accumulation. A and B share a dtype (fp32; bf16/fp16 on GPUs); C is fp32 or that dtype.
  virtual void gemm(Stream& s, const Mat& a, bool trans_a, const Mat& b, bool trans_b,
                    const Mat& c, float alpha, float beta) = 0;
  // A linear layer's output (or a tile of its columns): y = x·wᵀ (w is [y.cols, x.cols]),
  // plus bias (y.cols elements of y.dtype; none when null), then max(·, 0) when relu; then,
  // when residual is given (y's shape and dtype), residual += y — y is then scratch, its
  // contents afterwards unspecified. The default is gemm, add_bias, relu and add in that
  // order; a backend may fuse them (CUDA: a cuBLASLt epilogue, Note [GEMM epilogues] in
  // runtime/cuda/gemm.cpp), which rounds once where the default rounds after each step.
  virtual void linear(Stream& s, const Mat& x, const Mat& w, const Mat& y, const void* bias, bool relu,
                      const Mat* residual) {
    gemm(s, x, false, w, true, y, 1.0f, 0.0f);
    if (bias != nullptr) add_bias(s, y, bias);
    if (relu) this->relu(s, y);
    if (residual != nullptr) add(s, *residual, y);
  }
  // y[r, :] += bias[:] (bias: y.cols elements of y.dtype).
  virtual void add_bias(Stream& s, const Mat& y, const void* bias) = 0;
  // y += x (same shape and dtype).
  virtual void add(Stream& s, const Mat& y, const Mat& x) = 0;
  // y = (x − mean)/sqrt(var + eps)·weight + bias, per row; y may alias x.
  virtual void layernorm(Stream& s, const Mat& x, const void* weight, const void* bias,
                         float eps, const Mat& y) = 0;
  // y = x/sqrt(mean(x²) + eps)·weight, per row (LLaMA); y may alias x. With weight_offset
  // (Gemma 3: 1) the factor is (weight_offset + weight), added in fp32: y = (x·inv)·(1 + w).
  virtual void rmsnorm(Stream& s, const Mat& x, const void* weight, float eps, const Mat& y,
                       float weight_offset = 0.0f) = 0;
  // In-place rotary embedding (rotate-half convention of HF LLaMA) on every head of x
  // ([tokens, heads·head_dim]): angle = positions[token]·inv_freq[i], i < head_dim/2.
  virtual void rope(Stream& s, const Mat& x, int head_dim, const std::int32_t* positions,
                    const float* inv_freq) = 0;
  // Causal (and padding-masked) softmax attention; a query row with no visible key
  // (a padding row in left padding) gets zeros. Never materializes B·H·T·T scores.
  virtual void attention(Stream& s, const AttentionArgs& args) = 0;
  virtual void relu(Stream& s, const Mat& x) = 0;
  // out = silu(gate)·up.
  virtual void silu_mul(Stream& s, const Mat& gate, const Mat& up, const Mat& out) = 0;
  // out = gelu_tanh(gate)·up (Gemma 3's gelu_pytorch_tanh: 0.5·g·(1 + tanh(√(2/π)·(g +
  // 0.044715·g³)))); out may alias gate or up.
  virtual void gelu_tanh_mul(Stream& s, const Mat& gate, const Mat& up, const Mat& out) = 0;
  // x *= alpha, element for element (Gemma 3's embedding scale).
  virtual void scale(Stream& s, const Mat& x, float alpha) = 0;
  // x = cap·tanh(x / cap), element for element (Gemma's final_logit_softcapping); cap > 0.
  virtual void softcap(Stream& s, const Mat& x, float cap) = 0;
  // out[i, :] = table[ids[i], :] (+ sign·eps·z when noise is given), in out.dtype.
  // Ids outside [0, table.rows) give a zero row (callers validate ids on the host).
  virtual void embedding(Stream& s, const StoredTensor& table, const std::int32_t* ids,
                         std::int64_t n, const Mat& out, const NoiseArgs* noise, float sign) = 0;
  // Cross-entropy computed over vocabulary tiles, so full logits never need to exist.
  // state is [rows, 3] fp32: running max, running Σexp(x − max), the target's logit. The
  // first tile (first = true) initializes it; tiles must come in a fixed order.
  virtual void ce_accumulate(Stream& s, const Mat& logits_tile, std::int64_t col_offset,
                             const std::int32_t* targets, float* state, bool first) = 0;
  // row_loss[r] = max + log(sum) − target logit, or 0 where targets[r] < 0.
  virtual void ce_finish(Stream& s, const float* state, const std::int32_t* targets,
                         std::int64_t rows, float* row_loss) = 0;
  // out[0] = Σ row_loss / #(targets ≥ 0), summed in a fixed order (NaN when no target).
  virtual void loss_mean(Stream& s, const float* row_loss, const std::int32_t* targets,
                         std::int64_t n, float* out) = 0;
  // MeZO's loss for multiple-choice examples (its train_as_classification): sequence r of
  // the `batch` sequences (each `seq` positions of row_loss/targets) is a candidate of
  // group info[r] >> 1 (groups are runs of equal ids), the labelled one when info[r] & 1.
  // score_r = −(mean row_loss over the sequence's targets) is the candidate's mean token
  // log-likelihood; out[0] = mean over groups of logsumexp(scores) − score(labelled),
  // summed in a fixed order. NaN when a candidate has no target or a group no label.
  virtual void option_loss(Stream& s, const float* row_loss, const std::int32_t* targets,
                           int batch, int seq, const std::int32_t* info, float* out) = 0;
  // Rows [row_begin, row_end) of w, dequantized to out_dtype, as dense matrices:
  // out_plus = W + eps·z and out_minus = W − eps·z (either may be null); with noise ==
  // nullptr, out_plus = W (a plain dequantization/conversion).
  virtual void perturb(Stream& s, const StoredTensor& w, std::int64_t row_begin,
                       std::int64_t row_end, const NoiseArgs* noise, void* out_plus,
                       void* out_minus, DType out_dtype) = 0;
  // g[0] = (loss_plus[0] − loss_minus[0]) / (2·eps).
  virtual void spsa_grad(Stream& s, const float* loss_plus, const float* loss_minus, float eps,
                         float* g) = 0;
  // The fused deferred update (UpdateArgs), in place.
  virtual void update(Stream& s, const StoredTensor& w, const UpdateArgs& args) = 0;
  // The deferred update of a stateful rule (StateUpdateArgs), in place on w, m and v
  // (v == nullptr for momentum).
  virtual void update_state(Stream& s, const StoredTensor& w, const StoredTensor& m,
                            const StoredTensor* v, const StateUpdateArgs& args) = 0;
};

}  // namespace zo2
