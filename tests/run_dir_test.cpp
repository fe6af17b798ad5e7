// Run directories (api/run_dir.h) and the defects of issue 16 that lost work or gave a wrong
// model without a word: a save is a transaction, a loader refuses a damaged directory by
// name, one writer at a time, leftovers cleaned, and `train --resume` checks the state file
// and the seed log field by field before it continues a run.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <nlohmann/json.hpp>

#include "api/run_dir.h"
#include "api/session.h"
#include "offload/planner.h"
#include "runtime/checksum.h"
#include "runtime/error.h"
#include "runtime/file_util.h"
#include "runtime/log.h"
#include "zo/seed_log.h"
#include "tests/reference_model.h"
#include "tests/test_util.h"

#include <filesystem>
#include <fstream>
#include <string>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <unistd.h>

namespace zo2 {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::error_of;

using test::read_file;
using test::write_file;

PublishRequest request(std::int64_t step, const std::string& weights) {
  PublishRequest r;
  r.step = step;
  r.state = {{"note", "test"}};
  r.write = [weights](const fs::path& dir) {
    write_file(dir / "config.json", "{}\n");
    write_file(dir / "model.safetensors", weights);
  };
  return r;
}

bool has_text(const Error& e, const std::string& piece) { return std::string(e.what()).find(piece) != std::string::npos; }

// crc32_file reads the file in pieces summed in parallel (Note [No mapped reads]): the same
// CRC as crc32_update over the bytes, whole, up to a limit inside a piece or on its edge,
// and zlib's check value; a file shorter than the limit is refused by name.
TEST(Checksum, AFileReadInPiecesHasTheCrcOfItsBytes) {
  test::TempDir tmp;
  const fs::path f = tmp / "f.bin";
  std::vector<std::byte> bytes((std::size_t{8} << 20) * 3 + 5);
  std::uint64_t x = 88172645463325252ull;
  for (std::byte& b : bytes) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    b = static_cast<std::byte>(x);
  }
  std::ofstream(f, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                           static_cast<std::streamsize>(bytes.size()));
  EXPECT_EQ(crc32_file(f), crc32_update(0, bytes));
  for (const std::size_t limit : {std::size_t{0}, std::size_t{1}, std::size_t{8} << 20, (std::size_t{8} << 20) + 1,
                                  bytes.size() - 1})
    EXPECT_EQ(crc32_file(f, limit), crc32_update(0, std::span(bytes).first(limit))) << limit;
  const std::string check = "123456789";
  std::ofstream(tmp / "c.bin", std::ios::binary) << check;
  EXPECT_EQ(crc32_file(tmp / "c.bin"), 0xCBF43926u);
  const Error e = error_of([&] { (void)crc32_file(tmp / "c.bin", 10); });
  EXPECT_NE(std::string(e.what()).find("c.bin"), std::string::npos) << e.what();
}

TEST(RunDir, APublishedCheckpointIsReadThroughCurrentAndTheDirectoryReadsAsACheckpoint) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  publish_checkpoint(d, request(3, "weights of step 3"));
  const OpenedCheckpoint o = open_checkpoint(d, /*verify_checksums=*/true);
  EXPECT_EQ(o.dir, d / "step-00000003");
  EXPECT_EQ(o.step, 3);
  EXPECT_EQ(o.state.at("note"), "test");
  EXPECT_EQ(o.state.at("files").at("model.safetensors").at("crc32").get<std::uint32_t>(),
            crc32_file(o.dir / "model.safetensors"));
  // DIR itself reads as the checkpoint (links through current), for transformers and friends.
  EXPECT_EQ(read_file(d / "model.safetensors"), "weights of step 3");
  EXPECT_EQ(json::parse(read_file(d / kRunStateFile)).at("step"), 3);
  publish_checkpoint(d, request(4, "weights of step 4, longer"));
  EXPECT_EQ(resolve_model_dir(d), d / "step-00000004");
  EXPECT_EQ(read_file(d / "model.safetensors"), "weights of step 4, longer");
  EXPECT_FALSE(fs::exists(d / "step-00000003")) << "the previous step directory is removed after the switch";
  // A plain directory is what it is.
  EXPECT_EQ(resolve_model_dir(tmp.path()), tmp.path());
}

TEST(RunDir, AFailedSaveLeavesThePreviousCheckpointWhole) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  publish_checkpoint(d, request(1, "step 1"));
  PublishRequest bad = request(2, "step 2");
  bad.write = [](const fs::path& dir) {
    write_file(dir / "config.json", "{}\n");
    throw Error(ErrorKind::io, "disk full while writing the shards");
  };
  const Error e = error_of([&] { publish_checkpoint(d, bad); });
  EXPECT_TRUE(has_text(e, "disk full")) << e.what();
  EXPECT_EQ(open_checkpoint(d, true).step, 1);
  EXPECT_EQ(read_file(d / "model.safetensors"), "step 1");
  for (const auto& entry : fs::directory_iterator(d))
    EXPECT_EQ(entry.path().filename().string().find(".step-"), std::string::npos) << entry.path();
}

TEST(RunDir, ADamagedOrMixedDirectoryIsRefusedNamingTheFile) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  publish_checkpoint(d, request(7, "0123456789"));
  const fs::path w = d / "step-00000007" / "model.safetensors";
  // Same size, other bytes (a shard of another step): only the checksum tells.
  write_file(w, "9876543210");
  EXPECT_NO_THROW((void)open_checkpoint(d, false));
  Error e = error_of([&] { (void)open_checkpoint(d, true); });
  EXPECT_EQ(e.kind(), ErrorKind::format);
  EXPECT_TRUE(has_text(e, w.string()) && has_text(e, "CRC-32")) << e.what();
  write_file(w, "short");
  e = error_of([&] { (void)open_checkpoint(d, false); });
  EXPECT_TRUE(has_text(e, w.string()) && has_text(e, "5 bytes")) << e.what();
  fs::remove(w);
  e = error_of([&] { (void)open_checkpoint(d, false); });
  EXPECT_TRUE(has_text(e, w.string()) && has_text(e, "missing")) << e.what();
  fs::remove_all(d / "step-00000007");
  e = error_of([&] { (void)resolve_model_dir(d); });
  EXPECT_TRUE(has_text(e, "current") && has_text(e, "missing")) << e.what();
}

