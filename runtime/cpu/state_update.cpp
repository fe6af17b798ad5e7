// The CPU kernel of Ops::update_state (StateUpdateArgs in runtime/ops.h): the deferred
// update of zo-sgd-momentum and zo-adam, in place on W, m and v. The reference the CUDA
// twin (runtime/cuda/state_update.cu) equals bit for bit.
//
// Structure (as `update` in noise.cpp): fixed work partitioning — chunks of kChunk elements,
// or, when W or the state is fp8, whole rows (a row's new values decide its new scale) —
// and, per range, the direction sums s = Σ_j c_j·z_j accumulated direction by direction
// from noise_normals (q generations per element), then the element math of
// Note [State update arithmetic] (runtime/element.h), then the stores: fp32 as is, narrower
// dtypes stochastically rounded with bits from (rounding_seed, W's key) in the domains
// rounding (W), state_m (m) and state_v (v). A tile (StoredTensor::first_row; m and v are
// tiles of the same rows) draws at the whole tensor's indices: local group q is the
// tensor's group first_group + q.
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

// Scratch of one task: the direction sums and new values of a range of elements.
struct Scratch {
  std::vector<float> z, sum, w, m, v;
  std::vector<std::uint32_t> bits;
};

// sum[e − e0] = Σ_j c_j·z(seeds[j], key, e) for local e in [e0, e1), in j order (group0:
// first_group of the tile).
void direction_sums(const StateUpdateArgs& a, const float* c, std::uint64_t key, std::uint64_t group0,
                    std::int64_t e0, std::int64_t e1, Scratch& s) {
  const std::int64_t q0 = e0 / 4, q1 = (e1 + 3) / 4, base = q0 * 4, n = e1 - e0;
  s.z.resize(static_cast<std::size_t>((q1 - q0) * 4));
  s.sum.assign(static_cast<std::size_t>(n), kDirectionSumStart);
  for (int j = 0; j < a.directions; ++j) {
    noise_normals(a.seeds[j], key, group0 + static_cast<std::uint64_t>(q0), q1 - q0, s.z.data());
    const float* z = s.z.data() + (e0 - base);
    float* sum = s.sum.data();
    const float cj = c[j];
    for (std::int64_t i = 0; i < n; ++i) sum[i] = accumulate_direction(sum[i], cj, z[i]);
  }
}

// New values of elements [e0, e1) (old scales given for fp8) into s.w, s.m, s.v.
template <DType W, DType S>
void compute(const StoredTensor& w, const StoredTensor& m, const StoredTensor* v,
             const StateCoefficients& k, std::int64_t e0, std::int64_t e1, float w_scale,
             float m_scale, float v_scale, Scratch& s) {
  const std::int64_t n = e1 - e0;
  s.w.resize(static_cast<std::size_t>(n));
  s.m.resize(static_cast<std::size_t>(n));
  s.v.resize(v ? static_cast<std::size_t>(n) : 0);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t e = e0 + i;
    const float x = load_element(w.data, W, e, w_scale);
    const float mi = load_element(m.data, S, e, m_scale);
    const float vi = v ? load_element(v->data, S, e, v_scale) : 0.0f;
    const StateValues r = state_updated(k, x, mi, vi, s.sum[static_cast<std::size_t>(i)]);
    s.w[static_cast<std::size_t>(i)] = r.w;
    s.m[static_cast<std::size_t>(i)] = r.m;
    if (v) s.v[static_cast<std::size_t>(i)] = r.v;
  }
}

