// CPU twins of the fused ZO kernels: perturbation pairs (W ± eps·z into scratch, in the
// compute dtype) and the deferred update (in place, stochastic rounding for narrow
// storage). z comes from noise_normal4 in groups of four elements (Note [Noise stream
// layout]); the element arithmetic is runtime/element.h, shared with CUDA.
#include "runtime/common.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/element.h"
#include "runtime/error.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace zo2::cpu {
namespace {

constexpr std::int64_t kChunk = 1 << 14;  // elements per task; a multiple of 4

float row_scale(const StoredTensor& w, std::int64_t row) {
  return w.row_scales ? w.row_scales[row] : 1.0f;
}

}  // namespace

void perturb(const StoredTensor& w, std::int64_t row_begin, std::int64_t row_end,
             const NoiseArgs* noise, void* out_plus, void* out_minus, DType out_dtype) {
  if (row_begin < 0 || row_end > w.rows || row_begin > row_end)
    fail(ErrorKind::internal, "cpu perturb: rows [{}, {}) outside [0, {})", row_begin, row_end,
         w.rows);
  const std::int64_t e0 = row_begin * w.cols;
  const std::int64_t n = (row_end - row_begin) * w.cols;
  parallel_for(n, kChunk, [&](std::int64_t c0, std::int64_t c1) {
    // Element e (tensor index) goes to out[e − e0]; groups of four share one Philox call.
    std::int64_t e = e0 + c0;
    const std::int64_t end = e0 + c1;
    while (e < end) {
      const std::int64_t q = e / 4;
      const std::int64_t group_end = std::min(end, (q + 1) * 4);
      Normal4 z{};
      if (noise) z = noise_normal4(noise->seed, w.key, static_cast<std::uint64_t>(q));
      for (; e < group_end; ++e) {
        const float x = load_element(w.data, w.dtype, e, row_scale(w, e / w.cols));
        if (!noise) {
          store_element(out_plus, out_dtype, e - e0, x);
          continue;
        }
        const float zi = z.v[e - q * 4];
        if (out_plus) store_element(out_plus, out_dtype, e - e0, perturbed(x, zi, noise->eps));
        if (out_minus) store_element(out_minus, out_dtype, e - e0, perturbed(x, zi, -noise->eps));
      }
    }
  });
}

void spsa_grad(const float* loss_plus, const float* loss_minus, float eps, float* g) {
  g[0] = detail::fdiv(detail::fadd(loss_plus[0], -loss_minus[0]), detail::fmul(2.0f, eps));
}

void update(const StoredTensor& w, const UpdateArgs& a) {
  const float g = *a.g;
  if (!finite(g)) return;  // reported by the host when it reads g
  if (w.dtype == DType::f8_e4m3) {
    // Row-wise: the new values decide the row's new scale (absmax / 448), then each is
    // stochastically rounded. Every element changes every step, so rescaling loses nothing.
    parallel_for(w.rows, 1, [&](std::int64_t r0, std::int64_t r1) {
      std::vector<float> row(static_cast<std::size_t>(w.cols));
      for (std::int64_t r = r0; r < r1; ++r) {
        const float scale = w.row_scales[r];
        float absmax = 0.0f;
        for (std::int64_t c = 0; c < w.cols; ++c) {
          const std::int64_t e = r * w.cols + c;
          const float x = load_element(w.data, w.dtype, e, scale);
          const float z = noise_normal(a.seed, w.key, static_cast<std::uint64_t>(e));
          const float v = updated(x, z, g, a.lr, a.weight_decay);
          row[static_cast<std::size_t>(c)] = v;
          absmax = std::max(absmax, std::fabs(v));
        }
        const float new_scale = absmax > 0.0f ? detail::fdiv(absmax, kE4M3Max) : 1.0f;
        w.row_scales[r] = new_scale;
        for (std::int64_t c = 0; c < w.cols; ++c) {
          const std::int64_t e = r * w.cols + c;
          store_element_sr(w.data, w.dtype, e, detail::fdiv(row[static_cast<std::size_t>(c)], new_scale),
                           rounding_bits(a.rounding_seed, w.key, static_cast<std::uint64_t>(e)));
        }
      }
    });
    return;
  }
  const std::int64_t n = w.numel();
  parallel_for(n, kChunk, [&](std::int64_t c0, std::int64_t c1) {
    std::int64_t e = c0;
    while (e < c1) {
      const std::int64_t q = e / 4;
      const std::int64_t group_end = std::min(c1, (q + 1) * 4);
      const Normal4 z = noise_normal4(a.seed, w.key, static_cast<std::uint64_t>(q));
      Philox4 bits{};
      if (w.dtype != DType::f32)
        bits = noise_bits(a.rounding_seed, w.key, static_cast<std::uint64_t>(q), NoiseDomain::rounding);
      const std::uint32_t rb[4] = {bits.x, bits.y, bits.z, bits.w};
      for (; e < group_end; ++e) {
        const float x = load_element(w.data, w.dtype, e, 1.0f);
        const float v = updated(x, z.v[e - q * 4], g, a.lr, a.weight_decay);
        store_element_sr(w.data, w.dtype, e, v, rb[e - q * 4]);
      }
    }
  });
}

}  // namespace zo2::cpu
