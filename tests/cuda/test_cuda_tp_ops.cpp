// Tensor parallelism at the op level on the GPU: the vocabulary-sharded embedding and LM head +
// cross-entropy and the gated RMSNorm whose groups span ranks, on R = 2 and 4 simulated ranks
// (tests/tp_sim.h: one thread and one CUDA backend per rank on the same GPU; the hooks move
// the tensors through the host), against (a) the unsharded CUDA op and (b) the sharded CPU op
// (f32) on the same bf16-rounded inputs. Tolerances as tests/cuda/test_cuda_ops.cpp: 1e-2 for
// what goes through bf16, 1e-4 for f32 paths (rstd, embedding dweight sums); the LM head's
// data make every logit exact (tests/tp_cases.h), so counts and argmax hits must be exact, ties
// included. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "testutil.h"
#include "tp_cases.h"
#include "tp_sim.h"

using namespace ssd;
using ssdtest::SimGroup;
using Vf = std::vector<float>;
using Vd = std::vector<double>;

namespace {

constexpr double kTolBf16 = 1e-2;
constexpr double kTolF32 = 1e-4;
double g_worst_bf16 = 0, g_worst_f32 = 0;

using ssdtest::round_bf16;
Vf bf16(Vf v) {
  for (auto& x : v) x = round_bf16(x);
  return v;
}
Vf to_f(const Vd& v) { return Vf(v.begin(), v.end()); }

// Host f32 -> a tensor of `dt` (through the backend's convert), and back.
Tensor up(Backend& be, const Vf& v, const Shape& s, DType dt) {
  Tensor f = be.alloc(s, DType::F32);
  be.upload(f, v.data());
  if (dt == DType::F32) return f;
  Tensor t = be.alloc(s, dt);
  be.convert(f, t);
  return t;
}
Tensor up_i32(Backend& be, const std::vector<int32_t>& v) {
  Tensor t = be.alloc({static_cast<int64_t>(v.size())}, DType::I32);
  be.upload(t, v.data());
  return t;
}
Vf down(Backend& be, const Tensor& t) {
  Tensor f = t;
  if (t.dtype != DType::F32) {
    f = be.alloc(t.shape, DType::F32);
    be.convert(t, f);
  }
  Vf v(t.numel());
  be.download(v.data(), f);
  return v;
}
Vf rows_of(const Vf& a, int64_t w, int64_t r0, int64_t n) {
  return Vf(a.begin() + r0 * w, a.begin() + (r0 + n) * w);
}

// Elements that differ (exact comparisons, without printing whole tensors).
int64_t mismatches(const Vf& a, const Vf& b) {
  if (a.size() != b.size()) return -1;
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += a[i] != b[i];
  return n;
}

void check(const std::string& what, const Vf& got, const Vf& ref, double tol) {
  const double e = ssdtest::rel_err(got, ref);
  double& worst = tol >= kTolBf16 ? g_worst_bf16 : g_worst_f32;
  worst = std::max(worst, e);
  std::printf("    [%s] rel err %.3e (tol %.0e)\n", what.c_str(), e, tol);
  EXPECT_LE(e, tol) << what;
}

// One backend per simulated rank, made on this thread (they run on the rank threads).
std::vector<std::unique_ptr<Backend>> backends(int R, bool cuda) {
  std::vector<std::unique_ptr<Backend>> v;
  for (int r = 0; r < R; ++r) v.push_back(cuda ? make_cuda_backend(0) : make_cpu_backend());
  return v;
}

class CudaTpOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0)
      GTEST_SKIP() << "no CUDA GPU (or built without CUDA): CUDA backend tests skipped";
  }
};

// ------------------------------------------------------------------------------ embedding

