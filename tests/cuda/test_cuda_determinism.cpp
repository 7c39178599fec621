// The CUDA backend is bitwise deterministic run to run (what exact resume needs): the SSD
// backward (no float atomics: per-warp partials summed in a fixed order), the LM head +
// cross-entropy (per-row stats summed in a fixed order) and a whole Mamba-2 forward/backward
// give identical bits when run twice on identical inputs. Parameter gradients still accumulate
// (+=). Skipped without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_ops.h"
#include "config/config.h"
#include "model/mamba2.h"
#include "testutil.h"

#ifdef SSD_HAVE_CUDA
#include <cuda_runtime.h>

#include "cuda/cuda_testutil.h"
#include "ssd.h"
#include "ssd_common.cuh"
#endif

namespace {

using namespace ssdtest;

using namespace ssd;

constexpr const char* kNoGpu = "no CUDA GPU visible (cuda_device_count() == 0, or built without CUDA)";

// Index of the first element whose bits differ, or -1.
template <class T>
int64_t first_diff(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<int64_t>(i);
  return -1;
}

#define EXPECT_BITWISE_EQ(a, b, what)                                                    \
  do {                                                                                   \
    const int64_t i_ = first_diff((a), (b));                                             \
    EXPECT_EQ(i_, -1) << (what) << " differs between two identical runs (first at " << i_ \
                      << " of " << (a).size() << ")";                                    \
  } while (0)

template <class T>
bool finite_and_nonzero(const std::vector<T>& v) {
  bool nz = false;
  for (const T& x : v) {
    if (!std::isfinite(static_cast<double>(x))) return false;
    nz |= x != T(0);
  }
  return nz;
}

// ------------------------------------------------------------------------ (a) SSD backward

#ifdef SSD_HAVE_CUDA

struct SsdOut {
  std::vector<uint16_t> dxBC, ddt;
  std::vector<float> dbias, dAlog, dD, dinit;
};

// Every output of two backward runs bit for bit; `why` names the second run in messages.
void expect_same_outputs(const SsdOut& a, const SsdOut& b, const std::string& why) {
  EXPECT_BITWISE_EQ(a.dxBC, b.dxBC, "dxBC" + why);
  EXPECT_BITWISE_EQ(a.ddt, b.ddt, "ddt" + why);
  EXPECT_BITWISE_EQ(a.dbias, b.dbias, "d_dt_bias" + why);
  EXPECT_BITWISE_EQ(a.dAlog, b.dAlog, "dA_log" + why);
  EXPECT_BITWISE_EQ(a.dD, b.dD, "dD" + why);
  EXPECT_BITWISE_EQ(a.dinit, b.dinit, "d_initial_state" + why);
}

struct SsdCase {
  int64_t batch, seqlen, nheads, headdim, ngroups, dstate, chunk;
};

// Kernel variant `variant` (ssd_set_variant; restored on return).
void run_ssd_determinism(const SsdCase& c, int variant) {
  const int saved_variant = ssd::cuda::ssd_variant();
  struct RestoreVariant {
    int v;
    ~RestoreVariant() { ssd::cuda::ssd_set_variant(v); }
  } restore{saved_variant};
  ssd::cuda::ssd_set_variant(variant);  // before sizing the workspace
  SCOPED_TRACE("kernel variant " + std::to_string(variant));
  SsdDims d;
  d.batch = c.batch, d.seqlen = c.seqlen, d.nheads = c.nheads, d.headdim = c.headdim;
  d.ngroups = c.ngroups, d.dstate = c.dstate, d.chunk = c.chunk;
  ASSERT_EQ(ssd::cuda::ssd_unsupported_reason(d), "");
  const int64_t T = d.tokens(), CD = d.conv_dim(), DI = d.d_inner(), H = d.nheads;
  const int64_t ld_dt = H + 1, ld_ddt = H + 2;
  const int64_t SN = d.batch * H * d.headdim * d.dstate;
  const uint64_t seed = 777 + static_cast<uint64_t>(c.headdim + c.chunk);

  const SsdTestInputs in = make_ssd_inputs(d, ld_dt, seed);
  const auto &xBC = in.xBC, &dt_raw = in.dt_raw, &dt_bias = in.dt_bias, &A_log = in.A_log;
  const auto &D = in.D, &init = in.init, &dy = in.dy, &dfinal = in.dfinal;

  SsdDevInputs gin(in);
  auto &g_xBC = gin.xBC, &g_dt = gin.dt, &g_dy = gin.dy;
  auto &g_bias = gin.dt_bias, &g_Alog = gin.A_log, &g_D = gin.D, &g_init = gin.init,
       &g_dfinal = gin.dfinal;
  DevBuf<uint16_t> g_dxBC(T * CD), g_ddt(T * ld_ddt);
  DevBuf<float> g_dbias(H), g_dAlog(H), g_dD(H), g_dinit(SN);
  const size_t wsb = ssd::cuda::ssd_workspace_bytes(d);
  const size_t savedb = ssd::cuda::ssd_saved_bytes(d);
  DevBuf<unsigned char> g_ws(wsb), g_saved(savedb);
  DevBuf<uint16_t> g_y(T * DI);
  ASSERT_TRUE(gin.ok() && g_dxBC.p && g_ddt.p && g_dinit.p && g_ws.p && g_saved.p && g_y.p)
      << "cudaMalloc failed";
  using ssd::cuda::bf16;
  auto B = [](DevBuf<uint16_t>& b) { return reinterpret_cast<bf16*>(b.p); };

  // One backward into zeroed outputs (or accumulators starting at acc0); ws_fill: the byte
  // the workspace is filled with first (its previous contents must not matter). saved: a
  // forward leaves its intermediates in a separate buffer first, and the backward reads them
  // (instead of recomputing them).
  auto run = [&](int ws_fill, const std::vector<float>* acc0, SsdOut& o, bool saved = false) {
    if (saved) {
      CUDA_OK(cudaMemset(g_saved.p, 0xff, savedb));
      ssd::cuda::ssd_fwd(d, B(g_xBC), B(g_dt), ld_dt, g_bias.p, g_Alog.p, g_D.p, g_init.p,
                         B(g_y), nullptr, g_ws.p, g_saved.p, nullptr);
    }
    CUDA_OK(cudaMemset(g_ws.p, ws_fill, wsb));
    CUDA_OK(cudaMemset(g_dxBC.p, 0, g_dxBC.n * sizeof(uint16_t)));
    CUDA_OK(cudaMemset(g_ddt.p, 0, g_ddt.n * sizeof(uint16_t)));
    CUDA_OK(cudaMemset(g_dinit.p, 0, SN * sizeof(float)));
    if (acc0) {
      g_dbias.up(*acc0);
      g_dAlog.up(*acc0);
      g_dD.up(*acc0);
    } else {
      CUDA_OK(cudaMemset(g_dbias.p, 0, H * sizeof(float)));
      CUDA_OK(cudaMemset(g_dAlog.p, 0, H * sizeof(float)));
      CUDA_OK(cudaMemset(g_dD.p, 0, H * sizeof(float)));
    }
    ssd::cuda::ssd_bwd(d, B(g_xBC), B(g_dt), ld_dt, g_bias.p, g_Alog.p, g_D.p, g_init.p, B(g_dy),
                       g_dfinal.p, B(g_dxBC), B(g_ddt), ld_ddt, g_dbias.p, g_dAlog.p, g_dD.p,
                       g_dinit.p, g_ws.p, saved ? g_saved.p : nullptr, nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    o.dxBC = g_dxBC.down();
    o.ddt = g_ddt.down();
    o.dbias = g_dbias.down();
    o.dAlog = g_dAlog.down();
    o.dD = g_dD.down();
    o.dinit = g_dinit.down();
  };

  SsdOut r1, r2, r3, r4;
  run(0, nullptr, r1);
  if (::testing::Test::HasFatalFailure()) return;
  run(0, nullptr, r2);
  if (::testing::Test::HasFatalFailure()) return;
  expect_same_outputs(r1, r2, "");
  EXPECT_TRUE(finite_and_nonzero(r1.dbias) && finite_and_nonzero(r1.dAlog) &&
              finite_and_nonzero(r1.dD) && finite_and_nonzero(r1.dinit))
      << "parameter / state gradients should be finite and not all zero";

  // A workspace full of 0xff bytes (NaN as fp32) before the call: same bits (nothing reads
  // workspace memory that this call did not write or zero).
  run(0xff, nullptr, r3);
  if (::testing::Test::HasFatalFailure()) return;
  expect_same_outputs(r1, r3, " (0xff-filled workspace)");

  // The forward's saved intermediates are the ones the backward would recompute, bit for bit.
  SsdOut r5;
  run(0xff, nullptr, r5, true);
  if (::testing::Test::HasFatalFailure()) return;
  expect_same_outputs(r1, r5, " (intermediates saved by the forward)");

  // Accumulation: from acc0 the parameter gradients are exactly acc0 + (the zero-start result)
  // (the kernel adds one fixed-order per-head sum to the output: one fp32 addition).
  const auto acc0 = ssdtest::randn<float>(H, seed + 9, 0.1);
  run(0, &acc0, r4);
  if (::testing::Test::HasFatalFailure()) return;
  std::vector<float> eb(H), ea(H), ed(H);
  for (int64_t h = 0; h < H; ++h) {
    eb[h] = acc0[h] + r1.dbias[h];
    ea[h] = acc0[h] + r1.dAlog[h];
    ed[h] = acc0[h] + r1.dD[h];
  }
  EXPECT_BITWISE_EQ(r4.dbias, eb, "d_dt_bias accumulated (+=)");
  EXPECT_BITWISE_EQ(r4.dAlog, ea, "dA_log accumulated (+=)");
  EXPECT_BITWISE_EQ(r4.dD, ed, "dD accumulated (+=)");

  // Still the right values: against the CPU reference (fp32, same bf16-rounded inputs) for
  // the outputs the partial sums feed (the full comparison lives in test_cuda_ssd).
  std::vector<float> dxBC_ref(T * CD), ddt_ref(T * ld_ddt, 0.f), ddtb_ref(H, 0.f),
      dAlog_ref(H, 0.f), dD_ref(H, 0.f), dinit_ref(SN);
  ssd::cpu::ssd_bwd<float>(d, xBC.data(), dt_raw.data(), ld_dt, dt_bias.data(), A_log.data(),
                           D.data(), init.data(), dy.data(), dfinal.data(), dxBC_ref.data(),
                           ddt_ref.data(), ld_ddt, ddtb_ref.data(), dAlog_ref.data(),
                           dD_ref.data(), dinit_ref.data());
  std::vector<double> ddt_g, ddt_c;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      ddt_g.push_back(from_bf16(r1.ddt[t * ld_ddt + h]));
      ddt_c.push_back(ddt_ref[t * ld_ddt + h]);
    }
  const double e_ddt = ssdtest::rel_err(ddt_g, ddt_c), e_b = ssdtest::rel_err(r1.dbias, ddtb_ref),
               e_a = ssdtest::rel_err(r1.dAlog, dAlog_ref), e_d = ssdtest::rel_err(r1.dD, dD_ref),
               e_i = ssdtest::rel_err(r1.dinit, dinit_ref);
  std::printf("[ssd determinism v%d b%lld L%lld h%lld p%lld g%lld n%lld q%lld] vs cpu: ddt=%.2e "
              "d_dt_bias=%.2e dA_log=%.2e dD=%.2e d_initial_state=%.2e\n",
              variant, (long long)c.batch, (long long)c.seqlen, (long long)c.nheads,
              (long long)c.headdim, (long long)c.ngroups, (long long)c.dstate,
              (long long)c.chunk, e_ddt, e_b, e_a, e_d, e_i);
  EXPECT_LE(e_ddt, 1e-2) << "ddt";
  EXPECT_LE(e_b, 1e-2) << "d_dt_bias";
  EXPECT_LE(e_a, 1e-2) << "dA_log";
  EXPECT_LE(e_d, 1e-2) << "dD";
  EXPECT_LE(e_i, 1e-2) << "d_initial_state";
}

TEST(CudaDeterminism, SsdBackwardIsBitwiseReproducible) {
  if (cuda_device_count() == 0) GTEST_SKIP() << kNoGpu;
  // The shape of the brief: partial last chunk (1000 = 7*128 + 104), two groups.
  for (int variant : {1, 2}) run_ssd_determinism({2, 1000, 8, 64, 2, 128, 128}, variant);
}

TEST(CudaDeterminism, SsdBackwardIsBitwiseReproducibleWideHeads) {
  if (cuda_device_count() == 0) GTEST_SKIP() << kNoGpu;
  // headdim 256: the dx kernel splits each head into 4 slices (4 ddt_dir and 8 dcs slices);
  // chunk 256, partial last chunk.
  for (int variant : {1, 2}) run_ssd_determinism({1, 600, 4, 256, 1, 64, 256}, variant);
}

TEST(CudaDeterminism, SsdBackwardIsBitwiseReproducibleDefaultBenchShape) {
  if (cuda_device_count() == 0) GTEST_SKIP() << kNoGpu;
  // The bench shape's per-chunk geometry (headdim 64, dstate 128, chunk 256: variant 2's
  // double-buffered path) with a partial last chunk and several heads per group.
  for (int variant : {1, 2}) run_ssd_determinism({2, 700, 12, 64, 1, 128, 256}, variant);
}

// Host only (runs without a GPU): the backward's workspace pieces are in order, 256-byte
// aligned, do not overlap, hold the partial-sum arrays at their documented sizes, and the
// range ssd_bwd zeroes covers ddt_dir .. dcs_last and nothing after.
TEST(CudaDeterminism, WorkspaceLayoutHost) {
  using namespace ssd::cuda::detail;
  const std::vector<std::array<int64_t, 7>> shapes = {
      {2, 1000, 8, 64, 2, 128, 128}, {1, 600, 4, 256, 1, 64, 256}, {2, 200, 4, 64, 2, 64, 64},
      {1, 300, 4, 32, 1, 128, 128},  {2, 356, 2, 128, 1, 64, 256}, {3, 777, 12, 192, 3, 128, 128}};
  for (const auto& s : shapes) {
    SsdDims d;
    d.batch = s[0], d.seqlen = s[1], d.nheads = s[2], d.headdim = s[3], d.ngroups = s[4];
    d.dstate = s[5], d.chunk = s[6];
    const size_t B = d.batch, H = d.nheads, nc = d.nchunks(), Q = d.chunk, P = d.headdim,
                 N = d.dstate, G = d.ngroups, L = d.seqlen;
    char* base = reinterpret_cast<char*>(uintptr_t(1) << 40);
    SsdWorkspace w;
    const size_t total = carve_workspace(d, base, true, &w);  // variant 1's layout
    SsdWorkspace w_default;  // the layout ssd_workspace_bytes sizes: the default variant's
    EXPECT_EQ(carve_workspace(d, base, true, &w_default, ssd::cuda::ssd_variant() == 2),
              ssd::cuda::ssd_workspace_bytes(d));
    const size_t nq = B * H * nc * Q, ns = static_cast<size_t>(bc_bwd_splits(d));
    EXPECT_EQ(static_cast<size_t>(q_slice(d)), nq);
    struct Piece {
      const char* name;
      const void* p;
      size_t bytes;
    };
    const std::vector<Piece> pieces = {
        {"dt", w.dt, nq * 4},
        {"cs", w.cs, nq * 4},
        {"CB", w.CB, B * nc * G * Q * Q * 4},
        {"states", w.states, B * (nc + 1) * H * P * N * 4},
        {"states_bf", w.states_bf, B * nc * H * P * N * 2},
        {"BC", w.BC, B * nc * G * Q * Q * 4},
        {"dstates", w.dstates, B * nc * H * P * N * 4},
        {"dstates_bf", w.dstates_bf, B * nc * H * P * N * 2},
        {"ddt_dir", w.ddt_dir, dx_pslices(d) * nq * 4},
        {"dcs", w.dcs, dcs_slices(d) * nq * 4},
        {"dcs_last", w.dcs_last, B * H * nc * dcs_last_len(d) * 4},
        {"dBp", w.dBp, ns * B * L * G * N * 4},
        {"dCp", w.dCp, ns * B * L * G * N * 4},
        {"pg_dD", w.pg_dD, B * H * nc * dx_warps(d) * 4},
        {"pg_dtb", w.pg_dtb, B * H * nc * dt_bwd_warps(d) * 4},
        {"pg_dA", w.pg_dA, B * H * nc * dt_bwd_warps(d) * 4}};
    auto off = [&](const void* p) { return static_cast<size_t>(static_cast<const char*>(p) - base); };
    for (size_t i = 0; i < pieces.size(); ++i) {
      EXPECT_EQ(off(pieces[i].p) % 256, 0u) << pieces[i].name;
      const size_t end = off(pieces[i].p) + pieces[i].bytes;
      const size_t next = i + 1 < pieces.size() ? off(pieces[i + 1].p) : total;
      EXPECT_LE(end, next) << pieces[i].name << " overlaps what follows it";
    }
    EXPECT_EQ(dx_pslices(d), static_cast<int>(P / (P >= 64 ? 64 : 32)));
    EXPECT_EQ(dcs_last_len(d), static_cast<int>((Q / 64) * dx_pslices(d) * 4 +
                                                 (P * N / 4 + 255) / 256 * 8));
    EXPECT_GE(off(w.ddt_dir) + w.zero_bytes, off(w.dcs_last) + B * H * nc * dcs_last_len(d) * 4);
    EXPECT_LE(off(w.ddt_dir) + w.zero_bytes, off(w.dBp));
    // Variant 2: the same pieces at the same places, then its own after pg_dA.
    {
      SsdWorkspace w2;
      const size_t total2 = carve_workspace(d, base, true, &w2, true);
      EXPECT_EQ(w2.dcs, w.dcs);
      EXPECT_EQ(w2.pg_dA, w.pg_dA);
      EXPECT_EQ(w2.zero_bytes, w.zero_bytes);
      const size_t nb = Q / 64, ns2 = static_cast<size_t>(dbdc_v2_splits(d));
      EXPECT_GE(ns2, 1u);
      EXPECT_LE(ns2, H / G);
      const std::vector<Piece> v2p = {{"pg_dA", w2.pg_dA, B * H * nc * dt_bwd_warps(d) * 4},
                                      {"dcs_v2", w2.dcs_v2, 2 * nb * nq * 4},
                                      {"dBp_v2", w2.dBp_v2, ns2 * nb * B * L * G * N * 4},
                                      {"dCp_v2", w2.dCp_v2, ns2 * nb * B * L * G * N * 4}};
      for (size_t i = 0; i < v2p.size(); ++i) {
        EXPECT_EQ(off(v2p[i].p) % 256, 0u) << v2p[i].name;
        const size_t end = off(v2p[i].p) + v2p[i].bytes;
        const size_t next = i + 1 < v2p.size() ? off(v2p[i + 1].p) : total2;
        EXPECT_LE(end, next) << v2p[i].name << " overlaps what follows it (variant 2)";
      }
      EXPECT_GE(off(w2.dcs_v2), total);
    }
    // With a separate buffer for the forward's intermediates: dt, cs, CB, states, states_bf
    // there, at the same offsets as in the plain layout (ssd_saved_bytes of them), everything
    // else in the workspace, below the plain layout's size, in order and without overlap.
    {
      char* saved = reinterpret_cast<char*>(uintptr_t(3) << 40);
      SsdWorkspace ws;
      const size_t total_s = carve_workspace(d, base, true, &ws, true, saved);
      const size_t saved_bytes = ssd::cuda::ssd_saved_bytes(d);
      auto soff = [&](const void* p) {
        return static_cast<size_t>(static_cast<const char*>(p) - saved);
      };
      const std::vector<std::pair<const void*, const void*>> fwd = {
          {ws.dt, w.dt}, {ws.cs, w.cs}, {ws.CB, w.CB}, {ws.states, w.states},
          {ws.states_bf, w.states_bf}};
      for (const auto& [in_saved, plain] : fwd) EXPECT_EQ(soff(in_saved), off(plain));
      EXPECT_EQ(saved_bytes, off(w.BC)) << "the forward's pieces are the plain layout's prefix";
      EXPECT_LE(soff(ws.states_bf) + B * nc * H * P * N * 2, saved_bytes);
      EXPECT_EQ(off(ws.BC), 0u) << "the workspace starts with the backward's own pieces";
      EXPECT_EQ(off(ws.dcs), off(w.dcs) - off(w.BC));
      SsdWorkspace wp;
      EXPECT_EQ(total_s, carve_workspace(d, base, true, &wp, true) - saved_bytes);
    }
    std::printf("    [layout b%zu L%zu h%zu p%zu g%zu n%zu q%zu] workspace %.2f MiB, zeroed %.3f MiB, "
                "dcs slices %d, dcs_last row %d\n",
                B, L, H, P, G, N, Q, total / 1048576.0, w.zero_bytes / 1048576.0, dcs_slices(d),
                dcs_last_len(d));
  }
}

#else  // !SSD_HAVE_CUDA

TEST(CudaDeterminism, SsdBackwardIsBitwiseReproducible) {
  GTEST_SKIP() << "built without CUDA (SSD_HAVE_CUDA unset)";
}

#endif

// -------------------------------------------------------------- (b) LM head + cross-entropy

std::vector<uint16_t> bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    uint32_t u;
    std::memcpy(&u, &v[i], 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    b[i] = static_cast<uint16_t>(u >> 16);
  }
  return b;
}