// Adversarial pass 52: a zo2_state.json with 300,000 '[' under an extra key crashed `train
// --resume` (a stack overflow copying the tree for its checksum), and one that is a FIFO would
// hang it: both refused naming the file (Note [Reading JSON]). In a child with an alarm, so that
// a crash or a hang fails the test, not the test binary.
TEST(RunDir, AStateFileNestedPastTheJsonDepthLimitOrAFifoIsRefusedNamingIt) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  publish_checkpoint(d, request(7, "0123456789"));
  const fs::path s = d / "step-00000007" / kRunStateFile;
  auto refused = [&](const std::string& what) {
    return test::in_child([&] {
      ::alarm(10);
      const Error e = error_of([&] { (void)open_checkpoint(d, false); });
      return std::string(e.what()) == s.string() + ": " + what ? 0 : 1;
    });
  };
  std::string text = read_file(s);
  text.erase(text.rfind('}'));
  fs::remove(s);
  write_file(s, text + ", \"zz\": " + std::string(300000, '[') + std::string(300000, ']') + "}");
  EXPECT_EQ(refused("nested deeper than 64 levels"), 0) << "1: the wrong error; 128 + N: killed by signal N";
  fs::remove(s);
  ASSERT_EQ(::mkfifo(s.c_str(), 0600), 0);
  EXPECT_EQ(refused("is a FIFO, not a regular file"), 0) << "1: the wrong error; 128 + 14: it hung";
}

// Session::save (zo2_session_save, Python's Session.save) wrote no generation_config.json: a
// model tuned through the API then generated with transformers' defaults instead of its own
// EOS ids and sampling settings. It is the model directory's, as the session loaded it.
TEST(SessionSave, WritesTheModelDirectorysGenerationConfigInTheTransaction) {
  test::TempDir tmp;
  const ModelConfig c = test::small_llama(2);
  test::write_random_checkpoint(tmp / "model", c, 3);
  test::write_random_checkpoint(tmp / "bare", c, 3);
  const std::string gen = "{\"eos_token_id\": [128001, 128009], \"temperature\": 0.6}\n";
  write_file(tmp / "model" / Session::kGenerationConfig, gen);
  constexpr std::uint64_t kShard = 5'000'000'000;
  SessionConfig cfg;
  cfg.max_seq = 8;
  {
    Session s(tmp / "model", cfg);
    fs::remove(tmp / "model" / Session::kGenerationConfig);  // read at load, not at the save
    s.save(tmp / "run", DType::f32, kShard);
    EXPECT_EQ(read_file(tmp / "run" / Session::kGenerationConfig), gen);
    // A tokenizer directory's copy (extra_files) does not replace the model's.
    Session::SaveExtras x;
    x.extra_files = [](const fs::path& dir) {
      write_file(dir / Session::kGenerationConfig, "{\"from\": \"the tokenizer\"}\n");
      write_file(dir / "tokenizer_config.json", "{}\n");
    };
    s.save(tmp / "run", DType::f32, kShard, x);
  }
  EXPECT_EQ(read_file(tmp / "run" / Session::kGenerationConfig), gen);
  EXPECT_EQ(read_file(tmp / "run" / "tokenizer_config.json"), "{}\n");
  const OpenedCheckpoint o = open_checkpoint(tmp / "run", /*verify_checksums=*/true);
  EXPECT_TRUE(o.state.at("files").contains(Session::kGenerationConfig)) << o.state.dump();
  {
    // Continued from the run: the step directory it was read from is gone after one save,
    // and the next still writes it.
    Session s(tmp / "run", cfg);
    s.save(tmp / "run", DType::f32, kShard);
    s.save(tmp / "run", DType::f32, kShard);
  }
  EXPECT_EQ(read_file(tmp / "run" / Session::kGenerationConfig), gen);
  {
    Session s(tmp / "bare", cfg);  // a model without one: none
    s.save(tmp / "bare-run", DType::f32, kShard);
  }
  EXPECT_TRUE(fs::exists(tmp / "bare-run" / "config.json"));
  EXPECT_FALSE(fs::exists(tmp / "bare-run" / Session::kGenerationConfig));
}

