// Dense layer without bias, on OpenBLAS: y = x @ w^T.
#include <cblas.h>

#include <algorithm>
#include <climits>

#include "backend/cpu/blas.h"
#include "backend/cpu/cpu_ops.h"

namespace ssd::cpu {

namespace {


void check_dims(int64_t M, int64_t N, int64_t K) {
  SSD_CHECK(M >= 0 && N >= 0 && K >= 0, "negative GEMM size");
  SSD_CHECK(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX && M * std::max(N, K) <= INT64_MAX / 2,
            "GEMM size too large for 32-bit BLAS: ", M, "x", N, "x", K);
}

}  // namespace

template <class T>
void linear_fwd(const T* x, const T* w, int64_t M, int64_t N, int64_t K, T* y) {
  check_dims(M, N, K);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    std::fill(y, y + M * N, T(0));
    return;
  }
  gemm(false, true, M, N, K, T(1), x, K, w, K, T(0), y, N);
}

template <class T>
void linear_bwd(const T* x, const T* w, const T* dy, int64_t M, int64_t N, int64_t K, T* dx,
                T* dw) {
  check_dims(M, N, K);
  if (K == 0) return;
  if (dx && M > 0) {
    if (N == 0)
      std::fill(dx, dx + M * K, T(0));
    else
      gemm(false, false, M, K, N, T(1), dy, N, w, K, T(0), dx, K);  // dx = dy @ w
  }
  if (M > 0 && N > 0) gemm(true, false, N, K, M, T(1), dy, N, x, K, T(1), dw, K);  // dw += dy^T x
}

template void linear_fwd<float>(const float*, const float*, int64_t, int64_t, int64_t, float*);
template void linear_fwd<double>(const double*, const double*, int64_t, int64_t, int64_t,
                                 double*);
template void linear_bwd<float>(const float*, const float*, const float*, int64_t, int64_t,
                                int64_t, float*, float*);
template void linear_bwd<double>(const double*, const double*, const double*, int64_t, int64_t,
                                 int64_t, double*, double*);

}  // namespace ssd::cpu
