// The MPI Comm (runtime/comm.h), standard MPI-3 only: Open MPI, MPICH or a cluster's MPI.
//
// Every operation is point-to-point messages plus polling (Note [Rank faults]): a blocking
// MPI_Allgather would wait forever for a rank that hangs. Ranks call the operations in the
// same order, so the k-th operation of every rank uses tag k (mod a large period) and the
// messages of two operations never mix. The calls may come from several threads (the
// scheduler's exchange runs on a stream thread, fences on the host thread); they are
// serialized by one mutex, so any thread level MPI provides above SINGLE works.
#include "runtime/comm.h"

#include "runtime/error.h"
#include "runtime/log.h"

// The C API of MPI only (Open MPI and MPICH otherwise pull in their deprecated C++ bindings).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

namespace zo2 {
namespace {

void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  fail(ErrorKind::io, "{} failed: {}", call, std::string(text, static_cast<std::size_t>(len)));
}

class MpiComm final : public Comm {
 public:
  explicit MpiComm(MPI_Comm base) {
    check_mpi(MPI_Comm_dup(base, &comm_), "MPI_Comm_dup");
    // Errors come back as codes (and become zo2 Errors naming the call), not MPI's abort.
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    check_mpi(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node_),
              "MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)");
    MPI_Comm_rank(node_, &local_rank_);
    MPI_Comm_size(node_, &local_size_);
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(version, &len);
    library_.assign(version, static_cast<std::size_t>(len));
    // "Open MPI v4.1.4, package: ..." / "MPICH Version: 4.0 ..." — the first clause.
    library_ = library_.substr(0, std::min(library_.find_first_of(",\n"), library_.size()));
    while (!library_.empty() && (library_.back() == ' ' || library_.back() == '\t')) library_.pop_back();
  }
  ~MpiComm() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    MPI_Comm_free(&node_);
    MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  std::string describe() const override {
    return fmt::format("{} ({} ranks, {} on this node)", library_, size_, local_size_);
  }

  std::vector<double> all_gather(std::span<const double> mine, std::string_view what) override {
    const std::size_t n = mine.size();
    std::vector<double> out(n * static_cast<std::size_t>(size_));
    std::copy(mine.begin(), mine.end(), out.begin() + static_cast<std::ptrdiff_t>(n * static_cast<std::size_t>(rank_)));
    std::vector<std::size_t> offsets(static_cast<std::size_t>(size_) + 1);
    for (std::size_t r = 0; r < offsets.size(); ++r) offsets[r] = r * n * sizeof(double);
    all_gather_bytes(out.data(), offsets, what);
    return out;
  }

