#include "offload/block_store.h"

#include "runtime/shared_host.h"

#include "models/checkpoint.h"
#include "models/init.h"
#include "models/safetensors.h"
#include "runtime/arena.h"
#include "runtime/element.h"
#include "runtime/error.h"
#include "runtime/file_util.h"
#include "runtime/log.h"
#include "runtime/philox.h"
#include "zo/tensor_key.h"

#include <nlohmann/json.hpp>
#include <oneapi/tbb/parallel_for.h>

#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <fstream>
#include <map>

namespace zo2 {

WeightSet bind_weights(const ImageLayout& layout, void* base) {
  WeightSet w;
  auto* b = static_cast<std::byte*>(base);
  for (const TensorSlot& s : layout.tensors()) {
    StoredTensor t;
    t.data = b + s.offset;
    t.dtype = s.dtype;
    t.row_scales = s.has_scales() ? reinterpret_cast<float*>(b + s.scale_offset) : nullptr;
    t.rows = s.rows;
    t.cols = s.cols;
    t.key = tensor_key(s.name);
    const auto r = static_cast<std::size_t>(s.role);
    w.tensors[r] = t;
    w.present[r] = true;
  }
  return w;
}

// Pinned memory cannot be swapped out: past MemAvailable (or a container's cgroup memory
// limit: Note [Cgroup limits]) the allocation fails or the kernel starts killing processes,
// so refuse first, with the numbers and where the available bytes come from.
void check_host_memory(const ModelConfig& config, DType storage, std::int64_t images, const StateSpec& state,
                       std::size_t device_bytes) {
  const std::size_t weights = host_store_bytes(config, storage, images, state);
  const std::size_t need = weights + device_bytes;
  const HostMemory host = host_memory();
  const std::size_t available = host.available;
  if (need <= available) return;
  if (device_bytes > 0 && weights <= available)
    fail(ErrorKind::out_of_memory,
         "host memory: the master weights ({}) and the CPU backend's device memory ({}: its planned peak, the resident "
         "blocks, window slots and activations — on the CPU backend the device is this machine's memory too) need {}, "
         "but {} is available ({}); cap the device with --gpu-mem (blocks are then streamed from the master weights "
         "instead of copied beside them) or use fp8 storage",
         format_bytes(static_cast<double>(weights)), format_bytes(static_cast<double>(device_bytes)),
         format_bytes(static_cast<double>(need)), format_bytes(static_cast<double>(available)), host.source);
  const std::size_t globals = globals_layout(config, storage).bytes();
  const std::size_t block = config.num_layers > 0 ? block_layout(config, 0, storage).bytes() : 0;
  std::string hint;
  if (storage != DType::f8_e4m3) {
    const std::size_t fp8 = host_store_bytes(config, DType::f8_e4m3, images, state);
    hint = fmt::format("; --storage-dtype fp8 would need {}{}", format_bytes(static_cast<double>(fp8)),
                       fp8 <= available ? ", which fits" : "");
  }
  fail(ErrorKind::out_of_memory,
       "host memory: the master weights{} ({} block images of {} and {} of globals, {} storage) need {}, but "
       "{} is available ({}){}",
       state.buffers > 0 ? fmt::format(" and {} optimizer state buffer{} in {}", state.buffers,
                                       state.buffers == 1 ? "" : "s", dtype_name(state.dtype))
                         : std::string(),
       images, format_bytes(static_cast<double>(block)), format_bytes(static_cast<double>(globals)),
       dtype_name(storage), format_bytes(static_cast<double>(need)), format_bytes(static_cast<double>(available)),
       host.source, hint);
}

std::int64_t DiskPlacement::count() const {
  return static_cast<std::int64_t>(std::count(on_disk.begin(), on_disk.end(), true));
}

BlockStore::BlockStore(const ModelConfig& config, DType storage, Device& device, bool alias_blocks,
                       const StateSpec& state, Comm* node, const DiskPlacement* disk)
    : config_(config), storage_(storage), state_(state), aliased_(alias_blocks),
      node_(node && node->size() > 1 ? node : nullptr) {
  if (!dtype_is_storage(storage))
    fail(ErrorKind::invalid_argument, "storage dtype {} is not one of fp32, bf16, fp16, fp8",
         dtype_name(storage));
  globals_layout_ = zo2::globals_layout(config_, storage_);
  for (std::int64_t i = 0; i < config_.num_layers; ++i)
    block_layouts_.push_back(zo2::block_layout(config_, i, storage_));
  if (state_.buffers > 0) {
    globals_state_layout_ = zo2::globals_layout(config_, state_.dtype);
    for (std::int64_t i = 0; i < config_.num_layers; ++i)
      block_state_layouts_.push_back(zo2::block_layout(config_, i, state_.dtype));
  }
  stream_bytes_ = image_with_state_bytes(block_bytes(), block_state_layouts_.empty() ? 0 : block_state_layouts_[0].bytes(),
                                         state_.buffers);
  globals_stream_bytes_ = image_with_state_bytes(globals_layout_.bytes(), globals_state_layout_.bytes(), state_.buffers);
  const std::int64_t images = alias_blocks ? 1 : config_.num_layers;
  if (disk && disk->count() > 0) {
    // The disk tier (offload/disk_tier.h): only the RAM blocks get host images.
    if (static_cast<std::int64_t>(disk->on_disk.size()) != config_.num_layers)
      fail(ErrorKind::internal, "a disk placement of {} blocks for a model of {}", disk->on_disk.size(),
           config_.num_layers);
    if (alias_blocks || node_)
      fail(ErrorKind::internal, "the disk tier holds neither aliased blocks nor a node-shared image");
    std::vector<std::int64_t> on;
    for (std::int64_t i = 0; i < config_.num_layers; ++i)
      if (disk->on_disk[static_cast<std::size_t>(i)]) on.push_back(i);
    const std::int64_t ram = config_.num_layers - static_cast<std::int64_t>(on.size());
    check_host_memory(config_, storage_, ram + disk->staging, state_);
    globals_ = device.alloc_host(globals_stream_bytes_);
    for (std::int64_t i = 0; i < config_.num_layers; ++i)
      blocks_.push_back(disk->on_disk[static_cast<std::size_t>(i)] ? HostBuffer() : device.alloc_host(stream_bytes_));
    disk_ = std::make_unique<DiskTier>(device, disk->dir, std::move(on), stream_bytes_, disk->staging, disk->file,
                                       DiskTierOpen{disk->identity, disk->reuse, disk->max_step});
    disk_base_step_ = disk->base_step;
    disk_kept_.assign(static_cast<std::size_t>(config_.num_layers), false);
    clear_state();  // the RAM images' (the disk images get theirs as they are written)
    return;
  }
  if (!node_) {
    check_host_memory(config_, storage_, images, state_);
    globals_ = device.alloc_host(globals_stream_bytes_);
    for (std::int64_t i = 0; i < images; ++i) blocks_.push_back(device.alloc_host(stream_bytes_));
    clear_state();
    return;
  }
  // Note [One host image per node]: one segment for the node; node rank 0 checks the memory.
  if (node_->rank() == 0) check_host_memory(config_, storage_, images, state_);
  const std::size_t g = align_up(globals_stream_bytes_), b = align_up(stream_bytes_);
  shared_ = alloc_node_shared(*node_, device, g + static_cast<std::size_t>(images) * b, "host image of the weights");
  const auto R = static_cast<std::size_t>(node_->size());
  control_ = alloc_node_shared(*node_, device, 2 * static_cast<std::size_t>(config_.num_layers) * R * sizeof(std::uint32_t),
                               "write-back counters");
  auto* base = static_cast<char*>(shared_.data());
  globals_ = HostBuffer(base, globals_stream_bytes_, shared_.pinned(), nullptr);
  for (std::int64_t i = 0; i < images; ++i)
    blocks_.emplace_back(base + g + static_cast<std::size_t>(i) * b, stream_bytes_, shared_.pinned(), nullptr);
  if (node_->rank() == 0) clear_state();
}

std::uint32_t* BlockStore::written_counters(std::int64_t i) const {
  ZO2_CHECK(node_ != nullptr);
  return control_.as<std::uint32_t>() + static_cast<std::size_t>(i) * static_cast<std::size_t>(node_->size());
}

std::uint32_t* BlockStore::taken_counters(std::int64_t i) const {
  ZO2_CHECK(node_ != nullptr);
  return written_counters(config_.num_layers) + static_cast<std::size_t>(i) * static_cast<std::size_t>(node_->size());
}

std::pair<std::size_t, std::size_t> BlockStore::slice(std::size_t bytes, int r) const {
  const auto R = static_cast<std::size_t>(node_ranks());
  constexpr std::size_t kPage = 4096;
  const std::size_t pages = (bytes + kPage - 1) / kPage;
  const auto at = [&](std::size_t k) { return std::min(bytes, pages * k / R * kPage); };
  return {at(static_cast<std::size_t>(r)), at(static_cast<std::size_t>(r) + 1)};
}

std::size_t BlockStore::block_state_offset(int k) const {
  return align_up(block_bytes()) + static_cast<std::size_t>(k) * align_up(block_state_layouts_.at(0).bytes());
}

std::size_t BlockStore::globals_state_offset(int k) const {
  return align_up(globals_bytes()) + static_cast<std::size_t>(k) * align_up(globals_state_layout_.bytes());
}

namespace {
void clear_state_image(const ImageLayout& layout, void* image) {
  auto* base = static_cast<std::byte*>(image);
  std::memset(base, 0, layout.bytes());
  for (const TensorSlot& s : layout.tensors())
    if (s.has_scales()) std::fill_n(reinterpret_cast<float*>(base + s.scale_offset), s.rows, 1.0f);
}
}  // namespace

void BlockStore::clear_block_state(std::int64_t i, void* image) const {
  for (int k = 0; k < state_.buffers; ++k)
    clear_state_image(block_state_layouts_[static_cast<std::size_t>(i)],
                      static_cast<std::byte*>(image) + block_state_offset(k));
}

void BlockStore::clear_state() {
  for (int k = 0; k < state_.buffers; ++k) {
    clear_state_image(globals_state_layout_, static_cast<std::byte*>(globals_.data()) + globals_state_offset(k));
    for (std::size_t i = 0; i < blocks_.size(); ++i)
      if (blocks_[i])
        clear_state_image(block_state_layouts_[i], static_cast<std::byte*>(blocks_[i].data()) + block_state_offset(k));
  }
}

void* BlockStore::block_image(std::int64_t i) {
  if (on_disk(i)) fail(ErrorKind::internal, "block {} lives on the disk tier: it has no host image", i);
  return blocks_[aliased_ ? 0 : static_cast<std::size_t>(i)].data();
}

std::size_t BlockStore::host_bytes() const {
  std::size_t n = globals_.bytes();
  for (const auto& b : blocks_) n += b.bytes();
  if (disk_) n += disk_->host_bytes();
  return n;
}

// The disk tier's blocks, written one image at a time through `fill` (which fills a
// zeroed image of block i) as holding `step` — except, on a resume, those whose image from
// the previous run holds `step` or later (Note [Disk tier resume]).
namespace {
void write_disk_blocks(DiskTier& disk, std::size_t image_bytes, std::int64_t step, std::vector<bool>& kept_blocks,
                       const std::function<void(std::int64_t, void*)>& fill) {
  HostBuffer tmp = host_alloc_aligned(image_bytes);
  std::int64_t kept = 0;
  for (std::int64_t i : disk.blocks()) {
    if (disk.reused() && disk.image_step(i) >= step) {
      ++kept;
      kept_blocks[static_cast<std::size_t>(i)] = true;
      continue;
    }
    std::memset(tmp.data(), 0, image_bytes);
    fill(i, tmp.data());
    disk.write_now(i, tmp.data(), static_cast<std::uint64_t>(step));
  }
  if (disk.reused())
    log_info("disk tier: {} of {} block images kept from the previous run in {}", kept, disk.blocks().size(),
             disk.path().string());
}
}  // namespace

BlockStore BlockStore::load(const std::filesystem::path& model_dir, DType storage, Device& device,
                            const StateSpec& state, Comm* node, const DiskPlacement* disk) {
  const ModelConfig config = ModelConfig::load(model_dir);
  const auto ckpt = SafetensorsCheckpoint::open(model_dir);
  const std::string where = model_dir.string();
  check_checkpoint_tensors(ckpt, config, where);  // before the images are allocated
  BlockStore store(config, storage, device, false, state, node, disk);
  if (store.node_ && store.node_->rank() != 0) {
    // Note [One host image per node]: node rank 0 reads the files into the shared images.
    store.wait_for_node_rank_zero("reading the checkpoint");
    return store;
  }
  const auto unused = unused_checkpoint_tensors(ckpt, config);
  for (const auto& name : unused)
    if (name != "lm_head.weight" && name.find("rotary_emb.inv_freq") == std::string::npos) {
      log_warn("{}: checkpoint tensor '{}' is not used by this {} config ({} unused in all)", where,
               name, config.family_name(), unused.size());
      break;
    }
  load_image(ckpt, store.globals_layout_, store.globals_.data(), where, config);
  // Blocks convert in parallel (each conversion is itself parallel inside).
  tbb::parallel_for(std::int64_t{0}, config.num_layers, [&](std::int64_t i) {
    if (store.on_disk(i)) return;
    load_image(ckpt, store.block_layouts_[static_cast<std::size_t>(i)],
               store.blocks_[static_cast<std::size_t>(i)].data(), where, config);
  });
  if (store.disk_)
    write_disk_blocks(*store.disk_, store.stream_bytes_, store.disk_base_step_, store.disk_kept_,
                      [&](std::int64_t i, void* image) {
                        load_image(ckpt, store.block_layouts_[static_cast<std::size_t>(i)], image, where, config);
                        store.clear_block_state(i, image);
                      });
  if (store.node_) store.wait_for_node_rank_zero("reading the checkpoint");
  return store;
}

void BlockStore::wait_for_node_rank_zero(std::string_view what) {
  // Reading a large checkpoint can take longer than a step's --rank-timeout: no limit here
  // (a rank that dies meanwhile is ended by the launcher).
  const double timeout = node_->timeout_s();
  node_->set_timeout(0);
  node_->barrier(fmt::format("node rank 0 {}", what));
  node_->set_timeout(timeout);
}

namespace {

// Fills one image with init values (models/init.h).
void init_image(const ImageLayout& layout, void* image, std::uint64_t seed, float norm) {
  auto* base = static_cast<std::byte*>(image);
  for (const TensorSlot& s : layout.tensors()) {
    const auto n = static_cast<std::size_t>(s.numel());
    if (s.dtype == DType::f8_e4m3) {
      std::vector<float> tmp(n);
      fill_init(s.name, s.ndim, s.numel(), seed, DType::f32,
                std::as_writable_bytes(std::span<float>(tmp)), norm);
      quantize_rows_e4m3(tmp.data(), s.rows, s.cols, reinterpret_cast<std::uint8_t*>(base + s.offset),
                         reinterpret_cast<float*>(base + s.scale_offset));
    } else {
      fill_init(s.name, s.ndim, s.numel(), seed, s.dtype, {base + s.offset, s.bytes}, norm);
    }
  }
}

}  // namespace

BlockStore BlockStore::synthetic(const ModelConfig& config, DType storage, Device& device,
                                 std::uint64_t seed, bool alias_blocks, const StateSpec& state, Comm* node,
                                 const DiskPlacement* disk) {
  BlockStore store(config, storage, device, alias_blocks, state, node, disk);
  if (store.node_ && store.node_->rank() != 0) {
    store.wait_for_node_rank_zero("initializing the weights");
    return store;
  }
  const float norm = init_norm_value(config);
  init_image(store.globals_layout_, store.globals_.data(), seed, norm);
  const std::int64_t images = alias_blocks ? 1 : config.num_layers;
  tbb::parallel_for(std::int64_t{0}, images, [&](std::int64_t i) {
    if (store.on_disk(i)) return;
    init_image(store.block_layouts_[static_cast<std::size_t>(i)],
               store.blocks_[static_cast<std::size_t>(i)].data(), seed, norm);
  });
  if (store.disk_)
    write_disk_blocks(*store.disk_, store.stream_bytes_, store.disk_base_step_, store.disk_kept_,
                      [&](std::int64_t i, void* image) {
                        init_image(store.block_layouts_[static_cast<std::size_t>(i)], image, seed, norm);
                        store.clear_block_state(i, image);
                      });
  if (store.node_) store.wait_for_node_rank_zero("initializing the weights");
  return store;
}

void BlockStore::save(const std::filesystem::path& out_dir, DType dtype,
                      std::uint64_t shard_bytes) const {
  if (aliased_)
    fail(ErrorKind::invalid_argument,
         "this model was synthesized with aliased blocks (a benchmark shape); it cannot be saved");
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) fail(ErrorKind::io, "{}: cannot create the output directory: {}", out_dir.string(), ec.message());
  std::vector<TensorToWrite> tensors;
  for (const auto& s : globals_layout_.tensors())
    tensors.push_back(image_tensor(s, globals_.data(), dtype));
  for (std::int64_t i = 0; i < config_.num_layers; ++i)
    for (const auto& s : block_layouts_[static_cast<std::size_t>(i)].tensors()) {
      if (!on_disk(i)) {
        tensors.push_back(image_tensor(s, blocks_[static_cast<std::size_t>(i)].data(), dtype));
        continue;
      }
      // A disk block's tensor is read when the writer reaches each piece of it: the piece's
      // elements (and their rows' fp8 scales), converted as a host image's would be.
      TensorSlot local = s;  // (its name, dtype and shape; no image: offsets 0)
      local.offset = local.scale_offset = 0;
      TensorToWrite t = image_tensor(local, nullptr, dtype);
      const bool same = dtype == s.dtype && dtype != DType::f8_e4m3;  // image_tensor's bytes as they are
      t.data = nullptr;
      const std::size_t out_size = dtype_size(dtype), src_size = dtype_size(s.dtype);
      t.fill = [this, i, s, dtype, same, out_size, src_size](std::span<std::byte> out, std::uint64_t offset) {
        if (same) {
          disk_->read_range(i, s.offset + offset, out.size(), out.data());
          return;
        }
        const auto first = static_cast<std::int64_t>(offset / out_size);
        const auto count = static_cast<std::int64_t>(out.size() / out_size);
        std::vector<std::byte> piece(static_cast<std::size_t>(count) * src_size);
        disk_->read_range(i, s.offset + static_cast<std::size_t>(first) * src_size, piece.size(), piece.data());
        std::vector<float> scales;
        if (s.has_scales()) {
          const std::int64_t row0 = first / s.cols, rows = (first + count - 1) / s.cols - row0 + 1;
          scales.resize(static_cast<std::size_t>(rows));
          disk_->read_range(i, s.scale_offset + static_cast<std::size_t>(row0) * sizeof(float),
                            scales.size() * sizeof(float), scales.data());
        }
        convert_slot_range(s, piece.data(), scales.empty() ? nullptr : scales.data(), dtype, first, count, out.data());
      };
      tensors.push_back(std::move(t));
    }
  ModelConfig c = config_;
  c.torch_dtype = dtype == DType::f32 ? "float32" : dtype == DType::bf16 ? "bfloat16" : "float16";
  write_safetensors_sharded(out_dir, tensors, shard_bytes, {{"format", "pt"}});
  // config.json last, atomically: a directory with a config is a complete checkpoint.
  nlohmann::json j = c.to_json();
  j["torch_dtype"] = c.torch_dtype;
  j["dtype"] = c.torch_dtype;
  write_file_atomic(out_dir / "config.json", j.dump(2) + "\n");
}

