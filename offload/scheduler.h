// The streaming scheduler (DESIGN.md §6). Three streams — upload (H2D), compute, offload
// (D2H) — ordered only by events. For each block of a ZO step:
//
//   H2D:     wait(slot free, block offloaded last step) → copy host image → slot → record(uploaded)
//   compute: wait(uploaded) → pending update of step t−1 → for each op: W+ → op(h+); W− → op(h−)
//            → record(computed)
//   D2H:     wait(computed) → copy slot → host image → record(offloaded, slot free)
//
// Resident blocks skip the copies and are updated in place; globals are always resident.
// Nothing drains at the end of a step: the next step's first uploads start while the head
// and the loss still run (cross-step prefetch); the deferred update reads g from device
// memory, so the host never waits for a loss to enqueue the next step. The host reads
// losses a step behind (wait_result), or synchronizes when asked (eval, save, exit).
//
// Note [Window slot lifecycle]
//   Streamed uses are numbered n = 0, 1, 2, ... across steps; use n takes slot n mod K.
//   Its upload waits for `offloaded[block]` (so the host image holds the block's latest
//   update) and, chunk by chunk, for `free[slot][c]`: the slot is handed over in
//   kSlotChunks byte ranges, and chunk c of use n is uploaded as soon as chunk c of use
//   n−K has been offloaded (or computed, when nothing had to be written back). With K = 2
//   (the planner's fallback under tight caps, e.g. OPT-175B in 12 GB) a whole-block
//   handover serializes a slot's offload and its next upload, and the step costs about
//   (upload + compute + offload) / 2 per block; chunked, the two directions of the link
//   run at once and the step approaches the transfer floor, as with K = 3. (Where a slot's
//   previous use was the same block — as many slots as streamed blocks — the whole-block
//   `offloaded` wait still comes first, so there the ranges gain nothing.) Compute waits
//   for `uploaded[slot]` (all chunks), offload for `computed[slot]`. With fp32 storage and
//   compute, a streamed block runs exactly the kernels a resident block runs, in the same
//   order, on the same bytes: a streamed run and a resident run produce bit-identical
//   weights (the scheduler's main test).
//
// Note [Sub-block streaming]
//   When two whole-block slots do not fit the cap (OPT-175B's bf16 block is 3.6 GB), the
//   planner streams the blocks by weight tiles instead (Placement::tile_slots > 0): the
//   unit is one tile of a block matrix — the rows [r0, r1) the graph materializes at a
//   time (ModelGraph::tile_rows) — and a block's 1-D tensors (norms, biases) travel
//   together as one vector unit. A streamed block's use is then:
//     upload:  wait(offloaded[block]) → wait(vector free) → vectors (+ state) → record
//              then, as the graph asks for tile n (TileFeed::acquire), on slot n mod K:
//              wait(tile free[slot]) → rows of W (+ fp8 scales, + state rows) → record
//     compute: wait(vectors) → pending update of the vectors → per tile: wait(tile) →
//              pending update of the tile → W+ → op(h+); W− → op(h−) → record(computed)
//     offload: per tile: wait(computed) → write its rows back → record(tile free); at the
//              block's end the vectors, then record(offloaded[block])
//   The update is elementwise with z drawn at each element's index in its whole tensor
//   (StoredTensor::first_row), and the tiles are exactly the graph's materialization
//   tiles, so a block streamed by tiles runs the same kernels on the same bytes as a block
//   streamed whole or resident: the weights are bit-identical (fp32; the scheduler test).
//   The upload stream runs up to K − 1 tiles ahead of compute, the offload stream writes
//   each tile back as soon as both passes used it, so the link's two directions and
//   compute overlap as with whole blocks, on slots a block's size / tiles-per-block small.
//   A disk block (Note [Disk tier pipeline]) is read whole into a staging buffer as before;
//   its tiles are uploaded from there, each applies the logged updates the image lacks
//   (Note [Lagging disk images]) as it arrives, and the write-back goes to the buffer. Not
//   combined (yet) with ranks that share a host image: the planner refuses it by name.
#pragma once
#include "models/batch.h"
#include "models/graph.h"
#include "offload/adapter_store.h"
#include "offload/block_store.h"
#include "offload/planner.h"
#include "runtime/comm.h"
#include "runtime/device.h"
#include "zo/parallel.h"
#include "zo/rule.h"

