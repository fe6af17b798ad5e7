// zo2-tune forward: logits and loss of a checkpoint on given token ids (the golden-parity
// interface: transformers' forward with labels = input_ids, padding ignored).
#include "api/run_dir.h"
#include "api/session.h"
#include "models/batch.h"
#include "models/safetensors.h"
#include "runtime/arena.h"
#include "runtime/log.h"
#include "tools/cli.h"

#include <memory>

namespace zo2::cli {

SessionConfig session_config(const DeviceFlags& f, bool training);

Runner add_forward(CLI::App& app) {
  struct Opts {
    std::string model, inputs, out;
    DeviceFlags dev;
    LoraFlags lora;
    bool hidden = false;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model", o->model, "HF checkpoint directory (config.json + safetensors)")->required();
  app.add_option("--inputs", o->inputs,
                 "safetensors with input_ids (I64/I32 [B,T]), optional attention_mask and labels")
      ->required();
  app.add_option("--out", o->out, "output safetensors: logits F32 [B,T,V], loss F32 [1]")->required();
  app.add_flag("--hidden-states", o->hidden,
               "also write hidden_states.0 … hidden_states.L (as transformers' output_hidden_states)");
  o->dev.add(app);
  o->lora.add(app, /*training=*/false);
  return [o] {
    SessionConfig sc = session_config(o->dev, false);  // the flags first, then the files
    o->lora.apply(o->model, sc);  // --adapter, or an adapter as --model: its base with it
    use_the_adapter_runs_storage(o->dev, sc);
    const std::string given_model = o->model;
    o->model = resolve_model_dir(o->model).string();  // a run directory: its current checkpoint
    refuse_output_over_inputs("--out", o->out, {o->inputs}, {given_model, o->model, sc.adapter_dir});
    const ModelConfig config = ModelConfig::load(o->model);
    const TokenTensors t = read_token_tensors(o->inputs);
    // Ids, mask or labels that do not fit the model are the file's contents, not a flag's
    // value: a format error naming the file (exit 1).
    const HostBatch batch = [&] {
      try {
        return make_batch(config, static_cast<int>(t.rows), static_cast<int>(t.seq), t.ids, t.mask, t.labels);
      } catch (const Error& e) {
        if (e.kind() != ErrorKind::invalid_argument) throw;
        fail(ErrorKind::format, "{}: {}", o->inputs, e.what());
      }
    }();
    // No target token (every label -100, or an all-zero mask): the loss it writes would be
    // 0/0. Refused before the model loads, naming the file (exit 1), as eval and train do.
    if (batch.target_count() == 0)
      fail(ErrorKind::format, "{}: nothing to predict: no position of its {} sequences has a target token ({})",
           o->inputs, t.rows,
           t.seq < 2 ? fmt::format("sequences of {} token: a causal LM predicts each token from the ones before "
                                   "it, so a sequence needs at least 2", t.seq)
           : t.labels.empty() ? std::string("the attention_mask is 0 after each sequence's first position")
                              : std::string("every label after each sequence's first position is -100"));
    sc.max_batch = static_cast<int>(t.rows);
    sc.max_seq = static_cast<int>(t.seq);
    sc.logits_out = true;
    Session session(o->model, sc);
    const std::int64_t n = batch.tokens();
    std::vector<float> logits(static_cast<std::size_t>(n * config.vocab_size));
    std::vector<std::vector<float>> hidden;
    EvalOptions eo;
    eo.logits = logits.data();
    if (o->hidden) eo.hidden_states = &hidden;
    float loss = session.eval(batch, eo);
    std::vector<TensorToWrite> out;
    out.push_back({"logits", DType::f32, {t.rows, t.seq, config.vocab_size}, logits.data(), {}});
    out.push_back({"loss", DType::f32, {1}, &loss, {}});
    std::vector<std::string> names;
    for (std::size_t i = 0; i < hidden.size(); ++i) names.push_back(fmt::format("hidden_states.{}", i));
    for (std::size_t i = 0; i < hidden.size(); ++i) {
      const std::int64_t dim = static_cast<std::int64_t>(hidden[i].size()) / n;
      out.push_back({names[i], DType::f32, {t.rows, t.seq, dim}, hidden[i].data(), {}});
    }
    {  // its directories, as check_output_file promised the writer makes them
      std::error_code ec;
      std::filesystem::create_directories(std::filesystem::absolute(o->out, ec).parent_path(), ec);
    }
    write_safetensors(o->out, out, {{"producer", "zo2-tune forward"}});
    log_info("forward: {} × {} tokens on {}, loss {:.6f}, device peak {}", t.rows, t.seq,
             session.device().name(), loss, format_bytes(static_cast<double>(session.device_peak())));
    return 0;
  };
}

}  // namespace zo2::cli