void BlockStore::check_finite(DType save_dtype) const {
  auto scan = [save_dtype](const ImageLayout& layout, const void* image, const std::string& where) {
    const auto* base = static_cast<const std::byte*>(image);
    for (const TensorSlot& s : layout.tensors()) {
      const std::byte* data = base + s.offset;
      const float* scales = s.has_scales() ? reinterpret_cast<const float*>(base + s.scale_offset) : nullptr;
      std::int64_t bad = first_non_finite(data, s.dtype, s.numel());
      if (bad < 0 && scales) {  // an fp8 row is as finite as its scale
        const std::int64_t row = first_non_finite(scales, DType::f32, s.rows);
        if (row >= 0) bad = row * s.cols;
      }
      if (bad >= 0)
        fail(ErrorKind::format, "tensor '{}' ({}) holds a non-finite value at element {} ({}): {}", s.name, where,
             bad, load_element(data, s.dtype, bad, scales ? scales[bad / s.cols] : 1.0f),
             "the weights diverged (a learning rate too large for this model?) or the checkpoint held one");
      // Finite here, but beyond the save dtype's range (fp16 from fp32, bf16 or fp8 × scale):
      // the file would hold an infinity that every reader refuses.
      if (save_dtype == DType::f32 || save_dtype == s.dtype || dtype_size(save_dtype) != 2) continue;
      const std::int64_t chunk = scales ? s.cols : std::int64_t{1} << 16;
      std::vector<float> wide(static_cast<std::size_t>(std::min(chunk, s.numel())));
      std::vector<std::uint16_t> narrow(wide.size());
      for (std::int64_t at = 0; at < s.numel(); at += chunk) {
        const std::int64_t n = std::min(chunk, s.numel() - at);
        convert(data + static_cast<std::size_t>(at) * dtype_size(s.dtype), s.dtype, wide.data(), DType::f32,
                static_cast<std::size_t>(n));
        if (scales)
          for (std::int64_t k = 0; k < n; ++k) wide[static_cast<std::size_t>(k)] *= scales[at / s.cols];
        convert(wide.data(), DType::f32, narrow.data(), save_dtype, static_cast<std::size_t>(n));
        if (const std::int64_t k = first_non_finite(narrow.data(), save_dtype, n); k >= 0)
          fail(ErrorKind::format,
               "tensor '{}' ({}) holds {} at element {}, beyond {}'s range: it would be saved as infinity; save in a "
               "wider dtype ({})",
               s.name, where, wide[static_cast<std::size_t>(k)], at + k, dtype_name(save_dtype),
               save_dtype == DType::f16 ? "fp32, or bf16" : "fp32");
      }
    }
  };
  scan(globals_layout_, globals_.data(), "embeddings and head");
  if (aliased_) return;
  HostBuffer tmp;
  for (std::int64_t i = 0; i < config_.num_layers; ++i) {
    const void* image = blocks_[static_cast<std::size_t>(i)].data();
    if (on_disk(i)) {
      if (!tmp) tmp = host_alloc_aligned(stream_bytes_);
      disk_->read_now(i, tmp.data());
      image = tmp.data();
    }
    scan(block_layouts_[static_cast<std::size_t>(i)], image, fmt::format("block {}", i));
  }
}

}  // namespace zo2

