// A .safetensors file: the 8-byte length, the JSON header and the data section
// (SafetensorsFile::open validates all of it; then every accessor is exercised).
#include "fuzz/fuzz_util.h"
#include "models/safetensors.h"
#include "runtime/error.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zo2::fuzz::silence_log();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto path =
      zo2::fuzz::scratch_file("model.safetensors", {reinterpret_cast<const char*>(data), size});
  try {
    const auto f = zo2::SafetensorsFile::open(path);
    std::uint64_t sum = f.file_size() + f.header_size() + f.data_size() + f.metadata().size();
    for (const auto& t : f.tensors()) {
      const auto bytes = f.read(t);
      if (bytes.size() != t.nbytes() || f.find(t.name) == nullptr) __builtin_trap();
      sum += static_cast<std::uint64_t>(t.numel());
      if (!bytes.empty()) sum += static_cast<std::uint8_t>(bytes.front()) + static_cast<std::uint8_t>(bytes.back());
      if (t.numel() > 0) {  // one element converted to f64 (a float tensor; the others are not converted)
        double v = 0;
        if (zo2::dtype_is_float(t.dtype)) f.read_converted(t, t.numel() - 1, 1, &v, zo2::DType::f64);
        sum += static_cast<std::uint64_t>(v == v);
      }
    }
    (void)f.find("no such tensor");
    // The same file through the checkpoint layer (single-file form).
    const auto ck = zo2::SafetensorsCheckpoint::open(path);
    sum += ck.total_bytes() + ck.names().size();
    if (sum == 0x5eed) return 0;  // keeps `sum` alive
  } catch (const zo2::Error& e) {
    zo2::fuzz::rejected(e);
  }
  return 0;
}
