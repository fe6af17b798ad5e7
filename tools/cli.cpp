#include "tools/cli.h"

#include <cmath>

#include "api/options.h"
#include "api/session.h"
#include "api/run_dir.h"
#include "models/checkpoint.h"
#include "models/safetensors.h"
#include "offload/block_store.h"
#include "runtime/device.h"
#include "runtime/error.h"
#include "runtime/file_util.h"
#include "runtime/log.h"
#include "runtime/thread.h"
#include "zo/seed_log.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <tbb/global_control.h>
#include <tbb/info.h>
#include <fcntl.h>
#include <unistd.h>

#include <csignal>
#include <system_error>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <mutex>
#include <optional>

namespace zo2::cli {

DType parse_dtype_flag(const std::string& flag, const std::string& value,
                       std::initializer_list<DType> allowed) {
  const auto dt = dtype_from_name(value);
  std::string names;
  for (DType d : allowed) names += (names.empty() ? "" : ", ") + std::string(dtype_name(d));
  if (!dt || std::find(allowed.begin(), allowed.end(), *dt) == allowed.end())
    fail(ErrorKind::invalid_argument, "{} '{}': expected one of {}", flag, value, names);
  return *dt;
}

void check_output_file(const char* flag, const std::filesystem::path& out) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(out, ec))
    fail(ErrorKind::invalid_argument, "{} {} is a directory: name the file to write", flag, out.string());
  if (fs::is_symlink(fs::symlink_status(out, ec)) && !fs::exists(out, ec))
    fail(ErrorKind::invalid_argument, "{} {} is a link to nothing ({}): name the file to write", flag, out.string(),
         fs::read_symlink(out, ec).string());
  // The directories the write will make (nothing is made now: a refused command leaves no
  // trace): the nearest one that exists must be a writable directory.
  const fs::path parent = fs::absolute(out, ec).parent_path();
  fs::path existing = parent;
  while (!fs::exists(existing, ec) && existing.has_relative_path()) {
    if (fs::is_symlink(fs::symlink_status(existing, ec)))  // a dangling link: the write could not make it
      fail(ErrorKind::io, "{} {}: cannot create the directory {}: {} is a link to nothing", flag, out.string(),
           parent.string(), existing.string());
    existing = existing.parent_path();
  }
  if (!fs::is_directory(existing, ec))
    fail(ErrorKind::io, "{} {}: cannot create the directory {}: {} is not a directory", flag, out.string(),
         parent.string(), existing.string());
  if (::access(existing.c_str(), W_OK) != 0)
    fail(ErrorKind::io, "{} {}: cannot write in {}: {}", flag, out.string(), existing.string(), std::strerror(errno));
  if (fs::exists(out, ec) && ::access(out.c_str(), W_OK) != 0)
    fail(ErrorKind::io, "{} {}: cannot write it: {}", flag, out.string(), std::strerror(errno));
}

std::ofstream open_output_file(const char* flag, const std::filesystem::path& out) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::absolute(out, ec).parent_path(), ec);
  std::ofstream file(out, std::ios::binary | std::ios::trunc);
  if (!file) fail(ErrorKind::io, "{} {}: cannot write it: {}", flag, out.string(), std::strerror(errno));
  return file;
}

void refuse_replacing_checkpoint(const std::filesystem::path& out, bool overwrite) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path p = fs::weakly_canonical(fs::absolute(out, ec), ec);
  if (fs::exists(p / kRunSeedLog, ec))
    fail(ErrorKind::invalid_argument,
         "--out {} holds a training run (its seed log {}): writing a checkpoint there would leave the run's seed log "
         "and weights disagreeing; choose another --out (train --overwrite replaces a run)",
         out.string(), kRunSeedLog);
  if (const fs::path run = training_run_of_checkpoint(out); !run.empty())
    fail(ErrorKind::invalid_argument,
         "--out {} is a checkpoint of the training run {}: writing there would replace the weights its resume starts "
         "from; choose another --out",
         out.string(), run.string());
  if (overwrite) return;
  std::vector<std::string> files = foreign_checkpoint_files(p);
  if (fs::is_symlink(fs::symlink_status(p / kRunCurrent, ec)))
    files.insert(files.begin(), std::string(kRunCurrent) + " → " + fs::read_symlink(p / kRunCurrent, ec).string());
  if (!files.empty())
    fail(ErrorKind::invalid_argument,
         "--out {} already holds a checkpoint ({}): choose another --out, or pass --overwrite to replace it",
         out.string(), fmt::join(files, ", "));
}

void refuse_output_over_inputs(const char* flag, const std::filesystem::path& out,
                               std::initializer_list<std::filesystem::path> inputs,
                               std::initializer_list<std::filesystem::path> dirs) {
  std::error_code ec;
  if (out.empty()) return;
  check_output_file(flag, out);
  if (!std::filesystem::exists(out, ec)) return;
  auto is_out = [&](const std::filesystem::path& p) {
    std::error_code e2;
    return !p.empty() && std::filesystem::equivalent(p, out, e2);
  };
  for (const auto& in : inputs)
    if (is_out(in))
      fail(ErrorKind::invalid_argument, "{} {} is the input file {}: writing it would replace what is read; choose "
           "another {}", flag, out.string(), in.string(), flag);
  for (const auto& dir : dirs)
    if (!dir.empty() && std::filesystem::is_directory(dir, ec))
      for (const auto& entry : std::filesystem::directory_iterator(dir, ec))
        if (is_out(entry.path()))
          fail(ErrorKind::invalid_argument, "{} {} is {}, a file of the model, adapter or tokenizer this command reads; choose another "
               "{}", flag, out.string(), entry.path().string(), flag);
}

