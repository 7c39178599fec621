// A communicator that counts the bytes of every operation it forwards, by kind: what
// `bench train` reports per collective. The grid wraps every device communicator in one.
#pragma once
#include <array>
#include <memory>

#include "dist/comm.h"

namespace ssd {

enum class CommOp { AllReduce, ReduceScatter, AllGather, Broadcast, SendRecv };
inline constexpr int kCommOps = 5;
inline const char* comm_op_name(CommOp op) {
  switch (op) {
    case CommOp::AllReduce: return "all-reduce";
    case CommOp::ReduceScatter: return "reduce-scatter";
    case CommOp::AllGather: return "all-gather";
    case CommOp::Broadcast: return "broadcast";
    case CommOp::SendRecv: return "send/recv";
  }
  return "?";
}

// Bytes this rank handed to each kind of operation (the payload: the buffer an all-reduce
// reduces, the part a reduce-scatter keeps or an all-gather contributes, a send's buffer).
struct CommBytes {
  std::array<int64_t, kCommOps> bytes{};
  std::array<int64_t, kCommOps> calls{};
};

class CountingComm final : public Communicator {
 public:
  // Forwards to `inner`; owns it when `owned` is given.
  explicit CountingComm(Communicator& inner) : inner_(inner) {}
  explicit CountingComm(std::unique_ptr<Communicator> owned)
      : owned_(std::move(owned)), inner_(*owned_) {}

  const CommBytes& counts() const { return counts_; }
  void reset_counts() { counts_ = {}; }

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  const std::string& name() const override { return inner_.name(); }
  Device device() const override { return inner_.device(); }
  void all_reduce(void* buf, int64_t count, DType dt, ReduceOp op) override {
    add(CommOp::AllReduce, count, dt);
    inner_.all_reduce(buf, count, dt, op);
  }
  void reduce_scatter(const void* send, void* recv, int64_t count, DType dt) override {
    add(CommOp::ReduceScatter, count, dt);
    inner_.reduce_scatter(send, recv, count, dt);
  }
  void all_gather(const void* send, void* recv, int64_t count, DType dt) override {
    add(CommOp::AllGather, count, dt);
    inner_.all_gather(send, recv, count, dt);
  }
  void broadcast(void* buf, int64_t count, DType dt, int root) override {
    add(CommOp::Broadcast, count, dt);
    inner_.broadcast(buf, count, dt, root);
  }
  void send(const void* buf, int64_t count, DType dt, int peer) override {
    add(CommOp::SendRecv, count, dt);
    inner_.send(buf, count, dt, peer);
  }
  void recv(void* buf, int64_t count, DType dt, int peer) override { inner_.recv(buf, count, dt, peer); }
  void barrier() override { inner_.barrier(); }
  void join() override { inner_.join(); }
  bool trivial() const override { return inner_.trivial(); }

 private:
  void add(CommOp op, int64_t count, DType dt) {
    counts_.bytes[static_cast<int>(op)] += count * static_cast<int64_t>(dtype_size(dt));
    ++counts_.calls[static_cast<int>(op)];
  }
  std::unique_ptr<Communicator> owned_;
  Communicator& inner_;
  CommBytes counts_;
};

}  // namespace ssd
