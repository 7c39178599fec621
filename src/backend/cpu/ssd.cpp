// The SSD layer of Mamba-2 in its chunked ("state space dual") form, forward and backward.
// This is the reference the CUDA kernels are tested against: readability first.
//
// Per batch b and head h (group g = h / (nheads/ngroups) supplies B and C):
//   dt_t = softplus(dt_raw_t + dt_bias),  A = -exp(A_log),  a_t = dt_t A   (log-decay, < 0)
//   state_t = exp(a_t) state_{t-1} + dt_t x_t B_t^T,   y_t = state_t C_t + D x_t
// Split the sequence into chunks of at most `chunk` tokens. Inside one chunk, with the
// chunk-local cumulative log-decay dA_cumsum[t] = a_0 + ... + a_t, unrolling the recurrence
// gives the quadratic (attention-like) form
//   y_t = sum_{s<=t} exp(dA_cumsum[t] - dA_cumsum[s]) (C_t . B_s) dt_s x_s    intra-chunk
//       + exp(dA_cumsum[t]) state_in C_t                                     state entering
//       + D x_t
//   state_out = exp(dA_cumsum[last]) state_in
//             + sum_s exp(dA_cumsum[last] - dA_cumsum[s]) dt_s x_s B_s^T
// and consecutive chunks are linked through state_in / state_out. Work is O(chunk^2) per
// chunk, so linear in seqlen. Every exp() argument is <= 0 (A < 0, dt > 0): no overflow.
//
// The backward is the exact gradient of this computation: one forward pass to recover the
// state entering each chunk, then a reverse pass over chunks carrying dstate = dL/dstate_out.
//
// (batch, head) pairs are independent and run in parallel. B and C are shared by the heads of
// a group, and dt_bias/A_log/D by all batches, so their gradients are first written per
// (batch, head) into scratch and then reduced in a fixed order: results do not depend on the
// number of threads.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace ssd::cpu {
namespace {

template <class T>
T softplus(T z) {
  return z > T(20) ? z : std::log1p(std::exp(z));
}
// d softplus(z) / dz, consistent with the cut-off above.
template <class T>
T softplus_grad(T z) {
  return z > T(20) ? T(1) : T(1) / (T(1) + std::exp(-z));
}

template <class T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void check_dims(const SsdDims& d) {
  SSD_CHECK(d.batch >= 1 && d.seqlen >= 1 && d.chunk >= 1, "ssd: empty sequence or chunk");
  SSD_CHECK(d.ngroups >= 1 && d.nheads % d.ngroups == 0, "ssd: nheads % ngroups != 0");
}

// Column offsets of one head's x and its group's B, C inside a row of xBC.
struct Layout {
  int64_t P, N, d_inner, conv_dim, heads_per_group, ngroups;
  explicit Layout(const SsdDims& d)
      : P(d.headdim), N(d.dstate), d_inner(d.d_inner()), conv_dim(d.conv_dim()),
        heads_per_group(d.nheads / d.ngroups), ngroups(d.ngroups) {}
  int64_t x_col(int64_t h) const { return h * P; }
  int64_t B_col(int64_t h) const { return d_inner + (h / heads_per_group) * N; }
  int64_t C_col(int64_t h) const { return d_inner + (ngroups + h / heads_per_group) * N; }
};

// The inputs of one (batch, head, chunk), copied to contiguous buffers sized once per thread.
template <class T>
struct Chunk {
  int64_t len = 0;               // tokens in this chunk (the last one may be short)
  std::vector<T> x, B, C;        // [len, P], [len, N], [len, N]
  std::vector<T> dt_in;          // dt_raw + dt_bias, the softplus argument [len]
  std::vector<T> dt;             // softplus(dt_in) [len]
  std::vector<T> dA_cumsum;      // chunk-local cumulative sum of dt * A [len]

  Chunk(int64_t max_len, int64_t P, int64_t N)
      : x(max_len * P), B(max_len * N), C(max_len * N), dt_in(max_len), dt(max_len),
        dA_cumsum(max_len) {}