#include <cstdint>
#include <array>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <vector>

namespace zo2 {

struct StepParams {
  std::int64_t step = 0;     // global step index (0-based)
  std::uint64_t seed = 0;    // the step's seed (z of this step)
  float lr = 0;
  float eps = 1e-3f;
  float weight_decay = 0;
};

struct StepResult {
  std::int64_t step = 0;
  std::uint64_t seed = 0;
  float loss_plus = 0;       // L(θ + eps·z_0)
  float loss_minus = 0;      // central: L(θ − eps·z_0); forward difference: L(θ)
  float g = 0;               // g_0 as the device computed it (fp32): (L+ − L−)/(2·eps) or (L+ − L0)/eps
  // The step's loss as progress, --log-json and Python report it: L(θ) where the step measured
  // it (the forward difference's L0), else the central pair's mean ½(L+ + L−), which is L(θ)
  // to O(eps²). (½(L+ + L0) would be off by ½·eps·g.)
  double loss = 0;
  double g_double = 0;       // the same in double, from the fp32 losses
  std::vector<float> gs;     // g_j of every direction (gs[0] == g)
  std::vector<float> losses; // the rule's loss slots (zo/rule.h RuleEstimate)
  // zo-sgd-cons: L(θ), L(θ − lr·g·z), L(θ + lr·g·z) and the choice (+1, 0, −1) it made.
  float cons_losses[3] = {0, 0, 0};
  int choice = 1;
  float lr = 0, eps = 0, weight_decay = 0;
  bool update_skipped = false;  // a g_j not finite: its update will not be applied
  std::int64_t tokens = 0;
  std::size_t h2d_bytes = 0;    // bytes this step moved host→device (weights and batch)
  std::size_t d2h_bytes = 0;
  // Seconds each stream was busy with this step's work (Note [Stream busy time] in
  // runtime/device.h): the weight uploads of its streamed blocks (the batch's few bytes are
  // not timed), its compute (the pending update, both forward passes, head, loss, g) and
  // the offloads of its streamed blocks. Read when the result is read.
  double upload_busy_s = 0;
  double compute_busy_s = 0;
  double offload_busy_s = 0;
  // The disk tier (Note [Disk tier pipeline]): seconds with a read (write) in the kernel and
  // the bytes moved since the previous result was read (the I/O of neighbouring steps
  // overlaps, so a step's share is approximate).
  double disk_read_busy_s = 0;
  double disk_write_busy_s = 0;
  std::size_t disk_read_bytes = 0;
  std::size_t disk_write_bytes = 0;
};

struct EvalOptions {
  float* logits = nullptr;     // host [tokens, V] (needs SchedulerOptions::logits_out)
  float* token_loss = nullptr; // host [tokens]: −log p(target) per position, 0 where none
  // Hidden states as transformers' output_hidden_states: the embedding output, each
  // block's output, the last replaced by the LM head's input (after final norm/projection).
  std::vector<std::vector<float>>* hidden_states = nullptr;
};

// Fault injection for the scheduler's own tests: drop one event wait, so a test can show
// that the invariants (and ThreadSanitizer) catch a missing synchronization.
enum class SchedulerFault { none, skip_upload_wait, skip_slot_free_wait };

struct SchedulerOptions {
  DType compute = DType::f32;
  int batch = 1;   // capacity: the largest batch × seq this scheduler runs
  int seq = 1;
  int branches = 2;
  RuleConfig rule;  // the update rule a training scheduler asks (zo/rule.h)
  // LoRA (Note [LoRA under ZO]): the adapters, resident on the device for the whole run;
  // the rule perturbs and updates them alone, and streamed blocks are never written back.
  AdapterStore* adapters = nullptr;
  bool logits_out = false;
  // Ranks (zo/parallel.h, Note [Parallel modes]): this scheduler runs its rank's share of
  // each step's passes and merges the loss slots with the other ranks through `comm` on a
  // communication stream (Note [Loss exchange]). nullptr or a single layout: one process.
  Comm* comm = nullptr;
  ParallelLayout parallel;
  // Note [Sliced upload]: with a node-shared host image, each rank uploads its slice of a
  // streamed block and the node's devices exchange the rest (Device::make_group).
  bool sliced_upload = false;
  // Note [Lagging disk images]: a block on the disk tier is written back once it lags its
  // true value by this many updates (1: after every update, as RAM blocks are).
  int disk_lag = 1;
  SchedulerFault fault = SchedulerFault::none;  // tests only
};

struct TransferTotals {
  std::size_t h2d_bytes = 0;
  std::size_t d2h_bytes = 0;
  std::int64_t uploads = 0;
  std::int64_t offloads = 0;
};

class Scheduler {
 public:
  Scheduler(Device& device, BlockStore& store, const Placement& placement,
            const SchedulerOptions& options);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Enqueues one ZO step on `batch` and returns without waiting for it. With data
  // parallelism `batch` is this rank's shard and `weight` its share of the global mean
  // (zo/parallel.h; 0 = the batch's own: target tokens, or multiple-choice examples).
  void step(const HostBatch& batch, const StepParams& params, double weight = 0);
  // Blocks until the losses of `step` are on the host (each step once, in any order
  // among the last few steps).
  StepResult wait_result(std::int64_t step);
  // Applies the pending update to every block and the globals (enqueued; one pass over the
  // streamed blocks). Called before eval, save and exit.
  void flush();
  // Applies one logged update (seed log replay) through the same kernels a training run
  // uses, then waits: the result is bit-identical to the run that wrote the log. gs: the
  // step's g_j (zo-sgd-cons: the one g, applied with the logged choice).
  void replay_update(std::int64_t step, std::uint64_t seed, float lr, float weight_decay,
                     const std::vector<float>& gs, int choice = 1);
  // One unperturbed forward pass (after a flush); blocks until done and returns the loss.
  float eval(const HostBatch& batch, const EvalOptions& options = {});
  // Flushes and copies every device-side weight back into the block store, then waits.
  void sync_to_host();
  // Prefix tuning's initialization: an unperturbed forward of `batch` without the adapters,
  // returning each block's keys (after RoPE) and values of its rows, [2·L][tokens·kv_dim].
  std::vector<std::vector<float>> capture_kv(const HostBatch& batch);
  // Generation (models/graph.h, Note [KV cache]; needs a placement with gen_batch): runs the
  // batch's rows (B ≤ gen_batch sequences × T new tokens: ids, key mask, positions) through
  // the model after a flush and writes each sequence's next-token logits (its last row's)
  // to host `logits` [B, V]. With use_cache they follow the `past` rows each sequence already
  // holds in the cache (0: a fresh cache), and their keys and values join it; without, the
  // rows are the whole sequences (past = 0). Blocks until the logits are on the host.
  void decode(const HostBatch& batch, int past, bool use_cache, float* logits);
  // Copies the host adapters (AdapterStore) to the device again (after the host changed them).
  void upload_adapters();
  bool pending() const { return pending_.active; }

