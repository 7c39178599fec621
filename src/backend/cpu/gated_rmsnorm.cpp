// Gated, grouped RMSNorm (Mamba-2's norm before out_proj):
//   g = y * silu(z);  out = g * rstd_group * weight,  rstd_group = 1/sqrt(mean_group(g^2) + eps)
// over groups of group_size consecutive columns. With a NormSpan (tensor parallelism), each
// group's other columns live on span.ranks - 1 other ranks: the per-group sums (of g^2 forward,
// of dout*weight*g backward) are all-reduced between a partial pass and an apply pass, and the
// mean is over group_size * span.ranks columns.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace ssd::cpu {

namespace {
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// dweight_c += sum_t dout[t,c] * g[t,c] * rstd[t, c/group_size]: column blocks, tokens in
// order (deterministic whatever the thread count).
template <class T>
void dweight_accumulate(const T* dout, const T* y, const T* z, int64_t ld_z, const T* rstd,
                        int64_t ntok, int64_t dim, int64_t group_size, bool par, T* dweight) {
  const int64_t ng = dim / group_size;
  constexpr int64_t CB = 64;
  const int64_t nblk = (dim + CB - 1) / CB;
#pragma omp parallel for schedule(static) if (par && nblk > 1)
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t c0 = b * CB, c1 = std::min(dim, c0 + CB);
    double acc[CB] = {};
    for (int64_t t = 0; t < ntok; ++t) {
      const T* dor = dout + t * dim;
      const T* yr = y + t * dim;
      const T* zr = z + t * ld_z;
      const T* sr = rstd + t * ng;
      for (int64_t c = c0; c < c1; ++c) {
        const double zc = static_cast<double>(zr[c]);
        const double g = static_cast<double>(yr[c]) * zc * sigmoid(zc);
        acc[c - c0] += static_cast<double>(dor[c]) * g * static_cast<double>(sr[c / group_size]);
      }
    }
    for (int64_t c = c0; c < c1; ++c)
      dweight[c] = static_cast<T>(static_cast<double>(dweight[c]) + acc[c - c0]);
  }
}

void check_span(const NormSpan& span) {
  SSD_CHECK(span.ranks >= 1, "gated_rmsnorm: norm span over ", span.ranks, " ranks");
  SSD_CHECK(static_cast<bool>(span.all_reduce), "gated_rmsnorm: norm span without all_reduce");
}


// One group's columns [c0, c1) of one token, shared by the plain and the span forms (the
// same arithmetic in the same order, so the plain form's results do not depend on the split).
template <class T>
inline double gated(const T* yr, const T* zr, int64_t c) {
  const double zc = static_cast<double>(zr[c]);
  return static_cast<double>(yr[c]) * zc * sigmoid(zc);
}
template <class T>
double group_sumsq(const T* yr, const T* zr, int64_t c0, int64_t c1) {
  double ss = 0;
  for (int64_t c = c0; c < c1; ++c) {
    const double g = gated(yr, zr, c);
    ss += g * g;
  }
  return ss;
}
template <class T>
void group_out(const T* yr, const T* zr, const T* weight, int64_t c0, int64_t c1, double s, T* o) {
  for (int64_t c = c0; c < c1; ++c)
    o[c] = static_cast<T>(gated(yr, zr, c) * s * static_cast<double>(weight[c]));
}
// sum over the group of go_k g_k, go = dout * weight
template <class T>
double group_dot(const T* dor, const T* yr, const T* zr, const T* weight, int64_t c0, int64_t c1) {
  double dot = 0;
  for (int64_t c = c0; c < c1; ++c)
    dot += static_cast<double>(dor[c]) * static_cast<double>(weight[c]) * gated(yr, zr, c);
  return dot;
}
// dg_i = s * go_i - k * g_i (k = s^3 / n * dot); dy = dg * silu(z), dz = dg * y * silu'(z)
template <class T>
void group_grads(const T* dor, const T* yr, const T* zr, const T* weight, int64_t c0, int64_t c1,
                 double s, double k, T* dyr, T* dzr) {
  for (int64_t c = c0; c < c1; ++c) {
    const double zc = static_cast<double>(zr[c]), yc = static_cast<double>(yr[c]);
    const double sg = sigmoid(zc), silu = zc * sg;
    const double g = yc * silu;
    const double dg = s * static_cast<double>(dor[c]) * static_cast<double>(weight[c]) - k * g;
    dyr[c] = static_cast<T>(dg * silu);
    dzr[c] = static_cast<T>(dg * yc * sg * (1.0 + zc * (1.0 - sg)));
  }
}
}  // namespace

