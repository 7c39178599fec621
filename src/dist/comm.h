// Collectives over one group of processes. Two implementations: MPI on host memory (the CPU
// backend, and the tests that check every parallel algorithm with mpirun on CPUs) and NCCL on
// device memory (the CUDA backend). The model and the trainer talk to these only, through the
// process grid (grid.h); nothing else calls MPI or NCCL.
//
// Ordering: a device communicator runs its operations on its own stream, each ordered after all
// the work the backend had enqueued when the operation was issued; join() makes the backend's
// later work wait for every operation issued so far. Host communicators finish each operation
// before returning, so join() does nothing there. Counts are 64-bit everywhere; implementations
// whose library takes int counts split larger calls into chunks.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace ssd {

enum class ReduceOp { Sum, Max, Min };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The group's name in messages: "dp", "tp", "cp", "dpcp", "world".
  virtual const std::string& name() const = 0;
  // Where buffers must live.
  virtual Device device() const = 0;

  // In place: buf[i] = op over the ranks of buf[i]. Every rank gets bitwise the same result.
  virtual void all_reduce(void* buf, int64_t count, DType dt, ReduceOp op) = 0;
  // send holds size() blocks of `count`; rank r gets the sum of every rank's block r.
  virtual void reduce_scatter(const void* send, void* recv, int64_t count, DType dt) = 0;
  // send: `count` elements; recv: size() blocks of `count`, rank r's at block r.
  virtual void all_gather(const void* send, void* recv, int64_t count, DType dt) = 0;
  virtual void broadcast(void* buf, int64_t count, DType dt, int root) = 0;
  virtual void send(const void* buf, int64_t count, DType dt, int peer) = 0;
  virtual void recv(void* buf, int64_t count, DType dt, int peer) = 0;
  virtual void barrier() = 0;
  virtual void join() {}
  // True when operations can be skipped as no-ops (a group of one on host memory). An NCCL
  // group of one still runs them, so a one-GPU job exercises the NCCL path.
  virtual bool trivial() const { return size() == 1; }
  // Timing of operations on the device (`bench train`): while on, a device communicator times
  // each operation on its stream; take_op_seconds() waits for them and returns their durations
  // in issue order since the last take. Host communicators, whose operations finish before
  // returning, time nothing here (return {}): their callers time the calls.
  virtual bool times_ops_on_device() const { return false; }
  virtual void set_op_timing(bool) {}
  virtual std::vector<double> take_op_seconds() { return {}; }

  // Tensor forms (whole tensors, in place where it applies).
  void all_reduce(Tensor& t, ReduceOp op = ReduceOp::Sum) { all_reduce(t.data, t.numel(), t.dtype, op); }
  void broadcast(Tensor& t, int root) { broadcast(t.data, t.numel(), t.dtype, root); }
};

}  // namespace ssd
