// The backend interface (DESIGN.md §3): a Device owns a capped Arena, makes Streams and
// Events, allocates (pinned) host memory, and provides the op table (ops.h).
//
// Note [Streams and events]
//   A Stream is an in-order queue of work. On CUDA it is a real stream (never the legacy
//   default stream); on the CPU a worker thread draining a queue. Work is enqueued and
//   the call returns at once. An Event marks a point in a stream's queue: record(e) on one
//   stream and wait(e) on another orders the two, exactly as cudaEventRecord /
//   cudaStreamWaitEvent do — wait() refers to the most recent record() made before it,
//   and waiting on an event never recorded does nothing. Because the CPU backend really
//   runs its streams concurrently, a missing wait is a real data race there, which
//   ThreadSanitizer reports: the CPU tests check the scheduler a GPU would run.
//
// Note [Stream busy time]
//   How long a stream was busy with some of its work, read without host synchronization
//   while the work runs (zo2-bench's per-step upload/compute/offload breakdown). The work
//   enqueued between begin_busy(tag) and end_busy() forms a span; take_busy_seconds(tag)
//   waits until the tag's last span has run and returns the sum of its spans' durations:
//   - CPU: the wall time the stream's worker thread spent running the span's copies,
//     kernels and host functions, measured around each item. record() and wait() are not
//     work and never count, nor does time the worker spends waiting for the host to
//     enqueue more.
//   - CUDA: cudaEventElapsedTime between two timing events recorded at begin_busy() and
//     end_busy() (taken from a per-stream pool; recording them never blocks the host), so
//     the span's time is the stream's timeline from its first to its last piece of work,
//     gaps included. A span must therefore not contain a wait(): callers open spans after
//     their waits (the scheduler does), and then both backends measure the same thing.
//   Spans do not nest (begin_busy() while a span is open is an error). A tag's spans stay
//   in memory (on CUDA, two events each) until take_busy_seconds(tag) reads them, so a
//   caller that opens spans must take them. An unknown tag reads 0.
#pragma once
#include "runtime/arena.h"
#include "runtime/comm.h"
#include "runtime/error.h"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <span>
#include <string_view>
#include <vector>

