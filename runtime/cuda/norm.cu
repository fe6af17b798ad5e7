// LayerNorm and RMSNorm (also Gemma 3's (1 + w) RMSNorm) — twins of layernorm/rmsnorm in runtime/cpu/kernels.cpp.
//
// Design: one block of 256 threads per row (grid-stride over rows), fp32 accumulation.
// Each thread sums its chunks of the row in order (Note [Chunked rows]), then the block
// adds the partials in a fixed tree (Note [Deterministic block reductions]): no atomics,
// so a row's result never depends on timing. LayerNorm takes two passes (mean, then the
// sum of squared deviations — no E[x²] − E[x]² cancellation); a third pass writes. The
// row is re-read from L1/L2, not from DRAM, for rows up to tens of thousands of elements.
// y may alias x: every element is read and written by the same thread, and all reads
// of the statistics passes end at a block barrier before the first write.
//
// Weight and bias have x's dtype (the compute dtype: the model materializes them so).
#include "runtime/cuda/kernel_util.cuh"
#include "runtime/cuda/kernels.h"

namespace zo2::cuda {
namespace {

constexpr int kThreads = 256;

template <class E, bool kLayerNorm>
__global__ void __launch_bounds__(kThreads)
    norm_kernel(const typename E::T* x, std::int64_t ldx, typename E::T* y, std::int64_t ldy,
                const typename E::T* weight, const typename E::T* bias, std::int64_t rows,
                std::int64_t cols, float eps, float weight_offset) {
  constexpr int V = kVec<E>;
  __shared__ float smem[32];
  const bool aw = aligned16(weight), ab = bias != nullptr && aligned16(bias);
  const float n = static_cast<float>(cols);
  const std::int64_t first = std::int64_t{threadIdx.x} * V, stride = std::int64_t{blockDim.x} * V;
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const typename E::T* xr = x + r * ldx;
    typename E::T* yr = y + r * ldy;
    const bool ax = aligned16(xr), ay = aligned16(yr);
    // Pass 1: Σx (LayerNorm) or Σx² (RMSNorm); elements beyond the row load as 0.
    float acc = 0.0f;
    for (std::int64_t c0 = first; c0 < cols; c0 += stride) {
      float v[V];
      load_chunk<E>(xr, c0, cols, ax, v);
#pragma unroll
      for (int i = 0; i < V; ++i) acc = kLayerNorm ? __fadd_rn(acc, v[i]) : __fmaf_rn(v[i], v[i], acc);
    }
    acc = block_sum(acc, smem);
    float mean = 0.0f, inv;
    if constexpr (kLayerNorm) {
      mean = __fdiv_rn(acc, n);
      // Pass 2: Σ(x − mean)², over the row's own elements only.
      float var = 0.0f;
      for (std::int64_t c0 = first; c0 < cols; c0 += stride) {
        float v[V];
        load_chunk<E>(xr, c0, cols, ax, v);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float d = __fsub_rn(v[i], mean);
          if (c0 + i < cols) var = __fmaf_rn(d, d, var);
        }
      }
      var = block_sum(var, smem);
      inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(var, n), eps)));
    } else {
      inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(acc, n), eps)));
    }
    // Pass 3: write. LayerNorm: ((x − mean)·inv)·w + b; RMSNorm: w·(x·inv), as on the CPU.
    for (std::int64_t c0 = first; c0 < cols; c0 += stride) {
      float v[V], w[V], b[V];
      load_chunk<E>(xr, c0, cols, ax, v);
      load_chunk<E>(weight, c0, cols, aw, w);
      if (kLayerNorm && bias != nullptr) load_chunk<E>(bias, c0, cols, ab, b);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if constexpr (kLayerNorm) {
          const float t = __fmul_rn(__fsub_rn(v[i], mean), inv);
          v[i] = bias != nullptr ? __fadd_rn(__fmul_rn(t, w[i]), b[i]) : __fmul_rn(t, w[i]);
        } else {
          // Gemma 3 (weight_offset 1): (x·inv)·(1 + w), the factor in fp32, as on the CPU.
          v[i] = weight_offset == 0.0f ? __fmul_rn(w[i], __fmul_rn(v[i], inv))
                                       : __fmul_rn(__fmul_rn(v[i], inv), __fadd_rn(weight_offset, w[i]));
        }
      }
      store_chunk<E>(yr, c0, cols, ay, v);
    }
  }
}

template <bool kLayerNorm>
void launch_norm(KernelStream& s, const char* op, const Mat& x, const void* weight,
                 const void* bias, float eps, const Mat& y, float weight_offset = 0.0f) {
  if (x.rows == 0 || x.cols == 0) return;
  dispatch_activation(x.dtype, op, [&](auto e) {
    using E = decltype(e);
    using T = typename E::T;
    const int blocks = grid_blocks(s, x.rows * kThreads, kThreads);
    norm_kernel<E, kLayerNorm><<<blocks, kThreads, 0, s.stream()>>>(
        static_cast<const T*>(x.data), x.ld, static_cast<T*>(y.data), y.ld,
        static_cast<const T*>(weight), static_cast<const T*>(bias), x.rows, x.cols, eps, weight_offset);
    ZO2_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

void layernorm(KernelStream& s, const Mat& x, const void* weight, const void* bias, float eps,
               const Mat& y) {
  launch_norm<true>(s, "layernorm", x, weight, bias, eps, y);
}

void rmsnorm(KernelStream& s, const Mat& x, const void* weight, float eps, const Mat& y,
             float weight_offset) {
  launch_norm<false>(s, "rmsnorm", x, weight, nullptr, eps, y, weight_offset);
}

}  // namespace zo2::cuda
