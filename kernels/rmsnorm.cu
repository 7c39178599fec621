// Fused residual add + RMSNorm, forward and backward.
#include <type_traits>

#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

constexpr int kBwdBlocks = 1024;  // fixed: the two-stage dweight sum is deterministic

int block_for(int64_t dim) { return dim >= 512 ? 256 : (dim >= 128 ? 128 : 64); }

template <class TX, class TY>
__global__ void add_rmsnorm_fwd_k(const TX* __restrict__ x, const float* residual_in,
                                  const float* __restrict__ w, int64_t dim, float eps,
                                  float* residual_out, TY* __restrict__ y,
                                  float* __restrict__ rstd) {
  __shared__ float sh[32];
  const int64_t row = blockIdx.x;
  const TX* xr = x + row * dim;
  const float* ri = residual_in ? residual_in + row * dim : nullptr;
  float* ro = residual_out + row * dim;
  float ss = 0.f;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    float r = to_f(xr[c]) + (ri ? ri[c] : 0.f);  // residual_out may alias residual_in
    ro[c] = r;
    ss += r * r;
  }
  ss = block_sum(ss, sh);
  const float rs = rsqrtf(ss / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  TY* yr = y + row * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) yr[c] = from_f<TY>(ro[c] * rs * w[c]);
}

// Each block walks rows blockIdx.x, +gridDim.x, ...; thread-owned columns accumulate the
// block's dweight partial in shared memory, written to part[blockIdx.x, :] at the end.
template <class TD>
__global__ void add_rmsnorm_bwd_k(const TD* __restrict__ dy, const float* dres_next,
                                  const float* __restrict__ res, const float* __restrict__ w,
                                  const float* __restrict__ rstd, int64_t ntok, int64_t dim,
                                  float* d_res, float* __restrict__ part) {
  extern __shared__ float acc[];
  __shared__ float sh[32];
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) acc[c] = 0.f;
  const float inv_dim = 1.f / static_cast<float>(dim);
  for (int64_t row = blockIdx.x; row < ntok; row += gridDim.x) {
    const TD* dyr = dy + row * dim;
    const float* rr = res + row * dim;
    const float rs = rstd[row];
    float dot = 0.f;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const float d = to_f(dyr[c]);
      const float xhat = rr[c] * rs;
      dot += d * w[c] * xhat;
      acc[c] += d * xhat;
    }
    const float mean = block_sum(dot, sh) * inv_dim;
    const float* dn = dres_next ? dres_next + row * dim : nullptr;
    float* dr = d_res + row * dim;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const float g = to_f(dyr[c]) * w[c];
      const float xhat = rr[c] * rs;
      const float v = rs * (g - xhat * mean);
      dr[c] = (dn ? dn[c] : 0.f) + v;  // d_res may alias dres_next
    }
  }
  float* pr = part + blockIdx.x * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) pr[c] = acc[c];
}

}  // namespace

namespace {
// out[c] += sum over nparts of part[p, c], in order.
__global__ void column_sum_accumulate_k(const float* __restrict__ part, int nparts, int64_t n,
                                        float* __restrict__ out) {
  int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= n) return;
  float s = 0.f;
  for (int p = 0; p < nparts; ++p) s += part[p * n + c];
  out[c] += s;
}
}  // namespace

void column_sum_accumulate(const float* part, int nparts, int64_t n, float* out,
                           cudaStream_t stream) {
  if (n <= 0) return;
  column_sum_accumulate_k<<<grid_for(n, 256), 256, 0, stream>>>(part, nparts, n, out);
  check_launch("column_sum_accumulate");
}

void add_rmsnorm_fwd(const void* x, DType xdt, const float* residual_in, const float* weight,
                     int64_t ntok, int64_t dim, float eps, float* residual_out, void* y,
                     DType ydt, float* rstd, cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  const unsigned grid = static_cast<unsigned>(ntok);
  const int block = block_for(dim);
  auto go = [&](auto* xp, auto* yp) {
    add_rmsnorm_fwd_k<<<grid, block, 0, stream>>>(xp, residual_in, weight, dim, eps,
                                                  residual_out, yp, rstd);
  };
  if (xdt == DType::BF16 && ydt == DType::BF16)
    go(static_cast<const bf16*>(x), static_cast<bf16*>(y));
  else if (xdt == DType::F32 && ydt == DType::BF16)
    go(static_cast<const float*>(x), static_cast<bf16*>(y));
  else if (xdt == DType::BF16 && ydt == DType::F32)
    go(static_cast<const bf16*>(x), static_cast<float*>(y));
  else if (xdt == DType::F32 && ydt == DType::F32)
    go(static_cast<const float*>(x), static_cast<float*>(y));
  else
    fail("cuda add_rmsnorm_fwd: unsupported dtypes x ", dtype_name(xdt), ", y ",
         dtype_name(ydt));
  check_launch("add_rmsnorm_fwd");
}

size_t add_rmsnorm_bwd_workspace_bytes(int64_t ntok, int64_t dim) {
  return static_cast<size_t>(std::min<int64_t>(std::max<int64_t>(ntok, 1), kBwdBlocks)) * dim *
         sizeof(float);
}

void add_rmsnorm_bwd(const void* dy, DType dydt, const float* dres_next,
                     const float* residual_out, const float* weight, const float* rstd,
                     int64_t ntok, int64_t dim, float* d_residual, float* dweight, void* ws,
                     cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  const int nb = static_cast<int>(std::min<int64_t>(ntok, kBwdBlocks));
  const int block = block_for(dim);
  const size_t smem = dim * sizeof(float);
  if (smem > 200 * 1024) fail("cuda add_rmsnorm_bwd: dim ", dim, " is too large");
  float* part = static_cast<float*>(ws);
  auto go = [&](auto* dyp) {
    auto kern = add_rmsnorm_bwd_k<std::remove_cv_t<std::remove_pointer_t<decltype(dyp)>>>;
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem));
    kern<<<nb, block, smem, stream>>>(dyp, dres_next, residual_out, weight, rstd, ntok, dim,
                                      d_residual, part);
  };
  if (dydt == DType::BF16)
    go(static_cast<const bf16*>(dy));
  else if (dydt == DType::F32)
    go(static_cast<const float*>(dy));
  else
    fail("cuda add_rmsnorm_bwd: dy must be bf16 or f32, got ", dtype_name(dydt));
  check_launch("add_rmsnorm_bwd");
  column_sum_accumulate(part, nb, dim, dweight, stream);
}

}  // namespace ssd::cuda
