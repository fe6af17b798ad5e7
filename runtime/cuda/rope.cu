// Rotary position embedding (HF LLaMA's rotate-half convention), in place — the twin of
// rope in runtime/cpu/kernels.cpp.
//
// Design: one block per token row (grid-stride over rows). The block first computes the
// row's cos/sin table into shared memory — angle = position·inv_freq[i] in fp32, as
// transformers computes it, then cos and sin in double rounded to fp32, exactly as the CPU
// does — then rotates every head of the row with it, so each (token, frequency) pair costs
// one double-precision sincos, shared by all heads. The rotation uses explicit
// round-to-nearest products (no FMA contraction), the CPU's arithmetic.
#include "runtime/cuda/kernel_util.cuh"
#include "runtime/cuda/kernels.h"

namespace zo2::cuda {
namespace {

constexpr int kThreads = 128;

template <class E>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(typename E::T* x, std::int64_t ldx, std::int64_t rows, int heads, int head_dim,
                const std::int32_t* positions, const float* inv_freq) {
  extern __shared__ float table[];  // cos[half], then sin[half]
  const int half = head_dim / 2;
  float* cs = table;
  float* sn = table + half;
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    __syncthreads();  // the previous row's rotation has finished reading the table
    const float pos = static_cast<float>(positions[r]);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      const float angle = __fmul_rn(pos, inv_freq[i]);
      double s, c;
      sincos(static_cast<double>(angle), &s, &c);
      cs[i] = static_cast<float>(c);
      sn[i] = static_cast<float>(s);
    }
    __syncthreads();
    typename E::T* row = x + r * ldx;
    const int pairs = heads * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
      const int h = p / half, i = p - h * half;
      typename E::T* v = row + static_cast<std::int64_t>(h) * head_dim;
      const float a = E::load(v[i]), b = E::load(v[i + half]);
      const float c = cs[i], s = sn[i];
      v[i] = E::store(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
      v[i + half] = E::store(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
    }
  }
}

}  // namespace

void rope(KernelStream& s, const Mat& x, int head_dim, const std::int32_t* positions,
          const float* inv_freq) {
  const int half = head_dim / 2;
  const int heads = static_cast<int>(x.cols / head_dim);
  if (x.rows == 0 || half == 0 || heads == 0) return;
  const std::size_t smem = 2 * static_cast<std::size_t>(half) * sizeof(float);
  if (smem > 48 * 1024)
    throw_unsupported("cuda rope: head_dim " + std::to_string(head_dim) + " is too large");
  dispatch_activation(x.dtype, "rope", [&](auto e) {
    using E = decltype(e);
    using T = typename E::T;
    const int blocks = grid_blocks(s, x.rows * kThreads, kThreads);
    rope_kernel<E><<<blocks, kThreads, smem, s.stream()>>>(static_cast<T*>(x.data), x.ld, x.rows,
                                                           heads, head_dim, positions, inv_freq);
    ZO2_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace zo2::cuda
