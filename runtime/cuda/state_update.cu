// Ops::update_state on CUDA (StateUpdateArgs in runtime/ops.h): the deferred update of
// zo-sgd-momentum and zo-adam, in place on W, m and v — the twin of
// runtime/cpu/state_update.cpp, equal to it bit for bit.
//
// Design (as update_kernel / update_fp8_kernel in noise.cu): z is never stored. A thread
// owns one group of four consecutive elements at a time (grid-stride); for each of the q
// directions it draws the group's four normals (noise_normal4, q generations per element)
// and accumulates the direction sums; then it applies the element math of
// Note [State update arithmetic] (runtime/element.h, the CPU's own functions) and stores
// W, m and v in their dtypes, narrow ones stochastically rounded with bits from
// (rounding_seed, W's key) in the domains rounding (W), state_m (m) and state_v (v). One
// pass over W, m and v; whole aligned groups move as one vector per tensor.
//
// The coefficients c_j = g[j]/q and the seeds sit in shared memory (each block loads them
// once); if any g[j] is not finite every block returns before touching memory.
//
// fp8 (W or the state): a row's new scale (absmax/448 of its new values) must be known
// before any of its elements can be rounded, so one block owns a row and makes two passes,
// as update_fp8_kernel does. In the first the new values of the fp8 tensors wait in shared
// memory (the wider tensors are written at once); the second rounds them into the new
// scales. A row whose kept values exceed the device's shared memory (or
// ZO2_CUDA_FP8_UPDATE=regenerate) recomputes everything in the second pass from the same
// old values instead — 2q generations per element then, the same bits either way.
//
// Tiles (StoredTensor::first_row; m and v are tiles of the same rows): the kernels index the
// tile's own elements, and since a tile starts on a group boundary (checked by CudaOps), its
// local group q is group first_group + q of the whole tensor, lane for lane; every draw
// (z and the three rounding streams) uses that global group.
#include "runtime/cuda/kernel_util.cuh"
#include "runtime/cuda/kernels.h"
#include "runtime/element.h"

#include <string>
#include <type_traits>

namespace zo2::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowThreads = 512;
constexpr int kMaxQ = StateUpdateArgs::kMaxDirections;
static_assert(kThreads >= kMaxQ && kRowThreads >= kMaxQ, "one thread per direction in the prologue");

template <DType D>
struct Elem;
template <>
struct Elem<DType::f32> {
  using T = float;
  using Vec4 = float4;
};
template <>
struct Elem<DType::bf16> {
  using T = std::uint16_t;
  using Vec4 = ushort4;
};
template <>
struct Elem<DType::f16> {
  using T = std::uint16_t;
  using Vec4 = ushort4;
};
template <>
struct Elem<DType::f8_e4m3> {
  using T = std::uint8_t;
  using Vec4 = uchar4;
};

template <DType D>
__device__ __forceinline__ float load_as_f32(typename Elem<D>::T raw, float scale) {
  if constexpr (D == DType::f32) return raw;
  else if constexpr (D == DType::bf16) return bf16_to_f32(raw);
  else if constexpr (D == DType::f16) return f16_to_f32(raw);
  else return detail::fmul(e4m3_to_f32(raw), scale);
}

// fp32 as is, narrower dtypes stochastically rounded (fp8: v already divided by the scale).
template <DType D>
__device__ __forceinline__ typename Elem<D>::T store_sr(float v, std::uint32_t bits) {
  if constexpr (D == DType::f32) return v;
  else if constexpr (D == DType::bf16) return f32_to_bf16_sr(v, bits);
  else if constexpr (D == DType::f16) return f32_to_f16_sr(v, bits);
  else return f32_to_e4m3_sr(v, bits);
}

template <DType D>
__device__ __forceinline__ void load4(const typename Elem<D>::T* p, float (&out)[4]) {
  const typename Elem<D>::Vec4 v = *reinterpret_cast<const typename Elem<D>::Vec4*>(p);
  out[0] = load_as_f32<D>(v.x, 1.0f);
  out[1] = load_as_f32<D>(v.y, 1.0f);
  out[2] = load_as_f32<D>(v.z, 1.0f);
  out[3] = load_as_f32<D>(v.w, 1.0f);
}

