// Run directories: where `zo2-tune train --out DIR` and zo2_session_save put a tuned model,
// saved so that a crash at any moment leaves DIR either as it was or as the new save.
//
// Note [Run directory]: DIR holds
//   step-<N>/            one complete checkpoint: config.json, the safetensors shard(s) and
//                        their index, the tokenizer files, and zo2_state.json — the run's
//                        state and the manifest (each file's bytes and CRC-32, the step, and
//                        the seed log's byte length and CRC-32 up to that step)
//   current -> step-<N>  a symbolic link: the commit point of a save
//   config.json -> current/config.json, model.safetensors -> current/..., …  links, so
//                        that DIR itself reads as an HF checkpoint (transformers, zo2-tune)
//   seed_log.jsonl       the run's seed log, appended as steps run (zo/seed_log.h)
//   zo2.lock             flock'ed by the one process writing DIR
// A save writes a fresh hidden directory (.step-<N>.tmp-<pid>), the manifest last, fsyncs
// every file and the directory, renames it to step-<N>, and then replaces `current` with
// one rename(2): before that rename a reader sees the old checkpoint, after it the new one,
// never a mix. Only then are the links refreshed and the previous step directory removed,
// so a save needs room for two checkpoints at its peak. Loaders resolve DIR through
// `current` once (open_checkpoint) and check the manifest: every file present with its
// recorded size (and CRC-32 when asked: --resume), so a damaged or mixed directory is
// refused naming the file. Whatever an interrupted save left (the hidden directory,
// temporary files, stale links) is removed when the next writer takes the lock.
#pragma once
#include "zo/seed_log.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <vector>
#include <functional>
#include <optional>
#include <string>

namespace zo2 {

inline constexpr const char* kRunStateFile = "zo2_state.json";
inline constexpr const char* kRunCurrent = "current";
inline constexpr const char* kRunLockFile = "zo2.lock";
inline constexpr const char* kRunSeedLog = "seed_log.jsonl";
// Note [State versions]: 3, the manifest carries its own CRC (state_crc32); 4, it owes an
// evaluation (eval_owed_after_step), which a zo2 that reads only 1 to 3 would skip silently.
// A manifest is written with the lowest version that holds what it says: a run directory
// stays readable by the zo2 before unless it holds something that zo2 would misread.
inline constexpr int kRunStateVersion = 4;

// DIR/zo2.lock held (flock, exclusive) by this object; a second writer — another process,
// or a second lock of the same directory in this one — is refused: Error(invalid_argument)
// naming the directory and the pid that holds it. Creates DIR. Taking the lock cleans up
// what an interrupted save left behind.
class RunDirLock {
 public:
  explicit RunDirLock(const std::filesystem::path& dir);
  ~RunDirLock();
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;
  // Whether this process holds DIR's lock.
  static bool held(const std::filesystem::path& dir);

