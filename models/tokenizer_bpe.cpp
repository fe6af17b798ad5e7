// Byte-level BPE (GPT-2, OPT, LLaMA-3): the byte↔unicode mapping of GPT-2, a PCRE2 (JIT)
// pre-tokenizer, merges by rank from a hash map keyed by the pair of token ids, and a
// sharded per-word cache. Loaders: vocab.json + merges.txt (encoder.json + vocab.bpe) and
// HF tokenizer.json with a BPE model.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "models/tokenizer.h"
#include "models/utf8.h"
#include "runtime/error.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <queue>
#include <sstream>
#include <unordered_map>

namespace zo2 {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// The GPT-2 pre-tokenizer (also HF's ByteLevel pre-tokenizer with use_regex=true).
// Larger ids are taken for a malformed file rather than allocated for.
constexpr std::int32_t kMaxVocab = 1 << 24;

constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) fail(ErrorKind::io, "cannot open {}: {}", p.string(), std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail(ErrorKind::io, "cannot read {}", p.string());
  return ss.str();
}

json parse_json_file(const fs::path& p) {
  std::string text = read_file(p);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
    fail(ErrorKind::format, "{}: malformed JSON: {}", p.string(), e.what());
  }
}

// Shortens a string for an error message.
std::string excerpt(std::string_view s, std::size_t max = 60) {
  if (s.size() <= max) return std::string(s);
  return std::string(s.substr(0, max)) + "...";
}

// ---- GPT-2 byte <-> unicode ----------------------------------------------------------

// Decodes one UTF-8 code point at s[i]; returns false on an invalid sequence.
bool next_utf8(std::string_view s, std::size_t& i, std::uint32_t& cp) {
  auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = b(i);
  int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (len == 0 || i + len > s.size()) return false;
  cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
  for (int k = 1; k < len; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) return false;
    cp = (cp << 6) | (b(i + k) & 0x3F);
  }
  i += len;
  return true;
}

struct ByteMap {
  std::array<std::uint32_t, 256> byte_to_cp{};
  std::array<std::string, 256> byte_to_str;
  std::array<std::int16_t, 324> cp_to_byte{};  // -1 where a code point stands for no byte

  ByteMap() {
    cp_to_byte.fill(-1);
    std::uint32_t extra = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_cp[b] = printable ? static_cast<std::uint32_t>(b) : 256 + extra++;
      cp_to_byte[byte_to_cp[b]] = static_cast<std::int16_t>(b);
      append_utf8(byte_to_str[b], byte_to_cp[b]);
    }
  }
  // The raw bytes of a vocabulary token, or nullopt if it has a character outside the map.
  std::optional<std::string> to_bytes(std::string_view token) const {
    std::string out;
    out.reserve(token.size());
    std::size_t i = 0;
    while (i < token.size()) {
      std::uint32_t cp;
      if (!next_utf8(token, i, cp) || cp >= cp_to_byte.size() || cp_to_byte[cp] < 0) return std::nullopt;
      out += static_cast<char>(cp_to_byte[cp]);
    }
    return out;
  }
  std::string from_bytes(std::string_view bytes) const {
    std::string out;
    for (unsigned char c : bytes) out += byte_to_str[c];
    return out;
  }
};

const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

// ---- merges: (left id, right id) -> (rank, merged id) --------------------------------

class PairMap {
 public:
  static constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();
  struct Value {
    std::uint32_t rank = kNone;
    std::int32_t merged = -1;
  };

  void reserve(std::size_t n) {
    std::size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
    size_ = 0;
  }
  // Returns false when the pair is already there (the first rank is kept).
  bool insert(std::int32_t a, std::int32_t b, Value v) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    std::uint64_t key = make_key(a, b);
    for (std::size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == kEmpty) {
        slots_[i] = {key, v};
        ++size_;
        return true;
      }
      if (slots_[i].key == key) return false;
    }
  }
  Value find(std::int32_t a, std::int32_t b) const {
    std::uint64_t key = make_key(a, b);
    for (std::size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == key) return s.value;
      if (s.key == kEmpty) return {};
    }
  }
  std::size_t size() const { return size_; }

 private:
  static constexpr std::uint64_t kEmpty = ~std::uint64_t{0};
  struct Slot {
    std::uint64_t key = kEmpty;
    Value value;
  };
  static std::uint64_t make_key(std::int32_t a, std::int32_t b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
  }
  static std::size_t hash(std::uint64_t k) {
    k ^= k >> 29;
    k *= 0xBF58476D1CE4E5B9ull;
    k ^= k >> 32;
    return static_cast<std::size_t>(k);
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    reserve(std::max<std::size_t>(old.size(), 16));
    for (const Slot& s : old)
      if (s.key != kEmpty) insert(static_cast<std::int32_t>(s.key >> 32), static_cast<std::int32_t>(s.key), s.value);
  }

  std::vector<Slot> slots_ = std::vector<Slot>(16);
  std::size_t mask_ = 15;
  std::size_t size_ = 0;
};

// ---- PCRE2 pre-tokenizer --------------------------------------------------------------

