// A Session: one model on one device, tuned step by step. It owns the device, the host
// block store and the scheduler, derives step seeds from the run seed, and writes the seed
// log. The C API (include/zo2.h) and zo2-tune are both built on this class, so neither
// can lag behind the other.
#pragma once
#include "api/run_dir.h"
#include "models/batch.h"
#include "offload/block_store.h"
#include "offload/planner.h"
#include "offload/scheduler.h"
#include "runtime/device.h"
#include "models/peft.h"
#include "offload/adapter_store.h"
#include "zo/rule.h"
#include "zo/seed_log.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

namespace zo2 {

// The rule's optimizer state in a checkpoint directory (beside the weights).
inline constexpr const char* kOptimizerStateFile = "optimizer_state.safetensors";

struct SessionConfig {
  std::string device = "cpu";      // cpu | cuda | cuda:N | auto
  std::size_t gpu_mem = 0;         // device memory cap in bytes; 0 = the whole device (the
                                   // arena then keeps only the plan's bytes: session.cpp)
  OffloadMode offload = OffloadMode::auto_;
  int window = 3;
  // Note [Sub-block streaming] (offload/scheduler.h): 0 = auto (whole blocks when the
  // window's smallest size fits the cap, else weight tiles), −1 = whole blocks only (--tile
  // off), > 0 = stream by weight tiles of at most this many bytes of storage.
  std::int64_t tile = 0;
  DType storage = DType::f32;
  DType compute = DType::f32;
  RuleConfig rule;                 // the update rule (zo/rule.h); default: today's ZO-SGD. Its
                                   // state (if any) is allocated beside the weights.
  // Resume: read the rule's state from the checkpoint's optimizer_state.safetensors (a
  // rule with state only; Error(format) naming the file when it is missing or mismatched).
  bool resume_state = false;
  // LoRA (models/peft.h, Note [LoRA under ZO]): adapters the rule trains alone, the base
  // frozen. adapter_dir: start from (or evaluate) the adapter saved there, in PEFT's layout
  // (its adapter_config.json decides peft); else adapters are initialized from run_seed.
  PeftConfig peft;
  std::filesystem::path adapter_dir;
  int max_batch = 1;               // capacity of the activations: sequences ×
  int max_seq = 0;                 // tokens per sequence (0 = max_position_embeddings)
  bool training = true;            // false: evaluation only (one branch, less memory)
  bool logits_out = false;         // room for full logits (forward)
  // Generation (api/generate.h): generate.batch sequences decoded together (≤ max_batch;
  // max_seq is then the positions of prompt and new tokens) and where the KV cache lives.
  GenerateRequest generate;
  GraphLimits limits;
  int threads = 0;                 // CPU threads (0 = all)
  std::uint64_t run_seed = 0;
  std::filesystem::path seed_log;  // empty: no seed log
  bool seed_log_append = false;    // resume: continue the existing log
  std::string base_model;          // recorded in the seed log header
  std::string seed_log_run_flags;  // the header's "run" (SeedLogHeader::run_flags); empty: none
  // A resume that changed the run's flags: the first entry appended carries them
  // (SeedLogEntry::run_flags; Note [A run's flags in its seed log]); empty: unchanged.
  std::string seed_log_run_update;
  std::int64_t first_step = 0;     // resume: the step to start at
  // Ranks (zo/parallel.h, Note [Parallel modes]; README "Many GPUs and nodes"): the
  // communicator of the job (not owned; nullptr = one process) and the layout, whose factors
  // multiply to comm->size(). Every rank opens the same model with the same config and
  // passes the same global batch to step(); a data-parallel session takes its own shard.
  // Rank 0 alone writes the seed log and checkpoints; the others wait for it (a fence).
  Comm* comm = nullptr;
  ParallelLayout parallel;
  // Ranks on one node share one host image of the weights (Note [One host image per node] in
  // offload/block_store.h); false gives each rank its own copy.
  bool share_host_image = true;
  // Note [Sliced upload] (offload/scheduler.cpp): each rank of a node uploads only its slice of
  // a streamed block and the node's devices exchange the rest (NCCL on CUDA). Needs the shared
  // host image and the same number of passes per step on every rank.
  bool sliced_upload = false;
  // The caller compared session_fingerprint across the ranks already (zo2-tune train, before
  // it writes --out): the session does not compute it again.
  bool ranks_agreed = false;
  // The disk tier (DESIGN.md §12; README "Models larger than host memory"): the host bytes
  // the master weights may take (0 = no cap); the streamed blocks beyond it live in a block
  // file in disk_dir, written back once they lag by disk_lag updates, carried by
  // disk_staging pinned buffers (0: window + 1). disk_file: the block file's options
  // (tests inject failures through it).
  std::size_t host_mem = 0;
  std::filesystem::path disk_dir;
  int disk_lag = 1;
  int disk_staging = 0;
  BlockFileOptions disk_file;
  // Note [Disk tier resume] (api/session.cpp): keep the disk images a killed run left in
  // disk_dir (where they belong to this run: seed log, model, blocks) instead of rewriting
  // them from the loaded checkpoint, and bring the whole model to first_step by applying
  // `replay` — the seed log's entries from the checkpoint's step to first_step − 1 — right
  // after loading: each disk image from the step it holds, everything else from the
  // checkpoint's. With an empty `replay` the loaded weights are at first_step.
  bool disk_resume = false;
  std::vector<SeedLogEntry> replay;
  // Tests only: fault injection (offload/scheduler.h) and slow CPU copies.
  SchedulerFault fault = SchedulerFault::none;
  int debug_copy_delay_us = 0;
};

// The request a planner sees for this session config: with a parallel layout, one rank's
// (its passes; its slice of the write-back when `node_ranks` share one host image).
PlanRequest plan_request(const ModelConfig& model, const SessionConfig& cfg, DeviceKind kind,
                         std::size_t cap, int node_ranks = 1);

// Note [One job] (runtime/comm.h): what the ranks of a training session compare before it
// loads anything — the model's config and its weights' fingerprint (checkpoint_fingerprint;
// the adapter's too), the update rule, tuned parameters, dtypes, run seed, first step and layout.
std::vector<RankPart> session_fingerprint(const std::filesystem::path& model_path, const SessionConfig& cfg);

// A checkpoint's weights fingerprint (hex): every tensor's name, dtype, shape and its first,
// middle and last 64 bytes — two checkpoints of one shape (another seed, a tuned copy) differ
// in it, the same weights resharded do not; a fingerprint, not a checksum. What a seed log
// records of its base ("base_fingerprint"), for replay and a LoRA resume to check.
std::string checkpoint_fingerprint(const std::filesystem::path& dir);
// An adapter directory's fingerprint (hex): the CRC-32 of its whole adapter_model.safetensors
// (an adapter is small; a run directory is read through its current checkpoint). What a seed
// log records of the adapter its run started from ("adapter_fingerprint"), for replay.
std::string adapter_fingerprint(const std::filesystem::path& dir);

// What a parallel layout means for one rank and one node (zo2-tune plan --parallel,
// zo2_plan_parallel): each rank's placement beside one process's, the share of the forward
// work and of the traffic each rank has, and the host memory of a node.
struct ParallelPlan {
  ParallelLayout layout;
  int ranks_per_node = 1;
  bool shared_image = true;
  Placement rank;                   // one rank (the device memory each GPU needs)
  Placement single;                 // the same run in one process
  int batch_per_rank = 0;           // sequences (or examples) of the global batch per rank, at most
  double forward_share = 1;         // a rank's forward work / one process's
  std::size_t host_bytes_per_node = 0;
  std::string describe() const;
};
ParallelPlan plan_parallel(const ModelConfig& model, const SessionConfig& cfg, DeviceKind kind, std::size_t cap,
                           int ranks_per_node);

class Session {
 public:
  // Loads an HF checkpoint directory.
  Session(const std::filesystem::path& model_dir, const SessionConfig& cfg);
  // Uses weights synthesized in memory (benchmarks): random init, optionally aliased blocks.
  Session(const ModelConfig& model, const SessionConfig& cfg, std::uint64_t init_seed,
          bool alias_blocks);
  ~Session();

