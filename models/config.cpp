#include "models/config.h"

#include "runtime/error.h"
#include "runtime/json_file.h"

#include <algorithm>
#include <climits>
#include <charconv>
#include <cmath>
#include <fstream>
#include <limits>
#include <string_view>

namespace zo2 {
namespace {

using json = nlohmann::json;

constexpr const char* kModelTypes =
    "\"opt\", \"llama\", \"qwen2\", \"qwen3\", \"mistral\" and \"gemma3_text\"";

// Typed field access with errors that name the file, the field and the value.
struct Reader {
  const json& j;
  const std::string& where;

  bool has(const char* key) const { return j.contains(key) && !j.at(key).is_null(); }

  std::int64_t integer(const char* key) const {
    if (!has(key)) fail(ErrorKind::format, "{}: required field '{}' is missing", where, key);
    return integer_at(j.at(key), key);
  }
  std::int64_t integer_or(const char* key, std::int64_t fallback) const {
    return has(key) ? integer_at(j.at(key), key) : fallback;
  }
  std::int64_t integer_at(const json& v, const std::string& key) const {
    if (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX))
      fail(ErrorKind::format, "{}: field '{}' = {} is too large", where, key, v.dump());
    if (v.is_number_integer()) return v.get<std::int64_t>();
    if (v.is_number_float()) {
      const double d = v.get<double>();
      // In range first: converting a double beyond int64 (2e23) is undefined behaviour.
      if (d == std::floor(d) && d >= -0x1p63 && d < 0x1p63) return static_cast<std::int64_t>(d);
    }
    fail(ErrorKind::format, "{}: field '{}' must be an integer, got {}", where, key, v.dump());
  }
  double number_or(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    return number_at(j.at(key), key);
  }
  double number_at(const json& v, const std::string& key) const {
    if (!v.is_number())
      fail(ErrorKind::format, "{}: field '{}' must be a number, got {}", where, key, v.dump());
    return v.get<double>();
  }
  bool boolean_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = j.at(key);
    if (!v.is_boolean())
      fail(ErrorKind::format, "{}: field '{}' must be true or false, got {}", where, key, v.dump());
    return v.get<bool>();
  }
  std::string string_or(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = j.at(key);
    if (!v.is_string())
      fail(ErrorKind::format, "{}: field '{}' must be a string, got {}", where, key, v.dump());
    return v.get<std::string>();
  }
  // Token ids may be an integer or a list (eos_token_id: [128001, 128009]); the first is used.
  std::optional<std::int64_t> token_id(const char* key) const {
    if (!has(key)) return std::nullopt;
    const json& v = j.at(key);
    if (v.is_array()) {
      if (v.empty()) return std::nullopt;
      return integer_at(v.at(0), key);
    }
    return integer_at(v, key);
  }
};

// `architectures` names the head the weights carry. A classifier, tagger, QA or masked-LM
// checkpoint of a model_type zo2 runs (Qwen2ForSequenceClassification: score.weight beside
// tied embeddings) would train as a causal LM, its head ignored and left out of the save.
void check_architectures(const Reader& r) {
  if (!r.has("architectures")) return;
  const json& a = r.j.at("architectures");
  for (const json& name : a.is_array() ? a : json::array({a})) {
    if (!name.is_string()) continue;
    for (const char* head : {"ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM"})
      if (name.get<std::string>().ends_with(head))
        fail(ErrorKind::unsupported,
             "{}: field 'architectures' names '{}', which zo2 does not tune: zo2 tunes causal language models "
             "(*ForCausalLM), and the {} head would be neither trained nor saved",
             r.where, name.get<std::string>(), head + 3);
  }
}

RopeConfig read_rope(const Reader& r) {
  RopeConfig rope;
  rope.type = RopeType::default_;
  rope.theta = r.number_or("rope_theta", 10000.0);
  // transformers ≥ 5 writes `rope_parameters` (theta inside); older configs `rope_scaling`.
  // Where both are set, rope_scaling wins, unless it is empty: transformers 4 knows no
  // other, and 5 takes `rope_scaling or rope_parameters`, theta then from the top-level
  // rope_theta (PreTrainedConfig.convert_rope_params_to_dict).
  const bool scaling = r.has("rope_scaling") && !(r.j.at("rope_scaling").is_object() && r.j.at("rope_scaling").empty());
  const char* field = scaling                     ? "rope_scaling"
                      : r.has("rope_parameters") ? "rope_parameters"
                                                 : nullptr;
  auto check_theta = [&] {  // the rotary base: below 1 its frequencies grow past any float
    if (!(rope.theta >= 1 && std::isfinite(rope.theta)))
      fail(ErrorKind::format, "{}: rope_theta must be a finite number of at least 1, got {}", r.where, rope.theta);
  };
  if (!field) {
    check_theta();
    return rope;
  }
  const json& p = r.j.at(field);
  if (!p.is_object())
    fail(ErrorKind::format, "{}: field '{}' must be an object, got {}", r.where, field, p.dump());
  const Reader pr{p, r.where};
  if (pr.has("rope_theta")) rope.theta = pr.number_at(p.at("rope_theta"), std::string(field) + ".rope_theta");
  std::string type = pr.string_or("rope_type", pr.string_or("type", "default"));
  if (type == "default") {
    rope.type = RopeType::default_;
  } else if (type == "linear") {
    rope.type = RopeType::linear;
  } else if (type == "llama3") {
    rope.type = RopeType::llama3;
  } else {
    fail(ErrorKind::unsupported,
         "{}: {}.rope_type '{}' is not supported (zo2 runs default, linear and llama3)", r.where,
         field, type);
  }
  if (rope.type == RopeType::linear || rope.type == RopeType::llama3) {
    if (!pr.has("factor"))
      fail(ErrorKind::format, "{}: {}.factor is required for rope_type '{}'", r.where, field, type);
    rope.factor = pr.number_at(p.at("factor"), std::string(field) + ".factor");
    if (!(rope.factor > 0))
      fail(ErrorKind::format, "{}: {}.factor must be positive, got {}", r.where, field, rope.factor);
  }
  if (rope.type == RopeType::llama3) {
    for (const char* k : {"low_freq_factor", "high_freq_factor"})
      if (!pr.has(k))
        fail(ErrorKind::format, "{}: {}.{} is required for rope_type 'llama3'", r.where, field, k);
    rope.low_freq_factor = pr.number_or("low_freq_factor", 1.0);
    rope.high_freq_factor = pr.number_or("high_freq_factor", 4.0);
    // transformers 5 fills a missing original_max_position_embeddings with the config's
    // max_position_embeddings (standardize_rope_params).
    if (pr.has("original_max_position_embeddings")) {
      rope.original_max_positions = pr.integer("original_max_position_embeddings");
    } else if (r.has("max_position_embeddings")) {
      rope.original_max_positions = r.integer("max_position_embeddings");
    } else {
      fail(ErrorKind::format,
           "{}: {}.original_max_position_embeddings is required for rope_type 'llama3' (or max_position_embeddings, "
           "which stands in for it)",
           r.where, field);
    }
    if (rope.original_max_positions <= 0)
      fail(ErrorKind::format, "{}: {}.original_max_position_embeddings must be positive, got {}", r.where, field,
           rope.original_max_positions);
    if (!(rope.high_freq_factor > rope.low_freq_factor))
      fail(ErrorKind::format, "{}: {}.high_freq_factor ({}) must exceed low_freq_factor ({})",
           r.where, field, rope.high_freq_factor, rope.low_freq_factor);
  }
  check_theta();
  return rope;
}

