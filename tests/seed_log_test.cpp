// Tests of the seed log (zo/seed_log.h): exact round trips of every field, skipped updates,
// resuming, and the errors a malformed log gives; and of the learning-rate schedules
// (zo/schedule.h) against transformers' get_constant_schedule_with_warmup,
// get_linear_schedule_with_warmup and get_cosine_schedule_with_warmup (num_cycles 0.5),
// where the learning rate of optimizer step t (0-based) is base_lr · lr_lambda(t).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <numbers>
#include <optional>
#include <string>
#include <vector>

#include "runtime/checksum.h"
#include "runtime/error.h"
#include "runtime/json_file.h"
#include "runtime/philox.h"
#include "tests/test_util.h"
#include "zo/schedule.h"
#include "zo/seed_log.h"

namespace zo2 {
namespace {

using u32 = std::uint32_t;
using u64 = std::uint64_t;

using test::error_of;

u32 bits(float f) { return std::bit_cast<u32>(f); }

// g_double: g's value in double as a run logs it (the reader checks they agree), unless given.
SeedLogEntry entry(std::int64_t step, u64 seed, float g, float lr = 1e-6f, float eps = 1e-3f,
                   float wd = 0.0f, std::optional<double> g_double = std::nullopt) {
  SeedLogEntry e;
  e.step = step;
  e.seed = seed;
  e.g = g;
  e.lr = lr;
  e.eps = eps;
  e.wd = wd;
  e.g_double = g_double ? *g_double : static_cast<double>(g);
  return e;
}

// The seed a run with run seed `run` logs for `step` (the reader checks it).
u64 seed_of(u64 run, std::int64_t step) { return derive_step_seed(run, static_cast<u64>(step)); }

void expect_same_entry(const SeedLogEntry& a, const SeedLogEntry& b) {
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.seed, b.seed) << "step " << a.step;
  EXPECT_EQ(bits(a.g), bits(b.g)) << "g at step " << a.step << ": " << a.g << " vs " << b.g;
  EXPECT_EQ(bits(a.lr), bits(b.lr)) << "lr at step " << a.step;
  EXPECT_EQ(bits(a.eps), bits(b.eps)) << "eps at step " << a.step;
  EXPECT_EQ(bits(a.wd), bits(b.wd)) << "wd at step " << a.step;
  EXPECT_EQ(std::bit_cast<u64>(a.g_double), std::bit_cast<u64>(b.g_double)) << "g_double at step " << a.step;
}

void write_file(const std::filesystem::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

TEST(SeedLog, WriteReadRoundTripKeepsEveryFieldBitForBit) {
  test::TempDir dir;
  const auto path = dir / "seeds.jsonl";
  SeedLogHeader h;
  h.run_seed = (u64{1} << 63) + 12345;  // above 2^53: not representable as a double
  h.storage_dtype = "bf16";
  h.base_model = "/models/opt \"1.3b\"/ü";
  h.first_step = 3;
  const u64 r = h.run_seed;
  const std::vector<SeedLogEntry> entries = {
      entry(3, seed_of(r, 3), std::bit_cast<float>(0x3f8ccccdu), 1e-7f, 1e-3f, 0.0f, 1.1000000000000001),
      entry(4, seed_of(r, 4), -0.0f, 3.3333333e-7f, 5e-4f, 0.1f, -2.5e-300),
      entry(5, seed_of(r, 5), 0.3f, std::numeric_limits<float>::max(), std::numeric_limits<float>::min(), 1e-2f,
            0.1 + 0.2),
      entry(6, seed_of(r, 6), -123456.789f, 6.1e-5f, 1.0f / 3.0f, 0.0f, -123456.789),
      entry(7, seed_of(r, 7), std::numeric_limits<float>::denorm_min(), 1e-6f, 1e-3f, 0.0f, -0.0),
  };
  {
    SeedLogWriter w(path, h, /*append=*/false);
    for (const auto& e : entries) w.append(e);
  }
  const SeedLog log = SeedLog::read(path);
  EXPECT_EQ(log.header.run_seed, h.run_seed);
  EXPECT_EQ(log.header.storage_dtype, "bf16");
  EXPECT_EQ(log.header.base_model, h.base_model);
  EXPECT_EQ(log.header.first_step, 3);
  ASSERT_EQ(log.entries.size(), entries.size());
  for (std::size_t i = 0; i < entries.size(); ++i) expect_same_entry(log.entries[i], entries[i]);
  // The header alone: the same header, no entries.
  const SeedLog head = SeedLog::read(path, /*header_only=*/true);
  EXPECT_EQ(head.header.run_seed, h.run_seed);
  EXPECT_EQ(head.header.first_step, 3);
  EXPECT_EQ(head.header_end, log.header_end);
  EXPECT_TRUE(head.entries.empty());
}

TEST(SeedLog, NonFiniteProjectedGradientsRoundTripAsSkippedUpdates) {
  test::TempDir dir;
  const auto path = dir / "seeds.jsonl";
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  {
    SeedLogWriter w(path, SeedLogHeader{}, false);
    w.append(entry(0, seed_of(0, 0), nan, 1e-6f, 1e-3f, 0, std::numeric_limits<double>::quiet_NaN()));
    w.append(entry(1, seed_of(0, 1), inf, 1e-6f, 1e-3f, 0, std::numeric_limits<double>::infinity()));
    w.append(entry(2, seed_of(0, 2), -inf));
    w.append(entry(3, seed_of(0, 3), 0.25f, 1e-6f, 1e-3f, 0, 0.25));
  }
  const SeedLog log = SeedLog::read(path);
  ASSERT_EQ(log.entries.size(), 4u);
  EXPECT_TRUE(std::isnan(log.entries[0].g));
  EXPECT_EQ(log.entries[1].g, inf);
  EXPECT_EQ(log.entries[2].g, -inf);
  EXPECT_EQ(log.entries[3].g, 0.25f);
  EXPECT_EQ(log.entries[1].seed, seed_of(0, 1));
  EXPECT_EQ(log.entries[3].g_double, 0.25);
  for (const auto& e : log.entries) EXPECT_FALSE(std::isnan(e.lr));
}

TEST(SeedLog, AWriterRefusesALogRemovedReplacedOrWrittenByAnotherProgram) {
  // Note [The seed log stays this writer's] (adversarial pass 57): the lines went to a deleted
  // file, or mixed with a second session's, and every step and save returned success.
  test::TempDir dir;
  const auto path = dir / "seeds.jsonl";
  auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  {
    SeedLogWriter w(path, SeedLogHeader{}, false);
    w.append(entry(0, seed_of(0, 0), 0.5f));
    std::filesystem::remove(path);
    EXPECT_NE(message([&] { w.append(entry(1, seed_of(0, 1), 0.5f)); }).find("the seed log was removed"),
              std::string::npos);
  }
  {
    SeedLogWriter w(path, SeedLogHeader{}, false);
    w.append(entry(0, seed_of(0, 0), 0.5f));
    std::filesystem::copy_file(path, dir / "copy.jsonl");
    std::filesystem::rename(dir / "copy.jsonl", path);
    EXPECT_NE(message([&] { w.sync(); }).find("replaced by another file"), std::string::npos);
  }
  std::filesystem::remove(path);
  SeedLogWriter w(path, SeedLogHeader{}, false);
  w.append(entry(0, seed_of(0, 0), 0.5f));
  std::ofstream(path, std::ios::app) << "{\"step\": 1}\n";  // another writer's line
  const std::string m = message([&] { w.append(entry(1, seed_of(0, 1), 0.5f)); });
  EXPECT_NE(m.find("another program (a second session on the same log?) changed it"), std::string::npos) << m;
}

TEST(SeedLog, ASecondWriterOfALiveLogIsRefusedBeforeItChangesAnything) {
  // Note [One writer per seed log] (adversarial pass 60): a second session continuing the log
  // from an earlier step cut off the steps the live one had written.
  test::TempDir dir;
  const auto path = dir / "seeds.jsonl";
  SeedLogHeader h;
  h.run_seed = 7;
  auto first = std::make_unique<SeedLogWriter>(path, h, false);
  for (int t = 0; t < 6; ++t) first->append(entry(t, seed_of(7, t), 0.5f));
  first->sync();
  const std::string before = read_regular_file(path);
  const Error e = test::error_of([&] { SeedLogWriter second(path, h, /*append=*/true, 3); });
  EXPECT_EQ(e.kind(), ErrorKind::io);
  // In this process its registry says so, and what closes the other session (adversarial pass 61).
  EXPECT_NE(std::string(e.what()).find("another session of this process is writing this seed log"), std::string::npos)
      << e.what();
  EXPECT_NE(std::string(e.what()).find("Session.close()"),
            std::string::npos)
      << e.what();
  EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  EXPECT_EQ(read_regular_file(path), before);
  // A new log there is refused as live too, not told to "continue it (append)" — which would
  // then be refused (pass 63).
  const Error fresh = test::error_of([&] { SeedLogWriter second(path, h, /*append=*/false); });
  EXPECT_EQ(fresh.kind(), ErrorKind::io) << fresh.what();
  EXPECT_NE(std::string(fresh.what()).find("another session of this process is writing this seed log"),
            std::string::npos)
      << fresh.what();
  EXPECT_EQ(read_regular_file(path), before);
  // Another process too (a forked child opens the file anew; the lock is the open file's), with
  // or without append.
  for (const bool append : {true, false})
    EXPECT_EQ(test::in_child([&] {
                try {
                  SeedLogWriter second(path, h, append, 3);
                } catch (const Error& e) {
                  return e.kind() == ErrorKind::io && std::string(e.what()).find("is writing this seed log") !=
                                                          std::string::npos
                             ? 0
                             : 2;
                }
                return 1;
              }),
              0)
        << "append " << append;
  EXPECT_EQ(read_regular_file(path), before);
  first->append(entry(6, seed_of(7, 6), 0.5f));  // the live writer goes on
  first.reset();
  // Once it is closed, a new log there is refused for what the file holds,
  EXPECT_EQ(test::error_of([&] { SeedLogWriter second(path, h, /*append=*/false); }).kind(),
            ErrorKind::invalid_argument);
  SeedLogWriter again(path, h, /*append=*/true, 3);  // and a resume may cut
  EXPECT_EQ(again.position().next_step, 3);
  EXPECT_EQ(SeedLog::read(path).entries.size(), 3u);
}

TEST(SeedLog, AppendingOnResumeDropsEntriesFromTheResumeStepOn) {
  test::TempDir dir;
  const auto path = dir / "seeds.jsonl";
  SeedLogHeader h;
  h.run_seed = 99;
  h.base_model = "start";
  {
    SeedLogWriter w(path, h, false);
    for (int t = 0; t < 10; ++t)
      w.append(entry(t, seed_of(99, t), t == 2 ? std::numeric_limits<float>::quiet_NaN() : 0.5f * t,
                     1e-6f, 1e-3f, 0.0f, 0.5 * t));
  }
  const std::uint64_t before6 = SeedLog::read(path).bytes_before(6);
  SeedLogHeader resumed = h;  // a resumed run keeps the original header (its base model too)
  resumed.base_model = "the checkpoint it resumed from";
  {
    SeedLogWriter w(path, resumed, /*append=*/true, /*keep_until_step=*/6);
    EXPECT_EQ(w.position().bytes, before6);
    EXPECT_EQ(w.position().next_step, 6);
    EXPECT_EQ(w.position().crc32, crc32_file(path)) << "the position's CRC is the file's";
    w.append(entry(6, seed_of(99, 6), -1.0f));
    w.append(entry(7, seed_of(99, 7), -2.0f));
    EXPECT_EQ(w.position().crc32, crc32_file(path));
    EXPECT_EQ(w.position().bytes, std::filesystem::file_size(path));
  }
  const SeedLog log = SeedLog::read(path);
  EXPECT_EQ(log.header.run_seed, 99u);
  EXPECT_EQ(log.header.base_model, "start");
  ASSERT_EQ(log.entries.size(), 8u);
  for (int t = 0; t < 6; ++t) {
    EXPECT_EQ(log.entries[t].step, t);
    EXPECT_EQ(log.entries[t].seed, seed_of(99, t));
    if (t == 2) {
      EXPECT_TRUE(std::isnan(log.entries[t].g)) << "a skipped update survives the cut";
    } else {
      EXPECT_EQ(log.entries[t].g, 0.5f * t);
    }
  }
  EXPECT_EQ(log.entries[6].g, -1.0f);
  EXPECT_EQ(log.entries[7].seed, seed_of(99, 7));
  EXPECT_FALSE(std::filesystem::exists(path.string() + ".tmp"));
}

TEST(SeedLog, AppendingRefusesAnotherRunsLogOrOneThatEndsBeforeTheResumeStep) {
  test::TempDir dir;
  const auto path = dir / "seeds.jsonl";
  SeedLogHeader h;
  h.run_seed = 99;
  h.storage_dtype = "bf16";
  {
    SeedLogWriter w(path, h, false);
    for (int t = 0; t < 4; ++t) w.append(entry(t, seed_of(99, t), 0.5f));
  }
  const auto before = crc32_file(path);
  SeedLogHeader other = h;
  other.run_seed = 12345;
  Error e = error_of([&] { SeedLogWriter w(path, other, true, 4); });
  EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
  EXPECT_NE(std::string(e.what()).find("another run"), std::string::npos) << e.what();
  other = h;
  other.storage_dtype = "fp32";
  e = error_of([&] { SeedLogWriter w(path, other, true, 4); });
  EXPECT_NE(std::string(e.what()).find("storage"), std::string::npos) << e.what();
  e = error_of([&] { SeedLogWriter w(path, h, true, 7); });
  EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
  EXPECT_NE(std::string(e.what()).find("steps 0..3"), std::string::npos) << e.what();
  EXPECT_EQ(crc32_file(path), before) << "a refused append changes nothing";
}

TEST(SeedLog, ATornLastLineIsIgnoredWithAWarningAndCutOffByTheNextAppend) {
  test::TempDir dir;
  const auto path = dir / "seeds.jsonl";
  SeedLogHeader h;
  h.run_seed = 3;
  {
    SeedLogWriter w(path, h, false);
    for (int t = 0; t < 3; ++t) w.append(entry(t, seed_of(3, t), 0.5f));
  }
  const auto whole = std::filesystem::file_size(path);
  {
    std::ofstream out(path, std::ios::app | std::ios::binary);
    out << R"({"step":3,"seed":)";  // a full disk in the middle of step 3's line
  }
  const SeedLog torn = SeedLog::read(path);
  EXPECT_TRUE(torn.torn_tail);
  EXPECT_EQ(torn.entries.size(), 3u);
  EXPECT_EQ(torn.valid_bytes, whole);
  {
    SeedLogWriter w(path, h, true, 3);
    EXPECT_EQ(std::filesystem::file_size(path), whole);
    w.append(entry(3, seed_of(3, 3), 0.25f));
  }
  const SeedLog log = SeedLog::read(path);
  EXPECT_FALSE(log.torn_tail);
  ASSERT_EQ(log.entries.size(), 4u);
  EXPECT_EQ(log.entries[3].g, 0.25f);
}

// A new (non-append) log never replaces what is at its path: another run's seed log (it
// could no longer be replayed) or a file that is not a seed log (a model's weights named by
// mistake); an empty file is taken.
TEST(SeedLog, AppendToAMissingFileStartsANewLogAndNonAppendNeverReplaces) {
  test::TempDir dir;
  const auto path = dir / "seeds.jsonl";
  SeedLogHeader h;
  h.run_seed = 5;
  {
    SeedLogWriter w(path, h, /*append=*/true, 0);
    w.append(entry(0, seed_of(5, 0), 1.0f));
  }
  EXPECT_EQ(SeedLog::read(path).header.run_seed, 5u);
  EXPECT_EQ(SeedLog::read(path).entries.size(), 1u);
  h.run_seed = 6;
  Error e = test::error_of([&] { SeedLogWriter w(path, h, /*append=*/false); });
  EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
  EXPECT_NE(std::string(e.what()).find("already holds a seed log"), std::string::npos) << e.what();
  EXPECT_EQ(SeedLog::read(path).header.run_seed, 5u);
  EXPECT_EQ(SeedLog::read(path).entries.size(), 1u);
  const auto weights = dir / "model.safetensors";
  std::ofstream(weights) << "not a seed log";
  e = test::error_of([&] { SeedLogWriter w(weights, h, /*append=*/false); });
  EXPECT_NE(std::string(e.what()).find("exists and is not a seed log"), std::string::npos) << e.what();
  std::ifstream in(weights);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), "not a seed log");
  const auto empty = dir / "empty.jsonl";
  std::ofstream{empty};
  { SeedLogWriter w(empty, h, /*append=*/false); }
  const SeedLog log = SeedLog::read(empty);
  EXPECT_EQ(log.header.run_seed, 6u);
  EXPECT_TRUE(log.entries.empty());
}

