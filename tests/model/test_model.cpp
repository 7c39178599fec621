// Whole-model checks on the CPU backend: gradients of the full Mamba-2 LM against finite
// differences in double precision, f32 against f64, and the initialisation rules.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>

#include "backend/backend.h"
#include "model/mamba2.h"
#include "testutil.h"

using namespace ssd;

namespace {

ModelConfig tiny_model() {
  ModelConfig m;
  m.d_model = 8;
  m.n_layer = 2;
  m.d_state = 4;
  m.headdim = 4;
  m.expand = 2;      // d_inner 16, 4 heads
  m.ngroups = 2;
  m.d_conv = 4;
  m.chunk_size = 3;  // seqlen 7: two full chunks and a partial one
  m.vocab_size = 21;
  m.pad_vocab_size_multiple = 8;
  return m;
}

struct Batch {
  std::vector<int32_t> tok, tgt;
};

Batch make_batch(int64_t B, int64_t L, int64_t vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  Batch b;
  for (int64_t i = 0; i < B * L; ++i) {
    b.tok.push_back(static_cast<int32_t>(g() % vocab));
    b.tgt.push_back(i % 5 == 3 ? -1 : static_cast<int32_t>(g() % vocab));
  }
  return b;
}

// Fresh gradients of one forward/backward (grad_scale 1); returns the stats.
std::array<double, 3> fwd_bwd(Mamba2LM& m, const Batch& b) {
  Tensor s = m.new_stats();
  m.zero_grads();
  m.forward_backward(b.tok.data(), b.tgt.data(), 1.0, s);
  return m.read_stats(s);
}

double loss_of(Mamba2LM& m, const Batch& b) {
  Tensor s = m.new_stats();
  m.forward_loss(b.tok.data(), b.tgt.data(), s);
  return m.read_stats(s)[0];
}

}  // namespace

TEST(Mamba2LM, GradientsMatchFiniteDifferences) {
  auto be = make_cpu_backend(DType::F64);
  const ModelConfig cfg = tiny_model();
  const int64_t B = 2, L = 7;
  Mamba2LM m(cfg, *be, B, L);
  m.init(7);
  // Move away from init values that make some gradients vanish (D = 1, norms = 1 exactly).
  std::mt19937_64 g(3);
  std::uniform_real_distribution<double> u(-0.2, 0.2);
  for (auto& p : m.params()) {
    double* d = p.ptr<double>();
    for (int64_t i = 0; i < p.numel(); ++i) d[i] += u(g) * (std::fabs(d[i]) + 0.1);
  }
  Batch b = make_batch(B, L, cfg.vocab_size, 11);

  m.zero_grads();
  Tensor stats = m.new_stats();
  m.forward_backward(b.tok.data(), b.tgt.data(), 1.0, stats);
  const double loss = m.read_stats(stats)[0];
  EXPECT_NEAR(loss, loss_of(m, b), 1e-12 * std::fabs(loss));

  const double eps = 1e-6;
  for (size_t pi = 0; pi < m.params().size(); ++pi) {
    Tensor& p = m.params()[pi];
    double* d = p.ptr<double>();
    const double* grad = m.grads()[pi].ptr<double>();
    // Up to 12 entries per parameter, spread over the tensor.
    const int64_t n = p.numel(), stride = std::max<int64_t>(1, n / 12);
    double max_err = 0, max_ref = 0;
    for (int64_t i = 0; i < n; i += stride) {
      const double keep = d[i];
      d[i] = keep + eps;
      const double fp = loss_of(m, b);
      d[i] = keep - eps;
      const double fm = loss_of(m, b);
      d[i] = keep;
      const double fd = (fp - fm) / (2 * eps);
      max_err = std::max(max_err, std::fabs(fd - grad[i]));
      max_ref = std::max(max_ref, std::fabs(fd));
    }
    // Central differences of a loss of ~30 carry ~1e-9 of rounding noise; allow that floor.
    EXPECT_LT(max_err, 1e-5 * max_ref + 2e-8)
        << m.table()[pi].name << ": max abs err " << max_err << ", max |fd| " << max_ref;
    EXPECT_GT(max_ref, 0) << m.table()[pi].name << " has an all-zero gradient";
  }
}

