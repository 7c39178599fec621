// The ssdtrain binary end to end: exit codes and messages for bad input, no run directory left
// behind by a run that fails validation, `ssdtrain config`, and one short real training run.
// Every command runs in a fresh temporary working directory.
#include <gtest/gtest.h>

#include "backend/backend.h"
#include <sys/wait.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "config/config.h"
#include "core/error.h"

#include "testutil.h"

namespace fs = std::filesystem;

namespace {

using ssdtest::read_file;

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << text;
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char ch : s) {
    if (ch == '\'') out += "'\\''";
    else out += ch;
  }
  return out + "'";
}

struct Result {
  int rc = -1;
  std::string out, err;
  double seconds = 0;
};

std::ostream& operator<<(std::ostream& os, const Result& r) {
  return os << "exit " << r.rc << "\n--- stdout ---\n" << r.out << "--- stderr ---\n" << r.err;
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ssd_test_cli_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    tmp_ = tmpl;
    work_ = tmp_ / "work";
    fs::create_directories(work_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }

  // Runs ssdtrain with args in work_, stdout and stderr captured into files.
  Result run(const std::vector<std::string>& args) {
    std::string cmd = "cd " + shell_quote(work_.string()) +
                      " && OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 " + shell_quote(SSD_BINARY);
    for (const auto& a : args) cmd += " " + shell_quote(a);
    fs::path out = tmp_ / "stdout.txt", err = tmp_ / "stderr.txt";
    cmd += " >" + shell_quote(out.string()) + " 2>" + shell_quote(err.string()) + " </dev/null";
    Result r;
    auto t0 = std::chrono::steady_clock::now();
    int status = std::system(cmd.c_str());
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    r.out = read_file(out);
    r.err = read_file(err);
    return r;
  }

  // A failing `train`: non-zero exit, stderr names `needle`, nothing created.
  void expect_train_fails(const std::vector<std::string>& args, const std::string& needle) {
    std::vector<std::string> full = {"train"};
    full.insert(full.end(), args.begin(), args.end());
    Result r = run(full);
    EXPECT_NE(r.rc, 0) << r;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "stderr does not name '" << needle << "'\n" << r;
    EXPECT_FALSE(fs::exists(run_dir())) << "run directory created by a failing run\n" << r;
    EXPECT_FALSE(fs::exists(work_ / "runs")) << "runs/ created by a failing run\n" << r;
    EXPECT_TRUE(r.err.find("unexpected error") == std::string::npos) << r;
  }

  fs::path run_dir() const { return tmp_ / "run"; }
  std::string set_run_dir() const { return "run.dir=" + run_dir().string(); }

  fs::path tmp_, work_;
};

// ---------------------------------------------------------------- usage

TEST_F(Cli, NoArgumentsIsAnError) {
  Result r = run({});
  EXPECT_NE(r.rc, 0) << r;
  EXPECT_NE(r.err.find("usage"), std::string::npos) << r;
}

TEST_F(Cli, HelpSucceeds) {
  Result r = run({"--help"});
  EXPECT_EQ(r.rc, 0) << r;
  EXPECT_NE(r.out.find("usage"), std::string::npos) << r;
  EXPECT_NE(r.out.find("train"), std::string::npos) << r;
  r = run({"train", "--help"});
  EXPECT_EQ(r.rc, 0) << r;
  EXPECT_NE(r.out.find("ssdtrain train"), std::string::npos) << r;
  EXPECT_FALSE(fs::exists(work_ / "runs"));
}

TEST_F(Cli, UnknownCommandIsNamed) {
  Result r = run({"frobnicate"});
  EXPECT_NE(r.rc, 0) << r;
  EXPECT_NE(r.err.find("frobnicate"), std::string::npos) << r;
}

// ---------------------------------------------------------------- bad input: no run directory

TEST_F(Cli, UnknownKeyInConfigFile) {
  fs::path cfg = tmp_ / "bad_key.yaml";
  write_file(cfg, "model:\n  d_model: 64\n  d_modle: 32\n");
  expect_train_fails({"--config", cfg.string(), "--set", set_run_dir()}, "model.d_modle");
  // Same file, run.dir left at its default (runs/bad_key under the working directory).
  expect_train_fails({"--config", cfg.string()}, "model.d_modle");
}

TEST_F(Cli, MissingConfigFile) {
  fs::path cfg = tmp_ / "no_such_config.yaml";
  expect_train_fails({"--config", cfg.string(), "--set", set_run_dir()}, cfg.string());
}

TEST_F(Cli, WrongType) {
  fs::path cfg = tmp_ / "wrong_type.yaml";
  write_file(cfg, "train:\n  seq_len: long\n");
  expect_train_fails({"--config", cfg.string(), "--set", set_run_dir()}, "train.seq_len");
  write_file(cfg, "model:\n  n_layer: [1, 2]\n");
  expect_train_fails({"--config", cfg.string()}, "model.n_layer");
}

