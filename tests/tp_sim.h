// A tensor-parallel group simulated in one process: rank r's op call runs on thread r, and the
// ops' collective hooks (VocabShard::all_gather, NormSpan::all_reduce) meet at a barrier. Each
// hook moves its tensor through the host with the rank's own backend (download / upload: the
// CPU backend copies, the CUDA backend orders the copy after its queued work), so the same
// group serves the CPU and the CUDA tests. Sums add the ranks in rank order: every rank gets
// the same bits, as from a real all-reduce.
//
// A rank that returns (or throws) drops out of the barrier, so a rank that calls a hook more
// often than the others finds fewer partners instead of hanging the test; the hook logs below
// then differ, and the test's checks fail.
#pragma once
#include <gtest/gtest.h>

#include <barrier>
#include <cstring>
#include <exception>
#include <functional>
#include <thread>
#include <vector>

#include "backend/backend.h"

namespace ssdtest {

class SimGroup {
 public:
  explicit SimGroup(int ranks) : ranks_(ranks), bar_(ranks), slot_(ranks), log_(ranks) {}

  int ranks() const { return ranks_; }

  // Runs f(rank) for every rank on its own thread; rethrows the first rank's exception.
  void run(const std::function<void(int)>& f) {
    std::vector<std::thread> th;
    std::vector<std::exception_ptr> err(ranks_);
    for (int r = 0; r < ranks_; ++r)
      th.emplace_back([&, r] {
        try {
          f(r);
        } catch (...) {
          err[r] = std::current_exception();
        }
        bar_.arrive_and_drop();
      });
    for (auto& t : th) t.join();
    for (auto& e : err)
      if (e) std::rethrow_exception(e);
  }

  // VocabShard::all_gather for `rank` on backend `be`.
  std::function<void(const ssd::Tensor&, ssd::Tensor&)> all_gather(int rank, ssd::Backend& be) {
    return [this, rank, &be](const ssd::Tensor& local, ssd::Tensor& all) {
      log_[rank].push_back(local.numel());
      EXPECT_EQ(all.numel(), local.numel() * ranks_) << "all_gather: output size";
      EXPECT_EQ(all.dtype, local.dtype);
      std::vector<char> mine(local.nbytes());
      be.download(mine.data(), local);
      std::vector<char> every = exchange(rank, std::move(mine));
      if (every.size() != all.nbytes()) {
        ADD_FAILURE() << "all_gather: ranks passed different sizes";
        every.resize(all.nbytes());
      }
      be.upload(all, every.data());
    };
  }

  // NormSpan::all_reduce (sum) for `rank` on backend `be`: f32 or f64 tensors.
  std::function<void(ssd::Tensor&)> all_reduce(int rank, ssd::Backend& be) {
    return [this, rank, &be](ssd::Tensor& t) {
      log_[rank].push_back(t.numel());
      std::vector<char> mine(t.nbytes());
      be.download(mine.data(), t);
      const size_t n = mine.size();
      std::vector<char> every = exchange(rank, std::move(mine));
      if (every.size() != n * ranks_) {
        ADD_FAILURE() << "all_reduce: ranks passed different sizes";
        return;
      }
      std::vector<char> sum(n);
      if (t.dtype == ssd::DType::F64) add<double>(every, n, sum);
      else if (t.dtype == ssd::DType::F32) add<float>(every, n, sum);
      else ADD_FAILURE() << "all_reduce: dtype " << ssd::dtype_name(t.dtype);
      be.upload(t, sum.data());
    };
  }

  // Sizes (elements) each rank passed to its hooks, call by call.
  const std::vector<std::vector<int64_t>>& log() const { return log_; }

 private:
  // Every rank's bytes, concatenated in rank order.
  std::vector<char> exchange(int rank, std::vector<char> mine) {
    slot_[rank] = std::move(mine);
    bar_.arrive_and_wait();
    std::vector<char> every;
    for (int r = 0; r < ranks_; ++r) every.insert(every.end(), slot_[r].begin(), slot_[r].end());
    bar_.arrive_and_wait();  // all have read the slots before anyone writes them again
    return every;
  }
  template <class T>
  void add(const std::vector<char>& every, size_t n, std::vector<char>& out) {
    const size_t k = n / sizeof(T);
    std::vector<T> acc(k, T(0)), v(k);
    for (int r = 0; r < ranks_; ++r) {
      std::memcpy(v.data(), every.data() + r * n, n);
      for (size_t i = 0; i < k; ++i) acc[i] += v[i];
    }
    std::memcpy(out.data(), acc.data(), n);
  }

  int ranks_;
  std::barrier<> bar_;
  std::vector<std::vector<char>> slot_;
  std::vector<std::vector<int64_t>> log_;
};

// Rows [begin, begin + rows) of `total` held by rank r of R: the first total % R ranks hold one
// more (uneven shards on purpose; the model pads the vocabulary to even ones).
struct RowRange {
  int64_t begin, rows;
};
inline RowRange shard_rows(int64_t total, int R, int r) {
  const int64_t base = total / R, extra = total % R;
  return {r * base + std::min<int64_t>(r, extra), base + (r < extra ? 1 : 0)};
}

}  // namespace ssdtest
