// zo2-tune generate: text from a checkpoint (or a run directory, or a LoRA adapter) through
// the streaming runtime (api/generate.h): the prompts decode --batch-size at a time, the
// blocks stream once per new token for the whole batch, and the KV cache lives where the
// planner puts it (--kv-cache). The text is decoded back with the model's tokenizer.
#include "api/generate.h"
#include "api/options.h"
#include "api/run_dir.h"
#include "api/session.h"
#include "runtime/arena.h"
#include "runtime/error.h"
#include "runtime/json_file.h"
#include "runtime/log.h"
#include "tools/cli.h"
#include "tools/dataset.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <memory>

namespace zo2::cli {


SessionConfig session_config(const DeviceFlags& f, bool training);

namespace {

// The prompts of --data: JSONL with "prompt" (or "text") per line, or a text file with one
// prompt per non-empty line.
std::vector<std::string> read_prompts(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(ErrorKind::io, "{}: cannot open", file.string());
  std::string ext = file.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  const bool jsonl = ext == ".jsonl" || ext == ".json";
  std::vector<std::string> prompts;
  std::string line;
  for (std::int64_t n = 1; std::getline(in, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (n == 1 && line.starts_with("\xEF\xBB\xBF")) line.erase(0, 3);  // a UTF-8 byte order mark: not text
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    if (!jsonl) {
      prompts.push_back(line);
      continue;
    }
    nlohmann::json j;
    try {
      // Note [Reading JSON]: refused past kMaxJsonDataDepth, naming file:line.
      j = parse_json_text(line, fmt::format("{}:{}", file.string(), n), kMaxJsonDataDepth);
    } catch (const nlohmann::json::exception& e) {
      fail(ErrorKind::format, "{}:{}: not JSON: {}", file.string(), n, e.what());
    }
    const char* key = j.is_object() && j.contains("prompt") ? "prompt" : "text";
    if (!j.is_object() || !j.contains(key) || !j[key].is_string())
      fail(ErrorKind::format, "{}:{}: expected an object with a string \"prompt\" (or \"text\")", file.string(), n);
    prompts.push_back(j[key].get<std::string>());
  }
  if (in.bad()) fail(ErrorKind::io, "{}: read error", file.string());
  if (prompts.empty()) fail(ErrorKind::format, "{}: no prompts", file.string());
  return prompts;
}

}  // namespace

Runner add_generate(CLI::App& app) {
  struct Opts {
    std::string model, data, output, kv_cache = "auto";
    std::vector<std::string> prompts, stops;
    int max_new = 32, batch = 8, chunk = 512;
    bool greedy = false, json = false, ignore_eos = false;
    double temperature = 1.0, top_p = 1.0;
    std::uint64_t seed = 0;
    DeviceFlags dev;
    DataFlags data_flags;
    LoraFlags lora;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model", o->model, "HF checkpoint directory, run directory or LoRA adapter")->required();
  auto* prompt = app.add_option("--prompt", o->prompts, "a prompt (repeat for several)");
  auto* data = app.add_option("--data", o->data,
                              "prompts: JSONL with \"prompt\" (or \"text\") per line, a text file with one per line, "
                              "or a --task squad|drop file (MeZO's prompts)");
  prompt->excludes(data);
  app.add_option("--max-new-tokens,--max_new_tokens", o->max_new, "tokens to generate per prompt")->capture_default_str();
  auto* greedy = app.add_flag("--greedy", o->greedy, "greedy decoding (the default without --temperature/--top-p)");
  auto* temp = app.add_option("--temperature", o->temperature, "sample from softmax(logits / T)");
  auto* top_p = app.add_option("--top-p,--top_p", o->top_p, "nucleus sampling: keep the most likely tokens up to this mass");
  auto* seed = app.add_option("--seed", o->seed, "seed of the sampling draws")->capture_default_str()->transform(seed_value());
  greedy->excludes(temp)->excludes(top_p)->excludes(seed);
  app.add_option("--stop", o->stops, "stop a prompt's text at this string (repeatable; the string is cut off)");
  app.add_flag("--ignore-eos", o->ignore_eos,
               "do not stop at the end-of-sequence tokens (the tokenizer's, and the model's generation_config.json "
               "eos_token_id)");
  app.add_option("--batch-size", o->batch, "prompts decoded together")->capture_default_str();
  app.add_option("--kv-cache", o->kv_cache,
                 "where the KV cache lives: auto (the device when it fits), device, host, off (every token runs the "
                 "whole sequence again)")
      ->capture_default_str();
  app.add_option("--prefill-chunk", o->chunk,
                 "with a KV cache, prompts run through the blocks this many tokens at a time (activation memory: "
                 "batch × chunk tokens); 0 = whole prompts")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 30));
  app.add_option("--output", o->output, "write one JSON line per prompt: {prompt, text, tokens, stopped}");
  app.add_flag("--json", o->json, "print one JSON line per prompt instead of the text");
  o->dev.add(app);
  o->data_flags.add(app);
  o->lora.add(app, /*training=*/false);
  // The data flags are train's and eval's; of them generate takes what it can use. Its help
  // offers neither --padding-side (refused below: the KV cache's layout places the prompts)
  // nor the tasks it cannot prompt with (--task takes squad or drop: tasks with generated answers).
  auto* padding = app.get_option("--padding-side");
  padding->group("");  // hidden from --help, still parsed so that it is refused by name
  CLI::Option* task = app.get_option("--task");
  task->description("MeZO task preset whose prompts to read: squad (SQuAD v1.1 JSON) or drop (DROP JSON); the "
                    "other tasks are scored, not generated (eval)");
  *task->get_validator(0) = CLI::IsMember({"squad", "drop"});
  return [o, prompt, data, temp, top_p, seed, padding] {
    // Flags first (api/options.h, shared with the C API), then the files.
    if (prompt->count() == 0 && data->count() == 0)
      fail(ErrorKind::invalid_argument, "give --prompt TEXT or --data FILE");
    // Flags that would change nothing are refused rather than ignored.
    if (seed->count() > 0 && temp->count() == 0 && top_p->count() == 0)
      fail(ErrorKind::invalid_argument,
           "--seed {}: greedy decoding draws nothing; the seed is for sampling (--temperature, --top-p)", o->seed);
    if (padding->count() > 0)
      fail(ErrorKind::invalid_argument, "--padding-side: generate places its prompts itself (the KV cache's layout)");
    const bool cut_prompts = o->data_flags.max_len_flag->count() > 0;
    if (cut_prompts) check_integer(Opt::max_len, o->data_flags.max_len, OptionSource::cli);
    check_integer(Opt::batch_size, o->batch, OptionSource::cli);
    GenerateOptions go;
    go.max_new_tokens = o->max_new;
    go.greedy = temp->count() == 0 && top_p->count() == 0;
    go.temperature = static_cast<float>(o->temperature);
    go.top_p = static_cast<float>(o->top_p);
    go.seed = o->seed;
    if (!go.greedy) {
      check_real(Opt::temperature, o->temperature, OptionSource::cli);
      check_real(Opt::top_p, o->top_p, OptionSource::cli);
    }
    check_generate_options(go, OptionSource::cli);
    for (const auto& s : o->stops)
      if (s.empty()) fail(ErrorKind::invalid_argument, "--stop '': the stop string is empty");
    const KvPlace kv = parse_kv_place(o->kv_cache);
    SessionConfig sc = session_config(o->dev, false);
    const std::string given_model = o->model;
    refuse_full_checkpoint_as_adapter(o->lora.adapter);
    o->lora.apply(o->model, sc);
    use_the_adapter_runs_storage(o->dev, sc);
    o->model = resolve_model_dir(o->model).string();
    refuse_output_over_inputs("--output", o->output, {o->data},
                              {given_model, o->model, sc.adapter_dir, o->data_flags.tokenizer});
    const ModelConfig config = ModelConfig::load(o->model);
    const auto tokenizer = tokenizer_for_data(o->data, o->data_flags, o->model);
    if (!tokenizer) fail(ErrorKind::invalid_argument, "--data {}: token-id files are not prompts", o->data);

    // Prompts as the model sees them: the tokenizer's special prefix (BOS), then the text.
    std::vector<std::string> texts;
    std::vector<std::vector<std::int32_t>> ids;
    if (!o->data_flags.task.empty()) {
      // The prompts alone, cut by --max-len as the --prompt texts below are.
      DataOptions dopt = o->data_flags.options(0, 0, false);
      dopt.prompts_only = true;
      const Dataset ds = Dataset::load(o->data, config, tokenizer.get(), dopt);
      if (!task_is_generation(ds.task()))
        fail(ErrorKind::invalid_argument, "--task {}: generate takes the prompts of squad or drop", ds.task());
      for (std::int64_t i = 0; i < ds.size(); ++i) {
        ids.push_back(ds.example(i).prompt_ids);
        texts.push_back(tokenizer->decode(ds.example(i).prompt_ids));
      }
    } else {
      texts = o->data.empty() ? o->prompts : read_prompts(o->data);
      std::size_t cut_prompts_n = 0, cut_tokens = 0;
      for (const auto& t : texts) {
        std::vector<std::int32_t> p = tokenizer->special_prefix();
        const auto e = tokenizer->encode(t);
        // --max-len: the prompt's start goes (the special prefix stays), as the data readers cut prompts.
        const auto keep = cut_prompts ? std::min<std::size_t>(e.size(), static_cast<std::size_t>(std::max<std::int64_t>(
                                                                           0, o->data_flags.max_len - std::int64_t(p.size()))))
                                      : e.size();
        p.insert(p.end(), e.end() - static_cast<std::ptrdiff_t>(keep), e.end());
        ids.push_back(std::move(p));
        if (keep < e.size()) ++cut_prompts_n, cut_tokens += e.size() - keep;
      }
      if (cut_prompts_n > 0)
        log_info("--max-len {}: cut the start of {} of the {} prompts ({} tokens in all)", o->data_flags.max_len,
                 cut_prompts_n, texts.size(), cut_tokens);
    }
    std::size_t longest = 0;
    for (std::size_t k = 0; k < ids.size(); ++k) {
      if (ids[k].empty()) fail(ErrorKind::invalid_argument, "prompt {} has no tokens", k + 1);
      if (static_cast<std::int64_t>(ids[k].size()) + o->max_new > config.max_positions)
        fail(ErrorKind::invalid_argument,
             "prompt {} has {} tokens: with --max-new-tokens {} that is more than the model's {} positions{}", k + 1,
             ids[k].size(), o->max_new, config.max_positions,
             config.max_positions > o->max_new
                 ? fmt::format(" (--max-len {} keeps the last tokens of each prompt that fit)",
                               config.max_positions - o->max_new)
                 : std::string());
      longest = std::max(longest, ids[k].size());
    }
    const int batch = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(o->batch), ids.size()));
    sc.max_batch = batch;
    sc.max_seq = static_cast<int>(longest) + o->max_new;
    sc.generate.batch = batch;
    sc.generate.kv = kv;
    sc.generate.chunk = o->chunk;