// Note [A stopped seed log] (api/session.cpp): a result hook that throws at step k (zo2-tune's
// progress on a stderr pipe whose reader exited) left the step without its seed-log line while
// ~Session appended the next steps' lines: a log with a hole that no resume accepts ("step 8
// does not follow step 6"). Now the log ends before k, nothing later is logged or saved, and
// the run resumes from its checkpoint to the uninterrupted run's log and weights. With a disk
// tier too, whose write-backs wait for log lines (they must not wait for ever).
void hook_failure_ends_the_log(bool disk) {
  test::TempDir tmp;
  const ModelConfig c = test::small_llama(3);
  test::write_random_checkpoint(tmp / "model", c, 5);
  constexpr int kBatch = 2, kSeq = 8, kSaved = 2, kFails = 4, kSteps = 7;
  constexpr std::uint64_t kShard = 5'000'000'000;
  const auto data = test::patterned_batches(c, 3, kBatch, kSeq, 2, 5, 11);
  auto config = [&](const std::string& run) {
    fs::create_directories(tmp / run);  // the run directory holds its seed log (train makes it first)
    SessionConfig s;
    s.offload = OffloadMode::all;
    s.window = 2;
    s.max_batch = kBatch;
    s.max_seq = kSeq;
    s.run_seed = 7;
    s.threads = 1;
    s.seed_log = tmp / run / kRunSeedLog;
    s.base_model = (tmp / "model").string();
    if (disk) {
      const Placement p = plan_placement(c, plan_request(c, s, DeviceKind::cpu, std::size_t{1} << 30));
      const std::size_t globals = p.host_bytes - static_cast<std::size_t>(c.num_layers) * p.block_bytes;
      s.host_mem = globals + 2 * p.block_bytes;  // the staging buffers: every block on disk
      s.disk_staging = 2;
      s.disk_dir = tmp / (run + "-blocks");
    }
    return s;
  };
  auto enqueue = [&](Session& s, std::int64_t t) {
    return s.step_async(data[static_cast<std::size_t>(t) % data.size()], 3e-3f, 1e-3f, 0.0f);
  };
  {
    Session s(tmp / "model", config("ref"));
    for (int t = 0; t < kSteps; ++t) s.wait(enqueue(s, t));
    s.save(tmp / "ref", DType::f32, kShard);
  }
  const fs::path run = tmp / "run";
  {
    Session s(tmp / "model", config("run"));
    if (disk) {
      ASSERT_NE(s.store().disk(), nullptr);
    }
    for (int t = 0; t < kSaved; ++t) s.wait(enqueue(s, t));
    s.save(run, DType::f32, kShard);
    s.set_result_hook([](const StepResult& r) {
      if (r.step == kFails) throw Error(ErrorKind::io, "cannot write the progress: Broken pipe");
    });
    // Read a step behind, as train does: step kFails + 1 is running when kFails's hook throws.
    std::int64_t prev = -1;
    bool threw = false;
    for (int t = kSaved; t < kSteps && !threw; ++t) {
      const std::int64_t id = enqueue(s, t);
      if (prev >= 0) {
        try {
          s.wait(prev);
        } catch (const Error& e) {
          threw = true;
          EXPECT_TRUE(has_text(e, "Broken pipe")) << e.what();
          EXPECT_EQ(prev, kFails);
        }
      }
      prev = id;
    }
    ASSERT_TRUE(threw);
    // No step after it, and no checkpoint of weights the log does not reach.
    const Error refused = error_of([&] { enqueue(s, kFails + 2); });
    EXPECT_TRUE(has_text(refused, "stopped before step 5")) << refused.what();
    const Error not_saved = error_of([&] { s.save(run, DType::f32, kShard); });
    EXPECT_TRUE(has_text(not_saved, "not saved at step 6")) << not_saved.what();
    EXPECT_TRUE(has_text(not_saved, "Broken pipe")) << not_saved.what();
  }  // ~Session collects step kFails + 1: without a line
  const SeedLog log = SeedLog::read(run / kRunSeedLog);
  ASSERT_EQ(log.entries.size(), static_cast<std::size_t>(kFails)) << read_file(run / kRunSeedLog);
  for (int i = 0; i < kFails; ++i) EXPECT_EQ(log.entries[static_cast<std::size_t>(i)].step, i);
  EXPECT_EQ(open_checkpoint(run).step, kSaved);
  {
    // The resume: from the checkpoint, its log cut back to it, the lost steps run again.
    SessionConfig cfg = config("run");
    cfg.seed_log_append = true;
    cfg.first_step = kSaved;
    Session s(run, cfg);
    for (int t = kSaved; t < kSteps; ++t) s.wait(enqueue(s, t));
    s.save(run, DType::f32, kShard);
  }
  const SeedLog resumed = SeedLog::read(run / kRunSeedLog), ref = SeedLog::read(tmp / "ref" / kRunSeedLog);
  ASSERT_EQ(resumed.entries.size(), ref.entries.size());
  for (std::size_t i = 0; i < ref.entries.size(); ++i) {
    EXPECT_EQ(resumed.entries[i].step, ref.entries[i].step);
    EXPECT_EQ(resumed.entries[i].seed, ref.entries[i].seed);
    EXPECT_EQ(resumed.entries[i].g, ref.entries[i].g) << "step " << i;
  }
  EXPECT_EQ(read_file(run / "model.safetensors"), read_file(tmp / "ref" / "model.safetensors"));
}

TEST(SessionLog, AResultHookThatThrowsEndsTheSeedLogBeforeItsStepAndTheRunResumes) { hook_failure_ends_the_log(false); }

TEST(SessionLog, AResultHookThatThrowsWithADiskTierNeitherHangsNorLosesTheResume) { hook_failure_ends_the_log(true); }

// Note [File systems without locks] (adversarial pass 61): Lustre without -o flock (ENOSYS)
// and NFS without a lock daemon (ENOLCK) refuse flock(2); every writer and reader used to stop
// at "cannot lock". Now each goes on unlocked, with one warning per file system that says
// what is not guarded; a lock another process holds is still a conflict (the parent, below).
TEST(RunDir, WhereTheFileSystemRefusesLocksWritersAndReadersGoOnWithOneWarning) {
  for (const auto& [err, text] : {std::pair{ENOSYS, "Function not implemented"}, std::pair{ENOLCK, "No locks available"}}) {
    SCOPED_TRACE(text);
    test::TempDir dir;
    const fs::path run = dir / "run", log = dir / "seeds.jsonl", other = dir / "other";
    const int rc = test::in_child([&, err = err, text = text] {
      if (!test::deny_syscalls({{__NR_flock, err}})) return 77;
      std::vector<std::string> warnings;
      log_set_sink([&](LogLevel level, std::string_view m) {
        if (level == LogLevel::warn) warnings.emplace_back(m);
      });
      {
        RunDirLock lock(run);
        if (!RunDirLock::held(run)) return 10;
        // Within the process the registry still refuses a second writer.
        if (test::error_of([&] { RunDirLock again(run); }).kind() != ErrorKind::io) return 11;
        SeedLogHeader h;
        h.run_seed = 3;
        SeedLogWriter w(log, h, false);
        // Unlocked, a second writer of the log in this process is still refused (its registry).
        const Error second = test::error_of([&] { SeedLogWriter again(log, h, true, 0); });
        if (second.kind() != ErrorKind::io ||
            std::string(second.what()).find("another session of this process") == std::string::npos)
          return 15;
        RunDirLock lock2(other);
      }
      // One warning for the file system, naming the file, the cause and what is unguarded.
      if (warnings.size() != 1) return 12;
      if (warnings[0].find((run / "zo2.lock").string()) == std::string::npos ||
          warnings[0].find(text) == std::string::npos ||
          warnings[0].find("a second zo2 process writing this run directory is not refused") == std::string::npos)
        return 13;
      const int fd = ::open(log.c_str(), O_RDONLY | O_CLOEXEC);
      const FileLock l = try_lock_file(fd, true, log, "test");
      ::close(fd);
      return l == FileLock::unsupported ? 0 : 14;
    });
    if (rc == 77) GTEST_SKIP() << "no seccomp filters here";
    EXPECT_EQ(rc, 0);
    // Where locks work, a held lock is a conflict and a free one is taken.
    const int a = ::open(log.c_str(), O_RDONLY | O_CLOEXEC), b = ::open(log.c_str(), O_RDONLY | O_CLOEXEC);
    EXPECT_EQ(try_lock_file(a, true, log, "test"), FileLock::held);
    EXPECT_EQ(try_lock_file(b, false, log, "test"), FileLock::busy);
    ::close(a);
    EXPECT_EQ(try_lock_file(b, false, log, "test"), FileLock::held);
    ::close(b);
  }
}

