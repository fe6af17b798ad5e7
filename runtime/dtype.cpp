#include "runtime/dtype.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstring>
#include <string>

#include <tbb/parallel_for.h>

#include "runtime/dtype_convert.h"
#include "runtime/error.h"

namespace zo2 {
namespace {

struct DTypeInfo {
  DType dt;
  std::size_t size;
  std::string_view name;
  std::string_view st_name;
};

constexpr std::array<DTypeInfo, 15> kInfo{{
    {DType::f32, 4, "fp32", "F32"},
    {DType::bf16, 2, "bf16", "BF16"},
    {DType::f16, 2, "fp16", "F16"},
    {DType::f8_e4m3, 1, "fp8", "F8_E4M3"},
    {DType::f8_e5m2, 1, "fp8_e5m2", "F8_E5M2"},
    {DType::f64, 8, "fp64", "F64"},
    {DType::i64, 8, "i64", "I64"},
    {DType::i32, 4, "i32", "I32"},
    {DType::i16, 2, "i16", "I16"},
    {DType::i8, 1, "i8", "I8"},
    {DType::u64, 8, "u64", "U64"},
    {DType::u32, 4, "u32", "U32"},
    {DType::u16, 2, "u16", "U16"},
    {DType::u8, 1, "u8", "U8"},
    {DType::boolean, 1, "bool", "BOOL"},
}};

const DTypeInfo& info(DType dt) { return kInfo[static_cast<std::size_t>(dt)]; }

}  // namespace

std::size_t dtype_size(DType dt) { return info(dt).size; }
std::string_view dtype_name(DType dt) { return info(dt).name; }
std::string_view dtype_safetensors_name(DType dt) { return info(dt).st_name; }

std::optional<DType> dtype_from_safetensors_name(std::string_view name) {
  for (const auto& i : kInfo)
    if (i.st_name == name) return i.dt;
  return std::nullopt;
}

std::optional<DType> dtype_from_name(std::string_view name) {
  std::string s(name);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s == "fp32" || s == "f32" || s == "float32" || s == "float") return DType::f32;
  if (s == "bf16" || s == "bfloat16") return DType::bf16;
  if (s == "fp16" || s == "f16" || s == "float16" || s == "half") return DType::f16;
  if (s == "fp8" || s == "fp8_e4m3" || s == "f8_e4m3" || s == "e4m3" || s == "float8_e4m3fn")
    return DType::f8_e4m3;
  for (const auto& i : kInfo)
    if (i.name == s) return i.dt;
  return std::nullopt;
}

bool dtype_is_float(DType dt) {
  switch (dt) {
    case DType::f32: case DType::bf16: case DType::f16: case DType::f8_e4m3:
    case DType::f8_e5m2: case DType::f64:
      return true;
    default:
      return false;
  }
}

bool dtype_is_storage(DType dt) {
  return dt == DType::f32 || dt == DType::bf16 || dt == DType::f16 || dt == DType::f8_e4m3;
}

// ------------------------------------------------------------------ bulk conversion

