// The CPU SSD reference: the chunked forward against the plain recurrence, and the chunked
// backward against finite differences of the recurrence; both also with reset flags (packed
// documents), and the op with flags against its documents run one by one without them.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <type_traits>
#include <vector>

#include "backend/cpu/cpu_ops.h"
#include "testutil.h"

namespace {

using ssd::SsdDims;
using ssdtest::rel_err;

// Inputs of one SSD call, dt embedded at column dt_off of rows of width ld_dt.
template <class T>
struct Inputs {
  SsdDims d;
  int64_t ld_dt = 0, dt_off = 0;
  std::vector<T> xBC, dt_rows, dt_bias, A_log, D, init;  // init empty: no initial state
  std::vector<int32_t> reset;                            // empty: no reset flags
  const T* dt() const { return dt_rows.data() + dt_off; }
  const T* init_ptr() const { return init.empty() ? nullptr : init.data(); }
  const int32_t* reset_ptr() const { return reset.empty() ? nullptr : reset.data(); }
  int64_t state_numel() const { return d.batch * d.nheads * d.headdim * d.dstate; }
};

// dt_bias is the inverse softplus of U(dt_lo, dt_hi): dt ~ softplus(N(0,1) + dt_bias).
Inputs<double> make_inputs(const SsdDims& d, uint64_t seed, double dt_lo, double dt_hi,
                           bool with_init, int64_t ld_dt = 0, int64_t dt_off = 0) {
  Inputs<double> in;
  in.d = d;
  in.ld_dt = ld_dt ? ld_dt : d.nheads;
  in.dt_off = dt_off;
  in.xBC = ssdtest::randn<double>(d.tokens() * d.conv_dim(), seed + 1);
  in.dt_rows = ssdtest::randn<double>(d.tokens() * in.ld_dt, seed + 2);
  in.dt_bias = ssdtest::uniform<double>(d.nheads, seed + 3, dt_lo, dt_hi);
  for (auto& v : in.dt_bias) v = std::log(std::expm1(v));
  in.A_log = ssdtest::uniform<double>(d.nheads, seed + 4, 1.0, 16.0);
  for (auto& v : in.A_log) v = std::log(v);
  in.D = ssdtest::randn<double>(d.nheads, seed + 5);
  if (with_init) in.init = ssdtest::randn<double>(in.state_numel(), seed + 6);
  return in;
}

template <class T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <class T>
Inputs<T> cast_inputs(const Inputs<double>& in) {
  return {in.d,           in.ld_dt,         in.dt_off,     cast<T>(in.xBC), cast<T>(in.dt_rows),
          cast<T>(in.dt_bias), cast<T>(in.A_log), cast<T>(in.D), cast<T>(in.init), in.reset};
}

template <class T>
std::vector<double> cast_to_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

struct Out {
  std::vector<double> y, final_state;
};

template <class T>
Out run_fwd(const Inputs<T>& in, bool naive) {
  const SsdDims& d = in.d;
  std::vector<T> y(d.tokens() * d.d_inner()), fs(in.state_numel());
  auto f = naive ? &ssd::cpu::ssd_naive_fwd<T> : &ssd::cpu::ssd_fwd<T>;
  f(d, in.xBC.data(), in.dt(), in.ld_dt, in.dt_bias.data(), in.A_log.data(), in.D.data(),
    in.init_ptr(), y.data(), fs.data(), in.reset_ptr());
  return {cast_to_double(y), cast_to_double(fs)};
}

template <class T>
struct Grads {
  int64_t ld_ddt = 0, ddt_off = 0;
  std::vector<T> dxBC, ddt_rows, d_dt_bias, dA_log, dD, d_init;
};

// Runs ssd_bwd with dy = wy and dfinal_state = ws (null when empty). Outputs that must be
// overwritten start as NaN; parameter gradients start at zero.
template <class T>
Grads<T> run_bwd(const Inputs<T>& in, const std::vector<T>& wy, const std::vector<T>& ws,
                 int64_t ld_ddt, int64_t ddt_off, bool want_d_init = true) {
  const SsdDims& d = in.d;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  Grads<T> g;
  g.ld_ddt = ld_ddt;
  g.ddt_off = ddt_off;
  g.dxBC.assign(d.tokens() * d.conv_dim(), nan);
  g.ddt_rows.assign(d.tokens() * ld_ddt, T(-7));  // sentinel outside the written columns
  for (int64_t tok = 0; tok < d.tokens(); ++tok)
    for (int64_t h = 0; h < d.nheads; ++h) g.ddt_rows[tok * ld_ddt + ddt_off + h] = nan;
  g.d_dt_bias.assign(d.nheads, T(0));
  g.dA_log.assign(d.nheads, T(0));
  g.dD.assign(d.nheads, T(0));
  g.d_init.assign(want_d_init ? in.state_numel() : 0, nan);
  ssd::cpu::ssd_bwd<T>(d, in.xBC.data(), in.dt(), in.ld_dt, in.dt_bias.data(), in.A_log.data(),
                       in.D.data(), in.init_ptr(), wy.data(), ws.empty() ? nullptr : ws.data(),
                       g.dxBC.data(), g.ddt_rows.data() + ddt_off, ld_ddt, g.d_dt_bias.data(),
                       g.dA_log.data(), g.dD.data(), want_d_init ? g.d_init.data() : nullptr,
                       in.reset_ptr());
  return g;
}

// Columns [c0, c0+w) of a row-major matrix with `ld` columns.
template <class T>
std::vector<double> columns(const std::vector<T>& m, int64_t ld, int64_t c0, int64_t w) {
  std::vector<double> out;
  for (size_t r = 0; r < m.size() / ld; ++r)
    for (int64_t c = c0; c < c0 + w; ++c) out.push_back(static_cast<double>(m[r * ld + c]));
  return out;
}

SsdDims dims(int64_t batch, int64_t seqlen, int64_t nheads, int64_t headdim, int64_t ngroups,
             int64_t dstate, int64_t chunk) {
  SsdDims d;
  d.batch = batch;
  d.seqlen = seqlen;
  d.nheads = nheads;
  d.headdim = headdim;
  d.ngroups = ngroups;
  d.dstate = dstate;
  d.chunk = chunk;
  return d;
}

// ---------------------------------------------------------------------------------------------

TEST(CpuSsd, ChunkedForwardMatchesRecurrence) {
  double worst_d = 0, worst_f = 0;
  struct DtRange { double lo, hi; };
  // realistic (dt in [1e-3, 1e-1] before noise) and large (strong decay within a chunk)
  const DtRange ranges[] = {{1e-3, 1e-1}, {0.5, 3.0}};
  for (int64_t ngroups : {1, 2}) {
    for (int64_t chunk : {1, 3, 8, 16, 37, 64}) {
      for (bool with_init : {false, true}) {
        for (int r = 0; r < 2; ++r) {
          SCOPED_TRACE(testing::Message() << "ngroups " << ngroups << " chunk " << chunk
                                          << " init " << with_init << " dt range " << r);
          const SsdDims d = dims(2, 37, 4, 5, ngroups, 6, chunk);
          const auto in = make_inputs(d, 100 * chunk + 10 * ngroups + 2 * with_init + r,
                                      ranges[r].lo, ranges[r].hi, with_init);
          const Out ref = run_fwd(in, /*naive=*/true);
          const Out got = run_fwd(in, /*naive=*/false);
          const Out got_f = run_fwd(cast_inputs<float>(in), /*naive=*/false);
          const double ey = rel_err(got.y, ref.y), es = rel_err(got.final_state, ref.final_state);
          const double ey_f = rel_err(got_f.y, ref.y);
          const double es_f = rel_err(got_f.final_state, ref.final_state);
          EXPECT_LT(ey, 1e-10);
          EXPECT_LT(es, 1e-10);
          EXPECT_LT(ey_f, 1e-4);
          EXPECT_LT(es_f, 1e-4);
          worst_d = std::max({worst_d, ey, es});
          worst_f = std::max({worst_f, ey_f, es_f});
        }
      }
    }
  }
  std::printf("[ssd fwd] worst rel err vs recurrence: double %.3g, float %.3g\n", worst_d,
              worst_f);
}

TEST(CpuSsd, ForwardEdgeShapes) {
  // seqlen 1; seqlen an exact multiple of chunk; one head per group; wider dt rows.
  const SsdDims shapes[] = {dims(3, 1, 2, 3, 2, 4, 4), dims(1, 12, 2, 3, 1, 4, 4),
                            dims(2, 9, 3, 2, 3, 5, 2)};
  for (const SsdDims& d : shapes) {
    const auto in = make_inputs(d, 7, 1e-3, 1e-1, true, d.nheads + 3, 2);
    const Out ref = run_fwd(in, true), got = run_fwd(in, false);
    EXPECT_LT(rel_err(got.y, ref.y), 1e-10);
    EXPECT_LT(rel_err(got.final_state, ref.final_state), 1e-10);
  }
}

// Reset flags [batch * seqlen]: starts[b] lists the positions where documents begin in row b.
std::vector<int32_t> flags(const SsdDims& d, const std::vector<std::vector<int64_t>>& starts) {
  std::vector<int32_t> r(d.tokens(), 0);
  for (size_t b = 0; b < starts.size(); ++b)
    for (int64_t t : starts[b]) r[b * d.seqlen + t] = 1;
  return r;
}

// L = sum(wy * y) + sum(ws * final_state), differentiated numerically through the recurrence
// and analytically through ssd_bwd (dy = wy, dfinal_state = ws), for every input. dt lives in
// columns [2, 2+nheads) of 7-wide rows, ddt in columns [1, 1+nheads) of 9-wide rows.
// starts: reset flags (document starts per row), none when empty.
// Returns the worst relative error over all inputs and chunk sizes.
double check_gradients(double dt_lo, double dt_hi, uint64_t seed,
                       const std::vector<std::vector<int64_t>>& starts = {}) {
  const int64_t ld_dt = 4 + 3, dt_off = 2, ld_ddt = 4 + 5, ddt_off = 1;
  const SsdDims d0 = dims(2, 7, 4, 3, 2, 4, 3);
  auto in = make_inputs(d0, seed, dt_lo, dt_hi, true, ld_dt, dt_off);
  if (!starts.empty()) in.reset = flags(d0, starts);
  const auto wy = ssdtest::randn<double>(d0.tokens() * d0.d_inner(), seed + 10);
  const auto ws = ssdtest::randn<double>(in.state_numel(), seed + 11);

  auto loss = [&]() {
    const Out o = run_fwd(in, true);
    return ssdtest::dot(wy, o.y) + ssdtest::dot(ws, o.final_state);
  };
  const auto n_xBC = ssdtest::finite_diff(in.xBC, loss);
  const auto n_dt_rows = ssdtest::finite_diff(in.dt_rows, loss);
  const auto n_dt_bias = ssdtest::finite_diff(in.dt_bias, loss);
  const auto n_A_log = ssdtest::finite_diff(in.A_log, loss);
  const auto n_D = ssdtest::finite_diff(in.D, loss);
  const auto n_init = ssdtest::finite_diff(in.init, loss);

  const int64_t di = d0.d_inner(), gN = d0.ngroups * d0.dstate, cd = d0.conv_dim();
  double worst = 0;
  // chunk 3 leaves a partial last chunk (7 = 3+3+1); also 1, 7 (= seqlen) and 16 (> seqlen)
  for (int64_t chunk : {3, 1, 7, 16}) {
    SCOPED_TRACE(testing::Message() << "chunk " << chunk);
    in.d.chunk = chunk;
    const auto g = run_bwd(in, wy, ws, ld_ddt, ddt_off);
    const double errs[] = {
        rel_err(columns(g.dxBC, cd, 0, di), columns(n_xBC, cd, 0, di)),                // x
        rel_err(columns(g.dxBC, cd, di, gN), columns(n_xBC, cd, di, gN)),              // B
        rel_err(columns(g.dxBC, cd, di + gN, gN), columns(n_xBC, cd, di + gN, gN)),    // C
        rel_err(columns(g.ddt_rows, ld_ddt, ddt_off, d0.nheads),
                columns(n_dt_rows, ld_dt, dt_off, d0.nheads)),                         // dt
        rel_err(g.d_dt_bias, n_dt_bias), rel_err(g.dA_log, n_A_log), rel_err(g.dD, n_D),
        rel_err(g.d_init, n_init)};
    const char* names[] = {"x", "B", "C", "dt", "dt_bias", "A_log", "D", "initial_state"};
    for (int i = 0; i < 8; ++i) {
      EXPECT_LT(errs[i], 1e-6) << names[i];
      worst = std::max(worst, errs[i]);
    }
    // the raw dt has no effect outside its columns, and ssd_bwd leaves ddt's other columns alone
    for (int64_t tok = 0; tok < d0.tokens(); ++tok) {
      for (int64_t c = 0; c < ld_dt; ++c) {
        if (c < dt_off || c >= dt_off + d0.nheads) {
          EXPECT_EQ(n_dt_rows[tok * ld_dt + c], 0.0);
        }
      }
      for (int64_t c = 0; c < ld_ddt; ++c) {
        if (c < ddt_off || c >= ddt_off + d0.nheads) {
          EXPECT_EQ(g.ddt_rows[tok * ld_ddt + c], -7.0) << "ddt column " << c << " touched";
        }
      }
    }
  }
  return worst;
}

TEST(CpuSsd, BackwardMatchesFiniteDifferences) {
  const double worst = check_gradients(1e-2, 3e-1, 42);
  std::printf("[ssd bwd] worst rel err vs finite differences (double): %.3g\n", worst);
}

TEST(CpuSsd, BackwardMatchesFiniteDifferencesLargeDt) {
  const double worst = check_gradients(0.5, 2.0, 77);
  std::printf("[ssd bwd] worst rel err vs finite differences, large dt (double): %.3g\n",
              worst);
}

// ---- packed documents (reset flags) ----

// Document starts of the reset tests, for chunk 8 over 37 tokens (a partial last chunk): at 0,
// on chunk boundaries (8, 24), inside chunks (3, 13), two in one chunk (17, 21), on
// consecutive tokens (29, 30), on the last token (36); the third row has none.
const std::vector<std::vector<int64_t>> kStarts = {{0, 3, 8, 17, 21, 29, 30}, {13, 24, 36}, {}};

TEST(CpuSsd, ResetsChunkedForwardMatchesRecurrence) {
  double worst_d = 0, worst_f = 0, least_effect = 1e300;
  for (int64_t ngroups : {1, 2})
    for (int64_t chunk : {8, 5, 1, 64})
      for (bool with_init : {false, true})
        for (int r = 0; r < 2; ++r) {
          SCOPED_TRACE(testing::Message() << "ngroups " << ngroups << " chunk " << chunk
                                          << " init " << with_init << " dt range " << r);
          const SsdDims d = dims(3, 37, 4, 5, ngroups, 6, chunk);
          auto in = make_inputs(d, 300 + 10 * chunk + 4 * ngroups + 2 * with_init + r,
                                r ? 0.5 : 1e-3, r ? 3.0 : 1e-1, with_init);
          const Out plain = run_fwd(in, /*naive=*/false);
          in.reset = flags(d, kStarts);
          const Out ref = run_fwd(in, /*naive=*/true);
          const Out got = run_fwd(in, /*naive=*/false);
          const Out got_f = run_fwd(cast_inputs<float>(in), /*naive=*/false);
          const double ey = rel_err(got.y, ref.y), es = rel_err(got.final_state, ref.final_state);
          const double ey_f = rel_err(got_f.y, ref.y);
          const double es_f = rel_err(got_f.final_state, ref.final_state);
          EXPECT_LT(ey, 1e-10);
          EXPECT_LT(es, 1e-10);
          EXPECT_LT(ey_f, 1e-4);
          EXPECT_LT(es_f, 1e-4);
          worst_d = std::max({worst_d, ey, es});
          worst_f = std::max({worst_f, ey_f, es_f});
          least_effect = std::min(least_effect, rel_err(plain.y, ref.y));  // flags matter
        }
  EXPECT_GT(least_effect, 1e-3) << "the reset flags changed nothing";
  std::printf("[ssd fwd, resets] worst rel err vs recurrence: double %.3g, float %.3g "
              "(without the flags: >= %.3g)\n", worst_d, worst_f, least_effect);
}

TEST(CpuSsd, ResetsBackwardMatchesFiniteDifferences) {
  // Row 0: starts at 0 (the initial state dropped), 3 (a chunk boundary for chunk 3), 5
  // (inside a chunk); row 1: 1 and 2 (consecutive), 6 (the last token, a partial chunk).
  const std::vector<std::vector<int64_t>> starts = {{0, 3, 5}, {1, 2, 6}};
  const double worst = std::max(check_gradients(1e-2, 3e-1, 142, starts),
                                check_gradients(0.5, 2.0, 177, starts));
  std::printf("[ssd bwd, resets] worst rel err vs finite differences (double): %.3g\n", worst);
}

// The op on a packed sequence against its documents, each its own sequence run through the
// same op without flags (the initial state enters the first document only, unless a document
// starts at 0; dfinal_state reaches the last document only): y, the final state and every
// gradient. Returns the worst relative error.
template <class T>
double packed_vs_documents(const Inputs<double>& in64, const std::vector<double>& wy64,
                           const std::vector<double>& ws64) {
  const Inputs<T> in = cast_inputs<T>(in64);
  const std::vector<T> wy = cast<T>(wy64), ws = cast<T>(ws64);
  const SsdDims& d = in.d;
  const int64_t cd = d.conv_dim(), di = d.d_inner(), PN = d.headdim * d.dstate;
  const int64_t SN = d.nheads * PN;  // one row's state
  const Out packed = run_fwd(in, false);
  const Grads<T> gp = run_bwd(in, wy, ws, d.nheads, 0);
  std::vector<double> y(packed.y.size()), fs(packed.final_state.size()), dxBC(gp.dxBC.size()),
      ddt(gp.ddt_rows.size()), d_init(gp.d_init.size(), 0.0), dbias(d.nheads), dA(d.nheads),
      dD(d.nheads);
  for (int64_t b = 0; b < d.batch; ++b) {
    std::vector<int64_t> cuts = {0};
    for (int64_t t = 1; t < d.seqlen; ++t)
      if (in.reset[b * d.seqlen + t]) cuts.push_back(t);
    cuts.push_back(d.seqlen);
    for (size_t k = 0; k + 1 < cuts.size(); ++k) {
      const int64_t t0 = cuts[k], n = cuts[k + 1] - t0, row0 = b * d.seqlen + t0;
      const bool first = k == 0, last = k + 2 == cuts.size();
      // The (given or zero) initial state reaches the first document, unless one starts at 0.
      const bool gets_init = first && !in.reset[b * d.seqlen];
      Inputs<T> doc;
      doc.d = d;
      doc.d.batch = 1;
      doc.d.seqlen = n;
      doc.ld_dt = in.ld_dt;
      doc.dt_off = in.dt_off;
      doc.xBC.assign(in.xBC.begin() + row0 * cd, in.xBC.begin() + (row0 + n) * cd);
      doc.dt_rows.assign(in.dt_rows.begin() + row0 * in.ld_dt,
                         in.dt_rows.begin() + (row0 + n) * in.ld_dt);
      doc.dt_bias = in.dt_bias;
      doc.A_log = in.A_log;
      doc.D = in.D;
      if (gets_init && !in.init.empty())
        doc.init.assign(in.init.begin() + b * SN, in.init.begin() + (b + 1) * SN);
      const std::vector<T> wy_doc(wy.begin() + row0 * di, wy.begin() + (row0 + n) * di);
      const std::vector<T> ws_doc = last ? std::vector<T>(ws.begin() + b * SN, ws.begin() + (b + 1) * SN)
                                         : std::vector<T>{};
      const Out o = run_fwd(doc, false);
      const Grads<T> g = run_bwd(doc, wy_doc, ws_doc, d.nheads, 0, gets_init);
      std::copy(o.y.begin(), o.y.end(), y.begin() + row0 * di);
      if (last) std::copy(o.final_state.begin(), o.final_state.end(), fs.begin() + b * SN);
      std::copy(g.dxBC.begin(), g.dxBC.end(), dxBC.begin() + row0 * cd);
      std::copy(g.ddt_rows.begin(), g.ddt_rows.end(), ddt.begin() + row0 * d.nheads);
      if (gets_init) std::copy(g.d_init.begin(), g.d_init.end(), d_init.begin() + b * SN);
      for (int64_t h = 0; h < d.nheads; ++h) {
        dbias[h] += g.d_dt_bias[h];
        dA[h] += g.dA_log[h];
        dD[h] += g.dD[h];
      }
    }
  }
  const double errs[] = {rel_err(packed.y, y),     rel_err(packed.final_state, fs),
                         rel_err(gp.dxBC, dxBC),   rel_err(gp.ddt_rows, ddt),
                         rel_err(gp.d_init, d_init), rel_err(gp.d_dt_bias, dbias),
                         rel_err(gp.dA_log, dA),   rel_err(gp.dD, dD)};
  const char* names[] = {"y", "final_state", "dxBC", "ddt", "d_initial_state", "d_dt_bias",
                         "dA_log", "dD"};
  double worst = 0;
  const double tol = std::is_same_v<T, double> ? 1e-10 : 2e-5;
  for (int i = 0; i < 8; ++i) {
    EXPECT_LT(errs[i], tol) << names[i];
    worst = std::max(worst, errs[i]);
  }
  return worst;
}

TEST(CpuSsd, ResetsEqualDocumentsRunOneByOne) {
  double worst_d = 0, worst_f = 0;
  for (int64_t ngroups : {1, 2})
    for (int64_t chunk : {8, 5})
      for (bool with_init : {false, true}) {
        SCOPED_TRACE(testing::Message() << "ngroups " << ngroups << " chunk " << chunk
                                        << " init " << with_init);
        const SsdDims d = dims(3, 37, 4, 5, ngroups, 6, chunk);
        auto in = make_inputs(d, 500 + chunk + 3 * ngroups + with_init, 1e-2, 3e-1, with_init);
        in.reset = flags(d, kStarts);
        const auto wy = ssdtest::randn<double>(d.tokens() * d.d_inner(), 600 + chunk);
        const auto ws = ssdtest::randn<double>(in.state_numel(), 700 + chunk);
        worst_d = std::max(worst_d, packed_vs_documents<double>(in, wy, ws));
        worst_f = std::max(worst_f, packed_vs_documents<float>(in, wy, ws));
      }
  std::printf("[ssd, resets] packed vs documents one by one, outputs and gradients: double "
              "%.3g, float %.3g\n", worst_d, worst_f);
}

// Float inputs from seed: the op's inputs (with document starts if asked) and the weights of
// its outputs and final state in the loss.
struct FloatCase {
  Inputs<float> in;
  std::vector<float> wy, ws;
};
FloatCase float_case(const SsdDims& d, uint64_t seed, bool resets) {
  auto in = make_inputs(d, seed, 1e-3, 1e-1, true);
  if (resets) in.reset = flags(d, kStarts);
  FloatCase c{cast_inputs<float>(in), {}, {}};
  c.wy = cast<float>(ssdtest::randn<double>(d.tokens() * d.d_inner(), seed + 1));
  c.ws = cast<float>(ssdtest::randn<double>(c.in.state_numel(), seed + 2));
  return c;
}

// Forward outputs and every gradient of two runs, bitwise.
void expect_bitwise_equal(const Out& o0, const Grads<float>& g0, const Out& o1,
                          const Grads<float>& g1) {
  EXPECT_EQ(o0.y, o1.y);
  EXPECT_EQ(o0.final_state, o1.final_state);
  EXPECT_EQ(g0.dxBC, g1.dxBC);
  EXPECT_EQ(g0.ddt_rows, g1.ddt_rows);
  EXPECT_EQ(g0.d_dt_bias, g1.d_dt_bias);
  EXPECT_EQ(g0.dA_log, g1.dA_log);
  EXPECT_EQ(g0.dD, g1.dD);
  EXPECT_EQ(g0.d_init, g1.d_init);
}

// One OpenMP thread and three give bitwise the same results.
void expect_thread_count_independent(const FloatCase& c, int64_t nheads) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const Out o1 = run_fwd(c.in, false);
  const auto g1 = run_bwd(c.in, c.wy, c.ws, nheads, 0);
  omp_set_num_threads(3);
  const Out o3 = run_fwd(c.in, false);
  const auto g3 = run_bwd(c.in, c.wy, c.ws, nheads, 0);
  omp_set_num_threads(saved);
  expect_bitwise_equal(o1, g1, o3, g3);
}

