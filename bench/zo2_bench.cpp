// zo2-bench: how fast does model X tune under a device-memory cap of Y, and where do the
// bytes go? Sweeps presets × caps × storage dtypes × batch × sequence length with weights
// synthesized in memory (no disk), and writes one JSON object per row (JSONL) plus a
// markdown table. Works on the CPU backend with small presets (CI's smoke sweep) and on
// CUDA. Rows built with --alias-blocks share one host image for every block (shapes larger
// than host memory) and are labelled synthetic.
#include "api/session.h"
#include "models/presets.h"
#include "runtime/arena.h"
#include "runtime/error.h"
#include "runtime/log.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

using json = nlohmann::json;

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

struct Row {
  std::string preset, storage, compute, cap_text;
  int batch = 1, seq = 1;
  bool synthetic = false;
};

json run_row(const Row& r, const std::string& device, const std::string& offload, int steps, int warmup, std::uint64_t seed) {
  const zo2::ModelConfig config = zo2::find_preset(r.preset).config;
  zo2::SessionConfig sc;
  sc.device = device;
  sc.gpu_mem = r.cap_text == "none" ? 0 : zo2::parse_byte_size(r.cap_text);
  sc.storage = *zo2::dtype_from_name(r.storage);
  sc.compute = *zo2::dtype_from_name(r.compute);
  sc.max_batch = r.batch;
  sc.max_seq = r.seq;
  sc.run_seed = seed;
  sc.offload = zo2::parse_offload_mode(offload);
  json row{{"offload", offload}, {"preset", r.preset}, {"params", config.total_params()}, {"device", device},
           {"cap", r.cap_text}, {"cap_bytes", sc.gpu_mem}, {"storage", r.storage}, {"compute", r.compute},
           {"batch", r.batch}, {"seq", r.seq}, {"synthetic", r.synthetic}};
  try {
    zo2::Session s(config, sc, seed, r.synthetic);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(r.batch) * static_cast<std::size_t>(r.seq));
    for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int32_t>((i * 7919 + 13) % static_cast<std::size_t>(config.vocab_size));
    const zo2::HostBatch batch = zo2::make_batch(config, r.batch, r.seq, ids);
    // Warm up, drain, then time `steps` pipelined steps (losses read a step behind, as
    // zo2-tune does): B·T over the mean steady-state step.
    std::int64_t prev = -1;
    for (int t = 0; t < warmup; ++t) {
      const std::int64_t id = s.step_async(batch, 1e-7f, 1e-3f, 0.0f);
      if (prev >= 0) s.wait(prev);
      prev = id;
    }
    if (prev >= 0) s.wait(prev);
    prev = -1;
    std::size_t h2d = 0, d2h = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < steps; ++t) {
      const std::int64_t id = s.step_async(batch, 1e-7f, 1e-3f, 0.0f);
      if (prev >= 0) {
        const zo2::StepResult res = s.wait(prev);
        h2d += res.h2d_bytes;
        d2h += res.d2h_bytes;
      }
      prev = id;
    }
    const zo2::StepResult last_res = s.wait(prev);
    h2d += last_res.h2d_bytes;
    d2h += last_res.d2h_bytes;
    const double median = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
    const auto& pl = s.placement();
    const double tokens = static_cast<double>(r.batch) * r.seq;
    const double n = static_cast<double>(steps);
    row["ok"] = true;
    row["step_s"] = median;
    row["tokens_per_s"] = median > 0 ? tokens / median : 0;
    row["resident_blocks"] = pl.resident_count;
    row["streamed_blocks"] = pl.streamed;
    row["window"] = pl.window;
    row["device_peak_bytes"] = s.device_peak();
    row["driver_used_bytes"] = s.device().driver_used_bytes();
    row["pinned_host_bytes"] = s.device().pinned_host_bytes();
    row["host_store_bytes"] = s.store().host_bytes();
    row["predicted_peak_bytes"] = pl.total_bytes;
    row["h2d_bytes_per_step"] = static_cast<double>(h2d) / n;
    row["d2h_bytes_per_step"] = static_cast<double>(d2h) / n;
    row["h2d_gb_s"] = median > 0 ? static_cast<double>(h2d) / n / median / 1e9 : 0;
    row["d2h_gb_s"] = median > 0 ? static_cast<double>(d2h) / n / median / 1e9 : 0;
    row["predicted_transfer_floor_s"] = pl.predicted_transfer_s;
    row["floor_ratio"] = median > 0 ? pl.predicted_transfer_s / median : 0;
    row["peak_within_cap"] = sc.gpu_mem == 0 || s.device_peak() <= sc.gpu_mem;
  } catch (const zo2::Error& e) {
    row["ok"] = false;
    row["error"] = e.what();
  }
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"zo2-bench: zo2 MeZO step throughput and memory against device-memory caps"};
  std::string presets = "opt-tiny", caps = "none", storages = "fp32", computes = "fp32", batches = "1", seqs = "128";
  std::string device = "cpu", offload = "auto", jsonl, markdown;
  int steps = 5, warmup = 2;
  std::uint64_t seed = 0;
  bool alias = false, quiet = false;
  app.add_option("--presets", presets, "comma-separated presets (zo2-tune init --list)")->capture_default_str();
  app.add_option("--gpu-mem", caps, "comma-separated caps (512M, 18G, none = whole device)")->capture_default_str();
  app.add_option("--storage-dtype", storages, "comma-separated: fp32, bf16, fp16, fp8")->capture_default_str();
  app.add_option("--compute-dtype", computes, "comma-separated: fp32, bf16, fp16")->capture_default_str();
  app.add_option("--batch-size", batches, "comma-separated batch sizes")->capture_default_str();
  app.add_option("--seq-len", seqs, "comma-separated sequence lengths")->capture_default_str();
  app.add_option("--device", device, "cpu, cuda, cuda:N")->capture_default_str();
  app.add_option("--offload", offload, "auto, all (stream every block), none")->capture_default_str()
      ->check(CLI::IsMember({"auto", "all", "none"}));
  app.add_option("--steps", steps, "measured steps per row (median reported)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "steps before measuring")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--seed", seed, "init and run seed")->capture_default_str();
  app.add_flag("--alias-blocks", alias, "every block shares one host image (shapes beyond host memory; rows labelled synthetic)");
  app.add_option("--jsonl", jsonl, "write one JSON object per row to this file");
  app.add_option("--markdown", markdown, "write the markdown table to this file (always printed)");
  app.add_flag("-q,--quiet", quiet, "only the table");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  zo2::log_set_level(zo2::LogLevel::warn);
  try {
    for (const auto& s : split(storages))
      if (!zo2::dtype_from_name(s)) zo2::fail(zo2::ErrorKind::invalid_argument, "--storage-dtype '{}'", s);
    for (const auto& s : split(computes))
      if (!zo2::dtype_from_name(s)) zo2::fail(zo2::ErrorKind::invalid_argument, "--compute-dtype '{}'", s);
    for (const auto& p : split(presets)) zo2::find_preset(p);
    std::ofstream jl;
    if (!jsonl.empty()) {
      jl.open(jsonl, std::ios::trunc);
      if (!jl) zo2::fail(zo2::ErrorKind::io, "{}: cannot write", jsonl);
    }
    std::string table =
        "| preset | cap | storage | compute | B×T | resident/streamed (window) | tok/s | s/step | peak | predicted | H2D GB/s | D2H GB/s | floor s | floor/step |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    int failures = 0;
    for (const auto& p : split(presets))
      for (const auto& cap : split(caps))
        for (const auto& st : split(storages))
          for (const auto& cp : split(computes))
            for (const auto& b : split(batches))
              for (const auto& t : split(seqs)) {
                Row r{p, st, cp, cap, std::stoi(b), std::stoi(t), alias};
                const json row = run_row(r, device, offload, steps, warmup, seed);
                if (jl) jl << row.dump() << "\n" << std::flush;
                if (!quiet) fmt::print(stderr, "{}\n", row.dump());
                if (!row["ok"].get<bool>()) {
                  table += fmt::format("| {}{} | {} | {} | {} | {}×{} | error: {} |||||||||\n", p, alias ? " (synthetic)" : "", cap, st, cp, b, t,
                                       row["error"].get<std::string>());
                  continue;
                }
                if (!row["peak_within_cap"].get<bool>()) ++failures;
                table += fmt::format(
                    "| {}{} | {} | {} | {} | {}×{} | {}/{} ({}) | {:.1f} | {:.4f} | {} | {} | {:.2f} | {:.2f} | {:.4f} | {:.2f} |\n", p,
                    alias ? " (synthetic)" : "", cap, st, cp, b, t, row["resident_blocks"].get<int>(), row["streamed_blocks"].get<int>(),
                    row["window"].get<int>(), row["tokens_per_s"].get<double>(), row["step_s"].get<double>(),
                    zo2::format_bytes(row["device_peak_bytes"].get<double>()), zo2::format_bytes(row["predicted_peak_bytes"].get<double>()),
                    row["h2d_gb_s"].get<double>(), row["d2h_gb_s"].get<double>(), row["predicted_transfer_floor_s"].get<double>(),
                    row["floor_ratio"].get<double>());
              }
    fmt::print("{}", table);
    if (!markdown.empty()) {
      std::ofstream md(markdown, std::ios::trunc);
      md << table;
    }
    if (failures > 0) {
      fmt::print(stderr, "zo2-bench: {} row(s) exceeded their cap\n", failures);
      return 1;
    }
  } catch (const zo2::Error& e) {
    fmt::print(stderr, "zo2-bench: error: {}\n", e.what());
    return e.kind() == zo2::ErrorKind::invalid_argument ? 2 : 1;
  }
  return 0;
}
