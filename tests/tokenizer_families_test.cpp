// The tokenizer.json of today's model families — Qwen3 (Qwen2/2.5's format), LLaMA-3, Gemma 3,
// Mistral — against @lenml/tokenizers (a port of transformers.js): the real files of
// tests/data/tokenizers (unpacked into the build tree by tests/CMakeLists.txt) and the ids and
// decodings its make_reference.js recorded in reference.json. Then each pipeline feature on
// small hand-made files: normalizers, Split behaviors, Metaspace, byte fallback, decoders,
// normalized added tokens, and the errors that name the field.
#include "models/tokenizer.h"
#include "models/tokenizer_text.h"
#include "runtime/error.h"
#include "tests/test_util.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <sstream>

namespace zo2 {
namespace {

using test::read_file;
using test::write_file;

namespace fs = std::filesystem;
using json = nlohmann::json;
using Ids = std::vector<std::int32_t>;

std::string message_of(const std::function<void()>& f, ErrorKind* kind = nullptr) {
  try {
    f();
  } catch (const Error& e) {
    if (kind) *kind = e.kind();
    return e.what();
  }
  ADD_FAILURE() << "expected a zo2::Error";
  return {};
}

// ---- the real files --------------------------------------------------------------------------

fs::path family_dir(const std::string& dir) { return fs::path(ZO2_TEST_TOKENIZERS_DIR) / dir; }

const json& reference() {
  static const json j = json::parse(read_file(fs::path(ZO2_TEST_TOKENIZER_DATA) / "reference.json"));
  return j;
}

// Mistral's vocabulary in the newer layout (Mistral v0.3): no normalizer, Metaspace with
// prepend_scheme "first" and split false, written as HF writes it (no add_prefix_space).
fs::path mistral_metaspace_dir() {
  static const test::TempDir dir;
  static std::once_flag once;
  std::call_once(once, [] {
    json j = json::parse(read_file(family_dir("mistral") / "tokenizer.json"));
    j["normalizer"] = nullptr;
    j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "\u2581"}, {"prepend_scheme", "first"}, {"split", false}};
    write_file(dir / "tokenizer.json", j.dump());
  });
  return dir.path();
}

fs::path tokenizer_json_of(const std::string& family) {
  const json& f = reference()["families"][family];
  if (f.value("variant", "") == "metaspace") return mistral_metaspace_dir() / "tokenizer.json";
  return family_dir(f["dir"].get<std::string>()) / "tokenizer.json";
}

// One load per family and process (Gemma's tokenizer.json is 33 MB).
const Tokenizer& family_tokenizer(const std::string& family) {
  static std::mutex m;
  static std::map<std::string, std::unique_ptr<Tokenizer>> loaded;
  std::lock_guard lock(m);
  auto& tok = loaded[family];
  if (!tok) tok = Tokenizer::from_tokenizer_json(tokenizer_json_of(family));
  return *tok;
}

// A test string for a message: JSON-escaped, bytes that are no UTF-8 as \xNN.
std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s)
    out += c >= 0x80 ? fmt::format("\\x{:02x}", c) : std::string(1, static_cast<char>(c));
  return json(out).dump();
}

class TokenizerFamilies : public ::testing::TestWithParam<std::string> {
 protected:
  const json& cases() const { return reference()["families"][GetParam()]["cases"]; }
  const Tokenizer& tok() const { return family_tokenizer(GetParam()); }
};

TEST_P(TokenizerFamilies, EncodesEveryReferenceStringToTheReferenceIds) {
  ASSERT_GE(cases().size(), 50u);
  for (const json& c : cases()) {
    const std::string text = c["text"].get<std::string>();
    EXPECT_EQ(tok().encode(text), c["ids"].get<Ids>()) << GetParam() << ": " << printable(text);
  }
}

TEST_P(TokenizerFamilies, AddsTheSpecialTokensOfItsPostProcessor) {
  for (const json& c : cases()) {
    const std::string text = c["text"].get<std::string>();
    EXPECT_EQ(tok().encode_with_special(text), c["ids_with_special"].get<Ids>()) << GetParam() << ": " << printable(text);
  }
}

TEST_P(TokenizerFamilies, DecodesTheReferenceIdsToTheReferenceText) {
  for (const json& c : cases()) {
    const Ids ids = c["ids"].get<Ids>();
    EXPECT_EQ(tok().decode(ids), c["decoded"].get<std::string>()) << GetParam() << ": " << printable(c["text"]);
  }
}

