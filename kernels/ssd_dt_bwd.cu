// SSD backward of step 1. Per chunk: da_s = sum_{t >= s} dcs_t (reverse cumsum),
//   ddt_s = ddt_dir_s + A da_s,   ddt_raw_s = ddt_s * sigmoid(dt_raw_s + dt_bias)  (1 past 20),
//   d_dt_bias += sum ddt_raw,     dA_log += A * sum_s dt_s da_s.
// Deterministic: dcs_t and ddt_dir_s are the sums, in slice order, of the slices their
// producers stored (ssd_common.cuh); d_dt_bias and dA_log are stored per warp and summed per
// head, in a fixed order, by param_grad_reduce (which also sums dD's per-warp partials).
#include "ssd_common.cuh"

namespace ssd::cuda::detail {

__global__ void dt_bwd_kernel(const bf16* __restrict__ dt_raw, int64_t ld_dt,
                              const float* __restrict__ dt_bias, const float* __restrict__ A_log,
                              const float* __restrict__ dt, const float* __restrict__ dcs,
                              int ndcs, const float* __restrict__ dcs_last, int last_len,
                              const float* __restrict__ ddt_dir, int nddt, int64_t nq,
                              bf16* __restrict__ ddt, int64_t ld_ddt,
                              float* __restrict__ pg_dtb, float* __restrict__ pg_dA, int L,
                              int H, int nc, int Q) {
  __shared__ float sh[32];
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int s = Q - 1 - static_cast<int>(threadIdx.x);  // reversed, so the prefix sum runs backwards
  const int64_t bhc = (static_cast<int64_t>(b) * H + h) * nc + c;
  const int64_t idx = bhc * Q + s;
  // dL/d cs_s: the producers' slices in slice order; at s = Q-1 (thread 0) also the chunk's
  // dcs_last row, summed by warp 0 (lane-strided, then a fixed butterfly).
  float gcs = 0.f;
  for (int k = 0; k < ndcs; ++k) gcs += dcs[k * nq + idx];
  if (threadIdx.x < 32) {
    float e = 0.f;
    for (int j = static_cast<int>(threadIdx.x); j < last_len; j += 32)
      e += dcs_last[bhc * last_len + j];
    e = warp_sum(e);
    if (threadIdx.x == 0) gcs += e;
  }
  const float da = block_incl_scan(gcs, sh);
  const float A = -expf(A_log[h]);
  const int pos = c * Q + s;
  float gb = 0.f, ga = 0.f;
  if (pos < L) {
    const int64_t row = static_cast<int64_t>(b) * L + pos;
    const float z = __bfloat162float(dt_raw[row * ld_dt + h]) + dt_bias[h];
    const float sig = z > 20.f ? 1.f : 1.f / (1.f + expf(-z));
    float dd = 0.f;
    for (int k = 0; k < nddt; ++k) dd += ddt_dir[k * nq + idx];
    const float g = (dd + A * da) * sig;
    ddt[row * ld_ddt + h] = __float2bfloat16(g);
    gb = g;
    ga = dt[idx] * da;
  }
  gb = warp_sum(gb);
  ga = warp_sum(ga);
  if ((threadIdx.x & 31) == 0) {  // pg_* [batch, nheads, nc][Q/32]
    const int64_t o = bhc * (blockDim.x >> 5) + (threadIdx.x >> 5);
    pg_dtb[o] = gb;
    pg_dA[o] = ga * A;
  }
}

void launch_dt_bwd(const SsdDims& d, const bf16* dt_raw, int64_t ld_dt, const float* dt_bias,
                   const float* A_log, const float* dt, const float* dcs, const float* dcs_last,
                   const float* ddt_dir, bf16* ddt, int64_t ld_ddt, float* pg_dtb, float* pg_dA,
                   cudaStream_t st) {
  const int nc = static_cast<int>(d.nchunks());
  dim3 grid(nc, static_cast<unsigned>(d.nheads), static_cast<unsigned>(d.batch));
  // Q threads: dt_bwd_warps(d) = Q/32 warps, the pg_* layout relies on it
  dt_bwd_kernel<<<grid, static_cast<unsigned>(d.chunk), 0, st>>>(
      dt_raw, ld_dt, dt_bias, A_log, dt, dcs, dcs_slices(d), dcs_last, dcs_last_len(d),
      ddt_dir, dx_pslices(d), q_slice(d), ddt, ld_ddt, pg_dtb, pg_dA,
      static_cast<int>(d.seqlen), static_cast<int>(d.nheads), nc, static_cast<int>(d.chunk));
  check_launch("ssd dt_bwd");
}

// One block per head: out[h] += the sum of the head's partials, lane-strided over a fixed
// block size, then a fixed shared-memory tree: the same order on every run. The partials are
// [batch, nheads, run]: head h's are `batch` contiguous runs (run = nc * warps per chunk).
constexpr int kReduceThreads = 256;

__device__ __forceinline__ float head_partials(const float* __restrict__ p, int h, int H,
                                               int64_t run, int64_t n) {
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) {
    const int64_t b = i / run;
    s += p[(b * H + h) * run + (i - b * run)];
  }
  return s;
}

__global__ __launch_bounds__(kReduceThreads) void param_grad_reduce_kernel(
    const float* __restrict__ pg_dD, int64_t runD, const float* __restrict__ pg_dtb,
    const float* __restrict__ pg_dA, int64_t runT, int B, float* __restrict__ dD,
    float* __restrict__ d_dt_bias, float* __restrict__ dA_log) {
  __shared__ float sh[3][kReduceThreads];
  const int h = blockIdx.x, H = gridDim.x, t = threadIdx.x;
  const float a = head_partials(pg_dD, h, H, runD, B * runD);
  const float bb = head_partials(pg_dtb, h, H, runT, B * runT);
  const float cc = head_partials(pg_dA, h, H, runT, B * runT);
  tree_sum3(sh, a, bb, cc);
  if (t == 0) {  // accumulate (+=): the outputs sum over micro-batches
    dD[h] += sh[0][0];
    d_dt_bias[h] += sh[1][0];
    dA_log[h] += sh[2][0];
  }
}

void launch_param_grad_reduce(const SsdDims& d, const float* pg_dD, const float* pg_dtb,
                              const float* pg_dA, float* dD, float* d_dt_bias, float* dA_log,
                              cudaStream_t st) {
  const int64_t nc = d.nchunks();
  param_grad_reduce_kernel<<<static_cast<unsigned>(d.nheads), kReduceThreads, 0, st>>>(
      pg_dD, nc * dx_warps(d), pg_dtb, pg_dA, nc * dt_bwd_warps(d), static_cast<int>(d.batch),
      dD, d_dt_bias, dA_log);
  check_launch("ssd param_grad_reduce");
}

}  // namespace ssd::cuda::detail
