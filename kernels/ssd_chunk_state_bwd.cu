// SSD backward of the chunk states' B factor and of the intra-chunk product's B factor.
// Per (64-token s tile, chunk, group, slice of the group's heads), looping over the heads of the
// slice so that their sum stays in registers (the slices are summed by ssd_bc_reduce):
//   dB_s = sum_h [ exp(cs_last - cs_s) dt_s (X_s dS_out)  +  sum_{t >= s} Wt[s][t] C_t ],
//   Wt[s][t] = (x_s . dy_t) exp(cs_t - cs_s) dt_s,
//   dcs_s -= sum_t Wt[s][t] BC[s][t]   (the intra-chunk part of B_s . dB_s, per head, in fp32;
//   each column-half warp's share stored, negated, to its own dcs slice kDcsDB + w/4: no atomics).
// The chunk-state part of B_s . dB_s (v_s) is taken by the dx kernel, where it is cheaper.
#include <algorithm>

#include "ssd_common.cuh"

namespace ssd::cuda::detail {

// Dynamic shared memory: Xs, dYs [64][P+8]; dSs [P][N+8]; Cs [64][N+8]; Ws [64][72] (bf16);
// cs_s, dt_s [Q] (fp32). 8 warps: warp w owns rows 16*(w%4).. and, of dB, the column half
// w/4; of each 64x64 Wt tile it computes the 32 columns 32*(w/4).. and shares them via Ws.
template <int NN>
__global__ __launch_bounds__(256) void chunk_state_bwd_dB_kernel(
    const bf16* __restrict__ xBC, int64_t ldx, const bf16* __restrict__ dy,
    const float* __restrict__ dt, const float* __restrict__ cs, const float* __restrict__ BC,
    const bf16* __restrict__ dstates, float* __restrict__ part, float* __restrict__ dcs, int L,
    int H, int G, int P, int nc, int Q, int nsplit, int hps, int64_t nq) {
  constexpr int N = NN * 8, LDN = N + 8, NH = NN / 2, LDW = 72;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int LDP = P + 8;
  bf16* Xs = reinterpret_cast<bf16*>(smem_raw);
  bf16* dYs = Xs + 64 * LDP;
  bf16* dSs = dYs + 64 * LDP;
  bf16* Cs = dSs + P * LDN;
  bf16* Ws = Cs + 64 * LDN;
  float* cs_s = reinterpret_cast<float*>(Ws + 64 * LDW);
  float* dt_s = cs_s + Q;

  const int hs = blockIdx.x % nsplit, sb = blockIdx.x / nsplit;
  const int c = blockIdx.y % nc, g = blockIdx.y / nc, b = blockIdx.z;
  const int hpg = H / G;
  const int h_begin = g * hpg + hs * hps, h_end = min(g * hpg + hpg, h_begin + hps);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tq = lane & 3;
  const int wr = warp & 3, wc = warp >> 2;
  const int ncol0 = wc * (N / 2), tcol0 = wc * 32;
  const int64_t d_inner = static_cast<int64_t>(H) * P;
  const int64_t row0 = static_cast<int64_t>(b) * L + static_cast<int64_t>(c) * Q;
  const int s0 = sb * 64, nblk = Q / 64;
  const int vs = L - (c * Q + s0);
  const int lr0 = wr * 16 + (lane >> 2);     // row within the tile
  const int r0 = s0 + lr0, r1 = r0 + 8;      // chunk-local s rows
  const bool ok0 = c * Q + r0 < L, ok1 = c * Q + r1 < L;
  const float* BCp = BC + ((static_cast<int64_t>(b) * nc + c) * G + g) * Q * Q;

  float* dcs_w = dcs + (kDcsDB + wc) * nq;  // this column half's dcs slice
  float accT[NH][4];
  zero_acc(accT);
  if (vs > 0) {
    for (int h = h_begin; h < h_end; ++h) {
      const int64_t cbase = ((static_cast<int64_t>(b) * H + h) * nc + c) * Q;
      __syncthreads();
      for (int t = threadIdx.x; t < Q; t += blockDim.x) {
        cs_s[t] = cs[cbase + t];
        dt_s[t] = dt[cbase + t];
      }
      load_tile(Xs, LDP, xBC + (row0 + s0) * ldx + static_cast<int64_t>(h) * P, ldx, 64, P, vs);
      load_tile(dSs, LDN,
                dstates + ((static_cast<int64_t>(b) * nc + c) * H + h) * static_cast<int64_t>(P) * N,
                N, P, N, P);
      __syncthreads();
      const float cs0 = cs_s[r0], cs1 = cs_s[r1];
      const float dt0 = dt_s[r0], dt1 = dt_s[r1];
      {
        // chunk-state part: diag(exp(cs_last - cs_s) dt_s) X_s (64 x P) . dS_out (P x N)
        const float cl = cs_s[Q - 1];
        warp_mma_smem<NH, false, false, true>(accT, Xs, LDP, wr * 16, dSs + ncol0, LDN, P, lane,
                                              __expf(cl - cs0) * dt0, __expf(cl - cs1) * dt1);
      }
      float dc0 = 0.f, dc1 = 0.f;
      for (int tb = sb; tb < nblk; ++tb) {
        const int t0 = tb * 64;
        const int vt = L - (c * Q + t0);
        if (vt <= 0) break;
        __syncthreads();
        load_tile(dYs, LDP, dy + (row0 + t0) * d_inner + static_cast<int64_t>(h) * P, d_inner,
                  64, P, vt);
        load_tile(Cs, LDN, xBC + (row0 + t0) * ldx + d_inner + static_cast<int64_t>(G + g) * N,
                  ldx, 64, N, vt);
        __syncthreads();
        float W[4][4];
        zero_acc(W);
        for (int k = 0; k < P; k += 16) {  // X_s . dY_t^T, this warp's 32 t columns
          uint32_t a[4];
          lda_mk(a, Xs, LDP, wr * 16, k, lane);
#pragma unroll
          for (int j = 0; j < 4; j += 2) {
            uint32_t bb[4];
            ldb_nk(bb, dYs, LDP, tcol0 + j * 8, k, lane);
            mma_bf16(W[j], a, bb[0], bb[1]);
            mma_bf16(W[j + 1], a, bb[2], bb[3]);
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int tl = tcol0 + j * 8 + tq * 2, t = t0 + tl;
          const float q0 = cs_s[t], q1 = cs_s[t + 1];
          W[j][0] = t >= r0 ? W[j][0] * __expf(q0 - cs0) * dt0 : 0.f;
          W[j][1] = t + 1 >= r0 ? W[j][1] * __expf(q1 - cs0) * dt0 : 0.f;
          W[j][2] = t >= r1 ? W[j][2] * __expf(q0 - cs1) * dt1 : 0.f;
          W[j][3] = t + 1 >= r1 ? W[j][3] * __expf(q1 - cs1) * dt1 : 0.f;
          const float2 g0 = *reinterpret_cast<const float2*>(BCp + static_cast<int64_t>(r0) * Q + t);
          const float2 g1 = *reinterpret_cast<const float2*>(BCp + static_cast<int64_t>(r1) * Q + t);
          dc0 += W[j][0] * g0.x + W[j][1] * g0.y;
          dc1 += W[j][2] * g1.x + W[j][3] * g1.y;
          *reinterpret_cast<uint32_t*>(Ws + lr0 * LDW + tl) = pack_bf16(W[j][0], W[j][1]);
          *reinterpret_cast<uint32_t*>(Ws + (lr0 + 8) * LDW + tl) = pack_bf16(W[j][2], W[j][3]);
        }
        __syncthreads();
        // accT += Wt (64 x 64 t) . C_t (64 t x this warp's N/2 columns)
        warp_mma_smem<NH, false>(accT, Ws, LDW, wr * 16, Cs + ncol0, LDN, 64, lane);
      }
      dc0 = quad_sum(dc0);
      dc1 = quad_sum(dc1);
      if (tq == 0) {  // this column half's slice: one writer per slot
        if (ok0) dcs_w[cbase + r0] = -dc0;
        if (ok1) dcs_w[cbase + r1] = -dc1;
      }
    }
  }
  // this slice's dB, fp32, [nsplit][tokens][G*N]
  const int64_t GN = static_cast<int64_t>(G) * N;
  const int64_t tokens = static_cast<int64_t>(gridDim.z) * L;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half ? r1 : r0;
    if (c * Q + r >= L) continue;
    float* o = part + (hs * tokens + row0 + r) * GN + static_cast<int64_t>(g) * N + ncol0 + tq * 2;
#pragma unroll
    for (int j = 0; j < NH; ++j)
      *reinterpret_cast<float2*>(o + j * 8) = make_float2(accT[j][half * 2], accT[j][half * 2 + 1]);
  }
}

size_t chunk_bc_bwd_smem(const SsdDims& d) {
  const size_t P = d.headdim, N = d.dstate;
  return (2 * 64 * (P + 8) + (P + 64) * (N + 8) + 64 * 72) * sizeof(bf16) +
         2 * d.chunk * sizeof(float);
}

void launch_chunk_state_bwd_dB(const SsdDims& d, const bf16* xBC, const bf16* dy,
                               const float* dt, const float* cs, const float* BC,
                               const bf16* dstates, float* part, float* dcs, cudaStream_t st) {
  const int P = static_cast<int>(d.headdim), N = static_cast<int>(d.dstate);
  const int Q = static_cast<int>(d.chunk), nc = static_cast<int>(d.nchunks());
  const int nsplit = bc_bwd_splits(d), hpg = static_cast<int>(d.nheads / d.ngroups);
  const int hps = (hpg + nsplit - 1) / nsplit;
  const size_t smem = chunk_bc_bwd_smem(d);
  dim3 grid(static_cast<unsigned>((Q / 64) * nsplit), static_cast<unsigned>(nc * d.ngroups),
            static_cast<unsigned>(d.batch));
  auto go = [&](auto kern) {
    allow_smem(kern, smem);
    kern<<<grid, 256, smem, st>>>(xBC, d.conv_dim(), dy, dt, cs, BC, dstates, part, dcs,
                                  static_cast<int>(d.seqlen), static_cast<int>(d.nheads),
                                  static_cast<int>(d.ngroups), P, nc, Q, nsplit, hps,
                                  q_slice(d));
  };
  if (N == 64)
    go(chunk_state_bwd_dB_kernel<8>);
  else
    go(chunk_state_bwd_dB_kernel<16>);
  check_launch("ssd chunk_state_bwd_dB");
}

// Sums the head slices of dB and dC and writes them, as bf16, into dxBC's B and C columns.
__global__ void bc_reduce_kernel(const float* __restrict__ dBp, const float* __restrict__ dCp,
                                 int nsplit, int64_t tokens, int64_t GN, int64_t ldx,
                                 int64_t d_inner, bf16* __restrict__ dxBC) {
  const int64_t n4 = tokens * GN / 4;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * 4, row = e / GN, col = e - row * GN;
    float4 sb = *reinterpret_cast<const float4*>(dBp + e);
    float4 sc = *reinterpret_cast<const float4*>(dCp + e);
    for (int k = 1; k < nsplit; ++k) {
      const float4 vb = *reinterpret_cast<const float4*>(dBp + k * tokens * GN + e);
      const float4 vc = *reinterpret_cast<const float4*>(dCp + k * tokens * GN + e);
      add4(sb, vb);
      add4(sc, vc);
    }
    store_dbc4(dxBC, row, ldx, d_inner, GN, col, sb, sc);
  }
}

void launch_bc_reduce(const SsdDims& d, const float* dBp, const float* dCp, bf16* dxBC,
                      cudaStream_t st) {
  const int64_t GN = d.ngroups * d.dstate, n4 = d.tokens() * GN / 4;
  const int blocks = static_cast<int>(std::min<int64_t>((n4 + 255) / 256, 132 * 16));
  bc_reduce_kernel<<<blocks, 256, 0, st>>>(dBp, dCp, bc_bwd_splits(d), d.tokens(), GN,
                                           d.conv_dim(), d.d_inner(), dxBC);
  check_launch("ssd bc_reduce");
}

}  // namespace ssd::cuda::detail
