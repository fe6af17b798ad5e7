// zo2-tune on real data, as a user runs it: JSONL in its three formats and MeZO's task
// presets through a real (SentencePiece) tokenizer, loss only on completion/option tokens,
// MeZO's templates, truncation, clear errors with line numbers, tokenizer files carried
// into checkpoints, exact resume with shuffling, and multiple-choice training that raises
// the accuracy of a small learnable task.
#include "api/run_dir.h"
#include "models/config.h"
#include "models/safetensors.h"
#include "models/tokenizer.h"
#include "tests/test_util.h"
#include "tools/dataset.h"
#include "tools/task_metrics.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <tuple>

namespace zo2 {
namespace {

using test::read_file;
using test::write_file;

namespace fs = std::filesystem;
using json = nlohmann::json;

int run(const std::string& args, std::string* out = nullptr) {
  return test::run_command(test::zo2_tune_path().string() + " " + args, out);
}

// An opt-micro checkpoint with the GPT-2 tokenizer in tmp/micro (empty on failure, said).
fs::path micro_with_gpt2(const test::TempDir& tmp) {
  std::string out;
  const fs::path model = tmp / "micro";
  const int rc = run("init --preset opt-micro --tokenizer " + (test::shared_dir() / "data" / "gpt2").string() +
                         " --out " + model.string() + " -q",
                     &out);
  EXPECT_EQ(rc, 0) << out;
  return rc == 0 ? model : fs::path();
}

const std::vector<std::string> kPositive{"wonderful", "lovely", "superb", "charming", "delightful"};
const std::vector<std::string> kNegative{"awful", "dreadful", "boring", "horrible", "dull"};

// A sentiment task a tiny model can learn: the adjective decides the label.
std::string sentiment_jsonl(int n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s;
  for (int i = 0; i < n; ++i) {
    const int label = static_cast<int>(rng() % 2);
    const auto& words = label ? kPositive : kNegative;
    const std::string w = words[rng() % words.size()];
    s += json{{"prompt", "The film was " + w + ". It was"}, {"options", {" bad", " good"}}, {"label", label}}.dump() +
         "\n";
  }
  return s;
}

// opt-tiny (vocabulary 512) with a 500-piece SentencePiece tokenizer copied in by init.
struct Workspace {
  test::TempDir tmp;
  fs::path tok = tmp / "tok";
  fs::path model = tmp / "model";
  Workspace() {
    fs::create_directories(tok);
    std::string corpus;
    for (const auto& w : kPositive) corpus += "The film was " + w + ". It was good. It was bad.\n";
    for (const auto& w : kNegative) corpus += "The film was " + w + ". It was bad. It was good.\n";
    for (int i = 0; i < 4; ++i)
      corpus += "A man runs.\nDoes this mean that \"A person moves.\" is true? Yes or No?\nYes\n"
                "Suppose It rains. Can we infer that \"It is wet.\"? Yes, No, or Maybe?\nMaybe\n"
                "It is. Is it true?\nNo. The man fell because he slipped. It rained so the ground got wet.\n";
    write_file(tmp / "corpus.txt", corpus);
    train_sentencepiece("--input=" + (tmp / "corpus.txt").string() + " --model_prefix=" + (tok / "tokenizer").string() +
                        " --vocab_size=500 --model_type=bpe --character_coverage=1.0 --byte_fallback=true"
                        " --normalization_rule_name=identity --remove_extra_whitespaces=false"
                        " --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --minloglevel=2");
    std::string out;
    EXPECT_EQ(run("init --preset opt-tiny --tokenizer " + tok.string() + " --out " + model.string() + " --seed 1 -q",
                  &out),
              0)
        << out;
  }
  fs::path file(const std::string& name, const std::string& content) const {
    write_file(tmp / name, content);
    return tmp / name;
  }
  json eval(const fs::path& data, const std::string& extra = "", const fs::path* with_model = nullptr) const {
    std::string out;
    const int rc = run("eval --model " + (with_model ? *with_model : model).string() + " --data " + data.string() +
                           " --json -q " + extra,
                       &out);
    EXPECT_EQ(rc, 0) << out;
    return rc == 0 ? json::parse(out.substr(out.find('{'))) : json();
  }
  // zo2-tune data --show: the examples as JSON lines.
  std::vector<json> show(const fs::path& data, const std::string& extra = "") const {
    std::string out;
    EXPECT_EQ(run("data --model " + model.string() + " --data " + data.string() + " --show 100 " + extra + " 2>/dev/null",
                  &out),
              0)
        << out;
    std::vector<json> rows;
    std::istringstream in(out);
    for (std::string line; std::getline(in, line);)
      if (!line.empty() && line[0] == '{') rows.push_back(json::parse(line));
    return rows;
  }
  // The error output of a command that must fail cleanly: status 1 (bad file) or 2 (bad argument).
  std::string error(const std::string& args) const {
    std::string out;
    const int rc = run(args, &out);
    EXPECT_TRUE(rc == 1 || rc == 2) << rc << ": " << out;
    EXPECT_NE(out.find("zo2-tune: error: "), std::string::npos) << out;
    return out;
  }
};

// A session may be at any step up to 2^53 (the C API's and Python's first_step); step · batch
// then passes 2^63, and train_batch read outside the permutation (adversarial pass 66: a
// resume at step 2^53 − 10 with --batch-size 2048 crashed). The data position is taken in
// 128 bits: below 2^63 the batches are what they were.
TEST(Data, TheBatchOfAStepNear2To53IsItsPositionModuloTheData) {
  test::TempDir tmp;
  std::string out;
  ASSERT_EQ(run("init --preset opt-micro --out " + (tmp / "m").string() + " -q", &out), 0) << out;
  ASSERT_EQ(run("synth-data --model " + (tmp / "m").string() + " --out " + (tmp / "d.safetensors").string() +
                    " --rows 48 --seq 8 --seed 4 -q",
                &out),
            0)
      << out;
  const ModelConfig cfg = ModelConfig::load(tmp / "m");
  for (const bool shuffle : {false, true}) {
    cli::DataOptions o;
    o.shuffle = shuffle;
    const cli::Dataset d = cli::Dataset::load(tmp / "d.safetensors", cfg, nullptr, o);
    const std::int64_t step = (std::int64_t{1} << 53) - 10;
    const int batch = 2048;
    const HostBatch b = d.train_batch(step, batch);
    ASSERT_EQ(b.batch, batch);
    if (!shuffle) {
      // Row j is example (step·batch + j) mod n, worked out without the 128-bit product:
      // step·batch mod n = ((step mod n)·batch) mod n.
      const std::int64_t n = d.size();
      for (int j : {0, 1, batch - 1}) {
        const std::int64_t want = ((step % n) * batch + j) % n;
        const HostBatch one = d.train_batch(want, 1);  // step `want` of batch 1 is example `want` (want < n)
        EXPECT_TRUE(std::equal(one.ids.begin(), one.ids.begin() + one.seq, b.ids.begin() + j * b.seq)) << j;
      }
    }
    // Below 2^63 nothing changed: unshuffled, batch 1 of batch size 4 is examples 4..7, the
    // rows of steps 4..7 of batch size 1. (Shuffled, the step near 2^53 is checked only to
    // read inside the data: its permutation is the epoch's, which only the reader knows.)
    if (!shuffle) {
      const HostBatch second = d.train_batch(1, 4);
      ASSERT_EQ(second.batch, 4);
      for (int j = 0; j < 4; ++j) {
        const HostBatch one = d.train_batch(4 + j, 1);
        EXPECT_TRUE(std::equal(one.ids.begin(), one.ids.begin() + one.seq, second.ids.begin() + j * second.seq)) << j;
      }
    }
  }
}

TEST(Data, InitCopiesTheTokenizerAndTheCheckpointUsesIt) {
  Workspace w;
  EXPECT_TRUE(fs::exists(w.model / "tokenizer.model"));
  const auto tok = Tokenizer::from_dir(w.model);
  const json cfg = json::parse(read_file(w.model / "config.json"));
  EXPECT_EQ(cfg.at("bos_token_id").get<int>(), *tok->bos_id());
  EXPECT_EQ(cfg.at("eos_token_id").get<int>(), *tok->eos_id());
}

TEST(Data, CompletionLossCountsOnlyTheCompletionTokens) {
  Workspace w;
  const auto tok = Tokenizer::from_dir(w.model);
  std::string completion, text;
  std::int64_t scored = 0, all = 0;
  for (const auto& word : kPositive) {
    const std::string prompt = "The film was " + word + ". It was";
    completion += json{{"prompt", prompt}, {"completion", " good"}}.dump() + "\n";
    text += json{{"text", prompt + " good"}}.dump() + "\n";
    scored += static_cast<std::int64_t>(tok->encode(prompt + " good").size() - tok->encode(prompt).size());
    all += static_cast<std::int64_t>(tok->encode_with_special(prompt + " good").size()) - 1;
  }
  const json c = w.eval(w.file("c.jsonl", completion));
  const json t = w.eval(w.file("t.jsonl", text));
  EXPECT_EQ(c.at("format"), "prompt/completion");
  EXPECT_EQ(t.at("format"), "text");
  EXPECT_EQ(c.at("tokens").get<std::int64_t>(), scored);
  EXPECT_EQ(t.at("tokens").get<std::int64_t>(), all);
  EXPECT_EQ(c.at("examples").get<int>(), 5);
  // The scored part decodes to the completion.
  for (const auto& row : w.show(w.tmp / "c.jsonl")) EXPECT_EQ(row["sequences"][0]["scored"], "good") << row.dump();
}

TEST(Data, TaskPresetsUseMezoTemplates) {
  Workspace w;
  const auto sst2 = w.file("sst2.tsv", "sentence\tlabel\nit 's a charming journey . \t1\nboring and dull \t0\n");
  const auto rte = w.file("rte.jsonl",
                          R"({"premise": "A man runs.", "hypothesis": "A person moves.", "label": "entailment", "idx": 0}
{"premise": "A man sits.", "hypothesis": "He runs.", "label": "not_entailment", "idx": 1}
)");
  const auto cb = w.file("cb.jsonl", R"({"premise": "It rains.", "hypothesis": "It is wet.", "label": "neutral", "idx": 0}
)");
  const auto boolq = w.file("boolq.jsonl", R"({"question": "is it true", "passage": "It is.", "label": true, "idx": 0}
)");
  const auto copa = w.file("copa.jsonl",
                           R"({"premise": "The man fell.", "choice1": "He slipped.", "choice2": "I laughed.", "question": "cause", "label": 0, "idx": 0}
{"premise": "It rained.", "choice1": "The ground got wet.", "choice2": "It was dry.", "question": "effect", "label": 0, "idx": 1}
)");
  auto texts = [&](const fs::path& f, const std::string& task) {
    std::vector<std::vector<std::string>> out;
    for (const auto& row : w.show(f, "--task " + task)) {
      out.emplace_back();
      for (const auto& s : row["sequences"]) out.back().push_back(s["text"].get<std::string>());
    }
    return out;
  };
  // SentencePiece decodes "<s>" for BOS, which it puts first (LLaMA-2 style).
  using V = std::vector<std::vector<std::string>>;
  EXPECT_EQ(texts(sst2, "sst2"), (V{{"<s>it 's a charming journey . It was terrible", "<s>it 's a charming journey . It was great"},
                                    {"<s>boring and dull It was terrible", "<s>boring and dull It was great"}}));
  // A byte order mark (as Windows editors save) is not part of the header.
  const auto sst2_bom = w.file("sst2-bom.tsv", "\xEF\xBB\xBFsentence\tlabel\nit 's a charming journey . \t1\nboring and dull \t0\n");
  EXPECT_EQ(texts(sst2_bom, "sst2"), texts(sst2, "sst2"));
  EXPECT_EQ(texts(rte, "rte")[0],
            (std::vector<std::string>{"<s>A man runs.\nDoes this mean that \"A person moves.\" is true? Yes or No?\nYes",
                                      "<s>A man runs.\nDoes this mean that \"A person moves.\" is true? Yes or No?\nNo"}));
  EXPECT_EQ(texts(cb, "cb")[0].size(), 3u);
  EXPECT_EQ(texts(cb, "cb")[0][2], "<s>Suppose It rains. Can we infer that \"It is wet.\"? Yes, No, or Maybe?\nMaybe");
  EXPECT_EQ(texts(boolq, "boolq")[0],
            (std::vector<std::string>{"<s>It is. Is it true?\nNo", "<s>It is. Is it true?\nYes"}));
  const auto c = texts(copa, "copa");
  EXPECT_EQ(c[0], (std::vector<std::string>{"<s>The man fell because he slipped.", "<s>The man fell because I laughed."}));
  EXPECT_EQ(c[1][0], "<s>It rained so the ground got wet.");
  // Labels as the files give them, and evaluation over every example.
  EXPECT_EQ(w.show(rte, "--task rte")[1]["label"], 1);
  EXPECT_EQ(w.show(cb, "--task cb")[0]["label"], 2);
  EXPECT_EQ(w.show(boolq, "--task boolq")[0]["label"], 1);
  for (const auto& [f, task] : std::vector<std::pair<fs::path, std::string>>{
           {sst2, "sst2"}, {rte, "rte"}, {cb, "cb"}, {boolq, "boolq"}, {copa, "copa"}}) {
    const json e = w.eval(f, "--task " + task);
    EXPECT_TRUE(e.contains("accuracy")) << task;
    EXPECT_GE(e.value("accuracy", -1.0), 0.0) << task;
  }
}

// ---- wsc, wic, multirc, record, squad, drop: the fixtures of tests/data/tasks ----------

fs::path task_fixture(const std::string& name) { return fs::path(__FILE__).parent_path() / "data" / "tasks" / name; }

// The workspace's tokenizer in llama-tiny with 1024 positions (its rotary positions need no
// table, so the config alone says how long): the real tasks' prompts exceed opt-tiny's 64.
fs::path long_model(const Workspace& w) {
  const fs::path dir = w.tmp / "long";
  if (fs::exists(dir / "config.json")) return dir;
  std::string out;
  EXPECT_EQ(run("init --preset llama-tiny --tokenizer " + w.tok.string() + " --out " + dir.string() + " --seed 1 -q", &out), 0)
      << out;
  json cfg = json::parse(read_file(dir / "config.json"));
  cfg["max_position_embeddings"] = 1024;
  write_file(dir / "config.json", cfg.dump(1));
  return dir;
}

std::vector<json> show_task(const Workspace& w, const fs::path& data, const std::string& task) {
  std::string out;
  EXPECT_EQ(run("data --model " + long_model(w).string() + " --data " + data.string() + " --task " + task +
                    " --show 100 2>/dev/null",
                &out),
            0)
      << out;
  std::vector<json> rows;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);)
    if (!line.empty() && line[0] == '{') rows.push_back(json::parse(line));
  return rows;
}

