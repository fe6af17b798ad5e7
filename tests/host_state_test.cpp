// What a session leaves behind in the host's process: process-wide settings zo2 changes while
// it runs must be the host's own again once it is gone (pass 68: a host that uses OpenBLAS
// itself, numpy say, stayed single-threaded for good after its first zo2 session).
#include "runtime/cpu/cpu_device.h"
#include "runtime/device.h"
#include "runtime/error.h"
#include "runtime/ops.h"
#include "tools/cli.h"

#include <gtest/gtest.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/info.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/task_arena.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <latch>
#include <thread>
#include <vector>

extern "C" int openblas_get_num_threads(void);
extern "C" void openblas_set_num_threads(int);

namespace zo2 {
namespace {

// Note [OpenBLAS's threads] (runtime/cpu/cpu_device.cpp).
TEST(HostState, OpenBlasThreadCountIsTheHostsAgainAfterTheLastCpuDevice) {
  openblas_set_num_threads(2);
  const int host = openblas_get_num_threads();
  if (host < 2) GTEST_SKIP() << "this OpenBLAS runs one thread at most here (" << host << ")";
  DeviceOptions o;
  o.kind = DeviceKind::cpu;
  o.mem_cap = std::size_t{16} << 20;
  {
    const auto first = make_device(o);
    EXPECT_EQ(openblas_get_num_threads(), 1) << "zo2's kernels split GEMMs across TBB; OpenBLAS must not";
    {
      const auto second = make_device(o);
      EXPECT_EQ(openblas_get_num_threads(), 1);
    }
    EXPECT_EQ(openblas_get_num_threads(), 1) << "the first device still lives";
  }
  EXPECT_EQ(openblas_get_num_threads(), host);
  // A device that fails to start (its memory cap beyond the address space) gives it back too.
  o.mem_cap = std::size_t{1} << 62;
  EXPECT_ANY_THROW(make_device(o));
  EXPECT_EQ(openblas_get_num_threads(), host);
}

// How many of a parallel_for's tasks run at once on the calling thread's arena, up to 2: each
// of two tasks waits (at most `wait`) for the other to start. 1 when TBB gives the loop one
// thread.
int concurrent_tasks_seen(std::chrono::milliseconds wait) {
  std::atomic<int> running{0}, most{0};
  tbb::parallel_for(
      0, 2,
      [&](int) {
        const int now = ++running;
        int seen = most.load();
        while (seen < now && !most.compare_exchange_weak(seen, now)) {}
        const auto deadline = std::chrono::steady_clock::now() + wait;
        while (most.load() < 2 && std::chrono::steady_clock::now() < deadline)
          std::this_thread::sleep_for(std::chrono::microseconds(200));
        --running;
      },
      tbb::simple_partitioner());
  return most.load();
}

// Note [Kernel threads] (runtime/cpu/cpu_device.cpp): a CPU device's thread count is its
// kernels' (a TBB arena of its own), never the host's. It used to be oneTBB's global_control,
// which capped every TBB user in the process, the host's own parallel_for included, while a
// session of n_threads 1 lived.
TEST(HostState, ACpuDeviceOfOneThreadLeavesTheHostsTbbUncapped) {
#if defined(ZO2_TSAN)
  GTEST_SKIP() << "the TSan build caps TBB at one thread itself (runtime/cpu/kernels.cpp)";
#endif
  const int cores = tbb::info::default_concurrency();
  DeviceOptions o;
  o.kind = DeviceKind::cpu;
  o.mem_cap = std::size_t{16} << 20;
  o.threads = 1;
  const auto dev = make_device(o);
  EXPECT_GE(tbb::global_control::active_value(tbb::global_control::max_allowed_parallelism),
            static_cast<std::size_t>(cores));
  EXPECT_EQ(tbb::this_task_arena::max_concurrency(), cores);
  if (cores < 2) GTEST_SKIP() << "one CPU: the host's parallel_for runs one task at a time anyway";
  EXPECT_EQ(concurrent_tasks_seen(std::chrono::seconds(5)), 2)
      << "the host's parallel_for ran on one thread while a device of one thread lived";
}

// Note [zo2-tune's threads] (tools/cli.h): zo2-tune caps the process's TBB at its --threads
// (its host-side work: tokenizing, checksums, init); nothing else that links the CLI does
// (Python's in-process zo2.train), and the cap goes with the scope.
TEST(HostState, ZoTunesThreadCapHoldsOnlyWhileItsScopeLives) {
#if defined(ZO2_TSAN)
  GTEST_SKIP() << "the TSan build caps TBB at one thread itself (runtime/cpu/kernels.cpp)";
#endif
  const int cores = tbb::info::default_concurrency();
  if (cores < 2) GTEST_SKIP() << "one CPU: nothing to cap";
  const auto allowed = [] { return tbb::global_control::active_value(tbb::global_control::max_allowed_parallelism); };
  const std::size_t uncapped = allowed();
  cli::cap_host_threads(1);  // no scope (a library's train): nothing
  EXPECT_EQ(allowed(), uncapped);
  EXPECT_EQ(concurrent_tasks_seen(std::chrono::seconds(5)), 2);
  {
    const cli::HostThreadsScope scope;
    cli::cap_host_threads(1);
    EXPECT_EQ(allowed(), 1u);
    EXPECT_EQ(concurrent_tasks_seen(std::chrono::milliseconds(300)), 1) << "a parallel_for ran on two threads";
    cli::cap_host_threads(cores);  // replaces the cap (two would give the smaller): none at TBB's own count
    EXPECT_EQ(allowed(), uncapped);
    EXPECT_EQ(concurrent_tasks_seen(std::chrono::seconds(5)), 2);
    cli::cap_host_threads(1);
    EXPECT_EQ(allowed(), 1u);
  }
  EXPECT_EQ(allowed(), uncapped) << "the cap outlived zo2-tune's scope";
  EXPECT_EQ(concurrent_tasks_seen(std::chrono::seconds(5)), 2);
}

std::unique_ptr<Device> cpu_device(int threads) {
  DeviceOptions o;
  o.kind = DeviceKind::cpu;
  o.mem_cap = std::size_t{16} << 20;
  o.threads = threads;
  return make_device(o);
}

// What a kernel of `dev` sees of TBB, run on a stream of it as CpuOps runs kernels.
struct KernelView {
  int max_concurrency = 0;
  int concurrent_tasks = 0;
};
KernelView kernel_view(Device& dev, std::chrono::milliseconds wait) {
  KernelView v;
  const auto s = dev.make_stream("compute");
  cpu::enqueue(*s, cpu::kernel_arena(dev), [&] {
    v.max_concurrency = tbb::this_task_arena::max_concurrency();
    v.concurrent_tasks = concurrent_tasks_seen(wait);
  });
  s->synchronize();
  return v;
}

#if defined(ZO2_TSAN)
#define SKIP_UNDER_TSAN() GTEST_SKIP() << "the TSan build runs kernels on the calling thread, in no arena"
#else
#define SKIP_UNDER_TSAN() (void)0
#endif

// Note [Kernel threads]: --threads 1 is one thread for the kernels, whatever the host has.
TEST(CpuKernelThreads, AOneThreadDevicesKernelsAndHostWorkRunInAnArenaOfOne) {
  SKIP_UNDER_TSAN();
  const int cores = tbb::info::default_concurrency();
  if (cores < 2) GTEST_SKIP() << "one CPU: every arena is of one";
  const auto dev = cpu_device(1);
  EXPECT_EQ(cpu::kernel_arena(*dev).threads(), 1);
  const KernelView v = kernel_view(*dev, std::chrono::milliseconds(300));
  EXPECT_EQ(v.max_concurrency, 1);
  EXPECT_EQ(v.concurrent_tasks, 1) << "a kernel's parallel_for ran on two threads at once";
  int host_work = 0;
  dev->run_host_parallel([&] { host_work = tbb::this_task_arena::max_concurrency(); });
  EXPECT_EQ(host_work, 1);
  EXPECT_EQ(tbb::this_task_arena::max_concurrency(), cores) << "outside the device's calls";
}

// Two sessions of different thread counts at once: each its own (global_control's smallest
// cap used to win for both, and for the host).
TEST(CpuKernelThreads, TwoDevicesOfOneAndTwoThreadsEachKeepTheirOwn) {
  SKIP_UNDER_TSAN();
  const int cores = tbb::info::default_concurrency();
  if (cores < 2) GTEST_SKIP() << "one CPU: every arena is of one";
  const auto one = cpu_device(1);
  const auto two = cpu_device(2);
  const KernelView v2 = kernel_view(*two, std::chrono::seconds(5));
  EXPECT_EQ(v2.max_concurrency, 2);
  EXPECT_EQ(v2.concurrent_tasks, 2) << "the device of two threads got one while a device of one lived";
  const KernelView v1 = kernel_view(*one, std::chrono::milliseconds(300));
  EXPECT_EQ(v1.max_concurrency, 1);
  EXPECT_EQ(v1.concurrent_tasks, 1);
  EXPECT_EQ(concurrent_tasks_seen(std::chrono::seconds(5)), 2) << "the host's own parallel_for";
}

// A device that needs no cap (its threads at or above TBB's own) makes no arena: its kernels
// run as any TBB code does (nothing changed there).
TEST(CpuKernelThreads, ADeviceOfAllTheCoresMakesNoArena) {
  const int cores = tbb::info::default_concurrency();
  const auto dev = cpu_device(cores);
  EXPECT_EQ(cpu::kernel_arena(*dev).threads(), 0);
  EXPECT_EQ(kernel_view(*dev, std::chrono::milliseconds(0)).max_concurrency, cores);
}

// The ops table runs its kernels in the arena: while its places are all held (by host work
// here: oneTBB gives an arena of one two places), a kernel of a one-thread device waits; it
// runs once one is free.
TEST(CpuKernelThreads, OpsKernelsWaitForAPlaceInTheDevicesArena) {
  SKIP_UNDER_TSAN();
  if (tbb::info::default_concurrency() < 2) GTEST_SKIP() << "one CPU: no arena is made";
  const auto dev = cpu_device(1);
  const auto s = dev->make_stream("compute");
  const auto done = dev->make_event();
  std::vector<float> x(64, 2.0f);
  constexpr int kPlaces = 2;
  std::latch holding(kPlaces), release(1);
  std::vector<std::thread> hosts;
  for (int i = 0; i < kPlaces; ++i)
    hosts.emplace_back([&] {
      dev->run_host_parallel([&] {
        holding.count_down();
        release.wait();
      });
    });
  holding.wait();
  dev->ops().scale(*s, Mat::dense(x.data(), DType::f32, 8, 8), 3.0f);
  s->record(*done);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(done->query()) << "the kernel ran while the arena's places were held";
  release.count_down();
  for (std::thread& t : hosts) t.join();
  s->synchronize();
  EXPECT_TRUE(done->query());
  EXPECT_EQ(x[0], 6.0f);
  EXPECT_EQ(x[63], 6.0f);
}

// A kernel's error comes out of the arena as it was thrown: the stream is poisoned with it.
TEST(CpuKernelThreads, AKernelsErrorLeavesTheArenaAsItWasThrown) {
  const auto dev = cpu_device(1);
  const auto s = dev->make_stream("compute");
  cpu::enqueue(*s, cpu::kernel_arena(*dev), [] { fail(ErrorKind::unsupported, "a kernel failed on purpose"); });
  try {
    s->synchronize();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::unsupported);
    EXPECT_NE(std::string(e.what()).find("on purpose"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace zo2
