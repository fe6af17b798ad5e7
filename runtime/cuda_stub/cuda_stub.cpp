// Linked in place of runtime/cuda/ when zo2 is built without CUDA (MLX's pattern): the
// rest of the code asks how many CUDA devices there are and gets zero.
#include "runtime/device.h"

namespace zo2 {

int cuda_device_count() noexcept { return 0; }

std::vector<std::string> cuda_pci_bus_ids() noexcept { return {}; }

std::unique_ptr<Device> cuda_make_device(const DeviceOptions&) {
  fail(ErrorKind::device,
       "this zo2 was built without CUDA (configure with -DZO2_CUDA=ON on a machine with nvcc); "
       "use the CPU backend (--device cpu; device \"cpu\" in the C API and Python)");
}

}  // namespace zo2
