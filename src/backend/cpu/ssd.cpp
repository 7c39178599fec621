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
// In matrices, for one chunk of Q tokens (x [Q,P], B and C [Q,N], states [P,N]), writing
// cum = dA_cumsum:
//   CB        = C B^T                               [Q,Q]  shared by the heads of a group
//   W[t][s]   = exp(cum_t - cum_s) CB[t][s] dt_s    [Q,Q]  for s <= t, 0 above the diagonal
//   y         = W x + C_in state_in^T + D x         [Q,P]  C_in[t] = exp(cum_t) C_t
//   state_out = exp(cum_last) state_in + x^T B_out  [P,N]
//               with B_out[s] = exp(cum_last - cum_s) dt_s B_s
// so a chunk is a few small GEMMs (OpenBLAS, through blas.h) around the O(Q^2) loops that
// build W: decay_matrix (the exp(cum_t - cum_s), computed once per head and chunk and used
// by every term that needs them) and decay_mask. Decays below exp(-40) count as 0 (decay()).
//
// The backward is the exact gradient of this computation: one forward pass to recover the
// state entering each chunk, then a reverse pass over chunks carrying dstate = dL/dstate_out.
//
// Packed documents (reset flags): a token r that begins a document drops the state entering
// it, i.e. every decay factor whose span crosses r is 0. Per chunk, seg[t] = the number of
// resets at chunk positions 0..t; then exp(cum_t - cum_s) is kept only where seg[t] == seg[s],
// exp(cum_t) (state_in reaching t) only where seg[t] == 0, exp(cum_last - cum_s) only where
// seg[s] == seg[last]. The kept factors span no reset, so they are unchanged, and every
// gradient term is (upstream gradient) x (factor): the zeroed factors send nothing back,
// which makes the backward exact with no further change. Chunks without resets run the
// same code as without flags.
//
// (batch, group) pairs are independent and run in parallel, each start to finish on one
// thread; inside one, the heads of the group share B, C and C B^T, and their B and C
// gradients are summed in head order. dt_bias/A_log/D are shared by all batches, so their
// gradients are first written per (batch, head) into scratch and then reduced in a fixed
// order: results do not depend on the number of threads.
// The GEMMs are called from inside the parallel region, one per (head or group, chunk), and
// are small: at most chunk x chunk x max(headdim, dstate). Up to 64 x 64 x 64 OpenBLAS runs
// them on the calling thread; beyond that it may split one over its own threads as well,
// which gives the same results but oversubscribes the cores (run with OPENBLAS_NUM_THREADS=1).
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/blas.h"
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

