// What a session leaves behind in the host's process: process-wide settings zo2 changes while
// it runs must be the host's own again once it is gone (pass 68: a host that uses OpenBLAS
// itself, numpy say, stayed single-threaded for good after its first zo2 session).
#include "runtime/device.h"

#include <gtest/gtest.h>
#include <oneapi/tbb/global_control.h>

extern "C" int openblas_get_num_threads(void);
extern "C" void openblas_set_num_threads(int);

namespace zo2 {
namespace {

// Note [OpenBLAS's threads] (runtime/cpu/cpu_device.cpp).
TEST(HostState, OpenBlasThreadCountIsTheHostsAgainAfterTheLastCpuDevice) {
  openblas_set_num_threads(2);
  const int host = openblas_get_num_threads();
  if (host < 2) GTEST_SKIP() << "this OpenBLAS runs one thread at most here (" << host << ")";
  DeviceOptions o;
  o.kind = DeviceKind::cpu;
  o.mem_cap = std::size_t{16} << 20;
  {
    const auto first = make_device(o);
    EXPECT_EQ(openblas_get_num_threads(), 1) << "zo2's kernels split GEMMs across TBB; OpenBLAS must not";
    {
      const auto second = make_device(o);
      EXPECT_EQ(openblas_get_num_threads(), 1);
    }
    EXPECT_EQ(openblas_get_num_threads(), 1) << "the first device still lives";
  }
  EXPECT_EQ(openblas_get_num_threads(), host);
  // A device that fails to start (its memory cap beyond the address space) gives it back too.
  o.mem_cap = std::size_t{1} << 62;
  EXPECT_ANY_THROW(make_device(o));
  EXPECT_EQ(openblas_get_num_threads(), host);
}

}  // namespace
}  // namespace zo2