// Each example's candidates' decoded texts (the tokenizer round-trips them: byte fallback).
std::vector<std::vector<std::string>> sequence_texts(const std::vector<json>& rows, const char* field = "text") {
  std::vector<std::vector<std::string>> out;
  for (const auto& row : rows) {
    out.emplace_back();
    for (const auto& s : row["sequences"]) out.back().push_back(s[field].get<std::string>());
  }
  return out;
}

TEST(Data, SuperGlueTasksRenderMezoTemplatesFromTheStandardFiles) {
  Workspace w;
  const fs::path lm = long_model(w);
  using V = std::vector<std::vector<std::string>>;
  // WSC (HF's wsc.fixed, MeZO's WSCTemplate): the pronoun lower-cased; line 2's span
  // "the trophy." is not in the text, so it takes the case of the text's word 0 and loses
  // its period: "The trophy".
  const auto wsc = show_task(w, task_fixture("wsc.jsonl"), "wsc");
  const std::string wsc1 =
      "<s>Mark told Pete many lies about himself, which Pete included in his book. He should have been more truthful.\n"
      "In the previous sentence, does the pronoun \"he\" refer to Mark? Yes or No?\n";
  const std::string wsc2 =
      "<s>The trophy doesn't fit into the brown suitcase because it is too large.\n"
      "In the previous sentence, does the pronoun \"it\" refer to The trophy? Yes or No?\n";
  EXPECT_EQ(sequence_texts(wsc), (V{{wsc1 + "No", wsc1 + "Yes"}, {wsc2 + "No", wsc2 + "Yes"}}));
  ASSERT_EQ(wsc.size(), 2u);
  EXPECT_EQ(wsc[0]["label"], 1);
  EXPECT_EQ(wsc[1]["label"], 0);
  EXPECT_EQ(sequence_texts(wsc, "scored"), (V{{"No", "Yes"}, {"No", "Yes"}}));

  // WiC (WICTemplate).
  const auto wic = show_task(w, task_fixture("wic.jsonl"), "wic");
  const std::string wic1 =
      "<s>Does the word \"place\" have the same meaning in these two sentences? Yes, No?\n"
      "Do you want to come over to my place later?\nA political system with no place for the less prominent groups.\n";
  ASSERT_EQ(wic.size(), 2u);
  EXPECT_EQ(sequence_texts(wic)[0], (std::vector<std::string>{wic1 + "No", wic1 + "Yes"}));
  EXPECT_EQ(wic[0]["label"], 0);
  EXPECT_EQ(wic[1]["label"], 1);

  // MultiRC (MultiRCTemplate): SuperGLUE's nested passage → questions → answers, one
  // example per answer option, the paragraph's markup kept as HF datasets keeps it.
  const auto mrc = show_task(w, task_fixture("multirc.jsonl"), "multirc");
  ASSERT_EQ(mrc.size(), 4u);
  const std::string para = "<s><b>Sent 1: </b>Sam ate an apple.<br><b>Sent 2: </b>Then he slept.<br>\n";
  EXPECT_EQ(sequence_texts(mrc)[0][1],
            para + "Question: What did Sam eat?\nI found this answer \"An apple\". Is that correct? Yes or No?\nYes");
  EXPECT_EQ(sequence_texts(mrc)[1][0],
            para + "Question: What did Sam eat?\nI found this answer \"A pear\". Is that correct? Yes or No?\nNo");
  EXPECT_EQ(sequence_texts(mrc)[2][0], para +
                                           "Question: What did Sam do after eating?\nI found this answer \"He slept\". "
                                           "Is that correct? Yes or No?\nNo");
  EXPECT_EQ(sequence_texts(mrc)[3][1],
            "<s>The sky is blue.\nQuestion: What color is the sky?\nI found this answer \"Green\". Is that correct? Yes "
            "or No?\nYes");
  std::vector<int> labels, questions, lines;
  for (const auto& r : mrc) {
    labels.push_back(r["label"]);
    questions.push_back(r["question"]);
    lines.push_back(r["line"]);
  }
  EXPECT_EQ(labels, (std::vector<int>{1, 0, 1, 0}));
  EXPECT_EQ(questions, (std::vector<int>{0, 0, 1, 2}));
  EXPECT_EQ(lines, (std::vector<int>{1, 1, 1, 2}));

  // ReCoRD (MeZO's template 0, ReCoRDTemplateGPT3): "@highlight\n" shown as "- ", the query
  // with every @placeholder replaced by the candidate; the candidates are the distinct
  // entity texts sorted (offsets in characters: "Zoë" has a 2-byte ë), the golds the
  // distinct answers sorted; MeZO trains on the first.
  const auto rec = show_task(w, task_fixture("record.jsonl"), "record");
  ASSERT_EQ(rec.size(), 2u);
  const std::string passage =
      "<s>Zo\xC3\xAB Ball met Chris Evans in London.\n- Ball praised Chris Evans\n- The show moved to London\n- ";
  EXPECT_EQ(sequence_texts(rec)[0],
            (std::vector<std::string>{passage + "Ball hosted the breakfast show.",
                                      passage + "Chris Evans hosted the breakfast show.",
                                      passage + "London hosted the breakfast show.",
                                      passage + "Zo\xC3\xAB Ball hosted the breakfast show."}));
  EXPECT_EQ(sequence_texts(rec)[1][2], passage + "The show is made in London, said London.");
  EXPECT_EQ(sequence_texts(rec, "scored")[1][3], "The show is made in Zo\xC3\xAB Ball, said Zo\xC3\xAB Ball.");
  EXPECT_EQ(rec[0]["label"], 1);
  EXPECT_EQ(rec[0]["golds"], json({1}));
  EXPECT_EQ(rec[0]["answers"], json({"Chris Evans"}));
  EXPECT_EQ(rec[1]["label"], 0);
  EXPECT_EQ(rec[1]["golds"], json({0, 2}));
  EXPECT_EQ(rec[1]["answers"], json({"Ball", "London"}));

  // Evaluation: MeZO's accuracy, and the tasks' own metrics beside it.
  const json m = w.eval(task_fixture("multirc.jsonl"), "--task multirc", &lm);
  EXPECT_EQ(m.at("task"), "multirc");
  EXPECT_EQ(m.at("examples"), 4);
  for (const char* k : {"accuracy", "f1a", "em"}) {
    EXPECT_GE(m.value(k, -1.0), 0.0) << k;
    EXPECT_LE(m.value(k, 2.0), 1.0) << k;
  }
  // --num-eval samples answer options (drawn before tokenizing, as after).
  EXPECT_EQ(w.eval(task_fixture("multirc.jsonl"), "--task multirc --num-eval 3 --data-seed 4", &lm).at("examples"), 3);
  const json r = w.eval(task_fixture("record.jsonl"), "--task record", &lm);
  EXPECT_EQ(r.at("examples"), 2);
  // A right pick is also an exact (and F1) match; a wrong one can still share tokens.
  EXPECT_GE(r.value("em", -1.0), r.value("accuracy", 2.0));
  EXPECT_GE(r.value("f1", -1.0), r.value("em", 2.0));
  for (const auto& [f, task] : std::vector<std::pair<std::string, std::string>>{{"wsc.jsonl", "wsc"}, {"wic.jsonl", "wic"}}) {
    const json e = w.eval(task_fixture(f), "--task " + task, &lm);
    EXPECT_EQ(e.at("examples"), 2) << task;
    EXPECT_GE(e.value("accuracy", -1.0), 0.0) << task;
  }
}