// Note [Run directories need links] (adversarial pass 61): on a file system without symbolic
// links (exFAT, an SMB share) a run trained to its first save and failed there. The writer
// now finds out when it takes the directory.
TEST(RunDir, AFileSystemWithoutLinksIsRefusedWhenTheWriterTakesTheDirectory) {
  test::TempDir dir;
  const int rc = test::in_child([&] {
#ifdef __NR_symlink
    if (!test::deny_syscalls({{__NR_symlink, EPERM}, {__NR_symlinkat, EPERM}})) return 77;
#else
    if (!test::deny_syscalls({{__NR_symlinkat, EPERM}})) return 77;
#endif
    const Error e = test::error_of([&] { RunDirLock lock(dir / "run"); });
    const std::string m = e.what();
    if (e.kind() != ErrorKind::io) return 10;
    if (m.find((dir / "run").string() + ": cannot create a symbolic link there (Operation not permitted)") ==
            std::string::npos ||
        m.find("choose a directory on another file system") == std::string::npos)
      return 11;
    if (RunDirLock::held(dir / "run")) return 12;
    for (const auto& e2 : fs::directory_iterator(dir / "run"))
      if (e2.path().filename() != "zo2.lock") return 13;  // no probe left behind
    return 0;
  });
  if (rc == 77) GTEST_SKIP() << "no seccomp filters here";
  EXPECT_EQ(rc, 0);
  RunDirLock lock(dir / "run");  // where links work, the same directory is taken
  EXPECT_TRUE(RunDirLock::held(dir / "run"));
}

// Note [Readers of a live run] (adversarial pass 60): `eval --model RUN` beside the run that
// writes RUN failed when a save removed the step directory it was reading.
TEST(RunDir, AStepDirectoryAnotherProcessReadsIsKeptUntilItIsDone) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  publish_checkpoint(d, request(4, "weights of step 4"));
  int ready[2], go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {  // the reader: resolves RUN, then reads its files after the writer saved twice
    int rc = 0;
    try {
      const OpenedCheckpoint o = open_checkpoint(d);
      char c = 1;
      if (::write(ready[1], &c, 1) != 1 || ::read(go[0], &c, 1) != 1) rc = 3;
      if (rc == 0) rc = read_file(o.dir / "model.safetensors") == "weights of step 4" ? 0 : 4;
      if (rc == 0) rc = open_checkpoint(d).dir == d / "step-00000006" ? 0 : 5;  // and moves on to the newest
    } catch (...) {
      rc = 2;
    }
    ::_exit(rc);
  }
  char c = 0;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  publish_checkpoint(d, request(5, "weights of step 5"));
  EXPECT_TRUE(fs::exists(d / "step-00000004" / "model.safetensors")) << "kept while the reader holds it";
  publish_checkpoint(d, request(6, "weights of step 6"));
  EXPECT_TRUE(fs::exists(d / "step-00000004"));
  EXPECT_FALSE(fs::exists(d / "step-00000005")) << "an unread previous checkpoint goes as before";
  EXPECT_EQ(resolve_model_dir(d), d / "step-00000006");
  ASSERT_EQ(::write(go[1], &c, 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  for (int fd : {ready[0], ready[1], go[0], go[1]}) ::close(fd);
  // The reader is gone: the next save removes what it kept.
  publish_checkpoint(d, request(7, "weights of step 7"));
  std::vector<std::string> steps;
  for (const auto& e : fs::directory_iterator(d))
    if (e.path().filename().string().rfind("step-", 0) == 0) steps.push_back(e.path().filename().string());
  EXPECT_EQ(steps, std::vector<std::string>{"step-00000007"});
  EXPECT_EQ(read_file(d / "model.safetensors"), "weights of step 7");
}

// Note [Readers of a live run]: a save lands between the reader's read of `current` and its
// pin — it moves `current` on and removes the step directory the reader was about to take.
// The reader reads the link again and takes the newer checkpoint (before, it failed: "names
// RUN/step-N, which is missing: the run directory was damaged").
TEST(RunDir, AReaderWhoseStepIsRemovedBeforeItsPinReadsCurrentAgain) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  publish_checkpoint(d, request(4, "weights of step 4"));
  std::vector<std::string> reads;
  set_current_read_hook_for_testing([&](const std::string& step) {
    reads.push_back(step);
    if (reads.size() == 1) {  // one save, as the writer makes it: step 4 goes, nobody pins it
      publish_checkpoint(d, request(5, "weights of step 5"));
      ASSERT_FALSE(fs::exists(d / step));
    } else if (reads.size() == 2) {  // and another before the second read is pinned
      publish_checkpoint(d, request(6, "weights of step 6"));
    }
  });
  const OpenedCheckpoint o = open_checkpoint(d, /*verify_checksums=*/true);
  set_current_read_hook_for_testing({});
  EXPECT_EQ(reads, (std::vector<std::string>{"step-00000004", "step-00000005", "step-00000006"}));
  EXPECT_EQ(o.dir, d / "step-00000006");
  EXPECT_EQ(o.step, 6);
  EXPECT_EQ(read_file(o.dir / "model.safetensors"), "weights of step 6");
  release_read_pin(d);
}

TEST(RunDir, OneWriterAtATime) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  RunDirLock lock(d);
  EXPECT_TRUE(RunDirLock::held(d));
  const Error e = error_of([&] { RunDirLock second(d); });
  EXPECT_EQ(e.kind(), ErrorKind::io);
  // Another process: zo2-tune refuses the directory, naming this process.
  std::string out;
  const int rc = test::run_command(test::zo2_tune_path().string() + " init --preset opt-tiny --out " +
                                       (tmp / "m").string() + " -q && " + test::zo2_tune_path().string() +
                                       " synth-data --model " + (tmp / "m").string() + " --out " +
                                       (tmp / "x.safetensors").string() + " -q && " +
                                       test::zo2_tune_path().string() + " train --model " + (tmp / "m").string() +
                                       " --data " + (tmp / "x.safetensors").string() + " --steps 2 --out " + d.string(),
                                   &out);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("another zo2 process (pid " + std::to_string(::getpid()) + ")"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(d / kRunSeedLog)) << "the refused writer wrote nothing";
}

