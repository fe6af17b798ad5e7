// Room for a save (Note [Room for a save] in runtime/file_util.h): the free space is what
// statvfs gives an unprivileged writer, and nothing (never a refusal) when statvfs fails or
// reports no blocks; the bytes a save needs bound what it writes; a save the file system
// cannot hold is refused before anything is written, naming the directory, its free space,
// the bytes needed and the ways out, and the run directory keeps its previous checkpoint —
// through Session::save and the C API's zo2_session_save alike.
#include "zo2.h"

#include "api/run_dir.h"
#include "api/session.h"
#include "models/layout.h"
#include "runtime/arena.h"
#include "runtime/error.h"
#include "runtime/file_util.h"
#include "tests/reference_model.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>
#include <sys/statvfs.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace zo2 {
namespace {

namespace fs = std::filesystem;
using test::error_of;

constexpr std::uint64_t kShard = 5'000'000'000;

// statvfs(3) answered as a file system with `free` bytes for an unprivileged writer (and more
// for root), for every path under `under`; the rest from the real one. Unset when it dies.
struct FakeStatvfs {
  FakeStatvfs(fs::path under, std::optional<std::uint64_t> free, bool zero = false, int fail_errno = 0) {
    set_statvfs_for_testing([=](const char* path, struct statvfs* st) {
      if (std::string(path).rfind(under.string(), 0) != 0) return ::statvfs(path, st);
      if (fail_errno != 0) {
        errno = fail_errno;
        return -1;
      }
      std::memset(st, 0, sizeof *st);
      if (zero) return 0;
      st->f_bsize = 1 << 20;  // the preferred I/O size: not the unit of the counts
      st->f_frsize = 512;
      st->f_bavail = *free / 512;
      st->f_bfree = st->f_bavail + 4096;  // root's reserve: not for zo2
      st->f_blocks = st->f_bfree + 100000;
      return 0;
    });
  }
  ~FakeStatvfs() { set_statvfs_for_testing(nullptr); }
};

bool has(const std::string& text, const std::string& piece) { return text.find(piece) != std::string::npos; }

std::uint64_t bytes_in(const fs::path& dir) {
  std::uint64_t n = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) n += e.file_size();
  return n;
}

std::vector<std::string> hidden_entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind('.', 0) == 0) out.push_back(e.path().filename().string());
  return out;
}

TEST(RoomForASave, FreeSpaceIsAnUnprivilegedWritersAndUnknownWhenStatvfsFailsOrReportsNoBlocks) {
  test::TempDir tmp;
  {
    FakeStatvfs fake(tmp.path(), 512 * 1000);
    EXPECT_EQ(free_bytes(tmp.path()), std::optional<std::uint64_t>(512 * 1000));  // f_bavail × f_frsize
    // A directory not made yet: its nearest existing ancestor's file system.
    EXPECT_EQ(free_bytes(tmp / "a" / "b" / "c"), std::optional<std::uint64_t>(512 * 1000));
    const Error e = error_of([&] { require_free_space(tmp / "a", 512 * 1000 + 1, "the thing", "; do something"); });
    EXPECT_EQ(e.kind(), ErrorKind::io);
    const std::string want = (tmp / "a").string() + ": not enough free space for the thing: it needs " +
                             format_bytes(512 * 1000 + 1) + ", but the file system there has " +
                             format_bytes(512 * 1000) + " free; do something";
    EXPECT_EQ(std::string(e.what()), want);
    EXPECT_NO_THROW(require_free_space(tmp / "a", 512 * 1000, "the thing", ""));  // exactly full is room
  }
  {
    FakeStatvfs fake(tmp.path(), std::nullopt, /*zero=*/true);  // FUSE: every field 0
    EXPECT_EQ(free_bytes(tmp.path()), std::nullopt);
    EXPECT_NO_THROW(require_free_space(tmp.path(), std::uint64_t{1} << 50, "the thing", ""));
  }
  {
    FakeStatvfs fake(tmp.path(), std::nullopt, false, ENOSYS);
    EXPECT_EQ(free_bytes(tmp.path()), std::nullopt);
    EXPECT_NO_THROW(require_free_space(tmp.path(), std::uint64_t{1} << 50, "the thing", ""));
  }
  ASSERT_TRUE(free_bytes(tmp.path()).has_value());  // the real file system of the tests
}

