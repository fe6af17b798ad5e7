// The one validation layer for options (api/options.h), seen from zo2-tune (issue 16: items
// 4, 5, 11, 12 and the misleading messages): every bad flag value exits 2 with a message
// naming the flag and the value as typed, before anything is read past config.json or
// written; a flag given twice says so; bad file contents exit 1 naming the file. The C API
// side of the same checks is in capi_errors_test.cpp, the config.json sizes in config_test.cpp.
#include "api/options.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>

namespace zo2 {
namespace {

namespace fs = std::filesystem;

int run(const std::string& args, std::string* out) {
  return test::run_command(test::zo2_tune_path().string() + " " + args, out);
}

// A tiny model and data, shared by the suite (made by the tool itself, as a user would).
class Options : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new test::TempDir();
    std::string out;
    ASSERT_EQ(run("init --preset opt-tiny --out " + model().string() + " --seed 1 -q", &out), 0) << out;
    ASSERT_EQ(run("synth-data --model " + model().string() + " --out " + data().string() + " --rows 8 --seq 16 -q", &out), 0)
        << out;
  }
  static void TearDownTestSuite() {
    delete tmp_;
    tmp_ = nullptr;
  }
  static fs::path model() { return *tmp_ / "model"; }
  static fs::path data() { return *tmp_ / "data.safetensors"; }
  static fs::path out_dir() { return *tmp_ / "out"; }
  static std::string train(const std::string& extra) {
    return "train --model " + model().string() + " --data " + data().string() + " --out " + out_dir().string() + " " +
           extra;
  }

  // Runs args, expects exit `rc`, every piece in the message, and --out not created.
  static void expect_refused(const std::string& args, int rc, const std::vector<std::string>& pieces) {
    fs::remove_all(out_dir());
    std::string out;
    EXPECT_EQ(run(args, &out), rc) << args << "\n" << out;
    for (const auto& p : pieces) EXPECT_NE(out.find(p), std::string::npos) << "'" << p << "' in: " << out;
    EXPECT_LT(out.size(), 400u) << "a short message, not a 300-digit range: " << out;
    EXPECT_FALSE(fs::exists(out_dir())) << args << ": --out was touched";
  }

  static test::TempDir* tmp_;
};
test::TempDir* Options::tmp_ = nullptr;

// #4: inf, 1e309 (inf as a double) and NaN were accepted and trained into non-finite
// weights; eps inf/1e30 skipped every step; 1e39 is finite as a double and inf as the float
// the kernels take.
TEST_F(Options, NonFiniteAndOutOfRangeTrainingValuesAreUsageErrorsNamingFlagAndValue) {
  for (const auto& [flag, value] : std::vector<std::pair<std::string, std::string>>{
           {"--lr", "inf"}, {"--lr", "1e309"}, {"--lr", "1e39"}, {"--lr", "-1e-3"}, {"--lr", "nan"},
           {"--learning_rate", "1e309"}, {"--weight-decay", "nan"}, {"--weight-decay", "-0.1"},
           {"--weight-decay", "inf"}, {"--eps", "inf"}, {"--eps", "1e30"}, {"--eps", "2"}, {"--eps", "0"},
           {"--eps", "1e-50"}, {"--eps", "-1e-3"}}) {
    // The message names the canonical flag (aliases included) and the value as typed.
    const std::string canonical = flag == "--learning_rate" ? "--lr" : flag;
    expect_refused(train(flag + " " + value), 2, {canonical + " " + value});
  }
  expect_refused(train("--lr 1e309"), 2, {"double range"});
  expect_refused(train("--lr 1e39"), 2, {"float"});
  expect_refused(train("--eps 1e30"), 2, {"(0, 1]"});
}

