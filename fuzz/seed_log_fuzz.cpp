// A run's seed_log.jsonl (SeedLog::read: the header line, then one line per step).
#include "fuzz/fuzz_util.h"
#include "runtime/error.h"
#include "zo/seed_log.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zo2::fuzz::silence_log();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto file = zo2::fuzz::scratch_file("seed_log.jsonl", {reinterpret_cast<const char*>(data), size});
  try {
    const auto log = zo2::SeedLog::read(file);
    double sum = static_cast<double>(log.header.first_step + log.header.run_seed);
    for (const auto& e : log.entries) sum += e.g + e.lr + e.eps + e.wd + static_cast<double>(e.step);
    if (sum == 0x5eed) return 0;
  } catch (const zo2::Error& e) {
    zo2::fuzz::rejected(e);
  }
  return 0;
}
