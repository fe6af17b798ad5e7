// Note [Rank binding] (topology.h): hwloc reads the node, a pure planner splits it, and
// bind_rank applies the plan with hwloc's binding calls, reporting failures in the result.
#include "runtime/topology.h"

#include "runtime/cgroup.h"
#include "runtime/device.h"
#include "runtime/error.h"

#include <fmt/format.h>
#include <hwloc.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <memory>
#include <thread>

namespace zo2 {
namespace {

// "0-3,8,10-11" for ascending integers.
std::string format_list(const std::vector<int>& v) {
  std::string out;
  for (std::size_t i = 0; i < v.size();) {
    std::size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += j == i ? fmt::format("{}", v[i]) : fmt::format("{}-{}", v[i], v[j]);
    i = j + 1;
  }
  return out.empty() ? "none" : out;
}

void add_note(RankBinding& b, std::string_view text) {
  if (!b.note.empty()) b.note += "; ";
  b.note += text;
}

void check_rank(int local_rank, int local_size) {
  if (local_size < 1 || local_rank < 0 || local_rank >= local_size)
    fail(ErrorKind::invalid_argument, "local rank {} of {}: expected 0 <= rank < size", local_rank,
         local_size);
}

struct BitmapFree {
  void operator()(hwloc_bitmap_s* b) const { hwloc_bitmap_free(b); }
};
using Bitmap = std::unique_ptr<hwloc_bitmap_s, BitmapFree>;

Bitmap bitmap_of(const std::vector<int>& indices) {
  Bitmap b(hwloc_bitmap_alloc());
  if (!b) fail(ErrorKind::out_of_memory, "hwloc: cannot allocate a bitmap");
  for (int i : indices) hwloc_bitmap_set(b.get(), static_cast<unsigned>(i));
  return b;
}

// One loaded hwloc topology, destroyed with its owner.
class HwlocTopology {
 public:
  HwlocTopology(std::string_view description, bool with_io) {
    if (hwloc_topology_init(&t_) != 0) {
      t_ = nullptr;
      fail(ErrorKind::device, "hwloc: cannot create a topology: {}", std::strerror(errno));
    }
    // A constructor that throws runs no destructor: free the topology on the way out.
    try {
      configure_and_load(description, with_io);
    } catch (...) {
      hwloc_topology_destroy(t_);
      t_ = nullptr;
      throw;
    }
  }
  ~HwlocTopology() {
    if (t_) hwloc_topology_destroy(t_);
  }
  HwlocTopology(const HwlocTopology&) = delete;
  HwlocTopology& operator=(const HwlocTopology&) = delete;
  hwloc_topology_t get() const { return t_; }

