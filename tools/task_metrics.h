// MeZO's task metrics (large_models/metrics.py), as zo2-tune's eval reports them; header-only
// so that tools/dataset.cpp, its fuzz target and the tests share one definition.
//
//  - normalize_answer: SQuAD v1.1's official normalization (evaluate-v1.1.py, which MeZO's
//    copies): lower-case, drop ASCII punctuation (Python's string.punctuation), drop the
//    words a/an/the, collapse whitespace. Python 3 str semantics are followed where the
//    text is not ASCII: lower() is the full Unicode lowercase (ICU's root locale, as
//    str.lower(): final sigma, "İ" → "i̇"), a word character for \b is "_" or one that
//    str.isalnum() accepts (a letter or a character with a numeric value: not "€", not a
//    combining mark), and split() breaks on Unicode whitespace (str.isspace()).
//  - drop_eval's float() is Python's: Unicode white space around, Unicode decimal digits
//    ("١٢" = 12.0, "１２" = 12.0).
//  - qa_f1 / qa_em: the max over the gold answers of the token F1 (Counter intersection,
//    0 when nothing is shared) and exact match. MeZO's F1 special case: when the first gold
//    answer is "CANNOTANSWER" or "no answer", F1 is exact match with it. MeZO scores DROP
//    with these same functions over the answer spans (no DROP number normalization, no
//    multi-span bag alignment): that is what its reported DROP F1 is.
//  - MultiRC: MeZO reports accuracy over answer options (MultiRCDataset has no
//    metric_name); SuperGLUE's F1a (binary F1 of the "true" class over every answer option)
//    and EM (a question counts when all its options are right) are given alongside.
#pragma once
#include "models/tokenizer_text.h"
#include "models/utf8.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace zo2::cli::metrics {

namespace detail {

// UTF-8 → code points; an invalid byte becomes U+FFFD (Python would have refused to decode,
// so any choice is ours; this one keeps going).
inline std::vector<char32_t> decode_utf8(std::string_view s) {
  std::vector<char32_t> out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + static_cast<std::size_t>(n) > s.size()) {
      out.push_back(0xFFFD);
      ++i;
      continue;
    }
    char32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
    bool ok = true;
    for (int k = 1; k < n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
      if ((d >> 6) != 2) ok = false;
      cp = (cp << 6) | (d & 0x3F);
    }
    if (!ok) {
      out.push_back(0xFFFD);
      ++i;
      continue;
    }
    out.push_back(cp);
    i += static_cast<std::size_t>(n);
  }
  return out;
}

using zo2::append_utf8;  // models/utf8.h

// Python's str.lower() of the text's code points (decode_utf8's): the full Unicode
// lowercase, context included (final sigma), from ICU rather than a table of our own.
inline std::vector<char32_t> lower_code_points(std::string_view s) {
  std::string valid;
  for (char32_t c : decode_utf8(s)) append_utf8(valid, c);
  std::string lowered;
  tok::unicode_lowercase(valid, lowered);
  return decode_utf8(lowered);
}

// Python's str.split() separators.
inline bool is_space(char32_t c) {
  return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

// \w of Python 3's re on str: "_" and what str.isalnum() accepts — a letter (L*) or a
// character with a numeric value ("²", "½", "Ⅻ", "一"); symbols ("€", "°"), punctuation and
// combining marks are not word characters.
inline bool is_word(char32_t c) {
  if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  return tok::is_alnum(c);
}

inline bool is_ascii_punct(char32_t c) {
  return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) || (c >= 0x7B && c <= 0x7E);
}

}  // namespace detail

