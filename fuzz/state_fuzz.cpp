// A run's zo2_state.json, the manifest of a published checkpoint, as a loader and --resume
// read it: open_checkpoint (api/run_dir.h) with checksums, through `current` of a run
// directory (state version 2: step, files with sizes and CRC-32s, seed log record), and the
// same file in a plain HF directory (version 1, written before run directories).
//
// Not reached here: the per-option checks `train --resume` makes next (StateReader in
// tools/cmd_train.cpp, which needs a whole training command around it).
//
// The fixed files the seeds' manifests describe: step-00000003/config.json and
// step-00000003/model.safetensors with the contents below (fuzz/make_corpus.py computes
// their sizes and CRC-32s), DIR/current -> step-00000003, DIR/seed_log.jsonl.
#include "api/run_dir.h"
#include "fuzz/fuzz_util.h"
#include "runtime/error.h"

#include <filesystem>

namespace fs = std::filesystem;

namespace {
fs::path g_run, g_step, g_plain;
constexpr std::string_view kConfig = R"({"model_type": "opt", "vocab_size": 512})";
constexpr std::string_view kModel = "not parsed here: only its size and CRC-32 are checked";
constexpr std::string_view kSeedLog =
    R"({"base_model":"m","first_step":0,"run_seed":42,"storage_dtype":"fp32","zo2_seed_log":1})"
    "\n";
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zo2::fuzz::silence_log();
  g_run = zo2::fuzz::scratch_dir() / "run";
  g_step = g_run / "step-00000003";
  g_plain = zo2::fuzz::scratch_dir() / "plain";
  for (const auto& d : {g_step, g_plain}) {
    fs::create_directories(d);
    zo2::fuzz::write_file(d / "config.json", kConfig);
    zo2::fuzz::write_file(d / "model.safetensors", kModel);
  }
  zo2::fuzz::write_file(g_run / "seed_log.jsonl", kSeedLog);
  zo2::fuzz::write_file(g_plain / "seed_log.jsonl", kSeedLog);
  fs::create_directory_symlink("step-00000003", g_run / "current");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  zo2::fuzz::write_file(g_step / zo2::kRunStateFile, bytes);
  zo2::fuzz::write_file(g_plain / zo2::kRunStateFile, bytes);
  for (const auto& dir : {g_run, g_plain}) {
    try {
      const auto ck = zo2::open_checkpoint(dir, /*verify_checksums=*/true);
      if (ck.state.is_null() || ck.dir.empty()) __builtin_trap();  // the file exists: a state or an error
      (void)ck.state.dump();
    } catch (const zo2::Error& e) {
      zo2::fuzz::rejected(e);
    }
  }
  return 0;
}