TEST_F(CudaTpOps, EmbeddingShards) {
  struct Case { int64_t V, D, T; };
  for (Case c : {Case{37, 300, 203}, Case{50, 768, 5000}}) {
    const int64_t V = c.V, D = c.D, T = c.T;
    std::vector<int32_t> tok(T);
    for (int64_t t = 0; t < T; ++t) tok[t] = static_cast<int32_t>((t * 13 + 5) % V);
    for (int64_t t = 0; t < T; t += 3) tok[t] = static_cast<int32_t>(V - 2);  // frequent
    const Vf w = bf16(ssdtest::randn<float>(V * D, 1)), dout = ssdtest::randn<float>(T * D, 2);
    const Vf dw0 = ssdtest::randn<float>(V * D, 3);
    auto gpu = make_cuda_backend(0);
    auto cpu = make_cpu_backend();
    // Unsharded on the GPU.
    Tensor tk = up_i32(*gpu, tok), out = gpu->alloc({T, D}, DType::BF16);
    gpu->embedding_fwd(tk, up(*gpu, w, {V, D}, DType::BF16), out);
    Tensor g = up(*gpu, dout, {T, D}, DType::F32), dw = up(*gpu, dw0, {V, D}, DType::F32);
    gpu->embedding_bwd(tk, g, dw);
    const Vf out_ref = down(*gpu, out), dw_ref = down(*gpu, dw);
    for (int R : {2, 4}) {
      const std::string name = "embedding V" + std::to_string(V) + " T" + std::to_string(T) +
                               " R" + std::to_string(R);
      Vf sum(T * D, 0.f);
      for (int r = 0; r < R; ++r) {
        const auto [b, n] = ssdtest::shard_rows(V, R, r);
        VocabShard sh{b, V, R, nullptr};
        Vf o[2], d[2];
        for (int k = 0; k < 2; ++k) {  // the GPU, then the CPU
          Backend& be = k == 0 ? *gpu : *cpu;
          const DType cd = be.compute_dtype();
          Tensor tkr = up_i32(be, tok), ot = be.alloc({T, D}, cd);
          be.embedding_fwd(tkr, up(be, rows_of(w, D, b, n), {n, D}, cd), ot, &sh);
          Tensor gr = up(be, dout, {T, D}, DType::F32);
          Tensor dwr = up(be, rows_of(dw0, D, b, n), {n, D}, DType::F32);
          be.embedding_bwd(tkr, gr, dwr, &sh);
          o[k] = down(be, ot);
          d[k] = down(be, dwr);
        }
        for (int64_t i = 0; i < T * D; ++i) sum[i] += o[0][i];
        EXPECT_EQ(mismatches(o[0], o[1]), 0) << name << " rank " << r << ": out, GPU vs CPU";
        check(name + " rank " + std::to_string(r) + " dweight vs unsharded", d[0],
              rows_of(dw_ref, D, b, n), kTolF32);
        check(name + " rank " + std::to_string(r) + " dweight vs CPU sharded", d[0], d[1],
              kTolF32);
      }
      EXPECT_EQ(mismatches(sum, out_ref), 0) << name << ": the sum of the ranks' outputs";
    }
  }
}

// ------------------------------------------------------------------------------ LM head

struct CeOut {
  Vd stats;
  Vf dh, dw;
};

// One rank's (or the unsharded) LM head call; dhidden in dh_dtype.
CeOut ce_call(Backend& be, const ssdtest::CeProblem& p, int64_t b, int64_t n,
              const VocabShard* sh, bool train, DType dh_dtype) {
  const DType cd = be.compute_dtype();
  const int64_t T = p.T, Dm = p.Dm;
  const Vd stats0{1.5, 2.0, 3.0};
  Tensor h = up(be, to_f(p.h), {T, Dm}, cd);
  Tensor w = up(be, rows_of(to_f(p.w), Dm, b, n), {n, Dm}, cd);
  Tensor tg = up_i32(be, p.tg), s = be.alloc({3}, DType::F64);
  be.upload(s, stats0.data());
  Tensor dh = be.alloc({T, Dm}, dh_dtype);
  Tensor dw = up(be, rows_of(to_f(p.dw0), Dm, b, n), {n, Dm}, be.accum_dtype());
  be.lm_head_ce(h, w, tg, 0.5, s, train ? &dh : nullptr, train ? &dw : nullptr, sh);
  CeOut o;
  o.stats.resize(3);
  be.download(o.stats.data(), s);
  for (int k = 0; k < 3; ++k) o.stats[k] -= stats0[k];
  if (train) o.dh = down(be, dh), o.dw = down(be, dw);
  return o;
}

