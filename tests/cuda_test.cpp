// The CUDA backend itself — its device, memory cap, pinned host memory, streams, events and
// error reporting — and its kernels against their CPU twins where tests/ops_test.cpp does
// not reach: bf16/fp16 compute, a million normals, long sequences. Every test name contains
// "Cuda" (CTest labels them gpu) and every test skips itself without a CUDA device.
#include "runtime/arena.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/device.h"
#include "runtime/dtype_convert.h"
#include "runtime/element.h"
#include "runtime/ops.h"
#include "runtime/philox.h"
#include "tests/device_fixture.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

// Defined by the CUDA backend (runtime/cuda/cuda_device.cpp): 1 when p is page-locked host
// memory known to CUDA. Weak, so that a build without CUDA links (its tests skip anyway).
extern "C" int zo2_cuda_host_pointer_is_pinned(const void* p) noexcept __attribute__((weak));

namespace zo2 {
namespace {

using test::ScopedEnv;

std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float scale = 1.0f,
                                 float mean = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(mean, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// v stored as dt (round to nearest), as raw bytes.
std::vector<std::uint8_t> to_bytes(const std::vector<float>& v, DType dt) {
  std::vector<std::uint8_t> b(v.size() * dtype_size(dt));
  for (std::size_t i = 0; i < v.size(); ++i) store_element(b.data(), dt, static_cast<std::int64_t>(i), v[i]);
  return b;
}
std::vector<float> from_bytes(const std::vector<std::uint8_t>& b, DType dt) {
  std::vector<float> v(b.size() / dtype_size(dt));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = load_element(b.data(), dt, static_cast<std::int64_t>(i), 1.0f);
  return v;
}
// The values v takes once stored as dt.
std::vector<float> rounded(const std::vector<float>& v, DType dt) { return from_bytes(to_bytes(v, dt), dt); }
// The same in place: v keeps its storage (Mats may point into it).
void round_in_place(std::vector<float>& v, DType dt) {
  const std::vector<float> r = rounded(v, dt);
  std::copy(r.begin(), r.end(), v.begin());
}

// max |got − ref| / max |ref|
double max_rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  double err = 0, mag = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::fabs(static_cast<double>(got[i]) - ref[i]));
    mag = std::max(mag, std::fabs(static_cast<double>(ref[i])));
  }
  return mag > 0 ? err / mag : err;
}

// The largest over rows of max |got − ref| / max |ref| within the row: a long row's outputs
// are small, so the whole-output max_rel_err above would let a wrong long row through. A
// row that is zero in ref must be zero in got.
double max_row_rel_err(const std::vector<float>& got, const std::vector<float>& ref, std::size_t width) {
  double worst = 0;
  for (std::size_t r0 = 0; r0 < ref.size(); r0 += width) {
    double err = 0, mag = 0;
    for (std::size_t i = r0; i < std::min(ref.size(), r0 + width); ++i) {
      err = std::max(err, std::fabs(static_cast<double>(got[i]) - ref[i]));
      mag = std::max(mag, std::fabs(static_cast<double>(ref[i])));
    }
    worst = std::max(worst, mag > 0 ? err / mag : (err > 0 ? 1.0 : 0.0));
  }
  return worst;
}

// Relative tolerance of one rounding to dt (a few units in the last place).
double tolerance(DType dt) {
  switch (dt) {
    case DType::bf16: return 2e-2;
    case DType::f16: return 4e-3;
    default: return 1e-5;
  }
}

struct StoredHost {
  std::vector<std::uint8_t> bytes;
  std::vector<float> scales;
};
StoredHost store_as(const std::vector<float>& v, std::int64_t rows, std::int64_t cols, DType dt) {
  StoredHost s;
  if (dt != DType::f8_e4m3) {
    s.bytes = to_bytes(v, dt);
    return s;
  }
  s.bytes.resize(v.size());
  s.scales.resize(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) {
    float m = 0;
    for (std::int64_t c = 0; c < cols; ++c) m = std::max(m, std::fabs(v[static_cast<std::size_t>(r * cols + c)]));
    s.scales[static_cast<std::size_t>(r)] = m > 0 ? m / kE4M3Max : 1.0f;
    for (std::int64_t c = 0; c < cols; ++c)
      s.bytes[static_cast<std::size_t>(r * cols + c)] =
          f32_to_e4m3(v[static_cast<std::size_t>(r * cols + c)] / s.scales[static_cast<std::size_t>(r)]);
  }
  return s;
}

class CudaTest : public ::testing::Test {
 protected:
  static constexpr std::size_t kCap = std::size_t{1} << 30;

  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
    DeviceOptions o;
    o.kind = DeviceKind::cuda;
    o.mem_cap = kCap;
    device = make_device(o);
    stream = device->make_stream("test");
  }
  void TearDown() override {
    if (stream) stream->synchronize();
  }

  template <class T>
  DeviceBuffer upload(const std::vector<T>& host) {
    DeviceBuffer b = device->arena().allocate(std::max<std::size_t>(1, host.size() * sizeof(T)), "test input");
    stream->copy_h2d(b.data(), host.data(), host.size() * sizeof(T));
    stream->synchronize();
    return b;
  }
  DeviceBuffer zeros(std::size_t bytes) {
    DeviceBuffer b = device->arena().allocate(bytes, "test output");
    stream->memset(b.data(), 0, bytes);
    return b;
  }
  template <class T>
  std::vector<T> download(const void* p, std::size_t n) {
    std::vector<T> host(n);
    stream->copy_d2h(host.data(), p, n * sizeof(T));
    stream->synchronize();
    return host;
  }
  // A dense [rows, cols] activation of dtype dt holding v (rounded to dt).
  DeviceBuffer upload_as(const std::vector<float>& v, DType dt) { return upload(to_bytes(v, dt)); }
  std::vector<float> download_as(const void* p, std::size_t n, DType dt) {
    return from_bytes(download<std::uint8_t>(p, n * dtype_size(dt)), dt);
  }
  Ops& ops() { return device->ops(); }
  // Two deferred updates with projected gradient g (seeds seed, seed + 1; rounding seeds
  // rounding, rounding + 1), one on the device tensor and one with the CPU twin on its host
  // copy — the second starts from the first's rounded weights.
  void update_twice_on_both(const StoredTensor& dev, const StoredTensor& host, float g, std::uint64_t seed,
                            std::uint64_t rounding) {
    DeviceBuffer dg = upload(std::vector<float>{g});
    for (std::uint64_t step = 0; step < 2; ++step) {
      const UpdateArgs dev_args{seed + step, 1e-3f, 0.01f, dg.as<float>(), rounding + step};
      UpdateArgs host_args = dev_args;
      host_args.g = &g;
      ops().update(*stream, dev, dev_args);
      cpu::update(host, host_args);
    }
  }

  // A tensor of `values` stored as dt on the host (fp8 with row scales) and uploaded: the
  // device's view and the CPU twin's, over copies that live as long as the Twin.
  struct Twin {
    StoredHost host_copy;
    DeviceBuffer data, scales;
    StoredTensor dev, host;
  };
  Twin twin_of(const std::vector<float>& values, std::int64_t rows, std::int64_t cols, DType dt, std::uint64_t key) {
    Twin t;
    t.host_copy = store_as(values, rows, cols, dt);
    StoredHost& s = t.host_copy;
    t.data = upload(s.bytes);
    if (!s.scales.empty()) t.scales = upload(s.scales);
    t.dev = StoredTensor{t.data.data(), dt, s.scales.empty() ? nullptr : t.scales.as<float>(), rows, cols, key};
    t.host = StoredTensor{s.bytes.data(), dt, s.scales.empty() ? nullptr : s.scales.data(), rows, cols, key};
    return t;
  }

  std::unique_ptr<Device> device;
  std::unique_ptr<Stream> stream;
};

// ---- device, memory, streams, events ----

