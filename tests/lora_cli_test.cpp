// LoRA through zo2-tune, as a user runs it: train --lora writes an adapter run directory in
// PEFT's layout; eval of that directory, of the base with --adapter, and of the merged
// checkpoint agree; replay and --resume rebuild the adapter bit for bit; bad flags are
// usage errors naming the flag.
#include "tests/test_util.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include <fstream>

namespace zo2 {
namespace {

using test::read_file;

namespace fs = std::filesystem;

int run(const std::string& args, std::string* out = nullptr) {
  return test::run_command(test::zo2_tune_path().string() + " " + args, out);
}

double eval_loss(const std::string& args) {
  std::string out;
  EXPECT_EQ(run("eval " + args + " --json -q", &out), 0) << out;
  const auto brace = out.find('{');
  if (brace == std::string::npos) return -1;
  return nlohmann::json::parse(out.substr(brace)).at("loss").get<double>();
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
           " --steps 8 --batch-size 4 --eps 1e-3 --seed 3 --offload all --gpu-mem 4M -q " + extra;
  }
};

TEST(LoraCli, AnAdapterRunIsEvaluatedOnItsBaseStoredAsItWasTrained) {
  // Adversarial pass 53: eval --model RUN of an fp8 LoRA run loaded an fp32 base, so its loss
  // was not the run's own final evaluation.
  Workspace w;
  for (const char* peft : {"--lora --lora-r 2", "--prefix-tuning --num-prefix 3"}) {
    SCOPED_TRACE(peft);
    const fs::path log = w.tmp / "log.jsonl";
    std::string out;
    ASSERT_EQ(run(w.train("fp8", std::string(peft) + " --storage-dtype fp8 --overwrite --eval " + w.data.string() +
                                     " --log-json " + log.string()),
                  &out), 0) << out;
    const std::string text = read_file(log);
    const auto last = nlohmann::json::parse(text.substr(text.rfind('{')));
    ASSERT_TRUE(last.contains("eval_loss")) << text;
    // (the run's batch: another batch size rounds a prefix run's GEMMs otherwise in the last bits)
    const std::string args = "--model " + (w.tmp / "fp8").string() + " --data " + w.data.string() + " --batch-size 4";
    EXPECT_EQ(eval_loss(args), last.at("eval_loss").get<double>());
    EXPECT_NE(eval_loss(args + " --storage-dtype fp32"), last.at("eval_loss").get<double>()) << "the test would show nothing";
    if (std::string(peft).starts_with("--lora")) {
      // Note [Merging into the base the adapters saw] (tools/cmd_merge.cpp): the merged
      // checkpoint is the model that was evaluated — the adapters folded into the base as
      // stored for them (fp8) — not the full-precision base plus the adapters.
      const fs::path merged = w.tmp / "merged", full = w.tmp / "merged-full";
      ASSERT_EQ(run("merge --model " + (w.tmp / "fp8").string() + " --overwrite --out " + merged.string(), &out), 0) << out;
      ASSERT_EQ(run("merge --model " + (w.tmp / "fp8").string() + " --storage-dtype fp32 --overwrite --out " +
                        full.string(), &out), 0) << out;
      const double run_loss = last.at("eval_loss").get<double>();
      const double as_seen = eval_loss("--model " + merged.string() + " --data " + w.data.string() + " --batch-size 4");
      const double full_base = eval_loss("--model " + full.string() + " --data " + w.data.string() + " --batch-size 4");
      EXPECT_NEAR(as_seen, run_loss, 2e-6);
      EXPECT_GT(std::abs(full_base - run_loss), 1e-5) << "the test would show nothing";
    }
  }
}

TEST(LoraCli, TrainEvalMergeReplayAndResume) {
  Workspace w;
  std::string out;
  const std::string lora = "--lora --lora-r 4 --lora-alpha 8 --lora-targets q_proj,v_proj,fc1 --optimizer zo-adam --lr 1e-3";
  ASSERT_EQ(run(w.train("run", lora), &out), 0) << out;
  const fs::path cur = fs::path(w.tmp / "run") / fs::read_symlink(w.tmp / "run/current");
  EXPECT_TRUE(fs::exists(cur / "adapter_config.json"));
  EXPECT_TRUE(fs::exists(cur / "adapter_model.safetensors"));
  EXPECT_TRUE(fs::exists(cur / "optimizer_state.safetensors"));
  EXPECT_FALSE(fs::exists(cur / "model.safetensors"));
  const nlohmann::json cfg = nlohmann::json::parse(read_file(cur / "adapter_config.json"));
  EXPECT_EQ(cfg.at("base_model_name_or_path").get<std::string>(), fs::absolute(w.model).string());

  const std::string data = " --data " + w.data.string();
  const double base = eval_loss("--model " + w.model.string() + data);
  const double tuned = eval_loss("--model " + (w.tmp / "run").string() + data);
  const double with_adapter = eval_loss("--model " + w.model.string() + " --adapter " + (w.tmp / "run").string() + data);
  EXPECT_EQ(tuned, with_adapter);
  EXPECT_NE(tuned, base);
  ASSERT_EQ(run("merge --model " + (w.tmp / "run").string() + " --out " + (w.tmp / "merged").string() + " -q", &out), 0)
      << out;
  EXPECT_TRUE(fs::exists(w.tmp / "merged/config.json"));
  EXPECT_NEAR(eval_loss("--model " + (w.tmp / "merged").string() + data), tuned, 1e-5);
  // A second merge into the same --out is refused unless --overwrite.
  const std::string merged = read_file(w.tmp / "merged/model.safetensors");
  out.clear();
  EXPECT_EQ(run("merge --model " + (w.tmp / "run").string() + " --out " + (w.tmp / "merged").string(), &out), 2) << out;
  EXPECT_NE(out.find("already holds a checkpoint (config.json, model.safetensors): choose another --out, or pass "
                     "--overwrite"),
            std::string::npos)
      << out;
  ASSERT_EQ(run("merge --model " + (w.tmp / "run").string() + " --out " + (w.tmp / "merged").string() +
                    " --overwrite -q"),
            0);
  EXPECT_EQ(read_file(w.tmp / "merged/model.safetensors"), merged);
  // An adapter on other weights than it was trained on is said.
  ASSERT_EQ(run("init --preset opt-tiny --out " + (w.tmp / "other").string() + " --seed 9 -q"), 0);
  for (const auto& [m, warned] : {std::pair{w.tmp / "other", true}, std::pair{w.model, false}}) {
    out.clear();
    EXPECT_EQ(run("eval --model " + m.string() + " --adapter " + (w.tmp / "run").string() + data, &out), 0) << out;
    // (by the fingerprint its run's seed log records: adversarial pass 58)
    EXPECT_EQ(out.find("was trained on " + fs::absolute(w.model).string() + " (fingerprint ") != std::string::npos &&
                  out.find("not on --model " + m.string() + " (fingerprint ") != std::string::npos,
              warned)
        << out;
  }
  // Nor into the run's own checkpoint.
  out.clear();
  EXPECT_EQ(run("merge --model " + (w.tmp / "run").string() + " --out " + (w.tmp / "run" / "current").string(), &out),
            2)
      << out;
  // An adapter_config.json naming a module the model lacks: a format error naming that file.
  const fs::path bad = w.tmp / "bad-adapter";
  fs::create_directories(bad);
  fs::copy_file(cur / "adapter_model.safetensors", bad / "adapter_model.safetensors");
  nlohmann::json bad_cfg = cfg;
  bad_cfg["target_modules"] = {"q_proj", "nope"};
  std::ofstream(bad / "adapter_config.json") << bad_cfg.dump();
  out.clear();
  EXPECT_EQ(run("merge --model " + w.model.string() + " --adapter " + bad.string() + " --out " + (w.tmp / "m0").string(),
                &out),
            1)
      << out;
  EXPECT_NE(out.find((bad / "adapter_config.json").string() + ": "), std::string::npos) << out;
  EXPECT_NE(out.find("no module 'nope'"), std::string::npos) << out;

  // Replay from the base and the log; a stopped and resumed run: the same adapter and state.
  ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (w.tmp / "run/seed_log.jsonl").string() +
                    " --out " + (w.tmp / "replayed").string() + " -q",
                &out),
            0)
      << out;
  ASSERT_EQ(run(w.train("part", lora + " --stop-at 3"), &out), 0) << out;
  ASSERT_EQ(run("train --resume " + (w.tmp / "part").string() + " --out " + (w.tmp / "part").string() + " -q", &out), 0)
      << out;
  for (const char* d : {"replayed", "part"}) {
    const fs::path other = w.tmp / d / "current";
    EXPECT_EQ(read_file(cur / "adapter_model.safetensors"), read_file(other / "adapter_model.safetensors")) << d;
    EXPECT_EQ(read_file(cur / "optimizer_state.safetensors"), read_file(other / "optimizer_state.safetensors")) << d;
  }
  // Continue from the adapter with a new run.
  ASSERT_EQ(run(w.train("more", "--lr 1e-2 --adapter " + (w.tmp / "run").string()), &out), 0) << out;
  EXPECT_TRUE(fs::exists(w.tmp / "more/current/adapter_model.safetensors"));
}

