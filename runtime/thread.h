// Starting zo2's own threads with an error that says what ran out.
#pragma once
#include "runtime/error.h"

#include <fstream>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>

namespace zo2 {

// Note [Thread limits]
//   A container or batch job may cap the threads of a process tree (a cgroup's pids.max,
//   Kubernetes' pod pids limit, ulimit -u for a user). zo2 runs a few threads of its own —
//   the CPU backend's streams, the kernel threads (--threads), the disk tier's I/O thread and
//   its I/O workers — and std::thread reported a refused one as a bare "Resource temporarily
//   unavailable" (adversarial pass 61). start_thread names the thread, the process's count
//   and the limits to look at.
template <class F>
std::thread start_thread(std::string_view role, F&& fn) {
  try {
    return std::thread(std::forward<F>(fn));
  } catch (const std::system_error& e) {
    std::string count = "?";
    std::ifstream status("/proc/self/status");
    for (std::string line; std::getline(status, line);)
      if (line.rfind("Threads:", 0) == 0) count = line.substr(line.find_first_not_of(" \t", 8));
    fail(ErrorKind::out_of_memory,
         "cannot start {} ({}): the process runs {} threads and the system refuses more — a thread or process limit "
         "(ulimit -u; a container's or job's pids limit, pids.max) or memory; fewer --threads need fewer",
         role, e.code().message(), count);
  }
}

}  // namespace zo2