namespace zo2 {

class Ops;

enum class DeviceKind { cpu, cuda };
std::string_view device_kind_name(DeviceKind kind);

class Event {
 public:
  virtual ~Event() = default;
  // Blocks the host until the work before the most recent record() has finished.
  virtual void synchronize() = 0;
  // True when that work has finished (or the event was never recorded).
  virtual bool query() = 0;
  // Seconds between two completed timing events (`start` recorded before this one).
  virtual double seconds_since(Event& start) = 0;
};

class Stream {
 public:
  virtual ~Stream() = default;
  virtual void record(Event& event) = 0;
  virtual void wait(Event& event) = 0;
  // Asynchronous copies between host memory (pinned for full speed) and device memory.
  virtual void copy_h2d(void* dst, const void* src, std::size_t bytes) = 0;
  virtual void copy_d2h(void* dst, const void* src, std::size_t bytes) = 0;
  virtual void copy_d2d(void* dst, const void* src, std::size_t bytes) = 0;
  virtual void memset(void* dst, int value, std::size_t bytes) = 0;
  // `height` rows of `width` bytes, `spitch` bytes apart at src, `dpitch` apart at dst
  // (e.g. the new rows of every sequence of a KV cache). The default copies row by row;
  // CUDA does it in one cudaMemcpy2DAsync.
  enum class CopyKind { h2d, d2h, d2d };
  virtual void copy_2d(CopyKind kind, void* dst, std::size_t dpitch, const void* src, std::size_t spitch,
                       std::size_t width, std::size_t height) {
    for (std::size_t r = 0; r < height; ++r) {
      void* d = static_cast<char*>(dst) + r * dpitch;
      const void* src_row = static_cast<const char*>(src) + r * spitch;
      if (kind == CopyKind::h2d) copy_h2d(d, src_row, width);
      else if (kind == CopyKind::d2h) copy_d2h(d, src_row, width);
      else copy_d2d(d, src_row, width);
    }
  }
  // Runs `fn` on a host thread once the work before it is done; later work waits for it.
  virtual void launch_host(std::function<void()> fn) = 0;
  // Note [Stream value waits]: ordering with another process through a 32-bit counter in
  // host memory both can see (a node-shared segment, registered with register_host).
  // wait_value: later work waits until *addr ≥ value. write_value: *addr = value once the
  // work before it is done (its writes visible first). CPU: a host function polling with
  // backoff, failing after timeout_s (> 0) with `what` in the message; CUDA:
  // cuStreamWaitValue32 (GEQ) and cuStreamWriteValue32 on the registered memory, run by the
  // GPU without a host thread (no timeout there: a rank that dies is ended by the launcher,
  // one that hangs by the loss exchange's timeout).
  virtual void wait_value(const std::uint32_t* addr, std::uint32_t value, double timeout_s, std::string_view what);
  virtual void write_value(std::uint32_t* addr, std::uint32_t value);
  // Blocks until everything enqueued so far has run; rethrows a failure of that work.
  virtual void synchronize() = 0;
  // Rethrows a failure of work that has already run, without waiting.
  virtual void check() = 0;
  virtual const std::string& name() const = 0;
  // Busy-time spans, see Note [Stream busy time].
  virtual void begin_busy(std::int64_t tag) = 0;
  virtual void end_busy() = 0;
  // Seconds the stream was busy with `tag`'s spans; waits for them to run, then forgets
  // the tag. A failure of the timed work is reported by synchronize()/check(), not here
  // (on the CPU, skipped work of a poisoned stream counts 0; CUDA throws on a device fault).
  virtual double take_busy_seconds(std::int64_t tag) = 0;
};

// Host memory for block images and staging: pinned (page-locked) when a CUDA device
// exists, so copies run at full PCIe speed; aligned pageable memory otherwise.
class HostBuffer {
 public:
  HostBuffer() = default;
  HostBuffer(void* ptr, std::size_t bytes, bool pinned, std::function<void(void*)> free_fn)
      : ptr_(ptr), bytes_(bytes), pinned_(pinned), free_(std::move(free_fn)) {}
  HostBuffer(HostBuffer&& o) noexcept { *this = std::move(o); }
  HostBuffer& operator=(HostBuffer&& o) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  ~HostBuffer() { reset(); }

  void* data() const { return ptr_; }
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }
  std::size_t bytes() const { return bytes_; }
  bool pinned() const { return pinned_; }
  explicit operator bool() const { return ptr_ != nullptr; }
  void reset();

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
  bool pinned_ = false;
  std::function<void(void*)> free_;
};

// Plain aligned host memory (kAlignment), zero-filled, independent of any device.
HostBuffer host_alloc_aligned(std::size_t bytes);

struct DeviceOptions {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;                // CUDA device ordinal
  std::size_t mem_cap = 0;      // arena bytes; 0 = the device's memory (CPU: physical RAM)
  int threads = 0;              // CPU threads for kernels; 0 = default_threads() (Note [Kernel threads])
  int debug_copy_delay_us = 0;  // CPU backend, tests only: every async copy first sleeps this long
};

// Note [Device groups]
//   The devices of a node's ranks as one group, for collectives on device memory in stream
//   order: DistZO2's sliced upload, where each rank uploads only its slice of a block over
//   its own link and the ranks' devices exchange the slices (offload/scheduler.cpp, Note
//   [Sliced upload]). CPU backend ("device" memory is this process's host memory): a host
//   function on the stream that runs Comm::all_gather_bytes (MPI between processes, the
//   twin of the GPU path); CUDA: NCCL broadcasts from each rank's slice (one group call),
//   over NVLink where the GPUs have it.
class DeviceGroup {
 public:
  virtual ~DeviceGroup() = default;
  // Once the work before it on `s` is done: every rank's part [offsets[r], offsets[r + 1])
  // of `device_buffer` (this rank's already filled) lands in every rank's buffer; later work
  // on `s` waits for it.
  virtual void all_gather(Stream& s, void* device_buffer, std::span<const std::size_t> offsets) = 0;
};

