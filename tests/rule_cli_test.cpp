// The update rules through zo2-tune, as a user runs them: plain zo-sgd with one direction
// writes the seed log and checkpoint the pre-rules zo2-tune wrote (a fixture made at
// e854a29); a momentum/Adam run stopped and resumed ends with the uninterrupted run's
// weights and state; replay rebuilds both; bad flags are usage errors naming the flag.
#include "tests/test_util.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>


#include <fstream>
#include <sstream>

namespace zo2 {
namespace {

using test::read_file;

namespace fs = std::filesystem;

int run(const std::string& args, std::string* out = nullptr) {
  return test::run_command(test::zo2_tune_path().string() + " " + args, out);
}

// Every line after the header (whose base_model is an absolute path).
std::string entries(const fs::path& log) {
  const std::string s = read_file(log);
  const auto nl = s.find('\n');
  return nl == std::string::npos ? std::string() : s.substr(nl + 1);
}

struct Workspace {
  test::TempDir tmp;
  fs::path model = tmp / "model";
  fs::path data = tmp / "data.safetensors";
  Workspace() {
    std::string out;
    EXPECT_EQ(run("init --preset opt-tiny --out " + model.string() + " --seed 1 -q", &out), 0) << out;
    EXPECT_EQ(run("synth-data --model " + model.string() + " --out " + data.string() + " --rows 64 --seq 32 -q", &out), 0)
        << out;
  }
  std::string train(const std::string& out_dir, const std::string& extra) const {
    return "train --model " + model.string() + " --data " + data.string() + " --out " + (tmp / out_dir).string() +
           " --steps 6 --batch-size 4 --lr 3e-3 --eps 1e-3 --seed 5 --offload all --gpu-mem 4M -q " + extra;
  }
};

TEST(RuleCli, PlainZoSgdWritesThePreRulesSeedLogAndCheckpoint) {
  Workspace w;
  std::string out;
  ASSERT_EQ(run(w.train("run", "--weight-decay 0.01 --optimizer zo-sgd --directions 1 --difference central"), &out), 0)
      << out;
  const fs::path fixtures = fs::path(__FILE__).parent_path() / "data" / "rules";
  EXPECT_EQ(entries(w.tmp / "run/seed_log.jsonl"), read_file(fixtures / "zo_sgd_e854a29.jsonl"));
  ASSERT_EQ(test::run_command("sha256sum " + (w.tmp / "run/current/model.safetensors").string(), &out), 0);
  std::string want = read_file(fixtures / "zo_sgd_e854a29.model.sha256");
  want = want.substr(0, 64);
  EXPECT_EQ(out.substr(0, 64), want) << "the checkpoint differs from the one the pre-rules zo2-tune wrote";
  EXPECT_EQ(read_file(w.tmp / "run/seed_log.jsonl").find("optimizer"), std::string::npos);
}

// The loss each --log-json record reports is L(θ): the forward difference's own L0
// (loss_minus), not ½(L(θ + eps·z) + L(θ)), which is off by ½·eps·g; the central pair's mean
// otherwise (L(θ) to O(eps²)).
TEST(RuleCli, TheReportedLossIsTheForwardDifferencesOwnLossAtTheta) {
  Workspace w;
  for (const std::string difference : {"forward", "central"}) {
    const fs::path log = w.tmp / (difference + ".jsonl");
    std::string out;
    ASSERT_EQ(run(w.train(difference, "--difference " + difference + " --log-json " + log.string()), &out), 0) << out;
    std::istringstream in(read_file(log));
    int records = 0;
    for (std::string line; std::getline(in, line);) {
      const auto j = nlohmann::json::parse(line);
      if (!j.contains("loss_plus")) continue;
      ++records;
      const double lp = j["loss_plus"].get<double>(), lm = j["loss_minus"].get<double>();
      ASSERT_NE(lp, lm) << line;
      EXPECT_EQ(j["loss"].get<double>(), difference == "forward" ? lm : 0.5 * (lp + lm)) << difference << ": " << line;
    }
    EXPECT_EQ(records, 6) << difference;
  }
}

// Stopped at step 3 and resumed: the same weights, state and seed log as a run that never
// stopped — for each stateful rule and state dtype.
TEST(RuleCli, StatefulRulesResumeExactlyAndReplayRebuildsWeightsAndState) {
  Workspace w;
  for (const std::string rule : {"--optimizer zo-adam --state-dtype bf16 --directions 2",
                                 "--optimizer zo-sgd-momentum --momentum 0.8 --state-dtype fp8",
                                 "--optimizer zo-sgd-cons --difference forward"}) {
    std::string out;
    const std::string tag = std::to_string(std::hash<std::string>{}(rule) % 100000);
    ASSERT_EQ(run(w.train("full" + tag, rule), &out), 0) << rule << ": " << out;
    ASSERT_EQ(run(w.train("part" + tag, rule + " --stop-at 3"), &out), 0) << rule << ": " << out;
    ASSERT_EQ(run("train --resume " + (w.tmp / ("part" + tag)).string() + " --out " + (w.tmp / ("part" + tag)).string() +
                      " -q",
                  &out),
              0)
        << rule << ": " << out;
    const fs::path full = w.tmp / ("full" + tag) / "current", part = w.tmp / ("part" + tag) / "current";
    EXPECT_EQ(read_file(full / "model.safetensors"), read_file(part / "model.safetensors")) << rule;
    const bool stateful = rule.find("cons") == std::string::npos;
    EXPECT_EQ(fs::exists(full / "optimizer_state.safetensors"), stateful) << rule;
    if (stateful) {
      EXPECT_EQ(read_file(full / "optimizer_state.safetensors"), read_file(part / "optimizer_state.safetensors")) << rule;
    }
    EXPECT_EQ(entries(w.tmp / ("full" + tag) / "seed_log.jsonl"), entries(w.tmp / ("part" + tag) / "seed_log.jsonl"))
        << rule;
    // Replay from the base model and the log alone.
    const fs::path rep = w.tmp / ("replay" + tag);
    ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (w.tmp / ("full" + tag) / "seed_log.jsonl").string() +
                      " --out " + rep.string() + " -q",
                  &out),
              0)
        << rule << ": " << out;
    EXPECT_EQ(read_file(full / "model.safetensors"), read_file(rep / "current/model.safetensors")) << rule;
    if (stateful) {
      EXPECT_EQ(read_file(full / "optimizer_state.safetensors"), read_file(rep / "current/optimizer_state.safetensors"))
          << rule;
    }
  }
}

