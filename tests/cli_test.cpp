// zo2-tune end to end, as a user runs it: every subcommand's --help, errors for unknown
// flags and bad values, init → forward/train/eval/replay, resume after a stop or a signal,
// the loss falling on a learnable task, and bad input refused before anything is written.
#include "models/safetensors.h"
#include "tests/test_util.h"
#include "tools/cli.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <oneapi/tbb/info.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <limits>
#include <fstream>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <sstream>
#include <thread>
#include <tuple>
#include <unistd.h>

namespace zo2 {
namespace {

namespace fs = std::filesystem;

std::string tune() { return test::zo2_tune_path().string(); }

int run(const std::string& args, std::string* out = nullptr) {
  return test::run_command(tune() + " " + args, out);
}

using test::read_file;

// A tiny model and a learnable dataset, made by the tool itself.
struct Workspace {
  test::TempDir tmp;
  fs::path model = tmp / "model";
  fs::path data = tmp / "data.safetensors";
  Workspace(const std::string& preset = "opt-tiny") {
    std::string out;
    EXPECT_EQ(run("init --preset " + preset + " --out " + model.string() + " --seed 1 -q", &out), 0) << out;
    EXPECT_EQ(run("synth-data --model " + model.string() + " --out " + data.string() + " --rows 64 --seq 32 -q", &out), 0)
        << out;
  }
};

TEST(Cli, EverySubcommandHasHelp) {
  for (const char* sub : {"init", "forward", "plan", "train", "eval", "generate", "replay", "synth-data", "tokenize", "data"}) {
    std::string out;
    EXPECT_EQ(run(std::string(sub) + " --help", &out), 0) << sub;
    EXPECT_NE(out.find("--"), std::string::npos) << sub << ": " << out;
  }
  std::string out;
  EXPECT_EQ(run("--help", &out), 0);
  EXPECT_NE(out.find("train"), std::string::npos);
}

TEST(Cli, UnknownFlagsAndBadValuesAreUsageErrors) {
  Workspace w;
  std::string out;
  EXPECT_EQ(run("train --model " + w.model.string() + " --data " + w.data.string() + " --out x --bogus", &out), 2) << out;
  EXPECT_NE(out.find("bogus"), std::string::npos) << out;
  EXPECT_EQ(run("train --model m --data d --out o --steps -3", &out), 2);
  EXPECT_EQ(run("plan --preset opt-125m --gpu-mem lots", &out), 2) << out;
  EXPECT_NE(out.find("lots"), std::string::npos) << out;
  EXPECT_EQ(run("init --preset opt-9000 --out " + (w.tmp / "x").string(), &out), 2);
  EXPECT_NE(out.find("unknown preset"), std::string::npos) << out;
  EXPECT_EQ(run("forward --model " + w.model.string() + " --inputs " + w.data.string() + " --out o.safetensors --storage-dtype fp12", &out), 2);
  EXPECT_NE(out.find("fp12"), std::string::npos) << out;
  EXPECT_EQ(run("nonsense", &out), 2);
  // A data file that is not there is said to be missing (not a tokenizer problem).
  out.clear();
  EXPECT_EQ(run("train --model " + w.model.string() + " --data " + (w.tmp / "nope.jsonl").string() + " --out " +
                    (w.tmp / "o").string(),
                &out),
            1);
  EXPECT_NE(out.find((w.tmp / "nope.jsonl").string() + ": no such data file"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run("data --model " + w.model.string() + " --data " + w.tmp.path().string(), &out), 2);
  EXPECT_NE(out.find(w.tmp.path().string() + ": a directory, not a data file"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "o"));
}

// Integer flags are decimal as written (Note [Decimal integers], tools/cli.h): "010" is 10,
// not CLI11's octal 8; "0x3" is refused; a value beyond 64 bits is named as typed, not as
// the saturated 9223372036854775807.
// A flag given an empty value is refused naming it (Note [Empty values], tools/cli.h): --eval
// "", --disk-dir "", --log-json "" ran as if the flag were left out — no evaluation, no disk
// tier, no log, and not a word.
TEST(Cli, AFlagGivenAnEmptyValueIsRefusedNamingIt) {
  Workspace w;
  const std::string train = "train --model " + w.model.string() + " --data " + w.data.string() + " --steps 2 -q --out " +
                            (w.tmp / "o").string();
  for (const char* flag : {"--eval", "--disk-dir", "--host-mem", "--log-json", "--gpu-mem", "--parallel", "--tokenizer",
                           "--adapter", "--lr-schedule", "--steps", "--seed", "--lr", "--tile", "--lora-targets"}) {
    SCOPED_TRACE(flag);
    std::string out;
    EXPECT_EQ(run(train + " " + flag + " ''", &out), 2) << out;
    EXPECT_NE(out.find(std::string(flag) + ": an empty value (an unset shell variable?)"), std::string::npos) << out;
    EXPECT_FALSE(fs::exists(w.tmp / "o"));
  }
  std::string out;  // the --flag= spelling (CLI11's own refusal), and other subcommands
  EXPECT_EQ(run(train + " --eval=", &out), 2);
  EXPECT_NE(out.find("--eval: "), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run("eval --model " + w.model.string() + " --data ''", &out), 2);
  EXPECT_NE(out.find("--data: an empty value"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run("init --preset opt-tiny --out ''", &out), 2);
  EXPECT_NE(out.find("--out: an empty value"), std::string::npos) << out;
  // Text whose empty value is a request stays allowed: tokenize --text '' prints [] (the
  // special tokens alone with --special).
  out.clear();
  EXPECT_EQ(run("tokenize --tokenizer " + (test::shared_dir() / "data" / "gpt2").string() + " --text ''", &out), 0)
      << out;
  EXPECT_NE(out.find("[]"), std::string::npos) << out;
}

// A flag and its negation both given is refused (adversarial pass 71: the last one won).
TEST(Cli, AFlagAndItsNegationTogetherAreRefused) {
  Workspace w;
  const std::string train = "train --model " + w.model.string() + " --data " + w.data.string() + " --steps 2 -q --out " +
                            (w.tmp / "o").string();
  std::string out;
  EXPECT_EQ(run(train + " --no-shuffle --shuffle", &out), 2) << out;
  EXPECT_NE(out.find("--shuffle and --no-shuffle were both given"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "o"));
  EXPECT_EQ(run(train + " --shuffle --shuffle", &out), 0) << out;  // the same twice says the same
}

TEST(Cli, IntegerFlagsAreDecimalAsWritten) {
  Workspace w;
  const std::string train = "train --model " + w.model.string() + " --data " + w.data.string() + " --batch-size 02 -q";
  ASSERT_EQ(run(train + " --steps 010 --out " + (w.tmp / "ten").string()), 0);
  std::ifstream log(w.tmp / "ten" / "seed_log.jsonl");
  std::string line, last;
  int steps = 0;
  while (std::getline(log, line))
    if (line.find("\"step\"") != std::string::npos) ++steps;
  EXPECT_EQ(steps, 10);
  std::string out;
  EXPECT_EQ(run(train + " --steps 0x3 --out " + (w.tmp / "hex").string(), &out), 2);
  EXPECT_NE(out.find("--steps: 0x3 is not a whole number"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run(train + " --steps 18446744073709551615 --out " + (w.tmp / "big").string(), &out), 2);
  EXPECT_NE(out.find("18446744073709551615 is beyond what this flag can hold (must be an integer in [1, 2^53])"),
            std::string::npos)
      << out;  // the flag's own range, not the 64-bit field's 9223372036854775807
  EXPECT_EQ(out.find("9223372036854775807:"), std::string::npos) << out;
  // A 32-bit flag past 2^31: named with its value as zo2's other errors are (was CLI11's bare
  // "Could not convert: --batch-size = 3000000000"); a float flag's non-number too.
  out.clear();
  EXPECT_EQ(run(train + " --window 3000000000 --out " + (w.tmp / "wide").string(), &out), 2);
  EXPECT_NE(out.find("zo2-tune: error: --window 3000000000: beyond what this flag can hold"), std::string::npos)
      << out;
  out.clear();
  EXPECT_EQ(run(train + " --lr abc --out " + (w.tmp / "nan").string(), &out), 2);
  EXPECT_NE(out.find("zo2-tune: error: --lr abc: not a number"), std::string::npos) << out;
  // Blanks around the number (a padded command substitution) and a '+' are fine, seeds too.
  out.clear();
  EXPECT_EQ(run(train + " --steps ' 3 ' --seed ' +07' --out " + (w.tmp / "padded").string(), &out), 0) << out;
  out.clear();
  EXPECT_EQ(run("data --data " + w.data.string() + " --show -9223372036854775809", &out), 2);
  EXPECT_NE(out.find("-9223372036854775808 at least"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run(train + " --steps -0 --out " + (w.tmp / "zero").string(), &out), 2);
  EXPECT_NE(out.find("--steps 0: must be an integer in [1,"), std::string::npos) << out;
  // A rule coefficient that rounds out of range as a float is named as typed.
  out.clear();
  EXPECT_EQ(run(train + " --steps 1 --optimizer zo-adam --beta1 0.99999999 --out " + (w.tmp / "b1").string(), &out), 2);
  EXPECT_NE(out.find("--beta1 0.99999999: rounds to 1 as a float"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run(train + " --steps 1 --optimizer zo-adam --adam-eps 1e-46 --out " + (w.tmp / "ae").string(), &out), 2);
  EXPECT_NE(out.find("--adam-eps 1e-46: rounds to 0 as a float"), std::string::npos) << out;
  // A positive lr the float rounds to 0 trained nothing, the seed log's header saying 1e-46
  // and every step 0 (adversarial pass 66).
  out.clear();
  EXPECT_EQ(run(train + " --steps 1 --lr 1e-46 --out " + (w.tmp / "lr0").string(), &out), 2);
  EXPECT_NE(out.find("--lr 1e-46: must be finite and ≥ 0 (it rounds to 0 as a float"), std::string::npos) << out;
  // An eps too small to change any loss: every g is 0 and nothing moves; said once.
  out.clear();
  ASSERT_EQ(run(train + " --steps 20 --eps 1e-45 --out " + (w.tmp / "flat").string(), &out), 0) << out;
  EXPECT_NE(out.find("steps 1..16: L(θ + eps·z) and L(θ − eps·z) were equal in each (g = 0), so the weights did not "
                     "move: eps 1e-45 may be too small"),
            std::string::npos)
      << out;
  EXPECT_EQ(out.find("were equal in each"), out.rfind("were equal in each")) << out;
  out.clear();
  ASSERT_EQ(run(train + " --steps 20 --out " + (w.tmp / "moving").string(), &out), 0) << out;
  EXPECT_EQ(out.find("were equal in each"), std::string::npos) << out;
  // zo2-bench's: bench/check_bench_errors.cmake.
}

TEST(Cli, InitWritesShardedCheckpointsThatForwardReads) {
  test::TempDir tmp;
  std::string out;
  ASSERT_EQ(run("init --preset llama-tiny --out " + (tmp / "m").string() + " --dtype bf16 --shard-size 100K -q", &out), 0) << out;
  EXPECT_TRUE(fs::exists(tmp / "m" / "model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(tmp / "m" / "config.json"));
  const auto ckpt = SafetensorsCheckpoint::open(tmp / "m");
  EXPECT_TRUE(ckpt.sharded());
  EXPECT_EQ(ckpt.at("model.embed_tokens.weight").info->dtype, DType::bf16);
  ASSERT_EQ(run("synth-data --model " + (tmp / "m").string() + " --out " + (tmp / "d.safetensors").string() + " --rows 2 --seq 8 -q"), 0);
  ASSERT_EQ(run("forward --model " + (tmp / "m").string() + " --inputs " + (tmp / "d.safetensors").string() + " --out " +
                    (tmp / "f.safetensors").string(), &out), 0) << out;
  const auto f = SafetensorsFile::open(tmp / "f.safetensors");
  EXPECT_EQ(f.at("logits").shape, (std::vector<std::int64_t>{2, 8, 512}));
  // The same init seed gives the same checkpoint; another seed another one.
  ASSERT_EQ(run("init --preset llama-tiny --out " + (tmp / "m2").string() + " --dtype bf16 --shard-size 100K -q"), 0);
  const std::string first = read_file(tmp / "m" / "model-00001-of-00004.safetensors");
  EXPECT_GT(first.size(), 1000u);
  EXPECT_EQ(first, read_file(tmp / "m2" / "model-00001-of-00004.safetensors"));
  ASSERT_EQ(run("init --preset llama-tiny --out " + (tmp / "m3").string() + " --dtype bf16 --shard-size 100K --seed 2 -q"), 0);
  EXPECT_NE(first, read_file(tmp / "m3" / "model-00001-of-00004.safetensors"));
  std::string list;
  ASSERT_EQ(run("init --list", &list), 0);
  for (const char* p : {"opt-125m", "opt-175b", "llama2-70b", "llama3-8b", "llama3.1-8b"}) EXPECT_NE(list.find(p), std::string::npos) << p;
}

// init never replaces a checkpoint unasked (a tuned or downloaded model a typo away from a
// fresh directory): refused with exit 2 and the files named; --overwrite replaces it whole
// (the old shards removed, not left beside the new single file).
TEST(Cli, InitRefusesToReplaceACheckpoint) {
  test::TempDir tmp;
  std::string out;
  const fs::path m = tmp / "m";
  ASSERT_EQ(run("init --preset llama-tiny --out " + m.string() + " --dtype bf16 --shard-size 100K -q", &out), 0) << out;
  const std::string shard = read_file(m / "model-00001-of-00004.safetensors");
  ASSERT_GT(shard.size(), 1000u);
  out.clear();
  EXPECT_EQ(run("init --preset opt-tiny --out " + m.string() + " -q", &out), 2) << out;
  EXPECT_NE(out.find("--out " + m.string() + " already holds a checkpoint (config.json, model-00001-of-00004.safetensors, "
                     "model-00002-of-00004.safetensors, model-00003-of-00004.safetensors, "
                     "model-00004-of-00004.safetensors, model.safetensors.index.json): choose another --out, or pass "
                     "--overwrite"),
            std::string::npos)
      << out;
  EXPECT_EQ(read_file(m / "model-00001-of-00004.safetensors"), shard);
  EXPECT_FALSE(fs::exists(m / "model.safetensors"));
  // Weights alone (no config.json yet) are a checkpoint too.
  fs::remove(m / "config.json");
  out.clear();
  EXPECT_EQ(run("init --preset opt-tiny --out " + m.string() + " -q", &out), 2) << out;
  out.clear();
  ASSERT_EQ(run("init --preset opt-tiny --out " + m.string() + " --overwrite -q", &out), 0) << out;
  EXPECT_TRUE(fs::exists(m / "model.safetensors"));
  EXPECT_TRUE(fs::exists(m / "config.json"));
  for (const char* f : {"model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors", "model.safetensors.index.json"})
    EXPECT_FALSE(fs::exists(m / f)) << f;
  // A checkpoint the disk cannot hold is refused before anything is made (opt-175b: 650 GiB).
  if (fs::space(tmp.path()).available < (std::uint64_t{650} << 30)) {
    out.clear();
    EXPECT_EQ(run("init --preset opt-175b --out " + (tmp / "big" / "m").string(), &out), 1) << out;
    EXPECT_NE(out.find("it needs 650."), std::string::npos) << out;
    EXPECT_FALSE(fs::exists(tmp / "big"));
  }
  // An empty or unrelated directory is fine without --overwrite.
  fs::create_directories(tmp / "e");
  std::ofstream(tmp / "e" / "notes.txt") << "mine";
  EXPECT_EQ(run("init --preset opt-tiny --out " + (tmp / "e").string() + " -q"), 0);
  EXPECT_EQ(read_file(tmp / "e" / "notes.txt"), "mine");
  EXPECT_FALSE(fs::exists(tmp / "e" / "zo2.lock"));  // a plain checkpoint: nothing beside its files
}

// Qwen2, Qwen3, Mistral and Gemma 3 through the tool (Note [LLaMA-family variants]): init a tiny
// preset, train on it, and the tuned checkpoint's config.json keeps model_type and
// architectures; plan takes the real-size presets.
TEST(Cli, VariantPresetsInitTrainSaveAndPlan) {
  for (const auto& [preset, type, arch] : {std::tuple{"qwen2-tiny", "qwen2", "Qwen2ForCausalLM"},
                                           std::tuple{"qwen3-tiny", "qwen3", "Qwen3ForCausalLM"},
                                           std::tuple{"mistral-tiny", "mistral", "MistralForCausalLM"},
                                           std::tuple{"gemma3-tiny", "gemma3_text", "Gemma3ForCausalLM"}}) {
    SCOPED_TRACE(preset);
    Workspace w(preset);
    std::string out;
    ASSERT_EQ(run("train --model " + w.model.string() + " --data " + w.data.string() + " --out " + (w.tmp / "tuned").string() +
                      " --steps 3 --batch-size 2 --lr 1e-4 -q",
                  &out),
              0)
        << out;
    for (const fs::path& dir : {w.model, w.tmp / "tuned"}) {
      const auto j = nlohmann::json::parse(read_file(dir / "config.json"));
      EXPECT_EQ(j.at("model_type"), type) << dir;
      EXPECT_EQ(j.at("architectures"), nlohmann::json::array({arch})) << dir;
    }
  }
  for (const char* preset : {"qwen2.5-0.5b", "qwen2.5-7b", "qwen3-0.6b", "qwen3-8b", "qwen3-32b", "mistral-7b",
                             "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b"}) {
    std::string out;
    ASSERT_EQ(run(std::string("plan --preset ") + preset + " --gpu-mem 8G --seq-len 512 --storage-dtype bf16", &out), 0)
        << preset << ": " << out;
    EXPECT_NE(out.find(preset), std::string::npos) << out;
  }
  std::string list;
  ASSERT_EQ(run("init --list", &list), 0);
  for (const char* p : {"qwen2-tiny", "qwen3-tiny", "mistral-tiny", "qwen3-0.6b", "qwen3-32b", "mistral-7b",
                        "gemma3-tiny", "gemma3-1b", "gemma3-27b"})
    EXPECT_NE(list.find(p), std::string::npos) << p;
}

// `train --tokenizer DIR` copied generation_config.json from DIR: the checkpoint then
// generated with another model's EOS ids and sampling. It is the model directory's; the
// tokenizer's files come from --tokenizer.
TEST(Cli, TrainTakesGenerationConfigFromTheModelAndTokenizerFilesFromTokenizer) {
  Workspace w;
  const fs::path tok = w.tmp / "tok";
  fs::create_directories(tok);
  auto write = [](const fs::path& p, const std::string& text) {
    std::ofstream(p, std::ios::binary) << text;
  };
  const std::string model_gen = "{\"eos_token_id\": 2, \"max_length\": 20}\n";
  write(w.model / "generation_config.json", model_gen);
  write(tok / "generation_config.json", "{\"eos_token_id\": 50256}\n");
  write(tok / "tokenizer_config.json", "{\"model_max_length\": 2048}\n");
  write(tok / "special_tokens_map.json", "{}\n");
  auto train = [&](const fs::path& out_dir, std::string* out) {
    return run("train --model " + w.model.string() + " --data " + w.data.string() + " --tokenizer " + tok.string() +
                   " --out " + out_dir.string() + " --steps 2 --batch-size 2 -q",
               out);
  };
  std::string out;
  ASSERT_EQ(train(w.tmp / "tuned", &out), 0) << out;
  EXPECT_EQ(read_file(w.tmp / "tuned" / "generation_config.json"), model_gen);
  EXPECT_EQ(read_file(w.tmp / "tuned" / "tokenizer_config.json"), read_file(tok / "tokenizer_config.json"));
  EXPECT_EQ(read_file(w.tmp / "tuned" / "special_tokens_map.json"), "{}\n");
  // A model without one: none, not the tokenizer directory's.
  fs::remove(w.model / "generation_config.json");
  ASSERT_EQ(train(w.tmp / "tuned2", &out), 0) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "tuned2" / "generation_config.json"));
  EXPECT_TRUE(fs::exists(w.tmp / "tuned2" / "tokenizer_config.json"));
}

TEST(Cli, PlanReportsAPlacementWithoutAllocatingTheModel) {
  std::string out;
  ASSERT_EQ(run("plan --preset opt-175b --gpu-mem 11G --batch-size 1 --seq-len 2048 --storage-dtype bf16 "
                "--compute-dtype bf16 --json",
                &out),
            0)
      << out;
  const auto j = nlohmann::json::parse(out);
  EXPECT_EQ(j["blocks"], 96);
  EXPECT_GT(j["streamed_blocks"].get<int>(), 0);
  EXPECT_LE(j["predicted_peak_bytes"].get<std::uint64_t>(), std::uint64_t{11} << 30);
  EXPECT_EQ(j["window"], 2) << "11 GiB leaves room for two 3.4 GiB slots, not three";
  EXPECT_EQ(run("plan --preset opt-175b --gpu-mem 1G --batch-size 1 --seq-len 2048 --storage-dtype bf16", &out), 1);
  EXPECT_NE(out.find("minimum"), std::string::npos) << out;
}

// Note [Sub-block streaming]: below two whole-block slots (2 × 3.4 GiB in bf16), OPT-175B
// streams by weight tiles; the arena then leaves room for a CUDA context within 4 GiB.
TEST(Cli, PlanStreamsOpt175bByWeightTilesWithinFourGiB) {
  std::string out;
  const std::string shape = " --preset opt-175b --batch-size 1 --seq-len 2048 --storage-dtype bf16 --compute-dtype bf16";
  ASSERT_EQ(run("plan" + shape + " --gpu-mem 4G --json", &out), 0) << out;
  const auto j = nlohmann::json::parse(out);
  EXPECT_EQ(j["streamed_blocks"], 96);
  EXPECT_EQ(j["window"], 0);
  ASSERT_TRUE(j.contains("tiles")) << out;
  EXPECT_GE(j["tiles"]["slots"].get<int>(), 3);
  EXPECT_GT(j["tiles"]["tiles_per_block"].get<int>(), 12) << "the 1.2 GB fc1 and fc2 in row ranges";
  EXPECT_LE(j["predicted_peak_bytes"].get<std::uint64_t>(), std::uint64_t{13} << 28) << "3.25 GiB: 0.75 for the context";
  EXPECT_EQ(j["h2d_bytes_per_step"], j["block_bytes"].get<std::uint64_t>() * 96) << "the same traffic as whole blocks";
  out.clear();
  ASSERT_EQ(run("plan" + shape + " --gpu-mem 4G", &out), 0) << out;
  EXPECT_NE(out.find("streamed by weight tiles"), std::string::npos) << out;
  // 12G keeps whole blocks; --tile off refuses 4G with the whole-block minimum; bad values are usage errors.
  out.clear();
  ASSERT_EQ(run("plan" + shape + " --gpu-mem 12G --json", &out), 0) << out;
  EXPECT_FALSE(nlohmann::json::parse(out).contains("tiles")) << out;
  EXPECT_EQ(run("plan" + shape + " --gpu-mem 4G --tile off", &out), 1) << out;
  EXPECT_NE(out.find("minimum of 9."), std::string::npos) << out;
  EXPECT_EQ(run("plan" + shape + " --gpu-mem 4G --tile often", &out), 2) << out;
  EXPECT_NE(out.find("--tile often"), std::string::npos) << out;
  EXPECT_EQ(run("plan" + shape + " --gpu-mem 4G --tile 0", &out), 2) << out;
  EXPECT_EQ(run("plan" + shape + " --gpu-mem 2G", &out), 1) << out;
  EXPECT_NE(out.find("even streamed by weight tiles"), std::string::npos) << out;
}

TEST(Cli, TiledTrainingWritesTheSameCheckpointAsResident) {
  Workspace w("opt-tiny-postln");
  const std::string common = " --model " + w.model.string() + " --data " + w.data.string() + " --steps 6 --batch-size 2 --lr 1e-3 -q";
  ASSERT_EQ(run("train" + common + " --out " + (w.tmp / "a").string() + " --offload none"), 0);
  std::string out;
  // 64M of fp32 is the default tile of 2^24 elements: the resident run's GEMM tiles.
  ASSERT_EQ(run("train" + common + " --out " + (w.tmp / "b").string() + " --offload all --tile 64M --gpu-mem 64M", &out),
            0)
      << out;
  EXPECT_EQ(read_file(w.tmp / "a" / "model.safetensors"), read_file(w.tmp / "b" / "model.safetensors"));
}

// The host memory a run needs, before it allocates any: ANCHORS.md asks for OPT-175B in
// ≤ 360 GB of host memory with bf16 storage and ≤ 190 GB with fp8 (ZO2 asks for ≥ 600 GB).
TEST(Cli, PlanStatesTheHostMemoryOfTheMasterWeights) {
  for (const auto& [dtype, limit_gb] : {std::pair<std::string, double>{"bf16", 360}, {"fp8", 190}}) {
    std::string out;
    ASSERT_EQ(run("plan --preset opt-175b --gpu-mem 12G --seq-len 2048 --storage-dtype " + dtype + " --json", &out), 0)
        << out;
    const auto j = nlohmann::json::parse(out);
    const auto host = j["host_bytes"].get<std::uint64_t>();
    // Every block image plus the globals (the plan's globals are rounded up to an allocation
    // boundary; the host image is not).
    const double images = 96.0 * j["block_bytes"].get<double>() + j["globals_bytes"].get<double>();
    EXPECT_NEAR(static_cast<double>(host), images, 4096.0);
    const double params = j["params"].get<double>();
    // At least the weights themselves (fp8 adds per-row scales and bf16 vectors), at most the target.
    EXPECT_GE(static_cast<double>(host), params * (dtype == "bf16" ? 2.0 : 1.0));
    EXPECT_LE(static_cast<double>(host), limit_gb * 1e9) << dtype;
    std::printf("OPT-175B, %s storage: %.1f GB of host memory (target <= %.0f GB)\n", dtype.c_str(),
                static_cast<double>(host) / 1e9, limit_gb);
    ASSERT_EQ(run("plan --preset opt-175b --gpu-mem 12G --seq-len 2048 --storage-dtype " + dtype, &out), 0) << out;
    EXPECT_NE(out.find("host memory (master weights)"), std::string::npos) << out;
  }
}

TEST(Cli, LossFallsClearlyOnALearnableTask) {
  Workspace w;
  const auto log = w.tmp / "log.jsonl";
  std::string out;
  ASSERT_EQ(run("train --model " + w.model.string() + " --data " + w.data.string() + " --out " + (w.tmp / "out").string() +
                    " --steps 400 --batch-size 8 --lr 3e-3 --eps 1e-3 --log-json " + log.string() + " -q",
                &out),
            0)
      << out;
  std::vector<double> loss;
  std::ifstream in(log);
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    for (const char* k : {"step", "loss_plus", "loss_minus", "g", "lr", "tokens_per_s", "device_peak_bytes", "h2d_bytes", "d2h_bytes"})
      ASSERT_TRUE(j.contains(k)) << k;
    loss.push_back(j["loss"].get<double>());
  }
  ASSERT_EQ(loss.size(), 400u);
  double first = 0, last = 0;
  for (int i = 0; i < 50; ++i) {
    first += loss[static_cast<std::size_t>(i)];
    last += loss[loss.size() - 1 - static_cast<std::size_t>(i)];
  }
  EXPECT_LT(last, 0.9 * first) << "mean of the last 50 steps " << last / 50 << " vs first 50 " << first / 50;
}

// Note [The ETA] (tools/cli.h): the steps left, and each evaluation and save still due at what
// those run so far took, never their time spread over the steps done.
// Durations as the progress line and logs print them; days past 48 hours (adversarial pass
// 66: a year-long ETA read "8432h33m").
TEST(TrainEta, DurationsReadAsSecondsMinutesHoursAndDays) {
  EXPECT_EQ(cli::format_duration(42.4), "42s");
  EXPECT_EQ(cli::format_duration(187), "3m07s");
  EXPECT_EQ(cli::format_duration(5 * 3600 + 4 * 60 + 10), "5h04m");
  EXPECT_EQ(cli::format_duration(47 * 3600 + 59 * 60), "47h59m");
  EXPECT_EQ(cli::format_duration(48 * 3600), "2d00h");
  EXPECT_EQ(cli::format_duration(8432 * 3600.0 + 33 * 60), "351d08h");
  EXPECT_EQ(cli::format_duration(-1), "?");
  EXPECT_EQ(cli::format_duration(2e9), "?");
}

TEST(TrainEta, CountsTheEvaluationsAndSavesStillDueAtTheirOwnCost) {
  cli::EtaInputs in;
  in.steps = 60;
  in.done = 21;
  in.step_s = 0.1;
  EXPECT_DOUBLE_EQ(cli::train_eta(in), 39 * 0.1);  // nothing else: the final save's cost is unknown yet
  // A resume ran the evaluation it owed (10 s) before its first step: the evaluations after
  // steps 40 and 60 are due, not 10 s for each step done (the old ETA: 39 × (0.1 + 10 / 1)).
  in.evaluates = true;
  in.eval_every = 20;
  in.eval_seconds = 10;
  in.evals_done = 1;
  EXPECT_DOUBLE_EQ(cli::train_eta(in), 39 * 0.1 + 2 * 10.0);
  // The step whose evaluation is next still has it ahead; the last step has the final one.
  in.done = 40;
  EXPECT_DOUBLE_EQ(cli::train_eta(in), 20 * 0.1 + 2 * 10.0);
  in.done = 41;
  EXPECT_DOUBLE_EQ(cli::train_eta(in), 19 * 0.1 + 10.0);
  in.done = 60;
  EXPECT_DOUBLE_EQ(cli::train_eta(in), 10.0);
  // Before any evaluation ran: a forward pass (half a step) for each of its batches.
  in.done = 1;
  in.evals_done = 0;
  in.eval_seconds = 0;
  in.eval_batches = 50;
  EXPECT_DOUBLE_EQ(cli::train_eta(in), 59 * 0.1 + 3 * (50 * 0.05));
  // One that decodes is not estimated (eval_batches 0) until it has run.
  in.eval_batches = 0;
  EXPECT_DOUBLE_EQ(cli::train_eta(in), 59 * 0.1);
  // Saves every 25 steps (after 25 and 50) and the final one, at 2 s each once one is measured.
  in.evaluates = false;
  in.save_every = 25;
  in.saves_done = 2;
  in.save_seconds = 4;
  EXPECT_DOUBLE_EQ(cli::train_eta(in), 59 * 0.1 + 3 * 2.0);
  in.done = 50;
  EXPECT_DOUBLE_EQ(cli::train_eta(in), 10 * 0.1 + 2 * 2.0);
  in.done = 51;
  EXPECT_DOUBLE_EQ(cli::train_eta(in), 9 * 0.1 + 2.0);
}

// On the CPU backend the plan's transfer time is at the emulated link's rate where
// ZO2_CPU_LINK_GBPS sets one (pass 62: always memory speed, 200× off at 0.05 GB/s).
TEST(Cli, ThePlansTransferTimeIsAtTheEmulatedLinksRate) {
  Workspace w;
  std::string out;
  const std::string plan = "plan --model " + w.model.string() +
                           " --device cpu --gpu-mem 1M --batch-size 2 --seq-len 16 --offload all --json 2>/dev/null";
  for (const double gbps : {0.05, 2.0}) {
    out.clear();
    ASSERT_EQ(test::run_command("env ZO2_CPU_LINK_GBPS=" + std::to_string(gbps) + " " + tune() + " " + plan, &out), 0)
        << out;
    const auto j = nlohmann::json::parse(out);
    const double bytes = std::max(j.at("h2d_bytes_per_step").get<double>(), j.at("d2h_bytes_per_step").get<double>());
    ASSERT_GT(bytes, 0) << out;
    EXPECT_NEAR(j.at("predicted_transfer_s").get<double>(), bytes / (gbps * 1e9), 1e-9 * bytes / (gbps * 1e9)) << gbps;
  }
}

// --tokenizer beside token-id data reads nothing but is copied into the run (for text later):
// one that does not fit the model is refused as init refuses it (adversarial pass 71: copied
// without a word, and the run's eval of text failed); one that fits is copied.
TEST(Cli, ATokenizerGivenWithTokenIdDataMustFitTheModel) {
  Workspace w;  // opt-tiny: 512 ids
  const std::string gpt2 = (test::shared_dir() / "data" / "gpt2").string();
  std::string out;
  EXPECT_EQ(run("train --model " + w.model.string() + " --data " + w.data.string() + " --steps 2 --tokenizer " + gpt2 +
                    " --out " + (w.tmp / "r").string(),
                &out),
            2)
      << out;
  EXPECT_NE(out.find("--tokenizer " + gpt2 + " does not fit the model"), std::string::npos) << out;
  EXPECT_NE(out.find("it has 50257 ids but the model's vocabulary is only 512"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "r"));
  // (A directory of other tokenizer files only is copied as it is:
  // Cli.TrainTakesGenerationConfigFromTheModelAndTokenizerFilesFromTokenizer.)
}

// A step's tokens are its examples' own (padding left out), and each --log-json record's rate
// and time are that step's (pass 62: B·T counted the padding, 3× the tokens on this data, and
// the records carried the progress line's 32-step window).
TEST(Cli, EachStepsRecordHasItsOwnTokensAndTimeWithoutThePadding) {
  test::TempDir tmp;
  const fs::path model = tmp / "text-model";
  const fs::path data = tmp / "mixed.jsonl";
  std::string out;
  ASSERT_EQ(run("init --preset opt-micro --out " + model.string() + " --tokenizer " +
                    (test::shared_dir() / "data" / "gpt2").string() + " -q", &out), 0) << out;
  {
    std::ofstream f(data);
    f << R"({"text": "Hi there."})" "\n"
      << R"({"text": "The soundtrack was dull. It was terrible. The soundtrack was dull. It was terrible. The soundtrack was dull."})" "\n"
      << R"({"text": "Ok go"})" "\n"
      << R"({"text": "The ending is lifeless."})" "\n";
  }
  // The examples' tokens, as `data` shows them (every step's batch holds all four).
  std::int64_t expected_tokens = 0;
  std::size_t longest = 0;
  ASSERT_EQ(run("data --model " + model.string() + " --data " + data.string() + " --show 4 2>/dev/null", &out), 0) << out;
  std::istringstream shown(out);
  for (std::string line; std::getline(shown, line);) {
    if (line.empty() || line[0] != '{') continue;
    const auto ids = nlohmann::json::parse(line).at("sequences").at(0).at("ids");
    expected_tokens += static_cast<std::int64_t>(ids.size());
    longest = std::max(longest, ids.size());
  }
  ASSERT_GT(4 * static_cast<std::int64_t>(longest), 2 * expected_tokens) << "the data must pad much: " << out;
  const fs::path log = tmp / "log.jsonl";
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(run("train --model " + model.string() + " --data " + data.string() + " --steps 3 --batch-size 4 --out " +
                    (tmp / "run").string() + " --log-json " + log.string() + " -q", &out),
            0)
      << out;
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::ifstream in(log);
  double stepping = 0;
  int records = 0;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (!j.contains("step")) continue;
    ++records;
    const auto n = j.at("tokens").get<std::int64_t>();
    const double s = j.at("step_time_s").get<double>();
    EXPECT_GT(s, 0) << line;
    EXPECT_NEAR(j.at("tokens_per_s").get<double>(), static_cast<double>(n) / s, 1e-6 * static_cast<double>(n) / s) << line;
    EXPECT_EQ(n, expected_tokens) << line;
    stepping += s;
  }
  EXPECT_EQ(records, 3);
  EXPECT_LE(stepping, wall) << "the steps' own times add up to at most the run's";
}

// With --stop-at before --steps the process ends at the stop: its progress shows that step's
// line (with --log-every 10, steps 1 and 4 of --stop-at 4) and an ETA to it, marked as such;
// on a terminal the status line ends there. (Before: the ETA ran to --steps, a line for the
// stop step appeared only on a multiple of --log-every, and a terminal's line stayed open.)
TEST(Cli, AStopAtBeforeTheEndShowsItsLastStepAndAnEtaToIt) {
  Workspace w;
  const std::string train = " train --model " + w.model.string() + " --data " + w.data.string() +
                            " --steps 40 --stop-at 4 --batch-size 2 --lr 1e-3 --seed 3 --out ";
  std::string out;
  ASSERT_EQ(run(train + (w.tmp / "piped").string(), &out), 0) << out;
  EXPECT_NE(out.find("step 1/40 | "), std::string::npos) << out;
  const auto last = out.find("step 4/40 | ");
  ASSERT_NE(last, std::string::npos) << out;
  EXPECT_NE(out.find(" (--stop-at 4) | ", last), std::string::npos) << out;
  EXPECT_EQ(out.find("step 2/40 | "), std::string::npos) << out;
  // Without a stop before the end, no mark.
  out.clear();
  ASSERT_EQ(run(" train --model " + w.model.string() + " --data " + w.data.string() +
                    " --steps 2 --stop-at 5 --batch-size 2 --lr 1e-3 --seed 3 --out " + (w.tmp / "whole").string(),
                &out),
            0)
      << out;
  EXPECT_NE(out.find("step 2/2 | "), std::string::npos) << out;
  EXPECT_EQ(out.find("--stop-at"), std::string::npos) << out;
  if (test::run_command("script -qec true /dev/null") != 0) return;
  out.clear();
  ASSERT_EQ(test::run_command("script -qec '" + test::zo2_tune_path().string() + train + (w.tmp / "tty").string() +
                                  "' /dev/null",
                              &out),
            0)
      << out;
  // The status line of step 4 ends (a newline), so "saved" starts its own line.
  const auto at = out.find("step 4/40 | ");
  ASSERT_NE(at, std::string::npos) << out;
  const auto end = out.find('\n', at);
  ASSERT_NE(end, std::string::npos) << out;
  EXPECT_NE(out.substr(at, end - at).find("(--stop-at 4)"), std::string::npos) << out.substr(at, end - at);
  const auto next = out.find_first_not_of("\r\n", end);
  ASSERT_NE(next, std::string::npos) << out;
  EXPECT_NE(out.compare(next, 4, "\033[K"), 0) << "the status line was rewritten, not ended: " << out.substr(at);
}

TEST(Cli, AnEvaluationShowsItsProgressOnATerminalAndNoLinesElsewhere) {
  if (test::run_command("script -qec true /dev/null") != 0)
    GTEST_SKIP() << "no script(1), or no pseudo-terminal for it, to give zo2-tune a terminal";
  Workspace w;
  const std::string tune = test::zo2_tune_path().string();
  const std::string eval = " eval --model " + w.model.string() + " --data " + w.data.string() + " --batch-size 8";
  std::string out;
  ASSERT_EQ(test::run_command("script -qec '" + tune + eval + "' /dev/null", &out), 0) << out;
  // The status line goes as the batches do, ends at every example, and is cleared for the result.
  EXPECT_NE(out.find("\r\033[Keval: 64/64 examples | "), std::string::npos) << out;
  EXPECT_NE(out.find("\r\033[Keval: loss "), std::string::npos) << out;
  out.clear();
  ASSERT_EQ(run(eval, &out), 0) << out;  // a pipe: a short evaluation prints no progress
  EXPECT_EQ(out.find("examples/s"), std::string::npos) << out;
  // train's evaluations: their own line, between the steps' status lines.
  const std::string train = " train --model " + w.model.string() + " --data " + w.data.string() + " --eval " +
                            w.data.string() + " --eval-every 2 --steps 4 --batch-size 8 --out " +
                            (w.tmp / "run").string();
  out.clear();
  ASSERT_EQ(test::run_command("script -qec '" + tune + train + "' /dev/null", &out), 0) << out;
  const auto at = out.find("\r\033[Keval after step 2: 64/64 examples | ");
  ASSERT_NE(at, std::string::npos) << out;
  EXPECT_NE(out.find("step 3/4 | ", at), std::string::npos) << out;
}

// Note [zo2-tune's threads] (tools/cli.h): --threads bounds zo2-tune's own host-side work
// (tokenizing the data, a resume's checksums), not only the device's kernels, and a resumed
// run keeps the count it ran with.
TEST(Cli, ThreadsCapTheHostsWorkAndAResumedRunKeepsItsCount) {
  if (tbb::info::default_concurrency() < 2) GTEST_SKIP() << "one CPU: nothing to cap";
  Workspace w;
  const std::string part = (w.tmp / "part").string();
  std::string out;
  ASSERT_EQ(run("train --model " + w.model.string() + " --data " + w.data.string() +
                    " --steps 4 --batch-size 2 --stop-at 2 --threads 1 --out " + part + " -v",
                &out),
            0)
      << out;
  EXPECT_NE(out.find("host threads: 1 of "), std::string::npos) << out;
  out.clear();  // (run appends)
  ASSERT_EQ(run("train --resume " + part + " -v", &out), 0) << out;
  EXPECT_NE(out.find("host threads: 1 of "), std::string::npos) << "the resumed run's --threads 1 was not kept\n"
                                                               << out;
  out.clear();
  ASSERT_EQ(run("eval --model " + w.model.string() + " --data " + w.data.string() + " -v", &out), 0) << out;
  EXPECT_EQ(out.find("(--threads)"), std::string::npos) << out;
}

TEST(Cli, ResumeAfterAStopGivesTheUninterruptedRunsWeights) {
  Workspace w("llama-tiny");
  const std::string common = " --model " + w.model.string() + " --data " + w.data.string() +
                             " --steps 9 --batch-size 2 --lr 1e-3 --lr-schedule cosine --warmup-steps 2 --seed 5 -q";
  std::string out;
  ASSERT_EQ(run("train" + common + " --out " + (w.tmp / "full").string(), &out), 0) << out;
  ASSERT_EQ(run("train" + common + " --out " + (w.tmp / "part").string() + " --stop-at 4 --save-every 2", &out), 0)
      << out;
  EXPECT_NE(read_file(w.tmp / "full" / "model.safetensors"), read_file(w.tmp / "part" / "model.safetensors"));
  // The stop at step 4 follows the periodic save of step 4: it is not written twice (a second
  // save would be the step directory "step-00000004.2").
  EXPECT_EQ(fs::read_symlink(w.tmp / "part" / "current").string(), "step-00000004");
  ASSERT_EQ(run("train --data " + w.data.string() + " --resume " + (w.tmp / "part").string() + " --out " +
                    (w.tmp / "resumed").string() + " -q",
                &out),
            0)
      << out;
  EXPECT_EQ(read_file(w.tmp / "full" / "model.safetensors"), read_file(w.tmp / "resumed" / "model.safetensors"));
  // The seed log of the resumed run holds all nine steps and replays to the same weights.
  ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (w.tmp / "resumed" / "seed_log.jsonl").string() +
                    " --out " + (w.tmp / "replayed").string() + " -q",
                &out),
            0)
      << out;
  EXPECT_EQ(read_file(w.tmp / "full" / "model.safetensors"), read_file(w.tmp / "replayed" / "model.safetensors"));
}

TEST(Cli, SigintFinishesTheStepSavesAndResumesExactly) {
  Workspace w;
  const std::string common = " --model " + w.model.string() + " --data " + w.data.string() +
                             " --steps 300 --batch-size 8 --lr 1e-3 --seed 3 -q";
  std::string out;
  ASSERT_EQ(run("train" + common + " --out " + (w.tmp / "full").string(), &out), 0) << out;
  const std::string part = (w.tmp / "part").string();
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c",
          ("exec " + tune() + " train" + common + " --out " + part + " --log-json " + (w.tmp / "part.jsonl").string() +
           " >/dev/null 2>&1")
              .c_str(),
          nullptr);
    _exit(127);
  }
  // The signal once steps run (train's handler is in place by its first record): a fixed
  // sleep raced the start-up on a loaded machine, and the default action killed the process.
  for (int i = 0; i < 3000 && read_file(w.tmp / "part.jsonl").find('\n') == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  kill(pid, SIGINT);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  const int rc = WEXITSTATUS(status);
  if (rc == 0) GTEST_SKIP() << "the run finished before the signal arrived";
  ASSERT_EQ(rc, 130);
  const auto state = nlohmann::json::parse(read_file(fs::path(part) / "zo2_state.json"));
  EXPECT_GT(state["next_step"].get<int>(), 0);
  EXPECT_LT(state["next_step"].get<int>(), 300);
  ASSERT_EQ(run("train --data " + w.data.string() + " --resume " + part + " --out " + part + " -q", &out), 0) << out;
  EXPECT_EQ(read_file(w.tmp / "full" / "model.safetensors"), read_file(fs::path(part) / "model.safetensors"));
}

TEST(Cli, EveryStopSignalFinishesTheStepAndSavesEvenWhenTheParentBlockedIt) {
  // Note [Stop signals] (adversarial pass 54): SIGHUP (an ssh drop), SIGUSR1/2 (Slurm's
  // --signal), SIGXCPU killed the run with nothing saved; a SIGTERM the parent had blocked
  // stayed pending until the SIGKILL. Each run here starts with every one of them blocked.
  Workspace w;
  struct Case {
    int sig;
    int times;  // a second SIGHUP or SIGXCPU is ignored
  };
  for (const Case c : {Case{SIGHUP, 2}, Case{SIGUSR1, 1}, Case{SIGUSR2, 1}, Case{SIGXCPU, 2}, Case{SIGTERM, 1}}) {
    SCOPED_TRACE(sigabbrev_np(c.sig));
    const fs::path run_dir = w.tmp / (std::string("run-") + sigabbrev_np(c.sig));
    const fs::path log = w.tmp / (std::string("log-") + sigabbrev_np(c.sig) + ".jsonl");
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      sigset_t all;
      sigemptyset(&all);
      for (int s : {SIGHUP, SIGUSR1, SIGUSR2, SIGXCPU, SIGTERM, SIGINT}) sigaddset(&all, s);
      sigprocmask(SIG_BLOCK, &all, nullptr);  // kept across exec
      execl("/bin/sh", "sh", "-c",
            ("exec " + tune() + " train --model " + w.model.string() + " --data " + w.data.string() +
             " --steps 1000000 --batch-size 2 --lr 1e-3 -q --out " + run_dir.string() + " --log-json " +
             log.string() + " >/dev/null 2>&1")
                .c_str(),
            nullptr);
      _exit(127);
    }
    for (int i = 0; i < 3000 && read_file(log).find('\n') == std::string::npos; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    for (int k = 0; k < c.times; ++k) kill(pid, c.sig);
    int status = 0;
    waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    EXPECT_EQ(WEXITSTATUS(status), 130);
    const auto state = nlohmann::json::parse(read_file(run_dir / "zo2_state.json"));
    EXPECT_GT(state["next_step"].get<int>(), 0);
  }
  // Under nohup (SIGHUP ignored when train starts) a SIGHUP changes nothing: the run goes on
  // until the SIGTERM that follows.
  const fs::path run_dir = w.tmp / "run-nohup", log = w.tmp / "log-nohup.jsonl", err = w.tmp / "nohup.err";
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    signal(SIGHUP, SIG_IGN);  // kept across exec, as nohup does
    execl("/bin/sh", "sh", "-c",
          ("exec " + tune() + " train --model " + w.model.string() + " --data " + w.data.string() +
           " --steps 1000000 --batch-size 2 --lr 1e-3 --out " + run_dir.string() + " --log-json " + log.string() +
           " >/dev/null 2>" + err.string())
              .c_str(),
          nullptr);
    _exit(127);
  }
  for (int i = 0; i < 3000 && read_file(log).find('\n') == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  kill(pid, SIGHUP);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 130);
  EXPECT_NE(read_file(err).find("(SIGTERM)"), std::string::npos) << read_file(err);
  EXPECT_EQ(read_file(err).find("SIGHUP"), std::string::npos) << read_file(err);
}

TEST(Cli, OffloadedTrainingWritesTheSameCheckpointAsResident) {
  Workspace w("opt-tiny-postln");
  const std::string common = " --model " + w.model.string() + " --data " + w.data.string() + " --steps 6 --batch-size 2 --lr 1e-3 -q";
  ASSERT_EQ(run("train" + common + " --out " + (w.tmp / "a").string() + " --offload none"), 0);
  std::string out;
  ASSERT_EQ(run("train" + common + " --out " + (w.tmp / "b").string() + " --offload all --window 3 --gpu-mem 64M", &out), 0) << out;
  EXPECT_EQ(read_file(w.tmp / "a" / "model.safetensors"), read_file(w.tmp / "b" / "model.safetensors"));
  std::string ev;
  ASSERT_EQ(run("eval --model " + (w.tmp / "a").string() + " --data " + w.data.string() + " --json", &ev), 0) << ev;
  EXPECT_GT(nlohmann::json::parse(ev.substr(ev.find('{')))["loss"].get<double>(), 0.0);
}

// The disk tier (README "Models larger than host memory"): opt-tiny's 535 KiB of master weights
// (145 KiB of globals, two blocks of 195 KiB) under --host-mem 400K with one staging buffer:
// neither block fits beside the globals and the buffer.
TEST(Cli, OffloadedDiskTierTrainingWritesTheSameCheckpointAsRam) {
  Workspace w;
  const std::string common = " --model " + w.model.string() + " --data " + w.data.string() +
                             " --steps 7 --batch-size 2 --lr 1e-3 --offload all --window 2 -q";
  ASSERT_EQ(run("train" + common + " --out " + (w.tmp / "ram").string()), 0);
  std::string out;
  for (const char* lag : {"1", "3"}) {
    const fs::path run_dir = w.tmp / (std::string("disk") + lag);
    ASSERT_EQ(run("train" + common + " --out " + run_dir.string() + " --host-mem 400K --disk-staging 1 --disk-dir " +
                      (w.tmp / "disk").string() + " --disk-lag " + lag + " --log-json " + (w.tmp / "log.jsonl").string(),
                  &out),
              0)
        << out;
    EXPECT_EQ(read_file(w.tmp / "ram" / "model.safetensors"), read_file(run_dir / "model.safetensors")) << "lag " << lag;
    const std::string log = read_file(w.tmp / "log.jsonl");
    EXPECT_NE(log.find("\"disk_read_bytes\""), std::string::npos) << log;
  }
  EXPECT_TRUE(fs::exists(w.tmp / "disk" / "zo2-blocks.img"));
  // A block file cut short (a cache, not the run's state) is rebuilt from the checkpoint: the
  // resume ends with the all-in-RAM bits.
  {
    const fs::path cut = w.tmp / "cut";
    ASSERT_EQ(run("train" + common + " --out " + cut.string() + " --host-mem 400K --disk-staging 1 --disk-dir " +
                  (w.tmp / "disk-cut").string() + " --stop-at 3"),
              0);
    fs::resize_file(w.tmp / "disk-cut" / "zo2-blocks.img", 1000);
    out.clear();
    ASSERT_EQ(run("train --resume " + cut.string() + " --out " + cut.string(), &out), 0) << out;
    EXPECT_NE(out.find("the block file there does not read back"), std::string::npos) << out;
    EXPECT_EQ(read_file(w.tmp / "ram" / "model.safetensors"), read_file(cut / "model.safetensors"));
  }
  // plan shows the tiers; the flags are checked like every other.
  ASSERT_EQ(run("plan --model " + w.model.string() + " --gpu-mem 1G --offload all --window 2 --batch-size 2 "
                "--seq-len 32 --host-mem 400K --disk-staging 1",
                &out),
            0)
      << out;
  EXPECT_NE(out.find("2 from disk"), std::string::npos) << out;
  EXPECT_NE(out.find("disk-bound step time"), std::string::npos) << out;
  EXPECT_EQ(run("train" + common + " --out x --disk-dir " + (w.tmp / "d2").string(), &out), 2) << out;
  EXPECT_NE(out.find("--host-mem"), std::string::npos) << out;
  EXPECT_EQ(run("train" + common + " --out x --host-mem 400K --disk-dir d --disk-lag 0", &out), 2) << out;
  EXPECT_NE(out.find("--disk-lag 0"), std::string::npos) << out;
  EXPECT_EQ(run("train" + common + " --out x --host-mem 0", &out), 2) << out;
  EXPECT_EQ(run("train" + common + " --out " + (w.tmp / "y").string() + " --host-mem 400K --disk-staging 1", &out), 2) << out;
  EXPECT_NE(out.find("--disk-dir"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "y" / "model.safetensors"));
  // The block file never goes into a checkpoint: the model's (it would stay among its files)
  // or a run's step directory (the run's next save removes it). The run's own directory is fine.
  const std::string tier = " --host-mem 400K --disk-staging 1 --disk-dir ";
  out.clear();
  EXPECT_EQ(run("train" + common + " --out " + (w.tmp / "y").string() + tier + (w.model / "blocks").string(), &out), 2)
      << out;
  EXPECT_NE(out.find("is inside the checkpoint " + w.model.string()), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.model / "blocks"));
  out.clear();
  EXPECT_EQ(run("train" + common + " --out " + (w.tmp / "y").string() + tier + (w.tmp / "cut" / "current").string(),
                &out),
            2)
      << out;
  EXPECT_NE(out.find("a checkpoint of the training run " + (w.tmp / "cut").string()), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run("train" + common + " --out " + (w.tmp / "y").string() + tier + (w.tmp / "cut" / "blocks").string(),
                &out),
            0)
      << out;
  // Nor into one of the new run's own checkpoints (no seed log there yet to tell it by).
  for (const char* sub : {"current", "step-00000007"}) {
    out.clear();
    EXPECT_EQ(run("train" + common + " --out " + (w.tmp / "y2").string() + tier + (w.tmp / "y2" / sub).string(), &out),
              2)
        << out;
    EXPECT_NE(out.find("one of the run's own checkpoints, which its next save replaces"), std::string::npos) << out;
  }
  // A run directory whose name is not UTF-8 (Latin-1 é) saves and resumes (its manifest
  // writes the path with U+FFFD).
  {
    const fs::path latin1 = w.tmp / std::string("caf\xe9-run");
    out.clear();
    ASSERT_EQ(run("train" + common + " --out '" + latin1.string() + "' --stop-at 3", &out), 0) << out;
    out.clear();
    ASSERT_EQ(run("train --resume '" + latin1.string() + "' --out '" + latin1.string() + "'", &out), 0) << out;
    EXPECT_EQ(read_file(w.tmp / "ram" / "model.safetensors"), read_file(latin1 / "model.safetensors"));
  }
  // A refused run leaves no --out behind (it held only the lock file).
  fs::remove_all(w.tmp / "y");
  std::ofstream(w.tmp / "afile") << "hi";
  out.clear();
  EXPECT_NE(run("train" + common + " --out " + (w.tmp / "y").string() + tier + (w.tmp / "afile").string(), &out), 0)
      << out;
  EXPECT_FALSE(fs::exists(w.tmp / "y")) << out;
  // A disk-tier flag without the tier is refused, not ignored.
  for (const char* flag : {"--disk-lag 4", "--disk-staging 2"}) {
    out.clear();
    EXPECT_EQ(run("train" + common + " --out " + (w.tmp / "z").string() + " " + flag, &out), 2) << out;
    EXPECT_NE(out.find(std::string(flag) + " is for the disk tier (--host-mem SIZE --disk-dir DIR), which is not set"),
              std::string::npos)
        << out;
  }
  for (const char* flag : {"--disk-read-rate 3", "--disk-write-rate 2", "--disk-lag 4", "--disk-staging 2"}) {
    out.clear();
    EXPECT_EQ(run("plan --model " + w.model.string() + " --gpu-mem 1G --batch-size 2 --seq-len 32 " + flag, &out), 2)
        << out;
    EXPECT_NE(out.find(std::string(flag) + " is for the disk tier (--host-mem SIZE), which is not set"),
              std::string::npos)
        << out;
  }
  EXPECT_FALSE(fs::exists(w.tmp / "z"));
}

