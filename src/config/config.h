// Typed configuration: parsed from YAML once, validated before any work starts.
// Every key lives in exactly one table (config.cpp); unknown keys are errors.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ssd {

struct ModelConfig {
  int64_t d_model = 64;
  int64_t n_layer = 2;
  int64_t d_state = 16;
  int64_t headdim = 16;
  int64_t expand = 2;
  int64_t ngroups = 1;
  int64_t d_conv = 4;
  int64_t chunk_size = 64;
  int64_t vocab_size = 256;
  int64_t pad_vocab_size_multiple = 16;
  double norm_eps = 1e-5;

  int64_t d_inner() const { return expand * d_model; }
  int64_t nheads() const { return d_inner() / headdim; }
  int64_t conv_dim() const { return d_inner() + 2 * ngroups * d_state; }
  int64_t d_in_proj() const { return 2 * d_inner() + 2 * ngroups * d_state + nheads(); }
  int64_t padded_vocab() const {
    int64_t m = pad_vocab_size_multiple;
    return (vocab_size + m - 1) / m * m;
  }
};

struct TrainConfig {
  std::string device = "auto";  // auto | cpu | cuda
  int64_t seed = 1234;
  int64_t seq_len = 256;
  int64_t micro_batch = 8;
  int64_t grad_accum = 1;
  int64_t global_batch = 0;  // sequences per optimizer step over all data-parallel ranks; when
                             // set, grad_accum = global_batch / (micro_batch * dp), so the same
                             // config trains the same math on any number of GPUs. 0: micro_batch
                             // * grad_accum * dp.
  int64_t max_steps = 200;
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup_steps = 20;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // 0 disables clipping
  double beta1 = 0.9;
  double beta2 = 0.95;
  double adam_eps = 1e-8;
  std::string resume = "auto";     // auto | never | PATH
  std::string init_from = "";      // exported model directory to start from
  std::string on_nan = "stop";     // stop | skip
  int64_t max_skipped_steps = 10;  // on_nan=skip: more skipped steps than this in one run stop
                                   // it like on_nan=stop (a run that only skips is broken)
  std::string resume_config = "check";  // check: resuming under a config whose model or
                                        // optimisation keys differ from the checkpoint's is
                                        // refused; override: the new values win (logged)
  std::string recompute = "none";  // none | layers: keep only each layer's input and residual,
                                   // recompute the rest in the backward (less memory, ~1/3 more
                                   // compute)
  int64_t stop_after = 0;          // stop (with a checkpoint) after this many steps of this
                                   // invocation; 0: run to max_steps. For time-limited jobs.
};

struct DataConfig {
  std::string kind = "mqar";       // mqar | text
  std::string path = "";           // text: a file or directory of .txt files
  double val_fraction = 0.05;      // text: tail of the corpus held out for eval
  // Packed documents: no SSD or conv state crosses a document boundary (each document's first
  // token starts from a zero state). Defaults to true for indexed data (when the key is not
  // given), false elsewhere; true needs data that marks documents (indexed).
  bool reset_at_eos = false;
  // MQAR (multi-query associative recall)
  int64_t mqar_num_pairs = 8;
  int64_t mqar_key_vocab = 64;
  int64_t mqar_value_vocab = 64;
};

struct RunConfig {
  std::string name = "";          // defaults to the config file's stem
  std::string dir = "";           // defaults to runs/<name>
  int64_t log_every = 10;
  int64_t eval_every = 0;         // 0: only at the end
  int64_t eval_batches = 4;
};

struct CheckpointConfig {
  int64_t every = 0;              // steps between checkpoints; 0: only at the end
  int64_t keep_last = 3;
  std::string dir = "";           // defaults to <run.dir>/checkpoints
};

// How the job is split over its processes: world = dp * cp * tp, rank order tp fastest, then
// cp, then dp (a tensor-parallel group stays inside a node).
struct ParallelConfig {
  int64_t tp = 1;              // tensor parallelism (by SSM heads)
  // With tp > 1: the residual stream and its RMSNorms on 1/tp of the tokens (reduce-scatter
  // after out_proj, all-gather before in_proj instead of one all-reduce).
  bool sequence_parallel = false;
  int64_t cp = 1;              // context parallelism (by sequence segments)
  // How the cp ranks pass the SSD state on: allgather (every rank summarises its segment from a
  // zero start, one all-gather of the summaries and a local scan; the backward likewise in
  // reverse) | ring (each rank waits for the previous rank's final state, a chain of cp-1
  // hand-offs per layer, and the gradient back the same way). The same math; the default is the
  // one measured faster (docs/performance.md).
  std::string cp_combine = "allgather";
  int64_t zero = 0;            // 1: shard the fp32 master weights and AdamW moments over dp
  double bucket_mb = 160;      // gradient all-reduce bucket size (MB of fp32 gradients)
  double timeout_s = 600;      // a collective unfinished after this long ends the job
  std::string comm = "auto";   // auto (NCCL on GPUs, MPI on CPUs) | nccl | mpi
};

struct Config {
  ModelConfig model;
  TrainConfig train;
  DataConfig data;
  RunConfig run;
  CheckpointConfig checkpoint;
  ParallelConfig parallel;
  std::string source;             // file it came from ("" for built-in)
};

// Loads a YAML file, applies `key.path=value` overrides, validates. Throws ssd::Error naming
// the offending key or file.
Config load_config(const std::string& path, const std::vector<std::string>& overrides);
// Same, from YAML text (tests, and configs stored inside checkpoints).
Config parse_config(const std::string& yaml_text, const std::vector<std::string>& overrides,
                    const std::string& origin);
// The fully resolved config as YAML (every key, defaults included).
std::string config_to_yaml(const Config& c);
// Checks cross-field rules; throws ssd::Error naming the key.
void validate(const Config& c);

// The process layout of a job of `world` processes under config c. Throws ssd::Error naming the
// keys and numbers when the world or the batch does not divide.
struct Layout {
  int64_t world = 1, tp = 1, cp = 1, dp = 1;
  int64_t micro_batch = 1, grad_accum = 1;
  int64_t global_batch = 1;  // sequences per optimizer step, all ranks together
  int64_t comm_nccl = 0;     // 1: GPU collectives over NCCL (else MPI on host memory)
  // Tensor parallelism with fewer B/C groups than ranks: how many consecutive ranks of a
  // tensor-parallel group share one group (1: each rank owns whole groups).
  int64_t tp_span = 1;
};
Layout resolve_layout(const Config& c, int64_t world, bool on_gpu);

}  // namespace ssd