template <class T>
void gated_rmsnorm_fwd(const T* y, const T* z, int64_t ld_z, const T* weight, int64_t ntok,
                       int64_t dim, int64_t group_size, double eps, T* out, T* rstd) {
  SSD_CHECK(group_size > 0 && dim % group_size == 0, "dim ", dim, " not a multiple of group ",
            group_size);
  const int64_t ng = dim / group_size;
#pragma omp parallel for schedule(static) if (ntok * dim > 16384)
  for (int64_t t = 0; t < ntok; ++t) {
    const T* yr = y + t * dim;
    const T* zr = z + t * ld_z;
    for (int64_t j = 0; j < ng; ++j) {
      const int64_t c0 = j * group_size, c1 = c0 + group_size;
      const double ss = group_sumsq(yr, zr, c0, c1);
      const double s = 1.0 / std::sqrt(ss / static_cast<double>(group_size) + eps);
      rstd[t * ng + j] = static_cast<T>(s);
      group_out(yr, zr, weight, c0, c1, s, out + t * dim);
    }
  }
}

// Per group, with s = rstd, go = dout * weight, n = group_size:
//   dg_i = s * go_i - s^3 * g_i / n * sum_k go_k g_k
//   dy_i = dg_i * silu(z_i),  dz_i = dg_i * y_i * silu'(z_i),  silu' = sig * (1 + z (1 - sig))
template <class T>
void gated_rmsnorm_bwd(const T* dout, const T* y, const T* z, int64_t ld_z, const T* weight,
                       const T* rstd, int64_t ntok, int64_t dim, int64_t group_size, T* dy,
                       T* dz, int64_t ld_dz, T* dweight) {
  SSD_CHECK(group_size > 0 && dim % group_size == 0, "dim ", dim, " not a multiple of group ",
            group_size);
  const int64_t ng = dim / group_size;
  const double inv_n = 1.0 / static_cast<double>(group_size);
  const bool par = ntok * dim > 16384;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < ntok; ++t) {
    const T* dor = dout + t * dim;
    const T* yr = y + t * dim;
    const T* zr = z + t * ld_z;
    for (int64_t j = 0; j < ng; ++j) {
      const int64_t c0 = j * group_size, c1 = c0 + group_size;
      const double s = static_cast<double>(rstd[t * ng + j]);
      const double k = s * s * s * inv_n * group_dot(dor, yr, zr, weight, c0, c1);
      group_grads(dor, yr, zr, weight, c0, c1, s, k, dy + t * dim, dz + t * ld_dz);
    }
  }
  dweight_accumulate(dout, y, z, ld_z, rstd, ntok, dim, group_size, par, dweight);
}

// The same with a norm span: rstd holds the partial sums of squares until the all-reduce.
template <class T>
void gated_rmsnorm_fwd_span(const T* y, const T* z, int64_t ld_z, const T* weight, int64_t ntok,
                            int64_t dim, int64_t group_size, double eps, T* out, T* rstd,
                            const NormSpan& span) {
  SSD_CHECK(group_size > 0 && dim % group_size == 0, "dim ", dim, " not a multiple of group ",
            group_size);
  check_span(span);
  const int64_t ng = dim / group_size;
  const double inv_n = 1.0 / static_cast<double>(group_size * span.ranks);
  const bool par = ntok * dim > 16384;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < ntok; ++t)
    for (int64_t j = 0; j < ng; ++j)
      rstd[t * ng + j] = static_cast<T>(
          group_sumsq(y + t * dim, z + t * ld_z, j * group_size, (j + 1) * group_size));
  Tensor sums = borrow(rstd, dtype_of<T>::value, {ntok, ng});
  span.all_reduce(sums);
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < ntok; ++t)
    for (int64_t j = 0; j < ng; ++j) {
      const double s = 1.0 / std::sqrt(static_cast<double>(rstd[t * ng + j]) * inv_n + eps);
      rstd[t * ng + j] = static_cast<T>(s);
      group_out(y + t * dim, z + t * ld_z, weight, j * group_size, (j + 1) * group_size, s,
                out + t * dim);
    }
}