TEST_F(Cli, HeaddimNotDividing) {
  expect_train_fails({"--set", "model.headdim=24", "--set", set_run_dir()}, "model.headdim");
  expect_train_fails({"--set", "model.headdim=24"}, "model.headdim");
}

TEST_F(Cli, TextDataWithMissingFile) {
  fs::path missing = tmp_ / "missing_corpus.txt";
  expect_train_fails({"--set", "data.kind=text", "--set", "data.path=" + missing.string(), "--set",
                      "model.vocab_size=256", "--set", set_run_dir()},
                     missing.string());
}

TEST_F(Cli, TextDataTooSmall) {
  // Passes config validation (the file exists) but the data source rejects it: still no run dir.
  fs::path tiny = tmp_ / "tiny_corpus.txt";
  write_file(tiny, "hello");
  expect_train_fails({"--set", "data.kind=text", "--set", "data.path=" + tiny.string(), "--set",
                      "model.vocab_size=256", "--set", "train.device=cpu", "--set", set_run_dir()},
                     tiny.string());
}

TEST_F(Cli, SetWithUnknownKey) {
  expect_train_fails({"--set", "train.learning_rate=0.1", "--set", set_run_dir()},
                     "train.learning_rate");
  expect_train_fails({"--set", "optim.lr=0.1"}, "optim.lr");
  expect_train_fails({"--set", "model.d_model"}, "model.d_model");
}

TEST_F(Cli, UnexpectedPositionalArgument) {
  expect_train_fails({"extra_arg", "--set", set_run_dir()}, "extra_arg");
}

TEST_F(Cli, OptionWithoutValue) {
  expect_train_fails({"--set", set_run_dir(), "--config"}, "--config");
  expect_train_fails({"--set"}, "--set");
}

TEST_F(Cli, MqarSeqLenTooShort) {
  expect_train_fails({"--set", "train.seq_len=16", "--set", set_run_dir()}, "train.seq_len");
}

TEST_F(Cli, CudaDeviceWithoutGpu) {
  // On a machine without a GPU (or a build without CUDA) this must fail cleanly before any
  // file is written. Where a GPU is usable the test does not apply.
  if (ssd::cuda_device_count() > 0) GTEST_SKIP() << "a CUDA GPU is available here";
  Result r = run({"train", "--set", "train.device=cuda", "--set", "train.max_steps=1",
                  "--set", set_run_dir()});
  if (r.rc == 0) GTEST_SKIP() << "a CUDA GPU is available here";
  EXPECT_NE(r.rc, 0) << r;
  const bool says_why = r.err.find("no CUDA GPU") != std::string::npos ||
                        r.err.find("no GPU") != std::string::npos ||
                        r.err.find("without CUDA") != std::string::npos;
  EXPECT_TRUE(says_why) << "stderr should say there is no GPU or no CUDA support\n" << r;
  EXPECT_NE(r.err.find("train.device"), std::string::npos) << r;
  EXPECT_FALSE(fs::exists(run_dir())) << r;
  EXPECT_FALSE(fs::exists(work_ / "runs")) << r;
}

// ---------------------------------------------------------------- ssdtrain bench

TEST_F(Cli, BenchTrainTimesStepsAndChecksTheLoss) {
  // On the CPU backend (the default config on a machine without a GPU, forced here so the test
  // means the same everywhere): timing line, a finite mean loss, no per-op table on the CPU.
  Result r = run({"bench", "train", "--steps", "2", "--breakdown", "--set", "train.device=cpu",
                  "--set", "train.micro_batch=2"});
  ASSERT_EQ(r.rc, 0) << r;
  EXPECT_NE(r.out.find("step median"), std::string::npos) << r;
  const size_t at = r.out.find("mean loss of the steps ");
  ASSERT_NE(at, std::string::npos) << r;
  const double loss = std::atof(r.out.c_str() + at + std::strlen("mean loss of the steps "));
  EXPECT_TRUE(std::isfinite(loss) && loss > 0) << r;
  EXPECT_NE(r.out.find("no per-op breakdown"), std::string::npos) << r;
  EXPECT_FALSE(fs::exists(work_ / "runs")) << "bench must not create a run directory";

  r = run({"bench", "train", "--steps", "two"});
  EXPECT_NE(r.rc, 0) << r;
  EXPECT_NE(r.err.find("--steps"), std::string::npos) << r;
}

