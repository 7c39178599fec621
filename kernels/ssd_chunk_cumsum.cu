// SSD step 1: dt = softplus(dt_raw + dt_bias) (0 past seqlen) and, per chunk, the inclusive
// cumulative sum of dt * A (A = -exp(A_log)). One block of `chunk` threads per (chunk, head, b).
//
// Packed documents: at a token that begins a document the cumulative sum also drops by
// kResetLogDecay. Every later step reads cs only through exp(cs_t - cs_s) (t >= s: the decay
// from s to t), exp(cs_t) (from the chunk's start) and exp(cs_last) (the chunk's decay), so
// every factor whose span holds a document start becomes exp(<= -kResetLogDecay) = 0 exactly,
// in fp32 and in the ex2.approx.ftz the kernels use (2^(-128 log2 e) = 2^-184.7 is below the
// smallest subnormal), and the others are unchanged: the state entering the document is
// dropped in the forward and, since each gradient term carries its factor, in the backward too
// (the gradient of the constant offset is nothing). Where a kernel evaluates exp() outside the
// causal range (s > t) it selects 0 there rather than multiply, so the large positive exponent
// there is harmless. Only this kernel knows about documents. The price: cs grows by 128 per
// document start in a chunk, which coarsens its fp32 rounding (absolute ~1e-5 per start, still
// far below bf16's); chunks without a start compute exactly what they compute without flags.
#include "ssd_common.cuh"

namespace ssd::cuda::detail {

constexpr float kResetLogDecay = 128.f;

__global__ void chunk_cumsum_kernel(const bf16* __restrict__ dt_raw, int64_t ld_dt,
                                    const float* __restrict__ dt_bias,
                                    const float* __restrict__ A_log,
                                    const int32_t* __restrict__ reset, int L, int H, int nc,
                                    int Q, float* __restrict__ dt_out,
                                    float* __restrict__ cs_out) {
  __shared__ float sh[32];
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, t = threadIdx.x;
  const int pos = c * Q + t;
  float dtv = 0.f, drop = 0.f;
  if (pos < L) {
    const int64_t row = static_cast<int64_t>(b) * L + pos;
    const float z = __bfloat162float(dt_raw[row * ld_dt + h]) + dt_bias[h];
    dtv = softplus_f(z);
    if (reset && reset[row]) drop = kResetLogDecay;
  }
  const float A = -expf(A_log[h]);
  const float v = block_incl_scan(dtv * A - drop, sh);
  const int64_t idx = ((static_cast<int64_t>(b) * H + h) * nc + c) * Q + t;
  dt_out[idx] = dtv;
  cs_out[idx] = v;
}

void launch_chunk_cumsum(const SsdDims& d, const bf16* dt_raw, int64_t ld_dt,
                         const float* dt_bias, const float* A_log, const int32_t* reset,
                         float* dt, float* cs, cudaStream_t st) {
  const int nc = static_cast<int>(d.nchunks());
  dim3 grid(nc, static_cast<unsigned>(d.nheads), static_cast<unsigned>(d.batch));
  chunk_cumsum_kernel<<<grid, static_cast<unsigned>(d.chunk), 0, st>>>(
      dt_raw, ld_dt, dt_bias, A_log, reset, static_cast<int>(d.seqlen),
      static_cast<int>(d.nheads), nc, static_cast<int>(d.chunk), dt, cs);
  check_launch("ssd chunk_cumsum");
}

}  // namespace ssd::cuda::detail
