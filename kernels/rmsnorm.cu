// Fused residual add + RMSNorm, forward and backward, and the column sum that finishes the
// deterministic parameter-gradient reductions (declared in common.cuh).
//
// Two paths. The vector path (x / dy bf16, y bf16, dim a multiple of 256 up to 8192, 16-byte
// aligned) gives each thread 8 consecutive columns: one 16-byte access per bf16 row slice, two
// per f32 one, and the row stays on chip (registers, or shared memory in the backward) from the
// row reduction to the output, so each input is read from global memory once. The scalar
// kernels after it handle the other dtypes and shapes.
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

constexpr int kBwdBlocks = 1024;  // fixed: the two-stage dweight sum is deterministic

int block_for(int64_t dim) { return dim >= 512 ? 256 : (dim >= 128 ? 128 : 64); }

// ---------------------------------------------------------------------------- vector path

constexpr int kVec = 8;               // columns per thread: 16 bytes of bf16, 32 of f32
constexpr int kVecMaxThreads = 1024;  // blocks of dim / kVec threads: dim <= 8192
constexpr int kBwdStages = 2;         // rows of loads in flight per thread in the backward

__device__ __forceinline__ void split8(float4 a, float4 b, float (&v)[kVec]) {
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
// Eight f32 through the ordinary path: p may alias an output of the same kernel.
__device__ __forceinline__ void ld_f8(const float* p, float (&v)[kVec]) {
  split8(reinterpret_cast<const float4*>(p)[0], reinterpret_cast<const float4*>(p)[1], v);
}
__device__ __forceinline__ void st_f8(float* p, const float (&v)[kVec]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// Sum of v over the block (whole warps), returned to every thread, in a fixed order. One
// barrier per call: consecutive calls must alternate between two sh buffers (the barrier of
// the call in between orders the reuse).
__device__ __forceinline__ float row_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  return warp_sum(lane < static_cast<int>(blockDim.x >> 5) ? sh[lane] : 0.f);
}

// One block of dim/8 threads per row. residual_out may alias residual_in: each thread reads
// its 8 values before writing them.
__global__ void __launch_bounds__(kVecMaxThreads)
    add_rmsnorm_fwd_vec_k(const bf16* __restrict__ x, const float* residual_in,
                          const float* __restrict__ w, int64_t dim, float inv_dim, float eps,
                          float* residual_out, bf16* __restrict__ y, float* __restrict__ rstd) {
  __shared__ float sh[32];
  const int64_t off = blockIdx.x * dim + threadIdx.x * kVec;
  float r[kVec];
  unpack8(ldg16(x + off), r);
  if (residual_in) {
    float ri[kVec];
    ld_f8(residual_in + off, ri);
#pragma unroll
    for (int j = 0; j < kVec; ++j) r[j] += ri[j];
  }
  st_f8(residual_out + off, r);
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) ss += r[j] * r[j];
  ss = row_sum(ss, sh);
  const float rs = rsqrtf(ss * inv_dim + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
  float wv[kVec], o[kVec];
  ldg_f8(w + threadIdx.x * kVec, wv);
#pragma unroll
  for (int j = 0; j < kVec; ++j) o[j] = r[j] * rs * wv[j];
  *reinterpret_cast<uint4*>(y + off) = pack8(o);
}

// Shared memory of the backward: kBwdStages row slots per thread of 5 x 16 bytes (dy, the
// residual, dres_next), then the matching rstd values.
size_t add_bwd_vec_smem(int threads) {
  return static_cast<size_t>(kBwdStages) * threads * (5 * sizeof(uint4) + sizeof(float));
}

// kBwdBlocks blocks walk rows blockIdx.x, +gridDim.x, ...; each thread owns 8 columns and keeps
// their weights and dweight partials in registers. Per row, with xhat = residual*rs:
//   dot = sum(dy*w*xhat), d_res = dres_next + rs*(dy*w - xhat*dot/dim).
// The next rows' loads are in flight (cp.async into shared memory) while a row is reduced; each
// thread copies and reads back only its own slots, so the copies need no barrier of their own.
// The slot is read twice, before and after the reduction, instead of holding the row in
// registers across it. d_res may alias dres_next: a row's dres_next is read (copied) before
// its d_res is written, by the same thread, and no other row touches it.
__global__ void __launch_bounds__(kVecMaxThreads)
    add_rmsnorm_bwd_vec_k(const bf16* __restrict__ dy, const float* dres_next,
                          const float* __restrict__ res, const float* __restrict__ w,
                          const float* __restrict__ rstd, int64_t ntok, int64_t dim,
                          float inv_dim, float* d_res, float* __restrict__ part) {
  // slots[k][i][t], i = dy, residual (2), dres_next (2); then rs_slots[k][t]
  extern __shared__ uint4 slots[];
  __shared__ float sh[2][32];
  const int t = threadIdx.x, nt = blockDim.x;
  float* rs_slots = reinterpret_cast<float*>(slots + kBwdStages * 5 * nt);
  const int c = t * kVec;
  const int64_t stride = gridDim.x;

  // Slot k holds every kBwdStages-th row; one commit group per row, empty past the end, so
  // that wait_group counts rows.
  auto issue = [&](int64_t r, int k) {
    if (r < ntok) {
      uint4* s = slots + k * 5 * nt + t;
      const int64_t off = r * dim + c;
      cp_async16(s, dy + off);
      cp_async16(s + nt, res + off);
      cp_async16(s + 2 * nt, res + off + 4);
      if (dres_next) {
        cp_async16(s + 3 * nt, dres_next + off);
        cp_async16(s + 4 * nt, dres_next + off + 4);
      }
      cp_async4(rs_slots + k * nt + t, rstd + r);
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
    const uint4* s = slots + k * 5 * nt + t;
    const float rs = rs_slots[k * nt + t];
    float dot = 0.f;
    {
      float dv[kVec], rv[kVec];
      unpack8(s[0], dv);
      split8(*reinterpret_cast<const float4*>(s + nt), *reinterpret_cast<const float4*>(s + 2 * nt),
             rv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float xhat = rv[j] * rs;
        dot += dv[j] * wv[j] * xhat;
        acc[j] += dv[j] * xhat;
      }
    }
    const float mean = row_sum(dot, sh[buf]) * inv_dim;
    buf ^= 1;
    {
      float dv[kVec], rv[kVec], o[kVec];
      unpack8(s[0], dv);
      split8(*reinterpret_cast<const float4*>(s + nt), *reinterpret_cast<const float4*>(s + 2 * nt),
             rv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) o[j] = rs * (dv[j] * wv[j] - rv[j] * rs * mean);
      if (dres_next) {
        float nv[kVec];
        split8(*reinterpret_cast<const float4*>(s + 3 * nt),
               *reinterpret_cast<const float4*>(s + 4 * nt), nv);
#pragma unroll
        for (int j = 0; j < kVec; ++j) o[j] = nv[j] + o[j];
      }
      st_f8(d_res + row * dim + c, o);
    }
    // The slot's values are consumed (the stores above depend on them): refill it.
    issue(row + kBwdStages * stride, k);
    k = k + 1 == kBwdStages ? 0 : k + 1;
  }
  st_f8(part + blockIdx.x * dim + c, acc);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Shapes the vector kernels take: whole warps, a row fits one block.
bool vec_shape_ok(int64_t dim) { return dim % 256 == 0 && dim / kVec <= kVecMaxThreads; }

// ---------------------------------------------------------------------------- scalar path

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

// out[c] += sum over p < nparts of part[p, c], added in order p = 0, 1, ... (the same result,
// bit for bit, as a plain loop per column). A column's sum is a serial chain, so the memory
// parallelism comes from staging: the block's 8 warps load a kCsRows x 32 tile of part into
// shared memory, then warp 0 adds it up (lane = column) while the next tile's loads, already
// issued into registers, are in flight. With a plain loop per column only n threads would
// each have a few loads in flight (n = 1536, nparts = 1024: tens of microseconds).
constexpr int kCsCols = 32, kCsRows = 128, kCsThreads = 256;
constexpr int kCsPerThread = kCsRows * kCsCols / kCsThreads;

__global__ void __launch_bounds__(kCsThreads)
    column_sum_accumulate_k(const float* __restrict__ part, int nparts, int64_t n,
                            float* __restrict__ out) {
  __shared__ float tile[kCsRows][kCsCols];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = blockIdx.x * static_cast<int64_t>(kCsCols) + lane;
  const bool live = c < n;
  float v[kCsPerThread];
  auto load = [&](int p0) {  // rows p0 + warp + 8*i of this block's columns
#pragma unroll
    for (int i = 0; i < kCsPerThread; ++i) {
      const int p = p0 + warp + i * (kCsThreads / 32);
      v[i] = live && p < nparts ? part[p * n + c] : 0.f;
    }
  };
  float s = 0.f;
  load(0);
  for (int p0 = 0; p0 < nparts; p0 += kCsRows) {
    __syncthreads();  // warp 0 has finished with the previous tile
#pragma unroll
    for (int i = 0; i < kCsPerThread; ++i) tile[warp + i * (kCsThreads / 32)][lane] = v[i];
    __syncthreads();
    if (p0 + kCsRows < nparts) load(p0 + kCsRows);
    if (warp == 0) {
      const int m = min(kCsRows, nparts - p0);
      for (int p = 0; p < m; ++p) s += tile[p][lane];
    }
  }
  if (warp == 0 && live) out[c] += s;
}

}  // namespace

void column_sum_accumulate(const float* part, int nparts, int64_t n, float* out,
                           cudaStream_t stream) {
  if (n <= 0) return;
  column_sum_accumulate_k<<<grid_for(n, kCsCols, INT32_MAX), kCsThreads, 0, stream>>>(
      part, nparts, n, out);
  check_launch("column_sum_accumulate");
}

void add_rmsnorm_fwd(const void* x, DType xdt, const float* residual_in, const float* weight,
                     int64_t ntok, int64_t dim, float eps, float* residual_out, void* y,
                     DType ydt, float* rstd, cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  const unsigned grid = static_cast<unsigned>(ntok);
  if (xdt == DType::BF16 && ydt == DType::BF16 && vec_shape_ok(dim) && aligned16(x) &&
      aligned16(residual_in) && aligned16(weight) && aligned16(residual_out) && aligned16(y)) {
    add_rmsnorm_fwd_vec_k<<<grid, static_cast<int>(dim / kVec), 0, stream>>>(
        static_cast<const bf16*>(x), residual_in, weight, dim, 1.f / static_cast<float>(dim),
        eps, residual_out, static_cast<bf16*>(y), rstd);
    check_launch("add_rmsnorm_fwd");
    return;
  }
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
  float* part = static_cast<float*>(ws);
  if (dydt == DType::BF16 && vec_shape_ok(dim) && aligned16(dy) && aligned16(dres_next) &&
      aligned16(residual_out) && aligned16(weight) && aligned16(d_residual) &&
      aligned16(part)) {
    const int threads = static_cast<int>(dim / kVec);
    const size_t smem = add_bwd_vec_smem(threads);
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(add_rmsnorm_bwd_vec_k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem));
    add_rmsnorm_bwd_vec_k<<<nb, threads, smem, stream>>>(
        static_cast<const bf16*>(dy), dres_next, residual_out, weight, rstd, ntok, dim,
        1.f / static_cast<float>(dim), d_residual, part);
    check_launch("add_rmsnorm_bwd");
    column_sum_accumulate(part, nb, dim, dweight, stream);
    return;
  }
  const int block = block_for(dim);
  const size_t smem = dim * sizeof(float);
  if (smem > 200 * 1024) fail("cuda add_rmsnorm_bwd: dim ", dim, " is too large");
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