// Note [What a resume keeps] (tools/cmd_train.cpp): `train --resume DIR --out DIR` alone
// continues the job with the run's device, disk-tier, evaluation, saving and logging flags.
TEST(Cli, ResumeAloneKeepsTheRunsFlags) {
  Workspace w;
  const std::string common = " --model " + w.model.string() + " --data " + w.data.string() +
                             " --steps 8 --batch-size 2 --lr 1e-3 --offload all --window 2 --host-mem 400K "
                             "--disk-staging 1 --eval " + w.data.string() + " --num-eval 8 --eval-every 3 --save-every 5";
  std::string out;
  ASSERT_EQ(run("train" + common + " -q --out " + (w.tmp / "full").string() + " --disk-dir " + (w.tmp / "d0").string(), &out),
            0)
      << out;
  const fs::path part = w.tmp / "part", log = w.tmp / "part.jsonl";
  ASSERT_EQ(run("train" + common + " -q --out " + part.string() + " --disk-dir " + (w.tmp / "d1").string() +
                    " --log-json " + log.string() + " --stop-at 2",
                &out),
            0)
      << out;
  // As a run killed after its checkpoint leaves it: records of steps it logged past it, and a
  // torn last line. The resume runs those steps again and logs each once.
  std::ofstream(log, std::ios::app) << "{\"step\": 3, \"loss\": 1}\n{\"eval_after_step\": 3}\n{\"step\": 4, \"lo";
  out.clear();  // run() appends
  // --disk-lag given again alone is the run's disk tier's (adversarial pass 58: it was
  // refused as "the disk tier is not set" before the run's --host-mem was kept).
  ASSERT_EQ(run("train --resume " + part.string() + " --out " + part.string() + " --disk-lag 1", &out), 0) << out;
  EXPECT_NE(out.find("3 records past step 2 removed"), std::string::npos) << out;
  for (const std::string& kept : std::vector<std::string>{"--offload all", "--window 2", "--host-mem 400K", "--disk-staging 1", "--num-eval 8",
                                 "--eval-every 3", "--save-every 5", "--log-json " + log.string(),
                                 "--disk-dir " + (w.tmp / "d1").string()})
    EXPECT_NE(out.find(kept), std::string::npos) << kept << "\n" << out;
  EXPECT_NE(out.find("block images kept from the previous run"), std::string::npos) << out;  // the disk tier, in place
  EXPECT_NE(out.find("saved step 5"), std::string::npos) << out;
  EXPECT_NE(out.find("eval after step 6"), std::string::npos) << out;
  EXPECT_EQ(read_file(w.tmp / "full" / "model.safetensors"), read_file(part / "model.safetensors"));
  // One JSON log for the whole run: steps 1..8 and the evaluations (of the 8-example sample)
  // the uninterrupted run makes, after steps 3, 6 and 8 — none at the stop after step 2, as
  // after a signal's (adversarial pass 71).
  std::ifstream in(log);
  std::vector<std::int64_t> steps, evals;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("eval_after_step")) {
      evals.push_back(j["eval_after_step"].get<std::int64_t>());
      EXPECT_EQ(j["eval_examples"].get<int>(), 8) << line;
    } else {
      steps.push_back(j["step"].get<std::int64_t>());
    }
  }
  EXPECT_EQ(steps, (std::vector<std::int64_t>{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(evals, (std::vector<std::int64_t>{3, 6, 8}));

  // A flag given again wins; one that changes the numbers (a tile size) says so.
  const fs::path part2 = w.tmp / "part2";
  ASSERT_EQ(run("train" + common + " -q --out " + part2.string() + " --disk-dir " + (w.tmp / "d2").string() + " --stop-at 2",
                &out),
            0)
      << out;
  out.clear();  // run() appends
  ASSERT_EQ(run("train --resume " + part2.string() + " --out " + part2.string() + " --eval-every 0 --tile 4K", &out), 0)
      << out;
  EXPECT_NE(out.find("--tile given as 4K but the run used auto; the result will differ"), std::string::npos) << out;
  EXPECT_EQ(out.find("eval after step 3"), std::string::npos) << out;
  // Into another --out the block file stays with the run: every block in RAM, the same bits.
  const fs::path part3 = w.tmp / "part3";
  ASSERT_EQ(run("train" + common + " -q --out " + part3.string() + " --disk-dir " + (w.tmp / "d3").string() + " --stop-at 2",
                &out),
            0)
      << out;
  out.clear();  // run() appends
  ASSERT_EQ(run("train --resume " + part3.string() + " --out " + (w.tmp / "moved").string(), &out), 0) << out;
  EXPECT_NE(out.find("that block file stays with the run"), std::string::npos) << out;
  EXPECT_EQ(out.find("--host-mem 400K"), std::string::npos) << out;
  EXPECT_EQ(read_file(w.tmp / "full" / "model.safetensors"), read_file(w.tmp / "moved" / "model.safetensors"));
  // A copy of a run directory, resumed in place, is another run: the original's JSON log and
  // block file stay the original's (the copy's resume neither appends to that log nor
  // rebuilds that block file); the copy ends with the same bits.
  const fs::path part4 = w.tmp / "part4", log4 = w.tmp / "part4.jsonl";
  ASSERT_EQ(run("train" + common + " -q --out " + part4.string() + " --disk-dir " + (w.tmp / "d4").string() +
                    " --log-json " + log4.string() + " --stop-at 2",
                &out),
            0)
      << out;
  const fs::path copy = w.tmp / "copy";
  fs::copy(part4, copy, fs::copy_options::recursive | fs::copy_options::copy_symlinks);
  const std::string log_before = read_file(log4);
  const auto blocks_before = fs::last_write_time(w.tmp / "d4" / "zo2-blocks.img");
  out.clear();
  ASSERT_EQ(run("train --resume " + copy.string() + " --out " + copy.string(), &out), 0) << out;
  EXPECT_NE(out.find("is a copy of the run in " + fs::weakly_canonical(part4).string()), std::string::npos) << out;
  EXPECT_EQ(read_file(log4), log_before);
  EXPECT_EQ(fs::last_write_time(w.tmp / "d4" / "zo2-blocks.img"), blocks_before);
  EXPECT_EQ(read_file(w.tmp / "full" / "model.safetensors"), read_file(copy / "model.safetensors"));
  // The original resumes in place with both.
  out.clear();
  ASSERT_EQ(run("train --resume " + part4.string() + " --out " + part4.string(), &out), 0) << out;
  EXPECT_NE(out.find("--log-json " + log4.string()), std::string::npos) << out;
  EXPECT_EQ(read_file(w.tmp / "full" / "model.safetensors"), read_file(part4 / "model.safetensors"));
}

TEST(Cli, BadInputIsRefusedBeforeAnythingIsWritten) {
  Workspace w;
  std::string out;
  // Token ids beyond the vocabulary (512).
  const auto big = w.tmp / "big.safetensors";
  ASSERT_EQ(run("synth-data --vocab 5000 --alphabet 100 --out " + big.string() + " --rows 4 --seq 8 -q"), 0);
  // Bad file contents exit 1 naming the file; bad flag values exit 2 (README, zo2-tune).
  EXPECT_EQ(run("train --model " + w.model.string() + " --data " + big.string() + " --out " + (w.tmp / "o1").string(), &out), 1);
  EXPECT_NE(out.find("outside the model's vocabulary"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "o1"));
  // Sequences longer than the model's positions (64).
  const auto longer = w.tmp / "long.safetensors";
  ASSERT_EQ(run("synth-data --model " + w.model.string() + " --out " + longer.string() + " --rows 2 --seq 100 -q"), 0);
  EXPECT_EQ(run("train --model " + w.model.string() + " --data " + longer.string() + " --out " + (w.tmp / "o2").string(), &out), 1);
  EXPECT_NE(out.find("max_position_embeddings"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "o2"));
  // A cap below the minimum states the minimum.
  EXPECT_EQ(run("train --model " + w.model.string() + " --data " + w.data.string() + " --out " + (w.tmp / "o3").string() +
                    " --gpu-mem 100K",
                &out),
            1);
  EXPECT_NE(out.find("below the minimum"), std::string::npos) << out;
  EXPECT_NE(out.find("cuBLAS and attention scratch"), std::string::npos) << "the parts must add up to the minimum: " << out;
  EXPECT_FALSE(fs::exists(w.tmp / "o3"));
  // An output directory that cannot be created (a file is in the way).
  std::ofstream(w.tmp / "file") << "x";
  EXPECT_EQ(run("train --model " + w.model.string() + " --data " + w.data.string() + " --out " + (w.tmp / "file" / "sub").string(), &out), 1);
  EXPECT_NE(out.find("cannot create"), std::string::npos) << out;
  // A malformed checkpoint.
  fs::create_directories(w.tmp / "broken");
  fs::copy_file(w.model / "config.json", w.tmp / "broken" / "config.json");
  std::ofstream(w.tmp / "broken" / "model.safetensors") << "garbage";
  EXPECT_EQ(run("forward --model " + (w.tmp / "broken").string() + " --inputs " + w.data.string() + " --out " + (w.tmp / "f.safetensors").string(), &out), 1);
  EXPECT_NE(out.find("model.safetensors"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "f.safetensors"));
  // forward --out never replaces what it reads: the inputs, or a file of the checkpoint.
  const std::string inputs_before = read_file(w.data), weights_before = read_file(w.model / "model.safetensors");
  out.clear();
  EXPECT_EQ(run("forward --model " + w.model.string() + " --inputs " + w.data.string() + " --out " + w.data.string(), &out), 2);
  EXPECT_NE(out.find("is the input file"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run("forward --model " + w.model.string() + " --inputs " + w.data.string() + " --out " +
                    (w.model / "model.safetensors").string(),
                &out),
            2);
  EXPECT_NE(out.find("a file of the model, adapter or tokenizer this command reads"), std::string::npos) << out;
  // generate --output and eval --predictions alike.
  std::ofstream(w.tmp / "prompts.txt") << "hello\n";
  out.clear();
  EXPECT_EQ(run("generate --model " + w.model.string() + " --data " + (w.tmp / "prompts.txt").string() + " --output " +
                    (w.tmp / "prompts.txt").string(),
                &out),
            2);
  EXPECT_NE(out.find("--output " + (w.tmp / "prompts.txt").string() + " is the input file"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run("eval --model " + w.model.string() + " --data " + w.data.string() + " --predictions " +
                    (w.model / "config.json").string(),
                &out),
            2);
  EXPECT_NE(out.find("a file of the model, adapter or tokenizer this command reads"), std::string::npos) << out;
  EXPECT_EQ(read_file(w.data), inputs_before);
  EXPECT_EQ(read_file(w.model / "model.safetensors"), weights_before);
}

// What --out holds is replaced only with --overwrite (Note [Run directory]): another run (also
// by a resume into it), a plain checkpoint, or the seed log of a run killed before its first
// save; a run started with relative paths resumes from anywhere, from the base it began at.
// Note [A resume from a rounded checkpoint] (tools/cmd_train.cpp): a run saved as bf16 (its
// weights stored as fp32) and resumed goes on from the rounded weights; its seed log says so
// at the resume's first step, and replay rounds there too, giving the run's checkpoint byte
// for byte (adversarial pass 58: replay exited 0 with other weights). With a rule that keeps
// state (its state saved and loaded as the resume did) and with plain zo-sgd.
TEST(Cli, AResumeFromARoundedCheckpointIsReplayedExactly) {
  Workspace w;
  for (const std::string rule : {"", " --optimizer zo-adam"}) {
    SCOPED_TRACE(rule);
    const fs::path r = w.tmp / ("run" + std::to_string(rule.size())), rep = w.tmp / ("rep" + std::to_string(rule.size()));
    std::string out;
    ASSERT_EQ(run("train --model " + w.model.string() + " --data " + w.data.string() +
                      " --steps 8 --batch-size 2 --lr 1e-3 --save-dtype bf16 --stop-at 3 -q --out " + r.string() + rule,
                  &out),
              0)
        << out;
    out.clear();
    ASSERT_EQ(run("train --resume " + r.string(), &out), 0) << out;
    EXPECT_NE(out.find("holds the weights rounded to bf16"), std::string::npos) << out;
    EXPECT_NE(read_file(r / "seed_log.jsonl").find("\"loaded_as\":[\"bf16\"]"), std::string::npos);
    out.clear();
    ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (r / "seed_log.jsonl").string() +
                      " --save-dtype bf16 --out " + rep.string(),
                  &out),
              0)
        << out;
    EXPECT_NE(out.find("step 3: the run was resumed from a checkpoint saved as bf16"), std::string::npos) << out;
    EXPECT_EQ(read_file(rep / "model.safetensors"), read_file(r / "model.safetensors"));
    // No scratch left beside the replayed checkpoint, nor in it.
    for (const fs::path& dir : std::vector<fs::path>{rep, w.tmp.path()})
      for (const auto& entry : fs::directory_iterator(dir))
        EXPECT_EQ(entry.path().filename().string().find(".tmp."), std::string::npos) << entry.path();
  }
  // A resume that saves before its first step (Ctrl-C in the evaluation it owes), as fp32:
  // the checkpoint keeps the rounding the log has not recorded yet ("rounded_pending"), and
  // so does the next resume's mark; replay still rebuilds the run (pass 58's review: the
  // mark was lost and replay gave other weights with rc 0).
  const fs::path c = w.tmp / "cut", crep = w.tmp / "cut-replayed";
  const std::string flags = " --data " + w.data.string() + " --eval " + w.data.string() +
                            " --num-eval 4 --eval-every 3 --steps 8 --batch-size 2 --lr 1e-3";
  std::string out;
  EXPECT_EQ(test::run_command("ZO2_TEST_SIGINT_IN_EVAL=3:1 " + tune() + " train --model " + w.model.string() + flags +
                                  " --save-dtype bf16 -q --out " + c.string(),
                              &out),
            130)
      << out;
  out.clear();
  EXPECT_EQ(test::run_command("ZO2_TEST_SIGINT_IN_EVAL=3:1 " + tune() + " train --resume " + c.string() +
                                  " --save-dtype fp32",
                              &out),
            130)
      << out;
  EXPECT_NE(read_file(c / "zo2_state.json").find("\"rounded_pending\""), std::string::npos) << read_file(c / "zo2_state.json");
  out.clear();
  ASSERT_EQ(run("train --resume " + c.string() + " -q", &out), 0) << out;
  EXPECT_NE(read_file(c / "seed_log.jsonl").find("\"loaded_as\":[\"bf16\"]"), std::string::npos);
  out.clear();
  ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (c / "seed_log.jsonl").string() + " -q --out " +
                    crep.string(),
                &out),
            0)
      << out;
  EXPECT_EQ(read_file(crep / "model.safetensors"), read_file(c / "model.safetensors"));
}