// Random text (words, CJK, emoji, white space runs, control characters) and raw bytes that are
// not UTF-8: decode(encode(s)) gives s back (Qwen: its NFC form; Mistral's Metaspace layout:
// a text that starts with a space loses it, as HF's does, so none is generated). "▁" in the
// text is not generated: SentencePiece-style tokenizers decode it as a space.
TEST_P(TokenizerFamilies, RoundTripsRandomTextAndBytes) {
  static const std::vector<std::string> atoms = {
      "the", " model", "  ", "\n", "\t", "Zürich", "naïve", "中文", "日本", "😀", "👍🏽", "123", "4567",
      "!", "?!", "::", "{", "}", "<", ">", "\x01", "\x7f", "ß", "İ", "'s", "’", "a"};
  std::mt19937 rng(19);
  const bool nfc = GetParam() == "qwen3";
  for (int i = 0; i < 300; ++i) {
    std::string s;
    const int n = 1 + static_cast<int>(rng() % 12);
    for (int k = 0; k < n; ++k) {
      if (rng() % 8 == 0) {
        s += static_cast<char>(0x80 + rng() % 0x80);  // a byte that is no UTF-8 here
      } else {
        s += atoms[rng() % atoms.size()];
      }
    }
    if (GetParam() == "mistral-metaspace" && s[0] == ' ') s.insert(0, "x");
    std::string expected = s;
    if (nfc) tok::unicode_normalize(s, tok::NormalForm::nfc, expected);
    EXPECT_EQ(tok().decode(tok().encode(s)), expected) << GetParam() << ": " << printable(s);
  }
}

std::string family_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string s = info.param;
  for (char& c : s)
    if (c == '-') c = '_';
  return s;
}

INSTANTIATE_TEST_SUITE_P(Real, TokenizerFamilies,
                         ::testing::Values("qwen3", "llama3", "gemma3", "mistral", "mistral-metaspace"), family_name);

TEST(TokenizerFamiliesDir, EachFamilyLoadsFromItsDirectoryWithItsSpecialTokens) {
  struct Expect {
    const char* dir;
    std::optional<std::int32_t> bos, eos, pad;
    bool add_bos;
  };
  const Expect expect[] = {{"qwen3", std::nullopt, 151645, 151643, false},
                           {"llama3", 128000, 128001, std::nullopt, false},
                           {"gemma3", 2, 106, 0, true},
                           {"mistral", 1, 2, std::nullopt, true}};
  for (const Expect& e : expect) {
    SCOPED_TRACE(e.dir);
    const auto tok = Tokenizer::from_dir(family_dir(e.dir));
    EXPECT_EQ(tok->kind(), "hf-bpe");
    EXPECT_EQ(tok->bos_id(), e.bos);
    EXPECT_EQ(tok->eos_id(), e.eos);
    EXPECT_EQ(tok->pad_id(), e.pad);
    EXPECT_EQ(tok->add_bos(), e.add_bos);
    EXPECT_FALSE(tok->add_eos());
  }
}

TEST(TokenizerFamiliesDir, ChatTemplateMarkersAreMatchedWhole) {
  const Tokenizer& qwen = family_tokenizer("qwen3");
  EXPECT_EQ(qwen.encode("<|im_start|>"), Ids{151644});
  EXPECT_EQ(qwen.encode("<think>"), Ids{151667});  // an added token that is not special
  EXPECT_EQ(qwen.token_to_id("</think>"), 151668);
  const Tokenizer& gemma = family_tokenizer("gemma3");
  EXPECT_EQ(gemma.encode("<start_of_turn>"), Ids{105});
  EXPECT_EQ(gemma.encode("<end_of_turn>"), Ids{106});
  const Tokenizer& llama = family_tokenizer("llama3");
  EXPECT_EQ(llama.encode("<|eot_id|>"), Ids{128009});
  EXPECT_EQ(llama.encode("<|start_header_id|>"), Ids{128006});
  EXPECT_EQ(gemma.vocab_size(), 262145);  // <image_soft_token> is beyond the model's vocabulary
  EXPECT_EQ(qwen.vocab_size(), 151669);
}