 private:
  std::filesystem::path key_;
  int fd_ = -1;
};

// What one save needs room for (Note [Room for a save] in runtime/file_util.h).
struct SaveRoom {
  std::uint64_t bytes = 0;  // a bound on what the save writes; 0: not checked
  std::string what;         // "a checkpoint of step 40 (weights as fp32 1.20 GiB, ...)"
  std::string ways_out;     // the caller's choices, in its own words ("free space there, ...")
};

// Error(io) when the file system of the run directory DIR has less free than one more
// checkpoint of room.bytes (the previous checkpoint stays until the new one is published):
// the message names DIR, its free space, the bytes needed and room.ways_out. Nothing when
// the free space cannot be known (statvfs fails, or reports no blocks: Note [Room for a
// save]). publish_checkpoint calls it before each save; a host calls it before its first
// step (Session::check_save_room).
void require_room_for_save(const std::filesystem::path& dir, const SaveRoom& room);

struct PublishRequest {
  std::int64_t step = 0;         // the checkpoint's step: the next step a resume runs
  nlohmann::json state = nlohmann::json::object();  // the caller's fields, kept in the manifest
  std::filesystem::path seed_log;                    // empty: the save has no seed log
  SeedLogPosition seed_log_position;
  // Writes the checkpoint's files into the (fresh, empty) directory it is given.
  std::function<void(const std::filesystem::path& dir)> write;
  // Checked before anything is written (require_room_for_save); bytes 0: not checked.
  SaveRoom room;
};

// Publishes a checkpoint into DIR as one transaction (Note [Run directory]). Takes DIR's lock
// for the save unless this process holds it. A file system without room for request.room is
// refused before anything is written (require_room_for_save). On failure DIR is as it was,
// and the partial step directory is removed.
void publish_checkpoint(const std::filesystem::path& dir, const PublishRequest& request);

struct OpenedCheckpoint {
  std::filesystem::path dir;  // where the checkpoint's files are: DIR's current step directory, or DIR
  std::filesystem::path run_dir;  // DIR for a published checkpoint, empty otherwise
  nlohmann::json state;       // its zo2_state.json (a manifest for a published one); null if none
  std::int64_t step = -1;     // the manifest's step; -1 for a directory without one
  // The seed log the manifest names (relative paths resolve against run_dir); empty if none.
  std::filesystem::path seed_log;
};

// DIR as a loader reads it: a run directory resolves through `current` to its step directory,
// whose manifest is checked (files present with their sizes; CRC-32s too when
// verify_checksums); a plain HF directory (no `current`) is returned as it is, with its
// zo2_state.json if it has one (a run saved by an older zo2). Errors name the file.
OpenedCheckpoint open_checkpoint(const std::filesystem::path& dir, bool verify_checksums = false);

// Note [A resume from a rounded checkpoint]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A checkpoint saved as bf16 or fp16 of weights stored wider holds them rounded, and a run
// continued from it (its seed log appended) goes on from the rounded weights: not the
// uninterrupted run's, and not what the log's updates alone rebuild. The session marks the
// first entry it appends with "loaded_as": the dtypes, in order (SeedLogEntry::loaded_as), and
// replay rounds its weights there the same way (a save as each dtype and a load), so it
// still gives the run's checkpoint byte for byte (adversarial pass 58: it gave other weights
// with nothing said). A checkpoint saved before that first entry was written carries the
// marks not yet written in its state ("rounded_pending"), so a resume of it marks them all
// (pass 58's review: a resume that saved fp32 before its first step lost the mark). The disk
// tier's kept block images hold weights unrounded: such a resume loads every block from the
// checkpoint instead (tools/cmd_train.cpp).
//
// The roundings the weights of a checkpoint with zo2_state.json `state` went through that the
// seed log does not record yet: its "rounded_pending", then its "save_dtype" when that is
// neither fp32 nor the run's storage dtype. Empty for an adapter run (adapters are saved in
// fp32) and a state that names none.
std::vector<std::string> checkpoint_roundings(const nlohmann::json& state, DType storage);

// Lets go of the step directory of the run DIR this process holds for reading (Note
// [Readers of a live run] in run_dir.cpp), if any: for the ranks of a run, which have its
// weights in memory and must not keep its saves from removing the checkpoint they resumed.
void release_read_pin(const std::filesystem::path& dir);

// For tests of Note [Readers of a live run]: called by open_checkpoint after each read of a
// run's `current` link, with the step directory it names, before that directory is pinned —
// where a save that moves `current` on and removes it lands in a real race. Empty: nothing.
void set_current_read_hook_for_testing(std::function<void(const std::string& step)> hook);

// For tests of a file system whose rename will not replace an entry: the writer's rename of
// links (the start-up probe, the switch of `current`) goes through `rename` (0, or -1 with
// errno set). Empty: rename(2).
void set_rename_for_testing(std::function<int(const char* from, const char* to)> rename);

// open_checkpoint(dir).dir: what --model DIR means for every loader.
std::filesystem::path resolve_model_dir(const std::filesystem::path& dir);

// Removes the run DIR holds, for `train --overwrite`: `current` first (from then on DIR holds
// no checkpoint), then the step directories, the links, zo2_state.json and the seed log, and
// the checkpoint files of a run saved before run directories. The caller holds DIR's lock.
void remove_run(const std::filesystem::path& dir);

// A manifest's own CRC-32 (its field "state_crc32"): of its compact JSON without that field
// (keys sorted, numbers printed to round-trip), so that a hand edit (an lr, a step) is caught
// at a resume like a damaged weights file.
std::uint32_t manifest_crc32(nlohmann::json manifest);

// Whether DIR holds a run: a `current` link or a zo2_state.json.
bool holds_run(const std::filesystem::path& dir);

// The files of DIR, not a run's, that a run saved into DIR would replace: a plain
// checkpoint's config.json, weights, index and adapter files, and a `current` that is not a
// link. Empty when DIR does not exist or holds none of them.
std::vector<std::string> foreign_checkpoint_files(const std::filesystem::path& dir);

// The training run (a directory holding a seed log) whose checkpoint DIR is — DIR being the
// run's `current`, one of its step directories or a step directory in the making
// (.step-N) — after following links; empty otherwise. Another writer there would replace
// the weights the run's resume starts from.
std::filesystem::path training_run_of_checkpoint(const std::filesystem::path& dir);
// The same for any run (a directory holding a run: holds_run), with or without a seed log:
// what no save may write into (it would nest a run in the checkpoint and replace its files).
std::filesystem::path run_of_checkpoint(const std::filesystem::path& dir);

// Whether two paths name the same directory (after following links); false if either is missing.
bool same_directory(const std::filesystem::path& a, const std::filesystem::path& b);

// Whether remove_run(DIR) removes P (or what P lies in), after following links: DIR itself
// (a run saved before run directories keeps its checkpoint there), a step directory (the
// one `current` names included), a step in the making or the seed log.
bool removed_with_run(const std::filesystem::path& p, const std::filesystem::path& dir);

}  // namespace zo2
