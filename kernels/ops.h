// Host launchers of the CUDA kernels in kernels/*.cu (except the SSD kernels: kernels/ssd.h).
// Plain C++ header: src/backend/cuda/cuda_backend.cpp (compiled by the host compiler) calls
// these. Same math and conventions as the CPU reference in src/backend/cpu/cpu_ops.h:
// parameter gradients (dweight, dw, dbias) accumulate, everything else is overwritten.
// Every launcher enqueues on `stream` and returns without synchronising. `ld*` are row strides
// in elements. Ops that need scratch take a `ws` pointer of at least *_workspace_bytes() bytes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/tensor.h"

namespace ssd::cuda {

using bf16 = __nv_bfloat16;

// convert.cu: dst[i] = src[i] for n elements; f32, f64, bf16 to each other, i32 to i32.
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
             cudaStream_t stream);

// copy_rows.cu: dst[r, c] (+)= src[r, c] for `rows` rows of `width` columns (row strides lds,
// ldd); f32 or bf16 (bf16 sums in f32, rounded once).
void copy_rows(const void* src, int64_t lds, void* dst, int64_t ldd, int64_t rows, int64_t width,
               DType dtype, bool accumulate, cudaStream_t stream);

// embedding.cu. weight / out: f32 or bf16. The weight's `vocab` rows are tokens [row0, row0 +
// vocab) (row0 = 0 unless vocabulary-sharded); other tokens give a zero row (fwd) and are
// skipped (bwd). The backward pass is deterministic: tokens are radix-sorted and each
// distinct token's rows are summed in token order.
void embedding_fwd(const int32_t* tokens, int64_t ntok, const void* weight, DType weight_dtype,
                   int64_t row0, int64_t vocab, int64_t dim, void* out, DType out_dtype,
                   cudaStream_t stream);
size_t embedding_bwd_workspace_bytes(int64_t ntok, int64_t vocab);
void embedding_bwd(const int32_t* tokens, int64_t ntok, const void* dout, DType dout_dtype,
                   int64_t row0, int64_t vocab, int64_t dim, float* dweight, void* ws,
                   cudaStream_t stream);

// rmsnorm.cu: fused residual add + RMSNorm. x and dy: f32 or bf16; y: f32 or bf16; the
// residual stream, weight, rstd and their gradients f32. residual_in / dres_next may be null.
// dweight is reduced in two stages (per-block partials in ws, then a column sum).
void add_rmsnorm_fwd(const void* x, DType x_dtype, const float* residual_in, const float* weight,
                     int64_t ntok, int64_t dim, float eps, float* residual_out, void* y,
                     DType y_dtype, float* rstd, cudaStream_t stream);
size_t add_rmsnorm_bwd_workspace_bytes(int64_t ntok, int64_t dim);
void add_rmsnorm_bwd(const void* dy, DType dy_dtype, const float* dres_next,
                     const float* residual_out, const float* weight, const float* rstd,
                     int64_t ntok, int64_t dim, float* d_residual, float* dweight, void* ws,
                     cudaStream_t stream);

// conv1d.cu: causal depthwise conv (kernel width K <= kMaxConvWidth) + SiLU.
// out[t, c] = silu(bias[c] + sum_k w[c*K + k] * in[t - K + 1 + k, c]) within each sequence.
// reset (may be null): device int32 [batch*seqlen], nonzero where a token begins a document;
// then within each document too (a tap never reads across a document start).
constexpr int kMaxConvWidth = 8;
void conv1d_silu_fwd(const bf16* in, int64_t ld_in, int64_t batch, int64_t seqlen, int64_t C,
                     const float* w, const float* bias, int K, bf16* out, cudaStream_t stream,
                     const int32_t* reset = nullptr);
size_t conv1d_silu_bwd_workspace_bytes(int64_t ntok, int64_t C, int K);
// din (row stride ld_din) is written on its C columns only; dw [C, K] and dbias [C] accumulate.
void conv1d_silu_bwd(const bf16* in, int64_t ld_in, int64_t batch, int64_t seqlen, int64_t C,
                     const float* w, const float* bias, int K, const bf16* dout, bf16* din,
                     int64_t ld_din, float* dw, float* dbias, void* ws, cudaStream_t stream,
                     const int32_t* reset = nullptr);

// gated_rmsnorm.cu: out = rmsnorm_groups(y * silu(z)) * weight; rstd [ntok, dim/group].
void gated_rmsnorm_fwd(const bf16* y, const bf16* z, int64_t ld_z, const float* weight,
                       int64_t ntok, int64_t dim, int64_t group, float eps, bf16* out,
                       float* rstd, cudaStream_t stream);
size_t gated_rmsnorm_bwd_workspace_bytes(int64_t ntok, int64_t dim);
void gated_rmsnorm_bwd(const bf16* dout, const bf16* y, const bf16* z, int64_t ld_z,
                       const float* weight, const float* rstd, int64_t ntok, int64_t dim,
                       int64_t group, bf16* dy, bf16* dz, int64_t ld_dz, float* dweight,
                       void* ws, cudaStream_t stream);