TEST_F(Cli, BenchTrainPreloadTrainsOnTheSameBatches) {
  // --preload reads the batches before timing: the steps must see the same data as the run that
  // reads each batch in its step, so both print the same mean loss (same arithmetic, same order).
  auto mean_loss = [&](bool preload) {
    std::vector<std::string> a = {"bench", "train", "--steps", "3", "--set", "train.device=cpu",
                                  "--set", "train.micro_batch=2"};
    if (preload) a.push_back("--preload");
    Result r = run(a);
    EXPECT_EQ(r.rc, 0) << r;
    EXPECT_EQ(r.out.find("loading a step's batch") == std::string::npos, preload) << r;
    const size_t at = r.out.find("mean loss of the steps ");
    EXPECT_NE(at, std::string::npos) << r;
    return at == std::string::npos ? std::string() : r.out.substr(at, r.out.find('\n', at) - at);
  };
  const std::string plain = mean_loss(false);
  EXPECT_FALSE(plain.empty());
  EXPECT_EQ(mean_loss(true), plain);
}

// ---------------------------------------------------------------- ssdtrain config

TEST_F(Cli, ConfigPrintsResolvedYaml) {
  Result r = run({"config", "--set", "model.d_model=96"});
  ASSERT_EQ(r.rc, 0) << r;
  EXPECT_NE(r.out.find("d_model: 96"), std::string::npos) << r;
  // The printout is a complete config that parses back to the same values.
  ssd::Config c = ssd::parse_config(r.out, {}, "printed");
  EXPECT_EQ(c.model.d_model, 96);
  EXPECT_EQ(c.train.seq_len, 64);
  EXPECT_EQ(c.run.name, "default");
  EXPECT_FALSE(fs::exists(work_ / "runs")) << "config must not create a run directory";

  fs::path cfg = tmp_ / "mine.yaml";
  write_file(cfg, "model:\n  n_layer: 5\n");
  r = run({"config", "--config", cfg.string()});
  ASSERT_EQ(r.rc, 0) << r;
  EXPECT_NE(r.out.find("n_layer: 5"), std::string::npos) << r;
  EXPECT_NE(r.out.find("runs/mine"), std::string::npos) << r;

  r = run({"config", "--set=train.lr=3e-4"});
  ASSERT_EQ(r.rc, 0) << r;
  EXPECT_DOUBLE_EQ(ssd::parse_config(r.out, {}, "printed").train.lr, 3e-4);

  r = run({"config", "--set", "model.bogus=1"});
  EXPECT_NE(r.rc, 0) << r;
  EXPECT_NE(r.err.find("model.bogus"), std::string::npos) << r;
}

// ---------------------------------------------------------------- a real short run

// Parses one flat JSON object of string keys and number values; false if it is not one.
bool parse_flat_json(const std::string& line, std::map<std::string, double>* out) {
  size_t i = 0;
  auto ws = [&] { while (i < line.size() && std::isspace(static_cast<unsigned char>(line[i]))) ++i; };
  ws();
  if (i >= line.size() || line[i++] != '{') return false;
  ws();
  if (i < line.size() && line[i] == '}') return ++i, ws(), i == line.size();
  while (true) {
    ws();
    if (i >= line.size() || line[i++] != '"') return false;
    size_t close = line.find('"', i);
    if (close == std::string::npos) return false;
    std::string key = line.substr(i, close - i);
    i = close + 1;
    ws();
    if (i >= line.size() || line[i++] != ':') return false;
    ws();
    const char* start = line.c_str() + i;
    char* end = nullptr;
    double v = std::strtod(start, &end);
    if (end == start) return false;
    i += static_cast<size_t>(end - start);
    (*out)[key] = v;
    ws();
    if (i >= line.size()) return false;
    if (line[i] == ',') { ++i; continue; }
    if (line[i] == '}') { ++i; ws(); return i == line.size(); }
    return false;
  }
}