// Every rank's outputs, on the GPU (cuda) or the CPU.
std::vector<CeOut> ce_sharded(const ssdtest::CeProblem& p, int R, bool cuda, bool train,
                              DType dh_dtype, std::vector<std::vector<int64_t>>* log) {
  auto bes = backends(R, cuda);
  SimGroup group(R);
  std::vector<CeOut> outs(R);
  group.run([&](int r) {
    const auto [b, n] = ssdtest::shard_rows(p.V, R, r);
    VocabShard sh{b, p.V, R, group.all_gather(r, *bes[r])};
    outs[r] = ce_call(*bes[r], p, b, n, &sh, train, cuda ? dh_dtype : DType::F32);
  });
  if (log) *log = group.log();
  return outs;
}

TEST_F(CudaTpOps, LmHeadShards) {
  // V = 203: the scalar softmax path; V = 1000: the float4 path at R = 2 (500 columns each),
  // the scalar one at R = 4 (250). "48": several blocks, some partly or wholly ignored.
  struct Case { int64_t V; std::vector<std::pair<int, int>> ties; };
  for (const Case& c : {Case{203, {{3, 150}, {10, 60}, {100, 101}}},
                        Case{1000, {{3, 750}, {10, 300}, {100, 101}}}}) {
    const ssdtest::CeProblem p = ssdtest::make_ce(c.V, c.ties);
    const auto [loss_direct, hits_direct] = ssdtest::direct_ce(p);
    for (const char* block : {"48", ""}) {
      if (*block) setenv("SSD_CUDA_CE_BLOCK_TOKENS", block, 1);
      for (bool train : {true, false}) {
        auto gpu = make_cuda_backend(0);
        auto cpu = make_cpu_backend();
        const CeOut ref = ce_call(*gpu, p, 0, p.V, nullptr, train, DType::BF16);
        const CeOut cref = ce_call(*cpu, p, 0, p.V, nullptr, train, DType::F32);
        EXPECT_NEAR(ref.stats[0], loss_direct, 1e-4 * loss_direct);
        EXPECT_EQ(ref.stats[2], hits_direct);
        for (int R : {2, 4})
          for (DType dh_dtype : {DType::F32, DType::BF16}) {
            if (dh_dtype == DType::BF16 && (R == 4 || !train)) continue;
            const std::string name = "lm_head V" + std::to_string(c.V) + " block " +
                                     (*block ? block : "auto") + " R" + std::to_string(R) +
                                     (train ? " train" : " eval") + " dhidden " +
                                     dtype_name(dh_dtype);
            std::vector<std::vector<int64_t>> log;
            const auto g = ce_sharded(p, R, true, train, dh_dtype, &log);
            const auto k = ce_sharded(p, R, false, train, dh_dtype, nullptr);
            Vf dh_sum(p.T * p.Dm, 0.f);
            for (int r = 0; r < R; ++r) {
              const std::string rn = name + " rank " + std::to_string(r);
              EXPECT_EQ(log[r], log[0]) << rn << ": all_gather calls";
              const double e = std::fabs(g[r].stats[0] - ref.stats[0]) / ref.stats[0];
              std::printf("    [%s] loss rel err %.3e vs unsharded, hits %g\n", rn.c_str(), e,
                          g[r].stats[2]);
              EXPECT_LE(e, kTolF32) << rn;
              EXPECT_LE(std::fabs(g[r].stats[0] - k[r].stats[0]) / k[r].stats[0], kTolF32) << rn;
              EXPECT_EQ(g[r].stats[1], ref.stats[1]) << rn;
              EXPECT_EQ(g[r].stats[2], ref.stats[2]) << rn << ": hits vs unsharded";
              EXPECT_EQ(g[r].stats[2], k[r].stats[2]) << rn << ": hits vs CPU sharded";
              if (!train) continue;
              const auto [b, n] = ssdtest::shard_rows(p.V, R, r);
              check(rn + " dweight vs unsharded", g[r].dw, rows_of(ref.dw, p.Dm, b, n), kTolBf16);
              check(rn + " dweight vs CPU sharded", g[r].dw, k[r].dw, kTolBf16);
              check(rn + " dhidden part vs CPU sharded", g[r].dh, k[r].dh, kTolBf16);
              for (size_t i = 0; i < dh_sum.size(); ++i) dh_sum[i] += g[r].dh[i];
            }
            if (train) {
              check(name + " sum of dhidden vs unsharded", dh_sum, ref.dh, kTolBf16);
              check(name + " sum of dhidden vs CPU unsharded", dh_sum, cref.dh, kTolBf16);
            }
          }
      }
      unsetenv("SSD_CUDA_CE_BLOCK_TOKENS");
    }
  }
}

