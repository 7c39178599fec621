// The NCCL communicator: device memory, the CUDA backend. One NCCL communicator per group,
// bootstrapped by broadcasting the unique id over the group's MPI communicator; created
// non-blocking so that nothing waits inside NCCL unwatched. Every operation runs on the
// communicator's own stream after an event on the backend's stream, and is tracked until it
// completes: the watchdog aborts the communicator and the job when one does not finish within
// parallel.timeout_s or NCCL reports an asynchronous error (a peer that died, a network error).
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <deque>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "dist/grid.h"
#include "dist/watchdog.h"

namespace ssd {
namespace {

using Clock = std::chrono::steady_clock;

ncclDataType_t nccl_type(DType dt) {
  switch (dt) {
    case DType::F32: return ncclFloat32;
    case DType::F64: return ncclFloat64;
    case DType::BF16: return ncclBfloat16;
    case DType::I32: return ncclInt32;
  }
  return ncclFloat32;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Max: return ncclMax;
    case ReduceOp::Min: return ncclMin;
  }
  return ncclSum;
}

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("CUDA error in ", what, ": ", cudaGetErrorString(e));
}

class NcclComm final : public Communicator {
 public:
  NcclComm(Communicator& host, Backend& be) : host_(host), be_(be), name_(host.name()) {
    compute_ = static_cast<cudaStream_t>(be.native_stream());
    SSD_CHECK(compute_ != nullptr, "NCCL needs a CUDA backend");
    cuda_ok(cudaSetDevice(be.device_index()), "cudaSetDevice");
    cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    ncclUniqueId id;
    if (host.rank() == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    host.broadcast(&id, sizeof id / 4, DType::I32, 0);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclResult_t r = ncclCommInitRankConfig(&comm_, host.size(), id, host.rank(), &cfg);
    if (r != ncclSuccess && r != ncclInProgress) check(r, "ncclCommInitRankConfig");
    settle("ncclCommInitRankConfig");
    abort_hook_ = watchdog::add_abort_hook([this] {
      if (comm_) ncclCommAbort(comm_);
    });
    poller_ = watchdog::add_poller([this] { return poll(); });
  }

  ~NcclComm() override {
    watchdog::remove_poller(poller_);
    watchdog::remove_abort_hook(abort_hook_);
    cudaStreamSynchronize(stream_);
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& op : inflight_) cudaEventDestroy(op.done);
      inflight_.clear();
    }
    for (cudaEvent_t e : free_) cudaEventDestroy(e);
    for (auto [start, stop] : timed_) cudaEventDestroy(start), cudaEventDestroy(stop);
    if (comm_) {
      ncclCommFinalize(comm_);
      settle("ncclCommFinalize");
      ncclCommDestroy(comm_);
    }
    cudaStreamDestroy(stream_);
  }

  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  const std::string& name() const override { return name_; }
  Device device() const override { return Device::CUDA; }
  bool trivial() const override { return false; }
  bool times_ops_on_device() const override { return true; }
  void set_op_timing(bool on) override { timing_ = on; }
  std::vector<double> take_op_seconds() override {
    std::vector<double> out;
    for (auto [start, stop] : timed_) {
      cuda_ok(cudaEventSynchronize(stop), "cudaEventSynchronize");
      float ms = 0;
      cuda_ok(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
      out.push_back(ms * 1e-3);
      cudaEventDestroy(start);
      cudaEventDestroy(stop);
    }
    timed_.clear();
    return out;
  }

  void all_reduce(void* buf, int64_t count, DType dt, ReduceOp op) override {
    if (count == 0) return;
    begin();
    check(ncclAllReduce(buf, buf, count, nccl_type(dt), nccl_op(op), comm_, stream_), "ncclAllReduce");
    end("all_reduce", count);
  }
  void reduce_scatter(const void* send, void* recv, int64_t count, DType dt) override {
    if (count == 0) return;
    begin();
    check(ncclReduceScatter(send, recv, count, nccl_type(dt), ncclSum, comm_, stream_),
          "ncclReduceScatter");
    end("reduce_scatter", count * size());
  }
  void all_gather(const void* send, void* recv, int64_t count, DType dt) override {
    if (count == 0) return;
    begin();
    check(ncclAllGather(send, recv, count, nccl_type(dt), comm_, stream_), "ncclAllGather");
    end("all_gather", count * size());
  }
  void broadcast(void* buf, int64_t count, DType dt, int root) override {
    if (count == 0) return;
    begin();
    check(ncclBroadcast(buf, buf, count, nccl_type(dt), root, comm_, stream_), "ncclBroadcast");
    end("broadcast", count);
  }
  void send(const void* buf, int64_t count, DType dt, int peer) override {
    begin();
    check(ncclSend(buf, count, nccl_type(dt), peer, comm_, stream_), "ncclSend");
    end("send", count);
  }
  void recv(void* buf, int64_t count, DType dt, int peer) override {
    begin();
    check(ncclRecv(buf, count, nccl_type(dt), peer, comm_, stream_), "ncclRecv");
    end("recv", count);
  }
  void barrier() override {
    join();
    cuda_ok(cudaStreamSynchronize(compute_), "barrier");
    host_.barrier();
  }
  // The backend's later work waits for every operation issued so far.
  void join() override {
    cudaEvent_t e = event();
    cuda_ok(cudaEventRecord(e, stream_), "cudaEventRecord");
    cuda_ok(cudaStreamWaitEvent(compute_, e, 0), "cudaStreamWaitEvent");
    recycle(e);
  }

 private:
  struct Op {
    cudaEvent_t done;
    Clock::time_point issued;
    std::string what;
  };

  void check(ncclResult_t r, const char* what) {
    if (r == ncclSuccess || r == ncclInProgress) return;
    watchdog::abort_job(std::string(what) + " on group " + name_ + " failed: " +
                        ncclGetErrorString(r) + " (" + ncclGetLastError(comm_) + ")");
  }
  // Non-blocking calls may still be in progress on return: wait for them, watched.
  void settle(const char* what) {
    const auto start = Clock::now();
    for (;;) {
      ncclResult_t st = ncclSuccess;
      ncclCommGetAsyncError(comm_, &st);
      if (st == ncclSuccess) return;
      if (st != ncclInProgress) check(st, what);
      if (std::chrono::duration<double>(Clock::now() - start).count() > watchdog::timeout_s())
        watchdog::abort_job(std::string(what) + " on group " + name_ +
                            " did not finish within parallel.timeout_s");
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  void begin() {
    cudaEvent_t ready = event();
    cuda_ok(cudaEventRecord(ready, compute_), "cudaEventRecord");
    cuda_ok(cudaStreamWaitEvent(stream_, ready, 0), "cudaStreamWaitEvent");
    recycle(ready);
    if (timing_) {  // from when the stream may start the operation
      timed_.emplace_back();
      cuda_ok(cudaEventCreate(&timed_.back().first), "cudaEventCreate");
      cuda_ok(cudaEventCreate(&timed_.back().second), "cudaEventCreate");
      cuda_ok(cudaEventRecord(timed_.back().first, stream_), "cudaEventRecord");
    }
  }
  void end(const char* op, int64_t count) {
    settle(op);
    if (timing_) cuda_ok(cudaEventRecord(timed_.back().second, stream_), "cudaEventRecord");
    cudaEvent_t done = event();
    cuda_ok(cudaEventRecord(done, stream_), "cudaEventRecord");
    std::lock_guard<std::mutex> g(mu_);
    inflight_.push_back({done, Clock::now(),
                         std::string(op) + " on group " + name_ + " (" + std::to_string(count) +
                             " elements)"});
  }
  // Watchdog thread: retire finished operations; report a late one or an async error.
  std::string poll() {
    std::lock_guard<std::mutex> g(mu_);
    while (!inflight_.empty()) {
      Op& op = inflight_.front();
      cudaError_t q = cudaEventQuery(op.done);
      if (q == cudaSuccess) {
        free_.push_back(op.done);
        inflight_.pop_front();
        continue;
      }
      if (q != cudaErrorNotReady) return op.what + ": CUDA error " + cudaGetErrorString(q);
      double waited = std::chrono::duration<double>(Clock::now() - op.issued).count();
      if (waited > watchdog::timeout_s())
        return op.what + " has not finished after " + std::to_string(static_cast<int>(waited)) +
               " s (parallel.timeout_s): a peer process is dead, stopped or unreachable";
      break;
    }
    ncclResult_t st = ncclSuccess;
    ncclCommGetAsyncError(comm_, &st);
    if (st != ncclSuccess && st != ncclInProgress)
      return "NCCL reported an asynchronous error on group " + name_ + ": " +
             ncclGetErrorString(st);
    return "";
  }
  cudaEvent_t event() {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (!free_.empty()) {
        cudaEvent_t e = free_.back();
        free_.pop_back();
        return e;
      }
    }
    cudaEvent_t e;
    cuda_ok(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    return e;
  }
  // An event whose record has been waited on can be recorded again right away.
  void recycle(cudaEvent_t e) {
    std::lock_guard<std::mutex> g(mu_);
    free_.push_back(e);
  }

  Communicator& host_;
  Backend& be_;
  std::string name_;
  cudaStream_t compute_ = nullptr, stream_ = nullptr;
  ncclComm_t comm_ = nullptr;
  std::mutex mu_;
  std::deque<Op> inflight_;
  std::vector<cudaEvent_t> free_;
  bool timing_ = false;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> timed_;  // per timed operation: start, end
  int poller_ = 0, abort_hook_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_comm(Communicator& host, Backend& be) {
  return std::make_unique<NcclComm>(host, be);
}

}  // namespace ssd