TEST(LoraCli, PrefixTuningTrainsEvaluatesReplaysAndResumes) {
  Workspace w;
  std::string out;
  const std::string prefix = "--prefix-tuning --num-prefix 3 --lr 1e-2";
  ASSERT_EQ(run(w.train("run", prefix), &out), 0) << out;
  const fs::path cur = fs::path(w.tmp / "run") / fs::read_symlink(w.tmp / "run/current");
  const nlohmann::json cfg = nlohmann::json::parse(read_file(cur / "adapter_config.json"));
  EXPECT_EQ(cfg.at("peft_type"), "PREFIX_TUNING");
  EXPECT_EQ(cfg.at("num_virtual_tokens"), 3);
  const std::string data = " --data " + w.data.string();
  EXPECT_EQ(eval_loss("--model " + (w.tmp / "run").string() + data),
            eval_loss("--model " + w.model.string() + " --adapter " + (w.tmp / "run").string() + data));
  ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (w.tmp / "run/seed_log.jsonl").string() +
                    " --out " + (w.tmp / "replayed").string() + " -q",
                &out),
            0)
      << out;
  ASSERT_EQ(run(w.train("part", prefix + " --stop-at 4"), &out), 0) << out;
  ASSERT_EQ(run("train --resume " + (w.tmp / "part").string() + " --out " + (w.tmp / "part").string() + " -q", &out), 0)
      << out;
  for (const char* d : {"replayed", "part"})
    EXPECT_EQ(read_file(cur / "adapter_model.safetensors"), read_file(w.tmp / d / "current/adapter_model.safetensors"))
        << d;
  // A prefix has no weights to merge.
  out.clear();
  EXPECT_EQ(run("merge --model " + (w.tmp / "run").string() + " --out " + (w.tmp / "m").string(), &out), 2) << out;
  EXPECT_NE(out.find("is a prefix-tuning adapter (3 virtual tokens per layer)"), std::string::npos) << out;
  EXPECT_NE(out.find("there is nothing to merge"), std::string::npos) << out;
}

