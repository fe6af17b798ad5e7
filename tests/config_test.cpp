// Tests of the model description: config.json parsing and refusals (models/config.h), the
// presets and their parameter counts (models/presets.h), the block and globals image
// layouts (models/layout.h), and host batch construction (models/batch.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <map>
#include <numbers>
#include <set>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/batch.h"
#include "models/checkpoint.h"
#include "models/config.h"
#include "models/layout.h"
#include "models/presets.h"
#include "models/safetensors.h"
#include "runtime/dtype.h"
#include "runtime/error.h"
#include "tests/test_util.h"

namespace zo2 {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

using test::error_of;

// Expects from_json(j) to be refused with `kind` and a message holding every piece.
void expect_refused(const json& j, ErrorKind kind, std::vector<std::string> pieces) {
  const Error e = error_of([&] { (void)ModelConfig::from_json(j, "some/dir/config.json"); });
  EXPECT_EQ(e.kind(), kind) << e.what();
  const std::string msg = e.what();
  EXPECT_EQ(msg.rfind("some/dir/config.json", 0), 0u) << "the message names the file: " << msg;
  for (const auto& p : pieces) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' in: " << msg;
}

json llama_json() {
  return json{{"model_type", "llama"},      {"vocab_size", 512},          {"hidden_size", 64},
              {"num_hidden_layers", 2},     {"num_attention_heads", 4},   {"num_key_value_heads", 2},
              {"intermediate_size", 176},   {"max_position_embeddings", 64}, {"rms_norm_eps", 1e-6},
              {"hidden_act", "silu"}};
}

json opt_json() {
  return json{{"model_type", "opt"},        {"vocab_size", 512},       {"hidden_size", 64},
              {"num_hidden_layers", 2},     {"num_attention_heads", 4}, {"ffn_dim", 256},
              {"max_position_embeddings", 64}, {"activation_function", "relu"},
              {"do_layer_norm_before", true}, {"word_embed_proj_dim", 64}};
}

// transformers' default rotary frequencies in double: 1 / theta^(2i/d).
std::vector<double> default_inv_freq(double theta, std::int64_t dim) {
  std::vector<double> f;
  for (std::int64_t i = 0; i < dim; i += 2) f.push_back(1.0 / std::pow(theta, static_cast<double>(i) / dim));
  return f;
}

// transformers' _compute_llama3_parameters, written independently in double.
std::vector<double> llama3_inv_freq(double theta, std::int64_t dim, double factor, double low,
                                    double high, double old_len, int* regimes) {
  std::vector<double> out;
  const double low_wavelen = old_len / low, high_wavelen = old_len / high;
  for (double f : default_inv_freq(theta, dim)) {
    const double wavelen = 2 * std::numbers::pi / f;
    if (wavelen < high_wavelen) {
      out.push_back(f);  // high frequency: unchanged
      ++regimes[0];
    } else if (wavelen > low_wavelen) {
      out.push_back(f / factor);  // low frequency: scaled
      ++regimes[2];
    } else {
      const double smooth = (old_len / wavelen - low) / (high - low);
      out.push_back((1 - smooth) * f / factor + smooth * f);
      ++regimes[1];
    }
  }
  return out;
}

// ---- parsing ----

TEST(ModelConfig, GoldenOptConfigParses) {
  const ModelConfig c = ModelConfig::load(test::shared_dir() / "golden" / "opt-tiny");
  EXPECT_EQ(c.family, ModelFamily::opt);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.ffn_dim, 256);
  EXPECT_EQ(c.max_positions, 64);
  EXPECT_EQ(c.position_rows(), 66);
  EXPECT_TRUE(c.pre_layer_norm);
  EXPECT_TRUE(c.final_layer_norm);
  EXPECT_FALSE(c.has_projections());
  EXPECT_TRUE(c.linear_bias);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.rope.type, RopeType::none);
  EXPECT_EQ(c.bos_token_id, 2);
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_EQ(c.pad_token_id, 1);
  EXPECT_EQ(c.torch_dtype, "float32");  // from transformers 5's "dtype"
  EXPECT_TRUE(c.rope_inv_freq().empty());
}

TEST(ModelConfig, GoldenPostLnOptConfigParsesWithProjections) {
  const ModelConfig c = ModelConfig::load(test::shared_dir() / "golden" / "opt-tiny-postln");
  EXPECT_EQ(c.family, ModelFamily::opt);
  EXPECT_FALSE(c.pre_layer_norm);
  EXPECT_FALSE(c.final_layer_norm);
  EXPECT_EQ(c.word_embed_proj_dim, 32);
  EXPECT_TRUE(c.has_projections());
  EXPECT_EQ(c.num_heads, 8);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.num_layers, 3);
  EXPECT_EQ(c.ffn_dim, 128);
}

TEST(ModelConfig, GoldenLlamaConfigParsesWithThetaFromRopeParameters) {
  const ModelConfig c = ModelConfig::load(test::shared_dir() / "golden" / "llama-tiny");
  EXPECT_EQ(c.family, ModelFamily::llama);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.q_dim(), 64);
  EXPECT_EQ(c.kv_dim(), 32);
  EXPECT_EQ(c.ffn_dim, 176);
  EXPECT_EQ(c.norm_eps, 1e-6f);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_EQ(c.rope.type, RopeType::default_);
  EXPECT_EQ(c.rope.theta, 10000.0);
  EXPECT_EQ(c.pad_token_id, 1);
}

