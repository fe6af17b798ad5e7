#include "tools/dataset.h"

#include "api/generate.h"
#include "api/session.h"
#include "models/safetensors.h"
#include "models/tokenizer_text.h"
#include "runtime/error.h"
#include "runtime/json_file.h"
#include "runtime/log.h"
#include "tools/cli.h"
#include "tools/task_metrics.h"

#include <nlohmann/json.hpp>
#include <oneapi/tbb/parallel_for.h>

#include <exception>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <random>
#include <span>
#include <sstream>

namespace zo2::cli {
namespace {

using json = nlohmann::json;

// One example before tokenization.
struct Record {
  std::string text, prompt, completion;
  std::vector<std::string> options;
  int label = -1;
  std::int64_t line = 0;
  std::vector<int> golds;               // record: every correct option
  std::vector<std::string> answers;     // squad, drop, record: the gold answers' texts
  std::vector<std::string> candidates;  // record: the options' entities
  std::int64_t question = -1;           // multirc: the question of this answer option
  std::string where;                    // squad, drop: "file: JSON path (id)" for errors (else file:line)
  std::vector<std::vector<std::string>> drop_golds;  // drop: "answer" and "validated_answers" as drop_eval reads them
  std::string lead;  // task presets: white space MeZO's lstrip() drops but its option length counts (set_prompt)
};

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string strip(std::string_view s) {
  const auto ws = " \t\r\n\f\v";
  const auto b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  return std::string(s.substr(b, s.find_last_not_of(ws) - b + 1));
}

// Calls fn(line_number, line) for every non-blank line.
template <class F>
void for_each_line(const std::filesystem::path& file, F&& fn) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(ErrorKind::io, "{}: cannot open the data file", file.string());
  std::string line;
  std::int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (n == 1 && line.starts_with("\xEF\xBB\xBF")) line.erase(0, 3);  // a UTF-8 byte order mark: not text
    if (strip(line).empty()) continue;
    fn(n, line);
  }
}

json parse_json_line(const std::filesystem::path& file, std::int64_t n, const std::string& line) {
  json j;
  try {
    // Note [Reading JSON]: refused past kMaxJsonDataDepth, naming file:line.
    j = parse_json_text(line, fmt::format("{}:{}", file.string(), n), kMaxJsonDataDepth);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
    fail(ErrorKind::format, "{}:{}: not valid JSON: {}", file.string(), n, e.what());
  }
  if (!j.is_object()) fail(ErrorKind::format, "{}:{}: expected a JSON object, got {}", file.string(), n, j.type_name());
  return j;
}

std::string string_field(const std::filesystem::path& file, std::int64_t n, const json& j, const char* key) {
  const auto it = j.find(key);
  if (it == j.end()) fail(ErrorKind::format, "{}:{}: no \"{}\" field", file.string(), n, key);
  if (!it->is_string())
    fail(ErrorKind::format, "{}:{}: \"{}\" must be a string, not {}", file.string(), n, key, it->type_name());
  return it->get<std::string>();
}

// A label given as an integer, one of `names`, or — only where the format's labels are
// booleans (BoolQ's true/false) — a boolean (false = 0). Elsewhere a boolean is refused: RTE's
// true would be index 1, "not_entailment", the opposite of what it says.
int label_field(const std::filesystem::path& file, std::int64_t n, const json& j, int count,
                const std::vector<std::string>& names = {}, bool booleans = false) {
  const auto it = j.find("label");
  if (it == j.end())
    fail(ErrorKind::format, "{}:{}: no \"label\" field (the test splits of GLUE/SuperGLUE are unlabeled)",
         file.string(), n);
  int v = -1;
  if (it->is_boolean()) {
    if (!booleans)
      fail(ErrorKind::format, "{}:{}: \"label\" is the boolean {}; it must be an integer in [0, {}){}", file.string(), n,
           it->dump(), count,
           names.empty() ? std::string() : fmt::format(" or one of \"{}\"", fmt::join(names, "\", \"")));
    v = it->get<bool>() ? 1 : 0;
  } else if (it->is_number_integer()) {
    v = static_cast<int>(std::clamp<std::int64_t>(it->get<std::int64_t>(), -1, count));
  } else if (it->is_string()) {
    const auto s = it->get<std::string>();
    for (std::size_t i = 0; i < names.size(); ++i)
      if (s == names[i]) v = static_cast<int>(i);
    if (v < 0)
      fail(ErrorKind::format, "{}:{}: label \"{}\" is not one of {}", file.string(), n, s,
           names.empty() ? std::string("the integer labels") : fmt::format("\"{}\"", fmt::join(names, "\", \"")));
  } else {
    fail(ErrorKind::format, "{}:{}: \"label\" must be an integer, not {}", file.string(), n, it->type_name());
  }
  if (v < 0 || v >= count)
    fail(ErrorKind::format, "{}:{}: label {} is outside [0, {})", file.string(), n, it->dump(), count);
  return v;
}

// Generic JSONL: the format is decided by the first line's keys; every line must agree.
std::vector<Record> read_jsonl(const std::filesystem::path& file, DataFormat& format) {
  std::vector<Record> out;
  bool first = true;
  for_each_line(file, [&](std::int64_t n, const std::string& line) {
    const json j = parse_json_line(file, n, line);
    DataFormat f;
    if (j.contains("options")) f = DataFormat::options;
    else if (j.contains("completion")) f = DataFormat::completion;
    else if (j.contains("text")) f = DataFormat::text;
    else
      fail(ErrorKind::format,
           "{}:{}: expected {{\"text\": ...}}, {{\"prompt\": ..., \"completion\": ...}} or {{\"prompt\": ..., "
           "\"options\": [...], \"label\": i}}; found the keys {}",
           file.string(), n, [&] {
             std::vector<std::string> keys;
             for (auto it = j.begin(); it != j.end(); ++it) keys.push_back(it.key());
             return keys.empty() ? std::string("(none)") : fmt::format("\"{}\"", fmt::join(keys, "\", \""));
           }());
    // Every key is the format's: a "label" beside a completion, or a typo such as "prompts",
    // would otherwise be dropped without a word.
    const std::vector<std::string_view> keys =
        f == DataFormat::text         ? std::vector<std::string_view>{"text"}
        : f == DataFormat::completion ? std::vector<std::string_view>{"prompt", "completion"}
                                      : std::vector<std::string_view>{"prompt", "options", "label"};
    for (auto it = j.begin(); it != j.end(); ++it)
      if (std::find(keys.begin(), keys.end(), it.key()) == keys.end())
        fail(ErrorKind::format, "{}:{}: unknown key \"{}\" in a {} example (its keys: \"{}\")", file.string(), n,
             it.key(), data_format_name(f), fmt::join(keys, "\", \""));
    if (first) format = f;
    else if (f != format)
      fail(ErrorKind::format, "{}:{}: a {} example, but the file's first example is {}", file.string(), n,
           data_format_name(f), data_format_name(format));
    first = false;
    Record r;
    r.line = n;
    if (f == DataFormat::text) {
      r.text = string_field(file, n, j, "text");
    } else {
      r.prompt = string_field(file, n, j, "prompt");
      if (f == DataFormat::completion) {
        r.completion = string_field(file, n, j, "completion");
        if (r.completion.empty()) fail(ErrorKind::format, "{}:{}: the completion is empty", file.string(), n);
      } else {
        const json& o = j.at("options");
        if (!o.is_array() || o.size() < 2)
          fail(ErrorKind::format, "{}:{}: \"options\" must be an array of at least 2 strings", file.string(), n);
        for (const auto& x : o) {
          if (!x.is_string())
            fail(ErrorKind::format, "{}:{}: \"options\" must hold strings, found {}", file.string(), n, x.type_name());
          r.options.push_back(x.get<std::string>());
          if (r.options.back().empty()) fail(ErrorKind::format, "{}:{}: an option is empty", file.string(), n);
        }
        r.label = label_field(file, n, j, static_cast<int>(r.options.size()));
      }
    }
    out.push_back(std::move(r));
  });
  if (out.empty()) fail(ErrorKind::format, "{}: no examples (the file is empty)", file.string());
  return out;
}

// ---- The task presets -----------------------------------------------------------------
// Each reads the file as the standard release ships it and renders the example the way
// HF `datasets` (which MeZO loads) and MeZO's templates.py do — Python's str methods with
// their Unicode semantics (strip(), lower(), upper()) — then MeZO's encode_prompt stripping
// (set_prompt, tail_of); `where` names the file and the line (JSONL) or the question (JSON)
// in errors, and `path` the field.