  const Placement& placement() const { return placement_; }
  TransferTotals totals() const { return totals_; }
  Device& device() { return device_; }

 private:
  struct Pending {
    bool active = false;
    std::int64_t step = 0;   // Adam's t = step + 1
    std::uint64_t seed = 0;  // the step seed (direction seeds derive from it)
    float lr = 0;
    float weight_decay = 0;
  };
  struct KvUse {  // a decoding pass (Note [KV cache]): rows per sequence before it and in it
    int past, rows, batch;
  };
  struct Use {  // what process_block needs to know about one pass over the blocks
    bool update;    // apply the pending update
    bool forward;   // run the forward graph
    int branches;
    const NoiseArgs* noise;  // the base weights' (nullptr under LoRA: frozen)
    const NoiseArgs* adapter_noise;  // the LoRA adapters'
    const struct BatchView* batch;
    std::vector<std::vector<float>>* hidden;
    std::int64_t busy_tag = -1;  // ≥ 0: time each stream's work under this tag (a step)
    const KvUse* kv = nullptr;   // decoding with the KV cache
    bool force_write = false;    // disk tier: write every lagging block back (flush)
  };
  // The KV cache of block i for a decoding pass: the device's, or a slot its host cache is
  // brought into (and, after compute, its new rows written back from: kv_end).
  KvCache kv_begin(std::int64_t i, const KvUse& kv, int& slot);
  void kv_end(std::int64_t i, const KvUse& kv, int slot);
  // The update of step p.step to one image (weights w, state st[0..buffers)), its g_j at g
  // on the device: the pending update (pending_, grads()), or a logged one.
  void apply_update(const WeightSet& w, const ImageLayout& layout, const WeightSet* st, const Pending& p,
                    const float* g, bool vectors_only = false);
  // The same for one tensor (or tile): w, its state m and v (nullptr without), its ndim.
  void apply_update(const StoredTensor& w, const StoredTensor* m, const StoredTensor* v, int ndim,
                    const Pending& p, const float* g);
  void apply_update(const WeightSet& w, const ImageLayout& layout, const WeightSet* st) {
    apply_update(w, layout, st, pending_, grads());
  }
  // Note [Lagging disk images]: pending_ became active (a step, a replayed update): keep its
  // parameters and a copy of its g_j for the disk blocks that will apply it later.
  void record_pending();
  float* g_history(std::int64_t step) {
    return g_hist_.as<float>() + static_cast<std::size_t>(step % hist_depth_) * RuleConfig::kMaxDirections;
  }
  // One forward pass over every block for the step's batch (embedding, blocks, final norm,
  // head, loss); the first pass of a step also applies the pending update.
  void forward_pass(const BatchView& view, const NoiseArgs* noise, int branches, bool update,
                    std::int64_t busy_tag);
  // zo-sgd-cons, after the estimate: L(θ) and the two candidates, the choice, the update.
  void conservative(const BatchView& view, const StepParams& p, int ring, const RuleEstimate& est);
  void run_blocks(const Use& use);
  // Note [Sub-block streaming]: the feed of one streamed block's tiles (scheduler.cpp).
  class BlockTiles;
  friend class BlockTiles;
  std::vector<DeviceBuffer> tile_slots_, vector_slots_;
  std::vector<std::unique_ptr<Event>> tile_uploaded_, tile_computed_, tile_free_;
  std::vector<std::unique_ptr<Event>> vector_uploaded_, vector_computed_, vector_free_;
  std::int64_t tile_uses_ = 0, vector_uses_ = 0;
  void exchange_losses(int ring, std::int64_t step, const RuleEstimate& est, double weight);
 public:
  // A batch's share of a mean loss: its target tokens, or its multiple-choice examples.
  static double batch_weight(const HostBatch& batch);
 private:
  int upload_batch(const HostBatch& batch);
  struct BatchSlot;
  static BatchView batch_view(const BatchSlot& slot, const HostBatch& batch);
  void capture_hidden(const Mat& m, std::int64_t tokens, std::vector<std::vector<float>>* out);
  void check_batch(const HostBatch& batch) const;