TEST(Data, SquadAndDropTrainOnTheFirstGoldAnswerAndKeepThemAll) {
  Workspace w;
  const fs::path lm = long_model(w);
  // SQuAD v1.1 JSON (SQuADv2Template): the question stripped, a missing title empty, the
  // completion " {answers[0]}\n"; every gold answer kept (duplicates too, as HF datasets).
  const auto sq = show_task(w, task_fixture("squad.json"), "squad");
  ASSERT_EQ(sq.size(), 3u);
  const std::string ctx =
      "<s>Title: Super_Bowl_50\nContext: Super Bowl 50 was played on February 7, 2016, in Santa Clara. The Denver "
      "Broncos won.\n";
  EXPECT_EQ(sequence_texts(sq), (std::vector<std::vector<std::string>>{
                                    {ctx + "Question: Who won Super Bowl 50?\nAnswer: The Denver Broncos\n"},
                                    {ctx + "Question: Where was the game played?\nAnswer: Santa Clara\n"},
                                    {"<s>Title: \nContext: No title here.\nQuestion: What is missing?\nAnswer: title\n"}}));
  EXPECT_EQ(sequence_texts(sq, "scored")[0][0], "The Denver Broncos\n");
  EXPECT_EQ(sq[0]["answers"], json({"The Denver Broncos", "Denver Broncos", "Denver Broncos"}));

  // DROP JSON (DROPTemplate), as HF datasets reads it: "validated_answers" when there are
  // any (each span of each is a gold), else "answer"; a number as written, a date as
  // "day month year" without the blanks; an answer that is a number and spans at once is
  // skipped with a warning (query d5).
  std::string out;
  ASSERT_EQ(run("data --model " + lm.string() + " --data " + task_fixture("drop.json").string() +
                    " --task drop --show 100",
                &out),
            0)
      << out;
  EXPECT_NE(out.find("1 question(s) skipped"), std::string::npos) << out;
  EXPECT_NE(out.find("nfl_1.qa_pairs[4] (query_id d5)"), std::string::npos) << out;
  const auto dr = show_task(w, task_fixture("drop.json"), "drop");
  ASSERT_EQ(dr.size(), 5u);
  const std::string p =
      "<s>Passage: The Bears scored 14 points in the first half and 10 in the second. Smith and Jones scored "
      "touchdowns. The game was on 5 May 1990.\n";
  EXPECT_EQ(sequence_texts(dr)[0][0], p + "Question: How many points did the Bears score?\nAnswer: 24\n");
  EXPECT_EQ(sequence_texts(dr)[1][0], p + "Question: Who scored touchdowns?\nAnswer: Smith\n");
  EXPECT_EQ(sequence_texts(dr)[4][0],
            "<s>Passage: In 1066 the Normans arrived.\nQuestion: What year did the Normans arrive?\nAnswer: 1066\n");
  std::vector<json> answers, drop_golds;
  for (const auto& r : dr) {
    answers.push_back(r["answers"]);
    drop_golds.push_back(r["drop_golds"]);
  }
  EXPECT_EQ(answers, (std::vector<json>{json({"24"}), json({"Smith", "Jones", "Smith"}), json({"5 May 1990"}),
                                        json({"1990"}), json({"1066"})}));
  // drop_eval.py's golds: "answer" and every validated answer, a date as "day month year".
  EXPECT_EQ(drop_golds, (std::vector<json>{json::parse(R"([["24"]])"),
                                           json::parse(R"([["Smith", "Jones"], ["Smith", "Jones"], ["Smith"]])"),
                                           json::parse(R"([["5 May 1990"]])"), json::parse(R"([["  1990"]])"),
                                           json::parse(R"([["1066"]])")}));
  // eval decodes and reports MeZO's f1/em and drop_eval's drop_f1/drop_em, each answer's as
  // task_metrics.h gives them.
  const fs::path preds = w.tmp / "drop_pred.jsonl";
  const json de = w.eval(task_fixture("drop.json"), "--task drop --max-new-tokens 3 --predictions " + preds.string(), &lm);
  for (const char* k : {"f1", "em", "drop_f1", "drop_em"}) EXPECT_TRUE(de.contains(k)) << k << de.dump();
  std::istringstream pin(read_file(preds));
  double dsum = 0;
  std::size_t n = 0;
  for (std::string line; std::getline(pin, line); ++n) {
    ASSERT_LT(n, dr.size());
    const json p = json::parse(line);
    const auto golds = dr[n]["drop_golds"].get<std::vector<std::vector<std::string>>>();
    EXPECT_EQ(p.at("drop_f1").get<double>(), cli::metrics::drop_question(p.at("prediction").get<std::string>(), golds).f1);
    dsum += p.at("drop_f1").get<double>();
  }
  EXPECT_EQ(n, dr.size());
  EXPECT_NEAR(de.at("drop_f1").get<double>(), dsum / static_cast<double>(n), 1e-12);

  // eval --max-new-tokens 0: the gold answers' loss, and a note that F1/EM needs generation.
  const json e = w.eval(task_fixture("squad.json"), "--task squad --max-new-tokens 0", &lm);
  EXPECT_EQ(e.at("format"), "prompt/completion");
  EXPECT_EQ(e.at("examples"), 3);
  EXPECT_TRUE(std::isfinite(e.value("loss", std::nan(""))));
  EXPECT_NE(e.value("note", std::string()).find("needs generation"), std::string::npos) << e.dump();
  EXPECT_FALSE(e.contains("f1"));
  std::string text;
  EXPECT_EQ(run("eval --model " + lm.string() + " --data " + task_fixture("drop.json").string() +
                    " --task drop --max-new-tokens 0",
                &text),
            0)
      << text;
  EXPECT_NE(text.find("drop's metric (F1/EM of the greedy generation"), std::string::npos) << text;
  EXPECT_EQ(text.find("eval: f1"), std::string::npos) << text;
}

