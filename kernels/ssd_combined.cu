// SSD forward and backward: the chunked state-space-dual algorithm as a sequence of steps,
// one kernel file each (ssd_chunk_cumsum, ssd_chunk_bmm, ssd_chunk_state, ssd_state_passing,
// ssd_chunk_scan; backward: ssd_state_passing_bwd, ssd_chunk_scan_bwd, ssd_chunk_state_bwd,
// ssd_dt_bwd). The backward recomputes the forward's states from the inputs.
// Packed documents (reset flags) touch one step only, chunk_cumsum: see its file comment.
// Variant 2 (the default; ssd_set_variant / SSD_KERNEL_VARIANT) replaces the backward's dB
// kernel, dC kernel and bc_reduce by ssd_chunk_bwd_dbdc_v2.cu's merged kernel and its
// reduction; every other step, and the forward, are the same kernels in both variants.
// Context parallelism's all-gather combine (ssd_final_state, ssd_dinitial, ssd_segment_decay,
// cp_state_scan, at the end) chains the same steps, plus ssd_cp_combine.cu's two small kernels.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"
#include "ssd.h"
#include "ssd_common.cuh"

namespace ssd::cuda {

namespace {
SsdProfiler* g_profiler = nullptr;

void mark(const char* step, cudaStream_t st) {
  if (g_profiler) g_profiler->mark(step, st);
}

void check_dims(const SsdDims& d) {
  if (d.batch <= 0 || d.seqlen <= 0 || d.nheads <= 0 || d.ngroups <= 0)
    fail("ssd (cuda): empty dimensions");
  if (d.nheads % d.ngroups != 0) fail("ssd (cuda): nheads ", d.nheads, " % ngroups ", d.ngroups);
  std::string why = ssd_unsupported_reason(d);
  if (!why.empty()) fail("ssd (cuda): ", why);
}
}  // namespace

void ssd_set_profiler(SsdProfiler* p) { g_profiler = p; }

namespace {
std::atomic<int> g_variant{0};  // 0: not chosen yet (SSD_KERNEL_VARIANT decides on first use)
}  // namespace

void ssd_set_variant(int v) {
  if (v != 1 && v != 2) fail("ssd (cuda): kernel variant must be 1 or 2 (is ", v, ")");
  g_variant.store(v);
}

int ssd_variant() {
  int v = g_variant.load();
  if (v == 0) {
    const char* e = std::getenv("SSD_KERNEL_VARIANT");
    int want = 2;  // measured faster on the H200 (docs/performance.md), same tests pass
    if (e && *e) {
      if (std::strcmp(e, "1") == 0) want = 1;
      else if (std::strcmp(e, "2") == 0) want = 2;
      else fail("ssd (cuda): SSD_KERNEL_VARIANT must be 1 or 2 (is '", e, "')");
    }
    int expected = 0;
    g_variant.compare_exchange_strong(expected, want);  // a concurrent set_variant wins
    v = g_variant.load();
  }
  return v;
}

std::string ssd_unsupported_reason(const SsdDims& d) {
  std::string why;
  auto add = [&](const std::string& s) { why += (why.empty() ? "" : "; ") + s; };
  if (d.chunk != 64 && d.chunk != 128 && d.chunk != 256)
    add("model.chunk_size must be 64, 128 or 256 (is " + std::to_string(d.chunk) + ")");
  if (d.headdim % 32 != 0 || d.headdim > 256 || (d.headdim > 32 && d.headdim % 64 != 0))
    add("model.headdim must be 32 or a multiple of 64 up to 256 (is " + std::to_string(d.headdim) + ")");
  if (d.dstate != 64 && d.dstate != 128)
    add("model.d_state must be 64 or 128 (is " + std::to_string(d.dstate) + ")");
  if (d.nchunks() * d.nheads > 65535 || d.nchunks() * d.ngroups > 65535)
    add("train.seq_len / model.chunk_size times the number of heads must be at most 65535");
  return why;
}

namespace detail {
void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) fail(what, ": ", cudaGetErrorString(e));
}
}  // namespace detail

size_t ssd_workspace_bytes(const SsdDims& d) {
  detail::SsdWorkspace w;
  return detail::carve_workspace(d, nullptr, true, &w, ssd_variant() == 2);
}

size_t ssd_saved_bytes(const SsdDims& d) {
  detail::SsdWorkspace w;  // the forward's pieces alone
  return detail::carve_workspace(d, nullptr, false, &w);
}