 private:
  void configure_and_load(std::string_view description, bool with_io) {
    const auto start = description.find_first_not_of(" \t\r\n");
    if (start != std::string_view::npos && description[start] == '<') {
      text_.assign(description);  // hwloc wants the terminating NUL counted in the size
      if (hwloc_topology_set_xmlbuffer(t_, text_.c_str(), static_cast<int>(text_.size() + 1)) != 0)
        fail(ErrorKind::invalid_argument, "hwloc cannot read the XML topology given");
    } else if (start != std::string_view::npos) {
      text_.assign(description);
      if (hwloc_topology_set_synthetic(t_, text_.c_str()) != 0)
        fail(ErrorKind::invalid_argument, "hwloc cannot read the synthetic topology '{}'", text_);
    }
    // Only what locates a GPU: PCI devices of important classes and their bridges.
    if (with_io) hwloc_topology_set_io_types_filter(t_, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    if (hwloc_topology_load(t_) != 0) {
      if (text_.empty())
        fail(ErrorKind::device, "hwloc cannot read this machine's topology: {}", std::strerror(errno));
      fail(ErrorKind::invalid_argument, "hwloc cannot load the topology described: {}",
           std::strerror(errno));
    }
  }

  hwloc_topology_t t_ = nullptr;
  std::string text_;
};

NodeTopology describe(const HwlocTopology& topology, std::span<const std::string> gpu_pci_bus_ids) {
  hwloc_topology_t t = topology.get();
  NodeTopology node;
  // A machine where hwloc finds no cores (some VMs) shows PUs directly: each is a core then.
  const hwloc_obj_type_t core_type =
      hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_CORE) > 0 ? HWLOC_OBJ_CORE : HWLOC_OBJ_PU;
  const int n_cores = hwloc_get_nbobjs_by_type(t, core_type);
  const int n_numa = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_NUMANODE);
  for (int c = 0; c < n_cores; ++c) {
    hwloc_obj_t core = hwloc_get_obj_by_type(t, core_type, static_cast<unsigned>(c));
    NodeTopology::Core entry;
    unsigned pu;
    hwloc_bitmap_foreach_begin(pu, core->cpuset) entry.pus.push_back(static_cast<int>(pu));
    hwloc_bitmap_foreach_end();
    // The first NUMA node (logical order) whose CPUs hold the core: the ordinary memory
    // before any high-bandwidth node with the same CPUs. Memory-only nodes hold no core.
    for (int n = 0; n < n_numa && entry.numa < 0; ++n) {
      hwloc_obj_t numa = hwloc_get_obj_by_type(t, HWLOC_OBJ_NUMANODE, static_cast<unsigned>(n));
      if (numa->cpuset && !hwloc_bitmap_iszero(numa->cpuset) &&
          hwloc_bitmap_isincluded(core->cpuset, numa->cpuset))
        entry.numa = static_cast<int>(numa->os_index);
    }
    node.cores.push_back(std::move(entry));
  }
  for (const std::string& bus_id : gpu_pci_bus_ids) {
    NodeTopology::Gpu gpu{bus_id, {}};
    hwloc_obj_t dev = bus_id.empty() ? nullptr : hwloc_get_pcidev_by_busidstring(t, bus_id.c_str());
    hwloc_obj_t near = dev ? hwloc_get_non_io_ancestor_obj(t, dev) : nullptr;
    if (near && near->nodeset) {
      unsigned n;
      hwloc_bitmap_foreach_begin(n, near->nodeset) {
        const int os = static_cast<int>(n);
        // Only nodes that hold cores: a memory-only node cannot host the rank's threads.
        if (std::any_of(node.cores.begin(), node.cores.end(),
                        [os](const NodeTopology::Core& c) { return c.numa == os; }))
          gpu.numa.push_back(os);
      }
      hwloc_bitmap_foreach_end();
    }
    node.gpus.push_back(std::move(gpu));
  }
  return node;
}

void apply(const HwlocTopology& topology, RankBinding& b) {
  hwloc_topology_t t = topology.get();
  Bitmap cpus = bitmap_of(b.pus);
  if (hwloc_set_cpubind(t, cpus.get(), HWLOC_CPUBIND_PROCESS) == 0) {
    b.bound = true;
  } else {
    add_note(b, fmt::format("threads not bound (hwloc_set_cpubind: {})", std::strerror(errno)));
  }
  if (hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_NUMANODE) < 2 || b.numa_nodes.empty()) return;
  Bitmap nodes = bitmap_of(b.numa_nodes);
  // Not HWLOC_MEMBIND_PROCESS: Linux has no process-wide memory policy (ENOSYS). The
  // calling thread's policy is inherited by the threads it creates later.
  if (hwloc_set_membind(t, nodes.get(), HWLOC_MEMBIND_BIND,
                        HWLOC_MEMBIND_THREAD | HWLOC_MEMBIND_BYNODESET) == 0) {
    b.memory_bound = true;
  } else {
    add_note(b, fmt::format("memory not bound (hwloc_set_membind: {})", std::strerror(errno)));
  }
}

}  // namespace

std::string RankBinding::describe() const {
  std::string s = fmt::format("local rank {}/{}: {}", local_rank, local_size,
                              gpu >= 0 ? fmt::format("cuda:{}", gpu) : std::string("cpu"));
  if (!cores.empty()) s += fmt::format(", cores {} (PUs {})", format_list(cores), format_list(pus));
  s += fmt::format(", {} thread{}", threads, threads == 1 ? "" : "s");
  if (!numa_nodes.empty()) {
    s += fmt::format(", NUMA {}", format_list(numa_nodes));
    if (near_gpu) s += fmt::format(" (nearest cuda:{})", gpu);
  }
  s += bound ? (memory_bound ? ", bound (threads and memory)" : ", bound") : ", not bound";
  if (!note.empty()) s += fmt::format(" — {}", note);
  return s;
}

NodeTopology read_node_topology(std::span<const std::string> gpu_pci_bus_ids, std::string_view description) {
  HwlocTopology topology(description, !gpu_pci_bus_ids.empty());
  return describe(topology, gpu_pci_bus_ids);
}

