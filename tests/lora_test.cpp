// LoRA under ZO (models/peft.h, Note [LoRA under ZO]) through the real scheduler: the
// forward with an adapter equals the forward of the merged checkpoint; the base stays
// frozen and streamed blocks are never written back; streamed == resident bit for bit per
// rule; an adapter saved by zo2 has PEFT's files, keys and config fields, and one reloaded
// continues the run exactly.
#include "api/run_dir.h"
#include "api/session.h"
#include "models/safetensors.h"
#include "runtime/error.h"
#include "tests/reference_model.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>

namespace zo2 {
namespace {

namespace fs = std::filesystem;

ModelConfig tiny(ModelFamily f) {
  ModelConfig c;
  c.family = f;
  c.vocab_size = f == ModelFamily::opt ? 61 : 67;
  c.hidden_size = 32;
  c.num_layers = 3;
  c.num_heads = 4;
  c.num_kv_heads = f == ModelFamily::opt ? 4 : 2;
  c.head_dim = 8;
  c.ffn_dim = 48;
  c.max_positions = 32;
  c.word_embed_proj_dim = 32;
  if (f == ModelFamily::llama) {
    c.linear_bias = false;
    c.tie_word_embeddings = false;
    c.rope.type = RopeType::default_;
    c.norm_eps = 1e-6f;
  }
  return c;
}

constexpr int kBatch = 2, kSeq = 10;

HostBatch batch(const ModelConfig& c, int b) {
  std::vector<std::int32_t> ids(kBatch * kSeq), mask(kBatch * kSeq, 1);
  for (int i = 0; i < kBatch * kSeq; ++i)
    ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i * 3 + b * 7 + i * i) % c.vocab_size);
  mask[kBatch * kSeq - 1] = 0;
  return make_batch(c, kBatch, kSeq, ids, mask);
}

PeftConfig lora(ModelFamily f) {
  PeftConfig p;
  p.lora = true;
  p.r = 4;
  p.alpha = 8;
  // A plain layer, one feeding the residual stream, and (OPT) one under a ReLU.
  p.targets = f == ModelFamily::opt ? std::vector<std::string>{"q_proj", "v_proj", "out_proj", "fc1"}
                                    : std::vector<std::string>{"q_proj", "v_proj", "o_proj", "down_proj"};
  if (const char* t = std::getenv("ZO2_TEST_LORA_TARGETS")) p.targets = parse_lora_targets(t);
  return p;
}

SessionConfig train_cfg(ModelFamily f, OffloadMode mode, RuleKind rule = RuleKind::sgd) {
  SessionConfig s;
  s.offload = mode;
  s.gpu_mem = std::size_t{1} << 30;
  s.window = 2;
  s.max_batch = kBatch;
  s.max_seq = kSeq;
  s.run_seed = 17;
  s.peft = lora(f);
  s.rule.kind = rule;
  return s;
}

std::vector<std::uint8_t> bytes_of(const void* p, std::size_t n) {
  const auto* b = static_cast<const std::uint8_t*>(p);
  return {b, b + n};
}

struct LoraRun {
  std::vector<std::vector<std::uint8_t>> adapters, blocks;
  std::vector<StepResult> steps;
  TransferTotals totals;
};

LoraRun train(const fs::path& dir, SessionConfig cfg, int steps, float lr, int first = 0,
              const fs::path& save_to = {}) {
  const ModelConfig c = ModelConfig::load(dir);
  cfg.first_step = first;
  Session s(dir, cfg);
  const TransferTotals t0 = s.scheduler().totals();
  LoraRun r;
  const float wd = cfg.rule.kind == RuleKind::cons ? 0.0f : 0.01f;  // cons takes no weight decay
  for (int t = first; t < first + steps; ++t) r.steps.push_back(s.step(batch(c, t % 3), lr, 1e-3f, wd));
  s.sync();
  const TransferTotals t1 = s.scheduler().totals();
  r.totals = {t1.h2d_bytes - t0.h2d_bytes, t1.d2h_bytes - t0.d2h_bytes, t1.uploads - t0.uploads,
              t1.offloads - t0.offloads};
  for (std::int64_t i = 0; i < c.num_layers; ++i) {
    r.adapters.push_back(bytes_of(s.adapters()->image(i), s.adapters()->image_bytes()));
    r.blocks.push_back(bytes_of(s.store().block_image(i), s.store().block_bytes()));
  }
  if (!save_to.empty()) s.save(save_to, DType::f32, std::uint64_t{1} << 30);
  return r;
}