// zo2-tune forward's logits [1, L, V] on one sequence.
std::vector<float> forward_logits(const Workspace& w, const fs::path& model, const std::vector<std::int32_t>& ids) {
  const fs::path in = w.tmp / "fwd_in.safetensors", out = w.tmp / "fwd_out.safetensors";
  TensorToWrite t{"input_ids", DType::i32, {1, static_cast<std::int64_t>(ids.size())}, ids.data(), {}};
  write_safetensors(in, std::span<const TensorToWrite>(&t, 1));
  std::string log;
  EXPECT_EQ(run("forward --model " + model.string() + " --inputs " + in.string() + " --out " + out.string() + " -q", &log),
            0)
      << log;
  const auto f = SafetensorsFile::open(out);
  const auto bytes = f.read("logits");
  std::vector<float> v(bytes.size() / sizeof(float));
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

TEST(Data, SquadEvalDecodesGreedilyByRepeatedForwardsAndScoresMezoF1) {
  Workspace w;
  const fs::path lm = long_model(w);
  const fs::path preds = w.tmp / "pred.jsonl";
  const json e = w.eval(task_fixture("squad.json"),
                        "--task squad --batch-size 1 --max-new-tokens 5 --predictions " + preds.string(), &lm);
  ASSERT_TRUE(e.contains("f1") && e.contains("em")) << e.dump();
  EXPECT_FALSE(e.contains("note")) << e.dump();
  EXPECT_TRUE(std::isfinite(e.value("loss", std::nan(""))));  // the gold answers' loss too
  const auto tok = Tokenizer::from_dir(lm);
  const std::int32_t newline = tok->encode("\n").back();
  const auto V = static_cast<std::size_t>(json::parse(read_file(lm / "config.json")).at("vocab_size").get<int>());
  std::vector<json> rows;
  std::istringstream in(read_file(preds));
  for (std::string line; std::getline(in, line);) rows.push_back(json::parse(line));
  ASSERT_EQ(rows.size(), 3u);
  double f1 = 0, em = 0;
  for (const auto& row : rows) {
    const auto prompt = row.at("prompt_ids").get<std::vector<std::int32_t>>();
    const auto ids = row.at("ids").get<std::vector<std::int32_t>>();
    const std::string pred = row.at("prediction");
    const auto answers = row.at("answers").get<std::vector<std::string>>();
    ASSERT_GE(ids.size(), 1u);
    ASSERT_LE(ids.size(), 5u);
    // It stops at "\n" or EOS, and only there.
    for (std::size_t t = 0; t + 1 < ids.size(); ++t) EXPECT_TRUE(ids[t] != newline && ids[t] != *tok->eos_id()) << t;
    if (ids.size() < 5) {
      EXPECT_TRUE(ids.back() == newline || ids.back() == *tok->eos_id());
    }
    // Each new id is the argmax of forward's logits on the prompt and the ids before it.
    std::vector<std::int32_t> seq = prompt;
    seq.insert(seq.end(), ids.begin(), ids.end() - 1);
    const auto logits = forward_logits(w, lm, seq);
    ASSERT_EQ(logits.size(), seq.size() * V);
    for (std::size_t t = 0; t < ids.size(); ++t) {
      const float* r = logits.data() + (prompt.size() - 1 + t) * V;
      EXPECT_EQ(std::max_element(r, r + V) - r, ids[t]) << "token " << t << " of line " << row.at("line");
    }
    // The text is the decoded ids without special tokens, stripped; its scores are MeZO's.
    std::vector<std::int32_t> kept;
    for (auto id : ids)
      if (id != *tok->eos_id() && id != *tok->bos_id()) kept.push_back(id);
    std::string text = tok->decode(kept);
    const char* ws = " \t\r\n\f\v";
    text.erase(0, std::min(text.size(), text.find_first_not_of(ws)));
    text.erase(text.find_last_not_of(ws) + 1);
    EXPECT_EQ(pred, text);
    EXPECT_DOUBLE_EQ(row.at("f1").get<double>(), cli::metrics::qa_f1(pred, answers));
    EXPECT_DOUBLE_EQ(row.at("em").get<double>(), cli::metrics::qa_em(pred, answers));
    f1 += row.at("f1").get<double>();
    em += row.at("em").get<double>();
  }
  EXPECT_NEAR(e.at("f1").get<double>(), f1 / 3, 1e-12);
  EXPECT_NEAR(e.at("em").get<double>(), em / 3, 1e-12);
  // Three prompts of different lengths decoded together (right padding, rows leaving the
  // batch as they stop) give the same tokens as one at a time.
  const fs::path batched = w.tmp / "pred3.jsonl";
  w.eval(task_fixture("squad.json"), "--task squad --batch-size 3 --max-new-tokens 5 --predictions " + batched.string(),
         &lm);
  std::istringstream in3(read_file(batched));
  std::size_t i = 0;
  for (std::string line; std::getline(in3, line); ++i) {
    ASSERT_LT(i, rows.size());
    EXPECT_EQ(json::parse(line).at("ids"), rows[i].at("ids")) << i;
  }
  EXPECT_EQ(i, rows.size());
}

TEST(Data, RecordAndSquadTrainAndTrainLogsTheTaskMetrics) {
  Workspace w;
  const fs::path lm = long_model(w);
  const fs::path log = w.tmp / "log.jsonl";
  std::string out;
  ASSERT_EQ(run("train --model " + lm.string() + " --task record --data " + task_fixture("record.jsonl").string() +
                    " --eval " + task_fixture("record.jsonl").string() + " --out " + (w.tmp / "rec").string() +
                    " --steps 2 --batch-size 2 --lr 1e-4 --log-json " + log.string() + " --seed 0",
                &out),
            0)
      << out;
  json last;
  std::istringstream in(read_file(log));
  for (std::string line; std::getline(in, line);) {
    const json j = json::parse(line);
    if (j.contains("eval_after_step")) last = j;
  }
  ASSERT_FALSE(last.is_null()) << out;
  for (const char* k : {"eval_accuracy", "eval_f1", "eval_em"}) EXPECT_TRUE(last.contains(k)) << k << last.dump();
  EXPECT_NE(out.find(", f1 "), std::string::npos) << out;
  // The logged metrics are eval's on the saved model.
  const fs::path tuned = w.tmp / "rec";
  const json e = w.eval(task_fixture("record.jsonl"), "--task record", &tuned);
  for (const char* k : {"accuracy", "f1", "em"})
    EXPECT_NEAR(e.value(k, -1.0), last.value(std::string("eval_") + k, -2.0), 1e-12) << k;
  ASSERT_EQ(run("train --model " + lm.string() + " --task squad --data " + task_fixture("squad.json").string() +
                    " --eval " + task_fixture("squad.json").string() + " --out " + (w.tmp / "sq").string() +
                    " --steps 1 --batch-size 2 --lr 1e-4 --seed 0",
                &out),
            0)
      << out;
  // squad's metric is F1/EM of greedy decoding, which train --eval now runs (api/generate.h).
  EXPECT_NE(out.find("gold-answer loss"), std::string::npos) << out;
  EXPECT_NE(out.find(", f1 "), std::string::npos) << out;
  EXPECT_EQ(out.find("squad's metric"), std::string::npos) << out;  // no "needs generation" note
  // --max-new-tokens 0: the loss alone, with the note, said once.
  out.clear();
  ASSERT_EQ(run("train --model " + lm.string() + " --task squad --data " + task_fixture("squad.json").string() +
                    " --eval " + task_fixture("squad.json").string() + " --out " + (w.tmp / "sq0").string() +
                    " --steps 1 --batch-size 2 --lr 1e-4 --seed 0 --max-new-tokens 0",
                &out),
            0)
      << out;
  EXPECT_NE(out.find("squad's metric (F1/EM of the greedy generation"), std::string::npos) << out;
  EXPECT_EQ(out.find("squad's metric"), out.rfind("squad's metric")) << out;
}

// MeZO's mezo.sh trains copa and record with --train_as_classification False: the loss is
// the mean next-token loss of the correct option's tokens, as a prompt/completion file of
// the gold options gives it, not the cross-entropy over the candidates. With eps 1e-7, a
// step's (loss+ + loss−)/2 is the unperturbed loss up to O(eps²).
TEST(Data, CopaAndRecordTrainOnTheCorrectOptionAlone) {
  Workspace w;
  const fs::path lm = long_model(w);
  const std::string passage = "Zo\xC3\xAB Ball met Chris Evans in London.\n- Ball praised Chris Evans\n- The show moved to London\n-";
  const auto gold = w.file("rec_gold.jsonl",
                           json{{"prompt", passage}, {"completion", " Chris Evans hosted the breakfast show."}}.dump() +
                               "\n" +
                               json{{"prompt", passage}, {"completion", " The show is made in Ball, said Ball."}}.dump() +
                               "\n");
  const auto copa = w.file("copa.jsonl",
                           R"({"premise": "The man fell.", "choice1": "He slipped.", "choice2": "I laughed.", "question": "cause", "label": 0, "idx": 0}
{"premise": "It rained.", "choice1": "The ground got wet.", "choice2": "It was dry.", "question": "effect", "label": 1, "idx": 1}
)");
  const auto copa_gold = w.file("copa_gold.jsonl", R"({"prompt": "The man fell because", "completion": " he slipped."}
{"prompt": "It rained so", "completion": " it was dry."}
)");
  for (const auto& [data, task, reference] : std::vector<std::tuple<fs::path, std::string, fs::path>>{
           {task_fixture("record.jsonl"), "record", gold}, {copa, "copa", copa_gold}}) {
    const fs::path log = w.tmp / (task + ".log.jsonl");
    std::string out;
    ASSERT_EQ(run("train --model " + lm.string() + " --task " + task + " --data " + data.string() + " --out " +
                      (w.tmp / ("run-" + task)).string() + " --steps 1 --batch-size 2 --lr 0 --eps 1e-7 --log-json " +
                      log.string() + " --seed 3",
                  &out),
              0)
        << out;
    const json step = json::parse(read_file(log).substr(0, read_file(log).find('\n')));
    const json ref = w.eval(reference, "", &lm);
    EXPECT_NEAR(step.at("loss").get<double>(), ref.at("loss").get<double>(), 1e-4) << task << " " << step.dump();
    // The candidates' cross-entropy (what eval reports for the option data) is another number.
    const json ce = w.eval(data, "--task " + task, &lm);
    EXPECT_GT(std::abs(ce.at("loss").get<double>() - ref.at("loss").get<double>()), 1e-2) << task;
  }
}

// A training batch of copa or record holds one row per example, the correct candidate, so
// the training sizing (Dataset::train_rows/train_longest, which zo2-tune train sizes the
// scheduler with) counts those rows and their longest length, not every candidate's; the
// evaluation figures (max_candidates/longest) keep every candidate. `data` prints both.
TEST(Data, GoldOnlyTrainingIsSizedByTheCorrectCandidatesAlone) {
  Workspace w;
  const fs::path lm = long_model(w);
  const auto copa = w.file("copa.jsonl",
                           R"({"premise": "The man fell.", "choice1": "He slipped on the wet floor of the old kitchen.", "choice2": "I laughed.", "question": "cause", "label": 1, "idx": 0}
{"premise": "It rained.", "choice1": "The ground got wet.", "choice2": "It was dry.", "question": "effect", "label": 1, "idx": 1}
)");
  for (const auto& [data, task] :
       std::vector<std::pair<fs::path, std::string>>{{task_fixture("record.jsonl"), "record"}, {copa, "copa"}}) {
    std::string out;
    ASSERT_EQ(run("data --model " + lm.string() + " --data " + data.string() + " --task " + task + " --show 100", &out), 0)
        << out;
    std::size_t longest = 0, gold_longest = 0, candidates = 0;
    std::istringstream in(out);
    for (std::string line; std::getline(in, line);) {
      if (line.empty() || line[0] != '{') continue;
      const json row = json::parse(line);
      const auto& seqs = row.at("sequences");
      candidates = std::max(candidates, seqs.size());
      for (const auto& s : seqs) longest = std::max(longest, s.at("ids").size());
      gold_longest = std::max(gold_longest, seqs.at(row.at("label").get<std::size_t>()).at("ids").size());
    }
    // The fixtures make the difference visible: a wrong candidate is the longest sequence.
    ASSERT_LT(gold_longest, longest) << task << "\n" << out;
    ASSERT_GT(candidates, 1u) << task;
    EXPECT_NE(out.find(fmt::format("up to {} candidates", candidates)), std::string::npos) << out;
    EXPECT_NE(out.find(fmt::format("longest {} tokens;", longest)), std::string::npos) << out;
    EXPECT_NE(out.find(fmt::format("training rows: the correct candidate alone, longest {} tokens", gold_longest)),
              std::string::npos)
        << out;
  }
  // Tasks trained as cross-entropy over the candidates hold them all in a training batch.
  std::string out;
  ASSERT_EQ(run("data --model " + lm.string() + " --data " + task_fixture("wsc.jsonl").string() + " --task wsc", &out), 0)
      << out;
  EXPECT_NE(out.find("up to 2 candidates"), std::string::npos) << out;
  EXPECT_EQ(out.find("training rows"), std::string::npos) << out;
}

TEST(Data, TaskFilesWithBadFieldsNameTheFileLineAndField) {
  Workspace w;
  const std::string m = "data --model " + w.model.string() + " --data ";
  auto err = [&](const std::string& name, const std::string& content, const std::string& task) {
    return w.error(m + w.file(name, content).string() + " --task " + task);
  };
  std::string e = err("m.jsonl",
                      R"({"passage": {"text": "P", "questions": [{"question": "Q", "answers": [{"text": "A", "label": 1}, {"text": "B"}]}]}})"
                      "\n",
                      "multirc");
  EXPECT_NE(e.find("m.jsonl:1: no \"passage.questions[0].answers[1].label\" field"), std::string::npos) << e;
  e = err("m2.jsonl", R"({"passage": {"text": "P", "questions": {"question": "Q"}}})" "\n", "multirc");
  EXPECT_NE(e.find("m2.jsonl:1: \"passage.questions\" must be an array, not object"), std::string::npos) << e;
  e = err("w.jsonl",
          "{\"text\": \"He ran.\", \"target\": {\"span1_text\": \"He\", \"span1_index\": 0, \"span2_text\": \"He\", "
          "\"span2_index\": 0}, \"label\": true}\n{\"text\": \"x\", \"target\": {\"span1_text\": \"x\", \"span1_index\": 0}, "
          "\"label\": false}\n",
          "wsc");
  EXPECT_NE(e.find("w.jsonl:2: no \"target.span2_text\" field"), std::string::npos) << e;
  e = err("w2.jsonl",
          R"({"text": "He ran.", "target": {"span1_text": "Bob", "span1_index": 7, "span2_text": "He", "span2_index": 0}, "label": true})"
          "\n",
          "wsc");
  EXPECT_NE(e.find("w2.jsonl:1: \"target.span1_text\" \"Bob\" is not in the text and \"target.span1_index\" 7"),
            std::string::npos)
      << e;
  e = err("c.jsonl", R"({"word": "w", "sentence1": "a", "sentence2": "b", "label": "maybe"})" "\n", "wic");
  EXPECT_NE(e.find("c.jsonl:1: \"label\" must be true/false or 0/1, not \"maybe\""), std::string::npos) << e;
  e = err("c2.jsonl", R"({"word": "w", "sentence1": "a", "sentence2": "b", "idx": 3})" "\n", "wic");
  EXPECT_NE(e.find("c2.jsonl:1: no \"label\" field (the test splits"), std::string::npos) << e;
  const std::string rec_head = R"({"passage": {"text": "Ann met Bob.", "entities": [{"start": 0, "end": 2}, {"start": 8, "end": 10}]}, "qas": [{"query": "@placeholder left.", )";
  e = err("r.jsonl", rec_head + R"("answers": [{"start": 4, "end": 6, "text": "met"}]}]})" "\n", "record");
  EXPECT_NE(e.find("r.jsonl:1: the answer \"met\" of \"qas[0]\" is not one of the passage's entities"), std::string::npos)
      << e;
  e = err("r2.jsonl", rec_head + R"("idx": 0}]})" "\n", "record");
  EXPECT_NE(e.find("r2.jsonl:1: no \"qas[0].answers\" field (the test split of ReCoRD is unlabeled)"), std::string::npos)
      << e;
  e = err("r4.jsonl", R"({"passage": {"text": "Ann met Bob.", "entities": [{"start": 0, "end": 2}]}, "qas": [{"query": "", "answers": [{"text": "Ann"}]}]})" "\n", "record");
  EXPECT_NE(e.find("r4.jsonl:1: qas[0]: the answer adds nothing to the prompt"), std::string::npos) << e;
  e = err("r3.jsonl", R"({"passage": {"text": "Ann", "entities": [{"start": 0, "end": 3}]}, "qas": []})" "\n", "record");
  EXPECT_NE(e.find("r3.jsonl:1: \"passage.entities[0]\" spans [0, 3], outside the passage's 3 characters"),
            std::string::npos)
      << e;
  e = err("s.json",
          R"({"data": [{"title": "T", "paragraphs": [{"context": "C", "qas": [{"id": "q9", "question": "Q?", "answers": []}]}]}]})",
          "squad");
  EXPECT_NE(e.find("s.json: data[0].paragraphs[0].qas[0] (id q9): \"answers\" is empty"), std::string::npos) << e;
  e = err("s2.json", R"({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]})", "squad");
  EXPECT_NE(e.find("s2.json: no \"data[0].paragraphs[0].context\" field"), std::string::npos) << e;
  e = err("s3.json", "{\"data\": [", "squad");
  EXPECT_NE(e.find("s3.json: not valid JSON"), std::string::npos) << e;
  e = err("d.json", "[1, 2]", "drop");
  EXPECT_NE(e.find("d.json: expected DROP's {section id: {...}}, found array"), std::string::npos) << e;
  e = err("d2.json", R"({"s": {"passage": "P", "qa_pairs": [{"query_id": "x1", "question": "Q", "answer": {"number": 3}}]}})",
          "drop");
  EXPECT_NE(e.find("d2.json: s.qa_pairs[0] (query_id x1): \"answer.number\" must be a string, not number"),
            std::string::npos)
      << e;
}

// Fuzz finding (dataset target, fuzz/corpus/dataset/regress-token-label-beyond-vocab): a
// token file's labels and attention_mask values were not checked when it loaded, so `data`
// accepted it and `train` failed at the first step that drew the row. They are refused at
// load now, naming the file, row and position, as token ids are.
TEST(Data, TokenFilesWithBadLabelOrMaskValuesAreRefusedWhenLoaded) {
  Workspace w;
  const std::vector<std::int32_t> ids{5, 6, 7, 8, 9, 10, 11, 12};
  auto token_file = [&](const std::string& name, const std::vector<std::int32_t>* mask,
                        const std::vector<std::int32_t>* labels) {
    std::vector<TensorToWrite> t{{"input_ids", DType::i32, {2, 4}, ids.data(), {}}};
    if (mask) t.push_back({"attention_mask", DType::i32, {2, 4}, mask->data(), {}});
    if (labels) t.push_back({"labels", DType::i32, {2, 4}, labels->data(), {}});
    write_safetensors(w.tmp / name, std::span<const TensorToWrite>(t));
    return "data --model " + w.model.string() + " --data " + (w.tmp / name).string();
  };
  const std::vector<std::int32_t> bad_labels{-100, 6, 7, 8, -100, 6, 117440518, 8};
  std::string e = w.error(token_file("l.safetensors", nullptr, &bad_labels));
  EXPECT_NE(e.find("l.safetensors: label 117440518 at row 1, position 2 is outside the model's vocabulary [0, 512) "
                   "and not -100"),
            std::string::npos)
      << e;
  const std::vector<std::int32_t> negative{-100, 6, 7, 8, -100, -1, 7, 8};
  e = w.error(token_file("n.safetensors", nullptr, &negative));
  EXPECT_NE(e.find("n.safetensors: label -1 at row 1, position 1 is outside"), std::string::npos) << e;
  // An I64 value beyond 32 bits is named by row and position too.
  {
    std::vector<std::int64_t> wide(ids.begin(), ids.end());
    wide[6] = std::int64_t{1} << 40;
    std::vector<TensorToWrite> t{{"input_ids", DType::i64, {2, 4}, wide.data(), {}}};
    write_safetensors(w.tmp / "wide.safetensors", std::span<const TensorToWrite>(t));
    e = w.error("data --model " + w.model.string() + " --data " + (w.tmp / "wide.safetensors").string());
    EXPECT_NE(e.find("wide.safetensors: tensor 'input_ids' value 1099511627776 at row 1, position 2 does not fit 32 "
                     "bits"),
              std::string::npos)
        << e;
  }
  const std::vector<std::int32_t> bad_mask{1, 2, 1, 1, 1, 1, 1, 0};
  e = w.error(token_file("m.safetensors", &bad_mask, nullptr));
  EXPECT_NE(e.find("m.safetensors: attention_mask value 2 at row 0, position 1 is not 0 or 1"), std::string::npos) << e;
  // Valid values load: -100 labels, a 0/1 mask.
  const std::vector<std::int32_t> labels{-100, 6, 7, 8, -100, -100, 11, 12}, mask{1, 1, 1, 1, 1, 1, 1, 0};
  std::string out;
  EXPECT_EQ(run(token_file("ok.safetensors", &mask, &labels), &out), 0) << out;
}

TEST(Data, MalformedFilesAreRefusedWithTheirLineNumbers) {
  Workspace w;
  const std::string m = "eval --model " + w.model.string() + " --data ";
  auto err = [&](const std::string& name, const std::string& content, const std::string& extra = "") {
    return w.error(m + w.file(name, content).string() + " " + extra);
  };
  std::string e = err("bad.jsonl", "{\"text\": \"a b c\"}\n\n{\"text\": \"x\"\n");
  EXPECT_NE(e.find("bad.jsonl:3: not valid JSON"), std::string::npos) << e;
  // 300,000 '[' under an extra key crashed eval (a stack overflow in the JSON tree's copy):
  // refused by line before the tree is built (Note [Reading JSON]).
  e = err("deep.jsonl", "{\"text\": \"a b c\"}\n{\"text\": \"x\", \"zz\": " + std::string(300000, '[') +
                            std::string(300000, ']') + "}\n");
  EXPECT_NE(e.find("deep.jsonl:2: nested deeper than 256 levels"), std::string::npos) << e;
  e = err("mixed.jsonl", "{\"text\": \"a b c\"}\n{\"prompt\": \"a\", \"completion\": \" b\"}\n");
  EXPECT_NE(e.find("mixed.jsonl:2: a prompt/completion example, but the file's first example is text"), std::string::npos) << e;
  e = err("extra.jsonl", "{\"text\": \"a b c\"}\n{\"text\": \"a b\", \"id\": 7}\n");
  EXPECT_NE(e.find("extra.jsonl:2: unknown key \"id\" in a text example (its keys: \"text\")"), std::string::npos) << e;
  e = err("label.jsonl", "{\"prompt\": \"a\", \"completion\": \" b\", \"label\": 0}\n");
  EXPECT_NE(e.find("label.jsonl:1: unknown key \"label\" in a prompt/completion example (its keys: \"prompt\", "
                   "\"completion\")"),
            std::string::npos)
      << e;
  e = err("both.jsonl", "{\"prompt\": \"a\", \"options\": [\" b\", \" c\"], \"label\": 1, \"completion\": \" b\"}\n");
  EXPECT_NE(e.find("both.jsonl:1: unknown key \"completion\" in a multiple-choice example"), std::string::npos) << e;
  e = err("keys.jsonl", "{\"question\": \"a\"}\n");
  EXPECT_NE(e.find("keys.jsonl:1: expected"), std::string::npos) << e;
  EXPECT_NE(e.find("\"question\""), std::string::npos) << e;
  e = err("label.jsonl", "{\"prompt\": \"a\", \"options\": [\" x\", \" y\"], \"label\": 0}\n"
                         "{\"prompt\": \"a\", \"options\": [\" x\", \" y\"], \"label\": 2}\n");
  EXPECT_NE(e.find("label.jsonl:2: label 2 is outside [0, 2)"), std::string::npos) << e;
  e = err("opts.jsonl", "{\"prompt\": \"a\", \"options\": \" x\", \"label\": 0}\n");
  EXPECT_NE(e.find("opts.jsonl:1: \"options\" must be an array"), std::string::npos) << e;
  e = err("text.jsonl", "{\"text\": 5}\n");
  EXPECT_NE(e.find("text.jsonl:1: \"text\" must be a string"), std::string::npos) << e;
  e = err("empty.jsonl", "\n\n");
  EXPECT_NE(e.find("empty.jsonl: no examples"), std::string::npos) << e;
  // Nothing to predict (issue 16, defect 13): a text of one token (the BOS) is refused by
  // eval and train alike, exit 1, naming its line.
  e = err("short.jsonl", "{\"text\": \"It was good.\"}\n{\"text\": \"\"}\n");
  EXPECT_NE(e.find("short.jsonl:2: the text has fewer than 2 tokens, so nothing to predict"), std::string::npos) << e;
  {
    std::string out;
    EXPECT_EQ(run("train --model " + w.model.string() + " --data " + (w.tmp / "short.jsonl").string() + " --out " +
                      (w.tmp / "o").string() + " --steps 1",
                  &out),
              1)
        << out;
    EXPECT_NE(out.find("short.jsonl:2: the text has fewer than 2 tokens, so nothing to predict"), std::string::npos) << out;
    EXPECT_FALSE(fs::exists(w.tmp / "o"));
  }
  // Task files: the wrong file for the task, an unlabeled split, an unknown task.
  e = err("rte.jsonl", "{\"premise\": \"a\", \"label\": 0}\n", "--task rte");
  EXPECT_NE(e.find("rte.jsonl:1: no \"hypothesis\" field"), std::string::npos) << e;
  e = err("test.tsv", "index\tsentence\n0\tgood\n", "--task sst2");
  EXPECT_NE(e.find("test.tsv:1: --task sst2 reads GLUE's SST-2 TSV"), std::string::npos) << e;
  e = err("cb.jsonl", "{\"premise\": \"a\", \"hypothesis\": \"b\", \"idx\": 0}\n", "--task cb");
  EXPECT_NE(e.find("cb.jsonl:1: no \"label\" field"), std::string::npos) << e;
  e = err("cb2.jsonl", "{\"premise\": \"a\", \"hypothesis\": \"b\", \"label\": \"maybe\"}\n", "--task cb");
  EXPECT_NE(e.find("cb2.jsonl:1: label \"maybe\" is not one of"), std::string::npos) << e;
  std::string out;
  EXPECT_EQ(run(m + (w.tmp / "cb.jsonl").string() + " --task mnli", &out), 2) << out;  // a usage error
  EXPECT_NE(out.find("mnli"), std::string::npos) << out;
  e = err("x.tsv", "sentence\tlabel\na\t1\n");
  EXPECT_NE(e.find("x.tsv: a TSV file is read by a task preset (--task sst2)"), std::string::npos) << e;
  e = w.error(m + (w.tmp / "missing.jsonl").string());
  EXPECT_NE(e.find("missing.jsonl: no such data file"), std::string::npos) << e;
}

// Nothing to predict (issue 16, defect 13), with a tokenizer that adds no BOS (GPT-2 BPE): a
// completion or an option that is the whole sequence has no token after the first position,
// so no target. Refused at load by eval, train and data alike (exit 1), naming file, line
// and option — not a NaN loss for a batch of such examples, nor a mid-run "candidate
// sequence has no target token".
TEST(Data, TaskPresetsStripTheirTextsAsMezoEncodePromptDoes) {
  Workspace w;
  const auto tok = Tokenizer::from_dir(w.model);
  // MeZO's encode_prompt without demonstrations: the sequence is BOS + encode(V.strip(' ')
  // .lstrip()), the scored tokens len(encode(V.strip(' '))) − len(encode(U.strip(' '))),
  // for the unverbalized prompt U and each verbalized candidate V = U + answer.
  auto strip_spaces = [](std::string x) {
    x.erase(0, std::min(x.size(), x.find_first_not_of(' ')));
    x.erase(x.find_last_not_of(' ') + 1);
    return x;
  };
  auto mezo = [&](const std::string& u, const std::string& v) {
    std::string seq = strip_spaces(v);
    seq.erase(0, std::min(seq.size(), seq.find_first_not_of(" \t\r\n\f\v")));
    std::vector<std::int32_t> ids = tok->special_prefix();
    const auto body = tok->encode(seq);
    ids.insert(ids.end(), body.begin(), body.end());
    const auto scored = tok->encode(strip_spaces(v)).size() - tok->encode(strip_spaces(u)).size();
    return std::pair{json(ids), json(scored)};
  };
  auto expect = [&](const fs::path& f, const std::string& task, const std::string& u,
                    const std::vector<std::string>& answers) {
    const auto rows = w.show(f, "--task " + task);
    ASSERT_EQ(rows.size(), 1u) << task;
    ASSERT_EQ(rows[0]["sequences"].size(), answers.size()) << task;
    for (std::size_t k = 0; k < answers.size(); ++k) {
      const auto [ids, scored] = mezo(u, u + answers[k]);
      EXPECT_EQ(rows[0]["sequences"][k]["ids"], ids) << task << " " << k << ": " << rows[0]["sequences"][k]["text"];
      EXPECT_EQ(rows[0]["sequences"][k]["scored_tokens"], scored) << task << " " << k;
    }
  };
  // RTE: a premise with a leading space loses it; one with a leading newline loses it from
  // the sequence, while the count keeps it (MeZO counts before its lstrip()).
  expect(w.file("rte.jsonl", R"({"premise": " The cat sat.", "hypothesis": "A cat.", "label": "entailment"})" "\n"),
         "rte", " The cat sat.\nDoes this mean that \"A cat.\" is true? Yes or No?\n", {"Yes", "No"});
  expect(w.file("rte2.jsonl", R"({"premise": "\nThe cat sat.", "hypothesis": "A cat.", "label": 0})" "\n"), "rte",
         "\nThe cat sat.\nDoes this mean that \"A cat.\" is true? Yes or No?\n", {"Yes", "No"});
  // CB begins and ends with the template's own text: spaces inside stay.
  expect(w.file("cb.jsonl", R"({"premise": "It rains. ", "hypothesis": " It is wet.", "label": "neutral"})" "\n"), "cb",
         "Suppose It rains.  Can we infer that \" It is wet.\"? Yes, No, or Maybe?\n", {"Yes", "No", "Maybe"});
  // BoolQ: a passage with a leading space.
  expect(w.file("boolq.jsonl", R"({"question": "is it true", "passage": "  It is.", "label": false})" "\n"), "boolq",
         "  It is. Is it true?\n", {"No", "Yes"});
  // COPA: the premise's leading space and a choice's trailing spaces go.
  expect(w.file("copa.jsonl",
                R"({"premise": " The man fell.", "choice1": "He slipped.  ", "choice2": "I laughed.", "question": "cause", "label": 0})"
                "\n"),
         "copa", " The man fell because ", {"he slipped.  ", "I laughed."});
  // SST-2: an empty sentence gives "It was terrible", not " It was terrible".
  expect(w.file("sst2.tsv", "sentence\tlabel\n\t1\n"), "sst2", " It was", {" terrible", " great"});
  expect(w.file("sst2b.tsv", "sentence\tlabel\n  boring and dull \t1\n"), "sst2", "boring and dull It was",
         {" terrible", " great"});
}

TEST(Data, TaskPresetsChangeCaseAsPythonDoesBeyondAscii) {
  Workspace w;
  auto texts = [&](const fs::path& f, const std::string& task) {
    std::vector<std::string> out;
    for (const auto& row : w.show(f, "--task " + task))
      for (const auto& s : row["sequences"]) out.push_back(s["text"].get<std::string>());
    return out;
  };
  // BoolQ: question[0].upper() — "élan" → "Élan", "ß" → "SS" (Python's full mapping).
  EXPECT_EQ(texts(w.file("bq.jsonl", R"({"question": "élan vital exists", "passage": "It is.", "label": true})" "\n"
                                     R"({"question": "ßo?", "passage": "It is.", "label": false})" "\n"),
                  "boolq"),
            (std::vector<std::string>{"<s>It is. Élan vital exists?\nNo", "<s>It is. Élan vital exists?\nYes",
                                      "<s>It is. SSo?\nNo", "<s>It is. SSo?\nYes"}));
  // COPA: the choice's first word lower-cased by str.lower(): "ÉTAIT" → "était", "ΟΔΟΣ" → "οδος" (final sigma).
  EXPECT_EQ(texts(w.file("copa.jsonl",
                         R"({"premise": "It rained.", "choice1": "ÉTAIT là.", "choice2": "ΟΔΟΣ wet.", "question": "effect", "label": 0})"
                         "\n"),
                  "copa"),
            (std::vector<std::string>{"<s>It rained so était là.", "<s>It rained so οδος wet."}));
  // WSC (HF's _fix_wst): a span not in the text takes the case of the text's word at its
  // index by str.islower()/upper()/lower(): "élan vital." at word 0 "Élan" → "Élan vital";
  // the pronoun is str.lower()'d: "ÉL" → "él".
  // (The template is longer than opt-tiny's 64 positions: the 1024-position model.)
  const auto wsc = sequence_texts(show_task(
      w,
      w.file("wsc.jsonl",
             R"({"text": "Élan vital is real. ÉL said so.", "target": {"span1_text": "élan vital.", "span1_index": 0, "span2_text": "ÉL", "span2_index": 4}, "label": true})"
             "\n"),
      "wsc"));
  ASSERT_EQ(wsc.size(), 1u);
  ASSERT_EQ(wsc[0].size(), 2u);
  EXPECT_EQ(wsc[0][0], "<s>Élan vital is real. ÉL said so.\nIn the previous sentence, does the pronoun \"él\" refer to "
                    "Élan vital? Yes or No?\nNo");
}

TEST(Data, BooleanLabelsAreRefusedWhereTheLabelsAreNamesOrIndices) {
  Workspace w;
  auto cmd = [&](const fs::path& f, const std::string& task) {
    return "data --model " + w.model.string() + " --data " + f.string() + (task.empty() ? "" : " --task " + task);
  };
  // RTE's true would be index 1, "not_entailment": the opposite of what it says.
  std::string e = w.error(cmd(w.file("rte.jsonl", R"({"premise": "A.", "hypothesis": "B.", "label": "entailment"})" "\n"
                                                  R"({"premise": "A.", "hypothesis": "B.", "label": true})" "\n"),
                              "rte"));
  EXPECT_NE(e.find("rte.jsonl:2: \"label\" is the boolean true; it must be an integer in [0, 2) or one of "
                   "\"entailment\", \"not_entailment\""),
            std::string::npos)
      << e;
  e = w.error(cmd(w.file("cb.jsonl", R"({"premise": "A.", "hypothesis": "B.", "label": false})" "\n"), "cb"));
  EXPECT_NE(e.find("cb.jsonl:1: \"label\" is the boolean false"), std::string::npos) << e;
  e = w.error(cmd(w.file("copa.jsonl",
                         R"({"premise": "A.", "choice1": "B.", "choice2": "C.", "question": "cause", "label": true})" "\n"),
                  "copa"));
  EXPECT_NE(e.find("copa.jsonl:1: \"label\" is the boolean true; it must be an integer in [0, 2)"), std::string::npos)
      << e;
  e = w.error(cmd(w.file("mc.jsonl", R"({"prompt": "A", "options": [" b", " c"], "label": true})" "\n"), ""));
  EXPECT_NE(e.find("mc.jsonl:1: \"label\" is the boolean true"), std::string::npos) << e;
  // BoolQ's labels are booleans: accepted.
  EXPECT_EQ(w.show(w.file("bq.jsonl", R"({"question": "q", "passage": "p", "label": true})" "\n"), "--task boolq")[0]["label"],
            1);
}

TEST(Data, TokenFilesWithUnknownTensorsAreRefusedNamingTheAcceptedNames) {
  Workspace w;
  const std::vector<std::int32_t> ids{5, 6, 7, 8, 1, 1}, mask{1, 1, 1, 1, 0, 0};
  auto token_file = [&](const std::string& name, const std::string& second) {
    std::vector<TensorToWrite> t{{"input_ids", DType::i32, {1, 6}, ids.data(), {}},
                                 {second, DType::i32, {1, 6}, mask.data(), {}}};
    write_safetensors(w.tmp / name, std::span<const TensorToWrite>(t));
    return "data --model " + w.model.string() + " --data " + (w.tmp / name).string();
  };
  const std::string e = w.error(token_file("typo.safetensors", "attention_masks"));
  EXPECT_NE(e.find("typo.safetensors: unknown tensor 'attention_masks' in a token-id data file; it holds 'input_ids' "
                   "and optionally 'attention_mask' and 'labels' ('token_type_ids' is accepted and ignored)"),
            std::string::npos)
      << e;
  std::string out;
  EXPECT_EQ(run(token_file("ok.safetensors", "attention_mask"), &out), 0) << out;
  EXPECT_EQ(run(token_file("tt.safetensors", "token_type_ids"), &out), 0) << out;
}

TEST(Data, LeftPaddingScoresTheSameTokensAsRightPaddingAtEveryBatchSize) {
  Workspace w;
  // Rows of different lengths: a left-padded row's last pad must not predict its BOS.
  const auto text = w.file("t.jsonl", "{\"text\": \"The film was good. It was good.\"}\n{\"text\": \"It was\"}\n"
                                      "{\"text\": \"It was bad.\"}\n");
  const auto completion = w.file("c.jsonl", "{\"prompt\": \"The film was dull. It\", \"completion\": \" was bad.\"}\n"
                                            "{\"prompt\": \"It\", \"completion\": \" was\"}\n");
  const auto options = w.file("o.jsonl", sentiment_jsonl(3, 7));
  for (const fs::path& f : {text, completion, options}) {
    const json base = w.eval(f, "--batch-size 1");
    for (const std::string side : {"right", "left"})
      for (const char* b : {"1", "3"}) {
        const json e = w.eval(f, "--padding-side " + side + " --batch-size " + b);
        EXPECT_EQ(e.at("tokens"), base.at("tokens")) << f << " " << side << " " << b;
        EXPECT_NEAR(e.at("loss").get<double>(), base.at("loss").get<double>(), 1e-4) << f << " " << side << " " << b;
      }
  }
}

TEST(Data, ExamplesWithNothingToPredictAreRefusedByLine) {
  test::TempDir tmp;
  std::string out;
  const fs::path model = micro_with_gpt2(tmp);
  ASSERT_FALSE(model.empty());
  write_file(tmp / "c.jsonl", "{\"prompt\": \"The film\", \"completion\": \" was good\"}\n"
                              "{\"prompt\": \"\", \"completion\": \"Hello\"}\n"
                              "{\"prompt\": \"\", \"completion\": \"Hi\"}\n");
  write_file(tmp / "o.jsonl", "{\"prompt\": \"A\", \"options\": [\" good\", \" bad\"], \"label\": 0}\n"
                              "{\"prompt\": \"\", \"options\": [\" good day\", \"Hi\"], \"label\": 1}\n");
  const std::string m = " --model " + model.string() + " --data ";
  for (const auto& [file, why] :
       {std::pair{"c.jsonl", std::string("c.jsonl:2: nothing to predict: the example has no token after the first "
                                         "position to score (2 of the 3 examples have nothing to predict)")},
        std::pair{"o.jsonl", std::string("o.jsonl:2: nothing to predict: option 1 has no token after the first "
                                         "position to score")}}) {
    const std::string data = (tmp / file).string();
    for (const std::string& cmd : {"eval" + m + data, "data" + m + data,
                                   "train" + m + data + " --out " + (tmp / "o").string() + " --steps 1"}) {
      out.clear();
      EXPECT_EQ(run(cmd, &out), 1) << cmd << "\n" << out;
      EXPECT_NE(out.find(why), std::string::npos) << cmd << "\n" << out;
      EXPECT_FALSE(fs::exists(tmp / "o" / "model.safetensors")) << cmd;
    }
  }
}

TEST(Data, MissingTokenizerAndOverlongTextsAreClearErrors) {
  Workspace w;
  // A model directory without tokenizer files.
  const fs::path bare = w.tmp / "bare";
  std::string out;
  ASSERT_EQ(run("init --preset opt-tiny --out " + bare.string() + " -q", &out), 0) << out;
  const auto text = w.file("t.jsonl", "{\"text\": \"It was good.\"}\n");
  std::string e = w.error("eval --model " + bare.string() + " --data " + text.string());
  EXPECT_NE(e.find("t.jsonl is text data and needs a tokenizer"), std::string::npos) << e;
  EXPECT_NE(e.find("--tokenizer"), std::string::npos) << e;
  // ... which --tokenizer supplies.
  EXPECT_EQ(w.eval(text, "--tokenizer " + w.tok.string(), &bare).at("examples"), 1);

  // opt-tiny has 64 positions: a longer text names its line and --max-len.
  std::string long_text;
  for (int i = 0; i < 40; ++i) long_text += "It was good. ";
  const auto longf = w.file("long.jsonl", "{\"text\": \"It was bad.\"}\n" + json{{"text", long_text}}.dump() + "\n");
  e = w.error("eval --model " + w.model.string() + " --data " + longf.string());
  EXPECT_NE(e.find("long.jsonl:2:"), std::string::npos) << e;
  EXPECT_NE(e.find("max_position_embeddings (64); pass --max-len"), std::string::npos) << e;
  e = w.error("eval --model " + w.model.string() + " --data " + longf.string() + " --max-len 100");
  EXPECT_NE(e.find("--max-len 100 exceeds the model's max_position_embeddings (64)"), std::string::npos) << e;
  // With --max-len the text keeps its first tokens; a prompt loses its start, never the completion.
  const auto rows = w.show(longf, "--max-len 16");
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[1]["sequences"][0]["ids"].size(), 16u);
  const auto tok = Tokenizer::from_dir(w.model);
  const auto full = tok->encode_with_special(long_text);
  EXPECT_EQ(rows[1]["sequences"][0]["ids"].get<std::vector<int>>(), std::vector<int>(full.begin(), full.begin() + 16));
  const auto pc = w.file("pc.jsonl", json{{"prompt", long_text}, {"completion", " It was bad."}}.dump() + "\n");
  const auto cut = w.show(pc, "--max-len 20");
  ASSERT_EQ(cut.size(), 1u);
  EXPECT_EQ(cut[0]["sequences"][0]["ids"].size(), 20u);
  EXPECT_EQ(cut[0]["sequences"][0]["ids"][0], *tok->bos_id());  // BOS stays
  EXPECT_EQ(cut[0]["sequences"][0]["scored"], "It was bad.");
  e = w.error("eval --model " + w.model.string() + " --data " + pc.string() + " --max-len 4");
  EXPECT_NE(e.find("pc.jsonl:1: the scored part is 4 tokens; with at least one token of prompt before it and the "
                   "tokenizer's 1 special token first it does not fit --max-len 4"),
            std::string::npos)
      << e;
  // --max-len 1 leaves one token of a text: the flag is named, not the text (exit 2).
  out.clear();
  EXPECT_EQ(run("eval --model " + w.model.string() + " --data " + longf.string() + " --max-len 1", &out), 2) << out;
  EXPECT_NE(out.find("long.jsonl:1: --max-len 1 leaves 1 token of the text: a sequence needs at least 2"),
            std::string::npos)
      << out;
}