constexpr const char* kHeader = R"({"zo2_seed_log":1,"run_seed":1,"storage_dtype":"fp32","base_model":"m","first_step":0})";

std::string line(int step, const char* extra = "") {
  return "{\"step\":" + std::to_string(step) + ",\"seed\":" + std::to_string(seed_of(1, step)) +
         ",\"g\":0.5,\"lr\":1e-6,\"eps\":0.001" + extra + "}";
}

// An entry line of run seed 1 with one field's text replaced.
std::string line_with(int step, const std::string& key, const std::string& value) {
  nlohmann::json j = nlohmann::json::parse(line(step));
  j[key] = nlohmann::json::parse(value);
  return j.dump();
}

void expect_format_error_at(const std::string& text, int lineno, std::vector<std::string> pieces) {
  test::TempDir dir;
  const auto path = dir / "bad.jsonl";
  write_file(path, text);
  const Error e = error_of([&] { (void)SeedLog::read(path); });
  EXPECT_EQ(e.kind(), ErrorKind::format) << e.what();
  const std::string msg = e.what();
  const std::string where = path.string() + ":" + std::to_string(lineno);
  EXPECT_NE(msg.find(where), std::string::npos) << "expected '" << where << "' in: " << msg;
  for (const auto& p : pieces) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' in: " << msg;
}