namespace {
// Without the blanks around it (a padded `$(wc -l < f)`: strtoll skipped leading ones).
std::string_view trim_blanks(std::string_view t) {
  t.remove_prefix(std::min(t.find_first_not_of(" \t"), t.size()));
  t.remove_suffix(t.size() - std::min(t.find_last_not_of(" \t") + 1, t.size()));
  return t;
}
}  // namespace

CLI::Validator seed_value() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        // Blanks around it and a leading '+', as the other integer flags (Note [Decimal integers]).
        text = std::string(trim_blanks(text));
        if (text.size() > 1 && text.front() == '+') text.erase(0, 1);
        std::uint64_t v = 0;
        const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
        if (text.empty() || ec != std::errc() || end != text.data() + text.size())
          return fmt::format("{} is not a seed: an integer in [0, 2^64)", text);
        // Decimal as written: CLI11 would read "010" as octal 8 (and refuse "09").
        text.erase(0, std::min(text.find_first_not_of('0'), text.size() - 1));
        return {};
      },
      "SEED");
}

std::string documented_integer_rule(const CLI::Option& opt, std::int64_t value) {
  for (int i = 0; i <= static_cast<int>(Opt::max_new_tokens); ++i) {
    const auto o = static_cast<Opt>(i);
    if (!opt.check_name(option_name(o, OptionSource::cli))) continue;
    try {
      check_integer(o, value, OptionSource::cli);
    } catch (const Error& e) {
      // "--window 3000000000: must be an integer in [1, 64]": its rule.
      const std::string what = e.what();
      const auto colon = what.find(": ");
      if (e.kind() == ErrorKind::invalid_argument && colon != std::string::npos) return what.substr(colon + 2);
    }
    break;
  }
  return "";
}

void decimal_integer_options(CLI::App& app) {
  for (CLI::Option* opt : app.get_options()) {
    const std::string type = opt->get_type_name();
    const std::string base = type.substr(0, type.find(':'));
    if ((base != "INT" && base != "UINT") || type.find("SEED") != std::string::npos) continue;
    const bool is_unsigned = base == "UINT";
    opt->transform(CLI::Validator(
        [is_unsigned, opt](std::string& text) -> std::string {
          std::string_view t = trim_blanks(text);
          const bool negative = !t.empty() && t.front() == '-';
          if (!t.empty() && (t.front() == '-' || t.front() == '+')) t.remove_prefix(1);
          if (t.empty() || t.find_first_not_of("0123456789") != std::string_view::npos)
            return fmt::format("{} is not a whole number (decimal digits{})", text, is_unsigned ? "" : ", an optional sign");
          t.remove_prefix(std::min(t.find_first_not_of('0'), t.size() - 1));
          const std::string digits = (negative && t != "0" ? "-" : "") + std::string(t);
          std::errc ec{};
          if (is_unsigned) {
            std::uint64_t v = 0;
            if (negative && t != "0") return fmt::format("{} is negative; this flag takes a whole number >= 0", text);
            ec = std::from_chars(t.data(), t.data() + t.size(), v).ec;
          } else {
            std::int64_t v = 0;
            ec = std::from_chars(digits.data(), digits.data() + digits.size(), v).ec;
          }
          if (ec != std::errc()) {
            // The flag's documented range where api/options.cpp has one (--steps: [1, 2^53]),
            // else the range of its 64-bit field.
            const std::string rule = documented_integer_rule(
                *opt, negative ? std::numeric_limits<std::int64_t>::min() : std::numeric_limits<std::int64_t>::max());
            return fmt::format("{} is beyond what this flag can hold ({})", text,
                               !rule.empty() ? rule
                               : is_unsigned ? "18446744073709551615 at most"
                               : negative    ? "-9223372036854775808 at least"
                                             : "9223372036854775807 at most");
          }
          text = digits;
          return {};
        },
        ""));
  }
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) decimal_integer_options(*sub);
}

void non_empty_values(CLI::App& app) {
  // Note [Empty values]. A transform runs before the option's other validators (CLI11 puts
  // it first), so IsMember's "not in {…}" never sees the empty value.
  for (CLI::Option* opt : app.get_options()) {
    if (opt->get_type_size() == 0 || opt->get_expected_min() == 0) continue;  // a flag: no value
    // Text whose empty value means something: generate --prompt "" (the BOS alone), tokenize
    // --text "" (the special tokens alone).
    if (opt->check_lname("prompt") || opt->check_lname("text")) continue;
    opt->transform(CLI::Validator(
        [](std::string& text) -> std::string {
          return text.empty() ? "an empty value (an unset shell variable?): give one, or leave the flag out" : "";
        },
        ""));
  }
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) non_empty_values(*sub);
}

CLI::Validator finite_range(double lo, double hi, bool open_lo) {
  return CLI::Validator(
      [=](const std::string& text) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(text, v)) return fmt::format("{} is not a number", text);
        if (!std::isfinite(v) || (open_lo ? v <= lo : v < lo) || v > hi)
          return fmt::format("{} must be a finite number {} {:g} and at most {:g}", text, open_lo ? ">" : ">=", lo, hi);
        return {};
      },
      fmt::format("{}{:g}..{:g}]", open_lo ? "(" : "[", lo, hi));
}

