// Tests of the capped device arena (runtime/arena.h) on its own and as the CPU device's
// memory: alignment, the hard cap and its error message, peak tracking, best-fit placement
// with coalescing, DeviceBuffer ownership, and the byte-size parser and formatter.
#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "runtime/arena.h"
#include "runtime/common.h"
#include "runtime/device.h"
#include "runtime/error.h"

namespace zo2 {
namespace {

constexpr std::size_t KiB = 1024, MiB = 1024 * 1024, GiB = 1024 * MiB;

// An arena over plain aligned host memory, so offsets can be checked exactly.
struct TestArena {
  explicit TestArena(std::size_t capacity, std::string name = "test arena")
      : memory(host_alloc_aligned(capacity)), arena(std::move(name), memory.data(), capacity) {}
  std::size_t offset(const DeviceBuffer& b) const {
    return static_cast<std::size_t>(static_cast<std::byte*>(b.data()) - memory.as<std::byte>());
  }
  HostBuffer memory;
  Arena arena;
};

std::unique_ptr<Device> cpu_device(std::size_t cap) {
  DeviceOptions o;
  o.kind = DeviceKind::cpu;
  o.mem_cap = cap;
  return make_device(o);
}

using test::error_of;

TEST(Arena, AllocationsAreAlignedTo256BytesAndRoundedUp) {
  auto dev = cpu_device(4 * MiB);
  Arena& a = dev->arena();
  std::vector<DeviceBuffer> bufs;
  std::size_t expected_in_use = 0;
  for (std::size_t n : {std::size_t{1}, std::size_t{255}, std::size_t{256}, std::size_t{257},
                        std::size_t{1000}, std::size_t{4096}, std::size_t{12345}}) {
    bufs.push_back(a.allocate(n, "aligned"));
    const DeviceBuffer& b = bufs.back();
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b.data()) % 256, 0u) << n << " bytes";
    EXPECT_EQ(b.bytes(), (n + 255) / 256 * 256) << n << " bytes";
    expected_in_use += b.bytes();
    EXPECT_EQ(a.in_use(), expected_in_use);
  }
  // A zero-byte request still gets a distinct, non-null block.
  DeviceBuffer z = a.allocate(0, "empty");
  EXPECT_TRUE(z);
  EXPECT_EQ(z.bytes(), 256u);
  EXPECT_EQ(a.live_allocations(), bufs.size() + 1);
}

TEST(Arena, AllocationBeyondTheCapFailsNamingArenaCapRequestAndWhat) {
  auto dev = cpu_device(1 * MiB);
  Arena& a = dev->arena();
  EXPECT_EQ(a.capacity(), 1 * MiB);
  const Error e = error_of([&] { (void)a.allocate(2 * MiB, "attention scratch"); });
  EXPECT_EQ(e.kind(), ErrorKind::out_of_memory);
  const std::string msg = e.what();
  EXPECT_NE(msg.find(a.name()), std::string::npos) << msg;
  EXPECT_NE(msg.find("cpu device memory"), std::string::npos) << msg;
  EXPECT_NE(msg.find("1.00 MiB"), std::string::npos) << "cap: " << msg;
  EXPECT_NE(msg.find("2.00 MiB"), std::string::npos) << "request: " << msg;
  EXPECT_NE(msg.find("attention scratch"), std::string::npos) << msg;
  EXPECT_EQ(a.in_use(), 0u);
  EXPECT_EQ(a.live_allocations(), 0u);
}

