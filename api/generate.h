// Text generation through the streaming runtime (issue 20): a batch of prompts decodes
// together, each decoding step streams the blocks once for the whole batch, and the KV
// cache lives where the planner put it (offload/planner.h, KvPlace; models/graph.h, Note
// [KV cache]). zo2-tune generate, eval --task squad|drop and the C API's zo2_generate all
// run this one loop.
//
// Note [Generation batches]
//   Prompts are left-padded to the longest of the batch (the padding masked), so every
//   sequence's next token comes from the batch's last row and the cache rows of all
//   sequences advance together. Positions count each sequence's own tokens (OPT: row 2 + i
//   of its position table, as transformers computes them from the attention mask; LLaMA:
//   i), so a prompt decodes to the same tokens whatever it is batched with, up to the last
//   bits of the arithmetic. A sequence that has stopped keeps a place in the batch (its
//   rows are computed and ignored) until every sequence of the batch has stopped or reached
//   max_new_tokens; prompts beyond the session's generation batch run in further batches.
//   Sampling draws each token's uniform from Philox (seed, prompt index, token index), so
//   a sampled run repeats exactly for a seed, and a prompt's text does not depend on how
//   the list is split into batches.
#pragma once
#include "api/options.h"
#include "api/session.h"

#include <cstdint>
#include <filesystem>
#include <functional>
#include <vector>

namespace zo2 {

struct GenerateProgress {
  std::int64_t prompts_done = 0, prompts = 0;
  std::int64_t new_tokens = 0;  // generated so far (tokens of stopped sequences not counted)
  double seconds = 0;
};

struct GenerateOptions {
  int max_new_tokens = 32;
  // Greedy: the argmax (the first of equal logits). Otherwise tokens are sampled from
  // softmax(logits / temperature), restricted to the smallest set of most likely tokens
  // whose probabilities reach top_p (nucleus sampling).
  bool greedy = true;
  float temperature = 1.0f;
  float top_p = 1.0f;
  std::uint64_t seed = 0;
  // A generated id in stop_ids ends its sequence (the id is kept in its tokens).
  std::vector<std::int32_t> stop_ids;
  // Called after each new token of prompt k with all the tokens it has generated; true ends
  // the sequence there (zo2-tune's --stop STR decodes the tokens and looks for STR).
  std::function<bool(std::size_t k, const std::vector<std::int32_t>& tokens)> stop;
  std::int32_t pad_id = 0;  // the id of left padding (masked; any valid id)
  std::function<void(const GenerateProgress&)> progress;  // after each decoding step
};

struct Generation {
  std::vector<std::int32_t> tokens;  // the new tokens (a stop id included)
  bool stopped = false;              // ended by a stop id or the stop callback (else the length)
};

struct GenerateStats {
  std::int64_t new_tokens = 0;    // tokens generated (each sequence's until it stopped)
  std::int64_t decode_steps = 0;  // forward passes over the blocks (each prefill piece counted)
  double seconds = 0;
};

// Note [A model's end-of-sequence ids]: transformers' generate stops at its generation
// config's eos_token_id, read from the model's generation_config.json (else config.json):
// an id or a list — Llama-3-Instruct's [128001, 128008, 128009] (<|eot_id|> ends a turn),
// Gemma 3's [1, 106] (<end_of_turn>). zo2-tune generate and the Python generate stop at
// these as well as at the tokenizer's end-of-sequence token (unless told to ignore them).
// Ids at or beyond `vocab_size` are left out (no logit can pick them). A file that is not
// JSON, or an eos_token_id that is not a whole id or a list of them, is Error(format)
// naming the file and the field.
std::vector<std::int32_t> model_eos_ids(const std::filesystem::path& model_dir, std::int64_t vocab_size);

// The options as the CLI (`--max-new-tokens`, `--temperature`, `--top-p`) or the C API
// (their field names) set them: Error(invalid_argument) naming the option and the value.
void check_generate_options(const GenerateOptions& o, OptionSource src);

// What generate() checks before it runs anything: the options (check_generate_options),
// the session (set up for generation), every prompt (non-empty, ids in the vocabulary, room
// for it and max_new_tokens) and pad_id. Error(invalid_argument) naming the prompt (0-based).
void check_generate_request(Session& session, const std::vector<std::vector<std::int32_t>>& prompts,
                            const GenerateOptions& options, OptionSource src);

// Generates for every prompt (token ids, each non-empty; the tokenizer's special prefix
// included, as the caller wants it) through a session set up for generation
// (SessionConfig::generate.batch > 0; a training session decodes on its first branch, after
// applying the pending update, as eval does). Each prompt needs
// len + max_new_tokens ≤ the session's positions (max_seq): Error(invalid_argument) names
// the prompt otherwise. Without a KV cache (KvPlace::off) every token runs the whole
// sequence again.
// What generate() throws when a row of logits holds a NaN or an infinity (weights that
// overflow the forward pass): Error(format) naming the prompt and the token, a type of its
// own so that an evaluation can report it without ending a training run.
struct NonFiniteLogits : Error {
  using Error::Error;
};

std::vector<Generation> generate(Session& session, const std::vector<std::vector<std::int32_t>>& prompts,
                                 const GenerateOptions& options, GenerateStats* stats = nullptr);

}  // namespace zo2