void DeviceFlags::add(CLI::App& app) {
  app.add_option("--device", device, "cpu, cuda, cuda:N or auto")->capture_default_str();
  app.add_option("--gpu-mem", gpu_mem,
                 "device memory cap, e.g. 512M, 18G (default: the whole device; on the CPU "
                 "backend, physical memory)");
  app.add_option("--offload", offload, "auto (fit what the cap allows), all (stream every block), none")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "all", "none"}));
  app.add_option("--window", window, "device slots for streamed blocks (>= 3 overlaps upload, compute, offload)")
      ->capture_default_str();  // range: api/options.cpp, checked with the other device flags
  app.add_option("--tile", tile,
                 "stream blocks by weight tiles: auto (only when two whole blocks do not fit --gpu-mem), off (whole "
                 "blocks only), or a tile size such as 64M (forces tiles)")
      ->capture_default_str();
  storage_flag = app.add_option("--storage-dtype", storage,
                                "dtype of the master weights, transfers and slots: fp32, bf16, fp16, fp8 (default: fp32; "
                                "a LoRA or prefix run's own for eval, forward and generate of it; the resumed run's "
                                "for train --resume)")
                     ->capture_default_str();
  app.add_option("--compute-dtype", compute, "compute dtype: fp32 (CPU), bf16 or fp16 (GPU)")
      ->capture_default_str();
  app.add_option("--threads", threads, "CPU threads for kernels and zo2-tune's host-side work (0 = the cores this process may use: its affinity mask, at most its cgroup CPU quota)")->capture_default_str();
  app.add_option("--host-mem", host_mem,
                 "host memory cap for the master weights, e.g. 64G: the streamed blocks beyond it live on disk "
                 "(--disk-dir); default: every block in RAM");
  app.add_option("--disk-dir", disk_dir,
                 "directory (a local SSD) for the blocks that do not fit under --host-mem: one block file, "
                 "zo2-blocks.img, two images per block");
  disk_lag_flag = app.add_option("--disk-lag", disk_lag,
                 "write a disk block back once its image lags by K updates (re-applied from their seeds at each "
                 "upload): K-fold fewer disk writes")
      ->capture_default_str();
  disk_staging_flag =
      app.add_option("--disk-staging", disk_staging, "pinned staging buffers between disk and device (0 = window + 1)")
          ->capture_default_str();
}

void RuleFlags::add(CLI::App& app) {
  optimizer_flag = app.add_option("--optimizer", optimizer,
                                  "update rule: zo-sgd (MeZO), zo-sgd-sign, zo-sgd-cons (conservative), "
                                  "zo-sgd-momentum, zo-adam")
                       ->capture_default_str();
  directions_flag = app.add_option("--directions", directions,
                                   "q random directions per step (MeZO's n-SPSA; each costs one more forward pass over "
                                   "the model; the update uses lr/q per direction)")
                        ->capture_default_str();
  difference_flag = app.add_option("--difference", difference,
                                   "central: (L(θ+εz) − L(θ−εz))/2ε; forward: (L(θ+εz) − L(θ))/ε")
                        ->capture_default_str();
  momentum_flag = app.add_option("--momentum", momentum, "zo-sgd-momentum: the momentum factor (torch SGD)")
                      ->capture_default_str();
  beta1_flag = app.add_option("--beta1", beta1, "zo-adam: β1")->capture_default_str();
  beta2_flag = app.add_option("--beta2", beta2, "zo-adam: β2")->capture_default_str();
  adam_eps_flag = app.add_option("--adam-eps", adam_eps, "zo-adam: the denominator's epsilon")->capture_default_str();
  state_dtype_flag = app.add_option("--state-dtype", state_dtype,
                                    "dtype of the momentum/Adam state kept beside the master weights: fp32, bf16, fp8")
                         ->capture_default_str();
}

void LoraFlags::add(CLI::App& app, bool training) {
  if (training) {
    lora_flag = app.add_flag("--lora", lora,
                             "train LoRA adapters only (the base is frozen: streamed blocks are never written back); "
                             "saves the adapter in PEFT's layout");
    r_flag = app.add_option("--lora-r", r, "LoRA rank")->capture_default_str();
    alpha_flag = app.add_option("--lora-alpha", alpha, "LoRA alpha (the update is scaled by alpha / r)")
                     ->capture_default_str();
    prefix_flag = app.add_flag("--prefix-tuning", prefix,
                               "train a prefix of --num-prefix key/value rows per layer only (MeZO's prefix tuning; "
                               "initialized from the base's activations of random tokens; the base is frozen)");
    num_prefix_flag = app.add_option("--num-prefix", num_prefix, "prefix tuning: virtual tokens per layer")
                          ->capture_default_str();
    targets_flag = app.add_option("--lora-targets", targets,
                                  "the adapted linear layers, by PEFT module name (OPT: q_proj, k_proj, v_proj, "
                                  "out_proj, fc1, fc2; LLaMA: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                  "down_proj)")
                       ->capture_default_str();
  }
  adapter_flag = app.add_option("--adapter", adapter,
                                "a LoRA adapter (PEFT directory, or a LoRA run directory) applied to --model");
}

void use_the_adapter_runs_storage(const DeviceFlags& flags, SessionConfig& sc) {
  if (sc.adapter_dir.empty() || (flags.storage_flag && flags.storage_flag->count() > 0)) return;
  nlohmann::json state;
  try {
    state = open_checkpoint(sc.adapter_dir).state;
  } catch (const Error&) {
    return;  // a plain adapter directory (no run), or a damaged one: loading it says what is wrong
  }
  if (!state.is_object() || !state.contains("storage_dtype") || !state.at("storage_dtype").is_string()) return;
  const std::optional<DType> d = dtype_from_name(state.at("storage_dtype").get<std::string>());
  if (!d || *d == sc.storage) return;
  sc.storage = *d;
  log_info("{}: the adapters were trained on a base stored as {}, so it is loaded that way (--storage-dtype fp32 for "
           "the full-precision base)",
           sc.adapter_dir.string(), dtype_name(*d));
}

