#include "api/session.h"

#include "api/run_dir.h"

#include "models/safetensors.h"
#include "runtime/checksum.h"
#include "runtime/error.h"
#include "runtime/file_util.h"
#include "runtime/json_file.h"
#include "runtime/log.h"
#include "runtime/philox.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>

namespace zo2 {

PlanRequest plan_request(const ModelConfig& model, const SessionConfig& cfg, DeviceKind kind,
                         std::size_t cap, int node_ranks) {
  PlanRequest r;
  r.cap = cap;
  r.batch = cfg.max_batch;
  r.seq = cfg.max_seq > 0 ? cfg.max_seq : static_cast<int>(model.max_positions);
  r.branches = cfg.training ? 2 : 1;
  r.storage = cfg.storage;
  r.compute = cfg.compute;
  r.mode = cfg.offload;
  r.window = cfg.window;
  r.tile = cfg.tile;
  r.limits = cfg.limits;
  r.logits_out = cfg.logits_out;
  r.generate = cfg.generate;
  r.host_mem = cfg.host_mem;
  r.disk_dir = !cfg.disk_dir.empty();
  r.disk_lag = cfg.disk_lag;
  r.disk_staging = cfg.disk_staging;
  const StateSpec state{cfg.rule.state_buffers(), cfg.rule.state_dtype};
  if (cfg.peft.any()) {
    // The adapters keep the rule's state; the frozen blocks none.
    r.adapter_bytes = adapter_bytes(model, cfg.peft, state);
    r.frozen_base = true;
    if (cfg.peft.lora) r.limits.lora_rank = cfg.peft.r;
    r.limits.prefix_tokens = cfg.peft.prefix;
    // A new prefix is initialized from a forward of P tokens: room for them.
    if (cfg.peft.prefix > 0 && cfg.adapter_dir.empty()) r.seq = std::max(r.seq, cfg.peft.prefix);
  } else {
    r.state = state;
  }
  if (cfg.training) {
    const RuleEstimate est = estimate_plan(cfg.rule, 1e-3f);
    r.passes = static_cast<int>(est.passes.size()) + (cfg.rule.host_sync() ? (est.unperturbed_slot >= 0 ? 1 : 2) : 0);
    if (!cfg.parallel.single()) {
      // A rank runs its share of the passes (Note [Parallel modes]); every rank of a node
      // sharing the image writes back its slice.
      r.passes = static_cast<int>(rank_work(est, cfg.parallel, rank_coord(cfg.parallel, 0)).passes.size());
      if (cfg.share_host_image) r.writeback_ranks = std::max(1, node_ranks);
    }
  }
  if (kind == DeviceKind::cuda) r.backend_bytes = kCudaBackendBytes;  // cuBLAS workspace + kernel scratch
  if (kind == DeviceKind::cpu) {
    // "Transfers" on the CPU backend are memcpy: roughly memory bandwidth per direction, or
    // the emulated link's rate where ZO2_CPU_LINK_GBPS sets one (pass 62: the prediction
    // ignored it, 200× off at 0.05 GB/s).
    const double link = cpu_emulated_link_bytes_per_s();
    r.h2d_bytes_per_s = link > 0 ? link : 10e9;
    r.d2h_bytes_per_s = link > 0 ? link : 10e9;
  }
  return r;
}

ParallelPlan plan_parallel(const ModelConfig& model, const SessionConfig& cfg, DeviceKind kind, std::size_t cap,
                           int ranks_per_node) {
  ParallelPlan pp;
  pp.layout = cfg.parallel;
  pp.ranks_per_node = std::max(1, std::min(ranks_per_node, cfg.parallel.size()));
  pp.shared_image = cfg.share_host_image;
  SessionConfig one = cfg;
  one.parallel = ParallelLayout{};
  pp.single = plan_placement(model, plan_request(model, one, kind, cap));
  pp.rank = plan_placement(model, plan_request(model, cfg, kind, cap, pp.ranks_per_node));
  pp.batch_per_rank = (cfg.max_batch + cfg.parallel.data - 1) / cfg.parallel.data;
  const RuleEstimate est = estimate_plan(cfg.rule, 1e-3f);
  int all = 0, mine = 0;
  for (const RulePass& p : est.passes) all += p.branches;
  for (const RulePass& p : rank_work(est, cfg.parallel, rank_coord(cfg.parallel, 0)).passes) mine += p.branches;
  pp.forward_share = all > 0 ? static_cast<double>(mine) / all / cfg.parallel.data : 1;
  pp.host_bytes_per_node = pp.rank.host_bytes * (pp.shared_image ? 1 : static_cast<std::size_t>(pp.ranks_per_node));
  return pp;
}

std::string ParallelPlan::describe() const {
  std::string s;
  const int n = layout.size();
  const int nodes = (n + ranks_per_node - 1) / ranks_per_node;
  s += fmt::format("parallel: {}; {} per node ({} node{})\n", layout.describe(), ranks_per_node, nodes, nodes == 1 ? "" : "s");
  auto line = [&](std::string_view what, const std::string& value) { s += fmt::format("  {:<30} {}\n", what, value); };
  auto bytes = [](std::size_t b) { return format_bytes(static_cast<double>(b)); };
  auto seconds = [](double t) { return t < 1 ? fmt::format("{:.3g} ms", t * 1e3) : fmt::format("{:.3f} s", t); };
  line("forward work per rank", fmt::format("{:.3g} of one process's ({:.3g}×)", forward_share, 1 / forward_share));
  line("device peak per rank", bytes(rank.total_bytes) + fmt::format(" (one process: {})", bytes(single.total_bytes)));
  line("upload per rank per step", bytes(rank.h2d_bytes_per_step) +
                                       fmt::format(" (one process: {})", bytes(single.h2d_bytes_per_step)));
  line("write-back per rank per step",
       bytes(rank.d2h_bytes_per_step) +
           (shared_image && ranks_per_node > 1 ? fmt::format(" (its 1/{} slice; one process: {})", ranks_per_node,
                                                              bytes(single.d2h_bytes_per_step))
                                               : std::string()));
  line("host memory per node", bytes(host_bytes_per_node) +
                                   (shared_image ? fmt::format(" (one shared image for {} rank{})", ranks_per_node,
                                                               ranks_per_node == 1 ? "" : "s")
                                                 : fmt::format(" ({} private image{})", ranks_per_node,
                                                               ranks_per_node == 1 ? "" : "s")));
  line("transfer-bound step per rank",
       seconds(rank.predicted_transfer_s) + fmt::format(" (one process: {})", seconds(single.predicted_transfer_s)));
  if (rank.streamed > 0 && layout.directions == 1)
    s += "  (streamed blocks: every rank uploads every block each pass, so data and perturbation ranks divide the "
         "compute but not a rank's upload; direction groups divide both)\n";
  return s;
}

namespace {
std::unique_ptr<Device> open_device(const SessionConfig& cfg) {
  DeviceOptions o = parse_device(cfg.device);
  o.mem_cap = cfg.gpu_mem;
  o.threads = cfg.threads;
  o.debug_copy_delay_us = cfg.debug_copy_delay_us;
  return make_device(o);
}
}  // namespace

// Note [Arena sized to the plan]
//   The device arena is first reserved at the cap (--gpu-mem; without one, the whole device:
//   CUDA's free memory less 512 MiB), the plan is made against it, and then the device is
//   reopened with an arena of the plan's bytes plus kArenaSlack where that is smaller. The
//   cap is a ceiling, not a reservation: otherwise a 1.3B model would hold 139 GiB of an
//   H200 for the session's life, OPT-175B at --gpu-mem 12G would hold 12 GiB where its plan
//   needs 9.11 (an H100 run at e4931a4 measured the process at 12.59 GiB: the whole cap plus
//   the CUDA context), the driver-reported memory of the process — the figure ANCHORS.md
//   compares, the way ZO2 measured — would say nothing about zo2, and other processes could
//   not share the GPU. The re-plan in init() against the smaller arena gives the same
//   placement (the plan fits its own bytes, and a smaller cap never places more). The slack
//   absorbs allocator fragmentation and scratch growth beyond the plan.
constexpr std::size_t kArenaSlack = std::size_t{256} << 20;

void Session::fit_arena_to(const Placement& plan) {
  const std::size_t want = plan.total_bytes + kArenaSlack;
  if (want >= device_->arena().capacity()) return;
  SessionConfig c = cfg_;
  c.gpu_mem = want;
  device_.reset();  // give the whole-device arena back before reserving the smaller one
  device_ = open_device(c);
}

namespace {
// Every tensor's name, dtype, shape and 192 of its bytes (its first, middle and last 64), in
// name order, across the files: what tells two checkpoints of one shape apart in a moment at
// any size (another seed, a tuned copy), while the same weights saved another way (resharded,
// another header layout) give the same digest. A fingerprint, not a checksum: an edit of the
// bytes in between goes unseen (Note [One job]).
Digest weights_digest(const std::vector<std::filesystem::path>& files, std::uint64_t* total_bytes = nullptr) {
  struct Tensor {
    std::string name;
    std::uint64_t dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> sample;
  };
  std::vector<Tensor> tensors;
  std::uint64_t bytes = 0;
  for (const std::filesystem::path& file : files) {
    const SafetensorsFile f = SafetensorsFile::open(file);
    bytes += f.file_size();
    for (const TensorInfo& t : f.tensors()) {
      const auto size = static_cast<std::size_t>(t.end - t.begin);
      Tensor x{t.name, static_cast<std::uint64_t>(t.dtype), t.shape, {}};
      const std::size_t n = std::min<std::size_t>(size, 64);
      for (const std::size_t at : {std::size_t{0}, (size - n) / 2, size - n}) {
        x.sample.resize(x.sample.size() + n);
        f.read(t, at, std::span(x.sample).last(n));
      }
      tensors.push_back(std::move(x));
    }
  }
  std::sort(tensors.begin(), tensors.end(), [](const Tensor& a, const Tensor& b) { return a.name < b.name; });
  Digest d;
  for (const Tensor& t : tensors) {
    d.add(t.name).add(t.dtype).add(static_cast<std::uint64_t>(t.shape.size()));
    for (std::int64_t n : t.shape) d.add(static_cast<std::uint64_t>(n));
    d.add(t.sample.data(), t.sample.size());
  }
  if (total_bytes) *total_bytes = bytes;
  return d;
}

std::vector<std::filesystem::path> checkpoint_weight_files(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  const SafetensorsCheckpoint ck = SafetensorsCheckpoint::open(dir);
  for (std::size_t i = 0; i < ck.num_files(); ++i) files.push_back(ck.file(i).path());
  return files;
}
}  // namespace

std::string checkpoint_fingerprint(const std::filesystem::path& dir) {
  return weights_digest(checkpoint_weight_files(resolve_model_dir(dir))).hex();
}

std::string adapter_fingerprint(const std::filesystem::path& dir) {
  const std::filesystem::path file = resolve_model_dir(dir) / kAdapterModelFile;
  if (std::error_code ec; !std::filesystem::is_regular_file(file, ec))
    fail(ErrorKind::io, "{}: missing (or not a file): not an adapter directory", file.string());
  return fmt::format("{:08x}", crc32_file(file));
}

std::vector<RankPart> session_fingerprint(const std::filesystem::path& model_path, const SessionConfig& cfg) {
  const std::filesystem::path dir = resolve_model_dir(model_path);
  const ModelConfig model = ModelConfig::load(dir);
  auto weights = [](const std::vector<std::filesystem::path>& files) {
    std::uint64_t bytes = 0;
    const Digest d = weights_digest(files, &bytes);
    return fmt::format("{} file{}, {}, digest {}", files.size(), files.size() == 1 ? "" : "s",
                       format_bytes(static_cast<double>(bytes)), d.hex());
  };
  auto safetensors_in = [](const std::filesystem::path& d) {
    std::vector<std::filesystem::path> files;
    for (const auto& e : std::filesystem::directory_iterator(d))
      if (e.is_regular_file() && e.path().extension() == ".safetensors" &&
          e.path().filename() != kOptimizerStateFile)  // compared by the rule and the step
        files.push_back(e.path());
    std::sort(files.begin(), files.end());
    return files;
  };
  std::vector<RankPart> parts;
  parts.push_back({"the model's config.json",
                   fmt::format("{} layers, hidden {}, digest {}", model.num_layers, model.hidden_size,
                               Digest().add(model.to_json().dump()).hex())});
  parts.push_back({"the model's weights", weights(checkpoint_weight_files(dir))});
  if (cfg.peft.any() && !cfg.adapter_dir.empty())
    parts.push_back({"the adapter's weights", weights(safetensors_in(cfg.adapter_dir))});
  parts.push_back({"the update rule (--optimizer)", rule_to_json(cfg.rule).dump()});
  parts.push_back({"the tuned parameters (--lora, --prefix-tuning)", cfg.peft.describe()});
  parts.push_back({"the storage dtype", std::string(dtype_name(cfg.storage))});
  parts.push_back({"the compute dtype", std::string(dtype_name(cfg.compute))});
  parts.push_back({"the run seed (--seed)", std::to_string(cfg.run_seed)});
  parts.push_back({"the first step", std::to_string(cfg.first_step)});
  parts.push_back({"the layout (--parallel)", cfg.parallel.spec()});
  parts.push_back({"the host image", cfg.share_host_image ? "shared" : "private"});
  parts.push_back({"the upload", cfg.sliced_upload ? "sliced" : "full"});
  return parts;
}

namespace {
// What the disk tier cannot serve yet, refused before anything is planned or read.
void check_disk_tier(const SessionConfig& cfg) {
  if (cfg.host_mem == 0) return;
  if (cfg.comm && cfg.comm->size() > 1)
    fail(ErrorKind::invalid_argument, "--host-mem: the disk tier serves one process; {} ranks are not supported yet",
         cfg.comm->size());
}
}  // namespace

// The block file never goes into a checkpoint: the one this session loads (a loader finds it
// beside the weights, and a copy of the model carries it along), its adapter, or a training
// run's step directory (the run's next save removes that directory, block file and all).
void Session::check_disk_dir_placement() const {
  std::error_code ec;
  const std::filesystem::path disk = std::filesystem::weakly_canonical(std::filesystem::absolute(cfg_.disk_dir, ec), ec);
  if (ec) return;  // the disk tier names what is wrong with the directory
  auto within = [&](const std::filesystem::path& dir) {
    std::error_code e2;
    const std::filesystem::path d = std::filesystem::weakly_canonical(std::filesystem::absolute(dir, e2), e2);
    if (e2 || d.empty()) return false;
    const auto rel = disk.lexically_relative(d);
    return !rel.empty() && *rel.begin() != "..";
  };
  std::vector<std::filesystem::path> checkpoints;
  if (!model_path_.empty()) {
    checkpoints.push_back(resolve_model_dir(model_path_));
    if (!model_is_run_) checkpoints.push_back(model_path_);  // a run's own directory may hold it (RUN/blocks)
  }
  if (!cfg_.adapter_dir.empty()) checkpoints.push_back(resolve_model_dir(cfg_.adapter_dir));
  for (const auto& ck : checkpoints)
    if (within(ck))
      fail(ErrorKind::invalid_argument,
           "--disk-dir {}: is inside the checkpoint {} this run loads: the block file would be left among its files; "
           "choose a directory of its own",
           cfg_.disk_dir.string(), ck.string());
  for (std::filesystem::path p = disk; p.has_relative_path(); p = p.parent_path())
    if (const std::filesystem::path run = training_run_of_checkpoint(p); !run.empty())
      fail(ErrorKind::invalid_argument,
           "--disk-dir {}: is inside {}, a checkpoint of the training run {}, which a later save removes with the "
           "block file in it: choose a directory of its own ({}/blocks would do)",
           cfg_.disk_dir.string(), p.string(), run.string(), run.string());
}

std::optional<DiskPlacement> Session::disk_placement(const ModelConfig& model, const Placement& plan) const {
  if (plan.disk_blocks == 0) return std::nullopt;
  if (cfg_.disk_dir.empty())
    fail(ErrorKind::invalid_argument,
         "--host-mem {}: the master weights need {} of host memory, so {} of {} blocks must live on disk: give "
         "--disk-dir DIR (a local SSD) for them, or raise --host-mem",
         format_bytes(static_cast<double>(cfg_.host_mem)),
         format_bytes(static_cast<double>(plan.host_bytes + static_cast<std::size_t>(plan.disk_blocks) * plan.block_bytes)),
         plan.disk_blocks, plan.on_disk.size());
  check_disk_dir_placement();
  DiskPlacement d;
  d.dir = cfg_.disk_dir;
  d.on_disk = plan.on_disk;
  d.staging = plan.disk_staging;
  d.file = cfg_.disk_file;
  d.reuse = cfg_.disk_resume;
  d.max_step = cfg_.disk_resume ? cfg_.first_step : -1;  // the seed log's end: the step training goes on from
  d.base_step = cfg_.replay.empty() ? cfg_.first_step : cfg_.replay.front().step;
  // What the images belong to: a resume keeps them only for the same run (its seed log and
  // seed), the same model shape and storage, and the same blocks on disk.
  std::string map;
  for (bool b : plan.on_disk) map += b ? 'd' : '-';
  // The log by its resolved path: a resume from another working directory is the same run.
  const std::string log =
      cfg_.seed_log.empty() ? std::string() : std::filesystem::weakly_canonical(std::filesystem::absolute(cfg_.seed_log)).string();
  d.identity = nlohmann::json{{"seed_log", log},
                              {"run_seed", cfg_.run_seed},
                              {"storage", std::string(dtype_name(cfg_.storage))},
                              {"family", model.family_name()},
                              {"layers", model.num_layers},
                              {"hidden", model.hidden_size},
                              {"vocab", model.vocab_size},
                              {"block_bytes", plan.block_bytes},
                              {"blocks", map}}
                   .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";  // (a path not UTF-8)
  return d;
}

namespace {
// The step a checkpoint's weights are at: its manifest's, or an older zo2_state.json's
// next_step; -1 where nothing says.
std::int64_t saved_step_of(const std::filesystem::path& dir) {
  const OpenedCheckpoint opened = open_checkpoint(dir);
  if (opened.step >= 0) return opened.step;
  if (opened.state.is_object() && opened.state.contains("next_step") && opened.state["next_step"].is_number_integer())
    return opened.state["next_step"].get<std::int64_t>();
  return -1;
}
}  // namespace

// A resume (the seed log appended, or the rule state loaded) starts at the step its checkpoint
// was saved at: another first_step would trim the log to a step the weights are not at (and
// the next save would name a step they are not at), or pair the state with other weights.
void Session::check_resume_step(const std::filesystem::path& model_path) const {
  if (!cfg_.seed_log_append && !cfg_.resume_state) return;
  const std::filesystem::path ck = cfg_.peft.any() && !cfg_.adapter_dir.empty() ? cfg_.adapter_dir : model_path;
  const std::int64_t saved = saved_step_of(ck);
  if (saved < 0) return;  // no manifest: nothing says which step the weights are at
  const std::int64_t at = cfg_.replay.empty() ? cfg_.first_step : cfg_.replay.front().step;
  if (at != saved)
    fail(ErrorKind::invalid_argument, "first_step {}: the checkpoint {} was saved at step {}; a resume ({}) starts there",
         at, ck.string(), saved, cfg_.seed_log_append ? "seed_log_append" : "resume_state");
}

Session::Session(const std::filesystem::path& model_path, const SessionConfig& cfg) : cfg_(cfg) {
  keep_standard_fds_open();  // Note [The standard descriptors] (runtime/file_util.h)
  // A run directory reads through its current checkpoint, resolved once (api/run_dir.h).
  const std::filesystem::path model_dir = resolve_model_dir(model_path);
  model_path_ = model_path;
  model_is_run_ = model_dir != model_path || holds_run(model_path);
  if (model_is_run_) model_loaded_step_ = saved_step_of(model_path);
  check_resume_step(model_path);
  // Note [One job]: the ranks compare what defines the run before any collective depends on it.
  if (cfg_.training && cfg_.comm && cfg_.comm->size() > 1 && !cfg_.ranks_agreed)
    check_ranks_agree(*cfg_.comm, session_fingerprint(model_path, cfg_), "the training session's model and settings");
  check_disk_tier(cfg_);
  device_ = open_device(cfg_);
  // Plan before reading the weights: a cap that cannot work fails fast.
  const ModelConfig model = ModelConfig::load(model_dir);
  // A FIFO or a directory of that name is refused by name, never waited on (Note [Reading JSON]).
  if (const std::filesystem::path gen = model_dir / kGenerationConfig; std::filesystem::exists(gen))
    generation_config_ = read_regular_file(gen);
  const Placement plan = plan_placement(model, plan_request(model, cfg_, device_->kind(), device_->arena().capacity()));
  fit_arena_to(plan);
  const std::optional<DiskPlacement> disk = disk_placement(model, plan);
  const StateSpec state{cfg_.rule.state_buffers(), cfg_.rule.state_dtype};
  check_cpu_host_memory(model, plan, cfg_.peft.any() ? StateSpec{} : state);
  open_node_comm();
  // Note [Kernel threads] (runtime/cpu/cpu_device.cpp): the weights load with the device's threads.
  device_->run_host_parallel([&] {
    store_ = std::make_unique<BlockStore>(BlockStore::load(model_dir, cfg_.storage, *device_,
                                                           cfg_.peft.any() ? StateSpec{} : state, node_comm_.get(),
                                                           disk ? &*disk : nullptr));
    open_adapters(model);
    if (cfg_.resume_state && state.buffers > 0) {
      // A LoRA run keeps its state beside its adapter; a full run beside its checkpoint.
      const std::filesystem::path file = (cfg_.peft.any() ? cfg_.adapter_dir : model_dir) / kOptimizerStateFile;
      if (!std::filesystem::exists(file))
        fail(ErrorKind::format, "{}: missing; the run used --optimizer {}, whose state a resume needs", file.string(),
             rule_name(cfg_.rule.kind));
      if (cfg_.peft.any()) adapters_->load_state(file);
      else store_->load_state(file);
    }
  });
  init(cfg_);
}

Session::Session(const ModelConfig& model, const SessionConfig& cfg, std::uint64_t init_seed,
                 bool alias_blocks)
    : cfg_(cfg) {
  check_disk_tier(cfg_);
  device_ = open_device(cfg_);
  const Placement plan = plan_placement(model, plan_request(model, cfg_, device_->kind(), device_->arena().capacity()));
  fit_arena_to(plan);
  const std::optional<DiskPlacement> disk = disk_placement(model, plan);
  if (disk && alias_blocks)
    fail(ErrorKind::invalid_argument, "a benchmark shape with aliased blocks has one block image: it needs no disk tier");
  const StateSpec state{cfg_.rule.state_buffers(), cfg_.rule.state_dtype};
  if (!alias_blocks) check_cpu_host_memory(model, plan, cfg_.peft.any() ? StateSpec{} : state);
  open_node_comm();
  device_->run_host_parallel([&] {  // Note [Kernel threads]
    store_ = std::make_unique<BlockStore>(BlockStore::synthetic(model, cfg_.storage, *device_, init_seed, alias_blocks,
                                                                cfg_.peft.any() ? StateSpec{} : state,
                                                                node_comm_.get(), disk ? &*disk : nullptr));
    open_adapters(model);
  });
  init(cfg_);
}

// On the CPU backend the device arena is host memory too: the master weights and the plan's
// device peak must fit together (check_host_memory). Ranks sharing a node's image are left to
// the store's own check (each rank's arena is its own; node rank 0 checks the image).
void Session::check_cpu_host_memory(const ModelConfig& model, const Placement& plan, const StateSpec& state) const {
  if (device_->kind() != DeviceKind::cpu || (cfg_.comm && cfg_.comm->size() > 1)) return;
  const std::int64_t images = plan.disk_blocks > 0 ? model.num_layers - plan.disk_blocks + plan.disk_staging
                                                   : model.num_layers;
  check_host_memory(model, cfg_.storage, images, state, plan.total_bytes);
}

void Session::open_node_comm() {
  // Only a training session's ranks run in lockstep; an evaluation-only session on several
  // ranks keeps its own image.
  if (cfg_.comm && cfg_.comm->size() > 1 && cfg_.share_host_image && cfg_.training) {
    node_comm_ = cfg_.comm->node();
    if (node_comm_->size() == 1) node_comm_.reset();
  }
}

void Session::open_adapters(const ModelConfig& model) {
  if (!cfg_.peft.any()) return;
  validate_peft(cfg_.peft, model);
  adapters_ = std::make_unique<AdapterStore>(model, cfg_.peft,
                                             StateSpec{cfg_.rule.state_buffers(), cfg_.rule.state_dtype}, *device_,
                                             cfg_.run_seed);
  if (!cfg_.adapter_dir.empty()) {
    adapters_->load_peft(cfg_.adapter_dir);
    adapter_is_run_ = holds_run(cfg_.adapter_dir);
    if (adapter_is_run_) adapter_loaded_step_ = saved_step_of(cfg_.adapter_dir);
  }
}

void Session::init(const SessionConfig& cfg) {
  const ModelConfig& model = store_->config();
  if (cfg.max_seq > model.max_positions)
    fail(ErrorKind::invalid_argument, "sequence length {} exceeds the model's max_position_embeddings ({})",
         cfg.max_seq, model.max_positions);
  const PlanRequest req =
      plan_request(model, cfg, device_->kind(), device_->arena().capacity(), node_comm_ ? node_comm_->size() : 1);
  Placement placement = plan_placement(model, req);
  // The plan reports the user's cap, not the arena sized under it (Note [Arena sized to the
  // plan]); without one, the arena is the cap.
  if (cfg.gpu_mem != 0) placement.cap = cfg.gpu_mem;
  SchedulerOptions so;
  so.compute = cfg.compute;
  so.batch = req.batch;
  so.seq = placement.call_seq;  // the activations' tokens per sequence (a generation chunk, or max_seq)
  so.branches = req.branches;
  so.rule = cfg.rule;  // an evaluation session keeps the default; replay needs the log's
  so.adapters = adapters_.get();
  so.logits_out = cfg.logits_out;
  so.fault = cfg.fault;
  so.disk_lag = cfg.disk_lag;
  if (store_->disk()) {
    // The re-plan against the fitted arena places the same blocks (Note [Arena sized to the plan]).
    for (std::int64_t i = 0; i < model.num_layers; ++i)
      if (store_->on_disk(i) != static_cast<bool>(placement.on_disk[static_cast<std::size_t>(i)]))
        fail(ErrorKind::internal, "block {}: the plan and the block store disagree on its tier", i);
  }
  const int ranks = cfg.comm ? cfg.comm->size() : 1;
  if (cfg.training || !cfg.parallel.single()) validate_parallel(cfg.parallel, ranks, cfg.rule, -1, "parallel layout");
  if (cfg.training) {
    so.comm = cfg.comm;
    so.parallel = cfg.parallel;
  }
  if (cfg.sliced_upload && ranks > 1) {
    if (!node_comm_)
      fail(ErrorKind::invalid_argument,
           "a sliced upload needs the ranks of a node to share one host image (not --host-image private){}",
           cfg.training ? "" : ", in a training session");
    // Note [Sliced upload]: the k-th exchange of every rank must be the same block's.
    if (cfg.training) {
      const RuleEstimate est = estimate_plan(cfg.rule, 1e-3f);
      const std::size_t passes = rank_work(est, cfg.parallel, rank_coord(cfg.parallel, 0)).passes.size();
      for (int r = 1; r < ranks; ++r)
        if (rank_work(est, cfg.parallel, rank_coord(cfg.parallel, r)).passes.size() != passes)
          fail(ErrorKind::invalid_argument,
               "a sliced upload needs every rank to run as many passes per step, but with --parallel {} and {} rank "
               "{} runs {} and rank 0 {}: use central differences, or --upload full",
               cfg.parallel.spec(), cfg.rule.describe(), r,
               rank_work(est, cfg.parallel, rank_coord(cfg.parallel, r)).passes.size(), passes);
    }
    so.sliced_upload = true;
  }
  if (node_comm_) {
    // Note [One host image per node]: the ranks of a node take turns block by block, so
    // they must stream the same blocks through the same slots.
    std::uint32_t h = 2166136261u;
    auto mix = [&](std::uint64_t v) {
      for (int b = 0; b < 8; ++b) h = (h ^ static_cast<std::uint32_t>((v >> (8 * b)) & 0xff)) * 16777619u;
    };
    for (bool r : placement.resident) mix(r ? 1 : 0);
    mix(static_cast<std::uint64_t>(placement.window));
    mix(static_cast<std::uint64_t>(placement.tile_slots));
    const double mine[2] = {static_cast<double>(h), static_cast<double>(placement.resident_count)};
    const std::vector<double> all = node_comm_->all_gather(mine, "the ranks' placements");
    for (int r = 0; r < node_comm_->size(); ++r)
      if (all[2 * static_cast<std::size_t>(r)] != mine[0])
        fail(ErrorKind::invalid_argument,
             "the ranks on this node planned different placements (node rank {}: {} resident blocks, node rank {}: "
             "{}), but ranks sharing a host image must stream the same blocks: give every rank the same --gpu-mem "
             "(or --host-image private)",
             node_comm_->rank(), placement.resident_count, r, static_cast<std::int64_t>(all[2 * static_cast<std::size_t>(r) + 1]));
  }
  scheduler_ = std::make_unique<Scheduler>(*device_, *store_, placement, so);
  if (cfg.peft.prefix > 0) {
    // The sequences' own length, not req.seq: that is raised to P for the initializing forward
    // below (plan_request), which runs without a prefix (adversarial pass 53: 16-token data
    // with P = 40 on 64 positions was refused as "sequence length 40 + 40").
    const std::int64_t seq = cfg.max_seq > 0 ? cfg.max_seq : model.max_positions;
    if (seq + cfg.peft.prefix > model.max_positions)
      fail(ErrorKind::invalid_argument, "sequence length {} + {} prefix tokens exceeds the model's {} positions", seq,
           cfg.peft.prefix, model.max_positions);
    if (cfg.adapter_dir.empty()) {
      // Note [Prefix tuning under ZO]: keys and values of P random tokens, as MeZO's
      // init_by_real_act, through the base model alone.
      const std::vector<std::int32_t> ids = prefix_init_tokens(model, cfg.peft.prefix, cfg.run_seed);
      const HostBatch b = make_batch(model, 1, cfg.peft.prefix, ids);
      const auto kv = scheduler_->capture_kv(b);
      for (std::int64_t i = 0; i < model.num_layers; ++i)
        adapters_->set_prefix(i, kv[static_cast<std::size_t>(2 * i)].data(), kv[static_cast<std::size_t>(2 * i + 1)].data());
      scheduler_->upload_adapters();
    }
  }
  next_step_ = cfg.first_step;
  if (!cfg.seed_log.empty() && is_writer()) {
    SeedLogHeader h;
    h.run_seed = cfg.run_seed;
    h.storage_dtype = std::string(dtype_name(cfg.storage));
    h.base_model = cfg.base_model;
    // What replay and a LoRA resume check the base against (a checkpoint re-made at the
    // same path is another base). A resumed log keeps the header it has.
    if (!cfg.base_model.empty() && !cfg.seed_log_append) h.base_fingerprint = checkpoint_fingerprint(cfg.base_model);
    h.first_step = cfg.first_step;
    h.rule = cfg.rule;
    h.peft = cfg.peft;
    h.run_flags = cfg.seed_log_run_flags;
    // Note [A run's starting adapter] (tools/cmd_replay.cpp): adapters loaded, not initialized
    // from the run seed, are where replay starts; resolved as the base is (a run directory's
    // `current` moves on).
    if (cfg.peft.any() && !cfg.adapter_dir.empty() && !cfg.seed_log_append) {
      h.adapter = std::filesystem::absolute(resolve_model_dir(cfg.adapter_dir)).string();
      h.adapter_fingerprint = adapter_fingerprint(cfg.adapter_dir);
    }
    seed_log_ = std::make_unique<SeedLogWriter>(cfg.seed_log, h, cfg.seed_log_append, next_step_);
    // Note [A resume from a rounded checkpoint] (api/run_dir.h): a log continued from weights
    // a narrower save rounded says so at its next entry.
    std::vector<std::string> rounded;
    if (cfg.seed_log_append && !cfg.peft.any())
      rounded = checkpoint_roundings(open_checkpoint(model_path_).state, cfg.storage);
    if (!rounded.empty() || !cfg.seed_log_run_update.empty())
      seed_log_->mark_next(std::move(rounded), cfg.seed_log_run_update);
  }
  if (DiskTier* disk = store_->disk(); disk && seed_log_) {
    // Note [Disk tier resume]: the log's lines so far are durable before any image moves.
    seed_log_->sync();
    disk->set_durable(static_cast<std::uint64_t>(next_step_));
  }
  if (!cfg.replay.empty()) {
    // Note [Disk tier resume]: the checkpoint's weights (and the kept disk images) to first_step.
    for (std::size_t k = 0; k < cfg.replay.size(); ++k)
      if (cfg.replay[k].step != cfg.replay.front().step + static_cast<std::int64_t>(k) ||
          cfg.replay.back().step + 1 != cfg.first_step)
        fail(ErrorKind::internal, "replay entries {}..{} do not lead to step {}", cfg.replay.front().step,
             cfg.replay.back().step, cfg.first_step);
    for (const SeedLogEntry& e : cfg.replay)
      scheduler_->replay_update(e.step, e.seed, e.lr, e.wd, e.gs.empty() ? std::vector<float>{e.g} : e.gs, e.choice);
    log_info("resume: applied the seed log's {} updates of steps {}..{} to the checkpoint{}", cfg.replay.size(),
             cfg.replay.front().step + 1, cfg.replay.back().step + 1,
             store_->disk() && store_->disk()->reused() ? " (each kept disk image from its own step)" : "");
  }
}

// Note [Records before the log line]
//   A host's record of a step (zo2-tune's --log-json) is written by the result hook before
//   the step's seed-log line. A run killed between the two has a record of a step its log
//   lacks; a resume runs that step again and cuts such records off (train keeps the records
//   up to the step it resumes at). The other order would lose the record for good under a
//   disk tier, whose resume applies the logged steps past the checkpoint instead of running
//   them again (Note [Disk tier resume]).

// Note [Disk tier resume]
//   With a disk tier, the block file and the seed log together are a state a killed run
//   resumes from exactly, even past its last checkpoint. Three rules make it so:
//   1. an image records the step it holds, and a write-back of an image holding step h waits
//      until the seed log is durable through step h − 1 (Session::wait fdatasyncs the log
//      after each line and tells the tier, DiskTier::set_durable): every image on disk is at
//      or behind the durable log, whatever moment the kill came;
//   2. each block alternates between two images, so a torn write leaves the previous one;
//   3. a save flushes every image to the checkpoint's step C before publishing it, and
//      images only move forward: after a kill each block's newest whole image holds a step
//      in [C, T], T the log's end.
//   `train --resume` (tools/cmd_train.cpp) then loads checkpoint C, keeps the block file
//   (its identity — run, seed log, model, blocks on disk — must match), and applies the
//   log's updates of steps C..T−1 (SessionConfig::replay): RAM blocks and globals from C,
//   each disk image from its own step, skipping the updates it already holds. The result is
//   the state an uninterrupted run had at T, bit for bit (replay runs the training kernels),
//   and training continues at T; nothing the killed run computed and logged is lost.
//   Without a seed log (a benchmark, a C API host without seed_log_path) rule 1 is off.

// Note [A stopped seed log]
//   Session::collect has taken a step off outstanding_ when it calls the result hook, and
//   the step's line follows the hook (Note [Records before the log line]). A hook that throws
//   (zo2-tune's progress on a dead stderr, once) or an append that fails (a full disk) leaves
//   the step without its line; the steps after it still run and are collected (drain, at the
//   latest by ~Session), and appending their lines would leave a hole no resume accepts
//   ("step 8 does not follow step 6"). So the log stops there: collect returns the later
//   steps' results without calling the hook or appending (a record of a step the log lacks
//   is what a resume cuts off anyway); step_async refuses new steps; a save is refused
//   unless the weights are at the log's end (they are past it once any step was lost), as
//   its manifest would pair weights with a log that does not reach them. The run directory
//   keeps its last checkpoint and a log that is a whole prefix, from which `--resume` runs
//   the lost steps again. A disk tier's write-backs wait for log lines (rule 1 above) that
//   will not come: they are let through, and a resume does not reuse an image past the
//   log's end (DiskTierOpen::max_step) — the block is read from its other image or rebuilt.

Session::~Session() {
  try {
    drain();
  } catch (const std::exception& e) {
    log_warn("session: {}", e.what());
  }
}

std::uint64_t Session::step_seed(std::int64_t step) const {
  return derive_step_seed(cfg_.run_seed, static_cast<std::uint64_t>(step));
}

std::int64_t Session::step_async(const HostBatch& batch, float lr, float eps, float weight_decay) {
  if (!cfg_.training)
    fail(ErrorKind::invalid_argument, "this session was opened for evaluation only");
  if (!(eps > 0)) fail(ErrorKind::invalid_argument, "eps must be positive (got {})", eps);
  if (!(lr >= 0)) fail(ErrorKind::invalid_argument, "the learning rate must be non-negative (got {})", lr);
  require_targets(batch);  // nothing to predict: refused before the step index moves
  validate_rule(cfg_.rule, weight_decay);
  const std::int64_t t = next_step_;
  if (t > kMaxSeedLogStep)  // (adversarial pass 57: the steps past it made a log nothing reads)
    fail(ErrorKind::invalid_argument, "step {} is refused: a run ends by step 2^53 = {} (the last step a seed log names)",
         t, kMaxSeedLogStep);
  if (seed_log_ && log_stopped_at_ >= 0)  // Note [A stopped seed log]
    fail(ErrorKind::io, "step {} is refused: {}; resume the run from its last checkpoint", t + 1, log_stopped_message());
  if (store_->disk() && seed_log_) {
    // Note [Disk tier resume]: a disk write-back of step t's pass waits for the log line of
    // step t − 1, which wait() writes. A host that enqueues steps without reading their
    // results would stall it, so results more than two steps old are read here (wait returns
    // them later); zo-sgd-cons reads step t's losses inside step t, so every earlier result
    // is read first.
    harvest_before(cfg_.rule.host_sync() ? t : t - 2);
  }
  StepParams p;
  p.step = t;
  p.seed = step_seed(t);
  p.lr = lr;
  p.eps = eps;
  p.weight_decay = weight_decay;
  const ParallelLayout& layout = cfg_.parallel;
  if (layout.data > 1 && cfg_.comm) {
    // Note [Parallel modes]: this rank's shard of the global batch, weighted by its share.
    const HostBatch shard = shard_batch(batch, rank_coord(layout, cfg_.comm->rank()).data, layout.data);
    scheduler_->step(shard, p, Scheduler::batch_weight(shard));
    global_tokens_[t] = batch.target_count();
  } else {
    scheduler_->step(batch, p);
  }
  outstanding_.push_back(t);
  ++next_step_;
  return t;
}

void Session::harvest_before(std::int64_t step) {
  std::vector<std::int64_t> old;
  for (std::int64_t s : outstanding_)
    if (s < step) old.push_back(s);
  std::sort(old.begin(), old.end());
  for (std::int64_t s : old) harvested_[s] = collect(s);
}

StepResult Session::wait(std::int64_t step) {
  // Note [Disk tier resume]: the log lines in step order, the earlier ones first (a later
  // step's compute may wait for them).
  if (store_->disk() && seed_log_) harvest_before(step);
  if (auto it = harvested_.find(step); it != harvested_.end()) {
    StepResult r = std::move(it->second);
    harvested_.erase(it);
    return r;
  }
  return collect(step);
}

StepResult Session::collect(std::int64_t step) {
  StepResult r = scheduler_->wait_result(step);
  if (auto it = global_tokens_.find(step); it != global_tokens_.end()) {
    r.tokens = it->second;
    global_tokens_.erase(it);
  }
  outstanding_.erase(std::remove(outstanding_.begin(), outstanding_.end(), step), outstanding_.end());
  if (r.update_skipped)
    log_warn("step {}: the projected gradient is not finite (L+ = {}, L- = {}); its update is skipped",
             step + 1, r.loss_plus, r.loss_minus);  // (numbered from 1, as the progress and --log-json)
  // zo-adam squares each element's u = g·z/q (+ wd·W) in fp32: past |u| ≈ 1.8e19 the square
  // is infinite, v' too, and that weight's steps m'/√v' are 0 from then on. The save refuses
  // such state (BlockStore::check_state_finite); say so when it starts, not only there.
  if (cfg_.rule.kind == RuleKind::adam && !r.update_skipped && !adam_overflow_said_) {
    float largest = 0;
    for (float g : r.gs) largest = std::max(largest, std::fabs(g) / static_cast<float>(r.gs.size()));
    if (largest * 6.0f > 1.8e19f) {  // |z| reaches 6 among millions of normal draws
      adam_overflow_said_ = true;
      log_warn("step {}: the projected gradient {} is so large that zo-adam's second moment overflows to infinity "
               "(its square passes 3.4e38 where |g·z| > 1.8e19): the weights there stop moving (with fp8 state, whose "
               "row scale cannot hold an infinity, they turn NaN) and the save will refuse the state or the weights; "
               "the losses (L+ = {}) are huge: a weight that overflows the forward pass?",
               step + 1, r.g, r.loss_plus);
    }
  }
  // L+ == L− exactly, step after step: g = 0 and the weights do not move. An eps whose
  // perturbation is below the storage dtype's resolution of the weights (1e-10 in fp32, 1e-5
  // in bf16; 1e-45 anywhere) does that; a run said nothing and trained nothing (adversarial
  // pass 66). Said once a session.
  if (!r.update_skipped && std::all_of(r.gs.begin(), r.gs.end(), [](float g) { return g == 0.0f; })) {
    flat_steps_ = std::min(flat_steps_ + 1, kFlatStepsToWarn);
    if (flat_steps_ == kFlatStepsToWarn && !flat_said_) {
      flat_said_ = true;
      log_warn("steps {}..{}: L(θ + eps·z) and L(θ − eps·z) were equal in each (g = 0), so the weights did not move: "
               "eps {} may be too small to change the loss through {} weights (MeZO uses 1e-3), or the loss is "
               "saturated",
               step + 2 - kFlatStepsToWarn, step + 1, r.eps, dtype_name(cfg_.storage));
    }
  } else {
    flat_steps_ = 0;
  }
  if (cfg_.rule.kind == RuleKind::cons && !r.update_skipped)
    log_debug("step {}: zo-sgd-cons losses L(θ) {} L(θ−lr·g·z) {} L(θ+lr·g·z) {}: choice {}", step, r.cons_losses[0],
              r.cons_losses[1], r.cons_losses[2], r.choice);
  // Tests only (tests/fault/records.sh): SIGKILL just before or just after step N's log line,
  // ZO2_TEST_KILL_AT_LOG_LINE=N:before|after.
  static const std::pair<std::int64_t, bool> kill_at = [] {
    const char* v = std::getenv("ZO2_TEST_KILL_AT_LOG_LINE");
    const char* colon = v ? std::strchr(v, ':') : nullptr;
    if (!colon) return std::pair<std::int64_t, bool>{-1, false};
    return std::pair<std::int64_t, bool>{std::atoll(v), std::strcmp(colon + 1, "after") == 0};
  }();
  // Note [A stopped seed log]: a step after the one the log lacks is neither recorded nor logged.
  if (seed_log_ && log_stopped_at_ >= 0) return r;
  try {
    if (result_hook_) result_hook_(r);
  } catch (const std::exception& e) {
    if (seed_log_) stop_log(r.step, fmt::format("the result hook failed at step {}: {}", r.step + 1, e.what()));
    throw;
  } catch (...) {
    if (seed_log_) stop_log(r.step, fmt::format("the result hook failed at step {}", r.step + 1));
    throw;
  }
  if (r.step == kill_at.first && !kill_at.second) std::raise(SIGKILL);
  if (seed_log_) {
    SeedLogEntry e;
    e.step = r.step;
    e.seed = r.seed;
    e.g = r.g;
    e.lr = r.lr;
    e.eps = r.eps;
    e.wd = r.weight_decay;
    e.g_double = r.g_double;
    if (r.gs.size() > 1) e.gs = r.gs;
    e.choice = r.choice;
    try {
      seed_log_->append(e);  // (on failure the log is cut back to the lines before this one)
    } catch (const std::exception& x) {
      stop_log(r.step, x.what());
      throw;
    }
    if (DiskTier* disk = store_->disk()) {
      // Note [Disk tier resume], rule 1: the line is durable before an image that needs it.
      try {
        seed_log_->sync();
      } catch (const std::exception& x) {
        stop_log(r.step + 1, x.what());  // the line is there, not known durable
        throw;
      }
      disk->set_durable(static_cast<std::uint64_t>(r.step) + 1);
    }
  }
  if (r.step == kill_at.first && kill_at.second) std::raise(SIGKILL);
  return r;
}

void Session::stop_log(std::int64_t step, std::string why) noexcept {
  if (log_stopped_at_ >= 0) return;  // the first stop is where the log ends
  log_stopped_at_ = step;
  log_stop_reason_ = std::move(why);
  // The tier's write-backs must not wait for lines that will not come (Note [A stopped seed log]).
  if (DiskTier* disk = store_ ? store_->disk() : nullptr) disk->set_durable(std::numeric_limits<std::uint64_t>::max());
}

std::string Session::log_stopped_message() const {
  return fmt::format("the seed log {} stopped before step {} ({}); the steps from there are in no log", seed_log_->path().string(),
                     log_stopped_at_ + 1, log_stop_reason_);
}

StepResult Session::step(const HostBatch& batch, float lr, float eps, float weight_decay) {
  return wait(step_async(batch, lr, eps, weight_decay));
}

void Session::drain() {
  while (!outstanding_.empty()) wait(outstanding_.front());
}

float Session::eval(const HostBatch& batch, const EvalOptions& options) {
  // A loss over no target is 0/0: refused. Per-token losses (0 where there is no target)
  // are defined for any batch.
  if (!options.token_loss) require_targets(batch);
  drain();
  return scheduler_->eval(batch, options);
}

void Session::decode(const HostBatch& batch, int past, bool use_cache, float* logits) {
  drain();
  scheduler_->decode(batch, past, use_cache, logits);
}

void Session::sync() {
  drain();
  scheduler_->sync_to_host();
  if (node_comm_) node_comm_->barrier("the shared host image (every rank's slice home)");
}

void Session::check_not_loaded_from(const std::filesystem::path& out_dir) const {
  // A run continues into its own run directory; a plain checkpoint is never written over.
  if (!model_path_.empty() && !model_is_run_ && same_directory(out_dir, model_path_))
    fail(ErrorKind::invalid_argument,
         "{}: is the checkpoint this session was loaded from; saving there would overwrite it (and the base a seed "
         "log replays from): choose another directory",
         out_dir.string());
}

// Note [Save refusals up front]
//   Every refusal of a save that depends on the directory alone (the checkpoint this session
//   was loaded from, a plain checkpoint there, another run's seed log or checkpoint) is in
//   check_save_target, which a host that knows where it will save calls before its first
//   step: zo2-tune train once ran every step of a resumed session run and then had its save
//   refused (adversarial pass 53), the steps in its seed log and not in its checkpoint. save
//   runs the same checks again (the directory may have changed since).
void Session::check_save_target(const std::filesystem::path& out_dir, bool replace_checkpoint) const {
  check_not_loaded_from(out_dir);
  if (!is_writer()) return;
  // A training run's directory (its seed log) takes only that run's checkpoints: another
  // session's would leave the run's seed log and weights disagreeing (a resume there would
  // go on from weights its log does not describe).
  if (std::error_code ec; std::filesystem::exists(out_dir / kRunSeedLog, ec) &&
                          !(seed_log_ && std::filesystem::equivalent(seed_log_->path(), out_dir / kRunSeedLog, ec)))
    fail(ErrorKind::invalid_argument,
         "{}: holds a training run (its {}), which this session's checkpoint would replace: choose another directory",
         out_dir.string(), kRunSeedLog);
  // Nor any other checkpoint: a plain one (another model's weights, a merged checkpoint) is
  // replaced only when the caller was asked to.
  if (!replace_checkpoint && !holds_run(out_dir))
    if (const auto files = foreign_checkpoint_files(out_dir); !files.empty())
      fail(ErrorKind::invalid_argument,
           "{}: holds a checkpoint ({}) that this session's save would replace: choose another directory",
           out_dir.string(), fmt::join(files, ", "));
  // Nor is a run's own checkpoint (its `current`, a step directory) ever a save's directory,
  // whoever's run it is: the save would nest a run inside it and replace its files with links
  // (adversarial pass 57: zo2_session_save(s, "R/current") destroyed R's published step).
  if (const std::filesystem::path run = run_of_checkpoint(out_dir); !run.empty()) {
    std::error_code ec;
    fail(ErrorKind::invalid_argument,
         "{}: is a checkpoint of the {} {} (one of its step directories), which this session's save would replace: "
         "a save goes into the run directory itself",
         out_dir.string(), std::filesystem::exists(run / kRunSeedLog, ec) ? "training run" : "run in", run.string());
  }
  // A run directory written by another session (its seed log elsewhere, or none) is that
  // session's run: a save of this one would replace its checkpoint, as another run's seed
  // log beside it would be (adversarial pass 50: two sessions saving to one directory took
  // turns replacing each other's checkpoints, with no error). Its manifest says whose it is.
  // A session loaded from that run directory continues its run (a CLI --resume of a session's
  // run continues the session's seed log in a copy of its own). An adapter run is loaded from
  // its base and its adapter: a training session's adapter directory is the run's
  // (adversarial pass 53: a LoRA session run resumed in place trained every step and then had
  // its save refused); a replay that starts from a run's adapter is no continuation of it.
  auto within = [&](const std::filesystem::path& dir) {  // out_dir, its `current` or a step directory of it
    std::error_code ec;
    const std::filesystem::path p = std::filesystem::weakly_canonical(std::filesystem::absolute(dir, ec), ec);
    return same_directory(dir, out_dir) || (!ec && same_directory(p.parent_path(), out_dir));
  };
  const bool from_adapter_run = cfg_.training && adapter_is_run_ && within(cfg_.adapter_dir);
  const bool continues_run = (!model_path_.empty() && model_is_run_ && within(model_path_)) || from_adapter_run;
  // Note [A run continues from where it was loaded]
  // ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
  // A session loaded from a run continues it only from the step it was loaded at, and no save
  // takes a run back to an earlier step. A notebook cell re-run — Session("out/run") without
  // first_step, a step, save("out/run") — replaced step 6's checkpoint (its optimizer state,
  // its seed log record) with a "step 1" whose step re-used step 0's seed, and nothing could
  // resume or replay the run any more (adversarial pass 70). zo2-tune's --resume sets
  // first_step itself; a host sets first_step (with resume_state, and seed_log_append for a
  // logged run) to the step it loaded.
  const std::int64_t start = cfg_.replay.empty() ? cfg_.first_step : cfg_.replay.front().step;
  const std::int64_t loaded = from_adapter_run ? adapter_loaded_step_ : model_loaded_step_;
  if (continues_run && loaded >= 0 && start != loaded)
    fail(ErrorKind::invalid_argument,
         "{}: this session was loaded from step {} of this run but started at step {} (first_step), so its checkpoint "
         "would replace the run's with one of another history: save to another directory, or load the run with "
         "first_step {} (and resume_state, and seed_log_append for a run with a seed log) to continue it",
         out_dir.string(), loaded, start, loaded);
  if (holds_run(out_dir) && !replace_checkpoint) {  // (--overwrite: replaced as asked)
    std::int64_t theirs = -1;
    try {
      theirs = saved_step_of(out_dir);
    } catch (const Error&) {  // a damaged run directory: the publish below says what is wrong
    }
    if (theirs > next_step_)
      fail(ErrorKind::invalid_argument,
           "{}: holds step {} of its run, later than this session's step {}: a save would take the run back, replacing "
           "that checkpoint (and what its seed log records after step {}): choose another directory",
           out_dir.string(), theirs, next_step_, next_step_);
  }
  if (holds_run(out_dir) && !continues_run) {
    std::optional<OpenedCheckpoint> theirs;
    try {
      theirs = open_checkpoint(out_dir);
    } catch (const Error&) {  // a damaged run directory: the publish below says what is wrong
    }
    if (theirs && theirs->state.is_object()) {
      std::error_code ec;
      const bool same_log = seed_log_ && !theirs->seed_log.empty() &&
                            std::filesystem::equivalent(theirs->seed_log, seed_log_->path(), ec);
      const auto seed = theirs->state.find("run_seed");
      const bool same_unlogged = !seed_log_ && theirs->seed_log.empty() && seed != theirs->state.end() &&
                                 seed->is_number_unsigned() && seed->get<std::uint64_t>() == cfg_.run_seed;
      if (!same_log && !same_unlogged)
        fail(ErrorKind::invalid_argument,
             "{}: holds the checkpoint of another run (run seed {}, {}), which this session's save would replace: "
             "choose another directory",
             out_dir.string(), seed != theirs->state.end() ? seed->dump() : std::string("unknown"),
             theirs->seed_log.empty() ? std::string("no seed log")
                                      : fmt::format("seed log {}", theirs->seed_log.string()));
    }
  }
}

SaveRoom Session::save_room(DType dtype, std::uint64_t shard_bytes, const SaveExtras& extras, bool any_step) const {
  // Note [Room for a save] (runtime/file_util.h): what Session::save writes, bounded above.
  const auto weights = [&](DType as) {
    return adapters_ ? adapters_->save_bytes() : checkpoint_file_bytes(store_->config(), as, shard_bytes);
  };
  const std::uint64_t model = weights(dtype);
  const std::uint64_t state = adapters_ ? 0 : store_->state_file_bytes();  // an adapter run's is in save_bytes
  // The tokenizer and other files the caller adds, generation_config.json, and the manifest
  // (its per-file lines and the run's flags: 64 KiB and a line per file are ample).
  const std::uint64_t other = extras.extra_bytes + (generation_config_ ? generation_config_->size() : 0) +
                              (64 << 10) + extras.state.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).size();
  SaveRoom room;
  room.bytes = model + state + other;
  room.what = fmt::format("a checkpoint of {} ({} {}{}, other files {})",
                          any_step ? std::string("this run") : fmt::format("step {}", next_step_),
                          adapters_ ? "adapters" : fmt::format("weights as {}", dtype_name(dtype)),
                          format_bytes(static_cast<double>(model)),
                          state > 0 ? fmt::format(", optimizer state {}", format_bytes(static_cast<double>(state))) : "",
                          format_bytes(static_cast<double>(other)));
  room.ways_out = fmt::format("free space there, or choose another {} on a file system with room", extras.out_option);
  // A narrower dtype where the save can take one (an adapter run saves fp32 adapters).
  if (!adapters_ && dtype == DType::f32)
    room.ways_out += fmt::format(", or save narrower ({} bf16 needs {})", extras.dtype_option,
                                 format_bytes(static_cast<double>(weights(DType::bf16) + state + other)));
  return room;
}

