// The messages of the CUDA backend's errors (see cuda_check.h).
#include "runtime/cuda/cuda_check.h"

#include "runtime/error.h"

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

}  // namespace zo2::cuda
