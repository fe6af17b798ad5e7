// zo2-tune train: MeZO fine-tuning through the streaming scheduler. Writes the tuned model
// as an HF checkpoint, the seed log (seed_log.jsonl) and a state file (zo2_state.json)
// from which `--resume DIR` continues exactly where the run stopped.
#include "api/options.h"
#include "api/run_dir.h"
#include "api/session.h"
#include "runtime/checksum.h"
#include "runtime/dtype.h"
#include "runtime/arena.h"
#include "runtime/file_util.h"
#include "runtime/json_file.h"
#include "runtime/log.h"
#include "runtime/topology.h"
#include "tools/cli.h"
#include "tools/dataset.h"
#include "zo/schedule.h"

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <csignal>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>
#include <mutex>
#include <cstring>
#include <deque>
#include <exception>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <thread>
#include <type_traits>
#include <map>
#include <memory>
#include <optional>
#include <regex>

namespace zo2::cli {

SessionConfig session_config(const DeviceFlags& f, bool training);

namespace {

std::atomic<int> g_stop_signal{0};
std::mutex g_stop_reason_mu;
std::string g_stop_reason;  // set_train_stop_reason

// A step whose projected gradient is not finite (a NaN or infinite loss) is logged and its
// update skipped; this many in a row stop the run (saved, then exit 1): the losses are not
// coming back (an overflow in the forward pass, say), and running on would only burn time
// and end in a "successful" run that learned nothing.
constexpr std::int64_t kMaxSkippedInARow = 10;

// Note [Stop signals]
//   train stops after the step in progress, saves and exits 130 on
//   - SIGINT and SIGTERM: Ctrl-C, kill, `timeout`, a scheduler's time limit or preemption;
//   - SIGHUP: the terminal or the ssh session went away (a foreground run used to die with
//     everything since its last save; adversarial pass 54);
//   - SIGUSR1 and SIGUSR2: Slurm's `--signal=[B:]USR1@SECONDS` warning before a time limit,
//     and other launchers' "checkpoint now";
//   - SIGXCPU: a CPU-time limit's warning (`ulimit -S -t`, a batch queue's).
//   A second SIGINT, SIGTERM, SIGUSR1 or SIGUSR2 ends the process at once (the way out of a
//   save that hangs); a second SIGHUP (the kernel's and then the shell's, as a session
//   closes) or SIGXCPU (sent again every second past the soft limit) is ignored. SIGHUP,
//   SIGUSR1, SIGUSR2 and SIGXCPU that are ignored when train starts (nohup, a launcher) stay
//   ignored. The handlers stay through the final save — a time limit that arrives while it
//   is written must not kill it (pass 54: one SIGTERM during the final save lost the run) —
//   and are put back as they were after it. These signals are unblocked for train's thread:
//   a parent that blocked SIGTERM left it pending until the scheduler's SIGKILL.
extern "C" void on_stop_signal(int sig) {
  g_stop_signal.store(sig);
  struct sigaction next {};
  next.sa_handler = sig == SIGHUP || sig == SIGXCPU ? SIG_IGN : SIG_DFL;
  sigemptyset(&next.sa_mask);
  sigaction(sig, &next, nullptr);
}

class StopSignals {
 public:
  static constexpr int kSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2, SIGXCPU};
  StopSignals() {
    sigset_t set;
    sigemptyset(&set);
    for (std::size_t i = 0; i < std::size(kSignals); ++i) {
      const int s = kSignals[i];
      sigaction(s, nullptr, &saved_[i]);
      const bool ignored = !(saved_[i].sa_flags & SA_SIGINFO) && saved_[i].sa_handler == SIG_IGN;
      if (ignored && s != SIGINT && s != SIGTERM) continue;  // (a background job's SIGINT is SIG_IGN)
      struct sigaction a {};
      a.sa_handler = on_stop_signal;
      sigemptyset(&a.sa_mask);
      a.sa_flags = SA_RESTART;
      sigaction(s, &a, nullptr);
      sigaddset(&set, s);
    }
    pthread_sigmask(SIG_UNBLOCK, &set, &saved_mask_);
  }
  ~StopSignals() { restore(); }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  void restore() {
    if (restored_) return;
    restored_ = true;
    for (std::size_t i = 0; i < std::size(kSignals); ++i) sigaction(kSignals[i], &saved_[i], nullptr);
    pthread_sigmask(SIG_SETMASK, &saved_mask_, nullptr);
  }

 private:
  struct sigaction saved_[std::size(kSignals)] {};
  sigset_t saved_mask_{};
  bool restored_ = false;
};

using json = nlohmann::json;

// zo2_state.json's fields by type: every error names the file, the key and the value.
struct StateReader {
  const json& j;
  std::filesystem::path file;

  bool has(const char* key) const { return j.contains(key) && !j.at(key).is_null(); }
  template <class T>
  T get(const char* key) const {
    if (!j.contains(key)) fail(ErrorKind::format, "{}: key '{}' is missing", file.string(), key);
    const json& v = j.at(key);
    bool ok = false;
    const char* what = "";
    if constexpr (std::is_same_v<T, bool>) {
      ok = v.is_boolean(), what = "true or false";
    } else if constexpr (std::is_same_v<T, std::string>) {
      ok = v.is_string(), what = "a string";
    } else if constexpr (std::is_floating_point_v<T>) {
      ok = v.is_number(), what = "a number";
    } else if constexpr (std::is_unsigned_v<T>) {
      ok = v.is_number_unsigned() && v.get<std::uint64_t>() <= std::numeric_limits<T>::max();
      what = "a non-negative integer";
    } else {
      ok = v.is_number_integer() &&
           (v.is_number_unsigned() ? v.get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<T>::max())
                                   : v.get<std::int64_t>() >= std::numeric_limits<T>::min() &&
                                         v.get<std::int64_t>() <= std::numeric_limits<T>::max());
      what = "an integer in range";
    }
    if (!ok) fail(ErrorKind::format, "{}: key '{}' = {} is not {}", file.string(), key, v.dump(), what);
    return v.get<T>();
  }
  template <class T>
  T get_or(const char* key, T fallback) const {
    return has(key) ? get<T>(key) : fallback;
  }
  void require(bool cond, const char* key, std::string_view must_be) const {
    if (!cond)
      fail(ErrorKind::format, "{}: key '{}' = {} must be {}", file.string(), key,
           j.contains(key) ? j.at(key).dump() : std::string("(missing)"), must_be);
  }
};

// Note [An interrupted evaluation]
//   Ctrl-C (SIGINT/SIGTERM, a Python callback's stop) during an evaluation stops it before
//   its next batch, or its next decoded token for squad/drop, instead of after every example
//   of a long --eval file; the run then saves and exits 130 as after a step. The partial
//   numbers are not recorded (they are not the evaluation's); the checkpoint's state says
//   `eval_owed_after_step` N, and a --resume runs that evaluation before its first step (at
//   the last step, as the final evaluation), so the resumed run's log holds every
//   evaluation an uninterrupted run's does. With ranks the stop is asked collectively (every
//   rank the same number of times), so they stop the evaluation at the same batch.

// Note [What a resume keeps]
//   `train --resume DIR` continues the run saved in DIR with the run's own flags, so that
//   `zo2-tune train --resume out` alone carries on the job (--out defaults to that run):
//   - what decides the weights (the rule, storage dtype, seed, lr and its schedule, eps,
//     weight decay, batch, data and its sampling, ranks' layout) is the run's: a different
//     --storage-dtype, --optimizer or --parallel is refused, a different --lr, --batch-size, …,
//     --compute-dtype, tile size (--tile SIZE splits the GEMMs by it) or kind of device (CPU
//     and CUDA kernels round differently) is taken with a warning that the result will differ;
//   - how it runs (device and memory flags, tiles, the disk tier, evaluation, saving, logging,
//     ranks' host image and upload) is the run's unless given again; a flag given again wins
//     without a word, as none of them changes the weights (the bits are the same for any
//     --gpu-mem, --offload, --window, --threads, disk tier, …: the scheduler's invariant).
//     The disk tier and the JSON log are kept only when the run resumes in place: they belong
//     to that run directory (a resume into another --out that took the block file would
//     rebuild it and cost the original run the steps it logged past its checkpoint; one that
//     took the log would append to the original run's), so elsewhere they are given again.
//     A copy of the run directory resumed in place is elsewhere too: the state records the
//     directory it was saved in (run_dir), and while that one exists the copy is another run.
//   - a state with none of the flags (a run saved by a C API or Python session) needs the
//     ones that decide the weights given again: --lr, --eps, --weight-decay, --batch-size
//     and --steps (the defaults would silently change them).
//   - --data given again is taken with a warning when it names another file, or when the
//     file now gives another number of examples than the run had.
//   The flags are saved with every checkpoint in zo2_state.json (`save` below); a state
//   written before they were has none, and then every flag is as given.
template <class Opts>
std::vector<std::string> keep_run_flags(Opts& o, const CLI::App& app, const StateReader& st, bool in_place) {
  std::vector<std::string> kept;
  auto keep = [&](const char* flag, const char* key, auto& field) {
    using T = std::decay_t<decltype(field)>;
    if (!st.has(key) || app.get_option(flag)->count() > 0) return;
    const T saved = st.get<T>(key);
    if (saved == field) return;  // the default: nothing to say
    field = saved;
    kept.push_back(fmt::format("{} {}", flag, saved));
  };
  // The device flags that change the numbers, as --lr does: the compute dtype, a tile size
  // (the GEMMs split by it; auto and off split at the default tile alike), the kind of device.
  auto keep_or_warn = [&](const char* flag, const char* key, std::string& field, auto same_numbers) {
    if (!st.has(key)) return;
    const auto saved = st.get<std::string>(key);
    if (app.get_option(flag)->count() > 0 && !same_numbers(field, saved))
      log_warn("--resume: {} given as {} but the run used {}; the result will differ from an uninterrupted run", flag,
               field, saved);
    else if (app.get_option(flag)->count() == 0)
      keep(flag, key, field);
  };
  keep_or_warn("--compute-dtype", "compute_dtype", o.dev.compute,
               [](const std::string& a, const std::string& b) { return a == b; });
  keep_or_warn("--tile", "tile", o.dev.tile, [](const std::string& a, const std::string& b) {
    auto split = [](const std::string& t) { return t == "auto" || t == "off" ? std::string() : t; };
    return split(a) == split(b);
  });
  keep_or_warn("--device", "device", o.dev.device, [](const std::string& a, const std::string& b) {
    try {  // CPU and CUDA kernels round differently; any CUDA device rounds alike
      return parse_device(a).kind == parse_device(b).kind;
    } catch (const Error&) {
      return false;  // checked with the other device flags below
    }
  });
  keep("--gpu-mem", "gpu_mem", o.dev.gpu_mem);
  keep("--offload", "offload", o.dev.offload);
  keep("--window", "window", o.dev.window);
  keep("--threads", "threads", o.dev.threads);
  const bool disk_given = app.get_option("--host-mem")->count() + app.get_option("--disk-dir")->count() > 0;
  const std::string saved_disk = st.get_or<std::string>("disk_dir", "");
  if (in_place || disk_given) {
    // Each of the two not given again is the run's, as the other flags are: `--disk-dir NEW`
    // alone moves the block file under the run's --host-mem. The run's block file (its
    // --disk-dir) is kept only in place; elsewhere it stays the original run's.
    keep("--host-mem", "host_mem", o.dev.host_mem);
    if (in_place) keep("--disk-dir", "disk_dir", o.dev.disk_dir);
    keep("--disk-lag", "disk_lag", o.dev.disk_lag);
    keep("--disk-staging", "disk_staging", o.dev.disk_staging);
  } else if (!saved_disk.empty()) {
    log_info("--resume: the run kept blocks on disk in {}; that block file stays with the run, so this resume into "
             "another --out keeps every block in RAM unless --host-mem and --disk-dir are given",
             saved_disk);
  }
  keep("--eval-every", "eval_every", o.eval_every);
  keep("--num-eval", "num_eval", o.num_eval);
  keep("--max-new-tokens", "max_new_tokens", o.eval_max_new);
  keep("--save-every", "save_every", o.save_every);
  keep("--log-every", "log_every", o.log_every);
  if (in_place) keep("--log-json", "log_json", o.log_json);  // elsewhere: the original run's log stays its own
  keep("--host-image", "host_image", o.host_image);
  keep("--upload", "upload", o.upload);
  return kept;
}

// One line of progress: a rewritten status line on a terminal, plain lines otherwise. A line
// that cannot be written (stderr full, or a pipe whose reader exited) ends the progress:
// failure() says why, and train stops after the step, saved, as for a --log-json record.
class Progress {
 public:
  // total: --steps; stop: the step this process stops after (--stop-at, else total). With a
  // --stop-at before the end the ETA is this process's, and the line says so.
  Progress(std::int64_t total, std::int64_t stop, std::int64_t every)
      : total_(total), stop_(stop), every_(every), tty_(stderr_is_terminal()), quiet_(log_level() > LogLevel::info) {}
  const std::string& failure() const { return failure_; }
  // disk_gbps < 0: no disk tier.
  void report(const StepResult& r, double step_s, double tok_s, double eta, std::size_t peak, double pcie_gbps,
              double disk_gbps) {
    if (quiet_ || !failure_.empty()) return;
    const double loss = r.loss;
    smooth_ = n_ == 0 ? loss : 0.9 * smooth_ + 0.1 * loss;
    ++n_;
    const std::string line = fmt::format(
        "step {}/{} | loss {:.4f} (avg {:.4f}) | g {:+.3e} | lr {:.2e} | {:.0f} tok/s | {:.3f} s/step | "
        "ETA {}{} | device {} | PCIe {:.2f} GB/s{}{}",
        r.step + 1, total_, loss, smooth_, r.g, r.lr, tok_s, step_s, format_duration(eta),
        stop_ < total_ ? fmt::format(" (--stop-at {})", stop_) : std::string(),
        format_bytes(static_cast<double>(peak)), pcie_gbps,
        disk_gbps >= 0 ? fmt::format(" | disk {:.2f} GB/s", disk_gbps) : std::string(),
        r.update_skipped ? " | update skipped" : "");
    if (tty_) {
      put(fmt::format("\r\033[K{}{}", line, r.step + 1 == stop_ ? "\n" : ""));
      open_ = r.step + 1 != stop_ && failure_.empty();
    } else if ((r.step + 1) % every_ == 0 || r.step + 1 == stop_ || n_ == 1)  // (n_ == 1: a resume's first too)
      put(line + "\n");
  }
  // Ends the status line a terminal shows, if one is open, so that what follows starts a line.
  void newline() {
    if (open_ && failure_.empty()) put("\n");
    open_ = false;
  }

