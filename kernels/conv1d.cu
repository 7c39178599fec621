// Causal depthwise conv1d over time + SiLU, forward and backward (Mamba-2's short conv on xBC).
//
// Two paths. The vector path (K = 4, the width every model uses; C, the row strides and the
// pointers aligned for V-column accesses) gives each thread V adjacent columns and a segment of
// rows: one 8- or 16-byte access per row and tensor, a warp covering 32*V contiguous columns of a
// row, the last K-1 inputs kept in registers so that each input is read once (plus a K-1 row halo
// per segment). The scalar kernels handle the other widths and alignments.
//
// dw and dbias are deterministic: each block writes one partial (its segments added in a fixed
// order), then param_grad_sum_k adds the partials in a fixed order. The number of partials
// depends only on the shape.
//
// Packed documents (reset flags, kReset instantiations): a row that begins a document restarts
// the window of past inputs as a sequence start does, and the taps of the first rows of a walk
// see back only to their document's start (doc_pos). Without flags the kernels are unchanged.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "ops.h"

namespace ssd::cuda {
namespace {

// ---------------------------------------------------------------------------- vector path

constexpr int kVecK = 4;  // the one width compiled for the vector path
constexpr int kSegs = 4;  // row segments per block (threadIdx.y); threadIdx.x: 32 column groups
constexpr int kVecThreads = 32 * kSegs;
// Columns per thread: 8 in the forward (16-byte accesses), 4 in the backward (8-byte accesses:
// it keeps 16 floats per column in registers). Rows per thread: 33, so that a walk (33 rows, or
// 33 + K-1 = 36 in the backward) is a multiple of the unroll by K-1 = 3, which lets the register
// windows rotate back in place instead of being moved every row.
constexpr int kFwdV = 8, kFwdSeg = 33;
constexpr int kBwdV = 4, kBwdSeg = 33;
constexpr int kFwdMinBlocks = 4, kBwdMinBlocks = 4;  // blocks per SM: at most 128 registers
// Each thread streams its rows through a ring of kRing rows in shared memory, filled by cp.async
// kAhead rows ahead of use: the loads in flight (kAhead * 16 bytes a thread) hold no registers.
constexpr int kRing = 8, kAhead = kRing - 1;  // kRing: a power of 2

// V bf16 values (V = 4 or 8) as V/2 32-bit words: one 8- or 16-byte access.
template <int V>
struct alignas(2 * V) Bf16Vec {
  uint32_t u[V / 2];
};

template <int V>
__device__ __forceinline__ Bf16Vec<V> load_vec(const bf16* p) {
  static_assert(V == 4 || V == 8);
  Bf16Vec<V> r;
  if constexpr (V == 8) {
    const uint4 t = __ldg(reinterpret_cast<const uint4*>(p));
    r.u[0] = t.x, r.u[1] = t.y, r.u[2] = t.z, r.u[3] = t.w;
  } else {
    const uint2 t = __ldg(reinterpret_cast<const uint2*>(p));
    r.u[0] = t.x, r.u[1] = t.y;
  }
  return r;
}

// Asynchronous copy of one thread's V columns of a row into shared memory (16 bytes: L2 only).
template <int V>
__device__ __forceinline__ void cp_async_vec(Bf16Vec<V>* dst, const bf16* src) {
  if constexpr (V == 8)
    cp_async16(dst, src);
  else
    cp_async8(dst, src);
}

// bf16 -> f32 is exact: the bf16 bits are the high half of the float.
template <int V>
__device__ __forceinline__ void unpack(const Bf16Vec<V>& v, float (&f)[V]) {
#pragma unroll
  for (int i = 0; i < V / 2; ++i) {
    f[2 * i] = __uint_as_float(v.u[i] << 16);
    f[2 * i + 1] = __uint_as_float(v.u[i] & 0xffff0000u);
  }
}

// Round to nearest (as from_f<bf16>), low column in the low half.
template <int V>
__device__ __forceinline__ void store_vec(bf16* p, const float (&f)[V]) {
  uint32_t u[V / 2];
#pragma unroll
  for (int i = 0; i < V / 2; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    memcpy(&u[i], &h, 4);
  }
  if constexpr (V == 8)
    *reinterpret_cast<uint4*>(p) = make_uint4(u[0], u[1], u[2], u[3]);
  else
    *reinterpret_cast<uint2*>(p) = make_uint2(u[0], u[1]);
}

// This thread's taps wk[k][j] = w[(c+j)*K + k] and biases. The block's slice of w and bias is
// staged through shared memory (sw: 32*V*K floats, sb: 32*V) so that the global loads are
// coalesced whatever w's alignment; contains a barrier, so every thread of the block calls it.
template <int K, int V>
__device__ __forceinline__ void load_taps(const float* __restrict__ w,
                                          const float* __restrict__ bias, int64_t C, float* sw,
                                          float* sb, float (&wk)[K][V], float (&b)[V]) {
  const int64_t c0 = blockIdx.x * (int64_t)(32 * V);
  const int n = static_cast<int>(min(int64_t{32 * V}, C - c0));  // the block's columns
  const int tid = threadIdx.y * 32 + threadIdx.x;
  for (int i = tid; i < n * K; i += kVecThreads) sw[i] = __ldg(w + c0 * K + i);
  for (int i = tid; i < n; i += kVecThreads) sb[i] = __ldg(bias + c0 + i);
  __syncthreads();
  const int cl = threadIdx.x * V;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const bool ok = cl + j < n;
#pragma unroll
    for (int k = 0; k < K; ++k) wk[k][j] = ok ? sw[(cl + j) * K + k] : 0.f;
    b[j] = ok ? sb[cl + j] : 0.f;
  }
}

// How far back row r (at position pos of its sequence) sees inside its document: the distance
// to the nearest row at or before it that begins a document, else pos. Only values below K-1
// are exact; the taps need no more.
__device__ __forceinline__ int64_t doc_pos(const int32_t* __restrict__ reset, int64_t r,
                                           int64_t pos, int K) {
  for (int64_t j = 0; j < K - 1 && j < pos; ++j)
    if (reset[r - j]) return j;
  return pos;
}
// Bit i: row r0 + i (i < n <= 64) begins a document.
__device__ __forceinline__ uint64_t start_bits(const int32_t* __restrict__ reset, int64_t r0,
                                               int n) {
  uint64_t m = 0;
  for (int i = 0; i < n; ++i) m |= static_cast<uint64_t>(reset[r0 + i] != 0) << i;
  return m;
}

// win[k] = input row -(K-1)+k (relative to src, the segment's first row) when it lies in that
// row's sequence (pos: the first row's position in it, or in its document), else 0.
template <int K, int V>
__device__ __forceinline__ void load_window(const bf16* __restrict__ src, int ld, int pos,
                                            float (&win)[K - 1][V]) {
#pragma unroll
  for (int k = 0; k < K - 1; ++k) {
    Bf16Vec<V> v{};
    if (pos >= K - 1 - k) v = load_vec<V>(src + (k - (K - 1)) * ld);
    unpack(v, win[k]);
  }
}

// Pre-activation of column j: bias + taps over the window (older rows) and the current input x.
template <int K, int V>
__device__ __forceinline__ float conv_pre(const float (&wk)[K][V], const float (&b)[V],
                                          const float (&win)[K - 1][V], float x, int j) {
  float a = b[j];
#pragma unroll
  for (int k = 0; k < K - 1; ++k) a = fmaf(wk[k][j], win[k][j], a);
  return fmaf(wk[K - 1][j], x, a);
}

// Start of a sequence: the taps before it read zeros (causal padding).
template <int K, int V>
__device__ __forceinline__ void clear(float (&win)[K - 1][V]) {
#pragma unroll
  for (int k = 0; k < K - 1; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j) win[k][j] = 0.f;
}

// a <- (a[1..], x): shifts a window of K-1 rows by one row.
template <int K, int V>
__device__ __forceinline__ void shift_in(float (&a)[K - 1][V], const float (&x)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
#pragma unroll
    for (int k = 0; k + 1 < K - 1; ++k) a[k][j] = a[k + 1][j];
    a[K - 2][j] = x[j];
  }
}

