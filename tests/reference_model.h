// An independent reference forward pass for the tests: plain loops in double precision,
// written from the transformers definitions of OPT and LLaMA (and its variants, Gemma 3 text), sharing no code with
// models/graph.cpp. It is itself checked against the transformers goldens, and then checks
// zo2 on configurations the goldens do not cover.
#pragma once
#include "models/config.h"

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace zo2::test {

struct ReferenceOutput {
  std::vector<double> logits;                     // [B·T, V]
  std::vector<std::vector<double>> hidden_states; // transformers' output_hidden_states
  std::vector<double> token_loss;                 // [B·T], 0 where no target
  double loss = 0;
};

class ReferenceModel {
 public:
  // Reads config.json and the safetensors weights of an HF directory.
  explicit ReferenceModel(const std::filesystem::path& dir);
  const ModelConfig& config() const { return c_; }
  // ids, mask: [B·T]; labels = ids where the mask is 1 (next-token loss).
  ReferenceOutput forward(int batch, int seq, const std::vector<std::int32_t>& ids,
                          const std::vector<std::int32_t>& mask) const;
  // Direct access for ZO reference math: name → values (row-major, fp64).
  std::map<std::string, std::vector<double>>& weights() { return w_; }

 private:
  const std::vector<double>& w(const std::string& name) const;
  ModelConfig c_;
  std::map<std::string, std::vector<double>> w_;
};

// Writes an HF checkpoint with weights of a wide spread (so a wrong op shows):
// matrices N(0, 1/in), norm weights 1 + N(0, 0.3²), biases N(0, 0.3²).
void write_random_checkpoint(const std::filesystem::path& dir, const ModelConfig& config,
                             std::uint64_t seed);

}  // namespace zo2::test

#include "api/session.h"

namespace zo2::test {

struct Zo2Output {
  std::vector<float> logits, token_loss;
  std::vector<std::vector<float>> hidden_states;
  float loss = 0;
};

// Small shapes the scheduler, rule and rank tests share: OPT (61-token vocabulary, hidden
// 32, 4 heads, ffn 72) and LLaMA (67 tokens, hidden 32, GQA 4/2, ffn 56, untied head).
ModelConfig small_opt(std::int64_t layers);
ModelConfig small_llama(std::int64_t layers);
// n batches of `batch` × `seq` ids (i·mul + b·step + i²) mod V for position i of batch b,
// the second sequence's last `padded` positions masked.
std::vector<HostBatch> patterned_batches(const ModelConfig& c, int n, int batch, int seq, int padded, int mul,
                                         int step);

// Loads `dir` as a user would (Session on the CPU unless cfg says otherwise) and runs one
// forward pass with hidden states and logits.
Zo2Output run_forward(const std::filesystem::path& dir, int batch, int seq,
                      const std::vector<std::int32_t>& ids, const std::vector<std::int32_t>& mask,
                      SessionConfig cfg = {});

// max |a − b| / max |b| over the rows whose mask is 1 (rows of `width` values).
double masked_rel_error(const std::vector<float>& a, const std::vector<double>& b,
                        const std::vector<std::int32_t>& mask, std::int64_t width);

}  // namespace zo2::test