// The normalized answer as its whitespace-separated tokens; `lower_and_unpunct` false: only
// the articles and the whitespace (drop_eval applies the first two steps itself).
inline std::vector<std::string> answer_tokens(std::string_view s, bool lower_and_unpunct = true) {
  using namespace detail;
  // lower (the whole text: final sigma looks at its neighbours), then remove punctuation
  std::u32string t;
  for (char32_t c : lower_and_unpunct ? lower_code_points(s) : decode_utf8(s))
    if (!lower_and_unpunct || !is_ascii_punct(c)) t.push_back(c);
  // remove articles: re.sub(r'\b(a|an|the)\b', ' ', t), leftmost-first alternation
  std::u32string u;
  const std::size_t n = t.size();
  for (std::size_t i = 0; i < n;) {
    const bool start = i == 0 || !is_word(t[i - 1]);
    std::size_t len = 0;
    if (start) {
      for (std::u32string_view w : {std::u32string_view(U"a"), std::u32string_view(U"an"), std::u32string_view(U"the")})
        if (t.compare(i, w.size(), w) == 0 && (i + w.size() == n || !is_word(t[i + w.size()]))) {
          len = w.size();
          break;
        }
    }
    if (len > 0) {
      u.push_back(' ');
      i += len;
    } else {
      u.push_back(t[i++]);
    }
  }
  // white_space_fix: split on whitespace
  std::vector<std::string> tokens;
  std::string cur;
  bool in = false;
  for (char32_t c : u) {
    if (is_space(c)) {
      if (in) tokens.push_back(std::move(cur));
      cur.clear();
      in = false;
    } else {
      append_utf8(cur, c);
      in = true;
    }
  }
  if (in) tokens.push_back(std::move(cur));
  return tokens;
}

inline std::string normalize_answer(std::string_view s) {
  std::string out;
  for (const auto& t : answer_tokens(s)) {
    if (!out.empty()) out += ' ';
    out += t;
  }
  return out;
}

inline std::string normalize_answer_keep_punct(std::string_view s) {
  std::string out;
  for (const auto& t : answer_tokens(s, false)) {
    if (!out.empty()) out += ' ';
    out += t;
  }
  return out;
}

// Token F1 of one prediction against one gold answer (SQuAD v1.1's f1_score).
inline double token_f1(std::string_view prediction, std::string_view gold) {
  const auto p = answer_tokens(prediction), g = answer_tokens(gold);
  std::map<std::string, std::int64_t> count;
  for (const auto& t : g) ++count[t];
  std::int64_t same = 0;
  for (const auto& t : p) {
    auto it = count.find(t);
    if (it != count.end() && it->second > 0) {
      --it->second;
      ++same;
    }
  }
  if (same == 0) return 0.0;
  const double precision = static_cast<double>(same) / static_cast<double>(p.size());
  const double recall = static_cast<double>(same) / static_cast<double>(g.size());
  return 2 * precision * recall / (precision + recall);
}

// MeZO's F1 of a prediction against the gold answers; 0 when there are none.
inline double qa_f1(std::string_view prediction, const std::vector<std::string>& golds) {
  if (golds.empty()) return 0.0;
  if (golds[0] == "CANNOTANSWER" || golds[0] == "no answer")
    return normalize_answer(golds[0]) == normalize_answer(prediction) ? 1.0 : 0.0;
  double best = 0;
  for (const auto& g : golds) best = std::max(best, token_f1(prediction, g));
  return best;
}

// MeZO's exact match: 1 when the normalized prediction equals a normalized gold answer.
inline double qa_em(std::string_view prediction, const std::vector<std::string>& golds) {
  const std::string p = normalize_answer(prediction);
  for (const auto& g : golds)
    if (normalize_answer(g) == p) return 1.0;
  return 0.0;
}

// ---- DROP's official metric (drop_eval.py of allenai/allennlp-reading-comprehension) -----
// Reported beside MeZO's F1/EM for drop. A gold answer is a tuple of strings (its number,
// its spans, or its date "day month year"); each string is normalized token by token
// (tokens split at " " and "-"; lower-case; punctuation dropped unless the token parses as
// a Python float; a number written as Python's str(float(x)), so "24" == "24.0"; articles
// dropped), a string becomes the set of its tokens (a bag), F1 between bags is set F1,
// and a gold bag with numbers scores 0 unless the prediction shares one. The prediction
// here is one string (a generation), so the optimal assignment of drop_eval's _align_bags
// is the gold bag with the best F1 and the answer's F1 is that over max(#gold bags, 1);
// EM needs the one normalized gold string. F1 is rounded to 2 places as drop_eval does;
// the question's score is the max over its gold answers.

