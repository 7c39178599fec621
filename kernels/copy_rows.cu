// Row-block copy and accumulate between column slices (the conv halo of context parallelism).
#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

template <class T>
__global__ void add_rows_k(const T* __restrict__ src, int64_t lds, T* __restrict__ dst,
                           int64_t ldd, int64_t rows, int64_t width) {
  const int64_t n = rows * width;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / width, c = i % width;
    if constexpr (std::is_same_v<T, bf16>)
      dst[r * ldd + c] = __float2bfloat16_rn(__bfloat162float(dst[r * ldd + c]) +
                                             __bfloat162float(src[r * lds + c]));
    else
      dst[r * ldd + c] += src[r * lds + c];
  }
}

}  // namespace

void copy_rows(const void* src, int64_t lds, void* dst, int64_t ldd, int64_t rows, int64_t width,
               DType dtype, bool accumulate, cudaStream_t stream) {
  if (rows <= 0 || width <= 0) return;
  const size_t es = dtype == DType::BF16 ? 2 : dtype == DType::F32 ? 4 : 0;
  if (es == 0) fail("cuda copy_rows: f32 or bf16 only, got ", dtype_name(dtype));
  if (!accumulate) {
    cudaError_t e = cudaMemcpy2DAsync(dst, ldd * es, src, lds * es, width * es, rows,
                                      cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) fail("cuda copy_rows: cudaMemcpy2DAsync: ", cudaGetErrorString(e));
    return;
  }
  const int64_t n = rows * width;
  if (dtype == DType::BF16)
    add_rows_k<bf16><<<grid_for(n, 256, 132 * 8), 256, 0, stream>>>(
        static_cast<const bf16*>(src), lds, static_cast<bf16*>(dst), ldd, rows, width);
  else
    add_rows_k<float><<<grid_for(n, 256, 132 * 8), 256, 0, stream>>>(
        static_cast<const float*>(src), lds, static_cast<float*>(dst), ldd, rows, width);
  check_launch("copy_rows");
}

}  // namespace ssd::cuda