TEST_F(CudaTest, DeviceReportsItsNameAndCap) {
  EXPECT_EQ(device->kind(), DeviceKind::cuda);
  const std::string name = device->name();
  EXPECT_NE(name.find("cuda:0"), std::string::npos) << name;
  EXPECT_NE(name.find("sm_"), std::string::npos) << name;
  EXPECT_NE(name.find("GiB"), std::string::npos) << name;
  EXPECT_EQ(device->arena().capacity(), kCap);
  // The whole cap is reserved up front, so the driver sees at least that much.
  EXPECT_GE(device->driver_used_bytes(), kCap);
}

TEST_F(CudaTest, AllocationBeyondTheCapFailsNamingTheCap) {
  try {
    DeviceBuffer b = device->arena().allocate(kCap + 1, "an oversized test buffer");
    FAIL() << "allocated beyond the cap";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::out_of_memory);
    const std::string msg = e.what();
    EXPECT_NE(msg.find(format_bytes(static_cast<double>(kCap))), std::string::npos) << msg;
    EXPECT_NE(msg.find("an oversized test buffer"), std::string::npos) << msg;
  }
  // Everything up to the cap works.
  DeviceBuffer most = device->arena().allocate(kCap / 2, "half the cap");
  EXPECT_TRUE(most);
}

TEST_F(CudaTest, CapAboveFreeMemoryFailsNamingBoth) {
  DeviceOptions o;
  o.kind = DeviceKind::cuda;
  o.mem_cap = std::size_t{1} << 50;  // 1 PiB
  try {
    auto d = make_device(o);
    FAIL() << "a 1 PiB cap was accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(format_bytes(static_cast<double>(o.mem_cap))), std::string::npos) << msg;
    EXPECT_NE(msg.find("free"), std::string::npos) << msg;
  }
}

TEST_F(CudaTest, HostMemoryIsPinnedZeroedAndCounted) {
  const std::size_t before = device->pinned_host_bytes();
  constexpr std::size_t kBytes = std::size_t{4} << 20;
  {
    HostBuffer a = device->alloc_host(kBytes);
    HostBuffer b = device->alloc_host(kBytes);
    ASSERT_TRUE(a && b);
    EXPECT_TRUE(a.pinned());
    EXPECT_EQ(device->pinned_host_bytes(), before + 2 * kBytes);
    if (zo2_cuda_host_pointer_is_pinned != nullptr) {
      EXPECT_EQ(zo2_cuda_host_pointer_is_pinned(a.data()), 1);
      std::vector<char> pageable(64);
      EXPECT_EQ(zo2_cuda_host_pointer_is_pinned(pageable.data()), 0);
    }
    const auto* bytes = a.as<const unsigned char>();
    EXPECT_TRUE(std::all_of(bytes, bytes + kBytes, [](unsigned char c) { return c == 0; }));
    // A round trip through the device, asynchronously from and to pinned memory.
    for (std::size_t i = 0; i < kBytes; ++i) a.as<unsigned char>()[i] = static_cast<unsigned char>(i * 7);
    DeviceBuffer d = device->arena().allocate(kBytes, "round trip");
    stream->copy_h2d(d.data(), a.data(), kBytes);
    stream->copy_d2h(b.data(), d.data(), kBytes);
    stream->synchronize();
    EXPECT_EQ(std::memcmp(a.data(), b.data(), kBytes), 0);
  }
  EXPECT_EQ(device->pinned_host_bytes(), before);
}

TEST_F(CudaTest, EventsOrderTwoStreamsAndTimeTheWork) {
  auto producer = device->make_stream("producer");
  auto consumer = device->make_stream("consumer");
  auto start = device->make_event();
  auto done = device->make_event();
  // Several fp32 GEMMs of 4096³ (~137 GFLOP each, milliseconds of work): long enough that a
  // consumer that did not wait would copy zeros.
  const std::int64_t n = 4096;
  const std::size_t bytes = static_cast<std::size_t>(n * n) * sizeof(float);
  DeviceBuffer a = upload(std::vector<float>(static_cast<std::size_t>(n * n), 1.0f));
  DeviceBuffer b = upload(std::vector<float>(static_cast<std::size_t>(n * n), 1.0f));
  DeviceBuffer c = zeros(bytes);
  stream->synchronize();
  HostBuffer out = device->alloc_host(bytes);
  producer->record(*start);
  for (int i = 0; i < 4; ++i)
    ops().gemm(*producer, Mat::dense(a.data(), DType::f32, n, n), false,
               Mat::dense(b.data(), DType::f32, n, n), false, Mat::dense(c.data(), DType::f32, n, n),
               1.0f, 0.0f);
  producer->record(*done);
  consumer->wait(*done);
  consumer->copy_d2h(out.data(), c.data(), bytes);
  consumer->synchronize();
  const float* v = out.as<const float>();
  EXPECT_TRUE(std::all_of(v, v + n * n, [&](float x) { return x == static_cast<float>(n); }))
      << "the consumer read C before the producer's GEMMs finished";
  done->synchronize();
  EXPECT_TRUE(done->query());
  EXPECT_GT(done->seconds_since(*start), 0.0);
  // An event never recorded is complete, and waiting on it does nothing.
  auto never = device->make_event();
  EXPECT_TRUE(never->query());
  consumer->wait(*never);
  consumer->synchronize();
}

// Note [Stream busy time] on CUDA: spans are timed with event pairs, per tag; a span that
// holds milliseconds of GEMMs reads at least the events' own measure of them and no more
// than the wall time around it; an empty span reads ~0; an unknown tag reads 0.
TEST_F(CudaTest, BusySpansTimeTheStreamsWorkPerTag) {
  auto s = device->make_stream("timed");
  auto start = device->make_event();
  auto done = device->make_event();
  const std::int64_t n = 2048;
  DeviceBuffer a = upload(std::vector<float>(static_cast<std::size_t>(n * n), 1.0f));
  DeviceBuffer c = zeros(static_cast<std::size_t>(n * n) * sizeof(float));
  stream->synchronize();
  auto gemms = [&] {
    for (int i = 0; i < 4; ++i)
      ops().gemm(*s, Mat::dense(a.data(), DType::f32, n, n), false, Mat::dense(a.data(), DType::f32, n, n), false,
                 Mat::dense(c.data(), DType::f32, n, n), 1.0f, 0.0f);
  };
  gemms();  // warm cuBLAS
  s->synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  s->begin_busy(5);
  s->record(*start);
  gemms();
  s->record(*done);
  s->end_busy();
  s->begin_busy(6);
  s->end_busy();
  const double busy = s->take_busy_seconds(5);  // waits for the span
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GT(busy, 0.0);
  EXPECT_GE(busy, 0.9 * done->seconds_since(*start));
  EXPECT_LE(busy, wall);
  EXPECT_LT(s->take_busy_seconds(6), 1e-3);
  EXPECT_EQ(s->take_busy_seconds(5), 0.0) << "a tag is forgotten once taken";
  EXPECT_EQ(s->take_busy_seconds(99), 0.0);
  EXPECT_THROW(s->end_busy(), Error);
}

TEST_F(CudaTest, HostTasksRunInStreamOrderAndTheirFailuresSurfaceOnSynchronizeAndCheck) {
  HostBuffer h = device->alloc_host(256);
  DeviceBuffer d = zeros(256);
  stream->memset(d.data(), 0x5a, 256);
  stream->copy_d2h(h.data(), d.data(), 256);
  std::atomic<int> seen{-1};
  stream->launch_host([&] { seen = h.as<unsigned char>()[255]; });
  stream->launch_host([] { throw Error(ErrorKind::aborted, "a host task failed on purpose"); });
  try {
    stream->synchronize();
    FAIL() << "the host task's failure was lost";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::aborted);
    EXPECT_NE(std::string(e.what()).find("on purpose"), std::string::npos);
  }
  EXPECT_EQ(seen.load(), 0x5a) << "the host task ran before the copy before it";
  EXPECT_THROW(stream->check(), Error);
  stream = device->make_stream("test after failure");  // TearDown synchronizes this one
}

