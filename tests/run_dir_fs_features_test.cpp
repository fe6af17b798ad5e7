// Run directories and checkpoint writes on file systems that lack a feature (adversarial
// pass 67): a FUSE backend that loses a write without an error, a FUSE mount with direct_io
// (no shared mappings), a mount with nosymfollow, a run directory copied with its links
// followed, a first save whose `current` cannot be made, a rename that will not replace an
// entry, and a seed log two writers appended to at once. Each is emulated without FUSE or a
// mount, so that CI (a container, root) runs it.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "api/run_dir.h"
#include "models/safetensors.h"
#include "runtime/checksum.h"
#include "runtime/error.h"
#include "runtime/file_util.h"
#include "runtime/philox.h"
#include "tests/test_util.h"
#include "zo/seed_log.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

namespace zo2 {
namespace {

using test::read_file;
using test::write_file;

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::error_of;

bool has_text(const Error& e, const std::string& piece) { return std::string(e.what()).find(piece) != std::string::npos; }

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

// A safetensors file of one f32 tensor of n elements, written by write_safetensors.
std::vector<float> weights_of(std::size_t n, float base) {
  std::vector<float> v(n);
  std::iota(v.begin(), v.end(), base);
  return v;
}

// AtomicFile computes the CRC-32 of what it is given as it writes it (pieces in any order,
// from several threads), and a WrittenFileLog of the directory holds it by file name.
TEST(WritesNotMappings, AnAtomicFileKnowsTheCrcOfTheBytesItWasGiven) {
  test::TempDir tmp;
  std::string bytes(3 << 20, '\0');
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 7 + i / 4096);
  const auto all = std::as_bytes(std::span<const char>(bytes.data(), bytes.size()));
  const WrittenFileLog log(tmp.path());
  AtomicFile f(tmp / "w.bin");
  f.reserve(bytes.size());
  f.write_at(all.subspan(2 << 20), 2 << 20);  // out of order
  f.write_at(all.subspan(0, 1 << 20), 0);
  f.write_at(all.subspan(1 << 20, 1 << 20), 1 << 20);
  f.commit();
  ASSERT_TRUE(f.written().has_value());
  EXPECT_EQ(f.written()->bytes, bytes.size());
  EXPECT_EQ(f.written()->crc32, crc32_update(0, all));
  EXPECT_EQ(f.written()->crc32, crc32_file(tmp / "w.bin"));
  ASSERT_TRUE(log.find("w.bin").has_value());
  EXPECT_EQ(log.find("w.bin")->crc32, crc32_update(0, all));
  EXPECT_FALSE(log.find("other").has_value());
  // Appends: the same.
  AtomicFile g(tmp / "a.txt");
  g.write("hello, ");
  g.write("world\n");
  g.commit();
  EXPECT_EQ(read_file(tmp / "a.txt"), "hello, world\n");
  EXPECT_EQ(log.find("a.txt")->crc32, crc32_update(0, std::as_bytes(std::span<const char>("hello, world\n", 13))));
}

// F2: a FUSE mount with direct_io refuses shared writable mappings (ENODEV), and nothing could
// be saved there. The writer must never map the file it writes: a fill callback, called
// while the file is written, finds no mapping of the temp file in /proc/self/maps.
TEST(WritesNotMappings, TheSafetensorsWriterNeverMapsTheFileItWrites) {
  test::TempDir tmp;
  const fs::path out = tmp / "model.safetensors";
  const std::vector<float> a = weights_of(1 << 16, 1.0f);
  std::vector<std::string> mapped;  // lines of /proc/self/maps naming the temp file
  TensorToWrite t0{"a", DType::f32, {1 << 16}, a.data(), {}};
  TensorToWrite t1;
  t1.name = "b";
  t1.dtype = DType::f32;
  t1.shape = {1024};
  t1.fill = [&](std::span<std::byte> dst, std::uint64_t) {  // (one piece: 4 KiB)
    std::ifstream maps("/proc/self/maps");
    for (std::string line; std::getline(maps, line);)
      if (line.find(".model.safetensors.tmp") != std::string::npos) mapped.push_back(line);
    const std::vector<float> b = weights_of(1024, -5.0f);
    std::memcpy(dst.data(), b.data(), dst.size());
  };
  const std::vector<TensorToWrite> ts = {t0, t1};
  write_safetensors(out, ts);
  EXPECT_TRUE(mapped.empty()) << "the writer mapped the file it writes: " << (mapped.empty() ? "" : mapped[0]);
  const SafetensorsFile f = SafetensorsFile::open(out);
  const auto b = f.read("b");
  ASSERT_EQ(b.size(), 4096u);
  float first = 0;
  std::memcpy(&first, b.data(), 4);
  EXPECT_EQ(first, -5.0f);
  const auto av = f.read("a");
  EXPECT_EQ(std::memcmp(av.data(), a.data(), av.size()), 0);
}

// A fill tensor's exception still reaches the caller unchanged, and nothing is left behind.
TEST(WritesNotMappings, AFillThatThrowsLeavesNoFile) {
  test::TempDir tmp;
  TensorToWrite t;
  t.name = "x";
  t.dtype = DType::f32;
  t.shape = {4};
  t.fill = [](std::span<std::byte>, std::uint64_t) { throw std::runtime_error("no bytes today"); };
  const std::vector<TensorToWrite> ts = {t};
  EXPECT_THROW(write_safetensors(tmp / "m.safetensors", ts), std::runtime_error);
  EXPECT_TRUE(fs::is_empty(tmp.path()));
}

// F1: a FUSE file system lost a write the daemon failed, with no error to msync or fsync, and
// the save recorded the CRC-32 it read back from the damaged file. Emulated: the writer's
// file is damaged after write_safetensors returns, as the lost write-back does. The save must
// fail, keep the previous checkpoint, and never record the damaged bytes as good.
TEST(WritesNotMappings, ASaveWhoseWeightsTheFileSystemDamagedIsRefused) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  publish_checkpoint(d, request(1, "step 1"));
  const std::vector<float> w = weights_of(1 << 16, 0.5f);
  PublishRequest r;
  r.step = 2;
  r.write = [&](const fs::path& dir) {
    write_file(dir / "config.json", "{}\n");
    const std::vector<TensorToWrite> ts = {TensorToWrite{"w", DType::f32, {1 << 16}, w.data(), {}}};
    write_safetensors(dir / "model.safetensors", ts);
    // The bytes from 100000 on never reached the backend: zeros there.
    const int fd = ::open((dir / "model.safetensors").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    const std::vector<char> zeros(4096, 0);
    ASSERT_EQ(::pwrite(fd, zeros.data(), zeros.size(), 100000), static_cast<ssize_t>(zeros.size()));
    ::close(fd);
  };
  const Error e = error_of([&] { publish_checkpoint(d, r); });
  EXPECT_TRUE(has_text(e, "other bytes than were written")) << e.what();
  EXPECT_TRUE(has_text(e, "model.safetensors")) << e.what();
  const OpenedCheckpoint o = open_checkpoint(d, /*verify_checksums=*/true);
  EXPECT_EQ(o.step, 1);
  EXPECT_EQ(read_file(d / "model.safetensors"), "step 1");
}

// And an undamaged save records the CRC-32 of the bytes meant, which the file has.
TEST(WritesNotMappings, TheManifestRecordsTheCrcOfTheBytesMeant) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  const std::vector<float> w = weights_of(1 << 16, 0.5f);
  PublishRequest r;
  r.step = 2;
  r.write = [&](const fs::path& dir) {
    write_file_atomic(dir / "config.json", "{}\n");
    const std::vector<TensorToWrite> ts = {TensorToWrite{"w", DType::f32, {1 << 16}, w.data(), {}}};
    write_safetensors(dir / "model.safetensors", ts);
  };
  publish_checkpoint(d, r);
  const OpenedCheckpoint o = open_checkpoint(d, /*verify_checksums=*/true);
  EXPECT_EQ(o.state.at("files").at("model.safetensors").at("crc32").get<std::uint32_t>(),
            crc32_file(o.dir / "model.safetensors"));
  EXPECT_EQ(o.state.at("files").at("config.json").at("crc32").get<std::uint32_t>(),
            crc32_update(0, std::as_bytes(std::span<const char>("{}\n", 3))));
}