// exp(z) of a log-decay z <= 0, taken as exactly 0 below exp(-40) ~ 4e-18: damped that much,
// a token's contribution is below the rounding of the undamped ones even in double, and left
// in, it would push the chunk's products into subnormal floats, which x86 handles many times
// slower.
constexpr double kMinLogDecay = -40;
template <class T>
T decay(T z) {
  return z < kMinLogDecay ? T(0) : std::exp(z);
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

// Column offsets of a head's x and a group's B, C inside a row of xBC.
struct Layout {
  int64_t P, N, d_inner, conv_dim, heads_per_group, ngroups;
  explicit Layout(const SsdDims& d)
      : P(d.headdim), N(d.dstate), d_inner(d.d_inner()), conv_dim(d.conv_dim()),
        heads_per_group(d.nheads / d.ngroups), ngroups(d.ngroups) {}
  int64_t x_col(int64_t h) const { return h * P; }
  int64_t B_col(int64_t g) const { return d_inner + g * N; }
  int64_t C_col(int64_t g) const { return d_inner + (ngroups + g) * N; }
};

// B and C of one (batch, group, chunk), shared by the heads of the group, and CB = C B^T.
// Buffers are sized once per thread.
template <class T>
struct GroupChunk {
  int64_t len = 0;               // tokens in this chunk (the last one may be short)
  std::vector<T> B, C;           // [len, N]
  std::vector<T> CB;             // [len, len]: CB[t][s] = C_t . B_s
  // Reset flags: any_reset when a token of the chunk begins a document; then seg [len] counts
  // the resets at positions 0..t, and inner_reset says one is past position 0 (the chunk's
  // intra-chunk decays need masking).
  bool any_reset = false, inner_reset = false;
  std::vector<int32_t> seg;

  GroupChunk(int64_t max_len, int64_t N)
      : B(max_len * N), C(max_len * N), CB(max_len * max_len), seg(max_len) {}

  // reset: the flags of the chunk's tokens (null: none).
  void load(const Layout& lay, const T* xBC, int64_t g, int64_t tok0, int64_t n_tok,
            bool with_CB, const int32_t* reset) {
    const int64_t N = lay.N;
    len = n_tok;
    any_reset = inner_reset = false;
    if (reset) {
      int32_t n = 0;
      for (int64_t s = 0; s < len; ++s) {
        if (reset[s]) {
          ++n;
          inner_reset |= s > 0;
        }
        seg[s] = n;
      }
      any_reset = n > 0;
    }
    for (int64_t s = 0; s < len; ++s) {
      const T* row = xBC + (tok0 + s) * lay.conv_dim;
      std::copy_n(row + lay.B_col(g), N, &B[s * N]);
      std::copy_n(row + lay.C_col(g), N, &C[s * N]);
    }
    if (with_CB)
      gemm(false, true, len, len, N, T(1), C.data(), N, B.data(), N, T(0), CB.data(), len);
  }
};

// dt_in = dt_raw + dt_bias, dt = softplus(dt_in) and the cumulative log-decay cum of head h
// over tokens [tok0, tok0 + len): the one place they are computed, so that every pass over a
// chunk (and the segment decay) sees the same values.
template <class T>
void chunk_dt(const T* dt_raw, int64_t ld_dt, T dt_bias, T A, int64_t h, int64_t tok0,
              int64_t len, T* dt_in, T* dt, T* cum) {
  T c = 0;
  for (int64_t s = 0; s < len; ++s) {
    dt_in[s] = dt_raw[(tok0 + s) * ld_dt + h] + dt_bias;
    dt[s] = softplus(dt_in[s]);
    c += dt[s] * A;
    cum[s] = c;
  }
}

// One head's inputs of a chunk, and the per-token decays derived from them (used by the
// forward and the backward alike).
template <class T>
struct HeadChunk {
  int64_t len = 0;
  std::vector<T> x;              // [len, P]
  std::vector<T> dt_in;          // dt_raw + dt_bias, the softplus argument [len]
  std::vector<T> dt;             // softplus(dt_in) [len]
  std::vector<T> dA_cumsum;      // chunk-local cumulative sum of dt * A [len]
  std::vector<T> decay_in;       // exp(cum_t): share of state_in that reaches token t [len]
  std::vector<T> decay_out;      // exp(cum_last - cum_s): share of token s in state_out [len]
  std::vector<T> C_in;           // decay_in[t] C_t: reads state_in at token t [len, N]
  std::vector<T> B_out;          // decay_out[s] dt_s B_s: writes token s into state_out [len, N]
  const int32_t* seg = nullptr;  // the group chunk's seg when a reset lies inside it, else null

  HeadChunk(int64_t max_len, int64_t P, int64_t N)
      : x(max_len * P), dt_in(max_len), dt(max_len), dA_cumsum(max_len), decay_in(max_len),
        decay_out(max_len), C_in(max_len * N), B_out(max_len * N) {}

  void load(const Layout& lay, const GroupChunk<T>& gc, const T* xBC, const T* dt_raw,
            int64_t ld_dt, T dt_bias, T A, int64_t h, int64_t tok0) {
    const int64_t P = lay.P, N = lay.N;
    len = gc.len;
    for (int64_t s = 0; s < len; ++s)
      std::copy_n(xBC + (tok0 + s) * lay.conv_dim + lay.x_col(h), P, &x[s * P]);
    chunk_dt(dt_raw, ld_dt, dt_bias, A, h, tok0, len, dt_in.data(), dt.data(), dA_cumsum.data());
    const T last = dA_cumsum[len - 1];
    seg = gc.inner_reset ? gc.seg.data() : nullptr;
    for (int64_t s = 0; s < len; ++s) {
      decay_in[s] = decay(dA_cumsum[s]);
      decay_out[s] = decay(last - dA_cumsum[s]);
      if (gc.any_reset) {  // no decay across a document boundary
        if (gc.seg[s] != 0) decay_in[s] = T(0);
        if (gc.seg[s] != gc.seg[len - 1]) decay_out[s] = T(0);
      }
      const T coef = decay_out[s] * dt[s];
      for (int64_t n = 0; n < N; ++n) {
        C_in[s * N + n] = decay_in[s] * gc.C[s * N + n];
        B_out[s * N + n] = coef * gc.B[s * N + n];
      }
    }
  }
  T decay_all() const { return decay_in[len - 1]; }  // exp(cum_last): state_in to state_out
};

// E [len, len]: the decay from token s to token t, E[t][s] = decay(cum_t - cum_s) for s <= t
// (the upper triangle is left alone). These are the only O(len^2) exp()s. To need fewer
// (len^2/16 + 4.5 len instead of len^2/2: 512 instead of 2080 for 64 tokens), the tokens are
// taken in blocks of 8, and for s in an earlier block than t's, ending at token e,
//   exp(cum_t - cum_s) = exp(cum_t - cum_e) exp(cum_e - cum_s) = exp(cum_t - cum_e) E[e][s]:
// a product of two factors <= 1 (unlike exp(cum_t) exp(-cum_s), which overflows).
// With a reset inside the chunk, the pairs in different documents are then set to 0.
template <class T>
void decay_matrix(const HeadChunk<T>& hc, T* E) {
  constexpr int64_t K = 8;
  const int64_t L = hc.len;
  const T* cum = hc.dA_cumsum.data();
  for (int64_t t = 0; t < L; ++t) {
    T* Et = E + t * L;
    const int64_t t_block = t - t % K;  // first token of t's block
    for (int64_t s = t_block; s <= t; ++s) Et[s] = decay(cum[t] - cum[s]);
    for (int64_t e = t_block - 1; e >= 0; e -= K) {  // earlier blocks [e - K + 1, e]
      const T to_e = decay(cum[t] - cum[e]);
      const T* Ee = E + e * L;
      for (int64_t s = e - K + 1; s <= e; ++s)
        Et[s] = cum[t] - cum[s] < kMinLogDecay ? T(0) : to_e * Ee[s];
    }
  }
  if (hc.seg)  // after the whole matrix: the block products above read unmasked rows
    for (int64_t t = 0; t < L; ++t)
      for (int64_t s = 0; s < t; ++s)
        if (hc.seg[s] != hc.seg[t]) E[t * L + s] = T(0);
}

// W [len, len] = the chunk's causal "attention" matrix for this head:
// W[t][s] = E[t][s] CB[t][s] dt_s for s <= t, and 0 above the diagonal.
template <class T>
void decay_mask(const HeadChunk<T>& hc, const T* E, const T* CB, T* W) {
  const int64_t L = hc.len;
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t s = 0; s <= t; ++s) W[t * L + s] = E[t * L + s] * CB[t * L + s] * hc.dt[s];
    std::fill(W + t * L + t + 1, W + (t + 1) * L, T(0));
  }
}