namespace {

// The base a LoRA/prefix run's adapters were trained on, when the run's seed log records its
// fingerprint: a checkpoint re-made at the recorded path is another base (adversarial pass
// 58: `eval`/`merge --model RUN` used it with nothing said). Refused when the base came from
// the adapter's own record; said when --model named it (a deliberate other base). Returns
// whether the log decided (false: no fingerprint to compare with).
bool check_adapter_base(const std::filesystem::path& adapter_dir, const std::string& model, bool from_record) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path run = training_run_of_checkpoint(adapter_dir);
  if (run.empty() && fs::exists(adapter_dir / kRunSeedLog, ec)) run = adapter_dir;
  if (run.empty() || !fs::exists(run / kRunSeedLog, ec)) return false;
  std::string logged;
  try {
    logged = SeedLog::read(run / kRunSeedLog, /*header_only=*/true).header.base_fingerprint;
  } catch (const Error&) {
    return false;  // a damaged log is the run's business (resume and replay refuse it by name)
  }
  if (logged.empty()) return false;  // a log from before fingerprints
  const std::string fp = checkpoint_fingerprint(model);
  if (fp == logged) return true;  // the base, or a copy of it anywhere
  if (from_record)
    fail(ErrorKind::invalid_argument,
         "{}: its adapters were trained on the base recorded as {}, but the checkpoint there now has other weights "
         "(fingerprint {}; the run's seed log records {}): it was replaced — give the run's base as --model and the "
         "run as --adapter",
         adapter_dir.string(), model, fp, logged);
  const std::string base = AdapterStore::base_model_of(adapter_dir);
  log_warn("--adapter {} was trained on {} (fingerprint {}, its run's seed log records), not on --model {} (fingerprint "
           "{}): the adapter does not fit these weights unless that is intended",
           adapter_dir.string(), base.empty() ? std::string("another base") : base, logged, model, fp);
  return true;
}

}  // namespace

void LoraFlags::apply(std::string& model, SessionConfig& sc) const {
  namespace fs = std::filesystem;
  std::string adapter_dir = adapter.empty() ? std::string() : resolve_model_dir(adapter).string();
  // A LoRA run directory or an adapter directory as --model: its base model and itself.
  if (adapter_dir.empty() && !model.empty()) {
    const fs::path m = resolve_model_dir(model);
    if (AdapterStore::is_adapter_dir(m) && !fs::exists(m / "config.json")) {
      adapter_dir = m.string();
      const std::string base = AdapterStore::base_model_of(m);
      if (base.empty() || !fs::exists(fs::path(base) / "config.json"))
        fail(ErrorKind::invalid_argument,
             "--model {} is a LoRA adapter whose base model ({}) is not a local checkpoint: pass the base as --model "
             "and the adapter as --adapter",
             model, base.empty() ? "unnamed" : base);
      model = base;
    }
  }
  const bool flags_given = (lora_flag && lora_flag->count() > 0) || (r_flag && r_flag->count() > 0) ||
                           (alpha_flag && alpha_flag->count() > 0) || (targets_flag && targets_flag->count() > 0);
  // The combinations, checked by the layer the C API shares (api/options.h): a LoRA flag given
  // asks for the shape the flags say, their defaults included.
  AdapterOptions ask;
  ask.lora = lora;
  ask.prefix = prefix || (num_prefix_flag && num_prefix_flag->count() > 0);
  ask.prefix_tokens = num_prefix;
  if (flags_given) {
    ask.r = r;
    ask.alpha = static_cast<float>(alpha);
    ask.targets = targets;
  }
  if (!adapter_dir.empty()) {
    sc.peft = AdapterStore::peft_config_of(adapter_dir);
    sc.adapter_dir = adapter_dir;
    const bool decided = !model.empty() && check_adapter_base(adapter_dir, model, /*from_record=*/adapter.empty());
    // An adapter trained on other weights runs, but is not what was tuned: said, as replay
    // says it of a seed log (a moved copy of the base is fine). By path when no fingerprint decided.
    if (const std::string base = AdapterStore::base_model_of(adapter_dir); !decided && !base.empty() && !model.empty()) {
      std::error_code ec;
      if (fs::exists(fs::path(base) / "config.json", ec) &&
          !same_directory(resolve_model_dir(model), resolve_model_dir(base)))
        log_warn("--adapter {} was trained on {}, not on --model {}: unless that is a copy of it, the adapter does not "
                 "fit these weights",
                 adapter_dir, base, model);
    }
    ask.adapter = adapter_dir;
    ask.adapter_shape = sc.peft;
    check_adapter_options(ask, OptionSource::cli);
  } else if (prefix) {
    check_adapter_options(ask, OptionSource::cli);
    if (num_prefix < 1 || num_prefix > 1024)
      fail(ErrorKind::invalid_argument, "--num-prefix {}: must lie in [1, 1024]", num_prefix);
    sc.peft.prefix = num_prefix;
  } else if (lora) {
    sc.peft.lora = true;
    sc.peft.r = r;
    sc.peft.alpha = static_cast<float>(alpha);
    sc.peft.targets = parse_lora_targets(targets);
  } else {
    ask.prefix = false;  // --num-prefix alone is refused below as needing --prefix-tuning
    check_adapter_options(ask, OptionSource::cli);
  }
  if (!prefix && num_prefix_flag && num_prefix_flag->count() > 0)
    fail(ErrorKind::invalid_argument, "--num-prefix needs --prefix-tuning");
  if (sc.peft.any() && !model.empty()) {
    const ModelConfig config = ModelConfig::load(resolve_model_dir(model));
    if (sc.adapter_dir.empty() || flags_given) {
      validate_peft(sc.peft, config);
    } else {
      // The shape came from the adapter's own file, not from a flag: an error names that file.
      try {
        validate_peft(sc.peft, config, /*c_api=*/true);
      } catch (const Error& e) {
        fail(ErrorKind::format, "{}: {} (for the model in {})", (fs::path(adapter_dir) / "adapter_config.json").string(),
             e.what(), model);
      }
    }
  }
}