// F3: on a mount with nosymfollow, following `current` fails (ELOOP) and every resume was
// refused as "not one of the run's step directories". Emulated without a mount: the run
// directory is reached through a chain of 40 links, Linux's limit, so a path through it
// resolves and one that also follows `current` fails with ELOOP, as under nosymfollow.
TEST(WritesNotMappings, ARunWhoseCurrentCannotBeFollowedResumesAndSaves) {
  test::TempDir tmp;
  const fs::path base = fs::canonical(tmp.path());
  const fs::path real = base / "run";
  publish_checkpoint(real, request(1, "step 1"));
  fs::path prev = "run";
  for (int i = 1; i <= 40; ++i) {
    const std::string name = "l" + std::to_string(i);
    fs::create_symlink(prev, base / name);
    prev = name;
  }
  const fs::path d = base / "l40";
  std::error_code ec;
  ASSERT_TRUE(fs::is_directory(d / "step-00000001", ec));
  (void)fs::status(d / "current", ec);
  ASSERT_TRUE(ec == std::errc::too_many_symbolic_link_levels) << "the emulation needs `current` unfollowable: " << ec.message();
  {
    RunDirLock lock(d);  // a resume takes the directory: clean_run_dir checks `current`
    publish_checkpoint(d, request(2, "step 2"));
  }
  EXPECT_EQ(fs::read_symlink(real / "current"), "step-00000002");
  EXPECT_FALSE(fs::exists(real / "step-00000001"));
  EXPECT_EQ(open_checkpoint(d, true).step, 2);
  EXPECT_EQ(read_file(real / "model.safetensors"), "step 2");
}

