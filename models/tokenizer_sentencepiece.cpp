// SentencePiece tokenizer.model (LLaMA-2) through libsentencepiece.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include "models/tokenizer.h"
#include "runtime/error.h"

namespace zo2 {

namespace fs = std::filesystem;

namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const fs::path& file) : source_(file.string()) {
    std::error_code ec;
    if (!fs::is_regular_file(file, ec)) {
      if (fs::exists(file, ec)) fail(ErrorKind::io, "{}: is not a regular file", source_);  // a FIFO: never opened
      fail(ErrorKind::io, "cannot open {}: no such file", source_);
    }
    sentencepiece::util::Status status;
    try {
      status = sp_.Load(file.string());
    } catch (const std::exception& e) {  // libsentencepiece throws on some malformed models (Darts)
      fail(ErrorKind::format, "{}: not a SentencePiece model: {}", source_, e.what());
    }
    if (!status.ok())
      fail(ErrorKind::format, "{}: not a SentencePiece model: {}", source_, status.ToString());
    pieces_ = sp_.GetPieceSize();
    auto opt_id = [](int id) { return id >= 0 ? std::optional<std::int32_t>(id) : std::nullopt; };
    bos_id_ = opt_id(sp_.bos_id());
    eos_id_ = opt_id(sp_.eos_id());
    pad_id_ = opt_id(sp_.pad_id());
    unk_id_ = opt_id(sp_.unk_id());
    if (bos_id_) prefix_ = {*bos_id_};  // LLaMA-2's tokenizer adds BOS by default
  }

  std::vector<std::int32_t> encode(std::string_view text) const override {
    std::vector<std::int32_t> out;
    if (!has_added_tokens()) {
      encode_plain(text, out);
      return out;
    }
    for (const Piece& p : split_added(text)) {
      if (p.id >= 0)
        out.push_back(p.id);
      else
        encode_plain(p.text, out);
    }
    return out;
  }

  std::string decode(std::span<const std::int32_t> ids) const override {
    std::string out;
    std::vector<int> run;
    auto flush = [&] {
      if (run.empty()) return;
      std::string text;
      auto status = sp_.Decode(run, &text);
      if (!status.ok()) fail(ErrorKind::invalid_argument, "decode: {}: {}", source_, status.ToString());
      out += text;
      run.clear();
    };
    for (std::int32_t id : ids) {
      if (id >= 0 && id < pieces_ && !sp_.IsControl(id)) {
        run.push_back(id);
        continue;
      }
      flush();
      if (id >= 0 && id < pieces_)
        out += sp_.IdToPiece(id);  // <s>, </s>: written as their text
      else if (const std::string* s = added_token_content(id))
        out += *s;
      else
        fail(ErrorKind::invalid_argument, "decode: token id {} is not in the vocabulary (size {})", id, vocab_size());
    }
    flush();
    return out;
  }

  std::int32_t vocab_size() const override { return std::max(pieces_, max_added_id() + 1); }
  std::int32_t base_vocab_size() const override { return pieces_; }

  std::optional<std::int32_t> token_to_id(std::string_view token) const override {
    if (auto id = added_token_id(token)) return id;
    int id = sp_.PieceToId(token);
    if (id < 0 || id >= pieces_) return std::nullopt;
    if (sp_.IsUnknown(id) && sp_.IdToPiece(id) != token) return std::nullopt;
    return id;
  }

  std::string id_to_token(std::int32_t id) const override {
    if (id >= 0 && id < pieces_) return sp_.IdToPiece(id);
    if (const std::string* s = added_token_content(id)) return *s;
    return {};
  }

  std::string_view kind() const override { return "sentencepiece"; }

 private:
  void encode_plain(std::string_view text, std::vector<std::int32_t>& out) const {
    if (text.empty()) return;
    std::vector<int> ids;
    auto status = sp_.Encode(text, &ids);
    if (!status.ok()) fail(ErrorKind::invalid_argument, "encode: {}: {}", source_, status.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
  }

  std::string source_;
  sentencepiece::SentencePieceProcessor sp_;
  std::int32_t pieces_ = 0;
};

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::from_sentencepiece(const fs::path& file) {
  return std::make_unique<SentencePieceTokenizer>(file);
}

void train_sentencepiece(std::string_view args) {
  auto status = sentencepiece::SentencePieceTrainer::Train(args);
  if (!status.ok()) fail(ErrorKind::invalid_argument, "SentencePiece training failed: {}", status.ToString());
}

}  // namespace zo2
