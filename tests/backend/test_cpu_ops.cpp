// CPU reference kernels (everything but SSD): forwards against direct formulas written here,
// every backward against central finite differences in double, accumulation semantics
// (parameter grads +=, activation grads overwritten), strided column slices, determinism.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_ops.h"
#include "testutil.h"

namespace {

using namespace ssd;
using ssdtest::dot;
using ssdtest::finite_diff;
using ssdtest::randn;
using ssdtest::rel_err;
using V = std::vector<double>;

constexpr double kFdEps = 1e-6;
constexpr double kFdTol = 1e-6;

// Finite-difference check of `analytic` (the gradient of f w.r.t. x); prints the error.
void check_fd(const char* what, V& x, const std::function<double()>& f, const V& analytic) {
  V fd = finite_diff(x, f, kFdEps);
  const double e = rel_err(analytic, fd);
  std::printf("    [fd] %-34s rel err %.3e\n", what, e);
  EXPECT_LT(e, kFdTol) << what;
}

void check_close(const char* what, double e, double tol) {
  std::printf("    [cmp] %-33s rel err %.3e\n", what, e);
  EXPECT_LT(e, tol) << what;
}

V sub(const V& a, const V& b) {
  V r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}
V scale(const V& a, double s) {
  V r(a);
  for (auto& x : r) x *= s;
  return r;
}

// After two identical backward calls starting from g0: g2 - g0 == 2 * (g1 - g0).
void expect_doubled(const char* what, const V& g0, const V& g1, const V& g2) {
  const double e = rel_err(sub(g2, g0), scale(sub(g1, g0), 2.0));
  EXPECT_LT(e, 1e-12) << what << " did not accumulate";
}

template <class T>
std::vector<T> cast(const V& v) {
  return std::vector<T>(v.begin(), v.end());
}

double silu(double x) { return x / (1.0 + std::exp(-x)); }

// ------------------------------------------------------------------------------- embedding

TEST(CpuOps, EmbeddingForwardAndGradient) {
  const int64_t vocab = 11, dim = 7, ntok = 23;
  std::vector<int32_t> tok(ntok);
  for (int64_t t = 0; t < ntok; ++t) tok[t] = static_cast<int32_t>((t * 7 + 3) % vocab);
  tok[5] = tok[6] = tok[17] = 4;  // repeated tokens must sum their gradients
  V weight = randn<double>(vocab * dim, 1);
  V w_out = randn<double>(ntok * dim, 2);

  V out(ntok * dim);
  cpu::embedding_fwd(tok.data(), ntok, weight.data(), vocab, dim, out.data());
  for (int64_t t = 0; t < ntok; ++t)
    for (int64_t c = 0; c < dim; ++c) ASSERT_EQ(out[t * dim + c], weight[tok[t] * dim + c]);

  auto loss = [&] {
    V o(ntok * dim);
    cpu::embedding_fwd(tok.data(), ntok, weight.data(), vocab, dim, o.data());
    return dot(w_out, o);
  };
  const V d0 = randn<double>(vocab * dim, 3);
  V dw = d0;
  cpu::embedding_bwd(tok.data(), ntok, w_out.data(), vocab, dim, dw.data());
  const V d1 = dw;
  check_fd("embedding dweight", weight, loss, sub(d1, d0));
  cpu::embedding_bwd(tok.data(), ntok, w_out.data(), vocab, dim, dw.data());
  expect_doubled("embedding dweight", d0, d1, dw);
}

// --------------------------------------------------------------------------------- rmsnorm

TEST(CpuOps, AddRmsNormForwardAndGradient) {
  const int64_t ntok = 6, dim = 9;
  const double eps = 1e-5;
  for (int has_res = 0; has_res < 2; ++has_res)
    for (int has_next = 0; has_next < 2; ++has_next) {
      std::printf("  residual_in %s, dresidual_next %s\n", has_res ? "given" : "null",
                  has_next ? "given" : "null");
      V x = randn<double>(ntok * dim, 10);
      V res = randn<double>(ntok * dim, 11);
      V weight = randn<double>(dim, 12, 0.5);
      for (auto& w : weight) w += 1.0;
      const V wy = randn<double>(ntok * dim, 13);
      const V wr = randn<double>(ntok * dim, 14);  // = dresidual_next when given

      V ro(ntok * dim), y(ntok * dim), rstd(ntok);
      cpu::add_rmsnorm_fwd(x.data(), has_res ? res.data() : nullptr, weight.data(), ntok, dim,
                           eps, ro.data(), y.data(), rstd.data());
      // Direct formula.
      V ro_ref(ntok * dim), y_ref(ntok * dim), rstd_ref(ntok);
      for (int64_t t = 0; t < ntok; ++t) {
        double ms = 0;
        for (int64_t i = 0; i < dim; ++i) {
          const double r = x[t * dim + i] + (has_res ? res[t * dim + i] : 0.0);
          ro_ref[t * dim + i] = r;
          ms += r * r / dim;
        }
        rstd_ref[t] = 1.0 / std::sqrt(ms + eps);
        for (int64_t i = 0; i < dim; ++i)
          y_ref[t * dim + i] = ro_ref[t * dim + i] * rstd_ref[t] * weight[i];
      }
      check_close("rmsnorm residual_out", rel_err(ro, ro_ref), 1e-15);
      check_close("rmsnorm y", rel_err(y, y_ref), 1e-13);
      check_close("rmsnorm rstd", rel_err(rstd, rstd_ref), 1e-13);

      auto loss = [&] {
        V r2(ntok * dim), y2(ntok * dim), s2(ntok);
        cpu::add_rmsnorm_fwd(x.data(), has_res ? res.data() : nullptr, weight.data(), ntok, dim,
                             eps, r2.data(), y2.data(), s2.data());
        return dot(wy, y2) + (has_next ? dot(wr, r2) : 0.0);
      };
      const V dw0 = randn<double>(dim, 15);
      V dres = randn<double>(ntok * dim, 16);  // garbage: must be overwritten
      V dw = dw0;
      cpu::add_rmsnorm_bwd(wy.data(), has_next ? wr.data() : nullptr, ro.data(), weight.data(),
                           rstd.data(), ntok, dim, dres.data(), dw.data());
      const V dres1 = dres, dw1 = dw;
      check_fd("rmsnorm d_residual (wrt x)", x, loss, dres1);
      if (has_res) check_fd("rmsnorm d_residual (wrt residual_in)", res, loss, dres1);
      check_fd("rmsnorm dweight", weight, loss, sub(dw1, dw0));

      cpu::add_rmsnorm_bwd(wy.data(), has_next ? wr.data() : nullptr, ro.data(), weight.data(),
                           rstd.data(), ntok, dim, dres.data(), dw.data());
      EXPECT_EQ(dres, dres1) << "d_residual must be overwritten, not accumulated";
      expect_doubled("rmsnorm dweight", dw0, dw1, dw);
    }
}

// ---------------------------------------------------------------------------------- linear

template <class T>
void linear_forward_vs_naive(double tol) {
  const int64_t M = 13, N = 7, K = 10;
  const std::vector<T> x = cast<T>(randn<double>(M * K, 20));
  const std::vector<T> w = cast<T>(randn<double>(N * K, 21));
  std::vector<T> y(M * N);
  cpu::linear_fwd(x.data(), w.data(), M, N, K, y.data());
  V ref(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(x[m * K + k]) * double(w[n * K + k]);
      ref[m * N + n] = s;
    }
  check_close(sizeof(T) == 4 ? "linear fwd (float) vs naive" : "linear fwd (double) vs naive",
              rel_err(y, ref), tol);
}

TEST(CpuOps, LinearForwardVsNaive) {
  linear_forward_vs_naive<float>(1e-6);
  linear_forward_vs_naive<double>(1e-14);
}

TEST(CpuOps, LinearGradient) {
  const int64_t M = 9, N = 5, K = 6;
  V x = randn<double>(M * K, 30), w = randn<double>(N * K, 31);
  const V wy = randn<double>(M * N, 32);
  auto loss = [&] {
    V y(M * N);
    cpu::linear_fwd(x.data(), w.data(), M, N, K, y.data());
    return dot(wy, y);
  };
  const V dw0 = randn<double>(N * K, 33);
  V dx = randn<double>(M * K, 34), dw = dw0;
  cpu::linear_bwd(x.data(), w.data(), wy.data(), M, N, K, dx.data(), dw.data());
  const V dx1 = dx, dw1 = dw;
  check_fd("linear dx", x, loss, dx1);
  check_fd("linear dw", w, loss, sub(dw1, dw0));
  cpu::linear_bwd(x.data(), w.data(), wy.data(), M, N, K, dx.data(), dw.data());
  EXPECT_EQ(dx, dx1) << "dx must be overwritten";
  expect_doubled("linear dw", dw0, dw1, dw);
  // dx == null: dw still accumulates the same amount.
  V dw_nodx = dw0;
  cpu::linear_bwd<double>(x.data(), w.data(), wy.data(), M, N, K, nullptr, dw_nodx.data());
  EXPECT_LT(rel_err(dw_nodx, dw1), 1e-15);
}

// ---------------------------------------------------------------------------------- conv1d

// PyTorch's Conv1d(C, C, K, groups=C, padding=K-1) (cross-correlation, zero padding K-1 on
// both sides), truncated to the first seqlen outputs, then SiLU. in is [rows, ld_in] at col off.
V conv_naive(const V& in, int64_t ld_in, int64_t off, int64_t batch, int64_t L, int64_t C,
             const V& w, const V& bias, int64_t K) {
  V out(batch * L * C);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < C; ++c) {
      V xpad(L + 2 * (K - 1), 0.0);
      for (int64_t t = 0; t < L; ++t) xpad[K - 1 + t] = in[(b * L + t) * ld_in + off + c];
      for (int64_t j = 0; j < L; ++j) {  // full output has L+K-1 entries; keep the first L
        double s = bias[c];
        for (int64_t k = 0; k < K; ++k) s += w[c * K + k] * xpad[j + k];
        out[(b * L + j) * C + c] = silu(s);
      }
    }
  return out;
}