TEST(ModelConfig, RopeThetaComesFromTopLevelRopeParametersOrRopeScaling) {
  json top = llama_json();
  top["rope_theta"] = 500000.0;
  EXPECT_EQ(ModelConfig::from_json(top).rope.theta, 500000.0);
  EXPECT_EQ(ModelConfig::from_json(top).rope.type, RopeType::default_);

  json params = llama_json();
  params["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 250000.0}};
  EXPECT_EQ(ModelConfig::from_json(params).rope.theta, 250000.0);

  json scaling = llama_json();
  scaling["rope_theta"] = 123456.0;
  scaling["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 4.0}};
  const ModelConfig c = ModelConfig::from_json(scaling);
  EXPECT_EQ(c.rope.theta, 123456.0);
  EXPECT_EQ(c.rope.type, RopeType::linear);
  EXPECT_EQ(c.rope.factor, 4.0);

  json none = llama_json();  // no theta anywhere: transformers' default 10000
  EXPECT_EQ(ModelConfig::from_json(none).rope.theta, 10000.0);

  // A base below 1 is refused with or without a rope_scaling object (it once passed unchecked
  // without one, and every loss came out NaN).
  for (const double bad : {0.0, -10000.0, 1e-300}) {
    for (const bool with_null_scaling : {false, true}) {
      json j = llama_json();
      j["rope_theta"] = bad;
      if (with_null_scaling) j["rope_scaling"] = nullptr;
      try {
        (void)ModelConfig::from_json(j);
        ADD_FAILURE() << bad;
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("rope_theta must be a finite number of at least 1"), std::string::npos)
            << e.what();
      }
    }
  }
}

TEST(ModelConfig, RopeTypesDefaultLinearAndLlama3ParseWithTheirFields) {
  json lin = llama_json();
  lin["rope_scaling"] = {{"type", "linear"}, {"factor", 2.5}};  // the older spelling of rope_type
  const ModelConfig l = ModelConfig::from_json(lin);
  EXPECT_EQ(l.rope.type, RopeType::linear);
  EXPECT_EQ(l.rope.factor, 2.5);

  json l3 = llama_json();
  l3["rope_parameters"] = {{"rope_type", "llama3"},       {"rope_theta", 500000.0},
                           {"factor", 32.0},              {"low_freq_factor", 2.0},
                           {"high_freq_factor", 8.0},     {"original_max_position_embeddings", 4096}};
  const ModelConfig c = ModelConfig::from_json(l3);
  EXPECT_EQ(c.rope.type, RopeType::llama3);
  EXPECT_EQ(c.rope.theta, 500000.0);
  EXPECT_EQ(c.rope.factor, 32.0);
  EXPECT_EQ(c.rope.low_freq_factor, 2.0);
  EXPECT_EQ(c.rope.high_freq_factor, 8.0);
  EXPECT_EQ(c.rope.original_max_positions, 4096);

  json def = llama_json();
  def["rope_scaling"] = {{"rope_type", "default"}};
  EXPECT_EQ(ModelConfig::from_json(def).rope.type, RopeType::default_);
}

// Where rope_scaling and rope_parameters are both set, transformers (4 and 5) take
// rope_scaling, with the top-level rope_theta; an empty rope_scaling does not count. A
// llama3 scaling without original_max_position_embeddings takes max_position_embeddings
// (transformers 5's standardize_rope_params); "swish" is SiLU (transformers' ACT2FN).
TEST(ModelConfig, RopeScalingWinsOverRopeParametersAndLlama3FillsItsOriginalLength) {
  json both = llama_json();
  both["rope_theta"] = 50.0;
  both["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
  both["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 4.0}, {"rope_theta", 500.0}};
  const ModelConfig b = ModelConfig::from_json(both);
  EXPECT_EQ(b.rope.type, RopeType::linear);
  EXPECT_EQ(b.rope.factor, 2.0);
  EXPECT_EQ(b.rope.theta, 50.0);
  // A model card's YaRN snippet pasted beside transformers 5's rope_parameters is refused,
  // not run as plain RoPE.
  json yarn = llama_json();
  yarn["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};
  yarn["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32768}};
  expect_refused(yarn, ErrorKind::unsupported, {"rope_scaling.rope_type", "yarn"});
  json empty = llama_json();
  empty["rope_scaling"] = json::object();
  empty["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 4.0}, {"rope_theta", 500.0}};
  EXPECT_EQ(ModelConfig::from_json(empty).rope.factor, 4.0);
  EXPECT_EQ(ModelConfig::from_json(empty).rope.theta, 500.0);

  json l3 = llama_json();
  l3["max_position_embeddings"] = 2048;
  l3["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0}};
  EXPECT_EQ(ModelConfig::from_json(l3).rope.original_max_positions, 2048);
  l3["rope_scaling"]["original_max_position_embeddings"] = 0;
  expect_refused(l3, ErrorKind::format, {"original_max_position_embeddings", "0"});

  json swish = llama_json();
  swish["hidden_act"] = "swish";
  EXPECT_NO_THROW(ModelConfig::from_json(swish));
  swish["hidden_act"] = "gelu";
  expect_refused(swish, ErrorKind::unsupported, {"hidden_act", "gelu"});
}

TEST(ModelConfig, Llama31StyleConfigWithEosListParses) {
  const json j = json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256})");
  const ModelConfig c = ModelConfig::from_json(j);
  EXPECT_EQ(c.family, ModelFamily::llama);
  EXPECT_EQ(c.eos_token_id, 128001);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_FALSE(c.pad_token_id.has_value());
  EXPECT_EQ(c.rope.type, RopeType::llama3);
  EXPECT_EQ(c.rope.theta, 500000.0);
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope.original_max_positions, 8192);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.max_positions, 131072);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_EQ(c.total_params(), 8'030'261'248);
  EXPECT_EQ(c.total_params(), find_preset("llama3.1-8b").config.total_params());
}

// ---- LLaMA-family variants (Note [LLaMA-family variants]) ----

// Qwen/Qwen2.5-0.5B's config.json as it ships.
json qwen25_json() {
  return json::parse(R"({
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": true,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": true,
    "use_sliding_window": false, "vocab_size": 151936})");
}

// Qwen/Qwen3-0.6B's.
json qwen3_json() {
  return json::parse(R"({
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
    "use_sliding_window": false, "vocab_size": 151936})");
}

// mistralai/Mistral-7B-v0.1's.
json mistral_json() {
  return json::parse(R"({
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0", "use_cache": true, "vocab_size": 32000})");
}

// google/gemma-3-1b-it's (transformers 4.50).
json gemma3_json() {
  return json::parse(R"({
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "attn_logit_softcapping": null, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": true, "vocab_size": 262144})");
}

std::vector<std::string> tensor_names(const ImageLayout& l) {
  std::vector<std::string> n;
  for (const auto& t : l.tensors()) n.push_back(t.name);
  return n;
}

TEST(ModelConfig, Qwen25ConfigParsesWithQkvBiasesAndATiedHead) {
  const ModelConfig c = ModelConfig::from_json(qwen25_json());
  EXPECT_EQ(c.family, ModelFamily::llama);
  EXPECT_EQ(c.model_type, "qwen2");
  EXPECT_EQ(c.family_name(), "qwen2");
  EXPECT_EQ(c.architecture(), "Qwen2ForCausalLM");
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.rope.theta, 1e6);
  EXPECT_EQ(c.sliding_window, 0) << "use_sliding_window false";
  EXPECT_EQ(c.attention_window(23), 0);
  EXPECT_EQ(c.total_params(), 494'032'768);  // transformers' num_parameters()
  const auto names = tensor_names(block_layout(c, 3, DType::bf16));
  for (const char* want : {"model.layers.3.self_attn.q_proj.bias", "model.layers.3.self_attn.k_proj.bias",
                           "model.layers.3.self_attn.v_proj.bias"})
    EXPECT_NE(std::find(names.begin(), names.end(), want), names.end()) << want;
  EXPECT_EQ(std::find(names.begin(), names.end(), "model.layers.3.self_attn.o_proj.bias"), names.end());
  EXPECT_EQ(std::find(names.begin(), names.end(), "model.layers.3.mlp.down_proj.bias"), names.end());
  // Qwen2 has no attention_bias/mlp_bias fields: transformers ignores them, so does zo2.
  json j = qwen25_json();
  j["attention_bias"] = true;
  j["mlp_bias"] = true;
  EXPECT_EQ(ModelConfig::from_json(j).total_params(), c.total_params());
  // Written back: model_type, architectures and the sliding-window fields as they came.
  const json out = c.to_json();
  EXPECT_EQ(out.at("model_type"), "qwen2");
  EXPECT_EQ(out.at("architectures"), json::array({"Qwen2ForCausalLM"}));
  for (const char* k : {"use_sliding_window", "sliding_window", "max_window_layers", "transformers_version"})
    EXPECT_EQ(out.at(k), qwen25_json().at(k)) << k;
  EXPECT_EQ(ModelConfig::from_json(out).total_params(), c.total_params());
}

TEST(ModelConfig, Qwen3ConfigParsesWithQkNormsAndItsOwnHeadDim) {
  const ModelConfig c = ModelConfig::from_json(qwen3_json());
  EXPECT_EQ(c.model_type, "qwen3");
  EXPECT_EQ(c.architecture(), "Qwen3ForCausalLM");
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.head_dim, 128);  // ≠ 1024 / 16
  EXPECT_EQ(c.q_dim(), 2048);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.total_params(), 596'049'920);
  const ImageLayout l = block_layout(c, 0, DType::f8_e4m3);
  const TensorSlot* qn = l.find("model.layers.0.self_attn.q_norm.weight");
  const TensorSlot* kn = l.find("model.layers.0.self_attn.k_norm.weight");
  ASSERT_TRUE(qn && kn);
  EXPECT_EQ(qn->shape(), std::vector<std::int64_t>{128});
  EXPECT_EQ(kn->role, Role::k_norm_w);
  EXPECT_EQ(qn->dtype, DType::bf16) << "1-D tensors stay bf16 under fp8 storage";
  // head_dim missing: Qwen3Config's default 128, not hidden / heads.
  json nohd = qwen3_json();
  nohd.erase("head_dim");
  EXPECT_EQ(ModelConfig::from_json(nohd).head_dim, 128);
  // attention_bias: q, k, v and o biased, as in LLaMA.
  json ab = qwen3_json();
  ab["attention_bias"] = true;
  const ModelConfig b = ModelConfig::from_json(ab);
  EXPECT_TRUE(b.attention_bias);
  EXPECT_TRUE(block_layout(b, 0, DType::f32).find("model.layers.0.self_attn.o_proj.bias"));
  const json out = c.to_json();
  EXPECT_EQ(out.at("model_type"), "qwen3");
  EXPECT_EQ(out.at("architectures"), json::array({"Qwen3ForCausalLM"}));
  EXPECT_EQ(out.at("head_dim"), 128);
  EXPECT_EQ(ModelConfig::from_json(out).total_params(), c.total_params());
}

void expect_same_config(const ModelConfig& a, const ModelConfig& b, const std::string& what);

// A saved config.json is what transformers generates with: Llama-3.1-Instruct's
// eos_token_id list was written as its first id (generate then stopped at 128001 only) and
// rms_norm_eps 1e-05 as the float's 9.999999747378752e-06. The source's list and spelling
// are kept while zo2's value is the same; a changed value is written as the new one.
TEST(ModelConfig, TokenIdListsAndFloatSpellingsAreWrittenBackAsTheSourceHadThem) {
  json j = json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 176, "max_position_embeddings": 64,
    "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05, "rope_theta": 500000, "vocab_size": 128256})");
  ModelConfig c = ModelConfig::from_json(j);
  ASSERT_EQ(c.eos_token_id, 128001);
  json out = c.to_json();
  EXPECT_EQ(out.at("eos_token_id"), json::array({128001, 128008, 128009}));
  EXPECT_EQ(out.at("bos_token_id"), 128000);
  EXPECT_EQ(out.dump().find("9.99999"), std::string::npos) << out.dump();
  EXPECT_EQ(out.at("rms_norm_eps").dump(), "1e-05");
  EXPECT_EQ(out.at("rope_theta").dump(), "500000");
  expect_same_config(c, ModelConfig::from_json(json::parse(out.dump())), "llama round trip");
  // Changed values are written as the new ones (an eps zo2 made: its shortest spelling).
  c.eos_token_id = 128009;
  c.norm_eps = 2e-6f;
  c.rope.theta = 10000;
  out = c.to_json();
  EXPECT_EQ(out.at("eos_token_id"), 128009);
  EXPECT_EQ(out.at("rms_norm_eps").dump(), "2e-06");
  EXPECT_EQ(static_cast<float>(out.at("rms_norm_eps").get<double>()), 2e-6f);
  EXPECT_EQ(out.at("rope_theta"), 10000.0);
  // Qwen, Mistral and OPT keep their lists too.
  for (json v : {qwen25_json(), mistral_json(), opt_json()}) {
    v["eos_token_id"] = json::array({2, 7});
    v["pad_token_id"] = json::array({1});
    const json w = ModelConfig::from_json(v).to_json();
    EXPECT_EQ(w.at("eos_token_id"), json::array({2, 7})) << v.at("model_type");
    EXPECT_EQ(w.at("pad_token_id"), json::array({1})) << v.at("model_type");
    if (v.contains("rms_norm_eps")) {
      EXPECT_EQ(w.at("rms_norm_eps").dump(), v.at("rms_norm_eps").dump());
    }
  }
}

