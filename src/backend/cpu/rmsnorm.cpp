// Fused residual add + RMSNorm (the pre-norm of every Mamba-2 block and the final norm).
#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_ops.h"

namespace ssd::cpu {

template <class T>
void add_rmsnorm_fwd(const T* x, const T* residual_in, const T* weight, int64_t ntok,
                     int64_t dim, double eps, T* residual_out, T* y, T* rstd) {
#pragma omp parallel for schedule(static) if (ntok * dim > 16384)
  for (int64_t t = 0; t < ntok; ++t) {
    const T* xr = x + t * dim;
    const T* rr = residual_in ? residual_in + t * dim : nullptr;
    T* ro = residual_out + t * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) {
      const T r = rr ? static_cast<T>(xr[i] + rr[i]) : xr[i];
      ro[i] = r;
      ss += static_cast<double>(r) * static_cast<double>(r);
    }
    const double s = 1.0 / std::sqrt(ss / static_cast<double>(dim) + eps);
    rstd[t] = static_cast<T>(s);
    T* yr = y + t * dim;
    for (int64_t i = 0; i < dim; ++i)
      yr[i] = static_cast<T>(static_cast<double>(ro[i]) * s * static_cast<double>(weight[i]));
  }
}

// With s = rstd and g = dy * weight:
//   dL/dr_j = s * g_j - s^3 * r_j / dim * sum_i g_i r_i
template <class T>
void add_rmsnorm_bwd(const T* dy, const T* dresidual_next, const T* residual_out,
                     const T* weight, const T* rstd, int64_t ntok, int64_t dim, T* d_residual,
                     T* dweight) {
  const double inv_dim = 1.0 / static_cast<double>(dim);
#pragma omp parallel for schedule(static) if (ntok * dim > 16384)
  for (int64_t t = 0; t < ntok; ++t) {
    const T* dyr = dy + t * dim;
    const T* r = residual_out + t * dim;
    const double s = static_cast<double>(rstd[t]);
    double dot = 0;
    for (int64_t i = 0; i < dim; ++i)
      dot += static_cast<double>(dyr[i]) * static_cast<double>(weight[i]) *
             static_cast<double>(r[i]);
    const double c = s * s * s * inv_dim * dot;
    T* dr = d_residual + t * dim;
    const T* dn = dresidual_next ? dresidual_next + t * dim : nullptr;
    for (int64_t i = 0; i < dim; ++i) {
      double v = s * static_cast<double>(dyr[i]) * static_cast<double>(weight[i]) -
                 c * static_cast<double>(r[i]);
      if (dn) v += static_cast<double>(dn[i]);
      dr[i] = static_cast<T>(v);
    }
  }
  // dweight_i += sum_t dy[t,i] * r[t,i] * rstd[t]: column blocks per thread, tokens in order
  // (deterministic whatever the thread count).
  constexpr int64_t CB = 64;
  const int64_t nblk = (dim + CB - 1) / CB;
#pragma omp parallel for schedule(static) if (ntok * dim > 16384 && nblk > 1)
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t c0 = b * CB, c1 = std::min(dim, c0 + CB);
    double acc[CB] = {};
    for (int64_t t = 0; t < ntok; ++t) {
      const T* dyr = dy + t * dim;
      const T* r = residual_out + t * dim;
      const double s = static_cast<double>(rstd[t]);
      for (int64_t c = c0; c < c1; ++c)
        acc[c - c0] += static_cast<double>(dyr[c]) * static_cast<double>(r[c]) * s;
    }
    for (int64_t c = c0; c < c1; ++c)
      dweight[c] = static_cast<T>(static_cast<double>(dweight[c]) + acc[c - c0]);
  }
}

template void add_rmsnorm_fwd<float>(const float*, const float*, const float*, int64_t, int64_t,
                                     double, float*, float*, float*);
template void add_rmsnorm_fwd<double>(const double*, const double*, const double*, int64_t,
                                      int64_t, double, double*, double*, double*);
template void add_rmsnorm_bwd<float>(const float*, const float*, const float*, const float*,
                                     const float*, int64_t, int64_t, float*, float*);
template void add_rmsnorm_bwd<double>(const double*, const double*, const double*,
                                      const double*, const double*, int64_t, int64_t, double*,
                                      double*);

}  // namespace ssd::cpu