  void load(const Layout& lay, const T* xBC, const T* dt_raw, int64_t ld_dt, T dt_bias, T A,
            int64_t h, int64_t tok0, int64_t n_tok) {
    len = n_tok;
    T cum = 0;
    for (int64_t s = 0; s < len; ++s) {
      const T* row = xBC + (tok0 + s) * lay.conv_dim;
      std::copy_n(row + lay.x_col(h), lay.P, &x[s * lay.P]);
      std::copy_n(row + lay.B_col(h), lay.N, &B[s * lay.N]);
      std::copy_n(row + lay.C_col(h), lay.N, &C[s * lay.N]);
      dt_in[s] = dt_raw[(tok0 + s) * ld_dt + h] + dt_bias;
      dt[s] = softplus(dt_in[s]);
      cum += dt[s] * A;
      dA_cumsum[s] = cum;
    }
  }
};

// state <- state_out of the chunk, given state = state_in.  state is [P, N].
template <class T>
void advance_state(const Chunk<T>& ck, int64_t P, int64_t N, T* state) {
  const T last = ck.dA_cumsum[ck.len - 1];
  const T decay_all = std::exp(last);
  for (int64_t i = 0; i < P * N; ++i) state[i] *= decay_all;
  for (int64_t s = 0; s < ck.len; ++s) {
    // token s is decayed by every step after it, to the end of the chunk
    const T coef = std::exp(last - ck.dA_cumsum[s]) * ck.dt[s];
    for (int64_t p = 0; p < P; ++p) {
      const T xs = coef * ck.x[s * P + p];
      T* Sp = state + p * N;
      const T* Bs = &ck.B[s * N];
      for (int64_t n = 0; n < N; ++n) Sp[n] += xs * Bs[n];
    }
  }
}

}  // namespace

template <class T>
void ssd_fwd(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt, const T* dt_bias,
             const T* A_log, const T* D, const T* initial_state, T* y, T* final_state) {
  check_dims(d);
  const Layout lay(d);
  const int64_t P = lay.P, N = lay.N, PN = P * N;
  const int64_t max_len = std::min(d.chunk, d.seqlen);

#pragma omp parallel
  {
    Chunk<T> ck(max_len, P, N);
    std::vector<T> state(PN), W(max_len * max_len), yt(P);

#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < d.batch; ++b) {
      for (int64_t h = 0; h < d.nheads; ++h) {
        const T A = -std::exp(A_log[h]);
        const int64_t state_off = (b * d.nheads + h) * PN;
        for (int64_t i = 0; i < PN; ++i)
          state[i] = initial_state ? initial_state[state_off + i] : T(0);

        for (int64_t t0 = 0; t0 < d.seqlen; t0 += d.chunk) {
          const int64_t tok0 = b * d.seqlen + t0;
          ck.load(lay, xBC, dt, ld_dt, dt_bias[h], A, h, tok0, std::min(d.chunk, d.seqlen - t0));
          const int64_t L = ck.len;
          const T* cum = ck.dA_cumsum.data();

          // The chunk's causal "attention" matrix W[t][s] = exp(cum_t - cum_s) (C_t.B_s) dt_s.
          for (int64_t t = 0; t < L; ++t)
            for (int64_t s = 0; s <= t; ++s)
              W[t * L + s] = std::exp(cum[t] - cum[s]) *
                             dot(&ck.C[t * N], &ck.B[s * N], N) * ck.dt[s];

          for (int64_t t = 0; t < L; ++t) {
            // skip connection + the state entering the chunk, decayed to t, read out by C_t
            const T decay_in = std::exp(cum[t]);
            for (int64_t p = 0; p < P; ++p)
              yt[p] = D[h] * ck.x[t * P + p] + decay_in * dot(&state[p * N], &ck.C[t * N], N);
            // tokens of this chunk up to t
            for (int64_t s = 0; s <= t; ++s) {
              const T w = W[t * L + s];
              for (int64_t p = 0; p < P; ++p) yt[p] += w * ck.x[s * P + p];
            }
            std::copy_n(yt.data(), P, y + (tok0 + t) * lay.d_inner + lay.x_col(h));
          }
          advance_state(ck, P, N, state.data());
        }
        if (final_state) std::copy_n(state.data(), PN, final_state + state_off);
      }
    }
  }
}

