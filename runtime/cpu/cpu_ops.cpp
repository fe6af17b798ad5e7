// CpuOps: each op of the table enqueues its CPU kernel on the (CPU) stream, to run inside the
// device's kernel arena (Note [Kernel threads], cpu_device.cpp). Arguments are captured by
// value: the caller may reuse its argument structs as soon as the call returns.
#include "runtime/cpu/cpu_device.h"
#include "runtime/cpu/cpu_kernels.h"

namespace zo2::cpu {
namespace {

class CpuOps final : public Ops {
 public:
  explicit CpuOps(KernelArena& arena) : arena_(arena) {}

  void gemm(Stream& s, const Mat& a, bool ta, const Mat& b, bool tb, const Mat& c, float alpha,
            float beta) override {
    enqueue(s, arena_, [=] { cpu::gemm(a, ta, b, tb, c, alpha, beta); });
  }
  void add_bias(Stream& s, const Mat& y, const void* bias) override {
    enqueue(s, arena_, [=] { cpu::add_bias(y, bias); });
  }
  void add(Stream& s, const Mat& y, const Mat& x) override {
    enqueue(s, arena_, [=] { cpu::add(y, x); });
  }
  void layernorm(Stream& s, const Mat& x, const void* w, const void* b, float eps,
                 const Mat& y) override {
    enqueue(s, arena_, [=] { cpu::layernorm(x, w, b, eps, y); });
  }
  void rmsnorm(Stream& s, const Mat& x, const void* w, float eps, const Mat& y, float offset) override {
    enqueue(s, arena_, [=] { cpu::rmsnorm(x, w, eps, y, offset); });
  }
  void rope(Stream& s, const Mat& x, int head_dim, const std::int32_t* positions,
            const float* inv_freq) override {
    enqueue(s, arena_, [=] { cpu::rope(x, head_dim, positions, inv_freq); });
  }
  void attention(Stream& s, const AttentionArgs& args) override {
    enqueue(s, arena_, [=] { cpu::attention(args); });
  }
  void relu(Stream& s, const Mat& x) override {
    enqueue(s, arena_, [=] { cpu::relu(x); });
  }
  void silu_mul(Stream& s, const Mat& gate, const Mat& up, const Mat& out) override {
    enqueue(s, arena_, [=] { cpu::silu_mul(gate, up, out); });
  }
  void gelu_tanh_mul(Stream& s, const Mat& gate, const Mat& up, const Mat& out) override {
    enqueue(s, arena_, [=] { cpu::gelu_tanh_mul(gate, up, out); });
  }
  void softcap(Stream& s, const Mat& x, float cap) override {
    enqueue(s, arena_, [=] { cpu::softcap(x, cap); });
  }
  void scale(Stream& s, const Mat& x, float alpha) override {
    enqueue(s, arena_, [=] { cpu::scale(x, alpha); });
  }
  void embedding(Stream& s, const StoredTensor& table, const std::int32_t* ids, std::int64_t n,
                 const Mat& out, const NoiseArgs* noise, float sign) override {
    cpu::check_embedding_table(table);
    const bool has_noise = noise != nullptr;
    const NoiseArgs nz = has_noise ? *noise : NoiseArgs{};
    enqueue(s, arena_, [=] { cpu::embedding(table, ids, n, out, has_noise ? &nz : nullptr, sign); });
  }
  void ce_accumulate(Stream& s, const Mat& logits, std::int64_t col_offset,
                     const std::int32_t* targets, float* state, bool first) override {
    enqueue(s, arena_, [=] { cpu::ce_accumulate(logits, col_offset, targets, state, first); });
  }
  void ce_finish(Stream& s, const float* state, const std::int32_t* targets, std::int64_t rows,
                 float* row_loss) override {
    enqueue(s, arena_, [=] { cpu::ce_finish(state, targets, rows, row_loss); });
  }
  void loss_mean(Stream& s, const float* row_loss, const std::int32_t* targets, std::int64_t n,
                 float* out) override {
    enqueue(s, arena_, [=] { cpu::loss_mean(row_loss, targets, n, out); });
  }
  void option_loss(Stream& s, const float* row_loss, const std::int32_t* targets, int batch, int seq,
                   const std::int32_t* info, float* out) override {
    enqueue(s, arena_, [=] { cpu::option_loss(row_loss, targets, batch, seq, info, out); });
  }
  void perturb(Stream& s, const StoredTensor& w, std::int64_t r0, std::int64_t r1,
               const NoiseArgs* noise, void* plus, void* minus, DType out_dtype) override {
    cpu::first_group(w, "perturb");
    const bool has_noise = noise != nullptr;
    const NoiseArgs nz = has_noise ? *noise : NoiseArgs{};
    enqueue(s, arena_, [=] { cpu::perturb(w, r0, r1, has_noise ? &nz : nullptr, plus, minus, out_dtype); });
  }
  void spsa_grad(Stream& s, const float* lp, const float* lm, float eps, float* g) override {
    enqueue(s, arena_, [=] { cpu::spsa_grad(lp, lm, eps, g); });
  }
  void update(Stream& s, const StoredTensor& w, const UpdateArgs& args) override {
    cpu::first_group(w, "update");
    enqueue(s, arena_, [=] { cpu::update(w, args); });
  }
  void update_state(Stream& s, const StoredTensor& w, const StoredTensor& m, const StoredTensor* v,
                    const StateUpdateArgs& args) override {
    cpu::check_update_state(w, m, v, args);
    const bool has_v = v != nullptr;
    const StoredTensor vv = has_v ? *v : StoredTensor{};
    enqueue(s, arena_, [=] { cpu::update_state(w, m, has_v ? &vv : nullptr, args); });
  }

 private:
  KernelArena& arena_;
};

}  // namespace

std::unique_ptr<Ops> make_cpu_ops(KernelArena& arena) { return std::make_unique<CpuOps>(arena); }

}  // namespace zo2::cpu