TEST(CudaDeterminism, LmHeadCrossEntropyIsBitwiseReproducible) {
  if (cuda_device_count() == 0) GTEST_SKIP() << kNoGpu;
  const int64_t T = 3000, Dm = 128, V = 5003;
  std::vector<int32_t> tg(T);
  for (int64_t t = 0; t < T; ++t) tg[t] = static_cast<int32_t>((t * 2719 + 5) % V);
  for (int64_t t = 0; t < T; t += 7) tg[t] = -1;
  const auto w = ssdtest::randn<float>(V * Dm, 90, 0.5);
  auto h = ssdtest::randn<float>(T * Dm, 91, 0.5);
  for (int64_t t = 0; t < T; t += 3)  // some argmax hits
    if (tg[t] >= 0)
      for (int64_t c = 0; c < Dm; ++c) h[t * Dm + c] += 0.8f * w[tg[t] * Dm + c];
  const auto hb = bf16_bits(h), wb = bf16_bits(w);

  // "" = the automatic block size (one block here); "512": six blocks of rows accumulate
  for (const char* block : {"", "512"}) {
    if (*block) setenv("SSD_CUDA_CE_BLOCK_TOKENS", block, 1);
    auto be = make_cuda_backend(0);  // reads the variable
    unsetenv("SSD_CUDA_CE_BLOCK_TOKENS");
    struct Out {
      std::vector<double> stats;
      std::vector<uint16_t> dh;
      std::vector<float> dw;
    };
    auto run = [&]() {
      Tensor ht = be->alloc({T, Dm}, DType::BF16), wt = be->alloc({V, Dm}, DType::BF16);
      be->upload(ht, hb.data());
      be->upload(wt, wb.data());
      Tensor tt = be->alloc({T}, DType::I32);
      be->upload(tt, tg.data());
      Tensor st = be->alloc({3}, DType::F64);
      be->zero(st);
      Tensor dh = be->alloc({T, Dm}, DType::BF16);
      be->zero(dh);
      Tensor dw = be->alloc({V, Dm}, DType::F32);
      be->zero(dw);
      be->lm_head_ce(ht, wt, tt, 1.0 / T, st, &dh, &dw);
      Out o;
      o.stats.resize(3);
      o.dh.resize(T * Dm);
      o.dw.resize(V * Dm);
      be->download(o.stats.data(), st);
      be->download(o.dh.data(), dh);
      be->download(o.dw.data(), dw);
      return o;
    };
    const Out a = run(), b = run();
    const std::string tag = std::string(" (block ") + (*block ? block : "auto") + ")";
    EXPECT_BITWISE_EQ(a.stats, b.stats, "stats" + tag);
    EXPECT_BITWISE_EQ(a.dh, b.dh, "dhidden" + tag);
    EXPECT_BITWISE_EQ(a.dw, b.dw, "dweight" + tag);
    int64_t counted = 0;
    for (int32_t t : tg) counted += t >= 0;
    EXPECT_EQ(a.stats[1], static_cast<double>(counted)) << tag;
    EXPECT_GT(a.stats[2], 10.0) << "test data should produce argmax hits" << tag;
    EXPECT_TRUE(std::isfinite(a.stats[0]) && a.stats[0] > 0) << tag;
    std::printf("    [lm_head_ce%s] stats {%.17g, %g, %g}\n", tag.c_str(), a.stats[0],
                a.stats[1], a.stats[2]);
  }
}

