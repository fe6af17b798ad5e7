// zo2-tune tokenize: the ids of a text as one JSON array on stdout.
#include "models/tokenizer.h"
#include "runtime/error.h"
#include "tools/cli.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include <memory>

namespace zo2::cli {

Runner add_tokenize(CLI::App& app) {
  struct Opts {
    std::string dir, vocab, merges, text;
    bool special = false;
  };
  auto o = std::make_shared<Opts>();
  auto* d = app.add_option("--tokenizer", o->dir, "model or tokenizer directory (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)");
  auto* v = app.add_option("--vocab", o->vocab, "GPT-2 style vocab.json / encoder.json");
  auto* m = app.add_option("--merges", o->merges, "GPT-2 style merges.txt / vocab.bpe");
  d->excludes(v)->excludes(m);
  v->needs(m);
  m->needs(v);
  app.add_option("--text", o->text, "the text to encode")->required();
  app.add_flag("--special", o->special, "add BOS/EOS as the tokenizer's configuration says");
  return [o] {
    std::unique_ptr<Tokenizer> tok;
    if (!o->dir.empty())
      tok = Tokenizer::from_dir(o->dir);
    else if (!o->vocab.empty())
      tok = Tokenizer::from_vocab_merges(o->vocab, o->merges);
    else
      fail(ErrorKind::invalid_argument, "tokenize needs --tokenizer DIR or --vocab FILE --merges FILE");
    const auto ids = o->special ? tok->encode_with_special(o->text) : tok->encode(o->text);
    fmt::print("{}\n", nlohmann::json(ids).dump());
    return 0;
  };
}

}  // namespace zo2::cli
