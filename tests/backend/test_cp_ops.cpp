// Context parallelism at the op level: the SSD and the causal conv of sequences split into 2 and
// 4 segments, each segment's SSD started from the state the previous one ended with (and its
// gradient handed back), each segment's conv given the previous segment's last d_conv-1 inputs
// as a halo (and their gradient handed back), equal the unsplit ops: outputs and every gradient.
// Segments of unequal lengths leave partial chunks inside them; two groups. CPU fp32 against the
// unsplit CPU op (1e-5), and the CUDA backend's split ops against the unsplit CPU op on the same
// bf16-rounded inputs (the 1e-2 of the CUDA SSD tests).
// The all-gather combine (parallel.cp_combine=allgather) likewise: its cheap passes
// (ssd_final_state, ssd_dinitial) against the full ops, ssd_segment_decay against a float64
// evaluation, and the whole combine (summaries from zero starts, one gathered buffer, the scans,
// the full ops from the scanned states) against the unsplit op, with packed documents whose
// starts fall inside segments and on their boundaries.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>

#include "backend/backend.h"
#include "testutil.h"

using namespace ssd;

namespace {

using ssdtest::round_bf16;

// Host data of one op call over `batch` sequences of `len` tokens, rows batch-major.
struct Rows {
  int64_t width = 0;
  std::vector<float> v;  // [batch * len, width]
};
// Tokens [t0, t0 + n) of every sequence, `width` values each.
template <class V>
V slice_tokens(const V& v, int64_t width, int64_t batch, int64_t len, int64_t t0, int64_t n) {
  V out(batch * n * width);
  for (int64_t b = 0; b < batch; ++b)
    std::copy_n(v.begin() + (b * len + t0) * width, n * width, out.begin() + b * n * width);
  return out;
}
Rows slice(const Rows& r, int64_t batch, int64_t len, int64_t t0, int64_t n) {
  return {r.width, slice_tokens(r.v, r.width, batch, len, t0, n)};
}
void put(Rows& r, int64_t batch, int64_t len, int64_t t0, const Rows& part, int64_t n) {
  for (int64_t b = 0; b < batch; ++b)
    std::copy_n(part.v.begin() + b * n * r.width, n * r.width, r.v.begin() + (b * len + t0) * r.width);
}

// Upload host f32 values as a tensor of `dt` (through f32 and the backend's convert).
Tensor up(Backend& be, const std::vector<float>& v, const Shape& s, DType dt) {
  Tensor f = be.alloc(s, DType::F32);
  be.upload(f, v.data());
  if (dt == DType::F32) return f;
  Tensor t = be.alloc(s, dt);
  be.convert(f, t);
  return t;
}
std::vector<float> down(Backend& be, const Tensor& t) {
  Tensor f = t;
  if (t.dtype != DType::F32) {
    f = be.alloc(t.shape, DType::F32);
    be.convert(t, f);
  }
  std::vector<float> v(t.numel());
  be.download(v.data(), f);
  return v;
}

struct SsdCase {
  SsdDims d;                      // the whole sequences
  std::vector<int64_t> segments;  // lengths, summing to d.seqlen
};

struct Problem {
  Rows xBC, dt, dy;
  std::vector<float> dt_bias, A_log, D, init, dfinal;  // init, dfinal empty: none
  std::vector<int32_t> reset;                           // [tokens] document starts; empty: none
};

// Document starts of the combine checks: inside segments, on the boundaries of the cases'
// segmentations (96; 100, 150; 64, 192), and the second sequence's first segment of 2 without.
std::vector<int32_t> document_starts(const SsdDims& d) {
  std::vector<int32_t> r(d.tokens(), 0);
  for (int64_t t : {96, 160}) r[t] = 1;
  for (int64_t t : {100, 150, 192, 195, 197}) r[d.seqlen + t] = 1;
  return r;
}

Problem make_problem(const SsdDims& d, bool bf16) {
  const int64_t T = d.tokens(), H = d.nheads, SN = d.batch * H * d.headdim * d.dstate;
  Problem p;
  p.xBC = {d.conv_dim(), ssdtest::randn<float>(T * d.conv_dim(), 11)};
  p.dt = {H, ssdtest::randn<float>(T * H, 12, 0.5)};
  p.dy = {d.d_inner(), ssdtest::randn<float>(T * d.d_inner(), 13)};
  p.dt_bias = ssdtest::uniform<float>(H, 14, 0.001, 0.1);
  for (auto& v : p.dt_bias) v = std::log(std::expm1(v));
  p.A_log = ssdtest::uniform<float>(H, 15, 1.0, 16.0);
  for (auto& v : p.A_log) v = std::log(v);
  p.D = ssdtest::randn<float>(H, 16);
  p.init = ssdtest::randn<float>(SN, 17);
  p.dfinal = ssdtest::randn<float>(SN, 18);
  if (bf16)
    for (Rows* r : {&p.xBC, &p.dt, &p.dy})
      for (auto& v : r->v) v = round_bf16(v);
  return p;
}

struct SsdOut {
  Rows y, dxBC, ddt;
  std::vector<float> d_dt_bias, dA_log, dD, final_state, d_init;
};

Shape state_shape(const SsdDims& d) { return {d.batch, d.nheads, d.headdim, d.dstate}; }

// One segment's inputs on a backend: tokens [t0, t0 + d.seqlen) of the problem's sequences of
// `len` tokens, and (given) the state entering it.
struct Segment {
  Tensor xBC, dt, dy, dt_bias, A_log, D, reset, init;
  SsdInputs inputs() const {
    SsdInputs in;
    in.xBC = xBC;
    in.dt = all_cols(dt);
    in.dt_bias = dt_bias, in.A_log = A_log, in.D = D;
    if (init.defined()) in.initial_state = &init;
    if (reset.defined()) in.reset = &reset;
    return in;
  }
};
Segment segment(Backend& be, const SsdDims& d, const Problem& p, int64_t len, int64_t t0,
                const std::vector<float>* init) {
  const DType cd = be.compute_dtype(), ad = be.accum_dtype();
  const int64_t T = d.tokens(), H = d.nheads;
  Segment s;
  s.xBC = up(be, slice(p.xBC, d.batch, len, t0, d.seqlen).v, {T, d.conv_dim()}, cd);
  s.dt = up(be, slice(p.dt, d.batch, len, t0, d.seqlen).v, {T, H}, cd);
  s.dy = up(be, slice(p.dy, d.batch, len, t0, d.seqlen).v, {T, d.d_inner()}, cd);
  s.dt_bias = up(be, p.dt_bias, {H}, ad);
  s.A_log = up(be, p.A_log, {H}, ad);
  s.D = up(be, p.D, {H}, ad);
  if (!p.reset.empty()) {
    s.reset = be.alloc({T}, DType::I32);
    be.upload(s.reset, slice_tokens(p.reset, 1, d.batch, len, t0, d.seqlen).data());
  }
  if (init) s.init = up(be, *init, state_shape(d), ad);
  return s;
}

// One SSD call (forward and backward) over tokens [t0, t0 + d.seqlen) of each sequence.
void ssd_call(Backend& be, SsdDims d, int64_t len, int64_t t0, const Problem& p,
              const std::vector<float>* init, const std::vector<float>* dfinal,
              Tensor& d_dt_bias, Tensor& dA_log, Tensor& dD, SsdOut& out) {
  const DType cd = be.compute_dtype(), ad = be.accum_dtype();
  const int64_t T = d.tokens(), H = d.nheads;
  const Shape st = state_shape(d);
  const Segment seg = segment(be, d, p, len, t0, init);
  const SsdInputs in = seg.inputs();
  const Tensor& tdy = seg.dy;
  Tensor tdfinal;
  Tensor y = be.alloc({T, d.d_inner()}, cd), fin = be.alloc(st, ad);
  be.ssd_fwd(d, in, y, &fin);
  SsdGrads g;
  g.dxBC = be.alloc({T, d.conv_dim()}, cd);
  Tensor tddt = be.alloc({T, H}, cd);
  g.ddt = all_cols(tddt);
  g.d_dt_bias = d_dt_bias;
  g.dA_log = dA_log;
  g.dD = dD;
  Tensor dinit = be.alloc(st, ad);
  g.d_initial_state = &dinit;
  if (dfinal) tdfinal = up(be, *dfinal, st, ad);
  be.ssd_bwd(d, in, tdy, dfinal ? &tdfinal : nullptr, g);
  out.y = {d.d_inner(), down(be, y)};
  out.dxBC = {d.conv_dim(), down(be, g.dxBC)};
  out.ddt = {H, down(be, tddt)};
  out.final_state = down(be, fin);
  out.d_init = down(be, dinit);
}

Tensor zeros(Backend& be, int64_t n) {
  Tensor t = be.alloc({n}, be.accum_dtype());
  be.zero(t);
  return t;
}

const std::vector<float>* given(const std::vector<float>& v) { return v.empty() ? nullptr : &v; }

// The whole sequences in one call.
SsdOut ssd_whole(Backend& be, const SsdDims& d, const Problem& p) {
  SsdOut o;
  Tensor a = zeros(be, d.nheads), b = zeros(be, d.nheads), c = zeros(be, d.nheads);
  ssd_call(be, d, d.seqlen, 0, p, given(p.init), given(p.dfinal), a, b, c, o);
  o.d_dt_bias = down(be, a), o.dA_log = down(be, b), o.dD = down(be, c);
  return o;
}

// A segment's token rows of o into the whole sequences' out.
void put_segment(SsdOut& out, const SsdDims& d, int64_t t0, const SsdOut& o, int64_t n) {
  put(out.y, d.batch, d.seqlen, t0, o.y, n);
  put(out.dxBC, d.batch, d.seqlen, t0, o.dxBC, n);
  put(out.ddt, d.batch, d.seqlen, t0, o.ddt, n);
}

// Segment by segment: states handed forward, their gradients back.
SsdOut ssd_split(Backend& be, const SsdDims& d, const Problem& p, const std::vector<int64_t>& segs) {
  const int64_t L = d.seqlen, n = static_cast<int64_t>(segs.size());
  std::vector<int64_t> t0(n, 0);
  for (int64_t s = 1; s < n; ++s) t0[s] = t0[s - 1] + segs[s - 1];
  Tensor a = zeros(be, d.nheads), b = zeros(be, d.nheads), c = zeros(be, d.nheads);
  std::vector<std::vector<float>> init(n + 1);
  init[0] = p.init;
  // Forward: each segment from the state the previous one ended with (a forward-only pass gives
  // those states; the backward below recomputes each segment's forward as the model's does).
  for (int64_t s = 0; s < n; ++s) {
    SsdDims ds = d;
    ds.seqlen = segs[s];
    SsdOut o;
    Tensor x = zeros(be, d.nheads), y = zeros(be, d.nheads), z = zeros(be, d.nheads);
    ssd_call(be, ds, L, t0[s], p, &init[s], nullptr, x, y, z, o);
    init[s + 1] = o.final_state;
  }
  SsdOut out;
  out.y = {d.d_inner(), std::vector<float>(d.tokens() * d.d_inner())};
  out.dxBC = {d.conv_dim(), std::vector<float>(d.tokens() * d.conv_dim())};
  out.ddt = {d.nheads, std::vector<float>(d.tokens() * d.nheads)};
  std::vector<float> dnext = p.dfinal;
  for (int64_t s = n - 1; s >= 0; --s) {
    SsdDims ds = d;
    ds.seqlen = segs[s];
    SsdOut o;
    ssd_call(be, ds, L, t0[s], p, &init[s], &dnext, a, b, c, o);
    put_segment(out, d, t0[s], o, segs[s]);
    dnext = o.d_init;
    if (s == n - 1) out.final_state = o.final_state;
  }
  out.d_init = dnext;
  out.d_dt_bias = down(be, a), out.dA_log = down(be, b), out.dD = down(be, c);
  return out;
}

// The all-gather combine, the ranks of a cp group played in turn. Forward: every segment's
// summary (its final state from a zero start, its decay) as row s of one buffer, as the
// all-gather leaves it; each segment's entering state scanned from the rows before it.
// Backward: every segment's d_initial_state through its own outputs and its decay, gathered
// likewise; each segment's final-state gradient scanned from the rows after it. Then each
// segment's full ssd_fwd / ssd_bwd from those (the sequences start from a zero state, and no
// gradient reaches their final states: the model's case).
SsdOut ssd_allgather(Backend& be, const SsdDims& d, const Problem& p,
                     const std::vector<int64_t>& segs) {
  const int64_t L = d.seqlen, n = static_cast<int64_t>(segs.size());
  const int64_t S = shape_numel(state_shape(d)), G = d.batch * d.nheads;
  const DType ad = be.accum_dtype();
  std::vector<int64_t> t0(n, 0);
  for (int64_t s = 1; s < n; ++s) t0[s] = t0[s - 1] + segs[s - 1];
  auto seg_dims = [&](int64_t s) {
    SsdDims ds = d;
    ds.seqlen = segs[s];
    return ds;
  };
  // The scan of every segment over `rows` [n, S + G]: the state entering (or, reverse, the
  // gradient of the state leaving) each segment.
  auto scan = [&](const std::vector<float>& rows, bool reverse) {
    const Tensor all = up(be, rows, {n, S + G}, ad);
    std::vector<std::vector<float>> out;
    Tensor t = be.alloc(state_shape(d), ad);
    for (int64_t s = 0; s < n; ++s) {
      be.cp_state_scan(d, all, s, reverse, t);
      out.push_back(down(be, t));
    }
    return out;
  };
  std::vector<float> rows(n * (S + G), 0.f);
  Tensor state = be.alloc(state_shape(d), ad), decay = be.alloc({d.batch, d.nheads}, ad);
  auto put_row = [&](int64_t s) {
    const auto st = down(be, state), dc = down(be, decay);
    std::copy(st.begin(), st.end(), rows.begin() + s * (S + G));
    std::copy(dc.begin(), dc.end(), rows.begin() + s * (S + G) + S);
  };
  for (int64_t s = 0; s < n; ++s) {
    const Segment seg = segment(be, seg_dims(s), p, L, t0[s], nullptr);
    be.ssd_final_state(seg_dims(s), seg.inputs(), state);
    be.ssd_segment_decay(seg_dims(s), seg.inputs(), decay);
    put_row(s);
  }
  const auto init = scan(rows, false);
  for (int64_t s = 0; s < n; ++s) {
    const Segment seg = segment(be, seg_dims(s), p, L, t0[s], &init[s]);
    be.ssd_dinitial(seg_dims(s), seg.inputs(), seg.dy, nullptr, state);
    be.ssd_segment_decay(seg_dims(s), seg.inputs(), decay);
    put_row(s);
  }
  const auto dfinal = scan(rows, true);

  SsdOut out;
  out.y = {d.d_inner(), std::vector<float>(d.tokens() * d.d_inner())};
  out.dxBC = {d.conv_dim(), std::vector<float>(d.tokens() * d.conv_dim())};
  out.ddt = {d.nheads, std::vector<float>(d.tokens() * d.nheads)};
  Tensor a = zeros(be, d.nheads), b = zeros(be, d.nheads), c = zeros(be, d.nheads);
  for (int64_t s = 0; s < n; ++s) {
    SsdOut o;
    ssd_call(be, seg_dims(s), L, t0[s], p, s > 0 ? &init[s] : nullptr,
             s + 1 < n ? &dfinal[s] : nullptr, a, b, c, o);
    put_segment(out, d, t0[s], o, segs[s]);
    if (s == 0) out.d_init = o.d_init;
    if (s == n - 1) out.final_state = o.final_state;
  }
  out.d_dt_bias = down(be, a), out.dA_log = down(be, b), out.dD = down(be, c);
  return out;
}

void expect_same(const SsdOut& got, const SsdOut& ref, double tol, const std::string& what) {
  const std::pair<const char*, std::pair<const std::vector<float>*, const std::vector<float>*>> cmp[] = {
      {"y", {&got.y.v, &ref.y.v}},
      {"dxBC", {&got.dxBC.v, &ref.dxBC.v}},
      {"ddt", {&got.ddt.v, &ref.ddt.v}},
      {"final_state", {&got.final_state, &ref.final_state}},
      {"d_initial_state", {&got.d_init, &ref.d_init}},
      {"d_dt_bias", {&got.d_dt_bias, &ref.d_dt_bias}},
      {"dA_log", {&got.dA_log, &ref.dA_log}},
      {"dD", {&got.dD, &ref.dD}}};
  double worst = 0;
  for (const auto& [name, ab] : cmp) {
    const double e = ssdtest::rel_err(*ab.first, *ab.second);
    worst = std::max(worst, e);
    EXPECT_LE(e, tol) << what << ": " << name;
  }
  std::printf("%s: largest relative difference %.2e\n", what.c_str(), worst);
}

// The causal conv + SiLU over whole sequences, and segment by segment with halos.
struct ConvOut {
  Rows out, din;
  std::vector<float> dw, db;
};

ConvOut conv_call(Backend& be, const Rows& in, int64_t batch, int64_t len, const Tensor& w,
                  const Tensor& bias, const Rows& dout) {
  const DType cd = be.compute_dtype();
  const int64_t C = in.width;
  Tensor tin = up(be, in.v, {batch * len, C}, cd), tdout = up(be, dout.v, {batch * len, C}, cd);
  Tensor out = be.alloc({batch * len, C}, cd), din = be.alloc({batch * len, C}, cd);
  Tensor dw = be.alloc(w.shape, be.accum_dtype()), db = be.alloc({C}, be.accum_dtype());
  be.zero(dw);
  be.zero(db);
  be.conv1d_silu_fwd(all_cols(tin), batch, len, w, bias, out);
  ColSlice dins = all_cols(din);
  be.conv1d_silu_bwd(all_cols(tin), batch, len, w, bias, tdout, dins, dw, db);
  return {{C, down(be, out)}, {C, down(be, din)}, down(be, dw), down(be, db)};
}

ConvOut conv_split(Backend& be, const Rows& in, int64_t batch, int64_t L, const Tensor& w,
                   const Tensor& bias, const Rows& dout, const std::vector<int64_t>& segs, int64_t K) {
  const int64_t C = in.width, H = K - 1;
  ConvOut r{{C, std::vector<float>(batch * L * C)}, {C, std::vector<float>(batch * L * C)},
            std::vector<float>(C * K, 0.f), std::vector<float>(C, 0.f)};
  int64_t t0 = 0;
  for (int64_t n : segs) {
    // A segment after the first sees the previous segment's last H inputs first; its outputs
    // there are the previous segment's, so their output gradient is zero.
    const int64_t h = t0 == 0 ? 0 : H;
    Rows x = slice(in, batch, L, t0 - h, n + h);
    Rows g = slice(dout, batch, L, t0 - h, n + h);
    for (int64_t b = 0; b < batch; ++b)
      std::fill_n(g.v.begin() + b * (n + h) * C, h * C, 0.f);
    ConvOut o = conv_call(be, x, batch, n + h, w, bias, g);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t t = 0; t < n + h; ++t)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t src = (b * (n + h) + t) * C + c, dst = (b * L + t0 - h + t) * C + c;
          if (t >= h) r.out.v[dst] = o.out.v[src];
          r.din.v[dst] += o.din.v[src];  // the halo's gradient goes back to its segment
        }
    for (size_t i = 0; i < r.dw.size(); ++i) r.dw[i] += o.dw[i];
    for (size_t i = 0; i < r.db.size(); ++i) r.db[i] += o.db[i];
    t0 += n;
  }
  return r;
}