// Python's str.lower() / str.upper(): full Unicode case mapping (ICU, root locale).
std::string py_lower(std::string_view s) {
  std::string r;
  tok::unicode_lowercase(s, r);
  return r;
}
std::string py_upper(std::string_view s) {
  std::string r;
  tok::unicode_uppercase(s, r);
  return r;
}
// Bytes in the first character of s (1 for an ill-formed byte), 0 when s is empty.
std::size_t first_char_len(std::string_view s) {
  if (s.empty()) return 0;
  return std::max<std::size_t>(1, tok::utf8_len(s, 0));
}
// s[0].upper() + s[1:] / s[0].lower() + s[1:]: Python's, on the first code point ("élan" →
// "Élan", "ß…" → "SS…").
std::string upper_first(std::string_view s) {
  const std::size_t n = first_char_len(s);
  return py_upper(s.substr(0, n)) + std::string(s.substr(n));
}
std::string lower_first(std::string_view s) {
  const std::size_t n = first_char_len(s);
  return py_lower(s.substr(0, n)) + std::string(s.substr(n));
}

// Python's str.strip() / lstrip() / rstrip() without arguments: Unicode white space
// (str.isspace: NBSP, the ideographic space, ...), not only ASCII's.
std::size_t py_ws_prefix(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const std::size_t n = tok::utf8_len(s, i);
    if (n == 0 || !metrics::detail::is_space(tok::utf8_decode(s, i, n))) break;
    i += n;
  }
  return i;
}
std::size_t py_ws_suffix(std::string_view s) {  // the start of the trailing white space
  std::size_t e = s.size();
  while (e > 0) {
    std::size_t b = e - 1;
    while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80 && e - b < 4) --b;
    const std::size_t n = tok::utf8_len(s, b);
    if (n != e - b || !metrics::detail::is_space(tok::utf8_decode(s, b, n))) break;
    e = b;
  }
  return e;
}
std::string py_lstrip(std::string_view s) { return std::string(s.substr(py_ws_prefix(s))); }
std::string py_rstrip(std::string_view s) { return std::string(s.substr(0, py_ws_suffix(s))); }
std::string py_strip(std::string_view s) { return py_lstrip(py_rstrip(s)); }

// Python's str.split() (no argument).
std::vector<std::string> py_split(std::string_view s) {
  std::vector<std::string> out;
  std::string cur;
  const auto cps = metrics::detail::decode_utf8(s);
  for (char32_t c : cps) {
    if (metrics::detail::is_space(c)) {
      if (!cur.empty()) out.push_back(std::move(cur));
      cur.clear();
    } else {
      metrics::detail::append_utf8(cur, c);
    }
  }
  if (!cur.empty()) out.push_back(std::move(cur));
  return out;
}

std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  if (from.empty()) return s;
  std::string out;
  std::size_t at = 0;
  for (std::size_t hit; (hit = s.find(from, at)) != std::string::npos; at = hit + from.size()) {
    out.append(s, at, hit - at);
    out += to;
  }
  out.append(s, at, std::string::npos);
  return out;
}

// A JSON member of `j` (at `path`) of the given type, or an error naming where and which field.
template <class J>
const J& member(const std::string& where, const J& j, const std::string& path, const char* key,
                typename J::value_t type) {
  const std::string name = path.empty() ? std::string(key) : path + "." + key;
  if (!j.is_object()) fail(ErrorKind::format, "{}: \"{}\" must be an object, not {}", where, path, j.type_name());
  const auto it = j.find(key);
  if (it == j.end()) fail(ErrorKind::format, "{}: no \"{}\" field", where, name);
  const bool ok = type == J::value_t::number_integer ? it->is_number_integer() : it->type() == type;
  if (!ok) {
    const char* want = type == J::value_t::string ? "a string"
                       : type == J::value_t::array ? "an array"
                       : type == J::value_t::object ? "an object"
                                                    : "an integer";
    fail(ErrorKind::format, "{}: \"{}\" must be {}, not {}", where, name, want, it->type_name());
  }
  return *it;
}

template <class J>
std::string str(const std::string& where, const J& j, const std::string& path, const char* key) {
  return member(where, j, path, key, J::value_t::string).template get<std::string>();
}

// A SuperGLUE boolean label (true/false or 1/0): MeZO's verbalizer index (0 = "No", 1 = "Yes").
int bool_label(const std::string& where, const json& j, const std::string& path) {
  const std::string name = path.empty() ? "label" : path + ".label";
  const auto it = j.find("label");
  if (it == j.end())
    fail(ErrorKind::format, "{}: no \"{}\" field (the test splits of SuperGLUE are unlabeled)", where, name);
  if (it->is_boolean()) return it->get<bool>() ? 1 : 0;
  if (it->is_number_integer() && (it->get<std::int64_t>() == 0 || it->get<std::int64_t>() == 1))
    return static_cast<int>(it->get<std::int64_t>());
  fail(ErrorKind::format, "{}: \"{}\" must be true/false or 0/1, not {}", where, name, it->dump());
}

// MeZO's encode_prompt without demonstrations (train_samples = [], as its zero-shot
// evaluation and its training use it), for every task preset:
//   sequence  = (train_sep + verbalize(…).strip(' ')).lstrip().strip(' ')
//             = verbalize(…).strip(' ') with its leading (Unicode) white space dropped;
//   option_len = len(encode(verbalize(…).strip(' '))) − len(encode(encode(…).strip(' '))),
// the count taken before the lstrip(). Here r.prompt is encode(…).strip(' ').lstrip(), an
// option the text its verbalization adds to it, and r.lead the white space the lstrip()
// took (almost always none), which the count puts back: len(encode(lead + prompt + option))
// − len(encode(lead + prompt)).
std::string strip_spaces(std::string_view s) {
  const auto b = s.find_first_not_of(' ');
  if (b == std::string_view::npos) return {};
  return std::string(s.substr(b, s.find_last_not_of(' ') - b + 1));
}
void set_prompt(Record& r, const std::string& encoded) {
  const std::string stripped = strip_spaces(encoded);
  r.prompt = py_lstrip(stripped);
  r.lead = stripped.substr(0, stripped.size() - r.prompt.size());
}
std::string tail_of(const Record& r, const std::string& verbalized, const std::string& where) {
  const std::string stripped = strip_spaces(verbalized);
  const std::string full = py_lstrip(stripped);
  if (full.compare(0, r.prompt.size(), r.prompt) != 0 || stripped.compare(0, r.lead.size(), r.lead) != 0 ||
      stripped.size() - full.size() != r.lead.size())
    fail(ErrorKind::internal, "{}: a template's verbalized text does not extend its prompt", where);
  if (full.size() == r.prompt.size())  // e.g. an empty ReCoRD query
    fail(ErrorKind::format, "{}: the answer adds nothing to the prompt (an empty field?)", where);
  return full.substr(r.prompt.size());
}

// SST-2 as GLUE ships it: a TSV with a header naming "sentence" and "label" columns.
// MeZO's template: "{sentence.strip()} It was" + " terrible" | " great".
std::vector<Record> read_sst2(const std::filesystem::path& file) {
  std::vector<Record> out;
  int sentence_col = -1, label_col = -1;
  std::size_t columns = 0;
  for_each_line(file, [&](std::int64_t n, const std::string& line) {
    std::vector<std::string> cells;
    std::size_t start = 0;
    for (std::size_t tab; (tab = line.find('\t', start)) != std::string::npos; start = tab + 1)
      cells.push_back(line.substr(start, tab - start));
    cells.push_back(line.substr(start));
    if (sentence_col < 0 && label_col < 0 && columns == 0) {  // the header
      columns = cells.size();
      for (std::size_t i = 0; i < cells.size(); ++i) {
        if (cells[i] == "sentence") sentence_col = static_cast<int>(i);
        if (cells[i] == "label") label_col = static_cast<int>(i);
      }
      if (sentence_col < 0 || label_col < 0)
        fail(ErrorKind::format,
             "{}:{}: --task sst2 reads GLUE's SST-2 TSV, whose header names the columns \"sentence\" and "
             "\"label\"; this header has {} (the test split is unlabeled)",
             file.string(), n, fmt::format("\"{}\"", fmt::join(cells, "\", \"")));
      return;
    }
    if (cells.size() != columns)
      fail(ErrorKind::format, "{}:{}: {} tab-separated cells, the header has {}", file.string(), n, cells.size(),
           columns);
    const std::string& l = cells[static_cast<std::size_t>(label_col)];
    if (l != "0" && l != "1") fail(ErrorKind::format, "{}:{}: SST-2 label \"{}\" is not 0 or 1", file.string(), n, l);
    Record r;
    r.line = n;
    const std::string sentence = py_strip(cells[static_cast<std::size_t>(sentence_col)]);
    const std::string where = fmt::format("{}:{}", file.string(), n);
    set_prompt(r, sentence + " It was");  // an empty sentence: "It was", as MeZO's strip(' ')
    for (const char* word : {"terrible", "great"})
      r.options.push_back(tail_of(r, sentence + " It was " + word, where));
    r.label = l == "1" ? 1 : 0;
    out.push_back(std::move(r));
  });
  if (out.empty()) fail(ErrorKind::format, "{}: no SST-2 examples", file.string());
  return out;
}

