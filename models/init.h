// Initial values of a random checkpoint (`zo2-tune init`, synthetic benchmark weights):
// matrices N(0, 0.02²) drawn from Philox with the init seed and the tensor's key, norm
// weights 1 (0 for Gemma's (1 + w) norms, as transformers initializes them: `norm` is the
// value norm weights get), biases 0 — the same values whether written to disk or made in
// memory.
#pragma once
#include "runtime/dtype.h"

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace zo2 {

inline constexpr float kInitStd = 0.02f;

// Element i's initial value for tensor `name` with `ndim` dimensions.
float init_value(std::string_view name, int ndim, std::uint64_t seed, std::int64_t index, float norm = 1.0f);
// Fills `out` with numel values of dtype fp32, bf16 or fp16 (in parallel).
void fill_init(std::string_view name, int ndim, std::int64_t numel, std::uint64_t seed, DType dtype,
               std::span<std::byte> out, float norm = 1.0f);
// The same for elements [first, first + count) of the tensor only (a piece of a save): out[k]
// is element first + k, the value the whole tensor's fill gives it.
void fill_init_range(std::string_view name, int ndim, std::int64_t first, std::int64_t count, std::uint64_t seed,
                     DType dtype, std::span<std::byte> out, float norm = 1.0f);
// The value a config's norm weights start at: 0 for Gemma 3 ((1 + w) RMSNorms), else 1.
struct ModelConfig;
float init_norm_value(const ModelConfig& config);

}  // namespace zo2
