// Shared pieces of zo2-tune's subcommands: option parsing helpers, reading token tensors,
// progress output. Each subcommand lives in its own cmd_*.cpp and registers itself.
#pragma once
#include "models/config.h"
#include "models/tokenizer.h"
#include "tools/dataset.h"
#include "runtime/dtype.h"
#include "api/session.h"
#include "zo/rule.h"

#include <CLI/CLI.hpp>

#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace zo2 {
struct SessionConfig;  // api/session.h
}  // namespace zo2

namespace zo2::cli {

// Each subcommand: adds its options to `app` and returns the function that runs it.
using Runner = std::function<int()>;
Runner add_forward(CLI::App& app);
Runner add_init(CLI::App& app);
Runner add_plan(CLI::App& app);
Runner add_train(CLI::App& app);
// An embedding host (Python's zo2.train) says why it stops a running train, before it asks
// the stop through train's SIGINT handler: the log then names that reason, not the signal.
// Cleared when a train starts.
void set_train_stop_reason(std::string reason);
// The signal that stopped the last train (Note [Stop signals]), 0 when none did.
int train_stop_signal();
Runner add_eval(CLI::App& app);
Runner add_replay(CLI::App& app);
Runner add_merge(CLI::App& app);
Runner add_synth_data(CLI::App& app);
Runner add_tokenize(CLI::App& app);
Runner add_data(CLI::App& app);
Runner add_generate(CLI::App& app);

// "fp32"/"bf16"/... → DType, restricted to `allowed`; Error(invalid_argument) naming the flag.
DType parse_dtype_flag(const std::string& flag, const std::string& value,
                       std::initializer_list<DType> allowed);

// An output file is checked before any work, so that hours of generation are not lost to
// a typo: refused (naming `flag`) when `out` is a directory (exit 2), or its directory
// could not be made or written (the nearest existing ancestor is a file or not writable),
// or it exists read-only (exit 1). Nothing is created: the writer makes the directories.
void check_output_file(const char* flag, const std::filesystem::path& out);

// A checkpoint directory `out` (init, replay, merge) never replaces a user's weights
// unasked: refused (exit 2, naming what is there) when it holds a training run or is one
// of a run's checkpoints (RUN/current, RUN/step-N: always), or already holds a checkpoint
// (unless `overwrite`). Call before any work.
void refuse_replacing_checkpoint(const std::filesystem::path& out, bool overwrite);

// An output directory a command is about to create (train, replay): destroyed before keep(),
// it is removed again with the parents it made if it holds nothing but zo2's lock file, so a
// refused command leaves no empty directory behind. Declare it before the directory's
// RunDirLock, which is then released first; only the process that writes it (rank 0).
class NewOutputDir {
 public:
  explicit NewOutputDir(const std::filesystem::path& dir);
  ~NewOutputDir();
  NewOutputDir(const NewOutputDir&) = delete;
  NewOutputDir& operator=(const NewOutputDir&) = delete;
  void keep() { made_.clear(); }

