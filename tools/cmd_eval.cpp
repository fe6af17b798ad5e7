// zo2-tune eval: a checkpoint on a data file: the token-weighted mean next-token loss, or for
// multiple-choice data (JSONL options, task presets) MeZO's candidate loss and accuracy, and
// the task's own metrics (multirc: f1a, em; record: f1, em). squad/drop: the gold answer's
// loss and MeZO's F1/EM of greedy decoding (api/generate.h: --batch-size prompts at a time,
// with the KV cache where --kv-cache puts it; with --max-new-tokens 0 the loss alone, with a
// note that F1/EM needs generation).
#include "api/run_dir.h"
#include "api/options.h"
#include "api/session.h"
#include "runtime/arena.h"
#include "runtime/log.h"
#include "tools/cli.h"
#include "tools/dataset.h"
#include "tools/task_metrics.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
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
    int max_new = 50;
    std::string predictions;
    std::string kv_cache = "auto";
    DeviceFlags dev;
    DataFlags data_flags;
    LoraFlags lora;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model", o->model, "HF checkpoint directory")->required();
  app.add_option("--data", o->data,
                 "JSONL (text | prompt+completion | prompt+options+label), a --task file, or safetensors with "
                 "input_ids [N, T] (+ attention_mask, labels)")->required();
  app.add_option("--batch-size,--per_device_eval_batch_size", o->batch, "examples per forward pass")
      ->capture_default_str();
  auto* num = app.add_option("--num-eval,--num_eval", o->num, "evaluate a seeded sample of N examples");
  app.add_option("--data-seed", o->seed, "seed of --num-eval's sample")->capture_default_str()->transform(seed_value());
  app.add_flag("--json", o->json, "print the result as JSON");
  app.add_option("--max-new-tokens,--max_new_tokens", o->max_new,
                 "squad/drop: greedy decoding of up to N tokens per answer for F1/EM (MeZO's 50; 0: only the gold "
                 "answer's loss)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--predictions", o->predictions,
                 "squad/drop: write each generated answer as a JSON line {line, prediction, answers, f1, em, ids}");
  app.add_option("--kv-cache", o->kv_cache,
                 "squad/drop decoding: where the KV cache lives: auto (the device when it fits), device, host, off "
                 "(every token runs the whole sequence again)")
      ->capture_default_str();
  o->dev.add(app);
  o->data_flags.add(app);
  o->lora.add(app, /*training=*/false);
  return [o, num, app_ptr = &app] {
    // Flags first (api/options.h, shared with the C API), then the files.
    check_integer(Opt::batch_size, o->batch, OptionSource::cli);
    if (num->count() > 0) check_integer(Opt::num_eval, o->num, OptionSource::cli);
    SessionConfig sc = session_config(o->dev, false);
    const KvPlace kv = parse_kv_place(o->kv_cache);
    const std::string given_model = o->model;
    refuse_full_checkpoint_as_adapter(o->lora.adapter);
    o->lora.apply(o->model, sc);  // --adapter, or an adapter as --model: its base with it
    use_the_adapter_runs_storage(o->dev, sc);
    o->model = resolve_model_dir(o->model).string();  // a run directory: its current checkpoint
    refuse_output_over_inputs("--predictions", o->predictions, {o->data},
                              {given_model, o->model, sc.adapter_dir, o->data_flags.tokenizer});
    const ModelConfig config = ModelConfig::load(o->model);
    const auto tokenizer = tokenizer_for_data(o->data, o->data_flags, o->model);
    const Dataset data = Dataset::load(o->data, config, tokenizer.get(), o->data_flags.options(o->num, o->seed));
    sc.max_batch = static_cast<int>(std::min<std::int64_t>(o->batch, data.size())) * data.max_candidates();
    sc.max_seq = data.longest();
    const bool generate = task_is_generation(data.task()) && o->max_new > 0;
    if (!task_is_generation(data.task()) && app_ptr->get_option("--max-new-tokens")->count() > 0)
      fail(ErrorKind::invalid_argument,
           "--max-new-tokens is for squad and drop (generated answers); {} is scored by its loss alone", o->data);
    int gen_rows = 0;
    if (generate) {
      // Room for the prompt and the new tokens (MeZO cuts the prompt to --max-len −
      // --max-new-tokens to leave it); the prompts decode --batch-size at a time (api/generate.h).
      if (data.max_len() <= o->max_new)
        fail(ErrorKind::invalid_argument,
             "--max-new-tokens {}: with {} {} no prompt token is left (MeZO cuts a prompt to max_len − "
             "max_new_tokens)", o->max_new, o->data_flags.max_len > 0 ? "--max-len" : "max_position_embeddings",
             data.max_len());
      sc.max_seq = static_cast<int>(std::min<std::int64_t>(
          config.max_positions, std::max(data.longest(), data.longest_prompt(o->max_new) + o->max_new)));
      gen_rows = static_cast<int>(std::min<std::int64_t>(o->batch, data.size()));
      sc.max_batch = std::max(sc.max_batch, gen_rows);
      sc.generate.batch = gen_rows;
      sc.generate.kv = kv;
    }
    Session session(o->model, sc);
    EvalResult r;
    {
      EvalProgressLine line(generate ? "eval (gold-answer loss)" : "eval");
      r = evaluate(session, data, sc.max_batch, {},
                   [&line](std::int64_t done, std::int64_t total, std::int64_t) { line.report(done, total); });
    }
    // A loss from finite logits is finite (a log-sum-exp): a NaN or infinity means the
    // forward pass overflowed, and every number from it would mislead.
    if (!std::isfinite(r.loss))
      fail(ErrorKind::format,
           "{}: the loss is not finite ({}): the model's logits overflow (weights with huge or non-finite values, or "
           "a compute dtype too narrow for them); no evaluation is reported",
           o->model, r.loss);
    if (generate) {
      const Placement& pl = session.placement();
      log_info("{}: greedy decoding of up to {} tokens per answer, {} prompts at a time, {}", data.task(), o->max_new,
               gen_rows,
               pl.kv_positions == 0 ? std::string("without a KV cache")
                                    : fmt::format("KV cache on the {}", pl.kv_on_device ? "device" : "host"));
      EvalProgressLine line("eval (greedy decoding)");
      EvalResult g = evaluate_generation(
          session, data, *tokenizer, o->max_new, {},
          [&line](std::int64_t done, std::int64_t total, std::int64_t tokens) { line.report(done, total, tokens); });
      line.finish();
      if (g.non_finite) fail(ErrorKind::format, "{}: {}; no evaluation is reported", o->model, g.note);
      r.metrics = g.metrics;
      r.note.clear();
      if (!o->predictions.empty()) {
        std::ofstream out = open_output_file("--predictions", o->predictions);
        for (std::int64_t i = 0; i < data.size(); ++i) {
          const Example& e = data.example(i);
          const auto k = static_cast<std::size_t>(i);
          nlohmann::json j{{"line", e.line},
                           {"prediction", g.predictions[k]},
                           {"answers", e.answers},
                           {"f1", metrics::qa_f1(g.predictions[k], e.answers)},
                           {"em", metrics::qa_em(g.predictions[k], e.answers)},
                           {"prompt_ids", g.prompts[k]},  // as decoded: cut to --max-len − --max-new-tokens
                           {"ids", g.generated[k]}};
          if (data.task() == "drop") {
            const auto d = metrics::drop_question(g.predictions[k], e.drop_golds);
            j["drop_f1"] = d.f1;
            j["drop_em"] = d.em;
          }
          out << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
        }
        out.flush();
        if (!out) fail(ErrorKind::io, "{}: writing the predictions failed", o->predictions);
      }
    } else if (!o->predictions.empty()) {
      fail(ErrorKind::invalid_argument, "--predictions is for squad and drop with --max-new-tokens > 0");
    }
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
    } else if (generate) {
      std::string scores;
      for (const auto& [name, value] : r.metrics) scores += fmt::format("{}{} {:.4f}", scores.empty() ? "" : ", ", name, value);
      fmt::print("eval: {} over {} examples (greedy, up to {} new tokens); gold-answer loss {:.6f} (device peak {})\n",
                 scores, r.examples, o->max_new, r.loss, format_bytes(static_cast<double>(session.device_peak())));
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
