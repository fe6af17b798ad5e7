// The ZO update rules (DESIGN.md §11). zo/ owns them; the scheduler asks the rule.
//
// Note [Update rules]
//   A rule answers five questions, and the scheduler (offload/scheduler.cpp) asks them in
//   this order for every step:
//
//   1. Which parameters it perturbs: all of them (every rule here perturbs and updates the
//      whole model; PEFT rules will name a subset).
//   2. Which forward passes a step runs: estimate_passes(). A pass goes once over every
//      block with one or two activation branches; branch 0 sees W + eps·z_j, branch 1
//      W + minus·eps·z_j (NoiseArgs), z_j drawn from direction_seed(step seed, j). Central
//      differences run one two-branch pass per direction (+eps, −eps). Forward differences
//      run (+eps, unperturbed) for direction 0 and one-branch passes (+eps) for the others,
//      all compared with that one unperturbed loss L0. The pending update of the previous
//      step is applied during the first pass (only), while each block is resident.
//   3. How the losses become scalars: g_j = (L+_j − L−_j) / (2·eps), or (L+_j − L0) / eps
//      (the same kernel with eps/2: 2·(eps/2) = eps exactly). The g_j stay in device
//      memory; the host reads them a step behind, for the log.
//   4. How the update is applied (deferred to the next time each block is resident):
//      zo-sgd       W ← W − (lr/q)·(g_j·z_j + wd·W), once per direction j in order
//                   (MeZO's Algorithm 2); q = 1 is the original one-direction MeZO update,
//                   the same bits as before rules existed.
//      zo-sgd-sign  the same with sign(g_j) in place of g_j (ZO-Bench's ZO-SGD-Sign).
//      zo-sgd-cons  ZO-Bench's conservative step: after the estimate, the losses at
//                   θ − lr·g·z and θ + lr·g·z (one two-branch pass, eps = −lr·g) are
//                   compared with L(θ) (a one-branch unperturbed pass, or the forward
//                   difference's L0), and the best of the three is kept: choice c ∈
//                   {+1, 0, −1} and the update W ← W − lr·c·g·z. It needs g on the host,
//                   so this rule waits for each step's losses (no cross-step overlap).
//      zo-sgd-momentum, zo-adam: Ops::update_state (runtime/ops.h) with the estimate
//                   u = wd·W + (1/q)·Σ_j g_j·z_j and torch.optim.SGD(momentum) /
//                   torch.optim.Adam semantics; Adam's step count t is step + 1.
//   5. What state it keeps and how: none for the SGD family; m (momentum) or m and v
//      (Adam), one tensor per weight, in --state-dtype, stored beside the master weights
//      (each block's host image is followed by its state images, so the state streams
//      with its block in the same copies, and the planner counts it in the window and on
//      the link). It is saved with each checkpoint (optimizer_state.safetensors) for an
//      exact --resume; replay rebuilds it by applying the logged steps in order, since
//      each step's update is a function of (seeds, g_j, lr, wd, t) alone.
//
//   Everything a replay needs is in the seed log: the header names the rule and its
//   hyper-parameters, and each line holds the step's g_j (and, for zo-sgd-cons, c).
#pragma once
#include "runtime/dtype.h"

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace zo2 {

enum class RuleKind { sgd, sign, cons, momentum, adam };
enum class Difference { central, forward };

std::string_view rule_name(RuleKind k);       // zo-sgd | zo-sgd-sign | zo-sgd-cons | ...
std::optional<RuleKind> parse_rule(std::string_view s);
std::string_view difference_name(Difference d);  // central | forward
std::optional<Difference> parse_difference(std::string_view s);

struct RuleConfig {
  static constexpr int kMaxDirections = 64;  // StateUpdateArgs::kMaxDirections
  RuleKind kind = RuleKind::sgd;
  int directions = 1;
  Difference difference = Difference::central;
  float beta1 = 0.9f;    // zo-sgd-momentum: the momentum factor; zo-adam: β1
  float beta2 = 0.999f;  // zo-adam
  float adam_eps = 1e-8f;
  DType state_dtype = DType::f32;

  // State tensors per weight: 0 (SGD family), 1 (momentum), 2 (Adam).
  int state_buffers() const;
  // The rule reads g on the host within the step (zo-sgd-cons).
  bool host_sync() const { return kind == RuleKind::cons; }
  bool operator==(const RuleConfig&) const = default;
  // One line for logs and plan: "zo-adam (β1 0.9, β2 0.999, eps 1e-08, state bf16), q = 4, central".
  std::string describe() const;
};

// Error(invalid_argument) naming the flag for combinations a rule does not support
// (zo-sgd-cons with several directions or with weight decay, a state dtype other than
// fp32/bf16/fp8, β outside [0, 1), ...). c_api: name the zo2_session_params fields
// (directions, state_dtype, ...) instead of the flags.
void validate_rule(const RuleConfig& r, float weight_decay, bool c_api = false);

// The rule as the seed log header and the run state record it, and back. from_json names
// `where` and the field on a bad value; a missing object is today's zo-sgd.
nlohmann::json rule_to_json(const RuleConfig& r);
RuleConfig rule_from_json(const nlohmann::json& j, const std::string& where);

// The seed of direction j of a step: the step seed itself for j = 0 (so q = 1 is the
// one-direction run), a Philox derivation of (step seed, j) otherwise.
std::uint64_t direction_seed(std::uint64_t step_seed, int j);

// One forward pass of a step (Note [Update rules], 2).
struct RulePass {
  int direction = 0;    // z of direction_seed(step seed, direction); −1: no perturbation
  int branches = 2;
  float eps = 0;        // branch 0 sees W + eps·z
  float minus = -1.0f;  // branch 1 sees W + minus·eps·z
  // The loss slots the branches write (StepResult::losses): slot 2j is L+_j, slot 2j + 1
  // L−_j (central) ; forward: 2j is L+_j and slot 1 is L0.
  int slot[2] = {0, 1};
};

// The passes that estimate g_j for every direction, and for each direction j the pair of
// loss slots and the eps to give spsa_grad: g_j = (L[a] − L[b]) / (2·e).
struct RuleEstimate {
  std::vector<RulePass> passes;
  struct Grad {
    int a, b;
    float e;
  };
  std::vector<Grad> grads;
  int loss_slots = 2;
  int unperturbed_slot = -1;  // the slot holding L(θ), when a pass computes it
};
RuleEstimate estimate_plan(const RuleConfig& r, float eps);

// zo-sgd-cons: which of θ (L0), θ − lr·g·z (L1) and θ + lr·g·z (L2) to keep, as ZO-Bench
// decides: +1 keeps θ − lr·g·z (the plain step), 0 keeps θ, −1 keeps θ + lr·g·z.
int conservative_choice(float l0, float l1, float l2);

// Adam's bias corrections for step t (1-based): 1 − β^t, computed in double.
float adam_bias(float beta, std::int64_t t);

}  // namespace zo2