class LoraFamilies : public ::testing::TestWithParam<ModelFamily> {
 protected:
  void SetUp() override {
    config = tiny(GetParam());
    test::write_random_checkpoint(tmp / "base", config, 9);
  }
  test::TempDir tmp;
  ModelConfig config;
};

TEST_P(LoraFamilies, ForwardWithTheAdapterEqualsTheMergedCheckpoint) {
  const LoraRun run = train(tmp / "base", train_cfg(GetParam(), OffloadMode::all), 6, 5e-3f, 0, tmp / "run");
  const fs::path adapter = resolve_model_dir(tmp / "run");
  // B started at zero: the steps made it nonzero, so the adapter changes the output.
  std::vector<std::int32_t> ids(kBatch * kSeq), mask(kBatch * kSeq, 1);
  for (int i = 0; i < kBatch * kSeq; ++i) ids[static_cast<std::size_t>(i)] = (i * 11 + 5) % static_cast<int>(config.vocab_size);
  SessionConfig with;
  with.peft = lora(GetParam());
  with.adapter_dir = adapter;
  const auto a = test::run_forward(tmp / "base", kBatch, kSeq, ids, mask, with);
  const auto plain = test::run_forward(tmp / "base", kBatch, kSeq, ids, mask);
  // The merged checkpoint, as `zo2-tune merge` writes it.
  {
    SessionConfig ec;
    ec.training = false;
    ec.max_batch = 1;
    ec.max_seq = 1;
    ec.peft = with.peft;
    ec.adapter_dir = adapter;
    Session s(tmp / "base", ec);
    s.adapters()->merge_into(s.store());
    s.store().save(tmp / "merged", DType::f32, std::uint64_t{1} << 30);
  }
  const auto m = test::run_forward(tmp / "merged", kBatch, kSeq, ids, mask);
  double diff = 0, moved = 0, scale = 0;
  for (std::size_t i = 0; i < a.logits.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(a.logits[i]) - m.logits[i]));
    moved = std::max(moved, std::fabs(static_cast<double>(a.logits[i]) - plain.logits[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(m.logits[i])));
  }
  EXPECT_GT(moved, 1e-4) << "the adapter should change the logits";
  EXPECT_LT(diff / scale, 1e-5) << "adapter forward vs merged forward (max |Δ| " << diff << ", moved " << moved << ", scale " << scale << ")";
}

TEST_P(LoraFamilies, TheBaseIsFrozenAndStreamedBlocksAreNeverWrittenBack) {
  for (RuleKind rule : {RuleKind::sgd, RuleKind::adam, RuleKind::cons}) {
    const LoraRun streamed = train(tmp / "base", train_cfg(GetParam(), OffloadMode::all, rule), 5, 1e-2f);
    const LoraRun resident = train(tmp / "base", train_cfg(GetParam(), OffloadMode::none, rule), 5, 1e-2f);
    Session base(tmp / "base", SessionConfig{});
    for (std::int64_t i = 0; i < config.num_layers; ++i) {
      EXPECT_TRUE(streamed.adapters[static_cast<std::size_t>(i)] == resident.adapters[static_cast<std::size_t>(i)])
          << rule_name(rule) << ": adapters of block " << i;
      EXPECT_TRUE(streamed.blocks[static_cast<std::size_t>(i)] ==
                  bytes_of(base.store().block_image(i), base.store().block_bytes()))
          << rule_name(rule) << ": block " << i << " changed";
    }
    for (std::size_t t = 0; t < streamed.steps.size(); ++t)
      EXPECT_EQ(streamed.steps[t].losses, resident.steps[t].losses) << rule_name(rule) << " step " << t;
    EXPECT_EQ(streamed.totals.d2h_bytes, 0u) << rule_name(rule) << ": a frozen block was written back";
    EXPECT_EQ(streamed.totals.offloads, 0) << rule_name(rule);
    EXPECT_GT(streamed.totals.uploads, 0) << rule_name(rule);
  }
}