// Note [Gemma 3]
//   Gemma3ForCausalLM (transformers' modeling_gemma3.py / configuration_gemma3.py, model_type
//   "gemma3_text") is LLaMA's decoder with these differences, all run by the LLaMA graph:
//   - Every RMSNorm (Gemma3RMSNorm) computes in fp32 and multiplies by (1 + weight): the
//     rmsnorm op's weight_offset 1. Stored weights are the checkpoint's w (zero-centred).
//   - The token embeddings are multiplied by √hidden_size rounded to the embedding dtype
//     (Gemma3TextScaledWordEmbedding): to the compute dtype here.
//   - The MLP is gelu_tanh(gate)·up (hidden_activation "gelu_pytorch_tanh").
//   - Four norms a layer: input_layernorm before attention, post_attention_layernorm on the
//     attention output before the residual add, pre_feedforward_layernorm before the MLP,
//     post_feedforward_layernorm on the MLP output before the residual add.
//   - q_norm/k_norm on each head before RoPE (as Qwen3, with (1 + w)).
//   - layer_types (or, before it, sliding_window_pattern P: layer i is global when
//     (i + 1) % P == 0, default 6) marks local "sliding_attention" layers: they attend
//     within sliding_window (default 4096) and rotate with rope_local_base_freq (default
//     10000, no scaling); global layers take rope_theta (default 1e6) and rope_scaling.
//     transformers ≥ 5 writes rope_parameters as {"full_attention": {...},
//     "sliding_attention": {...}}; both spellings are read and the source's written back.
//   - The attention scale is query_pre_attn_scalar^-0.5 (default 256), not head_dim^-0.5;
//     head_dim defaults to 256; attention_bias biases q, k, v and o; the head is tied by
//     default.
//   - attn_logit_softcapping and final_logit_softcapping (null in every Gemma 3 checkpoint),
//     when set, cap the scaled attention scores (before the mask) and the logits (before
//     the loss) as Gemma 2 does: x → cap·tanh(x / cap). use_bidirectional_attention is
//     refused; Gemma3ForConditionalGeneration
//     (model_type "gemma3", text_config plus a vision tower, weights under language_model.*)
//     is refused naming text_config.
void read_gemma3(const Reader& r, ModelConfig& c) {
  const json& j = r.j;
  const std::string& where = r.where;
  c.family = ModelFamily::llama;
  c.model_type = "gemma3_text";
  c.vocab_size = r.integer_or("vocab_size", 262208);
  c.hidden_size = r.integer_or("hidden_size", 2304);
  c.num_layers = r.integer_or("num_hidden_layers", 26);
  c.num_heads = r.integer_or("num_attention_heads", 8);
  c.num_kv_heads = r.integer_or("num_key_value_heads", 4);
  c.head_dim = r.integer_or("head_dim", 256);
  c.ffn_dim = r.integer_or("intermediate_size", 9216);
  c.max_positions = r.integer_or("max_position_embeddings", 131072);
  c.word_embed_proj_dim = c.hidden_size;
  c.pre_layer_norm = true;
  c.final_layer_norm = true;
  c.linear_bias = false;
  c.attention_bias = r.boolean_or("attention_bias", false);
  c.qk_norm = true;
  c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", true);
  c.norm_eps = static_cast<float>(r.number_or("rms_norm_eps", 1e-6));
  const std::string act = r.string_or("hidden_activation", "gelu_pytorch_tanh");
  if (act != "gelu_pytorch_tanh")
    fail(ErrorKind::unsupported, "{}: hidden_activation '{}' is not supported for Gemma 3 (gelu_pytorch_tanh)",
         where, act);
  for (const char* field : {"attn_logit_softcapping", "final_logit_softcapping"}) {
    if (!r.has(field)) continue;
    const double cap = r.number_or(field, 0);
    // A float: a cap beyond float's range, or below its smallest normal, is refused rather
    // than rounded to infinity or zero (no cap at all).
    if (!(cap >= static_cast<double>(std::numeric_limits<float>::min()) &&
          cap <= static_cast<double>(std::numeric_limits<float>::max())))
      fail(ErrorKind::format, "{}: field '{}' must be a positive number (or null for none), got {}", where, field,
           j.at(field).dump());
    (std::string_view(field) == "attn_logit_softcapping" ? c.attn_softcap : c.final_softcap) = static_cast<float>(cap);
  }
  if (r.boolean_or("use_bidirectional_attention", false))
    fail(ErrorKind::unsupported, "{}: field 'use_bidirectional_attention' true is not supported (causal only)", where);
  c.query_pre_attn_scalar = r.number_or("query_pre_attn_scalar", 256);
  if (!(c.query_pre_attn_scalar > 0))
    fail(ErrorKind::format, "{}: query_pre_attn_scalar must be positive, got {}", where, c.query_pre_attn_scalar);
  // Rotary embeddings: global (rope_theta, rope_scaling) and local (rope_local_base_freq).
  const bool per_type = r.has("rope_parameters") && j.at("rope_parameters").is_object() &&
                        (j.at("rope_parameters").contains("full_attention") ||
                         j.at("rope_parameters").contains("sliding_attention"));
  if (per_type) {
    json rp = j.at("rope_parameters");
    // transformers 5 (Gemma3TextConfig.convert_rope_params_to_dict) merges a set rope_scaling
    // into the global layers' parameters: rope_parameters["full_attention"].update(rope_scaling).
    if (r.has("rope_scaling")) {
      const json& scaling = j.at("rope_scaling");
      if (!scaling.is_object())
        fail(ErrorKind::format, "{}: field 'rope_scaling' must be an object, got {}", where, scaling.dump());
      if (!scaling.empty()) {
        if (!rp.contains("full_attention") || !rp.at("full_attention").is_object())
          rp["full_attention"] = json::object();
        for (const auto& [key, value] : scaling.items()) rp["full_attention"][key] = value;
      }
    }
    auto one = [&](const char* type, double theta) {
      json sub = json::object();
      if (rp.contains(type) && !rp.at(type).is_null()) sub["rope_parameters"] = rp.at(type);
      sub["rope_theta"] = theta;
      if (r.has("max_position_embeddings")) sub["max_position_embeddings"] = j.at("max_position_embeddings");
      const std::string w = std::string(where) + " (rope_parameters." + type + ")";
      return read_rope(Reader{sub, w});
    };
    c.rope = one("full_attention", r.number_or("rope_theta", 1e6));
    c.rope_local = one("sliding_attention", r.number_or("rope_local_base_freq", 10000.0));
  } else {
    json g = j;
    if (!r.has("rope_theta")) g["rope_theta"] = 1e6;
    c.rope = read_rope(Reader{g, where});
    c.rope_local = RopeConfig{};
    c.rope_local.type = RopeType::default_;
    c.rope_local.theta = r.number_or("rope_local_base_freq", 10000.0);
    if (!(c.rope_local.theta > 0))
      fail(ErrorKind::format, "{}: rope_local_base_freq must be positive, got {}", where, c.rope_local.theta);
  }
  // Sliding window and the local layers.
  if (!j.contains("sliding_window")) c.sliding_window = 4096;
  else if (j.at("sliding_window").is_null()) c.sliding_window = 0;
  else {
    c.sliding_window = r.integer("sliding_window");
    if (c.sliding_window <= 0)
      fail(ErrorKind::format, "{}: sliding_window must be positive or null, got {}", where, c.sliding_window);
  }
  if (c.num_layers < 0 || c.num_layers > (std::int64_t{1} << 16)) return;  // validate() refuses it
  c.sliding_layers.assign(static_cast<std::size_t>(c.num_layers), false);
  if (r.has("layer_types")) {
    const json& lt = j.at("layer_types");
    if (!lt.is_array() || static_cast<std::int64_t>(lt.size()) != c.num_layers)
      fail(ErrorKind::format, "{}: field 'layer_types' must be a list of num_hidden_layers ({}) strings, got {}", where,
           c.num_layers, lt.dump().substr(0, 200));
    for (std::size_t i = 0; i < lt.size(); ++i) {
      if (lt[i] == "sliding_attention") c.sliding_layers[i] = true;
      else if (lt[i] != "full_attention")
        fail(ErrorKind::unsupported,
             "{}: layer_types[{}] {} is not supported (\"full_attention\" or \"sliding_attention\")", where, i,
             lt[i].dump());
    }
  } else {
    const char* field = r.has("sliding_window_pattern") ? "sliding_window_pattern" : "_sliding_window_pattern";
    const std::int64_t pattern = r.integer_or(field, 6);
    if (pattern <= 0) fail(ErrorKind::format, "{}: {} must be positive, got {}", where, field, pattern);
    for (std::int64_t i = 0; i < c.num_layers; ++i) c.sliding_layers[static_cast<std::size_t>(i)] = (i + 1) % pattern != 0;
  }
}

}  // namespace

