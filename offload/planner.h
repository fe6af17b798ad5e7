// Placement under a device memory cap (DESIGN.md §6): reserve the globals, the activations
// of both branches, scratch and K window slots; make as many blocks resident as fit,
// spread between the streamed ones so their compute hides the streamed transfers. The
// plan is computed from the same functions that later allocate, before anything is.
#pragma once
#include "models/config.h"
#include "models/graph.h"
#include "runtime/dtype.h"

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace zo2 {

enum class OffloadMode { auto_, all, none };

// Optimizer state kept beside the master weights (zo/rule.h, Note [Update rules]): per
// weight, `buffers` tensors of its shape in `dtype`, placed after the weights in each
// host image and device slot so they stream with their block.
struct StateSpec {
  int buffers = 0;
  DType dtype = DType::f32;
};
// Bytes of one image with its state: the weight layout's bytes, then `buffers` images of
// the state layout (each 256-byte aligned). Without state, exactly the weight bytes.
std::size_t image_with_state_bytes(std::size_t weight_bytes, std::size_t state_bytes, int buffers);
// Host bytes of the block store: the globals image plus `block_images` block images (every
// block, or one when blocks share an image), each with its state.
std::size_t host_store_bytes(const ModelConfig& c, DType storage, std::int64_t block_images, const StateSpec& state);
OffloadMode parse_offload_mode(std::string_view s);  // auto | all | none
std::string_view offload_mode_name(OffloadMode m);

// Where generation keeps its KV cache (models/graph.h, Note [KV cache]): auto (the device
// when the caches of every block fit beside the minimum window, else the host), device,
// host (pinned; two device slots, each block's cache brought in with the block), or off
// (no cache: every new token runs the whole sequence again).
enum class KvPlace { auto_, device, host, off };
KvPlace parse_kv_place(std::string_view s);  // auto | device | host | off
std::string_view kv_place_name(KvPlace p);

// Generation (api/generate.h): `batch` sequences decoded together, each of up to the
// request's seq positions (prompt and new tokens).
struct GenerateRequest {
  int batch = 0;  // 0: no generation
  KvPlace kv = KvPlace::auto_;
  // With a KV cache, a prompt runs through the blocks in pieces of at most `chunk` rows per
  // sequence, each after the cache rows before it: the activations need batch × chunk
  // tokens, not batch × positions. 0: whole prompts (the activations hold every position).
  int chunk = 0;
};
// Tokens per sequence the activations hold for a request: seq, or the generation chunk.
int activation_seq(const struct PlanRequest& r);
// Bytes of one block's KV cache: keys and values of batch × positions rows (compute dtype).
std::size_t kv_block_bytes(const ModelConfig& c, DType compute, int batch, int positions);

// Note [Sub-block streaming] (offload/scheduler.h): a tile slot holds the rows of one
// weight tile in the tensor's storage dtype, their fp8 row scales, then the same rows of
// each optimizer-state buffer (with theirs), each part 256-byte aligned.
std::size_t tile_piece_bytes(DType storage, DType state, int buffers, std::int64_t rows, std::int64_t cols);
struct TileSizes {
  std::size_t tile = 0;     // the largest tile of a block's matrices: a tile slot
  std::size_t vectors = 0;  // a block's 1-D tensors (norms, biases), each a piece: a vector slot
  std::int64_t tiles = 0;   // tiles of one block
};
TileSizes tile_sizes(const ModelGraph& graph, const ImageLayout& block, const StateSpec& state);
// The most tile slots a plan gives the ring (more only hold more prefetched tiles).
inline constexpr int kMaxTileSlots = 6;

struct PlanRequest {
  std::size_t cap = 0;            // device bytes available to zo2 (the arena)
  int batch = 1;
  int seq = 1;
  int branches = 2;               // 2 for training (±eps), 1 for eval/forward only
  DType storage = DType::f32;
  DType compute = DType::f32;
  StateSpec state;                // the rule's state, streamed and resident with each block
  int passes = 1;                 // forward passes a step makes over the blocks (the rule's)
  // LoRA (models/peft.h): the adapters and their state, resident on the device; the base
  // blocks are frozen, so nothing is written back.
  std::size_t adapter_bytes = 0;
  bool frozen_base = false;
  // Ranks sharing one host image write back 1/writeback_ranks of each streamed block each
  // (Note [One host image per node]).
  int writeback_ranks = 1;
  OffloadMode mode = OffloadMode::auto_;
  int window = 3;                 // K device slots for streamed blocks
  // Note [Sub-block streaming]: 0 = auto (whole blocks when the window's smallest size fits
  // the cap, else weight tiles), −1 = whole blocks only, > 0 = stream weight tiles of at most
  // this many bytes of storage (GraphLimits::weight_tile_elems follows).
  std::int64_t tile = 0;
  GraphLimits limits;
  double h2d_bytes_per_s = 50e9;  // for the predicted transfer-bound step time
  double d2h_bytes_per_s = 50e9;
  bool logits_out = false;        // forward: room for the full [B·T, V] logits
  GenerateRequest generate;       // generation: the KV cache and the next-token logits
  // Arena bytes the backend takes for itself on the compute stream (CUDA: the cuBLAS
  // workspace and the attention score chunks).
  std::size_t backend_bytes = 0;
  // The disk tier (DESIGN.md §12, offload/disk_tier.h): host bytes the master weights may
  // take (--host-mem; 0 = no cap); the streamed blocks that do not fit go to disk, carried
  // by disk_staging pinned buffers (0: window + 1). disk_lag: --disk-lag K. The rates give
  // the predicted disk-bound step time (zo2-bench --disk-probe measures them).
  std::size_t host_mem = 0;
  // Whether the disk tier has a directory (--disk-dir): a session without one cannot put a
  // block on disk, so a host_mem below even the disk tier's floor is said to need one (plan
  // previews, zo2_plan and `zo2-tune plan`, still place the blocks that would go to disk).
  bool disk_dir = true;
  int disk_staging = 0;
  int disk_lag = 1;
  double disk_read_bytes_per_s = 2e9;
  double disk_write_bytes_per_s = 1.5e9;
};

struct Placement {
  std::vector<bool> resident;     // per block
  int window = 0;                 // slots actually allocated (0 when nothing streams)
  std::int64_t streamed = 0;
  std::int64_t resident_count = 0;
  std::size_t block_bytes = 0;     // a block image with its state: the unit of the window
  std::size_t state_block_bytes = 0;  // of which optimizer state (0 without)
  std::size_t globals_bytes = 0;
  std::size_t workspace_bytes = 0;
  std::size_t batch_bytes = 0;
  std::size_t slot_bytes = 0;       // window × block (tiles: the tile and vector slots)
  // Note [Sub-block streaming]: with tile_slots > 0 the streamed blocks move tile by tile
  // through tile_slots slots of tile_bytes and two vector slots of vector_bytes (window = 0).
  int tile_slots = 0;
  std::size_t tile_bytes = 0;
  std::size_t vector_bytes = 0;
  std::int64_t block_tiles = 0;     // tiles a block streams
  std::size_t resident_bytes = 0;   // resident blocks
  std::size_t logits_bytes = 0;
  std::size_t adapter_bytes = 0;    // LoRA adapters and their state (resident)
  std::size_t backend_bytes = 0;    // cuBLAS workspace and attention scratch (CUDA)
  // Generation (GenerateRequest): sequences decoded together (0: none), cache rows per
  // sequence (0: no cache), where the caches are, and their bytes.
  int gen_batch = 0;
  int kv_positions = 0;
  int call_seq = 0;                 // tokens per sequence one forward holds (activation_seq)
  bool kv_on_device = false;
  std::size_t kv_block_bytes = 0;   // one block's cache
  std::size_t kv_device_bytes = 0;  // in the arena: every block's cache, or two slots
  std::size_t kv_host_bytes = 0;    // pinned host caches (host placement)
  std::size_t gen_bytes = 0;        // next-token logits [B, V] fp32 and the cache's key mask
  std::size_t total_bytes = 0;      // predicted arena peak
  std::size_t cap = 0;
  std::size_t minimum_cap = 0;      // smallest cap this request could run under (all streamed, K slots)
  std::size_t tile_minimum_cap = 0;  // with --tile auto, below minimum_cap: by weight tiles (0: none)
  // The host block store: globals and one image per block (the pinned master weights;
  // BlockStore allocates exactly this, one image in all with aliased blocks).
  std::size_t host_bytes = 0;
  // The tiers (DESIGN.md §12): which streamed blocks live on disk (per block), the pinned
  // staging buffers that carry them, the block file's bytes (two images a block), the
  // disk traffic of a step and its predicted time at the request's rates (reads and writes
  // take turns on one disk: their times add). host_bytes then counts the RAM tier only.
  std::vector<bool> on_disk;
  std::int64_t disk_blocks = 0;
  int disk_staging = 0;
  int disk_lag = 1;
  std::size_t host_mem = 0;
  std::size_t disk_file_bytes = 0;
  std::size_t disk_read_bytes_per_step = 0;
  std::size_t disk_write_bytes_per_step = 0;
  double predicted_disk_s = 0;
  double disk_read_bytes_per_s = 0, disk_write_bytes_per_s = 0;  // the rates it assumed
  int passes = 1;                   // the rule's forward passes per step (each streams every block)
  std::size_t h2d_bytes_per_step = 0;
  std::size_t d2h_bytes_per_step = 0;
  double predicted_transfer_s = 0;  // max(h2d, d2h) bytes / bandwidth per step
  GraphLimits limits;
  WorkspacePlan workspace;

  // A human-readable table of the plan.
  std::string describe(const ModelConfig& config) const;
};

// Floats a training step keeps on the device: loss slots and g_j for up to 64 directions,
// and staging (offload/scheduler.h).
inline constexpr int kStepScalars = 4 * 64;
// The projected gradients a disk tier keeps on the device for its lagging images: the last
// disk_lag + 1 steps' g_j for up to 64 directions (Note [Lagging disk images],
// offload/scheduler.cpp). The planner counts them with the batch buffers.
inline std::size_t disk_history_bytes(int disk_lag) {
  return static_cast<std::size_t>(disk_lag + 1) * 64 * sizeof(float);
}
// Batch buffers on the device: ids, mask, positions, targets (int32), double-buffered.
// Prefix tuning adds each slot's key mask over P + T rows.
std::size_t batch_buffer_bytes(int batch, int seq, int prefix_tokens = 0);

// Throws Error(out_of_memory) stating the minimum cap when even the all-streamed plan
// does not fit, or Error(invalid_argument) for impossible requests.
Placement plan_placement(const ModelConfig& config, const PlanRequest& request);
// The tier part of plan_placement (DESIGN.md §12): fills p's disk fields from the request's
// --host-mem; Error(out_of_memory) when even the smallest RAM tier does not fit under it.
void plan_tiers(Placement& p, const ModelConfig& config, const PlanRequest& request);

}  // namespace zo2
