// The C API's contract at its edges (include/zo2.h): every bad argument returns its
// documented negative code with a message naming the problem, nothing thrown crosses the
// boundary, the message is per thread, an abort callback stops with ZO2_ABORTED, and
// token log-probabilities are exactly −(token loss) of the C++ eval. Including zo2.h here
// also shows the header compiles as C++.
#include "zo2.h"

#include "api/session.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include "api/run_dir.h"

#include <atomic>
#include <tuple>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace zo2 {
namespace {

namespace fs = std::filesystem;

constexpr int kSeqs = 2;
constexpr int kTokens = 12;
constexpr int kVocab = 512;  // opt-tiny

// One tiny model for the whole suite, made by zo2-tune as a user would.
class CApi : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new test::TempDir();
    model_dir_ = new fs::path(*tmp_ / "model");
    std::string out;
    ASSERT_EQ(test::run_command(test::zo2_tune_path().string() + " init --preset opt-tiny --out " +
                                    model_dir_->string() + " --seed 3 -q",
                                &out),
              0)
        << out;
  }
  static void TearDownTestSuite() {
    delete model_dir_;
    delete tmp_;
  }

  void SetUp() override {
    ASSERT_EQ(zo2_model_load(model_dir_->c_str(), nullptr, &model_), 0) << zo2_last_error();
    tokens_.resize(kSeqs * kTokens);
    for (std::size_t i = 0; i < tokens_.size(); ++i) tokens_[i] = static_cast<int32_t>((i * 29 + 5) % kVocab);
  }
  void TearDown() override {
    zo2_session_free(session_);
    zo2_model_free(model_);
  }

  static zo2_session_params params() {
    zo2_session_params p = zo2_session_default_params();
    p.lr = 1e-3f;
    p.max_seqs = kSeqs;
    p.max_seq_len = kTokens;
    p.n_threads = 2;
    return p;
  }
  zo2_session* open(const zo2_session_params& p) {
    EXPECT_EQ(zo2_session_init(model_, &p, &session_), 0) << zo2_last_error();
    return session_;
  }
  zo2_batch batch() const { return zo2_batch{kSeqs, kTokens, tokens_.data(), nullptr, nullptr}; }

  static test::TempDir* tmp_;
  static fs::path* model_dir_;
  zo2_model* model_ = nullptr;
  zo2_session* session_ = nullptr;
  std::vector<int32_t> tokens_;
};
test::TempDir* CApi::tmp_ = nullptr;
fs::path* CApi::model_dir_ = nullptr;

// The code is `code` and the thread's last error contains every one of `words`.
#define EXPECT_ERROR(call, code, ...)                                                 \
  do {                                                                                \
    const int rc_ = (call);                                                           \
    EXPECT_EQ(rc_, (code)) << #call << ": " << zo2_last_error();                      \
    const std::string msg_ = zo2_last_error();                                        \
    EXPECT_FALSE(msg_.empty()) << #call;                                              \
    for (const char* w_ : {__VA_ARGS__})                                              \
      EXPECT_NE(msg_.find(w_), std::string::npos) << #call << ": '" << msg_ << "' lacks '" << w_ << "'"; \
  } while (0)

TEST_F(CApi, StatusCodesHaveTheirDocumentedValues) {
  EXPECT_EQ(ZO2_OK, 0);
  EXPECT_EQ(ZO2_ABORTED, 1);
  EXPECT_EQ(ZO2_ERR_INVALID_ARGUMENT, -1);
  EXPECT_EQ(ZO2_ERR_IO, -2);
  EXPECT_EQ(ZO2_ERR_FORMAT, -3);
  EXPECT_EQ(ZO2_ERR_UNSUPPORTED, -4);
  EXPECT_EQ(ZO2_ERR_OUT_OF_MEMORY, -5);
  EXPECT_EQ(ZO2_ERR_DEVICE, -6);
  EXPECT_EQ(ZO2_ERR_INTERNAL, -7);
  EXPECT_STREQ(zo2_version(), "0.2.0");
}

TEST_F(CApi, NullPointersAreInvalidArgumentsNamingTheParameter) {
  zo2_model* m = nullptr;
  EXPECT_ERROR(zo2_model_load(nullptr, nullptr, &m), ZO2_ERR_INVALID_ARGUMENT, "hf_dir", "NULL");
  EXPECT_ERROR(zo2_model_load(model_dir_->c_str(), nullptr, nullptr), ZO2_ERR_INVALID_ARGUMENT, "out", "NULL");
  EXPECT_ERROR(zo2_model_load("", nullptr, &m), ZO2_ERR_INVALID_ARGUMENT, "hf_dir", "empty");

  const zo2_session_params p = params();
  zo2_session* s = nullptr;
  EXPECT_ERROR(zo2_session_init(nullptr, &p, &s), ZO2_ERR_INVALID_ARGUMENT, "model", "NULL");
  EXPECT_ERROR(zo2_session_init(model_, &p, nullptr), ZO2_ERR_INVALID_ARGUMENT, "out", "NULL");

  open(p);
  const zo2_batch b = batch();
  zo2_step_result r;
  float loss;
  std::vector<float> lp(kSeqs * kTokens);
  EXPECT_ERROR(zo2_session_step(nullptr, &b, &r), ZO2_ERR_INVALID_ARGUMENT, "session", "NULL");
  EXPECT_ERROR(zo2_session_step(session_, nullptr, &r), ZO2_ERR_INVALID_ARGUMENT, "batch", "NULL");
  EXPECT_ERROR(zo2_session_eval(nullptr, &b, &loss), ZO2_ERR_INVALID_ARGUMENT, "session", "NULL");
  EXPECT_ERROR(zo2_session_eval(session_, nullptr, &loss), ZO2_ERR_INVALID_ARGUMENT, "batch", "NULL");
  EXPECT_ERROR(zo2_session_eval(session_, &b, nullptr), ZO2_ERR_INVALID_ARGUMENT, "out_loss", "NULL");
  EXPECT_ERROR(zo2_session_token_logprobs(nullptr, &b, lp.data()), ZO2_ERR_INVALID_ARGUMENT, "session", "NULL");
  EXPECT_ERROR(zo2_session_token_logprobs(session_, nullptr, lp.data()), ZO2_ERR_INVALID_ARGUMENT, "batch");
  EXPECT_ERROR(zo2_session_token_logprobs(session_, &b, nullptr), ZO2_ERR_INVALID_ARGUMENT, "out", "NULL");
  EXPECT_ERROR(zo2_session_save(nullptr, "x"), ZO2_ERR_INVALID_ARGUMENT, "session", "NULL");
  EXPECT_ERROR(zo2_session_save(session_, nullptr), ZO2_ERR_INVALID_ARGUMENT, "out_dir", "NULL");
  EXPECT_ERROR(zo2_session_set_lr(nullptr, 1e-3f), ZO2_ERR_INVALID_ARGUMENT, "session", "NULL");

  zo2_batch no_tokens = b;
  no_tokens.tokens = nullptr;
  EXPECT_ERROR(zo2_session_step(session_, &no_tokens, &r), ZO2_ERR_INVALID_ARGUMENT, "tokens", "NULL");
  EXPECT_ERROR(zo2_session_eval(session_, &no_tokens, &loss), ZO2_ERR_INVALID_ARGUMENT, "tokens", "NULL");

  zo2_plan_result plan;
  EXPECT_ERROR(zo2_plan(nullptr, &p, &plan), ZO2_ERR_INVALID_ARGUMENT, "model", "NULL");
  EXPECT_ERROR(zo2_plan(model_, nullptr, &plan), ZO2_ERR_INVALID_ARGUMENT, "params", "NULL");
  EXPECT_ERROR(zo2_plan(model_, &p, nullptr), ZO2_ERR_INVALID_ARGUMENT, "out", "NULL");
  EXPECT_ERROR(zo2_session_plan(nullptr, &plan), ZO2_ERR_INVALID_ARGUMENT, "session", "NULL");
  EXPECT_ERROR(zo2_session_plan(session_, nullptr), ZO2_ERR_INVALID_ARGUMENT, "out", "NULL");

  EXPECT_EQ(zo2_session_step_index(nullptr), -1);
  EXPECT_NE(std::string(zo2_last_error()).find("NULL"), std::string::npos);
  EXPECT_EQ(zo2_model_n_vocab(nullptr), 0);
  EXPECT_NE(std::string(zo2_last_error()).find("model is NULL"), std::string::npos);
  EXPECT_EQ(zo2_session_device_peak(nullptr), 0u);

  // Free functions accept NULL.
  zo2_session_free(nullptr);
  zo2_model_free(nullptr);
  // None of this touched the session.
  EXPECT_EQ(zo2_session_step_index(session_), 0);
}

TEST_F(CApi, BatchShapesOutsideTheCapacityAreRefused) {
  open(params());
  zo2_step_result r;
  float loss;
  auto with = [&](int n_seq, int n_tokens) { return zo2_batch{n_seq, n_tokens, tokens_.data(), nullptr, nullptr}; };
  zo2_batch b = with(0, kTokens);
  EXPECT_ERROR(zo2_session_step(session_, &b, &r), ZO2_ERR_INVALID_ARGUMENT, "n_seq", "positive");
  b = with(kSeqs, 0);
  EXPECT_ERROR(zo2_session_step(session_, &b, &r), ZO2_ERR_INVALID_ARGUMENT, "n_tokens", "positive");
  b = with(-3, kTokens);
  EXPECT_ERROR(zo2_session_eval(session_, &b, &loss), ZO2_ERR_INVALID_ARGUMENT, "n_seq");
  b = with(kSeqs + 1, kTokens);
  EXPECT_ERROR(zo2_session_step(session_, &b, &r), ZO2_ERR_INVALID_ARGUMENT, "max_seqs", "capacity");
  b = with(1, kTokens + 1);
  EXPECT_ERROR(zo2_session_eval(session_, &b, &loss), ZO2_ERR_INVALID_ARGUMENT, "max_seq_len", "capacity");
  // A smaller batch than the capacity is fine.
  b = with(1, kTokens / 2);
  EXPECT_EQ(zo2_session_eval(session_, &b, &loss), 0) << zo2_last_error();
  EXPECT_EQ(zo2_session_step_index(session_), 0);
}

