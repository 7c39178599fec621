// The Mamba-2 language model, written once against the Backend interface:
//   embedding -> n_layer x [residual add + RMSNorm -> Mamba2 mixer] -> add + norm_f -> tied head
// Mixer: in_proj -> [z | xBC | dt]; conv1d+SiLU on xBC; SSD; gated RMSNorm with z; out_proj.
// Buffers are allocated once for a fixed (batch, seqlen); every step reuses them. With
// activation recomputation, only each layer's input and residual are kept from the forward;
// the backward runs each layer's forward again, into one shared set of buffers.
#pragma once
#include <array>
#include <functional>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"
#include "dist/comm.h"
#include "model/params.h"

namespace ssd {

// How context-parallel ranks pass the SSD state on (parallel.cp_combine; set_context_parallel).
enum class CpCombine { Ring, AllGather };
// parallel.cp_combine ("ring" | "allgather", validated with the config).
CpCombine cp_combine_of(const ParallelConfig& p);

class Mamba2LM {
 public:
  // flat_align: every parameter's offset in the flat buffers is a multiple of it (64, or a
  // multiple of 64 that the data-parallel group size divides, so buckets split evenly).
  // tp, tp_rank: this model is tensor-parallel rank tp_rank of tp (params.h, TpDims): it holds
  // its heads' part of every mixer, its slice of the vocabulary, and copies of the norms.
  // sequence_parallel (tp > 1): the residual stream, its adds and RMSNorms hold this rank's
  // 1/tp of the micro-batch's tokens (rows [rank*T/tp, (rank+1)*T/tp) of batch*seqlen); the
  // mixer all-gathers its input and reduce-scatters its output instead of one all-reduce.
  // master_in_shards (ZeRO-1, parallel.zero=1): the model holds no fp32 master weights, only
  // what the forward reads (see compute_buffer); GradSync keeps this rank's shard of the master
  // and writes the updated weights back after each step.
  Mamba2LM(const ModelConfig& cfg, Backend& be, int64_t batch, int64_t seqlen,
           bool recompute_activations = false, int64_t flat_align = 64, int64_t tp = 1,
           int64_t tp_rank = 0, bool sequence_parallel = false, bool master_in_shards = false);

  const ModelConfig& config() const { return cfg_; }
  Backend& backend() { return be_; }
  // The full model's table (names and full shapes: what checkpoints and exports hold). What
  // this rank holds of parameter i is shard(i); params()[i] has shard(i).local_shape.
  const std::vector<ParamSpec>& table() const { return table_; }
  const ShardLayout& shard(int i) const { return shards_[i]; }
  const TpDims& tp_dims() const { return tpd_; }
  int64_t batch() const { return batch_; }
  int64_t seqlen() const { return seqlen_; }

  // Master parameters and gradients (accum dtype), in table order. With the master in shards,
  // params() are only the accum-dtype weights the kernels read (the non-GEMM parameters, full);
  // the GEMM weights' entries are undefined there (they exist as compute_buffer() views only).
  std::vector<Tensor>& params() { return params_; }
  std::vector<Tensor>& grads() { return grads_; }
  // All of grads() in one buffer, and all of params() in another with the same layout (views
  // into them, each 64-element aligned; the gaps stay 0): one zeroing, and gradient buckets and
  // ZeRO shards that are plain ranges. The layout is in backward order (norm_f, the last layer
  // first, ..., the embedding last), so the gradients the backward finishes first are one range.
  // param_buffer() is undefined with the master in shards.
  Tensor& grad_buffer() { return grad_flat_; }
  Tensor& param_buffer() { return param_flat_; }
  // Every parameter in compute dtype, the same layout again: the GEMMs read their weights from
  // it. Where compute dtype is accum dtype (the CPU) and the master is here, it is
  // param_buffer() itself.
  Tensor& compute_buffer() { return compute_flat_; }
  bool master_in_shards() const { return master_in_shards_; }
  // With the master in shards: the non-GEMM parameters in accum dtype, full, in a compact layout
  // of their own (params() are views into it); the kernels read them. Undefined otherwise.
  Tensor& accum_weights_buffer() { return accum_small_; }
  // Bytes of the non-GEMM parameters held here in accum dtype (what accum_weights_buffer holds,
  // without its alignment gaps).
  int64_t non_gemm_bytes() const;
  // With the master in shards, every load of parameter values (init, params_from_host,
  // load_params) also hands the values (this rank's tensor-parallel parts, table order) to
  // this function, which keeps the master shard (GradSync). Required before loading.
  void set_master_loader(std::function<void(const std::vector<std::vector<float>>&)> f) {
    master_loader_ = std::move(f);
  }
  // Offset of parameter i (table order) in both flat buffers.
  int64_t flat_offset(int i) const { return flat_off_[i]; }
  // When the backward has finished the gradients of parameter i (for the micro-batch running):
  // 0 for norm_f, 1 + (n_layer - 1 - l) for layer l's, n_layer + 1 for the embedding's. The
  // ready hook, when set, is called with each stage as soon as the backward passes it.
  int ready_stage(int i) const;
  int num_stages() const { return static_cast<int>(cfg_.n_layer) + 2; }
  void set_ready_hook(std::function<void(int stage)> hook) { ready_hook_ = std::move(hook); }

