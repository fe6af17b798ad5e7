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
//    cb, copa, wsc, wic, multirc, record (SuperGLUE JSONL; MultiRC and ReCoRD nested as
//    SuperGLUE ships them, flattened as HF datasets does: one example per answer option /
//    per query), squad (SQuAD v1.1 JSON), drop (DROP JSON), with MeZO's prompt templates
//    (README "Data and tasks"). Classification and multiple-choice tasks are options data;
//    squad and drop are prompt/completion data (the completion is " {first gold answer}\n",
//    MeZO's training target) whose examples keep every gold answer for F1/EM. copa and
//    record train as MeZO's mezo.sh runs them (--train_as_classification False): the loss
//    of the correct option's tokens alone; the other option tasks train as cross-entropy
//    over the candidates; evaluation scores every candidate in all of them.
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

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace zo2::cli {

enum class DataFormat { tokens, text, completion, options };
std::string_view data_format_name(DataFormat f);

// The task presets (names for --task), and "" (the format follows the file).
const std::vector<std::string>& task_names();
// squad and drop: MeZO evaluates them by greedy generation (F1/EM of the generated answer).
bool task_is_generation(const std::string& task);

// Why `tok` cannot feed a model whose embedding has `vocab` rows ("" when it can): its
// text vocabulary is larger (Tokenizer::text_vocab_size), or a special id it adds (BOS,
// EOS) or pads with is outside [0, vocab). Special tokens above the embedding that it
// never adds are fine (Gemma 3's); the readers check the ids the text encodes to.
std::string tokenizer_misfit(const Tokenizer& tok, std::int64_t vocab);
// A token-id safetensors data file names only 'input_ids', 'attention_mask', 'labels' (and
// 'token_type_ids', ignored: the causal LMs have no token types); any other tensor — a typo
// such as 'attention_masks' — is an error naming the file, the tensor and the accepted names.
void check_token_tensor_names(const std::filesystem::path& file);
// copa and record: trained on the correct option's tokens alone (MeZO's mezo.sh).
bool task_trains_on_gold_only(const std::string& task);

struct DataOptions {
  std::string task;             // "" or one of task_names()
  int max_len = 0;              // 0: the model's max_position_embeddings
  bool left_padding = false;    // pad on the left instead of the right
  std::int64_t sample = 0;      // >0: keep this many examples, drawn with `seed` (--num-train)
  std::uint64_t seed = 0;       // sampling and shuffling
  bool shuffle = true;
  // squad, drop for `generate`: only the prompts (prompt_ids) are built, no scored sequences;
  // --max-len cuts each prompt to its last max_len tokens after the special prefix (as
  // generate cuts --prompt texts), and a prompt longer than the model is not refused here.
  bool prompts_only = false;
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
  std::int64_t line = 0;  // 1-based line (row for safetensors; question for squad/drop) in the source file
  std::vector<int> golds;               // record: every correct candidate (empty: just `label`)
  std::vector<std::string> answers;     // squad, drop, record: the gold answers' texts
  std::vector<std::string> candidates;  // record: the candidates' entities, in option order
  std::int64_t question = -1;           // multirc: the question this answer option belongs to
  std::vector<std::int32_t> prompt_ids;  // squad, drop: special prefix + encode(prompt), for generation
  std::vector<std::vector<std::string>> drop_golds;  // drop: the gold answers as drop_eval.py reads them
};

class Dataset {
 public:
  // `tokenizer` may be null for safetensors data; text data without one is an error.
  static Dataset load(const std::filesystem::path& file, const ModelConfig& config, const Tokenizer* tokenizer,
                      const DataOptions& options);

  DataFormat format() const { return format_; }
  const std::string& task() const { return options_.task; }
  const std::string& source() const { return source_; }
  std::int64_t size() const { return static_cast<std::int64_t>(examples_.size()); }
  const Example& example(std::int64_t i) const { return examples_[static_cast<std::size_t>(i)]; }
  int max_candidates() const { return max_candidates_; }
  int longest() const { return longest_; }  // tokens of the longest sequence
  // What a training batch (train_batch) holds per example: its rows — 1 for copa and record,
  // which train on the correct candidate alone, else max_candidates() — and the tokens of
  // the longest such row. Size training (batch capacity, sequence length) with these;
  // eval_batch holds every candidate (max_candidates(), longest()).
  int train_rows() const { return train_rows_; }
  int train_longest() const { return train_longest_; }
  int longest_prompt() const;                // squad, drop: tokens of the longest prompt_ids (else 0)
  // --max-len, else the model's max_position_embeddings: MeZO's max_length.
  int max_len() const;
  // squad, drop: example i's prompt as greedy decoding sees it — MeZO's encode_prompt with
  // max_new_tokens: cut to max_len() − max_new_tokens tokens, keeping the special prefix and
  // the end (the prompt's start goes). Throws when max_len() leaves no room for a prompt.
  std::vector<std::int32_t> generation_prompt(std::int64_t i, int max_new_tokens) const;
  // The longest generation_prompt (size a decoding session with it + max_new_tokens).
  int longest_prompt(int max_new_tokens) const;
  std::int32_t pad_id() const { return pad_id_; }
  std::int64_t truncated() const { return truncated_; }
  std::string describe() const;

  // Training batch of step `step`: `batch_size` examples from the shuffled stream.
  HostBatch train_batch(std::int64_t step, int batch_size) const;
  // Examples [first, first + count) in file order (clipped), for evaluation.
  HostBatch eval_batch(std::int64_t first, std::int64_t count) const;

 private:
  HostBatch collate(const std::vector<std::int64_t>& examples, bool gold_only = false) const;
  bool trains_on_gold_only() const;  // options data of copa or record
  // position = step·batch + j in 128 bits: a session may be at step 2^53 (the C API's and
  // Python's first_step), where step·batch passes 2^63 (adversarial pass 66: a resume at
  // step 2^53 − 10 with batch 2048 read outside the permutation).
  std::int64_t stream_index(__int128 position) const;

  ModelConfig config_;
  DataFormat format_ = DataFormat::tokens;
  std::string source_;
  DataOptions options_;
  std::vector<Example> examples_;
  int max_candidates_ = 1;
  int longest_ = 0;
  int train_rows_ = 1;
  int train_longest_ = 0;
  std::int64_t truncated_ = 0;
  std::int32_t pad_id_ = 0;
  std::size_t prefix_size_ = 0;  // the tokenizer's special prefix (kept when a prompt is cut)
};

// Evaluation of a session on a dataset: token-weighted mean loss (text, completion,
// tokens) or, for options, MeZO's candidate cross-entropy and the accuracy of the argmax.
struct EvalResult {
  double loss = 0;
  double accuracy = -1;  // options only
  std::int64_t examples = 0;
  std::int64_t tokens = 0;  // scored tokens
  // The task's metrics (tools/task_metrics.h), MeZO's first: accuracy for the option
  // tasks; multirc adds SuperGLUE's f1a and em, record its f1 and em of the chosen entity.
  std::vector<std::pair<std::string, double>> metrics;
  // squad, drop: why their metric (F1/EM of a greedy generation) is not in `metrics`.
  std::string note;
  // evaluate_generation: per example, the generated ids (stop token included) and text.
  std::vector<std::vector<std::int32_t>> generated;
  std::vector<std::string> predictions;
  // evaluate_generation: per example, the prompt ids decoded (Dataset::generation_prompt).
  std::vector<std::vector<std::int32_t>> prompts;
  // The `stop` predicate ended the evaluation early: the numbers above cover only part of
  // the data and are not the evaluation's (the caller reports none).
  bool interrupted = false;
  // evaluate_generation: the logits were not finite (NonFiniteLogits; `note` says where):
  // no metric is computed.
  bool non_finite = false;
};

}  // namespace zo2::cli