// Per-thread match data (one ovector pair is all a split needs) and a JIT stack large
// enough for long runs of whitespace.
struct MatchState {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* stack = nullptr;
  MatchState() {
    data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    if (!data || !context || !stack) fail(ErrorKind::out_of_memory, "PCRE2: cannot allocate match data");
    pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~MatchState() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
};

MatchState& match_state() {
  thread_local MatchState state;
  return state;
}

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  int n = pcre2_get_error_message(code, buf, sizeof buf);
  return n < 0 ? fmt::format("PCRE2 error {}", code) : std::string(reinterpret_cast<char*>(buf), n);
}

// A regex that splits text into pieces: each match, and each run of text between matches
// (HF's Split with behavior "Isolated"). Bytes that are not valid UTF-8 never match and
// end up in the between-match pieces, so every byte of the input lands in some piece.
class Splitter {
 public:
  Splitter(std::string_view pattern, bool literal, std::string_view where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    std::uint32_t opts = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : 0);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), opts, &err, &off,
                          nullptr);
    if (!code_)
      fail(ErrorKind::format, "{}: cannot compile the regex \"{}\" at offset {}: {}", where, excerpt(pattern, 200),
           off, pcre2_message(err));
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;  // without JIT, pcre2_match interprets
  }
  ~Splitter() { pcre2_code_free(code_); }
  Splitter(const Splitter&) = delete;
  Splitter& operator=(const Splitter&) = delete;

  template <class F>
  void split(std::string_view s, F&& emit) const {
    MatchState& ms = match_state();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    const std::size_t n = s.size();
    std::size_t pos = 0, start = 0;
    while (start < n) {
      int rc = jit_ ? pcre2_jit_match(code_, subject, n, start, 0, ms.data, ms.context)
                    : pcre2_match(code_, subject, n, start, 0, ms.data, ms.context);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) fail(ErrorKind::invalid_argument, "tokenizer: pre-tokenizer regex failed: {}", pcre2_message(rc));
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(ms.data);
      std::size_t mb = ov[0], me = ov[1];
      if (me <= mb) {  // an empty match: step over one character, it joins the gap
        start = mb + 1;
        while (start < n && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) ++start;
        continue;
      }
      if (mb > pos) emit(s.substr(pos, mb - pos));
      emit(s.substr(mb, me - mb));
      pos = start = me;
    }
    if (pos < n) emit(s.substr(pos));
  }

 private:
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

// ---- the per-word cache ----------------------------------------------------------------

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

// A fast hash for short words, 8 bytes at a time; never 0 (0 marks an empty cache slot).
std::uint64_t word_hash(std::string_view s) {
  auto mix = [](std::uint64_t x) {
    x *= 0xBF58476D1CE4E5B9ull;
    return x ^ (x >> 31);
  };
  const char* p = s.data();
  std::size_t n = s.size();
  std::uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
  for (; n >= 8; p += 8, n -= 8) {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    h = mix(h ^ v);
  }
  std::uint64_t tail = 0;
  for (std::size_t i = 0; i < n; ++i) tail |= static_cast<std::uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  h = mix(mix(h ^ tail) ^ (h >> 29));
  return h | 1;
}

// Word → ids, shared by all threads: 64 shards, each an open-addressing table with its
// keys and ids in two flat buffers and its own mutex. A full shard is emptied and refills.
class WordCache {
 public:
  static constexpr std::size_t kMaxWordBytes = 64;

  // Appends the cached ids of word to out; false if absent.
  bool lookup(std::string_view word, std::uint64_t h, std::vector<std::int32_t>& out) const {
    Shard& s = shards_[h & (kShards - 1)];
    std::lock_guard lock(s.mutex);
    if (s.slots.empty()) return false;  // allocated on first insert
    for (std::size_t i = (h >> 8) & (kSlots - 1);; i = (i + 1) & (kSlots - 1)) {
      const Slot& slot = s.slots[i];
      if (slot.hash == 0) return false;
      if (slot.hash == h && slot.key_len == word.size() &&
          std::memcmp(s.keys.data() + slot.key_off, word.data(), word.size()) == 0) {
        const std::int32_t* ids = s.ids.data() + slot.ids_off;
        out.insert(out.end(), ids, ids + slot.ids_len);
        return true;
      }
    }
  }
  void insert(std::string_view word, std::uint64_t h, const std::int32_t* ids, std::size_t n) const {
    Shard& s = shards_[h & (kShards - 1)];
    std::lock_guard lock(s.mutex);
    if (s.slots.empty()) s.slots.resize(kSlots);
    if (s.used >= kSlots / 2) {  // bounded memory: start over
      std::fill(s.slots.begin(), s.slots.end(), Slot{});
      s.keys.clear();
      s.ids.clear();
      s.used = 0;
    }
    std::size_t i = (h >> 8) & (kSlots - 1);
    for (;; i = (i + 1) & (kSlots - 1)) {
      const Slot& slot = s.slots[i];
      if (slot.hash == 0) break;
      if (slot.hash == h && slot.key_len == word.size() &&
          std::memcmp(s.keys.data() + slot.key_off, word.data(), word.size()) == 0)
        return;  // another thread got there first
    }
    s.slots[i] = {h, static_cast<std::uint32_t>(s.keys.size()), static_cast<std::uint32_t>(s.ids.size()),
                  static_cast<std::uint16_t>(word.size()), static_cast<std::uint16_t>(n)};
    s.keys.append(word);
    s.ids.insert(s.ids.end(), ids, ids + n);
    ++s.used;
  }

