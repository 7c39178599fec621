// Built when the CUDA toolkit is absent: the CUDA backend reports itself unavailable.
#include "backend/backend.h"

namespace ssd {

std::unique_ptr<Backend> make_cuda_backend(int) {
  fail("train.device=cuda: this ssdtrain was built without CUDA support "
       "(configure with -DSSD_WITH_CUDA=ON on a machine with the CUDA toolkit)");
}

int cuda_device_count() { return 0; }

}  // namespace ssd