// A step of full tuning uploads and offloads every streamed block; a LoRA step only uploads.
TEST_P(LoraFamilies, AStreamedLoraStepMovesAboutHalfTheBytesOfAFullStep) {
  SessionConfig full = train_cfg(GetParam(), OffloadMode::all);
  full.peft = PeftConfig{};
  const ModelConfig c = config;
  std::vector<StepResult> f;
  {
    Session s(tmp / "base", full);
    for (int t = 0; t < 3; ++t) f.push_back(s.step(batch(c, t), 1e-3f, 1e-3f, 0.0f));
  }
  const LoraRun l = train(tmp / "base", train_cfg(GetParam(), OffloadMode::all), 3, 1e-3f);
  // Step 2: a steady step (step 0 has no pending update to write back).
  const double full_bytes = static_cast<double>(f[2].h2d_bytes + f[2].d2h_bytes);
  const double lora_bytes = static_cast<double>(l.steps[2].h2d_bytes + l.steps[2].d2h_bytes);
  EXPECT_EQ(l.steps[2].d2h_bytes, 0u);
  EXPECT_NEAR(lora_bytes / full_bytes, 0.5, 0.02) << full_bytes << " vs " << lora_bytes;
  // The plan says the same before anything runs.
  SessionConfig q = train_cfg(GetParam(), OffloadMode::all);
  const Placement pl = plan_placement(c, plan_request(c, q, DeviceKind::cpu, std::size_t{1} << 30));
  EXPECT_EQ(pl.d2h_bytes_per_step, 0u);
  EXPECT_GT(pl.adapter_bytes, 0u);
  full.max_batch = kBatch;
  const Placement pf = plan_placement(c, plan_request(c, full, DeviceKind::cpu, std::size_t{1} << 30));
  EXPECT_EQ(pl.h2d_bytes_per_step, pf.h2d_bytes_per_step);
  EXPECT_EQ(pf.d2h_bytes_per_step, pf.h2d_bytes_per_step);
}

