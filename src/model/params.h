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

// How a parameter splits under tensor parallelism (by SSM heads). Used by the TP work.
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

// The table for a model config, in a fixed order (the checkpoint and export order).
std::vector<ParamSpec> param_table(const ModelConfig& m);

// Fills host memory for one parameter with its initial values. Values depend only on
// (seed, spec.name), never on order or thread count, so any rank can make any parameter.
void init_param(const ParamSpec& spec, const ModelConfig& m, uint64_t seed, float* out);

int64_t count_params(const std::vector<ParamSpec>& table);

// Names and shapes (no data) of the table: what a checkpoint or an export must hold.
std::vector<HostTensor> param_shapes(const std::vector<ParamSpec>& table);

}  // namespace ssd