// A Qwen2ForSequenceClassification checkpoint (score.weight, tied embeddings) was trained as a
// causal LM with an "unused tensor" warning and saved without its head.
TEST(ModelConfig, ArchitecturesThatAreNotCausalLanguageModelsAreRefused) {
  for (const char* arch : {"Qwen2ForSequenceClassification", "LlamaForTokenClassification",
                           "MistralForQuestionAnswering", "OPTForSequenceClassification", "Qwen3ForMaskedLM"}) {
    json j = std::string(arch).starts_with("OPT") ? opt_json() : qwen25_json();
    j["architectures"] = json::array({arch});
    expect_refused(j, ErrorKind::unsupported, {"'architectures'", arch, "ForCausalLM"});
  }
  json ok = qwen25_json();
  ok["architectures"] = json::array({"Qwen2ForCausalLM"});
  EXPECT_NO_THROW((void)ModelConfig::from_json(ok));
  ok.erase("architectures");
  EXPECT_NO_THROW((void)ModelConfig::from_json(ok));
}

// Weights saved from a wrapper (torch.compile's _orig_mod., DDP's module., model.model.,
// language_model.) carry a prefix on every name and were refused as "tensor
// 'model.embed_tokens.weight' is missing": the message names the prefixed tensor (zo2 still
// does not strip prefixes).
TEST(ModelConfig, ACheckpointWithPrefixedNamesIsRefusedNamingThePrefixedTensor) {
  auto write = [](const fs::path& dir, const ModelConfig& c, const std::string& prefix, bool strip_model) {
    std::vector<TensorSlot> slots = globals_layout(c, DType::f32).tensors();
    for (std::int64_t i = 0; i < c.num_layers; ++i) {
      const ImageLayout block = block_layout(c, i, DType::f32);
      slots.insert(slots.end(), block.tensors().begin(), block.tensors().end());
    }
    std::vector<TensorToWrite> ts;
    for (const TensorSlot& t : slots) {
      const std::string name = strip_model && t.name.starts_with("model.") ? t.name.substr(6) : t.name;
      ts.push_back({prefix + name, DType::f32, t.shape(), nullptr,
                    [](std::span<std::byte> out, std::uint64_t) { std::fill(out.begin(), out.end(), std::byte{0}); }});
    }
    fs::create_directories(dir);
    write_safetensors(dir / "model.safetensors", ts);
  };
  test::TempDir tmp;
  const ModelConfig llama = ModelConfig::from_json(llama_json());
  const ModelConfig opt = ModelConfig::from_json(opt_json());
  struct Case {
    const ModelConfig& c;
    std::string prefix;
    bool strip_model;
    std::string have;
  };
  for (const Case& k : {Case{llama, "_orig_mod.", false, "_orig_mod.model.embed_tokens.weight"},
                        Case{llama, "module.", false, "module.model.embed_tokens.weight"},
                        Case{llama, "model.", false, "model.model.embed_tokens.weight"},
                        Case{llama, "language_model.", false, "language_model.model.embed_tokens.weight"},
                        Case{opt, "module.", true, "module.decoder.embed_tokens.weight"}}) {
    const fs::path dir = tmp / (k.prefix + (k.strip_model ? "bare" : ""));
    write(dir, k.c, k.prefix, k.strip_model);
    const Error e = error_of([&] { check_checkpoint_tensors(SafetensorsCheckpoint::open(dir), k.c, "ck"); });
    EXPECT_EQ(e.kind(), ErrorKind::format);
    EXPECT_NE(std::string(e.what()).find("the checkpoint has '" + k.have + "', a prefix zo2 does not strip"),
              std::string::npos)
        << e.what();
  }
  // Unprefixed (and OPT's names without "model.") load; a tensor simply missing gets no hint.
  write(tmp / "plain", llama, "", false);
  EXPECT_NO_THROW(check_checkpoint_tensors(SafetensorsCheckpoint::open(tmp / "plain"), llama, "ck"));
  write(tmp / "opt", opt, "", true);
  EXPECT_NO_THROW(check_checkpoint_tensors(SafetensorsCheckpoint::open(tmp / "opt"), opt, "ck"));
  ModelConfig deeper = llama;
  deeper.num_layers = 3;
  const Error e = error_of([&] { check_checkpoint_tensors(SafetensorsCheckpoint::open(tmp / "plain"), deeper, "ck"); });
  EXPECT_NE(std::string(e.what()).find("tensor 'model.layers.2."), std::string::npos) << e.what();
  EXPECT_EQ(std::string(e.what()).find("prefix"), std::string::npos) << e.what();
}

TEST(ModelConfig, Gemma3ConfigParsesLocalAndGlobalLayersAndWritesItselfBackUnchanged) {
  const ModelConfig c = ModelConfig::from_json(gemma3_json());
  EXPECT_EQ(c.family, ModelFamily::llama);
  EXPECT_TRUE(c.gemma3());
  EXPECT_EQ(c.family_name(), "gemma3_text");
  EXPECT_EQ(c.architecture(), "Gemma3ForCausalLM");
  EXPECT_TRUE(c.qk_norm);
  EXPECT_TRUE(c.tie_word_embeddings) << "Gemma3TextConfig's default";
  EXPECT_EQ(c.head_dim, 256);
  EXPECT_EQ(c.num_kv_heads, 1);
  EXPECT_EQ(c.query_pre_attn_scalar, 256);
  EXPECT_FLOAT_EQ(c.attention_scale(), 1.0f / 16.0f);
  EXPECT_EQ(c.eos_token_id, 1);
  EXPECT_EQ(c.rope.type, RopeType::default_);
  EXPECT_EQ(c.rope.theta, 1e6);
  EXPECT_EQ(c.rope_local.theta, 10000.0);
  // sliding_window_pattern 6: layers 5, 11, 17, 23 global, the rest local with the window.
  for (std::int64_t i = 0; i < 26; ++i) {
    const bool global = (i + 1) % 6 == 0;
    EXPECT_EQ(c.local_layer(i), !global) << i;
    EXPECT_EQ(c.attention_window(i), global ? 0 : 512) << i;
  }
  EXPECT_EQ(c.total_params(), 999'885'952);  // the modules' shapes, tied head once (num_parameters())
  const auto names = tensor_names(block_layout(c, 5, DType::bf16));
  for (const char* want : {"model.layers.5.input_layernorm.weight", "model.layers.5.post_attention_layernorm.weight",
                           "model.layers.5.pre_feedforward_layernorm.weight",
                           "model.layers.5.post_feedforward_layernorm.weight", "model.layers.5.self_attn.q_norm.weight",
                           "model.layers.5.self_attn.k_norm.weight"})
    EXPECT_NE(std::find(names.begin(), names.end(), want), names.end()) << want;
  EXPECT_FALSE(globals_layout(c, DType::f32).find("lm_head.weight"));
  // Written back as it came: every field of the shipped file, eos_token_id's list included.
  const json out = c.to_json();
  const json shipped = gemma3_json();
  for (const auto& [key, value] : shipped.items()) EXPECT_EQ(out.at(key), value) << key;
  EXPECT_FALSE(out.contains("hidden_act"));
  expect_same_config(c, ModelConfig::from_json(out), "gemma3 round trip");
  // layer_types (transformers ≥ 4.53) instead of the pattern.
  json lt = gemma3_json();
  lt.erase("sliding_window_pattern");
  lt["layer_types"] = json::array();
  for (int i = 0; i < 26; ++i) lt["layer_types"].push_back(i % 2 ? "full_attention" : "sliding_attention");
  const ModelConfig t = ModelConfig::from_json(lt);
  EXPECT_TRUE(t.local_layer(0));
  EXPECT_FALSE(t.local_layer(1));
  EXPECT_EQ(t.to_json().at("layer_types"), lt.at("layer_types"));
  // Missing fields: Gemma3TextConfig's defaults (window 4096, pattern 6, thetas 1e6/1e4, scalar 256).
  json d = gemma3_json();
  for (const char* k : {"sliding_window", "sliding_window_pattern", "rope_theta", "rope_local_base_freq",
                        "query_pre_attn_scalar", "head_dim"})
    d.erase(k);
  const ModelConfig dc = ModelConfig::from_json(d);
  EXPECT_EQ(dc.sliding_window, 4096);
  EXPECT_EQ(dc.rope.theta, 1e6);
  EXPECT_EQ(dc.rope_local.theta, 10000.0);
  EXPECT_EQ(dc.query_pre_attn_scalar, 256);
  EXPECT_EQ(dc.head_dim, 256);
  EXPECT_TRUE(dc.local_layer(4));
  EXPECT_FALSE(dc.local_layer(5));
}

