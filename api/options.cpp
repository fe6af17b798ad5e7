#include "api/options.h"

#include "runtime/arena.h"
#include "runtime/device.h"
#include "runtime/error.h"

#include <bit>
#include <cmath>
#include <limits>
#include <tuple>

namespace zo2 {
namespace {

// Step counts and intervals: the lr schedule computes with them in doubles, which hold every
// integer up to 2^53 exactly; beyond it two steps could share a learning rate.
constexpr std::int64_t kMaxSteps = std::int64_t{1} << 53;
// Sequences per step: `batch × candidates` (multiple choice) and the batch's token count are
// ints in the planner and the kernels; 2^20 sequences is far beyond any device's memory at
// one token each, so the plan refuses long before, and the products cannot overflow.
constexpr std::int64_t kMaxBatch = std::int64_t{1} << 20;
// Tokens per sequence are ints (the attention kernels' seq, OPT's max + 2 position rows);
// 2^30 keeps every such sum in range and is 100× the longest context a released model has.
constexpr std::int64_t kMaxSeq = std::int64_t{1} << 30;
// CPU threads: more than a machine has only adds contention; 2^16 is above any machine's
// core count and catches a value that is really something else (a byte count, a typo).
constexpr std::int64_t kMaxThreads = std::int64_t{1} << 16;
// Device slots: each holds a whole block image; more than 64 never overlaps anything more
// (the scheduler has three streams) and only takes memory from resident blocks.
constexpr std::int64_t kMaxWindow = 64;

struct Names {
  const char* cli;
  const char* c_api;  // nullptr: the C API has no such field (its flag name is used)
};

Names names_of(Opt o) {
  switch (o) {
    case Opt::lr: return {"--lr", "lr"};
    case Opt::eps: return {"--eps", "eps"};
    case Opt::weight_decay: return {"--weight-decay", "weight_decay"};
    case Opt::steps: return {"--steps", nullptr};
    case Opt::batch_size: return {"--batch-size", "max_seqs"};
    case Opt::window: return {"--window", "window"};
    case Opt::threads: return {"--threads", "n_threads"};
    case Opt::warmup_steps: return {"--warmup-steps", nullptr};
    case Opt::save_every: return {"--save-every", nullptr};
    case Opt::eval_every: return {"--eval-every", nullptr};
    case Opt::log_every: return {"--log-every", nullptr};
    case Opt::stop_at: return {"--stop-at", nullptr};
    case Opt::num_train: return {"--num-train", nullptr};
    case Opt::num_eval: return {"--num-eval", nullptr};
    case Opt::max_len: return {"--max-len", "max_seq_len"};
    case Opt::seq_len: return {"--seq-len", nullptr};
    case Opt::until_step: return {"--until-step", nullptr};
    case Opt::first_step: return {"--first-step", "first_step"};
    case Opt::gpu_mem: return {"--gpu-mem", "gpu_mem_bytes"};
    case Opt::host_mem: return {"--host-mem", "host_mem_bytes"};
    case Opt::disk_lag: return {"--disk-lag", "disk_lag"};
    case Opt::disk_staging: return {"--disk-staging", "disk_staging"};
    case Opt::tile: return {"--tile", "tile_bytes"};
    case Opt::shard_size: return {"--shard-size", "save_shard_bytes"};
    case Opt::temperature: return {"--temperature", "temperature"};
    case Opt::top_p: return {"--top-p", "top_p"};
    case Opt::max_new_tokens: return {"--max-new-tokens", "max_new_tokens"};
  }
  return {"?", "?"};
}

struct IntRange {
  std::int64_t lo, hi;
  const char* note;  // what the bounds mean, for the message ("" when plain)
};

IntRange range_of(Opt o, OptionSource src) {
  switch (o) {
    case Opt::steps: return {1, kMaxSteps, ""};
    case Opt::batch_size: return {1, kMaxBatch, ""};
    case Opt::window: return {1, kMaxWindow, ""};
    case Opt::threads: return {0, kMaxThreads, " (0 = the cores this process may use)"};
    case Opt::warmup_steps: return {0, kMaxSteps, ""};
    case Opt::save_every: return {0, kMaxSteps, " (0 = only at the end)"};
    case Opt::eval_every: return {0, kMaxSteps, " (0 = only at the end)"};
    case Opt::log_every: return {1, kMaxSteps, ""};
    case Opt::stop_at: return {1, kMaxSteps, ""};
    case Opt::num_train: return {1, kMaxSteps, ""};
    case Opt::num_eval: return {1, kMaxSteps, ""};
    // The C field's 0 means "the model's max_position_embeddings"; the flag is left out instead.
    case Opt::max_len:
      return src == OptionSource::c_api ? IntRange{0, kMaxSeq, " (0 = max_position_embeddings)"}
                                        : IntRange{1, kMaxSeq, ""};
    case Opt::seq_len: return {1, kMaxSeq, ""};
    case Opt::until_step: return {0, kMaxSteps, ""};
    case Opt::first_step: return {0, kMaxSteps, ""};
    case Opt::max_new_tokens: return {1, kMaxSeq, ""};
    // A disk image may lag its block by this many updates, each re-applied at upload: past a
    // few hundred the noise work of an upload dwarfs the write it saves.
    case Opt::disk_lag: return {1, 1024, ""};
    case Opt::disk_staging: return {0, kMaxWindow, " (0 = window + 1)"};
    // Tiles are at least one row of the widest matrix whatever the size says (ModelGraph).
    case Opt::tile:
      return {-1, std::int64_t{1} << 48,
              src == OptionSource::c_api ? " (0 = auto, -1 = whole blocks only, else the bytes of a weight tile)" : ""};
    default: break;
  }
  fail(ErrorKind::internal, "option {} is not an integer option", option_name(o, src));
}

// Bounds print as powers of two where they are ones: "[1, 2^53]" reads better than 16 digits.
std::string bound(std::int64_t v) {
  if (v >= 1024 && (v & (v - 1)) == 0) return fmt::format("2^{}", std::countr_zero(static_cast<std::uint64_t>(v)));
  return fmt::format("{}", v);
}

[[noreturn]] void refuse(Opt o, OptionSource src, const std::string& value, const std::string& rule) {
  throw Error(ErrorKind::invalid_argument, fmt::format("{} {}: {}", option_name(o, src), value, rule));
}

}  // namespace

std::string option_name(Opt o, OptionSource src) {
  const Names n = names_of(o);
  return src == OptionSource::c_api && n.c_api ? n.c_api : n.cli;
}

void check_real(Opt o, double v, OptionSource src, std::string_view as_written) {
  // lr, eps and weight decay reach the kernels as floats: a double above FLT_MAX (1e39) is
  // finite here and inf there. A number beyond the double range (1e309) already reads as inf.
  const bool float_finite = std::isfinite(v) && std::isfinite(static_cast<float>(v));
  const char* overflow = std::isfinite(v) && !float_finite ? " (it overflows a float, whose largest value is 3.4e38)"
                         : std::isinf(v) && src == OptionSource::cli ? " (it reads as inf: beyond the double range, 1.8e308)"
                                                                     : "";
  const std::string value = as_written.empty() ? fmt::format("{}", v) : std::string(as_written);
  switch (o) {
    case Opt::lr:
      // θ ← θ − lr·(g·z + wd·θ): an infinite or NaN lr makes every weight non-finite.
      if (!float_finite || !(v >= 0)) refuse(o, src, value, fmt::format("must be finite and ≥ 0{}", overflow));
      // A positive lr the float rounds to 0 would train nothing, with the log saying it did.
      if (v > 0 && !(static_cast<float>(v) > 0))
        refuse(o, src, value, "must be finite and ≥ 0 (it rounds to 0 as a float, whose smallest value is 1.4e-45)");
      return;
    case Opt::weight_decay:
      // Decoupled decay shrinks weights toward 0; a negative one grows them without bound.
      if (!float_finite || !(v >= 0)) refuse(o, src, value, fmt::format("must be finite and ≥ 0{}", overflow));
      return;
    case Opt::eps:
      // eps scales z ~ N(0, 1), added to weights whose typical magnitude is 1e-2..1 (MeZO
      // uses 1e-3). Above 1 the perturbation is larger than the weights themselves, so
      // (L(θ+εz) − L(θ−εz)) / 2ε no longer estimates a derivative; at 1e30 or inf both losses
      // are non-finite and every update would be skipped. Below, it must stay a non-zero float.
      if (!std::isfinite(v) || !(v > 0) || !(static_cast<float>(v) > 0) || v > 1)
        refuse(o, src, value, fmt::format("must be in (0, 1]{}", overflow));
      return;
    case Opt::temperature:
      // Logits are divided by it before the softmax: 0 is greedy decoding (its own flag).
      if (!float_finite || !(v > 0)) refuse(o, src, value, fmt::format("must be finite and > 0{}", overflow));
      if (!(static_cast<float>(v) > 0))
        refuse(o, src, value, "must be finite and > 0 (it rounds to 0 as a float, whose smallest value is 1.4e-45)");
      return;
    case Opt::top_p:
      // Nucleus sampling keeps the most likely tokens whose probabilities add up to top_p.
      if (!(v > 0) || !(v <= 1)) refuse(o, src, value, "must be in (0, 1]");
      if (!(static_cast<float>(v) > 0))
        refuse(o, src, value, "must be in (0, 1] (it rounds to 0 as a float, whose smallest value is 1.4e-45)");
      return;
    default:
      break;
  }
  fail(ErrorKind::internal, "option {} is not a real option", option_name(o, src));
}

void check_integer(Opt o, std::int64_t v, OptionSource src) {
  const IntRange r = range_of(o, src);
  if (v < r.lo || v > r.hi)
    refuse(o, src, fmt::format("{}", v), fmt::format("must be an integer in [{}, {}]{}", bound(r.lo), bound(r.hi), r.note));
}

void check_size(Opt o, std::uint64_t bytes, OptionSource src) {
  switch (o) {
    case Opt::gpu_mem:
      // The C field's 0 means "the whole device"; on the command line the flag is left out.
      if (bytes == 0 && src == OptionSource::cli)
        refuse(o, src, "0", "must be larger than 0 (leave --gpu-mem out for the whole device)");
      return;
    case Opt::host_mem:
      // The C field's 0 means "no cap"; on the command line the flag is left out.
      if (bytes == 0 && src == OptionSource::cli)
        refuse(o, src, "0", "must be larger than 0 (leave --host-mem out to keep every block in RAM)");
      return;
    case Opt::shard_size:
      // Every save splits the checkpoint into shards of at most this size.
      if (bytes == 0) refuse(o, src, "0", "must be larger than 0 (the largest safetensors shard of a save)");
      return;
    default:
      break;
  }
  fail(ErrorKind::internal, "option {} is not a size option", option_name(o, src));
}

std::uint64_t parse_size_option(Opt o, std::string_view text, OptionSource src) {
  std::uint64_t bytes = 0;
  try {
    bytes = parse_byte_size(text);
  } catch (const Error& e) {
    throw Error(ErrorKind::invalid_argument, fmt::format("{}: {}", option_name(o, src), e.what()));
  }
  check_size(o, bytes, src);
  return bytes;
}

std::int64_t parse_tile_option(std::string_view text, OptionSource src) {
  if (text == "auto") return 0;
  if (text == "off") return -1;
  std::uint64_t bytes = 0;
  try {
    bytes = parse_byte_size(text);
  } catch (const Error& e) {
    throw Error(ErrorKind::invalid_argument,
                fmt::format("{} {}: expected auto, off or a size such as 64M ({})", option_name(Opt::tile, src), text,
                            e.what()));
  }
  if (bytes == 0) refuse(Opt::tile, src, std::string(text), "must be larger than 0 (auto picks the size)");
  if (bytes > (std::uint64_t{1} << 48)) refuse(Opt::tile, src, std::string(text), "must be at most 2^48 bytes");
  return static_cast<std::int64_t>(bytes);
}

void check_session_options(const SessionConfig& sc, OptionSource src) {
  check_integer(Opt::window, sc.window, src);
  check_integer(Opt::tile, sc.tile, src);
  check_integer(Opt::threads, sc.threads, src);
  check_integer(Opt::disk_lag, sc.disk_lag, src);
  check_integer(Opt::disk_staging, sc.disk_staging, src);
  if (!sc.disk_dir.empty() && sc.host_mem == 0)
    throw Error(ErrorKind::invalid_argument,
                fmt::format("{} {}: the disk tier holds the blocks that do not fit under {}, which is not set",
                            src == OptionSource::cli ? "--disk-dir" : "disk_dir", sc.disk_dir.string(),
                            option_name(Opt::host_mem, src)));
  // "auto" resolves here as the session will resolve it (a CUDA device when one exists).
  const DeviceOptions dev = parse_device(sc.device);
  if (dev.kind == DeviceKind::cpu && sc.compute != DType::f32) {
    const char* device_flag = src == OptionSource::cli ? "--device" : "device";
    const ErrorKind kind = src == OptionSource::cli ? ErrorKind::invalid_argument : ErrorKind::unsupported;
    throw Error(kind, fmt::format("{} {}: the CPU backend ({} {}{}) computes in fp32; bf16 and fp16 compute "
                                  "need a CUDA device",
                                  src == OptionSource::cli ? "--compute-dtype" : "compute_dtype",
                                  dtype_name(sc.compute), device_flag, sc.device,
                                  sc.device == "auto" ? ", and no CUDA device was found" : ""));
  }
}

}  // namespace zo2

