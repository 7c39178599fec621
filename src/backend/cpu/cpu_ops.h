// The CPU reference kernels, on raw pointers, templated on the scalar type (float for training,
// double for gradient checks). cpu_backend.cpp checks shapes and dtypes and calls these.
// Each op lives in its own .cpp and is explicitly instantiated for float and double.
// Same conventions as backend.h: parameter gradients (dw, dbias, ...) accumulate, the rest is
// overwritten. `ld*` arguments are row strides in elements.
#pragma once
#include <cstdint>

#include "backend/backend.h"

namespace ssd::cpu {

// embedding.cpp: tokens checked against [0, vocab); weight / dweight hold rows [row0, row0 +
// rows) (all of them: row0 = 0, rows = vocab); other tokens give zero rows and no gradient.
template <class T>
void embedding_fwd(const int32_t* tokens, int64_t ntok, const T* weight, int64_t vocab,
                   int64_t row0, int64_t rows, int64_t dim, T* out);
template <class T>
void embedding_bwd(const int32_t* tokens, int64_t ntok, const T* dout, int64_t vocab,
                   int64_t row0, int64_t rows, int64_t dim, T* dweight);
// The whole vocabulary.
template <class T>
void embedding_fwd(const int32_t* tokens, int64_t ntok, const T* weight, int64_t vocab,
                   int64_t dim, T* out) {
  embedding_fwd(tokens, ntok, weight, vocab, 0, vocab, dim, out);
}
template <class T>
void embedding_bwd(const int32_t* tokens, int64_t ntok, const T* dout, int64_t vocab,
                   int64_t dim, T* dweight) {
  embedding_bwd(tokens, ntok, dout, vocab, 0, vocab, dim, dweight);
}

// rmsnorm.cpp
template <class T>
void add_rmsnorm_fwd(const T* x, const T* residual_in, const T* weight, int64_t ntok,
                     int64_t dim, double eps, T* residual_out, T* y, T* rstd);
template <class T>
void add_rmsnorm_bwd(const T* dy, const T* dresidual_next, const T* residual_out,
                     const T* weight, const T* rstd, int64_t ntok, int64_t dim, T* d_residual,
                     T* dweight);

// linear.cpp (BLAS)
template <class T>
void linear_fwd(const T* x, const T* w, int64_t M, int64_t N, int64_t K, T* y);
template <class T>
void linear_bwd(const T* x, const T* w, const T* dy, int64_t M, int64_t N, int64_t K, T* dx,
                T* dw);

// conv1d.cpp: in[b*L + t, c] at in[(b*L+t)*ld_in + c]; w [C, K]; causal (left zero padding).
// reset (may be null): [batch*seqlen], nonzero where a token begins a document; a tap never
// reads across such a boundary (backend.h).
template <class T>
void conv1d_silu_fwd(const T* in, int64_t ld_in, int64_t batch, int64_t seqlen, int64_t C,
                     const T* w, const T* bias, int64_t K, T* out,
                     const int32_t* reset = nullptr);
template <class T>
void conv1d_silu_bwd(const T* in, int64_t ld_in, int64_t batch, int64_t seqlen, int64_t C,
                     const T* w, const T* bias, int64_t K, const T* dout, T* din,
                     int64_t ld_din, T* dw, T* dbias, const int32_t* reset = nullptr);

// ssd.cpp: the chunked (dual) algorithm. xBC [tokens, conv_dim]; dt at dt[tok*ld_dt + h].
// States [batch, nheads, headdim, dstate]; initial_state / final_state may be null.
// reset (may be null): [tokens], nonzero where a token begins a document: the state entering
// it is dropped (SsdInputs::reset).
template <class T>
void ssd_fwd(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt, const T* dt_bias,
             const T* A_log, const T* D, const T* initial_state, T* y, T* final_state,
             const int32_t* reset = nullptr);
// dxBC [tokens, conv_dim] and ddt (at ddt[tok*ld_ddt + h]) overwritten; d_dt_bias, dA_log, dD
// accumulate; d_initial_state overwritten when non-null; dfinal_state may be null.
template <class T>
void ssd_bwd(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt, const T* dt_bias,
             const T* A_log, const T* D, const T* initial_state, const T* dy,
             const T* dfinal_state, T* dxBC, T* ddt, int64_t ld_ddt, T* d_dt_bias, T* dA_log,
             T* dD, T* d_initial_state, const int32_t* reset = nullptr);
// Context parallelism's all-gather combine (Backend::ssd_final_state and the ops after it):
// ssd_fwd's final_state without y; ssd_bwd's d_initial_state without the other gradients;
// decay [batch, nheads], the share of an entering state that reaches the sequence's end;
// cp_state_scan over n summaries of rows BH*PN + BH (Backend::cp_state_scan).
template <class T>
void ssd_final_state(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt,
                     const T* dt_bias, const T* A_log, const T* initial_state, T* final_state,
                     const int32_t* reset = nullptr);
template <class T>
void ssd_dinitial(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt, const T* dt_bias,
                  const T* A_log, const T* dy, const T* dfinal_state, T* d_initial_state,
                  const int32_t* reset = nullptr);
template <class T>
void ssd_segment_decay(const SsdDims& d, const T* dt, int64_t ld_dt, const T* dt_bias,
                       const T* A_log, T* decay, const int32_t* reset = nullptr);
template <class T>
void cp_state_scan(int64_t n, int64_t BH, int64_t PN, const T* summaries, int64_t k,
                   bool reverse, T* out);
// ssd_naive.cpp: the sequential recurrence, token by token (the specification tests use).
template <class T>
void ssd_naive_fwd(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt,
                   const T* dt_bias, const T* A_log, const T* D, const T* initial_state, T* y,
                   T* final_state, const int32_t* reset = nullptr);

// gated_rmsnorm.cpp: out = rmsnorm_groups(y * silu(z)) * weight; z at z[tok*ld_z + c].
template <class T>
void gated_rmsnorm_fwd(const T* y, const T* z, int64_t ld_z, const T* weight, int64_t ntok,
                       int64_t dim, int64_t group_size, double eps, T* out, T* rstd);
template <class T>
void gated_rmsnorm_bwd(const T* dout, const T* y, const T* z, int64_t ld_z, const T* weight,
                       const T* rstd, int64_t ntok, int64_t dim, int64_t group_size, T* dy,
                       T* dz, int64_t ld_dz, T* dweight);
// The same with each group spanning span.ranks ranks (span.all_reduce called once in each).
template <class T>
void gated_rmsnorm_fwd_span(const T* y, const T* z, int64_t ld_z, const T* weight, int64_t ntok,
                            int64_t dim, int64_t group_size, double eps, T* out, T* rstd,
                            const NormSpan& span);
template <class T>
void gated_rmsnorm_bwd_span(const T* dout, const T* y, const T* z, int64_t ld_z, const T* weight,
                            const T* rstd, int64_t ntok, int64_t dim, int64_t group_size, T* dy,
                            T* dz, int64_t ld_dz, T* dweight, const NormSpan& span);

// cross_entropy.cpp: tied LM head + cross-entropy, logits computed a block of rows at a time.
// stats[0..2] += {sum loss, counted tokens, argmax hits}; dhidden/dweight may be null (eval).
template <class T>
void lm_head_ce(const T* hidden, const T* weight, const int32_t* targets, int64_t ntok,
                int64_t dim, int64_t vocab, double grad_scale, double* stats, T* dhidden,
                T* dweight);
// Vocabulary-parallel: weight is rows [shard.begin, shard.begin + vocab) of shard.total; stats
// are the full ones, dhidden this rank's part, dweight its rows (backend.h).
template <class T>
void lm_head_ce_shard(const T* hidden, const T* weight, const int32_t* targets, int64_t ntok,
                      int64_t dim, int64_t vocab, const VocabShard& shard, double grad_scale,
                      double* stats, T* dhidden, T* dweight);

// adamw.cpp
template <class T>
double sum_squares(const T* x, int64_t n);
template <class T>
void adamw_step(T* p, const T* g, T* m, T* v, int64_t n, double weight_decay,
                const AdamWHyper& h);

}  // namespace ssd::cpu
