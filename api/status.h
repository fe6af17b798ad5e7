// The C API's status code (include/zo2.h) of each error kind: zo2_c.cpp returns it, and the
// Python module raises the exception class of the same code for C++ errors it catches.
#pragma once
#include "runtime/error.h"

#include <exception>
#include <string>

namespace zo2 {

int status_of(ErrorKind kind);

// The code and message for any other exception a call let through: std::bad_alloc ("out of
// host memory"), a filesystem_error (I/O), oneTBB's refused worker thread (Note [Thread
// limits], runtime/thread.h: out of memory), anything else internal (its what()). A
// zo2::Error's are status_of(kind) and its what(), which the callers word themselves.
struct ExceptionStatus {
  int code;
  std::string message;
};
ExceptionStatus status_of_exception(const std::exception& e);

}  // namespace zo2
