// The tokenizer base: added-token matching, special-token configuration, and from_dir(),
// which picks the tokenizer files of a model directory and reads the special tokens from
// tokenizer_config.json / special_tokens_map.json / config.json.
#include "models/tokenizer.h"

#include "runtime/error.h"
#include "runtime/json_file.h"
#include "runtime/log.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <unordered_map>

namespace zo2 {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ---- added tokens ------------------------------------------------------------------

// Tokens are matched in two classes: 0, the raw text (every token, or the non-normalized ones
// of a tokenizer with a normalizer); 1, the normalized text (the normalized ones).
struct Tokenizer::AddedTable {
  struct Matcher {
    // For each first byte, the tokens starting with it, longest first.
    std::array<std::vector<std::uint32_t>, 256> by_first;
    int single_first = -1;  // the one first byte of all tokens, if there is one (memchr scan)
    bool empty = true;
  };
  std::vector<AddedToken> tokens;
  std::vector<std::string> match;  // what is matched: the content, or its normalized form
  std::vector<std::uint8_t> cls;   // 0: raw text, 1: normalized text, 2: never matched
  Matcher matchers[2];
  std::unordered_map<std::string, std::uint32_t> by_content;
  std::unordered_map<std::int32_t, std::uint32_t> by_id;
  std::int32_t max_id = -1, min_id = std::numeric_limits<std::int32_t>::max();

