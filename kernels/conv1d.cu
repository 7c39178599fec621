// Causal depthwise conv1d over time + SiLU, forward and backward.
#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

constexpr int kCols = 64;  // columns per block in the backward pass
constexpr int kRows = 64;  // rows (tokens) per block in the backward pass

__global__ void conv1d_silu_fwd_k(const bf16* __restrict__ in, int64_t ld_in, int64_t ntok,
                                  int64_t seqlen, int64_t C, const float* __restrict__ w,
                                  const float* __restrict__ bias, int K,
                                  bf16* __restrict__ out) {
  const int64_t n = ntok * C;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / C, c = i - t * C;
    const int64_t pos = t % seqlen;
    float a = bias[c];
    for (int k = 0; k < K; ++k) {
      const int64_t back = K - 1 - k;
      if (pos >= back) a += w[c * K + k] * to_f(in[(t - back) * ld_in + c]);
    }
    out[i] = from_f<bf16>(a * sigmoidf_(a));
  }
}

// Block (column tile, row chunk). Phase 1: dA = dout * silu'(a) for the chunk's rows plus K-1
// rows of look-ahead, into shared memory (each thread one column; no cross-thread traffic).
// Phase 2: din for the chunk's rows, and the chunk's partial dw / dbias.
__global__ void conv1d_silu_bwd_k(const bf16* __restrict__ in, int64_t ld_in, int64_t ntok,
                                  int64_t seqlen, int64_t C, const float* __restrict__ w,
                                  const float* __restrict__ bias, int K,
                                  const bf16* __restrict__ dout, bf16* __restrict__ din,
                                  int64_t ld_din, float* __restrict__ part_w,
                                  float* __restrict__ part_b) {
  __shared__ float dA[kRows + kMaxConvWidth - 1][kCols];
  const int64_t c = blockIdx.x * (int64_t)kCols + threadIdx.x;
  const int64_t r0 = blockIdx.y * (int64_t)kRows;
  if (c >= C) return;  // threads only ever touch their own column: no barrier needed
  float wk[kMaxConvWidth], wr[kMaxConvWidth];  // weights, and reversed
#pragma unroll
  for (int k = 0; k < kMaxConvWidth; ++k) {
    wk[k] = k < K ? w[c * K + k] : 0.f;
    wr[k] = k < K ? w[c * K + K - 1 - k] : 0.f;
  }
  const float b = bias[c];

  for (int u_loc = 0; u_loc < kRows + K - 1; ++u_loc) {
    const int64_t u = r0 + u_loc;
    float g = 0.f;
    if (u < ntok) {
      const int64_t pos = u % seqlen;
      float a = b;
#pragma unroll
      for (int k = 0; k < kMaxConvWidth; ++k) {
        const int64_t back = K - 1 - k;
        if (k < K && pos >= back) a += wk[k] * to_f(in[(u - back) * ld_in + c]);
      }
      const float s = sigmoidf_(a);
      g = to_f(dout[u * C + c]) * s * (1.f + a * (1.f - s));
    }
    dA[u_loc][threadIdx.x] = g;
  }

  float accw[kMaxConvWidth];
#pragma unroll
  for (int k = 0; k < kMaxConvWidth; ++k) accw[k] = 0.f;
  float accb = 0.f;
  for (int r_loc = 0; r_loc < kRows; ++r_loc) {
    const int64_t r = r0 + r_loc;
    if (r >= ntok) break;
    const int64_t pos = r % seqlen;
    float d = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxConvWidth; ++j)
      if (j < K && pos + j < seqlen) d += wr[j] * dA[r_loc + j][threadIdx.x];
    din[r * ld_din + c] = from_f<bf16>(d);
    const float g = dA[r_loc][threadIdx.x];
    accb += g;
#pragma unroll
    for (int k = 0; k < kMaxConvWidth; ++k) {
      const int64_t back = K - 1 - k;
      if (k < K && pos >= back) accw[k] += g * to_f(in[(r - back) * ld_in + c]);
    }
  }
  float* pw = part_w + blockIdx.y * C * K;
#pragma unroll
  for (int k = 0; k < kMaxConvWidth; ++k)
    if (k < K) pw[c * K + k] = accw[k];
  part_b[blockIdx.y * C + c] = accb;
}

}  // namespace

void conv1d_silu_fwd(const bf16* in, int64_t ld_in, int64_t batch, int64_t seqlen, int64_t C,
                     const float* w, const float* bias, int K, bf16* out, cudaStream_t stream) {
  const int64_t ntok = batch * seqlen;
  if (ntok <= 0 || C <= 0) return;
  if (K < 1 || K > kMaxConvWidth) fail("cuda conv1d: kernel width ", K, " not in [1, ", kMaxConvWidth, "]");
  conv1d_silu_fwd_k<<<grid_for(ntok * C, 256, 132 * 32), 256, 0, stream>>>(
      in, ld_in, ntok, seqlen, C, w, bias, K, out);
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
  if (K < 1 || K > kMaxConvWidth) fail("cuda conv1d: kernel width ", K, " not in [1, ", kMaxConvWidth, "]");
  const int64_t chunks = (ntok + kRows - 1) / kRows;
  if (chunks > 65535) fail("cuda conv1d_silu_bwd: too many tokens (", ntok, ")");
  float* part_w = static_cast<float*>(ws);
  float* part_b = part_w + chunks * C * K;
  dim3 grid(static_cast<unsigned>((C + kCols - 1) / kCols), static_cast<unsigned>(chunks));
  conv1d_silu_bwd_k<<<grid, kCols, 0, stream>>>(in, ld_in, ntok, seqlen, C, w, bias, K, dout,
                                                din, ld_din, part_w, part_b);
  check_launch("conv1d_silu_bwd");
  column_sum_accumulate(part_w, static_cast<int>(chunks), C * K, dw, stream);
  column_sum_accumulate(part_b, static_cast<int>(chunks), C, dbias, stream);
}

}  // namespace ssd::cuda