  // Context parallelism: this model holds segment cp.rank() of cp.size() of every sequence
  // (its seqlen is the segment's length). Only the SSD state entering each segment and the conv's
  // last d_conv-1 inputs cross ranks. The state, by `combine`:
  //  - Ring: in each layer's forward the state is handed on from rank to rank (rank r runs its
  //    SSD from the state rank r-1 ended with), and in the backward the state's gradient goes
  //    back the other way, each rank waiting for its neighbour.
  //  - AllGather: each rank summarises its segment (its final state from a zero start, S_r, and
  //    the share g_r of an entering state that survives it), one all-gather of the summaries,
  //    and each rank scans the earlier ranks' to its entering state H_r (H_{r+1} = g_r H_r +
  //    S_r). The backward gathers each rank's gradient of its entering state through its own
  //    outputs, D_r, and scans the later ranks' in reverse (G_r = D_r + g_r G_{r+1}) to the
  //    gradient of the state it ends with. Exact: the final state's dependence on the inputs,
  //    the decay's included, is in the full ssd_bwd given G_{r+1}.
  // The conv halo goes from neighbour to neighbour either way. `cp` lives on the backend's
  // memory; null turns it off.
  void set_context_parallel(Communicator* cp, CpCombine combine);
  CpCombine cp_combine() const { return cp_combine_; }
  // Bytes one rank sends per layer and step, forward and backward together (independent of the
  // sequence length; 0 without context parallelism): for the SSD state, the ring's state each
  // way, or the all-gathers' (cp - 1) summaries each way (what a rank receives, and what ring
  // all-gather algorithms send); for the conv halo, its rows each way.
  int64_t cp_state_bytes_per_layer() const;
  int64_t cp_halo_bytes_per_layer() const { return cp_ ? 2 * cp_send_.nbytes() : 0; }
  int64_t cp_bytes_per_layer() const {
    return cp_state_bytes_per_layer() + cp_halo_bytes_per_layer();
  }

  // Tensor parallelism: the communicators of the tensor-parallel group and of its ranks that
  // share a B/C group (both on the backend's memory). Each layer's forward sums out_proj's
  // partial outputs over `tp` (and the embedding's), its backward in_proj's input gradient
  // (and the LM head's); the gated norm of a group spanning ranks and the shared B/C
  // gradients go over `span`. Needed when tp > 1.
  void set_tensor_parallel(Communicator* tp, Communicator* span);
  // Whether this micro-batch's backward sums the B/C gradients shared by span ranks and
  // (sequence parallelism) the norm weights' per-token-range parts: once per step, on its last
  // micro-batch (GradSync sets it; true by default).
  void set_reduce_shared_grads(bool on) { reduce_shared_ = on; }

  // Initialises every parameter from the table's rules (seeded; independent of backend and of
  // the tensor-parallel layout: each rank takes its part of the full tensors).
  void init(uint64_t seed);
  // Host fp32 copies of the parameters this rank holds (local shapes), and loading them.
  // params_to_host needs the full master (not in shards: GradSync::params_to_root gathers it).
  std::vector<std::vector<float>> params_to_host();
  void params_from_host(const std::vector<std::vector<float>>& values);
  // Full tensors with names, in table order (tp = 1 only; a tensor-parallel model's full
  // tensors come from gather_full over its group).
  std::vector<HostTensor> named_params_to_host();
  // Loads full tensors named as the table (checked); each rank keeps its part.
  void load_params(const std::vector<HostTensor>& tensors);
  // Re-derives the compute-dtype copies of the GEMM weights from the full master; call after
  // changing params (with the master in shards GradSync writes compute_buffer() instead).
  void refresh_compute_weights();
  void zero_grads();