TEST(CpuOps, Conv1dForwardVsNaive) {
  struct Case { int64_t batch, L, C, K; };
  for (Case cs : {Case{2, 9, 6, 4}, Case{3, 2, 5, 4}, Case{1, 7, 3, 1}, Case{2, 5, 4, 3}}) {
    const int64_t ld = cs.C + 5, off = 3, rows = cs.batch * cs.L;
    const V in = randn<double>(rows * ld, 40);
    const V w = randn<double>(cs.C * cs.K, 41, 0.5), bias = randn<double>(cs.C, 42, 0.3);
    V out(rows * cs.C);
    cpu::conv1d_silu_fwd(in.data() + off, ld, cs.batch, cs.L, cs.C, w.data(), bias.data(), cs.K,
                         out.data());
    const double e = rel_err(out, conv_naive(in, ld, off, cs.batch, cs.L, cs.C, w, bias, cs.K));
    EXPECT_LT(e, 1e-14) << "batch " << cs.batch << " L " << cs.L << " C " << cs.C << " K "
                        << cs.K;
    std::printf("    [cmp] conv1d fwd B%ld L%ld C%ld K%ld          rel err %.3e\n",
                (long)cs.batch, (long)cs.L, (long)cs.C, (long)cs.K, e);
  }
}

TEST(CpuOps, Conv1dGradient) {
  const int64_t batch = 2, L = 9, C = 6, K = 4, rows = batch * L;
  const int64_t ld_in = C + 5, off_in = 3;    // input is a column block of a wider tensor
  const int64_t ld_din = C + 7, off_din = 2;  // so is its gradient
  V in = randn<double>(rows * ld_in, 50);
  V w = randn<double>(C * K, 51, 0.5), bias = randn<double>(C, 52, 0.3);
  const V wo = randn<double>(rows * C, 53);
  auto loss = [&] {
    V out(rows * C);
    cpu::conv1d_silu_fwd(in.data() + off_in, ld_in, batch, L, C, w.data(), bias.data(), K,
                         out.data());
    return dot(wo, out);
  };
  const V sentinel = randn<double>(rows * ld_din, 54);
  const V dw0 = randn<double>(C * K, 55), db0 = randn<double>(C, 56);
  V din = sentinel, dw = dw0, db = db0;
  cpu::conv1d_silu_bwd(in.data() + off_in, ld_in, batch, L, C, w.data(), bias.data(), K,
                       wo.data(), din.data() + off_din, ld_din, dw.data(), db.data());
  const V din1 = din, dw1 = dw, db1 = db;
  // Expected gradient w.r.t. the whole wide input: din in the slice, 0 elsewhere.
  V din_wide(rows * ld_in, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) din_wide[r * ld_in + off_in + c] = din1[r * ld_din + off_din + c];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < ld_din; ++j) {
      if (j < off_din || j >= off_din + C) {
        ASSERT_EQ(din1[r * ld_din + j], sentinel[r * ld_din + j]) << "din column " << j;
      }
    }
  check_fd("conv1d din (strided)", in, loss, din_wide);
  check_fd("conv1d dw", w, loss, sub(dw1, dw0));
  check_fd("conv1d dbias", bias, loss, sub(db1, db0));
  cpu::conv1d_silu_bwd(in.data() + off_in, ld_in, batch, L, C, w.data(), bias.data(), K,
                       wo.data(), din.data() + off_din, ld_din, dw.data(), db.data());
  EXPECT_EQ(din, din1) << "din must be overwritten";
  expect_doubled("conv1d dw", dw0, dw1, dw);
  expect_doubled("conv1d dbias", db0, db1, db);
}