 private:
  void put(const std::string& text) {
    if (write_stderr(text)) return;
    const int e = errno;
    failure_ = fmt::format("the progress output (stderr) cannot be written ({}{})", std::strerror(e),
                           e == EPIPE ? ": the program reading it exited" : "");
  }
  std::int64_t total_, stop_, every_;
  bool tty_, quiet_, open_ = false;
  std::string failure_;
  double smooth_ = 0;
  std::int64_t n_ = 0;
};

// Note [One writer per JSON log]
//   A second run given the --log-json file of a run still training truncated it under the
//   first, which went on writing at its own offset: the first run's records were lost and
//   the file filled with NUL bytes, both runs exiting 0 (adversarial pass 60). The writer
//   holds an exclusive flock on the file (a regular file: a FIFO or a terminal is not
//   locked) from before it trims or truncates it until the run ends; a second run is
//   refused before it touches the file.
class JsonLogLock {
 public:
  JsonLogLock() = default;
  JsonLogLock(const JsonLogLock&) = delete;
  JsonLogLock& operator=(const JsonLogLock&) = delete;
  ~JsonLogLock() {
    if (fd_ >= 0) ::close(fd_);
  }
  // Locks the file `log` names (following links), taking over from the lock held, if any
  // (the trim of a resume writes a new file in its place).
  void take(const std::string& log) {
    std::error_code ec;
    const std::filesystem::path file = std::filesystem::weakly_canonical(std::filesystem::absolute(log), ec);
    if (ec) return;
    if (const auto st = std::filesystem::status(file, ec); std::filesystem::exists(st) && !std::filesystem::is_regular_file(st))
      return;
    const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) return;  // the log's own open says why
    switch (try_lock_file(fd, true, file, "a second run writing this JSON log")) {
      case FileLock::busy:
        ::close(fd);
        fail(ErrorKind::io,
             "--log-json {}: another zo2-tune train is writing this JSON log; two runs would overwrite and mix each "
             "other's records: choose another file",
             log);
      case FileLock::unsupported:  // Note [File systems without locks]: unlocked
        ::close(fd);
        return;
      case FileLock::held:
        break;
    }
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

}  // namespace

void set_train_stop_reason(std::string reason) {
  std::lock_guard<std::mutex> lock(g_stop_reason_mu);
  g_stop_reason = std::move(reason);
}

int train_stop_signal() { return g_stop_signal.load(); }

namespace {
// CRC-32 of a training set as its steps see it: each example's label and each sequence's
// ids, mask and labels, with their lengths.
std::uint32_t training_set_crc32(const Dataset& data) {
  std::uint32_t crc = 0;
  auto add = [&](const auto& v) {
    const auto n = static_cast<std::uint64_t>(v.size());
    crc = crc32_update(crc, std::as_bytes(std::span(&n, 1)));
    crc = crc32_update(crc, std::as_bytes(std::span(v.data(), v.size())));
  };
  for (std::int64_t i = 0; i < data.size(); ++i) {
    const Example& e = data.example(i);
    const std::int64_t label = e.label;
    crc = crc32_update(crc, std::as_bytes(std::span(&label, 1)));
    for (const auto& q : e.seqs) add(q.ids), add(q.mask), add(q.labels);
  }
  return crc;
}

// What to do with a run directory holding a seed log and no checkpoint (a run killed before
// its first save): its steps are not lost — replay rebuilds them from the seed log — and
// --overwrite would remove them (adversarial pass 54).
std::string unsaved_run_advice(const std::filesystem::path& dir) {
  const std::filesystem::path log = dir / kRunSeedLog;
  std::int64_t steps = -1;
  std::string base = "BASE";
  bool flags = false;  // the log records the run's flags (Note [A run's flags in its seed log])
  try {
    const SeedLog l = SeedLog::read(log);
    steps = static_cast<std::int64_t>(l.entries.size());
    if (!l.header.base_model.empty()) base = l.header.base_model;
    flags = !l.header.run_flags.empty();
  } catch (const Error&) {  // a damaged log: the advice stands without its numbers
  }
  return fmt::format(
      "Its {} are in {}: `zo2-tune replay --model {} --seed-log {} --out NEW` rebuilds their weights, and "
      "`zo2-tune train --resume NEW{}` carries on from there{}; --overwrite starts a new run in {}, removing that "
      "seed log",
      steps >= 0 ? fmt::format("{} step{}", steps, steps == 1 ? "" : "s") : std::string("logged steps"), log.string(),
      base, log.string(),
      flags ? "" : " --data DATA",
      flags ? " with the run's flags, which the seed log records"
            : " given the run's --lr, --eps, --weight-decay, --batch-size and --steps",
      dir.string());
}

// --out when only --resume DIR is given: the run DIR is (a directory holding a run), or the
// run whose step directory (or `current`) DIR names.
std::string default_resume_out(const std::string& resume) {
  if (const std::filesystem::path run = training_run_of_checkpoint(resume); !run.empty()) return run.string();
  // A run `replay` wrote has no seed log of its own yet: its step directory still names it.
  if (const std::filesystem::path run = run_of_checkpoint(resume); !run.empty()) return run.string();
  if (holds_run(resume)) return resume;
  fail(ErrorKind::invalid_argument,
       "--out is required: --resume {} is not a run directory (or one of its step directories) to carry on in "
       "place; name the run directory to write",
       resume);
}
}  // namespace