TEST(Arena, RequestThatFitsTheCapButNotTheFreeSpaceFailsNamingUseAndLargestFreeBlock) {
  TestArena t(1 * MiB, "slots");
  Arena& a = t.arena;
  DeviceBuffer used = a.allocate(768 * KiB, "block 0");
  const Error e = error_of([&] { (void)a.allocate(512 * KiB, "block 1"); });
  EXPECT_EQ(e.kind(), ErrorKind::out_of_memory);
  const std::string msg = e.what();
  EXPECT_NE(msg.find("slots"), std::string::npos) << msg;
  EXPECT_NE(msg.find("512.00 KiB"), std::string::npos) << msg;
  EXPECT_NE(msg.find("block 1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("768.00 KiB in use"), std::string::npos) << msg;
  EXPECT_NE(msg.find("largest free block 256.00 KiB"), std::string::npos) << msg;
  // The failure changed nothing: the remaining 256 KiB can still be allocated exactly.
  EXPECT_EQ(a.in_use(), 768 * KiB);
  DeviceBuffer rest = a.allocate(256 * KiB, "rest");
  EXPECT_EQ(a.in_use(), 1 * MiB);
  EXPECT_THROW((void)a.allocate(1, "one more byte"), Error);
}

TEST(Arena, FragmentedFreeSpaceLargeEnoughInTotalStillRefusesAContiguousRequest) {
  TestArena t(4 * KiB);
  Arena& a = t.arena;
  std::vector<DeviceBuffer> b;
  for (int i = 0; i < 4; ++i) b.push_back(a.allocate(1 * KiB, "piece"));
  b[0].reset();
  b[2].reset();  // 2 KiB free in total, in two 1 KiB holes
  const Error e = error_of([&] { (void)a.allocate(2 * KiB, "pair"); });
  EXPECT_EQ(e.kind(), ErrorKind::out_of_memory);
  EXPECT_NE(std::string(e.what()).find("largest free block 1.00 KiB"), std::string::npos) << e.what();
}

TEST(Arena, PeakTracksTheHighWaterMarkAndResetPeakLowersItToCurrentUse) {
  TestArena t(1 * MiB);
  Arena& a = t.arena;
  EXPECT_EQ(a.peak(), 0u);
  {
    DeviceBuffer x = a.allocate(100 * KiB, "x");
    DeviceBuffer y = a.allocate(200 * KiB, "y");
    EXPECT_EQ(a.peak(), 300 * KiB);
  }
  EXPECT_EQ(a.in_use(), 0u);
  EXPECT_EQ(a.peak(), 300 * KiB);
  DeviceBuffer z = a.allocate(50 * KiB, "z");
  EXPECT_EQ(a.peak(), 300 * KiB);
  a.reset_peak();
  EXPECT_EQ(a.peak(), 50 * KiB);
  {
    DeviceBuffer w = a.allocate(10 * KiB, "w");
    EXPECT_EQ(a.peak(), 60 * KiB);
  }
  EXPECT_EQ(a.peak(), 60 * KiB);
}

TEST(Arena, FreedNeighboursCoalesceSoTheirCombinedSizeFitsAtTheFirstOffset) {
  // Three 1 KiB blocks fill a 3 KiB arena; freeing two adjacent ones in either order (or the
  // outer two and then the middle) must leave one block that a 2 KiB request can take.
  for (int order = 0; order < 3; ++order) {
    TestArena t(3 * KiB);
    Arena& a = t.arena;
    DeviceBuffer A = a.allocate(1 * KiB, "A"), B = a.allocate(1 * KiB, "B"),
                 C = a.allocate(1 * KiB, "C");
    const std::size_t off_a = t.offset(A), off_b = t.offset(B), off_c = t.offset(C);
    EXPECT_EQ(std::vector<std::size_t>({off_a, off_b, off_c}),
              std::vector<std::size_t>({0, 1 * KiB, 2 * KiB}));
    EXPECT_THROW((void)a.allocate(2 * KiB, "AB"), Error) << "the arena is full";
    if (order == 0) {
      A.reset();
      B.reset();  // B merges with the free block before it
    } else if (order == 1) {
      B.reset();
      A.reset();  // A merges with the free block after it
    } else {
      A.reset();
      C.reset();
      B.reset();  // B merges on both sides
    }
    DeviceBuffer AB = a.allocate(2 * KiB, "AB");
    EXPECT_EQ(t.offset(AB), off_a) << "order " << order;
    if (order == 2) {
      DeviceBuffer last = a.allocate(1 * KiB, "C again");
      EXPECT_EQ(t.offset(last), off_c);
    }
  }
}

TEST(Arena, BestFitPlacesARequestInTheSmallestFreeBlockThatHoldsIt) {
  // [a 1K][s1 4K][b 1K][s2 2K][c 1K][tail 7K] in 16 KiB; free s1 and s2.
  TestArena t(16 * KiB);
  Arena& a = t.arena;
  DeviceBuffer A = a.allocate(1 * KiB, "a"), s1 = a.allocate(4 * KiB, "s1"),
               B = a.allocate(1 * KiB, "b"), s2 = a.allocate(2 * KiB, "s2"),
               C = a.allocate(1 * KiB, "c");
  const std::size_t off_s1 = t.offset(s1), off_s2 = t.offset(s2);
  s1.reset();
  s2.reset();
  // Free blocks: 4K at 1K, 2K at 6K, 7K at 9K. First fit would pick 1K, worst fit 9K.
  DeviceBuffer two = a.allocate(2 * KiB, "two");
  EXPECT_EQ(t.offset(two), off_s2);
  DeviceBuffer three = a.allocate(3 * KiB, "three");
  EXPECT_EQ(t.offset(three), off_s1);
  DeviceBuffer six = a.allocate(6 * KiB, "six");
  EXPECT_EQ(t.offset(six), 9 * KiB);
}

TEST(Arena, RandomAllocateFreeCyclesStayWithinTheCapWithoutOverlapAndDrainToZero) {
  constexpr std::size_t kCap = 1 * MiB;
  TestArena t(kCap);
  Arena& a = t.arena;
  std::mt19937_64 rng(20260127);
  struct Live {
    DeviceBuffer buf;
    unsigned char tag;
  };
  std::vector<Live> live;
  int ok = 0, refused = 0;
  for (int step = 0; step < 20000; ++step) {
    if (!live.empty() && rng() % 3 == 0) {
      const std::size_t i = rng() % live.size();
      // The block still holds its tag: nobody else was handed its bytes.
      const auto* p = live[i].buf.as<unsigned char>();
      ASSERT_EQ(p[0], live[i].tag);
      ASSERT_EQ(p[live[i].buf.bytes() - 1], live[i].tag);
      std::swap(live[i], live.back());
      live.pop_back();
    } else {
      const std::size_t n = 1 + rng() % (96 * KiB);
      try {
        DeviceBuffer b = a.allocate(n, "random");
        ASSERT_GE(b.bytes(), n);
        const std::size_t off = t.offset(b);
        ASSERT_LE(off + b.bytes(), kCap);
        const auto tag = static_cast<unsigned char>(step);
        std::memset(b.data(), tag, b.bytes());
        live.push_back({std::move(b), tag});
        ++ok;
      } catch (const Error& e) {
        ASSERT_EQ(e.kind(), ErrorKind::out_of_memory);
        ++refused;
      }
    }
    std::size_t sum = 0;
    for (const auto& l : live) sum += l.buf.bytes();
    ASSERT_EQ(a.in_use(), sum);
    ASSERT_LE(a.in_use(), kCap);
    ASSERT_LE(a.peak(), kCap);
    ASSERT_EQ(a.live_allocations(), live.size());
  }
  EXPECT_GT(ok, 1000);
  EXPECT_GT(refused, 10) << "the cycle should press against the cap";
  live.clear();
  EXPECT_EQ(a.in_use(), 0u);
  EXPECT_EQ(a.live_allocations(), 0u);
  // Everything coalesced back into one block.
  DeviceBuffer all = a.allocate(kCap, "everything");
  EXPECT_EQ(t.offset(all), 0u);
}

TEST(DeviceBuffer, MovesTransferOwnershipAndReleaseExactlyOnce) {
  TestArena t(64 * KiB);
  Arena& a = t.arena;
  DeviceBuffer x = a.allocate(4 * KiB, "x");
  void* px = x.data();
  DeviceBuffer y(std::move(x));
  EXPECT_FALSE(x);
  EXPECT_EQ(x.data(), nullptr);
  EXPECT_EQ(x.bytes(), 0u);
  EXPECT_EQ(y.data(), px);
  EXPECT_EQ(y.bytes(), 4 * KiB);
  EXPECT_EQ(a.in_use(), 4 * KiB);
  EXPECT_EQ(a.live_allocations(), 1u);
  x.reset();  // resetting a moved-from buffer releases nothing
  EXPECT_EQ(a.in_use(), 4 * KiB);

  // Move-assigning over a buffer that owns memory releases that memory first.
  DeviceBuffer z = a.allocate(8 * KiB, "z");
  EXPECT_EQ(a.in_use(), 12 * KiB);
  z = std::move(y);
  EXPECT_EQ(a.in_use(), 4 * KiB);
  EXPECT_EQ(a.live_allocations(), 1u);
  EXPECT_EQ(z.data(), px);
  EXPECT_FALSE(y);

  // Self-move keeps the allocation.
  DeviceBuffer& alias = z;
  z = std::move(alias);
  EXPECT_EQ(z.data(), px);
  EXPECT_EQ(a.in_use(), 4 * KiB);

  z.reset();
  z.reset();
  EXPECT_EQ(a.in_use(), 0u);
  EXPECT_EQ(a.live_allocations(), 0u);
  { DeviceBuffer w = a.allocate(1, "w"); }
  EXPECT_EQ(a.in_use(), 0u);
  // The arena is whole again: a full-size allocation lands at offset 0.
  DeviceBuffer full = a.allocate(64 * KiB, "full");
  EXPECT_EQ(t.offset(full), 0u);
}

TEST(ParseByteSize, AcceptsBinaryUnitsFractionsSpacesAndPlainBytes) {
  EXPECT_EQ(parse_byte_size("512M"), 512 * MiB);
  EXPECT_EQ(parse_byte_size("18G"), std::size_t{18} << 30);
  EXPECT_EQ(parse_byte_size("1.5GiB"), std::size_t{3} << 29);
  EXPECT_EQ(parse_byte_size("4096"), 4096u);
  EXPECT_EQ(parse_byte_size("2 gb"), std::size_t{2} << 30);
  EXPECT_EQ(parse_byte_size("64K"), 64 * KiB);
  EXPECT_EQ(parse_byte_size("3MiB"), 3 * MiB);
  EXPECT_EQ(parse_byte_size("100B"), 100u);
  EXPECT_EQ(parse_byte_size("1T"), std::size_t{1} << 40);
  EXPECT_EQ(parse_byte_size("0"), 0u);
}

TEST(ParseByteSize, RejectsNonSizesWithInvalidArgumentNamingTheText) {
  for (const char* text : {"lots", "-1G", "5X", "", "1.5.5G", "12 parsecs"}) {
    const Error e = error_of([&] { (void)parse_byte_size(text); });
    EXPECT_EQ(e.kind(), ErrorKind::invalid_argument) << "'" << text << "'";
    EXPECT_NE(std::string(e.what()).find(std::string("'") + text + "'"), std::string::npos)
        << "'" << text << "': " << e.what();
  }
}

TEST(FormatBytes, UsesBinaryUnitsWithTwoDecimals) {
  EXPECT_EQ(format_bytes(0), "0 B");
  EXPECT_EQ(format_bytes(1023), "1023 B");
  EXPECT_EQ(format_bytes(1024), "1.00 KiB");
  EXPECT_EQ(format_bytes(1536), "1.50 KiB");
  EXPECT_EQ(format_bytes(512.0 * MiB), "512.00 MiB");
  EXPECT_EQ(format_bytes(1.5 * 1024 * MiB), "1.50 GiB");
  EXPECT_EQ(format_bytes(5.0 * 1024 * 1024 * MiB), "5.00 TiB");
  EXPECT_EQ(format_bytes(1024.0 * 1024 * 1024 * MiB), "1024.00 TiB");
  // format_bytes and parse_byte_size agree on what a unit is.
  EXPECT_EQ(parse_byte_size(format_bytes(static_cast<double>(parse_byte_size("18G")))),
            parse_byte_size("18G"));
}

}  // namespace
}  // namespace zo2