  void index(std::uint32_t i) {
    if (cls[i] > 1) return;
    Matcher& m = matchers[cls[i]];
    const std::string& text = match[i];
    const unsigned char first = static_cast<unsigned char>(text[0]);
    auto& list = m.by_first[first];
    auto pos = std::find_if(list.begin(), list.end(), [&](std::uint32_t k) { return match[k].size() < text.size(); });
    list.insert(pos, i);  // longest first, ties in registration order
    m.empty = false;
    if (m.single_first == -1)
      m.single_first = first;
    else if (m.single_first != first)
      m.single_first = -2;
  }
  void rebuild() {
    for (auto& m : matchers) m = Matcher{};
    by_content.clear();
    by_id.clear();
    max_id = -1;
    min_id = std::numeric_limits<std::int32_t>::max();
    for (std::uint32_t i = 0; i < tokens.size(); ++i) {
      by_content[tokens[i].content] = i;
      by_id.emplace(tokens[i].id, i);  // the first registered content wins for decode
      max_id = std::max(max_id, tokens[i].id);
      min_id = std::min(min_id, tokens[i].id);
      index(i);
    }
  }
};

Tokenizer::Tokenizer() : added_(std::make_unique<AddedTable>()) {}
Tokenizer::~Tokenizer() = default;

void Tokenizer::add_token(AddedToken token) {
  if (token.content.empty() || token.id < 0) return;
  AddedTable& t = *added_;
  std::uint8_t cls = 0;
  std::string match = token.content;
  if (split_normalized_ && token.normalized) {
    cls = 1;
    normalize_added_token(match);
    if (match.empty()) cls = 2;
  }
  if (auto it = t.by_content.find(token.content); it != t.by_content.end()) {
    t.tokens[it->second] = std::move(token);  // replaced: rare, rebuild everything
    t.match[it->second] = std::move(match);
    t.cls[it->second] = cls;
    t.rebuild();
    return;
  }
  const auto idx = static_cast<std::uint32_t>(t.tokens.size());
  t.tokens.push_back(std::move(token));
  t.match.push_back(std::move(match));
  t.cls.push_back(cls);
  const AddedToken& added = t.tokens.back();
  t.by_content.emplace(added.content, idx);
  t.by_id.emplace(added.id, idx);
  t.max_id = std::max(t.max_id, added.id);
  t.min_id = std::min(t.min_id, added.id);
  t.index(idx);
}

bool Tokenizer::has_added_tokens() const { return !added_->matchers[0].empty; }
bool Tokenizer::has_normalized_added_tokens() const { return !added_->matchers[1].empty; }
std::int32_t Tokenizer::max_added_id() const { return added_->max_id; }

std::int32_t Tokenizer::text_vocab_size() const {
  std::int32_t n = base_vocab_size();
  for (const AddedToken& t : added_->tokens)
    if (!t.special) n = std::max(n, t.id + 1);
  return n;
}

std::optional<std::int32_t> Tokenizer::added_token_id(std::string_view content) const {
  auto it = added_->by_content.find(std::string(content));
  if (it == added_->by_content.end()) return std::nullopt;
  return added_->tokens[it->second].id;
}

const std::string* Tokenizer::added_token_content(std::int32_t id) const {
  auto it = added_->by_id.find(id);
  // A token matched in the normalized text decodes as its normalized form (HF 0.23's
  // normalized_cache); match[] holds it (the content for the others).
  return it == added_->by_id.end() ? nullptr : &added_->match[it->second];
}

bool Tokenizer::maybe_added_id(std::int32_t id) const { return id >= added_->min_id && id <= added_->max_id; }

namespace {
bool is_space_byte(unsigned char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}
// A byte that may be part of a word (ASCII letters, digits, '_', and any non-ASCII byte).
bool is_word_byte(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         c == '_' || c >= 0x80;
}
}  // namespace

std::vector<Tokenizer::Piece> Tokenizer::split_added(std::string_view text, bool normalized) const {
  std::vector<Piece> out;
  const auto& table = added_->matchers[normalized ? 1 : 0];
  const auto& tokens = added_->tokens;
  const auto& match = added_->match;
  const std::size_t n = text.size();
  std::size_t pos = 0;  // start of the pending plain text
  std::size_t i = 0;
  while (i < n) {
    if (table.single_first >= 0) {  // jump to the next possible start
      const void* p = std::memchr(text.data() + i, table.single_first, n - i);
      if (!p) break;
      i = static_cast<const char*>(p) - text.data();
    }
    const auto& cands = table.by_first[static_cast<unsigned char>(text[i])];
    const AddedToken* hit = nullptr;
    std::size_t hit_len = 0;
    for (std::uint32_t idx : cands) {
      const AddedToken& t = tokens[idx];
      const std::string& m = match[idx];
      if (text.compare(i, m.size(), m) != 0) continue;
      if (t.single_word) {
        std::size_t e = i + m.size();
        if ((i > 0 && is_word_byte(static_cast<unsigned char>(text[i - 1]))) ||
            (e < n && is_word_byte(static_cast<unsigned char>(text[e]))))
          continue;
      }
      hit = &t;
      hit_len = m.size();
      break;
    }
    if (!hit) {
      ++i;
      continue;
    }
    std::size_t start = i, end = i + hit_len;
    if (hit->lstrip)
      while (start > pos && is_space_byte(static_cast<unsigned char>(text[start - 1]))) --start;
    if (hit->rstrip)
      while (end < n && is_space_byte(static_cast<unsigned char>(text[end]))) ++end;
    if (start > pos) out.push_back({text.substr(pos, start - pos), -1});
    out.push_back({text.substr(start, end - start), hit->id});
    pos = i = end;
  }
  if (pos < n) out.push_back({text.substr(pos), -1});
  return out;
}

// ---- special tokens ------------------------------------------------------------------

bool Tokenizer::add_bos() const {
  return bos_id_ && !prefix_.empty() && prefix_.front() == *bos_id_;
}
bool Tokenizer::add_eos() const {
  return eos_id_ && !suffix_.empty() && suffix_.back() == *eos_id_;
}

std::vector<std::int32_t> Tokenizer::encode_with_special(std::string_view text) const {
  std::vector<std::int32_t> ids = encode(text);
  if (prefix_.empty() && suffix_.empty()) return ids;
  std::vector<std::int32_t> out;
  out.reserve(prefix_.size() + ids.size() + suffix_.size());
  out.insert(out.end(), prefix_.begin(), prefix_.end());
  out.insert(out.end(), ids.begin(), ids.end());
  out.insert(out.end(), suffix_.begin(), suffix_.end());
  return out;
}

void Tokenizer::apply_special_config(const SpecialConfig& c) {
  auto replace_id = [](std::vector<std::int32_t>& v, std::optional<std::int32_t> old_id,
                       std::int32_t new_id) {
    if (old_id && v.size() == 1 && v[0] == *old_id) v[0] = new_id;
  };
  if (c.bos_id) {
    replace_id(prefix_, bos_id_, *c.bos_id);
    bos_id_ = c.bos_id;
  }
  if (c.eos_id) {
    replace_id(suffix_, eos_id_, *c.eos_id);
    eos_id_ = c.eos_id;
  }
  if (c.pad_id) pad_id_ = c.pad_id;
  if (c.unk_id) unk_id_ = c.unk_id;
  if (c.add_bos) {
    prefix_.clear();
    if (*c.add_bos) {
      if (!bos_id_) fail(ErrorKind::format, "add_bos_token is true but the tokenizer has no BOS token");
      prefix_.push_back(*bos_id_);
    }
  }
  if (c.add_eos) {
    suffix_.clear();
    if (*c.add_eos) {
      if (!eos_id_) fail(ErrorKind::format, "add_eos_token is true but the tokenizer has no EOS token");
      suffix_.push_back(*eos_id_);
    }
  }
}

namespace {

// A FIFO or a directory of that name is refused by name, never waited on or passed over
// (Note [Reading JSON]).
std::optional<json> read_json_if_exists(const fs::path& p) {
  std::error_code ec;
  if (!fs::exists(p, ec)) return std::nullopt;
  const std::string text = read_regular_file(p);
  try {
    return parse_json_text(text, p.string());
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
    fail(ErrorKind::format, "{}: malformed JSON: {}", p.string(), e.what());
  }
}

// A special token in tokenizer_config.json / special_tokens_map.json: "</s>", or
// {"content": "</s>", ...}, or null.
std::optional<std::string> token_content(const json& obj, const char* field, const fs::path& file) {
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  fail(ErrorKind::format, "{}: field \"{}\": expected a string or an object with a \"content\" string, got {}",
       file.string(), field, it->dump());
}

std::optional<bool> bool_field(const json& obj, const char* field, const fs::path& file) {
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean())
    fail(ErrorKind::format, "{}: field \"{}\": expected true or false, got {}", file.string(), field,
         it->dump());
  return it->get<bool>();
}

// config.json's bos_token_id etc.: an integer, a list of integers (the first is taken), or null.
std::optional<std::int32_t> id_field(const json& obj, const char* field, const fs::path& file,
                                     std::int32_t vocab_size) {
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return std::nullopt;
  const json* v = &*it;
  if (v->is_array()) {
    if (v->empty()) return std::nullopt;
    v = &(*v)[0];
  }
  if (!v->is_number_integer())
    fail(ErrorKind::format, "{}: field \"{}\": expected an integer token id, got {}", file.string(),
         field, it->dump());
  auto id = v->get<std::int64_t>();
  if (id < 0 || id >= vocab_size)
    fail(ErrorKind::format, "{}: field \"{}\": token id {} is outside the vocabulary (size {})",
         file.string(), field, id, vocab_size);
  return static_cast<std::int32_t>(id);
}

}  // namespace