namespace {

template <class T>
T load_elem(const unsigned char* p, std::size_t i) {
  T v;
  std::memcpy(&v, p + i * sizeof(T), sizeof(T));
  return v;
}

template <class T>
void store_elem(unsigned char* p, std::size_t i, T v) {
  std::memcpy(p + i * sizeof(T), &v, sizeof(T));
}

// f64 -> f32 rounded to odd: the exact value if representable, else whichever of the two
// fp32 neighbours has an odd bit pattern (+-FLT_MAX beyond the range, +-min subnormal
// below it). Rounding that result to nearest-even into a format with at least 2 fewer
// significant bits gives the correctly rounded f64 -> narrow result (no double rounding).
float f64_to_f32_round_odd(double d) {
  const float f = static_cast<float>(d);
  if (std::isnan(d) || static_cast<double>(f) == d) return f;
  std::uint32_t b = f32_bits(f);
  if ((b & 1u) == 0) b = std::fabs(static_cast<double>(f)) > std::fabs(d) ? b - 1 : b + 1;
  return f32_from_bits(b);
}

// Element i of a source of type S (not f64) as fp32, exactly.
template <DType S>
float decode(const unsigned char* p, std::size_t i) {
  if constexpr (S == DType::f32) return load_elem<float>(p, i);
  if constexpr (S == DType::bf16) return bf16_to_f32(load_elem<std::uint16_t>(p, i));
  if constexpr (S == DType::f16) return f16_to_f32(load_elem<std::uint16_t>(p, i));
  if constexpr (S == DType::f8_e4m3) return e4m3_to_f32(p[i]);
  if constexpr (S == DType::f8_e5m2) return e5m2_to_f32(p[i]);
}

// Stores fp32 x as element i of a destination of type D (not f64), rounding to nearest.
template <DType D>
void encode(unsigned char* p, std::size_t i, float x) {
  if constexpr (D == DType::f32) store_elem<float>(p, i, x);
  if constexpr (D == DType::bf16) store_elem<std::uint16_t>(p, i, f32_to_bf16(x));
  if constexpr (D == DType::f16) store_elem<std::uint16_t>(p, i, f32_to_f16(x));
  if constexpr (D == DType::f8_e4m3) p[i] = f32_to_e4m3(x);
}

template <DType S, DType D>
void convert_range(const unsigned char* src, unsigned char* dst, std::size_t begin,
                   std::size_t end) {
  if constexpr (S == D) {
    const std::size_t sz = dtype_size(S);
    std::memcpy(dst + begin * sz, src + begin * sz, (end - begin) * sz);
  } else if constexpr (D == DType::f64) {
    for (std::size_t i = begin; i < end; ++i)
      store_elem<double>(dst, i, static_cast<double>(decode<S>(src, i)));
  } else if constexpr (S == DType::f64) {
    for (std::size_t i = begin; i < end; ++i) {
      const double v = load_elem<double>(src, i);
      encode<D>(dst, i, D == DType::f32 ? static_cast<float>(v) : f64_to_f32_round_odd(v));
    }
  } else {
    for (std::size_t i = begin; i < end; ++i) encode<D>(dst, i, decode<S>(src, i));
  }
}

using RangeFn = void (*)(const unsigned char*, unsigned char*, std::size_t, std::size_t);

template <DType S>
RangeFn pick_dst(DType dst) {
  switch (dst) {
    case DType::f64: return &convert_range<S, DType::f64>;
    case DType::f32: return &convert_range<S, DType::f32>;
    case DType::bf16: return &convert_range<S, DType::bf16>;
    case DType::f16: return &convert_range<S, DType::f16>;
    case DType::f8_e4m3: return &convert_range<S, DType::f8_e4m3>;
    default: return nullptr;
  }
}

RangeFn pick(DType src, DType dst) {
  switch (src) {
    case DType::f64: return pick_dst<DType::f64>(dst);
    case DType::f32: return pick_dst<DType::f32>(dst);
    case DType::bf16: return pick_dst<DType::bf16>(dst);
    case DType::f16: return pick_dst<DType::f16>(dst);
    case DType::f8_e4m3: return pick_dst<DType::f8_e4m3>(dst);
    case DType::f8_e5m2: return pick_dst<DType::f8_e5m2>(dst);  // a source only
    default: return nullptr;
  }
}

// Elements per parallel task; fixed, so the partition never depends on the scheduler.
constexpr std::size_t kConvertChunk = std::size_t{1} << 16;

}  // namespace

void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n) {
  const RangeFn fn = pick(src_dtype, dst_dtype);
  if (fn == nullptr)
    fail(ErrorKind::unsupported, "no conversion from {} to {}", dtype_name(src_dtype),
         dtype_name(dst_dtype));
  if (n == 0) return;
  const auto* s = static_cast<const unsigned char*>(src);
  auto* d = static_cast<unsigned char*>(dst);
  const std::size_t chunks = (n + kConvertChunk - 1) / kConvertChunk;
  if (chunks == 1) {
    fn(s, d, 0, n);
    return;
  }
  tbb::parallel_for(std::size_t{0}, chunks, [&](std::size_t c) {
    const std::size_t begin = c * kConvertChunk;
    fn(s, d, begin, std::min(n, begin + kConvertChunk));
  });
}

float load_as_f32(const void* src, DType dt, std::size_t i) {
  const auto* p = static_cast<const unsigned char*>(src);
  switch (dt) {
    case DType::f64: return static_cast<float>(load_elem<double>(p, i));
    case DType::f32: return decode<DType::f32>(p, i);
    case DType::bf16: return decode<DType::bf16>(p, i);
    case DType::f16: return decode<DType::f16>(p, i);
    case DType::f8_e4m3: return decode<DType::f8_e4m3>(p, i);
    case DType::f8_e5m2: return decode<DType::f8_e5m2>(p, i);
    default:
      fail(ErrorKind::unsupported, "cannot load {} as fp32", dtype_name(dt));
  }
}

}  // namespace zo2
