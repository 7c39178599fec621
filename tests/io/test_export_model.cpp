// Export -> import through the real model: the imported weights give the same logits, and a
// training run can start from an exported directory (train.init_from).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "backend/backend.h"
#include "config/config.h"
#include "io/export.h"
#include "model/mamba2.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace ssd;

namespace {

const char* kSmall =
    "model: {d_model: 32, n_layer: 2, d_state: 8, headdim: 8, ngroups: 2, chunk_size: 16, vocab_size: 48}\n"
    "train: {device: cpu, seq_len: 24, micro_batch: 2, lr: 0.01, min_lr: 0.001, warmup_steps: 2}\n"
    "data: {kind: mqar, mqar_num_pairs: 4, mqar_key_vocab: 16, mqar_value_vocab: 16}\n"
    "run: {log_every: 1, eval_batches: 1}\n";

}  // namespace

TEST(ExportModel, ImportGivesTheSameLogits) {
  fs::path dir = fs::temp_directory_path() / ("ssd_export_model_" + std::to_string(getpid()));
  fs::remove_all(dir);
  Config c = parse_config(kSmall, {}, "t");
  auto be = make_cpu_backend(DType::F32);
  Mamba2LM a(c.model, *be, 1, 24), b(c.model, *be, 1, 24);
  a.init(3);
  b.init(4);  // different weights until the import
  std::vector<int32_t> tok(24);
  for (int i = 0; i < 24; ++i) tok[i] = (i * 5 + 1) % 48;
  const auto ref = a.logits(tok.data());
  ASSERT_NE(b.logits(tok.data()), ref);

  for (auto fmt : {ExportFormat::HuggingFace, ExportFormat::MambaSsm}) {
    fs::path out = dir / (fmt == ExportFormat::HuggingFace ? "hf" : "mamba");
    export_model(c.model, a.named_params_to_host(), out.string(), fmt, ExportDType::F32);
    b.load_params(import_model(out.string(), c.model, param_shapes(b.table())));
    EXPECT_EQ(b.logits(tok.data()), ref);  // fp32 export: bit-identical weights, same logits
  }
  fs::remove_all(dir);
}

TEST(ExportModel, TrainingStartsFromAnExport) {
  fs::path dir = fs::temp_directory_path() / ("ssd_init_from_" + std::to_string(getpid()));
  fs::remove_all(dir);
  Config c = parse_config(kSmall, {}, "t");
  auto be = make_cpu_backend(DType::F32);
  Mamba2LM a(c.model, *be, 1, 24);
  a.init(77);
  export_model(c.model, a.named_params_to_host(), (dir / "export").string(),
               ExportFormat::HuggingFace, ExportDType::F32);
  // Zero steps to take beyond the import: max_steps 1 with lr tiny keeps the weights close,
  // but the run must start from the exported values, not from seed init.
  Config t = parse_config(kSmall, {"train.max_steps=1", "run.dir=" + (dir / "run").string(),
                                   "train.init_from=" + (dir / "export").string(),
                                   "train.lr=1e-12", "train.min_lr=0", "train.warmup_steps=0",
                                   "train.seed=1"},
                          "t");
  TrainResult r = train(t);
  EXPECT_EQ(r.steps_done, 1);
  double want = be->sum_squares(a.params());
  EXPECT_NEAR(r.param_sumsq, want, 1e-6 * want);
  // A size mismatch is caught and named.
  Config bad = parse_config(kSmall, {"model.d_model=48", "train.max_steps=1",
                                     "run.dir=" + (dir / "run2").string(),
                                     "train.init_from=" + (dir / "export").string()},
                            "t");
  try {
    train(bad);
    FAIL() << "expected a size mismatch";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("hidden_size"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}
