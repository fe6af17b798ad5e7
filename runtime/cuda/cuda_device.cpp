// The CUDA backend's device, streams, events and pinned host memory, and the backend entry
// points of runtime/device.h. See Note [CUDA device memory] in cuda_device.h.
#include "runtime/cuda/cuda_device.h"
#include "runtime/cuda/nccl_group.h"

#include "runtime/common.h"
#include "runtime/log.h"

#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>

#include <cuda.h>

#include <algorithm>
#include <cstring>

namespace zo2::cuda {

std::unique_ptr<Ops> make_cuda_ops();  // cuda_ops.cpp

namespace {

// Kept free of the arena for the CUDA context's growth, cuBLAS's handle state and other
// processes' small allocations when the cap is "all free memory".
constexpr std::size_t kSafetyMargin = std::size_t{512} << 20;
// Each stream's cuBLAS workspace (kCudaBlasWorkspace) comes from the arena, and its kernel
// scratch is reserved whole (kCudaScratchReserve) on first use, so a stream that runs the
// model's ops holds exactly kCudaBackendBytes (runtime/device.h): what the planner reserves
// for CUDA (plan_request in api/session.cpp), which makes the predicted peak exact. A larger
// request still works, growing the scratch beyond the plan.

std::string bytes_text(std::size_t bytes) { return format_bytes(static_cast<double>(bytes)); }

}  // namespace

void use_device(int index) { ZO2_CUDA_CHECK(cudaSetDevice(index)); }

DeviceState::~DeviceState() {
  arena.reset();
  if (base != nullptr) {
    (void)cudaSetDevice(index);
    (void)cudaFree(base);  // waits for the device's work; errors have nobody to go to
  }
}

// ---- events ----

CudaEvent::CudaEvent(int device) : device_(device) {
  use_device(device_);
  cudaEvent_t e = nullptr;
  ZO2_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDefault));  // with timing
  event_ = EventHandle(e);
}

void CudaEvent::synchronize() { ZO2_CUDA_CHECK(cudaEventSynchronize(event_.get())); }

bool CudaEvent::query() {
  const cudaError_t err = cudaEventQuery(event_.get());
  if (err == cudaErrorNotReady) return false;
  ZO2_CUDA_CHECK(err);
  return true;
}

double CudaEvent::seconds_since(Event& start) {
  auto* s = dynamic_cast<CudaEvent*>(&start);
  if (s == nullptr) fail(ErrorKind::invalid_argument, "seconds_since: the start event is not a CUDA event");
  float ms = 0.0f;
  ZO2_CUDA_CHECK(cudaEventElapsedTime(&ms, s->event_.get(), event_.get()));
  return static_cast<double>(ms) * 1e-3;
}

// ---- streams ----

CudaStream::CudaStream(std::shared_ptr<DeviceState> state, std::string name)
    : state_(std::move(state)), name_(std::move(name)) {
  use_device(state_->index);
  cudaStream_t s = nullptr;
  // Never the legacy default stream, and no implicit synchronization with it.
  ZO2_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  stream_ = StreamHandle(s);
}

CudaStream::~CudaStream() {
  // Work in flight may still use the workspace and the scratch, and queued host functions
  // may still hold the error slot: let it finish before releasing them. Errors are ignored.
  (void)cudaSetDevice(state_->index);
  (void)cudaStreamSynchronize(stream_.get());
  (void)cudaGetLastError();
}

CudaStream& cuda_stream(Stream& s) {
  auto* cs = dynamic_cast<CudaStream*>(&s);
  if (cs == nullptr)
    fail(ErrorKind::invalid_argument, "stream '{}' does not belong to a CUDA device", s.name());
  return *cs;
}

namespace {
CudaEvent& cuda_event(Event& e) {
  auto* ce = dynamic_cast<CudaEvent*>(&e);
  if (ce == nullptr) fail(ErrorKind::invalid_argument, "the event does not belong to a CUDA device");
  return *ce;
}
}  // namespace

void CudaStream::record(Event& event) {
  use_device(state_->index);
  ZO2_CUDA_CHECK(cudaEventRecord(cuda_event(event).get(), stream_.get()));
}

void CudaStream::wait(Event& event) {
  use_device(state_->index);
  // An event never recorded is complete: waiting on it does nothing, as on the CPU.
  ZO2_CUDA_CHECK(cudaStreamWaitEvent(stream_.get(), cuda_event(event).get(), 0));
}

