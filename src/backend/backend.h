// The backend interface: every operation the Mamba-2 model and the trainer need, forward and
// backward. The model is written once against this class; the CPU backend (src/backend/cpu) is
// the fp32/fp64 reference, the CUDA backend (src/backend/cuda + kernels/) the fast one.
//
// Conventions, for every op:
//  - Activations are row-major [tokens, features] with tokens = batch * seqlen (batch-major).
//  - Outputs named d<param> (parameter gradients) are ACCUMULATED into (+=), so gradient
//    accumulation over micro-batches needs no extra pass. Every other output is overwritten.
//  - Two dtypes per backend. accum_dtype(): parameters (master copies), their gradients and
//    optimizer moments, the residual stream, SSD states, saved rstd and stats. compute_dtype():
//    activations, and the GEMM weights (embedding, in_proj, out_proj), of which the model keeps
//    a compute-dtype copy refreshed after each optimizer step. Other parameters (norm weights,
//    conv1d weight and bias, dt_bias, A_log, D) are read in accum dtype.
//    CPU: both f32 (training) or both f64 (gradient checks). CUDA: bf16 compute, f32 accum.
//  - Optional tensors are passed as pointers; nullptr means "not wanted / not given".
#pragma once
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace ssd {

// Sizes of one SSD call. Heads of one group share B and C (nheads % ngroups == 0).
struct SsdDims {
  int64_t batch = 0, seqlen = 0, nheads = 0, headdim = 0, ngroups = 0, dstate = 0, chunk = 0;
  int64_t d_inner() const { return nheads * headdim; }
  int64_t conv_dim() const { return d_inner() + 2 * ngroups * dstate; }  // width of xBC
  int64_t tokens() const { return batch * seqlen; }
  int64_t nchunks() const { return (seqlen + chunk - 1) / chunk; }
};

// Inputs of the SSD op. xBC is the conv output [tokens, conv_dim] laid out as
// x [nheads*headdim] | B [ngroups*dstate] | C [ngroups*dstate]. dt is the raw projection
// (before dt_bias and softplus). States are [batch, nheads, headdim, dstate].
struct SsdInputs {
  Tensor xBC;
  ColSlice dt;            // [tokens, nheads]
  Tensor dt_bias;         // [nheads]
  Tensor A_log;           // [nheads], A = -exp(A_log)
  Tensor D;               // [nheads]
  const Tensor* initial_state = nullptr;
  // Optional: int32 [tokens], nonzero where a token begins a document (packed sequences).
  // There the state entering the token (from the token before, or initial_state at t = 0) is
  // dropped: no state crosses a document boundary. Null: one document per sequence.
  const Tensor* reset = nullptr;
  // Optional: ssd_saved_bytes of device memory (any dtype) that ssd_fwd fills with its
  // intermediates and ssd_bwd, given the same inputs, reads instead of recomputing them.
  Tensor* saved = nullptr;
};

// Gradients of the SSD op. dxBC and ddt are overwritten; dt_bias/A_log/D grads accumulate.
struct SsdGrads {
  Tensor dxBC;            // [tokens, conv_dim]
  ColSlice ddt;           // [tokens, nheads], gradient w.r.t. the raw dt
  Tensor d_dt_bias, dA_log, dD;
  Tensor* d_initial_state = nullptr;  // [batch, nheads, headdim, dstate] or null
};

// Tensor parallelism over the vocabulary (the tied embedding and LM head): this rank's weight
// holds rows [begin, begin + rows) of a vocabulary of `total` rows.
struct VocabShard {
  int64_t begin = 0, total = 0;
  int ranks = 1;
  // Gathers every rank's per-token partial statistics in rank order: `local` is [rows, 4] in
  // accum dtype on the backend, `all` is [ranks, rows, 4]. The LM head calls it the same number
  // of times, with the same rows, on every rank (the ranks share tokens and targets).
  std::function<void(const Tensor& local, Tensor& all)> all_gather;
};

// Tensor parallelism with fewer norm groups than ranks: each group of the gated RMSNorm spans
// `ranks` ranks, each holding group_size of its columns. `all_reduce` sums a
// [tokens, D / group_size] accum-dtype tensor in place over those ranks; the forward calls it
// once (sums of squares) and the backward once (the dot products), on every rank alike.
struct NormSpan {
  int64_t ranks = 1;
  std::function<void(Tensor&)> all_reduce;
};

struct AdamWHyper {
  double lr = 0, beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  int64_t step = 1;         // 1-based, for bias correction
  double grad_scale = 1.0;  // multiplies every gradient first (clipping)
};

// One parameter as the optimizer sees it.
struct AdamWSlot {
  Tensor param, grad, m, v;
  double weight_decay = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  // dtype used for activations and for the weights the GEMMs read.
  virtual DType compute_dtype() const = 0;
  virtual DType accum_dtype() const = 0;

  // ---- memory ----
  virtual Tensor alloc(const Shape& shape, DType dtype) = 0;  // uninitialised
  virtual void zero(Tensor& t) = 0;
  virtual void upload(Tensor& dst, const void* host_src) = 0;      // same dtype
  virtual void download(void* host_dst, const Tensor& src) = 0;    // same dtype
  virtual void convert(const Tensor& src, Tensor& dst) = 0;        // any dtype -> any dtype
  // dst rows [dst_row, dst_row + rows) = (or += with accumulate) src rows [src_row, ...), over
  // the slices' columns (same width and dtype). Moves the conv halo of context parallelism.
  virtual void copy_rows(const ColSlice& src, int64_t src_row, const ColSlice& dst,
                         int64_t dst_row, int64_t rows, bool accumulate) = 0;
  virtual void synchronize() {}
  // The stream the backend enqueues its work on (a cudaStream_t for CUDA; null on the CPU), so
  // a device communicator can order its own stream against it.
  virtual void* native_stream() { return nullptr; }
  virtual int device_index() const { return -1; }
  // Most device memory held by tensors at once so far (0 where not tracked: the CPU).
  virtual int64_t peak_memory_bytes() const { return 0; }
  // Per-op device time, for `bench train --breakdown`. While profiling is on, every op's device
  // time is recorded under a label (the op's name, plus the GEMM shape for linear ops);
  // profile_take() waits for the device and returns the totals since the last take, largest
  // first. Backends that cannot time their ops return nothing.
  struct OpTime {
    std::string label;
    double seconds = 0;
    int64_t calls = 0;
  };
  virtual void set_profiling(bool) {}
  virtual std::vector<OpTime> profile_take() { return {}; }
  // Bytes of SsdInputs::saved this backend uses at these sizes (0: it keeps nothing).
  virtual int64_t ssd_saved_bytes(const SsdDims&) const { return 0; }
  // "" when this backend can run the SSD op at these sizes, else why not (naming config keys).
  virtual std::string ssd_unsupported(const SsdDims&) const { return ""; }

  // ---- layers ----
  // out[t, :] = weight[tokens[t], :]. With a vocabulary shard, tokens are checked against
  // shard->total, weight row j is token shard->begin + j, tokens outside the shard give zero
  // rows (forward) and no gradient (backward).
  virtual void embedding_fwd(const Tensor& tokens, const Tensor& weight, Tensor& out,
                             const VocabShard* shard = nullptr) = 0;
  virtual void embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dweight,
                             const VocabShard* shard = nullptr) = 0;

  // residual_out = x + residual_in (residual_in may be null: first layer);
  // y = residual_out * rsqrt(mean(residual_out^2) + eps) * weight; rstd [tokens] saved.
  virtual void add_rmsnorm_fwd(const Tensor& x, const Tensor* residual_in, const Tensor& weight,
                               double eps, Tensor& residual_out, Tensor& y, Tensor& rstd) = 0;
  // d_residual = dresidual_next (may be null) + dL/dresidual_out through the norm. It is the
  // gradient for both x and residual_in.
  virtual void add_rmsnorm_bwd(const Tensor& dy, const Tensor* dresidual_next,
                               const Tensor& residual_out, const Tensor& weight,
                               const Tensor& rstd, Tensor& d_residual, Tensor& dweight) = 0;

  // y[M, N] = x[M, K] @ w[N, K]^T
  virtual void linear_fwd(const Tensor& x, const Tensor& w, Tensor& y) = 0;
  // dx = dy @ w (dx may be null); dw += dy^T @ x
  virtual void linear_bwd(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx,
                          Tensor& dw) = 0;

  // Causal depthwise conv over time for each sequence, then SiLU.
  // in: [batch*seqlen, >= C] columns; w: [C, 1, K]; bias: [C]; out: [batch*seqlen, C].
  // reset (optional, as SsdInputs::reset): tap k of token t reads the input of token
  // t-(K-1)+k only if no token in (t-(K-1)+k, t] begins a document (else it reads zero).
  virtual void conv1d_silu_fwd(const ColSlice& in, int64_t batch, int64_t seqlen,
                               const Tensor& w, const Tensor& bias, Tensor& out,
                               const Tensor* reset = nullptr) = 0;
  virtual void conv1d_silu_bwd(const ColSlice& in, int64_t batch, int64_t seqlen,
                               const Tensor& w, const Tensor& bias, const Tensor& dout,
                               ColSlice& din, Tensor& dw, Tensor& dbias,
                               const Tensor* reset = nullptr) = 0;

  // The SSD layer: dt = softplus(dt_raw + dt_bias), per head h and step t
  //   state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T,  y_t = state_t C_t + D_h x_t
  // y: [tokens, nheads*headdim]. final_state optional.
  virtual void ssd_fwd(const SsdDims& d, const SsdInputs& in, Tensor& y,
                       Tensor* final_state) = 0;
  // dfinal_state: gradient flowing into the final state (context parallelism), may be null.
  virtual void ssd_bwd(const SsdDims& d, const SsdInputs& in, const Tensor& dy,
                       const Tensor* dfinal_state, SsdGrads& g) = 0;

  // Context parallelism's all-gather combine (parallel.cp_combine=allgather). A sequence split
  // into segments: segment j's final state is g_j H_j + S_j, with H_j the state entering it,
  // S_j its final state from a zero start and g_j [batch, nheads] how much of H_j survives it.
  // So H_k is a scan over the earlier segments' (S_j, g_j), and the gradient of the state
  // leaving segment k one over the later segments' (D_j = dL/dH_j through segment j's outputs,
  // g_j). The ops below give these summaries for less than a full ssd_fwd / ssd_bwd, and the
  // scan. None of them touches in.saved except as ssd_bwd reads it.
  //
  // final_state of ssd_fwd with these inputs (from in.initial_state; null: zero), without y:
  // the chunk states and the pass between chunks only.
  virtual void ssd_final_state(const SsdDims& d, const SsdInputs& in, Tensor& final_state) = 0;
  // d_initial_state of ssd_bwd with these inputs, dy and dfinal_state (may be null), without
  // the other gradients: the chunks' local state gradients and the pass back over chunks. It
  // does not depend on in.initial_state; in.saved, when given, is read as ssd_bwd reads it.
  virtual void ssd_dinitial(const SsdDims& d, const SsdInputs& in, const Tensor& dy,
                            const Tensor* dfinal_state, Tensor& d_initial_state) = 0;
  // decay [batch, nheads] (accum dtype): the share of the initial state that reaches the final
  // state, final = decay * initial + (final from a zero start): exp of the sum of dt_t * A_h
  // over the sequence, evaluated as ssd_fwd passes states from chunk to chunk (the product of
  // the chunks' decays, with the backend's cut-offs), and 0 where a token of the sequence
  // begins a document (in.reset). Reads only dt, dt_bias, A_log and reset.
  virtual void ssd_segment_decay(const SsdDims& d, const SsdInputs& in, Tensor& decay) = 0;
  // The scan over n segment summaries: summaries [n, S + G] (accum dtype; S = batch * nheads *
  // headdim * dstate, G = batch * nheads), row j holding a state-shaped S_j then g_j: what one
  // all-gather of every segment's summary leaves. out [batch, nheads, headdim, dstate]:
  //   forward (reverse false): out = H_k,     H_0 = 0, H_{j+1} = g_j H_j + S_j
  //   reverse:                 out = G_{k+1}, G_n = 0, G_j = S_j + g_j G_{j+1}
  // i.e. the state entering segment k, or (rows = (D_j, g_j)) the gradient of the state leaving
  // segment k. Rows j >= k (forward) or j <= k (reverse) are not read.
  virtual void cp_state_scan(const SsdDims& d, const Tensor& summaries, int64_t k, bool reverse,
                             Tensor& out) = 0;

  // out = rmsnorm_groups(y * silu(z)) * weight, normalised over groups of group_size columns.
  // y, out: [tokens, D]; z: D columns; rstd: [tokens, D/group_size] saved for backward.
  // With a span (tensor parallelism), the mean is over group_size * span->ranks columns, the
  // other ranks' columns reached through span->all_reduce.
  virtual void gated_rmsnorm_fwd(const Tensor& y, const ColSlice& z, const Tensor& weight,
                                 int64_t group_size, double eps, Tensor& out, Tensor& rstd,
                                 const NormSpan* span = nullptr) = 0;
  virtual void gated_rmsnorm_bwd(const Tensor& dout, const Tensor& y, const ColSlice& z,
                                 const Tensor& weight, int64_t group_size, const Tensor& rstd,
                                 Tensor& dy, ColSlice& dz, Tensor& dweight,
                                 const NormSpan* span = nullptr) = 0;

  // Tied LM head + cross-entropy, never holding all logits at once.
  // logits = hidden[T, Dm] @ weight[V, Dm]^T; targets [T] int32, -1 = ignored.
  // stats (f64 [3], accumulated): += {sum of loss over counted tokens, counted tokens, argmax hits}.
  // If dhidden is given: dhidden = grad_scale * dloss/dhidden (overwritten) and
  // dweight += grad_scale * dloss/dweight, where loss is the SUM over counted tokens.
  // With a vocabulary shard (weight = this rank's rows), the loss, the hits and the softmax are
  // over the whole vocabulary, combined through shard->all_gather of per-token partial
  // statistics (row max, sum of exponentials, target logit, argmax); full logits never exist
  // on any rank. Every rank's stats are the full ones; dhidden is this rank's part (the sum
  // over the ranks is the gradient; it may then be in accum dtype), dweight its rows'.
  virtual void lm_head_ce(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                          double grad_scale, Tensor& stats, Tensor* dhidden, Tensor* dweight,
                          const VocabShard* shard = nullptr) = 0;

  // ---- optimizer ----
  // sum over tensors of sum(x^2), in double.
  virtual double sum_squares(std::span<const Tensor> ts) = 0;
  // Decoupled weight decay AdamW on every slot: p -= lr*(mhat/(sqrt(vhat)+eps) + wd*p).
  virtual void adamw_step(std::span<AdamWSlot> slots, const AdamWHyper& h) = 0;
};

// The CPU backend; always available. dtype F32 (training) or F64 (gradient checks).
std::unique_ptr<Backend> make_cpu_backend(DType dtype = DType::F32);
// The CUDA backend on `device_index`; throws ssd::Error when not built with CUDA or no GPU.
std::unique_ptr<Backend> make_cuda_backend(int device_index);
// Number of usable GPUs (0 without CUDA support or without a GPU).
int cuda_device_count();

}  // namespace ssd