// state <- state_out of the chunk, given state = state_in [P, N]:
//   state = exp(cum_last) state + x^T B_out
template <class T>
void advance_state(const HeadChunk<T>& hc, int64_t P, int64_t N, T* state) {
  gemm(true, false, P, N, hc.len, T(1), hc.x.data(), P, hc.B_out.data(), N, hc.decay_all(),
       state, N);
}

// Runs the states of the heads of group g of sequence b through chunks [0, nc), in place:
// `states` [head of group, P, N] holds the state entering chunk 0, and after(c) sees it hold the
// state leaving chunk c. The chunk states and the pass between chunks, no outputs.
template <class T, class After>
void pass_states(const SsdDims& d, const Layout& lay, const T* xBC, const T* dt, int64_t ld_dt,
                 const T* dt_bias, const T* A_log, const int32_t* reset, int64_t b, int64_t g,
                 int64_t nc, GroupChunk<T>& gc, HeadChunk<T>& hc, T* states, After&& after) {
  const int64_t hpg = lay.heads_per_group, PN = lay.P * lay.N;
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = c * d.chunk, tok0 = b * d.seqlen + t0;
    gc.load(lay, xBC, g, tok0, std::min(d.chunk, d.seqlen - t0), /*with_CB=*/false,
            reset ? reset + tok0 : nullptr);
    for (int64_t hh = 0; hh < hpg; ++hh) {
      const int64_t h = g * hpg + hh;
      hc.load(lay, gc, xBC, dt, ld_dt, dt_bias[h], -std::exp(A_log[h]), h, tok0);
      advance_state(hc, lay.P, lay.N, states + hh * PN);
    }
    after(c);
  }
}

}  // namespace

