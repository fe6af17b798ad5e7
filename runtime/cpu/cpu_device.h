// The CPU backend's device, streams and events. A CpuStream is a worker thread draining
// an in-order queue; kernels it runs use oneTBB for data parallelism inside one op.
// See Note [Streams and events] in runtime/device.h.
#pragma once
#include "runtime/device.h"

#include <oneapi/tbb/task_arena.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

namespace zo2::cpu {

// Where a CPU device's kernels run (Note [Kernel threads], cpu_device.cpp): a TBB arena of
// the device's thread count when that is below what TBB would use, else the calling
// thread's own arena, as any TBB code's.
class KernelArena {
 public:
  // threads > 0: an arena of that many threads (TBB workers for fn's loops: threads − 1;
  // places for callers at once: threads, at least 2); 0: none (fn runs where it is called).
  explicit KernelArena(int threads);
  ~KernelArena();
  KernelArena(const KernelArena&) = delete;
  KernelArena& operator=(const KernelArena&) = delete;
  // Runs fn on the calling thread inside the arena (joining it, or waiting for a free place
  // in it): TBB algorithms in fn use the arena's threads only, and the calling thread takes
  // no other work of the arena's while it waits inside fn (isolated). Several threads may
  // call it at once; a call from inside the arena runs fn at once. Rethrows what fn throws.
  void execute(const std::function<void()>& fn);
  // The arena's threads; 0 when there is none.
  int threads() const { return threads_; }

 private:
  int threads_ = 0;
  std::unique_ptr<tbb::task_arena> arena_;
};

class CpuEvent final : public Event {
 public:
  void synchronize() override;
  bool query() override;
  double seconds_since(Event& start) override;

  // Called by CpuStream: reserve the generation a record() will complete, and complete it.
  std::uint64_t begin_record();
  void complete(std::uint64_t generation);
  // The generation a wait() made now must wait for.
  std::uint64_t latest_record();
  void wait_for(std::uint64_t generation);

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::uint64_t recorded_ = 0;
  std::uint64_t completed_ = 0;
  std::chrono::steady_clock::time_point completed_at_{};
};

class CpuStream final : public Stream {
 public:
  // copy_delay_us: tests only, every async copy first sleeps this long. link_bytes_per_s
  // (> 0): host↔device copies take at least bytes / this (Note [Emulated link]).
  explicit CpuStream(std::string name, int copy_delay_us = 0, double link_bytes_per_s = 0);
  ~CpuStream() override;

  void record(Event& event) override;
  void wait(Event& event) override;
  void copy_h2d(void* dst, const void* src, std::size_t bytes) override;
  void copy_d2h(void* dst, const void* src, std::size_t bytes) override;
  void copy_d2d(void* dst, const void* src, std::size_t bytes) override;
  void copy_2d(CopyKind kind, void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
               std::size_t height) override;
  void memset(void* dst, int value, std::size_t bytes) override;
  void launch_host(std::function<void()> fn) override;
  void synchronize() override;
  void check() override;
  const std::string& name() const override { return name_; }
  void begin_busy(std::int64_t tag) override;
  void end_busy() override;
  double take_busy_seconds(std::int64_t tag) override;

  // Enqueues a kernel. After a kernel throws, later kernels of this stream are skipped
  // (the stream is poisoned, like a CUDA context after a fault) but records and waits
  // still run, so other streams never deadlock; synchronize() rethrows the first error.
  void enqueue_kernel(std::function<void()> fn);

 private:
  struct Item {
    std::function<void()> fn;
    bool control;  // record/wait: runs even after an error
  };
  // Returns the item's sequence number (finished_ reaches it once the item has run).
  std::uint64_t enqueue(std::function<void()> fn, bool control);
  void run();

  void copy(void* dst, const void* src, std::size_t bytes, bool link);

  std::string name_;
  int copy_delay_us_ = 0;
  double link_bytes_per_s_ = 0;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  std::deque<Item> queue_;
  std::uint64_t enqueued_ = 0;
  std::uint64_t finished_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  // Busy-time spans (Note [Stream busy time]). Under mutex_: the host side's open span,
  // the sequence number of each tag's last end_busy() item, and the seconds counted per
  // tag. worker_span_* are touched by the worker thread only (set by control items).
  bool host_span_open_ = false;
  std::int64_t host_span_tag_ = 0;
  std::map<std::int64_t, std::uint64_t> span_end_;
  std::map<std::int64_t, double> busy_;
  bool worker_span_open_ = false;
  std::int64_t worker_span_tag_ = 0;
  std::thread worker_;
};

// Enqueue a kernel on a stream that must be a CpuStream; with `arena`, the kernel runs
// inside it (as CpuOps runs every kernel: Note [Kernel threads]).
void enqueue(Stream& stream, std::function<void()> fn);
void enqueue(Stream& stream, KernelArena& arena, std::function<void()> fn);

// The kernel arena of a device that must be a CPU device.
KernelArena& kernel_arena(Device& cpu_device);

}  // namespace zo2::cpu
