// Linked in place of nccl_group.cpp when CMake found no NCCL: a sliced upload on CUDA is
// refused with the fix named.
#include "runtime/cuda/nccl_group.h"

#include "runtime/error.h"

namespace zo2::cuda {

std::unique_ptr<DeviceGroup> make_nccl_group(std::unique_ptr<Comm>, int) {
  fail(ErrorKind::unsupported,
       "a sliced upload on CUDA exchanges the slices with NCCL, and this zo2 was built without it (NCCL ships "
       "with the CUDA toolkit: reconfigure where CMake finds nccl.h and libnccl), or use --upload full");
}

}  // namespace zo2::cuda