template <DType D>
__device__ __forceinline__ void store4(typename Elem<D>::T* p, const float (&in)[4], const Philox4& r) {
  typename Elem<D>::Vec4 v;
  v.x = store_sr<D>(in[0], r.x);
  v.y = store_sr<D>(in[1], r.y);
  v.z = store_sr<D>(in[2], r.z);
  v.w = store_sr<D>(in[3], r.w);
  *reinterpret_cast<typename Elem<D>::Vec4*>(p) = v;
}

__device__ __forceinline__ std::uint32_t word(const Philox4& r, int j) {
  return j == 0 ? r.x : j == 1 ? r.y : j == 2 ? r.z : r.w;
}

struct StateKernelArgs {
  void* w;
  void* m;
  void* v;  // Adam only
  float* w_scales;  // fp8 only
  float* m_scales;
  float* v_scales;
  std::int64_t rows;
  std::int64_t cols;
  std::uint64_t key;
  std::uint64_t first_group;  // the tile's group 0 in the whole tensor (first_element / 4)
  int directions;
  std::uint64_t seeds[kMaxQ];
  const float* g;
  StateCoefficients k;
  std::uint64_t rounding_seed;
  bool vectorized;  // W, m and v may move whole groups as vectors
};

// Loads c_j = g[j]/q and the seeds into shared memory; false (in every thread of the
// block) when some g[j] is not finite — then nothing may change.
__device__ __forceinline__ bool load_directions(const StateKernelArgs& a, float* c, std::uint64_t* seeds) {
  bool bad = false;
  if (static_cast<int>(threadIdx.x) < a.directions) {
    const float g = a.g[threadIdx.x];
    bad = !finite(g);
    c[threadIdx.x] = direction_coefficient(g, a.directions);
    seeds[threadIdx.x] = a.seeds[threadIdx.x];
  }
  return __syncthreads_or(bad ? 1 : 0) == 0;
}

// The direction sums of group q, in direction order (Note [State update arithmetic]).
__device__ __forceinline__ void group_sums(int directions, const float* c, const std::uint64_t* seeds,
                                           std::uint64_t key, std::uint64_t q, float (&s)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) s[i] = kDirectionSumStart;
  for (int j = 0; j < directions; ++j) {
    const Normal4 z = noise_normal4(seeds[j], key, q);
    const float cj = c[j];
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i] = accumulate_direction(s[i], cj, z.v[i]);
  }
}

// No fp8 anywhere: one group of four elements per thread, one pass.
template <DType W, DType S, bool Adam>
__global__ void __launch_bounds__(kThreads) state_update_kernel(StateKernelArgs a) {
  __shared__ float c[kMaxQ];
  __shared__ std::uint64_t seeds[kMaxQ];
  if (!load_directions(a, c, seeds)) return;  // the host reports it when it reads g
  using WT = typename Elem<W>::T;
  using ST = typename Elem<S>::T;
  WT* w = static_cast<WT*>(a.w);
  ST* m = static_cast<ST*>(a.m);
  ST* v = static_cast<ST*>(a.v);
  StateCoefficients k = a.k;
  k.adam = Adam;
  const std::int64_t n = a.rows * a.cols, groups = ceil_div(n, 4);
  for (std::int64_t q = std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x; q < groups;
       q += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t e = q * 4;
    const bool whole = a.vectorized && e + 4 <= n;
    float x[4] = {}, mi[4] = {}, vi[4] = {};
    if (whole) {
      load4<W>(w + e, x);
      load4<S>(m + e, mi);
      if constexpr (Adam) load4<S>(v + e, vi);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (e + j >= n) continue;
        x[j] = load_as_f32<W>(w[e + j], 1.0f);
        mi[j] = load_as_f32<S>(m[e + j], 1.0f);
        if constexpr (Adam) vi[j] = load_as_f32<S>(v[e + j], 1.0f);
      }
    }
    const std::uint64_t gq = a.first_group + static_cast<std::uint64_t>(q);
    float s[4];
    group_sums(a.directions, c, seeds, a.key, gq, s);
    float nw[4], nm[4], nv[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const StateValues r = state_updated(k, x[j], mi[j], vi[j], s[j]);
      nw[j] = r.w;
      nm[j] = r.m;
      nv[j] = r.v;
    }
    Philox4 rw{}, rm{}, rv{};
    if constexpr (W != DType::f32) rw = noise_bits(a.rounding_seed, a.key, gq, NoiseDomain::rounding);
    if constexpr (S != DType::f32) {
      rm = noise_bits(a.rounding_seed, a.key, gq, NoiseDomain::state_m);
      if constexpr (Adam) rv = noise_bits(a.rounding_seed, a.key, gq, NoiseDomain::state_v);
    }
    if (whole) {
      store4<W>(w + e, nw, rw);
      store4<S>(m + e, nm, rm);
      if constexpr (Adam) store4<S>(v + e, nv, rv);
      continue;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (e + j >= n) continue;
      w[e + j] = store_sr<W>(nw[j], word(rw, j));
      m[e + j] = store_sr<S>(nm[j], word(rm, j));
      if constexpr (Adam) v[e + j] = store_sr<S>(nv[j], word(rv, j));
    }
  }
}