// Stores values[0 .. e1−e0) as local elements [e0, e1) of a tile of dtype D: fp32 as is,
// else stochastically rounded (fp8: divided by `scale` first) with bits of `domain`.
template <DType D>
void store_range(void* data, std::int64_t e0, std::int64_t e1, const float* values, float scale,
                 std::uint64_t rounding_seed, std::uint64_t key, std::uint64_t group0, NoiseDomain domain,
                 Scratch& s) {
  const std::int64_t n = e1 - e0;
  if constexpr (D == DType::f32) {
    std::copy(values, values + n, static_cast<float*>(data) + e0);
  } else {
    const std::int64_t q0 = e0 / 4, q1 = (e1 + 3) / 4, base = q0 * 4;
    s.bits.resize(static_cast<std::size_t>((q1 - q0) * 4));
    noise_words(rounding_seed, key, group0 + static_cast<std::uint64_t>(q0), q1 - q0, s.bits.data(), domain);
    for (std::int64_t i = 0; i < n; ++i) {
      const float x = D == DType::f8_e4m3 ? detail::fdiv(values[i], scale) : values[i];
      store_element_sr(data, D, e0 + i, x, s.bits[static_cast<std::size_t>(e0 + i - base)]);
    }
  }
}

float abs_max(const std::vector<float>& x) {
  float r = 0.0f;
  for (float e : x) r = std::max(r, std::fabs(e));
  return r;
}

template <DType W, DType S>
void run(const StoredTensor& w, const StoredTensor& m, const StoredTensor* v, const StateUpdateArgs& a,
         const float* c, const StateCoefficients& k) {
  const std::uint64_t key = w.key;
  const std::uint64_t g0 = first_group(w, "update_state");
  const std::uint64_t rs = a.rounding_seed;
  if constexpr (W != DType::f8_e4m3 && S != DType::f8_e4m3) {
    parallel_for(w.numel(), kChunk, [&](std::int64_t e0, std::int64_t e1) {
      Scratch s;
      direction_sums(a, c, key, g0, e0, e1, s);
      compute<W, S>(w, m, v, k, e0, e1, 1.0f, 1.0f, 1.0f, s);
      store_range<W>(w.data, e0, e1, s.w.data(), 1.0f, rs, key, g0, NoiseDomain::rounding, s);
      store_range<S>(m.data, e0, e1, s.m.data(), 1.0f, rs, key, g0, NoiseDomain::state_m, s);
      if (v) store_range<S>(v->data, e0, e1, s.v.data(), 1.0f, rs, key, g0, NoiseDomain::state_v, s);
    });
  } else {
    // Row by row: an fp8 row's new scale (absmax / 448, as `update`) is known only once
    // the whole row is computed. Rows are independent, so any grouping gives the same bits.
    const std::int64_t grain = std::max<std::int64_t>(1, kChunk / std::max<std::int64_t>(w.cols, 1));
    parallel_for(w.rows, grain, [&](std::int64_t r0, std::int64_t r1) {
      Scratch s;
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int64_t e0 = r * w.cols, e1 = e0 + w.cols;
        if (e0 == e1) continue;
        auto old_scale = [&](const StoredTensor* t, DType d) {
          return d == DType::f8_e4m3 ? t->row_scales[r] : 1.0f;
        };
        direction_sums(a, c, key, g0, e0, e1, s);
        compute<W, S>(w, m, v, k, e0, e1, old_scale(&w, W), old_scale(&m, S), v ? old_scale(v, S) : 1.0f, s);
        auto new_scale = [&](const StoredTensor* t, DType d, const std::vector<float>& x) {
          if (d != DType::f8_e4m3) return 1.0f;
          const float scale = fp8_row_scale(abs_max(x));
          t->row_scales[r] = scale;
          return scale;
        };
        const float ws = new_scale(&w, W, s.w), ms = new_scale(&m, S, s.m);
        const float vs = v ? new_scale(v, S, s.v) : 1.0f;
        store_range<W>(w.data, e0, e1, s.w.data(), ws, rs, key, g0, NoiseDomain::rounding, s);
        store_range<S>(m.data, e0, e1, s.m.data(), ms, rs, key, g0, NoiseDomain::state_m, s);
        if (v) store_range<S>(v->data, e0, e1, s.v.data(), vs, rs, key, g0, NoiseDomain::state_v, s);
      }
    });
  }
}

