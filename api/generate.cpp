#include "api/generate.h"

#include "runtime/error.h"
#include "runtime/json_file.h"
#include "runtime/philox.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <numeric>

namespace zo2 {

void check_generate_options(const GenerateOptions& o, OptionSource src) {
  check_integer(Opt::max_new_tokens, o.max_new_tokens, src);
  if (!o.greedy) {
    check_real(Opt::temperature, o.temperature, src);
    check_real(Opt::top_p, o.top_p, src);
  }
}

namespace {

// Philox's 64 bits for (seed, prompt, token) as a double in [0, 1).
double draw(std::uint64_t seed, std::uint64_t prompt, std::uint64_t token) {
  const Philox4 r = noise_bits(seed, prompt, token, NoiseDomain::sampling);
  const std::uint64_t bits = (static_cast<std::uint64_t>(r.x) << 32 | r.y) >> 11;  // 53 bits
  return static_cast<double>(bits) * 0x1.0p-53;
}

std::int32_t argmax(const float* row, std::int64_t V) {
  return static_cast<std::int32_t>(std::max_element(row, row + V) - row);  // the first of ties
}

// softmax(row / T) restricted to the nucleus of mass top_p; u in [0, 1) picks a token.
std::int32_t sample(const float* row, std::int64_t V, float temperature, float top_p, double u,
                    std::vector<std::int32_t>& order, std::vector<double>& p) {
  const double inv_t = 1.0 / static_cast<double>(temperature);
  const float mx = *std::max_element(row, row + V);
  p.resize(static_cast<std::size_t>(V));
  double sum = 0;
  for (std::int64_t v = 0; v < V; ++v) {
    const double e = std::exp((static_cast<double>(row[v]) - mx) * inv_t);
    p[static_cast<std::size_t>(v)] = e;
    sum += e;
  }
  order.resize(static_cast<std::size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  // Most likely first; ties by id, so the order (and the draw) is deterministic.
  std::sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
    const double pa = p[static_cast<std::size_t>(a)], pb = p[static_cast<std::size_t>(b)];
    return pa != pb ? pa > pb : a < b;
  });
  // The nucleus: the smallest prefix whose mass reaches top_p (at least one token).
  std::size_t keep = 0;
  double mass = 0;
  while (keep < order.size()) {
    mass += p[static_cast<std::size_t>(order[keep++])] / sum;
    if (mass >= static_cast<double>(top_p)) break;
  }
  double kept = 0;
  for (std::size_t i = 0; i < keep; ++i) kept += p[static_cast<std::size_t>(order[i])];
  double target = u * kept, acc = 0;
  for (std::size_t i = 0; i < keep; ++i) {
    acc += p[static_cast<std::size_t>(order[i])];
    if (target < acc) return order[i];
  }
  return order[keep - 1];
}

}  // namespace

void check_generate_request(Session& session, const std::vector<std::vector<std::int32_t>>& prompts,
                            const GenerateOptions& o, OptionSource src) {
  check_generate_options(o, src);
  const SessionConfig& sc = session.session_config();
  const Placement& pl = session.placement();
  const ModelConfig& config = session.config();
  if (pl.gen_batch <= 0)
    fail(ErrorKind::invalid_argument, "this session was not set up for generation ({} is 0)",
         src == OptionSource::c_api ? "its generate_seqs" : "generate's batch");
  const int positions = sc.max_seq > 0 ? sc.max_seq : static_cast<int>(config.max_positions);
  const std::int64_t V = config.vocab_size;
  for (std::size_t k = 0; k < prompts.size(); ++k) {
    const auto& p = prompts[k];
    if (p.empty()) fail(ErrorKind::invalid_argument, "prompt {} is empty (it needs at least one token)", k);
    if (static_cast<std::int64_t>(p.size()) + o.max_new_tokens > positions)
      fail(ErrorKind::invalid_argument,
           "prompt {} has {} tokens: with {} new tokens that is more than the session's {} positions (max_seq)", k,
           p.size(), o.max_new_tokens, positions);
    for (std::size_t t = 0; t < p.size(); ++t)
      if (p[t] < 0 || p[t] >= V)
        fail(ErrorKind::invalid_argument, "prompt {}, token {}: id {} is outside the vocabulary [0, {})", k, t, p[t], V);
  }
  if (o.pad_id < 0 || o.pad_id >= V)
    fail(ErrorKind::invalid_argument, "pad id {} is outside the vocabulary [0, {})", o.pad_id, V);
  // An id the model cannot generate would never stop anything: a mistake to say.
  for (std::size_t k = 0; k < o.stop_ids.size(); ++k)
    if (o.stop_ids[k] < 0 || o.stop_ids[k] >= V)
      fail(ErrorKind::invalid_argument, "stop id {} (entry {}) is outside the vocabulary [0, {})", o.stop_ids[k], k, V);
}