TEST_F(CApi, TokensMasksAndLabelsOutOfRangeAreRefusedAndChangeNothing) {
  open(params());
  zo2_step_result r;
  float loss;
  std::vector<int32_t> ids = tokens_;
  zo2_batch b{kSeqs, kTokens, ids.data(), nullptr, nullptr};

  ids[3] = kVocab;
  EXPECT_ERROR(zo2_session_step(session_, &b, &r), ZO2_ERR_INVALID_ARGUMENT, "token id 512", "vocabulary");
  ids[3] = -1;
  EXPECT_ERROR(zo2_session_eval(session_, &b, &loss), ZO2_ERR_INVALID_ARGUMENT, "token id -1", "vocabulary");
  ids[3] = 7;

  std::vector<int32_t> labels = tokens_;
  b.labels = labels.data();
  labels[kTokens + 2] = kVocab + 10;
  EXPECT_ERROR(zo2_session_step(session_, &b, &r), ZO2_ERR_INVALID_ARGUMENT, "label 522", "vocabulary");
  labels[kTokens + 2] = -5;
  EXPECT_ERROR(zo2_session_eval(session_, &b, &loss), ZO2_ERR_INVALID_ARGUMENT, "label -5");
  labels[kTokens + 2] = -100;  // ignored: fine
  EXPECT_EQ(zo2_session_eval(session_, &b, &loss), 0) << zo2_last_error();

  std::vector<int32_t> mask(ids.size(), 1);
  b.attention_mask = mask.data();
  mask[4] = 2;
  EXPECT_ERROR(zo2_session_step(session_, &b, &r), ZO2_ERR_INVALID_ARGUMENT, "mask");

  // No step ran.
  EXPECT_EQ(zo2_session_step_index(session_), 0);
}

// A batch with nothing to predict (every label -100, or the mask 0 after each sequence's
// first position) has no loss: step and eval refuse it as an invalid argument naming why,
// the step index does not move, and the session stays usable (issue 16, defect 13: step used
// to return a NaN loss, skip the update and advance the index). Per-token log-probs are
// defined for it (all 0).
TEST_F(CApi, BatchesWithNothingToPredictAreRefusedAndChangeNothing) {
  open(params());
  zo2_step_result r;
  float loss = 1.0f;
  std::vector<int32_t> ids = tokens_;
  std::vector<int32_t> labels(ids.size(), -100);
  for (int i = 0; i < kSeqs; ++i) labels[static_cast<std::size_t>(i * kTokens)] = 7;  // the first position predicts nothing
  zo2_batch b{kSeqs, kTokens, ids.data(), nullptr, labels.data()};
  EXPECT_ERROR(zo2_session_step(session_, &b, &r), ZO2_ERR_INVALID_ARGUMENT, "nothing to predict", "-100");
  EXPECT_ERROR(zo2_session_eval(session_, &b, &loss), ZO2_ERR_INVALID_ARGUMENT, "nothing to predict");
  EXPECT_EQ(loss, 1.0f);  // not written
  std::vector<float> lp(ids.size(), 5.0f);
  EXPECT_EQ(zo2_session_token_logprobs(session_, &b, lp.data()), 0) << zo2_last_error();
  for (float x : lp) EXPECT_EQ(x, 0.0f);
  std::vector<int32_t> mask(ids.size(), 0);
  const zo2_batch padding{kSeqs, kTokens, ids.data(), mask.data(), nullptr};
  EXPECT_ERROR(zo2_session_step(session_, &padding, &r), ZO2_ERR_INVALID_ARGUMENT, "nothing to predict", "mask");
  EXPECT_ERROR(zo2_session_eval(session_, &padding, &loss), ZO2_ERR_INVALID_ARGUMENT, "nothing to predict");
  EXPECT_EQ(zo2_session_step_index(session_), 0);
  // One target token is enough; the session steps on as if nothing had happened.
  labels[5] = 9;
  EXPECT_EQ(zo2_session_eval(session_, &b, &loss), 0) << zo2_last_error();
  EXPECT_TRUE(std::isfinite(loss)) << loss;
  const zo2_batch good = batch();
  EXPECT_EQ(zo2_session_step(session_, &good, &r), 0) << zo2_last_error();
  EXPECT_TRUE(std::isfinite(r.loss_plus) && std::isfinite(r.loss_minus) && std::isfinite(r.projected_grad));
  EXPECT_EQ(zo2_session_step_index(session_), 1);
}

// A checkpoint with a NaN weight: the session that would load it is refused with a format
// error naming the tensor (zo2_model_load reads only the headers).
TEST_F(CApi, ACheckpointWithANanWeightIsRefusedByName) {
  const fs::path dir = *tmp_ / "nan-weight";
  fs::remove_all(dir);
  fs::copy(*model_dir_, dir);
  test::poke_safetensors(dir / "model.safetensors", "model.decoder.layers.0.self_attn.k_proj.weight", 0,
                         std::numeric_limits<float>::quiet_NaN());
  zo2_model* m = nullptr;
  ASSERT_EQ(zo2_model_load(dir.c_str(), nullptr, &m), 0) << zo2_last_error();
  zo2_session* s = nullptr;
  const zo2_session_params p = params();
  EXPECT_ERROR(zo2_session_init(m, &p, &s), ZO2_ERR_FORMAT, "model.decoder.layers.0.self_attn.k_proj.weight",
               "non-finite", "nan");
  EXPECT_EQ(s, nullptr);
  zo2_model_free(m);
}

// Huge finite weights load; their logits overflow, and eval returns the non-finite loss it
// computed with 0 (zo2.h): the host sees the value as it is.
TEST_F(CApi, AnEvalWhoseLogitsOverflowReturnsANonFiniteLoss) {
  const fs::path dir = *tmp_ / "huge-weight";
  fs::remove_all(dir);
  fs::copy(*model_dir_, dir);
  for (std::int64_t i = 0; i < 8; ++i)
    test::poke_safetensors(dir / "model.safetensors", "model.decoder.final_layer_norm.weight", i, 3e38f);
  zo2_model* m = nullptr;
  ASSERT_EQ(zo2_model_load(dir.c_str(), nullptr, &m), 0) << zo2_last_error();
  zo2_session* s = nullptr;
  zo2_session_params p = params();
  p.training = 0;
  ASSERT_EQ(zo2_session_init(m, &p, &s), 0) << zo2_last_error();
  const zo2_batch b = batch();
  float loss = 0;
  EXPECT_EQ(zo2_session_eval(s, &b, &loss), 0) << zo2_last_error();
  EXPECT_FALSE(std::isfinite(loss)) << loss;
  zo2_session_free(s);
  zo2_model_free(m);
}

// Two sessions, each with its seed log outside the run directory, save into one directory:
// the second is refused (another run's checkpoint), not a silent replacement (adversarial
// pass 50); a session saves into its own run again, and one without a seed log into a run of
// its own run seed.
TEST_F(CApi, ASessionsSaveNeverReplacesAnotherRunsCheckpoint) {
  const fs::path dir = *tmp_ / "two-sessions";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string log_a = (dir / "a.jsonl").string(), log_b = (dir / "b.jsonl").string();
  const std::string out = (dir / "out").string();
  auto session = [&](std::uint64_t seed, const std::string* log) {
    zo2_session_params p = params();
    p.seed = seed;
    p.seed_log_path = log ? log->c_str() : nullptr;
    zo2_session* s = nullptr;
    EXPECT_EQ(zo2_session_init(model_, &p, &s), 0) << zo2_last_error();
    const zo2_batch b = batch();
    zo2_step_result r{};
    EXPECT_EQ(zo2_session_step(s, &b, &r), 0) << zo2_last_error();
    return s;
  };
  zo2_session* a = session(1, &log_a);
  zo2_session* b = session(2, &log_b);
  ASSERT_EQ(zo2_session_save(a, out.c_str()), 0) << zo2_last_error();
  auto manifest = [&] {
    std::ifstream in(dir / "out" / "zo2_state.json");
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const std::string a_manifest = manifest();
  EXPECT_ERROR(zo2_session_save(b, out.c_str()), ZO2_ERR_INVALID_ARGUMENT, "holds the checkpoint of another run",
               "run seed 1", "a.jsonl");
  EXPECT_EQ(manifest(), a_manifest);
  EXPECT_EQ(zo2_session_save(a, out.c_str()), 0) << zo2_last_error();  // its own run, again
  zo2_session_free(a);
  zo2_session_free(b);
  // Without seed logs: the run seed says whose run it is.
  const std::string plain = (dir / "plain").string();
  zo2_session* c = session(3, nullptr);
  zo2_session* d = session(4, nullptr);
  ASSERT_EQ(zo2_session_save(c, plain.c_str()), 0) << zo2_last_error();
  EXPECT_ERROR(zo2_session_save(d, plain.c_str()), ZO2_ERR_INVALID_ARGUMENT, "another run", "run seed 3", "no seed log");
  EXPECT_EQ(zo2_session_save(c, plain.c_str()), 0) << zo2_last_error();
  zo2_session_free(c);
  zo2_session_free(d);
}

// Adversarial pass 70 (Note [A run continues from where it was loaded]): a session opened from
// a run at step 3 without first_step (a notebook cell run again) stepped once and saved "step
// 1" over it, deleting step 3's checkpoint and its seed log record. Refused now, the run
// untouched; a session that continues from the loaded step saves there; and no session takes
// a run back to an earlier step.
TEST_F(CApi, ASaveNeverTakesARunBackOrGivesItAnotherHistory) {
  const fs::path dir = *tmp_ / "pass70";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const zo2_batch b = batch();
  zo2_step_result r{};
  const std::string run = (dir / "run").string();
  zo2_session_params p = params();
  p.seed = 11;
  zo2_session* a = nullptr;
  ASSERT_EQ(zo2_session_init(model_, &p, &a), 0) << zo2_last_error();  // no seed log: the run seed says whose run
  for (int i = 0; i < 3; ++i) ASSERT_EQ(zo2_session_step(a, &b, &r), 0) << zo2_last_error();
  ASSERT_EQ(zo2_session_save(a, run.c_str()), 0) << zo2_last_error();
  ASSERT_EQ(fs::read_symlink(dir / "run" / "current").string(), "step-00000003");
  const std::string weights = test::read_file(dir / "run" / "model.safetensors");
  zo2_model* m = nullptr;
  ASSERT_EQ(zo2_model_load(run.c_str(), nullptr, &m), 0) << zo2_last_error();
  // Opened without first_step: another history. Refused before and after a step.
  zo2_session* again = nullptr;
  ASSERT_EQ(zo2_session_init(m, &p, &again), 0) << zo2_last_error();
  EXPECT_ERROR(zo2_session_save(again, run.c_str()), ZO2_ERR_INVALID_ARGUMENT, "loaded from step 3 of this run",
               "started at step 0", "first_step 3");
  ASSERT_EQ(zo2_session_step(again, &b, &r), 0) << zo2_last_error();
  EXPECT_ERROR(zo2_session_save(again, run.c_str()), ZO2_ERR_INVALID_ARGUMENT, "loaded from step 3 of this run");
  EXPECT_EQ(fs::read_symlink(dir / "run" / "current").string(), "step-00000003");
  EXPECT_EQ(test::read_file(dir / "run" / "model.safetensors"), weights);
  // It saves anywhere else.
  EXPECT_EQ(zo2_session_save(again, (dir / "branch").c_str()), 0) << zo2_last_error();
  zo2_session_free(again);
  // Continued from the step it loaded: saves into the run.
  zo2_session_params q = p;
  q.first_step = 3;
  zo2_session* cont = nullptr;
  ASSERT_EQ(zo2_session_init(m, &q, &cont), 0) << zo2_last_error();
  ASSERT_EQ(zo2_session_step(cont, &b, &r), 0) << zo2_last_error();
  ASSERT_EQ(zo2_session_save(cont, run.c_str()), 0) << zo2_last_error();
  EXPECT_EQ(fs::read_symlink(dir / "run" / "current").string(), "step-00000004");
  zo2_session_free(cont);
  // The first session, at step 3, would take the run (now at 4) back.
  EXPECT_ERROR(zo2_session_save(a, run.c_str()), ZO2_ERR_INVALID_ARGUMENT, "holds step 4 of its run",
               "later than this session's step 3");
  EXPECT_EQ(fs::read_symlink(dir / "run" / "current").string(), "step-00000004");
  zo2_session_free(a);
  zo2_model_free(m);
}

// A run a session saved without a seed log records no steps: zo2-tune train --resume says so
// (and what to do) before asking for the flags such a manifest lacks (adversarial pass 70: it
// said "seed_log.jsonl: cannot open the seed log").
TEST_F(CApi, AResumeOfARunSavedWithoutASeedLogSaysWhyItCannot) {
  const fs::path dir = *tmp_ / "no-log";
  fs::remove_all(dir);
  fs::create_directories(dir);
  zo2_session* s = open(params());
  const zo2_batch b = batch();
  zo2_step_result r{};
  ASSERT_EQ(zo2_session_step(s, &b, &r), 0) << zo2_last_error();
  ASSERT_EQ(zo2_session_save(s, (dir / "run").c_str()), 0) << zo2_last_error();
  test::write_file(dir / "data.jsonl", "{\"text\": \"a b c d e f g\"}\n");
  std::string out;
  const int rc = test::run_command(test::zo2_tune_path().string() + " train --resume " + (dir / "run").string() +
                                       " --data " + (dir / "data.jsonl").string() + " --steps 4",
                                   &out);
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("saved by a C API or Python session without a seed log"), std::string::npos) << out;
  EXPECT_NE(out.find("--model " + (dir / "run").string()), std::string::npos) << out;
}

