// Gated group RMSNorm: out = rmsnorm_groups(y * silu(z)) * weight, forward and backward.
//
// Two paths. The vector path (group a multiple of 256 columns, dim <= 8192, 16-byte aligned
// rows) gives each thread 8 consecutive columns: one 16-byte access per bf16 tensor and row,
// and the row stays on chip (registers, or shared memory in the backward) from the group
// reduction to the output, so each input is read from global memory once. The scalar kernels
// after it handle every other shape and alignment, and the tensor-parallel form (a group
// spanning ranks): a partial pass per (row, group), the caller's all-reduce, then the scalar
// kernels reading the reduced sums instead of computing them.
#include <cstring>

#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

constexpr int kBwdBlocks = 1024;  // fixed: the two-stage dweight sum is deterministic

int block_for(int64_t n) { return n >= 1024 ? 256 : (n >= 256 ? 128 : 64); }

// ---------------------------------------------------------------------------- vector path

constexpr int kVec = 8;               // columns per thread: 16 bytes of bf16
constexpr int kVecMaxThreads = 1024;  // blocks of dim / kVec threads: dim <= 8192
constexpr int kBwdStages = 3;         // rows of loads in flight per thread in the backward

// Sum of v over the threads of one group, returned to each of them. A group is
// warps_per_group consecutive whole warps (group % 256 == 0): shuffle within each warp, then
// the group's first lanes read its warp partials from sh and shuffle again. Fixed order, so
// deterministic. One barrier per call: consecutive calls must alternate between two sh
// buffers (the barrier of the call in between orders the reuse).
__device__ __forceinline__ float group_sum(float v, float* sh, int warps_per_group) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  const int w0 = warp - warp % warps_per_group;
  return warp_sum(lane < warps_per_group ? sh[w0 + lane] : 0.f);
}

// One block of dim/8 threads per row.
__global__ void __launch_bounds__(kVecMaxThreads)
    gated_rmsnorm_fwd_vec_k(const bf16* __restrict__ y, const bf16* __restrict__ z,
                            int64_t ld_z, const float* __restrict__ w, int64_t dim, int group,
                            float inv_group, float eps, bf16* __restrict__ out,
                            float* __restrict__ rstd) {
  __shared__ float sh[32];
  const int64_t row = blockIdx.x;
  const int c = threadIdx.x * kVec;
  float yv[kVec], zv[kVec], wv[kVec], g[kVec];
  unpack8(ldg16(y + row * dim + c), yv);
  unpack8(ldg16(z + row * ld_z + c), zv);
  ldg_f8(w + c, wv);
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    g[j] = yv[j] * (zv[j] * sigmoid_fast(zv[j]));  // as the backward recomputes it
    ss += g[j] * g[j];
  }
  ss = group_sum(ss, sh, group / 256);
  const float rs = rsqrtf(ss * inv_group + eps);
  if (c % group == 0) rstd[row * (static_cast<int>(dim) / group) + c / group] = rs;
  float o[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) o[j] = g[j] * rs * wv[j];
  *reinterpret_cast<uint4*>(out + row * dim + c) = pack8(o);
}

// Shared memory of the backward: kBwdStages row slots of (dout, y, z) per thread, 16 bytes
// each, then the matching rstd values.
size_t gated_bwd_vec_smem(int threads) {
  return static_cast<size_t>(kBwdStages) * threads * (3 * sizeof(uint4) + sizeof(float));
}