// Packed documents: reset[t] = 1 where token t begins a document. The direct loop: tap k of
// token t reads the input at t-(K-1)+k only when that is inside the sequence and no document
// begins after it, up to t.
V conv_naive_resets(const V& in, int64_t ld_in, int64_t off, int64_t batch, int64_t L, int64_t C,
                    const V& w, const V& bias, int64_t K, const std::vector<int32_t>& reset) {
  V out(batch * L * C);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < L; ++t)
      for (int64_t c = 0; c < C; ++c) {
        double s = bias[c];
        for (int64_t k = 0; k < K; ++k) {
          const int64_t src = t - (K - 1) + k;
          bool seen = src >= 0;
          for (int64_t u = src + 1; seen && u <= t; ++u) seen = !reset[b * L + u];
          if (seen) s += w[c * K + k] * in[(b * L + src) * ld_in + off + c];
        }
        out[(b * L + t) * C + c] = silu(s);
      }
  return out;
}

std::vector<int32_t> doc_flags(int64_t batch, int64_t L,
                               const std::vector<std::vector<int64_t>>& starts) {
  std::vector<int32_t> r(batch * L, 0);
  for (size_t b = 0; b < starts.size(); ++b)
    for (int64_t t : starts[b]) r[b * L + t] = 1;
  return r;
}

// Starts at 0, on consecutive tokens, closer together than K, the last token; none in row 2.
const std::vector<std::vector<int64_t>> kConvStarts = {{0, 2, 3, 7, 12}, {5, 6, 10}, {}};

TEST(CpuOps, Conv1dResetsForwardVsNaive) {
  struct Case { int64_t L, C, K; };
  for (Case cs : {Case{13, 6, 4}, Case{13, 5, 3}, Case{13, 3, 1}, Case{13, 4, 6}}) {
    const int64_t batch = 3, ld = cs.C + 5, off = 3, rows = batch * cs.L;
    const V in = randn<double>(rows * ld, 60);
    const V w = randn<double>(cs.C * cs.K, 61, 0.5), bias = randn<double>(cs.C, 62, 0.3);
    const auto reset = doc_flags(batch, cs.L, kConvStarts);
    V out(rows * cs.C), plain(rows * cs.C);
    cpu::conv1d_silu_fwd(in.data() + off, ld, batch, cs.L, cs.C, w.data(), bias.data(), cs.K,
                         out.data(), reset.data());
    cpu::conv1d_silu_fwd(in.data() + off, ld, batch, cs.L, cs.C, w.data(), bias.data(), cs.K,
                         plain.data());
    const V ref = conv_naive_resets(in, ld, off, batch, cs.L, cs.C, w, bias, cs.K, reset);
    const double e = rel_err(out, ref);
    EXPECT_LT(e, 1e-14) << "L " << cs.L << " C " << cs.C << " K " << cs.K;
    if (cs.K > 1) EXPECT_GT(rel_err(plain, ref), 1e-3) << "the reset flags changed nothing";
    std::printf("    [cmp] conv1d fwd, resets, K%ld         rel err %.3e\n", (long)cs.K, e);
  }
}

