// UTF-8 stepping, ICU normalization/case mapping, the PCRE2 regex and the tokenizer.json
// normalizers (see tokenizer_text.h).
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <unicode/bytestream.h>
#include <unicode/casemap.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>

#include "models/tokenizer_text.h"
#include "runtime/error.h"

#include <nlohmann/json.hpp>

#include <variant>

namespace zo2::tok {

using json = nlohmann::json;

namespace {

std::string excerpt(std::string_view s, std::size_t max = 60) {
  if (s.size() <= max) return std::string(s);
  return std::string(s.substr(0, max)) + "...";
}

bool is_ascii(std::string_view s) {
  for (unsigned char c : s)
    if (c >= 0x80) return false;
  return true;
}

// Calls run(piece) for each maximal well-formed UTF-8 run and raw(piece) for each
// ill-formed byte, in order.
template <class Run, class Raw>
void for_each_utf8_run(std::string_view s, Run&& run, Raw&& raw) {
  std::size_t i = 0, start = 0;
  while (i < s.size()) {
    std::size_t n = utf8_len(s, i);
    if (n > 0) {
      i += n;
      continue;
    }
    if (i > start) run(s.substr(start, i - start));
    raw(s.substr(i, 1));
    start = ++i;
  }
  if (i > start) run(s.substr(start, i - start));
}

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  int n = pcre2_get_error_message(code, buf, sizeof buf);
  return n < 0 ? "unknown PCRE2 error " + std::to_string(code) : std::string(reinterpret_cast<char*>(buf), n);
}

}  // namespace

// Per-thread match data (one ovector pair is all a match needs) and a JIT stack large enough
// for long runs of white space.
struct Regex::State {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* stack = nullptr;
  const PCRE2_SIZE* ovector = nullptr;
  State() {
    data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    if (!data || !context || !stack) fail(ErrorKind::out_of_memory, "PCRE2: cannot allocate match data");
    pcre2_jit_stack_assign(context, nullptr, stack);
    ovector = pcre2_get_ovector_pointer(data);
  }
  ~State() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
};

Regex::State& Regex::state() {
  thread_local State ms;
  return ms;
}

namespace {

const icu::Normalizer2& normalizer2(NormalForm form) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* n = nullptr;
  switch (form) {
    case NormalForm::nfc: n = icu::Normalizer2::getNFCInstance(status); break;
    case NormalForm::nfd: n = icu::Normalizer2::getNFDInstance(status); break;
    case NormalForm::nfkc: n = icu::Normalizer2::getNFKCInstance(status); break;
    case NormalForm::nfkd: n = icu::Normalizer2::getNFKDInstance(status); break;
  }
  if (U_FAILURE(status) || !n) fail(ErrorKind::internal, "ICU: cannot load the Unicode normalization data: {}", u_errorName(status));
  return *n;
}

}  // namespace

// ---- UTF-8 and Unicode -----------------------------------------------------------------

std::size_t utf8_len(std::string_view s, std::size_t i) {
  auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  auto cont = [&](std::size_t k, unsigned char lo = 0x80, unsigned char hi = 0xBF) {
    return k < s.size() && b(k) >= lo && b(k) <= hi;
  };
  if (c >= 0xC2 && c <= 0xDF) return cont(i + 1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    const unsigned char lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    return cont(i + 1, lo, hi) && cont(i + 2) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    const unsigned char lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    return cont(i + 1, lo, hi) && cont(i + 2) && cont(i + 3) ? 4 : 0;
  }
  return 0;
}

char32_t utf8_decode(std::string_view s, std::size_t i, std::size_t n) {
  auto b = [&](std::size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(s[i + k])); };
  switch (n) {
    case 1: return b(0);
    case 2: return ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    case 3: return ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    default: return ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
  }
}

bool is_white_space(char32_t c) { return u_hasBinaryProperty(static_cast<UChar32>(c), UCHAR_WHITE_SPACE); }