// The same through the disk tier: the kept block images are the unrounded weights, so the
// resume loads every block from the rounded checkpoint (api/run_dir.h, Note [A resume from a
// rounded checkpoint]); it ends with the all-in-RAM resume's bytes, with K = 1 and K = 3, and
// replay rebuilds them.
TEST(Cli, ADiskTierResumeFromARoundedCheckpointEqualsTheRamResume) {
  Workspace w;
  const std::string common = " --model " + w.model.string() + " --data " + w.data.string() +
                             " --steps 7 --batch-size 2 --lr 1e-3 --offload all --window 2 --save-dtype bf16 -q";
  const fs::path ram = w.tmp / "ram";
  ASSERT_EQ(run("train" + common + " --stop-at 3 --out " + ram.string()), 0);
  ASSERT_EQ(run("train --resume " + ram.string()), 0);
  for (const char* lag : {"1", "3"}) {
    SCOPED_TRACE(lag);
    const fs::path r = w.tmp / (std::string("disk") + lag), rep = w.tmp / (std::string("rep") + lag);
    const std::string tier = " --host-mem 400K --disk-staging 1 --disk-lag " + std::string(lag) + " --disk-dir " +
                             (w.tmp / (std::string("blocks") + lag)).string();
    std::string out;
    ASSERT_EQ(run("train" + common + " --stop-at 3 --out " + r.string() + tier, &out), 0) << out;
    out.clear();
    ASSERT_EQ(run("train --resume " + r.string(), &out), 0) << out;
    EXPECT_NE(out.find("holds the weights rounded to bf16"), std::string::npos) << out;
    EXPECT_EQ(read_file(r / "model.safetensors"), read_file(ram / "model.safetensors"));
    out.clear();
    ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (r / "seed_log.jsonl").string() +
                      " --save-dtype bf16 -q --out " + rep.string(),
                  &out),
              0)
        << out;
    EXPECT_EQ(read_file(rep / "model.safetensors"), read_file(r / "model.safetensors"));
  }
}