 private:
  std::vector<std::filesystem::path> made_;  // dir and the parents it will make, innermost first
};

// The output file `out` opened for writing (truncated), its directories made; fails naming
// `flag` and the reason.
std::ofstream open_output_file(const char* flag, const std::filesystem::path& out);

// Output flags never replace what the command reads: refuses (exit 2, naming `flag`) an
// `out` that is one of `inputs` or a file of one of `dirs` (the checkpoint, the run
// directory that names it, the adapter); and checks `out` as check_output_file does. Call
// before any work.
void refuse_output_over_inputs(const char* flag, const std::filesystem::path& out,
                               std::initializer_list<std::filesystem::path> inputs,
                               std::initializer_list<std::filesystem::path> dirs);

// A real flag value in [lo, hi] (lo excluded when `open_lo`), finite: CLI11's Range lets NaN
// through (every comparison with it is false).
CLI::Validator finite_range(double lo, double hi, bool open_lo = false);

// A seed flag's value: digits only, below 2^64, read as decimal (CLI11 would wrap -1 to
// 2^64 - 1, saturate larger numbers and read 010 as octal, so two different values would
// give one seed). A transform: use with ->transform(seed_value()).
CLI::Validator seed_value();

// Note [Decimal integers]
//   CLI11 2.1 reads an integer flag's text with strtoll(…, 0): "010" is octal 8 and "0x10"
//   hex 16 (`--steps 010` ran 8 steps), and a value beyond 64 bits saturates, so a refusal
//   named 9223372036854775807 instead of what was typed. Every integer option of `app` and
//   its subcommands (not seeds: seed_value) first goes through a transform that takes
//   decimal digits only, with an optional sign and blanks around them, drops leading zeros,
//   and refuses a value beyond 64 bits naming it as written. Called once the options are declared.
void decimal_integer_options(CLI::App& app);

// Note [Empty values]
//   A flag given with an empty value (`--disk-dir ""`, `--eval "$DEV"` with DEV unset) was
//   taken as the flag left out where its default is the empty string — --disk-dir, --eval,
//   --log-json, --gpu-mem, --host-mem, --parallel, --tokenizer, --adapter: the run went on
//   without the disk tier, the evaluation or the log the command asked for, and said nothing
//   — while other flags refused it in words of their own ("--lr-schedule:  not in {…}").
//   Every option that takes a value, of `app` and its subcommands (but --prompt and --text,
//   whose empty text is a request: the BOS alone, the special tokens alone), now refuses an empty one
//   first, naming the flag (a usage error, exit 2): "--eval: an empty value (an unset shell
//   variable?): give one, or leave the flag out". zo2.train's keywords go through the same
//   check (an empty string is no None). Called once the options are declared, and after
//   decimal_integer_options (the transform added last runs first).
void non_empty_values(CLI::App& app);

// The documented rule of an integer flag from api/options.cpp as it refuses `value` ("must be
// an integer in [1, 2^53]"), or "" when the flag has none or accepts the value.
std::string documented_integer_rule(const CLI::Option& opt, std::int64_t value);

// Options every subcommand that runs a model shares.
struct DeviceFlags {
  std::string device = "cpu";
  std::string gpu_mem;       // empty = whole device
  std::string offload = "auto";
  int window = 3;
  std::string tile = "auto";  // Note [Sub-block streaming]: auto | off | SIZE
  std::string storage = "fp32";
  std::string compute = "fp32";
  int threads = 0;
  // The disk tier (DESIGN.md §12): --host-mem, --disk-dir, --disk-lag, --disk-staging.
  std::string host_mem;  // empty = no cap
  std::string disk_dir;
  int disk_lag = 1;
  int disk_staging = 0;
  CLI::Option *disk_lag_flag = nullptr, *disk_staging_flag = nullptr;  // given: count() > 0
  CLI::Option* storage_flag = nullptr;
  void add(CLI::App& app);
};

// An adapter run (sc.adapter_dir, a LoRA or prefix run directory) trained on a base stored
// as bf16, fp16 or fp8: its adapters fit that base, not the full-precision one, so eval,
// forward and generate load the base the same way unless --storage-dtype is given (said
// with an info line; adversarial pass 53: `eval --model RUN` of an fp8 run gave another
// loss than the run's own evaluation).
void use_the_adapter_runs_storage(const DeviceFlags& flags, SessionConfig& sc);

// --adapter naming a full fine-tuning checkpoint (or a run of one): refused, saying to pass it
// as --model (its missing adapter_config.json was the message). tools/cmd_common.cpp.
void refuse_full_checkpoint_as_adapter(const std::string& adapter);

// The update rule (zo/rule.h): --optimizer and its hyper-parameters (train, plan).
struct RuleFlags {
  std::string optimizer = "zo-sgd";
  int directions = 1;
  std::string difference = "central";
  double momentum = 0.9, beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;
  std::string state_dtype = "fp32";
  CLI::Option *optimizer_flag = nullptr, *directions_flag = nullptr, *difference_flag = nullptr,
              *momentum_flag = nullptr, *beta1_flag = nullptr, *beta2_flag = nullptr, *adam_eps_flag = nullptr,
              *state_dtype_flag = nullptr;
  void add(CLI::App& app);
  bool any_given() const;
  // The flags as a RuleConfig, checked (validate_rule) with the run's weight decay.
  RuleConfig config(float weight_decay) const;
  // A resumed run's rule with the flags given again applied over it (the others stay the
  // run's): equal to `run` when they repeat the run's values.
  RuleConfig over(const RuleConfig& run, float weight_decay) const;

