#include "runtime/shared_host.h"

#include "runtime/common.h"
#include "runtime/error.h"
#include "runtime/log.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>

namespace zo2 {

HostBuffer alloc_node_shared(Comm& node, Device& device, std::size_t bytes, std::string_view what) {
  if (node.size() == 1) return device.alloc_host(bytes);
  const std::size_t size = align_up(bytes == 0 ? 1 : bytes);
  char name[64] = {};
  // While the segment has a name in /dev/shm (from its creation until every rank has opened
  // it) any rank that knows the name removes it on an error or a timeout: a full-size copy of
  // the weights never outlives a failed start. Node rank 0 removes it as soon as every rank
  // holds a descriptor, before the slow reservation, so a rank killed outright (no unwinding)
  // can leave it behind only in that short window.
  struct Segment {
    const char* name;
    int fd = -1;
    bool named = false;
    ~Segment() {
      if (named) ::shm_unlink(name);
      if (fd >= 0) ::close(fd);
    }
  } seg{name};
  std::string error;  // rank 0's failure, told to the others through the name
  if (node.rank() == 0) {
    static std::atomic<unsigned> serial{0};
    std::snprintf(name, sizeof name, "/zo2-%d-%u-%08x", static_cast<int>(::getpid()), serial++,
                  static_cast<unsigned>(std::random_device{}()));
    seg.fd = ::shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (seg.fd < 0) {
      error = fmt::format("cannot create the shared {} in /dev/shm: {}", what, std::strerror(errno));
      std::snprintf(name, sizeof name, "!");
    } else {
      seg.named = true;
    }
  }
  node.broadcast(name, sizeof name, 0, fmt::format("the name of the shared {}", what));
  if (name[0] == '!')
    fail(ErrorKind::out_of_memory, "{}",
         node.rank() == 0 ? error : fmt::format("node rank 0 could not create the shared {}", what));
  seg.named = true;
  // Tests only (tests/mpi/refusals.sh): "hang:R" or "fail:R" — node rank R hangs (as a
  // stopped process would) or fails while the segment has a name.
  if (const char* f = std::getenv("ZO2_TEST_MAPPING_FAULT")) {
    const std::string_view v(f);
    const bool hang = v.starts_with("hang:"), fails = v.starts_with("fail:");
    if ((hang || fails) && std::atoi(f + 5) == node.rank()) {
      if (hang)
        for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
      fail(ErrorKind::io, "ZO2_TEST_MAPPING_FAULT: node rank {} fails mapping the shared {}", node.rank(), what);
    }
  }
  int err = 0;
  if (node.rank() != 0) {
    seg.fd = ::shm_open(name, O_RDWR, 0600);
    if (seg.fd < 0) err = errno;
  }
  node.barrier(fmt::format("opening the shared {}", what));  // every rank holds a descriptor (or failed)
  if (node.rank() == 0) ::shm_unlink(name);
  seg.named = false;
  if (seg.fd < 0)
    fail(ErrorKind::io, "cannot open the shared {} ({}): {}", what, name, std::strerror(err));
  // Reserve now (no SIGBUS later); the others map it once rank 0 says it is there.
  int rc = node.rank() == 0 ? ::posix_fallocate(seg.fd, 0, static_cast<off_t>(size)) : 0;
  if (node.rank() == 0 && rc != 0)
    error = fmt::format("cannot reserve {} of shared memory for {} in /dev/shm: {} (a container's /dev/shm is "
                        "often small: docker run --shm-size, or run one rank per node)",
                        format_bytes(static_cast<double>(size)), what, std::strerror(rc));
  node.broadcast(&rc, sizeof rc, 0, fmt::format("reserving the shared {}", what));
  if (rc != 0)
    fail(ErrorKind::out_of_memory, "{}",
         node.rank() == 0 ? error : fmt::format("node rank 0 could not reserve the shared {}", what));
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, seg.fd, 0);
  if (p == MAP_FAILED)
    fail(ErrorKind::io, "cannot map the shared {} ({}, {}): {}", what, name, format_bytes(static_cast<double>(size)),
         std::strerror(errno));
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
