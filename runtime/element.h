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