std::vector<Generation> generate(Session& session, const std::vector<std::vector<std::int32_t>>& prompts,
                                 const GenerateOptions& o, GenerateStats* stats) {
  check_generate_request(session, prompts, o, OptionSource::c_api);
  const Placement& pl = session.placement();
  const ModelConfig& config = session.config();
  const bool cache = pl.kv_positions > 0;
  const std::int64_t V = config.vocab_size;

  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  std::vector<Generation> out(prompts.size());
  GenerateStats st;
  std::vector<float> logits;
  std::vector<std::int32_t> order;
  std::vector<double> probs;
  const bool opt = config.family == ModelFamily::opt;
  for (std::size_t first = 0; first < prompts.size(); first += static_cast<std::size_t>(pl.gen_batch)) {
    const std::size_t B = std::min(prompts.size() - first, static_cast<std::size_t>(pl.gen_batch));
    std::size_t T0 = 0;
    for (std::size_t b = 0; b < B; ++b) T0 = std::max(T0, prompts[first + b].size());
    // Note [Generation batches]: the sequences so far, left-padded to a common length.
    std::vector<std::vector<std::int32_t>> ids(B), mask(B);
    std::vector<std::int32_t> count(B, 0);  // each sequence's real tokens
    for (std::size_t b = 0; b < B; ++b) {
      const auto& p = prompts[first + b];
      ids[b].assign(T0 - p.size(), o.pad_id);
      ids[b].insert(ids[b].end(), p.begin(), p.end());
      mask[b].assign(T0 - p.size(), 0);
      mask[b].resize(T0, 1);
    }
    // One call: rows [from, to) of every sequence.
    auto run = [&](std::size_t from, std::size_t to, int past) {
      const std::size_t T = to - from;
      HostBatch hb;
      hb.batch = static_cast<int>(B);
      hb.seq = static_cast<int>(T);
      hb.ids.reserve(B * T);
      for (std::size_t b = 0; b < B; ++b) {
        std::int32_t seen = 0;
        for (std::size_t t = 0; t < from; ++t) seen += mask[b][t];
        for (std::size_t t = from; t < to; ++t) {
          hb.ids.push_back(ids[b][t]);
          hb.key_mask.push_back(mask[b][t]);
          const std::int32_t pos = mask[b][t] ? seen : 0;
          hb.positions.push_back(opt ? (mask[b][t] ? pos + 2 : 1) : pos);
          seen += mask[b][t];
        }
      }
      hb.targets.assign(B * T, kIgnoreIndex);
      logits.resize(B * static_cast<std::size_t>(V));
      session.decode(hb, past, cache, logits.data());
      ++st.decode_steps;
    };
    // The prompts in pieces of at most call_seq rows (PlanRequest's chunk), each after the
    // cache rows before it; only the last piece's logits are read.
    const auto chunk = static_cast<std::size_t>(std::max(1, pl.call_seq));
    std::vector<char> done(B, 0);
    std::size_t live = B;
    for (int n = 0; n < o.max_new_tokens && live > 0; ++n) {
      if (!cache) {
        run(0, ids[0].size(), 0);
      } else if (n == 0) {
        for (std::size_t from = 0; from < T0; from += chunk) run(from, std::min(T0, from + chunk), static_cast<int>(from));
      } else {
        run(ids[0].size() - 1, ids[0].size(), static_cast<int>(ids[0].size() - 1));
      }
      for (std::size_t b = 0; b < B; ++b) {
        const float* row = logits.data() + b * static_cast<std::size_t>(V);
        const bool was_done = done[b] != 0;
        std::int32_t tok = o.pad_id;
        if (!was_done) {
          // A non-finite logit (weights that overflow the forward pass) picks nothing
          // meaningful: greedy would take id 0 over NaNs, sampling an arbitrary id.
          if (const std::int64_t bad = std::find_if_not(row, row + V, [](float x) { return std::isfinite(x); }) - row;
              bad < V)
            throw NonFiniteLogits(
                ErrorKind::format,
                fmt::format("the logits of prompt {} at new token {} are not finite (id {}: {}): the model's weights "
                            "overflow its forward pass (huge or non-finite values?), so no token can be chosen",
                            first + b, n + 1, bad, row[bad]));
          tok = o.greedy ? argmax(row, V)
                         : sample(row, V, o.temperature, o.top_p, draw(o.seed, first + b, static_cast<std::uint64_t>(n)),
                                  order, probs);
          Generation& g = out[first + b];
          g.tokens.push_back(tok);
          ++st.new_tokens;
          const bool stop_id = std::find(o.stop_ids.begin(), o.stop_ids.end(), tok) != o.stop_ids.end();
          if (stop_id || (o.stop && o.stop(first + b, g.tokens))) {
            g.stopped = true;
            done[b] = 1;
            --live;
          }
        }
        // A stopped sequence goes on with padding (masked; Note [Generation batches]).
        ids[b].push_back(tok);
        mask[b].push_back(was_done ? 0 : 1);
      }
      if (o.progress) o.progress({static_cast<std::int64_t>(first), static_cast<std::int64_t>(prompts.size()),
                                  st.new_tokens, elapsed()});
    }
    if (o.progress) o.progress({static_cast<std::int64_t>(first + B), static_cast<std::int64_t>(prompts.size()),
                                st.new_tokens, elapsed()});
  }
  st.seconds = elapsed();
  if (stats) *stats = st;
  return out;
}

