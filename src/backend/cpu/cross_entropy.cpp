// Tied LM head + softmax cross-entropy. Logits are produced ROWS_PER_BLOCK tokens at a time into
// a [ROWS_PER_BLOCK, vocab] buffer; the full [ntok, vocab] logits never exist. The vocabulary-
// parallel form (lm_head_ce_shard) does the same over this rank's rows of the vocabulary and
// combines per-row partial statistics of all ranks, gathered once per block.
#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "backend/cpu/blas.h"
#include "backend/cpu/cpu_ops.h"

namespace ssd::cpu {

namespace {

constexpr int64_t ROWS_PER_BLOCK = 64;

// A row of logits: its first maximum (value and index) and sum of exp(logit - max).
template <class T>
double row_max_sumexp(const T* l, int64_t vocab, T& mx, int64_t& amax) {
  amax = 0;
  mx = l[0];
  for (int64_t v = 1; v < vocab; ++v)
    if (l[v] > mx) {  // strict: the first maximum wins
      mx = l[v];
      amax = v;
    }
  const double mxd = static_cast<double>(mx);
  double se = 0;
  for (int64_t v = 0; v < vocab; ++v) se += std::exp(static_cast<double>(l[v]) - mxd);
  return se;
}

// The row's logits become grad_scale * (softmax - onehot); j is the target's column, or
// outside [0, vocab) when another rank holds it.
template <class T>
void row_dlogits(T* l, int64_t vocab, double lse, double grad_scale, int64_t j) {
  for (int64_t v = 0; v < vocab; ++v)
    l[v] = static_cast<T>(grad_scale * std::exp(static_cast<double>(l[v]) - lse));
  if (j >= 0 && j < vocab) l[j] = static_cast<T>(static_cast<double>(l[j]) - grad_scale);
}

// dhidden[rows] = dlogits @ weight;  dweight += dlogits^T @ hidden[rows]
template <class T>
void block_backward(const T* dlogits, const T* weight, const T* hb, int64_t rb, int64_t dim,
                    int64_t vocab, T* dhidden_rows, T* dweight) {
  gemm(false, false, rb, dim, vocab, T(1), dlogits, vocab, weight, dim, T(0), dhidden_rows, dim);
  if (dweight)
    gemm(true, false, vocab, dim, rb, T(1), dlogits, vocab, hb, dim, T(1), dweight, dim);
}

}  // namespace

template <class T>
void lm_head_ce(const T* hidden, const T* weight, const int32_t* targets, int64_t ntok,
                int64_t dim, int64_t vocab, double grad_scale, double* stats, T* dhidden,
                T* dweight) {
  SSD_CHECK(dim > 0 && vocab > 0 && dim <= INT_MAX && vocab <= INT_MAX, "bad LM head size ",
            vocab, "x", dim);
  for (int64_t t = 0; t < ntok; ++t)
    SSD_CHECK(targets[t] >= -1 && targets[t] < vocab, "target ", targets[t], " at position ", t,
              " outside [-1, ", vocab, ")");
  const bool grad = dhidden != nullptr;
  const int64_t rb_max = std::min(ROWS_PER_BLOCK, ntok);
  std::vector<T> buf(static_cast<size_t>(rb_max * vocab));  // logits, then dlogits
  double row_loss[ROWS_PER_BLOCK];
  int row_hit[ROWS_PER_BLOCK];

  for (int64_t r0 = 0; r0 < ntok; r0 += ROWS_PER_BLOCK) {
    const int64_t rb = std::min(ROWS_PER_BLOCK, ntok - r0);
    int64_t counted = 0;
    for (int64_t r = 0; r < rb; ++r) counted += targets[r0 + r] >= 0;
    if (counted == 0) {  // nothing to score: zero gradient rows, no contribution
      if (grad) std::fill(dhidden + r0 * dim, dhidden + (r0 + rb) * dim, T(0));
      continue;
    }
    const T* hb = hidden + r0 * dim;
    gemm(false, true, rb, vocab, dim, T(1), hb, dim, weight, dim, T(0), buf.data(), vocab);

#pragma omp parallel for schedule(static) if (rb * vocab > 16384)
    for (int64_t r = 0; r < rb; ++r) {
      T* l = buf.data() + r * vocab;
      const int32_t tgt = targets[r0 + r];
      row_loss[r] = 0;
      row_hit[r] = 0;
      if (tgt < 0) {
        if (grad) std::fill(l, l + vocab, T(0));
        continue;
      }
      T mx;
      int64_t amax;
      const double se = row_max_sumexp(l, vocab, mx, amax);
      const double lse = static_cast<double>(mx) + std::log(se);
      row_loss[r] = lse - static_cast<double>(l[tgt]);
      row_hit[r] = amax == tgt;
      if (grad) row_dlogits(l, vocab, lse, grad_scale, tgt);
    }
    // Deterministic: rows summed in order.
    for (int64_t r = 0; r < rb; ++r) {
      stats[0] += row_loss[r];
      stats[2] += row_hit[r];
    }
    stats[1] += static_cast<double>(counted);

    if (grad) block_backward(buf.data(), weight, hb, rb, dim, vocab, dhidden + r0 * dim, dweight);
  }
}

// Per row of a block, rank by rank: part = {local max m, sum of exp(logit - m), the target's
// logit where this rank holds it else 0, global index of the first local max}. Rows with target
// -1 hold {0, 0, 0, -1} and are skipped when combining (the ranks share the targets). Then
// M = max_r m_r, lse = M + log(sum_r s_r exp(m_r - M)), loss = lse - the target logit (the sum
// of the ranks' third column: exact, all but the owner's are 0), and the global argmax is the
// largest m_r with the smallest index among equal ones: the first maximum in vocabulary order.
template <class T>
void lm_head_ce_shard(const T* hidden, const T* weight, const int32_t* targets, int64_t ntok,
                      int64_t dim, int64_t vocab, const VocabShard& shard, double grad_scale,
                      double* stats, T* dhidden, T* dweight) {
  const int64_t begin = shard.begin, total = shard.total, ranks = shard.ranks;
  SSD_CHECK(dim > 0 && vocab > 0 && dim <= INT_MAX && vocab <= INT_MAX, "bad LM head size ",
            vocab, "x", dim);
  SSD_CHECK(ranks >= 1 && begin >= 0 && begin + vocab <= total && total <= INT_MAX,
            "lm_head_ce: vocabulary shard [", begin, ", ", begin + vocab, ") of ", total,
            " over ", ranks, " ranks is not valid");
  // The argmax is stored as a T: exact up to 2^24 in f32.
  SSD_CHECK(sizeof(T) == 8 || total <= (int64_t(1) << 24), "lm_head_ce: vocabulary ", total,
            " too large for f32 partial statistics");
  SSD_CHECK(static_cast<bool>(shard.all_gather), "lm_head_ce: vocabulary shard without all_gather");
  for (int64_t t = 0; t < ntok; ++t)
    SSD_CHECK(targets[t] >= -1 && targets[t] < total, "target ", targets[t], " at position ", t,
              " outside [-1, ", total, ")");
  const bool grad = dhidden != nullptr;
  const int64_t rb_max = std::min(ROWS_PER_BLOCK, ntok);
  std::vector<T> buf(static_cast<size_t>(rb_max * vocab));  // logits, then dlogits
  std::vector<T> part(static_cast<size_t>(rb_max * 4)), all(static_cast<size_t>(ranks * rb_max * 4));
  const DType dt = dtype_of<T>::value;
  double row_loss[ROWS_PER_BLOCK], row_lse[ROWS_PER_BLOCK];
  int row_hit[ROWS_PER_BLOCK];

  for (int64_t r0 = 0; r0 < ntok; r0 += ROWS_PER_BLOCK) {
    const int64_t rb = std::min(ROWS_PER_BLOCK, ntok - r0);
    int64_t counted = 0;
    for (int64_t r = 0; r < rb; ++r) counted += targets[r0 + r] >= 0;
    if (counted == 0) {  // the same blocks on every rank: the targets are shared
      if (grad) std::fill(dhidden + r0 * dim, dhidden + (r0 + rb) * dim, T(0));
      continue;
    }
    const T* hb = hidden + r0 * dim;
    gemm(false, true, rb, vocab, dim, T(1), hb, dim, weight, dim, T(0), buf.data(), vocab);

#pragma omp parallel for schedule(static) if (rb * vocab > 16384)
    for (int64_t r = 0; r < rb; ++r) {
      const T* l = buf.data() + r * vocab;
      const int32_t tgt = targets[r0 + r];
      T* pr = part.data() + 4 * r;
      if (tgt < 0) {
        pr[0] = pr[1] = pr[2] = T(0);
        pr[3] = T(-1);
        continue;
      }
      T mx;
      int64_t amax;
      const double se = row_max_sumexp(l, vocab, mx, amax);
      const int64_t j = tgt - begin;
      pr[0] = mx;
      pr[1] = static_cast<T>(se);
      pr[2] = j >= 0 && j < vocab ? l[j] : T(0);
      pr[3] = static_cast<T>(begin + amax);
    }

    Tensor local = borrow(part.data(), dt, {rb, 4});
    Tensor gathered = borrow(all.data(), dt, {ranks, rb, 4});
    shard.all_gather(local, gathered);

    for (int64_t r = 0; r < rb; ++r) {
      const int32_t tgt = targets[r0 + r];
      row_loss[r] = 0;
      row_hit[r] = 0;
      row_lse[r] = 0;
      if (tgt < 0) continue;
      double M = -INFINITY;
      int64_t best = -1;
      for (int64_t k = 0; k < ranks; ++k) {
        const T* a = all.data() + (k * rb + r) * 4;
        const double m = static_cast<double>(a[0]);
        const int64_t idx = static_cast<int64_t>(a[3]);
        if (m > M || (m == M && idx < best)) {
          M = m;
          best = idx;
        }
      }
      double S = 0, tl = 0;
      for (int64_t k = 0; k < ranks; ++k) {
        const T* a = all.data() + (k * rb + r) * 4;
        S += static_cast<double>(a[1]) * std::exp(static_cast<double>(a[0]) - M);
        tl += static_cast<double>(a[2]);
      }
      row_lse[r] = M + std::log(S);
      row_loss[r] = row_lse[r] - tl;
      row_hit[r] = best == tgt;
    }
    for (int64_t r = 0; r < rb; ++r) {
      stats[0] += row_loss[r];
      stats[2] += row_hit[r];
    }
    stats[1] += static_cast<double>(counted);
    if (!grad) continue;

#pragma omp parallel for schedule(static) if (rb * vocab > 16384)
    for (int64_t r = 0; r < rb; ++r) {
      T* l = buf.data() + r * vocab;
      const int32_t tgt = targets[r0 + r];
      if (tgt < 0) {
        std::fill(l, l + vocab, T(0));
        continue;
      }
      row_dlogits(l, vocab, row_lse[r], grad_scale, tgt - begin);
    }
    // This rank's part of dhidden (its columns of the logits); its rows of dweight, complete.
    block_backward(buf.data(), weight, hb, rb, dim, vocab, dhidden + r0 * dim, dweight);
  }
}

template void lm_head_ce_shard<float>(const float*, const float*, const int32_t*, int64_t,
                                      int64_t, int64_t, const VocabShard&, double, double*,
                                      float*, float*);
template void lm_head_ce_shard<double>(const double*, const double*, const int32_t*, int64_t,
                                       int64_t, int64_t, const VocabShard&, double, double*,
                                       double*, double*);
template void lm_head_ce<float>(const float*, const float*, const int32_t*, int64_t, int64_t,
                                int64_t, double, double*, float*, float*);
template void lm_head_ce<double>(const double*, const double*, const int32_t*, int64_t, int64_t,
                                 int64_t, double, double*, double*, double*);

}  // namespace ssd::cpu
