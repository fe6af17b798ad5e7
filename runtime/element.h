// Element-wise arithmetic shared by the CPU kernels and the CUDA kernels, so that both
// compute the same bits (see Note [Deterministic normals] in philox.h): loading a stored
// weight as fp32, the perturbation, the update, and the rounded store.
#pragma once
#include "runtime/common.h"
#include "runtime/dtype.h"
#include "runtime/dtype_convert.h"
#include "runtime/philox.h"

#include <cstdint>

namespace zo2 {

// Stored element i of a tensor of dtype dt (fp8: times its row's scale).
ZO2_HD float load_element(const void* data, DType dt, std::int64_t i, float row_scale) {
  switch (dt) {
    case DType::f32: return static_cast<const float*>(data)[i];
    case DType::bf16: return bf16_to_f32(static_cast<const std::uint16_t*>(data)[i]);
    case DType::f16: return f16_to_f32(static_cast<const std::uint16_t*>(data)[i]);
    case DType::f8_e4m3:
      return detail::fmul(e4m3_to_f32(static_cast<const std::uint8_t*>(data)[i]), row_scale);
    default: return 0.0f;
  }
}

// Round-to-nearest store of an fp32 value as dt (compute-dtype scratch and activations).
ZO2_HD void store_element(void* data, DType dt, std::int64_t i, float v) {
  switch (dt) {
    case DType::f32: static_cast<float*>(data)[i] = v; break;
    case DType::bf16: static_cast<std::uint16_t*>(data)[i] = f32_to_bf16(v); break;
    case DType::f16: static_cast<std::uint16_t*>(data)[i] = f32_to_f16(v); break;
    case DType::f8_e4m3: static_cast<std::uint8_t*>(data)[i] = f32_to_e4m3(v); break;
    default: break;
  }
}

// Stochastically rounded store of an updated weight (storage dtypes narrower than fp32);
// for fp8, v is already divided by the row scale.
ZO2_HD void store_element_sr(void* data, DType dt, std::int64_t i, float v, std::uint32_t bits) {
  switch (dt) {
    case DType::f32: static_cast<float*>(data)[i] = v; break;
    case DType::bf16: static_cast<std::uint16_t*>(data)[i] = f32_to_bf16_sr(v, bits); break;
    case DType::f16: static_cast<std::uint16_t*>(data)[i] = f32_to_f16_sr(v, bits); break;
    case DType::f8_e4m3: static_cast<std::uint8_t*>(data)[i] = f32_to_e4m3_sr(v, bits); break;
    default: break;
  }
}

// W ± eps·z, each a single fused multiply-add.
ZO2_HD float perturbed(float w, float z, float signed_eps) { return detail::ffma(signed_eps, z, w); }

// W − lr·(g·z + wd·W), with one fixed order of roundings.
ZO2_HD float updated(float w, float z, float g, float lr, float wd) {
  const float step = detail::ffma(wd, w, detail::fmul(g, z));
  return detail::ffma(-lr, step, w);
}

// The coefficient of z in an update: g itself, or its sign (zo-sgd-sign; sign(0) = 0).
ZO2_HD float update_coefficient(float g, bool sign) {
  return sign ? (g > 0.0f ? 1.0f : (g < 0.0f ? -1.0f : 0.0f)) : g;
}

ZO2_HD bool finite(float x) {
  return (detail::float_to_bits(x) & 0x7F800000u) != 0x7F800000u;
}

// ---- The stateful update (Ops::update_state, StateUpdateArgs in runtime/ops.h) ----------
//
// Note [State update arithmetic]
//   Every value is fp32 and every operation one IEEE round-to-nearest step, in this order
//   (the CPU and CUDA kernels call exactly these functions, so they agree bit for bit):
//     c_j   = g[j] / q                                        (direction_coefficient)
//     s     = −0; s = fma(c_j, z_j, s) for j = 0 .. q−1         (accumulate_direction;
//             starting at −0 makes the first step the rounded product c_0·z_0 exactly)
//     u     = fma(wd, W, s)                                     (so q = 1 is the u of `updated`)
//   momentum:  m' = fma(β1, m, u);  W' = fma(−lr, m', W)
//   adam:      m' = fma(β1, m, (1−β1)·u)
//              v' = fma(β2, v, (1−β2)·(u·u))
//              W' = fma(−step, m' / (√v' / √bias2 + eps), W),  step = lr / bias1
//   with 1−β1, 1−β2, step and √bias2 computed once per call (state_coefficients). W' uses
//   the fp32 m' and v', not their stored (rounded) values. With β1 = 0, m = 0 and q = 1 the
//   momentum W' equals updated(W, z, g, lr, wd) bit for bit.
inline constexpr float kDirectionSumStart = -0.0f;

ZO2_HD float direction_coefficient(float g, int directions) {
  return detail::fdiv(g, static_cast<float>(directions));
}
ZO2_HD float accumulate_direction(float sum, float c, float z) { return detail::ffma(c, z, sum); }

// The per-call constants of the update, computed once (on the host) by both backends.
struct StateCoefficients {
  bool adam = false;
  float neg_lr = 0;           // −lr (momentum)
  float weight_decay = 0;
  float beta1 = 0, beta2 = 0;
  float one_minus_beta1 = 0;  // 1 − β1
  float one_minus_beta2 = 0;  // 1 − β2
  float neg_step = 0;         // −lr / bias1 (adam)
  float sqrt_bias2 = 1;       // √bias2 (adam)
  float eps = 0;
};

ZO2_HD StateCoefficients state_coefficients(bool adam, float lr, float weight_decay, float beta1,
                                            float beta2, float eps, float bias1, float bias2) {
  StateCoefficients k;
  k.adam = adam;
  k.neg_lr = -lr;
  k.weight_decay = weight_decay;
  k.beta1 = beta1;
  k.beta2 = beta2;
  k.one_minus_beta1 = detail::fadd(1.0f, -beta1);
  k.one_minus_beta2 = detail::fadd(1.0f, -beta2);
  k.neg_step = -detail::fdiv(lr, bias1);
  k.sqrt_bias2 = detail::fsqrt(bias2);
  k.eps = eps;
  return k;
}

// W', m' and v' (v' = v for momentum) of one element from its direction sum s.
struct StateValues {
  float w, m, v;
};
ZO2_HD StateValues state_updated(const StateCoefficients& k, float w, float m, float v, float sum) {
  using namespace detail;
  const float u = ffma(k.weight_decay, w, sum);
  if (!k.adam) {
    const float m1 = ffma(k.beta1, m, u);
    return {ffma(k.neg_lr, m1, w), m1, v};
  }
  const float m1 = ffma(k.beta1, m, fmul(k.one_minus_beta1, u));
  const float v1 = ffma(k.beta2, v, fmul(k.one_minus_beta2, fmul(u, u)));
  const float denom = fadd(fdiv(fsqrt(v1), k.sqrt_bias2), k.eps);
  return {ffma(k.neg_step, fdiv(m1, denom), w), m1, v1};
}

// The row scale of an fp8 row whose values have this absolute maximum: absmax / 448, so the
// largest value encodes as 448 (1 for an all-zero row). Every CPU and CUDA encoder (load
// from a checkpoint, `update`, the stateful update) takes its scales from here.
//
// Note [Tiny fp8 rows]
//   Where absmax / 448 is subnormal in fp32 (absmax < 448·2^-126 ≈ 5.3e-36) the quotient
//   is rounded to a multiple of 2^-149, and for absmax ≤ 224·2^-149 ≈ 3.1e-43 it underflows
//   to 0: the row would be divided by 0 (NaN). There the scale is at least 2^-149 (the
//   smallest subnormal), and one ulp more when the rounding went down far enough that
//   absmax / scale would exceed 448 (which would saturate the largest values): the exact
//   quotient k·2^-149 ≥ absmax/448 − 2^-150 grows to (k+1)·2^-149 > absmax/448, so every
//   value of the row encodes unsaturated and stays finite. A row whose quotient is normal
//   (every row of a real model) keeps exactly absmax / 448.
ZO2_HD float fp8_row_scale(float absmax) {
  if (!(absmax > 0.0f)) return 1.0f;
  const float s = detail::fdiv(absmax, kE4M3Max);
  std::uint32_t k = detail::float_to_bits(s);  // s >= 0: in units of 2^-149 while subnormal
  if (k >= 0x00800000u) return s;              // normal (or +inf): unchanged
  if (k == 0) k = 1;
  if (detail::fdiv(absmax, detail::bits_to_float(k)) > kE4M3Max) ++k;
  return detail::bits_to_float(k);
}

// n elements of dtype `packed` (bf16 or fp16) stored at the front of v[0..n), widened to
// fp32 in place. Element i's bytes sit at [i·w, (i+1)·w) with w < 4, so writing float i at
// 4·i covers only packed elements j ≥ i, which (walking down) were read already or are i.
inline void widen_packed_in_place(float* v, std::int64_t n, DType packed) {
  if (packed == DType::f32) return;
  const void* bytes = v;
  for (std::int64_t i = n; i-- > 0;) {
    const float x = load_element(bytes, packed, i, 1.0f);
    v[i] = x;
  }
}

}  // namespace zo2
