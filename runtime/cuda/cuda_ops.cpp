// CudaOps: the op table of runtime/ops.h on CUDA streams. Each op checks its arguments on
// the host (a bad call throws here, at the call, rather than faulting the GPU later), makes
// the stream's device current, and enqueues the kernel (kernels.h). Arguments are passed
// by value to the kernels, so callers may reuse their structs as soon as a call returns.
#include "runtime/cuda/cuda_device.h"
#include "runtime/cuda/kernels.h"

namespace zo2::cuda {
namespace {

bool is_activation(DType dt) { return dt == DType::f32 || dt == DType::bf16 || dt == DType::f16; }

void check_mat(const Mat& m, const char* op, const char* what) {
  if (!is_activation(m.dtype))
    fail(ErrorKind::unsupported, "cuda {}: {} is {}; activations must be fp32, bf16 or fp16", op,
         what, dtype_name(m.dtype));
  if (m.rows < 0 || m.cols < 0 || (m.rows > 1 && m.ld < m.cols))
    fail(ErrorKind::internal, "cuda {}: {} has a bad shape ({}x{}, ld {})", op, what, m.rows, m.cols,
         m.ld);
  if (m.rows > 0 && m.cols > 0 && m.data == nullptr)
    fail(ErrorKind::internal, "cuda {}: {} has no data", op, what);
}

void check_same(const Mat& a, const Mat& b, const char* op, const char* what) {
  if (a.rows != b.rows || a.cols != b.cols || a.dtype != b.dtype)
    fail(ErrorKind::internal, "cuda {}: {} is {}x{} {} but must match {}x{} {}", op, what, b.rows,
         b.cols, dtype_name(b.dtype), a.rows, a.cols, dtype_name(a.dtype));
}

void check_stored(const StoredTensor& w, const char* op) {
  if (!dtype_is_storage(w.dtype))
    fail(ErrorKind::unsupported, "cuda {}: weights stored as {} are not supported", op,
         dtype_name(w.dtype));
  if (w.rows < 0 || w.cols < 0 || (w.numel() > 0 && w.data == nullptr))
    fail(ErrorKind::internal, "cuda {}: bad stored tensor ({}x{})", op, w.rows, w.cols);
  if (w.dtype == DType::f8_e4m3 && w.numel() > 0 && w.row_scales == nullptr)
    fail(ErrorKind::internal, "cuda {}: an fp8 tensor needs its row scales", op);
  // A tile draws at the whole tensor's indices group by group (its local group q is the
  // tensor's group first_element/4 + q), so it must start on a group boundary.
  if (w.first_row < 0 || w.first_element() % 4 != 0)
    fail(ErrorKind::internal, "cuda {}: a tile from row {} of {} columns does not start on a group of 4 elements",
         op, w.first_row, w.cols);
}

class CudaOps final : public Ops {
 public:
  void gemm(Stream& s, const Mat& a, bool ta, const Mat& b, bool tb, const Mat& c, float alpha,
            float beta) override {
    check_mat(a, "gemm", "A");
    check_mat(b, "gemm", "B");
    check_mat(c, "gemm", "C");
    cuda::gemm(enter(s), a, ta, b, tb, c, alpha, beta);
  }

  // Note [GEMM epilogues] (runtime/cuda/gemm.cpp): fused where asked for and possible.
  void linear(Stream& s, const Mat& x, const Mat& w, const Mat& y, const void* bias, bool relu,
              const Mat* residual) override {
    if ((bias != nullptr || relu || residual != nullptr) && gemm_epilogue_enabled()) {
      check_mat(x, "linear", "x");
      check_mat(w, "linear", "w");
      check_mat(y, "linear", "y");
      if (residual != nullptr) {
        check_mat(*residual, "linear", "residual");
        check_same(y, *residual, "linear", "residual");
      }
      if (cuda::linear_epilogue(enter(s), x, w, y, bias, relu, residual)) return;
    }
    Ops::linear(s, x, w, y, bias, relu, residual);
  }

  void add_bias(Stream& s, const Mat& y, const void* bias) override {
    check_mat(y, "add_bias", "y");
    if (bias == nullptr && y.cols > 0) fail(ErrorKind::internal, "cuda add_bias: no bias");
    cuda::add_bias(enter(s), y, bias);
  }

  void add(Stream& s, const Mat& y, const Mat& x) override {
    check_mat(y, "add", "y");
    check_mat(x, "add", "x");
    check_same(y, x, "add", "x");
    cuda::add(enter(s), y, x);
  }

  void layernorm(Stream& s, const Mat& x, const void* w, const void* b, float eps,
                 const Mat& y) override {
    check_norm(x, w, y, "layernorm");
    cuda::layernorm(enter(s), x, w, b, eps, y);
  }

