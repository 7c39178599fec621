// Data-parallel gradient reduction and the optimizer state, over the dp x cp group.
//
// The model's flat gradient buffer (backward order) is cut into buckets of about
// parallel.bucket_mb at parameter boundaries. During the last micro-batch of a step, each bucket
// is reduced as soon as the backward has finished its gradients (the model's ready hook), so on
// GPUs the NCCL reduction of the late layers overlaps the backward of the early ones. Buckets are
// issued in one fixed order, so a step is bitwise reproducible.
//
// zero=0: each bucket is all-reduced; every rank updates every parameter.
// zero=1 (ZeRO-1): each bucket is reduce-scattered; rank r of the group keeps the AdamW moments
// of the r-th part of every bucket only, updates that part of the parameters, and the parts are
// all-gathered back into every rank's parameters.
#pragma once
#include <cstdint>
#include <map>
#include <vector>

#include "backend/backend.h"
#include "dist/grid.h"
#include "model/mamba2.h"

namespace ssd {

class GradSync {
 public:
  GradSync(Mamba2LM& model, Backend& be, ProcessGrid& grid, const ParallelConfig& pc,
           double weight_decay);

  // Call before each micro-batch's forward_backward; `last` arms the bucket reductions.
  void before_micro_batch(bool last);
  // After the last micro-batch: reduces what the hooks have not, waits for the reductions.
  void finish_backward();
  // sqrt of the sum of squares of the reduced gradients (all of them, over the group).
  double grad_norm();
  // AdamW on this rank's part, then (zero=1) the parameters gathered back everywhere, and the
  // model's compute copies refreshed.
  void step(const AdamWHyper& h);

  // Per-parameter moments (table order; this tensor-parallel rank's parts) on the group's
  // rank 0 (empty elsewhere), and loading them from there (`m`/`v` only read on rank 0).
  // Collective over the dp x cp group.
  void moments_to_root(std::vector<std::vector<float>>& m, std::vector<std::vector<float>>& v);
  void moments_from_root(const std::vector<std::vector<float>>& m,
                         const std::vector<std::vector<float>>& v);
  // The reduced gradients (this tensor-parallel rank's parts) as host tensors in table order,
  // on every rank; for tests.
  std::vector<std::vector<float>> gathered_grads();

  // Bytes of AdamW moments this rank holds, and what it would hold without sharding.
  int64_t moment_bytes() const { return 2 * shard_len_ * 4; }
  int64_t unsharded_moment_bytes() const;
  int num_buckets() const { return static_cast<int>(buckets_.size()); }

 private:
  struct Bucket {
    int64_t lo = 0, len = 0;  // range of the flat buffers (len a multiple of the group size)
    int stage = 0;            // launched when the backward passes this ready stage
    int64_t shard_pos = 0;    // where this rank's part sits in the moment shard (zero=1)
    bool launched = false;
  };
  void on_ready(int stage);
  void build_norm_groups();
  void launch(Bucket& b);
  // This rank's part of bucket b: [own_lo, own_lo + part) of the flat buffers.
  int64_t part(const Bucket& b) const { return b.len / group_; }
  int64_t own_lo(const Bucket& b, int r) const { return b.lo + r * part(b); }
  // Host fp32 copy of a flat range of a device/host buffer.
  std::vector<float> download_range(const Tensor& flat, int64_t lo, int64_t len);
  void upload_range(Tensor& flat, int64_t lo, const float* src, int64_t len);

  Mamba2LM& model_;
  Backend& be_;
  ProcessGrid& grid_;
  Communicator& comm_;  // dp x cp, on the backend's memory
  int group_ = 1, rank_ = 0;
  bool zero_ = false, armed_ = false;
  std::vector<Bucket> buckets_;
  Tensor m_, v_;           // moments: full flat buffers (zero=0) or this rank's shard (zero=1)
  int64_t shard_len_ = 0;  // elements of m_ (and v_)
  std::vector<AdamWSlot> slots_;
  std::vector<Tensor> slot_grads_;
  // Tensor parallelism: the gradients this rank sums for the norm, by how many ranks of the
  // tp group hold the same values (empty when tp = 1: slot_grads_ are all of them).
  std::map<int64_t, std::vector<Tensor>> norm_groups_;
};

}  // namespace ssd
