// Tokenizers for the models zo2 fine-tunes (DESIGN.md §2, models/):
//  - GPT-2 byte-level BPE (OPT): vocab.json + merges.txt, or encoder.json + vocab.bpe;
//  - HF tokenizer.json with a BPE model: over bytes (GPT-2/OPT, LLaMA-3, Qwen2/2.5/3: a
//    ByteLevel pre-tokenizer) or over characters with <0xXX> byte fallback (Gemma 3,
//    Mistral, LLaMA-2: Metaspace or Replace/Prepend normalizers); the normalizers NFC, NFD,
//    NFKC, NFKD (ICU), Replace, Prepend, Lowercase, Strip and Sequence; the pre-tokenizers
//    Split (every HF behavior, invert), ByteLevel, Metaspace and Sequence; the decoders
//    ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip and Sequence;
//  - SentencePiece tokenizer.model (LLaMA-2) through libsentencepiece.
//
// Special tokens. BOS/EOS/PAD/UNK come from tokenizer_config.json, then
// special_tokens_map.json (token strings, or {"content": ...} objects), then config.json
// (bos_token_id, ...; a list of ids gives its first). What encode_with_special() adds:
// tokenizer_config.json's add_bos_token/add_eos_token when given; else the tokenizer.json
// post-processor (TemplateProcessing, Roberta/BertProcessing); else the tokenizer's
// default (SentencePiece: BOS, as LLaMA-2; GPT-2 files: nothing). The special tokens of the
// configuration and tokenizer.json's added_tokens are matched whole in the input
// (leftmost-longest) before pre-tokenization, as HF does; where tokenizer.json has a
// normalizer, tokens marked "normalized" are matched in the normalized text instead.
//
// Byte-level details: the pre-tokenizer regexes run on PCRE2 (UTF + UCP, JIT; Unicode 14
// property data), `\s` rewritten to HF's (Oniguruma's Unicode White_Space, without the
// U+180E PCRE2 adds), and their empty matches cut as HF's do. Bytes that are not valid UTF-8
// match no regex branch; they form pieces of their own and are encoded through the byte
// tokens, so decode(encode(s)) == s for any byte string. decode() returns raw bytes (no U+FFFD
// replacement: HF's ByteLevel decoder writes U+FFFD for each ill-formed sequence (Rust's
// from_utf8_lossy), its ByteFallback for every byte of a run of <0xXX> tokens that is not UTF-8, even the ASCII
// ones). Unicode normalization applies to the well-formed UTF-8 of a text and keeps other bytes
// as they are.
//
// tokenizer.json's added_tokens get the ids HF gives them, not the "id" fields: a content in
// the vocabulary (or added before) takes that id, the others the next ids from the
// vocabulary's count of tokens on, in the file's order (zo2 warns where a field differs). An
// added token matched in the normalized text decodes as its normalized form (HF 0.23).
//
// All tokenizers are immutable after loading; encode() and decode() may be called from
// several threads at once (the BPE word cache is a per-thread front cache in front of a
// sharded, mutex-guarded shared one).
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace zo2 {

class Tokenizer {
 public:
  virtual ~Tokenizer();

  // Loads from a model/tokenizer directory: tokenizer.json if present (when it describes a
  // model zo2 does not implement, or is a SentencePiece conversion — BPE with byte_fallback,
  // as LLaMA-2, Mistral and Gemma ship — and tokenizer.model exists, the latter is used), else
  // tokenizer.model, else vocab.json + merges.txt (or encoder.json + vocab.bpe); plus
  // tokenizer_config.json / special_tokens_map.json / config.json for the special tokens.
  // The error lists what was looked for when nothing is found.
  static std::unique_ptr<Tokenizer> from_dir(const std::filesystem::path& dir);
  // GPT-2 byte-level BPE from a token→id JSON map and a merges file ("a b" per line, the
  // first line may be a "#version" comment). No special-token configuration: "<|endoftext|>",
  // when in the vocabulary, is matched whole in the text and is BOS and EOS (as HF's GPT-2
  // tokenizer does), and nothing is added by encode_with_special().
  static std::unique_ptr<Tokenizer> from_vocab_merges(const std::filesystem::path& vocab,
                                                      const std::filesystem::path& merges);
  // A HF tokenizer.json alone (its post-processor decides what encode_with_special adds).
  static std::unique_ptr<Tokenizer> from_tokenizer_json(const std::filesystem::path& file);
  // A SentencePiece model alone (BOS/EOS ids from the model; BOS added, as LLaMA-2 does).
  static std::unique_ptr<Tokenizer> from_sentencepiece(const std::filesystem::path& file);

  // Raw encoding of text (no BOS/EOS added). Added/special tokens written in the text
  // ("<|endoftext|>", "<|begin_of_text|>") are matched whole. Any byte string is accepted.
  virtual std::vector<std::int32_t> encode(std::string_view text) const = 0;
  // encode() plus the special tokens the configuration asks for (BOS/EOS, or the
  // tokenizer.json post-processor's template).
  std::vector<std::int32_t> encode_with_special(std::string_view text) const;
  // The bytes the ids stand for (special tokens included as their text). Ids out of
  // range are an invalid_argument error.
  virtual std::string decode(std::span<const std::int32_t> ids) const = 0;
  // One past the largest id (model vocabulary plus added tokens).
  virtual std::int32_t vocab_size() const = 0;
  // One past the largest id of the vocabulary proper and of the added tokens that are not
  // special: what a model's embedding must hold. Special tokens above it exist beside
  // models that never see them (Gemma 3's <image_soft_token> is id 262144 of a 262144-row
  // text embedding; transformers loads that pairing); the data readers check the ids they
  // actually produce.
  std::int32_t text_vocab_size() const;

  std::optional<std::int32_t> bos_id() const { return bos_id_; }
  std::optional<std::int32_t> eos_id() const { return eos_id_; }
  std::optional<std::int32_t> pad_id() const { return pad_id_; }
  std::optional<std::int32_t> unk_id() const { return unk_id_; }
  // Whether encode_with_special() puts BOS first / EOS last.
  bool add_bos() const;
  bool add_eos() const;
  // What encode_with_special() puts before and after the encoded text.
  const std::vector<std::int32_t>& special_prefix() const { return prefix_; }
  const std::vector<std::int32_t>& special_suffix() const { return suffix_; }

  // The id of a token as the vocabulary writes it (byte-level form for BPE: "Ġthe";
  // "▁the" for SentencePiece), or of an added token ("<|begin_of_text|>").
  virtual std::optional<std::int32_t> token_to_id(std::string_view token) const = 0;
  // The vocabulary's string for an id (byte-level form for BPE); empty if out of range.
  virtual std::string id_to_token(std::int32_t id) const = 0;
  // "gpt2-bpe", "hf-bpe" or "sentencepiece", for logs.
  virtual std::string_view kind() const = 0;

 protected:
  Tokenizer();
  struct SpecialConfig;

  // A token matched whole in the input before anything else sees it (HF "added tokens":
  // special tokens such as "<|begin_of_text|>", "</s>"). lstrip/rstrip: the match takes
  // the whitespace before/after it; single_word: only where it is not inside a word.
  // normalized: matched in the normalized text (only where the tokenizer has a normalizer,
  // see normalize_added_token).
  struct AddedToken {
    std::string content;
    std::int32_t id = -1;
    bool lstrip = false, rstrip = false, single_word = false, special = true, normalized = false;
  };
  // Registers one (a second token with the same content replaces the first).
  void add_token(AddedToken token);
  bool has_added_tokens() const;
  // The added tokens' ids above the model's own (for vocab_size()).
  std::int32_t max_added_id() const;
  // One past the largest id of the vocabulary proper (no added tokens above it).
  virtual std::int32_t base_vocab_size() const = 0;
  std::optional<std::int32_t> added_token_id(std::string_view content) const;
  // The string an added token's id decodes as (HF's simple_id_to_token): its content, or, for
  // a token matched in the normalized text, its normalized form. nullptr if no added token
  // has that id.
  const std::string* added_token_content(std::int32_t id) const;
  // false when no added token has that id (a quick range check before added_token_content).
  bool maybe_added_id(std::int32_t id) const;
  // Splits text at the added tokens, leftmost-longest: pieces of plain text (id < 0) and
  // matched tokens (id >= 0), in order. Empty plain pieces are left out. normalized=false:
  // the tokens matched in the raw text (all of them unless set_split_normalized(true));
  // true: the "normalized" ones, in their normalized form (for the normalized text).
  struct Piece {
    std::string_view text;
    std::int32_t id;
  };
  std::vector<Piece> split_added(std::string_view text, bool normalized = false) const;
  bool has_normalized_added_tokens() const;
  // Called before any token is added by a tokenizer with a normalizer: from then on,
  // tokens with normalized=true are matched by split_added(text, true) only, in the form
  // normalize_added_token gives them.
  void set_split_normalized(bool on) { split_normalized_ = on; }
  virtual void normalize_added_token(std::string& content) const {}
  // Whether this is a SentencePiece model converted to tokenizer.json (from_dir then prefers
  // the directory's tokenizer.model, as before zo2 read those files).
  virtual bool sentencepiece_style() const { return false; }
  // tokenizer_config.json's add_prefix_space (GPT-2 style tokenizers; ignored by others).
  virtual void set_add_prefix_space(bool) {}
  // BOS/EOS/PAD/UNK and what encode_with_special() adds; the loaders set these.
  void apply_special_config(const SpecialConfig& config);

  std::optional<std::int32_t> bos_id_, eos_id_, pad_id_, unk_id_;
  std::vector<std::int32_t> prefix_, suffix_;

 private:
  bool split_normalized_ = false;
  struct AddedTable;
  std::unique_ptr<AddedTable> added_;
};

// What the loaders gather from a directory's JSON files (tokenizer_config.json,
// special_tokens_map.json, config.json). Unset fields keep the tokenizer's own defaults.
struct Tokenizer::SpecialConfig {
  std::optional<std::int32_t> bos_id, eos_id, pad_id, unk_id;
  std::optional<bool> add_bos, add_eos;
};

// Trains a SentencePiece model with libsentencepiece's trainer (the argument string of
// spm_train, e.g. "--input=corpus.txt --model_prefix=dir/tokenizer --vocab_size=200").
// For tests and for preparing toy models.
void train_sentencepiece(std::string_view args);

}  // namespace zo2