const std::vector<SsdCase>& cases() {
  static const std::vector<SsdCase> c = [] {
    SsdDims d;
    d.batch = 2, d.seqlen = 200, d.nheads = 4, d.headdim = 64, d.ngroups = 2, d.dstate = 64,
    d.chunk = 64;
    return std::vector<SsdCase>{{d, {96, 104}}, {d, {50, 50, 50, 50}}, {d, {64, 128, 3, 5}}};
  }();
  return c;
}

std::string seg_name(const std::vector<int64_t>& s) {
  std::string out;
  for (auto n : s) out += (out.empty() ? "" : "+") + std::to_string(n);
  return out;
}

void check_backend(Backend& be, bool gpu) {
  auto cpu = make_cpu_backend(DType::F32);
  const double tol = gpu ? 1e-2 : 1e-5;
  for (const auto& c : cases()) {
    const Problem p = make_problem(c.d, gpu);
    const SsdOut ref = ssd_whole(*cpu, c.d, p);
    expect_same(ssd_split(be, c.d, p, c.segments), ref, tol,
                std::string(gpu ? "cuda" : "cpu") + " ssd segments " + seg_name(c.segments));
    // The conv over the xBC columns.
    const int64_t K = 4, C = c.d.conv_dim(), B = c.d.batch, L = c.d.seqlen;
    auto wv = ssdtest::uniform<float>(C * K, 21, -0.5, 0.5), bv = ssdtest::uniform<float>(C, 22, -0.5, 0.5);
    Rows dout{C, ssdtest::randn<float>(B * L * C, 23)};
    if (gpu)
      for (auto& v : dout.v) v = round_bf16(v);
    Tensor wc = up(*cpu, wv, {C, 1, K}, DType::F32), bc = up(*cpu, bv, {C}, DType::F32);
    Tensor wb = up(be, wv, {C, 1, K}, be.accum_dtype()), bb = up(be, bv, {C}, be.accum_dtype());
    const ConvOut cref = conv_call(*cpu, p.xBC, B, L, wc, bc, dout);
    const ConvOut got = conv_split(be, p.xBC, B, L, wb, bb, dout, c.segments, K);
    const std::string what = std::string(gpu ? "cuda" : "cpu") + " conv segments " + seg_name(c.segments);
    EXPECT_LE(ssdtest::rel_err(got.out.v, cref.out.v), tol) << what << ": out";
    EXPECT_LE(ssdtest::rel_err(got.din.v, cref.din.v), tol) << what << ": din";
    EXPECT_LE(ssdtest::rel_err(got.dw, cref.dw), tol) << what << ": dw";
    EXPECT_LE(ssdtest::rel_err(got.db, cref.db), tol) << what << ": dbias";
  }
}