  void rmsnorm(Stream& s, const Mat& x, const void* w, float eps, const Mat& y, float offset) override {
    check_norm(x, w, y, "rmsnorm");
    cuda::rmsnorm(enter(s), x, w, eps, y, offset);
  }

  void rope(Stream& s, const Mat& x, int head_dim, const std::int32_t* positions,
            const float* inv_freq) override {
    check_mat(x, "rope", "x");
    if (head_dim <= 0) fail(ErrorKind::internal, "cuda rope: head_dim {}", head_dim);
    cuda::rope(enter(s), x, head_dim, positions, inv_freq);
  }

  void attention(Stream& s, const AttentionArgs& a) override {
    check_mat(a.q, "attention", "q");
    check_mat(a.k, "attention", "k");
    check_mat(a.v, "attention", "v");
    check_mat(a.out, "attention", "out");
    if (a.k.dtype != a.q.dtype || a.v.dtype != a.q.dtype || a.out.dtype != a.q.dtype)
      fail(ErrorKind::unsupported, "cuda attention: q, k, v and out must share a dtype");
    if (a.batch < 0 || a.seq < 0 || a.heads <= 0 || a.head_dim <= 0 || a.kv_heads <= 0 ||
        a.heads % a.kv_heads != 0)
      fail(ErrorKind::internal, "cuda attention: {} heads not a multiple of {} kv heads (head_dim {})",
           a.heads, a.kv_heads, a.head_dim);
    const std::int64_t tokens = std::int64_t{a.batch} * a.seq;
    const std::int64_t qd = std::int64_t{a.heads} * a.head_dim, kd = std::int64_t{a.kv_heads} * a.head_dim;
    if (a.q.rows < tokens || a.k.rows < tokens || a.v.rows < tokens || a.out.rows < tokens ||
        a.q.cols < qd || a.out.cols < qd || a.k.cols < kd || a.v.cols < kd)
      fail(ErrorKind::internal,
           "cuda attention: q {}x{}, k {}x{}, v {}x{}, out {}x{} do not hold {} tokens of {} heads "
           "/ {} kv heads × {}",
           a.q.rows, a.q.cols, a.k.rows, a.k.cols, a.v.rows, a.v.cols, a.out.rows, a.out.cols,
           tokens, a.heads, a.kv_heads, a.head_dim);
    cuda::attention(enter(s), a);
  }

  void relu(Stream& s, const Mat& x) override {
    check_mat(x, "relu", "x");
    cuda::relu(enter(s), x);
  }

  void silu_mul(Stream& s, const Mat& gate, const Mat& up, const Mat& out) override {
    check_mat(gate, "silu_mul", "gate");
    check_mat(up, "silu_mul", "up");
    check_mat(out, "silu_mul", "out");
    check_same(out, gate, "silu_mul", "gate");
    check_same(out, up, "silu_mul", "up");
    cuda::silu_mul(enter(s), gate, up, out);
  }

  void gelu_tanh_mul(Stream& s, const Mat& gate, const Mat& up, const Mat& out) override {
    check_mat(gate, "gelu_tanh_mul", "gate");
    check_mat(up, "gelu_tanh_mul", "up");
    check_mat(out, "gelu_tanh_mul", "out");
    check_same(out, gate, "gelu_tanh_mul", "gate");
    check_same(out, up, "gelu_tanh_mul", "up");
    cuda::gelu_tanh_mul(enter(s), gate, up, out);
  }

  void softcap(Stream& s, const Mat& x, float cap) override {
    check_mat(x, "softcap", "x");
    cuda::softcap(enter(s), x, cap);
  }
  void scale(Stream& s, const Mat& x, float alpha) override {
    check_mat(x, "scale", "x");
    cuda::scale(enter(s), x, alpha);
  }

  void embedding(Stream& s, const StoredTensor& table, const std::int32_t* ids, std::int64_t n,
                 const Mat& out, const NoiseArgs* noise, float sign) override {
    check_stored(table, "embedding");
    // Ids index the whole table, so a tile of it has no meaning here.
    if (table.first_row != 0)
      fail(ErrorKind::internal, "cuda embedding: the table is a tile from row {}; embedding takes whole tables",
           table.first_row);
    check_mat(out, "embedding", "out");
    if (n < 0 || out.rows < n || out.cols != table.cols || (n > 0 && ids == nullptr))
      fail(ErrorKind::internal, "cuda embedding: {} ids into a {}x{} output of a table with {} columns",
           n, out.rows, out.cols, table.cols);
    cuda::embedding(enter(s), table, ids, n, out, noise, sign);
  }