// What `train --tokenizer DIR` and `tokenize` load: the same directories through the CLI.
TEST(TokenizerFamiliesDir, TheCliTokenizesWithEachFamily) {
  for (const char* dir : {"qwen3", "gemma3", "mistral"}) {
    std::string out;
    const std::string cmd = test::zo2_tune_path().string() + " tokenize --tokenizer " + family_dir(dir).string() +
                            " --text 'Hello world!'";
    ASSERT_EQ(test::run_command(cmd, &out), 0) << out;
    const std::string family = dir;
    Ids ids = family_tokenizer(family).encode("Hello world!");
    EXPECT_NE(out.find(json(ids).dump()), std::string::npos) << dir << ": " << out;
  }
}

// Gemma 3's tokenizer has 262145 ids (<image_soft_token> = 262144, special) beside the
// 262144-row text embedding of its checkpoints, which transformers loads: its text
// vocabulary fits, and only a text that writes that token out is refused, naming the line.
TEST(TokenizerFamiliesDir, Gemma3FitsItsOwnVocabularyAndTheDataIsCheckedIdById) {
  const auto tok = Tokenizer::from_dir(family_dir("gemma3"));
  EXPECT_EQ(tok->vocab_size(), 262145);
  EXPECT_EQ(tok->text_vocab_size(), 262144);
  const auto qwen = Tokenizer::from_dir(family_dir("qwen3"));
  EXPECT_EQ(qwen->text_vocab_size(), 151669);  // <think> and </think> are added but not special
  test::TempDir tmp;
  const std::string tune = test::zo2_tune_path().string();
  std::string out;
  ASSERT_EQ(test::run_command(tune + " init --preset gemma3-tiny --out " + (tmp / "m").string() + " -q", &out), 0) << out;
  {  // the checkpoint's config as Gemma 3's (the data reader reads no weights)
    std::ifstream in(tmp / "m" / "config.json");
    json c = json::parse(in);
    c["vocab_size"] = 262144;
    std::ofstream(tmp / "m" / "config.json") << c.dump();
  }
  std::ofstream(tmp / "ok.jsonl") << "{\"text\": \"Hello world, this is fine.\"}\n";
  std::ofstream(tmp / "img.jsonl") << "{\"text\": \"Hello\"}\n{\"text\": \"an image <image_soft_token> here\"}\n";
  const std::string data = tune + " data --model " + (tmp / "m").string() + " --tokenizer " + family_dir("gemma3").string();
  EXPECT_EQ(test::run_command(data + " --data " + (tmp / "ok.jsonl").string(), &(out = "")), 0) << out;
  EXPECT_EQ(test::run_command(data + " --data " + (tmp / "img.jsonl").string(), &(out = "")), 1) << out;
  EXPECT_NE(out.find("img.jsonl:2: the text encodes the token <image_soft_token> (id 262144), outside the model's "
                     "vocabulary [0, 262144)"),
            std::string::npos)
      << out;
  // A model smaller than the text vocabulary is refused up front.
  {
    std::ifstream in(tmp / "m" / "config.json");
    json c = json::parse(in);
    c["vocab_size"] = 200000;
    std::ofstream(tmp / "m" / "config.json") << c.dump();
  }
  EXPECT_EQ(test::run_command(data + " --data " + (tmp / "ok.jsonl").string(), &(out = "")), 1) << out;
  EXPECT_NE(out.find("the tokenizer does not fit the model: it has 262144 ids but the model's vocabulary is only 200000"),
            std::string::npos)
      << out;
}

// ---- features on small files -----------------------------------------------------------------

// A character-level BPE file: the vocabulary `tokens` (ids in order), no merges, and the given
// pipeline parts.
fs::path write_char_bpe(const test::TempDir& dir, const std::vector<std::string>& tokens, json extra,
                        json model_extra = json::object()) {
  json vocab = json::object();
  for (std::size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
  json model = {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}};  // model_extra may give merges
  model.update(model_extra);
  json j = {{"model", model}};
  j.update(extra);
  write_file(dir / "tokenizer.json", j.dump());
  return dir / "tokenizer.json";
}

// The tokens of ids, for readable expectations.
std::vector<std::string> tokens_of(const Tokenizer& tok, const Ids& ids) {
  std::vector<std::string> out;
  for (auto id : ids) out.push_back(tok.id_to_token(id));
  return out;
}
using Tokens = std::vector<std::string>;