// Note [Quantized checkpoints] (models/checkpoint.cpp): quantization_config. Only
// transformers' "fp8" method (FineGrainedFP8Config: fmt e4m3, weight_block_size, default
// [128, 128]) is read; its activation_scheme is about the quantized model's own matmuls,
// which zo2 does not run (it computes with the dequantized weights, as transformers'
// dequantize=True does). Any other method (gptq, awq, bitsandbytes, compressed-tensors,
// mxfp4, …) stores weights zo2 cannot read as they are: refused, naming it.
namespace {
void read_quantization(const Reader& r, ModelConfig& c) {
  const std::string& where = r.where;
  if (!r.has("quantization_config")) return;
  const json& q = r.j.at("quantization_config");
  if (!q.is_object())
    fail(ErrorKind::format, "{}: field 'quantization_config' must be an object, got {}", where, q.dump());
  const json method = q.contains("quant_method") ? q.at("quant_method") : json();
  if (!method.is_string() || method.get<std::string>() != "fp8")
    fail(ErrorKind::unsupported,
         "{}: quantization_config.quant_method {} is not supported: zo2 reads unquantized checkpoints and fp8 "
         "block-quantized ones (quant_method \"fp8\", e.g. Qwen3-*-FP8); dequantize the model first",
         where, method.is_null() ? std::string("(missing)") : method.dump());
  if (q.contains("fmt") && !q.at("fmt").is_null() && q.at("fmt") != "e4m3")
    fail(ErrorKind::unsupported, "{}: quantization_config.fmt {} is not supported (e4m3)", where, q.at("fmt").dump());
  std::int64_t block[2] = {128, 128};  // FineGrainedFP8Config's default
  if (q.contains("weight_block_size") && !q.at("weight_block_size").is_null()) {
    const json& b = q.at("weight_block_size");
    auto whole = [](const json& v) {
      return v.is_number_integer() || (v.is_number_float() && std::isfinite(v.get<double>()) &&
                                       v.get<double>() == std::floor(v.get<double>()));
    };
    if (!b.is_array() || b.size() != 2 || !whole(b.at(0)) || !whole(b.at(1)) || b.at(0).get<double>() < 1 ||
        b.at(1).get<double>() < 1 || b.at(0).get<double>() > 1e9 || b.at(1).get<double>() > 1e9)
      fail(ErrorKind::format,
           "{}: quantization_config.weight_block_size must be two positive whole numbers [rows, columns], got {}",
           where, b.dump());
    block[0] = static_cast<std::int64_t>(b.at(0).get<double>());
    block[1] = static_cast<std::int64_t>(b.at(1).get<double>());
  }
  c.fp8_block_rows = block[0];
  c.fp8_block_cols = block[1];
}
}  // namespace

