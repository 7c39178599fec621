// SSD step 5: the output of each chunk,
//   y_t = exp(cs_t) C_t S_in^T                                   (carried state)
//       + sum_{s <= t in chunk} CB[t][s] exp(cs_t - cs_s) dt_s x_s  (intra-chunk, causal)
//       + D x_t.
// One block (4 warps x 16 rows) per (64-token tile, PT-column slice of headdim, chunk, head,
// batch); both products on bf16 tensor cores, the masked/decayed CB tile built in registers
// straight into A fragments. The tiles of each step are copied with cp.async into one of two
// shared buffers while the previous step is multiplied.

#include "ssd_common.cuh"

namespace ssd::cuda::detail {

// Shared memory: two stage buffers (cp.async double buffering), each either a carried-state
// stage (C tile [64][64 of N], S tile [PT][64 of N]) or an intra-chunk stage (X tile [64][PT],
// CB tile [64 t][64 s] fp32); then cs, dt [Q].
template <int NT>
constexpr int scan_fwd_stage_bytes() {
  constexpr int PT = NT * 8, LDX = PT + 8, LDS = 72, LDCB = 68;  // LDCB: 4 blocks / SM fit
  constexpr int state = (64 + PT) * LDS * 2;
  constexpr int intra = 64 * LDX * 2 + 64 * LDCB * 4;
  return state > intra ? state : intra;
}
template <int NT>
constexpr int scan_fwd_smem_bytes() {
  return 2 * scan_fwd_stage_bytes<NT>() + 2 * 256 * 4;
}

// The block's work is a list of stages: N/64 carried-state stages, then the intra-chunk
// stages sb = 0..tb; stage k + 1's tiles are copied (cp.async) while stage k is multiplied.
template <int NT>
__global__ __launch_bounds__(128) void chunk_scan_fwd_kernel(
    const bf16* __restrict__ xBC, int64_t ldx, const float* __restrict__ D,
    const float* __restrict__ dt, const float* __restrict__ cs, const float* __restrict__ CB,
    const bf16* __restrict__ states, bf16* __restrict__ y, int L, int H, int G, int P, int N,
    int nc, int Q) {
  constexpr int PT = NT * 8, LDX = PT + 8, LDS = 72, LDCB = 68;  // LDCB: 4 blocks / SM fit
  constexpr int kStage = scan_fwd_stage_bytes<NT>();
  extern __shared__ __align__(16) unsigned char smem[];
  float* cs_s = reinterpret_cast<float*>(smem + 2 * kStage);  // cs * log2(e)
  float* dt_s = cs_s + 256;
  const int npb = P / PT;
  const int pb = blockIdx.x % npb, tb = blockIdx.x / npb;
  const int c = blockIdx.y % nc, h = blockIdx.y / nc, b = blockIdx.z;
  const int g = h / (H / G);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tq = lane & 3;
  const int64_t d_inner = static_cast<int64_t>(H) * P;

  const int64_t cbase = ((static_cast<int64_t>(b) * H + h) * nc + c) * Q;
  for (int t = threadIdx.x; t < Q; t += blockDim.x) {
    cs_s[t] = cs[cbase + t] * kLog2e;
    dt_s[t] = dt[cbase + t];
  }
  const int64_t row0 = static_cast<int64_t>(b) * L + static_cast<int64_t>(c) * Q;
  const int t0 = tb * 64;
  const bf16* S = states + ((static_cast<int64_t>(b) * nc + c) * H + h) *
                               static_cast<int64_t>(P) * N + static_cast<int64_t>(pb) * PT * N;
  const bf16* Cg = xBC + (row0 + t0) * ldx + d_inner + static_cast<int64_t>(G + g) * N;
  const float* CBp = CB + ((static_cast<int64_t>(b) * nc + c) * G + g) * Q * Q;
  const bf16* Xg = xBC + row0 * ldx + static_cast<int64_t>(h) * P + pb * PT;
  const int nN = N / 64, nstage = nN + tb + 1;

  auto issue = [&](int k) {
    unsigned char* buf = smem + (k & 1) * kStage;
    if (k < nN) {  // carried state: C_t [64 x 64 of N], S_in [PT x 64 of N]
      bf16* Cs = reinterpret_cast<bf16*>(buf);
      bf16* Ss = Cs + 64 * LDS;
      load_tile_async(Cs, LDS, Cg + k * 64, ldx, 64, 64, L - (c * Q + t0), xBC);  // safe addr
      load_tile_async(Ss, LDS, S + k * 64, N, PT, 64, PT, S);
    } else {  // intra-chunk block sb: X_s [64 x PT], CB[t0.., s0..] [64 x 64] fp32
      const int s0 = (k - nN) * 64;
      bf16* Xs = reinterpret_cast<bf16*>(buf);
      float* CBs = reinterpret_cast<float*>(buf + 64 * LDX * 2);
      load_tile_async(Xs, LDX, Xg + s0 * ldx, ldx, 64, PT, L - (c * Q + s0), xBC);
      const float* src = CBp + static_cast<int64_t>(t0) * Q + s0;
      load_tile64_f32_async(CBs, LDCB, src, Q);
    }
    cp_async_commit();
  };

  float acc[NT][4];
  zero_acc(acc);
  const int r0 = t0 + warp * 16 + (lane >> 2), r1 = r0 + 8;  // chunk-local rows
  const int lr0 = r0 - t0, lr1 = r1 - t0;                     // rows within the CB tile
  issue(0);
  for (int k = 0; k < nstage; ++k) {
    __syncthreads();  // the other buffer's readers are done; cs_s / dt_s are visible
    if (k + 1 < nstage) {
      issue(k + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const unsigned char* buf = smem + (k & 1) * kStage;
    if (k < nN) {
      const bf16* Cs = reinterpret_cast<const bf16*>(buf);
      warp_mma_smem<NT, true>(acc, Cs, LDS, warp * 16, Cs + 64 * LDS, LDS, 64, lane);
      if (k == nN - 1) {  // the carried state's share decays by exp(cs_t)
        const float e0 = exp2_approx(cs_s[r0]), e1 = exp2_approx(cs_s[r1]);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          acc[j][0] *= e0;
          acc[j][1] *= e0;
          acc[j][2] *= e1;
          acc[j][3] *= e1;
        }
      }
      continue;
    }
    // intra-chunk: (CB o decay o dt, causal) (64 x 64) . X_s (64 x PT)
    const int s0 = (k - nN) * 64;
    const bf16* Xs = reinterpret_cast<const bf16*>(buf);
    const float* CBs = reinterpret_cast<const float*>(buf + 64 * LDX * 2);
    // Only the diagonal block (sb == tb) needs the causal mask s <= t.
    if (s0 < t0)
      decayed_tile_mma<NT, true, false>(acc, CBs, LDCB, lr0, lr1, r0, r1, s0, cs_s, dt_s, Xs,
                                        LDX, lane);
    else
      decayed_tile_mma<NT, true, true>(acc, CBs, LDCB, lr0, lr1, r0, r1, s0, cs_s, dt_s, Xs,
                                       LDX, lane);
  }

  // y = acc + D x
  const float Dh = D[h];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half ? r1 : r0;
    if (c * Q + r >= L) continue;
    const bf16* xr = xBC + (row0 + r) * ldx + static_cast<int64_t>(h) * P + pb * PT + tq * 2;
    bf16* yr = y + (row0 + r) * d_inner + static_cast<int64_t>(h) * P + pb * PT + tq * 2;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float2 xv = ld_bf16x2(xr + j * 8);
      st_bf16x2(yr + j * 8, acc[j][half * 2] + Dh * xv.x, acc[j][half * 2 + 1] + Dh * xv.y);
    }
  }
}

