// Variant 2 of the SSD backward's B and C factors: dB and dC in ONE kernel (replaces variant 1's
// chunk_state_bwd_dB + chunk_scan_bwd_dC + bc_reduce).
//
// Both gradients are built from the same decayed, causal matrix of a chunk and head,
//   M[t][s] = (dy_t . x_s) exp(cs_t - cs_s) dt_s   (s <= t),
//   dC_t = sum_h [ exp(cs_t) dy_t S_in + sum_s M[t][s] B_s ],
//   dB_s = sum_h [ exp(cs_last - cs_s) dt_s (x_s dS_out) + sum_t M[t][s] C_t ],
//   dcs_t += sum_s M[t][s] CB[t][s],   dcs_s -= sum_t M[t][s] CB[t][s]   (BC[s][t] = CB[t][s]).
// One block per (64x64 tile pair t tile i >= s tile j, chunk, group, slice of the group's
// heads) loops over the slice's heads. B and C belong to the group, not the head, so the
// intra-chunk terms need only the head sum of M: per head the block computes its M tile (one
// 64x64xP product) for that head's dcs terms and adds it to an fp32 sum in registers; after the
// loop, dC_i += (sum_h M) B_j and dB_j += (sum_h M)^T C_i run ONCE (the transpose read by
// ldmatrix.trans from the same shared tile). That is 1 instead of 3 tile GEMMs per pair and
// head (as mamba_ssm sums dCB over the group's heads). The diagonal pairs (i == j) also add the
// two state terms, which are per head.
//
// Why it is faster than variant 1 (dB 0.89 ms + dC 0.87 ms at 8x2048x48, latency bound):
//  - dy . x^T is computed once instead of twice, and the M B / M^T C products once per block;
//  - B_j, C_i and the fp32 CB tile do not depend on the head: loaded once per block (CB into
//    registers) instead of once per head and tile; per head only x_j, dy_i (2 x 8 KB), cs, dt
//    (and, on the diagonal, S_in / dS_out) are loaded: about 3x less load traffic;
//  - those per-head loads are cp.async (16-byte, zero-filled past seqlen) into two buffers:
//    head h+1's tiles land while head h computes (one buffer when two do not fit, e.g.
//    headdim 128 + dstate 128; if even one does not, variant 1's kernels run instead).
//
// Deterministic, no atomics: every slot has one writer. dC for t tile i from pair (i, j) goes
// to dCp_v2[slice][j], dB for s tile j to dBp_v2[slice][i]; the dcs row sums (over s) of pair
// (i, j) to dcs_v2 slice j, the column sums (over t) to slice nblk + i, each reduced over the
// block's warps through shared memory in a fixed order. bc_reduce_v2 sums them in a fixed order.
#include <algorithm>

#include "ssd_common.cuh"

