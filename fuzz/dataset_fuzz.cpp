// Training/evaluation data as zo2-tune reads it (tools/dataset.cpp): JSONL (text,
// prompt/completion, multiple choice), the task presets' files (SST-2 TSV, RTE, BoolQ, CB,
// COPA JSONL) and token-id safetensors; then batches are cut from what loaded.
//
// Input: one selector byte, then the file. Selector bits 0-2: the reader (0, 1: JSONL;
// 2: --task sst2; 3: rte; 4: boolq; 5: cb; 6: copa; 7: .safetensors token ids); bit 3: left
// padding; bit 4: --max-len 16 (else the model's 64 positions); bits 5-6: --num-train 0, 1,
// 2 or 5; bit 7: no shuffling. The tokenizer is the trimmed GPT-2 one in fuzz/data/gpt2-trim.
#include "fuzz/fuzz_util.h"
#include "models/presets.h"
#include "models/tokenizer.h"
#include "runtime/error.h"
#include "tools/dataset.h"

#include <memory>

namespace {
std::unique_ptr<zo2::Tokenizer> g_tok;
zo2::ModelConfig g_config;
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zo2::fuzz::silence_log();
  g_tok = zo2::Tokenizer::from_dir(zo2::fuzz::source_dir() / "data/gpt2-trim");
  g_config = zo2::find_preset("opt-tiny").config;
  g_config.vocab_size = 1024;  // >= the trimmed tokenizer's 957 ids
  g_config.max_positions = 64;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t sel = data[0];
  static const char* const kTasks[] = {"", "", "sst2", "rte", "boolq", "cb", "copa", ""};
  static const char* const kNames[] = {"data.jsonl", "data.jsonl", "train.tsv", "train.jsonl",
                                       "train.jsonl", "train.jsonl", "train.jsonl", "data.safetensors"};
  const int kind = sel & 7;
  zo2::cli::DataOptions opt;
  opt.task = kTasks[kind];
  opt.left_padding = (sel & 8) != 0;
  opt.max_len = (sel & 16) ? 16 : 0;
  static const int kSample[] = {0, 1, 2, 5};
  opt.sample = kSample[(sel >> 5) & 3];
  opt.seed = 1234;
  opt.shuffle = (sel & 128) == 0;
  const auto file = zo2::fuzz::scratch_file(kNames[kind], {reinterpret_cast<const char*>(data) + 1, size - 1});
  try {
    const auto d = zo2::cli::Dataset::load(file, g_config, g_tok.get(), opt);
    (void)d.describe();
    std::int64_t sum = 0;
    for (std::int64_t step : {0, 1, 7}) sum += d.train_batch(step, 3).tokens();
    sum += d.eval_batch(0, 4).tokens() + d.eval_batch(d.size() - 1, 4).tokens();
    if (sum == 0x5eed) return 0;
  } catch (const zo2::Error& e) {
    zo2::fuzz::rejected(e);
  }
  return 0;
}