class Device {
 public:
  virtual ~Device() = default;
  virtual DeviceKind kind() const = 0;
  // e.g. "cpu (2 threads)", "NVIDIA H200 (cuda:0, sm_90)"
  virtual std::string name() const = 0;
  virtual Arena& arena() = 0;
  virtual std::unique_ptr<Stream> make_stream(std::string_view name) = 0;
  virtual std::unique_ptr<Event> make_event() = 0;
  virtual Ops& ops() = 0;
  virtual HostBuffer alloc_host(std::size_t bytes) = 0;
  // Memory the process holds on the device as the driver sees it (CUDA context
  // included); the CPU backend reports the arena's peak.
  virtual std::size_t driver_used_bytes() = 0;
  // Bytes of pinned host memory currently allocated through alloc_host.
  virtual std::size_t pinned_host_bytes() const = 0;
  // Pins host memory allocated elsewhere (a node-shared segment) for full-speed copies and
  // the value waits above; true when it was pinned (CUDA), false where nothing needs it
  // (CPU). unregister_host undoes it.
  virtual bool register_host(void* ptr, std::size_t bytes) { return false; }
  virtual void unregister_host(void* ptr) {}
  // A group of this process's device with the other ranks' of `node` (Note [Device groups]);
  // the group owns `node` and uses it from stream threads only. Collective over `node`.
  virtual std::unique_ptr<DeviceGroup> make_group(std::unique_ptr<Comm> node);
  // Runs fn on the calling thread with the TBB parallelism the device's kernels have: the
  // CPU backend's kernel arena (Note [Kernel threads], runtime/cpu/cpu_device.cpp), so the
  // session's own host-side work (loading, converting, saving the weights) keeps to its
  // threads too; CUDA: fn() as it is. fn must not wait for the device's kernels (it holds a
  // place in the arena they need); nesting is allowed. Rethrows what fn throws.
  virtual void run_host_parallel(const std::function<void()>& fn) { fn(); }
};

// The machine's physical memory (sysconf), or the process's cgroup memory limit where that
// is smaller (Note [Cgroup limits], runtime/cgroup.h), bytes; 0 when neither says.
std::size_t physical_memory_bytes();

// The CPU backend's kernel threads when none are asked for: the threads TBB would run (the
// CPUs of the process's affinity mask), or the cgroup's CPU quota rounded up where that is
// fewer (docker --cpus=4 on a 64-core host: 4, not 64 threads throttled to 4 CPUs' time;
// TBB itself does not read the quota). At least 1.
int default_threads();

// Note [Address-space limits]
// `ulimit -v` (RLIMIT_AS, an HPC scheduler's h_vmem) and `ulimit -d` (RLIMIT_DATA) cap the
// address space a process may map, reserved or not. The CPU backend maps more than it
// touches: its arena is one reservation (MAP_NORESERVE), by default the size of physical
// memory; each thread that runs kernels gets a malloc arena (glibc reserves 64 MiB) and a
// stack; and OpenBLAS maps a 128 MiB buffer for each thread that calls it at once — and when
// that mmap fails it retries forever, so a run under a tight limit hung in its first GEMM.
// (OpenBLAS's own thread pool, started when the library loads, takes a buffer per core too:
// under a limit, OPENBLAS_NUM_THREADS=1 in the environment keeps it from starting. zo2 calls
// OpenBLAS from its own threads, one GEMM each, and needs no pool. Debian's serial OpenBLAS
// has no pool, but it is not safe to call from several threads at once: evaluations then
// differed from run to run.) So the limit is read first
// (address_space_headroom): each kernel thread's share (kThreadAddressSpace, for the kernel
// threads and the streams' threads that call kernels too) is set aside, the default arena is
// half of what remains (the other half for the host's weights and the rest), and a limit
// that leaves too little is an error naming it, before any BLAS call.
inline constexpr std::size_t kThreadAddressSpace = std::size_t{200} << 20;  // BLAS 128 + malloc 64 + stack 8 MiB
inline constexpr int kKernelCallingStreams = 3;  // the scheduler's upload, compute and offload streams