bool RuleFlags::any_given() const {
  for (const CLI::Option* f : {optimizer_flag, directions_flag, difference_flag, momentum_flag, beta1_flag, beta2_flag,
                               adam_eps_flag, state_dtype_flag})
    if (f && f->count() > 0) return true;
  return false;
}

RuleConfig RuleFlags::config(float weight_decay) const {
  RuleConfig r;
  const auto kind = parse_rule(optimizer);
  if (!kind)
    fail(ErrorKind::invalid_argument,
         "--optimizer {}: use zo-sgd, zo-sgd-sign, zo-sgd-cons, zo-sgd-momentum or zo-adam", optimizer);
  r.kind = *kind;
  const auto diff = parse_difference(difference);
  if (!diff) fail(ErrorKind::invalid_argument, "--difference {}: use central or forward", difference);
  r.difference = *diff;
  r.directions = directions;
  check_float_rounding();
  r.beta1 = static_cast<float>(r.kind == RuleKind::momentum ? momentum : beta1);
  r.beta2 = static_cast<float>(beta2);
  r.adam_eps = static_cast<float>(adam_eps);
  r.state_dtype = parse_dtype_flag("--state-dtype", state_dtype, {DType::f32, DType::bf16, DType::f8_e4m3});
  if (r.state_buffers() == 0) {
    for (const CLI::Option* f : {momentum_flag, beta1_flag, beta2_flag, adam_eps_flag, state_dtype_flag})
      if (f && f->count() > 0)
        fail(ErrorKind::invalid_argument, "--{} applies to {}, not --optimizer {}", f->get_lnames().front(),
             f == momentum_flag      ? "zo-sgd-momentum"
             : f == state_dtype_flag ? "zo-sgd-momentum or zo-adam"
                                     : "zo-adam",
             optimizer);
    r.state_dtype = DType::f32;
  } else {
    const bool momentum_rule = r.kind == RuleKind::momentum;
    const std::vector<const CLI::Option*> foreign =
        momentum_rule ? std::vector<const CLI::Option*>{beta1_flag, beta2_flag, adam_eps_flag}
                      : std::vector<const CLI::Option*>{momentum_flag};
    for (const CLI::Option* f : foreign)
      if (f && f->count() > 0)
        fail(ErrorKind::invalid_argument, "--{} does not apply to --optimizer {}", f->get_lnames().front(), optimizer);
    if (momentum_rule) r.beta2 = RuleConfig{}.beta2, r.adam_eps = RuleConfig{}.adam_eps;
  }
  validate_rule(r, weight_decay);
  return r;
}

// The rule's coefficients are floats: a value that lies in range as typed but not once
// rounded is named as typed (validate_rule, which sees only the float, would say
// "--beta1 1" of --beta1 0.99999999).
void RuleFlags::check_float_rounding() const {
  for (const auto& [f, v] : {std::pair{momentum_flag, momentum}, std::pair{beta1_flag, beta1}, std::pair{beta2_flag, beta2}})
    if (f && f->count() > 0 && v < 1.0 && static_cast<float>(v) >= 1.0f)
      fail(ErrorKind::invalid_argument, "--{} {}: rounds to 1 as a float; it must lie in [0, 1) (at most 0.99999994)",
           f->get_lnames().front(), f->results().back());
  if (adam_eps_flag && adam_eps_flag->count() > 0 && adam_eps > 0.0 && static_cast<float>(adam_eps) == 0.0f)
    fail(ErrorKind::invalid_argument, "--adam-eps {}: rounds to 0 as a float; it must be positive (at least 1.4e-45)",
         adam_eps_flag->results().back());
}

RuleConfig RuleFlags::over(const RuleConfig& run, float weight_decay) const {
  RuleConfig r = run;
  auto given = [](const CLI::Option* f) { return f && f->count() > 0; };
  if (given(optimizer_flag)) {
    const auto kind = parse_rule(optimizer);
    if (!kind)
      fail(ErrorKind::invalid_argument,
           "--optimizer {}: use zo-sgd, zo-sgd-sign, zo-sgd-cons, zo-sgd-momentum or zo-adam", optimizer);
    if (*kind != run.kind) return config(weight_decay);  // another rule: the flags alone describe it
  }
  if (given(difference_flag)) {
    const auto diff = parse_difference(difference);
    if (!diff) fail(ErrorKind::invalid_argument, "--difference {}: use central or forward", difference);
    r.difference = *diff;
  }
  if (given(directions_flag)) r.directions = directions;
  const bool momentum_rule = r.kind == RuleKind::momentum, adam = r.kind == RuleKind::adam;
  const std::string name(rule_name(r.kind));
  for (const auto& [f, applies] : {std::pair{momentum_flag, momentum_rule}, std::pair{beta1_flag, adam},
                                   std::pair{beta2_flag, adam}, std::pair{adam_eps_flag, adam},
                                   std::pair{state_dtype_flag, momentum_rule || adam}})
    if (given(f) && !applies)
      fail(ErrorKind::invalid_argument, "--{} does not apply to the run's update rule {}", f->get_lnames().front(),
           name);
  check_float_rounding();
  if (given(momentum_flag)) r.beta1 = static_cast<float>(momentum);
  if (given(beta1_flag)) r.beta1 = static_cast<float>(beta1);
  if (given(beta2_flag)) r.beta2 = static_cast<float>(beta2);
  if (given(adam_eps_flag)) r.adam_eps = static_cast<float>(adam_eps);
  if (given(state_dtype_flag))
    r.state_dtype = parse_dtype_flag("--state-dtype", state_dtype, {DType::f32, DType::bf16, DType::f8_e4m3});
  validate_rule(r, weight_decay);
  return r;
}