TEST_P(LoraFamilies, SavedAdaptersHavePeftsLayoutAndReloadToContinueExactly) {
  const SessionConfig cfg = train_cfg(GetParam(), OffloadMode::all, RuleKind::momentum);
  const LoraRun straight = train(tmp / "base", cfg, 6, 1e-2f);
  train(tmp / "base", cfg, 3, 1e-2f, 0, tmp / "half");
  const fs::path dir = resolve_model_dir(tmp / "half");
  // PEFT's files and names (peft/utils/save_and_load.py, LoraConfig.to_dict()).
  ASSERT_TRUE(fs::exists(dir / "adapter_config.json"));
  ASSERT_TRUE(fs::exists(dir / "adapter_model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors")) << "a LoRA run saves its adapter, not the frozen base";
  std::ifstream in(dir / "adapter_config.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j.at("peft_type"), "LORA");
  EXPECT_EQ(j.at("task_type"), "CAUSAL_LM");
  EXPECT_EQ(j.at("r"), 4);
  EXPECT_EQ(j.at("lora_alpha"), 8.0);
  EXPECT_EQ(j.at("lora_dropout"), 0.0);
  EXPECT_EQ(j.at("bias"), "none");
  EXPECT_EQ(j.at("target_modules").size(), 4u);
  for (const char* k : {"fan_in_fan_out", "init_lora_weights", "inference_mode", "base_model_name_or_path"})
    EXPECT_TRUE(j.contains(k)) << k;
  const SafetensorsFile f = SafetensorsFile::open(dir / "adapter_model.safetensors");
  const std::string prefix = GetParam() == ModelFamily::opt ? "base_model.model.model.decoder.layers.0.self_attn."
                                                            : "base_model.model.model.layers.0.self_attn.";
  const TensorInfo& a = f.at(prefix + "q_proj.lora_A.weight");
  const TensorInfo& b = f.at(prefix + "q_proj.lora_B.weight");
  EXPECT_EQ(a.shape, (std::vector<std::int64_t>{4, config.hidden_size}));
  EXPECT_EQ(b.shape, (std::vector<std::int64_t>{config.q_dim(), 4}));
  EXPECT_EQ(a.dtype, DType::f32);
  EXPECT_EQ(f.tensors().size(), static_cast<std::size_t>(config.num_layers) * 4 * 2);
  // Reloaded (adapter and momentum state), three more steps: the straight run's adapters.
  SessionConfig more = cfg;
  more.adapter_dir = dir;
  more.resume_state = true;
  const LoraRun resumed = train(tmp / "base", more, 3, 1e-2f, 3);
  for (std::int64_t i = 0; i < config.num_layers; ++i)
    EXPECT_TRUE(straight.adapters[static_cast<std::size_t>(i)] == resumed.adapters[static_cast<std::size_t>(i)])
        << "block " << i;
}


TEST(LoraConfig, BadAdaptersAreRefusedNamingTheFlagOrFile) {
  const ModelConfig c = tiny(ModelFamily::llama);
  PeftConfig p;
  p.lora = true;
  p.targets = {"q_proj", "fc1"};
  try {
    validate_peft(p, c);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fc1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("gate_proj"), std::string::npos) << e.what();
  }
  p.targets = {"q_proj"};
  p.r = 0;
  EXPECT_THROW(validate_peft(p, c), Error);
  p.r = 33;  // above the 32 hidden units
  EXPECT_THROW(validate_peft(p, c), Error);
  EXPECT_THROW(parse_lora_targets("q_proj,,v_proj"), Error);
  EXPECT_EQ(parse_lora_targets(" q_proj , v_proj"), (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_THROW(peft_from_json(nlohmann::json{{"peft_type", "PREFIX_TUNING"}}, "x"), Error);
  EXPECT_THROW(peft_from_json(nlohmann::json{{"peft_type", "LORA"}, {"r", 8}, {"lora_alpha", 16},
                                             {"target_modules", {"q_proj"}}, {"use_dora", true}},
                              "x"),
               Error);
  const PeftConfig ok = peft_from_json(
      nlohmann::json{{"peft_type", "LORA"}, {"r", 8}, {"lora_alpha", 16}, {"target_modules", {"q_proj", "v_proj"}}}, "x");
  EXPECT_EQ(ok.r, 8);
  EXPECT_EQ(ok.targets.size(), 2u);
}

}  // namespace
}  // namespace zo2