TEST(Data, OptionTrainingRaisesAccuracyAndTheCheckpointCarriesTheTokenizer) {
  Workspace w;
  const auto train = w.file("train.jsonl", sentiment_jsonl(200, 1));
  const auto dev = w.file("dev.jsonl", sentiment_jsonl(64, 2));
  const json before = w.eval(dev);
  const fs::path out = w.tmp / "tuned";
  std::string log;
  ASSERT_EQ(run("train --model " + w.model.string() + " --data " + train.string() + " --eval " + dev.string() +
                    " --eval-every 300 --out " + out.string() +
                    " --steps 600 --batch-size 32 --lr 2e-3 --lr-schedule linear --eps 1e-3" +
                    " --log-json " + (w.tmp / "log.jsonl").string() + " --seed 0",
                &log),
            0)
      << log;
  std::vector<json> evals;
  std::istringstream in(read_file(w.tmp / "log.jsonl"));
  for (std::string line; std::getline(in, line);) {
    const json j = json::parse(line);
    if (j.contains("eval_accuracy")) evals.push_back(j);
  }
  ASSERT_EQ(evals.size(), 2u) << log;  // after steps 300 and 600
  EXPECT_EQ(evals.back().at("eval_after_step"), 600);
  // The tuned checkpoint evaluates on its own (tokenizer files copied) to the logged result.
  for (const char* f : {"tokenizer.model", "config.json", "model.safetensors"}) EXPECT_TRUE(fs::exists(out / f)) << f;
  const json after = w.eval(dev, "", &out);
  EXPECT_NEAR(after.at("accuracy").get<double>(), evals.back().at("eval_accuracy").get<double>(), 1e-12);
  EXPECT_NEAR(after.at("loss").get<double>(), evals.back().at("eval_loss").get<double>(), 1e-9);
  // Measured (RelWithDebInfo, this machine): accuracy 0.46 → 1.0, loss 0.71 → 0.21; with
  // --data-seed 1, 2, 3: 1.0, 1.0, 0.92. A random model is at chance.
  EXPECT_LT(before.at("accuracy").get<double>(), 0.65);
  EXPECT_GE(after.at("accuracy").get<double>(), 0.85) << log;
  EXPECT_LT(after.at("loss").get<double>(), before.at("loss").get<double>() - 0.05) << log;
}

