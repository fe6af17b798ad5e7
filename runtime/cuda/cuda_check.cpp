// The messages of the CUDA backend's errors (see cuda_check.h).
#include "runtime/cuda/cuda_check.h"

#include "runtime/error.h"

#include <cstdlib>
#include <string_view>

namespace zo2::cuda {

void throw_cuda_error(cudaError_t error, const char* statement, const char* file, int line) {
  // Clear the runtime's last error so that the next launch check does not report it again
  // (sticky errors, such as an illegal address, stay: every later call returns them).
  (void)cudaGetLastError();
  throw Error(ErrorKind::device, fmt::format("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(error),
                                cudaGetErrorString(error), statement, file, line));
}

void throw_cublas_error(cublasStatus_t status, const char* statement, const char* file,
                        int line) {
  (void)cudaGetLastError();
  throw Error(ErrorKind::device,
              fmt::format("cuBLAS error {} ({}) in {} at {}:{}", cublasGetStatusName(status),
                          cublasGetStatusString(status), statement, file, line));
}

void throw_unsupported(const std::string& message) {
  throw Error(ErrorKind::unsupported, message);
}

void throw_invalid_argument(const std::string& message) {
  throw Error(ErrorKind::invalid_argument, message);
}

int env_choice(const char* name, std::initializer_list<const char*> choices) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return 0;
  const std::string_view value(env);
  int i = 0;
  for (const char* c : choices) {
    if (value == c) return i;
    ++i;
  }
  std::string expected;
  i = 0;
  for (const char* c : choices) {
    expected += fmt::format("{}'{}'", i == 0 ? "" : (i + 1 == static_cast<int>(choices.size()) ? " or " : ", "), c);
    ++i;
  }
  throw Error(ErrorKind::invalid_argument, fmt::format("{}='{}': expected {}", name, value, expected));
}

}  // namespace zo2::cuda