TEST(TokenizerFeatures, SplitBehaviorsCutLikeHuggingFace) {
  // HF's example: "the-final--countdown" split at "-"; whole pieces come from the
  // vocabulary (ignore_merges), so the ids show the pieces.
  const std::vector<std::string> vocab = {"the", "-", "final", "countdown", "--", "the-", "final-", "-final",
                                          "-countdown"};
  const std::map<std::string, Tokens> expect = {
      {"Removed", {"the", "final", "countdown"}},
      {"Isolated", {"the", "-", "final", "-", "-", "countdown"}},
      {"MergedWithPrevious", {"the-", "final-", "-", "countdown"}},
      {"MergedWithNext", {"the", "-final", "-", "-countdown"}},
      {"Contiguous", {"the", "-", "final", "--", "countdown"}}};
  for (const auto& [behavior, tokens] : expect) {
    test::TempDir dir;
    json pre = {{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", behavior}, {"invert", false}};
    auto tok = Tokenizer::from_tokenizer_json(write_char_bpe(dir, vocab, {{"pre_tokenizer", pre}}, {{"ignore_merges", true}}));
    EXPECT_EQ(tokens_of(*tok, tok->encode("the-final--countdown")), tokens) << behavior;
  }
  // invert: the pattern matches the words, the rest is the delimiter.
  test::TempDir dir;
  json pre = {{"type", "Split"}, {"pattern", {{"Regex", "\\w+"}}}, {"behavior", "Removed"}, {"invert", true}};
  auto tok = Tokenizer::from_tokenizer_json(write_char_bpe(dir, vocab, {{"pre_tokenizer", pre}}, {{"ignore_merges", true}}));
  EXPECT_EQ(tokens_of(*tok, tok->encode("the-final--countdown")), (Tokens{"the", "final", "countdown"}));
}

TEST(TokenizerFeatures, MetaspacePrependsPerItsSchemeAndSplitsBeforeEachReplacement) {
  const std::string m = "\u2581";
  const std::vector<std::string> vocab = {"a", "b", m, m + "a", m + "b", m + m, "<t>"};
  auto load = [&](const test::TempDir& dir, const char* scheme, bool split) {
    json pre = {{"type", "Metaspace"}, {"replacement", m}, {"prepend_scheme", scheme}, {"split", split}};
    json added = json::array({{{"id", 6}, {"content", "<t>"}, {"special", true}, {"normalized", false}}});
    return Tokenizer::from_tokenizer_json(
        write_char_bpe(dir, vocab, {{"pre_tokenizer", pre}, {"added_tokens", added}}, {{"ignore_merges", true}}));
  };
  test::TempDir d1, d2, d3, d4;
  auto always = load(d1, "always", true);
  EXPECT_EQ(tokens_of(*always, always->encode("a b")), (Tokens{m + "a", m + "b"}));
  EXPECT_EQ(tokens_of(*always, always->encode("a<t>b")), (Tokens{m + "a", "<t>", m + "b"}));
  auto first = load(d2, "first", true);
  EXPECT_EQ(tokens_of(*first, first->encode("a<t>b")), (Tokens{m + "a", "<t>", "b"}));
  EXPECT_EQ(tokens_of(*first, first->encode("<t>a")), (Tokens{"<t>", "a"}));
  auto never = load(d3, "never", true);
  EXPECT_EQ(tokens_of(*never, never->encode("a  b")), (Tokens{"a", m, m + "b"}));
  // split false: one word, so "▁▁" can be one token.
  auto whole = load(d4, "never", false);
  EXPECT_EQ(tokens_of(*whole, whole->encode("  ")), (Tokens{m + m}));
}

TEST(TokenizerFeatures, CharactersOutsideTheVocabularyTakeByteFallbackOrTheUnknownToken) {
  test::TempDir d1, d2, d3;
  std::vector<std::string> vocab = {"<unk>", "a", "b"};
  for (int b = 0; b < 256; ++b) vocab.push_back(fmt::format("<0x{:02X}>", b));
  auto fb = Tokenizer::from_tokenizer_json(
      write_char_bpe(d1, vocab, json::object(), {{"byte_fallback", true}, {"unk_token", "<unk>"}}));
  EXPECT_EQ(tokens_of(*fb, fb->encode("aé")), (Tokens{"a", "<0xC3>", "<0xA9>"}));
  EXPECT_EQ(fb->encode("\xff"), Ids{3 + 0xff});  // a byte that is not UTF-8
  std::vector<std::string> small = {"<unk>", "a", "b"};
  auto fused = Tokenizer::from_tokenizer_json(
      write_char_bpe(d2, small, json::object(), {{"fuse_unk", true}, {"unk_token", "<unk>"}}));
  EXPECT_EQ(tokens_of(*fused, fused->encode("aéèb")), (Tokens{"a", "<unk>", "b"}));
  auto unfused = Tokenizer::from_tokenizer_json(write_char_bpe(d3, small, json::object(), {{"unk_token", "<unk>"}}));
  EXPECT_EQ(tokens_of(*unfused, unfused->encode("aéèb")), (Tokens{"a", "<unk>", "<unk>", "b"}));
  test::TempDir d4;
  auto none = Tokenizer::from_tokenizer_json(write_char_bpe(d4, small, json::object()));
  std::string msg = message_of([&] { none->encode("é"); });
  EXPECT_NE(msg.find("é"), std::string::npos) << msg;
}

TEST(TokenizerFeatures, NormalizersComposeInOrder) {
  auto norm = [](json j, std::string s) {
    tok::Normalizer n(j, "test", "normalizer");
    n.apply(s);
    return s;
  };
  EXPECT_EQ(norm({{"type", "NFC"}}, "e\u0301"), "\u00e9");
  EXPECT_EQ(norm({{"type", "NFD"}}, "\u00e9"), "e\u0301");
  EXPECT_EQ(norm({{"type", "NFKC"}}, "\ufb01 \u2460 \uff41"), "fi 1 a");
  EXPECT_EQ(norm({{"type", "NFKD"}}, "\u00e9\ufb01"), "e\u0301fi");
  EXPECT_EQ(norm({{"type", "NFC"}}, "ok \xff e\u0301"), "ok \xff \u00e9");  // bytes that are no UTF-8 stay
  EXPECT_EQ(norm({{"type", "Lowercase"}}, "ÀÉ ΣΑΣ ABC"), "àé σας abc");   // final sigma
  EXPECT_EQ(norm({{"type", "Strip"}, {"strip_left", true}, {"strip_right", false}}, "\u3000 a "), "a ");
  EXPECT_EQ(norm({{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}}, " \t a b\u00a0\n"), "a b");
  EXPECT_EQ(norm({{"type", "Prepend"}, {"prepend", "\u2581"}}, "x"), "\u2581x");
  EXPECT_EQ(norm({{"type", "Prepend"}, {"prepend", "\u2581"}}, ""), "");
  EXPECT_EQ(norm({{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}}, " a  b"),
            "\u2581a\u2581\u2581b");
  EXPECT_EQ(norm({{"type", "Replace"}, {"pattern", {{"Regex", "\\s+"}}}, {"content", "_"}}, "a \t b\n"), "a_b_");
  json seq = {{"type", "Sequence"},
              {"normalizers",
               {{{"type", "NFKC"}},
                {{"type", "Lowercase"}},
                {{"type", "Prepend"}, {"prepend", "\u2581"}},
                {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}}}}};
  EXPECT_EQ(norm(seq, "Ｈello World"), "\u2581hello\u2581world");
}

TEST(TokenizerFeatures, NormalizedAddedTokensMatchTheNormalizedText) {
  test::TempDir dir;
  std::vector<std::string> vocab = {"h", "e", "l", "o", " ", "w", "r", "d", "H", "E", "L", "O"};
  json added = json::array({{{"id", 12}, {"content", "hello"}, {"special", false}, {"normalized", true}},
                            {{"id", 13}, {"content", "WORLD"}, {"special", true}, {"normalized", false}}});
  auto tok = Tokenizer::from_tokenizer_json(write_char_bpe(
      dir, vocab, {{"normalizer", {{"type", "Lowercase"}}}, {"added_tokens", added}, {"decoder", {{"type", "Fuse"}}}}));
  EXPECT_EQ(tok->encode("HELLO"), Ids{12});                 // matched after lowercasing
  EXPECT_EQ(tok->encode("WORLD hello"), (Ids{13, 4, 12}));  // WORLD matched before
  EXPECT_EQ(tok->encode("world"), (Ids{5, 3, 6, 2, 7}));    // not normalized: raw text only
  EXPECT_EQ(tok->decode(Ids{12, 4, 13}), "hello WORLD");
}

TEST(TokenizerFeatures, DecodersFollowHuggingFace) {
  const std::string m = "\u2581";
  std::vector<std::string> vocab = {m + "a", m + m, "b", "<0x41>", "<0xC3>", "<0xA9>", "<0xFF>", "x" + m};
  auto load = [&](const test::TempDir& dir, json decoder) {
    return Tokenizer::from_tokenizer_json(write_char_bpe(dir, vocab, {{"decoder", decoder}}));
  };
  test::TempDir d1, d2, d3, d4;
  // Metaspace: every replacement becomes a space, but the first token loses them (HF).
  auto meta = load(d1, {{"type", "Metaspace"}, {"replacement", m}, {"prepend_scheme", "always"}, {"split", true}});
  EXPECT_EQ(meta->decode(Ids{0, 0, 2}), "a ab");
  EXPECT_EQ(meta->decode(Ids{1, 0}), " a");
  auto meta_never = load(d2, {{"type", "Metaspace"}, {"replacement", m}, {"prepend_scheme", "never"}});
  EXPECT_EQ(meta_never->decode(Ids{0, 2}), " ab");
  // Replace, ByteFallback (runs of byte tokens; bytes that are no UTF-8 stay raw), Fuse, Strip.
  json seq = {{"type", "Sequence"},
              {"decoders",
               {{{"type", "Replace"}, {"pattern", {{"String", m}}}, {"content", " "}},
                {{"type", "ByteFallback"}},
                {{"type", "Fuse"}},
                {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 1}}}}};
  auto chain = load(d3, seq);
  EXPECT_EQ(chain->decode(Ids{0, 4, 5, 3, 2, 1}), "aéAb ");
  EXPECT_EQ(chain->decode(Ids{6, 7}), "\xffx");
  // No decoder: HF joins the tokens with spaces.
  test::TempDir d5;
  auto plain = Tokenizer::from_tokenizer_json(write_char_bpe(d5, vocab, json::object()));
  EXPECT_EQ(plain->decode(Ids{2, 2}), "b b");
}

