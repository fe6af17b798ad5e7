// zo2-tune generate and plan --generate as a user runs them (api/generate.h): text in, text
// out through the model's tokenizer; greedy equals what eval's logits pick; --kv-cache
// device/host/off and --offload all/none give the same text; sampling repeats for a seed;
// --stop cuts the text; --data JSONL and --task squad; bad flags are usage errors (exit 2)
// naming the flag; eval --task squad decodes through the same generator.
#include "models/tokenizer.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>

namespace zo2 {
namespace {

using test::read_file;
using test::write_file;

namespace fs = std::filesystem;
using json = nlohmann::json;

int run(const std::string& args, std::string* out = nullptr) {
  return test::run_command(test::zo2_tune_path().string() + " " + args, out);
}

// JSON lines of stdout (log lines on stderr interleave in `out`: only lines that parse).
std::vector<json> json_lines(const std::string& out) {
  std::vector<json> rows;
  std::size_t at = 0;
  while (at < out.size()) {
    const std::size_t end = out.find('\n', at);
    const std::string line = out.substr(at, end == std::string::npos ? std::string::npos : end - at);
    if (!line.empty() && line[0] == '{') rows.push_back(json::parse(line));
    if (end == std::string::npos) break;
    at = end + 1;
  }
  return rows;
}

struct Micro {
  test::TempDir tmp;
  fs::path model = tmp / "micro";
  Micro() {
    std::string out;
    EXPECT_EQ(run("init --preset opt-micro --tokenizer " + (test::shared_dir() / "data" / "gpt2").string() + " --out " +
                      model.string() + " --seed 3 -q",
                  &out),
              0)
        << out;
  }
  std::string gen(const std::string& args, int want = 0) const {
    std::string out;
    EXPECT_EQ(run("generate --model " + model.string() + " " + args, &out), want) << args << "\n" << out;
    return out;
  }
};

TEST(GenerateCli, EveryPlacementAndCacheGiveTheSameGreedyText) {
  Micro m;
  const std::string prompts = "--prompt 'The film was' --prompt 'I did not expect the ending to' --max-new-tokens 6 --json -q";
  const auto ref = json_lines(m.gen(prompts + " --kv-cache off --offload none"));
  ASSERT_EQ(ref.size(), 2u);
  EXPECT_EQ(ref[0]["prompt"], "The film was");
  EXPECT_EQ(ref[0]["tokens"].size(), 6u);
  // The text is the tokenizer's decoding of the new tokens.
  const auto tok = Tokenizer::from_dir(m.model);
  EXPECT_EQ(ref[1]["text"], tok->decode(ref[1]["tokens"].get<std::vector<std::int32_t>>()));
  for (const char* flags : {"--kv-cache device --offload all --gpu-mem 64M", "--kv-cache host --offload all --gpu-mem 64M",
                                   "--kv-cache auto --batch-size 1", "--kv-cache off --offload all --gpu-mem 64M",
                                   // Note [Sub-block streaming]: the blocks by weight tiles, the cache on either side.
                                   "--kv-cache device --offload all --gpu-mem 64M --tile 4K",
                                   "--kv-cache host --offload all --gpu-mem 64M --tile 4K"}) {
    const auto got = json_lines(m.gen(prompts + " " + std::string(flags)));
    ASSERT_EQ(got.size(), 2u) << flags;
    for (std::size_t i = 0; i < 2; ++i) EXPECT_EQ(got[i]["tokens"], ref[i]["tokens"]) << flags;
  }
  // Plain output: the prompt followed by its text.
  const std::string plain = m.gen("--prompt 'The film was' --max-new-tokens 6");
  EXPECT_NE(plain.find("The film was" + ref[0]["text"].get<std::string>()), std::string::npos) << plain;
  EXPECT_NE(plain.find("tokens/s"), std::string::npos) << plain;
}

TEST(GenerateCli, SamplingRepeatsForASeedAndStopCutsTheText) {
  Micro m;
  const std::string p = "--prompt 'The story' --prompt 'A' --max-new-tokens 8 --json -q --temperature 1.3 --top-p 0.95";
  const auto a = json_lines(m.gen(p + " --seed 5")), b = json_lines(m.gen(p + " --seed 5")),
             c = json_lines(m.gen(p + " --seed 6"));
  ASSERT_EQ(a.size(), 2u);
  EXPECT_EQ(a[0]["tokens"], b[0]["tokens"]);
  EXPECT_EQ(a[1]["tokens"], b[1]["tokens"]);
  EXPECT_TRUE(a[0]["tokens"] != c[0]["tokens"] || a[1]["tokens"] != c[1]["tokens"]);
  // --stop: the first decoded token's text as the stop string; the text ends before it.
  const auto greedy = json_lines(m.gen("--prompt 'The story' --max-new-tokens 8 --json -q"));
  const auto tok = Tokenizer::from_dir(m.model);
  const auto ids = greedy[0]["tokens"].get<std::vector<std::int32_t>>();
  std::string stop = tok->decode(std::vector<std::int32_t>{ids[1]});
  ASSERT_FALSE(stop.empty());
  const auto cut = json_lines(m.gen("--prompt 'The story' --max-new-tokens 8 --json -q --stop '" + stop + "'"));
  ASSERT_EQ(cut.size(), 1u);
  EXPECT_TRUE(cut[0]["stopped"].get<bool>());
  const std::string text = cut[0]["text"];
  EXPECT_EQ(text.find(stop), std::string::npos) << text;
  EXPECT_LE(cut[0]["tokens"].size(), 2u);
}

// Note [A model's end-of-sequence ids] (api/generate.h): the model's generation_config.json
// eos_token_id (an id or a list; else config.json's) stops a prompt as the tokenizer's EOS
// does, its text left out; --ignore-eos ignores both; a malformed file is named.
TEST(GenerateCli, TheModelsGenerationConfigEosIdsStopAPrompt) {
  Micro m;
  const std::string p = "--prompt 'The story' --max-new-tokens 8 --json -q";
  const auto free_run = json_lines(m.gen(p + " --ignore-eos"));
  ASSERT_EQ(free_run.size(), 1u);
  const auto ids = free_run[0]["tokens"].get<std::vector<std::int32_t>>();
  ASSERT_EQ(ids.size(), 8u);
  // The last generated token that none before it equals ends the prompt there when the
  // model's generation config lists it (the first token at least qualifies).
  std::size_t k = 0;
  for (std::size_t i = 0; i < ids.size(); ++i)
    if (std::find(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(i), ids[i]) == ids.begin() + static_cast<std::ptrdiff_t>(i)) k = i;
  const std::int32_t eos = ids[k];
  const auto upto = [&](std::size_t n) { return std::vector<std::int32_t>(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(n)); };
  write_file(m.model / "generation_config.json", json{{"eos_token_id", json::array({99999, eos})}}.dump());
  const auto stopped = json_lines(m.gen(p));
  ASSERT_EQ(stopped.size(), 1u);
  EXPECT_TRUE(stopped[0]["stopped"].get<bool>());
  EXPECT_EQ(stopped[0]["tokens"], json(upto(k + 1)));
  const auto tok = Tokenizer::from_dir(m.model);
  EXPECT_EQ(stopped[0]["text"], tok->decode(upto(k)));
  EXPECT_EQ(json_lines(m.gen(p + " --ignore-eos"))[0]["tokens"], free_run[0]["tokens"]);
  // Without generation_config.json, config.json's eos_token_id list.
  fs::remove(m.model / "generation_config.json");
  json config = json::parse(read_file(m.model / "config.json"));
  const json eos_before = config["eos_token_id"];
  config["eos_token_id"] = json::array({eos_before, eos});
  write_file(m.model / "config.json", config.dump());
  EXPECT_EQ(json_lines(m.gen(p))[0]["tokens"], json(upto(k + 1)));
  // A generation_config.json that is not JSON, or an eos_token_id that is not an id.
  write_file(m.model / "generation_config.json", "{not json");
  std::string out = m.gen(p, 1);
  EXPECT_NE(out.find("generation_config.json"), std::string::npos) << out;
  write_file(m.model / "generation_config.json", R"({"eos_token_id": "2"})");
  out = m.gen(p, 1);
  EXPECT_NE(out.find("eos_token_id"), std::string::npos) << out;
}

TEST(GenerateCli, PromptsFromJsonlAndTheSquadTaskAndOutputFile) {
  Micro m;
  write_file(m.tmp / "p.jsonl", "{\"prompt\": \"The film was\"}\n\n{\"text\": \"The ending\"}\n");
  const fs::path outf = m.tmp / "out.jsonl";
  m.gen("--data " + (m.tmp / "p.jsonl").string() + " --max-new-tokens 3 -q --output " + outf.string());
  std::ifstream in(outf);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto rows = json_lines(all);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[1]["prompt"], "The ending");
  const fs::path squad = fs::path(__FILE__).parent_path() / "data" / "tasks" / "squad.json";
  const auto sq = json_lines(m.gen("--task squad --data " + squad.string() + " --max-new-tokens 2 --json -q"));
  ASSERT_GE(sq.size(), 1u);
  EXPECT_NE(sq[0]["prompt"].get<std::string>().find("Answer:"), std::string::npos);
  // eval --task squad decodes through the same generator, with or without the cache.
  std::string a, b;
  ASSERT_EQ(run("eval --model " + m.model.string() + " --task squad --data " + squad.string() +
                    " --max-new-tokens 4 --json -q",
                &a),
            0)
      << a;
  ASSERT_EQ(run("eval --model " + m.model.string() + " --task squad --data " + squad.string() +
                    " --max-new-tokens 4 --json -q --kv-cache off --batch-size 1",
                &b),
            0)
      << b;
  const auto ja = json_lines(a), jb = json_lines(b);
  ASSERT_EQ(ja.size(), 1u);
  ASSERT_EQ(jb.size(), 1u);
  EXPECT_EQ(ja[0]["f1"], jb[0]["f1"]);
  EXPECT_EQ(ja[0]["em"], jb[0]["em"]);
}

// --max-len cuts the start of squad's prompts where they are decoded: eval (MeZO's
// encode_prompt: max_len − max_new_tokens tokens, the special prefix and the end kept, and
// --predictions records those ids) and generate --task (its --prompt rule: max_len tokens).
TEST(GenerateCli, MaxLenCutsTheStartOfSquadPromptsInEvalAndGenerate) {
  Micro m;
  const fs::path squad = fs::path(__FILE__).parent_path() / "data" / "tasks" / "squad.json";
  const fs::path whole = m.tmp / "whole.jsonl", cut = m.tmp / "cut.jsonl";
  std::string out;
  ASSERT_EQ(run("eval --model " + m.model.string() + " --task squad --data " + squad.string() +
                    " --max-new-tokens 2 -q --batch-size 1 --predictions " + whole.string(),
                &out),
            0)
      << out;
  ASSERT_EQ(run("eval --model " + m.model.string() + " --task squad --data " + squad.string() +
                    " --max-len 24 --max-new-tokens 2 -q --batch-size 1 --predictions " + cut.string(),
                &out),
            0)
      << out;
  const auto w = json_lines(read_file(whole)), c = json_lines(read_file(cut));
  ASSERT_EQ(w.size(), 3u);
  ASSERT_EQ(c.size(), 3u);
  const std::size_t prefix = Tokenizer::from_dir(m.model)->special_prefix().size();
  int cuts = 0;
  for (std::size_t k = 0; k < w.size(); ++k) {
    const auto full = w[k]["prompt_ids"].get<std::vector<std::int32_t>>();
    const auto kept = c[k]["prompt_ids"].get<std::vector<std::int32_t>>();
    if (full.size() <= 22) {
      EXPECT_EQ(kept, full) << k;
      continue;
    }
    ++cuts;
    ASSERT_EQ(kept.size(), 22u) << k;
    EXPECT_TRUE(std::equal(kept.begin(), kept.begin() + static_cast<std::ptrdiff_t>(prefix), full.begin())) << k;
    EXPECT_TRUE(std::equal(kept.begin() + static_cast<std::ptrdiff_t>(prefix), kept.end(),
                           full.end() - static_cast<std::ptrdiff_t>(22 - prefix)))
        << k;
  }
  EXPECT_GE(cuts, 1);
  // generate --task squad --max-len 22: the same prompts (the --prompt rule keeps max_len
  // tokens), so the same first greedy token; the warning says what happened.
  const std::string g = m.gen("--task squad --data " + squad.string() + " --max-len 22 --max-new-tokens 2 --json");
  EXPECT_NE(g.find("prompts truncated to their last 22 tokens"), std::string::npos) << g;
  const auto gr = json_lines(g);
  ASSERT_EQ(gr.size(), 3u);
  const auto tok = Tokenizer::from_dir(m.model);
  for (std::size_t k = 0; k < gr.size(); ++k) {
    EXPECT_EQ(gr[k]["prompt"], tok->decode(c[k]["prompt_ids"].get<std::vector<std::int32_t>>())) << k;
    EXPECT_EQ(gr[k]["tokens"][0], c[k]["ids"][0]) << k;
  }
  // Without --max-len a prompt too long for the positions names the --max-len that fits.
  const std::string e = m.gen("--task squad --data " + squad.string() + " --max-new-tokens 500", 2);
  EXPECT_NE(e.find("(--max-len 12 keeps the last tokens of each prompt that fit)"), std::string::npos) << e;
  EXPECT_EQ(json_lines(m.gen("--task squad --data " + squad.string() + " --max-new-tokens 500 --max-len 12 --json -q"))
                .size(),
            3u);
  // --prompt texts cut by --max-len: it says so.
  const std::string p = m.gen("--prompt 'The film was long and slow' --prompt 'Hi' --max-len 2 --max-new-tokens 1");
  EXPECT_NE(p.find("--max-len 2: cut the start of 1 of the 2 prompts"), std::string::npos) << p;
}

// train --eval on squad logs MeZO's F1/EM of greedy decoding, through the training session.
TEST(GenerateCli, TrainEvalOnSquadLogsTheF1OfGeneratedAnswers) {
  Micro m;
  const fs::path squad = fs::path(__FILE__).parent_path() / "data" / "tasks" / "squad.json";
  const fs::path log = m.tmp / "log.jsonl";
  std::string out;
  ASSERT_EQ(run("train --model " + m.model.string() + " --task squad --data " + squad.string() + " --eval " +
                    squad.string() + " --steps 2 --batch-size 2 --lr 1e-4 --max-new-tokens 4 --out " +
                    (m.tmp / "run").string() + " --log-json " + log.string(),
                &out),
            0)
      << out;
  EXPECT_NE(out.find("gold-answer loss"), std::string::npos) << out;
  EXPECT_NE(out.find("f1 "), std::string::npos) << out;
  std::ifstream in(log);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  bool found = false;
  for (const auto& j : json_lines(all))
    if (j.contains("eval_after_step")) {
      found = true;
      EXPECT_TRUE(j.contains("eval_f1")) << j.dump();
      EXPECT_TRUE(j.contains("eval_em")) << j.dump();
    }
  EXPECT_TRUE(found) << all;
}

// Ctrl-C while train's squad evaluation decodes stops it after the token in progress
// (Note [An interrupted evaluation]): exit 130, nothing recorded, and the resume runs the
// evaluation it owes, logging what an uninterrupted run logs.
TEST(GenerateCli, CtrlCDuringTrainsGeneratedEvaluationStopsItAndTheResumeRunsIt) {
  Micro m;
  const fs::path squad = fs::path(__FILE__).parent_path() / "data" / "tasks" / "squad.json";
  auto train = [&](const std::string& name, const std::string& env, int want) {
    std::string out;
    EXPECT_EQ(test::run_command(env + " " + test::zo2_tune_path().string() + " train --model " + m.model.string() +
                      " --task squad --data " + squad.string() + " --eval " + squad.string() +
                      " --steps 2 --batch-size 2 --lr 1e-4 --max-new-tokens 4 --out " + (m.tmp / name).string() +
                      " --log-json " + (m.tmp / (name + ".jsonl")).string(),
                  &out),
              want)
        << out;
    return out;
  };
  auto evals = [&](const std::string& name) {
    std::vector<json> e;
    for (const auto& j : json_lines(read_file(m.tmp / (name + ".jsonl"))))
      if (j.contains("eval_after_step")) e.push_back(j);
    return e;
  };
  train("ref", "", 0);
  const auto ref = evals("ref");
  ASSERT_EQ(ref.size(), 1u);
  // Two asks before the loss's two batches, one before decoding, then one after each token:
  // the 4th comes after the first decoded token.
  std::string out = train("cut", "ZO2_TEST_SIGINT_IN_EVAL=2:4", 130);
  EXPECT_NE(out.find("the evaluation after step 2 was interrupted"), std::string::npos) << out;
  EXPECT_TRUE(evals("cut").empty());
  out.clear();
  ASSERT_EQ(run("train --resume " + (m.tmp / "cut").string() + " --out " + (m.tmp / "cut").string(), &out), 0) << out;
  const auto resumed = evals("cut");
  ASSERT_EQ(resumed.size(), 1u);
  for (const char* key : {"eval_after_step", "eval_loss", "eval_f1", "eval_em", "eval_examples"})
    EXPECT_EQ(resumed[0][key], ref[0][key]) << key;
}

// Weights that overflow the forward pass (a finite checkpoint: the final LayerNorm's
// weight 3e38) give NaN logits: generate and eval stop with an error saying so, instead of
// greedy picking id 0 over the NaNs (and squad's EM scoring "!!!" against "the" as 1).
TEST(GenerateCli, NonFiniteLogitsStopGenerateAndEvalWithAnError) {
  Micro m;
  const fs::path bad = m.tmp / "overflow";
  test::copy_with_filled_tensor(m.model, bad, "model.decoder.final_layer_norm.weight", 3e38f);
  std::string out;
  for (const std::string how : {"", " --temperature 0.8 --top-p 0.9 --seed 1"}) {
    out.clear();
    EXPECT_EQ(run("generate --model " + bad.string() + " --prompt 'The film was' --max-new-tokens 3" + how, &out), 1)
        << out;
    EXPECT_NE(out.find("the logits of prompt 0 at new token 1 are not finite"), std::string::npos) << out;
  }
  const fs::path squad = fs::path(__FILE__).parent_path() / "data" / "tasks" / "squad.json";
  out.clear();
  EXPECT_EQ(run("eval --model " + bad.string() + " --task squad --data " + squad.string() + " --max-new-tokens 3", &out), 1)
      << out;
  EXPECT_NE(out.find("the loss is not finite"), std::string::npos) << out;
  EXPECT_EQ(out.find("em 1.0"), std::string::npos) << out;
  // train's own evaluation reports no metric from them, and the run goes on and saves.
  out.clear();
  const fs::path log = m.tmp / "overflow.jsonl";
  EXPECT_EQ(run("train --model " + bad.string() + " --task squad --data " + squad.string() + " --eval " + squad.string() +
                    " --steps 2 --batch-size 2 --max-new-tokens 3 --out " + (m.tmp / "run").string() + " --log-json " +
                    log.string(),
                &out),
            0)
      << out;
  EXPECT_NE(out.find("the evaluation after step 2 is not finite"), std::string::npos) << out;
  EXPECT_TRUE(fs::exists(m.tmp / "run" / "current")) << out;
  int evals = 0;
  for (const auto& j : json_lines(read_file(log)))
    if (j.contains("eval_after_step")) {
      ++evals;
      EXPECT_TRUE(j.at("eval_loss").is_null()) << j.dump();
      EXPECT_FALSE(j.contains("eval_f1")) << j.dump();
      EXPECT_FALSE(j.contains("eval_em")) << j.dump();
    }
  EXPECT_EQ(evals, 1);
}

TEST(GenerateCli, BadRequestsAreUsageErrorsNamingTheFlagOrPrompt) {
  Micro m;
  EXPECT_NE(m.gen("--max-new-tokens 4", 2).find("--prompt TEXT or --data FILE"), std::string::npos);
  EXPECT_NE(m.gen("--prompt x --greedy --temperature 0.5", 2).find("excludes"), std::string::npos);
  EXPECT_NE(m.gen("--prompt x --temperature 0", 2).find("--temperature 0"), std::string::npos);
  EXPECT_NE(m.gen("--prompt x --top-p 1.5", 2).find("--top-p 1.5"), std::string::npos);
  EXPECT_NE(m.gen("--prompt x --temperature 1e-50", 2).find("--temperature 1e-50: must be finite and > 0 (it rounds to 0"),
            std::string::npos);
  EXPECT_NE(m.gen("--prompt x --top-p 1e-50", 2).find("--top-p 1e-50: must be in (0, 1] (it rounds to 0"),
            std::string::npos);
  EXPECT_NE(m.gen("--prompt x --max-new-tokens 0", 2).find("--max-new-tokens 0"), std::string::npos);
  EXPECT_NE(m.gen("--prompt x --kv-cache gpu", 2).find("--kv-cache 'gpu'"), std::string::npos);
  EXPECT_NE(m.gen("--prompt x --stop ''", 2).find("--stop: an empty value"), std::string::npos);  // Note [Empty values]
  // Flags that would change nothing are refused, not ignored.
  EXPECT_NE(m.gen("--prompt x --seed 5", 2).find("--seed 5: greedy decoding draws nothing"), std::string::npos);
  EXPECT_NE(m.gen("--prompt x --padding-side left", 2).find("--padding-side: generate places its prompts itself"),
            std::string::npos);
  EXPECT_NE(m.gen("--prompt x --max-len -5", 2).find("--max-len -5"), std::string::npos);
  EXPECT_NE(m.gen("--prompt x --temperature 0.7 --seed -1", 2).find("-1 is not a seed"), std::string::npos);
  // opt-micro has 512 positions.
  EXPECT_NE(m.gen("--prompt x --max-new-tokens 600", 2).find("prompt 1 has"), std::string::npos);
  // --max-len cuts a long prompt's start (the BOS stays): it then fits.
  std::string long_prompt = "a";
  for (int i = 0; i < 600; ++i) long_prompt += " a";
  EXPECT_NE(m.gen("--prompt '" + long_prompt + "' --max-new-tokens 2", 2).find("prompt 1 has"), std::string::npos);
  const auto cut = json_lines(m.gen("--prompt '" + long_prompt + "' --max-new-tokens 2 --max-len 100 --json -q"));
  ASSERT_EQ(cut.size(), 1u);
  EXPECT_EQ(cut[0]["tokens"].size(), 2u);
  write_file(m.tmp / "bad.jsonl", "{\"prompt\": 3}\n");
  EXPECT_NE(m.gen("--data " + (m.tmp / "bad.jsonl").string(), 1).find("bad.jsonl:1:"), std::string::npos);
  // An --output that cannot be written is refused before anything is generated (no text):
  // hours of generation are not lost to a typo. A missing directory is made.
  write_file(m.tmp / "file", "x");
  const fs::path under_file = m.tmp / "file" / "out.jsonl";
  std::string out = m.gen("--prompt x --max-new-tokens 4 --json --output " + under_file.string(), 1);
  EXPECT_NE(out.find("--output " + under_file.string() + ": cannot create the directory " + (m.tmp / "file").string() + ": " +
                     (m.tmp / "file").string() + " is not a directory"),
            std::string::npos)
      << out;
  EXPECT_EQ(out.find("\"text\""), std::string::npos) << out;
  // Nor a file of the --tokenizer directory.
  fs::create_directories(m.tmp / "tok");
  for (const char* f : {"encoder.json", "vocab.bpe"})
    fs::copy_file(test::shared_dir() / "data" / "gpt2" / f, m.tmp / "tok" / f);
  const std::string encoder = read_file(m.tmp / "tok" / "encoder.json");
  out = m.gen("--prompt x --max-new-tokens 2 --tokenizer " + (m.tmp / "tok").string() + " --output " +
                  (m.tmp / "tok" / "encoder.json").string(),
              2);
  EXPECT_NE(out.find("a file of the model, adapter or tokenizer this command reads"), std::string::npos) << out;
  EXPECT_EQ(read_file(m.tmp / "tok" / "encoder.json"), encoder);
  m.gen("--prompt x --max-new-tokens 4 -q --output " + (m.tmp / "new" / "dir" / "out.jsonl").string());
  EXPECT_TRUE(fs::exists(m.tmp / "new" / "dir" / "out.jsonl"));
  out = m.gen("--prompt x --max-new-tokens 4 --output " + m.tmp.path().string(), 2);
  EXPECT_NE(out.find("--output " + m.tmp.path().string() + " is a directory"), std::string::npos) << out;
}

TEST(GenerateCli, PlanGenerateSaysWhereTheCacheLives) {
  std::string out;
  ASSERT_EQ(run("plan --preset opt-1.3b --gpu-mem 8G --generate --batch-size 8 --seq-len 512", &out), 0) << out;
  EXPECT_NE(out.find("KV cache: 8 sequences x 512 positions"), std::string::npos) << out;
  EXPECT_NE(out.find("on the device"), std::string::npos) << out;
  out.clear();
  ASSERT_EQ(run("plan --preset opt-1.3b --gpu-mem 8G --generate --batch-size 8 --seq-len 512 --kv-cache host --json", &out),
            0)
      << out;
  const json j = json::parse(out);
  EXPECT_EQ(j["generate"]["kv_cache"], "host");
  EXPECT_GT(j["generate"]["kv_host_bytes"].get<std::uint64_t>(), 0u);
  out.clear();
  EXPECT_EQ(run("plan --preset opt-1.3b --gpu-mem 8G --kv-cache host", &out), 2) << out;
  EXPECT_NE(out.find("--kv-cache is for --generate"), std::string::npos) << out;
}

}  // namespace
}  // namespace zo2
