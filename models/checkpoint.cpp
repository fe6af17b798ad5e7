#include "models/checkpoint.h"

#include "runtime/dtype_convert.h"
#include "runtime/element.h"
#include "runtime/error.h"

#include <oneapi/tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <vector>

namespace zo2 {

const SafetensorsCheckpoint::Entry* find_checkpoint_tensor(const SafetensorsCheckpoint& ckpt,
                                                           const std::string& name) {
  if (const auto* e = ckpt.find(name)) return e;
  const std::string prefix = "model.";
  if (name.rfind(prefix, 0) == 0)
    if (const auto* e = ckpt.find(name.substr(prefix.size()))) return e;
  return nullptr;
}

void quantize_rows_e4m3(const float* src, std::int64_t rows, std::int64_t cols, std::uint8_t* dst,
                        float* scales) {
  tbb::parallel_for(std::int64_t{0}, rows, [&](std::int64_t r) {
    const float* row = src + r * cols;
    float absmax = 0.0f;
    for (std::int64_t c = 0; c < cols; ++c) absmax = std::max(absmax, std::fabs(row[c]));
    const float scale = fp8_row_scale(absmax);  // Note [Tiny fp8 rows] in runtime/element.h
    scales[r] = scale;
    for (std::int64_t c = 0; c < cols; ++c) dst[r * cols + c] = f32_to_e4m3(row[c] / scale);
  });
}

// (checkpoint.h) All exponent bits set is NaN or infinity in fp32, bf16, fp16 and fp8 e5m2;
// fp8 e4m3 has no infinity and its NaN is S.1111.111. Fixed chunks, so the answer is
// deterministic.
std::int64_t first_non_finite(const void* data, DType dt, std::int64_t n) {
  constexpr std::int64_t kChunk = std::int64_t{1} << 16;
  const std::int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<std::int64_t> found(static_cast<std::size_t>(chunks), -1);
  auto scan = [&](auto word, auto exponent, std::int64_t c) {
    using W = decltype(word);
    const W* w = static_cast<const W*>(data);
    const std::int64_t end = std::min(n, (c + 1) * kChunk);
    std::int64_t i = c * kChunk;
    // Blocks of 256 with an OR-reduction the compiler vectorizes; the element when one hits.
    for (; i < end; i += 256) {
      const std::int64_t e = std::min(end, i + 256);
      bool hit = false;
      for (std::int64_t j = i; j < e; ++j) hit |= (w[j] & exponent) == exponent;
      if (!hit) continue;
      for (std::int64_t j = i; j < e; ++j)
        if ((w[j] & exponent) == exponent) return j;
    }
    return std::int64_t{-1};
  };
  tbb::parallel_for(std::int64_t{0}, chunks, [&](std::int64_t c) {
    found[static_cast<std::size_t>(c)] =
        dt == DType::f32     ? scan(std::uint32_t{}, std::uint32_t{0x7F800000u}, c)
        : dt == DType::bf16  ? scan(std::uint16_t{}, std::uint16_t{0x7F80u}, c)
        : dt == DType::f16   ? scan(std::uint16_t{}, std::uint16_t{0x7C00u}, c)
        : dt == DType::f8_e5m2 ? scan(std::uint8_t{}, std::uint8_t{0x7Cu}, c)
                             : scan(std::uint8_t{}, std::uint8_t{0x7Fu}, c);
  });
  for (const std::int64_t i : found)
    if (i >= 0) return i;
  return -1;
}

namespace {

// A checkpoint tensor holding a NaN or an infinity (or a value its storage dtype cannot
// hold) is refused at load, naming it: such a weight makes every loss NaN, so a run would
// skip every step, and an evaluation would report NaN, without saying why.
[[noreturn]] void refuse_non_finite(const std::string& where, const TensorSlot& slot,
                                    const SafetensorsCheckpoint::Entry& entry, std::int64_t i) {
  const TensorInfo& info = *entry.info;
  double v = 0;
  entry.file->read_converted(info, i, 1, &v, DType::f64);
  const std::string at = slot.ndim == 2 ? fmt::format("element [{}, {}]", i / slot.cols, i % slot.cols)
                                        : fmt::format("element {}", i);
  if (std::isfinite(v)) {
    // The largest finite value of the storage: fp16 65504, bf16 (2 − 2^-7)·2^127; fp32 and
    // fp8 (whose per-row scales are fp32) (2 − 2^-23)·2^127. Only an fp64 source exceeds
    // the latter.
    const double max = slot.dtype == DType::f16    ? 65504.0
                       : slot.dtype == DType::bf16 ? static_cast<double>(bf16_to_f32(0x7F7Fu))
                                                   : static_cast<double>(std::numeric_limits<float>::max());
    // A wider storage that holds it, if any.
    const bool f32_holds = std::fabs(v) <= std::numeric_limits<float>::max();
    const bool bf16_holds = f32_holds && std::isfinite(bf16_to_f32(f32_to_bf16(static_cast<float>(v))));
    const char* holds = "";
    if (slot.dtype == DType::f16 && bf16_holds)
      holds = "; fp32 or bf16 storage holds it";
    else if ((slot.dtype == DType::f16 || slot.dtype == DType::bf16) && f32_holds)
      holds = "; fp32 storage holds it";
    fail(ErrorKind::format, "{}: tensor '{}' in {}: {} = {} overflows {} storage (max {}){}", where, slot.name,
         entry.file->path().filename().string(), at, v, dtype_name(slot.dtype), max, holds);
  }
  fail(ErrorKind::format,
       "{}: tensor '{}' in {} holds a non-finite weight ({} = {}); a checkpoint with NaN or infinite "
       "weights is refused (every loss would be NaN)",
       where, slot.name, entry.file->path().filename().string(), at, v);
}

// Note [Quantized checkpoints]
//   transformers' FineGrainedFP8 checkpoints (config.json quantization_config.quant_method
//   "fp8": Qwen3-*-FP8, DeepSeek-V3; models/config.cpp reads the block size) store each
//   quantized linear weight W [R, C] as F8_E4M3 values q beside `<name>_scale_inv`
//   [⌈R/br⌉, ⌈C/bc⌉] (fp32 or bf16), one scale per block of br × bc elements:
//   W[r, c] = q[r, c] · scale_inv[r / br, c / bc], in fp32 (transformers' own
//   dequantization). zo2 dequantizes at load into the storage dtype (fp8 storage then takes
//   its per-row scales, Note [Tiny fp8 rows]); the tensors the method leaves unquantized
//   (embeddings, norms, biases, modules_to_not_convert, a bf16 lm_head) are read as they
//   are. Read raw, a quantized weight is a silently wrong model (every linear weight off by
//   its scale), so an F8 tensor without its scale in a quantized checkpoint, a scale beside
//   a tensor that is not F8, and a scale tensor in a checkpoint whose config.json has no
//   quantization_config are refused, naming the tensor. Saves write plain tensors and drop
//   quantization_config (ModelConfig::to_json).
bool is_fp8(DType dt) { return dt == DType::f8_e4m3 || dt == DType::f8_e5m2; }

// The expected shape of a quantized weight's scale_inv.
std::vector<std::int64_t> fp8_scale_shape(const std::vector<std::int64_t>& shape, const ModelConfig& config) {
  return {(shape[0] + config.fp8_block_rows - 1) / config.fp8_block_rows,
          (shape[1] + config.fp8_block_cols - 1) / config.fp8_block_cols};
}

// Headers only: the checks of the Note. Returns the scale's entry for a quantized weight.
const SafetensorsCheckpoint::Entry* check_fp8_scale(const SafetensorsCheckpoint& ckpt, const ModelConfig& config,
                                                    const std::string& name, const SafetensorsCheckpoint::Entry& entry,
                                                    const std::string& where) {
  const TensorInfo& info = *entry.info;
  const std::string file = entry.file->path().filename().string();
  const std::string scale_name = info.name + "_scale_inv";
  const auto* scale = ckpt.find(scale_name);
  if (!config.fp8_quantized()) {
    for (const std::string& sibling : {scale_name, info.name + "_scale"})
      if (ckpt.find(sibling))
        fail(ErrorKind::unsupported,
             "{}: tensor '{}' in {} has a scale tensor '{}', but config.json has no quantization_config: a quantized "
             "checkpoint zo2 cannot read as it is (it reads quant_method \"fp8\" with weight_block_size)",
             where, name, file, sibling);
    return nullptr;
  }
  if (!is_fp8(info.dtype)) {
    if (scale)
      fail(ErrorKind::format, "{}: tensor '{}' in {} is {} but has a scale tensor '{}' (quantized weights are F8_E4M3)",
           where, name, file, dtype_safetensors_name(info.dtype), scale_name);
    return nullptr;
  }
  if (info.dtype != DType::f8_e4m3)
    fail(ErrorKind::unsupported, "{}: tensor '{}' in {} is F8_E5M2; quant_method \"fp8\" stores F8_E4M3", where, name,
         file);
  if (!scale)
    fail(ErrorKind::format,
         "{}: tensor '{}' in {} is fp8 in a quantized checkpoint (quantization_config.quant_method \"fp8\") but "
         "'{}' is missing: without its scales the weight cannot be read",
         where, name, file, scale_name);
  if (info.shape.size() != 2)
    fail(ErrorKind::unsupported, "{}: tensor '{}' in {} is a quantized fp8 tensor of {} dimensions (2 expected)", where,
         name, file, info.shape.size());
  const TensorInfo& s = *scale->info;
  const auto want = fp8_scale_shape(info.shape, config);
  if (s.shape != want)
    fail(ErrorKind::format,
         "{}: tensor '{}' has shape [{}] in {}; a [{}] weight in blocks of {} × {} (quantization_config."
         "weight_block_size) has [{}] scales",
         where, scale_name, fmt::join(s.shape, ", "), scale->file->path().filename().string(),
         fmt::join(info.shape, ", "), config.fp8_block_rows, config.fp8_block_cols, fmt::join(want, ", "));
  if (!dtype_is_float(s.dtype) || is_fp8(s.dtype))
    fail(ErrorKind::format, "{}: tensor '{}' has dtype {}; block scales are fp32, bf16 or fp16", where, scale_name,
         dtype_safetensors_name(s.dtype));
  return scale;
}

// W = q · scale_inv per block, in fp32 (the Note).
std::vector<float> dequantize_fp8_blocks(const SafetensorsCheckpoint::Entry& q, const SafetensorsCheckpoint::Entry& s,
                                         const ModelConfig& config, const std::string& where,
                                         const std::string& name) {
  const std::int64_t R = q.info->shape[0], C = q.info->shape[1];
  const std::int64_t SC = s.info->shape[1];
  std::vector<float> scales(static_cast<std::size_t>(s.info->numel()));
  s.file->read_converted(*s.info, 0, s.info->numel(), scales.data(), DType::f32);
  for (std::size_t i = 0; i < scales.size(); ++i)
    if (!std::isfinite(scales[i]))
      fail(ErrorKind::format, "{}: tensor '{}_scale_inv' holds a non-finite scale ({} = {})", where, name, i,
           scales[i]);
  std::vector<float> w(static_cast<std::size_t>(R * C));
  q.file->read_converted(*q.info, 0, R * C, w.data(), DType::f32);
  tbb::parallel_for(std::int64_t{0}, R, [&](std::int64_t r) {
    const float* sr = scales.data() + (r / config.fp8_block_rows) * SC;
    float* row = w.data() + r * C;
    for (std::int64_t c = 0; c < C; ++c) row[c] *= sr[c / config.fp8_block_cols];
  });
  return w;
}

}  // namespace

void load_image(const SafetensorsCheckpoint& ckpt, const ImageLayout& layout, void* image,
                const std::string& where, const ModelConfig& config) {
  auto* base = static_cast<std::byte*>(image);
  for (const TensorSlot& slot : layout.tensors()) {
    const auto* entry = find_checkpoint_tensor(ckpt, slot.name);
    if (!entry)
      fail(ErrorKind::format, "{}: tensor '{}' is missing from the checkpoint", where, slot.name);
    const TensorInfo& info = *entry->info;
    const auto want = slot.shape();
    if (info.shape != want) {
      fail(ErrorKind::format, "{}: tensor '{}' has shape [{}] in {}, the config implies [{}]",
           where, slot.name, fmt::join(info.shape, ", "), entry->file->path().filename().string(),
           fmt::join(want, ", "));
    }
    if (!dtype_is_float(info.dtype))
      fail(ErrorKind::format, "{}: tensor '{}' has dtype {}, expected a floating type", where,
           slot.name, dtype_safetensors_name(info.dtype));
    std::byte* dst = base + slot.offset;
    const auto n = static_cast<std::size_t>(slot.numel());
    if (const auto* scale = check_fp8_scale(ckpt, config, slot.name, *entry, where)) {
      // Note [Quantized checkpoints]
      const std::vector<float> w = dequantize_fp8_blocks(*entry, *scale, config, where, slot.name);
      if (const std::int64_t bad = first_non_finite(w.data(), DType::f32, slot.numel()); bad >= 0)
        refuse_non_finite(where, slot, *entry, bad);
      if (slot.dtype == DType::f8_e4m3)
        quantize_rows_e4m3(w.data(), slot.rows, slot.cols, reinterpret_cast<std::uint8_t*>(dst),
                           reinterpret_cast<float*>(base + slot.scale_offset));
      else
        convert(w.data(), DType::f32, dst, slot.dtype, n);
    } else if (slot.dtype == DType::f8_e4m3) {
      std::vector<float> tmp(n);
      entry->file->read_converted(info, 0, slot.numel(), tmp.data(), DType::f32);
      if (const std::int64_t bad = first_non_finite(tmp.data(), DType::f32, slot.numel()); bad >= 0)
        refuse_non_finite(where, slot, *entry, bad);
      quantize_rows_e4m3(tmp.data(), slot.rows, slot.cols, reinterpret_cast<std::uint8_t*>(dst),
                         reinterpret_cast<float*>(base + slot.scale_offset));
    } else {
      // (the same dtype: read straight into the image)
      entry->file->read_converted(info, 0, slot.numel(), dst, slot.dtype);
    }
    if (slot.dtype != DType::f8_e4m3)
      if (const std::int64_t bad = first_non_finite(dst, slot.dtype, slot.numel()); bad >= 0)
        refuse_non_finite(where, slot, *entry, bad);
  }
}

void convert_slot_range(const TensorSlot& s, const void* src, const float* scales, DType dt, std::int64_t first,
                        std::int64_t count, std::byte* out) {
  if (count <= 0) return;
  if (!scales) {  // (s.dtype ≠ dt, neither fp8)
    convert(src, s.dtype, out, dt, static_cast<std::size_t>(count));
    return;
  }
  // Element k of the range is element first + k of the slot, in row (first + k) / cols; the
  // scales start at row first / cols.
  const std::int64_t row0 = first / s.cols;
  tbb::parallel_for(tbb::blocked_range<std::int64_t>(0, count, 1 << 14), [&](const tbb::blocked_range<std::int64_t>& r) {
    for (std::int64_t k = r.begin(); k != r.end(); ++k) {
      const float v = load_element(src, s.dtype, k, scales[(first + k) / s.cols - row0]);
      switch (dt) {
        // Saving fp8 as fp8 folds the per-row scales in (a checkpoint has no scale tensor).
        case DType::f8_e4m3: reinterpret_cast<std::uint8_t*>(out)[k] = f32_to_e4m3(v); break;
        case DType::f32: std::memcpy(out + k * 4, &v, 4); break;
        case DType::bf16: { const std::uint16_t b = f32_to_bf16(v); std::memcpy(out + k * 2, &b, 2); break; }
        default: { const std::uint16_t b = f32_to_f16(v); std::memcpy(out + k * 2, &b, 2); break; }
      }
    }
  });
}

TensorToWrite image_tensor(const TensorSlot& slot, const void* image, DType dt) {
  if (!(dt == DType::f32 || dt == DType::bf16 || dt == DType::f16 ||
        (dt == DType::f8_e4m3 && slot.dtype == DType::f8_e4m3)))
    fail(ErrorKind::unsupported, "cannot save tensor '{}' ({}) as {}", slot.name,
         dtype_name(slot.dtype), dtype_name(dt));
  TensorToWrite t;
  t.name = slot.name;
  t.dtype = dt;
  t.shape = slot.shape();
  const auto* base = static_cast<const std::byte*>(image);
  const std::byte* src = base + slot.offset;
  if (dt == slot.dtype && dt != DType::f8_e4m3) {
    t.data = src;
    return t;
  }
  const TensorSlot s = slot;
  const std::size_t out_size = dtype_size(dt), src_size = dtype_size(slot.dtype);
  t.fill = [s, base, src, dt, out_size, src_size](std::span<std::byte> out, std::uint64_t offset) {
    const auto first = static_cast<std::int64_t>(offset / out_size);
    const auto* scales = s.has_scales() ? reinterpret_cast<const float*>(base + s.scale_offset) : nullptr;
    convert_slot_range(s, src + static_cast<std::size_t>(first) * src_size,
                       scales ? scales + first / s.cols : nullptr, dt, first,
                       static_cast<std::int64_t>(out.size() / out_size), out.data());
  };
  return t;
}

std::vector<std::string> unused_checkpoint_tensors(const SafetensorsCheckpoint& ckpt,
                                                   const ModelConfig& config) {
  std::set<std::string> used;
  for (const auto& t : checkpoint_tensors(config)) {
    for (const std::string& n : {t.name, t.name.rfind("model.", 0) == 0 ? t.name.substr(6) : t.name}) {
      used.insert(n);
      if (config.fp8_quantized()) used.insert(n + "_scale_inv");  // Note [Quantized checkpoints]
    }
  }
  std::vector<std::string> out;
  for (const auto& name : ckpt.names())
    if (!used.count(name)) out.push_back(name);
  return out;
}

void check_checkpoint_tensors(const SafetensorsCheckpoint& ckpt, const ModelConfig& config,
                              const std::string& where) {
  auto check = [&](const ImageLayout& layout) {
    for (const TensorSlot& slot : layout.tensors()) {
      const auto* e = find_checkpoint_tensor(ckpt, slot.name);
      if (!e) {
        // Weights saved from a wrapper (torch.compile's _orig_mod., DDP's module., a
        // multimodal model's language_model.) carry a prefix on every name: say so.
        std::string prefixed;
        const std::string bare = slot.name.starts_with("model.") ? slot.name.substr(6) : slot.name;
        for (const std::string& have : ckpt.names())
          if (have.ends_with("." + slot.name) || have.ends_with("." + bare)) {
            prefixed = fmt::format(": the checkpoint has '{}', a prefix zo2 does not strip", have);
            break;
          }
        fail(ErrorKind::format, "{}: tensor '{}' is missing from the checkpoint (config.json: {} layers){}", where,
             slot.name, config.num_layers, prefixed);
      }
      if (e->info->shape != slot.shape())
        fail(ErrorKind::format, "{}: tensor '{}' has shape [{}], config.json implies [{}]", where, slot.name,
             fmt::join(e->info->shape, ", "), fmt::join(slot.shape(), ", "));
      if (!dtype_is_float(e->info->dtype))
        fail(ErrorKind::format, "{}: tensor '{}' is not a floating-point tensor", where, slot.name);
      check_fp8_scale(ckpt, config, slot.name, *e, where);  // Note [Quantized checkpoints]
    }
  };
  check(globals_layout(config, DType::f32));
  for (std::int64_t i = 0; i < config.num_layers; ++i) check(block_layout(config, i, DType::f32));
}

}  // namespace zo2
