// Tensor keys (DESIGN.md §4): a stable 64-bit id per tensor, the FNV-1a hash of its
// Hugging Face name. Noise is drawn from (step seed, tensor key, element index), so z
// never depends on placement, execution order, or which blocks are resident.
#pragma once
#include <cstdint>
#include <string_view>

namespace zo2 {

constexpr std::uint64_t tensor_key(std::string_view hf_name) {
  std::uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a 64 offset basis
  for (char c : hf_name) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;  // FNV prime
  }
  return h;
}

// MeZO's rule: weight decay applies to matrices (linear weights, embeddings), never to
// biases or norm weights, which are the 1-D tensors.
constexpr bool uses_weight_decay(int ndim) { return ndim >= 2; }

}  // namespace zo2
