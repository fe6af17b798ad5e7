#include "zo/seed_log.h"

#include "runtime/error.h"
#include "runtime/file_util.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

namespace zo2 {
namespace {

using json = nlohmann::json;

// JSON has no NaN/inf; the log writes them as strings so skipped updates replay as skipped.
json float_json(float v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return v;
}
float float_from(const json& v, const std::string& where) {
  if (v.is_number()) return v.get<float>();
  if (v.is_string()) {
    const auto s = v.get<std::string>();
    if (s == "nan") return std::numeric_limits<float>::quiet_NaN();
    if (s == "inf") return std::numeric_limits<float>::infinity();
    if (s == "-inf") return -std::numeric_limits<float>::infinity();
  }
  fail(ErrorKind::format, "{}: expected a number, got {}", where, v.dump());
}

std::string header_line(const SeedLogHeader& h) {
  json j{{"zo2_seed_log", 1},
         {"run_seed", h.run_seed},
         {"storage_dtype", h.storage_dtype},
         {"base_model", h.base_model},
         {"first_step", h.first_step}};
  return j.dump();
}

}  // namespace

SeedLogWriter::SeedLogWriter(const std::filesystem::path& path, const SeedLogHeader& header,
                             bool append, std::int64_t keep_until_step)
    : path_(path) {
  std::string existing;
  if (append && std::filesystem::exists(path)) {
    const SeedLog old = SeedLog::read(path);
    existing = header_line(old.header) + "\n";
    for (const auto& e : old.entries) {
      if (e.step >= keep_until_step) break;
      json j{{"step", e.step}, {"seed", e.seed},      {"g", float_json(e.g)}, {"lr", e.lr},
             {"eps", e.eps},   {"wd", e.wd}, {"g_double", e.g_double}};
      existing += j.dump() + "\n";
    }
  } else {
    existing = header_line(header) + "\n";
  }
  // Rewrite through a temp file so the old log survives a failure here.
  write_file_atomic(path, existing);
  file_ = std::fopen(path.c_str(), "ab");
  if (!file_) fail(ErrorKind::io, "{}: cannot open the seed log for appending", path.string());
}

SeedLogWriter::~SeedLogWriter() {
  if (file_) std::fclose(file_);
}

void SeedLogWriter::append(const SeedLogEntry& e) {
  json j{{"step", e.step}, {"seed", e.seed}, {"g", float_json(e.g)}, {"lr", e.lr},
         {"eps", e.eps},   {"wd", e.wd},     {"g_double", std::isfinite(e.g_double) ? json(e.g_double) : json(nullptr)}};
  const std::string line = j.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() || std::fflush(file_) != 0)
    fail(ErrorKind::io, "{}: cannot append to the seed log", path_.string());
}

SeedLog SeedLog::read(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) fail(ErrorKind::io, "{}: cannot open the seed log", path.string());
  SeedLog log;
  std::string line;
  std::int64_t lineno = 0;
  bool have_header = false;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    const std::string where = fmt::format("{}:{}", path.string(), lineno);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::parse_error& e) {
      fail(ErrorKind::format, "{}: not valid JSON: {}", where, e.what());
    }
    if (!j.is_object()) fail(ErrorKind::format, "{}: expected a JSON object", where);
    try {
      if (!have_header) {
        if (!j.contains("zo2_seed_log"))
          fail(ErrorKind::format, "{}: not a zo2 seed log (the first line has no \"zo2_seed_log\")",
               where);
        log.header.run_seed = j.value("run_seed", std::uint64_t{0});
        log.header.storage_dtype = j.value("storage_dtype", std::string("fp32"));
        log.header.base_model = j.value("base_model", std::string());
        log.header.first_step = j.value("first_step", std::int64_t{0});
        have_header = true;
        continue;
      }
      SeedLogEntry e;
      for (const char* k : {"step", "seed", "g", "lr", "eps"})
        if (!j.contains(k)) fail(ErrorKind::format, "{}: field '{}' is missing", where, k);
      e.step = j.at("step").get<std::int64_t>();
      e.seed = j.at("seed").get<std::uint64_t>();
      e.g = float_from(j.at("g"), where + " field 'g'");
      e.lr = j.at("lr").get<float>();
      e.eps = j.at("eps").get<float>();
      e.wd = j.value("wd", 0.0f);
      if (j.contains("g_double") && j.at("g_double").is_number()) e.g_double = j.at("g_double").get<double>();
      if (!log.entries.empty() && e.step <= log.entries.back().step)
        fail(ErrorKind::format, "{}: step {} does not follow step {}", where, e.step,
             log.entries.back().step);
      log.entries.push_back(e);
    } catch (const json::exception& e) {
      fail(ErrorKind::format, "{}: {}", where, e.what());
    }
  }
  if (!have_header) fail(ErrorKind::format, "{}: empty seed log", path.string());
  return log;
}

}  // namespace zo2
