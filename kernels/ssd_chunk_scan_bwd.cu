// SSD backward of the chunk scan (step 5) and of the chunk states' x factor.
//
// dx kernel, per (64-token tile, PT-column slice of headdim, chunk, head, batch):
//   acc_s = exp(cs_last - cs_s) B_s dS_out^T  +  sum_{t >= s} BC[s][t] exp(cs_t - cs_s) dy_t
//   dx_s = dt_s acc_s + D dy_s,   ddt_dir_s += x_s . acc_s,   dD += sum x . dy
// and the per-head state terms of dcs (cs = within-chunk cumsum of dt*A):
//   dcs_t += u_t = exp(cs_t) dy_t . (S_in C_t)       (readout of the state entering the chunk)
//   dcs_s -= v_s = dt_s x_s . (state part of acc_s)  (decay of x_s B_s^T to the chunk's end)
//   dcs_last += sum_s v_s
// No atomics (determinism): u_t - v_t goes to dcs slice kDcsDX + pb and x_s . acc_s to ddt_dir
// slice pb (one writer per slot); sum_s v_s per warp to dcs_last, dD per warp to pg_dD.
// dC kernel, per (64-token t tile, chunk, group, slice of the group's heads), looping over the
// heads of the slice so that their sum stays in registers (slices summed by bc_reduce):
//   dC_t = sum_h [ exp(cs_t) dy_t S_in + sum_{s <= t} W[t][s] B_s ],
//   W[t][s] = (dy_t . x_s) exp(cs_t - cs_s) dt_s,   dcs_t += sum_s W[t][s] CB[t][s]  (fp32;
//   each column-half warp's share stored to its own dcs slice kDcsDC + w/4, no atomics).

#include "ssd_common.cuh"

