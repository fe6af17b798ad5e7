#include "zo/rule.h"

#include "runtime/error.h"
#include "runtime/philox.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>

namespace zo2 {
namespace {
constexpr std::pair<RuleKind, std::string_view> kRules[] = {
    {RuleKind::sgd, "zo-sgd"},
    {RuleKind::sign, "zo-sgd-sign"},
    {RuleKind::cons, "zo-sgd-cons"},
    {RuleKind::momentum, "zo-sgd-momentum"},
    {RuleKind::adam, "zo-adam"},
};
// A tensor key no weight has (keys are FNV-1a of HF names): direction seeds are drawn
// from the step-seed domain under it, apart from every step seed (key 0).
constexpr std::uint64_t kDirectionKey = 0x6469726563740000ull;  // "direct"
}  // namespace

std::string_view rule_name(RuleKind k) {
  for (const auto& [kind, name] : kRules)
    if (kind == k) return name;
  return "?";
}

std::optional<RuleKind> parse_rule(std::string_view s) {
  for (const auto& [kind, name] : kRules)
    if (name == s) return kind;
  return std::nullopt;
}

std::string_view difference_name(Difference d) { return d == Difference::central ? "central" : "forward"; }

std::optional<Difference> parse_difference(std::string_view s) {
  if (s == "central") return Difference::central;
  if (s == "forward") return Difference::forward;
  return std::nullopt;
}

int RuleConfig::state_buffers() const {
  switch (kind) {
    case RuleKind::momentum: return 1;
    case RuleKind::adam: return 2;
    default: return 0;
  }
}

std::string RuleConfig::describe() const {
  std::string s(rule_name(kind));
  if (kind == RuleKind::momentum)
    s += fmt::format(" (momentum {}, state {})", beta1, dtype_name(state_dtype));
  else if (kind == RuleKind::adam)
    s += fmt::format(" (β1 {}, β2 {}, eps {}, state {})", beta1, beta2, adam_eps, dtype_name(state_dtype));
  s += fmt::format(", {} direction{}, {} difference", directions, directions == 1 ? "" : "s",
                   difference_name(difference));
  return s;
}

void validate_rule(const RuleConfig& r, float weight_decay, bool c_api) {
  // "--state-dtype" on the command line, "state_dtype" in zo2_session_params.
  auto nm = [c_api](std::string_view flag) {
    if (!c_api) return std::string(flag);
    std::string s(flag.substr(2));
    for (char& ch : s)
      if (ch == '-') ch = '_';
    return s;
  };
  if (r.directions < 1 || r.directions > RuleConfig::kMaxDirections)
    fail(ErrorKind::invalid_argument, "{} {}: must lie in [1, {}]", nm("--directions"), r.directions, RuleConfig::kMaxDirections);
  if (r.kind == RuleKind::cons && r.directions != 1)
    fail(ErrorKind::invalid_argument, "{} zo-sgd-cons compares one step's candidates; it takes {} 1, not {}",
         nm("--optimizer"), nm("--directions"), r.directions);
  if (r.kind == RuleKind::cons && weight_decay != 0.0f)
    fail(ErrorKind::invalid_argument,
         "{} zo-sgd-cons compares θ ± lr·g·z without weight decay (as ZO-Bench); {} {} is not supported "
         "with it",
         nm("--optimizer"), nm("--weight-decay"), weight_decay);
  if (r.state_buffers() > 0) {
    if (r.state_dtype != DType::f32 && r.state_dtype != DType::bf16 && r.state_dtype != DType::f8_e4m3)
      fail(ErrorKind::invalid_argument, "{} {}: use fp32, bf16 or fp8", nm("--state-dtype"), dtype_name(r.state_dtype));
    const bool momentum = r.kind == RuleKind::momentum;
    if (!(r.beta1 >= 0.0f && r.beta1 < 1.0f))
      fail(ErrorKind::invalid_argument, "{} {}: must lie in [0, 1)", nm(momentum ? "--momentum" : "--beta1"), r.beta1);
    if (!momentum && !(r.beta2 >= 0.0f && r.beta2 < 1.0f))
      fail(ErrorKind::invalid_argument, "{} {}: must lie in [0, 1)", nm("--beta2"), r.beta2);
    if (!momentum && !(r.adam_eps > 0.0f && std::isfinite(r.adam_eps)))
      fail(ErrorKind::invalid_argument, "{} {}: must be a positive number", nm("--adam-eps"), r.adam_eps);
  }
}

nlohmann::json rule_to_json(const RuleConfig& r) {
  nlohmann::json j = {{"name", rule_name(r.kind)},
                      {"directions", r.directions},
                      {"difference", difference_name(r.difference)}};
  if (r.kind == RuleKind::momentum) j["momentum"] = r.beta1;
  if (r.kind == RuleKind::adam) {
    j["beta1"] = r.beta1;
    j["beta2"] = r.beta2;
    j["adam_eps"] = r.adam_eps;
  }
  if (r.state_buffers() > 0) j["state_dtype"] = dtype_name(r.state_dtype);
  return j;
}

RuleConfig rule_from_json(const nlohmann::json& j, const std::string& where) {
  RuleConfig r;
  if (j.is_null()) return r;
  if (!j.is_object()) fail(ErrorKind::format, "{}: field 'optimizer' must be an object", where);
  auto str = [&](const char* key) -> std::optional<std::string> {
    auto it = j.find(key);
    if (it == j.end()) return std::nullopt;
    if (!it->is_string()) fail(ErrorKind::format, "{}: field 'optimizer.{}' must be a string", where, key);
    return it->get<std::string>();
  };
  auto real = [&](const char* key, float& out) {
    auto it = j.find(key);
    if (it == j.end()) return;
    if (!it->is_number()) fail(ErrorKind::format, "{}: field 'optimizer.{}' must be a number", where, key);
    out = it->get<float>();
  };
  if (auto n = str("name")) {
    auto k = parse_rule(*n);
    if (!k) fail(ErrorKind::format, "{}: field 'optimizer.name' = '{}' is not a known update rule", where, *n);
    r.kind = *k;
  }
  if (auto it = j.find("directions"); it != j.end()) {
    if (!it->is_number_integer()) fail(ErrorKind::format, "{}: field 'optimizer.directions' must be an integer", where);
    const auto q = it->get<std::int64_t>();
    if (q < 1 || q > RuleConfig::kMaxDirections)
      fail(ErrorKind::format, "{}: field 'optimizer.directions' = {} is outside [1, {}]", where, q, RuleConfig::kMaxDirections);
    r.directions = static_cast<int>(q);
  }
  if (auto d = str("difference")) {
    auto v = parse_difference(*d);
    if (!v) fail(ErrorKind::format, "{}: field 'optimizer.difference' = '{}' is neither central nor forward", where, *d);
    r.difference = *v;
  }
  real(r.kind == RuleKind::momentum ? "momentum" : "beta1", r.beta1);
  real("beta2", r.beta2);
  real("adam_eps", r.adam_eps);
  if (auto s = str("state_dtype")) {
    auto dt = dtype_from_name(*s);
    if (!dt) fail(ErrorKind::format, "{}: field 'optimizer.state_dtype' = '{}' is not a dtype", where, *s);
    r.state_dtype = *dt;
  }
  try {
    validate_rule(r, 0.0f);
  } catch (const Error& e) {
    fail(ErrorKind::format, "{}: field 'optimizer': {}", where, e.what());
  }
  return r;
}

std::uint64_t direction_seed(std::uint64_t step_seed, int j) {
  if (j == 0) return step_seed;
  const Philox4 r = noise_bits(step_seed, kDirectionKey, static_cast<std::uint64_t>(j), NoiseDomain::step_seed);
  return (static_cast<std::uint64_t>(r.y) << 32) | r.x;
}

RuleEstimate estimate_plan(const RuleConfig& r, float eps) {
  RuleEstimate e;
  const int q = r.directions;
  if (r.difference == Difference::central) {
    for (int j = 0; j < q; ++j) {
      RulePass p;
      p.direction = j;
      p.branches = 2;
      p.eps = eps;
      p.minus = -1.0f;
      p.slot[0] = 2 * j;
      p.slot[1] = 2 * j + 1;
      e.passes.push_back(p);
      e.grads.push_back({2 * j, 2 * j + 1, eps});
    }
    e.loss_slots = 2 * q;
  } else {
    // Slot 1 is L0 (direction 0's second branch); slot 2j holds L+_j.
    const float half = eps * 0.5f;  // (L+ − L0) / (2·(eps/2)) = (L+ − L0) / eps
    for (int j = 0; j < q; ++j) {
      RulePass p;
      p.direction = j;
      p.eps = eps;
      if (j == 0) {
        p.branches = 2;
        p.minus = 0.0f;
        p.slot[0] = 0;
        p.slot[1] = 1;
      } else {
        p.branches = 1;
        p.slot[0] = 2 * j;
        p.slot[1] = -1;
      }
      e.passes.push_back(p);
      e.grads.push_back({2 * j, 1, half});
    }
    e.loss_slots = 2 * q;
    e.unperturbed_slot = 1;
  }
  return e;
}

int conservative_choice(float l0, float l1, float l2) {
  // A non-finite candidate loses every comparison (as +inf would).
  const float inf = INFINITY;
  const float a = std::isfinite(l0) ? l0 : inf, b = std::isfinite(l1) ? l1 : inf, c = std::isfinite(l2) ? l2 : inf;
  if (!std::isfinite(l1) && !std::isfinite(l2)) return 0;
  if (b > a) return a < c ? 0 : -1;
  return b < c ? 1 : -1;
}

float adam_bias(float beta, std::int64_t t) {
  return static_cast<float>(1.0 - std::pow(static_cast<double>(beta), static_cast<double>(t)));
}

}  // namespace zo2
