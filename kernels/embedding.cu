// Embedding lookup and its deterministic backward pass. The weight holds the rows of tokens
// [row0, row0 + vocab) (row0 = 0 but with a vocabulary shard); other tokens give zero rows and
// no gradient.
#include <cuda_pipeline.h>

#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

template <class TW, class TO>
__global__ void embedding_fwd_k(const int32_t* __restrict__ tokens, const TW* __restrict__ w,
                                int64_t row0, int64_t vocab, int64_t dim,
                                TO* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int64_t row = tokens[t] - row0;
  const bool ok = row >= 0 && row < vocab;
  const TW* src = w + (ok ? row : 0) * dim;
  TO* dst = out + t * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x)
    dst[c] = from_f<TO>(ok ? to_f(src[c]) : 0.f);
}

// ---------------------------------------------------------------------------------- backward
//
// dweight[tok] += the sum of the dout rows of the positions holding tok, deterministically (no
// float atomics; the summation order depends on the tokens alone):
//   - keys = token ids, radix-sorted (stable) with the row indices as values, so that equal
//     tokens form runs of consecutive sorted positions;
//   - stage 1: the sorted positions are cut into segments of seg_len, and each segment sums each
//     of its runs' rows in order. A run that lies inside one segment is its key's only
//     contribution, so it goes straight to dweight. A run that crosses a segment boundary leaves
//     a piece in each segment it touches: the segment's "head" slot for the piece continuing from
//     the previous segment (also when the run covers the whole segment), its "tail" slot for the
//     piece that starts in it and continues into the next;
//   - stage 2: for each crossing run, the segment where it starts adds up its tail and the
//     following segments' heads (shared among warps in a fixed split, combined in warp order)
//     and adds the total to dweight.
// A block never sums more than seg_len rows, whatever the token distribution: before, one very
// frequent token (thousands of rows) made one block sum them all serially.

// keys = the token's weight row (tokens outside the rows -> vocab, sorted last and skipped),
// vals = row index.
__global__ void embedding_keys_k(const int32_t* __restrict__ tokens, int64_t ntok, int64_t row0,
                                 int64_t vocab, int32_t* __restrict__ keys,
                                 int32_t* __restrict__ vals) {
  int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= ntok) return;
  const int64_t row = tokens[i] - row0;
  keys[i] = (row >= 0 && row < vocab) ? static_cast<int32_t>(row) : static_cast<int32_t>(vocab);
  vals[i] = static_cast<int32_t>(i);
}

// N consecutive elements moved as one access of N * sizeof(T) bytes (at most 16).
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// N floats from / to p, in accesses of up to 4 floats (p aligned to that).
template <int N>
__device__ __forceinline__ void load_f32(const float* p, float* out) {
  constexpr int W = N < 4 ? N : 4;
#pragma unroll
  for (int i = 0; i < N; i += W) {
    const Pack<float, W> q = *reinterpret_cast<const Pack<float, W>*>(p + i);
#pragma unroll
    for (int k = 0; k < W; ++k) out[i + k] = q.v[k];
  }
}
template <int N>
__device__ __forceinline__ void store_f32(float* p, const float* in) {
  constexpr int W = N < 4 ? N : 4;
#pragma unroll
  for (int i = 0; i < N; i += W) {
    Pack<float, W> q;
#pragma unroll
    for (int k = 0; k < W; ++k) q.v[k] = in[i + k];
    *reinterpret_cast<Pack<float, W>*>(p + i) = q;
  }
}

constexpr int kStage = 256;       // sorted positions staged in shared memory at a time
constexpr int kBatch = 8;         // rows each thread loads before summing them (loads in flight)
constexpr int kMaxBlock = 128;    // stage 1 threads per block (bounds its shared memory)
constexpr int kMinSegLen = 32;    // sorted positions per segment, at least
constexpr int kCombineWarps = 8;  // warps that share one crossing run's pieces in stage 2
constexpr int64_t kPartBytesPerToken = 256;  // workspace for the pieces, per token

