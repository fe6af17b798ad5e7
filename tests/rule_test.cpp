// The update rules (zo/rule.h, Note [Update rules]) through the real scheduler on a tiny
// model: each rule's weights after several steps equal a plain double-precision
// reference written here (its own forward, its own rule arithmetic); streamed == resident
// bit for bit for each rule (fp32), optimizer state included; replay of the seed log
// rebuilds the weights (and momentum/Adam state) bit for bit; q directions cut the
// estimate's variance as 1/q on a known quadratic; the log and state files are checked.
#include "api/session.h"
#include "models/layout.h"
#include "runtime/error.h"
#include "runtime/philox.h"
#include "tests/reference_model.h"
#include "tests/test_util.h"
#include "zo/rule.h"
#include "zo/seed_log.h"
#include "zo/tensor_key.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <numeric>

namespace zo2 {
namespace {

ModelConfig tiny_llama(std::int64_t layers = 3) { return test::small_llama(layers); }

ModelConfig tiny_opt(std::int64_t layers = 3) { return test::small_opt(layers); }

constexpr int kBatch = 2, kSeq = 12;

std::vector<HostBatch> batches(const ModelConfig& c, int n) {
  return test::patterned_batches(c, n, kBatch, kSeq, /*padded=*/2, /*mul=*/5, /*step=*/11);
}

struct Case {
  std::string name;
  RuleConfig rule;
  float lr, wd;
};
// gtest prints a failing case's parameter as its bytes by default (padding included); its
// name says which case it is.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

RuleConfig rule_of(RuleKind k, int q = 1, Difference d = Difference::central, DType state = DType::f32) {
  RuleConfig r;
  r.kind = k;
  r.directions = q;
  r.difference = d;
  r.state_dtype = state;
  if (k == RuleKind::momentum) r.beta1 = 0.8f;
  return r;
}

std::vector<Case> cases() {
  return {
      {"sgd_q1", rule_of(RuleKind::sgd), 2e-3f, 0.05f},
      {"sgd_q3", rule_of(RuleKind::sgd, 3), 2e-3f, 0.05f},
      {"sgd_forward_q2", rule_of(RuleKind::sgd, 2, Difference::forward), 2e-3f, 0.05f},
      {"sign", rule_of(RuleKind::sign, 2), 1e-3f, 0.05f},
      {"cons", rule_of(RuleKind::cons), 2e-2f, 0.0f},
      {"cons_forward", rule_of(RuleKind::cons, 1, Difference::forward), 2e-2f, 0.0f},
      {"momentum", rule_of(RuleKind::momentum, 2), 1e-3f, 0.05f},
      {"adam", rule_of(RuleKind::adam), 1e-3f, 0.05f},
      {"adam_forward_q2", rule_of(RuleKind::adam, 2, Difference::forward), 1e-3f, 0.0f},
  };
}

constexpr float kEps = 1e-3f;

struct RuleRun {
  std::vector<StepResult> steps;
  std::vector<std::vector<std::uint8_t>> images;  // globals, blocks: weights and state
  Placement placement;
};

std::vector<std::uint8_t> bytes_of(const void* p, std::size_t n) {
  const auto* b = static_cast<const std::uint8_t*>(p);
  return {b, b + n};
}

RuleRun train(const std::filesystem::path& dir, const Case& c, SessionConfig cfg, int steps,
          const std::filesystem::path& seed_log = {}) {
  const ModelConfig mc = ModelConfig::load(dir);
  cfg.max_batch = kBatch;
  cfg.max_seq = kSeq;
  cfg.run_seed = 21;
  cfg.rule = c.rule;
  cfg.seed_log = seed_log;
  Session s(dir, cfg);
  const auto data = batches(mc, 3);
  RuleRun r;
  std::int64_t prev = -1;
  for (int t = 0; t < steps; ++t) {
    const std::int64_t id = s.step_async(data[static_cast<std::size_t>(t) % data.size()], c.lr, kEps, c.wd);
    if (prev >= 0) r.steps.push_back(s.wait(prev));
    prev = id;
  }
  r.steps.push_back(s.wait(prev));
  s.sync();
  r.images.push_back(bytes_of(s.store().globals_image(), s.store().globals_stream_bytes()));
  for (std::int64_t i = 0; i < mc.num_layers; ++i)
    r.images.push_back(bytes_of(s.store().block_image(i), s.store().stream_bytes()));
  r.placement = s.placement();
  return r;
}

class Rules : public ::testing::TestWithParam<Case> {};

// Streamed (every block through the window) and resident runs execute the same kernels in
// the same order: the same bits, the rule's state included.
TEST_P(Rules, StreamedEqualsResidentBitwise) {
  const Case& c = GetParam();
  for (const ModelConfig& mc : {tiny_opt(), tiny_llama()}) {
    test::TempDir tmp;
    test::write_random_checkpoint(tmp.path(), mc, 3);
    SessionConfig streamed;
    streamed.offload = OffloadMode::all;
    streamed.window = 2;
    streamed.gpu_mem = std::size_t{1} << 30;
    SessionConfig resident;
    resident.offload = OffloadMode::none;
    const RuleRun a = train(tmp.path(), c, streamed, 5);
    const RuleRun b = train(tmp.path(), c, resident, 5);
    ASSERT_EQ(a.placement.resident_count, 0);
    ASSERT_EQ(b.placement.streamed, 0);
    ASSERT_EQ(a.steps.size(), b.steps.size());
    for (std::size_t i = 0; i < a.steps.size(); ++i) {
      EXPECT_EQ(a.steps[i].losses, b.steps[i].losses) << c.name << " step " << i;
      EXPECT_EQ(a.steps[i].gs, b.steps[i].gs) << c.name << " step " << i;
      EXPECT_EQ(a.steps[i].choice, b.steps[i].choice) << c.name << " step " << i;
    }
    for (std::size_t i = 0; i < a.images.size(); ++i)
      EXPECT_TRUE(a.images[i] == b.images[i]) << c.name << " (" << mc.family_name() << "): image " << i << " differs";
    // The planner's bytes per step are the scheduler's (a steady step; less the batch's ids,
    // mask, positions and targets).
    const std::size_t batch_bytes = 4 * sizeof(std::int32_t) * kBatch * kSeq;
    EXPECT_EQ(a.steps[2].h2d_bytes - batch_bytes, a.placement.h2d_bytes_per_step) << c.name;
    if (c.rule.kind == RuleKind::cons)  // a step after one that kept θ has nothing to write back
      EXPECT_LE(a.steps[2].d2h_bytes, a.placement.d2h_bytes_per_step) << c.name;
    else
      EXPECT_EQ(a.steps[2].d2h_bytes, a.placement.d2h_bytes_per_step) << c.name;
    // Something moved: the weights are not the checkpoint's.
    Session base(tmp.path(), SessionConfig{});
    EXPECT_FALSE(bytes_of(base.store().block_image(0), base.store().block_bytes()) ==
                 std::vector<std::uint8_t>(a.images[1].begin(), a.images[1].begin() + static_cast<std::ptrdiff_t>(base.store().block_bytes())))
        << c.name;
  }
}

// The seed log alone rebuilds the run: weights and (momentum/Adam) state, bit for bit.
TEST_P(Rules, SeedLogReplayRebuildsWeightsAndStateBitwise) {
  const Case& c = GetParam();
  test::TempDir tmp;
  const ModelConfig mc = tiny_llama();
  test::write_random_checkpoint(tmp.path(), mc, 4);
  SessionConfig cfg;
  cfg.offload = OffloadMode::all;
  cfg.gpu_mem = std::size_t{1} << 30;
  const RuleRun run = train(tmp.path(), c, cfg, 6, tmp / "seed_log.jsonl");
  const SeedLog log = SeedLog::read(tmp / "seed_log.jsonl");
  ASSERT_EQ(log.entries.size(), 6u);
  EXPECT_EQ(log.header.rule, c.rule);
  SessionConfig rc;
  rc.training = false;
  rc.max_batch = 1;
  rc.max_seq = 1;
  rc.rule = log.header.rule;
  Session replay(tmp.path(), rc);
  for (const SeedLogEntry& e : log.entries)
    replay.scheduler().replay_update(e.step, e.seed, e.lr, e.wd, e.gs.empty() ? std::vector<float>{e.g} : e.gs,
                                     e.choice);
  replay.sync();
  EXPECT_TRUE(run.images[0] == bytes_of(replay.store().globals_image(), replay.store().globals_stream_bytes())) << c.name;
  for (std::int64_t i = 0; i < mc.num_layers; ++i)
    EXPECT_TRUE(run.images[static_cast<std::size_t>(i) + 1] ==
                bytes_of(replay.store().block_image(i), replay.store().stream_bytes()))
        << c.name << ": block " << i;
}

// ---- the reference: fp64 forward (tests/reference_model.cpp), fp32 master weights, and the
// rule's arithmetic written out here ----

struct RefState {
  std::map<std::string, std::vector<double>> m, v;
};

TEST_P(Rules, MatchesAPlainDoublePrecisionReference) {
  const Case& c = GetParam();
  test::TempDir tmp;
  const ModelConfig mc = tiny_llama();
  test::write_random_checkpoint(tmp.path(), mc, 5);
  SessionConfig cfg;
  cfg.offload = OffloadMode::all;
  cfg.gpu_mem = std::size_t{1} << 30;
  const int steps = 4;
  const RuleRun run = train(tmp.path(), c, cfg, steps);

  test::ReferenceModel ref(tmp.path());
  auto& w = ref.weights();
  std::map<std::string, std::vector<double>> master;
  for (auto& [name, vals] : w) master[name] = vals;
  RefState st;
  for (auto& [name, vals] : master) {
    st.m[name].assign(vals.size(), 0.0);
    st.v[name].assign(vals.size(), 0.0);
  }
  const auto data = batches(mc, 3);
  const RuleConfig& r = c.rule;
  const int q = r.directions;
  auto loss_at = [&](const HostBatch& b, std::uint64_t seed, double scale) {
    for (auto& [name, vals] : master) {
      auto& dst = w[name];
      const std::uint64_t key = tensor_key(name);
      for (std::size_t i = 0; i < vals.size(); ++i)
        dst[i] = vals[i] + (scale == 0.0 ? 0.0 : scale * static_cast<double>(noise_normal(seed, key, i)));
    }
    return ref.forward(b.batch, b.seq, b.ids, b.key_mask).loss;
  };
  for (int t = 0; t < steps; ++t) {
    const std::uint64_t seed = derive_step_seed(21, static_cast<std::uint64_t>(t));
    const HostBatch& b = data[static_cast<std::size_t>(t) % data.size()];
    std::vector<double> g(static_cast<std::size_t>(q));
    const double l0 = r.difference == Difference::forward || r.kind == RuleKind::cons ? loss_at(b, seed, 0.0) : 0.0;
    for (int j = 0; j < q; ++j) {
      const std::uint64_t sj = direction_seed(seed, j);
      const double lp = loss_at(b, sj, kEps);
      g[static_cast<std::size_t>(j)] =
          r.difference == Difference::central ? (lp - loss_at(b, sj, -kEps)) / (2.0 * kEps) : (lp - l0) / kEps;
      EXPECT_NEAR(run.steps[static_cast<std::size_t>(t)].gs[static_cast<std::size_t>(j)], g[static_cast<std::size_t>(j)],
                  3e-3 * std::max(1.0, std::fabs(g[static_cast<std::size_t>(j)])))
          << c.name << " step " << t << " direction " << j;
    }
    // The update uses zo2's own g_j (checked against the reference's just above): Adam and
    // sign steps are ±lr per element for small estimates, so a g that differs in its last
    // bits could flip an element whose estimate cancels to nearly zero.
    for (int j = 0; j < q; ++j) g[static_cast<std::size_t>(j)] = run.steps[static_cast<std::size_t>(t)].gs[static_cast<std::size_t>(j)];
    double coef = 1.0;  // zo-sgd-cons: the kept candidate
    if (r.kind == RuleKind::cons) {
      const double l1 = loss_at(b, seed, -static_cast<double>(c.lr) * g[0]);
      const double l2 = loss_at(b, seed, static_cast<double>(c.lr) * g[0]);
      const int choice = l1 > l0 ? (l0 < l2 ? 0 : -1) : (l1 < l2 ? 1 : -1);
      EXPECT_EQ(run.steps[static_cast<std::size_t>(t)].choice, choice) << c.name << " step " << t;
      coef = choice;
    }
    const double bias1 = 1.0 - std::pow(static_cast<double>(r.beta1), t + 1);
    const double bias2 = 1.0 - std::pow(static_cast<double>(r.beta2), t + 1);
    for (auto& [name, vals] : master) {
      const double wd = name.find("norm") != std::string::npos ? 0.0 : c.wd;
      const std::uint64_t key = tensor_key(name);
      auto& m = st.m[name];
      auto& v = st.v[name];
      for (std::size_t i = 0; i < vals.size(); ++i) {
        double u = 0;
        switch (r.kind) {
          case RuleKind::sgd:
          case RuleKind::sign:
          case RuleKind::cons:
            for (int j = 0; j < q; ++j) {  // one update per direction, lr/q each, in order
              double gj = g[static_cast<std::size_t>(j)] * coef;
              if (r.kind == RuleKind::sign) gj = gj > 0 ? 1.0 : (gj < 0 ? -1.0 : 0.0);
              const double z = noise_normal(direction_seed(seed, j), key, i);
              vals[i] -= static_cast<double>(c.lr) / q * (gj * z + wd * vals[i]);
            }
            break;
          case RuleKind::momentum:
          case RuleKind::adam:
            u = wd * vals[i];
            for (int j = 0; j < q; ++j)
              u += g[static_cast<std::size_t>(j)] / q * noise_normal(direction_seed(seed, j), key, i);
            if (r.kind == RuleKind::momentum) {
              m[i] = r.beta1 * m[i] + u;
              vals[i] -= c.lr * m[i];
            } else {
              m[i] = r.beta1 * m[i] + (1.0 - r.beta1) * u;
              v[i] = r.beta2 * v[i] + (1.0 - r.beta2) * u * u;
              vals[i] -= c.lr / bias1 * m[i] / (std::sqrt(v[i]) / std::sqrt(bias2) + r.adam_eps);
            }
            break;
        }
      }
    }
  }
  // zo2's final weights against the reference's.
  double max_diff = 0, max_moved = 0;
  test::ReferenceModel orig(tmp.path());
  auto compare = [&](const ImageLayout& layout, const std::vector<std::uint8_t>& image) {
    for (const TensorSlot& s : layout.tensors()) {
      const auto* p = reinterpret_cast<const float*>(image.data() + s.offset);
      const auto& m = master.at(s.name);
      const auto& o = orig.weights().at(s.name);
      for (std::size_t i = 0; i < m.size(); ++i) {
        max_diff = std::max(max_diff, std::fabs(static_cast<double>(p[i]) - m[i]));
        max_moved = std::max(max_moved, std::fabs(o[i] - m[i]));
      }
    }
  };
  compare(globals_layout(mc, DType::f32), run.images[0]);
  for (std::int64_t i = 0; i < mc.num_layers; ++i)
    compare(block_layout(mc, i, DType::f32), run.images[static_cast<std::size_t>(i) + 1]);
  EXPECT_GT(max_moved, 1e-4) << c.name << ": the reference weights should have moved";
  EXPECT_LT(max_diff, 2e-5) << c.name << ": largest weight difference from the reference (moved up to " << max_moved
                            << ")";
}

INSTANTIATE_TEST_SUITE_P(Each, Rules, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

// Narrow state dtypes run through the same streaming, streamed == resident.
TEST(RulesState, Bf16AndFp8StateStreamedEqualsResident) {
  for (DType sd : {DType::bf16, DType::f8_e4m3}) {
    test::TempDir tmp;
    test::write_random_checkpoint(tmp.path(), tiny_opt(), 3);
    const Case c{"adam", rule_of(RuleKind::adam, 1, Difference::central, sd), 1e-3f, 0.01f};
    SessionConfig streamed;
    streamed.offload = OffloadMode::all;
    streamed.gpu_mem = std::size_t{1} << 30;
    SessionConfig resident;
    resident.offload = OffloadMode::none;
    const RuleRun a = train(tmp.path(), c, streamed, 4);
    const RuleRun b = train(tmp.path(), c, resident, 4);
    for (std::size_t i = 0; i < a.images.size(); ++i)
      EXPECT_TRUE(a.images[i] == b.images[i]) << dtype_name(sd) << ": image " << i;
    // The state is smaller than fp32 state: the planner counts it.
    EXPECT_LT(a.placement.state_block_bytes, 2 * block_layout(tiny_opt(), 0, DType::f32).bytes()) << dtype_name(sd);
    EXPECT_GT(a.placement.state_block_bytes, 0u);
  }
}

// Streaming moves the state with the block: bytes per step grow by it, and the plan says so.
TEST(RulesState, ThePlannerCountsStateInTheWindowAndOnTheLink) {
  const ModelConfig mc = tiny_opt(4);
  SessionConfig cfg;
  cfg.offload = OffloadMode::all;
  cfg.max_batch = kBatch;
  cfg.max_seq = kSeq;
  const std::size_t cap = std::size_t{1} << 30;
  const Placement sgd = plan_placement(mc, plan_request(mc, cfg, DeviceKind::cpu, cap));
  cfg.rule = rule_of(RuleKind::adam);
  const Placement adam = plan_placement(mc, plan_request(mc, cfg, DeviceKind::cpu, cap));
  const std::size_t w = block_layout(mc, 0, DType::f32).bytes();
  EXPECT_EQ(sgd.block_bytes, w);
  EXPECT_EQ(adam.state_block_bytes, 2 * ((w + 255) / 256 * 256));
  EXPECT_EQ(adam.block_bytes, (w + 255) / 256 * 256 + adam.state_block_bytes);
  EXPECT_EQ(adam.h2d_bytes_per_step, 4 * adam.block_bytes);
  EXPECT_EQ(adam.d2h_bytes_per_step, 4 * adam.block_bytes);
  EXPECT_GT(adam.host_bytes, 2 * sgd.host_bytes);
  EXPECT_NE(adam.describe(mc).find("optimizer state"), std::string::npos);
  cfg.rule = rule_of(RuleKind::adam, 2);  // the second pass leaves the state on the host
  const Placement adam2 = plan_placement(mc, plan_request(mc, cfg, DeviceKind::cpu, cap));
  EXPECT_EQ(adam2.h2d_bytes_per_step, 4 * (adam.block_bytes + w));
  EXPECT_EQ(adam2.d2h_bytes_per_step, 4 * adam.block_bytes);
  cfg.rule = rule_of(RuleKind::sgd, 3);
  const Placement q3 = plan_placement(mc, plan_request(mc, cfg, DeviceKind::cpu, cap));
  EXPECT_EQ(q3.passes, 3);
  EXPECT_EQ(q3.h2d_bytes_per_step, 3 * 4 * w);
  EXPECT_EQ(q3.d2h_bytes_per_step, 4 * w);  // only the first pass writes the blocks back
}

// The state file: saved with a checkpoint, loaded for a resume, refused when it does not fit.
TEST(RulesState, StateFileRoundTripsAndMismatchesAreRefused) {
  test::TempDir tmp;
  const ModelConfig mc = tiny_opt();
  test::write_random_checkpoint(tmp.path(), mc, 3);
  const Case c{"momentum", rule_of(RuleKind::momentum, 1, Difference::central, DType::f8_e4m3), 1e-3f, 0.0f};
  SessionConfig cfg;
  cfg.max_batch = kBatch;
  cfg.max_seq = kSeq;
  cfg.rule = c.rule;
  Session s(tmp.path(), cfg);
  const auto data = batches(mc, 1);
  for (int t = 0; t < 3; ++t) s.step(data[0], c.lr, kEps, c.wd);
  s.sync();
  s.store().save_state(tmp / "state.safetensors");
  const auto before = bytes_of(s.store().block_image(1), s.store().stream_bytes());
  s.store().clear_state();
  EXPECT_FALSE(before == bytes_of(s.store().block_image(1), s.store().stream_bytes()));
  s.store().load_state(tmp / "state.safetensors");
  EXPECT_TRUE(before == bytes_of(s.store().block_image(1), s.store().stream_bytes()));
  // Another state dtype, or another rule, cannot take it.
  SessionConfig other = cfg;
  other.rule.state_dtype = DType::bf16;
  Session o(tmp.path(), other);
  try {
    o.store().load_state(tmp / "state.safetensors");
    FAIL() << "a bf16 store loaded fp8 state";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::format);
    EXPECT_NE(std::string(e.what()).find("state.safetensors"), std::string::npos) << e.what();
  }
  SessionConfig adam = cfg;
  adam.rule = rule_of(RuleKind::adam, 1, Difference::central, DType::f8_e4m3);
  Session a(tmp.path(), adam);
  EXPECT_THROW(a.store().load_state(tmp / "state.safetensors"), Error);
}

// MeZO's n-SPSA: the estimate ĝ = (1/q)·Σ_j g_j·z_j of a quadratic's gradient, with the
// rule's direction seeds, z and difference formula, has a variance that falls as 1/q.
TEST(RulesDirections, EstimateVarianceFallsAsOneOverQ) {
  constexpr int d = 40, trials = 1500;
  std::vector<double> a(d), theta(d);
  for (int i = 0; i < d; ++i) {
    a[static_cast<std::size_t>(i)] = 0.5 + 0.05 * i;
    theta[static_cast<std::size_t>(i)] = std::sin(1.0 + i);
  }
  auto f = [&](const std::vector<double>& x) {
    double s = 0;
    for (int i = 0; i < d; ++i) s += 0.5 * a[static_cast<std::size_t>(i)] * x[static_cast<std::size_t>(i)] * x[static_cast<std::size_t>(i)];
    return s;
  };
  const std::uint64_t key = tensor_key("quadratic.weight");
  auto variance = [&](int q) {
    RuleConfig r;
    r.directions = q;
    const RuleEstimate est = estimate_plan(r, 1e-3f);
    EXPECT_EQ(static_cast<int>(est.grads.size()), q);
    double total = 0;
    for (int t = 0; t < trials; ++t) {
      const std::uint64_t step_seed = derive_step_seed(99, static_cast<std::uint64_t>(t));
      std::vector<double> ghat(d, 0.0);
      for (int j = 0; j < q; ++j) {
        const std::uint64_t s = direction_seed(step_seed, j);
        std::vector<double> p = theta, m = theta;
        for (int i = 0; i < d; ++i) {
          const double z = noise_normal(s, key, static_cast<std::uint64_t>(i));
          p[static_cast<std::size_t>(i)] += est.passes[static_cast<std::size_t>(j)].eps * z;
          m[static_cast<std::size_t>(i)] += est.passes[static_cast<std::size_t>(j)].minus * est.passes[static_cast<std::size_t>(j)].eps * z;
        }
        const double g = (f(p) - f(m)) / (2.0 * est.grads[static_cast<std::size_t>(j)].e);
        for (int i = 0; i < d; ++i)
          ghat[static_cast<std::size_t>(i)] += g / q * noise_normal(s, key, static_cast<std::uint64_t>(i));
      }
      for (int i = 0; i < d; ++i) {
        const double e = ghat[static_cast<std::size_t>(i)] - a[static_cast<std::size_t>(i)] * theta[static_cast<std::size_t>(i)];
        total += e * e;
      }
    }
    return total / trials;
  };
  const double v1 = variance(1), v2 = variance(2), v8 = variance(8);
  EXPECT_NEAR(v1 / v2, 2.0, 0.3) << v1 << " " << v2;
  EXPECT_NEAR(v1 / v8, 8.0, 1.2) << v1 << " " << v8;
  // Distinct directions: a step's direction seeds differ from each other and from other
  // steps' seeds.
  const std::uint64_t s0 = derive_step_seed(99, 3);
  EXPECT_EQ(direction_seed(s0, 0), s0);
  EXPECT_NE(direction_seed(s0, 1), s0);
  EXPECT_NE(direction_seed(s0, 1), direction_seed(s0, 2));
  EXPECT_NE(direction_seed(s0, 1), derive_step_seed(99, 4));
}

TEST(RulesConservative, TheChoiceFollowsZoBenchAndNeverPicksANonFiniteLoss) {
  EXPECT_EQ(conservative_choice(2.0f, 1.0f, 3.0f), 1);   // θ − lr·g·z is best
  EXPECT_EQ(conservative_choice(2.0f, 3.0f, 1.0f), -1);  // θ + lr·g·z is best
  EXPECT_EQ(conservative_choice(1.0f, 3.0f, 2.0f), 0);   // keep θ
  EXPECT_EQ(conservative_choice(1.0f, NAN, NAN), 0);
  EXPECT_EQ(conservative_choice(1.0f, NAN, 0.5f), -1);
  EXPECT_EQ(conservative_choice(1.0f, 0.5f, INFINITY), 1);
}

TEST(RulesConfig, BadCombinationsAreRefusedNamingTheFlagOrField) {
  auto message = [](const RuleConfig& r, float wd, bool c_api) {
    try {
      validate_rule(r, wd, c_api);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
      return std::string(e.what());
    }
    return std::string();
  };
  RuleConfig r;
  r.directions = 0;
  EXPECT_NE(message(r, 0, false).find("--directions 0"), std::string::npos);
  EXPECT_NE(message(r, 0, true).find("directions 0"), std::string::npos);
  r.directions = 65;
  EXPECT_NE(message(r, 0, false).find("--directions 65"), std::string::npos);
  r = rule_of(RuleKind::cons, 2);
  EXPECT_NE(message(r, 0, false).find("--directions 1"), std::string::npos);
  r = rule_of(RuleKind::cons);
  EXPECT_NE(message(r, 0.1f, false).find("--weight-decay"), std::string::npos);
  EXPECT_NE(message(r, 0.1f, true).find("weight_decay"), std::string::npos);
  r = rule_of(RuleKind::adam);
  r.beta2 = 1.0f;
  EXPECT_NE(message(r, 0, false).find("--beta2 1"), std::string::npos);
  r = rule_of(RuleKind::momentum);
  r.beta1 = -0.1f;
  EXPECT_NE(message(r, 0, false).find("--momentum"), std::string::npos);
  r = rule_of(RuleKind::adam, 1, Difference::central, DType::f16);
  EXPECT_NE(message(r, 0, true).find("state_dtype fp16"), std::string::npos);
  EXPECT_EQ(message(rule_of(RuleKind::adam, 4, Difference::forward, DType::bf16), 0.1f, false), "");
}

// ---- the seed log carries what replay needs ----

std::filesystem::path write_log(const std::filesystem::path& dir, const std::string& header, const std::string& line) {
  const auto p = dir / "seed_log.jsonl";
  std::ofstream(p) << header << "\n" << line << "\n";
  return p;
}

TEST(RulesSeedLog, HeadersAndLinesAreCheckedPerRule) {
  test::TempDir tmp;
  const std::uint64_t seed0 = derive_step_seed(7, 0);
  const std::string line = fmt::format(R"({{"step":0,"seed":{},"g":0.5,"lr":0.001,"eps":0.001,"wd":0)", seed0);
  auto expect_format_error = [&](const std::string& header, const std::string& l, const char* needle) {
    try {
      SeedLog::read(write_log(tmp.path(), header, l));
      ADD_FAILURE() << "accepted: " << header << " / " << l;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::format);
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const std::string h2 = R"({"zo2_seed_log":1,"run_seed":7,"optimizer":{"name":"zo-sgd","directions":2,"difference":"central"}})";
  expect_format_error(h2, line + "}", "'gs'");
  expect_format_error(h2, line + R"(,"gs":[0.5]})", "'gs'");
  expect_format_error(h2, line + R"(,"gs":[0.25,1.0]})", "'gs'[0]");
  const SeedLog ok = SeedLog::read(write_log(tmp.path(), h2, line + R"(,"gs":[0.5,"nan"]})"));
  ASSERT_EQ(ok.entries[0].gs.size(), 2u);
  EXPECT_TRUE(std::isnan(ok.entries[0].gs[1]));
  EXPECT_EQ(ok.header.rule.directions, 2);
  const std::string hc = R"({"zo2_seed_log":1,"run_seed":7,"optimizer":{"name":"zo-sgd-cons"}})";
  expect_format_error(hc, line + "}", "'choice'");
  expect_format_error(hc, line + R"(,"choice":2})", "'choice' = 2");
  EXPECT_EQ(SeedLog::read(write_log(tmp.path(), hc, line + R"(,"choice":-1})")).entries[0].choice, -1);
  expect_format_error(R"({"zo2_seed_log":1,"run_seed":7})", line + R"(,"choice":1})", "'choice'");
  expect_format_error(R"({"zo2_seed_log":1,"run_seed":7,"optimizer":{"name":"zo-lion"}})", line + "}", "zo-lion");
  expect_format_error(R"({"zo2_seed_log":1,"run_seed":7,"optimizer":{"name":"zo-adam","beta2":1.5}})", line + "}",
                      "beta2");
  expect_format_error(R"({"zo2_seed_log":1,"run_seed":7,"optimizer":{"name":"zo-sgd","directions":99}})", line + "}",
                      "directions");
}

TEST(RulesSeedLog, AppendingWithAnotherRuleIsRefused) {
  test::TempDir tmp;
  SeedLogHeader h;
  h.run_seed = 3;
  h.rule = rule_of(RuleKind::adam);
  {
    SeedLogWriter w(tmp / "log.jsonl", h, false);
  }
  SeedLogHeader other = h;
  other.rule = rule_of(RuleKind::momentum);
  try {
    SeedLogWriter w(tmp / "log.jsonl", other, true, 0);
    FAIL() << "appended with another rule";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("zo-adam"), std::string::npos) << e.what();
  }
  // A plain zo-sgd log's header is what it was before rules existed: no "optimizer" key.
  SeedLogHeader plain;
  plain.run_seed = 3;
  { SeedLogWriter w(tmp / "plain.jsonl", plain, false); }
  std::ifstream in(tmp / "plain.jsonl");
  std::string first;
  std::getline(in, first);
  EXPECT_EQ(first.find("optimizer"), std::string::npos) << first;
}

}  // namespace
}  // namespace zo2
