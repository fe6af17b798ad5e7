// model.safetensors.index.json of a sharded checkpoint. The directory holds two small valid
// shards (written once); the input is the index that maps tensor names to them.
#include "fuzz/fuzz_util.h"
#include "models/safetensors.h"
#include "runtime/error.h"

#include <array>
#include <filesystem>

namespace {
std::filesystem::path g_dir;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zo2::fuzz::silence_log();
  g_dir = zo2::fuzz::scratch_dir() / "ckpt";
  std::filesystem::create_directories(g_dir);
  const std::array<float, 6> a{1, 2, 3, 4, 5, 6};
  const std::array<float, 2> b{7, 8};
  const std::array<std::uint16_t, 3> c{1, 2, 3};
  const std::vector<zo2::TensorToWrite> shard1{{"model.a.weight", zo2::DType::f32, {2, 3}, a.data(), {}},
                                               {"model.b.bias", zo2::DType::f32, {2}, b.data(), {}}};
  const std::vector<zo2::TensorToWrite> shard2{{"lm_head.weight", zo2::DType::bf16, {3}, c.data(), {}},
                                               {"model.empty", zo2::DType::f32, {0, 4}, nullptr, {}}};
  zo2::write_safetensors(g_dir / "model-00001-of-00002.safetensors", shard1, {{"format", "pt"}});
  zo2::write_safetensors(g_dir / "model-00002-of-00002.safetensors", shard2, {{"format", "pt"}});
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  zo2::fuzz::write_file(g_dir / "model.safetensors.index.json", {reinterpret_cast<const char*>(data), size});
  try {
    const auto ck = zo2::SafetensorsCheckpoint::open(g_dir);
    std::uint64_t sum = ck.total_bytes() + ck.num_files();
    for (const auto& name : ck.names()) {
      const auto& e = ck.at(name);
      sum += e.file->read(*e.info).size();
    }
    if (sum == 0x5eed) return 0;
  } catch (const zo2::Error& e) {
    zo2::fuzz::rejected(e);
  }
  return 0;
}
