// The fused kernels of the ZO step — perturbation pairs, the projected gradient and the
// deferred update — twins of runtime/cpu/noise.cpp, equal to it bit for bit.
//
// Design: z is never stored. A thread owns one group of four consecutive tensor elements
// at a time (grid-stride), because one Philox call yields the four normals of a group
// (Note [Noise stream layout] in runtime/philox.h); on the GPU the Philox rounds are
// cuRAND's curand_Philox4x32_10 and Box–Muller uses the shared polynomials of
// Note [Deterministic normals], so z equals the CPU's bit for bit. All element arithmetic
// (load_element, perturbed, updated, the roundings) is runtime/element.h and
// runtime/dtype_convert.h, the CPU's own functions. Whole groups that are suitably aligned
// move as one vector (16 bytes of fp32, 8 of bf16/fp16, 4 of fp8); partial groups at the
// ends of a row range fall back to element accesses. The work per element is ~50 integer
// and fp32 operations, so the kernels stay close to memory bandwidth on H100/H200.
//
// Tiles (StoredTensor::first_row): the kernels index the tile's own elements, and since a
// tile starts on a group boundary (checked by CudaOps), its local group q is group
// first_group + q of the whole tensor, lane for lane; every draw uses that global group.
//
// fp8 update: the new row scale (absmax/448 of the updated row) is needed before any
// element can be rounded, so one block owns a row and makes two passes over it. The first
// computes the updated values and their max; the second rounds them into the new scale.
// Between the passes the values wait in the block's shared memory (one fp32 per element of
// the row; each thread reads back only what it wrote), so z is generated once per element
// as for the other dtypes; a row too wide for the device's shared memory (more than ~56k
// columns on H100/H200) regenerates z in the second pass instead, as does
// ZO2_CUDA_FP8_UPDATE=regenerate. Either way the values are the same floats, and the max is
// exact and order-independent, so the bytes and the scale equal the CPU's.
#include "runtime/cuda/kernel_util.cuh"
#include "runtime/cuda/kernels.h"
#include "runtime/element.h"

#include <string>
#include <type_traits>

