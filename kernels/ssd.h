// Host API of the CUDA SSD kernels (kernels/ssd_*.cu). Same math and conventions as
// ssd::cpu::ssd_fwd / ssd_bwd in src/backend/cpu/cpu_ops.h, in mixed precision:
// xBC, dt (raw, strided), y, dy, dxBC, ddt are bf16; dt_bias, A_log, D, states and their
// gradients are fp32; all accumulation is fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "backend/backend.h"

namespace ssd::cuda {

using bf16 = __nv_bfloat16;

// Kernel variant of ssd_fwd / ssd_bwd: 2 (default) = the faster backward (merged dB/dC kernel
// over tile pairs with cp.async double buffering, kernels/ssd_chunk_bwd_dbdc_v2.cu); 1 = the
// original kernels, kept as the baseline it is measured against. Both deterministic. The
// environment variable SSD_KERNEL_VARIANT ("1" or "2", read once on first use) overrides.
// ssd_workspace_bytes depends on the variant: set it before sizing the workspace.
void ssd_set_variant(int v);  // v must be 1 or 2
int ssd_variant();

// Optional hook: when set, ssd_fwd / ssd_bwd call mark(step) after launching each step, so a
// profiler can record a cudaEvent there. Not thread-safe; for benchmarks and
// the backend's per-op profile.
struct SsdProfiler {
  virtual ~SsdProfiler() = default;
  virtual void mark(const char* step, cudaStream_t stream) = 0;
};
void ssd_set_profiler(SsdProfiler* p);  // nullptr disables

// "" when these sizes are supported by the kernels; otherwise why not, naming config keys.
std::string ssd_unsupported_reason(const SsdDims& d);

// Scratch bytes ssd_fwd / ssd_bwd need for these sizes (the caller allocates once and reuses).
size_t ssd_workspace_bytes(const SsdDims& d);

// Bytes of the forward's intermediates (dt, decays, C.B^T, the states entering each chunk)
// that ssd_fwd can leave in a caller's buffer for ssd_bwd, which then skips recomputing them.
size_t ssd_saved_bytes(const SsdDims& d);

// saved: null, or ssd_saved_bytes of device memory that ssd_fwd fills for ssd_bwd.
// reset: null, or device int32 [tokens], nonzero where a token begins a document (packed
// sequences; SsdInputs::reset): no state crosses into it. Give ssd_bwd the same flags.
void ssd_fwd(const SsdDims& d, const bf16* xBC, const bf16* dt, int64_t ld_dt,
             const float* dt_bias, const float* A_log, const float* D,
             const float* initial_state, bf16* y, float* final_state, void* workspace,
             void* saved, cudaStream_t stream, const int32_t* reset = nullptr);

// dxBC, ddt (columns [0, nheads) of each row) and d_initial_state are overwritten;
// d_dt_bias, dA_log, dD accumulate. initial_state, dfinal_state, d_initial_state may be null.
// saved: null (the forward's intermediates are recomputed), or what ssd_fwd wrote there for
// the same inputs.
void ssd_bwd(const SsdDims& d, const bf16* xBC, const bf16* dt, int64_t ld_dt,
             const float* dt_bias, const float* A_log, const float* D,
             const float* initial_state, const bf16* dy, const float* dfinal_state, bf16* dxBC,
             bf16* ddt, int64_t ld_ddt, float* d_dt_bias, float* dA_log, float* dD,
             float* d_initial_state, void* workspace, const void* saved, cudaStream_t stream,
             const int32_t* reset = nullptr);

// Context parallelism's all-gather combine (Backend::ssd_final_state and the ops after it in
// backend.h), from the same steps: ssd_fwd's final state without y (chunk_cumsum, chunk_state,
// state_passing); ssd_bwd's d_initial_state without the other gradients (chunk_cumsum unless
// saved has it, chunk_state of dy, state_passing_bwd); the segment decay [batch, nheads]
// (chunk_cumsum, then the product of the chunks' decays); the scan over n summary rows. The
// workspace is ssd_workspace_bytes(d) (any part of it); saved is only read.
void ssd_final_state(const SsdDims& d, const bf16* xBC, const bf16* dt, int64_t ld_dt,
                     const float* dt_bias, const float* A_log, const float* initial_state,
                     float* final_state, void* workspace, cudaStream_t stream,
                     const int32_t* reset = nullptr);
void ssd_dinitial(const SsdDims& d, const bf16* xBC, const bf16* dt, int64_t ld_dt,
                  const float* dt_bias, const float* A_log, const bf16* dy,
                  const float* dfinal_state, float* d_initial_state, void* workspace,
                  const void* saved, cudaStream_t stream, const int32_t* reset = nullptr);
void ssd_segment_decay(const SsdDims& d, const bf16* dt, int64_t ld_dt, const float* dt_bias,
                       const float* A_log, float* decay, void* workspace, cudaStream_t stream,
                       const int32_t* reset = nullptr);
void cp_state_scan(const SsdDims& d, const float* summaries, int n, int k, bool reverse,
                   float* out, cudaStream_t stream);

}  // namespace ssd::cuda
