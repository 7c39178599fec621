// Inputs shared by the tensor-parallel op tests (tests/backend/test_tp_ops.cpp on the CPU,
// tests/cuda/test_cuda_tp_ops.cpp on the GPU).
#pragma once
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "testutil.h"

namespace ssdtest {

// Multiples of 1/8 near N(0, scale^2): exact in f32 and bf16 for |x| < 32.
inline std::vector<double> eighths(size_t n, uint64_t seed, double scale) {
  std::vector<double> v = randn<double>(n, seed, scale);
  for (auto& x : v) x = std::round(x * 8) / 8;
  return v;
}

// An LM head problem whose logits are exact in f32 whatever the GEMM's order (hidden and
// weights are multiples of 1/8, Dm = 16), so ties are real ties. 200 tokens: blocks of 64 rows
// with a partial last one; every 7th target ignored and rows 64..127 (one whole CPU block) too.
// The `ties` pairs of weight rows are equal and longer than the others, and the hidden state
// of every third token is one of them: their logits tie for the maximum, across ranks or within
// one. Such a token's target is the first row of its pair (a hit) or the second (a miss: the
// first maximum wins).
struct CeProblem {
  int64_t T = 200, Dm = 16, V = 0;
  std::vector<double> h, w, dw0;
  std::vector<int32_t> tg;
};
inline CeProblem make_ce(int64_t V, const std::vector<std::pair<int, int>>& ties) {
  CeProblem p;
  p.V = V;
  const int64_t T = p.T, Dm = p.Dm;
  const int64_t nt = static_cast<int64_t>(ties.size());
  p.w = eighths(V * Dm, 50, 0.5);
  std::vector<double> signs = randn<double>(nt * Dm, 51);
  for (int64_t k = 0; k < nt; ++k)
    for (int64_t c = 0; c < Dm; ++c) {
      const double s = signs[k * Dm + c] >= 0 ? 1.0 : -1.0;
      p.w[ties[k].first * Dm + c] = p.w[ties[k].second * Dm + c] = s;
    }
  p.h = eighths(T * Dm, 52, 0.5);
  p.tg.resize(T);
  for (int64_t t = 0; t < T; ++t) p.tg[t] = static_cast<int32_t>((t * 389 + 11) % V);
  for (int64_t t = 0; t < T; t += 3) {
    const auto [a, b] = ties[(t / 3) % nt];
    for (int64_t c = 0; c < Dm; ++c) p.h[t * Dm + c] = p.w[a * Dm + c];
    p.tg[t] = (t / 9) % 2 ? a : b;
  }
  for (int64_t t = 0; t < T; t += 7) p.tg[t] = -1;
  for (int64_t t = 64; t < 128; ++t) p.tg[t] = -1;
  p.dw0 = randn<double>(V * Dm, 53);
  return p;
}

// Direct: full logits in double; {loss sum, argmax hits (first maximum)}.
inline std::pair<double, double> direct_ce(const CeProblem& p) {
  double loss = 0, hits = 0;
  for (int64_t t = 0; t < p.T; ++t) {
    if (p.tg[t] < 0) continue;
    std::vector<double> l(p.V);
    for (int64_t v = 0; v < p.V; ++v) {
      double s = 0;
      for (int64_t c = 0; c < p.Dm; ++c) s += p.h[t * p.Dm + c] * p.w[v * p.Dm + c];
      l[v] = s;
    }
    int64_t am = 0;
    for (int64_t v = 1; v < p.V; ++v)
      if (l[v] > l[am]) am = v;
    double se = 0;
    for (double x : l) se += std::exp(x - l[am]);
    loss += l[am] + std::log(se) - l[p.tg[t]];
    hits += am == p.tg[t];
  }
  return {loss, hits};
}

}  // namespace ssdtest