namespace zo2 {
namespace {

// Runs fn in a child process under an address-space limit `extra` bytes above what the
// process maps now; the child's exit status is fn's result (0 = as expected), 99 when the
// limit could not be set.
int under_address_space_limit(std::size_t extra, const std::function<int()>& fn) {
  return test::in_child([&] {
    const std::size_t used = [] {
      std::ifstream in("/proc/self/status");
      std::string line;
      while (std::getline(in, line))
        if (line.starts_with("VmSize:")) return static_cast<std::size_t>(std::stoull(line.substr(7))) << 10;
      return std::size_t{0};
    }();
    rlimit r{};
    ::getrlimit(RLIMIT_AS, &r);
    r.rlim_cur = used + extra;
    if (used == 0 || ::setrlimit(RLIMIT_AS, &r) != 0) return 99;
    return fn();
  });
}

// Note [Address-space limits]: under `ulimit -v` the CPU device's default arena shrinks to
// what the limit leaves, and a limit that leaves too little for its kernel threads is an
// error naming it — before any BLAS call, whose buffer allocation would retry forever.
TEST(Arena, TheCpuDeviceFitsItselfUnderAnAddressSpaceLimitOrSaysWhy) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || defined(ZO2_TSAN)
  GTEST_SKIP() << "the sanitizers' shadow memory does not live under an address-space limit";
#endif
  EXPECT_EQ(address_space_headroom(), SIZE_MAX) << "the test process runs under an address-space limit already";
  const std::size_t threads_share = kernel_threads_address_space(2);
  // Room for two threads' share and a 1 GiB arena: the device holds about half a GiB.
  EXPECT_EQ(under_address_space_limit(threads_share + 2 * GiB, [] {
              const std::size_t headroom = address_space_headroom();
              if (headroom == SIZE_MAX || headroom > 3 * GiB + kernel_threads_address_space(2)) return 1;
              DeviceOptions o;
              o.kind = DeviceKind::cpu;
              o.threads = 2;
              const std::size_t expected = cpu_default_arena_bytes(2);  // (before the device maps it)
              auto dev = make_device(o);
              const std::size_t cap = dev->arena().capacity();
              if (cap > expected || cap + 16 * MiB < expected || cap < 512 * MiB || cap > 1100 * MiB) return 2;
              return dev->arena().allocate(256 * MiB, "test").data() != nullptr ? 0 : 3;
            }),
            0);
  // Too little: an out-of-memory error naming the limit, with or without a cap.
  for (const std::size_t cap : {std::size_t{0}, 64 * MiB}) {
    EXPECT_EQ(under_address_space_limit(threads_share / 2, [cap] {
                DeviceOptions o;
                o.kind = DeviceKind::cpu;
                o.threads = 2;
                o.mem_cap = cap;
                try {
                  make_device(o);
                  return 1;
                } catch (const Error& e) {
                  const std::string m = e.what();
                  return e.kind() == ErrorKind::out_of_memory && m.find("address-space limit (ulimit -v") != m.npos &&
                                 m.find("--threads") != m.npos
                             ? 0
                             : 2;
                }
              }),
              0)
        << "cap " << cap;
  }
}

}  // namespace
}  // namespace zo2
