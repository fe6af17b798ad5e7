// The single-process Comm and the launcher detection (runtime/comm.h). The MPI Comm lives in
// runtime/mpi/ (built with ZO2_MPI) or its stub in runtime/mpi_stub/.
#include "runtime/comm.h"

#include "runtime/error.h"

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

}  // namespace zo2