// The statement of the death test below: a kernel reading and writing an unmapped device
// address. A fault is sticky for the CUDA context, so it runs in a child process.
[[noreturn]] void fault_and_report() {
  int code = 10;
  try {
    DeviceOptions o;
    o.kind = DeviceKind::cuda;
    o.mem_cap = std::size_t{64} << 20;
    auto dev = make_device(o);
    auto s = dev->make_stream("faulting");
    DeviceBuffer g = dev->arena().allocate(sizeof(float), "g");
    s->memset(g.data(), 0, sizeof(float));
    s->synchronize();
    const StoredTensor bad{reinterpret_cast<void*>(std::uintptr_t{0x10000}), DType::f32, nullptr, 1 << 12,
                           1024, 7};
    try {
      // The fault is asynchronous: it surfaces on synchronize (or, if the kernel has
      // already failed by then, at the launch check of the call itself).
      dev->ops().update(*s, bad, UpdateArgs{1, 1e-3f, 0.0f, g.as<float>(), 2});
      s->synchronize();
      code = 2;  // no error at all
    } catch (const Error& e) {
      const std::string msg = e.what();
      code = e.kind() == ErrorKind::device && msg.find("CUDA error") != std::string::npos ? 0 : 3;
      std::fprintf(stderr, "%s\n", msg.c_str());
    }
    if (code == 0) {
      try {
        s->check();
        code = 5;  // the fault was forgotten
      } catch (const Error&) {
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "failed before the faulting kernel: %s\n", e.what());
    code = 4;
  }
  std::fflush(stderr);
  std::_Exit(code);  // skip destructors: the context is broken
}

TEST_F(CudaTest, KernelFaultSurfacesAsErrorOnSynchronizeAndCheck) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // the parent already holds a CUDA context
  EXPECT_EXIT(fault_and_report(), ::testing::ExitedWithCode(0), "");
}

TEST_F(CudaTest, BadArgumentsThrowAtTheCall) {
  DeviceBuffer x = zeros(64 * 64 * sizeof(float));
  const Mat m = Mat::dense(x.data(), DType::f32, 8, 8);
  EXPECT_THROW(ops().gemm(*stream, m, false, Mat::dense(x.data(), DType::f32, 7, 8), false, m, 1, 0), Error);
  EXPECT_THROW(ops().relu(*stream, Mat::dense(x.data(), DType::i32, 8, 8)), Error);
  AttentionArgs a;
  a.q = a.k = a.v = a.out = m;
  a.batch = 1;
  a.seq = 8;
  a.heads = 3;
  a.kv_heads = 2;
  a.head_dim = 2;
  EXPECT_THROW(ops().attention(*stream, a), Error);
  const StoredTensor w{x.data(), DType::f32, nullptr, 8, 8, 1};
  EXPECT_THROW(ops().perturb(*stream, w, 0, 9, nullptr, x.data(), nullptr, DType::f32), Error);
  stream->synchronize();  // nothing reached the device
}

// ---- the noise kernels: bit for bit ----

TEST_F(CudaTest, PerturbNormalsEqualCpuNormalsBitForBit) {
  const std::int64_t R = 1000, C = 1031;  // odd rows: groups of four straddle rows
  const std::int64_t r0 = 3, r1 = R - 1, n = (r1 - r0) * C;  // > 1e6 elements, e0 % 4 != 0
  std::vector<float> host_w(static_cast<std::size_t>(R * C), 0.0f);
  DeviceBuffer w = zeros(host_w.size() * sizeof(float));
  DeviceBuffer plus = zeros(static_cast<std::size_t>(n) * sizeof(float));
  std::vector<float> cpu_plus(static_cast<std::size_t>(n)), cpu_minus(static_cast<std::size_t>(n));
  for (std::uint64_t key : {std::uint64_t{0x1234}, std::uint64_t{0xfeedfacecafebeefULL}, std::uint64_t{7}})
    for (std::uint64_t seed : {std::uint64_t{1}, std::uint64_t{0x9e3779b97f4a7c15ULL}}) {
      const NoiseArgs noise{seed, 1.0f};
      ops().perturb(*stream, StoredTensor{w.data(), DType::f32, nullptr, R, C, key}, r0, r1, &noise,
                    plus.data(), nullptr, DType::f32);
      const auto got = download<float>(plus.data(), static_cast<std::size_t>(n));
      cpu::perturb(StoredTensor{host_w.data(), DType::f32, nullptr, R, C, key}, r0, r1, &noise,
                   cpu_plus.data(), cpu_minus.data(), DType::f32);
      ASSERT_EQ(std::memcmp(got.data(), cpu_plus.data(), got.size() * sizeof(float)), 0)
          << "key " << key << " seed " << seed;
      for (std::int64_t i : {std::int64_t{0}, std::int64_t{1}, n / 2, n - 1})
        EXPECT_EQ(got[static_cast<std::size_t>(i)] + 0.0f,
                  noise_normal(seed, key, static_cast<std::uint64_t>(r0 * C + i)) + 0.0f);
      double mean = 0, sq = 0;
      for (float z : got) {
        mean += z;
        sq += static_cast<double>(z) * z;
      }
      mean /= static_cast<double>(n);
      EXPECT_NEAR(mean, 0.0, 5e-3);
      EXPECT_NEAR(sq / static_cast<double>(n) - mean * mean, 1.0, 1e-2);
    }
}

TEST_F(CudaTest, PerturbAndUpdateEqualCpuBitForBitForEveryStorageAndComputeDtype) {
  for (std::int64_t C : {std::int64_t{1024}, std::int64_t{1030}}) {  // vector and element paths
    const std::int64_t R = 97;
    const auto values = random_floats(static_cast<std::size_t>(R * C), 21, 0.05f);
    for (DType sdt : {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3}) {
      Twin t = twin_of(values, R, C, sdt, 0xabcdef12345ULL);
      const StoredHost& s = t.host_copy;
      const DeviceBuffer &dw = t.data, &dscales = t.scales;
      const StoredTensor &dev_w = t.dev, &host_w = t.host;
      for (DType cdt : {DType::f32, DType::bf16, DType::f16})
        for (std::int64_t r0 : {std::int64_t{0}, std::int64_t{5}}) {
          const std::int64_t r1 = R - 2, n = (r1 - r0) * C;
          const std::size_t out_bytes = static_cast<std::size_t>(n) * dtype_size(cdt);
          const NoiseArgs noise{99, 1e-3f};
          DeviceBuffer plus = zeros(out_bytes), minus = zeros(out_bytes);
          std::vector<std::uint8_t> cpu_plus(out_bytes), cpu_minus(out_bytes);
          ops().perturb(*stream, dev_w, r0, r1, &noise, plus.data(), minus.data(), cdt);
          cpu::perturb(host_w, r0, r1, &noise, cpu_plus.data(), cpu_minus.data(), cdt);
          ASSERT_EQ(download<std::uint8_t>(plus.data(), out_bytes), cpu_plus)
              << dtype_name(sdt) << "→" << dtype_name(cdt) << " C=" << C << " r0=" << r0;
          ASSERT_EQ(download<std::uint8_t>(minus.data(), out_bytes), cpu_minus);
          ops().perturb(*stream, dev_w, r0, r1, nullptr, plus.data(), nullptr, cdt);
          cpu::perturb(host_w, r0, r1, nullptr, cpu_plus.data(), nullptr, cdt);
          ASSERT_EQ(download<std::uint8_t>(plus.data(), out_bytes), cpu_plus) << "plain dequantization";
        }
      // The update, twice (so the second starts from rounded weights), against the CPU.
      update_twice_on_both(dev_w, host_w, 0.75f, 100u, 200u);
      ASSERT_EQ(download<std::uint8_t>(dw.data(), s.bytes.size()), s.bytes) << dtype_name(sdt) << " C=" << C;
      if (!s.scales.empty()) {
        ASSERT_EQ(download<float>(dscales.data(), s.scales.size()), s.scales);
      }
    }
  }
}

