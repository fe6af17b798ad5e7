// This process's cgroup limits (memory and CPU quota), cgroup v2 and v1: in a container or a
// batch job (docker --memory/--cpus, Kubernetes limits, Slurm) /proc/meminfo and the CPU
// count describe the whole host, and what the process may really use is here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace zo2 {

// Note [Cgroup limits]
// A limit applies to a cgroup and everything below it, so the limit on this process is the
// tightest over its cgroup and all the ancestors that can be seen: from the cgroup
// /proc/self/cgroup names (v2: the line "0::/path"; v1: the line whose controller list holds
// `memory` or `cpu`) up to the root of the hierarchy's mount (mountinfo: fstype cgroup2, or
// cgroup with the controller among the super options). A container often sees only its own
// part of the hierarchy: with a cgroup namespace /proc/self/cgroup says "/" and the mount's
// root is the container's cgroup; without one the path is the host's ("/docker/ID") and
// mountinfo's root field says which part of it is mounted ("/docker/ID"), so the directory is
// the mount point plus the path less that root.
// - Memory: v2 memory.max ("max" = none) or memory.high where it is lower (systemd's
//   MemoryHigh=, Kubernetes' memory QoS: past it the cgroup is throttled into reclaim, and
//   pinned master weights cannot be reclaimed, so a run needing more crawls rather than
//   dies), v1 memory.limit_in_bytes (values from 2^62 up, e.g. 9223372036854771712, = none;
//   v1's soft limit only orders reclaim between cgroups and is not one). What a new allocation can take under a limit is the
//   limit less the cgroup's working set: its usage (v2 memory.current, v1
//   memory.usage_in_bytes) less the inactive page cache (memory.stat's inactive_file, v1
//   total_inactive_file), which the kernel reclaims before it kills — as runc and the kubelet
//   count it. Each level's usage covers its descendants, so the least headroom over the
//   levels is what is left.
// - CPU: v2 cpu.max ("400000 100000", "max 100000"), v1 cpu.cfs_quota_us over
//   cpu.cfs_period_us (-1 = none): ceil(quota / period) CPUs of time, at least 1, the least
//   over the levels. More threads than that only take turns being throttled.
// A file that is missing or unreadable means no limit there, never an error: zo2 then uses
// what the machine reports, as before.

// Where the files are: the two proc files, and a prefix put before each mount point
// (empty: this machine). Tests build a fake tree under a temporary directory.
struct CgroupPaths {
  std::filesystem::path proc_self_cgroup = "/proc/self/cgroup";
  std::filesystem::path proc_self_mountinfo = "/proc/self/mountinfo";
  std::filesystem::path mount_prefix;
};

// A memory limit of one cgroup level: `limit` bytes set by `file`, of which `used` (the
// working set) is in use. `file` empty: no limit (limit = SIZE_MAX).
struct CgroupMemoryLimit {
  std::size_t limit = SIZE_MAX;
  std::size_t used = 0;
  std::string file;  // e.g. "/sys/fs/cgroup/memory/docker/ID/memory.limit_in_bytes"
  bool set() const { return !file.empty(); }
  std::size_t headroom() const { return limit > used ? limit - used : 0; }
};

struct CgroupMemory {
  CgroupMemoryLimit tightest;        // the smallest limit (physical memory, as the process sees it)
  CgroupMemoryLimit least_headroom;  // the level whose limit less its working set is smallest
};

// The tightest CPU quota: `cpus` = ceil(quota_us / period_us), at least 1; 0 (and `file`
// empty) when none is set.
struct CgroupCpuQuota {
  int cpus = 0;
  std::int64_t quota_us = 0, period_us = 0;
  std::string file;  // e.g. "/sys/fs/cgroup/job/cpu.max"
};

// This process's cgroup directory in the v1 hierarchy that holds `v1_controller` ("memory",
// "cpu"), or in the v2 hierarchy when it is empty, then each ancestor up to the root of the
// hierarchy's mount; empty when that hierarchy is not mounted or the process's cgroup lies
// outside the mount.
std::vector<std::filesystem::path> cgroup_directories(const CgroupPaths& paths, std::string_view v1_controller);

// Read from the files `paths` names (Note [Cgroup limits]); never throw for the files' sake.
CgroupMemory read_cgroup_memory(const CgroupPaths& paths);
CgroupCpuQuota read_cgroup_cpu_quota(const CgroupPaths& paths);

// The same for this process (/proc/self and the real mounts).
CgroupMemory cgroup_memory();
CgroupCpuQuota cgroup_cpu_quota();

}  // namespace zo2