// A prefix starts from a forward of seeded tokens, which weight tiles round (LLaMA-family
// blocks): replay takes the run's --tile unless given, so a --tile run's replay is its bits
// (adversarial pass 71: 91 of 640 first values differed by up to 6e-8).
TEST(LoraCli, APrefixRunWithWeightTilesReplaysToItsBits) {
  test::TempDir tmp;
  std::string out;
  ASSERT_EQ(run("init --preset llama-tiny --out " + (tmp / "m").string() + " --seed 1 -q", &out), 0) << out;
  ASSERT_EQ(run("synth-data --model " + (tmp / "m").string() + " --out " + (tmp / "d.safetensors").string() +
                    " --rows 16 --seq 16 -q",
                &out),
            0)
      << out;
  for (const char* offload : {"all", "none"}) {
    SCOPED_TRACE(offload);
    const fs::path run_dir = tmp / fmt::format("p-{}", offload), rep = tmp / fmt::format("r-{}", offload);
    ASSERT_EQ(run("train --model " + (tmp / "m").string() + " --data " + (tmp / "d.safetensors").string() +
                      " --prefix-tuning --steps 2 --lr 1e-2 --tile 32K --offload " + offload + " -q --out " +
                      run_dir.string(),
                  &out),
              0)
        << out;
    out.clear();
    ASSERT_EQ(run("replay --model " + (tmp / "m").string() + " --seed-log " + (run_dir / "seed_log.jsonl").string() +
                      " --out " + rep.string(),
                  &out),
              0)
        << out;
    EXPECT_NE(out.find("--tile 32K as the run's"), std::string::npos) << out;
    EXPECT_EQ(read_file(rep / "current/adapter_model.safetensors"),
              read_file(run_dir / "current/adapter_model.safetensors"));
  }
}

