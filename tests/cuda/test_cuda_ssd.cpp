// The CUDA SSD kernels (kernels/ssd_*.cu) against the CPU reference ssd::cpu::ssd_fwd/ssd_bwd
// in fp32, on the same bf16-rounded inputs. One relative error per output tensor
// (max |gpu - ref| / max |ref|) must stay <= 1e-2; NaN never passes. Every shape runs under
// both kernel variants (ssd_set_variant 1 and 2). CudaSsdResets: the same with reset flags
// (packed documents) against the CPU reference with the same flags.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <ostream>
#include <string>
#include <vector>

#include "backend/cpu/cpu_ops.h"
#include "testutil.h"

#ifdef SSD_HAVE_CUDA
#include <cuda_runtime.h>

#include "cuda/cuda_testutil.h"
#include "ssd.h"
#endif

namespace {

using namespace ssdtest;

#ifdef SSD_HAVE_CUDA

using ssd::SsdDims;

constexpr double kTol = 1e-2;

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

struct Case {
  int64_t batch, seqlen, nheads, headdim, ngroups, dstate, chunk;
  bool init, dfinal;
  int64_t ld_extra;  // ld_dt = nheads + ld_extra (dt_raw at column 0 of each row)
};

std::string case_name(const Case& c) {
  char s[160];
  std::snprintf(s, sizeof s, "b%lld_L%lld_h%lld_p%lld_g%lld_n%lld_q%lld%s%s_ld%lld",
                (long long)c.batch, (long long)c.seqlen, (long long)c.nheads,
                (long long)c.headdim, (long long)c.ngroups, (long long)c.dstate,
                (long long)c.chunk, c.init ? "_init" : "", c.dfinal ? "_dfinal" : "",
                (long long)c.ld_extra);
  return s;
}
// gtest prints the parameter in test listings; without this it dumps the struct's bytes.
void PrintTo(const Case& c, std::ostream* os) { *os << case_name(c); }

// Columns [off, off+width) of a [rows, ld] matrix.
template <class T>
std::vector<double> cols(const std::vector<T>& m, int64_t rows, int64_t ld, int64_t off,
                         int64_t width) {
  std::vector<double> r(static_cast<size_t>(rows * width));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < width; ++j) r[i * width + j] = static_cast<double>(m[i * ld + off + j]);
  return r;
}
std::vector<double> cols_bf16(const std::vector<uint16_t>& m, int64_t rows, int64_t ld,
                              int64_t off, int64_t width) {
  std::vector<double> r(static_cast<size_t>(rows * width));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < width; ++j) r[i * width + j] = from_bf16(m[i * ld + off + j]);
  return r;
}
template <class T>
std::vector<double> dbl(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// One case on the GPU against the CPU reference; reset: flags [tokens] or empty (none).
void check_case(const Case& cs, const std::vector<int32_t>& reset) {
  SsdDims d;
  d.batch = cs.batch;
  d.seqlen = cs.seqlen;
  d.nheads = cs.nheads;
  d.headdim = cs.headdim;
  d.ngroups = cs.ngroups;
  d.dstate = cs.dstate;
  d.chunk = cs.chunk;
  const int64_t T = d.tokens(), CD = d.conv_dim(), DI = d.d_inner(), H = d.nheads;
  const int64_t ld_dt = H + cs.ld_extra, ld_ddt = H + 2;
  const int64_t SN = d.batch * H * d.headdim * d.dstate;
  const uint64_t seed = 1234 + 17 * static_cast<uint64_t>(cs.seqlen + cs.nheads + cs.chunk);

  // inputs (rounded to bf16 where the kernels read bf16)
  const SsdTestInputs in = make_ssd_inputs(d, ld_dt, seed);
  const auto &xBC = in.xBC, &dt_raw = in.dt_raw, &dt_bias = in.dt_bias, &A_log = in.A_log;
  const auto &D = in.D, &init = in.init, &dy = in.dy, &dfinal = in.dfinal;
  const float* init_h = cs.init ? init.data() : nullptr;
  const float* dfinal_h = cs.dfinal ? dfinal.data() : nullptr;
  const int32_t* reset_h = reset.empty() ? nullptr : reset.data();
  // accumulating outputs start from these values on both sides
  const std::vector<float> acc0 = ssdtest::randn<float>(H, seed + 9, 0.1);

  // CPU reference
  std::vector<float> y_ref(T * DI), fs_ref(SN);
  ssd::cpu::ssd_fwd<float>(d, xBC.data(), dt_raw.data(), ld_dt, dt_bias.data(), A_log.data(),
                           D.data(), init_h, y_ref.data(), fs_ref.data(), reset_h);
  std::vector<float> dxBC_ref(T * CD), ddt_ref(T * ld_ddt, 0.f), ddtb_ref = acc0,
      dAlog_ref = acc0, dD_ref = acc0, dinit_ref(SN);
  ssd::cpu::ssd_bwd<float>(d, xBC.data(), dt_raw.data(), ld_dt, dt_bias.data(), A_log.data(),
                           D.data(), init_h, dy.data(), dfinal_h, dxBC_ref.data(),
                           ddt_ref.data(), ld_ddt, ddtb_ref.data(), dAlog_ref.data(),
                           dD_ref.data(), dinit_ref.data(), reset_h);

  // GPU, under each kernel variant (ssd_set_variant), with the same tolerances
  const int saved_variant = ssd::cuda::ssd_variant();
  struct RestoreVariant {
    int v;
    ~RestoreVariant() { ssd::cuda::ssd_set_variant(v); }
  } restore{saved_variant};
  for (int variant : {1, 2}) {
    SCOPED_TRACE("kernel variant " + std::to_string(variant));
    ssd::cuda::ssd_set_variant(variant);  // before sizing the workspace
    // GPU
    using bf = uint16_t;
    SsdDevInputs gin(in);
    auto &g_xBC = gin.xBC, &g_dt = gin.dt, &g_dy = gin.dy;
    auto &g_bias = gin.dt_bias, &g_Alog = gin.A_log, &g_D = gin.D, &g_init = gin.init,
         &g_dfinal = gin.dfinal;
    DevBuf<bf> g_y(T * DI), g_dxBC(T * CD), g_ddt(T * ld_ddt);
    DevBuf<float> g_fs(SN), g_dbias(H), g_dAlog(H), g_dD(H), g_dinit(SN);
    DevBuf<int32_t> g_reset(std::max<size_t>(reset.size(), 1));
    if (reset_h) g_reset.up(reset);
    const int32_t* reset_d = reset_h ? g_reset.p : nullptr;
    const size_t wsb = ssd::cuda::ssd_workspace_bytes(d);
    DevBuf<unsigned char> g_ws(wsb);
    ASSERT_TRUE(gin.ok() && g_ws.p && g_dxBC.p && g_dinit.p) << "cudaMalloc failed";
    g_dbias.up(acc0);
    g_dAlog.up(acc0);
    g_dD.up(acc0);
    const std::vector<bf> sentinel(T * ld_ddt, to_bf16(7.0f));
    g_ddt.up(sentinel);
    CUDA_OK(cudaMemset(g_y.p, 0xff, T * DI * sizeof(bf)));     // NaN-fill outputs
    CUDA_OK(cudaMemset(g_dxBC.p, 0xff, T * CD * sizeof(bf)));
    CUDA_OK(cudaMemset(g_fs.p, 0xff, SN * sizeof(float)));
    CUDA_OK(cudaMemset(g_dinit.p, 0xff, SN * sizeof(float)));
    auto B = [](DevBuf<bf>& b) { return reinterpret_cast<ssd::cuda::bf16*>(b.p); };

    // Variant 2 (the default) runs with the forward's intermediates saved for the backward,
    // as training does; variant 1 recomputes them.
    DevBuf<unsigned char> g_saved(variant == 2 ? ssd::cuda::ssd_saved_bytes(d) : 1);
    void* saved = variant == 2 ? g_saved.p : nullptr;
    if (saved) CUDA_OK(cudaMemset(saved, 0xff, ssd::cuda::ssd_saved_bytes(d)));
    ssd::cuda::ssd_fwd(d, B(g_xBC), B(g_dt), ld_dt, g_bias.p, g_Alog.p, g_D.p,
                       cs.init ? g_init.p : nullptr, B(g_y), g_fs.p, g_ws.p, saved, nullptr,
                       reset_d);
    ssd::cuda::ssd_bwd(d, B(g_xBC), B(g_dt), ld_dt, g_bias.p, g_Alog.p, g_D.p,
                       cs.init ? g_init.p : nullptr, B(g_dy), cs.dfinal ? g_dfinal.p : nullptr,
                       B(g_dxBC), B(g_ddt), ld_ddt, g_dbias.p, g_dAlog.p, g_dD.p, g_dinit.p,
                       g_ws.p, saved, nullptr, reset_d);
    CUDA_OK(cudaDeviceSynchronize());

    const auto y = g_y.down();
    const auto dxBC = g_dxBC.down();
    const auto ddt = g_ddt.down();
    const int64_t GN = d.ngroups * d.dstate;
    struct Cmp {
      const char* name;
      double err;
    };
    const std::vector<Cmp> cmps = {
        {"y", ssdtest::rel_err(cols_bf16(y, T, DI, 0, DI), dbl(y_ref))},
        {"final_state", ssdtest::rel_err(dbl(g_fs.down()), dbl(fs_ref))},
        {"dx", ssdtest::rel_err(cols_bf16(dxBC, T, CD, 0, DI), cols(dxBC_ref, T, CD, 0, DI))},
        {"dB", ssdtest::rel_err(cols_bf16(dxBC, T, CD, DI, GN), cols(dxBC_ref, T, CD, DI, GN))},
        {"dC", ssdtest::rel_err(cols_bf16(dxBC, T, CD, DI + GN, GN),
                                cols(dxBC_ref, T, CD, DI + GN, GN))},
        {"ddt", ssdtest::rel_err(cols_bf16(ddt, T, ld_ddt, 0, H), cols(ddt_ref, T, ld_ddt, 0, H))},
        {"d_dt_bias", ssdtest::rel_err(dbl(g_dbias.down()), dbl(ddtb_ref))},
        {"dA_log", ssdtest::rel_err(dbl(g_dAlog.down()), dbl(dAlog_ref))},
        {"dD", ssdtest::rel_err(dbl(g_dD.down()), dbl(dD_ref))},
        {"d_initial_state", ssdtest::rel_err(dbl(g_dinit.down()), dbl(dinit_ref))},
    };
    std::string line;
    for (const auto& c : cmps) {
      char buf[64];
      std::snprintf(buf, sizeof buf, " %s=%.2e", c.name, c.err);
      line += buf;
    }
    std::printf("[ssd v%d %s%s]%s\n", variant, case_name(cs).c_str(),
                reset_h ? " resets" : "", line.c_str());
    for (const auto& c : cmps) EXPECT_LE(c.err, kTol) << c.name;  // NaN/inf fail too

    // columns of ddt past nheads are left alone
    bool untouched = true;
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = H; j < ld_ddt; ++j) untouched &= ddt[i * ld_ddt + j] == sentinel[0];
    EXPECT_TRUE(untouched) << "ddt written past column nheads";
  }
}