namespace detail {

// Python's float(text): surrounding whitespace, a sign, digits with single underscores
// between them, a fraction, an exponent, or inf/infinity/nan in any case. As CPython
// (_PyUnicode_TransformDecimalAndSpaceToASCII), Unicode white space counts as a space and a
// Unicode decimal digit as its ASCII digit first; any other non-ASCII character refuses.
inline bool py_float(std::string_view text, double* out) {
  std::string ascii;
  for (char32_t c : decode_utf8(text)) {
    if (c < 0x80) {
      ascii += static_cast<char>(c);
    } else if (is_space(c)) {
      ascii += ' ';
    } else if (const int d = tok::decimal_digit_value(c); d >= 0) {
      ascii += static_cast<char>('0' + d);
    } else {
      return false;
    }
  }
  std::string_view t = ascii;
  const auto ws = [](char c) { return c == ' ' || (c >= '\t' && c <= '\r'); };
  while (!t.empty() && ws(t.front())) t.remove_prefix(1);
  while (!t.empty() && ws(t.back())) t.remove_suffix(1);
  if (t.empty()) return false;
  std::string clean;
  std::size_t i = 0;
  if (t[0] == '+' || t[0] == '-') clean += t[i++];
  std::string rest;
  for (std::size_t k = i; k < t.size(); ++k) rest += static_cast<char>(std::tolower(static_cast<unsigned char>(t[k])));
  if (rest == "inf" || rest == "infinity" || rest == "nan") {
    if (out) *out = rest == "nan" ? std::numeric_limits<double>::quiet_NaN()
                                  : (clean == "-" ? -1 : 1) * std::numeric_limits<double>::infinity();
    return true;
  }
  bool digits = false, dot = false, exp = false, exp_digits = false;
  for (; i < t.size(); ++i) {
    const char c = t[i];
    if (c >= '0' && c <= '9') {
      (exp ? exp_digits : digits) = true;
      clean += c;
    } else if (c == '_') {  // only between two digits
      if (i == 0 || i + 1 >= t.size() || !(t[i - 1] >= '0' && t[i - 1] <= '9') || !(t[i + 1] >= '0' && t[i + 1] <= '9'))
        return false;
    } else if (c == '.' && !dot && !exp) {
      dot = true;
      clean += c;
    } else if ((c == 'e' || c == 'E') && digits && !exp) {
      exp = true;
      clean += c;
      if (i + 1 < t.size() && (t[i + 1] == '+' || t[i + 1] == '-')) clean += t[++i];
    } else {
      return false;
    }
  }
  if (!digits || (exp && !exp_digits)) return false;
  if (out) std::from_chars(clean.data(), clean.data() + clean.size(), *out);  // (not strtod: locale-free)
  return true;
}

inline std::string fmt_exp(const std::string& mantissa, int exp10) {
  const int a = exp10 < 0 ? -exp10 : exp10;
  return mantissa + (exp10 < 0 ? "e-" : "e+") + (a < 10 ? "0" : "") + std::to_string(a);
}

// Python's str(float): repr, the shortest digits that round-trip, positional for decimal
// exponents in [-4, 16), else d.ddde±XX.
inline std::string py_float_str(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // [-]d[.ddd]e±XX
  std::string sign;
  if (sci[0] == '-') {
    sign = "-";
    sci.erase(0, 1);
  }
  const auto e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exp10 = std::stoi(sci.substr(e + 1));
  if (exp10 < -4 || exp10 >= 16) {
    std::string m = digits.substr(0, 1);
    if (digits.size() > 1) m += "." + digits.substr(1);
    return fmt_exp(sign + m, exp10);
  }
  std::string s;
  if (exp10 < 0) {
    s = "0." + std::string(static_cast<std::size_t>(-exp10 - 1), '0') + digits;
  } else if (static_cast<int>(digits.size()) <= exp10 + 1) {
    s = digits + std::string(static_cast<std::size_t>(exp10 + 1) - digits.size(), '0') + ".0";
  } else {
    s = digits.substr(0, static_cast<std::size_t>(exp10 + 1)) + "." + digits.substr(static_cast<std::size_t>(exp10 + 1));
  }
  return sign + s;
}

}  // namespace detail

// drop_eval's _normalize_answer.
inline std::string drop_normalize(std::string_view text) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  for (std::size_t i = 0; i <= text.size(); ++i) {
    if (i < text.size() && text[i] != ' ' && text[i] != '-') continue;
    std::string tok;
    for (char32_t c : detail::lower_code_points(text.substr(start, i - start))) detail::append_utf8(tok, c);
    if (!detail::py_float(tok, nullptr)) {  // _remove_punc
      std::string kept;
      for (char c : tok)
        if (!detail::is_ascii_punct(static_cast<unsigned char>(c))) kept += c;
      tok = std::move(kept);
    }
    double v = 0;
    if (detail::py_float(tok, &v)) tok = detail::py_float_str(v);  // _normalize_number
    const std::string part = normalize_answer_keep_punct(tok);     // articles, whitespace
    if (!part.empty()) parts.push_back(part);
    start = i + 1;
  }
  std::string out;
  for (const auto& p : parts) out += (out.empty() ? "" : " ") + p;
  return out;
}

