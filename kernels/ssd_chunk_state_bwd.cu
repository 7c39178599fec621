// SSD backward of the chunk states' B factor and of the intra-chunk product's B factor.
// Per (64-token s tile, 64-column slice of dstate, chunk, group), looping over the group's
// heads so that the sum over heads stays in registers:
//   dB_s = sum_h [ exp(cs_last - cs_s) dt_s (X_s dS_out)  +  sum_{t >= s} Wt[s][t] C_t ],
//   Wt[s][t] = (x_s . dy_t) exp(cs_t - cs_s) dt_s,
//   dcs_s -= B_s . (per-head dB_s), the intra part taken as sum_t Wt[s][t] BC[s][t] in fp32.
#include "ssd_common.cuh"

namespace ssd::cuda::detail {

// Dynamic shared memory: Xs [64][P+8], dYs [64][P+8] (bf16), dSs [P][72], Cs [64][72] (bf16),
// cs_s, dt_s [Q] (fp32).
__global__ __launch_bounds__(128) void chunk_state_bwd_dB_kernel(
    const bf16* __restrict__ xBC, int64_t ldx, const bf16* __restrict__ dy,
    const float* __restrict__ dt, const float* __restrict__ cs, const float* __restrict__ BC,
    const float* __restrict__ dstates, bf16* __restrict__ dxBC, float* __restrict__ dcs, int L,
    int H, int G, int P, int N, int nc, int Q) {
  constexpr int LDS = 72;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int LDP = P + 8;
  bf16* Xs = reinterpret_cast<bf16*>(smem_raw);
  bf16* dYs = Xs + 64 * LDP;
  bf16* dSs = dYs + 64 * LDP;
  bf16* Cs = dSs + P * LDS;
  float* cs_s = reinterpret_cast<float*>(Cs + 64 * LDS);
  float* dt_s = cs_s + Q;

  const int nnb = N / 64;
  const int nb = blockIdx.x % nnb, sb = blockIdx.x / nnb;
  const int c = blockIdx.y % nc, g = blockIdx.y / nc, b = blockIdx.z;
  const int hpg = H / G;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tq = lane & 3;
  const int64_t d_inner = static_cast<int64_t>(H) * P;
  const int64_t row0 = static_cast<int64_t>(b) * L + static_cast<int64_t>(c) * Q;
  const int s0 = sb * 64, n0 = nb * 64, nblk = Q / 64;
  const int vs = L - (c * Q + s0);
  const int r0 = s0 + warp * 16 + (lane >> 2), r1 = r0 + 8;  // chunk-local s rows
  const bool ok0 = c * Q + r0 < L, ok1 = c * Q + r1 < L;
  const float* BCp = BC + ((static_cast<int64_t>(b) * nc + c) * G + g) * Q * Q;

  float2 bv0[8], bv1[8];  // B_s at this thread's positions
  {
    const bf16* Br0 = xBC + (row0 + r0) * ldx + d_inner + static_cast<int64_t>(g) * N + n0 + tq * 2;
    const bf16* Br1 = Br0 + 8 * ldx;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      bv0[j] = ok0 ? ld_bf16x2(Br0 + j * 8) : make_float2(0.f, 0.f);
      bv1[j] = ok1 ? ld_bf16x2(Br1 + j * 8) : make_float2(0.f, 0.f);
    }
  }