  const ModelConfig& config() const { return store_->config(); }
  const Placement& placement() const { return scheduler_->placement(); }
  Device& device() { return *device_; }
  BlockStore& store() { return *store_; }
  AdapterStore* adapters() { return adapters_.get(); }
  Scheduler& scheduler() { return *scheduler_; }
  const SessionConfig& session_config() const { return cfg_; }

  std::int64_t next_step() const { return next_step_; }
  // Resume: the next step to run (its seed and batch follow from it).
  void set_next_step(std::int64_t step) { next_step_ = step; }
  std::uint64_t step_seed(std::int64_t step) const;

  // Enqueues step next_step() and returns its index without waiting.
  std::int64_t step_async(const HostBatch& batch, float lr, float eps, float weight_decay);
  // The result of an enqueued step; appends it to the seed log.
  StepResult wait(std::int64_t step);
  // Called with each step's result as it is collected, in step order, before the step's
  // seed-log line is written (Note [Records before the log line]); empty: none. If it
  // throws, the seed log stops before that step (Note [A stopped seed log]).
  void set_result_hook(std::function<void(const StepResult&)> hook) { result_hook_ = std::move(hook); }
  // step_async + wait.
  StepResult step(const HostBatch& batch, float lr, float eps, float weight_decay);
  float eval(const HostBatch& batch, const EvalOptions& options = {});
  // Generation's forward (Scheduler::decode) after any outstanding steps; api/generate.h.
  void decode(const HostBatch& batch, int past, bool use_cache, float* logits);
  // Waits for outstanding steps, flushes the pending update, and publishes an HF checkpoint
  // into the run directory out_dir as one transaction (api/run_dir.h): the checkpoint, the
  // manifest (`state` plus the step, the files and the seed log's prefix) and, through
  // `extra_files`, anything else that belongs with it (tokenizer files). The model
  // directory's generation_config.json (as it was when the session loaded it) is written
  // after extra_files: it belongs to the model, not to a tokenizer's directory. Non-finite
  // weights are refused (Error(format) naming the tensor) and out_dir keeps its previous
  // checkpoint.
  static constexpr const char* kGenerationConfig = "generation_config.json";
  struct SaveExtras {
    nlohmann::json state = nlohmann::json::object();
    std::function<void(const std::filesystem::path& dir)> extra_files;
    // The caller was asked to replace a plain checkpoint in out_dir (--overwrite); otherwise
    // a save refuses one (foreign_checkpoint_files).
    bool replace_checkpoint = false;
    // The bytes extra_files writes, counted in the room a save needs (Note [Room for a save]
    // in runtime/file_util.h).
    std::uint64_t extra_bytes = 0;
    // How a refusal for room names the caller's choices: the directory and the save dtype
    // (zo2-tune: "--out", "--save-dtype"; the C API's and Python's names by default).
    std::string out_option = "out_dir";
    std::string dtype_option = "save_dtype";
  };
  void save(const std::filesystem::path& out_dir, DType dtype, std::uint64_t shard_bytes,
            const SaveExtras& extras);
  void save(const std::filesystem::path& out_dir, DType dtype, std::uint64_t shard_bytes) {
    save(out_dir, dtype, shard_bytes, SaveExtras{});
  }
  // The refusals of a save into out_dir that depend on the directory alone (whose run or
  // checkpoint it holds), without saving: a host that knows where it will save calls it
  // before its first step (Note [Save refusals up front]). Rank 0's; a no-op on the others
  // but for the checkpoint the session was loaded from.
  void check_save_target(const std::filesystem::path& out_dir, bool replace_checkpoint) const;
  // What one save (as dtype, sharded above shard_bytes, with extras) writes: a bound on its
  // bytes — the weights (or the adapters), the optimizer state, extras.extra_bytes and the
  // small files — and a refusal's words for them (Note [Room for a save] in
  // runtime/file_util.h). save checks it before writing anything (publish_checkpoint). The
  // words name the next step's checkpoint, or with any_step "a checkpoint of this run".
  SaveRoom save_room(DType dtype, std::uint64_t shard_bytes, const SaveExtras& extras, bool any_step = false) const;
  // Error(io) when out_dir's file system cannot hold one save (require_room_for_save): a host
  // that saves calls it before its first step, so that a disk too small is said at once, not
  // at the first save hours later. Rank 0's; a no-op on the others.
  void check_save_room(const std::filesystem::path& out_dir, DType dtype, std::uint64_t shard_bytes,
                       const SaveExtras& extras) const;
  // Waits for outstanding steps and flushes the pending update into the host store. With a
  // shared host image, collective over the node's ranks (they fence once every slice is home).
  void sync();
  // This process writes the run's files (rank 0, or the only process).
  bool is_writer() const { return !cfg_.comm || cfg_.comm->rank() == 0; }
  std::size_t device_peak() const;

