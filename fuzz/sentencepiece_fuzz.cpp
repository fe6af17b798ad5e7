// A SentencePiece tokenizer.model (a protobuf parsed by libsentencepiece, which is not
// instrumented: the coverage is zo2's side, the sanitizers watch both).
#include "fuzz/fuzz_util.h"
#include "fuzz/tokenizer_exercise.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zo2::fuzz::silence_log();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto file = zo2::fuzz::scratch_file("tokenizer.model", {reinterpret_cast<const char*>(data), size});
  try {
    const auto tok = zo2::Tokenizer::from_sentencepiece(file);
    zo2::fuzz::exercise(*tok);
  } catch (const zo2::Error& e) {
    zo2::fuzz::rejected(e);
  }
  return 0;
}
