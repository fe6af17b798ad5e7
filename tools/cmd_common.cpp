#include "api/session.h"
#include "runtime/arena.h"
#include "tools/cli.h"

namespace zo2::cli {

SessionConfig session_config(const DeviceFlags& f, bool training) {
  SessionConfig sc;
  sc.device = f.device;
  sc.gpu_mem = f.gpu_mem.empty() ? 0 : parse_byte_size(f.gpu_mem);
  if (!f.gpu_mem.empty() && sc.gpu_mem == 0)
    fail(ErrorKind::invalid_argument, "--gpu-mem must be larger than 0");
  sc.offload = parse_offload_mode(f.offload);
  sc.window = f.window;
  sc.storage = parse_dtype_flag("--storage-dtype", f.storage, {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3});
  sc.compute = parse_dtype_flag("--compute-dtype", f.compute, {DType::f32, DType::bf16, DType::f16});
  sc.threads = f.threads;
  sc.training = training;
  return sc;
}

}  // namespace zo2::cli