TEST(ModelConfig, Gemma3RopeSpellingsOldAndNewReadTheSame) {
  // 4b-style rope_scaling (linear 8) applies to the global layers only.
  json old = gemma3_json();
  old["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 8.0}};
  const ModelConfig a = ModelConfig::from_json(old);
  EXPECT_EQ(a.rope.type, RopeType::linear);
  EXPECT_EQ(a.rope.factor, 8.0);
  EXPECT_EQ(a.rope_local.type, RopeType::default_);
  EXPECT_EQ(a.to_json().at("rope_scaling"), old.at("rope_scaling"));
  // transformers ≥ 5: rope_parameters per layer type.
  json neu = gemma3_json();
  for (const char* k : {"rope_scaling", "rope_theta", "rope_local_base_freq"}) neu.erase(k);
  neu["rope_parameters"] = {
      {"full_attention", {{"rope_type", "linear"}, {"factor", 8.0}, {"rope_theta", 1000000.0}}},
      {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 10000.0}}}};
  const ModelConfig b = ModelConfig::from_json(neu);
  EXPECT_EQ(b.rope.type, RopeType::linear);
  EXPECT_EQ(b.rope.factor, 8.0);
  EXPECT_EQ(b.rope.theta, 1e6);
  EXPECT_EQ(b.rope_local.type, RopeType::default_);
  EXPECT_EQ(b.rope_local.theta, 10000.0);
  EXPECT_EQ(a.rope_inv_freq(), b.rope_inv_freq());
  EXPECT_EQ(a.rope_inv_freq(a.rope_local), b.rope_inv_freq(b.rope_local));
  const json out = b.to_json();
  EXPECT_EQ(out.at("rope_parameters"), neu.at("rope_parameters"));
  EXPECT_FALSE(out.contains("rope_scaling"));
  // A rope_scaling beside per-type rope_parameters updates the global layers' (transformers
  // 5's Gemma3TextConfig); a pasted YaRN snippet is refused, not ignored.
  json both = neu;
  both["rope_parameters"]["full_attention"] = {{"rope_type", "default"}, {"rope_theta", 1000000.0}};
  both["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 8.0}};
  const ModelConfig c = ModelConfig::from_json(both);
  EXPECT_EQ(c.rope.type, RopeType::linear);
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.theta, 1e6);
  EXPECT_EQ(c.rope_local.type, RopeType::default_);
  expect_same_config(ModelConfig::from_json(c.to_json()), c, "gemma3 per-type + rope_scaling");
  both["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 8.0}};
  expect_refused(both, ErrorKind::unsupported, {"rope_type", "yarn"});
}

// Soft-capping (Gemma 2's attn_logit_softcapping 50 and final_logit_softcapping 30; null in
// Gemma 3's checkpoints): read, written back as the source spelled it, and a value that is
// no cap at all (0, negative, not a number, beyond float) refused naming the field.
TEST(ModelConfig, Gemma3SoftCappingIsReadAndWrittenBack) {
  json j = gemma3_json();
  j["attn_logit_softcapping"] = 50.0;
  j["final_logit_softcapping"] = 30;
  const ModelConfig c = ModelConfig::from_json(j);
  EXPECT_EQ(c.attn_softcap, 50.0f);
  EXPECT_EQ(c.final_softcap, 30.0f);
  const json back = c.to_json();
  EXPECT_EQ(back.at("attn_logit_softcapping"), json(50.0));
  EXPECT_EQ(back.at("final_logit_softcapping"), json(30));
  const ModelConfig again = ModelConfig::from_json(back);
  EXPECT_EQ(again.attn_softcap, 50.0f);
  EXPECT_EQ(again.final_softcap, 30.0f);
  // null, or absent, is none; a config zo2 made writes null.
  j["attn_logit_softcapping"] = nullptr;
  j.erase("final_logit_softcapping");
  const ModelConfig none = ModelConfig::from_json(j);
  EXPECT_EQ(none.attn_softcap, 0.0f);
  EXPECT_EQ(none.final_softcap, 0.0f);
  ModelConfig made = none;
  made.source = json();
  EXPECT_TRUE(made.to_json().at("attn_logit_softcapping").is_null());
  made.final_softcap = 2.5f;
  EXPECT_EQ(made.to_json().at("final_logit_softcapping"), json(2.5));
  for (const char* field : {"attn_logit_softcapping", "final_logit_softcapping"})
    for (const json& bad : {json(0), json(-30.0), json("30"), json(1e39), json(true)}) {
      json k = gemma3_json();
      k[field] = bad;
      expect_refused(k, ErrorKind::format, {field, bad.dump()});
    }
}

TEST(ModelConfig, Gemma3FieldsZo2CannotRunAreRefusedNamingTheField) {
  {
    json j = gemma3_json();
    j["hidden_activation"] = "gelu";
    expect_refused(j, ErrorKind::unsupported, {"hidden_activation", "gelu", "Gemma 3"});
  }
  {
    json j = gemma3_json();
    j["use_bidirectional_attention"] = true;
    expect_refused(j, ErrorKind::unsupported, {"use_bidirectional_attention"});
  }
  {
    json j = gemma3_json();
    j["query_pre_attn_scalar"] = 0;
    expect_refused(j, ErrorKind::format, {"query_pre_attn_scalar"});
  }
  {
    json j = gemma3_json();
    j["sliding_window_pattern"] = 0;
    expect_refused(j, ErrorKind::format, {"sliding_window_pattern", "0"});
  }
  {
    json j = gemma3_json();
    j["layer_types"] = {"sliding_attention"};
    expect_refused(j, ErrorKind::format, {"layer_types", "26"});
  }
  {
    json j = gemma3_json();
    j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 8.0}};
    expect_refused(j, ErrorKind::unsupported, {"rope_scaling.rope_type", "yarn"});
  }
  {  // Gemma3ForConditionalGeneration: refused naming text_config.
    json j = {{"model_type", "gemma3"}, {"architectures", {"Gemma3ForConditionalGeneration"}},
              {"text_config", gemma3_json()}};
    expect_refused(j, ErrorKind::unsupported, {"gemma3", "text_config", "gemma3_text"});
  }
}