    // The tokenizer's end-of-sequence token and the model's (Note [A model's end-of-sequence
    // ids] in api/generate.h), whose text is left out like the tokenizer's specials.
    const std::vector<std::int32_t> model_eos = model_eos_ids(o->model, config.vocab_size);
    if (!o->ignore_eos) {
      if (tokenizer->eos_id()) go.stop_ids.push_back(*tokenizer->eos_id());
      go.stop_ids.insert(go.stop_ids.end(), model_eos.begin(), model_eos.end());
    }
    std::vector<std::int32_t> specials = model_eos;
    for (auto id : {tokenizer->bos_id(), tokenizer->eos_id(), tokenizer->pad_id()})
      if (id) specials.push_back(*id);
    // The text of generated ids: special tokens left out, cut at the first stop string.
    auto text_of = [&](const std::vector<std::int32_t>& t, bool* cut = nullptr) {
      std::vector<std::int32_t> kept;
      for (auto id : t)
        if (id < tokenizer->vocab_size() && std::find(specials.begin(), specials.end(), id) == specials.end())
          kept.push_back(id);
      std::string s = tokenizer->decode(kept);
      std::size_t at = std::string::npos;
      for (const auto& stop : o->stops) at = std::min(at, s.find(stop));
      if (cut) *cut = at != std::string::npos;
      if (at != std::string::npos) s.resize(at);
      return s;
    };
    if (!o->stops.empty())
      go.stop = [&](std::size_t, const std::vector<std::int32_t>& t) {
        bool cut = false;
        text_of(t, &cut);
        return cut;
      };
    if (tokenizer->pad_id() && *tokenizer->pad_id() < config.vocab_size) go.pad_id = *tokenizer->pad_id();
    else if (tokenizer->eos_id() && *tokenizer->eos_id() < config.vocab_size) go.pad_id = *tokenizer->eos_id();