RankBinding plan_rank_binding(const NodeTopology& topology, int local_rank, int local_size) {
  check_rank(local_rank, local_size);
  if (topology.cores.empty())
    fail(ErrorKind::invalid_argument, "the node's topology lists no cores to bind local rank {} to",
         local_rank);
  RankBinding b;
  b.local_rank = local_rank;
  b.local_size = local_size;

  // The cores to split and the ranks that split them (this one the `index`-th).
  std::vector<int> group(topology.cores.size());
  for (std::size_t c = 0; c < group.size(); ++c) group[c] = static_cast<int>(c);
  int members = local_size, index = local_rank;
  const int gpu_count = static_cast<int>(topology.gpus.size());
  if (gpu_count > 0) {
    b.gpu = local_rank % gpu_count;
    auto nearest = [&](int gpu) {
      std::vector<int> numa = topology.gpus[static_cast<std::size_t>(gpu)].numa;
      std::sort(numa.begin(), numa.end());
      return numa;
    };
    const std::vector<int> near = nearest(b.gpu);
    std::vector<int> near_cores;
    for (int c : group)
      if (std::binary_search(near.begin(), near.end(), topology.cores[static_cast<std::size_t>(c)].numa))
        near_cores.push_back(c);
    if (near_cores.empty()) {
      const std::string& bus_id = topology.gpus[static_cast<std::size_t>(b.gpu)].bus_id;
      add_note(b, fmt::format("cuda:{}'s nearest NUMA node is unknown ({}): cores split as without GPUs",
                              b.gpu, bus_id.empty() ? std::string("no PCI bus id")
                                                    : fmt::format("PCI bus id {} not located", bus_id)));
    } else {
      group = std::move(near_cores);
      members = 0;
      for (int r = 0; r < local_size; ++r) {
        if (nearest(r % gpu_count) != near) continue;
        if (r == local_rank) index = members;
        ++members;
      }
      b.near_gpu = true;
    }
  }

  const int n = static_cast<int>(group.size());
  if (n >= members) {
    // Contiguous groups whose sizes differ by at most one.
    const auto begin = static_cast<std::size_t>(static_cast<long long>(index) * n / members);
    const auto end = static_cast<std::size_t>(static_cast<long long>(index + 1) * n / members);
    b.cores.assign(group.begin() + static_cast<std::ptrdiff_t>(begin),
                   group.begin() + static_cast<std::ptrdiff_t>(end));
  } else {
    const int core = group[static_cast<std::size_t>(index % n)];
    b.cores = {core};
    add_note(b, fmt::format("{} ranks share {} core{} round robin (this one core {})", members, n,
                            n == 1 ? "" : "s", core));
  }
  for (int c : b.cores) {
    const NodeTopology::Core& core = topology.cores[static_cast<std::size_t>(c)];
    b.pus.insert(b.pus.end(), core.pus.begin(), core.pus.end());
    if (core.numa >= 0) b.numa_nodes.push_back(core.numa);
  }
  std::sort(b.pus.begin(), b.pus.end());
  b.pus.erase(std::unique(b.pus.begin(), b.pus.end()), b.pus.end());
  std::sort(b.numa_nodes.begin(), b.numa_nodes.end());
  b.numa_nodes.erase(std::unique(b.numa_nodes.begin(), b.numa_nodes.end()), b.numa_nodes.end());
  b.threads = std::max(1, static_cast<int>(b.cores.size()));
  return b;
}

RankBinding bind_rank(int local_rank, int local_size, std::span<const std::string> gpu_pci_bus_ids,
                      bool apply_binding) {
  check_rank(local_rank, local_size);
  std::unique_ptr<HwlocTopology> topology;
  RankBinding b;
  try {
    topology = std::make_unique<HwlocTopology>(std::string_view{}, !gpu_pci_bus_ids.empty());
    b = plan_rank_binding(describe(*topology, gpu_pci_bus_ids), local_rank, local_size);
  } catch (const Error& e) {
    // Run unplanned: the OS places the threads, each rank takes its share of them.
    b = RankBinding{};
    b.local_rank = local_rank;
    b.local_size = local_size;
    if (!gpu_pci_bus_ids.empty()) b.gpu = local_rank % static_cast<int>(gpu_pci_bus_ids.size());
    b.threads = std::max(1, default_threads() / local_size);
    add_note(b, e.what());
    return b;
  }
  // hwloc lists the cores of the affinity mask but not the cgroup's CPU quota, which the
  // node's ranks share (Note [Cgroup limits]): more threads would only be throttled.
  if (const CgroupCpuQuota quota = cgroup_cpu_quota();
      quota.cpus > 0 && std::max(1, quota.cpus / local_size) < b.threads) {
    b.threads = std::max(1, quota.cpus / local_size);
    add_note(b, fmt::format("{} thread{}: the cgroup's CPU quota of {} CPU{} ({}){}", b.threads,
                            b.threads == 1 ? "" : "s", quota.cpus, quota.cpus == 1 ? "" : "s", quota.file,
                            local_size > 1 ? fmt::format(" shared by {} ranks", local_size) : std::string()));
  }
  if (!apply_binding) {
    add_note(b, "binding not asked for");
    return b;
  }
  apply(*topology, b);
  return b;
}

}  // namespace zo2
