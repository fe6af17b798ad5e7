#include "offload/scheduler.h"

#include "runtime/element.h"
#include "runtime/error.h"
#include "runtime/log.h"
#include "runtime/ops.h"
#include "zo/tensor_key.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

namespace zo2 {
Scheduler::Scheduler(Device& device, BlockStore& store, const Placement& placement,
                     const SchedulerOptions& options)
    : device_(device),
      store_(store),
      placement_(placement),
      options_(options),
      ops_(device.ops()),
      h2d_(device.make_stream("upload")),
      compute_(device.make_stream("compute")),
      d2h_(device.make_stream("offload")),
      graph_(store.config(), options.compute, placement.limits) {
  const std::int64_t L = store.num_blocks();
  ZO2_CHECK(static_cast<std::int64_t>(placement_.resident.size()) == L);
  if (placement_.streamed > 0 && placement_.window < 1 && placement_.tile_slots < 1)
    fail(ErrorKind::internal, "a placement that streams blocks needs at least one window or tile slot");
  const bool tiled = placement_.tile_slots > 0 && placement_.streamed > 0;
  if (tiled && (store.node_ranks() > 1 || options_.sliced_upload))
    fail(ErrorKind::unsupported, "blocks streamed by weight tiles (Note [Sub-block streaming]) cannot use {} yet",
         options_.sliced_upload ? "the sliced upload" : "a node-shared host image");
  if (options_.branches != 1 && options_.branches != 2)
    fail(ErrorKind::invalid_argument, "a scheduler runs one or two branches, not {}", options_.branches);
  validate_rule(options_.rule, 0.0f);
  // Under LoRA the adapters keep the rule's state and the frozen blocks none.
  const int block_buffers = options_.adapters ? 0 : options_.rule.state_buffers();
  if (store.state().buffers != block_buffers ||
      (store.state().buffers > 0 && store.state().dtype != options_.rule.state_dtype))
    fail(ErrorKind::internal, "the block store keeps {} state buffers, the rule {} needs {}", store.state().buffers,
         rule_name(options_.rule.kind), block_buffers);
  Arena& arena = device.arena();
  // Images with their state (Note [Update rules] in zo/rule.h): what is copied and held.
  const std::size_t block_bytes = store.stream_bytes();
  const int buffers = store.state().buffers;

  globals_dev_ = arena.allocate(store.globals_stream_bytes(), "globals");
  compute_->copy_h2d(globals_dev_.data(), store.globals_image(), store.globals_stream_bytes());
  globals_w_ = bind_weights(store.globals_layout(), globals_dev_.data());
  for (int k = 0; k < buffers; ++k)
    globals_state_w_[k] = bind_weights(store.globals_state_layout(),
                                       static_cast<char*>(globals_dev_.data()) + store.globals_state_offset(k));
  totals_.h2d_bytes += store.globals_stream_bytes();

  resident_dev_.resize(static_cast<std::size_t>(L));
  resident_w_.resize(static_cast<std::size_t>(L));
  resident_state_w_.resize(static_cast<std::size_t>(L));
  for (std::int64_t i = 0; i < L; ++i) {
    if (!placement_.resident[static_cast<std::size_t>(i)]) continue;
    auto& buf = resident_dev_[static_cast<std::size_t>(i)];
    buf = arena.allocate(block_bytes, fmt::format("resident block {}", i));
    compute_->copy_h2d(buf.data(), store.block_image(i), block_bytes);
    totals_.h2d_bytes += block_bytes;
    resident_w_[static_cast<std::size_t>(i)] = bind_weights(store.block_layout(i), buf.data());
    for (int k = 0; k < buffers; ++k)
      resident_state_w_[static_cast<std::size_t>(i)][static_cast<std::size_t>(k)] =
          bind_weights(store.block_state_layout(i), static_cast<char*>(buf.data()) + store.block_state_offset(k));
  }
  // Note [Window slot lifecycle]: each slot is handed from one use to the next chunk by
  // chunk; the chunks are the same for every block (all block images have one size).
  const std::size_t chunk = align_up((block_bytes + kSlotChunks - 1) / kSlotChunks);
  for (std::size_t off = 0; off < block_bytes; off += chunk)
    slot_chunks_.push_back({off, std::min(chunk, block_bytes - off)});
  for (int k = 0; k < placement_.window; ++k) {
    slots_.push_back(arena.allocate(block_bytes, fmt::format("window slot {}", k)));
    uploaded_.push_back(device.make_event());
    computed_.push_back(device.make_event());
    for (std::size_t c = 0; c < slot_chunks_.size(); ++c) slot_free_.push_back(device.make_event());
  }
  if (tiled) {
    // Note [Sub-block streaming]: the tile ring and the two vector slots.
    for (int k = 0; k < placement_.tile_slots; ++k) {
      tile_slots_.push_back(arena.allocate(placement_.tile_bytes, fmt::format("tile slot {}", k)));
      tile_uploaded_.push_back(device.make_event());
      tile_computed_.push_back(device.make_event());
      tile_free_.push_back(device.make_event());
    }
    for (int k = 0; k < 2; ++k) {
      vector_slots_.push_back(arena.allocate(placement_.vector_bytes, fmt::format("vector slot {}", k)));
      vector_uploaded_.push_back(device.make_event());
      vector_computed_.push_back(device.make_event());
      vector_free_.push_back(device.make_event());
    }
  }
  for (std::int64_t i = 0; i < L; ++i) offloaded_.push_back(device.make_event());
  versions_.assign(static_cast<std::size_t>(L), 0);
  if (store.node()) shared_timeout_s_ = store.node()->timeout_s();
  if (options_.sliced_upload && store.node_ranks() > 1) group_ = device.make_group(store.node()->duplicate());

  if (AdapterStore* ad = options_.adapters) {
    ZO2_CHECK(ad->num_blocks() == L && buffers == 0);
    ZO2_CHECK(ad->state().buffers == options_.rule.state_buffers());
    prefix_tokens_ = ad->peft().prefix;
    adapter_dev_.resize(static_cast<std::size_t>(L));
    lora_.resize(static_cast<std::size_t>(L));
    adapter_state_w_.resize(static_cast<std::size_t>(L));
    for (std::int64_t i = 0; i < L; ++i) {
      const auto u = static_cast<std::size_t>(i);
      adapter_dev_[u] = arena.allocate(ad->image_bytes(), fmt::format("LoRA adapters of block {}", i));
      compute_->copy_h2d(adapter_dev_[u].data(), ad->image(i), ad->image_bytes());
      totals_.h2d_bytes += ad->image_bytes();
      auto* base = static_cast<char*>(adapter_dev_[u].data());
      const LoraLayout& l = ad->layout(i);
      lora_[u].a = bind_weights(l.a, base);
      lora_[u].b = bind_weights(l.b, base + l.b_offset);
      lora_[u].scale = ad->peft().lora ? ad->peft().scale() : 0.0f;
      lora_[u].prefix_tokens = ad->peft().prefix;
      for (int k = 0; k < ad->state().buffers; ++k) {
        const LoraLayout& sl = ad->state_layout(i);
        char* s = base + ad->state_offset(k);
        adapter_state_w_[u][static_cast<std::size_t>(2 * k)] = bind_weights(sl.a, s);
        adapter_state_w_[u][static_cast<std::size_t>(2 * k + 1)] = bind_weights(sl.b, s + sl.b_offset);
      }
    }
  }
  graph_.allocate(device, *compute_, options_.branches, options_.batch, options_.seq);

  const std::size_t n = static_cast<std::size_t>(options_.batch) * static_cast<std::size_t>(options_.seq);
  for (auto& s : batch_slots_) {
    s.ids = arena.allocate(n * sizeof(std::int32_t), "batch token ids");
    s.mask = arena.allocate(n * sizeof(std::int32_t), "batch attention mask");
    s.positions = arena.allocate(n * sizeof(std::int32_t), "batch positions");
    s.targets = arena.allocate(n * sizeof(std::int32_t), "batch targets");
    s.options = arena.allocate(static_cast<std::size_t>(options_.batch) * sizeof(std::int32_t), "batch option groups");
    const std::size_t px = prefix_tokens_ > 0 ? static_cast<std::size_t>(options_.batch) *
                                                    static_cast<std::size_t>(options_.seq + prefix_tokens_)
                                              : 0;
    if (px > 0) s.prefix_mask = arena.allocate(px * sizeof(std::int32_t), "batch prefix key mask");
    s.staging = device.alloc_host((4 * n + static_cast<std::size_t>(options_.batch) + px) * sizeof(std::int32_t));
    s.uploaded = device.make_event();
    s.consumed = device.make_event();
  }
  g_dev_ = arena.allocate(kStepScalars * sizeof(float), "losses and projected gradients");
  compute_->memset(g_dev_.data(), 0, kStepScalars * sizeof(float));
  if ((disk_ = store.disk()) != nullptr) {
    // Note [Lagging disk images]
    if (options_.disk_lag < 1) fail(ErrorKind::invalid_argument, "--disk-lag must be at least 1, not {}", options_.disk_lag);
    for (std::int64_t i = 0; i < L; ++i)
      if (store.on_disk(i) && placement_.resident[static_cast<std::size_t>(i)])
        fail(ErrorKind::internal, "block {} is on the disk tier and resident on the device", i);
    // The step each disk image holds (written at load, or kept from a previous run).
    disk_step_.assign(static_cast<std::size_t>(L), -1);
    for (std::int64_t i = 0; i < L; ++i)
      if (store.on_disk(i)) disk_step_[static_cast<std::size_t>(i)] = disk_->image_step(i);
    hist_depth_ = options_.disk_lag + 1;
    static_assert(RuleConfig::kMaxDirections == 64, "disk_history_bytes (offload/planner.h) counts 64 directions");
    const std::size_t bytes = disk_history_bytes(options_.disk_lag);
    g_hist_ = arena.allocate(bytes, "projected gradients of the lagging disk images");
    compute_->memset(g_hist_.data(), 0, bytes);
  }
  if (options_.logits_out)
    logits_dev_ = arena.allocate(n * static_cast<std::size_t>(store.config().vocab_size) * sizeof(float),
                                 "logits");
  if (placement_.gen_batch > 0) {
    const std::int64_t V = store.config().vocab_size;
    const auto gb = static_cast<std::size_t>(placement_.gen_batch);
    gen_logits_dev_ = arena.allocate(gb * static_cast<std::size_t>(V) * sizeof(float), "next-token logits");
    if (placement_.kv_positions > 0) {
      const std::size_t rows = gb * static_cast<std::size_t>(placement_.kv_positions);
      kv_mask_dev_ = arena.allocate(rows * sizeof(std::int32_t), "KV cache key mask");
      kv_mask_host_ = device.alloc_host(rows * sizeof(std::int32_t));
      const std::size_t kvb = placement_.kv_block_bytes;
      if (placement_.kv_on_device) {
        for (std::int64_t i = 0; i < L; ++i) kv_dev_.push_back(arena.allocate(kvb, fmt::format("KV cache of block {}", i)));
      } else {
        for (int c = 0; c < 2; ++c) {
          kv_dev_.push_back(arena.allocate(kvb, fmt::format("KV cache slot {}", c)));
          kv_uploaded_.push_back(device.make_event());
          kv_computed_.push_back(device.make_event());
          kv_free_.push_back(device.make_event());
        }
        kv_host_ = device.alloc_host(static_cast<std::size_t>(L) * kvb);
        for (std::int64_t i = 0; i < L; ++i) kv_written_.push_back(device.make_event());
      }
    }
  }
  results_host_ = device.alloc_host(kRing * kStepScalars * sizeof(float));
  for (int r = 0; r < kRing; ++r) {
    result_ready_[r] = device.make_event();
    ring_step_[r] = -1;
  }
  if (options_.comm && !options_.parallel.single()) {
    if (options_.parallel.size() != options_.comm->size())
      fail(ErrorKind::internal, "parallel layout {} for {} ranks", options_.parallel.spec(), options_.comm->size());
    coord_ = rank_coord(options_.parallel, options_.comm->rank());
    comm_stream_ = device.make_stream("exchange");
    exchange_comm_ = options_.comm->duplicate();
    exchange_host_ = device.alloc_host(kRing * 2 * kStepScalars * sizeof(float));
    for (int r = 0; r < kRing; ++r) {
      losses_ready_[r] = device.make_event();
      exchanged_[r] = device.make_event();
    }
  }
  compute_->synchronize();
  log_debug("scheduler: device arena {} in use after setup (plan predicted {})",
            format_bytes(static_cast<double>(arena.in_use())),
            format_bytes(static_cast<double>(placement_.total_bytes)));
}

Scheduler::~Scheduler() {
  for (Stream* s : {h2d_.get(), compute_.get(), d2h_.get(), comm_stream_.get()}) {
    if (!s) continue;
    try {
      s->synchronize();
    } catch (const std::exception& e) {
      log_warn("scheduler: {} stream failed while shutting down: {}", s->name(), e.what());
    }
  }
  if (disk_) {
    try {
      disk_->drain();
    } catch (const std::exception& e) {
      log_warn("scheduler: the disk tier failed while shutting down: {}", e.what());
    }
  }
}

void Scheduler::check_batch(const HostBatch& batch) const {
  if (batch.tokens() > static_cast<std::int64_t>(options_.batch) * options_.seq)
    fail(ErrorKind::invalid_argument, "batch of {} × {} tokens exceeds the scheduler's capacity of {} × {}",
         batch.batch, batch.seq, options_.batch, options_.seq);
  if (static_cast<std::int64_t>(batch.ids.size()) != batch.tokens() ||
      (!batch.option_info.empty() && static_cast<int>(batch.option_info.size()) != batch.batch))
    fail(ErrorKind::internal, "malformed batch");
}

BatchView Scheduler::batch_view(const BatchSlot& s, const HostBatch& batch) {
  BatchView view;
  view.batch = batch.batch;
  view.seq = batch.seq;
  view.ids = s.ids.as<std::int32_t>();
  view.key_mask = s.mask.as<std::int32_t>();
  view.positions = s.positions.as<std::int32_t>();
  view.targets = s.targets.as<std::int32_t>();
  if (!batch.option_info.empty()) view.option_info = s.options.as<std::int32_t>();
  if (s.prefix_mask) view.prefix_key_mask = s.prefix_mask.as<std::int32_t>();
  return view;
}

int Scheduler::upload_batch(const HostBatch& batch) {
  const int b = static_cast<int>(batch_uses_++ % 2);
  BatchSlot& s = batch_slots_[b];
  const std::size_t bytes = static_cast<std::size_t>(batch.tokens()) * sizeof(std::int32_t);
  const std::size_t cap = static_cast<std::size_t>(options_.batch) * static_cast<std::size_t>(options_.seq) *
                          sizeof(std::int32_t);
  s.uploaded->synchronize();  // the previous copy out of this staging buffer has finished
  auto* staging = static_cast<char*>(s.staging.data());
  std::memcpy(staging, batch.ids.data(), bytes);
  std::memcpy(staging + cap, batch.key_mask.data(), bytes);
  std::memcpy(staging + 2 * cap, batch.positions.data(), bytes);
  std::memcpy(staging + 3 * cap, batch.targets.data(), bytes);
  const std::size_t option_bytes = batch.option_info.size() * sizeof(std::int32_t);
  if (option_bytes > 0) std::memcpy(staging + 4 * cap, batch.option_info.data(), option_bytes);
  // Prefix tuning (Note [Prefix tuning under ZO]): the sequence's positions follow the P
  // prefix rows, whose keys every query sees.
  const bool prefix = prefix_tokens_ > 0 && !adapters_off_;
  std::size_t prefix_bytes = 0;
  if (prefix) {
    auto* pos = reinterpret_cast<std::int32_t*>(staging + 2 * cap);
    for (std::int64_t i = 0; i < batch.tokens(); ++i) pos[i] += prefix_tokens_;
    auto* pm = reinterpret_cast<std::int32_t*>(staging + 4 * cap +
                                               static_cast<std::size_t>(options_.batch) * sizeof(std::int32_t));
    const std::int64_t T = batch.seq, S = T + prefix_tokens_;
    for (std::int64_t b = 0; b < batch.batch; ++b) {
      for (std::int64_t p = 0; p < prefix_tokens_; ++p) pm[b * S + p] = 1;
      for (std::int64_t t = 0; t < T; ++t) pm[b * S + prefix_tokens_ + t] = batch.key_mask[static_cast<std::size_t>(b * T + t)];
    }
    prefix_bytes = static_cast<std::size_t>(batch.batch * S) * sizeof(std::int32_t);
  }
  h2d_->wait(*s.consumed);
  h2d_->copy_h2d(s.ids.data(), staging, bytes);
  h2d_->copy_h2d(s.mask.data(), staging + cap, bytes);
  h2d_->copy_h2d(s.positions.data(), staging + 2 * cap, bytes);
  h2d_->copy_h2d(s.targets.data(), staging + 3 * cap, bytes);
  if (option_bytes > 0) h2d_->copy_h2d(s.options.data(), staging + 4 * cap, option_bytes);
  if (prefix_bytes > 0)
    h2d_->copy_h2d(s.prefix_mask.data(),
                   staging + 4 * cap + static_cast<std::size_t>(options_.batch) * sizeof(std::int32_t), prefix_bytes);
  h2d_->record(*s.uploaded);
  compute_->wait(*s.uploaded);
  totals_.h2d_bytes += 4 * bytes + option_bytes + prefix_bytes;
  return b;
}

// Note [Update rules] (zo/rule.h), question 4: the pending update of one image.
void Scheduler::apply_update(const WeightSet& w, const ImageLayout& layout, const WeightSet* st, const Pending& pending,
                             const float* g, bool vectors_only) {
  const bool stateful = options_.rule.state_buffers() > 0;
  ZO2_CHECK(!stateful || st != nullptr);
  const bool adam = options_.rule.kind == RuleKind::adam;
  for (const TensorSlot& slot : layout.tensors()) {
    if (vectors_only && slot.ndim != 1) continue;
    apply_update(w.at(slot.role), stateful ? &st[0].at(slot.role) : nullptr,
                 stateful && adam ? &st[1].at(slot.role) : nullptr, slot.ndim, pending, g);
  }
}

void Scheduler::apply_update(const StoredTensor& w, const StoredTensor* m, const StoredTensor* v, int ndim,
                             const Pending& pending, const float* g) {
  const RuleConfig& rule = options_.rule;
  const int q = rule.directions;
  if (rule.state_buffers() == 0) {
    // The SGD family: one pass per direction, in order, with lr/q (q = 1: lr itself).
    const float lr = q == 1 ? pending.lr : pending.lr / static_cast<float>(q);
    for (int j = 0; j < q; ++j) {
      UpdateArgs a;
      a.seed = direction_seed(pending.seed, j);
      a.lr = lr;
      a.weight_decay = uses_weight_decay(ndim) ? pending.weight_decay : 0.0f;
      a.g = g + j;
      a.rounding_seed = a.seed;
      a.sign = rule.kind == RuleKind::sign;
      ops_.update(*compute_, w, a);
    }
    return;
  }
  ZO2_CHECK(m != nullptr);
  StateUpdateArgs a;
  a.directions = q;
  for (int j = 0; j < q; ++j) a.seeds[j] = direction_seed(pending.seed, j);
  a.g = g;
  a.lr = pending.lr;
  a.adam = rule.kind == RuleKind::adam;
  a.beta1 = rule.beta1;
  a.beta2 = rule.beta2;
  a.adam_eps = rule.adam_eps;
  a.bias1 = a.adam ? adam_bias(rule.beta1, pending.step + 1) : 1.0f;
  a.bias2 = a.adam ? adam_bias(rule.beta2, pending.step + 1) : 1.0f;
  a.rounding_seed = pending.seed;
  a.weight_decay = uses_weight_decay(ndim) ? pending.weight_decay : 0.0f;
  ZO2_CHECK(!a.adam || v != nullptr);
  ops_.update_state(*compute_, w, *m, a.adam ? v : nullptr, a);
}

// Hidden states in a narrow compute dtype (bf16/fp16) land packed at the front of their
// float vector and are widened in place (widen_packed_in_place) once the stream has run.
void Scheduler::capture_hidden(const Mat& m, std::int64_t tokens,
                               std::vector<std::vector<float>>* out) {
  if (!out) return;
  ZO2_CHECK(m.contiguous() && (m.dtype == DType::f32 || m.dtype == DType::bf16 || m.dtype == DType::f16));
  out->emplace_back(static_cast<std::size_t>(tokens * m.cols));
  compute_->copy_d2h(out->back().data(), m.data, out->back().size() * dtype_size(m.dtype));
}

// Note [Sub-block streaming]: one streamed block's use, its vectors as one unit and its
// matrices tile by tile, in the order the graph asks for them.
class Scheduler::BlockTiles final : public TileFeed {
 public:
  // Which updates this use applies — the pending one (update), or for a disk block the
  // logged ones its image lacks, [from, to) (Note [Lagging disk images]) — and whether the
  // tiles go back to `image`: the block's host image, or the staging buffer the disk tier
  // read it into (disk: its counters order the buffer's reuse, Note [Disk tier pipeline]).
  struct Plan {
    bool update = false;
    std::int64_t from = -1, to = -1;
    bool write_back = false;
    char* image = nullptr;
    const DiskTier::Use* disk = nullptr;
  };
  BlockTiles(Scheduler& s, std::int64_t block, const Plan& plan, std::int64_t busy_tag)
      : s_(s),
        i_(block),
        update_(plan.update),
        from_(plan.from),
        to_(plan.to),
        write_back_(plan.write_back),
        disk_(plan.disk),
        tag_(busy_tag),
        layout_(s.store_.block_layout(block)),
        image_(plan.image),
        host_(bind_weights(layout_, image_)) {}