// Decays that carry a good share of a state across a segment (exp(-0.1) to exp(-5) over 100
// tokens), so that every term of the scans weighs in the results.
void moderate_decays(Problem& p) {
  p.A_log = ssdtest::uniform<float>(p.A_log.size(), 31, 0.02, 0.5);
  for (auto& v : p.A_log) v = std::log(v);
  p.dt_bias = ssdtest::uniform<float>(p.dt_bias.size(), 32, 0.01, 0.1);
  for (auto& v : p.dt_bias) v = std::log(std::expm1(v));
}

std::string docs_name(bool docs) { return docs ? " with document starts" : ""; }

// ssd_final_state equals ssd_fwd's final state and ssd_dinitial ssd_bwd's d_initial_state, with
// and without an initial state and a final-state gradient, with and without document starts;
// where the backend keeps the forward's intermediates, ssd_dinitial reading them too.
void check_cheap_passes(Backend& be, bool gpu) {
  auto cpu = make_cpu_backend(DType::F32);
  const double tol = gpu ? 1e-2 : 1e-5;
  const DType ad = be.accum_dtype();
  const SsdDims& d = cases()[0].d;
  for (bool docs : {false, true})
      for (bool boundary : {false, true}) {
        Problem p = make_problem(d, gpu);
        if (docs) p.reset = document_starts(d);
        if (!boundary) p.init.clear(), p.dfinal.clear();
        const SsdOut ref = ssd_whole(*cpu, d, p);
        const std::string what = std::string(gpu ? "cuda" : "cpu") + docs_name(docs) +
                                 (boundary ? ", from an initial state" : "");
        const Segment seg = segment(be, d, p, d.seqlen, 0, given(p.init));
        Tensor st = be.alloc(state_shape(d), ad), dfinal;
        be.ssd_final_state(d, seg.inputs(), st);
        const double ef = ssdtest::rel_err(down(be, st), ref.final_state);
        EXPECT_LE(ef, tol) << what << ": final state";
        if (boundary) dfinal = up(be, p.dfinal, state_shape(d), ad);
        be.ssd_dinitial(d, seg.inputs(), seg.dy, boundary ? &dfinal : nullptr, st);
        const double ed = ssdtest::rel_err(down(be, st), ref.d_init);
        EXPECT_LE(ed, tol) << what << ": d_initial_state";
        std::printf("%s, seqlen %lld: final state %.2e, d_initial_state %.2e\n", what.c_str(),
                    (long long)d.seqlen, ef, ed);
        if (const int64_t bytes = be.ssd_saved_bytes(d); bytes > 0) {
          Tensor saved = be.alloc({(bytes + 3) / 4}, DType::F32);
          SsdInputs in = seg.inputs();
          in.saved = &saved;
          Tensor y = be.alloc({d.tokens(), d.d_inner()}, be.compute_dtype());
          be.ssd_fwd(d, in, y, nullptr);
          be.ssd_dinitial(d, in, seg.dy, boundary ? &dfinal : nullptr, st);
          EXPECT_LE(ssdtest::rel_err(down(be, st), ref.d_init), tol)
              << what << ": d_initial_state from the forward's saved intermediates";
        }
      }
}