namespace ssd::cuda::detail {

namespace {

// n fp32 values (n % 4 == 0, 16-byte aligned) with cp.async.
__device__ __forceinline__ void load_f32_async(float* s, const float* g, int n) {
  for (int i = threadIdx.x * 4; i < n; i += blockDim.x * 4) cp_async16(s + i, g + i, true);
}

// Column slices of the kernel's warps (see the kernel) and its block size.
constexpr int kColSlices = 2;
constexpr int kDbdcThreads = 4 * kColSlices * 32;

// Shared memory: fixed part Bj, Ci [64][N+8], Ws [64][72] (bf16), red_row [2][kColSlices][64],
// red_col [2][4][64] (fp32; two of each, by head parity); then a ring of per-head buffers,
// each Xs, dYs [64][P+8] (bf16), cs_s, dt_s [Q] (fp32) and, for the diagonal tile pairs only,
// Ss, dSs [P][N+8] (bf16).
// Off-diagonal blocks (most of them) need no state tiles, so their ring is deeper: up to
// kMaxRing heads in flight, which the kernel needs (it is bound by load latency, not bandwidth).
constexpr int kMaxRingDiag = 3, kMaxRing = 8;
size_t dbdc_fixed_bytes(const SsdDims& d) {
  return (2 * 64 * (d.dstate + 8) + 64 * 72) * sizeof(bf16) +
         2 * (kColSlices + 4) * 64 * sizeof(float);
}
size_t dbdc_buf_bytes(const SsdDims& d, bool diag) {
  return 2 * 64 * (d.headdim + 8) * sizeof(bf16) + 2 * d.chunk * sizeof(float) +
         (diag ? 2 * d.headdim * (d.dstate + 8) * sizeof(bf16) : 0);
}
struct DbdcRing {
  int diag = 0, off = 0;  // ring depths (heads in flight) of diagonal / off-diagonal blocks
  size_t smem = 0;        // dynamic shared memory of the launch
};
int max_smem_optin() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 48 * 1024;
  return v;
}
// The deepest rings that fit (depth 0 for the diagonal: nothing fits, variant 1's kernels run).
DbdcRing dbdc_ring(const SsdDims& d) {
  DbdcRing r;
  const size_t lim = static_cast<size_t>(max_smem_optin()), fixed = dbdc_fixed_bytes(d);
  if (fixed >= lim) return r;
  const size_t room = lim - fixed;
  r.diag = static_cast<int>(std::min<size_t>(kMaxRingDiag, room / dbdc_buf_bytes(d, true)));
  if (r.diag == 0) return r;
  r.off = static_cast<int>(std::min<size_t>(kMaxRing, room / dbdc_buf_bytes(d, false)));
  r.smem = fixed + std::max(r.diag * dbdc_buf_bytes(d, true), r.off * dbdc_buf_bytes(d, false));
  return r;
}

// cp.async.wait_group with a run-time count (the instruction takes an immediate).
__device__ __forceinline__ void cp_async_wait_n(int n) {
  switch (n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    default: cp_async_wait<7>(); break;
  }
}
static_assert(kMaxRing <= 8, "cp_async_wait_n covers 0..7 groups in flight");

}  // namespace