// Note [A run's flags in its seed log]: a resume that changes the run's flags records them on
// its first step, and a replayed checkpoint past it carries the changed ones (pass 58's
// review: it carried the starting --steps 4, below its step 6, and a resume of it failed).
TEST(Cli, AReplayedCheckpointCarriesTheFlagsAResumeChanged) {
  Workspace w;
  const fs::path r = w.tmp / "run", rep = w.tmp / "rep", full = w.tmp / "full";
  const std::string common = " --data " + w.data.string() + " --batch-size 2 --lr-schedule linear -q";
  std::string out;
  ASSERT_EQ(run("train --model " + w.model.string() + common + " --steps 4 --lr 1e-3 --out " + r.string(), &out), 0) << out;
  ASSERT_EQ(run("train --resume " + r.string() + " --steps 8 --lr 2e-3", &out), 0) << out;
  ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (r / "seed_log.jsonl").string() +
                    " --until-step 6 -q --out " + rep.string(),
                &out),
            0)
      << out;
  const auto state = nlohmann::json::parse(read_file(rep / "zo2_state.json"));
  EXPECT_EQ(state.at("total_steps"), 8) << state.dump();
  EXPECT_EQ(state.at("lr"), 2e-3) << state.dump();
  out.clear();
  ASSERT_EQ(run("train --resume " + rep.string() + " -q", &out), 0) << out;
  EXPECT_EQ(read_file(rep / "model.safetensors"), read_file(r / "model.safetensors"));
}

