// Error checking and handle ownership for the CUDA backend (PyTorch c10 and MLX style).
//
// - ZO2_CUDA_CHECK(stmt) runs a CUDA runtime or cuBLAS call and throws
//   zo2::Error(ErrorKind::device) naming the error, the statement, the file and the line.
//   A failed runtime call also clears CUDA's "last error", so that the launch check after
//   the next kernel does not blame that kernel for it.
// - ZO2_CUDA_CHECK_LAUNCH() follows every kernel launch (cudaGetLastError): a bad launch
//   configuration is reported where it happens, not at a later synchronize.
// - Handle<Traits> owns one CUDA handle (stream, event, cuBLAS handle): move-only, and its
//   destructor never throws (a failure to destroy is ignored: there is nobody to tell).
//
// This header deliberately does not include fmt: nvcc 13 cannot compile fmt 9's consteval
// format strings, so the .cu files format nothing and the messages are built in
// cuda_check.cpp.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <initializer_list>
#include <string>
#include <utility>

namespace zo2::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t error, const char* statement, const char* file,
                                   int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* statement,
                                     const char* file, int line);
// Error(ErrorKind::unsupported / invalid_argument) with a ready message, for kernel files.
[[noreturn]] void throw_unsupported(const std::string& message);
[[noreturn]] void throw_invalid_argument(const std::string& message);

// A kernel switch from the environment (ZO2_CUDA_ATTENTION, ZO2_CUDA_GEMM_EPILOGUE, ...),
// read at every call so tests can flip it: the index of its value among `choices`, 0 (the
// default) when unset or empty; any other value is Error(invalid_argument) naming the
// variable, the value and the choices.
int env_choice(const char* name, std::initializer_list<const char*> choices);

inline void check_status(cudaError_t error, const char* statement, const char* file, int line) {
  if (error != cudaSuccess) throw_cuda_error(error, statement, file, line);
}
inline void check_status(cublasStatus_t status, const char* statement, const char* file,
                         int line) {
  if (status != CUBLAS_STATUS_SUCCESS) throw_cublas_error(status, statement, file, line);
}

}  // namespace zo2::cuda

#define ZO2_CUDA_CHECK(stmt) ::zo2::cuda::check_status((stmt), #stmt, __FILE__, __LINE__)
#define ZO2_CUDA_CHECK_LAUNCH() \
  ::zo2::cuda::check_status(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

namespace zo2::cuda {

// Owns a handle of type Traits::type, released with Traits::destroy (which must not throw).
template <class Traits>
class Handle {
 public:
  using type = typename Traits::type;
  Handle() = default;
  explicit Handle(type h) noexcept : h_(h) {}
  Handle(Handle&& o) noexcept : h_(std::exchange(o.h_, type{})) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, type{});
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }

  type get() const noexcept { return h_; }
  explicit operator bool() const noexcept { return h_ != type{}; }
  void reset() noexcept {
    if (h_ != type{}) Traits::destroy(h_);
    h_ = type{};
  }

 private:
  type h_{};
};

struct StreamTraits {
  using type = cudaStream_t;
  static void destroy(type h) noexcept { (void)cudaStreamDestroy(h); }
};
struct EventTraits {
  using type = cudaEvent_t;
  static void destroy(type h) noexcept { (void)cudaEventDestroy(h); }
};
struct BlasTraits {
  using type = cublasHandle_t;
  static void destroy(type h) noexcept { (void)cublasDestroy(h); }
};

struct BlasLtTraits {
  using type = cublasLtHandle_t;
  static void destroy(type h) noexcept { (void)cublasLtDestroy(h); }
};

using StreamHandle = Handle<StreamTraits>;
using EventHandle = Handle<EventTraits>;
using BlasHandle = Handle<BlasTraits>;
using BlasLtHandle = Handle<BlasLtTraits>;

}  // namespace zo2::cuda