  Device& device_;
  BlockStore& store_;
  Placement placement_;
  SchedulerOptions options_;
  Ops& ops_;
  std::unique_ptr<Stream> h2d_, compute_, d2h_;
  // Note [Loss exchange]: the communication stream, this rank's place in the layout, and
  // per results-ring slot the pinned scalars going out and coming back with their events.
  std::unique_ptr<Stream> comm_stream_;
  bool distributed() const { return comm_stream_ != nullptr; }
  RankCoord coord_;
  std::unique_ptr<Comm> exchange_comm_;  // options_.comm duplicated for the exchange thread
  HostBuffer exchange_host_;  // kRing × 2 × kStepScalars floats: [mine | merged]
  std::unique_ptr<Event> losses_ready_[4], exchanged_[4];
  ModelGraph graph_;

  DeviceBuffer globals_dev_;
  WeightSet globals_w_;
  WeightSet globals_state_w_[2];
  std::vector<DeviceBuffer> resident_dev_;       // per block (empty when streamed)
  std::vector<WeightSet> resident_w_;
  std::vector<std::array<WeightSet, 2>> resident_state_w_;
  // LoRA: per block the adapters' device image, their LoraSet and their state (A's, B's).
  std::vector<DeviceBuffer> adapter_dev_;
  std::vector<LoraSet> lora_;
  std::vector<std::array<WeightSet, 4>> adapter_state_w_;  // [k·2 + 0] A's, [k·2 + 1] B's of buffer k
  void apply_adapter_updates();
  int prefix_tokens_ = 0;      // prefix tuning: P (positions shift by P, keys gain P rows)
  bool adapters_off_ = false;  // capture_kv: the base model alone
  void sync_adapters_to_host();
  std::vector<DeviceBuffer> slots_;
  // Note [Window slot lifecycle]: the byte ranges a slot is handed over in, and per slot
  // and range (slot k, range c at k × ranges + c) the event that frees it.
  static constexpr std::size_t kSlotChunks = 4;
  struct Chunk {
    std::size_t offset, bytes;
  };
  std::vector<Chunk> slot_chunks_;
  std::vector<std::unique_ptr<Event>> uploaded_, computed_, slot_free_;
  std::vector<std::unique_ptr<Event>> offloaded_;  // per block
  // Note [One host image per node]: per block, the write-backs this rank has enqueued (the
  // version the next upload expects), and how long a wait on another rank may take.
  std::vector<std::uint32_t> versions_;
  double shared_timeout_s_ = 600;
  std::unique_ptr<DeviceGroup> group_;  // Note [Sliced upload]: the node's devices
  std::int64_t next_use_ = 0;