// Note [One writer per JSON log] (adversarial pass 60): a second run given a live run's
// --log-json truncated it under the first, whose records were lost and replaced by NULs.
TEST(Cli, ASecondRunOnALiveRunsJsonLogIsRefusedAndTheLogKept) {
  Workspace w;
  const fs::path log = w.tmp / "metrics.jsonl", link = w.tmp / "latest.jsonl";
  const std::string train = "train --model " + w.model.string() + " --data " + w.data.string() +
                            " --steps 2 --batch-size 2 -q --log-json ";
  ASSERT_EQ(run(train + log.string() + " --out " + (w.tmp / "first").string()), 0);
  const std::string records = read_file(log);
  fs::create_symlink(log, link);
  {
    const int live = ::open(log.c_str(), O_WRONLY | O_CLOEXEC);  // what the live run holds
    ASSERT_GE(live, 0);
    ASSERT_EQ(::flock(live, LOCK_EX | LOCK_NB), 0);
    for (const fs::path& given : {log, link}) {
      std::string out;
      EXPECT_EQ(run(train + given.string() + " --out " + (w.tmp / "second").string(), &out), 1) << out;
      EXPECT_NE(out.find("another zo2-tune train is writing this JSON log"), std::string::npos) << out;
      EXPECT_EQ(read_file(log), records) << "the live run's records are untouched";
      EXPECT_FALSE(fs::exists(w.tmp / "second" / "model.safetensors"));
    }
    ::close(live);
  }
  // Once it is done, a new run writes over the log, as always; a resume trims it in place of
  // the lock it holds.
  ASSERT_EQ(run(train + link.string() + " --out " + (w.tmp / "second").string()), 0);
  EXPECT_TRUE(fs::is_symlink(link));
  ASSERT_EQ(run("train --resume " + (w.tmp / "second").string() + " --steps 4"), 0);
  const std::string resumed = read_file(log);
  EXPECT_EQ(std::count(resumed.begin(), resumed.end(), '\n'), 4) << resumed;
}