// SuperGLUE JSONL tasks with MeZO's templates.
std::vector<Record> read_superglue(const std::filesystem::path& file, const std::string& task) {
  std::vector<Record> out;
  for_each_line(file, [&](std::int64_t n, const std::string& line) {
    const json j = parse_json_line(file, n, line);
    const std::string where = fmt::format("{}:{}", file.string(), n);
    Record r;
    r.line = n;
    // The verbalized candidates: the unverbalized prompt + each answer (MeZO's templates).
    auto verbalize = [&](const std::string& encoded, const std::vector<std::string>& answers) {
      set_prompt(r, encoded);
      for (const auto& a : answers) r.options.push_back(tail_of(r, encoded + a, where));
    };
    if (task == "rte") {
      verbalize(fmt::format("{}\nDoes this mean that \"{}\" is true? Yes or No?\n", string_field(file, n, j, "premise"),
                            string_field(file, n, j, "hypothesis")),
                {"Yes", "No"});
      r.label = label_field(file, n, j, 2, {"entailment", "not_entailment"});
    } else if (task == "cb") {
      verbalize(fmt::format("Suppose {} Can we infer that \"{}\"? Yes, No, or Maybe?\n",
                            string_field(file, n, j, "premise"), string_field(file, n, j, "hypothesis")),
                {"Yes", "No", "Maybe"});
      r.label = label_field(file, n, j, 3, {"entailment", "contradiction", "neutral"});
    } else if (task == "boolq") {
      std::string q = string_field(file, n, j, "question");
      if (q.empty() || q.back() != '?') q += "?";
      q = upper_first(q);  // question[0].upper() + question[1:]: "élan …" → "Élan …"
      verbalize(fmt::format("{} {}\n", string_field(file, n, j, "passage"), q), {"No", "Yes"});
      r.label = label_field(file, n, j, 2, {"False", "True"}, /*booleans=*/true);
    } else {  // copa
      std::string premise = py_rstrip(string_field(file, n, j, "premise"));
      if (!premise.empty() && premise.back() == '.') premise.pop_back();
      const std::string q = string_field(file, n, j, "question");
      if (q != "cause" && q != "effect")
        fail(ErrorKind::format, "{}:{}: COPA \"question\" must be \"cause\" or \"effect\", not \"{}\"", file.string(),
             n, q);
      // MeZO strips the prompt's trailing space (encode(...).strip(' ')), so the conjunction's
      // space belongs to the option: the scored tokens are those the choice adds to it.
      const std::string prompt = premise + (q == "cause" ? " because " : " so ");
      std::vector<std::string> choices;
      for (const char* key : {"choice1", "choice2"}) {
        std::string c = string_field(file, n, j, key);
        // MeZO's capitalize: the first word (split(" ")) lower-cased (str.lower()), except "I".
        const auto space = std::min(c.find(' '), c.size());
        if (c.substr(0, space) != "I") c = py_lower(c.substr(0, space)) + c.substr(space);
        choices.push_back(std::move(c));
      }
      verbalize(prompt, choices);
      r.label = label_field(file, n, j, 2);
    }
    out.push_back(std::move(r));
  });
  if (out.empty()) fail(ErrorKind::format, "{}: no {} examples", file.string(), task);
  return out;
}

// HF datasets' wsc.fixed (_fix_wst): a span text that is not in the text gets the case of
// the text's word at its index, loses trailing periods and has newlines made spaces.
void fix_wsc_span(const std::string& where, const std::string& text, std::string& span, std::int64_t index,
                  std::int64_t& span2_index, const char* name) {
  if (text.find(span) != std::string::npos) return;
  if (span == "Kamenev and Zinoviev" || span == "Kamenev, Zinoviev, and Stalin") return;
  if (span.find("theyscold") != std::string::npos) span2_index = 10;
  const auto words = py_split(text);
  if (index < 0 || index >= static_cast<std::int64_t>(words.size()))
    fail(ErrorKind::format, "{}: \"target.{}_text\" \"{}\" is not in the text and \"target.{}_index\" {} is not one of "
         "its {} words", where, name, span, name, index, words.size());
  if (!span.empty()) {  // first_word[0].islower(): text[0].lower(), else text[0].upper() (Unicode, as Python)
    const std::string& w = words[static_cast<std::size_t>(index)];
    const std::size_t n = tok::utf8_len(w, 0);
    const bool lower = n > 0 && tok::is_lowercase(tok::utf8_decode(w, 0, n));
    span = lower ? lower_first(span) : upper_first(span);
  }
  while (!span.empty() && span.back() == '.') span.pop_back();
  span = replace_all(span, "\n", " ");
}

std::vector<Record> read_wsc_wic_multirc_record(const std::filesystem::path& file, const std::string& task) {
  std::vector<Record> out;
  std::int64_t questions = 0;
  for_each_line(file, [&](std::int64_t n, const std::string& line) {
    const json j = parse_json_line(file, n, line);
    const std::string where = fmt::format("{}:{}", file.string(), n);
    if (task == "wsc") {
      // {"text", "target": {"span1_text", "span1_index", "span2_text", "span2_index"}, "label"}
      Record r;
      r.line = n;
      const std::string text = str(where, j, "", "text");
      const json& target = member(where, j, "", "target", json::value_t::object);
      std::string span1 = str(where, target, "target", "span1_text"), span2 = str(where, target, "target", "span2_text");
      std::int64_t i1 = member(where, target, "target", "span1_index", json::value_t::number_integer).get<std::int64_t>();
      std::int64_t i2 = member(where, target, "target", "span2_index", json::value_t::number_integer).get<std::int64_t>();
      fix_wsc_span(where, text, span1, i1, i2, "span1");
      fix_wsc_span(where, text, span2, i2, i2, "span2");
      set_prompt(r, fmt::format("{}\nIn the previous sentence, does the pronoun \"{}\" refer to {}? Yes or No?\n", text,
                                py_lower(span2), span1));
      r.options = {tail_of(r, r.prompt + "No", where), tail_of(r, r.prompt + "Yes", where)};
      r.label = bool_label(where, j, "");
      out.push_back(std::move(r));
    } else if (task == "wic") {
      Record r;
      r.line = n;
      set_prompt(r, fmt::format("Does the word \"{}\" have the same meaning in these two sentences? Yes, No?\n{}\n{}\n",
                                str(where, j, "", "word"), str(where, j, "", "sentence1"),
                                str(where, j, "", "sentence2")));
      r.options = {tail_of(r, r.prompt + "No", where), tail_of(r, r.prompt + "Yes", where)};
      r.label = bool_label(where, j, "");
      out.push_back(std::move(r));
    } else if (task == "multirc") {
      // {"passage": {"text", "questions": [{"question", "answers": [{"text", "label"}]}]}}:
      // one example per answer option, as HF datasets flattens it.
      const json& passage = member(where, j, "", "passage", json::value_t::object);
      const std::string paragraph = str(where, passage, "passage", "text");
      const json& qs = member(where, passage, "passage", "questions", json::value_t::array);
      for (std::size_t q = 0; q < qs.size(); ++q) {
        const std::string qpath = fmt::format("passage.questions[{}]", q);
        const std::string question = str(where, qs[q], qpath, "question");
        const json& as = member(where, qs[q], qpath, "answers", json::value_t::array);
        for (std::size_t a = 0; a < as.size(); ++a) {
          const std::string apath = fmt::format("{}.answers[{}]", qpath, a);
          Record r;
          r.line = n;
          r.question = questions;
          set_prompt(r, fmt::format("{}\nQuestion: {}\nI found this answer \"{}\". Is that correct? Yes or No?\n",
                                    paragraph, question, str(where, as[a], apath, "text")));
          r.options = {tail_of(r, r.prompt + "No", where), tail_of(r, r.prompt + "Yes", where)};
          r.label = bool_label(where, as[a], apath);
          out.push_back(std::move(r));
        }
        ++questions;
      }
    } else {  // record
      // {"passage": {"text", "entities": [{"start", "end"}]}, "qas": [{"query", "answers": [{"text"}]}]}:
      // one example per query; the candidates are the passage's distinct entity texts
      // (text[start:end+1], in code points) sorted, the golds the distinct answer texts sorted.
      const json& passage = member(where, j, "", "passage", json::value_t::object);
      const std::string text = str(where, passage, "passage", "text");
      const auto cps = metrics::detail::decode_utf8(text);
      const json& ents = member(where, passage, "passage", "entities", json::value_t::array);
      std::vector<std::string> entities;
      for (std::size_t e = 0; e < ents.size(); ++e) {
        const std::string epath = fmt::format("passage.entities[{}]", e);
        const auto s = member(where, ents[e], epath, "start", json::value_t::number_integer).get<std::int64_t>();
        const auto t = member(where, ents[e], epath, "end", json::value_t::number_integer).get<std::int64_t>();
        if (s < 0 || t < s || t >= static_cast<std::int64_t>(cps.size()))
          fail(ErrorKind::format, "{}: \"{}\" spans [{}, {}], outside the passage's {} characters", where, epath, s, t,
               cps.size());
        std::string et;
        for (std::int64_t c = s; c <= t; ++c) metrics::detail::append_utf8(et, cps[static_cast<std::size_t>(c)]);
        entities.push_back(std::move(et));
      }
      std::sort(entities.begin(), entities.end());  // UTF-8 byte order = code point order (Python's)
      entities.erase(std::unique(entities.begin(), entities.end()), entities.end());
      if (entities.empty()) fail(ErrorKind::format, "{}: \"passage.entities\" is empty: no candidates", where);
      const std::string shown = replace_all(text, "@highlight\n", "- ");
      const json& qas = member(where, j, "", "qas", json::value_t::array);
      for (std::size_t q = 0; q < qas.size(); ++q) {
        const std::string qpath = fmt::format("qas[{}]", q);
        Record r;
        r.line = n;
        const std::string query = str(where, qas[q], qpath, "query");
        if (!qas[q].contains("answers"))
          fail(ErrorKind::format, "{}: no \"{}.answers\" field (the test split of ReCoRD is unlabeled)", where, qpath);
        const json& as = member(where, qas[q], qpath, "answers", json::value_t::array);
        for (std::size_t a = 0; a < as.size(); ++a)
          r.answers.push_back(str(where, as[a], fmt::format("{}.answers[{}]", qpath, a), "text"));
        std::sort(r.answers.begin(), r.answers.end());
        r.answers.erase(std::unique(r.answers.begin(), r.answers.end()), r.answers.end());
        if (r.answers.empty()) fail(ErrorKind::format, "{}: \"{}.answers\" is empty", where, qpath);
        set_prompt(r, shown + "\n-");
        for (const auto& e : entities)
          r.options.push_back(tail_of(r, shown + "\n- " + replace_all(query, "@placeholder", e), where + ": " + qpath));
        for (const auto& a : r.answers) {
          const auto it = std::find(entities.begin(), entities.end(), a);
          if (it == entities.end())
            fail(ErrorKind::format, "{}: the answer \"{}\" of \"{}\" is not one of the passage's entities", where, a,
                 qpath);
          r.golds.push_back(static_cast<int>(it - entities.begin()));
        }
        r.label = r.golds[0];  // MeZO trains on the first (sorted) answer
        r.candidates = entities;
        out.push_back(std::move(r));
      }
    }
  });
  if (out.empty()) fail(ErrorKind::format, "{}: no {} examples", file.string(), task);
  return out;
}