namespace zo2 {
class Session;
}

namespace zo2::cli {
// Evaluates in batches of at most `batch_rows` sequences (an option example's candidates
// always share a batch). `stop`, when given, is asked before each batch (with ranks it must
// be collective: every rank asks it as often); true ends the evaluation there, interrupted.
// `progress`, when given, is told the examples done (of data.size()) after each batch.
using EvalProgress = std::function<void(std::int64_t done, std::int64_t total, std::int64_t new_tokens)>;
// The examples evaluate() puts in one batch of at most `batch_rows` sequences (at least one).
inline std::int64_t eval_examples_per_batch(const Dataset& data, int batch_rows) {
  return std::max<std::int64_t>(1, batch_rows / std::max(1, data.max_candidates()));
}
EvalResult evaluate(Session& session, const Dataset& data, int batch_rows,
                    const std::function<bool()>& stop = {}, const EvalProgress& progress = {});

// squad, drop: MeZO's evaluation. Greedy decoding after each example's prompt (cut to
// --max-len (Dataset::max_len) − max_new_tokens, and to the session's max_seq −
// max_new_tokens, keeping the special prefix and the end, as MeZO's encode_prompt) of up
// to max_new_tokens tokens, stopping at the last id of encode("\n") or EOS (MeZO's
// eos_token "\n"); the text is decode() of the new ids without special tokens, stripped;
// metrics: MeZO's f1 then em against the gold answers (drop: then drop_eval.py's drop_f1,
// drop_em). Decoding is api/generate.h's: the session must be set up for generation
// (SessionConfig::generate, whose batch of prompts decodes together, with its KV cache).
// `stop` as evaluate's, asked after each decoding step; `progress` told the prompts done and
// the tokens generated after each decoding step.
EvalResult evaluate_generation(Session& session, const Dataset& data, const Tokenizer& tokenizer,
                               int max_new_tokens = 50, const std::function<bool()>& stop = {},
                               const EvalProgress& progress = {});
}  // namespace zo2::cli
