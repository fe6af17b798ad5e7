// The block image (DESIGN.md §4): each transformer block is ONE contiguous buffer holding
// its tensors in the storage dtype, each at a 256-byte aligned offset (fp8 tensors are
// followed by their per-row fp32 scales). Everything outside the blocks forms the globals
// image. Host images, device slots and the globals on the device share the layout, so an
// upload or an offload is one copy.
//
// The table of (name, dtype, shape, offset, scale offset) lives beside the image in an
// ImageLayout rather than inside it: every block of a model shares one layout up to the
// layer number, and no kernel parses a table, so carrying it through PCIe would only cost.
#pragma once
#include "models/config.h"
#include "runtime/dtype.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace zo2 {

// What a tensor is for, independent of the family's naming.
enum class Role : std::uint8_t {
  // blocks
  q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b,
  attn_norm_w, attn_norm_b,   // OPT self_attn_layer_norm, LLaMA input_layernorm
  mlp_norm_w, mlp_norm_b,     // OPT final_layer_norm (in a block), LLaMA post_attention_layernorm
  fc1_w, fc1_b, fc2_w, fc2_b, // OPT MLP
  gate_w, gate_b, up_w, up_b, down_w, down_b,  // LLaMA MLP
  q_norm_w, k_norm_w,         // Qwen3 per-head RMSNorms of q and k ([head_dim])
  post_attn_norm_w, post_mlp_norm_w,  // Gemma 3 post_attention_ / post_feedforward_layernorm
  // globals
  embed_tokens, embed_positions, project_in, project_out, final_norm_w, final_norm_b, lm_head,
  count_
};
inline constexpr std::size_t kRoleCount = static_cast<std::size_t>(Role::count_);

struct TensorSlot {
  Role role;
  std::string name;            // full Hugging Face name, e.g. model.decoder.layers.3.fc1.weight
  DType dtype;                 // storage dtype of this tensor in the image
  std::int64_t rows = 1;       // 1-D tensors: rows = 1
  std::int64_t cols = 0;
  int ndim = 2;
  std::size_t offset = 0;      // bytes from the image start
  std::size_t scale_offset = 0;  // fp8 only: the rows fp32 scales
  std::size_t bytes = 0;       // data bytes (without scales)

  std::int64_t numel() const { return rows * cols; }
  bool has_scales() const { return dtype == DType::f8_e4m3; }
  std::vector<std::int64_t> shape() const {
    return ndim == 1 ? std::vector<std::int64_t>{cols} : std::vector<std::int64_t>{rows, cols};
  }
};

class ImageLayout {
 public:
  const std::vector<TensorSlot>& tensors() const { return tensors_; }
  std::size_t bytes() const { return bytes_; }
  const TensorSlot* find(Role role) const;
  const TensorSlot& at(Role role) const;
  const TensorSlot* find(const std::string& name) const;
  std::int64_t params() const;

  // Appends a tensor at the next aligned offset.
  void add(Role role, std::string name, std::vector<std::int64_t> shape, DType dtype);

 private:
  std::vector<TensorSlot> tensors_;
  std::array<int, kRoleCount> index_{};  // role -> position + 1 (0 = absent)
  std::size_t bytes_ = 0;
};

// The dtype a tensor is stored in for a requested storage dtype: 1-D tensors (biases,
// norm weights) stay at bf16 when fp8 is asked for, since a per-row scale would give a
// whole bias vector one exponent.
DType slot_dtype(DType storage, int ndim);

// Block i of the model, with tensor names as Hugging Face writes them.
ImageLayout block_layout(const ModelConfig& c, std::int64_t layer, DType storage);
ImageLayout globals_layout(const ModelConfig& c, DType storage);
// Host bytes of the model's images: the globals plus `block_images` block images (every
// block, or one when blocks share an image) — what the host block store allocates.
std::size_t host_image_bytes(const ModelConfig& c, DType storage, std::int64_t block_images);

// The name prefix of block i ("model.decoder.layers.3." / "model.layers.3.").
std::string block_prefix(const ModelConfig& c, std::int64_t layer);

// Every tensor name of the model in checkpoint order (globals first, then blocks),
// with its shape: what `init` writes and `save` must produce.
struct NamedShape {
  std::string name;
  std::vector<std::int64_t> shape;
};
std::vector<NamedShape> checkpoint_tensors(const ModelConfig& c);

// The bytes a checkpoint of `c` saved as `dtype` takes on disk, sharded above shard_bytes
// (0: one file) (Note [Room for a save] in runtime/file_util.h): the tensors' data, and a
// bound on the rest — each tensor's header and index entry (its name twice and 192 bytes),
// each file's last block and config.json (64 KiB each).
std::uint64_t checkpoint_file_bytes(const ModelConfig& c, DType dtype, std::uint64_t shard_bytes);
// The same bound for a safetensors file of `tensors` tensors whose names take `name_bytes`
// in all and whose data takes `data_bytes`: what its header and last block add.
std::uint64_t safetensors_file_bytes(std::uint64_t data_bytes, std::uint64_t tensors, std::uint64_t name_bytes);

}  // namespace zo2