namespace zo2::cuda {
namespace {

constexpr int kThreads = 256;

// Storage element types and their vector of four.
template <DType S>
struct Storage;
template <>
struct Storage<DType::f32> {
  using T = float;
  using Vec4 = float4;
};
template <>
struct Storage<DType::bf16> {
  using T = std::uint16_t;
  using Vec4 = ushort4;
};
template <>
struct Storage<DType::f16> {
  using T = std::uint16_t;
  using Vec4 = ushort4;
};
template <>
struct Storage<DType::f8_e4m3> {
  using T = std::uint8_t;
  using Vec4 = uchar4;
};

template <class V, class T>
__device__ __forceinline__ void unpack4(const V& v, T (&out)[4]) {
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
template <class V, class T>
__device__ __forceinline__ V pack4(const T (&in)[4]) {
  V v;
  v.x = in[0];
  v.y = in[1];
  v.z = in[2];
  v.w = in[3];
  return v;
}

// The value of stored element `raw` of dtype S (fp8: times the row's scale).
template <DType S>
__device__ __forceinline__ float to_f32(typename Storage<S>::T raw, float scale) {
  if constexpr (S == DType::f32) return raw;
  else if constexpr (S == DType::bf16) return bf16_to_f32(raw);
  else if constexpr (S == DType::f16) return f16_to_f32(raw);
  else return detail::fmul(e4m3_to_f32(raw), scale);
}

// Output (compute dtype) element types with a vector of four.
template <class E>
struct Out4;
template <>
struct Out4<F32> {
  using Vec4 = float4;
};
template <>
struct Out4<BF16> {
  using Vec4 = ushort4;
};
template <>
struct Out4<F16> {
  using Vec4 = ushort4;
};

struct PerturbArgs {
  const void* w;
  const float* row_scales;
  std::int64_t cols;
  std::uint64_t key;
  std::uint64_t first_group;  // the tile's group 0 in the whole tensor (first_element / 4)
  std::int64_t e0;  // first tile element of the range
  std::int64_t n;   // elements in the range
  bool noise;
  std::uint64_t seed;
  float eps;
  float eps_minus;  // the second output's signed eps (NoiseArgs::eps_minus)
  void* plus;
  void* minus;
  bool vectorized;  // whole groups may use vector loads/stores
};

template <DType S, class O>
__global__ void __launch_bounds__(kThreads) perturb_kernel(PerturbArgs a) {
  using ST = typename Storage<S>::T;
  using OT = typename O::T;
  const ST* w = static_cast<const ST*>(a.w);
  OT* plus = static_cast<OT*>(a.plus);
  OT* minus = static_cast<OT*>(a.minus);
  const std::int64_t end = a.e0 + a.n;
  const std::int64_t g0 = a.e0 / 4, groups = (end - 1) / 4 - g0 + 1;
  for (std::int64_t gi = std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x; gi < groups;
       gi += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t q = g0 + gi, e = q * 4;
    Normal4 z{};
    if (a.noise) z = noise_normal4(a.seed, a.key, a.first_group + static_cast<std::uint64_t>(q));
    float scale[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    if constexpr (S == DType::f8_e4m3) {
      std::int64_t row = (e < a.e0 ? a.e0 : e) / a.cols;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        while (e + j >= (row + 1) * a.cols) ++row;
        scale[j] = a.row_scales[row];
        if (e + j + 1 >= end) break;
      }
    }
    if (a.vectorized && e >= a.e0 && e + 4 <= end) {
      ST raw[4];
      unpack4(*reinterpret_cast<const typename Storage<S>::Vec4*>(w + e), raw);
      OT p[4], m[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float x = to_f32<S>(raw[j], scale[j]);
        if (!a.noise) {
          p[j] = O::store(x);
        } else {
          p[j] = O::store(perturbed(x, z.v[j], a.eps));
          m[j] = O::store(perturbed(x, z.v[j], a.eps_minus));
        }
      }
      using OV = typename Out4<O>::Vec4;
      if (plus != nullptr) *reinterpret_cast<OV*>(plus + (e - a.e0)) = pack4<OV>(p);
      if (a.noise && minus != nullptr) *reinterpret_cast<OV*>(minus + (e - a.e0)) = pack4<OV>(m);
      continue;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const std::int64_t ej = e + j;
      if (ej < a.e0 || ej >= end) continue;
      const float x = to_f32<S>(w[ej], scale[j]);
      if (!a.noise) {
        if (plus != nullptr) plus[ej - a.e0] = O::store(x);
        continue;
      }
      if (plus != nullptr) plus[ej - a.e0] = O::store(perturbed(x, z.v[j], a.eps));
      if (minus != nullptr) minus[ej - a.e0] = O::store(perturbed(x, z.v[j], a.eps_minus));
    }
  }
}

struct UpdateKernelArgs {
  void* w;
  float* row_scales;  // fp8 only
  std::int64_t rows;
  std::int64_t cols;
  std::uint64_t key;
  std::uint64_t first_group;  // the tile's group 0 in the whole tensor (first_element / 4)
  std::uint64_t seed;
  float lr;
  float weight_decay;
  const float* g;
  std::uint64_t rounding_seed;
  bool sign;  // UpdateArgs::sign
  bool vectorized;
};

// The stored pattern of an updated value: fp32 as is, narrower types stochastically rounded.
template <DType S>
__device__ __forceinline__ typename Storage<S>::T round_sr(float v, std::uint32_t bits) {
  if constexpr (S == DType::f32) return v;
  else if constexpr (S == DType::bf16) return f32_to_bf16_sr(v, bits);
  else if constexpr (S == DType::f16) return f32_to_f16_sr(v, bits);
  else return f32_to_e4m3_sr(v, bits);
}

template <DType S>
__global__ void __launch_bounds__(kThreads) update_kernel(UpdateKernelArgs a) {
  using ST = typename Storage<S>::T;
  if (!finite(*a.g)) return;  // W unchanged; the host reports it when it reads g
  const float g = update_coefficient(*a.g, a.sign);
  ST* w = static_cast<ST*>(a.w);
  const std::int64_t n = a.rows * a.cols, groups = ceil_div(n, 4);
  for (std::int64_t q = std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x; q < groups;
       q += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t e = q * 4;
    const std::uint64_t gq = a.first_group + static_cast<std::uint64_t>(q);
    const Normal4 z = noise_normal4(a.seed, a.key, gq);
    Philox4 r{};
    if constexpr (S != DType::f32) r = noise_bits(a.rounding_seed, a.key, gq, NoiseDomain::rounding);
    const std::uint32_t bits[4] = {r.x, r.y, r.z, r.w};
    if (a.vectorized && e + 4 <= n) {
      using SV = typename Storage<S>::Vec4;
      ST raw[4];
      unpack4(*reinterpret_cast<const SV*>(w + e), raw);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        raw[j] = round_sr<S>(updated(to_f32<S>(raw[j], 1.0f), z.v[j], g, a.lr, a.weight_decay),
                             bits[j]);
      *reinterpret_cast<SV*>(w + e) = pack4<SV>(raw);
      continue;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (e + j < n)
        w[e + j] = round_sr<S>(updated(to_f32<S>(w[e + j], 1.0f), z.v[j], g, a.lr, a.weight_decay),
                               bits[j]);
  }
}

// One block per row; see the fp8 note at the top. keep: the row's updated values fit in the
// dynamic shared memory (a.cols floats) and wait there between the passes. 512 threads per
// block, so that the one or two blocks an SM holds when a wide row's values take ~100–200
// KiB still keep 16–32 warps busy.
constexpr int kFp8Threads = 512;
// A kept value's slot: element j of the row's local group l at kept[j·stride + l], stride =
// cols/4 + 2 (a row touches at most that many groups): the lanes of a warp, which take
// consecutive groups, then hit consecutive words — no bank conflicts.
__host__ __device__ constexpr std::int64_t kept_stride(std::int64_t cols) { return cols / 4 + 2; }

__global__ void __launch_bounds__(kFp8Threads) update_fp8_kernel(UpdateKernelArgs a, bool keep) {
  extern __shared__ float kept[];  // 4·kept_stride(a.cols) floats when keep
  __shared__ float smem[32];
  if (!finite(*a.g)) return;  // W unchanged; the host reports it when it reads g
  const float g = update_coefficient(*a.g, a.sign);
  std::uint8_t* w = static_cast<std::uint8_t*>(a.w);
  const std::int64_t stride = kept_stride(a.cols);
  for (std::int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const float scale = a.row_scales[row];
    const std::int64_t base = row * a.cols, end = base + a.cols;
    // Pass 1: the updated row's absolute maximum (and, with keep, the values).
    float absmax = 0.0f;
    for (std::int64_t q = base / 4 + threadIdx.x; q * 4 < end; q += blockDim.x) {
      const Normal4 z = noise_normal4(a.seed, a.key, a.first_group + static_cast<std::uint64_t>(q));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const std::int64_t e = q * 4 + j;
        if (e < base || e >= end) continue;
        const float v = updated(to_f32<DType::f8_e4m3>(w[e], scale), z.v[j], g, a.lr, a.weight_decay);
        if (keep) kept[j * stride + (q - base / 4)] = v;
        absmax = fmaxf(absmax, fabsf(v));
      }
    }
    // Every thread read the old scale and its elements before this barrier.
    absmax = block_max(absmax, smem);
    const float new_scale = fp8_row_scale(absmax);
    // Pass 2: the same values (kept, or recomputed from the same z with the same
    // arithmetic), rounded into the new scale. Each thread rewrites exactly the elements it
    // read in pass 1, and reads back only the values it kept itself.
    for (std::int64_t q = base / 4 + threadIdx.x; q * 4 < end; q += blockDim.x) {
      const std::uint64_t gq = a.first_group + static_cast<std::uint64_t>(q);
      Normal4 z{};
      if (!keep) z = noise_normal4(a.seed, a.key, gq);
      const Philox4 r = noise_bits(a.rounding_seed, a.key, gq, NoiseDomain::rounding);
      const std::uint32_t bits[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const std::int64_t e = q * 4 + j;
        if (e < base || e >= end) continue;
        const float v = keep ? kept[j * stride + (q - base / 4)]
                             : updated(to_f32<DType::f8_e4m3>(w[e], scale), z.v[j], g, a.lr, a.weight_decay);
        w[e] = f32_to_e4m3_sr(detail::fdiv(v, new_scale), bits[j]);
      }
    }
    if (threadIdx.x == 0) a.row_scales[row] = new_scale;
    // The next row's slots map to other threads where cols % 4 != 0: let every thread finish
    // reading this row's values first.
    if (keep) __syncthreads();
  }
}

__global__ void spsa_grad_kernel(const float* loss_plus, const float* loss_minus, float eps,
                                 float* g) {
  g[0] = detail::fdiv(detail::fadd(loss_plus[0], -loss_minus[0]), detail::fmul(2.0f, eps));
}

bool aligned_to(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

template <class Fn>
void dispatch_storage(DType dt, const char* op, Fn&& f) {
  switch (dt) {
    case DType::f32: f(std::integral_constant<DType, DType::f32>{}); return;
    case DType::bf16: f(std::integral_constant<DType, DType::bf16>{}); return;
    case DType::f16: f(std::integral_constant<DType, DType::f16>{}); return;
    case DType::f8_e4m3: f(std::integral_constant<DType, DType::f8_e4m3>{}); return;
    default:
      throw_unsupported(std::string("cuda ") + op + ": weights must be stored as fp32, bf16, fp16 or fp8, not " +
                        std::string(dtype_name(dt)));
  }
}

// ZO2_CUDA_FP8_UPDATE: "kept" (default; the values wait in shared memory) or "regenerate"
// (z generated again in the second pass, as before) — for a same-run comparison, and a way
// around the kept path should it ever misbehave. Read at every call.
bool fp8_update_keeps_values() { return env_choice("ZO2_CUDA_FP8_UPDATE", {"kept", "regenerate"}) == 0; }

}  // namespace

void perturb(KernelStream& s, const StoredTensor& w, std::int64_t row_begin,
             std::int64_t row_end, const NoiseArgs* noise, void* out_plus, void* out_minus,
             DType out_dtype) {
  const std::int64_t e0 = row_begin * w.cols, n = (row_end - row_begin) * w.cols;
  if (n == 0) return;
  PerturbArgs a{w.data,
                w.row_scales,
                w.cols,
                w.key,
                static_cast<std::uint64_t>(w.first_element() / 4),
                e0,
                n,
                noise != nullptr,
                noise != nullptr ? noise->seed : 0,
                noise != nullptr ? noise->eps : 0.0f,
                noise != nullptr ? noise->eps_minus() : 0.0f,
                out_plus,
                noise != nullptr ? out_minus : nullptr,
                false};
  const std::int64_t groups = (e0 + n - 1) / 4 - e0 / 4 + 1;
  const int blocks = grid_blocks(s, groups, kThreads);
  dispatch_storage(w.dtype, "perturb", [&](auto sdt) {
    constexpr DType S = decltype(sdt)::value;
    dispatch_activation(out_dtype, "perturb", [&](auto o) {
      using O = decltype(o);
      const std::size_t out_vec = 4 * sizeof(typename O::T);
      a.vectorized = e0 % 4 == 0 && aligned_to(w.data, 4 * sizeof(typename Storage<S>::T)) &&
                     aligned_to(out_plus, out_vec) && aligned_to(a.minus, out_vec);
      perturb_kernel<S, O><<<blocks, kThreads, 0, s.stream()>>>(a);
      ZO2_CUDA_CHECK_LAUNCH();
    });
  });
}

void spsa_grad(KernelStream& s, const float* loss_plus, const float* loss_minus, float eps,
               float* g) {
  spsa_grad_kernel<<<1, 1, 0, s.stream()>>>(loss_plus, loss_minus, eps, g);
  ZO2_CUDA_CHECK_LAUNCH();
}

void update(KernelStream& s, const StoredTensor& w, const UpdateArgs& args) {
  if (w.numel() == 0) return;
  UpdateKernelArgs a{w.data,
                     w.row_scales,
                     w.rows,
                     w.cols,
                     w.key,
                     static_cast<std::uint64_t>(w.first_element() / 4),
                     args.seed,
                     args.lr,
                     args.weight_decay,
                     args.g,
                     args.rounding_seed,
                     args.sign,
                     false};
  if (w.dtype == DType::f8_e4m3) {
    // The row's values in shared memory where they fit the device's opt-in limit. The limit
    // a launch may use is a setting of the current device: raised to the whole opt-in (less
    // a 1 KiB margin for the 128 bytes of static shared memory) before every launch that
    // keeps values, never lowered — without it a launch may use only 48 KiB less the static
    // part, which rows of ~12.3k columns (OPT-175B) already exceed.
    int device = 0, optin = 0;
    ZO2_CUDA_CHECK(cudaGetDevice(&device));
    ZO2_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const std::size_t limit = optin > 1024 ? static_cast<std::size_t>(optin) - 1024 : 0;
    const std::size_t kept_bytes = 4 * static_cast<std::size_t>(kept_stride(w.cols)) * sizeof(float);
    const bool keep = kept_bytes <= limit && fp8_update_keeps_values();
    const std::size_t dynamic = keep ? kept_bytes : 0;
    if (keep)
      ZO2_CUDA_CHECK(cudaFuncSetAttribute(update_fp8_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(limit)));
    update_fp8_kernel<<<grid_blocks(s, w.rows * kFp8Threads, kFp8Threads), kFp8Threads, dynamic, s.stream()>>>(
        a, keep);
    ZO2_CUDA_CHECK_LAUNCH();
    return;
  }
  dispatch_storage(w.dtype, "update", [&](auto sdt) {
    constexpr DType S = decltype(sdt)::value;
    if constexpr (S != DType::f8_e4m3) {
      a.vectorized = aligned_to(w.data, 4 * sizeof(typename Storage<S>::T));
      update_kernel<S><<<grid_blocks(s, ceil_div(w.numel(), 4), kThreads), kThreads, 0,
                         s.stream()>>>(a);
      ZO2_CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace zo2::cuda
