// SSD step 4: the sequential pass over chunks, elementwise over the (headdim x dstate) state:
//   S_in[0] = initial (or 0);  S_in[c+1] = exp(cs_last[c]) * S_in[c] + S_chunk[c].
// states ([batch, nc+1, nheads, P, N] fp32): slot c+1 holds S_chunk[c] on entry; with
// write_f32 it is overwritten with S_in[c+1] (slot 0 = S_in[0], slot nc = final state), which
// the backward pass needs. S_in[0..nc-1] go to states_bf (bf16), which the chunk scan and the
// backward matmuls read; null states_bf: only the final state is wanted (ssd_final_state).
#include "ssd_common.cuh"

namespace ssd::cuda::detail {

__device__ __forceinline__ void store_bf16x4(bf16* p, float4 v) {
  uint2 u;
  u.x = pack_bf16(v.x, v.y);
  u.y = pack_bf16(v.z, v.w);
  *reinterpret_cast<uint2*>(p) = u;
}

__global__ __launch_bounds__(256) void state_passing_kernel(
    float* __restrict__ states, bf16* __restrict__ states_bf, bool write_f32,
    const float* __restrict__ cs, const float* __restrict__ init,
    float* __restrict__ final_state, int H, int PN, int nc, int Q) {
  const int h = blockIdx.y, b = blockIdx.z;
  const int e = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
  if (e >= PN) return;
  const int64_t bh = static_cast<int64_t>(b) * H + h;
  const int64_t slot_stride = static_cast<int64_t>(H) * PN;
  float* base = states + (static_cast<int64_t>(b) * (nc + 1) * H + h) * PN + e;
  bf16* bbase = states_bf + (static_cast<int64_t>(b) * nc * H + h) * PN + e;
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
  if (init) s = *reinterpret_cast<const float4*>(init + bh * PN + e);
  if (write_f32) *reinterpret_cast<float4*>(base) = s;
  float4 nxt = *reinterpret_cast<const float4*>(base + slot_stride);
  for (int c = 0; c < nc; ++c) {
    const float4 v = nxt;
    if (c + 1 < nc) nxt = *reinterpret_cast<const float4*>(base + (c + 2) * slot_stride);
    if (states_bf) store_bf16x4(bbase + c * slot_stride, s);
    const float dec = expf(cs[(bh * nc + c) * Q + Q - 1]);
    s.x = dec * s.x + v.x;
    s.y = dec * s.y + v.y;
    s.z = dec * s.z + v.z;
    s.w = dec * s.w + v.w;
    if (write_f32) *reinterpret_cast<float4*>(base + (c + 1) * slot_stride) = s;
  }
  if (final_state) *reinterpret_cast<float4*>(final_state + bh * PN + e) = s;
}

void launch_state_passing(const SsdDims& d, float* states, bf16* states_bf, bool write_f32,
                          const float* cs, const float* initial_state, float* final_state,
                          cudaStream_t st) {
  const int PN = static_cast<int>(d.headdim * d.dstate);
  dim3 grid((PN / 4 + 255) / 256, static_cast<unsigned>(d.nheads),
            static_cast<unsigned>(d.batch));
  state_passing_kernel<<<grid, 256, 0, st>>>(states, states_bf, write_f32, cs, initial_state,
                                             final_state, static_cast<int>(d.nheads), PN,
                                             static_cast<int>(d.nchunks()),
                                             static_cast<int>(d.chunk));
  check_launch("ssd state_passing");
}

}  // namespace ssd::cuda::detail