TEST(RunDir, WhatAnInterruptedSaveLeftIsRemovedWhenTheNextWriterStarts) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  publish_checkpoint(d, request(2, "step 2"));
  fs::create_directories(d / ".step-3.tmp-12345");
  write_file(d / ".step-3.tmp-12345" / "model.safetensors", "half");
  fs::create_directories(d / "step-00000001");
  write_file(d / "step-00000001" / kRunStateFile, "{}");
  write_file(d / "zo2_state.json.tmp", "{");
  write_file(d / ".model.safetensors.tmp.abc", "x");
  fs::remove(d / "config.json");  // a link lost between the switch and the refresh
  { RunDirLock lock(d); }
  EXPECT_FALSE(fs::exists(d / ".step-3.tmp-12345"));
  EXPECT_FALSE(fs::exists(d / "step-00000001"));
  EXPECT_FALSE(fs::exists(d / "zo2_state.json.tmp"));
  EXPECT_FALSE(fs::exists(d / ".model.safetensors.tmp.abc"));
  EXPECT_TRUE(fs::is_symlink(d / "config.json"));
  EXPECT_EQ(open_checkpoint(d, true).step, 2);
}

// Adversarial pass 52: links planted in a directory zo2 writes (shared scratch space, a
// downloaded run) never make it remove, empty or write what they point at.
TEST(RunDir, LinksPlantedInTheDirectoryNeverMakeAWriterTouchWhatTheyName) {
  test::TempDir tmp;
  const fs::path victim = tmp / "victim" / "step-00000001";
  fs::create_directories(victim);
  write_file(victim / "thesis.tex", "precious");
  write_file(tmp / "victim" / "notes.txt", "notes");
  // `current` through the step directory's link and out of DIR: refused, nothing removed.
  const fs::path d = tmp / "out";
  fs::create_directories(d);
  fs::create_directory_symlink(victim, d / "step-00000001");
  fs::create_directory_symlink("step-00000001/../../victim/step-00000001", d / kRunCurrent);
  Error e = error_of([&] { RunDirLock lock(d); });
  EXPECT_NE(std::string(e.what()).find("not one of the run's step directories"), std::string::npos) << e.what();
  EXPECT_EQ(read_file(victim / "thesis.tex"), "precious");
  // A save replacing a checkpoint whose `current` is written as an absolute path of DIR's own
  // step directory removes that one, and only in DIR.
  const fs::path r = tmp / "run";
  publish_checkpoint(r, request(1, "step 1"));
  fs::remove(r / kRunCurrent);
  fs::create_directory_symlink(fs::absolute(r / "step-00000001"), r / kRunCurrent);
  publish_checkpoint(r, request(2, "step 2"));
  EXPECT_FALSE(fs::exists(r / "step-00000001"));
  EXPECT_EQ(open_checkpoint(r, true).step, 2);
  // zo2.lock as a link: refused naming it; the file it names keeps its text.
  const fs::path l = tmp / "locked";
  fs::create_directories(l);
  fs::create_symlink(tmp / "victim" / "notes.txt", l / kRunLockFile);
  e = error_of([&] { RunDirLock lock(l); });
  EXPECT_EQ(e.kind(), ErrorKind::io);
  EXPECT_NE(std::string(e.what()).find("is a symbolic link"), std::string::npos) << e.what();
  EXPECT_EQ(read_file(tmp / "victim" / "notes.txt"), "notes");
  // The CLI's writability probe: a `.zo2-write-test` link is left alone.
  const fs::path n = tmp / "new";
  fs::create_directories(n);
  fs::create_symlink(tmp / "victim" / "notes.txt", n / ".zo2-write-test");
  std::string out;
  EXPECT_EQ(test::run_command(test::zo2_tune_path().string() + " init --preset opt-tiny -q --out " + n.string(), &out),
            0) << out;
  EXPECT_EQ(read_file(tmp / "victim" / "notes.txt"), "notes");
}

// ---- zo2-tune train/replay over run directories (issue 16's defects 1, 3, 6, 7, 8, 9) ----

int tune(const std::string& args, std::string* out = nullptr) {
  return test::run_command(test::zo2_tune_path().string() + " " + args, out);
}

struct TuneRun {
  test::TempDir tmp;
  fs::path model = tmp / "model";
  fs::path data = tmp / "data.safetensors";
  std::string common;
  TuneRun() {
    std::string out;
    EXPECT_EQ(tune("init --preset opt-tiny --out " + model.string() + " --seed 1 -q", &out), 0) << out;
    EXPECT_EQ(tune("synth-data --model " + model.string() + " --out " + data.string() + " --rows 32 --seq 16 -q", &out), 0)
        << out;
    common = " --model " + model.string() + " --data " + data.string() + " --steps 8 --batch-size 2 --lr 3e-3 -q";
  }
  fs::path train(const std::string& name, const std::string& extra = "", int expect = 0) {
    std::string out;
    EXPECT_EQ(tune("train" + common + " --out " + (tmp / name).string() + extra, &out), expect) << out;
    return tmp / name;
  }
  // Edits the current checkpoint's zo2_state.json, its own checksum updated (as a manifest
  // with bad fields but a good checksum: another writer's), unless `keep_crc`.
  void edit_state(const fs::path& d, const std::function<void(json&)>& f, bool keep_crc = false) {
    const fs::path p = fs::canonical(d / kRunStateFile);
    json j = json::parse(read_file(p));
    f(j);
    if (!keep_crc) j["state_crc32"] = manifest_crc32(j);
    write_file(p, j.dump(2));
  }
};

