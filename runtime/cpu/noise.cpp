// CPU twins of the fused ZO kernels: perturbation pairs (W ± eps·z into scratch, in the
// compute dtype) and the deferred update (in place, stochastic rounding for narrow
// storage). z comes from noise_normals (noise_simd.h) in groups of four elements, chunk by
// chunk; the element arithmetic is runtime/element.h, shared with CUDA. Storage and output
// dtypes are template parameters so the inner loops stay branch-free. A tile of a larger
// tensor (StoredTensor::first_row) draws z and rounding bits at the whole tensor's indices:
// loops run over local elements, and local group q is the tensor's group first_group + q.
#include "runtime/common.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/noise_simd.h"
#include "runtime/element.h"
#include "runtime/error.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace zo2::cpu {
namespace {

constexpr std::int64_t kChunk = 1 << 14;  // elements per task; a multiple of 4

template <DType D>
inline float load(const void* p, std::int64_t i, float scale) {
  return load_element(p, D, i, scale);
}
template <DType D>
inline void store(void* p, std::int64_t i, float v) {
  store_element(p, D, i, v);
}

// Calls f.template operator()<S, O>() for the runtime storage and output dtypes.
template <class F>
void dispatch(DType storage, DType out, F&& f) {
  auto with_out = [&]<DType S>() {
    switch (out) {
      case DType::f32: f.template operator()<S, DType::f32>(); return;
      case DType::bf16: f.template operator()<S, DType::bf16>(); return;
      case DType::f16: f.template operator()<S, DType::f16>(); return;
      default: fail(ErrorKind::unsupported, "cpu perturb: output dtype {}", dtype_name(out));
    }
  };
  switch (storage) {
    case DType::f32: with_out.template operator()<DType::f32>(); return;
    case DType::bf16: with_out.template operator()<DType::bf16>(); return;
    case DType::f16: with_out.template operator()<DType::f16>(); return;
    case DType::f8_e4m3: with_out.template operator()<DType::f8_e4m3>(); return;
    default: fail(ErrorKind::unsupported, "cpu perturb: storage dtype {}", dtype_name(storage));
  }
}

// Noise of local elements [e_begin, e_end) of a tile whose group 0 is the tensor's group
// `group0` (first_group): z[e − 4·(e_begin/4)].
struct ChunkNoise {
  std::vector<float> z;
  std::int64_t base = 0;  // first local element covered (a multiple of 4)
  void fill(std::uint64_t seed, std::uint64_t key, std::uint64_t group0, std::int64_t e_begin,
            std::int64_t e_end) {
    const std::int64_t q0 = e_begin / 4, q1 = (e_end + 3) / 4;
    base = q0 * 4;
    z.resize(static_cast<std::size_t>((q1 - q0) * 4));
    noise_normals(seed, key, group0 + static_cast<std::uint64_t>(q0), q1 - q0, z.data());
  }
  float at(std::int64_t e) const { return z[static_cast<std::size_t>(e - base)]; }
};

}  // namespace

std::uint64_t first_group(const StoredTensor& w, const char* op) {
  if (w.first_row < 0 || w.first_element() % 4 != 0)
    fail(ErrorKind::internal, "cpu {}: a tile from row {} of {} columns does not start on a group of 4 elements",
         op, w.first_row, w.cols);
  return static_cast<std::uint64_t>(w.first_element() / 4);
}

void perturb(const StoredTensor& w, std::int64_t row_begin, std::int64_t row_end,
             const NoiseArgs* noise, void* out_plus, void* out_minus, DType out_dtype) {
  if (row_begin < 0 || row_end > w.rows || row_begin > row_end)
    fail(ErrorKind::internal, "cpu perturb: rows [{}, {}) outside [0, {})", row_begin, row_end, w.rows);
  const std::uint64_t g0 = first_group(w, "perturb");
  const std::int64_t e0 = row_begin * w.cols;
  const std::int64_t n = (row_end - row_begin) * w.cols;
  dispatch(w.dtype, out_dtype, [&]<DType S, DType O>() {
    parallel_for(n, kChunk, [&](std::int64_t c0, std::int64_t c1) {
      ChunkNoise z;
      if (noise) z.fill(noise->seed, w.key, g0, e0 + c0, e0 + c1);
      const float eps = noise ? noise->eps : 0.0f;
      const float eps_minus = noise ? noise->eps_minus() : 0.0f;
      // Row segments, so an fp8 row scale is looked up once per row.
      for (std::int64_t e = e0 + c0; e < e0 + c1;) {
        const std::int64_t row = e / w.cols;
        const std::int64_t seg_end = std::min(e0 + c1, (row + 1) * w.cols);
        const float scale = w.row_scales ? w.row_scales[row] : 1.0f;
        if (!noise) {
          for (; e < seg_end; ++e) store<O>(out_plus, e - e0, load<S>(w.data, e, scale));
        } else if (out_minus && out_plus) {
          for (; e < seg_end; ++e) {
            const float x = load<S>(w.data, e, scale), zi = z.at(e);
            store<O>(out_plus, e - e0, perturbed(x, zi, eps));
            store<O>(out_minus, e - e0, perturbed(x, zi, eps_minus));
          }
        } else {
          void* out = out_plus ? out_plus : out_minus;
          const float signed_eps = out_plus ? eps : eps_minus;
          for (; e < seg_end; ++e) store<O>(out, e - e0, perturbed(load<S>(w.data, e, scale), z.at(e), signed_eps));
        }
      }
    });
  });
}