void ssd_fwd(const SsdDims& d, const bf16* xBC, const bf16* dt, int64_t ld_dt,
             const float* dt_bias, const float* A_log, const float* D,
             const float* initial_state, bf16* y, float* final_state, void* workspace,
             void* saved, cudaStream_t stream, const int32_t* reset) {
  using namespace detail;
  check_dims(d);
  SsdWorkspace w;
  carve_workspace(d, workspace, false, &w, false, saved);
  const int nc = static_cast<int>(d.nchunks());
  const int64_t d_inner = d.d_inner(), GN = d.ngroups * d.dstate;
  mark("start", stream);
  launch_chunk_cumsum(d, dt, ld_dt, dt_bias, A_log, reset, w.dt, w.cs, stream);
  mark("chunk_cumsum", stream);
  launch_chunk_bmm(d, xBC, d_inner + GN, d_inner, true, w.CB, stream);
  mark("chunk_bmm(CB)", stream);
  launch_chunk_state(d, xBC, d.conv_dim(), xBC, d_inner, w.dt, w.cs, 0, w.states, nc + 1, 1,
                     stream);
  mark("chunk_state", stream);
  // Kept for the backward: the fp32 entering states too (the backward's state gradients use them).
  launch_state_passing(d, w.states, w.states_bf, saved != nullptr, w.cs, initial_state,
                       final_state, stream);
  mark("state_passing", stream);
  launch_chunk_scan_fwd(d, xBC, D, w.dt, w.cs, w.CB, w.states_bf, y, stream);
  mark("chunk_scan", stream);
}

void ssd_bwd(const SsdDims& d, const bf16* xBC, const bf16* dt, int64_t ld_dt,
             const float* dt_bias, const float* A_log, const float* D,
             const float* initial_state, const bf16* dy, const float* dfinal_state, bf16* dxBC,
             bf16* ddt, int64_t ld_ddt, float* d_dt_bias, float* dA_log, float* dD,
             float* d_initial_state, void* workspace, const void* saved, cudaStream_t stream,
             const int32_t* reset) {
  using namespace detail;
  check_dims(d);
  const bool v2 = ssd_variant() == 2;
  SsdWorkspace w;
  // The saved pieces are only read here.
  carve_workspace(d, workspace, true, &w, v2, const_cast<void*>(saved));
  const int nc = static_cast<int>(d.nchunks());
  const int64_t d_inner = d.d_inner(), GN = d.ngroups * d.dstate;
  mark("start", stream);
  // ddt_dir, dcs, dcs_last: slots no kernel writes (rows past seqlen) must read as 0
  cudaMemsetAsync(w.ddt_dir, 0, w.zero_bytes, stream);
  if (!saved) {  // recompute the forward's intermediates
    launch_chunk_cumsum(d, dt, ld_dt, dt_bias, A_log, reset, w.dt, w.cs, stream);
    mark("chunk_cumsum", stream);
    launch_chunk_bmm(d, xBC, d_inner + GN, d_inner, true, w.CB, stream);
  }
  launch_chunk_bmm(d, xBC, d_inner, d_inner + GN, false, w.BC, stream);
  mark(saved ? "chunk_bmm(BC)" : "chunk_bmm(CB,BC)", stream);
  if (!saved) {
    launch_chunk_state(d, xBC, d.conv_dim(), xBC, d_inner, w.dt, w.cs, 0, w.states, nc + 1, 1,
                       stream);
    mark("chunk_state", stream);
    launch_state_passing(d, w.states, w.states_bf, true, w.cs, initial_state, nullptr, stream);
    mark("state_passing", stream);
  }
  // state gradients
  launch_chunk_state(d, dy, d_inner, xBC, d_inner + GN, w.dt, w.cs, 1, w.dstates, nc, 0,
                     stream);
  mark("chunk_state(dS_local)", stream);
  launch_state_passing_bwd(d, w.states, w.dstates, w.dstates_bf, w.cs, dfinal_state,
                           d_initial_state, w.dcs_last, stream);
  mark("state_passing_bwd", stream);
  launch_chunk_scan_bwd_dx(d, xBC, dy, D, w.dt, w.cs, w.BC, w.states_bf, w.dstates_bf, dxBC,
                           w.ddt_dir, w.dcs, w.dcs_last, w.pg_dD, stream);
  mark("chunk_scan_bwd_dx", stream);
  if (v2 && chunk_bwd_dbdc_v2_supported(d)) {
    launch_chunk_bwd_dbdc_v2(d, xBC, dy, w.dt, w.cs, w.CB, w.states_bf, w.dstates_bf,
                             w.dBp_v2, w.dCp_v2, w.dcs_v2, stream);
    mark("chunk_bwd_dbdc_v2", stream);
    launch_bc_reduce_v2(d, w.dBp_v2, w.dCp_v2, w.dcs_v2, dxBC, w.dcs, stream);
    mark("bc_reduce_v2", stream);
  } else {
    launch_chunk_state_bwd_dB(d, xBC, dy, w.dt, w.cs, w.BC, w.dstates_bf, w.dBp, w.dcs,
                              stream);
    mark("chunk_state_bwd_dB", stream);
    launch_chunk_scan_bwd_dC(d, xBC, dy, w.dt, w.cs, w.CB, w.states_bf, w.dCp, w.dcs, stream);
    mark("chunk_scan_bwd_dC", stream);
    launch_bc_reduce(d, w.dBp, w.dCp, dxBC, stream);
    mark("bc_reduce", stream);
  }
  launch_dt_bwd(d, dt, ld_dt, dt_bias, A_log, w.dt, w.dcs, w.dcs_last, w.ddt_dir, ddt, ld_ddt,
                w.pg_dtb, w.pg_dA, stream);
  mark("dt_bwd", stream);
  launch_param_grad_reduce(d, w.pg_dD, w.pg_dtb, w.pg_dA, dD, d_dt_bias, dA_log, stream);
  mark("param_grad_reduce", stream);
}

