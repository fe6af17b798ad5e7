#include "models/presets.h"

#include "runtime/error.h"

#include <fmt/format.h>

namespace zo2 {
namespace {

ModelConfig opt(std::int64_t hidden, std::int64_t layers, std::int64_t heads, std::int64_t ffn,
                std::int64_t vocab = 50272, std::int64_t positions = 2048, bool pre_ln = true,
                std::int64_t proj = 0) {
  ModelConfig c;
  c.family = ModelFamily::opt;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = heads;
  c.head_dim = hidden / heads;
  c.ffn_dim = ffn;
  c.max_positions = positions;
  c.pre_layer_norm = pre_ln;
  c.final_layer_norm = pre_ln;
  c.word_embed_proj_dim = proj > 0 ? proj : hidden;
  c.linear_bias = true;
  c.tie_word_embeddings = true;
  c.norm_eps = 1e-5f;
  c.bos_token_id = 2;
  c.eos_token_id = 2;
  c.pad_token_id = 1;
  return c;
}

ModelConfig llama(std::int64_t hidden, std::int64_t layers, std::int64_t heads, std::int64_t kv_heads,
                  std::int64_t ffn, std::int64_t vocab, std::int64_t positions, double theta,
                  float eps, bool tied = false) {
  ModelConfig c;
  c.family = ModelFamily::llama;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.ffn_dim = ffn;
  c.max_positions = positions;
  c.word_embed_proj_dim = hidden;
  c.linear_bias = false;
  c.tie_word_embeddings = tied;
  c.norm_eps = eps;
  c.rope.type = RopeType::default_;
  c.rope.theta = theta;
  c.bos_token_id = vocab == 32000 ? 1 : 128000;
  c.eos_token_id = vocab == 32000 ? 2 : 128001;
  return c;
}

ModelConfig llama3_scaled(ModelConfig c, double factor, std::int64_t original) {
  c.rope.type = RopeType::llama3;
  c.rope.factor = factor;
  c.rope.low_freq_factor = 1.0;
  c.rope.high_freq_factor = 4.0;
  c.rope.original_max_positions = original;
  return c;
}

// LLaMA-family variants (Note [LLaMA-family variants] in config.cpp).
ModelConfig qwen2(std::int64_t hidden, std::int64_t layers, std::int64_t heads, std::int64_t kv_heads,
                  std::int64_t ffn, std::int64_t vocab, bool tied) {
  ModelConfig c = llama(hidden, layers, heads, kv_heads, ffn, vocab, 32768, 1000000.0, 1e-6f, tied);
  c.model_type = "qwen2";
  c.qkv_bias = true;
  c.bos_token_id = 151643;
  c.eos_token_id = 151643;
  return c;
}

ModelConfig qwen3(std::int64_t hidden, std::int64_t layers, std::int64_t heads, std::int64_t kv_heads,
                  std::int64_t ffn, bool tied) {
  ModelConfig c = llama(hidden, layers, heads, kv_heads, ffn, 151936, 40960, 1000000.0, 1e-6f, tied);
  c.model_type = "qwen3";
  c.head_dim = 128;
  c.qk_norm = true;
  c.bos_token_id = 151643;
  c.eos_token_id = 151645;
  return c;
}

ModelConfig mistral(std::int64_t vocab, std::int64_t positions, double theta, std::int64_t window) {
  ModelConfig c = llama(4096, 32, 32, 8, 14336, vocab, positions, theta, 1e-5f);
  c.model_type = "mistral";
  c.sliding_window = window;
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  return c;
}

// Gemma 3 text (Note [Gemma 3] in config.cpp): tied head, rms_norm_eps 1e-6, global layers
// every 6th (rope_theta 1e6, linear scaling `factor` when > 0), local ones with the window
// and rope_local_base_freq 10000; bos 2, eos 1, pad 0.
ModelConfig gemma3(std::int64_t hidden, std::int64_t layers, std::int64_t heads, std::int64_t kv_heads,
                   std::int64_t head_dim, std::int64_t ffn, std::int64_t vocab, std::int64_t positions,
                   std::int64_t window, double query_pre_attn_scalar, double factor) {
  ModelConfig c = llama(hidden, layers, heads, kv_heads, ffn, vocab, positions, 1000000.0, 1e-6f, true);
  c.model_type = "gemma3_text";
  c.head_dim = head_dim;
  c.qk_norm = true;
  c.query_pre_attn_scalar = query_pre_attn_scalar;
  if (factor > 0) {
    c.rope.type = RopeType::linear;
    c.rope.factor = factor;
  }
  c.rope_local.type = RopeType::default_;
  c.rope_local.theta = 10000.0;
  c.sliding_window = window;
  c.sliding_layers.assign(static_cast<std::size_t>(layers), false);
  for (std::int64_t i = 0; i < layers; ++i) c.sliding_layers[static_cast<std::size_t>(i)] = (i + 1) % 6 != 0;
  c.bos_token_id = 2;
  c.eos_token_id = 1;
  c.pad_token_id = 0;
  return c;
}

// A tiny preset's special ids inside its vocabulary.
ModelConfig tiny_ids(ModelConfig c) {
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  return c;
}

std::vector<Preset> make_presets() {
  std::vector<Preset> p;
  auto add = [&](std::string name, std::string desc, ModelConfig c) {
    c.validate("preset " + name);
    p.push_back({std::move(name), std::move(desc), std::move(c)});
  };
  // Tiny shapes (tests, demos). V = 512 unless they need a real tokenizer.
  add("opt-tiny", "OPT, 2 blocks, hidden 64 (tests)", opt(64, 2, 4, 256, 512, 64));
  add("opt-tiny-postln", "OPT post-LN with project_in/out 32↔64, 3 blocks (tests)",
      opt(64, 3, 8, 128, 512, 64, false, 32));
  {
    ModelConfig c = llama(64, 2, 4, 2, 176, 512, 64, 10000.0, 1e-6f);
    c.head_dim = 16;
    add("llama-tiny", "LLaMA, GQA 4/2 heads, 2 blocks, hidden 64 (tests)", c);
  }
  {
    ModelConfig c = tiny_ids(qwen2(64, 2, 4, 2, 176, 512, true));
    c.max_positions = 64;
    add("qwen2-tiny", "Qwen2, q/k/v biases, GQA 4/2, tied head, 2 blocks, hidden 64 (tests)", c);
  }
  {
    ModelConfig c = tiny_ids(qwen3(64, 2, 4, 2, 176, false));
    c.vocab_size = 512;
    c.head_dim = 24;  // ≠ hidden / heads
    c.max_positions = 64;
    add("qwen3-tiny", "Qwen3, q/k norms, head_dim 24 ≠ 64/4, GQA 4/2, 2 blocks (tests)", c);
  }
  {
    ModelConfig c = tiny_ids(mistral(512, 64, 10000.0, 16));
    c.hidden_size = c.word_embed_proj_dim = 64;
    c.num_layers = 2;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 16;
    c.ffn_dim = 176;
    add("mistral-tiny", "Mistral, sliding window 16, GQA 4/2, 2 blocks, hidden 64 (tests)", c);
  }
  {
    // Local, global, local layers (window 4 < the tests' sequences), head_dim 32 ≠ 64/4,
    // query_pre_attn_scalar 24 ≠ head_dim, linear rotary scaling on the global layer.
    ModelConfig c = gemma3(64, 3, 4, 2, 32, 128, 512, 64, 4, 24.0, 2.0);
    c.sliding_layers = {true, false, true};
    add("gemma3-tiny", "Gemma 3 text, local/global/local layers (window 4), GQA 4/2, head_dim 32 (tests)", c);
  }
  add("opt-micro", "OPT, 4 blocks, hidden 128, GPT-2 vocabulary (demos with a real tokenizer)",
      opt(128, 4, 4, 512, 50272, 512));
  add("llama-micro", "LLaMA, 4 blocks, hidden 128, GQA 4/2, LLaMA-2 vocabulary (demos)",
      llama(128, 4, 4, 2, 352, 32000, 512, 10000.0, 1e-5f));
  // OPT, as facebook/opt-* ship them.
  add("opt-125m", "OPT-125m", opt(768, 12, 12, 3072));
  add("opt-350m", "OPT-350m (post-LN, project_in/out 512↔1024)", opt(1024, 24, 16, 4096, 50272, 2048, false, 512));
  add("opt-1.3b", "OPT-1.3B", opt(2048, 24, 32, 8192));
  add("opt-2.7b", "OPT-2.7B", opt(2560, 32, 32, 10240));
  add("opt-6.7b", "OPT-6.7B", opt(4096, 32, 32, 16384));
  add("opt-13b", "OPT-13B", opt(5120, 40, 40, 20480));
  add("opt-30b", "OPT-30B", opt(7168, 48, 56, 28672));
  add("opt-66b", "OPT-66B", opt(9216, 64, 72, 36864));
  add("opt-175b", "OPT-175B", opt(12288, 96, 96, 49152));
  // LLaMA-2.
  add("llama2-7b", "LLaMA-2 7B", llama(4096, 32, 32, 32, 11008, 32000, 4096, 10000.0, 1e-5f));
  add("llama2-13b", "LLaMA-2 13B", llama(5120, 40, 40, 40, 13824, 32000, 4096, 10000.0, 1e-5f));
  add("llama2-70b", "LLaMA-2 70B (GQA 64/8)", llama(8192, 80, 64, 8, 28672, 32000, 4096, 10000.0, 1e-5f));
  // LLaMA-3.
  add("llama3-8b", "LLaMA-3 8B (GQA 32/8)", llama(4096, 32, 32, 8, 14336, 128256, 8192, 500000.0, 1e-5f));
  add("llama3-70b", "LLaMA-3 70B (GQA 64/8)", llama(8192, 80, 64, 8, 28672, 128256, 8192, 500000.0, 1e-5f));
  add("llama3.1-8b", "LLaMA-3.1 8B (llama3 rotary scaling, 128k positions)",
      llama3_scaled(llama(4096, 32, 32, 8, 14336, 128256, 131072, 500000.0, 1e-5f), 8.0, 8192));
  {
    ModelConfig c = llama3_scaled(llama(2048, 16, 32, 8, 8192, 128256, 131072, 500000.0, 1e-5f, true), 32.0, 8192);
    add("llama3.2-1b", "LLaMA-3.2 1B (tied head, llama3 rotary scaling)", c);
  }
  // Qwen2.5 (Qwen2ForCausalLM), as Qwen/Qwen2.5-* ship them.
  add("qwen2.5-0.5b", "Qwen2.5 0.5B (GQA 14/2, q/k/v biases, tied head)", qwen2(896, 24, 14, 2, 4864, 151936, true));
  add("qwen2.5-1.5b", "Qwen2.5 1.5B (GQA 12/2, q/k/v biases, tied head)", qwen2(1536, 28, 12, 2, 8960, 151936, true));
  add("qwen2.5-7b", "Qwen2.5 7B (GQA 28/4, q/k/v biases)", qwen2(3584, 28, 28, 4, 18944, 152064, false));
  // Qwen3 (Qwen3ForCausalLM): head_dim 128 throughout.
  add("qwen3-0.6b", "Qwen3 0.6B (GQA 16/8, q/k norms, head_dim 128, tied head)", qwen3(1024, 28, 16, 8, 3072, true));
  add("qwen3-1.7b", "Qwen3 1.7B (GQA 16/8, q/k norms, tied head)", qwen3(2048, 28, 16, 8, 6144, true));
  add("qwen3-4b", "Qwen3 4B (GQA 32/8, q/k norms, tied head)", qwen3(2560, 36, 32, 8, 9728, true));
  add("qwen3-8b", "Qwen3 8B (GQA 32/8, q/k norms)", qwen3(4096, 36, 32, 8, 12288, false));
  add("qwen3-14b", "Qwen3 14B (GQA 40/8, q/k norms)", qwen3(5120, 40, 40, 8, 17408, false));
  add("qwen3-32b", "Qwen3 32B (GQA 64/8, q/k norms, head_dim 128 ≠ 5120/64)", qwen3(5120, 64, 64, 8, 25600, false));
  // Mistral 7B: v0.1 with its 4096-token sliding window; v0.3 without one.
  add("mistral-7b", "Mistral 7B v0.1 (GQA 32/8, sliding window 4096)", mistral(32000, 32768, 10000.0, 4096));
  add("mistral-7b-v0.3", "Mistral 7B v0.3 (GQA 32/8, vocabulary 32768, no sliding window)",
      mistral(32768, 32768, 1000000.0, 0));
  // Gemma 3 text models (Gemma3ForCausalLM; the 4b/12b/27b text_config of google/gemma-3-*).
  add("gemma3-1b", "Gemma 3 1B (GQA 4/1, head_dim 256, window 512, 5 local : 1 global)",
      gemma3(1152, 26, 4, 1, 256, 6912, 262144, 32768, 512, 256, 0));
  add("gemma3-4b", "Gemma 3 4B text (GQA 8/4, window 1024, linear rotary scaling 8 on global layers)",
      gemma3(2560, 34, 8, 4, 256, 10240, 262208, 131072, 1024, 256, 8.0));
  add("gemma3-12b", "Gemma 3 12B text (GQA 16/8, window 1024, linear scaling 8)",
      gemma3(3840, 48, 16, 8, 256, 15360, 262208, 131072, 1024, 256, 8.0));
  add("gemma3-27b", "Gemma 3 27B text (GQA 32/16, head_dim 128, query_pre_attn_scalar 168, linear scaling 8)",
      gemma3(5376, 62, 32, 16, 128, 21504, 262208, 131072, 1024, 168, 8.0));
  return p;
}

}  // namespace

const std::vector<Preset>& presets() {
  static const std::vector<Preset> p = make_presets();
  return p;
}

const Preset& find_preset(std::string_view name) {
  for (const auto& p : presets())
    if (p.name == name) return p;
  std::string names;
  for (const auto& p : presets()) names += (names.empty() ? "" : ", ") + p.name;
  fail(ErrorKind::invalid_argument, "unknown preset '{}' (known: {})", name, names);
}

}  // namespace zo2