Runner add_train(CLI::App& app) {
  struct Opts {
    std::string model, data, out, resume, log_json, save_dtype = "fp32", shard = "5G", schedule = "constant";
    std::string records;  // hidden --records PATH: the --log-json records for an embedding host (Python's pipe)
    std::string eval;
    std::int64_t steps = 100, save_every = 0, warmup = 0, log_every = 10, stop_at = 0;
    std::int64_t num_train = 0, num_eval = 0, eval_every = 0;
    int eval_max_new = 50;  // squad/drop --eval: greedy decoding for F1/EM
    int batch = 8;
    double lr = 1e-6, eps = 1e-3, wd = 0;
    std::uint64_t seed = 0, data_seed = 0;
    bool shuffle = true, overwrite = false;
    std::string parallel;        // zo/parallel.h; empty: data=N under mpirun, else one process
    double rank_timeout = 600;   // Note [Rank faults] in runtime/comm.h
    std::string host_image = "shared";
    std::string upload = "full";
    std::optional<RankBinding> binding;  // ranks: where this one runs (runtime/topology.h)
    DeviceFlags dev;
    DataFlags data_flags;
    RuleFlags rule;
    LoraFlags lora;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model", o->model, "HF checkpoint directory to start from");
  app.add_option("--data", o->data,
                 "training data: JSONL (text | prompt+completion | prompt+options+label), a --task file, or "
                 "safetensors with input_ids [N, T] (+ attention_mask, labels); with --resume, the run's own by default");
  app.add_option("--eval", o->eval, "evaluation data (same format/task as --data): loss, and accuracy for options");
  app.add_option("--max-new-tokens,--max_new_tokens", o->eval_max_new,
                 "squad/drop --eval: greedy decoding of up to N tokens per answer for F1/EM (MeZO's 50; 0: only the "
                 "gold answer's loss)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--eval-every,--eval_steps", o->eval_every, "with --eval: evaluate every N steps (and at the end; 0: only at the end)")
      ->capture_default_str();
  auto* num_train = app.add_option("--num-train,--num_train", o->num_train, "use a seeded sample of N training examples");
  app.add_option("--num-eval,--num_eval", o->num_eval, "with --eval: use a seeded sample of N evaluation examples");
  auto* shuffle = app.add_flag("--shuffle,!--no-shuffle", o->shuffle, "reshuffle the training examples every epoch (default on)");
  auto* data_seed = app.add_option("--data-seed", o->data_seed, "seed of the sampling and shuffling (default: --seed)")->transform(seed_value());
  app.add_option("--out", o->out,
                 "output directory: tuned checkpoint, seed_log.jsonl, zo2_state.json (with --resume, the run "
                 "being resumed by default)");
  auto* steps = app.add_option("--steps,--max_steps", o->steps, "total steps")->capture_default_str();
  auto* batch = app.add_option("--batch-size,--per_device_train_batch_size", o->batch, "sequences per step")
                    ->capture_default_str();
  auto* lr = app.add_option("--lr,--learning_rate", o->lr, "learning rate")->capture_default_str();
  auto* eps = app.add_option("--eps,--zo_eps", o->eps, "perturbation scale")->capture_default_str();
  auto* wd = app.add_option("--weight-decay,--weight_decay", o->wd, "weight decay (not on biases and norms)")->capture_default_str();
  auto* seed = app.add_option("--seed", o->seed, "run seed (step seeds derive from it)")->capture_default_str()->transform(seed_value());
  auto* sched = app.add_option("--lr-schedule,--lr_scheduler_type", o->schedule, "constant, linear or cosine")
                    ->capture_default_str()->check(CLI::IsMember({"constant", "linear", "cosine"}));
  auto* warm = app.add_option("--warmup-steps,--warmup_steps", o->warmup, "linear warmup steps")->capture_default_str();
  app.add_option("--save-every,--save_steps", o->save_every, "also save every N steps (0: only at the end)")->capture_default_str();
  app.add_option("--save-dtype", o->save_dtype, "dtype of the saved checkpoint: fp32, bf16, fp16")->capture_default_str();
  app.add_option("--shard-size", o->shard, "largest safetensors shard")->capture_default_str();
  app.add_option("--log-json", o->log_json, "write one JSON object per step to this file");
  // The same records, for a host that runs train in its process (zo2.train reads them from
  // a pipe): not part of the run (never validated against its files, trimmed or kept on a
  // resume), so the user's own --log-json keeps every guarantee. Hidden from --help.
  app.add_option("--records", o->records)->group("");
  app.add_option("--log-every,--logging_steps", o->log_every, "progress line every N steps when not on a terminal")
      ->capture_default_str();
  app.add_option("--stop-at", o->stop_at,
                 "stop (and save the state, as on SIGINT) once this many steps are done; --resume continues");
  app.add_option("--parallel", o->parallel,
                 "ranks' layout under mpirun/srun: data=D,perturbation=P,directions=Q (product = ranks; default "
                 "data=N; README \"Many GPUs and nodes\")");
  app.add_option("--rank-timeout", o->rank_timeout,
                 "seconds a rank waits for another in an exchange before stopping the job (0: no limit)")
      ->capture_default_str()
      ->check(finite_range(0, 1e7));
  app.add_option("--host-image", o->host_image,
                 "ranks on one node: shared (one copy of the weights per node, each rank writing its slice) or "
                 "private (one per rank)")
      ->capture_default_str()
      ->check(CLI::IsMember({"shared", "private"}));
  app.add_option("--upload", o->upload,
                 "ranks on one node: full (each rank uploads every streamed block) or sliced (each its slice; the "
                 "devices exchange the rest: NCCL on CUDA, for GPUs with NVLink)")
      ->capture_default_str()
      ->check(CLI::IsMember({"full", "sliced"}));
  app.add_option("--resume", o->resume, "continue the run saved in DIR (its zo2_state.json and checkpoint)");
  app.add_flag("--overwrite", o->overwrite,
               "start a new run in an --out that holds one (its checkpoint and seed log are removed first)");
  o->dev.add(app);
  o->data_flags.add(app);
  o->rule.add(app);
  o->lora.add(app, /*training=*/true);
  struct Given {
    CLI::Option *steps, *batch, *lr, *eps, *wd, *seed, *sched, *warm, *num_train, *shuffle, *data_seed, *task, *max_len,
        *padding, *storage, *save_dtype, *shard;
  };
  const Given given{steps, batch, lr, eps, wd, seed, sched, warm, num_train, shuffle, data_seed,
                    app.get_option("--task"), app.get_option("--max-len"), app.get_option("--padding-side"),
                    app.get_option("--storage-dtype"), app.get_option("--save-dtype"), app.get_option("--shard-size")};
  // Every numeric flag through the checks the C API shares (api/options.h): before --resume
  // reads a state file, before any data is read or anything written. 0 means "not given"
  // for --stop-at, --num-train and --num-eval, so those are checked only when given.
  auto check_flags = [o, a = &app] {
    constexpr auto cli = OptionSource::cli;
    if (o->out.empty() && a->get_option("--out")->count() == 0) {
      // `train --resume RUN` carries on RUN in place (a requeued job's command line): the run
      // directory RUN is, or holds the step directory it names.
      if (o->resume.empty()) fail(ErrorKind::invalid_argument, "--out is required: name the run directory to write");
      o->out = default_resume_out(o->resume);
    }
    if (o->out.empty()) fail(ErrorKind::invalid_argument, "--out '': name the run directory");
    check_integer(Opt::steps, o->steps, cli);
    check_integer(Opt::batch_size, o->batch, cli);
    auto written = [a](const char* flag) {  // "1e309" as typed, where the double reads inf
      const CLI::Option* opt = a->get_option(flag);
      return opt->count() > 0 ? opt->results().back() : std::string();
    };
    check_real(Opt::lr, o->lr, cli, written("--lr"));
    check_real(Opt::eps, o->eps, cli, written("--eps"));
    check_real(Opt::weight_decay, o->wd, cli, written("--weight-decay"));
    check_integer(Opt::warmup_steps, o->warmup, cli);
    check_integer(Opt::save_every, o->save_every, cli);
    check_integer(Opt::eval_every, o->eval_every, cli);
    check_integer(Opt::log_every, o->log_every, cli);
    const std::pair<const char*, std::pair<Opt, std::int64_t>> optional[] = {
        {"--stop-at", {Opt::stop_at, o->stop_at}},
        {"--num-train", {Opt::num_train, o->num_train}},
        {"--num-eval", {Opt::num_eval, o->num_eval}}};
    for (const auto& [flag, v] : optional)
      if (a->get_option(flag)->count() > 0) check_integer(v.first, v.second, cli);
  };
  auto body = [o, given, check_flags, a = &app](Comm& comm) -> int {
    g_stop_signal.store(0);
    set_train_stop_reason("");
    // A --log-json pipe whose reader went away (tee, a collector) is a write error that stops
    // the run after its step, saved — not a SIGPIPE that ends it with nothing saved. (main
    // ignores it already, Note [Standard streams]; Python's in-process train comes here.)
    std::signal(SIGPIPE, SIG_IGN);
    check_flags();
    const bool writer = comm.rank() == 0;  // rank 0 writes --out, the logs and the progress
    ParallelLayout layout = parse_parallel(o->parallel, "--parallel");
    if (o->parallel.empty() && comm.size() > 1) layout.data = comm.size();
    DType save_dtype = parse_dtype_flag("--save-dtype", o->save_dtype, {DType::f32, DType::bf16, DType::f16});
    std::uint64_t shard = parse_size_option(Opt::shard_size, o->shard, OptionSource::cli);
    // A resume checks --disk-lag / --disk-staging against the disk tier once the run's
    // --host-mem and --disk-dir are kept (below): given again alone, they are the run's tier's
    // (adversarial pass 58: they were refused as "the disk tier is not set").
    DeviceFlags early = o->dev;
    if (!o->resume.empty()) early.disk_lag_flag = early.disk_staging_flag = nullptr;
    // Likewise --disk-dir given again alone: it is checked under the run's --host-mem, once kept.
    if (!o->resume.empty() && early.host_mem.empty()) early.disk_dir.clear();
    SessionConfig sc = session_config(early, true);
    // A run directory as --model: its current checkpoint, resolved once.
    std::string model_dir = o->model.empty() ? std::string() : resolve_model_dir(o->model).string();
    std::int64_t first_step = 0;
    std::int64_t eval_owed_at_resume = -1;  // the resumed run's state: an evaluation it owes (or -1)
    std::string base_model = o->model;
    bool append_log = false;
    bool log_json_kept = false;  // --log-json is the resumed run's (Note [What a resume keeps])
    bool resume_within_out = false;  // the resumed checkpoint is --out's own (in place, or one of its steps)
    std::string saved_data;          // the resumed run's --data and its examples, to compare
    std::int64_t saved_examples = -1;
    std::int64_t saved_data_crc = -1;  // the run's data_crc32, -1 when its state has none
    // The resume warnings about the training data (--data, --max-len, --padding-side given
    // again otherwise): said once the data is read, and only when its training set (the
    // examples' count and CRC-32, recorded by the run) is not the run's — a copy of the file,
    // or a --max-len / --padding-side that fixed-length rows never use, changes nothing.
    std::vector<std::string> data_warnings;
    bool data_seed_known = given.data_seed->count() > 0;
    const std::filesystem::path out(o->out);
    // The one writer of --out (Note [Run directory]): taken first when --out is the run being
    // resumed, so nothing changes it while its state is read.
    // A run's own checkpoint (its `current` or a step directory) is replaced by that run's next
    // save and is no run directory of its own: `--resume RUN/step-N --out RUN/step-N` wrote a
    // seed log and lock into the checkpoint, trained every step and then had its save refused
    // (adversarial pass 53). Refused before anything is written.
    if (const std::filesystem::path run = training_run_of_checkpoint(out); !run.empty())
      fail(ErrorKind::invalid_argument,
           "--out {}: is a checkpoint of the training run {} (which that run's next save replaces), not a run "
           "directory: {}",
           o->out, run.string(),
           o->resume.empty() ? "choose another --out"
                             : fmt::format("to carry the run on, give --out {} (or drop --out)", run.string()));
    std::optional<NewOutputDir> made_out;  // a new --out that a refusal leaves holding only the lock goes again
    if (writer) made_out.emplace(out);
    std::optional<RunDirLock> lock;
    const bool resume_in_place = !o->resume.empty() && same_directory(out, o->resume);
    if (resume_in_place && writer) lock.emplace(out);
    comm.barrier("opening --out");  // rank 0 holds (and has cleaned) the run directory
    std::optional<SeedLog> resumed_log;
    std::vector<std::string> resumed_roundings;  // Note [A resume from a rounded checkpoint] (api/run_dir.h)
    std::uint64_t resumed_log_bytes = 0;
    std::filesystem::path resumed_log_path;
    if (!o->resume.empty()) {
      // The checkpoint, its manifest and the seed log are checked together, checksums included:
      // a resume continues exactly the run that was saved, or refuses naming what differs.
      const OpenedCheckpoint ck = open_checkpoint(o->resume, /*verify_checksums=*/true);
      const std::filesystem::path state_file = ck.dir / kRunStateFile;
      if (ck.state.is_null() && std::filesystem::exists(std::filesystem::path(o->resume) / kRunSeedLog))
        fail(ErrorKind::invalid_argument,
             "--resume {}: the run there stopped before its first save (a seed log, no checkpoint). {}",
             o->resume, unsaved_run_advice(o->resume));
      if (ck.state.is_null())
        fail(ErrorKind::invalid_argument,
             "--resume {}: no {}: not a run directory written by zo2-tune train (to start from this checkpoint, "
             "pass --model)",
             o->resume, kRunStateFile);
      const StateReader st{ck.state, state_file};
      // A run a C API or Python session saved without a seed log: nothing records its steps,
      // said before the flags such a manifest lacks (adversarial pass 70: "seed_log.jsonl:
      // cannot open the seed log", once those were given, said nothing of why).
      if (std::error_code ec; ck.seed_log.empty() && !st.has("seed_log") && !st.has("replayed_from")) {
        std::filesystem::path home = run_of_checkpoint(o->resume);
        if (home.empty()) home = o->resume;
        if (!std::filesystem::exists(home / kRunSeedLog, ec))
          fail(ErrorKind::invalid_argument,
               "--resume {}: the run was saved by a C API or Python session without a seed log ({} records none), "
               "so nothing records its steps and it cannot be resumed: start a new run from its weights with --model "
               "{} (a session given a seed log saves runs that resume)",
               o->resume, state_file.string(), o->resume);
      }
      // A resumed run keeps its ranks' layout: data parallelism rounds the losses its own way.
      // --parallel not given again is the run's (the default data=N is not).
      const std::string saved_layout = st.get_or<std::string>("parallel", "single");
      const int saved_ranks = parse_parallel(saved_layout, "parallel").size();
      if (o->parallel.empty() && saved_ranks == comm.size()) layout = parse_parallel(saved_layout, "parallel");
      if (saved_layout != layout.spec()) {
        const std::string launch =
            saved_ranks == 1 ? std::string("without mpirun") : fmt::format("with mpirun -np {}", saved_ranks);
        if (o->parallel.empty())
          fail(ErrorKind::invalid_argument,
               "--resume {}: the run used --parallel {} (with {} rank{}) but this job has {} rank{}; a resumed run "
               "keeps its layout: start it {}",
               o->resume, saved_layout, saved_ranks, saved_ranks == 1 ? "" : "s", comm.size(),
               comm.size() == 1 ? "" : "s", launch);
        fail(ErrorKind::invalid_argument,
             "--parallel {}: the run in {} used {} (with {} rank{}); a resumed run keeps its layout: start it {} and "
             "drop --parallel",
             o->parallel, o->resume, saved_layout, saved_ranks, saved_ranks == 1 ? "" : "s", launch);
      }
      auto take = [&](CLI::Option* opt, const char* key, auto& field) {
        using T = std::decay_t<decltype(field)>;
        if (!st.has(key)) return;
        const T saved = st.get<T>(key);
        if (opt->count() > 0 && field != saved)
          log_warn("--resume: {} given as {} but the run used {}; the result will differ from an uninterrupted run",
                   opt->get_name(), field, saved);
        else
          field = saved;
      };
      take(given.batch, "batch_size", o->batch);
      take(given.lr, "lr", o->lr);
      take(given.eps, "eps", o->eps);
      take(given.wd, "weight_decay", o->wd);
      if (st.has("run_seed")) {  // the seed log's steps are this seed's: a resume cannot change it
        const auto saved_seed = st.get<std::uint64_t>("run_seed");
        if (given.seed->count() > 0 && o->seed != saved_seed)
          fail(ErrorKind::invalid_argument,
               "--seed {}: the run in {} has run seed {}; a resumed run keeps it (its seed log and checkpoint are "
               "that seed's steps): drop --seed",
               o->seed, o->resume, saved_seed);
        o->seed = saved_seed;
      }
      take(given.sched, "lr_schedule", o->schedule);
      // --warmup-steps: with a constant schedule, a warmup over by the step the run goes on
      // from (old and new) changes no lr from there.
      if (st.has("warmup_steps") && given.warm->count() > 0 && o->schedule == "constant" &&
          std::max(o->warmup, st.get<decltype(o->warmup)>("warmup_steps")) <= st.get_or<std::int64_t>("next_step", 0)) {
        // (as given: the same learning rates)
      } else {
        take(given.warm, "warmup_steps", o->warmup);
      }
      // --steps: with a constant schedule the total changes no step's lr, so going on further
      // (or stopping sooner) is no change to the weights; with linear or cosine decay it
      // reshapes every lr from here. One below the run's step is refused below, unwarned.
      if (st.has("total_steps")) {
        const auto saved = st.get<std::int64_t>("total_steps");
        if (given.steps->count() == 0)
          o->steps = saved;
        else if (o->steps != saved && o->schedule != "constant" && o->steps >= st.get_or<std::int64_t>("next_step", 0))
          log_warn("--resume: --steps given as {} but the run used {}; its {} lr schedule decays over the total, so "
                   "the result will differ from an uninterrupted run",
                   o->steps, saved, o->schedule);
      }
      {
        // A run saved by a C API or Python session records no training flags: the defaults
        // would silently change them (lr 1e-6 for the run's 1e-3). They are given again.
        std::vector<std::string> missing;
        for (const auto& [opt, key] : {std::pair{given.lr, "lr"}, std::pair{given.eps, "eps"},
                                       std::pair{given.wd, "weight_decay"}, std::pair{given.batch, "batch_size"},
                                       std::pair{given.steps, "total_steps"}})
          if (!st.has(key) && opt->count() == 0) missing.push_back(opt->get_name());
        if (!missing.empty())
          fail(ErrorKind::invalid_argument,
               "--resume {}: {} does not record the run's {} (a run saved by a C API or Python session, or by an "
               "older zo2-tune): give {} again, with the values the run used",
               o->resume, state_file.string(), fmt::join(missing, ", "), fmt::join(missing, ", "));
      }
      saved_data = st.get_or<std::string>("data", "");
      saved_examples = st.get_or<std::int64_t>("data_examples", -1);
      saved_data_crc = st.get_or<std::int64_t>("data_crc32", -1);
      if (o->data.empty()) o->data = saved_data;
      else if (!saved_data.empty() && !same_directory(o->data, saved_data) &&
               std::filesystem::absolute(o->data) != std::filesystem::path(saved_data))
        data_warnings.push_back(fmt::format("--resume: --data given as {} but the run trained on {}; the result will "
                                            "differ from an uninterrupted run",
                                            o->data, saved_data));
      if (o->eval.empty()) o->eval = st.get_or<std::string>("eval", "");
      take(given.num_train, "num_train", o->num_train);
      take(given.shuffle, "shuffle", o->shuffle);
      take(given.data_seed, "data_seed", o->data_seed);
      data_seed_known = data_seed_known || st.has("data_seed");
      take(given.task, "task", o->data_flags.task);
      auto take_data = [&](CLI::Option* opt, const char* key, auto& field) {
        using T = std::decay_t<decltype(field)>;
        if (!st.has(key)) return;
        const T saved = st.get<T>(key);
        if (opt->count() > 0 && field != saved)
          data_warnings.push_back(fmt::format("--resume: {} given as {} but the run used {}; the result will differ "
                                              "from an uninterrupted run",
                                              opt->get_name(), field, saved));
        else
          field = saved;
      };
      take_data(given.max_len, "max_len", o->data_flags.max_len);
      take_data(given.padding, "padding_side", o->data_flags.padding_side);
      // How the run saves: the same dtype and shards, so its checkpoints keep one layout.
      if (given.save_dtype->count() == 0 && st.has("save_dtype")) {
        const auto dt = dtype_from_name(st.get<std::string>("save_dtype"));
        st.require(dt && (*dt == DType::f32 || *dt == DType::bf16 || *dt == DType::f16), "save_dtype",
                   "fp32, bf16 or fp16");
        save_dtype = *dt;
      }
      if (given.shard->count() == 0 && st.has("shard_bytes")) {
        shard = st.get<std::uint64_t>("shard_bytes");
        st.require(shard > 0, "shard_bytes", "positive");
      }
      // What a run can have saved: the ranges the flags have (api/options.h), naming the file
      // and key.
      auto as_flag = [&](const char* key, auto check) {
        try {
          check();
        } catch (const Error& e) {
          fail(ErrorKind::format, "{}: key '{}' = {}: {}", state_file.string(), key,
               ck.state.contains(key) ? ck.state.at(key).dump() : std::string("(missing)"), e.what());
        }
      };
      constexpr auto cli = OptionSource::cli;
      as_flag("total_steps", [&] { check_integer(Opt::steps, o->steps, cli); });
      as_flag("batch_size", [&] { check_integer(Opt::batch_size, o->batch, cli); });
      as_flag("lr", [&] { check_real(Opt::lr, o->lr, cli); });
      as_flag("eps", [&] { check_real(Opt::eps, o->eps, cli); });
      as_flag("weight_decay", [&] { check_real(Opt::weight_decay, o->wd, cli); });
      as_flag("warmup_steps", [&] { check_integer(Opt::warmup_steps, o->warmup, cli); });
      if (o->num_train != 0) as_flag("num_train", [&] { check_integer(Opt::num_train, o->num_train, cli); });
      if (o->data_flags.max_len != 0) as_flag("max_len", [&] { check_integer(Opt::max_len, o->data_flags.max_len, cli); });
      st.require(o->data_flags.padding_side == "right" || o->data_flags.padding_side == "left", "padding_side",
                 "right or left");
      as_flag("lr_schedule", [&] { (void)LrSchedule::parse(o->schedule); });
      // The rest of the run's flags (Note [What a resume keeps]): each one not given again is
      // the run's, each one given again wins.
      // A copy of a run directory (cp -a RUN COPY; --resume COPY --out COPY) is not the run
      // it was copied from: the original's JSON log and block file stay the original's.
      // The paths the run wrote besides its directory (--log-json, --disk-dir) are kept only
      // when the state was saved in this very directory: a copy, a moved run or one from
      // elsewhere (a download whose state names paths of this machine; adversarial pass 52)
      // has them given again, so a state file never picks what a resume writes or trims.
      bool own_dir = resume_in_place;
      if (const std::string saved_dir = st.get_or<std::string>("run_dir", "");
          own_dir && (saved_dir.empty() || !same_directory(saved_dir, out))) {
        own_dir = false;
        if (st.has("log_json") || st.has("disk_dir")) {
          const std::string where =
              saved_dir.empty() ? "'s state does not say which directory it was saved in"
              : std::filesystem::exists(saved_dir) ? " is a copy of the run in " + saved_dir
                                                   : " was saved in " + saved_dir;
          log_info("--resume: {}{}, so its JSON log and block file are not taken from its state here (give "
                   "--log-json, --host-mem and --disk-dir again for this directory)",
                   o->resume, where);
        }
      }
      const std::vector<std::string> kept = keep_run_flags(*o, *a, st, own_dir);
      for (const auto& [key, check] : std::initializer_list<std::pair<const char*, std::function<void()>>>{
               {"eval_every", [&] { check_integer(Opt::eval_every, o->eval_every, cli); }},
               {"save_every", [&] { check_integer(Opt::save_every, o->save_every, cli); }},
               {"log_every", [&] { check_integer(Opt::log_every, o->log_every, cli); }},
               {"num_eval", [&] { if (o->num_eval != 0) check_integer(Opt::num_eval, o->num_eval, cli); }}})
        as_flag(key, check);
      st.require(o->eval_max_new >= 0 && o->eval_max_new <= (1 << 20), "max_new_tokens", "between 0 and 2^20");
      st.require(o->host_image == "shared" || o->host_image == "private", "host_image", "shared or private");
      st.require(o->upload == "full" || o->upload == "sliced", "upload", "full or sliced");
      try {
        sc = session_config(o->dev, true);
      } catch (const Error& e) {
        fail(e.kind(), "{} (with {} kept from {})", e.what(), fmt::join(kept, ", "), state_file.string());
      }
      log_json_kept = std::any_of(kept.begin(), kept.end(), [](const std::string& k) { return k.starts_with("--log-json "); });
      if (!kept.empty()) log_info("--resume: the run's {}", fmt::join(kept, ", "));
      first_step = st.get<std::int64_t>("next_step");
      // Note [An interrupted evaluation]: the evaluation due after that step did not finish.
      eval_owed_at_resume = st.get_or<std::int64_t>("eval_owed_after_step", -1);
      if (given.steps->count() > 0 && first_step > o->steps)
        fail(ErrorKind::invalid_argument, "--steps {}: the run in {} is already at step {}; give at least that many",
             o->steps, o->resume, first_step);
      if (o->stop_at > 0 && o->stop_at <= first_step)
        fail(ErrorKind::invalid_argument,
             "--stop-at {}: the run in {} is already at step {}; a resume stops at a later step (or drop --stop-at)",
             o->stop_at, o->resume, first_step);
      st.require(first_step >= 0 && first_step <= o->steps, "next_step",
                 fmt::format("between 0 and total_steps = {}", o->steps));
      if (ck.step >= 0 && ck.step != first_step)
        st.require(false, "next_step", fmt::format("the manifest's step {}", ck.step));
      base_model = st.get_or<std::string>("base_model", "");
      // The storage dtype decides how every update rounds: a resumed run keeps the run's, as
      // the seed log (whose header names it) and replay assume.
      const std::string storage = st.get_or<std::string>("storage_dtype", "fp32");
      const auto storage_dt = dtype_from_name(storage);
      st.require(storage_dt.has_value(), "storage_dtype", "a dtype name");
      if (given.storage->count() > 0 && sc.storage != *storage_dt)
        fail(ErrorKind::invalid_argument,
             "--storage-dtype {}: the run in {} stores its weights as {}; a resumed run keeps it (its seed log "
             "replays with {} rounding)",
             dtype_name(sc.storage), o->resume, storage, storage);
      sc.storage = *storage_dt;
      resumed_roundings = checkpoint_roundings(ck.state, sc.storage);
      // The update rule and its hyper-parameters decide every update (and the state saved
      // beside the checkpoint): a resumed run keeps the run's.
      const RuleConfig saved_rule = rule_from_json(ck.state.contains("optimizer") ? ck.state.at("optimizer") : json(),
                                                   state_file.string());
      // Flags given again are compared with the run's values; those not given are the run's.
      if (o->rule.any_given())
        if (const RuleConfig asked = o->rule.over(saved_rule, static_cast<float>(o->wd)); asked != saved_rule)
          fail(ErrorKind::invalid_argument,
               "--optimizer {}: the run in {} uses {}; a resumed run keeps its update rule (its seed log and state "
               "replay with it): drop the rule flags",
               asked.describe(), o->resume, saved_rule.describe());
      sc.rule = saved_rule;
      sc.resume_state = true;
      // The seed log: this run's (header), reaching next_step, and — when the manifest records
      // it — byte for byte the prefix the checkpoint was saved with.
      // (no log recorded: the run directory's, also when --resume names its `current`)
      std::filesystem::path log_home = run_of_checkpoint(o->resume);
      if (log_home.empty()) log_home = o->resume;
      resumed_log_path = !ck.seed_log.empty() ? ck.seed_log : log_home / kRunSeedLog;
      // A checkpoint `replay` wrote (from a run killed before its first save, say) continues
      // the seed log it was replayed from.
      // Its prefix up to the checkpoint is recorded (replayed_from_bytes/crc32) and checked
      // below; a log that moved away is named, with where a copy of it is taken from.
      bool replayed = false;
      if (std::error_code ec; ck.seed_log.empty() && !std::filesystem::exists(resumed_log_path, ec) &&
                              st.has("replayed_from")) {
        const std::filesystem::path own = resumed_log_path;
        resumed_log_path = st.get<std::string>("replayed_from");
        replayed = true;
        if (!std::filesystem::exists(resumed_log_path, ec))
          fail(ErrorKind::io,
               "{}: missing: {} was replayed from that seed log, which its resume continues; if it moved, copy it to "
               "{} (its first bytes are checked against the replay's)",
               resumed_log_path.string(), o->resume, own.string());
      }
      resumed_log = SeedLog::read(resumed_log_path);
      const std::uint64_t run_seed = o->seed;
      if (resumed_log->header.rule != sc.rule)
        fail(ErrorKind::format, "{}: the seed log's run used {}, but {} says {}: it belongs to another run",
             resumed_log_path.string(), resumed_log->header.rule.describe(), state_file.string(), sc.rule.describe());
      if (resumed_log->header.run_seed != run_seed || resumed_log->header.storage_dtype != storage)
        fail(ErrorKind::format,
             "{}: the seed log is of run seed {} with {} storage, but {} says run seed {} with {}: it belongs to "
             "another run",
             resumed_log_path.string(), resumed_log->header.run_seed, resumed_log->header.storage_dtype,
             state_file.string(), run_seed, storage);
      if (resumed_log->header.first_step > first_step || resumed_log->next_step() < first_step)
        fail(ErrorKind::format,
             "{}: the seed log holds steps {}..{}, but the checkpoint in {} is at step {}: the log was cut short or "
             "replaced",
             resumed_log_path.string(), resumed_log->header.first_step, resumed_log->next_step() - 1, o->resume,
             first_step);
      resumed_log_bytes = resumed_log->bytes_before(first_step);
      if (ck.state.contains("seed_log")) {
        const json& rec = ck.state.at("seed_log");
        const auto bytes = rec.at("bytes").get<std::uint64_t>();
        const auto crc = rec.at("crc32").get<std::uint32_t>();
        if (bytes != resumed_log_bytes || crc32_file(resumed_log_path, bytes) != crc)
          fail(ErrorKind::format,
               "{}: its first {} bytes are not the log {} was saved with (recorded: {} bytes, CRC-32 {:08x}): the "
               "log was rewritten or comes from another run",
               resumed_log_path.string(), resumed_log_bytes, state_file.string(), bytes, crc);
      }
      if (!ck.state.contains("seed_log") && st.has("replayed_from_bytes")) {
        const auto bytes = st.get<std::uint64_t>("replayed_from_bytes");
        const auto crc = st.get<std::uint32_t>("replayed_from_crc32");
        if (bytes != resumed_log_bytes || crc32_file(resumed_log_path, bytes) != crc)
          fail(ErrorKind::format,
               "{}: its first {} bytes are not the log {} was replayed from (recorded: {} bytes, CRC-32 {:08x}{}): "
               "the log was rewritten, or another run has taken its place",
               resumed_log_path.string(), resumed_log_bytes, o->resume, bytes, crc,
               replayed ? "" : fmt::format(", from {}", st.get<std::string>("replayed_from")));
      }
      model_dir = ck.dir.string();
      // The run the checkpoint is in, after following links: `--resume RUN/current/` (a trailing
      // slash, as a shell completes it), `--resume current` or `.` from inside the run have no
      // such parent as written, and were taken for another run — whose --overwrite then
      // removed the checkpoint and seed log being resumed (adversarial pass 64).
      std::error_code canon_ec;
      const std::filesystem::path ck_canonical =
          std::filesystem::weakly_canonical(std::filesystem::absolute(ck.dir), canon_ec);
      resume_within_out = resume_in_place || same_directory(ck.dir.parent_path(), out) ||
                          (!canon_ec && same_directory(ck_canonical.parent_path(), out));
      if (resume_within_out && o->overwrite)
        fail(ErrorKind::invalid_argument,
             "--overwrite with --resume {} --out {}: the resumed checkpoint is this run directory's own, so there is "
             "nothing to overwrite; drop --overwrite",
             o->resume, o->out);
      // A LoRA run: its checkpoint is the adapter; the frozen base is where the run began.
      // What the run tunes is the run's: adapter flags (and another --model) cannot change it.
      const bool adapter_flags = o->lora.lora_flag->count() + o->lora.r_flag->count() + o->lora.alpha_flag->count() +
                                     o->lora.targets_flag->count() + o->lora.adapter_flag->count() +
                                     o->lora.prefix_flag->count() + o->lora.num_prefix_flag->count() >
                                 0;
      // An adapter run's frozen base may have moved: --model names it again (checked against
      // the seed log's fingerprint below). A full run goes on from its own checkpoint.
      if (!o->model.empty() && !ck.state.contains("peft"))
        fail(ErrorKind::invalid_argument,
             "--model {} with --resume {}: a resumed run goes on from its own checkpoint; drop --model (to start "
             "from {}, start a new run)",
             o->model, o->resume, o->model);
      if (!ck.state.contains("peft") && adapter_flags)
        fail(ErrorKind::invalid_argument,
             "--resume {}: the run tunes every parameter; drop --lora*/--prefix-tuning/--adapter (to tune an adapter "
             "on this checkpoint, start a new run with --model {})",
             o->resume, o->resume);
      if (ck.state.contains("peft")) {
        sc.peft = peft_from_json(ck.state.at("peft"), state_file.string());
        sc.adapter_dir = ck.dir;
        if (adapter_flags)
          fail(ErrorKind::invalid_argument,
               "--resume {}: the run continues with its own adapter ({}); drop --lora*/--prefix-tuning/--adapter", o->resume,
               sc.peft.describe());
        const std::string& want = resumed_log->header.base_fingerprint;
        if (base_model.empty()) {
          // A run saved by a C API or Python session records no base in its state: the seed
          // log's header names it (with its fingerprint, checked below), as the adapter's
          // adapter_config.json does (adversarial pass 53: such runs could not be resumed).
          base_model = resumed_log->header.base_model;
          const char* from = "the seed log's header";
          if (base_model.empty()) {
            base_model = AdapterStore::base_model_of(ck.dir);
            from = "its adapter_config.json";
          }
          if (!base_model.empty() && o->model.empty())
            log_info("--resume: the run's base is {} (from {}; its state records none)", base_model, from);
        }
        if (!o->model.empty()) {
          // The base moved (or was copied): its fingerprint says it is the same weights.
          if (want.empty())
            fail(ErrorKind::invalid_argument,
                 "--model {} with --resume {}: the run's seed log records no fingerprint of its base (a log from an "
                 "older zo2), so another base cannot be checked: put the base back at {} and drop --model",
                 o->model, o->resume, base_model);
          if (std::error_code ec; !std::filesystem::is_directory(o->model, ec) ||
                                  !std::filesystem::exists(resolve_model_dir(o->model) / "config.json"))
            fail(ErrorKind::invalid_argument, "--model {}: not a model checkpoint (no config.json)", o->model);
          if (const std::string got = checkpoint_fingerprint(resolve_model_dir(o->model)); got != want)
            fail(ErrorKind::invalid_argument,
                 "--model {}: not the base the run's adapters were tuned on (its weights' fingerprint is {}; the "
                 "seed log records {} of {})",
                 o->model, got, want, base_model);
          if (!same_directory(o->model, base_model))
            log_info("--resume: the run's base is now {} (was {}; the same weights by their fingerprint)", o->model,
                     base_model);
          base_model = std::filesystem::absolute(resolve_model_dir(o->model)).string();
        }
        if (std::error_code ec; base_model.empty() || !std::filesystem::is_directory(base_model, ec) ||
                                !std::filesystem::exists(resolve_model_dir(base_model) / "config.json"))
          fail(ErrorKind::format,
               "{}: key 'base_model' = '{}' does not name the adapter run's base checkpoint (if it moved, give its new "
               "place as --model)",
               state_file.string(), base_model);
        model_dir = resolve_model_dir(base_model).string();
        // The adapters were tuned on that base's architecture: a config.json that says other
        // heads (same weights' shapes) is another model. A run saved before this was recorded
        // is checked by the weights alone.
        if (ck.state.contains("base_config")) {
          // Compared by meaning, each side read as a config and written without its source's
          // spellings: zo2 0.1 wrote rms_norm_eps 1e-06 as 9.999999974752427e-07 and kept one id
          // of an eos_token_id list, and its LoRA runs could not be resumed (adversarial pass 51).
          auto canonical = [](ModelConfig c) {
            c.source = json();
            return c.to_json();
          };
          const json now = canonical(ModelConfig::load(model_dir));
          json was = ck.state.at("base_config");
          try {
            was = canonical(ModelConfig::from_json(was, state_file.string() + ": base_config"));
          } catch (const Error&) {  // not a config zo2 reads: compared as written
          }
          if (now != was) {
            std::string key = "(its layout)";
            for (auto it = was.begin(); it != was.end(); ++it)
              if (!now.contains(it.key()) || now.at(it.key()) != it.value()) {
                key = fmt::format("{}: {} in the run's base, {} here", it.key(), it.value().dump(),
                                  now.contains(it.key()) ? now.at(it.key()).dump() : std::string("missing"));
                break;
              }
            fail(ErrorKind::invalid_argument,
                 "--resume {}: the base checkpoint {} is not the model the run's adapters were tuned on: its "
                 "config.json differs ({})",
                 o->resume, model_dir, key);
          }
        }
        // The adapters were tuned on that base's weights: one re-made at the path is another.
        if (!want.empty() && o->model.empty())
          if (const std::string got = checkpoint_fingerprint(model_dir); got != want)
            fail(ErrorKind::invalid_argument,
                 "--resume {}: the base checkpoint {} is not the one the run's adapters were tuned on (its weights' "
                 "fingerprint is {}; the seed log records {}): put that base back at {}, or give its new place as "
                 "--model",
                 o->resume, base_model, got, want, base_model);
      }
      append_log = true;
    }
    if (o->resume.empty()) {
      sc.rule = o->rule.config(static_cast<float>(o->wd));
      // LoRA: --lora, or --adapter / an adapter as --model (its base becomes the model).
      std::string m = o->model;
      o->lora.apply(m, sc);
      if (m != o->model) {
        model_dir = resolve_model_dir(m).string();
        base_model = m;
      }
      // The checkpoint the run starts from, as it is now: absolute (a resume from another
      // directory finds it) and resolved (a run directory's `current` moves on as that run
      // goes on; the seed log replays from this step's weights).
      if (!base_model.empty()) base_model = std::filesystem::absolute(resolve_model_dir(base_model)).string();
    }
    // Note [One job] (runtime/comm.h): the ranks run one job — first its flags (a --resume's
    // included), before a rank that has nothing left to do leaves; the data and model below.
    if (comm.size() > 1) {
      const std::vector<RankPart> flags{
          {"--steps", std::to_string(o->steps)},
          {"--stop-at", std::to_string(o->stop_at)},
          {"--batch-size", std::to_string(o->batch)},
          {"--lr", fmt::format("{}", o->lr)},
          {"--eps", fmt::format("{}", o->eps)},
          {"--weight-decay", fmt::format("{}", o->wd)},
          {"--lr-schedule", o->schedule},
          {"--warmup-steps", std::to_string(o->warmup)},
          {"--seed", std::to_string(o->seed)},
          {"--parallel", layout.spec()},
          {"--resume (the step it goes on from)", std::to_string(first_step)},
          {"--save-every", std::to_string(o->save_every)},
          {"--eval-every", std::to_string(o->eval_every)},
          {"--num-eval", std::to_string(o->num_eval)},
          {"--max-new-tokens", std::to_string(o->eval_max_new)},
          {"--save-dtype", std::string(dtype_name(save_dtype))},
          {"--shard-size", std::to_string(shard)},
          {"--optimizer", sc.rule.describe()}};
      check_ranks_agree(comm, flags, "the ranks' flags");
    }
    // The evaluation's flags without an evaluation (--eval, or the resumed run's) would change
    // nothing: refused, as generate refuses --seed without sampling (adversarial pass 69).
    if (o->eval.empty())
      for (const char* flag : {"--eval-every", "--num-eval", "--max-new-tokens"})
        if (const CLI::Option* opt = a->get_option(flag); opt->count() > 0)
          fail(ErrorKind::invalid_argument, "{} {} is for the evaluation (--eval FILE), which is not set: it would "
               "change nothing", flag, opt->as<std::string>());
    if (!o->resume.empty() && first_step >= o->steps) {
      if (eval_owed_at_resume != first_step || o->eval.empty()) {
        log_info("--resume: the run in {} already finished {} of {} steps", o->resume, first_step, o->steps);
        return 0;
      }
      log_info("--resume: the run in {} finished its {} steps; its final evaluation was interrupted: running it",
               o->resume, o->steps);
    }
    if (sc.peft.any() && save_dtype != DType::f32) {
      // An adapter run saves its adapters, which are fp32 (the frozen base is not saved):
      // a narrower --save-dtype would be ignored.
      check_save_dtype_option(save_dtype, given.save_dtype->count() > 0, sc.peft, OptionSource::cli);
      save_dtype = DType::f32;  // a run saved before this check recorded the flag it ignored
    }
    check_shard_size_option(given.shard->count() > 0, sc.peft);
    validate_rule(sc.rule, static_cast<float>(o->wd));
    validate_parallel(layout, comm.size(), sc.rule, o->batch, "--parallel", o->parallel);
    sc.comm = &comm;
    sc.parallel = layout;
    sc.share_host_image = o->host_image == "shared";
    sc.sliced_upload = o->upload == "sliced";
    if (o->binding) {
      // Note [Rank binding]: the GPU and the threads of this rank's share of the node.
      if (sc.threads == 0) sc.threads = o->binding->threads;
      if (o->binding->gpu >= 0 && (sc.device == "cuda" || sc.device == "auto"))
        sc.device = fmt::format("cuda:{}", o->binding->gpu);
    }
    cap_host_threads(sc.threads);  // Note [zo2-tune's threads]: the resumed run's, or the rank's
    if (model_dir.empty()) fail(ErrorKind::invalid_argument, "train needs --model DIR (or --resume DIR)");
    if (o->data.empty()) fail(ErrorKind::invalid_argument, "train needs --data FILE");
    // --out never writes over the checkpoint a run starts from: the seed log replays from it.
    for (const std::string& src : {o->model, base_model, model_dir})
      if (!src.empty() && same_directory(out, src) && !resume_in_place)
        fail(ErrorKind::invalid_argument,
             "--out {} is the model directory {}: the tuned checkpoint would overwrite the one the run starts from "
             "(and that its seed log replays from); choose another --out",
             o->out, src);
    // --out takes this run only when nothing there would be replaced without --overwrite:
    // checked before any data is read, and again once its lock is held (another writer may
    // have finished a run there in between).
    auto check_out_is_free = [&] {
      if (resume_within_out || o->overwrite) return;  // the run itself, or replacing was asked for
      if (holds_run(out)) {
        if (!std::filesystem::exists(out / kRunStateFile) && !std::filesystem::is_symlink(out / kRunCurrent))
          fail(ErrorKind::invalid_argument, "--out {} holds the seed log of a run that stopped before its first save. {}",
               o->out, unsaved_run_advice(o->out));
        if (o->resume.empty())
          fail(ErrorKind::invalid_argument,
               "--out {} already holds a run: continue it with --resume {} --out {}, or pass --overwrite to start a "
               "new run there (its checkpoint and seed log are removed)",
               o->out, o->out, o->out);
        fail(ErrorKind::invalid_argument,
             "--out {} already holds another run, which --resume {} --out {} would replace: choose another --out, "
             "or pass --overwrite to replace it (its checkpoint and seed log are removed)",
             o->out, o->resume, o->out);
      }
      if (const auto files = foreign_checkpoint_files(out); !files.empty())
        fail(ErrorKind::invalid_argument,
             "--out {} holds a checkpoint ({}) that this run's saves would replace: choose another --out, or pass "
             "--overwrite to let them",
             o->out, fmt::join(files, ", "));
    };
    if (!o->log_json.empty()) {
      // The JSON log is appended to: never one of the run directory's own files.
      const std::filesystem::path lj = std::filesystem::absolute(o->log_json), parent = lj.parent_path();
      const std::string name = lj.filename().string();
      const bool run_file = name == kRunSeedLog || name == kRunStateFile || name == kRunCurrent || name == kRunLockFile ||
                            name == "config.json" || name.ends_with(".safetensors") || name == "zo2-blocks.img" ||
                            name == "zo2-blocks.json";
      if ((same_directory(parent, out) && run_file) ||
          (same_directory(parent.parent_path(), out) && parent.filename().string().starts_with("step-")) ||
          (!o->data.empty() && same_directory(lj, o->data)) || (!o->eval.empty() && same_directory(lj, o->eval)) ||
          same_directory(parent, model_dir) || (!o->model.empty() && same_directory(parent, o->model)) ||
          (!base_model.empty() && same_directory(parent, resolve_model_dir(base_model))) ||
          (!sc.adapter_dir.empty() && same_directory(parent, sc.adapter_dir)) ||
          (!o->data_flags.tokenizer.empty() && same_directory(parent, o->data_flags.tokenizer)))
        fail(ErrorKind::invalid_argument,
             "--log-json {}: a file this run reads or saves (its seed log, state, checkpoint, model, tokenizer or "
             "data); choose another file",
             o->log_json);
      // An existing file is written over (a new run) or trimmed (a resume): only ever a JSON
      // log's — never another run's seed log or weights, a config, or notes.
      std::error_code ec;
      if (std::filesystem::is_regular_file(lj, ec) && std::filesystem::file_size(lj, ec) > 0 && !ec) {
        std::ifstream in(lj, std::ios::binary);
        std::string first;
        std::getline(in, first);
        const json j = json::parse(first, nullptr, /*allow_exceptions=*/false);
        if (!(j.is_object() && (j.contains("step") || j.contains("eval_after_step"))))
          fail(ErrorKind::invalid_argument,
               "--log-json {}: the file exists and is not a JSON log of zo2-tune train (its first line is no step "
               "record); writing it would lose it: choose another file",
               o->log_json);
      }
    }
    check_out_is_free();
    if (!o->dev.disk_dir.empty()) {
      // The block file never goes into one of this run's own checkpoints (RUN/current,
      // RUN/step-N): the run's next save replaces that directory. (A new run has no seed log
      // yet, so the session's check of other runs' checkpoints cannot tell.) RUN/blocks is fine.
      std::error_code ec;
      const auto rel = std::filesystem::weakly_canonical(std::filesystem::absolute(o->dev.disk_dir), ec)
                           .lexically_relative(std::filesystem::weakly_canonical(std::filesystem::absolute(out), ec));
      const std::string first = rel.empty() ? std::string() : rel.begin()->string();
      static const std::regex step_dir(R"(\.?step-\d+(\..*)?)");
      if (!ec && (first == kRunCurrent || std::regex_match(first, step_dir)))
        fail(ErrorKind::invalid_argument,
             "--disk-dir {}: is inside {}, one of the run's own checkpoints, which its next save replaces: choose "
             "{}/blocks or a directory of its own",
             o->dev.disk_dir, (out / first).string(), o->out);
    }

    // Validate everything cheap before touching the output directory.
    const ModelConfig config = ModelConfig::load(resolve_model_dir(model_dir));
    check_model_fits(resolve_model_dir(model_dir), config, sc.storage);  // headers and host memory, before the data
    if (!data_seed_known) o->data_seed = o->seed;
    const auto tokenizer = tokenizer_for_data(o->data, o->data_flags, model_dir);
    // With token-id data --tokenizer reads nothing, but its files are copied into the run for
    // text later (eval, generate): checked as init checks it (adversarial pass 71: a 50257-id
    // tokenizer was copied beside a 512-id model without a word; the run's eval of text failed).
    // (A directory of other tokenizer files only — tokenizer_config.json, special_tokens_map.json
    // — has nothing to check and is copied as it is.)
    if (!tokenizer && !o->data_flags.tokenizer.empty()) {
      std::unique_ptr<Tokenizer> given;
      try {
        given = Tokenizer::from_dir(o->data_flags.tokenizer);
      } catch (const Error&) {
      }
      if (const std::string why = given ? tokenizer_misfit(*given, config.vocab_size) : std::string(); !why.empty())
        fail(ErrorKind::invalid_argument, "--tokenizer {} does not fit the model {}: {}", o->data_flags.tokenizer,
             model_dir, why);
    }
    const DataOptions dopt = o->data_flags.options(o->num_train, o->data_seed, o->shuffle);
    const Dataset data = Dataset::load(o->data, config, tokenizer.get(), dopt);
    // The training set as the run's steps see it (ids, masks, labels): a resume that reads the
    // same file through a changed tokenizer (zo2 0.2.0's \s no longer matches U+180E) drew
    // other batches with no word of it (adversarial pass 51).
    const std::uint32_t data_crc = training_set_crc32(data);
    // --padding-side on fixed-length rows (a .safetensors data file, and the --eval one if
    // any): nothing is padded, so it changes nothing. Warned, not refused: one script's flags
    // often serve text and token files alike.
    auto fixed_rows = [](const std::string& f) { return f.size() >= 12 && f.ends_with(".safetensors"); };
    if (given.padding->count() > 0 && fixed_rows(o->data) && (o->eval.empty() || fixed_rows(o->eval)))
      log_warn("--padding-side {}: {} holds fixed-length token rows, which are never padded: it changes nothing",
               o->data_flags.padding_side, o->data);
    if (!(saved_data_crc >= 0 && saved_data_crc == data_crc && saved_examples == static_cast<std::int64_t>(data.size())))
      for (const std::string& w : data_warnings) log_warn("{}", w);
    if (saved_examples >= 0 && static_cast<std::int64_t>(data.size()) != saved_examples)
      log_warn("--resume: {} now gives {} training examples but the run had {}; the result will differ from an "
               "uninterrupted run",
               o->data, data.size(), saved_examples);
    else if (saved_data_crc >= 0 && saved_data_crc != data_crc)
      log_warn("--resume: {} now gives other training examples than the run's (their ids, masks and labels: CRC-32 "
               "{:08x}, the run's {:08x}): the file or its tokenizer changed, and the result will differ from an "
               "uninterrupted run",
               o->data, data_crc, static_cast<std::uint32_t>(saved_data_crc));
    else if (!o->resume.empty() && saved_data_crc < 0 && tokenizer)
      log_warn("--resume: the run's state records no fingerprint of its tokenized data (saved by an older zo2): if the "
               "tokenizer or {} changed since, the result will differ from an uninterrupted run",
               o->data);
    std::optional<Dataset> eval_data;
    if (!o->eval.empty()) {
      DataOptions eopt = dopt;
      eopt.sample = o->num_eval;
      const auto eval_tok = tokenizer ? nullptr : tokenizer_for_data(o->eval, o->data_flags, model_dir);
      eval_data = Dataset::load(o->eval, config, tokenizer ? tokenizer.get() : eval_tok.get(), eopt);
      // As `eval` refuses it: an evaluation scored by its loss decodes nothing (adversarial
      // pass 71: train took the flag, recorded it and changed nothing).
      if (!task_is_generation(eval_data->task()) && a->get_option("--max-new-tokens")->count() > 0)
        fail(ErrorKind::invalid_argument,
             "--max-new-tokens is for squad and drop (generated answers); the evaluation {} is scored by its loss "
             "alone: it would change nothing",
             o->eval);
    }
    LrSchedule schedule;
    schedule.kind = LrSchedule::parse(o->schedule);
    schedule.base_lr = o->lr;
    schedule.warmup_steps = o->warmup;
    schedule.total_steps = o->steps;
    // A training batch holds what the data trains on (copa and record: the correct candidate
    // alone); evaluation holds every candidate.
    const int candidates = std::max(data.train_rows(), eval_data ? eval_data->max_candidates() : 1);
    sc.max_batch = o->batch * candidates;
    sc.max_seq = std::max(data.train_longest(), eval_data ? eval_data->longest() : 0);
    // squad/drop: the evaluation decodes (api/generate.h) through this session: room for the
    // prompts and their new tokens, and a KV cache for a batch of them.
    const bool eval_generates = eval_data && task_is_generation(eval_data->task()) && o->eval_max_new > 0;
    if (eval_generates) {
      // MeZO's cut (Dataset::generation_prompt): a prompt keeps its last --max-len −
      // --max-new-tokens tokens; a cut that leaves nothing fails now, not at the first eval.
      if (eval_data->max_len() <= o->eval_max_new)
        fail(ErrorKind::invalid_argument, "--max-new-tokens {} leaves no room for a prompt within --max-len {}",
             o->eval_max_new, eval_data->max_len());
      sc.max_seq = static_cast<int>(std::min<std::int64_t>(
          config.max_positions,
          std::max<std::int64_t>(sc.max_seq, eval_data->longest_prompt(o->eval_max_new) + o->eval_max_new)));
      sc.generate.batch = static_cast<int>(std::min<std::int64_t>(o->batch, eval_data->size()));
    }
    sc.run_seed = o->seed;
    // Note [A resume from a rounded checkpoint] (api/run_dir.h): the session marks the seed
    // log; the disk tier's kept images are not the rounded weights, so all blocks load from
    // the checkpoint.
    const bool rounded_checkpoint = !o->resume.empty() && !sc.peft.any() && !resumed_roundings.empty();
    if (rounded_checkpoint && writer)
      log_warn("--resume: the checkpoint in {} holds the weights rounded to {} (the run stores {}): the run goes on "
               "from the rounded weights, so it differs from an uninterrupted run; its seed log records it, so replay "
               "rebuilds these weights",
               o->resume, fmt::join(resumed_roundings, " then "), dtype_name(sc.storage));
    if (!rounded_checkpoint && resume_in_place && resumed_log && sc.host_mem > 0 && !sc.disk_dir.empty() &&
        comm.size() == 1) {
      // Note [Disk tier resume] (api/session.cpp): keep the block file and apply the log's
      // updates past the checkpoint; training goes on where the log ends.
      sc.disk_resume = true;
      for (const SeedLogEntry& e : resumed_log->entries)
        if (e.step >= first_step && e.step < o->steps) sc.replay.push_back(e);
      if (!sc.replay.empty()) {
        log_info("--resume: the seed log runs {} step{} past the checkpoint (step {}): applying {}", sc.replay.size(),
                 sc.replay.size() == 1 ? "" : "s", first_step, sc.replay.size() == 1 ? "it" : "them");
        first_step = sc.replay.back().step + 1;
      }
    }
    sc.first_step = first_step;
    plan_placement(config, plan_request(config, sc, parse_device(sc.device).kind, planning_cap(sc)));
    if (comm.size() > 1) {
      // Note [One job]: the examples as loaded (ids, masks, labels, answers), whatever the files' names.
      auto digest = [](const Dataset& d) {
        Digest g;
        for (std::int64_t i = 0; i < d.size(); ++i) {
          const Example& e = d.example(i);
          g.add(e.seqs.size()).add(static_cast<std::uint64_t>(static_cast<std::int64_t>(e.label)));
          for (const Example::Seq& q : e.seqs)
            for (const std::vector<std::int32_t>* v : {&q.ids, &q.mask, &q.labels})
              g.add(v->size()).add(v->data(), v->size() * sizeof(std::int32_t));
          g.add(e.golds.size()).add(e.golds.data(), e.golds.size() * sizeof(int));
          g.add(e.prompt_ids.size()).add(e.prompt_ids.data(), e.prompt_ids.size() * sizeof(std::int32_t));
          for (const std::string& a : e.answers) g.add(a);
        }
        return fmt::format("{} examples, digest {}", d.size(), g.hex());
      };
      std::vector<RankPart> parts{{"the training data (--data)", digest(data)},
                                  {"the evaluation data (--eval)", eval_data ? digest(*eval_data) : "none"},
                                  {"--data-seed", std::to_string(o->data_seed)},
                                  {"--shuffle", o->shuffle ? "on" : "off"}};
      for (RankPart& p : session_fingerprint(model_dir, sc)) parts.push_back(std::move(p));
      check_ranks_agree(comm, parts, "the ranks' data and model");
      sc.ranks_agreed = true;
    }
    // Every rank has validated its flags and data; only rank 0 touches --out.
    comm.barrier("checking the flags and data");
    if (writer && !lock) {
      lock.emplace(out);  // creates --out; cleans what an interrupted save left
      check_out_is_free();
    }
    if (writer) ensure_writable_dir(out);
    if (writer && o->overwrite && !resume_within_out) {
      // --overwrite replaces the run in --out, never what this run starts from or reads: a
      // checkpoint (--model RUN/current --out RUN), an adapter (--adapter RUN), a seed log, a
      // tokenizer (--tokenizer RUN/current) or a data file that remove_run takes would be gone
      // before it is read, leaving neither run (adversarial pass 71: --adapter RUN --out RUN
      // --overwrite removed the run, then failed to read its adapter).
      const std::pair<std::filesystem::path, const char*> inputs[] = {
          {model_dir, "this run starts from it"},
          {resumed_log_path, "this run starts from it"},
          {sc.adapter_dir, "this run starts from it (--adapter)"},
          {o->data_flags.tokenizer, "this run reads its tokenizer from it (--tokenizer)"},
          {o->data, "this run reads it (--data)"},
          {o->eval, "this run reads it (--eval)"}};
      for (const auto& [p, why] : inputs)
        if (!p.empty() && removed_with_run(p, out))
          fail(ErrorKind::invalid_argument,
               "--overwrite with --out {}: {} is inside it, and {}; replacing the run there would remove it first: "
               "choose another --out{}",
               o->out, p.string(), why,
               o->resume.empty() ? "" : fmt::format(" (to carry the run on, drop --overwrite and give --out {})",
                                                    run_of_checkpoint(o->resume).string()));
      remove_run(out);
    }
    // A run saved by a C API or Python session keeps its seed log where the host put it:
    // the run directory's own log starts as that log's prefix, so it keeps the run's header
    // (base, fingerprint, first step) and replays from the run's base.
    std::error_code log_ec;
    const bool own_log = resume_in_place && std::filesystem::equivalent(resumed_log_path, out / kRunSeedLog, log_ec);
    if (writer && append_log && !own_log) {
      // The log up to the resume step, as the checkpoint was saved with it.
      std::ifstream in(resumed_log_path, std::ios::binary);
      std::string prefix(resumed_log_bytes, '\0');
      if (!in.read(prefix.data(), static_cast<std::streamsize>(prefix.size())))
        fail(ErrorKind::io, "{}: cannot read", resumed_log_path.string());
      write_file_atomic(out / kRunSeedLog, prefix);
    }
    sc.seed_log = out / kRunSeedLog;
    sc.seed_log_append = append_log;
    sc.base_model = base_model.empty() ? "" : std::filesystem::absolute(base_model).string();

    JsonLogLock log_json_lock;  // Note [One writer per JSON log]; outlives the stream below
    std::unique_ptr<std::ofstream> log_json;
    bool eval_logged_at_first = false;  // the JSON log holds the evaluation after step first_step
    if (!o->log_json.empty() && writer) {
      log_json_lock.take(o->log_json);
      if (append_log && std::filesystem::is_regular_file(o->log_json)) {  // not a pipe (Python's records)
        // A run killed after its last checkpoint logged steps this resume runs again: its
        // records past first_step go (and a torn last line), so each step is in the log once.
        std::ifstream in(o->log_json, std::ios::binary);
        std::string kept_lines, line;
        std::int64_t dropped = 0;
        while (std::getline(in, line)) {
          const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
          const bool ok = j.is_object() && ((j.contains("step") && j["step"].is_number_integer() &&
                                             j["step"].get<std::int64_t>() <= first_step) ||
                                            (j.contains("eval_after_step") && j["eval_after_step"].is_number_integer() &&
                                             j["eval_after_step"].get<std::int64_t>() <= first_step));
          if (ok) kept_lines += line + "\n";
          else ++dropped;
          if (ok && j.contains("eval_after_step") && j["eval_after_step"].get<std::int64_t>() == first_step)
            eval_logged_at_first = true;
        }
        if (dropped > 0) {
          // The file itself, where a link (logs/latest.jsonl -> run1.jsonl) names it: the
          // link stays a link (pass 54: it became a copy, and run1.jsonl kept its records).
          write_file_atomic(std::filesystem::weakly_canonical(std::filesystem::absolute(o->log_json)), kept_lines);
          log_json_lock.take(o->log_json);  // the new file in its place
          log_info("--log-json {}: {} record{} past step {} removed (this run logs those steps again)", o->log_json,
                   dropped, dropped == 1 ? "" : "s", first_step);
        }
      }
      // A FIFO no program reads yet would hold this open(2) with nothing said (pass 54). The
      // probe stays open until the stream is: closing it first lets a reader that is already
      // there see end-of-file and leave, and the stream's open would then wait for ever.
      int probe = -1;
      if (std::error_code ec; std::filesystem::is_fifo(o->log_json, ec)) {
        probe = ::open(o->log_json.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        if (probe < 0 && errno == ENXIO)
          log_info("--log-json {}: a FIFO that no program reads yet; waiting for one to open it", o->log_json);
      }
      log_json = std::make_unique<std::ofstream>(o->log_json, append_log ? std::ios::app : std::ios::trunc);
      if (probe >= 0) ::close(probe);
      if (!*log_json) {
        if (!log_json_kept) fail(ErrorKind::io, "{}: cannot write the JSON log", o->log_json);
        log_warn("--resume: the run's JSON log {} cannot be written here; no JSON log (give --log-json FILE)",
                 o->log_json);
        log_json.reset();
      }
    }

    std::unique_ptr<std::ofstream> records;
    if (!o->records.empty() && writer) {
      records = std::make_unique<std::ofstream>(o->records, std::ios::binary);
      if (!*records) fail(ErrorKind::io, "{}: cannot write the records", o->records);
    }
    // A record that cannot be written (a full disk) stops the run after this step: saved, then
    // exit 1 naming it, never a log that silently ends. The torn record is cut off the file.
    std::string log_failure;
    int log_failure_errno = 0;
    // Tests only (tests/fault/records.sh): SIGKILL right after the record "eval:N" (the
    // evaluation after step N) or "step:N" is written, ZO2_TEST_KILL_AFTER_RECORD.
    const std::string kill_after_record = std::getenv("ZO2_TEST_KILL_AFTER_RECORD") ? std::getenv("ZO2_TEST_KILL_AFTER_RECORD") : "";
    auto emit = [&](const json& j) {  // one record to the JSON log and the host's records
      struct KillAfter {
        const std::string& spec;
        const json& j;
        ~KillAfter() {
          if (spec.empty()) return;
          const std::string me = j.contains("step") ? fmt::format("step:{}", j["step"].dump())
                                                    : fmt::format("eval:{}", j.value("eval_after_step", json()).dump());
          if (me == spec) std::raise(SIGKILL);
        }
      } kill_after{kill_after_record, j};
      for (std::unique_ptr<std::ofstream>* f : {&log_json, &records}) {
        if (!*f) continue;
        const std::streampos before = (*f)->tellp();
        errno = 0;
        **f << j.dump() << "\n";
        (*f)->flush();
        if (**f) continue;
        const int e = errno;
        const bool is_log = f == &log_json;
        const std::string file = is_log ? o->log_json : o->records;
        std::error_code ec;
        if (is_log && before != std::streampos(-1)) std::filesystem::resize_file(file, static_cast<std::uintmax_t>(before), ec);
        f->reset();
        const std::string what = j.contains("step") ? fmt::format("step {}'s record", j["step"].dump())
                                                    : fmt::format("the record of the evaluation after step {}",
                                                                  j.value("eval_after_step", json()).dump());
        log_failure_errno = e;
        log_failure = fmt::format("{} {}: cannot write {} ({}{}); the log has no records from there on",
                                  is_log ? "--log-json" : "--records", file, what,
                                  e != 0 ? std::strerror(e) : "a write error",
                                  e == EPIPE ? ": the program reading it exited" : "");
        log_warn("{}: the run stops after this step", log_failure);
      }
    };

    // Note [A run's flags in its seed log]
    // ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    // What the run's checkpoints record of how it trains (zo2_state.json, Note [What a resume
    // keeps]) is also the seed log header's "run", written before the first step. A run killed
    // before its first save leaves only the log: `replay` rebuilds its weights and writes these
    // flags into the state it saves, so `train --resume` of that checkpoint carries on with the
    // run's data, lr, schedule, batch and the rest — given again they were easy to get wrong
    // (a schedule or a --shuffle left at its default changed the run with nothing said). The
    // paths a resume writes (run_dir, --log-json, --disk-dir) stay out: they belong to the
    // directory (Note [What a resume keeps]). A resumed run keeps the header it has and
    // records flags it changed on its first step (below).
    const json run_flags = json{{"total_steps", o->steps},
                                {"lr", o->lr},
                                {"eps", o->eps},
                                {"weight_decay", o->wd},
                                {"lr_schedule", o->schedule},
                                {"warmup_steps", o->warmup},
                                {"batch_size", o->batch},
                                {"data", std::filesystem::absolute(data.source()).string()},
                                {"eval", o->eval.empty() ? std::string() : std::filesystem::absolute(o->eval).string()},
                                {"data_examples", data.size()},
                                {"data_crc32", data_crc},
                                {"task", o->data_flags.task},
                                {"max_len", o->data_flags.max_len},
                                {"padding_side", o->data_flags.padding_side},
                                {"num_train", o->num_train},
                                {"shuffle", o->shuffle},
                                {"data_seed", o->data_seed},
                                {"base_model", base_model},
                                {"shard_bytes", shard},
                                {"parallel", layout.spec()},
                                // Note [What a resume keeps]: how the run runs.
                                {"compute_dtype", o->dev.compute},
                                {"device", o->dev.device},
                                {"gpu_mem", o->dev.gpu_mem},
                                {"offload", o->dev.offload},
                                {"window", o->dev.window},
                                {"tile", o->dev.tile},
                                {"threads", o->dev.threads},
                                {"host_mem", o->dev.host_mem},
                                {"disk_lag", o->dev.disk_lag},
                                {"disk_staging", o->dev.disk_staging},
                                {"eval_every", o->eval_every},
                                {"num_eval", o->num_eval},
                                {"max_new_tokens", o->eval_max_new},
                                {"save_every", o->save_every},
                                {"log_every", o->log_every},
                                {"host_image", o->host_image},
                                {"upload", o->upload}};
    sc.seed_log_run_flags = run_flags.dump(-1, ' ', false, json::error_handler_t::replace);
    // A resume that trains with other flags than the log records (the header's, or the last
    // change before this step) records them on its first step, where replay takes them up
    // (pass 58's review: a replayed checkpoint of a resumed run otherwise got the flags the run
    // started with — its old --steps below the step it is at, its old lr).
    if (append_log && resumed_log && writer) {
      std::string logged = resumed_log->header.run_flags;
      for (const SeedLogEntry& e : resumed_log->entries)
        if (e.step < sc.first_step && !e.run_flags.empty()) logged = e.run_flags;
      if (logged.empty() || parse_json_text(logged, resumed_log_path.string()) != run_flags)
        sc.seed_log_run_update = sc.seed_log_run_flags;
    }

    // Ranks: a failing rank ends the job through Comm::abort (Note [Rank faults]) without
    // tearing its session down first — that could wait on peers that will never answer.
    auto session_owner = std::make_unique<Session>(model_dir, sc);
    Session& session = *session_owner;
    struct KeepOnRankError {
      std::unique_ptr<Session>& session;
      bool ranks;
      ~KeepOnRankError() {
        if (ranks && std::uncaught_exceptions() > 0) (void)session.release();
      }
    } keep_on_rank_error{session_owner, comm.size() > 1};
    log_info("train: {} ({} blocks, {:.1f}M parameters) on {}; steps {}..{}", model_dir, config.num_layers,
             static_cast<double>(config.total_params()) / 1e6, session.device().name(), first_step + 1, o->steps);
    log_info("train data: {}", data.describe());
    if (eval_data) log_info("eval data: {}", eval_data->describe());
    log_info("update rule: {}; parameters: {}", sc.rule.describe(), sc.peft.describe());
    log_info("{}", session.placement().describe(config));
    if (comm.size() > 1) log_info("ranks: {}; layout {}", comm.describe(), layout.describe());

    // Weights a narrower save dtype cannot hold are refused now, not at the first save after
    // hours of steps (which would end the run with nothing saved).
    if (writer && !sc.peft.any() && save_dtype != DType::f32 && save_dtype != sc.storage) {
      try {
        session.store().check_finite(save_dtype);
      } catch (const Error& e) {
        // Nothing ran: a new run leaves no seed log behind (it would hold --out as a run
        // stopped before its first save).
        session_owner.reset();
        if (o->resume.empty()) {
          std::error_code ec;
          std::filesystem::remove(out / kRunSeedLog, ec);
        }
        fail(ErrorKind::invalid_argument, "--save-dtype {}: {}", dtype_name(save_dtype), e.what());
      }
    }
    // Read now: a resumed run's starting step directory is removed by a later save, and its
    // saves after that one lost the tokenizer (adversarial pass 51).
    const std::filesystem::path tokenizer_src =
        o->data_flags.tokenizer.empty() ? resolve_model_dir(model_dir) : std::filesystem::path(o->data_flags.tokenizer);
    const auto tokenizer_files = read_tokenizer_files(tokenizer_src);
    std::uint64_t tokenizer_bytes = 0;
    for (const auto& [name, text] : tokenizer_files) tokenizer_bytes += name.size() + text.size();
    // Note [Save refusals up front] (api/session.cpp): a save into --out that would be refused
    // for whose directory it is is refused now, before any step runs, not after all of them;
    // so is one its file system has no room for (Note [Room for a save] in
    // runtime/file_util.h): the run saves at least once, at its end.
    if (writer) {
      try {
        session.check_save_target(out, o->overwrite);
        Session::SaveExtras room;
        room.extra_bytes = tokenizer_bytes;
        room.out_option = "--out";
        room.dtype_option = "--save-dtype";
        session.check_save_room(out, save_dtype, shard, room);
      } catch (const Error&) {
        // Nothing ran: a new run leaves no seed log behind (ranks: Note [Rank faults], the
        // session is not torn down under peers that wait in it).
        if (comm.size() > 1) throw;
        session_owner.reset();
        if (o->resume.empty()) {
          std::error_code ec;
          std::filesystem::remove(out / kRunSeedLog, ec);
        }
        throw;
      }
    }
    // Every rank of the run has its weights and tokenizer in memory now: none holds the
    // checkpoint it resumed from, or the run's saves could not remove it (Note [Readers of a
    // live run]).
    release_read_pin(out);
    // Note [An interrupted evaluation]: a stop during the evaluation after step N ends it
    // unrecorded; the checkpoint of step N says it is owed and a resume runs it first.
    std::int64_t eval_owed = -1;
    // The last checkpoint saved: a stop (--stop-at, a signal) right after a periodic save of the
    // same step and state does not write it again (a 175B save twice in a preemption's grace).
    std::int64_t saved_step = -1;
    bool saved_owing = false;
    double paused_seconds = 0;  // spent in evaluations and saves (the step rates leave it out)
    double last_save_s = 0;     // how long the last save took (a grace period must hold one)
    double save_seconds = 0, eval_seconds = 0;  // the saves' and evaluations' time in this process,
    std::int64_t saves_done = 0, evals_done = 0;  // for the ETA (Note [The ETA])
    auto save = [&](std::int64_t next_step) {
      const auto save_start = std::chrono::steady_clock::now();
      struct Timed {
        std::chrono::steady_clock::time_point t0;
        double& paused;
        double& last;
        double& total;
        std::int64_t& count;
        ~Timed() {
          last = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          paused += last;
          total += last;
          ++count;
        }
      } timed{save_start, paused_seconds, last_save_s, save_seconds, saves_done};
      ZO2_CHECK(session.next_step() == next_step);
      Session::SaveExtras x;
      x.replace_checkpoint = o->overwrite;  // refused without it, before any work
      x.extra_bytes = tokenizer_bytes;  // Note [Room for a save]: checked before each save
      x.out_option = "--out";
      x.dtype_option = "--save-dtype";
      x.state = run_flags;
      // Where the run lives: a copy of the directory is told apart (its resume leaves the
      // original's JSON log and block file alone).
      x.state["run_dir"] = std::filesystem::weakly_canonical(std::filesystem::absolute(out)).string();
      x.state["disk_dir"] =
          o->dev.disk_dir.empty() ? std::string() : std::filesystem::absolute(o->dev.disk_dir).string();
      // A file, not a pipe or a terminal: what a later resume can append to, as the file
      // itself (--log-json /dev/stdout > f.jsonl is f.jsonl; pass 54: a resume's trim renamed a
      // file over /dev/stdout).
      x.state["log_json"] = [&] {
        if (o->log_json.empty()) return std::string();
        std::error_code ec;
        const std::filesystem::path f = std::filesystem::weakly_canonical(std::filesystem::absolute(o->log_json), ec);
        const std::filesystem::file_status st = std::filesystem::symlink_status(f, ec);
        // (a pipe, even a named one, is not kept: its reader is gone by the resume, which
        // would wait on it forever; an anonymous pipe's name is "pipe:[N]")
        return !ec && std::filesystem::is_regular_file(st) ? f.string() : std::string();
      }();
      // An adapter run's frozen base, as the run read it: a resume checks the base it finds
      // (or the --model naming where it moved) against it, beside the weights' fingerprint.
      if (sc.peft.any()) x.state["base_config"] = config.to_json();
      if (eval_owed == next_step) x.state["eval_owed_after_step"] = eval_owed;
      x.extra_files = [&](const std::filesystem::path& dir) {
        write_tokenizer_files(tokenizer_files, dir);
        // generation_config.json is the model's, which Session::save writes next: never the
        // --tokenizer directory's (nor any when the model has none).
        std::error_code ec;
        std::filesystem::remove(dir / Session::kGenerationConfig, ec);
      };
      session.save(out, save_dtype, shard, x);
      saved_step = next_step;
      saved_owing = eval_owed == next_step;
    };

    StopSignals stop_signals;  // Note [Stop signals]: through the final save
    // The step this process stops after (the ETA's end: Note [The ETA]).
    const std::int64_t stop = o->stop_at > 0 ? std::min(o->stop_at, o->steps) : o->steps;
    Progress progress(o->steps, stop, o->log_every);
    // The batches of one evaluation, as evaluate() makes them (Note [The ETA]).
    const std::int64_t eval_per_batch = eval_data ? eval_examples_per_batch(*eval_data, sc.max_batch) : 1;
    const std::int64_t eval_batches = eval_data ? (eval_data->size() + eval_per_batch - 1) / eval_per_batch : 0;
    const auto start = std::chrono::steady_clock::now();
    const TransferTotals t0 = session.scheduler().totals();
    std::int64_t completed = 0;
    std::int64_t next = first_step;
    // The tokens of each step in flight, by step (taken at harvest): the batch's own tokens,
    // padding left out (a batch pads to its longest row: B·T would count the padding as work
    // done, 3× the tokens on data of mixed lengths: pass 62).
    std::map<std::int64_t, std::int64_t> step_tokens;
    double tokens_done = 0;
    double last_stepping = 0;  // the stepping time at the previous step's result
    double disk_bytes = 0;  // the disk tier's reads and writes so far
    std::int64_t skipped = 0, skipped_in_a_row = 0;
    struct RatePoint {
      double t, tokens;  // stepping time (paused_seconds left out) and tokens done
    };
    constexpr std::size_t kRateWindow = 32;
    std::deque<RatePoint> rate_window;
    StepResult last_skipped;
    // Each step's progress and record, as the session collects its result: before its seed-log
    // line (Note [Records before the log line]).
    auto on_result = [&](const StepResult& r) {
      if (r.update_skipped) {
        ++skipped;
        ++skipped_in_a_row;
        last_skipped = r;
      } else {
        skipped_in_a_row = 0;
      }
      const auto now = std::chrono::steady_clock::now();
      ++completed;
      const double elapsed = std::chrono::duration<double>(now - start).count();
      std::int64_t tokens = 0;
      if (const auto it = step_tokens.find(r.step); it != step_tokens.end()) {
        tokens = it->second;
        tokens_done += static_cast<double>(tokens);
        step_tokens.erase(it);
      }
      // Rates over the last kRateWindow steps: the time between two harvests says little when
      // a rule waits inside each step (zo-sgd-cons) or when steps overlap, and the whole run's
      // mean stays wrong long after a pause (Ctrl-Z and fg, a suspended job: pass 54). The
      // evaluations' and saves' time is left out of the step rates; the ETA adds it back as a
      // share per step (they recur).
      const double stepping = std::max(0.0, elapsed - paused_seconds);
      rate_window.push_back({stepping, tokens_done});
      if (rate_window.size() > kRateWindow + 1) rate_window.pop_front();
      const RatePoint& from = rate_window.size() > 1 ? rate_window.front() : RatePoint{0, 0};
      const double span = stepping - from.t;
      const double span_steps = rate_window.size() > 1 ? static_cast<double>(rate_window.size() - 1) : 1.0;
      const double step_s = span / span_steps;
      const double tok_s = span > 0 ? (tokens_done - from.tokens) / span : 0;
      // This step's own time and rate, for its --log-json record (the progress line shows the
      // window's: pass 62 found the records smeared over 32 steps).
      const double this_step_s = std::max(0.0, stepping - last_stepping);
      last_stepping = stepping;
      EtaInputs ei;  // Note [The ETA] (tools/cli.h)
      ei.steps = stop;
      ei.done = r.step + 1;
      ei.step_s = step_s;
      ei.evaluates = eval_data.has_value();
      ei.eval_every = o->eval_every;
      ei.save_every = o->save_every;
      ei.eval_batches = eval_generates ? 0 : eval_batches;
      ei.eval_seconds = eval_seconds;
      ei.evals_done = evals_done;
      ei.save_seconds = save_seconds;
      ei.saves_done = saves_done;
      const double eta = train_eta(ei);
      const TransferTotals tt = session.scheduler().totals();
      const double pcie = elapsed > 0 ? static_cast<double>(tt.h2d_bytes + tt.d2h_bytes - t0.h2d_bytes - t0.d2h_bytes) / elapsed / 1e9 : 0;
      disk_bytes += static_cast<double>(r.disk_read_bytes + r.disk_write_bytes);
      const double disk = session.store().disk() ? (elapsed > 0 ? disk_bytes / elapsed / 1e9 : 0) : -1;
      if (writer) progress.report(r, step_s, tok_s, eta, session.device_peak(), pcie, disk);
      if (log_json || records) {
        json j{{"step", r.step + 1},
               {"loss_plus", r.loss_plus},
               {"loss_minus", r.loss_minus},
               {"loss", r.loss},
               {"g", std::isfinite(r.g) ? json(r.g) : json(nullptr)},
               {"update_skipped", r.update_skipped},
               {"lr", r.lr},
               {"eps", r.eps},
               {"seed", r.seed},
               {"tokens", tokens},
               {"tokens_per_s", this_step_s > 0 ? static_cast<double>(tokens) / this_step_s : 0.0},
               {"step_time_s", this_step_s},
               {"device_peak_bytes", session.device_peak()},
               {"h2d_bytes", r.h2d_bytes},
               {"d2h_bytes", r.d2h_bytes},
               {"upload_busy_s", r.upload_busy_s},
               {"compute_busy_s", r.compute_busy_s},
               {"offload_busy_s", r.offload_busy_s}};
        if (session.store().disk()) {
          j["disk_read_bytes"] = r.disk_read_bytes;
          j["disk_write_bytes"] = r.disk_write_bytes;
          j["disk_read_busy_s"] = r.disk_read_busy_s;
          j["disk_write_busy_s"] = r.disk_write_busy_s;
        }
        emit(j);
      }
    };
    session.set_result_hook(on_result);
    struct ClearHook {  // the hook captures this scope's locals; the session may outlive them
      Session& session;
      ~ClearHook() { session.set_result_hook({}); }
    } clear_hook{session};
    auto harvest = [&](std::int64_t step) { (void)session.wait(step); };
    std::int64_t in_flight = -1;
    // Ranks stop together: a signal seen by any rank (mpirun forwards SIGINT/SIGTERM to all,
    // but not at the same instant) stops every rank after the same step.
    auto stop_requested = [&] {
      const int local = g_stop_signal.load();
      const bool output_failed = !log_failure.empty() || !progress.failure().empty();
      if (comm.size() == 1) return local != 0 || output_failed;
      const double mine = local != 0 ? local : output_failed ? -1 : 0;  // -1: rank 0's log or progress failed
      const std::vector<double> all = comm.all_gather(std::span<const double>(&mine, 1), "the stop flags");
      bool any = false;
      for (double v : all)
        if (v > 0) {
          if (g_stop_signal.load() == 0) g_stop_signal.store(static_cast<int>(v));
          any = true;
        } else if (v < 0) {
          any = true;
        }
      return any;
    };
    bool noted = false;  // squad/drop: their metric needs generation, said once
    // Tests only (tests/fault/eval_interrupt.sh): SIGINT arrives as the evaluation after
    // step N asks for the K-th time whether to stop, ZO2_TEST_SIGINT_IN_EVAL=N:K.
    const char* sigint_in_eval = std::getenv("ZO2_TEST_SIGINT_IN_EVAL");
    // Runs the evaluation after step `done`; false: a stop interrupted it (nothing recorded).
    auto run_eval = [&](std::int64_t done) -> bool {
      if (!eval_data) return true;
      const auto t = std::chrono::steady_clock::now();
      std::int64_t asked = 0;
      auto eval_stop = [&] {
        ++asked;
        if (sigint_in_eval && std::string(sigint_in_eval) == fmt::format("{}:{}", done, asked)) std::raise(SIGINT);
        return stop_requested();
      };
      std::optional<EvalProgressLine> line;
      if (writer) {
        progress.newline();
        line.emplace(fmt::format("eval after step {}", done));
      }
      auto eval_progress = [&line](std::int64_t n, std::int64_t total, std::int64_t tokens) {
        if (line) line->report(n, total, tokens);
      };
      EvalResult e = evaluate(session, *eval_data, sc.max_batch, eval_stop, eval_progress);
      // Non-finite logits (weights that overflow on the --eval data) give no metric: the
      // evaluation is logged with a null loss and nothing else, and training goes on (its own
      // losses decide whether it stops: kMaxSkippedInARow).
      std::string non_finite = !e.interrupted && !std::isfinite(e.loss)
                                   ? fmt::format("its loss is {}", e.loss) : std::string();
      if (eval_generates && !e.interrupted && non_finite.empty()) {
        const auto eval_tok = tokenizer ? nullptr : tokenizer_for_data(o->eval, o->data_flags, model_dir);
        const EvalResult g =
            evaluate_generation(session, *eval_data, tokenizer ? *tokenizer : *eval_tok, o->eval_max_new, eval_stop,
                                eval_progress);
        e.interrupted = g.interrupted;
        e.metrics = g.metrics;
        e.note.clear();
        if (g.non_finite) non_finite = g.note;
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
      paused_seconds += s;
      if (!e.interrupted) {
        eval_seconds += s;
        ++evals_done;
      }
      if (line) line->finish();
      if (e.interrupted) {
        eval_owed = done;
        log_warn("the evaluation after step {} was interrupted after {}: not recorded; --resume runs it first", done,
                 format_duration(s));
        return false;
      }
      if (!non_finite.empty()) {
        log_warn("the evaluation after step {} is not finite ({}): the model's logits overflow on the --eval data; "
                 "no metric is reported (its --log-json record has eval_loss null)",
                 done, non_finite);
        if (log_json || records)
          emit(json{{"eval_after_step", done}, {"eval_loss", nullptr}, {"eval_examples", e.examples},
                    {"eval_tokens", e.tokens}});
        return true;
      }
      std::string extra;
      for (const auto& [name, value] : e.metrics)
        if (name != "accuracy") extra += fmt::format(", {} {:.4f}", name, value);
      if (e.accuracy >= 0)
        log_info("eval after step {}: loss {:.4f}, accuracy {:.4f}{} ({} examples, {})", done, e.loss, e.accuracy,
                 extra, e.examples, format_duration(s));
      else if (eval_generates)
        log_info("eval after step {}: gold-answer loss {:.4f}{} ({} examples, greedy up to {} new tokens, {})", done, e.loss,
                 extra, e.examples, o->eval_max_new, format_duration(s));
      else
        log_info("eval after step {}: loss {:.4f}, perplexity {:.3f} ({} tokens, {})", done, e.loss, std::exp(e.loss),
                 e.tokens, format_duration(s));
      if (!e.note.empty() && !noted) {
        log_info("{}", e.note);
        noted = true;
      }
      if (log_json || records) {
        json j{{"eval_after_step", done}, {"eval_loss", e.loss}, {"eval_examples", e.examples}, {"eval_tokens", e.tokens}};
        if (e.accuracy >= 0) j["eval_accuracy"] = e.accuracy;
        for (const auto& [name, value] : e.metrics) j["eval_" + name] = value;
        emit(j);
      }
      return true;
    };
    // Tests only (tests/mpi/ranks.sh): one rank hangs before a step, as a stuck process would.
    const char* hang_rank = std::getenv("ZO2_TEST_HANG_RANK");
    const char* hang_step = std::getenv("ZO2_TEST_HANG_AT_STEP");
    // A disk-tier resume past the checkpoint (Note [Disk tier resume]) starts after steps the
    // killed run finished; an evaluation due after the last of them may not have run (or its
    // record not been written): it runs now. So does one a stop interrupted (Note [An
    // interrupted evaluation]), whatever --eval-every is now. (At the last step, the final
    // evaluation below is it.)
    const bool eval_owed_now = eval_owed_at_resume == next ||
                               (!sc.replay.empty() && o->eval_every > 0 && next % o->eval_every == 0);
    if (eval_owed_now && next < stop && !eval_logged_at_first) run_eval(next);
    while (next < stop && !stop_requested() && skipped_in_a_row < kMaxSkippedInARow) {
      if (hang_rank && hang_step && std::atoi(hang_rank) == comm.rank() && std::atoll(hang_step) == next)
        for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
      const HostBatch b = data.train_batch(next, o->batch);
      step_tokens[next] = b.unpadded_tokens();
      const auto lr_t = static_cast<float>(schedule.at(next));
      session.step_async(b, lr_t, static_cast<float>(o->eps), static_cast<float>(o->wd));
      if (in_flight >= 0) harvest(in_flight);  // losses are read a step behind
      in_flight = next;
      ++next;
      if (o->eval_every > 0 && next % o->eval_every == 0 && next < stop) {
        harvest(in_flight);
        in_flight = -1;
        run_eval(next);
      }
      if (o->save_every > 0 && next % o->save_every == 0 && next < o->steps) {
        // (an evaluation at this step has harvested it already)
        if (in_flight >= 0) harvest(in_flight);
        in_flight = -1;
        save(next);
        progress.newline();
        log_info("saved step {} to {} in {:.1f} s", next, out.string(), last_save_s);
      }
    }
    if (in_flight >= 0) harvest(in_flight);
    int sig = g_stop_signal.load();
    const bool diverged = skipped_in_a_row >= kMaxSkippedInARow;
    // (a disk-tier resume that applied every step: the killed run's log may hold this one)
    // The evaluation the uninterrupted run makes here, at its end or an --eval-every step: a
    // --stop-at elsewhere makes none, as a signal's stop does, so a stop and its resume log
    // the uninterrupted run's evaluations, no more (adversarial pass 71: one more, at the stop).
    // (And the one a resume owes at its first step, whatever its --steps now: review of pass 71.)
    const bool eval_here = next == o->steps || (o->eval_every > 0 && next % o->eval_every == 0) ||
                           (next == first_step && eval_owed_at_resume == next);
    const bool eval_due = eval_data && !diverged && eval_here && !(next == first_step && eval_logged_at_first);
    if (sig == 0 && eval_due && !run_eval(next))
      sig = g_stop_signal.load();  // (0 when a failed --log-json write stopped it: that error follows)
    else if (sig != 0 && eval_due)
      eval_owed = next;  // a signal during the last step: the evaluation due here is owed, as one it interrupts
    if (sig != 0) {
      progress.newline();
      std::string reason;
      {
        std::lock_guard<std::mutex> lock(g_stop_reason_mu);
        reason = g_stop_reason;
      }
      if (!reason.empty()) log_warn("{} after step {}: saving", reason, next);
      else log_warn("interrupted by signal {} (SIG{}) after step {}: saving", sig, sigabbrev_np(sig) ? sigabbrev_np(sig) : "?", next);
    }
    if (saved_step != next || saved_owing != (eval_owed == next)) save(next);
    else log_info("step {} is saved already", next);
    stop_signals.restore();
    if (skipped > 0) progress.newline();
    if (diverged)
      fail(ErrorKind::aborted,
           "stopped after step {}: the last {} steps' losses were not finite (step {}: L+ = {}, L- = {}), so their "
           "updates were skipped ({} of the {} steps run). The weights are finite and saved to {}; look for an "
           "overflow in the forward pass (a huge weight, fp16 compute) or a data problem. The weights of an earlier "
           "step, before the losses grew, are rebuilt by `zo2-tune replay --seed-log {} --until-step N --model BASE "
           "--out NEW` (BASE: the model the run started from)",
           next, skipped_in_a_row, last_skipped.step + 1, last_skipped.loss_plus, last_skipped.loss_minus, skipped,
           completed, out.string(), (out / kRunSeedLog).string());
    if (!log_failure.empty())
      fail(ErrorKind::io, "{}. Stopped after step {} and saved to {}; {} (the records of the steps up to {} stay missing "
           "from the log)",
           log_failure, next, out.string(),
           log_failure_errno == EPIPE ? "resume it with --resume once a program reads the log"
           : log_failure_errno == ENOSPC || log_failure_errno == EDQUOT || log_failure_errno == EFBIG
               ? "resume it once the disk has room"
               : "resume it once the log can be written",
           next);
    // (this message itself may be lost with the progress: the exit status 1 says it)
    if (!progress.failure().empty())
      fail(ErrorKind::io, "{}. Stopped after step {} and saved to {}; resume it with --resume {} --out {}",
           progress.failure(), next, out.string(), out.string(), out.string());
    if (skipped > 0)
      log_warn("{} of the {} steps run had a non-finite projected gradient; their updates were skipped", skipped,
               completed);
    const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    log_info("train: {} step{} in {}, device peak {} (arena {}), saved to {} (its last save took {:.1f} s)", completed,
             completed == 1 ? "" : "s", format_duration(total_s), format_bytes(static_cast<double>(session.device_peak())),
             format_bytes(static_cast<double>(session.device().arena().capacity())), out.string(), last_save_s);
    return sig != 0 ? 130 : 0;
  };
  return [o, body] {
    std::unique_ptr<Comm> comm = make_comm_from_environment();
    if (comm->size() == 1) return body(*comm);
    comm->set_timeout(o->rank_timeout);
    // Note [Rank binding]: before any thread pool or host image exists.
    const bool cuda = parse_device(o->dev.device).kind == DeviceKind::cuda;
    o->binding = bind_rank(comm->local_rank(), comm->local_size(),
                           cuda ? cuda_pci_bus_ids() : std::vector<std::string>{}, /*apply=*/true);
    if (log_level() <= LogLevel::info)
      print_stderr("[rank {}/{}] {}\n", comm->rank(), comm->size(), o->binding->describe());
    if (comm->rank() != 0 && log_level() < LogLevel::warn) log_set_level(LogLevel::warn);
    // Note [Rank faults]: an error on any rank ends every rank (never a hang).
    int code = 1;
    try {
      const int rc = body(*comm);
      comm->barrier("the end of the run");
      return rc;
    } catch (const Error& e) {
      print_stderr("zo2-tune: error: rank {} of {}: {}\n", comm->rank(), comm->size(), e.what());
      code = e.kind() == ErrorKind::invalid_argument ? 2 : 1;
    } catch (const std::exception& e) {  // (a refused TBB thread said as a thread limit: describe_error)
      print_stderr("zo2-tune: error: rank {} of {}: {}\n", comm->rank(), comm->size(), describe_error(e));
    }
    std::fflush(stderr);
    comm->abort(code);
    return code;  // not reached
  };
}

}  // namespace zo2::cli