 private:
  static constexpr std::size_t kShards = 64;
  static constexpr std::size_t kSlots = 4096;  // per shard; at most half used
  struct Slot {
    std::uint64_t hash = 0;
    std::uint32_t key_off = 0, ids_off = 0;
    std::uint16_t key_len = 0, ids_len = 0;
  };
  struct alignas(64) Shard {
    std::mutex mutex;
    std::vector<Slot> slots;
    std::string keys;
    std::vector<std::int32_t> ids;
    std::size_t used = 0;
  };
  mutable std::unique_ptr<Shard[]> shards_ = std::make_unique<Shard[]>(kShards);
};

// In front of the shared cache, a small direct-mapped cache per thread, so that the
// common words of a text are found without taking a lock or sharing cache lines between
// threads. Entries carry the id of the tokenizer that made them (ids are never reused), so
// one thread's front cache serves every tokenizer it uses and never returns stale ids.
class FrontCache {
 public:
  static constexpr std::size_t kMaxKey = 22;
  static constexpr std::size_t kMaxIds = 8;

  static bool lookup(std::uint64_t owner, std::string_view word, std::uint64_t h, std::vector<std::int32_t>& out) {
    const Entry* e = table();
    e += (h >> 20) & (kEntries - 1);
    if (e->owner != owner || e->hash != h || e->key_len != word.size() ||
        std::memcmp(e->key, word.data(), word.size()) != 0)
      return false;
    out.insert(out.end(), e->ids, e->ids + e->n_ids);
    return true;
  }
  static void insert(std::uint64_t owner, std::string_view word, std::uint64_t h, const std::int32_t* ids,
                     std::size_t n) {
    if (word.size() > kMaxKey || n > kMaxIds) return;
    Entry* e = table() + ((h >> 20) & (kEntries - 1));
    e->owner = owner;
    e->hash = h;
    e->key_len = static_cast<std::uint8_t>(word.size());
    e->n_ids = static_cast<std::uint8_t>(n);
    std::memcpy(e->key, word.data(), word.size());
    std::memcpy(e->ids, ids, n * sizeof(std::int32_t));
  }

 private:
  static constexpr std::size_t kEntries = 4096;  // ~290 KB per thread
  struct Entry {
    std::uint64_t owner = 0;  // 0: empty
    std::uint64_t hash = 0;
    std::uint8_t key_len = 0, n_ids = 0;
    char key[kMaxKey];
    std::int32_t ids[kMaxIds];
  };
  static Entry* table() {
    thread_local std::unique_ptr<Entry[]> t = std::make_unique<Entry[]>(kEntries);
    return t.get();
  }
};

std::uint64_t next_tokenizer_instance() {
  static std::atomic<std::uint64_t> counter{0};
  return ++counter;
}

// ---- the tokenizer ---------------------------------------------------------------------

struct VocabEntry {
  std::string token;
  std::int32_t id;
};
struct MergeEntry {
  std::string left, right;
  std::string where;  // "merges.txt line 17", for errors
};

class ByteLevelBpe final : public Tokenizer {
 public:
  struct Options {
    std::string kind = "gpt2-bpe";
    std::string source;  // file name for errors
    bool add_prefix_space = false;
    bool ignore_merges = false;
    std::optional<std::string> unk_token;
    // Regex pre-tokenizers applied in order (each splits the pieces of the previous one).
    std::vector<std::pair<std::string, bool>> patterns;  // (pattern, literal)
  };

