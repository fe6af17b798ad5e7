// The single-process Comm, the launcher detection and the ranks' agreement (runtime/comm.h).
// The MPI Comm lives in runtime/mpi/ (built with ZO2_MPI) or its stub in runtime/mpi_stub/.
#include "runtime/comm.h"

#include "runtime/error.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

namespace zo2 {
namespace {

class SingleComm final : public Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  std::string describe() const override { return "single process"; }
  std::vector<double> all_gather(std::span<const double> mine, std::string_view) override {
    return {mine.begin(), mine.end()};
  }
  void all_gather_bytes(void*, std::span<const std::size_t>, std::string_view) override {}
  void barrier(std::string_view) override {}
  void broadcast(void*, std::size_t, int root, std::string_view what) override {
    if (root != 0) fail(ErrorKind::internal, "broadcast of {} from rank {} in a single-process run", what, root);
  }
  std::unique_ptr<Comm> duplicate() override { return std::make_unique<SingleComm>(); }
  std::unique_ptr<Comm> node() override { return std::make_unique<SingleComm>(); }
  [[noreturn]] void abort(int exit_code) override { std::exit(exit_code); }
};

int env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return -1;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  return (end && *end == '\0' && n > 0 && n < (1 << 24)) ? static_cast<int>(n) : -1;
}

}  // namespace

std::unique_ptr<Comm> make_single_comm() { return std::make_unique<SingleComm>(); }

int launcher_world_size() {
  // Open MPI's mpirun, MPICH/Intel MPI's Hydra (PMI), PMIx launchers, Slurm's srun.
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_WORLD_SIZE"}) {
    if (int n = env_int(name); n > 0) return n;
  }
  if (std::getenv("PMIX_RANK") || std::getenv("PMI_RANK")) {
    if (int n = env_int("SLURM_STEP_NUM_TASKS"); n > 0) return n;
    if (int n = env_int("SLURM_NTASKS"); n > 0) return n;
  }
  return 1;
}

bool launched_by_mpi() { return launcher_world_size() > 1; }

std::unique_ptr<Comm> make_comm_from_environment() {
  const int n = launcher_world_size();
  if (n <= 1) return make_single_comm();
  if (!mpi_available())
    fail(ErrorKind::unsupported,
         "this process was started by an MPI launcher as one of {} ranks, but this zo2 was built without MPI "
         "(install libopenmpi-dev and configure with -DZO2_MPI=ON), or run it without mpirun",
         n);
  return make_mpi_comm();
}

void check_ranks_agree(Comm& comm, std::span<const RankPart> parts, std::string_view what) {
  if (comm.size() == 1) return;
  auto put = [](std::string& out, std::string_view s) {
    const std::uint64_t n = s.size();
    out.append(reinterpret_cast<const char*>(&n), sizeof n).append(s);
  };
  std::string mine;
  for (const RankPart& p : parts) {
    put(mine, p.name);
    put(mine, p.value);
  }
  const double length = static_cast<double>(mine.size());
  const std::vector<double> lengths = comm.all_gather(std::span<const double>(&length, 1), what);
  const auto ranks = static_cast<std::size_t>(comm.size());
  std::vector<std::size_t> offsets(ranks + 1, 0);
  for (std::size_t r = 0; r < ranks; ++r) offsets[r + 1] = offsets[r] + static_cast<std::size_t>(lengths[r]);
  std::string all(offsets.back(), '\0');
  std::memcpy(all.data() + offsets[static_cast<std::size_t>(comm.rank())], mine.data(), mine.size());
  comm.all_gather_bytes(all.data(), offsets, what);
  // Rank r's parts as (name, value) pairs.
  auto parse = [&](std::size_t r) {
    std::vector<std::pair<std::string, std::string>> out;
    std::size_t at = offsets[r];
    auto get = [&] {
      std::uint64_t n = 0;
      if (at + sizeof n > offsets[r + 1]) return std::string();
      std::memcpy(&n, all.data() + at, sizeof n);
      at += sizeof n;
      n = std::min<std::uint64_t>(n, offsets[r + 1] - at);
      std::string s = all.substr(at, n);
      at += n;
      return s;
    };
    while (at < offsets[r + 1]) {
      std::string name = get();
      out.emplace_back(std::move(name), get());
    }
    return out;
  };
  auto shown = [](const std::string& v) { return v.size() <= 80 ? v : v.substr(0, 77) + "..."; };
  std::vector<std::vector<std::pair<std::string, std::string>>> every;
  for (std::size_t r = 0; r < ranks; ++r) every.push_back(parse(r));
  const auto& ref = every[0];
  std::vector<std::string> differ;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    std::vector<std::size_t> odd;  // the ranks whose value differs from rank 0's
    std::string value;             // the first such rank's
    for (std::size_t r = 1; r < ranks; ++r) {
      const auto& theirs = every[r];
      const bool same = i < theirs.size() && theirs[i] == ref[i];
      if (same) continue;
      if (odd.empty())
        value = i < theirs.size() && theirs[i].first == ref[i].first ? shown(theirs[i].second)
                                                                     : std::string("missing (another zo2 build)");
      odd.push_back(r);
    }
    if (odd.empty()) continue;
    std::string more;
    if (odd.size() > 1)
      more = fmt::format(" (and rank{} {})", odd.size() > 2 ? "s" : "", fmt::join(odd.begin() + 1, odd.end(), ", "));
    differ.push_back(fmt::format("{}: {} on rank {}{} but {} on rank 0", ref[i].first, value, odd[0], more,
                                 shown(ref[i].second)));
  }
  if (differ.empty()) return;
  fail(ErrorKind::invalid_argument,
       "the ranks do not run the same job: {}. Every rank must get the same flags, data and model: launch them "
       "with one command line and the same files on every node",
       fmt::join(differ, "; "));
}

Digest& Digest::add(const void* data, std::size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) h_ = (h_ ^ p[i]) * 1099511628211ull;
  return *this;
}

std::string Digest::hex() const { return fmt::format("{:016x}", h_); }

}  // namespace zo2
