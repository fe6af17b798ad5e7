// A model's architecture as zo2 runs it, read from (and written as) a Hugging Face
// config.json. Two families: OPT and LLaMA (DESIGN.md §7); Qwen2/Qwen2.5, Qwen3 and
// Mistral are LLaMA-family variants (model_type "qwen2", "qwen3", "mistral") told apart by
// feature flags (Note [LLaMA-family variants] in config.cpp). Anything zo2 cannot run is
// refused when the config is read, with a message naming the field and its value.
#pragma once
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace zo2 {

enum class ModelFamily { opt, llama };

enum class RopeType { none, default_, linear, llama3 };

struct RopeConfig {
  RopeType type = RopeType::none;  // none: the family has no rotary embedding (OPT)
  double theta = 10000.0;
  double factor = 1.0;                    // linear, llama3
  double low_freq_factor = 1.0;           // llama3
  double high_freq_factor = 4.0;          // llama3
  std::int64_t original_max_positions = 8192;  // llama3
};

struct ModelConfig {
  ModelFamily family = ModelFamily::opt;
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t ffn_dim = 0;          // OPT ffn_dim, LLaMA intermediate_size
  std::int64_t max_positions = 0;    // max_position_embeddings
  bool tie_word_embeddings = true;
  float norm_eps = 1e-5f;            // OPT LayerNorm eps (1e-5), LLaMA rms_norm_eps

  // OPT
  bool pre_layer_norm = true;        // do_layer_norm_before
  bool final_layer_norm = true;      // pre-LN and not _remove_final_layer_norm
  std::int64_t word_embed_proj_dim = 0;  // == hidden_size unless project_in/out exist
  bool linear_bias = true;           // OPT enable_bias
  // LLaMA
  bool attention_bias = false;
  bool mlp_bias = false;
  RopeConfig rope;
  // LLaMA-family variants (Note [LLaMA-family variants]).
  std::string model_type = "llama";  // llama | qwen2 | qwen3 | mistral (OPT: "opt")
  bool qkv_bias = false;             // Qwen2: biases on q/k/v only (not o_proj, not the MLP)
  bool qk_norm = false;              // Qwen3: RMSNorm q_norm/k_norm [head_dim] on each head before RoPE
  // Sliding-window attention (Mistral, Qwen2/3 use_sliding_window): a query at position i
  // sees keys j with i − sliding_window < j ≤ i in the layers that slide; 0 = none.
  std::int64_t sliding_window = 0;
  // Which layers slide (num_layers entries) when sliding_window > 0; empty = every layer.
  // Gemma 3 keeps it (its local layers) even without a window: they take rope_local.
  std::vector<bool> sliding_layers;
  // Gemma 3 text (model_type "gemma3_text", Note [Gemma 3] in config.cpp): (1 + w) RMSNorms,
  // embeddings × √hidden, GELU-tanh MLP, post-attention and pre/post-feed-forward norms,
  // q/k norms, local layers (sliding_layers) with their own rotary embedding.
  double query_pre_attn_scalar = 0;  // attention scale query_pre_attn_scalar^-0.5 (0: head_dim)
  RopeConfig rope_local;             // the local layers' rotary embedding (rope_local_base_freq)
  // Soft-capping (Gemma 3's attn_logit_softcapping / final_logit_softcapping, null in its
  // checkpoints): x → cap·tanh(x / cap) on the scaled attention scores before the mask, and
  // on the logits before the loss. 0 = none.
  float attn_softcap = 0;
  float final_softcap = 0;

  // Note [Quantized checkpoints] (models/checkpoint.cpp): quantization_config.quant_method
  // "fp8" (transformers' FineGrainedFP8, the format of Qwen3-*-FP8 and DeepSeek-V3): the
  // checkpoint's F8_E4M3 weights each carry a `<name>_scale_inv` tensor, one fp32 scale per
  // block of fp8_block_rows × fp8_block_cols elements; they are dequantized at load (the
  // saved checkpoint is plain, without quantization_config). 0: not quantized.
  std::int64_t fp8_block_rows = 0, fp8_block_cols = 0;
  bool fp8_quantized() const { return fp8_block_rows > 0; }

  std::optional<std::int64_t> bos_token_id, eos_token_id, pad_token_id;
  std::string torch_dtype = "float32";
  // The config.json this came from (written back on save with updated fields).
  nlohmann::json source;

  // `where` names the file in error messages.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& where = "config.json");
  static ModelConfig load(const std::filesystem::path& model_dir);
  // A complete HF config.json for this architecture (the source's other fields kept).
  nlohmann::json to_json() const;

  bool has_projections() const { return word_embed_proj_dim != hidden_size; }
  std::int64_t q_dim() const { return num_heads * head_dim; }
  std::int64_t kv_dim() const { return num_kv_heads * head_dim; }
  // Rows of OPT's learned position table (max_positions + 2, offset 2).
  std::int64_t position_rows() const { return max_positions + 2; }
  // Parameter counts (the tied head counted once).
  std::int64_t block_params() const;
  std::int64_t global_params() const;
  std::int64_t total_params() const { return global_params() + num_layers * block_params(); }
  // The rotary inverse frequencies (head_dim / 2 of them), scaling applied, as
  // transformers computes them.
  std::vector<float> rope_inv_freq() const;
  bool gemma3() const { return family == ModelFamily::llama && model_type == "gemma3_text"; }
  // Gemma 3: block `layer` is a local (sliding_attention) layer, with rope_local.
  bool local_layer(std::int64_t layer) const {
    return gemma3() && layer >= 0 && layer < static_cast<std::int64_t>(sliding_layers.size()) &&
           sliding_layers[static_cast<std::size_t>(layer)];
  }
  // The softmax scale of the attention scores: query_pre_attn_scalar^-0.5 or head_dim^-0.5.
  float attention_scale() const {
    const double d = query_pre_attn_scalar > 0 ? query_pre_attn_scalar : static_cast<double>(head_dim);
    return static_cast<float>(1.0 / std::sqrt(d));
  }
  // Gemma 3's embedding scale √hidden_size (the caller rounds it to the compute dtype).
  float embed_scale() const { return static_cast<float>(std::sqrt(static_cast<double>(hidden_size))); }
  // The rotary inverse frequencies of `r` (rope_inv_freq() is the global ones).
  std::vector<float> rope_inv_freq(const RopeConfig& r) const;
  std::string family_name() const { return family == ModelFamily::opt ? "opt" : model_type; }
  // The attention window of block `layer` (0 = full causal attention).
  std::int64_t attention_window(std::int64_t layer) const {
    if (sliding_window <= 0) return 0;
    if (sliding_layers.empty()) return sliding_window;
    return layer >= 0 && layer < static_cast<std::int64_t>(sliding_layers.size()) &&
                   sliding_layers[static_cast<std::size_t>(layer)]
               ? sliding_window
               : 0;
  }
  // Gemma 3's fields of to_json().
  void write_gemma3(nlohmann::json& j) const;
  // The transformers class of this config ("LlamaForCausalLM", "Qwen2ForCausalLM", …).
  std::string architecture() const;
  // Throws Error(unsupported / format) naming the field when the values are inconsistent.
  void validate(const std::string& where) const;
  // Each size within zo2's range and the whole model's bytes addressable without overflow
  // (Note [Sizes from config.json]); part of validate().
  void check_sizes(const std::string& where) const;
};

}  // namespace zo2