TEST(RunDirCli, AStateFileIsCheckedFieldByFieldAndNamed) {
  TuneRun r;
  const fs::path d = r.train("part", " --stop-at 3");
  const std::string before = read_file(d / "model.safetensors");
  std::string out;
  // A hand edit (the manifest's own checksum no longer matches) is refused at a resume, naming
  // the file; a flag given on the command line is the way to change one.
  r.edit_state(d, [](json& j) { j["lr"] = 2e-3; }, /*keep_crc=*/true);
  EXPECT_EQ(tune("train --resume " + d.string() + " --out " + d.string(), &out), 1) << out;
  EXPECT_NE(out.find("zo2_state.json: edited since it was saved (its state_crc32 does not match)"), std::string::npos)
      << out;
  r.edit_state(d, [](json& j) { j["lr"] = 3e-3; });  // as it was, with a matching checksum
  // Defect 1: a negative next_step crashed in Dataset::collate.
  r.edit_state(d, [](json& j) { j["next_step"] = -5; });
  EXPECT_EQ(tune("train --resume " + d.string() + " --out " + d.string(), &out), 1) << out;
  EXPECT_NE(out.find("zo2_state.json: key 'next_step' = -5"), std::string::npos) << out;
  r.edit_state(d, [](json& j) { j["next_step"] = 3, j["lr"] = "fast"; });
  EXPECT_EQ(tune("train --resume " + d.string() + " --out " + d.string(), &out), 1) << out;
  EXPECT_NE(out.find("key 'lr' = \"fast\" is not a number"), std::string::npos) << out;
  // Values no flag could give: the flags' own ranges (api/options.h), naming the file and key.
  r.edit_state(d, [](json& j) { j["lr"] = 1e39; });
  EXPECT_EQ(tune("train --resume " + d.string() + " --out " + d.string(), &out), 1) << out;
  EXPECT_NE(out.find("zo2_state.json: key 'lr' = 1e+39"), std::string::npos) << out;
  r.edit_state(d, [](json& j) { j["lr"] = 3e-3, j["lr_schedule"] = "zigzag"; });
  EXPECT_EQ(tune("train --resume " + d.string() + " --out " + d.string(), &out), 1) << out;
  EXPECT_NE(out.find("key 'lr_schedule' = \"zigzag\""), std::string::npos) << out;
  r.edit_state(d, [](json& j) { j["lr_schedule"] = "constant", j["next_step"] = 2; });
  EXPECT_EQ(tune("train --resume " + d.string() + " --out " + d.string(), &out), 1) << out;
  EXPECT_NE(out.find("the manifest's step 3"), std::string::npos) << out;
  EXPECT_EQ(read_file(d / "model.safetensors"), before) << "nothing was written over";
}

TEST(RunDirCli, ResumeKeepsTheStorageDtypeAndEndsWithTheUninterruptedRunsBytes) {
  TuneRun r;
  // Defect 3: --resume continued in fp32 after a bf16 run.
  for (const char* dt : {"bf16", "fp16", "fp8"}) {
    SCOPED_TRACE(dt);
    const std::string flag = std::string(" --storage-dtype ") + dt;
    const fs::path full = r.train(std::string("full-") + dt, flag);
    const fs::path part = r.train(std::string("part-") + dt, flag + " --stop-at 3");
    std::string out;
    ASSERT_EQ(tune("train --resume " + part.string() + " --out " + part.string() + " -q", &out), 0) << out;
    EXPECT_EQ(read_file(full / "model.safetensors"), read_file(part / "model.safetensors"));
    EXPECT_EQ(json::parse(read_file(part / kRunStateFile)).at("storage_dtype"), dt);
  }
  const fs::path part = r.train("part-again", " --storage-dtype bf16 --stop-at 3");
  std::string out;
  EXPECT_EQ(tune("train --resume " + part.string() + " --out " + part.string() + " --storage-dtype fp32", &out), 2)
      << out;
  EXPECT_NE(out.find("stores its weights as bf16"), std::string::npos) << out;
}

TEST(RunDirCli, AResumeWithoutOutCarriesOnTheRunInPlace) {
  TuneRun r;
  const fs::path full = r.train("full");
  const fs::path part = r.train("part", " --stop-at 2");
  std::string out;
  // --resume RUN alone (a requeued job's command line), then through `current` and a step
  // directory: each continues RUN itself.
  ASSERT_EQ(tune("train --resume " + part.string() + " --stop-at 3 -q", &out), 0) << out;
  EXPECT_EQ(json::parse(read_file(part / kRunStateFile)).at("step"), 3);
  ASSERT_EQ(tune("train --resume " + (part / kRunCurrent).string() + " --stop-at 4 -q", &out), 0) << out;
  const fs::path step = part / fs::read_symlink(part / kRunCurrent);
  ASSERT_EQ(tune("train --resume " + step.string() + " -q", &out), 0) << out;
  EXPECT_EQ(read_file(full / "model.safetensors"), read_file(part / "model.safetensors"));
  // A checkpoint that is no run's needs --out named.
  EXPECT_EQ(tune("train --resume " + r.model.string(), &out), 2) << out;
  EXPECT_NE(out.find("--out is required: --resume " + r.model.string() + " is not a run directory"),
            std::string::npos) << out;
  EXPECT_EQ(tune("train" + r.common, &out), 2) << out;
  EXPECT_NE(out.find("--out is required"), std::string::npos) << out;
}

TEST(RunDirCli, AStateSavedElsewhereNeverPicksTheFilesAResumeWrites) {
  // Adversarial pass 52: a downloaded run whose state (its CRC recomputed) names a JSON log
  // and a block directory of this machine had the resume trim and append to that log and
  // write block images there. Those paths are kept only for the directory the state was saved in.
  TuneRun r;
  const fs::path d = r.train("part", " --stop-at 3");
  const std::string log_text = "{\"step\": 1, \"note\": \"the user's own\"}\n{\"step\": 9}\n";
  write_file(r.tmp / "mine.jsonl", log_text);
  fs::create_directories(r.tmp / "blocks");
  write_file(r.tmp / "blocks" / "zo2-blocks.img", "precious");
  r.edit_state(d, [&](json& j) {
    j["run_dir"] = "/nonexistent/run";
    j["log_json"] = (r.tmp / "mine.jsonl").string();
    j["host_mem"] = "64K";
    j["disk_dir"] = (r.tmp / "blocks").string();
  });
  std::string out;
  EXPECT_EQ(tune("train --resume " + d.string() + " --stop-at 5", &out), 0) << out;
  EXPECT_NE(out.find("was saved in /nonexistent/run, so its JSON log and block file are not taken from its state"),
            std::string::npos) << out;
  EXPECT_EQ(read_file(r.tmp / "mine.jsonl"), log_text);
  EXPECT_EQ(read_file(r.tmp / "blocks" / "zo2-blocks.img"), "precious");
  EXPECT_EQ(json::parse(read_file(d / kRunStateFile)).at("step"), 5);
}