  ByteLevelBpe(std::vector<VocabEntry> vocab, const std::vector<MergeEntry>& merges, Options opt)
      : kind_(std::move(opt.kind)), add_prefix_space_(opt.add_prefix_space), ignore_merges_(opt.ignore_merges) {
    const ByteMap& bm = byte_map();
    std::int32_t max_id = -1;
    for (const auto& e : vocab) max_id = std::max(max_id, e.id);
    if (max_id >= kMaxVocab)
      fail(ErrorKind::format, "{}: token id {} is beyond what zo2 accepts ({})", opt.source, max_id, kMaxVocab - 1);
    const std::size_t n = static_cast<std::size_t>(max_id + 1);
    id_token_.resize(n);
    id_bytes_.resize(n);
    id_valid_.assign(n, 0);
    token_ids_.reserve(vocab.size());
    for (auto& e : vocab) {
      if (!id_valid_[e.id]) {
        id_valid_[e.id] = 1;
        auto bytes = bm.to_bytes(e.token);
        id_bytes_[e.id] = bytes ? *bytes : e.token;
        if (ignore_merges_ && bytes) bytes_ids_.emplace(*bytes, e.id);
        id_token_[e.id] = e.token;
      }
      token_ids_.emplace(std::move(e.token), e.id);
    }
    for (int b = 0; b < 256; ++b) {
      auto it = token_ids_.find(bm.byte_to_str[b]);
      byte_id_[b] = it == token_ids_.end() ? -1 : it->second;
    }
    if (opt.unk_token) {
      auto it = token_ids_.find(*opt.unk_token);
      if (it == token_ids_.end())
        fail(ErrorKind::format, "{}: model.unk_token \"{}\" is not in the vocabulary", opt.source, *opt.unk_token);
      unk_id_ = it->second;
    }

    merges_.reserve(merges.size());
    std::string joined;
    for (std::size_t r = 0; r < merges.size(); ++r) {
      const MergeEntry& m = merges[r];
      auto a = token_ids_.find(m.left);
      auto b = token_ids_.find(m.right);
      if (a == token_ids_.end() || b == token_ids_.end())
        fail(ErrorKind::format, "{}: {}: token \"{}\" is not in the vocabulary", opt.source, m.where,
             excerpt(a == token_ids_.end() ? m.left : m.right));
      joined.assign(m.left).append(m.right);
      auto c = token_ids_.find(joined);
      if (c == token_ids_.end())
        fail(ErrorKind::format, "{}: {}: merged token \"{}\" is not in the vocabulary", opt.source, m.where,
             excerpt(joined));
      merges_.insert(a->second, b->second, {static_cast<std::uint32_t>(r), c->second});
    }
    for (const auto& [pat, literal] : opt.patterns)
      splitters_.push_back(std::make_unique<Splitter>(pat, literal, opt.source));
  }

  std::vector<std::int32_t> encode(std::string_view text) const override {
    std::vector<std::int32_t> out;
    out.reserve(text.size() / 3 + 4);
    if (!has_added_tokens()) {
      encode_segment(text, out);
      return out;
    }
    for (const Piece& p : split_added(text)) {
      if (p.id >= 0)
        out.push_back(p.id);
      else
        encode_segment(p.text, out);
    }
    return out;
  }

  std::string decode(std::span<const std::int32_t> ids) const override {
    std::string out;
    out.reserve(ids.size() * 4);
    for (std::int32_t id : ids) {
      if (id >= 0 && static_cast<std::size_t>(id) < id_valid_.size() && id_valid_[id]) {
        out += id_bytes_[id];
      } else if (const std::string* s = added_token_content(id)) {
        out += *s;
      } else {
        fail(ErrorKind::invalid_argument, "decode: token id {} is not in the vocabulary (size {})", id, vocab_size());
      }
    }
    return out;
  }

  std::int32_t vocab_size() const override {
    return std::max(static_cast<std::int32_t>(id_valid_.size()), max_added_id() + 1);
  }

  std::optional<std::int32_t> token_to_id(std::string_view token) const override {
    if (auto id = added_token_id(token)) return id;
    auto it = token_ids_.find(token);
    if (it == token_ids_.end()) return std::nullopt;
    return it->second;
  }

  std::string id_to_token(std::int32_t id) const override {
    if (id >= 0 && static_cast<std::size_t>(id) < id_valid_.size() && id_valid_[id]) return id_token_[id];
    if (const std::string* s = added_token_content(id)) return *s;
    return {};
  }

  std::string_view kind() const override { return kind_; }

  void set_add_prefix_space(bool on) override { add_prefix_space_ = on; }

  // For the loaders: registers added tokens and the post-processor's template.
  void add_added_token(AddedToken t) { add_token(std::move(t)); }
  void set_template(std::vector<std::int32_t> prefix, std::vector<std::int32_t> suffix) {
    prefix_ = std::move(prefix);
    suffix_ = std::move(suffix);
    if (prefix_.size() == 1) bos_id_ = prefix_[0];
    if (suffix_.size() == 1) eos_id_ = suffix_[0];
  }
  void set_default_specials(std::optional<std::int32_t> bos, std::optional<std::int32_t> eos) {
    if (bos) bos_id_ = bos;
    if (eos) eos_id_ = eos;
  }

 private:
  void encode_segment(std::string_view seg, std::vector<std::int32_t>& out) const {
    if (seg.empty()) return;
    std::string with_space;
    if (add_prefix_space_ && seg[0] != ' ') {
      with_space.reserve(seg.size() + 1);
      with_space.append(" ").append(seg);
      seg = with_space;
    }
    split_level(seg, 0, out);
  }

  void split_level(std::string_view s, std::size_t level, std::vector<std::int32_t>& out) const {
    if (level == splitters_.size()) {
      bpe_word(s, out);
      return;
    }
    splitters_[level]->split(s, [&](std::string_view piece) { split_level(piece, level + 1, out); });
  }

  std::int32_t byte_token(unsigned char c) const {
    std::int32_t id = byte_id_[c];
    if (id >= 0) return id;
    if (unk_id_) return *unk_id_;
    fail(ErrorKind::invalid_argument, "tokenizer: byte 0x{:02x} of the input has no token in the vocabulary", c);
  }

