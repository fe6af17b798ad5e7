// Note [Cgroup limits] (cgroup.h): find the process's cgroup directory in each hierarchy,
// then read the limit files from it up to the mount's root.
#include "runtime/cgroup.h"

#include <algorithm>
#include <charconv>
#include <fstream>
#include <optional>
#include <sstream>
#include <string_view>
#include <vector>

namespace zo2 {
namespace {

namespace fs = std::filesystem;

std::optional<std::string> read_text(const fs::path& file) {
  std::ifstream in(file);
  if (!in) return std::nullopt;
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) return std::nullopt;
  return s.str();
}

std::string_view trim(std::string_view s) {
  const auto first = s.find_first_not_of(" \t\n");
  if (first == std::string_view::npos) return {};
  return s.substr(first, s.find_last_not_of(" \t\n") - first + 1);
}

// The whole of `s` (spaces around it aside) as a T; nullopt otherwise.
template <class T>
std::optional<T> parse_number(std::string_view s) {
  s = trim(s);
  T v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}
std::optional<std::int64_t> parse_int(std::string_view s) { return parse_number<std::int64_t>(s); }
std::optional<std::uint64_t> parse_uint(std::string_view s) { return parse_number<std::uint64_t>(s); }

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> parts;
  while (true) {
    const auto at = s.find(sep);
    parts.push_back(s.substr(0, at));
    if (at == std::string_view::npos) return parts;
    s.remove_prefix(at + 1);
  }
}