// Stage 1. Block (segment, column tile); each thread owns VEC consecutive columns. The keys and
// rows of the segment are staged in shared memory. Each batch of kBatch positions costs one
// memory latency whatever the run lengths: the dweight rows of the runs that end in the batch
// and go straight to dweight are copied to shared memory (cp.async, no registers held) while the
// batch's dout rows are loaded into registers; then the rows are summed in order.
// part: [nseg][2][dim] floats, slot 0 the segment's head piece, slot 1 its tail piece.
// Dynamic shared memory: kBatch * blockDim * VEC floats.
template <class TD, int VEC>
__global__ void __launch_bounds__(kMaxBlock)
embedding_bwd_segment_k(const int32_t* __restrict__ keys, const int32_t* __restrict__ rows,
                        int64_t ntok, int64_t vocab, int64_t dim, int64_t seg_len,
                        const TD* __restrict__ dout, float* __restrict__ dweight,
                        float* __restrict__ part) {
  __shared__ int32_t skey[kStage + 1];  // skey[n]: the key after the staged ones, -1 at the end
  __shared__ int32_t srow[kStage];
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  // This thread's VEC floats of the dweight row of the batch's position u: sdw + u * stride.
  float* sdw = reinterpret_cast<float*>(dyn_smem) + threadIdx.x * VEC;
  const int stride = blockDim.x * VEC;

  const int64_t seg = blockIdx.x;
  const int64_t s0 = seg * seg_len, s1 = std::min(s0 + seg_len, ntok);
  // A run with the previous segment's last key continues from it (head); one with the next
  // segment's first key continues into it (tail). Keys are >= 0, so -1 matches nothing.
  const int32_t prev_key = s0 > 0 ? keys[s0 - 1] : -1;
  const int32_t next_key = s1 < ntok ? keys[s1] : -1;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < dim;  // dim % VEC == 0, so all VEC columns are in range
  float* head = part + (2 * seg) * dim + c0;
  float* tail = head + dim;

  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;

  for (int64_t b0 = s0; b0 < s1; b0 += kStage) {
    const int n = static_cast<int>(std::min<int64_t>(kStage, s1 - b0));
    __syncthreads();  // the previous stage's readers are done
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      skey[i] = keys[b0 + i];
      srow[i] = rows[b0 + i];
    }
    if (threadIdx.x == 0) skey[n] = b0 + n < s1 ? keys[b0 + n] : -1;  // segment end ends a run
    __syncthreads();
    if (!active) continue;  // no further barriers in this stage

    for (int j0 = 0; j0 < n; j0 += kBatch) {
      // Runs ending at position u that go straight to dweight (the test of the sums loop below).
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int j = j0 + u;
        const int32_t key = j < n ? skey[j] : -1;
        const bool direct = key >= 0 && key < vocab && skey[j + 1] != key && key != prev_key &&
                            key != next_key;
        if (direct) {
          const float* src = dweight + key * dim + c0;
          constexpr int W = VEC < 4 ? VEC : 4;
#pragma unroll
          for (int k = 0; k < VEC; k += W)
            __pipeline_memcpy_async(sdw + u * stride + k, src + k, W * sizeof(float));
        }
      }
      __pipeline_commit();
      // The batch's dout rows (zero for invalid tokens and past the stage).
      Pack<TD, VEC> v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int j = j0 + u;
        const int32_t key = j < n ? skey[j] : -1;
        if (key >= 0 && key < vocab)
          v[u] = *reinterpret_cast<const Pack<TD, VEC>*>(dout + srow[j] * dim + c0);
        else
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[u].v[k] = from_f<TD>(0.f);
      }
      __pipeline_wait_prior(0);
      // Sums in order; a run's sum goes out at its last position.
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int j = j0 + u;
        if (j >= n) break;
        const int32_t key = skey[j];
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += to_f(v[u].v[k]);
        if (skey[j + 1] == key) continue;  // the run goes on
        if (key < vocab) {
          if (key == prev_key) {
            store_f32<VEC>(head, acc);
          } else if (key == next_key) {
            store_f32<VEC>(tail, acc);
          } else {
            float dw[VEC];
            load_f32<VEC>(sdw + u * stride, dw);
#pragma unroll
            for (int k = 0; k < VEC; ++k) dw[k] += acc[k];
            store_f32<VEC>(dweight + key * dim + c0, dw);
          }
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
      }
    }
  }
}