// The fp8 update keeps a row's updated values in shared memory between its two passes where
// they fit (noise.cu, the fp8 note), and regenerates z where they do not: both must give
// the CPU's bytes and scales. 12288 columns (OPT-175B's hidden size): just past 48 KiB, so
// only the opt-in lets it launch; 20002: kept, cols % 4 != 0; 16384: kept; 60001: past the
// H100/H200 opt-in limit (227 KiB), the two-pass path; 1030 columns × 4500 rows: more rows
// than blocks (16 per SM), so blocks go on to further rows and a thread's slots move between
// them (cols % 4 != 0) — the end-of-row barrier's case.
TEST_F(CudaTest, Fp8UpdateOfWideRowsEqualsTheCpuBitForBit) {
  for (const char* mode : {"kept", "regenerate"})
  for (const auto& [R, C] : {std::pair<std::int64_t, std::int64_t>{3, 12288}, {5, 20002}, {5, 16384}, {3, 60001},
                             {4500, 1030}}) {
    const ScopedEnv use("ZO2_CUDA_FP8_UPDATE", mode);
    Twin t = twin_of(random_floats(static_cast<std::size_t>(R * C), 77, 0.05f), R, C, DType::f8_e4m3, 0x5eed5ULL);
    const StoredHost& s = t.host_copy;
    const DeviceBuffer &dw = t.data, &dscales = t.scales;
    const StoredTensor &dev_w = t.dev, &host_w = t.host;
    update_twice_on_both(dev_w, host_w, -1.25f, 300u, 400u);
    ASSERT_EQ(download<std::uint8_t>(dw.data(), s.bytes.size()), s.bytes) << mode << " C=" << C;
    ASSERT_EQ(download<float>(dscales.data(), s.scales.size()), s.scales) << mode << " C=" << C;
  }
}

// Tiles (StoredTensor::first_row) of sub-block streaming, on the device and with the CPU
// twin: perturb (rows inside the tile) and two updates draw at the whole tensor's indices on
// both. The tiles start past row 0 (where an ignored offset would go unnoticed), on a group
// of four (r0·C % 4 == 0), and the last ends at the last row. 1024 columns: the vector
// paths; 1030: groups straddle rows, the element paths.
TEST_F(CudaTest, TilesPerturbAndUpdateAsTheCpuTwinBitForBit) {
  for (std::int64_t C : {std::int64_t{1024}, std::int64_t{1030}}) {
    const std::int64_t R = 97;
    const auto values = random_floats(static_cast<std::size_t>(R * C), 23, 0.05f);
    for (DType sdt : {DType::f32, DType::bf16, DType::f16, DType::f8_e4m3}) {
      Twin t = twin_of(values, R, C, sdt, 0x711e5ULL);
      const StoredHost& s = t.host_copy;
      const DeviceBuffer &dw = t.data, &dscales = t.scales;
      const StoredTensor &dev_w = t.dev, &host_w = t.host;
      for (const auto& [r0, r1] : {std::pair<std::int64_t, std::int64_t>{6, 50}, {50, R}}) {
        const StoredTensor dev_t = test::tile(dev_w, r0, r1), host_t = test::tile(host_w, r0, r1);
        for (DType cdt : {DType::f32, DType::bf16, DType::f16}) {
          const std::int64_t b = 1, e = r1 - r0 - 1, n = (e - b) * C;
          const std::size_t out_bytes = static_cast<std::size_t>(n) * dtype_size(cdt);
          const NoiseArgs noise{98, 1e-3f};
          DeviceBuffer plus = zeros(out_bytes), minus = zeros(out_bytes);
          std::vector<std::uint8_t> cpu_plus(out_bytes), cpu_minus(out_bytes);
          ops().perturb(*stream, dev_t, b, e, &noise, plus.data(), minus.data(), cdt);
          cpu::perturb(host_t, b, e, &noise, cpu_plus.data(), cpu_minus.data(), cdt);
          ASSERT_EQ(download<std::uint8_t>(plus.data(), out_bytes), cpu_plus)
              << dtype_name(sdt) << "→" << dtype_name(cdt) << " C=" << C << " tile from row " << r0;
          ASSERT_EQ(download<std::uint8_t>(minus.data(), out_bytes), cpu_minus);
        }
        update_twice_on_both(dev_t, host_t, 0.75f, 500u, 600u);
      }
      // Rows [0, 6) were never updated on either side; the tiles' rows were, twice.
      ASSERT_EQ(download<std::uint8_t>(dw.data(), s.bytes.size()), s.bytes) << dtype_name(sdt) << " C=" << C;
      if (!s.scales.empty()) {
        ASSERT_EQ(download<float>(dscales.data(), s.scales.size()), s.scales);
      }
    }
  }
}

// Device code converts fp16 with the hardware instructions where the input is not NaN
// (Note [Hardware fp16 conversions on the GPU], runtime/dtype_convert.h); the result must
// be the CPU's bits everywhere. The plain (noise-free) perturbation is a pure conversion.
TEST_F(CudaTest, Fp16ConversionsEqualTheCpuOnEveryPatternAndEdge) {
  auto convert = [&](std::vector<std::uint8_t> bytes, DType from, DType to, std::int64_t rows,
                     std::int64_t cols) {
    DeviceBuffer dw = upload(bytes);
    const StoredTensor dev_w{dw.data(), from, nullptr, rows, cols, 1};
    const StoredTensor host_w{bytes.data(), from, nullptr, rows, cols, 1};
    const std::size_t out_bytes = static_cast<std::size_t>(rows * cols) * dtype_size(to);
    DeviceBuffer out = zeros(out_bytes);
    std::vector<std::uint8_t> want(out_bytes);
    ops().perturb(*stream, dev_w, 0, rows, nullptr, out.data(), nullptr, to);
    cpu::perturb(host_w, 0, rows, nullptr, want.data(), nullptr, to);
    return std::make_pair(download<std::uint8_t>(out.data(), out_bytes), want);
  };
  // Every fp16 pattern (±0, subnormals, normals, ±inf, NaNs with payloads) widened to fp32,
  // and through fp32 back to fp16 and to bf16.
  std::vector<std::uint8_t> halfs(std::size_t{65536} * 2);
  for (std::uint32_t h = 0; h < 65536; ++h) {
    halfs[2 * h] = static_cast<std::uint8_t>(h);
    halfs[2 * h + 1] = static_cast<std::uint8_t>(h >> 8);
  }
  for (DType to : {DType::f32, DType::f16, DType::bf16}) {
    const auto [got, want] = convert(halfs, DType::f16, to, 64, 1024);
    ASSERT_EQ(got, want) << "fp16 → " << dtype_name(to);
  }
  // fp32 values at every exponent with mantissas at the fp16 rounding boundaries, the
  // overflow edge (65504, 65519.99…, 65520), the subnormal edges, ±inf, NaNs, and random
  // bit patterns.
  std::vector<std::uint32_t> bits;
  for (std::uint32_t sign : {0u, 0x80000000u})
    for (std::uint32_t e = 0; e < 256; ++e)
      for (std::uint32_t m : {0u, 1u, 0xfffu, 0x1000u, 0x1001u, 0x1fffu, 0x2000u, 0x3000u, 0x400000u, 0x7fe000u,
                              0x7fefffu, 0x7ff000u, 0x7ff001u, 0x7fffffu})
        bits.push_back(sign | (e << 23) | m);
  for (float v : {65504.0f, 65519.996f, 65520.0f, 65536.0f, 5.9604645e-8f, 2.9802322e-8f, 2.9802326e-8f,
                  8.940697e-8f, 6.097555e-5f, 6.1035156e-5f})
    for (float sv : {v, -v}) bits.push_back(std::bit_cast<std::uint32_t>(sv));
  std::mt19937 rng(7);
  while (bits.size() % 1024 != 0 || bits.size() < 65536) bits.push_back(rng());
  std::vector<std::uint8_t> floats(bits.size() * 4);
  std::memcpy(floats.data(), bits.data(), floats.size());
  for (DType to : {DType::f16, DType::bf16}) {
    const auto [got, want] = convert(floats, DType::f32, to, static_cast<std::int64_t>(bits.size() / 1024), 1024);
    ASSERT_EQ(got, want) << "fp32 → " << dtype_name(to);
  }
}

// ---- the forward kernels in bf16/fp16 against the CPU (fp32) twin ----