// The whole of a JSON file, keeping its key order (DROP's sections).
nlohmann::ordered_json parse_json_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(ErrorKind::io, "{}: cannot open the data file", file.string());
  try {
    std::ostringstream text;
    text << in.rdbuf();
    return parse_ordered_json_text(text.str(), file.string(), kMaxJsonDataDepth);  // Note [Reading JSON]
  } catch (const nlohmann::ordered_json::exception& e) {
    fail(ErrorKind::format, "{}: not valid JSON: {}", file.string(), e.what());
  }
}

// SQuAD v1.1 ({"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
// "answers": [{"text"}]}]}]}]}) and DROP ({section: {"passage", "qa_pairs": [{"query_id",
// "question", "answer", "validated_answers"}]}}): one example per question, the completion
// " {first gold answer}\n" (MeZO's verbalize; its newline is the stop string of MeZO's
// greedy decoding), every gold answer kept for F1/EM.
std::vector<Record> read_qa(const std::filesystem::path& file, const std::string& task) {
  using ojson = nlohmann::ordered_json;
  const ojson root = parse_json_file(file);
  std::vector<Record> out;
  const std::string f = file.string();
  std::int64_t skipped = 0;
  std::string first_skipped;
  auto add = [&](Record r, const std::string& where, const std::string& encoded) {
    if (r.answers.empty()) fail(ErrorKind::format, "{}: no gold answer", where);
    r.line = static_cast<std::int64_t>(out.size()) + 1;
    r.where = where;
    set_prompt(r, encoded);
    r.completion = tail_of(r, encoded + " " + r.answers[0] + "\n", where);
    out.push_back(std::move(r));
  };
  if (task == "squad") {
    if (!root.is_object()) fail(ErrorKind::format, "{}: expected SQuAD's {{\"data\": [...]}}, found {}", f, root.type_name());
    const ojson& data = member(f, root, "", "data", ojson::value_t::array);
    for (std::size_t a = 0; a < data.size(); ++a) {
      const std::string apath = fmt::format("data[{}]", a);
      // HF datasets: title defaults to "", nothing is stripped but the question (by MeZO).
      const std::string title = data[a].is_object() && data[a].contains("title") ? str(f, data[a], apath, "title") : "";
      const ojson& paras = member(f, data[a], apath, "paragraphs", ojson::value_t::array);
      for (std::size_t p = 0; p < paras.size(); ++p) {
        const std::string ppath = fmt::format("{}.paragraphs[{}]", apath, p);
        const std::string context = str(f, paras[p], ppath, "context");
        const ojson& qas = member(f, paras[p], ppath, "qas", ojson::value_t::array);
        for (std::size_t q = 0; q < qas.size(); ++q) {
          const std::string qpath = fmt::format("{}.qas[{}]", ppath, q);
          const std::string id = qas[q].is_object() && qas[q].contains("id") && qas[q]["id"].is_string()
                                     ? qas[q]["id"].get<std::string>() : std::string("?");
          const std::string where = fmt::format("{}: {} (id {})", f, qpath, id);
          Record r;
          const ojson& as = member(where, qas[q], "", "answers", ojson::value_t::array);
          for (std::size_t k = 0; k < as.size(); ++k) r.answers.push_back(str(where, as[k], fmt::format("answers[{}]", k), "text"));
          if (r.answers.empty())
            fail(ErrorKind::format, "{}: \"answers\" is empty (SQuAD 2.0's unanswerable questions are not MeZO's "
                 "SQuAD task, which reads v1.1)", where);
          add(std::move(r), where,
              fmt::format("Title: {}\nContext: {}\nQuestion: {}\nAnswer:", title, context,
                          py_strip(str(where, qas[q], "", "question"))));
        }
      }
    }
  } else {  // drop
    if (!root.is_object()) fail(ErrorKind::format, "{}: expected DROP's {{section id: {{...}}}}, found {}", f, root.type_name());
    for (auto sec = root.begin(); sec != root.end(); ++sec) {
      const std::string spath = sec.key();
      const std::string passage = str(f, sec.value(), spath, "passage");
      const ojson& qas = member(f, sec.value(), spath, "qa_pairs", ojson::value_t::array);
      for (std::size_t q = 0; q < qas.size(); ++q) {
        const std::string qpath = fmt::format("{}.qa_pairs[{}]", spath, q);
        const std::string id = qas[q].is_object() && qas[q].contains("query_id") && qas[q]["query_id"].is_string()
                                   ? qas[q]["query_id"].get<std::string>() : std::string("?");
        const std::string where = fmt::format("{}: {} (query_id {})", f, qpath, id);
        // HF datasets' DROP: the dev split's golds are "validated_answers", the train
        // split's "answer"; here validated answers when there are any, else "answer". Each
        // answer gives its number, its date "day month year" (blanks dropped), or its spans.
        std::vector<ojson> golds;
        const bool validated = qas[q].contains("validated_answers") && qas[q]["validated_answers"].is_array() &&
                               !qas[q]["validated_answers"].empty();
        if (validated) {
          for (const auto& v : qas[q]["validated_answers"]) golds.push_back(v);
        } else {
          golds.push_back(member(where, qas[q], "", "answer", ojson::value_t::object));
        }
        Record r;
        bool whole = true;  // every answer is exactly one of a number, a date, spans (HF's asserts)
        for (std::size_t k = 0; k < golds.size(); ++k) {
          const std::string gpath = validated ? fmt::format("validated_answers[{}]", k) : std::string("answer");
          if (!golds[k].is_object())
            fail(ErrorKind::format, "{}: \"{}\" must be an object, not {}", where, gpath, golds[k].type_name());
          const std::string number = golds[k].contains("number") ? str(where, golds[k], gpath, "number") : "";
          std::string date;
          if (golds[k].contains("date")) {
            const ojson& d = member(where, golds[k], gpath, "date", ojson::value_t::object);
            std::vector<std::string> parts;
            for (const char* key : {"day", "month", "year"})
              parts.push_back(d.contains(key) ? str(where, d, gpath + ".date", key) : "");
            date = py_strip(fmt::format("{} {} {}", parts[0], parts[1], parts[2]));
            if (parts[0].empty() && parts[1].empty() && parts[2].empty()) date.clear();
          }
          std::vector<std::string> spans;
          if (golds[k].contains("spans"))
            for (const auto& s : member(where, golds[k], gpath, "spans", ojson::value_t::array)) {
              if (!s.is_string())
                fail(ErrorKind::format, "{}: \"{}.spans\" must hold strings, found {}", where, gpath, s.type_name());
              spans.push_back(s.get<std::string>());
            }
          const int kinds = (number.empty() ? 0 : 1) + (date.empty() ? 0 : 1) + (spans.empty() ? 0 : 1);
          if (kinds > 1) whole = false;
          if (!number.empty()) r.answers.push_back(number);
          if (!date.empty()) r.answers.push_back(date);
          r.answers.insert(r.answers.end(), spans.begin(), spans.end());
        }
        // drop_eval's answer_json_to_strings over "answer" and every validated answer: the
        // number, else the spans, else "day month year" as written (blank: not a gold).
        {
          std::vector<ojson> all;
          if (qas[q].contains("answer")) all.push_back(qas[q]["answer"]);
          if (validated) all.insert(all.end(), qas[q]["validated_answers"].begin(), qas[q]["validated_answers"].end());
          for (const auto& a : all) {
            if (!a.is_object()) continue;
            std::vector<std::string> g;
            if (a.contains("number") && a["number"].is_string() && !a["number"].get<std::string>().empty()) {
              g.push_back(a["number"].get<std::string>());
            } else if (a.contains("spans") && a["spans"].is_array() && !a["spans"].empty()) {
              for (const auto& sp : a["spans"])
                if (sp.is_string()) g.push_back(sp.get<std::string>());
            } else if (a.contains("date") && a["date"].is_object()) {
              const auto part = [&](const char* k) {
                return a["date"].contains(k) && a["date"][k].is_string() ? a["date"][k].get<std::string>() : std::string();
              };
              g.push_back(part("day") + " " + part("month") + " " + part("year"));
            }
            if (!g.empty()) r.drop_golds.push_back(std::move(g));
          }
        }
        if (!whole || r.answers.empty()) {  // HF datasets drops these (9 of train, 1 of dev)
          if (skipped++ == 0) first_skipped = where;
          continue;
        }
        add(std::move(r), where,
            fmt::format("Passage: {}\nQuestion: {}\nAnswer:", passage, py_strip(str(where, qas[q], "", "question"))));
      }
    }
  }
  if (skipped > 0)
    log_warn("{}: {} question(s) skipped, as HF datasets skips them: an answer with no number, date or span, or "
             "with more than one of them (the first: {})", f, skipped, first_skipped);
  if (out.empty()) fail(ErrorKind::format, "{}: no {} questions", f, task);
  return out;
}