TEST(ModelConfig, MistralConfigParsesItsSlidingWindowAsTransformersDoes) {
  const ModelConfig c = ModelConfig::from_json(mistral_json());
  EXPECT_EQ(c.model_type, "mistral");
  EXPECT_EQ(c.architecture(), "MistralForCausalLM");
  EXPECT_FALSE(c.qkv_bias || c.qk_norm || c.attention_bias || c.mlp_bias);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(c.attention_window(0), 4096);
  EXPECT_EQ(c.attention_window(31), 4096);
  EXPECT_EQ(c.total_params(), 7'241'732'096);
  json null_window = mistral_json();
  null_window["sliding_window"] = nullptr;  // v0.2 and later: no window
  EXPECT_EQ(ModelConfig::from_json(null_window).attention_window(0), 0);
  json missing = mistral_json();
  missing.erase("sliding_window");  // MistralConfig's default
  EXPECT_EQ(ModelConfig::from_json(missing).sliding_window, 4096);
  json no_kv = mistral_json();
  no_kv.erase("num_key_value_heads");  // MistralConfig's default 8
  EXPECT_EQ(ModelConfig::from_json(no_kv).num_kv_heads, 8);
  no_kv["num_key_value_heads"] = nullptr;  // null: num_attention_heads
  EXPECT_EQ(ModelConfig::from_json(no_kv).num_kv_heads, 32);
  json no_positions = mistral_json();
  no_positions.erase("max_position_embeddings");
  EXPECT_EQ(ModelConfig::from_json(no_positions).max_positions, 4096 * 32);
  // Attention biases are not Mistral fields.
  json ab = mistral_json();
  ab["attention_bias"] = true;
  EXPECT_FALSE(ModelConfig::from_json(ab).attention_bias);
  // Written back with the window explicit (a missing one would mean 4096).
  EXPECT_EQ(c.to_json().at("sliding_window"), 4096);
  EXPECT_TRUE(ModelConfig::from_json(null_window).to_json().at("sliding_window").is_null());
  EXPECT_EQ(ModelConfig::from_json(c.to_json()).sliding_window, 4096);
}

TEST(ModelConfig, QwenSlidingWindowAppliesToTheLayersItNames) {
  json j = qwen25_json();
  j["num_hidden_layers"] = 4;
  j["use_sliding_window"] = true;
  j["sliding_window"] = 8;
  j["max_window_layers"] = 1;  // layers ≥ 1 slide
  const ModelConfig c = ModelConfig::from_json(j);
  EXPECT_EQ(c.sliding_window, 8);
  EXPECT_EQ(c.attention_window(0), 0);
  EXPECT_EQ(c.attention_window(1), 8);
  EXPECT_EQ(c.attention_window(3), 8);
  {  // through to_json and back
    const ModelConfig back = ModelConfig::from_json(c.to_json());
    for (int i = 0; i < 4; ++i) EXPECT_EQ(back.attention_window(i), c.attention_window(i)) << i;
  }
  // layer_types, when given, decide.
  j["layer_types"] = {"sliding_attention", "full_attention", "sliding_attention", "full_attention"};
  const ModelConfig t = ModelConfig::from_json(j);
  EXPECT_EQ(t.attention_window(0), 8);
  EXPECT_EQ(t.attention_window(1), 0);
  EXPECT_EQ(t.attention_window(2), 8);
  EXPECT_EQ(t.attention_window(3), 0);
  // A made config (no source) names its layers in layer_types and reads back the same.
  ModelConfig made = find_preset("qwen2-tiny").config;
  made.sliding_window = 5;
  made.sliding_layers = {false, true};
  const json mj = made.to_json();
  EXPECT_EQ(mj.at("use_sliding_window"), true);
  EXPECT_EQ(mj.at("layer_types"), json::array({"full_attention", "sliding_attention"}));
  const ModelConfig mb = ModelConfig::from_json(mj);
  EXPECT_EQ(mb.attention_window(0), 0);
  EXPECT_EQ(mb.attention_window(1), 5);
  // Every layer below max_window_layers: no window anywhere.
  j.erase("layer_types");
  j["max_window_layers"] = 4;
  EXPECT_EQ(ModelConfig::from_json(j).sliding_window, 0);
  // use_sliding_window false: the window fields are not used.
  j["use_sliding_window"] = false;
  j["max_window_layers"] = 0;
  EXPECT_EQ(ModelConfig::from_json(j).sliding_window, 0);
}

TEST(ModelConfig, VariantFieldsOutOfRangeAreRefusedNamingTheField) {
  {
    json j = qwen25_json();
    j["use_sliding_window"] = "yes";
    expect_refused(j, ErrorKind::format, {"use_sliding_window", "true or false"});
  }
  {
    json j = qwen25_json();
    j["use_sliding_window"] = true;
    j["sliding_window"] = 0;
    expect_refused(j, ErrorKind::format, {"sliding_window", "positive"});
  }
  {
    json j = mistral_json();
    j["sliding_window"] = -4;
    expect_refused(j, ErrorKind::format, {"sliding_window", "-4"});
  }
  {
    json j = mistral_json();
    j["sliding_window"] = "4096";
    expect_refused(j, ErrorKind::format, {"sliding_window", "integer"});
  }
  {
    json j = mistral_json();
    j["sliding_window"] = std::int64_t{1} << 40;
    expect_refused(j, ErrorKind::unsupported, {"sliding_window", "larger than zo2 runs"});
  }
  {
    json j = qwen25_json();
    j["use_sliding_window"] = true;
    j["max_window_layers"] = -1;
    expect_refused(j, ErrorKind::format, {"max_window_layers", "-1"});
  }
  {
    json j = qwen25_json();
    j["use_sliding_window"] = true;
    j["layer_types"] = {"full_attention"};
    expect_refused(j, ErrorKind::format, {"layer_types", "24"});
  }
  {
    json j = qwen25_json();
    j["use_sliding_window"] = true;
    j["num_hidden_layers"] = 2;
    j["layer_types"] = {"full_attention", "chunked_attention"};
    expect_refused(j, ErrorKind::unsupported, {"layer_types[1]", "chunked_attention"});
  }
  {
    json j = qwen3_json();
    j["hidden_act"] = "gelu";
    expect_refused(j, ErrorKind::unsupported, {"hidden_act", "gelu", "Qwen3"});
  }
  {
    json j = qwen3_json();
    j["head_dim"] = 127;
    expect_refused(j, ErrorKind::unsupported, {"head_dim", "127", "even"});
  }
  {
    json j = qwen3_json();
    j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
    expect_refused(j, ErrorKind::unsupported, {"rope_scaling.rope_type", "yarn"});
  }
  {  // A missing num_key_value_heads is Qwen2Config's default 32: 14 heads are not a multiple.
    json j = qwen25_json();
    j.erase("num_key_value_heads");
    expect_refused(j, ErrorKind::format, {"num_attention_heads (14)", "num_key_value_heads (32)"});
  }
  {
    json j = qwen25_json();
    j["model_type"] = "gemma2";
    expect_refused(j, ErrorKind::unsupported, {"gemma2", "qwen2", "qwen3", "mistral", "gemma3_text"});
  }
}


TEST(ModelConfig, Llama3RopeInverseFrequenciesMatchTransformersComputation) {
  struct Case {
    double theta, factor, low, high;
    std::int64_t old_len, head_dim;
  } cases[] = {{500000.0, 8.0, 1.0, 4.0, 8192, 128}, {500000.0, 32.0, 1.0, 4.0, 8192, 64},
               {10000.0, 4.0, 2.0, 8.0, 2048, 96}};
  for (const Case& k : cases) {
    json j = llama_json();
    j["hidden_size"] = k.head_dim * 4;
    j["head_dim"] = k.head_dim;
    j["rope_theta"] = k.theta;
    j["rope_scaling"] = {{"rope_type", "llama3"},   {"factor", k.factor},
                         {"low_freq_factor", k.low}, {"high_freq_factor", k.high},
                         {"original_max_position_embeddings", k.old_len}};
    const ModelConfig c = ModelConfig::from_json(j);
    const std::vector<float> got = c.rope_inv_freq();
    int regimes[3] = {0, 0, 0};
    const std::vector<double> want = llama3_inv_freq(k.theta, k.head_dim, k.factor, k.low, k.high,
                                                     static_cast<double>(k.old_len), regimes);
    ASSERT_EQ(got.size(), want.size());
    for (int r = 0; r < 3; ++r) EXPECT_GT(regimes[r], 0) << "case theta " << k.theta << " regime " << r;
    for (std::size_t i = 0; i < want.size(); ++i)
      EXPECT_NEAR(got[i], want[i], 1e-6 * want[i]) << "theta " << k.theta << " i " << i;
  }
}

TEST(ModelConfig, DefaultRopeFrequenciesAreInversePowersAndLinearDividesByTheFactor) {
  json def = llama_json();
  def["rope_theta"] = 10000.0;
  const std::vector<float> d = ModelConfig::from_json(def).rope_inv_freq();
  const std::vector<double> want = default_inv_freq(10000.0, 16);
  ASSERT_EQ(d.size(), 8u);
  for (std::size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(d[i], want[i], 1e-6 * want[i]) << i;

  json lin = def;
  lin["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 3.0}};
  const std::vector<float> l = ModelConfig::from_json(lin).rope_inv_freq();
  ASSERT_EQ(l.size(), d.size());
  for (std::size_t i = 0; i < d.size(); ++i) EXPECT_FLOAT_EQ(l[i], d[i] / 3.0f) << i;
}

// ---- refusals ----

TEST(ModelConfig, RefusalsNameTheFieldAndItsValue) {
  {
    json j = opt_json();
    j["model_type"] = "gpt2";
    expect_refused(j, ErrorKind::unsupported, {"model_type", "gpt2"});
  }
  {
    json j = llama_json();
    j.erase("hidden_size");
    expect_refused(j, ErrorKind::format, {"hidden_size", "missing"});
  }
  {
    json j = opt_json();
    j.erase("hidden_size");
    expect_refused(j, ErrorKind::format, {"hidden_size", "missing"});
  }
  {
    json j = llama_json();
    j["hidden_act"] = "gelu";
    expect_refused(j, ErrorKind::unsupported, {"hidden_act", "gelu"});
  }
  {
    json j = opt_json();
    j["activation_function"] = "gelu";
    expect_refused(j, ErrorKind::unsupported, {"activation_function", "gelu"});
  }
  {
    json j = llama_json();
    j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
    expect_refused(j, ErrorKind::unsupported, {"rope_type", "yarn"});
  }
  {
    json j = llama_json();
    j["hidden_size"] = 96;
    j["num_attention_heads"] = 6;
    j["num_key_value_heads"] = 4;
    expect_refused(j, ErrorKind::format, {"num_attention_heads (6)", "num_key_value_heads (4)"});
  }
  {
    json j = opt_json();
    j["hidden_size"] = 100;
    j["word_embed_proj_dim"] = 100;
    j["num_attention_heads"] = 3;
    expect_refused(j, ErrorKind::format, {"hidden_size (100)", "num_attention_heads (3)"});
  }
  {
    json j = llama_json();
    j["hidden_size"] = "64";
    expect_refused(j, ErrorKind::format, {"hidden_size", "\"64\"", "integer"});
  }
  {  // 2^63 read as int64 would be negative ("must be positive, got -9223372036854775808")
    json j = llama_json();
    j["hidden_size"] = std::uint64_t{1} << 63;
    expect_refused(j, ErrorKind::format, {"field 'hidden_size' = 9223372036854775808 is too large"});
  }
  {
    json j = opt_json();
    j["num_hidden_layers"] = 2.5;
    expect_refused(j, ErrorKind::format, {"num_hidden_layers", "2.5"});
  }
  {
    json j = opt_json();
    j["layer_norm_elementwise_affine"] = false;
    expect_refused(j, ErrorKind::unsupported, {"layer_norm_elementwise_affine", "false"});
  }
  {
    json j = llama_json();
    j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 8192}};
    expect_refused(j, ErrorKind::format, {"rope_scaling.low_freq_factor"});
  }
  {
    json j = llama_json();
    j["rope_scaling"] = {{"rope_type", "linear"}};
    expect_refused(j, ErrorKind::format, {"rope_scaling.factor"});
  }
  {
    json j = llama_json();
    j["vocab_size"] = 0;
    expect_refused(j, ErrorKind::format, {"vocab_size", "0"});
  }
  {
    json j = llama_json();
    j.erase("model_type");
    expect_refused(j, ErrorKind::format, {"model_type"});
  }
}

// Issue 16 #11: sizes are checked when config.json is read, before anything is sized from
// them — num_hidden_layers 2^31−1 used to build a layout per layer (48 s, 4.6 GB, then
// bad_alloc), hidden_size 2^40 overflowed the int64 parameter counts (wrapped sizes in the
// messages), and max_position_embeddings 2^40 became a sequence length of "(0)".
TEST(ModelConfig, SizesBeyondWhatZo2RunsAreRefusedNamingTheFieldAndValue) {
  const std::int64_t two31 = (std::int64_t{1} << 31) - 1, two40 = std::int64_t{1} << 40;
  for (const json& base : {opt_json(), llama_json()}) {
    const std::string ffn = base["model_type"] == "opt" ? "ffn_dim" : "intermediate_size";
    for (const auto& [field, value] : std::vector<std::pair<std::string, std::int64_t>>{
             {"num_hidden_layers", two31}, {"num_hidden_layers", 65537}, {"hidden_size", two40},
             {"max_position_embeddings", two40}, {"max_position_embeddings", two31}, {ffn, two40}}) {
      json j = base;
      j[field] = value;
      if (field == "hidden_size" && base["model_type"] == "opt") j["word_embed_proj_dim"] = two40;
      expect_refused(j, ErrorKind::unsupported, {field, std::to_string(value), "larger than zo2 runs"});
    }
  }
  {
    json j = llama_json();  // heads reach the kernels as ints
    j["num_attention_heads"] = two40;
    j["num_key_value_heads"] = two40;
    j["head_dim"] = 16;
    expect_refused(j, ErrorKind::unsupported, {"num_attention_heads", std::to_string(two40)});
  }
  // Each size within its range, the product beyond what zo2 can address: refused by the
  // product, with the fields it comes from (no int64 overflow on the way).
  json j = llama_json();
  j["hidden_size"] = std::int64_t{1} << 24;
  j["intermediate_size"] = std::int64_t{1} << 24;
  j["num_attention_heads"] = 1 << 16;
  j["num_key_value_heads"] = 1 << 16;
  j["num_hidden_layers"] = 1 << 16;
  expect_refused(j, ErrorKind::unsupported, {"parameters", "2^62", "hidden_size 16777216", "num_hidden_layers 65536"});
  // The largest shapes zo2 ships presets for still load (opt-175b, llama2-70b: config_test's
  // preset tests), and a wide but addressable one does too.
  json wide = opt_json();
  wide["hidden_size"] = 1 << 20;
  wide["word_embed_proj_dim"] = 1 << 20;
  wide["ffn_dim"] = 1 << 22;
  EXPECT_NO_THROW((void)ModelConfig::from_json(wide, "wide/config.json"));
}

TEST(ModelConfig, ConfigJsonThatIsNotJsonIsAFormatErrorNamingThePath) {
  test::TempDir dir;
  {
    std::ofstream out(dir / "config.json");
    out << "{\"model_type\": \"opt\", this is not json";
  }
  const Error e = error_of([&] { (void)ModelConfig::load(dir.path()); });
  EXPECT_EQ(e.kind(), ErrorKind::format);
  EXPECT_NE(std::string(e.what()).find((dir / "config.json").string()), std::string::npos) << e.what();

  const Error missing = error_of([&] { (void)ModelConfig::load(dir / "nowhere"); });
  EXPECT_EQ(missing.kind(), ErrorKind::io);
  EXPECT_NE(std::string(missing.what()).find("nowhere"), std::string::npos) << missing.what();
}

// Adversarial pass 52: 300,000 '[' (600 KB) under an unknown key crashed ModelConfig::load with
// a stack overflow (the tree's recursive copy into c.source): the file is refused by its depth
// before a deep tree is built (Note [Reading JSON]). In a child, so that a crash fails the
// test, not the test binary.
TEST(ModelConfig, ConfigJsonNestedPastTheLimitIsRefusedNamingTheFile) {
  test::TempDir dir;
  auto write = [&](int depth) {
    std::string text = opt_json().dump();
    text.pop_back();  // the closing brace
    std::ofstream(dir / "config.json") << text + ", \"zz\": " + std::string(depth, '[') + std::string(depth, ']') + "}";
  };
  write(63);  // with the top-level object, 64 levels: the limit, taken
  EXPECT_NO_THROW((void)ModelConfig::load(dir.path()));
  write(64);
  Error e = error_of([&] { (void)ModelConfig::load(dir.path()); });
  EXPECT_EQ(e.kind(), ErrorKind::format);
  EXPECT_EQ(std::string(e.what()), (dir / "config.json").string() + ": nested deeper than 64 levels");
  write(300000);
  const int rc = test::in_child([&] {
    const Error deep = error_of([&] { (void)ModelConfig::load(dir.path()); });
    return std::string(deep.what()) == (dir / "config.json").string() + ": nested deeper than 64 levels" ? 0 : 1;
  });
  EXPECT_EQ(rc, 0) << "1: the wrong error; 128 + N: killed by signal N";
}

// A config.json that is a FIFO (a shared model directory) hung `zo2-tune plan` in open(2); a
// FIFO or a directory there is refused by name, as a FIFO model.safetensors is. In a child
// with an alarm, so that a hang fails the test.
TEST(ModelConfig, ConfigJsonThatIsAFifoOrADirectoryIsRefusedNamingIt) {
  for (bool fifo : {true, false}) {
    test::TempDir dir;
    const fs::path cfg = dir / "config.json";
    if (fifo)
      ASSERT_EQ(::mkfifo(cfg.c_str(), 0600), 0);
    else
      fs::create_directory(cfg);
    const int rc = test::in_child([&] {
      ::alarm(10);
      const Error e = error_of([&] { (void)ModelConfig::load(dir.path()); });
      return e.kind() == ErrorKind::io &&
                     std::string(e.what()) == cfg.string() + (fifo ? ": is a FIFO, not a regular file"
                                                                   : ": is a directory, not a file")
                 ? 0
                 : 1;
    });
    EXPECT_EQ(rc, 0) << (fifo ? "FIFO" : "directory") << " — 1: the wrong error; 128 + 14: it hung";
  }
}

// Found by fuzz/config_fuzz.cpp: a whole number beyond int64 was converted anyway (undefined
// behaviour), and a number beyond a double escaped as the JSON library's out_of_range.
TEST(ModelConfig, NumbersBeyondRangeAreFormatErrorsNamingFieldOrFile) {
  for (double v : {2.18e23, -1e19, 0x1p63}) {
    json j = opt_json();
    j["hidden_size"] = v;
    expect_refused(j, ErrorKind::format, {"hidden_size"});
  }
  test::TempDir dir;
  {
    std::ofstream out(dir / "config.json");
    out << R"({"model_type": "opt", "hidden_size": 1e400})";
  }
  const Error e = error_of([&] { (void)ModelConfig::load(dir.path()); });
  EXPECT_EQ(e.kind(), ErrorKind::format);
  EXPECT_NE(std::string(e.what()).find((dir / "config.json").string()), std::string::npos) << e.what();
}

// ---- presets and round trips ----

void expect_same_config(const ModelConfig& a, const ModelConfig& b, const std::string& what) {
  SCOPED_TRACE(what);
  EXPECT_EQ(a.family, b.family);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.num_layers, b.num_layers);
  EXPECT_EQ(a.num_heads, b.num_heads);
  EXPECT_EQ(a.num_kv_heads, b.num_kv_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.ffn_dim, b.ffn_dim);
  EXPECT_EQ(a.max_positions, b.max_positions);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.norm_eps, b.norm_eps);
  EXPECT_EQ(a.pre_layer_norm, b.pre_layer_norm);
  EXPECT_EQ(a.final_layer_norm, b.final_layer_norm);
  EXPECT_EQ(a.word_embed_proj_dim, b.word_embed_proj_dim);
  EXPECT_EQ(a.linear_bias, b.linear_bias);
  EXPECT_EQ(a.attention_bias, b.attention_bias);
  EXPECT_EQ(a.mlp_bias, b.mlp_bias);
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.qkv_bias, b.qkv_bias);
  EXPECT_EQ(a.qk_norm, b.qk_norm);
  EXPECT_EQ(a.sliding_window, b.sliding_window);
  for (std::int64_t i = 0; i < a.num_layers && i < 256; ++i) {
    EXPECT_EQ(a.attention_window(i), b.attention_window(i)) << "layer " << i;
    EXPECT_EQ(a.local_layer(i), b.local_layer(i)) << "layer " << i;
  }
  EXPECT_EQ(a.query_pre_attn_scalar, b.query_pre_attn_scalar);
  if (a.gemma3()) {
    EXPECT_EQ(a.rope_local.type, b.rope_local.type);
    EXPECT_EQ(a.rope_local.theta, b.rope_local.theta);
  }
  EXPECT_EQ(a.rope.type, b.rope.type);
  EXPECT_EQ(a.rope.theta, b.rope.theta);
  if (a.rope.type == RopeType::linear || a.rope.type == RopeType::llama3) {
    EXPECT_EQ(a.rope.factor, b.rope.factor);
  }
  if (a.rope.type == RopeType::llama3) {
    EXPECT_EQ(a.rope.low_freq_factor, b.rope.low_freq_factor);
    EXPECT_EQ(a.rope.high_freq_factor, b.rope.high_freq_factor);
    EXPECT_EQ(a.rope.original_max_positions, b.rope.original_max_positions);
  }
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_id, b.eos_token_id);
  EXPECT_EQ(a.pad_token_id, b.pad_token_id);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
  EXPECT_EQ(a.total_params(), b.total_params());
}