// The adapters were tuned on their base's weights: a resume on a base re-made at the same
// path (another seed) is refused, naming it; the base put back resumes.
TEST(LoraCli, AResumeOnAnotherBaseAtTheSamePathIsRefused) {
  Workspace w;
  std::string out;
  const fs::path saved = w.tmp / "model-saved";
  fs::copy(w.model, saved, fs::copy_options::recursive);
  ASSERT_EQ(run(w.train("run", "--lora --stop-at 2"), &out), 0) << out;
  ASSERT_EQ(run("init --preset opt-tiny --seed 7 --out " + w.model.string() + " --overwrite -q"), 0);
  out.clear();
  const std::string resume = "train --resume " + (w.tmp / "run").string() + " --out " + (w.tmp / "run").string();
  EXPECT_EQ(run(resume, &out), 2) << out;
  EXPECT_NE(out.find("is not the one the run's adapters were tuned on"), std::string::npos) << out;
  // eval and merge of the run (its base taken from its record) refuse the other base too;
  // given as --model with --adapter it is said, not refused (adversarial pass 58).
  const std::string run_dir = (w.tmp / "run").string();
  for (const std::string& cmd : {"eval --model " + run_dir + " --data " + w.data.string(),
                                 "merge --model " + run_dir + " --out " + (w.tmp / "merged").string()}) {
    out.clear();
    EXPECT_EQ(run(cmd, &out), 2) << cmd << "\n" << out;
    EXPECT_NE(out.find("the checkpoint there now has other weights"), std::string::npos) << cmd << "\n" << out;
  }
  EXPECT_FALSE(fs::exists(w.tmp / "merged"));
  out.clear();
  EXPECT_EQ(run("eval --model " + w.model.string() + " --adapter " + run_dir + " --data " + w.data.string(), &out), 0)
      << out;
  EXPECT_NE(out.find("not on --model " + w.model.string() + " (fingerprint "), std::string::npos) << out;
  fs::remove_all(w.model);
  fs::copy(saved, w.model, fs::copy_options::recursive);
  out.clear();
  EXPECT_EQ(run(resume + " -q", &out), 0) << out;
}

