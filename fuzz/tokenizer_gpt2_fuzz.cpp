// GPT-2 BPE files: vocab.json and merges.txt, given as one input cut at its first NUL byte
// (vocab.json, NUL, merges.txt).
#include "fuzz/fuzz_util.h"
#include "fuzz/tokenizer_exercise.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zo2::fuzz::silence_log();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto parts = zo2::fuzz::split_input(data, size, 2);
  const auto vocab = zo2::fuzz::scratch_file("vocab.json", parts[0]);
  const auto merges = zo2::fuzz::scratch_file("merges.txt", parts[1]);
  try {
    const auto tok = zo2::Tokenizer::from_vocab_merges(vocab, merges);
    zo2::fuzz::exercise(*tok);
  } catch (const zo2::Error& e) {
    zo2::fuzz::rejected(e);
  }
  return 0;
}