// ------------------------------------------------------------------------------ gated norm

// Rank r holds columns [j*G*R + r*G, +G) of each full group j (G = group_size on a rank).
TEST_F(CudaTpOps, GatedRmsNormSpans) {
  struct Case { int64_t T, G; };
  // G = 1280: a 2.7B model's d_inner 5120 over 4 ranks with ngroups 1; 2100 rows: more than the
  // backward's 1024 blocks.
  for (Case c : {Case{70, 24}, Case{33, 1280}, Case{2100, 96}})
    for (int R : {2, 4})
      for (int64_t ng : {1, 2}) {
        const int64_t T = c.T, G = c.G, Df = ng * G * R, D = ng * G;
        const std::string name = "gated T" + std::to_string(T) + " G" + std::to_string(G) +
                                 " R" + std::to_string(R) + " groups " + std::to_string(ng);
        const double eps = 1e-5;
        const Vf y = bf16(ssdtest::randn<float>(T * Df, 40));
        const Vf z = bf16(ssdtest::randn<float>(T * Df, 41, 1.5));
        const Vf dout = bf16(ssdtest::randn<float>(T * Df, 43));
        Vf w = ssdtest::randn<float>(Df, 42, 0.2);
        for (auto& v : w) v += 1.f;
        const Vf dw0 = ssdtest::randn<float>(Df, 45);
        auto col = [&](int r, int64_t cc) { return (cc / G) * G * R + r * G + cc % G; };
        auto local = [&](const Vf& full, int64_t width, int r) {  // rank r's columns
          Vf v(T * D);
          for (int64_t t = 0; t < T; ++t)
            for (int64_t cc = 0; cc < D; ++cc) v[t * D + cc] = full[t * width + col(r, cc)];
          return v;
        };
        auto locw = [&](const Vf& full, int r) {
          Vf v(D);
          for (int64_t cc = 0; cc < D; ++cc) v[cc] = full[col(r, cc)];
          return v;
        };
        // One call: {out, rstd, dy, dz, dweight}; z and dz are column slices of wider tensors.
        auto call = [&](Backend& be, const Vf& yv, const Vf& zv, const Vf& dv, const Vf& wv,
                        const Vf& dwv, int64_t width, int64_t group, const NormSpan* span) {
          const DType cd = be.compute_dtype(), ad = be.accum_dtype();
          const int64_t ldz = width + 8, offz = 8;
          Vf zw(T * ldz, 0.f);
          for (int64_t t = 0; t < T; ++t)
            for (int64_t cc = 0; cc < width; ++cc) zw[t * ldz + offz + cc] = zv[t * width + cc];
          Tensor yt = up(be, yv, {T, width}, cd), zt = up(be, zw, {T, ldz}, cd);
          Tensor wt = up(be, wv, {width}, ad), o = be.alloc({T, width}, cd);
          Tensor rs = be.alloc({T, width / group}, ad);
          be.gated_rmsnorm_fwd(yt, cols(zt, offz, width), wt, group, eps, o, rs, span);
          Tensor gt = up(be, dv, {T, width}, cd), dyt = be.alloc({T, width}, cd);
          Tensor dzt = up(be, Vf(T * ldz, 0.f), {T, ldz}, cd), dwt = up(be, dwv, {width}, ad);
          ColSlice dzs = cols(dzt, offz, width);
          be.gated_rmsnorm_bwd(gt, yt, cols(zt, offz, width), wt, group, rs, dyt, dzs, dwt, span);
          const Vf dzw = down(be, dzt);
          Vf dz(T * width);
          for (int64_t t = 0; t < T; ++t)
            for (int64_t cc = 0; cc < width; ++cc) dz[t * width + cc] = dzw[t * ldz + offz + cc];
          return std::vector<Vf>{down(be, o), down(be, rs), down(be, dyt), dz, down(be, dwt)};
        };
        auto gpu = make_cuda_backend(0);
        const std::vector<Vf> full = call(*gpu, y, z, dout, w, dw0, Df, G * R, nullptr);
        std::vector<std::vector<Vf>> gpu_outs;  // the GPU's ranks
        for (bool cuda : {true, false}) {
          auto bes = backends(R, cuda);
          SimGroup group(R);
          std::vector<std::vector<Vf>> outs(R);
          group.run([&](int r) {
            NormSpan span{R, group.all_reduce(r, *bes[r])};
            outs[r] = call(*bes[r], local(y, Df, r), local(z, Df, r), local(dout, Df, r),
                           locw(w, r), locw(dw0, r), D, G, &span);
          });
          if (!cuda) {  // the GPU's ranks against the CPU's
            for (int r = 0; r < R; ++r) {
              EXPECT_EQ(group.log()[r], (std::vector<int64_t>{T * ng, T * ng})) << name;
              const char* what[] = {"out", "rstd", "dy", "dz", "dweight"};
              for (int k = 0; k < 5; ++k)
                check(name + " rank " + std::to_string(r) + " " + what[k] + " vs CPU sharded",
                      gpu_outs[r][k], outs[r][k], k == 1 ? kTolF32 : kTolBf16);
            }
            continue;
          }
          gpu_outs = outs;
          for (int r = 0; r < R; ++r) {
            EXPECT_EQ(group.log()[r], (std::vector<int64_t>{T * ng, T * ng})) << name;
            const std::string rn = name + " rank " + std::to_string(r);
            check(rn + " out vs unsharded", outs[r][0], local(full[0], Df, r), kTolBf16);
            check(rn + " rstd vs unsharded", outs[r][1], full[1], kTolF32);
            check(rn + " dy vs unsharded", outs[r][2], local(full[2], Df, r), kTolBf16);
            check(rn + " dz vs unsharded", outs[r][3], local(full[3], Df, r), kTolBf16);
            check(rn + " dweight vs unsharded", outs[r][4], locw(full[4], r), kTolBf16);
          }
        }
      }
}

// Runs last: the worst error of every comparison above, held to the same bounds.
TEST_F(CudaTpOps, ZzWorstErrors) {
  std::printf("    worst rel err: bf16 paths %.3e, fp32 paths %.3e\n", g_worst_bf16, g_worst_f32);
  EXPECT_LE(g_worst_bf16, kTolBf16);
  EXPECT_LE(g_worst_f32, kTolF32);
}

}  // namespace
