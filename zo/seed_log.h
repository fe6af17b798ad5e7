// The seed log (DESIGN.md §1): a training run is its start checkpoint plus one line per
// step, (step, seed, g, lr, eps, wd), a few bytes per step. `zo2-tune replay` rebuilds the
// tuned weights from them exactly. The file is JSON Lines: a header object, then one
// object per applied step, appended and flushed as the run goes, so a crash loses at most
// the step in flight.
//
// Note [Seed log integrity]: the reader accepts only what a run can have written — steps
// consecutive from the header's first_step, each seed the one the header's run seed
// derives for that step (derive_step_seed), finite lr ≥ 0, eps > 0 and wd, g a number or
// one of the markers "nan"/"inf"/"-inf" of a skipped update — and names file, line and
// field otherwise. A last line without its newline is what a crash or a full disk leaves
// mid-append: it is ignored with a warning, and a writer continuing the log cuts it off
// first. A run directory's manifest records the byte length and CRC-32 of the log's prefix
// up to its checkpoint's step (api/run_dir.h), so a log from another run, or one edited or
// rewritten, is refused by name before a resume appends to it. A step or first_step beyond
// kMaxSeedLogStep is refused too: no run reaches it, and next_step() (step + 1) must not
// overflow.
#pragma once
#include "models/peft.h"
#include "zo/rule.h"

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace zo2 {

// The last step a seed log may name: 2^53, the bound api/options.cpp (kMaxSteps) puts on
// --steps and --first-step (the lr schedule's doubles hold every step up to it exactly).
inline constexpr std::int64_t kMaxSeedLogStep = std::int64_t{1} << 53;

struct SeedLogEntry {
  std::int64_t step = 0;
  std::uint64_t seed = 0;
  float g = 0;      // projected gradient (NaN/inf: the update was skipped)
  float lr = 0;
  float eps = 0;
  float wd = 0;
  double g_double = 0;  // (L+ − L−)/(2·eps) in double, for the record
  std::vector<float> gs;  // every direction's g_j when the rule has several ("gs"; gs[0] == g)
  int choice = 1;         // zo-sgd-cons: the candidate kept (+1, 0, −1; "choice")
  std::uint64_t end_offset = 0;  // reader: the byte just past this entry's line
  // "loaded_as": before this step the weights were saved as these narrower dtypes and loaded
  // back, in this order (a resume from a --save-dtype bf16/fp16 checkpoint; two when that
  // resume saved again, narrower, before its first step); replay rounds them the same way
  // here (Note [A resume from a rounded checkpoint], api/run_dir.h). Empty: unrounded.
  std::vector<std::string> loaded_as;
  // "run": from this step on the run trained with these flags (a resume that changed some:
  // compact JSON text of the whole object, as the header's "run"); empty: those before
  // (Note [A run's flags in its seed log], tools/cmd_train.cpp).
  std::string run_flags;
};

struct SeedLogHeader {
  std::uint64_t run_seed = 0;
  std::string storage_dtype = "fp32";
  std::string base_model;  // the checkpoint the run started from
  std::string base_fingerprint;  // its weights' fingerprint (api checkpoint_fingerprint); empty: not recorded
  std::int64_t first_step = 0;
  RuleConfig rule;  // "optimizer" (absent: zo-sgd, one direction, central — the log of before rules)
  PeftConfig peft;  // "peft" (absent: full fine-tuning); LoRA adapters start from run_seed's init
  // "adapter", "adapter_fingerprint": the adapter directory the run's adapters started from
  // (train --adapter, a session's adapter_dir) and its fingerprint (api adapter_fingerprint);
  // empty: from run_seed's init, or a log from before they were recorded (Note [A run's
  // starting adapter], tools/cmd_replay.cpp).
  std::string adapter;
  std::string adapter_fingerprint;
  // "run": the flags of the `zo2-tune train` that started the log — the keys and values its
  // checkpoints' zo2_state.json records — as compact JSON text of an object; empty: a
  // session's log, or one from before they were recorded. Replay writes them into the state
  // of the checkpoint it makes, so a `train --resume` of it carries on with the run's flags
  // (Note [A run's flags in its seed log], tools/cmd_train.cpp).
  std::string run_flags;
};

// Where a log stands: the bytes written so far (complete lines only) and their CRC-32.
struct SeedLogPosition {
  std::int64_t next_step = 0;  // one past the last entry's step (first_step when empty)
  std::uint64_t bytes = 0;
  std::uint32_t crc32 = 0;
};

class SeedLogWriter {
 public:
  // append = true continues an existing log (resume): entries from `keep_until_step` on, and a
  // torn last line, are cut off first, since the run will write them again. The existing
  // header must be this run's (same run seed and storage dtype) and its entries must reach
  // keep_until_step; else Error(invalid_argument) naming the file. A missing file starts a
  // new log. The writer holds the file locked while it lives: a second writer of it, in this
  // process or another, is Error(io) before anything is read or changed (Note [One writer per
  // seed log]).
  SeedLogWriter(const std::filesystem::path& path, const SeedLogHeader& header, bool append,
                std::int64_t keep_until_step = 0);
  ~SeedLogWriter();
  SeedLogWriter(const SeedLogWriter&) = delete;
  SeedLogWriter& operator=(const SeedLogWriter&) = delete;
  // Appends one line with one write(); on failure (a full disk) the file is cut back to the
  // lines before it and Error(io) names the file and the system's reason.
  void append(const SeedLogEntry& e);
  // The next entry appended carries these "loaded_as" and "run" (SeedLogEntry), unless empty.
  void mark_next(std::vector<std::string> loaded_as, std::string run_flags) {
    loaded_as_ = std::move(loaded_as);
    run_flags_ = std::move(run_flags);
  }
  // The roundings marked for the next entry and not yet written: a checkpoint saved now holds
  // them (Session::save records them in its state).
  const std::vector<std::string>& pending_loaded_as() const { return loaded_as_; }
  // The appended lines reach the disk (fdatasync) before a checkpoint that needs them is
  // published.
  void sync();
  SeedLogPosition position() const { return pos_; }
  const std::filesystem::path& path() const { return absolute_path_; }  // absolute (as opened)

 private:
  void check_still_ours() const;  // Note [The seed log stays this writer's]
  void open_locked();  // Note [One writer per seed log]
  void open(const SeedLogHeader& header, bool append, std::int64_t keep_until_step);  // the constructor's work
  void release();      // closes the file (its lock) and leaves the process's registry

  std::filesystem::path path_;
  // The same made absolute when the writer opened it: a host that changes directory later
  // does not make the log "removed" (adversarial pass 65: a relative seed_log_path failed
  // the next step after a chdir, the file intact).
  std::filesystem::path absolute_path_;
  RuleConfig rule_;
  std::vector<std::string> loaded_as_;  // for the next entry (mark_next)
  std::string run_flags_;
  int fd_ = -1;
  std::pair<dev_t, ino_t> file_{};  // what fd_ opened, in the registry when registered_
  bool registered_ = false;
  SeedLogPosition pos_;
};

struct SeedLog {
  SeedLogHeader header;
  std::vector<SeedLogEntry> entries;
  std::uint64_t header_end = 0;   // the byte just past the header line
  std::uint64_t valid_bytes = 0;  // complete lines; a torn last line is not counted
  bool torn_tail = false;
  // header_only: the header line alone (entries empty), for a caller that needs only it.
  static SeedLog read(const std::filesystem::path& path, bool header_only = false);
  // The length of the log's prefix that holds the entries of the steps before `step` (the
  // header and nothing else when step ≤ first_step).
  std::uint64_t bytes_before(std::int64_t step) const;
  std::int64_t next_step() const { return entries.empty() ? header.first_step : entries.back().step + 1; }
};

}  // namespace zo2
