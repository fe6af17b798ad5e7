// Text helpers of the tokenizer.json pipeline (models/tokenizer_bpe.cpp): UTF-8 stepping,
// Unicode normalization, case mapping and white space from ICU (libicuuc), a PCRE2 regex
// with per-thread match data, and the tokenizer.json normalizers (NFC, NFD, NFKC, NFKD,
// Replace, Prepend, Lowercase, Strip, Sequence).
//
// Ill-formed UTF-8 is never an error here: the Unicode operations apply to each well-formed
// run and copy the other bytes unchanged, so decode(encode(s)) keeps any byte string.
#pragma once
#include <nlohmann/json_fwd.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace zo2::tok {

// Length (1–4) of the well-formed UTF-8 sequence that starts at s[i], or 0 when the bytes
// there are ill-formed (stray continuation byte, overlong form, surrogate, > U+10FFFF,
// truncated).
std::size_t utf8_len(std::string_view s, std::size_t i);
// The code point of a well-formed sequence of length n at s[i].
char32_t utf8_decode(std::string_view s, std::size_t i, std::size_t n);
// Unicode White_Space (what Rust's char::is_whitespace tests).
bool is_white_space(char32_t c);

enum class NormalForm { nfc, nfd, nfkc, nfkd };
// out = the normalization form of in (ASCII text is returned unchanged without ICU).
void unicode_normalize(std::string_view in, NormalForm form, std::string& out);
// out = the full Unicode lowercase of in (ICU's root locale: final sigma, no Turkish i).
void unicode_lowercase(std::string_view in, std::string& out);
// out = the full Unicode uppercase of in (ICU's root locale: "ß" → "SS"), as Python's str.upper().
void unicode_uppercase(std::string_view in, std::string& out);
// Unicode Lowercase (Python's str.islower() of one character).
bool is_lowercase(char32_t c);
// A letter (general category L*) or a character with a numeric value (Numeric_Type not
// None): Python's str.isalnum() of one character, which with "_" is \w of Python 3's re.
bool is_alnum(char32_t c);
// The value of a decimal digit (general category Nd: "7", "٧", "７"), else -1: the digits
// Python's int() and float() accept.
int decimal_digit_value(char32_t c);

// A HF (Oniguruma) pattern rewritten for PCRE2: \s becomes the class of Unicode White_Space
// (U+0009–000D, 0020, 0085, 00A0, 1680, 2000–200A, 2028, 2029, 202F, 205F, 3000) and \S its
// complement, in and out of character classes; PCRE2's own \s has U+180E besides. Escaped
// backslashes, \Q...\E and (?#...) are left alone.
std::string oniguruma_white_space(std::string_view pattern);

// A PCRE2 pattern (UTF, Unicode properties, JIT; \s as above), or a literal string.
class Regex {
 public:
  Regex(std::string_view pattern, bool literal, std::string_view where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // The calling thread's match data (one thread-local lookup for many find calls).
  struct State;
  static State& state();
  // The first match at or after start: [begin, end) (possibly empty); false if none.
  bool find(State& st, std::string_view s, std::size_t start, std::size_t& begin, std::size_t& end) const;
  // The matches left to right, as HF's find_iter (the onig crate's FindMatches) gives them:
  // empty ones included, except an empty match found right after a non-empty one; nothing in
  // an empty string. After an empty match the search resumes one character further on.
  template <class F>
  void for_each_match(std::string_view s, F&& f) const {
    if (s.empty()) return;
    State& st = state();
    std::size_t start = 0, b = 0, e = 0;
    bool skip_next_empty = false;
    while (start <= s.size() && find(st, s, start, b, e)) {
      start = e;
      if (b == e) {
        const std::size_t n = start < s.size() ? utf8_len(s, start) : 0;
        start += n == 0 ? 1 : n;
        if (skip_next_empty) {
          skip_next_empty = false;
          continue;
        }
      } else {
        skip_next_empty = true;
      }
      f(b, e);
    }
  }

 private:
  void* code_ = nullptr;  // pcre2_code_8
  bool jit_ = false;
};

// A tokenizer.json "normalizer": the steps applied to each piece of text between added tokens,
// before pre-tokenization.
class Normalizer {
 public:
  // Parses the JSON object at `field` of the file `where`; errors name both. A null JSON value
  // gives an empty normalizer.
  Normalizer(const nlohmann::json& j, const std::string& where, const std::string& field);
  ~Normalizer();
  Normalizer(Normalizer&&) noexcept;
  bool empty() const { return steps_.empty(); }
  // s = normalized s.
  void apply(std::string& s) const;

 private:
  struct Step;
  void parse(const nlohmann::json& j, const std::string& where, const std::string& field);
  std::vector<Step> steps_;
};

}  // namespace zo2::tok
