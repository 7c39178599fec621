// Embedding lookup and its deterministic backward pass.
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

template <class TW, class TO>
__global__ void embedding_fwd_k(const int32_t* __restrict__ tokens, const TW* __restrict__ w,
                                int64_t vocab, int64_t dim, TO* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int32_t tok = tokens[t];
  const bool ok = tok >= 0 && tok < vocab;
  const TW* src = w + (ok ? tok : 0) * dim;
  TO* dst = out + t * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x)
    dst[c] = from_f<TO>(ok ? to_f(src[c]) : 0.f);
}

// keys = token (invalid -> vocab, sorted last and skipped), vals = row index.
__global__ void embedding_keys_k(const int32_t* __restrict__ tokens, int64_t ntok, int64_t vocab,
                                 int32_t* __restrict__ keys, int32_t* __restrict__ vals) {
  int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= ntok) return;
  int32_t tok = tokens[i];
  keys[i] = (tok >= 0 && tok < vocab) ? tok : static_cast<int32_t>(vocab);
  vals[i] = static_cast<int32_t>(i);
}

// One block per sorted position; the first position of each run of equal tokens sums the run's
// rows in order (the sort is stable, so in token order) and adds the sum to dweight.
template <class TD>
__global__ void embedding_bwd_k(const int32_t* __restrict__ keys, const int32_t* __restrict__ rows,
                                int64_t ntok, int64_t vocab, int64_t dim,
                                const TD* __restrict__ dout, float* __restrict__ dweight) {
  const int64_t i = blockIdx.x;
  const int32_t key = keys[i];
  if (key >= vocab || (i > 0 && keys[i - 1] == key)) return;
  int64_t end = i + 1;
  while (end < ntok && keys[end] == key) ++end;
  for (int64_t c = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; c < dim;
       c += (int64_t)gridDim.y * blockDim.x) {
    float acc = 0.f;
    for (int64_t j = i; j < end; ++j) acc += to_f(dout[rows[j] * dim + c]);
    dweight[key * dim + c] += acc;
  }
}

int end_bit_for(int64_t vocab) {
  int bits = 1;
  while (bits < 31 && (int64_t(1) << bits) <= vocab) ++bits;  // keys are in [0, vocab]
  return bits;
}

size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

size_t sort_temp_bytes(int64_t ntok, int64_t vocab) {
  size_t temp = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, temp, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr),
                                  static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<int>(ntok), 0,
                                  end_bit_for(vocab));
  return temp;
}

}  // namespace

void embedding_fwd(const int32_t* tokens, int64_t ntok, const void* weight, DType wdt,
                   int64_t vocab, int64_t dim, void* out, DType odt, cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  const int block = dim >= 256 ? 256 : 128;
  auto go = [&](auto* w, auto* o) {
    embedding_fwd_k<<<static_cast<unsigned>(ntok), block, 0, stream>>>(tokens, w, vocab, dim, o);
  };
  if (wdt == DType::BF16 && odt == DType::BF16)
    go(static_cast<const bf16*>(weight), static_cast<bf16*>(out));
  else if (wdt == DType::F32 && odt == DType::BF16)
    go(static_cast<const float*>(weight), static_cast<bf16*>(out));
  else if (wdt == DType::BF16 && odt == DType::F32)
    go(static_cast<const bf16*>(weight), static_cast<float*>(out));
  else if (wdt == DType::F32 && odt == DType::F32)
    go(static_cast<const float*>(weight), static_cast<float*>(out));
  else
    fail("cuda embedding_fwd: unsupported dtypes weight ", dtype_name(wdt), ", out ",
         dtype_name(odt));
  check_launch("embedding_fwd");
}

size_t embedding_bwd_workspace_bytes(int64_t ntok, int64_t vocab) {
  if (ntok <= 0) return 0;
  return 4 * align256(ntok * sizeof(int32_t)) + align256(sort_temp_bytes(ntok, vocab));
}

void embedding_bwd(const int32_t* tokens, int64_t ntok, const void* dout, DType ddt,
                   int64_t vocab, int64_t dim, float* dweight, void* ws, cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  if (ntok > INT32_MAX) fail("cuda embedding_bwd: too many tokens (", ntok, ")");
  char* p = static_cast<char*>(ws);
  const size_t arr = align256(ntok * sizeof(int32_t));
  int32_t* keys_in = reinterpret_cast<int32_t*>(p);
  int32_t* vals_in = reinterpret_cast<int32_t*>(p + arr);
  int32_t* keys_out = reinterpret_cast<int32_t*>(p + 2 * arr);
  int32_t* vals_out = reinterpret_cast<int32_t*>(p + 3 * arr);
  void* temp = p + 4 * arr;
  size_t temp_bytes = sort_temp_bytes(ntok, vocab);

  embedding_keys_k<<<grid_for(ntok, 256, INT32_MAX), 256, 0, stream>>>(tokens, ntok, vocab,
                                                                       keys_in, vals_in);
  check_launch("embedding_keys");
  cudaError_t e = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, vals_in,
                                                  vals_out, static_cast<int>(ntok), 0,
                                                  end_bit_for(vocab), stream);
  if (e != cudaSuccess) fail("cuda embedding_bwd: radix sort failed: ", cudaGetErrorString(e));

  const int block = dim >= 256 ? 256 : 128;
  dim3 grid(static_cast<unsigned>(ntok), static_cast<unsigned>(std::min<int64_t>(
                                               (dim + block - 1) / block, 65535)));
  if (ddt == DType::BF16)
    embedding_bwd_k<<<grid, block, 0, stream>>>(keys_out, vals_out, ntok, vocab, dim,
                                                static_cast<const bf16*>(dout), dweight);
  else if (ddt == DType::F32)
    embedding_bwd_k<<<grid, block, 0, stream>>>(keys_out, vals_out, ntok, vocab, dim,
                                                static_cast<const float*>(dout), dweight);
  else
    fail("cuda embedding_bwd: dout must be bf16 or f32, got ", dtype_name(ddt));
  check_launch("embedding_bwd");
}

}  // namespace ssd::cuda
