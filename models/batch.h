// A batch as the device needs it, built and validated on the host: token ids, the
// padding mask, positions (OPT: offset-2 rows from the mask's cumulative sum, as
// transformers computes them; LLaMA: 0..T−1) and next-token targets (−100 = no loss).
#pragma once
#include "models/config.h"

#include <cstdint>
#include <span>
#include <vector>

namespace zo2 {

inline constexpr std::int32_t kIgnoreIndex = -100;

struct HostBatch {
  int batch = 0;
  int seq = 0;
  std::vector<std::int32_t> ids;
  std::vector<std::int32_t> key_mask;
  std::vector<std::int32_t> positions;
  std::vector<std::int32_t> targets;  // targets[b·T + t] = the label of position t+1
  // Multiple-choice batches (MeZO's classification training): per sequence, 2·group +
  // (1 if it is the group's correct candidate); groups are runs of consecutive sequences.
  // Empty: the loss is the mean next-token loss. See set_option_groups().
  std::vector<std::int32_t> option_info;
  std::int64_t tokens() const { return static_cast<std::int64_t>(batch) * seq; }  // B·T, padding included
  std::int64_t unpadded_tokens() const;  // the positions whose mask is 1: the examples' own tokens
  std::int64_t target_count() const;
};

// ids, mask and labels are [batch·seq] row-major. An empty mask means all ones; empty
// labels mean "predict the next input token where the mask is 1" (labels = input_ids with
// padding set to −100, as transformers' causal-LM loss). Labels use −100 to ignore a
// position and are shifted by one inside, as in transformers. A position whose mask is 0
// predicts nothing, labels or not (transformers would score a left-padded row's last pad
// predicting its first token): the loss does not depend on the padding side. Throws
// Error(invalid_argument) naming the row and position of a bad id, mask or label, or a
// sequence longer than the model's positions.
HostBatch make_batch(const ModelConfig& config, int batch, int seq, std::span<const std::int32_t> ids,
                     std::span<const std::int32_t> mask = {},
                     std::span<const std::int32_t> labels = {});

// Throws Error(invalid_argument) when no position of `batch` has a target (every label is
// −100, or the mask is 0 at every position after the first of each sequence): such a batch
// has nothing to predict, so its mean loss is undefined (0/0). A step or an evaluation that
// reports a loss refuses it rather than reporting NaN (or skipping the step).
void require_targets(const HostBatch& batch);

// Marks `batch` as multiple-choice: group_sizes[g] consecutive sequences per example, the
// correct one at offset labels[g] inside its group. Throws Error(invalid_argument) when the
// sizes do not add up to the batch, a label is out of its group, or a candidate has no
// target token (its score would be undefined).
void set_option_groups(HostBatch& batch, std::span<const int> group_sizes, std::span<const int> labels);

// Part `part` of `parts` of a batch (data parallelism, zo/parallel.h): whole sequences
// [B·part/parts, B·(part+1)/parts), or for a multiple-choice batch whole examples (groups)
// split the same way with all their candidates. Error(invalid_argument) when the part
// would be empty (fewer sequences or examples than parts).
HostBatch shard_batch(const HostBatch& batch, int part, int parts);

}  // namespace zo2