 private:
  void check_float_rounding() const;
};

// LoRA (models/peft.h): --lora, --lora-r, --lora-alpha, --lora-targets (train) and
// --adapter DIR (train, eval, forward: start from or evaluate a saved adapter).
struct LoraFlags {
  bool lora = false;
  int r = 8;
  double alpha = 16;
  std::string targets = "q_proj,v_proj";
  std::string adapter;
  bool prefix = false;  // --prefix-tuning
  int num_prefix = 5;   // --num-prefix (MeZO's)
  CLI::Option *prefix_flag = nullptr, *num_prefix_flag = nullptr;
  CLI::Option *lora_flag = nullptr, *r_flag = nullptr, *alpha_flag = nullptr, *targets_flag = nullptr,
              *adapter_flag = nullptr;
  void add(CLI::App& app, bool training);
  // Sets sc.peft and sc.adapter_dir from the flags, and — when `model` names an adapter
  // (a PEFT directory or a LoRA run directory) — makes `model` its base model
  // (adapter_config.json's base_model_name_or_path). Checked against the model's config.
  void apply(std::string& model, SessionConfig& sc) const;
};

// Options that say how a data file becomes batches (train and eval).
struct DataFlags {
  std::string task;             // --task: one of task_names() ("" = by the file)
  std::string tokenizer;        // --tokenizer DIR ("" = the model directory)
  int max_len = 0;              // --max-len
  std::string padding_side = "right";
  CLI::Option* max_len_flag = nullptr;  // to tell --max-len given from the default (0: none)
  void add(CLI::App& app);
  // These flags as DataOptions, with the sample size, seed and shuffling of the caller.
  DataOptions options(std::int64_t sample = 0, std::uint64_t seed = 0, bool shuffle = true) const;
};

// The tokenizer a data file needs: null for token-id (safetensors) data without a task;
// else loaded from --tokenizer or the model directory, with an error that says which
// directory was searched and how to point zo2-tune at another.
std::unique_ptr<Tokenizer> tokenizer_for_data(const std::filesystem::path& data, const DataFlags& flags,
                                              const std::filesystem::path& model_dir);

// The tokenizer files of a model directory (tokenizer.json, tokenizer.model,
// tokenizer_config.json, special_tokens_map.json, vocab.json, merges.txt, encoder.json,
// vocab.bpe, added_tokens.json, generation_config.json) copied into `to`, each written
// atomically. Returns how many were copied.
int copy_tokenizer_files(const std::filesystem::path& from, const std::filesystem::path& to);
// The bytes copy_tokenizer_files(from, ...) writes (Note [Room for a save]).
std::uint64_t tokenizer_files_bytes(const std::filesystem::path& from);
// The tokenizer files of a directory (name, bytes), read once, and their copy into another:
// a run reads its tokenizer when it starts, so its saves never depend on a directory that a
// later save may remove (a resumed run's starting step directory).
std::vector<std::pair<std::string, std::string>> read_tokenizer_files(const std::filesystem::path& from);
void write_tokenizer_files(const std::vector<std::pair<std::string, std::string>>& files,
                           const std::filesystem::path& to);

// Token ids [N, T] (+ optional attention_mask, labels) from a safetensors file, as int32.
struct TokenTensors {
  std::int64_t rows = 0;
  std::int64_t seq = 0;
  std::vector<std::int32_t> ids, mask, labels;  // mask/labels empty when absent
};
TokenTensors read_token_tensors(const std::filesystem::path& file);

// Before any data is read or anything written: the checkpoint in `model_dir` holds every
// tensor config.json implies, with its shape (headers only), and its master weights in
// `storage` fit the host memory (offload/block_store.h) — so a config.json that does not
// match its weights or the machine fails in milliseconds, naming the file and the numbers.
void check_model_fits(const std::filesystem::path& model_dir, const ModelConfig& config, DType storage);

// The cap a plan made before the device is opened should use: --gpu-mem, else on the CPU
// backend physical memory (what its arena takes without a cap), else (CUDA, whose free
// memory is known only once opened) no limit — the session plans again against the device.
std::size_t planning_cap(const SessionConfig& sc);

// Checks a directory can be created and written before any work starts.
void ensure_writable_dir(const std::filesystem::path& dir);

bool stderr_is_terminal();
// "42s", "3m07s", "5h04m", past 48 h "351d08h"; "?" for a negative, NaN or over 1e9 s.
std::string format_duration(double seconds);

// Note [The ETA]
// ~~~~~~~~~~~~~~
// train's time to --steps (or --stop-at, where this process stops: `steps` is then that step,
// whose evaluation and save are the final ones) after `done` steps: the steps left at `step_s` (the progress
// window's step time), plus the evaluations and saves still due — every `eval_every`-th and
// `save_every`-th step before the last (0: none), and the final one of each — each at the
// mean of those this process ran. An evaluation not yet run counts as one forward pass (half
// a step) per evaluation batch, unless it decodes (squad, drop: eval_batches 0), when it
// counts from its first run; a save counts from its first. (Before, the time evaluations and
// saves took was spread over the steps done: an evaluation owed at a resume made the first
// ETAs many times too long, and none counted before the first ran: adversarial pass 62.)
struct EtaInputs {
  std::int64_t steps = 0, done = 0;
  double step_s = 0;
  bool evaluates = false;            // --eval given
  std::int64_t eval_every = 0, save_every = 0;
  std::int64_t eval_batches = 0;     // of one evaluation, for the estimate before one ran (0: none)
  double eval_seconds = 0, save_seconds = 0;  // those run so far in this process, in all
  std::int64_t evals_done = 0, saves_done = 0;
};
double train_eta(const EtaInputs& in);

// Progress of a long evaluation on stderr: "eval after step 100: 320/1000 examples | 12.3
// examples/s | 850 new tokens | ETA 55s". On a terminal the line is rewritten as it goes and
// cleared at the end (the result is logged in its place); elsewhere (a log file, a pipe) a
// line at most every 30 s, so an evaluation shorter than that prints none. Nothing under -q.
// A line that cannot be written ends the progress, not the evaluation.
class EvalProgressLine {
 public:
  explicit EvalProgressLine(std::string what);
  ~EvalProgressLine() { finish(); }
  EvalProgressLine(const EvalProgressLine&) = delete;
  EvalProgressLine& operator=(const EvalProgressLine&) = delete;
  // `new_tokens` < 0: not a generation.
  void report(std::int64_t done, std::int64_t total, std::int64_t new_tokens = -1);
  void finish();

