// Device-side helpers shared by the kernels of the CUDA backend.
//
// Note [Activation dtypes]
//   Activations are fp32, bf16 or fp16. A kernel is a template over an element type E (F32,
//   BF16, F16) that loads into fp32 registers and stores back rounding to nearest even with
//   the conversions of runtime/dtype_convert.h — the same functions the CPU uses, so a
//   stored value never depends on which side rounded it.
//
// Note [Chunked rows]
//   Row kernels walk a row in chunks of kVec<E> elements (16 bytes): thread t of a block
//   of B threads takes chunks t, t + B, t + 2B, ... A chunk is one vector load when the row
//   is 16-byte aligned and the chunk is whole, element loads otherwise. The partition of a
//   row among threads — and therefore every reduction order — depends only on the row
//   length and B, never on alignment or timing, so results are deterministic.
//
// Note [Deterministic block reductions]
//   A block reduction adds each thread's partial in a fixed tree: a butterfly inside each
//   warp (__shfl_xor_sync; partner sums commute, so every lane gets the same bits), then
//   the warps' partials in the same butterfly. No atomics, no dependence on scheduling.
#pragma once
#include "runtime/common.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/dtype_convert.h"
#include "runtime/ops.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace zo2::cuda {

struct F32 {
  using T = float;
  static constexpr DType kType = DType::f32;
  __device__ __forceinline__ static float load(T v) { return v; }
  __device__ __forceinline__ static T store(float v) { return v; }
};
struct BF16 {
  using T = std::uint16_t;
  static constexpr DType kType = DType::bf16;
  __device__ __forceinline__ static float load(T v) { return bf16_to_f32(v); }
  __device__ __forceinline__ static T store(float v) { return f32_to_bf16(v); }
};
struct F16 {
  using T = std::uint16_t;
  static constexpr DType kType = DType::f16;
  __device__ __forceinline__ static float load(T v) { return f16_to_f32(v); }
  __device__ __forceinline__ static T store(float v) { return f32_to_f16(v); }
};

// Calls f(F32{}), f(BF16{}) or f(F16{}) for an activation dtype; throws for any other.
template <class Fn>
void dispatch_activation(DType dt, const char* op, Fn&& f) {
  switch (dt) {
    case DType::f32: f(F32{}); return;
    case DType::bf16: f(BF16{}); return;
    case DType::f16: f(F16{}); return;
    default:
      throw_unsupported(std::string("cuda ") + op + ": activations must be fp32, bf16 or fp16, not " +
                        std::string(dtype_name(dt)));
  }
}

// Elements per 16-byte vector.
template <class E>
inline constexpr int kVec = static_cast<int>(16 / sizeof(typename E::T));

template <class E>
struct alignas(16) Pack {
  typename E::T v[kVec<E>];
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

// Loads elements [c0, c0 + kVec) of `row` (c0 a multiple of kVec) as fp32; elements at or
// beyond `cols` read as 0. See Note [Chunked rows].
template <class E>
__device__ __forceinline__ void load_chunk(const typename E::T* row, std::int64_t c0,
                                           std::int64_t cols, bool aligned,
                                           float (&out)[kVec<E>]) {
  constexpr int V = kVec<E>;
  if (aligned && c0 + V <= cols) {
    const Pack<E> p = *reinterpret_cast<const Pack<E>*>(row + c0);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = E::load(p.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = c0 + i < cols ? E::load(row[c0 + i]) : 0.0f;
  }
}

// Stores elements [c0, min(c0 + kVec, cols)) of `row`.
template <class E>
__device__ __forceinline__ void store_chunk(typename E::T* row, std::int64_t c0,
                                            std::int64_t cols, bool aligned,
                                            const float (&in)[kVec<E>]) {
  constexpr int V = kVec<E>;
  if (aligned && c0 + V <= cols) {
    Pack<E> p;
#pragma unroll
    for (int i = 0; i < V; ++i) p.v[i] = E::store(in[i]);
    *reinterpret_cast<Pack<E>*>(row + c0) = p;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (c0 + i < cols) row[c0 + i] = E::store(in[i]);
  }
}

// ---- deterministic reductions (Note [Deterministic block reductions]) ----

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// max that propagates NaN, as torch.max and softmax do (fmaxf(a, NaN) returns a): the
// twin of max_nan in runtime/cpu/kernels.cpp. The softmax and cross-entropy maxima use it,
// so a NaN score or logit makes its row NaN instead of being skipped.
__device__ __forceinline__ float max_nan(float a, float b) { return a > b || a != a ? a : b; }

// Soft-capping (AttentionArgs::softcap, Ops::softcap): cap·tanh(x / cap), rounded as the CPU
// twin (softcap_of in runtime/cpu/cpu_kernels.h) writes it; cap ≤ 0 leaves x.
__device__ __forceinline__ float softcap_of(float x, float cap) {
  return cap > 0.0f ? __fmul_rn(tanhf(__fdiv_rn(x, cap)), cap) : x;
}

__device__ __forceinline__ float warp_max_nan(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The block's total, returned to every thread. `smem` holds 32 values of T; blockDim.x
// must be a multiple of 32. Safe to call repeatedly with the same smem (it synchronizes
// before writing).
template <class T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < warps ? smem[lane] : T(0);
  return warp_sum(v);
}

// The block's maximum (fmaxf: NaN loses to any number), returned to every thread.
__device__ __forceinline__ float block_max(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < warps ? smem[lane] : -__int_as_float(0x7f800000);
  return warp_max(v);
}

// block_max with max_nan: NaN if any thread's v is NaN.
__device__ __forceinline__ float block_max_nan(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max_nan(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < warps ? smem[lane] : -__int_as_float(0x7f800000);
  return warp_max_nan(v);
}

}  // namespace zo2::cuda