ModelConfig ModelConfig::from_json(const json& j, const std::string& where) {
  if (!j.is_object()) fail(ErrorKind::format, "{}: expected a JSON object", where);
  const Reader r{j, where};
  ModelConfig c;
  c.source = j;
  const std::string model_type = r.string_or("model_type", "");
  check_architectures(r);
  if (model_type == "opt") {
    c.family = ModelFamily::opt;
    c.vocab_size = r.integer("vocab_size");
    c.hidden_size = r.integer("hidden_size");
    c.num_layers = r.integer("num_hidden_layers");
    c.num_heads = r.integer("num_attention_heads");
    c.num_kv_heads = c.num_heads;
    c.ffn_dim = r.integer("ffn_dim");
    c.max_positions = r.integer("max_position_embeddings");
    c.word_embed_proj_dim = r.integer_or("word_embed_proj_dim", c.hidden_size);
    c.pre_layer_norm = r.boolean_or("do_layer_norm_before", true);
    c.final_layer_norm = c.pre_layer_norm && !r.boolean_or("_remove_final_layer_norm", false);
    c.linear_bias = r.boolean_or("enable_bias", true);
    c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", true);
    c.norm_eps = 1e-5f;
    const std::string act = r.string_or("activation_function", "relu");
    if (act != "relu")
      fail(ErrorKind::unsupported, "{}: activation_function '{}' is not supported for OPT (relu)",
           where, act);
    if (!r.boolean_or("layer_norm_elementwise_affine", true))
      fail(ErrorKind::unsupported,
           "{}: layer_norm_elementwise_affine false (LayerNorm without weights) is not supported",
           where);
    c.head_dim = c.num_heads > 0 ? c.hidden_size / c.num_heads : 0;
    if (c.num_heads > 0 && c.hidden_size % c.num_heads != 0)
      fail(ErrorKind::format, "{}: hidden_size ({}) is not divisible by num_attention_heads ({})",
           where, c.hidden_size, c.num_heads);
  } else if (model_type == "gemma3_text") {
    read_gemma3(r, c);
  } else if (model_type == "gemma3") {
    // Note [Gemma 3]: the multimodal class's text model is not a trivial reading.
    fail(ErrorKind::unsupported,
         "{}: model_type 'gemma3' (Gemma3ForConditionalGeneration) is not supported: zo2 runs the text "
         "model only (model_type \"gemma3_text\", Gemma3ForCausalLM); the field 'text_config' describes "
         "it, but its weights sit under language_model.* beside a vision tower",
         where);
  } else if (model_type == "llama" || model_type == "qwen2" || model_type == "qwen3" ||
             model_type == "mistral") {
    // Note [LLaMA-family variants]
    const bool qwen = model_type == "qwen2" || model_type == "qwen3";
    const bool mistral = model_type == "mistral";
    const std::string arch = model_type == "llama" ? "LLaMA" : model_type == "qwen2" ? "Qwen2"
                             : model_type == "qwen3" ? "Qwen3" : "Mistral";
    c.family = ModelFamily::llama;
    c.model_type = model_type;
    c.vocab_size = r.integer("vocab_size");
    c.hidden_size = r.integer("hidden_size");
    c.num_layers = r.integer("num_hidden_layers");
    c.num_heads = r.integer("num_attention_heads");
    // transformers' classes: LLaMA defaults a missing num_key_value_heads to
    // num_attention_heads; Qwen2/Qwen3 to 32 and Mistral to 8 (null: num_attention_heads).
    const std::int64_t kv_default = j.contains("num_key_value_heads") ? c.num_heads
                                    : qwen                            ? 32
                                    : mistral                         ? 8
                                                                      : c.num_heads;
    c.num_kv_heads = r.integer_or("num_key_value_heads", kv_default);
    c.ffn_dim = r.integer("intermediate_size");
    // LLaMA's is required (its class default, 2048, is rarely right); the others' class defaults.
    c.max_positions = model_type == "llama" ? r.integer("max_position_embeddings")
                      : r.integer_or("max_position_embeddings", mistral ? 4096 * 32 : 32768);
    c.word_embed_proj_dim = c.hidden_size;
    c.pre_layer_norm = true;
    c.final_layer_norm = true;
    c.linear_bias = false;
    if (model_type == "llama") {
      c.attention_bias = r.boolean_or("attention_bias", false);
      c.mlp_bias = r.boolean_or("mlp_bias", false);
    } else if (model_type == "qwen2") {
      c.qkv_bias = true;  // Qwen2Attention: q/k/v always biased, o_proj and the MLP never
    } else if (model_type == "qwen3") {
      c.attention_bias = r.boolean_or("attention_bias", false);  // q, k, v and o (Qwen3Attention)
      c.qk_norm = true;
    }  // Mistral: no biases anywhere
    c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);
    c.norm_eps = static_cast<float>(r.number_or("rms_norm_eps", 1e-6));
    if (model_type == "qwen3") {
      c.head_dim = r.integer_or("head_dim", 128);  // Qwen3Config's default, not hidden / heads
    } else {
      if (c.num_heads > 0 && c.hidden_size % c.num_heads != 0 && !r.has("head_dim"))
        fail(ErrorKind::format,
             "{}: hidden_size ({}) is not divisible by num_attention_heads ({}) and head_dim is not given",
             where, c.hidden_size, c.num_heads);
      c.head_dim = r.integer_or("head_dim", c.num_heads > 0 ? c.hidden_size / c.num_heads : 0);
    }
    // transformers' ACT2FN: "swish" is SiLU too.
    const std::string act = r.string_or("hidden_act", "silu");
    if (act != "silu" && act != "swish")
      fail(ErrorKind::unsupported, "{}: hidden_act '{}' is not supported for {} (silu)", where, act, arch);
    c.rope = read_rope(r);
    // Sliding-window attention.
    auto window_field = [&]() -> std::int64_t {
      // A missing field is the class default (4096); null is no window.
      if (!j.contains("sliding_window")) return 4096;
      if (j.at("sliding_window").is_null()) return 0;
      const std::int64_t w = r.integer("sliding_window");
      if (w <= 0) fail(ErrorKind::format, "{}: sliding_window must be positive or null, got {}", where, w);
      return w;
    };
    if (mistral) {
      c.sliding_window = window_field();  // every layer (Mistral ignores layer_types)
    } else if (qwen && r.boolean_or("use_sliding_window", false) && c.num_layers <= (std::int64_t{1} << 16)) {
      // (More layers than zo2 runs: validate() refuses them before any per-layer list.)
      c.sliding_window = window_field();
      const std::int64_t max_window_layers = r.integer_or("max_window_layers", 28);
      if (max_window_layers < 0)
        fail(ErrorKind::format, "{}: max_window_layers must be non-negative, got {}", where, max_window_layers);
      c.sliding_layers.assign(static_cast<std::size_t>(std::max<std::int64_t>(c.num_layers, 0)), false);
      if (r.has("layer_types")) {
        const json& lt = j.at("layer_types");
        if (!lt.is_array() || static_cast<std::int64_t>(lt.size()) != c.num_layers)
          fail(ErrorKind::format, "{}: field 'layer_types' must be a list of num_hidden_layers ({}) strings, got {}",
               where, c.num_layers, lt.dump().substr(0, 200));
        for (std::size_t i = 0; i < lt.size(); ++i) {
          const json& e = lt[i];
          if (e == "sliding_attention") c.sliding_layers[i] = true;
          else if (e != "full_attention")
            fail(ErrorKind::unsupported,
                 "{}: layer_types[{}] {} is not supported (\"full_attention\" or \"sliding_attention\")", where,
                 i, e.dump());
        }
      } else {
        for (std::int64_t i = max_window_layers; i < c.num_layers; ++i) c.sliding_layers[static_cast<std::size_t>(i)] = true;
      }
      if (std::find(c.sliding_layers.begin(), c.sliding_layers.end(), true) == c.sliding_layers.end())
        c.sliding_window = 0;  // no layer slides
      if (c.sliding_window == 0) c.sliding_layers.clear();
    }
  } else if (model_type.empty()) {
    fail(ErrorKind::format, "{}: field 'model_type' is missing (zo2 runs {})", where, kModelTypes);
  } else {
    fail(ErrorKind::unsupported, "{}: model_type '{}' is not supported (zo2 runs {})", where, model_type,
         kModelTypes);
  }
  c.bos_token_id = r.token_id("bos_token_id");
  c.eos_token_id = r.token_id("eos_token_id");
  c.pad_token_id = r.token_id("pad_token_id");
  c.torch_dtype = r.string_or("torch_dtype", r.string_or("dtype", "float32"));
  read_quantization(r, c);
  c.validate(where);
  return c;
}