TEST(TokenizerFeatures, ASentencePieceStyleTokenizerJsonAloneLoadsFromItsDirectory) {
  test::TempDir dir;
  std::vector<std::string> vocab = {"<unk>", "\u2581", "a", "\u2581a"};
  write_char_bpe(dir, vocab,
                 {{"normalizer", {{"type", "Sequence"},
                                  {"normalizers", {{{"type", "Prepend"}, {"prepend", "\u2581"}}}}}}},
                 {{"byte_fallback", true}, {"unk_token", "<unk>"}, {"merges", {"\u2581 a"}}});
  auto tok = Tokenizer::from_dir(dir.path());
  EXPECT_EQ(tok->kind(), "hf-bpe");
  EXPECT_EQ(tok->encode("a"), Ids{3});
  EXPECT_EQ(tok->encode("aa"), (Ids{3, 2}));
}

TEST(TokenizerFeatures, BadPipelineFieldsAreErrorsThatNameTheField) {
  struct Case {
    json extra;
    const char* field;
    const char* value;
  };
  const Case cases[] = {
      {{{"normalizer", {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}, {{"type", "Precompiled"}}}}}}},
       "normalizer.normalizers[1].type",
       "Precompiled"},
      {{{"normalizer", {{"type", "Replace"}, {"pattern", {{"Regex", "("}}}, {"content", ""}}}}, "normalizer.pattern", "("},
      {{{"normalizer", {{"type", "Prepend"}}}}, "normalizer.prepend", ""},
      {{{"pre_tokenizer", {{"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "Sideways"}}}},
       "pre_tokenizer.behavior",
       "Sideways"},
      {{{"pre_tokenizer", {{"type", "Metaspace"}, {"replacement", "ab"}}}}, "pre_tokenizer.replacement", "ab"},
      {{{"pre_tokenizer", {{"type", "Metaspace"}, {"replacement", "_"}, {"prepend_scheme", "sometimes"}}}},
       "pre_tokenizer.prepend_scheme",
       "sometimes"},
      {{{"pre_tokenizer",
         {{"type", "Sequence"}, {"pretokenizers", {{{"type", "ByteLevel"}}, {{"type", "Metaspace"}, {"replacement", "_"}}}}}}},
       "pre_tokenizer.pretokenizers[1].type",
       "Metaspace"},
      {{{"decoder", {{"type", "Sequence"}, {"decoders", {{{"type", "Fuse"}}, {{"type", "WordPiece"}}}}}}},
       "decoder.decoders[1].type",
       "WordPiece"},
      {{{"decoder", {{"type", "Strip"}, {"content", " "}, {"start", -1}, {"stop", 0}}}}, "decoder.start", ""},
  };
  for (const Case& c : cases) {
    test::TempDir dir;
    const fs::path file = write_char_bpe(dir, {"a", "_"}, c.extra);
    const std::string msg = message_of([&] { Tokenizer::from_tokenizer_json(file); });
    EXPECT_NE(msg.find(file.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.field), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.value), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace zo2
