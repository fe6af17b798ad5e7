// What the tokenizer targets do with a tokenizer that loaded: encode a fixed text that
// touches every path (ASCII, Unicode, digits, white space runs, special tokens, invalid
// UTF-8), decode the result and some ids, look tokens up.
#pragma once
#include "models/tokenizer.h"
#include "runtime/error.h"

#include <algorithm>
#include <string_view>

namespace zo2::fuzz {

inline void exercise(const Tokenizer& tok) {
  static constexpr std::string_view kText =
      "Hello world! It's 2026, naïve café — 日本語 😀\t\n  spaces   and 12345 digits."
      "<|endoftext|><s></s><unk><|begin_of_text|> 'll 've \xff\xfe bad \xc3 utf8 \xe2\x82";
  auto ids = tok.encode(kText);
  auto with = tok.encode_with_special(kText);
  for (auto id : with)
    if (id < 0 || id >= tok.vocab_size()) __builtin_trap();  // encode produced an id outside the vocabulary
  try {
    (void)tok.decode(ids);
    (void)tok.decode(with);
  } catch (const Error&) {  // an id without text (a hole in the vocabulary) is refused by name
  }
  const std::int32_t n = tok.vocab_size();
  for (std::int32_t id : {0, 1, 2, 255, 256, n / 2, n - 1, n, -1}) {
    const auto t = tok.id_to_token(id);
    if (!t.empty()) (void)tok.token_to_id(t);
  }
  for (std::int32_t id = 0; id < std::min(n, 64); ++id) {
    try {
      (void)tok.decode(std::span<const std::int32_t>(&id, 1));
    } catch (const Error&) {
    }
  }
  (void)tok.bos_id(), (void)tok.eos_id(), (void)tok.pad_id(), (void)tok.unk_id(), (void)tok.kind();
}

}  // namespace zo2::fuzz