namespace zo2 {
namespace {

[[noreturn]] void refuse_combination(const std::string& message) {
  throw Error(ErrorKind::invalid_argument, message);
}

// The targets as a caller wrote them, parsed; an empty name is refused with the field named.
std::vector<std::string> targets_of(const std::string& list, OptionSource src) {
  try {
    return parse_lora_targets(list);
  } catch (const Error&) {
    if (src == OptionSource::cli) throw;
    refuse_combination(fmt::format("lora_targets '{}': an empty module name", list));
  }
}

}  // namespace

void check_adapter_options(const AdapterOptions& a, OptionSource src) {
  const bool cli = src == OptionSource::cli;
  const bool lora_fields = a.r.has_value() || a.alpha.has_value() || a.targets.has_value();
  // The LoRA fields given, as the C API names them ("lora_r/lora_alpha").
  std::string given;
  if (a.r) given += "lora_r";
  if (a.alpha) given += std::string(given.empty() ? "" : "/") + "lora_alpha";
  if (a.targets) given += std::string(given.empty() ? "" : "/") + "lora_targets";
  if (!a.adapter.empty()) {
    // An adapter directory decides its own kind and shape (adapter_config.json).
    if (a.prefix) {
      if (cli)
        refuse_combination(fmt::format("--adapter {} is {}: its shape comes from its adapter_config.json", a.adapter,
                                       a.adapter_shape.describe()));
      refuse_combination(fmt::format("prefix_tokens {} with adapter_path {}, which is {}: an adapter's shape comes from "
                                     "its adapter_config.json (leave prefix_tokens 0)",
                                     a.prefix_tokens, a.adapter, a.adapter_shape.describe()));
    }
    if (a.lora || lora_fields) {
      PeftConfig asked = a.adapter_shape.lora ? a.adapter_shape : PeftConfig{};
      asked.lora = true;
      asked.prefix = 0;
      if (a.r) asked.r = *a.r;
      if (a.alpha) asked.alpha = *a.alpha;
      if (a.targets) asked.targets = targets_of(*a.targets, src);
      if (!(asked == a.adapter_shape)) {
        if (cli)
          refuse_combination(fmt::format("--lora-r/--lora-alpha/--lora-targets ask for {}, but the adapter {} is {}",
                                         asked.describe(), a.adapter, a.adapter_shape.describe()));
        refuse_combination(fmt::format("{} ask for {}, but adapter_path {} is {}: an adapter's shape comes from its "
                                       "adapter_config.json (leave {} at the default)",
                                       given, asked.describe(), a.adapter, a.adapter_shape.describe(), given));
      }
    }
    return;
  }
  if (a.prefix && (a.lora || lora_fields)) {
    if (cli) refuse_combination("--prefix-tuning and --lora*: choose one kind of adapter");
    refuse_combination(fmt::format("prefix_tokens and {}: choose one kind of adapter{}", given,
                                   a.r ? "" : " (lora_alpha and lora_targets are LoRA's, which needs lora_r > 0)"));
  }
  if (!a.lora && lora_fields) {
    if (cli) refuse_combination("--lora-r, --lora-alpha and --lora-targets need --lora");
    refuse_combination(fmt::format("{} {}: LoRA's, which needs lora_r > 0 (lora_r 0 is full fine-tuning, where {} "
                                   "would change nothing)",
                                   given, a.alpha && !a.targets ? fmt::format("{}", *a.alpha)
                                          : a.targets && !a.alpha ? fmt::format("'{}'", *a.targets)
                                                                  : std::string("given"),
                                   given));
  }
}

void check_save_dtype_option(DType save_dtype, bool given, const PeftConfig& peft, OptionSource src) {
  if (!given || !peft.any() || save_dtype == DType::f32) return;
  const bool cli = src == OptionSource::cli;
  refuse_combination(fmt::format(
      "{} {}: an adapter run ({}) saves its adapters in fp32 (the base is not saved); {}", cli ? "--save-dtype" : "save_dtype",
      dtype_name(save_dtype), peft.describe(),
      cli ? "drop --save-dtype, and give it to `zo2-tune merge`, which folds the adapters into a checkpoint of that "
            "dtype"
          : "leave save_dtype fp32, and give the dtype to `zo2-tune merge --save-dtype`, which folds the adapters "
            "into a checkpoint of that dtype"));
}

void check_shard_size_option(bool given, const PeftConfig& peft) {
  if (!given || !peft.any()) return;
  refuse_combination(fmt::format(
      "--shard-size: an adapter run ({}) saves its adapters as one file ({}, as PEFT reads it); drop --shard-size, "
      "and give it to `zo2-tune merge`, which folds the adapters into a checkpoint of that shard size",
      peft.describe(), "adapter_model.safetensors"));
}

void check_disk_tier_options(const SessionConfig& sc, bool lag_given, bool staging_given, OptionSource src) {
  if (sc.host_mem != 0) return;
  const bool cli = src == OptionSource::cli;
  for (const auto& [o, given, value] : {std::tuple{Opt::disk_lag, lag_given, sc.disk_lag},
                                        std::tuple{Opt::disk_staging, staging_given, sc.disk_staging}})
    if (given)
      refuse_combination(fmt::format("{} {} is for the disk tier ({}), which is not set", option_name(o, src), value,
                                     cli ? "--host-mem SIZE --disk-dir DIR" : "host_mem_bytes and disk_dir"));
}

void check_seed_log_options(bool append, bool seed_log, OptionSource src) {
  if (!append || seed_log) return;
  const bool cli = src == OptionSource::cli;
  refuse_combination(cli ? "--seed-log-append needs --seed-log"
                         : "seed_log_append is set but seed_log_path is NULL: there is no seed log to append to");
}

void check_generation_options(bool generating, bool kv_given, std::string_view kv, bool chunk_given, int chunk,
                              OptionSource src) {
  if (generating) return;
  const bool cli = src == OptionSource::cli;
  const char* what = cli ? "--max-new-tokens" : "generate_seqs > 0";
  if (kv_given)
    refuse_combination(fmt::format("{} {}: the KV cache serves generation, which this session does not do ({} is not "
                                   "set)",
                                   cli ? "--kv-cache" : "kv_cache", kv, what));
  if (chunk_given)
    refuse_combination(fmt::format("{} {}: it chunks the prompts of a generation, which this session does not do ({} "
                                   "is not set)",
                                   cli ? "--prefill-chunk" : "prefill_chunk", chunk, what));
}

}  // namespace zo2
