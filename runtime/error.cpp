#include "runtime/error.h"

#include "runtime/cpu_isa.h"
#include "runtime/log.h"

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <csignal>
#include <ctime>
#include <pthread.h>
#include <signal.h>
#include <mutex>

namespace zo2 {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::invalid_argument: return "invalid argument";
    case ErrorKind::io: return "I/O error";
    case ErrorKind::format: return "format error";
    case ErrorKind::unsupported: return "unsupported";
    case ErrorKind::out_of_memory: return "out of memory";
    case ErrorKind::device: return "device error";
    case ErrorKind::aborted: return "aborted";
    case ErrorKind::internal: return "internal error";
  }
  return "error";
}

namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::info)};
// Links the CPU check into every program that holds zo2 (Note [The CPU this build needs]).
[[gnu::used]] const int* const g_cpu_isa_check = &detail::kCpuIsaCheckAnchor;

// Serializes the sink's calls. Recursive: a sink may install another sink (or none), or call
// what logs; what it logs goes to stderr (t_in_sink), not back into itself.
std::recursive_mutex g_sink_mutex;
LogSink g_sink;
thread_local bool t_in_sink = false;

void write_log_line(LogLevel level, std::string_view message) noexcept {
  static constexpr const char* kTag[] = {"debug", "info", "warn", "error", ""};
  if (level == LogLevel::info)
    print_stderr("{}\n", message);
  else
    print_stderr("[{}] {}\n", kTag[static_cast<int>(level)], message);
}
}  // namespace

bool write_stderr(std::string_view text) noexcept {
  // A host's stderr may be a pipe whose reader exited (a log collector that restarted): the
  // write raises SIGPIPE, whose default action killed the host (adversarial pass 65; the
  // CLI ignores it, a host need not). The host's disposition is left alone: SIGPIPE is
  // blocked in this thread for the write, and one the write raised (EPIPE, none pending
  // before) is taken back before the mask is restored, as libcurl and OpenSSL do.
  sigset_t pipe_set, old_mask, pending;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  const bool masked = pthread_sigmask(SIG_BLOCK, &pipe_set, &old_mask) == 0;
  const bool was_pending = masked && sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1;
  // One fwrite (stderr is unbuffered: one write(2) for the whole line), its error read from
  // this call alone: a failure earlier (a full disk since freed) does not taint this one.
  std::clearerr(stderr);
  const bool ok = std::fwrite(text.data(), 1, text.size(), stderr) == text.size() && std::fflush(stderr) == 0;
  const int e = errno;
  std::clearerr(stderr);
  if (masked) {
    if (!ok && e == EPIPE && !was_pending) {
      const timespec zero{0, 0};
      while (sigtimedwait(&pipe_set, nullptr, &zero) == -1 && errno == EINTR) {
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
  }
  errno = e;
  return ok;
}

void log_set_level(LogLevel level) { g_level.store(static_cast<int>(level)); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load(std::memory_order_relaxed)); }

void log_set_sink(LogSink sink) {
  std::lock_guard lock(g_sink_mutex);  // after any call in another thread
  g_sink = std::move(sink);
}

void log_write(LogLevel level, std::string_view message) noexcept {
  if (level < log_level()) return;
  try {
    std::lock_guard lock(g_sink_mutex);
    if (!g_sink || t_in_sink) {
      write_log_line(level, message);
      return;
    }
    const LogSink sink = g_sink;  // a copy: the call may replace g_sink
    struct InSink {
      InSink() { t_in_sink = true; }
      ~InSink() { t_in_sink = false; }
    } in_sink;
    sink(level, message);
  } catch (...) {
    // A sink that throws (or a lock that cannot be taken): the line is lost, not the caller's
    // work — log calls sit in destructors and catch handlers, where a throw terminates.
  }
}

}  // namespace zo2
