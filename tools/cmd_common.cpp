#include "api/options.h"
#include "api/session.h"
#include "runtime/arena.h"
#include "runtime/error.h"
#include "tools/cli.h"
#include "api/run_dir.h"
#include "offload/adapter_store.h"

#include <filesystem>

namespace zo2::cli {

// The device flags as a SessionConfig, every value checked by the layer the C API shares
// (api/options.h) before anything is opened.
SessionConfig session_config(const DeviceFlags& f, bool training) {
  SessionConfig sc;
  sc.device = f.device;
  sc.gpu_mem = f.gpu_mem.empty() ? 0 : parse_size_option(Opt::gpu_mem, f.gpu_mem, OptionSource::cli);
  sc.offload = parse_offload_mode(f.offload);
  sc.window = f.window;
  sc.tile = parse_tile_option(f.tile, OptionSource::cli);
  sc.storage = parse_dtype_flag("--storage-dtype", f.storage, {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3});
  sc.compute = parse_dtype_flag("--compute-dtype", f.compute, {DType::f32, DType::bf16, DType::f16});
  sc.threads = f.threads;
  sc.training = training;
  sc.host_mem = f.host_mem.empty() ? 0 : parse_size_option(Opt::host_mem, f.host_mem, OptionSource::cli);
  sc.disk_dir = f.disk_dir;
  sc.disk_lag = f.disk_lag;
  sc.disk_staging = f.disk_staging;
  check_session_options(sc, OptionSource::cli);
  // A disk-tier flag without the tier would be ignored without a word (api/options.h).
  check_disk_tier_options(sc, f.disk_lag_flag && f.disk_lag_flag->count() > 0,
                          f.disk_staging_flag && f.disk_staging_flag->count() > 0, OptionSource::cli);
  return sc;
}

// --adapter naming a full fine-tuning checkpoint (or a run of one): it is a whole model, not
// an adapter, and its missing adapter_config.json would otherwise be the message
// (adversarial pass 69).
void refuse_full_checkpoint_as_adapter(const std::string& adapter) {
  if (adapter.empty()) return;
  std::filesystem::path dir;
  try {
    dir = resolve_model_dir(adapter);
  } catch (const Error&) {
    return;  // said by the adapter's own loading
  }
  std::error_code ec;
  if (!AdapterStore::is_adapter_dir(dir) && std::filesystem::exists(dir / "config.json", ec))
    fail(ErrorKind::invalid_argument,
         "--adapter {} is a full fine-tuning checkpoint (config.json and weights, no adapter_config.json): it holds the "
         "whole tuned model, so pass it as --model",
         adapter);
}

}  // namespace zo2::cli