  // One micro-batch, forward and backward. tokens/targets: host int32 [batch*seqlen];
  // targets -1 are ignored. Gradients of grad_scale * (sum of token losses) accumulate into
  // grads(); stats (f64 [3] from new_stats()) accumulate {loss sum, tokens, argmax hits}.
  // reset (optional): host int32 [batch*seqlen], nonzero where a token begins a document of a
  // packed sequence: no conv or SSD state crosses into it, in every layer (also from the
  // previous context-parallel segment when it is a segment's first token). Null: one document
  // per sequence.
  void forward_backward(const int32_t* tokens, const int32_t* targets, double grad_scale,
                        Tensor& stats, const int32_t* reset = nullptr);
  // Forward only (evaluation).
  void forward_loss(const int32_t* tokens, const int32_t* targets, Tensor& stats,
                    const int32_t* reset = nullptr);
  // Logits [batch*seqlen, padded_vocab] as host fp32 (small inputs: tests and export checks).
  std::vector<float> logits(const int32_t* tokens, const int32_t* reset = nullptr);

  Tensor new_stats();                        // zeroed f64 [3] on the backend
  std::array<double, 3> read_stats(const Tensor& stats);

 private:
  struct LayerActs {
    Tensor rstd;      // [T] of the pre-mixer RMSNorm
    Tensor hidden;    // normalised input of the mixer [T, d_model]
    Tensor zxbcdt;    // in_proj output [T, d_in_proj]
    Tensor xBC;       // conv1d+SiLU output [T, conv_dim]
    Tensor y;         // SSD output [T, d_inner]
    Tensor grstd;     // [T, ngroups] of the gated norm
    Tensor ynorm;     // gated norm output [T, d_inner]
    Tensor ssd_saved; // the SSD forward's intermediates for its backward (backend-defined)
  };
  // Index of a parameter in the table for layer i (or -1 for the global ones).
  struct LayerParams {
    int norm, in_proj, conv_w, conv_b, dt_bias, A_log, D, gnorm, out_proj;
  };

  void upload_tokens(const int32_t* tokens, const int32_t* targets, const int32_t* reset);
  // The reset flags of the micro-batch running (null: none), and with context parallelism on a
  // rank > 0 those of the conv's extended rows (the previous rank's halo rows, then ours).
  const Tensor* reset() const { return has_reset_ ? &reset_ : nullptr; }
  const Tensor* reset_ext() const { return has_reset_ ? &reset_ext_ : nullptr; }
  void forward();
  // Layer i's forward from its input; the out_proj (the layer's output) only when asked.
  // exchange: talk to the neighbouring context-parallel ranks (false when recomputing: the
  // halo and the incoming state of the layer are kept from the forward).
  void layer_forward(int i, bool with_output, bool exchange = true);
  void conv_forward(int i, LayerActs& a, bool exchange);
  void conv_backward(int i, LayerActs& a);
  // cp_ext_ = per sequence, the previous rank's halo rows, then this segment's conv inputs.
  void build_conv_ext(int i, LayerActs& a);
  // The all-gather combine of layer i (cp_combine_ == AllGather): the state entering this
  // segment into cp_init_[i] (rank > 0); in the backward, given d_y_, the gradient of the state
  // leaving it into cp_dfinal_, returned (null on the last rank, whose final state is no one's).
  void cp_gather_state(int i, LayerActs& a);
  const Tensor* cp_gather_state_grad(int i, LayerActs& a);
  // One all-gather of cp_summary_ into cp_gathered_, then the scan to segment cp_rank_.
  void cp_scan(bool reverse, Tensor& out);
  LayerActs& acts(int i) { return acts_[recompute_ ? 0 : i]; }
  // Layer i reads input(i) and writes input(i + 1); the last layer writes x_.
  Tensor& input(int i) { return recompute_ && i < cfg_.n_layer ? x_in_[i] : x_; }
  const Tensor& w(int idx) const { return compute_[idx]; }
  SsdDims ssd_dims() const;
  SsdInputs ssd_inputs(int layer, LayerActs& a);
  // Tensor parallelism: t (on the backend) summed over the tensor-parallel group, in accum
  // dtype (through tp_red_ when t is in compute dtype).
  void tp_sum(Tensor& t);
  // Sequence parallelism: every rank's token rows into `full`; the sum of every rank's
  // `partial` [T, D] (accum) with this rank's rows into `local`; a norm weight's gradient summed.
  void sp_gather(const Tensor& local, Tensor& full);
  void sp_reduce_scatter(Tensor& partial, Tensor& local);
  void sp_sum_norm_grad(int idx);
  void reduce_shared_grads(int layer);