namespace {

std::vector<std::int32_t> as_int32(const SafetensorsFile& f, const TensorInfo& t,
                                   const std::string& name) {
  const std::vector<std::byte> bytes = f.read(t);
  const auto n = static_cast<std::size_t>(t.numel());
  std::vector<std::int32_t> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    std::int64_t v = 0;
    switch (t.dtype) {
      case DType::i64: { std::int64_t x; std::memcpy(&x, bytes.data() + i * 8, 8); v = x; break; }
      case DType::i32: { std::int32_t x; std::memcpy(&x, bytes.data() + i * 4, 4); v = x; break; }
      case DType::i16: { std::int16_t x; std::memcpy(&x, bytes.data() + i * 2, 2); v = x; break; }
      case DType::i8: v = static_cast<std::int8_t>(bytes[i]); break;
      case DType::u8: case DType::boolean: v = static_cast<std::uint8_t>(bytes[i]); break;
      default:
        fail(ErrorKind::format, "{}: tensor '{}' has dtype {}, expected an integer dtype (I64, I32, I16, I8, U8 or BOOL)",
             f.path().string(), name, dtype_safetensors_name(t.dtype));
    }
    if (v < std::numeric_limits<std::int32_t>::min() || v > std::numeric_limits<std::int32_t>::max())
      fail(ErrorKind::format, "{}: tensor '{}' value {} at {} does not fit 32 bits", f.path().string(), name, v,
           t.shape.size() == 2 && t.shape[1] > 0
               ? fmt::format("row {}, position {}", i / static_cast<std::size_t>(t.shape[1]),
                             i % static_cast<std::size_t>(t.shape[1]))
               : fmt::format("index {}", i));
    out[i] = static_cast<std::int32_t>(v);
  }
  return out;
}

}  // namespace

TokenTensors read_token_tensors(const std::filesystem::path& file) {
  const auto f = SafetensorsFile::open(file);
  const TensorInfo* ids = f.find("input_ids");
  if (!ids)
    fail(ErrorKind::format, "{}: no tensor 'input_ids' (expected I64 or I32 [N, T])", file.string());
  if (ids->shape.size() != 2 || ids->shape[0] <= 0 || ids->shape[1] <= 0)
    fail(ErrorKind::format, "{}: 'input_ids' must be 2-D [N, T] with N, T > 0", file.string());
  TokenTensors t;
  t.rows = ids->shape[0];
  t.seq = ids->shape[1];
  t.ids = as_int32(f, *ids, "input_ids");
  for (const char* name : {"attention_mask", "labels"}) {
    const TensorInfo* x = f.find(name);
    if (!x) continue;
    if (x->shape != ids->shape)
      fail(ErrorKind::format, "{}: '{}' has shape [{}], 'input_ids' [{}]", file.string(), name,
           fmt::join(x->shape, ", "), fmt::join(ids->shape, ", "));
    (std::string(name) == "labels" ? t.labels : t.mask) = as_int32(f, *x, name);
  }
  return t;
}

void DataFlags::add(CLI::App& app) {
  app.add_option("--task", task,
                 "MeZO task preset reading the standard file: sst2 (GLUE TSV), rte, boolq, cb, copa, wsc, wic, "
                 "multirc, record (SuperGLUE JSONL), squad (SQuAD v1.1 JSON), drop (DROP JSON)")
      ->check(CLI::IsMember(task_names()));
  app.add_option("--tokenizer", tokenizer, "tokenizer directory for text data (default: the model directory)");
  max_len_flag = app.add_option("--max-len", max_len, "truncate sequences to this many tokens (text: the end; prompts: the start)");
  app.add_option("--padding-side", padding_side, "where batches pad shorter sequences")
      ->capture_default_str()->check(CLI::IsMember({"right", "left"}));
}

DataOptions DataFlags::options(std::int64_t sample, std::uint64_t seed, bool shuffle) const {
  if (max_len_flag && max_len_flag->count() > 0) check_integer(Opt::max_len, max_len, OptionSource::cli);
  DataOptions d;
  d.task = task;
  d.max_len = max_len;
  d.left_padding = padding_side == "left";
  d.sample = sample;
  d.seed = seed;
  d.shuffle = shuffle;
  return d;
}

