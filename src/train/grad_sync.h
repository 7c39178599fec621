// Data-parallel gradient reduction and the optimizer state, over the dp x cp group.
//
// The model's flat gradient buffer (backward order) is cut into buckets of about
// parallel.bucket_mb at parameter boundaries. During the last micro-batch of a step, each bucket
// is reduced as soon as the backward has finished its gradients (the model's ready hook), so on
// GPUs the NCCL reduction of the late layers overlaps the backward of the early ones. Buckets are
// issued in one fixed order, so a step is bitwise reproducible.
//
// zero=0: each bucket is all-reduced; every rank updates every parameter (the model's full
// fp32 master), then the model refreshes its compute copies.
// zero=1 (ZeRO-1): each bucket is reduce-scattered; rank r of the group keeps the fp32 master
// weights and the AdamW moments of the r-th part of every bucket only (three shard buffers of
// the same layout: the parts, bucket after bucket). AdamW updates the master shard; each part
// is converted into the model's compute buffer (flat layout, compute dtype: bf16 on CUDA, the
// fp32 weights themselves on the CPU) and the parts are all-gathered there. The non-GEMM
// parameters, read in accum dtype by the kernels, are full copies in a small buffer of the
// model: each rank writes its parts into zeros and the buffer is summed over the group (exact:
// one term). The CPU runs the same steps, so its multi-process tests check the GPU's algorithm.
// The model is made with master_in_shards; every load of its weights (init, resume) reaches the
// master shard through its master loader, and checkpoints gather the shards tensor by tensor
// (tensor_to_root).
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
  // Sum of the squared master parameters of the whole model (each tensor-parallel copy counted
  // once), on every rank. Collective over the dp x cp and tp groups.
  double param_sumsq();
  // AdamW on this rank's part, then (zero=1) the parameters gathered back everywhere, and the
  // model's compute copies refreshed.
  void step(const AdamWHyper& h);

  // Per-parameter moments (table order; this tensor-parallel rank's parts) on the group's
  // rank 0 (empty elsewhere), and loading them from there (`m`/`v` only read on rank 0).
  // Collective over the dp x cp group.
  void moments_to_root(std::vector<std::vector<float>>& m, std::vector<std::vector<float>>& v);
  void moments_from_root(const std::vector<std::vector<float>>& m,
                         const std::vector<std::vector<float>>& v);
  // The master parameters (table order; this tensor-parallel rank's parts) on the group's rank
  // 0, empty elsewhere: the ZeRO-1 shards gathered, or the model's full master. Collective over
  // the dp x cp group. (Loading goes through the model: Mamba2LM::params_from_host.)
  std::vector<std::vector<float>> params_to_root();
  // One tensor of the table, for a checkpoint written tensor by tensor: table[i]'s master
  // parameter (the ZeRO-1 shards' pieces of it, or the model's full master) and its AdamW
  // moments, as host fp32 of this tensor-parallel rank's local shape, on the group's rank 0 (empty
  // elsewhere). Each rank sends its pieces of the tensor (all three in one message) to rank 0,
  // which holds this one tensor only. Collective over the dp x cp group: every rank calls it with
  // the same i.
  struct TensorState {
    std::vector<float> param, m, v;
  };
  TensorState tensor_to_root(int i);
  // The reduced gradients (this tensor-parallel rank's parts) as host tensors in table order,
  // on every rank; for tests.
  std::vector<std::vector<float>> gathered_grads();

  // Bytes of AdamW moments this rank holds, and what it would hold without sharding.
  int64_t moment_bytes() const { return 2 * shard_len_ * 4; }
  int64_t unsharded_moment_bytes() const;
  // Bytes of fp32 master weights this rank holds (its shard, or the model's full master), and
  // the full master's.
  int64_t master_bytes() const { return zero_ ? master_.nbytes() : model_.param_buffer().nbytes(); }
  int64_t unsharded_master_bytes() const;
  int num_buckets() const { return static_cast<int>(buckets_.size()); }

  // This rank's parts of the flat buffers in shard order: {flat offset, length, offset in the
  // shard buffers} (zero=0: the whole buffer at 0). The master shard and the moments are these
  // ranges of the full flat tensors, one after the other.
  struct Part {
    int64_t lo = 0, len = 0, at = 0;
  };
  std::vector<Part> parts(int group_rank) const;
  // The master shard (zero=1; undefined with zero=0: the model's param_buffer is the master).
  const Tensor& master_shard() const { return master_; }

 private:
  struct Bucket {
    int64_t lo = 0, len = 0;  // range of the flat buffers (len a multiple of the group size)
    int stage = 0;            // launched when the backward passes this ready stage
    int64_t shard_pos = 0;    // where this rank's part sits in the moment shard (zero=1)
    bool launched = false;
  };
  // A piece of parameter `param` in this rank's parts: flat range [lo, lo + len), at `at` of
  // the shard buffers (the master: master_ or, zero=0, the model's param_buffer; m_, v_).
  struct Piece {
    int param = 0;
    int64_t lo = 0, len = 0, at = 0;
  };
  void on_ready(int stage);
  void build_pieces();
  // The pieces of parameter i in `parts` (one rank's parts), appended to out in parts order: the
  // one walk behind the optimizer's slots (this rank's pieces) and the gathers to rank 0.
  void pieces_of(const std::vector<Part>& parts, int i, std::vector<Piece>& out) const;
  // Parameter i of each flat buffer in `bufs` (the master and/or the moments: shard buffers
  // with zero=1, full flat ones with zero=0), host fp32 of its local shape, on the group's
  // rank 0 (empty elsewhere). Collective over the dp x cp group.
  std::vector<std::vector<float>> tensor_to_root(int i, const std::vector<const Tensor*>& bufs);
  // Tensors of the master (master) or of the reduced gradients, grouped by how many
  // tensor-parallel ranks hold the same values (tp = 1: all in one group of 1).
  std::map<int64_t, std::vector<Tensor>> counted_tensors(bool master);
  // Sum of squares of such groups, each counted once over the whole model.
  double sum_squares(const std::map<int64_t, std::vector<Tensor>>& groups);
  Tensor& master() { return zero_ ? master_ : model_.param_buffer(); }
  void load_master(const std::vector<std::vector<float>>& local);
  // Rank 0's full flat buffers (host fp32, flat layout) into every rank's shard buffers `bufs`.
  void shards_from_root(std::vector<std::vector<float>>& full, const std::vector<Tensor*>& bufs);
  // A host flat buffer cut into parameters (table order, local shapes), and the reverse.
  std::vector<std::vector<float>> by_param(const std::vector<float>& flat) const;
  std::vector<float> to_flat(const std::vector<std::vector<float>>& per_param) const;
  void launch(Bucket& b);
  // This rank's part of bucket b: [own_lo, own_lo + part) of the flat buffers.
  int64_t part(const Bucket& b) const { return b.len / group_; }
  int64_t own_lo(const Bucket& b, int r) const { return b.lo + r * part(b); }
  // Host fp32 copy of a flat range of a device/host buffer (into out: len values).
  std::vector<float> download_range(const Tensor& flat, int64_t lo, int64_t len);
  void download_into(const Tensor& flat, int64_t lo, int64_t len, float* out);
  void upload_range(Tensor& flat, int64_t lo, const float* src, int64_t len);

  Mamba2LM& model_;
  Backend& be_;
  ProcessGrid& grid_;
  Communicator& comm_;  // dp x cp, on the backend's memory
  int group_ = 1, rank_ = 0;
  bool zero_ = false, armed_ = false;
  std::vector<Bucket> buckets_;
  Tensor m_, v_;           // moments: full flat buffers (zero=0) or this rank's shard (zero=1)
  Tensor master_;          // zero=1: this rank's shard of the fp32 master weights
  int64_t shard_len_ = 0;  // elements of m_ (and v_, master_)
  std::vector<Piece> pieces_;
  std::vector<AdamWSlot> slots_;
  // The reduced gradients this rank sums for the norm and its master parameters, by how many
  // ranks of the tp group hold the same values.
  std::map<int64_t, std::vector<Tensor>> norm_groups_, param_groups_;
};

}  // namespace ssd