// The tensor-parallel form (backend.h NormSpan: each group's columns spread over ranks), in
// two phases around the caller's all-reduce of a [ntok, dim/group] f32 tensor, with the mean
// over n = group * ranks columns. Forward: sums = this rank's sums of g^2 per (row, group);
// then, given the reduced sums, out and rstd (the whole group's). Backward: dots = this rank's
// sums of dout*weight*g*rstd; then, given the reduced dots, dy, dz and dweight (+=, this
// rank's columns; ws: gated_rmsnorm_bwd_workspace_bytes). Scalar kernels, any alignment.
void gated_rmsnorm_fwd_sumsq(const bf16* y, const bf16* z, int64_t ld_z, int64_t ntok,
                             int64_t dim, int64_t group, float* sums, cudaStream_t stream);
void gated_rmsnorm_fwd_apply(const bf16* y, const bf16* z, int64_t ld_z, const float* weight,
                             int64_t ntok, int64_t dim, int64_t group, int64_t n, float eps,
                             const float* sums, bf16* out, float* rstd, cudaStream_t stream);
void gated_rmsnorm_bwd_dot(const bf16* dout, const bf16* y, const bf16* z, int64_t ld_z,
                           const float* weight, const float* rstd, int64_t ntok, int64_t dim,
                           int64_t group, float* dots, cudaStream_t stream);
void gated_rmsnorm_bwd_apply(const bf16* dout, const bf16* y, const bf16* z, int64_t ld_z,
                             const float* weight, const float* rstd, int64_t ntok, int64_t dim,
                             int64_t group, int64_t n, const float* dots, bf16* dy, bf16* dz,
                             int64_t ld_dz, float* dweight, void* ws, cudaStream_t stream);

// cross_entropy.cu: softmax cross-entropy over one block of fp32 logits [rows, vocab].
// stats (f64 [3]) += {sum loss, counted rows, argmax hits}, deterministically: per-row values
// in ws (ce_block_workspace_bytes(rows)), then one fixed-order sum; targets outside
// [0, vocab) (-1) are not counted. If write_grad, row r's dlogits = grad_scale * (softmax -
// onehot) (zero for ignored rows) is written in bf16 IN PLACE over the row's own fp32 logits:
// as a bf16 matrix [rows, vocab] with row stride 2 * vocab elements.
size_t ce_block_workspace_bytes(int64_t rows);
void ce_block(float* logits, int64_t rows, int64_t vocab, const int32_t* targets,
              float grad_scale, double* stats, bool write_grad, void* ws, cudaStream_t stream);
// The vocabulary-parallel form, around the caller's all-gather: the logits block holds this
// rank's columns, vocabulary rows [row0, row0 + vocab) of `total`; targets are global (outside
// [0, total): not counted). ce_shard_partial writes part [rows, 4] f32 = {row max, sum of
// exp(logit - max), the target's logit where this rank holds it else 0, global index of the
// first max} ({0, 0, 0, -1} for rows not counted). ce_shard_finish takes every rank's parts
// (all [ranks, rows, 4]) and does what ce_block does: stats += the full {loss, counted, hits}
// (the global argmax: the first maximum in vocabulary order), and if write_grad this rank's
// columns of dlogits in bf16 in place. ws: ce_shard_workspace_bytes(rows). total <= 2^24 (the
// indices travel as f32).
void ce_shard_partial(const float* logits, int64_t rows, int64_t vocab, int64_t row0,
                      int64_t total, const int32_t* targets, float* part, cudaStream_t stream);
size_t ce_shard_workspace_bytes(int64_t rows);
void ce_shard_finish(float* logits, int64_t rows, int64_t vocab, int64_t row0, int64_t total,
                     const int32_t* targets, const float* all, int ranks, float grad_scale,
                     double* stats, bool write_grad, void* ws, cudaStream_t stream);

// adamw.cu: multi-tensor kernels. Each launch walks a device table of tensors; work is split
// into tiles of kTile elements and tile0 is the tensor's first tile index (prefix sum).
constexpr int64_t kTile = 4096;

struct SqTensor {
  const void* p = nullptr;
  int64_t n = 0;
  int64_t tile0 = 0;
  int32_t dtype = 0;  // static_cast<int32_t>(DType): F32, F64 or BF16
  int32_t pad = 0;
};
constexpr int kSumSquaresBlocks = 1024;  // fixed grid: the result is deterministic
size_t sum_squares_workspace_bytes();
// *out (device f64) = sum over the table of sum(x^2); fp32 within a tile, f64 above.
void sum_squares(const SqTensor* table, int ntensors, int64_t ntiles, double* out, void* ws,
                 cudaStream_t stream);

struct AdamWTensor {
  float* p = nullptr;
  const float* g = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  int64_t n = 0;
  int64_t tile0 = 0;
  float weight_decay = 0;
  int32_t pad = 0;
};
struct AdamWScalars {
  float lr, beta1, beta2, eps, grad_scale;
  float step_size;     // lr / (1 - beta1^step)
  float inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^step)
};
// torch.optim.AdamW: g *= grad_scale; p *= 1 - lr*wd; m, v updated; p -= step_size * m /
// (sqrt(v) * inv_sqrt_bc2 + eps).
void adamw(const AdamWTensor* table, int ntensors, int64_t ntiles, const AdamWScalars& s,
           cudaStream_t stream);

}  // namespace ssd::cuda
