#include "backend/cuda/gemm.h"

#include <string>

#include "core/error.h"

namespace ssd::cuda {
namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;  // what cuBLAS recommends for Hopper

void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    fail("cuBLASLt ", what, " failed: ", cublasGetStatusString(s), " (", static_cast<int>(s),
         ")");
}

int alignment(const void* p) {
  auto v = reinterpret_cast<uintptr_t>(p);
  int a = 16;
  while (a > 1 && (v % a) != 0) a /= 2;
  return a;
}

cudaDataType cuda_type(DType t) {
  switch (t) {
    case DType::BF16: return CUDA_R_16BF;
    case DType::F32: return CUDA_R_32F;
    default: fail("cuda gemm: output dtype ", dtype_name(t), " is not supported (bf16 or f32)");
  }
}

}  // namespace

Gemm::Gemm(cudaStream_t stream) : stream_(stream) {
  check(cublasLtCreate(&handle_), "cublasLtCreate");
  cudaError_t e = cudaMalloc(&workspace_, kWorkspaceBytes);
  if (e != cudaSuccess) fail("cuda gemm: cannot allocate the cuBLASLt workspace: ", cudaGetErrorString(e));
  workspace_bytes_ = kWorkspaceBytes;
}

Gemm::~Gemm() {
  for (auto& [k, p] : plans_) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.d);
    cublasLtMatmulDescDestroy(p.op);
  }
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

Gemm::Plan& Gemm::plan(const Key& key) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  const auto [ta, tb, m, n, k, lda, ldb, ldd, dtype_d, al_a, al_b, al_d, accumulate] = key;
  Plan p;
  check(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
  cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)),
        "set TRANSA");
  check(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)),
        "set TRANSB");
  check(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, ta ? k : m, ta ? m : k, lda),
        "layout A");
  check(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, tb ? n : k, tb ? k : n, ldb),
        "layout B");
  check(cublasLtMatrixLayoutCreate(&p.d, static_cast<cudaDataType>(dtype_d), m, n, ldd),
        "layout D");

  cublasLtMatmulPreference_t pref;
  check(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate");
  uint64_t ws = workspace_bytes_;
  uint32_t aa = al_a, ab = al_b, ad = al_d;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                       sizeof(ws));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa,
                                       sizeof(aa));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab,
                                       sizeof(ab));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ad,
                                       sizeof(ad));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ad,
                                       sizeof(ad));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.d, p.d, pref, 1,
                                                    &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (s != CUBLAS_STATUS_SUCCESS || found == 0) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.d);
    cublasLtMatmulDescDestroy(p.op);
    fail("cuBLASLt found no algorithm for a ", m, "x", n, "x", k, " bf16 GEMM (op ",
         ta ? "T" : "N", tb ? "T" : "N", ", ld ", lda, "/", ldb, "/", ldd, ", alignment ", al_a,
         "/", al_b, "/", al_d, " bytes): ", cublasGetStatusString(s));
  }
  p.algo = res.algo;
  (void)accumulate;
  return plans_.emplace(key, p).first->second;
}

void Gemm::colmajor(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* A,
                    int64_t lda, const void* B, int64_t ldb, void* D, DType ddt, int64_t ldd,
                    float alpha, float beta) {
  if (m <= 0 || n <= 0) return;
  const cudaDataType dt = cuda_type(ddt);
  if (k <= 0) {  // empty product: D = beta * D
    if (beta == 0.f) {
      for (int64_t j = 0; j < n; ++j) {
        cudaError_t e = cudaMemsetAsync(static_cast<char*>(D) + j * ldd * dtype_size(ddt), 0,
                                        m * dtype_size(ddt), stream_);
        if (e != cudaSuccess) fail("cuda gemm: memset: ", cudaGetErrorString(e));
      }
    } else if (beta != 1.f) {
      fail("cuda gemm: k = 0 with beta ", beta, " is not supported");
    }
    return;
  }
  Key key{ta, tb, m, n, k, lda, ldb, ldd, static_cast<int>(dt), alignment(A), alignment(B),
          alignment(D), beta != 0.f};
  Plan& p = plan(key);
  check(cublasLtMatmul(handle_, p.op, &alpha, A, p.a, B, p.b, &beta, D, p.d, D, p.d, &p.algo,
                       workspace_, workspace_bytes_, stream_),
        "Matmul");
}

// Row-major Y[M,N] is column-major Y^T[N,M] with the same stride.
void Gemm::nt(int64_t M, int64_t N, int64_t K, const bf16* X, int64_t ldx, const bf16* W,
              int64_t ldw, void* Y, DType ydt, int64_t ldy, float alpha, float beta) {
  // Y^T[N,M] = W[N,K] (col-major: K x N stored, transposed) . X^T[K,M] (col-major K x M)
  colmajor(true, false, N, M, K, W, ldw, X, ldx, Y, ydt, ldy, alpha, beta);
}

void Gemm::nn(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B,
              int64_t ldb, void* Y, DType ydt, int64_t ldy, float alpha, float beta) {
  // Y^T[N,M] = B^T[N,K] (col-major N x K stored) . A^T[K,M] (col-major K x M stored)
  colmajor(false, false, N, M, K, B, ldb, A, lda, Y, ydt, ldy, alpha, beta);
}

void Gemm::tn(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B,
              int64_t ldb, void* Y, DType ydt, int64_t ldy, float alpha, float beta) {
  // Y^T[N,M] = B^T[N,K] (col-major N x K stored) . A[K,M] (col-major M x K stored, transposed)
  colmajor(false, true, N, M, K, B, ldb, A, lda, Y, ydt, ldy, alpha, beta);
}

}  // namespace ssd::cuda
