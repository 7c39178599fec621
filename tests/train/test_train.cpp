// Training end to end on the CPU backend: the loss falls on a learnable task, a run stopped by
// SIGTERM writes a checkpoint and resumes to exactly the losses of an uninterrupted run.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "backend/backend.h"
#include "config/config.h"
#include "testutil.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& tag) {
  fs::path d = fs::temp_directory_path() / ("ssdtrain_" + tag + "_" + std::to_string(getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

const char* kSmall =
    "model: {d_model: 32, n_layer: 2, d_state: 8, headdim: 8, chunk_size: 16, vocab_size: 48}\n"
    "train: {device: cpu, seq_len: 48, micro_batch: 8, lr: 0.01, min_lr: 0.001, warmup_steps: 5}\n"
    "data: {kind: mqar, mqar_num_pairs: 4, mqar_key_vocab: 16, mqar_value_vocab: 16}\n"
    "run: {log_every: 1, eval_batches: 2}\n";

}  // namespace

TEST(Train, LossFallsOnALearnableTask) {
  fs::path dir = fresh_dir("falls");
  ssd::Config c = ssd::parse_config(kSmall, {"train.max_steps=40", "run.dir=" + dir.string()},
                                    "test");
  ssd::TrainResult r = ssd::train(c);
  EXPECT_EQ(r.steps_done, 40);
  // From ~log(48) at init to below log(16) (the uniform guess over values).
  EXPECT_GT(r.first_loss, 3.5);
  EXPECT_LT(r.last_loss, 2.9);
  EXPECT_LT(r.last_eval_loss, 2.9);
  auto losses = ssdtest::read_losses(dir / "metrics.jsonl");
  EXPECT_EQ(losses.size(), 40u);
  EXPECT_TRUE(fs::exists(dir / "config.yaml"));
  EXPECT_TRUE(fs::exists(dir / "checkpoints" / "step_00000040.h5"));
  fs::remove_all(dir);
}

TEST(Train, SameSeedSameLosses) {
  fs::path a = fresh_dir("seed_a"), b = fresh_dir("seed_b");
  ssd::train(ssd::parse_config(kSmall, {"train.max_steps=8", "run.dir=" + a.string()}, "t"));
  ssd::train(ssd::parse_config(kSmall, {"train.max_steps=8", "run.dir=" + b.string()}, "t"));
  EXPECT_EQ(ssdtest::read_losses(a / "metrics.jsonl"), ssdtest::read_losses(b / "metrics.jsonl"));
  fs::remove_all(a);
  fs::remove_all(b);
}

// Runs the binary with a config file; returns the pid.
pid_t spawn(const fs::path& cfg, const fs::path& log, const std::vector<std::string>& sets) {
  pid_t pid = fork();
  if (pid == 0) {
    std::vector<std::string> args = {SSD_BINARY, "train", "--config", cfg.string()};
    for (const auto& s : sets) args.insert(args.end(), {"--set", s});
    std::vector<char*> argv;
    for (auto& s : args) argv.push_back(s.data());
    argv.push_back(nullptr);
    FILE* f = std::freopen(log.c_str(), "w", stdout);
    (void)f;
    dup2(fileno(stdout), 2);
    setenv("OMP_NUM_THREADS", "1", 1);
    execv(SSD_BINARY, argv.data());
    _exit(127);
  }
  return pid;
}

int wait_exit(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string slurp(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs `config_text` to the end once, then again stopped by SIGTERM after a few steps and
// restarted: the restarted run's losses must equal the uninterrupted run's exactly.
void check_resume_is_exact(const std::string& tag, const std::string& config_text, int steps) {
  fs::path dir = fresh_dir(tag);
  fs::path cfg = dir / "small.yaml";
  std::ofstream(cfg) << config_text;
  const std::vector<std::string> common = {"train.max_steps=" + std::to_string(steps),
                                           "checkpoint.every=15"};

  // The uninterrupted reference run.
  auto sets_ref = common;
  sets_ref.push_back("run.dir=" + (dir / "ref").string());
  ASSERT_EQ(wait_exit(spawn(cfg, dir / "ref.log", sets_ref)), 0) << slurp(dir / "ref.log");
  auto ref = ssdtest::read_losses(dir / "ref" / "metrics.jsonl");
  ASSERT_EQ(ref.size(), static_cast<size_t>(steps));

  // The same run, stopped by SIGTERM once it is past step 3, then started again.
  auto sets = common;
  sets.push_back("run.dir=" + (dir / "run").string());
  pid_t pid = spawn(cfg, dir / "run1.log", sets);
  for (int i = 0; i < 4000 && ssdtest::read_losses(dir / "run" / "metrics.jsonl").size() < 3; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  kill(pid, SIGTERM);
  ASSERT_EQ(wait_exit(pid), 0) << slurp(dir / "run1.log");
  std::string log1 = slurp(dir / "run1.log");
  ASSERT_NE(log1.find("stopped by signal"), std::string::npos) << log1;
  auto partial = ssdtest::read_losses(dir / "run" / "metrics.jsonl");
  ASSERT_LT(partial.size(), static_cast<size_t>(steps)) << "the run finished before the signal";

  ASSERT_EQ(wait_exit(spawn(cfg, dir / "run2.log", sets)), 0) << slurp(dir / "run2.log");
  std::string log2 = slurp(dir / "run2.log");
  EXPECT_NE(log2.find("resumed from"), std::string::npos) << log2;
  auto resumed = ssdtest::read_losses(dir / "run" / "metrics.jsonl");
  ASSERT_EQ(resumed.size(), static_cast<size_t>(steps));
  for (const auto& [step, loss] : ref) EXPECT_EQ(resumed[step], loss) << "step " << step;
  fs::remove_all(dir);
}

TEST(Train, SigtermCheckpointsAndResumeIsExact) {
  check_resume_is_exact("resume", kSmall, 40);
}

TEST(Train, SigtermCheckpointsAndResumeIsExactOnTheGpu) {
  if (ssd::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU here (or built without CUDA)";
  // Sizes the CUDA SSD kernels support.
  check_resume_is_exact(
      "resume_gpu",
      "model: {d_model: 64, n_layer: 2, d_state: 64, headdim: 32, chunk_size: 64, vocab_size: 48}\n"
      "train: {device: cuda, seq_len: 96, micro_batch: 8, lr: 0.01, min_lr: 0.001, warmup_steps: 5}\n"
      "data: {kind: mqar, mqar_num_pairs: 4, mqar_key_vocab: 16, mqar_value_vocab: 16}\n"
      "run: {log_every: 1, eval_batches: 2}\n",
      300);
}

TEST(Train, ResumeNeverRefusesToOverwriteCheckpoints) {
  fs::path dir = fresh_dir("never");
  auto c = ssd::parse_config(kSmall, {"train.max_steps=2", "run.dir=" + dir.string()}, "t");
  ssd::train(c);
  auto c2 = ssd::parse_config(
      kSmall, {"train.max_steps=4", "run.dir=" + dir.string(), "train.resume=never"}, "t");
  try {
    ssd::train(c2);
    FAIL() << "expected an error";
  } catch (const ssd::Error& e) {
    EXPECT_NE(std::string(e.what()).find("already holds checkpoints"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

TEST(Train, NonFiniteLossStopsAndKeepsTheLastGoodCheckpoint) {
  fs::path dir = fresh_dir("nan");
  // An absurd learning rate turns the parameters into inf/NaN after the first update.
  auto c = ssd::parse_config(kSmall,
                             {"train.max_steps=6", "run.dir=" + dir.string(), "train.lr=1e30",
                              "train.warmup_steps=0", "train.grad_clip=0", "checkpoint.every=1"},
                             "t");
  try {
    ssd::train(c);
    FAIL() << "expected the run to stop on a non-finite loss";
  } catch (const ssd::Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("not finite"), std::string::npos) << msg;
    EXPECT_NE(msg.find("step_00000001.h5"), std::string::npos) << msg;
  }
  EXPECT_TRUE(fs::exists(dir / "checkpoints" / "step_00000001.h5"));
  EXPECT_FALSE(fs::exists(dir / "checkpoints" / "step_00000002.h5"));
  EXPECT_FALSE(fs::exists(dir / "checkpoints" / "step_00000003.h5"));

  // on_nan=skip: the run goes on, skipping the bad updates, and finishes.
  fs::path dir2 = fresh_dir("nan_skip");
  auto c2 = ssd::parse_config(kSmall,
                              {"train.max_steps=4", "run.dir=" + dir2.string(), "train.lr=1e30",
                               "train.warmup_steps=0", "train.grad_clip=0", "train.on_nan=skip"},
                              "t");
  ssd::TrainResult r = ssd::train(c2);
  EXPECT_EQ(r.steps_done, 4);
  fs::remove_all(dir);
  fs::remove_all(dir2);
}

TEST(Train, RecomputationTrainsTheSameRun) {
  fs::path a = fresh_dir("rc_a"), b = fresh_dir("rc_b");
  ssd::train(ssd::parse_config(kSmall, {"train.max_steps=6", "run.dir=" + a.string()}, "t"));
  ssd::train(ssd::parse_config(
      kSmall, {"train.max_steps=6", "run.dir=" + b.string(), "train.recompute=layers"}, "t"));
  EXPECT_EQ(ssdtest::read_losses(a / "metrics.jsonl"), ssdtest::read_losses(b / "metrics.jsonl"));
  fs::remove_all(a);
  fs::remove_all(b);
}