TEST(SeedLog, MalformedLogsAreFormatErrorsNamingFileAndLine) {
  const std::string h = std::string(kHeader) + "\n";
  expect_format_error_at(h + line(0) + "\n" + "{\"step\": 1, oops\n", 3, {"JSON"});
  {
    nlohmann::json no_lr = nlohmann::json::parse(line(0));
    no_lr.erase("lr");
    expect_format_error_at(h + no_lr.dump() + "\n", 2, {"'lr'"});
  }
  expect_format_error_at(h + line(0) + "\n" + line(1) + "\n" + line(3) + "\n", 4,
                         {"step 3 does not follow step 1"});
  expect_format_error_at(h + line(0) + "\n" + line(0) + "\n", 3, {"step 0"});
  expect_format_error_at(line(0) + "\n" + line(1) + "\n", 1, {"zo2_seed_log"});
  // Blank lines are skipped but still counted.
  expect_format_error_at(h + "\n" + line(0) + "\n\n" + "[1, 2]\n", 5, {"object"});
  expect_format_error_at(h + "{\"step\":\"one\",\"seed\":7,\"g\":0.5,\"lr\":1e-6,\"eps\":0.001}\n", 2, {});
  expect_format_error_at(h + line_with(0, "g", "\"lots\"") + "\n", 2, {"'g'", "lots"});
}

