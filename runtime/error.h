// Errors inside zo2 are exceptions carrying a kind; the C API maps the kind to a status
// code and the message to zo2_last_error(). Nothing in the library calls exit() or abort()
// on bad input.
#pragma once
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace zo2 {

enum class ErrorKind {
  invalid_argument,  // a bad value from the caller (flag, size, id out of range)
  io,                // a file could not be opened, read, written or renamed
  format,            // a file is malformed (safetensors, config.json, JSONL, tokenizer)
  unsupported,       // valid input that zo2 does not run (a config field, a dtype)
  out_of_memory,     // an arena cap or a host allocation was exceeded
  device,            // a backend (CUDA) call failed or no such device exists
  aborted,           // a callback asked to stop
  internal,          // a bug: an invariant did not hold
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string message) : std::runtime_error(std::move(message)), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

template <class... Args>
[[noreturn]] void fail(ErrorKind kind, fmt::format_string<Args...> f, Args&&... args) {
  throw Error(kind, fmt::format(f, std::forward<Args>(args)...));
}

// For invariants that only a bug can break; the message names the condition and place.
#define ZO2_CHECK(cond)                                                                    \
  do {                                                                                     \
    if (!(cond))                                                                           \
      ::zo2::fail(::zo2::ErrorKind::internal, "internal check failed: {} ({}:{})", #cond, \
                  __FILE__, __LINE__);                                                     \
  } while (0)

}  // namespace zo2
