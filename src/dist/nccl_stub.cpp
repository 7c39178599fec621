// Built without CUDA: there is no NCCL communicator.
#include "dist/grid.h"

namespace ssd {

std::unique_ptr<Communicator> make_nccl_comm(Communicator&, Backend&) {
  fail("parallel.comm=nccl: this ssdtrain was built without CUDA and NCCL");
}

}  // namespace ssd
