// Parallel ZO across ranks (DESIGN.md §10): which part of a step's estimate each rank
// computes, and how the ranks' loss scalars become the one set every rank updates with.
//
// Note [Parallel modes]
//   The layout is a grid of three factors whose product is the rank count:
//   rank = (d·P + p)·Q + q for data index d < D, perturbation index p < P, direction group q < Q.
//   - data (D): the global batch is split into D shards of whole sequences (multiple-choice
//     batches: of whole examples); each shard's ranks run their passes on it. A loss slot
//     that D ranks computed becomes Σ_d w_d·L_d / Σ_d w_d in double, summed in rank order,
//     with w_d the shard's weight (its target tokens, or its examples for multiple-choice
//     losses) — the mean over the global batch, identical bits on every rank.
//   - perturbation (P = 2, DistZO2): of each two-branch pass (W + eps·z, W − eps·z) rank
//     p = 0 runs branch 0 and rank p = 1 runs branch 1, as a one-branch pass; a one-branch
//     pass goes to p = k mod 2 (the k-th such pass). A branch alone computes exactly the
//     kernels it computes beside the other, so the losses, and with fp32 the weights, are
//     bit-identical to one process.
//   - directions (Q): direction j (seed direction_seed(step seed, j)) belongs to group
//     j mod Q; q must be a multiple of Q. A forward difference's unperturbed L0 rides on
//     direction 0's pass, so it belongs to group 0 and reaches the others by the exchange.
//   Every rank then holds every loss slot (a slot computed by one rank is copied, not
//   re-rounded), computes every g_j with the same kernel, and applies all q updates in
//   direction order with lr/q: the same bits everywhere, and for P and Q the bits of a
//   one-process run (the `--directions q` run for Q). Only data parallelism changes a bit
//   pattern relative to one process: the mean is taken per shard, then combined.
#pragma once
#include "zo/rule.h"

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace zo2 {

struct ParallelLayout {
  int data = 1;
  int perturbation = 1;
  int directions = 1;
  int size() const { return data * perturbation * directions; }
  bool single() const { return size() == 1; }
  bool operator==(const ParallelLayout&) const = default;
  // "data=2,perturbation=2" (factors of 1 left out; "single" for 1×1×1)
  std::string spec() const;
  // "4 ranks: data 2 × perturbation 2 (each rank: half a step's passes on 1/2 of the batch)"
  std::string describe() const;
};

// Parses "data=2,perturbation=2,directions=1" (any order, each factor at most once, each ≥ 1;
// "single" or "" is 1×1×1). Error(invalid_argument) naming `flag` and the part refused.
ParallelLayout parse_parallel(std::string_view text, std::string_view flag);

struct RankCoord {
  int data = 0, perturbation = 0, direction = 0;
};
RankCoord rank_coord(const ParallelLayout& layout, int rank);

// Refuses a layout the run cannot use, naming `flag` (--parallel, or the C field): product
// ≠ the rank count, P > 2, q not a multiple of Q, a global batch with fewer sequences (or
// multiple-choice examples) than D, zo-sgd-cons (it needs g on the host within the step).
// batch_units < 0 skips the batch check. `typed`: the layout as the user wrote it, echoed in
// the errors ("" echoes spec()).
void validate_parallel(const ParallelLayout& layout, int ranks, const RuleConfig& rule, int batch_units,
                       std::string_view flag, std::string_view typed = {});

// The passes a rank runs and the loss slots it writes.
struct RankWork {
  std::vector<RulePass> passes;
  std::vector<int> slots;  // ascending
};
RankWork rank_work(const RuleEstimate& est, const ParallelLayout& layout, const RankCoord& coord);

// Every rank's contribution, as the exchange gathers it: per rank [weight, slot 0 … slot n−1]
// (n = est.loss_slots; slots a rank does not compute are ignored). Returns the merged slots.
std::vector<float> merge_losses(const RuleEstimate& est, const ParallelLayout& layout,
                                std::span<const double> gathered);

// A rank's shard [begin, end) of `units` (sequences or examples) for data index d of D.
struct Shard {
  int begin = 0, end = 0;
};
Shard data_shard(int units, int d, int parts);

}  // namespace zo2
