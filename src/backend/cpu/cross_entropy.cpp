// Tied LM head + softmax cross-entropy. Logits are produced ROWS_PER_BLOCK tokens at a time into
// a [ROWS_PER_BLOCK, vocab] buffer; the full [ntok, vocab] logits never exist.
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
      int64_t amax = 0;
      T mx = l[0];
      for (int64_t v = 1; v < vocab; ++v)
        if (l[v] > mx) {  // strict: the first maximum wins
          mx = l[v];
          amax = v;
        }
      const double mxd = static_cast<double>(mx);
      double se = 0;
      for (int64_t v = 0; v < vocab; ++v) se += std::exp(static_cast<double>(l[v]) - mxd);
      const double lse = mxd + std::log(se);
      row_loss[r] = lse - static_cast<double>(l[tgt]);
      row_hit[r] = amax == tgt;
      if (grad) {
        for (int64_t v = 0; v < vocab; ++v)
          l[v] = static_cast<T>(grad_scale * std::exp(static_cast<double>(l[v]) - lse));
        l[tgt] = static_cast<T>(static_cast<double>(l[tgt]) - grad_scale);
      }
    }
    // Deterministic: rows summed in order.
    for (int64_t r = 0; r < rb; ++r) {
      stats[0] += row_loss[r];
      stats[2] += row_hit[r];
    }
    stats[1] += static_cast<double>(counted);

    if (grad) {
      // dhidden[rows] = dlogits @ weight;  dweight += dlogits^T @ hidden[rows]
      gemm(false, false, rb, dim, vocab, T(1), buf.data(), vocab, weight, dim, T(0),
           dhidden + r0 * dim, dim);
      if (dweight)
        gemm(true, false, vocab, dim, rb, T(1), buf.data(), vocab, hb, dim, T(1), dweight, dim);
    }
  }
}

template void lm_head_ce<float>(const float*, const float*, const int32_t*, int64_t, int64_t,
                                int64_t, double, double*, float*, float*);
template void lm_head_ce<double>(const double*, const double*, const int32_t*, int64_t, int64_t,
                                 int64_t, double, double*, double*, double*);

}  // namespace ssd::cpu