// F4: a run directory copied with its links followed (cp -rL, scp -r, a copy to exFAT):
// `current` is a directory and the checkpoint's files are copied beside it. Its manifest's
// seed log is the copy's own, not COPY/../seed_log.jsonl.
TEST(WritesNotMappings, ARunCopiedWithLinksFollowedFindsItsOwnSeedLog) {
  test::TempDir tmp;
  const fs::path d = tmp / "runs" / "run";
  fs::create_directories(d);
  write_file(d / kRunSeedLog, "a seed log\n");
  PublishRequest r = request(3, "step 3");
  r.seed_log = d / kRunSeedLog;
  r.seed_log_position = {3, 11, crc32_update(0, std::as_bytes(std::span<const char>("a seed log\n", 11)))};
  publish_checkpoint(d, r);
  ASSERT_EQ(open_checkpoint(d).seed_log, d / kRunSeedLog);
  const fs::path copy = tmp / "copies" / "RUNL";
  fs::create_directories(copy.parent_path());
  write_file(copy.parent_path() / kRunSeedLog, "another run's log\n");  // must not be picked
  fs::copy(d, copy, fs::copy_options::recursive);  // links followed, as cp -rL
  ASSERT_TRUE(fs::is_directory(fs::symlink_status(copy / "current")));
  const OpenedCheckpoint o = open_checkpoint(copy, true);
  EXPECT_EQ(o.seed_log, copy / kRunSeedLog);
  EXPECT_EQ(read_file(o.seed_log), "a seed log\n");
  // Its step directory, given itself, still names the run directory's log.
  EXPECT_EQ(open_checkpoint(copy / "step-00000003").seed_log, copy / "step-00000003" / ".." / kRunSeedLog);
}