// 4 x kColSlices warps (4 row slices x kColSlices column slices): warp w owns rows 16*(w%4)..
// of the block's t tile (dC) and s tile (dB), and of them the column slice w/4 of N
// (N/kColSlices columns); of each 64x64 M tile it computes rows 16*(w%4).. and the
// 64/kColSlices columns from (w/4)*64/kColSlices, summed over the heads in registers and shared
// (bf16) via Ws after the head loop. (8 warps: with the head sums, 16 warps ran 3-4% slower,
// measured on the H200; before them 8 and 16 were level.)
// PC: the head dimension at compile time (64, the common case: its tile loads and k loops are
// then fixed-size, without per-head index division), or 0 for P_rt at run time.
template <int NN, int PC>
__global__ __launch_bounds__(kDbdcThreads, 1) void chunk_bwd_dbdc_v2_kernel(
    const bf16* __restrict__ xBC, int64_t ldx, const bf16* __restrict__ dy,
    const float* __restrict__ dt, const float* __restrict__ cs, const float* __restrict__ CB,
    const bf16* __restrict__ states, const bf16* __restrict__ dstates,
    float* __restrict__ dBp, float* __restrict__ dCp, float* __restrict__ dcs2, int L, int H,
    int G, int P_rt, int nc, int Q, int nsplit, int hps, int ring_diag, int ring_off,
    int64_t nq) {
  constexpr int N = NN * 8, LDN = N + 8, LDW = 72;
  constexpr int NH = NN / kColSlices;        // n8 tiles of N per warp (dC, dB accumulators)
  constexpr int MT = 64 / 8 / kColSlices;    // n8 tiles of the M tile's 64 columns per warp
  static_assert(NH % 2 == 0 && MT % 2 == 0, "tiles are loaded in pairs");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int P = PC > 0 ? PC : P_rt;
  const int LDP = P + 8;
  const int nblk = Q / 64;
  bf16* Bj = reinterpret_cast<bf16*>(smem_raw);
  bf16* Ci = Bj + 64 * LDN;
  bf16* Ws = Ci + 64 * LDN;
  // dcs partials by head parity: head hl writes set hl & 1, which is reduced after the next
  // head's barrier (one barrier per head)
  float* red_row0 = reinterpret_cast<float*>(Ws + 64 * LDW);  // [2][kColSlices][64]
  float* red_col0 = red_row0 + 2 * kColSlices * 64;            // [2][4][64]
  unsigned char* buf0 = reinterpret_cast<unsigned char*>(red_col0 + 2 * 256);

  // tile pair: the nblk diagonal pairs first (they carry the state terms), then (i > j)
  const int hs = blockIdx.x % nsplit, pidx = blockIdx.x / nsplit;
  int ti, tj;
  if (pidx < nblk) {
    ti = tj = pidx;
  } else {
    int q = pidx - nblk;
    ti = 1;
    while (q >= ti) {
      q -= ti;
      ++ti;
    }
    tj = q;
  }
  const bool diag = ti == tj;
  const int ring = diag ? ring_diag : ring_off;  // heads whose loads are in flight
  const size_t buf_bytes = static_cast<size_t>(2 * 64 * LDP) * sizeof(bf16) +
                           2 * static_cast<size_t>(Q) * sizeof(float) +
                           (diag ? static_cast<size_t>(2 * P * LDN) * sizeof(bf16) : 0);
  const int c = blockIdx.y % nc, g = blockIdx.y / nc, b = blockIdx.z;
  const int hpg = H / G;
  const int h_begin = g * hpg + hs * hps, h_end = min(g * hpg + hpg, h_begin + hps);
  const int nh = h_end - h_begin;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tq = lane & 3;
  const int wr = warp & 3, wc = warp >> 2;
  const int ncol0 = wc * (N / kColSlices), scol0 = wc * (64 / kColSlices);
  const int64_t d_inner = static_cast<int64_t>(H) * P;
  const int64_t row0 = static_cast<int64_t>(b) * L + static_cast<int64_t>(c) * Q;
  const int i0 = ti * 64, j0 = tj * 64;
  const int vi = L - (c * Q + i0), vj = L - (c * Q + j0);
  const int lr0 = wr * 16 + (lane >> 2);
  const int t0 = i0 + lr0, t1 = t0 + 8;  // chunk-local t rows (dC accumulator rows)
  const int s0 = j0 + lr0, s1 = s0 + 8;  // chunk-local s rows (dB accumulator rows)
  const int64_t PN = static_cast<int64_t>(P) * N;

  // the CB values of this thread's M elements (fp32, head-independent)
  float cbv[MT][4];
  {
    const float* CBp = CB + ((static_cast<int64_t>(b) * nc + c) * G + g) * Q * Q;
#pragma unroll
    for (int jj = 0; jj < MT; ++jj) {
      const int s = j0 + scol0 + jj * 8 + tq * 2;
      const float2 a = *reinterpret_cast<const float2*>(CBp + static_cast<int64_t>(t0) * Q + s);
      const float2 e = *reinterpret_cast<const float2*>(CBp + static_cast<int64_t>(t1) * Q + s);
      cbv[jj][0] = a.x;
      cbv[jj][1] = a.y;
      cbv[jj][2] = e.x;
      cbv[jj][3] = e.y;
    }
  }

  // head-independent tiles (committed with head 0's group)
  load_tile_async(Bj, LDN, xBC + (row0 + j0) * ldx + d_inner + static_cast<int64_t>(g) * N, ldx,
                  64, N, vj, xBC);
  load_tile_async(Ci, LDN, xBC + (row0 + i0) * ldx + d_inner + static_cast<int64_t>(G + g) * N,
                  ldx, 64, N, vi, xBC);

  // Loads of head hl into its ring slot, as one cp.async group; past the last head an empty
  // group, so that every iteration commits exactly one and the wait count stays fixed.
  auto issue = [&](int hl, int slot) {
    if (hl >= nh) {
      cp_async_commit();
      return;
    }
    const int h = h_begin + hl;
    unsigned char* bb = buf0 + static_cast<size_t>(slot) * buf_bytes;
    bf16* Xs = reinterpret_cast<bf16*>(bb);
    bf16* dYs = Xs + 64 * LDP;
    float* cs_s = reinterpret_cast<float*>(dYs + 64 * LDP);
    float* dt_s = cs_s + Q;
    bf16* Ss = reinterpret_cast<bf16*>(dt_s + Q);
    bf16* dSs = Ss + P * LDN;
    load_tile_async(Xs, LDP, xBC + (row0 + j0) * ldx + static_cast<int64_t>(h) * P, ldx, 64, P,
                    vj, xBC);
    load_tile_async(dYs, LDP, dy + (row0 + i0) * d_inner + static_cast<int64_t>(h) * P, d_inner,
                    64, P, vi, dy);
    if (diag) {
      const int64_t so = ((static_cast<int64_t>(b) * nc + c) * H + h) * PN;
      load_tile_async(Ss, LDN, states + so, N, P, N, P, states);
      load_tile_async(dSs, LDN, dstates + so, N, P, N, P, dstates);
    }
    const int64_t cbase = ((static_cast<int64_t>(b) * H + h) * nc + c) * Q;
    load_f32_async(cs_s, cs + cbase, Q);
    load_f32_async(dt_s, dt + cbase, Q);
    cp_async_commit();
  };

  float accC[NH][4], accB[NH][4];
  zero_acc(accC);
  zero_acc(accB);
  // sum over the slice's heads of the M tile (B and C do not depend on the head, so
  // dC_i += (sum_h M_h) B_j and dB_j += (sum_h M_h)^T C_i run once, after the head loop)
  float msum[MT][4];
  zero_acc(msum);

  // the block's dcs partials of head hl (parity set par) -> dcs2, in a fixed order
  auto write_dcs = [&](int hl, int par) {
    const float* red_row = red_row0 + par * (kColSlices * 64);
    const float* red_col = red_col0 + par * 256;
    const int64_t cbase = ((static_cast<int64_t>(b) * H + h_begin + hl) * nc + c) * Q;
    const int tid = threadIdx.x;
    if (tid < 64) {
      const int t = i0 + tid;
      float v = red_row[tid];
#pragma unroll
      for (int q = 1; q < kColSlices; ++q) v += red_row[q * 64 + tid];
      if (c * Q + t < L) dcs2[tj * nq + cbase + t] = v;
    } else if (tid < 128) {
      const int sl = tid - 64, s = j0 + sl;
      if (c * Q + s < L)
        dcs2[(nblk + ti) * nq + cbase + s] =
            ((red_col[sl] + red_col[64 + sl]) + red_col[128 + sl]) + red_col[192 + sl];
    }
  };

  // Ring of ring heads: ring - 1 in flight while one is computed. With ring >= 2 the slot of
  // head hl - 1 is refilled right after the barrier that ends its use; with ring == 1 (no
  // prefetch) the only slot is refilled after a barrier at the end of each head.
  for (int k = 0; k + 1 < ring; ++k) issue(k, k);
  int use_slot = 0, issue_slot = ring - 1;
  for (int hl = 0; hl < nh; ++hl) {
    if (ring == 1) {
      issue(hl, 0);
      cp_async_wait<0>();
    } else {
      cp_async_wait_n(ring - 2);  // heads up to hl + ring - 2 committed; hl has landed
    }
    __syncthreads();  // head hl's tiles visible to all; everyone done with head hl - 1
    if (ring > 1) {
      issue(hl + ring - 1, issue_slot);  // into head hl - 1's slot
      issue_slot = issue_slot + 1 == ring ? 0 : issue_slot + 1;
    }
    if (hl > 0) write_dcs(hl - 1, (hl - 1) & 1);
    unsigned char* bb = buf0 + static_cast<size_t>(use_slot) * buf_bytes;
    use_slot = use_slot + 1 == ring ? 0 : use_slot + 1;
    const bf16* Xs = reinterpret_cast<const bf16*>(bb);
    const bf16* dYs = Xs + 64 * LDP;
    const float* cs_s = reinterpret_cast<const float*>(dYs + 64 * LDP);
    const float* dt_s = cs_s + Q;
    const bf16* Ss = reinterpret_cast<const bf16*>(dt_s + Q);
    const bf16* dSs = Ss + P * LDN;
    const float ct0 = cs_s[t0], ct1 = cs_s[t1];

    // M tile: dY_i . X_j^T, this warp's rows and s columns, then decay, dt, causal mask
    float W[MT][4];
    zero_acc(W);
    for (int k = 0; k < P; k += 16) {
      uint32_t a[4];
      lda_mk(a, dYs, LDP, wr * 16, k, lane);
#pragma unroll
      for (int jj = 0; jj < MT; jj += 2) {
        uint32_t bq[4];
        ldb_nk(bq, Xs, LDP, scol0 + jj * 8, k, lane);
        mma_bf16(W[jj], a, bq[0], bq[1]);
        mma_bf16(W[jj + 1], a, bq[2], bq[3]);
      }
    }
    float dr0 = 0.f, dr1 = 0.f, cc[MT][2];
#pragma unroll
    for (int jj = 0; jj < MT; ++jj) {
      const int sl = scol0 + jj * 8 + tq * 2, s = j0 + sl;
      const float q0 = cs_s[s], q1 = cs_s[s + 1], w0 = dt_s[s], w1 = dt_s[s + 1];
      W[jj][0] *= __expf(ct0 - q0) * w0;
      W[jj][1] *= __expf(ct0 - q1) * w1;
      W[jj][2] *= __expf(ct1 - q0) * w0;
      W[jj][3] *= __expf(ct1 - q1) * w1;
      if (diag) {  // causal mask s <= t: only the diagonal tile pairs straddle it
        W[jj][0] = s <= t0 ? W[jj][0] : 0.f;
        W[jj][1] = s + 1 <= t0 ? W[jj][1] : 0.f;
        W[jj][2] = s <= t1 ? W[jj][2] : 0.f;
        W[jj][3] = s + 1 <= t1 ? W[jj][3] : 0.f;
      }
      const float p00 = W[jj][0] * cbv[jj][0], p01 = W[jj][1] * cbv[jj][1];
      const float p10 = W[jj][2] * cbv[jj][2], p11 = W[jj][3] * cbv[jj][3];
      dr0 += p00 + p01;
      dr1 += p10 + p11;
      cc[jj][0] = p00 + p10;
      cc[jj][1] = p01 + p11;
#pragma unroll
      for (int e = 0; e < 4; ++e) msum[jj][e] += W[jj][e];
    }
    // dcs partials: row sums over this warp's columns, column sums over its 16 rows
    {
      float* red_row = red_row0 + (hl & 1) * (kColSlices * 64);
      float* red_col = red_col0 + (hl & 1) * 256;
      dr0 = quad_sum(dr0);
      dr1 = quad_sum(dr1);
      if (tq == 0) {
        red_row[wc * 64 + lr0] = dr0;
        red_row[wc * 64 + lr0 + 8] = dr1;
      }
#pragma unroll
      for (int jj = 0; jj < MT; ++jj)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = cc[jj][e];
          v += __shfl_xor_sync(kFull, v, 4);
          v += __shfl_xor_sync(kFull, v, 8);
          v += __shfl_xor_sync(kFull, v, 16);
          if (lane < 4) red_col[wr * 64 + scol0 + jj * 8 + tq * 2 + e] = v;
        }
    }

    if (diag) {
      // dC_i += diag(exp(cs_t)) dY_i (64 x P) . S_in (P x N)
      warp_mma_smem<NH, false, false, true>(accC, dYs, LDP, wr * 16, Ss + ncol0, LDN, P, lane,
                                            __expf(ct0), __expf(ct1));
      // dB_j += diag(exp(cs_last - cs_s) dt_s) X_j (64 x P) . dS_out (P x N)
      const float cl = cs_s[Q - 1];
      const float f0 = __expf(cl - cs_s[s0]) * dt_s[s0], f1 = __expf(cl - cs_s[s1]) * dt_s[s1];
      warp_mma_smem<NH, false, false, true>(accB, Xs, LDP, wr * 16, dSs + ncol0, LDN, P, lane,
                                            f0, f1);
    }
    if (ring == 1) __syncthreads();  // the only slot is refilled at the next head's start
  }
  cp_async_wait<0>();  // the trailing empty groups
  __syncthreads();     // the last head's dcs partials complete
  write_dcs(nh - 1, (nh - 1) & 1);

  // the summed M tile (bf16) for the two products
