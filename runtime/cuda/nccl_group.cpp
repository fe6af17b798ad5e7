// Note [Device groups] on CUDA: NCCL (it ships with the CUDA toolkit). The node's ranks make
// one NCCL communicator (node rank 0's unique id broadcast through the Comm); all_gather is
// one NCCL group of broadcasts, rank r the root of its own slice, in place in every rank's
// buffer, on the caller's stream. Built when CMake finds NCCL (runtime/cuda/nccl_stub.cpp
// otherwise).
#include "runtime/cuda/cuda_device.h"
#include "runtime/cuda/nccl_group.h"
#include "runtime/cuda/kernels.h"

#include "runtime/error.h"

#include <nccl.h>

namespace zo2::cuda {
namespace {

void check_nccl(ncclResult_t r, const char* call) {
  if (r != ncclSuccess) fail(ErrorKind::device, "{} failed: {}", call, ncclGetErrorString(r));
}

class NcclGroup final : public DeviceGroup {
 public:
  NcclGroup(std::unique_ptr<Comm> node, int device) : node_(std::move(node)), device_(device) {
    ncclUniqueId id{};
    if (node_->rank() == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    node_->broadcast(&id, sizeof id, 0, "the NCCL unique id");
    use_device(device_);
    check_nccl(ncclCommInitRank(&comm_, node_->size(), id, node_->rank()), "ncclCommInitRank");
  }
  ~NcclGroup() override {
    if (comm_) (void)ncclCommDestroy(comm_);
  }
  void all_gather(Stream& s, void* buffer, std::span<const std::size_t> offsets) override {
    auto* ks = dynamic_cast<KernelStream*>(&s);
    if (!ks) fail(ErrorKind::internal, "NCCL all_gather on a stream that is not CUDA's");
    use_device(device_);
    auto* base = static_cast<char*>(buffer);
    check_nccl(ncclGroupStart(), "ncclGroupStart");
    for (int r = 0; r < node_->size(); ++r) {
      const std::size_t lo = offsets[static_cast<std::size_t>(r)], hi = offsets[static_cast<std::size_t>(r) + 1];
      if (hi > lo)
        check_nccl(ncclBroadcast(base + lo, base + lo, hi - lo, ncclUint8, r, comm_, ks->stream()), "ncclBroadcast");
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd");
  }

 private:
  std::unique_ptr<Comm> node_;
  int device_;
  ncclComm_t comm_ = nullptr;
};

}  // namespace

std::unique_ptr<DeviceGroup> make_nccl_group(std::unique_ptr<Comm> node, int device) {
  return std::make_unique<NcclGroup>(std::move(node), device);
}

}  // namespace zo2::cuda
