// Tokenizer microbenchmarks: GPT-2 byte-level BPE encode/decode throughput on ~1 MB of
// English-like text built from the golden strings of shared/data/gpt2 (found through
// $ZO2_SHARED_DIR or the build's ZO2_DEFAULT_SHARED_DIR).
#include <benchmark/benchmark.h>

#include "models/tokenizer.h"

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>

namespace {

namespace fs = std::filesystem;

fs::path gpt2_dir() {
  if (const char* env = std::getenv("ZO2_SHARED_DIR"); env && *env) return fs::path(env) / "data" / "gpt2";
#ifdef ZO2_DEFAULT_SHARED_DIR
  return fs::path(ZO2_DEFAULT_SHARED_DIR) / "data" / "gpt2";
#else
  return fs::path("../shared") / "data" / "gpt2";
#endif
}

bool have_data() { return fs::exists(gpt2_dir() / "encoder.json") && fs::exists(gpt2_dir() / "vocab.bpe"); }

const zo2::Tokenizer& gpt2() {
  static const std::unique_ptr<zo2::Tokenizer> tok =
      zo2::Tokenizer::from_vocab_merges(gpt2_dir() / "encoder.json", gpt2_dir() / "vocab.bpe");
  return *tok;
}

// The golden strings in a shuffled order, joined by spaces and newlines, up to ~1 MB.
const std::string& corpus() {
  static const std::string text = [] {
    std::ifstream in(gpt2_dir() / "golden-ids.json");
    std::stringstream ss;
    ss << in.rdbuf();
    std::vector<std::string> pieces;
    const nlohmann::json golden = nlohmann::json::parse(ss.str());
    for (const auto& c : golden["cases"]) pieces.push_back(c["text"].get<std::string>());
    std::mt19937 rng(42);
    std::uniform_int_distribution<std::size_t> pick(0, pieces.size() - 1);
    std::string out;
    out.reserve((1 << 20) + 256);
    for (std::size_t n = 0; out.size() < (1u << 20); ++n) {
      out += pieces[pick(rng)];
      out += n % 8 == 7 ? "\n" : " ";
    }
    return out;
  }();
  return text;
}

void BM_TokenizerGpt2Encode(benchmark::State& state) {
  if (!have_data()) {
    state.SkipWithError("shared/data/gpt2 not found (set ZO2_SHARED_DIR)");
    return;
  }
  const auto& tok = gpt2();
  const std::string& text = corpus();
  std::size_t tokens = 0;
  for (auto _ : state) {
    auto ids = tok.encode(text);
    tokens = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(text.size()));
  state.counters["tokens"] = static_cast<double>(tokens);
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens) * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_TokenizerGpt2Encode)->Unit(benchmark::kMillisecond);
// Several threads encoding at once share the word cache.
BENCHMARK(BM_TokenizerGpt2Encode)->Unit(benchmark::kMillisecond)->UseRealTime()->Threads(2);

// Words never seen before: every word goes through the merges (the cache only misses).
void BM_TokenizerGpt2EncodeUncached(benchmark::State& state) {
  if (!have_data()) {
    state.SkipWithError("shared/data/gpt2 not found (set ZO2_SHARED_DIR)");
    return;
  }
  const auto& tok = gpt2();
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> letter('a', 'z'), len(3, 10);
  std::uint64_t round = 0;
  for (auto _ : state) {
    state.PauseTiming();
    std::string text;  // ~64 KB of random lowercase words, new ones each round
    while (text.size() < (64u << 10)) {
      text += ' ';
      for (int n = len(rng); n > 0; --n) text += static_cast<char>(letter(rng));
    }
    text += std::to_string(round++);
    state.ResumeTiming();
    auto ids = tok.encode(text);
    benchmark::DoNotOptimize(ids.data());
    state.SetBytesProcessed(state.bytes_processed() + static_cast<std::int64_t>(text.size()));
  }
}
BENCHMARK(BM_TokenizerGpt2EncodeUncached)->Unit(benchmark::kMillisecond);

void BM_TokenizerGpt2Decode(benchmark::State& state) {
  if (!have_data()) {
    state.SkipWithError("shared/data/gpt2 not found (set ZO2_SHARED_DIR)");
    return;
  }
  const auto& tok = gpt2();
  const auto ids = tok.encode(corpus());
  for (auto _ : state) {
    auto text = tok.decode(ids);
    benchmark::DoNotOptimize(text.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(corpus().size()));
}
BENCHMARK(BM_TokenizerGpt2Decode)->Unit(benchmark::kMillisecond);

void BM_TokenizerGpt2Load(benchmark::State& state) {
  if (!have_data()) {
    state.SkipWithError("shared/data/gpt2 not found (set ZO2_SHARED_DIR)");
    return;
  }
  for (auto _ : state) {
    auto tok = zo2::Tokenizer::from_vocab_merges(gpt2_dir() / "encoder.json", gpt2_dir() / "vocab.bpe");
    benchmark::DoNotOptimize(tok.get());
  }
}
BENCHMARK(BM_TokenizerGpt2Load)->Unit(benchmark::kMillisecond);

}  // namespace