class CudaNarrowTest : public CudaTest, public ::testing::WithParamInterface<DType> {};

TEST_P(CudaNarrowTest, FusedKernelsMatchTheCpuTwin) {
  const DType dt = GetParam();
  const double tol = tolerance(dt);
  const std::int64_t R = 67, H = 1000, ld = 1008;  // padded rows
  auto x = rounded(random_floats(static_cast<std::size_t>(R * ld), 31, 2.0f, 0.5f), dt);
  auto w = rounded(random_floats(static_cast<std::size_t>(H), 32, 0.5f, 1.0f), dt);
  auto b = rounded(random_floats(static_cast<std::size_t>(H), 33), dt);
  DeviceBuffer dx = upload_as(x, dt), dw = upload_as(w, dt), db = upload_as(b, dt);
  DeviceBuffer dy = zeros(static_cast<std::size_t>(R * ld) * dtype_size(dt));
  const Mat mx{dx.data(), dt, R, H, ld}, my{dy.data(), dt, R, H, ld};
  std::vector<float> ref(x.size(), 0.0f);
  const Mat hx{x.data(), DType::f32, R, H, ld}, href{ref.data(), DType::f32, R, H, ld};
  auto compare = [&](const char* what) {
    const auto got = download_as(dy.data(), static_cast<std::size_t>(R * ld), dt);
    std::vector<float> g2, r2;
    for (std::int64_t r = 0; r < R; ++r)
      for (std::int64_t c = 0; c < H; ++c) {
        g2.push_back(got[static_cast<std::size_t>(r * ld + c)]);
        r2.push_back(ref[static_cast<std::size_t>(r * ld + c)]);
      }
    EXPECT_LT(max_rel_err(g2, r2), tol) << what << " in " << dtype_name(dt);
  };

  ops().layernorm(*stream, mx, dw.data(), db.data(), 1e-5f, my);
  cpu::layernorm(hx, w.data(), b.data(), 1e-5f, href);
  compare("layernorm");
  ops().rmsnorm(*stream, mx, dw.data(), 1e-6f, my);
  cpu::rmsnorm(hx, w.data(), 1e-6f, href);
  compare("rmsnorm");
  ops().rmsnorm(*stream, mx, dw.data(), 1e-6f, my, 1.0f);  // Gemma 3: (1 + w)
  cpu::rmsnorm(hx, w.data(), 1e-6f, href, 1.0f);
  compare("rmsnorm (1 + w)");

  // y = x; y += bias; y += x; relu(y); then silu(y)·x into y (out aliases gate).
  stream->copy_d2d(dy.data(), dx.data(), static_cast<std::size_t>(R * ld) * dtype_size(dt));
  std::copy(x.begin(), x.end(), ref.begin());
  ops().add_bias(*stream, my, db.data());
  cpu::add_bias(href, b.data());
  round_in_place(ref, dt);
  compare("add_bias");
  ops().add(*stream, my, mx);
  cpu::add(href, hx);
  round_in_place(ref, dt);
  compare("add");
  ops().relu(*stream, my);
  cpu::relu(href);
  compare("relu");
  ops().silu_mul(*stream, my, mx, my);
  cpu::silu_mul(href, hx, href);
  compare("silu_mul");
  // Gemma 3: gelu_tanh(y)·x into y, then y ×= 3.
  ops().gelu_tanh_mul(*stream, my, mx, my);
  cpu::gelu_tanh_mul(href, hx, href);
  compare("gelu_tanh_mul");
  ops().scale(*stream, my, 3.0f);
  cpu::scale(href, 3.0f);
  compare("scale");

  // RoPE: 10 heads of 100 on each row.
  std::vector<std::int32_t> pos(static_cast<std::size_t>(R));
  for (std::int64_t r = 0; r < R; ++r) pos[static_cast<std::size_t>(r)] = static_cast<std::int32_t>((r * 37) % 2048);
  std::vector<float> freq(50);
  for (int i = 0; i < 50; ++i) freq[static_cast<std::size_t>(i)] = std::pow(10000.0f, -2.0f * i / 100.0f);
  DeviceBuffer dpos = upload(pos), dfreq = upload(freq);
  stream->copy_d2d(dy.data(), dx.data(), static_cast<std::size_t>(R * ld) * dtype_size(dt));
  std::copy(x.begin(), x.end(), ref.begin());
  ops().rope(*stream, my, 100, dpos.as<std::int32_t>(), dfreq.as<float>());
  cpu::rope(href, 100, pos.data(), freq.data());
  compare("rope");

  // Embedding with noise, stored bf16 table, output in dt: the same function on both sides,
  // so the bytes are equal.
  const std::int64_t V = 300;
  const auto table = to_bytes(random_floats(static_cast<std::size_t>(V * H), 34), DType::bf16);
  DeviceBuffer dtable = upload(table);
  const std::vector<std::int32_t> ids{0, 299, 5, -1, 300, 17, 17};
  DeviceBuffer dids = upload(ids);
  const NoiseArgs noise{4242, 1e-2f};
  const std::size_t eb = ids.size() * static_cast<std::size_t>(H) * dtype_size(dt);
  DeviceBuffer demb = zeros(eb);
  std::vector<std::uint8_t> cpu_emb(eb);
  const auto nid = static_cast<std::int64_t>(ids.size());
  ops().embedding(*stream, StoredTensor{dtable.data(), DType::bf16, nullptr, V, H, 55}, dids.as<std::int32_t>(),
                  nid, Mat::dense(demb.data(), dt, nid, H), &noise, -1.0f);
  cpu::embedding(StoredTensor{const_cast<std::uint8_t*>(table.data()), DType::bf16, nullptr, V, H, 55},
                 ids.data(), nid, Mat::dense(cpu_emb.data(), dt, nid, H), &noise, -1.0f);
  EXPECT_EQ(download<std::uint8_t>(demb.data(), eb), cpu_emb) << "embedding in " << dtype_name(dt);

  // GEMM: [R, H] · [300, H]ᵀ with fp32 C (tight: only the accumulation order differs) and C in dt.
  const auto wt = rounded(random_floats(static_cast<std::size_t>(V * H), 35, 0.05f), dt);
  DeviceBuffer dwt = upload_as(wt, dt);
  std::vector<float> c_ref(static_cast<std::size_t>(R * V));
  cpu::gemm(hx, false, Mat::dense(const_cast<float*>(wt.data()), DType::f32, V, H), true,
            Mat::dense(c_ref.data(), DType::f32, R, V), 1.0f, 0.0f);
  DeviceBuffer dc32 = zeros(c_ref.size() * sizeof(float));
  ops().gemm(*stream, mx, false, Mat::dense(dwt.data(), dt, V, H), true, Mat::dense(dc32.data(), DType::f32, R, V),
             1.0f, 0.0f);
  EXPECT_LT(max_rel_err(download<float>(dc32.data(), c_ref.size()), c_ref), 1e-4) << "gemm → fp32";
  DeviceBuffer dcn = zeros(c_ref.size() * dtype_size(dt));
  ops().gemm(*stream, mx, false, Mat::dense(dwt.data(), dt, V, H), true, Mat::dense(dcn.data(), dt, R, V), 1.0f,
             0.0f);
  EXPECT_LT(max_rel_err(download_as(dcn.data(), c_ref.size(), dt), c_ref), tol) << "gemm → " << dtype_name(dt);

  // Cross-entropy over two vocabulary tiles of logits in dt.
  const auto logits = rounded(random_floats(static_cast<std::size_t>(R * V), 36, 3.0f), dt);
  std::vector<std::int32_t> targets(static_cast<std::size_t>(R));
  for (std::int64_t r = 0; r < R; ++r) targets[static_cast<std::size_t>(r)] = r % 5 == 0 ? -100 : static_cast<std::int32_t>((r * 13) % V);
  DeviceBuffer dl = upload_as(logits, dt), dtargets = upload(targets);
  DeviceBuffer dstate = zeros(static_cast<std::size_t>(R * 3) * sizeof(float)), drow = zeros(static_cast<std::size_t>(R) * sizeof(float)),
               dmean = zeros(sizeof(float));
  std::vector<float> state(static_cast<std::size_t>(R * 3)), row(static_cast<std::size_t>(R));
  float mean = 0;
  const Mat full{dl.data(), dt, R, V, V};
  const Mat hfull{const_cast<float*>(logits.data()), DType::f32, R, V, V};
  for (std::int64_t v0 : {std::int64_t{0}, std::int64_t{128}}) {
    const std::int64_t v1 = v0 == 0 ? 128 : V;
    ops().ce_accumulate(*stream, full.cols_range(v0, v1), v0, dtargets.as<std::int32_t>(), dstate.as<float>(), v0 == 0);
    cpu::ce_accumulate(hfull.cols_range(v0, v1), v0, targets.data(), state.data(), v0 == 0);
  }
  ops().ce_finish(*stream, dstate.as<float>(), dtargets.as<std::int32_t>(), R, drow.as<float>());
  ops().loss_mean(*stream, drow.as<float>(), dtargets.as<std::int32_t>(), R, dmean.as<float>());
  cpu::ce_finish(state.data(), targets.data(), R, row.data());
  cpu::loss_mean(row.data(), targets.data(), R, &mean);
  EXPECT_LT(max_rel_err(download<float>(drow.data(), row.size()), row), 1e-5) << "ce row losses";
  EXPECT_NEAR(download<float>(dmean.data(), 1)[0], mean, 1e-5 * std::fabs(mean));
}

