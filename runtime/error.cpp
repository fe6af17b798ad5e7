#include "runtime/error.h"

#include "runtime/log.h"

#include <atomic>
#include <cstdio>
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
// Serializes the sink's calls. Recursive: a sink may install another sink (or none), or call
// what logs; what it logs goes to stderr (t_in_sink), not back into itself.
std::recursive_mutex g_sink_mutex;
LogSink g_sink;
thread_local bool t_in_sink = false;

void write_stderr(LogLevel level, std::string_view message) {
  static constexpr const char* kTag[] = {"debug", "info", "warn", "error", ""};
  if (level == LogLevel::info)
    fmt::print(stderr, "{}\n", message);
  else
    fmt::print(stderr, "[{}] {}\n", kTag[static_cast<int>(level)], message);
}
}  // namespace

void log_set_level(LogLevel level) { g_level.store(static_cast<int>(level)); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load(std::memory_order_relaxed)); }

void log_set_sink(LogSink sink) {
  std::lock_guard lock(g_sink_mutex);  // after any call in another thread
  g_sink = std::move(sink);
}

void log_write(LogLevel level, std::string_view message) {
  if (level < log_level()) return;
  std::lock_guard lock(g_sink_mutex);
  if (!g_sink || t_in_sink) {
    write_stderr(level, message);
    return;
  }
  const LogSink sink = g_sink;  // a copy: the call may replace g_sink
  struct InSink {
    InSink() { t_in_sink = true; }
    ~InSink() { t_in_sink = false; }
  } in_sink;
  sink(level, message);
}

}  // namespace zo2
