// SSD backward of step 1. Per chunk: da_s = sum_{t >= s} dcs_t (reverse cumsum),
//   ddt_s = ddt_dir_s + A da_s,   ddt_raw_s = ddt_s * sigmoid(dt_raw_s + dt_bias)  (1 past 20),
//   d_dt_bias += sum ddt_raw,     dA_log += A * sum_s dt_s da_s.
#include "ssd_common.cuh"

namespace ssd::cuda::detail {

__global__ void dt_bwd_kernel(const bf16* __restrict__ dt_raw, int64_t ld_dt,
                              const float* __restrict__ dt_bias, const float* __restrict__ A_log,
                              const float* __restrict__ dt, const float* __restrict__ dcs,
                              const float* __restrict__ ddt_dir, bf16* __restrict__ ddt,
                              int64_t ld_ddt, float* __restrict__ d_dt_bias,
                              float* __restrict__ dA_log, int L, int H, int nc, int Q) {
  __shared__ float sh[32];
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int s = Q - 1 - static_cast<int>(threadIdx.x);  // reversed, so the prefix sum runs backwards
  const int64_t idx = ((static_cast<int64_t>(b) * H + h) * nc + c) * Q + s;
  const float da = block_incl_scan(dcs[idx], sh);
  const float A = -expf(A_log[h]);
  const int pos = c * Q + s;
  float gb = 0.f, ga = 0.f;
  if (pos < L) {
    const int64_t row = static_cast<int64_t>(b) * L + pos;
    const float z = __bfloat162float(dt_raw[row * ld_dt + h]) + dt_bias[h];
    const float sig = z > 20.f ? 1.f : 1.f / (1.f + expf(-z));
    const float g = (ddt_dir[idx] + A * da) * sig;
    ddt[row * ld_ddt + h] = __float2bfloat16(g);
    gb = g;
    ga = dt[idx] * da;
  }
  gb = warp_sum(gb);
  ga = warp_sum(ga);
  if ((threadIdx.x & 31) == 0) {
    if (gb != 0.f) atomicAdd(d_dt_bias + h, gb);
    if (ga != 0.f) atomicAdd(dA_log + h, ga * A);
  }
}

void launch_dt_bwd(const SsdDims& d, const bf16* dt_raw, int64_t ld_dt, const float* dt_bias,
                   const float* A_log, const float* dt, const float* dcs, const float* ddt_dir,
                   bf16* ddt, int64_t ld_ddt, float* d_dt_bias, float* dA_log,
                   cudaStream_t st) {
  const int nc = static_cast<int>(d.nchunks());
  dim3 grid(nc, static_cast<unsigned>(d.nheads), static_cast<unsigned>(d.batch));
  dt_bwd_kernel<<<grid, static_cast<unsigned>(d.chunk), 0, st>>>(
      dt_raw, ld_dt, dt_bias, A_log, dt, dcs, ddt_dir, ddt, ld_ddt, d_dt_bias, dA_log,
      static_cast<int>(d.seqlen), static_cast<int>(d.nheads), nc, static_cast<int>(d.chunk));
  check_launch("ssd dt_bwd");
}

}  // namespace ssd::cuda::detail