INSTANTIATE_TEST_SUITE_P(Narrow, CudaNarrowTest, ::testing::Values(DType::bf16, DType::f16),
                         [](const ::testing::TestParamInfo<DType>& info) {
                           return std::string(dtype_name(info.param));
                         });

// ---- the linear layer, with and without the cuBLASLt epilogue (Note [GEMM epilogues]) ----

class CudaLinearTest : public CudaTest, public ::testing::WithParamInterface<DType> {};

TEST_P(CudaLinearTest, LinearMatchesTheCpuTwinOnEveryTileWithAndWithoutTheEpilogue) {
  const DType dt = GetParam();
  // x [67, 200] (row stride 208) times a weight of 300 rows in three row tiles of 128, 128
  // and 44 — as models/graph.cpp tiles them — into column slices of y (row stride 320;
  // columns 300..319 must stay untouched).
  const std::int64_t M = 67, K = 200, N = 300, ldx = 208, ldy = 320;
  const auto x = rounded(random_floats(static_cast<std::size_t>(M * ldx), 61), dt);
  const auto w = rounded(random_floats(static_cast<std::size_t>(N * K), 62, 0.1f), dt);
  const auto b = rounded(random_floats(static_cast<std::size_t>(N), 63), dt);
  DeviceBuffer dx = upload_as(x, dt), dw = upload_as(w, dt), db = upload_as(b, dt);
  const std::size_t esize = dtype_size(dt);
  const auto h = rounded(random_floats(static_cast<std::size_t>(M * ldy), 64), dt);  // a residual stream
  struct Case {
    bool bias, relu, residual;
  };
  for (const Case c : {Case{true, false, false}, Case{true, true, false}, Case{false, true, false},
                       Case{true, false, true}, Case{false, false, true}}) {
    // The CPU twin in fp32 on the same (rounded) inputs: gemm, add_bias, relu, add.
    std::vector<float> ref(static_cast<std::size_t>(M * N));
    auto hx = x, hw = w, hb = b;
    const Mat href = Mat::dense(ref.data(), DType::f32, M, N);
    cpu::gemm(Mat{hx.data(), DType::f32, M, K, ldx}, false, Mat::dense(hw.data(), DType::f32, N, K), true, href, 1.0f,
              0.0f);
    if (c.bias) cpu::add_bias(href, hb.data());
    if (c.relu) cpu::relu(href);
    if (c.residual) {
      auto hh = h;
      cpu::add(href, Mat{hh.data(), DType::f32, M, N, ldy});
    }
    std::vector<std::vector<std::uint8_t>> outs;
    // the epilogue twice (the same bits), then the default (unset: the epilogue)
    for (const char* epilogue : {"0", "1", "1", ""}) {
      ScopedEnv use("ZO2_CUDA_GEMM_EPILOGUE", epilogue);
      DeviceBuffer dy = upload_as(std::vector<float>(static_cast<std::size_t>(M * ldy), 7.0f), dt);
      DeviceBuffer dh = upload_as(h, dt);
      const Mat y{dy.data(), dt, M, N, ldy}, hm{dh.data(), dt, M, N, ldy};
      for (std::int64_t r0 = 0; r0 < N; r0 += 128) {
        const std::int64_t r1 = std::min(N, r0 + 128);
        const Mat wt = Mat::dense(static_cast<char*>(dw.data()) + r0 * K * static_cast<std::int64_t>(esize), dt,
                                  r1 - r0, K);
        const void* bt = c.bias ? static_cast<const char*>(db.data()) + r0 * static_cast<std::int64_t>(esize) : nullptr;
        const Mat h_tile = hm.cols_range(r0, r1);
        ops().linear(*stream, Mat{dx.data(), dt, M, K, ldx}, wt, y.cols_range(r0, r1), bt, c.relu,
                     c.residual ? &h_tile : nullptr);
      }
      const void* result = c.residual ? dh.data() : dy.data();
      const auto got = download_as(result, static_cast<std::size_t>(M * ldy), dt);
      std::vector<float> dense;
      for (std::int64_t i = 0; i < M; ++i) {
        for (std::int64_t j = 0; j < N; ++j) dense.push_back(got[static_cast<std::size_t>(i * ldy + j)]);
        for (std::int64_t j = N; j < ldy; ++j)
          ASSERT_EQ(got[static_cast<std::size_t>(i * ldy + j)], c.residual ? h[static_cast<std::size_t>(i * ldy + j)] : 7.0f)
              << "wrote past N";
      }
      EXPECT_LT(max_rel_err(dense, ref), dt == DType::f32 ? 1e-5 : 2 * tolerance(dt))
          << "epilogue " << epilogue << " bias " << c.bias << " relu " << c.relu << " residual " << c.residual << " "
          << dtype_name(dt);
      if (c.relu) {
        for (float v : dense) ASSERT_GE(v, 0.0f);
      }
      outs.push_back(download<std::uint8_t>(result, static_cast<std::size_t>(M * ldy) * esize));
    }
    EXPECT_EQ(outs[1], outs[2]) << "the epilogue path is not deterministic";
    EXPECT_EQ(outs[3], outs[1]) << "the default is not the epilogue path";
  }
}

TEST_P(CudaLinearTest, AnUnknownEpilogueSwitchIsRefusedByName) {
  const DType dt = GetParam();
  DeviceBuffer dx = zeros(64 * 64 * dtype_size(dt)), dw = zeros(64 * 64 * dtype_size(dt)),
               dy = zeros(64 * 64 * dtype_size(dt)), db = zeros(64 * dtype_size(dt));
  ScopedEnv bad("ZO2_CUDA_GEMM_EPILOGUE", "maybe");
  try {
    ops().linear(*stream, Mat::dense(dx.data(), dt, 64, 64), Mat::dense(dw.data(), dt, 64, 64),
                 Mat::dense(dy.data(), dt, 64, 64), db.data(), false, nullptr);
    ADD_FAILURE() << "ZO2_CUDA_GEMM_EPILOGUE=maybe was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ZO2_CUDA_GEMM_EPILOGUE='maybe'"), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaLinearTest, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const ::testing::TestParamInfo<DType>& info) {
                           return std::string(dtype_name(info.param));
                         });

// ---- attention on a long sequence ----

struct AttentionProblem {
  int batch, seq, heads, kv_heads, head_dim;
  std::vector<float> q, k, v;
  std::vector<std::int32_t> mask;
};