#pragma unroll
  for (int jj = 0; jj < MT; ++jj) {
    const int sl = scol0 + jj * 8 + tq * 2;
    *reinterpret_cast<uint32_t*>(Ws + lr0 * LDW + sl) = pack_bf16(msum[jj][0], msum[jj][1]);
    *reinterpret_cast<uint32_t*>(Ws + (lr0 + 8) * LDW + sl) = pack_bf16(msum[jj][2], msum[jj][3]);
  }
  __syncthreads();
  // dC_i += M (64 t x 64 s) . B_j (64 s x this warp's N/kColSlices columns)
  warp_mma_smem<NH, false>(accC, Ws, LDW, wr * 16, Bj + ncol0, LDN, 64, lane);
  // dB_j += M^T (64 s x 64 t) . C_i (64 t x this warp's N/kColSlices columns)
  warp_mma_smem<NH, false, true>(accB, Ws, LDW, wr * 16, Ci + ncol0, LDN, 64, lane);

  // this (head slice, pair)'s dC rows of tile i -> slot j, dB rows of tile j -> slot i
  const int64_t GN = static_cast<int64_t>(G) * N;
  const int64_t slab = static_cast<int64_t>(gridDim.z) * L * GN;  // tokens * GN
  // row r (chunk-local) of acc, this thread's half, to slot `slot` of part (rows past seqlen
  // are skipped)
  auto store_rows = [&](float* part, int slot, int r, const float (&acc)[NH][4], int half) {
    if (c * Q + r >= L) return;
    float* o = part + (static_cast<int64_t>(hs) * nblk + slot) * slab + (row0 + r) * GN +
               static_cast<int64_t>(g) * N + ncol0 + tq * 2;
#pragma unroll
    for (int jj = 0; jj < NH; ++jj)
      *reinterpret_cast<float2*>(o + jj * 8) =
          make_float2(acc[jj][half * 2], acc[jj][half * 2 + 1]);
  };
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    store_rows(dCp, tj, half ? t1 : t0, accC, half);
    store_rows(dBp, ti, half ? s1 : s0, accB, half);
  }
}

