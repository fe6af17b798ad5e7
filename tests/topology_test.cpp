// Tests of Note [Rank binding] (runtime/topology.h): the planner on described nodes (cores
// split disjointly and contiguously for 1/2/4/8 ranks, ranks near one GPU's NUMA node split
// its cores, round-robin sharing with fewer cores than ranks, the fallback for a GPU of
// unknown locality), hwloc's reading of synthetic and XML topologies (PCI bus ids located
// under their package), and this machine: the plan lists every PU the process may use, and
// an applied binding restricts a forked child's threads — those already running and those
// started afterwards — to its cores.
#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <iostream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "runtime/error.h"
#include "runtime/topology.h"

namespace zo2 {
namespace {

// `packages` × `cores` cores, one NUMA node per package, `smt` PUs per core numbered as
// Linux does (siblings of core c are c, c + total cores, ...); gpu_numa[i] is cuda:i's
// nearest NUMA nodes.
NodeTopology make_node(int packages, int cores, int smt, std::vector<std::vector<int>> gpu_numa = {}) {
  NodeTopology node;
  const int total = packages * cores;
  for (int c = 0; c < total; ++c) {
    NodeTopology::Core core;
    core.numa = c / cores;
    for (int t = 0; t < smt; ++t) core.pus.push_back(c + t * total);
    node.cores.push_back(core);
  }
  for (std::size_t i = 0; i < gpu_numa.size(); ++i)
    node.gpus.push_back({fmt::format("0000:{:02x}:00.0", 0x17 + i), gpu_numa[i]});
  return node;
}

std::vector<RankBinding> plan_all(const NodeTopology& node, int ranks) {
  std::vector<RankBinding> out;
  for (int r = 0; r < ranks; ++r) out.push_back(plan_rank_binding(node, r, ranks));
  return out;
}

bool contiguous(const std::vector<int>& v) {
  for (std::size_t i = 1; i < v.size(); ++i)
    if (v[i] != v[i - 1] + 1) return false;
  return true;
}

// Each core in at most one binding; returns how many cores were handed out.
std::size_t expect_disjoint(const std::vector<RankBinding>& bindings) {
  std::set<int> seen;
  for (const RankBinding& b : bindings)
    for (int c : b.cores) EXPECT_TRUE(seen.insert(c).second) << "core " << c << " given twice";
  return seen.size();
}

TEST(Topology, WithoutGpusRanksSplitTheCoresIntoEqualContiguousGroupsWithinOnePackage) {
  const NodeTopology node = make_node(2, 8, 2);  // 2 packages × 8 cores, NUMA 0 and 1
  for (int ranks : {1, 2, 4, 8}) {
    SCOPED_TRACE(fmt::format("{} ranks", ranks));
    const std::vector<RankBinding> bindings = plan_all(node, ranks);
    EXPECT_EQ(expect_disjoint(bindings), 16u);
    for (int r = 0; r < ranks; ++r) {
      const RankBinding& b = bindings[static_cast<std::size_t>(r)];
      EXPECT_EQ(b.local_rank, r);
      EXPECT_EQ(b.local_size, ranks);
      EXPECT_EQ(b.gpu, -1);
      EXPECT_FALSE(b.near_gpu);
      ASSERT_EQ(b.cores.size(), static_cast<std::size_t>(16 / ranks));
      EXPECT_TRUE(contiguous(b.cores));
      EXPECT_EQ(b.cores.front(), r * 16 / ranks);  // in rank order
      EXPECT_EQ(b.threads, 16 / ranks);
      EXPECT_EQ(b.pus.size(), 2 * b.cores.size());  // both SMT siblings of each core
      EXPECT_EQ(b.numa_nodes, ranks == 1 ? std::vector<int>({0, 1}) : std::vector<int>({r * 2 / ranks}));
      EXPECT_EQ(b.note, "");
      EXPECT_FALSE(b.bound);
    }
  }
  // 3 ranks on 16 cores: sizes 5, 5, 6 — they differ by at most one and cover every core.
  const std::vector<RankBinding> three = plan_all(node, 3);
  EXPECT_EQ(expect_disjoint(three), 16u);
  for (const RankBinding& b : three) {
    EXPECT_TRUE(b.cores.size() == 5 || b.cores.size() == 6);
    EXPECT_TRUE(contiguous(b.cores));
  }
}

TEST(Topology, FewerCoresThanRanksShareCoresRoundRobinAndSaySo) {
  const NodeTopology node = make_node(1, 2, 1);
  const std::vector<RankBinding> bindings = plan_all(node, 3);
  EXPECT_EQ(bindings[0].cores, std::vector<int>({0}));
  EXPECT_EQ(bindings[1].cores, std::vector<int>({1}));
  EXPECT_EQ(bindings[2].cores, std::vector<int>({0}));
  for (const RankBinding& b : bindings) {
    EXPECT_EQ(b.threads, 1);
    EXPECT_NE(b.note.find("3 ranks share 2 cores round robin"), std::string::npos) << b.note;
  }
}

TEST(Topology, RanksNearOneGpusNumaNodeSplitItsCoresDisjointly) {
  // 2 packages × 8 cores, cuda:0 and cuda:1 on NUMA 0, cuda:2 and cuda:3 on NUMA 1.
  const NodeTopology node = make_node(2, 8, 1, {{0}, {0}, {1}, {1}});
  for (int ranks : {1, 2, 4, 8}) {
    SCOPED_TRACE(fmt::format("{} ranks", ranks));
    const std::vector<RankBinding> bindings = plan_all(node, ranks);
    expect_disjoint(bindings);
    for (int r = 0; r < ranks; ++r) {
      const RankBinding& b = bindings[static_cast<std::size_t>(r)];
      EXPECT_EQ(b.gpu, r % 4);
      EXPECT_TRUE(b.near_gpu);
      const int numa = b.gpu / 2;
      EXPECT_EQ(b.numa_nodes, std::vector<int>({numa}));
      EXPECT_TRUE(contiguous(b.cores));
      for (int c : b.cores) EXPECT_EQ(c / 8, numa) << "core " << c << " is not on NUMA " << numa;
      // The ranks whose GPUs sit on this NUMA node share its 8 cores equally.
      int sharing = 0;
      for (int q = 0; q < ranks; ++q) sharing += (q % 4) / 2 == numa;
      EXPECT_EQ(b.cores.size(), static_cast<std::size_t>(8 / sharing));
      EXPECT_EQ(b.note, "");
    }
  }
  // 8 ranks: NUMA 0 holds ranks 0, 1, 4, 5 (cuda:0, 1, 0, 1), two cores each, in rank order.
  const std::vector<RankBinding> eight = plan_all(node, 8);
  EXPECT_EQ(eight[0].cores, std::vector<int>({0, 1}));
  EXPECT_EQ(eight[1].cores, std::vector<int>({2, 3}));
  EXPECT_EQ(eight[4].cores, std::vector<int>({4, 5}));
  EXPECT_EQ(eight[5].cores, std::vector<int>({6, 7}));
  EXPECT_EQ(eight[7].cores, std::vector<int>({14, 15}));
  EXPECT_EQ(eight[5].describe(),
            "local rank 5/8: cuda:1, cores 6-7 (PUs 6-7), 2 threads, NUMA 0 (nearest cuda:1), not bound");
}

TEST(Topology, AGpuOfUnknownLocalityFallsBackToTheSplitWithoutGpus) {
  NodeTopology node = make_node(2, 4, 2, {{1}, {}});
  node.gpus[1].bus_id = "";
  const RankBinding near = plan_rank_binding(node, 0, 2);
  EXPECT_TRUE(near.near_gpu);
  EXPECT_EQ(near.cores, std::vector<int>({4, 5, 6, 7}));  // NUMA 1's cores, all of them
  const RankBinding unknown = plan_rank_binding(node, 1, 2);
  EXPECT_EQ(unknown.gpu, 1);
  EXPECT_FALSE(unknown.near_gpu);
  EXPECT_EQ(unknown.cores, std::vector<int>({4, 5, 6, 7}));  // half 1 of the whole node
  EXPECT_NE(unknown.note.find("cuda:1's nearest NUMA node is unknown (no PCI bus id)"), std::string::npos)
      << unknown.note;
  EXPECT_EQ(unknown.describe(),
            "local rank 1/2: cuda:1, cores 4-7 (PUs 4-7,12-15), 4 threads, NUMA 1, not bound — " + unknown.note);
}

TEST(Topology, ARankOutsideTheNodeOrANodeWithoutCoresIsRefused) {
  const NodeTopology node = make_node(1, 4, 1);
  EXPECT_EQ(test::error_of([&] { plan_rank_binding(node, 2, 2); }).kind(), ErrorKind::invalid_argument);
  EXPECT_EQ(test::error_of([&] { plan_rank_binding(node, -1, 2); }).kind(), ErrorKind::invalid_argument);
  EXPECT_EQ(test::error_of([&] { plan_rank_binding(node, 0, 0); }).kind(), ErrorKind::invalid_argument);
  EXPECT_EQ(test::error_of([&] { plan_rank_binding(NodeTopology{}, 0, 1); }).kind(),
            ErrorKind::invalid_argument);
  EXPECT_EQ(test::error_of([&] { bind_rank(1, 1, {}, false); }).kind(), ErrorKind::invalid_argument);
}

TEST(TopologyHwloc, SyntheticTopologyReadsCoresInLogicalOrderWithTheirNumaNodes) {
  const NodeTopology node = read_node_topology({}, "pack:2 numa:1 core:8 pu:2");
  ASSERT_EQ(node.cores.size(), 16u);
  EXPECT_TRUE(node.gpus.empty());
  for (int c = 0; c < 16; ++c) {
    const NodeTopology::Core& core = node.cores[static_cast<std::size_t>(c)];
    EXPECT_EQ(core.numa, c / 8) << "core " << c;
    EXPECT_EQ(core.pus, std::vector<int>({2 * c, 2 * c + 1})) << "core " << c;
  }
  const RankBinding b = plan_rank_binding(node, 1, 2);
  EXPECT_EQ(b.cores, std::vector<int>({8, 9, 10, 11, 12, 13, 14, 15}));
  EXPECT_EQ(b.numa_nodes, std::vector<int>({1}));
  EXPECT_EQ(b.pus.size(), 16u);

  // A synthetic topology has no PCI devices: the GPUs' locality is unknown.
  const std::vector<std::string> bus_ids = {"0000:17:00.0"};
  const NodeTopology with_gpu = read_node_topology(bus_ids, "pack:2 numa:1 core:8 pu:2");
  ASSERT_EQ(with_gpu.gpus.size(), 1u);
  EXPECT_TRUE(with_gpu.gpus[0].numa.empty());
  EXPECT_NE(plan_rank_binding(with_gpu, 0, 1).note.find("PCI bus id 0000:17:00.0 not located"),
            std::string::npos);

  EXPECT_EQ(test::error_of([] { read_node_topology({}, "pack:two core:x"); }).kind(),
            ErrorKind::invalid_argument);
}

// An hwloc XML node: 2 packages × 4 cores × 2 PUs (siblings numbered c and c + 8), one NUMA
// node per package, a GPU at 0000:17:00.0 under package 0 and one at 0000:af:00.0 under
// package 1 behind a bridge.
std::string gpu_node_xml() {
  auto set = [](unsigned bits) { return fmt::format("cpuset=\"0x{0:08x}\" complete_cpuset=\"0x{0:08x}\"", bits); };
  auto nodes = [](unsigned bits) {
    return fmt::format("nodeset=\"0x{0:08x}\" complete_nodeset=\"0x{0:08x}\"", bits);
  };
  std::string xml =
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE topology SYSTEM \"hwloc2.dtd\">\n"
      "<topology version=\"2.0\">\n";
  xml += fmt::format("<object type=\"Machine\" os_index=\"0\" {} {}>\n", set(0xffff), nodes(0x3));
  for (unsigned p = 0; p < 2; ++p) {
    const unsigned pkg = (0xfu << (4 * p)) | (0xfu << (8 + 4 * p));
    xml += fmt::format("<object type=\"Package\" os_index=\"{}\" {} {}>\n", p, set(pkg), nodes(1u << p));
    xml += fmt::format("<object type=\"NUMANode\" os_index=\"{}\" {} {} local_memory=\"1073741824\"/>\n", p,
                       set(pkg), nodes(1u << p));
    for (unsigned c = 0; c < 4; ++c) {
      const unsigned pu0 = 4 * p + c, pu1 = pu0 + 8;
      xml += fmt::format("<object type=\"Core\" os_index=\"{}\" {}>", c, set((1u << pu0) | (1u << pu1)));
      xml += fmt::format("<object type=\"PU\" os_index=\"{}\" {}/>", pu0, set(1u << pu0));
      xml += fmt::format("<object type=\"PU\" os_index=\"{}\" {}/></object>\n", pu1, set(1u << pu1));
    }
    if (p == 0) {
      xml += "<object type=\"PCIDev\" pci_busid=\"0000:17:00.0\" pci_type=\"0302 [10de:2335] [10de:18be] a1\"/>\n";
    } else {
      xml += "<object type=\"Bridge\" bridge_type=\"0-1\" depth=\"0\" bridge_pci=\"0000:[af-af]\">\n"
             "<object type=\"PCIDev\" pci_busid=\"0000:af:00.0\" pci_type=\"0302 [10de:2335] [10de:18be] a1\"/>\n"
             "</object>\n";
    }
    xml += "</object>\n";
  }
  xml += "</object>\n</topology>\n";
  return xml;
}

TEST(TopologyHwloc, AGpusPciBusIdLocatesItsNumaNodeInAnXmlTopology) {
  // CUDA may spell the bus id in capitals or with an 8-digit domain.
  const std::vector<std::string> bus_ids = {"0000:AF:00.0", "0000:17:00.0", "00000000:af:00.0", "0000:33:00.0", ""};
  const NodeTopology node = read_node_topology(bus_ids, gpu_node_xml());
  ASSERT_EQ(node.cores.size(), 8u);
  EXPECT_EQ(node.cores[5].numa, 1);
  EXPECT_EQ(node.cores[5].pus, std::vector<int>({5, 13}));
  ASSERT_EQ(node.gpus.size(), 5u);
  EXPECT_EQ(node.gpus[0].numa, std::vector<int>({1}));
  EXPECT_EQ(node.gpus[1].numa, std::vector<int>({0}));
  EXPECT_EQ(node.gpus[2].numa, std::vector<int>({1}));
  EXPECT_TRUE(node.gpus[3].numa.empty());  // no such device
  EXPECT_TRUE(node.gpus[4].numa.empty());
  EXPECT_EQ(node.gpus[0].bus_id, "0000:AF:00.0");

  // Two ranks on the first two GPUs: each gets the package its GPU hangs off.
  const NodeTopology two = read_node_topology(std::span(bus_ids).first(2), gpu_node_xml());
  const RankBinding r0 = plan_rank_binding(two, 0, 2), r1 = plan_rank_binding(two, 1, 2);
  EXPECT_EQ(r0.cores, std::vector<int>({4, 5, 6, 7}));
  EXPECT_EQ(r0.pus, std::vector<int>({4, 5, 6, 7, 12, 13, 14, 15}));
  EXPECT_EQ(r1.cores, std::vector<int>({0, 1, 2, 3}));
  EXPECT_EQ(r1.describe(),
            "local rank 1/2: cuda:1, cores 0-3 (PUs 0-3,8-11), 4 threads, NUMA 0 (nearest cuda:1), not bound");
}

std::vector<int> affinity_of(pid_t tid) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(tid, sizeof set, &set) != 0) return {};
  std::vector<int> cpus;
  for (int i = 0; i < CPU_SETSIZE; ++i)
    if (CPU_ISSET(i, &set)) cpus.push_back(i);
  return cpus;
}

