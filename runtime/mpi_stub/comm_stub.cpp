// Linked in place of runtime/mpi/ when zo2 is built without MPI: one rank only.
#include "runtime/comm.h"
#include "runtime/error.h"

namespace zo2 {

bool mpi_available() { return false; }

std::unique_ptr<Comm> make_mpi_comm() {
  fail(ErrorKind::unsupported,
       "this zo2 was built without MPI: install libopenmpi-dev (scripts/setup.sh does) and configure with -DZO2_MPI=ON");
}

std::unique_ptr<Comm> make_mpi_comm_from(const void*) { return make_mpi_comm(); }

}  // namespace zo2