// A kept value's slot: value t (0 .. kept−1) of element j of the row's local group l at
// kept[(t·4 + j)·stride + l], stride = cols/4 + 2 (a row touches at most that many groups):
// the lanes of a warp, which take consecutive groups, hit consecutive words.
__host__ __device__ constexpr std::int64_t kept_stride(std::int64_t cols) { return cols / 4 + 2; }

// How many of W, m, v are fp8 (their new values wait in shared memory).
__host__ __device__ constexpr int fp8_count(DType w, DType s, bool adam) {
  return (w == DType::f8_e4m3 ? 1 : 0) + (s == DType::f8_e4m3 ? (adam ? 2 : 1) : 0);
}

// W or the state is fp8: one block per row, two passes (see the top of the file).
template <DType W, DType S, bool Adam>
__global__ void __launch_bounds__(kRowThreads) state_update_rows_kernel(StateKernelArgs a, bool keep) {
  extern __shared__ float kept[];  // fp8_count · 4 · kept_stride(cols) floats when keep
  __shared__ float smem[32];
  __shared__ float c[kMaxQ];
  __shared__ std::uint64_t seeds[kMaxQ];
  if (!load_directions(a, c, seeds)) return;  // the host reports it when it reads g
  constexpr bool w8 = W == DType::f8_e4m3, s8 = S == DType::f8_e4m3;
  // Slots of the kept values: W first (if fp8), then m, then v.
  constexpr int kw = 0, km = w8 ? 1 : 0, kv = km + 1;
  using WT = typename Elem<W>::T;
  using ST = typename Elem<S>::T;
  WT* w = static_cast<WT*>(a.w);
  ST* m = static_cast<ST*>(a.m);
  ST* v = static_cast<ST*>(a.v);
  StateCoefficients k = a.k;
  k.adam = Adam;
  const std::int64_t stride = kept_stride(a.cols);
  for (std::int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const float ws = w8 ? a.w_scales[row] : 1.0f;
    const float ms = s8 ? a.m_scales[row] : 1.0f;
    const float vs = s8 && Adam ? a.v_scales[row] : 1.0f;
    const std::int64_t base = row * a.cols, end = base + a.cols;
    // The new values of element e (from the old ones, which nobody has written yet).
    auto compute = [&](std::int64_t e, float sum) {
      const float x = load_as_f32<W>(w[e], ws);
      const float mi = load_as_f32<S>(m[e], ms);
      const float vi = Adam ? load_as_f32<S>(v[e], vs) : 0.0f;
      return state_updated(k, x, mi, vi, sum);
    };
    auto slot = [&](int t, int j, std::int64_t q) -> float& { return kept[(t * 4 + j) * stride + (q - base / 4)]; };
    // Pass 1: the absolute maxima of the fp8 tensors' new rows; with keep, their values
    // wait in shared memory and the other tensors are stored now.
    float wmax = 0.0f, mmax = 0.0f, vmax = 0.0f;
    for (std::int64_t q = base / 4 + threadIdx.x; q * 4 < end; q += blockDim.x) {
      const std::uint64_t gq = a.first_group + static_cast<std::uint64_t>(q);
      float s[4];
      group_sums(a.directions, c, seeds, a.key, gq, s);
      Philox4 rw{}, rm{}, rv{};
      if (keep) {
        if constexpr (!w8 && W != DType::f32) rw = noise_bits(a.rounding_seed, a.key, gq, NoiseDomain::rounding);
        if constexpr (!s8 && S != DType::f32) {
          rm = noise_bits(a.rounding_seed, a.key, gq, NoiseDomain::state_m);
          if constexpr (Adam) rv = noise_bits(a.rounding_seed, a.key, gq, NoiseDomain::state_v);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const std::int64_t e = q * 4 + j;
        if (e < base || e >= end) continue;
        const StateValues r = compute(e, s[j]);
        if constexpr (w8) {
          wmax = fmaxf(wmax, fabsf(r.w));
          if (keep) slot(kw, j, q) = r.w;
        } else if (keep) {
          w[e] = store_sr<W>(r.w, word(rw, j));
        }
        if constexpr (s8) {
          mmax = fmaxf(mmax, fabsf(r.m));
          if (keep) slot(km, j, q) = r.m;
          if constexpr (Adam) {
            vmax = fmaxf(vmax, fabsf(r.v));
            if (keep) slot(kv, j, q) = r.v;
          }
        } else if (keep) {
          m[e] = store_sr<S>(r.m, word(rm, j));
          if constexpr (Adam) v[e] = store_sr<S>(r.v, word(rv, j));
        }
      }
    }
    // Every thread read the old scales and its elements before these barriers.
    float nws = 1.0f, nms = 1.0f, nvs = 1.0f;
    if constexpr (w8) nws = fp8_row_scale(block_max(wmax, smem));
    if constexpr (s8) {
      nms = fp8_row_scale(block_max(mmax, smem));
      if constexpr (Adam) nvs = fp8_row_scale(block_max(vmax, smem));
    }
    // Pass 2: the fp8 tensors' values (kept, or recomputed from the same old values with
    // the same arithmetic) rounded into the new scales; without keep, everything is
    // stored here. Each thread rewrites exactly the elements it read in pass 1.
    for (std::int64_t q = base / 4 + threadIdx.x; q * 4 < end; q += blockDim.x) {
      const std::uint64_t gq = a.first_group + static_cast<std::uint64_t>(q);
      float s[4] = {};
      if (!keep) group_sums(a.directions, c, seeds, a.key, gq, s);
      Philox4 rw{}, rm{}, rv{};
      if (W != DType::f32 && (w8 || !keep)) rw = noise_bits(a.rounding_seed, a.key, gq, NoiseDomain::rounding);
      if (S != DType::f32 && (s8 || !keep)) {
        rm = noise_bits(a.rounding_seed, a.key, gq, NoiseDomain::state_m);
        if constexpr (Adam) rv = noise_bits(a.rounding_seed, a.key, gq, NoiseDomain::state_v);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const std::int64_t e = q * 4 + j;
        if (e < base || e >= end) continue;
        StateValues r{};
        if (keep) {
          if constexpr (w8) r.w = slot(kw, j, q);
          if constexpr (s8) {
            r.m = slot(km, j, q);
            if constexpr (Adam) r.v = slot(kv, j, q);
          }
        } else {
          r = compute(e, s[j]);
        }
        if constexpr (w8) w[e] = store_sr<W>(detail::fdiv(r.w, nws), word(rw, j));
        else if (!keep) w[e] = store_sr<W>(r.w, word(rw, j));
        if constexpr (s8) {
          m[e] = store_sr<S>(detail::fdiv(r.m, nms), word(rm, j));
          if constexpr (Adam) v[e] = store_sr<S>(detail::fdiv(r.v, nvs), word(rv, j));
        } else if (!keep) {
          m[e] = store_sr<S>(r.m, word(rm, j));
          if constexpr (Adam) v[e] = store_sr<S>(r.v, word(rv, j));
        }
      }
    }
    if (threadIdx.x == 0) {
      if constexpr (w8) a.w_scales[row] = nws;
      if constexpr (s8) {
        a.m_scales[row] = nms;
        if constexpr (Adam) a.v_scales[row] = nvs;
      }
    }
    // The next row's slots map to other threads where cols % 4 != 0: let every thread
    // finish reading this row's values first.
    if (keep) __syncthreads();
  }
}

bool aligned_to(const void* p, std::size_t bytes) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

template <DType D>
using Tag = std::integral_constant<DType, D>;

template <class Fn>
void dispatch_weight(DType dt, Fn&& f) {
  switch (dt) {
    case DType::f32: f(Tag<DType::f32>{}); return;
    case DType::bf16: f(Tag<DType::bf16>{}); return;
    case DType::f16: f(Tag<DType::f16>{}); return;
    case DType::f8_e4m3: f(Tag<DType::f8_e4m3>{}); return;
    default:
      throw_unsupported("cuda update_state: weights must be stored as fp32, bf16, fp16 or fp8, not " +
                        std::string(dtype_name(dt)));
  }
}
template <class Fn>
void dispatch_state(DType dt, Fn&& f) {
  switch (dt) {
    case DType::f32: f(Tag<DType::f32>{}); return;
    case DType::bf16: f(Tag<DType::bf16>{}); return;
    case DType::f8_e4m3: f(Tag<DType::f8_e4m3>{}); return;
    default:
      throw_unsupported("cuda update_state: the state must be fp32, bf16 or fp8, not " + std::string(dtype_name(dt)));
  }
}

// ZO2_CUDA_FP8_UPDATE (as for `update`): "kept" (default) or "regenerate". Read at every call.
bool fp8_keeps_values() { return env_choice("ZO2_CUDA_FP8_UPDATE", {"kept", "regenerate"}) == 0; }

template <DType W, DType S, bool Adam>
void launch(KernelStream& s, const StateKernelArgs& a) {
  if constexpr (W != DType::f8_e4m3 && S != DType::f8_e4m3) {
    state_update_kernel<W, S, Adam>
        <<<grid_blocks(s, ceil_div(a.rows * a.cols, 4), kThreads), kThreads, 0, s.stream()>>>(a);
    ZO2_CUDA_CHECK_LAUNCH();
  } else {
    // The kept values in shared memory where they fit the device's opt-in limit (less a
    // margin for the kernel's ~1 KiB of static shared memory); see `update` in noise.cu.
    int device = 0, optin = 0;
    ZO2_CUDA_CHECK(cudaGetDevice(&device));
    ZO2_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const std::size_t limit = optin > 2048 ? static_cast<std::size_t>(optin) - 2048 : 0;
    const std::size_t kept_bytes =
        static_cast<std::size_t>(fp8_count(W, S, Adam)) * 4 * static_cast<std::size_t>(kept_stride(a.cols)) * sizeof(float);
    const bool keep = kept_bytes <= limit && fp8_keeps_values();
    if (keep)
      ZO2_CUDA_CHECK(cudaFuncSetAttribute(state_update_rows_kernel<W, S, Adam>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)));
    state_update_rows_kernel<W, S, Adam><<<grid_blocks(s, a.rows * kRowThreads, kRowThreads), kRowThreads,
                                           keep ? kept_bytes : 0, s.stream()>>>(a, keep);
    ZO2_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

void update_state(KernelStream& s, const StoredTensor& w, const StoredTensor& m, const StoredTensor* v,
                  const StateUpdateArgs& args) {
  if (w.numel() == 0) return;
  StateKernelArgs a{};
  a.w = w.data;
  a.m = m.data;
  a.v = v != nullptr ? v->data : nullptr;
  a.w_scales = w.row_scales;
  a.m_scales = m.row_scales;
  a.v_scales = v != nullptr ? v->row_scales : nullptr;
  a.rows = w.rows;
  a.cols = w.cols;
  a.key = w.key;
  a.first_group = static_cast<std::uint64_t>(w.first_element() / 4);
  a.directions = args.directions;
  for (int j = 0; j < args.directions; ++j) a.seeds[j] = args.seeds[j];
  a.g = args.g;
  a.k = state_coefficients(args.adam, args.lr, args.weight_decay, args.beta1, args.beta2, args.adam_eps,
                           args.bias1, args.bias2);
  a.rounding_seed = args.rounding_seed;
  dispatch_weight(w.dtype, [&](auto wt) {
    constexpr DType W = decltype(wt)::value;
    dispatch_state(m.dtype, [&](auto st) {
      constexpr DType S = decltype(st)::value;
      a.vectorized = aligned_to(a.w, 4 * sizeof(typename Elem<W>::T)) && aligned_to(a.m, 4 * sizeof(typename Elem<S>::T)) &&
                     aligned_to(a.v, 4 * sizeof(typename Elem<S>::T));
      if (args.adam) launch<W, S, true>(s, a);
      else launch<W, S, false>(s, a);
    });
  });
}

}  // namespace zo2::cuda