  void bpe_word(std::string_view word, std::vector<std::int32_t>& out) const {
    if (word.empty()) return;
    if (word.size() == 1) {
      out.push_back(byte_token(static_cast<unsigned char>(word[0])));
      return;
    }
    if (ignore_merges_) {
      auto it = bytes_ids_.find(word);
      if (it != bytes_ids_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    const bool cacheable = word.size() <= WordCache::kMaxWordBytes;
    std::uint64_t h = 0;
    const std::size_t first = out.size();
    if (cacheable) {
      h = word_hash(word);
      if (FrontCache::lookup(instance_, word, h, out)) return;
      if (cache_.lookup(word, h, out)) {
        FrontCache::insert(instance_, word, h, out.data() + first, out.size() - first);
        return;
      }
    }
    if (word.size() <= 256)
      merge_small(word, out);
    else
      merge_large(word, out);
    if (cacheable) {
      cache_.insert(word, h, out.data() + first, out.size() - first);
      FrontCache::insert(instance_, word, h, out.data() + first, out.size() - first);
    }
  }

  // Repeatedly merges the leftmost pair of lowest rank; ranks of the pairs are kept beside
  // the symbols and only the two neighbours of a merge are looked up again.
  void merge_small(std::string_view word, std::vector<std::int32_t>& out) const {
    std::int32_t sym[256];
    std::uint32_t rank[256];
    std::int32_t merged[256];
    std::size_t m = word.size();
    for (std::size_t i = 0; i < m; ++i) sym[i] = byte_token(static_cast<unsigned char>(word[i]));
    auto look = [&](std::size_t i) {
      PairMap::Value v = merges_.find(sym[i], sym[i + 1]);
      rank[i] = v.rank;
      merged[i] = v.merged;
    };
    for (std::size_t i = 0; i + 1 < m; ++i) look(i);
    while (m > 1) {
      std::size_t best = 0;
      std::uint32_t best_rank = rank[0];
      for (std::size_t i = 1; i + 1 < m; ++i)
        if (rank[i] < best_rank) {
          best_rank = rank[i];
          best = i;
        }
      if (best_rank == PairMap::kNone) break;
      sym[best] = merged[best];
      for (std::size_t i = best + 1; i + 1 < m; ++i) sym[i] = sym[i + 1];
      for (std::size_t i = best; i + 2 < m; ++i) {
        rank[i] = rank[i + 1];
        merged[i] = merged[i + 1];
      }
      --m;
      if (best > 0) look(best - 1);
      if (best + 1 < m) look(best);
    }
    out.insert(out.end(), sym, sym + m);
  }

  // The same merge order for long words, in O(n log n): a linked list of symbols and a heap
  // of candidate pairs ordered by (rank, position); stale candidates are skipped.
  void merge_large(std::string_view word, std::vector<std::int32_t>& out) const {
    const std::int32_t n = static_cast<std::int32_t>(word.size());
    struct Node {
      std::int32_t id, prev, next;
    };
    std::vector<Node> nodes(n);
    for (std::int32_t i = 0; i < n; ++i)
      nodes[i] = {byte_token(static_cast<unsigned char>(word[i])), i - 1, i + 1 < n ? i + 1 : -1};
    struct Cand {
      std::uint32_t rank;
      std::int32_t pos, left, right, merged;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](std::int32_t pos) {
      if (pos < 0 || nodes[pos].next < 0) return;
      std::int32_t l = nodes[pos].id, r = nodes[nodes[pos].next].id;
      PairMap::Value v = merges_.find(l, r);
      if (v.rank != PairMap::kNone) heap.push({v.rank, pos, l, r, v.merged});
    };
    for (std::int32_t i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      Node& a = nodes[c.pos];
      if (a.id != c.left || a.next < 0 || nodes[a.next].id != c.right) continue;  // stale
      Node& b = nodes[a.next];
      a.id = c.merged;
      b.id = -1;
      a.next = b.next;
      if (b.next >= 0) nodes[b.next].prev = c.pos;
      push(a.prev);
      push(c.pos);
    }
    for (std::int32_t i = 0; i >= 0; i = nodes[i].next) out.push_back(nodes[i].id);
  }

  std::string kind_;
  bool add_prefix_space_ = false;
  bool ignore_merges_ = false;
  std::vector<std::string> id_token_;  // the vocabulary's own strings
  std::vector<std::string> id_bytes_;  // what decode() writes
  std::vector<std::uint8_t> id_valid_;
  std::unordered_map<std::string, std::int32_t, StringHash, std::equal_to<>> token_ids_;
  std::unordered_map<std::string, std::int32_t, StringHash, std::equal_to<>> bytes_ids_;  // ignore_merges
  std::array<std::int32_t, 256> byte_id_{};
  PairMap merges_;
  std::vector<std::unique_ptr<Splitter>> splitters_;
  WordCache cache_;
  const std::uint64_t instance_ = next_tokenizer_instance();
};

// ---- loaders ---------------------------------------------------------------------------

std::vector<VocabEntry> vocab_from_json(const json& j, const std::string& where) {
  if (!j.is_object()) fail(ErrorKind::format, "{}: expected a JSON object mapping tokens to ids", where);
  std::vector<VocabEntry> out;
  out.reserve(j.size());
  for (const auto& [token, v] : j.items()) {
    if (!v.is_number_integer() || v.get<std::int64_t>() < 0 || v.get<std::int64_t>() > INT32_MAX - 1)
      fail(ErrorKind::format, "{}: field \"{}\": expected a non-negative integer id, got {}", where, excerpt(token),
           excerpt(v.dump()));
    out.push_back({token, static_cast<std::int32_t>(v.get<std::int64_t>())});
  }
  if (out.empty()) fail(ErrorKind::format, "{}: the vocabulary is empty", where);
  return out;
}

// "a b" → (a, b); false unless exactly two non-empty parts.
bool split_merge(std::string_view line, std::string& a, std::string& b) {
  auto sp = line.find(' ');
  if (sp == std::string_view::npos || sp == 0 || sp + 1 >= line.size()) return false;
  if (line.find(' ', sp + 1) != std::string_view::npos) return false;
  a.assign(line.substr(0, sp));
  b.assign(line.substr(sp + 1));
  return true;
}

std::vector<MergeEntry> merges_from_text(const std::string& text, const std::string& where) {
  std::vector<MergeEntry> out;
  std::size_t pos = 0, line_no = 0;
  while (pos < text.size()) {
    std::size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    std::string_view line(text.data() + pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || line.starts_with("#version")) continue;
    MergeEntry m;
    if (!split_merge(line, m.left, m.right))
      fail(ErrorKind::format, "{}: line {}: expected two tokens separated by one space, got \"{}\"", where, line_no,
           excerpt(line));
    m.where = fmt::format("line {}", line_no);
    out.push_back(std::move(m));
  }
  return out;
}

std::vector<MergeEntry> merges_from_json(const json& j, const std::string& where) {
  if (!j.is_array()) fail(ErrorKind::format, "{}: model.merges: expected an array", where);
  std::vector<MergeEntry> out;
  out.reserve(j.size());
  for (std::size_t i = 0; i < j.size(); ++i) {
    const json& e = j[i];
    MergeEntry m;
    bool ok = false;
    if (e.is_string()) {
      ok = split_merge(e.get_ref<const std::string&>(), m.left, m.right);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      m.left = e[0].get<std::string>();
      m.right = e[1].get<std::string>();
      ok = !m.left.empty() && !m.right.empty();
    }
    if (!ok)
      fail(ErrorKind::format, "{}: model.merges[{}]: expected \"a b\" or [\"a\", \"b\"], got {}", where, i,
           excerpt(e.dump()));
    m.where = fmt::format("model.merges[{}]", i);
    out.push_back(std::move(m));
  }
  return out;
}

std::string type_of(const json& j) {
  auto it = j.find("type");
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string("(none)");
}

[[noreturn]] void unsupported(const std::string& where, const std::string& field, const std::string& value,
                              std::string_view why = {}) {
  fail(ErrorKind::unsupported, "{}: {} \"{}\" is not supported{}{}", where, field, value, why.empty() ? "" : ": ",
       why);
}

// HF pre_tokenizer: ByteLevel, Split(Regex|String, Isolated) and Sequence of those.
void parse_pre_tokenizer(const json& pt, const std::string& where, const std::string& field,
                         ByteLevelBpe::Options& opt, bool& byte_level) {
  if (!pt.is_object()) fail(ErrorKind::format, "{}: {}: expected an object", where, field);
  const std::string type = type_of(pt);
  if (type == "Sequence") {
    auto it = pt.find("pretokenizers");
    if (it == pt.end() || !it->is_array())
      fail(ErrorKind::format, "{}: {}.pretokenizers: expected an array", where, field);
    for (std::size_t i = 0; i < it->size(); ++i)
      parse_pre_tokenizer((*it)[i], where, fmt::format("{}.pretokenizers[{}]", field, i), opt, byte_level);
  } else if (type == "ByteLevel") {
    if (byte_level) unsupported(where, field + ".type", type, "a second ByteLevel");
    byte_level = true;
    if (pt.value("add_prefix_space", false)) opt.add_prefix_space = true;
    if (pt.value("use_regex", true)) opt.patterns.emplace_back(kGpt2Pattern, false);
  } else if (type == "Split") {
    if (byte_level) unsupported(where, field + ".type", type, "a Split after ByteLevel");
    auto pat = pt.find("pattern");
    if (pat == pt.end() || !pat->is_object())
      fail(ErrorKind::format, "{}: {}.pattern: expected {{\"Regex\": ...}} or {{\"String\": ...}}", where, field);
    std::string behavior = pt.value("behavior", std::string("Isolated"));
    if (behavior != "Isolated") unsupported(where, field + ".behavior", behavior);
    if (pt.value("invert", false)) unsupported(where, field + ".invert", "true");
    if (auto r = pat->find("Regex"); r != pat->end() && r->is_string())
      opt.patterns.emplace_back(r->get<std::string>(), false);
    else if (auto s = pat->find("String"); s != pat->end() && s->is_string())
      opt.patterns.emplace_back(s->get<std::string>(), true);
    else
      fail(ErrorKind::format, "{}: {}.pattern: expected {{\"Regex\": ...}} or {{\"String\": ...}}", where, field);
  } else {
    unsupported(where, field + ".type", type);
  }
}

// HF post_processor → the ids put before and after a single sequence.
void parse_post_processor(const json& pp, const std::string& where, const std::string& field,
                          const std::function<std::int32_t(const std::string&, const std::string&)>& id_of,
                          std::optional<std::pair<std::vector<std::int32_t>, std::vector<std::int32_t>>>& tmpl) {
  if (!pp.is_object()) fail(ErrorKind::format, "{}: {}: expected an object", where, field);
  const std::string type = type_of(pp);
  if (type == "Sequence") {
    auto it = pp.find("processors");
    if (it == pp.end() || !it->is_array())
      fail(ErrorKind::format, "{}: {}.processors: expected an array", where, field);
    for (std::size_t i = 0; i < it->size(); ++i)
      parse_post_processor((*it)[i], where, fmt::format("{}.processors[{}]", field, i), id_of, tmpl);
  } else if (type == "ByteLevel") {
    // offsets only
  } else if (type == "TemplateProcessing") {
    auto single = pp.find("single");
    if (single == pp.end() || !single->is_array())
      fail(ErrorKind::format, "{}: {}.single: expected an array", where, field);
    std::map<std::string, std::vector<std::int32_t>> specials;
    if (auto st = pp.find("special_tokens"); st != pp.end() && st->is_object()) {
      for (const auto& [name, v] : st->items()) {
        std::vector<std::int32_t> ids;
        if (auto idsit = v.find("ids"); idsit != v.end() && idsit->is_array())
          for (const auto& x : *idsit) {
            if (!x.is_number_integer())
              fail(ErrorKind::format, "{}: {}.special_tokens.{}.ids: expected integers", where, field, name);
            ids.push_back(x.get<std::int32_t>());
          }
        specials[name] = std::move(ids);
      }
    }
    std::vector<std::int32_t> pre, post;
    bool seen_seq = false;
    for (std::size_t i = 0; i < single->size(); ++i) {
      const json& item = (*single)[i];
      if (item.contains("Sequence")) {
        seen_seq = true;
      } else if (auto sp = item.find("SpecialToken"); sp != item.end() && sp->contains("id")) {
        std::string name = (*sp)["id"].get<std::string>();
        std::vector<std::int32_t> ids;
        if (auto f = specials.find(name); f != specials.end())
          ids = f->second;
        else
          ids.push_back(id_of(name, fmt::format("{}.single[{}]", field, i)));
        auto& dst = seen_seq ? post : pre;
        dst.insert(dst.end(), ids.begin(), ids.end());
      } else {
        fail(ErrorKind::format, "{}: {}.single[{}]: expected a Sequence or a SpecialToken, got {}", where, field, i,
             excerpt(item.dump()));
      }
    }
    tmpl.emplace(std::move(pre), std::move(post));
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto tok = [&](const char* k) {
      auto it = pp.find(k);
      if (it == pp.end() || !it->is_array() || it->size() != 2 || !(*it)[0].is_string() ||
          !(*it)[1].is_number_integer())
        fail(ErrorKind::format, "{}: {}.{}: expected [\"token\", id]", where, field, k);
      // The id must be the token's own: an id beyond the vocabulary would reach the embedding.
      const std::string name = (*it)[0].get<std::string>();
      const std::int32_t id = id_of(name, fmt::format("{}.{}", field, k));
      if ((*it)[1] != json(id))
        fail(ErrorKind::format, "{}: {}.{}: token \"{}\" has id {} in the vocabulary, not {}", where, field, k,
             name, id, (*it)[1].dump());
      return id;
    };
    tmpl.emplace(std::vector<std::int32_t>{tok("cls")}, std::vector<std::int32_t>{tok("sep")});
  } else {
    unsupported(where, field + ".type", type);
  }
}

void check_decoder(const json& d, const std::string& where, const std::string& field) {
  if (d.is_null()) return;
  const std::string type = type_of(d);
  if (type == "ByteLevel") return;
  if (type == "Sequence") {
    auto it = d.find("decoders");
    if (it != d.end() && it->is_array())
      for (std::size_t i = 0; i < it->size(); ++i)
        check_decoder((*it)[i], where, fmt::format("{}.decoders[{}]", field, i));
    return;
  }
  unsupported(where, field + ".type", type, "byte-level BPE decodes with ByteLevel");
}

}  // namespace

// ---- public factories ------------------------------------------------------------------

std::unique_ptr<Tokenizer> Tokenizer::from_vocab_merges(const fs::path& vocab, const fs::path& merges) {
  auto entries = vocab_from_json(parse_json_file(vocab), vocab.string());
  auto merge_list = merges_from_text(read_file(merges), merges.string());
  ByteLevelBpe::Options opt;
  opt.kind = "gpt2-bpe";
  opt.source = merges.string();
  opt.patterns.emplace_back(kGpt2Pattern, false);
  auto tok = std::make_unique<ByteLevelBpe>(std::move(entries), merge_list, std::move(opt));
  // HF's GPT-2 tokenizer: <|endoftext|> is BOS, EOS and UNK, and never split.
  if (auto id = tok->token_to_id("<|endoftext|>")) {
    tok->add_added_token({"<|endoftext|>", *id});
    tok->set_default_specials(*id, *id);
  }
  return tok;
}

std::unique_ptr<Tokenizer> Tokenizer::from_tokenizer_json(const fs::path& file) try {
  const std::string where = file.string();
  const json j = parse_json_file(file);
  if (!j.is_object()) fail(ErrorKind::format, "{}: expected a JSON object", where);
  auto model_it = j.find("model");
  if (model_it == j.end() || !model_it->is_object()) fail(ErrorKind::format, "{}: no \"model\" object", where);
  const json& model = *model_it;
  std::string mtype = type_of(model);
  if (mtype == "(none)" && model.contains("merges")) mtype = "BPE";  // old files omit the type
  if (mtype != "BPE") unsupported(where, "model.type", mtype, "only BPE is implemented");
  if (model.value("byte_fallback", false))
    unsupported(where, "model.byte_fallback", "true", "SentencePiece-style BPE; use tokenizer.model");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (auto it = model.find(k); it != model.end() && it->is_string() && !it->get<std::string>().empty())
      unsupported(where, std::string("model.") + k, it->get<std::string>());
  if (auto it = model.find("dropout"); it != model.end() && it->is_number() && it->get<double>() > 0)
    unsupported(where, "model.dropout", it->dump());

  if (auto it = j.find("normalizer"); it != j.end() && !it->is_null()) {
    const std::string nt = type_of(*it);
    bool empty_seq = nt == "Sequence" && it->contains("normalizers") && (*it)["normalizers"].is_array() &&
                     (*it)["normalizers"].empty();
    if (!empty_seq) unsupported(where, "normalizer.type", nt);
  }

  ByteLevelBpe::Options opt;
  opt.kind = "hf-bpe";
  opt.source = where;
  opt.ignore_merges = model.value("ignore_merges", false);
  if (auto it = model.find("unk_token"); it != model.end() && it->is_string()) opt.unk_token = it->get<std::string>();
  bool byte_level = false;
  if (auto it = j.find("pre_tokenizer"); it != j.end() && !it->is_null())
    parse_pre_tokenizer(*it, where, "pre_tokenizer", opt, byte_level);
  if (!byte_level)
    unsupported(where, "pre_tokenizer", j.contains("pre_tokenizer") ? type_of(j["pre_tokenizer"]) : "null",
                "byte-level BPE needs a ByteLevel pre-tokenizer");
  if (auto it = j.find("decoder"); it != j.end()) check_decoder(*it, where, "decoder");

  auto vit = model.find("vocab");
  if (vit == model.end()) fail(ErrorKind::format, "{}: model.vocab is missing", where);
  auto entries = vocab_from_json(*vit, where + ": model.vocab");
  auto mit = model.find("merges");
  auto merge_list = mit == model.end() ? std::vector<MergeEntry>{} : merges_from_json(*mit, where);
  auto tok = std::make_unique<ByteLevelBpe>(std::move(entries), merge_list, opt);

  if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) fail(ErrorKind::format, "{}: added_tokens: expected an array", where);
    for (std::size_t i = 0; i < it->size(); ++i) {
      const json& a = (*it)[i];
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || a["id"].get<std::int64_t>() < 0 ||
          !a.contains("content") || !a["content"].is_string())
        fail(ErrorKind::format, "{}: added_tokens[{}]: expected {{\"id\": integer, \"content\": string, ...}}", where,
             i);
      AddedToken t;
      t.id = a["id"].get<std::int32_t>();
      t.content = a["content"].get<std::string>();
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      t.single_word = a.value("single_word", false);
      t.special = a.value("special", false);
      tok->add_added_token(std::move(t));
    }
  }

  if (auto it = j.find("post_processor"); it != j.end() && !it->is_null()) {
    std::optional<std::pair<std::vector<std::int32_t>, std::vector<std::int32_t>>> tmpl;
    auto id_of = [&](const std::string& name, const std::string& field) {
      auto id = tok->token_to_id(name);
      if (!id) fail(ErrorKind::format, "{}: post_processor: {}: token \"{}\" is not in the vocabulary", where, field, name);
      return *id;
    };
    parse_post_processor(*it, where, "post_processor", id_of, tmpl);
    if (tmpl) tok->set_template(std::move(tmpl->first), std::move(tmpl->second));
  }
  return tok;
} catch (const json::exception& e) {  // a field of the wrong JSON type
  fail(ErrorKind::format, "{}: {}", file.string(), e.what());
}

}  // namespace zo2