std::unique_ptr<Tokenizer> tokenizer_for_data(const std::filesystem::path& data, const DataFlags& flags,
                                              const std::filesystem::path& model_dir) {
  std::string ext = data.extension().string();
  for (char& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (flags.task.empty() && ext == ".safetensors") return nullptr;
  // A missing data file or a directory is that, not a tokenizer problem.
  if (std::error_code ec; !data.empty() && !std::filesystem::exists(data, ec))
    fail(ErrorKind::io, "{}: no such data file", data.string());
  if (std::error_code ec; !data.empty() && std::filesystem::is_directory(data, ec))
    fail(ErrorKind::invalid_argument, "{}: a directory, not a data file", data.string());
  const std::filesystem::path dir = flags.tokenizer.empty() ? model_dir : std::filesystem::path(flags.tokenizer);
  try {
    return Tokenizer::from_dir(dir);
  } catch (const Error& e) {
    fail(e.kind(), "{} needs a tokenizer, but {}: {}{}",
         data.empty() ? std::string("the --prompt text") : data.string() + " is text data and", dir.string(), e.what(),
         flags.tokenizer.empty() ? " (pass --tokenizer DIR, or copy the tokenizer files into the model directory)" : "");
  }
}

namespace {
constexpr const char* kTokenizerFiles[] = {"tokenizer.json",  "tokenizer.model", "tokenizer_config.json",
                                           "special_tokens_map.json", "vocab.json", "merges.txt", "encoder.json",
                                           "vocab.bpe",       "added_tokens.json", "generation_config.json"};
}  // namespace

std::uint64_t tokenizer_files_bytes(const std::filesystem::path& from) {
  std::uint64_t total = 0;
  for (const char* name : kTokenizerFiles) {
    std::error_code ec;
    if (const auto st = std::filesystem::status(from / name, ec); !ec && std::filesystem::is_regular_file(st))
      if (const auto n = std::filesystem::file_size(from / name, ec); !ec) total += n;
  }
  return total;
}

std::vector<std::pair<std::string, std::string>> read_tokenizer_files(const std::filesystem::path& from) {
  std::vector<std::pair<std::string, std::string>> files;
  for (const char* name : kTokenizerFiles) {
    const auto src = from / name;
    if (!std::filesystem::is_regular_file(src)) continue;
    std::ifstream in(src, std::ios::binary);
    if (!in) fail(ErrorKind::io, "{}: cannot read", src.string());
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) fail(ErrorKind::io, "{}: cannot read", src.string());
    files.emplace_back(name, std::move(bytes));
  }
  return files;
}

void write_tokenizer_files(const std::vector<std::pair<std::string, std::string>>& files,
                           const std::filesystem::path& to) {
  for (const auto& [name, bytes] : files) write_file_atomic(to / name, bytes);
}

int copy_tokenizer_files(const std::filesystem::path& from, const std::filesystem::path& to) {
  std::error_code ec;
  if (std::filesystem::equivalent(from, to, ec)) return 0;
  const auto files = read_tokenizer_files(from);
  write_tokenizer_files(files, to);
  return static_cast<int>(files.size());
}

void check_model_fits(const std::filesystem::path& model_dir, const ModelConfig& config, DType storage) {
  check_checkpoint_tensors(SafetensorsCheckpoint::open(model_dir), config, model_dir.string());
  check_host_memory(config, storage, config.num_layers);
}

std::size_t planning_cap(const SessionConfig& sc) {
  if (sc.gpu_mem != 0) return sc.gpu_mem;
  if (parse_device(sc.device).kind == DeviceKind::cpu) {
    if (const std::size_t bytes = cpu_default_arena_bytes(sc.threads); bytes > 0) return bytes;  // as the CPU arena is sized
  }
  return std::size_t{1} << 50;
}

NewOutputDir::NewOutputDir(const std::filesystem::path& dir) {
  std::error_code ec, not_found;  // symlink_status reports a missing path in its error code
  for (std::filesystem::path p = std::filesystem::absolute(dir, ec).lexically_normal();
       !ec && p.has_relative_path() && !std::filesystem::exists(std::filesystem::symlink_status(p, not_found));
       p = p.parent_path()) {
    if (p.filename().empty()) continue;  // "dir/" normalizes to a trailing empty name
    made_.push_back(p);
  }
}

NewOutputDir::~NewOutputDir() {
  std::error_code ec;
  for (const auto& p : made_) {
    bool only_lock = std::filesystem::is_directory(std::filesystem::symlink_status(p, ec));
    for (std::filesystem::directory_iterator it(p, ec), end; only_lock && !ec && it != end; it.increment(ec))
      only_lock = it->path().filename() == kRunLockFile;
    if (!only_lock || ec) return;
    std::filesystem::remove(p / kRunLockFile, ec);
    if (!std::filesystem::remove(p, ec)) return;  // not empty after all: keep it and its parents
  }
}

void ensure_writable_dir(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) fail(ErrorKind::io, "{}: cannot create the directory: {}", dir.string(), ec.message());
  // A new file of a unique name (mkostemp: O_EXCL), never one already there: a planted
  // `.zo2-write-test` link would have this probe empty the file it points at (pass 52).
  std::string probe = (dir / ".zo2-write-test.XXXXXX").string();
  const int fd = ::mkostemp(probe.data(), O_CLOEXEC);
  if (fd < 0) fail(ErrorKind::io, "{}: the directory is not writable: {}", dir.string(), std::strerror(errno));
  ::close(fd);
  ::unlink(probe.c_str());
}

bool stderr_is_terminal() { return isatty(fileno(stderr)) != 0; }

