// Tensor parallelism at the op level, CPU backend, f32 and f64: the vocabulary-sharded
// embedding and LM head + cross-entropy, and the gated RMSNorm whose groups span ranks, run on
// R = 2 and 4 simulated ranks (tp_sim.h: one thread per rank, the hooks meet at a barrier), equal
// the unsharded ops. Embedding: the sum of the ranks' outputs and each rank's dweight rows, bit
// for bit. LM head: every rank's stats (loss to 1e-12 relative in f64, 1e-5 in f32; counts and
// argmax hits exactly, also the ties between rows of different ranks, where the first maximum in
// vocabulary order wins), the sum of the dhidden parts and each rank's dweight rows; the
// unsharded loss and hits are also checked against a direct computation from the full logits.
// The data of the LM head tests are multiples of 1/8, so every logit is exact in f32 whatever the
// GEMM's order, and ties are real ties. Gated norm: a group's columns split over the ranks
// equals the unsharded norm with groups R times as wide: out, rstd, dy, dz, dweight.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "testutil.h"
#include "tp_cases.h"
#include "tp_sim.h"

using namespace ssd;
using ssdtest::SimGroup;
using Vd = std::vector<double>;

namespace {

Tensor up(Backend& be, const Vd& v, const Shape& s) {
  Tensor f = be.alloc(s, DType::F64);
  be.upload(f, v.data());
  Tensor t = be.alloc(s, be.compute_dtype());
  be.convert(f, t);
  return t;
}
Tensor up_i32(Backend& be, const std::vector<int32_t>& v) {
  Tensor t = be.alloc({static_cast<int64_t>(v.size())}, DType::I32);
  be.upload(t, v.data());
  return t;
}
Vd down(Backend& be, const Tensor& t) {
  Tensor f = be.alloc(t.shape, DType::F64);
  be.convert(t, f);
  Vd v(t.numel());
  be.download(v.data(), f);
  return v;
}
// Rows [r0, r0 + n) of a row-major [*, w] array.
Vd rows_of(const Vd& a, int64_t w, int64_t r0, int64_t n) {
  return Vd(a.begin() + r0 * w, a.begin() + (r0 + n) * w);
}
struct Dt {
  DType dtype;
  double tol;  // sharded vs unsharded, relative
};
const Dt kDtypes[] = {{DType::F64, 1e-12}, {DType::F32, 1e-5}};

// ------------------------------------------------------------------------------ embedding

TEST(TpOps, EmbeddingShards) {
  const int64_t V = 37, D = 20, T = 150;
  std::vector<int32_t> tok(T);
  for (int64_t t = 0; t < T; ++t) tok[t] = static_cast<int32_t>((t * 13 + 5) % V);
  for (int64_t t = 0; t < T; t += 4) tok[t] = 36;  // a frequent token, in the last shard
  tok[0] = 0;
  const Vd w = ssdtest::randn<double>(V * D, 1), dout = ssdtest::randn<double>(T * D, 2);
  const Vd dw0 = ssdtest::randn<double>(V * D, 3);
  for (const Dt& dt : kDtypes)
    for (int R : {2, 4}) {
      auto be = make_cpu_backend(dt.dtype);
      Tensor tk = up_i32(*be, tok);
      Tensor wt = up(*be, w, {V, D}), out = be->alloc({T, D}, dt.dtype);
      Tensor g = up(*be, dout, {T, D}), dw = up(*be, dw0, {V, D});
      be->embedding_fwd(tk, wt, out);
      be->embedding_bwd(tk, g, dw);
      const Vd out_ref = down(*be, out), dw_ref = down(*be, dw);

      Vd sum(T * D, 0.0);
      for (int r = 0; r < R; ++r) {
        const auto [b, n] = ssdtest::shard_rows(V, R, r);
        VocabShard sh{b, V, R, nullptr};
        Tensor wr = up(*be, rows_of(w, D, b, n), {n, D}), o = be->alloc({T, D}, dt.dtype);
        Tensor dwr = up(*be, rows_of(dw0, D, b, n), {n, D});
        be->embedding_fwd(tk, wr, o, &sh);
        be->embedding_bwd(tk, g, dwr, &sh);
        const Vd ov = down(*be, o);
        for (int64_t t = 0; t < T; ++t) {
          const bool mine = tok[t] >= b && tok[t] < b + n;
          for (int64_t c = 0; c < D; ++c) {
            if (!mine) EXPECT_EQ(ov[t * D + c], 0.0) << "rank " << r << " token " << t;
            sum[t * D + c] += ov[t * D + c];
          }
        }
        EXPECT_EQ(down(*be, dwr), rows_of(dw_ref, D, b, n)) << "dweight rows of rank " << r;
      }
      EXPECT_EQ(sum, out_ref) << "sum over " << R << " ranks, " << dtype_name(dt.dtype);

      // Tokens are checked against the whole vocabulary, not the shard.
      VocabShard sh{0, V, R, nullptr};
      const auto [b0, n0] = ssdtest::shard_rows(V, R, 0);
      Tensor wr = up(*be, rows_of(w, D, b0, n0), {n0, D});
      for (int32_t bad : {int32_t(V), int32_t(-1)}) {
        std::vector<int32_t> tb = tok;
        tb[7] = bad;
        Tensor tkb = up_i32(*be, tb);
        try {
          be->embedding_fwd(tkb, wr, out, &sh);
          ADD_FAILURE() << "token " << bad << " accepted";
        } catch (const Error& e) {
          const std::string msg = e.what();
          EXPECT_NE(msg.find("token " + std::to_string(bad) + " at position 7"),
                    std::string::npos)
              << msg;
        }
      }
    }
}

// ------------------------------------------------------------------------------ LM head

// Vocabulary 203 (uneven shards): rows 3/150 tie across ranks at R = 2 and 4, 10/60 at R = 4,
// 100/101 within one rank.
using ssdtest::CeProblem;
CeProblem make_ce() { return ssdtest::make_ce(203, {{3, 150}, {10, 60}, {100, 101}}); }

TEST(TpOps, LmHeadShards) {
  const CeProblem p = make_ce();
  const int64_t T = p.T, Dm = p.Dm, V = p.V;
  const Vd stats0{1.5, 2.0, 3.0};
  const double gs = 0.5;
  const auto [loss_direct, hits_direct] = ssdtest::direct_ce(p);
  int64_t counted = 0;
  for (int32_t x : p.tg) counted += x >= 0;
  for (const Dt& dt : kDtypes)
    for (bool train : {true, false}) {
      auto be = make_cpu_backend(dt.dtype);
      Tensor ht = up(*be, p.h, {T, Dm}), wt = up(*be, p.w, {V, Dm}), tt = up_i32(*be, p.tg);
      Tensor st = be->alloc({3}, DType::F64);
      be->upload(st, stats0.data());
      Tensor dh = be->alloc({T, Dm}, dt.dtype), dw = up(*be, p.dw0, {V, Dm});
      be->lm_head_ce(ht, wt, tt, gs, st, train ? &dh : nullptr, train ? &dw : nullptr);
      Vd s_ref(3);
      be->download(s_ref.data(), st);
      const Vd dh_ref = train ? down(*be, dh) : Vd(), dw_ref = down(*be, dw);
      EXPECT_NEAR(s_ref[0] - stats0[0], loss_direct, dt.tol * loss_direct) << "unsharded loss";
      EXPECT_EQ(s_ref[1] - stats0[1], static_cast<double>(counted));
      EXPECT_EQ(s_ref[2] - stats0[2], hits_direct) << "unsharded hits";
      EXPECT_GT(hits_direct, 15) << "the test data should give argmax hits";

      for (int R : {2, 4}) {
        const std::string name = std::string(dtype_name(dt.dtype)) + " R" + std::to_string(R) +
                                 (train ? " train" : " eval");
        SimGroup group(R);
        std::vector<Vd> stats(R), dhs(R), dws(R);
        group.run([&](int r) {
          auto rb = make_cpu_backend(dt.dtype);
          const auto [b, n] = ssdtest::shard_rows(V, R, r);
          VocabShard sh{b, V, R, group.all_gather(r, *rb)};
          Tensor h = up(*rb, p.h, {T, Dm}), w = up(*rb, rows_of(p.w, Dm, b, n), {n, Dm});
          Tensor tg = up_i32(*rb, p.tg), s = rb->alloc({3}, DType::F64);
          rb->upload(s, stats0.data());
          Tensor dhr = rb->alloc({T, Dm}, dt.dtype), dwr = up(*rb, rows_of(p.dw0, Dm, b, n), {n, Dm});
          rb->lm_head_ce(h, w, tg, gs, s, train ? &dhr : nullptr, train ? &dwr : nullptr, &sh);
          stats[r].resize(3);
          rb->download(stats[r].data(), s);
          if (train) dhs[r] = down(*rb, dhr);
          dws[r] = down(*rb, dwr);
        });
        for (int r = 0; r < R; ++r) {
          EXPECT_EQ(group.log()[r], group.log()[0]) << name << ": rank " << r << "'s all_gathers";
          const double e = std::fabs(stats[r][0] - s_ref[0]) / std::fabs(s_ref[0] - stats0[0]);
          std::printf("    [%s] rank %d loss rel err %.3e, counted %g, hits %g\n", name.c_str(),
                      r, e, stats[r][1] - stats0[1], stats[r][2] - stats0[2]);
          EXPECT_LE(e, dt.tol) << name << " rank " << r;
          EXPECT_EQ(stats[r][1], s_ref[1]) << name << " rank " << r;
          EXPECT_EQ(stats[r][2], s_ref[2]) << name << " rank " << r;
          const auto [b, n] = ssdtest::shard_rows(V, R, r);
          const double edw = ssdtest::rel_err(dws[r], rows_of(dw_ref, Dm, b, n));
          EXPECT_LE(edw, dt.tol) << name << " dweight rows of rank " << r;
        }
        EXPECT_FALSE(group.log()[0].empty()) << name << ": no all_gather";
        if (train) {
          Vd sum(T * Dm, 0.0);
          for (int r = 0; r < R; ++r)
            for (int64_t i = 0; i < T * Dm; ++i) sum[i] += dhs[r][i];
          const double e = ssdtest::rel_err(sum, dh_ref);
          std::printf("    [%s] sum of dhidden parts rel err %.3e\n", name.c_str(), e);
          EXPECT_LE(e, dt.tol) << name << " dhidden";
        }
      }
    }
}

// ------------------------------------------------------------------------------ gated norm

// Rank r holds columns [j*G*R + r*G, +G) of each full group j (G = group_size on a rank).
TEST(TpOps, GatedRmsNormSpans) {
  const int64_t T = 70, G = 24;
  const double eps = 1e-5;
  for (const Dt& dt : kDtypes)
    for (int R : {2, 4})
      for (int64_t ng : {1, 2}) {
        const std::string name = std::string(dtype_name(dt.dtype)) + " R" + std::to_string(R) +
                                 " groups " + std::to_string(ng);
        const int64_t Df = ng * G * R, D = ng * G;  // full width, a rank's width
        const int64_t ld_z = Df + 7, off_z = 3;     // z: a column slice of a wider tensor
        const Vd y = ssdtest::randn<double>(T * Df, 40), dout = ssdtest::randn<double>(T * Df, 43);
        const Vd z = ssdtest::randn<double>(T * ld_z, 41, 1.5);
        Vd w = ssdtest::randn<double>(Df, 42, 0.2);
        for (auto& v : w) v += 1.0;
        const Vd dw0 = ssdtest::randn<double>(Df, 45);
        auto col = [&](int r, int64_t c) {  // full column of rank r's local column c
          return (c / G) * G * R + r * G + c % G;
        };

        auto be = make_cpu_backend(dt.dtype);
        Tensor yt = up(*be, y, {T, Df}), zt = up(*be, z, {T, ld_z}), wt = up(*be, w, {Df});
        Tensor out = be->alloc({T, Df}, dt.dtype), rstd = be->alloc({T, ng}, dt.dtype);
        be->gated_rmsnorm_fwd(yt, cols(zt, off_z, Df), wt, G * R, eps, out, rstd);
        Tensor g = up(*be, dout, {T, Df}), dy = be->alloc({T, Df}, dt.dtype);
        Tensor dz = be->alloc({T, Df}, dt.dtype), dw = up(*be, dw0, {Df});
        ColSlice dzs = all_cols(dz);
        be->gated_rmsnorm_bwd(g, yt, cols(zt, off_z, Df), wt, G * R, rstd, dy, dzs, dw);
        const Vd out_f = down(*be, out), rstd_f = down(*be, rstd), dy_f = down(*be, dy),
                 dz_f = down(*be, dz), dw_f = down(*be, dw);

        SimGroup group(R);
        std::vector<std::vector<std::pair<std::string, double>>> errs(R);
        group.run([&](int r) {
          auto rb = make_cpu_backend(dt.dtype);
          // This rank's columns of every full input; z in a wider buffer at an offset.
          const int64_t ld_zl = D + 5, off_zl = 2, ld_dzl = D + 3, off_dzl = 1;
          Vd yl(T * D), dl(T * D), zl(T * ld_zl, 0.0), wl(D), dwl(D);
          for (int64_t t = 0; t < T; ++t)
            for (int64_t c = 0; c < D; ++c) {
              yl[t * D + c] = y[t * Df + col(r, c)];
              dl[t * D + c] = dout[t * Df + col(r, c)];
              zl[t * ld_zl + off_zl + c] = z[t * ld_z + off_z + col(r, c)];
            }
          for (int64_t c = 0; c < D; ++c) wl[c] = w[col(r, c)], dwl[c] = dw0[col(r, c)];
          NormSpan span{R, group.all_reduce(r, *rb)};
          Tensor yr = up(*rb, yl, {T, D}), zr = up(*rb, zl, {T, ld_zl}), wr = up(*rb, wl, {D});
          Tensor o = rb->alloc({T, D}, dt.dtype), rs = rb->alloc({T, ng}, dt.dtype);
          rb->gated_rmsnorm_fwd(yr, cols(zr, off_zl, D), wr, G, eps, o, rs, &span);
          Tensor gr = up(*rb, dl, {T, D}), dyr = rb->alloc({T, D}, dt.dtype);
          Tensor dzr = up(*rb, Vd(T * ld_dzl, 7.0), {T, ld_dzl}), dwr = up(*rb, dwl, {D});
          ColSlice dzl = cols(dzr, off_dzl, D);
          rb->gated_rmsnorm_bwd(gr, yr, cols(zr, off_zl, D), wr, G, rs, dyr, dzl, dwr, &span);
          const Vd ov = down(*rb, o), rv = down(*rb, rs), dyv = down(*rb, dyr),
                   dzv = down(*rb, dzr), dwv = down(*rb, dwr);
          Vd o_ref(T * D), dy_ref(T * D), dz_ref(T * D), dz_got(T * D), dw_ref(D);
          bool outside_ok = true;
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t c = 0; c < D; ++c) {
              o_ref[t * D + c] = out_f[t * Df + col(r, c)];
              dy_ref[t * D + c] = dy_f[t * Df + col(r, c)];
              dz_ref[t * D + c] = dz_f[t * Df + col(r, c)];
              dz_got[t * D + c] = dzv[t * ld_dzl + off_dzl + c];
            }
            for (int64_t c = 0; c < ld_dzl; ++c)
              if ((c < off_dzl || c >= off_dzl + D) && dzv[t * ld_dzl + c] != 7.0)
                outside_ok = false;
          }
          for (int64_t c = 0; c < D; ++c) dw_ref[c] = dw_f[col(r, c)];
          EXPECT_TRUE(outside_ok) << name << ": dz written outside its columns";
          errs[r] = {{"out", ssdtest::rel_err(ov, o_ref)},
                     {"rstd", ssdtest::rel_err(rv, rstd_f)},
                     {"dy", ssdtest::rel_err(dyv, dy_ref)},
                     {"dz", ssdtest::rel_err(dz_got, dz_ref)},
                     {"dweight", ssdtest::rel_err(dwv, dw_ref)}};
        });
        for (int r = 0; r < R; ++r) {
          EXPECT_EQ(group.log()[r], (std::vector<int64_t>{T * ng, T * ng}))
              << name << ": rank " << r << " all_reduce calls";
          for (const auto& [what, e] : errs[r]) {
            if (r == 0) std::printf("    [%s] %-8s rel err %.3e\n", name.c_str(), what.c_str(), e);
            EXPECT_LE(e, dt.tol) << name << " rank " << r << " " << what;
          }
        }
      }
}

}  // namespace