// The bytes a save needs bound what it writes — weights, optimizer state, the tokenizer files
// a caller adds, the manifest — and not by much (a bound far above would refuse saves that fit).
TEST(RoomForASave, TheBytesASaveNeedsBoundWhatItWrites) {
  test::TempDir tmp;
  const ModelConfig c = test::small_opt(2);
  test::write_random_checkpoint(tmp / "model", c, 3);
  for (const bool lora : {false, true})
    for (const RuleKind kind : {RuleKind::sgd, RuleKind::adam})
      for (const DType dtype : {DType::f32, DType::bf16}) {
        if (lora && dtype != DType::f32) continue;  // adapters are saved in fp32
        SCOPED_TRACE(testing::Message() << (lora ? "lora " : "full ") << static_cast<int>(kind) << " "
                                        << dtype_name(dtype));
        SessionConfig cfg;
        cfg.max_seq = 8;
        cfg.rule.kind = kind;
        cfg.peft.lora = lora;
        cfg.peft.r = 2;
        Session s(tmp / "model", cfg);
        Session::SaveExtras x;
        x.extra_bytes = 3000;
        x.extra_files = [](const fs::path& dir) {
          std::ofstream(dir / "tokenizer.json") << std::string(3000, 'x');
        };
        x.state = {{"note", std::string(500, 'n')}};
        const SaveRoom room = s.save_room(dtype, kShard, x);
        const fs::path run = tmp / fmt::format("run-{}-{}-{}", lora, static_cast<int>(kind), dtype_name(dtype));
        s.save(run, dtype, kShard, x);
        const std::uint64_t written = bytes_in(run / "current");
        EXPECT_GE(room.bytes, written);
        EXPECT_LE(room.bytes, written + (1 << 20));
        EXPECT_TRUE(has(room.what, "a checkpoint of step 0 (")) << room.what;
        EXPECT_EQ(has(room.what, "optimizer state"), kind == RuleKind::adam && !lora) << room.what;
        if (!lora)  // the weights' part alone bounds the weights' files
          EXPECT_GE(checkpoint_file_bytes(c, dtype, kShard),
                    fs::file_size(run / "current" / "model.safetensors") + fs::file_size(run / "current" / "config.json"));
      }
  // Sharded: every shard's last block counted, the index too.
  {
    SessionConfig cfg;
    cfg.max_seq = 8;
    Session s(tmp / "model", cfg);
    s.save(tmp / "sharded", DType::f32, 30'000);
    ASSERT_TRUE(fs::exists(tmp / "sharded" / "current" / "model.safetensors.index.json"));
    const std::uint64_t written = bytes_in(tmp / "sharded" / "current") -
                                  fs::file_size(tmp / "sharded" / "current" / "zo2_state.json");
    EXPECT_GE(checkpoint_file_bytes(c, DType::f32, 30'000), written);
    EXPECT_GE(s.save_room(DType::f32, 30'000, {}).bytes, bytes_in(tmp / "sharded" / "current"));
    EXPECT_GT(checkpoint_file_bytes(c, DType::f32, 30'000), checkpoint_file_bytes(c, DType::f32, kShard));
  }
  EXPECT_LT(checkpoint_file_bytes(c, DType::bf16, kShard), checkpoint_file_bytes(c, DType::f32, kShard));
}

// A save its file system cannot hold is refused before anything is written, with what to do,
// and the run directory keeps its previous checkpoint; with exactly room enough it saves.
TEST(RoomForASave, ASaveWithoutRoomWritesNothingAndKeepsThePreviousCheckpoint) {
  test::TempDir tmp;
  const ModelConfig c = test::small_opt(2);
  test::write_random_checkpoint(tmp / "model", c, 3);
  SessionConfig cfg;
  cfg.max_seq = 8;
  cfg.rule.kind = RuleKind::adam;
  Session s(tmp / "model", cfg);
  const fs::path run = tmp / "run";
  s.save(run, DType::f32, kShard);  // step 0, with room
  s.set_next_step(3);
  const SaveRoom room = s.save_room(DType::f32, kShard, {});
  const std::uint64_t free = (room.bytes - 1) / 512 * 512;
  {
    FakeStatvfs fake(tmp.path(), free);
    const Error e = error_of([&] { s.save(run, DType::f32, kShard); });
    EXPECT_EQ(e.kind(), ErrorKind::io);
    const std::string m = e.what();
    EXPECT_EQ(m.rfind(run.string() + ": not enough free space for a checkpoint of step 3 (weights as fp32 ", 0), 0u) << m;
    EXPECT_TRUE(has(m, ", optimizer state ")) << m;
    EXPECT_TRUE(has(m, "it needs " + format_bytes(static_cast<double>(room.bytes)) + ", but the file system there has " +
                           format_bytes(static_cast<double>(free)) + " free"))
        << m;
    EXPECT_TRUE(has(m, "a save keeps the previous checkpoint until the new one is published, so each save needs this "
                       "much free: free space there, or choose another out_dir on a file system with room, or save "
                       "narrower (save_dtype bf16 needs "))
        << m;
    EXPECT_EQ(open_checkpoint(run, /*verify_checksums=*/true).step, 0);
    EXPECT_EQ(hidden_entries(run), std::vector<std::string>{}) << "a partial save was left";
    // The same refusal before a run's first step, for any of its saves.
    const Error early = error_of([&] { s.check_save_room(run, DType::f32, kShard, {}); });
    EXPECT_TRUE(has(early.what(), run.string() + ": not enough free space for a checkpoint of this run (")) << early.what();
    // bf16 weights fit where fp32 did not (the message's way out is true).
    EXPECT_NO_THROW(s.check_save_room(run, DType::bf16, kShard, {}));
  }
  {
    FakeStatvfs fake(tmp.path(), (room.bytes + 511) / 512 * 512);
    s.save(run, DType::f32, kShard);
    EXPECT_EQ(open_checkpoint(run, /*verify_checksums=*/true).step, 3);
  }
  {
    FakeStatvfs fake(tmp.path(), std::nullopt, /*zero=*/true);  // FUSE: no numbers, no refusal
    s.set_next_step(4);
    s.save(run, DType::f32, kShard);
    EXPECT_EQ(open_checkpoint(run).step, 4);
  }
}

// The C API's save (and Python's, which calls it) goes through the same check: ZO2_ERR_IO with
// the message, the session usable, the directory as it was.
TEST(RoomForASave, TheCApisSaveIsRefusedTheSameWay) {
  test::TempDir tmp;
  test::write_random_checkpoint(tmp / "model", test::small_opt(2), 3);
  zo2_model* model = nullptr;
  ASSERT_EQ(zo2_model_load((tmp / "model").c_str(), nullptr, &model), 0) << zo2_last_error();
  zo2_session_params p = zo2_session_default_params();
  p.max_seqs = 1;
  p.max_seq_len = 8;
  p.n_threads = 2;
  zo2_session* s = nullptr;
  ASSERT_EQ(zo2_session_init(model, &p, &s), 0) << zo2_last_error();
  const fs::path run = tmp / "run";
  {
    FakeStatvfs fake(tmp.path(), 4096);
    EXPECT_EQ(zo2_session_save(s, run.c_str()), ZO2_ERR_IO);
    const std::string m = zo2_last_error();
    EXPECT_TRUE(has(m, run.string() + ": not enough free space for a checkpoint of step 0 (")) << m;
    EXPECT_TRUE(has(m, "but the file system there has 4.00 KiB free")) << m;
    EXPECT_TRUE(has(m, "choose another out_dir on a file system with room, or save narrower (save_dtype bf16")) << m;
    EXPECT_FALSE(holds_run(run));
  }
  EXPECT_EQ(zo2_session_save(s, run.c_str()), 0) << zo2_last_error();  // usable, and saves with room
  EXPECT_TRUE(holds_run(run));
  zo2_session_free(s);
  zo2_model_free(model);
}

}  // namespace
}  // namespace zo2