// The address space set aside for the kernels of `threads` kernel threads (0 = default_threads()).
std::size_t kernel_threads_address_space(int threads);

// What the address-space limits (RLIMIT_AS, RLIMIT_DATA) leave this process to map, bytes;
// SIZE_MAX when neither is set.
std::size_t address_space_headroom();

// The CPU backend's arena when no cap is given, for `threads` kernel threads (0 = all
// cores): physical memory, or less under an address-space limit (Note [Address-space
// limits]); 0 when the limit leaves nothing for it. The CPU device and the plans made for
// it without a cap use it.
std::size_t cpu_default_arena_bytes(int threads = 0);

// Host memory a new allocation can take without swapping: /proc/meminfo's MemAvailable, or
// what the process's cgroup memory limit leaves where that is less (Note [Cgroup limits]:
// past it the kernel's OOM killer ends the process without a word); ZO2_HOST_MEM_AVAILABLE
// (a size such as 64G) overrides both — to cap zo2's host memory below what the machine has,
// and for tests. SIZE_MAX where none is known.
std::size_t host_memory_available();
// The same, with where the number came from for messages: "ZO2_HOST_MEM_AVAILABLE",
// "MemAvailable in /proc/meminfo" or "the cgroup memory limit, 256 MiB in
// /sys/fs/cgroup/.../memory.max, less 20 MiB in use"; empty where nothing is known.
struct HostMemory {
  std::size_t available = SIZE_MAX;
  std::string source;
};
HostMemory host_memory();

// kind = cpu always works; cuda needs a CUDA build and a device (clear error otherwise).
std::unique_ptr<Device> make_device(const DeviceOptions& options);
// "cpu", "cuda", "cuda:1", "auto" (cuda when a device exists, else cpu).
DeviceOptions parse_device(std::string_view spec);

// Backend entry points (runtime/cpu/, runtime/cuda/ or runtime/cuda_stub/).
std::unique_ptr<Device> cpu_make_device(const DeviceOptions& options);
// The CPU backend's emulated host↔device link, ZO2_CPU_LINK_GBPS in bytes/s (Note [Emulated
// link], runtime/cpu/cpu_device.cpp); 0 when unset (copies at memory speed). A value that is
// not a rate is Error(invalid_argument) naming it.
double cpu_emulated_link_bytes_per_s();
int cuda_device_count() noexcept;  // never throws: any error means zero devices
// Each CUDA device's PCI bus id ("0000:17:00.0") by ordinal, for hwloc (runtime/topology.h);
// empty without CUDA. Never throws.
std::vector<std::string> cuda_pci_bus_ids() noexcept;
// What the CUDA backend takes from the arena beside the model (the planner reserves it):
// the compute stream's cuBLAS workspace and its kernel scratch, reserved whole on first use
// (attention's scores need at most 64 MiB plus pointer arrays).
inline constexpr std::size_t kCudaBlasWorkspace = std::size_t{32} << 20;
inline constexpr std::size_t kCudaScratchReserve = std::size_t{68} << 20;
inline constexpr std::size_t kCudaBackendBytes = kCudaBlasWorkspace + kCudaScratchReserve;
std::unique_ptr<Device> cuda_make_device(const DeviceOptions& options);

}  // namespace zo2