  // Uploads the block's vectors (and, when this use updates, their state); returns what the
  // graph sees — the vectors in their slot, the matrices as shapes only — and the state.
  WeightSet begin(std::array<WeightSet, 2>& st) {
    const int buffers = s_.store_.state().buffers;
    vk_ = static_cast<int>(s_.vector_uses_++ % 2);
    char* slot = vector_slot();
    s_.h2d_->wait(*s_.offloaded_[static_cast<std::size_t>(i_)]);
    if (disk_)
      s_.h2d_->wait_value(s_.disk_->read_counter(disk_->staging), disk_->stamp, 0,
                          fmt::format("the disk tier's read of block {}", i_));
    if (s_.options_.fault != SchedulerFault::skip_slot_free_wait) s_.h2d_->wait(*s_.vector_free_[static_cast<std::size_t>(vk_)]);
    WeightSet w = host_;
    for (int k = 0; k < buffers; ++k)
      st[static_cast<std::size_t>(k)] =
          bind_weights(s_.store_.block_state_layout(i_), image_ + s_.store_.block_state_offset(k));
    std::size_t at = 0;
    for (const TensorSlot& ts : layout_.tensors()) {
      const auto r = static_cast<std::size_t>(ts.role);
      StoredTensor v[3];
      if (ts.ndim == 1) at = place(ts, 0, ts.rows, at, slot, vector_pieces_, v);
      // A matrix's bytes come from acquire(): no pointer into the host image reaches the graph.
      w.tensors[r] = ts.ndim == 1 ? v[0] : shape_of(w.tensors[r]);
      for (int k = 0; k < buffers; ++k) {
        StoredTensor& t = st[static_cast<std::size_t>(k)].tensors[r];
        t = ts.ndim == 1 ? v[1 + k] : shape_of(t);
      }
    }
    ZO2_CHECK(at <= s_.placement_.vector_bytes);
    copy_up(slot, vector_pieces_);
    s_.h2d_->record(*s_.vector_uploaded_[static_cast<std::size_t>(vk_)]);
    if (s_.options_.fault != SchedulerFault::skip_upload_wait) s_.compute_->wait(*s_.vector_uploaded_[static_cast<std::size_t>(vk_)]);
    return w;
  }