 private:
  std::string what_;
  bool tty_, quiet_, open_ = false, failed_ = false;
  double start_, last_;
};

// Note [zo2-tune's threads]
//   The CPU device keeps its kernels to --threads (or the cgroup's CPU quota) in a TBB arena
//   of its own (Note [Kernel threads], runtime/cpu/cpu_device.cpp), and so does its
//   session's host-side work (loading, checking and saving the weights). The rest of what
//   zo2-tune does on the host ran on TBB's default threads, one per CPU of the affinity
//   mask: tokenizing a data file, a resume's checksums, init's random weights, a CUDA run's
//   conversions — on a 64-core node where the job was given 8 (--threads 8, or a cgroup
//   quota of 8 CPUs), 64 threads, throttled by the quota, and beside other jobs' cores.
//   zo2-tune is a process of its own, so it caps TBB process-wide (tbb::global_control)
//   at the same count: --threads when given (a resumed run's own when not given again, a
//   rank's share of the node under mpirun), else the default (the affinity mask, at most
//   the quota: default_threads()); no cap at or above TBB's own count. A library that
//   embeds zo2 (the C API, Python — whose zo2.train runs this same train in-process) gets
//   no process-wide cap: only main's HostThreadsScope enables it, and the device's arena is
//   all that bounds zo2 in a host's process (Note [Kernel threads]).
class HostThreadsScope {
 public:
  HostThreadsScope();   // cap_host_threads acts from now on
  ~HostThreadsScope();  // and no more: the cap is lifted
  HostThreadsScope(const HostThreadsScope&) = delete;
  HostThreadsScope& operator=(const HostThreadsScope&) = delete;
};
// Caps the process's TBB threads at `threads` (0: default_threads()) while a
// HostThreadsScope lives; a later call replaces the cap. Nothing otherwise.
void cap_host_threads(int threads);

// Note [Standard streams]
//   zo2-tune and zo2-bench call open_standard_streams() first thing in main:
//   - fds 0, 1 and 2 are made open: a program started with one closed (`2>&-`) hands that
//     number to the next file it opens, and what it then says on stderr lands in that file
//     (a run directory's zo2.lock got the progress lines over its pid). A closed stdin or
//     stderr becomes /dev/null: nothing to read; what is said is discarded, as the user
//     asked. A closed stdout becomes /dev/null opened read-only, so writing to it still fails
//     (EBADF) as the closed descriptor did: a command whose output is its product
//     (tokenize, eval --json, generate) reports the lost output and exits 1, and one that
//     writes nothing to stdout succeeds (finish_stdout);
//   - SIGPIPE and SIGXFSZ are ignored in every subcommand: a pipe whose reader exited and a
//     file past `ulimit -f` come back from the write as EPIPE and EFBIG, which the writer
//     reports naming the file (and a failed save removes its temporary files) — not a death
//     by signal that says nothing and leaves them behind.
void open_standard_streams() noexcept;
// At the end of main: stdout flushed; if any write to it failed (a full disk, a pipe whose
// reader exited, a closed stdout), "PROGRAM: error: cannot write the standard output: REASON"
// on stderr and 1 (or `rc` when the command had failed already). Otherwise `rc`.
int finish_stdout(const char* program, int rc) noexcept;
// The message for an exception that ends PROGRAM: its what(), or — when it is fmt's failed
// write to stdout (fmt::print throws std::system_error) — one naming the standard output,
// which finish_stdout then does not repeat.
std::string describe_error(const std::exception& e);

}  // namespace zo2::cli