TEST_F(Cli, ShortTrainingRun) {
  Result r = run({"train", "--set", "train.max_steps=30", "--set", "run.log_every=10", "--set",
                  set_run_dir(), "--set", "train.device=cpu"});
  RecordProperty("train_seconds", std::to_string(r.seconds));
  std::printf("[ info ] 30-step training run took %.2f s\n", r.seconds);
  ASSERT_EQ(r.rc, 0) << r;

  // Progress lines.
  std::istringstream out(r.out);
  std::string line;
  int progress = 0;
  std::vector<int> steps;
  while (std::getline(out, line)) {
    if (line.rfind("step ", 0) != 0) continue;
    ++progress;
    EXPECT_NE(line.find("loss"), std::string::npos) << line;
    EXPECT_NE(line.find("tok/s"), std::string::npos) << line;
    EXPECT_NE(line.find("ETA"), std::string::npos) << line;
    steps.push_back(std::atoi(line.c_str() + 5));
  }
  EXPECT_GE(progress, 3) << r;
  EXPECT_NE(std::find(steps.begin(), steps.end(), 10), steps.end()) << r;
  EXPECT_NE(std::find(steps.begin(), steps.end(), 20), steps.end()) << r;
  EXPECT_NE(std::find(steps.begin(), steps.end(), 30), steps.end()) << r;

  // The run directory: the resolved config and the metrics.
  ASSERT_TRUE(fs::is_directory(run_dir())) << r;
  ASSERT_TRUE(fs::exists(run_dir() / "config.yaml")) << r;
  ssd::Config saved = ssd::parse_config(read_file(run_dir() / "config.yaml"), {}, "saved");
  EXPECT_EQ(saved.train.max_steps, 30);
  EXPECT_EQ(saved.run.log_every, 10);
  EXPECT_EQ(saved.train.device, "cpu");
  EXPECT_EQ(saved.run.dir, run_dir().string());

  ASSERT_TRUE(fs::exists(run_dir() / "metrics.jsonl")) << r;
  std::istringstream metrics(read_file(run_dir() / "metrics.jsonl"));
  int train_lines = 0, lines = 0;
  double last_step = 0;
  while (std::getline(metrics, line)) {
    ++lines;
    std::map<std::string, double> obj;
    ASSERT_TRUE(parse_flat_json(line, &obj)) << "not a flat JSON object: " << line;
    ASSERT_TRUE(obj.count("step")) << line;
    EXPECT_TRUE(obj.count("loss") || obj.count("eval_loss")) << line;
    if (obj.count("loss")) {
      ++train_lines;
      EXPECT_TRUE(std::isfinite(obj["loss"]) && obj["loss"] > 0) << line;
      EXPECT_GE(obj["step"], last_step) << line;
      last_step = obj["step"];
    }
  }
  EXPECT_GE(train_lines, 3);
  EXPECT_EQ(last_step, 30);
  EXPECT_GE(lines, train_lines);

  // Nothing written outside run.dir.
  EXPECT_FALSE(fs::exists(work_ / "runs")) << r;
  // The final checkpoint (src/io) lands under <run.dir>/checkpoints.
  bool any_ckpt = false;
  if (fs::is_directory(run_dir() / "checkpoints"))
    for (const auto& e : fs::directory_iterator(run_dir() / "checkpoints"))
      any_ckpt |= e.path().extension() == ".h5";
  EXPECT_TRUE(any_ckpt) << "no checkpoint written at the last step\n" << r;
}

}  // namespace

// ---------------------------------------------------------------- eval and export

TEST_F(Cli, EvalAndExportACheckpoint) {
  Result t = run({"train", "--set", "train.max_steps=5", "--set", set_run_dir(), "--set",
                  "train.device=cpu", "--set", "run.eval_every=0"});
  ASSERT_EQ(t.rc, 0) << t;
  const std::string ckpt = (run_dir() / "checkpoints" / "step_00000005.h5").string();
  ASSERT_TRUE(fs::exists(ckpt)) << t;

  Result e = run({"eval", "--checkpoint", ckpt, "--set", "train.device=cpu"});
  ASSERT_EQ(e.rc, 0) << e;
  EXPECT_NE(e.out.find("loss"), std::string::npos) << e;
  EXPECT_NE(e.out.find("step 5"), std::string::npos) << e;

  const fs::path out = tmp_ / "export";
  Result x = run({"export", "--checkpoint", ckpt, "--out", out.string(), "--with-reference"});
  ASSERT_EQ(x.rc, 0) << x;
  EXPECT_TRUE(fs::exists(out / "model.safetensors")) << x;
  EXPECT_TRUE(fs::exists(out / "config.json")) << x;
  EXPECT_TRUE(fs::exists(out / "reference.json")) << x;
  EXPECT_NE(read_file(out / "config.json").find("Mamba2ForCausalLM"), std::string::npos);

  Result m = run({"export", "--checkpoint", ckpt, "--out", (tmp_ / "m").string(), "--format",
                  "mamba_ssm", "--dtype", "bf16"});
  ASSERT_EQ(m.rc, 0) << m;
  EXPECT_NE(read_file(tmp_ / "m" / "config.json").find("ssm_cfg"), std::string::npos);

  // Bad input: each names what is wrong and exits non-zero.
  Result bad_dtype = run({"export", "--checkpoint", ckpt, "--out", (tmp_ / "b").string(),
                          "--dtype", "fp8"});
  EXPECT_NE(bad_dtype.rc, 0);
  EXPECT_NE(bad_dtype.err.find("fp8"), std::string::npos) << bad_dtype;
  EXPECT_FALSE(fs::exists(tmp_ / "b"));
  Result missing = run({"eval", "--checkpoint", (tmp_ / "nope.h5").string()});
  EXPECT_NE(missing.rc, 0);
  EXPECT_NE(missing.err.find("nope.h5"), std::string::npos) << missing;
  Result no_out = run({"export", "--checkpoint", ckpt});
  EXPECT_NE(no_out.rc, 0);
  EXPECT_NE(no_out.err.find("--out"), std::string::npos) << no_out;
}
