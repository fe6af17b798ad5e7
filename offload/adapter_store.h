// The host copy of a run's LoRA adapters (models/peft.h, Note [LoRA under ZO]): per block
// one image of its A and B tensors (fp32) followed by the rule's state for them (in the
// state dtype), the layout the device holds resident for the whole run. Saved and loaded
// in Hugging Face PEFT's layout; merged into full weights on request.
#pragma once
#include "models/peft.h"
#include "offload/block_store.h"
#include "offload/planner.h"
#include "runtime/device.h"

#include <filesystem>
#include <string>
#include <vector>

namespace zo2 {

// Device and host bytes of a model's adapters with `state` buffers per adapter weight.
std::size_t adapter_bytes(const ModelConfig& c, const PeftConfig& p, const StateSpec& state);

class AdapterStore {
 public:
  // PEFT's initialization from `seed` (A uniform, B zero); state zero.
  AdapterStore(const ModelConfig& config, const PeftConfig& peft, const StateSpec& state, Device& device,
               std::uint64_t seed);

  const ModelConfig& config() const { return config_; }
  const PeftConfig& peft() const { return peft_; }
  const StateSpec& state() const { return state_; }
  std::int64_t num_blocks() const { return static_cast<std::int64_t>(images_.size()); }
  const LoraLayout& layout(std::int64_t i) const { return layouts_[static_cast<std::size_t>(i)]; }
  // The state layouts (A's and B's tensors in the state dtype) and where buffer k begins.
  const LoraLayout& state_layout(std::int64_t i) const { return state_layouts_[static_cast<std::size_t>(i)]; }
  std::size_t state_offset(int k) const;
  std::size_t image_bytes() const { return image_bytes_; }  // adapters and their state, one block
  void* image(std::int64_t i) { return images_[static_cast<std::size_t>(i)].data(); }
  const void* image(std::int64_t i) const { return images_[static_cast<std::size_t>(i)].data(); }

  // PEFT's files: adapter_config.json (written last) and adapter_model.safetensors.
  void save_peft(const std::filesystem::path& dir, const std::string& base_model) const;
  // Reads an adapter directory of this store's PeftConfig (peft_config_of first); every
  // tensor checked (names, shapes, finite), naming the file and tensor. State stays zero.
  void load_peft(const std::filesystem::path& dir);
  // The adapter configuration in dir/adapter_config.json (Error(format) naming the file).
  static PeftConfig peft_config_of(const std::filesystem::path& dir);
  static bool is_adapter_dir(const std::filesystem::path& dir);
  // adapter_config.json's base_model_name_or_path ("" when absent).
  static std::string base_model_of(const std::filesystem::path& dir);
  // The rule's state of the adapters, as BlockStore::save_state does for blocks.
  void save_state(const std::filesystem::path& file) const;
  // What save_peft and save_state write, in bytes (a bound: Note [Room for a save] in
  // runtime/file_util.h): the adapter file, its config, and the state file when kept.
  std::uint64_t save_bytes() const;
  void load_state(const std::filesystem::path& file);
  // Error(format) naming the first adapter (or prefix) tensor, or state tensor, that holds a
  // non-finite value: a save refuses what a load would.
  void check_finite() const;
  // W += scale·B·A in fp32, for every adapted layer of `store` (whose storage is rounded to
  // nearest where narrower than fp32).
  void merge_into(BlockStore& store) const;

  // Prefix tuning: write keys and values of block i (P × kv_dim floats each, from the
  // base's activations at initialization).
  void set_prefix(std::int64_t i, const float* keys, const float* values);

 private:
  std::vector<StateTensorRef> state_tensors() const;
  void save_prefix(const std::filesystem::path& dir, const std::string& base_model) const;
  void load_prefix(const std::filesystem::path& dir);
  ModelConfig config_;
  PeftConfig peft_;
  StateSpec state_;
  std::vector<LoraLayout> layouts_, state_layouts_;
  std::size_t image_bytes_ = 0;
  std::vector<HostBuffer> images_;
};

inline constexpr const char* kAdapterConfigFile = "adapter_config.json";
inline constexpr const char* kAdapterModelFile = "adapter_model.safetensors";

}  // namespace zo2
