// The CUDA backend against the CPU reference backend (f32), op by op, forward and backward.
// Every op runs on both backends from the same inputs: inputs in the compute dtype are rounded
// to bf16 on the host first, so both backends see identical values. Each output tensor is
// compared by relative error (max abs difference / max abs reference; NaN fails): <= 1e-2 for
// outputs that go through bf16, <= 1e-4 for the fp32 paths (AdamW, sum_squares). Parameter
// gradients start from random values, so accumulation (+=) is checked too. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "testutil.h"

namespace {

using namespace ssd;
using Vf = std::vector<float>;
using Outs = std::vector<std::pair<std::string, Vf>>;

constexpr double kTolBf16 = 1e-2;
constexpr double kTolF32 = 1e-4;

// ---- host bf16 ----
uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
float bf2f(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
Vf round_bf16(Vf v) {
  for (auto& x : v) x = bf2f(f2bf(x));
  return v;
}

Vf randn(size_t n, uint64_t seed, double scale = 1.0) {
  return ssdtest::randn<float>(n, seed, scale);
}

// ---- moving data ----
Tensor put(Backend& be, const Vf& v, const Shape& s, DType dt) {
  Tensor t = be.alloc(s, dt);
  EXPECT_EQ(static_cast<size_t>(t.numel()), v.size());
  switch (dt) {
    case DType::F32: be.upload(t, v.data()); break;
    case DType::BF16: {
      std::vector<uint16_t> b(v.size());
      for (size_t i = 0; i < v.size(); ++i) b[i] = f2bf(v[i]);
      be.upload(t, b.data());
      break;
    }
    case DType::F64: {
      std::vector<double> d(v.begin(), v.end());
      be.upload(t, d.data());
      break;
    }
    default: ADD_FAILURE() << "put: bad dtype";
  }
  return t;
}
Tensor put_i32(Backend& be, const std::vector<int32_t>& v, const Shape& s) {
  Tensor t = be.alloc(s, DType::I32);
  be.upload(t, v.data());
  return t;
}
Vf get(Backend& be, const Tensor& t) {
  const size_t n = static_cast<size_t>(t.numel());
  Vf r(n);
  switch (t.dtype) {
    case DType::F32: be.download(r.data(), t); break;
    case DType::BF16: {
      std::vector<uint16_t> b(n);
      be.download(b.data(), t);
      for (size_t i = 0; i < n; ++i) r[i] = bf2f(b[i]);
      break;
    }
    case DType::F64: {
      std::vector<double> d(n);
      be.download(d.data(), t);
      for (size_t i = 0; i < n; ++i) r[i] = static_cast<float>(d[i]);
      break;
    }
    default: ADD_FAILURE() << "get: bad dtype";
  }
  return r;
}

// Compute-dtype / accum-dtype helpers.
Tensor putc(Backend& be, const Vf& v, const Shape& s) { return put(be, v, s, be.compute_dtype()); }
Tensor puta(Backend& be, const Vf& v, const Shape& s) { return put(be, v, s, be.accum_dtype()); }

double g_worst_bf16 = 0, g_worst_f32 = 0;

void compare(const char* test, const Outs& gpu, const Outs& cpu, double tol) {
  ASSERT_EQ(gpu.size(), cpu.size());
  for (size_t i = 0; i < gpu.size(); ++i) {
    ASSERT_EQ(gpu[i].first, cpu[i].first);
    const double e = ssdtest::rel_err(gpu[i].second, cpu[i].second);
    std::printf("    [%s] %-28s rel err %.3e (tol %.0e)\n", test, gpu[i].first.c_str(), e, tol);
    double& worst = tol >= kTolBf16 ? g_worst_bf16 : g_worst_f32;
    worst = std::max(worst, e);
    EXPECT_LE(e, tol) << test << ": " << gpu[i].first;
  }
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0)
      GTEST_SKIP() << "no CUDA GPU (or built without CUDA): CUDA backend tests skipped";
    gpu = make_cuda_backend(0);
    cpu = make_cpu_backend(DType::F32);
  }
  // Runs f on both backends and compares what it returns.
  template <class F>
  void both(const char* name, double tol, F&& f) {
    Outs g = f(*gpu);
    gpu->synchronize();
    Outs c = f(*cpu);
    compare(name, g, c, tol);
  }
  std::unique_ptr<Backend> gpu, cpu;
};

// ------------------------------------------------------------------------------- memory