TEST(RuleCli, AResumeKeepsTheRunsRuleAndAMissingStateIsNamed) {
  Workspace w;
  std::string out;
  ASSERT_EQ(run(w.train("part", "--optimizer zo-adam --stop-at 2"), &out), 0) << out;
  const std::string resume = "train --resume " + (w.tmp / "part").string() + " --out " + (w.tmp / "part").string() + " -q ";
  EXPECT_EQ(run(resume + "--optimizer zo-sgd", &out), 2) << out;
  EXPECT_NE(out.find("zo-adam"), std::string::npos) << out;
  // Deleting the state the manifest lists is caught by the checksums; a run directory whose
  // manifest never had it (edited by hand) is caught by the state's own check.
  fs::remove(fs::read_symlink(w.tmp / "part/current").is_absolute()
                 ? fs::read_symlink(w.tmp / "part/current") / "optimizer_state.safetensors"
                 : w.tmp / "part" / fs::read_symlink(w.tmp / "part/current") / "optimizer_state.safetensors");
  EXPECT_EQ(run(resume, &out), 1) << out;
  EXPECT_NE(out.find("optimizer_state.safetensors"), std::string::npos) << out;
}

// A flag given again on --resume is compared with the run's value; the others stay the
// run's (they used to be filled with the CLI defaults, so repeating --beta1 alone was refused
// as a zo-sgd flag).
TEST(RuleCli, AResumeAcceptsSomeOfTheRunsRuleFlagsGivenAgain) {
  Workspace w;
  std::string out;
  ASSERT_EQ(run(w.train("run", "--optimizer zo-adam --beta1 0.8 --state-dtype bf16 --directions 2 --stop-at 2"), &out),
            0)
      << out;
  struct Case {
    std::string flags;
    int code;
    std::string says;
  };
  for (const Case& c : {Case{"--beta1 0.8", 0, ""}, Case{"--directions 2", 0, ""}, Case{"--optimizer zo-adam", 0, ""},
                        Case{"--state-dtype bf16 --difference central", 0, ""},
                        Case{"--beta1 0.7", 2, "uses zo-adam (β1 0.8"}, Case{"--directions 3", 2, "3 directions"},
                        Case{"--momentum 0.5", 2, "--momentum does not apply to the run's update rule zo-adam"},
                        Case{"--optimizer zo-sgd", 2, "uses zo-adam"}}) {
    const fs::path copy = w.tmp / "copy";
    fs::remove_all(copy);
    ASSERT_EQ(test::run_command("cp -a " + (w.tmp / "run").string() + " " + copy.string()), 0);
    out.clear();
    EXPECT_EQ(run("train --resume " + copy.string() + " --out " + copy.string() + " --stop-at 3 -q " + c.flags, &out),
              c.code)
        << c.flags << ": " << out;
    if (!c.says.empty()) EXPECT_NE(out.find(c.says), std::string::npos) << c.flags << ": " << out;
  }
}