TEST(Mamba2LM, GradientAccumulationAddsUp) {
  auto be = make_cpu_backend(DType::F64);
  const ModelConfig cfg = tiny_model();
  Mamba2LM m(cfg, *be, 2, 7);
  m.init(1);
  Batch b = make_batch(2, 7, cfg.vocab_size, 5);
  Tensor s = m.new_stats();
  m.zero_grads();
  m.forward_backward(b.tok.data(), b.tgt.data(), 1.0, s);
  std::vector<std::vector<double>> once;
  for (auto& gr : m.grads()) once.emplace_back(gr.ptr<double>(), gr.ptr<double>() + gr.numel());
  m.forward_backward(b.tok.data(), b.tgt.data(), 1.0, s);
  for (size_t i = 0; i < once.size(); ++i) {
    const double* gr = m.grads()[i].ptr<double>();
    for (size_t j = 0; j < once[i].size(); ++j)
      ASSERT_NEAR(gr[j], 2 * once[i][j], 1e-12 + 1e-9 * std::fabs(once[i][j])) << m.table()[i].name;
  }
  auto st = m.read_stats(s);
  EXPECT_EQ(st[1], 2.0 * 11);  // 14 tokens, 3 ignored (i % 5 == 3), twice
}

TEST(Mamba2LM, Float32AgreesWithFloat64) {
  const ModelConfig cfg = tiny_model();
  auto b64 = make_cpu_backend(DType::F64);
  auto b32 = make_cpu_backend(DType::F32);
  Mamba2LM m64(cfg, *b64, 2, 7), m32(cfg, *b32, 2, 7);
  m64.init(9);
  m32.init(9);
  Batch b = make_batch(2, 7, cfg.vocab_size, 2);
  const auto st64 = fwd_bwd(m64, b), st32 = fwd_bwd(m32, b);
  EXPECT_NEAR(st32[0], st64[0], 1e-4 * st64[0]);
  for (size_t i = 0; i < m64.grads().size(); ++i) {
    const auto& g64 = m64.grads()[i];
    const auto& g32 = m32.grads()[i];
    std::vector<double> a(g64.ptr<double>(), g64.ptr<double>() + g64.numel());
    std::vector<float> c(g32.ptr<float>(), g32.ptr<float>() + g32.numel());
    EXPECT_LT(ssdtest::rel_err(c, a), 1e-4) << m64.table()[i].name;
  }
  // Logits agree too.
  auto l32 = m32.logits(b.tok.data());
  auto l64 = m64.logits(b.tok.data());
  EXPECT_LT(ssdtest::rel_err(l32, l64), 1e-5);
}