TEST(RunDirCli, AResumesTrimOfTheJsonLogWritesTheFileALinkNames) {
  // Adversarial pass 54: the trim renamed a copy over the link (logs/latest.jsonl), leaving
  // run1.jsonl with the records a resume logs again; --log-json /dev/stdout > f.jsonl had a
  // later resume rename a file over /dev/stdout. The state records the file itself.
  TuneRun r;
  fs::create_directories(r.tmp / "logs");
  write_file(r.tmp / "logs" / "run1.jsonl", "");
  fs::create_symlink("run1.jsonl", r.tmp / "logs" / "latest.jsonl");
  const fs::path d = r.train("part", " --stop-at 3 --log-json " + (r.tmp / "logs" / "latest.jsonl").string());
  EXPECT_EQ(json::parse(read_file(d / kRunStateFile)).at("log_json"), (r.tmp / "logs" / "run1.jsonl").string());
  // As a run killed after its checkpoint leaves it: records past step 3.
  std::ofstream(r.tmp / "logs" / "run1.jsonl", std::ios::app) << "{\"step\": 4}\n{\"step\": 5}\n";
  std::string out;
  ASSERT_EQ(tune("train --resume " + d.string() + " --stop-at 5 --log-json " + (r.tmp / "logs" / "latest.jsonl").string(),
                 &out), 0) << out;
  EXPECT_NE(out.find("2 records past step 3 removed"), std::string::npos) << out;
  EXPECT_TRUE(fs::is_symlink(r.tmp / "logs" / "latest.jsonl"));
  std::vector<std::int64_t> steps;
  std::ifstream in(r.tmp / "logs" / "run1.jsonl");
  for (std::string line; std::getline(in, line);) steps.push_back(json::parse(line).at("step").get<std::int64_t>());
  EXPECT_EQ(steps, (std::vector<std::int64_t>{1, 2, 3, 4, 5}));
}

TEST(RunDirCli, TheBaseModelAndAnotherRunAreNeverWrittenOver) {
  TuneRun r;
  const std::string base = read_file(r.model / "model.safetensors");
  std::string out;
  // Defect 6: --out equal to --model overwrote the base model.
  EXPECT_EQ(tune("train" + r.common + " --out " + r.model.string(), &out), 2) << out;
  EXPECT_NE(out.find("is the model directory"), std::string::npos) << out;
  EXPECT_EQ(tune("replay --model " + r.model.string() + " --seed-log /dev/null --out " + r.model.string(), &out), 1);
  EXPECT_EQ(read_file(r.model / "model.safetensors"), base);
  // Defect 7: a second run into the same --out is refused, --overwrite starts over.
  const fs::path a = r.train("a");
  const std::string a_weights = read_file(a / "model.safetensors");
  std::string out2;
  EXPECT_EQ(tune("train" + r.common + " --seed 9 --out " + a.string(), &out2), 2) << out2;
  EXPECT_NE(out2.find("already holds a run"), std::string::npos) << out2;
  EXPECT_EQ(read_file(a / "model.safetensors"), a_weights);
  r.train("a", " --seed 9 --overwrite");
  EXPECT_NE(read_file(a / "model.safetensors"), a_weights);
  EXPECT_EQ(tune("train --resume " + a.string() + " --out " + a.string(), &out2), 0) << out2;  // finished: a no-op
}

TEST(RunDirCli, ASeedLogThatIsNotTheCheckpointsIsRefusedOnResume) {
  TuneRun r;
  const fs::path d = r.train("part", " --stop-at 4");
  const fs::path other = r.train("other", " --seed 77 --stop-at 4");
  const std::string log = read_file(d / kRunSeedLog);
  std::string out;
  // Another run's log.
  fs::copy_file(other / kRunSeedLog, d / kRunSeedLog, fs::copy_options::overwrite_existing);
  EXPECT_EQ(tune("train --resume " + d.string() + " --out " + d.string(), &out), 1) << out;
  EXPECT_NE(out.find("another run"), std::string::npos) << out;
  // A log cut short before the checkpoint's step.
  write_file(d / kRunSeedLog, log.substr(0, log.find('\n', log.find('\n') + 1) + 1));
  EXPECT_EQ(tune("train --resume " + d.string() + " --out " + d.string(), &out), 1) << out;
  EXPECT_NE(out.find("seed_log.jsonl: the seed log holds steps 0..0"), std::string::npos) << out;
  // An edited line that still parses (its eps's last digit): its bytes are not those the
  // checkpoint was saved with.
  std::string edited = log;
  const auto eps_end = edited.find(',', edited.find("\"eps\":", edited.find('\n')));
  edited[eps_end - 1] = edited[eps_end - 1] == '1' ? '2' : '1';
  write_file(d / kRunSeedLog, edited);
  EXPECT_EQ(tune("train --resume " + d.string() + " --out " + d.string(), &out), 1) << out;
  EXPECT_NE(out.find("rewritten or comes from another run"), std::string::npos) << out;
  // Defect 8: a torn last line (a full disk mid-append) is ignored, and the run continues.
  write_file(d / kRunSeedLog, log + "{\"step\":4,\"se");
  const fs::path full = r.train("full");
  EXPECT_EQ(tune("train --resume " + d.string() + " --out " + d.string() + " -q", &out), 0) << out;
  EXPECT_EQ(read_file(full / "model.safetensors"), read_file(d / "model.safetensors"));
  EXPECT_EQ(read_file(full / kRunSeedLog), read_file(d / kRunSeedLog));
}

TEST(RunDirCli, ARunSavedBeforeRunDirectoriesResumesAndBecomesOne) {
  TuneRun r;
  const fs::path part = r.train("part", " --stop-at 3");
  // The layout zo2 wrote before run directories: the files at the top, a version-1 state.
  const fs::path old = r.tmp / "old";
  fs::create_directories(old);
  for (const auto& e : fs::directory_iterator(part / "current")) fs::copy_file(e.path(), old / e.path().filename());
  fs::copy_file(part / kRunSeedLog, old / kRunSeedLog);
  json st = json::parse(read_file(old / kRunStateFile));
  st["zo2_state"] = 1;
  st.erase("files"), st.erase("seed_log"), st.erase("step");
  write_file(old / kRunStateFile, st.dump(2));
  std::string out;
  ASSERT_EQ(tune("train --resume " + old.string() + " --out " + old.string() + " -q", &out), 0) << out;
  const fs::path full = r.train("full");
  EXPECT_EQ(read_file(full / "model.safetensors"), read_file(old / "model.safetensors"));
  EXPECT_TRUE(fs::is_symlink(old / "model.safetensors")) << "the old top-level files became links";
  EXPECT_EQ(open_checkpoint(old, true).step, 8);
}