void spsa_grad(const float* loss_plus, const float* loss_minus, float eps, float* g) {
  g[0] = detail::fdiv(detail::fadd(loss_plus[0], -loss_minus[0]), detail::fmul(2.0f, eps));
}

void update(const StoredTensor& w, const UpdateArgs& a) {
  const std::uint64_t g0 = first_group(w, "update");
  if (!finite(*a.g)) return;  // reported by the host when it reads g
  const float g = update_coefficient(*a.g, a.sign);
  const std::int64_t n = w.numel();
  if (w.dtype == DType::f8_e4m3) {
    // Row-wise: the new values decide the row's new scale (fp8_row_scale: absmax / 448),
    // then each is stochastically rounded. Every element changes every step, so rescaling
    // loses nothing.
    parallel_for(w.rows, 1, [&](std::int64_t r0, std::int64_t r1) {
      std::vector<float> row(static_cast<std::size_t>(w.cols));
      std::vector<std::uint32_t> bits;
      ChunkNoise z;
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int64_t b = r * w.cols, e_end = b + w.cols;
        z.fill(a.seed, w.key, g0, b, e_end);
        const float scale = w.row_scales[r];
        float absmax = 0.0f;
        for (std::int64_t e = b; e < e_end; ++e) {
          const float v = updated(load<DType::f8_e4m3>(w.data, e, scale), z.at(e), g, a.lr, a.weight_decay);
          row[static_cast<std::size_t>(e - b)] = v;
          absmax = std::max(absmax, std::fabs(v));
        }
        const float new_scale = fp8_row_scale(absmax);
        w.row_scales[r] = new_scale;
        const std::int64_t q0 = b / 4, q1 = (e_end + 3) / 4;
        bits.resize(static_cast<std::size_t>((q1 - q0) * 4));
        noise_words(a.rounding_seed, w.key, g0 + static_cast<std::uint64_t>(q0), q1 - q0, bits.data(),
                    NoiseDomain::rounding);
        for (std::int64_t e = b; e < e_end; ++e)
          store_element_sr(w.data, DType::f8_e4m3, e, detail::fdiv(row[static_cast<std::size_t>(e - b)], new_scale),
                           bits[static_cast<std::size_t>(e - q0 * 4)]);
      }
    });
    return;
  }
  dispatch(w.dtype, DType::f32, [&]<DType S, DType>() {
    parallel_for(n, kChunk, [&](std::int64_t c0, std::int64_t c1) {
      ChunkNoise z;
      z.fill(a.seed, w.key, g0, c0, c1);
      if constexpr (S == DType::f32) {
        float* p = static_cast<float*>(w.data);
        for (std::int64_t e = c0; e < c1; ++e) p[e] = updated(p[e], z.at(e), g, a.lr, a.weight_decay);
      } else {
        const std::int64_t q0 = c0 / 4, q1 = (c1 + 3) / 4;
        std::vector<std::uint32_t> bits(static_cast<std::size_t>((q1 - q0) * 4));
        noise_words(a.rounding_seed, w.key, g0 + static_cast<std::uint64_t>(q0), q1 - q0, bits.data(),
                    NoiseDomain::rounding);
        for (std::int64_t e = c0; e < c1; ++e) {
          const float v = updated(load<S>(w.data, e, 1.0f), z.at(e), g, a.lr, a.weight_decay);
          store_element_sr(w.data, S, e, v, bits[static_cast<std::size_t>(e - q0 * 4)]);
        }
      }
    });
  });
}

}  // namespace zo2::cpu
