// Gated group RMSNorm: out = rmsnorm_groups(y * silu(z)) * weight, forward and backward.
#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

constexpr int kBwdBlocks = 1024;  // fixed: the two-stage dweight sum is deterministic

int block_for(int64_t n) { return n >= 1024 ? 256 : (n >= 256 ? 128 : 64); }

// One block per (row, group).
__global__ void gated_rmsnorm_fwd_k(const bf16* __restrict__ y, const bf16* __restrict__ z,
                                    int64_t ld_z, const float* __restrict__ w, int64_t dim,
                                    int64_t group, float eps, bf16* __restrict__ out,
                                    float* __restrict__ rstd) {
  __shared__ float sh[32];
  const int64_t ngroups = dim / group;
  const int64_t row = blockIdx.x / ngroups, q = blockIdx.x % ngroups;
  const int64_t c0 = q * group;
  const bf16* yr = y + row * dim + c0;
  const bf16* zr = z + row * ld_z + c0;
  float ss = 0.f;
  for (int64_t c = threadIdx.x; c < group; c += blockDim.x) {
    const float zz = to_f(zr[c]);
    const float g = to_f(yr[c]) * zz * sigmoidf_(zz);
    ss += g * g;
  }
  ss = block_sum(ss, sh);
  const float rs = rsqrtf(ss / static_cast<float>(group) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
  bf16* o = out + row * dim + c0;
  const float* wq = w + c0;
  for (int64_t c = threadIdx.x; c < group; c += blockDim.x) {
    const float zz = to_f(zr[c]);
    const float g = to_f(yr[c]) * zz * sigmoidf_(zz);
    o[c] = from_f<bf16>(g * rs * wq[c]);
  }
}

// Blocks walk rows; per row and group: dot = sum(dout*w*ghat), dg = rs*(dout*w - ghat*dot/G),
// dy = dg*silu(z), dz = dg*y*silu'(z). Thread-owned columns accumulate dweight partials in
// shared memory; part[blockIdx.x, :] is written at the end.
__global__ void gated_rmsnorm_bwd_k(const bf16* __restrict__ dout, const bf16* __restrict__ y,
                                    const bf16* __restrict__ z, int64_t ld_z,
                                    const float* __restrict__ w, const float* __restrict__ rstd,
                                    int64_t ntok, int64_t dim, int64_t group,
                                    bf16* __restrict__ dy, bf16* __restrict__ dz,
                                    int64_t ld_dz, float* __restrict__ part) {
  extern __shared__ float acc[];
  __shared__ float sh[32];
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) acc[c] = 0.f;
  const int64_t ngroups = dim / group;
  const float inv_group = 1.f / static_cast<float>(group);
  for (int64_t row = blockIdx.x; row < ntok; row += gridDim.x) {
    for (int64_t q = 0; q < ngroups; ++q) {
      const int64_t c0 = q * group;
      const bf16* yr = y + row * dim + c0;
      const bf16* zr = z + row * ld_z + c0;
      const bf16* dr = dout + row * dim + c0;
      const float* wq = w + c0;
      float* aq = acc + c0;
      const float rs = rstd[row * ngroups + q];
      float dot = 0.f;
      for (int64_t c = threadIdx.x; c < group; c += blockDim.x) {
        const float zz = to_f(zr[c]);
        const float ghat = to_f(yr[c]) * zz * sigmoidf_(zz) * rs;
        const float d = to_f(dr[c]);
        dot += d * wq[c] * ghat;
        aq[c] += d * ghat;
      }
      const float mean = block_sum(dot, sh) * inv_group;
      bf16* dyr = dy + row * dim + c0;
      bf16* dzr = dz + row * ld_dz + c0;
      for (int64_t c = threadIdx.x; c < group; c += blockDim.x) {
        const float zz = to_f(zr[c]);
        const float yy = to_f(yr[c]);
        const float s = sigmoidf_(zz);
        const float silu = zz * s;
        const float ghat = yy * silu * rs;
        const float dg = rs * (to_f(dr[c]) * wq[c] - ghat * mean);
        dyr[c] = from_f<bf16>(dg * silu);
        dzr[c] = from_f<bf16>(dg * yy * s * (1.f + zz * (1.f - s)));
      }
    }
  }
  float* pr = part + blockIdx.x * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) pr[c] = acc[c];
}

}  // namespace

void gated_rmsnorm_fwd(const bf16* y, const bf16* z, int64_t ld_z, const float* weight,
                       int64_t ntok, int64_t dim, int64_t group, float eps, bf16* out,
                       float* rstd, cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  if (group <= 0 || dim % group != 0)
    fail("cuda gated_rmsnorm_fwd: group size ", group, " does not divide ", dim);
  const int64_t nblocks = ntok * (dim / group);
  if (nblocks > INT32_MAX) fail("cuda gated_rmsnorm_fwd: too many rows");
  gated_rmsnorm_fwd_k<<<static_cast<unsigned>(nblocks), block_for(group), 0, stream>>>(
      y, z, ld_z, weight, dim, group, eps, out, rstd);
  check_launch("gated_rmsnorm_fwd");
}

size_t gated_rmsnorm_bwd_workspace_bytes(int64_t ntok, int64_t dim) {
  return static_cast<size_t>(std::min<int64_t>(std::max<int64_t>(ntok, 1), kBwdBlocks)) * dim *
         sizeof(float);
}

void gated_rmsnorm_bwd(const bf16* dout, const bf16* y, const bf16* z, int64_t ld_z,
                       const float* weight, const float* rstd, int64_t ntok, int64_t dim,
                       int64_t group, bf16* dy, bf16* dz, int64_t ld_dz, float* dweight,
                       void* ws, cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  if (group <= 0 || dim % group != 0)
    fail("cuda gated_rmsnorm_bwd: group size ", group, " does not divide ", dim);
  const int nb = static_cast<int>(std::min<int64_t>(ntok, kBwdBlocks));
  const size_t smem = dim * sizeof(float);
  if (smem > 200 * 1024) fail("cuda gated_rmsnorm_bwd: dim ", dim, " is too large");
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(gated_rmsnorm_bwd_k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(smem));
  float* part = static_cast<float*>(ws);
  gated_rmsnorm_bwd_k<<<nb, block_for(group), smem, stream>>>(
      dout, y, z, ld_z, weight, rstd, ntok, dim, group, dy, dz, ld_dz, part);
  check_launch("gated_rmsnorm_bwd");
  column_sum_accumulate(part, nb, dim, dweight, stream);
}

}  // namespace ssd::cuda
