// The special-token configuration Tokenizer::from_dir reads next to the tokenizer:
// tokenizer_config.json, special_tokens_map.json and config.json, given as one input cut at
// its first two NUL bytes (an empty part: that file is absent). The tokenizer itself is the
// trimmed GPT-2 vocabulary in fuzz/data/gpt2-trim.
#include "fuzz/fuzz_util.h"
#include "fuzz/tokenizer_exercise.h"

#include <filesystem>

namespace fs = std::filesystem;

namespace {
fs::path g_dir;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zo2::fuzz::silence_log();
  g_dir = zo2::fuzz::scratch_dir() / "tok";
  fs::create_directories(g_dir);
  for (const char* f : {"vocab.json", "merges.txt"})
    fs::copy_file(zo2::fuzz::source_dir() / "data/gpt2-trim" / f, g_dir / f, fs::copy_options::overwrite_existing);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto parts = zo2::fuzz::split_input(data, size, 3);
  const char* names[] = {"tokenizer_config.json", "special_tokens_map.json", "config.json"};
  for (int i = 0; i < 3; ++i) {
    if (parts[i].empty())
      fs::remove(g_dir / names[i]);
    else
      zo2::fuzz::write_file(g_dir / names[i], parts[i]);
  }
  try {
    const auto tok = zo2::Tokenizer::from_dir(g_dir);
    zo2::fuzz::exercise(*tok);
  } catch (const zo2::Error& e) {
    zo2::fuzz::rejected(e);
  }
  return 0;
}
