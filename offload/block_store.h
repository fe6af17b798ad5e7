// The host block store: the master weights, one image per transformer block plus the
// globals image, in pinned host memory when the device can pin (DESIGN.md §2, §4). The
// scheduler uploads block images from here and offloads them back after their update.
#pragma once
#include "models/config.h"
#include "models/graph.h"
#include "models/layout.h"
#include "offload/disk_tier.h"
#include "offload/planner.h"
#include "runtime/comm.h"
#include "runtime/device.h"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace zo2 {

// Bind the tensors of an image placed at `base` (host or device) to a WeightSet, with
// tensor keys from their HF names.
WeightSet bind_weights(const ImageLayout& layout, void* base);

// Throws Error(out_of_memory) before anything is allocated when the images of `config` in
// `storage` dtype (the globals plus `block_images` block images) exceed the host memory
// available (host_memory_available()), naming the bytes and what fp8 storage would need.
// `device_bytes`: what the CPU backend's device arena will use besides (its "device" memory is
// this machine's memory too: adversarial pass 62 found a model of half the free memory
// accepted and then needing twice that, resident blocks and activations on top of the images).
void check_host_memory(const ModelConfig& config, DType storage, std::int64_t block_images,
                       const StateSpec& state = {}, std::size_t device_bytes = 0);

// One tensor of an optimizer state file (zo/rule.h, Note [Update rules]): its name in the
// file (the weight's HF name + ".state<k>"), its slot in the state layout, and the start of
// the image that slot is in. The file holds each tensor in the state dtype, fp8 rows with a
// ".scale" tensor beside them; reading checks every name, dtype, shape and value (finite)
// and names the file and tensor.
// A tensor of a block on the disk tier has no host base: disk_block names the block and
// base_offset where its state buffer begins in the block's image; the writer reads it from
// the disk (DiskTier::read_range), the reader writes it into the image (read-modify-write,
// one image at a time). `keep`: checked in the file but not copied (a disk image a resume
// kept holds newer state than the checkpoint's).
struct StateTensorRef {
  std::string name;
  const TensorSlot* slot;
  std::byte* base;
  std::int64_t disk_block = -1;
  std::size_t base_offset = 0;
  bool keep = false;
};
void write_state_file(const std::filesystem::path& file, const std::vector<StateTensorRef>& tensors,
                      const StateSpec& spec, const DiskTier* disk = nullptr);
// Error(format) naming the first state tensor (or its row scale) that holds a non-finite
// value: a save refuses such state, as a load would (read_state_file).
void check_state_finite(const std::vector<StateTensorRef>& tensors, const DiskTier* disk = nullptr);
void read_state_file(const std::filesystem::path& file, const std::vector<StateTensorRef>& tensors,
                     const StateSpec& spec, DiskTier* disk = nullptr);

// The disk tier (offload/disk_tier.h, DESIGN.md §12): which blocks live in the block file
// under `dir` instead of host RAM (plan_tiers in offload/planner.h decides), and how many
// pinned staging buffers carry them.
struct DiskPlacement {
  std::filesystem::path dir;
  std::vector<bool> on_disk;  // per block; none set: every block in RAM
  int staging = 2;
  BlockFileOptions file;
  // Note [Disk tier resume]: the images a previous run left are kept where `identity`
  // matches and an image holds at least base_step (the step of the weights being loaded);
  // every other disk block is written from the loaded weights, as holding base_step.
  std::string identity;
  bool reuse = false;
  std::int64_t base_step = 0;
  std::int64_t max_step = -1;  // DiskTierOpen::max_step: the seed log's end on a resume
  std::int64_t count() const;
};

// Note [One host image per node]
//   Ranks on one node (Comm::node()) hold ONE copy of the master weights: the globals and
//   every block image (with their optimizer state) live in one node-shared segment
//   (runtime/shared_host.h), pinned by each GPU rank. Node rank 0 reads the checkpoint into
//   it while the others wait; every rank then uploads from it. Since every rank applies the
//   same update (Note [Parallel modes]), the write-back is split: rank r writes only its
//   slice r of R of each streamed block image. Two counters per (block, rank) in a second
//   shared segment order the ranks' copies (Note [Stream value waits] in runtime/device.h):
//     written[i][r]  the number of write-backs of block i rank r has finished (slice home)
//     taken[i][r]    the number of update passes whose upload of block i rank r finished
//   A block's g-th version is the image after g write-backs. An upload that expects version
//   g waits until written[i][s] ≥ g for every rank s (every slice is home). The write-back
//   that makes version g + 1 waits until taken[i][s] ≥ g + 1 for every s: every rank has
//   uploaded version g for its update pass, the last upload of that version in each rank's
//   stream order (later passes of the step read version g + 1). Every wait points at a
//   copy earlier in every rank's order, so the ranks cannot deadlock; resident blocks and
//   the globals reach the image only through sync_to_host, each rank its slice, followed by
//   a node barrier (Session::sync).
class BlockStore {
 public:
  // Reads an HF checkpoint directory into images of `storage` dtype (in parallel).
  // With `state`, each image is followed by the rule's state images (zeros), which stream
  // with it (zo/rule.h, Note [Update rules]).
  // With `node` (more than one rank), the images are node-shared (Note [One host image per
  // node]) and node rank 0 alone reads the files.
  // With `disk`, the blocks it names are written to its block file instead of RAM (one
  // image at a time through a staging buffer).
  static BlockStore load(const std::filesystem::path& model_dir, DType storage, Device& device,
                         const StateSpec& state = {}, Comm* node = nullptr, const DiskPlacement* disk = nullptr);
  // Random weights in memory (std 0.02, norms 1, biases 0), as `init` writes them. With
  // alias_blocks every block shares one image (for benchmarks of shapes larger than host
  // memory; such stores cannot be saved).
  static BlockStore synthetic(const ModelConfig& config, DType storage, Device& device,
                              std::uint64_t seed, bool alias_blocks = false, const StateSpec& state = {},
                              Comm* node = nullptr, const DiskPlacement* disk = nullptr);

