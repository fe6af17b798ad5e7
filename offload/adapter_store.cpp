#include "offload/adapter_store.h"

#include "models/checkpoint.h"
#include "models/safetensors.h"
#include "runtime/common.h"
#include "runtime/element.h"
#include "runtime/error.h"
#include "runtime/file_util.h"
#include "runtime/json_file.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <oneapi/tbb/parallel_for.h>

#include <cstring>
#include <fstream>
#include <sstream>

namespace zo2 {
namespace fs = std::filesystem;

namespace {
LoraLayout layout_of(const ModelConfig& c, std::int64_t i, const PeftConfig& p, DType dt = DType::f32) {
  return p.prefix > 0 ? prefix_layout(c, i, p.prefix, dt) : lora_layout(c, i, p, dt);
}
}  // namespace

std::size_t adapter_bytes(const ModelConfig& c, const PeftConfig& p, const StateSpec& state) {
  if (!p.any() || c.num_layers == 0) return 0;
  const LoraLayout w = layout_of(c, 0, p);
  const LoraLayout s = layout_of(c, 0, p, state.dtype);
  return static_cast<std::size_t>(c.num_layers) * image_with_state_bytes(w.bytes, s.bytes, state.buffers);
}

AdapterStore::AdapterStore(const ModelConfig& config, const PeftConfig& peft, const StateSpec& state, Device& device,
                           std::uint64_t seed)
    : config_(config), peft_(peft), state_(state) {
  ZO2_CHECK(peft.any());
  for (std::int64_t i = 0; i < config.num_layers; ++i) {
    layouts_.push_back(layout_of(config, i, peft));
    state_layouts_.push_back(layout_of(config, i, peft, state.dtype));
  }
  image_bytes_ = image_with_state_bytes(layouts_[0].bytes, state_layouts_[0].bytes, state.buffers);
  for (std::int64_t i = 0; i < config.num_layers; ++i) {
    images_.push_back(device.alloc_host(image_bytes_));
    auto* base = static_cast<std::byte*>(images_.back().data());
    std::memset(base, 0, image_bytes_);
    if (peft.lora) init_lora_image(layouts_[static_cast<std::size_t>(i)], base, seed);
    // A prefix starts at zero here; Session fills it from the base's activations.
    for (int k = 0; k < state.buffers; ++k) {
      const LoraLayout& sl = state_layouts_[static_cast<std::size_t>(i)];
      for (const ImageLayout* part : {&sl.a, &sl.b}) {
        const std::size_t off = state_offset(k) + (part == &sl.b ? sl.b_offset : 0);
        for (const TensorSlot& t : part->tensors())
          if (t.has_scales()) std::fill_n(reinterpret_cast<float*>(base + off + t.scale_offset), t.rows, 1.0f);
      }
    }
  }
}

std::size_t AdapterStore::state_offset(int k) const {
  return align_up(layouts_.at(0).bytes) + static_cast<std::size_t>(k) * align_up(state_layouts_.at(0).bytes);
}

bool AdapterStore::is_adapter_dir(const fs::path& dir) {
  std::error_code ec;
  return fs::is_regular_file(dir / kAdapterConfigFile, ec);
}

namespace {
nlohmann::json read_adapter_config(const fs::path& dir) {
  const fs::path file = dir / kAdapterConfigFile;
  // Note [Reading JSON]: not a FIFO, not nested past kMaxJsonDepth.
  const std::string text = read_regular_file(file, " (not a PEFT adapter directory?)");
  try {
    return parse_json_text(text, file.string());
  } catch (const nlohmann::json::exception& e) {
    fail(ErrorKind::format, "{}: not valid JSON: {}", file.string(), e.what());
  }
}
}  // namespace

PeftConfig AdapterStore::peft_config_of(const fs::path& dir) {
  return peft_from_json(read_adapter_config(dir), (dir / kAdapterConfigFile).string());
}

std::string AdapterStore::base_model_of(const fs::path& dir) {
  const nlohmann::json j = read_adapter_config(dir);
  const auto it = j.find("base_model_name_or_path");
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

void AdapterStore::save_peft(const fs::path& dir, const std::string& base_model) const {
  if (peft_.prefix > 0) {
    save_prefix(dir, base_model);
    return;
  }
  std::vector<TensorToWrite> tensors;
  for (std::size_t i = 0; i < layouts_.size(); ++i) {
    const auto* base = static_cast<const std::byte*>(images_[i].data());
    for (const ImageLayout* part : {&layouts_[i].a, &layouts_[i].b})
      for (const TensorSlot& t : part->tensors()) {
        TensorToWrite x;
        x.name = peft_tensor_name(t.name);
        x.dtype = DType::f32;
        x.shape = t.shape();
        x.data = base + (part == &layouts_[i].b ? layouts_[i].b_offset : 0) + t.offset;
        tensors.push_back(std::move(x));
      }
  }
  write_safetensors(dir / kAdapterModelFile, tensors, {{"format", "pt"}});
  // PEFT's LoraConfig fields (to_dict()), with the values zo2 trains with.
  nlohmann::json j = {{"peft_type", "LORA"},
                      {"task_type", "CAUSAL_LM"},
                      {"base_model_name_or_path", base_model},
                      {"r", peft_.r},
                      {"lora_alpha", peft_.alpha},
                      {"lora_dropout", 0.0},
                      {"target_modules", peft_.targets},
                      {"bias", "none"},
                      {"fan_in_fan_out", false},
                      {"init_lora_weights", true},
                      {"inference_mode", true},
                      {"modules_to_save", nullptr},
                      {"layers_to_transform", nullptr},
                      {"layers_pattern", nullptr},
                      {"rank_pattern", nlohmann::json::object()},
                      {"alpha_pattern", nlohmann::json::object()},
                      {"use_rslora", false},
                      {"use_dora", false},
                      {"revision", nullptr}};
  // (a base path that is not UTF-8 is written with U+FFFD: a reader then asks for the base by
  // --model, where a JSON error here made the save fail and the session unusable; pass 57)
  write_file_atomic(dir / kAdapterConfigFile, j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
}

// PEFT's PREFIX_TUNING layout: prompt_embeddings [P, L·2·kv_dim], layer l's keys at columns
// 2l·kv_dim, its values at (2l + 1)·kv_dim (PrefixEncoder without projection; the model's
// past_key_values view [P, L·2, kv_heads, head_dim]).
void AdapterStore::save_prefix(const fs::path& dir, const std::string& base_model) const {
  const std::int64_t P = peft_.prefix, L = num_blocks(), kv = config_.kv_dim();
  std::vector<float> emb(static_cast<std::size_t>(P * L * 2 * kv));
  for (std::int64_t l = 0; l < L; ++l) {
    const auto* base = static_cast<const std::byte*>(images_[static_cast<std::size_t>(l)].data());
    const LoraLayout& lay = layouts_[static_cast<std::size_t>(l)];
    const auto* k = reinterpret_cast<const float*>(base + lay.a.tensors()[0].offset);
    const auto* v = reinterpret_cast<const float*>(base + lay.b_offset + lay.b.tensors()[0].offset);
    for (std::int64_t p = 0; p < P; ++p)
      for (std::int64_t e = 0; e < kv; ++e) {
        emb[static_cast<std::size_t>(p * L * 2 * kv + (2 * l) * kv + e)] = k[p * kv + e];
        emb[static_cast<std::size_t>(p * L * 2 * kv + (2 * l + 1) * kv + e)] = v[p * kv + e];
      }
  }
  TensorToWrite t;
  t.name = "prompt_embeddings";
  t.dtype = DType::f32;
  t.shape = {P, L * 2 * kv};
  t.data = emb.data();
  write_safetensors(dir / kAdapterModelFile, std::span<const TensorToWrite>(&t, 1), {{"format", "pt"}});
  nlohmann::json j = {{"peft_type", "PREFIX_TUNING"},
                      {"task_type", "CAUSAL_LM"},
                      {"base_model_name_or_path", base_model},
                      {"num_virtual_tokens", P},
                      {"num_layers", L},
                      {"token_dim", kv},
                      {"num_attention_heads", config_.num_kv_heads},
                      {"num_transformer_submodules", 1},
                      {"encoder_hidden_size", config_.hidden_size},
                      {"prefix_projection", false},
                      {"inference_mode", true},
                      {"revision", nullptr}};
  // (a base path that is not UTF-8 is written with U+FFFD: a reader then asks for the base by
  // --model, where a JSON error here made the save fail and the session unusable; pass 57)
  write_file_atomic(dir / kAdapterConfigFile, j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
}

void AdapterStore::load_prefix(const fs::path& dir) {
  const fs::path file = dir / kAdapterModelFile;
  const SafetensorsFile f = SafetensorsFile::open(file);
  const std::int64_t P = peft_.prefix, L = num_blocks(), kv = config_.kv_dim();
  const TensorInfo* info = f.find("prompt_embeddings");
  if (!info) fail(ErrorKind::format, "{}: tensor 'prompt_embeddings' is missing", file.string());
  if (info->shape != std::vector<std::int64_t>{P, L * 2 * kv})
    fail(ErrorKind::format, "{}: 'prompt_embeddings' has shape [{}], this model's prefix needs [{}, {}]", file.string(),
         fmt::join(info->shape, ", "), P, L * 2 * kv);
  if (info->dtype != DType::f32 && info->dtype != DType::bf16 && info->dtype != DType::f16)
    fail(ErrorKind::format, "{}: 'prompt_embeddings' is {}; zo2 reads fp32, bf16 or fp16", file.string(),
         dtype_name(info->dtype));
  if (f.tensors().size() != 1)
    fail(ErrorKind::format, "{}: holds {} tensors, a prefix adapter one (prompt_embeddings)", file.string(),
         f.tensors().size());
  const std::vector<std::byte> src = f.read(*info);
  for (std::int64_t l = 0; l < L; ++l) {
    auto* base = static_cast<std::byte*>(images_[static_cast<std::size_t>(l)].data());
    const LoraLayout& lay = layouts_[static_cast<std::size_t>(l)];
    auto* k = reinterpret_cast<float*>(base + lay.a.tensors()[0].offset);
    auto* v = reinterpret_cast<float*>(base + lay.b_offset + lay.b.tensors()[0].offset);
    for (std::int64_t p = 0; p < P; ++p)
      for (std::int64_t e = 0; e < kv; ++e) {
        k[p * kv + e] = load_element(src.data(), info->dtype, p * L * 2 * kv + (2 * l) * kv + e, 1.0f);
        v[p * kv + e] = load_element(src.data(), info->dtype, p * L * 2 * kv + (2 * l + 1) * kv + e, 1.0f);
      }
    for (const float* t : {k, v})
      if (first_non_finite(t, DType::f32, P * kv) >= 0)
        fail(ErrorKind::format, "{}: 'prompt_embeddings' holds a non-finite value (layer {})", file.string(), l);
  }
}

void AdapterStore::load_peft(const fs::path& dir) {
  const PeftConfig p = peft_config_of(dir);
  if (!(p == peft_))
    fail(ErrorKind::invalid_argument, "{}: the adapter is {}, not the {} this session was opened with",
         (dir / kAdapterConfigFile).string(), p.describe(), peft_.describe());
  if (peft_.prefix > 0) {
    load_prefix(dir);
    return;
  }
  const fs::path file = dir / kAdapterModelFile;
  const SafetensorsFile f = SafetensorsFile::open(file);
  std::size_t used = 0;
  for (std::size_t i = 0; i < layouts_.size(); ++i) {
    auto* base = static_cast<std::byte*>(images_[i].data());
    for (const ImageLayout* part : {&layouts_[i].a, &layouts_[i].b})
      for (const TensorSlot& t : part->tensors()) {
        const std::string name = peft_tensor_name(t.name);
        const TensorInfo* info = f.find(name);
        if (!info) fail(ErrorKind::format, "{}: adapter tensor '{}' is missing", file.string(), name);
        if (info->shape != t.shape())
          fail(ErrorKind::format, "{}: adapter tensor '{}' has shape [{}], this model needs [{}]", file.string(), name,
               fmt::join(info->shape, ", "), fmt::join(t.shape(), ", "));
        if (info->dtype != DType::f32 && info->dtype != DType::bf16 && info->dtype != DType::f16)
          fail(ErrorKind::format, "{}: adapter tensor '{}' is {}; zo2 reads fp32, bf16 or fp16 adapters",
               file.string(), name, dtype_name(info->dtype));
        auto* dst = reinterpret_cast<float*>(base + (part == &layouts_[i].b ? layouts_[i].b_offset : 0) + t.offset);
        const std::vector<std::byte> src = f.read(*info);
        for (std::int64_t e = 0; e < t.numel(); ++e) dst[e] = load_element(src.data(), info->dtype, e, 1.0f);
        if (const std::int64_t bad = first_non_finite(dst, DType::f32, t.numel()); bad >= 0)
          fail(ErrorKind::format, "{}: adapter tensor '{}' holds a non-finite value at element {}", file.string(), name,
               bad);
        ++used;
      }
  }
  if (used != f.tensors().size())
    fail(ErrorKind::format, "{}: holds {} tensors, the adapter {} has {}", file.string(), f.tensors().size(),
         peft_.describe(), used);
}

std::vector<StateTensorRef> AdapterStore::state_tensors() const {
  std::vector<StateTensorRef> out;
  for (int k = 0; k < state_.buffers; ++k)
    for (std::size_t i = 0; i < layouts_.size(); ++i) {
      auto* base = static_cast<std::byte*>(images_[i].data()) + state_offset(k);
      const LoraLayout& sl = state_layouts_[i];
      for (const ImageLayout* part : {&sl.a, &sl.b})
        for (const TensorSlot& t : part->tensors())
          out.push_back({fmt::format("{}.state{}", t.name, k), &t, base + (part == &sl.b ? sl.b_offset : 0)});
    }
  return out;
}

void AdapterStore::save_state(const fs::path& file) const {
  ZO2_CHECK(state_.buffers > 0);
  write_state_file(file, state_tensors(), state_);
}

std::uint64_t AdapterStore::save_bytes() const {
  std::uint64_t data = 0, names = 0, count = 0;
  for (const LoraLayout& l : layouts_)
    for (const ImageLayout* part : {&l.a, &l.b})
      for (const TensorSlot& t : part->tensors()) {
        data += static_cast<std::uint64_t>(t.numel()) * sizeof(float);  // saved as fp32
        names += t.name.size() + 16;  // PEFT's name ("base_model.model." and ".default" beside it)
        ++count;
      }
  std::uint64_t bytes = safetensors_file_bytes(data, count, names) + (64 << 10);  // + adapter_config.json
  if (state_.buffers > 0) {
    data = names = count = 0;
    for (const StateTensorRef& t : state_tensors()) {
      data += static_cast<std::uint64_t>(t.slot->numel()) * dtype_size(t.slot->dtype) +
              (t.slot->has_scales() ? static_cast<std::uint64_t>(t.slot->rows) * sizeof(float) : 0);
      names += 2 * t.name.size() + 6;
      count += 2;
    }
    bytes += safetensors_file_bytes(data, count, names);
  }
  return bytes;
}

void AdapterStore::load_state(const fs::path& file) {
  ZO2_CHECK(state_.buffers > 0);
  read_state_file(file, state_tensors(), state_);
}

void AdapterStore::check_finite() const {
  for (std::size_t i = 0; i < layouts_.size(); ++i) {
    const auto* base = static_cast<const std::byte*>(images_[i].data());
    for (const ImageLayout* part : {&layouts_[i].a, &layouts_[i].b})
      for (const TensorSlot& t : part->tensors()) {
        const auto* data = base + (part == &layouts_[i].b ? layouts_[i].b_offset : 0) + t.offset;
        if (const std::int64_t bad = first_non_finite(data, t.dtype, t.numel()); bad >= 0)
          fail(ErrorKind::format,
               "{} tensor '{}' holds a non-finite value at element {} ({}): the adapters diverged (a learning rate "
               "too large for this model?)",
               peft_.prefix > 0 ? "prefix" : "adapter", peft_.prefix > 0 ? t.name : peft_tensor_name(t.name), bad,
               load_element(data, t.dtype, bad, 1.0f));
      }
  }
  if (state_.buffers > 0) check_state_finite(state_tensors());
}

void AdapterStore::merge_into(BlockStore& store) const {
  if (!peft_.lora)
    fail(ErrorKind::invalid_argument, "a {} adapter has no weights to merge into the base (LoRA adapters do)",
         peft_.describe());
  ZO2_CHECK(store.num_blocks() == num_blocks());
  const float scale = peft_.scale();
  tbb::parallel_for(std::int64_t{0}, num_blocks(), [&](std::int64_t i) {
    const LoraLayout& l = layouts_[static_cast<std::size_t>(i)];
    const auto* base = static_cast<const std::byte*>(images_[static_cast<std::size_t>(i)].data());
    auto* image = static_cast<std::byte*>(store.block_image(i));
    const ImageLayout& bl = store.block_layout(i);
    for (const TensorSlot& ta : l.a.tensors()) {
      const TensorSlot& tb = *l.b.find(ta.role);
      const TensorSlot& tw = bl.at(ta.role);
      const auto* A = reinterpret_cast<const float*>(base + ta.offset);
      const auto* B = reinterpret_cast<const float*>(base + l.b_offset + tb.offset);
      const std::int64_t r = ta.rows, in = ta.cols, out = tb.rows;
      std::vector<float> row(static_cast<std::size_t>(in));
      float* scales = tw.has_scales() ? reinterpret_cast<float*>(image + tw.scale_offset) : nullptr;
      for (std::int64_t o = 0; o < out; ++o) {
        for (std::int64_t c = 0; c < in; ++c) {
          double d = 0;
          for (std::int64_t k = 0; k < r; ++k)
            d += static_cast<double>(B[o * r + k]) * static_cast<double>(A[k * in + c]);
          const float w = load_element(image + tw.offset, tw.dtype, o * in + c, scales ? scales[o] : 1.0f);
          row[static_cast<std::size_t>(c)] = w + scale * static_cast<float>(d);
        }
        if (scales) {
          quantize_rows_e4m3(row.data(), 1, in, reinterpret_cast<std::uint8_t*>(image + tw.offset) + o * in, scales + o);
        } else {
          for (std::int64_t c = 0; c < in; ++c) store_element(image + tw.offset, tw.dtype, o * in + c, row[static_cast<std::size_t>(c)]);
        }
      }
    }
  });
}

void AdapterStore::set_prefix(std::int64_t i, const float* keys, const float* values) {
  ZO2_CHECK(peft_.prefix > 0);
  auto* base = static_cast<std::byte*>(images_[static_cast<std::size_t>(i)].data());
  const LoraLayout& lay = layouts_[static_cast<std::size_t>(i)];
  const std::size_t n = static_cast<std::size_t>(peft_.prefix * config_.kv_dim());
  std::memcpy(base + lay.a.tensors()[0].offset, keys, n * sizeof(float));
  std::memcpy(base + lay.b_offset + lay.b.tensors()[0].offset, values, n * sizeof(float));
}

}  // namespace zo2
