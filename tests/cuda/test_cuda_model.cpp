// The whole model on the GPU against the CPU reference: loss and every parameter gradient of one
// forward/backward, and 200 training steps whose losses track the CPU run's.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "backend/backend.h"
#include "config/config.h"
#include "data/data.h"
#include "model/mamba2.h"
#include "testutil.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace ssd;

namespace {

// Sizes the CUDA SSD kernels support (headdim 32, d_state 64, chunk 64); seqlen 160 leaves a
// partial last chunk; two groups.
const char* kModel =
    "model: {d_model: 64, n_layer: 2, d_state: 64, headdim: 32, ngroups: 2, chunk_size: 64, "
    "vocab_size: 300}\n"
    "train: {seq_len: 160, micro_batch: 2}\n"
    "data: {kind: mqar, mqar_num_pairs: 8, mqar_key_vocab: 64, mqar_value_vocab: 64}\n";

std::vector<float> to_host(Backend& be, const Tensor& t) {
  std::vector<float> v(t.numel());
  be.download(v.data(), t);
  return v;
}

}  // namespace

TEST(CudaModel, LossAndGradientsMatchCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU here (or built without CUDA)";
  Config c = parse_config(kModel, {}, "t");
  auto cpu = make_cpu_backend(DType::F32);
  auto gpu = make_cuda_backend(0);
  const int64_t B = c.train.micro_batch, L = c.train.seq_len;
  Mamba2LM mc(c.model, *cpu, B, L), mg(c.model, *gpu, B, L);
  mc.init(21);
  mg.init(21);
  // Also score every position (not only MQAR answers) so every path carries gradient.
  std::vector<int32_t> tok(B * L), tgt(B * L);
  auto data = make_data_source(c);
  data->eval_batch(0, tok.data(), tgt.data(), B, L);
  for (int64_t i = 0; i + 1 < B * L; ++i) tgt[i] = (i + 1) % L ? tok[i + 1] : -1;

  Tensor sc = mc.new_stats(), sg = mg.new_stats();
  mc.zero_grads();
  mg.zero_grads();
  const double scale = 1.0 / (B * L);
  mc.forward_backward(tok.data(), tgt.data(), scale, sc);
  mg.forward_backward(tok.data(), tgt.data(), scale, sg);
  auto stc = mc.read_stats(sc), stg = mg.read_stats(sg);
  EXPECT_EQ(stc[1], stg[1]);
  EXPECT_NEAR(stg[0] / stg[1], stc[0] / stc[1], 1e-2 * stc[0] / stc[1]);

  double worst = 0;
  for (size_t i = 0; i < mc.grads().size(); ++i) {
    auto gc = to_host(*cpu, mc.grads()[i]);
    auto gg = to_host(*gpu, mg.grads()[i]);
    const double e = ssdtest::rel_err(gg, gc);
    worst = std::max(worst, e);
    // bf16 activations through a whole model: a few percent at most; a wrong gradient is ~1.
    EXPECT_LT(e, 5e-2) << mc.table()[i].name;
  }
  std::printf("worst relative gradient error GPU vs CPU: %.3e\n", worst);
}

TEST(CudaModel, TrainingTracksTheCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU here (or built without CUDA)";
  fs::path dir = fs::temp_directory_path() / ("ssd_cuda_track_" + std::to_string(getpid()));
  fs::remove_all(dir);
  std::map<std::string, std::map<int, double>> losses;
  for (std::string dev : {"cpu", "cuda"}) {
    Config c = parse_config(
        kModel,
        {"train.device=" + dev, "train.max_steps=200", "train.lr=3e-3", "train.min_lr=3e-4",
         "train.warmup_steps=20", "run.log_every=1", "run.eval_batches=1",
         "checkpoint.every=0", "run.dir=" + (dir / dev).string()},
        "t");
    train(c);
    losses[dev] = ssdtest::read_losses(dir / dev / "metrics.jsonl");
    ASSERT_EQ(losses[dev].size(), 200u) << dev;
  }
  auto& lc = losses["cpu"];
  auto& lg = losses["cuda"];
  EXPECT_NEAR(lg[1], lc[1], 1e-2 * lc[1]);
  // Averages over windows of 20 steps stay close all along, and both runs learn.
  for (int s = 1; s <= 200; s += 20) {
    double mc = 0, mg = 0;
    for (int k = s; k < s + 20; ++k) mc += lc[k] / 20, mg += lg[k] / 20;
    EXPECT_NEAR(mg, mc, 0.05 * mc + 0.02) << "steps " << s << ".." << s + 19;
  }
  EXPECT_LT(lg[200], lg[1] - 1.0);
  fs::remove_all(dir);
}

// Packed documents: one forward/backward with reset flags (documents starting inside chunks,
// on a chunk boundary, on consecutive tokens) on the GPU against the CPU with the same flags,
// with the SSD intermediates kept (recompute none) and with activation recomputation.
TEST(CudaModel, PackedDocumentsMatchCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU here (or built without CUDA)";
  Config c = parse_config(kModel, {}, "t");
  auto cpu = make_cpu_backend(DType::F32);
  auto gpu = make_cuda_backend(0);
  const int64_t B = c.train.micro_batch, L = c.train.seq_len;
  std::vector<int32_t> tok(B * L), tgt(B * L), reset(B * L, 0);
  auto data = make_data_source(c);
  data->eval_batch(0, tok.data(), tgt.data(), B, L);
  for (int64_t i = 0; i + 1 < B * L; ++i) tgt[i] = (i + 1) % L ? tok[i + 1] : -1;
  for (int64_t t : std::vector<int64_t>{0, 17, 64, 100, 101, 150, L + 40, L + 128}) reset[t] = 1;
  const double scale = 1.0 / (B * L);
  auto grads = [&](Backend& be, bool recompute, const int32_t* flags) {
    Mamba2LM m(c.model, be, B, L, recompute);
    m.init(21);
    Tensor s = m.new_stats();
    m.zero_grads();
    m.forward_backward(tok.data(), tgt.data(), scale, s, flags);
    std::vector<std::vector<float>> out;
    for (auto& g : m.grads()) out.push_back(to_host(be, g));
    out.push_back({static_cast<float>(m.read_stats(s)[0] * scale)});  // the loss, last
    return out;
  };
  const auto ref = grads(*cpu, false, reset.data());
  const auto leaky = grads(*cpu, false, nullptr);
  const auto table = param_table(c.model);
  double flags_matter = 0;
  for (size_t i = 0; i < ref.size(); ++i)
    flags_matter = std::max(flags_matter, ssdtest::rel_err(leaky[i], ref[i]));
  EXPECT_GT(flags_matter, 0.1) << "the flags change the CPU's gradients too little to test";
  for (bool recompute : {false, true}) {
    const auto got = grads(*gpu, recompute, reset.data());
    double worst = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const double e = ssdtest::rel_err(got[i], ref[i]);
      worst = std::max(worst, e);
      EXPECT_LT(e, i + 1 < ref.size() ? 5e-2 : 1e-2)
          << (i < table.size() ? table[i].name : std::string("loss"))
          << (recompute ? " (recompute)" : "");
    }
    std::printf("packed documents%s: worst relative error GPU vs CPU %.3e (the flags change the "
                "CPU's by up to %.3e)\n", recompute ? ", recompute" : "", worst, flags_matter);
  }
}
