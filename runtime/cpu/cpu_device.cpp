#include "runtime/cpu/cpu_device.h"
#include "runtime/thread.h"

#include "runtime/cgroup.h"
#include "runtime/common.h"
#include "runtime/device.h"
#include "runtime/log.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/noise_simd.h"
#include "runtime/ops.h"

#include <cblas.h>
#include <oneapi/tbb/info.h>
#include <oneapi/tbb/task_arena.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>

namespace zo2::cpu {

// ---- events ----

void CpuEvent::synchronize() { wait_for(latest_record()); }

bool CpuEvent::query() {
  std::lock_guard lock(mutex_);
  return completed_ >= recorded_;
}

double CpuEvent::seconds_since(Event& start) {
  auto& s = static_cast<CpuEvent&>(start);
  std::chrono::steady_clock::time_point a, b;
  {
    std::lock_guard lock(s.mutex_);
    a = s.completed_at_;
  }
  {
    std::lock_guard lock(mutex_);
    b = completed_at_;
  }
  return std::chrono::duration<double>(b - a).count();
}

std::uint64_t CpuEvent::begin_record() {
  std::lock_guard lock(mutex_);
  return ++recorded_;
}

void CpuEvent::complete(std::uint64_t generation) {
  {
    std::lock_guard lock(mutex_);
    if (generation > completed_) {
      completed_ = generation;
      completed_at_ = std::chrono::steady_clock::now();
    }
  }
  cv_.notify_all();
}

std::uint64_t CpuEvent::latest_record() {
  std::lock_guard lock(mutex_);
  return recorded_;
}

void CpuEvent::wait_for(std::uint64_t generation) {
  std::unique_lock lock(mutex_);
  cv_.wait(lock, [&] { return completed_ >= generation; });
}

// ---- streams ----

CpuStream::CpuStream(std::string name, int copy_delay_us, double link_bytes_per_s)
    : name_(std::move(name)), copy_delay_us_(copy_delay_us), link_bytes_per_s_(link_bytes_per_s),
      worker_(start_thread(fmt::format("the CPU backend's stream '{}'", name_), [this] { run(); })) {}

CpuStream::~CpuStream() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

std::uint64_t CpuStream::enqueue(std::function<void()> fn, bool control) {
  std::uint64_t seq = 0;
  {
    std::lock_guard lock(mutex_);
    queue_.push_back({std::move(fn), control});
    seq = ++enqueued_;
  }
  cv_.notify_one();
  return seq;
}

void CpuStream::enqueue_kernel(std::function<void()> fn) { enqueue(std::move(fn), false); }

void CpuStream::run() {
  for (;;) {
    Item item;
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop requested and drained
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    bool poisoned;
    {
      std::lock_guard lock(mutex_);
      poisoned = error_ != nullptr;
    }
    // Work (not record/wait) run inside a busy span is timed; see Note [Stream busy time].
    const bool timed = !item.control && !poisoned && worker_span_open_;
    const auto started = timed ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    if (item.control || !poisoned) {
      try {
        item.fn();
      } catch (...) {
        std::lock_guard lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
    const double busy = timed ? std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count() : 0.0;
    {
      std::lock_guard lock(mutex_);
      if (timed) busy_[worker_span_tag_] += busy;
      ++finished_;
    }
    done_cv_.notify_all();
  }
}

void CpuStream::record(Event& event) {
  auto& e = static_cast<CpuEvent&>(event);
  const std::uint64_t gen = e.begin_record();
  enqueue([&e, gen] { e.complete(gen); }, true);
}

void CpuStream::wait(Event& event) {
  auto& e = static_cast<CpuEvent&>(event);
  const std::uint64_t gen = e.latest_record();
  if (gen == 0) return;
  enqueue([&e, gen] { e.wait_for(gen); }, true);
}

// Note [Emulated link]
//   On the CPU backend "host" and "device" share one memory, and a copy is a memcpy at
//   memory speed, so a streamed run is never transfer-bound and the scheduler's overlap
//   cannot be studied here. ZO2_CPU_LINK_GBPS=R (GB/s) makes every host↔device copy take
//   at least bytes / R: the stream's worker copies, then sleeps for the rest — a DMA engine
//   that costs no core, like a GPU's copy engines. The limit is per stream: the scheduler's
//   upload and offload streams are the two directions of the link, each at R; the compute
//   stream's own small copies (losses, logits, hidden states) get a rate of their own, so
//   the emulation is a little optimistic for runs that copy logits back. Device-to-device
//   copies and memsets keep memory speed. Off (unset) by default; the results are the same
//   bytes either way, only the timing changes.
void CpuStream::copy(void* dst, const void* src, std::size_t bytes, bool link) {
  const int delay = copy_delay_us_;
  const double rate = link ? link_bytes_per_s_ : 0.0;
  enqueue_kernel([=] {
    if (delay > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay));
    const auto start = std::chrono::steady_clock::now();
    std::memmove(dst, src, bytes);
    if (rate > 0)
      std::this_thread::sleep_until(start + std::chrono::ceil<std::chrono::steady_clock::duration>(
                                                std::chrono::duration<double>(static_cast<double>(bytes) / rate)));
  });
}
void CpuStream::copy_h2d(void* dst, const void* src, std::size_t bytes) { copy(dst, src, bytes, true); }
void CpuStream::copy_d2h(void* dst, const void* src, std::size_t bytes) { copy(dst, src, bytes, true); }
void CpuStream::copy_d2d(void* dst, const void* src, std::size_t bytes) { copy(dst, src, bytes, false); }
// One task for all rows; host↔device copies take the emulated link's time for their bytes.
void CpuStream::copy_2d(CopyKind kind, void* dst, std::size_t dpitch, const void* src, std::size_t spitch,
                        std::size_t width, std::size_t height) {
  if (width == 0 || height == 0) return;
  const int delay = copy_delay_us_;
  const double rate = kind == CopyKind::d2d ? 0.0 : link_bytes_per_s_;
  enqueue_kernel([=] {
    if (delay > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay));
    const auto start = std::chrono::steady_clock::now();
    for (std::size_t r = 0; r < height; ++r)
      std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
    if (rate > 0)
      std::this_thread::sleep_until(start + std::chrono::ceil<std::chrono::steady_clock::duration>(std::chrono::duration<double>(
                                                static_cast<double>(width * height) / rate)));
  });
}
void CpuStream::memset(void* dst, int value, std::size_t bytes) {
  enqueue_kernel([=] { std::memset(dst, value, bytes); });
}
void CpuStream::launch_host(std::function<void()> fn) { enqueue_kernel(std::move(fn)); }

void CpuStream::begin_busy(std::int64_t tag) {
  {
    std::lock_guard lock(mutex_);
    if (host_span_open_)
      fail(ErrorKind::internal, "stream '{}': begin_busy({}) while the span of tag {} is still open", name_, tag,
           host_span_tag_);
    host_span_open_ = true;
    host_span_tag_ = tag;
  }
  enqueue([this, tag] {
    worker_span_open_ = true;
    worker_span_tag_ = tag;
  }, true);
}

void CpuStream::end_busy() {
  std::int64_t tag = 0;
  {
    std::lock_guard lock(mutex_);
    if (!host_span_open_) fail(ErrorKind::internal, "stream '{}': end_busy() without begin_busy()", name_);
    host_span_open_ = false;
    tag = host_span_tag_;
  }
  const std::uint64_t seq = enqueue([this] { worker_span_open_ = false; }, true);
  std::lock_guard lock(mutex_);
  span_end_[tag] = seq;
}

double CpuStream::take_busy_seconds(std::int64_t tag) {
  std::unique_lock lock(mutex_);
  const auto end = span_end_.find(tag);
  if (end == span_end_.end()) return 0.0;
  const std::uint64_t target = end->second;
  done_cv_.wait(lock, [&] { return finished_ >= target; });
  double seconds = 0.0;
  if (const auto it = busy_.find(tag); it != busy_.end()) {
    seconds = it->second;
    busy_.erase(it);
  }
  span_end_.erase(tag);
  return seconds;
}

void CpuStream::synchronize() {
  std::unique_lock lock(mutex_);
  const std::uint64_t target = enqueued_;
  done_cv_.wait(lock, [&] { return finished_ >= target; });
  if (error_) std::rethrow_exception(error_);
}

void CpuStream::check() {
  std::lock_guard lock(mutex_);
  if (error_) std::rethrow_exception(error_);
}

void enqueue(Stream& stream, std::function<void()> fn) {
  static_cast<CpuStream&>(stream).enqueue_kernel(std::move(fn));
}

void enqueue(Stream& stream, KernelArena& arena, std::function<void()> fn) {
  static_cast<CpuStream&>(stream).enqueue_kernel([&arena, fn = std::move(fn)] { arena.execute(fn); });
}

// ---- kernel threads ----

// Note [Kernel threads]
//   A CPU device's thread count (--threads, a session's n_threads; by default the cores of
//   the affinity mask, or fewer under a cgroup CPU quota: Note [Cgroup limits]) bounds the
//   threads that run its kernels. Where it is below what TBB would use
//   (tbb::info::default_concurrency()), the device makes a tbb::task_arena of that many
//   threads, and every kernel of its ops table (CpuOps) runs inside it: the stream's worker
//   thread joins the arena for the kernel (task_arena::execute), and a kernel's parallel
//   loops get the arena's TBB workers only, at most count − 1 of them. The streams of a
//   device share its arena: its places are the count, and a stream that finds none free
//   waits for one, so the device's kernels, of all its streams together, run on at most that
//   many threads at a time — except that oneTBB gives every arena two places, so with a
//   count of 1 a second stream's kernel may run beside the first (each on one thread; before
//   the arena there was one per stream). Its session's own host-side work — loading,
//   initialising, checking and saving the weights, the CRCs of a save, merge's conversions —
//   runs in the same arena (Device::run_host_parallel), from the calling thread.
//   The arena is the device's alone: TBB work of the host outside zo2's calls (a C API host,
//   numpy or another library in Python) keeps TBB's own parallelism, and two devices of
//   different counts each keep theirs. (It used to be oneTBB's global_control, which is
//   process-wide: it capped every TBB user in the process while a device lived, and the
//   smallest of two devices' caps won for both.) Inside the arena a kernel's thread is
//   isolated (this_task_arena::isolate): while it waits in its own parallel_for it takes no
//   other stream's kernel, as when each stream had an arena of its own. Copies, memsets,
//   host functions (launch_host: value waits, collectives — they block) and records/waits
//   run outside it, on the stream's thread: a blocked one never holds a place kernels need;
//   for the same reason host-side work in the arena never waits for a kernel. At or above
//   TBB's default there is no arena (no cap is needed and nothing changes: a count above the
//   cores never got more threads than the cores from TBB either). Results never depend on
//   it: a kernel's chunks are fixed by the sizes, not by the threads that run them.
KernelArena::KernelArena(int threads) {
#if defined(ZO2_TSAN)
  // The TSan build keeps TBB on the calling thread (runtime/cpu/kernels.cpp); an arena's
  // hand-offs, uninstrumented, would read as races.
  (void)threads;
#else
  if (threads > 0) {
    threads_ = threads;
    arena_ = std::make_unique<tbb::task_arena>(threads);
  }
#endif
}

KernelArena::~KernelArena() = default;

void KernelArena::execute(const std::function<void()>& fn) {
  if (!arena_) {
    fn();
    return;
  }
  arena_->execute([&] { tbb::this_task_arena::isolate(fn); });
}

// ---- device ----

// ZO2_CPU_LINK_GBPS (Note [Emulated link]): 0 when unset or empty.
double emulated_link_bytes_per_s() {
  const char* env = std::getenv("ZO2_CPU_LINK_GBPS");
  if (env == nullptr || *env == '\0') return 0.0;
  double gbps = 0;
  const char* last = env + std::strlen(env);
  const auto [stop, ec] = std::from_chars(env, last, gbps);  // (not strtod: locale-free)
  const char* end = ec == std::errc() ? stop : env;
  // A floor of 1 kB/s: below it a copy's time (bytes / rate) overflows the clock's
  // duration (1e-300 GB/s made it an undefined double → int64 conversion), and no study of
  // the link needs a rate that slow.
  constexpr double kMinGbps = 1e-6;
  if (end == env || *end != '\0' || !(gbps > 0) || !std::isfinite(gbps))
    fail(ErrorKind::invalid_argument, "ZO2_CPU_LINK_GBPS='{}': expected a rate in GB/s above 0 (e.g. 25)", env);
  if (gbps < kMinGbps)
    fail(ErrorKind::invalid_argument, "ZO2_CPU_LINK_GBPS='{}': below the slowest emulated link, {} GB/s (1 kB/s)", env,
         kMinGbps);
  return gbps * 1e9;
}

namespace {

// Note [OpenBLAS's threads]
//   zo2's kernels split their GEMMs across TBB themselves, so OpenBLAS must not start threads
//   of its own while a CPU device lives. Its thread count is process-wide, and a host may use
//   OpenBLAS too (numpy): the first live CPU device saves the host's count and sets 1, the
//   last one destroyed puts the saved count back (it used to stay 1 for good).
class OpenBlasSingleThreaded {
 public:
  OpenBlasSingleThreaded() {
    std::lock_guard lock(mutex());
    if (users()++ == 0) {
      saved() = openblas_get_num_threads();
      openblas_set_num_threads(1);
    }
  }
  ~OpenBlasSingleThreaded() {
    std::lock_guard lock(mutex());
    if (--users() == 0) openblas_set_num_threads(saved());
  }
  OpenBlasSingleThreaded(const OpenBlasSingleThreaded&) = delete;
  OpenBlasSingleThreaded& operator=(const OpenBlasSingleThreaded&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static int& users() {
    static int n = 0;
    return n;
  }
  static int& saved() {
    static int n = 1;
    return n;
  }
};

class CpuDevice final : public Device {
 public:
  explicit CpuDevice(const DeviceOptions& o) {
    threads_ = o.threads > 0 ? o.threads : default_threads();
    copy_delay_us_ = o.debug_copy_delay_us;
    link_bytes_per_s_ = emulated_link_bytes_per_s();
    // Note [Kernel threads]: an arena of threads_ where TBB would use more. A default below
    // TBB's is the cgroup's CPU quota (Note [Cgroup limits]): TBB would still run a thread
    // per CPU of the affinity mask, so the kernels keep to the quota as to --threads.
    const int pool = tbb::info::default_concurrency();
    kernels_ = std::make_unique<KernelArena>(threads_ < pool ? threads_ : 0);
    if (o.threads <= 0 && threads_ < pool) {
      const CgroupCpuQuota quota = cgroup_cpu_quota();
      log_info("cpu device: {} kernel thread{}, not {}: the cgroup's CPU quota ({} us per {} us in {})", threads_,
               threads_ == 1 ? "" : "s", pool, quota.quota_us, quota.period_us, quota.file);
    }
    cap_ = o.mem_cap > 0 ? o.mem_cap : cpu_default_arena_bytes(threads_);
    // Note [Address-space limits] (runtime/device.h): checked before any BLAS call can hang.
    if (const std::size_t headroom = address_space_headroom(); headroom != SIZE_MAX) {
      const std::size_t kernels = kernel_threads_address_space(threads_);
      constexpr std::size_t kLeast = std::size_t{64} << 20;  // a default arena smaller is no use
      if (headroom < kernels + std::max(cap_, kLeast))
        fail(ErrorKind::out_of_memory,
             "cpu device: the process's address-space limit (ulimit -v or -d) leaves {} to map; {} threads run "
             "kernels ({} kernel threads and {} streams), and each needs {} of address space (a 128 MiB BLAS "
             "buffer, a malloc arena, a stack): {}{}: raise the limit{}{}",
             format_bytes(static_cast<double>(headroom)), threads_ + kKernelCallingStreams, threads_,
             kKernelCallingStreams, format_bytes(static_cast<double>(kThreadAddressSpace)),
             format_bytes(static_cast<double>(kernels)),
             o.mem_cap > 0 ? fmt::format(", and the device memory {} more", format_bytes(static_cast<double>(o.mem_cap)))
                           : fmt::format(", and the device memory at least {} more", format_bytes(static_cast<double>(kLeast))),
             threads_ > 1 ? " or use fewer kernel threads (--threads)" : "",
             std::getenv("OPENBLAS_NUM_THREADS") == nullptr
                 ? "; and set OPENBLAS_NUM_THREADS=1, or OpenBLAS's own thread pool takes 128 MiB per core"
                 : "");
      if (o.mem_cap == 0 && cap_ < physical_memory_bytes())
        log_info("cpu device: the address-space limit leaves {}: device memory {} (half of it after the kernel threads' share)",
                 format_bytes(static_cast<double>(headroom)), format_bytes(static_cast<double>(cap_)));
    }
    // Reserve address space only: pages are committed when first touched.
    region_ = mmap(nullptr, std::max<std::size_t>(cap_, 4096), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region_ == MAP_FAILED)
      fail(ErrorKind::out_of_memory, "cpu device: cannot reserve {} of address space",
           format_bytes(static_cast<double>(cap_)));
    arena_ = std::make_unique<Arena>("cpu device memory", region_, cap_);
    ops_ = make_cpu_ops(*kernels_);
  }
  ~CpuDevice() override {
    arena_.reset();
    munmap(region_, std::max<std::size_t>(cap_, 4096));
  }