TEST(Cli, OutIsNeverReplacedWithoutOverwrite) {
  Workspace w;
  const std::string data = " --data " + w.data.string() + " --steps 4 --batch-size 2 --lr 1e-3 -q";
  const fs::path a = w.tmp / "a", b = w.tmp / "b", full = w.tmp / "full";
  std::string out;
  // Relative --model, started from inside the workspace.
  ASSERT_EQ(test::run_command("cd " + w.tmp.path().string() + " && " + tune() + " train --model model" + data + " --out a --stop-at 2", &out), 0)
      << out;
  const auto state = nlohmann::json::parse(read_file(a / "zo2_state.json"));
  EXPECT_EQ(state["base_model"].get<std::string>(), fs::absolute(w.model).string());
  ASSERT_EQ(run("train --model " + w.model.string() + data + " --out " + full.string()), 0);
  ASSERT_EQ(run("train --model " + w.model.string() + data + " --seed 7 --out " + b.string()), 0);
  const std::string b_weights = read_file(b / "model.safetensors"), b_log = read_file(b / "seed_log.jsonl");
  out.clear();
  EXPECT_EQ(run("train --resume " + a.string() + " --out " + b.string(), &out), 2);
  EXPECT_NE(out.find("already holds another run, which --resume"), std::string::npos) << out;
  EXPECT_EQ(read_file(b / "model.safetensors"), b_weights);
  EXPECT_EQ(read_file(b / "seed_log.jsonl"), b_log);
  out.clear();
  EXPECT_EQ(run("train --resume " + a.string() + " --out " + a.string() + " --overwrite", &out), 2);
  EXPECT_NE(out.find("nothing to overwrite; drop --overwrite"), std::string::npos) << out;
  // With --overwrite the resume replaces b, and ends where the uninterrupted run does.
  out.clear();
  ASSERT_EQ(run("train --resume " + a.string() + " --out " + b.string() + " --overwrite -q", &out), 0) << out;
  EXPECT_EQ(read_file(b / "model.safetensors"), read_file(full / "model.safetensors"));
  // The JSON log is never one of the run's files; a resume keeps its seed and cannot end before its step.
  out.clear();
  EXPECT_EQ(run("train --resume " + b.string() + " --out " + b.string() + " --steps 8 --log-json " +
                    (b / "seed_log.jsonl").string(),
                &out),
            2);
  EXPECT_NE(out.find("a file this run reads or saves"), std::string::npos) << out;
  EXPECT_EQ(read_file(b / "model.safetensors"), read_file(full / "model.safetensors"));
  out.clear();
  EXPECT_EQ(run("train --resume " + a.string() + " --out " + a.string() + " --seed 5", &out), 2);
  EXPECT_NE(out.find("--seed 5: the run in " + a.string() + " has run seed 0"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run("train --resume " + a.string() + " --out " + a.string() + " --steps 1", &out), 2);
  EXPECT_NE(out.find("--steps 1: the run in " + a.string() + " is already at step 2"), std::string::npos) << out;
  // --log-json never writes over a file that is not a JSON log (another run's seed log or
  // weights, a model's config.json, notes), on a new run or a resume.
  for (const fs::path& victim : {full / "seed_log.jsonl", w.model / "config.json", w.tmp / "notes.txt"}) {
    if (!fs::exists(victim)) std::ofstream(victim) << "my notes\n{\"step\": 1}\n";
    const std::string before = read_file(victim);
    for (const std::string& cmd : {"train --model " + w.model.string() + data + " --out " + (w.tmp / "lj").string(),
                                   "train --resume " + a.string() + " --out " + a.string()}) {
      out.clear();
      EXPECT_EQ(run(cmd + " --log-json " + victim.string(), &out), 2) << cmd << "\n" << out;
      EXPECT_NE(out.find("--log-json " + victim.string() + ": "), std::string::npos) << out;
      EXPECT_EQ(read_file(victim), before) << victim;
    }
  }
  // A seed is decimal as written: 010 is 10 (not octal 8), 09 is 9.
  for (const auto& [written, value] : {std::pair{"010", "10"}, std::pair{"09", "9"}}) {
    const fs::path o = w.tmp / (std::string("seed") + written);
    ASSERT_EQ(run("train --model " + w.model.string() + data + " --out " + o.string() + " --seed " + written), 0);
    EXPECT_NE(read_file(o / "seed_log.jsonl").find(std::string("\"run_seed\":") + value + ","), std::string::npos)
        << read_file(o / "seed_log.jsonl");
  }
  out.clear();
  EXPECT_EQ(run("train --resume " + a.string() + " --out " + a.string() + " --stop-at 2", &out), 2);
  EXPECT_NE(out.find("--stop-at 2: the run in " + a.string() + " is already at step 2"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run("train --model " + w.model.string() + data + " --out ''", &out), 2);
  EXPECT_NE(out.find("--out: an empty value"), std::string::npos) << out;  // Note [Empty values]
  out.clear();
  EXPECT_EQ(run("replay --model " + w.model.string() + " --seed-log " + full.string() + " --out " +
                    (w.tmp / "rp0").string(),
                &out),
            2);
  EXPECT_NE(out.find("a directory, not a seed log"), std::string::npos) << out;
  // What a run tunes is the run's: another --model or adapter flags on a resume are refused.
  out.clear();
  EXPECT_EQ(run("train --resume " + a.string() + " --out " + a.string() + " --model " + w.model.string(), &out), 2);
  EXPECT_NE(out.find("a resumed run goes on from its own checkpoint; drop --model"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run("train --resume " + a.string() + " --out " + a.string() + " --lora", &out), 2);
  EXPECT_NE(out.find("the run tunes every parameter; drop --lora"), std::string::npos) << out;
  // replay refuses a --model whose weights are not those the log's run started from (the log
  // records their fingerprint): the tuned run, or a base re-made at the same path.
  out.clear();
  EXPECT_EQ(run("replay --model " + full.string() + " --seed-log " + (full / "seed_log.jsonl").string() + " --out " +
                    (w.tmp / "rp").string() + " -q",
                &out),
            2);
  EXPECT_NE(out.find("its weights are not those the seed log's run started from"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "rp"));
  const fs::path remade = w.tmp / "remade";
  fs::copy(w.model, remade, fs::copy_options::recursive);
  ASSERT_EQ(run("train --model " + remade.string() + data + " --out " + (w.tmp / "on-remade").string() + " -q"), 0);
  ASSERT_EQ(run("init --preset opt-tiny --seed 7 --out " + remade.string() + " --overwrite -q"), 0);
  out.clear();
  EXPECT_EQ(run("replay --model " + remade.string() + " --seed-log " + (w.tmp / "on-remade" / "seed_log.jsonl").string() +
                    " --out " + (w.tmp / "rp").string() + " -q",
                &out),
            2);
  EXPECT_NE(out.find("its weights are not those the seed log's run started from"), std::string::npos) << out;
  // The same weights saved another way (resharded) are the same base.
  ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (full / "seed_log.jsonl").string() +
                " --until-step 0 --shard-size 100K --out " + (w.tmp / "resharded").string() + " -q"),
            0);
  ASSERT_TRUE(fs::exists(w.tmp / "resharded" / "model.safetensors.index.json"));
  out.clear();
  ASSERT_EQ(run("replay --model " + (w.tmp / "resharded").string() + " --seed-log " + (full / "seed_log.jsonl").string() +
                    " --out " + (w.tmp / "rp-sharded").string() + " -q",
                &out),
            0)
      << out;
  // A copy of the base elsewhere is the same base: no word.
  const fs::path copied = w.tmp / "copied-base";
  fs::copy(w.model, copied, fs::copy_options::recursive);
  out.clear();
  ASSERT_EQ(run("replay --model " + copied.string() + " --seed-log " + (full / "seed_log.jsonl").string() + " --out " +
                    (w.tmp / "rp").string(),
                &out),
            0)
      << out;
  EXPECT_EQ(out.find("is not the checkpoint"), std::string::npos) << out;
  EXPECT_EQ(read_file(w.tmp / "rp" / "model.safetensors"), read_file(full / "model.safetensors"));
  // The base moved away (nothing at the logged path any more), its new place given: the same
  // weights (adversarial pass 58: the replay failed resolving the vanished path).
  {
    const fs::path moving = w.tmp / "moving-base", moved = w.tmp / "moved-base";
    fs::copy(w.model, moving, fs::copy_options::recursive);
    ASSERT_EQ(run("train --model " + moving.string() + data + " --out " + (w.tmp / "on-moving").string() + " -q"), 0);
    fs::rename(moving, moved);
    out.clear();
    ASSERT_EQ(run("replay --model " + moved.string() + " --seed-log " + (w.tmp / "on-moving" / "seed_log.jsonl").string() +
                      " --out " + (w.tmp / "rp-moved").string(),
                  &out),
              0)
        << out;
    EXPECT_EQ(read_file(w.tmp / "rp-moved" / "model.safetensors"), read_file(w.tmp / "on-moving" / "model.safetensors"));
  }
  out.clear();
  ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (full / "seed_log.jsonl").string() + " --out " +
                    (w.tmp / "rp2").string() + " -q",
                &out),
            0);
  EXPECT_EQ(out.find("is not the checkpoint"), std::string::npos) << out;
  EXPECT_EQ(read_file(w.tmp / "rp2" / "model.safetensors"), read_file(full / "model.safetensors"));
  // replay never writes into a run's checkpoint (its resume would start from other weights),
  // nor over a checkpoint unasked; --overwrite replaces a checkpoint.
  const std::string full_weights = read_file(full / "model.safetensors");
  for (const std::string sub : {"current", "step-00000004"}) {
    out.clear();
    EXPECT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (full / "seed_log.jsonl").string() +
                      " --until-step 2 --out " + (full / sub).string(),
                  &out),
              2)
        << out;
    EXPECT_NE(out.find("is a checkpoint of the training run " + full.string()), std::string::npos) << out;
  }
  EXPECT_EQ(read_file(full / "model.safetensors"), full_weights);
  out.clear();
  EXPECT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (full / "seed_log.jsonl").string() +
                    " --until-step 2 --out " + (w.tmp / "rp2").string(),
                &out),
            2);
  EXPECT_NE(out.find("--out " + (w.tmp / "rp2").string() + " already holds a checkpoint (current → step-00000004)"),
            std::string::npos)
      << out;
  EXPECT_EQ(read_file(w.tmp / "rp2" / "model.safetensors"), full_weights);
  ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (full / "seed_log.jsonl").string() +
                    " --until-step 2 --out " + (w.tmp / "rp2").string() + " --overwrite -q"),
            0);
  EXPECT_NE(read_file(w.tmp / "rp2" / "model.safetensors"), full_weights);
  EXPECT_FALSE(fs::exists(w.tmp / "rp2" / "step-00000004"));
  // A new directory inside a run is not one of its checkpoints: allowed.
  ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (full / "seed_log.jsonl").string() +
                " --out " + (full / "rebuilt").string() + " -q"),
            0);
  EXPECT_EQ(read_file(full / "rebuilt" / "model.safetensors"), full_weights);
  // A model of another shape is not a copy of the run's base: refused, not warned of.
  ASSERT_EQ(run("init --preset llama-tiny --out " + (w.tmp / "llama").string() + " -q"), 0);
  out.clear();
  EXPECT_EQ(run("replay --model " + (w.tmp / "llama").string() + " --seed-log " + (full / "seed_log.jsonl").string() +
                    " --out " + (w.tmp / "rp3").string(),
                &out),
            2);
  EXPECT_NE(out.find("(llama, 2 layers"), std::string::npos) << out;
  EXPECT_NE(out.find("is not the model the seed log's run tuned"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "rp3"));
  // A plain checkpoint as --out.
  out.clear();
  EXPECT_EQ(run("train --model " + w.model.string() + data + " --out " + w.model.string() + "-copy", &out), 0) << out;
  const fs::path plain = w.tmp / "plain";
  ASSERT_EQ(run("init --preset opt-tiny --out " + plain.string() + " -q"), 0);
  const std::string plain_weights = read_file(plain / "model.safetensors");
  out.clear();
  EXPECT_EQ(run("train --model " + w.model.string() + data + " --out " + plain.string(), &out), 2);
  EXPECT_NE(out.find("holds a checkpoint (config.json, model.safetensors) that this run's saves would replace"),
            std::string::npos)
      << out;
  EXPECT_EQ(read_file(plain / "model.safetensors"), plain_weights);
  // A run killed before its first save: a seed log, no checkpoint.
  const fs::path killed = w.tmp / "killed";
  fs::create_directories(killed);
  fs::copy_file(a / "seed_log.jsonl", killed / "seed_log.jsonl");
  out.clear();
  EXPECT_EQ(run("train --resume " + killed.string() + " --out " + killed.string(), &out), 2);
  EXPECT_NE(out.find("stopped before its first save"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(run("train --model " + w.model.string() + data + " --out " + killed.string(), &out), 2);
  EXPECT_NE(out.find(" steps are in " + (killed / "seed_log.jsonl").string() + ": `zo2-tune replay --model "),
            std::string::npos) << out;
  EXPECT_NE(out.find("`zo2-tune train --resume NEW` carries on from there with the run's flags, which the seed log "
                     "records"),
            std::string::npos) << out;
  // Its advice carries the run on: replay, then a resume of the replayed checkpoint (which
  // continues the seed log it was replayed from, with the data, lr, batch size and the rest
  // that the log's header records: Note [A run's flags in its seed log]) ends where an
  // uninterrupted run does. Only --steps is given, to have steps left.
  const fs::path rebuilt = w.tmp / "rebuilt";
  ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (killed / "seed_log.jsonl").string() + " --out " +
                rebuilt.string() + " -q", &out), 0) << out;
  ASSERT_EQ(run("train --resume " + rebuilt.string() + " --steps 6 -q", &out), 0) << out;
  ASSERT_EQ(run("train --model " + w.model.string() + " --data " + w.data.string() +
                " --steps 6 --batch-size 2 --lr 1e-3 -q --out " + (w.tmp / "six").string()), 0);
  EXPECT_EQ(read_file(rebuilt / "model.safetensors"), read_file(w.tmp / "six" / "model.safetensors"));
  ASSERT_EQ(run("train --model " + w.model.string() + data + " --out " + killed.string() + " --overwrite"), 0);
  // Another --data on resume is taken, and said to change the result.
  const fs::path other = w.tmp / "other.safetensors";
  ASSERT_EQ(run("synth-data --model " + w.model.string() + " --out " + other.string() + " --rows 16 --seq 32 --seed 3 -q"), 0);
  ASSERT_EQ(run("train --model " + w.model.string() + data + " --out " + (w.tmp / "d").string() + " --stop-at 2"), 0);
  out.clear();
  ASSERT_EQ(run("train --resume " + (w.tmp / "d").string() + " --out " + (w.tmp / "d").string() + " --data " +
                    other.string(),
                &out),
            0)
      << out;
  EXPECT_NE(out.find("--data given as " + other.string() + " but the run trained on"), std::string::npos) << out;
  EXPECT_NE(out.find("now gives 16 training examples but the run had 64"), std::string::npos) << out;
}

// The run's checkpoint given as a shell completes it (`RUN/current/`), or as `current`, a step
// directory or `.` from inside the run, is resumed in place: it was taken for another run,
// and the --overwrite its refusal suggested removed the run being resumed (adversarial pass
// 64). --overwrite never removes what the run starts from.
TEST(Cli, TheRunsOwnCheckpointHoweverNamedIsResumedInPlaceAndNeverRemoved) {
  Workspace w;
  const std::string f = " --model " + w.model.string() + " --data " + w.data.string() + " --steps 8 --batch-size 2 --lr 1e-3 -q";
  const fs::path full = w.tmp / "full", part = w.tmp / "part";
  ASSERT_EQ(run("train" + f + " --out " + full.string()), 0);
  ASSERT_EQ(run("train" + f + " --out " + part.string() + " --stop-at 2"), 0);
  const std::string tune = test::zo2_tune_path().string();
  std::string out;
  // Refused with --overwrite, naming what would go; nothing removed.
  for (const std::string& how : {"cd " + part.string() + " && " + tune + " train --resume current --overwrite",
                                 tune + " train --resume " + part.string() + "/current/ --overwrite",
                                 "cd " + part.string() + "/step-00000002 && " + tune + " train --resume . --overwrite"}) {
    out.clear();
    EXPECT_EQ(test::run_command(how, &out), 2) << how << ": " << out;
    EXPECT_NE(out.find("there is nothing to overwrite; drop --overwrite"), std::string::npos) << how << ": " << out;
    EXPECT_TRUE(fs::exists(part / "seed_log.jsonl")) << how;
    EXPECT_TRUE(fs::exists(part / "step-00000002" / "model.safetensors")) << how;
  }
  // --model RUN/current --out RUN --overwrite: a new run would remove its own starting point.
  out.clear();
  EXPECT_EQ(run("train --model " + (part / "current").string() + " --data " + w.data.string() +
                    " --steps 8 --batch-size 2 --lr 1e-3 --overwrite --out " + part.string(),
                &out),
            2)
      << out;
  EXPECT_NE(out.find("is inside it, and this run starts from it"), std::string::npos) << out;
  EXPECT_TRUE(fs::exists(part / "step-00000002" / "model.safetensors"));
  // Nor what the run reads (adversarial pass 71: --adapter RUN --out RUN --overwrite removed
  // the run, then failed to read its adapter): a tokenizer, a data file in the run's checkpoint.
  fs::copy_file(w.data, part / "step-00000002" / "data.safetensors");
  for (const std::string& flags :
       {" --data " + (part / "current" / "data.safetensors").string(),
        " --data " + w.data.string() + " --eval " + (part / "step-00000002" / "data.safetensors").string(),
        " --data " + w.data.string() + " --tokenizer " + (part / "current").string()}) {
    out.clear();
    EXPECT_EQ(run("train --model " + w.model.string() + flags + " --steps 2 --overwrite --out " + part.string(), &out), 2)
        << flags << ": " << out;
    EXPECT_NE(out.find("is inside it, and this run reads"), std::string::npos) << flags << ": " << out;
    EXPECT_TRUE(fs::exists(part / "step-00000002" / "model.safetensors")) << flags;
  }
  fs::remove(part / "step-00000002" / "data.safetensors");
  // Each way resumes in place and ends where the uninterrupted run does.
  ASSERT_EQ(test::run_command("cd " + part.string() + " && " + tune + " train --resume current --stop-at 4 -q", &out), 0)
      << out;
  ASSERT_EQ(test::run_command(tune + " train --resume " + part.string() + "/current/ --stop-at 6 -q", &out), 0) << out;
  ASSERT_EQ(test::run_command("cd " + part.string() + "/step-00000006 && " + tune + " train --resume . -q", &out), 0)
      << out;
  EXPECT_EQ(read_file(part / "model.safetensors"), read_file(full / "model.safetensors"));
  EXPECT_EQ(read_file(part / "seed_log.jsonl").substr(read_file(part / "seed_log.jsonl").find('\n')),
            read_file(full / "seed_log.jsonl").substr(read_file(full / "seed_log.jsonl").find('\n')));
  // A model kept in the run directory under another name is not the run's: --overwrite
  // replaces the run and keeps it.
  fs::copy(w.model, part / "base");
  ASSERT_EQ(run("train --model " + (part / "base").string() + " --data " + w.data.string() +
                    " --steps 2 --batch-size 2 --lr 1e-3 --overwrite -q --out " + part.string(),
                &out),
            0)
      << out;
  EXPECT_TRUE(fs::exists(part / "base" / "model.safetensors"));
  EXPECT_FALSE(fs::exists(part / "step-00000008"));
}

// A run directory whose own path leaves no room under PATH_MAX for what a save writes below
// it trained every step and failed at the first save (adversarial pass 64): refused when
// train takes it, before a step, its path shown shortened.
TEST(Cli, ARunDirectoryWithoutRoomForItsSavesIsRefusedBeforeTheFirstStep) {
  Workspace w;
  fs::path deep = w.tmp.path();
  const std::string part(250, 'L');
  while (deep.string().size() + 251 < 3900) deep /= part;
  deep /= std::string(4000 - deep.string().size() - 1, 'q');  // a 4000-byte --out
  ASSERT_EQ(deep.string().size(), 4000u);
  fs::create_directories(deep.parent_path());
  std::string out;
  EXPECT_EQ(run("train --model " + w.model.string() + " --data " + w.data.string() +
                    " --steps 50 --batch-size 2 --lr 1e-3 --out " + deep.string(),
                &out),
            1);
  EXPECT_NE(out.find("its path is 4000 bytes long, and a save writes files up to 167 bytes below it: beyond this "
                     "system's path limit (PATH_MAX 4096)"),
            std::string::npos)
      << out.substr(0, 2000);
  EXPECT_EQ(out.find("step 1/"), std::string::npos) << out.substr(0, 2000);
  EXPECT_LT(out.size(), 1500u);  // the path shortened
  EXPECT_FALSE(fs::exists(deep / "seed_log.jsonl"));
  // One with room is taken.
  const fs::path roomy = deep.parent_path() / "r";
  EXPECT_EQ(run("train --model " + w.model.string() + " --data " + w.data.string() +
                    " --steps 2 --batch-size 2 --lr 1e-3 -q --out " + roomy.string(),
                &out),
            0)
      << out.substr(0, 2000);
}