// kBwdBlocks blocks walk rows blockIdx.x, +gridDim.x, ...; each thread owns 8 columns and keeps
// their weights and dweight partials in registers. Per row and group:
//   dot = sum(dout*w*ghat), dg = rs*(dout*w - ghat*dot/G), dy = dg*silu(z), dz = dg*y*silu'(z).
// The loads of the next kBwdStages rows are in flight (cp.async into shared memory) while a row
// is reduced: registers limit occupancy to a few blocks per SM, and these keep the memory
// system busy regardless. Each thread copies and reads back only its own slots, so the copies
// need no barrier of their own. part[blockIdx.x, :] is written at the end.
__global__ void __launch_bounds__(kVecMaxThreads)
    gated_rmsnorm_bwd_vec_k(const bf16* __restrict__ dout, const bf16* __restrict__ y,
                            const bf16* __restrict__ z, int64_t ld_z,
                            const float* __restrict__ w, const float* __restrict__ rstd,
                            int64_t ntok, int64_t dim, int group, float inv_group,
                            bf16* __restrict__ dy, bf16* __restrict__ dz, int64_t ld_dz,
                            float* __restrict__ part) {
  // slots[k][i][t], i = dout, y, z; then rs_slots[k][t]
  extern __shared__ uint4 slots[];
  __shared__ float sh[2][32];
  const int t = threadIdx.x, nt = blockDim.x;
  float* rs_slots = reinterpret_cast<float*>(slots + kBwdStages * 3 * nt);
  const int c = t * kVec;
  const int ngroups = static_cast<int>(dim) / group;
  const int q = c / group, warps_per_group = group / 256;
  const int64_t stride = gridDim.x;

  // Slot k holds rows blockIdx.x + (i*kBwdStages + k)*stride; one commit group per row,
  // empty past the end, so that wait_group counts rows.
  auto issue = [&](int64_t r, int k) {
    if (r < ntok) {
      uint4* s = slots + k * 3 * nt + t;
      cp_async16(s, dout + r * dim + c);
      cp_async16(s + nt, y + r * dim + c);
      cp_async16(s + 2 * nt, z + r * ld_z + c);
      cp_async4(rs_slots + k * nt + t, rstd + r * ngroups + q);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int k = 0; k < kBwdStages; ++k) issue(blockIdx.x + k * stride, k);

  float wv[kVec], acc[kVec];
  ldg_f8(w + c, wv);
#pragma unroll
  for (int j = 0; j < kVec; ++j) acc[j] = 0.f;
  int buf = 0, k = 0;
#pragma unroll 1
  for (int64_t row = blockIdx.x; row < ntok; row += stride) {
    cp_async_wait<kBwdStages - 1>();  // this row's group has landed
    // The row is read from its slot twice, before and after the reduction, rather than held
    // in registers across it; only the sigmoids are kept.
    const uint4* s = slots + k * 3 * nt + t;
    const float rs = rs_slots[k * nt + t];
    float sg[kVec], dot = 0.f;
    {
      float dv[kVec], yv[kVec], zv[kVec];
      unpack8(s[0], dv);
      unpack8(s[nt], yv);
      unpack8(s[2 * nt], zv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        sg[j] = sigmoid_fast(zv[j]);
        const float ghat = yv[j] * (zv[j] * sg[j]) * rs;
        dot += dv[j] * wv[j] * ghat;
        acc[j] += dv[j] * ghat;
      }
    }
    const float mean = group_sum(dot, sh[buf], warps_per_group) * inv_group;
    buf ^= 1;
    {
      float dv[kVec], yv[kVec], zv[kVec], dyv[kVec], dzv[kVec];
      unpack8(s[0], dv);
      unpack8(s[nt], yv);
      unpack8(s[2 * nt], zv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float silu = zv[j] * sg[j];
        const float ghat = yv[j] * silu * rs;
        const float dg = rs * (dv[j] * wv[j] - ghat * mean);
        dyv[j] = dg * silu;
        dzv[j] = dg * yv[j] * sg[j] * (1.f + zv[j] * (1.f - sg[j]));  // dg * y * silu'(z)
      }
      *reinterpret_cast<uint4*>(dy + row * dim + c) = pack8(dyv);
      *reinterpret_cast<uint4*>(dz + row * ld_dz + c) = pack8(dzv);
    }
    // The slot's values are consumed (the stores above depend on them): refill it.
    issue(row + kBwdStages * stride, k);
    k = k + 1 == kBwdStages ? 0 : k + 1;
  }
  float4* pr = reinterpret_cast<float4*>(part + blockIdx.x * dim + c);
  pr[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  pr[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Shapes the vector kernels take: a group is whole warps, a row fits one block.
bool vec_shape_ok(int64_t dim, int64_t group) {
  return group % 256 == 0 && dim % group == 0 && dim / kVec <= kVecMaxThreads;
}

// ---------------------------------------------------------------------------- scalar path

// g = y * silu(z) at column c of one row's group, as every scalar kernel computes it.
__device__ __forceinline__ float gated(const bf16* __restrict__ yr, const bf16* __restrict__ zr,
                                       int64_t c) {
  const float zz = to_f(zr[c]);
  return to_f(yr[c]) * zz * sigmoidf_(zz);
}

// One block per (row, group). kSpan: the group's sum of squares over all its ranks is given
// (sums[row, group], all-reduced), and the mean is over n columns; else n = group.
template <bool kSpan>
__global__ void gated_rmsnorm_fwd_k(const bf16* __restrict__ y, const bf16* __restrict__ z,
                                    int64_t ld_z, const float* __restrict__ w, int64_t dim,
                                    int64_t group, int64_t n, float eps,
                                    const float* __restrict__ sums, bf16* __restrict__ out,
                                    float* __restrict__ rstd) {
  __shared__ float sh[32];
  const int64_t ngroups = dim / group;
  const int64_t row = blockIdx.x / ngroups, q = blockIdx.x % ngroups;
  const int64_t c0 = q * group;
  const bf16* yr = y + row * dim + c0;
  const bf16* zr = z + row * ld_z + c0;
  float ss = 0.f;
  if constexpr (kSpan) {
    ss = sums[blockIdx.x];
  } else {
    for (int64_t c = threadIdx.x; c < group; c += blockDim.x) {
      const float g = gated(yr, zr, c);
      ss += g * g;
    }
    ss = block_sum(ss, sh);
  }
  const float rs = rsqrtf(ss / static_cast<float>(n) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
  bf16* o = out + row * dim + c0;
  const float* wq = w + c0;
  for (int64_t c = threadIdx.x; c < group; c += blockDim.x)
    o[c] = from_f<bf16>(gated(yr, zr, c) * rs * wq[c]);
}

// Blocks walk rows; per row and group: dot = sum(dout*w*ghat), dg = rs*(dout*w - ghat*dot/n),
// dy = dg*silu(z), dz = dg*y*silu'(z). Thread-owned columns accumulate dweight partials in
// shared memory; part[blockIdx.x, :] is written at the end. kSpan: dot is given (dots[row,
// group], all-reduced over the group's ranks), n its columns; else n = group.
template <bool kSpan>
__global__ void gated_rmsnorm_bwd_k(const bf16* __restrict__ dout, const bf16* __restrict__ y,
                                    const bf16* __restrict__ z, int64_t ld_z,
                                    const float* __restrict__ w, const float* __restrict__ rstd,
                                    int64_t ntok, int64_t dim, int64_t group, int64_t n,
                                    const float* __restrict__ dots, bf16* __restrict__ dy,
                                    bf16* __restrict__ dz, int64_t ld_dz,
                                    float* __restrict__ part) {
  extern __shared__ float acc[];
  __shared__ float sh[32];
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) acc[c] = 0.f;
  // acc is zeroed and written out by columns of the row (c = tid + k * blockDim) but summed by
  // columns of each group (c0 + tid + k * blockDim): other threads' elements unless blockDim
  // divides the group. The block sums' barriers order that; kSpan has none, so its own.
  if constexpr (kSpan) __syncthreads();
  const int64_t ngroups = dim / group;
  const float inv_group = 1.f / static_cast<float>(n);
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
        const float ghat = gated(yr, zr, c) * rs;
        const float d = to_f(dr[c]);
        if constexpr (!kSpan) dot += d * wq[c] * ghat;
        aq[c] += d * ghat;
      }
      float mean;
      if constexpr (kSpan) mean = dots[row * ngroups + q] * inv_group;
      else mean = block_sum(dot, sh) * inv_group;
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
  if constexpr (kSpan) __syncthreads();
  float* pr = part + blockIdx.x * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) pr[c] = acc[c];
}

// Partial passes of the tensor-parallel form, one block per (row, group) of this rank's
// columns: out[row, group] = sum of g^2 (forward) or of dout*w*g*rstd (backward).
template <bool kBwd>
__global__ void gated_rmsnorm_partial_k(const bf16* __restrict__ dout,
                                        const bf16* __restrict__ y, const bf16* __restrict__ z,
                                        int64_t ld_z, const float* __restrict__ w,
                                        const float* __restrict__ rstd, int64_t dim,
                                        int64_t group, float* __restrict__ out) {
  __shared__ float sh[32];
  const int64_t ngroups = dim / group;
  const int64_t row = blockIdx.x / ngroups, q = blockIdx.x % ngroups;
  const int64_t c0 = q * group;
  const bf16* yr = y + row * dim + c0;
  const bf16* zr = z + row * ld_z + c0;
  float acc = 0.f;
  for (int64_t c = threadIdx.x; c < group; c += blockDim.x) {
    const float g = gated(yr, zr, c);
    if constexpr (kBwd) acc += to_f(dout[row * dim + c0 + c]) * w[c0 + c] * g;
    else acc += g * g;
  }
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) {
    if constexpr (kBwd) out[blockIdx.x] = acc * rstd[blockIdx.x];
    else out[blockIdx.x] = acc;
  }
}

unsigned row_group_blocks(const char* op, int64_t ntok, int64_t dim, int64_t group) {
  if (group <= 0 || dim % group != 0)
    fail("cuda ", op, ": group size ", group, " does not divide ", dim);
  const int64_t nblocks = ntok * (dim / group);
  if (nblocks > INT32_MAX) fail("cuda ", op, ": too many rows");
  return static_cast<unsigned>(nblocks);
}

}  // namespace

