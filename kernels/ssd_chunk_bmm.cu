// SSD step 2: per chunk and group, out[t][s] = X_t . Y_s over dstate (CB = C B^T for the
// forward scan and dC; BC = B C^T for dx and dB). Only the 64x64 tiles on one side of the
// diagonal (inclusive) are computed; consumers mask inside the diagonal tiles.
#include "ssd_common.cuh"

namespace ssd::cuda::detail {

__global__ __launch_bounds__(128) void chunk_bmm_kernel(const bf16* __restrict__ xBC, int64_t ld,
                                                        int L, int nc, int Q, int G, int N,
                                                        int64_t xoff, int64_t yoff, bool lower,
                                                        float* __restrict__ out) {
  constexpr int LDS = 72;
  __shared__ __align__(16) bf16 Xs[64 * LDS];
  __shared__ __align__(16) bf16 Ys[64 * LDS];
  const int nt = Q / 64;
  const int ti = blockIdx.x / nt, tj = blockIdx.x % nt;
  if (lower ? (tj > ti) : (tj < ti)) return;
  const int c = blockIdx.y / G, g = blockIdx.y % G, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row0 = static_cast<int64_t>(b) * L + static_cast<int64_t>(c) * Q;
  const int vi = L - (c * Q + ti * 64), vj = L - (c * Q + tj * 64);
  const bf16* X = xBC + (row0 + ti * 64) * ld + xoff + static_cast<int64_t>(g) * N;
  const bf16* Y = xBC + (row0 + tj * 64) * ld + yoff + static_cast<int64_t>(g) * N;
  float acc[8][4];
  zero_acc(acc);
  for (int n0 = 0; n0 < N; n0 += 64) {
    __syncthreads();
    load_tile(Xs, LDS, X + n0, ld, 64, 64, vi);
    load_tile(Ys, LDS, Y + n0, ld, 64, 64, vj);
    __syncthreads();
    warp_mma_smem<8, true>(acc, Xs, LDS, warp * 16, Ys, LDS, 64, lane);
  }
  float* o = out + ((static_cast<int64_t>(b) * nc + c) * G + g) * Q * Q;
  const int r0 = ti * 64 + warp * 16 + (lane >> 2);
  const int cb = tj * 64 + (lane & 3) * 2;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    *reinterpret_cast<float2*>(o + static_cast<int64_t>(r0) * Q + cb + j * 8) =
        make_float2(acc[j][0], acc[j][1]);
    *reinterpret_cast<float2*>(o + static_cast<int64_t>(r0 + 8) * Q + cb + j * 8) =
        make_float2(acc[j][2], acc[j][3]);
  }
}

void launch_chunk_bmm(const SsdDims& d, const bf16* xBC, int64_t xoff, int64_t yoff, bool lower,
                      float* out, cudaStream_t st) {
  const int nc = static_cast<int>(d.nchunks()), nt = static_cast<int>(d.chunk / 64);
  dim3 grid(nt * nt, static_cast<unsigned>(nc * d.ngroups), static_cast<unsigned>(d.batch));
  chunk_bmm_kernel<<<grid, 128, 0, st>>>(xBC, d.conv_dim(), static_cast<int>(d.seqlen), nc,
                                         static_cast<int>(d.chunk), static_cast<int>(d.ngroups),
                                         static_cast<int>(d.dstate), xoff, yoff, lower, out);
  check_launch("ssd chunk_bmm");
}

}  // namespace ssd::cuda::detail