// The integer flags: each named with its value and its range, and never CLI11's "Value 0
// not in range 0.000000 to 1797693134862315708145274237317043567980705675258449965989174...".
TEST_F(Options, IntegerFlagsOutOfRangeNameTheFlagValueAndRange) {
  for (const auto& [args, pieces] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"--steps 0", {"--steps 0", "[1, 2^53]"}},
           {"--batch-size 1000000000", {"--batch-size 1000000000", "[1, 2^20]"}},
           {"--batch-size 0", {"--batch-size 0"}},
           {"--threads -1", {"--threads -1", "[0, 2^16]"}},
           {"--warmup-steps -3", {"--warmup-steps -3"}},
           {"--save-every -1", {"--save-every -1"}},
           {"--eval-every -5", {"--eval-every -5"}},
           {"--log-every 0", {"--log-every 0"}},
           {"--stop-at 0", {"--stop-at 0"}},
           {"--num-train 0", {"--num-train 0"}},
           {"--num-eval -2", {"--num-eval -2"}},
           {"--max-len 0", {"--max-len 0"}},
           {"--window 0", {"--window 0", "[1, 64]"}},
           {"--window 65", {"--window 65"}}}) {
    expect_refused(train(args), 2, pieces);
  }
  // Beyond the integer type: CLI11's conversion error, still naming the flag and value.
  expect_refused(train("--batch-size 3000000000"), 2, {"--batch-size", "3000000000"});
}

// CLI11 says "--batch-size: At Most 1 required but received 2" for a flag given twice,
// which reads as if 2 were a bad value (this is what a script appending
// `--batch-size 1000000000` to a command with `--batch-size 2` saw).
TEST_F(Options, AFlagGivenTwiceIsNamedWithBothValues) {
  expect_refused(train("--batch-size 2 --batch-size 1000000000"), 2, {"--batch-size was given 2 times (2, 1000000000)"});
  std::string out;
  EXPECT_EQ(run(train("--steps 3 --max_steps 4"), &out), 2) << out;
  EXPECT_NE(out.find("--steps was given"), std::string::npos) << out;
  EXPECT_EQ(out.find("At Most"), std::string::npos) << out;
}

// #5: --shard-size 0 failed only at the save after every step had run; the sizes and the
// save dtype are checked first, by every subcommand that takes them.
TEST_F(Options, SizesAndTheSaveDtypeAreCheckedBeforeAnyWork) {
  expect_refused(train("--shard-size 0"), 2, {"--shard-size 0"});
  expect_refused(train("--shard-size lots"), 2, {"--shard-size", "lots"});
  expect_refused(train("--gpu-mem 0"), 2, {"--gpu-mem 0"});
  expect_refused(train("--gpu-mem 12Q"), 2, {"--gpu-mem", "12Q"});
  expect_refused(train("--save-dtype fp8"), 2, {"--save-dtype", "fp8"});
  expect_refused("init --preset opt-tiny --out " + out_dir().string() + " --shard-size 0", 2, {"--shard-size 0"});
  // replay: before the seed log is read (it does not exist here) and long before its save.
  expect_refused("replay --model " + model().string() + " --seed-log " + (*tmp_ / "none.jsonl").string() +
                     " --out " + out_dir().string() + " --shard-size 0",
                 2, {"--shard-size 0"});
  expect_refused("replay --model " + model().string() + " --seed-log " + (*tmp_ / "none.jsonl").string() +
                     " --out " + out_dir().string() + " --until-step -4",
                 2, {"--until-step -4"});
  expect_refused("plan --model " + model().string() + " --gpu-mem 0", 2, {"--gpu-mem 0"});
  expect_refused("plan --model " + model().string() + " --gpu-mem 1G --batch-size 0", 2, {"--batch-size 0"});
  expect_refused("plan --model " + model().string() + " --gpu-mem 1G --seq-len 65", 2,
                 {"--seq-len 65", "max_position_embeddings"});
}

