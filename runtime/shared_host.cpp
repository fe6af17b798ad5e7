#include "runtime/shared_host.h"

#include "runtime/common.h"
#include "runtime/error.h"
#include "runtime/log.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>

namespace zo2 {

HostBuffer alloc_node_shared(Comm& node, Device& device, std::size_t bytes, std::string_view what) {
  if (node.size() == 1) return device.alloc_host(bytes);
  const std::size_t size = align_up(bytes == 0 ? 1 : bytes);
  char name[64] = {};
  int fd = -1;
  std::string error;  // rank 0's failure, told to the others through the name
  if (node.rank() == 0) {
    static std::atomic<unsigned> serial{0};
    std::snprintf(name, sizeof name, "/zo2-%d-%u-%08x", static_cast<int>(::getpid()), serial++,
                  static_cast<unsigned>(std::random_device{}()));
    fd = ::shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    int rc = fd < 0 ? errno : 0;
    if (rc == 0) rc = ::posix_fallocate(fd, 0, static_cast<off_t>(size));  // reserve now: no SIGBUS later
    if (rc != 0) {
      error = fmt::format("cannot reserve {} of shared memory for {} in /dev/shm: {} (a container's /dev/shm is "
                          "often small: docker run --shm-size, or run one rank per node)",
                          format_bytes(static_cast<double>(size)), what, std::strerror(rc));
      if (fd >= 0) ::close(fd);
      ::shm_unlink(name);
      std::snprintf(name, sizeof name, "!");
    }
  }
  node.broadcast(name, sizeof name, 0, fmt::format("the name of the shared {}", what));
  if (name[0] == '!') fail(ErrorKind::out_of_memory, "{}", node.rank() == 0 ? error : fmt::format("node rank 0 could not reserve the shared {}", what));
  if (node.rank() != 0) fd = ::shm_open(name, O_RDWR, 0600);
  void* p = MAP_FAILED;
  if (fd >= 0) {
    p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
  }
  const int err = p == MAP_FAILED ? errno : 0;
  node.barrier(fmt::format("mapping the shared {}", what));  // every rank holds it (or failed)
  if (node.rank() == 0) ::shm_unlink(name);
  if (p == MAP_FAILED)
    fail(ErrorKind::io, "cannot map the shared {} ({}, {}): {}", what, name, format_bytes(static_cast<double>(size)),
         std::strerror(err));
  const bool pinned = device.register_host(p, size);
  log_debug("shared {}: {} mapped by {} ranks{}", what, format_bytes(static_cast<double>(size)), node.size(),
            pinned ? ", pinned" : "");
  Device* dev = &device;
  return HostBuffer(p, bytes, pinned, [dev, pinned, size](void* q) {
    if (pinned) dev->unregister_host(q);
    ::munmap(q, size);
  });
}

}  // namespace zo2
