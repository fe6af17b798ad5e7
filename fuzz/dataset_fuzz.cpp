// Training/evaluation data as zo2-tune reads it (tools/dataset.cpp): JSONL (text,
// prompt/completion, multiple choice), every --task preset's file (SST-2 TSV; RTE, BoolQ,
// CB, COPA, WSC, WiC, MultiRC, ReCoRD SuperGLUE JSONL; SQuAD v1.1 and DROP JSON) and
// token-id safetensors; then batches are cut from what loaded and the task metrics score
// the gold answers against each other.
//
// Input: two selector bytes, then the file.
//   byte 0, modulo 13, the reader: 0 JSONL; --task 1 sst2, 2 rte, 3 boolq, 4 cb, 5 copa,
//     6 wsc, 7 wic, 8 multirc, 9 record, 10 squad, 11 drop; 12 .safetensors token ids;
//   byte 1: bit 0 left padding; bits 1-2 --max-len none (the model's 512 positions), 16, 64
//     or 160; bits 3-4 --num-train 0, 1, 2 or 5; bit 5 no shuffling; bits 6-7 unused.
// The tokenizer is the trimmed GPT-2 one in fuzz/data/gpt2-trim. ZO2_FUZZ_DATASET_READERS=A-B
// (e.g. 6-11) skips every input whose reader is outside A..B, to spend a run on some readers
// (an input means the same with and without it, so the corpus it grows stays valid).
//
// Beyond what every target counts (fuzz_util.h), a finding here is a refusal of kind
// internal (only a bug throws it) and a loaded dataset that breaks its own promises: a batch
// that cannot be cut (an error after a successful load), or a batch larger than the sizing
// the scheduler is given (train_rows/train_longest for training batches,
// max_candidates/longest for evaluation ones).
#include "fuzz/fuzz_util.h"
#include "models/presets.h"
#include "models/tokenizer.h"
#include "runtime/error.h"
#include "tools/dataset.h"
#include "tools/task_metrics.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace {
std::unique_ptr<zo2::Tokenizer> g_tok;
zo2::ModelConfig g_config;

void check(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "dataset fuzz: broken promise: %s\n", what);
  std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zo2::fuzz::silence_log();
  g_tok = zo2::Tokenizer::from_dir(zo2::fuzz::source_dir() / "data/gpt2-trim");
  g_config = zo2::find_preset("opt-tiny").config;
  g_config.vocab_size = 1024;  // >= the trimmed tokenizer's 957 ids
  g_config.max_positions = 512;  // room for the task fixtures' passages
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  static const char* const kTasks[] = {"",   "sst2",    "rte",    "boolq", "cb",    "copa", "wsc",
                                       "wic", "multirc", "record", "squad", "drop", ""};
  static const char* const kNames[] = {"data.jsonl",  "train.tsv",   "train.jsonl", "train.jsonl", "train.jsonl",
                                       "train.jsonl", "train.jsonl", "train.jsonl", "train.jsonl", "train.jsonl",
                                       "train.json",  "train.json",  "data.safetensors"};
  constexpr int kReaders = sizeof kTasks / sizeof kTasks[0];
  static_assert(kReaders == sizeof kNames / sizeof kNames[0]);
  const int kind = data[0] % kReaders;
  static const std::pair<int, int> kOnly = [] {
    int a = 0, b = kReaders - 1;
    if (const char* env = std::getenv("ZO2_FUZZ_DATASET_READERS"); env && std::sscanf(env, "%d-%d", &a, &b) != 2) {
      std::fprintf(stderr, "ZO2_FUZZ_DATASET_READERS=%s: expected A-B\n", env);
      std::abort();
    }
    return std::pair{a, b};
  }();
  if (kind < kOnly.first || kind > kOnly.second) return 0;
  const std::uint8_t flags = data[1];
  zo2::cli::DataOptions opt;
  opt.task = kTasks[kind];
  opt.left_padding = (flags & 1) != 0;
  static const int kMaxLen[] = {0, 16, 64, 160};
  opt.max_len = kMaxLen[(flags >> 1) & 3];
  static const int kSample[] = {0, 1, 2, 5};
  opt.sample = kSample[(flags >> 3) & 3];
  opt.seed = 1234;
  opt.shuffle = (flags & 32) == 0;
  const auto file = zo2::fuzz::scratch_file(kNames[kind], {reinterpret_cast<const char*>(data) + 2, size - 2});
  std::optional<zo2::cli::Dataset> loaded;
  try {
    loaded.emplace(zo2::cli::Dataset::load(file, g_config, g_tok.get(), opt));
  } catch (const zo2::Error& e) {
    if (e.kind() == zo2::ErrorKind::internal) {  // a bug, e.g. a template whose answer does not extend its prompt
      std::fprintf(stderr, "dataset fuzz: an internal error: %s\n", e.what());
      std::abort();
    }
    zo2::fuzz::rejected(e);
    return 0;
  }
  const auto& d = *loaded;
  (void)d.describe();
  check(d.size() > 0, "no examples");
  check(d.train_rows() >= 1 && d.train_rows() <= d.max_candidates(), "train_rows within [1, max_candidates]");
  check(d.train_longest() >= 1 && d.train_longest() <= d.longest(), "train_longest within [1, longest]");
  check(d.longest() <= (opt.max_len > 0 ? opt.max_len : g_config.max_positions), "longest within the limit");
  try {
    std::int64_t sum = 0;
    constexpr int kBatch = 3;
    for (std::int64_t step : {0, 1, 7}) {
      const auto b = d.train_batch(step, kBatch);
      check(b.batch <= kBatch * d.train_rows(), "a training batch within batch_size * train_rows");
      check(b.seq <= d.train_longest(), "a training batch within train_longest");
      sum += b.tokens();
    }
    for (std::int64_t first : {std::int64_t{0}, d.size() - 1}) {
      const auto b = d.eval_batch(first, 4);
      check(b.batch <= 4 * d.max_candidates(), "an evaluation batch within count * max_candidates");
      check(b.seq <= d.longest(), "an evaluation batch within longest");
      sum += b.tokens();
    }
    sum += d.longest_prompt();
    // The metrics of evaluate()/evaluate_generation() over the examples' own gold texts.
    namespace m = zo2::cli::metrics;
    std::vector<int> predicted, gold;
    std::vector<std::int64_t> question;
    double score = 0;
    for (std::int64_t i = 0; i < d.size(); ++i) {
      const auto& e = d.example(i);
      if (!e.answers.empty()) {
        const std::string& guess = e.candidates.empty() ? e.answers.back() : e.candidates.front();
        score += m::qa_f1(guess, e.answers) + m::qa_em(guess, e.answers);
      }
      if (!e.drop_golds.empty()) score += m::drop_question(e.answers.empty() ? "" : e.answers[0], e.drop_golds).f1;
      if (e.question >= 0) {
        predicted.push_back(static_cast<int>(i % 2));
        gold.push_back(e.label);
        question.push_back(e.question);
      }
    }
    score += m::multirc_scores(predicted, gold, question).em;
    if (sum == 0x5eed && score < 0) return 0;
  } catch (const zo2::Error& e) {
    std::fprintf(stderr, "dataset fuzz: a batch of a loaded dataset failed: %s\n", e.what());
    std::abort();
  }
  return 0;
}