TEST(Mamba2LM, InitialisationFollowsTheReference) {
  ModelConfig cfg = tiny_model();
  cfg.d_model = 64;
  cfg.n_layer = 4;
  cfg.vocab_size = 500;
  auto be = make_cpu_backend(DType::F32);
  Mamba2LM m(cfg, *be, 1, 4);
  m.init(42);
  auto host = m.params_to_host();
  for (size_t i = 0; i < host.size(); ++i) {
    const auto& s = m.table()[i];
    const auto& v = host[i];
    double mean = 0, sq = 0, lo = 1e30, hi = -1e30;
    for (float x : v) mean += x, sq += double(x) * x, lo = std::min<double>(lo, x), hi = std::max<double>(hi, x);
    mean /= v.size();
    const double sd = std::sqrt(sq / v.size() - mean * mean);
    if (s.name == "embedding.weight") {
      EXPECT_NEAR(sd, 0.02, 0.001);
      EXPECT_NEAR(mean, 0, 0.001);
    } else if (s.name.find("in_proj.weight") != std::string::npos) {
      const double bound = 1 / std::sqrt(64.0);
      EXPECT_LE(hi, bound);
      EXPECT_GE(lo, -bound);
      EXPECT_NEAR(sd, bound / std::sqrt(3.0), 0.05 * bound);
    } else if (s.name.find("out_proj.weight") != std::string::npos) {
      const double bound = 1 / std::sqrt(128.0) / std::sqrt(4.0);
      EXPECT_LE(hi, bound);
      EXPECT_GE(lo, -bound);
      EXPECT_GT(hi, 0.9 * bound);
    } else if (s.name.find("conv1d") != std::string::npos) {
      EXPECT_LE(hi, 0.5);
      EXPECT_GE(lo, -0.5);
    } else if (s.name.find("dt_bias") != std::string::npos) {
      for (float x : v) {
        const double dt = std::log1p(std::exp(double(x)));  // softplus
        EXPECT_GE(dt, 1e-3 * 0.999);
        EXPECT_LE(dt, 1e-1 * 1.001);
      }
    } else if (s.name.find("A_log") != std::string::npos) {
      for (float x : v) {
        EXPECT_GE(std::exp(double(x)), 1.0 - 1e-6);
        EXPECT_LE(std::exp(double(x)), 16.0 + 1e-5);
      }
    } else {  // D and norm weights
      for (float x : v) EXPECT_EQ(x, 1.0f) << s.name;
    }
  }
  // Same seed, same values; different seed, different values.
  Mamba2LM m2(cfg, *be, 1, 4);
  m2.init(42);
  EXPECT_EQ(m2.params_to_host()[0], host[0]);
  m2.init(43);
  EXPECT_NE(m2.params_to_host()[0], host[0]);
}

TEST(Mamba2LM, RecomputationGivesTheSameGradients) {
  auto be = make_cpu_backend(DType::F64);
  const ModelConfig cfg = tiny_model();
  Mamba2LM plain(cfg, *be, 2, 7), recomputed(cfg, *be, 2, 7, /*recompute_activations=*/true);
  plain.init(13);
  recomputed.init(13);
  Batch b = make_batch(2, 7, cfg.vocab_size, 17);
  EXPECT_EQ(fwd_bwd(plain, b), fwd_bwd(recomputed, b));
  for (size_t i = 0; i < plain.grads().size(); ++i) {
    const auto& g1 = plain.grads()[i];
    const auto& g2 = recomputed.grads()[i];
    std::vector<double> a(g1.ptr<double>(), g1.ptr<double>() + g1.numel());
    std::vector<double> c(g2.ptr<double>(), g2.ptr<double>() + g2.numel());
    EXPECT_EQ(a, c) << plain.table()[i].name;  // same ops on the same inputs: bitwise equal
  }
  EXPECT_EQ(plain.logits(b.tok.data()), recomputed.logits(b.tok.data()));
}

// ---- packed documents (reset flags) ----

namespace {

// Logits, loss sum and gradients of one forward/backward on `tok` with flags `reset` (or none).
struct RunOut {
  std::vector<float> logits;
  double loss = 0;
  std::vector<std::vector<float>> grads;
};
RunOut run_packed(Mamba2LM& m, const std::vector<int32_t>& tok, const std::vector<int32_t>& tgt,
                  const int32_t* reset) {
  RunOut o;
  Tensor s = m.new_stats();
  m.zero_grads();
  m.forward_backward(tok.data(), tgt.data(), 1.0, s, reset);
  o.loss = m.read_stats(s)[0];
  for (auto& g : m.grads()) o.grads.emplace_back(g.ptr<float>(), g.ptr<float>() + g.numel());
  o.logits = m.logits(tok.data(), reset);
  return o;
}

// Largest |a - b| / max|b| over the tensors.
double worst_rel(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, ssdtest::rel_err(a[i], b[i]));
  return worst;
}

}  // namespace