TEST(CpuOps, Conv1dResetsGradient) {
  const int64_t batch = 3, L = 13, C = 5, K = 4, rows = batch * L;
  const int64_t ld_in = C + 5, off_in = 3, ld_din = C + 7, off_din = 2;
  const auto reset = doc_flags(batch, L, kConvStarts);
  V in = randn<double>(rows * ld_in, 70);
  V w = randn<double>(C * K, 71, 0.5), bias = randn<double>(C, 72, 0.3);
  const V wo = randn<double>(rows * C, 73);
  auto loss = [&] {
    return dot(wo, conv_naive_resets(in, ld_in, off_in, batch, L, C, w, bias, K, reset));
  };
  V din(rows * ld_din, 0.0), dw(C * K, 0.0), db(C, 0.0);
  cpu::conv1d_silu_bwd(in.data() + off_in, ld_in, batch, L, C, w.data(), bias.data(), K,
                       wo.data(), din.data() + off_din, ld_din, dw.data(), db.data(),
                       reset.data());
  V din_wide(rows * ld_in, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) din_wide[r * ld_in + off_in + c] = din[r * ld_din + off_din + c];
  check_fd("conv1d din, resets", in, loss, din_wide);
  check_fd("conv1d dw, resets", w, loss, dw);
  check_fd("conv1d dbias, resets", bias, loss, db);
}

TEST(CpuOps, Conv1dResetsEqualDocumentsRunOneByOne) {
  // Each document convolved as its own sequence (no flags), outputs and gradients, in float.
  const int64_t batch = 3, L = 13, C = 6, K = 4, rows = batch * L;
  const auto reset = doc_flags(batch, L, kConvStarts);
  const auto in = cast<float>(randn<double>(rows * C, 80));
  const auto w = cast<float>(randn<double>(C * K, 81, 0.5));
  const auto bias = cast<float>(randn<double>(C, 82, 0.3));
  const auto wo = cast<float>(randn<double>(rows * C, 83));
  std::vector<float> out(rows * C), din(rows * C), dw(C * K, 0.f), db(C, 0.f);
  cpu::conv1d_silu_fwd(in.data(), C, batch, L, C, w.data(), bias.data(), K, out.data(),
                       reset.data());
  cpu::conv1d_silu_bwd(in.data(), C, batch, L, C, w.data(), bias.data(), K, wo.data(),
                       din.data(), C, dw.data(), db.data(), reset.data());
  std::vector<float> out1(rows * C), din1(rows * C), dw1(C * K, 0.f), db1(C, 0.f);
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> cuts = {0};
    for (int64_t t = 1; t < L; ++t)
      if (reset[b * L + t]) cuts.push_back(t);
    cuts.push_back(L);
    for (size_t k = 0; k + 1 < cuts.size(); ++k) {
      const int64_t r0 = b * L + cuts[k], n = cuts[k + 1] - cuts[k];
      cpu::conv1d_silu_fwd(in.data() + r0 * C, C, 1, n, C, w.data(), bias.data(), K,
                           out1.data() + r0 * C);
      cpu::conv1d_silu_bwd(in.data() + r0 * C, C, 1, n, C, w.data(), bias.data(), K,
                           wo.data() + r0 * C, din1.data() + r0 * C, C, dw1.data(), db1.data());
    }
  }
  check_close("conv1d resets vs documents: out", rel_err(out, out1), 1e-6);
  check_close("conv1d resets vs documents: din", rel_err(din, din1), 1e-6);
  check_close("conv1d resets vs documents: dw", rel_err(dw, dw1), 1e-5);
  check_close("conv1d resets vs documents: dbias", rel_err(db, db1), 1e-5);
}

TEST(CpuOps, Conv1dResetFlagsOfZerosChangeNothing) {
  const int64_t batch = 2, L = 9, C = 6, K = 4, rows = batch * L;
  const auto in = cast<float>(randn<double>(rows * C, 90));
  const auto w = cast<float>(randn<double>(C * K, 91, 0.5));
  const auto bias = cast<float>(randn<double>(C, 92, 0.3));
  const auto wo = cast<float>(randn<double>(rows * C, 93));
  const std::vector<int32_t> zeros(rows, 0);
  std::vector<float> o0(rows * C), o1(rows * C), d0(rows * C), d1(rows * C);
  std::vector<float> w0(C * K, 0.f), w1(C * K, 0.f), b0(C, 0.f), b1(C, 0.f);
  cpu::conv1d_silu_fwd(in.data(), C, batch, L, C, w.data(), bias.data(), K, o0.data());
  cpu::conv1d_silu_fwd(in.data(), C, batch, L, C, w.data(), bias.data(), K, o1.data(),
                       zeros.data());
  cpu::conv1d_silu_bwd(in.data(), C, batch, L, C, w.data(), bias.data(), K, wo.data(), d0.data(),
                       C, w0.data(), b0.data());
  cpu::conv1d_silu_bwd(in.data(), C, batch, L, C, w.data(), bias.data(), K, wo.data(), d1.data(),
                       C, w1.data(), b1.data(), zeros.data());
  EXPECT_EQ(o0, o1);
  EXPECT_EQ(d0, d1);
  EXPECT_EQ(w0, w1);
  EXPECT_EQ(b0, b1);
}

// --------------------------------------------------------------------------- gated rmsnorm