// With a norm span: the per-group dot products sum_k go_k g_k are all-reduced, n = group_size *
// span.ranks; dweight is this rank's columns.
template <class T>
void gated_rmsnorm_bwd_span(const T* dout, const T* y, const T* z, int64_t ld_z, const T* weight,
                            const T* rstd, int64_t ntok, int64_t dim, int64_t group_size, T* dy,
                            T* dz, int64_t ld_dz, T* dweight, const NormSpan& span) {
  SSD_CHECK(group_size > 0 && dim % group_size == 0, "dim ", dim, " not a multiple of group ",
            group_size);
  check_span(span);
  const int64_t ng = dim / group_size;
  const double inv_n = 1.0 / static_cast<double>(group_size * span.ranks);
  const bool par = ntok * dim > 16384;
  std::vector<T> dots(static_cast<size_t>(ntok * ng));
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < ntok; ++t)
    for (int64_t j = 0; j < ng; ++j)
      dots[t * ng + j] = static_cast<T>(group_dot(dout + t * dim, y + t * dim, z + t * ld_z,
                                                  weight, j * group_size, (j + 1) * group_size));
  Tensor sums = borrow(dots.data(), dtype_of<T>::value, {ntok, ng});
  span.all_reduce(sums);
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < ntok; ++t)
    for (int64_t j = 0; j < ng; ++j) {
      const double s = static_cast<double>(rstd[t * ng + j]);
      const double k = s * s * s * inv_n * static_cast<double>(dots[t * ng + j]);
      group_grads(dout + t * dim, y + t * dim, z + t * ld_z, weight, j * group_size,
                  (j + 1) * group_size, s, k, dy + t * dim, dz + t * ld_dz);
    }
  dweight_accumulate(dout, y, z, ld_z, rstd, ntok, dim, group_size, par, dweight);
}

template void gated_rmsnorm_fwd_span<float>(const float*, const float*, int64_t, const float*,
                                            int64_t, int64_t, int64_t, double, float*, float*,
                                            const NormSpan&);
template void gated_rmsnorm_fwd_span<double>(const double*, const double*, int64_t,
                                             const double*, int64_t, int64_t, int64_t, double,
                                             double*, double*, const NormSpan&);
template void gated_rmsnorm_bwd_span<float>(const float*, const float*, const float*, int64_t,
                                            const float*, const float*, int64_t, int64_t,
                                            int64_t, float*, float*, int64_t, float*,
                                            const NormSpan&);
template void gated_rmsnorm_bwd_span<double>(const double*, const double*, const double*,
                                             int64_t, const double*, const double*, int64_t,
                                             int64_t, int64_t, double*, double*, int64_t,
                                             double*, const NormSpan&);
template void gated_rmsnorm_fwd<float>(const float*, const float*, int64_t, const float*,
                                       int64_t, int64_t, int64_t, double, float*, float*);
template void gated_rmsnorm_fwd<double>(const double*, const double*, int64_t, const double*,
                                        int64_t, int64_t, int64_t, double, double*, double*);
template void gated_rmsnorm_bwd<float>(const float*, const float*, const float*, int64_t,
                                       const float*, const float*, int64_t, int64_t, int64_t,
                                       float*, float*, int64_t, float*);
template void gated_rmsnorm_bwd<double>(const double*, const double*, const double*, int64_t,
                                        const double*, const double*, int64_t, int64_t, int64_t,
                                        double*, double*, int64_t, double*);

}  // namespace ssd::cpu