// The seeded sample of --num-train / --num-eval: `options.sample` of [0, n), in file order.
std::vector<std::int64_t> sample_indices(std::int64_t n, const DataOptions& options) {
  std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<std::int64_t>(i);
  std::mt19937_64 rng(options.seed ^ 0x5a4d504c45ULL);
  for (std::size_t i = idx.size() - 1; i > 0; --i) std::swap(idx[i], idx[static_cast<std::size_t>(rng() % (i + 1))]);
  idx.resize(static_cast<std::size_t>(options.sample));
  std::sort(idx.begin(), idx.end());
  return idx;
}

std::vector<std::int32_t> concat(const std::vector<std::int32_t>& a, const std::vector<std::int32_t>& b) {
  std::vector<std::int32_t> out(a);
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

}  // namespace

std::string_view data_format_name(DataFormat f) {
  switch (f) {
    case DataFormat::tokens: return "token-id";
    case DataFormat::text: return "text";
    case DataFormat::completion: return "prompt/completion";
    case DataFormat::options: return "multiple-choice";
  }
  return "?";
}

const std::vector<std::string>& task_names() {
  static const std::vector<std::string> names{"sst2", "rte",     "boolq",  "cb",    "copa", "wsc",
                                               "wic",  "multirc", "record", "squad", "drop"};
  return names;
}

std::string tokenizer_misfit(const Tokenizer& tok, std::int64_t vocab) {
  if (tok.text_vocab_size() > vocab)
    return fmt::format("it has {} ids but the model's vocabulary is only {}", tok.text_vocab_size(), vocab);
  auto outside = [&](std::optional<std::int32_t> id) { return id && (*id < 0 || *id >= vocab); };
  for (const auto& [name, ids] : {std::pair{"puts first", &tok.special_prefix()}, std::pair{"puts last", &tok.special_suffix()}})
    for (const std::int32_t id : *ids)
      if (outside(id))
        return fmt::format("the special token it {} ({}, id {}) is outside the model's vocabulary [0, {})", name,
                           tok.id_to_token(id), id, vocab);
  const std::optional<std::int32_t> pad = tok.pad_id() ? tok.pad_id() : tok.eos_id();
  if (outside(pad))
    return fmt::format("the id it pads with ({}, id {}) is outside the model's vocabulary [0, {})",
                       tok.id_to_token(*pad), *pad, vocab);
  return {};
}

void check_token_tensor_names(const std::filesystem::path& file) {
  const SafetensorsFile f = SafetensorsFile::open(file);
  for (const TensorInfo& t : f.tensors()) {
    // token_type_ids: what BERT-style tokenizers return beside the ids; the causal LMs zo2
    // runs have no token types, so it is accepted and ignored rather than refused.
    if (t.name == "input_ids" || t.name == "attention_mask" || t.name == "labels" || t.name == "token_type_ids")
      continue;
    fail(ErrorKind::format,
         "{}: unknown tensor '{}' in a token-id data file; it holds 'input_ids' and optionally 'attention_mask' and "
         "'labels' ('token_type_ids' is accepted and ignored): a misspelled name would otherwise be dropped without a "
         "word (an 'attention_masks' typo would train the padding as tokens)",
         file.string(), t.name);
  }
}

bool task_is_generation(const std::string& task) { return task == "squad" || task == "drop"; }
bool task_trains_on_gold_only(const std::string& task) { return task == "copa" || task == "record"; }

