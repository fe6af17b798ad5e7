// Host memory shared by the ranks of one node (DESIGN.md §10): one copy of the master
// weights per node, not one per rank. See Note [One host image per node] in
// offload/block_store.h for what lives there and how the ranks take turns writing it.
#pragma once
#include "runtime/comm.h"
#include "runtime/device.h"

#include <cstddef>
#include <string_view>

namespace zo2 {

// `bytes` of zeroed memory mapped by every rank of `node` (POSIX shared memory: node rank 0
// creates the segment, the others open it by name, and the name is removed once all have
// opened it — or by any rank on an error or a timeout before that — so nothing outlives the
// processes; then rank 0 reserves it and all map it), pinned with register_host where
// the device pins. A single-rank node gets device.alloc_host(bytes). Collective over `node`.
// Error(out_of_memory) naming /dev/shm when the segment cannot be reserved.
HostBuffer alloc_node_shared(Comm& node, Device& device, std::size_t bytes, std::string_view what);

}  // namespace zo2