// Adversarial pass 57: a host's misuses that returned 0 (or INTERNAL) and lost work.
TEST_F(CApi, AHostsSavesStepsAndModelsAreCheckedAgainstWhatTheyWouldBreak) {
  const fs::path dir = *tmp_ / "pass57";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const zo2_batch b = batch();
  zo2_step_result r{};
  // A save into a run's own `current` or step directory replaced its files with links into a
  // nested run: refused, the run's step untouched.
  zo2_session* s = open(params());
  ASSERT_EQ(zo2_session_step(s, &b, &r), 0) << zo2_last_error();
  const fs::path run = dir / "run";
  ASSERT_EQ(zo2_session_save(s, run.c_str()), 0) << zo2_last_error();
  const fs::path step = run / fs::read_symlink(run / "current");
  const auto before = fs::file_size(step / "model.safetensors");
  ASSERT_EQ(zo2_session_step(s, &b, &r), 0) << zo2_last_error();
  for (const fs::path& into : {run / "current", step})
    EXPECT_ERROR(zo2_session_save(s, into.c_str()), ZO2_ERR_INVALID_ARGUMENT, "is a checkpoint of the run in");
  EXPECT_TRUE(fs::is_regular_file(fs::symlink_status(step / "model.safetensors")));
  EXPECT_EQ(fs::file_size(step / "model.safetensors"), before);
  zo2_session_free(s);
  session_ = nullptr;
  // Steps past 2^53 made a seed log nothing reads.
  zo2_session_params p = params();
  p.first_step = std::int64_t{1} << 53;
  s = open(p);
  EXPECT_EQ(zo2_session_step(s, &b, &r), 0) << zo2_last_error();
  EXPECT_ERROR(zo2_session_step(s, &b, &r), ZO2_ERR_INVALID_ARGUMENT, "a run ends by step 2^53");
  zo2_session_free(s);
  session_ = nullptr;
  // A checkpoint replaced between zo2_model_load and zo2_session_init: refused, not checked
  // against the handle's old config.
  const fs::path moved = dir / "replaced";
  fs::copy(*model_dir_, moved, fs::copy_options::recursive);
  zo2_model* m = nullptr;
  ASSERT_EQ(zo2_model_load(moved.c_str(), nullptr, &m), 0) << zo2_last_error();
  fs::remove_all(moved);
  std::string out;
  ASSERT_EQ(test::run_command(test::zo2_tune_path().string() + " init --preset llama-tiny -q --out " + moved.string(),
                              &out), 0) << out;
  zo2_session* t = nullptr;
  EXPECT_ERROR(zo2_session_init(m, &p, &t), ZO2_ERR_FORMAT, "config.json changed since zo2_model_load");
  EXPECT_EQ(t, nullptr);
  zo2_model_free(m);
  // A LoRA run on a base whose path is not UTF-8: the save gave INTERNAL and left the session
  // unusable; now it saves (the path in adapter_config.json written with U+FFFD).
  const fs::path odd = dir / "base_\xff\xfe";
  fs::copy(*model_dir_, odd, fs::copy_options::recursive);
  ASSERT_EQ(zo2_model_load(odd.c_str(), nullptr, &m), 0) << zo2_last_error();
  zo2_session_params lp = params();
  lp.lora_r = 4;
  ASSERT_EQ(zo2_session_init(m, &lp, &t), 0) << zo2_last_error();
  ASSERT_EQ(zo2_session_step(t, &b, &r), 0) << zo2_last_error();
  EXPECT_EQ(zo2_session_save(t, (dir / "lora").c_str()), 0) << zo2_last_error();
  EXPECT_EQ(zo2_session_step(t, &b, &r), 0) << zo2_last_error();
  zo2_session_free(t);
  zo2_model_free(m);
}