// Note [LLaMA-family variants]
//   Qwen2/Qwen2.5, Qwen3 and Mistral are LLaMA's decoder (RMSNorm, RoPE, grouped-query
//   attention, SiLU-gated MLP, the same tensor names) with a few differences, read from
//   config.json as transformers' classes read them (its modeling_qwen2/qwen3/mistral.py):
//   - Qwen2 (Qwen2ForCausalLM): q_proj/k_proj/v_proj always have biases, o_proj and the
//     MLP never (attention_bias/mlp_bias are not Qwen2 fields): qkv_bias.
//   - Qwen3 (Qwen3ForCausalLM): q_norm and k_norm, RMSNorms of [head_dim] weights applied
//     to each head of q and k after the projections and before RoPE: qk_norm. head_dim
//     defaults to 128 (Qwen3Config), not hidden_size / heads; attention_bias puts biases
//     on q, k, v and o as in LLaMA.
//   - Mistral (MistralForCausalLM): no biases; sliding_window (missing: 4096, null: none)
//     applies to every layer.
//   - Qwen2/Qwen3 slide only with use_sliding_window true, then in the layers layer_types
//     marks "sliding_attention" (absent: layers ≥ max_window_layers, default 28).
//   A sliding window W lets a query at position i see keys j with i − W < j ≤ i
//   (transformers' masking_utils: sliding_window_overlay ∧ causal), positions counted in the
//   padded sequence (and, with a KV cache, in the cache), as AttentionArgs::window does.
//   Class defaults for missing fields follow transformers too: num_key_value_heads 32 (Qwen)
//   or 8 (Mistral), max_position_embeddings 32768 (Qwen) or 131072 (Mistral). model_type
//   and architectures are written back as they came.
void ModelConfig::validate(const std::string& where) const {
  auto positive = [&](const char* field, std::int64_t v) {
    if (v <= 0) fail(ErrorKind::format, "{}: {} must be positive, got {}", where, field, v);
  };
  positive("vocab_size", vocab_size);
  positive("hidden_size", hidden_size);
  positive("num_hidden_layers", num_layers);
  positive("num_attention_heads", num_heads);
  positive(family == ModelFamily::opt ? "ffn_dim" : "intermediate_size", ffn_dim);
  positive("max_position_embeddings", max_positions);
  positive("head_dim", head_dim);
  positive("num_key_value_heads", num_kv_heads);
  if (family == ModelFamily::opt) positive("word_embed_proj_dim", word_embed_proj_dim);
  if (num_heads % num_kv_heads != 0)
    fail(ErrorKind::format, "{}: num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
         where, num_heads, num_kv_heads);
  if (family == ModelFamily::llama && head_dim % 2 != 0)
    fail(ErrorKind::unsupported, "{}: head_dim ({}) must be even for rotary embeddings", where,
         head_dim);
  if (vocab_size > (std::int64_t{1} << 31) - 1)
    fail(ErrorKind::unsupported, "{}: vocab_size {} exceeds 32-bit token ids", where, vocab_size);
  if (!(norm_eps >= 0))
    fail(ErrorKind::format, "{}: the norm epsilon must be non-negative", where);
  if (sliding_window < 0)
    fail(ErrorKind::format, "{}: sliding_window must be positive or null, got {}", where, sliding_window);
  if (!sliding_layers.empty() && static_cast<std::int64_t>(sliding_layers.size()) != num_layers)
    fail(ErrorKind::format, "{}: {} layer types for num_hidden_layers {}", where, sliding_layers.size(), num_layers);
  if (family == ModelFamily::opt && (qkv_bias || qk_norm || sliding_window > 0))
    fail(ErrorKind::internal, "{}: q/k/v biases, q/k norms and sliding windows are LLaMA-family features", where);
  check_sizes(where);
}

