// The CPU kernels: synchronous, fp32 compute, deterministic (fixed partitioning, fixed
// reduction order). They are the reference every CUDA kernel is tested against, and
// CpuOps (cpu_ops.cpp) runs them on CPU streams. Arguments mean what they mean in ops.h.
#pragma once

#include "runtime/ops.h"

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>

namespace zo2::cpu {

class KernelArena;

// The ops table of a CPU device: every kernel runs inside `arena` (Note [Kernel threads]).
std::unique_ptr<Ops> make_cpu_ops(KernelArena& arena);

// Runs body(begin, end) over [0, n) in chunks of `grain`; the chunk boundaries depend
// only on n and grain, never on timing.
void parallel_for(std::int64_t n, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& body);

void gemm(const Mat& a, bool trans_a, const Mat& b, bool trans_b, const Mat& c, float alpha,
          float beta);
void add_bias(const Mat& y, const void* bias);
void add(const Mat& y, const Mat& x);
void layernorm(const Mat& x, const void* weight, const void* bias, float eps, const Mat& y);
void rmsnorm(const Mat& x, const void* weight, float eps, const Mat& y, float weight_offset = 0.0f);
void rope(const Mat& x, int head_dim, const std::int32_t* positions, const float* inv_freq);
void attention(const AttentionArgs& args);
void relu(const Mat& x);
void silu_mul(const Mat& gate, const Mat& up, const Mat& out);
void gelu_tanh_mul(const Mat& gate, const Mat& up, const Mat& out);
void scale(const Mat& x, float alpha);
void softcap(const Mat& x, float cap);
// cap·tanh(x / cap), rounded as the CUDA twin writes it (a division, tanh, a product).
inline float softcap_of(float x, float cap) { return std::tanh(x / cap) * cap; }
// check_embedding_table throws (internal) for a tile of a table (CpuOps calls it when the
// op is enqueued; embedding checks too).
void check_embedding_table(const StoredTensor& table);
void embedding(const StoredTensor& table, const std::int32_t* ids, std::int64_t n,
               const Mat& out, const NoiseArgs* noise, float sign);
void ce_accumulate(const Mat& logits_tile, std::int64_t col_offset, const std::int32_t* targets,
                   float* state, bool first);
void ce_finish(const float* state, const std::int32_t* targets, std::int64_t rows, float* row_loss);
void loss_mean(const float* row_loss, const std::int32_t* targets, std::int64_t n, float* out);
void option_loss(const float* row_loss, const std::int32_t* targets, int batch, int seq,
                 const std::int32_t* info, float* out);
// The Philox group of a tile's element 0 in its whole tensor (StoredTensor::first_row):
// a tile's local group q is the tensor's group first_group + q, lane for lane. Throws
// (internal) unless the tile starts on a group boundary (CpuOps calls it when perturb and
// update are enqueued, so a bad tile fails at the call; the kernels check too).
std::uint64_t first_group(const StoredTensor& w, const char* op);
void perturb(const StoredTensor& w, std::int64_t row_begin, std::int64_t row_end,
             const NoiseArgs* noise, void* out_plus, void* out_minus, DType out_dtype);
void spsa_grad(const float* loss_plus, const float* loss_minus, float eps, float* g);
void update(const StoredTensor& w, const UpdateArgs& args);
// state_update.cpp. check_update_state throws for bad arguments (CpuOps calls it when the
// op is enqueued, so a bad call fails at the call); update_state checks them too.
void check_update_state(const StoredTensor& w, const StoredTensor& m, const StoredTensor* v,
                        const StateUpdateArgs& args);
void update_state(const StoredTensor& w, const StoredTensor& m, const StoredTensor* v,
                  const StateUpdateArgs& args);

}  // namespace zo2::cpu