bool chunk_bwd_dbdc_v2_supported(const SsdDims& d) { return dbdc_ring(d).diag > 0; }

void launch_chunk_bwd_dbdc_v2(const SsdDims& d, const bf16* xBC, const bf16* dy,
                              const float* dt, const float* cs, const float* CB,
                              const bf16* states_bf, const bf16* dstates_bf, float* dBp_v2,
                              float* dCp_v2, float* dcs_v2, cudaStream_t st) {
  const int P = static_cast<int>(d.headdim), N = static_cast<int>(d.dstate);
  const int Q = static_cast<int>(d.chunk), nc = static_cast<int>(d.nchunks());
  const int nsplit = dbdc_v2_splits(d), hpg = static_cast<int>(d.nheads / d.ngroups);
  const int hps = (hpg + nsplit - 1) / nsplit;
  const DbdcRing ring = dbdc_ring(d);
  const size_t smem = ring.smem;
  dim3 grid(static_cast<unsigned>(dbdc_v2_pairs(d) * nsplit),
            static_cast<unsigned>(nc * d.ngroups), static_cast<unsigned>(d.batch));
  auto go = [&](auto kern) {
    allow_smem(kern, smem);
    kern<<<grid, kDbdcThreads, smem, st>>>(
        xBC, d.conv_dim(), dy, dt, cs, CB, states_bf, dstates_bf, dBp_v2, dCp_v2, dcs_v2,
        static_cast<int>(d.seqlen), static_cast<int>(d.nheads), static_cast<int>(d.ngroups), P,
        nc, Q, nsplit, hps, ring.diag, ring.off, q_slice(d));
  };
  if (N == 64 && P == 64)
    go(chunk_bwd_dbdc_v2_kernel<8, 64>);
  else if (N == 64)
    go(chunk_bwd_dbdc_v2_kernel<8, 0>);
  else if (P == 64)
    go(chunk_bwd_dbdc_v2_kernel<16, 64>);
  else
    go(chunk_bwd_dbdc_v2_kernel<16, 0>);
  check_launch("ssd chunk_bwd_dbdc_v2");
}

