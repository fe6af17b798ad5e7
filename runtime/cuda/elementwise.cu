// Element-wise activation kernels: add_bias, add (residual), relu, silu_mul, gelu_tanh_mul,
// scale, softcap — twins of the
// loops in runtime/cpu/kernels.cpp.
//
// Design: a 2-D grid-stride loop. gridDim.y walks rows (capped at 65535, looping beyond),
// blockDim.x × gridDim.x threads walk a row's 16-byte chunks (Note [Chunked rows] in
// kernel_util.cuh), so a row of any length, any leading dimension and any alignment works,
// and aligned rows move whole 16-byte vectors. Math is fp32 in registers, written with
// explicit round-to-nearest operations where the CPU's result is to be matched exactly
// (add, add_bias: one rounding per add, as on the CPU).
//
// Outputs may alias inputs element for element (silu_mul(gate, up, gate) is how the LLaMA
// MLP calls it), so no pointer here is __restrict__.
#include "runtime/cuda/kernel_util.cuh"
#include "runtime/cuda/kernels.h"

#include <algorithm>

namespace zo2::cuda {
namespace {

constexpr int kThreads = 256;

struct RowGrid {
  dim3 grid;
  dim3 block;
};

RowGrid row_grid(const KernelStream& s, std::int64_t rows, std::int64_t cols, int vec) {
  const std::int64_t chunks = ceil_div(cols, vec);
  const std::int64_t gx = std::min<std::int64_t>(ceil_div(chunks, kThreads), 1024);
  const std::int64_t want = std::max<std::int64_t>(1, std::int64_t{s.sm_count()} * 8 / gx);
  const std::int64_t gy = std::min<std::int64_t>({rows, want, 65535});
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(kThreads)};
}

template <class E>
__global__ void __launch_bounds__(kThreads)
    add_bias_kernel(typename E::T* y, std::int64_t ldy, const typename E::T* bias,
                    std::int64_t rows, std::int64_t cols) {
  constexpr int V = kVec<E>;
  const bool ab = aligned16(bias);
  for (std::int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    typename E::T* yr = y + r * ldy;
    const bool ay = aligned16(yr);
    for (std::int64_t c0 = (std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * V; c0 < cols;
         c0 += std::int64_t{gridDim.x} * blockDim.x * V) {
      float a[V], b[V];
      load_chunk<E>(yr, c0, cols, ay, a);
      load_chunk<E>(bias, c0, cols, ab, b);
#pragma unroll
      for (int i = 0; i < V; ++i) a[i] = __fadd_rn(a[i], b[i]);
      store_chunk<E>(yr, c0, cols, ay, a);
    }
  }
}

template <class E>
__global__ void __launch_bounds__(kThreads)
    add_kernel(typename E::T* y, std::int64_t ldy, const typename E::T* x, std::int64_t ldx,
               std::int64_t rows, std::int64_t cols) {
  constexpr int V = kVec<E>;
  for (std::int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    typename E::T* yr = y + r * ldy;
    const typename E::T* xr = x + r * ldx;
    const bool ay = aligned16(yr), ax = aligned16(xr);
    for (std::int64_t c0 = (std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * V; c0 < cols;
         c0 += std::int64_t{gridDim.x} * blockDim.x * V) {
      float a[V], b[V];
      load_chunk<E>(yr, c0, cols, ay, a);
      load_chunk<E>(xr, c0, cols, ax, b);
#pragma unroll
      for (int i = 0; i < V; ++i) a[i] = __fadd_rn(a[i], b[i]);
      store_chunk<E>(yr, c0, cols, ay, a);
    }
  }
}

template <class E>
__global__ void __launch_bounds__(kThreads)
    relu_kernel(typename E::T* x, std::int64_t ldx, std::int64_t rows, std::int64_t cols) {
  constexpr int V = kVec<E>;
  for (std::int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    typename E::T* xr = x + r * ldx;
    const bool ax = aligned16(xr);
    for (std::int64_t c0 = (std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * V; c0 < cols;
         c0 += std::int64_t{gridDim.x} * blockDim.x * V) {
      float a[V];
      load_chunk<E>(xr, c0, cols, ax, a);
#pragma unroll
      for (int i = 0; i < V; ++i) a[i] = a[i] < 0.0f ? 0.0f : a[i];  // std::max(x, 0) on the CPU
      store_chunk<E>(xr, c0, cols, ax, a);
    }
  }
}

// The gated MLP's act(gate)·up, the activation as on the CPU (runtime/cpu/kernels.cpp).
struct Silu {  // g / (1 + exp(−g))
  __device__ static float apply(float g) { return __fdiv_rn(g, __fadd_rn(1.0f, expf(-g))); }
};
struct GeluTanh {  // (0.5·x)·(1 + tanh(k·(x + c·x³)))
  __device__ static float apply(float x) {
    const float cube = __fmul_rn(__fmul_rn(x, x), x);
    const float inner = __fmul_rn(kGeluTanhK, __fadd_rn(x, __fmul_rn(kGeluTanhC, cube)));
    return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, tanhf(inner)));
  }
};

template <class E, class Act>
__global__ void __launch_bounds__(kThreads)
    gated_mul_kernel(const typename E::T* gate, std::int64_t ldg, const typename E::T* up, std::int64_t ldu,
                     typename E::T* out, std::int64_t ldo, std::int64_t rows, std::int64_t cols) {
  constexpr int V = kVec<E>;
  for (std::int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const typename E::T* gr = gate + r * ldg;
    const typename E::T* ur = up + r * ldu;
    typename E::T* orow = out + r * ldo;
    const bool ag = aligned16(gr), au = aligned16(ur), ao = aligned16(orow);
    for (std::int64_t c0 = (std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * V; c0 < cols;
         c0 += std::int64_t{gridDim.x} * blockDim.x * V) {
      float g[V], u[V];
      load_chunk<E>(gr, c0, cols, ag, g);
      load_chunk<E>(ur, c0, cols, au, u);
#pragma unroll
      for (int i = 0; i < V; ++i) g[i] = __fmul_rn(Act::apply(g[i]), u[i]);
      store_chunk<E>(orow, c0, cols, ao, g);
    }
  }
}

// In place, element for element: x = Op(x), Op holding its one parameter (Scale: x·alpha;
// Softcap: cap·tanh(x / cap), rounded as the CPU twin).
struct Scale {
  float alpha;
  __device__ float operator()(float x) const { return __fmul_rn(x, alpha); }
};
struct Softcap {
  float cap;
  __device__ float operator()(float x) const { return softcap_of(x, cap); }
};

template <class E, class Op>
__global__ void __launch_bounds__(kThreads)
    map_kernel(typename E::T* x, std::int64_t ldx, Op op, std::int64_t rows, std::int64_t cols) {
  constexpr int V = kVec<E>;
  for (std::int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    typename E::T* xr = x + r * ldx;
    const bool ax = aligned16(xr);
    for (std::int64_t c0 = (std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * V; c0 < cols;
         c0 += std::int64_t{gridDim.x} * blockDim.x * V) {
      float a[V];
      load_chunk<E>(xr, c0, cols, ax, a);
#pragma unroll
      for (int i = 0; i < V; ++i) a[i] = op(a[i]);
      store_chunk<E>(xr, c0, cols, ax, a);
    }
  }
}

template <class Op>
void map_in_place(KernelStream& s, const Mat& x, Op op, const char* name) {
  if (x.rows == 0 || x.cols == 0) return;
  dispatch_activation(x.dtype, name, [&](auto e) {
    using E = decltype(e);
    using T = typename E::T;
    const RowGrid g = row_grid(s, x.rows, x.cols, kVec<E>);
    map_kernel<E, Op><<<g.grid, g.block, 0, s.stream()>>>(static_cast<T*>(x.data), x.ld, op, x.rows, x.cols);
    ZO2_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

void add_bias(KernelStream& s, const Mat& y, const void* bias) {
  if (y.rows == 0 || y.cols == 0) return;
  dispatch_activation(y.dtype, "add_bias", [&](auto e) {
    using E = decltype(e);
    using T = typename E::T;
    const RowGrid g = row_grid(s, y.rows, y.cols, kVec<E>);
    add_bias_kernel<E><<<g.grid, g.block, 0, s.stream()>>>(static_cast<T*>(y.data), y.ld,
                                                          static_cast<const T*>(bias), y.rows,
                                                          y.cols);
    ZO2_CUDA_CHECK_LAUNCH();
  });
}

void add(KernelStream& s, const Mat& y, const Mat& x) {
  if (y.rows == 0 || y.cols == 0) return;
  dispatch_activation(y.dtype, "add", [&](auto e) {
    using E = decltype(e);
    using T = typename E::T;
    const RowGrid g = row_grid(s, y.rows, y.cols, kVec<E>);
    add_kernel<E><<<g.grid, g.block, 0, s.stream()>>>(static_cast<T*>(y.data), y.ld,
                                                     static_cast<const T*>(x.data), x.ld, y.rows,
                                                     y.cols);
    ZO2_CUDA_CHECK_LAUNCH();
  });
}

void relu(KernelStream& s, const Mat& x) {
  if (x.rows == 0 || x.cols == 0) return;
  dispatch_activation(x.dtype, "relu", [&](auto e) {
    using E = decltype(e);
    using T = typename E::T;
    const RowGrid g = row_grid(s, x.rows, x.cols, kVec<E>);
    relu_kernel<E><<<g.grid, g.block, 0, s.stream()>>>(static_cast<T*>(x.data), x.ld, x.rows,
                                                      x.cols);
    ZO2_CUDA_CHECK_LAUNCH();
  });
}

namespace {
template <class Act>
void gated_mul(KernelStream& s, const Mat& gate, const Mat& up, const Mat& out, const char* name) {
  if (out.rows == 0 || out.cols == 0) return;
  dispatch_activation(out.dtype, name, [&](auto e) {
    using E = decltype(e);
    using T = typename E::T;
    const RowGrid g = row_grid(s, out.rows, out.cols, kVec<E>);
    gated_mul_kernel<E, Act><<<g.grid, g.block, 0, s.stream()>>>(
        static_cast<const T*>(gate.data), gate.ld, static_cast<const T*>(up.data), up.ld,
        static_cast<T*>(out.data), out.ld, out.rows, out.cols);
    ZO2_CUDA_CHECK_LAUNCH();
  });
}
}  // namespace

void silu_mul(KernelStream& s, const Mat& gate, const Mat& up, const Mat& out) {
  gated_mul<Silu>(s, gate, up, out, "silu_mul");
}

void gelu_tanh_mul(KernelStream& s, const Mat& gate, const Mat& up, const Mat& out) {
  gated_mul<GeluTanh>(s, gate, up, out, "gelu_tanh_mul");
}

void scale(KernelStream& s, const Mat& x, float alpha) { map_in_place(s, x, Scale{alpha}, "scale"); }

void softcap(KernelStream& s, const Mat& x, float cap) { map_in_place(s, x, Softcap{cap}, "softcap"); }

}  // namespace zo2::cuda