TEST(Presets, EveryPresetValidatesAndRoundTripsThroughConfigJsonText) {
  ASSERT_GE(presets().size(), 15u);
  for (const Preset& p : presets()) {
    EXPECT_NO_THROW(p.config.validate("preset " + p.name)) << p.name;
    const ModelConfig direct = ModelConfig::from_json(p.config.to_json(), p.name);
    expect_same_config(p.config, direct, p.name + " (json)");
    // Through text, as `init` writes it and transformers or zo2 read it back.
    const ModelConfig text = ModelConfig::from_json(json::parse(p.config.to_json().dump(2)), p.name);
    expect_same_config(p.config, text, p.name + " (text)");
    EXPECT_EQ(&find_preset(p.name), &p);
  }
}

TEST(Presets, GoldenConfigsRoundTripKeepingTheirOtherFields) {
  for (const char* name : {"opt-tiny", "opt-tiny-postln", "llama-tiny"}) {
    const ModelConfig c = ModelConfig::load(test::shared_dir() / "golden" / name);
    const json j = c.to_json();
    expect_same_config(c, ModelConfig::from_json(j), name);
    EXPECT_EQ(j.at("transformers_version"), "5.17.0") << name;
    EXPECT_EQ(j.at("use_cache"), true) << name;
    if (c.family == ModelFamily::llama) {
      // The source used rope_parameters: so does the output (with the theta inside).
      EXPECT_TRUE(j.contains("rope_parameters")) << j.dump();
      EXPECT_EQ(j.at("rope_parameters").at("rope_theta"), 10000.0);
    }
  }
}