AttentionProblem make_attention_problem(int batch, int seq, int heads, int kv_heads, int head_dim, DType dt) {
  AttentionProblem p{batch, seq, heads, kv_heads, head_dim, {}, {}, {}, {}};
  const std::size_t n = static_cast<std::size_t>(batch) * static_cast<std::size_t>(seq);
  p.q = rounded(random_floats(n * static_cast<std::size_t>(heads * head_dim), 41), dt);
  p.k = rounded(random_floats(n * static_cast<std::size_t>(kv_heads * head_dim), 42), dt);
  p.v = rounded(random_floats(n * static_cast<std::size_t>(kv_heads * head_dim), 43), dt);
  p.mask.assign(n, 1);
  if (batch > 1) {
    for (int t = 0; t < 7; ++t) p.mask[static_cast<std::size_t>(seq + t)] = 0;             // left padding
    for (int t = seq - 11; t < seq; ++t) p.mask[static_cast<std::size_t>(seq + t)] = 0;  // right padding
  }
  return p;
}

AttentionArgs attention_args(const AttentionProblem& p, void* q, void* k, void* v, void* out,
                             const std::int32_t* mask, DType dt) {
  const std::int64_t n = std::int64_t{p.batch} * p.seq;
  AttentionArgs a;
  a.q = Mat::dense(q, dt, n, std::int64_t{p.heads} * p.head_dim);
  a.k = Mat::dense(k, dt, n, std::int64_t{p.kv_heads} * p.head_dim);
  a.v = Mat::dense(v, dt, n, std::int64_t{p.kv_heads} * p.head_dim);
  a.out = Mat::dense(out, dt, n, std::int64_t{p.heads} * p.head_dim);
  a.batch = p.batch;
  a.seq = p.seq;
  a.heads = p.heads;
  a.kv_heads = p.kv_heads;
  a.head_dim = p.head_dim;
  a.key_mask = mask;
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.head_dim)));
  a.causal = true;
  return a;
}

class CudaAttentionTest : public CudaTest, public ::testing::WithParamInterface<DType> {};

TEST_P(CudaAttentionTest, LongSequenceGroupedQueryAttentionMatchesCpuInBoundedMemory) {
  const DType dt = GetParam();
  const AttentionProblem p = make_attention_problem(2, 2048 + 17, 8, 2, 64, dt);
  std::vector<float> ref(p.q.size(), 0.0f);
  auto q = p.q, k = p.k, v = p.v;
  cpu::attention(attention_args(p, q.data(), k.data(), v.data(), ref.data(), p.mask.data(), DType::f32));

  DeviceBuffer dq = upload_as(p.q, dt), dk = upload_as(p.k, dt), dv = upload_as(p.v, dt), dm = upload(p.mask);
  DeviceBuffer dout = upload_as(std::vector<float>(p.q.size(), 7.0f), dt);  // garbage to overwrite
  stream->synchronize();
  const std::size_t in_use = device->arena().in_use();
  device->arena().reset_peak();
  ops().attention(*stream, attention_args(p, dq.data(), dk.data(), dv.data(), dout.data(), dm.as<std::int32_t>(), dt));
  const auto got = download_as(dout.data(), ref.size(), dt);
  EXPECT_LT(max_rel_err(got, ref), dt == DType::f32 ? 1e-5 : tolerance(dt)) << dtype_name(dt);
  // Left-padded rows of batch 1 see no key: zeros.
  const std::size_t width = static_cast<std::size_t>(p.heads * p.head_dim);
  for (std::size_t e = 0; e < width; ++e) ASSERT_EQ(got[static_cast<std::size_t>(p.seq) * width + e], 0.0f);
  // Scratch (scores of one chunk, cuBLAS workspace) stays far below B·H·T² scores.
  const double full_scores = 4.0 * p.batch * p.heads * static_cast<double>(p.seq) * p.seq;
  EXPECT_LT(static_cast<double>(device->arena().peak() - in_use), full_scores / 2);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaAttentionTest, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         [](const ::testing::TestParamInfo<DType>& info) {
                           return std::string(dtype_name(info.param));
                         });

// ---- the fused kernel (Note [Fused attention]) and the chunked path, side by side ----

struct FusedCase {
  int batch, seq, heads, kv_heads, head_dim;
  bool causal;
  int window = 0;  // sliding window (AttentionArgs::window; the fused kernel skips tiles before it)
  float softcap = 0;  // AttentionArgs::softcap (Gemma's attn_logit_softcapping)
};

class CudaFusedAttentionTest : public CudaTest, public ::testing::WithParamInterface<DType> {};

TEST_P(CudaFusedAttentionTest, FusedAndChunkedMatchTheCpuForEveryShape) {
  const DType dt = GetParam();
  // Odd lengths (a partial last tile of 64 queries and keys), GQA and MQA, left and right
  // padding (batch 1), causal and not, both head sizes the fused kernel takes.
  for (const FusedCase& c : {FusedCase{2, 200, 4, 2, 128, true}, FusedCase{2, 131, 6, 1, 64, true},
                             FusedCase{3, 77, 4, 4, 64, false}, FusedCase{2, 64, 2, 1, 128, false},
                             FusedCase{1, 1, 2, 2, 64, true},
                             // Rows just past each register count of the row softmax (Note [Row
                             // softmax in registers]: 8/16/32/64 per lane), ragged at the end.
                             FusedCase{1, 300, 2, 1, 64, false}, FusedCase{1, 777, 2, 2, 64, false},
                             FusedCase{1, 1100, 2, 1, 128, true}, FusedCase{1, 2047, 1, 1, 64, false},
                             // Sliding windows (Mistral): not a multiple of the 64-key tile,
                             // exactly one tile, one key, and many tiles skipped.
                             FusedCase{2, 200, 4, 2, 128, true, 70}, FusedCase{2, 131, 6, 1, 64, true, 64},
                             FusedCase{2, 77, 4, 4, 64, true, 1}, FusedCase{1, 1100, 2, 1, 128, true, 100},
                             // Soft-capped scores (Gemma), with and without a window, past the
                             // row softmax's register rows (the block kernel) too.
                             FusedCase{2, 200, 4, 2, 128, true, 0, 0.5f}, FusedCase{2, 131, 6, 1, 64, true, 64, 2.0f},
                             FusedCase{1, 2100, 1, 1, 64, false, 0, 1.0f}}) {
    const AttentionProblem p = make_attention_problem(c.batch, c.seq, c.heads, c.kv_heads, c.head_dim, dt);
    std::vector<float> ref(p.q.size(), 0.0f);
    auto q = p.q, k = p.k, v = p.v;
    AttentionArgs host = attention_args(p, q.data(), k.data(), v.data(), ref.data(), p.mask.data(), DType::f32);
    host.causal = c.causal;
    host.window = c.window;
    host.softcap = c.softcap;
    cpu::attention(host);
    DeviceBuffer dq = upload_as(p.q, dt), dk = upload_as(p.k, dt), dv = upload_as(p.v, dt), dm = upload(p.mask);
    std::vector<std::vector<float>> got;
    // chunked: the row softmax of Note [Row softmax in registers]; chunked-block: the
    // block-per-row softmax it replaced for rows of up to 2048 keys.
    for (const char* path : {"fused", "chunked", "chunked-block"}) {
      ScopedEnv use("ZO2_CUDA_ATTENTION", path);
      DeviceBuffer dout = upload_as(std::vector<float>(p.q.size(), 7.0f), dt);  // garbage to overwrite
      AttentionArgs dev = attention_args(p, dq.data(), dk.data(), dv.data(), dout.data(), dm.as<std::int32_t>(), dt);
      dev.causal = c.causal;
      dev.window = c.window;
      dev.softcap = c.softcap;
      if (std::string_view(path) == "fused") {
        // On a fresh stream: the chunked paths take score scratch from the arena, the fused
        // kernel nothing — so an unchanged arena shows that the fused kernel took the call.
        auto fresh = device->make_stream("fused check");
        const std::size_t in_use = device->arena().in_use();
        ops().attention(*fresh, dev);
        fresh->synchronize();
        EXPECT_EQ(device->arena().in_use(), in_use) << "the fused kernel did not take T" << c.seq;
      } else {
        ops().attention(*stream, dev);
      }
      got.push_back(download_as(dout.data(), ref.size(), dt));
      EXPECT_LT(max_rel_err(got.back(), ref), tolerance(dt))
          << path << " " << dtype_name(dt) << " B" << c.batch << " T" << c.seq << " H" << c.heads << "/" << c.kv_heads
          << " D" << c.head_dim << (c.causal ? " causal" : "") << " window " << c.window << " softcap " << c.softcap;
    }
    EXPECT_LT(max_rel_err(got[0], got[1]), tolerance(dt)) << "fused vs chunked, T" << c.seq << " window " << c.window;
    const std::size_t width = static_cast<std::size_t>(p.heads * p.head_dim);
    EXPECT_LT(max_row_rel_err(got[1], got[2], width), tolerance(dt)) << "row vs block softmax, T" << c.seq;
    EXPECT_LT(max_row_rel_err(got[1], ref, width), 2 * tolerance(dt)) << "row softmax vs CPU per row, T" << c.seq;
    if (c.batch > 1 && c.causal) {  // batch 1's left-padded first row sees no key: zeros
      for (const auto& g : got)
        for (std::size_t e = 0; e < width; ++e) ASSERT_EQ(g[static_cast<std::size_t>(p.seq) * width + e], 0.0f);
    }
  }
}