bool contains(const std::vector<std::string_view>& v, std::string_view x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

// mountinfo escapes space, tab, newline and backslash in paths as \ooo.
std::string unescape_octal(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() &&
        std::all_of(s.begin() + static_cast<std::ptrdiff_t>(i) + 1, s.begin() + static_cast<std::ptrdiff_t>(i) + 4,
                    [](char c) { return c >= '0' && c <= '7'; })) {
      out += static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0'));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

// A byte limit: a number below 2^62 (v1 writes "no limit" as the largest page-aligned
// int64, v2 as "max"); nullopt for none.
std::optional<std::size_t> read_limit(const fs::path& file) {
  const std::optional<std::string> text = read_text(file);
  if (!text) return std::nullopt;
  const std::optional<std::uint64_t> v = parse_uint(*text);
  if (!v || *v >= (std::uint64_t{1} << 62)) return std::nullopt;
  return static_cast<std::size_t>(*v);
}

std::size_t read_bytes(const fs::path& file) {
  const std::optional<std::string> text = read_text(file);
  const std::optional<std::uint64_t> v = text ? parse_uint(*text) : std::nullopt;
  return v ? static_cast<std::size_t>(*v) : 0;
}

// A "key value" line of memory.stat; nullopt when absent.
std::optional<std::size_t> stat_value(const std::string& stat, std::string_view key) {
  for (std::string_view line : split(stat, '\n')) {
    const auto sp = line.find(' ');
    if (sp == std::string_view::npos || line.substr(0, sp) != key) continue;
    const std::optional<std::uint64_t> v = parse_uint(line.substr(sp + 1));
    if (v) return static_cast<std::size_t>(*v);
  }
  return std::nullopt;
}

void read_memory_levels(const std::vector<fs::path>& levels, bool v2, CgroupMemory& out) {
  for (const fs::path& dir : levels) {
    fs::path limit_file = dir / (v2 ? "memory.max" : "memory.limit_in_bytes");
    std::optional<std::size_t> limit = read_limit(limit_file);
    // v2's memory.high is a limit too where it is lower: past it the kernel throttles the
    // cgroup into reclaim, and the master weights are pinned (unreclaimable), so a run that
    // needs more than memory.high crawls instead of being killed (Note [Cgroup limits]).
    if (v2)
      if (const fs::path high_file = dir / "memory.high"; const std::optional<std::size_t> high = read_limit(high_file))
        if (!limit || *high < *limit) limit = high, limit_file = high_file;
    if (!limit) continue;
    CgroupMemoryLimit level;
    level.limit = *limit;
    level.file = limit_file.string();
    const std::size_t usage = read_bytes(dir / (v2 ? "memory.current" : "memory.usage_in_bytes"));
    std::size_t inactive = 0;
    if (const std::optional<std::string> stat = read_text(dir / "memory.stat")) {
      // v1's inactive_file is this cgroup's own; total_inactive_file counts its descendants,
      // as its usage does (v2's inactive_file already does).
      std::optional<std::size_t> v = stat_value(*stat, v2 ? "inactive_file" : "total_inactive_file");
      if (!v && !v2) v = stat_value(*stat, "inactive_file");
      inactive = v.value_or(0);
    }
    level.used = usage - std::min(usage, inactive);
    if (!out.tightest.set() || level.limit < out.tightest.limit) out.tightest = level;
    if (!out.least_headroom.set() || level.headroom() < out.least_headroom.headroom()) out.least_headroom = level;
  }
}

// Keeps `q` or the quota of `file` (quota_us / period_us), whichever allows less time.
void keep_tighter(CgroupCpuQuota& q, std::int64_t quota, std::int64_t period, const fs::path& file) {
  if (quota <= 0 || period <= 0) return;
  // Compares quota / period with q's exactly: cross products in 128 bits.
  if (!q.file.empty() &&
      static_cast<__int128>(quota) * q.period_us >= static_cast<__int128>(q.quota_us) * period)
    return;
  q.quota_us = quota;
  q.period_us = period;
  q.file = file.string();
  q.cpus = static_cast<int>(std::clamp<std::int64_t>(quota / period + (quota % period != 0), 1, 1 << 20));
}

}  // namespace

std::vector<fs::path> cgroup_directories(const CgroupPaths& paths, std::string_view v1_controller) {
  const bool v2 = v1_controller.empty();
  const std::optional<std::string> cgroup = read_text(paths.proc_self_cgroup);
  const std::optional<std::string> mountinfo = read_text(paths.proc_self_mountinfo);
  if (!cgroup || !mountinfo) return {};
  // "ID:controllers:path" (the path may hold ':'): v2 is "0::path".
  std::optional<std::string> path;
  for (std::string_view line : split(*cgroup, '\n')) {
    const auto c1 = line.find(':');
    const auto c2 = c1 == std::string_view::npos ? c1 : line.find(':', c1 + 1);
    if (c2 == std::string_view::npos) continue;
    const std::string_view id = line.substr(0, c1), controllers = line.substr(c1 + 1, c2 - c1 - 1);
    if (v2 ? id == "0" && controllers.empty() : contains(split(controllers, ','), v1_controller)) {
      path = std::string(line.substr(c2 + 1));
      break;
    }
  }
  if (!path || !path->starts_with('/')) return {};
  // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS":
  // of the mounts of this hierarchy, the one whose root holds the path most closely.
  std::optional<std::string> best_root;
  fs::path best_mount;
  for (std::string_view line : split(*mountinfo, '\n')) {
    std::vector<std::string_view> fields;
    for (std::string_view f : split(line, ' '))
      if (!f.empty()) fields.push_back(f);
    const auto dash = std::find(fields.begin(), fields.end(), std::string_view("-"));
    if (fields.size() < 5 || dash == fields.end() || fields.end() - dash < 4) continue;
    const std::string_view fstype = dash[1], super = dash[3];
    if (v2 ? fstype != "cgroup2" : fstype != "cgroup" || !contains(split(super, ','), v1_controller)) continue;
    const std::string root = unescape_octal(fields[3]);
    const bool holds = root == "/" || *path == root || (path->starts_with(root) && (*path)[root.size()] == '/');
    if (!holds || (best_root && best_root->size() >= root.size())) continue;
    best_root = root;
    best_mount = unescape_octal(fields[4]);
  }
  if (!best_root) return {};
  const fs::path mount = paths.mount_prefix.empty() ? best_mount : paths.mount_prefix / best_mount.relative_path();
  const std::string_view below = std::string_view(*path).substr(*best_root == "/" ? 0 : best_root->size());
  std::vector<fs::path> levels{mount};
  for (std::string_view part : split(below, '/')) {
    if (part.empty()) continue;
    if (part == "." || part == "..") return {};  // (a path outside the namespace: "/../..")
    levels.push_back(levels.back() / std::string(part));
  }
  std::reverse(levels.begin(), levels.end());
  return levels;
}

CgroupMemory read_cgroup_memory(const CgroupPaths& paths) {
  CgroupMemory m;
  // (Both: on a hybrid host the v1 memory hierarchy holds the controller and the v2 one has
  // no memory files; a missing file is no limit.)
  read_memory_levels(cgroup_directories(paths, {}), true, m);
  read_memory_levels(cgroup_directories(paths, "memory"), false, m);
  return m;
}

CgroupCpuQuota read_cgroup_cpu_quota(const CgroupPaths& paths) {
  CgroupCpuQuota q;
  for (const fs::path& dir : cgroup_directories(paths, {})) {
    const std::optional<std::string> text = read_text(dir / "cpu.max");
    if (!text) continue;
    const std::vector<std::string_view> f = split(trim(*text), ' ');
    if (f.size() != 2 || f[0] == "max") continue;
    const auto quota = parse_int(f[0]), period = parse_int(f[1]);
    if (quota && period) keep_tighter(q, *quota, *period, dir / "cpu.max");
  }
  for (const fs::path& dir : cgroup_directories(paths, "cpu")) {
    const std::optional<std::string> quota_text = read_text(dir / "cpu.cfs_quota_us");
    const std::optional<std::string> period_text = read_text(dir / "cpu.cfs_period_us");
    if (!quota_text || !period_text) continue;
    const auto quota = parse_int(*quota_text), period = parse_int(*period_text);
    if (quota && period) keep_tighter(q, *quota, *period, dir / "cpu.cfs_quota_us");
  }
  return q;
}

CgroupMemory cgroup_memory() { return read_cgroup_memory(CgroupPaths{}); }

CgroupCpuQuota cgroup_cpu_quota() { return read_cgroup_cpu_quota(CgroupPaths{}); }

}  // namespace zo2