TEST(CpuOps, GatedRmsNormForwardAndGradient) {
  const int64_t ntok = 5, dim = 12;
  const double eps = 1e-5;
  const int64_t ld_z = 2 * dim + 3, off_z = dim + 1;  // z is a column block of zxbcdt
  const int64_t ld_dz = dim + 5, off_dz = 3;
  for (int64_t gs : {int64_t(4), dim}) {
    const int64_t ng = dim / gs;
    std::printf("  group_size %ld (%ld groups)\n", (long)gs, (long)ng);
    V y = randn<double>(ntok * dim, 60), z = randn<double>(ntok * ld_z, 61, 1.5);
    V weight = randn<double>(dim, 62, 0.5);
    for (auto& v : weight) v += 1.0;
    const V wo = randn<double>(ntok * dim, 63);

    V out(ntok * dim), rstd(ntok * ng);
    cpu::gated_rmsnorm_fwd(y.data(), z.data() + off_z, ld_z, weight.data(), ntok, dim, gs, eps,
                           out.data(), rstd.data());
    V out_ref(ntok * dim), rstd_ref(ntok * ng);
    for (int64_t t = 0; t < ntok; ++t)
      for (int64_t j = 0; j < ng; ++j) {
        double ms = 0;
        for (int64_t c = j * gs; c < (j + 1) * gs; ++c) {
          const double g = y[t * dim + c] * silu(z[t * ld_z + off_z + c]);
          ms += g * g / gs;
        }
        rstd_ref[t * ng + j] = 1.0 / std::sqrt(ms + eps);
        for (int64_t c = j * gs; c < (j + 1) * gs; ++c)
          out_ref[t * dim + c] =
              y[t * dim + c] * silu(z[t * ld_z + off_z + c]) * rstd_ref[t * ng + j] * weight[c];
      }
    check_close("gated norm out", rel_err(out, out_ref), 1e-13);
    check_close("gated norm rstd", rel_err(rstd, rstd_ref), 1e-13);

    auto loss = [&] {
      V o(ntok * dim), s(ntok * ng);
      cpu::gated_rmsnorm_fwd(y.data(), z.data() + off_z, ld_z, weight.data(), ntok, dim, gs, eps,
                             o.data(), s.data());
      return dot(wo, o);
    };
    const V sentinel = randn<double>(ntok * ld_dz, 64);
    const V dw0 = randn<double>(dim, 65);
    V dy = randn<double>(ntok * dim, 66), dz = sentinel, dw = dw0;
    cpu::gated_rmsnorm_bwd(wo.data(), y.data(), z.data() + off_z, ld_z, weight.data(),
                           rstd.data(), ntok, dim, gs, dy.data(), dz.data() + off_dz, ld_dz,
                           dw.data());
    const V dy1 = dy, dz1 = dz, dw1 = dw;
    for (int64_t t = 0; t < ntok; ++t)
      for (int64_t j = 0; j < ld_dz; ++j) {
        if (j < off_dz || j >= off_dz + dim) {
          ASSERT_EQ(dz1[t * ld_dz + j], sentinel[t * ld_dz + j]) << "dz column " << j;
        }
      }
    V dz_wide(ntok * ld_z, 0.0);
    for (int64_t t = 0; t < ntok; ++t)
      for (int64_t c = 0; c < dim; ++c) dz_wide[t * ld_z + off_z + c] = dz1[t * ld_dz + off_dz + c];
    check_fd("gated norm dy", y, loss, dy1);
    check_fd("gated norm dz (strided)", z, loss, dz_wide);
    check_fd("gated norm dweight", weight, loss, sub(dw1, dw0));
    cpu::gated_rmsnorm_bwd(wo.data(), y.data(), z.data() + off_z, ld_z, weight.data(),
                           rstd.data(), ntok, dim, gs, dy.data(), dz.data() + off_dz, ld_dz,
                           dw.data());
    EXPECT_EQ(dy, dy1) << "dy must be overwritten";
    EXPECT_EQ(dz, dz1) << "dz must be overwritten";
    expect_doubled("gated norm dweight", dw0, dw1, dw);
  }
}

// --------------------------------------------------------------------------- cross-entropy

struct CeRef {
  double loss = 0, count = 0, hits = 0;
};

// Full [ntok, vocab] logits, computed directly.
V full_logits(const V& hidden, const V& weight, int64_t ntok, int64_t dim, int64_t vocab) {
  V lg(ntok * vocab);
  for (int64_t t = 0; t < ntok; ++t)
    for (int64_t v = 0; v < vocab; ++v) {
      double s = 0;
      for (int64_t k = 0; k < dim; ++k) s += hidden[t * dim + k] * weight[v * dim + k];
      lg[t * vocab + v] = s;
    }
  return lg;
}

CeRef ce_reference(const V& lg, const std::vector<int32_t>& tgt, int64_t vocab) {
  CeRef r;
  for (size_t t = 0; t < tgt.size(); ++t) {
    if (tgt[t] < 0) continue;
    const double* l = lg.data() + t * vocab;
    const int64_t am = std::max_element(l, l + vocab) - l;  // first maximum
    double se = 0;
    for (int64_t v = 0; v < vocab; ++v) se += std::exp(l[v] - l[am]);
    r.loss += l[am] + std::log(se) - l[tgt[t]];
    r.count += 1;
    r.hits += am == tgt[t];
  }
  return r;
}