  // Double-buffered batch inputs.
  struct BatchSlot {
    DeviceBuffer ids, mask, positions, targets, options, prefix_mask;
    HostBuffer staging;  // ids | mask | positions | targets | option info, pinned
    std::unique_ptr<Event> uploaded, consumed;
  };
  BatchSlot batch_slots_[2];
  std::int64_t batch_uses_ = 0;
  // A step's scalars on the device (kStepScalars floats): the loss slots from 0, the g_j
  // from kGradOffset, then a staging float for replay and zo-sgd-cons.
  static constexpr int kGradOffset = 2 * RuleConfig::kMaxDirections;
  static constexpr int kStageOffset = 3 * RuleConfig::kMaxDirections;
  DeviceBuffer g_dev_;
  float* grads() { return g_dev_.as<float>() + kGradOffset; }
  DeviceBuffer logits_dev_;

  // Generation (Note [KV cache]): the caches (per block on the device, or two device slots
  // and every block's cache in pinned host memory), their key mask and the next-token logits.
  std::vector<DeviceBuffer> kv_dev_;
  HostBuffer kv_host_;
  DeviceBuffer kv_mask_dev_, gen_logits_dev_;
  HostBuffer kv_mask_host_;
  std::vector<std::unique_ptr<Event>> kv_uploaded_, kv_computed_, kv_free_;  // per slot
  std::vector<std::unique_ptr<Event>> kv_written_;                           // per block
  std::int64_t kv_uses_ = 0;

  // Results ring: a step's scalars copied to pinned host memory a few steps deep.
  static constexpr int kRing = 4;
  HostBuffer results_host_;  // kRing × kStepScalars floats
  std::unique_ptr<Event> result_ready_[kRing];
  std::int64_t ring_step_[kRing];
  StepResult ring_meta_[kRing];
  std::map<std::int64_t, StepResult> done_;

  Pending pending_;
  TransferTotals totals_;

  // Note [Lagging disk images]: per block the updates its disk image holds (−1: unknown
  // until the first update), the updates the weights have (−1: unknown), the parameters of
  // the last updates and their g_j on the device (hist_depth_ steps).
  DiskTier* disk_ = nullptr;
  std::vector<std::int64_t> disk_step_;
  std::int64_t applied_ = -1;
  std::map<std::int64_t, Pending> history_;
  DeviceBuffer g_hist_;
  int hist_depth_ = 1;
};

}  // namespace zo2
