// Multi-tensor kernels for the optimizer: sum of squares (gradient norm) and AdamW.
#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

constexpr int kThreads = 256;

// Index of the tensor holding `tile`: the last entry with tile0 <= tile (empty tensors own no
// tile and are skipped because a later entry has the same tile0).
template <class Desc>
__device__ __forceinline__ int find_tensor(const Desc* table, int n, int64_t tile) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[mid].tile0 <= tile) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <class T>
__device__ __forceinline__ float tile_sumsq(const T* p, int64_t n) {
  float f = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float x = to_f(p[i]);
    f += x * x;
  }
  return f;
}

__global__ void __launch_bounds__(kThreads)
    sum_squares_k(const SqTensor* __restrict__ table, int nt, int64_t ntiles,
                  double* __restrict__ partials) {
  __shared__ double sh[32];
  double acc = 0.0;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const SqTensor d = table[find_tensor(table, nt, tile)];
    const int64_t off = (tile - d.tile0) * kTile;
    const int64_t n = min(kTile, d.n - off);
    float f = 0.f;
    switch (static_cast<DType>(d.dtype)) {
      case DType::F32: f = tile_sumsq(static_cast<const float*>(d.p) + off, n); break;
      case DType::BF16: f = tile_sumsq(static_cast<const bf16*>(d.p) + off, n); break;
      case DType::F64: {
        const double* p = static_cast<const double*>(d.p) + off;
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += p[i] * p[i];
        break;
      }
      default: break;
    }
    acc += f;
  }
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(1024)
    sum_partials_k(const double* __restrict__ partials, int n, double* __restrict__ out) {
  __shared__ double sh[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) *out = acc;
}

__global__ void __launch_bounds__(kThreads)
    adamw_k(const AdamWTensor* __restrict__ table, int nt, int64_t ntiles, AdamWScalars s) {
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const AdamWTensor d = table[find_tensor(table, nt, tile)];
    const int64_t off = (tile - d.tile0) * kTile;
    const int64_t n = min(kTile, d.n - off);
    const float decay = 1.f - s.lr * d.weight_decay;
    float* p = d.p + off;
    const float* g = d.g + off;
    float* m = d.m + off;
    float* v = d.v + off;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float gi = g[i] * s.grad_scale;
      const float mi = s.beta1 * m[i] + (1.f - s.beta1) * gi;
      const float vi = s.beta2 * v[i] + (1.f - s.beta2) * gi * gi;
      m[i] = mi;
      v[i] = vi;
      const float denom = sqrtf(vi) * s.inv_sqrt_bc2 + s.eps;
      p[i] = p[i] * decay - s.step_size * mi / denom;
    }
  }
}

}  // namespace

size_t sum_squares_workspace_bytes() { return kSumSquaresBlocks * sizeof(double); }

void sum_squares(const SqTensor* table, int ntensors, int64_t ntiles, double* out, void* ws,
                 cudaStream_t stream) {
  double* partials = static_cast<double*>(ws);
  const int grid = static_cast<int>(std::min<int64_t>(std::max<int64_t>(ntiles, 1),
                                                      kSumSquaresBlocks));
  if (ntensors > 0 && ntiles > 0) {
    sum_squares_k<<<grid, kThreads, 0, stream>>>(table, ntensors, ntiles, partials);
    check_launch("sum_squares");
    sum_partials_k<<<1, 1024, 0, stream>>>(partials, grid, out);
  } else {
    sum_partials_k<<<1, 1024, 0, stream>>>(partials, 0, out);
  }
  check_launch("sum_squares final");
}

void adamw(const AdamWTensor* table, int ntensors, int64_t ntiles, const AdamWScalars& s,
           cudaStream_t stream) {
  if (ntensors <= 0 || ntiles <= 0) return;
  const int grid = static_cast<int>(std::min<int64_t>(ntiles, 132 * 16));
  adamw_k<<<grid, kThreads, 0, stream>>>(table, ntensors, ntiles, s);
  check_launch("adamw");
}

}  // namespace ssd::cuda
