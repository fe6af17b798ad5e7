// IoQueue (io_queue.h): io_uring, or worker threads where io_uring is refused.
#include "offload/io_queue.h"

#include "runtime/error.h"
#include "runtime/log.h"
#include "runtime/thread.h"

#include <fmt/format.h>

#include <liburing.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace zo2 {
namespace {

namespace fs = std::filesystem;

enum class Kind { read, write, sync };

// The thread queue's workers for `depth` requests in flight: a few threads keep a disk busy
// with MiB-sized requests; more only contend.
unsigned thread_queue_workers(unsigned depth) { return std::clamp(depth, 1u, 8u); }

// ---- io_uring ----

class UringQueue final : public IoQueue {
 public:
  // Returns 0, or the -errno io_uring_queue_init gave.
  int init(unsigned depth, const fs::path& path) {
    path_ = path;
    const int r = io_uring_queue_init(depth, &ring_, 0);
    ok_ = r == 0;
    return r;
  }
  ~UringQueue() override {
    if (!ok_) return;
    // The kernel may still write into the callers' buffers: let every request end.
    while (in_flight_ > 0) {
      io_uring_cqe* cqe = nullptr;
      const int r = io_uring_wait_cqe(&ring_, &cqe);
      if (r == -EINTR) continue;
      if (r < 0) break;
      io_uring_cqe_seen(&ring_, cqe);
      --in_flight_;
    }
    io_uring_queue_exit(&ring_);
  }
  void readv(int fd, const iovec* iov, unsigned count, std::uint64_t offset, void* user) override {
    io_uring_sqe* s = sqe();
    io_uring_prep_readv(s, fd, iov, count, offset);
    submit(s, user);
  }
  void writev(int fd, const iovec* iov, unsigned count, std::uint64_t offset, void* user) override {
    io_uring_sqe* s = sqe();
    io_uring_prep_writev(s, fd, iov, count, offset);
    submit(s, user);
  }
  void fdatasync(int fd, void* user) override {
    io_uring_sqe* s = sqe();
    io_uring_prep_fsync(s, fd, IORING_FSYNC_DATASYNC);
    submit(s, user);
  }
  bool next(void** user, int* result, bool block) override {
    io_uring_cqe* cqe = nullptr;
    for (;;) {
      const int r = block ? io_uring_wait_cqe(&ring_, &cqe) : io_uring_peek_cqe(&ring_, &cqe);
      if (r == -EINTR) continue;
      if (r == -EAGAIN && !block) return false;
      if (r < 0) fail(ErrorKind::io, "{}: waiting for io_uring completions: {}", path_.string(), std::strerror(-r));
      break;
    }
    *user = io_uring_cqe_get_data(cqe);
    *result = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    --in_flight_;
    return true;
  }
  DiskIo kind() const override { return DiskIo::io_uring; }

 private:
  io_uring_sqe* sqe() {
    io_uring_sqe* s = io_uring_get_sqe(&ring_);
    ZO2_CHECK(s != nullptr);  // the caller keeps at most `depth` requests in flight
    return s;
  }
  // io_uring_submit until the prepared entry is in; the transient refusals are retried.
  void submit(io_uring_sqe* s, void* user) {
    io_uring_sqe_set_data(s, user);
    for (int tries = 0;; ++tries) {
      const int r = io_uring_submit(&ring_);
      if (r > 0 || (r == 0 && io_uring_sq_ready(&ring_) == 0)) break;
      if ((r == 0 || r == -EINTR || r == -EAGAIN || r == -EBUSY) && tries < 10000) {
        std::this_thread::sleep_for(std::chrono::microseconds(100));
        continue;
      }
      fail(ErrorKind::io, "{}: io_uring_submit: {}", path_.string(), std::strerror(r < 0 ? -r : EAGAIN));
    }
    ++in_flight_;
  }

