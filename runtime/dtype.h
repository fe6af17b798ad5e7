// Element types. Floating storage/compute types of zo2 are fp32, bf16, fp16 and
// fp8-e4m3 (OCP "e4m3fn": no infinities, max 448); the others exist so that any
// safetensors file can be read and validated. Scalar conversions live in dtype_convert.h.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace zo2 {

enum class DType : std::uint8_t {
  f32,
  bf16,
  f16,
  f8_e4m3,
  f8_e5m2,
  f64,
  i64,
  i32,
  i16,
  i8,
  u64,
  u32,
  u16,
  u8,
  boolean,
};

// Bytes per element.
std::size_t dtype_size(DType dt);
// zo2's spelling, as accepted on the command line: "fp32", "bf16", "fp16", "fp8", "i64", ...
std::string_view dtype_name(DType dt);
// The safetensors header spelling: "F32", "BF16", "F16", "F8_E4M3", "I64", ...
std::string_view dtype_safetensors_name(DType dt);
std::optional<DType> dtype_from_safetensors_name(std::string_view name);
// Accepts zo2's names and the common aliases (float32, bfloat16, float16, half,
// fp8_e4m3, float8_e4m3fn, ...), case-insensitively.
std::optional<DType> dtype_from_name(std::string_view name);
bool dtype_is_float(DType dt);
// The floating types zo2 can store weights in (fp32, bf16, fp16, fp8-e4m3).
bool dtype_is_storage(DType dt);

// Converts n elements between the floating types f64, f32, bf16, f16 and f8_e4m3
// (any pair, same type included), and from f8_e5m2 (a checkpoint dtype zo2 reads, never
// writes) to any of them: round-to-nearest-even with the scalar functions of
// dtype_convert.h (e4m3 saturates at +-448; e5m2 widens exactly, inf and NaN included);
// f64 -> f32 is static_cast, and f64 to a narrower type rounds once (through fp32 rounded
// to odd, so there is no double rounding).
// src and dst may be unaligned and must not overlap. Runs in parallel over fixed chunks,
// so the result never depends on scheduling. Any other pair throws Error(unsupported).
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n);
// Element i of src (of type dt: f64, f32, bf16, f16, f8_e4m3, f8_e5m2) as fp32; others throw.
float load_as_f32(const void* src, DType dt, std::size_t i);

}  // namespace zo2