  const ModelConfig& config() const { return config_; }
  DType storage() const { return storage_; }
  std::int64_t num_blocks() const { return config_.num_layers; }
  const ImageLayout& globals_layout() const { return globals_layout_; }
  const ImageLayout& block_layout(std::int64_t i) const { return block_layouts_[static_cast<std::size_t>(i)]; }
  // The weights of a block image (what a checkpoint holds).
  std::size_t block_bytes() const { return block_layouts_.empty() ? 0 : block_layouts_[0].bytes(); }
  std::size_t globals_bytes() const { return globals_layout_.bytes(); }
  // A block image with its state: what an upload or an offload copies.
  std::size_t stream_bytes() const { return stream_bytes_; }
  std::size_t globals_stream_bytes() const { return globals_stream_bytes_; }
  // The rule's state: its layouts (the weights' in the state dtype) and where state buffer k
  // begins within an image with state (block or globals).
  const StateSpec& state() const { return state_; }
  const ImageLayout& globals_state_layout() const { return globals_state_layout_; }
  const ImageLayout& block_state_layout(std::int64_t i) const {
    return block_state_layouts_[static_cast<std::size_t>(i)];
  }
  std::size_t block_state_offset(int k) const;
  std::size_t globals_state_offset(int k) const;
  void* globals_image() { return globals_.data(); }
  // A block's host image; Error(internal) for a block on the disk tier (read it through disk()).
  void* block_image(std::int64_t i);
  // The disk tier (nullptr when every block is in RAM) and whether block i lives there.
  DiskTier* disk() const { return disk_.get(); }
  bool on_disk(std::int64_t i) const { return disk_ && disk_->holds(i); }
  bool aliased() const { return aliased_; }
  bool pinned() const { return globals_.pinned(); }
  std::size_t host_bytes() const;

  // Writes an HF checkpoint (config.json + safetensors, sharded above shard_bytes) of the
  // images converted to `dtype`, atomically per file.
  void save(const std::filesystem::path& out_dir, DType dtype, std::uint64_t shard_bytes) const;

  // Error(format) naming the first tensor (and element) holding a NaN or an infinity, fp8
  // row scales included: a save refuses such weights rather than publish them (one parallel
  // pass over the images, at memory speed). With a save dtype narrower in range than the
  // weights (fp16: ±65504), a weight that would round to infinity in it is refused too.
  void check_finite(DType save_dtype = DType::f32) const;
  // The same for the rule's state (none kept: nothing to check).
  void check_state_finite() const;

  // The state as a safetensors file (tensor names: the weight's HF name + ".state0" /
  // ".state1", in the state dtype, fp8 as its fp32 values), and back: load_state checks
  // every name, shape and value (finite) and names the file and tensor otherwise.
  void save_state(const std::filesystem::path& file) const;
  // What save_state writes, in bytes (a bound: Note [Room for a save] in runtime/file_util.h);
  // 0 when the store keeps no state.
  std::uint64_t state_file_bytes() const;
  void load_state(const std::filesystem::path& file);
  // Zeros every state buffer (fp8: zeros with unit row scales).
  void clear_state();
  // The same for the state buffers of one image of block i at `image`.
  void clear_block_state(std::int64_t i, void* image) const;

  // Note [One host image per node]: 1 and 0 when the image is this process's own.
  int node_ranks() const { return node_ ? node_->size() : 1; }
  int node_rank() const { return node_ ? node_->rank() : 0; }
  Comm* node() const { return node_; }
  // The counters of block i: [rank] for the node's ranks.
  std::uint32_t* written_counters(std::int64_t i) const;
  std::uint32_t* taken_counters(std::int64_t i) const;
  // Rank r's byte range [begin, end) of an image of `bytes` (whole 4 KiB pages, r < R).
  std::pair<std::size_t, std::size_t> slice(std::size_t bytes, int r) const;

 private:
  BlockStore(const ModelConfig& config, DType storage, Device& device, bool alias_blocks, const StateSpec& state,
             Comm* node, const DiskPlacement* disk);
  std::vector<StateTensorRef> state_tensors() const;
  void wait_for_node_rank_zero(std::string_view what);

  ModelConfig config_;
  DType storage_;
  ImageLayout globals_layout_;
  std::vector<ImageLayout> block_layouts_;
  StateSpec state_;
  ImageLayout globals_state_layout_;
  std::vector<ImageLayout> block_state_layouts_;
  std::size_t stream_bytes_ = 0;
  std::size_t globals_stream_bytes_ = 0;
  HostBuffer globals_;
  std::vector<HostBuffer> blocks_;
  bool aliased_ = false;
  Comm* node_ = nullptr;        // shared images: the node's ranks (not owned)
  HostBuffer shared_, control_;  // the images' segment and the counters' (globals_/blocks_ point into it)
  std::unique_ptr<DiskTier> disk_;  // blocks_[i] is empty for a block it holds
  std::int64_t disk_base_step_ = 0;
  std::vector<bool> disk_kept_;  // per block: a resume kept its image (Note [Disk tier resume])
};

}  // namespace zo2