// A base that moved: the resume names its new place with --model, checked by the seed log's
// fingerprint, and ends with the adapter of a run that never stopped; another model there is
// refused, and a full run still refuses --model with --resume.
TEST(LoraCli, AResumeFindsAMovedBaseGivenAsModel) {
  Workspace w;
  std::string out;
  ASSERT_EQ(run(w.train("full", "--lora"), &out), 0) << out;
  ASSERT_EQ(run(w.train("run", "--lora --stop-at 2"), &out), 0) << out;
  const fs::path moved = w.tmp / "moved";
  fs::rename(w.model, moved);
  const std::string resume = "train --resume " + (w.tmp / "run").string() + " --out " + (w.tmp / "run").string() + " -q";
  out.clear();
  EXPECT_EQ(run(resume, &out), 1) << out;
  EXPECT_NE(out.find("give its new place as --model"), std::string::npos) << out;
  ASSERT_EQ(run("init --preset opt-tiny --seed 7 --out " + (w.tmp / "other").string() + " -q"), 0);
  out.clear();
  EXPECT_EQ(run(resume + " --model " + (w.tmp / "other").string(), &out), 2) << out;
  EXPECT_NE(out.find("not the base the run's adapters were tuned on"), std::string::npos) << out;
  // The same weights under another architecture (fewer heads: the same shapes) are another
  // model, though the weights' fingerprint is the same.
  const fs::path heads = w.tmp / "heads";
  fs::copy(moved, heads, fs::copy_options::recursive);
  {
    nlohmann::json cfg = nlohmann::json::parse(read_file(heads / "config.json"));
    cfg["num_attention_heads"] = cfg["num_attention_heads"].get<int>() / 2;
    std::ofstream(heads / "config.json") << cfg.dump();
  }
  out.clear();
  EXPECT_EQ(run(resume + " --model " + heads.string(), &out), 2) << out;
  EXPECT_NE(out.find("config.json differs (num_attention_heads"), std::string::npos) << out;
  out.clear();
  ASSERT_EQ(run(resume + " --model " + moved.string(), &out), 0) << out;
  EXPECT_EQ(read_file(w.tmp / "full/current/adapter_model.safetensors"),
            read_file(w.tmp / "run/current/adapter_model.safetensors"));
  // The state records the new place: the next resume needs no --model.
  const nlohmann::json st = nlohmann::json::parse(read_file(w.tmp / "run/current/zo2_state.json"));
  EXPECT_EQ(fs::path(st.at("base_model").get<std::string>()), fs::absolute(moved));
  fs::rename(moved, w.model);
  ASSERT_EQ(run(w.train("plain", "--stop-at 2"), &out), 0) << out;
  out.clear();
  EXPECT_EQ(run("train --resume " + (w.tmp / "plain").string() + " --out " + (w.tmp / "plain").string() + " --model " +
                    w.model.string() + " -q",
                &out),
            2)
      << out;
  EXPECT_NE(out.find("drop --model"), std::string::npos) << out;
}