template <class T>
void ssd_fwd(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt, const T* dt_bias,
             const T* A_log, const T* D, const T* initial_state, T* y, T* final_state,
             const int32_t* reset) {
  check_dims(d);
  const Layout lay(d);
  const int64_t P = lay.P, N = lay.N, PN = P * N, hpg = lay.heads_per_group;
  const int64_t max_len = std::min(d.chunk, d.seqlen);

#pragma omp parallel
  {
    GroupChunk<T> gc(max_len, N);
    HeadChunk<T> hc(max_len, P, N);
    std::vector<T> states(hpg * PN);  // [head of group, P, N]
    std::vector<T> E(max_len * max_len), W(max_len * max_len);

#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < d.batch; ++b) {
      for (int64_t g = 0; g < d.ngroups; ++g) {
        const int64_t h0 = g * hpg;                       // first head of the group
        const int64_t states_off = (b * d.nheads + h0) * PN;  // its heads' states are adjacent
        for (int64_t i = 0; i < hpg * PN; ++i)
          states[i] = initial_state ? initial_state[states_off + i] : T(0);

        for (int64_t t0 = 0; t0 < d.seqlen; t0 += d.chunk) {
          const int64_t tok0 = b * d.seqlen + t0;
          gc.load(lay, xBC, g, tok0, std::min(d.chunk, d.seqlen - t0), /*with_CB=*/true,
                  reset ? reset + tok0 : nullptr);
          const int64_t L = gc.len;
          for (int64_t h = h0; h < h0 + hpg; ++h) {
            hc.load(lay, gc, xBC, dt, ld_dt, dt_bias[h], -std::exp(A_log[h]), h, tok0);
            T* state = &states[(h - h0) * PN];
            const T* x = hc.x.data();
            decay_matrix(hc, E.data());
            decay_mask(hc, E.data(), gc.CB.data(), W.data());

            // This head's y rows of the chunk: [L, P] with row stride d_inner.
            T* yc = y + tok0 * lay.d_inner + lay.x_col(h);
            for (int64_t t = 0; t < L; ++t)  // skip connection
              for (int64_t p = 0; p < P; ++p) yc[t * lay.d_inner + p] = D[h] * x[t * P + p];
            // + tokens of this chunk up to t:  W x
            gemm(false, false, L, P, L, T(1), W.data(), L, x, P, T(1), yc, lay.d_inner);
            // + the state entering the chunk, decayed to t and read out by C_t:  C_in state^T
            gemm(false, true, L, P, N, T(1), hc.C_in.data(), N, state, N, T(1), yc, lay.d_inner);

            advance_state(hc, P, N, state);
          }
        }
        if (final_state) std::copy_n(states.data(), hpg * PN, final_state + states_off);
      }
    }
  }
}