// #12: bf16/fp16 compute on the CPU backend was accepted and failed mid-step ("cpu add: y
// is bf16"); now refused with the other flags, by train, eval, forward, replay and plan.
TEST_F(Options, ComputeDtypesTheDeviceDoesNotRunAreRefusedUpFront) {
  expect_refused(train("--compute-dtype bf16"), 2, {"--compute-dtype bf16", "CPU backend", "--device cpu"});
  expect_refused(train("--compute-dtype fp16 --device cpu"), 2, {"--compute-dtype fp16"});
  expect_refused("eval --model " + model().string() + " --data " + data().string() + " --compute-dtype bf16", 2,
                 {"--compute-dtype bf16"});
  expect_refused("forward --model " + model().string() + " --inputs " + data().string() + " --out " +
                     (out_dir() / "f.safetensors").string() + " --compute-dtype fp16",
                 2, {"--compute-dtype fp16"});
  expect_refused("plan --model " + model().string() + " --gpu-mem 1G --device cpu --compute-dtype bf16", 2,
                 {"--compute-dtype bf16"});
  // fp32 compute with narrow storage is what the CPU backend runs: still accepted.
  std::string out;
  fs::remove_all(out_dir());
  EXPECT_EQ(run(train("--steps 2 --storage-dtype bf16 --compute-dtype fp32 -q"), &out), 0) << out;
}

// The same ranges, called directly, as both callers name them.
TEST(OptionChecks, NamesFollowTheCaller) {
  const Error cli = test::error_of([] { check_real(Opt::eps, 5.0, OptionSource::cli); });
  EXPECT_EQ(cli.kind(), ErrorKind::invalid_argument);
  EXPECT_EQ(std::string(cli.what()).rfind("--eps 5", 0), 0u) << cli.what();
  const Error c = test::error_of([] { check_integer(Opt::batch_size, 0, OptionSource::c_api); });
  EXPECT_EQ(std::string(c.what()).rfind("max_seqs 0", 0), 0u) << c.what();
  // The CPU backend's compute dtype: a usage error on the command line, unsupported in C.
  SessionConfig sc;
  sc.device = "cpu";
  sc.compute = DType::bf16;
  EXPECT_EQ(test::error_of([&] { check_session_options(sc, OptionSource::cli); }).kind(), ErrorKind::invalid_argument);
  EXPECT_EQ(test::error_of([&] { check_session_options(sc, OptionSource::c_api); }).kind(), ErrorKind::unsupported);
  sc.compute = DType::f32;
  EXPECT_NO_THROW(check_session_options(sc, OptionSource::cli));
  EXPECT_NO_THROW(check_real(Opt::eps, 1.0, OptionSource::cli));
  EXPECT_NO_THROW(check_real(Opt::lr, 0.0, OptionSource::cli));
  EXPECT_NO_THROW(check_integer(Opt::max_len, 0, OptionSource::c_api));  // 0 = max_position_embeddings
  EXPECT_THROW(check_integer(Opt::max_len, 0, OptionSource::cli), Error);
}

// #11 through the CLI: a config.json that does not fit is refused before the data is read
// and before --out is created, naming config.json, the field and the value (exit 1: the
// file's contents are wrong, not a flag).
TEST_F(Options, ConfigSizesAndHostMemoryAreCheckedBeforeAnythingIsAllocatedOrWritten) {
  const fs::path bad = *tmp_ / "bad";
  auto with = [&](const std::string& field, std::int64_t value) {
    fs::remove_all(bad);
    fs::create_directories(bad);
    fs::copy_file(model() / "model.safetensors", bad / "model.safetensors");
    std::ifstream in(model() / "config.json");
    nlohmann::json j = nlohmann::json::parse(in);
    j[field] = value;
    std::ofstream(bad / "config.json") << j.dump();
  };
  const std::string cmd = "train --model " + bad.string() + " --data " + data().string() + " --out " + out_dir().string();
  with("num_hidden_layers", (std::int64_t{1} << 31) - 1);
  expect_refused(cmd, 1, {"config.json", "num_hidden_layers 2147483647"});
  with("hidden_size", std::int64_t{1} << 40);
  expect_refused(cmd, 1, {"config.json", "hidden_size 1099511627776"});
  with("max_position_embeddings", std::int64_t{1} << 40);
  expect_refused(cmd, 1, {"config.json", "max_position_embeddings 1099511627776"});
  // Within range, but more layers than the checkpoint holds: the headers answer before the
  // host images are allocated (before, 60000 layers of opt-tiny allocated 12 GB and read
  // weights for 52 s first; under a 1 GiB host budget the memory check answered instead).
  with("num_hidden_layers", 60000);
  {
    const test::ScopedEnv budget("ZO2_HOST_MEM_AVAILABLE", "64G");
    expect_refused(cmd, 1, {"model.decoder.layers.2.", "missing from the checkpoint"});
  }
  // A model the host cannot hold: refused before --out exists (it used to be created first).
  const test::ScopedEnv budget("ZO2_HOST_MEM_AVAILABLE", "64K");
  expect_refused("train --model " + model().string() + " --data " + data().string() + " --out " + out_dir().string(), 1,
                 {"host memory", "ZO2_HOST_MEM_AVAILABLE"});
}