// Issue 16, defect 9: what no run can have written is refused, naming file, line and field.
TEST(SeedLog, ValuesNoRunCanHaveWrittenAreRefused) {
  const std::string h = std::string(kHeader) + "\n";
  expect_format_error_at(h + line(0) + "\n" + line(2) + "\n", 3, {"step 2 does not follow step 0"});  // a gap
  expect_format_error_at(h + line(0) + "\n" + line_with(1, "step", "4611686018427387904") + "\n", 3,
                         {"'step' = 4611686018427387904", "not a step a run reaches"});         // a huge step
  expect_format_error_at(h + line(1) + "\n", 2, {"first step 0"});                              // not first_step
  expect_format_error_at(h + line_with(0, "seed", "-1") + "\n", 2, {"'seed'", "-1"});
  expect_format_error_at(h + line_with(0, "seed", "1.5") + "\n", 2, {"'seed'", "1.5"});
  expect_format_error_at(h + line_with(0, "seed", "1180591620717411303424") + "\n", 2, {"'seed'"});  // 2^70
  expect_format_error_at(h + line_with(0, "seed", "7") + "\n", 2, {"'seed' = 7", "another run"});
  expect_format_error_at(h + line_with(0, "g", "1e39") + "\n", 2, {"'g'", "range of a float"});
  expect_format_error_at(h + line_with(0, "lr", "-1e-3") + "\n", 2, {"'lr'", "negative"});
  // g and g_double come from the same two losses: an edited g (or g_double) disagrees.
  expect_format_error_at(h + line(0, ",\"g_double\":0.4999") + "\n", 2,
                         {"'g' = 0.5 disagrees with field 'g_double' = 0.4999", "edited"});
  {
    nlohmann::json j = nlohmann::json::parse(line(0));
    j["g"] = 5.0;
    j["g_double"] = 0.5;
    expect_format_error_at(h + j.dump() + "\n", 2, {"'g' = 5 disagrees"});
  }
  {
    std::string big = line(0);
    big.replace(big.find("1e-6"), 4, "1e309");  // beyond a double: the JSON parser's overflow
    expect_format_error_at(h + big + "\n", 2, {"1e309"});
  }
  expect_format_error_at(h + line_with(0, "eps", "0") + "\n", 2, {"'eps'", "not positive"});
  expect_format_error_at(h + line_with(0, "wd", "-1") + "\n", 2, {"'wd'", "negative"});
  expect_format_error_at(h + line_with(0, "wd", "\"nan\"") + "\n", 2, {"'wd'"});
  // A header from another run: every seed is then another run's.
  const std::string other = R"({"zo2_seed_log":1,"run_seed":2,"storage_dtype":"fp32","base_model":"m","first_step":0})";
  expect_format_error_at(other + "\n" + line(0) + "\n", 2, {"'seed'", "run seed 2"});
  expect_format_error_at(R"({"zo2_seed_log":1,"run_seed":-3})" "\n", 1, {"'run_seed'"});
  expect_format_error_at(R"({"zo2_seed_log":1,"run_seed":1,"storage_dtype":"fp7"})" "\n", 1, {"fp7"});
  expect_format_error_at(R"({"zo2_seed_log":2,"run_seed":1})" "\n", 1, {"version"});
}