// Note [A run's starting adapter] (tools/cmd_replay.cpp): a run started from an existing
// adapter (train --adapter A) records it in its seed log, and replay starts from it: the run's
// adapter bit for bit (adversarial pass 53: replay rebuilt it from the run seed's init and
// wrote other weights, exit 0). Moved, it is named with --adapter; another adapter, or a
// missing one, is refused; a log without the record (an older zo2's) is still read.
TEST(LoraCli, ReplayOfARunStartedFromAnAdapterStartsFromIt) {
  Workspace w;
  for (const std::string kind : {"--lora --lora-r 4", "--prefix-tuning --num-prefix 3"}) {
    SCOPED_TRACE(kind);
    for (const char* d : {"a", "b", "other", "rep", "rep2", "rep3", "moved"}) fs::remove_all(w.tmp / d);
    std::string out;
    ASSERT_EQ(run(w.train("a", kind + " --lr 1e-2"), &out), 0) << out;
    ASSERT_EQ(run(w.train("other", kind + " --lr 2e-2"), &out), 0) << out;
    // --adapter RUN --out RUN --overwrite: refused, the run kept (adversarial pass 71: it
    // removed the run, then failed to read the adapter it had just removed).
    out.clear();
    EXPECT_EQ(run(w.train("a", "--lr 1e-2 --overwrite --adapter " + (w.tmp / "a").string()), &out), 2) << out;
    EXPECT_NE(out.find("is inside it, and this run starts from it (--adapter)"), std::string::npos) << out;
    EXPECT_TRUE(fs::exists(w.tmp / "a" / "seed_log.jsonl"));
    ASSERT_EQ(run(w.train("b", "--lr 1e-2 --adapter " + (w.tmp / "a").string()), &out), 0) << out;
    const fs::path log = w.tmp / "b/seed_log.jsonl";
    const std::string replay = "replay --model " + w.model.string() + " --seed-log " + log.string() + " -q --out ";
    const std::string tuned = read_file(w.tmp / "b/current/adapter_model.safetensors");
    ASSERT_EQ(run(replay + (w.tmp / "rep").string(), &out), 0) << out;
    EXPECT_EQ(read_file(w.tmp / "rep/current/adapter_model.safetensors"), tuned);
    // Moved: refused by name, then found through --adapter.
    const fs::path a_step = w.tmp / "a" / fs::read_symlink(w.tmp / "a/current");
    fs::rename(a_step, w.tmp / "moved");
    out.clear();
    EXPECT_EQ(run(replay + (w.tmp / "rep2").string(), &out), 2) << out;
    EXPECT_NE(out.find("the adapter the run started from, " + a_step.string() + ": missing"), std::string::npos) << out;
    EXPECT_NE(out.find("give its new place as --adapter"), std::string::npos) << out;
    EXPECT_FALSE(fs::exists(w.tmp / "rep2"));
    out.clear();
    EXPECT_EQ(run(replay + (w.tmp / "rep2").string() + " --adapter " + (w.tmp / "other").string(), &out), 2) << out;
    EXPECT_NE(out.find("--adapter " + (w.tmp / "other").string() + ": not the adapter"), std::string::npos) << out;
    ASSERT_EQ(run(replay + (w.tmp / "rep2").string() + " --adapter " + (w.tmp / "moved").string(), &out), 0) << out;
    EXPECT_EQ(read_file(w.tmp / "rep2/current/adapter_model.safetensors"), tuned);
    // A log whose adapters start from the run seed takes no --adapter.
    out.clear();
    EXPECT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (w.tmp / "other/seed_log.jsonl").string() +
                      " --out " + (w.tmp / "rep3").string() + " --adapter " + (w.tmp / "moved").string(),
                  &out),
              2)
        << out;
    EXPECT_NE(out.find("records no adapter its run started from"), std::string::npos) << out;
    // A header without the record (as zo2 wrote it before) is read: replayed from the init.
    std::string text = read_file(log);
    nlohmann::json h = nlohmann::json::parse(text.substr(0, text.find('\n')));
    EXPECT_EQ(fs::path(h.at("adapter").get<std::string>()), a_step);
    h.erase("adapter"), h.erase("adapter_fingerprint");
    std::ofstream(w.tmp / "old.jsonl") << h.dump() << text.substr(text.find('\n'));
    ASSERT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (w.tmp / "old.jsonl").string() + " -q --out " +
                      (w.tmp / "rep3").string(),
                  &out),
              0)
        << out;
  }
}

// Prefix tuning checks its sequences' own length plus P against the positions, not P (the
// length of the initializing forward) plus P (adversarial pass 53: 16-token data with P = 40
// on 64 positions was refused as "sequence length 40 + 40").
TEST(LoraCli, APrefixLongerThanTheSequencesFitsWhenTheirSumDoes) {
  Workspace w;
  const fs::path d16 = w.tmp / "d16.safetensors";
  std::string out;
  ASSERT_EQ(run("synth-data --model " + w.model.string() + " --out " + d16.string() + " --rows 16 --seq 16 -q", &out), 0)
      << out;
  const std::string train = "train --model " + w.model.string() + " --data " + d16.string() +
                            " --steps 2 --batch-size 2 --prefix-tuning -q --out ";
  EXPECT_EQ(run(train + (w.tmp / "p40").string() + " --num-prefix 40", &out), 0) << out;  // 16 + 40 <= 64
  EXPECT_TRUE(fs::exists(w.tmp / "p40/current/adapter_model.safetensors"));
  out.clear();
  EXPECT_EQ(run(train + (w.tmp / "p50").string() + " --num-prefix 50", &out), 2) << out;
  EXPECT_NE(out.find("sequence length 16 + 50 prefix tokens exceeds the model's 64 positions"), std::string::npos)
      << out;
}