void unicode_normalize(std::string_view in, NormalForm form, std::string& out) {
  out.clear();
  if (is_ascii(in)) {  // every form leaves ASCII as it is
    out.assign(in);
    return;
  }
  const icu::Normalizer2& n = normalizer2(form);
  icu::StringByteSink<std::string> sink(&out, static_cast<int32_t>(in.size()));
  for_each_utf8_run(
      in,
      [&](std::string_view run) {
        UErrorCode status = U_ZERO_ERROR;
        n.normalizeUTF8(0, icu::StringPiece(run.data(), static_cast<int32_t>(run.size())), sink, nullptr, status);
        if (U_FAILURE(status)) fail(ErrorKind::internal, "ICU: Unicode normalization failed: {}", u_errorName(status));
      },
      [&](std::string_view raw) { out.append(raw); });
}

namespace {

// ICU's full case mapping (root locale) of each well-formed run; other bytes are copied.
void change_case(std::string_view in, std::string& out, bool upper) {
  out.clear();
  if (is_ascii(in)) {
    out.reserve(in.size());
    const char from = upper ? 'a' : 'A', to = upper ? 'A' : 'a';
    for (char c : in) out += (c >= from && c <= from + 25) ? static_cast<char>(c - from + to) : c;
    return;
  }
  icu::StringByteSink<std::string> sink(&out, static_cast<int32_t>(in.size()));
  for_each_utf8_run(
      in,
      [&](std::string_view run) {
        UErrorCode status = U_ZERO_ERROR;
        const icu::StringPiece piece(run.data(), static_cast<int32_t>(run.size()));
        if (upper) icu::CaseMap::utf8ToUpper("", 0, piece, sink, nullptr, status);
        else icu::CaseMap::utf8ToLower("", 0, piece, sink, nullptr, status);
        if (U_FAILURE(status))
          fail(ErrorKind::internal, "ICU: {} failed: {}", upper ? "uppercasing" : "lowercasing", u_errorName(status));
      },
      [&](std::string_view raw) { out.append(raw); });
}

}  // namespace

void unicode_lowercase(std::string_view in, std::string& out) { change_case(in, out, /*upper=*/false); }

void unicode_uppercase(std::string_view in, std::string& out) { change_case(in, out, /*upper=*/true); }

bool is_lowercase(char32_t c) { return u_hasBinaryProperty(static_cast<UChar32>(c), UCHAR_LOWERCASE); }

bool is_alnum(char32_t c) {
  const auto cp = static_cast<UChar32>(c);
  return u_isalpha(cp) || u_getIntPropertyValue(cp, UCHAR_NUMERIC_TYPE) != U_NT_NONE;
}

int decimal_digit_value(char32_t c) {
  const auto cp = static_cast<UChar32>(c);
  return u_charType(cp) == U_DECIMAL_DIGIT_NUMBER ? u_charDigitValue(cp) : -1;
}

// ---- Regex -------------------------------------------------------------------------------

namespace {

// Oniguruma's \s (what HF's regexes run on): Unicode White_Space. PCRE2's \s with UCP adds
// U+180E (its \h list predates Unicode 6.3, which took U+180E out of White_Space).
constexpr std::string_view kWhiteSpaceItems =
    R"(\x{09}-\x{0d}\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000})";
// Everything else, as ranges (for \S inside a class, where a negation cannot be nested).
constexpr std::string_view kNonWhiteSpaceItems =
    R"(\x{00}-\x{08}\x{0e}-\x{1f}\x{21}-\x{84}\x{86}-\x{9f}\x{a1}-\x{167f}\x{1681}-\x{1fff}\x{200b}-\x{2027})"
    R"(\x{202a}-\x{202e}\x{2030}-\x{205e}\x{2060}-\x{2fff}\x{3001}-\x{10ffff})";

}  // namespace

