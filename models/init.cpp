#include "models/init.h"

#include "models/config.h"

#include "runtime/element.h"
#include "runtime/error.h"
#include "runtime/philox.h"
#include "zo/tensor_key.h"

#include <oneapi/tbb/parallel_for.h>

#include <algorithm>

namespace zo2 {
namespace {

enum class Kind { matrix, ones, zeros };

Kind kind_of(std::string_view name, int ndim) {
  if (ndim >= 2) return Kind::matrix;
  const bool weight = name.size() >= 7 && name.substr(name.size() - 7) == ".weight";
  return weight ? Kind::ones : Kind::zeros;  // norm weights; biases
}

}  // namespace

float init_value(std::string_view name, int ndim, std::uint64_t seed, std::int64_t index, float norm) {
  switch (kind_of(name, ndim)) {
    case Kind::ones: return norm;
    case Kind::zeros: return 0.0f;
    default:
      return kInitStd * noise_normal(seed, tensor_key(name), static_cast<std::uint64_t>(index));
  }
}

float init_norm_value(const ModelConfig& config) { return config.gemma3() ? 0.0f : 1.0f; }

void fill_init(std::string_view name, int ndim, std::int64_t numel, std::uint64_t seed, DType dtype,
               std::span<std::byte> out, float norm) {
  fill_init_range(name, ndim, 0, numel, seed, dtype, out, norm);
}

void fill_init_range(std::string_view name, int ndim, std::int64_t first, std::int64_t count, std::uint64_t seed,
                     DType dtype, std::span<std::byte> out, float norm) {
  if (!(dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::f16))
    fail(ErrorKind::unsupported, "init writes fp32, bf16 or fp16, not {}", dtype_name(dtype));
  if (first < 0 || count < 0 || out.size() < static_cast<std::size_t>(count) * dtype_size(dtype))
    fail(ErrorKind::internal, "fill_init: output too small for {}", name);
  if (count == 0) return;
  const Kind kind = kind_of(name, ndim);
  const std::uint64_t key = tensor_key(name);
  void* dst = out.data();
  // Element i's normal is lane i % 4 of Philox group i / 4, wherever the range starts.
  const std::int64_t end = first + count, q0 = first / 4, groups = (end + 3) / 4 - q0;
  tbb::parallel_for(tbb::blocked_range<std::int64_t>(0, groups, 4096),
                    [&](const tbb::blocked_range<std::int64_t>& r) {
                      for (std::int64_t g = r.begin(); g != r.end(); ++g) {
                        const std::int64_t q = q0 + g;
                        Normal4 z{};
                        if (kind == Kind::matrix) z = noise_normal4(seed, key, static_cast<std::uint64_t>(q));
                        for (std::int64_t i = std::max(first, q * 4); i < std::min(end, q * 4 + 4); ++i) {
                          const float v = kind == Kind::matrix ? kInitStd * z.v[i - q * 4]
                                          : kind == Kind::ones ? norm
                                                               : 0.0f;
                          store_element(dst, dtype, i - first, v);
                        }
                      }
                    });
}

}  // namespace zo2