  void ce_accumulate(Stream& s, const Mat& logits, std::int64_t col_offset,
                     const std::int32_t* targets, float* state, bool first) override {
    check_mat(logits, "ce_accumulate", "logits");
    cuda::ce_accumulate(enter(s), logits, col_offset, targets, state, first);
  }

  void ce_finish(Stream& s, const float* state, const std::int32_t* targets, std::int64_t rows,
                 float* row_loss) override {
    cuda::ce_finish(enter(s), state, targets, rows, row_loss);
  }

  void loss_mean(Stream& s, const float* row_loss, const std::int32_t* targets, std::int64_t n,
                 float* out) override {
    cuda::loss_mean(enter(s), row_loss, targets, n, out);
  }

  void option_loss(Stream& s, const float* row_loss, const std::int32_t* targets, int batch, int seq,
                   const std::int32_t* info, float* out) override {
    cuda::option_loss(enter(s), row_loss, targets, batch, seq, info, out);
  }

  void perturb(Stream& s, const StoredTensor& w, std::int64_t r0, std::int64_t r1,
               const NoiseArgs* noise, void* plus, void* minus, DType out_dtype) override {
    check_stored(w, "perturb");
    if (r0 < 0 || r1 > w.rows || r0 > r1)
      fail(ErrorKind::internal, "cuda perturb: rows [{}, {}) outside [0, {})", r0, r1, w.rows);
    if (!is_activation(out_dtype))
      fail(ErrorKind::unsupported, "cuda perturb: the compute dtype must be fp32, bf16 or fp16, not {}",
           dtype_name(out_dtype));
    cuda::perturb(enter(s), w, r0, r1, noise, plus, minus, out_dtype);
  }

  void spsa_grad(Stream& s, const float* lp, const float* lm, float eps, float* g) override {
    cuda::spsa_grad(enter(s), lp, lm, eps, g);
  }

  void update(Stream& s, const StoredTensor& w, const UpdateArgs& args) override {
    check_stored(w, "update");
    if (args.g == nullptr) fail(ErrorKind::internal, "cuda update: no projected gradient");
    cuda::update(enter(s), w, args);
  }
  void update_state(Stream& s, const StoredTensor& w, const StoredTensor& m, const StoredTensor* v,
                    const StateUpdateArgs& args) override {
    check_stored(w, "update_state");
    auto check_state = [&](const StoredTensor& t, const char* what) {
      if (t.dtype != DType::f32 && t.dtype != DType::bf16 && t.dtype != DType::f8_e4m3)
        fail(ErrorKind::unsupported, "cuda update_state: {} is {}; the state must be fp32, bf16 or fp8", what,
             dtype_name(t.dtype));
      if (t.rows != w.rows || t.cols != w.cols || t.first_row != w.first_row)
        fail(ErrorKind::internal, "cuda update_state: {} is {}x{} from row {} but W is {}x{} from row {}", what,
             t.rows, t.cols, t.first_row, w.rows, w.cols, w.first_row);
      if (t.numel() > 0 && t.data == nullptr) fail(ErrorKind::internal, "cuda update_state: {} has no data", what);
      if (t.dtype == DType::f8_e4m3 && t.numel() > 0 && t.row_scales == nullptr)
        fail(ErrorKind::internal, "cuda update_state: the fp8 {} needs its row scales", what);
    };
    check_state(m, "m");
    if (args.adam != (v != nullptr))
      fail(ErrorKind::internal, "cuda update_state: {}", args.adam ? "Adam needs v" : "momentum takes no v");
    if (v != nullptr) {
      check_state(*v, "v");
      if (v->dtype != m.dtype)
        fail(ErrorKind::internal, "cuda update_state: v is {} but m is {} (one state dtype)", dtype_name(v->dtype),
             dtype_name(m.dtype));
    }
    if (args.directions < 1 || args.directions > StateUpdateArgs::kMaxDirections)
      fail(ErrorKind::internal, "cuda update_state: {} directions (1 to {})", args.directions,
           StateUpdateArgs::kMaxDirections);
    if (args.g == nullptr) fail(ErrorKind::internal, "cuda update_state: no projected gradients");
    cuda::update_state(enter(s), w, m, v, args);
  }

 private:
  static CudaStream& enter(Stream& s) {
    CudaStream& cs = cuda_stream(s);
    use_device(cs.device());
    return cs;
  }

  static void check_norm(const Mat& x, const void* w, const Mat& y, const char* op) {
    check_mat(x, op, "x");
    check_mat(y, op, "y");
    check_same(x, y, op, "y");
    if (w == nullptr && x.cols > 0) fail(ErrorKind::internal, "cuda {}: no weight", op);
  }
};

}  // namespace

std::unique_ptr<Ops> make_cuda_ops() { return std::make_unique<CudaOps>(); }

}  // namespace zo2::cuda