std::string oniguruma_white_space(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 64);
  bool in_class = false;
  std::size_t class_start = 0;  // where the current class's items begin (after "[" or "[^")
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char n = pattern[i + 1];
      if (n == 'Q') {  // \Q...\E: literal text, copied as it is
        const std::size_t end = pattern.find("\\E", i + 2);
        const std::size_t stop = end == std::string_view::npos ? pattern.size() : end + 2;
        out.append(pattern.substr(i, stop - i));
        i = stop - 1;
      } else if (n == 's' || n == 'S') {
        if (in_class)
          out.append(n == 's' ? kWhiteSpaceItems : kNonWhiteSpaceItems);
        else
          out.append(n == 's' ? "[" : "[^").append(kWhiteSpaceItems).append("]");
        ++i;
      } else {  // any other escape (\\ included) is copied whole
        out += c;
        out += n;
        ++i;
      }
      continue;
    }
    if (!in_class) {
      if (c == '(' && pattern.substr(i).starts_with("(?#")) {  // a comment
        const std::size_t end = pattern.find(')', i);
        const std::size_t stop = end == std::string_view::npos ? pattern.size() : end + 1;
        out.append(pattern.substr(i, stop - i));
        i = stop - 1;
        continue;
      }
      if (c == '[') {
        in_class = true;
        out += c;
        if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
        class_start = i + 1;
        continue;
      }
      out += c;
      continue;
    }
    // In a class: "]" first is a literal; "[:name:]" is a POSIX class.
    if (c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
      const std::size_t end = pattern.find(":]", i + 2);
      if (end != std::string_view::npos) {
        out.append(pattern.substr(i, end + 2 - i));
        i = end + 1;
        continue;
      }
    }
    if (c == ']' && i != class_start) in_class = false;
    out += c;
  }
  return out;
}

Regex::Regex(std::string_view pattern_in, bool literal, std::string_view where) {
  int err = 0;
  PCRE2_SIZE off = 0;
  const std::string translated = literal ? std::string() : oniguruma_white_space(pattern_in);
  const std::string_view pattern = literal ? pattern_in : std::string_view(translated);
  // (PCRE2_LITERAL refuses PCRE2_UCP, which a literal does not need.)
  std::uint32_t opts = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), opts, &err, &off, nullptr);
  if (!code)
    fail(ErrorKind::format, "{}: cannot compile the regex \"{}\"{}: {}", where, excerpt(pattern_in, 200),
         literal || translated == pattern_in ? fmt::format(" at offset {}", off) : std::string(), pcre2_message(err));
  code_ = code;
  jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;  // without JIT, pcre2_match interprets
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

bool Regex::find(State& ms, std::string_view s, std::size_t start, std::size_t& begin, std::size_t& end) const {
  auto* code = static_cast<const pcre2_code*>(code_);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  int rc = jit_ ? pcre2_jit_match(code, subject, s.size(), start, 0, ms.data, ms.context)
                : pcre2_match(code, subject, s.size(), start, 0, ms.data, ms.context);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) fail(ErrorKind::invalid_argument, "tokenizer: regex match failed: {}", pcre2_message(rc));
  begin = ms.ovector[0];
  end = ms.ovector[1];
  return true;
}

// ---- Normalizer ----------------------------------------------------------------------------

namespace {
struct FormStep {
  NormalForm form;
};
struct ReplaceStep {
  std::string literal;           // a String pattern
  std::unique_ptr<Regex> regex;  // a Regex pattern
  std::string content;
};
struct PrependStep {
  std::string prefix;
};
struct LowercaseStep {};
struct StripStep {
  bool left = false, right = false;
};

void strip(std::string& s, bool left, bool right) {
  std::size_t b = 0, e = s.size();
  if (left) {
    while (b < e) {
      std::size_t n = utf8_len(s, b);
      if (n == 0 || !is_white_space(utf8_decode(s, b, n))) break;
      b += n;
    }
  }
  if (right) {
    while (e > b) {
      std::size_t k = e - 1;  // the start of the last character
      while (k > b && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80 && e - k < 4) --k;
      std::size_t n = utf8_len(s, k);
      if (n != e - k || !is_white_space(utf8_decode(s, k, n))) break;
      e = k;
    }
  }
  s = s.substr(b, e - b);
}
}  // namespace

struct Normalizer::Step {
  std::variant<FormStep, ReplaceStep, PrependStep, LowercaseStep, StripStep> v;
};

Normalizer::Normalizer(const json& j, const std::string& where, const std::string& field) {
  if (!j.is_null()) parse(j, where, field);
}
Normalizer::~Normalizer() = default;
Normalizer::Normalizer(Normalizer&&) noexcept = default;

