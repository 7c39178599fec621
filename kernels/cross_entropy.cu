// Softmax cross-entropy over one block of fp32 logits, dlogits written in bf16 in place.
// Stats are deterministic: each row stores its {loss, counted, hit} to a workspace slot, then
// one block sums the rows in a fixed order and adds the sums to stats (no atomics).
#include <algorithm>
#include <cfloat>

#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

constexpr int kThreads = 1024;  // ce_block_k: one row at a time per block
constexpr int kReduceThreads = 256;  // ce_stats_reduce_k
constexpr int kPerThread = 8;  // elements per thread per in-place chunk (scalar path)
constexpr int kVec = 2;        // float4 loads per thread per step (vector path)

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

struct MaxSum {
  float m;    // running max
  float s;    // sum of exp(x - m)
  int64_t i;  // first index of the max
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  MaxSum r;
  r.m = fmaxf(a.m, b.m);
  const float ea = a.m == -INFINITY ? 0.f : __expf(a.m - r.m);
  const float eb = b.m == -INFINITY ? 0.f : __expf(b.m - r.m);
  r.s = a.s * ea + b.s * eb;
  r.i = (b.m > a.m || (b.m == a.m && b.i < a.i)) ? b.i : a.i;
  return r;
}

// The max, the sum of exp(x - max) and the first index of the max of one row, over the block
// (every thread gets the result). Each thread visits its elements in increasing index order
// (ties keep the first index), then warps and the block combine in a fixed order. `sh` is
// read by every thread after the call: the caller syncs before its next use.
__device__ __forceinline__ MaxSum row_max_sum(const float* __restrict__ L, int64_t vocab,
                                              MaxSum* sh) {
  const bool vec4 = (vocab & 3) == 0;  // rows 16-byte aligned (the buffer is)
  MaxSum a{-INFINITY, 0.f, INT64_MAX};
  auto visit = [&a](float x, int64_t j) {
    if (x > a.m) {
      a.s = (a.m == -INFINITY ? 0.f : a.s * __expf(a.m - x)) + 1.f;
      a.m = x;
      a.i = j;
    } else {
      a.s += __expf(x - a.m);
    }
  };
  if (vec4) {  // 16-byte loads, kVec of them in flight per thread
    const float4* L4 = reinterpret_cast<const float4*>(L);
    const int64_t n4 = vocab >> 2;
    for (int64_t base = threadIdx.x; base < n4; base += kVec * blockDim.x) {
      float4 v[kVec];
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        const int64_t q = base + u * blockDim.x;
        if (q < n4) v[u] = L4[q];
      }
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        const int64_t q = base + u * blockDim.x;
        if (q < n4) {
          visit(v[u].x, 4 * q);
          visit(v[u].y, 4 * q + 1);
          visit(v[u].z, 4 * q + 2);
          visit(v[u].w, 4 * q + 3);
        }
      }
    }
  } else {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) visit(L[j], j);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum b;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
    b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
    b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
    a = combine(a, b);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) sh[warp] = a;
  __syncthreads();
  a = sh[0];
  for (int k = 1; k < nwarps; ++k) a = combine(a, sh[k]);  // same order in every thread
  return a;
}

// Row L's dlogits = grad_scale * (exp(x - lse) - [j == tgt]) (zeros if !counted), written in
// bf16 IN PLACE over its fp32 logits, by the whole block. `tgt` is a column of the row or
// outside [0, vocab) (the target lies on another rank).
//
// In place: bf16 element j of the row lives inside fp32 element j/2 <= j, so once a chunk's
// fp32 values are all in registers, writing that chunk's bf16 values clobbers nothing unread.
__device__ __forceinline__ void row_dlogits(float* __restrict__ L, int64_t vocab, int64_t tgt,
                                            bool counted, float lse, float grad_scale) {
  const bool vec4 = (vocab & 3) == 0;
  bf16* G = reinterpret_cast<bf16*>(L);
  if (vec4) {  // the same with float4 loads and 4-element bf16 stores (bytes [8q, 8q+8) of the
               // row lie before the fp32 element 4q they replace, and before any later chunk)
    const float4* L4 = reinterpret_cast<const float4*>(L);
    const int64_t n4 = vocab >> 2;
    const int64_t chunk4 = static_cast<int64_t>(blockDim.x) * kVec;
    for (int64_t base = 0; base < n4; base += chunk4) {
      float4 v[kVec];
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        const int64_t q = base + u * blockDim.x + threadIdx.x;
        if (q < n4) v[u] = L4[q];
      }
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        const int64_t q = base + u * blockDim.x + threadIdx.x;
        if (q >= n4) continue;
        const float x[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
        float d[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          d[e] = counted ? grad_scale * (__expf(x[e] - lse) - (4 * q + e == tgt ? 1.f : 0.f))
                         : 0.f;
        uint2 pk;
        pk.x = pack2(d[0], d[1]);
        pk.y = pack2(d[2], d[3]);
        *reinterpret_cast<uint2*>(G + 4 * q) = pk;
      }
      __syncthreads();
    }
    return;
  }
  const int64_t chunk = static_cast<int64_t>(blockDim.x) * kPerThread;
  for (int64_t base = 0; base < vocab; base += chunk) {
    float v[kPerThread];
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t j = base + e * blockDim.x + threadIdx.x;
      v[e] = j < vocab ? L[j] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t j = base + e * blockDim.x + threadIdx.x;
      if (j < vocab) {
        float d = 0.f;
        if (counted) d = grad_scale * (__expf(v[e] - lse) - (j == tgt ? 1.f : 0.f));
        G[j] = from_f<bf16>(d);
      }
    }
    __syncthreads();
  }
}