void Session::check_save_room(const std::filesystem::path& out_dir, DType dtype, std::uint64_t shard_bytes,
                              const SaveExtras& extras) const {
  if (!is_writer()) return;
  require_room_for_save(out_dir, save_room(dtype, shard_bytes, extras, /*any_step=*/true));
}

void Session::save(const std::filesystem::path& out_dir, DType dtype, std::uint64_t shard_bytes,
                   const SaveExtras& extras) {
  check_not_loaded_from(out_dir);
  sync();
  // Note [A stopped seed log]: weights past the log's end would get a manifest whose log
  // prefix does not reach them; the run directory keeps its last checkpoint.
  if (seed_log_ && log_stopped_at_ >= 0 && next_step_ != log_stopped_at_)
    fail(ErrorKind::io, "{}: not saved at step {}: {}; the directory keeps its last checkpoint, from which --resume runs "
         "them again", out_dir.string(), next_step_, log_stopped_message());
  if (!is_writer()) {
    // Rank 0 writes the checkpoint (every rank holds the same weights); the others wait for
    // it, so no rank runs ahead of a save that fails (Note [Rank faults]).
    cfg_.comm->barrier(fmt::format("the checkpoint of step {}", next_step_));
    return;
  }
  check_save_target(out_dir, extras.replace_checkpoint);
  try {
    // What a load would refuse is not saved: non-finite weights, adapters or rule state.
    // (The scans, and the save below, with the device's threads: Note [Kernel threads].)
    device_->run_host_parallel([&] {
      if (adapters_) {
        adapters_->check_finite();
      } else {
        store_->check_finite(dtype);
        store_->check_state_finite();
      }
    });
  } catch (const Error& e) {
    fail(e.kind(), "{}: not saved at step {}: {}", out_dir.string(), next_step_, e.what());
  }
  // Note [A resume from a rounded checkpoint] (tools/cmd_train.cpp): said on every save of a
  // run (the CLI's and a host's alike).
  if (seed_log_ && !adapters_ && dtype != DType::f32 && dtype != cfg_.storage)
    log_warn("{}: the checkpoint is saved as {} but the weights are {}: a resume from it goes on from the rounded "
             "weights, not those of the run that was saved",
             out_dir.string(), dtype_name(dtype), dtype_name(cfg_.storage));
  PublishRequest r;
  r.step = next_step_;
  r.state = extras.state.is_object() ? extras.state : nlohmann::json::object();
  r.state["run_seed"] = cfg_.run_seed;
  r.state["storage_dtype"] = std::string(dtype_name(cfg_.storage));
  r.state["save_dtype"] = std::string(dtype_name(dtype));
  // Note [A resume from a rounded checkpoint]: roundings the log has not recorded yet.
  if (seed_log_ && !seed_log_->pending_loaded_as().empty()) r.state["rounded_pending"] = seed_log_->pending_loaded_as();
  r.state["optimizer"] = rule_to_json(cfg_.rule);
  if (cfg_.peft.any()) r.state["peft"] = peft_to_json(cfg_.peft);
  if (seed_log_) {
    seed_log_->sync();  // the log lines this checkpoint needs reach the disk before it is published
    r.seed_log = seed_log_->path();
    r.seed_log_position = seed_log_->position();
  }
  r.write = [&](const std::filesystem::path& dir) {
    if (adapters_) {
      // A LoRA run saves its adapter (PEFT's layout), not the frozen base.
      adapters_->save_peft(dir, cfg_.base_model);
      if (adapters_->state().buffers > 0) adapters_->save_state(dir / kOptimizerStateFile);
    } else {
      store_->save(dir, dtype, shard_bytes);
      if (store_->state().buffers > 0) store_->save_state(dir / kOptimizerStateFile);
    }
    if (extras.extra_files) extras.extra_files(dir);
    // How transformers' generate() runs the model (its EOS ids, sampling defaults): the
    // model's, whoever's tokenizer files extra_files copied.
    if (generation_config_) write_file_atomic(dir / kGenerationConfig, *generation_config_);
  };
  r.room = save_room(dtype, shard_bytes, extras);  // checked before anything is written
  device_->run_host_parallel([&] { publish_checkpoint(out_dir, r); });
  if (cfg_.comm && cfg_.comm->size() > 1) cfg_.comm->barrier(fmt::format("the checkpoint of step {}", next_step_));
}

std::size_t Session::device_peak() const { return device_->arena().peak(); }

}  // namespace zo2
