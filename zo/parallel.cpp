// Note [Parallel modes] (zo/parallel.h).
#include "zo/parallel.h"

#include "runtime/error.h"

#include <algorithm>
#include <charconv>
#include <cmath>

namespace zo2 {

std::string ParallelLayout::spec() const {
  std::string s;
  auto add = [&](const char* name, int v) {
    if (v == 1) return;
    s += fmt::format("{}{}={}", s.empty() ? "" : ",", name, v);
  };
  add("data", data);
  add("perturbation", perturbation);
  add("directions", directions);
  return s.empty() ? "single" : s;
}

std::string ParallelLayout::describe() const {
  if (single()) return "one rank";
  std::string s = fmt::format("{} ranks:", size());
  std::string sep = " ";
  if (data > 1) {
    s += fmt::format("{}data {}", sep, data);
    sep = " × ";
  }
  if (perturbation > 1) {
    s += fmt::format("{}perturbation {}", sep, perturbation);
    sep = " × ";
  }
  if (directions > 1) s += fmt::format("{}directions {}", sep, directions);
  std::string each;
  if (perturbation > 1) each = "one branch of each pass";
  if (directions > 1) each += fmt::format("{}1/{} of the directions", each.empty() ? "" : ", ", directions);
  if (data > 1) each += fmt::format("{}on 1/{} of the batch", each.empty() ? "" : ", ", data);
  return s + " (each rank: " + each + ")";
}

ParallelLayout parse_parallel(std::string_view text, std::string_view flag) {
  ParallelLayout l;
  if (text.empty() || text == "single" || text == "none") return l;
  bool seen[3] = {false, false, false};
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t comma = std::min(text.find(',', pos), text.size());
    const std::string_view part = text.substr(pos, comma - pos);
    const std::size_t eq = part.find('=');
    if (eq == std::string_view::npos)
      fail(ErrorKind::invalid_argument, "{} {}: '{}' is not name=N (data, perturbation or directions)", flag, text,
           part);
    const std::string_view name = part.substr(0, eq), value = part.substr(eq + 1);
    int n = 0;
    const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
    if (ec != std::errc() || end != value.data() + value.size() || n < 1 || n > 4096)
      fail(ErrorKind::invalid_argument, "{} {}: '{}' needs a whole number from 1 to 4096", flag, text, part);
    int k = -1;
    if (name == "data") {
      k = 0;
      l.data = n;
    } else if (name == "perturbation") {
      k = 1;
      l.perturbation = n;
    } else if (name == "directions") {
      k = 2;
      l.directions = n;
    } else {
      fail(ErrorKind::invalid_argument, "{} {}: unknown factor '{}' (data, perturbation or directions)", flag, text,
           name);
    }
    if (seen[k]) fail(ErrorKind::invalid_argument, "{} {}: '{}' is given twice", flag, text, name);
    seen[k] = true;
    pos = comma + 1;
  }
  if (l.perturbation > 2)
    fail(ErrorKind::invalid_argument,
         "{} {}: perturbation={} — the +eps and −eps passes form pairs, so perturbation is 1 or 2 (use data= or "
         "directions= for more ranks)",
         flag, text, l.perturbation);
  return l;
}

RankCoord rank_coord(const ParallelLayout& l, int rank) {
  RankCoord c;
  c.direction = rank % l.directions;
  c.perturbation = (rank / l.directions) % l.perturbation;
  c.data = rank / (l.directions * l.perturbation);
  return c;
}