  StoredTensor acquire(Role role, std::int64_t r0, std::int64_t r1) override {
    ZO2_CHECK(!held_);
    const TensorSlot* ts = layout_.find(role);
    ZO2_CHECK(ts != nullptr && ts->ndim == 2 && 0 <= r0 && r0 < r1 && r1 <= ts->rows);
    if (r0 * ts->cols % 4 != 0)
      fail(ErrorKind::internal, "a tile of {} starts at row {} of {} columns, not on a 4-element noise group", ts->name,
           r0, ts->cols);
    tk_ = static_cast<int>(s_.tile_uses_++ % s_.placement_.tile_slots);
    char* slot = tile_slot();
    if (s_.options_.fault != SchedulerFault::skip_slot_free_wait) s_.h2d_->wait(*s_.tile_free_[static_cast<std::size_t>(tk_)]);
    tile_pieces_.clear();
    StoredTensor v[3];
    ZO2_CHECK(place(*ts, r0, r1, 0, slot, tile_pieces_, v) <= s_.placement_.tile_bytes);
    copy_up(slot, tile_pieces_);
    s_.h2d_->record(*s_.tile_uploaded_[static_cast<std::size_t>(tk_)]);
    // Busy spans hold no waits (Note [Stream busy time]).
    if (tag_ >= 0) s_.compute_->end_busy();
    if (s_.options_.fault != SchedulerFault::skip_upload_wait) s_.compute_->wait(*s_.tile_uploaded_[static_cast<std::size_t>(tk_)]);
    if (tag_ >= 0) s_.compute_->begin_busy(tag_);
    const bool stateful = s_.store_.state().buffers > 0;
    apply(v[0], stateful ? &v[1] : nullptr, s_.store_.state().buffers > 1 ? &v[2] : nullptr);
    held_ = true;
    return v[0];
  }

  void release() override {
    ZO2_CHECK(held_);
    held_ = false;
    Event& computed = *s_.tile_computed_[static_cast<std::size_t>(tk_)];
    Event& free = *s_.tile_free_[static_cast<std::size_t>(tk_)];
    s_.compute_->record(computed);
    if (write_back_) {
      s_.d2h_->wait(computed);
      copy_down(tile_slot(), tile_pieces_);
      s_.d2h_->record(free);
    } else {
      s_.compute_->record(free);  // nothing to write back: the slot is free once compute is done
    }
  }