TEST_F(CudaOps, BackendBasics) {
  EXPECT_EQ(gpu->device(), Device::CUDA);
  EXPECT_EQ(gpu->compute_dtype(), DType::BF16);
  EXPECT_EQ(gpu->accum_dtype(), DType::F32);
  // The cache hands a freed block straight back for the same size.
  void* first;
  {
    Tensor t = gpu->alloc({1000, 3}, DType::F32);
    first = t.data;
  }
  Tensor t2 = gpu->alloc({3000}, DType::F32);
  EXPECT_EQ(t2.data, first);
  // zero
  Vf ones(3000, 1.f);
  gpu->upload(t2, ones.data());
  gpu->zero(t2);
  for (float x : get(*gpu, t2)) ASSERT_EQ(x, 0.f);
  // Clear errors for wrong dtypes / shapes.
  Tensor x = gpu->alloc({4, 8}, DType::F32), w = gpu->alloc({5, 8}, DType::BF16);
  Tensor y = gpu->alloc({4, 5}, DType::BF16);
  EXPECT_THROW(gpu->linear_fwd(x, w, y), ssd::Error);
  Tensor x2 = gpu->alloc({4, 7}, DType::BF16);
  EXPECT_THROW(gpu->linear_fwd(x2, w, y), ssd::Error);
  Tensor host = cpu->alloc({4, 8}, DType::F32);
  EXPECT_THROW(gpu->zero(host), ssd::Error);
}

TEST_F(CudaOps, Convert) {
  const int64_t n = 10007;
  Vf v = randn(n, 1, 3.0);
  v[0] = 1.00390625f;  // a tie: rounds to even (1.0)
  v[1] = 1e30f;
  Tensor f = put(*gpu, v, {n}, DType::F32);
  Tensor b = gpu->alloc({n}, DType::BF16), f2 = gpu->alloc({n}, DType::F32);
  Tensor d = gpu->alloc({n}, DType::F64), f3 = gpu->alloc({n}, DType::F32);
  gpu->convert(f, b);
  gpu->convert(b, f2);
  gpu->convert(f, d);
  gpu->convert(d, f3);
  Vf r = round_bf16(v);
  EXPECT_EQ(get(*gpu, b), r);
  EXPECT_EQ(get(*gpu, f2), r);
  EXPECT_EQ(get(*gpu, f3), v);
  std::vector<double> dd(n);
  gpu->download(dd.data(), d);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(dd[i], static_cast<double>(v[i]));
  std::vector<int32_t> iv(n);
  for (int64_t i = 0; i < n; ++i) iv[i] = static_cast<int32_t>(i * 7 - 5000);
  Tensor i1 = put_i32(*gpu, iv, {n}), i2 = gpu->alloc({n}, DType::I32);
  gpu->convert(i1, i2);
  std::vector<int32_t> back(n);
  gpu->download(back.data(), i2);
  EXPECT_EQ(back, iv);
  EXPECT_THROW(gpu->convert(i1, f2), ssd::Error);
}

// ------------------------------------------------------------------------------- layers

TEST_F(CudaOps, Embedding) {
  // Small: a frequent token among many; large: one token fills most rows (a run of sorted
  // positions far longer than any block or segment of the backward's reduction).
  struct Case { int64_t V, D, T; int every; };
  for (Case c : {Case{37, 300, 203, 5}, Case{50, 768, 5000, 2}}) {
    const int64_t V = c.V, D = c.D, T = c.T;
    std::vector<int32_t> tok(T);
    for (int64_t t = 0; t < T; ++t) tok[t] = static_cast<int32_t>((t * 13 + 5) % V);
    for (int64_t t = 0; t < T; t += c.every) tok[t] = 3;  // a frequent token
    if (T > 1000)
      for (int64_t t = 1; t < T; t += 4) tok[t] = 3;
    const Vf w = round_bf16(randn(V * D, 1));
    const Vf dout = randn(T * D, 2);
    const Vf dw0 = randn(V * D, 3);
    for (bool dout_compute : {false, true}) {
      const std::string name = std::string(dout_compute ? "embedding bf16 dout" : "embedding f32 dout") +
                               " T" + std::to_string(T);
      both(name.c_str(), kTolBf16, [&](Backend& be) -> Outs {
        Tensor tk = put_i32(be, tok, {T});
        Tensor wt = putc(be, w, {V, D});
        Tensor out = be.alloc({T, D}, be.compute_dtype());
        be.embedding_fwd(tk, wt, out);
        Tensor g = dout_compute ? putc(be, round_bf16(dout), {T, D}) : puta(be, dout, {T, D});
        Tensor dw = puta(be, dw0, {V, D});
        be.embedding_bwd(tk, g, dw);
        be.embedding_bwd(tk, g, dw);  // accumulates
        return {{"out", get(be, out)}, {"dweight", get(be, dw)}};
      });
    }
  }
}