TEST(CpuSsd, ResetsResultsIndependentOfThreadCount) {
  const SsdDims d = dims(3, 37, 4, 4, 2, 4, 8);
  expect_thread_count_independent(float_case(d, 31, true), d.nheads);
}

TEST(CpuSsd, ResetFlagsOfZerosChangeNothing) {
  // All-zero flags: bitwise the results without flags.
  const SsdDims d = dims(2, 37, 4, 5, 2, 6, 8);
  FloatCase c = float_case(d, 41, false);
  const Out o0 = run_fwd(c.in, false);
  const auto g0 = run_bwd(c.in, c.wy, c.ws, d.nheads, 0);
  c.in.reset.assign(d.tokens(), 0);
  const Out o1 = run_fwd(c.in, false);
  const auto g1 = run_bwd(c.in, c.wy, c.ws, d.nheads, 0);
  expect_bitwise_equal(o0, g0, o1, g1);
}

TEST(CpuSsd, BackwardAccumulatesParameterGradientsOnly) {
  const SsdDims d = dims(2, 11, 4, 3, 2, 4, 4);
  const auto in = make_inputs(d, 5, 1e-3, 1e-1, true);
  const auto wy = ssdtest::randn<double>(d.tokens() * d.d_inner(), 6);
  const auto ws = ssdtest::randn<double>(in.state_numel(), 7);
  const auto g1 = run_bwd(in, wy, ws, d.nheads, 0);
  // second call into the same buffers
  auto g2 = g1;
  ssd::cpu::ssd_bwd<double>(d, in.xBC.data(), in.dt(), in.ld_dt, in.dt_bias.data(),
                            in.A_log.data(), in.D.data(), in.init_ptr(), wy.data(), ws.data(),
                            g2.dxBC.data(), g2.ddt_rows.data(), d.nheads, g2.d_dt_bias.data(),
                            g2.dA_log.data(), g2.dD.data(), g2.d_init.data(), nullptr);
  for (int64_t h = 0; h < d.nheads; ++h) {
    EXPECT_EQ(g2.d_dt_bias[h], 2 * g1.d_dt_bias[h]);
    EXPECT_EQ(g2.dA_log[h], 2 * g1.dA_log[h]);
    EXPECT_EQ(g2.dD[h], 2 * g1.dD[h]);
  }
  EXPECT_EQ(g2.dxBC, g1.dxBC);
  EXPECT_EQ(g2.ddt_rows, g1.ddt_rows);
  EXPECT_EQ(g2.d_init, g1.d_init);
  for (double v : g1.dxBC) ASSERT_TRUE(std::isfinite(v)) << "dxBC not fully overwritten";
  for (double v : g1.ddt_rows) ASSERT_TRUE(std::isfinite(v)) << "ddt not fully overwritten";
  for (double v : g1.d_init) ASSERT_TRUE(std::isfinite(v));
}

