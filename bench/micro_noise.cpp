// The CPU's z generators, one core, per loop (runtime/cpu/noise_simd.h, Note [Noise ISA]):
// normals (Philox4x32-10 + Box–Muller) and raw Philox words, 4096 groups (16384 values) per
// call, for each loop this build and CPU can run. The time per value is the figure
// bench/RESULTS.md quotes (1.52 ns AVX2, 1.01 ns AVX-512 on a Zen 4 core).
//
//   build/bench/zo2_microbench --benchmark_filter='Noise' --benchmark_min_time=0.3
#include <benchmark/benchmark.h>

#include "runtime/cpu/noise_simd.h"

#include <fmt/format.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace zo2;
using namespace zo2::cpu;

constexpr std::int64_t kGroups = 4096;

// noise_normals (T = float) or noise_words (T = std::uint32_t), kGroups groups per call.
template <class T>
void generate(benchmark::State& state, NoiseIsa isa) {
  std::vector<T> out(4 * kGroups);
  std::uint64_t q = 0;
  for (auto _ : state) {
    if constexpr (std::is_same_v<T, float>)
      noise_normals(isa, 0x5eed, 0x6b6579, q, kGroups, out.data(), NoiseDomain::normal);
    else
      noise_words(isa, 0x5eed, 0x6b6579, q, kGroups, out.data(), NoiseDomain::rounding);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    q += kGroups;
  }
  state.SetItemsProcessed(state.iterations() * 4 * kGroups);  // items/s = values per second
}

const bool registered = [] {
  for (NoiseIsa isa : {NoiseIsa::scalar, NoiseIsa::avx2, NoiseIsa::avx512}) {
    if (!noise_isa_available(isa)) continue;
    const std::string name(noise_isa_name(isa));
    benchmark::RegisterBenchmark(fmt::format("Noise.Normals/cpu/{}", name).c_str(),
                                 [isa](benchmark::State& st) { generate<float>(st, isa); });
    benchmark::RegisterBenchmark(fmt::format("Noise.PhiloxWords/cpu/{}", name).c_str(),
                                 [isa](benchmark::State& st) { generate<std::uint32_t>(st, isa); });
  }
  return true;
}();

}  // namespace
