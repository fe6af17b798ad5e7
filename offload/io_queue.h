// IoQueue: the asynchronous file I/O under the disk tier's block file and the disk probe —
// io_uring where the kernel allows it, a pool of threads doing blocking preadv/pwritev
// where it does not (Note [Disk I/O without io_uring]).
#pragma once
#include <sys/uio.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string_view>

namespace zo2 {

// Note [Disk I/O without io_uring]
//   The disk tier (DESIGN.md §12) reads and writes block images through io_uring. Containers
//   often forbid it: Docker's default seccomp profile (since 25.0) and containerd's refuse
//   io_uring_setup with EPERM, and so does kernel.io_uring_disabled (ChromeOS, GKE's COS,
//   hardened kernels); an old kernel has no io_uring at all (ENOSYS), and one before 5.12
//   charges the rings to RLIMIT_MEMLOCK (ENOMEM). The disk tier used to stop there ("cannot
//   set up io_uring"), so a model larger than RAM could not be tuned in a container
//   (adversarial pass 61). Now the queue falls back to worker threads that do the same
//   requests with blocking preadv/pwritev/fdatasync, with a warning once per process. The
//   caller cannot tell the two apart: each request completes once, with the kernel's result
//   (bytes moved, or -errno), short transfers included, in whatever order the requests
//   finish; the bytes on disk are the same. What the threads cost is a context switch per
//   request — nothing next to the MiB-sized images of the disk tier (zo2-bench --disk-probe
//   --disk-io threads measures it against io_uring on the same disk).
enum class DiskIo {
  automatic,  // io_uring, else threads (with a warning)
  io_uring,   // io_uring or an error saying why not
  threads,    // threads, never io_uring
};
// "auto", "io_uring", "threads"; nullopt-like: throws Error(invalid_argument) naming the text.
DiskIo parse_disk_io(std::string_view name);
std::string_view disk_io_name(DiskIo io);

// Single-threaded use: one thread submits and reaps (the threads engine's workers are its
// own). Requests are never reordered against a later submit's view of the buffers: the
// caller keeps every iovec and buffer alive and untouched until the request completes.
class IoQueue {
 public:
  // A queue for at most `depth` requests in flight (the caller keeps to it). `path` names
  // the file in errors and in the fallback's warning.
  static std::unique_ptr<IoQueue> open(DiskIo io, unsigned depth, const std::filesystem::path& path);
  // Waits for every request still in flight (their buffers are the caller's); never throws.
  virtual ~IoQueue() = default;
  virtual void readv(int fd, const iovec* iov, unsigned count, std::uint64_t offset, void* user) = 0;
  virtual void writev(int fd, const iovec* iov, unsigned count, std::uint64_t offset, void* user) = 0;
  virtual void fdatasync(int fd, void* user) = 0;
  // One finished request: its `user` and its result (bytes moved, 0 at the end of the file,
  // or -errno). With `block`, waits for one (the caller must have one in flight); without,
  // returns false when none has finished.
  virtual bool next(void** user, int* result, bool block) = 0;
  virtual DiskIo kind() const = 0;
};

}  // namespace zo2
