// zo2-tune data: what a data file becomes — format, example count, lengths, truncation —
// and, with --show N, the first N examples as the model sees them (decoded candidates with
// their scored part), one JSON object per line. For checking templates and tokenization
// before a long run.
#include "models/config.h"
#include "runtime/error.h"
#include "runtime/log.h"
#include "api/run_dir.h"
#include "tools/cli.h"
#include "tools/dataset.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include <memory>

namespace zo2::cli {

Runner add_data(CLI::App& app) {
  struct Opts {
    std::string model, data;
    std::int64_t show = 0;
    DataFlags data_flags;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model", o->model, "model directory (config.json; its tokenizer unless --tokenizer)")->required();
  app.add_option("--data", o->data, "data file (JSONL, --task file or safetensors)")->required();
  app.add_option("--show", o->show, "print the first N examples as JSON lines")->capture_default_str()
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 53));
  o->data_flags.add(app);
  return [o] {
    o->model = resolve_model_dir(o->model).string();  // a run directory: its current checkpoint
    const ModelConfig config = ModelConfig::load(o->model);
    const auto tokenizer = tokenizer_for_data(o->data, o->data_flags, o->model);
    const Dataset data = Dataset::load(o->data, config, tokenizer.get(), o->data_flags.options());
    print_stderr("{}\n", data.describe());  // (never throws: a closed stderr loses only this)
    for (std::int64_t i = 0; i < std::min(o->show, data.size()); ++i) {
      const Example& e = data.example(i);
      nlohmann::json cands = nlohmann::json::array();
      for (const auto& s : e.seqs) {
        std::vector<std::int32_t> scored;
        for (std::size_t t = 0; t < s.ids.size(); ++t)
          if (s.labels[t] >= 0 && t > 0) scored.push_back(s.labels[t]);
        nlohmann::json c{{"ids", s.ids}, {"scored_tokens", scored.size()}};
        if (tokenizer) {
          c["text"] = tokenizer->decode(s.ids);
          c["scored"] = tokenizer->decode(scored);
        }
        cands.push_back(std::move(c));
      }
      nlohmann::json j{{"line", e.line}, {"sequences", std::move(cands)}};
      if (e.label >= 0) j["label"] = e.label;
      if (!e.golds.empty()) j["golds"] = e.golds;
      if (!e.answers.empty()) j["answers"] = e.answers;
      if (e.question >= 0) j["question"] = e.question;
      if (!e.drop_golds.empty()) j["drop_golds"] = e.drop_golds;
      fmt::print("{}\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    }
    return 0;
  };
}

}  // namespace zo2::cli
