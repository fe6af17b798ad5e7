#include "models/layout.h"

#include "runtime/common.h"
#include "runtime/error.h"

#include <fmt/format.h>

namespace zo2 {

const TensorSlot* ImageLayout::find(Role role) const {
  const int i = index_[static_cast<std::size_t>(role)];
  return i == 0 ? nullptr : &tensors_[static_cast<std::size_t>(i - 1)];
}

const TensorSlot& ImageLayout::at(Role role) const {
  const TensorSlot* s = find(role);
  if (!s) fail(ErrorKind::internal, "image layout has no tensor of role {}", static_cast<int>(role));
  return *s;
}

const TensorSlot* ImageLayout::find(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

std::int64_t ImageLayout::params() const {
  std::int64_t n = 0;
  for (const auto& t : tensors_) n += t.numel();
  return n;
}

void ImageLayout::add(Role role, std::string name, std::vector<std::int64_t> shape, DType dtype) {
  TensorSlot s;
  s.role = role;
  s.name = std::move(name);
  s.ndim = static_cast<int>(shape.size());
  if (s.ndim == 1) {
    s.rows = 1;
    s.cols = shape[0];
  } else {
    ZO2_CHECK(s.ndim == 2);
    s.rows = shape[0];
    s.cols = shape[1];
  }
  s.dtype = dtype;
  s.bytes = static_cast<std::size_t>(s.numel()) * dtype_size(dtype);
  s.offset = bytes_;
  bytes_ = align_up(bytes_ + s.bytes);
  if (s.has_scales()) {
    s.scale_offset = bytes_;
    bytes_ = align_up(bytes_ + static_cast<std::size_t>(s.rows) * sizeof(float));
  }
  index_[static_cast<std::size_t>(role)] = static_cast<int>(tensors_.size()) + 1;
  tensors_.push_back(std::move(s));
}

DType slot_dtype(DType storage, int ndim) {
  if (storage == DType::f8_e4m3 && ndim == 1) return DType::bf16;
  return storage;
}

std::string block_prefix(const ModelConfig& c, std::int64_t layer) {
  return c.family == ModelFamily::opt ? fmt::format("model.decoder.layers.{}.", layer)
                                      : fmt::format("model.layers.{}.", layer);
}

namespace {

void add_tensor(ImageLayout& l, Role role, std::string name, std::vector<std::int64_t> shape,
                DType storage) {
  const DType dt = slot_dtype(storage, static_cast<int>(shape.size()));
  l.add(role, std::move(name), std::move(shape), dt);
}

}  // namespace

ImageLayout block_layout(const ModelConfig& c, std::int64_t layer, DType storage) {
  ImageLayout l;
  const std::string p = block_prefix(c, layer);
  const std::int64_t h = c.hidden_size;
  auto add = [&](Role role, const std::string& local, std::vector<std::int64_t> shape) {
    add_tensor(l, role, p + local, std::move(shape), storage);
  };
  if (c.family == ModelFamily::opt) {
    const bool b = c.linear_bias;
    add(Role::attn_norm_w, "self_attn_layer_norm.weight", {h});
    add(Role::attn_norm_b, "self_attn_layer_norm.bias", {h});
    add(Role::q_w, "self_attn.q_proj.weight", {h, h});
    if (b) add(Role::q_b, "self_attn.q_proj.bias", {h});
    add(Role::k_w, "self_attn.k_proj.weight", {h, h});
    if (b) add(Role::k_b, "self_attn.k_proj.bias", {h});
    add(Role::v_w, "self_attn.v_proj.weight", {h, h});
    if (b) add(Role::v_b, "self_attn.v_proj.bias", {h});
    add(Role::o_w, "self_attn.out_proj.weight", {h, h});
    if (b) add(Role::o_b, "self_attn.out_proj.bias", {h});
    add(Role::mlp_norm_w, "final_layer_norm.weight", {h});
    add(Role::mlp_norm_b, "final_layer_norm.bias", {h});
    add(Role::fc1_w, "fc1.weight", {c.ffn_dim, h});
    if (b) add(Role::fc1_b, "fc1.bias", {c.ffn_dim});
    add(Role::fc2_w, "fc2.weight", {h, c.ffn_dim});
    if (b) add(Role::fc2_b, "fc2.bias", {h});
  } else {
    const bool ab = c.attention_bias, mb = c.mlp_bias;
    const bool qkv = ab || c.qkv_bias;  // Qwen2: q/k/v biases without o_proj's
    add(Role::attn_norm_w, "input_layernorm.weight", {h});
    add(Role::q_w, "self_attn.q_proj.weight", {c.q_dim(), h});
    if (qkv) add(Role::q_b, "self_attn.q_proj.bias", {c.q_dim()});
    add(Role::k_w, "self_attn.k_proj.weight", {c.kv_dim(), h});
    if (qkv) add(Role::k_b, "self_attn.k_proj.bias", {c.kv_dim()});
    add(Role::v_w, "self_attn.v_proj.weight", {c.kv_dim(), h});
    if (qkv) add(Role::v_b, "self_attn.v_proj.bias", {c.kv_dim()});
    if (c.qk_norm) {
      add(Role::q_norm_w, "self_attn.q_norm.weight", {c.head_dim});
      add(Role::k_norm_w, "self_attn.k_norm.weight", {c.head_dim});
    }
    add(Role::o_w, "self_attn.o_proj.weight", {h, c.q_dim()});
    if (ab) add(Role::o_b, "self_attn.o_proj.bias", {h});
    if (c.gemma3()) {  // Note [Gemma 3]: norms after attention and around the MLP
      add(Role::post_attn_norm_w, "post_attention_layernorm.weight", {h});
      add(Role::mlp_norm_w, "pre_feedforward_layernorm.weight", {h});
      add(Role::post_mlp_norm_w, "post_feedforward_layernorm.weight", {h});
    } else {
      add(Role::mlp_norm_w, "post_attention_layernorm.weight", {h});
    }
    add(Role::gate_w, "mlp.gate_proj.weight", {c.ffn_dim, h});
    if (mb) add(Role::gate_b, "mlp.gate_proj.bias", {c.ffn_dim});
    add(Role::up_w, "mlp.up_proj.weight", {c.ffn_dim, h});
    if (mb) add(Role::up_b, "mlp.up_proj.bias", {c.ffn_dim});
    add(Role::down_w, "mlp.down_proj.weight", {h, c.ffn_dim});
    if (mb) add(Role::down_b, "mlp.down_proj.bias", {h});
  }
  return l;
}

std::size_t host_image_bytes(const ModelConfig& c, DType storage, std::int64_t block_images) {
  const std::size_t block = c.num_layers > 0 ? block_layout(c, 0, storage).bytes() : 0;
  return globals_layout(c, storage).bytes() + static_cast<std::size_t>(block_images) * block;
}

ImageLayout globals_layout(const ModelConfig& c, DType storage) {
  ImageLayout l;
  const std::int64_t h = c.hidden_size, w = c.word_embed_proj_dim;
  auto add = [&](Role role, const std::string& name, std::vector<std::int64_t> shape) {
    add_tensor(l, role, name, std::move(shape), storage);
  };
  if (c.family == ModelFamily::opt) {
    add(Role::embed_tokens, "model.decoder.embed_tokens.weight", {c.vocab_size, w});
    add(Role::embed_positions, "model.decoder.embed_positions.weight", {c.position_rows(), h});
    if (c.has_projections()) {
      add(Role::project_in, "model.decoder.project_in.weight", {h, w});
      add(Role::project_out, "model.decoder.project_out.weight", {w, h});
    }
    if (c.final_layer_norm) {
      add(Role::final_norm_w, "model.decoder.final_layer_norm.weight", {h});
      add(Role::final_norm_b, "model.decoder.final_layer_norm.bias", {h});
    }
  } else {
    add(Role::embed_tokens, "model.embed_tokens.weight", {c.vocab_size, h});
    add(Role::final_norm_w, "model.norm.weight", {h});
  }
  if (!c.tie_word_embeddings) add(Role::lm_head, "lm_head.weight", {c.vocab_size, w});
  return l;
}

std::vector<NamedShape> checkpoint_tensors(const ModelConfig& c) {
  std::vector<NamedShape> out;
  const ImageLayout globals = globals_layout(c, DType::f32);
  for (const auto& t : globals.tensors()) out.push_back({t.name, t.shape()});
  for (std::int64_t i = 0; i < c.num_layers; ++i) {
    const ImageLayout block = block_layout(c, i, DType::f32);
    for (const auto& t : block.tensors()) out.push_back({t.name, t.shape()});
  }
  return out;
}

std::uint64_t safetensors_file_bytes(std::uint64_t data_bytes, std::uint64_t tensors, std::uint64_t name_bytes) {
  constexpr std::uint64_t kFileSlack = 64 << 10;  // the last block, the 8-byte length, metadata
  return data_bytes + 2 * name_bytes + 192 * tensors + kFileSlack;
}

std::uint64_t checkpoint_file_bytes(const ModelConfig& c, DType dtype, std::uint64_t shard_bytes) {
  std::uint64_t data = 0, names = 0, count = 0;
  for (const NamedShape& t : checkpoint_tensors(c)) {
    std::uint64_t numel = 1;
    for (const std::int64_t d : t.shape) numel *= static_cast<std::uint64_t>(d);
    data += numel * dtype_size(dtype);
    names += t.name.size();
    ++count;
  }
  // Greedy sharding starts a new shard only when the next tensor would overflow the current
  // one: at most 2 × data / shard_bytes + 1 shards, each with a last block of its own.
  const std::uint64_t shards = shard_bytes == 0 || data <= shard_bytes ? 1 : 2 * (data / shard_bytes) + 1;
  return safetensors_file_bytes(data, count, names) + (shards - 1) * (64 << 10) + (64 << 10);  // + config.json
}

}  // namespace zo2