// ---- from_dir --------------------------------------------------------------------------

std::unique_ptr<Tokenizer> Tokenizer::from_dir(const fs::path& dir) try {
  std::error_code ec;
  if (fs::is_regular_file(dir, ec)) {
    if (dir.filename() == "tokenizer.json") return from_tokenizer_json(dir);
    if (dir.extension() == ".model") return from_sentencepiece(dir);
    fail(ErrorKind::invalid_argument,
         "{} is a file; give a tokenizer directory, a tokenizer.json or a SentencePiece .model",
         dir.string());
  }
  if (!fs::is_directory(dir, ec)) {
    if (fs::exists(fs::symlink_status(dir, ec)))  // a FIFO, a socket, a device, a dangling link
      fail(ErrorKind::io, "tokenizer {}: neither a directory nor a regular file; give a tokenizer directory, a "
           "tokenizer.json or a SentencePiece .model", dir.string());
    fail(ErrorKind::io, "tokenizer directory {} does not exist", dir.string());
  }

  // exists, not is_regular_file: a FIFO or a directory named tokenizer.json is refused by
  // name when read (Note [Reading JSON]), not passed over for the next kind of tokenizer.
  auto exists = [&](const char* name) { return fs::exists(dir / name, ec); };
  std::unique_ptr<Tokenizer> tok;
  bool slow_style = false;  // vocab + merges: special tokens come only from the configs
  if (exists("tokenizer.json")) {
    try {
      tok = from_tokenizer_json(dir / "tokenizer.json");
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::unsupported || !exists("tokenizer.model")) throw;
      log_info("tokenizer: {}; using tokenizer.model instead", e.what());
    }
    // A SentencePiece model converted to tokenizer.json (LLaMA-2, Mistral, Gemma): its own
    // tokenizer.model, through libsentencepiece, stays what zo2 reads when it is there.
    if (tok && tok->sentencepiece_style() && exists("tokenizer.model")) {
      log_info("tokenizer: {} is a SentencePiece conversion; using tokenizer.model", (dir / "tokenizer.json").string());
      tok.reset();
    }
  }
  if (!tok && exists("tokenizer.model")) tok = from_sentencepiece(dir / "tokenizer.model");
  if (!tok) {
    for (auto [v, m] : {std::pair{"vocab.json", "merges.txt"}, std::pair{"encoder.json", "vocab.bpe"}}) {
      if (exists(v) && exists(m)) {
        tok = from_vocab_merges(dir / v, dir / m);
        slow_style = true;
        break;
      }
      if (exists(v) != exists(m))
        fail(ErrorKind::io, "tokenizer directory {}: found {} but not {}", dir.string(),
             exists(v) ? v : m, exists(v) ? m : v);
    }
  }
  if (!tok)
    fail(ErrorKind::io,
         "no tokenizer in {}: looked for tokenizer.json, tokenizer.model, vocab.json + merges.txt, "
         "encoder.json + vocab.bpe",
         dir.string());

  // Special tokens: tokenizer_config.json, then special_tokens_map.json, then config.json.
  const fs::path tc_path = dir / "tokenizer_config.json";
  const fs::path stm_path = dir / "special_tokens_map.json";
  const fs::path cfg_path = dir / "config.json";
  const json empty = json::object();
  auto tc = read_json_if_exists(tc_path);
  auto stm = read_json_if_exists(stm_path);
  auto cfg = read_json_if_exists(cfg_path);
  for (auto [j, p] : {std::pair{&tc, &tc_path}, std::pair{&stm, &stm_path}, std::pair{&cfg, &cfg_path}})
    if (*j && !(*j)->is_object())
      fail(ErrorKind::format, "{}: expected a JSON object", p->string());

  if (tc) {
    // Tokens HF registered on the slow tokenizer ("added_tokens_decoder": {"50265": {...}}).
    if (auto it = tc->find("added_tokens_decoder"); it != tc->end() && it->is_object()) {
      for (const auto& [key, val] : it->items()) {
        std::int64_t id = -1;
        try {
          std::size_t used = 0;
          id = std::stoll(key, &used);
          if (used != key.size()) id = -1;
        } catch (...) {
        }
        if (id < 0 || id > INT32_MAX || !val.is_object() || !val.contains("content") ||
            !val["content"].is_string())
          fail(ErrorKind::format,
               "{}: field \"added_tokens_decoder\": entry \"{}\" needs an integer key and a "
               "\"content\" string",
               tc_path.string(), key);
        AddedToken t;
        t.content = val["content"].get<std::string>();
        t.id = static_cast<std::int32_t>(id);
        t.lstrip = val.value("lstrip", false);
        t.rstrip = val.value("rstrip", false);
        t.single_word = val.value("single_word", false);
        t.special = val.value("special", true);
        t.normalized = val.value("normalized", !t.special);
        if (slow_style || !tok->added_token_id(t.content)) tok->add_token(std::move(t));
      }
    }
    if (slow_style) {
      if (auto aps = bool_field(*tc, "add_prefix_space", tc_path)) tok->set_add_prefix_space(*aps);
    }
  }

  SpecialConfig sc;
  struct Field {
    const char* token;
    const char* id;
    std::optional<std::int32_t>* out;
    bool required;
  };
  Field fields[] = {{"bos_token", "bos_token_id", &sc.bos_id, true},
                    {"eos_token", "eos_token_id", &sc.eos_id, true},
                    {"pad_token", "pad_token_id", &sc.pad_id, false},
                    {"unk_token", nullptr, &sc.unk_id, false}};
  for (auto& f : fields) {
    std::optional<std::string> content;
    const fs::path* from = nullptr;
    if (tc) {
      content = token_content(*tc, f.token, tc_path);
      from = &tc_path;
    }
    if (!content && stm) {
      content = token_content(*stm, f.token, stm_path);
      from = &stm_path;
    }
    if (content) {
      auto id = tok->token_to_id(*content);
      if (id) {
        *f.out = id;
        // The slow HF tokenizers never split their special tokens.
        if (!tok->added_token_id(*content)) tok->add_token({*content, *id});
        continue;
      }
      if (f.required)
        fail(ErrorKind::format, "{}: field \"{}\": token \"{}\" is not in the vocabulary", from->string(),
             f.token, *content);
      log_warn("tokenizer: {}: {} \"{}\" is not in the vocabulary; ignored", from->string(), f.token,
               *content);
    }
    if (cfg && f.id) *f.out = id_field(*cfg, f.id, cfg_path, tok->vocab_size());
  }
  if (tc) {
    sc.add_bos = bool_field(*tc, "add_bos_token", tc_path);
    sc.add_eos = bool_field(*tc, "add_eos_token", tc_path);
  }
  try {
    tok->apply_special_config(sc);
  } catch (const Error& e) {
    fail(e.kind(), "{}: {}", tc_path.string(), e.what());
  }
  return tok;
} catch (const json::exception& e) {  // a field of the wrong JSON type in a config file
  fail(ErrorKind::format, "{}: malformed tokenizer configuration: {}", dir.string(), e.what());
}

}  // namespace zo2