// The exit-status rule (README, zo2-tune): a bad flag value exits 2, bad file contents
// exit 1 naming the file.
TEST_F(Options, BadFileContentsExitOneNamingTheFile) {
  const fs::path big = *tmp_ / "big.safetensors";
  std::string out;
  ASSERT_EQ(run("synth-data --vocab 5000 --alphabet 100 --out " + big.string() + " --rows 4 --seq 8 -q", &out), 0);
  expect_refused(train("").replace(train("").find(data().string()), data().string().size(), big.string()), 1,
                 {big.string(), "outside the model's vocabulary"});
  expect_refused("forward --model " + model().string() + " --inputs " + big.string() + " --out " +
                     (out_dir() / "f.safetensors").string(),
                 1, {big.string(), "vocabulary"});
  const fs::path longer = *tmp_ / "long.safetensors";
  ASSERT_EQ(run("synth-data --model " + model().string() + " --out " + longer.string() + " --rows 2 --seq 100 -q", &out), 0);
  expect_refused("eval --model " + model().string() + " --data " + longer.string(), 1,
                 {longer.string(), "max_position_embeddings"});
  // ... while a flag that does not fit the file is the flag's fault.
  expect_refused("eval --model " + model().string() + " --data " + longer.string() + " --max-len 100", 2, {"--max-len 100"});
}

}  // namespace
}  // namespace zo2

namespace zo2 {
namespace {

// The message of `f`'s invalid_argument, or "" when it returns.
template <class F>
std::string refusal(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::invalid_argument) << e.what();
    return e.what();
  }
  return "";
}