void check_tensor(const StoredTensor& t, const char* what) {
  if (t.rows < 0 || t.cols < 0 || (t.numel() > 0 && t.data == nullptr))
    fail(ErrorKind::internal, "cpu update_state: bad {} ({}x{})", what, t.rows, t.cols);
  if (t.dtype == DType::f8_e4m3 && t.numel() > 0 && t.row_scales == nullptr)
    fail(ErrorKind::internal, "cpu update_state: the fp8 {} needs its row scales", what);
}

}  // namespace

void check_update_state(const StoredTensor& w, const StoredTensor& m, const StoredTensor* v,
                        const StateUpdateArgs& a) {
  if (w.dtype != DType::f32 && w.dtype != DType::bf16 && w.dtype != DType::f16 && w.dtype != DType::f8_e4m3)
    fail(ErrorKind::unsupported, "cpu update_state: weights stored as {} are not supported", dtype_name(w.dtype));
  if (m.dtype != DType::f32 && m.dtype != DType::bf16 && m.dtype != DType::f8_e4m3)
    fail(ErrorKind::unsupported, "cpu update_state: the state must be fp32, bf16 or fp8, not {}", dtype_name(m.dtype));
  check_tensor(w, "weight");
  check_tensor(m, "m");
  first_group(w, "update_state");
  if (m.rows != w.rows || m.cols != w.cols || m.first_row != w.first_row)
    fail(ErrorKind::internal, "cpu update_state: m is {}x{} from row {} but W is {}x{} from row {}", m.rows, m.cols,
         m.first_row, w.rows, w.cols, w.first_row);
  if (a.adam != (v != nullptr))
    fail(ErrorKind::internal, "cpu update_state: {}", a.adam ? "Adam needs v" : "momentum takes no v");
  if (v) {
    check_tensor(*v, "v");
    if (v->rows != w.rows || v->cols != w.cols || v->first_row != w.first_row)
      fail(ErrorKind::internal, "cpu update_state: v is {}x{} from row {} but W is {}x{} from row {}", v->rows,
           v->cols, v->first_row, w.rows, w.cols, w.first_row);
    if (v->dtype != m.dtype)
      fail(ErrorKind::internal, "cpu update_state: v is {} but m is {} (one state dtype)", dtype_name(v->dtype),
           dtype_name(m.dtype));
  }
  if (a.directions < 1 || a.directions > StateUpdateArgs::kMaxDirections)
    fail(ErrorKind::internal, "cpu update_state: {} directions (1 to {})", a.directions,
         StateUpdateArgs::kMaxDirections);
  if (a.g == nullptr) fail(ErrorKind::internal, "cpu update_state: no projected gradients");
}

void update_state(const StoredTensor& w, const StoredTensor& m, const StoredTensor* v,
                  const StateUpdateArgs& a) {
  check_update_state(w, m, v, a);
  float c[StateUpdateArgs::kMaxDirections];
  for (int j = 0; j < a.directions; ++j) {
    if (!finite(a.g[j])) return;  // W, m, v unchanged; the host reports it when it reads g
    c[j] = direction_coefficient(a.g[j], a.directions);
  }
  if (w.numel() == 0) return;
  const StateCoefficients k = state_coefficients(a.adam, a.lr, a.weight_decay, a.beta1, a.beta2, a.adam_eps,
                                                 a.bias1, a.bias2);
  auto with_state = [&]<DType W>() {
    switch (m.dtype) {
      case DType::f32: run<W, DType::f32>(w, m, v, a, c, k); return;
      case DType::bf16: run<W, DType::bf16>(w, m, v, a, c, k); return;
      default: run<W, DType::f8_e4m3>(w, m, v, a, c, k); return;
    }
  };
  switch (w.dtype) {
    case DType::f32: with_state.template operator()<DType::f32>(); return;
    case DType::bf16: with_state.template operator()<DType::bf16>(); return;
    case DType::f16: with_state.template operator()<DType::f16>(); return;
    default: with_state.template operator()<DType::f8_e4m3>(); return;
  }
}

}  // namespace zo2::cpu
