// Training and evaluation data as zo2-tune reads it (DESIGN.md §2: tools/ holds the data
// and task readers). Every source becomes a list of examples; an example is one sequence
// (text, prompt + completion, pre-tokenized rows) or, for multiple-choice data, one
// sequence per candidate plus the index of the correct one.
//
// Sources:
//  - safetensors with input_ids [N, T] (+ attention_mask, labels): rows used as they are;
//  - JSONL, one object per line, all lines of one format:
//      {"text": ...}                                 loss on every token after the first;
//      {"prompt": ..., "completion": ...}            loss on the completion's tokens only;
//      {"prompt": ..., "options": [...], "label": i} MeZO's multiple choice: each candidate
//        is prompt + option, scored by the mean log-likelihood of the option's tokens,
//        trained as cross-entropy over candidates, evaluated by the accuracy of the argmax;
//  - MeZO's task presets reading the standard files (--task): sst2 (GLUE TSV), rte, boolq,
//    cb, copa (SuperGLUE JSONL), with MeZO's prompt templates (README "Data and tasks").
//
// Tokenization follows MeZO: a sequence is the tokenizer's special prefix (BOS) followed by
// encode(prompt + completion); the scored tokens are the last len(encode(prompt +
// completion)) − len(encode(prompt)) of them. Texts get encode_with_special().
//
// Truncation (--max-len, else the model's max_position_embeddings): text keeps its first
// tokens; prompt/completion and options drop prompt tokens after the special prefix (MeZO
// keeps the end), so the scored tokens stay whole; a sequence whose scored part alone does
// not fit is an error naming the line. Without --max-len, a sequence longer than the
// model's positions is an error naming the line.
//
// Order: training draws batches from the concatenation of per-epoch permutations of the
// examples (seeded; --no-shuffle: file order), so the batch of step i is a pure function
// of (seed, i) and --resume reproduces it exactly.
#pragma once
#include "models/batch.h"
#include "models/config.h"
#include "models/tokenizer.h"

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace zo2::cli {

enum class DataFormat { tokens, text, completion, options };
std::string_view data_format_name(DataFormat f);

// The task presets (names for --task), and "" (the format follows the file).
const std::vector<std::string>& task_names();

struct DataOptions {
  std::string task;             // "" or one of task_names()
  int max_len = 0;              // 0: the model's max_position_embeddings
  bool left_padding = false;    // pad on the left instead of the right
  std::int64_t sample = 0;      // >0: keep this many examples, drawn with `seed` (--num-train)
  std::uint64_t seed = 0;       // sampling and shuffling
  bool shuffle = true;
};

struct Example {
  // One sequence (text, completion, tokens) or one per candidate (options).
  struct Seq {
    std::vector<std::int32_t> ids;
    std::vector<std::int32_t> mask;    // empty: all ones
    std::vector<std::int32_t> labels;  // HF labels (unshifted; −100 = no loss), same length as ids
  };
  std::vector<Seq> seqs;
  int label = -1;         // options: index of the correct candidate
  std::int64_t line = 0;  // 1-based line (row for safetensors) in the source file
};

class Dataset {
 public:
  // `tokenizer` may be null for safetensors data; text data without one is an error.
  static Dataset load(const std::filesystem::path& file, const ModelConfig& config, const Tokenizer* tokenizer,
                      const DataOptions& options);

  DataFormat format() const { return format_; }
  const std::string& source() const { return source_; }
  std::int64_t size() const { return static_cast<std::int64_t>(examples_.size()); }
  const Example& example(std::int64_t i) const { return examples_[static_cast<std::size_t>(i)]; }
  int max_candidates() const { return max_candidates_; }
  int longest() const { return longest_; }  // tokens of the longest sequence
  std::int64_t truncated() const { return truncated_; }
  std::string describe() const;

  // Training batch of step `step`: `batch_size` examples from the shuffled stream.
  HostBatch train_batch(std::int64_t step, int batch_size) const;
  // Examples [first, first + count) in file order (clipped), for evaluation.
  HostBatch eval_batch(std::int64_t first, std::int64_t count) const;

 private:
  HostBatch collate(const std::vector<std::int64_t>& examples) const;
  std::int64_t stream_index(std::int64_t position) const;

  ModelConfig config_;
  DataFormat format_ = DataFormat::tokens;
  std::string source_;
  DataOptions options_;
  std::vector<Example> examples_;
  int max_candidates_ = 1;
  int longest_ = 0;
  std::int64_t truncated_ = 0;
  std::int32_t pad_id_ = 0;
};

// Evaluation of a session on a dataset: token-weighted mean loss (text, completion,
// tokens) or, for options, MeZO's candidate cross-entropy and the accuracy of the argmax.
struct EvalResult {
  double loss = 0;
  double accuracy = -1;  // options only
  std::int64_t examples = 0;
  std::int64_t tokens = 0;  // scored tokens
};

}  // namespace zo2::cli

namespace zo2 {
class Session;
}

namespace zo2::cli {
// Evaluates in batches of at most `batch_rows` sequences (an option example's candidates
// always share a batch).
EvalResult evaluate(Session& session, const Dataset& data, int batch_rows);
}  // namespace zo2::cli