// Forward. Block: 32 column groups of V columns x kSegs row segments of R rows; each thread
// walks its segment with the window of the K-1 previous inputs in registers, its rows arriving
// through its shared-memory ring. pos, the row's position in its sequence, is kept
// incrementally (no division per row). Offsets inside a segment are 32-bit (the host checks the
// strides), which saves registers.
template <int K, int V, int R, bool kReset>
__global__ void __launch_bounds__(kVecThreads, kFwdMinBlocks)
    conv1d_silu_fwd_vec_k(const bf16* __restrict__ in, int ld_in, int64_t ntok, int seqlen,
                          int64_t C, const float* __restrict__ w, const float* __restrict__ bias,
                          bf16* __restrict__ out, const int32_t* __restrict__ reset) {
  static_assert(R <= 64, "start_bits holds 64 rows");
  __shared__ __align__(16) float sw[32 * V * K];
  __shared__ __align__(16) float sb[32 * V];
  __shared__ Bf16Vec<V> ring[kRing][kVecThreads];
  const int64_t c = blockIdx.x * (int64_t)(32 * V) + threadIdx.x * V;
  const int64_t r0 = (blockIdx.y * (int64_t)kSegs + threadIdx.y) * R;
  const bool active = c < C && r0 < ntok;
  const int tid = threadIdx.y * 32 + threadIdx.x;
  const int n = active ? static_cast<int>(min(int64_t{R}, ntok - r0)) : 0;  // segment's rows
  const bf16* src = in + r0 * ld_in + c;
  // Row i's copy, one group per row (empty past the segment) so that groups count rows.
  auto fetch = [&](int i) {
    if (i < n) cp_async_vec<V>(&ring[i & (kRing - 1)][tid], src + i * ld_in);
    cp_async_commit();
  };
  // The first rows and the window are requested before the taps' barrier, so that the stream
  // starts without waiting for them.
  for (int i = 0; i < kAhead; ++i) fetch(i);
  int pos = active ? static_cast<int>(r0 % seqlen) : 0;
  int dpos = pos;        // the first row's position in its document
  uint64_t starts = 0;   // bit i: row i begins a document
  if constexpr (kReset) {
    if (active) {
      starts = start_bits(reset, r0, n);
      dpos = static_cast<int>(doc_pos(reset, r0, pos, K));
    }
  }
  float win[K - 1][V];
  if (active) load_window<K, V>(src, ld_in, dpos, win);
  float wk[K][V], b[V];
  load_taps<K, V>(w, bias, C, sw, sb, wk, b);  // the block's only barrier
  if (!active) return;
  const int ld_out = static_cast<int>(C);
  bf16* dst = out + r0 * C + c;
#pragma unroll (K - 1)
  for (int i = 0; i < n; ++i) {
    fetch(i + kAhead);
    cp_async_wait<kAhead>();  // row i has landed
    if (pos == seqlen) pos = 0;
    if (pos == 0) clear<K, V>(win);
    if constexpr (kReset)
      if ((starts >> i) & 1) clear<K, V>(win);
    float x[V], o[V];
    unpack(ring[i & (kRing - 1)][tid], x);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float a = conv_pre(wk, b, win, x[j], j);
      o[j] = a * sigmoid_fast(a);
    }
    store_vec(dst + i * ld_out, o);
    shift_in<K, V>(win, x);
    ++pos;
  }
}