void CudaStream::copy_h2d(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0) return;
  use_device(state_->index);
  ZO2_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_.get()));
}

void CudaStream::copy_d2h(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0) return;
  use_device(state_->index);
  ZO2_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_.get()));
}

void CudaStream::copy_d2d(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0 || dst == src) return;
  use_device(state_->index);
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const std::size_t gap = d < s ? static_cast<std::size_t>(s - d) : static_cast<std::size_t>(d - s);
  if (gap >= bytes) {
    ZO2_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_.get()));
    return;
  }
  // Overlapping ranges (memmove semantics, like the CPU backend): copy in pieces of `gap`
  // bytes, in the direction that reads every piece before it is overwritten; stream order
  // runs the pieces one after another.
  if (d < s) {
    for (std::size_t off = 0; off < bytes; off += gap)
      ZO2_CUDA_CHECK(cudaMemcpyAsync(d + off, s + off, std::min(gap, bytes - off),
                                     cudaMemcpyDeviceToDevice, stream_.get()));
  } else {
    for (std::size_t end = bytes; end > 0;) {
      const std::size_t len = std::min(gap, end);
      end -= len;
      ZO2_CUDA_CHECK(cudaMemcpyAsync(d + end, s + end, len, cudaMemcpyDeviceToDevice, stream_.get()));
    }
  }
}

void CudaStream::copy_2d(CopyKind kind, void* dst, std::size_t dpitch, const void* src, std::size_t spitch,
                         std::size_t width, std::size_t height) {
  if (width == 0 || height == 0) return;
  use_device(state_->index);
  const cudaMemcpyKind k = kind == CopyKind::h2d   ? cudaMemcpyHostToDevice
                           : kind == CopyKind::d2h ? cudaMemcpyDeviceToHost
                                                   : cudaMemcpyDeviceToDevice;
  ZO2_CUDA_CHECK(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, k, stream_.get()));
}

void CudaStream::memset(void* dst, int value, std::size_t bytes) {
  if (bytes == 0) return;
  use_device(state_->index);
  ZO2_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, stream_.get()));
}

namespace {

struct HostTask {
  std::function<void()> fn;
  std::shared_ptr<HostErrorSlot> error;
};

// Runs on a CUDA driver thread; must not throw, and (a CUDA rule) fn must not call CUDA.
void CUDART_CB run_host_task(void* data) {
  std::unique_ptr<HostTask> task(static_cast<HostTask*>(data));
  try {
    task->fn();
  } catch (...) {
    std::lock_guard lock(task->error->mutex);
    if (!task->error->error) task->error->error = std::current_exception();
  }
}

}  // namespace

void CudaStream::launch_host(std::function<void()> fn) {
  use_device(state_->index);
  auto task = std::make_unique<HostTask>(HostTask{std::move(fn), host_error_});
  ZO2_CUDA_CHECK(cudaLaunchHostFunc(stream_.get(), run_host_task, task.get()));
  task.release();  // run_host_task owns it now and frees it after running
}

// Note [Stream value waits] on the GPU: cuStreamWaitValue32/cuStreamWriteValue32 from the
// driver, reached through the runtime (cudaGetDriverEntryPointByVersion) so libzo2 links
// no libcuda and still loads on machines without a driver. Where the driver lacks them
// (or refuses stream memory operations) the host-function fallback of Stream runs.
namespace {
using StreamValueFn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
struct StreamValueOps {
  StreamValueFn wait = nullptr, write = nullptr;
};
const StreamValueOps& stream_value_ops() {
  static const StreamValueOps ops = [] {
    StreamValueOps o;
    cudaDriverEntryPointQueryResult q{};
    void* fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &fn, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      o.wait = reinterpret_cast<StreamValueFn>(fn);
    fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", &fn, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      o.write = reinterpret_cast<StreamValueFn>(fn);
    (void)cudaGetLastError();
    if (!o.wait || !o.write)
      log_warn("cuda: cuStreamWaitValue32/cuStreamWriteValue32 are not available; cross-process waits poll on a host thread");
    return o;
  }();
  return ops;
}
CUdeviceptr mapped(const void* host) {
  void* d = nullptr;
  ZO2_CUDA_CHECK(cudaHostGetDevicePointer(&d, const_cast<void*>(host), 0));
  return reinterpret_cast<CUdeviceptr>(d);
}
}  // namespace

