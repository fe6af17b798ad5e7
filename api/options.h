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