TEST_F(CudaOps, AddRmsNorm) {
  // Widths that the kernels vectorise (multiples of 256, up to the 2.7B model's 2560) and one
  // that they do not (1100).
  // 2100 rows: more than the backward's 1024 blocks, so blocks walk several rows.
  for (auto [T, D] :
       {std::pair<int64_t, int64_t>{77, 1100}, {130, 768}, {9, 2560}, {2100, 768}}) {
  const double eps = 1e-5;
  const Vf x = round_bf16(randn(T * D, 10));
  const Vf res = randn(T * D, 11, 2.0);
  Vf wt = randn(D, 12, 0.2);
  for (auto& v : wt) v += 1.f;
  const Vf dy = round_bf16(randn(T * D, 13));
  const Vf dnext = randn(T * D, 14);
  const Vf dw0 = randn(D, 15);
  for (int variant = 0; variant < 2; ++variant) {
    const bool with_res = variant == 0;
    const std::string name = std::string(with_res ? "add_rmsnorm" : "add_rmsnorm first layer") +
                             " D" + std::to_string(D);
    both(name.c_str(), kTolBf16,
         [&](Backend& be) -> Outs {
           Tensor xt = putc(be, x, {T, D});
           Tensor rin = puta(be, res, {T, D});
           Tensor w = puta(be, wt, {D});
           Tensor rout = be.alloc({T, D}, be.accum_dtype());
           Tensor y = be.alloc({T, D}, be.compute_dtype());
           Tensor rstd = be.alloc({T}, be.accum_dtype());
           be.add_rmsnorm_fwd(xt, with_res ? &rin : nullptr, w, eps, rout, y, rstd);
           Tensor g = putc(be, dy, {T, D});
           Tensor dn = puta(be, dnext, {T, D});
           Tensor dres = be.alloc({T, D}, be.accum_dtype());
           Tensor dw = puta(be, dw0, {D});
           be.add_rmsnorm_bwd(g, with_res ? &dn : nullptr, rout, w, rstd, dres, dw);
           return {{"residual_out", get(be, rout)}, {"y", get(be, y)},
                   {"rstd", get(be, rstd)},         {"d_residual", get(be, dres)},
                   {"dweight", get(be, dw)}};
         });
  }
  }
}

TEST_F(CudaOps, Linear) {
  struct Case { int64_t M, N, K; };
  for (Case c : {Case{67, 45, 96}, Case{50, 33, 17}, Case{256, 384, 128}}) {
    const Vf x = round_bf16(randn(c.M * c.K, 20));
    const Vf w = round_bf16(randn(c.N * c.K, 21, 0.1));
    const Vf dy = round_bf16(randn(c.M * c.N, 22));
    const Vf dw0 = randn(c.N * c.K, 23);
    for (int variant = 0; variant < 3; ++variant) {
      // 0: bf16 dy with dx; 1: no dx; 2: fp32 dy (converted internally on the GPU)
      const std::string name = "linear " + std::to_string(c.M) + "x" + std::to_string(c.N) +
                               "x" + std::to_string(c.K) + " v" + std::to_string(variant);
      both(name.c_str(), kTolBf16, [&](Backend& be) -> Outs {
        Tensor xt = putc(be, x, {c.M, c.K}), wt = putc(be, w, {c.N, c.K});
        Tensor y = be.alloc({c.M, c.N}, be.compute_dtype());
        be.linear_fwd(xt, wt, y);
        Tensor g = variant == 2 ? puta(be, dy, {c.M, c.N}) : putc(be, dy, {c.M, c.N});
        Tensor dx = be.alloc({c.M, c.K}, be.compute_dtype());
        Tensor dw = puta(be, dw0, {c.N, c.K});
        be.linear_bwd(xt, wt, g, variant == 1 ? nullptr : &dx, dw);
        Outs o{{"y", get(be, y)}, {"dw", get(be, dw)}};
        if (variant != 1) o.push_back({"dx", get(be, dx)});
        return o;
      });
    }
  }
}

