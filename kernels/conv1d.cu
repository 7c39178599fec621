// Causal depthwise conv1d over time + SiLU, forward and backward.
#include <type_traits>

#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

constexpr int kCols = 128;    // columns per block (one thread each)
constexpr int kRows = 64;     // tokens per block
constexpr int kFwdBatch = 8;  // rows whose loads are issued together
constexpr int kBwdBatch = 4;

// Block (column tile, row chunk); each thread walks its column down the chunk with the last K
// inputs in registers, so every input is read once (plus K-1 rows of halo per chunk).
// Positions inside the sequence are tracked incrementally (no per-element division).
template <int KT>  // KT > 0: the kernel width at compile time; 0: runtime K (<= kMaxConvWidth)
__global__ void __launch_bounds__(kCols)
    conv1d_silu_fwd_k(const bf16* __restrict__ in, int64_t ld_in, int64_t ntok, int64_t seqlen,
                      int64_t C, const float* __restrict__ w, const float* __restrict__ bias,
                      int K_rt, bf16* __restrict__ out) {
  constexpr int NK = KT > 0 ? KT : kMaxConvWidth;  // register array sizes / unroll bounds
  const int K = KT > 0 ? KT : K_rt;
  const int64_t c = blockIdx.x * (int64_t)kCols + threadIdx.x;
  const int64_t r0 = blockIdx.y * (int64_t)kRows;
  if (c >= C) return;
  float wk[NK], win[NK];  // win[k]: input at time t - (K-1) + k
  int64_t pos = r0 % seqlen;
#pragma unroll
  for (int k = 0; k < NK; ++k) {
    wk[k] = k < K ? w[c * K + k] : 0.f;
    // halo: win[k] for k < K-1 holds time r0 - (K-1) + k, if inside the same sequence
    const int64_t back = K - 1 - k;
    win[k] = (k < K - 1 && pos >= back) ? to_f(in[(r0 - back) * ld_in + c]) : 0.f;
  }
  const float b = bias[c];
  const int64_t r1 = min(r0 + kRows, ntok);
  for (int64_t rb = r0; rb < r1; rb += kFwdBatch) {
    float xs[kFwdBatch];  // the batch's loads are issued together (latency hiding)
#pragma unroll
    for (int i = 0; i < kFwdBatch; ++i) xs[i] = rb + i < r1 ? to_f(in[(rb + i) * ld_in + c]) : 0.f;
#pragma unroll
    for (int i = 0; i < kFwdBatch; ++i) {
      const int64_t r = rb + i;
      if (r >= r1) break;
      if (pos == seqlen) pos = 0;
      if (pos == 0) {
#pragma unroll
        for (int k = 0; k < NK; ++k) win[k] = 0.f;
      }
      const float x = xs[i];
      float a = b;
#pragma unroll
      for (int k = 0; k < NK; ++k) {
        if (k < K - 1) a += wk[k] * win[k];
      }
#pragma unroll
      for (int k = 0; k < NK; ++k)
        if (k == K - 1) a += wk[k] * x;
      out[r * C + c] = from_f<bf16>(a * sigmoidf_(a));
      // shift the window: win[k] <- win[k+1], win[K-2] <- x
#pragma unroll
      for (int k = 0; k < NK - 1; ++k)
        if (k < K - 1) win[k] = (k == K - 2) ? x : win[k + 1];
      ++pos;
    }
  }
}