// A packed batch of documents (boundaries inside chunks, on a chunk boundary, on consecutive
// tokens) with reset flags: its logits and every parameter gradient equal those of its
// documents run one by one, each as its own sequence (the gradients summed), in fp32; also
// with activation recomputation. Without the flags they do not.
TEST(Mamba2LM, PackedDocumentsEqualDocumentsOneByOne) {
  ModelConfig cfg = tiny_model();
  cfg.chunk_size = 4;
  auto be = make_cpu_backend(DType::F32);
  const int64_t B = 2, L = 24;
  // Row 0: documents at 0, 5 (inside a chunk), 8 (a chunk boundary), 12 and 13 (one-token
  // documents, consecutive starts), 14; row 1: at 0 and 11.
  const std::vector<std::vector<int64_t>> starts = {{0, 5, 8, 12, 13, 14}, {0, 11}};
  Batch b = make_batch(B, L, cfg.vocab_size, 23);
  std::vector<int32_t> reset(B * L, 0);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t t : starts[r]) reset[r * L + t] = 1;

  Mamba2LM packed(cfg, *be, B, L), packed_rc(cfg, *be, B, L, /*recompute_activations=*/true);
  packed.init(29);
  packed_rc.init(29);
  const RunOut got = run_packed(packed, b.tok, b.tgt, reset.data());
  const RunOut got_rc = run_packed(packed_rc, b.tok, b.tgt, reset.data());
  const RunOut plain = run_packed(packed, b.tok, b.tgt, nullptr);

  RunOut ref;
  ref.logits.assign(got.logits.size(), 0.f);
  for (const auto& g : got.grads) ref.grads.emplace_back(g.size(), 0.f);
  std::vector<std::vector<double>> gsum(got.grads.size());
  for (size_t i = 0; i < gsum.size(); ++i) gsum[i].assign(got.grads[i].size(), 0.0);
  const int64_t V = cfg.padded_vocab();
  for (int64_t r = 0; r < B; ++r) {
    for (size_t k = 0; k < starts[r].size(); ++k) {
      const int64_t t0 = starts[r][k];
      const int64_t n = (k + 1 < starts[r].size() ? starts[r][k + 1] : L) - t0;
      Mamba2LM doc(cfg, *be, 1, n);
      doc.init(29);
      const std::vector<int32_t> tok(b.tok.begin() + r * L + t0, b.tok.begin() + r * L + t0 + n);
      const std::vector<int32_t> tgt(b.tgt.begin() + r * L + t0, b.tgt.begin() + r * L + t0 + n);
      const RunOut o = run_packed(doc, tok, tgt, nullptr);
      std::copy(o.logits.begin(), o.logits.end(), ref.logits.begin() + (r * L + t0) * V);
      ref.loss += o.loss;
      for (size_t i = 0; i < gsum.size(); ++i)
        for (size_t j = 0; j < gsum[i].size(); ++j) gsum[i][j] += o.grads[i][j];
    }
  }
  for (size_t i = 0; i < gsum.size(); ++i)
    for (size_t j = 0; j < gsum[i].size(); ++j) ref.grads[i][j] = static_cast<float>(gsum[i][j]);

  const double e_logits = ssdtest::rel_err(got.logits, ref.logits);
  const double e_grads = worst_rel(got.grads, ref.grads);
  EXPECT_LT(e_logits, 1e-5);
  EXPECT_NEAR(got.loss, ref.loss, 1e-5 * ref.loss);
  for (size_t i = 0; i < ref.grads.size(); ++i) {
    EXPECT_LT(ssdtest::rel_err(got.grads[i], ref.grads[i]), 1e-5) << packed.table()[i].name;
    EXPECT_LT(ssdtest::rel_err(got_rc.grads[i], ref.grads[i]), 1e-5)
        << "recompute: " << packed.table()[i].name;
  }
  EXPECT_LT(ssdtest::rel_err(got_rc.logits, ref.logits), 1e-5);
  // The flags matter: without them the packed batch is something else.
  const double e_plain = std::max(ssdtest::rel_err(plain.logits, ref.logits),
                                  worst_rel(plain.grads, ref.grads));
  EXPECT_GT(e_plain, 1e-3);
  std::printf("[packed] vs documents one by one (fp32): logits %.3g, loss %.3g, gradients %.3g "
              "(recompute: %.3g); without the flags %.3g\n",
              e_logits, std::fabs(got.loss - ref.loss) / ref.loss, e_grads,
              worst_rel(got_rc.grads, ref.grads), e_plain);
}