void CudaStream::wait_value(const std::uint32_t* addr, std::uint32_t value, double timeout_s, std::string_view what) {
  use_device(state_->index);
  const StreamValueOps& ops = stream_value_ops();
  if (!ops.wait) return Stream::wait_value(addr, value, timeout_s, what);
  const CUresult r = ops.wait(stream_.get(), mapped(addr), value, CU_STREAM_WAIT_VALUE_GEQ);
  if (r != CUDA_SUCCESS) fail(ErrorKind::device, "cuStreamWaitValue32 for {} failed (CUresult {})", what, static_cast<int>(r));
}

void CudaStream::write_value(std::uint32_t* addr, std::uint32_t value) {
  use_device(state_->index);
  const StreamValueOps& ops = stream_value_ops();
  if (!ops.write) return Stream::write_value(addr, value);
  // The default flags put a system-scope fence before the write: the copies before it land first.
  const CUresult r = ops.write(stream_.get(), mapped(addr), value, CU_STREAM_WRITE_VALUE_DEFAULT);
  if (r != CUDA_SUCCESS) fail(ErrorKind::device, "cuStreamWriteValue32 failed (CUresult {})", static_cast<int>(r));
}

void CudaStream::rethrow_host_error() {
  std::lock_guard lock(host_error_->mutex);
  if (host_error_->error) std::rethrow_exception(host_error_->error);
}

void CudaStream::synchronize() {
  use_device(state_->index);
  ZO2_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
  rethrow_host_error();
}

void CudaStream::check() {
  use_device(state_->index);
  const cudaError_t err = cudaStreamQuery(stream_.get());
  if (err != cudaErrorNotReady) ZO2_CUDA_CHECK(err);  // a fault of finished work is sticky
  rethrow_host_error();
}

EventHandle CudaStream::pooled_event() {
  if (!event_pool_.empty()) {
    EventHandle e = std::move(event_pool_.back());
    event_pool_.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  ZO2_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDefault));  // with timing
  return EventHandle(e);
}

void CudaStream::begin_busy(std::int64_t tag) {
  std::lock_guard lock(busy_mutex_);
  if (span_open_)
    fail(ErrorKind::internal, "stream '{}': begin_busy({}) while the span of tag {} is still open", name_, tag,
         open_span_.tag);
  use_device(state_->index);
  EventHandle start = pooled_event();
  ZO2_CUDA_CHECK(cudaEventRecord(start.get(), stream_.get()));
  open_span_.tag = tag;
  open_span_.start = std::move(start);
  span_open_ = true;
}

void CudaStream::end_busy() {
  std::lock_guard lock(busy_mutex_);
  if (!span_open_) fail(ErrorKind::internal, "stream '{}': end_busy() without begin_busy()", name_);
  use_device(state_->index);
  EventHandle end = pooled_event();
  ZO2_CUDA_CHECK(cudaEventRecord(end.get(), stream_.get()));
  open_span_.end = std::move(end);
  spans_.push_back(std::move(open_span_));
  open_span_ = BusySpan{};
  span_open_ = false;
}

double CudaStream::take_busy_seconds(std::int64_t tag) {
  std::lock_guard lock(busy_mutex_);
  use_device(state_->index);
  double seconds = 0.0;
  for (auto it = spans_.begin(); it != spans_.end();) {
    if (it->tag != tag) {
      ++it;
      continue;
    }
    // The host waits here, when the tag's results are read, never while work is enqueued.
    ZO2_CUDA_CHECK(cudaEventSynchronize(it->end.get()));
    float ms = 0.0f;
    ZO2_CUDA_CHECK(cudaEventElapsedTime(&ms, it->start.get(), it->end.get()));
    seconds += static_cast<double>(ms) * 1e-3;
    event_pool_.push_back(std::move(it->start));
    event_pool_.push_back(std::move(it->end));
    it = spans_.erase(it);
  }
  return seconds;
}