// Adversarial pass 52: a log whose header's first_step and only step are INT64_MAX (with that
// step's true seed) was read, and next_step() (step + 1) overflowed; replay then blamed an
// --until-step that was never given. Steps beyond kMaxSeedLogStep (2^53, the bound of --steps
// and --first-step) are refused naming file, line and field; 2^53 itself is taken.
TEST(SeedLog, StepsBeyondWhatARunReachesAreRefusedNamingTheField) {
  auto header = [](std::int64_t first) {
    nlohmann::json h = nlohmann::json::parse(kHeader);
    h["first_step"] = first;
    return h.dump() + "\n";
  };
  auto entry_line = [](std::int64_t step) {
    nlohmann::json j = nlohmann::json::parse(line(0));
    j["step"] = step;
    j["seed"] = seed_of(1, step);
    return j.dump() + "\n";
  };
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  expect_format_error_at(header(kMax) + entry_line(kMax), 1, {"'first_step' = 9223372036854775807", "2^53"});
  expect_format_error_at(header(kMaxSeedLogStep + 1) + entry_line(kMaxSeedLogStep + 1), 1, {"'first_step'"});
  expect_format_error_at(header(kMaxSeedLogStep) + entry_line(kMaxSeedLogStep) + entry_line(kMaxSeedLogStep + 1), 3,
                         {"'step' = 9007199254740993", "not a step a run reaches"});
  expect_format_error_at(header(0) + entry_line(kMax), 2, {"'step' = 9223372036854775807"});
  test::TempDir dir;
  write_file(dir / "last.jsonl", header(kMaxSeedLogStep) + entry_line(kMaxSeedLogStep));
  const SeedLog log = SeedLog::read(dir / "last.jsonl");
  ASSERT_EQ(log.entries.size(), 1u);
  EXPECT_EQ(log.next_step(), kMaxSeedLogStep + 1);
}

