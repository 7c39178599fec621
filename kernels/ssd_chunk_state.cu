// SSD step 3: the state each chunk produces on its own,
//   S_c[p][n] = sum_{s in chunk} exp(cs_last - cs_s) dt_s x_s[p] B_s[n]      (mode 0),
// and, reused by the backward pass, the local state gradient
//   dS_c[p][n] = sum_{t in chunk} exp(cs_t) dy_t[p] C_t[n]                  (mode 1).
// One block per (64 or 32 p-rows, 64 n-cols) tile of one (chunk, head, batch); K = chunk,
// 64 tokens at a time, on bf16 tensor cores (U^T read with ldmatrix.trans and scaled by w in
// registers); the next 64 tokens' tiles are copied with cp.async while the current ones are
// multiplied.
#include "ssd_common.cuh"

namespace ssd::cuda::detail {

template <int ROWS>
__global__ __launch_bounds__(ROWS * 2) void chunk_state_kernel(
    const bf16* __restrict__ U, int64_t ldu, const bf16* __restrict__ V, int64_t ldv,
    int64_t voff, const float* __restrict__ dt, const float* __restrict__ cs, int L, int H,
    int G, int P, int N, int nc, int Q, int mode, float* __restrict__ out, int out_slots,
    int slot_off) {
  constexpr int LDV = 72, LDU = ROWS + 8;
  __shared__ __align__(16) bf16 Us[2][64 * LDU];  // two buffers: tile s0 + 64 lands while
  __shared__ __align__(16) bf16 Vs[2][64 * LDV];  // tile s0 is multiplied
  __shared__ float ws[256];
  const int npb = P / ROWS;  // p rows of this block: 64 (4 warps) or 32 (2 warps)
  const int pb = blockIdx.x % npb, nb = blockIdx.x / npb;
  const int c = blockIdx.y % nc, h = blockIdx.y / nc, b = blockIdx.z;
  const int g = h / (H / G);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  const int64_t cbase = ((static_cast<int64_t>(b) * H + h) * nc + c) * Q;
  const float cl = cs[cbase + Q - 1];
  for (int t = threadIdx.x; t < Q; t += blockDim.x)
    ws[t] = mode == 0 ? __expf(cl - cs[cbase + t]) * dt[cbase + t] : __expf(cs[cbase + t]);

  const int64_t row0 = static_cast<int64_t>(b) * L + static_cast<int64_t>(c) * Q;
  const bf16* Ub = U + row0 * ldu + static_cast<int64_t>(h) * P + pb * ROWS;
  const bf16* Vb = V + row0 * ldv + voff + static_cast<int64_t>(g) * N + nb * 64;
  auto issue = [&](int s0, int buf) {  // rows past seqlen are zero-filled
    const int valid = L - (c * Q + s0);
    load_tile_async(Us[buf], LDU, Ub + s0 * ldu, ldu, 64, ROWS, valid, Ub);
    load_tile_async(Vs[buf], LDV, Vb + s0 * ldv, ldv, 64, 64, valid, Vb);
    cp_async_commit();
  };
  float acc[8][4];
  zero_acc(acc);
  issue(0, 0);
  for (int s0 = 0, buf = 0; s0 < Q; s0 += 64, buf ^= 1) {
    __syncthreads();  // the other buffer's readers (last iteration) are done; ws is visible
    if (s0 + 64 < Q) {
      issue(s0 + 64, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 64; k += 16) {
      uint32_t a[4];
      lda_km(a, Us[buf], LDU, warp * 16, k, lane);
      scale_a_cols(a, ws + s0 + k, lane);  // w_s on the k (token) index
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        uint32_t bb[4];
        ldb_kn(bb, Vs[buf], LDV, j * 8, k, lane);
        mma_bf16(acc[j], a, bb[0], bb[1]);
        mma_bf16(acc[j + 1], a, bb[2], bb[3]);
      }
    }
  }
  float* o = out + ((static_cast<int64_t>(b) * out_slots + c + slot_off) * H + h) *
                       static_cast<int64_t>(P) * N;
  const int p0 = pb * ROWS + warp * 16 + (lane >> 2);
  const int n0 = nb * 64 + (lane & 3) * 2;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    *reinterpret_cast<float2*>(o + static_cast<int64_t>(p0) * N + n0 + j * 8) =
        make_float2(acc[j][0], acc[j][1]);
    *reinterpret_cast<float2*>(o + static_cast<int64_t>(p0 + 8) * N + n0 + j * 8) =
        make_float2(acc[j][2], acc[j][3]);
  }
}

void launch_chunk_state(const SsdDims& d, const bf16* U, int64_t ldu, const bf16* xBC,
                        int64_t voff, const float* dt, const float* cs, int mode, float* out,
                        int out_slots, int slot_off, cudaStream_t st) {
  const int P = static_cast<int>(d.headdim), N = static_cast<int>(d.dstate);
  const int nc = static_cast<int>(d.nchunks());
  const int rows = P >= 64 ? 64 : 32;
  dim3 grid((P / rows) * (N / 64), static_cast<unsigned>(nc * d.nheads),
            static_cast<unsigned>(d.batch));
  auto go = [&](auto kernel) {
    kernel<<<grid, rows * 2, 0, st>>>(U, ldu, xBC, d.conv_dim(), voff, dt, cs,
                                      static_cast<int>(d.seqlen), static_cast<int>(d.nheads),
                                      static_cast<int>(d.ngroups), P, N, nc,
                                      static_cast<int>(d.chunk), mode, out, out_slots, slot_off);
  };
  if (rows == 64)
    go(chunk_state_kernel<64>);
  else
    go(chunk_state_kernel<32>);
  check_launch("ssd chunk_state");
}

}  // namespace ssd::cuda::detail
