// Where each rank on a node runs (DESIGN.md §3, §10): hwloc reads the node — its cores,
// NUMA nodes and each GPU's PCI locality — into a NodeTopology; plan_rank_binding, a pure
// function of that description, gives a local rank its GPU, cores and NUMA nodes; bind_rank
// reads this machine, plans, and binds the process to the plan.
//
// Note [Rank binding]
//   Ranks sharing a node must not fight over cores, and a rank's host memory (staging,
//   pinned buffers) should sit on the NUMA node next to its GPU. So each local rank gets a
//   disjoint group of cores, its kernel threads run there, its allocations come from there.
//   - Without GPUs: the node's cores, in hwloc's logical order (where the cores of one
//     package or NUMA node are neighbours), are cut into local_size contiguous groups whose
//     sizes differ by at most one; local rank r takes group r. Groups stay inside one
//     package whenever the rank count is a multiple of the package count (packages of
//     equal size).
//   - With GPUs: local rank r drives cuda:(r % gpu_count). Its GPU's nearest NUMA nodes are
//     those of the first non-I/O ancestor of the GPU's PCI device (found by its bus id), and
//     their cores are cut as above among the local ranks whose GPUs have the same nearest
//     NUMA nodes, in local-rank order. A GPU whose locality is unknown (no bus id, a bus id
//     hwloc does not list, an ancestor without cores) falls back to the split without GPUs,
//     over the whole node, and `note` says so; such ranks may then overlap the others.
//   - Fewer cores than ranks in a group: the ranks share cores round robin (the i-th takes
//     core i mod n), one thread each, and `note` says so.
//   - threads = cores, not hardware threads: SMT siblings share a core's vector units, which
//     the kernels saturate. The binding still holds every PU of those cores.
//   Applying (bind_rank with apply = true):
//   - CPUs: hwloc_set_cpubind(HWLOC_CPUBIND_PROCESS) binds every thread the process has and,
//     by inheritance, every thread it creates later. This replaces any binding made by the
//     launcher or taskset (Open MPI binds each of two ranks to a single core by default).
//   - Memory: hwloc_set_membind(HWLOC_MEMBIND_BIND, not strict) to the NUMA nodes of the
//     cores. Linux keeps a memory policy per thread (hwloc has no process-wide call there),
//     so it holds for the calling thread and the threads it creates afterwards: call
//     bind_rank from the main thread before the TBB pool, the stream threads and the host
//     image exist. Not strict means preferred: an allocation larger than what the node has
//     free spills onto other nodes instead of failing (a host image can outgrow one node).
//     Skipped where the node has a single NUMA node (nothing to choose).
//   - A failure does not stop the run: a container may forbid sched_setaffinity or
//     set_mempolicy, hwloc may not read the machine. `bound` / `memory_bound` stay false,
//     `note` says why, and the run goes on where the OS puts it.
//   hwloc's view of the machine leaves out cores and NUMA nodes outside this process's
//   cgroup, so a container's or a batch job's share of the node is what gets split.
#pragma once
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace zo2 {

// One node as the planner sees it. Indices are hwloc's: a core's logical index is its
// position in `cores` (unique on the node, lstopo's "Core L#"); PUs and NUMA nodes carry
// their OS indices (what taskset, sched_getaffinity and numactl show).
struct NodeTopology {
  struct Core {
    int numa = -1;          // OS index of the NUMA node holding it; -1 when unknown
    std::vector<int> pus;   // OS indices of its hardware threads
  };
  struct Gpu {
    std::string bus_id;     // PCI bus id as given, e.g. "0000:17:00.0"; may be empty
    std::vector<int> numa;  // OS indices of its nearest NUMA nodes, ascending; empty: unknown
  };
  std::vector<Core> cores;  // in hwloc's logical order
  std::vector<Gpu> gpus;    // by CUDA ordinal; empty on the CPU backend
};

// What one local rank got: see Note [Rank binding].
struct RankBinding {
  int local_rank = 0, local_size = 1;  // this process's index among the ranks on its node
  int gpu = -1;                        // CUDA ordinal (local_rank % gpu_count); -1 without GPUs
  std::vector<int> cores;              // logical indices of its cores, ascending
  std::vector<int> pus;                // OS indices of those cores' PUs, ascending
  int threads = 1;                     // kernel threads to run (= cores.size(), at least 1)
  std::vector<int> numa_nodes;         // OS indices of the cores' NUMA nodes, ascending
  bool near_gpu = false;               // the cores are the ones nearest cuda:gpu
  bool bound = false;                  // the process's threads are bound to `pus`
  bool memory_bound = false;           // the calling thread's allocations prefer `numa_nodes`
  std::string note;                    // why not bound, fallbacks, shared cores; "; "-separated
  // One line for the plan and the log, e.g.
  // "local rank 1/2: cuda:1, cores 8-15 (PUs 8-15,72-79), NUMA 1 (nearest cuda:1), bound".
  std::string describe() const;
};

// Reads a node's topology with hwloc: this machine when `description` is empty, else an
// hwloc synthetic description ("pack:2 numa:1 core:8 pu:2") or an hwloc XML topology
// (text starting with '<', as `lstopo node.xml` writes) — tests and planning for another
// machine. gpu_pci_bus_ids[i] locates cuda:i (PCI devices are read only when it is not
// empty). Throws Error (invalid_argument for a description hwloc cannot read, device when
// hwloc cannot read this machine).
NodeTopology read_node_topology(std::span<const std::string> gpu_pci_bus_ids = {},
                                std::string_view description = {});

// The binding of local rank `local_rank` of `local_size` on `topology` (Note [Rank
// binding]); nothing is applied. Throws Error(invalid_argument) for a rank outside
// [0, local_size) or a topology without cores.
RankBinding plan_rank_binding(const NodeTopology& topology, int local_rank, int local_size);

// Reads this machine, plans local rank `local_rank` of `local_size`, and when `apply` binds
// the process to the plan. Never fails for the machine's sake: when hwloc cannot read it,
// the binding is unplanned (threads = default_threads() / local_size) and `note` says why.
// Under a cgroup CPU quota the threads are at most the quota's CPUs / local_size (Note
// [Cgroup limits]), and `note` says so.
// Throws Error(invalid_argument) only for a rank outside [0, local_size).
RankBinding bind_rank(int local_rank, int local_size, std::span<const std::string> gpu_pci_bus_ids,
                      bool apply);

}  // namespace zo2