// ssd_segment_decay against exp(sum_t dt_t A_h) in float64, 0 for a sequence with a document
// start (the first sequence has one, the second none).
void check_segment_decay(Backend& be, bool gpu) {
  const SsdDims d = cases()[0].d;
  for (bool docs : {false, true}) {
    Problem p = make_problem(d, gpu);
    moderate_decays(p);
    if (docs) {
      p.reset.assign(d.tokens(), 0);
      p.reset[150] = 1;
    }
    std::vector<double> naive(d.batch * d.nheads);
    for (int64_t b = 0; b < d.batch; ++b)
      for (int64_t h = 0; h < d.nheads; ++h) {
        double sum = 0;
        bool any = false;
        for (int64_t t = 0; t < d.seqlen; ++t) {
          const double z = double(p.dt.v[(b * d.seqlen + t) * d.nheads + h]) + p.dt_bias[h];
          const double dt = z > 20 ? z : std::log1p(std::exp(z));
          sum += dt * -std::exp(double(p.A_log[h]));
          any |= !p.reset.empty() && p.reset[b * d.seqlen + t] != 0;
        }
        naive[b * d.nheads + h] = any ? 0.0 : std::exp(sum);
      }
    const Segment seg = segment(be, d, p, d.seqlen, 0, nullptr);
    Tensor g = be.alloc({d.batch, d.nheads}, be.accum_dtype());
    be.ssd_segment_decay(d, seg.inputs(), g);
    const auto got = down(be, g);
    const std::string what = std::string(gpu ? "cuda" : "cpu") + " segment decay" + docs_name(docs);
    const double e = ssdtest::rel_err(got, naive);
    EXPECT_LE(e, gpu ? 1e-2 : 1e-5) << what;
    std::printf("%s: relative difference %.2e\n", what.c_str(), e);
    double hi = 0;  // the second sequence's decays are neither negligible nor 1
    for (int64_t h = 0; h < d.nheads; ++h) {
      hi = std::max(hi, naive[d.nheads + h]);
      if (docs) EXPECT_EQ(got[h], 0.f) << what << ": head " << h;
    }
    EXPECT_GT(hi, 1e-2) << what;
    EXPECT_LT(hi, 0.99) << what;
  }
}

