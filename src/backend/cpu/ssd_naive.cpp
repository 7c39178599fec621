// The SSD layer as its plain sequential recurrence, one token at a time. It is the
// specification the chunked ssd_fwd (and the CUDA kernels) are tested against, so it is kept
// as literal as possible and shares no code with ssd.cpp. With reset flags, a token that begins
// a document starts from a zero state.
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace ssd::cpu {

template <class T>
void ssd_naive_fwd(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt,
                   const T* dt_bias, const T* A_log, const T* D, const T* initial_state, T* y,
                   T* final_state, const int32_t* reset) {
  const int64_t P = d.headdim, N = d.dstate, d_inner = d.d_inner(), conv_dim = d.conv_dim();
  const int64_t heads_per_group = d.nheads / d.ngroups;
  std::vector<T> state(P * N);
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t h = 0; h < d.nheads; ++h) {
      const int64_t g = h / heads_per_group;
      const T A = -std::exp(A_log[h]);
      const int64_t state_off = (b * d.nheads + h) * P * N;
      for (int64_t i = 0; i < P * N; ++i)
        state[i] = initial_state ? initial_state[state_off + i] : T(0);
      for (int64_t t = 0; t < d.seqlen; ++t) {
        const int64_t tok = b * d.seqlen + t;
        const T* x = xBC + tok * conv_dim + h * P;
        const T* B = xBC + tok * conv_dim + d_inner + g * N;
        const T* C = xBC + tok * conv_dim + d_inner + d.ngroups * N + g * N;
        const T z = dt[tok * ld_dt + h] + dt_bias[h];
        const T dt_t = z > T(20) ? z : std::log1p(std::exp(z));  // softplus
        const T decay = std::exp(dt_t * A);
        if (reset && reset[tok])
          for (int64_t i = 0; i < P * N; ++i) state[i] = T(0);
        for (int64_t p = 0; p < P; ++p) {
          T acc = 0;
          for (int64_t n = 0; n < N; ++n) {
            T& s = state[p * N + n];
            s = decay * s + dt_t * x[p] * B[n];
            acc += s * C[n];
          }
          y[tok * d_inner + h * P + p] = acc + D[h] * x[p];
        }
      }
      if (final_state)
        for (int64_t i = 0; i < P * N; ++i) final_state[state_off + i] = state[i];
    }
  }
}

template void ssd_naive_fwd<float>(const SsdDims&, const float*, const float*, int64_t,
                                   const float*, const float*, const float*, const float*,
                                   float*, float*, const int32_t*);
template void ssd_naive_fwd<double>(const SsdDims&, const double*, const double*, int64_t,
                                    const double*, const double*, const double*,
                                    const double*, double*, double*, const int32_t*);

}  // namespace ssd::cpu
