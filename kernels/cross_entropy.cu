// Softmax cross-entropy over one block of fp32 logits, dlogits written in bf16 in place.
#include <cfloat>

#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // elements per thread per in-place chunk

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

__global__ void __launch_bounds__(kThreads)
    ce_block_k(float* __restrict__ logits, int64_t vocab, const int32_t* __restrict__ targets,
               float grad_scale, double* __restrict__ stats, bool write_grad) {
  __shared__ MaxSum sh[32];
  const int64_t row = blockIdx.x;
  float* L = logits + row * vocab;
  const int32_t tgt = targets[row];
  const bool counted = tgt >= 0 && tgt < vocab;

  MaxSum a{-INFINITY, 0.f, INT64_MAX};
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float x = L[j];
    if (x > a.m) {
      a.s = (a.m == -INFINITY ? 0.f : a.s * __expf(a.m - x)) + 1.f;
      a.m = x;
      a.i = j;
    } else {
      a.s += __expf(x - a.m);
    }
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
  const float lse = a.m + logf(a.s);

  if (counted && threadIdx.x == 0) {
    const float loss = lse - L[tgt];
    atomicAdd(stats + 0, static_cast<double>(loss));
    atomicAdd(stats + 1, 1.0);
    if (a.i == tgt) atomicAdd(stats + 2, 1.0);
  }
  if (!write_grad) return;

  // In place: bf16 element j of the row lives inside fp32 element j/2 <= j, so once a chunk's
  // fp32 values are all in registers, writing that chunk's bf16 values clobbers nothing unread.
  bf16* G = reinterpret_cast<bf16*>(L);
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

}  // namespace

void ce_block(float* logits, int64_t rows, int64_t vocab, const int32_t* targets,
              float grad_scale, double* stats, bool write_grad, cudaStream_t stream) {
  if (rows <= 0) return;
  if (rows > INT32_MAX) fail("cuda lm_head_ce: too many rows in one block");
  ce_block_k<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, vocab, targets,
                                                                   grad_scale, stats,
                                                                   write_grad);
  check_launch("ce_block");
}

}  // namespace ssd::cuda