// A line nested 300,000 deep under an extra key is refused naming file and line before a deep
// tree is built (Note [Reading JSON]); replay crashed on it. In a child, so that a crash fails
// the test, not the test binary.
TEST(SeedLog, ALineNestedPastTheJsonDepthLimitIsRefusedNamingFileAndLine) {
  const std::string h = std::string(kHeader) + "\n";
  expect_format_error_at(h + line(0, (",\"zz\":" + std::string(64, '[') + std::string(64, ']')).c_str()) + "\n", 2,
                         {"nested deeper than 64 levels"});
  const int rc = test::in_child([&] {
    test::TempDir dir;
    write_file(dir / "deep.jsonl",
               h + line(0) + "\n" + line(1, (",\"zz\":" + std::string(300000, '[') + std::string(300000, ']')).c_str()) + "\n");
    const Error e = error_of([&] { (void)SeedLog::read(dir / "deep.jsonl"); });
    return std::string(e.what()) == (dir / "deep.jsonl").string() + ":3: nested deeper than 64 levels" ? 0 : 1;
  });
  EXPECT_EQ(rc, 0) << "1: the wrong error; 128 + N: killed by signal N";
}

TEST(SeedLog, EmptyOrMissingLogsAreRefused) {
  test::TempDir dir;
  write_file(dir / "empty.jsonl", "");
  const Error empty = error_of([&] { (void)SeedLog::read(dir / "empty.jsonl"); });
  EXPECT_EQ(empty.kind(), ErrorKind::format);
  EXPECT_NE(std::string(empty.what()).find("empty.jsonl"), std::string::npos);
  const Error missing = error_of([&] { (void)SeedLog::read(dir / "missing.jsonl"); });
  EXPECT_EQ(missing.kind(), ErrorKind::io);
  EXPECT_NE(std::string(missing.what()).find("missing.jsonl"), std::string::npos);
}

