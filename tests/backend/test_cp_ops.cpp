// Context parallelism at the op level: the SSD and the causal conv of sequences split into 2 and
// 4 segments, each segment's SSD started from the state the previous one ended with (and its
// gradient handed back), each segment's conv given the previous segment's last d_conv-1 inputs
// as a halo (and their gradient handed back), equal the unsplit ops: outputs and every gradient.
// Segments of unequal lengths leave partial chunks inside them; two groups. CPU fp32 against the
// unsplit CPU op (1e-5), and the CUDA backend's split ops against the unsplit CPU op on the same
// bf16-rounded inputs (the 1e-2 of the CUDA SSD tests).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numeric>

#include "backend/backend.h"
#include "testutil.h"

using namespace ssd;

namespace {

float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// Host data of one op call over `batch` sequences of `len` tokens, rows batch-major.
struct Rows {
  int64_t width = 0;
  std::vector<float> v;  // [batch * len, width]
};
// Tokens [t0, t0 + n) of every sequence.
Rows slice(const Rows& r, int64_t batch, int64_t len, int64_t t0, int64_t n) {
  Rows out{r.width, std::vector<float>(batch * n * r.width)};
  for (int64_t b = 0; b < batch; ++b)
    std::copy_n(r.v.begin() + (b * len + t0) * r.width, n * r.width,
                out.v.begin() + b * n * r.width);
  return out;
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
  std::vector<float> dt_bias, A_log, D, init, dfinal;
};

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

// One SSD call (forward and backward) over `len` tokens of each sequence.
void ssd_call(Backend& be, SsdDims d, const Rows& xBC, const Rows& dt, const Rows& dy,
              const Problem& p, const std::vector<float>* init, const std::vector<float>* dfinal,
              Tensor& d_dt_bias, Tensor& dA_log, Tensor& dD, SsdOut& out) {
  const DType cd = be.compute_dtype(), ad = be.accum_dtype();
  const int64_t T = d.tokens(), H = d.nheads;
  const Shape st = {d.batch, H, d.headdim, d.dstate};
  Tensor tx = up(be, xBC.v, {T, d.conv_dim()}, cd), tdt = up(be, dt.v, {T, H}, cd);
  Tensor tdy = up(be, dy.v, {T, d.d_inner()}, cd);
  Tensor tinit, tdfinal;
  SsdInputs in;
  in.xBC = tx;
  in.dt = all_cols(tdt);
  in.dt_bias = up(be, p.dt_bias, {H}, ad);
  in.A_log = up(be, p.A_log, {H}, ad);
  in.D = up(be, p.D, {H}, ad);
  if (init) tinit = up(be, *init, st, ad), in.initial_state = &tinit;
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

// The whole sequences in one call.
SsdOut ssd_whole(Backend& be, const SsdDims& d, const Problem& p) {
  SsdOut o;
  Tensor a = zeros(be, d.nheads), b = zeros(be, d.nheads), c = zeros(be, d.nheads);
  ssd_call(be, d, p.xBC, p.dt, p.dy, p, &p.init, &p.dfinal, a, b, c, o);
  o.d_dt_bias = down(be, a), o.dA_log = down(be, b), o.dD = down(be, c);
  return o;
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
    ssd_call(be, ds, slice(p.xBC, d.batch, L, t0[s], segs[s]), slice(p.dt, d.batch, L, t0[s], segs[s]),
             slice(p.dy, d.batch, L, t0[s], segs[s]), p, &init[s], nullptr, x, y, z, o);
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
    ssd_call(be, ds, slice(p.xBC, d.batch, L, t0[s], segs[s]), slice(p.dt, d.batch, L, t0[s], segs[s]),
             slice(p.dy, d.batch, L, t0[s], segs[s]), p, &init[s], &dnext, a, b, c, o);
    put(out.y, d.batch, L, t0[s], o.y, segs[s]);
    put(out.dxBC, d.batch, L, t0[s], o.dxBC, segs[s]);
    put(out.ddt, d.batch, L, t0[s], o.ddt, segs[s]);
    dnext = o.d_init;
    if (s == n - 1) out.final_state = o.final_state;
  }
  out.d_init = dnext;
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
  for (const auto& [name, ab] : cmp)
    EXPECT_LE(ssdtest::rel_err(*ab.first, *ab.second), tol) << what << ": " << name;
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

}  // namespace

TEST(ContextParallelOps, CpuSegmentsEqualTheWholeSequence) {
  auto be = make_cpu_backend(DType::F32);
  check_backend(*be, false);
}

TEST(ContextParallelOps, CudaSegmentsEqualTheWholeCpuSequence) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU here (or built without CUDA)";
  auto be = make_cuda_backend(0);
  check_backend(*be, true);
}