// One block per SM walks rows (persistent): the rows in flight at once (one per block, ~200 KB
// each at a 50K vocab) fit in L2, so the second pass over a row (the gradient) reads it from
// L2 instead of DRAM.
__global__ void __launch_bounds__(kThreads)
    ce_block_k(float* __restrict__ logits, int64_t rows, int64_t vocab,
               const int32_t* __restrict__ targets, float grad_scale,
               double* __restrict__ row_stats, bool write_grad) {
  __shared__ MaxSum sh[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    __syncthreads();  // sh of the previous row is consumed
    float* L = logits + row * vocab;
    const int32_t tgt = targets[row];
    const bool counted = tgt >= 0 && tgt < vocab;
    const MaxSum a = row_max_sum(L, vocab, sh);
    const float lse = a.m + logf(a.s);
    if (threadIdx.x == 0) {  // this row's slot, written even when not counted (zeros)
      double loss = 0.0, n = 0.0, hit = 0.0;
      if (counted) {
        loss = static_cast<double>(lse - L[tgt]);
        n = 1.0;
        hit = a.i == tgt ? 1.0 : 0.0;
      }
      double* o = row_stats + 3 * row;
      o[0] = loss;
      o[1] = n;
      o[2] = hit;
    }
    if (write_grad) row_dlogits(L, vocab, tgt, counted, lse, grad_scale);
  }
}

// ------------------------------------------------------------------- vocabulary-parallel form

// Per row of this rank's logits (columns = vocabulary rows [row0, row0 + vocab) of `total`):
// part[row] = {max, sum of exp(x - max), the target's logit if this rank holds it else 0,
// row0 + the first index of the max}; {0, 0, 0, -1} for rows whose target is not counted.
__global__ void __launch_bounds__(kThreads)
    ce_partial_k(const float* __restrict__ logits, int64_t rows, int64_t vocab, int64_t row0,
                 int64_t total, const int32_t* __restrict__ targets, float* __restrict__ part) {
  __shared__ MaxSum sh[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int32_t tgt = targets[row];
    float* o = part + 4 * row;
    if (!(tgt >= 0 && tgt < total)) {  // the same for the whole block
      if (threadIdx.x == 0) o[0] = 0.f, o[1] = 0.f, o[2] = 0.f, o[3] = -1.f;
      continue;
    }
    __syncthreads();  // sh of the previous row is consumed
    const float* L = logits + row * vocab;
    const MaxSum a = row_max_sum(L, vocab, sh);
    if (threadIdx.x == 0) {
      const int64_t col = tgt - row0;
      o[0] = a.m;
      o[1] = a.s;
      o[2] = col >= 0 && col < vocab ? L[col] : 0.f;
      o[3] = static_cast<float>(row0 + a.i);
    }
  }
}

// One thread per row: the ranks' parts (all [ranks, rows, 4]) combined. lse[row] for the
// gradient; row_stats as ce_block_k's. The global argmax is the largest max, the smallest
// index among equal ones (the first maximum in vocabulary order); the target's logit is the
// sum of the parts' third entries (all but its owner's are 0: exact).
__global__ void ce_combine_k(const float* __restrict__ all, int ranks, int64_t rows,
                             int64_t total, const int32_t* __restrict__ targets,
                             float* __restrict__ lse_out, double* __restrict__ row_stats) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  const int32_t tgt = targets[row];
  double* o = row_stats + 3 * row;
  if (!(tgt >= 0 && tgt < total)) {
    lse_out[row] = 0.f;
    o[0] = o[1] = o[2] = 0.0;
    return;
  }
  float M = -INFINITY, best = -1.f;
  for (int r = 0; r < ranks; ++r) {
    const float* a = all + (r * rows + row) * 4;
    if (a[0] > M || (a[0] == M && a[3] < best)) M = a[0], best = a[3];
  }
  float S = 0.f, tl = 0.f;
  for (int r = 0; r < ranks; ++r) {
    const float* a = all + (r * rows + row) * 4;
    S += a[0] == -INFINITY ? 0.f : a[1] * expf(a[0] - M);
    tl += a[2];
  }
  const float lse = M + logf(S);
  lse_out[row] = lse;
  o[0] = static_cast<double>(lse - tl);
  o[1] = 1.0;
  o[2] = best == static_cast<float>(tgt) ? 1.0 : 0.0;
}

