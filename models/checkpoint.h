// Moving weights between Hugging Face checkpoints and images (DESIGN.md §4, §7): load a
// checkpoint's tensors into image slots in the storage dtype (fp8: per-row absmax scales),
// and turn image slots back into checkpoint tensors of any dtype.
#pragma once
#include "models/config.h"
#include "models/layout.h"
#include "models/safetensors.h"

#include <filesystem>
#include <string>
#include <vector>

namespace zo2 {

// The checkpoint's entry for an HF name, accepting OPT checkpoints saved without the
// "model." prefix (facebook/opt-* store "decoder.layers.0...").
const SafetensorsCheckpoint::Entry* find_checkpoint_tensor(const SafetensorsCheckpoint& ckpt,
                                                           const std::string& name);

// Fills `image` (layout.bytes() bytes, zeroed padding) with the layout's tensors read
// from `ckpt` (fp8 block-quantized weights dequantized, Note [Quantized checkpoints] in
// checkpoint.cpp; `config` gives the blocks). Errors name the model and tensor: missing,
// wrong shape, non-float dtype, a NaN or infinite weight (or one the storage dtype
// overflows on), with its element; a quantized weight without its scales.
void load_image(const SafetensorsCheckpoint& ckpt, const ImageLayout& layout, void* image,
                const std::string& where, const ModelConfig& config);

// The index of the first of n elements (fp32, bf16, fp16, fp8 e4m3 or e5m2 bits) that is
// NaN or infinite, or −1: one parallel pass at memory speed; the lowest index wins.
std::int64_t first_non_finite(const void* data, DType dt, std::int64_t n);

// Converts an image slot to a checkpoint tensor of dtype `dt` (fp32, bf16, fp16; fp8 only
// when the slot is fp8) — a fill callback, so large saves stream without a second copy.
TensorToWrite image_tensor(const TensorSlot& slot, const void* image, DType dt);

// Elements [first, first + count) of `slot` as image_tensor saves them in dtype `dt`, into
// out (count × dtype_size(dt) bytes): `src` holds the slot's element `first` onward (in the
// slot's dtype), `scales` (fp8 slots; else nullptr) the scale of row first / slot.cols
// onward. For a piece of a tensor whose bytes come from elsewhere (a disk block's).
void convert_slot_range(const TensorSlot& slot, const void* src, const float* scales, DType dt, std::int64_t first,
                        std::int64_t count, std::byte* out);

// Quantizes fp32 values into an fp8 slot: per-row scale = fp8_row_scale(absmax) (absmax/448;
// Note [Tiny fp8 rows] in runtime/element.h), round to nearest.
void quantize_rows_e4m3(const float* src, std::int64_t rows, std::int64_t cols, std::uint8_t* dst,
                        float* scales);

// Checkpoint tensors the model does not use, for a warning (e.g. a tied lm_head copy,
// rotary inv_freq buffers).
std::vector<std::string> unused_checkpoint_tensors(const SafetensorsCheckpoint& ckpt,
                                                   const ModelConfig& config);

// Every tensor the config implies is in the checkpoint with its shape and a float dtype —
// the headers only, no data read. Run before the host images are allocated, so a config.json
// that does not match its weights (more layers, other sizes) fails at once, naming the tensor,
// instead of after the allocation. Error(format) naming `where`.
void check_checkpoint_tensors(const SafetensorsCheckpoint& ckpt, const ModelConfig& config,
                              const std::string& where);

}  // namespace zo2