// Backward, same tiling, one walk over the segment's rows and the K-1 rows after it (i: row
// relative to the segment's first). At each row: the pre-activation a from the window,
// dA = dout * silu'(a), and
//   dw[k] += dA * in[i-(K-1)+k], dbias += dA       (the segment's own rows only)
//   din[i-(K-1)+k] += w[k] * dA                     (rows in i's sequence: pos >= K-1-k)
// The K-1 din rows still open are kept in registers (pend[k]: row i-(K-1)+k); the oldest is
// complete after row i and is stored when it is one of the segment's. Rows past ntok read as
// zeros: their dA is 0 and they only finish the last rows. At the end the block adds its
// segments' dw/dbias in order into one partial.
template <int K, int V, int R, bool kReset>
__global__ void __launch_bounds__(kVecThreads, kBwdMinBlocks)
    conv1d_silu_bwd_vec_k(const bf16* __restrict__ in, int ld_in, int64_t ntok, int seqlen,
                          int64_t C, const float* __restrict__ w, const float* __restrict__ bias,
                          const bf16* __restrict__ dout, bf16* __restrict__ din, int ld_din,
                          float* __restrict__ part_w, float* __restrict__ part_b,
                          const int32_t* __restrict__ reset) {
  constexpr int NI = R + K - 1;  // rows walked
  static_assert(R >= K - 1 && NI % (K - 1) == 0);
  static_assert(NI <= 64, "start_bits holds 64 rows");
  __shared__ __align__(16) float sw[32 * V * K];
  __shared__ __align__(16) float sb[32 * V];
  __shared__ Bf16Vec<V> ring[kRing][2][kVecThreads];  // per row: in, dout
  __shared__ __align__(16) float red[kSegs][K + 1][32 * V];  // per segment: dw taps, dbias
  const int64_t c0 = blockIdx.x * (int64_t)(32 * V);
  const int64_t c = c0 + threadIdx.x * V;
  const int64_t r0 = (blockIdx.y * (int64_t)kSegs + threadIdx.y) * R;
  const bool active = c < C && r0 < ntok;
  const int tid = threadIdx.y * 32 + threadIdx.x;
  const int n = active ? static_cast<int>(min(int64_t{R}, ntok - r0)) : 0;     // own rows
  const int nrd = active ? static_cast<int>(min(int64_t{NI}, ntok - r0)) : 0;  // rows that exist
  const bf16* src = in + r0 * ld_in + c;
  const bf16* gsrc = dout + r0 * C + c;
  const int ld_dout = static_cast<int>(C);
  auto fetch = [&](int i) {  // as in the forward: one group per row
    if (i < nrd) {
      cp_async_vec<V>(&ring[i & (kRing - 1)][0][tid], src + i * ld_in);
      cp_async_vec<V>(&ring[i & (kRing - 1)][1][tid], gsrc + i * ld_dout);
    }
    cp_async_commit();
  };
  for (int i = 0; i < kAhead; ++i) fetch(i);  // before the barrier, as in the forward
  int pos = active ? static_cast<int>(r0 % seqlen) : 0;
  int dpos0 = pos;       // the first row's position in its document
  uint64_t starts = 0;   // bit i: row i begins a document
  if constexpr (kReset) {
    if (active) {
      starts = start_bits(reset, r0, nrd);
      dpos0 = static_cast<int>(doc_pos(reset, r0, pos, K));
    }
  }
  float win[K - 1][V];
  if (active) load_window<K, V>(src, ld_in, dpos0, win);
  float wk[K][V], b[V];
  load_taps<K, V>(w, bias, C, sw, sb, wk, b);
  float accw[K][V], accb[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    accb[j] = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) accw[k][j] = 0.f;
  }

  if (active) {
    bf16* dst = din + r0 * ld_din + c;
    float pend[K - 1][V];
    clear<K, V>(pend);
    int dpos = dpos0 - 1;  // kReset: row i's position in its document (set at row i)
#pragma unroll (K - 1)
    for (int i = 0; i < NI; ++i) {
      fetch(i + kAhead);
      cp_async_wait<kAhead>();  // row i has landed
      if (pos == seqlen) pos = 0;
      if (pos == 0) clear<K, V>(win);
      if constexpr (kReset) {
        const bool start = pos == 0 || ((starts >> i) & 1);
        if (start) clear<K, V>(win);
        dpos = start ? 0 : dpos + 1;
      }
      float x[V], g[V];
      Bf16Vec<V> xv{}, dv{};
      if (i < nrd) xv = ring[i & (kRing - 1)][0][tid], dv = ring[i & (kRing - 1)][1][tid];
      unpack(xv, x);
      unpack(dv, g);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float a = conv_pre(wk, b, win, x[j], j);
        const float s = sigmoid_fast(a);
        g[j] = g[j] * s * (1.f + a * (1.f - s));  // dout * silu'(a)
      }
      if (i < R) {  // own row (past ntok: g = 0)
#pragma unroll
        for (int j = 0; j < V; ++j) {
          accb[j] += g[j];
#pragma unroll
          for (int k = 0; k < K - 1; ++k) accw[k][j] = fmaf(g[j], win[k][j], accw[k][j]);
          accw[K - 1][j] = fmaf(g[j], x[j], accw[K - 1][j]);
        }
      }
      // din: the open rows of i's sequence (document) get their tap of dA; row i opens with
      // tap K-1.
#pragma unroll
      for (int k = 0; k < K - 1; ++k) {
        if ((kReset ? dpos : pos) >= K - 1 - k) {
#pragma unroll
          for (int j = 0; j < V; ++j) pend[k][j] = fmaf(wk[k][j], g[j], pend[k][j]);
        }
      }
      const int done = i - (K - 1);  // pend[0]'s row: complete now
      if (done >= 0 && done < n) store_vec(dst + done * ld_din, pend[0]);
#pragma unroll
      for (int j = 0; j < V; ++j) g[j] *= wk[K - 1][j];
      shift_in<K, V>(pend, g);
      shift_in<K, V>(win, x);
      ++pos;
    }
  }

  // The block's partial: its kSegs segments added in order, written coalesced.
  const int ty = threadIdx.y, cl = threadIdx.x * V;