TEST_F(CudaOps, Conv1dSilu) {
  struct Case { int64_t B, L, C, K; };
  // Sequences shorter and longer than the kernels' 64-token tiles; widths 2..4 (compiled for
  // each width) and 5 (the generic runtime-width kernels).
  for (Case cs :
       {Case{3, 50, 70, 4}, Case{2, 130, 200, 3}, Case{1, 64, 130, 2}, Case{2, 70, 40, 5},
        Case{2, 300, 1792, 4}, Case{1, 257, 264, 4}}) {
    const int64_t B = cs.B, L = cs.L, C = cs.C, K = cs.K, T = B * L;
    // Column slices 16-byte aligned (as in the model) when C allows it, else not.
    const bool al = C % 8 == 0;
    const int64_t ld_in = C + (al ? 40 : 30), off_in = al ? 16 : 20;
    const int64_t ld_din = C + (al ? 24 : 20), off_din = al ? 8 : 7;
    const Vf in = round_bf16(randn(T * ld_in, 30));
    const Vf w = randn(C * K, 31, 0.5);
    const Vf b = randn(C, 32, 0.3);
    const Vf dout = round_bf16(randn(T * C, 33));
    const Vf din0 = round_bf16(randn(T * ld_din, 34));  // columns outside the slice survive
    const Vf dw0 = randn(C * K, 35), db0 = randn(C, 36);
    const std::string name = "conv1d_silu B" + std::to_string(B) + " L" + std::to_string(L) +
                             " C" + std::to_string(C) + " K" + std::to_string(K);
    both(name.c_str(), kTolBf16, [&](Backend& be) -> Outs {
      Tensor it = putc(be, in, {T, ld_in});
      Tensor wt = puta(be, w, {C, 1, K}), bt = puta(be, b, {C});
      Tensor out = be.alloc({T, C}, be.compute_dtype());
      be.conv1d_silu_fwd(cols(it, off_in, C), B, L, wt, bt, out);
      Tensor g = putc(be, dout, {T, C});
      Tensor dinbuf = putc(be, din0, {T, ld_din});
      ColSlice din = cols(dinbuf, off_din, C);
      Tensor dw = puta(be, dw0, {C, 1, K}), db = puta(be, db0, {C});
      be.conv1d_silu_bwd(cols(it, off_in, C), B, L, wt, bt, g, din, dw, db);
      return {{"out", get(be, out)},
              {"din (whole buffer)", get(be, dinbuf)},
              {"dw", get(be, dw)},
              {"dbias", get(be, db)}};
    });
  }
}

// Packed documents: the conv with reset flags (random document starts, about one token in
// eight, so that starts fall on and just before the kernels' row segments and tiles), on the
// vector path (K 4, aligned) and the scalar kernels (K 3, 5; unaligned).
TEST_F(CudaOps, Conv1dSiluResets) {
  struct Case { int64_t B, L, C, K; };
  for (Case cs : {Case{3, 300, 264, 4}, Case{2, 130, 200, 3}, Case{2, 170, 40, 5},
                  Case{1, 700, 1792, 4}}) {
    const int64_t B = cs.B, L = cs.L, C = cs.C, K = cs.K, T = B * L;
    const bool al = C % 8 == 0;
    const int64_t ld_in = C + (al ? 40 : 30), off_in = al ? 16 : 20;
    const int64_t ld_din = C + (al ? 24 : 20), off_din = al ? 8 : 7;
    const Vf in = round_bf16(randn(T * ld_in, 130));
    const Vf w = randn(C * K, 131, 0.5);
    const Vf b = randn(C, 132, 0.3);
    const Vf dout = round_bf16(randn(T * C, 133));
    const Vf din0 = round_bf16(randn(T * ld_din, 134));
    const Vf dw0 = randn(C * K, 135), db0 = randn(C, 136);
    std::vector<int32_t> reset(T);
    const Vf u = ssdtest::uniform<float>(T, 137, 0.0, 1.0);
    for (int64_t i = 0; i < T; ++i) reset[i] = u[i] < 0.125f;
    for (int64_t r : {int64_t{1}, int64_t{2}, int64_t{32}, int64_t{33}, int64_t{63},
                      int64_t{64}, int64_t{131}, int64_t{132}})
      reset[r] = 1;
    const std::string name = "conv1d_silu resets B" + std::to_string(B) + " L" +
                             std::to_string(L) + " C" + std::to_string(C) + " K" +
                             std::to_string(K);
    both(name.c_str(), kTolBf16, [&](Backend& be) -> Outs {
      Tensor it = putc(be, in, {T, ld_in});
      Tensor wt = puta(be, w, {C, 1, K}), bt = puta(be, b, {C});
      Tensor rt = put_i32(be, reset, {T});
      Tensor out = be.alloc({T, C}, be.compute_dtype());
      be.conv1d_silu_fwd(cols(it, off_in, C), B, L, wt, bt, out, &rt);
      Tensor g = putc(be, dout, {T, C});
      Tensor dinbuf = putc(be, din0, {T, ld_din});
      ColSlice din = cols(dinbuf, off_din, C);
      Tensor dw = puta(be, dw0, {C, 1, K}), db = puta(be, db0, {C});
      be.conv1d_silu_bwd(cols(it, off_in, C), B, L, wt, bt, g, din, dw, db, &rt);
      return {{"out", get(be, out)},
              {"din (whole buffer)", get(be, dinbuf)},
              {"dw", get(be, dw)},
              {"dbias", get(be, db)}};
    });
  }
}