    Session session(o->model, sc);
    const Placement& pl = session.placement();
    log_info("generate: {} prompts, {} at a time, up to {} new tokens each ({}); {} of {} blocks resident; KV cache {}",
             ids.size(), batch, o->max_new,
             go.greedy ? std::string("greedy") : fmt::format("temperature {}, top-p {}, seed {}", go.temperature, go.top_p, go.seed),
             pl.resident_count, pl.resident.size(),
             pl.kv_positions == 0 ? std::string("off") : fmt::format("on the {}", pl.kv_on_device ? "device" : "host"));
    go.progress = [&](const GenerateProgress& p) {
      log_debug("generate: {}/{} prompts done, {} tokens, {:.1f} tokens/s", p.prompts_done, p.prompts, p.new_tokens,
                p.seconds > 0 ? static_cast<double>(p.new_tokens) / p.seconds : 0.0);
    };
    GenerateStats st;
    const auto out = generate(session, ids, go, &st);

    std::ofstream file;
    if (!o->output.empty()) {
      file = open_output_file("--output", o->output);
    }
    for (std::size_t k = 0; k < out.size(); ++k) {
      const std::string text = text_of(out[k].tokens);
      nlohmann::json j{{"prompt", texts[k]}, {"text", text}, {"tokens", out[k].tokens}, {"stopped", out[k].stopped}};
      const std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      if (file.is_open()) file << line << "\n";
      if (o->json) fmt::print("{}\n", line);
      else if (out.size() == 1) fmt::print("{}{}\n", texts[k], text);
      else fmt::print("--- {} ---\n{}{}\n", k + 1, texts[k], text);
    }
    if (file.is_open()) {
      file.flush();
      if (!file) fail(ErrorKind::io, "{}: writing failed", o->output);
    }
    log_info("generate: {} new tokens in {:.2f} s ({:.1f} tokens/s, {} decoding steps; device peak {})", st.new_tokens,
             st.seconds, st.seconds > 0 ? static_cast<double>(st.new_tokens) / st.seconds : 0.0, st.decode_steps,
             format_bytes(static_cast<double>(session.device_peak())));
    return 0;
  };
}

}  // namespace zo2::cli
