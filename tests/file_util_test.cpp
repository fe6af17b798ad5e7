// Atomic file writes and the temp files of killed writers (Note [Temp files] in
// runtime/file_util.h).
#include "runtime/file_util.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <fstream>
#include <sstream>
#include <vector>

#include "runtime/error.h"
#include "tests/test_util.h"

namespace zo2 {
namespace {

using test::read_file;
namespace fs = std::filesystem;

std::vector<std::string> listing(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// The temp file a writer killed before its rename leaves: a child starts an AtomicFile,
// writes part of it and exits without its destructor (as kill -9 would).
std::string killed_writers_temp(const fs::path& target) {
  int fds[2];
  EXPECT_EQ(::pipe(fds), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(fds[0]);
    AtomicFile f(target);
    f.write("half of it");
    const std::string name = f.temp_path().filename().string();
    (void)!::write(fds[1], name.data(), name.size());
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string name(NAME_MAX + 1, '\0');
  const ssize_t n = ::read(fds[0], name.data(), name.size());
  ::close(fds[0]);
  EXPECT_EQ(::waitpid(child, nullptr, 0), child);
  name.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
  return name;
}

// A host tag that is not this host's (the one in a temp name of this process).
std::string another_host(const std::string& temp_name) {
  const std::string ours = temp_name.substr(temp_name.find('-', temp_name.rfind(".tmp.")) + 1, 8);
  return ours == "00000000" ? "11111111" : "00000000";
}

TEST(AtomicFile, WritesReplaceTheTargetAndLeaveNoTemp) {
  test::TempDir tmp;
  write_file_atomic(tmp / "a.json", "one");
  write_file_atomic(tmp / "a.json", "two, longer");
  EXPECT_EQ(read_file(tmp / "a.json"), "two, longer");
  write_file_atomic(tmp / "empty", "");
  EXPECT_EQ(read_file(tmp / "empty"), "");
  EXPECT_EQ(listing(tmp.path()), (std::vector<std::string>{"a.json", "empty"}));
}

// The temp name holds the writer's pid and host and fits NAME_MAX for the longest legal
// name; two writers of one target never share a temp file.
TEST(AtomicFile, TempNamesAreUniqueAndFitTheLongestName) {
  test::TempDir tmp;
  const std::string longest(NAME_MAX, 'n');
  AtomicFile a(tmp / longest), b(tmp / longest), c(tmp / "x.json");
  EXPECT_NE(a.temp_path(), b.temp_path());
  EXPECT_LE(a.temp_path().filename().string().size(), static_cast<std::size_t>(NAME_MAX));
  const std::string name = c.temp_path().filename().string();
  EXPECT_TRUE(name.starts_with(".x.json.tmp." + std::to_string(::getpid()) + "-")) << name;
  a.write("A");
  b.write("B");
  b.commit();
  a.commit();
  EXPECT_EQ(read_file(tmp / longest), "A");
  std::error_code ec;
  EXPECT_FALSE(fs::exists(a.temp_path(), ec));
  EXPECT_FALSE(fs::exists(b.temp_path(), ec));
}

TEST(AtomicFile, NamesTheTargetWhenTheDirectoryIsMissing) {
  test::TempDir tmp;
  try {
    write_file_atomic(tmp / "no" / "such" / "f", "x");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::io);
    EXPECT_NE(std::string(e.what()).find("/no/such/f"), std::string::npos) << e.what();
  }
}

TEST(AtomicFile, WhoseTempIsAbandoned) {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_EQ(::waitpid(child, nullptr, 0), child);  // a pid now gone
  test::TempDir tmp;
  const std::string dead = killed_writers_temp(tmp / "data.safetensors");
  ASSERT_FALSE(dead.empty());
  EXPECT_EQ(abandoned_temp_target(dead), "data.safetensors");
  // zo2 0.2.0's names (no host part) count as this host's.
  EXPECT_EQ(abandoned_temp_target(fmt::format(".model.safetensors.tmp.{}.9.73fc6965", child)), "model.safetensors");
  // A live writer's, this process's, another host's, and names that are not temp files.
  EXPECT_EQ(abandoned_temp_target(fmt::format(".m.tmp.{}.1.00000000", ::getppid())), std::nullopt);
  EXPECT_EQ(abandoned_temp_target(AtomicFile(tmp / "m").temp_path().filename().string()), std::nullopt);
  const std::string other_host = fmt::format(".m.tmp.{}-{}.1.0", child, another_host(dead));
  EXPECT_EQ(abandoned_temp_target(other_host), std::nullopt);
  for (const std::string junk : {"m.tmp.7.1.2", ".m.tmp.", ".m.tmp.x.1", ".tmp.7.1.2", ".m.tmp.0.1.2", ".m.tmp.7", ".m.tmp.7x.1",
                                 ".m.tmp.99999999999999999999.1.2", "model.safetensors"})
    EXPECT_EQ(abandoned_temp_target(junk), std::nullopt) << junk;
}

// A writer killed before its rename leaves its temp file; the next write of the same target
// removes it, and leaves another target's, a live writer's and another host's alone.
TEST(AtomicFile, ACommitRemovesTheTempsOfItsTargetsKilledWritersOnly) {
  test::TempDir tmp;
  const std::string killed = killed_writers_temp(tmp / "out.safetensors");
  const std::string killed_other = killed_writers_temp(tmp / "out.safetensors2");
  const std::string longest(NAME_MAX, 'z');
  const std::string killed_long = killed_writers_temp(tmp / longest);
  for (const auto& n : {killed, killed_other, killed_long}) ASSERT_TRUE(fs::exists(tmp / n)) << n;
  AtomicFile live(tmp / "out.safetensors");
  live.write("still writing");
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_EQ(::waitpid(child, nullptr, 0), child);
  const std::string elsewhere = fmt::format(".out.safetensors.tmp.{}-{}.0.00000000", child, another_host(killed));
  std::ofstream(tmp / elsewhere) << "another host's";

  write_file_atomic(tmp / "out.safetensors", "whole");
  EXPECT_FALSE(fs::exists(tmp / killed));
  EXPECT_TRUE(fs::exists(tmp / killed_other));
  EXPECT_TRUE(fs::exists(live.temp_path()));
  EXPECT_TRUE(fs::exists(tmp / elsewhere));
  write_file_atomic(tmp / longest, "whole");
  EXPECT_FALSE(fs::exists(tmp / killed_long));
  EXPECT_TRUE(fs::exists(tmp / killed_other));
  EXPECT_EQ(read_file(tmp / "out.safetensors"), "whole");
}

}  // namespace
}  // namespace zo2