TEST_F(CudaOps, GatedRmsNorm) {
  // Small widths, and the widths the kernels vectorise (multiples of 256 up to 5120 = the 2.7B
  // model's d_inner, whole-row and per-group).
  // z and dz are column slices: 16-byte aligned as in the model (vector loads) or not.
  struct Case { int64_t T, D; std::vector<int64_t> groups; bool aligned; };
  // 2100 rows: more than the backward's 1024 blocks, so blocks walk several rows.
  for (const Case& c : {Case{70, 96, {32, 96}, false}, Case{33, 1536, {256, 768, 1536}, true},
                        Case{5, 5120, {5120, 1280}, true}, Case{12, 512, {512}, false},
                        Case{2100, 1536, {1536, 768}, true}}) {
  const int64_t T = c.T, D = c.D;
  const int64_t ld_z = 3 * D + (c.aligned ? 16 : 13), off_z = c.aligned ? 8 : 5;
  const int64_t ld_dz = 2 * D + (c.aligned ? 64 : 58), off_dz = c.aligned ? 16 : 3;
  const double eps = 1e-5;
  const Vf y = round_bf16(randn(T * D, 40));
  const Vf z = round_bf16(randn(T * ld_z, 41, 1.5));
  Vf wt = randn(D, 42, 0.2);
  for (auto& v : wt) v += 1.f;
  const Vf dout = round_bf16(randn(T * D, 43));
  const Vf dz0 = round_bf16(randn(T * ld_dz, 44));
  const Vf dw0 = randn(D, 45);
  for (int64_t group : c.groups) {
    const std::string name = "gated_rmsnorm D" + std::to_string(D) + " group " + std::to_string(group);
    both(name.c_str(), kTolBf16, [&](Backend& be) -> Outs {
      Tensor yt = putc(be, y, {T, D}), zt = putc(be, z, {T, ld_z});
      Tensor w = puta(be, wt, {D});
      Tensor out = be.alloc({T, D}, be.compute_dtype());
      Tensor rstd = be.alloc({T, D / group}, be.accum_dtype());
      be.gated_rmsnorm_fwd(yt, cols(zt, off_z, D), w, group, eps, out, rstd);
      Tensor g = putc(be, dout, {T, D});
      Tensor dy = be.alloc({T, D}, be.compute_dtype());
      Tensor dzbuf = putc(be, dz0, {T, ld_dz});
      ColSlice dz = cols(dzbuf, off_dz, D);
      Tensor dw = puta(be, dw0, {D});
      be.gated_rmsnorm_bwd(g, yt, cols(zt, off_z, D), w, group, rstd, dy, dz, dw);
      return {{"out", get(be, out)},
              {"rstd", get(be, rstd)},
              {"dy", get(be, dy)},
              {"dz (whole buffer)", get(be, dzbuf)},
              {"dweight", get(be, dw)}};
    });
  }
  }
}