TEST(Presets, UnknownPresetNameIsInvalidArgumentListingTheKnownNames) {
  const Error e = error_of([] { (void)find_preset("opt-7b"); });
  EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
  EXPECT_NE(std::string(e.what()).find("opt-7b"), std::string::npos);
  EXPECT_NE(std::string(e.what()).find("opt-6.7b"), std::string::npos) << e.what();
}

TEST(Presets, ParameterCountsMatchTransformers) {
  // As transformers' num_parameters() reports them (tied head counted once).
  EXPECT_EQ(find_preset("opt-125m").config.total_params(), 125'239'296);
  EXPECT_EQ(find_preset("opt-1.3b").config.total_params(), 1'315'758'080);
  EXPECT_EQ(find_preset("llama2-7b").config.total_params(), 6'738'415'616);
  EXPECT_EQ(find_preset("llama3-8b").config.total_params(), 8'030'261'248);
  EXPECT_EQ(find_preset("qwen2.5-0.5b").config.total_params(), 494'032'768);
  EXPECT_EQ(find_preset("qwen2.5-7b").config.total_params(), 7'615'616'512);
  EXPECT_EQ(find_preset("qwen3-0.6b").config.total_params(), 596'049'920);
  EXPECT_EQ(find_preset("qwen3-8b").config.total_params(), 8'190'735'360);
  EXPECT_EQ(find_preset("mistral-7b").config.total_params(), 7'241'732'096);
  EXPECT_EQ(find_preset("gemma3-1b").config.total_params(), 999'885'952);
}

TEST(Presets, VariantPresetsMatchTheirShippedConfigs) {
  // The presets equal the shipped config.json files (above) in every field zo2 runs.
  for (const auto& [name, j] : {std::pair{"qwen2.5-0.5b", qwen25_json()}, std::pair{"qwen3-0.6b", qwen3_json()},
                                std::pair{"mistral-7b", mistral_json()}, std::pair{"gemma3-1b", gemma3_json()}}) {
    const ModelConfig& p = find_preset(name).config;
    ModelConfig c = ModelConfig::from_json(j);
    c.torch_dtype = p.torch_dtype;  // the files say bfloat16, init writes float32
    expect_same_config(p, c, name);
    EXPECT_EQ(p.model_type, c.model_type) << name;
    EXPECT_EQ(p.qkv_bias, c.qkv_bias) << name;
    EXPECT_EQ(p.qk_norm, c.qk_norm) << name;
    EXPECT_EQ(p.sliding_window, c.sliding_window) << name;
  }
}

// ---- layouts ----

struct Interval {
  std::size_t begin, end;
  std::string what;
};

void check_layout(const ImageLayout& l, DType storage, const std::string& what) {
  SCOPED_TRACE(what);
  std::vector<Interval> spans;
  EXPECT_EQ(l.bytes() % 256, 0u);
  for (const TensorSlot& t : l.tensors()) {
    EXPECT_EQ(t.offset % 256, 0u) << t.name;
    EXPECT_EQ(t.bytes, static_cast<std::size_t>(t.numel()) * dtype_size(t.dtype)) << t.name;
    EXPECT_EQ(t.numel(), t.ndim == 1 ? t.cols : t.rows * t.cols) << t.name;
    const DType want = storage == DType::f8_e4m3 && t.ndim == 1 ? DType::bf16 : storage;
    EXPECT_EQ(t.dtype, want) << t.name;
    spans.push_back({t.offset, t.offset + t.bytes, t.name});
    if (t.has_scales()) {
      EXPECT_EQ(t.scale_offset % 256, 0u) << t.name;
      EXPECT_GE(t.scale_offset, t.offset + t.bytes) << t.name << ": scales come after the data";
      spans.push_back({t.scale_offset, t.scale_offset + static_cast<std::size_t>(t.rows) * 4,
                       t.name + " scales"});
    }
    EXPECT_EQ(l.find(t.name), &t);
    EXPECT_EQ(l.find(t.role), &t);
  }
  std::sort(spans.begin(), spans.end(), [](const Interval& a, const Interval& b) { return a.begin < b.begin; });
  for (std::size_t i = 0; i < spans.size(); ++i) {
    EXPECT_LE(spans[i].end, l.bytes()) << spans[i].what;
    if (i + 1 < spans.size()) {
      EXPECT_LE(spans[i].end, spans[i + 1].begin) << spans[i].what << " overlaps " << spans[i + 1].what;
    }
  }
}

TEST(Layout, TensorsAreAlignedDisjointAndSizedForEveryStorageDtype) {
  for (const char* name : {"opt-tiny", "opt-tiny-postln", "llama-tiny", "opt-125m", "llama3-8b", "llama2-70b",
                           "qwen2-tiny", "qwen3-tiny", "mistral-tiny", "qwen2.5-0.5b", "qwen3-32b", "mistral-7b",
                           "gemma3-tiny", "gemma3-27b"}) {
    const ModelConfig& c = find_preset(name).config;
    for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3}) {
      const std::string tag = std::string(name) + " " + std::string(dtype_name(dt));
      check_layout(block_layout(c, 0, dt), dt, tag + " block 0");
      check_layout(block_layout(c, c.num_layers - 1, dt), dt, tag + " last block");
      check_layout(globals_layout(c, dt), dt, tag + " globals");
      // Every block has the same layout up to the layer number in the names.
      const ImageLayout b0 = block_layout(c, 0, dt), b1 = block_layout(c, 1, dt);
      ASSERT_EQ(b0.tensors().size(), b1.tensors().size());
      EXPECT_EQ(b0.bytes(), b1.bytes());
      for (std::size_t i = 0; i < b0.tensors().size(); ++i) EXPECT_EQ(b0.tensors()[i].offset, b1.tensors()[i].offset);
      EXPECT_EQ(globals_layout(c, dt).params() + c.num_layers * b0.params(), c.total_params()) << tag;
    }
  }
}

TEST(Layout, Fp8TensorsCarryOneFp32ScalePerRowAndVectorsStayBf16) {
  const ModelConfig& c = find_preset("opt-tiny").config;
  const ImageLayout l = block_layout(c, 0, DType::f8_e4m3);
  const TensorSlot& fc1 = l.at(Role::fc1_w);
  EXPECT_EQ(fc1.dtype, DType::f8_e4m3);
  EXPECT_EQ(fc1.rows, 256);
  EXPECT_EQ(fc1.bytes, 256u * 64u);
  EXPECT_EQ(fc1.scale_offset, fc1.offset + 256 * 64);  // 16384 is already aligned
  const TensorSlot& bias = l.at(Role::fc1_b);
  EXPECT_EQ(bias.dtype, DType::bf16);
  EXPECT_FALSE(bias.has_scales());
  EXPECT_EQ(bias.bytes, 256u * 2);
  EXPECT_EQ(slot_dtype(DType::f8_e4m3, 1), DType::bf16);
  EXPECT_EQ(slot_dtype(DType::f8_e4m3, 2), DType::f8_e4m3);
  EXPECT_EQ(slot_dtype(DType::f16, 1), DType::f16);
}

// Names and shapes of a model's tensors from its layouts, globals first.
std::vector<NamedShape> layout_tensors(const ModelConfig& c) {
  std::vector<NamedShape> out;
  const ImageLayout globals = globals_layout(c, DType::bf16);
  for (const auto& t : globals.tensors()) out.push_back({t.name, t.shape()});
  for (std::int64_t i = 0; i < c.num_layers; ++i) {
    const ImageLayout block = block_layout(c, i, DType::bf16);
    for (const auto& t : block.tensors()) {
      EXPECT_EQ(t.name.rfind(block_prefix(c, i), 0), 0u) << t.name;
      out.push_back({t.name, t.shape()});
    }
  }
  return out;
}

TEST(Layout, NamesAndShapesMatchCheckpointTensorsAndTheGoldenCheckpoints) {
  for (const char* name : {"opt-tiny", "opt-tiny-postln", "llama-tiny"}) {
    const ModelConfig c = ModelConfig::load(test::shared_dir() / "golden" / name);
    const std::vector<NamedShape> ck = checkpoint_tensors(c), lay = layout_tensors(c);
    ASSERT_EQ(ck.size(), lay.size()) << name;
    std::set<std::string> unique;
    for (std::size_t i = 0; i < ck.size(); ++i) {
      EXPECT_EQ(ck[i].name, lay[i].name) << name;
      EXPECT_EQ(ck[i].shape, lay[i].shape) << ck[i].name;
      EXPECT_TRUE(unique.insert(ck[i].name).second) << "duplicate " << ck[i].name;
    }
    // transformers wrote these checkpoints: the same names with the same shapes.
    const SafetensorsFile f = SafetensorsFile::open(test::shared_dir() / "golden" / name / "model.safetensors");
    std::map<std::string, std::vector<std::int64_t>> hf, ours;
    for (const auto& t : f.tensors()) hf[t.name] = t.shape;
    for (const auto& t : ck) ours[t.name] = t.shape;
    EXPECT_EQ(ours, hf) << name;
  }
}

TEST(Layout, TiedHeadHasNoLmHeadAndUntiedHeadHasOne) {
  const ImageLayout tied = globals_layout(find_preset("opt-tiny").config, DType::f32);
  EXPECT_EQ(tied.find(Role::lm_head), nullptr);
  EXPECT_EQ(tied.find("lm_head.weight"), nullptr);
  const ImageLayout tied_llama = globals_layout(find_preset("llama3.2-1b").config, DType::f32);
  EXPECT_EQ(tied_llama.find(Role::lm_head), nullptr);
  const ModelConfig& u = find_preset("llama-tiny").config;
  const ImageLayout untied = globals_layout(u, DType::f32);
  ASSERT_NE(untied.find(Role::lm_head), nullptr);
  EXPECT_EQ(untied.at(Role::lm_head).name, "lm_head.weight");
  EXPECT_EQ(untied.at(Role::lm_head).shape(), (std::vector<std::int64_t>{512, 64}));
  // The untied head is counted; the tied one is not counted twice.
  ModelConfig tied_copy = u;
  tied_copy.tie_word_embeddings = true;
  EXPECT_EQ(u.total_params() - tied_copy.total_params(), 512 * 64);
}

TEST(Layout, OptProjectionsAppearOnlyWhenTheWordEmbeddingIsNarrower) {
  const ModelConfig& post = find_preset("opt-tiny-postln").config;
  const ImageLayout g = globals_layout(post, DType::f32);
  ASSERT_NE(g.find(Role::project_in), nullptr);
  ASSERT_NE(g.find(Role::project_out), nullptr);
  EXPECT_EQ(g.at(Role::project_in).name, "model.decoder.project_in.weight");
  EXPECT_EQ(g.at(Role::project_in).shape(), (std::vector<std::int64_t>{64, 32}));
  EXPECT_EQ(g.at(Role::project_out).shape(), (std::vector<std::int64_t>{32, 64}));
  EXPECT_EQ(g.at(Role::embed_tokens).shape(), (std::vector<std::int64_t>{512, 32}));
  EXPECT_EQ(g.at(Role::embed_positions).shape(), (std::vector<std::int64_t>{66, 64}));
  EXPECT_EQ(g.find(Role::final_norm_w), nullptr) << "post-LN OPT has no final LayerNorm";
  const ImageLayout pre = globals_layout(find_preset("opt-tiny").config, DType::f32);
  EXPECT_EQ(pre.find(Role::project_in), nullptr);
  EXPECT_EQ(pre.find(Role::project_out), nullptr);
  EXPECT_NE(pre.find(Role::final_norm_w), nullptr);
}

// ---- batches ----

const ModelConfig& opt_tiny() { return find_preset("opt-tiny").config; }
const ModelConfig& llama_tiny() { return find_preset("llama-tiny").config; }

TEST(MakeBatch, OptPositionsFollowTheMaskCumulativeSumWithOffsetTwo) {
  // Row 0 right-padded, row 1 left-padded, row 2 unpadded.
  const std::vector<std::int32_t> ids = {5, 6, 7, 1, 1, /**/ 1, 1, 7, 8, 9, /**/ 10, 11, 12, 13, 14};
  const std::vector<std::int32_t> mask = {1, 1, 1, 0, 0, /**/ 0, 0, 1, 1, 1, /**/ 1, 1, 1, 1, 1};
  const HostBatch b = make_batch(opt_tiny(), 3, 5, ids, mask);
  // transformers: (cumsum(mask) * mask − 1) + 2.
  EXPECT_EQ(b.positions, (std::vector<std::int32_t>{2, 3, 4, 1, 1, /**/ 1, 1, 2, 3, 4, /**/ 2, 3, 4, 5, 6}));
  EXPECT_EQ(b.key_mask, mask);
  EXPECT_EQ(b.ids, ids);
  EXPECT_EQ(b.tokens(), 15);
}

TEST(MakeBatch, LlamaPositionsAreZeroToTMinusOneWhateverTheMask) {
  const std::vector<std::int32_t> ids = {5, 6, 7, 1, /**/ 1, 7, 8, 9};
  const std::vector<std::int32_t> mask = {1, 1, 1, 0, /**/ 0, 1, 1, 1};
  const HostBatch b = make_batch(llama_tiny(), 2, 4, ids, mask);
  EXPECT_EQ(b.positions, (std::vector<std::int32_t>{0, 1, 2, 3, 0, 1, 2, 3}));
}

TEST(MakeBatch, TargetsAreTheNextTokenWhereTheNextMaskIsOneElseIgnored) {
  const std::vector<std::int32_t> ids = {5, 6, 7, 1, 1, /**/ 1, 1, 7, 8, 9};
  const std::vector<std::int32_t> mask = {1, 1, 1, 0, 0, /**/ 0, 0, 1, 1, 1};
  const HostBatch b = make_batch(opt_tiny(), 2, 5, ids, mask);
  // Row 1's last pad does not predict its first token (a masked position predicts nothing).
  EXPECT_EQ(b.targets, (std::vector<std::int32_t>{6, 7, -100, -100, -100, /**/ -100, -100, 8, 9, -100}));
  EXPECT_EQ(b.target_count(), 4);
  // No mask: every next token is a target, the last position never is.
  const HostBatch all = make_batch(llama_tiny(), 1, 4, std::vector<std::int32_t>{3, 4, 5, 6});
  EXPECT_EQ(all.targets, (std::vector<std::int32_t>{4, 5, 6, -100}));
  EXPECT_EQ(all.key_mask, (std::vector<std::int32_t>{1, 1, 1, 1}));
}

TEST(MakeBatch, TargetsDoNotDependOnThePaddingSideWithOrWithoutLabels) {
  // The same sequence [5 6 7] alone, right-padded and left-padded to 5: the same targets
  // (6, 7), whether they come from the mask or from labels = ids (a text's labels, BOS included).
  const std::vector<std::int32_t> right = {5, 6, 7, 1, 1}, left = {1, 1, 5, 6, 7};
  const std::vector<std::int32_t> right_mask = {1, 1, 1, 0, 0}, left_mask = {0, 0, 1, 1, 1};
  const std::vector<std::int32_t> right_labels = {5, 6, 7, -100, -100}, left_labels = {-100, -100, 5, 6, 7};
  for (const ModelConfig* c : {&opt_tiny(), &llama_tiny()}) {
    const HostBatch alone = make_batch(*c, 1, 3, std::vector<std::int32_t>{5, 6, 7});
    const HostBatch r = make_batch(*c, 1, 5, right, right_mask), l = make_batch(*c, 1, 5, left, left_mask);
    const HostBatch rl = make_batch(*c, 1, 5, right, right_mask, right_labels);
    const HostBatch ll = make_batch(*c, 1, 5, left, left_mask, left_labels);
    EXPECT_EQ(alone.target_count(), 2);
    EXPECT_EQ(r.target_count(), 2);
    EXPECT_EQ(l.target_count(), 2);
    EXPECT_EQ(rl.target_count(), 2);
    EXPECT_EQ(ll.target_count(), 2);
    EXPECT_EQ(l.targets, (std::vector<std::int32_t>{-100, -100, 6, 7, -100}));
    EXPECT_EQ(ll.targets, l.targets);
    EXPECT_EQ(rl.targets, r.targets);
  }
}

TEST(MakeBatch, LabelsAreShiftedByOneAndMinus100IsKept) {
  const std::vector<std::int32_t> ids = {5, 6, 7, 8, 9};
  const std::vector<std::int32_t> labels = {-100, -100, 70, 80, -100};
  const HostBatch b = make_batch(llama_tiny(), 1, 5, ids, {}, labels);
  EXPECT_EQ(b.targets, (std::vector<std::int32_t>{-100, 70, 80, -100, -100}));
  EXPECT_EQ(b.target_count(), 2);
}

TEST(MakeBatch, BadInputsAreInvalidArgumentNamingSequenceAndPosition) {
  const ModelConfig& c = opt_tiny();  // V = 512, 64 positions
  auto expect_bad = [](auto fn, std::vector<std::string> pieces) {
    const Error e = error_of(fn);
    EXPECT_EQ(e.kind(), ErrorKind::invalid_argument) << e.what();
    for (const auto& p : pieces)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "'" << p << "' in: " << e.what();
  };
  std::vector<std::int32_t> ids(8, 3);
  ids[6] = 512;  // row 1, position 2
  expect_bad([&] { (void)make_batch(c, 2, 4, ids); }, {"512", "sequence 1, position 2"});
  ids[6] = -1;
  expect_bad([&] { (void)make_batch(c, 2, 4, ids); }, {"-1", "sequence 1, position 2"});
  ids[6] = 3;
  std::vector<std::int32_t> mask(8, 1);
  mask[3] = 2;
  expect_bad([&] { (void)make_batch(c, 2, 4, ids, mask); }, {"mask value 2", "sequence 0, position 3"});
  std::vector<std::int32_t> labels(8, -100);
  labels[5] = 600;
  expect_bad([&] { (void)make_batch(c, 2, 4, ids, {}, labels); }, {"label 600", "sequence 1, position 1"});
  labels[5] = -5;
  expect_bad([&] { (void)make_batch(c, 2, 4, ids, {}, labels); }, {"label -5", "sequence 1, position 1"});
  const std::vector<std::int32_t> long_ids(65, 3);
  expect_bad([&] { (void)make_batch(c, 1, 65, long_ids); }, {"65", "64"});
  EXPECT_NO_THROW((void)make_batch(c, 1, 64, std::vector<std::int32_t>(64, 3)));
  expect_bad([&] { (void)make_batch(c, 2, 4, std::vector<std::int32_t>(7, 3)); }, {"7"});
}

}  // namespace
}  // namespace zo2