TEST(CpuSsd, BackwardOptionalStates) {
  // No initial state, no dfinal_state, no d_initial_state: same as zeros / not asked for.
  const SsdDims d = dims(2, 10, 4, 3, 1, 4, 4);
  auto in = make_inputs(d, 9, 1e-3, 1e-1, false);
  const auto wy = ssdtest::randn<double>(d.tokens() * d.d_inner(), 10);
  const auto g_null = run_bwd(in, wy, {}, d.nheads, 0, /*want_d_init=*/false);
  in.init.assign(in.state_numel(), 0.0);
  const auto g_zero = run_bwd(in, wy, std::vector<double>(in.state_numel(), 0.0), d.nheads, 0);
  EXPECT_EQ(g_null.dxBC, g_zero.dxBC);
  EXPECT_EQ(g_null.ddt_rows, g_zero.ddt_rows);
  EXPECT_EQ(g_null.dA_log, g_zero.dA_log);
  EXPECT_EQ(g_null.d_dt_bias, g_zero.d_dt_bias);
  EXPECT_EQ(g_null.dD, g_zero.dD);
}

TEST(CpuSsd, FloatBackwardMatchesDouble) {
  const SsdDims d = dims(2, 37, 4, 5, 2, 6, 8);
  const auto in = make_inputs(d, 11, 1e-3, 1e-1, true);
  const auto wy = ssdtest::randn<double>(d.tokens() * d.d_inner(), 12);
  const auto ws = ssdtest::randn<double>(in.state_numel(), 13);
  const auto gd = run_bwd(in, wy, ws, d.nheads, 0);
  const auto gf = run_bwd(cast_inputs<float>(in), cast<float>(wy), cast<float>(ws), d.nheads, 0);
  const double errs[] = {rel_err(gf.dxBC, gd.dxBC),   rel_err(gf.ddt_rows, gd.ddt_rows),
                         rel_err(gf.d_dt_bias, gd.d_dt_bias), rel_err(gf.dA_log, gd.dA_log),
                         rel_err(gf.dD, gd.dD),       rel_err(gf.d_init, gd.d_init)};
  double worst = 0;
  for (double e : errs) {
    EXPECT_LT(e, 1e-4);
    worst = std::max(worst, e);
  }
  std::printf("[ssd bwd] worst rel err float vs double: %.3g\n", worst);
}

TEST(CpuSsd, ResultsIndependentOfThreadCount) {
  const SsdDims d = dims(3, 20, 4, 4, 2, 4, 8);
  expect_thread_count_independent(float_case(d, 21, false), d.nheads);
}

}  // namespace