// LM head + cross-entropy: vocab not a multiple of anything, ignored targets (including a
// whole block of them), token counts not multiples of the block size (SSD_CUDA_CE_BLOCK_TOKENS).
TEST_F(CudaOps, LmHeadCrossEntropy) {
  // V = 1003: the scalar softmax path; V = 1000 (a multiple of 4): the float4 path.
  for (const int64_t V : {int64_t(1003), int64_t(1000)}) {
  const int64_t T = 150, Dm = 64;
  std::vector<int32_t> tg(T);
  for (int64_t t = 0; t < T; ++t) tg[t] = static_cast<int32_t>((t * 389 + 11) % V);
  for (int64_t t = 0; t < T; t += 5) tg[t] = -1;
  for (int64_t t = 48; t < 96; ++t) tg[t] = -1;  // a whole block of 48 ignored
  const Vf w = round_bf16(randn(V * Dm, 50, 0.5));
  // Hidden states pointing at their target's embedding for half the tokens: argmax hits.
  Vf h = randn(T * Dm, 51, 0.5);
  for (int64_t t = 0; t < T; t += 2)
    if (tg[t] >= 0)
      for (int64_t c = 0; c < Dm; ++c) h[t * Dm + c] += 0.8f * w[tg[t] * Dm + c];
  h = round_bf16(h);
  const Vf dw0 = randn(V * Dm, 52);
  const Vf stats0{1.5f, 2.f, 3.f};
  const double gs = 0.5;

  for (const char* block : {"48", "7", ""}) {
    if (*block) setenv("SSD_CUDA_CE_BLOCK_TOKENS", block, 1);
    else unsetenv("SSD_CUDA_CE_BLOCK_TOKENS");
    gpu = make_cuda_backend(0);  // reads the variable
    unsetenv("SSD_CUDA_CE_BLOCK_TOKENS");
    for (bool train : {true, false}) {
      Vf stats_g, stats_c;
      auto run = [&](Backend& be, Vf& stats_out) -> Outs {
        Tensor ht = putc(be, h, {T, Dm}), wt = putc(be, w, {V, Dm});
        Tensor tt = put_i32(be, tg, {T});
        Tensor st = put(be, stats0, {3}, DType::F64);
        Tensor dh = be.alloc({T, Dm}, be.compute_dtype());
        Tensor dw = puta(be, dw0, {V, Dm});
        be.lm_head_ce(ht, wt, tt, gs, st, train ? &dh : nullptr, train ? &dw : nullptr);
        std::vector<double> s(3);
        be.download(s.data(), st);
        stats_out.assign(s.begin(), s.end());
        Outs o{{"loss sum", {static_cast<float>(s[0])}}};
        if (train) {
          o.push_back({"dhidden", get(be, dh)});
          o.push_back({"dweight", get(be, dw)});
        }
        return o;
      };
      const std::string name = "lm_head_ce V" + std::to_string(V) + " block " +
                               (*block ? block : "auto") + (train ? " train" : " eval");
      Outs g = run(*gpu, stats_g);
      Outs c = run(*cpu, stats_c);
      compare(name.c_str(), g, c, kTolBf16);
      EXPECT_NEAR(stats_g[0], stats_c[0], 1e-4 * std::fabs(stats_c[0])) << name;
      EXPECT_EQ(stats_g[1], stats_c[1]) << name;
      EXPECT_NEAR(stats_g[2], stats_c[2], 1.0) << name;  // a near-tie may flip one argmax
      EXPECT_GT(stats_c[2], stats0[2] + 10) << "test data should produce argmax hits";
      std::printf("    [%s] stats gpu {%.6f, %g, %g} cpu {%.6f, %g, %g}\n", name.c_str(),
                  stats_g[0], stats_g[1], stats_g[2], stats_c[0], stats_c[1], stats_c[2]);
    }
  }
  }
}

// ------------------------------------------------------------------------------- SSD