// Diverged adapters are not saved, as diverged full weights are not: the save names the
// tensor (a load refuses it), and replay of the run's log refuses to write them too.
TEST(LoraCli, NonFiniteAdaptersAreNotSavedNorReplayed) {
  Workspace w;
  // lr 3e38: with seed 1 the first update overflows some adapter elements to infinity.
  const std::string train = "train --model " + w.model.string() + " --data " + w.data.string() + " --out " +
                            (w.tmp / "lora").string() + " --steps 8 --batch-size 4 --eps 1e-3 --seed 1 --lora --lr 3e38";
  std::string out;
  EXPECT_EQ(run(train, &out), 1) << out;
  EXPECT_NE(out.find("adapter tensor 'base_model.model."), std::string::npos) << out;
  EXPECT_NE(out.find("holds a non-finite value"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "lora" / "current")) << out;
  out.clear();
  EXPECT_EQ(run("replay --model " + w.model.string() + " --seed-log " + (w.tmp / "lora" / "seed_log.jsonl").string() +
                    " --out " + (w.tmp / "replay").string(),
                &out),
            1)
      << out;
  EXPECT_NE(out.find("holds a non-finite value"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(w.tmp / "replay" / "adapter_model.safetensors")) << out;
}

TEST(LoraCli, BadLoraFlagsAreUsageErrors) {
  Workspace w;
  const std::pair<std::string, std::string> cases[] = {
      {"--lora --lora-targets q_proj,gate_proj", "gate_proj"},
      {"--lora --lora-r 0", "--lora-r 0"},
      {"--lora --lora-r 100", "--lora-r 100"},
      {"--lora --lora-alpha -1", "--lora-alpha"},
      {"--lora-r 4", "--lora"},
      {"--lora --lora-targets q_proj,,v_proj", "--lora-targets"},
      {"--prefix-tuning --lora", "--prefix-tuning"},
      {"--num-prefix 4", "--num-prefix"},
      {"--prefix-tuning --num-prefix 0", "--num-prefix 0"},
      // The adapters are saved in fp32: a narrower --save-dtype would be ignored.
      {"--lora --save-dtype fp16", "--save-dtype fp16: an adapter run (LoRA r 8"},
      {"--prefix-tuning --save-dtype bf16", "--save-dtype bf16: an adapter run (prefix tuning"},
      // ... as one file: a --shard-size would be ignored (adversarial pass 71).
      {"--lora --shard-size 1K", "--shard-size: an adapter run (LoRA r 8"},
  };
  for (const auto& [flags, needle] : cases) {
    std::string out;
    EXPECT_EQ(run(w.train("bad", flags), &out), 2) << flags << ": " << out;
    EXPECT_NE(out.find(needle), std::string::npos) << flags << ": " << out;
  }
  std::string out;
  ASSERT_EQ(run(w.train("part", "--lora --stop-at 2"), &out), 0) << out;
  EXPECT_EQ(run("train --resume " + (w.tmp / "part").string() + " --out " + (w.tmp / "part").string() + " --lora-r 4", &out),
            2)
      << out;
  EXPECT_EQ(run("merge --model " + w.model.string() + " --out " + (w.tmp / "m").string(), &out), 2) << out;
  EXPECT_NE(out.find("adapter"), std::string::npos) << out;
  // replay of an adapter run's log refuses them as train does (it took both and wrote fp32, one file).
  const std::string replay = "replay --model " + w.model.string() + " --seed-log " +
                             (w.tmp / "part" / "seed_log.jsonl").string() + " --out " + (w.tmp / "rep").string();
  for (const auto& [flags, needle] : {std::pair<std::string, std::string>{" --save-dtype fp16", "--save-dtype fp16: an adapter run"},
                                      {" --shard-size 1K", "--shard-size: an adapter run"}}) {
    out.clear();
    EXPECT_EQ(run(replay + flags, &out), 2) << flags << ": " << out;
    EXPECT_NE(out.find(needle), std::string::npos) << flags << ": " << out;
    EXPECT_FALSE(fs::exists(w.tmp / "rep")) << flags;
  }
}

}  // namespace
}  // namespace zo2

