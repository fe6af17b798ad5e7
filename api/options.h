// The one validation layer for the options a user sets, shared by zo2-tune (tools/) and the
// C API (api/zo2_c.cpp), so the two cannot disagree on what is a valid value. Each option's
// range is written once, in options.cpp; a message names the option as its caller spells
// it — the flag on the command line (`--lr`), the field of zo2_session_params in the C API
// (`lr`) — and the value that was refused.
//
// Every check runs before any work: before a file is read past config.json, before the
// output directory is touched, before a device is opened.
//
// Error kinds: a value out of range is invalid_argument. A valid value that this device
// cannot run (bf16 compute on the CPU backend) is unsupported for the C API
// (ZO2_ERR_UNSUPPORTED) and invalid_argument for the command line, where every refused
// flag value is a usage error (exit status 2; README, zo2-tune).
#pragma once
#include "api/session.h"

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace zo2 {

// Who set the options: it decides the names in messages and the error kinds above.
enum class OptionSource { cli, c_api };

enum class Opt {
  lr, eps, weight_decay,                                                   // real
  steps, batch_size, window, threads, warmup_steps, save_every, eval_every,  // integer
  log_every, stop_at, num_train, num_eval, max_len, seq_len, until_step, first_step,
  disk_lag, disk_staging,                                                  // disk tier: integer
  tile,                                                                    // auto (0) | off (−1) | bytes
  gpu_mem, shard_size, host_mem,                                           // byte sizes
  temperature, top_p,                                                      // generation: real
  max_new_tokens,  // generation: integer (the last: tools/main.cpp walks the options up to it)
};

// The option's name for `src`: "--lr" on the command line, "lr" in the C API. Options with
// no C counterpart keep their flag name; C fields with another meaning have their own:
// batch_size is max_seqs, max_len is max_seq_len, threads is n_threads.
std::string option_name(Opt o, OptionSource src);

// Refuses a value outside the option's range: Error(invalid_argument) "<name> <value>: <rule>".
// `as_written` is the value as the user typed it, shown instead of the parsed one ("1e309",
// not "inf") where the caller has it.
void check_real(Opt o, double value, OptionSource src, std::string_view as_written = {});
void check_integer(Opt o, std::int64_t value, OptionSource src);
// A byte size as the command line writes it (512M, 18G, 4096), parsed and checked, with the
// flag named in every message.
std::uint64_t parse_size_option(Opt o, std::string_view text, OptionSource src);
void check_size(Opt o, std::uint64_t bytes, OptionSource src);
// --tile auto | off | SIZE (Note [Sub-block streaming] in offload/scheduler.h): 0, −1 or the
// bytes of a weight tile (SessionConfig::tile), with the flag named in every message.
std::int64_t parse_tile_option(std::string_view text, OptionSource src);

// The device-level options of a session together: window, threads, the disk tier's
// (--disk-lag, --disk-staging; --disk-dir without --host-mem, or --host-mem below what the
// globals need, are refused by the plan), and whether the device (after resolving "auto")
// runs the compute dtype. Opens nothing.
void check_session_options(const SessionConfig& sc, OptionSource src);

}  // namespace zo2

namespace zo2 {

// ---- Combinations ------------------------------------------------------------------------
// An option that another option gives its meaning to, given without that option, would do
// nothing (or something else than asked) without a word: refused here, each message naming
// the options as `src` spells them. The C API (and so Python) calls all five; zo2-tune calls
// the adapter, save-dtype and disk-tier ones (its seed log follows --resume, and eval's
// --kv-cache without --max-new-tokens is accepted there as before). "Given" is, on the command line, the flag's presence; in
// the C API, a value other than the field's documented default (zo2.h: 0, 1, NULL, lora_alpha
// 16, lora_targets "q_proj,v_proj", kv_cache "auto"), which a host cannot tell from "not set".

// The adapter options: --adapter / adapter_path, --lora / lora_r != 0, --prefix-tuning /
// prefix_tokens != 0, and LoRA's shape fields.
struct AdapterOptions {
  std::string adapter;           // the adapter directory given; "" = none
  PeftConfig adapter_shape;      // with `adapter`: its adapter_config.json's shape
  bool lora = false;             // --lora; C: lora_r != 0
  bool prefix = false;           // --prefix-tuning (or --num-prefix); C: prefix_tokens != 0
  int prefix_tokens = 0;         // (for the C API's message)
  std::optional<int> r;          // --lora-r / lora_r, where given
  std::optional<float> alpha;    // --lora-alpha / lora_alpha, where given
  std::optional<std::string> targets;  // --lora-targets / lora_targets, where given (as written)
};
// Refuses: an adapter with a new adapter's kind or shape that differs from the adapter's own
// (an adapter decides its shape); prefix tuning with LoRA's options; LoRA's shape without LoRA.
void check_adapter_options(const AdapterOptions& a, OptionSource src);

// --save-dtype / save_dtype other than fp32 on an adapter run (`peft` any()): the adapters are
// saved in fp32 whatever it says. `given` as above.
void check_save_dtype_option(DType save_dtype, bool given, const PeftConfig& peft, OptionSource src);

// --shard-size given on an adapter run (train, replay): the adapters are one file,
// adapter_model.safetensors as PEFT reads it, whatever it says (adversarial pass 71).
void check_shard_size_option(bool given, const PeftConfig& peft);

// --disk-lag / disk_lag and --disk-staging / disk_staging without the disk tier (host_mem 0).
void check_disk_tier_options(const SessionConfig& sc, bool lag_given, bool staging_given, OptionSource src);

// seed_log_append (C API: the command line's --resume decides it) without a seed log.
void check_seed_log_options(bool append, bool seed_log, OptionSource src);

// --kv-cache / kv_cache and --prefill-chunk / prefill_chunk with no generation (generate_seqs 0,
// or zo2-tune without --generate / --max-new-tokens).
void check_generation_options(bool generating, bool kv_given, std::string_view kv, bool chunk_given, int chunk,
                              OptionSource src);

}  // namespace zo2
