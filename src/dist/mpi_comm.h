// The MPI communicator: host memory, one MPI communicator per group. Calls larger than the
// chunk limit (MPI counts are int) are split into chunks; tests lower the limit to check that.
#pragma once
#include <mpi.h>

#include <memory>

#include "dist/comm.h"

namespace ssd {

class MpiComm final : public Communicator {
 public:
  // Takes ownership of `comm` (freed on destruction) unless it is MPI_COMM_WORLD/SELF.
  MpiComm(MPI_Comm comm, std::string name);
  ~MpiComm() override;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  Device device() const override { return Device::CPU; }
  void all_reduce(void* buf, int64_t count, DType dt, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, int64_t count, DType dt) override;
  void all_gather(const void* send, void* recv, int64_t count, DType dt) override;
  void broadcast(void* buf, int64_t count, DType dt, int root) override;
  void send(const void* buf, int64_t count, DType dt, int peer) override;
  void recv(void* buf, int64_t count, DType dt, int peer) override;
  void barrier() override;
  MPI_Comm raw() const { return comm_; }

  // Most elements one MPI call moves (default 2^30); lowered by tests.
  static void set_chunk_limit(int64_t elements);
  static int64_t chunk_limit();

 private:
  MPI_Comm comm_;
  std::string name_;
  std::string what_;  // the group in watchdog messages: name, member ranks and their hosts
  int rank_ = 0, size_ = 1;
};

}  // namespace ssd