#include "api/run_dir.h"

namespace zo2 {
namespace {

// A LoRA run's recorded base config is compared with the base by meaning, not spelling: zo2
// 0.1 wrote rms_norm_eps 1e-06 as 9.999999974752427e-07 and one id of an eos_token_id list,
// and its runs could not be resumed by 0.2 (adversarial pass 51). A real difference is still
// refused.
TEST(LoraCli, TheRecordedBaseConfigIsComparedByMeaning) {
  test::TempDir tmp;
  std::string out;
  const fs::path model = tmp / "llama", data = tmp / "data.safetensors", run_dir = tmp / "run";
  ASSERT_EQ(run("init --preset llama-tiny --out " + model.string() + " --seed 1 -q", &out), 0) << out;
  {
    nlohmann::json cfg = nlohmann::json::parse(read_file(model / "config.json"));
    cfg["rms_norm_eps"] = 1e-06;
    cfg["eos_token_id"] = nlohmann::json::array({2, 3});
    std::ofstream(model / "config.json") << cfg.dump(2);
  }
  ASSERT_EQ(run("synth-data --model " + model.string() + " --out " + data.string() + " --rows 16 --seq 16 -q", &out), 0)
      << out;
  const std::string common = " --data " + data.string() + " --out " + run_dir.string() + " --steps 4 -q";
  ASSERT_EQ(run("train --model " + model.string() + common + " --lora --stop-at 2", &out), 0) << out;
  // The manifest as zo2 0.1 spelled its base.
  const fs::path manifest = run_dir / fs::read_symlink(run_dir / "current") / "zo2_state.json";
  auto respell = [&](const nlohmann::json& eps, const nlohmann::json& eos) {
    nlohmann::json m = nlohmann::json::parse(read_file(manifest));
    m["base_config"]["rms_norm_eps"] = eps;
    m["base_config"]["eos_token_id"] = eos;
    m["state_crc32"] = manifest_crc32(m);
    std::ofstream(manifest) << m.dump(2);
  };
  respell(9.999999974752427e-07, 2);
  out.clear();
  EXPECT_EQ(run("train --resume " + run_dir.string() + common, &out), 0) << out;
  // A base whose eps is another value is another model.
  ASSERT_EQ(run("train --model " + model.string() + " --data " + data.string() + " --out " + (tmp / "r2").string() +
                    " --lora --steps 4 --stop-at 2 -q",
                &out),
            0)
      << out;
  const fs::path manifest2 = tmp / "r2" / fs::read_symlink(tmp / "r2" / "current") / "zo2_state.json";
  {
    nlohmann::json m = nlohmann::json::parse(read_file(manifest2));
    m["base_config"]["rms_norm_eps"] = 1e-05;
    m["state_crc32"] = manifest_crc32(m);
    std::ofstream(manifest2) << m.dump(2);
  }
  out.clear();
  EXPECT_EQ(run("train --resume " + (tmp / "r2").string() + " --data " + data.string() + " --out " +
                    (tmp / "r2").string() + " --steps 4 -q",
                &out),
            2)
      << out;
  EXPECT_NE(out.find("config.json differs (rms_norm_eps"), std::string::npos) << out;
}

}  // namespace
}  // namespace zo2