TEST_F(CApi, BadPathsAreIoOrFormatErrors) {
  zo2_model* m = reinterpret_cast<zo2_model*>(0x1);
  const fs::path missing = *tmp_ / "no-such-model";
  EXPECT_ERROR(zo2_model_load(missing.c_str(), nullptr, &m), ZO2_ERR_IO, "no-such-model");
  EXPECT_EQ(m, nullptr);  // *out is cleared on error

  // A directory without config.json.
  const fs::path empty = *tmp_ / "empty-dir";
  fs::create_directories(empty);
  const int rc = zo2_model_load(empty.c_str(), nullptr, &m);
  EXPECT_TRUE(rc == ZO2_ERR_IO || rc == ZO2_ERR_FORMAT) << rc;
  EXPECT_NE(std::string(zo2_last_error()).find("config.json"), std::string::npos) << zo2_last_error();

  // config.json present but no weights: check_weights refuses at load; without it, init does.
  const fs::path no_weights = *tmp_ / "no-weights";
  fs::create_directories(no_weights);
  fs::copy_file(*model_dir_ / "config.json", no_weights / "config.json", fs::copy_options::overwrite_existing);
  EXPECT_LT(zo2_model_load(no_weights.c_str(), nullptr, &m), 0);
  EXPECT_NE(std::string(zo2_last_error()).find("no-weights"), std::string::npos) << zo2_last_error();
  zo2_model_params mp = zo2_model_default_params();
  EXPECT_EQ(mp.check_weights, 1);
  mp.check_weights = 0;
  ASSERT_EQ(zo2_model_load(no_weights.c_str(), &mp, &m), 0) << zo2_last_error();
  zo2_session* s = reinterpret_cast<zo2_session*>(0x1);
  const zo2_session_params p = params();
  EXPECT_LT(zo2_session_init(m, &p, &s), 0);
  EXPECT_EQ(s, nullptr);
  EXPECT_NE(std::string(zo2_last_error()).find("zo2_session_init"), std::string::npos);
  zo2_model_free(m);

  // A truncated safetensors file is a format error.
  const fs::path broken = *tmp_ / "broken";
  fs::create_directories(broken);
  fs::copy_file(*model_dir_ / "config.json", broken / "config.json", fs::copy_options::overwrite_existing);
  {
    std::ofstream f(broken / "model.safetensors", std::ios::binary);
    f << "garbage";
  }
  EXPECT_ERROR(zo2_model_load(broken.c_str(), nullptr, &m), ZO2_ERR_FORMAT, "model.safetensors");

  // Saving below a regular file cannot create the directory.
  open(params());
  const fs::path file = *tmp_ / "a-file";
  { std::ofstream(file) << "x"; }
  EXPECT_ERROR(zo2_session_save(session_, (file / "out").c_str()), ZO2_ERR_IO, "a-file");
  EXPECT_ERROR(zo2_session_save(session_, ""), ZO2_ERR_INVALID_ARGUMENT, "out_dir", "empty");
  // Issue 16 (defect 6): never over the plain checkpoint the session was loaded from.
  EXPECT_ERROR(zo2_session_save(session_, model_dir_->c_str()), ZO2_ERR_INVALID_ARGUMENT, "loaded from");
  EXPECT_FALSE(fs::exists(*model_dir_ / "current"));
  // A second writer: another process holds the run directory's lock (flock(1), as a
  // training run would).
  {
    const fs::path run = *tmp_ / "locked-run";
    fs::create_directories(run);
    const fs::path ready = *tmp_ / "lock-holder.pid";
    ASSERT_EQ(test::run_command("flock -x " + (run / "zo2.lock").string() + " -c 'echo $$ > " + ready.string() +
                                "; sleep 60' >/dev/null 2>&1 &"),
              0);
    for (int i = 0; i < 500 && !fs::exists(ready); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ASSERT_TRUE(fs::exists(ready));
    EXPECT_ERROR(zo2_session_save(session_, run.c_str()), ZO2_ERR_IO, "another zo2 process");
    EXPECT_FALSE(fs::exists(run / "current"));
    int pid = 0;
    std::ifstream(ready) >> pid;
    if (pid > 0) ::kill(pid, SIGTERM);
  }
  // The session survives an I/O error.
  float loss;
  const zo2_batch b = batch();
  EXPECT_EQ(zo2_session_eval(session_, &b, &loss), 0) << zo2_last_error();
}

TEST_F(CApi, UnknownStringsAndBadParamsAreRefusedBeforeAnythingIsOpened) {
  zo2_session* s = nullptr;
  auto init_with = [&](auto edit) {
    zo2_session_params p = params();
    edit(p);
    const int rc = zo2_session_init(model_, &p, &s);
    EXPECT_EQ(s, nullptr);
    return rc;
  };
  EXPECT_ERROR(init_with([](auto& p) { p.device = "tpu:0"; }), ZO2_ERR_INVALID_ARGUMENT, "device", "tpu:0");
  EXPECT_ERROR(init_with([](auto& p) { p.device = nullptr; }), ZO2_ERR_INVALID_ARGUMENT, "device", "NULL");
  EXPECT_ERROR(init_with([](auto& p) { p.storage_dtype = "fp13"; }), ZO2_ERR_INVALID_ARGUMENT, "storage_dtype",
               "fp13");
  EXPECT_ERROR(init_with([](auto& p) { p.compute_dtype = "int4"; }), ZO2_ERR_INVALID_ARGUMENT, "compute_dtype",
               "int4");
  // A known dtype that cannot be used there.
  EXPECT_ERROR(init_with([](auto& p) { p.compute_dtype = "fp8"; }), ZO2_ERR_UNSUPPORTED, "compute_dtype", "fp8");
  EXPECT_ERROR(init_with([](auto& p) { p.save_dtype = "float12"; }), ZO2_ERR_INVALID_ARGUMENT, "save_dtype");
  EXPECT_ERROR(init_with([](auto& p) { p.offload = 7; }), ZO2_ERR_INVALID_ARGUMENT, "offload", "7");
  EXPECT_ERROR(init_with([](auto& p) { p.window = 0; }), ZO2_ERR_INVALID_ARGUMENT, "window");
  EXPECT_ERROR(init_with([](auto& p) { p.max_seqs = 0; }), ZO2_ERR_INVALID_ARGUMENT, "max_seqs");
  EXPECT_ERROR(init_with([](auto& p) { p.max_seq_len = -1; }), ZO2_ERR_INVALID_ARGUMENT, "max_seq_len");
  EXPECT_ERROR(init_with([](auto& p) { p.max_seq_len = 100000; }), ZO2_ERR_INVALID_ARGUMENT, "max_seq_len",
               "max_position_embeddings");
  EXPECT_ERROR(init_with([](auto& p) { p.eps = 0; }), ZO2_ERR_INVALID_ARGUMENT, "eps");
  EXPECT_ERROR(init_with([](auto& p) { p.lr = -1; }), ZO2_ERR_INVALID_ARGUMENT, "lr");
  EXPECT_ERROR(init_with([](auto& p) { p.lr = NAN; }), ZO2_ERR_INVALID_ARGUMENT, "lr");
  EXPECT_ERROR(init_with([](auto& p) { p.seed_log_path = ""; }), ZO2_ERR_INVALID_ARGUMENT, "seed_log_path");
  EXPECT_ERROR(init_with([](auto& p) {
                 p.seed_log_path = "/nonexistent-dir/evaluation-only.jsonl";
                 p.training = 0;
               }),
               ZO2_ERR_INVALID_ARGUMENT, "seed_log_path is set but training is 0");
  EXPECT_ERROR(init_with([](auto& p) { p.first_step = -2; }), ZO2_ERR_INVALID_ARGUMENT, "first_step");
  // CUDA in this (CPU-only) build, or a device index that does not exist.
  EXPECT_LT(init_with([](auto& p) { p.device = "cuda:63"; }), 0);
  EXPECT_FALSE(std::string(zo2_last_error()).empty());
  // An ordinal is digits only: no wrap-around of a huge N, no sign or blank.
  for (const char* bad : {"cuda:4294967297", "cuda:+1", "cuda: 1", "cuda:1x"})
    EXPECT_ERROR(init_with([bad](auto& p) { p.device = bad; }), ZO2_ERR_INVALID_ARGUMENT, bad, "an ordinal");

  open(params());
  EXPECT_ERROR(zo2_session_set_lr(session_, -1e-3f), ZO2_ERR_INVALID_ARGUMENT, "lr");
  EXPECT_ERROR(zo2_session_set_lr(session_, INFINITY), ZO2_ERR_INVALID_ARGUMENT, "lr");
  EXPECT_EQ(zo2_session_set_lr(session_, 2e-4f), 0);
}

// Issue 16 #4 and #12 from the C side: the ranges zo2-tune's flags are checked against
// (api/options.h) apply to the params fields, named as fields; a compute dtype the device
// does not run is ZO2_ERR_UNSUPPORTED at init (it used to return 0, and every step then
// failed with "cpu add: y is bf16").
TEST_F(CApi, ParamsOutsideTheSharedRangesAreRefusedNamingTheField) {
  zo2_session* s = nullptr;
  auto init_with = [&](auto edit) {
    zo2_session_params p = params();
    edit(p);
    const int rc = zo2_session_init(model_, &p, &s);
    EXPECT_EQ(s, nullptr);
    return rc;
  };
  EXPECT_ERROR(init_with([](auto& p) { p.eps = 2.0f; }), ZO2_ERR_INVALID_ARGUMENT, "eps 2", "(0, 1]");
  EXPECT_ERROR(init_with([](auto& p) { p.eps = 1e30f; }), ZO2_ERR_INVALID_ARGUMENT, "eps");
  EXPECT_ERROR(init_with([](auto& p) { p.eps = INFINITY; }), ZO2_ERR_INVALID_ARGUMENT, "eps inf");
  EXPECT_ERROR(init_with([](auto& p) { p.lr = INFINITY; }), ZO2_ERR_INVALID_ARGUMENT, "lr inf");
  EXPECT_ERROR(init_with([](auto& p) { p.weight_decay = NAN; }), ZO2_ERR_INVALID_ARGUMENT, "weight_decay nan");
  EXPECT_ERROR(init_with([](auto& p) { p.weight_decay = -0.5f; }), ZO2_ERR_INVALID_ARGUMENT, "weight_decay -0.5");
  EXPECT_ERROR(init_with([](auto& p) { p.window = 65; }), ZO2_ERR_INVALID_ARGUMENT, "window 65");
  EXPECT_ERROR(init_with([](auto& p) { p.n_threads = -1; }), ZO2_ERR_INVALID_ARGUMENT, "n_threads -1");
  EXPECT_ERROR(init_with([](auto& p) { p.max_seqs = 1 << 21; }), ZO2_ERR_INVALID_ARGUMENT, "max_seqs 2097152");
  EXPECT_ERROR(init_with([](auto& p) { p.save_shard_bytes = 0; }), ZO2_ERR_INVALID_ARGUMENT, "save_shard_bytes 0");
  EXPECT_ERROR(init_with([](auto& p) { p.prefix_tokens = -1; }), ZO2_ERR_INVALID_ARGUMENT, "prefix_tokens -1",
               "[1, 1024]");
  EXPECT_ERROR(init_with([](auto& p) { p.lora_r = -2; }), ZO2_ERR_INVALID_ARGUMENT, "lora_r -2");
  // The disk tier's fields.
  EXPECT_ERROR(init_with([](auto& p) { p.disk_lag = 0; }), ZO2_ERR_INVALID_ARGUMENT, "disk_lag 0");
  EXPECT_ERROR(init_with([](auto& p) { p.disk_staging = 65; }), ZO2_ERR_INVALID_ARGUMENT, "disk_staging 65");
  EXPECT_ERROR(init_with([](auto& p) { p.disk_dir = "somewhere"; }), ZO2_ERR_INVALID_ARGUMENT, "disk_dir somewhere",
               "host_mem_bytes");
  EXPECT_ERROR(init_with([](auto& p) { p.disk_dir = ""; }), ZO2_ERR_INVALID_ARGUMENT, "disk_dir is empty");
  // "" as the other string fields (zo/parallel.cpp reads it as one process, zo2-tune's flag not given).
  EXPECT_ERROR(init_with([](auto& p) { p.parallel = ""; }), ZO2_ERR_INVALID_ARGUMENT, "parallel is empty (use NULL");
  EXPECT_ERROR(init_with([](auto& p) {
                 p.host_mem_bytes = 400u << 10;
                 p.disk_staging = 1;
                 p.offload = ZO2_OFFLOAD_ALL;
               }),
               ZO2_ERR_INVALID_ARGUMENT, "give disk_dir DIR");  // the field, not zo2-tune's --disk-dir
  // Below the disk tier's floor: with a disk_dir, the floor; without one, that the weights
  // need more and disk_dir is not set (not the floor as the minimum: adversarial pass 69, F5).
  const std::string floor_dir = (*tmp_ / "floor-blocks").string();
  EXPECT_ERROR(init_with([&](auto& p) { p.host_mem_bytes = 100u << 10, p.disk_dir = floor_dir.c_str(); }),
               ZO2_ERR_OUT_OF_MEMORY, "host needs at least", "host_mem_bytes 100.00 KiB");
  EXPECT_ERROR(init_with([](auto& p) { p.host_mem_bytes = 100u << 10; }), ZO2_ERR_INVALID_ARGUMENT,
               "host_mem_bytes 100.00 KiB: the master weights need", "none can move to disk",
               "raise host_mem_bytes to");
  EXPECT_EQ(std::string(zo2_last_error()).find("host needs at least"), std::string::npos) << zo2_last_error();
  EXPECT_ERROR(init_with([](auto& p) { p.host_mem_bytes = 100u << 10, p.offload = ZO2_OFFLOAD_ALL; }),
               ZO2_ERR_INVALID_ARGUMENT, "host_mem_bytes 100.00 KiB: the master weights need",
               "disk_dir, where the blocks that do not fit would go, is not set");
  EXPECT_EQ(std::string(zo2_last_error()).find("host needs at least"), std::string::npos) << zo2_last_error();
  EXPECT_EQ(std::string(zo2_last_error()).find("--"), std::string::npos) << zo2_last_error();
  {
    zo2_session_params p = params();
    p.host_mem_bytes = 400u << 10;
    p.disk_staging = 1;
    p.offload = ZO2_OFFLOAD_ALL;
    p.gpu_mem_bytes = 1u << 30;
    zo2_plan_result plan;
    ASSERT_EQ(zo2_plan(model_, &p, &plan), 0) << zo2_last_error();
    EXPECT_EQ(plan.n_disk_blocks, 2);
    EXPECT_GT(plan.disk_file_bytes, 2 * plan.block_bytes);
    EXPECT_EQ(plan.disk_read_bytes_per_step, 2 * plan.block_bytes);
    EXPECT_GT(plan.predicted_disk_s, 0);
  }
  // Sub-block streaming's field: auto (0), whole blocks only (-1) or the bytes of a tile.
  EXPECT_ERROR(init_with([](auto& p) { p.tile_bytes = -2; }), ZO2_ERR_INVALID_ARGUMENT, "tile_bytes -2",
               "-1 = whole blocks only");
  {
    zo2_session_params p = params();
    p.offload = ZO2_OFFLOAD_ALL;
    p.gpu_mem_bytes = 1u << 30;
    zo2_plan_result plan;
    ASSERT_EQ(zo2_plan(model_, &p, &plan), 0) << zo2_last_error();
    EXPECT_EQ(plan.tile_slots, 0);
    EXPECT_GT(plan.window, 0);
    p.tile_bytes = 4096;
    ASSERT_EQ(zo2_plan(model_, &p, &plan), 0) << zo2_last_error();
    EXPECT_EQ(plan.window, 0);
    EXPECT_GT(plan.tile_slots, 1);
    EXPECT_GT(plan.tiles_per_block, 6);
    EXPECT_GT(plan.tile_slot_bytes, 0u);
    EXPECT_LT(plan.tile_slot_bytes, plan.block_bytes);
    zo2_session* s = nullptr;
    ASSERT_EQ(zo2_session_init(model_, &p, &s), 0) << zo2_last_error();
    zo2_session_free(s);
  }
  for (const char* dt : {"bf16", "fp16"}) {
    EXPECT_ERROR(init_with([&](auto& p) { p.compute_dtype = dt; }), ZO2_ERR_UNSUPPORTED, "compute_dtype", dt,
                 "CPU backend");
    zo2_session_params p = params();
    p.compute_dtype = dt;
    p.gpu_mem_bytes = 64u << 20;
    zo2_plan_result plan;
    EXPECT_ERROR(zo2_plan(model_, &p, &plan), ZO2_ERR_UNSUPPORTED, "compute_dtype", dt);
  }
  // The edges of the ranges open.
  zo2_session_params p = params();
  p.eps = 1.0f;
  p.lr = 0.0f;
  p.storage_dtype = "bf16";  // narrow storage, fp32 compute: what the CPU backend runs
  open(p);
  ASSERT_NE(session_, nullptr);
  const zo2_batch b = batch();
  zo2_step_result r;
  EXPECT_EQ(zo2_session_step(session_, &b, &r), 0) << zo2_last_error();
  EXPECT_ERROR(zo2_session_set_lr(session_, NAN), ZO2_ERR_INVALID_ARGUMENT, "lr nan");
}

// The update rule's fields (README "Update rules"): each bad value is refused at init (and by
// zo2_plan) before anything is opened, naming the field as the header spells it — not
// zo2-tune's flag — and the value. The rule's own checks (zo/rule.h validate_rule) run
// with the params' weight_decay, so zo-sgd-cons with weight decay fails at init.
TEST_F(CApi, BadUpdateRuleFieldsAreRefusedNamingTheField) {
  zo2_session* s = nullptr;
  auto init_with = [&](auto edit) {
    zo2_session_params p = params();
    edit(p);
    const int rc = zo2_session_init(model_, &p, &s);
    EXPECT_EQ(s, nullptr);
    return rc;
  };
  constexpr int invalid = ZO2_ERR_INVALID_ARGUMENT;
  EXPECT_ERROR(init_with([](auto& p) { p.optimizer = "zo-lbfgs"; }), invalid, "optimizer", "zo-lbfgs",
               "zo-sgd-momentum");
  EXPECT_ERROR(init_with([](auto& p) { p.optimizer = "ZO-ADAM"; }), invalid, "optimizer", "ZO-ADAM");
  EXPECT_ERROR(init_with([](auto& p) { p.optimizer = nullptr; }), invalid, "optimizer", "NULL");
  EXPECT_ERROR(init_with([](auto& p) { p.directions = 0; }), invalid, "directions 0", "[1, 64]");
  EXPECT_ERROR(init_with([](auto& p) { p.directions = 65; }), invalid, "directions 65", "[1, 64]");
  EXPECT_ERROR(init_with([](auto& p) { p.directions = -1; }), invalid, "directions -1");
  EXPECT_ERROR(init_with([](auto& p) { p.difference = "sideways"; }), invalid, "difference", "sideways",
               "central", "forward");
  EXPECT_ERROR(init_with([](auto& p) { p.difference = nullptr; }), invalid, "difference", "NULL");
  // zo-sgd-cons: one direction, no weight decay (as ZO-Bench's conservative step).
  EXPECT_ERROR(init_with([](auto& p) {
                 p.optimizer = "zo-sgd-cons";
                 p.weight_decay = 0.1f;
               }),
               invalid, "zo-sgd-cons", "weight_decay 0.1");
  EXPECT_ERROR(init_with([](auto& p) {
                 p.optimizer = "zo-sgd-cons";
                 p.directions = 2;
               }),
               invalid, "zo-sgd-cons", "directions");
  // The state's dtype: fp32, bf16 or fp8. An unknown name is an invalid argument; fp16, a
  // dtype zo2 knows but keeps no state in, is ZO2_ERR_UNSUPPORTED like every known dtype a
  // field does not take (compute_dtype "fp8" above, storage_dtype "fp64"); the message names
  // the field and what it takes either way.
  EXPECT_ERROR(init_with([](auto& p) {
                 p.optimizer = "zo-adam";
                 p.state_dtype = "fp16";
               }),
               ZO2_ERR_UNSUPPORTED, "state_dtype", "fp16", "fp32, bf16, fp8");
  EXPECT_ERROR(init_with([](auto& p) {
                 p.optimizer = "zo-sgd-momentum";
                 p.state_dtype = "fp7";
               }),
               invalid, "state_dtype", "fp7");
  EXPECT_ERROR(init_with([](auto& p) {
                 p.optimizer = "zo-adam";
                 p.state_dtype = nullptr;
               }),
               invalid, "state_dtype", "NULL");
  // ... whatever the optimizer, as the other rule fields (README: a value no rule takes is an
  // error, not ignored).
  EXPECT_ERROR(init_with([](auto& p) { p.state_dtype = "int4"; }), invalid, "state_dtype", "int4");
  EXPECT_ERROR(init_with([](auto& p) { p.state_dtype = "fp16"; }), ZO2_ERR_UNSUPPORTED, "state_dtype", "fp16");
  // The hyper-parameters of the stateful rules, named as fields.
  EXPECT_ERROR(init_with([](auto& p) {
                 p.optimizer = "zo-sgd-momentum";
                 p.momentum = 1.0f;
               }),
               invalid, "momentum 1", "[0, 1)");
  EXPECT_ERROR(init_with([](auto& p) {
                 p.optimizer = "zo-adam";
                 p.beta1 = -0.1f;
               }),
               invalid, "beta1 -0.1", "[0, 1)");
  EXPECT_ERROR(init_with([](auto& p) {
                 p.optimizer = "zo-adam";
                 p.beta2 = NAN;
               }),
               invalid, "beta2 nan");
  EXPECT_ERROR(init_with([](auto& p) {
                 p.optimizer = "zo-adam";
                 p.adam_eps = 0.0f;
               }),
               invalid, "adam_eps 0", "positive");
  // The plan query checks the same fields.
  {
    zo2_session_params p = params();
    p.directions = 65;
    zo2_plan_result plan;
    EXPECT_ERROR(zo2_plan(model_, &p, &plan), invalid, "directions 65");
  }
  // The rules' numbers and state dtype are checked whatever the optimizer (a value no rule
  // takes is a mistake, not ignored); a valid state dtype zo-sgd does not use is left alone.
  EXPECT_ERROR(init_with([](auto& p) { p.beta1 = 5.0f; }), invalid, "beta1 5", "checked for every optimizer");
  EXPECT_ERROR(init_with([](auto& p) { p.momentum = -1.0f; }), invalid, "momentum -1", "checked for every optimizer");
  EXPECT_ERROR(init_with([](auto& p) { p.adam_eps = NAN; }), invalid, "adam_eps nan", "checked for every optimizer");
  zo2_session_params p = params();
  p.state_dtype = "bf16";
  open(p);
  ASSERT_NE(session_, nullptr);
  const zo2_batch b = batch();
  zo2_step_result r;
  EXPECT_EQ(zo2_session_step(session_, &b, &r), 0) << zo2_last_error();
}

TEST_F(CApi, CapBelowThePlansMinimumIsOutOfMemoryAndPlanStillReportsTheMinimum) {
  zo2_session_params p = params();
  p.gpu_mem_bytes = 4096;
  zo2_session* s = nullptr;
  EXPECT_ERROR(zo2_session_init(model_, &p, &s), ZO2_ERR_OUT_OF_MEMORY, "minimum");
  EXPECT_EQ(s, nullptr);

  zo2_plan_result plan;
  EXPECT_ERROR(zo2_plan(model_, &p, &plan), ZO2_ERR_OUT_OF_MEMORY, "minimum");
  EXPECT_GT(plan.minimum_cap_bytes, 4096u);
  EXPECT_EQ(plan.n_blocks, 2);
  // It is the smallest: one byte less fails, and it plans (with weight tiles where whole
  // blocks do not fit: the minimum the error names, not the whole blocks' larger one).
  const std::uint64_t minimum = plan.minimum_cap_bytes;
  p.gpu_mem_bytes = minimum - 1;
  EXPECT_ERROR(zo2_plan(model_, &p, &plan), ZO2_ERR_OUT_OF_MEMORY, "minimum");
  EXPECT_EQ(plan.minimum_cap_bytes, minimum);
  p.gpu_mem_bytes = minimum;
  EXPECT_EQ(zo2_plan(model_, &p, &plan), 0) << zo2_last_error();

  // At the minimum it plans (every block streamed), and a session opens under it.
  p.gpu_mem_bytes = plan.minimum_cap_bytes;
  p.offload = ZO2_OFFLOAD_ALL;
  ASSERT_EQ(zo2_plan(model_, &p, &plan), 0) << zo2_last_error();
  EXPECT_EQ(plan.n_streamed, 2);
  EXPECT_EQ(plan.n_resident, 0);
  EXPECT_LE(plan.device_bytes, plan.cap_bytes);
  ASSERT_EQ(zo2_session_init(model_, &p, &session_), 0) << zo2_last_error();
  zo2_plan_result actual;
  ASSERT_EQ(zo2_session_plan(session_, &actual), 0);
  EXPECT_EQ(actual.n_streamed, plan.n_streamed);
  EXPECT_EQ(actual.device_bytes, plan.device_bytes);
  // The master weights on the host: both block images and the globals.
  EXPECT_GE(plan.host_bytes, 2 * plan.block_bytes + 1);
  EXPECT_LE(plan.host_bytes, 2 * plan.block_bytes + plan.globals_bytes);
  EXPECT_EQ(actual.host_bytes, plan.host_bytes);
  const zo2_batch b = batch();
  zo2_step_result r;
  EXPECT_EQ(zo2_session_step(session_, &b, &r), 0) << zo2_last_error();
  EXPECT_LE(zo2_session_device_peak(session_), p.gpu_mem_bytes);

  // A CUDA plan needs the cap: zo2_plan opens no device.
  p.device = "cuda";
  p.gpu_mem_bytes = 0;
  EXPECT_ERROR(zo2_plan(model_, &p, &plan), ZO2_ERR_INVALID_ARGUMENT, "gpu_mem_bytes");
}

TEST_F(CApi, TheLastErrorBelongsToTheThreadThatFailed) {
  zo2_model* m = nullptr;
  EXPECT_EQ(zo2_model_load(nullptr, nullptr, &m), ZO2_ERR_INVALID_ARGUMENT);
  const std::string mine = zo2_last_error();
  ASSERT_NE(mine.find("hf_dir"), std::string::npos);

  std::string theirs_before, theirs_after;
  std::thread t([&] {
    theirs_before = zo2_last_error();
    zo2_session_params p = zo2_session_default_params();
    zo2_plan_result plan;
    (void)zo2_plan(nullptr, &p, &plan);
    theirs_after = zo2_last_error();
  });
  t.join();
  EXPECT_EQ(theirs_before, "");  // a fresh thread has no error
  EXPECT_NE(theirs_after.find("zo2_plan"), std::string::npos);
  EXPECT_EQ(zo2_last_error(), mine);  // ours is untouched

  // Success does not clear it.
  open(params());
  EXPECT_EQ(zo2_last_error(), mine);
}

struct AbortAfter {
  int calls = 0;
  int stop_at = 0;
  std::vector<std::int64_t> steps;
};

int abort_after(int64_t step, const zo2_step_result* r, void* user_data) {
  auto* a = static_cast<AbortAfter*>(user_data);
  a->steps.push_back(step);
  EXPECT_TRUE(std::isfinite(r->loss_plus));
  return ++a->calls >= a->stop_at ? 1 : 0;
}

TEST_F(CApi, AProgressCallbackThatAsksToStopGivesAborted) {
  AbortAfter a;
  a.stop_at = 2;
  zo2_session_params p = params();
  p.progress_callback = abort_after;
  p.progress_user_data = &a;
  open(p);
  const zo2_batch b = batch();
  zo2_step_result r{};
  EXPECT_EQ(zo2_session_step(session_, &b, &r), 0);
  EXPECT_EQ(zo2_session_step(session_, &b, &r), ZO2_ABORTED);
  EXPECT_NE(std::string(zo2_last_error()).find("progress callback"), std::string::npos);
  EXPECT_GT(r.loss_plus, 0.0f);  // the aborted step completed and reported its losses
  EXPECT_EQ(a.steps, (std::vector<std::int64_t>{0, 1}));
  EXPECT_EQ(zo2_session_step_index(session_), 2);
  // The session stays usable.
  float loss;
  EXPECT_EQ(zo2_session_eval(session_, &b, &loss), 0);
  EXPECT_EQ(zo2_session_step(session_, &b, &r), ZO2_ABORTED);
}

// A C++ host's callback that throws: a stop request (ZO2_ABORTED with the exception's
// message), the step done and the session usable — its weights can still be saved.
TEST_F(CApi, AProgressCallbackThatThrowsStopsWithoutEndingTheSession) {
  zo2_session_params p = params();
  p.progress_callback = [](int64_t step, const zo2_step_result*, void*) -> int {
    if (step == 1) throw std::runtime_error("host bookkeeping failed");
    return 0;
  };
  open(p);
  const zo2_batch b = batch();
  zo2_step_result r{};
  EXPECT_EQ(zo2_session_step(session_, &b, &r), 0);
  EXPECT_EQ(zo2_session_step(session_, &b, &r), ZO2_ABORTED);
  EXPECT_NE(std::string(zo2_last_error()).find("the progress callback threw after step 1: host bookkeeping failed"),
            std::string::npos)
      << zo2_last_error();
  EXPECT_EQ(zo2_session_step_index(session_), 2);
  EXPECT_EQ(zo2_session_step(session_, &b, &r), 0);
  const std::string out = (fs::path(tmp_->path()) / "after-throw").string();
  EXPECT_EQ(zo2_session_save(session_, out.c_str()), 0) << zo2_last_error();
}

TEST_F(CApi, TokenLogprobsAreMinusTheTokenLossesOfAnEval) {
  zo2_session_params p = params();
  open(p);
  std::vector<int32_t> labels = tokens_;
  labels[3] = -100;  // this label is the target of position 2
  std::vector<int32_t> mask(tokens_.size(), 1);
  mask[2 * kTokens - 1] = 0;  // right padding in the second sequence, without a label
  labels[2 * kTokens - 1] = -100;
  const zo2_batch b{kSeqs, kTokens, tokens_.data(), mask.data(), labels.data()};
  // Take a step first, so the logprobs see the flushed update.
  zo2_step_result r;
  ASSERT_EQ(zo2_session_step(session_, &b, &r), 0) << zo2_last_error();
  std::vector<float> lp(kSeqs * kTokens, 123.0f);
  ASSERT_EQ(zo2_session_token_logprobs(session_, &b, lp.data()), 0) << zo2_last_error();
  float loss = 0;
  ASSERT_EQ(zo2_session_eval(session_, &b, &loss), 0);

  // The same weights through the C++ API: one step with the same seed and lr.
  SessionConfig sc;
  sc.max_batch = kSeqs;
  sc.max_seq = kTokens;
  sc.threads = 2;
  sc.run_seed = p.seed;
  Session ref(*model_dir_, sc);
  const HostBatch hb = make_batch(ref.config(), kSeqs, kTokens, tokens_, mask, labels);
  ref.step(hb, p.lr, p.eps, p.weight_decay);
  std::vector<float> token_loss(kSeqs * kTokens);
  EvalOptions o;
  o.token_loss = token_loss.data();
  const float ref_loss = ref.eval(hb, o);
  EXPECT_EQ(ref_loss, loss);

  double sum = 0;
  int counted = 0;
  for (std::size_t i = 0; i < lp.size(); ++i) {
    EXPECT_EQ(lp[i], 0.0f - token_loss[i]) << i;
    EXPECT_LE(lp[i], 0.0f) << i;
    sum -= lp[i];
    counted += lp[i] != 0.0f;
  }
  // No target: the last position of each row, the position before the −100 label, and the
  // position before the padded one. Everything else contributes to the mean loss.
  EXPECT_EQ(lp[kTokens - 1], 0.0f);
  EXPECT_EQ(lp[2], 0.0f);
  EXPECT_EQ(lp[2 * kTokens - 2], 0.0f);
  EXPECT_EQ(lp[2 * kTokens - 1], 0.0f);
  EXPECT_EQ(counted, kSeqs * (kTokens - 1) - 2);
  EXPECT_NEAR(sum / counted, loss, 1e-5 * loss);
}

TEST_F(CApi, LogMessagesGoToTheCallback) {
  struct Sink {
    std::vector<std::string> lines;
  } sink;
  zo2_log_set(
      [](zo2_log_level level, const char* text, void* user_data) {
        static_cast<Sink*>(user_data)->lines.push_back(std::to_string(level) + " " + text);
      },
      &sink);
  zo2_log_set_level(ZO2_LOG_DEBUG);
  open(params());
  zo2_log_set_level(ZO2_LOG_INFO);
  zo2_log_set(nullptr, nullptr);
  bool seen = false;
  for (const auto& l : sink.lines) seen |= l.rfind("0 scheduler:", 0) == 0;
  EXPECT_TRUE(seen) << "no debug line from the scheduler among " << sink.lines.size();
}

// The callback may unregister itself (or install another) on its first message, and may
// call zo2 functions: nothing deadlocks, and later messages go where it said.
TEST_F(CApi, LogCallbackMayReplaceItselfAndCallZo2) {
  static int first_calls = 0, second_calls = 0;
  first_calls = second_calls = 0;
  zo2_log_set(
      [](zo2_log_level, const char*, void*) {
        ++first_calls;
        zo2_log_set([](zo2_log_level, const char*, void*) { ++second_calls; }, nullptr);
        zo2_log_set_level(ZO2_LOG_DEBUG);
      },
      nullptr);
  zo2_log_set_level(ZO2_LOG_DEBUG);
  open(params());
  zo2_session_free(session_);
  open(params());  // logs again: into the second callback
  zo2_session_free(session_);
  session_ = nullptr;
  zo2_log_set_level(ZO2_LOG_INFO);
  zo2_log_set(nullptr, nullptr);
  EXPECT_EQ(first_calls, 1);
  EXPECT_GT(second_calls, 0);
  // One that unregisters itself.
  first_calls = 0;
  zo2_log_set([](zo2_log_level, const char*, void*) { ++first_calls; zo2_log_set(nullptr, nullptr); }, nullptr);
  zo2_log_set_level(ZO2_LOG_DEBUG);
  open(params());
  zo2_log_set_level(ZO2_LOG_INFO);
  EXPECT_EQ(first_calls, 1);
}

TEST_F(CApi, DefaultParamsAreTheDocumentedDefaults) {
  const zo2_session_params p = zo2_session_default_params();
  EXPECT_FLOAT_EQ(p.lr, 1e-6f);
  EXPECT_FLOAT_EQ(p.eps, 1e-3f);
  EXPECT_EQ(p.weight_decay, 0.0f);
  EXPECT_EQ(p.seed, 0u);
  EXPECT_STREQ(p.device, "cpu");
  EXPECT_EQ(p.gpu_mem_bytes, 0u);
  EXPECT_EQ(p.offload, ZO2_OFFLOAD_AUTO);
  EXPECT_EQ(p.window, 3);
  EXPECT_STREQ(p.storage_dtype, "fp32");
  EXPECT_STREQ(p.compute_dtype, "fp32");
  EXPECT_EQ(p.max_seqs, 1);
  EXPECT_EQ(p.max_seq_len, 0);
  EXPECT_EQ(p.training, 1);
  EXPECT_EQ(p.seed_log_path, nullptr);
  EXPECT_STREQ(p.save_dtype, "fp32");
  EXPECT_EQ(p.progress_callback, nullptr);
  // The update rule: one-direction central ZO-SGD, and the stateful rules' torch defaults.
  EXPECT_STREQ(p.optimizer, "zo-sgd");
  EXPECT_EQ(p.directions, 1);
  EXPECT_STREQ(p.difference, "central");
  EXPECT_FLOAT_EQ(p.momentum, 0.9f);
  EXPECT_FLOAT_EQ(p.beta1, 0.9f);
  EXPECT_FLOAT_EQ(p.beta2, 0.999f);
  EXPECT_FLOAT_EQ(p.adam_eps, 1e-8f);
  EXPECT_STREQ(p.state_dtype, "fp32");
  EXPECT_EQ(p.resume_state, 0);
}

// Multiple-choice batches: the loss is MeZO's cross-entropy over the candidates' mean
// log-likelihoods (checked against the token log-probs), and bad groups are refused.
TEST_F(CApi, MultipleChoiceBatchesUseTheCandidateLoss) {
  open(params());
  std::vector<int32_t> labels(tokens_.size(), -100);
  for (int r = 0; r < kSeqs; ++r)  // score the last three tokens of each candidate
    for (int t = kTokens - 3; t < kTokens; ++t) labels[static_cast<std::size_t>(r * kTokens + t)] = tokens_[static_cast<std::size_t>(r * kTokens + t)];
  const std::vector<int32_t> sizes{kSeqs}, answers{1};
  const zo2_batch b{kSeqs, kTokens, tokens_.data(), nullptr, labels.data()};
  const zo2_choices c{1, sizes.data(), answers.data()};
  std::vector<float> lp(kSeqs * kTokens);
  ASSERT_EQ(zo2_session_token_logprobs(session_, &b, lp.data()), 0) << zo2_last_error();
  double expect = 0;
  int row = 0;
  for (std::size_t g = 0; g < sizes.size(); ++g) {
    std::vector<double> score;
    for (int k = 0; k < sizes[g]; ++k, ++row) {
      double s = 0;
      for (int t = kTokens - 4; t < kTokens - 1; ++t) s += lp[static_cast<std::size_t>(row * kTokens + t)];
      score.push_back(s / 3);
    }
    double se = 0;
    for (double x : score) se += std::exp(x);
    expect += std::log(se) - score[static_cast<std::size_t>(answers[g])];
  }
  float loss = 0;
  ASSERT_EQ(zo2_session_eval_choices(session_, &b, &c, &loss), 0) << zo2_last_error();
  EXPECT_NEAR(loss, expect, 1e-5 * std::fabs(expect) + 1e-6);
  zo2_step_result r{};
  ASSERT_EQ(zo2_session_step_choices(session_, &b, &c, &r), 0) << zo2_last_error();
  EXPECT_TRUE(std::isfinite(r.loss_plus) && std::isfinite(r.loss_minus));
  EXPECT_NEAR(0.5 * (r.loss_plus + r.loss_minus), expect, 0.05);  // ±eps around the same weights

  const std::vector<int32_t> short_sizes{kSeqs - 1}, bad_label{kSeqs}, first{0};
  zo2_choices bad{1, short_sizes.data(), first.data()};
  EXPECT_EQ(zo2_session_step_choices(session_, &b, &bad, &r), ZO2_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(zo2_last_error()).find("option groups cover 1 sequences but the batch has 2"), std::string::npos) << zo2_last_error();
  // A size past the batch is refused before any group is expanded (INT_MAX once took ~8 GB).
  const std::vector<int32_t> huge_sizes{std::numeric_limits<int32_t>::max(), 1}, labels2{0, 0};
  bad = zo2_choices{2, huge_sizes.data(), labels2.data()};
  EXPECT_EQ(zo2_session_eval_choices(session_, &b, &bad, &loss), ZO2_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(zo2_last_error()).find("option groups 0..0 cover 2147483647 sequences but the batch has 2"),
            std::string::npos)
      << zo2_last_error();
  bad = c;
  bad.group_labels = bad_label.data();
  EXPECT_EQ(zo2_session_eval_choices(session_, &b, &bad, &loss), ZO2_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(zo2_last_error()).find("label 2 is not one of its 2 candidates"), std::string::npos)
      << zo2_last_error();
  bad = c;
  bad.group_sizes = nullptr;
  EXPECT_EQ(zo2_session_eval_choices(session_, &b, &bad, &loss), ZO2_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(zo2_session_step_choices(session_, &b, nullptr, &r), ZO2_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(zo2_session_step_index(session_), 1);  // the refused calls changed nothing
}

// Note [In use] (api/zo2_c.cpp): a call while another thread is inside one on the session
// is refused, and zo2_session_free then leaks instead of freeing under that call (adversarial
// pass 65: silent corruption, and a free that hung forever).
TEST_F(CApi, ACallWhileAnotherThreadIsInsideOneOnTheSessionIsRefused) {
  struct Gate {
    std::atomic<bool> inside{false}, release{false};
  } gate;
  zo2_session_params p = params();
  p.progress_callback = [](int64_t, const zo2_step_result*, void* u) -> int {
    auto* g = static_cast<Gate*>(u);
    g->inside = true;
    while (!g->release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return 0;
  };
  p.progress_user_data = &gate;
  open(p);
  const zo2_batch b = batch();
  int theirs = 99;
  std::thread stepper([&] { theirs = zo2_session_step(session_, &b, nullptr); });
  while (!gate.inside) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  zo2_step_result r{};
  float loss = 0;
  EXPECT_ERROR(zo2_session_step(session_, &b, &r), ZO2_ERR_INVALID_ARGUMENT,
               "zo2_session_step: the session is in use by another thread (zo2.h: one thread at a time)");
  EXPECT_ERROR(zo2_session_eval(session_, &b, &loss), ZO2_ERR_INVALID_ARGUMENT, "zo2_session_eval", "in use");
  EXPECT_ERROR(zo2_session_set_lr(session_, 0.5f), ZO2_ERR_INVALID_ARGUMENT, "in use");
  const std::string out = (fs::path(tmp_->path()) / "busy").string();
  EXPECT_ERROR(zo2_session_save(session_, out.c_str()), ZO2_ERR_INVALID_ARGUMENT, "in use");
  EXPECT_FALSE(fs::exists(out));
  EXPECT_EQ(zo2_session_step_index(session_), -1);
  // Freeing under the running call would make it read freed memory (or wait forever): the
  // session is leaked, with an error, and the free returns at once.
  zo2_session_free(session_);
  EXPECT_NE(std::string(zo2_last_error()).find("zo2_session_free: the session is in use by another thread"),
            std::string::npos)
      << zo2_last_error();
  gate.release = true;
  stepper.join();
  EXPECT_EQ(theirs, 0);
  // Nothing refused changed the session (not leaked after all: the test frees it now).
  EXPECT_EQ(zo2_session_step_index(session_), 1);
  EXPECT_EQ(zo2_session_step(session_, &b, &r), 0) << zo2_last_error();
  EXPECT_EQ(zo2_session_step_index(session_), 2);
}

// What a step's progress callback may call on its session (zo2.h): eval, save, set_lr and
// the queries work; a nested step or generation, which waited forever for the running step,
// is refused (adversarial pass 65).
struct Nested {
  zo2_session* s = nullptr;
  zo2_batch b{};
  std::string out;
  std::vector<std::string> failures;
  int calls = 0;
  void expect(bool ok, const std::string& what) {
    if (!ok) failures.push_back(what + ": " + zo2_last_error());
  }
};

TEST_F(CApi, AProgressCallbackMayEvalSaveAndQueryButNotStepOrGenerate) {
  Nested n;
  zo2_session_params p = params();
  p.generate_seqs = 1;
  p.progress_callback = [](int64_t step, const zo2_step_result*, void* u) -> int {
    auto& n = *static_cast<Nested*>(u);
    ++n.calls;
    float loss = 0;
    n.expect(zo2_session_eval(n.s, &n.b, &loss) == 0 && loss > 0, "eval");
    std::vector<float> lp(static_cast<std::size_t>(n.b.n_seq * n.b.n_tokens));
    n.expect(zo2_session_token_logprobs(n.s, &n.b, lp.data()) == 0, "token_logprobs");
    n.expect(zo2_session_save(n.s, n.out.c_str()) == 0, "save");
    n.expect(zo2_session_set_lr(n.s, 2e-3f) == 0, "set_lr");
    n.expect(zo2_session_step_index(n.s) == step + 1, "step_index");
    int32_t rank = -1, size = -1;
    n.expect(zo2_session_rank(n.s, &rank, &size) == 0 && rank == 0 && size == 1, "rank");
    zo2_plan_result plan{};
    n.expect(zo2_session_plan(n.s, &plan) == 0, "plan");
    const std::string why = "called from the session's progress callback, inside zo2_session_step";
    n.expect(zo2_session_step(n.s, &n.b, nullptr) == ZO2_ERR_INVALID_ARGUMENT &&
                 std::string(zo2_last_error()).find("zo2_session_step: " + why) != std::string::npos,
             "nested step refused");
    const std::vector<int32_t> sizes{n.b.n_seq}, labels{0};
    const zo2_choices c{1, sizes.data(), labels.data()};
    n.expect(zo2_session_step_choices(n.s, &n.b, &c, nullptr) == ZO2_ERR_INVALID_ARGUMENT &&
                 std::string(zo2_last_error()).find(why) != std::string::npos,
             "nested step_choices refused");
    const int32_t* prompts[] = {n.b.tokens};
    const int32_t lens[] = {4};
    int32_t toks[2], out_lens[1];
    zo2_generate_params g = zo2_generate_default_params();
    g.max_new_tokens = 2;
    n.expect(zo2_generate(n.s, prompts, lens, 1, &g, toks, out_lens, nullptr) == ZO2_ERR_INVALID_ARGUMENT &&
                 std::string(zo2_last_error()).find("zo2_generate: " + why) != std::string::npos,
             "nested generate refused");
    return 0;
  };
  p.progress_user_data = &n;
  open(p);
  n.s = session_;
  n.b = batch();
  n.out = (fs::path(tmp_->path()) / "from-callback").string();
  zo2_step_result r{};
  EXPECT_EQ(zo2_session_step(session_, &n.b, &r), 0) << zo2_last_error();
  EXPECT_EQ(n.calls, 1);
  EXPECT_EQ(n.failures, std::vector<std::string>{});
  EXPECT_TRUE(fs::exists(fs::path(n.out) / "config.json"));
  // The refused nested calls changed nothing: one step counted, and the session goes on.
  EXPECT_EQ(zo2_session_step_index(session_), 1);
  EXPECT_EQ(zo2_session_step(session_, &n.b, &r), 0) << zo2_last_error();
  EXPECT_EQ(zo2_session_step_index(session_), 2);
}

// zo2_session_free from the step's progress callback: freed as zo2_session_step returns
// (the step still reads the session after the callback).
TEST_F(CApi, AProgressCallbackMayFreeItsSession) {
  zo2_session_params p = params();
  p.progress_callback = [](int64_t, const zo2_step_result*, void* u) -> int {
    auto** s = static_cast<zo2_session**>(u);
    zo2_session_free(*s);
    *s = nullptr;
    return 1;
  };
  p.progress_user_data = &session_;
  open(p);
  const zo2_batch b = batch();
  zo2_step_result r{};
  EXPECT_EQ(zo2_session_step(session_, &b, &r), ZO2_ABORTED) << zo2_last_error();
  EXPECT_EQ(session_, nullptr);
  EXPECT_GT(r.loss_plus, 0.0f);
}

// zo2_generate's callback runs with the generation in flight: the queries, set_lr and a free
// work; an eval or a step is refused (zo2.h).
TEST_F(CApi, AGenerationsProgressCallbackMayOnlyQueryOrFree) {
  Nested n;
  zo2_session_params p = params();
  p.generate_seqs = 1;
  open(p);
  n.s = session_;
  n.b = batch();
  const int32_t* prompts[] = {tokens_.data()};
  const int32_t lens[] = {4};
  int32_t toks[3], out_lens[1];
  zo2_generate_params g = zo2_generate_default_params();
  g.max_new_tokens = 3;
  g.progress_user_data = &n;
  g.progress_callback = [](int64_t, void* u) -> int {
    auto& n = *static_cast<Nested*>(u);
    ++n.calls;
    n.expect(zo2_session_step_index(n.s) == 0, "step_index");
    n.expect(zo2_session_set_lr(n.s, 2e-3f) == 0, "set_lr");
    float loss = 0;
    n.expect(zo2_session_eval(n.s, &n.b, &loss) == ZO2_ERR_INVALID_ARGUMENT &&
                 std::string(zo2_last_error()).find("called from zo2_generate's progress callback") != std::string::npos,
             "eval refused");
    n.expect(zo2_session_step(n.s, &n.b, nullptr) == ZO2_ERR_INVALID_ARGUMENT, "step refused");
    return 0;
  };
  EXPECT_EQ(zo2_generate(session_, prompts, lens, 1, &g, toks, out_lens, nullptr), 0) << zo2_last_error();
  EXPECT_GT(n.calls, 0);
  EXPECT_EQ(n.failures, std::vector<std::string>{});
  // A free there: the generation stops (nonzero) and the session is freed as zo2_generate returns.
  g.progress_user_data = &session_;
  g.progress_callback = [](int64_t, void* u) -> int {
    auto** s = static_cast<zo2_session**>(u);
    zo2_session_free(*s);
    *s = nullptr;
    return 1;
  };
  EXPECT_EQ(zo2_generate(session_, prompts, lens, 1, &g, toks, out_lens, nullptr), ZO2_ABORTED);
  EXPECT_EQ(session_, nullptr);
}

// A model loaded by a relative path keeps its directory: a chdir() before zo2_session_init
// does not make it read another directory (adversarial pass 65: it read a same-named
// checkpoint there, silently).
TEST_F(CApi, AModelLoadedByARelativePathIsReadFromItsDirectoryAfterAChdir) {
  const fs::path before = fs::current_path();
  struct Back {
    fs::path dir;
    ~Back() { fs::current_path(dir); }
  } back{before};
  const fs::path base = fs::path(tmp_->path()) / "relative";
  fs::create_directories(base / "elsewhere");
  fs::copy(*model_dir_, base / "m", fs::copy_options::recursive);
  fs::current_path(base);
  zo2_model* rel = nullptr;
  ASSERT_EQ(zo2_model_load("./m/", nullptr, &rel), 0) << zo2_last_error();
  std::unique_ptr<zo2_model, void (*)(zo2_model*)> own(rel, zo2_model_free);
  fs::current_path(base / "elsewhere");  // no "m" here
  zo2_session_params p = params();
  p.training = 0;
  ASSERT_EQ(zo2_session_init(rel, &p, &session_), 0) << zo2_last_error();
  const zo2_batch b = batch();
  float loss = 0, expected = 0;
  EXPECT_EQ(zo2_session_eval(session_, &b, &loss), 0) << zo2_last_error();
  zo2_session* direct = nullptr;
  ASSERT_EQ(zo2_session_init(model_, &p, &direct), 0) << zo2_last_error();
  EXPECT_EQ(zo2_session_eval(direct, &b, &expected), 0) << zo2_last_error();
  zo2_session_free(direct);
  EXPECT_EQ(loss, expected);
}

// The combination checks zo2-tune's flags have are the C API's too (api/options.h): a field
// that another field gives its meaning to, set (not its documented default) without it, is
// refused, not silently dropped (adversarial pass 69, F1–F4).
TEST_F(CApi, FieldsWithoutTheFieldThatGivesThemAMeaningAreRefused) {
  // Two adapters to start from: LoRA r 2 and a 2-token prefix.
  const fs::path lora = *tmp_ / "combo-lora", prefix = *tmp_ / "combo-prefix";
  for (const auto& [dir, r, n] : {std::tuple{lora, 2, 0}, std::tuple{prefix, 0, 2}}) {
    zo2_session_params p = params();
    p.lora_r = r;
    p.prefix_tokens = n;
    zo2_session* t = nullptr;
    ASSERT_EQ(zo2_session_init(model_, &p, &t), 0) << zo2_last_error();
    ASSERT_EQ(zo2_session_save(t, dir.c_str()), 0) << zo2_last_error();
    zo2_session_free(t);
  }
  zo2_session* s = nullptr;
  auto init_with = [&](auto edit) {
    zo2_session_params p = params();
    edit(p);
    const int rc = zo2_session_init(model_, &p, &s);
    if (rc != 0) EXPECT_EQ(s, nullptr);
    zo2_session_free(s);
    s = nullptr;
    return rc;
  };
  const std::string lora_s = lora.string(), prefix_s = prefix.string();
  // F1: an adapter decides its kind and shape.
  EXPECT_ERROR(init_with([&](auto& p) { p.adapter_path = prefix_s.c_str(), p.lora_r = 2; }), ZO2_ERR_INVALID_ARGUMENT,
               "lora_r ask for LoRA r 2", "adapter_path", "prefix tuning");
  EXPECT_ERROR(init_with([&](auto& p) { p.adapter_path = lora_s.c_str(), p.prefix_tokens = 3; }),
               ZO2_ERR_INVALID_ARGUMENT, "prefix_tokens 3 with adapter_path", "LoRA r 2");
  EXPECT_ERROR(init_with([&](auto& p) { p.adapter_path = lora_s.c_str(), p.lora_r = 4; }), ZO2_ERR_INVALID_ARGUMENT,
               "lora_r ask for LoRA r 4", "is LoRA r 2");
  EXPECT_ERROR(init_with([&](auto& p) { p.adapter_path = lora_s.c_str(), p.lora_alpha = 1.0f; }),
               ZO2_ERR_INVALID_ARGUMENT, "lora_alpha ask for");
  EXPECT_ERROR(init_with([&](auto& p) { p.adapter_path = lora_s.c_str(), p.lora_targets = "fc1"; }),
               ZO2_ERR_INVALID_ARGUMENT, "lora_targets ask for");
  // The adapter's own shape, given again, is no change.
  EXPECT_EQ(init_with([&](auto& p) { p.adapter_path = lora_s.c_str(), p.lora_r = 2; }), 0) << zo2_last_error();
  // F2: LoRA's shape without LoRA, or with prefix tuning.
  EXPECT_ERROR(init_with([](auto& p) { p.lora_alpha = 4.0f; }), ZO2_ERR_INVALID_ARGUMENT, "lora_alpha 4",
               "needs lora_r > 0");
  EXPECT_ERROR(init_with([](auto& p) { p.lora_targets = "fc1"; }), ZO2_ERR_INVALID_ARGUMENT, "lora_targets 'fc1'",
               "needs lora_r > 0");
  EXPECT_ERROR(init_with([](auto& p) { p.prefix_tokens = 2, p.lora_alpha = 4.0f; }), ZO2_ERR_INVALID_ARGUMENT,
               "prefix_tokens and lora_alpha: choose one kind of adapter");
  EXPECT_ERROR(init_with([](auto& p) { p.prefix_tokens = 2, p.lora_targets = "fc1,fc2"; }), ZO2_ERR_INVALID_ARGUMENT,
               "prefix_tokens and lora_targets: choose one kind of adapter");
  EXPECT_ERROR(init_with([](auto& p) { p.prefix_tokens = 2, p.lora_r = 2; }), ZO2_ERR_INVALID_ARGUMENT,
               "prefix_tokens and lora_r: choose one kind of adapter");
  // F3: an adapter run saves fp32 adapters.
  EXPECT_ERROR(init_with([](auto& p) { p.lora_r = 2, p.save_dtype = "bf16"; }), ZO2_ERR_INVALID_ARGUMENT,
               "save_dtype bf16: an adapter run");
  EXPECT_ERROR(init_with([](auto& p) { p.prefix_tokens = 2, p.save_dtype = "bf16"; }), ZO2_ERR_INVALID_ARGUMENT,
               "save_dtype bf16: an adapter run");
  // F4: the disk tier's fields without the tier; the seed log's and generation's.
  EXPECT_ERROR(init_with([](auto& p) { p.disk_lag = 4; }), ZO2_ERR_INVALID_ARGUMENT, "disk_lag 4 is for the disk tier",
               "host_mem_bytes");
  EXPECT_ERROR(init_with([](auto& p) { p.disk_staging = 4; }), ZO2_ERR_INVALID_ARGUMENT,
               "disk_staging 4 is for the disk tier");
  EXPECT_ERROR(init_with([](auto& p) { p.seed_log_append = 1; }), ZO2_ERR_INVALID_ARGUMENT,
               "seed_log_append is set but seed_log_path is NULL");
  EXPECT_ERROR(init_with([](auto& p) { p.kv_cache = "host"; }), ZO2_ERR_INVALID_ARGUMENT, "kv_cache host",
               "generate_seqs > 0");
  EXPECT_ERROR(init_with([](auto& p) { p.prefill_chunk = 8; }), ZO2_ERR_INVALID_ARGUMENT, "prefill_chunk 8",
               "generate_seqs > 0");
  EXPECT_EQ(std::string(zo2_last_error()).find("--"), std::string::npos) << zo2_last_error();
  // With the fields that give them their meaning, each is taken.
  EXPECT_EQ(init_with([](auto& p) { p.lora_r = 2, p.lora_alpha = 4.0f, p.lora_targets = "fc1"; }), 0)
      << zo2_last_error();
  EXPECT_EQ(init_with([](auto& p) { p.generate_seqs = 1, p.kv_cache = "host", p.prefill_chunk = 8; }), 0)
      << zo2_last_error();
}

}  // namespace
}  // namespace zo2