void Normalizer::parse(const json& j, const std::string& where, const std::string& field) {
  if (!j.is_object()) fail(ErrorKind::format, "{}: {}: expected an object", where, field);
  auto tit = j.find("type");
  const std::string type = tit != j.end() && tit->is_string() ? tit->get<std::string>() : "(none)";
  auto string_field = [&](const char* k) -> std::string {
    auto it = j.find(k);
    if (it == j.end() || !it->is_string()) fail(ErrorKind::format, "{}: {}.{}: expected a string", where, field, k);
    return it->get<std::string>();
  };
  auto bool_field = [&](const char* k, bool dflt) {
    auto it = j.find(k);
    if (it == j.end() || it->is_null()) return dflt;
    if (!it->is_boolean()) fail(ErrorKind::format, "{}: {}.{}: expected true or false", where, field, k);
    return it->get<bool>();
  };
  if (type == "Sequence") {
    auto it = j.find("normalizers");
    if (it == j.end() || !it->is_array()) fail(ErrorKind::format, "{}: {}.normalizers: expected an array", where, field);
    for (std::size_t i = 0; i < it->size(); ++i) parse((*it)[i], where, field + ".normalizers[" + std::to_string(i) + "]");
  } else if (type == "NFC") {
    steps_.push_back({FormStep{NormalForm::nfc}});
  } else if (type == "NFD") {
    steps_.push_back({FormStep{NormalForm::nfd}});
  } else if (type == "NFKC") {
    steps_.push_back({FormStep{NormalForm::nfkc}});
  } else if (type == "NFKD") {
    steps_.push_back({FormStep{NormalForm::nfkd}});
  } else if (type == "Lowercase") {
    steps_.push_back({LowercaseStep{}});
  } else if (type == "Strip") {
    steps_.push_back({StripStep{bool_field("strip_left", true), bool_field("strip_right", true)}});
  } else if (type == "Prepend") {
    steps_.push_back({PrependStep{string_field("prepend")}});
  } else if (type == "Replace") {
    ReplaceStep r;
    auto pat = j.find("pattern");
    const std::string pfield = field + ".pattern";
    if (pat == j.end() || !pat->is_object())
      fail(ErrorKind::format, "{}: {}: expected {{\"String\": ...}} or {{\"Regex\": ...}}", where, pfield);
    if (auto s = pat->find("String"); s != pat->end() && s->is_string()) {
      r.literal = s->get<std::string>();
      // HF: an empty String matches the empty string at each character boundary.
      if (r.literal.empty()) r.regex = std::make_unique<Regex>("", true, where + ": " + pfield);
    } else if (auto re = pat->find("Regex"); re != pat->end() && re->is_string())
      r.regex = std::make_unique<Regex>(re->get<std::string>(), false, where + ": " + pfield);
    else
      fail(ErrorKind::format, "{}: {}: expected {{\"String\": ...}} or {{\"Regex\": ...}}", where, pfield);
    r.content = string_field("content");
    steps_.push_back({std::move(r)});
  } else {
    fail(ErrorKind::unsupported, "{}: {}.type \"{}\" is not supported", where, field, type);
  }
}

void Normalizer::apply(std::string& s) const {
  std::string tmp;
  for (const Step& step : steps_) {
    if (const auto* f = std::get_if<FormStep>(&step.v)) {
      unicode_normalize(s, f->form, tmp);
      s.swap(tmp);
    } else if (const auto* r = std::get_if<ReplaceStep>(&step.v)) {
      tmp.clear();
      std::size_t pos = 0;
      bool matched = false;
      if (r->regex) {
        r->regex->for_each_match(s, [&](std::size_t b, std::size_t e) {
          tmp.append(s, pos, b - pos).append(r->content);
          pos = e;
          matched = true;
        });
      } else {
        for (std::size_t b; (b = s.find(r->literal, pos)) != std::string::npos; pos = b + r->literal.size()) {
          tmp.append(s, pos, b - pos).append(r->content);
          matched = true;
        }
      }
      if (!matched) continue;
      tmp.append(s, pos, std::string::npos);
      s.swap(tmp);
    } else if (const auto* p = std::get_if<PrependStep>(&step.v)) {
      if (!s.empty()) s.insert(0, p->prefix);
    } else if (std::holds_alternative<LowercaseStep>(step.v)) {
      unicode_lowercase(s, tmp);
      s.swap(tmp);
    } else if (const auto* st = std::get_if<StripStep>(&step.v)) {
      strip(s, st->left, st->right);
    }
  }
}

}  // namespace zo2::tok
