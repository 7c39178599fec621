// What a checkpoint holds for the distributed trainer, and resuming from unusual ones: the
// global data position and the skipped-step count are stored; a checkpoint without optimizer
// state resumes (moments from zero) instead of crashing; one written before data positions were
// global resumes at step x global batch, where the uninterrupted run is.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>

#include "config/config.h"
#include "io/checkpoint.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace ssd;

namespace {

const char* kSmall =
    "model: {d_model: 16, n_layer: 1, d_state: 8, headdim: 8, chunk_size: 8, vocab_size: 48}\n"
    "train: {device: cpu, seq_len: 24, micro_batch: 2, global_batch: 6, lr: 0.01, min_lr: 0.001,\n"
    "        warmup_steps: 2}\n"
    "data: {kind: mqar, mqar_num_pairs: 2, mqar_key_vocab: 16, mqar_value_vocab: 16}\n"
    "run: {log_every: 1, eval_batches: 1}\n";

fs::path fresh(const std::string& tag) {
  fs::path d = fs::temp_directory_path() / ("ssdtrain_rs_" + tag + "_" + std::to_string(getpid()));
  fs::remove_all(d);
  return d;
}

Config cfg(const fs::path& dir, std::vector<std::string> sets) {
  sets.push_back("run.dir=" + dir.string());
  return parse_config(kSmall, sets, "test");
}

}  // namespace

TEST(ResumeState, CheckpointHoldsGlobalPositionAndSkippedSteps) {
  fs::path d = fresh("pos");
  TrainResult r = train(cfg(d, {"train.max_steps=5"}));
  ASSERT_EQ(r.steps_done, 5);
  CheckpointData ck = read_checkpoint(checkpoint_path((d / "checkpoints").string(), 5));
  ASSERT_TRUE(ck.state.count("data.position"));
  EXPECT_EQ(ck.state["data.position"], std::vector<uint64_t>{5 * 6});  // steps x global batch
  ASSERT_TRUE(ck.state.count("skipped_steps"));
  EXPECT_EQ(ck.state["skipped_steps"], std::vector<uint64_t>{0});
  EXPECT_FALSE(ck.state.count("data.0")) << "per-rank loader states are gone";
  fs::remove_all(d);
}

TEST(ResumeState, WithoutOptimizerStateResumesWithFreshMoments) {
  fs::path a = fresh("noopt_a"), b = fresh("noopt_b");
  train(cfg(a, {"train.max_steps=4"}));
  CheckpointData ck = read_checkpoint(checkpoint_path((a / "checkpoints").string(), 4));
  ck.adam_m.clear();
  ck.adam_v.clear();
  fs::create_directories(b / "checkpoints");
  write_checkpoint(checkpoint_path((b / "checkpoints").string(), 4), ck);
  TrainResult r = train(cfg(b, {"train.max_steps=8", "train.resume_config=override"}));
  EXPECT_EQ(r.steps_done, 8);
  ASSERT_EQ(r.losses.size(), 4u);
  for (double l : r.losses) EXPECT_TRUE(std::isfinite(l));
  // Fresh moments change the trajectory: not the run that kept them.
  TrainResult full = train(cfg(a, {"train.max_steps=8", "train.resume_config=override"}));
  EXPECT_NE(full.last_loss, r.last_loss);
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(ResumeState, OldPerRankLoaderStateResumesAtStepTimesGlobalBatch) {
  fs::path a = fresh("old_a"), b = fresh("old_b");
  TrainResult whole = train(cfg(a, {"train.max_steps=8", "checkpoint.every=4", "checkpoint.keep_last=0"}));
  CheckpointData ck = read_checkpoint(checkpoint_path((a / "checkpoints").string(), 4));
  ck.state.erase("data.position");
  ck.state["data.0"] = {1, 2, 3, 4};  // what an older version stored
  fs::create_directories(b / "checkpoints");
  write_checkpoint(checkpoint_path((b / "checkpoints").string(), 4), ck);
  TrainResult r = train(cfg(b, {"train.max_steps=8"}));
  ASSERT_EQ(r.losses.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(r.losses[i], whole.losses[4 + i]) << i;
  fs::remove_all(a);
  fs::remove_all(b);
}