std::vector<std::int32_t> model_eos_ids(const std::filesystem::path& model_dir, std::int64_t vocab_size) {
  // Note [A model's end-of-sequence ids]
  const std::filesystem::path gen = model_dir / "generation_config.json";
  std::error_code ec;
  // exists, not is_regular_file: a FIFO or a directory named generation_config.json is refused
  // by name below, not passed over for config.json.
  const std::filesystem::path file = std::filesystem::exists(gen, ec) ? gen : model_dir / "config.json";
  if (!std::filesystem::exists(file, ec)) return {};  // no config.json: the model's loader says so
  // Not a FIFO nor nested past kMaxJsonDepth (Note [Reading JSON]).
  const std::string text = read_regular_file(file);
  nlohmann::json j;
  try {
    j = parse_json_text(text, file.string());
  } catch (const nlohmann::json::exception& e) {
    fail(ErrorKind::format, "{}: not valid JSON ({})", file.string(), e.what());
  }
  if (!j.is_object() || !j.contains("eos_token_id") || j.at("eos_token_id").is_null()) return {};
  const nlohmann::json& v = j.at("eos_token_id");
  std::vector<std::int32_t> ids;
  auto take = [&](const nlohmann::json& x) {
    if (!x.is_number_integer() || x.get<std::int64_t>() < 0 || x.get<std::int64_t>() > INT32_MAX)
      fail(ErrorKind::format, "{}: field 'eos_token_id' must be a token id or a list of them, got {}", file.string(),
           v.dump());
    if (x.get<std::int64_t>() < vocab_size) ids.push_back(static_cast<std::int32_t>(x.get<std::int64_t>()));
  };
  if (v.is_array())
    for (const auto& x : v) take(x);
  else
    take(v);
  return ids;
}

}  // namespace zo2
