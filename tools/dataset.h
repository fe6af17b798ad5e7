// Training and evaluation data as zo2-tune reads it: rows of token ids (a safetensors
// file with input_ids [N, T] and optional attention_mask / labels), validated once
// against the model, and drawn in order, wrapping around.
#pragma once
#include "models/batch.h"
#include "models/config.h"

#include <filesystem>
#include <string>
#include <vector>

namespace zo2::cli {

class TokenDataset {
 public:
  static TokenDataset load(const std::filesystem::path& file, const ModelConfig& config);
  std::int64_t rows() const { return rows_; }
  std::int64_t seq() const { return seq_; }
  const std::string& source() const { return source_; }
  // Batch `index` of `batch_size` rows: rows (index·B + j) mod N.
  HostBatch batch(std::int64_t index, int batch_size) const;
  // Rows [first, first + count) (clipped), for evaluation.
  HostBatch rows_batch(std::int64_t first, int count) const;

 private:
  HostBatch gather(const std::vector<std::int64_t>& rows) const;
  ModelConfig config_;
  std::string source_;
  std::int64_t rows_ = 0, seq_ = 0;
  std::vector<std::int32_t> ids_, mask_, labels_;
};

}  // namespace zo2::cli