TEST_P(CudaFusedAttentionTest, FusedKernelIsDeterministicAndItsSwitchIsChecked) {
  const DType dt = GetParam();
  const AttentionProblem p = make_attention_problem(2, 300, 4, 2, 128, dt);
  DeviceBuffer dq = upload_as(p.q, dt), dk = upload_as(p.k, dt), dv = upload_as(p.v, dt), dm = upload(p.mask);
  const std::size_t bytes = p.q.size() * dtype_size(dt);
  std::vector<std::vector<std::uint8_t>> runs;
  for (int run = 0; run < 2; ++run) {
    ScopedEnv use("ZO2_CUDA_ATTENTION", "fused");
    DeviceBuffer out = zeros(bytes);
    ops().attention(*stream, attention_args(p, dq.data(), dk.data(), dv.data(), out.data(), dm.as<std::int32_t>(), dt));
    runs.push_back(download<std::uint8_t>(out.data(), bytes));
  }
  EXPECT_EQ(runs[0], runs[1]);
  {
    // The fused kernel is the default (unset or empty) for these shapes: the same bits, and on
    // a fresh stream no score scratch from the arena (the chunked path takes some).
    ScopedEnv use("ZO2_CUDA_ATTENTION", "");
    DeviceBuffer out = zeros(bytes);
    auto fresh = device->make_stream("default check");
    const std::size_t in_use = device->arena().in_use();
    ops().attention(*fresh, attention_args(p, dq.data(), dk.data(), dv.data(), out.data(), dm.as<std::int32_t>(), dt));
    fresh->synchronize();
    EXPECT_EQ(device->arena().in_use(), in_use) << "the default path is not the fused kernel";
    EXPECT_EQ(download<std::uint8_t>(out.data(), bytes), runs[0]);
  }
  ScopedEnv bad("ZO2_CUDA_ATTENTION", "flash");
  DeviceBuffer out = zeros(bytes);
  try {
    ops().attention(*stream, attention_args(p, dq.data(), dk.data(), dv.data(), out.data(), dm.as<std::int32_t>(), dt));
    ADD_FAILURE() << "an unknown ZO2_CUDA_ATTENTION was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ZO2_CUDA_ATTENTION='flash'"), std::string::npos) << e.what();
  }
}

// NaN propagates on every path as on the CPU twin (OpsTest.AttentionPropagatesNanScores…):
// query row 5 of head 1 all NaN (every score of that row NaN: it used to read as "no
// visible key", zeros) makes that row NaN; one NaN element of key 100 makes rows 100… of
// both heads NaN; every other row is finite and matches the NaN-free run. Batch 1's first
// row (left padding) stays zeros.
TEST_P(CudaFusedAttentionTest, NanScoresMakeTheirRowsNanOnEveryPath) {
  const DType dt = GetParam();
  const AttentionProblem p = make_attention_problem(2, 130, 2, 1, 64, dt);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto q = p.q, k = p.k;
  const std::size_t qw = static_cast<std::size_t>(p.heads * p.head_dim), kw = static_cast<std::size_t>(p.head_dim);
  for (std::size_t e = 0; e < kw; ++e) q[5 * qw + kw + e] = nan;
  k[100 * kw + 7] = nan;
  DeviceBuffer dq = upload_as(q, dt), dk = upload_as(k, dt), dv = upload_as(p.v, dt), dm = upload(p.mask);
  DeviceBuffer cq = upload_as(p.q, dt), ck = upload_as(p.k, dt);
  for (const char* path : {"fused", "chunked", "chunked-block"}) {
    ScopedEnv use("ZO2_CUDA_ATTENTION", path);
    DeviceBuffer out = upload_as(std::vector<float>(p.q.size(), 7.0f), dt);
    DeviceBuffer clean = upload_as(std::vector<float>(p.q.size(), 7.0f), dt);
    ops().attention(*stream, attention_args(p, dq.data(), dk.data(), dv.data(), out.data(), dm.as<std::int32_t>(), dt));
    ops().attention(*stream, attention_args(p, cq.data(), ck.data(), dv.data(), clean.data(), dm.as<std::int32_t>(), dt));
    const auto got = download_as(out.data(), p.q.size(), dt), ref = download_as(clean.data(), p.q.size(), dt);
    for (std::size_t r = 0; r < static_cast<std::size_t>(2 * p.seq); ++r)
      for (std::size_t h = 0; h < static_cast<std::size_t>(p.heads); ++h) {
        const bool want_nan = (r == 5 && h == 1) || (r >= 100 && r < static_cast<std::size_t>(p.seq));
        for (std::size_t e = 0; e < kw; ++e) {
          const float x = got[r * qw + h * kw + e];
          if (want_nan) {
            ASSERT_TRUE(std::isnan(x)) << path << " row " << r << " head " << h << " = " << x;
          } else {
            ASSERT_EQ(x, ref[r * qw + h * kw + e]) << path << " row " << r << " head " << h;
          }
        }
      }
    for (std::size_t e = 0; e < qw; ++e) ASSERT_EQ(got[static_cast<std::size_t>(p.seq) * qw + e], 0.0f) << path;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaFusedAttentionTest, ::testing::Values(DType::bf16, DType::f16),
                         [](const ::testing::TestParamInfo<DType>& info) {
                           return std::string(dtype_name(info.param));
                         });

// ---- determinism ----

TEST_F(CudaTest, KernelsGiveTheSameBitsOnAnyStreamAndRun) {
  const DType dt = DType::bf16;
  const AttentionProblem p = make_attention_problem(2, 300, 4, 2, 64, dt);
  DeviceBuffer dq = upload_as(p.q, dt), dk = upload_as(p.k, dt), dv = upload_as(p.v, dt), dm = upload(p.mask);
  const std::size_t bytes = p.q.size() * dtype_size(dt);
  const std::int64_t n = std::int64_t{p.batch} * p.seq, width = std::int64_t{p.heads} * p.head_dim;
  const auto w = to_bytes(random_floats(static_cast<std::size_t>(width), 51, 0.1f, 1.0f), dt);
  DeviceBuffer dw = upload(w);
  std::vector<std::vector<std::uint8_t>> results;
  for (int run = 0; run < 3; ++run) {
    auto s = device->make_stream("run " + std::to_string(run));
    DeviceBuffer out = device->arena().allocate(bytes, "out");
    ops().attention(*s, attention_args(p, dq.data(), dk.data(), dv.data(), out.data(), dm.as<std::int32_t>(), dt));
    const Mat mo = Mat::dense(out.data(), dt, n, width);
    ops().rmsnorm(*s, mo, dw.data(), 1e-6f, mo);
    std::vector<std::uint8_t> host(bytes);
    s->copy_d2h(host.data(), out.data(), bytes);
    s->synchronize();
    results.push_back(std::move(host));
  }
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], results[2]);
}

}  // namespace
}  // namespace zo2