TEST(CpuOps, LmHeadCrossEntropy) {
  // ntok = 140: two full 64-row blocks + 12; rows 64..127 all ignored (a block with nothing to
  // score). vocab = 67 is not a multiple of the block size.
  const int64_t ntok = 140, dim = 8, vocab = 67;
  const double gscale = 0.7;
  V hidden = randn<double>(ntok * dim, 70), weight = randn<double>(vocab * dim, 71);
  const V lg = full_logits(hidden, weight, ntok, dim, vocab);
  std::vector<int32_t> tgt(ntok);
  for (int64_t t = 0; t < ntok; ++t) {
    const double* l = lg.data() + t * vocab;
    const int32_t am = static_cast<int32_t>(std::max_element(l, l + vocab) - l);
    if (t >= 64 && t < 128) tgt[t] = -1;
    else if (t % 5 == 1) tgt[t] = -1;
    else if (t % 3 == 0) tgt[t] = am;                      // a hit
    else tgt[t] = static_cast<int32_t>((t * 13 + 5) % vocab);
  }
  const CeRef ref = ce_reference(lg, tgt, vocab);
  ASSERT_GT(ref.hits, 5);
  ASSERT_LT(ref.hits, ref.count);

  // Stats, eval mode (no gradients), accumulating into non-zero stats.
  double st[3] = {1.5, 2.0, 3.0};
  cpu::lm_head_ce<double>(hidden.data(), weight.data(), tgt.data(), ntok, dim, vocab, gscale, st,
                          nullptr, nullptr);
  check_close("CE loss sum vs full logits", std::fabs(st[0] - 1.5 - ref.loss) / ref.loss, 1e-13);
  EXPECT_EQ(st[1] - 2.0, ref.count);
  EXPECT_EQ(st[2] - 3.0, ref.hits);
  std::printf("    CE counted %g tokens of %ld, %g argmax hits\n", ref.count, (long)ntok, ref.hits);

  auto loss = [&] {
    double s[3] = {0, 0, 0};
    cpu::lm_head_ce<double>(hidden.data(), weight.data(), tgt.data(), ntok, dim, vocab, gscale,
                            s, nullptr, nullptr);
    return gscale * s[0];
  };
  const V dw0 = randn<double>(vocab * dim, 72);
  V dh = randn<double>(ntok * dim, 73), dw = dw0;  // dh garbage: must be overwritten
  double st2[3] = {0, 0, 0};
  cpu::lm_head_ce(hidden.data(), weight.data(), tgt.data(), ntok, dim, vocab, gscale, st2,
                  dh.data(), dw.data());
  EXPECT_NEAR(st2[0], ref.loss, 1e-12 * ref.loss);  // same stats with gradients on
  EXPECT_EQ(st2[1], ref.count);
  EXPECT_EQ(st2[2], ref.hits);
  const V dh1 = dh, dw1 = dw;
  for (int64_t t = 0; t < ntok; ++t) {
    if (tgt[t] < 0) {
      for (int64_t k = 0; k < dim; ++k) ASSERT_EQ(dh1[t * dim + k], 0.0) << "ignored row " << t;
    }
  }
  check_fd("CE dhidden", hidden, loss, dh1);
  check_fd("CE dweight", weight, loss, sub(dw1, dw0));
  cpu::lm_head_ce(hidden.data(), weight.data(), tgt.data(), ntok, dim, vocab, gscale, st2,
                  dh.data(), dw.data());
  EXPECT_EQ(dh, dh1) << "dhidden must be overwritten";
  expect_doubled("CE dweight", dw0, dw1, dw);
  EXPECT_NEAR(st2[0], 2 * ref.loss, 1e-12 * ref.loss);
  EXPECT_EQ(st2[1], 2 * ref.count);
  // dhidden given, dweight null: dhidden unchanged.
  V dh_only(ntok * dim, 5.0);
  double st3[3] = {0, 0, 0};
  cpu::lm_head_ce<double>(hidden.data(), weight.data(), tgt.data(), ntok, dim, vocab, gscale,
                          st3, dh_only.data(), nullptr);
  EXPECT_LT(rel_err(dh_only, dh1), 1e-15);
}

TEST(CpuOps, LmHeadCrossEntropyLargeLogitsStable) {
  // Logits of size ~1e3 would overflow a naive exp; the stable form must stay finite and exact.
  const int64_t ntok = 3, dim = 2, vocab = 5;
  const V hidden = {300, 0, 0, 300, 200, -200};
  const V weight = {3, 0, 0, 3, 1, 1, -3, 0, 0, -3};
  const std::vector<int32_t> tgt = {0, 2, 3};
  double st[3] = {0, 0, 0};
  V dh(ntok * dim), dw(vocab * dim, 0.0);
  cpu::lm_head_ce(hidden.data(), weight.data(), tgt.data(), ntok, dim, vocab, 1.0, st, dh.data(),
                  dw.data());
  const CeRef ref = ce_reference(full_logits(hidden, weight, ntok, dim, vocab), tgt, vocab);
  ASSERT_TRUE(std::isfinite(st[0]));
  for (double v : dh) ASSERT_TRUE(std::isfinite(v));
  EXPECT_NEAR(st[0], ref.loss, 1e-12 * ref.loss);
  EXPECT_EQ(st[2], 1);  // token 0: logits (900, 0, 300, -900, 0) -> argmax 0 == target
}

// ------------------------------------------------------------------------------- optimizer

TEST(CpuOps, SumSquares) {
  const int64_t n = 100003;  // several blocks, not a multiple of any block size
  const V x = randn<double>(n, 80);
  double ref = 0;
  for (double v : x) ref += v * v;
  check_close("sum_squares double", std::fabs(cpu::sum_squares(x.data(), n) - ref) / ref, 1e-13);
  const std::vector<float> xf = cast<float>(x);
  double reff = 0;
  for (float v : xf) reff += double(v) * double(v);
  check_close("sum_squares float", std::fabs(cpu::sum_squares(xf.data(), n) - reff) / reff,
              1e-13);
  EXPECT_EQ(cpu::sum_squares(x.data(), 0), 0.0);
  // Independent of the thread count, bit for bit.
  const int nt = omp_get_max_threads();
  omp_set_num_threads(1);
  const double s1 = cpu::sum_squares(x.data(), n);
  omp_set_num_threads(2);
  const double s2 = cpu::sum_squares(x.data(), n);
  omp_set_num_threads(nt);
  EXPECT_EQ(s1, s2);
}

