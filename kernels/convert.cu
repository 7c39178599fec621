// Elementwise dtype conversion on the device (f32 / f64 / bf16 to each other, i32 copy).
#include <type_traits>

#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

template <class D, class S>
__device__ __forceinline__ D cast(S x) {
  if constexpr (std::is_same_v<S, double> && std::is_same_v<D, bf16>) {
    return __double2bfloat16(x);
  } else if constexpr (std::is_same_v<S, bf16>) {
    return static_cast<D>(__bfloat162float(x));
  } else if constexpr (std::is_same_v<D, bf16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<D>(x);
  }
}

template <class S, class D>
__global__ void convert_k(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = cast<D>(src[i]);
}

template <class S, class D>
void launch(const void* src, void* dst, int64_t n, cudaStream_t stream) {
  convert_k<S, D><<<grid_for(n, 256, 132 * 16), 256, 0, stream>>>(static_cast<const S*>(src),
                                                                  static_cast<D*>(dst), n);
  check_launch("convert");
}

template <class S>
void dispatch_dst(const void* src, void* dst, DType ddt, int64_t n, cudaStream_t stream) {
  switch (ddt) {
    case DType::F32: return launch<S, float>(src, dst, n, stream);
    case DType::F64: return launch<S, double>(src, dst, n, stream);
    case DType::BF16: return launch<S, bf16>(src, dst, n, stream);
    default: fail("cuda convert: cannot convert to ", dtype_name(ddt));
  }
}

}  // namespace

void convert(const void* src, DType sdt, void* dst, DType ddt, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (sdt == DType::I32 || ddt == DType::I32) {
    if (sdt != ddt) fail("cuda convert: ", dtype_name(sdt), " -> ", dtype_name(ddt),
                         " is not supported (i32 converts only to i32)");
    cudaError_t e = cudaMemcpyAsync(dst, src, n * 4, cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) fail("cuda convert: cudaMemcpyAsync: ", cudaGetErrorString(e));
    return;
  }
  switch (sdt) {
    case DType::F32: return dispatch_dst<float>(src, dst, ddt, n, stream);
    case DType::F64: return dispatch_dst<double>(src, dst, ddt, n, stream);
    case DType::BF16: return dispatch_dst<bf16>(src, dst, ddt, n, stream);
    default: fail("cuda convert: cannot convert from ", dtype_name(sdt));
  }
}

}  // namespace ssd::cuda