cublasHandle_t CudaStream::blas() {
  if (blas_) return blas_.get();
  use_device(state_->index);
  DeviceBuffer workspace =
      state_->arena->allocate(kCudaBlasWorkspace, fmt::format("cuBLAS workspace of stream '{}'", name_));
  cublasHandle_t h = nullptr;
  ZO2_CUDA_CHECK(cublasCreate(&h));
  BlasHandle handle(h);
  ZO2_CUDA_CHECK(cublasSetStream(h, stream_.get()));
  // After cublasSetStream, which resets the workspace to cuBLAS's own pool.
  ZO2_CUDA_CHECK(cublasSetWorkspace(h, workspace.data(), workspace.bytes()));
  ZO2_CUDA_CHECK(cublasSetMathMode(
      h, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  blas_workspace_ = std::move(workspace);
  blas_ = std::move(handle);
  return blas_.get();
}

cublasLtHandle_t CudaStream::blas_lt() {
  if (blas_lt_) return blas_lt_.get();
  use_device(state_->index);
  cublasLtHandle_t h = nullptr;
  ZO2_CUDA_CHECK(cublasLtCreate(&h));
  blas_lt_ = BlasLtHandle(h);
  return blas_lt_.get();
}

void* CudaStream::blas_workspace(std::size_t* bytes) {
  blas();  // made with the handle
  *bytes = blas_workspace_.bytes();
  return blas_workspace_.data();
}

void* CudaStream::scratch(std::size_t bytes) {
  if (scratch_ && scratch_.bytes() >= bytes) return scratch_.data();
  if (scratch_) {
    // Earlier work of this stream may still read the old scratch.
    ZO2_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    scratch_.reset();
  }
  scratch_ = state_->arena->allocate(std::max(bytes, kCudaScratchReserve),
                                     fmt::format("kernel scratch of stream '{}'", name_));
  return scratch_.data();
}

int grid_blocks(const KernelStream& s, std::int64_t items, int threads) {
  const std::int64_t want = std::max<std::int64_t>(1, ceil_div(items, threads));
  return static_cast<int>(std::min<std::int64_t>(want, std::int64_t{s.sm_count()} * 16));
}

// ---- device ----

namespace {

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(const DeviceOptions& o) : state_(std::make_shared<DeviceState>()) {
    const int count = cuda_device_count();
    if (count == 0)
      fail(ErrorKind::device,
           "no CUDA device is available (no GPU, or no driver); use the CPU backend (--device cpu; device \"cpu\" "
           "in the C API and Python)");
    if (o.index < 0 || o.index >= count)
      fail(ErrorKind::device, "cuda:{} requested but this machine has {} CUDA device(s)", o.index, count);
    state_->index = o.index;
    use_device(o.index);
    cudaDeviceProp prop{};
    ZO2_CUDA_CHECK(cudaGetDeviceProperties(&prop, o.index));
    state_->sm_count = std::max(1, prop.multiProcessorCount);
    name_ = fmt::format("{} (cuda:{}, sm_{}{}, {} GiB)", prop.name, o.index, prop.major, prop.minor,
                        prop.totalGlobalMem >> 30);
    std::size_t free = 0, total = 0;
    ZO2_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    std::size_t cap = o.mem_cap;
    if (cap == 0) {
      if (free <= kSafetyMargin)
        fail(ErrorKind::out_of_memory, "cuda:{}: only {} of device memory is free", o.index, bytes_text(free));
      cap = free - kSafetyMargin;
    } else if (cap > free) {
      fail(ErrorKind::out_of_memory,
           "cuda:{}: the requested memory cap of {} exceeds the {} of device memory that is free "
           "({} total)",
           o.index, bytes_text(cap), bytes_text(free), bytes_text(total));
    }
    const cudaError_t err = cudaMalloc(&state_->base, cap);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      state_->base = nullptr;
      fail(ErrorKind::out_of_memory, "cuda:{}: cannot reserve the memory cap of {} ({} free): {}",
           o.index, bytes_text(cap), bytes_text(free), cudaGetErrorString(err));
    }
    state_->arena = std::make_unique<Arena>(fmt::format("cuda:{} device memory", o.index), state_->base, cap);
    ops_ = make_cuda_ops();
    log_debug("{}: arena of {}", name_, bytes_text(cap));
  }

  DeviceKind kind() const override { return DeviceKind::cuda; }
  std::string name() const override { return name_; }
  Arena& arena() override { return *state_->arena; }
  std::unique_ptr<Stream> make_stream(std::string_view name) override {
    return std::make_unique<CudaStream>(state_, std::string(name));
  }
  std::unique_ptr<Event> make_event() override { return std::make_unique<CudaEvent>(state_->index); }
  Ops& ops() override { return *ops_; }

  HostBuffer alloc_host(std::size_t bytes) override {
    const std::size_t size = align_up(bytes == 0 ? 1 : bytes);
    void* p = nullptr;
    use_device(state_->index);
    const cudaError_t err = cudaHostAlloc(&p, size, cudaHostAllocPortable);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      log_warn("{}: cannot pin {} of host memory ({}); using pageable memory, host-device copies "
               "of it will be several times slower",
               name_, bytes_text(size), cudaGetErrorString(err));
      return host_alloc_aligned(bytes);
    }
    zero_fill(p, size);  // as host_alloc_aligned does
    pinned_->fetch_add(size);
    std::shared_ptr<std::atomic<std::size_t>> counter = pinned_;
    return HostBuffer(p, bytes, true, [counter, size](void* q) {
      (void)cudaFreeHost(q);
      counter->fetch_sub(size);
    });
  }

  // Memory in use on the whole device as the driver reports it (total − free, from
  // cudaMemGetInfo): the arena, the CUDA context, cuBLAS's handle state — and any other
  // process's allocations, so on an otherwise idle GPU it is what NVML/nvidia-smi shows for
  // this process.
  std::size_t driver_used_bytes() override {
    use_device(state_->index);
    std::size_t free = 0, total = 0;
    ZO2_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    return total - free;
  }

  std::size_t pinned_host_bytes() const override { return pinned_->load(); }

  bool register_host(void* ptr, std::size_t bytes) override {
    use_device(state_->index);
    const cudaError_t err = cudaHostRegister(ptr, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      log_warn("{}: cannot pin {} of host memory at {}: {}; its copies run at pageable speed", name_,
               bytes_text(bytes), ptr, cudaGetErrorString(err));
      return false;
    }
    return true;
  }
  void unregister_host(void* ptr) override {
    use_device(state_->index);
    (void)cudaHostUnregister(ptr);
  }
  std::unique_ptr<DeviceGroup> make_group(std::unique_ptr<Comm> node) override {
    return make_nccl_group(std::move(node), state_->index);
  }

 private:
  static void zero_fill(void* p, std::size_t size) {
    constexpr std::size_t kPiece = std::size_t{64} << 20;
    auto* bytes = static_cast<unsigned char*>(p);
    if (size <= kPiece) {
      std::memset(bytes, 0, size);
      return;
    }
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, ceil_div(static_cast<std::int64_t>(size), kPiece)),
                      [&](const tbb::blocked_range<std::size_t>& r) {
                        for (std::size_t i = r.begin(); i != r.end(); ++i) {
                          const std::size_t off = i * kPiece;
                          std::memset(bytes + off, 0, std::min(kPiece, size - off));
                        }
                      });
  }

  std::shared_ptr<DeviceState> state_;
  std::string name_;
  std::unique_ptr<Ops> ops_;
  std::shared_ptr<std::atomic<std::size_t>> pinned_ = std::make_shared<std::atomic<std::size_t>>(0);
};

}  // namespace
}  // namespace zo2::cuda

namespace zo2 {

int cuda_device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver, no device, ...: zero devices (DESIGN.md §9)
    return 0;
  }
  return n;
}

std::vector<std::string> cuda_pci_bus_ids() noexcept {
  std::vector<std::string> ids;
  try {
    for (int i = 0, n = cuda_device_count(); i < n; ++i) {
      char id[32] = {};
      if (cudaDeviceGetPCIBusId(id, sizeof id, i) != cudaSuccess) {
        (void)cudaGetLastError();
        id[0] = '\0';
      }
      ids.emplace_back(id);
    }
  } catch (...) {
  }
  return ids;
}

std::unique_ptr<Device> cuda_make_device(const DeviceOptions& options) {
  return std::make_unique<cuda::CudaDevice>(options);
}

}  // namespace zo2

// For tests (tests/cuda_test.cpp, through a weak reference so that a CPU-only build links):
// 1 when p points into page-locked host memory registered with CUDA, 0 otherwise.
extern "C" int zo2_cuda_host_pointer_is_pinned(const void* p) noexcept {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return attr.type == cudaMemoryTypeHost ? 1 : 0;
}
