// The CUDA backend's op table, one launcher per op of runtime/ops.h, each the twin of the
// CPU kernel of the same name in runtime/cpu/. CudaOps (cuda_ops.cpp) validates arguments
// and calls these; they enqueue work on the stream and return at once. Arguments mean what
// they mean in ops.h; activations may be fp32, bf16 or fp16 (computed in fp32 registers).
//
// fmt-free on purpose (see cuda_check.h): the .cu files include this header.
#pragma once
#include "runtime/ops.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace zo2::cuda {

// What a launcher needs from a CudaStream.
class KernelStream {
 public:
  virtual cudaStream_t stream() const = 0;
  virtual int sm_count() const = 0;
  // The stream's own cuBLAS handle (created on first use, bound to the stream, with its
  // workspace taken from the arena).
  virtual cublasHandle_t blas() = 0;
  // The stream's cuBLASLt handle (created on first use) and the same workspace as blas()'s:
  // stream order serializes their use.
  virtual cublasLtHandle_t blas_lt() = 0;
  virtual void* blas_workspace(std::size_t* bytes) = 0;
  // At least `bytes` of device memory owned by the stream, taken from the arena. Work
  // enqueued on this stream may use it until the next scratch() call of a later op:
  // stream order makes the reuse safe. Growing it waits for the stream's earlier work.
  virtual void* scratch(std::size_t bytes) = 0;

 protected:
  ~KernelStream() = default;
};

// Blocks for a grid-stride loop over `items` units of `threads` threads: enough to fill
// the device, never more than there is work (and never above CUDA's 2^31 − 1 limit).
int grid_blocks(const KernelStream& s, std::int64_t items, int threads);

// gemm.cpp (cuBLAS)
void gemm(KernelStream& s, const Mat& a, bool trans_a, const Mat& b, bool trans_b,
          const Mat& c, float alpha, float beta);
// Whether ZO2_CUDA_GEMM_EPILOGUE asks for the fused linear layer (read at every call).
bool gemm_epilogue_enabled();
// Ops::linear as one cuBLASLt matmul with an epilogue (Note [GEMM epilogues]): y = x·wᵀ +
// bias (then ReLU), or residual += x·wᵀ + bias; false, having enqueued nothing, where it
// does not apply or cuBLASLt offers no algorithm.
bool linear_epilogue(KernelStream& s, const Mat& x, const Mat& w, const Mat& y, const void* bias, bool relu,
                     const Mat* residual);
// elementwise.cu
void add_bias(KernelStream& s, const Mat& y, const void* bias);
void add(KernelStream& s, const Mat& y, const Mat& x);
void relu(KernelStream& s, const Mat& x);
void silu_mul(KernelStream& s, const Mat& gate, const Mat& up, const Mat& out);
void gelu_tanh_mul(KernelStream& s, const Mat& gate, const Mat& up, const Mat& out);
void scale(KernelStream& s, const Mat& x, float alpha);
void softcap(KernelStream& s, const Mat& x, float cap);
// norm.cu
void layernorm(KernelStream& s, const Mat& x, const void* weight, const void* bias, float eps,
               const Mat& y);
void rmsnorm(KernelStream& s, const Mat& x, const void* weight, float eps, const Mat& y,
             float weight_offset = 0.0f);
// rope.cu
void rope(KernelStream& s, const Mat& x, int head_dim, const std::int32_t* positions,
          const float* inv_freq);
// attention.cu
void attention(KernelStream& s, const AttentionArgs& args);
// embedding.cu
void embedding(KernelStream& s, const StoredTensor& table, const std::int32_t* ids,
               std::int64_t n, const Mat& out, const NoiseArgs* noise, float sign);
// cross_entropy.cu
void ce_accumulate(KernelStream& s, const Mat& logits_tile, std::int64_t col_offset,
                   const std::int32_t* targets, float* state, bool first);
void ce_finish(KernelStream& s, const float* state, const std::int32_t* targets,
               std::int64_t rows, float* row_loss);
void loss_mean(KernelStream& s, const float* row_loss, const std::int32_t* targets,
               std::int64_t n, float* out);
void option_loss(KernelStream& s, const float* row_loss, const std::int32_t* targets, int batch,
                 int seq, const std::int32_t* info, float* out);
// noise.cu
void perturb(KernelStream& s, const StoredTensor& w, std::int64_t row_begin,
             std::int64_t row_end, const NoiseArgs* noise, void* out_plus, void* out_minus,
             DType out_dtype);
void spsa_grad(KernelStream& s, const float* loss_plus, const float* loss_minus, float eps,
               float* g);
void update(KernelStream& s, const StoredTensor& w, const UpdateArgs& args);
// state_update.cu (arguments checked by CudaOps: shapes, dtypes, directions, v iff Adam)
void update_state(KernelStream& s, const StoredTensor& w, const StoredTensor& m, const StoredTensor* v,
                  const StateUpdateArgs& args);

}  // namespace zo2::cuda
