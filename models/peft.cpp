#include "models/peft.h"

#include "runtime/common.h"
#include "runtime/error.h"
#include "runtime/philox.h"
#include "zo/tensor_key.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace zo2 {

std::string PeftConfig::describe() const {
  if (prefix > 0) return fmt::format("prefix tuning, {} tokens per layer", prefix);
  if (!lora) return "full";
  return fmt::format("LoRA r {}, alpha {} on {}", r, alpha, fmt::join(targets, ", "));
}

std::vector<LinearModule> linear_modules(const ModelConfig& c) {
  if (c.family == ModelFamily::opt)
    return {{"q_proj", "self_attn.q_proj", Role::q_w}, {"k_proj", "self_attn.k_proj", Role::k_w},
            {"v_proj", "self_attn.v_proj", Role::v_w}, {"out_proj", "self_attn.out_proj", Role::o_w},
            {"fc1", "fc1", Role::fc1_w},               {"fc2", "fc2", Role::fc2_w}};
  return {{"q_proj", "self_attn.q_proj", Role::q_w},    {"k_proj", "self_attn.k_proj", Role::k_w},
          {"v_proj", "self_attn.v_proj", Role::v_w},    {"o_proj", "self_attn.o_proj", Role::o_w},
          {"gate_proj", "mlp.gate_proj", Role::gate_w}, {"up_proj", "mlp.up_proj", Role::up_w},
          {"down_proj", "mlp.down_proj", Role::down_w}};
}

