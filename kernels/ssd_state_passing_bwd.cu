// SSD backward of step 4, sequential over chunks from the last. With g = dL/d(state leaving
// chunk c) (dfinal_state, or 0, for the last chunk):
//   dcs[c, last] += exp(cs_last) <g, S_in[c]>   (written per warp into dcs_last [.., off + w],
//                   summed in a fixed order by dt_bwd; the carried state's decay; the chunk's own
//                   state's share, sum_s v_s, comes from the dx kernel with the matching -v_s,
//                   so that the two cancel to rounding exactly as they do in exact arithmetic)
//   dstates_bf[c] = g (bf16);  g <- exp(cs_last[c]) * g + dS_local[c]   (dS_local: dstates)
// and finally d_initial_state = g. ssd_dinitial wants that alone: states, dstates_bf and
// dcs_last null skip the rest.
#include "ssd_common.cuh"

namespace ssd::cuda::detail {

__global__ __launch_bounds__(256) void state_passing_bwd_kernel(
    const float* __restrict__ states, const float* __restrict__ dstates,
    bf16* __restrict__ dstates_bf, const float* __restrict__ cs,
    const float* __restrict__ dfinal, float* __restrict__ dinit, float* __restrict__ dcs_last,
    int H, int PN, int nc, int Q, int last_len, int last_off) {
  const int h = blockIdx.y, b = blockIdx.z;
  // this warp's slot in each chunk's row of dcs_last
  const int slot = last_off + blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int e = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
  const bool active = e < PN;
  const int64_t bh = static_cast<int64_t>(b) * H + h;
  const int64_t slot_stride = static_cast<int64_t>(H) * PN;
  const float* sbase = states + (static_cast<int64_t>(b) * (nc + 1) * H + h) * PN + e;
  const float* dbase = dstates + (static_cast<int64_t>(b) * nc * H + h) * PN + e;
  bf16* obase = dstates_bf + (static_cast<int64_t>(b) * nc * H + h) * PN + e;
  float4 g = make_float4(0.f, 0.f, 0.f, 0.f);
  if (active && dfinal) g = *reinterpret_cast<const float4*>(dfinal + bh * PN + e);
  for (int c = nc - 1; c >= 0; --c) {
    float dot = 0.f;
    float4 dl = make_float4(0.f, 0.f, 0.f, 0.f);
    const float dec = expf(cs[(bh * nc + c) * Q + Q - 1]);
    if (active) {
      dl = *reinterpret_cast<const float4*>(dbase + c * slot_stride);
      if (states) {
        const float4 so = *reinterpret_cast<const float4*>(sbase + c * slot_stride);
        dot = g.x * so.x + g.y * so.y + g.z * so.z + g.w * so.w;
      }
      if (dstates_bf) {
        uint2 u;
        u.x = pack_bf16(g.x, g.y);
        u.y = pack_bf16(g.z, g.w);
        *reinterpret_cast<uint2*>(obase + c * slot_stride) = u;
      }
    }
    if (dcs_last) {  // the same for every thread of the block
      dot = warp_sum(dot) * dec;
      if ((threadIdx.x & 31) == 0) dcs_last[(bh * nc + c) * last_len + slot] = dot;
    }
    g.x = dec * g.x + dl.x;
    g.y = dec * g.y + dl.y;
    g.z = dec * g.z + dl.z;
    g.w = dec * g.w + dl.w;
  }
  if (active && dinit) *reinterpret_cast<float4*>(dinit + bh * PN + e) = g;
}

void launch_state_passing_bwd(const SsdDims& d, const float* states, const float* dstates,
                              bf16* dstates_bf, const float* cs, const float* dfinal,
                              float* dinit, float* dcs_last, cudaStream_t st) {
  const int PN = static_cast<int>(d.headdim * d.dstate);
  // 256 threads = 8 warps per block: the slots [dx_warps, dx_warps + sp_bwd_warps) of dcs_last
  dim3 grid(static_cast<unsigned>(sp_bwd_blocks(d)), static_cast<unsigned>(d.nheads),
            static_cast<unsigned>(d.batch));
  state_passing_bwd_kernel<<<grid, 256, 0, st>>>(
      states, dstates, dstates_bf, cs, dfinal, dinit, dcs_last, static_cast<int>(d.nheads), PN,
      static_cast<int>(d.nchunks()), static_cast<int>(d.chunk), dcs_last_len(d), dx_warps(d));
  check_launch("ssd state_passing_bwd");
}

}  // namespace ssd::cuda::detail
