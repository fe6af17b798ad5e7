#include "offload/planner.h"

#include "models/layout.h"
#include "runtime/arena.h"
#include "runtime/common.h"
#include "runtime/error.h"

#include <fmt/format.h>

#include <algorithm>

namespace zo2 {

OffloadMode parse_offload_mode(std::string_view s) {
  if (s == "auto") return OffloadMode::auto_;
  if (s == "all") return OffloadMode::all;
  if (s == "none") return OffloadMode::none;
  fail(ErrorKind::invalid_argument, "--offload '{}': expected auto, all or none", s);
}

std::string_view offload_mode_name(OffloadMode m) {
  switch (m) {
    case OffloadMode::auto_: return "auto";
    case OffloadMode::all: return "all";
    case OffloadMode::none: return "none";
  }
  return "auto";
}

KvPlace parse_kv_place(std::string_view s) {
  if (s == "auto") return KvPlace::auto_;
  if (s == "device") return KvPlace::device;
  if (s == "host") return KvPlace::host;
  if (s == "off") return KvPlace::off;
  fail(ErrorKind::invalid_argument, "--kv-cache '{}': expected auto, device, host or off", s);
}

std::string_view kv_place_name(KvPlace p) {
  switch (p) {
    case KvPlace::auto_: return "auto";
    case KvPlace::device: return "device";
    case KvPlace::host: return "host";
    case KvPlace::off: return "off";
  }
  return "auto";
}

std::size_t kv_block_bytes(const ModelConfig& c, DType compute, int batch, int positions) {
  return 2 * align_up(static_cast<std::size_t>(batch) * static_cast<std::size_t>(positions) *
                      static_cast<std::size_t>(c.kv_dim()) * dtype_size(compute));
}

int activation_seq(const PlanRequest& r) {
  if (r.generate.batch > 0 && r.generate.kv != KvPlace::off && r.generate.chunk > 0)
    return std::min(r.seq, r.generate.chunk);
  return r.seq;
}

std::size_t batch_buffer_bytes(int batch, int seq, int prefix_tokens) {
  const std::size_t n = static_cast<std::size_t>(batch) * static_cast<std::size_t>(seq);
  const std::size_t px =
      prefix_tokens > 0 ? align_up(static_cast<std::size_t>(batch) * static_cast<std::size_t>(seq + prefix_tokens) *
                                   sizeof(std::int32_t))
                        : 0;
  // Two slots of ids, mask, positions, targets and option groups; the projected gradient.
  return 2 * (4 * align_up(n * sizeof(std::int32_t)) + align_up(static_cast<std::size_t>(batch) * sizeof(std::int32_t)) +
              px) +
         align_up(kStepScalars * sizeof(float));
}

std::size_t image_with_state_bytes(std::size_t weight_bytes, std::size_t state_bytes, int buffers) {
  if (buffers <= 0) return weight_bytes;
  return align_up(weight_bytes) + static_cast<std::size_t>(buffers) * align_up(state_bytes);
}

std::size_t host_store_bytes(const ModelConfig& c, DType storage, std::int64_t block_images, const StateSpec& state) {
  const std::size_t globals = image_with_state_bytes(globals_layout(c, storage).bytes(),
                                                     globals_layout(c, state.dtype).bytes(), state.buffers);
  const std::size_t block = c.num_layers > 0 ? image_with_state_bytes(block_layout(c, 0, storage).bytes(),
                                                                      block_layout(c, 0, state.dtype).bytes(),
                                                                      state.buffers)
                                             : 0;
  return globals + static_cast<std::size_t>(block_images) * block;
}

std::size_t tile_piece_bytes(DType storage, DType state, int buffers, std::int64_t rows, std::int64_t cols) {
  const auto part = [&](DType d) {
    const auto n = static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
    return align_up(n * dtype_size(d)) +
           (d == DType::f8_e4m3 ? align_up(static_cast<std::size_t>(rows) * sizeof(float)) : 0);
  };
  return part(storage) + static_cast<std::size_t>(std::max(buffers, 0)) * part(state);
}

TileSizes tile_sizes(const ModelGraph& graph, const ImageLayout& block, const StateSpec& state) {
  TileSizes t;
  for (const TensorSlot& ts : block.tensors()) {
    if (ts.ndim == 1) {
      t.vectors += tile_piece_bytes(ts.dtype, state.dtype, state.buffers, ts.rows, ts.cols);
      continue;
    }
    const std::int64_t tr = graph.tile_rows(ts.rows, ts.cols);
    t.tile = std::max(t.tile, tile_piece_bytes(ts.dtype, state.dtype, state.buffers, tr, ts.cols));
    t.tiles += (ts.rows + tr - 1) / tr;
  }
  return t;
}

namespace {
// `v` as format_bytes writes it, with the exact bytes where `other` would read the same (a cap
// one byte short was "230.97 MiB is below the minimum of 230.97 MiB": pass 62).
// The link's time for a step's traffic, the slower direction.
double transfer_seconds(const Placement& p, const PlanRequest& r) {
  return std::max(static_cast<double>(p.h2d_bytes_per_step) / r.h2d_bytes_per_s,
                  static_cast<double>(p.d2h_bytes_per_step) / r.d2h_bytes_per_s);
}

std::string bytes_beside(std::size_t v, std::size_t other) {
  const std::string a = format_bytes(static_cast<double>(v));
  return a == format_bytes(static_cast<double>(other)) ? fmt::format("{} ({} bytes)", a, v) : a;
}
}  // namespace

Placement plan_placement(const ModelConfig& config, const PlanRequest& r) {
  if (r.batch <= 0 || r.seq <= 0)
    fail(ErrorKind::invalid_argument, "batch size and sequence length must be positive (got {} × {})",
         r.batch, r.seq);
  if (r.window < 1) fail(ErrorKind::invalid_argument, "--window must be at least 1 (got {})", r.window);
  Placement p;
  p.cap = r.cap;
  const std::int64_t L = config.num_layers;
  const std::size_t weight_block = block_layout(config, 0, r.storage).bytes();
  p.block_bytes = image_with_state_bytes(weight_block, block_layout(config, 0, r.state.dtype).bytes(), r.state.buffers);
  p.state_block_bytes = p.block_bytes - weight_block;
  p.globals_bytes = align_up(image_with_state_bytes(globals_layout(config, r.storage).bytes(),
                                                    globals_layout(config, r.state.dtype).bytes(), r.state.buffers));
  p.host_bytes = host_store_bytes(config, r.storage, config.num_layers, r.state);
  if (r.tile < -1) fail(ErrorKind::invalid_argument, "--tile {}: expected auto, off or a size", r.tile);
  GraphLimits limits = r.limits;
  if (r.tile > 0) {
    // A tile of at most r.tile bytes of storage (the graph keeps at least one row).
    const std::size_t elem = std::max<std::size_t>(dtype_size(r.storage), 1);
    limits.weight_tile_elems = std::max<std::int64_t>(1, r.tile / static_cast<std::int64_t>(elem));
  }
  const ModelGraph graph(config, r.compute, limits);
  p.limits = graph.limits();
  p.call_seq = activation_seq(r);
  if (r.generate.chunk < 0) fail(ErrorKind::invalid_argument, "prefill chunk {} is negative", r.generate.chunk);
  p.workspace = graph.workspace_plan(r.branches, r.batch, p.call_seq);
  p.workspace_bytes = p.workspace.total();
  p.batch_bytes = batch_buffer_bytes(r.batch, p.call_seq, r.limits.prefix_tokens);
  if (r.logits_out)
    p.logits_bytes = align_up(static_cast<std::size_t>(r.batch) * static_cast<std::size_t>(r.seq) *
                              static_cast<std::size_t>(config.vocab_size) * sizeof(float));
  const std::size_t block = align_up(p.block_bytes);
  p.backend_bytes = r.backend_bytes;
  p.adapter_bytes = align_up(r.adapter_bytes);
  std::size_t fixed =
      p.globals_bytes + p.workspace_bytes + p.batch_bytes + p.logits_bytes + p.backend_bytes + p.adapter_bytes;
  const int k_min = static_cast<int>(std::min<std::int64_t>(r.window, L));
  // The window may shrink to 2 slots when the requested one does not fit, in auto mode and
  // with every block streamed (pass 62: --offload all went to weight tiles, or with --tile off
  // was refused, where two whole-block slots fit, as README's --tile says they are taken).
  const int k_floor = r.mode != OffloadMode::none ? static_cast<int>(std::min<std::int64_t>(2, k_min)) : k_min;
  if (r.generate.batch > 0) {
    // Note [KV cache] (models/graph.h): the device holds every block's cache when that fits
    // beside the minimum window (auto) or when asked; else two slots, the caches on the host.
    // A training session (two branches) decodes on the first (train --eval on squad/drop).
    if (r.generate.batch > r.batch)
      fail(ErrorKind::invalid_argument, "generation of {} sequences at a time needs a batch capacity of as many (got {})",
           r.generate.batch, r.batch);
    p.gen_batch = r.generate.batch;
    p.gen_bytes = align_up(static_cast<std::size_t>(r.generate.batch) * static_cast<std::size_t>(config.vocab_size) *
                           sizeof(float));
    if (r.generate.kv != KvPlace::off) {
      // A prefix-tuning adapter's P rows lead every sequence's cache.
      p.kv_positions = r.seq + r.limits.prefix_tokens;
      p.kv_block_bytes = kv_block_bytes(config, r.compute, r.generate.batch, p.kv_positions);
      p.gen_bytes += align_up(static_cast<std::size_t>(r.generate.batch) * static_cast<std::size_t>(p.kv_positions) *
                              sizeof(std::int32_t));
      const std::size_t all = static_cast<std::size_t>(L) * p.kv_block_bytes;
      const bool fits = fixed + p.gen_bytes + all + static_cast<std::size_t>(k_floor) * block <= r.cap ||
                        fixed + p.gen_bytes + all + static_cast<std::size_t>(L) * block <= r.cap;
      p.kv_on_device = r.generate.kv == KvPlace::device || (r.generate.kv == KvPlace::auto_ && fits);
      p.kv_device_bytes = p.kv_on_device ? all : 2 * p.kv_block_bytes;
      p.kv_host_bytes = p.kv_on_device ? 0 : all;
    }
    fixed += p.gen_bytes + p.kv_device_bytes;
  }
  // A disk tier (the host store over --host-mem: plan_tiers) keeps the projected gradients of
  // its lagging images on the device (adversarial pass 62: left out, so a plan at its own
  // minimum cap was refused by the run it planned, a few hundred bytes short).
  if (r.host_mem > 0 && p.host_bytes + r.adapter_bytes + p.kv_host_bytes > r.host_mem) {
    const std::size_t history = align_up(disk_history_bytes(std::max(1, r.disk_lag)));
    p.batch_bytes += history;
    fixed += history;
  }
  p.minimum_cap = fixed + static_cast<std::size_t>(k_floor) * block;
  const std::size_t all_resident = fixed + static_cast<std::size_t>(L) * block;
  // Note [Sub-block streaming]: weight tiles when asked, or (auto) when the smallest window
  // of whole blocks does not fit and nothing asks for every block resident.
  const TileSizes ts = tile_sizes(graph, block_layout(config, 0, r.storage), r.state);
  const std::size_t vector_slots = 2 * align_up(std::max<std::size_t>(ts.vectors, 1));
  const std::size_t tile_slot = align_up(std::max<std::size_t>(ts.tile, 1));
  const std::size_t tile_floor = fixed + vector_slots + 2 * tile_slot;
  const bool tiled = L > 0 && r.mode != OffloadMode::none &&
                     (r.tile > 0 || (r.tile == 0 && all_resident > r.cap && p.minimum_cap > r.cap));
  // Tiles go lower than whole blocks where they may be taken (--tile auto): the plan says so
  // beside the whole-block minimum (pass 62: "minimum cap" named a cap the tiles run below).
  if (!tiled && L > 0 && r.mode != OffloadMode::none && r.tile == 0 && tile_floor < p.minimum_cap)
    p.tile_minimum_cap = tile_floor;
  if (tiled) {
    p.minimum_cap = tile_floor;
    if (tile_floor > r.cap)
      fail(ErrorKind::out_of_memory,
           "the cap {} is below the minimum of {} this model needs at batch {} × {} tokens even streamed by weight "
           "tiles (globals {}, activations and scratch {}, cuBLAS and attention scratch {}, 2 tile slots × {}, 2 "
           "vector slots × {}{})",
           bytes_beside(r.cap, tile_floor), bytes_beside(tile_floor, r.cap), r.batch,
           p.call_seq, format_bytes(static_cast<double>(p.globals_bytes)),
           format_bytes(static_cast<double>(p.workspace_bytes + p.batch_bytes + p.logits_bytes)),
           format_bytes(static_cast<double>(p.backend_bytes)), format_bytes(static_cast<double>(tile_slot)),
           format_bytes(static_cast<double>(vector_slots / 2)),
           p.gen_batch > 0 ? fmt::format(", generation: KV cache {}, logits {}",
                                         format_bytes(static_cast<double>(p.kv_device_bytes)),
                                         format_bytes(static_cast<double>(p.gen_bytes)))
                           : std::string());
  }

  std::int64_t resident = 0;
  int window = 0;
  std::size_t ring = 0;  // tiles: the tile and vector slots
  if (tiled) {
    // The ring first (as deep as kMaxTileSlots), then whole blocks resident in what is left.
    const int slots = static_cast<int>(
        std::clamp<std::size_t>((r.cap - fixed - vector_slots) / tile_slot, 2, kMaxTileSlots));
    ring = vector_slots + static_cast<std::size_t>(slots) * tile_slot;
    resident = std::min<std::int64_t>(
        r.mode == OffloadMode::all ? 0 : static_cast<std::int64_t>((r.cap - fixed - ring) / block), L);
    p.tile_slots = resident == L ? 0 : slots;
    p.tile_bytes = tile_slot;
    p.vector_bytes = vector_slots / 2;
    p.block_tiles = ts.tiles;
    // The tiles come from --tile SIZE (asked), or from a cap below the smallest window (auto):
    // the way out names the one that chose them (adversarial pass 53: a forced --tile was
    // told to raise a --gpu-mem never given).
    if (r.writeback_ranks > 1 && resident < L)
      fail(ErrorKind::unsupported,
           "ranks sharing one host image with blocks streamed by weight tiles are not supported yet: {}, or give each "
           "rank its own host image (--host-image private)",
           r.tile > 0 ? fmt::format("the tiles are asked for by --tile {}: drop it or give --tile off (whole blocks, "
                                    "{} window slots of {})",
                                    format_bytes(static_cast<double>(r.tile)), k_floor,
                                    format_bytes(static_cast<double>(block)))
                      : fmt::format("raise --gpu-mem so that {} window slots of {} fit", k_floor,
                                    format_bytes(static_cast<double>(block))));
  } else switch (r.mode) {
    case OffloadMode::none:
      if (all_resident > r.cap)
        fail(ErrorKind::out_of_memory,
             "--offload none needs {} of device memory for this model and batch (cap {}); "
             "use --offload auto or a larger --gpu-mem",
             format_bytes(static_cast<double>(all_resident)), format_bytes(static_cast<double>(r.cap)));
      resident = L;
      break;
    case OffloadMode::all: {
      int k = k_min;
      while (k > k_floor && fixed + static_cast<std::size_t>(k) * block > r.cap) --k;
      if (p.minimum_cap > r.cap)
        fail(ErrorKind::out_of_memory,
             "the cap {} is below the minimum of {} for streaming every block through {} slots "
             "(globals {}, activations and scratch {}, cuBLAS and attention scratch {}, slots {} × {})",
             bytes_beside(r.cap, p.minimum_cap), bytes_beside(p.minimum_cap, r.cap),
             k_floor, format_bytes(static_cast<double>(p.globals_bytes)),
             format_bytes(static_cast<double>(p.workspace_bytes + p.batch_bytes + p.logits_bytes)),
             format_bytes(static_cast<double>(p.backend_bytes)), k_floor, format_bytes(static_cast<double>(block)));
      resident = 0;
      window = k;
      break;
    }
    case OffloadMode::auto_:
      if (all_resident <= r.cap) {
        resident = L;
        break;
      }
      {
        // Fewer slots than asked (but at least 2, so uploads still overlap compute) when
        // the requested window does not fit: a smaller window beats refusing to run.
        int k = k_min;
        while (k > k_floor && fixed + static_cast<std::size_t>(k) * block > r.cap) --k;
        if (fixed + static_cast<std::size_t>(k) * block > r.cap)
          fail(ErrorKind::out_of_memory,
               "the cap {} is below the minimum of {} this model needs at batch {} × {} tokens "
               "(globals {}, activations and scratch {}, cuBLAS and attention scratch {}, {} window slots × {}{})",
               bytes_beside(r.cap, p.minimum_cap), bytes_beside(p.minimum_cap, r.cap),
               r.batch, p.call_seq, format_bytes(static_cast<double>(p.globals_bytes)),
               format_bytes(static_cast<double>(p.workspace_bytes + p.batch_bytes + p.logits_bytes)),
               format_bytes(static_cast<double>(p.backend_bytes)), k_floor, format_bytes(static_cast<double>(block)),
               p.gen_batch > 0 ? fmt::format(", generation: KV cache {}, logits {}",
                                             format_bytes(static_cast<double>(p.kv_device_bytes)),
                                             format_bytes(static_cast<double>(p.gen_bytes)))
                               : std::string());
        const std::int64_t fit = static_cast<std::int64_t>((r.cap - fixed) / block);
        // fit = resident + slots, with slots = min(k, L − resident).
        resident = std::clamp<std::int64_t>(fit - k, 0, L);
        window = static_cast<int>(std::min<std::int64_t>(k, L - resident));
        if (window == 0) resident = L;
      }
      break;
  }
  p.window = resident == L ? 0 : window;
  p.resident_count = resident;
  p.streamed = L - resident;
  // Spread the resident blocks evenly: block i is resident when ⌊(i+1)·R/L⌋ > ⌊i·R/L⌋.
  p.resident.assign(static_cast<std::size_t>(L), false);
  for (std::int64_t i = 0; i < L; ++i)
    p.resident[static_cast<std::size_t>(i)] = (i + 1) * resident / L > i * resident / L;
  p.slot_bytes = p.tile_slots > 0 ? ring : static_cast<std::size_t>(p.window) * block;
  p.resident_bytes = static_cast<std::size_t>(resident) * block;
  p.total_bytes = fixed + p.slot_bytes + p.resident_bytes;
  // Each pass uploads every streamed block (by blocks or by tiles: the same bytes); only the
  // first (which applies the pending update) brings the rule's state with it and writes
  // them back.
  p.passes = std::max(1, r.passes);
  p.h2d_bytes_per_step = static_cast<std::size_t>(p.streamed) *
                         (p.block_bytes + static_cast<std::size_t>(p.passes - 1) * weight_block);
  p.d2h_bytes_per_step =
      r.branches == 2 && !r.frozen_base ? static_cast<std::size_t>(p.streamed) * p.block_bytes : 0;
  if (r.writeback_ranks > 1)
    p.d2h_bytes_per_step = (p.d2h_bytes_per_step + static_cast<std::size_t>(r.writeback_ranks) - 1) /
                           static_cast<std::size_t>(r.writeback_ranks);
  p.host_bytes += r.adapter_bytes + p.kv_host_bytes;
  p.predicted_transfer_s = transfer_seconds(p, r);
  plan_tiers(p, config, r);
  return p;
}

// The tiers below the device (DESIGN.md §12): with --host-mem below the host store, the
// streamed blocks that do not fit (after the globals, the device-resident blocks, which
// stay in RAM, and the staging buffers) move to the disk tier, spread evenly among the
// streamed blocks so that each disk read overlaps the RAM blocks' compute.
void plan_tiers(Placement& p, const ModelConfig& config, const PlanRequest& r) {
  const std::int64_t L = config.num_layers;
  p.on_disk.assign(static_cast<std::size_t>(L), false);
  p.host_mem = r.host_mem;
  p.disk_lag = std::max(1, r.disk_lag);
  if (r.host_mem == 0 || p.host_bytes <= r.host_mem) return;
  const std::size_t image = p.block_bytes;  // a host block image (with its state)
  const std::size_t others = p.host_bytes - static_cast<std::size_t>(L) * image;  // globals, adapters, KV
  const int staging = r.disk_staging > 0 ? r.disk_staging : std::max(2, p.window + 1);
  const std::size_t floor = others + static_cast<std::size_t>(p.resident_count + staging) * image;
  // Without a disk directory no block can go to disk: the weights must fit, and the disk
  // tier's floor (its staging buffers) is not this run's minimum (adversarial pass 69).
  if (!r.disk_dir && (p.streamed == 0 || r.host_mem < floor))
    fail(ErrorKind::invalid_argument, "--host-mem {}: the master weights need {} of host memory, {}",
         format_bytes(static_cast<double>(r.host_mem)), format_bytes(static_cast<double>(p.host_bytes)),
         p.streamed == 0
             ? fmt::format("and every block is resident on the device, so none can move to disk: raise --host-mem "
                           "to {}",
                           format_bytes(static_cast<double>(p.host_bytes)))
             : fmt::format("and --disk-dir, where the blocks that do not fit would go, is not set: raise --host-mem "
                           "to {}, or give --disk-dir DIR (a local SSD) with --host-mem at least {} (the disk tier's "
                           "staging buffers are in it)",
                           format_bytes(static_cast<double>(p.host_bytes)), format_bytes(static_cast<double>(floor))));
  if (p.streamed == 0 || r.host_mem < floor)
    fail(ErrorKind::out_of_memory,
         "--host-mem {}: the host needs at least {} with a disk tier (the globals{} {}, {} device-resident block "
         "image{} and {} staging buffer{} of {}{}){}",
         // (in bytes where the two round alike: "26.33 MiB: at least 26.33 MiB" read as a contradiction)
         format_bytes(static_cast<double>(r.host_mem)),
         format_bytes(static_cast<double>(floor)) ==
                 format_bytes(static_cast<double>(r.host_mem))
             ? fmt::format("{} bytes ({} given)", floor, r.host_mem)
             : format_bytes(static_cast<double>(floor)),
         r.adapter_bytes || p.kv_host_bytes ? " and adapters or KV caches" : "", format_bytes(static_cast<double>(others)),
         p.resident_count, p.resident_count == 1 ? "" : "s", staging, staging == 1 ? "" : "s",
         format_bytes(static_cast<double>(image)), staging == 1 ? "" : " each",
         p.streamed == 0 ? "; every block is resident on the device, so nothing can move to disk" : "");
  const std::int64_t ram_streamed =
      std::min<std::int64_t>(p.streamed, static_cast<std::int64_t>((r.host_mem - floor) / image));
  const std::int64_t D = p.streamed - ram_streamed;
  if (D == 0) return;
  std::int64_t j = 0;
  for (std::int64_t i = 0; i < L; ++i) {
    if (p.resident[static_cast<std::size_t>(i)]) continue;
    p.on_disk[static_cast<std::size_t>(i)] = (j + 1) * D / p.streamed > j * D / p.streamed;
    ++j;
  }
  p.disk_blocks = D;
  p.disk_staging = staging;
  p.host_bytes = floor + static_cast<std::size_t>(ram_streamed) * image;
  constexpr std::size_t kPage = 4096;
  const std::size_t padded = (image + kPage - 1) / kPage * kPage;
  p.disk_file_bytes = kPage + 2 * static_cast<std::size_t>(D) * (kPage + padded);
  p.disk_read_bytes_per_step = static_cast<std::size_t>(D) * static_cast<std::size_t>(p.passes) * image;
  p.disk_write_bytes_per_step =
      p.d2h_bytes_per_step > 0 ? static_cast<std::size_t>(D) * image / static_cast<std::size_t>(p.disk_lag) : 0;
  // A block on disk comes back from the device only when its image is written (Note [Lagging
  // disk images]): every disk_lag-th step, so the link's traffic down is the RAM blocks' and
  // a K-th of the disk blocks' (pass 62: every block every step was shown).
  if (p.d2h_bytes_per_step > 0 && p.disk_lag > 1) {
    const double per_block = static_cast<double>(p.d2h_bytes_per_step) / static_cast<double>(p.streamed);
    p.d2h_bytes_per_step = static_cast<std::size_t>(
        per_block * (static_cast<double>(p.streamed - D) + static_cast<double>(D) / static_cast<double>(p.disk_lag)));
    p.predicted_transfer_s = transfer_seconds(p, r);
  }
  p.disk_read_bytes_per_s = r.disk_read_bytes_per_s;
  p.disk_write_bytes_per_s = r.disk_write_bytes_per_s;
  p.predicted_disk_s = static_cast<double>(p.disk_read_bytes_per_step) / r.disk_read_bytes_per_s +
                       static_cast<double>(p.disk_write_bytes_per_step) / r.disk_write_bytes_per_s;
}

std::string Placement::describe(const ModelConfig& config) const {
  std::string s;
  auto line = [&](std::string_view what, double bytes) {
    s += fmt::format("  {:<28} {:>12}\n", what, format_bytes(bytes));
  };
  if (tile_slots > 0)
    s += fmt::format("placement: {} of {} blocks resident, {} streamed by weight tiles ({} a block) through {} tile "
                     "slots of {} and 2 vector slots of {}\n",
                     resident_count, resident.size(), streamed, block_tiles, tile_slots,
                     format_bytes(static_cast<double>(tile_bytes)), format_bytes(static_cast<double>(vector_bytes)));
  else
    s += fmt::format("placement: {} of {} blocks resident, {} streamed through {} slots\n",
                     resident_count, resident.size(), streamed, window);
  if (streamed > 0 && resident_count > 0) {
    std::string map;
    for (bool b : resident) map += b ? 'R' : 's';
    s += fmt::format("  blocks (R resident, s streamed): {}\n", map);
  }
  line("globals", static_cast<double>(globals_bytes));
  line("resident blocks", static_cast<double>(resident_bytes));
  line(tile_slots > 0 ? "tile and vector slots" : "window slots", static_cast<double>(slot_bytes));
  line("activations and scratch", static_cast<double>(workspace_bytes));
  line("batch buffers", static_cast<double>(batch_bytes));
  if (logits_bytes) line("logits", static_cast<double>(logits_bytes));
  if (adapter_bytes) line("adapters (+ state)", static_cast<double>(adapter_bytes));
  if (backend_bytes) line("cuBLAS and attention scratch", static_cast<double>(backend_bytes));
  if (gen_batch > 0) {
    if (kv_positions > 0) {
      s += fmt::format("  KV cache: {} sequences x {} positions, {} a block, on the {}\n", gen_batch, kv_positions,
                       format_bytes(static_cast<double>(kv_block_bytes)), kv_on_device ? "device" : "host");
      if (call_seq < kv_positions)
        s += fmt::format("  prompts run {} tokens per sequence at a time (the activations' size)\n", call_seq);
      line(kv_on_device ? "KV cache (every block)" : "KV cache slots (2)", static_cast<double>(kv_device_bytes));
      if (!kv_on_device) line("KV cache on the host", static_cast<double>(kv_host_bytes));
    } else {
      s += fmt::format("  KV cache: off (each new token runs the whole sequence of {} sequences)\n", gen_batch);
    }
    line("next-token logits", static_cast<double>(gen_bytes));
  }
  line("predicted device peak", static_cast<double>(total_bytes));
  line("cap", static_cast<double>(cap));
  line(tile_slots > 0 ? "minimum cap (tiles, 2 slots)" : "minimum cap (whole blocks)", static_cast<double>(minimum_cap));
  if (tile_minimum_cap > 0) line("minimum cap (weight tiles)", static_cast<double>(tile_minimum_cap));
  line(state_block_bytes ? "block image (with state)" : "block image", static_cast<double>(block_bytes));
  if (state_block_bytes) line("  of which optimizer state", static_cast<double>(state_block_bytes));
  line(state_block_bytes ? "host memory (weights, state)" : "host memory (master weights)", static_cast<double>(host_bytes));
  if (host_mem > 0) line("host memory cap (--host-mem)", static_cast<double>(host_mem));
  if (disk_blocks > 0) {
    std::string map;
    for (std::size_t i = 0; i < on_disk.size(); ++i) map += resident[i] ? 'R' : on_disk[i] ? 'd' : 's';
    s += fmt::format("  tiers: {} blocks on the device, {} streamed from RAM, {} from disk ({} staging buffers)\n",
                     resident_count, streamed - disk_blocks, disk_blocks, disk_staging);
    s += fmt::format("  blocks (R device, s RAM, d disk): {}\n", map);
    line("disk tier (block file)", static_cast<double>(disk_file_bytes));
    s += fmt::format("  {:<28} {:>12} read, {} written (--disk-lag {})\n", "disk traffic per step",
                     format_bytes(static_cast<double>(disk_read_bytes_per_step)),
                     format_bytes(static_cast<double>(disk_write_bytes_per_step)), disk_lag);
    s += fmt::format("  {:<28} {:>12} (at {:.3g} GB/s read, {:.3g} GB/s write: zo2-bench --disk-probe measures "
                     "this disk)\n",
                     "disk-bound step time",
                     predicted_disk_s < 1 ? fmt::format("{:.3g} ms", predicted_disk_s * 1e3)
                                          : fmt::format("{:.3f} s", predicted_disk_s),
                     disk_read_bytes_per_s / 1e9, disk_write_bytes_per_s / 1e9);
  }
  if (passes > 1) s += fmt::format("  {:<28} {:>12}\n", "forward passes per step", passes);
  s += fmt::format("  {:<28} {:>12} up, {} down\n", "transfer per step",
                   format_bytes(static_cast<double>(h2d_bytes_per_step)),
                   format_bytes(static_cast<double>(d2h_bytes_per_step)));
  s += fmt::format("  {:<28} {:>12}\n", "transfer-bound step time",
                   predicted_transfer_s < 1 ? fmt::format("{:.3g} ms", predicted_transfer_s * 1e3)
                                            : fmt::format("{:.3f} s", predicted_transfer_s));
  (void)config;
  return s;
}

}  // namespace zo2
