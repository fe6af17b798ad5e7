// Note [Device groups] on CUDA (nccl_group.cpp, or nccl_stub.cpp without NCCL).
#pragma once
#include "runtime/comm.h"
#include "runtime/device.h"

#include <memory>

namespace zo2::cuda {

std::unique_ptr<DeviceGroup> make_nccl_group(std::unique_ptr<Comm> node, int device);

}  // namespace zo2::cuda
