// A communicator that counts the bytes of every operation it forwards, by kind, and on request
// times them: what `bench train` reports per collective. The grid wraps every device
// communicator in one.
#pragma once
#include <array>
#include <chrono>
#include <memory>
#include <utility>
#include <vector>

#include "core/error.h"
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

// Seconds spent in each kind of operation while timing was on, and the calls timed. Device
// communicators: from the operation's start on the communicator's stream to its end (waiting
// for the peers included); host ones: the call.
struct CommTimes {
  std::array<double, kCommOps> seconds{};
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
  // Whether the inner communicator times its operations on the device (else: the calls).
  bool device_timed() const { return inner_.times_ops_on_device(); }
  // Times every operation from now on, until take_times().
  void start_timing() {
    timing_ = true;
    timed_ = {};
    kinds_.clear();
    inner_.set_op_timing(true);
  }
  // Stops timing; waits for the timed device operations and returns their times by kind.
  CommTimes take_times() {
    timing_ = false;
    inner_.set_op_timing(false);
    if (inner_.times_ops_on_device()) {
      const std::vector<double> s = inner_.take_op_seconds();
      SSD_CHECK(s.size() == kinds_.size(), "communicator timed ", s.size(), " of ",
                kinds_.size(), " operations");
      for (size_t i = 0; i < s.size(); ++i) {
        timed_.seconds[static_cast<int>(kinds_[i])] += s[i];
        ++timed_.calls[static_cast<int>(kinds_[i])];
      }
    }
    kinds_.clear();
    return std::exchange(timed_, {});
  }

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  const std::string& name() const override { return inner_.name(); }
  Device device() const override { return inner_.device(); }
  void all_reduce(void* buf, int64_t count, DType dt, ReduceOp op) override {
    add(CommOp::AllReduce, count, dt);
    timed(CommOp::AllReduce, [&] { inner_.all_reduce(buf, count, dt, op); });
  }
  void reduce_scatter(const void* send, void* recv, int64_t count, DType dt) override {
    add(CommOp::ReduceScatter, count, dt);
    timed(CommOp::ReduceScatter, [&] { inner_.reduce_scatter(send, recv, count, dt); });
  }
  void all_gather(const void* send, void* recv, int64_t count, DType dt) override {
    add(CommOp::AllGather, count, dt);
    timed(CommOp::AllGather, [&] { inner_.all_gather(send, recv, count, dt); });
  }
  void broadcast(void* buf, int64_t count, DType dt, int root) override {
    add(CommOp::Broadcast, count, dt);
    timed(CommOp::Broadcast, [&] { inner_.broadcast(buf, count, dt, root); });
  }
  void send(const void* buf, int64_t count, DType dt, int peer) override {
    add(CommOp::SendRecv, count, dt);
    timed(CommOp::SendRecv, [&] { inner_.send(buf, count, dt, peer); });
  }
  void recv(void* buf, int64_t count, DType dt, int peer) override {
    timed(CommOp::SendRecv, [&] { inner_.recv(buf, count, dt, peer); });
  }
  void barrier() override { inner_.barrier(); }
  void join() override { inner_.join(); }
  bool trivial() const override { return inner_.trivial(); }

 private:
  void add(CommOp op, int64_t count, DType dt) {
    counts_.bytes[static_cast<int>(op)] += count * static_cast<int64_t>(dtype_size(dt));
    ++counts_.calls[static_cast<int>(op)];
  }
  // Runs one operation: a host communicator's call is timed here, a device one's by the inner
  // communicator (its kind noted, in issue order).
  template <class F>
  void timed(CommOp op, F&& call) {
    if (!timing_) return call();
    if (inner_.times_ops_on_device()) {
      kinds_.push_back(op);
      return call();
    }
    const auto t0 = std::chrono::steady_clock::now();
    call();
    timed_.seconds[static_cast<int>(op)] +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++timed_.calls[static_cast<int>(op)];
  }
  std::unique_ptr<Communicator> owned_;
  Communicator& inner_;
  CommBytes counts_;
  bool timing_ = false;
  CommTimes timed_;
  std::vector<CommOp> kinds_;
};

}  // namespace ssd