// ---- learning-rate schedules ----

LrSchedule schedule(LrScheduleKind kind, double lr, std::int64_t warmup, std::int64_t total) {
  LrSchedule s;
  s.kind = kind;
  s.base_lr = lr;
  s.warmup_steps = warmup;
  s.total_steps = total;
  return s;
}

TEST(LrSchedule, ConstantWithoutWarmupIsTheBaseRateAtEveryStep) {
  const LrSchedule s = schedule(LrScheduleKind::constant, 2e-5, 0, 100);
  for (std::int64_t t : {0, 1, 50, 99, 100, 1000}) EXPECT_EQ(s.at(t), 2e-5) << t;
}

TEST(LrSchedule, LinearDecaysToZeroAtTheLastStepAfterWarmup) {
  // transformers: max(0, (total − t) / max(1, total − warmup)) for t ≥ warmup.
  const LrSchedule s = schedule(LrScheduleKind::linear, 1e-3, 10, 110);
  EXPECT_NEAR(s.at(10), 1e-3, 1e-15);
  EXPECT_NEAR(s.at(35), 7.5e-4, 1e-15);
  EXPECT_NEAR(s.at(60), 5e-4, 1e-15);
  EXPECT_NEAR(s.at(109), 1e-5, 1e-15);
  EXPECT_NEAR(s.at(110), 0.0, 1e-18);
  EXPECT_NEAR(s.at(500), 0.0, 1e-18);
  const LrSchedule nw = schedule(LrScheduleKind::linear, 1.0, 0, 4);
  EXPECT_DOUBLE_EQ(nw.at(0), 1.0);
  EXPECT_DOUBLE_EQ(nw.at(1), 0.75);
  EXPECT_DOUBLE_EQ(nw.at(3), 0.25);
}

