#include "runtime/device.h"

#include "runtime/arena.h"
#include "runtime/cgroup.h"
#include "runtime/common.h"
#include "runtime/error.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <oneapi/tbb/info.h>
#include <sys/resource.h>
#include <unistd.h>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <string_view>
#include <utility>

namespace zo2 {

std::string_view device_kind_name(DeviceKind kind) {
  return kind == DeviceKind::cpu ? "cpu" : "cuda";
}

HostBuffer& HostBuffer::operator=(HostBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    pinned_ = o.pinned_;
    free_ = std::move(o.free_);
    o.ptr_ = nullptr;
    o.bytes_ = 0;
    o.free_ = nullptr;
  }
  return *this;
}

void HostBuffer::reset() {
  if (ptr_ && free_) free_(ptr_);
  ptr_ = nullptr;
  bytes_ = 0;
  free_ = nullptr;
}

// Note [Stream value waits], the portable form: a host function that polls the counter.
void Stream::wait_value(const std::uint32_t* addr, std::uint32_t value, double timeout_s, std::string_view what) {
  launch_host([addr, value, timeout_s, what = std::string(what)] {
    std::atomic_ref<const std::uint32_t> counter(*addr);
    const auto start = std::chrono::steady_clock::now();
    auto pause = std::chrono::microseconds(0);
    while (counter.load(std::memory_order_acquire) < value) {
      if (timeout_s > 0 &&
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > timeout_s)
        fail(ErrorKind::io, "waited {:.0f} s for {} (it stayed at {}, {} needed): the rank that writes it died or hung",
             timeout_s, what, counter.load(std::memory_order_acquire), value);
      if (pause.count() > 0) std::this_thread::sleep_for(pause);
      pause = std::min(std::chrono::microseconds(500), pause + std::chrono::microseconds(5));
    }
  });
}

void Stream::write_value(std::uint32_t* addr, std::uint32_t value) {
  launch_host([addr, value] { std::atomic_ref<std::uint32_t>(*addr).store(value, std::memory_order_release); });
}

namespace {
// Note [Device groups] where device memory is host memory (the CPU backend).
class HostMemoryGroup final : public DeviceGroup {
 public:
  explicit HostMemoryGroup(std::unique_ptr<Comm> node) : node_(std::move(node)) {}
  void all_gather(Stream& s, void* buffer, std::span<const std::size_t> offsets) override {
    std::vector<std::size_t> o(offsets.begin(), offsets.end());
    Comm* node = node_.get();
    s.launch_host([node, buffer, o = std::move(o)] { node->all_gather_bytes(buffer, o, "the slices of an upload"); });
  }

 private:
  std::unique_ptr<Comm> node_;
};
}  // namespace

std::unique_ptr<DeviceGroup> Device::make_group(std::unique_ptr<Comm> node) {
  return std::make_unique<HostMemoryGroup>(std::move(node));
}

HostBuffer host_alloc_aligned(std::size_t bytes) {
  const std::size_t size = align_up(bytes == 0 ? 1 : bytes);
  void* p = std::aligned_alloc(kAlignment, size);
  if (!p)
    fail(ErrorKind::out_of_memory, "cannot allocate {} of host memory",
         format_bytes(static_cast<double>(size)));
  std::memset(p, 0, size);
  return HostBuffer(p, bytes, false, [](void* q) { std::free(q); });
}

std::size_t physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGE_SIZE);
  const std::size_t ram = pages > 0 && page > 0 ? static_cast<std::size_t>(pages) * static_cast<std::size_t>(page) : 0;
  const CgroupMemory cgroup = cgroup_memory();
  return cgroup.tightest.set() && (ram == 0 || cgroup.tightest.limit < ram) ? cgroup.tightest.limit : ram;
}

int default_threads() {
  const int pool = std::max(1, tbb::info::default_concurrency());
  const CgroupCpuQuota quota = cgroup_cpu_quota();
  return quota.cpus > 0 ? std::min(pool, quota.cpus) : pool;
}

