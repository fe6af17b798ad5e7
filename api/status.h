// The C API's status code (include/zo2.h) of each error kind: zo2_c.cpp returns it, and the
// Python module raises the exception class of the same code for C++ errors it catches.
#pragma once
#include "runtime/error.h"

namespace zo2 {

int status_of(ErrorKind kind);

}  // namespace zo2
