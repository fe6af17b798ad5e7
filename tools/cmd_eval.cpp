// zo2-tune eval: the token-weighted mean next-token loss of a checkpoint on a data file.
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
    bool json = false;
    DeviceFlags dev;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model", o->model, "HF checkpoint directory")->required();
  app.add_option("--data", o->data, "safetensors with input_ids [N, T] (+ attention_mask, labels)")->required();
  app.add_option("--batch-size,--per_device_eval_batch_size", o->batch, "sequences per forward pass")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_flag("--json", o->json, "print the result as JSON");
  o->dev.add(app);
  return [o] {
    const ModelConfig config = ModelConfig::load(o->model);
    const TokenDataset data = TokenDataset::load(o->data, config);
    SessionConfig sc = session_config(o->dev, false);
    sc.max_batch = static_cast<int>(std::min<std::int64_t>(o->batch, data.rows()));
    sc.max_seq = static_cast<int>(data.seq());
    Session session(o->model, sc);
    double sum = 0;
    std::int64_t count = 0;
    for (std::int64_t first = 0; first < data.rows(); first += sc.max_batch) {
      const HostBatch b = data.rows_batch(first, sc.max_batch);
      std::vector<float> token_loss(static_cast<std::size_t>(b.tokens()));
      EvalOptions eo;
      eo.token_loss = token_loss.data();
      session.eval(b, eo);
      for (std::size_t i = 0; i < token_loss.size(); ++i)
        if (b.targets[i] >= 0) {
          sum += token_loss[i];
          ++count;
        }
    }
    const double loss = count > 0 ? sum / static_cast<double>(count) : std::nan("");
    if (o->json) {
      nlohmann::json j{{"loss", loss}, {"perplexity", std::exp(loss)}, {"tokens", count}, {"rows", data.rows()},
                       {"device_peak_bytes", session.device_peak()}};
      fmt::print("{}\n", j.dump());
    } else {
      fmt::print("eval: loss {:.6f}, perplexity {:.3f} over {} target tokens in {} rows (device peak {})\n", loss,
                 std::exp(loss), count, data.rows(), format_bytes(static_cast<double>(session.device_peak())));
    }
    return 0;
  };
}

}  // namespace zo2::cli