// Note [State versions]: a manifest says which zo2 wrote it and is version 3 unless it owes
// an evaluation; one from a later zo2 (a version this one does not read) is refused naming
// both versions.
TEST(RunDirCli, AManifestSaysWhoWroteItAndALaterVersionIsRefusedNamingIt) {
  TuneRun r;
  const fs::path d = r.train("run", " --stop-at 3");
  const fs::path mfile = d / "current" / kRunStateFile;
  json m = json::parse(read_file(mfile));
  EXPECT_EQ(m["zo2_state"], 3);
  EXPECT_EQ(m["written_by"], std::string("zo2 ") + ZO2_TEST_VERSION);
  m["zo2_state"] = 5;
  m["written_by"] = "zo2 9.0.0";
  m["state_crc32"] = manifest_crc32(m);
  write_file(fs::canonical(mfile), m.dump(2));
  std::string out;
  EXPECT_EQ(tune("train --resume " + d.string() + " --out " + d.string() + " -q", &out), 1) << out;
  EXPECT_NE(out.find("field 'zo2_state' = 5 is not a state version this zo2 (" + std::string(ZO2_TEST_VERSION) +
                     ") reads (1 to 4): it was written by zo2 9.0.0"),
            std::string::npos)
      << out;
}

// Adversarial pass 53: a LoRA or prefix run saved by a C API or Python session (its seed log
// elsewhere, no base in its state) could not be resumed in place: refused for the state's
// empty base, and with --model it ran every step and then had its save refused ("holds the
// checkpoint of another run"), its checkpoint left at the old step. It resumes as a full
// session run does, the base from the seed log's header (fingerprint-checked) or --model, and
// the log it ends with replays to its adapter. A save that would be refused for its directory
// is refused before any step (Note [Save refusals up front]): --out a run's step directory.
TEST(RunDirCli, AnAdapterRunSavedByASessionResumesInPlace) {
  TuneRun r;
  const ModelConfig c = ModelConfig::load(r.model);
  const auto batches = test::patterned_batches(c, 3, 2, 16, 0, 5, 11);
  for (const bool prefix : {false, true}) {
    const std::string name = prefix ? "prefix" : "lora";
    SCOPED_TRACE(name);
    const fs::path run = r.tmp / name;
    {
      SessionConfig s;
      s.max_batch = 2;
      s.max_seq = 16;
      s.threads = 1;
      s.run_seed = 5;
      s.seed_log = r.tmp / (name + ".seed_log.jsonl");  // outside the run directory, as a host keeps it
      s.base_model = fs::absolute(r.model).string();
      if (prefix) {
        s.peft.prefix = 3;
      } else {
        s.peft.lora = true;
        s.peft.r = 4;
      }
      Session session(r.model, s);
      for (int t = 0; t < 3; ++t) session.step(batches[static_cast<std::size_t>(t)], 3e-3f, 1e-3f, 0.0f);
      session.save(run, DType::f32, 5'000'000'000);
    }
    EXPECT_FALSE(json::parse(read_file(run / kRunStateFile)).contains("base_model"));
    const std::string resume = "train --resume " + run.string() + " --out " + run.string() + " --data " +
                               r.data.string() + " --steps 6 --batch-size 2 --lr 3e-3 --eps 1e-3 --weight-decay 0 -q";
    std::string out;
    // The base from the header (prefix), or named again (LoRA): both continue in place.
    ASSERT_EQ(tune(resume + " --stop-at 5" + (prefix ? std::string() : " --model " + r.model.string()), &out), 0)
        << out;
    EXPECT_EQ(json::parse(read_file(run / kRunStateFile)).at("step"), 5);
    ASSERT_EQ(tune(resume, &out), 0) << out;
    EXPECT_EQ(json::parse(read_file(run / kRunStateFile)).at("step"), 6);
    const fs::path rep = r.tmp / (name + "-replayed");
    ASSERT_EQ(tune("replay --model " + r.model.string() + " --seed-log " + (run / kRunSeedLog).string() + " -q --out " +
                       rep.string(),
                   &out),
              0)
        << out;
    EXPECT_EQ(read_file(rep / "adapter_model.safetensors"), read_file(run / "adapter_model.safetensors"));
  }
  const fs::path step = r.tmp / "lora" / fs::read_symlink(r.tmp / "lora" / kRunCurrent);
  std::string out;
  EXPECT_EQ(tune("train --resume " + step.string() + " --out " + step.string() + " --steps 8", &out), 2) << out;
  EXPECT_NE(out.find("is a checkpoint of the training run " + (r.tmp / "lora").string()), std::string::npos) << out;
  EXPECT_EQ(out.find("step 7/8"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(step / kRunSeedLog));
  EXPECT_FALSE(fs::exists(step / kRunLockFile));
}

TEST(RunDirCli, ReplayRefusesAStepBeyondTheLogAndWritesARunDirectoryOfItsStep) {
  TuneRun r;
  const fs::path d = r.train("run");
  std::string out;
  EXPECT_EQ(tune("replay --model " + r.model.string() + " --seed-log " + (d / kRunSeedLog).string() +
                     " --until-step 9 --out " + (r.tmp / "rep").string(),
                 &out),
            2)
      << out;
  EXPECT_NE(out.find("holds steps 0..7"), std::string::npos) << out;
  ASSERT_EQ(tune("replay --model " + r.model.string() + " --seed-log " + (d / kRunSeedLog).string() +
                     " --until-step 8 --out " + (r.tmp / "rep").string() + " -q",
                 &out),
            0)
      << out;
  EXPECT_EQ(open_checkpoint(r.tmp / "rep", true).step, 8);
  EXPECT_EQ(read_file(d / "model.safetensors"), read_file(r.tmp / "rep" / "model.safetensors"));
}

}  // namespace
}  // namespace zo2
