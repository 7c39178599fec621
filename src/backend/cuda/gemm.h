// bf16 GEMMs with fp32 accumulation through cuBLASLt, in row-major terms.
// One Gemm per backend (per stream). Plans (descriptors + the heuristic's algorithm) are
// cached by shape, strides and pointer alignment, so steady-state calls do no heuristic query.
#pragma once
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

#include "core/tensor.h"

namespace ssd::cuda {

using bf16 = __nv_bfloat16;

class Gemm {
 public:
  explicit Gemm(cudaStream_t stream);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // All matrices row-major with the given row strides (elements). Y is bf16 or f32 (ydt);
  // Y = alpha * product + beta * Y.
  // Y[M,N] = X[M,K] . W[N,K]^T
  void nt(int64_t M, int64_t N, int64_t K, const bf16* X, int64_t ldx, const bf16* W,
          int64_t ldw, void* Y, DType ydt, int64_t ldy, float alpha, float beta);
  // Y[M,N] = A[M,K] . B[K,N]
  void nn(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B,
          int64_t ldb, void* Y, DType ydt, int64_t ldy, float alpha, float beta);
  // Y[M,N] = A[K,M]^T . B[K,N]
  void tn(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B,
          int64_t ldb, void* Y, DType ydt, int64_t ldy, float alpha, float beta);

 private:
  // Column-major D[m,n] = alpha * op(A)[m,k] . op(B)[k,n] + beta * D.
  void colmajor(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* A, int64_t lda,
                const void* B, int64_t ldb, void* D, DType ddt, int64_t ldd, float alpha,
                float beta);

  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                         int, int, int, bool>;
  Plan& plan(const Key& key);

  cudaStream_t stream_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, Plan> plans_;
};

}  // namespace ssd::cuda
