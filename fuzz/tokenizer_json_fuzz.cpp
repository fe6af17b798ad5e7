// A Hugging Face tokenizer.json (BPE model, pre-tokenizer, decoder, added tokens,
// post-processor).
#include "fuzz/fuzz_util.h"
#include "fuzz/tokenizer_exercise.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zo2::fuzz::silence_log();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto file = zo2::fuzz::scratch_file("tokenizer.json", {reinterpret_cast<const char*>(data), size});
  try {
    const auto tok = zo2::Tokenizer::from_tokenizer_json(file);
    zo2::fuzz::exercise(*tok);
  } catch (const zo2::Error& e) {
    zo2::fuzz::rejected(e);
  }
  return 0;
}
