// The parameter table: every parameter declared once (name, shape, init, decay, sharding).
// Init, optimizer groups, checkpoint names, export names and gradient reduction all iterate
// over this table; nothing else keeps its own list of parameters.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"
#include "core/tensor.h"

namespace ssd {

enum class Init {
  Normal002,          // N(0, 0.02): embedding
  UniformFanIn,       // U(-1/sqrt(fan_in), +): PyTorch's Linear/Conv1d default
  UniformFanInDepth,  // the same divided by sqrt(n_layer): out_proj (prenorm residual rescale)
  DtBias,             // inverse softplus of dt ~ log-uniform [1e-3, 1e-1], floor 1e-4
  ALog,               // log(U(1, 16))
  Ones,
};

// How a parameter splits under tensor parallelism (by SSM heads): Replicated on every rank;
// InProj: the rows of the rank's heads (z, x, dt) and of its B/C groups; ConvChannels: its x,
// B and C channels; Heads: dim 0 in tp equal parts (dt_bias, A_log, D, the gated norm's weight);
// OutProjRows: out_proj's input columns of its heads (a row-parallel linear); Vocab: its rows
// of the vocabulary.
enum class Shard { Replicated, InProj, Heads, ConvChannels, OutProjRows, Vocab };

struct ParamSpec {
  std::string name;   // reference name, e.g. "layers.3.mixer.in_proj.weight"
  Shape shape;
  Init init;
  int64_t fan_in = 0;  // for the uniform inits
  bool weight_decay;   // false for norms, biases, A_log, D, dt_bias
  bool gemm_weight;    // read by GEMMs in compute dtype (a compute copy is kept)
  Shard shard;
  int layer = -1;      // -1 for embedding / norm_f
};

// What tensor-parallel rank `rank` of `tp` holds of a model: whole heads, whole B/C groups (or,
// with fewer groups than ranks, one group shared by `span` consecutive ranks) and a slice of
// the padded vocabulary. tp = 1 gives the whole model.
struct TpDims {
  int64_t tp = 1, rank = 0;
  int64_t span = 1;  // ranks sharing one B/C group (tp / ngroups when ngroups < tp)
  // Held here: heads, B/C groups, d_inner, conv channels, in_proj rows, vocabulary rows.
  int64_t nheads = 0, ngroups = 0, d_inner = 0, conv_dim = 0, d_in_proj = 0, vocab = 0;
  int64_t head0 = 0, group0 = 0, vocab0 = 0;  // the first head, group and vocabulary row held
  int64_t norm_group = 0;  // columns of one gated-norm group held here (the group / span)
};
// Throws ssd::Error naming the keys when tp does not split the model (see resolve_layout).
TpDims tp_dims(const ModelConfig& m, int64_t tp, int64_t rank);

// Rows of a full tensor held by one rank (a row: everything after dim 0).
struct ShardBlock {
  int64_t full_row = 0, local_row = 0, rows = 0;
  // B/C rows shared by span > 1 ranks: each rank's backward gives a part of their gradient.
  bool shared = false;
};
// Which part of a parameter one tensor-parallel rank holds.
struct ShardLayout {
  Shape full_shape, local_shape;
  std::vector<ShardBlock> blocks;
  int64_t col0 = 0, cols = 0;  // 2-D column split: local = full[:, col0 : col0 + cols] (cols 0: none)
  int64_t replicas = 1;        // ranks holding this same whole tensor (tp for Replicated)
  void to_local(const float* full, float* local) const;
  void to_full(const float* local, float* full) const;  // writes only the part held here
  // The local tensor as element ranges [offset, offset + length), each with the number of
  // tensor-parallel ranks holding the same values (replicas, or `span` for shared B/C rows):
  // what a sum over the whole model counts once.
  struct CountedRange {
    int64_t offset = 0, length = 0, copies = 1;
  };
  std::vector<CountedRange> counted_ranges(int64_t span) const;
};
ShardLayout shard_layout(const ParamSpec& spec, const TpDims& d, const ModelConfig& m);

// The table for a model config, in a fixed order (the checkpoint and export order).
std::vector<ParamSpec> param_table(const ModelConfig& m);

// Fills host memory for one parameter with its initial values. Values depend only on
// (seed, spec.name), never on order or thread count, so any rank can make any parameter.
void init_param(const ParamSpec& spec, const ModelConfig& m, uint64_t seed, float* out);

int64_t count_params(const std::vector<ParamSpec>& table);

// Names and shapes (no data) of the table: what a checkpoint or an export must hold.
std::vector<HostTensor> param_shapes(const std::vector<ParamSpec>& table);

class Communicator;
// Full tensors from the shards of a tensor-parallel group (host memory, `tp` of size dims.tp):
// `local[i]` is this rank's part of table[i]; the full tensors land on the group's rank 0,
// nothing elsewhere. Collective over `tp`.
std::vector<std::vector<float>> gather_full(Communicator& tp, const std::vector<ParamSpec>& table,
                                            const ModelConfig& m,
                                            const std::vector<std::vector<float>>& local);
// The same for one tensor: `local` is this rank's part of `spec`; the full tensor lands on the
// group's rank 0 (empty elsewhere). Collective over `tp` (every rank with the same spec).
std::vector<float> gather_full(Communicator& tp, const ParamSpec& spec, const ModelConfig& m,
                               const std::vector<float>& local);

}  // namespace ssd