// F5: a first save whose `current` cannot be made (out of inodes) removed the complete step
// directory, the only checkpoint. It is kept, and the next writer makes it current.
// Emulated: a directory (not empty) where the switch makes its temporary link.
TEST(WritesNotMappings, AFirstSaveWhoseSwitchFailsKeepsItsCheckpoint) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  fs::create_directories(d / ".current.tmp" / "x");
  const Error e = error_of([&] { publish_checkpoint(d, request(5, "step 5")); });
  EXPECT_TRUE(has_text(e, "cannot point at step-00000005")) << e.what();
  EXPECT_TRUE(has_text(e, "kept")) << e.what();
  ASSERT_TRUE(fs::exists(d / "step-00000005" / kRunStateFile)) << "the only checkpoint was removed";
  fs::remove_all(d / ".current.tmp");
  { RunDirLock lock(d); }  // the next writer adopts it
  EXPECT_EQ(open_checkpoint(d, true).step, 5);
  EXPECT_EQ(read_file(d / "model.safetensors"), "step 5");
  // With a previous checkpoint the failed save goes, and the previous one stays current.
  fs::create_directories(d / ".current.tmp" / "x");
  const Error e2 = error_of([&] { publish_checkpoint(d, request(6, "step 6")); });
  EXPECT_TRUE(has_text(e2, "cannot point at step-00000006")) << e2.what();
  EXPECT_FALSE(fs::exists(d / "step-00000006"));
  EXPECT_EQ(open_checkpoint(d, true).step, 5);
}

// F6: a file system whose rename will not replace an entry took the first save and failed
// every later one ("cannot point at step-N: File exists"). The writer's probe renames a link
// over another when it takes the directory, and refuses it before any work. Emulated with
// renameat2(RENAME_NOREPLACE) standing in for rename(2).
TEST(WritesNotMappings, ARenameThatCannotReplaceIsRefusedWhenTheWriterTakesTheDirectory) {
  test::TempDir tmp;
  const fs::path d = tmp / "run";
  set_rename_for_testing([](const char* from, const char* to) {
    return ::renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE);
  });
  const Error e = error_of([&] { RunDirLock lock(d); });
  set_rename_for_testing({});
  EXPECT_TRUE(has_text(e, "cannot replace an existing link")) << e.what();
  EXPECT_TRUE(has_text(e, d.string())) << e.what();
  for (const auto& entry : fs::directory_iterator(d))
    EXPECT_EQ(entry.path().filename().string().find("probe"), std::string::npos) << entry.path();
  // A file system that replaces is taken.
  { RunDirLock lock(d); }
}

// F7: two writers of one seed log at once (a file system without locks) left a line that
// repeats a step; the log could not be read and the message did not say how to recover. It
// names the byte where the good lines end and the truncate that keeps them.
TEST(WritesNotMappings, ASeedLogWithARepeatedStepSaysHowToCutItBack) {
  test::TempDir tmp;
  const fs::path p = tmp / "seed_log.jsonl";
  SeedLogHeader h;
  h.run_seed = 7;
  auto entry = [&](std::int64_t step) {
    SeedLogEntry e;
    e.step = step;
    e.seed = derive_step_seed(h.run_seed, static_cast<std::uint64_t>(step));
    e.g = 0.25f;
    e.g_double = 0.25;
    e.lr = 1e-3f;
    e.eps = 1e-3f;
    return e;
  };
  {
    SeedLogWriter w(p, h, /*append=*/false);
    for (int s = 0; s < 3; ++s) w.append(entry(s));
  }
  const std::string good = read_file(p);
  const std::string last = good.substr(good.rfind('\n', good.size() - 2) + 1);
  write_file(p, good + last);  // the second writer's step 2 again
  const Error e = error_of([&] { (void)SeedLog::read(p); });
  EXPECT_TRUE(has_text(e, "does not follow")) << e.what();
  EXPECT_TRUE(has_text(e, "truncate -s " + std::to_string(good.size()) + " " + p.string())) << e.what();
  ASSERT_EQ(::truncate(p.c_str(), static_cast<off_t>(good.size())), 0);
  EXPECT_EQ(SeedLog::read(p).entries.size(), 3u);
}

}  // namespace
}  // namespace zo2