#pragma unroll
  for (int j = 0; j < V; ++j) {
#pragma unroll
    for (int k = 0; k < K; ++k) red[ty][k][cl + j] = accw[k][j];
    red[ty][K][cl + j] = accb[j];
  }
  __syncthreads();
  const int nc = static_cast<int>(min(int64_t{32 * V}, C - c0));
  float* pw = part_w + blockIdx.y * C * K + c0 * K;
  for (int i = tid; i < nc * K; i += kVecThreads) {
    float s = 0.f;
#pragma unroll
    for (int y = 0; y < kSegs; ++y) s += red[y][i % K][i / K];
    pw[i] = s;
  }
  float* pb = part_b + blockIdx.y * C + c0;
  for (int i = tid; i < nc; i += kVecThreads) {
    float s = 0.f;
#pragma unroll
    for (int y = 0; y < kSegs; ++y) s += red[y][K][i];
    pb[i] = s;
  }
}

// ---------------------------------------------------------------------------- dw, dbias

// dw[i] += sum_p part_w[p, i] (i < C*K) and dbias[i] += sum_p part_b[p, i], the partials in a
// fixed order: threadIdx.y sums p = y, y + kSumSlices, ..., then slice 0 adds the slices in
// order. Several threads per column keep enough loads in flight for the few thousand columns
// here (one thread walking all partials of a column would be latency-bound).
constexpr int kSumCols = 32, kSumSlices = 8;