  ModelConfig cfg_;
  Backend& be_;
  int64_t batch_, seqlen_, T_;
  std::vector<ParamSpec> table_;
  TpDims tpd_;
  std::vector<ShardLayout> shards_;
  Communicator* tp_ = nullptr;    // null: tp = 1
  Communicator* span_ = nullptr;  // null: span = 1
  bool reduce_shared_ = true;
  VocabShard vshard_;
  NormSpan nspan_;
  Tensor tp_red_;  // [T, d_model] accum: partial sums of the tensor-parallel ranks
  bool sp_ = false;
  int64_t Tl_ = 0;  // tokens of the residual stream held here (T_, or T_ / tp with sp_)
  Tensor sp_hidden_, sp_red_;  // [Tl, d_model]: a norm's output (compute), a summed part (accum)
  Tensor sp_full_;             // [T, d_model] compute: gathered rows
  std::vector<Tensor> params_, grads_, compute_;
  Tensor grad_flat_, param_flat_, compute_flat_, accum_small_;
  bool master_in_shards_ = false;
  std::function<void(const std::vector<std::vector<float>>&)> master_loader_;
  std::vector<int64_t> flat_off_;
  std::function<void(int)> ready_hook_;
  void ready(int stage) { if (ready_hook_) ready_hook_(stage); }
  std::vector<LayerParams> lp_;
  int emb_ = 0, norm_f_ = 0;

  bool recompute_ = false;
  Tensor tokens_, targets_;
  Tensor reset_, reset_ext_;  // int32 [T] and, context-parallel, [batch * (seqlen + d_conv-1)]
  bool has_reset_ = false;
  Tensor cp_flags_send_, cp_flags_recv_;  // int32 [batch * (d_conv-1)]: the halo rows' flags
  Tensor x_;                 // embedding / mixer output, input of the next add [T, d_model]
  std::vector<Tensor> x_in_;      // recompute: each layer's input [T, d_model]
  std::vector<Tensor> residual_;  // residual stream after each layer's add (accum)
  std::vector<LayerActs> acts_;   // one per layer, or one shared set when recomputing
  Tensor res_f_, rstd_f_, hidden_f_;
  // context parallelism (cp_ null: off)
  Communicator* cp_ = nullptr;
  int cp_rank_ = 0, cp_size_ = 1;
  std::vector<Tensor> cp_init_;  // per layer: the SSD state entering this segment (rank > 0)
  std::vector<Tensor> cp_halo_;  // per layer: the previous rank's last d_conv-1 conv inputs
  Tensor cp_final_, cp_dfinal_, cp_dinit_;          // [batch, nheads, headdim, dstate]
  Tensor cp_ext_, cp_ext_out_, cp_ext_grad_;         // [batch * (seqlen + d_conv-1), conv_dim]
  Tensor cp_send_, cp_recv_;                         // [batch * (d_conv-1), conv_dim]
  CpCombine cp_combine_ = CpCombine::Ring;
  // AllGather: this rank's summary [S + G] (S = batch*nheads*headdim*dstate: a state-shaped S_r
  // or D_r, then G = batch*nheads decays g_r) as views into it, and every rank's [cp, S + G].
  Tensor cp_summary_, cp_sum_state_, cp_sum_decay_, cp_gathered_;
  // backward scratch (shared by all layers)
  Tensor d_hidden_, d_ynorm_, d_y_, d_xBC_, d_zxbcdt_, d_res_[2], d_x_;
};

}  // namespace ssd