// The all-gather combine over the cases' segmentations equals the unsplit op.
void check_allgather(Backend& be, bool gpu) {
  auto cpu = make_cpu_backend(DType::F32);
  const double tol = gpu ? 1e-2 : 1e-5;
  for (const auto& c : cases())
    for (bool docs : {false, true}) {
      Problem p = make_problem(c.d, gpu);
      moderate_decays(p);
      p.init.clear(), p.dfinal.clear();
      if (docs) p.reset = document_starts(c.d);
      const SsdOut ref = ssd_whole(*cpu, c.d, p);
      expect_same(ssd_allgather(be, c.d, p, c.segments), ref, tol,
                  std::string(gpu ? "cuda" : "cpu") + " all-gather combine, segments " +
                      seg_name(c.segments) + docs_name(docs));
    }
}

bool no_gpu() { return cuda_device_count() == 0; }
#define SKIP_WITHOUT_GPU() \
  if (no_gpu()) GTEST_SKIP() << "no CUDA GPU here (or built without CUDA)"

}  // namespace

TEST(ContextParallelOps, CpuCheapPassesEqualTheFullOps) {
  auto be = make_cpu_backend(DType::F32);
  check_cheap_passes(*be, false);
}

TEST(ContextParallelOps, CpuSegmentDecayEqualsFloat64) {
  auto be = make_cpu_backend(DType::F32);
  check_segment_decay(*be, false);
}

TEST(ContextParallelOps, CpuAllGatherCombineEqualsTheWholeSequence) {
  auto be = make_cpu_backend(DType::F32);
  check_allgather(*be, false);
}

TEST(ContextParallelOps, CudaCheapPassesEqualTheFullCpuOps) {
  SKIP_WITHOUT_GPU();
  auto be = make_cuda_backend(0);
  check_cheap_passes(*be, true);
}

TEST(ContextParallelOps, CudaSegmentDecayEqualsFloat64) {
  SKIP_WITHOUT_GPU();
  auto be = make_cuda_backend(0);
  check_segment_decay(*be, true);
}

TEST(ContextParallelOps, CudaAllGatherCombineEqualsTheWholeCpuSequence) {
  SKIP_WITHOUT_GPU();
  auto be = make_cuda_backend(0);
  check_allgather(*be, true);
}

TEST(ContextParallelOps, CpuSegmentsEqualTheWholeSequence) {
  auto be = make_cpu_backend(DType::F32);
  check_backend(*be, false);
}

TEST(ContextParallelOps, CudaSegmentsEqualTheWholeCpuSequence) {
  SKIP_WITHOUT_GPU();
  auto be = make_cuda_backend(0);
  check_backend(*be, true);
}
