// Logging through fmt. One process-wide sink: stderr by default, or a callback installed
// by a host program through the C API. Messages below the level are dropped cheaply.
#pragma once
#include <fmt/format.h>

#include <functional>
#include <string_view>

namespace zo2 {

enum class LogLevel { debug = 0, info = 1, warn = 2, error = 3, off = 4 };

using LogSink = std::function<void(LogLevel, std::string_view)>;

void log_set_level(LogLevel level);
LogLevel log_level();
// Installs a sink; an empty function restores stderr. Calls to the sink are serialized; a
// sink may call log_set_sink, and what it logs itself goes to stderr.
void log_set_sink(LogSink sink);
// Never throws: a log line is best effort (a closed or full stderr, a pipe whose reader
// exited, a sink that throws), and a failure to say something must not become the error.
void log_write(LogLevel level, std::string_view message) noexcept;

// Writes `text` to stderr as it is (no newline added) and never throws; false when the write
// failed (errno then says why). For progress lines and a program's last error message: fmt's
// print throws on a write error, which inside a catch handler ends the process
// (std::terminate) and elsewhere replaces the real outcome with "cannot write to file".
bool write_stderr(std::string_view text) noexcept;
template <class... Args>
bool print_stderr(fmt::format_string<Args...> f, Args&&... args) noexcept {
  try {
    return write_stderr(fmt::format(f, std::forward<Args>(args)...));
  } catch (...) {  // (formatting itself: only an allocation failure)
    return false;
  }
}

template <class... Args>
void log(LogLevel level, fmt::format_string<Args...> f, Args&&... args) {
  if (level < log_level()) return;
  log_write(level, fmt::format(f, std::forward<Args>(args)...));  // (log_write never throws)
}
template <class... Args>
void log_info(fmt::format_string<Args...> f, Args&&... args) {
  log(LogLevel::info, f, std::forward<Args>(args)...);
}
template <class... Args>
void log_warn(fmt::format_string<Args...> f, Args&&... args) {
  log(LogLevel::warn, f, std::forward<Args>(args)...);
}
template <class... Args>
void log_debug(fmt::format_string<Args...> f, Args&&... args) {
  log(LogLevel::debug, f, std::forward<Args>(args)...);
}

}  // namespace zo2