__global__ void __launch_bounds__(kSumCols * kSumSlices)
    param_grad_sum_k(const float* __restrict__ part_w, const float* __restrict__ part_b,
                     int nparts, int64_t nw, int64_t nb, float* __restrict__ dw,
                     float* __restrict__ dbias) {
  __shared__ float sh[kSumSlices][kSumCols];
  const int64_t i = blockIdx.x * (int64_t)kSumCols + threadIdx.x;
  const bool is_w = i < nw;
  const int64_t n = is_w ? nw : nb;
  const float* src = is_w ? part_w + i : part_b + (i - nw);
  float s = 0.f;
  if (i < nw + nb) {
#pragma unroll 4
    for (int p = threadIdx.y; p < nparts; p += kSumSlices) s += src[p * n];
  }
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && i < nw + nb) {
    float t = 0.f;
#pragma unroll
    for (int y = 0; y < kSumSlices; ++y) t += sh[y][threadIdx.x];
    float* dst = is_w ? dw + i : dbias + (i - nw);
    *dst += t;
  }
}

// ---------------------------------------------------------------------------- scalar path

// One column per thread, 2-byte accesses: any width, stride and alignment.
constexpr int kCols = 128;    // columns per block (one thread each)
constexpr int kRows = 64;     // tokens per block
constexpr int kFwdBatch = 8;  // rows whose loads are issued together
constexpr int kBwdBatch = 4;

// The scalar kernels' causal window over one channel: win[k] (k < K-1) holds the input at
// time t - (K-1) + k of the current row t's sequence (0 before the sequence starts).
// At a new sequence (pos wraps to 0) the window restarts empty.
template <int NK>
__device__ __forceinline__ void window_clear(float (&win)[NK]) {
#pragma unroll
  for (int k = 0; k < NK; ++k) win[k] = 0.f;
}
template <int NK>
__device__ __forceinline__ void window_restart(float (&win)[NK], int64_t& pos, int64_t seqlen) {
  if (pos == seqlen) pos = 0;
  if (pos == 0) {
#pragma unroll
    for (int k = 0; k < NK; ++k) win[k] = 0.f;
  }
}
// bias + sum_k w[k] * input(t - (K-1) + k), x = input(t).
template <int NK>
__device__ __forceinline__ float window_preact(const float (&wk)[NK], const float (&win)[NK],
                                               float x, float b, int K) {
  float a = b;
#pragma unroll
  for (int k = 0; k < NK; ++k)
    if (k < K - 1) a += wk[k] * win[k];
#pragma unroll
  for (int k = 0; k < NK; ++k)
    if (k == K - 1) a += wk[k] * x;
  return a;
}
// Shifts the window by one row: win[k] <- win[k+1], win[K-2] <- x.
template <int NK>
__device__ __forceinline__ void window_push(float (&win)[NK], float x, int K) {
#pragma unroll
  for (int k = 0; k < NK - 1; ++k)
    if (k < K - 1) win[k] = (k == K - 2) ? x : win[k + 1];
}