  // A pass that only updates: every tile of every matrix in turn.
  void update_all() {
    for (const TensorSlot& ts : layout_.tensors()) {
      if (ts.ndim != 2) continue;
      const std::int64_t tr = s_.graph_.tile_rows(ts.rows, ts.cols);
      for (std::int64_t r0 = 0; r0 < ts.rows; r0 += tr) {
        acquire(ts.role, r0, std::min(ts.rows, r0 + tr));
        release();
      }
    }
  }

  // After the graph: the vectors back when updated, then the block is home (offloaded).
  void end() {
    ZO2_CHECK(!held_);
    Event& computed = *s_.vector_computed_[static_cast<std::size_t>(vk_)];
    Event& free = *s_.vector_free_[static_cast<std::size_t>(vk_)];
    s_.compute_->record(computed);
    // Every tile of the block is uploaded: the disk tier may refill its staging buffer once
    // the write-back (if any) is done too.
    if (disk_) s_.h2d_->write_value(s_.disk_->uploaded_counter(disk_->staging), disk_->stamp);
    if (write_back_) {
      s_.d2h_->wait(computed);
      copy_down(vector_slot(), vector_pieces_);
      s_.d2h_->record(free);
      if (disk_) s_.d2h_->write_value(s_.disk_->offloaded_counter(disk_->staging), disk_->stamp);
      s_.d2h_->record(*s_.offloaded_[static_cast<std::size_t>(i_)]);
      ++s_.totals_.offloads;
    } else {
      s_.compute_->record(free);
    }
    ++s_.totals_.uploads;
  }

 private:
  struct Piece {
    std::size_t host, dev, bytes;
    bool state;  // optimizer state: moved only by a use that updates
  };
  // The updates of this use to one tile (or vector): the logged ones a disk image lacks,
  // in step order, or the pending one.
  void apply(const StoredTensor& w, const StoredTensor* m, const StoredTensor* v) {
    if (from_ >= 0) {
      for (std::int64_t t = from_; t < to_; ++t)
        if (auto h = s_.history_.find(t); h != s_.history_.end()) s_.apply_update(w, m, v, 2, h->second, s_.g_history(t));
    } else if (update_) {
      s_.apply_update(w, m, v, 2, s_.pending_, s_.grads());
    }
  }
  static StoredTensor shape_of(StoredTensor t) {
    t.data = nullptr;
    t.row_scales = nullptr;
    return t;
  }
  char* vector_slot() const { return static_cast<char*>(s_.vector_slots_[static_cast<std::size_t>(vk_)].data()); }
  char* tile_slot() const { return static_cast<char*>(s_.tile_slots_[static_cast<std::size_t>(tk_)].data()); }

  // Rows [r0, r1) of `ts` and of its state buffers, laid out in a slot from byte `at` as
  // tile_piece_bytes() counts them (offload/planner.h): the pieces to copy, the views
  // (weight, then each state buffer) and the next free byte.
  std::size_t place(const TensorSlot& ts, std::int64_t r0, std::int64_t r1, std::size_t at, char* slot,
                    std::vector<Piece>& out, StoredTensor (&views)[3]) const {
    const auto n = static_cast<std::size_t>(r1 - r0);
    const std::uint64_t key = host_.at(ts.role).key;
    auto part = [&](const TensorSlot& t, std::size_t base, bool state, StoredTensor& view) {
      const std::size_t row = static_cast<std::size_t>(t.cols) * dtype_size(t.dtype);
      out.push_back({base + t.offset + static_cast<std::size_t>(r0) * row, at, n * row, state});
      view = StoredTensor{slot + at, t.dtype, nullptr, r1 - r0, t.cols, key, r0};
      at += align_up(n * row);
      if (t.has_scales()) {
        out.push_back({base + t.scale_offset + static_cast<std::size_t>(r0) * sizeof(float), at, n * sizeof(float), state});
        view.row_scales = reinterpret_cast<float*>(slot + at);
        at += align_up(n * sizeof(float));
      }
    };
    part(ts, 0, false, views[0]);
    for (int k = 0; k < s_.store_.state().buffers; ++k) {
      const TensorSlot* st = s_.store_.block_state_layout(i_).find(ts.role);
      ZO2_CHECK(st != nullptr);
      part(*st, s_.store_.block_state_offset(k), true, views[1 + k]);
    }
    return at;
  }
  void copy_up(char* slot, const std::vector<Piece>& pieces) {
    if (tag_ >= 0) s_.h2d_->begin_busy(tag_);
    for (const Piece& p : pieces) {
      // A pass without an update reads the weights alone.
      if (p.state && !update_ && from_ < 0) continue;
      s_.h2d_->copy_h2d(slot + p.dev, image_ + p.host, p.bytes);
      s_.totals_.h2d_bytes += p.bytes;
    }
    if (tag_ >= 0) s_.h2d_->end_busy();
  }
  void copy_down(char* slot, const std::vector<Piece>& pieces) {
    if (tag_ >= 0) s_.d2h_->begin_busy(tag_);
    for (const Piece& p : pieces) {
      s_.d2h_->copy_d2h(image_ + p.host, slot + p.dev, p.bytes);
      s_.totals_.d2h_bytes += p.bytes;
    }
    if (tag_ >= 0) s_.d2h_->end_busy();
  }