// --steps given again on a resume: a constant lr makes it no change to the weights (it was
// warned as one); a decaying schedule's is; one below the run's step is refused, unwarned
// (adversarial pass 66).
TEST(Cli, MoreStepsOnAResumeWarnOnlyWhereTheScheduleDecaysOverThem) {
  Workspace w;
  const std::string f = " --model " + w.model.string() + " --data " + w.data.string() + " --steps 4 --batch-size 2 --lr 1e-3";
  std::string out;
  for (const std::string schedule : {"constant", "cosine"}) {
    const fs::path r = w.tmp / schedule;
    ASSERT_EQ(run("train" + f + " --lr-schedule " + schedule + " -q --out " + r.string()), 0);
    out.clear();
    EXPECT_EQ(run("train --resume " + r.string() + " --steps 2", &out), 2) << out;
    EXPECT_NE(out.find("--steps 2: the run in"), std::string::npos) << out;
    EXPECT_EQ(out.find("result will differ"), std::string::npos) << out;
    out.clear();
    ASSERT_EQ(run("train --resume " + r.string() + " --steps 6", &out), 0) << out;
    EXPECT_EQ(out.find("--steps given as 6 but the run used 4") != std::string::npos, schedule == "cosine") << out;
  }
}

// A checkpoint `replay` wrote continues the seed log it was replayed from, whose prefix it
// records: another run's log at that path (a name reused, with the same seed) is refused
// instead of continued (adversarial pass 64: the resumed run's log then rebuilt other
// weights), and a log that moved away is named with where a copy is taken from.
TEST(Cli, AReplayedCheckpointContinuesOnlyTheLogItWasReplayedFrom) {
  Workspace w;
  const std::string f = " --model " + w.model.string() + " --data " + w.data.string() + " --batch-size 2 -q";
  const fs::path killed = w.tmp / "killed", a = w.tmp / "a", b = w.tmp / "b", six = w.tmp / "six";
  ASSERT_EQ(run("train" + f + " --lr 1e-3 --steps 6 --out " + six.string()), 0);
  ASSERT_EQ(run("train" + f + " --lr 1e-3 --steps 6 --stop-at 3 --out " + (w.tmp / "stopped").string()), 0);
  fs::create_directories(killed);
  fs::copy_file(w.tmp / "stopped" / "seed_log.jsonl", killed / "seed_log.jsonl");  // killed before its first save
  std::string out;
  for (const fs::path& r : {a, b})
    ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (killed / "seed_log.jsonl").string() +
                      " --out " + r.string() + " -q",
                  &out),
              0)
        << out;
  // The name is taken by a new run with the same (default) seed and another lr.
  fs::rename(killed, w.tmp / "killed.moved");
  ASSERT_EQ(run("train" + f + " --lr 3e-3 --steps 6 --out " + killed.string()), 0);
  out.clear();
  EXPECT_EQ(run("train --resume " + a.string() + " --steps 6", &out), 1) << out;
  EXPECT_NE(out.find("bytes are not the log " + a.string() + " was replayed from"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(a / "seed_log.jsonl"));
  // Gone: named, with the copy that carries the run on — the run directory's log, also when
  // the resume names its `current` (whose run it carries on).
  fs::remove_all(killed);
  out.clear();
  const std::string b_current = (b / "current").string();
  EXPECT_EQ(run("train --resume " + b_current + " --steps 6", &out), 1) << out;
  EXPECT_NE(out.find((killed / "seed_log.jsonl").string() + ": missing: " + b_current +
                     " was replayed from that seed log, which its resume continues; if it moved, copy it to " +
                     (b / "seed_log.jsonl").string()),
            std::string::npos)
      << out;
  fs::copy_file(w.tmp / "killed.moved" / "seed_log.jsonl", b / "seed_log.jsonl");
  ASSERT_EQ(run("train --resume " + b_current + " --steps 6", &out), 0) << out;
  EXPECT_EQ(read_file(b / "model.safetensors"), read_file(six / "model.safetensors"));
  for (const auto& e : fs::directory_iterator(b)) {
    if (e.is_directory() && !e.is_symlink()) {
      EXPECT_FALSE(fs::exists(e.path() / "seed_log.jsonl")) << e.path();
    }
  }
}

// A writer never removes the run's only complete checkpoint (api/run_dir.cpp clean_run_dir):
// with `current` deleted the newest complete step becomes current; a `current` copied as a
// directory (cp -rL, scp -r) stops the writer with everything kept.
TEST(Cli, ACheckpointIsNeverRemovedWhenCurrentIsLost) {
  Workspace w;
  const std::string f = " --model " + w.model.string() + " --data " + w.data.string() + " --steps 6 --batch-size 2 --lr 1e-3 -q";
  const fs::path full = w.tmp / "full", part = w.tmp / "part", copy = w.tmp / "copy";
  ASSERT_EQ(run("train" + f + " --out " + full.string()), 0);
  ASSERT_EQ(run("train" + f + " --out " + part.string() + " --stop-at 3"), 0);
  ASSERT_EQ(test::run_command("cp -rL " + part.string() + " " + copy.string()), 0);
  fs::remove(part / "current");
  std::string out;
  ASSERT_EQ(run("train --resume " + part.string() + " --out " + part.string(), &out), 0) << out;
  EXPECT_NE(out.find("step-00000003 is the newest complete checkpoint and becomes current"), std::string::npos) << out;
  EXPECT_EQ(read_file(part / "model.safetensors"), read_file(full / "model.safetensors"));
  out.clear();
  EXPECT_EQ(run("train --resume " + copy.string() + " --out " + copy.string(), &out), 1);
  EXPECT_NE(out.find("is not a link (was the run directory copied with links followed"), std::string::npos) << out;
  EXPECT_TRUE(fs::exists(copy / "step-00000003" / "zo2_state.json"));
}

// A write that cannot publish its file says why (the reason was once lost: "…: Success").
TEST(Cli, AFailedAtomicWriteNamesTheReason) {
  test::TempDir tmp;
  fs::create_directories(tmp / "x" / "config.json");
  std::string out;
  EXPECT_EQ(run("init --preset opt-tiny --out " + (tmp / "x").string(), &out), 1) << out;
  EXPECT_NE(out.find("cannot write '" + (tmp / "x" / "config.json").string() + "': rename failed: Is a directory"),
            std::string::npos)
      << out;
  EXPECT_EQ(out.find("Success"), std::string::npos) << out;
}

// A checkpoint holding a NaN or an infinite weight is refused at load by every command,
// naming the tensor and the element, before anything is written (issue 16, item 4): it would
// make every loss NaN, so `train` would skip every step and still save, and `eval` report
// NaN. A value that fp16 storage cannot hold is named as an overflow.
TEST(Cli, NonFiniteWeightsInACheckpointAreRefusedByName) {
  Workspace w;
  std::string out;
  const std::string tensor = "model.decoder.layers.1.fc1.weight";
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    const fs::path m = w.tmp / "nan-model";
    fs::remove_all(m);
    fs::copy(w.model, m);
    test::poke_safetensors(m / "model.safetensors", tensor, 70, bad);  // row 1, col 6 (hidden 64)
    const std::string o = (w.tmp / "o").string();
    for (const std::string& cmd :
         {"train --model " + m.string() + " --data " + w.data.string() + " --out " + o + " --steps 2",
          "eval --model " + m.string() + " --data " + w.data.string(),
          "eval --model " + m.string() + " --data " + w.data.string() + " --storage-dtype bf16",
          "eval --model " + m.string() + " --data " + w.data.string() + " --storage-dtype fp8",
          "forward --model " + m.string() + " --inputs " + w.data.string() + " --out " + o + ".safetensors"}) {
      EXPECT_EQ(run(cmd, &(out = "")), 1) << cmd << "\n" << out;
      EXPECT_NE(out.find("tensor '" + tensor + "' in model.safetensors holds a non-finite weight (element [1, 6] = " +
                         (std::isnan(bad) ? std::string("nan") : std::string("-inf")) + ")"),
                std::string::npos)
          << cmd << "\n" << out;
      EXPECT_FALSE(fs::exists(fs::path(o) / "model.safetensors")) << cmd;  // no checkpoint
      EXPECT_FALSE(fs::exists(fs::path(o) / "config.json")) << cmd;
      EXPECT_FALSE(fs::exists(o + ".safetensors")) << cmd;
    }
  }
  // Finite in the file, infinite in fp16 storage.
  const fs::path m = w.tmp / "big-model";
  fs::copy(w.model, m);
  test::poke_safetensors(m / "model.safetensors", tensor, 3, 1e6f);
  EXPECT_EQ(run("eval --model " + m.string() + " --data " + w.data.string() + " --storage-dtype fp16", &(out = "")), 1) << out;
  EXPECT_NE(out.find("element [0, 3] = 1000000 overflows fp16 storage"), std::string::npos) << out;
  EXPECT_EQ(run("eval --model " + m.string() + " --data " + w.data.string() + " --storage-dtype bf16", &out), 0) << out;
  // Nor is it saved as infinity: --save-dtype fp16 of an fp32 run (train, replay) and merge
  // refuse, naming the tensor; bf16 holds it.
  // train checks before its first step (not after hours of them), and leaves no run behind.
  const fs::path o = w.tmp / "o16";
  EXPECT_EQ(run("train --model " + m.string() + " --data " + w.data.string() + " --out " + o.string() +
                    " --steps 1 --save-dtype fp16",
                &(out = "")),
            2)
      << out;
  EXPECT_NE(out.find("--save-dtype fp16: tensor '" + tensor + "' (block 1) holds 1000000 at element 3, beyond "
                     "fp16's range: it would be saved as infinity"),
            std::string::npos)
      << out;
  EXPECT_FALSE(fs::exists(o / "model.safetensors"));
  EXPECT_FALSE(fs::exists(o / "seed_log.jsonl"));
  EXPECT_EQ(run("train --model " + m.string() + " --data " + w.data.string() + " --out " + o.string() + " --steps 1 -q",
                &(out = "")),
            0)
      << out;
  // replay checks at its save.
  EXPECT_EQ(run("replay --model " + m.string() + " --seed-log " + (o / "seed_log.jsonl").string() + " --out " +
                    (w.tmp / "r16").string() + " --save-dtype fp16",
                &(out = "")),
            1)
      << out;
  EXPECT_NE(out.find("not saved at step 1: tensor '" + tensor + "' (block 1) holds"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "r16"));  // nor the directory it made (with its lock file)
  // An existing --out stays (its lock file too: another writer may hold it).
  fs::create_directories(w.tmp / "r16e" / "deeper");
  EXPECT_EQ(run("replay --model " + m.string() + " --seed-log " + (o / "seed_log.jsonl").string() + " --out " +
                    (w.tmp / "r16e").string() + " --save-dtype fp16",
                &(out = "")),
            1)
      << out;
  EXPECT_TRUE(fs::is_directory(w.tmp / "r16e" / "deeper"));
  // Parents it made go with it.
  EXPECT_EQ(run("replay --model " + m.string() + " --seed-log " + (o / "seed_log.jsonl").string() + " --out " +
                    (w.tmp / "r16p" / "a" / "b").string() + "/ --save-dtype fp16",
                &(out = "")),
            1)
      << out;
  EXPECT_FALSE(fs::exists(w.tmp / "r16p"));
  EXPECT_EQ(run("train --model " + m.string() + " --data " + w.data.string() + " --out " + (w.tmp / "ob").string() +
                    " --steps 1 --save-dtype bf16 -q",
                &(out = "")),
            0)
      << out;
}

// Finite weights whose forward pass overflows (fc1 row 1 all 3e38: that hidden unit is inf
// for every token, the next layer NaN) give a NaN loss at every step. Each step's update is
// skipped with a warning; ten in a row stop the run: it saves (the weights are the base
// model's, finite) and exits 1 naming the losses, instead of running all 50 steps and
// exiting 0 with a model that learned nothing (issue 16, item 4).
TEST(Cli, TrainStopsWhenTheLossesStayNonFinite) {
  Workspace w;
  const fs::path m = w.tmp / "overflow";
  fs::copy(w.model, m);
  for (int c = 0; c < 64; ++c) test::poke_safetensors(m / "model.safetensors", "model.decoder.layers.1.fc1.weight", 64 + c, 3e38f);
  const fs::path o = w.tmp / "o";
  std::string out;
  EXPECT_EQ(run("train --model " + m.string() + " --data " + w.data.string() + " --out " + o.string() +
                    " --steps 50 --log-json " + (w.tmp / "log.jsonl").string(),
                &out),
            1)
      << out;
  EXPECT_NE(out.find("steps' losses were not finite"), std::string::npos) << out;
  EXPECT_NE(out.find("its update is skipped"), std::string::npos) << out;  // the per-step warning
  std::ifstream log(w.tmp / "log.jsonl");
  int steps = 0;
  for (std::string line; std::getline(log, line); ++steps)
    EXPECT_TRUE(nlohmann::json::parse(line).at("update_skipped").get<bool>()) << line;
  EXPECT_GE(steps, 10);
  EXPECT_LT(steps, 50);  // stopped early
  // Saved where it stopped, so the run directory stays consistent and resumable.
  const auto state = nlohmann::json::parse(read_file(o / "zo2_state.json"));
  EXPECT_EQ(state.at("next_step").get<int>(), steps) << state.dump();
}

