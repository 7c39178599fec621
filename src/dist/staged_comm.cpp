// MPI on device memory: each operation copies its buffers to host memory, runs the MPI
// operation, and copies the result back. Slow, but it lets several processes that share one GPU
// (which NCCL refuses) run every parallel layout on the CUDA backend: parallel.comm=mpi.
#include <vector>

#include "dist/grid.h"

namespace ssd {
namespace {

class StagedComm final : public Communicator {
 public:
  StagedComm(Communicator& host, Backend& be) : host_(host), be_(be) {}
  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  const std::string& name() const override { return host_.name(); }
  Device device() const override { return be_.device(); }

  void all_reduce(void* buf, int64_t count, DType dt, ReduceOp op) override {
    auto h = down(buf, count, dt);
    host_.all_reduce(h.data(), count, dt, op);
    up(buf, h, count, dt);
  }
  void reduce_scatter(const void* send, void* recv, int64_t count, DType dt) override {
    auto hs = down(send, count * size(), dt);
    std::vector<char> hr(count * dtype_size(dt));
    host_.reduce_scatter(hs.data(), hr.data(), count, dt);
    up(recv, hr, count, dt);
  }
  void all_gather(const void* send, void* recv, int64_t count, DType dt) override {
    auto hs = down(send, count, dt);
    std::vector<char> hr(count * size() * dtype_size(dt));
    host_.all_gather(hs.data(), hr.data(), count, dt);
    up(recv, hr, count * size(), dt);
  }
  void broadcast(void* buf, int64_t count, DType dt, int root) override {
    auto h = down(buf, count, dt);
    host_.broadcast(h.data(), count, dt, root);
    up(buf, h, count, dt);
  }
  void send(const void* buf, int64_t count, DType dt, int peer) override {
    auto h = down(buf, count, dt);
    host_.send(h.data(), count, dt, peer);
  }
  void recv(void* buf, int64_t count, DType dt, int peer) override {
    std::vector<char> h(count * dtype_size(dt));
    host_.recv(h.data(), count, dt, peer);
    up(buf, h, count, dt);
  }
  void barrier() override {
    be_.synchronize();
    host_.barrier();
  }

 private:
  Tensor dev(const void* p, int64_t count, DType dt) {
    return borrow(const_cast<void*>(p), dt, {count}, be_.device());
  }
  std::vector<char> down(const void* p, int64_t count, DType dt) {
    std::vector<char> h(count * dtype_size(dt));
    if (count) be_.download(h.data(), dev(p, count, dt));  // waits for the producing work
    return h;
  }
  void up(void* p, const std::vector<char>& h, int64_t count, DType dt) {
    if (!count) return;
    Tensor t = dev(p, count, dt);
    be_.upload(t, h.data());
  }

  Communicator& host_;
  Backend& be_;
};

}  // namespace

std::unique_ptr<Communicator> make_staged_comm(Communicator& host, Backend& be) {
  return std::make_unique<StagedComm>(host, be);
}

}  // namespace ssd
