// Process grid and collectives. Today: data parallelism over MPI_COMM_WORLD; every rank holds
// the whole model. Collectives work on host memory; device tensors are staged through the host
// by the caller's backend (NCCL replaces this on GPUs).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.h"

namespace ssd {

class ProcessGrid {
 public:
  // Initialises MPI if needed (safe to call when launched without mpirun: world of one).
  static ProcessGrid& world();
  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }
  bool is_root() const { return rank_ == 0; }

  // In-place sum across all ranks.
  void allreduce_sum(double* data, int64_t n) const;
  void allreduce_sum(float* data, int64_t n) const;
  // Sums a backend tensor across ranks (f32/f64; staged through host memory).
  void allreduce_sum(Backend& be, Tensor& t) const;
  // Every rank's `mine` (same length everywhere), concatenated in rank order.
  std::vector<uint64_t> allgather(const std::vector<uint64_t>& mine) const;
  // Root's value of a flag wins everywhere (e.g. "stop now").
  bool any(bool flag) const;
  void barrier() const;

 private:
  ProcessGrid();
  int rank_ = 0, size_ = 1, local_rank_ = 0;
};

}  // namespace ssd