void ssd_final_state(const SsdDims& d, const bf16* xBC, const bf16* dt, int64_t ld_dt,
                     const float* dt_bias, const float* A_log, const float* initial_state,
                     float* final_state, void* workspace, cudaStream_t stream,
                     const int32_t* reset) {
  using namespace detail;
  check_dims(d);
  SsdWorkspace w;
  carve_workspace(d, workspace, false, &w);  // never the caller's saved: its backward reads it
  const int nc = static_cast<int>(d.nchunks());
  mark("start", stream);
  launch_chunk_cumsum(d, dt, ld_dt, dt_bias, A_log, reset, w.dt, w.cs, stream);
  mark("chunk_cumsum", stream);
  launch_chunk_state(d, xBC, d.conv_dim(), xBC, d.d_inner(), w.dt, w.cs, 0, w.states, nc + 1, 1,
                     stream);
  mark("chunk_state", stream);
  launch_state_passing(d, w.states, nullptr, false, w.cs, initial_state, final_state, stream);
  mark("state_passing", stream);
}

void ssd_dinitial(const SsdDims& d, const bf16* xBC, const bf16* dt, int64_t ld_dt,
                  const float* dt_bias, const float* A_log, const bf16* dy,
                  const float* dfinal_state, float* d_initial_state, void* workspace,
                  const void* saved, cudaStream_t stream, const int32_t* reset) {
  using namespace detail;
  check_dims(d);
  SsdWorkspace w;
  carve_workspace(d, workspace, true, &w, false, const_cast<void*>(saved));  // saved: read only
  const int nc = static_cast<int>(d.nchunks());
  const int64_t d_inner = d.d_inner(), GN = d.ngroups * d.dstate;
  mark("start", stream);
  if (!saved) {
    launch_chunk_cumsum(d, dt, ld_dt, dt_bias, A_log, reset, w.dt, w.cs, stream);
    mark("chunk_cumsum", stream);
  }
  launch_chunk_state(d, dy, d_inner, xBC, d_inner + GN, w.dt, w.cs, 1, w.dstates, nc, 0,
                     stream);
  mark("chunk_state(dS_local)", stream);
  launch_state_passing_bwd(d, nullptr, w.dstates, nullptr, w.cs, dfinal_state, d_initial_state,
                           nullptr, stream);
  mark("state_passing_bwd", stream);
}

void ssd_segment_decay(const SsdDims& d, const bf16* dt, int64_t ld_dt, const float* dt_bias,
                       const float* A_log, float* decay, void* workspace, cudaStream_t stream,
                       const int32_t* reset) {
  using namespace detail;
  check_dims(d);
  SsdWorkspace w;
  carve_workspace(d, workspace, false, &w);
  mark("start", stream);
  launch_chunk_cumsum(d, dt, ld_dt, dt_bias, A_log, reset, w.dt, w.cs, stream);
  mark("chunk_cumsum", stream);
  launch_segment_decay(d, w.cs, decay, stream);
  mark("segment_decay", stream);
}

void cp_state_scan(const SsdDims& d, const float* summaries, int n, int k, bool reverse,
                   float* out, cudaStream_t stream) {
  if (k < 0 || k >= n) fail("ssd (cuda): cp_state_scan of segment ", k, " of ", n);
  detail::launch_cp_state_scan(d, summaries, n, k, reverse, out, stream);
}

}  // namespace ssd::cuda
