// BPE tokenizers: GPT-2's vocab.json + merges.txt (encoder.json + vocab.bpe), and HF
// tokenizer.json with a BPE model and its pipeline — normalizer (models/tokenizer_text.h),
// pre-tokenizer (Split, ByteLevel, Metaspace), the model over bytes (GPT-2's byte<->unicode
// mapping; GPT-2, OPT, LLaMA-3, Qwen) or over characters with <0xXX> byte fallback
// (SentencePiece conversions: Gemma, Mistral, LLaMA-2), decoder (ByteLevel, Metaspace,
// Replace, ByteFallback, Fuse, Strip), added tokens and post-processor. Merges by rank from a
// hash map keyed by the pair of token ids; a sharded per-word cache.
#include "models/tokenizer.h"
#include "models/tokenizer_text.h"
#include "models/utf8.h"
#include "runtime/error.h"
#include "runtime/json_file.h"
#include "runtime/log.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
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
  if (std::error_code ec; fs::is_directory(p, ec))
    fail(ErrorKind::invalid_argument, "{}: a directory, not a tokenizer file", p.string());
  return read_regular_file(p);  // a FIFO is refused, not waited on (Note [Reading JSON])
}

// Nested past kMaxJsonDepth is refused before zo2's recursive readers of "Sequence"
// normalizers, pre-tokenizers, decoders and post-processors see it (Note [Reading JSON]).
json parse_json_file(const fs::path& p) {
  std::string text = read_file(p);
  try {
    return parse_json_text(text, p.string());
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

// ---- pre-tokenizers ---------------------------------------------------------------------

// HF's SplitDelimiterBehavior.
enum class SplitBehavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

// A regex (or literal) Split: cuts a piece at the pattern's matches and does with them what
// the behavior says (HF's NormalizedString::split); invert: the non-matching parts are the
// delimiters. Empty matches cut too (HF: onig's find_iter, see tok::Regex::for_each_match);
// empty pieces are dropped.
class Splitter {
 public:
  Splitter(std::string_view pattern, bool literal, std::string_view where, SplitBehavior behavior = SplitBehavior::isolated,
           bool invert = false)
      : re_(pattern, literal, where), behavior_(behavior), invert_(invert) {}

  template <class F>
  void split(std::string_view s, F&& emit) const {
    if (behavior_ == SplitBehavior::isolated) {  // the common case: every part is a piece
      std::size_t pos = 0;
      re_.for_each_match(s, [&](std::size_t b, std::size_t e) {
        if (b > pos) emit(s.substr(pos, b - pos));
        if (e > b) emit(s.substr(b, e - b));
        pos = e;
      });
      if (pos < s.size()) emit(s.substr(pos));
      return;
    }
    struct Part {
      std::size_t b, e;
      bool match;
    };
    std::vector<Part> parts;
    std::size_t pos = 0;
    re_.for_each_match(s, [&](std::size_t b, std::size_t e) {
      if (b > pos) parts.push_back({pos, b, invert_});
      parts.push_back({b, e, !invert_});
      pos = e;
    });
    if (pos < s.size()) parts.push_back({pos, s.size(), invert_});
    std::vector<Part> out;
    bool previous_match = false;
    switch (behavior_) {
      case SplitBehavior::removed:
        for (const Part& p : parts)
          if (!p.match) out.push_back(p);
        break;
      case SplitBehavior::contiguous:
        for (const Part& p : parts) {
          if (p.match == previous_match && !out.empty())
            out.back().e = p.e;
          else
            out.push_back(p);
          previous_match = p.match;
        }
        break;
      case SplitBehavior::merged_with_previous:
        for (const Part& p : parts) {
          if (p.match && !previous_match && !out.empty())
            out.back().e = p.e;
          else
            out.push_back(p);
          previous_match = p.match;
        }
        break;
      case SplitBehavior::merged_with_next:
        for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
          if (it->match && !previous_match && !out.empty())
            out.back().b = it->b;
          else
            out.push_back(*it);
          previous_match = it->match;
        }
        std::reverse(out.begin(), out.end());
        break;
      case SplitBehavior::isolated:
        break;
    }
    for (const Part& p : out)
      if (p.e > p.b) emit(s.substr(p.b, p.e - p.b));
  }

 private:
  tok::Regex re_;
  SplitBehavior behavior_;
  bool invert_;
};

// One step of a tokenizer.json pre_tokenizer (a Sequence is its steps in order).
struct PreStep {
  enum class Kind { split, byte_level, metaspace } kind = Kind::split;
  std::unique_ptr<Splitter> splitter;  // split; byte_level with use_regex (the GPT-2 pattern)
  bool add_prefix_space = false;       // byte_level
  // metaspace: spaces become `replacement`, which is put first (always; first: in the first
  // piece of the text; never) unless the piece starts with it; split: cut before each one.
  std::string replacement;
  enum class Prepend { always, first, never } prepend = Prepend::always;
  bool split_on_replacement = true;
};

// ---- decoders ------------------------------------------------------------------------------

struct DecodeStep {
  enum class Kind { byte_level, replace, byte_fallback, fuse, strip, metaspace } kind;
  std::string literal;                 // replace: a String pattern
  std::unique_ptr<tok::Regex> regex;   // replace: a Regex pattern
  std::string content;                 // replace: the replacement; strip: the character
  std::size_t start = 0, stop = 0;     // strip
  std::string replacement;             // metaspace
  bool drop_first = true;              // metaspace: prepend_scheme is not "never"
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

// A BPE model with its tokenizer.json pipeline. byte_level: the vocabulary is written in
// GPT-2's byte alphabet and words are merged from their bytes (a ByteLevel pre-tokenizer);
// otherwise words are merged from their characters, a character missing from the vocabulary
// becoming its <0xXX> byte tokens (byte_fallback) or the unknown token.
class BpeTokenizer final : public Tokenizer {
 public:
  struct Options {
    std::string kind = "gpt2-bpe";
    std::string source;  // file name for errors
    bool byte_level = true;
    bool ignore_merges = false, byte_fallback = false, fuse_unk = false;
    std::optional<std::string> unk_token;
    std::optional<tok::Normalizer> normalizer;
    std::vector<PreStep> pre;  // applied in order, each to the pieces of the previous one
    // The decoder's steps; nullopt: no decoder (HF joins the tokens with spaces; a byte-level
    // model writes their bytes, as zo2 always did).
    std::optional<std::vector<DecodeStep>> decoder;
  };

  BpeTokenizer(std::vector<VocabEntry> vocab, const std::vector<MergeEntry>& merges, Options opt)
      : kind_(std::move(opt.kind)),
        source_(opt.source),
        byte_level_(opt.byte_level),
        ignore_merges_(opt.ignore_merges),
        byte_fallback_(opt.byte_fallback),
        fuse_unk_(opt.fuse_unk),
        normalizer_(std::move(opt.normalizer)),
        pre_(std::move(opt.pre)) {
    if (normalizer_ && normalizer_->empty()) normalizer_.reset();
    if (normalizer_) set_split_normalized(true);
    const ByteMap& bm = byte_map();
    std::int32_t max_id = -1;
    for (const auto& e : vocab) max_id = std::max(max_id, e.id);
    if (max_id >= kMaxVocab)
      fail(ErrorKind::format, "{}: token id {} is beyond what zo2 accepts ({})", opt.source, max_id, kMaxVocab - 1);
    const std::size_t n = static_cast<std::size_t>(max_id + 1);
    id_token_.resize(n);
    if (byte_level_) id_bytes_.resize(n);
    id_valid_.assign(n, 0);
    token_ids_.reserve(vocab.size());
    for (auto& e : vocab) {
      if (!id_valid_[e.id]) {
        id_valid_[e.id] = 1;
        if (byte_level_) {
          auto bytes = bm.to_bytes(e.token);
          id_bytes_[e.id] = bytes ? *bytes : e.token;
          if (ignore_merges_ && bytes) bytes_ids_.emplace(*bytes, e.id);
        }
        id_token_[e.id] = e.token;
      }
      token_ids_.emplace(std::move(e.token), e.id);
    }
    byte_id_.fill(-1);
    fallback_id_.fill(-1);
    ascii_id_.fill(-1);
    for (int b = 0; b < 256; ++b) {
      if (byte_level_) {
        auto it = token_ids_.find(bm.byte_to_str[b]);
        if (it != token_ids_.end()) byte_id_[b] = it->second;
      } else if (b < 0x80) {
        auto it = token_ids_.find(std::string_view(reinterpret_cast<const char*>(&b), 1));
        if (it != token_ids_.end()) ascii_id_[b] = it->second;
      }
      if (byte_fallback_) {
        auto it = token_ids_.find(fmt::format("<0x{:02X}>", b));
        if (it != token_ids_.end()) fallback_id_[b] = it->second;
      }
    }
    if (opt.unk_token) {
      auto it = token_ids_.find(*opt.unk_token);
      if (it == token_ids_.end())
        fail(ErrorKind::format, "{}: model.unk_token \"{}\" is not in the vocabulary", opt.source, *opt.unk_token);
      unk_id_ = it->second;
      model_unk_ = it->second;
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
    // The byte-level fast path of decode: each id's bytes (ByteLevel or no decoder).
    if (!opt.decoder) {
      plain_decode_ = byte_level_;
    } else {
      plain_decode_ = byte_level_ && opt.decoder->size() <= 1 &&
                      (opt.decoder->empty() || opt.decoder->front().kind == DecodeStep::Kind::byte_level);
      decoder_ = std::move(*opt.decoder);
    }
  }

  std::vector<std::int32_t> encode(std::string_view text) const override {
    std::vector<std::int32_t> out;
    out.reserve(text.size() / 3 + 4);
    if (!has_added_tokens()) {
      encode_section(text, true, out);
      return out;
    }
    for (const Piece& p : split_added(text)) {
      if (p.id >= 0)
        out.push_back(p.id);
      else
        encode_section(p.text, p.text.data() == text.data(), out);
    }
    return out;
  }

  // Each id's string, as HF's decode takes it: an added token's (its normalized form where it
  // is matched normalized), else the vocabulary's; the decoder's steps on those (HF's
  // decode_chain), then joined. A byte-level model writes each string's bytes through GPT-2's
  // alphabet (a string with a character outside it, as written), added tokens included.
  std::string decode(std::span<const std::int32_t> ids) const override {
    std::string out;
    if (plain_decode_) {
      out.reserve(ids.size() * 4);
      for (std::int32_t id : ids) {
        if (const std::string* s = maybe_added_id(id) ? added_token_content(id) : nullptr)
          out += byte_level_string(*s);
        else if (valid(id))
          out += id_bytes_[id];
        else
          bad_id(id);
      }
      return out;
    }
    std::vector<std::string> toks;
    toks.reserve(ids.size());
    for (std::int32_t id : ids) toks.push_back(token_string(id));
    if (!decoder_) {  // no decoder: HF joins the tokens with spaces
      for (std::size_t i = 0; i < toks.size(); ++i) out.append(i ? " " : "").append(toks[i]);
      return out;
    }
    for (const DecodeStep& step : *decoder_) decode_step(step, toks);
    for (const auto& t : toks) out += t;
    return out;
  }

  std::int32_t vocab_size() const override {
    return std::max(static_cast<std::int32_t>(id_valid_.size()), max_added_id() + 1);
  }
  std::int32_t base_vocab_size() const override { return static_cast<std::int32_t>(id_valid_.size()); }

  std::optional<std::int32_t> token_to_id(std::string_view token) const override {
    if (auto id = added_token_id(token)) return id;
    auto it = token_ids_.find(token);
    if (it == token_ids_.end()) return std::nullopt;
    return it->second;
  }

  std::string id_to_token(std::int32_t id) const override {
    if (const std::string* s = maybe_added_id(id) ? added_token_content(id) : nullptr) return *s;
    if (valid(id)) return id_token_[id];
    return {};
  }

  std::string_view kind() const override { return kind_; }

  void set_add_prefix_space(bool on) override { add_prefix_space_ = on; }
  void normalize_added_token(std::string& content) const override {
    if (normalizer_) normalizer_->apply(content);
  }
  bool sentencepiece_style() const override { return byte_fallback_ && !byte_level_; }

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
  bool valid(std::int32_t id) const {
    return id >= 0 && static_cast<std::size_t>(id) < id_valid_.size() && id_valid_[id];
  }
  // HF's string for an id (id_to_token); an id out of range is an error.
  std::string token_string(std::int32_t id) const {
    if (const std::string* s = maybe_added_id(id) ? added_token_content(id) : nullptr) return *s;
    if (!valid(id)) bad_id(id);
    return id_token_[id];
  }
  // HF's ByteLevel decoder on one string: its characters' bytes in GPT-2's alphabet, or the
  // string as it is when a character is outside that alphabet.
  static std::string byte_level_string(const std::string& s) {
    auto bytes = byte_map().to_bytes(s);
    return bytes ? std::move(*bytes) : s;
  }
  [[noreturn]] void bad_id(std::int32_t id) const {
    fail(ErrorKind::invalid_argument, "decode: token id {} is not in the vocabulary (size {})", id, vocab_size());
  }

  // A piece of text between added tokens: normalized, split at the normalized added tokens,
  // pre-tokenized, merged. at_start: the piece begins the text (Metaspace's "first").
  void encode_section(std::string_view seg, bool at_start, std::vector<std::int32_t>& out) const {
    if (seg.empty()) return;
    std::string normalized;
    if (normalizer_) {
      normalized.assign(seg);
      normalizer_->apply(normalized);
      seg = normalized;
      if (seg.empty()) return;
      if (has_normalized_added_tokens()) {
        for (const Piece& p : split_added(seg, true)) {
          if (p.id >= 0)
            out.push_back(p.id);
          else
            split_level(p.text, 0, at_start && p.text.data() == seg.data(), out);
        }
        return;
      }
    }
    std::string with_space;  // tokenizer_config.json's add_prefix_space (vocab + merges files)
    if (add_prefix_space_ && seg[0] != ' ') {
      with_space.reserve(seg.size() + 1);
      with_space.append(" ").append(seg);
      seg = with_space;
    }
    split_level(seg, 0, at_start, out);
  }

  void split_level(std::string_view s, std::size_t level, bool at_start, std::vector<std::int32_t>& out) const {
    if (s.empty()) return;
    if (level == pre_.size()) {
      bpe_word(s, out);
      return;
    }
    const PreStep& step = pre_[level];
    const bool last = level + 1 == pre_.size();
    auto next = [&](std::string_view whole) {
      return [&, whole](std::string_view piece) {
        if (last)
          bpe_word(piece, out);
        else
          split_level(piece, level + 1, at_start && piece.data() == whole.data(), out);
      };
    };
    switch (step.kind) {
      case PreStep::Kind::split:
        step.splitter->split(s, next(s));
        return;
      case PreStep::Kind::byte_level: {
        std::string buf;
        if (step.add_prefix_space && s[0] != ' ') {
          buf.reserve(s.size() + 1);
          buf.append(" ").append(s);
          s = buf;
        }
        if (step.splitter)
          step.splitter->split(s, next(s));
        else
          split_level(s, level + 1, at_start, out);
        return;
      }
      case PreStep::Kind::metaspace: {
        const std::string& rep = step.replacement;
        std::string buf;
        // The replacement goes first unless the piece, spaces replaced, starts with it.
        const bool prepend = (step.prepend == PreStep::Prepend::always ||
                              (step.prepend == PreStep::Prepend::first && at_start)) &&
                             s[0] != ' ' && !s.starts_with(rep);
        buf.reserve(s.size() + rep.size() * 4);
        if (prepend) buf += rep;
        for (char c : s) {
          if (c == ' ')
            buf += rep;
          else
            buf += c;
        }
        std::string_view t = buf;
        if (!step.split_on_replacement) {
          split_level(t, level + 1, at_start, out);
          return;
        }
        std::size_t begin = 0;  // cut before each replacement (HF: MergedWithNext)
        for (std::size_t p = t.find(rep, 1); p != std::string_view::npos; p = t.find(rep, p + rep.size())) {
          split_level(t.substr(begin, p - begin), level + 1, at_start && begin == 0, out);
          begin = p;
        }
        split_level(t.substr(begin), level + 1, at_start && begin == 0, out);
        return;
      }
    }
  }

  std::int32_t byte_token(unsigned char c) const {
    std::int32_t id = byte_id_[c];
    if (id >= 0) return id;
    if (unk_id_) return *unk_id_;
    fail(ErrorKind::invalid_argument,
         "tokenizer {}: byte 0x{:02x} of the input has no token in the vocabulary (a byte-level vocabulary holds "
         "all 256 bytes)",
         source_, c);
  }

  // The initial symbols of a word: its bytes (byte-level) or its characters (each one's
  // token, else its <0xXX> tokens, else the unknown token, fused with a preceding unknown
  // when fuse_unk). A byte that is not UTF-8 is a character of its own. Returns the count;
  // sym has room for word.size().
  std::size_t initial_symbols(std::string_view word, std::int32_t* sym) const {
    std::size_t m = 0;
    if (byte_level_) {
      for (unsigned char c : word) sym[m++] = byte_token(c);
      return m;
    }
    bool last_unk = false;
    for (std::size_t i = 0; i < word.size();) {
      const unsigned char c = static_cast<unsigned char>(word[i]);
      std::size_t n = c < 0x80 ? 1 : tok::utf8_len(word, i);
      if (n == 0) n = 1;
      std::int32_t id = -1;
      if (c < 0x80) {
        id = ascii_id_[c];
      } else {
        auto it = token_ids_.find(word.substr(i, n));
        if (it != token_ids_.end()) id = it->second;
      }
      if (id >= 0) {
        sym[m++] = id;
        last_unk = false;
      } else if (byte_fallback_ && std::all_of(word.begin() + i, word.begin() + i + n, [&](char b) {
                   return fallback_id_[static_cast<unsigned char>(b)] >= 0;
                 })) {
        for (std::size_t k = i; k < i + n; ++k) sym[m++] = fallback_id_[static_cast<unsigned char>(word[k])];
        last_unk = false;
      } else if (model_unk_) {
        if (!(fuse_unk_ && last_unk)) sym[m++] = *model_unk_;
        last_unk = true;
      } else {
        fail(ErrorKind::invalid_argument,
             "tokenizer: the character \"{}\" of the input has no token in the vocabulary (and no byte "
             "fallback or unk_token)",
             word.substr(i, n));
      }
      i += n;
    }
    return m;
  }

  void bpe_word(std::string_view word, std::vector<std::int32_t>& out) const {
    if (byte_level_ && word.size() == 1) {
      out.push_back(byte_token(static_cast<unsigned char>(word[0])));
      return;
    }
    if (ignore_merges_) {
      if (byte_level_) {
        auto it = bytes_ids_.find(word);
        if (it != bytes_ids_.end()) {
          out.push_back(it->second);
          return;
        }
      } else if (auto it = token_ids_.find(word); it != token_ids_.end()) {
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
    if (word.size() <= 256) {
      std::int32_t sym[256];
      merge_small(sym, initial_symbols(word, sym), out);
    } else {
      std::vector<std::int32_t> sym(word.size());
      sym.resize(initial_symbols(word, sym.data()));
      merge_large(sym, out);
    }
    if (cacheable) {
      cache_.insert(word, h, out.data() + first, out.size() - first);
      FrontCache::insert(instance_, word, h, out.data() + first, out.size() - first);
    }
  }

  // Repeatedly merges the leftmost pair of lowest rank; ranks of the pairs are kept beside
  // the symbols and only the two neighbours of a merge are looked up again.
  void merge_small(std::int32_t* sym, std::size_t m, std::vector<std::int32_t>& out) const {
    std::uint32_t rank[256];
    std::int32_t merged[256];
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
  void merge_large(const std::vector<std::int32_t>& sym, std::vector<std::int32_t>& out) const {
    const std::int32_t n = static_cast<std::int32_t>(sym.size());
    if (n == 0) return;
    struct Node {
      std::int32_t id, prev, next;
    };
    std::vector<Node> nodes(n);
    for (std::int32_t i = 0; i < n; ++i) nodes[i] = {sym[i], i - 1, i + 1 < n ? i + 1 : -1};
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

  // One decoder step over the tokens (HF's decode_chain of that decoder).
  void decode_step(const DecodeStep& step, std::vector<std::string>& toks) const {
    auto fuse = [&](std::vector<std::string> parts) {
      std::string all;
      for (auto& p : parts) all += p;
      toks.assign(1, std::move(all));
    };
    switch (step.kind) {
      case DecodeStep::Kind::byte_level: {
        std::string all;
        for (const std::string& t : toks) all += byte_level_string(t);
        toks.assign(1, std::move(all));
        return;
      }
      case DecodeStep::Kind::replace:
        for (auto& t : toks) {
          std::string r;
          std::size_t pos = 0;
          bool matched = false;
          if (step.regex) {
            step.regex->for_each_match(t, [&](std::size_t b, std::size_t e) {
              r.append(t, pos, b - pos).append(step.content);
              pos = e;
              matched = true;
            });
          } else {
            for (std::size_t b; (b = t.find(step.literal, pos)) != std::string::npos; pos = b + step.literal.size()) {
              r.append(t, pos, b - pos).append(step.content);
              matched = true;
            }
          }
          if (!matched) continue;
          r.append(t, pos, std::string::npos);
          t.swap(r);
        }
        return;
      case DecodeStep::Kind::byte_fallback: {
        std::vector<std::string> res;
        std::string run;
        bool in_run = false;
        // HF: a run that is UTF-8 is one token, otherwise a U+FFFD token per byte; zo2 keeps
        // the raw bytes as one token (decode returns bytes, see tokenizer.h).
        auto flush = [&] {
          if (!in_run) return;
          res.push_back(std::move(run));
          run.clear();
          in_run = false;
        };
        for (std::size_t i = 0; i < toks.size(); ++i) {
          const std::string& t = toks[i];
          int byte = -1;
          if (t.size() == 6 && t.starts_with("<0x") && t.back() == '>' && std::isxdigit(static_cast<unsigned char>(t[3])) &&
              std::isxdigit(static_cast<unsigned char>(t[4])))
            byte = std::stoi(t.substr(3, 2), nullptr, 16);
          if (byte >= 0) {
            run += static_cast<char>(byte);
            in_run = true;
          } else {
            flush();
            res.push_back(t);
          }
        }
        flush();
        toks.swap(res);
        return;
      }
      case DecodeStep::Kind::fuse:
        fuse(std::move(toks));
        return;
      case DecodeStep::Kind::strip:
        for (auto& t : toks) {
          const std::string& c = step.content;
          std::size_t b = 0, e = t.size();
          for (std::size_t k = 0; k < step.start && t.compare(b, c.size(), c) == 0; ++k) b += c.size();
          for (std::size_t k = 0; k < step.stop && e >= b + c.size() && t.compare(e - c.size(), c.size(), c) == 0; ++k)
            e -= c.size();
          t = t.substr(b, e - b);
        }
        return;
      case DecodeStep::Kind::metaspace:
        for (std::size_t i = 0; i < toks.size(); ++i) {
          std::string& t = toks[i];
          const std::string& rep = step.replacement;
          std::string r;
          std::size_t pos = 0;
          for (std::size_t b; (b = t.find(rep, pos)) != std::string::npos; pos = b + rep.size()) {
            r.append(t, pos, b - pos);
            if (!(i == 0 && step.drop_first)) r += ' ';  // HF: the first token loses them
          }
          r.append(t, pos, std::string::npos);
          t.swap(r);
        }
        return;
    }
  }

  std::string kind_;
  std::string source_;  // the file, for errors
  bool byte_level_ = true;
  bool add_prefix_space_ = false;
  bool ignore_merges_ = false, byte_fallback_ = false, fuse_unk_ = false;
  bool plain_decode_ = true;
  std::optional<tok::Normalizer> normalizer_;
  std::vector<PreStep> pre_;
  std::optional<std::vector<DecodeStep>> decoder_;
  std::optional<std::int32_t> model_unk_;
  std::vector<std::string> id_token_;  // the vocabulary's own strings
  std::vector<std::string> id_bytes_;  // byte-level: what decode() writes
  std::vector<std::uint8_t> id_valid_;
  std::unordered_map<std::string, std::int32_t, StringHash, std::equal_to<>> token_ids_;
  std::unordered_map<std::string, std::int32_t, StringHash, std::equal_to<>> bytes_ids_;  // ignore_merges
  std::array<std::int32_t, 256> byte_id_{};      // byte-level: each byte's token
  std::array<std::int32_t, 256> fallback_id_{};  // byte_fallback: <0xXX>
  std::array<std::int32_t, 128> ascii_id_{};     // characters: the ASCII ones' tokens
  PairMap merges_;
  WordCache cache_;
  const std::uint64_t instance_ = next_tokenizer_instance();
};

// ---- loaders ---------------------------------------------------------------------------

std::vector<VocabEntry> vocab_from_json(const json& j, const std::string& where) {
  if (!j.is_object()) fail(ErrorKind::format, "{}: expected a JSON object mapping tokens to ids", where);
  std::vector<VocabEntry> out;
  out.reserve(j.size());
  for (const auto& [token, v] : j.items()) {
    if (!v.is_number_integer() || v.get<std::int64_t>() < 0)
      fail(ErrorKind::format, "{}: field \"{}\": expected a non-negative integer id, got {}", where, excerpt(token),
           excerpt(v.dump()));
    if (v.get<std::int64_t>() >= kMaxVocab)
      fail(ErrorKind::format, "{}: field \"{}\": id {} is out of range (zo2 accepts ids up to {})", where,
           excerpt(token), excerpt(v.dump()), kMaxVocab - 1);
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

// A "type" field: its string, the JSON of a value that is no string (refused by the callers as
// an unsupported type), or "(none)".
std::string type_of(const json& j) {
  auto it = j.find("type");
  if (it == j.end() || it->is_null()) return "(none)";
  return it->is_string() ? it->get<std::string>() : it->dump();
}

[[noreturn]] void unsupported(const std::string& where, const std::string& field, const std::string& value,
                              std::string_view why = {}) {
  fail(ErrorKind::unsupported, "{}: {} \"{}\" is not supported{}{}", where, field, value, why.empty() ? "" : ": ",
       why);
}

std::string string_field(const json& j, const char* key, const std::string& where, const std::string& field) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string()) fail(ErrorKind::format, "{}: {}.{}: expected a string", where, field, key);
  return it->get<std::string>();
}

bool bool_field(const json& j, const char* key, bool dflt, const std::string& where, const std::string& field) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) fail(ErrorKind::format, "{}: {}.{}: expected true or false", where, field, key);
  return it->get<bool>();
}

// A "pattern" object: {"String": "..."} (literal) or {"Regex": "..."}.
std::pair<std::string, bool> pattern_field(const json& j, const std::string& where, const std::string& field) {
  auto pat = j.find("pattern");
  if (pat != j.end() && pat->is_object()) {
    if (auto r = pat->find("Regex"); r != pat->end() && r->is_string()) return {r->get<std::string>(), false};
    if (auto s = pat->find("String"); s != pat->end() && s->is_string()) return {s->get<std::string>(), true};
  }
  fail(ErrorKind::format, "{}: {}.pattern: expected {{\"Regex\": ...}} or {{\"String\": ...}}", where, field);
}

// One Unicode character (Metaspace's replacement, Strip's content).
std::string char_field(const json& j, const char* key, const std::string& where, const std::string& field) {
  std::string s = string_field(j, key, where, field);
  if (s.empty() || tok::utf8_len(s, 0) != s.size())
    fail(ErrorKind::format, "{}: {}.{}: expected one character, got \"{}\"", where, field, key, excerpt(s));
  return s;
}

// HF pre_tokenizer: Split, ByteLevel, Metaspace and Sequence of those. ByteLevel turns the
// model byte-level: nothing may follow it (the text is then GPT-2's byte alphabet, which zo2
// keeps implicit), and it does not mix with Metaspace.
void parse_pre_tokenizer(const json& pt, const std::string& where, const std::string& field,
                         std::vector<PreStep>& steps, bool& byte_level, bool& metaspace) {
  if (!pt.is_object()) fail(ErrorKind::format, "{}: {}: expected an object", where, field);
  const std::string type = type_of(pt);
  if (type != "Sequence" && byte_level)
    unsupported(where, field + ".type", type, "a pre-tokenizer after ByteLevel");
  if (type == "Sequence") {
    auto it = pt.find("pretokenizers");
    if (it == pt.end() || !it->is_array())
      fail(ErrorKind::format, "{}: {}.pretokenizers: expected an array", where, field);
    for (std::size_t i = 0; i < it->size(); ++i)
      parse_pre_tokenizer((*it)[i], where, fmt::format("{}.pretokenizers[{}]", field, i), steps, byte_level, metaspace);
  } else if (type == "ByteLevel") {
    if (metaspace) unsupported(where, field + ".type", type, "ByteLevel with Metaspace");
    byte_level = true;
    PreStep st;
    st.kind = PreStep::Kind::byte_level;
    st.add_prefix_space = bool_field(pt, "add_prefix_space", false, where, field);
    if (bool_field(pt, "use_regex", true, where, field))
      st.splitter = std::make_unique<Splitter>(kGpt2Pattern, false, where);
    steps.push_back(std::move(st));
  } else if (type == "Split") {
    auto [pattern, literal] = pattern_field(pt, where, field);
    const std::string behavior = pt.contains("behavior") ? string_field(pt, "behavior", where, field) : "Isolated";
    static const std::map<std::string, SplitBehavior> kBehaviors = {
        {"Removed", SplitBehavior::removed},
        {"Isolated", SplitBehavior::isolated},
        {"MergedWithPrevious", SplitBehavior::merged_with_previous},
        {"MergedWithNext", SplitBehavior::merged_with_next},
        {"Contiguous", SplitBehavior::contiguous}};
    auto b = kBehaviors.find(behavior);
    if (b == kBehaviors.end()) unsupported(where, field + ".behavior", behavior);
    PreStep st;
    st.kind = PreStep::Kind::split;
    st.splitter = std::make_unique<Splitter>(pattern, literal, where + ": " + field, b->second,
                                             bool_field(pt, "invert", false, where, field));
    steps.push_back(std::move(st));
  } else if (type == "Metaspace") {
    metaspace = true;
    PreStep st;
    st.kind = PreStep::Kind::metaspace;
    st.replacement = char_field(pt, "replacement", where, field);
    const std::string scheme = pt.contains("prepend_scheme") ? string_field(pt, "prepend_scheme", where, field) : "always";
    if (scheme == "always")
      st.prepend = PreStep::Prepend::always;
    else if (scheme == "first")
      st.prepend = PreStep::Prepend::first;
    else if (scheme == "never")
      st.prepend = PreStep::Prepend::never;
    else
      fail(ErrorKind::format, "{}: {}.prepend_scheme: expected \"always\", \"first\" or \"never\", got \"{}\"", where,
           field, excerpt(scheme));
    // Files older than prepend_scheme say add_prefix_space (HF: false means never).
    if (!bool_field(pt, "add_prefix_space", true, where, field)) {
      if (pt.contains("prepend_scheme") && st.prepend != PreStep::Prepend::never)
        fail(ErrorKind::format, "{}: {}: add_prefix_space false contradicts prepend_scheme \"{}\"", where, field,
             scheme);
      st.prepend = PreStep::Prepend::never;
    }
    st.split_on_replacement = bool_field(pt, "split", true, where, field);
    steps.push_back(std::move(st));
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
        std::vector<std::string> names;  // "tokens": the text of each id
        if (auto tk = v.find("tokens"); tk != v.end() && tk->is_array())
          for (const auto& x : *tk) names.push_back(x.is_string() ? x.get<std::string>() : std::string());
        if (auto idsit = v.find("ids"); idsit != v.end() && idsit->is_array())
          for (std::size_t k = 0; k < idsit->size(); ++k) {
            const json& x = (*idsit)[k];
            if (!x.is_number_integer())
              fail(ErrorKind::format, "{}: {}.special_tokens.{}.ids: expected integers", where, field, name);
            // The id must be its token's (as Roberta's below): an id beyond the vocabulary
            // would reach the embedding.
            const std::string text = k < names.size() && !names[k].empty() ? names[k] : name;
            const std::int32_t id = id_of(text, fmt::format("{}.special_tokens.{}", field, name));
            if (x != json(id))
              fail(ErrorKind::format, "{}: {}.special_tokens.{}.ids[{}]: token \"{}\" has id {} in the vocabulary, not {}",
                   where, field, name, k, text, id, x.dump());
            ids.push_back(id);
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

// HF decoder: ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip and Sequence of those.
void parse_decoder(const json& d, const std::string& where, const std::string& field, std::vector<DecodeStep>& steps) {
  if (!d.is_object()) fail(ErrorKind::format, "{}: {}: expected an object", where, field);
  const std::string type = type_of(d);
  DecodeStep st{};
  if (type == "Sequence") {
    auto it = d.find("decoders");
    if (it == d.end() || !it->is_array()) fail(ErrorKind::format, "{}: {}.decoders: expected an array", where, field);
    for (std::size_t i = 0; i < it->size(); ++i)
      parse_decoder((*it)[i], where, fmt::format("{}.decoders[{}]", field, i), steps);
    return;
  } else if (type == "ByteLevel") {
    st.kind = DecodeStep::Kind::byte_level;
  } else if (type == "ByteFallback") {
    st.kind = DecodeStep::Kind::byte_fallback;
  } else if (type == "Fuse") {
    st.kind = DecodeStep::Kind::fuse;
  } else if (type == "Replace") {
    st.kind = DecodeStep::Kind::replace;
    auto [pattern, literal] = pattern_field(d, where, field);
    if (literal && !pattern.empty())
      st.literal = pattern;
    else  // (HF: an empty String matches the empty string at each character boundary)
      st.regex = std::make_unique<tok::Regex>(pattern, literal, where + ": " + field + ".pattern");
    st.content = string_field(d, "content", where, field);
  } else if (type == "Strip") {
    st.kind = DecodeStep::Kind::strip;
    st.content = char_field(d, "content", where, field);
    for (auto [key, out] : {std::pair{"start", &st.start}, std::pair{"stop", &st.stop}}) {
      auto it = d.find(key);
      if (it == d.end() || !it->is_number_unsigned() || it->get<std::uint64_t>() > (1u << 20))
        fail(ErrorKind::format, "{}: {}.{}: expected a non-negative integer", where, field, key);
      *out = it->get<std::size_t>();
    }
  } else if (type == "Metaspace") {
    st.kind = DecodeStep::Kind::metaspace;
    st.replacement = char_field(d, "replacement", where, field);
    std::string scheme = d.contains("prepend_scheme") ? string_field(d, "prepend_scheme", where, field) : "always";
    st.drop_first = scheme != "never" && bool_field(d, "add_prefix_space", true, where, field);
  } else {
    unsupported(where, field + ".type", type);
  }
  steps.push_back(std::move(st));
}

}  // namespace

// ---- public factories ------------------------------------------------------------------

std::unique_ptr<Tokenizer> Tokenizer::from_vocab_merges(const fs::path& vocab, const fs::path& merges) {
  auto entries = vocab_from_json(parse_json_file(vocab), vocab.string());
  auto merge_list = merges_from_text(read_file(merges), merges.string());
  BpeTokenizer::Options opt;
  opt.kind = "gpt2-bpe";
  opt.source = merges.string();
  PreStep st;
  st.kind = PreStep::Kind::byte_level;
  st.splitter = std::make_unique<Splitter>(kGpt2Pattern, false, opt.source);
  opt.pre.push_back(std::move(st));
  auto tok = std::make_unique<BpeTokenizer>(std::move(entries), merge_list, std::move(opt));
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
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (auto it = model.find(k); it != model.end() && it->is_string() && !it->get<std::string>().empty())
      unsupported(where, std::string("model.") + k, it->get<std::string>());
  if (auto it = model.find("dropout"); it != model.end() && it->is_number() && it->get<double>() > 0)
    unsupported(where, "model.dropout", it->dump());

  BpeTokenizer::Options opt;
  opt.kind = "hf-bpe";
  opt.source = where;
  opt.ignore_merges = bool_field(model, "ignore_merges", false, where, "model");
  opt.byte_fallback = bool_field(model, "byte_fallback", false, where, "model");
  opt.fuse_unk = bool_field(model, "fuse_unk", false, where, "model");
  if (auto it = model.find("unk_token"); it != model.end() && it->is_string()) opt.unk_token = it->get<std::string>();
  if (auto it = j.find("normalizer"); it != j.end() && !it->is_null()) opt.normalizer.emplace(*it, where, "normalizer");
  bool byte_level = false, metaspace = false;
  if (auto it = j.find("pre_tokenizer"); it != j.end() && !it->is_null())
    parse_pre_tokenizer(*it, where, "pre_tokenizer", opt.pre, byte_level, metaspace);
  opt.byte_level = byte_level;
  if (auto it = j.find("decoder"); it != j.end() && !it->is_null()) {
    opt.decoder.emplace();
    parse_decoder(*it, where, "decoder", *opt.decoder);
  }

  auto vit = model.find("vocab");
  if (vit == model.end()) fail(ErrorKind::format, "{}: model.vocab is missing", where);
  auto entries = vocab_from_json(*vit, where + ": model.vocab");
  const auto model_size = static_cast<std::int64_t>(entries.size());  // HF's BPE get_vocab_size()
  auto mit = model.find("merges");
  auto merge_list = mit == model.end() ? std::vector<MergeEntry>{} : merges_from_json(*mit, where);
  auto tok = std::make_unique<BpeTokenizer>(std::move(entries), merge_list, std::move(opt));

  // Added tokens get their ids as HF's AddedVocabulary::add_tokens gives them, in the file's
  // order (HF's deserializer ignores the "id" fields but for a warning): an empty content is
  // skipped; a content already added, or in the vocabulary, takes that id; any other token the
  // next id from the vocabulary's size (its count of tokens) on. Where that is not the file's
  // id, zo2 warns.
  if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) fail(ErrorKind::format, "{}: added_tokens: expected an array", where);
    std::int64_t next_id = model_size;
    for (std::size_t i = 0; i < it->size(); ++i) {
      const json& a = (*it)[i];
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || a["id"].get<std::int64_t>() < 0 ||
          a["id"].get<std::int64_t>() > std::numeric_limits<std::uint32_t>::max() || !a.contains("content") ||
          !a["content"].is_string())
        fail(ErrorKind::format,
             "{}: added_tokens[{}]: expected {{\"id\": integer from 0 to 4294967295, \"content\": string, ...}}",
             where, i);
      AddedToken t;
      t.content = a["content"].get<std::string>();
      if (t.content.empty()) continue;
      const std::int64_t file_id = a["id"].get<std::int64_t>();
      if (auto known = tok->token_to_id(t.content)) {
        t.id = *known;
      } else {
        if (next_id >= kMaxVocab)
          fail(ErrorKind::format, "{}: added_tokens[{}] \"{}\": id {} is beyond what zo2 accepts ({})", where, i,
               excerpt(t.content), next_id, kMaxVocab - 1);
        t.id = static_cast<std::int32_t>(next_id++);
      }
      if (t.id != file_id)
        log_warn("tokenizer: {}: added_tokens[{}] \"{}\" has id {} in the file; it gets id {}, as HF assigns it", where,
                 i, excerpt(t.content), file_id, t.id);
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      t.single_word = a.value("single_word", false);
      t.special = a.value("special", false);
      t.normalized = a.value("normalized", !t.special);
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