  Scheduler& s_;
  std::int64_t i_;
  bool update_;
  std::int64_t from_, to_;
  bool write_back_;
  const DiskTier::Use* disk_;
  std::int64_t tag_;
  const ImageLayout& layout_;
  char* image_;
  WeightSet host_;
  int vk_ = 0, tk_ = 0;
  bool held_ = false;
  std::vector<Piece> vector_pieces_, tile_pieces_;
};

void Scheduler::run_blocks(const Use& use) {
  const std::int64_t L = store_.num_blocks();
  const std::size_t block_bytes = store_.stream_bytes();
  const int buffers = store_.state().buffers;
  // Busy-time spans hold no waits: they open after a block's waits (Note [Stream busy time]).
  auto begin_busy = [&](Stream& s) {
    if (use.busy_tag >= 0) s.begin_busy(use.busy_tag);
  };
  auto end_busy = [&](Stream& s) {
    if (use.busy_tag >= 0) s.end_busy();
  };
  // What happens to a block while it is on the device, wherever it lives. A disk block
  // brings the updates [from, to) its image lacks (Note [Lagging disk images]).
  auto on_resident = [&](const WeightSet& w, const WeightSet* st, const ImageLayout& layout, std::int64_t i,
                         bool disk = false, std::int64_t from = -1, std::int64_t to = -1,
                         BlockTiles* tiles = nullptr) {
    int kv_slot = -1;
    KvCache cache;
    if (use.kv) {
      cache = kv_begin(i, *use.kv, kv_slot);
      graph_.set_kv_cache(&cache);
    }
    begin_busy(*compute_);
    if (from >= 0) {
      for (std::int64_t t = from; t < to; ++t)
        if (auto h = history_.find(t); h != history_.end())
          apply_update(w, layout, st, h->second, g_history(t), /*vectors_only=*/tiles != nullptr);
    } else if (use.update && !disk) {  // a disk image already past this update keeps it (a resume)
      // By tiles, the matrices are updated as they arrive (Note [Sub-block streaming]).
      apply_update(w, layout, st, pending_, grads(), /*vectors_only=*/tiles != nullptr);
    }
    if (use.forward) {
      graph_.block(ops_, *compute_, w, *use.batch, use.noise, use.branches,
                   lora_.empty() || adapters_off_ ? nullptr : &lora_[static_cast<std::size_t>(i)], use.adapter_noise,
                   i, tiles);
      if (use.hidden && i + 1 < L)  // the last block's output is replaced by the final one
        capture_hidden(graph_.branches()[0].hidden, use.batch->tokens(), use.hidden);
    } else if (tiles) {
      tiles->update_all();
    }
    end_busy(*compute_);
    if (use.kv) {
      graph_.set_kv_cache(nullptr);
      kv_end(i, *use.kv, kv_slot);
    }
  };
  for (std::int64_t i = 0; i < L; ++i) {
    const ImageLayout& layout = store_.block_layout(i);
    // Note [Lagging disk images]: the updates this use brings a disk block to, the ones its
    // image lacks, and whether the result goes back to disk.
    const bool on_disk = disk_ && store_.on_disk(i);
    std::int64_t lag_from = -1, lag_to = -1;
    bool write_back = false;
    if (on_disk) {
      std::int64_t& held = disk_step_[static_cast<std::size_t>(i)];
      lag_to = use.update ? pending_.step + 1 : applied_;
      if (held >= 0 && lag_to > held) lag_from = held;
      write_back = lag_from >= 0 && (use.force_write || (use.update && lag_to - held >= options_.disk_lag));
    }
    // A pass without a forward skips disk blocks with nothing to apply (a flush's pass for
    // lagging images; a replayed update an image already holds, on a resume).
    if (!use.forward && (on_disk ? lag_from < 0 : !use.update)) continue;
    if (placement_.resident[static_cast<std::size_t>(i)]) {
      const WeightSet& w = resident_w_[static_cast<std::size_t>(i)];
      on_resident(w, resident_state_w_[static_cast<std::size_t>(i)].data(), layout, i);
      continue;
    }
    if (!tile_slots_.empty()) {
      // Note [Sub-block streaming] (never with a shared image: see the constructor). A disk
      // block's tiles come from the staging buffer the disk tier reads its image into.
      BlockTiles::Plan plan;
      DiskTier::Use disk_use;
      if (on_disk) {
        disk_use = disk_->begin_use(i, write_back, static_cast<std::uint64_t>(std::max<std::int64_t>(lag_to, 0)));
        if (write_back) disk_step_[static_cast<std::size_t>(i)] = lag_to;
        plan.image = reinterpret_cast<char*>(disk_use.buffer);
        plan.disk = &disk_use;
        plan.from = lag_from;
        plan.to = lag_to;
        plan.write_back = write_back;
      } else {
        plan.image = static_cast<char*>(store_.block_image(i));
        plan.update = use.update;
        plan.write_back = use.update;
      }
      BlockTiles tiles(*this, i, plan, use.busy_tag);
      std::array<WeightSet, 2> st;
      const WeightSet w = tiles.begin(st);
      on_resident(w, st.data(), layout, i, on_disk, lag_from, lag_to, &tiles);
      tiles.end();
      continue;
    }
    // See Note [Window slot lifecycle].
    const int k = static_cast<int>(next_use_++ % placement_.window);
    auto* slot = static_cast<char*>(slots_[static_cast<std::size_t>(k)].data());
    DiskTier::Use disk_use;
    char* image;
    if (on_disk) {
      // Note [Disk tier pipeline]: the image arrives in a staging buffer from the I/O thread.
      disk_use = disk_->begin_use(i, write_back, static_cast<std::uint64_t>(std::max<std::int64_t>(lag_to, 0)));
      if (write_back) disk_step_[static_cast<std::size_t>(i)] = lag_to;
      image = reinterpret_cast<char*>(disk_use.buffer);
      h2d_->wait_value(disk_->read_counter(disk_use.staging), disk_use.stamp, 0,
                       fmt::format("the disk tier's read of block {}", i));
    } else {
      image = static_cast<char*>(store_.block_image(i));
    }
    const bool updates = use.update || lag_from >= 0;
    const std::size_t chunks = slot_chunks_.size();
    auto chunk_free = [&](std::size_t c) -> Event& { return *slot_free_[static_cast<std::size_t>(k) * chunks + c]; };
    h2d_->wait(*offloaded_[static_cast<std::size_t>(i)]);
    // Note [One host image per node] (offload/block_store.h): every slice of the version
    // this upload expects is home. Sliced (Note [Sliced upload]): this rank reads and writes
    // only its own slice of the image, in its own stream order, so no rank waits on another's.
    const bool sliced = group_ != nullptr;
    const bool shared = store_.node_ranks() > 1 && !sliced;
    const std::uint32_t version = shared ? versions_[static_cast<std::size_t>(i)] : 0;
    if (shared)
      for (int r = 0; r < store_.node_ranks(); ++r)
        h2d_->wait_value(store_.written_counters(i) + r, version, shared_timeout_s_,
                         fmt::format("node rank {}'s slice of block {}, version {}", r, i, version));
    // A pass that applies no update reads the weights alone: the rule's state (after them
    // in the image) stays on the host (Note [Update rules], 5).
    const std::size_t upload = updates ? block_bytes : store_.block_bytes();
    std::size_t uploaded_bytes = upload;
    if (sliced) {
      // The whole slot is rewritten: every range of it must be free.
      for (std::size_t c = 0; c < chunks; ++c)
        if (options_.fault != SchedulerFault::skip_slot_free_wait) h2d_->wait(chunk_free(c));
      const int R = store_.node_ranks(), me = store_.node_rank();
      std::vector<std::size_t> parts(static_cast<std::size_t>(R) + 1, upload);
      for (int r = 0; r < R; ++r) parts[static_cast<std::size_t>(r)] = std::min(store_.slice(block_bytes, r).first, upload);
      const std::size_t a = parts[static_cast<std::size_t>(me)], b = parts[static_cast<std::size_t>(me) + 1];
      begin_busy(*h2d_);
      if (a < b) h2d_->copy_h2d(slot + a, image + a, b - a);
      group_->all_gather(*h2d_, slot, parts);
      end_busy(*h2d_);
      uploaded_bytes = b - a;
    } else {
      for (std::size_t c = 0; c < chunks; ++c) {
        const auto [off, bytes] = slot_chunks_[c];
        if (options_.fault != SchedulerFault::skip_slot_free_wait) h2d_->wait(chunk_free(c));
        if (off >= upload) continue;
        begin_busy(*h2d_);
        h2d_->copy_h2d(slot + off, image + off, std::min(bytes, upload - off));
        end_busy(*h2d_);
      }
    }
    h2d_->record(*uploaded_[static_cast<std::size_t>(k)]);
    if (on_disk) h2d_->write_value(disk_->uploaded_counter(disk_use.staging), disk_use.stamp);
    if (shared && use.update) h2d_->write_value(store_.taken_counters(i) + store_.node_rank(), version + 1);
    totals_.h2d_bytes += uploaded_bytes;
    ++totals_.uploads;

    if (options_.fault != SchedulerFault::skip_upload_wait) compute_->wait(*uploaded_[static_cast<std::size_t>(k)]);
    const WeightSet w = bind_weights(layout, slot);
    std::array<WeightSet, 2> st;
    for (int b = 0; b < buffers; ++b)
      st[static_cast<std::size_t>(b)] = bind_weights(store_.block_state_layout(i), slot + store_.block_state_offset(b));
    on_resident(w, st.data(), layout, i, on_disk, lag_from, lag_to);
    compute_->record(*computed_[static_cast<std::size_t>(k)]);

    if (on_disk ? write_back : use.update) {
      d2h_->wait(*computed_[static_cast<std::size_t>(k)]);
      // Shared image: every rank has taken version g; this rank writes its slice of g + 1.
      std::size_t lo = 0, hi = block_bytes;
      if (shared) {
        for (int r = 0; r < store_.node_ranks(); ++r)
          d2h_->wait_value(store_.taken_counters(i) + r, version + 1, shared_timeout_s_,
                           fmt::format("node rank {}'s upload of block {}, version {}", r, i, version));
      }
      if (shared || sliced) std::tie(lo, hi) = store_.slice(block_bytes, store_.node_rank());
      for (std::size_t c = 0; c < chunks; ++c) {
        const auto [off, bytes] = slot_chunks_[c];
        const std::size_t a = std::max(off, lo), b = std::min(off + bytes, hi);
        if (a < b) {
          begin_busy(*d2h_);
          d2h_->copy_d2h(image + a, slot + a, b - a);
          end_busy(*d2h_);
        }
        d2h_->record(chunk_free(c));  // the next use of this slot may overwrite this chunk
      }
      if (shared) {
        d2h_->write_value(store_.written_counters(i) + store_.node_rank(), version + 1);
        ++versions_[static_cast<std::size_t>(i)];
      }
      if (on_disk) d2h_->write_value(disk_->offloaded_counter(disk_use.staging), disk_use.stamp);
      d2h_->record(*offloaded_[static_cast<std::size_t>(i)]);
      totals_.d2h_bytes += hi - lo;
      ++totals_.offloads;
    } else {
      // Nothing to write back: the slot is free once compute is done with it.
      for (std::size_t c = 0; c < chunks; ++c) compute_->record(chunk_free(c));
    }
  }
  if (use.update) applied_ = pending_.step + 1;
}

// Note [Sliced upload]
//   DistZO2's upload (arXiv 2507.03211): the ranks of a node share one host image (Note [One
//   host image per node]) and each uploads only its slice r of R of a streamed block — the
//   same page-aligned partition it writes back — then the node's devices exchange the slices
//   (DeviceGroup::all_gather: NCCL on CUDA, over NVLink where the GPUs have it; MPI between
//   the processes on the CPU backend), in stream order on the upload stream, so a rank's
//   host link carries 1/R of each block up and 1/R down. Every rank streams the same blocks
//   in the same order (the same placement, and as many passes per step: Session checks
//   both), so the k-th exchange of every rank is the same block's. A rank reads and writes
//   only its own slice of the image, each in its own stream order (upload, compute, offload,
//   the next upload after `offloaded`), so the cross-process counters are not needed. On
//   PCIe-only GPUs the exchange crosses the same links the full upload would: use it where
//   the GPUs talk over NVLink.
// Note [KV cache] (models/graph.h). On the host, a block's cache is brought into slot
// c = use mod 2 on the upload stream after the block's previous write-back (kv_written) and
// the slot's previous use (kv_free); compute appends the new rows; the offload stream writes
// just those rows back.
KvCache Scheduler::kv_begin(std::int64_t i, const KvUse& kv, int& slot) {
  const std::size_t kvb = placement_.kv_block_bytes;
  KvCache c;
  c.capacity = placement_.kv_positions;
  c.past = kv.past;
  c.key_mask = kv_mask_dev_.as<std::int32_t>();
  char* dev = nullptr;
  if (placement_.kv_on_device) {
    dev = static_cast<char*>(kv_dev_[static_cast<std::size_t>(i)].data());
  } else {
    slot = static_cast<int>(kv_uses_++ % 2);
    const auto u = static_cast<std::size_t>(slot);
    dev = static_cast<char*>(kv_dev_[u].data());
    const char* host = static_cast<const char*>(kv_host_.data()) + static_cast<std::size_t>(i) * kvb;
    h2d_->wait(*kv_free_[u]);
    h2d_->wait(*kv_written_[static_cast<std::size_t>(i)]);
    const std::size_t row = static_cast<std::size_t>(store_.config().kv_dim()) * dtype_size(options_.compute);
    const std::size_t pitch = static_cast<std::size_t>(c.capacity) * row;
    // The rows the cache holds: a prefix adapter's P rows, then `past` of the sequence's.
    const std::size_t width = kv.past > 0 ? static_cast<std::size_t>(prefix_tokens_ + kv.past) * row : 0;
    for (std::size_t half : {std::size_t{0}, kvb / 2})
      h2d_->copy_2d(Stream::CopyKind::h2d, dev + half, pitch, host + half, pitch, width, static_cast<std::size_t>(kv.batch));
    totals_.h2d_bytes += 2 * width * static_cast<std::size_t>(kv.batch);
    h2d_->record(*kv_uploaded_[u]);
    compute_->wait(*kv_uploaded_[u]);
  }
  c.k = dev;
  c.v = dev + kvb / 2;
  return c;
}

void Scheduler::kv_end(std::int64_t i, const KvUse& kv, int slot) {
  if (placement_.kv_on_device) return;
  const auto u = static_cast<std::size_t>(slot);
  const std::size_t kvb = placement_.kv_block_bytes;
  compute_->record(*kv_computed_[u]);
  d2h_->wait(*kv_computed_[u]);
  const char* dev = static_cast<const char*>(kv_dev_[u].data());
  char* host = static_cast<char*>(kv_host_.data()) + static_cast<std::size_t>(i) * kvb;
  const std::size_t row = static_cast<std::size_t>(store_.config().kv_dim()) * dtype_size(options_.compute);
  const std::size_t pitch = static_cast<std::size_t>(placement_.kv_positions) * row;
  // The new rows (a fresh cache: with the prefix rows compute wrote before them).
  const auto lead = static_cast<std::size_t>(kv.past > 0 ? prefix_tokens_ + kv.past : 0);
  const std::size_t off = lead * row;
  const std::size_t width = (static_cast<std::size_t>(kv.past > 0 ? 0 : prefix_tokens_ + kv.past) +
                             static_cast<std::size_t>(kv.rows)) * row;
  for (std::size_t half : {std::size_t{0}, kvb / 2})
    d2h_->copy_2d(Stream::CopyKind::d2h, host + half + off, pitch, dev + half + off, pitch, width,
                  static_cast<std::size_t>(kv.batch));
  totals_.d2h_bytes += 2 * width * static_cast<std::size_t>(kv.batch);
  d2h_->record(*kv_free_[u]);
  d2h_->record(*kv_written_[static_cast<std::size_t>(i)]);
}

void Scheduler::decode(const HostBatch& batch, int past, bool use_cache, float* logits) {
  check_batch(batch);
  if (placement_.gen_batch <= 0)
    fail(ErrorKind::internal, "decode: this scheduler was set up without room for generation");
  if (batch.batch > placement_.gen_batch)
    fail(ErrorKind::invalid_argument, "decode: {} sequences, room for {}", batch.batch, placement_.gen_batch);
  if (use_cache && placement_.kv_positions <= 0)
    fail(ErrorKind::internal, "decode: this scheduler was set up without a KV cache");
  // A prefix-tuning adapter's rows lead each sequence's cache (Note [KV cache]); without a
  // cache its attention is the training path's (prefix_attention).
  const int P = prefix_tokens_;
  if (use_cache ? past < 0 || P + past + batch.seq > placement_.kv_positions : past != 0)
    fail(ErrorKind::invalid_argument, "decode: {} + {} positions exceed the KV cache's {}", past, batch.seq,
         placement_.kv_positions - P);
  flush();
  const int b = upload_batch(batch);
  BatchSlot& bs = batch_slots_[b];
  const BatchView view = batch_view(bs, batch);
  KvUse kv{past, batch.seq, batch.batch};
  if (use_cache) {
    // The cache's key mask: each sequence's new rows after its past ones (a fresh cache
    // starts from zeros). The previous decode has synchronized, so the host copy is free.
    const std::size_t cap = static_cast<std::size_t>(placement_.kv_positions);
    auto* m = kv_mask_host_.as<std::int32_t>();
    const auto lead = static_cast<std::size_t>(P);
    for (std::size_t s = 0; s < static_cast<std::size_t>(batch.batch); ++s) {
      if (past == 0) {
        std::fill_n(m + s * cap, cap, 0);
        std::fill_n(m + s * cap, lead, 1);  // the prefix rows: every query sees them
      }
      for (std::size_t t = 0; t < static_cast<std::size_t>(batch.seq); ++t)
        m[s * cap + lead + static_cast<std::size_t>(past) + t] = batch.key_mask[s * static_cast<std::size_t>(batch.seq) + t];
    }
    compute_->copy_h2d(kv_mask_dev_.data(), m, static_cast<std::size_t>(batch.batch) * cap * sizeof(std::int32_t));
  }
  graph_.embed(ops_, *compute_, globals_w_, view, nullptr, 1);
  Use use{false, true, 1, nullptr, nullptr, &view, nullptr};
  if (use_cache) use.kv = &kv;
  run_blocks(use);
  graph_.finish(ops_, *compute_, globals_w_, view, nullptr, 1);
  const std::int64_t V = store_.config().vocab_size;
  const Mat out = Mat::dense(gen_logits_dev_.data(), DType::f32, placement_.gen_batch, V);
  graph_.last_logits(ops_, *compute_, globals_w_, view, out);
  compute_->record(*bs.consumed);
  compute_->copy_d2h(logits, gen_logits_dev_.data(), static_cast<std::size_t>(batch.batch * V) * sizeof(float));
  compute_->synchronize();
  h2d_->check();
  d2h_->check();
}

void Scheduler::forward_pass(const BatchView& view, const NoiseArgs* noise, int nb, bool update,
                             std::int64_t busy_tag) {
  // Under LoRA the base is frozen: its noise is the adapters', its update theirs.
  const bool lora = !lora_.empty();
  const NoiseArgs* base_noise = lora ? nullptr : noise;
  if (busy_tag >= 0) compute_->begin_busy(busy_tag);
  if (update && lora) apply_adapter_updates();
  if (update && !lora) apply_update(globals_w_, store_.globals_layout(), globals_state_w_);
  graph_.embed(ops_, *compute_, globals_w_, view, base_noise, nb);
  if (busy_tag >= 0) compute_->end_busy();
  run_blocks(Use{update && !lora, true, nb, base_noise, lora ? noise : nullptr, &view, nullptr, busy_tag});
  if (busy_tag >= 0) compute_->begin_busy(busy_tag);
  graph_.finish(ops_, *compute_, globals_w_, view, base_noise, nb);
  graph_.head(ops_, *compute_, globals_w_, view, base_noise, nb);
  if (busy_tag >= 0) compute_->end_busy();
}

// Note [Update rules] (zo/rule.h): the rule's passes estimate each g_j; the update is
// deferred to the next time each block is on the device.
void Scheduler::step(const HostBatch& batch, const StepParams& p, double weight) {
  check_batch(batch);
  if (options_.branches != 2)
    fail(ErrorKind::internal, "this scheduler was set up for evaluation only (one branch)");
  const int r = static_cast<int>(((p.step % kRing) + kRing) % kRing);
  if (ring_step_[r] >= 0) done_[ring_step_[r]] = wait_result(ring_step_[r]);  // keep the old occupant's result
  const TransferTotals before = totals_;
  const RuleConfig& rule = options_.rule;
  const RuleEstimate est = estimate_plan(rule, p.eps);

  const int b = upload_batch(batch);
  BatchSlot& bs = batch_slots_[b];
  const BatchView view = batch_view(bs, batch);
  float* scalars = g_dev_.as<float>();
  auto branches = graph_.branches();
  // Ranks: this rank's share of the passes (Note [Parallel modes]).
  RankWork work;
  if (distributed()) work = rank_work(est, options_.parallel, coord_);
  const std::vector<RulePass>& passes = distributed() ? work.passes : est.passes;
  for (std::size_t i = 0; i < passes.size(); ++i) {
    const RulePass& pass = passes[i];
    const NoiseArgs noise{direction_seed(p.seed, pass.direction), pass.eps, pass.minus};
    // The pending update of step t − 1 rides on the first pass (after upload_batch's
    // wait, so the busy spans hold no wait).
    forward_pass(view, &noise, pass.branches, i == 0 && pending_.active, p.step);
    compute_->begin_busy(p.step);
    for (int k = 0; k < pass.branches; ++k)
      compute_->copy_d2d(scalars + pass.slot[k], branches[static_cast<std::size_t>(k)].loss, sizeof(float));
    compute_->end_busy();
  }
  if (distributed()) exchange_losses(r, p.step, est, weight > 0 ? weight : batch_weight(batch));
  compute_->begin_busy(p.step);
  for (std::size_t j = 0; j < est.grads.size(); ++j) {
    const RuleEstimate::Grad& gr = est.grads[j];
    ops_.spsa_grad(*compute_, scalars + gr.a, scalars + gr.b, gr.e, grads() + j);
  }
  float* host = results_host_.as<float>() + static_cast<std::size_t>(r) * kStepScalars;
  compute_->copy_d2h(host, scalars, static_cast<std::size_t>(kStageOffset) * sizeof(float));
  compute_->end_busy();
  compute_->record(*result_ready_[r]);

  StepResult meta;
  meta.step = p.step;
  meta.seed = p.seed;
  meta.lr = p.lr;
  meta.eps = p.eps;
  meta.weight_decay = p.weight_decay;
  meta.tokens = batch.target_count();
  ring_step_[r] = p.step;
  ring_meta_[r] = meta;
  pending_ = Pending{true, p.step, p.seed, p.lr, p.weight_decay};
  if (rule.host_sync()) conservative(view, p, r, est);
  record_pending();
  compute_->record(*bs.consumed);
  ring_meta_[r].h2d_bytes = totals_.h2d_bytes - before.h2d_bytes;
  ring_meta_[r].d2h_bytes = totals_.d2h_bytes - before.d2h_bytes;
}

// zo-sgd-cons (Note [Update rules]): with g_0 on the host, L(θ) (the forward difference
// already has it), then θ − lr·g·z and θ + lr·g·z as the two branches of one pass
// (eps = −lr·g), and the choice. The update applied later is W − lr·(c·g)·z, so c·g is
// written where the update kernels read g.
void Scheduler::conservative(const BatchView& view, const StepParams& p, int r, const RuleEstimate& est) {
  result_ready_[r]->synchronize();
  for (Stream* s : {h2d_.get(), compute_.get(), d2h_.get()}) s->check();
  float* host = results_host_.as<float>() + static_cast<std::size_t>(r) * kStepScalars;
  const float g = host[kGradOffset];
  auto branches = graph_.branches();
  float* stage = host + kStageOffset;  // host floats: L0, L1, L2, the coefficient
  if (est.unperturbed_slot >= 0) {
    stage[0] = host[est.unperturbed_slot];
  } else {
    forward_pass(view, nullptr, 1, false, p.step);
    compute_->copy_d2h(stage + 0, branches[0].loss, sizeof(float));
  }
  int choice = 0;
  if (std::isfinite(g)) {
    const NoiseArgs candidates{p.seed, -p.lr * g, -1.0f};
    forward_pass(view, &candidates, 2, false, p.step);
    compute_->copy_d2h(stage + 1, branches[0].loss, sizeof(float));
    compute_->copy_d2h(stage + 2, branches[1].loss, sizeof(float));
    compute_->synchronize();
    choice = conservative_choice(stage[0], stage[1], stage[2]);
  } else {
    compute_->synchronize();
    stage[1] = stage[2] = NAN;
  }
  StepResult& meta = ring_meta_[r];
  meta.cons_losses[0] = stage[0];
  meta.cons_losses[1] = stage[1];
  meta.cons_losses[2] = stage[2];
  meta.choice = choice;
  if (choice == 0 || !std::isfinite(g)) {
    pending_.active = false;  // keep θ (a non-finite g is reported when the result is read)
    return;
  }
  stage[3] = static_cast<float>(choice) * g;
  compute_->copy_h2d(grads(), stage + 3, sizeof(float));
  compute_->synchronize();  // the staging float is read before the next step may reuse it
}

// Note [Loss exchange]
//   The ranks' loss slots meet without the host thread ever waiting for a step: compute
//   copies this rank's slots to pinned memory and records `losses_ready`; the exchange
//   stream waits for it, runs a host function that gathers every rank's slots and weight
//   (Comm::all_gather, in rank order) and merges them (merge_losses), copies the merged
//   slots over the device's, and records `exchanged`; compute waits for that before the
//   g_j kernels. So compute pauses only for the exchange's latency (microseconds within a
//   node) while the upload stream keeps prefetching the next step's blocks, and the host
//   thread goes on enqueuing. A failed exchange (Note [Rank faults]) surfaces when the
//   step's result is read.
void Scheduler::exchange_losses(int r, std::int64_t step, const RuleEstimate& est, double weight) {
  const auto n = static_cast<std::size_t>(est.loss_slots);
  float* mine = exchange_host_.as<float>() + static_cast<std::size_t>(r) * 2 * kStepScalars;
  float* merged = mine + kStepScalars;
  float* scalars = g_dev_.as<float>();
  compute_->copy_d2h(mine, scalars, n * sizeof(float));
  compute_->record(*losses_ready_[r]);
  comm_stream_->wait(*losses_ready_[r]);
  Comm* comm = exchange_comm_.get();
  const ParallelLayout layout = options_.parallel;
  comm_stream_->launch_host([comm, layout, est, mine, merged, n, weight, step] {
    std::vector<double> row(n + 1);
    row[0] = weight;
    for (std::size_t k = 0; k < n; ++k) row[k + 1] = static_cast<double>(mine[k]);
    const std::vector<double> all = comm->all_gather(row, fmt::format("the losses of step {}", step));
    const std::vector<float> m = merge_losses(est, layout, all);
    std::copy(m.begin(), m.end(), merged);
  });
  comm_stream_->copy_h2d(scalars, merged, n * sizeof(float));
  comm_stream_->record(*exchanged_[r]);
  compute_->wait(*exchanged_[r]);
}

double Scheduler::batch_weight(const HostBatch& batch) {
  if (batch.option_info.empty()) return static_cast<double>(batch.target_count());
  int groups = 0;
  for (std::size_t i = 0; i < batch.option_info.size(); ++i)
    if (i == 0 || (batch.option_info[i] >> 1) != (batch.option_info[i - 1] >> 1)) ++groups;
  return groups;
}

StepResult Scheduler::wait_result(std::int64_t step) {
  if (auto it = done_.find(step); it != done_.end()) {
    StepResult res = it->second;
    done_.erase(it);
    return res;
  }
  const int r = static_cast<int>(((step % kRing) + kRing) % kRing);
  if (ring_step_[r] != step)
    fail(ErrorKind::internal, "no result pending for step {}", step);
  result_ready_[r]->synchronize();
  for (Stream* s : {h2d_.get(), compute_.get(), d2h_.get(), comm_stream_.get()})
    if (s) s->check();
  StepResult res = ring_meta_[r];
  const float* host = results_host_.as<float>() + static_cast<std::size_t>(r) * kStepScalars;
  const RuleEstimate est = estimate_plan(options_.rule, res.eps);
  res.losses.assign(host, host + est.loss_slots);
  res.gs.assign(host + kGradOffset, host + kGradOffset + options_.rule.directions);
  res.loss_plus = host[0];
  res.loss_minus = host[1];
  res.g = res.gs[0];
  const double denom = options_.rule.difference == Difference::central ? 2.0 * static_cast<double>(res.eps)
                                                                        : static_cast<double>(res.eps);
  res.g_double = (static_cast<double>(res.loss_plus) - static_cast<double>(res.loss_minus)) / denom;
  res.loss = options_.rule.difference == Difference::central
                 ? 0.5 * (static_cast<double>(res.loss_plus) + static_cast<double>(res.loss_minus))
                 : static_cast<double>(res.loss_minus);
  res.update_skipped = false;
  for (float g : res.gs) res.update_skipped = res.update_skipped || !std::isfinite(g);
  // Only the tail of this step's offloads can still be running (a short host wait).
  res.upload_busy_s = h2d_->take_busy_seconds(step);
  res.compute_busy_s = compute_->take_busy_seconds(step);
  res.offload_busy_s = d2h_->take_busy_seconds(step);
  if (disk_) {
    disk_->check();  // nothing computed from a failed read is handed out (Note [Disk tier pipeline])
    const DiskTierStats d = disk_->take_stats();
    res.disk_read_busy_s = d.read_busy_s;
    res.disk_write_busy_s = d.write_busy_s;
    res.disk_read_bytes = d.read_bytes;
    res.disk_write_bytes = d.write_bytes;
  }
  ring_step_[r] = -1;
  return res;
}

void Scheduler::flush() {
  Use pass{true, false, 0, nullptr, nullptr, nullptr, nullptr};
  pass.force_write = true;  // Note [Lagging disk images]: after a flush every disk image is current
  if (pending_.active) {
    if (!lora_.empty()) {
      apply_adapter_updates();
    } else {
      apply_update(globals_w_, store_.globals_layout(), globals_state_w_);
      run_blocks(pass);
    }
    pending_.active = false;
  }
  // Disk images that still lag (a step that kept θ left no pending update behind them).
  bool lagging = false;
  for (std::size_t i = 0; i < disk_step_.size(); ++i)
    lagging = lagging || (disk_step_[i] >= 0 && disk_step_[i] < applied_);
  if (lagging) {
    pass.update = false;
    run_blocks(pass);
  }
}

// Note [Lagging disk images]
//   A block on the disk tier need not go back to disk after every update: its image may lag
//   its true value by up to K = --disk-lag updates. The scheduler keeps, per disk block, the
//   number of updates its image holds (disk_step_), and for the last K + 1 updates their
//   parameters (history_) and a device copy of their g_j (g_hist_, copied after each step's
//   g kernels, in compute-stream order). A use of the block applies every update its image
//   lacks, in step order, with the same kernels, seeds and g_j a RAM block got when each
//   update was pending (so with any storage dtype the weights are the bits of K = 1, whose
//   image is written back after every update), and writes the block back only when the
//   lag reaches K (or at a flush, so that eval, save and replay see current images). The
//   image's header records the updates it holds. Disk writes fall K-fold for K× the noise
//   work on those uploads.
void Scheduler::record_pending() {
  if (!disk_ || !pending_.active) return;
  if (applied_ < 0) applied_ = pending_.step;  // the first update: the weights hold the updates before it
  history_[pending_.step] = pending_;
  while (history_.size() > static_cast<std::size_t>(hist_depth_)) history_.erase(history_.begin());
  compute_->copy_d2d(g_history(pending_.step), grads(),
                     static_cast<std::size_t>(options_.rule.directions) * sizeof(float));
}

void Scheduler::apply_adapter_updates() {
  for (std::size_t i = 0; i < lora_.size(); ++i) {
    const LoraLayout& l = options_.adapters->layout(static_cast<std::int64_t>(i));
    const auto& st = adapter_state_w_[i];
    const WeightSet sa[2] = {st[0], st[2]}, sb[2] = {st[1], st[3]};
    apply_update(lora_[i].a, l.a, sa);
    apply_update(lora_[i].b, l.b, sb);
  }
}

void Scheduler::sync_adapters_to_host() {
  AdapterStore* ad = options_.adapters;
  if (!ad) return;
  for (std::size_t i = 0; i < adapter_dev_.size(); ++i)
    compute_->copy_d2h(ad->image(static_cast<std::int64_t>(i)), adapter_dev_[i].data(), ad->image_bytes());
}

void Scheduler::replay_update(std::int64_t step, std::uint64_t seed, float lr, float weight_decay,
                              const std::vector<float>& gs, int choice) {
  const RuleConfig& rule = options_.rule;
  if (static_cast<int>(gs.size()) != rule.directions)
    fail(ErrorKind::internal, "replay: step {} has {} projected gradients, the rule {} directions", step, gs.size(),
         rule.directions);
  flush();
  if (rule.kind == RuleKind::cons && choice == 0) return;  // the step kept θ
  float* staging = results_host_.as<float>();
  compute_->synchronize();  // the staging floats are free
  for (std::size_t j = 0; j < gs.size(); ++j)
    staging[j] = rule.kind == RuleKind::cons ? static_cast<float>(choice) * gs[j] : gs[j];
  compute_->copy_h2d(grads(), staging, gs.size() * sizeof(float));
  pending_ = Pending{true, step, seed, lr, weight_decay};
  record_pending();
  flush();
  compute_->synchronize();
  d2h_->synchronize();
  if (disk_) disk_->drain();
}

float Scheduler::eval(const HostBatch& batch, const EvalOptions& o) {
  check_batch(batch);
  if (o.logits && !logits_dev_)
    fail(ErrorKind::internal, "logits requested from a scheduler set up without room for them");
  flush();
  const int b = upload_batch(batch);
  BatchSlot& bs = batch_slots_[b];
  const BatchView view = batch_view(bs, batch);
  const std::int64_t n = batch.tokens();
  if (o.hidden_states) {
    o.hidden_states->clear();
    o.hidden_states->reserve(static_cast<std::size_t>(store_.num_blocks()) + 1);
  }
  graph_.embed(ops_, *compute_, globals_w_, view, nullptr, 1);
  capture_hidden(graph_.branches()[0].hidden, n, o.hidden_states);
  run_blocks(Use{false, true, 1, nullptr, nullptr, &view, o.hidden_states});
  graph_.finish(ops_, *compute_, globals_w_, view, nullptr, 1);
  capture_hidden(graph_.branches()[0].final, n, o.hidden_states);
  Mat logits;
  if (o.logits)
    logits = Mat::dense(logits_dev_.data(), DType::f32, n, store_.config().vocab_size);
  graph_.head(ops_, *compute_, globals_w_, view, nullptr, 1, o.logits ? &logits : nullptr);
  compute_->record(*bs.consumed);
  float loss = 0;
  const Branch& br = graph_.branches()[0];
  compute_->copy_d2h(&loss, br.loss, sizeof(float));
  if (o.token_loss) compute_->copy_d2h(o.token_loss, br.row_loss, static_cast<std::size_t>(n) * sizeof(float));
  if (o.logits)
    compute_->copy_d2h(o.logits, logits_dev_.data(),
                       static_cast<std::size_t>(n * store_.config().vocab_size) * sizeof(float));
  compute_->synchronize();
  h2d_->check();
  d2h_->check();
  if (disk_) disk_->check();
  if (o.hidden_states) {
    const Branch& b0 = graph_.branches()[0];
    ZO2_CHECK(b0.final.dtype == b0.hidden.dtype);
    for (auto& h : *o.hidden_states)
      widen_packed_in_place(h.data(), static_cast<std::int64_t>(h.size()), b0.hidden.dtype);
  }
  return loss;
}

void Scheduler::sync_to_host() {
  flush();
  sync_adapters_to_host();
  // A shared image (Note [One host image per node]): this rank's slice of each; the caller
  // fences the node's ranks before reading the images (Session::sync).
  auto write_home = [&](void* image, const void* dev, std::size_t bytes) {
    const auto [lo, hi] = store_.slice(bytes, store_.node_rank());
    if (lo < hi) compute_->copy_d2h(static_cast<char*>(image) + lo, static_cast<const char*>(dev) + lo, hi - lo);
  };
  write_home(store_.globals_image(), globals_dev_.data(), store_.globals_stream_bytes());
  for (std::int64_t i = 0; i < store_.num_blocks(); ++i)
    if (placement_.resident[static_cast<std::size_t>(i)])
      write_home(store_.block_image(i), resident_dev_[static_cast<std::size_t>(i)].data(), store_.stream_bytes());
  compute_->synchronize();
  d2h_->synchronize();
  h2d_->synchronize();
  if (disk_) disk_->drain();  // every write-back on disk: the store reads the file from here
}

std::vector<std::vector<float>> Scheduler::capture_kv(const HostBatch& batch) {
  check_batch(batch);
  flush();
  adapters_off_ = true;
  std::vector<std::vector<float>> kv;
  kv.reserve(static_cast<std::size_t>(2 * store_.num_blocks()));
  try {
    const int b = upload_batch(batch);
    BatchSlot& bs = batch_slots_[b];
    const BatchView view = batch_view(bs, batch);
    graph_.capture_kv(&kv);
    graph_.embed(ops_, *compute_, globals_w_, view, nullptr, 1);
    run_blocks(Use{false, true, 1, nullptr, nullptr, &view, nullptr});
    graph_.capture_kv(nullptr);
    compute_->record(*bs.consumed);
    compute_->synchronize();
    h2d_->check();
  } catch (...) {
    graph_.capture_kv(nullptr);
    adapters_off_ = false;
    throw;
  }
  adapters_off_ = false;
  for (auto& v : kv) widen_packed_in_place(v.data(), static_cast<std::int64_t>(v.size()), options_.compute);
  return kv;
}

void Scheduler::upload_adapters() {
  AdapterStore* ad = options_.adapters;
  if (!ad) return;
  flush();
  for (std::size_t i = 0; i < adapter_dev_.size(); ++i)
    compute_->copy_h2d(adapter_dev_[i].data(), ad->image(static_cast<std::int64_t>(i)), ad->image_bytes());
  compute_->synchronize();
}

}  // namespace zo2