  float accT[8][4];
  zero_acc(accT);
  if (vs > 0) {
    for (int hh = 0; hh < hpg; ++hh) {
      const int h = g * hpg + hh;
      const int64_t cbase = ((static_cast<int64_t>(b) * H + h) * nc + c) * Q;
      __syncthreads();
      for (int t = threadIdx.x; t < Q; t += blockDim.x) {
        cs_s[t] = cs[cbase + t];
        dt_s[t] = dt[cbase + t];
      }
      load_tile(Xs, LDP, xBC + (row0 + s0) * ldx + static_cast<int64_t>(h) * P, ldx, 64, P, vs);
      load_tile_f32(dSs, LDS,
                    dstates + ((static_cast<int64_t>(b) * nc + c) * H + h) *
                                  static_cast<int64_t>(P) * N + n0,
                    N, P, 64);
      __syncthreads();
      float accH[8][4];
      zero_acc(accH);
      // chunk-state part: X_s (64 x P) . dS_out (P x 64), rows scaled by exp(cs_last-cs_s) dt_s
      warp_mma_smem<8, false>(accH, Xs, LDP, warp * 16, dSs, LDS, P, lane);
      const float cs0 = cs_s[r0], cs1 = cs_s[r1];
      const float dt0 = dt_s[r0], dt1 = dt_s[r1];
      {
        const float cl = cs_s[Q - 1];
        const float f0 = __expf(cl - cs0) * dt0, f1 = __expf(cl - cs1) * dt1;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          accH[j][0] *= f0;
          accH[j][1] *= f0;
          accH[j][2] *= f1;
          accH[j][3] *= f1;
        }
      }
      float dc0 = 0.f, dc1 = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        dc0 += accH[j][0] * bv0[j].x + accH[j][1] * bv0[j].y;
        dc1 += accH[j][2] * bv1[j].x + accH[j][3] * bv1[j].y;
      }
      // intra-chunk part, t-blocks at or after this s-block
      for (int tb = sb; tb < nblk; ++tb) {
        const int t0 = tb * 64;
        const int vt = L - (c * Q + t0);
        if (vt <= 0) break;
        __syncthreads();
        load_tile(dYs, LDP, dy + (row0 + t0) * d_inner + static_cast<int64_t>(h) * P, d_inner,
                  64, P, vt);
        load_tile(Cs, LDS,
                  xBC + (row0 + t0) * ldx + d_inner + static_cast<int64_t>(G + g) * N + n0, ldx,
                  64, 64, vt);
        __syncthreads();
        float W[8][4];
        zero_acc(W);
        // Wt = X_s (64 x P) . dY_t^T (P x 64)
        warp_mma_smem<8, true>(W, Xs, LDP, warp * 16, dYs, LDP, P, lane);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int t = t0 + j * 8 + tq * 2;
          const float q0 = cs_s[t], q1 = cs_s[t + 1];
          W[j][0] = t >= r0 ? W[j][0] * __expf(q0 - cs0) * dt0 : 0.f;
          W[j][1] = t + 1 >= r0 ? W[j][1] * __expf(q1 - cs0) * dt0 : 0.f;
          W[j][2] = t >= r1 ? W[j][2] * __expf(q0 - cs1) * dt1 : 0.f;
          W[j][3] = t + 1 >= r1 ? W[j][3] * __expf(q1 - cs1) * dt1 : 0.f;
        }
        if (nb == 0) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int t = t0 + j * 8 + tq * 2;
            const float2 g0 = *reinterpret_cast<const float2*>(BCp + static_cast<int64_t>(r0) * Q + t);
            const float2 g1 = *reinterpret_cast<const float2*>(BCp + static_cast<int64_t>(r1) * Q + t);
            dc0 += W[j][0] * g0.x + W[j][1] * g0.y;
            dc1 += W[j][2] * g1.x + W[j][3] * g1.y;
          }
        }
        // accH += Wt (64 x 64 t) . C_t (64 t x 64)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          uint32_t a[4];
          acc_to_a(a, W, kk);
#pragma unroll
          for (int j = 0; j < 8; j += 2) {
            uint32_t bb[4];
            ldb_kn(bb, Cs, LDS, j * 8, kk * 16, lane);
            mma_bf16(accH[j], a, bb[0], bb[1]);
            mma_bf16(accH[j + 1], a, bb[2], bb[3]);
          }
        }
      }
      dc0 = quad_sum(dc0);
      dc1 = quad_sum(dc1);
      if (tq == 0) {
        if (ok0) atomicAdd(dcs + cbase + r0, -dc0);
        if (ok1) atomicAdd(dcs + cbase + r1, -dc1);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) accT[j][q] += accH[j][q];
    }
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half ? r1 : r0;
    if (c * Q + r >= L) continue;
    bf16* o = dxBC + (row0 + r) * ldx + d_inner + static_cast<int64_t>(g) * N + n0 + tq * 2;
#pragma unroll
    for (int j = 0; j < 8; ++j) st_bf16x2(o + j * 8, accT[j][half * 2], accT[j][half * 2 + 1]);
  }
}

void launch_chunk_state_bwd_dB(const SsdDims& d, const bf16* xBC, const bf16* dy,
                               const float* dt, const float* cs, const float* BC,
                               const float* dstates, bf16* dxBC, float* dcs, cudaStream_t st) {
  const int P = static_cast<int>(d.headdim), N = static_cast<int>(d.dstate);
  const int Q = static_cast<int>(d.chunk), nc = static_cast<int>(d.nchunks());
  const size_t smem = (2 * 64 * (P + 8) + P * 72 + 64 * 72) * sizeof(bf16) + 2 * Q * sizeof(float);
  allow_smem(chunk_state_bwd_dB_kernel, smem);
  dim3 grid(static_cast<unsigned>((Q / 64) * (N / 64)), static_cast<unsigned>(nc * d.ngroups),
            static_cast<unsigned>(d.batch));
  chunk_state_bwd_dB_kernel<<<grid, 128, smem, st>>>(
      xBC, d.conv_dim(), dy, dt, cs, BC, dstates, dxBC, dcs, static_cast<int>(d.seqlen),
      static_cast<int>(d.nheads), static_cast<int>(d.ngroups), P, N, nc, Q);
  check_launch("ssd chunk_state_bwd_dB");
}

}  // namespace ssd::cuda::detail
