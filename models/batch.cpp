#include "models/batch.h"

#include "runtime/error.h"

namespace zo2 {

std::int64_t HostBatch::unpadded_tokens() const {
  if (key_mask.empty()) return tokens();
  std::int64_t n = 0;
  for (auto m : key_mask) n += m != 0 ? 1 : 0;
  return n;
}

std::int64_t HostBatch::target_count() const {
  std::int64_t n = 0;
  for (auto t : targets) n += t >= 0 ? 1 : 0;
  return n;
}

HostBatch make_batch(const ModelConfig& c, int batch, int seq, std::span<const std::int32_t> ids,
                     std::span<const std::int32_t> mask, std::span<const std::int32_t> labels) {
  if (batch <= 0 || seq <= 0)
    fail(ErrorKind::invalid_argument, "a batch needs at least one sequence and one token (got {} × {})",
         batch, seq);
  if (seq > c.max_positions)
    fail(ErrorKind::invalid_argument,
         "sequence length {} exceeds the model's max_position_embeddings ({})", seq, c.max_positions);
  const std::size_t n = static_cast<std::size_t>(batch) * static_cast<std::size_t>(seq);
  if (ids.size() != n)
    fail(ErrorKind::invalid_argument, "the batch has {} token ids, expected {} × {} = {}", ids.size(),
         batch, seq, n);
  if (!mask.empty() && mask.size() != n)
    fail(ErrorKind::invalid_argument, "the attention mask has {} entries, expected {}", mask.size(), n);
  if (!labels.empty() && labels.size() != n)
    fail(ErrorKind::invalid_argument, "the labels have {} entries, expected {}", labels.size(), n);
  HostBatch b;
  b.batch = batch;
  b.seq = seq;
  b.ids.assign(ids.begin(), ids.end());
  b.key_mask.resize(n);
  b.positions.resize(n);
  b.targets.resize(n);
  for (int r = 0; r < batch; ++r) {
    std::int32_t cumsum = 0;
    for (int t = 0; t < seq; ++t) {
      const std::size_t i = static_cast<std::size_t>(r) * static_cast<std::size_t>(seq) + static_cast<std::size_t>(t);
      if (ids[i] < 0 || ids[i] >= c.vocab_size)
        fail(ErrorKind::invalid_argument,
             "token id {} at sequence {}, position {} is outside the vocabulary [0, {})", ids[i], r,
             t, c.vocab_size);
      const std::int32_t m = mask.empty() ? 1 : mask[i];
      if (m != 0 && m != 1)
        fail(ErrorKind::invalid_argument, "attention mask value {} at sequence {}, position {} is not 0 or 1",
             m, r, t);
      b.key_mask[i] = m;
      cumsum += m;
      b.positions[i] = c.family == ModelFamily::opt ? cumsum * m - 1 + 2 : t;
      if (!labels.empty() && labels[i] != kIgnoreIndex && (labels[i] < 0 || labels[i] >= c.vocab_size))
        fail(ErrorKind::invalid_argument,
             "label {} at sequence {}, position {} is outside the vocabulary [0, {}) and not -100",
             labels[i], r, t, c.vocab_size);
    }
    for (int t = 0; t < seq; ++t) {
      const std::size_t i = static_cast<std::size_t>(r) * static_cast<std::size_t>(seq) + static_cast<std::size_t>(t);
      std::int32_t target = kIgnoreIndex;
      // A masked position (padding) predicts nothing, labels or not: its hidden state is not
      // that of a token of the sequence, and a left-padded row's last pad would otherwise
      // predict its first real token (BOS), so the loss would depend on the padding side
      // and on the longest row of the batch.
      if (t + 1 < seq && b.key_mask[i]) {
        const std::size_t j = i + 1;
        target = labels.empty() ? (b.key_mask[j] ? ids[j] : kIgnoreIndex) : labels[j];
      }
      b.targets[i] = target;
    }
  }
  return b;
}

void require_targets(const HostBatch& batch) {
  if (batch.target_count() > 0) return;
  fail(ErrorKind::invalid_argument,
       "the batch has nothing to predict: none of its {} sequence{} of {} tokens has a target token (every label "
       "is -100, or the attention mask is 0 after the first token), so its loss is undefined",
       batch.batch, batch.batch == 1 ? "" : "s", batch.seq);
}

void set_option_groups(HostBatch& batch, std::span<const int> group_sizes, std::span<const int> labels) {
  if (group_sizes.size() != labels.size())
    fail(ErrorKind::invalid_argument, "{} option groups but {} labels", group_sizes.size(), labels.size());
  std::vector<std::int32_t> info;
  info.reserve(static_cast<std::size_t>(batch.batch));
  std::int64_t covered = 0;
  for (std::size_t g = 0; g < group_sizes.size(); ++g) {
    if (group_sizes[g] <= 0)
      fail(ErrorKind::invalid_argument, "option group {}: size {} (a group holds at least one candidate sequence)", g,
           group_sizes[g]);
    if (labels[g] < 0 || labels[g] >= group_sizes[g])
      fail(ErrorKind::invalid_argument, "option group {}: label {} is not one of its {} candidates", g, labels[g],
           group_sizes[g]);
    covered += group_sizes[g];  // checked before the group is expanded: a size may be INT_MAX
    if (covered > batch.batch)
      fail(ErrorKind::invalid_argument, "option groups 0..{} cover {} sequences but the batch has {}", g, covered,
           batch.batch);
    for (int k = 0; k < group_sizes[g]; ++k) info.push_back(static_cast<std::int32_t>(2 * g + (k == labels[g] ? 1 : 0)));
  }
  if (static_cast<int>(info.size()) != batch.batch)
    fail(ErrorKind::invalid_argument, "option groups cover {} sequences but the batch has {}", info.size(), batch.batch);
  for (int r = 0; r < batch.batch; ++r) {
    bool any = false;
    for (int t = 0; t < batch.seq && !any; ++t) any = batch.targets[static_cast<std::size_t>(r) * static_cast<std::size_t>(batch.seq) + static_cast<std::size_t>(t)] >= 0;
    if (!any) fail(ErrorKind::invalid_argument, "candidate sequence {} has no target token to score", r);
  }
  batch.option_info = std::move(info);
}

HostBatch shard_batch(const HostBatch& batch, int part, int parts) {
  ZO2_CHECK(parts >= 1 && part >= 0 && part < parts);
  // Units: sequences, or the sequence ranges of the option groups.
  std::vector<int> unit_start;
  for (int r = 0; r < batch.batch; ++r) {
    const auto u = static_cast<std::size_t>(r);
    if (batch.option_info.empty() || r == 0 || (batch.option_info[u] >> 1) != (batch.option_info[u - 1] >> 1))
      unit_start.push_back(r);
  }
  const int units = static_cast<int>(unit_start.size());
  unit_start.push_back(batch.batch);
  const auto at = [&](int i) { return static_cast<int>(static_cast<std::int64_t>(units) * i / parts); };
  const int u0 = at(part), u1 = at(part + 1);
  if (u1 <= u0)
    fail(ErrorKind::invalid_argument, "a batch of {} {} cannot be split into {} data-parallel parts", units,
         batch.option_info.empty() ? "sequences" : "examples", parts);
  const int r0 = unit_start[static_cast<std::size_t>(u0)], r1 = unit_start[static_cast<std::size_t>(u1)];
  HostBatch out;
  out.batch = r1 - r0;
  out.seq = batch.seq;
  const auto T = static_cast<std::size_t>(batch.seq);
  auto rows = [&](const std::vector<std::int32_t>& v, std::size_t width) {
    if (v.empty()) return std::vector<std::int32_t>{};
    return std::vector<std::int32_t>(v.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r0) * width),
                                     v.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r1) * width));
  };
  out.ids = rows(batch.ids, T);
  out.key_mask = rows(batch.key_mask, T);
  out.positions = rows(batch.positions, T);
  out.targets = rows(batch.targets, T);
  out.option_info = rows(batch.option_info, 1);
  return out;
}

}  // namespace zo2