TEST(Data, ResumeWithShuffledJsonlAndEvaluationsInBetweenAreExact) {
  Workspace w;
  const auto train = w.file("train.jsonl", sentiment_jsonl(37, 3));  // epochs end mid-batch
  const std::string common = "train --data " + train.string() + " --steps 12 --batch-size 8 --lr 1e-3 --seed 5 -q";
  std::string out;
  ASSERT_EQ(run(common + " --model " + w.model.string() + " --out " + (w.tmp / "full").string(), &out), 0) << out;
  ASSERT_EQ(run(common + " --model " + w.model.string() + " --out " + (w.tmp / "part").string() + " --stop-at 5", &out),
            0)
      << out;
  ASSERT_EQ(run("train --resume " + (w.tmp / "part").string() + " --out " +  // the run's own --data
                    (w.tmp / "resumed").string() + " -q",
                &out),
            0)
      << out;
  EXPECT_EQ(read_file(w.tmp / "full" / "model.safetensors"), read_file(w.tmp / "resumed" / "model.safetensors"));
  // Evaluating every 3 steps (which flushes the pending update early) changes nothing.
  ASSERT_EQ(run(common + " --model " + w.model.string() + " --out " + (w.tmp / "evals").string() + " --eval " +
                    train.string() + " --eval-every 3",
                &out),
            0)
      << out;
  EXPECT_EQ(read_file(w.tmp / "full" / "model.safetensors"), read_file(w.tmp / "evals" / "model.safetensors"));
  // Saving at the steps that evaluate too (the evaluation has read the step's losses
  // already; the save once read them a second time, out of range) changes nothing either.
  ASSERT_EQ(run(common + " --model " + w.model.string() + " --out " + (w.tmp / "saves").string() + " --eval " +
                    train.string() + " --eval-every 3 --save-every 3",
                &out),
            0)
      << out;
  EXPECT_EQ(read_file(w.tmp / "full" / "model.safetensors"), read_file(w.tmp / "saves" / "model.safetensors"));
  // Another data seed gives other batches, so other weights.
  ASSERT_EQ(run(common + " --model " + w.model.string() + " --out " + (w.tmp / "other").string() + " --data-seed 9", &out),
            0)
      << out;
  EXPECT_NE(read_file(w.tmp / "full" / "model.safetensors"), read_file(w.tmp / "other" / "model.safetensors"));
}

}  // namespace
}  // namespace zo2