TEST_F(CudaOps, Ssd) {
  SsdDims d;
  d.batch = 2, d.seqlen = 100, d.nheads = 4, d.headdim = 32, d.ngroups = 2, d.dstate = 64;
  d.chunk = 64;  // seqlen 100: the last chunk is partial
  const int64_t T = d.tokens(), CD = d.conv_dim(), H = d.nheads;
  const int64_t ld_dt = CD + 2 * H, off_dt = CD + 3;
  const Vf xbc = round_bf16(randn(T * CD, 60, 0.5));
  const Vf dtbuf = round_bf16(randn(T * ld_dt, 61, 0.5));
  const Vf dt_bias = randn(H, 62, 0.3), A_log = randn(H, 63, 0.3), Dp = randn(H, 64);
  const Vf init = randn(d.batch * H * d.headdim * d.dstate, 65, 0.3);
  const Vf dy = round_bf16(randn(T * d.d_inner(), 66));
  const Vf dfin = randn(init.size(), 67, 0.3);
  const Vf ddt0 = round_bf16(randn(T * ld_dt, 68));
  const Vf g0 = randn(H, 69);
  const Shape st{d.batch, H, d.headdim, d.dstate};
  auto run = [&](Backend& be) -> Outs {
    Tensor x = putc(be, xbc, {T, CD}), dtt = putc(be, dtbuf, {T, ld_dt});
    Tensor is = puta(be, init, st);
    SsdInputs in{x, cols(dtt, off_dt, H), puta(be, dt_bias, {H}), puta(be, A_log, {H}),
                 puta(be, Dp, {H}), &is};
    Tensor y = be.alloc({T, d.d_inner()}, be.compute_dtype());
    Tensor fs = be.alloc(st, be.accum_dtype());
    be.ssd_fwd(d, in, y, &fs);
    Tensor g = putc(be, dy, {T, d.d_inner()}), df = puta(be, dfin, st);
    Tensor ddtbuf = putc(be, ddt0, {T, ld_dt});
    Tensor dis = be.alloc(st, be.accum_dtype());
    SsdGrads gr{be.alloc({T, CD}, be.compute_dtype()), cols(ddtbuf, off_dt, H),
                puta(be, g0, {H}), puta(be, g0, {H}), puta(be, g0, {H}), &dis};
    be.ssd_bwd(d, in, g, &df, gr);
    return {{"y", get(be, y)},           {"final_state", get(be, fs)},
            {"dxBC", get(be, gr.dxBC)},  {"ddt (whole buffer)", get(be, ddtbuf)},
            {"d_dt_bias", get(be, gr.d_dt_bias)}, {"dA_log", get(be, gr.dA_log)},
            {"dD", get(be, gr.dD)},      {"d_initial_state", get(be, dis)}};
  };
  Outs g = run(*gpu);
  Outs c = run(*cpu);
  compare("ssd", g, c, kTolBf16);
}

// The SSD through the backends with reset flags, the GPU keeping the forward's intermediates
// for the backward (as the model does).
TEST_F(CudaOps, SsdResets) {
  SsdDims d;
  d.batch = 2, d.seqlen = 200, d.nheads = 4, d.headdim = 32, d.ngroups = 2, d.dstate = 64;
  d.chunk = 64;
  const int64_t T = d.tokens(), CD = d.conv_dim(), H = d.nheads;
  const Vf xbc = round_bf16(randn(T * CD, 160, 0.5));
  const Vf dtv = round_bf16(randn(T * H, 161, 0.5));
  const Vf dt_bias = randn(H, 162, 0.3), A_log = randn(H, 163, 0.3), Dp = randn(H, 164);
  const Vf init = randn(d.batch * H * d.headdim * d.dstate, 165, 0.3);
  const Vf dy = round_bf16(randn(T * d.d_inner(), 166));
  const Vf dfin = randn(init.size(), 167, 0.3);
  const Vf g0 = randn(H, 169);
  std::vector<int32_t> reset(T, 0);
  for (int64_t t : {0, 5, 63, 64, 90, 91, 150, 199, 200 + 64, 200 + 100, 200 + 101})
    reset[t] = 1;
  const Shape st{d.batch, H, d.headdim, d.dstate};
  auto run = [&](Backend& be) -> Outs {
    Tensor x = putc(be, xbc, {T, CD}), dtt = putc(be, dtv, {T, H});
    Tensor is = puta(be, init, st), rt = put_i32(be, reset, {T});
    SsdInputs in{x, cols(dtt, 0, H), puta(be, dt_bias, {H}), puta(be, A_log, {H}),
                 puta(be, Dp, {H}), &is};
    in.reset = &rt;
    Tensor saved;
    if (const int64_t sb = be.ssd_saved_bytes(d); sb > 0) {
      saved = be.alloc({(sb + 3) / 4}, DType::F32);
      in.saved = &saved;
    }
    Tensor y = be.alloc({T, d.d_inner()}, be.compute_dtype());
    Tensor fs = be.alloc(st, be.accum_dtype());
    be.ssd_fwd(d, in, y, &fs);
    Tensor g = putc(be, dy, {T, d.d_inner()}), df = puta(be, dfin, st);
    Tensor dis = be.alloc(st, be.accum_dtype());
    SsdGrads gr{be.alloc({T, CD}, be.compute_dtype()), cols(be.alloc({T, H}, be.compute_dtype()), 0, H),
                puta(be, g0, {H}), puta(be, g0, {H}), puta(be, g0, {H}), &dis};
    be.ssd_bwd(d, in, g, &df, gr);
    return {{"y", get(be, y)},           {"final_state", get(be, fs)},
            {"dxBC", get(be, gr.dxBC)},  {"ddt", get(be, gr.ddt.t)},
            {"d_dt_bias", get(be, gr.d_dt_bias)}, {"dA_log", get(be, gr.dA_log)},
            {"dD", get(be, gr.dD)},      {"d_initial_state", get(be, dis)}};
  };
  Outs g = run(*gpu);
  Outs c = run(*cpu);
  compare("ssd resets", g, c, kTolBf16);
}