// The combination checks are one layer for both callers (adversarial pass 69): the same
// verdicts, each naming the options as its caller spells them.
TEST(OptionsCombinations, TheSameVerdictsNameTheFlagOrTheField) {
  PeftConfig prefix2;
  prefix2.prefix = 2;
  PeftConfig lora2;
  lora2.lora = true;
  lora2.r = 2;
  // An adapter decides its kind and shape.
  AdapterOptions a;
  a.adapter = "A";
  a.adapter_shape = prefix2;
  a.lora = true;
  a.r = 8;
  a.alpha = 16.0f;
  a.targets = "q_proj,v_proj";
  EXPECT_EQ(refusal([&] { check_adapter_options(a, OptionSource::cli); }),
            "--lora-r/--lora-alpha/--lora-targets ask for LoRA r 8, alpha 16 on q_proj, v_proj, but the adapter A is "
            "prefix tuning, 2 tokens per layer");
  AdapterOptions c;
  c.adapter = "A";
  c.adapter_shape = lora2;
  c.lora = true;
  c.r = 4;
  EXPECT_NE(refusal([&] { check_adapter_options(c, OptionSource::c_api); }).find("lora_r ask for LoRA r 4"),
            std::string::npos);
  c.r = 2;
  EXPECT_EQ(refusal([&] { check_adapter_options(c, OptionSource::c_api); }), "");  // the adapter's own shape
  c.prefix = true;
  c.prefix_tokens = 3;
  EXPECT_NE(refusal([&] { check_adapter_options(c, OptionSource::c_api); }).find("prefix_tokens 3 with adapter_path A"),
            std::string::npos);
  EXPECT_EQ(refusal([&] { check_adapter_options(c, OptionSource::cli); }),
            "--adapter A is LoRA r 2, alpha 16 on q_proj, v_proj: its shape comes from its adapter_config.json");
  // Prefix tuning with LoRA's fields; LoRA's fields without LoRA.
  AdapterOptions p;
  p.prefix = true;
  p.prefix_tokens = 2;
  p.alpha = 4.0f;
  EXPECT_EQ(refusal([&] { check_adapter_options(p, OptionSource::cli); }),
            "--prefix-tuning and --lora*: choose one kind of adapter");
  EXPECT_NE(refusal([&] { check_adapter_options(p, OptionSource::c_api); })
                .find("prefix_tokens and lora_alpha: choose one kind of adapter"),
            std::string::npos);
  p.prefix = false;
  EXPECT_EQ(refusal([&] { check_adapter_options(p, OptionSource::cli); }),
            "--lora-r, --lora-alpha and --lora-targets need --lora");
  EXPECT_NE(refusal([&] { check_adapter_options(p, OptionSource::c_api); }).find("lora_alpha 4: LoRA's, which needs lora_r > 0"),
            std::string::npos);
  // save_dtype on an adapter run; not given, or fp32, or full tuning: nothing to say.
  EXPECT_NE(refusal([&] { check_save_dtype_option(DType::bf16, true, lora2, OptionSource::cli); })
                .find("--save-dtype bf16: an adapter run (LoRA r 2"),
            std::string::npos);
  EXPECT_NE(refusal([&] { check_save_dtype_option(DType::bf16, true, prefix2, OptionSource::c_api); })
                .find("save_dtype bf16: an adapter run"),
            std::string::npos);
  EXPECT_EQ(refusal([&] { check_save_dtype_option(DType::bf16, true, PeftConfig{}, OptionSource::c_api); }), "");
  EXPECT_EQ(refusal([&] { check_save_dtype_option(DType::bf16, false, lora2, OptionSource::cli); }), "");
  // The disk tier's, the seed log's and generation's.
  SessionConfig sc;
  sc.disk_lag = 4;
  EXPECT_EQ(refusal([&] { check_disk_tier_options(sc, true, false, OptionSource::cli); }),
            "--disk-lag 4 is for the disk tier (--host-mem SIZE --disk-dir DIR), which is not set");
  EXPECT_EQ(refusal([&] { check_disk_tier_options(sc, true, false, OptionSource::c_api); }),
            "disk_lag 4 is for the disk tier (host_mem_bytes and disk_dir), which is not set");
  sc.host_mem = 1 << 20;
  EXPECT_EQ(refusal([&] { check_disk_tier_options(sc, true, true, OptionSource::c_api); }), "");
  EXPECT_NE(refusal([&] { check_seed_log_options(true, false, OptionSource::c_api); }).find("seed_log_path is NULL"),
            std::string::npos);
  EXPECT_EQ(refusal([&] { check_seed_log_options(true, true, OptionSource::c_api); }), "");
  EXPECT_NE(refusal([&] { check_generation_options(false, true, "host", false, 0, OptionSource::c_api); })
                .find("kv_cache host"),
            std::string::npos);
  EXPECT_NE(refusal([&] { check_generation_options(false, false, "auto", true, 8, OptionSource::cli); })
                .find("--prefill-chunk 8"),
            std::string::npos);
  EXPECT_EQ(refusal([&] { check_generation_options(true, true, "host", true, 8, OptionSource::c_api); }), "");
}

}  // namespace
}  // namespace zo2
