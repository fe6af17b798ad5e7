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
void log_write(LogLevel level, std::string_view message);

template <class... Args>
void log(LogLevel level, fmt::format_string<Args...> f, Args&&... args) {
  if (level < log_level()) return;
  log_write(level, fmt::format(f, std::forward<Args>(args)...));
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