TEST(LrSchedule, CosineFollowsHalfACosineToZeroAfterWarmup) {
  // transformers (num_cycles 0.5): 0.5 · (1 + cos(π · (t − warmup) / (total − warmup))).
  const LrSchedule s = schedule(LrScheduleKind::cosine, 1e-3, 10, 110);
  EXPECT_DOUBLE_EQ(s.at(10), 1e-3);
  EXPECT_NEAR(s.at(35), 1e-3 * 0.5 * (1 + std::numbers::sqrt2 / 2), 1e-15);  // progress 1/4
  EXPECT_NEAR(s.at(60), 5e-4, 1e-15);                                         // progress 1/2
  EXPECT_NEAR(s.at(85), 1e-3 * 0.5 * (1 - std::numbers::sqrt2 / 2), 1e-15);  // progress 3/4
  EXPECT_NEAR(s.at(109), 1e-3 * 0.5 * (1 + std::cos(std::numbers::pi * 0.99)), 1e-15);
  EXPECT_NEAR(s.at(110), 0.0, 1e-18);
}

TEST(LrSchedule, WarmupRampsLinearlyFromZeroAsTransformersDefinesIt) {
  // transformers: lr_lambda(t) = t / max(1, warmup) for t < warmup, for all three schedules;
  // the first step of a warmed-up run has learning rate 0.
  for (LrScheduleKind kind : {LrScheduleKind::constant, LrScheduleKind::linear, LrScheduleKind::cosine}) {
    const LrSchedule s = schedule(kind, 1e-3, 10, 110);
    SCOPED_TRACE(std::string(LrSchedule::name(kind)));
    EXPECT_NEAR(s.at(0), 0.0, 1e-18);
    EXPECT_NEAR(s.at(1), 1e-4, 1e-15);
    EXPECT_NEAR(s.at(5), 5e-4, 1e-15);
    EXPECT_NEAR(s.at(9), 9e-4, 1e-15);
    EXPECT_NEAR(s.at(10), 1e-3, 1e-15);
  }
}

TEST(LrSchedule, WarmupNeverExceedsTheBaseRateAndIsMonotone) {
  for (LrScheduleKind kind : {LrScheduleKind::constant, LrScheduleKind::linear, LrScheduleKind::cosine}) {
    const LrSchedule s = schedule(kind, 1e-3, 10, 110);
    for (std::int64_t t = 1; t <= 10; ++t) {
      EXPECT_GT(s.at(t), s.at(t - 1) - 1e-18) << LrSchedule::name(kind) << " step " << t;
      EXPECT_LE(s.at(t), 1e-3) << LrSchedule::name(kind) << " step " << t;
    }
  }
}

TEST(LrSchedule, NamesParseAndUnknownNamesAreInvalidArgument) {
  for (LrScheduleKind kind : {LrScheduleKind::constant, LrScheduleKind::linear, LrScheduleKind::cosine})
    EXPECT_EQ(LrSchedule::parse(LrSchedule::name(kind)), kind);
  for (const char* bad : {"cosine_with_restarts", "polynomial", ""}) {
    const Error e = error_of([&] { (void)LrSchedule::parse(bad); });
    EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
    EXPECT_NE(std::string(e.what()).find(std::string("'") + bad + "'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace zo2