// Gradient notation: dZ = dL/dZ. Inside a chunk write E[t][s] = exp(cum_t - cum_s),
// CB[t][s] = C_t.B_s and W = E CB dt_s (as in the forward); dS = dL/dstate_out, S_in = state_in.
// From  y_t = sum_s W[t][s] x_s + exp(cum_t) S_in C_t + D x_t  and
//       S_out = exp(cum_last) S_in + sum_s exp(cum_last - cum_s) dt_s x_s B_s^T:
//   dW[t][s]  = dy_t . x_s
//   dx_s      = sum_{t>=s} W[t][s] dy_t + D dy_s + exp(cum_last - cum_s) dt_s (dS B_s)
//   dCB[t][s] = dW[t][s] E[t][s] dt_s
//   dC_t      = sum_{s<=t} dCB[t][s] B_s + exp(cum_t) S_in^T dy_t
//   dB_s      = sum_{t>=s} dCB[t][s] C_t + exp(cum_last - cum_s) dt_s dS^T x_s
//   dS_in     = exp(cum_last) dS + sum_t exp(cum_t) dy_t C_t^T
//   dt_s (explicit factor dt_s, not through cum):
//             = sum_{t>=s} dW[t][s] E[t][s] CB[t][s] + exp(cum_last - cum_s) x_s^T dS B_s
//   dcum: a factor exp(cum_u - cum_v) in a term whose (upstream gradient x value) is G sends
//         +G to dcum_u and -G to dcum_v (d exp(z)/dz = exp(z)); a factor exp(cum_t) sends G
//         to dcum_t alone.
//   cum_t = sum_{k<=t} dt_k A  =>  da_k = sum_{t>=k} dcum_t;  ddt_k += A da_k;  dA += dt_k da_k.
// Finally ddt_raw = ddt softplus'(dt_raw + dt_bias), ddt_bias = sum ddt_raw, dA_log = dA A.
template <class T>
void ssd_bwd(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt, const T* dt_bias,
             const T* A_log, const T* D, const T* initial_state, const T* dy,
             const T* dfinal_state, T* dxBC, T* ddt, int64_t ld_ddt, T* d_dt_bias, T* dA_log,
             T* dD, T* d_initial_state) {
  check_dims(d);
  const Layout lay(d);
  const int64_t P = lay.P, N = lay.N, PN = P * N;
  const int64_t max_len = std::min(d.chunk, d.seqlen);
  const int64_t nchunks = d.nchunks();
  const int64_t BH = d.batch * d.nheads;

  // Per (batch, head): the B and C gradients of each token [seqlen, 2N] (reduced over the
  // heads of a group below), and the three per-head parameter gradients.
  std::vector<T> dBC_head(BH * d.seqlen * 2 * N);
  std::vector<T> dD_bh(BH), dA_log_bh(BH), d_dt_bias_bh(BH);

#pragma omp parallel
  {
    Chunk<T> ck(max_len, P, N);
    std::vector<T> states_in(nchunks * PN), dS(PN), dS_in(PN);
    std::vector<T> W(max_len * max_len), dCB(max_len * max_len);
    std::vector<T> dY(max_len * P), dX(max_len * P), dB(max_len * N), dC(max_len * N);
    std::vector<T> dcum(max_len), ddt_explicit(max_len);
    std::vector<T> v_P(P), v_N(N);

#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < d.batch; ++b) {
      for (int64_t h = 0; h < d.nheads; ++h) {
        const int64_t bh = b * d.nheads + h;
        const T A = -std::exp(A_log[h]);
        const int64_t state_off = bh * PN;

        // Forward over chunks only to recover the state entering each chunk.
        for (int64_t i = 0; i < PN; ++i)
          states_in[i] = initial_state ? initial_state[state_off + i] : T(0);
        for (int64_t c = 0; c + 1 < nchunks; ++c) {
          const int64_t t0 = c * d.chunk;
          ck.load(lay, xBC, dt, ld_dt, dt_bias[h], A, h, b * d.seqlen + t0,
                  std::min(d.chunk, d.seqlen - t0));
          std::copy_n(&states_in[c * PN], PN, &states_in[(c + 1) * PN]);
          advance_state(ck, P, N, &states_in[(c + 1) * PN]);
        }

        for (int64_t i = 0; i < PN; ++i)
          dS[i] = dfinal_state ? dfinal_state[state_off + i] : T(0);
        T dD_sum = 0, dA_sum = 0, d_dt_bias_sum = 0;

        for (int64_t c = nchunks - 1; c >= 0; --c) {
          const int64_t t0 = c * d.chunk;
          const int64_t tok0 = b * d.seqlen + t0;
          ck.load(lay, xBC, dt, ld_dt, dt_bias[h], A, h, tok0, std::min(d.chunk, d.seqlen - t0));
          const int64_t L = ck.len;
          const T* cum = ck.dA_cumsum.data();
          const T* x = ck.x.data();
          const T* Bm = ck.B.data();
          const T* Cm = ck.C.data();
          const T* S_in = &states_in[c * PN];
          const T cum_last = cum[L - 1];
          for (int64_t t = 0; t < L; ++t)
            std::copy_n(dy + (tok0 + t) * lay.d_inner + lay.x_col(h), P, &dY[t * P]);
          std::fill_n(dcum.begin(), L, T(0));
          std::fill_n(ddt_explicit.begin(), L, T(0));

          // ---- intra-chunk (quadratic) part ----
          for (int64_t t = 0; t < L; ++t) {
            for (int64_t s = 0; s <= t; ++s) {
              const T E = std::exp(cum[t] - cum[s]);
              const T CB = dot(&Cm[t * N], &Bm[s * N], N);
              const T w = E * CB * ck.dt[s];
              const T dw = dot(&dY[t * P], &x[s * P], P);
              W[t * L + s] = w;
              dCB[t * L + s] = dw * E * ck.dt[s];
              ddt_explicit[s] += dw * E * CB;
              if (s < t) {  // the diagonal has E = 1: no dependence on cum
                dcum[t] += dw * w;
                dcum[s] -= dw * w;
              }
            }
          }
          for (int64_t s = 0; s < L; ++s) {
            for (int64_t p = 0; p < P; ++p) dX[s * P + p] = D[h] * dY[s * P + p];
            for (int64_t t = s; t < L; ++t) {
              const T w = W[t * L + s];
              for (int64_t p = 0; p < P; ++p) dX[s * P + p] += w * dY[t * P + p];
            }
          }
          for (int64_t t = 0; t < L; ++t) {
            T* dCt = &dC[t * N];
            std::fill_n(dCt, N, T(0));
            for (int64_t s = 0; s <= t; ++s) {
              const T g = dCB[t * L + s];
              for (int64_t n = 0; n < N; ++n) dCt[n] += g * Bm[s * N + n];
            }
          }
          for (int64_t s = 0; s < L; ++s) {
            T* dBs = &dB[s * N];
            std::fill_n(dBs, N, T(0));
            for (int64_t t = s; t < L; ++t) {
              const T g = dCB[t * L + s];
              for (int64_t n = 0; n < N; ++n) dBs[n] += g * Cm[t * N + n];
            }
          }

          // ---- the state entering the chunk: y_t += exp(cum_t) S_in C_t ----
          for (int64_t i = 0; i < PN; ++i) dS_in[i] = std::exp(cum_last) * dS[i];
          for (int64_t t = 0; t < L; ++t) {
            const T decay_in = std::exp(cum[t]);
            const T* dyt = &dY[t * P];
            T read = 0;  // dy_t . (S_in C_t)
            for (int64_t p = 0; p < P; ++p) {
              read += dyt[p] * dot(&S_in[p * N], &Cm[t * N], N);
              const T g = decay_in * dyt[p];
              for (int64_t n = 0; n < N; ++n) {
                dC[t * N + n] += g * S_in[p * N + n];
                dS_in[p * N + n] += g * Cm[t * N + n];
              }
            }
            dcum[t] += decay_in * read;
          }

          // ---- the state leaving the chunk ----
          {
            T carried = 0;  // dS . S_in, through exp(cum_last) S_in
            for (int64_t i = 0; i < PN; ++i) carried += dS[i] * S_in[i];
            dcum[L - 1] += std::exp(cum_last) * carried;
          }
          for (int64_t s = 0; s < L; ++s) {
            const T decay_out = std::exp(cum_last - cum[s]);
            const T coef = decay_out * ck.dt[s];
            T* dSB = v_P.data();  // dS B_s  [P]
            T* dSx = v_N.data();  // dS^T x_s [N]
            std::fill_n(dSx, N, T(0));
            for (int64_t p = 0; p < P; ++p) {
              dSB[p] = dot(&dS[p * N], &Bm[s * N], N);
              const T xp = x[s * P + p];
              for (int64_t n = 0; n < N; ++n) dSx[n] += dS[p * N + n] * xp;
            }
            for (int64_t p = 0; p < P; ++p) dX[s * P + p] += coef * dSB[p];
            for (int64_t n = 0; n < N; ++n) dB[s * N + n] += coef * dSx[n];
            const T xSB = decay_out * dot(&x[s * P], dSB, P);  // d(term)/d(dt_s)
            ddt_explicit[s] += xSB;
            dcum[L - 1] += xSB * ck.dt[s];
            dcum[s] -= xSB * ck.dt[s];
          }

          // ---- through the cumulative sum, the softplus, and out ----
          T da = 0;  // dL/da_s = sum_{t>=s} dcum_t, accumulated backwards
          for (int64_t s = L - 1; s >= 0; --s) {
            da += dcum[s];
            const T ddt_s = ddt_explicit[s] + da * A;
            dA_sum += da * ck.dt[s];
            const T ddt_raw = ddt_s * softplus_grad(ck.dt_in[s]);
            ddt[(tok0 + s) * ld_ddt + h] = ddt_raw;
            d_dt_bias_sum += ddt_raw;
          }
          dD_sum += dot(dY.data(), x, L * P);
          for (int64_t t = 0; t < L; ++t) {
            std::copy_n(&dX[t * P], P, dxBC + (tok0 + t) * lay.conv_dim + lay.x_col(h));
            T* dBC_t = &dBC_head[(bh * d.seqlen + t0 + t) * 2 * N];
            std::copy_n(&dB[t * N], N, dBC_t);
            std::copy_n(&dC[t * N], N, dBC_t + N);
          }
          std::swap(dS, dS_in);  // dL/dstate_out of the previous chunk
        }
        if (d_initial_state) std::copy_n(dS.data(), PN, d_initial_state + state_off);
        dD_bh[bh] = dD_sum;
        dA_log_bh[bh] = dA_sum * A;  // dA/dA_log = A
        d_dt_bias_bh[bh] = d_dt_bias_sum;
      }
    }

    // B and C of a group: sum over its heads, in head order.
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < d.batch; ++b) {
      for (int64_t g = 0; g < d.ngroups; ++g) {
        const int64_t h0 = g * lay.heads_per_group;
        for (int64_t t = 0; t < d.seqlen; ++t) {
          T* row = dxBC + (b * d.seqlen + t) * lay.conv_dim;
          T* dBt = row + lay.B_col(h0);
          T* dCt = row + lay.C_col(h0);
          std::fill_n(dBt, N, T(0));
          std::fill_n(dCt, N, T(0));
          for (int64_t h = h0; h < h0 + lay.heads_per_group; ++h) {
            const T* src = &dBC_head[((b * d.nheads + h) * d.seqlen + t) * 2 * N];
            for (int64_t n = 0; n < N; ++n) {
              dBt[n] += src[n];
              dCt[n] += src[N + n];
            }
          }
        }
      }
    }
  }

  // Parameter gradients: sum over the batch in order, then accumulate.
  for (int64_t h = 0; h < d.nheads; ++h) {
    T sD = 0, sA = 0, sbias = 0;
    for (int64_t b = 0; b < d.batch; ++b) {
      sD += dD_bh[b * d.nheads + h];
      sA += dA_log_bh[b * d.nheads + h];
      sbias += d_dt_bias_bh[b * d.nheads + h];
    }
    dD[h] += sD;
    dA_log[h] += sA;
    d_dt_bias[h] += sbias;
  }
}

template void ssd_fwd<float>(const SsdDims&, const float*, const float*, int64_t, const float*,
                             const float*, const float*, const float*, float*, float*);
template void ssd_fwd<double>(const SsdDims&, const double*, const double*, int64_t,
                              const double*, const double*, const double*, const double*,
                              double*, double*);
template void ssd_bwd<float>(const SsdDims&, const float*, const float*, int64_t, const float*,
                             const float*, const float*, const float*, const float*,
                             const float*, float*, float*, int64_t, float*, float*, float*,
                             float*);
template void ssd_bwd<double>(const SsdDims&, const double*, const double*, int64_t,
                              const double*, const double*, const double*, const double*,
                              const double*, const double*, double*, double*, int64_t, double*,
                              double*, double*, double*);

}  // namespace ssd::cpu
