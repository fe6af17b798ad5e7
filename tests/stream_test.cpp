// Tests of the CPU backend's streams and events (runtime/device.h, Note [Streams and
// events]; runtime/cpu/cpu_device.h): in-order execution, cross-stream ordering by
// record/wait with CUDA's semantics, host-side event waits and timing, error poisoning
// that never deadlocks another stream, async copies, draining on destruction, and busy-time
// accounting (Note [Stream busy time]).
//
// Ordering is forced with gates (a host_launch that blocks until the test opens it)
// rather than by timing, so a missing wait shows up deterministically. Anything that could
// hang when the backend is wrong runs under a watchdog that fails the process instead.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "runtime/cpu/cpu_device.h"
#include "runtime/device.h"
#include "runtime/error.h"
#include "tests/test_util.h"

namespace zo2 {
namespace {

using namespace std::chrono_literals;

std::unique_ptr<Device> cpu_device(int copy_delay_us = 0) {
  DeviceOptions o;
  o.kind = DeviceKind::cpu;
  o.mem_cap = 64 << 20;
  o.debug_copy_delay_us = copy_delay_us;
  return make_device(o);
}

// A one-shot gate: work that calls wait() blocks until open() is called.
class Gate {
 public:
  void open() {
    {
      std::lock_guard lock(m_);
      open_ = true;
    }
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock lock(m_);
    cv_.wait(lock, [&] { return open_; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool open_ = false;
};

// Runs fn on another thread; if it has not returned within `limit`, the backend
// deadlocked: report and end the process (a hung test would otherwise stall the suite).
void finishes_within(std::chrono::milliseconds limit, const char* what, std::function<void()> fn) {
  auto done = std::make_shared<std::promise<void>>();
  std::future<void> f = done->get_future();
  std::thread([fn = std::move(fn), done] {
    try {
      fn();
      done->set_value();
    } catch (...) {
      done->set_exception(std::current_exception());
    }
  }).detach();
  if (f.wait_for(limit) != std::future_status::ready) {
    std::fprintf(stderr, "FATAL: %s did not finish within %lld ms (deadlock)\n", what,
                 static_cast<long long>(limit.count()));
    std::fflush(stderr);
    std::_Exit(1);
  }
  f.get();  // rethrows what fn threw
}

TEST(CpuStream, WorkOnOneStreamRunsInEnqueueOrder) {
  auto dev = cpu_device();
  auto s = dev->make_stream("compute");
  EXPECT_EQ(s->name(), "compute");
  std::vector<int> order;  // touched only by the stream's worker until synchronize()
  for (int i = 0; i < 500; ++i) {
    if (i % 50 == 0) s->launch_host([] { std::this_thread::sleep_for(1ms); });
    s->launch_host([&order, i] { order.push_back(i); });
  }
  s->synchronize();
  std::vector<int> want(500);
  std::iota(want.begin(), want.end(), 0);
  EXPECT_EQ(order, want);
}

TEST(CpuStream, HostLaunchesAndKernelsInterleaveInStreamOrder) {
  auto dev = cpu_device(/*copy_delay_us=*/20000);
  auto s = dev->make_stream("s");
  DeviceBuffer buf = dev->arena().allocate(4096, "buf");
  std::vector<unsigned char> src(4096, 7), seen_after_copy, seen_after_memset;
  s->copy_h2d(buf.data(), src.data(), src.size());  // sleeps 20 ms first
  s->launch_host([&] {
    auto* p = buf.as<unsigned char>();
    seen_after_copy.assign(p, p + 4096);
  });
  s->memset(buf.data(), 3, 4096);
  cpu::enqueue(*s, [&] {
    auto* p = buf.as<unsigned char>();
    seen_after_memset.assign(p, p + 4096);
  });
  s->synchronize();
  EXPECT_EQ(seen_after_copy, std::vector<unsigned char>(4096, 7));
  EXPECT_EQ(seen_after_memset, std::vector<unsigned char>(4096, 3));
}

TEST(CpuStream, RecordOnOneStreamAndWaitOnAnotherMakesTheWaiterSeeEarlierWrites) {
  auto dev = cpu_device();
  auto a = dev->make_stream("a"), b = dev->make_stream("b");
  auto e = dev->make_event();
  int value = 0;  // plain int: without the event's ordering this is a data race (TSan)
  int seen = -1;
  a->launch_host([&] {
    std::this_thread::sleep_for(50ms);
    value = 42;
  });
  a->record(*e);
  b->wait(*e);
  b->launch_host([&] { seen = value; });
  finishes_within(5000ms, "b.synchronize()", [&] { b->synchronize(); });
  EXPECT_EQ(seen, 42);
  a->synchronize();
}

TEST(CpuStream, WaitHoldsLaterWorkUntilTheRecordedPointIsReached) {
  auto dev = cpu_device();
  auto a = dev->make_stream("a"), b = dev->make_stream("b");
  auto e = dev->make_event();
  Gate gate;
  std::atomic<bool> b_ran{false};
  a->launch_host([&] { gate.wait(); });
  a->record(*e);
  b->wait(*e);
  b->launch_host([&] { b_ran = true; });
  std::this_thread::sleep_for(30ms);
  EXPECT_FALSE(b_ran.load()) << "b ran before a reached the recorded point";
  EXPECT_FALSE(e->query());
  gate.open();
  finishes_within(5000ms, "b.synchronize()", [&] { b->synchronize(); });
  EXPECT_TRUE(b_ran.load());
  EXPECT_TRUE(e->query());
  a->synchronize();
}

TEST(CpuStream, WaitingOnAnEventNeverRecordedDoesNotBlock) {
  auto dev = cpu_device();
  auto s = dev->make_stream("s");
  auto e = dev->make_event();
  bool ran = false;
  s->wait(*e);
  s->launch_host([&] { ran = true; });
  finishes_within(5000ms, "synchronize after waiting on an unrecorded event",
                  [&] { s->synchronize(); });
  EXPECT_TRUE(ran);
  EXPECT_TRUE(e->query()) << "an event never recorded counts as complete";
  finishes_within(5000ms, "synchronize on an unrecorded event", [&] { e->synchronize(); });
}

TEST(CpuStream, WaitRefersToTheMostRecentRecordBeforeTheWaitCallNotALaterOne) {
  auto dev = cpu_device();
  auto a = dev->make_stream("a"), b = dev->make_stream("b");
  auto e = dev->make_event();
  Gate first, second;
  std::atomic<bool> b_ran{false};
  a->launch_host([&] { first.wait(); });
  a->record(*e);  // record #1
  b->wait(*e);    // refers to record #1
  a->launch_host([&] { second.wait(); });
  a->record(*e);  // record #2, made after the wait: must not delay b
  b->launch_host([&] { b_ran = true; });
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(b_ran.load());
  first.open();
  // b must finish while record #2 is still blocked behind the closed second gate.
  finishes_within(5000ms, "b waiting on record #1 while record #2 is pending",
                  [&] { b->synchronize(); });
  EXPECT_TRUE(b_ran.load());
  EXPECT_FALSE(e->query()) << "record #2 has not completed yet";
  second.open();
  a->synchronize();
  EXPECT_TRUE(e->query());
}

TEST(CpuStream, WaitMadeAfterASecondRecordWaitsForThatSecondRecord) {
  auto dev = cpu_device();
  auto a = dev->make_stream("a"), b = dev->make_stream("b");
  auto e = dev->make_event();
  Gate first, second;
  std::atomic<bool> b_ran{false};
  a->launch_host([&] { first.wait(); });
  a->record(*e);
  a->launch_host([&] { second.wait(); });
  a->record(*e);
  b->wait(*e);  // the most recent record is #2
  b->launch_host([&] { b_ran = true; });
  first.open();
  std::this_thread::sleep_for(30ms);
  EXPECT_FALSE(b_ran.load()) << "b only waited for record #1";
  second.open();
  finishes_within(5000ms, "b.synchronize()", [&] { b->synchronize(); });
  EXPECT_TRUE(b_ran.load());
  a->synchronize();
}

TEST(CpuEvent, SynchronizeBlocksTheHostUntilTheRecordedWorkHasRun) {
  auto dev = cpu_device();
  auto s = dev->make_stream("s");
  auto e = dev->make_event();
  Gate gate;
  int value = 0;
  s->launch_host([&] {
    gate.wait();
    std::this_thread::sleep_for(20ms);
    value = 7;
  });
  s->record(*e);
  EXPECT_FALSE(e->query());
  gate.open();
  finishes_within(5000ms, "event synchronize", [&] { e->synchronize(); });
  EXPECT_EQ(value, 7);
  EXPECT_TRUE(e->query());
  s->synchronize();
}

TEST(CpuEvent, SecondsSinceAcrossASleepIsAtLeastTheSleep) {
  auto dev = cpu_device();
  auto s = dev->make_stream("s");
  auto start = dev->make_event(), stop = dev->make_event();
  s->record(*start);
  s->launch_host([] { std::this_thread::sleep_for(60ms); });
  s->record(*stop);
  stop->synchronize();
  const double dt = stop->seconds_since(*start);
  EXPECT_GE(dt, 0.060);
  EXPECT_LT(dt, 5.0);
}

TEST(CpuStream, AThrowingKernelPoisonsTheStreamButItsRecordsStillRun) {
  auto dev = cpu_device();
  auto s = dev->make_stream("bad"), other = dev->make_stream("other");
  auto e = dev->make_event();
  bool later_ran = false, other_ran = false;
  std::vector<unsigned char> host(256, 1);
  s->launch_host([] { throw std::runtime_error("kernel failed: boom"); });
  s->launch_host([&] { later_ran = true; });
  s->memset(host.data(), 9, host.size());
  s->record(*e);
  other->wait(*e);
  other->launch_host([&] { other_ran = true; });
  finishes_within(5000ms, "a stream waiting on a poisoned stream's event",
                  [&] { other->synchronize(); });
  EXPECT_TRUE(other_ran);
  EXPECT_TRUE(e->query());

  auto expect_boom = [&](const char* call, const std::function<void()>& fn) {
    try {
      fn();
      ADD_FAILURE() << call << " did not rethrow the kernel's error";
    } catch (const std::runtime_error& err) {
      EXPECT_STREQ(err.what(), "kernel failed: boom") << call;
    }
  };
  expect_boom("synchronize()", [&] { s->synchronize(); });
  expect_boom("check()", [&] { s->check(); });
  expect_boom("a second synchronize()", [&] { s->synchronize(); });
  EXPECT_FALSE(later_ran) << "a kernel after the failure ran";
  EXPECT_EQ(host, std::vector<unsigned char>(256, 1)) << "a memset after the failure ran";

  // Work enqueued after the failure is skipped too, but records keep completing.
  auto e2 = dev->make_event();
  s->launch_host([&] { later_ran = true; });
  s->record(*e2);
  finishes_within(5000ms, "event on a poisoned stream", [&] { e2->synchronize(); });
  expect_boom("synchronize() after more work", [&] { s->synchronize(); });
  EXPECT_FALSE(later_ran);
  // The other stream is unaffected.
  EXPECT_NO_THROW(other->check());
  EXPECT_NO_THROW(other->synchronize());
}

TEST(CpuStream, CheckDoesNotThrowOnAHealthyStream) {
  auto dev = cpu_device();
  auto s = dev->make_stream("s");
  s->launch_host([] {});
  s->synchronize();
  EXPECT_NO_THROW(s->check());
}

TEST(CpuStream, AsyncCopiesAndMemsetProduceTheRightBytes) {
  auto dev = cpu_device();
  auto s = dev->make_stream("copy");
  constexpr std::size_t n = 1 << 20;
  std::vector<unsigned char> src(n), back(n, 0);
  for (std::size_t i = 0; i < n; ++i) src[i] = static_cast<unsigned char>((i * 131 + 17) >> 3);
  DeviceBuffer d1 = dev->arena().allocate(n, "d1"), d2 = dev->arena().allocate(n, "d2");
  // No host synchronization between the steps: stream order alone must sequence them.
  s->copy_h2d(d1.data(), src.data(), n);
  s->copy_d2d(d2.data(), d1.data(), n);
  s->memset(static_cast<unsigned char*>(d2.data()) + 1000, 0xab, 5000);
  s->copy_d2h(back.data(), d2.data(), n);
  s->synchronize();
  std::vector<unsigned char> want = src;
  std::memset(want.data() + 1000, 0xab, 5000);
  EXPECT_EQ(back, want);
  std::vector<unsigned char> back1(n);
  s->copy_d2h(back1.data(), d1.data(), n);
  s->synchronize();
  EXPECT_EQ(back1, src) << "the d2d copy changed its source";
}

// Note [Emulated link] (runtime/cpu/cpu_device.cpp): ZO2_CPU_LINK_GBPS makes host↔device
// copies take at least bytes / rate (the same bytes), device-to-device copies not; a bad
// value is refused by name when the device opens.
TEST(CpuStream, AnEmulatedLinkMakesHostDeviceCopiesTakeBytesOverTheRate) {
  // A slow link against a small copy: the device-to-device copy (a memcpy) must stay far
  // below the link's floor even under TSan's instrumented memcpy (4 MiB at 0.05 GB/s left
  // 84 ms, which a TSan d2d copy of 87 ms crossed in CI).
  constexpr std::size_t n = 1 << 20;
  std::vector<unsigned char> src(n), back(n, 0);
  for (std::size_t i = 0; i < n; ++i) src[i] = static_cast<unsigned char>(i * 7 + 1);
  std::unique_ptr<Device> dev;
  {
    test::ScopedEnv link("ZO2_CPU_LINK_GBPS", "0.005");  // 1 MiB at 0.005 GB/s: 210 ms
    dev = cpu_device();
  }
  auto s = dev->make_stream("link");
  DeviceBuffer d1 = dev->arena().allocate(n, "d1"), d2 = dev->arena().allocate(n, "d2");
  auto e0 = dev->make_event(), e1 = dev->make_event(), e2 = dev->make_event(), e3 = dev->make_event();
  s->record(*e0);
  s->copy_h2d(d1.data(), src.data(), n);
  s->record(*e1);
  s->copy_d2d(d2.data(), d1.data(), n);
  s->record(*e2);
  s->copy_d2h(back.data(), d2.data(), n);
  s->record(*e3);
  s->synchronize();
  EXPECT_EQ(back, src);
  const double floor = static_cast<double>(n) / 0.005e9;
  EXPECT_GE(e1->seconds_since(*e0), floor) << "host to device";
  EXPECT_GE(e3->seconds_since(*e2), floor) << "device to host";
  EXPECT_LT(e2->seconds_since(*e1), floor) << "a device-to-device copy is not on the link";
  for (const char* bad : {"fast", "0", "-3", "1e999", "12GB"}) {
    test::ScopedEnv link("ZO2_CPU_LINK_GBPS", bad);
    try {
      cpu_device();
      ADD_FAILURE() << "ZO2_CPU_LINK_GBPS=" << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
      EXPECT_NE(std::string(e.what()).find(std::string("ZO2_CPU_LINK_GBPS='") + bad + "'"), std::string::npos) << e.what();
    }
  }
}

TEST(CpuStream, DelayedUploadOnOneStreamIsSeenByComputeWaitingOnItsEvent) {
  // The scheduler's pattern (DESIGN.md §6): H2D copies, records "uploaded", compute waits.
  auto dev = cpu_device(/*copy_delay_us=*/30000);
  auto h2d = dev->make_stream("h2d"), compute = dev->make_stream("compute");
  auto uploaded = dev->make_event();
  std::vector<float> host(1024);
  std::iota(host.begin(), host.end(), 1.0f);
  DeviceBuffer slot = dev->arena().allocate(host.size() * sizeof(float), "slot");
  compute->memset(slot.data(), 0, slot.bytes());
  compute->synchronize();
  h2d->copy_h2d(slot.data(), host.data(), host.size() * sizeof(float));
  h2d->record(*uploaded);
  compute->wait(*uploaded);
  double sum = -1;
  compute->launch_host([&] {
    const float* p = slot.as<float>();
    sum = std::accumulate(p, p + 1024, 0.0);
  });
  finishes_within(5000ms, "compute.synchronize()", [&] { compute->synchronize(); });
  EXPECT_EQ(sum, 1024.0 * 1025.0 / 2);
  h2d->synchronize();
}

TEST(CpuStream, DestroyingAStreamWithPendingWorkFinishesThatWorkFirst) {
  auto dev = cpu_device(/*copy_delay_us=*/5000);
  std::atomic<int> done{0};
  std::vector<unsigned char> src(64, 5), dst(64, 0);
  {
    auto s = dev->make_stream("doomed");
    for (int i = 0; i < 10; ++i)
      s->launch_host([&] {
        std::this_thread::sleep_for(5ms);
        ++done;
      });
    s->copy_h2d(dst.data(), src.data(), src.size());
    finishes_within(10000ms, "stream destructor", [&] { s.reset(); });
  }
  EXPECT_EQ(done.load(), 10);
  EXPECT_EQ(dst, src);
}

// ---- busy time (Note [Stream busy time]) ----
// Sanity bounds only: the work's known duration below, the wall time around it above.

TEST(CpuStream, BusyTimeCountsTheSpansWorkButNotTheTimeTheStreamSitsIdle) {
  auto dev = cpu_device();
  auto s = dev->make_stream("timed");
  const auto t0 = std::chrono::steady_clock::now();
  s->begin_busy(1);
  s->launch_host([] { std::this_thread::sleep_for(40ms); });
  s->end_busy();
  s->synchronize();
  // The stream has nothing to do for 100 ms: not busy.
  const auto idle0 = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(100ms);
  const double idle = std::chrono::duration<double>(std::chrono::steady_clock::now() - idle0).count();
  s->begin_busy(1);
  s->launch_host([] { std::this_thread::sleep_for(20ms); });
  s->end_busy();
  double busy = -1;
  finishes_within(5000ms, "take_busy_seconds", [&] { busy = s->take_busy_seconds(1); });  // waits for the span
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(busy, 0.060);
  EXPECT_LE(busy, wall - idle + 1e-3);
  EXPECT_EQ(s->take_busy_seconds(1), 0.0) << "a tag is forgotten once taken";
}

TEST(CpuStream, AnEmptySpanAnUnknownTagAndWorkOutsideSpansReadZero) {
  auto dev = cpu_device();
  auto s = dev->make_stream("idle");
  EXPECT_EQ(s->take_busy_seconds(7), 0.0);
  s->launch_host([] { std::this_thread::sleep_for(30ms); });  // not in a span
  s->begin_busy(7);
  s->end_busy();
  s->launch_host([] { std::this_thread::sleep_for(30ms); });  // not in a span either
  EXPECT_LT(s->take_busy_seconds(7), 1e-3);
  s->synchronize();
}

TEST(CpuStream, BusyTimeIsKeptPerTagAndNeverCountsAnotherStreamsWork) {
  auto dev = cpu_device();
  auto a = dev->make_stream("a"), b = dev->make_stream("b");
  auto e = dev->make_event();
  a->begin_busy(3);
  a->launch_host([] { std::this_thread::sleep_for(60ms); });
  a->end_busy();
  a->record(*e);
  // b waits for a's 60 ms (outside its spans, as the scheduler opens spans after waits),
  // then does almost nothing: its spans read far less than a's.
  b->wait(*e);
  b->begin_busy(3);
  b->launch_host([] {});
  b->end_busy();
  a->begin_busy(4);
  a->launch_host([] { std::this_thread::sleep_for(10ms); });
  a->end_busy();
  double a3 = -1, a4 = -1, b3 = -1;
  finishes_within(5000ms, "take_busy_seconds", [&] {
    b3 = b->take_busy_seconds(3);
    a4 = a->take_busy_seconds(4);
    a3 = a->take_busy_seconds(3);
  });
  EXPECT_GE(a3, 0.060);
  EXPECT_GE(a4, 0.010);
  EXPECT_LT(a4, a3);
  EXPECT_GE(b3, 0.0);
  EXPECT_LT(b3, 0.030);
}

TEST(CpuStream, BusySpansDoNotNest) {
  auto dev = cpu_device();
  auto s = dev->make_stream("s");
  EXPECT_THROW(s->end_busy(), Error);
  s->begin_busy(1);
  EXPECT_THROW(s->begin_busy(2), Error);
  s->end_busy();
  s->synchronize();
}

}  // namespace
}  // namespace zo2