// Token data with nothing to predict — a sequence whose labels are all -100, or whose
// attention mask is all 0 — is refused by name when it is loaded (exit 1), by train, eval
// and forward alike, before anything is written (issue 16, defect 13: train used to skip
// every step and exit 0, eval and forward to report loss nan).
TEST(Cli, TokenDataWithNothingToPredictIsRefusedByName) {
  Workspace w;
  std::string out;
  constexpr int kRows = 3, kSeq = 8;
  std::vector<std::int32_t> ids(kRows * kSeq), ones(ids.size(), 1);
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int32_t>(10 + i);
  auto write = [&](const std::string& name, const std::vector<std::int32_t>* mask,
                   const std::vector<std::int32_t>* labels) {
    std::vector<TensorToWrite> t{{"input_ids", DType::i32, {kRows, kSeq}, ids.data(), {}}};
    if (mask) t.push_back({"attention_mask", DType::i32, {kRows, kSeq}, mask->data(), {}});
    if (labels) t.push_back({"labels", DType::i32, {kRows, kSeq}, labels->data(), {}});
    write_safetensors(w.tmp / name, t);
    return (w.tmp / name).string();
  };
  // Row 1's labels are -100 after its first position (a label there predicts nothing).
  std::vector<std::int32_t> labels = ids;
  for (int t = 1; t < kSeq; ++t) labels[static_cast<std::size_t>(kSeq + t)] = -100;
  const std::string no_labels = write("no-labels.safetensors", nullptr, &labels);
  // Row 2's attention mask is all 0 (and no labels: they follow the mask).
  std::vector<std::int32_t> mask = ones;
  for (int t = 0; t < kSeq; ++t) mask[static_cast<std::size_t>(2 * kSeq + t)] = 0;
  const std::string no_mask = write("no-mask.safetensors", &mask, nullptr);
  const std::string o = (w.tmp / "o").string();
  const std::string m = " --model " + w.model.string();
  for (const auto& [file, why] : {std::pair{no_labels, std::string("sequence 1 has nothing to predict: every label after "
                                                                   "its first position is -100")},
                                  std::pair{no_mask, std::string("sequence 2 has nothing to predict: its attention_mask "
                                                                 "is 0 at every position after the first")}}) {
    for (const std::string& cmd : {"train" + m + " --data " + file + " --out " + o + " --steps 2",
                                   "train" + m + " --data " + w.data.string() + " --eval " + file + " --out " + o +
                                       " --steps 2",
                                   "eval" + m + " --data " + file}) {
      EXPECT_EQ(run(cmd, &(out = "")), 1) << cmd << "\n" << out;
      EXPECT_NE(out.find(file + ": " + why), std::string::npos) << cmd << "\n" << out;
      EXPECT_FALSE(fs::exists(fs::path(o) / "model.safetensors")) << cmd;  // no checkpoint
      EXPECT_FALSE(fs::exists(fs::path(o) / "config.json")) << cmd;
    }
  }
  // forward reads one batch: refused only when no sequence at all has a target.
  EXPECT_EQ(run("forward" + m + " --inputs " + no_labels + " --out " + o + ".safetensors", &out), 0) << out;
  std::vector<std::int32_t> none(ids.size(), -100);
  const std::string all_ignored = write("all-ignored.safetensors", nullptr, &none);
  EXPECT_EQ(run("forward" + m + " --inputs " + all_ignored + " --out " + o + "2.safetensors", &(out = "")), 1) << out;
  EXPECT_NE(out.find(all_ignored + ": nothing to predict"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(o + "2.safetensors"));
  std::vector<std::int32_t> zeros(ids.size(), 0);
  const std::string all_padding = write("all-padding.safetensors", &zeros, nullptr);
  EXPECT_EQ(run("forward" + m + " --inputs " + all_padding + " --out " + o + "2.safetensors", &(out = "")), 1) << out;
  EXPECT_NE(out.find(all_padding + ": nothing to predict"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(o + "2.safetensors"));
  // Sequences of one token: said so (the mask is not to blame).
  std::vector<std::int32_t> single{5, 6, 7};
  std::vector<TensorToWrite> t1{{"input_ids", DType::i32, {3, 1}, single.data(), {}}};
  write_safetensors(w.tmp / "t1.safetensors", t1);
  const std::string t1_file = (w.tmp / "t1.safetensors").string();
  EXPECT_EQ(run("forward" + m + " --inputs " + t1_file + " --out " + o + "3.safetensors", &(out = "")), 1) << out;
  EXPECT_NE(out.find("sequences of 1 token: a causal LM predicts each token from the ones before it"),
            std::string::npos)
      << out;
  EXPECT_EQ(run("eval" + m + " --data " + t1_file, &(out = "")), 1) << out;
  EXPECT_NE(out.find(t1_file + ": sequence 0 has nothing to predict: it has 1 token"), std::string::npos) << out;
  // eval's --max-new-tokens is for generated answers (squad, drop) only.
  EXPECT_EQ(run("eval" + m + " --data " + w.data.string() + " --max-new-tokens 7", &(out = "")), 2) << out;
  EXPECT_NE(out.find("--max-new-tokens is for squad and drop"), std::string::npos) << out;
  // So is train's, with such an --eval (adversarial pass 71: taken, recorded, and no effect).
  EXPECT_EQ(run("train" + m + " --data " + w.data.string() + " --eval " + w.data.string() +
                    " --max-new-tokens 7 --steps 2 --out " + o + "-mnt",
                &(out = "")),
            2)
      << out;
  EXPECT_NE(out.find("--max-new-tokens is for squad and drop (generated answers); the evaluation"), std::string::npos)
      << out;
  EXPECT_FALSE(fs::exists(o + "-mnt"));
}

// Note [Standard streams] (tools/cli.h). Output a command exists to print (tokenize, eval
// --json, plan --json) that cannot be written — a full disk, a closed stdout — exits 1 naming
// the standard output (it exited 0 with nothing written); a closed or full stderr never turns
// an exit into SIGABRT (134: fmt threw inside main's catch handler), and a closed stderr is
// never the number a run directory's lock file gets (the progress lines went into it).
TEST(Cli, LostStandardOutputIsAnErrorAndAClosedOrFullStderrIsNot) {
  Workspace w;
  const std::string tok = (fs::path(ZO2_TEST_TOKENIZERS_DIR) / "llama3").string();
  // In a subshell: run_command's own 2>&1 must not undo the redirections under test.
  auto sh = [](const std::string& args, const std::string& redirect, std::string* out) {
    out->clear();
    return test::run_command("(" + tune() + " " + args + " " + redirect + ")", out);
  };
  std::string out;
  for (const std::string& cmd : {"tokenize --tokenizer " + tok + " --text hello",
                                 "eval --model " + w.model.string() + " --data " + w.data.string() + " --json -q",
                                 std::string("plan --preset opt-125m --gpu-mem 1G --json")}) {
    SCOPED_TRACE(cmd);
    EXPECT_EQ(sh(cmd, ">/dev/full", &out), 1) << out;
    EXPECT_NE(out.find("zo2-tune: error: cannot write the standard output: No space left on device"), std::string::npos)
        << out;
    EXPECT_EQ(sh(cmd, ">&-", &out), 1) << out;
    EXPECT_NE(out.find("cannot write the standard output: it was closed"), std::string::npos) << out;
    EXPECT_EQ(sh(cmd, ">/dev/null", &out), 0) << out;
  }
  // A command that writes nothing to stdout does not need one.
  EXPECT_EQ(sh("init --preset opt-tiny --out " + (w.tmp / "i0").string() + " -q", ">&-", &out), 0) << out;
  // stderr closed or full: the work is done and the exit status is the command's.
  EXPECT_EQ(sh("init --preset opt-tiny --out " + (w.tmp / "i1").string(), "2>&-", &out), 0) << out;
  EXPECT_EQ(sh("init --preset opt-tiny --out " + (w.tmp / "i2").string(), "2>/dev/full", &out), 0) << out;
  EXPECT_TRUE(fs::exists(w.tmp / "i1" / "model.safetensors") && fs::exists(w.tmp / "i2" / "model.safetensors"));
  EXPECT_EQ(sh("eval --model " + (w.tmp / "none").string() + " --data " + w.data.string(), "2>/dev/full", &out), 1)
      << out;
  EXPECT_EQ(sh("eval --model " + w.model.string() + " --data " + w.data.string() + " --max-len x", "2>&-", &out), 2)
      << out;
  EXPECT_EQ(sh("forward --model " + w.model.string() + " --inputs " + w.data.string() + " --out " +
                   (w.tmp / "f.safetensors").string(),
               "2>/dev/full", &out),
            0)
      << out;
  const fs::path run_dir = w.tmp / "run";
  EXPECT_EQ(sh("train --model " + w.model.string() + " --data " + w.data.string() + " --out " + run_dir.string() +
                   " --steps 3 --batch-size 2 --log-every 1",
               "2>&- >&-", &out),
            0)
      << out;
  const std::string lock = read_file(run_dir / "zo2.lock");
  EXPECT_TRUE(!lock.empty() && lock.find_first_not_of("0123456789\n") == std::string::npos)
      << "the lock file holds its pid only: " << lock;
}

// Edge cases of names and values (the adversarial tester's report): a legal --out of 252
// bytes (the temp file beside it must still fit NAME_MAX), a model path that is a symbolic
// link loop (said as such, not "no such directory"), and ZO2_CPU_LINK_GBPS so small that a
// copy's time overflows the clock.
TEST(Cli, LongNamesSymlinkLoopsAndATinyEmulatedLinkAreHandled) {
  Workspace w;
  std::string out;
  const fs::path long_out = w.tmp / (std::string(240, 'a') + ".safetensors");  // 252 bytes
  EXPECT_EQ(run("synth-data --model " + w.model.string() + " --out " + long_out.string() + " --rows 4 --seq 8 -q", &out), 0)
      << out;
  EXPECT_TRUE(fs::exists(long_out));
  const fs::path long_fwd = w.tmp / (std::string(241, 'b') + ".safetensors");  // 253 bytes
  EXPECT_EQ(run("forward --model " + w.model.string() + " --inputs " + long_out.string() + " --out " + long_fwd.string() +
                    " -q",
                &out),
            0)
      << out;
  EXPECT_TRUE(fs::exists(long_fwd));
  for (const auto& e : fs::directory_iterator(w.tmp.path()))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << "a temp file is left: " << e.path();
  fs::create_symlink("loop", w.tmp / "loop");
  EXPECT_EQ(run("eval --model " + (w.tmp / "loop").string() + " --data " + w.data.string(), &out), 1) << out;
  EXPECT_NE(out.find("loop: cannot open the directory: Too many levels of symbolic links"), std::string::npos) << out;
  EXPECT_EQ(run("eval --model " + (w.tmp / "absent").string() + " --data " + w.data.string(), &out), 1) << out;
  EXPECT_NE(out.find("absent: no such directory"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(test::run_command("ZO2_CPU_LINK_GBPS=1e-300 " + tune() + " eval --model " + w.model.string() + " --data " +
                                  w.data.string(),
                              &out),
            2)
      << out;
  EXPECT_NE(out.find("ZO2_CPU_LINK_GBPS='1e-300': below the slowest emulated link"), std::string::npos) << out;
}

}  // namespace
}  // namespace zo2

namespace zo2 {
namespace {

// Adversarial pass 69: refusals and warnings that said something false or nothing at all.
TEST(Cli, Pass69HostMemoryEvalFlagsResumeWarningsAndFullRunsAsAdapters) {
  Workspace w;
  const std::string common = " --model " + w.model.string() + " --data " + w.data.string() +
                             " --steps 10 --batch-size 4 --lr 1e-3 -q";
  std::string out;
  // F5: --host-mem below the weights without --disk-dir says that --disk-dir is missing, not
  // a disk-tier floor the run does not have (600K trains).
  EXPECT_EQ(run("train" + common + " --offload all --gpu-mem 4M --host-mem 450K --out " + (w.tmp / "f5").string(),
                &out),
            2)
      << out;
  EXPECT_NE(out.find("--disk-dir, where the blocks that do not fit would go, is not set"), std::string::npos) << out;
  EXPECT_EQ(out.find("the host needs at least"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "f5" / "model.safetensors"));
  // plan has no --disk-dir: its preview places the blocks a disk tier would hold, and below
  // the disk tier's floor names that floor (a capacity error, exit 1), never a flag it lacks.
  out.clear();
  EXPECT_EQ(run("plan --model " + w.model.string() +
                    " --offload all --gpu-mem 4M --host-mem 200K --batch-size 4 --device cpu",
                &out),
            1)
      << out;
  EXPECT_NE(out.find("with a disk tier"), std::string::npos) << out;
  EXPECT_EQ(out.find("--disk-dir"), std::string::npos) << out;
  // --num-prefix with a LoRA flag and neither --prefix-tuning nor --lora: LoRA's flag needs
  // --lora (not "--prefix-tuning and --lora*", as neither was given).
  out.clear();
  EXPECT_EQ(run("train" + common + " --out " + (w.tmp / "np").string() + " --num-prefix 3 --lora-r 4", &out), 2) << out;
  EXPECT_NE(out.find("--lora-r, --lora-alpha and --lora-targets need --lora"), std::string::npos) << out;
  // F6: the evaluation's flags without --eval change nothing: refused (exit 2).
  for (const char* flag : {"--eval-every 5", "--num-eval 3", "--max-new-tokens 4"}) {
    out.clear();
    EXPECT_EQ(run("train" + common + " --out " + (w.tmp / "f6").string() + " " + flag, &out), 2) << out;
    EXPECT_NE(out.find(std::string(flag) + " is for the evaluation (--eval FILE), which is not set"), std::string::npos)
        << out;
  }
  EXPECT_FALSE(fs::exists(w.tmp / "f6" / "model.safetensors"));
  // --padding-side on fixed-length rows: warned.
  out.clear();
  ASSERT_EQ(run("train" + common + " --out " + (w.tmp / "u").string(), &out), 0) << out;
  out.clear();
  ASSERT_EQ(run("train" + common + " --out " + (w.tmp / "pad").string() + " --padding-side left", &out), 0) << out;
  EXPECT_NE(out.find("--padding-side left: " + w.data.string() + " holds fixed-length token rows"), std::string::npos)
      << out;
  EXPECT_EQ(read_file(w.tmp / "u" / "model.safetensors"), read_file(w.tmp / "pad" / "model.safetensors"));
  // F7: a resume with a byte-identical copy of the data, --max-len / --padding-side the
  // unpadded rows never use, and a warmup over before the step it goes on from: the same
  // weights, and no "the result will differ".
  const fs::path copy = w.tmp / "copy.safetensors";
  fs::copy_file(w.data, copy);
  const fs::path f7 = w.tmp / "f7";
  ASSERT_EQ(run("train" + common + " --out " + f7.string() + " --stop-at 5", &out), 0) << out;
  out.clear();
  ASSERT_EQ(run("train --resume " + f7.string() + " --data " + copy.string() +
                    " --padding-side left --max-len 40 --warmup-steps 3",
                &out),
            0)
      << out;
  EXPECT_EQ(out.find("the result will differ"), std::string::npos) << out;
  EXPECT_EQ(read_file(w.tmp / "u" / "model.safetensors"), read_file(f7 / "model.safetensors"));
  // Other data still warns.
  const fs::path other = w.tmp / "other.safetensors", f7b = w.tmp / "f7b";
  ASSERT_EQ(run("synth-data --model " + w.model.string() + " --out " + other.string() + " --rows 64 --seq 32 --seed 9 -q",
                &out),
            0)
      << out;
  ASSERT_EQ(run("train" + common + " --out " + f7b.string() + " --stop-at 5", &out), 0) << out;
  out.clear();
  ASSERT_EQ(run("train --resume " + f7b.string() + " --data " + other.string(), &out), 0) << out;
  EXPECT_NE(out.find("--data given as " + other.string() + " but the run trained on"), std::string::npos) << out;
  // F8: a full fine-tuning run as --adapter: said to be one, to pass as --model.
  for (const char* sub : {"eval", "generate"}) {
    out.clear();
    EXPECT_EQ(run(std::string(sub) + " --model " + w.model.string() + " --adapter " + (w.tmp / "u").string() +
                      " --data " + w.data.string() + " --batch-size 2 --max-new-tokens 2",
                  &out),
              2)
        << sub << ": " << out;
    EXPECT_NE(out.find("is a full fine-tuning checkpoint"), std::string::npos) << sub << ": " << out;
    EXPECT_NE(out.find("pass it as --model"), std::string::npos) << sub << ": " << out;
  }
}

// `train --resume RUN --disk-dir NEW` alone takes the run's --host-mem, as it takes the run's
// other flags (it was refused: "--disk-dir NEW: ... under --host-mem, which is not set").
TEST(Cli, AResumeGivenOnlyANewDiskDirKeepsTheRunsHostMem) {
  Workspace w;
  const std::string common = " --model " + w.model.string() + " --data " + w.data.string() +
                             " --steps 7 --batch-size 2 --lr 1e-3 --offload all --window 2 -q";
  std::string out;
  ASSERT_EQ(run("train" + common + " --out " + (w.tmp / "ram").string(), &out), 0) << out;
  for (const bool in_place : {true, false}) {
    const fs::path cut = w.tmp / (in_place ? "cut" : "cut2");
    ASSERT_EQ(run("train" + common + " --out " + cut.string() + " --host-mem 400K --disk-staging 1 --disk-dir " +
                      (w.tmp / (in_place ? "d1" : "d3")).string() + " --stop-at 3",
                  &out),
              0)
        << out;
    const fs::path dest = in_place ? cut : w.tmp / "elsewhere";
    const fs::path disk = w.tmp / (in_place ? "d2" : "d4");
    out.clear();
    ASSERT_EQ(run("train --resume " + cut.string() + (in_place ? "" : " --out " + dest.string()) + " --disk-dir " +
                      disk.string(),
                  &out),
              0)
        << out;
    EXPECT_TRUE(fs::exists(disk / "zo2-blocks.img")) << out;  // the run's --host-mem puts blocks there
    EXPECT_EQ(read_file(w.tmp / "ram" / "model.safetensors"), read_file(dest / "model.safetensors")) << in_place;
  }
}

}  // namespace
}  // namespace zo2