namespace zo2 {

void write_state_file(const std::filesystem::path& file, const std::vector<StateTensorRef>& tensors,
                      const StateSpec& spec, const DiskTier* disk) {
  std::vector<TensorToWrite> w;
  w.reserve(tensors.size() * 2);
  // Host bytes, or (a disk block) bytes read from its image when the writer reaches them.
  auto source = [&](TensorToWrite& x, const StateTensorRef& t, std::size_t offset) {
    if (t.disk_block < 0) {
      x.data = t.base + offset;
      return;
    }
    ZO2_CHECK(disk != nullptr);
    const std::int64_t block = t.disk_block;
    const std::size_t at = t.base_offset + offset;
    x.fill = [disk, block, at](std::span<std::byte> out, std::uint64_t offset) {
      disk->read_range(block, at + offset, out.size(), out.data());
    };
  };
  for (const StateTensorRef& t : tensors) {
    TensorToWrite x;
    x.name = t.name;
    x.dtype = t.slot->dtype;
    x.shape = t.slot->shape();
    source(x, t, t.slot->offset);
    w.push_back(std::move(x));
    if (t.slot->has_scales()) {
      TensorToWrite sc;
      sc.name = t.name + ".scale";
      sc.dtype = DType::f32;
      sc.shape = {t.slot->rows};
      source(sc, t, t.slot->scale_offset);
      w.push_back(std::move(sc));
    }
  }
  write_safetensors(file, w, {{"format", "zo2-optimizer-state"}, {"state_dtype", std::string(dtype_name(spec.dtype))},
                              {"buffers", std::to_string(spec.buffers)}});
}

void check_state_finite(const std::vector<StateTensorRef>& tensors, const DiskTier* disk) {
  std::vector<std::byte> tmp;
  auto bytes = [&](const StateTensorRef& t, std::size_t offset, std::size_t n) -> const std::byte* {
    if (t.disk_block < 0) return t.base + offset;
    ZO2_CHECK(disk != nullptr);
    tmp.resize(n);
    disk->read_range(t.disk_block, t.base_offset + offset, n, tmp.data());
    return tmp.data();
  };
  for (const StateTensorRef& t : tensors) {
    const TensorSlot& s = *t.slot;
    std::int64_t bad = first_non_finite(bytes(t, s.offset, s.bytes), s.dtype, s.numel());
    if (bad < 0 && s.has_scales()) {
      const std::int64_t row = first_non_finite(bytes(t, s.scale_offset, static_cast<std::size_t>(s.rows) * sizeof(float)),
                                                DType::f32, s.rows);
      if (row >= 0) bad = row * s.cols;
    }
    if (bad >= 0)
      fail(ErrorKind::format,
           "optimizer state tensor '{}' holds a non-finite value at element {}: the rule's state overflowed (zo-adam "
           "squares each projected gradient; one beyond ~1e19 is infinite in its second moment): the losses are huge "
           "(a weight that overflows the forward pass?) or the learning rate is too large",
           t.name, bad);
  }
}

void BlockStore::check_state_finite() const {
  if (state_.buffers > 0) zo2::check_state_finite(state_tensors(), disk_.get());
}

void read_state_file(const std::filesystem::path& file, const std::vector<StateTensorRef>& tensors,
                     const StateSpec& spec, DiskTier* disk) {
  const SafetensorsFile f = SafetensorsFile::open(file);
  const std::string where = file.string();
  std::size_t expected = 0;
  // dst == nullptr: checked, not copied (StateTensorRef::keep).
  auto copy = [&](const std::string& name, DType dtype, const std::vector<std::int64_t>& shape, std::byte* dst,
                  std::size_t bytes) {
    const TensorInfo* info = f.find(name);
    if (!info)
      fail(ErrorKind::format, "{}: optimizer state tensor '{}' is missing (was it saved by another --optimizer?)", where,
           name);
    if (info->dtype != dtype || info->shape != shape)
      fail(ErrorKind::format, "{}: optimizer state tensor '{}' is {} {}, expected {} {} (--state-dtype {})", where, name,
           dtype_name(info->dtype), fmt::format("[{}]", fmt::join(info->shape, ", ")), dtype_name(dtype),
           fmt::format("[{}]", fmt::join(shape, ", ")), dtype_name(spec.dtype));
    ZO2_CHECK(info->end - info->begin == bytes);
    ++expected;
    if (!dst) return;
    f.read(*info, 0, {dst, bytes});
    if (first_non_finite(dst, dtype, static_cast<std::int64_t>(bytes / dtype_size(dtype))) >= 0)
      fail(ErrorKind::format, "{}: optimizer state tensor '{}' holds a non-finite value", where, name);
  };
  auto copy_ref = [&](const StateTensorRef& t, std::byte* base) {
    copy(t.name, t.slot->dtype, t.slot->shape(), base ? base + t.slot->offset : nullptr, t.slot->bytes);
    if (t.slot->has_scales())
      copy(t.name + ".scale", DType::f32, {t.slot->rows}, base ? base + t.slot->scale_offset : nullptr,
           static_cast<std::size_t>(t.slot->rows) * sizeof(float));
  };
  std::map<std::int64_t, std::vector<const StateTensorRef*>> on_disk;
  for (const StateTensorRef& t : tensors) {
    if (t.disk_block >= 0 && !t.keep) {
      on_disk[t.disk_block].push_back(&t);
      continue;
    }
    copy_ref(t, t.keep ? nullptr : t.base);
  }
  // A disk block's state: its image read, the tensors copied in, written back (same step).
  if (!on_disk.empty()) {
    ZO2_CHECK(disk != nullptr);
    HostBuffer tmp = host_alloc_aligned(disk->image_bytes());
    for (const auto& [block, refs] : on_disk) {
      disk->read_now(block, tmp.data());
      for (const StateTensorRef* t : refs) copy_ref(*t, static_cast<std::byte*>(tmp.data()) + t->base_offset);
      disk->write_now(block, tmp.data(), static_cast<std::uint64_t>(std::max<std::int64_t>(disk->image_step(block), 0)));
    }
  }
  if (f.tensors().size() != expected)
    fail(ErrorKind::format, "{}: holds {} tensors, this model's optimizer state has {}", where, f.tensors().size(),
         expected);
}

std::vector<StateTensorRef> BlockStore::state_tensors() const {
  std::vector<StateTensorRef> out;
  for (int k = 0; k < state_.buffers; ++k) {
    const std::string suffix = fmt::format(".state{}", k);
    auto* g = static_cast<std::byte*>(globals_.data()) + globals_state_offset(k);
    for (const TensorSlot& t : globals_state_layout_.tensors()) out.push_back({t.name + suffix, &t, g});
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const auto block = static_cast<std::int64_t>(i);
      const std::size_t offset = block_state_offset(static_cast<int>(k));
      for (const TensorSlot& t : block_state_layouts_[i].tensors()) {
        if (on_disk(block))  // Note [Disk tier resume]: a kept image's state is newer than the file's
          out.push_back({t.name + suffix, &t, nullptr, block, offset, disk_kept_[i]});
        else
          out.push_back({t.name + suffix, &t, static_cast<std::byte*>(blocks_[i].data()) + offset});
      }
    }
  }
  return out;
}