// A finite checkpoint whose losses are huge (~5e32: the final LayerNorm's weight 1e33)
// gives projected gradients whose squares overflow zo-adam's second moment. The run's save
// refuses the infinite state, naming it, instead of writing a checkpoint --resume refuses
// (and the weights, whose steps m/sqrt(v) are then 0, never moved).
TEST(RuleCli, AnOverflowedAdamStateIsNotSavedAndIsNamed) {
  Workspace w;
  const fs::path huge = w.tmp / "huge";
  test::copy_with_filled_tensor(w.model, huge, "model.decoder.final_layer_norm.weight", 1e33f);
  std::string out;
  EXPECT_EQ(run("train --model " + huge.string() + " --data " + w.data.string() + " --out " + (w.tmp / "adam").string() +
                    " --steps 3 --batch-size 4 --lr 1e-6 --optimizer zo-adam -q",
                &out),
            1)
      << out;
  EXPECT_NE(out.find("zo-adam's second moment overflows to infinity"), std::string::npos) << out;  // at step 1
  EXPECT_NE(out.find("optimizer state tensor"), std::string::npos) << out;
  EXPECT_NE(out.find("holds a non-finite value"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "adam" / "current")) << out;
  // zo-sgd has no state: the same run saves.
  out.clear();
  EXPECT_EQ(run("train --model " + huge.string() + " --data " + w.data.string() + " --out " + (w.tmp / "sgd").string() +
                    " --steps 3 --batch-size 4 --lr 1e-40 -q",
                &out),
            0)
      << out;
}

TEST(RuleCli, BadRuleFlagsAreUsageErrorsNamingTheFlag) {
  Workspace w;
  const std::pair<std::string, std::string> cases[] = {
      {"--optimizer zo-lion", "--optimizer zo-lion"},
      {"--directions 0", "--directions 0"},
      {"--directions 65", "--directions 65"},
      {"--difference sideways", "--difference sideways"},
      {"--momentum 0.5", "--momentum applies to zo-sgd-momentum, not --optimizer zo-sgd"},
      {"--beta1 0.5", "--beta1 applies to zo-adam, not --optimizer zo-sgd"},
      {"--optimizer zo-sgd-sign --state-dtype bf16", "--state-dtype applies to zo-sgd-momentum or zo-adam"},
      {"--optimizer zo-adam --momentum 0.5", "--momentum"},
      {"--optimizer zo-adam --beta2 1", "--beta2 1"},
      {"--optimizer zo-adam --state-dtype fp16", "--state-dtype"},
      {"--optimizer zo-sgd-cons --directions 2", "--directions"},
      {"--optimizer zo-sgd-cons --weight-decay 0.1", "--weight-decay"},
  };
  for (const auto& [flags, needle] : cases) {
    std::string out;
    EXPECT_EQ(run(w.train("bad", flags), &out), 2) << flags << ": " << out;
    EXPECT_NE(out.find(needle), std::string::npos) << flags << ": " << out;
    EXPECT_FALSE(fs::exists(w.tmp / "bad" / "seed_log.jsonl")) << flags;
  }
  std::string help;
  ASSERT_EQ(run("train --help", &help), 0);
  for (const char* flag : {"--optimizer", "--directions", "--difference", "--momentum", "--beta1", "--beta2", "--adam-eps",
                           "--state-dtype"})
    EXPECT_NE(help.find(flag), std::string::npos) << flag;
  // plan shows the state and the passes.
  std::string plan;
  ASSERT_EQ(run("plan --preset opt-tiny --gpu-mem 4M --device cpu --offload all --optimizer zo-adam --directions 2", &plan),
            0)
      << plan;
  EXPECT_NE(plan.find("optimizer state"), std::string::npos) << plan;
  EXPECT_NE(plan.find("forward passes per step"), std::string::npos) << plan;
}

}  // namespace
}  // namespace zo2
