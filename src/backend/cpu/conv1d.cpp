// Causal depthwise Conv1d over time + SiLU (Mamba-2's short conv on xBC).
//   pre[t, c] = bias[c] + sum_{k<K} w[c, k] * in[t - (K-1) + k, c]   (zero for negative time)
//   out = silu(pre)
// Each of the `batch` sequences is convolved on its own; row of token t of sequence b is
// b*seqlen + t. With reset flags, each document is too: a tap reads zero instead of an input
// from before the document of token t began.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace ssd::cpu {

namespace {

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// visible[row]: how many of the tokens before `row` its taps may read, min(K-1, tokens since
// its document began). Without reset flags (empty) that is min(K-1, t).
std::vector<int32_t> visible_rows(const int32_t* reset, int64_t batch, int64_t seqlen,
                                  int64_t K) {
  std::vector<int32_t> v;
  if (!reset) return v;
  v.resize(static_cast<size_t>(batch * seqlen));
  for (int64_t row = 0; row < batch * seqlen; ++row) {
    const bool start = row % seqlen == 0 || reset[row];
    v[row] = start ? 0 : static_cast<int32_t>(std::min<int64_t>(K - 1, v[row - 1] + 1));
  }
  return v;
}
inline int64_t visible(const std::vector<int32_t>& v, int64_t row, int64_t t, int64_t K) {
  return v.empty() ? std::min<int64_t>(K - 1, t) : v[row];
}

template <class T>
inline double conv_pre(const T* in, int64_t ld_in, int64_t row0, int64_t t, int64_t c,
                       const T* wc, const T* bias, int64_t K, int64_t vis) {
  double acc = static_cast<double>(bias[c]);
  const int64_t k0 = K - 1 - vis;  // first tap inside the sequence (and document)
  for (int64_t k = k0; k < K; ++k)
    acc += static_cast<double>(wc[k]) *
           static_cast<double>(in[(row0 + t - (K - 1) + k) * ld_in + c]);
  return acc;
}

}  // namespace

template <class T>
void conv1d_silu_fwd(const T* in, int64_t ld_in, int64_t batch, int64_t seqlen, int64_t C,
                     const T* w, const T* bias, int64_t K, T* out, const int32_t* reset) {
  const int64_t ntok = batch * seqlen;
  const std::vector<int32_t> vis = visible_rows(reset, batch, seqlen, K);
#pragma omp parallel for schedule(static) if (ntok * C * K > 32768)
  for (int64_t row = 0; row < ntok; ++row) {
    const int64_t b = row / seqlen, t = row - b * seqlen, row0 = b * seqlen;
    T* o = out + row * C;
    const int64_t v = visible(vis, row, t, K);
    for (int64_t c = 0; c < C; ++c) {
      const double p = conv_pre(in, ld_in, row0, t, c, w + c * K, bias, K, v);
      o[c] = static_cast<T>(p * sigmoid(p));
    }
  }
}