// Block (column tile, row chunk); each thread walks its column down the chunk with the last K
// inputs in registers, so every input is read once (plus K-1 rows of halo per chunk).
// Positions inside the sequence are tracked incrementally (no per-element division).
// KT > 0: the kernel width at compile time; 0: runtime K (<= kMaxConvWidth).
template <int KT, bool kReset>
__global__ void __launch_bounds__(kCols)
    conv1d_silu_fwd_k(const bf16* __restrict__ in, int64_t ld_in, int64_t ntok, int64_t seqlen,
                      int64_t C, const float* __restrict__ w, const float* __restrict__ bias,
                      int K_rt, bf16* __restrict__ out, const int32_t* __restrict__ reset) {
  constexpr int NK = KT > 0 ? KT : kMaxConvWidth;  // register array sizes / unroll bounds
  const int K = KT > 0 ? KT : K_rt;
  const int64_t c = blockIdx.x * (int64_t)kCols + threadIdx.x;
  const int64_t r0 = blockIdx.y * (int64_t)kRows;
  if (c >= C) return;
  float wk[NK], win[NK];  // win[k]: input at time t - (K-1) + k
  int64_t pos = r0 % seqlen;
  const int64_t dpos = kReset ? doc_pos(reset, r0, pos, K) : pos;
#pragma unroll
  for (int k = 0; k < NK; ++k) {
    wk[k] = k < K ? w[c * K + k] : 0.f;
    // halo: win[k] for k < K-1 holds time r0 - (K-1) + k, if inside the same sequence
    // (and document)
    const int64_t back = K - 1 - k;
    win[k] = (k < K - 1 && dpos >= back) ? to_f(in[(r0 - back) * ld_in + c]) : 0.f;
  }
  const float b = bias[c];
  const int64_t r1 = min(r0 + kRows, ntok);
  for (int64_t rb = r0; rb < r1; rb += kFwdBatch) {
    float xs[kFwdBatch];  // the batch's loads are issued together (latency hiding)
#pragma unroll
    for (int i = 0; i < kFwdBatch; ++i) xs[i] = rb + i < r1 ? to_f(in[(rb + i) * ld_in + c]) : 0.f;
#pragma unroll
    for (int i = 0; i < kFwdBatch; ++i) {
      const int64_t r = rb + i;
      if (r >= r1) break;
      window_restart(win, pos, seqlen);
      if constexpr (kReset)
        if (reset[r]) window_clear(win);
      const float x = xs[i];
      const float a = window_preact(wk, win, x, b, K);
      out[r * C + c] = from_f<bf16>(a * sigmoidf_(a));
      window_push(win, x, K);
      ++pos;
    }
  }
}