  fs::path path_;
  io_uring ring_{};
  bool ok_ = false;
  unsigned in_flight_ = 0;
};

// ---- worker threads ----

class ThreadQueue final : public IoQueue {
 public:
  explicit ThreadQueue(unsigned depth) {
    const unsigned n = thread_queue_workers(depth);
    try {
      for (unsigned i = 0; i < n; ++i) workers_.push_back(start_thread("a disk I/O worker thread", [this] { work(); }));
    } catch (...) {
      stop();  // the ones started must end before this object goes
      throw;
    }
  }
  ~ThreadQueue() override { stop(); }
  void readv(int fd, const iovec* iov, unsigned count, std::uint64_t offset, void* user) override {
    push({Kind::read, fd, iov, count, offset, user});
  }
  void writev(int fd, const iovec* iov, unsigned count, std::uint64_t offset, void* user) override {
    push({Kind::write, fd, iov, count, offset, user});
  }
  void fdatasync(int fd, void* user) override { push({Kind::sync, fd, nullptr, 0, 0, user}); }
  bool next(void** user, int* result, bool block) override {
    std::unique_lock<std::mutex> g(mu_);
    if (block) done_cv_.wait(g, [&] { return !done_.empty(); });
    if (done_.empty()) return false;
    *user = done_.front().user;
    *result = done_.front().result;
    done_.pop_front();
    return true;
  }
  DiskIo kind() const override { return DiskIo::threads; }

 private:
  // Lets the workers finish what is queued, then joins them.
  void stop() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;  // the workers finish what is queued first
    }
    todo_cv_.notify_all();
    for (std::thread& t : workers_)
      if (t.joinable()) t.join();
  }

  struct Request {
    Kind kind;
    int fd;
    const iovec* iov;
    unsigned count;
    std::uint64_t offset;
    void* user;
  };
  struct Done {
    void* user;
    int result;
  };

  void push(const Request& r) {
    {
      std::lock_guard<std::mutex> g(mu_);
      todo_.push_back(r);
    }
    todo_cv_.notify_one();
  }

  void work() {
    for (;;) {
      Request r{};
      {
        std::unique_lock<std::mutex> g(mu_);
        todo_cv_.wait(g, [&] { return stop_ || !todo_.empty(); });
        if (todo_.empty()) return;  // stopping, and nothing left
        r = todo_.front();
        todo_.pop_front();
      }
      // One system call, as io_uring makes it: a short transfer is the caller's to resubmit.
      ssize_t n = 0;
      do {
        switch (r.kind) {
          case Kind::read: n = ::preadv(r.fd, r.iov, static_cast<int>(r.count), static_cast<off_t>(r.offset)); break;
          case Kind::write: n = ::pwritev(r.fd, r.iov, static_cast<int>(r.count), static_cast<off_t>(r.offset)); break;
          case Kind::sync: n = ::fdatasync(r.fd); break;
        }
      } while (n < 0 && errno == EINTR);
      const int result = n < 0 ? -errno : static_cast<int>(std::min<ssize_t>(n, INT32_MAX));
      {
        std::lock_guard<std::mutex> g(mu_);
        done_.push_back({r.user, result});
      }
      done_cv_.notify_one();
    }
  }

  std::mutex mu_;
  std::condition_variable todo_cv_, done_cv_;
  std::deque<Request> todo_;
  std::deque<Done> done_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace

DiskIo parse_disk_io(std::string_view name) {
  if (name == "auto") return DiskIo::automatic;
  if (name == "io_uring") return DiskIo::io_uring;
  if (name == "threads") return DiskIo::threads;
  fail(ErrorKind::invalid_argument, "disk I/O '{}': expected auto, io_uring or threads", name);
}

std::string_view disk_io_name(DiskIo io) {
  switch (io) {
    case DiskIo::automatic: return "auto";
    case DiskIo::io_uring: return "io_uring";
    case DiskIo::threads: return "threads";
  }
  return "?";
}

std::unique_ptr<IoQueue> IoQueue::open(DiskIo io, unsigned depth, const fs::path& path) {
  if (io == DiskIo::threads) return std::make_unique<ThreadQueue>(depth);
  auto uring = std::make_unique<UringQueue>();
  const int r = uring->init(depth, path);
  if (r == 0) return uring;
  const std::string why = fmt::format("cannot set up io_uring ({} entries): {} (a kernel without io_uring, "
                                      "kernel.io_uring_disabled, or a container's seccomp profile that blocks it)",
                                      depth, std::strerror(-r));
  if (io == DiskIo::io_uring) fail(ErrorKind::io, "{}: {}", path.string(), why);
  // Note [Disk I/O without io_uring]: once per process, then quietly.
  static std::atomic<bool> warned{false};
  if (!warned.exchange(true))
    log_warn("{}: {}; reading and writing with {} threads instead (the same bytes, a little more CPU)", path.string(),
             why, thread_queue_workers(depth));
  else
    log_debug("{}: {}; threads instead", path.string(), why);
  return std::make_unique<ThreadQueue>(depth);
}

}  // namespace zo2