std::vector<std::string> parse_lora_targets(const std::string& list) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  while (pos <= list.size()) {
    const std::size_t comma = list.find(',', pos);
    std::string item = list.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    const auto b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
    item = b == std::string::npos ? std::string() : item.substr(b, e - b + 1);
    if (item.empty()) fail(ErrorKind::invalid_argument, "--lora-targets '{}': an empty module name", list);
    out.push_back(item);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

void validate_peft(const PeftConfig& p, const ModelConfig& c, bool c_api) {
  if (p.prefix != 0) {
    const char* name = c_api ? "prefix_tokens" : "--num-prefix";
    if (p.lora) fail(ErrorKind::invalid_argument, "{} and LoRA: choose one kind of adapter", name);
    if (p.prefix < 1 || p.prefix > 1024) fail(ErrorKind::invalid_argument, "{} {}: must lie in [1, 1024]", name, p.prefix);
    if (p.prefix >= c.max_positions)
      fail(ErrorKind::invalid_argument, "{} {}: the model has {} positions", name, p.prefix, c.max_positions);
    return;
  }
  if (!p.lora) return;
  const char* r_name = c_api ? "lora_r" : "--lora-r";
  const char* a_name = c_api ? "lora_alpha" : "--lora-alpha";
  const char* t_name = c_api ? "lora_targets" : "--lora-targets";
  if (p.r < 1 || p.r > 4096) fail(ErrorKind::invalid_argument, "{} {}: must lie in [1, 4096]", r_name, p.r);
  if (!(std::isfinite(p.alpha) && p.alpha > 0)) fail(ErrorKind::invalid_argument, "{} {}: must be positive", a_name, p.alpha);
  if (p.targets.empty()) fail(ErrorKind::invalid_argument, "{}: name at least one module", t_name);
  const auto modules = linear_modules(c);
  std::vector<std::string> known;
  for (const auto& m : modules) known.emplace_back(m.name);
  for (std::size_t i = 0; i < p.targets.size(); ++i) {
    const std::string& t = p.targets[i];
    if (std::find(known.begin(), known.end(), t) == known.end())
      fail(ErrorKind::invalid_argument, "{} {}: the {} family's blocks have no module '{}' (their linear layers: {})", t_name,
           fmt::join(p.targets, ","), c.family_name(), t, fmt::join(known, ", "));
    for (std::size_t j = 0; j < i; ++j)
      if (p.targets[j] == t) fail(ErrorKind::invalid_argument, "{}: '{}' named twice", t_name, t);
  }
  for (const auto& m : modules) {
    if (std::find(p.targets.begin(), p.targets.end(), m.name) == p.targets.end()) continue;
    const ImageLayout b = block_layout(c, 0, DType::f32);
    const TensorSlot& w = b.at(m.role);
    if (p.r > std::min(w.rows, w.cols))
      fail(ErrorKind::invalid_argument, "{} {}: above {}'s smaller dimension {} (a rank-{} update needs no adapter)",
           r_name, p.r, m.name, std::min(w.rows, w.cols), std::min(w.rows, w.cols));
  }
}

nlohmann::json peft_to_json(const PeftConfig& p) {
  if (p.prefix > 0) return {{"peft_type", "PREFIX_TUNING"}, {"num_virtual_tokens", p.prefix}};
  return {{"peft_type", "LORA"}, {"r", p.r}, {"lora_alpha", p.alpha}, {"target_modules", p.targets}};
}

PeftConfig peft_from_json(const nlohmann::json& j, const std::string& where) {
  PeftConfig p;
  if (j.is_null()) return p;
  auto bad = [&](const char* key, const std::string& what) {
    fail(ErrorKind::format, "{}: field '{}' {}", where, key, what);
  };
  if (!j.is_object()) bad("peft", "must be an object");
  if (!j.contains("peft_type") || !j.at("peft_type").is_string()) bad("peft_type", "must name the adapter type");
  if (j.at("peft_type").get<std::string>() == "PREFIX_TUNING") {
    if (!j.contains("num_virtual_tokens") || !j.at("num_virtual_tokens").is_number_integer())
      bad("num_virtual_tokens", "must be an integer");
    const auto n = j.at("num_virtual_tokens").get<std::int64_t>();
    if (n < 1 || n > 1024) bad("num_virtual_tokens", fmt::format("= {} is outside [1, 1024]", n));
    if (j.contains("prefix_projection") && j.at("prefix_projection").is_boolean() && j.at("prefix_projection").get<bool>())
      bad("prefix_projection", "= true: zo2 trains the prefix itself (MeZO's, without reparametrization)");
    p.prefix = static_cast<int>(n);
    return p;
  }
  if (j.at("peft_type").get<std::string>() != "LORA")
    bad("peft_type", fmt::format("= {}: zo2 reads LORA adapters", j.at("peft_type").dump()));
  p.lora = true;
  if (!j.contains("r") || !j.at("r").is_number_integer()) bad("r", "must be an integer");
  const auto r = j.at("r").get<std::int64_t>();
  if (r < 1 || r > 4096) bad("r", fmt::format("= {} is outside [1, 4096]", r));
  p.r = static_cast<int>(r);
  if (!j.contains("lora_alpha") || !j.at("lora_alpha").is_number()) bad("lora_alpha", "must be a number");
  p.alpha = j.at("lora_alpha").get<float>();
  if (!(std::isfinite(p.alpha) && p.alpha > 0)) bad("lora_alpha", fmt::format("= {} is not positive", p.alpha));
  const auto& t = j.contains("target_modules") ? j.at("target_modules") : nlohmann::json();
  p.targets.clear();
  if (t.is_string()) {
    p.targets = parse_lora_targets(t.get<std::string>());
  } else if (t.is_array() && !t.empty()) {
    for (const auto& x : t) {
      if (!x.is_string()) bad("target_modules", "must list module names");
      p.targets.push_back(x.get<std::string>());
    }
  } else {
    bad("target_modules", "must list the adapted modules");
  }
  for (const char* key : {"use_dora", "use_rslora"})
    if (j.contains(key) && j.at(key).is_boolean() && j.at(key).get<bool>())
      bad(key, "= true: zo2 runs plain LoRA adapters");
  if (j.contains("fan_in_fan_out") && j.at("fan_in_fan_out").is_boolean() && j.at("fan_in_fan_out").get<bool>())
    bad("fan_in_fan_out", "= true (Conv1D layers, GPT-2 style): zo2's models use nn.Linear layout");
  for (const char* key : {"rank_pattern", "alpha_pattern"})
    if (j.contains(key) && j.at(key).is_object() && !j.at(key).empty())
      bad(key, "is not empty: zo2 runs one rank and alpha for every module");
  if (j.contains("layers_to_transform") && !j.at("layers_to_transform").is_null())
    bad("layers_to_transform", "is set: zo2 adapts every block");
  if (j.contains("bias") && j.at("bias").is_string() && j.at("bias").get<std::string>() != "none")
    bad("bias", fmt::format("= {}: zo2 trains no biases with LoRA", j.at("bias").dump()));
  if (j.contains("modules_to_save") && !j.at("modules_to_save").is_null() &&
      !(j.at("modules_to_save").is_array() && j.at("modules_to_save").empty()))
    bad("modules_to_save", "is set: zo2 trains adapters only");
  return p;
}

LoraLayout lora_layout(const ModelConfig& c, std::int64_t layer, const PeftConfig& p, DType dtype) {
  LoraLayout l;
  if (!p.lora) return l;
  const ImageLayout base = block_layout(c, layer, DType::f32);
  const std::string prefix = block_prefix(c, layer);
  for (const auto& m : linear_modules(c)) {
    if (std::find(p.targets.begin(), p.targets.end(), m.name) == p.targets.end()) continue;
    const TensorSlot& w = base.at(m.role);
    l.a.add(m.role, prefix + m.path + ".lora_A.weight", {p.r, w.cols}, dtype);
    l.b.add(m.role, prefix + m.path + ".lora_B.weight", {w.rows, p.r}, dtype);
  }
  l.b_offset = align_up(l.a.bytes());
  l.bytes = l.b_offset + align_up(l.b.bytes());
  return l;
}

std::string peft_tensor_name(const std::string& name) { return "base_model.model." + name; }

LoraLayout prefix_layout(const ModelConfig& c, std::int64_t layer, int tokens, DType dtype) {
  LoraLayout l;
  const std::string prefix = block_prefix(c, layer);
  l.a.add(Role::k_w, prefix + "self_attn.prefix_key", {tokens, c.kv_dim()}, dtype);
  l.b.add(Role::v_w, prefix + "self_attn.prefix_value", {tokens, c.kv_dim()}, dtype);
  l.b_offset = align_up(l.a.bytes());
  l.bytes = l.b_offset + align_up(l.b.bytes());
  return l;
}

std::vector<std::int32_t> prefix_init_tokens(const ModelConfig& c, int tokens, std::uint64_t seed) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(tokens));
  const std::uint64_t key = tensor_key("zo2.prefix_init_tokens");
  for (int i = 0; i < tokens; ++i)
    ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(
        rounding_bits(seed, key, static_cast<std::uint64_t>(i)) % static_cast<std::uint32_t>(c.vocab_size));
  return ids;
}

void init_lora_image(const LoraLayout& l, void* image, std::uint64_t seed) {
  auto* base = static_cast<std::byte*>(image);
  std::memset(base, 0, l.bytes);  // B = 0
  // A ~ U(−1/√in, 1/√in): PEFT's kaiming_uniform_(a=√5). Its own Philox stream: the init
  // seed, the tensor key, the rounding domain (nothing else draws there with these keys).
  const std::uint64_t init_seed = seed ^ 0x4c6f524131696e69ull;  // "LoRA1ini"
  for (const TensorSlot& s : l.a.tensors()) {
    auto* a = reinterpret_cast<float*>(base + s.offset);
    const std::uint64_t key = tensor_key(s.name);
    const double bound = 1.0 / std::sqrt(static_cast<double>(s.cols));
    for (std::int64_t i = 0; i < s.numel(); ++i) {
      const std::uint32_t bits = rounding_bits(init_seed, key, static_cast<std::uint64_t>(i));
      const double u = static_cast<double>(bits >> 8) * (1.0 / 16777216.0);  // [0, 1)
      a[i] = static_cast<float>(bound * (2.0 * u - 1.0));
    }
  }
}

}  // namespace zo2