// Backward, same tiling. Walking rows u = r0 .. r0+kRows+K-2 with the input window:
// dA[u] = dout * silu'(pre) goes to shared memory (own column only: no barrier needed), and for
// the chunk's own rows dw[k] += dA[u] * in[u-K+1+k], dbias += dA[u]. Then din[r] =
// sum_j w[K-1-j] * dA[r+j] over taps inside r's sequence, read back from shared memory.
template <int KT, bool kReset>
__global__ void __launch_bounds__(kCols)
    conv1d_silu_bwd_k(const bf16* __restrict__ in, int64_t ld_in, int64_t ntok, int64_t seqlen,
                      int64_t C, const float* __restrict__ w, const float* __restrict__ bias,
                      int K_rt, const bf16* __restrict__ dout, bf16* __restrict__ din,
                      int64_t ld_din, float* __restrict__ part_w, float* __restrict__ part_b,
                      const int32_t* __restrict__ reset) {
  constexpr int NK = KT > 0 ? KT : kMaxConvWidth;  // register array sizes / unroll bounds
  __shared__ float dA[kRows + NK - 1][kCols];
  const int K = KT > 0 ? KT : K_rt;
  const int64_t c = blockIdx.x * (int64_t)kCols + threadIdx.x;
  const int64_t r0 = blockIdx.y * (int64_t)kRows;
  if (c >= C) return;
  float wk[NK], wr[NK], win[NK];
  const int64_t pos0 = r0 % seqlen;
  const int64_t dpos0 = kReset ? doc_pos(reset, r0, pos0, K) : pos0;
#pragma unroll
  for (int k = 0; k < NK; ++k) {
    wk[k] = k < K ? w[c * K + k] : 0.f;
    wr[k] = k < K ? w[c * K + K - 1 - k] : 0.f;
    const int64_t back = K - 1 - k;
    win[k] = (k < K - 1 && dpos0 >= back) ? to_f(in[(r0 - back) * ld_in + c]) : 0.f;
  }
  const float b = bias[c];
  float accw[NK];
#pragma unroll
  for (int k = 0; k < NK; ++k) accw[k] = 0.f;
  float accb = 0.f;

  const int nu = kRows + K - 1;
  int64_t pos = pos0;
  for (int ub = 0; ub < nu; ub += kBwdBatch) {
    float xs[kBwdBatch], ds[kBwdBatch];  // the batch's loads are issued together
#pragma unroll
    for (int i = 0; i < kBwdBatch; ++i) {
      const int64_t u = r0 + ub + i;
      const bool ok = ub + i < nu && u < ntok;
      xs[i] = ok ? to_f(in[u * ld_in + c]) : 0.f;
      ds[i] = ok ? to_f(dout[u * C + c]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kBwdBatch; ++i) {
      const int u_loc = ub + i;
      if (u_loc >= nu) break;
      const int64_t u = r0 + u_loc;
      if (u >= ntok) {
        dA[u_loc][threadIdx.x] = 0.f;
        continue;
      }
      window_restart(win, pos, seqlen);
      if constexpr (kReset)
        if (reset[u]) window_clear(win);
      const float x = xs[i];
      const float a = window_preact(wk, win, x, b, K);
      const float s = sigmoidf_(a);
      const float g = ds[i] * s * (1.f + a * (1.f - s));
      dA[u_loc][threadIdx.x] = g;
      if (u_loc < kRows) {
        accb += g;
#pragma unroll
        for (int k = 0; k < NK; ++k) accw[k] += g * (k == K - 1 ? x : win[k]);
      }
      window_push(win, x, K);
      ++pos;
    }
  }

  pos = pos0;
  const int64_t r1 = min(r0 + kRows, ntok);
  for (int64_t r = r0; r < r1; ++r) {
    if (pos == seqlen) pos = 0;
    const int r_loc = static_cast<int>(r - r0);
    float d = 0.f;
    bool open = true;  // kReset: no document begins in rows (r, r + j]
#pragma unroll
    for (int j = 0; j < NK; ++j) {
      if (j < K && pos + j < seqlen) {
        if constexpr (kReset)
          if (j > 0 && reset[r + j]) open = false;
        if (open) d += wr[j] * dA[r_loc + j][threadIdx.x];
      }
    }
    din[r * ld_din + c] = from_f<bf16>(d);
    ++pos;
  }
  float* pw = part_w + blockIdx.y * C * K;
#pragma unroll
  for (int k = 0; k < NK; ++k)
    if (k < K) pw[c * K + k] = accw[k];
  part_b[blockIdx.y * C + c] = accb;
}

// Calls f(std::integral_constant<int, K>) for the widths compiled specially (2, 3, 4: the
// unrolled kernels), f(integral_constant<int, 0>) for the runtime-width kernel otherwise.
template <class F>
void with_width(int K, F&& f) {
  switch (K) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The vector kernels take row offsets within a walk (< kSeg + K rows) and positions in a
// sequence as int.
bool fits_int(int64_t ld_max, int64_t C, int64_t seqlen) {
  const int64_t lim = (int64_t{1} << 31) / (std::max(kFwdSeg, kBwdSeg) + kMaxConvWidth);
  return std::max(ld_max, C) < lim && seqlen < (int64_t{1} << 31);
}

// Partials of dw/dbias written by the backward: one per block row of the grid.
int64_t bwd_parts(int64_t ntok, bool vec) {
  const int64_t rows = vec ? int64_t{kSegs} * kBwdSeg : kRows;
  return std::max<int64_t>((ntok + rows - 1) / rows, 1);
}

}  // namespace

void conv1d_silu_fwd(const bf16* in, int64_t ld_in, int64_t batch, int64_t seqlen, int64_t C,
                     const float* w, const float* bias, int K, bf16* out, cudaStream_t stream,
                     const int32_t* reset) {
  const int64_t ntok = batch * seqlen;
  if (ntok <= 0 || C <= 0) return;
  if (K < 1 || K > kMaxConvWidth)
    fail("cuda conv1d: kernel width ", K, " not in [1, ", kMaxConvWidth, "]");
  constexpr int V = kFwdV;
  if (K == kVecK && C % V == 0 && ld_in % V == 0 && aligned(in, 2 * V) && aligned(out, 2 * V) &&
      fits_int(ld_in, C, seqlen)) {
    const int64_t tiles = (ntok + kSegs * kFwdSeg - 1) / (kSegs * kFwdSeg);
    if (tiles > 65535) fail("cuda conv1d_silu_fwd: too many tokens (", ntok, ")");
    const dim3 grid(static_cast<unsigned>((C + 32 * V - 1) / (32 * V)),
                    static_cast<unsigned>(tiles));
    auto kernel = reset ? conv1d_silu_fwd_vec_k<kVecK, V, kFwdSeg, true>
                        : conv1d_silu_fwd_vec_k<kVecK, V, kFwdSeg, false>;
    kernel<<<grid, dim3(32, kSegs), 0, stream>>>(in, static_cast<int>(ld_in), ntok,
                                                  static_cast<int>(seqlen), C, w, bias, out,
                                                  reset);
    check_launch("conv1d_silu_fwd");
    return;
  }
  const int64_t chunks = (ntok + kRows - 1) / kRows;
  if (chunks > 65535) fail("cuda conv1d_silu_fwd: too many tokens (", ntok, ")");
  dim3 grid(static_cast<unsigned>((C + kCols - 1) / kCols), static_cast<unsigned>(chunks));
  auto go = [&](auto kernel) {
    kernel<<<grid, kCols, 0, stream>>>(in, ld_in, ntok, seqlen, C, w, bias, K, out, reset);
  };
  with_width(K, [&](auto kt) {
    if (reset) go(conv1d_silu_fwd_k<decltype(kt)::value, true>);
    else go(conv1d_silu_fwd_k<decltype(kt)::value, false>);
  });
  check_launch("conv1d_silu_fwd");
}

// Enough for either path (whether the vector path applies depends on the pointers).
size_t conv1d_silu_bwd_workspace_bytes(int64_t ntok, int64_t C, int K) {
  const int64_t parts = std::max(bwd_parts(ntok, true), bwd_parts(ntok, false));
  return static_cast<size_t>(parts * C * (K + 1)) * sizeof(float);
}

void conv1d_silu_bwd(const bf16* in, int64_t ld_in, int64_t batch, int64_t seqlen, int64_t C,
                     const float* w, const float* bias, int K, const bf16* dout, bf16* din,
                     int64_t ld_din, float* dw, float* dbias, void* ws, cudaStream_t stream,
                     const int32_t* reset) {
  const int64_t ntok = batch * seqlen;
  if (ntok <= 0 || C <= 0) return;
  if (K < 1 || K > kMaxConvWidth)
    fail("cuda conv1d: kernel width ", K, " not in [1, ", kMaxConvWidth, "]");
  constexpr int V = kBwdV;
  const bool vec = K == kVecK && C % V == 0 && ld_in % V == 0 && ld_din % V == 0 &&
                   aligned(in, 2 * V) && aligned(dout, 2 * V) && aligned(din, 2 * V) &&
                   fits_int(std::max(ld_in, ld_din), C, seqlen);
  const int64_t parts = bwd_parts(ntok, vec);
  if (parts > 65535) fail("cuda conv1d_silu_bwd: too many tokens (", ntok, ")");
  float* part_w = static_cast<float*>(ws);
  float* part_b = part_w + parts * C * K;
  if (vec) {
    const dim3 grid(static_cast<unsigned>((C + 32 * V - 1) / (32 * V)),
                    static_cast<unsigned>(parts));
    auto kernel = reset ? conv1d_silu_bwd_vec_k<kVecK, V, kBwdSeg, true>
                        : conv1d_silu_bwd_vec_k<kVecK, V, kBwdSeg, false>;
    kernel<<<grid, dim3(32, kSegs), 0, stream>>>(in, static_cast<int>(ld_in), ntok,
                                                  static_cast<int>(seqlen), C, w, bias, dout,
                                                  din, static_cast<int>(ld_din), part_w, part_b,
                                                  reset);
  } else {
    dim3 grid(static_cast<unsigned>((C + kCols - 1) / kCols), static_cast<unsigned>(parts));
    auto go = [&](auto kernel) {
      kernel<<<grid, kCols, 0, stream>>>(in, ld_in, ntok, seqlen, C, w, bias, K, dout, din,
                                         ld_din, part_w, part_b, reset);
    };
    with_width(K, [&](auto kt) {
      if (reset) go(conv1d_silu_bwd_k<decltype(kt)::value, true>);
      else go(conv1d_silu_bwd_k<decltype(kt)::value, false>);
    });
  }
  check_launch("conv1d_silu_bwd");
  const int64_t n = C * (K + 1);
  param_grad_sum_k<<<grid_for(n, kSumCols), dim3(kSumCols, kSumSlices), 0, stream>>>(
      part_w, part_b, static_cast<int>(parts), C * K, C, dw, dbias);
  check_launch("conv1d_silu_bwd (dw, dbias)");
}

}  // namespace ssd::cuda
