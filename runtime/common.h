// Small definitions every layer shares: the host/device function marker and integer helpers.
#pragma once
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define ZO2_HD __host__ __device__ __forceinline__
#else
#define ZO2_HD inline
#endif

namespace zo2 {

// Every tensor inside a block image, every device allocation and every host image is
// aligned to this many bytes (DESIGN.md §4): enough for any vector load and for cuBLAS.
inline constexpr std::size_t kAlignment = 256;

constexpr std::size_t align_up(std::size_t n, std::size_t a = kAlignment) {
  return (n + a - 1) / a * a;
}
constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace zo2