struct DropScore {
  double em = 0, f1 = 0;
};

// drop_eval's get_metrics for a one-string prediction against one gold answer (its strings).
inline DropScore drop_metrics(std::string_view prediction, const std::vector<std::string>& gold) {
  auto bag = [](const std::string& s) {
    std::vector<std::string> b;
    std::size_t at = 0;
    while (at < s.size()) {
      const auto sp = s.find(' ', at);
      const std::string w = s.substr(at, sp == std::string::npos ? std::string::npos : sp - at);
      if (!w.empty() && std::find(b.begin(), b.end(), w) == b.end()) b.push_back(w);
      if (sp == std::string::npos) break;
      at = sp + 1;
    }
    return b;
  };
  const std::string p = drop_normalize(prediction);
  const auto pb = bag(p);
  DropScore s;
  std::vector<std::string> gn;
  for (const auto& g : gold) gn.push_back(drop_normalize(g));
  s.em = gn.size() == 1 && gn[0] == p ? 1.0 : 0.0;
  double best = 0;
  for (const auto& g : gn) {
    const auto gb = bag(g);
    bool gold_has_number = false, shared_number = false;
    for (const auto& w : gb)
      if (detail::py_float(w, nullptr)) {
        gold_has_number = true;
        if (std::find(pb.begin(), pb.end(), w) != pb.end()) shared_number = true;
      }
    if (gold_has_number && !shared_number) continue;
    std::size_t inter = 0;
    for (const auto& w : gb) inter += std::find(pb.begin(), pb.end(), w) != pb.end();
    const double precision = pb.empty() ? 1.0 : static_cast<double>(inter) / static_cast<double>(pb.size());
    const double recall = gb.empty() ? 1.0 : static_cast<double>(inter) / static_cast<double>(gb.size());
    const double f1 = precision == 0 && recall == 0 ? 0.0 : 2 * precision * recall / (precision + recall);
    best = std::max(best, f1);
  }
  const double mean = best / static_cast<double>(std::max<std::size_t>(1, gn.size()));
  // Python's round(x, 2): the exact binary value rounded, as to_chars does; locale-free.
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, mean, std::chars_format::fixed, 2);
  std::from_chars(buf, r.ptr, s.f1);
  return s;
}

// A DROP question: the max over its gold answers (drop_eval skips golds whose first string is blank).
inline DropScore drop_question(std::string_view prediction, const std::vector<std::vector<std::string>>& golds) {
  DropScore best;
  for (const auto& g : golds) {
    if (g.empty()) continue;
    bool blank = true;  // Python's strip(): Unicode white space
    for (char32_t c : detail::decode_utf8(g[0])) blank = blank && detail::is_space(c);
    if (blank) continue;
    const auto s = drop_metrics(prediction, g);
    best.em = std::max(best.em, s.em);
    best.f1 = std::max(best.f1, s.f1);
  }
  return best;
}

// SuperGLUE's MultiRC scores from per-option predictions: `question[i]` groups the options.
struct MultiRCScores {
  double f1a = 0;  // binary F1 of label 1 over all options (0 when there is no true positive)
  double em = 0;   // fraction of questions whose every option is predicted right
};
inline MultiRCScores multirc_scores(const std::vector<int>& predicted, const std::vector<int>& gold,
                                    const std::vector<std::int64_t>& question) {
  MultiRCScores s;
  std::int64_t tp = 0, fp = 0, fn = 0;
  std::map<std::int64_t, bool> all_right;
  for (std::size_t i = 0; i < predicted.size(); ++i) {
    tp += predicted[i] == 1 && gold[i] == 1;
    fp += predicted[i] == 1 && gold[i] != 1;
    fn += predicted[i] != 1 && gold[i] == 1;
    auto [it, fresh] = all_right.emplace(question[i], true);
    it->second = it->second && predicted[i] == gold[i];
  }
  s.f1a = tp == 0 ? 0.0 : 2.0 * static_cast<double>(tp) / static_cast<double>(2 * tp + fp + fn);
  std::int64_t right = 0;
  for (const auto& [q, ok] : all_right) right += ok;
  s.em = all_right.empty() ? 0.0 : static_cast<double>(right) / static_cast<double>(all_right.size());
  return s;
}

}  // namespace zo2::cli::metrics