// Fixed-order sums: dC of a row in tile k = sum over slices, then pairs j = 0..k; dB = sum over
// slices, then pairs i = k..nblk-1. dcs: slice kDcsDC = sum_{j<=k} dcs_v2[j], slice kDcsDB =
// -sum_{i>=k} dcs_v2[nblk+i] (positions past seqlen are left as zeroed by ssd_bwd).
__global__ void bc_reduce_v2_kernel(const float* __restrict__ dBp, const float* __restrict__ dCp,
                                    const float* __restrict__ dcs2, int nsplit, int nblk,
                                    int64_t tokens, int64_t GN, int64_t ldx, int64_t d_inner,
                                    int L, int Q, int nc, int64_t nq, bf16* __restrict__ dxBC,
                                    float* __restrict__ dcs) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n4 = tokens * GN / 4, slab = tokens * GN;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n4;
       i += stride) {
    const int64_t e = i * 4, row = e / GN, col = e - row * GN;
    const int k = static_cast<int>((row % L) % Q) / 64;
    float4 sb = make_float4(0.f, 0.f, 0.f, 0.f), sc = sb;
    for (int hs = 0; hs < nsplit; ++hs) {
      for (int j = 0; j <= k; ++j)
        add4(sc, *reinterpret_cast<const float4*>(dCp + (hs * nblk + j) * slab + e));
      for (int t = k; t < nblk; ++t)
        add4(sb, *reinterpret_cast<const float4*>(dBp + (hs * nblk + t) * slab + e));
    }
    store_dbc4(dxBC, row, ldx, d_inner, GN, col, sb, sc);
  }
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < nq;
       idx += stride) {
    const int q = static_cast<int>(idx % Q);
    const int c = static_cast<int>((idx / Q) % nc);
    if (c * Q + q >= L) continue;
    const int k = q / 64;
    float sc = 0.f, sb = 0.f;
    for (int j = 0; j <= k; ++j) sc += dcs2[j * nq + idx];
    for (int t = k; t < nblk; ++t) sb += dcs2[(nblk + t) * nq + idx];
    dcs[kDcsDC * nq + idx] = sc;
    dcs[kDcsDB * nq + idx] = -sb;
  }
}

void launch_bc_reduce_v2(const SsdDims& d, const float* dBp_v2, const float* dCp_v2,
                         const float* dcs_v2, bf16* dxBC, float* dcs, cudaStream_t st) {
  const int64_t GN = d.ngroups * d.dstate, n4 = d.tokens() * GN / 4;
  const int64_t work = std::max<int64_t>(n4, q_slice(d));
  const int blocks = static_cast<int>(std::min<int64_t>((work + 255) / 256, 132 * 16));
  bc_reduce_v2_kernel<<<blocks, 256, 0, st>>>(
      dBp_v2, dCp_v2, dcs_v2, dbdc_v2_splits(d), static_cast<int>(d.chunk / 64), d.tokens(), GN,
      d.conv_dim(), d.d_inner(), static_cast<int>(d.seqlen), static_cast<int>(d.chunk),
      static_cast<int>(d.nchunks()), q_slice(d), dxBC, dcs);
  check_launch("ssd bc_reduce_v2");
}

}  // namespace ssd::cuda::detail