TEST(TopologyMachine, OneRankWithoutBindingListsEveryPuTheProcessMayUse) {
  const RankBinding b = bind_rank(0, 1, {}, false);
  SCOPED_TRACE(b.describe());
  EXPECT_FALSE(b.bound);
  EXPECT_NE(b.note.find("binding not asked for"), std::string::npos);
  const NodeTopology node = read_node_topology();
  EXPECT_EQ(b.cores.size(), node.cores.size());
  EXPECT_EQ(b.threads, static_cast<int>(node.cores.size()));
  EXPECT_FALSE(b.numa_nodes.empty());
  for (int cpu : affinity_of(0))
    EXPECT_TRUE(std::binary_search(b.pus.begin(), b.pus.end(), cpu)) << "PU " << cpu << " missing";
}

// In a forked child (the binding is process-wide): bind rank 1 of 2, then check the affinity
// of the main thread, of a thread that ran before the binding and of one started after it.
TEST(TopologyMachine, AnAppliedBindingHoldsEveryThreadOfTheProcess) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(fds[0]);
    std::string report;
    int code = 0;
    {
      std::atomic<int> stage{0};
      std::vector<int> early;
      std::thread before([&] {
        stage = 1;
        while (stage.load() != 2) std::this_thread::yield();
        early = affinity_of(0);
      });
      while (stage.load() != 1) std::this_thread::yield();
      const RankBinding b = bind_rank(1, 2, {}, true);
      stage = 2;
      before.join();
      std::vector<int> late;
      std::thread after([&] { late = affinity_of(0); });
      after.join();
      const std::vector<int> main_cpus = affinity_of(0);
      report = b.describe();
      if (!b.bound) {
        code = 2;
      } else if (main_cpus != b.pus || early != b.pus || late != b.pus) {
        report += fmt::format("\nmain thread {}, earlier thread {}, later thread {}",
                              fmt::join(main_cpus, ","), fmt::join(early, ","), fmt::join(late, ","));
        code = 1;
      } else if (read_node_topology().cores.size() >= 2 && b.cores.size() * 2 > read_node_topology().cores.size()) {
        report += "\nrank 1 of 2 holds more than half the cores";
        code = 1;
      }
    }
    (void)!write(fds[1], report.data(), report.size());
    close(fds[1]);
    _exit(code);
  }
  close(fds[1]);
  std::string report;
  char buf[512];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) report.append(buf, static_cast<std::size_t>(n));
  close(fds[0]);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << report;
  if (WEXITSTATUS(status) == 2) GTEST_SKIP() << "this machine refuses binding: " << report;
  EXPECT_EQ(WEXITSTATUS(status), 0) << report;
  std::cout << "  child: " << report << "\n";
}

}  // namespace
}  // namespace zo2
