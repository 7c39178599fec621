// SSD step 1: dt = softplus(dt_raw + dt_bias) (0 past seqlen) and, per chunk, the inclusive
// cumulative sum of dt * A (A = -exp(A_log)). One block of `chunk` threads per (chunk, head, b).
#include "ssd_common.cuh"

namespace ssd::cuda::detail {

__global__ void chunk_cumsum_kernel(const bf16* __restrict__ dt_raw, int64_t ld_dt,
                                    const float* __restrict__ dt_bias,
                                    const float* __restrict__ A_log, int L, int H, int nc, int Q,
                                    float* __restrict__ dt_out, float* __restrict__ cs_out) {
  __shared__ float sh[32];
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, t = threadIdx.x;
  const int pos = c * Q + t;
  float dtv = 0.f;
  if (pos < L) {
    const float z = __bfloat162float(dt_raw[(static_cast<int64_t>(b) * L + pos) * ld_dt + h]) +
                    dt_bias[h];
    dtv = softplus_f(z);
  }
  const float A = -expf(A_log[h]);
  const float v = block_incl_scan(dtv * A, sh);
  const int64_t idx = ((static_cast<int64_t>(b) * H + h) * nc + c) * Q + t;
  dt_out[idx] = dtv;
  cs_out[idx] = v;
}

void launch_chunk_cumsum(const SsdDims& d, const bf16* dt_raw, int64_t ld_dt,
                         const float* dt_bias, const float* A_log, float* dt, float* cs,
                         cudaStream_t st) {
  const int nc = static_cast<int>(d.nchunks());
  dim3 grid(nc, static_cast<unsigned>(d.nheads), static_cast<unsigned>(d.batch));
  chunk_cumsum_kernel<<<grid, static_cast<unsigned>(d.chunk), 0, st>>>(
      dt_raw, ld_dt, dt_bias, A_log, static_cast<int>(d.seqlen), static_cast<int>(d.nheads), nc,
      static_cast<int>(d.chunk), dt, cs);
  check_launch("ssd chunk_cumsum");
}

}  // namespace ssd::cuda::detail