TEST(CpuOps, AdamWHandComputedScalar) {
  // p=1, lr=0.01, wd=0.1, betas (0.9, 0.95), eps 1e-8, grad_scale 0.5; grads 2 then -4.
  // Step 1: g'=1; p=1*(1-0.001)=0.999; m=0.1; v=0.05; mhat=1, vhat=1;
  //         p = 0.999 - 0.01*1/(1+1e-8) = 0.98900000009999999990...
  // Step 2: g'=-2; p=0.9890000001*0.999; m=0.09-0.2=-0.11; v=0.0475+0.2=0.2475;
  //         p -= 0.01/0.19 * (-0.11) / (sqrt(0.2475)/sqrt(0.0975) + 1e-8)
  //         = 0.99164473958186631127... (40-digit decimal arithmetic)
  AdamWHyper h;
  h.lr = 0.01;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.grad_scale = 0.5;
  double p = 1, m = 0, v = 0, g = 2;
  h.step = 1;
  cpu::adamw_step(&p, &g, &m, &v, 1, 0.1, h);
  EXPECT_NEAR(p, 0.98900000009999999990, 1e-15);
  EXPECT_NEAR(m, 0.1, 1e-15);
  EXPECT_NEAR(v, 0.05, 1e-15);
  g = -4;
  h.step = 2;
  cpu::adamw_step(&p, &g, &m, &v, 1, 0.1, h);
  EXPECT_NEAR(p, 0.99164473958186631127, 1e-15);
  EXPECT_NEAR(m, -0.11, 1e-15);
  EXPECT_NEAR(v, 0.2475, 1e-15);
}

// torch.optim.AdamW (single-tensor path), written out:
//   param.mul_(1 - lr*wd); exp_avg.lerp_(grad, 1-beta1);
//   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2);
//   step_size = lr / (1 - beta1**step); denom = exp_avg_sq.sqrt() / sqrt(1 - beta2**step) + eps
//   param.addcdiv_(exp_avg, denom, value=-step_size)
void torch_adamw(V& p, const V& grad, V& m, V& v, double lr, double b1, double b2, double eps,
                 double wd, int step, double grad_scale) {
  for (size_t i = 0; i < p.size(); ++i) {
    const double g = grad[i] * grad_scale;
    p[i] *= 1 - lr * wd;
    m[i] += (g - m[i]) * (1 - b1);
    v[i] = v[i] * b2 + (1 - b2) * g * g;
    const double step_size = lr / (1 - std::pow(b1, step));
    const double denom = std::sqrt(v[i]) / std::sqrt(1 - std::pow(b2, step)) + eps;
    p[i] += -step_size * (m[i] / denom);
  }
}

template <class T>
void adamw_two_steps(double tol) {
  const int64_t n = 37;
  const double lr = 3e-3, wd = 0.05, gs = 0.25;
  V p = randn<double>(n, 90), m(n, 0.0), v(n, 0.0);
  const V g1 = randn<double>(n, 91, 2.0), g2 = randn<double>(n, 92, 2.0);
  std::vector<T> pt = cast<T>(p), mt(n, T(0)), vt(n, T(0));
  p = V(pt.begin(), pt.end());
  AdamWHyper h;
  h.lr = lr;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.grad_scale = gs;
  int step = 1;
  for (const V* g : {&g1, &g2}) {
    const std::vector<T> gt = cast<T>(*g);
    h.step = step;
    cpu::adamw_step(pt.data(), gt.data(), mt.data(), vt.data(), n, wd, h);
    torch_adamw(p, V(gt.begin(), gt.end()), m, v, lr, 0.9, 0.95, 1e-8, wd, step, gs);
    ++step;
  }
  check_close(sizeof(T) == 4 ? "adamw 2 steps param (float)" : "adamw 2 steps param (double)",
              rel_err(pt, p), tol);
  EXPECT_LT(rel_err(mt, m), tol);
  EXPECT_LT(rel_err(vt, v), tol);
}

TEST(CpuOps, AdamWTwoStepsVsTorchFormula) {
  adamw_two_steps<double>(1e-15);
  adamw_two_steps<float>(1e-6);
}

// ------------------------------------------------------------- float instantiations, threads

