#include "tools/dataset.h"

#include "runtime/error.h"
#include "tools/cli.h"

namespace zo2::cli {

TokenDataset TokenDataset::load(const std::filesystem::path& file, const ModelConfig& config) {
  TokenTensors t = read_token_tensors(file);
  TokenDataset d;
  d.config_ = config;
  d.source_ = file.string();
  d.rows_ = t.rows;
  d.seq_ = t.seq;
  if (t.seq > config.max_positions)
    fail(ErrorKind::invalid_argument, "{}: sequences of {} tokens exceed the model's max_position_embeddings ({})",
         file.string(), t.seq, config.max_positions);
  for (std::size_t i = 0; i < t.ids.size(); ++i)
    if (t.ids[i] < 0 || t.ids[i] >= config.vocab_size)
      fail(ErrorKind::invalid_argument, "{}: token id {} at row {}, position {} is outside the model's vocabulary [0, {})",
           file.string(), t.ids[i], static_cast<std::int64_t>(i) / t.seq, static_cast<std::int64_t>(i) % t.seq,
           config.vocab_size);
  d.ids_ = std::move(t.ids);
  d.mask_ = std::move(t.mask);
  d.labels_ = std::move(t.labels);
  return d;
}

HostBatch TokenDataset::gather(const std::vector<std::int64_t>& rows) const {
  const auto b = static_cast<int>(rows.size());
  const auto T = static_cast<std::size_t>(seq_);
  std::vector<std::int32_t> ids(rows.size() * T), mask, labels;
  if (!mask_.empty()) mask.resize(ids.size());
  if (!labels_.empty()) labels.resize(ids.size());
  for (std::size_t j = 0; j < rows.size(); ++j) {
    const auto src = static_cast<std::size_t>(rows[j]) * T;
    std::copy_n(ids_.begin() + static_cast<std::ptrdiff_t>(src), T, ids.begin() + static_cast<std::ptrdiff_t>(j * T));
    if (!mask_.empty())
      std::copy_n(mask_.begin() + static_cast<std::ptrdiff_t>(src), T, mask.begin() + static_cast<std::ptrdiff_t>(j * T));
    if (!labels_.empty())
      std::copy_n(labels_.begin() + static_cast<std::ptrdiff_t>(src), T, labels.begin() + static_cast<std::ptrdiff_t>(j * T));
  }
  return make_batch(config_, b, static_cast<int>(seq_), ids, mask, labels);
}

HostBatch TokenDataset::batch(std::int64_t index, int batch_size) const {
  std::vector<std::int64_t> rows(static_cast<std::size_t>(batch_size));
  for (int j = 0; j < batch_size; ++j) rows[static_cast<std::size_t>(j)] = (index * batch_size + j) % rows_;
  return gather(rows);
}

HostBatch TokenDataset::rows_batch(std::int64_t first, int count) const {
  std::vector<std::int64_t> rows;
  for (std::int64_t r = first; r < std::min(rows_, first + count); ++r) rows.push_back(r);
  return gather(rows);
}

}  // namespace zo2::cli