// Stage 2. Block (segment, tile of 32 * VEC columns), kCombineWarps warps. Only a segment whose
// tail piece is set (its last run starts in it and continues into the next segment) has work:
// the run's pieces are that tail and the heads of the following segments that start with its
// key; each warp sums a contiguous share of them in order, and the shares are added in warp
// order. Tests the same conditions as stage 1 to know which slots hold pieces.
template <int VEC>
__global__ void __launch_bounds__(kCombineWarps * 32)
embedding_bwd_combine_k(const int32_t* __restrict__ keys, int64_t ntok, int64_t vocab,
                        int64_t dim, int64_t seg_len, int64_t nseg,
                        const float* __restrict__ part, float* __restrict__ dweight) {
  __shared__ __align__(16) float share[kCombineWarps][32 * VEC];
  const int64_t seg = blockIdx.x;
  const int64_t next = (seg + 1) * seg_len;  // the next segment's first position
  if (next >= ntok) return;
  const int32_t key = keys[next - 1];
  if (key >= vocab || keys[next] != key || (seg > 0 && keys[seg * seg_len - 1] == key)) return;

  // The run ends in segment last - 1: the first segment after seg that does not start with key.
  // Keys are sorted, so the segments that do are consecutive; count them blockDim at a time.
  int64_t last = seg + 1;
  for (;;) {
    const int64_t q = last + threadIdx.x;
    const int same = __syncthreads_count(q < nseg && keys[q * seg_len] == key);
    last += same;
    if (same < static_cast<int>(blockDim.x)) break;
  }

  // Piece i: i == 0 the tail of seg, else the head of seg + i.
  const int64_t npieces = last - seg;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t share_len = (npieces + kCombineWarps - 1) / kCombineWarps;
  const int64_t i0 = std::min(npieces, warp * share_len);
  const int64_t i1 = std::min(npieces, i0 + share_len);
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * 32 + lane) * VEC;
  const bool active = c0 < dim;

  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
  if (active) {
    for (int64_t b = i0; b < i1; b += kBatch) {
      float v[kBatch][VEC];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t i = b + u;
        if (i < i1) {
          const int64_t slot = i == 0 ? 2 * seg + 1 : 2 * (seg + i);
          load_f32<VEC>(part + slot * dim + c0, v[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (b + u < i1)
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += v[u][k];
    }
  }
  store_f32<VEC>(&share[warp][lane * VEC], acc);
  __syncthreads();
  if (warp == 0 && active) {
    float sum[VEC], part_sum[VEC], dw[VEC];
    load_f32<VEC>(&share[0][lane * VEC], sum);
    for (int w = 1; w < kCombineWarps; ++w) {
      load_f32<VEC>(&share[w][lane * VEC], part_sum);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum[k] += part_sum[k];
    }
    load_f32<VEC>(dweight + key * dim + c0, dw);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[k] += sum[k];
    store_f32<VEC>(dweight + key * dim + c0, dw);
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

// The workspace does not know dim, so the pieces get kPartBytesPerToken per token and the
// segments are made long enough for their pieces (two rows of dim floats per segment) to fit:
// 32 positions up to dim 1024, 64 up to 2048, ... A single segment has no pieces.
int64_t seg_len_for(int64_t ntok, int64_t dim) {
  int64_t len = kMinSegLen;
  auto piece_bytes = [&](int64_t l) { return 2 * ((ntok + l - 1) / l) * dim * int64_t(4); };
  while (len < ntok && piece_bytes(len) > ntok * kPartBytesPerToken) len *= 2;
  return len;
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <class TD>
void embedding_bwd_reduce(const int32_t* keys, const int32_t* rows, int64_t ntok, int64_t vocab,
                          int64_t dim, const TD* dout, float* dweight, float* part,
                          cudaStream_t stream) {
  const int64_t seg_len = seg_len_for(ntok, dim);
  const int64_t nseg = (ntok + seg_len - 1) / seg_len;

  // Stage 1: 16-byte dout loads where dim and the pointers allow, one column per thread if not.
  constexpr int kVec = 16 / sizeof(TD);
  const bool vec = dim % kVec == 0 && aligned(dout, 16) && aligned(dweight, 16) &&
                   aligned(part, 16);
  const int64_t col_threads = vec ? dim / kVec : dim;
  const int64_t tiles = (col_threads + kMaxBlock - 1) / kMaxBlock;
  const int block = static_cast<int>(((col_threads + tiles - 1) / tiles + 31) / 32 * 32);
  if (tiles > 65535) fail("cuda embedding_bwd: dim too large (", dim, ")");
  const dim3 grid1(static_cast<unsigned>(nseg), static_cast<unsigned>(tiles));
  const size_t smem = size_t(kBatch) * block * (vec ? kVec : 1) * sizeof(float);  // <= 32 KB
  if (vec)
    embedding_bwd_segment_k<TD, kVec><<<grid1, block, smem, stream>>>(
        keys, rows, ntok, vocab, dim, seg_len, dout, dweight, part);
  else
    embedding_bwd_segment_k<TD, 1><<<grid1, block, smem, stream>>>(
        keys, rows, ntok, vocab, dim, seg_len, dout, dweight, part);
  check_launch("embedding_bwd_segment");
  if (nseg == 1) return;  // no run crosses a segment boundary

  // Stage 2: float4 over the pieces where dim and dweight allow.
  const bool vec4 = dim % 4 == 0 && aligned(dweight, 16) && aligned(part, 16);
  const int64_t cols = vec4 ? 128 : 32;
  const dim3 grid2(static_cast<unsigned>(nseg - 1),
                   static_cast<unsigned>((dim + cols - 1) / cols));
  if (vec4)
    embedding_bwd_combine_k<4><<<grid2, kCombineWarps * 32, 0, stream>>>(
        keys, ntok, vocab, dim, seg_len, nseg, part, dweight);
  else
    embedding_bwd_combine_k<1><<<grid2, kCombineWarps * 32, 0, stream>>>(
        keys, ntok, vocab, dim, seg_len, nseg, part, dweight);
  check_launch("embedding_bwd_combine");
}

}  // namespace

void embedding_fwd(const int32_t* tokens, int64_t ntok, const void* weight, DType wdt,
                   int64_t row0, int64_t vocab, int64_t dim, void* out, DType odt,
                   cudaStream_t stream) {
  if (ntok <= 0 || dim <= 0) return;
  const int block = dim >= 256 ? 256 : 128;
  auto go = [&](auto* w, auto* o) {
    embedding_fwd_k<<<static_cast<unsigned>(ntok), block, 0, stream>>>(tokens, w, row0, vocab,
                                                                        dim, o);
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
  return 4 * align256(ntok * sizeof(int32_t)) + align256(sort_temp_bytes(ntok, vocab)) +
         align256(ntok * kPartBytesPerToken);
}

void embedding_bwd(const int32_t* tokens, int64_t ntok, const void* dout, DType ddt,
                   int64_t row0, int64_t vocab, int64_t dim, float* dweight, void* ws,
                   cudaStream_t stream) {
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

  embedding_keys_k<<<grid_for(ntok, 256, INT32_MAX), 256, 0, stream>>>(
      tokens, ntok, row0, vocab, keys_in, vals_in);
  check_launch("embedding_keys");
  cudaError_t e = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, vals_in,
                                                  vals_out, static_cast<int>(ntok), 0,
                                                  end_bit_for(vocab), stream);
  if (e != cudaSuccess) fail("cuda embedding_bwd: radix sort failed: ", cudaGetErrorString(e));

  float* part = reinterpret_cast<float*>(static_cast<char*>(temp) + align256(temp_bytes));
  if (ddt == DType::BF16)
    embedding_bwd_reduce(keys_out, vals_out, ntok, vocab, dim, static_cast<const bf16*>(dout),
                         dweight, part, stream);
  else if (ddt == DType::F32)
    embedding_bwd_reduce(keys_out, vals_out, ntok, vocab, dim, static_cast<const float*>(dout),
                         dweight, part, stream);
  else
    fail("cuda embedding_bwd: dout must be bf16 or f32, got ", dtype_name(ddt));
}

}  // namespace ssd::cuda
