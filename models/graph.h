// The OPT and LLaMA forward graphs, written once against the op table (runtime/ops.h) and
// run for one or two activation "branches" at a time: evaluation runs one unperturbed
// branch; a ZO step runs the +eps and −eps branches through each weight while it is
// resident (DESIGN.md §1, dual forward). Weights are never perturbed in place: for each
// op, W± are materialized into scratch in the compute dtype (by row tiles for large
// tensors), used, and discarded (DESIGN.md §5).
//
// The graph knows nothing of where weights live: callers hand it WeightSets that point
// into device slots or the resident globals (offload/ does this).
#pragma once
#include "models/config.h"
#include "models/layout.h"
#include "runtime/arena.h"
#include "runtime/ops.h"

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace zo2 {

class Device;

// The tensors of one image, addressed by role, each with its data pointer and noise key.
struct WeightSet {
  std::array<StoredTensor, kRoleCount> tensors{};
  std::array<bool, kRoleCount> present{};
  // Role::count_ stands for "no tensor" (e.g. a linear layer without bias).
  const StoredTensor* find(Role r) const {
    const auto i = static_cast<std::size_t>(r);
    return i < kRoleCount && present[i] ? &tensors[i] : nullptr;
  }
  const StoredTensor& at(Role r) const;
};

// LoRA adapters of one block (models/peft.h, Note [LoRA under ZO]): A [r, in] and B [out, r]
// of each adapted linear layer, addressed by the role of its W; y += scale·(x·Aᵀ)·Bᵀ.
// Prefix tuning (Note [Prefix tuning under ZO]): prefix_tokens > 0, a holds the keys (role
// k_w) and b the values (role v_w), each [P, kv_dim].
struct LoraSet {
  WeightSet a, b;
  float scale = 0;
  int prefix_tokens = 0;
};

// Device-side inputs of one batch of `batch` sequences × `seq` tokens.
struct BatchView {
  int batch = 0;
  int seq = 0;
  const std::int32_t* ids = nullptr;        // [B·T]
  const std::int32_t* key_mask = nullptr;   // [B·T] 1/0
  const std::int32_t* positions = nullptr;  // [B·T] OPT: row of the position table; LLaMA: 0..T−1
  const std::int32_t* targets = nullptr;    // [B·T] token id to predict at each position, −100 = none
  // [B] multiple-choice candidates (Ops::option_loss): 2·group + is_label; null = token loss.
  const std::int32_t* option_info = nullptr;
  // Prefix tuning: [B·(P+T)] key mask of each sequence behind its P prefix rows (ones).
  const std::int32_t* prefix_key_mask = nullptr;
  std::int64_t tokens() const { return static_cast<std::int64_t>(batch) * seq; }
};

// One activation stream. `final` is the input of the LM head.
struct Branch {
  Mat hidden, x, q, k, v, attn, m1, m2, emb;
  Mat lora;  // [N, r]: x·Aᵀ of the adapter being applied
  Mat qx, kx, vx, ax;  // prefix tuning: q, k, v and attention out over B·(P+T) rows
  Mat final;
  float* ce_state = nullptr;  // [N, 3]
  float* row_loss = nullptr;  // [N]
  float* loss = nullptr;      // [1]
};

// Note [KV cache]
//   Generation (api/generate.h) decodes a batch of B sequences together. Each block keeps
//   the keys (after RoPE) and values of every row it has seen, B × capacity rows in the
//   compute dtype, sequence b at rows [b·capacity, (b + 1)·capacity). A call runs T new rows
//   per sequence (the left-padded prompts first, then one token at a time) after the `past`
//   rows the cache already holds: block() writes their keys and values at rows past..past+T
//   of each sequence and attends over all past + T of them (AttentionArgs' kv_seq), the
//   padding masked by the cache's key mask. With a prefix-tuning adapter every sequence's
//   cache starts with the block's P prefix rows (and positions count from P, as in
//   training). The scheduler decides where caches live
//   (offload/planner.h): on the device for every block, or in pinned host memory, brought
//   into one of two device slots with the block and the new rows written back.
struct KvCache {
  void* k = nullptr;  // [B·capacity, kv_dim], compute dtype
  void* v = nullptr;
  int capacity = 0;   // rows per sequence
  int past = 0;       // rows each sequence holds before this call (after its prefix rows)
  // Prefix tuning (Note [Prefix tuning under ZO]): each sequence's first rows are the
  // block's P prefix keys and values, written by the call with past = 0.
  const std::int32_t* key_mask = nullptr;  // [B·capacity] on the device, 1 = a real token
};

// Note [Sub-block streaming] (offload/scheduler.h): while block() runs with a feed, the
// rows of the block's matrices come from it one weight tile at a time — the same row
// ranges the graph materializes (ModelGraph::tile_rows) — instead of from the WeightSet,
// whose 2-D tensors then carry only their shape, dtype and key.
class TileFeed {
 public:
  virtual ~TileFeed() = default;
  // Rows [r0, r1) of the current block's tensor `role`: a view (first_row = r0) whose bytes
  // are on the device in the compute stream's order once this returns.
  virtual StoredTensor acquire(Role role, std::int64_t r0, std::int64_t r1) = 0;
  // The graph has enqueued its last use of the tile acquire() returned.
  virtual void release() = 0;
};

struct GraphLimits {
  // Max elements of one materialized weight tile (0 = whole tensors). Perturbed copies
  // of a 175B fc1 would take 2 × 1.2 GB; tiles of 16M elements keep scratch small while
  // each tile's GEMM stays large.
  std::int64_t weight_tile_elems = std::int64_t{1} << 24;
  std::int64_t vocab_tile = 8192;      // LM head rows per logits tile
  int lora_rank = 0;                   // > 0: room for LoRA adapters of this rank
  int prefix_tokens = 0;               // > 0: room for a prefix of this many rows per layer
};

// Everything the graph needs on the device for `branches` streams of N tokens.
struct WorkspacePlan {
  struct Item {
    std::string what;
    std::size_t bytes;
  };
  std::vector<Item> items;
  std::size_t total() const;
};

class ModelGraph {
 public:
  ModelGraph(const ModelConfig& config, DType compute, GraphLimits limits);

  // The device memory for `branches` activation streams over batch × seq tokens.
  WorkspacePlan workspace_plan(int branches, int batch, int seq) const;
  // Allocates that workspace from the device's arena (rope tables uploaded on `s`).
  void allocate(Device& device, Stream& s, int branches, int batch, int seq);
  std::span<Branch> branches() { return {branches_.data(), branches_.size()}; }
  int capacity_tokens() const { return capacity_tokens_; }

  // Token (+ position) embeddings of the batch into each branch's hidden.
  // noise != nullptr: two branches, the first sees W + eps·z, the second W − eps·z.
  void embed(Ops& ops, Stream& s, const WeightSet& globals, const BatchView& batch,
             const NoiseArgs* noise, int nbranches);
  // With lora, the block's adapters add to their layers; lora_noise perturbs them (and
  // noise the base weights; LoRA training passes nullptr there: the base is frozen).
  // `layer` is the block's index (its attention window: ModelConfig::attention_window).
  // With tiles, the block's matrices come from the feed (Note [Sub-block streaming]).
  void block(Ops& ops, Stream& s, const WeightSet& block, const BatchView& batch,
             const NoiseArgs* noise, int nbranches, const LoraSet* lora = nullptr,
             const NoiseArgs* lora_noise = nullptr, std::int64_t layer = 0, TileFeed* tiles = nullptr);
  // Rows per materialized tile of a rows × cols matrix: the unit of sub-block streaming.
  std::int64_t tile_rows(std::int64_t rows, std::int64_t cols) const;
  // Final norm (+ OPT project_out) into each branch's `final`.
  void finish(Ops& ops, Stream& s, const WeightSet& globals, const BatchView& batch,
              const NoiseArgs* noise, int nbranches);
  // Generation: the LM head on each sequence's last row only (after finish()): logits
  // [batch.batch, V] fp32. Branch 0, unperturbed.
  void last_logits(Ops& ops, Stream& s, const WeightSet& globals, const BatchView& batch, const Mat& logits);
  // While set, block() runs with this KV cache (Note [KV cache]); one unperturbed branch.
  void set_kv_cache(const KvCache* cache) { kv_cache_ = cache; }
  // LM head + cross-entropy by vocabulary tiles: row_loss and loss of each branch. With
  // logits (one branch only), the full [N, V] logits are written there too.
  void head(Ops& ops, Stream& s, const WeightSet& globals, const BatchView& batch,
            const NoiseArgs* noise, int nbranches, const Mat* logits = nullptr);

  const ModelConfig& config() const { return config_; }
  DType compute_dtype() const { return compute_; }
  const GraphLimits& limits() const { return limits_; }

 private:
  struct Views {
    Mat w[2];
  };
  std::int64_t tile_rows(const StoredTensor& w) const { return tile_rows(w.rows, w.cols); }
  Views materialize(Ops& ops, Stream& s, const StoredTensor& w, std::int64_t r0, std::int64_t r1,
                    const NoiseArgs* noise, void* scratch0, void* scratch1);
  Views vector(Ops& ops, Stream& s, const StoredTensor* w, const NoiseArgs* noise, int slot);
  // out = in·Wᵀ + bias (then ReLU when relu), tile by tile (Ops::linear); with residual,
  // residual += out (out is then scratch).
  void linear(Ops& ops, Stream& s, const WeightSet& ws, Role weight, Role bias, Mat Branch::*in,
              Mat Branch::*out, const NoiseArgs* noise, int nbranches, bool relu = false,
              Mat Branch::*residual = nullptr);
  // The adapter of `weight` (if lora has one): out (or residual) += scale·(in·A±ᵀ)·B±ᵀ.
  bool lora_add(Ops& ops, Stream& s, Role weight, Mat Branch::*in, Mat Branch::*out, int nbranches,
                Mat Branch::*residual);
  void prefix_attention(Ops& ops, Stream& s, const BatchView& batch, int nbranches);
  void cached_attention(Ops& ops, Stream& s, const BatchView& batch, int nbranches);
 public:
  // While set, block() appends branch 0's keys and values (after RoPE) of every block, in
  // the compute dtype's packed form (widen_packed_in_place once the stream has run).
  void capture_kv(std::vector<std::vector<float>>* out) { kv_capture_ = out; }
 private:
  std::vector<std::vector<float>>* kv_capture_ = nullptr;
  const KvCache* kv_cache_ = nullptr;
  const LoraSet* lora_ = nullptr;          // during block(): the block's adapters
  TileFeed* tiles_ = nullptr;              // during block(): the feed of its matrices
  const NoiseArgs* lora_noise_ = nullptr;
  void norm(Ops& ops, Stream& s, const WeightSet& ws, Role weight, Role bias, Mat Branch::*in,
            Mat Branch::*out, const NoiseArgs* noise, int nbranches);
  void attention(Ops& ops, Stream& s, const BatchView& batch, int nbranches);
  // Qwen3: RMSNorm of each head of q and k (q_norm, k_norm), before RoPE.
  void qk_norm(Ops& ops, Stream& s, const WeightSet& ws, const NoiseArgs* noise, int nbranches);
  int window_ = 0;  // during block(): the layer's sliding window (0: none)

  ModelConfig config_;
  DType compute_;
  GraphLimits limits_;
  std::int64_t max_tensor_elems_ = 0;
  std::int64_t max_vector_ = 0;
  std::vector<float> inv_freq_host_;

  std::vector<DeviceBuffer> buffers_;
  std::vector<Branch> branches_;
  void* weight_scratch_[2] = {nullptr, nullptr};
  void* vector_scratch_ = nullptr;  // 4 slots × 2 branches × max_vector_
  Mat logits_tile_;
  float* inv_freq_ = nullptr;
  // Gemma 3's local layers' rotary frequencies (Note [Gemma 3]) and, during block(), the
  // layer's own (inv_freq_ or inv_freq_local_).
  std::vector<float> inv_freq_local_host_;
  float* inv_freq_local_ = nullptr;
  const float* layer_inv_freq_ = nullptr;
  int capacity_tokens_ = 0;
};

}  // namespace zo2