  void all_gather_bytes(void* buffer, std::span<const std::size_t> offsets, std::string_view what) override {
    ZO2_CHECK(offsets.size() == static_cast<std::size_t>(size_) + 1);
    auto* base = static_cast<char*>(buffer);
    const auto part = [&](int r) {
      return std::pair(base + offsets[static_cast<std::size_t>(r)],
                       offsets[static_cast<std::size_t>(r) + 1] - offsets[static_cast<std::size_t>(r)]);
    };
    Requests q;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const int tag = next_tag();
      for (int r = 0; r < size_; ++r) {
        if (r == rank_) continue;
        post_send(q, part(rank_).first, part(rank_).second, r, tag);
        post_recv(q, part(r).first, part(r).second, r, tag);
      }
    }
    wait_all(q, what);
  }

  void barrier(std::string_view what) override {
    const double zero = 0;
    (void)all_gather(std::span<const double>(&zero, 1), what);
  }

  void broadcast(void* data, std::size_t bytes, int root, std::string_view what) override {
    Requests q;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const int tag = next_tag();
      if (rank_ != root) {
        post_recv(q, static_cast<char*>(data), bytes, root, tag);
      } else {
        for (int r = 0; r < size_; ++r)
          if (r != root) post_send(q, static_cast<char*>(data), bytes, r, tag);
      }
    }
    wait_all(q, what);
  }

  std::unique_ptr<Comm> duplicate() override { return over(comm_); }
  std::unique_ptr<Comm> node() override { return over(node_); }

  [[noreturn]] void abort(int exit_code) override {
    MPI_Abort(comm_, exit_code);
    std::_Exit(exit_code);  // MPI_Abort does not return; if it did, end this rank anyway
  }

 private:
  int next_tag() {
    // Tags from 1; MPI guarantees at least 32767.
    tag_ = tag_ % 32000 + 1;
    return tag_;
  }

  // A Comm of this one's kind over `c` (duplicated), with the same timeout.
  std::unique_ptr<Comm> over(MPI_Comm c) const {
    auto comm = std::make_unique<MpiComm>(c);
    comm->set_timeout(timeout_s_);
    return comm;
  }

  // The requests of one operation: sends, and receives with the rank each waits for.
  struct Requests {
    std::vector<MPI_Request> sends, recvs;
    std::vector<int> recv_rank;
  };
  static constexpr std::size_t kPiece = std::size_t{1} << 30;  // MPI counts are ints
  // Nonblocking send/receive of `bytes` at p with `peer`, in pieces MPI's int counts hold.
  void post_send(Requests& q, char* p, std::size_t bytes, int peer, int tag) {
    for (std::size_t off = 0; off < bytes; off += kPiece) {
      MPI_Request r;
      check_mpi(MPI_Isend(p + off, static_cast<int>(std::min(kPiece, bytes - off)), MPI_BYTE, peer, tag, comm_, &r),
                "MPI_Isend");
      q.sends.push_back(r);
    }
  }
  void post_recv(Requests& q, char* p, std::size_t bytes, int peer, int tag) {
    for (std::size_t off = 0; off < bytes; off += kPiece) {
      MPI_Request r;
      check_mpi(MPI_Irecv(p + off, static_cast<int>(std::min(kPiece, bytes - off)), MPI_BYTE, peer, tag, comm_, &r),
                "MPI_Irecv");
      q.recvs.push_back(r);
      q.recv_rank.push_back(peer);
    }
  }

  // Polls until every request is done; Note [Rank faults] on a timeout.
  void wait_all(Requests& q, std::string_view what) {
    std::vector<MPI_Request>& sends = q.sends;
    std::vector<MPI_Request>& recvs = q.recvs;
    const std::vector<int>& recv_rank = q.recv_rank;
    using clock = std::chrono::steady_clock;
    // The time waited is the sum of the gaps between polls, each counted up to 1 s: polls
    // come every millisecond at most, so a longer gap is time this process did not run —
    // a job suspended (Slurm's `scontrol suspend`, gang scheduling, Ctrl-Z) and continued,
    // which used to abort every rank at once (adversarial pass 54).
    constexpr double kMaxGap = 1.0;
    double waited = 0;
    auto last = clock::now();
    auto pause = std::chrono::microseconds(0);
    while (true) {
      int sends_done = 0, recvs_done = 0;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!sends.empty())
          check_mpi(MPI_Testall(static_cast<int>(sends.size()), sends.data(), &sends_done, MPI_STATUSES_IGNORE),
                    "MPI_Testall");
        else
          sends_done = 1;
        if (!recvs.empty())
          check_mpi(MPI_Testall(static_cast<int>(recvs.size()), recvs.data(), &recvs_done, MPI_STATUSES_IGNORE),
                    "MPI_Testall");
        else
          recvs_done = 1;
      }
      if (sends_done && recvs_done) return;
      const auto now = clock::now();
      waited += std::min(kMaxGap, std::chrono::duration<double>(now - last).count());
      last = now;
      if (timeout_s_ > 0 && waited > timeout_s_) {
        std::string missing;
        {
          std::lock_guard<std::mutex> lock(mutex_);
          for (std::size_t i = 0; i < recvs.size(); ++i) {
            int done = 0;
            if (recvs[i] != MPI_REQUEST_NULL) MPI_Test(&recvs[i], &done, MPI_STATUS_IGNORE);
            if (recvs[i] != MPI_REQUEST_NULL && !done)
              missing += fmt::format("{}{}", missing.empty() ? "" : ", ", recv_rank[i]);
          }
        }
        // Every part arrived but a send is still pending: the peer has not taken it.
        const std::string who = missing.empty() ? std::string("a peer (a send to it did not complete)")
                                                : fmt::format("rank {}", missing);
        fail(ErrorKind::io,
             "no word from {} for {} within {:.0f} s (--rank-timeout): the rank died, hung or left the run; "
             "stopping every rank",
             who, what, timeout_s_);
      }
      // Spin briefly (a step's scalars arrive in microseconds on one node), then back off.
      if (pause.count() > 0) std::this_thread::sleep_for(pause);
      pause = std::min(std::chrono::microseconds(1000), pause + std::chrono::microseconds(20));
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL, node_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  int tag_ = 0;
  std::string library_;
  std::mutex mutex_;
};

void ensure_initialized() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return;
  int provided = 0;
  check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided), "MPI_Init_thread");
  // MPI initializes once per process: a host may open sessions one after another, so zo2
  // finalizes what it initialized at exit, not when a Comm goes away.
  std::atexit([] {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  });
  if (provided < MPI_THREAD_SERIALIZED)
    log_warn("MPI provides thread level {} (< MPI_THREAD_SERIALIZED); zo2 serializes its MPI calls but a "
             "library that needs the main thread for them may misbehave",
             provided);
}

}  // namespace

bool mpi_available() { return true; }

std::unique_ptr<Comm> make_mpi_comm() {
  ensure_initialized();
  return std::make_unique<MpiComm>(MPI_COMM_WORLD);
}

std::unique_ptr<Comm> make_mpi_comm_from(const void* handle) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized)
    fail(ErrorKind::invalid_argument, "mpi_comm was given but MPI is not initialized: call MPI_Init_thread first");
  if (!handle) fail(ErrorKind::invalid_argument, "mpi_comm is NULL");
  return std::make_unique<MpiComm>(*static_cast<const MPI_Comm*>(handle));
}

}  // namespace zo2