// Runs every op (forward + backward) in T on inputs given in double; returns all outputs.
template <class T>
std::vector<V> run_all_ops(const std::vector<V>& in, int64_t ntok, int64_t dim, int64_t vocab,
                           int64_t C, int64_t K, int64_t seqlen, int64_t gs) {
  std::vector<V> res;
  auto put = [&](const std::vector<T>& x) { res.emplace_back(x.begin(), x.end()); };
  const std::vector<T> x = cast<T>(in[0]), r = cast<T>(in[1]), w = cast<T>(in[2]);
  const std::vector<T> dout = cast<T>(in[3]), emb = cast<T>(in[4]), wc = cast<T>(in[5]);
  const std::vector<T> bias = cast<T>(in[6]), wide = cast<T>(in[7]);
  std::vector<int32_t> tok(ntok);
  for (int64_t t = 0; t < ntok; ++t) tok[t] = (t % 7 == 3) ? -1 : static_cast<int32_t>((t * 31) % vocab);
  const int64_t ld = 2 * dim;  // wide: [ntok, 2*dim], slice = second half
  {  // embedding
    std::vector<int32_t> etok(tok);
    for (auto& e : etok) e = std::max(e, 0);
    std::vector<T> out(ntok * dim), dw(vocab * dim, T(0));
    cpu::embedding_fwd(etok.data(), ntok, emb.data(), vocab, dim, out.data());
    cpu::embedding_bwd(etok.data(), ntok, dout.data(), vocab, dim, dw.data());
    put(out);
    put(dw);
  }
  {  // rmsnorm
    std::vector<T> ro(ntok * dim), y(ntok * dim), s(ntok), dres(ntok * dim), dw(dim, T(0));
    cpu::add_rmsnorm_fwd(x.data(), r.data(), w.data(), ntok, dim, 1e-5, ro.data(), y.data(),
                         s.data());
    cpu::add_rmsnorm_bwd(dout.data(), r.data(), ro.data(), w.data(), s.data(), ntok, dim,
                         dres.data(), dw.data());
    put(y);
    put(dres);
    put(dw);
  }
  {  // linear: [ntok, dim] @ [dim, dim]^T using emb's first rows as weight
    std::vector<T> y(ntok * dim), dx(ntok * dim), dw(dim * dim, T(0));
    cpu::linear_fwd(x.data(), emb.data(), ntok, dim, dim, y.data());
    cpu::linear_bwd(x.data(), emb.data(), dout.data(), ntok, dim, dim, dx.data(), dw.data());
    put(y);
    put(dx);
    put(dw);
  }
  {  // conv1d on C columns of the wide tensor
    const int64_t batch = ntok / seqlen;
    std::vector<T> out(ntok * C), dout_c(ntok * C), din(ntok * ld, T(0)), dw(C * K, T(0)),
        db(C, T(0));
    for (int64_t i = 0; i < ntok; ++i)
      for (int64_t c = 0; c < C; ++c) dout_c[i * C + c] = dout[(i * C + c) % (ntok * dim)];
    cpu::conv1d_silu_fwd(wide.data() + 1, ld, batch, seqlen, C, wc.data(), bias.data(), K,
                         out.data());
    cpu::conv1d_silu_bwd(wide.data() + 1, ld, batch, seqlen, C, wc.data(), bias.data(), K,
                         dout_c.data(), din.data() + 2, ld, dw.data(), db.data());
    put(out);
    put(din);
    put(dw);
    put(db);
  }
  {  // gated rmsnorm with z = second half of the wide tensor
    const int64_t ng = dim / gs;
    std::vector<T> out(ntok * dim), s(ntok * ng), dy(ntok * dim), dz(ntok * ld, T(0)),
        dw(dim, T(0));
    cpu::gated_rmsnorm_fwd(x.data(), wide.data() + dim, ld, w.data(), ntok, dim, gs, 1e-5,
                           out.data(), s.data());
    cpu::gated_rmsnorm_bwd(dout.data(), x.data(), wide.data() + dim, ld, w.data(), s.data(), ntok,
                           dim, gs, dy.data(), dz.data() + dim, ld, dw.data());
    put(out);
    put(dy);
    put(dz);
    put(dw);
  }
  {  // cross-entropy (tied weight = emb)
    double st[3] = {0, 0, 0};
    std::vector<T> dh(ntok * dim), dw(vocab * dim, T(0));
    cpu::lm_head_ce(x.data(), emb.data(), tok.data(), ntok, dim, vocab, 0.5, st, dh.data(),
                    dw.data());
    res.push_back(V(st, st + 3));
    put(dh);
    put(dw);
  }
  return res;
}

std::vector<V> all_ops_inputs(int64_t ntok, int64_t dim, int64_t vocab, int64_t C, int64_t K) {
  V w = randn<double>(dim, 102, 0.3);
  for (auto& v : w) v += 1.0;
  return {randn<double>(ntok * dim, 100), randn<double>(ntok * dim, 101), w,
          randn<double>(ntok * dim, 103), randn<double>(std::max(vocab, dim) * dim, 104, 0.3),
          randn<double>(C * K, 105, 0.5), randn<double>(C, 106, 0.3),
          randn<double>(ntok * 2 * dim, 107)};
}

TEST(CpuOps, FloatMatchesDouble) {
  const int64_t ntok = 70, dim = 48, vocab = 130, C = 40, K = 4, seqlen = 35, gs = 16;
  const auto in = all_ops_inputs(ntok, dim, vocab, C, K);
  const auto rd = run_all_ops<double>(in, ntok, dim, vocab, C, K, seqlen, gs);
  const auto rf = run_all_ops<float>(in, ntok, dim, vocab, C, K, seqlen, gs);
  ASSERT_EQ(rd.size(), rf.size());
  double worst = 0;
  for (size_t i = 0; i < rd.size(); ++i) {
    const double e = rel_err(rf[i], rd[i]);
    EXPECT_LT(e, 2e-5) << "output #" << i;
    worst = std::max(worst, e);
  }
  check_close("float vs double, worst over all ops", worst, 2e-5);
}

TEST(CpuOps, ThreadCountIndependent) {
  // Sizes large enough that every op takes its OpenMP path; 1 and 2 threads must agree bit for
  // bit (parameter-gradient reductions run over column blocks, tokens in order).
  const int64_t ntok = 128, dim = 512, vocab = 300, C = 384, K = 4, seqlen = 64, gs = 128;
  const auto in = all_ops_inputs(ntok, dim, vocab, C, K);
  const int nt = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto r1 = run_all_ops<float>(in, ntok, dim, vocab, C, K, seqlen, gs);
  omp_set_num_threads(2);
  const auto r2 = run_all_ops<float>(in, ntok, dim, vocab, C, K, seqlen, gs);
  const auto r3 = run_all_ops<float>(in, ntok, dim, vocab, C, K, seqlen, gs);
  omp_set_num_threads(nt);
  ASSERT_EQ(r1.size(), r2.size());
  for (size_t i = 0; i < r1.size(); ++i) {
    EXPECT_EQ(r1[i], r2[i]) << "output #" << i << " differs between 1 and 2 threads";
    EXPECT_EQ(r2[i], r3[i]) << "output #" << i << " differs run to run";
  }
}

}  // namespace