void gated_rmsnorm_fwd(const bf16* y, const bf16* z, int64_t ld_z, const float* weight,
                       int64_t ntok, int64_t dim, int64_t group, float eps, bf16* out,
                       float* rstd, cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  if (group <= 0 || dim % group != 0)
    fail("cuda gated_rmsnorm_fwd: group size ", group, " does not divide ", dim);
  if (vec_shape_ok(dim, group) && ld_z % kVec == 0 && aligned16(y) && aligned16(z) &&
      aligned16(weight) && aligned16(out)) {
    if (ntok > INT32_MAX) fail("cuda gated_rmsnorm_fwd: too many rows");
    gated_rmsnorm_fwd_vec_k<<<static_cast<unsigned>(ntok), static_cast<int>(dim / kVec), 0,
                              stream>>>(y, z, ld_z, weight, dim, static_cast<int>(group),
                                        1.f / static_cast<float>(group), eps, out, rstd);
    check_launch("gated_rmsnorm_fwd");
    return;
  }
  const int64_t nblocks = ntok * (dim / group);
  if (nblocks > INT32_MAX) fail("cuda gated_rmsnorm_fwd: too many rows");
  gated_rmsnorm_fwd_k<false><<<static_cast<unsigned>(nblocks), block_for(group), 0, stream>>>(
      y, z, ld_z, weight, dim, group, group, eps, nullptr, out, rstd);
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
  float* part = static_cast<float*>(ws);
  if (vec_shape_ok(dim, group) && ld_z % kVec == 0 && ld_dz % kVec == 0 && aligned16(dout) &&
      aligned16(y) && aligned16(z) && aligned16(weight) && aligned16(dy) && aligned16(dz) &&
      aligned16(part)) {
    const int threads = static_cast<int>(dim / kVec);
    const size_t smem = gated_bwd_vec_smem(threads);
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(gated_rmsnorm_bwd_vec_k,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    gated_rmsnorm_bwd_vec_k<<<nb, threads, smem, stream>>>(
        dout, y, z, ld_z, weight, rstd, ntok, dim, static_cast<int>(group),
        1.f / static_cast<float>(group), dy, dz, ld_dz, part);
  } else {
    const size_t smem = dim * sizeof(float);
    if (smem > 200 * 1024) fail("cuda gated_rmsnorm_bwd: dim ", dim, " is too large");
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(gated_rmsnorm_bwd_k<false>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    gated_rmsnorm_bwd_k<false><<<nb, block_for(group), smem, stream>>>(
        dout, y, z, ld_z, weight, rstd, ntok, dim, group, group, nullptr, dy, dz, ld_dz, part);
  }
  check_launch("gated_rmsnorm_bwd");
  column_sum_accumulate(part, nb, dim, dweight, stream);
}

// ---------------------------------------------------------------------------- norm spans

void gated_rmsnorm_fwd_sumsq(const bf16* y, const bf16* z, int64_t ld_z, int64_t ntok,
                             int64_t dim, int64_t group, float* sums, cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  const unsigned nb = row_group_blocks("gated_rmsnorm_fwd", ntok, dim, group);
  gated_rmsnorm_partial_k<false><<<nb, block_for(group), 0, stream>>>(
      nullptr, y, z, ld_z, nullptr, nullptr, dim, group, sums);
  check_launch("gated_rmsnorm_fwd_sumsq");
}

void gated_rmsnorm_fwd_apply(const bf16* y, const bf16* z, int64_t ld_z, const float* weight,
                             int64_t ntok, int64_t dim, int64_t group, int64_t n, float eps,
                             const float* sums, bf16* out, float* rstd, cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  const unsigned nb = row_group_blocks("gated_rmsnorm_fwd", ntok, dim, group);
  gated_rmsnorm_fwd_k<true><<<nb, block_for(group), 0, stream>>>(y, z, ld_z, weight, dim, group,
                                                                 n, eps, sums, out, rstd);
  check_launch("gated_rmsnorm_fwd_apply");
}

void gated_rmsnorm_bwd_dot(const bf16* dout, const bf16* y, const bf16* z, int64_t ld_z,
                           const float* weight, const float* rstd, int64_t ntok, int64_t dim,
                           int64_t group, float* dots, cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  const unsigned nb = row_group_blocks("gated_rmsnorm_bwd", ntok, dim, group);
  gated_rmsnorm_partial_k<true><<<nb, block_for(group), 0, stream>>>(dout, y, z, ld_z, weight,
                                                                     rstd, dim, group, dots);
  check_launch("gated_rmsnorm_bwd_dot");
}

void gated_rmsnorm_bwd_apply(const bf16* dout, const bf16* y, const bf16* z, int64_t ld_z,
                             const float* weight, const float* rstd, int64_t ntok, int64_t dim,
                             int64_t group, int64_t n, const float* dots, bf16* dy, bf16* dz,
                             int64_t ld_dz, float* dweight, void* ws, cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  row_group_blocks("gated_rmsnorm_bwd", ntok, dim, group);
  const int nb = static_cast<int>(std::min<int64_t>(ntok, kBwdBlocks));
  float* part = static_cast<float*>(ws);
  const size_t smem = dim * sizeof(float);
  if (smem > 200 * 1024) fail("cuda gated_rmsnorm_bwd: dim ", dim, " is too large");
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(gated_rmsnorm_bwd_k<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(smem));
  gated_rmsnorm_bwd_k<true><<<nb, block_for(group), smem, stream>>>(
      dout, y, z, ld_z, weight, rstd, ntok, dim, group, n, dots, dy, dz, ld_dz, part);
  check_launch("gated_rmsnorm_bwd_apply");
  column_sum_accumulate(part, nb, dim, dweight, stream);
}

}  // namespace ssd::cuda