class CudaSsd : public ::testing::TestWithParam<Case> {};

TEST_P(CudaSsd, MatchesCpuReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA GPU visible (cudaGetDeviceCount reports none)";
  check_case(GetParam(), {});
}

// Packed documents: flags at the first token, on chunk boundaries, on a chunk's last token,
// inside chunks, two and more in one chunk, on consecutive tokens, on the last token, plus one
// chunk with a start every other token (the most the offset in cs grows); one sequence of
// the batch with none. Both variants, the forward's saved intermediates (variant 2) and
// recomputed ones (variant 1).
TEST(CudaSsdResets, MatchesCpuReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA GPU visible (cudaGetDeviceCount reports none)";
  for (const Case& cs : {Case{3, 200, 4, 64, 2, 64, 64, true, true, 3},
                         Case{2, 356, 2, 128, 1, 64, 256, true, true, 5},
                         Case{3, 300, 4, 32, 1, 128, 128, false, true, 0}}) {
    std::vector<int32_t> reset(cs.batch * cs.seqlen, 0);
    for (int64_t t : {int64_t{0}, cs.chunk, cs.chunk - 1, int64_t{10}, int64_t{100},
                      int64_t{101}, cs.chunk + 30, cs.chunk + 50, cs.seqlen - 1})
      reset[t] = 1;
    for (int64_t t = 2 * cs.chunk; t < std::min(3 * cs.chunk, cs.seqlen); t += 2) reset[t] = 1;
    for (int64_t t : {int64_t{63}, int64_t{127}, int64_t{128}, int64_t{150}})
      reset[cs.seqlen + t] = 1;
    SCOPED_TRACE(case_name(cs) + " with resets");
    check_case(cs, reset);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaSsd,
    ::testing::Values(
        // partial last chunk, ngroups > 1, init + dfinal, strided dt
        Case{2, 200, 4, 64, 2, 64, 64, true, true, 3},
        // headdim 32, dstate 128, chunk 128, no init / dfinal
        Case{1, 300, 4, 32, 1, 128, 128, false, false, 0},
        // headdim 128, chunk 256, partial chunk, init only
        Case{2, 356, 2, 128, 1, 64, 256, true, false, 5},
        // three groups, dfinal only, full chunks
        Case{1, 512, 6, 64, 3, 128, 256, false, true, 1},
        // seqlen shorter than one chunk
        Case{2, 50, 3, 64, 1, 64, 64, true, true, 2},
        // long-ish sequence: many chunks
        Case{1, 1000, 2, 64, 1, 128, 128, true, true, 0},
        // headdim 128, dstate 128, chunk 64, 2 groups
        Case{1, 260, 4, 128, 2, 128, 64, false, true, 0},
        // enough chunks (53) that the dB/dC kernel gives each block all 12 heads of the group:
        // its load rings (8 heads deep off the diagonal, 3 on it) wrap around; partial last
        // chunk
        Case{1, 13500, 12, 64, 1, 128, 256, true, true, 0}),
    [](const ::testing::TestParamInfo<Case>& i) { return case_name(i.param); });

#else  // !SSD_HAVE_CUDA

TEST(CudaSsd, MatchesCpuReference) { GTEST_SKIP() << "built without CUDA (SSD_HAVE_CUDA unset)"; }
TEST(CudaSsdResets, MatchesCpuReference) {
  GTEST_SKIP() << "built without CUDA (SSD_HAVE_CUDA unset)";
}

#endif

}  // namespace
