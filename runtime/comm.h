// Ranks: the processes of one distributed run (DESIGN.md §10). A Comm is the few collective
// operations zo2 needs between them — a step's loss scalars, a fence after a save, a
// broadcast of a host image's bytes — written to the MPI standard (runtime/mpi/, built when
// CMake finds MPI: option ZO2_MPI) so Open MPI, MPICH and a cluster's MPI all work. Without
// mpirun (or srun) there is one rank and no MPI call is made at all.
//
// Note [Rank faults]
//   A collective never waits forever. Every operation sends each peer its part with
//   point-to-point messages and polls for the peers' parts; after `timeout_s` seconds
//   without one it fails with an error naming the ranks it is still waiting for (they
//   died, hung, or took a different code path), and the caller aborts the job
//   (Comm::abort → MPI_Abort), so one sick rank stops every rank within a bounded time.
//   A rank that dies is usually reported sooner by the launcher itself (mpirun: "process
//   rank 2 ... exited on signal 9"), which kills the rest. An error on one rank (a bad
//   batch, a full disk) is logged there and aborts the job the same way: the ranks never
//   disagree silently.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace zo2 {

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // This rank's index among the ranks on its node, and how many ranks the node runs.
  virtual int local_rank() const = 0;
  virtual int local_size() const = 0;
  // "single process", "Open MPI v4.1.4 (4 ranks, 2 on this node)"
  virtual std::string describe() const = 0;
  // Every rank gives `mine` (the same length everywhere); returns every rank's values in
  // rank order (size() × mine.size()). `what` names the exchange in a timeout's error.
  virtual std::vector<double> all_gather(std::span<const double> mine, std::string_view what) = 0;
  // Bytes: `buffer` holds every rank's part, rank r's at [offsets[r], offsets[r + 1])
  // (offsets has size() + 1 entries, ascending); this rank's part is filled, the call fills
  // the others' from their ranks (parts may be empty). Host memory.
  virtual void all_gather_bytes(void* buffer, std::span<const std::size_t> offsets, std::string_view what) = 0;
  // Returns once every rank has called it (with the same `what`).
  virtual void barrier(std::string_view what) = 0;
  // Copies `bytes` at `data` from rank `root` to every rank.
  virtual void broadcast(void* data, std::size_t bytes, int root, std::string_view what) = 0;
  // A second Comm over the same ranks whose operations never match this one's: each thread
  // that communicates uses its own (the scheduler's loss exchange runs on a stream thread
  // while the host thread fences), since operations match by their order. Collective: every
  // rank calls it at the same point.
  virtual std::unique_ptr<Comm> duplicate() = 0;
  // The ranks on this node (shared memory reaches them), as a Comm of their own: rank()
  // is local_rank(). Collective over the world.
  virtual std::unique_ptr<Comm> node() = 0;
  // Ends every rank of the job (after this rank has reported its error).
  [[noreturn]] virtual void abort(int exit_code) = 0;
  double timeout_s() const { return timeout_s_; }
  void set_timeout(double seconds) { timeout_s_ = seconds; }

 protected:
  double timeout_s_ = 600;  // Note [Rank faults]; 0 = no limit
};

// One rank (every operation returns at once).
std::unique_ptr<Comm> make_single_comm();

// True when this process was started by an MPI launcher (mpirun/mpiexec, srun with PMI/PMIx):
// the environment names a world size.
bool launched_by_mpi();
// The launcher's world size from the environment (1 when not launched by MPI).
int launcher_world_size();

// Initializes MPI (MPI_Init_thread, thread level MULTIPLE requested; calls are serialized
// inside) unless the host did, and returns a Comm over MPI_COMM_WORLD. Error(unsupported)
// when zo2 was built without MPI. MPI initialized by zo2 is finalized at exit.
std::unique_ptr<Comm> make_mpi_comm();
// A Comm over a communicator the host program owns (an MPI_Comm passed by address, e.g.
// from the C API): MPI must already be initialized; the communicator is duplicated, and MPI
// is not finalized by zo2.
std::unique_ptr<Comm> make_mpi_comm_from(const void* mpi_comm_handle);
// Whether this build has MPI (CMake option ZO2_MPI).
bool mpi_available();

// The Comm a tool should use: MPI when launched by an MPI launcher with more than one rank
// (Error(unsupported) naming the launcher's size when this build has no MPI), else single.
std::unique_ptr<Comm> make_comm_from_environment();

// Note [One job]
//   The ranks of a job must run the same job: ranks started with another --seed, --lr or
//   data file compute other numbers than their peers (and every rank then updates with a mix
//   of them, silently), and ranks with another --steps wait on one another until
//   --rank-timeout. Before anything is written or stepped, the ranks compare what defines the
//   run (check_ranks_agree): a training session (api/session.cpp: the model's config and
//   checkpoint headers, the update rule, seeds, dtypes and layout) and zo2-tune train
//   (tools/cmd_train.cpp: the resolved flags, a --resume's included, and digests of the
//   data). Per-rank choices (threads, device, placement, where --out is) are not compared.
//   The weights are not hashed whole (175B would take minutes): every tensor's name, dtype,
//   shape and first, middle and last 64 bytes are.
struct RankPart {
  std::string name;   // "--seed", "the training data"
  std::string value;  // as shown in the error ("7", "64 examples, digest 0123abcd…")
};
// Every rank gives the same parts in the same order. When a value differs from rank 0's,
// every rank fails with Error(invalid_argument) naming each such part, its values and the
// ranks that differ; one collective, so never a hang. `what` names it in a timeout's error.
void check_ranks_agree(Comm& comm, std::span<const RankPart> parts, std::string_view what);

// A 64-bit FNV-1a digest of bytes (not cryptographic: it tells copies that differ by
// accident apart), shown as 16 hex digits.
class Digest {
 public:
  Digest& add(const void* data, std::size_t bytes);
  Digest& add(std::string_view s) { return add(static_cast<std::uint64_t>(s.size())).add(s.data(), s.size()); }
  Digest& add(std::uint64_t v) { return add(&v, sizeof v); }
  std::string hex() const;

 private:
  std::uint64_t h_ = 14695981039346656037ull;
};

}  // namespace zo2
