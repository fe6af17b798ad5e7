#include "api/options.h"
#include "api/session.h"
#include "runtime/arena.h"
#include "runtime/error.h"
#include "tools/cli.h"

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
  // A disk-tier flag without the tier would be ignored without a word.
  if (sc.host_mem == 0)
    for (const CLI::Option* flag : {f.disk_lag_flag, f.disk_staging_flag})
      if (flag && flag->count() > 0)
        fail(ErrorKind::invalid_argument, "{} {} is for the disk tier (--host-mem SIZE --disk-dir DIR), which is not set",
             flag->get_name(), flag->as<std::string>());
  return sc;
}

}  // namespace zo2::cli