// Note [Sizes from config.json]
//   Every size below is multiplied into parameter counts (int64) and byte counts (size_t),
//   and some reach the kernels as ints (heads, head_dim, sequence lengths), so a config.json
//   with hidden_size 2^40 would overflow those products (signed overflow: wrapped sizes in
//   the messages) and num_hidden_layers 2^31−1 would build a layout and a host image per
//   layer — gigabytes of bookkeeping — before any memory check ran. So each field has a
//   range, and the whole model must stay far below 2^62 bytes at fp32 (the widest storage
//   dtype), which keeps every product of these fields in range. What the host and the device
//   can actually hold is checked next, before any allocation (offload/block_store.h,
//   check_host_memory; the planner for the device). The bounds are far above any released
//   model (the widest, LLaMA-3.1-405B: hidden 16384, intermediate 53248, 126 layers, vocab
//   128256; the longest context ~10M positions).
void ModelConfig::check_sizes(const std::string& where) const {
  auto at_most = [&](const char* field, std::int64_t v, std::int64_t max, const char* why) {
    if (v > max) fail(ErrorKind::unsupported, "{}: {} {} is larger than zo2 runs (at most {}: {})", where, field, v, max, why);
  };
  constexpr std::int64_t kWidth = std::int64_t{1} << 24;
  const char* width = "2^24, 1000x the widest released model";
  at_most("hidden_size", hidden_size, kWidth, width);
  at_most(family == ModelFamily::opt ? "ffn_dim" : "intermediate_size", ffn_dim, kWidth, width);
  at_most("word_embed_proj_dim", word_embed_proj_dim, kWidth, width);
  at_most("num_attention_heads", num_heads, kWidth, "the kernels index heads with ints");
  at_most("head_dim", head_dim, kWidth, "the kernels index it with ints");
  at_most("num_hidden_layers", num_layers, std::int64_t{1} << 16,
          "every layer gets a block image and its layout; 500x the deepest released model");
  at_most("max_position_embeddings", max_positions, std::int64_t{1} << 30,
          "sequence lengths are ints; 100x the longest released context");
  at_most("sliding_window", sliding_window, std::int64_t{1} << 30, "the kernels take it as an int");
  // The parameter count in 128-bit arithmetic, as block_params/global_params compute it in
  // int64, so an overflow there is caught here instead of happening there.
  using i128 = __int128;
  const i128 h = hidden_size, f = ffn_dim, w = word_embed_proj_dim, v = vocab_size;
  const i128 q = i128{num_heads} * head_dim, kv = i128{num_kv_heads} * head_dim;
  const i128 block = family == ModelFamily::opt ? 4 * h * h + 2 * h * f + 10 * h + f
                                                : h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h + q + 2 * kv + 3 * h + 2 * f +
                                                      2 * i128{head_dim} + 2 * h;
  const i128 globals = 2 * v * w + (i128{max_positions} + 2) * h + 2 * h * w + 2 * h;
  const i128 params = globals + i128{num_layers} * block;
  if (params * 4 > (i128{1} << 62))
    fail(ErrorKind::unsupported,
         "{}: the model would have about {:.3g} parameters ({:.3g} bytes at fp32), beyond what zo2 can address "
         "(2^62 bytes): hidden_size {}, {} {}, num_hidden_layers {}, vocab_size {}, max_position_embeddings {}",
         where, static_cast<double>(params), 4 * static_cast<double>(params), hidden_size,
         family == ModelFamily::opt ? "ffn_dim" : "intermediate_size", ffn_dim, num_layers, vocab_size, max_positions);
}

ModelConfig ModelConfig::load(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "config.json";
  // Not a FIFO nor nested past kMaxJsonDepth (Note [Reading JSON]).
  const std::string text =
      read_regular_file(path, fmt::format(" (is {} a Hugging Face model directory?)", model_dir.string()));
  json j;
  try {
    j = parse_json_text(text, path.string());
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
    fail(ErrorKind::format, "{}: not valid JSON: {}", path.string(), e.what());
  }
  return from_json(j, path.string());
}

namespace {

// A float field (rms_norm_eps) as the shortest decimal that reads back as the same float:
// 1e-05, not the double 9.999999747378752e-06 the float widens to.
json float_spelling(float v) {
  if (!std::isfinite(v)) return static_cast<double>(v);
  const std::string text = fmt::format("{}", v);  // fmt's shortest round-trip digits
  double d = 0;
  std::from_chars(text.data(), text.data() + text.size(), d);  // (not stod: locale-free)
  return static_cast<float>(d) == v ? d : static_cast<double>(v);
}

// The source's value of `key` when it reads back as the float zo2 holds (its spelling kept:
// transformers reads the file, not zo2's float), else the float's shortest spelling.
json float_or_source(const json& source, const char* key, float v) {
  if (source.is_object() && source.contains(key) && source.at(key).is_number() &&
      static_cast<float>(source.at(key).get<double>()) == v)
    return source.at(key);
  return float_spelling(v);
}

}  // namespace