  DeviceKind kind() const override { return DeviceKind::cpu; }
  // The noise loop is part of the name because it is a third of a CPU step's time
  // (Note [Noise ISA]); logs and bench rows then say which one ran.
  std::string name() const override {
    return fmt::format("cpu ({} threads, {} noise)", threads_, noise_isa_name(noise_isa()));
  }
  Arena& arena() override { return *arena_; }

  std::unique_ptr<Stream> make_stream(std::string_view name) override {
    return std::make_unique<CpuStream>(std::string(name), copy_delay_us_, link_bytes_per_s_);
  }
  std::unique_ptr<Event> make_event() override { return std::make_unique<CpuEvent>(); }
  Ops& ops() override { return *ops_; }
  HostBuffer alloc_host(std::size_t bytes) override { return host_alloc_aligned(bytes); }
  std::size_t driver_used_bytes() override { return arena_->peak(); }
  std::size_t pinned_host_bytes() const override { return 0; }
  void run_host_parallel(const std::function<void()>& fn) override { kernels_->execute(fn); }
  KernelArena& kernel_arena() { return *kernels_; }

 private:
  int threads_ = 1;
  int copy_delay_us_ = 0;
  double link_bytes_per_s_ = 0;  // Note [Emulated link]
  std::size_t cap_ = 0;
  void* region_ = nullptr;
  std::unique_ptr<KernelArena> kernels_;  // Note [Kernel threads]; outlives ops_, which runs in it
  OpenBlasSingleThreaded blas_;  // Note [OpenBLAS's threads]
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<Ops> ops_;
};

}  // namespace

KernelArena& kernel_arena(Device& cpu_device) {
  auto* cpu = dynamic_cast<CpuDevice*>(&cpu_device);
  if (cpu == nullptr) fail(ErrorKind::internal, "kernel_arena: {} is not a CPU device", cpu_device.name());
  return cpu->kernel_arena();
}
}  // namespace zo2::cpu

namespace zo2 {
std::unique_ptr<Device> cpu_make_device(const DeviceOptions& options) {
  return std::make_unique<cpu::CpuDevice>(options);
}
double cpu_emulated_link_bytes_per_s() { return cpu::emulated_link_bytes_per_s(); }
}  // namespace zo2