// ---------------------------------------------------- (c) a whole Mamba-2 forward/backward

TEST(CudaDeterminism, ModelForwardBackwardIsBitwiseReproducible) {
  if (cuda_device_count() == 0) GTEST_SKIP() << kNoGpu;
  Config c = parse_config(
      "model: {d_model: 128, n_layer: 2, d_state: 64, headdim: 32, expand: 2, ngroups: 1, "
      "chunk_size: 64, vocab_size: 300}\n"
      "train: {seq_len: 256, micro_batch: 2}\n",
      {}, "t");
  auto gpu = make_cuda_backend(0);
  const int64_t B = 2, L = 256, V = c.model.vocab_size;
  Mamba2LM m(c.model, *gpu, B, L);
  m.init(5);
  // Two micro-batches accumulated into the gradients, as in training.
  std::vector<std::vector<int32_t>> tok(2, std::vector<int32_t>(B * L)),
      tgt(2, std::vector<int32_t>(B * L));
  uint64_t s = 12345;
  for (int mb = 0; mb < 2; ++mb) {
    for (auto& t : tok[mb]) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      t = static_cast<int32_t>((s >> 33) % V);
    }
    for (int64_t i = 0; i < B * L; ++i)
      tgt[mb][i] = (i + 1) % L && i % 11 != 3 ? tok[mb][i + 1] : -1;
  }
  struct Out {
    std::vector<std::vector<float>> grads;
    std::array<double, 3> stats;
  };
  auto run = [&]() {
    Out o;
    Tensor st = m.new_stats();
    m.zero_grads();
    for (int mb = 0; mb < 2; ++mb)
      m.forward_backward(tok[mb].data(), tgt[mb].data(), 1.0 / (2 * B * L), st);
    o.stats = m.read_stats(st);
    for (const Tensor& g : m.grads()) {
      std::vector<float> v(g.numel());
      gpu->download(v.data(), g);
      o.grads.push_back(std::move(v));
    }
    return o;
  };
  const Out a = run(), b = run();
  EXPECT_EQ(std::memcmp(a.stats.data(), b.stats.data(), sizeof(double) * 3), 0)
      << "stats differ: " << a.stats[0] << " vs " << b.stats[0];
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (size_t i = 0; i < a.grads.size(); ++i) {
    EXPECT_BITWISE_EQ(a.grads[i], b.grads[i], "gradient of " + m.table()[i].name);
    EXPECT_TRUE(finite_and_nonzero(a.grads[i])) << m.table()[i].name;
  }
  std::printf("    [model] loss sum %.17g over %g tokens\n", a.stats[0], a.stats[1]);
}

}  // namespace