void launch_chunk_scan_fwd(const SsdDims& d, const bf16* xBC, const float* D, const float* dt,
                           const float* cs, const float* CB, const bf16* states, bf16* y,
                           cudaStream_t st) {
  const int P = static_cast<int>(d.headdim), nc = static_cast<int>(d.nchunks());
  const int PT = P >= 64 ? 64 : 32;
  dim3 grid(static_cast<unsigned>((d.chunk / 64) * (P / PT)),
            static_cast<unsigned>(nc * d.nheads), static_cast<unsigned>(d.batch));
  auto args = [&](auto kern, size_t smem) {
    allow_smem(kern, smem);
    kern<<<grid, 128, smem, st>>>(xBC, d.conv_dim(), D, dt, cs, CB, states, y,
                               static_cast<int>(d.seqlen), static_cast<int>(d.nheads),
                               static_cast<int>(d.ngroups), P, static_cast<int>(d.dstate), nc,
                               static_cast<int>(d.chunk));
  };
  if (PT == 64)
    args(chunk_scan_fwd_kernel<8>, scan_fwd_smem_bytes<8>());
  else
    args(chunk_scan_fwd_kernel<4>, scan_fwd_smem_bytes<4>());
  check_launch("ssd chunk_scan_fwd");
}

}  // namespace ssd::cuda::detail