// Gradient notation: dZ = dL/dZ. Inside a chunk write E[t][s] = exp(cum_t - cum_s),
// CB[t][s] = C_t.B_s and W = E CB dt_s (as in the forward); dS = dL/dstate_out, S_in = state_in.
// From  y_t = sum_s W[t][s] x_s + exp(cum_t) S_in C_t + D x_t  and
//       S_out = exp(cum_last) S_in + sum_s exp(cum_last - cum_s) dt_s x_s B_s^T:
//   dW[t][s]  = dy_t . x_s                                            dW  = dY x^T
//   dx_s      = sum_{t>=s} W[t][s] dy_t + D dy_s + exp(cum_last - cum_s) dt_s (dS B_s)
//                                                           dX  = W^T dY + D dY + B_out dS^T
//   dCB[t][s] = dW[t][s] E[t][s] dt_s
//   dC_t      = sum_{s<=t} dCB[t][s] B_s + exp(cum_t) S_in^T dy_t    dC  = dCB B + ...
//   dB_s      = sum_{t>=s} dCB[t][s] C_t + exp(cum_last - cum_s) dt_s dS^T x_s
//                                                                     dB  = dCB^T C + ...
//   dS_in     = exp(cum_last) dS + sum_t exp(cum_t) dy_t C_t^T        dS_in = ... + dY^T C_in
//   dt_s (explicit factor dt_s, not through cum):
//             = sum_{t>=s} dW[t][s] E[t][s] CB[t][s] + exp(cum_last - cum_s) x_s^T dS B_s
//   dcum: a factor exp(cum_u - cum_v) in a term whose (upstream gradient x value) is G sends
//         +G to dcum_u and -G to dcum_v (d exp(z)/dz = exp(z)); a factor exp(cum_t) sends G
//         to dcum_t alone.
//   cum_t = sum_{k<=t} dt_k A  =>  da_k = sum_{t>=k} dcum_t;  ddt_k += A da_k;  dA += dt_k da_k.
// Finally ddt_raw = ddt softplus'(dt_raw + dt_bias), ddt_bias = sum ddt_raw, dA_log = dA A.
// B and C belong to the group: dB and dC sum these over its heads, and since CB is shared,
// the heads' dCB are summed first and multiplied by B and C once per group.
template <class T>
void ssd_bwd(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt, const T* dt_bias,
             const T* A_log, const T* D, const T* initial_state, const T* dy,
             const T* dfinal_state, T* dxBC, T* ddt, int64_t ld_ddt, T* d_dt_bias, T* dA_log,
             T* dD, T* d_initial_state, const int32_t* reset) {
  check_dims(d);
  const Layout lay(d);
  const int64_t P = lay.P, N = lay.N, PN = P * N, hpg = lay.heads_per_group;
  const int64_t max_len = std::min(d.chunk, d.seqlen);
  const int64_t nchunks = d.nchunks();
  const int64_t BH = d.batch * d.nheads;

  // The three per-head parameter gradients of each (batch, head), reduced over the batch below.
  std::vector<T> dD_bh(BH), dA_log_bh(BH), d_dt_bias_bh(BH);

#pragma omp parallel
  {
    GroupChunk<T> gc(max_len, N);
    HeadChunk<T> hc(max_len, P, N);
    std::vector<T> states_in(hpg * nchunks * PN);  // [head of group, chunk, P, N]
    std::vector<T> dS(hpg * PN), dS_in(PN);        // dS: [head of group, P, N]
    std::vector<T> E(max_len * max_len), W(max_len * max_len), dW(max_len * max_len);
    std::vector<T> dCB(max_len * max_len);         // summed over the heads of the group
    std::vector<T> dY(max_len * P), dX(max_len * P), dB(max_len * N), dC(max_len * N);
    std::vector<T> G(max_len * N), dSx(max_len * N);
    std::vector<T> dcum(max_len), ddt_explicit(max_len);
    std::vector<T> dD_sum(hpg), dA_sum(hpg), d_dt_bias_sum(hpg);  // per head of the group

#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < d.batch; ++b) {
      for (int64_t g = 0; g < d.ngroups; ++g) {
        const int64_t h0 = g * hpg;
        const int64_t states_off = (b * d.nheads + h0) * PN;
        auto S_in_of = [&](int64_t hh, int64_t c) { return &states_in[(hh * nchunks + c) * PN]; };

        // Forward over chunks only to recover the state entering each chunk (carried in dS,
        // which is not needed yet).
        for (int64_t hh = 0; hh < hpg; ++hh)
          for (int64_t i = 0; i < PN; ++i)
            S_in_of(hh, 0)[i] = dS[hh * PN + i] =
                initial_state ? initial_state[states_off + hh * PN + i] : T(0);
        pass_states(d, lay, xBC, dt, ld_dt, dt_bias, A_log, reset, b, g, nchunks - 1, gc, hc,
                    dS.data(), [&](int64_t c) {
                      for (int64_t hh = 0; hh < hpg; ++hh)
                        std::copy_n(&dS[hh * PN], PN, S_in_of(hh, c + 1));
                    });

        for (int64_t i = 0; i < hpg * PN; ++i)
          dS[i] = dfinal_state ? dfinal_state[states_off + i] : T(0);
        std::fill(dD_sum.begin(), dD_sum.end(), T(0));
        std::fill(dA_sum.begin(), dA_sum.end(), T(0));
        std::fill(d_dt_bias_sum.begin(), d_dt_bias_sum.end(), T(0));

        for (int64_t c = nchunks - 1; c >= 0; --c) {
          const int64_t t0 = c * d.chunk, tok0 = b * d.seqlen + t0;
          gc.load(lay, xBC, g, tok0, std::min(d.chunk, d.seqlen - t0), /*with_CB=*/true,
                  reset ? reset + tok0 : nullptr);
          const int64_t L = gc.len;
          const T* CB = gc.CB.data();
          std::fill_n(dCB.begin(), L * L, T(0));
          std::fill_n(dB.begin(), L * N, T(0));
          std::fill_n(dC.begin(), L * N, T(0));

          for (int64_t hh = 0; hh < hpg; ++hh) {
            const int64_t h = h0 + hh;
            const T A = -std::exp(A_log[h]);
            hc.load(lay, gc, xBC, dt, ld_dt, dt_bias[h], A, h, tok0);
            const T* x = hc.x.data();
            const T* S_in = S_in_of(hh, c);
            T* dS_h = &dS[hh * PN];
            for (int64_t t = 0; t < L; ++t)
              std::copy_n(dy + (tok0 + t) * lay.d_inner + lay.x_col(h), P, &dY[t * P]);
            std::fill_n(dcum.begin(), L, T(0));
            std::fill_n(ddt_explicit.begin(), L, T(0));

            // ---- intra-chunk (quadratic) part ----
            gemm(false, true, L, L, P, T(1), dY.data(), P, x, P, T(0), dW.data(), L);  // dY x^T
            decay_matrix(hc, E.data());
            decay_mask(hc, E.data(), CB, W.data());
            for (int64_t t = 0; t < L; ++t) {
              for (int64_t s = 0; s <= t; ++s) {
                const int64_t i = t * L + s;
                dCB[i] += dW[i] * E[i] * hc.dt[s];
                ddt_explicit[s] += dW[i] * E[i] * CB[i];
                dW[i] *= W[i];  // now the gradient reaching the factor exp(cum_t - cum_s)
              }
              // ... which sends +dW[t][s] to dcum_t, -dW[t][s] to dcum_s (not on the diagonal:
              // E = 1 there, no cum in it)
              for (int64_t s = 0; s < t; ++s) dcum[t] += dW[t * L + s];
              for (int64_t s = 0; s < t; ++s) dcum[s] -= dW[t * L + s];
            }
            for (int64_t i = 0; i < L * P; ++i) dX[i] = D[h] * dY[i];
            gemm(true, false, L, P, L, T(1), W.data(), L, dY.data(), P, T(1), dX.data(), P);

            // ---- the state entering the chunk: y_t += exp(cum_t) S_in C_t ----
            // G_t = S_in^T dy_t: dC_t += exp(cum_t) G_t, and dy_t . (S_in C_t) = G_t . C_t.
            gemm(false, false, L, N, P, T(1), dY.data(), P, S_in, N, T(0), G.data(), N);
            for (int64_t t = 0; t < L; ++t) {
              for (int64_t n = 0; n < N; ++n) dC[t * N + n] += hc.decay_in[t] * G[t * N + n];
              dcum[t] += dot(&G[t * N], &hc.C_in[t * N], N);
            }
            // dS_in = exp(cum_last) dS + dY^T C_in
            std::copy_n(dS_h, PN, dS_in.data());
            gemm(true, false, P, N, L, T(1), dY.data(), P, hc.C_in.data(), N, hc.decay_all(),
                 dS_in.data(), N);

            // ---- the state leaving the chunk ----
            // through exp(cum_last) S_in
            dcum[L - 1] += hc.decay_all() * dot(dS_h, S_in, PN);
            // through x_s B_out_s^T: dX += B_out dS^T, dB_s += exp(cum_last - cum_s) dt_s dS^T x_s
            gemm(false, true, L, P, N, T(1), hc.B_out.data(), N, dS_h, N, T(1), dX.data(), P);
            gemm(false, false, L, N, P, T(1), x, P, dS_h, N, T(0), dSx.data(), N);  // dS^T x_s
            for (int64_t s = 0; s < L; ++s) {
              const T coef = hc.decay_out[s] * hc.dt[s];
              for (int64_t n = 0; n < N; ++n) dB[s * N + n] += coef * dSx[s * N + n];
              // d(term)/d(dt_s) = exp(cum_last - cum_s) x_s^T dS B_s
              const T xSB = hc.decay_out[s] * dot(&dSx[s * N], &gc.B[s * N], N);
              ddt_explicit[s] += xSB;
              dcum[L - 1] += xSB * hc.dt[s];
              dcum[s] -= xSB * hc.dt[s];
            }

            // ---- through the cumulative sum, the softplus, and out ----
            T da = 0;  // dL/da_s = sum_{t>=s} dcum_t, accumulated backwards
            for (int64_t s = L - 1; s >= 0; --s) {
              da += dcum[s];
              const T ddt_s = ddt_explicit[s] + da * A;
              dA_sum[hh] += da * hc.dt[s];
              const T ddt_raw = ddt_s * softplus_grad(hc.dt_in[s]);
              ddt[(tok0 + s) * ld_ddt + h] = ddt_raw;
              d_dt_bias_sum[hh] += ddt_raw;
            }
            dD_sum[hh] += dot(dY.data(), x, L * P);
            for (int64_t t = 0; t < L; ++t)
              std::copy_n(&dX[t * P], P, dxBC + (tok0 + t) * lay.conv_dim + lay.x_col(h));
            std::copy_n(dS_in.data(), PN, dS_h);  // dL/dstate_out of the previous chunk
          }

          // The intra-chunk part of dB and dC, for all heads of the group at once.
          gemm(false, false, L, N, L, T(1), dCB.data(), L, gc.B.data(), N, T(1), dC.data(), N);
          gemm(true, false, L, N, L, T(1), dCB.data(), L, gc.C.data(), N, T(1), dB.data(), N);
          for (int64_t t = 0; t < L; ++t) {
            T* row = dxBC + (tok0 + t) * lay.conv_dim;
            std::copy_n(&dB[t * N], N, row + lay.B_col(g));
            std::copy_n(&dC[t * N], N, row + lay.C_col(g));
          }
        }
        if (d_initial_state) std::copy_n(dS.data(), hpg * PN, d_initial_state + states_off);
        for (int64_t hh = 0; hh < hpg; ++hh) {
          const int64_t h = h0 + hh, bh = b * d.nheads + h;
          dD_bh[bh] = dD_sum[hh];
          dA_log_bh[bh] = dA_sum[hh] * -std::exp(A_log[h]);  // dA/dA_log = A
          d_dt_bias_bh[bh] = d_dt_bias_sum[hh];
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

// ---- context parallelism's all-gather combine (Backend::ssd_final_state, ssd_dinitial,
// ssd_segment_decay, cp_state_scan) ----
// A segment's final state is linear in the state entering it: final = g * initial + S, with S
// its final state from a zero start and g (per batch and head) the product of its chunks'
// decays. The pieces below give S, g, and the gradient reaching the entering state through the
// segment's own outputs, each for less than a full pass.

// The frame of both cheap passes: for every (sequence, group) in parallel, the group's heads'
// states (adjacent in `states`, [hpg, P, N]) start as `start`'s (zeros without it), then
// body(b, g, group_states, gc, hc, scratch) runs with the thread's chunk buffers and `scratch`
// (scratch_len values of its own).
template <class T, class Body>
void per_group_states(const SsdDims& d, const T* start, T* states, int64_t scratch_len,
                      Body&& body) {
  check_dims(d);
  const Layout lay(d);
  const int64_t PN = lay.P * lay.N, hpg = lay.heads_per_group;
  const int64_t max_len = std::min(d.chunk, d.seqlen);
#pragma omp parallel
  {
    GroupChunk<T> gc(max_len, lay.N);
    HeadChunk<T> hc(max_len, lay.P, lay.N);
    std::vector<T> scratch(scratch_len);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < d.batch; ++b) {
      for (int64_t g = 0; g < d.ngroups; ++g) {
        const int64_t off = (b * d.nheads + g * hpg) * PN;
        T* st = states + off;
        for (int64_t i = 0; i < hpg * PN; ++i) st[i] = start ? start[off + i] : T(0);
        body(lay, b, g, st, gc, hc, scratch);
      }
    }
  }
}

template <class T>
void ssd_final_state(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt,
                     const T* dt_bias, const T* A_log, const T* initial_state, T* final_state,
                     const int32_t* reset) {
  per_group_states<T>(d, initial_state, final_state, 0,
                      [&](const Layout& lay, int64_t b, int64_t g, T* states, GroupChunk<T>& gc,
                          HeadChunk<T>& hc, std::vector<T>&) {
                        pass_states(d, lay, xBC, dt, ld_dt, dt_bias, A_log, reset, b, g,
                                    d.nchunks(), gc, hc, states, [](int64_t) {});
                      });
}

// dS_in = exp(cum_last) dS_out + dY^T C_in per chunk, from the last: ssd_bwd's recursion for
// the state gradient (the same GEMM), without the other gradients.
template <class T>
void ssd_dinitial(const SsdDims& d, const T* xBC, const T* dt, int64_t ld_dt, const T* dt_bias,
                  const T* A_log, const T* dy, const T* dfinal_state, T* d_initial_state,
                  const int32_t* reset) {
  per_group_states<T>(
      d, dfinal_state, d_initial_state, std::min(d.chunk, d.seqlen) * d.headdim,
      [&](const Layout& lay, int64_t b, int64_t g, T* dS, GroupChunk<T>& gc, HeadChunk<T>& hc,
          std::vector<T>& dY) {
        const int64_t P = lay.P, N = lay.N, PN = P * N, hpg = lay.heads_per_group;
        for (int64_t c = d.nchunks() - 1; c >= 0; --c) {
          const int64_t t0 = c * d.chunk, tok0 = b * d.seqlen + t0;
          gc.load(lay, xBC, g, tok0, std::min(d.chunk, d.seqlen - t0), /*with_CB=*/false,
                  reset ? reset + tok0 : nullptr);
          const int64_t L = gc.len;
          for (int64_t hh = 0; hh < hpg; ++hh) {
            const int64_t h = g * hpg + hh;
            hc.load(lay, gc, xBC, dt, ld_dt, dt_bias[h], -std::exp(A_log[h]), h, tok0);
            for (int64_t t = 0; t < L; ++t)
              std::copy_n(dy + (tok0 + t) * lay.d_inner + lay.x_col(h), P, &dY[t * P]);
            gemm(true, false, P, N, L, T(1), dY.data(), P, hc.C_in.data(), N, hc.decay_all(),
                 dS + hh * PN, N);
          }
        }
      });
}

// g = the product of the chunks' decay(cum_last), as advance_state applies them (decay()'s
// cut-off included), and 0 when a token of the sequence begins a document (the chunk holding
// it passes no state on).
template <class T>
void ssd_segment_decay(const SsdDims& d, const T* dt, int64_t ld_dt, const T* dt_bias,
                       const T* A_log, T* decay_out, const int32_t* reset) {
  check_dims(d);
  const int64_t max_len = std::min(d.chunk, d.seqlen);
#pragma omp parallel
  {
    std::vector<T> dt_in(max_len), dts(max_len), cum(max_len);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < d.batch; ++b) {
      for (int64_t h = 0; h < d.nheads; ++h) {
        bool any_reset = false;
        for (int64_t t = 0; reset && t < d.seqlen; ++t) any_reset |= reset[b * d.seqlen + t] != 0;
        T g = any_reset ? T(0) : T(1);
        for (int64_t t0 = 0; t0 < d.seqlen && g != T(0); t0 += d.chunk) {
          const int64_t len = std::min(d.chunk, d.seqlen - t0);
          chunk_dt(dt, ld_dt, dt_bias[h], -std::exp(A_log[h]), h, b * d.seqlen + t0, len,
                   dt_in.data(), dts.data(), cum.data());
          g *= decay(cum[len - 1]);
        }
        decay_out[b * d.nheads + h] = g;
      }
    }
  }
}

template <class T>
void cp_state_scan(int64_t n, int64_t BH, int64_t PN, const T* summaries, int64_t k,
                   bool reverse, T* out) {
  SSD_CHECK(k >= 0 && k < n, "cp_state_scan: segment ", k, " of ", n);
  const int64_t row = BH * PN + BH;  // one segment's S, then its g
  std::fill_n(out, BH * PN, T(0));
  auto step = [&](int64_t j) {  // out = g_j out + S_j
    const T* S = summaries + j * row;
    const T* g = S + BH * PN;
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int64_t e = 0; e < PN; ++e) out[bh * PN + e] = g[bh] * out[bh * PN + e] + S[bh * PN + e];
  };
  if (reverse)
    for (int64_t j = n - 1; j > k; --j) step(j);
  else
    for (int64_t j = 0; j < k; ++j) step(j);
}

template void ssd_fwd<float>(const SsdDims&, const float*, const float*, int64_t, const float*,
                             const float*, const float*, const float*, float*, float*,
                             const int32_t*);
template void ssd_fwd<double>(const SsdDims&, const double*, const double*, int64_t,
                              const double*, const double*, const double*, const double*,
                              double*, double*, const int32_t*);
template void ssd_bwd<float>(const SsdDims&, const float*, const float*, int64_t, const float*,
                             const float*, const float*, const float*, const float*,
                             const float*, float*, float*, int64_t, float*, float*, float*,
                             float*, const int32_t*);
template void ssd_bwd<double>(const SsdDims&, const double*, const double*, int64_t,
                              const double*, const double*, const double*, const double*,
                              const double*, const double*, double*, double*, int64_t, double*,
                              double*, double*, double*, const int32_t*);

#define SSD_CP_INSTANTIATE(T)                                                                    \
  template void ssd_final_state<T>(const SsdDims&, const T*, const T*, int64_t, const T*,       \
                                   const T*, const T*, T*, const int32_t*);                     \
  template void ssd_dinitial<T>(const SsdDims&, const T*, const T*, int64_t, const T*,          \
                                const T*, const T*, const T*, T*, const int32_t*);              \
  template void ssd_segment_decay<T>(const SsdDims&, const T*, int64_t, const T*, const T*, T*, \
                                     const int32_t*);                                           \
  template void cp_state_scan<T>(int64_t, int64_t, int64_t, const T*, int64_t, bool, T*);
SSD_CP_INSTANTIATE(float)
SSD_CP_INSTANTIATE(double)
#undef SSD_CP_INSTANTIATE
}  // namespace ssd::cpu
