// Starting zo2's own threads with an error that says what ran out.
#pragma once
#include "runtime/error.h"

#include <fmt/format.h>

#include <exception>
#include <fstream>
#include <optional>
#include <stdexcept>
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
//   oneTBB starts its worker threads itself and reports a refused one by throwing
//   std::runtime_error("pthread_create has failed: <reason>") out of the parallel algorithm
//   that asked for them (zo2-tune said just that); refused_thread_message gives such an
//   exception the same words, and zo2-tune and the C API report it so.
inline std::string thread_limit_message(std::string_view role, std::string_view reason) {
  std::string count = "?";
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("Threads:", 0) == 0) count = line.substr(line.find_first_not_of(" \t", 8));
  return fmt::format(
      "cannot start {} ({}): the process runs {} threads and the system refuses more — a thread or process limit "
      "(ulimit -u; a container's or job's pids limit, pids.max) or memory; fewer --threads need fewer",
      role, reason, count);
}

template <class F>
std::thread start_thread(std::string_view role, F&& fn) {
  try {
    return std::thread(std::forward<F>(fn));
  } catch (const std::system_error& e) {
    fail(ErrorKind::out_of_memory, "{}", thread_limit_message(role, e.code().message()));
  }
}

// The message for oneTBB's refused worker thread (above), or nullopt for any other exception.
inline std::optional<std::string> refused_thread_message(const std::exception& e) {
  constexpr std::string_view kTbb = "pthread_create has failed";
  if (!dynamic_cast<const std::runtime_error*>(&e) || dynamic_cast<const std::system_error*>(&e)) return std::nullopt;
  std::string_view what = e.what();
  if (!what.starts_with(kTbb)) return std::nullopt;
  what.remove_prefix(kTbb.size());
  while (!what.empty() && (what.front() == ':' || what.front() == ' ')) what.remove_prefix(1);
  return thread_limit_message("a TBB worker thread", what.empty() ? std::string_view("refused") : what);
}

}  // namespace zo2