// dlogits of this rank's columns, in place as in ce_block_k, from the combined lse.
__global__ void __launch_bounds__(kThreads)
    ce_shard_grad_k(float* __restrict__ logits, int64_t rows, int64_t vocab, int64_t row0,
                    int64_t total, const int32_t* __restrict__ targets,
                    const float* __restrict__ lse, float grad_scale) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int32_t tgt = targets[row];
    row_dlogits(logits + row * vocab, vocab, tgt - row0, tgt >= 0 && tgt < total, lse[row],
                grad_scale);
  }
}

// stats[k] += sum over rows of row_stats[row][k], k < 3: one block; thread t sums rows t,
// t + kReduceThreads, ... in order, then a fixed shared-memory tree. Same order on every run.
__global__ void __launch_bounds__(kReduceThreads)
    ce_stats_reduce_k(const double* __restrict__ row_stats, int64_t rows,
                      double* __restrict__ stats) {
  __shared__ double sh[3][kReduceThreads];
  const int t = threadIdx.x;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  for (int64_t r = t; r < rows; r += kReduceThreads) {
    s0 += row_stats[3 * r];
    s1 += row_stats[3 * r + 1];
    s2 += row_stats[3 * r + 2];
  }
  tree_sum3(sh, s0, s1, s2);
  if (t == 0) {
    stats[0] += sh[0][0];
    stats[1] += sh[1][0];
    stats[2] += sh[2][0];
  }
}

unsigned persistent_grid(int64_t rows) {
  static int sms = [] {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      n = 132;
    return n;
  }();
  return static_cast<unsigned>(std::min<int64_t>(rows, sms));
}

}  // namespace

size_t ce_block_workspace_bytes(int64_t rows) {
  return static_cast<size_t>(std::max<int64_t>(rows, 1)) * 3 * sizeof(double);
}

void ce_block(float* logits, int64_t rows, int64_t vocab, const int32_t* targets,
              float grad_scale, double* stats, bool write_grad, void* ws, cudaStream_t stream) {
  if (rows <= 0) return;
  if (rows > INT32_MAX) fail("cuda lm_head_ce: too many rows in one block");
  double* row_stats = static_cast<double*>(ws);
  const unsigned grid = persistent_grid(rows);
  ce_block_k<<<grid, kThreads, 0, stream>>>(logits, rows, vocab, targets, grad_scale, row_stats,
                                            write_grad);
  check_launch("ce_block");
  ce_stats_reduce_k<<<1, kReduceThreads, 0, stream>>>(row_stats, rows, stats);
  check_launch("ce_stats_reduce");
}

void ce_shard_partial(const float* logits, int64_t rows, int64_t vocab, int64_t row0,
                      int64_t total, const int32_t* targets, float* part, cudaStream_t stream) {
  if (rows <= 0) return;
  if (rows > INT32_MAX) fail("cuda lm_head_ce: too many rows in one block");
  ce_partial_k<<<persistent_grid(rows), kThreads, 0, stream>>>(logits, rows, vocab, row0, total,
                                                               targets, part);
  check_launch("ce_partial");
}

size_t ce_shard_workspace_bytes(int64_t rows) {
  const size_t r = static_cast<size_t>(std::max<int64_t>(rows, 1));
  return r * 3 * sizeof(double) + r * sizeof(float);
}

void ce_shard_finish(float* logits, int64_t rows, int64_t vocab, int64_t row0, int64_t total,
                     const int32_t* targets, const float* all, int ranks, float grad_scale,
                     double* stats, bool write_grad, void* ws, cudaStream_t stream) {
  if (rows <= 0) return;
  if (rows > INT32_MAX) fail("cuda lm_head_ce: too many rows in one block");
  double* row_stats = static_cast<double*>(ws);
  float* lse = reinterpret_cast<float*>(row_stats + 3 * rows);
  ce_combine_k<<<grid_for(rows, 256), 256, 0, stream>>>(all, ranks, rows, total, targets, lse,
                                                        row_stats);
  check_launch("ce_combine");
  ce_stats_reduce_k<<<1, kReduceThreads, 0, stream>>>(row_stats, rows, stats);
  check_launch("ce_stats_reduce");
  if (!write_grad) return;
  ce_shard_grad_k<<<persistent_grid(rows), kThreads, 0, stream>>>(logits, rows, vocab, row0,
                                                                  total, targets, lse,
                                                                  grad_scale);
  check_launch("ce_shard_grad");
}

}  // namespace ssd::cuda
