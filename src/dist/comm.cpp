#include "dist/comm.h"

#include <mpi.h>

#include <cstdlib>
#include <vector>

namespace ssd {

ProcessGrid& ProcessGrid::world() {
  static ProcessGrid g;
  return g;
}

ProcessGrid::ProcessGrid() {
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    std::atexit([] {
      int fin = 0;
      MPI_Finalized(&fin);
      if (!fin) MPI_Finalize();
    });
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &local_rank_);
  MPI_Comm_free(&local);
}

void ProcessGrid::allreduce_sum(double* data, int64_t n) const {
  if (size_ > 1) MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(n), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
}

void ProcessGrid::allreduce_sum(float* data, int64_t n) const {
  if (size_ > 1) MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
}

void ProcessGrid::allreduce_sum(Backend& be, Tensor& t) const {
  if (size_ == 1) return;
  if (t.dtype == DType::F32) {
    std::vector<float> h(t.numel());
    be.download(h.data(), t);
    allreduce_sum(h.data(), t.numel());
    be.upload(t, h.data());
  } else if (t.dtype == DType::F64) {
    std::vector<double> h(t.numel());
    be.download(h.data(), t);
    allreduce_sum(h.data(), t.numel());
    be.upload(t, h.data());
  } else {
    fail("allreduce of ", dtype_name(t.dtype), " tensors is not supported");
  }
}

std::vector<uint64_t> ProcessGrid::allgather(const std::vector<uint64_t>& mine) const {
  std::vector<uint64_t> all(mine.size() * size_);
  if (size_ == 1) return mine;
  MPI_Allgather(mine.data(), static_cast<int>(mine.size()), MPI_UINT64_T, all.data(),
                static_cast<int>(mine.size()), MPI_UINT64_T, MPI_COMM_WORLD);
  return all;
}

bool ProcessGrid::any(bool flag) const {
  if (size_ == 1) return flag;
  int v = flag ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return v != 0;
}

void ProcessGrid::barrier() const {
  if (size_ > 1) MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace ssd