std::size_t address_space_headroom() {
  // The current use of each limited quantity: VmSize for RLIMIT_AS, VmData for RLIMIT_DATA.
  auto status_bytes = [](std::string_view key) -> std::size_t {
    std::ifstream in("/proc/self/status");
    std::string line;
    while (std::getline(in, line))
      if (line.starts_with(key)) return static_cast<std::size_t>(std::strtoull(line.c_str() + key.size(), nullptr, 10)) << 10;
    return 0;
  };
  std::size_t headroom = SIZE_MAX;
  for (const auto& [resource, key] : {std::pair{RLIMIT_AS, "VmSize:"}, std::pair{RLIMIT_DATA, "VmData:"}}) {
    rlimit r{};
    if (::getrlimit(resource, &r) != 0 || r.rlim_cur == RLIM_INFINITY) continue;
    const std::size_t used = status_bytes(key);
    const auto limit = static_cast<std::size_t>(r.rlim_cur);
    headroom = std::min(headroom, limit > used ? limit - used : 0);
  }
  return headroom;
}

std::size_t kernel_threads_address_space(int threads) {
  const auto n = static_cast<std::size_t>(threads > 0 ? threads : default_threads());
  return (n + kKernelCallingStreams) * kThreadAddressSpace;
}

std::size_t cpu_default_arena_bytes(int threads) {
  std::size_t bytes = physical_memory_bytes();
  if (bytes == 0) bytes = std::size_t{16} << 30;
  const std::size_t headroom = address_space_headroom();
  if (headroom == SIZE_MAX) return bytes;
  const std::size_t kernels = kernel_threads_address_space(threads);
  const std::size_t rest = headroom > kernels ? (headroom - kernels) / 2 : 0;
  return std::min(bytes, rest & ~std::size_t{4095});
}

HostMemory host_memory() {
  if (const char* env = std::getenv("ZO2_HOST_MEM_AVAILABLE"); env != nullptr && *env != '\0') {
    try {
      return {parse_byte_size(env), "ZO2_HOST_MEM_AVAILABLE"};
    } catch (const Error& e) {
      fail(ErrorKind::invalid_argument, "ZO2_HOST_MEM_AVAILABLE: {}", e.what());
    }
  }
  HostMemory h;
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  std::uint64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib) {
    std::getline(meminfo, unit);
    if (key == "MemAvailable:") {
      h = {static_cast<std::size_t>(kib) * 1024, "MemAvailable in /proc/meminfo"};
      break;
    }
  }
  // Note [Cgroup limits]: in a container MemAvailable is the host's.
  if (const CgroupMemoryLimit& c = cgroup_memory().least_headroom; c.set() && c.headroom() < h.available)
    h = {c.headroom(), fmt::format("the cgroup memory limit, {} in {}, less {} in use",
                                   format_bytes(static_cast<double>(c.limit)), c.file,
                                   format_bytes(static_cast<double>(c.used)))};
  return h;
}

std::size_t host_memory_available() { return host_memory().available; }

std::unique_ptr<Device> make_device(const DeviceOptions& options) {
  if (options.kind == DeviceKind::cpu) return cpu_make_device(options);
  const int n = cuda_device_count();
  if (n == 0)
    return cuda_make_device(options);  // the stub or the CUDA backend explains why
  if (options.index < 0 || options.index >= n)
    fail(ErrorKind::device, "cuda:{} requested but this machine has {} CUDA device(s)",
         options.index, n);
  return cuda_make_device(options);
}

DeviceOptions parse_device(std::string_view spec) {
  DeviceOptions o;
  if (spec == "cpu") return o;
  if (spec == "auto") {
    if (cuda_device_count() > 0) o.kind = DeviceKind::cuda;
    return o;
  }
  if (spec.substr(0, 4) == "cuda") {
    o.kind = DeviceKind::cuda;
    if (spec.size() > 4) {
      if (spec[4] != ':' || spec.size() == 5)
        fail(ErrorKind::invalid_argument, "device '{}': expected cpu, cuda, cuda:N or auto", spec);
      // N: decimal digits only (no sign or blank, as strtol would take), a device ordinal.
      const std::string_view idx = spec.substr(5);
      if (idx.size() > 4 || idx.find_first_not_of("0123456789") != std::string_view::npos)
        fail(ErrorKind::invalid_argument, "device '{}': expected cpu, cuda, cuda:N (N an ordinal, 0–9999) or auto",
             spec);
      o.index = std::stoi(std::string(idx));
    }
    return o;
  }
  fail(ErrorKind::invalid_argument, "device '{}': expected cpu, cuda, cuda:N or auto", spec);
}

}  // namespace zo2
