// Context parallelism's all-gather combine (parallel.cp_combine=allgather): the two small
// kernels it adds to the SSD steps (ssd_combined.cu chains the rest from the existing ones).
//
// segment decay: g[b, h] = prod_c exp(cs[b, h, c, Q-1]), the factor state_passing carries the
// entering state through each chunk by, multiplied in the same order over the same fp32 values,
// so final = g * initial + (final from a zero start) holds as the SSD op computes it. A document
// start drops its chunk's cs by kResetLogDecay (chunk_cumsum), which makes that factor, and g,
// exactly 0. One thread per (batch, head); the loop is over chunks, a few reads each.
//
// state scan: one thread per state element (b, h, p, n), looping over the n summary rows
// (Backend::cp_state_scan): h = g_j h + S_j from row 0 up to row k-1 (forward), or
// h = S_j + g_j h from row n-1 down to row k+1 (reverse).
#include "ssd_common.cuh"

namespace ssd::cuda::detail {

__global__ void segment_decay_kernel(const float* __restrict__ cs, float* __restrict__ decay,
                                     int64_t BH, int nc, int Q) {
  const int64_t bh = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bh >= BH) return;
  float g = 1.f;
  for (int c = 0; c < nc; ++c) g *= expf(cs[(bh * nc + c) * Q + Q - 1]);
  decay[bh] = g;
}

void launch_segment_decay(const SsdDims& d, const float* cs, float* decay, cudaStream_t st) {
  const int64_t BH = d.batch * d.nheads;
  const unsigned blocks = static_cast<unsigned>((BH + 127) / 128);
  segment_decay_kernel<<<blocks, 128, 0, st>>>(cs, decay, BH, static_cast<int>(d.nchunks()),
                                               static_cast<int>(d.chunk));
  check_launch("ssd segment_decay");
}

__global__ void cp_state_scan_kernel(const float* __restrict__ sum, int64_t BH, int64_t PN,
                                     int n, int k, bool reverse, float* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= BH * PN) return;
  const int64_t row = BH * PN + BH, g_at = BH * PN + e / PN;
  float h = 0.f;
  if (reverse)
    for (int j = n - 1; j > k; --j) h = sum[j * row + e] + sum[j * row + g_at] * h;
  else
    for (int j = 0; j < k; ++j) h = sum[j * row + g_at] * h + sum[j * row + e];
  out[e] = h;
}

void launch_cp_state_scan(const SsdDims& d, const float* summaries, int n, int k, bool reverse,
                          float* out, cudaStream_t st) {
  const int64_t BH = d.batch * d.nheads, PN = d.headdim * d.dstate;
  const unsigned blocks = static_cast<unsigned>((BH * PN + 255) / 256);
  cp_state_scan_kernel<<<blocks, 256, 0, st>>>(summaries, BH, PN, n, k, reverse, out);
  check_launch("ssd cp_state_scan");
}

}  // namespace ssd::cuda::detail
