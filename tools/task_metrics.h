// MeZO's task metrics (large_models/metrics.py), as zo2-tune's eval reports them; header-only
// so that tools/dataset.cpp, its fuzz target and the tests share one definition.
//
//  - normalize_answer: SQuAD v1.1's official normalization (evaluate-v1.1.py, which MeZO's
//    copies): lower-case, drop ASCII punctuation (Python's string.punctuation), drop the
//    words a/an/the, collapse whitespace. Python 3 str semantics are followed where the
//    text is not ASCII: lower() of the Latin-1, Latin Extended-A, Greek and Cyrillic
//    capitals, a code point >= 0x80 is a word character for \b unless it is punctuation or
//    a symbol of Latin-1 or General Punctuation, and split() breaks on Unicode whitespace.
//  - qa_f1 / qa_em: the max over the gold answers of the token F1 (Counter intersection,
//    0 when nothing is shared) and exact match. MeZO's F1 special case: when the first gold
//    answer is "CANNOTANSWER" or "no answer", F1 is exact match with it. MeZO scores DROP
//    with these same functions over the answer spans (no DROP number normalization, no
//    multi-span bag alignment): that is what its reported DROP F1 is.
//  - MultiRC: MeZO reports accuracy over answer options (MultiRCDataset has no
//    metric_name); SuperGLUE's F1a (binary F1 of the "true" class over every answer option)
//    and EM (a question counts when all its options are right) are given alongside.
#pragma once

#include <algorithm>
#include <cstdint>
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

inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Python's str.lower() for the scripts that occur in the QA sets (ASCII, Latin-1, Latin
// Extended-A, Greek, Cyrillic); İ (U+0130) lowers to "i̇" as Python does.
inline void lower_into(std::u32string& out, char32_t c) {
  if (c >= 'A' && c <= 'Z') return out.push_back(c + 32);
  if (c < 0x80) return out.push_back(c);
  if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return out.push_back(c + 32);
  if (c == 0x130) {
    out.push_back('i');
    out.push_back(0x307);
    return;
  }
  if (c >= 0x100 && c <= 0x137) return out.push_back((c % 2 == 0) ? c + 1 : c);
  if (c >= 0x139 && c <= 0x148) return out.push_back((c % 2 == 1) ? c + 1 : c);
  if (c >= 0x14A && c <= 0x177) return out.push_back((c % 2 == 0) ? c + 1 : c);
  if (c == 0x178) return out.push_back(0xFF);
  if (c >= 0x179 && c <= 0x17E) return out.push_back((c % 2 == 1) ? c + 1 : c);
  if (c >= 0x391 && c <= 0x3AB && c != 0x3A2) return out.push_back(c + 32);
  if (c >= 0x410 && c <= 0x42F) return out.push_back(c + 32);
  if (c >= 0x400 && c <= 0x40F) return out.push_back(c + 80);
  out.push_back(c);
}

// Python's str.split() separators.
inline bool is_space(char32_t c) {
  return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

// \w of Python 3's re on str: alphanumerics and "_". Beyond ASCII: letters and digits in
// practice, so everything except whitespace, Latin-1's punctuation and symbols, × ÷, and
// General Punctuation / CJK punctuation.
inline bool is_word(char32_t c) {
  if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  if (is_space(c)) return false;
  if (c >= 0xA1 && c <= 0xBF) return c == 0xAA || c == 0xB2 || c == 0xB3 || c == 0xB5 || c == 0xB9 || c == 0xBA ||
                                     c == 0xBC || c == 0xBD || c == 0xBE;
  if (c == 0xD7 || c == 0xF7) return false;
  if (c >= 0x2010 && c <= 0x206F) return false;
  if (c >= 0x3000 && c <= 0x303F) return false;
  return true;
}

inline bool is_ascii_punct(char32_t c) {
  return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) || (c >= 0x7B && c <= 0x7E);
}

}  // namespace detail

// The normalized answer as its whitespace-separated tokens.
inline std::vector<std::string> answer_tokens(std::string_view s) {
  using namespace detail;
  // lower, then remove punctuation
  std::u32string t;
  for (char32_t c : decode_utf8(s)) {
    std::u32string l;
    lower_into(l, c);
    for (char32_t x : l)
      if (!is_ascii_punct(x)) t.push_back(x);
  }
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