void validate_parallel(const ParallelLayout& l, int ranks, const RuleConfig& rule, int batch_units,
                       std::string_view flag, std::string_view typed) {
  const std::string shown = typed.empty() ? l.spec() : std::string(typed);
  if (l.size() != ranks)
    fail(ErrorKind::invalid_argument, "{} {}: the factors multiply to {} but the run has {} rank{}{}", flag, shown,
         l.size(), ranks, ranks == 1 ? "" : "s",
         ranks == 1 ? " (start it with mpirun -np N, or srun)" : " (mpirun -np / srun)");
  if (l.single()) return;
  if (rule.host_sync())
    fail(ErrorKind::invalid_argument,
         "{} {}: zo-sgd-cons reads each step's g on the host within the step and is not run across ranks; use "
         "another --optimizer or one rank",
         flag, shown);
  if (rule.directions % l.directions != 0)
    fail(ErrorKind::invalid_argument,
         "{} {}: directions={} needs --directions a multiple of {} (each rank evaluates its own directions), got {}",
         flag, shown, l.directions, l.directions, rule.directions);
  if (batch_units >= 0 && batch_units < l.data)
    fail(ErrorKind::invalid_argument, "{} {}: data={} splits the batch, but a step has only {} sequence{} (or examples)",
         flag, shown, l.data, batch_units, batch_units == 1 ? "" : "s");
}

RankWork rank_work(const RuleEstimate& est, const ParallelLayout& l, const RankCoord& c) {
  RankWork w;
  int single_branch = 0;  // the k-th one-branch pass (alternates between the pair)
  for (const RulePass& p : est.passes) {
    if (p.direction % l.directions != c.direction) {
      if (p.branches == 1) ++single_branch;
      continue;
    }
    if (l.perturbation == 1) {
      w.passes.push_back(p);
      continue;
    }
    if (p.branches == 1) {
      if (single_branch++ % 2 == c.perturbation) w.passes.push_back(p);
      continue;
    }
    // One branch of the pair, as a one-branch pass: branch 1 saw W + minus·eps·z.
    RulePass one = p;
    one.branches = 1;
    if (c.perturbation == 1) {
      one.eps = p.minus * p.eps;  // NoiseArgs::eps_minus(): the same product
      one.slot[0] = p.slot[1];
    }
    one.slot[1] = -1;
    w.passes.push_back(one);
  }
  for (const RulePass& p : w.passes)
    for (int k = 0; k < p.branches; ++k) w.slots.push_back(p.slot[k]);
  std::sort(w.slots.begin(), w.slots.end());
  return w;
}

std::vector<float> merge_losses(const RuleEstimate& est, const ParallelLayout& l, std::span<const double> gathered) {
  const int n = est.loss_slots;
  const int ranks = l.size();
  ZO2_CHECK(gathered.size() == static_cast<std::size_t>(ranks) * static_cast<std::size_t>(n + 1));
  std::vector<float> out(static_cast<std::size_t>(n), 0.0f);
  std::vector<double> num(static_cast<std::size_t>(n), 0.0), den(static_cast<std::size_t>(n), 0.0);
  std::vector<int> count(static_cast<std::size_t>(n), 0);
  for (int r = 0; r < ranks; ++r) {
    const RankWork w = rank_work(est, l, rank_coord(l, r));
    const double* row = gathered.data() + static_cast<std::size_t>(r) * static_cast<std::size_t>(n + 1);
    const double weight = row[0];
    for (int s : w.slots) {
      const auto k = static_cast<std::size_t>(s);
      if (count[k]++ == 0) out[k] = static_cast<float>(row[1 + s]);  // one contributor: its bits
      if (weight <= 0) continue;  // a shard with nothing to predict (its mean is 0/0) adds nothing
      num[k] += weight * row[1 + s];
      den[k] += weight;
    }
  }
  for (int s = 0; s < n; ++s) {
    const auto k = static_cast<std::size_t>(s);
    if (count[k] > 1) out[k] = den[k] > 0 ? static_cast<float>(num[k] / den[k]) : NAN;
  }
  return out;
}

Shard data_shard(int units, int d, int parts) {
  const auto at = [&](int i) {
    return static_cast<int>(static_cast<std::int64_t>(units) * i / parts);
  };
  return Shard{at(d), at(d + 1)};
}

}  // namespace zo2