namespace {
double monotonic_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

EvalProgressLine::EvalProgressLine(std::string what)
    : what_(std::move(what)), tty_(stderr_is_terminal()), quiet_(log_level() > LogLevel::info),
      start_(monotonic_seconds()), last_(start_) {}

void EvalProgressLine::report(std::int64_t done, std::int64_t total, std::int64_t new_tokens) {
  if (quiet_ || failed_ || total <= 0) return;
  const double now = monotonic_seconds();
  constexpr double kPlainEvery = 30;  // seconds between lines that are not a terminal's
  if (tty_ ? now - last_ < 0.2 && done < total : now - last_ < kPlainEvery) return;
  last_ = now;
  const double elapsed = now - start_;
  const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0;
  const double eta = done > 0 ? elapsed / static_cast<double>(done) * static_cast<double>(total - done) : -1;
  const std::string line = fmt::format(
      "{}: {}/{} examples | {:.1f} examples/s{} | ETA {}", what_, done, total, rate,
      new_tokens >= 0 ? fmt::format(" | {} new tokens", new_tokens) : std::string(), format_duration(eta));
  failed_ = !write_stderr(tty_ ? "\r\033[K" + line : line + "\n");
  open_ = tty_ && !failed_;
}

void EvalProgressLine::finish() {
  if (open_) failed_ = !write_stderr("\r\033[K");
  open_ = false;
}

double train_eta(const EtaInputs& in) {
  // checkpoints k in [done, steps) with k % every == 0: those after the steps still to come
  auto due = [&](std::int64_t every) {
    return every > 0 && in.steps > 0 ? std::max<std::int64_t>(0, (in.steps - 1) / every - (in.done - 1) / every) : 0;
  };
  const double eval_s = in.evals_done > 0 ? in.eval_seconds / static_cast<double>(in.evals_done)
                                          : static_cast<double>(in.eval_batches) * in.step_s / 2;
  const double save_s = in.saves_done > 0 ? in.save_seconds / static_cast<double>(in.saves_done) : 0;
  return in.step_s * static_cast<double>(std::max<std::int64_t>(0, in.steps - in.done)) +
         (in.evaluates ? eval_s * static_cast<double>(due(in.eval_every) + 1) : 0) +
         save_s * static_cast<double>(due(in.save_every) + 1);
}

std::string format_duration(double s) {
  if (!(s >= 0) || s > 1e9) return "?";
  const auto total = static_cast<long long>(s + 0.5);
  if (total < 60) return fmt::format("{}s", total);
  if (total < 3600) return fmt::format("{}m{:02}s", total / 60, total % 60);
  // Past two days hours stop reading well ("8432h33m" was 351 days; adversarial pass 66).
  if (total < 48 * 3600) return fmt::format("{}h{:02}m", total / 3600, (total % 3600) / 60);
  return fmt::format("{}d{:02}h", total / 86400, (total % 86400) / 3600);
}

namespace {
// Note [zo2-tune's threads]
std::mutex g_host_threads_mutex;
bool g_host_threads_scope = false;
std::optional<tbb::global_control> g_host_threads_cap;
}  // namespace

HostThreadsScope::HostThreadsScope() {
  const std::lock_guard lock(g_host_threads_mutex);
  g_host_threads_scope = true;
}

HostThreadsScope::~HostThreadsScope() {
  const std::lock_guard lock(g_host_threads_mutex);
  g_host_threads_cap.reset();
  g_host_threads_scope = false;
}

void cap_host_threads(int threads) {
  const std::lock_guard lock(g_host_threads_mutex);
  if (!g_host_threads_scope) return;
  // Two global_controls of a parameter give the smaller value: the old one goes first.
  g_host_threads_cap.reset();
  const int pool = tbb::info::default_concurrency();
  const int n = threads > 0 ? threads : default_threads();
  if (n >= pool) return;
  g_host_threads_cap.emplace(tbb::global_control::max_allowed_parallelism, static_cast<std::size_t>(n));
  log_debug("host threads: {} of {} ({})", n, pool, threads > 0 ? "--threads" : "the cgroup's CPU quota");
}

namespace {
bool g_stdout_error_said = false;  // describe_error named the standard output already
bool g_stdout_closed = false;      // fd 1 was closed at the start (open_standard_streams)
}  // namespace

void open_standard_streams() noexcept {
  // Note [Standard streams]. (fcntl: whether the descriptor is open; open returns the lowest
  // free number, which is the closed one since the lower ones are open by now.)
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    if (fd == 1) g_stdout_closed = true;
    const int flags = fd == 2 ? O_WRONLY : O_RDONLY;  // stdout read-only: its writes still fail
    const int got = ::open("/dev/null", flags);
    if (got >= 0 && got != fd) {
      ::dup2(got, fd);
      ::close(got);
    }
  }
  std::signal(SIGPIPE, SIG_IGN);
  std::signal(SIGXFSZ, SIG_IGN);
}

int finish_stdout(const char* program, int rc) noexcept {
  errno = 0;
  const bool flushed = std::fflush(stdout) == 0;
  const int e = errno;
  if (flushed && !std::ferror(stdout)) return rc;
  if (!g_stdout_error_said)
    print_stderr("{}: error: cannot write the standard output: {}\n", program,
                 g_stdout_closed           ? "it was closed when the program started"
                 : !flushed && e != 0 ? std::strerror(e)
                                      : "a write failed, so the output is incomplete");
  return rc == 0 ? 1 : rc;
}

std::string describe_error(const std::exception& e) {
  const auto* se = dynamic_cast<const std::system_error*>(&e);
  if (se && std::ferror(stdout) && !dynamic_cast<const std::filesystem::filesystem_error*>(&e)) {
    g_stdout_error_said = true;
    return fmt::format("cannot write the standard output: {}", se->code().message());
  }
  if (std::optional<std::string> refused = refused_thread_message(e)) return *refused;  // Note [Thread limits]
  return e.what();
}

}  // namespace zo2::cli