json ModelConfig::to_json() const {
  json j = source.is_object() ? source : json::object();
  // Note [Quantized checkpoints]: what zo2 writes is never the source's quantized format.
  j.erase("quantization_config");
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["num_hidden_layers"] = num_layers;
  j["num_attention_heads"] = num_heads;
  j["max_position_embeddings"] = max_positions;
  j["tie_word_embeddings"] = tie_word_embeddings;
  // A list of ids (Llama-3.1-Instruct's eos_token_id [128001, 128008, 128009]) is read as
  // its first; written back as that id alone, transformers' generate would stop at it only.
  // So the source's list is kept while it is led by the id zo2 holds.
  for (const auto& [key, id] : {std::pair{"bos_token_id", bos_token_id}, std::pair{"eos_token_id", eos_token_id},
                                std::pair{"pad_token_id", pad_token_id}}) {
    if (!id) continue;
    const bool listed = source.is_object() && source.contains(key) && source.at(key).is_array() &&
                        !source.at(key).empty() && source.at(key).at(0) == *id;
    j[key] = listed ? source.at(key) : json(*id);
  }
  j["torch_dtype"] = torch_dtype;
  if (family == ModelFamily::opt) {
    j["model_type"] = "opt";
    j["architectures"] = json::array({"OPTForCausalLM"});
    j["ffn_dim"] = ffn_dim;
    j["word_embed_proj_dim"] = word_embed_proj_dim;
    j["do_layer_norm_before"] = pre_layer_norm;
    j["_remove_final_layer_norm"] = pre_layer_norm && !final_layer_norm;
    j["enable_bias"] = linear_bias;
    j["activation_function"] = "relu";
    j["layer_norm_elementwise_affine"] = true;
    if (!j.contains("dropout")) j["dropout"] = 0.0;
    if (!j.contains("attention_dropout")) j["attention_dropout"] = 0.0;
    if (!j.contains("init_std")) j["init_std"] = 0.02;
  } else if (gemma3()) {
    write_gemma3(j);
  } else {
    j["model_type"] = model_type;
    // A source's architectures are kept as they were; zo2's own configs name the class.
    if (!(source.is_object() && source.contains("architectures") && source.at("architectures").is_array()))
      j["architectures"] = json::array({architecture()});
    j["intermediate_size"] = ffn_dim;
    j["num_key_value_heads"] = num_kv_heads;
    j["head_dim"] = head_dim;
    j["hidden_act"] = "silu";
    j["rms_norm_eps"] = float_or_source(source, "rms_norm_eps", norm_eps);
    if (model_type == "llama") {
      j["attention_bias"] = attention_bias;
      j["mlp_bias"] = mlp_bias;
    } else if (model_type == "qwen3") {
      j["attention_bias"] = attention_bias;
    }
    if (model_type == "mistral") {
      // A missing field would mean transformers' default window (4096): write null for none.
      j["sliding_window"] = sliding_window > 0 ? json(sliding_window) : json(nullptr);
    } else if (model_type == "qwen2" || model_type == "qwen3") {
      if (sliding_window > 0) {
        j["use_sliding_window"] = true;
        j["sliding_window"] = sliding_window;
        // The source's layer_types or max_window_layers chose these layers; else name them.
        if (!j.contains("layer_types") && !j.contains("max_window_layers")) {
          json types = json::array();
          for (std::int64_t i = 0; i < num_layers; ++i)
            types.push_back(attention_window(i) > 0 ? "sliding_attention" : "full_attention");
          j["layer_types"] = types;
        }
      } else if (!j.contains("use_sliding_window")) {
        j["use_sliding_window"] = false;
      }  // else the source's fields, under which no layer slides
    }
    const bool same_theta = source.is_object() && source.contains("rope_theta") &&
                            source.at("rope_theta").is_number() && source.at("rope_theta").get<double>() == rope.theta;
    j["rope_theta"] = same_theta ? source.at("rope_theta") : json(rope.theta);  // 1000000 stays 1000000
    json params;
    switch (rope.type) {
      case RopeType::linear:
        params = {{"rope_type", "linear"}, {"factor", rope.factor}};
        break;
      case RopeType::llama3:
        params = {{"rope_type", "llama3"},
                  {"factor", rope.factor},
                  {"low_freq_factor", rope.low_freq_factor},
                  {"high_freq_factor", rope.high_freq_factor},
                  {"original_max_position_embeddings", rope.original_max_positions}};
        break;
      default:
        break;
    }
    // Older transformers read rope_scaling, newer rope_parameters: write what the source
    // used, rope_scaling for configs zo2 made (both versions understand it).
    j.erase("rope_parameters");
    j.erase("rope_scaling");
    if (source.is_object() && source.contains("rope_parameters")) {
      json rp = params.is_null() ? json{{"rope_type", "default"}} : params;
      rp["rope_theta"] = rope.theta;
      j["rope_parameters"] = rp;
    } else {
      j["rope_scaling"] = params;  // null for the default rotary embedding
    }
    if (!j.contains("initializer_range")) j["initializer_range"] = 0.02;
  }
  return j;
}

