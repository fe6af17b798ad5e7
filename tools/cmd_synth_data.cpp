// zo2-tune synth-data: a synthetic token dataset with structure a model can learn, for
// demos, tests and smoke runs when no real data is at hand: each row follows a fixed
// random permutation of a small alphabet (next = perm[current]), from a random start.
#include "models/config.h"
#include "models/safetensors.h"
#include "runtime/error.h"
#include "runtime/log.h"
#include "runtime/philox.h"
#include "api/run_dir.h"
#include "tools/cli.h"

#include <algorithm>
#include <memory>
#include <numeric>

namespace zo2::cli {

Runner add_synth_data(CLI::App& app) {
  struct Opts {
    std::string out, model;
    std::int64_t vocab = 0, rows = 256, seq = 32, alphabet = 16;
    std::uint64_t seed = 0;
    bool overwrite = false;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--out", o->out, "output safetensors file (input_ids I32 [rows, seq])")->required();
  app.add_option("--model", o->model, "take the vocabulary size from this checkpoint's config.json");
  app.add_option("--vocab", o->vocab, "vocabulary size (instead of --model)")->check(CLI::Range(std::int64_t{2}, std::int64_t{1} << 31));
  app.add_option("--rows", o->rows, "sequences")->capture_default_str()->check(CLI::Range(1, 1 << 30));
  app.add_option("--seq", o->seq, "tokens per sequence (at least 2: one to predict from, one to predict)")
      ->capture_default_str()
      ->check(CLI::Range(2, 1 << 30));
  auto* alphabet = app.add_option("--alphabet", o->alphabet,
                                  "distinct tokens used (the task's difficulty); at most the vocabulary size (the "
                                  "default 16 shrinks to a smaller vocabulary; a larger value given is refused)")
                       ->capture_default_str()
                       ->check(CLI::Range(2, 1 << 20));
  app.add_option("--seed", o->seed, "random seed")->capture_default_str()->transform(seed_value());
  app.add_flag("--overwrite", o->overwrite, "replace an existing --out file");
  return [o, alphabet] {
    // The file: named as the data readers tell formats (by the extension), never over the
    // model it reads, never replacing a file unasked.
    {
      std::string ext = std::filesystem::path(o->out).extension().string();
      for (char& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      if (ext != ".safetensors")
        fail(ErrorKind::invalid_argument,
             "--out {}: synth-data writes a safetensors file; name it *.safetensors (the data readers tell a file's "
             "format by its extension)",
             o->out);
      refuse_output_over_inputs("--out", o->out, {}, {o->model});
      if (std::error_code ec; !o->overwrite && (std::filesystem::exists(o->out, ec) ||
                                                 std::filesystem::is_symlink(std::filesystem::symlink_status(o->out, ec))))
        fail(ErrorKind::invalid_argument, "--out {} already exists: choose another file, or pass --overwrite", o->out);
    }
    std::int64_t vocab = o->vocab;
    if (!o->model.empty()) vocab = ModelConfig::load(resolve_model_dir(o->model)).vocab_size;
    if (vocab <= 0) fail(ErrorKind::invalid_argument, "synth-data needs --vocab V or --model DIR");
    // The file is written from memory: refuse what no reader would want before allocating it.
    constexpr std::int64_t kMaxTokens = std::int64_t{1} << 31;
    if (o->rows > kMaxTokens / o->seq)
      fail(ErrorKind::invalid_argument, "--rows {} × --seq {} = {} tokens: synth-data writes at most 2^31 ({} GiB of I32)",
           o->rows, o->seq, static_cast<double>(o->rows) * static_cast<double>(o->seq), kMaxTokens * 4 >> 30);
    // An alphabet larger than the vocabulary cannot be drawn from it: refused when given, not
    // silently shrunk (the default, 16, fits any vocabulary --vocab allows but the smallest).
    if (alphabet->count() > 0 && o->alphabet > vocab)
      fail(ErrorKind::invalid_argument,
           "--alphabet {}: more distinct tokens than the vocabulary has ({} ids, {}); give --alphabet {} at most",
           o->alphabet, vocab, o->model.empty() ? fmt::format("--vocab {}", vocab) : "vocab_size of " + o->model,
           vocab);
    const std::int64_t a = std::min(o->alphabet, vocab);
    // The alphabet: `a` distinct ids spread over the vocabulary; a fixed permutation of it.
    std::vector<std::int32_t> letters(static_cast<std::size_t>(a)), perm(static_cast<std::size_t>(a));
    for (std::int64_t i = 0; i < a; ++i) letters[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i * (vocab / a));
    std::iota(perm.begin(), perm.end(), 0);
    for (std::int64_t i = a - 1; i > 0; --i) {
      const auto j = static_cast<std::int64_t>(derive_step_seed(o->seed, static_cast<std::uint64_t>(i)) % static_cast<std::uint64_t>(i + 1));
      std::swap(perm[static_cast<std::size_t>(i)], perm[static_cast<std::size_t>(j)]);
    }
    std::vector<std::int32_t> ids(static_cast<std::size_t>(o->rows * o->seq));
    for (std::int64_t r = 0; r < o->rows; ++r) {
      auto cur = static_cast<std::int64_t>(derive_step_seed(o->seed ^ 0x5eed, static_cast<std::uint64_t>(r)) % static_cast<std::uint64_t>(a));
      for (std::int64_t t = 0; t < o->seq; ++t) {
        ids[static_cast<std::size_t>(r * o->seq + t)] = letters[static_cast<std::size_t>(cur)];
        cur = perm[static_cast<std::size_t>(cur)];
      }
    }
    std::vector<TensorToWrite> t{{"input_ids", DType::i32, {o->rows, o->seq}, ids.data(), {}}};
    write_safetensors(o->out, t, {{"producer", "zo2-tune synth-data"}, {"task", "permutation chain"}});
    log_info("synth-data: {} rows × {} tokens over {} of {} ids → {}", o->rows, o->seq, a, vocab, o->out);
    return 0;
  };
}

}  // namespace zo2::cli
