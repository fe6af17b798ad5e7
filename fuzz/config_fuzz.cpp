// A model's config.json (ModelConfig::load: parse, the family's fields, validate), then what
// a loader computes from it next: the parameter counts, the rotary frequencies and the
// config written back.
#include "fuzz/fuzz_util.h"
#include "models/config.h"
#include "runtime/error.h"

#include <filesystem>

namespace {
std::filesystem::path g_dir;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zo2::fuzz::silence_log();
  g_dir = zo2::fuzz::scratch_dir() / "model";
  std::filesystem::create_directories(g_dir);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  zo2::fuzz::write_file(g_dir / "config.json", {reinterpret_cast<const char*>(data), size});
  try {
    const auto c = zo2::ModelConfig::load(g_dir);
    const auto j = c.to_json();
    const auto back = zo2::ModelConfig::from_json(j, "written back");
    std::int64_t sum = back.num_layers + static_cast<std::int64_t>(j.dump().size());
    sum += c.total_params();
    if (c.head_dim <= 4096) sum += static_cast<std::int64_t>(c.rope_inv_freq().size());
    if (sum == 0x5eed) return 0;
  } catch (const zo2::Error& e) {
    zo2::fuzz::rejected(e);
  }
  return 0;
}
