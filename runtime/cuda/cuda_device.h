// The CUDA backend's device, streams and events (DESIGN.md §3). See Note [Streams and
// events] in runtime/device.h for what they promise; here they are thin owners of the CUDA
// objects with every call checked (cuda_check.h).
//
// Note [CUDA device memory]
//   A CudaDevice makes ONE cudaMalloc of its cap when it is created and hands it out through
//   zo2::Arena, so the cap is hard, the arena's peak is the truth, and nothing allocates
//   behind it: each stream's cuBLAS workspace and kernel scratch come from the same arena.
//   The arena and its memory live in a DeviceState shared by the device and its streams,
//   so a stream may outlive its device object without using freed memory. (The CUDA
//   context and cuBLAS's own small handle state are outside the arena; driver_used_bytes
//   shows them.)
#pragma once
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/kernels.h"
#include "runtime/device.h"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace zo2::cuda {

struct DeviceState {
  int index = 0;
  int sm_count = 1;
  void* base = nullptr;  // the cudaMalloc'ed region under the arena
  std::unique_ptr<Arena> arena;
  DeviceState() = default;
  DeviceState(const DeviceState&) = delete;
  DeviceState& operator=(const DeviceState&) = delete;
  ~DeviceState();
};

// Makes `index` the calling thread's current device (cheap when it already is).
void use_device(int index);

class CudaEvent final : public Event {
 public:
  explicit CudaEvent(int device);
  void synchronize() override;
  bool query() override;
  double seconds_since(Event& start) override;
  cudaEvent_t get() const { return event_.get(); }

 private:
  int device_;
  EventHandle event_;
};

// The first failure of a host function (launch_host), shared with the callbacks that may
// still be queued when the stream is destroyed.
struct HostErrorSlot {
  std::mutex mutex;
  std::exception_ptr error;
};

// A real CUDA stream (cudaStreamNonBlocking: never the legacy default stream) with, made on
// first use, its own cuBLAS handle and workspace and its kernel scratch, both from the
// arena. launch_host uses cudaLaunchHostFunc: the function runs on a CUDA driver thread and,
// by CUDA's rules, must not call CUDA itself; an exception it throws is kept and rethrown by
// synchronize() and check().
class CudaStream final : public Stream, public KernelStream {
 public:
  CudaStream(std::shared_ptr<DeviceState> state, std::string name);
  ~CudaStream() override;

  // Stream
  void record(Event& event) override;
  void wait(Event& event) override;
  void copy_h2d(void* dst, const void* src, std::size_t bytes) override;
  void copy_d2h(void* dst, const void* src, std::size_t bytes) override;
  void copy_d2d(void* dst, const void* src, std::size_t bytes) override;
  void copy_2d(CopyKind kind, void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
               std::size_t height) override;
  void memset(void* dst, int value, std::size_t bytes) override;
  void launch_host(std::function<void()> fn) override;
  void wait_value(const std::uint32_t* addr, std::uint32_t value, double timeout_s, std::string_view what) override;
  void write_value(std::uint32_t* addr, std::uint32_t value) override;
  void synchronize() override;
  void check() override;
  const std::string& name() const override { return name_; }
  void begin_busy(std::int64_t tag) override;
  void end_busy() override;
  double take_busy_seconds(std::int64_t tag) override;

  // KernelStream
  cudaStream_t stream() const override { return stream_.get(); }
  int sm_count() const override { return state_->sm_count; }
  cublasHandle_t blas() override;
  cublasLtHandle_t blas_lt() override;
  void* blas_workspace(std::size_t* bytes) override;
  void* scratch(std::size_t bytes) override;

  int device() const { return state_->index; }

 private:
  void rethrow_host_error();

  std::shared_ptr<DeviceState> state_;
  std::string name_;
  StreamHandle stream_;
  std::shared_ptr<HostErrorSlot> host_error_ = std::make_shared<HostErrorSlot>();
  DeviceBuffer blas_workspace_;
  BlasHandle blas_;
  BlasLtHandle blas_lt_;
  DeviceBuffer scratch_;
  // Busy-time spans (Note [Stream busy time]): pairs of timing events recorded on this
  // stream, read and returned to the pool by take_busy_seconds().
  struct BusySpan {
    std::int64_t tag = 0;
    EventHandle start, end;
  };
  EventHandle pooled_event();
  std::mutex busy_mutex_;
  std::vector<EventHandle> event_pool_;
  std::deque<BusySpan> spans_;
  bool span_open_ = false;
  BusySpan open_span_;
};

// The CudaStream behind a Stream (an error when it belongs to another backend).
CudaStream& cuda_stream(Stream& s);

}  // namespace zo2::cuda