template <class T>
void conv1d_silu_bwd(const T* in, int64_t ld_in, int64_t batch, int64_t seqlen, int64_t C,
                     const T* w, const T* bias, int64_t K, const T* dout, T* din,
                     int64_t ld_din, T* dw, T* dbias, const int32_t* reset) {
  const int64_t ntok = batch * seqlen;
  const bool par = ntok * C * K > 32768;
  const std::vector<int32_t> vis = visible_rows(reset, batch, seqlen, K);
  // dpre = dout * silu'(pre), silu'(p) = s * (1 + p * (1 - s)), pre recomputed.
  std::vector<T> dpre(static_cast<size_t>(ntok * C));
#pragma omp parallel for schedule(static) if (par)
  for (int64_t row = 0; row < ntok; ++row) {
    const int64_t b = row / seqlen, t = row - b * seqlen, row0 = b * seqlen;
    const int64_t v = visible(vis, row, t, K);
    for (int64_t c = 0; c < C; ++c) {
      const double p = conv_pre(in, ld_in, row0, t, c, w + c * K, bias, K, v);
      const double s = sigmoid(p);
      dpre[row * C + c] =
          static_cast<T>(static_cast<double>(dout[row * C + c]) * s * (1.0 + p * (1.0 - s)));
    }
  }
  // din[t, c] = sum_k w[c, k] * dpre[t + (K-1) - k, c] over taps that stay inside the sequence
  // (and over those whose output token u = t + (K-1) - k sees t: visible[u] >= u - t).
#pragma omp parallel for schedule(static) if (par)
  for (int64_t row = 0; row < ntok; ++row) {
    const int64_t b = row / seqlen, t = row - b * seqlen, row0 = b * seqlen;
    const int64_t k0 = std::max<int64_t>(0, t + K - seqlen);  // taps with t+(K-1)-k < seqlen
    if (!vis.empty()) {
      for (int64_t c = 0; c < C; ++c) {
        const T* wc = w + c * K;
        double acc = 0;
        for (int64_t k = k0; k < K; ++k)
          if (vis[row + (K - 1) - k] >= K - 1 - k)
            acc += static_cast<double>(wc[k]) *
                   static_cast<double>(dpre[(row0 + t + (K - 1) - k) * C + c]);
        din[row * ld_din + c] = static_cast<T>(acc);
      }
      continue;
    }
    for (int64_t c = 0; c < C; ++c) {
      const T* wc = w + c * K;
      double acc = 0;
      for (int64_t k = k0; k < K; ++k)
        acc += static_cast<double>(wc[k]) *
               static_cast<double>(dpre[(row0 + t + (K - 1) - k) * C + c]);
      din[row * ld_din + c] = static_cast<T>(acc);
    }
  }
  // dw[c, k] += sum dpre[t, c] * in[t-(K-1)+k, c]; dbias[c] += sum dpre[t, c].
  // Column blocks per thread, tokens in order: deterministic whatever the thread count.
  constexpr int64_t CB = 32;
  const int64_t nblk = (C + CB - 1) / CB;
#pragma omp parallel for schedule(static) if (par && nblk > 1)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t c0 = blk * CB, c1 = std::min(C, c0 + CB), nc = c1 - c0;
    std::vector<double> accw(static_cast<size_t>(nc * K), 0.0), accb(static_cast<size_t>(nc), 0.0);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t row0 = b * seqlen;
      for (int64_t t = 0; t < seqlen; ++t) {
        const int64_t k0 = K - 1 - visible(vis, row0 + t, t, K);
        const T* dp = dpre.data() + (row0 + t) * C;
        for (int64_t c = c0; c < c1; ++c) {
          const double g = static_cast<double>(dp[c]);
          accb[c - c0] += g;
          double* aw = accw.data() + (c - c0) * K;
          for (int64_t k = k0; k < K; ++k)
            aw[k] += g * static_cast<double>(in[(row0 + t - (K - 1) + k) * ld_in + c]);
        }
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      dbias[c] = static_cast<T>(static_cast<double>(dbias[c]) + accb[c - c0]);
      for (int64_t k = 0; k < K; ++k)
        dw[c * K + k] =
            static_cast<T>(static_cast<double>(dw[c * K + k]) + accw[(c - c0) * K + k]);
    }
  }
}

template void conv1d_silu_fwd<float>(const float*, int64_t, int64_t, int64_t, int64_t,
                                     const float*, const float*, int64_t, float*,
                                     const int32_t*);
template void conv1d_silu_fwd<double>(const double*, int64_t, int64_t, int64_t, int64_t,
                                      const double*, const double*, int64_t, double*,
                                      const int32_t*);
template void conv1d_silu_bwd<float>(const float*, int64_t, int64_t, int64_t, int64_t,
                                     const float*, const float*, int64_t, const float*, float*,
                                     int64_t, float*, float*, const int32_t*);
template void conv1d_silu_bwd<double>(const double*, int64_t, int64_t, int64_t, int64_t,
                                      const double*, const double*, int64_t, const double*,
                                      double*, int64_t, double*, double*, const int32_t*);

}  // namespace ssd::cpu