// Backward, same tiling. Walking rows u = r0 .. r0+kRows+K-2 with the input window:
// dA[u] = dout * silu'(pre) goes to shared memory (own column only: no barrier needed), and for
// the chunk's own rows dw[k] += dA[u] * in[u-K+1+k], dbias += dA[u]. Then din[r] =
// sum_j w[K-1-j] * dA[r+j] over taps inside r's sequence, read back from shared memory.
template <int KT>
__global__ void __launch_bounds__(kCols)
    conv1d_silu_bwd_k(const bf16* __restrict__ in, int64_t ld_in, int64_t ntok, int64_t seqlen,
                      int64_t C, const float* __restrict__ w, const float* __restrict__ bias,
                      int K_rt, const bf16* __restrict__ dout, bf16* __restrict__ din,
                      int64_t ld_din, float* __restrict__ part_w, float* __restrict__ part_b) {
  constexpr int NK = KT > 0 ? KT : kMaxConvWidth;  // register array sizes / unroll bounds
  __shared__ float dA[kRows + NK - 1][kCols];
  const int K = KT > 0 ? KT : K_rt;
  const int64_t c = blockIdx.x * (int64_t)kCols + threadIdx.x;
  const int64_t r0 = blockIdx.y * (int64_t)kRows;
  if (c >= C) return;
  float wk[NK], wr[NK], win[NK];
  const int64_t pos0 = r0 % seqlen;
#pragma unroll
  for (int k = 0; k < NK; ++k) {
    wk[k] = k < K ? w[c * K + k] : 0.f;
    wr[k] = k < K ? w[c * K + K - 1 - k] : 0.f;
    const int64_t back = K - 1 - k;
    win[k] = (k < K - 1 && pos0 >= back) ? to_f(in[(r0 - back) * ld_in + c]) : 0.f;
  }
  const float b = bias[c];
  float accw[NK];
#pragma unroll
  for (int k = 0; k < NK; ++k) accw[k] = 0.f;
  float accb = 0.f;

  const int nu = kRows + K - 1;
  int64_t pos = pos0;
  for (int ub = 0; ub < nu; ub += kBwdBatch) {
    float xs[kBwdBatch], ds[kBwdBatch];  // the batch's loads are issued together
#pragma unroll
    for (int i = 0; i < kBwdBatch; ++i) {
      const int64_t u = r0 + ub + i;
      const bool ok = ub + i < nu && u < ntok;
      xs[i] = ok ? to_f(in[u * ld_in + c]) : 0.f;
      ds[i] = ok ? to_f(dout[u * C + c]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kBwdBatch; ++i) {
      const int u_loc = ub + i;
      if (u_loc >= nu) break;
      const int64_t u = r0 + u_loc;
      if (u >= ntok) {
        dA[u_loc][threadIdx.x] = 0.f;
        continue;
      }
      if (pos == seqlen) pos = 0;
      if (pos == 0) {
#pragma unroll
        for (int k = 0; k < NK; ++k) win[k] = 0.f;
      }
      const float x = xs[i];
      float a = b;
#pragma unroll
      for (int k = 0; k < NK; ++k)
        if (k < K - 1) a += wk[k] * win[k];
#pragma unroll
      for (int k = 0; k < NK; ++k)
        if (k == K - 1) a += wk[k] * x;
      const float s = sigmoidf_(a);
      const float g = ds[i] * s * (1.f + a * (1.f - s));
      dA[u_loc][threadIdx.x] = g;
      if (u_loc < kRows) {
        accb += g;
#pragma unroll
        for (int k = 0; k < NK; ++k) accw[k] += g * (k == K - 1 ? x : win[k]);
      }
#pragma unroll
      for (int k = 0; k < NK - 1; ++k)
        if (k < K - 1) win[k] = (k == K - 2) ? x : win[k + 1];
      ++pos;
    }
  }

  pos = pos0;
  const int64_t r1 = min(r0 + kRows, ntok);
  for (int64_t r = r0; r < r1; ++r) {
    if (pos == seqlen) pos = 0;
    const int r_loc = static_cast<int>(r - r0);
    float d = 0.f;
#pragma unroll
    for (int j = 0; j < NK; ++j)
      if (j < K && pos + j < seqlen) d += wr[j] * dA[r_loc + j][threadIdx.x];
    din[r * ld_din + c] = from_f<bf16>(d);
    ++pos;
  }
  float* pw = part_w + blockIdx.y * C * K;
#pragma unroll
  for (int k = 0; k < NK; ++k)
    if (k < K) pw[c * K + k] = accw[k];
  part_b[blockIdx.y * C + c] = accb;
}

// Calls f(std::integral_constant<int, K>) for the widths compiled specially (2, 3, 4: the
// unrolled kernels), f(integral_constant<int, 0>) for the runtime-width kernel otherwise.
template <class F>
void with_width(int K, F&& f) {
  switch (K) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

}  // namespace

void conv1d_silu_fwd(const bf16* in, int64_t ld_in, int64_t batch, int64_t seqlen, int64_t C,
                     const float* w, const float* bias, int K, bf16* out, cudaStream_t stream) {
  const int64_t ntok = batch * seqlen;
  if (ntok <= 0 || C <= 0) return;
  if (K < 1 || K > kMaxConvWidth)
    fail("cuda conv1d: kernel width ", K, " not in [1, ", kMaxConvWidth, "]");
  const int64_t chunks = (ntok + kRows - 1) / kRows;
  if (chunks > 65535) fail("cuda conv1d_silu_fwd: too many tokens (", ntok, ")");
  dim3 grid(static_cast<unsigned>((C + kCols - 1) / kCols), static_cast<unsigned>(chunks));
  auto go = [&](auto kernel) {
    kernel<<<grid, kCols, 0, stream>>>(in, ld_in, ntok, seqlen, C, w, bias, K, out);
  };
  with_width(K, [&](auto kt) { go(conv1d_silu_fwd_k<decltype(kt)::value>); });
  check_launch("conv1d_silu_fwd");
}

size_t conv1d_silu_bwd_workspace_bytes(int64_t ntok, int64_t C, int K) {
  const int64_t chunks = std::max<int64_t>((ntok + kRows - 1) / kRows, 1);
  return static_cast<size_t>(chunks * C * (K + 1)) * sizeof(float);
}

void conv1d_silu_bwd(const bf16* in, int64_t ld_in, int64_t batch, int64_t seqlen, int64_t C,
                     const float* w, const float* bias, int K, const bf16* dout, bf16* din,
                     int64_t ld_din, float* dw, float* dbias, void* ws, cudaStream_t stream) {
  const int64_t ntok = batch * seqlen;
  if (ntok <= 0 || C <= 0) return;
  if (K < 1 || K > kMaxConvWidth)
    fail("cuda conv1d: kernel width ", K, " not in [1, ", kMaxConvWidth, "]");
  const int64_t chunks = (ntok + kRows - 1) / kRows;
  if (chunks > 65535) fail("cuda conv1d_silu_bwd: too many tokens (", ntok, ")");
  float* part_w = static_cast<float*>(ws);
  float* part_b = part_w + chunks * C * K;
  dim3 grid(static_cast<unsigned>((C + kCols - 1) / kCols), static_cast<unsigned>(chunks));
  auto go = [&](auto kernel) {
    kernel<<<grid, kCols, 0, stream>>>(in, ld_in, ntok, seqlen, C, w, bias, K, dout, din, ld_din,
                                       part_w, part_b);
  };
  with_width(K, [&](auto kt) { go(conv1d_silu_bwd_k<decltype(kt)::value>); });
  check_launch("conv1d_silu_bwd");
  column_sum_accumulate(part_w, static_cast<int>(chunks), C * K, dw, stream);
  column_sum_accumulate(part_b, static_cast<int>(chunks), C, dbias, stream);
}

}  // namespace ssd::cuda
