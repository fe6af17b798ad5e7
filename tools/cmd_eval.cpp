// zo2-tune eval: a checkpoint on a data file: the token-weighted mean next-token loss, or for
// multiple-choice data (JSONL options, task presets) MeZO's candidate loss and accuracy, and
// the task's own metrics (multirc: f1a, em; record: f1, em). squad/drop: the gold answer's
// loss, with a note that their F1/EM needs generation (not available yet).
#include "api/run_dir.h"
#include "api/options.h"
#include "api/session.h"
#include "runtime/arena.h"
#include "runtime/log.h"
#include "tools/cli.h"
#include "tools/dataset.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <memory>

namespace zo2::cli {

SessionConfig session_config(const DeviceFlags& f, bool training);

Runner add_eval(CLI::App& app) {
  struct Opts {
    std::string model, data;
    int batch = 8;
    std::int64_t num = 0;
    std::uint64_t seed = 0;
    bool json = false;
    DeviceFlags dev;
    DataFlags data_flags;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model", o->model, "HF checkpoint directory")->required();
  app.add_option("--data", o->data,
                 "JSONL (text | prompt+completion | prompt+options+label), a --task file, or safetensors with "
                 "input_ids [N, T] (+ attention_mask, labels)")->required();
  app.add_option("--batch-size,--per_device_eval_batch_size", o->batch, "examples per forward pass")
      ->capture_default_str();
  auto* num = app.add_option("--num-eval,--num_eval", o->num, "evaluate a seeded sample of N examples");
  app.add_option("--data-seed", o->seed, "seed of --num-eval's sample")->capture_default_str();
  app.add_flag("--json", o->json, "print the result as JSON");
  o->dev.add(app);
  o->data_flags.add(app);
  return [o, num] {
    // Flags first (api/options.h, shared with the C API), then the files.
    check_integer(Opt::batch_size, o->batch, OptionSource::cli);
    if (num->count() > 0) check_integer(Opt::num_eval, o->num, OptionSource::cli);
    SessionConfig sc = session_config(o->dev, false);
    o->model = resolve_model_dir(o->model).string();  // a run directory: its current checkpoint
    const ModelConfig config = ModelConfig::load(o->model);
    const auto tokenizer = tokenizer_for_data(o->data, o->data_flags, o->model);
    const Dataset data = Dataset::load(o->data, config, tokenizer.get(), o->data_flags.options(o->num, o->seed));
    sc.max_batch = static_cast<int>(std::min<std::int64_t>(o->batch, data.size())) * data.max_candidates();
    sc.max_seq = data.longest();
    Session session(o->model, sc);
    const EvalResult r = evaluate(session, data, sc.max_batch);
    if (o->json) {
      nlohmann::json j{{"loss", r.loss}, {"tokens", r.tokens}, {"examples", r.examples},
                       {"format", std::string(data_format_name(data.format()))},
                       {"device_peak_bytes", session.device_peak()}};
      if (r.accuracy >= 0)
        j["accuracy"] = r.accuracy;
      else
        j["perplexity"] = std::exp(r.loss);
      if (!data.task().empty()) {
        j["task"] = data.task();
        for (const auto& [name, value] : r.metrics) j[name] = value;
      }
      if (!r.note.empty()) j["note"] = r.note;
      fmt::print("{}\n", j.dump());
    } else if (r.accuracy >= 0) {
      std::string extra;
      for (const auto& [name, value] : r.metrics)
        if (name != "accuracy") extra += fmt::format(", {} {:.4f}", name, value);
      fmt::print("eval: accuracy {:.4f}{}, loss {:.6f} over {} examples ({} scored tokens; device peak {})\n",
                 r.accuracy, extra, r.loss, r.examples, r.tokens,
                 format_bytes(static_cast<double>(session.device_peak())));
    } else {
      fmt::print("eval: loss {:.6f}, perplexity {:.3f} over {} target tokens in {} rows (device peak {})\n", r.loss,
                 std::exp(r.loss), r.tokens, r.examples, format_bytes(static_cast<double>(session.device_peak())));
    }
    if (!r.note.empty() && !o->json) log_warn("{}", r.note);
    return 0;
  };
}

}  // namespace zo2::cli