// Note [Gemma 3]: the fields written as Gemma3TextConfig reads them; a source's value that
// reads back as the same (rms_norm_eps 1e-06 as a float, an eos_token_id list led by the id
// zo2 uses, layer_types or sliding_window_pattern) is kept as the source wrote it.
void ModelConfig::write_gemma3(json& j) const {
  auto keep_or = [&](const char* key, const json& v, bool same) {
    if (!(same && source.is_object() && source.contains(key))) j[key] = v;
    else j[key] = source.at(key);
  };
  auto src_num = [&](const char* key) -> std::optional<double> {
    if (source.is_object() && source.contains(key) && source.at(key).is_number()) return source.at(key).get<double>();
    return std::nullopt;
  };
  j["model_type"] = "gemma3_text";
  if (!(source.is_object() && source.contains("architectures") && source.at("architectures").is_array()))
    j["architectures"] = json::array({architecture()});
  // (to_json kept the source's token id lists.)
  j["intermediate_size"] = ffn_dim;
  j["num_key_value_heads"] = num_kv_heads;
  j["head_dim"] = head_dim;
  j["hidden_activation"] = "gelu_pytorch_tanh";
  j["rms_norm_eps"] = float_or_source(source, "rms_norm_eps", norm_eps);
  j["attention_bias"] = attention_bias;
  const auto qpas = src_num("query_pre_attn_scalar");
  keep_or("query_pre_attn_scalar",
          query_pre_attn_scalar == std::floor(query_pre_attn_scalar) ? json(static_cast<std::int64_t>(query_pre_attn_scalar))
                                                                     : json(query_pre_attn_scalar),
          qpas && *qpas == query_pre_attn_scalar);
  j["sliding_window"] = sliding_window > 0 ? json(sliding_window) : json(nullptr);
  for (const auto& [key, cap] : {std::pair{"attn_logit_softcapping", attn_softcap},
                                 std::pair{"final_logit_softcapping", final_softcap}}) {
    const auto src = src_num(key);
    keep_or(key, cap > 0 ? json(static_cast<double>(cap)) : json(nullptr), src && static_cast<float>(*src) == cap);
  }
  // The local layers: the source's layer_types or pattern when they give the same layers.
  ModelConfig again;
  bool same_layers = false;
  if (source.is_object() && (source.contains("layer_types") || source.contains("sliding_window_pattern") ||
                             source.contains("_sliding_window_pattern"))) {
    try {
      json probe = source;
      probe["num_hidden_layers"] = num_layers;
      probe["model_type"] = "gemma3_text";
      again = from_json(probe, "source");
      same_layers = again.sliding_layers == sliding_layers;
    } catch (const std::exception&) {
      same_layers = false;
    }
  }
  if (!same_layers) {
    json types = json::array();
    for (std::int64_t i = 0; i < num_layers; ++i)
      types.push_back(sliding_layers.size() > static_cast<std::size_t>(i) && sliding_layers[static_cast<std::size_t>(i)]
                          ? "sliding_attention"
                          : "full_attention");
    j["layer_types"] = types;
  }
  // Rotary embeddings: the source's spelling (per-type rope_parameters, or rope_theta,
  // rope_local_base_freq and rope_scaling).
  auto params_of = [](const RopeConfig& r) {
    json p;
    if (r.type == RopeType::linear) p = {{"rope_type", "linear"}, {"factor", r.factor}};
    else if (r.type == RopeType::llama3)
      p = {{"rope_type", "llama3"},
           {"factor", r.factor},
           {"low_freq_factor", r.low_freq_factor},
           {"high_freq_factor", r.high_freq_factor},
           {"original_max_position_embeddings", r.original_max_positions}};
    return p;
  };
  const bool per_type = source.is_object() && source.contains("rope_parameters") &&
                        source.at("rope_parameters").is_object() &&
                        (source.at("rope_parameters").contains("full_attention") ||
                         source.at("rope_parameters").contains("sliding_attention"));
  if (per_type) {
    json rp = source.at("rope_parameters");
    const bool same = [&] {
      try {
        ModelConfig probe = from_json(source, "source");
        return probe.rope.type == rope.type && probe.rope.theta == rope.theta && probe.rope.factor == rope.factor &&
               probe.rope_local.theta == rope_local.theta && probe.rope_local.type == rope_local.type;
      } catch (const std::exception&) {
        return false;
      }
    }();
    if (!same) {
      json full = params_of(rope).is_null() ? json{{"rope_type", "default"}} : params_of(rope);
      full["rope_theta"] = rope.theta;
      json local = params_of(rope_local).is_null() ? json{{"rope_type", "default"}} : params_of(rope_local);
      local["rope_theta"] = rope_local.theta;
      rp = {{"full_attention", full}, {"sliding_attention", local}};
    }
    j["rope_parameters"] = rp;
  } else {
    const auto theta = src_num("rope_theta");
    keep_or("rope_theta", rope.theta, theta && *theta == rope.theta);
    const auto local = src_num("rope_local_base_freq");
    keep_or("rope_local_base_freq", rope_local.theta, local && *local == rope_local.theta);
    const json p = params_of(rope);
    const bool same_scaling = [&] {
      if (!(source.is_object() && source.contains("rope_scaling"))) return false;
      try {
        const ModelConfig probe = from_json(source, "source");
        return probe.rope.type == rope.type && probe.rope.factor == rope.factor;
      } catch (const std::exception&) {
        return false;
      }
    }();
    keep_or("rope_scaling", p, same_scaling);
  }
  if (!j.contains("initializer_range")) j["initializer_range"] = 0.02;
}

std::string ModelConfig::architecture() const {
  if (family == ModelFamily::opt) return "OPTForCausalLM";
  if (model_type == "qwen2") return "Qwen2ForCausalLM";
  if (model_type == "qwen3") return "Qwen3ForCausalLM";
  if (model_type == "mistral") return "MistralForCausalLM";
  if (model_type == "gemma3_text") return "Gemma3ForCausalLM";
  return "LlamaForCausalLM";
}

std::int64_t ModelConfig::block_params() const {
  const std::int64_t h = hidden_size;
  if (family == ModelFamily::opt) {
    std::int64_t p = 4 * h * h + 2 * h * ffn_dim + 4 * h;  // attention, MLP, two LayerNorms
    if (linear_bias) p += 4 * h + ffn_dim + h;
    return p;
  }
  std::int64_t p = h * q_dim() + 2 * h * kv_dim() + q_dim() * h + 3 * h * ffn_dim + 2 * h;
  if (attention_bias) p += q_dim() + 2 * kv_dim() + h;
  else if (qkv_bias) p += q_dim() + 2 * kv_dim();
  if (mlp_bias) p += 2 * ffn_dim + h;
  if (qk_norm) p += 2 * head_dim;
  if (gemma3()) p += 2 * h;  // post_attention_layernorm, post_feedforward_layernorm
  return p;
}

std::int64_t ModelConfig::global_params() const {
  std::int64_t p = vocab_size * word_embed_proj_dim;
  if (!tie_word_embeddings) p += vocab_size * word_embed_proj_dim;
  if (family == ModelFamily::opt) {
    p += position_rows() * hidden_size;
    if (has_projections()) p += 2 * hidden_size * word_embed_proj_dim;
    if (final_layer_norm) p += 2 * hidden_size;
  } else {
    p += hidden_size;
  }
  return p;
}

std::vector<float> ModelConfig::rope_inv_freq() const { return rope_inv_freq(rope); }

std::vector<float> ModelConfig::rope_inv_freq(const RopeConfig& rope) const {
  std::vector<float> inv;
  if (family != ModelFamily::llama) return inv;
  const std::int64_t half = head_dim / 2;
  inv.resize(static_cast<std::size_t>(half));
  constexpr double kPi = 3.14159265358979323846;
  for (std::int64_t i = 0; i < half; ++i) {
    // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), in fp32.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    const float base_pow = static_cast<float>(std::pow(rope.theta, static_cast<double>(exponent)));
    double f = static_cast<double>(1.0f / base_pow);
    if (rope.type == RopeType::linear) {
      f /= rope.factor;
    } else if (rope.type == RopeType::llama3) {
      const double old_len = static_cast<double>(rope.original_max_positions);
      const double low_wavelen = old_len / rope.low_freq_factor;
      const double high_wavelen = old_len / rope.high_freq_factor;
      const double wavelen = 2 * kPi / f;
      if (wavelen > low_wavelen) {
        f = f / rope.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_len / wavelen - rope.low_freq_factor) /
                              (rope.high_freq_factor - rope.low_freq_factor);
        f = (1 - smooth) * f / rope.factor + smooth * f;
      }
    }
    inv[static_cast<std::size_t>(i)] = static_cast<float>(f);
  }
  return inv;
}

}  // namespace zo2
