// Generation through the scheduler (api/generate.h, models/graph.h Note [KV cache]) on tiny
// OPT and LLaMA models, fp32: greedy decoding equals the argmax of eval's logits fed back
// token by token, prompt by prompt; with and without the KV cache, with the cache on the
// device and on the host, resident and streamed; streamed == resident bit for bit; the
// sampler repeats for a seed; stop ids and the stop callback end sequences; bad requests
// are refused naming the prompt or option.
#include "api/generate.h"
#include "api/session.h"
#include "runtime/error.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sys/stat.h>
#include <tuple>
#include <unistd.h>

namespace zo2 {
namespace {

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
  c.max_positions = 40;
  c.word_embed_proj_dim = 32;
  if (f == ModelFamily::llama) {
    c.linear_bias = false;
    c.tie_word_embeddings = false;
    c.rope.type = RopeType::default_;
    c.norm_eps = 1e-6f;
  }
  return c;
}

constexpr int kPositions = 24, kNew = 9;

const std::vector<std::vector<std::int32_t>> kPrompts = {
    {2, 17, 5, 33, 8}, {2, 40, 9}, {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, {2, 50}, {2, 21, 22, 23, 24, 1}};

SessionConfig gen_cfg(OffloadMode mode, KvPlace kv, int batch) {
  SessionConfig s;
  s.offload = mode;
  s.gpu_mem = std::size_t{1} << 30;
  s.window = 2;
  s.training = false;
  s.max_batch = batch;
  s.max_seq = kPositions;
  s.generate.batch = batch;
  s.generate.kv = kv;
  return s;
}

constexpr std::uint64_t kInit = 7;

// The reference: one prompt at a time, eval's full logits, the argmax of the last row.
std::vector<std::int32_t> reference_greedy(const ModelConfig& c, const std::vector<std::int32_t>& prompt, int n,
                                           int prefix = 0) {
  SessionConfig s;
  s.peft.prefix = prefix;
  s.run_seed = 5;  // a new prefix is initialized from the base's activations, by the run seed
  s.training = false;
  s.max_batch = 1;
  s.max_seq = kPositions;
  s.logits_out = true;
  Session session(c, s, kInit, false);
  std::vector<std::int32_t> seq = prompt, out;
  std::vector<float> logits;
  for (int i = 0; i < n; ++i) {
    const int T = static_cast<int>(seq.size());
    const HostBatch b = make_batch(c, 1, T, seq);
    logits.assign(static_cast<std::size_t>(T * c.vocab_size), 0.0f);
    EvalOptions eo;
    eo.logits = logits.data();
    eo.token_loss = nullptr;
    session.eval(b, eo);
    const float* row = logits.data() + static_cast<std::size_t>(T - 1) * static_cast<std::size_t>(c.vocab_size);
    const auto tok = static_cast<std::int32_t>(std::max_element(row, row + c.vocab_size) - row);
    out.push_back(tok);
    seq.push_back(tok);
  }
  return out;
}

class GenerateTest : public ::testing::TestWithParam<ModelFamily> {
 protected:
  ModelConfig c = tiny(GetParam());
};

TEST_P(GenerateTest, GreedyEqualsArgmaxOfEvalLogitsEveryPlacementWithAndWithoutCache) {
  std::vector<std::vector<std::int32_t>> want;
  for (const auto& p : kPrompts) want.push_back(reference_greedy(c, p, kNew));
  GenerateOptions o;
  o.max_new_tokens = kNew;
  struct Case {
    OffloadMode mode;
    KvPlace kv;
    int batch;
  };
  for (const Case& k : {Case{OffloadMode::none, KvPlace::device, 3}, Case{OffloadMode::all, KvPlace::device, 3},
                        Case{OffloadMode::all, KvPlace::host, 2}, Case{OffloadMode::none, KvPlace::host, 5},
                        Case{OffloadMode::all, KvPlace::off, 3}, Case{OffloadMode::none, KvPlace::off, 1}}) {
    Session s(c, gen_cfg(k.mode, k.kv, k.batch), kInit, false);
    EXPECT_EQ(s.placement().kv_positions, k.kv == KvPlace::off ? 0 : kPositions);
    if (k.kv != KvPlace::off) {
      EXPECT_EQ(s.placement().kv_on_device, k.kv == KvPlace::device);
    }
    GenerateStats st;
    const auto got = generate(s, kPrompts, o, &st);
    ASSERT_EQ(got.size(), kPrompts.size());
    for (std::size_t i = 0; i < kPrompts.size(); ++i) {
      EXPECT_EQ(got[i].tokens, want[i]) << "prompt " << i << " offload " << offload_mode_name(k.mode) << " kv "
                                        << kv_place_name(k.kv) << " batch " << k.batch;
      EXPECT_FALSE(got[i].stopped);
    }
    EXPECT_EQ(st.new_tokens, static_cast<std::int64_t>(kPrompts.size()) * kNew);
    const std::int64_t batches = (static_cast<std::int64_t>(kPrompts.size()) + k.batch - 1) / k.batch;
    EXPECT_EQ(st.decode_steps, batches * kNew);
  }
}

// A prompt prefilled in pieces of 3 rows (GenerateRequest::chunk): the same tokens, and the
// activations hold 3 rows per sequence instead of every position.
TEST_P(GenerateTest, ChunkedPrefillGivesTheSameTokensInLessActivationMemory) {
  std::vector<std::vector<std::int32_t>> want;
  for (const auto& p : kPrompts) want.push_back(reference_greedy(c, p, kNew));
  GenerateOptions o;
  o.max_new_tokens = kNew;
  for (KvPlace kv : {KvPlace::device, KvPlace::host}) {
    SessionConfig sc = gen_cfg(OffloadMode::all, kv, 3);
    sc.generate.chunk = 3;
    Session s(c, sc, kInit, false);
    EXPECT_EQ(s.placement().call_seq, 3);
    EXPECT_EQ(s.placement().kv_positions, kPositions);
    GenerateStats st;
    const auto got = generate(s, kPrompts, o, &st);
    for (std::size_t i = 0; i < kPrompts.size(); ++i) EXPECT_EQ(got[i].tokens, want[i]) << i << " " << kv_place_name(kv);
    // Two batches: prompts of 11 and 6 tokens prefill in 4 and 2 pieces.
    EXPECT_EQ(st.decode_steps, (4 + kNew - 1) + (2 + kNew - 1));
    SessionConfig whole = gen_cfg(OffloadMode::all, kv, 3);
    const Placement a = plan_placement(c, plan_request(c, sc, DeviceKind::cpu, std::size_t{1} << 30));
    const Placement b = plan_placement(c, plan_request(c, whole, DeviceKind::cpu, std::size_t{1} << 30));
    EXPECT_LT(a.workspace_bytes, b.workspace_bytes);
  }
}

// A prefix-tuning adapter (Note [Prefix tuning under ZO]): its rows lead every sequence's
// cache; the tokens equal the argmax of eval's logits, whose attention is the training path's.
TEST_P(GenerateTest, PrefixAdaptersGenerateWhatEvalPicks) {
  constexpr int P = 3;
  std::vector<std::vector<std::int32_t>> want;
  const std::vector<std::vector<std::int32_t>> prompts(kPrompts.begin(), kPrompts.begin() + 3);
  bool prefix_matters = false;
  for (const auto& p : prompts) {
    want.push_back(reference_greedy(c, p, kNew, P));
    prefix_matters = prefix_matters || want.back() != reference_greedy(c, p, kNew);
  }
  ASSERT_TRUE(prefix_matters) << "the prefix changes no token: the test could not tell it was used";
  GenerateOptions o;
  o.max_new_tokens = kNew;
  for (KvPlace kv : {KvPlace::device, KvPlace::host, KvPlace::off}) {
    SessionConfig sc = gen_cfg(OffloadMode::all, kv, 2);
    sc.peft.prefix = P;
    sc.run_seed = 5;
    sc.generate.chunk = kv == KvPlace::off ? 0 : 4;
    Session s(c, sc, kInit, false);
    if (kv != KvPlace::off) {
      EXPECT_EQ(s.placement().kv_positions, kPositions + P);
    }
    const auto got = generate(s, prompts, o);
    for (std::size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(got[i].tokens, want[i]) << i << " " << kv_place_name(kv);
  }
}

// A training session with room to generate (train --eval on squad/drop) decodes on its first
// branch what an evaluation session decodes.
TEST_P(GenerateTest, ATrainingSessionGeneratesWhatAnEvalSessionDoes) {
  std::vector<std::vector<std::int32_t>> want;
  for (const auto& p : kPrompts) want.push_back(reference_greedy(c, p, kNew));
  SessionConfig sc = gen_cfg(OffloadMode::all, KvPlace::auto_, 2);
  sc.training = true;
  Session s(c, sc, kInit, false);
  GenerateOptions o;
  o.max_new_tokens = kNew;
  const auto got = generate(s, kPrompts, o);
  for (std::size_t i = 0; i < kPrompts.size(); ++i) EXPECT_EQ(got[i].tokens, want[i]) << i;
}

// fp32: a streamed block runs the kernels a resident one runs, so every logit is the same bits;
// the cache on the host holds the same bytes as on the device.
TEST_P(GenerateTest, StreamedEqualsResidentBitForBitWithCacheOnDeviceOrHostAndWithout) {
  const int B = 2;
  auto logits_of = [&](OffloadMode mode, KvPlace kv) {
    Session s(c, gen_cfg(mode, kv, B), kInit, false);
    std::vector<float> all, step(static_cast<std::size_t>(B * c.vocab_size));
    // Prefill of 6 rows (the second left-padded by 2), then 3 single rows.
    std::vector<std::int32_t> ids = {2, 5, 9, 11, 13, 17, 0, 0, 2, 7, 8, 9};
    std::vector<std::int32_t> mask = {1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1};
    auto batch = [&](const std::vector<std::int32_t>& i, const std::vector<std::int32_t>& m, int T, int first) {
      HostBatch hb;
      hb.batch = B;
      hb.seq = T;
      hb.ids = i;
      hb.key_mask = m;
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t) hb.positions.push_back((c.family == ModelFamily::opt ? 2 : 0) + first + t);
      hb.targets.assign(i.size(), kIgnoreIndex);
      return hb;
    };
    const bool cache = kv != KvPlace::off;
    std::vector<std::int32_t> seq_ids = ids, seq_mask = mask;
    s.decode(batch(ids, mask, 6, 0), 0, cache, step.data());
    all.insert(all.end(), step.begin(), step.end());
    for (int n = 0; n < 3; ++n) {
      const std::vector<std::int32_t> next = {static_cast<std::int32_t>(20 + n), static_cast<std::int32_t>(30 + n)};
      std::vector<std::int32_t> ni, nm;
      for (int b = 0; b < B; ++b) {
        const auto T = static_cast<std::ptrdiff_t>(6 + n);
        ni.insert(ni.end(), seq_ids.begin() + b * T, seq_ids.begin() + (b + 1) * T);
        ni.push_back(next[static_cast<std::size_t>(b)]);
        nm.insert(nm.end(), seq_mask.begin() + b * T, seq_mask.begin() + (b + 1) * T);
        nm.push_back(1);
      }
      seq_ids = ni;
      seq_mask = nm;
      if (cache) s.decode(batch(next, {1, 1}, 1, 6 + n), 6 + n, true, step.data());
      else s.decode(batch(seq_ids, seq_mask, 7 + n, 0), 0, false, step.data());
      all.insert(all.end(), step.begin(), step.end());
    }
    for (float x : all) EXPECT_TRUE(std::isfinite(x));
    return all;
  };
  for (KvPlace kv : {KvPlace::device, KvPlace::host, KvPlace::off}) {
    const auto r = logits_of(OffloadMode::none, kv), st = logits_of(OffloadMode::all, kv);
    ASSERT_EQ(r.size(), st.size());
    EXPECT_EQ(std::memcmp(r.data(), st.data(), r.size() * sizeof(float)), 0) << kv_place_name(kv);
  }
  // The cache on the host is the device's bytes, so the same bits too.
  const auto dev = logits_of(OffloadMode::all, KvPlace::device), host = logits_of(OffloadMode::all, KvPlace::host);
  EXPECT_EQ(std::memcmp(dev.data(), host.data(), dev.size() * sizeof(float)), 0);
  // With and without the cache: the same numbers up to the order of the sums.
  const auto off = logits_of(OffloadMode::all, KvPlace::off);
  for (std::size_t i = 0; i < dev.size(); ++i) EXPECT_NEAR(dev[i], off[i], 1e-4f * (1.0f + std::fabs(off[i])));
}

TEST_P(GenerateTest, SamplingRepeatsForASeedAndTinyTopPIsGreedy) {
  Session s(c, gen_cfg(OffloadMode::all, KvPlace::auto_, 3), kInit, false);
  GenerateOptions greedy;
  greedy.max_new_tokens = kNew;
  GenerateOptions o = greedy;
  o.greedy = false;
  o.temperature = 1.5f;
  o.seed = 99;
  const auto a = generate(s, kPrompts, o), b = generate(s, kPrompts, o);
  for (std::size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].tokens, b[i].tokens);
  o.seed = 100;
  const auto d = generate(s, kPrompts, o);
  bool differs = false;
  for (std::size_t i = 0; i < a.size(); ++i) differs = differs || a[i].tokens != d[i].tokens;
  EXPECT_TRUE(differs) << "another seed drew the same 45 tokens";
  // A prompt's draws depend on the seed and its place in the list, not on the batches the
  // list is decoded in.
  Session two(c, gen_cfg(OffloadMode::none, KvPlace::device, 2), kInit, false);
  const auto e = generate(two, kPrompts, o);
  for (std::size_t i = 0; i < d.size(); ++i) EXPECT_EQ(e[i].tokens, d[i].tokens) << i;
  // top_p below the largest probability keeps one token: the argmax.
  o.top_p = 1e-7f;
  const auto nucleus = generate(s, kPrompts, o), g = generate(s, kPrompts, greedy);
  for (std::size_t i = 0; i < g.size(); ++i) EXPECT_EQ(nucleus[i].tokens, g[i].tokens);
}

TEST_P(GenerateTest, StopIdsAndTheStopCallbackEndSequencesTheOthersGoOn) {
  Session s(c, gen_cfg(OffloadMode::auto_, KvPlace::auto_, 5), kInit, false);
  GenerateOptions o;
  o.max_new_tokens = kNew;
  const auto free_run = generate(s, kPrompts, o);
  // Stop prompt 0 at its third token's id, prompt 2 after two tokens by the callback.
  o.stop_ids = {free_run[0].tokens[2]};
  o.stop = [](std::size_t k, const std::vector<std::int32_t>& t) { return k == 2 && t.size() == 2; };
  const auto got = generate(s, kPrompts, o);
  for (std::size_t i = 0; i < got.size(); ++i) {
    const auto& f = free_run[i].tokens;
    auto stop = std::find(f.begin(), f.end(), o.stop_ids[0]);
    std::size_t n = stop == f.end() ? f.size() : static_cast<std::size_t>(stop - f.begin()) + 1;
    if (i == 2) n = std::min<std::size_t>(n, 2);
    EXPECT_EQ(got[i].tokens, std::vector<std::int32_t>(f.begin(), f.begin() + static_cast<std::ptrdiff_t>(n))) << i;
    EXPECT_EQ(got[i].stopped, n < f.size() || stop != f.end()) << i;
  }
  EXPECT_TRUE(got[0].stopped);
  EXPECT_TRUE(got[2].stopped);
}

TEST_P(GenerateTest, BadRequestsAreRefusedNamingThePromptOrOption) {
  Session s(c, gen_cfg(OffloadMode::none, KvPlace::device, 2), kInit, false);
  GenerateOptions o;
  o.max_new_tokens = kNew;
  auto message = [&](const std::vector<std::vector<std::int32_t>>& p, const GenerateOptions& opt) -> std::string {
    try {
      generate(s, p, opt);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
      return e.what();
    }
    return "(no error)";
  };
  EXPECT_NE(message({{2, 3}, {}}, o).find("prompt 1 is empty"), std::string::npos);
  EXPECT_NE(message({std::vector<std::int32_t>(20, 3)}, o).find("prompt 0 has 20 tokens"), std::string::npos);
  EXPECT_NE(message({{2, 999}}, o).find("prompt 0, token 1: id 999"), std::string::npos);
  GenerateOptions bad = o;
  bad.greedy = false;
  bad.temperature = 0;
  EXPECT_NE(message({{2}}, bad).find("temperature 0"), std::string::npos);
  bad.temperature = 1;
  bad.top_p = 1.5f;
  EXPECT_NE(message({{2}}, bad).find("top_p 1.5"), std::string::npos);
  bad = o;
  bad.max_new_tokens = 0;
  EXPECT_NE(message({{2}}, bad).find("max_new_tokens 0"), std::string::npos);
  // A session opened without generate.batch has no room for generation.
  SessionConfig t;
  t.max_batch = 1;
  t.max_seq = 8;
  Session train(c, t, kInit, false);
  EXPECT_THROW(generate(train, {{2, 3}}, o), Error);
}

TEST_P(GenerateTest, PlannerPutsTheCacheOnTheDeviceWhenItFitsAndSaysWhere) {
  SessionConfig sc = gen_cfg(OffloadMode::auto_, KvPlace::auto_, 4);
  PlanRequest r = plan_request(c, sc, DeviceKind::cpu, std::size_t{1} << 30);
  Placement p = plan_placement(c, r);
  EXPECT_TRUE(p.kv_on_device);
  EXPECT_EQ(p.kv_block_bytes, kv_block_bytes(c, DType::f32, 4, kPositions));
  EXPECT_EQ(p.kv_device_bytes, static_cast<std::size_t>(c.num_layers) * p.kv_block_bytes);
  EXPECT_NE(p.describe(c).find("on the device"), std::string::npos);
  // Just above the all-streamed minimum with the cache on the host: the host it is.
  r.generate.kv = KvPlace::host;
  const Placement host = plan_placement(c, r);
  r.generate.kv = KvPlace::auto_;
  r.cap = host.minimum_cap;
  r.mode = OffloadMode::all;
  p = plan_placement(c, r);
  EXPECT_FALSE(p.kv_on_device);
  EXPECT_EQ(p.kv_device_bytes, 2 * p.kv_block_bytes);
  EXPECT_EQ(p.kv_host_bytes, static_cast<std::size_t>(c.num_layers) * p.kv_block_bytes);
  EXPECT_NE(p.describe(c).find("on the host"), std::string::npos);
  r.generate.kv = KvPlace::off;
  p = plan_placement(c, r);
  EXPECT_EQ(p.kv_positions, 0);
  EXPECT_NE(p.describe(c).find("KV cache: off"), std::string::npos);
  EXPECT_THROW(parse_kv_place("gpu"), Error);
}

INSTANTIATE_TEST_SUITE_P(Families, GenerateTest, ::testing::Values(ModelFamily::opt, ModelFamily::llama),
                         [](const auto& i) { return std::string(i.param == ModelFamily::opt ? "Opt" : "Llama"); });

// The LLaMA-family variants through the KV cache (Note [LLaMA-family variants]): Mistral's
// sliding window of 3 keys (shorter than the prompts plus the new tokens: the window is
// counted in cache positions, so left padding and decoding step by step see what eval sees),
// Qwen3's q/k norms with the window in its last two layers, Qwen2's q/k/v biases, Gemma 3's
// local/global layers (window 3 and the local rotary base in layers 0 and 2).
TEST(GenerateVariants, GreedyEqualsArgmaxOfEvalLogitsWithAndWithoutTheCache) {
  for (const char* type : {"mistral", "qwen3", "qwen2", "gemma3_text"}) {
    SCOPED_TRACE(type);
    ModelConfig c = tiny(ModelFamily::llama);
    c.model_type = type;
    if (c.model_type == "mistral") {
      c.sliding_window = 3;
    } else if (c.model_type == "qwen3") {
      c.qk_norm = true;
      c.sliding_window = 4;
      c.sliding_layers = {false, true, true};
    } else if (c.model_type == "gemma3_text") {
      // Local (window 3, rope_local), global, local layers: the cache sees each layer's
      // window and rotary base.
      c.qk_norm = true;
      c.head_dim = 16;
      c.tie_word_embeddings = true;
      c.query_pre_attn_scalar = 6;
      c.rope.theta = 1e6;
      c.rope_local.type = RopeType::default_;
      c.rope_local.theta = 10000;
      c.sliding_window = 3;
      c.sliding_layers = {true, false, true};
    } else {
      c.qkv_bias = true;
    }
    std::vector<std::vector<std::int32_t>> want;
    for (const auto& p : kPrompts) want.push_back(reference_greedy(c, p, kNew));
    GenerateOptions o;
    o.max_new_tokens = kNew;
    for (const auto& [mode, kv, batch] : {std::tuple{OffloadMode::none, KvPlace::device, 3},
                                          std::tuple{OffloadMode::all, KvPlace::host, 2},
                                          std::tuple{OffloadMode::all, KvPlace::off, 5}}) {
      Session s(c, gen_cfg(mode, kv, batch), kInit, false);
      const auto got = generate(s, kPrompts, o);
      ASSERT_EQ(got.size(), kPrompts.size());
      for (std::size_t i = 0; i < kPrompts.size(); ++i)
        EXPECT_EQ(got[i].tokens, want[i]) << "prompt " << i << " kv " << kv_place_name(kv) << " batch " << batch;
    }
  }
}

// Note [A model's end-of-sequence ids]: a generation_config.json nested 300,000 deep crashed
// `zo2-tune generate` (a stack overflow in the JSON tree's copy), and one that is a FIFO hung it
// or was passed over for config.json: refused naming the file (Note [Reading JSON]). In a child
// with an alarm, so that a crash or a hang fails the test, not the test binary.
TEST(GenerateEosIds, GenerationConfigNestedDeepOrAFifoOrADirectoryIsRefusedNamingIt) {
  test::TempDir dir;
  const std::filesystem::path gen = dir / "generation_config.json";
  { std::ofstream(dir / "config.json") << R"({"eos_token_id": 3})"; }
  { std::ofstream(gen) << R"({"eos_token_id": [1, 2], "zz": )" + std::string(62, '[') + std::string(62, ']') + "}"; }
  EXPECT_EQ(model_eos_ids(dir.path(), 10), (std::vector<std::int32_t>{1, 2}));  // 63 levels: taken
  auto refused = [&](const char* what) {
    return test::in_child([&] {
      ::alarm(10);
      const Error e = test::error_of([&] { (void)model_eos_ids(dir.path(), 10); });
      const std::string msg = e.what();
      return msg.starts_with(gen.string() + ": ") && msg.find(what) != std::string::npos ? 0 : 1;
    });
  };
  { std::ofstream(gen) << "{\"zz\": " + std::string(300000, '[') + std::string(300000, ']') + "}"; }
  EXPECT_EQ(refused("nested deeper than 64 levels"), 0) << "1: the wrong error; 128 + N: killed by signal N";
  std::filesystem::remove(gen);
  ASSERT_EQ(::mkfifo(gen.c_str(), 0600), 0);
  EXPECT_EQ(refused("is a FIFO"), 0) << "1: the wrong error; 128 + 14: it hung";
  std::filesystem::remove(gen);
  std::filesystem::create_directory(gen);
  EXPECT_EQ(refused("is a directory"), 0) << "1: the wrong error";
}

}  // namespace
}  // namespace zo2
