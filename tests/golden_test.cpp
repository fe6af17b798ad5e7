// Parity with Hugging Face transformers (../shared/golden): each checkpoint is loaded as a
// user's would be, run on the golden batch (rows 1 and 2 right-padded), and its logits,
// every hidden state and the loss are compared with the reference outputs.
#include "api/session.h"
#include "runtime/device.h"
#include "models/safetensors.h"
#include "tests/reference_model.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <tuple>

namespace zo2 {
namespace {

struct Golden {
  std::vector<std::int32_t> ids, mask;
  int batch = 0, seq = 0;
  std::vector<float> logits;
  std::vector<std::vector<float>> hidden;
  float loss = 0;
};

std::vector<float> f32_tensor(const SafetensorsFile& f, const std::string& name) {
  const auto& t = f.at(name);
  std::vector<float> v(static_cast<std::size_t>(t.numel()));
  std::memcpy(v.data(), f.read(t).data(), v.size() * sizeof(float));
  return v;
}

std::vector<std::int32_t> i32_tensor(const SafetensorsFile& f, const std::string& name) {
  const auto& t = f.at(name);
  std::vector<std::int64_t> v(static_cast<std::size_t>(t.numel()));
  std::memcpy(v.data(), f.read(t).data(), v.size() * sizeof(std::int64_t));
  return {v.begin(), v.end()};
}

Golden load_golden(const std::filesystem::path& dir) {
  const auto f = SafetensorsFile::open(dir / "golden.safetensors");
  Golden g;
  g.ids = i32_tensor(f, "input_ids");
  g.mask = i32_tensor(f, "attention_mask");
  g.batch = static_cast<int>(f.at("input_ids").shape[0]);
  g.seq = static_cast<int>(f.at("input_ids").shape[1]);
  g.logits = f32_tensor(f, "logits");
  for (int i = 0; f.find("hidden_states." + std::to_string(i)); ++i)
    g.hidden.push_back(f32_tensor(f, "hidden_states." + std::to_string(i)));
  g.loss = f32_tensor(f, "loss")[0];
  return g;
}

double masked_rel(const std::vector<float>& a, const std::vector<float>& ref,
                  const std::vector<std::int32_t>& mask) {
  const std::vector<double> r(ref.begin(), ref.end());
  return test::masked_rel_error(a, r, mask, static_cast<std::int64_t>(ref.size() / mask.size()));
}

class GoldenParity : public ::testing::TestWithParam<std::string> {};

void expect_matches_golden(const std::filesystem::path& dir) {
  ASSERT_TRUE(std::filesystem::exists(dir)) << dir;
  const Golden g = load_golden(dir);
  const test::Zo2Output out = test::run_forward(dir, g.batch, g.seq, g.ids, g.mask);
  EXPECT_LT(masked_rel(out.logits, g.logits, g.mask), 1e-4);
  ASSERT_EQ(out.hidden_states.size(), g.hidden.size());
  for (std::size_t i = 0; i < g.hidden.size(); ++i) {
    ASSERT_EQ(out.hidden_states[i].size(), g.hidden[i].size()) << "hidden_states." << i;
    EXPECT_LT(masked_rel(out.hidden_states[i], g.hidden[i], g.mask), 1e-4) << "hidden_states." << i;
  }
  EXPECT_LT(std::fabs(out.loss - g.loss) / std::fabs(g.loss), 1e-5);
}

TEST_P(GoldenParity, LogitsHiddenStatesAndLossMatchTransformers) {
  expect_matches_golden(test::shared_dir() / "golden" / GetParam());
}

// Goldens kept in the repository (tests/data/golden/NAME, made on the GPU machine, which has
// transformers, by scripts/make-goldens.py: the LLaMA-family variants of issue 19). None
// yet is no test. ZO2_REPO_GOLDEN_DIR names another folder of them: scripts/gpu-check.sh
// tests the goldens it has just made, on the CPU and the GPU, in the same device call.
std::filesystem::path repo_golden_root() {
  if (const char* dir = std::getenv("ZO2_REPO_GOLDEN_DIR"); dir != nullptr && *dir != '\0') return dir;
  return std::filesystem::path(__FILE__).parent_path() / "data" / "golden";
}

std::vector<std::string> repo_goldens() {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(repo_golden_root(), ec))
    if (std::filesystem::exists(e.path() / "golden.safetensors")) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::string test_name(std::string s) {
  for (char& c : s)
    if (c == '-' || c == '.') c = '_';
  return s;
}

class RepoGoldenParity : public ::testing::TestWithParam<std::string> {};
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(RepoGoldenParity);

TEST_P(RepoGoldenParity, LogitsHiddenStatesAndLossMatchTransformers) {
  expect_matches_golden(repo_golden_root() / GetParam());
}

INSTANTIATE_TEST_SUITE_P(Repo, RepoGoldenParity, ::testing::ValuesIn(repo_goldens()),
                         [](const auto& info) { return test_name(info.param); });

TEST_P(GoldenParity, ReferenceModelOfTheTestsMatchesTransformersToo) {
  // The tests' independent reference is trusted for other configs only because it matches here.
  const auto dir = test::shared_dir() / "golden" / GetParam();
  const Golden g = load_golden(dir);
  const test::ReferenceModel ref(dir);
  const test::ReferenceOutput r = ref.forward(g.batch, g.seq, g.ids, g.mask);
  const std::vector<float> logits(r.logits.begin(), r.logits.end());
  EXPECT_LT(masked_rel(logits, g.logits, g.mask), 1e-5);
  EXPECT_LT(std::fabs(r.loss - g.loss) / std::fabs(g.loss), 1e-6);
}

TEST_P(GoldenParity, ForwardCommandWritesTheSameLogitsAndLoss) {
  const auto dir = test::shared_dir() / "golden" / GetParam();
  const Golden g = load_golden(dir);
  test::TempDir tmp;
  const auto out = tmp / "out.safetensors";
  std::string log;
  const int rc = test::run_command(test::zo2_tune_path().string() + " forward --model " + dir.string() +
                                       " --inputs " + (dir / "golden.safetensors").string() + " --out " +
                                       out.string() + " --hidden-states",
                                   &log);
  ASSERT_EQ(rc, 0) << log;
  const auto f = SafetensorsFile::open(out);
  EXPECT_EQ(f.at("logits").shape, (std::vector<std::int64_t>{g.batch, g.seq, static_cast<std::int64_t>(g.logits.size()) / (g.batch * g.seq)}));
  EXPECT_LT(masked_rel(f32_tensor(f, "logits"), g.logits, g.mask), 1e-4);
  EXPECT_LT(std::fabs(f32_tensor(f, "loss")[0] - g.loss) / std::fabs(g.loss), 1e-5);
  EXPECT_TRUE(f.find("hidden_states." + std::to_string(g.hidden.size() - 1)) != nullptr);
}

TEST_P(GoldenParity, StreamedForwardThroughOneSlotEqualsResident) {
  const auto dir = test::shared_dir() / "golden" / GetParam();
  const Golden g = load_golden(dir);
  SessionConfig cfg;
  cfg.offload = OffloadMode::all;
  cfg.window = 1;
  const test::Zo2Output streamed = test::run_forward(dir, g.batch, g.seq, g.ids, g.mask, cfg);
  const test::Zo2Output resident = test::run_forward(dir, g.batch, g.seq, g.ids, g.mask);
  EXPECT_EQ(streamed.logits, resident.logits);
  EXPECT_EQ(streamed.loss, resident.loss);
}

// One NaN (or infinite) weight makes the loss NaN, as in transformers (issue 16, defect 10).
// The key projection's first weight makes column 0 of every key NaN, hence every attention
// score of head 0 while the values stay finite: the attention used to read such a row as
// "no visible key" and output zeros, so the loss stayed finite. The attention-input norm's
// first weight (NaN in queries, keys and values) is checked too. Injected into the host
// store (every block streams from it); a checkpoint holding such a weight is refused at
// load (cli_test). Every position with a target is non-finite, not only the mean.
TEST_P(GoldenParity, OneNonFiniteWeightMakesTheLossNan) {
  const auto dir = test::shared_dir() / "golden" / GetParam();
  const Golden g = load_golden(dir);
  const ModelConfig config = ModelConfig::load(dir);
  for (const Role role : {Role::k_w, Role::attn_norm_w})
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      SessionConfig cfg;
      cfg.training = false;
      cfg.max_batch = g.batch;
      cfg.max_seq = g.seq;
      cfg.offload = OffloadMode::all;  // every block streams from the host store, where the weight is set
      Session session(dir, cfg);
      const TensorSlot* slot = session.store().block_layout(0).find(role);
      ASSERT_NE(slot, nullptr);
      ASSERT_EQ(slot->dtype, DType::f32);
      std::memcpy(static_cast<std::byte*>(session.store().block_image(0)) + slot->offset, &bad, sizeof bad);
      const HostBatch b = make_batch(config, g.batch, g.seq, g.ids, g.mask);
      std::vector<float> token_loss(static_cast<std::size_t>(b.tokens()));
      EvalOptions eo;
      eo.token_loss = token_loss.data();
      const float loss = session.eval(b, eo);
      EXPECT_TRUE(std::isnan(loss)) << slot->name << " = " << bad << ": loss " << loss;
      for (std::size_t i = 0; i < token_loss.size(); ++i) {
        if (b.targets[i] < 0) continue;
        EXPECT_FALSE(std::isfinite(token_loss[i])) << slot->name << " = " << bad << ", position " << i << ": "
                                                   << token_loss[i];
      }
    }
}

// On the GPU (issue 4): fp32 compute within 1e-4 of transformers; bf16 compute within 2e-2
// of the logits' scale (max |error| / max |logit|), loss within 2e-2.
class GoldenParityCuda : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

// The GPU's forward of a golden folder: fp32 compute within 1e-4 of transformers (logits,
// every hidden state) and the loss within 1e-5; bf16 within 2e-2; then streamed through
// one slot, the same bits as resident.
void expect_matches_golden_on_the_gpu(const std::filesystem::path& dir, const std::string& compute) {
  ASSERT_TRUE(std::filesystem::exists(dir)) << dir;
  const Golden g = load_golden(dir);
  SessionConfig cfg;
  cfg.device = "cuda";
  cfg.compute = *dtype_from_name(compute);
  const test::Zo2Output out = test::run_forward(dir, g.batch, g.seq, g.ids, g.mask, cfg);
  if (compute == "fp32") {
    EXPECT_LT(masked_rel(out.logits, g.logits, g.mask), 1e-4);
    ASSERT_EQ(out.hidden_states.size(), g.hidden.size());
    for (std::size_t i = 0; i < g.hidden.size(); ++i)
      EXPECT_LT(masked_rel(out.hidden_states[i], g.hidden[i], g.mask), 1e-4) << "hidden_states." << i;
    EXPECT_LT(std::fabs(out.loss - g.loss) / std::fabs(g.loss), 1e-5);
  } else {
    EXPECT_LT(masked_rel(out.logits, g.logits, g.mask), 2e-2);
    EXPECT_LT(std::fabs(out.loss - g.loss) / std::fabs(g.loss), 2e-2);
  }
  cfg.offload = OffloadMode::all;
  cfg.window = 1;
  const test::Zo2Output streamed = test::run_forward(dir, g.batch, g.seq, g.ids, g.mask, cfg);
  EXPECT_EQ(streamed.logits, out.logits);
}

TEST_P(GoldenParityCuda, LogitsAndLossMatchTransformersOnTheGpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto& [model, compute] = GetParam();
  expect_matches_golden_on_the_gpu(test::shared_dir() / "golden" / model, compute);
}

class RepoGoldenParityCuda : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(RepoGoldenParityCuda);

TEST_P(RepoGoldenParityCuda, LogitsAndLossMatchTransformersOnTheGpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto& [model, compute] = GetParam();
  expect_matches_golden_on_the_gpu(repo_golden_root() / model, compute);
}

INSTANTIATE_TEST_SUITE_P(Repo, RepoGoldenParityCuda,
                         ::testing::Combine(::testing::ValuesIn(repo_goldens()), ::testing::Values("fp32", "bf16")),
                         [](const auto& info) { return test_name(std::get<0>(info.param) + "_" + std::get<1>(info.param)); });

INSTANTIATE_TEST_SUITE_P(Golden, GoldenParityCuda,
                         ::testing::Combine(::testing::Values("opt-tiny", "opt-tiny-postln", "llama-tiny"),
                                            ::testing::Values("fp32", "bf16")),
                         [](const auto& info) {
                           std::string s = std::get<0>(info.param) + "_" + std::get<1>(info.param);
                           for (char& c : s)
                             if (c == '-') c = '_';
                           return s;
                         });

INSTANTIATE_TEST_SUITE_P(Golden, GoldenParity,
                         ::testing::Values("opt-tiny", "opt-tiny-postln", "llama-tiny"),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (char& c : s)
                             if (c == '-') c = '_';
                           return s;
                         });

}  // namespace
}  // namespace zo2