namespace ssd::cuda::detail {

// Shared memory of the dx kernel: two stage buffers (cp.async double buffering), each holding
// one step's tiles: a [64][64 of N] tile of C or B with a [PT][64 of N] tile of S_in or dS_out,
// or an intra-chunk step's dY tile [64][PT] with its BC tile [64 s][64 t] (fp32); then cs [Q].
template <int NT>
constexpr int dx_stage_bytes() {
  constexpr int PT = NT * 8, LDY = PT + 8, LDS = 72, LDBC = 68;
  constexpr int state = (64 + PT) * LDS * 2;
  constexpr int intra = 64 * LDY * 2 + 64 * LDBC * 4;
  return state > intra ? state : intra;
}
template <int NT>
constexpr int dx_smem_bytes() {
  return 2 * dx_stage_bytes<NT>() + 256 * 4;
}

// The block's steps: N/64 of u (C, S_in), N/64 of the state part (B, dS_out), then one per t
// tile tb = sb.. of the intra-chunk part; step k + 1's tiles are copied while step k computes.
template <int NT>
__global__ __launch_bounds__(128) void chunk_scan_bwd_dx_kernel(
    const bf16* __restrict__ xBC, int64_t ldx, const bf16* __restrict__ dy,
    const float* __restrict__ D, const float* __restrict__ dt, const float* __restrict__ cs,
    const float* __restrict__ BC, const bf16* __restrict__ states,
    const bf16* __restrict__ dstates, bf16* __restrict__ dxBC, float* __restrict__ ddt_dir,
    float* __restrict__ dcs, float* __restrict__ dcs_last, float* __restrict__ pg_dD, int L,
    int H, int G, int P, int N, int nc, int Q, int64_t nq, int last_len) {
  constexpr int PT = NT * 8, LDY = PT + 8, LDS = 72, LDBC = 68;
  constexpr int kStage = dx_stage_bytes<NT>();
  extern __shared__ __align__(16) unsigned char smem[];
  float* cs_s = reinterpret_cast<float*>(smem + 2 * kStage);
  const int npb = P / PT;
  const int pb = blockIdx.x % npb, sb = blockIdx.x / npb;
  const int c = blockIdx.y % nc, h = blockIdx.y / nc, b = blockIdx.z;
  const int g = h / (H / G);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tq = lane & 3;
  const int64_t d_inner = static_cast<int64_t>(H) * P;
  const int nblk = Q / 64;

  const int64_t cbase = ((static_cast<int64_t>(b) * H + h) * nc + c) * Q;
  for (int t = threadIdx.x; t < Q; t += blockDim.x) cs_s[t] = cs[cbase + t] * kLog2e;
  const int64_t row0 = static_cast<int64_t>(b) * L + static_cast<int64_t>(c) * Q;
  const int s0 = sb * 64;
  const int vs = L - (c * Q + s0);
  const int r0 = s0 + warp * 16 + (lane >> 2), r1 = r0 + 8;  // chunk-local rows
  const int lr0 = r0 - s0, lr1 = r1 - s0;                     // rows within the BC tile
  const bool ok0 = c * Q + r0 < L, ok1 = c * Q + r1 < L;
  const int64_t col0 = static_cast<int64_t>(h) * P + pb * PT + tq * 2;
  const int64_t PN = static_cast<int64_t>(P) * N;

  const bf16* S = states + ((static_cast<int64_t>(b) * nc + c) * H + h) * PN +
                  static_cast<int64_t>(pb) * PT * N;
  const bf16* dS = dstates + ((static_cast<int64_t>(b) * nc + c) * H + h) * PN +
                   static_cast<int64_t>(pb) * PT * N;
  const bf16* Cg = xBC + (row0 + s0) * ldx + d_inner + static_cast<int64_t>(G + g) * N;
  const bf16* Bg = xBC + (row0 + s0) * ldx + d_inner + static_cast<int64_t>(g) * N;
  const float* BCp = BC + ((static_cast<int64_t>(b) * nc + c) * G + g) * Q * Q;
  const bf16* dYg = dy + row0 * d_inner + static_cast<int64_t>(h) * P + pb * PT;
  const int nN = N / 64;
  // t tiles inside the sequence: tb < tb_end
  const int tb_end = min(nblk, (L - c * Q + 63) / 64);
  const int nstage = 2 * nN + max(0, tb_end - sb);

  auto issue = [&](int k) {
    unsigned char* buf = smem + (k & 1) * kStage;
    if (k < 2 * nN) {  // [64 x 64 of N] tile of C (u) or B (state part), [PT x 64] of S / dS
      const int n0 = (k % nN) * 64;
      const bf16* src = k < nN ? Cg : Bg;
      const bf16* st = k < nN ? S : dS;
      bf16* Ts = reinterpret_cast<bf16*>(buf);
      load_tile_async(Ts, LDS, src + n0, ldx, 64, 64, vs, xBC);  // xBC: a safe address
      load_tile_async(Ts + 64 * LDS, LDS, st + n0, N, PT, 64, PT, st);
    } else {  // t tile tb: dY_t [64 x PT], BC[s0.., t0..] [64 x 64] fp32
      const int t0 = (sb + k - 2 * nN) * 64;
      bf16* dYs = reinterpret_cast<bf16*>(buf);
      float* BCs = reinterpret_cast<float*>(buf + 64 * LDY * 2);
      load_tile_async(dYs, LDY, dYg + t0 * d_inner, d_inner, 64, PT, L - (c * Q + t0), dy);
      const float* src = BCp + static_cast<int64_t>(s0) * Q + t0;
      load_tile64_f32_async(BCs, LDBC, src, Q);
    }
    cp_async_commit();
  };

  float acc[NT][4], accU[NT][4];
  zero_acc(acc);
  zero_acc(accU);
  // d0, d1 = (row r0, row r1 of M over this thread's columns) . (rows of the accumulator a),
  // summed over the quad: the rows' dot products with this p-slice (0 past seqlen).
  auto rows_dot = [&](const bf16* M, int64_t ldm, const float (&a)[NT][4], float& d0,
                      float& d1) {
    d0 = d1 = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      if (ok0) {
        const float2 v = ld_bf16x2(M + (row0 + r0) * ldm + col0 + j * 8);
        d0 += v.x * a[j][0] + v.y * a[j][1];
      }
      if (ok1) {
        const float2 v = ld_bf16x2(M + (row0 + r1) * ldm + col0 + j * 8);
        d1 += v.x * a[j][2] + v.y * a[j][3];
      }
    }
    d0 = quad_sum(d0);
    d1 = quad_sum(d1);
  };
  issue(0);
  for (int k = 0; k < nstage; ++k) {
    __syncthreads();  // the other buffer's readers are done; cs_s is visible
    if (k + 1 < nstage) {
      issue(k + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const unsigned char* buf = smem + (k & 1) * kStage;
    if (k < nN) {
      // ---- u_t = exp(cs_t) dy_t . (S_in C_t), this p-slice ----
      const bf16* Ts = reinterpret_cast<const bf16*>(buf);
      warp_mma_smem<NT, true>(accU, Ts, LDS, warp * 16, Ts + 64 * LDS, LDS, 64, lane);
      if (k == nN - 1) {
        float u0, u1;
        rows_dot(dy, d_inner, accU, u0, u1);
        u0 *= exp2_approx(cs_s[r0]);
        u1 *= exp2_approx(cs_s[r1]);
        if (tq == 0) {  // this block's dcs slice: one writer per slot (-v_s added below)
          float* o = dcs + (kDcsDX + pb) * nq + cbase;
          if (ok0) o[r0] = u0;
          if (ok1) o[r1] = u1;
        }
      }
      continue;
    }
    if (k < 2 * nN) {
      // ---- B_s (64 x N) . dS_out^T (N x PT), rows scaled by exp(cs_last - cs_s) ----
      const bf16* Ts = reinterpret_cast<const bf16*>(buf);
      warp_mma_smem<NT, true>(acc, Ts, LDS, warp * 16, Ts + 64 * LDS, LDS, 64, lane);
      if (k == 2 * nN - 1) {
        const float cl = cs_s[Q - 1];
        const float e0 = exp2_approx(cl - cs_s[r0]), e1 = exp2_approx(cl - cs_s[r1]);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          acc[j][0] *= e0;
          acc[j][1] *= e0;
          acc[j][2] *= e1;
          acc[j][3] *= e1;
        }
        // v_s = dt_s x_s . acc_s (state part)
        float v0, v1;
        rows_dot(xBC, ldx, acc, v0, v1);
        v0 = ok0 ? v0 * dt[cbase + r0] : 0.f;
        v1 = ok1 ? v1 * dt[cbase + r1] : 0.f;
        if (tq == 0) {  // the same thread that stored u_s: u_s - v_s
          float* o = dcs + (kDcsDX + pb) * nq + cbase;
          if (ok0) o[r0] += -v0;
          if (ok1) o[r1] += -v1;
        }
        float vsum = tq == 0 ? v0 + v1 : 0.f;
        vsum = warp_sum(vsum);
        // this warp's slot [0, NX) of the chunk's dcs_last row
        if (lane == 0) dcs_last[(cbase / Q) * last_len + blockIdx.x * 4 + warp] = vsum;
      }
      continue;
    }
    // ---- sum_{t >= s} (BC o decay, anti-causal) (64 x 64 of this t tile) . dY_t (64 x PT) ----
    const int t0 = (sb + k - 2 * nN) * 64;
    const bf16* dYs = reinterpret_cast<const bf16*>(buf);
    const float* BCs = reinterpret_cast<const float*>(buf + 64 * LDY * 2);
    // Only the diagonal tile (tb == sb) needs the anti-causal mask t >= s.
    if (t0 > s0)
      decayed_tile_mma<NT, false, false>(acc, BCs, LDBC, lr0, lr1, r0, r1, t0, cs_s, nullptr,
                                         dYs, LDY, lane);
    else
      decayed_tile_mma<NT, false, true>(acc, BCs, LDBC, lr0, lr1, r0, r1, t0, cs_s, nullptr,
                                        dYs, LDY, lane);
  }

  // ---- epilogue ----
  const float Dh = D[h];
  float dd = 0.f;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half ? r1 : r0;
    const bool valid = half ? ok1 : ok0;
    float part = 0.f;
    if (valid) {
      const float dts = dt[cbase + r];
      const bf16* xr = xBC + (row0 + r) * ldx + col0;
      const bf16* dyr = dy + (row0 + r) * d_inner + col0;
      bf16* dxr = dxBC + (row0 + r) * ldx + col0;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const float2 xv = ld_bf16x2(xr + j * 8), dv = ld_bf16x2(dyr + j * 8);
        const float a0 = acc[j][half * 2], a1 = acc[j][half * 2 + 1];
        part += xv.x * a0 + xv.y * a1;
        dd += xv.x * dv.x + xv.y * dv.y;
        st_bf16x2(dxr + j * 8, dts * a0 + Dh * dv.x, dts * a1 + Dh * dv.y);
      }
    }
    part = quad_sum(part);
    if (valid && tq == 0) ddt_dir[pb * nq + cbase + r] = part;  // this block's slice
  }
  dd = warp_sum(dd);
  // pg_dD [batch, nheads, nc][NX]: (b*H + h)*nc + c = blockIdx.z*gridDim.y + blockIdx.y, and
  // NX = gridDim.x * 4 warps, so this warp's slot is the linear block index * 4 + warp
  if (lane == 0)
    pg_dD[((static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) *
              4 + warp] = dd;
}

