// The seed log (DESIGN.md §1): a training run is its start checkpoint plus one line per
// step, (step, seed, g, lr, eps, wd), a few bytes per step. `zo2-tune replay` rebuilds the
// tuned weights from them exactly. The file is JSON Lines: a header object, then one
// object per applied step, appended and flushed as the run goes, so a crash loses at most
// the step in flight.
#pragma once
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace zo2 {

struct SeedLogEntry {
  std::int64_t step = 0;
  std::uint64_t seed = 0;
  float g = 0;      // projected gradient (NaN/inf: the update was skipped)
  float lr = 0;
  float eps = 0;
  float wd = 0;
  double g_double = 0;  // (L+ − L−)/(2·eps) in double, for the record
};

struct SeedLogHeader {
  std::uint64_t run_seed = 0;
  std::string storage_dtype = "fp32";
  std::string base_model;  // the checkpoint the run started from
  std::int64_t first_step = 0;
};

class SeedLogWriter {
 public:
  // append = true continues an existing log (resume): entries from `keep_until_step` on are
  // dropped first, since the run will write them again.
  SeedLogWriter(const std::filesystem::path& path, const SeedLogHeader& header, bool append,
                std::int64_t keep_until_step = 0);
  ~SeedLogWriter();
  SeedLogWriter(const SeedLogWriter&) = delete;
  SeedLogWriter& operator=(const SeedLogWriter&) = delete;
  void append(const SeedLogEntry& e);

 private:
  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
};

struct SeedLog {
  SeedLogHeader header;
  std::vector<SeedLogEntry> entries;
  static SeedLog read(const std::filesystem::path& path);
};

}  // namespace zo2