namespace zo2 {
namespace {

// Note [Prefix tuning under ZO]: a prefix initialized from the activations of tokens X makes
// the forward of a sequence S equal the forward of X followed by S (S's rows), since the
// prefix rows are exactly X's keys and values at positions 0 … P−1.
TEST_P(LoraFamilies, APrefixOfXsActivationsEqualsTheForwardOfXThenS) {
  constexpr int P = 5, T = 7;
  SessionConfig pc;
  pc.training = false;
  pc.logits_out = true;
  pc.max_batch = 1;
  pc.max_seq = T;
  pc.run_seed = 23;
  pc.peft.prefix = P;
  std::vector<std::int32_t> s_ids(T);
  for (int i = 0; i < T; ++i) s_ids[static_cast<std::size_t>(i)] = (i * 13 + 4) % static_cast<int>(config.vocab_size);
  std::vector<float> with_prefix(static_cast<std::size_t>(T * config.vocab_size));
  {
    Session s(tmp / "base", pc);
    EvalOptions eo;
    eo.logits = with_prefix.data();
    s.eval(make_batch(config, 1, T, s_ids), eo);
  }
  const std::vector<std::int32_t> x = prefix_init_tokens(config, P, 23);
  std::vector<std::int32_t> xs = x;
  xs.insert(xs.end(), s_ids.begin(), s_ids.end());
  std::vector<float> joint(static_cast<std::size_t>((P + T) * config.vocab_size));
  {
    SessionConfig jc;
    jc.training = false;
    jc.logits_out = true;
    jc.max_batch = 1;
    jc.max_seq = P + T;
    Session s(tmp / "base", jc);
    EvalOptions eo;
    eo.logits = joint.data();
    s.eval(make_batch(config, 1, P + T, xs), eo);
  }
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < with_prefix.size(); ++i) {
    const double j = joint[static_cast<std::size_t>(P * config.vocab_size) + i];
    diff = std::max(diff, std::fabs(static_cast<double>(with_prefix[i]) - j));
    scale = std::max(scale, std::fabs(j));
  }
  EXPECT_LT(diff / scale, 1e-5) << "max |Δ| " << diff;
}

TEST_P(LoraFamilies, PrefixTrainingIsStreamedLikeResidentAndSavesPeftsPrefixLayout) {
  auto cfg = [&](OffloadMode m) {
    SessionConfig s = train_cfg(GetParam(), m, RuleKind::adam);
    s.peft = PeftConfig{};
    s.peft.prefix = 4;
    return s;
  };
  const LoraRun streamed = train(tmp / "base", cfg(OffloadMode::all), 4, 1e-3f, 0, tmp / "prefix");
  const LoraRun resident = train(tmp / "base", cfg(OffloadMode::none), 4, 1e-3f);
  Session base(tmp / "base", SessionConfig{});
  for (std::int64_t i = 0; i < config.num_layers; ++i) {
    EXPECT_TRUE(streamed.adapters[static_cast<std::size_t>(i)] == resident.adapters[static_cast<std::size_t>(i)]) << i;
    EXPECT_TRUE(streamed.blocks[static_cast<std::size_t>(i)] == bytes_of(base.store().block_image(i), base.store().block_bytes()))
        << "block " << i << " changed";
  }
  for (std::size_t t = 0; t < streamed.steps.size(); ++t) EXPECT_EQ(streamed.steps[t].losses, resident.steps[t].losses) << t;
  EXPECT_EQ(streamed.totals.d2h_bytes, 0u);
  const fs::path dir = resolve_model_dir(tmp / "prefix");
  std::ifstream in(dir / "adapter_config.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j.at("peft_type"), "PREFIX_TUNING");
  EXPECT_EQ(j.at("num_virtual_tokens"), 4);
  EXPECT_EQ(j.at("num_layers"), config.num_layers);
  EXPECT_EQ(j.at("prefix_projection"), false);
  const SafetensorsFile f = SafetensorsFile::open(dir / "adapter_model.safetensors");
  EXPECT_EQ(f.at("prompt_embeddings").shape, (std::vector<std::int64_t>{4, config.num_layers * 2 * config.kv_dim()}));
  // Reloaded with its Adam state, two more steps equal a straight six-step run.
  SessionConfig more = cfg(OffloadMode::all);
  more.adapter_dir = dir;
  more.resume_state = true;
  const LoraRun resumed = train(tmp / "base", more, 2, 1e-3f, 4);
  const LoraRun straight = train(tmp / "base", cfg(OffloadMode::all), 6, 1e-3f);
  for (std::int64_t i = 0; i < config.num_layers; ++i)
    EXPECT_TRUE(straight.adapters[static_cast<std::size_t>(i)] == resumed.adapters[static_cast<std::size_t>(i)]) << i;
}

}  // namespace
}  // namespace zo2

namespace zo2 {
namespace {
INSTANTIATE_TEST_SUITE_P(Families, LoraFamilies, ::testing::Values(ModelFamily::opt, ModelFamily::llama),
                         [](const auto& info) { return info.param == ModelFamily::opt ? "opt" : "llama"; });
}  // namespace
}  // namespace zo2