// dC: see the file comment. Dynamic shared memory: dYs, Xs [64][P+8]; Ss [P][N+8];
// Bs [64][N+8]; Ws [64][72] (bf16); cs_s, dt_s [Q] (fp32). 8 warps: warp w owns rows
// 16*(w%4).. and, of dC, the column half w/4; of each 64x64 W tile it computes the 32
// columns 32*(w/4).. and shares them via Ws.
template <int NN>
__global__ __launch_bounds__(256) void chunk_scan_bwd_dC_kernel(
    const bf16* __restrict__ xBC, int64_t ldx, const bf16* __restrict__ dy,
    const float* __restrict__ dt, const float* __restrict__ cs, const float* __restrict__ CB,
    const bf16* __restrict__ states, float* __restrict__ part, float* __restrict__ dcs, int L,
    int H, int G, int P, int nc, int Q, int nsplit, int hps, int64_t nq) {
  constexpr int N = NN * 8, LDN = N + 8, NH = NN / 2, LDW = 72;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int LDP = P + 8;
  bf16* dYs = reinterpret_cast<bf16*>(smem_raw);
  bf16* Xs = dYs + 64 * LDP;
  bf16* Ss = Xs + 64 * LDP;
  bf16* Bs = Ss + P * LDN;
  bf16* Ws = Bs + 64 * LDN;
  float* cs_s = reinterpret_cast<float*>(Ws + 64 * LDW);
  float* dt_s = cs_s + Q;

  const int hs = blockIdx.x % nsplit, tb = blockIdx.x / nsplit;
  const int c = blockIdx.y % nc, g = blockIdx.y / nc, b = blockIdx.z;
  const int hpg = H / G;
  const int h_begin = g * hpg + hs * hps, h_end = min(g * hpg + hpg, h_begin + hps);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tq = lane & 3;
  const int wr = warp & 3, wc = warp >> 2;
  const int ncol0 = wc * (N / 2), scol0 = wc * 32;
  const int64_t d_inner = static_cast<int64_t>(H) * P;
  const int64_t row0 = static_cast<int64_t>(b) * L + static_cast<int64_t>(c) * Q;
  const int t0 = tb * 64;
  const int vt = L - (c * Q + t0);
  const int lr0 = wr * 16 + (lane >> 2);
  const int r0 = t0 + lr0, r1 = r0 + 8;  // chunk-local t rows
  const bool ok0 = c * Q + r0 < L, ok1 = c * Q + r1 < L;
  const float* CBp = CB + ((static_cast<int64_t>(b) * nc + c) * G + g) * Q * Q;

  float* dcs_w = dcs + (kDcsDC + wc) * nq;  // this column half's dcs slice
  float accT[NH][4];
  zero_acc(accT);
  if (vt > 0) {
    for (int h = h_begin; h < h_end; ++h) {
      const int64_t cbase = ((static_cast<int64_t>(b) * H + h) * nc + c) * Q;
      __syncthreads();
      for (int t = threadIdx.x; t < Q; t += blockDim.x) {
        cs_s[t] = cs[cbase + t];
        dt_s[t] = dt[cbase + t];
      }
      load_tile(dYs, LDP, dy + (row0 + t0) * d_inner + static_cast<int64_t>(h) * P, d_inner, 64,
                P, vt);
      load_tile(Ss, LDN,
                states + ((static_cast<int64_t>(b) * nc + c) * H + h) * static_cast<int64_t>(P) * N,
                N, P, N, P);
      __syncthreads();
      const float cs0 = cs_s[r0], cs1 = cs_s[r1];
      {
        // carried state: diag(exp(cs_t)) dY_t (64 x P) . S_in (P x N)
        warp_mma_smem<NH, false, false, true>(accT, dYs, LDP, wr * 16, Ss + ncol0, LDN, P, lane,
                                              __expf(cs0), __expf(cs1));
      }
      float dc0 = 0.f, dc1 = 0.f;
      for (int sb = 0; sb <= tb; ++sb) {
        const int s0 = sb * 64;
        __syncthreads();
        load_tile(Xs, LDP, xBC + (row0 + s0) * ldx + static_cast<int64_t>(h) * P, ldx, 64, P,
                  L - (c * Q + s0));
        load_tile(Bs, LDN, xBC + (row0 + s0) * ldx + d_inner + static_cast<int64_t>(g) * N, ldx,
                  64, N, L - (c * Q + s0));
        __syncthreads();
        float W[4][4];
        zero_acc(W);
        for (int k = 0; k < P; k += 16) {  // dY_t . X_s^T, this warp's 32 s columns
          uint32_t a[4];
          lda_mk(a, dYs, LDP, wr * 16, k, lane);
#pragma unroll
          for (int j = 0; j < 4; j += 2) {
            uint32_t bb[4];
            ldb_nk(bb, Xs, LDP, scol0 + j * 8, k, lane);
            mma_bf16(W[j], a, bb[0], bb[1]);
            mma_bf16(W[j + 1], a, bb[2], bb[3]);
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int sl = scol0 + j * 8 + tq * 2, s = s0 + sl;
          const float q0 = cs_s[s], q1 = cs_s[s + 1], w0 = dt_s[s], w1 = dt_s[s + 1];
          W[j][0] = s <= r0 ? W[j][0] * __expf(cs0 - q0) * w0 : 0.f;
          W[j][1] = s + 1 <= r0 ? W[j][1] * __expf(cs0 - q1) * w1 : 0.f;
          W[j][2] = s <= r1 ? W[j][2] * __expf(cs1 - q0) * w0 : 0.f;
          W[j][3] = s + 1 <= r1 ? W[j][3] * __expf(cs1 - q1) * w1 : 0.f;
          const float2 g0 = *reinterpret_cast<const float2*>(CBp + static_cast<int64_t>(r0) * Q + s);
          const float2 g1 = *reinterpret_cast<const float2*>(CBp + static_cast<int64_t>(r1) * Q + s);
          dc0 += W[j][0] * g0.x + W[j][1] * g0.y;
          dc1 += W[j][2] * g1.x + W[j][3] * g1.y;
          *reinterpret_cast<uint32_t*>(Ws + lr0 * LDW + sl) = pack_bf16(W[j][0], W[j][1]);
          *reinterpret_cast<uint32_t*>(Ws + (lr0 + 8) * LDW + sl) = pack_bf16(W[j][2], W[j][3]);
        }
        __syncthreads();
        // accT += W (64 t x 64 s) . B_s (64 s x this warp's N/2 columns)
        warp_mma_smem<NH, false>(accT, Ws, LDW, wr * 16, Bs + ncol0, LDN, 64, lane);
      }
      dc0 = quad_sum(dc0);
      dc1 = quad_sum(dc1);
      if (tq == 0) {  // this column half's slice: one writer per slot
        if (ok0) dcs_w[cbase + r0] = dc0;
        if (ok1) dcs_w[cbase + r1] = dc1;
      }
    }
  }
  // this slice's dC, fp32, [nsplit][tokens][G*N]
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

void launch_chunk_scan_bwd_dx(const SsdDims& d, const bf16* xBC, const bf16* dy,
                              const float* D, const float* dt, const float* cs, const float* BC,
                              const bf16* states, const bf16* dstates, bf16* dxBC,
                              float* ddt_dir, float* dcs, float* dcs_last, float* pg_dD,
                              cudaStream_t st) {
  const int P = static_cast<int>(d.headdim), nc = static_cast<int>(d.nchunks());
  const int PT = P >= 64 ? 64 : 32;  // P / PT = dx_pslices(d)
  // grid.x = dx_blocks(d) (= (Q/64) * (P/PT)), 4 warps each: the partial-sum layouts rely on it
  dim3 grid(static_cast<unsigned>(dx_blocks(d)), static_cast<unsigned>(nc * d.nheads),
            static_cast<unsigned>(d.batch));
  auto go = [&](auto kern, size_t smem) {
    allow_smem(kern, smem);
    kern<<<grid, 128, smem, st>>>(xBC, d.conv_dim(), dy, D, dt, cs, BC, states, dstates, dxBC,
                               ddt_dir, dcs, dcs_last, pg_dD, static_cast<int>(d.seqlen),
                               static_cast<int>(d.nheads), static_cast<int>(d.ngroups), P,
                               static_cast<int>(d.dstate), nc, static_cast<int>(d.chunk),
                               q_slice(d), dcs_last_len(d));
  };
  if (PT == 64)
    go(chunk_scan_bwd_dx_kernel<8>, dx_smem_bytes<8>());
  else
    go(chunk_scan_bwd_dx_kernel<4>, dx_smem_bytes<4>());
  check_launch("ssd chunk_scan_bwd_dx");
}

void launch_chunk_scan_bwd_dC(const SsdDims& d, const bf16* xBC, const bf16* dy,
                              const float* dt, const float* cs, const float* CB,
                              const bf16* states, float* part, float* dcs, cudaStream_t st) {
  const int P = static_cast<int>(d.headdim), N = static_cast<int>(d.dstate);
  const int Q = static_cast<int>(d.chunk), nc = static_cast<int>(d.nchunks());
  const int nsplit = bc_bwd_splits(d), hpg = static_cast<int>(d.nheads / d.ngroups);
  const int hps = (hpg + nsplit - 1) / nsplit;
  const size_t smem = chunk_bc_bwd_smem(d);
  dim3 grid(static_cast<unsigned>((Q / 64) * nsplit), static_cast<unsigned>(nc * d.ngroups),
            static_cast<unsigned>(d.batch));
  auto go = [&](auto kern) {
    allow_smem(kern, smem);
    kern<<<grid, 256, smem, st>>>(xBC, d.conv_dim(), dy, dt, cs, CB, states, part, dcs,
                                  static_cast<int>(d.seqlen), static_cast<int>(d.nheads),
                                  static_cast<int>(d.ngroups), P, nc, Q, nsplit, hps,
                                  q_slice(d));
  };
  if (N == 64)
    go(chunk_scan_bwd_dC_kernel<8>);
  else
    go(chunk_scan_bwd_dC_kernel<16>);
  check_launch("ssd chunk_scan_bwd_dC");
}

}  // namespace ssd::cuda::detail