 private:
  void init(const SessionConfig& cfg);
  void open_adapters(const ModelConfig& model);
  void check_cpu_host_memory(const ModelConfig& model, const Placement& plan, const StateSpec& state) const;
  void open_node_comm();
  void check_resume_step(const std::filesystem::path& model_path) const;
  void check_not_loaded_from(const std::filesystem::path& out_dir) const;
  void check_disk_dir_placement() const;
  void fit_arena_to(const Placement& plan);
  // The disk tier of a plan (nullopt when every block fits in RAM); checks the options
  // the tier cannot serve.
  std::optional<DiskPlacement> disk_placement(const ModelConfig& model, const Placement& plan) const;
  void drain();

  SessionConfig cfg_;
  std::unique_ptr<Comm> node_comm_;   // shared host image: the node's ranks (outlives store_)
  std::filesystem::path model_path_;  // the directory given (empty: synthesized weights)
  bool model_is_run_ = false;         // it is a run directory (read through its current checkpoint)
  bool adapter_is_run_ = false;       // cfg_.adapter_dir is a run directory or one of its checkpoints
  // The step of the run checkpoint loaded as the model / as the adapter (its manifest), -1
  // where none says (Note [A run continues from where it was loaded]).
  std::int64_t model_loaded_step_ = -1, adapter_loaded_step_ = -1;
  // The model directory's generation_config.json, read at load: a run's step directory it
  // came from is removed by the run's next save, before the save after that.
  std::optional<std::string> generation_config_;
  std::unique_ptr<Device> device_;
  std::unique_ptr<BlockStore> store_;
  std::unique_ptr<AdapterStore> adapters_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<SeedLogWriter> seed_log_;
  std::int64_t next_step_ = 0;
  std::vector<std::int64_t> outstanding_;
  // Note [Disk tier resume]: results read early by step_async (their log lines written), for wait.
  std::map<std::int64_t, StepResult> harvested_;
  std::function<void(const StepResult&)> result_hook_;
  // Note [A stopped seed log]: the step whose line the log lacks (−1: the log is whole), and why.
  std::int64_t log_stopped_at_ = -1;
  std::string log_stop_reason_;
  void stop_log(std::int64_t step, std::string why) noexcept;
  std::string log_stopped_message() const;
  bool adam_overflow_said_ = false;  // the warning of Session::collect, once a session
  static constexpr int kFlatStepsToWarn = 16;  // steps in a row with g = 0 before Session::collect says so
  int flat_steps_ = 0;
  bool flat_said_ = false;
  StepResult collect(std::int64_t step);
  void harvest_before(std::int64_t step);  // collects every outstanding step below `step`, in order
  std::map<std::int64_t, std::int64_t> global_tokens_;  // data parallel: a step's tokens over every shard
};

}  // namespace zo2