void BlockStore::save_state(const std::filesystem::path& file) const {
  if (state_.buffers == 0) fail(ErrorKind::internal, "save_state: this store keeps no optimizer state");
  write_state_file(file, state_tensors(), state_, disk_.get());
}

std::uint64_t BlockStore::state_file_bytes() const {
  if (state_.buffers == 0) return 0;
  std::uint64_t data = 0, names = 0, count = 0;
  for (const StateTensorRef& t : state_tensors()) {
    data += static_cast<std::uint64_t>(t.slot->numel()) * dtype_size(t.slot->dtype);
    names += t.name.size();
    ++count;
    if (t.slot->has_scales()) {  // and its ".scale" tensor, fp32 per row
      data += static_cast<std::uint64_t>(t.slot->rows) * sizeof(float);
      names += t.name.size() + 6;
      ++count;
    }
  }
  return safetensors_file_bytes(data, count, names);
}

void BlockStore::load_state(const std::filesystem::path& file) {
  if (state_.buffers == 0) fail(ErrorKind::internal, "load_state: this store keeps no optimizer state");
  if (!node_ || node_->rank() == 0) read_state_file(file, state_tensors(), state_, disk_.get());
  if (node_) wait_for_node_rank_zero("reading the optimizer state");
}

}  // namespace zo2