Dataset Dataset::load(const std::filesystem::path& file, const ModelConfig& config, const Tokenizer* tokenizer,
                      const DataOptions& options) {
  Dataset d;
  d.config_ = config;
  d.source_ = file.string();
  d.options_ = options;
  if (!std::filesystem::exists(file)) fail(ErrorKind::io, "{}: no such data file", file.string());
  // A directory would read as an empty file ("no examples").
  if (std::error_code ec; std::filesystem::is_directory(file, ec))
    fail(ErrorKind::invalid_argument, "{}: a directory, not a data file", file.string());
  const int limit = options.max_len > 0 ? options.max_len : static_cast<int>(config.max_positions);
  if (options.max_len > config.max_positions)
    fail(ErrorKind::invalid_argument, "--max-len {} exceeds the model's max_position_embeddings ({})",
         options.max_len, config.max_positions);
  if (!options.task.empty() &&
      std::find(task_names().begin(), task_names().end(), options.task) == task_names().end())
    fail(ErrorKind::invalid_argument, "--task {}: unknown task; zo2 knows {}", options.task,
         fmt::join(task_names(), ", "));
  const std::string ext = lower(file.extension().string());

  bool token_labels = false;  // a token file with a labels tensor (for the error below)
  if (options.task.empty() && ext == ".safetensors") {
    check_token_tensor_names(file);
    TokenTensors t = read_token_tensors(file);
    token_labels = !t.labels.empty();
    if (t.seq > limit)
      fail(options.max_len > 0 ? ErrorKind::invalid_argument : ErrorKind::format,
           "{}: sequences of {} tokens exceed {} ({})", file.string(), t.seq,
           options.max_len > 0 ? "--max-len" : "the model's max_position_embeddings", limit);
    const auto T = static_cast<std::size_t>(t.seq);
    for (std::int64_t r = 0; r < t.rows; ++r) {
      Example e;
      e.line = r + 1;
      Example::Seq s;
      const auto at = static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r) * T);
      s.ids.assign(t.ids.begin() + at, t.ids.begin() + at + static_cast<std::ptrdiff_t>(T));
      if (!t.mask.empty()) s.mask.assign(t.mask.begin() + at, t.mask.begin() + at + static_cast<std::ptrdiff_t>(T));
      if (!t.labels.empty()) {
        s.labels.assign(t.labels.begin() + at, t.labels.begin() + at + static_cast<std::ptrdiff_t>(T));
      } else {
        s.labels = s.ids;
        for (std::size_t i = 0; i < s.mask.size(); ++i)
          if (s.mask[i] == 0) s.labels[i] = kIgnoreIndex;
      }
      // Every value a batch will be checked for (make_batch), so that a bad row is refused
      // here, naming the file, and not by the step that first draws it.
      for (std::size_t i = 0; i < T; ++i) {
        if (s.ids[i] < 0 || s.ids[i] >= config.vocab_size)
          fail(ErrorKind::format,
               "{}: token id {} at row {}, position {} is outside the model's vocabulary [0, {})", file.string(),
               s.ids[i], r, i, config.vocab_size);
        if (!s.mask.empty() && s.mask[i] != 0 && s.mask[i] != 1)
          fail(ErrorKind::format, "{}: attention_mask value {} at row {}, position {} is not 0 or 1", file.string(),
               s.mask[i], r, i);
        if (!t.labels.empty() && s.labels[i] != kIgnoreIndex && (s.labels[i] < 0 || s.labels[i] >= config.vocab_size))
          fail(ErrorKind::format,
               "{}: label {} at row {}, position {} is outside the model's vocabulary [0, {}) and not -100",
               file.string(), s.labels[i], r, i, config.vocab_size);
      }
      e.seqs.push_back(std::move(s));
      d.examples_.push_back(std::move(e));
    }
    d.format_ = DataFormat::tokens;
  } else {
    std::vector<Record> records;
    if (options.task == "sst2") {
      records = read_sst2(file);
      d.format_ = DataFormat::options;
    } else if (task_is_generation(options.task)) {
      records = read_qa(file, options.task);
      d.format_ = DataFormat::completion;
    } else if (options.task == "wsc" || options.task == "wic" || options.task == "multirc" || options.task == "record") {
      records = read_wsc_wic_multirc_record(file, options.task);
      d.format_ = DataFormat::options;
    } else if (!options.task.empty()) {
      records = read_superglue(file, options.task);
      d.format_ = DataFormat::options;
    } else if (ext == ".tsv") {
      fail(ErrorKind::invalid_argument, "{}: a TSV file is read by a task preset (--task sst2)", file.string());
    } else {
      records = read_jsonl(file, d.format_);
    }
    // --num-train / --num-eval before tokenizing (the same draw as below, which then keeps
    // everything): ReCoRD's train file is 1.4M candidate sequences, MeZO samples 1000 queries.
    if (options.sample > 0 && options.sample < static_cast<std::int64_t>(records.size())) {
      std::vector<Record> kept;
      for (auto i : sample_indices(static_cast<std::int64_t>(records.size()), options))
        kept.push_back(std::move(records[static_cast<std::size_t>(i)]));
      records = std::move(kept);
    }
    if (!tokenizer)
      fail(ErrorKind::invalid_argument, "{}: {} data needs a tokenizer (--tokenizer DIR)", file.string(),
           data_format_name(d.format_));
    if (const std::string why = tokenizer_misfit(*tokenizer, config.vocab_size); !why.empty())
      fail(ErrorKind::format, "the tokenizer does not fit the model: {}", why);
    const std::vector<std::int32_t>& prefix = tokenizer->special_prefix();
    std::vector<Example> examples(records.size());
    std::vector<char> cut(records.size(), 0);
    const DataFormat format = d.format_;
    // Tokenize in parallel; errors carry the line, and the first line's is the one reported
    // (whichever thread failed first made it vary from run to run).
    std::vector<std::exception_ptr> errors(records.size());
    auto tokenize = [&](std::size_t i) {
      const Record& r = records[i];
      Example& e = examples[i];
      e.line = r.line;
      e.label = r.label;
      e.golds = r.golds;
      e.answers = r.answers;
      e.candidates = r.candidates;
      e.question = r.question;
      e.drop_golds = r.drop_golds;
      if (task_is_generation(options.task)) e.prompt_ids = concat(prefix, tokenizer->encode(r.prompt));
      if (options.prompts_only) {  // generate: the prompt's start goes, the special prefix stays
        if (options.max_len > 0 && static_cast<std::int64_t>(e.prompt_ids.size()) > options.max_len) {
          const std::size_t keep = static_cast<std::size_t>(std::max<std::int64_t>(
              0, options.max_len - static_cast<std::int64_t>(prefix.size())));
          e.prompt_ids.erase(e.prompt_ids.begin() + static_cast<std::ptrdiff_t>(prefix.size()),
                             e.prompt_ids.end() - static_cast<std::ptrdiff_t>(keep));
          cut[i] = 1;
        }
        return;
      }
      const std::string loc = r.where.empty() ? fmt::format("{}:{}", file.string(), r.line) : r.where;
      // The prompt's own length, encoded once per example (MeZO's option-length rule, with
      // the white space its lstrip() dropped from the sequence: set_prompt).
      const auto head =
          static_cast<std::int64_t>(format == DataFormat::text ? 0 : tokenizer->encode(r.lead + r.prompt).size());
      auto scored_seq = [&](const std::string& tail) {
        const auto full = tokenizer->encode(r.prompt + tail);
        const std::int64_t counted = static_cast<std::int64_t>(
            r.lead.empty() ? full.size() : tokenizer->encode(r.lead + r.prompt + tail).size());
        // (MeZO's labels are the last option_len tokens; never more than the sequence has.)
        const std::int64_t scored = std::min<std::int64_t>(counted - head, static_cast<std::int64_t>(full.size()));
        if (scored <= 0)
          fail(ErrorKind::format, "{}: \"{}\" adds no tokens to the prompt", loc, tail);
        std::vector<std::int32_t> ids = concat(prefix, full);
        const auto keep_prefix = static_cast<std::int64_t>(prefix.size());
        if (static_cast<std::int64_t>(ids.size()) > limit) {
          if (options.max_len <= 0)
            fail(ErrorKind::format,
                 "{}: {} tokens exceed the model's max_position_embeddings ({}); pass --max-len to truncate", loc,
                 ids.size(), limit);
          if (scored + keep_prefix + 1 > limit)
            fail(ErrorKind::invalid_argument,
                 "{}: the scored part is {} token{}; with at least one token of prompt before it{} it does not "
                 "fit --max-len {}",
                 loc, scored, scored == 1 ? "" : "s",
                 keep_prefix > 0 ? fmt::format(" and the tokenizer's {} special token{} first", keep_prefix,
                                               keep_prefix == 1 ? "" : "s")
                                 : "",
                 limit);
          const auto drop = static_cast<std::int64_t>(ids.size()) - limit;
          ids.erase(ids.begin() + keep_prefix, ids.begin() + keep_prefix + drop);
          cut[i] = 1;
        }
        Example::Seq s;
        s.labels.assign(ids.size(), kIgnoreIndex);
        for (std::size_t t = ids.size() - static_cast<std::size_t>(scored); t < ids.size(); ++t) s.labels[t] = ids[t];
        s.ids = std::move(ids);
        return s;
      };
      if (format == DataFormat::text) {
        Example::Seq s;
        s.ids = tokenizer->encode_with_special(r.text);
        if (static_cast<std::int64_t>(s.ids.size()) > limit) {
          if (options.max_len <= 0)
            fail(ErrorKind::format,
                 "{}:{}: {} tokens exceed the model's max_position_embeddings ({}); pass --max-len to truncate",
                 file.string(), r.line, s.ids.size(), limit);
          s.ids.resize(static_cast<std::size_t>(limit));
          cut[i] = 1;
        }
        if (s.ids.size() < 2 && cut[i])
          fail(ErrorKind::invalid_argument,
               "{}:{}: --max-len {} leaves 1 token of the text: a sequence needs at least 2 (one to predict "
               "from, one to predict)",
               file.string(), r.line, limit);
        if (s.ids.size() < 2)
          fail(ErrorKind::format, "{}:{}: the text has fewer than 2 tokens, so nothing to predict", file.string(),
               r.line);
        s.labels = s.ids;
        e.seqs.push_back(std::move(s));
      } else if (format == DataFormat::completion) {
        e.seqs.push_back(scored_seq(r.completion));
      } else {
        for (const auto& o : r.options) e.seqs.push_back(scored_seq(o));
      }
    };
    tbb::parallel_for(std::size_t{0}, records.size(), [&](std::size_t i) {
      try {
        tokenize(i);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
    for (const std::exception_ptr& e : errors)
      if (e) std::rethrow_exception(e);
    // Special tokens above the embedding (Tokenizer::text_vocab_size) are fine until the text
    // writes one out.
    for (const Example& e : examples) {
      auto check = [&](const std::vector<std::int32_t>& ids) {
        for (const std::int32_t id : ids)
          if (id < 0 || id >= config.vocab_size)
            fail(ErrorKind::format, "{}:{}: the text encodes the token {} (id {}), outside the model's vocabulary [0, {})",
                 file.string(), e.line, tokenizer->id_to_token(id), id, config.vocab_size);
      };
      for (const auto& s : e.seqs) check(s.ids);
      check(e.prompt_ids);
    }
    d.examples_ = std::move(examples);
    for (char c : cut) d.truncated_ += c;
    d.pad_id_ = tokenizer->pad_id().value_or(tokenizer->eos_id().value_or(0));
    d.prefix_size_ = prefix.size();
  }

  // An example with nothing to predict (no label after a sequence's first position) would
  // make a batch of its own a 0/0 loss: train would skip the step, eval report NaN. Refused
  // here, naming the first such example and how many there are.
  {
    // A label counts when the position before it is not padding (make_batch: a masked
    // position predicts nothing).
    auto predicts = [](const Example::Seq& s) {
      for (std::size_t t = 1; t < s.labels.size(); ++t)
        if (s.labels[t] != kIgnoreIndex && (s.mask.empty() || s.mask[t - 1] != 0)) return true;
      return false;
    };
    std::int64_t bad = 0;
    const Example* first = nullptr;
    std::size_t first_seq = 0;
    for (const auto& e : d.examples_)
      for (std::size_t k = 0; k < e.seqs.size(); ++k)
        if (!predicts(e.seqs[k])) {
          if (bad++ == 0) {
            first = &e;
            first_seq = k;
          }
          break;
        }
    if (bad > 0) {
      const std::string count =
          bad > 1 ? fmt::format(" ({} of the {} examples have nothing to predict)", bad, d.examples_.size()) : "";
      if (d.format_ == DataFormat::tokens) {
        fail(ErrorKind::format, "{}: sequence {} has nothing to predict: {}{}", file.string(), first->line - 1,
             first->seqs[first_seq].ids.size() < 2
                 ? std::string("it has 1 token, and a causal LM predicts each token from the ones before it (a "
                               "sequence needs at least 2)")
             : token_labels ? std::string("every label after its first position is -100")
                            : std::string("its attention_mask is 0 at every position after the first"),
             count);
      }
      fail(ErrorKind::format, "{}:{}: nothing to predict: {} has no token after the first position to score{}",
           file.string(), first->line,
           d.format_ == DataFormat::options ? fmt::format("option {}", first_seq) : std::string("the example"), count);
    }
  }

  // --num-train / --num-eval: a seeded sample, kept in file order.
  if (options.sample > d.size())
    log_warn("{}: a sample of {} examples was asked for, the file has {}; using all of them", d.source_,
             options.sample, d.size());
  if (options.sample > 0 && options.sample < d.size()) {
    const auto idx = sample_indices(d.size(), options);
    std::vector<Example> kept;
    for (auto i : idx) kept.push_back(std::move(d.examples_[static_cast<std::size_t>(i)]));
    d.examples_ = std::move(kept);
  }
  const bool gold_only = d.trains_on_gold_only();
  for (const auto& e : d.examples_) {
    d.max_candidates_ = std::max(d.max_candidates_, static_cast<int>(e.seqs.size()));
    for (const auto& s : e.seqs) d.longest_ = std::max(d.longest_, static_cast<int>(s.ids.size()));
    if (gold_only)
      d.train_longest_ =
          std::max(d.train_longest_, static_cast<int>(e.seqs[static_cast<std::size_t>(e.label)].ids.size()));
  }
  d.train_rows_ = gold_only ? 1 : d.max_candidates_;
  if (!gold_only) d.train_longest_ = d.longest_;
  if (d.truncated_ > 0 && options.prompts_only)
    log_warn("{}: {} of {} prompts truncated to their last {} tokens (the special prefix kept)", d.source_,
             d.truncated_, d.size(), limit);
  else if (d.truncated_ > 0)
    log_warn("{}: {} of {} examples truncated to {} tokens", d.source_, d.truncated_, d.size(), limit);
  return d;
}

int Dataset::longest_prompt() const {
  std::size_t n = 0;
  for (const auto& e : examples_) n = std::max(n, e.prompt_ids.size());
  return static_cast<int>(n);
}

int Dataset::max_len() const {
  return options_.max_len > 0 ? options_.max_len : static_cast<int>(config_.max_positions);
}

std::vector<std::int32_t> Dataset::generation_prompt(std::int64_t i, int max_new_tokens) const {
  if (max_len() <= max_new_tokens)
    fail(ErrorKind::invalid_argument,
         "{} of {} tokens leave no room for a prompt and {} new tokens (MeZO cuts a prompt to max_len − "
         "max_new_tokens)", options_.max_len > 0 ? "--max-len" : "max_position_embeddings", max_len(), max_new_tokens);
  std::vector<std::int32_t> ids = example(i).prompt_ids;
  const auto cap = static_cast<std::size_t>(max_len() - max_new_tokens);
  const std::size_t keep_prefix = std::min(prefix_size_, cap > 0 ? cap - 1 : 0);
  if (ids.size() > cap)
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(keep_prefix),
              ids.begin() + static_cast<std::ptrdiff_t>(keep_prefix + ids.size() - cap));
  return ids;
}

int Dataset::longest_prompt(int max_new_tokens) const {
  if (max_len() <= max_new_tokens) return longest_prompt();
  return std::min(longest_prompt(), max_len() - max_new_tokens);
}

bool Dataset::trains_on_gold_only() const {
  return format_ == DataFormat::options && task_trains_on_gold_only(options_.task);
}

std::string Dataset::describe() const {
  return fmt::format("{} ({}{}): {} examples, longest {} tokens{}{}", source_,
                     options_.task.empty() ? std::string(data_format_name(format_)) : options_.task,
                     format_ == DataFormat::options ? fmt::format(", up to {} candidates", max_candidates_) : "",
                     size(), longest_, truncated_ > 0 ? fmt::format(", {} truncated", truncated_) : "",
                     trains_on_gold_only()
                         ? fmt::format("; training rows: the correct candidate alone, longest {} tokens", train_longest_)
                         : "");
}

std::int64_t Dataset::stream_index(__int128 position) const {
  const std::int64_t n = size();
  // (Below 2^63 the same epoch and offset as in 64 bits; the epoch only seeds the permutation.)
  const auto epoch = static_cast<std::uint64_t>(position / n);
  const auto offset = static_cast<std::int64_t>(position % n);
  if (!options_.shuffle) return offset;
  // The permutation of `epoch`: Fisher–Yates over a seeded mt19937_64 (its output is fixed by
  // the standard, and the bounded draw is ours), so every platform gives the same order.
  // The permutation depends only on (key, n): cached per thread for the steps of an epoch.
  thread_local std::uint64_t cached_key = ~std::uint64_t{0};
  thread_local std::vector<std::int64_t> perm;
  const std::uint64_t key = options_.seed * 0x9E3779B97F4A7C15ULL + epoch;
  if (cached_key != key || static_cast<std::int64_t>(perm.size()) != n) {
    perm.resize(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<std::int64_t>(i);
    std::mt19937_64 rng(key);
    for (std::size_t i = perm.size() - 1; i > 0; --i) std::swap(perm[i], perm[static_cast<std::size_t>(rng() % (i + 1))]);
    cached_key = key;
  }
  return perm[static_cast<std::size_t>(offset)];
}

HostBatch Dataset::train_batch(std::int64_t step, int batch_size) const {
  std::vector<std::int64_t> ex(static_cast<std::size_t>(batch_size));
  for (int j = 0; j < batch_size; ++j) ex[static_cast<std::size_t>(j)] = stream_index(static_cast<__int128>(step) * batch_size + j);
  return collate(ex, trains_on_gold_only());
}

HostBatch Dataset::eval_batch(std::int64_t first, std::int64_t count) const {
  std::vector<std::int64_t> ex;
  for (std::int64_t i = first; i < std::min(size(), first + count); ++i) ex.push_back(i);
  return collate(ex);
}

HostBatch Dataset::collate(const std::vector<std::int64_t>& examples, bool gold_only) const {
  // gold_only: one row per example, its correct candidate (MeZO's LM-style training).
  auto seqs_of = [&](const Example& e) {
    return gold_only ? std::span<const Example::Seq>(&e.seqs[static_cast<std::size_t>(e.label)], 1)
                     : std::span<const Example::Seq>(e.seqs);
  };
  int rows = 0, T = 0;
  for (auto i : examples)
    for (const auto& s : seqs_of(example(i))) {
      ++rows;
      T = std::max(T, static_cast<int>(s.ids.size()));
    }
  const std::size_t n = static_cast<std::size_t>(rows) * static_cast<std::size_t>(T);
  std::vector<std::int32_t> ids(n, pad_id_), mask(n, 0), labels(n, kIgnoreIndex);
  std::vector<int> sizes, answers;
  std::size_t row = 0;
  for (auto i : examples) {
    const Example& e = example(i);
    for (const auto& s : seqs_of(e)) {
      const std::size_t len = s.ids.size();
      const std::size_t at = row * static_cast<std::size_t>(T) + (options_.left_padding ? T - len : 0);
      std::copy(s.ids.begin(), s.ids.end(), ids.begin() + static_cast<std::ptrdiff_t>(at));
      std::copy(s.labels.begin(), s.labels.end(), labels.begin() + static_cast<std::ptrdiff_t>(at));
      if (s.mask.empty())
        std::fill_n(mask.begin() + static_cast<std::ptrdiff_t>(at), len, 1);
      else
        std::copy(s.mask.begin(), s.mask.end(), mask.begin() + static_cast<std::ptrdiff_t>(at));
      ++row;
    }
    sizes.push_back(static_cast<int>(e.seqs.size()));
    answers.push_back(e.label);
  }
  HostBatch b = make_batch(config_, rows, T, ids, mask, labels);
  if (format_ == DataFormat::options && !gold_only) set_option_groups(b, sizes, answers);
  return b;
}

EvalResult evaluate(Session& session, const Dataset& data, int batch_rows, const std::function<bool()>& stop,
                    const EvalProgress& progress) {
  EvalResult r;
  const std::int64_t per_batch = eval_examples_per_batch(data, batch_rows);
  double sum = 0;
  std::int64_t correct = 0;
  std::vector<int> predicted;  // options: the argmax candidate of each example, in order
  for (std::int64_t first = 0; first < data.size(); first += per_batch) {
    if (stop && stop()) {
      r.interrupted = true;
      return r;
    }
    const HostBatch b = data.eval_batch(first, per_batch);
    std::vector<float> token_loss(static_cast<std::size_t>(b.tokens()));
    EvalOptions eo;
    eo.token_loss = token_loss.data();
    session.eval(b, eo);
    const auto T = static_cast<std::size_t>(b.seq);
    if (data.format() != DataFormat::options) {
      for (std::size_t i = 0; i < token_loss.size(); ++i)
        if (b.targets[i] >= 0) {
          sum += token_loss[i];
          ++r.tokens;
        }
      r.examples += static_cast<std::int64_t>(b.batch);
      if (progress) progress(r.examples, data.size(), -1);
      continue;
    }
    // Candidates' mean log-likelihoods → MeZO's cross-entropy over candidates and accuracy.
    std::size_t row = 0;
    for (std::int64_t i = first; i < std::min(data.size(), first + per_batch); ++i) {
      const Example& e = data.example(i);
      std::vector<double> score;
      for (std::size_t k = 0; k < e.seqs.size(); ++k, ++row) {
        double s = 0;
        std::int64_t n = 0;
        for (std::size_t t = 0; t < T; ++t)
          if (b.targets[row * T + t] >= 0) {
            s += token_loss[row * T + t];
            ++n;
          }
        r.tokens += n;
        score.push_back(-s / static_cast<double>(n));
      }
      const auto best = std::max_element(score.begin(), score.end());  // the first of ties, as np.argmax
      double se = 0;
      for (double x : score) se += std::exp(x - *best);
      sum += *best + std::log(se) - score[static_cast<std::size_t>(e.label)];
      const int pick = static_cast<int>(best - score.begin());
      // MeZO: a prediction is right when it is one of the correct candidates (ReCoRD's several).
      correct += (e.golds.empty() ? pick == e.label : std::find(e.golds.begin(), e.golds.end(), pick) != e.golds.end())
                     ? 1 : 0;
      predicted.push_back(pick);
      ++r.examples;
    }
    if (progress) progress(r.examples, data.size(), -1);
  }
  if (data.format() == DataFormat::options) {
    r.loss = r.examples > 0 ? sum / static_cast<double>(r.examples) : std::nan("");
    r.accuracy = r.examples > 0 ? static_cast<double>(correct) / static_cast<double>(r.examples) : std::nan("");
    r.metrics.emplace_back("accuracy", r.accuracy);
    if (data.task() == "multirc") {
      std::vector<int> gold;
      std::vector<std::int64_t> question;
      for (std::int64_t i = 0; i < data.size(); ++i) {
        gold.push_back(data.example(i).label);
        question.push_back(data.example(i).question);
      }
      const auto m = metrics::multirc_scores(predicted, gold, question);
      r.metrics.emplace_back("f1a", m.f1a);
      r.metrics.emplace_back("em", m.em);
    } else if (data.task() == "record") {
      double f1 = 0, em = 0;
      for (std::int64_t i = 0; i < data.size(); ++i) {
        const Example& e = data.example(i);
        const std::string& chosen = e.candidates[static_cast<std::size_t>(predicted[static_cast<std::size_t>(i)])];
        f1 += metrics::qa_f1(chosen, e.answers);
        em += metrics::qa_em(chosen, e.answers);
      }
      r.metrics.emplace_back("f1", r.examples > 0 ? f1 / static_cast<double>(r.examples) : std::nan(""));
      r.metrics.emplace_back("em", r.examples > 0 ? em / static_cast<double>(r.examples) : std::nan(""));
    }
  } else {
    r.loss = r.tokens > 0 ? sum / static_cast<double>(r.tokens) : std::nan("");
    if (task_is_generation(data.task()))
      r.note = fmt::format(
          "{}'s metric (F1/EM of the greedy generation, up to 50 new tokens, stopping at a newline, as MeZO) needs "
          "generation: `zo2-tune eval` decodes with --max-new-tokens > 0; this is the loss of the gold answer's tokens",
          data.task());
  }
  return r;
}

}  // namespace zo2::cli

namespace zo2::cli {

EvalResult evaluate_generation(Session& session, const Dataset& data, const Tokenizer& tokenizer,
                               int max_new_tokens, const std::function<bool()>& stop, const EvalProgress& progress) {
  if (!task_is_generation(data.task()))
    fail(ErrorKind::invalid_argument, "generation-based evaluation is for squad and drop, not {}",
         data.task().empty() ? std::string("a file without --task") : data.task());
  const ModelConfig& config = session.config();
  const int max_seq = session.session_config().max_seq > 0 ? session.session_config().max_seq
                                                           : static_cast<int>(config.max_positions);
  if (max_seq <= max_new_tokens)
    fail(ErrorKind::invalid_argument, "sequences of {} tokens leave no room for a prompt and {} new tokens", max_seq,
         max_new_tokens);
  if (data.max_len() <= max_new_tokens)
    fail(ErrorKind::invalid_argument, "--max-len {} leaves no room for a prompt and {} new tokens (MeZO cuts a prompt "
         "to max_len − max_new_tokens)", data.max_len(), max_new_tokens);
  GenerateOptions go;
  go.max_new_tokens = max_new_tokens;
  go.pad_id = data.pad_id();
  const auto newline = tokenizer.encode("\n");
  if (!newline.empty()) go.stop_ids.push_back(newline.back());
  if (tokenizer.eos_id()) go.stop_ids.push_back(*tokenizer.eos_id());
  std::vector<std::int32_t> specials;
  for (auto id : {tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()})
    if (id) specials.push_back(*id);
  const std::size_t keep_prefix = tokenizer.special_prefix().size();

  EvalResult r;
  double f1 = 0, em = 0, drop_f1 = 0, drop_em = 0;
  // MeZO cuts each prompt to leave room for the new tokens within max_length (--max-len),
  // keeping the special prefix and the end; the session's max_seq is a cap of its own.
  std::vector<std::vector<std::int32_t>> prompts;
  for (std::int64_t i = 0; i < data.size(); ++i) {
    std::vector<std::int32_t> ids = data.generation_prompt(i, max_new_tokens);
    const auto cap = static_cast<std::size_t>(max_seq - max_new_tokens);
    if (ids.size() > cap)
      ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(keep_prefix),
                ids.begin() + static_cast<std::ptrdiff_t>(keep_prefix + ids.size() - cap));
    prompts.push_back(std::move(ids));
  }
  // A stop ends the decoding after the step in progress (the session stays usable, as a
  // progress callback's stop in the C API).
  struct Stopped {};
  if (stop || progress)
    go.progress = [&stop, &progress](const GenerateProgress& p) {
      if (progress) progress(p.prompts_done, p.prompts, p.new_tokens);
      if (stop && stop()) throw Stopped{};
    };
  std::vector<Generation> gen;
  try {
    if (stop && stop()) throw Stopped{};
    gen = generate(session, prompts, go);
  } catch (const Stopped&) {
    r.interrupted = true;
    return r;
  } catch (const NonFiniteLogits& e) {
    r.non_finite = true;
    r.note = e.what();
    r.loss = std::nan("");
    return r;
  }
  r.prompts = prompts;
  for (std::size_t k = 0; k < gen.size(); ++k) {
    std::vector<std::int32_t> kept;
    for (auto id : gen[k].tokens)
      if (id < tokenizer.vocab_size() && std::find(specials.begin(), specials.end(), id) == specials.end())
        kept.push_back(id);
    const std::string text = py_strip(tokenizer.decode(kept));  // Python's strip(), as MeZO
    const Example& e = data.example(static_cast<std::int64_t>(k));
    f1 += metrics::qa_f1(text, e.answers);
    em += metrics::qa_em(text, e.answers);
    if (data.task() == "drop") {
      const auto d = metrics::drop_question(text, e.drop_golds);
      drop_f1 += d.f1;
      drop_em += d.em;
    }
    r.generated.push_back(gen[k].tokens);
    r.predictions.push_back(text);
    ++r.examples;
  }
  const double n = static_cast<double>(std::max<std::int64_t>(1, r.examples));
  r.metrics = {{"f1", r.examples > 0 ? f1 / n : std::nan("")}, {"em", r.examples > 0 ? em / n : std::nan("")}};
  if (data.task() == "drop") {  // drop_eval.py's, beside MeZO's
    r.metrics.emplace_back("drop_f1", r.examples > 0 ? drop_f1 / n : std::nan(""));
    r.metrics.emplace_back("drop_em", r.examples > 0 ? drop_em / n : std::nan(""));
  }
  r.loss = std::nan("");
  return r;
}

}  // namespace zo2::cli
