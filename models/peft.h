// Parameter-efficient ZO (issue 17, DESIGN.md §11): LoRA adapters, the only parameters a
// rule perturbs and updates when they are on (the rule itself lives in zo/; this is the
// adapters' structure, as the blocks' is models/layout.h).
//
// Note [LoRA under ZO]
//   A LoRA adapter on a linear layer W [out, in] adds (alpha/r)·B·A·x with A [r, in] and
//   B [out, r] (Hu et al.; Hugging Face PEFT's LoraLayer with dropout 0). Under ZO the
//   rule's passes perturb A and B (z drawn with their own tensor keys, from their names as
//   PEFT saves them less the "base_model.model." prefix), never W, the embeddings or the
//   norms; the update touches A and B alone. So the base blocks are frozen: a streamed block
//   is uploaded for its passes and never written back (no device→host weight traffic),
//   and it may be stored fp8 while the adapters stay fp32. The adapters of every block,
//   with their rule state, are small (r = 8 on OPT-13B's q/v: 6.6M parameters, 26 MB in
//   fp32) and stay resident on the device for the whole run; the host keeps a copy for
//   saving.
//
//   Initialization follows PEFT's default (init_lora_weights=True): A ~ U(−1/√in, 1/√in)
//   (kaiming_uniform with a = √5), B = 0, drawn here from Philox with the run seed, so a
//   seed log replays from the base model alone. Saved adapters use PEFT's layout:
//   adapter_config.json and adapter_model.safetensors with PEFT's tensor names
//   (base_model.model.<module>.lora_A.weight), which PeftModel.from_pretrained loads.
#pragma once
#include "models/config.h"
#include "models/layout.h"

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace zo2 {

// Note [Prefix tuning under ZO]
//   MeZO's prefix tuning (Li & Liang; MeZO's prefix.py with reparametrization off): each
//   block gets P trainable key and value rows [P, kv_dim] that every query attends to
//   before its own sequence, as Hugging Face's past_key_values of P tokens (keys after
//   RoPE); the sequence's positions start at P. They are initialized, as MeZO's
//   init_by_real_act, from the keys and values the base model computes for P random
//   vocabulary tokens (drawn from the run seed), so a seed log replays from the base alone.
//   The graph runs attention over P + T rows per sequence (P dummy queries whose outputs are
//   dropped), so the attention kernels need nothing new. Saved in PEFT's PREFIX_TUNING
//   layout: prompt_embeddings [P, L·2·kv_dim], layer l's keys at columns 2l·kv_dim and its
//   values at (2l + 1)·kv_dim.
struct PeftConfig {
  bool lora = false;
  int prefix = 0;  // prefix tuning: virtual tokens per layer (MeZO: 5); 0 = none
  int r = 8;
  float alpha = 16.0f;
  // PEFT's target_modules: the linear layers' module names (q_proj, v_proj, ...).
  std::vector<std::string> targets = {"q_proj", "v_proj"};
  bool operator==(const PeftConfig&) const = default;
  float scale() const { return alpha / static_cast<float>(r); }
  bool any() const { return lora || prefix > 0; }  // adapters of either kind: the base is frozen
  std::string describe() const;  // "LoRA r 8, alpha 16 on q_proj, v_proj" or "full"
};

// Error(invalid_argument) naming the flag (--lora-r, --lora-alpha, --lora-targets) or, with
// c_api, the field; targets are checked against the family's linear layers.
void validate_peft(const PeftConfig& p, const ModelConfig& c, bool c_api = false);
// "q_proj,v_proj" → {"q_proj", "v_proj"} (spaces trimmed; empty items refused).
std::vector<std::string> parse_lora_targets(const std::string& list);

nlohmann::json peft_to_json(const PeftConfig& p);
PeftConfig peft_from_json(const nlohmann::json& j, const std::string& where);

// The linear layers a family's blocks have, by PEFT module name, with the role of W.
struct LinearModule {
  const char* name;     // q_proj, ..., fc1 / gate_proj, ...
  const char* path;     // within a block: self_attn.q_proj, fc1, mlp.gate_proj, ...
  Role role;
};
std::vector<LinearModule> linear_modules(const ModelConfig& c);

// The adapters of block i: A tensors (roles of their W, shapes [r, in]) then B tensors
// ([out, r]), in one image (fp32 for the adapters; a rule's state in its dtype): a at
// offset 0, b at b_offset.
struct LoraLayout {
  ImageLayout a, b;
  std::size_t b_offset = 0;
  std::size_t bytes = 0;
};
LoraLayout lora_layout(const ModelConfig& c, std::int64_t layer, const PeftConfig& p, DType dtype = DType::f32);

// PEFT's name of an adapter tensor: "base_model.model." + zo2's name.
std::string peft_tensor_name(const std::string& name);

// Prefix tuning: the layout of block i's prefix (a: keys with role k_w, b: values with role
// v_w, both [P, kv_dim] fp32 — or the state dtype), in the same LoraLayout shape so the
// adapters' storage, streaming and update are shared.
LoraLayout prefix_layout(const ModelConfig& c, std::int64_t layer, int tokens, DType dtype = DType::f32);
// The P token ids whose activations initialize a prefix (MeZO's init_by_real_act).
std::vector<std::int32_t> prefix_init_tokens(const ModelConfig& c, int tokens, std::uint64_t seed);

// Fills a block's adapter image with PEFT's initialization (Note [LoRA under ZO]).
void init_lora_image(const LoraLayout& l, void* image, std::uint64_t seed);

}  // namespace zo2