namespace zo2 {
namespace {

// A resumed run's saves keep the tokenizer: it is read when the run starts, not from the step
// directory the run started from, which its first save removes (adversarial pass 51: every
// checkpoint after that lacked encoder.json and vocab.bpe, and the next resume or text eval
// failed with "no tokenizer").
TEST(Data, EveryCheckpointOfAResumedTextRunKeepsItsTokenizer) {
  test::TempDir tmp;
  std::string out;
  const fs::path model = micro_with_gpt2(tmp);
  ASSERT_FALSE(model.empty());
  std::string text;
  for (int i = 0; i < 24; ++i) text += "{\"text\": \"The film number " + std::to_string(i) + " was good.\"}\n";
  write_file(tmp / "t.jsonl", text);
  const fs::path run_dir = tmp / "run";
  const std::string common = " --data " + (tmp / "t.jsonl").string() + " --out " + run_dir.string() +
                             " --steps 12 --batch-size 2 --save-every 3 -q";
  ASSERT_EQ(run("train --model " + model.string() + common + " --stop-at 6", &out), 0) << out;
  ASSERT_EQ(run("train --resume " + run_dir.string() + common, &out), 0) << out;
  const fs::path last = run_dir / fs::read_symlink(run_dir / "current");
  EXPECT_EQ(last.filename(), "step-00000012");
  for (const char* f : {"encoder.json", "vocab.bpe"}) EXPECT_TRUE(fs::exists(last / f)) << f;
  EXPECT_EQ(run("eval --model " + run_dir.string() + " --data " + (tmp / "t.jsonl").string() + " -q", &out), 0) << out;
}

// A resume whose data now tokenizes to other examples (the file edited, or another tokenizer,
// the same number of examples) says so; a state without the fingerprint (an older zo2's)
// says it cannot tell (adversarial pass 51: the resumed run trained on other batches silently).
TEST(Data, AResumeOnDataThatChangedSaysSo) {
  test::TempDir tmp;
  std::string out;
  const fs::path model = micro_with_gpt2(tmp);
  ASSERT_FALSE(model.empty());
  auto texts = [&](const std::string& word) {
    std::string text;
    for (int i = 0; i < 16; ++i) text += "{\"text\": \"The " + word + " number " + std::to_string(i) + ".\"}\n";
    write_file(tmp / "t.jsonl", text);
  };
  texts("film");
  const fs::path run_dir = tmp / "run";
  const std::string common = " --data " + (tmp / "t.jsonl").string() + " --out " + run_dir.string() +
                             " --steps 6 --batch-size 2";
  ASSERT_EQ(run("train -q --model " + model.string() + common + " --stop-at 2", &out), 0) << out;
  ASSERT_EQ(run("train --resume " + run_dir.string() + common + " --stop-at 3", &(out = "")), 0) << out;
  EXPECT_EQ(out.find("now gives other training examples"), std::string::npos) << out;
  texts("book");
  ASSERT_EQ(run("train --resume " + run_dir.string() + common + " --stop-at 4", &(out = "")), 0) << out;
  EXPECT_NE(out.find("now gives other training examples than the run's"), std::string::npos) << out;
  // A state without data_crc32, as zo2 0.2.0 and older saved it.
  const fs::path manifest = run_dir / fs::read_symlink(run_dir / "current") / "zo2_state.json";
  nlohmann::json m = nlohmann::json::parse(read_file(manifest));
  ASSERT_TRUE(m.contains("data_crc32"));
  m.erase("data_crc32");
  m["state_crc32"] = manifest_crc32(m);
  std::ofstream(manifest) << m.dump(2);
  ASSERT_EQ(run("train --resume " + run_dir.string() + common, &(out = "")), 0) << out;
  EXPECT_NE(out.find("records no fingerprint of its tokenized data"), std::string::npos) << out;
}

}  // namespace
}  // namespace zo2