// ------------------------------------------------------------------------------- optimizer

TEST_F(CudaOps, SumSquares) {
  const std::vector<int64_t> sizes{1, 4095, 0, 4096, 4097, 1000003, 77};
  std::vector<Vf> data;
  for (size_t i = 0; i < sizes.size(); ++i) data.push_back(randn(sizes[i], 70 + i, 0.1 * (i + 1)));
  auto run = [&](Backend& be) {
    std::vector<Tensor> ts;
    for (size_t i = 0; i < sizes.size(); ++i) ts.push_back(puta(be, data[i], {sizes[i]}));
    return be.sum_squares(ts);
  };
  const double g = run(*gpu), c = run(*cpu);
  const double e = std::fabs(g - c) / std::fabs(c);
  std::printf("    [sum_squares] gpu %.9g cpu %.9g rel err %.3e\n", g, c, e);
  g_worst_f32 = std::max(g_worst_f32, e);
  EXPECT_LE(e, kTolF32);
  EXPECT_EQ(run(*gpu), g) << "sum_squares is not deterministic";
  // bf16 tensors (and the descriptor cache seeing a new table) against a host sum.
  Vf v = round_bf16(randn(12345, 79));
  double ref = 0;
  for (float x : v) ref += static_cast<double>(x) * x;
  std::vector<Tensor> tb{put(*gpu, v, {12345}, DType::BF16)};
  const double gb = gpu->sum_squares(tb);
  EXPECT_LE(std::fabs(gb - ref) / ref, kTolF32);
  std::vector<Tensor> none;
  EXPECT_EQ(gpu->sum_squares(none), 0.0);
}

TEST_F(CudaOps, AdamW) {
  const std::vector<int64_t> sizes{5, 4097, 100000, 0, 3};
  const std::vector<double> wds{0.0, 0.1, 0.01, 0.1, 0.5};
  std::vector<Vf> p, g, m, v;
  for (size_t i = 0; i < sizes.size(); ++i) {
    p.push_back(randn(sizes[i], 80 + i));
    g.push_back(randn(sizes[i], 90 + i, 0.01));
    m.push_back(randn(sizes[i], 100 + i, 0.001));
    Vf vv = randn(sizes[i], 110 + i, 1e-4);
    for (auto& x : vv) x = x * x;
    v.push_back(vv);
  }
  both("adamw", kTolF32, [&](Backend& be) -> Outs {
    std::vector<AdamWSlot> slots;
    for (size_t i = 0; i < sizes.size(); ++i) {
      const Shape s{sizes[i]};
      slots.push_back({puta(be, p[i], s), puta(be, g[i], s), puta(be, m[i], s),
                       puta(be, v[i], s), wds[i]});
    }
    AdamWHyper h;
    h.lr = 3e-3, h.beta1 = 0.9, h.beta2 = 0.95, h.eps = 1e-8, h.grad_scale = 0.7;
    for (int64_t step = 1; step <= 3; ++step) {
      h.step = step;
      be.adamw_step(slots, h);
    }
    Outs o;
    for (size_t i = 0; i < sizes.size(); ++i) {
      if (sizes[i] == 0) continue;
      o.push_back({"p" + std::to_string(i), get(be, slots[i].param)});
      o.push_back({"m" + std::to_string(i), get(be, slots[i].m)});
      o.push_back({"v" + std::to_string(i), get(be, slots[i].v)});
    }
    return o;
  });
}

// Runs last (gtest orders by definition; the name keeps it last if tests are sorted): the worst
// error over every comparison of this file, held to the same bounds the comparisons use, so a
// tolerance loosened in one test alone (or a NaN, whose error is inf) still fails here.
TEST_F(CudaOps, ZzWorstErrors) {
  std::printf("    worst rel err: bf16 paths %.3e, fp32 paths %.3e\n", g_worst_bf16, g_worst_f32);
  EXPECT_LE(g_worst_bf16, kTolBf16) << "worst error over the bf16 comparisons";
  EXPECT_LE(g_worst_f32, kTolF32) << "worst error over the fp32 comparisons";
}

}  // namespace
