// Tests of Note [Cgroup limits] (runtime/cgroup.h): the readers on fake cgroup v2 and v1 trees
// (the tightest level over a nested cgroup and its ancestors, headroom under a limit an
// ancestor shares with siblings, inactive page cache not counted as used, "max" and v1's
// huge values as no limit, a container's mount root, a hybrid host, CPU quotas rounded up,
// missing and garbled files as no limit), the wrappers on this machine, and — where the test
// runs as root with a writable cgroup hierarchy — a forked child in a real child cgroup: its
// host memory, physical memory, default threads, CPU device and rank binding are bounded by
// the limits, and zo2-tune refuses a model over the memory limit by naming it instead
// of being killed.
#include "runtime/cgroup.h"

#include "runtime/cpu/cpu_device.h"
#include "runtime/device.h"
#include "runtime/topology.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/info.h>
#include <oneapi/tbb/task_arena.h>

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace zo2 {
namespace {

namespace fs = std::filesystem;

constexpr std::size_t MiB = std::size_t{1} << 20;

const char* kV2Mount = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
                       "rw,nsdelegate,memory_recursiveprot\n";

// /proc/self/cgroup, /proc/self/mountinfo and the mounts' files under a temporary directory.
class FakeTree {
 public:
  FakeTree(const std::string& cgroup, const std::string& mountinfo) {
    paths_.proc_self_cgroup = tmp_ / "cgroup";
    paths_.proc_self_mountinfo = tmp_ / "mountinfo";
    paths_.mount_prefix = tmp_ / "root";
    write(paths_.proc_self_cgroup, cgroup);
    write(paths_.proc_self_mountinfo, mountinfo);
  }
  // A file under the prefix, e.g. put("sys/fs/cgroup/job/memory.max", "1073741824\n").
  void put(const std::string& file, const std::string& text) { write(paths_.mount_prefix / file, text); }
  std::string at(const std::string& file) const { return (paths_.mount_prefix / file).string(); }
  const CgroupPaths& paths() const { return paths_; }

 private:
  static void write(const fs::path& p, const std::string& text) {
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }
  test::TempDir tmp_;
  CgroupPaths paths_;
};

TEST(CgroupV2, MemoryLimitIsTheTightestOfTheCgroupAndItsAncestors) {
  FakeTree t("0::/job/step/task\n", kV2Mount);
  t.put("sys/fs/cgroup/memory.current", "99999999999\n");  // the root: no memory.max
  t.put("sys/fs/cgroup/job/memory.max", std::to_string(1024 * MiB) + "\n");
  t.put("sys/fs/cgroup/job/memory.current", std::to_string(600 * MiB) + "\n");
  t.put("sys/fs/cgroup/job/memory.stat", "anon 1\nfile 2\nactive_file 300\ninactive_file " +
                                             std::to_string(100 * MiB) + "\nslab 4\n");
  t.put("sys/fs/cgroup/job/step/memory.max", std::to_string(2048 * MiB) + "\n");
  t.put("sys/fs/cgroup/job/step/memory.current", std::to_string(500 * MiB) + "\n");
  t.put("sys/fs/cgroup/job/step/task/memory.max", "max\n");
  t.put("sys/fs/cgroup/job/step/task/memory.current", std::to_string(300 * MiB) + "\n");
  const CgroupMemory m = read_cgroup_memory(t.paths());
  EXPECT_EQ(m.tightest.limit, 1024 * MiB);
  EXPECT_EQ(m.tightest.file, t.at("sys/fs/cgroup/job/memory.max"));
  // The inactive page cache is reclaimable: 600 MiB used less 100 MiB of it.
  EXPECT_EQ(m.tightest.used, 500 * MiB);
  EXPECT_EQ(m.least_headroom.file, t.at("sys/fs/cgroup/job/memory.max"));
  EXPECT_EQ(m.least_headroom.headroom(), 524 * MiB);
  EXPECT_EQ(cgroup_directories(t.paths(), {}),
            (std::vector<fs::path>{t.at("sys/fs/cgroup/job/step/task"), t.at("sys/fs/cgroup/job/step"),
                                   t.at("sys/fs/cgroup/job"), t.at("sys/fs/cgroup")}));
}

// A looser ancestor limit that siblings fill leaves less than the cgroup's own tighter one.
TEST(CgroupV2, HeadroomCountsWhatSiblingsUseUnderASharedAncestorLimit) {
  FakeTree t("0::/pod/ctr\n", kV2Mount);
  t.put("sys/fs/cgroup/pod/memory.max", std::to_string(1024 * MiB) + "\n");
  t.put("sys/fs/cgroup/pod/memory.current", std::to_string(900 * MiB) + "\n");
  t.put("sys/fs/cgroup/pod/ctr/memory.max", std::to_string(800 * MiB) + "\n");
  t.put("sys/fs/cgroup/pod/ctr/memory.current", std::to_string(100 * MiB) + "\n");
  const CgroupMemory m = read_cgroup_memory(t.paths());
  EXPECT_EQ(m.tightest.limit, 800 * MiB);
  EXPECT_EQ(m.tightest.file, t.at("sys/fs/cgroup/pod/ctr/memory.max"));
  EXPECT_EQ(m.least_headroom.headroom(), 124 * MiB);
  EXPECT_EQ(m.least_headroom.file, t.at("sys/fs/cgroup/pod/memory.max"));
}

// memory.high (systemd's MemoryHigh=) throttles past it: a limit where it is below memory.max,
// named as the file that set it; "max" is none.
TEST(CgroupV2, MemoryHighBelowMemoryMaxIsTheLimit) {
  FakeTree t("0::/user.slice/job\n", kV2Mount);
  t.put("sys/fs/cgroup/user.slice/memory.max", std::to_string(4096 * MiB) + "\n");
  t.put("sys/fs/cgroup/user.slice/memory.high", std::to_string(8192 * MiB) + "\n");  // above: max's
  t.put("sys/fs/cgroup/user.slice/memory.current", std::to_string(100 * MiB) + "\n");
  t.put("sys/fs/cgroup/user.slice/job/memory.max", "max\n");
  t.put("sys/fs/cgroup/user.slice/job/memory.high", std::to_string(1024 * MiB) + "\n");
  t.put("sys/fs/cgroup/user.slice/job/memory.current", std::to_string(24 * MiB) + "\n");
  CgroupMemory m = read_cgroup_memory(t.paths());
  EXPECT_EQ(m.tightest.limit, 1024 * MiB);
  EXPECT_EQ(m.tightest.file, t.at("sys/fs/cgroup/user.slice/job/memory.high"));
  EXPECT_EQ(m.least_headroom.headroom(), 1000 * MiB);
  t.put("sys/fs/cgroup/user.slice/job/memory.high", "max\n");
  m = read_cgroup_memory(t.paths());
  EXPECT_EQ(m.tightest.limit, 4096 * MiB);
  EXPECT_EQ(m.tightest.file, t.at("sys/fs/cgroup/user.slice/memory.max"));
}

TEST(CgroupV2, MaxEverywhereIsNoLimit) {
  FakeTree t("0::/user.slice/session-1.scope\n", kV2Mount);
  t.put("sys/fs/cgroup/user.slice/memory.max", "max\n");
  t.put("sys/fs/cgroup/user.slice/cpu.max", "max 100000\n");
  t.put("sys/fs/cgroup/user.slice/session-1.scope/memory.max", "max\n");
  t.put("sys/fs/cgroup/user.slice/session-1.scope/memory.current", "12345\n");
  const CgroupMemory m = read_cgroup_memory(t.paths());
  EXPECT_FALSE(m.tightest.set());
  EXPECT_FALSE(m.least_headroom.set());
  EXPECT_EQ(m.tightest.limit, SIZE_MAX);
  EXPECT_EQ(read_cgroup_cpu_quota(t.paths()).cpus, 0);
}

TEST(CgroupV2, CpuQuotaRoundsUpAndTheTightestLevelWins) {
  FakeTree t("0::/job/task\n", kV2Mount);
  t.put("sys/fs/cgroup/job/cpu.max", "250000 100000\n");
  t.put("sys/fs/cgroup/job/task/cpu.max", "max 100000\n");
  CgroupCpuQuota q = read_cgroup_cpu_quota(t.paths());
  EXPECT_EQ(q.cpus, 3);
  EXPECT_EQ(q.quota_us, 250000);
  EXPECT_EQ(q.period_us, 100000);
  EXPECT_EQ(q.file, t.at("sys/fs/cgroup/job/cpu.max"));
  // Half a CPU's time is still one thread; 2.5 CPUs over a 50 ms period beats 2.5 over 100 ms
  // by nothing, 0.5 by far.
  t.put("sys/fs/cgroup/job/task/cpu.max", "25000 50000\n");
  q = read_cgroup_cpu_quota(t.paths());
  EXPECT_EQ(q.cpus, 1);
  EXPECT_EQ(q.file, t.at("sys/fs/cgroup/job/task/cpu.max"));
  t.put("sys/fs/cgroup/job/task/cpu.max", "400000 100000\n");
  EXPECT_EQ(read_cgroup_cpu_quota(t.paths()).cpus, 3);
}

// With a cgroup namespace the process's cgroup is "/" and the mount's root is the container's
// cgroup, whose own limit applies.
TEST(CgroupV2, InANamespaceTheMountRootIsTheContainersCgroup) {
  FakeTree t("0::/\n", "1100 1090 0:29 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n");
  t.put("sys/fs/cgroup/memory.max", std::to_string(32 * 1024 * MiB) + "\n");
  t.put("sys/fs/cgroup/memory.current", std::to_string(1024 * MiB) + "\n");
  t.put("sys/fs/cgroup/cpu.max", "400000 100000\n");
  const CgroupMemory m = read_cgroup_memory(t.paths());
  EXPECT_EQ(m.tightest.limit, 32 * 1024 * MiB);
  EXPECT_EQ(m.least_headroom.headroom(), 31 * 1024 * MiB);
  EXPECT_EQ(read_cgroup_cpu_quota(t.paths()).cpus, 4);
}

// Without a namespace the path is the host's, and mountinfo's root says which part of the
// hierarchy the mount shows: the directory is the mount point plus the path below that root.
TEST(CgroupV2, AMountOfPartOfTheHierarchyIsEnteredBelowItsRoot) {
  FakeTree t("0::/kubepods/pod1/ctr\n", "1100 1090 0:29 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup rw\n");
  t.put("sys/fs/cgroup/memory.max", std::to_string(2048 * MiB) + "\n");
  t.put("sys/fs/cgroup/ctr/memory.max", std::to_string(1024 * MiB) + "\n");
  // Where the whole path would wrongly lead.
  t.put("sys/fs/cgroup/kubepods/pod1/ctr/memory.max", std::to_string(1 * MiB) + "\n");
  EXPECT_EQ(cgroup_directories(t.paths(), {}),
            (std::vector<fs::path>{t.at("sys/fs/cgroup/ctr"), t.at("sys/fs/cgroup")}));
  EXPECT_EQ(read_cgroup_memory(t.paths()).tightest.limit, 1024 * MiB);
}

TEST(CgroupV1, HugeValuesAreNoLimitAndAnAncestorsLimitCounts) {
  FakeTree t("12:pids:/slurm/uid_0/job_7\n4:memory:/slurm/uid_0/job_7\n0::/\n",
             "35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory\n");
  const std::string dir = "sys/fs/cgroup/memory/";
  t.put(dir + "memory.limit_in_bytes", "9223372036854771712\n");
  t.put(dir + "memory.usage_in_bytes", "99999999999\n");
  t.put(dir + "slurm/memory.limit_in_bytes", "9223372036854771712\n");
  t.put(dir + "slurm/uid_0/job_7/memory.limit_in_bytes", "9223372036854771712\n");
  EXPECT_FALSE(read_cgroup_memory(t.paths()).tightest.set());
  t.put(dir + "slurm/uid_0/memory.limit_in_bytes", std::to_string(1024 * MiB) + "\n");
  t.put(dir + "slurm/uid_0/memory.usage_in_bytes", std::to_string(800 * MiB) + "\n");
  // total_inactive_file covers the descendants as usage does; inactive_file is the cgroup's own.
  t.put(dir + "slurm/uid_0/memory.stat", "cache 1\ninactive_file " + std::to_string(1 * MiB) +
                                             "\ntotal_cache 2\ntotal_inactive_file " + std::to_string(300 * MiB) + "\n");
  t.put(dir + "slurm/uid_0/job_7/memory.limit_in_bytes", std::to_string(2048 * MiB) + "\n");
  t.put(dir + "slurm/uid_0/job_7/memory.usage_in_bytes", std::to_string(700 * MiB) + "\n");
  const CgroupMemory m = read_cgroup_memory(t.paths());
  EXPECT_EQ(m.tightest.limit, 1024 * MiB);
  EXPECT_EQ(m.tightest.file, t.at(dir + "slurm/uid_0/memory.limit_in_bytes"));
  EXPECT_EQ(m.least_headroom.used, 500 * MiB);
  EXPECT_EQ(m.least_headroom.headroom(), 524 * MiB);
}

// Docker without a cgroup namespace on a v1 host: the memory mount shows /docker/ID only.
TEST(CgroupV1, AContainersMountRootIsTakenOffThePath) {
  FakeTree t("4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n",
             "700 690 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n"
             "701 690 0:30 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n");
  t.put("sys/fs/cgroup/memory/memory.limit_in_bytes", std::to_string(512 * MiB) + "\n");
  t.put("sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", std::to_string(1 * MiB) + "\n");  // not this
  t.put("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "200000\n");
  t.put("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(cgroup_directories(t.paths(), "memory"), (std::vector<fs::path>{t.at("sys/fs/cgroup/memory")}));
  EXPECT_EQ(read_cgroup_memory(t.paths()).tightest.limit, 512 * MiB);
  EXPECT_EQ(read_cgroup_cpu_quota(t.paths()).cpus, 2);
}

// The quota is cpu's, not that of a hierarchy whose controller name merely starts with "cpu".
TEST(CgroupV1, CpuQuotaComesFromTheCpuHierarchyAndMinusOneIsNone) {
  FakeTree t("3:cpuacct:/a\n2:cpuset:/a\n1:cpu:/a/b\n",
             "33 31 0:30 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n"
             "34 31 0:31 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n"
             "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n");
  for (const char* decoy : {"sys/fs/cgroup/cpuacct/a/", "sys/fs/cgroup/cpuset/a/"}) {
    t.put(std::string(decoy) + "cpu.cfs_quota_us", "10000\n");
    t.put(std::string(decoy) + "cpu.cfs_period_us", "100000\n");
  }
  t.put("sys/fs/cgroup/cpu/a/b/cpu.cfs_quota_us", "-1\n");
  t.put("sys/fs/cgroup/cpu/a/b/cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(read_cgroup_cpu_quota(t.paths()).cpus, 0);
  t.put("sys/fs/cgroup/cpu/a/cpu.cfs_quota_us", "150000\n");
  t.put("sys/fs/cgroup/cpu/a/cpu.cfs_period_us", "100000\n");
  const CgroupCpuQuota q = read_cgroup_cpu_quota(t.paths());
  EXPECT_EQ(q.cpus, 2);
  EXPECT_EQ(q.file, t.at("sys/fs/cgroup/cpu/a/cpu.cfs_quota_us"));
}

// A hybrid host (systemd's default before v2 only): the controllers are v1's, and the v2
// mount beside them has no limit files.
TEST(CgroupV1, AHybridHostReadsBothHierarchies) {
  FakeTree t("4:memory:/user.slice\n1:cpu:/\n0::/user.slice/session-2.scope\n",
             "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
             "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n");
  t.put("sys/fs/cgroup/unified/user.slice/session-2.scope/cgroup.procs", "1\n");
  t.put("sys/fs/cgroup/memory/user.slice/memory.limit_in_bytes", std::to_string(4096 * MiB) + "\n");
  t.put("sys/fs/cgroup/memory/user.slice/memory.usage_in_bytes", std::to_string(96 * MiB) + "\n");
  const CgroupMemory m = read_cgroup_memory(t.paths());
  EXPECT_EQ(m.tightest.limit, 4096 * MiB);
  EXPECT_EQ(m.least_headroom.headroom(), 4000 * MiB);
  EXPECT_EQ(read_cgroup_cpu_quota(t.paths()).cpus, 0);  // (no cpu mount)
}

TEST(Cgroup, MissingOrGarbledFilesAreNoLimit) {
  {
    CgroupPaths nowhere;
    nowhere.proc_self_cgroup = "/nonexistent/cgroup";
    nowhere.proc_self_mountinfo = "/nonexistent/mountinfo";
    EXPECT_TRUE(cgroup_directories(nowhere, {}).empty());
    EXPECT_FALSE(read_cgroup_memory(nowhere).tightest.set());
    EXPECT_EQ(read_cgroup_cpu_quota(nowhere).cpus, 0);
  }
  {  // mounted, but no files at all
    FakeTree t("0::/a\n", kV2Mount);
    EXPECT_FALSE(read_cgroup_memory(t.paths()).tightest.set());
    EXPECT_EQ(read_cgroup_cpu_quota(t.paths()).cpus, 0);
  }
  {  // garbled values
    FakeTree t("0::/a\n4:memory:/a\n1:cpu:/a\n",
               std::string(kV2Mount) + "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n" +
                   "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n");
    t.put("sys/fs/cgroup/a/memory.max", "lots\n");
    t.put("sys/fs/cgroup/a/cpu.max", "garbage\n");
    t.put("sys/fs/cgroup/memory/a/memory.limit_in_bytes", "-5\n");
    t.put("sys/fs/cgroup/memory/a/memory.usage_in_bytes", "x\n");
    t.put("sys/fs/cgroup/cpu/a/cpu.cfs_quota_us", "100000\n");  // no period
    t.put("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "0\n");
    t.put("sys/fs/cgroup/cpu/cpu.cfs_period_us", "0\n");
    EXPECT_FALSE(read_cgroup_memory(t.paths()).tightest.set());
    EXPECT_EQ(read_cgroup_cpu_quota(t.paths()).cpus, 0);
    // A usage that cannot be read leaves the whole limit.
    t.put("sys/fs/cgroup/memory/a/memory.limit_in_bytes", std::to_string(64 * MiB) + "\n");
    EXPECT_EQ(read_cgroup_memory(t.paths()).least_headroom.headroom(), 64 * MiB);
  }
  {  // a cgroup outside the mount (moved out of the namespace) and no line for the hierarchy
    FakeTree t("0::/../other\n", kV2Mount);
    t.put("sys/fs/cgroup/memory.max", "1000\n");
    EXPECT_TRUE(cgroup_directories(t.paths(), {}).empty());
    EXPECT_TRUE(cgroup_directories(t.paths(), "memory").empty());
    EXPECT_FALSE(read_cgroup_memory(t.paths()).tightest.set());
  }
}

// --- this machine ---

TEST(CgroupMachine, TheWrappersGiveSaneValuesHere) {
  const CgroupMemory m = cgroup_memory();
  if (m.tightest.set()) {
    EXPECT_GT(m.tightest.limit, 0u);
    EXPECT_TRUE(fs::exists(m.tightest.file)) << m.tightest.file;
    EXPECT_LE(m.least_headroom.headroom(), m.tightest.limit);
  }
  const CgroupCpuQuota q = cgroup_cpu_quota();
  if (q.cpus > 0) {
    EXPECT_TRUE(fs::exists(q.file)) << q.file;
  }
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  const std::size_t ram = static_cast<std::size_t>(pages) * static_cast<std::size_t>(page);
  EXPECT_GT(physical_memory_bytes(), 0u);
  EXPECT_LE(physical_memory_bytes(), ram);
  EXPECT_EQ(physical_memory_bytes(), std::min(ram, m.tightest.limit));
  EXPECT_GE(default_threads(), 1);
  EXPECT_LE(default_threads(), tbb::info::default_concurrency());
  // What the machine and the cgroups have free moves between two reads (CI runs other
  // tests beside this one), so only what holds at every moment is compared: the headroom
  // under a limit is never more than that limit, and the override is read exactly.
  const HostMemory h = host_memory();
  EXPECT_GT(h.available, 0u);
  EXPECT_FALSE(h.source.empty());
  if (std::getenv("ZO2_HOST_MEM_AVAILABLE") == nullptr && m.tightest.set()) {
    EXPECT_LE(h.available, m.tightest.limit) << h.source;
  }
  {
    const test::ScopedEnv env("ZO2_HOST_MEM_AVAILABLE", "3G");
    EXPECT_EQ(host_memory().available, std::size_t{3} << 30);
    EXPECT_EQ(host_memory_available(), std::size_t{3} << 30);
    EXPECT_EQ(host_memory().source, "ZO2_HOST_MEM_AVAILABLE");
  }
}

bool write_text(const fs::path& file, const std::string& text) {
  const int fd = ::open(file.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  return ::close(fd) == 0 && ok;
}

// A new child of this process's cgroup in the hierarchy of `controller` (v1, else v2),
// removed at the end; `dir` empty (and `why` set) when none can be made here.
class ChildCgroup {
 public:
  explicit ChildCgroup(const std::string& controller) {
    const std::string name = fmt::format("zo2-test-{}-{}", ::getpid(), controller);
    if (const auto v1 = cgroup_directories(CgroupPaths{}, controller); !v1.empty()) {
      make(v1.front() / name, controller == "memory" ? "memory.limit_in_bytes" : "cpu.cfs_quota_us", true);
    } else if (const auto v2 = cgroup_directories(CgroupPaths{}, {}); !v2.empty()) {
      // v2: the parent must hand the controller down (cgroup.subtree_control), which it can
      // only do while it holds no process itself (or is the root).
      std::ifstream in(v2.front() / "cgroup.subtree_control");
      std::string enabled((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      if (enabled.find(controller) == std::string::npos &&
          !write_text(v2.front() / "cgroup.subtree_control", "+" + controller))
        why_ = fmt::format("cannot enable {} in {}", controller, v2.front().string());
      else
        make(v2.front() / name, controller == "memory" ? "memory.max" : "cpu.max", false);
    } else {
      why_ = "no cgroup hierarchy is mounted for " + controller;
    }
  }
  ~ChildCgroup() {
    if (!dir_.empty()) ::rmdir(dir_.c_str());
  }
  ChildCgroup(const ChildCgroup&) = delete;
  ChildCgroup& operator=(const ChildCgroup&) = delete;
  const fs::path& dir() const { return dir_; }
  const std::string& why() const { return why_; }
  bool v1() const { return v1_; }
  bool set(const std::string& file, const std::string& value) const { return write_text(dir_ / file, value); }
  // Moves process `pid` (0: the caller) into the cgroup.
  bool enter(pid_t pid = 0) const { return set("cgroup.procs", std::to_string(pid == 0 ? ::getpid() : pid)); }

 private:
  void make(const fs::path& dir, const std::string& probe, bool v1) {
    if (::mkdir(dir.c_str(), 0755) != 0) {
      why_ = fmt::format("cannot create {}: {}", dir.string(), std::strerror(errno));
      return;
    }
    dir_ = dir;
    v1_ = v1;
    if (!fs::exists(dir / probe)) {
      why_ = fmt::format("{} has no {}", dir.string(), probe);
      ::rmdir(dir.c_str());
      dir_.clear();
    }
  }
  fs::path dir_;
  std::string why_;
  bool v1_ = false;
};

TEST(CgroupMachine, AMemoryLimitBoundsHostAndPhysicalMemoryInsideIt) {
  ChildCgroup cg("memory");
  if (cg.dir().empty()) GTEST_SKIP() << cg.why();
  const std::size_t limit = 256 * MiB;
  ASSERT_TRUE(cg.set(cg.v1() ? "memory.limit_in_bytes" : "memory.max", std::to_string(limit))) << cg.dir();
  const std::size_t outside = host_memory_available();
  const int rc = test::in_child([&] {
    ::unsetenv("ZO2_HOST_MEM_AVAILABLE");
    if (!cg.enter()) return 2;
    const HostMemory h = host_memory();
    const std::size_t physical = physical_memory_bytes();
    const std::size_t arena = cpu_default_arena_bytes(1);
    std::fprintf(stderr, "inside %s: available %zu (%s), physical %zu, default arena %zu\n", cg.dir().c_str(),
                 h.available, h.source.c_str(), physical, arena);
    if (h.available > limit || physical > limit || arena > limit) return 1;
    if (h.source.find(cg.dir().string()) == std::string::npos ||
        h.source.find("cgroup memory limit") == std::string::npos)
      return 3;
    return 0;
  });
  EXPECT_EQ(rc, 0);
  if (outside > 2 * limit) {
    EXPECT_GT(host_memory_available(), limit);  // (the parent is not inside)
  }
}

// Note [Kernel threads]: the quota bounds the device's kernels (its arena), not the rest of
// the process's TBB.
TEST(CgroupMachine, ACpuQuotaBoundsTheDefaultThreadsAndTheCpuDevicesKernels) {
  ChildCgroup cg("cpu");
  if (cg.dir().empty()) GTEST_SKIP() << cg.why();
  if (tbb::info::default_concurrency() < 2) GTEST_SKIP() << "one CPU: a quota of one changes nothing";
  ASSERT_TRUE(cg.v1() ? cg.set("cpu.cfs_period_us", "100000") && cg.set("cpu.cfs_quota_us", "100000")
                      : cg.set("cpu.max", "100000 100000"))
      << cg.dir();
  const int rc = test::in_child([&] {
    if (!cg.enter()) return 2;
    const int threads = default_threads();
    if (threads != 1 || cgroup_cpu_quota().cpus != 1) {
      std::fprintf(stderr, "inside %s: default_threads() %d\n", cg.dir().c_str(), threads);
      return 1;
    }
    DeviceOptions o;
    o.kind = DeviceKind::cpu;
    const auto dev = make_device(o);
    const auto s = dev->make_stream("compute");
    int kernel = 0;
    cpu::enqueue(*s, cpu::kernel_arena(*dev), [&] { kernel = tbb::this_task_arena::max_concurrency(); });
    s->synchronize();
    const std::size_t pool = tbb::global_control::active_value(tbb::global_control::max_allowed_parallelism);
    std::fprintf(stderr, "inside %s: %s, kernels' arena %d, the process's TBB %zu\n", cg.dir().c_str(),
                 dev->name().c_str(), kernel, pool);
    if (dev->name().find("(1 threads") == std::string::npos) return 3;
#if !defined(ZO2_TSAN)  // (which runs kernels in no arena, and caps TBB itself)
    if (kernel != 1) return 4;
    if (pool < static_cast<std::size_t>(tbb::info::default_concurrency())) return 6;  // the host's TBB is its own
#endif
    // A rank's binding (Note [Rank binding]) takes no more threads than the quota either.
    const RankBinding binding = bind_rank(0, 1, {}, false);
    std::fprintf(stderr, "inside %s: %s\n", cg.dir().c_str(), binding.describe().c_str());
    return binding.threads == 1 && binding.note.find("CPU quota") != std::string::npos ? 0 : 5;
  });
  EXPECT_EQ(rc, 0);
}

// zo2-tune in a container whose memory limit a model's master weights exceed: refused before
// anything is loaded, naming the limit (MemAvailable, the host's, let it load into the
// kernel's OOM killer, which ends a process without a word).
TEST(CgroupMachine, ZoTuneRefusesAModelOverTheMemoryLimitByNamingIt) {
  ChildCgroup cg("memory");
  if (cg.dir().empty()) GTEST_SKIP() << cg.why();
  ASSERT_TRUE(cg.set(cg.v1() ? "memory.limit_in_bytes" : "memory.max", std::to_string(128 * MiB))) << cg.dir();
  test::TempDir tmp;
  const std::string tune = test::zo2_tune_path().string();
  std::string out;
  // 125M parameters: 239 MiB of master weights in bf16.
  ASSERT_EQ(test::run_command(tune + " init --preset opt-125m --dtype bf16 --out " + (tmp / "m").string() + " -q", &out),
            0)
      << out;
  const int rc = test::run_command("unset ZO2_HOST_MEM_AVAILABLE; echo $$ > " + (cg.dir() / "cgroup.procs").string() +
                                       " && exec " + tune + " train --model " + (tmp / "m").string() + " --data " +
                                       (tmp / "data.safetensors").string() + " --out " + (tmp / "run").string() +
                                       " --storage-dtype bf16 --steps 1",
                                   &out);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("host memory: the master weights"), std::string::npos) << out;
  EXPECT_NE(out.find("the cgroup memory limit, 128.00 MiB in " + cg.dir().string()), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(tmp / "run"));
}

}  // namespace
}  // namespace zo2
