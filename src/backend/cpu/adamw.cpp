// Gradient-norm reduction and the AdamW update (torch.optim.AdamW semantics).
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace ssd::cpu {

// Fixed-size blocks, each summed in order in double; block sums then added in order. The result
// depends only on the data, not on the thread count.
template <class T>
double sum_squares(const T* x, int64_t n) {
  if (n <= 0) return 0.0;
  constexpr int64_t BS = 8192;
  const int64_t nblk = (n + BS - 1) / BS;
  std::vector<double> part(static_cast<size_t>(nblk));
#pragma omp parallel for schedule(static) if (nblk > 4)
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t i0 = b * BS, i1 = std::min(n, i0 + BS);
    double s = 0;
    for (int64_t i = i0; i < i1; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    part[b] = s;
  }
  double total = 0;
  for (double s : part) total += s;
  return total;
}

// Per element, in torch.optim.AdamW's order (single-tensor path):
//   g  = grad * grad_scale
//   p  = p * (1 - lr * wd)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g^2
//   p -= (lr / (1 - beta1^step)) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
template <class T>
void adamw_step(T* p, const T* g, T* m, T* v, int64_t n, double weight_decay,
                const AdamWHyper& h) {
  SSD_CHECK(h.step >= 1, "AdamW step must be >= 1, got ", h.step);
  const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(h.step)));
  const double step_size = h.lr / bc1;
  const double decay = 1.0 - h.lr * weight_decay;
  const double b1 = h.beta1, b2 = h.beta2, eps = h.eps, gs = h.grad_scale;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const double gi = static_cast<double>(g[i]) * gs;
    double pi = static_cast<double>(p[i]) * decay;
    const double mi = b1 * static_cast<double>(m[i]) + (1.0 - b1) * gi;
    const double vi = b2 * static_cast<double>(v[i]) + (1.0 - b2) * gi * gi;
    const double denom = std::sqrt(vi) / bc2_sqrt + eps;
    pi -= step_size * (mi / denom);
    m[i] = static_cast<T>(mi);
    v[i] = static_cast<T>(vi);
    p[i] = static_cast<T>(pi);
  }
}

template double sum_squares<float>(const float*, int64_t);
template double sum_squares<double>(const double*, int64_t);
template void adamw_step<float>(float*, const float*, float*, float*, int64_t, double,
                                const AdamWHyper&);
template void adamw_step<double>(double*, const double*, double*, double*, int64_t, double,
                                 const AdamWHyper&);

}  // namespace ssd::cpu
