// Model shapes by name: the real OPT sizes (125m … 175b), LLaMA-2 7b/13b/70b, LLaMA-3
// 8b/70b (and 3.1/3.2 with llama3 rotary scaling), Qwen2.5 0.5b/1.5b/7b, Qwen3 0.6b … 32b,
// Mistral 7B (v0.1, v0.3), Gemma 3 1b … 27b (text), and tiny presets for demos and tests.
// `init` writes them as random checkpoints; `plan` and `zo2-bench` use them directly.
#pragma once
#include "models/config.h"

#include <string>
#include <string_view>
#include <vector>

namespace zo2 {

struct Preset {
  std::string name;
  std::string description;
  ModelConfig config;
};

const std::vector<Preset>& presets();
// Throws Error(invalid_argument) listing the known names.
const Preset& find_preset(std::string_view name);

}  // namespace zo2
