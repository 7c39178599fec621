// The ssdtrain binary under the failures of issue #13: a full disk, a killed writer, runs that
// only skip steps, a changed config on resume, two trainers on one run directory, signals,
// --help everywhere, stale export files and diverged checkpoints. Each runs the binary in a
// fresh temporary directory.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "io/checkpoint.h"
#include "train/run_dir.h"

#include "testutil.h"

namespace fs = std::filesystem;

namespace {

using ssdtest::read_file;

std::string quote(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

bool has(const std::string& s, const std::string& needle) {
  return s.find(needle) != std::string::npos;
}

struct Result {
  int rc = -1;
  std::string out, err;
};

std::ostream& operator<<(std::ostream& os, const Result& r) {
  return os << "exit " << r.rc << "\n--- stdout ---\n" << r.out << "--- stderr ---\n" << r.err;
}

// Files under dir (recursive) whose name holds ".tmp": what a failed write must not leave.
std::vector<std::string> temp_files(const fs::path& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  if (!fs::exists(dir, ec)) return out;
  for (const auto& e : fs::recursive_directory_iterator(dir, ec))
    if (has(e.path().filename().string(), ".tmp")) out.push_back(e.path().string());
  return out;
}

class Hardening : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ssd_test_hard_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    tmp_ = tmpl;
  }
  void TearDown() override {
    if (mounted_) ::umount2(mount_.c_str(), MNT_DETACH);
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }

  // Runs ssdtrain with args (a shell suffix may follow: a pipe), stdout/stderr captured.
  Result run(const std::vector<std::string>& args, const std::string& pipe_to = "") {
    std::string cmd = "cd " + quote(tmp_.string()) + " && OMP_NUM_THREADS=2 " + quote(SSD_BINARY);
    for (const auto& a : args) cmd += " " + quote(a);
    const fs::path out = tmp_ / "stdout.txt", err = tmp_ / "stderr.txt", rc = tmp_ / "rc.txt";
    if (pipe_to.empty()) {
      cmd += " >" + quote(out.string()) + " 2>" + quote(err.string()) + " </dev/null; echo $? >" +
             quote(rc.string());
    } else {  // the exit status of ssdtrain, not of the reader
      cmd = "bash -c " + quote("(" + cmd + " 2>" + quote(err.string()) + "; echo $? >" +
                               quote(rc.string()) + ") | " + pipe_to + " >" + quote(out.string()));
    }
    std::system(cmd.c_str());
    Result r;
    r.rc = std::atoi(read_file(rc).c_str());
    r.out = read_file(out);
    r.err = read_file(err);
    return r;
  }
  std::vector<std::string> train_args(const fs::path& run_dir, int steps,
                                      const std::vector<std::string>& sets = {}) {
    std::vector<std::string> a = {"train", "--set", "run.dir=" + run_dir.string(), "--set",
                                  "train.device=cpu", "--set",
                                  "train.max_steps=" + std::to_string(steps), "--set",
                                  "run.log_every=1"};
    for (const auto& s : sets) a.insert(a.end(), {"--set", s});
    return a;
  }
  // A small tmpfs at tmp_/full; false where mounting is not allowed.
  bool mount_small_fs(const std::string& size) {
    mount_ = (tmp_ / "full").string();
    fs::create_directories(mount_);
    const std::string opts = "size=" + size;
    mounted_ = ::mount("tmpfs", mount_.c_str(), "tmpfs", 0, opts.c_str()) == 0;
    return mounted_;
  }

  fs::path tmp_;
  std::string mount_;
  bool mounted_ = false;
};

// ---------------------------------------------------------------- a full disk

TEST_F(Hardening, DiskFullAtACheckpointFailsCleanly) {
  if (!mount_small_fs("300k")) GTEST_SKIP() << "cannot mount a tmpfs here (needs root)";
  // config.yaml and metrics fit; the ~1.5 MB checkpoint does not.
  const fs::path run_dir = fs::path(mount_) / "run";
  Result r = run(train_args(run_dir, 3));
  EXPECT_EQ(r.rc, 1) << r;  // not 139: no crash in HDF5's shutdown
  EXPECT_TRUE(has(r.err, "No space left on device")) << r;
  EXPECT_TRUE(has(r.err, "step_00000003.h5")) << r;
  EXPECT_FALSE(has(r.err, "Segmentation")) << r;
  EXPECT_TRUE(temp_files(run_dir).empty()) << temp_files(run_dir)[0];
  EXPECT_FALSE(fs::exists(run_dir / "checkpoints" / "step_00000003.h5"));
}

// The same on 2 ranks (ZeRO-1: rank 0 receives the other rank's pieces of every tensor): the
// checkpoint of step 1 fits, the disk fills up part-way through step 2's, which rank 0 writes
// tensor by tensor while the ranks gather the next ones. Every rank ends with exit 1 (no hang,
// no abort), the message is printed once, no temp file is left and step 1 stays the latest.
TEST_F(Hardening, DiskFullPartWayThroughAMultiRankCheckpoint) {
  if (!mount_small_fs("2500k")) GTEST_SKIP() << "cannot mount a tmpfs here (needs root)";
  const fs::path run_dir = fs::path(mount_) / "run", ck = run_dir / "checkpoints";
  std::string cmd = "cd " + quote(tmp_.string()) + " && OMP_NUM_THREADS=1 " + quote(SSD_MPIEXEC) +
                    " --allow-run-as-root --oversubscribe -np 2 bash -c " +
                    quote("\"$0\" \"$@\"; echo $? >rc.$OMPI_COMM_WORLD_RANK") + " " +
                    quote(SSD_BINARY);
  for (const auto& a : train_args(run_dir, 4, {"checkpoint.every=1", "checkpoint.keep_last=0",
                                               "parallel.zero=1"}))
    cmd += " " + quote(a);
  cmd += " >stdout.txt 2>stderr.txt </dev/null";
  std::system(cmd.c_str());
  Result r;
  r.out = read_file(tmp_ / "stdout.txt");
  r.err = read_file(tmp_ / "stderr.txt");
  for (const char* rank : {"0", "1"})
    EXPECT_EQ(std::atoi(read_file(tmp_ / (std::string("rc.") + rank)).c_str()), 1)
        << "rank " << rank << "\n" << r;
  const std::string msg = "cannot write checkpoint " + (ck / "step_00000002.h5").string();
  EXPECT_TRUE(has(r.err, msg + ": cannot write ")) << r;
  EXPECT_TRUE(has(r.err, "No space left on device")) << r;
  EXPECT_EQ(r.err.find(msg), r.err.rfind(msg)) << "printed once\n" << r;
  EXPECT_TRUE(has(r.out, "checkpoint " + (ck / "step_00000001.h5").string())) << r;
  EXPECT_TRUE(temp_files(run_dir).empty()) << temp_files(run_dir)[0];
  EXPECT_FALSE(fs::exists(ck / "step_00000002.h5"));
  EXPECT_EQ(ssd::latest_checkpoint(ck.string()).value_or(""), (ck / "step_00000001.h5").string());
  EXPECT_EQ(ssd::read_checkpoint((ck / "step_00000001.h5").string()).step, 1);
}

TEST_F(Hardening, DiskFullAtStartLeavesNoTempFile) {
  if (!mount_small_fs("64k")) GTEST_SKIP() << "cannot mount a tmpfs here (needs root)";
  {  // fill it up
    std::ofstream f(fs::path(mount_) / "filler", std::ios::binary);
    std::string block(4096, 'x');
    for (int i = 0; i < 64 && f; ++i) f.write(block.data(), block.size());
  }
  const fs::path run_dir = fs::path(mount_) / "run";
  Result r = run(train_args(run_dir, 3));
  EXPECT_EQ(r.rc, 1) << r;
  EXPECT_TRUE(has(r.err, "No space left on device")) << r;
  EXPECT_TRUE(has(r.err, run_dir.string())) << r;
  EXPECT_TRUE(temp_files(run_dir).empty()) << temp_files(run_dir)[0];
}

// ---------------------------------------------------------------- a killed writer

TEST_F(Hardening, TempFileOfAKilledWriterIsRemovedAtStart) {
  const fs::path run_dir = tmp_ / "run", ck = run_dir / "checkpoints";
  fs::create_directories(ck);
  // What kill -9 during write_file_atomic leaves: a temp file of a pid that is gone.
  pid_t dead = fork();
  if (dead == 0) _exit(0);
  waitpid(dead, nullptr, 0);
  const std::string stale = "step_00000002.h5.tmp." + ssd::host_name() + "." + std::to_string(dead);
  const std::string live = "step_00000002.h5.tmp." + ssd::host_name() + "." + std::to_string(getpid());
  std::ofstream(ck / stale) << "partial";
  std::ofstream(ck / live) << "being written";
  Result r = run(train_args(run_dir, 2));
  ASSERT_EQ(r.rc, 0) << r;
  EXPECT_FALSE(fs::exists(ck / stale)) << r;
  EXPECT_TRUE(has(r.out, stale)) << "the removal is logged\n" << r;
  EXPECT_TRUE(fs::exists(ck / live)) << "a live process's temp file was removed\n" << r;
}

// ---------------------------------------------------------------- on_nan=skip

TEST_F(Hardening, SkippingHasALimitAndTheLastStepIsSaved) {
  // lr 1e30: step 1 makes the weights huge, every later step's loss is not finite.
  const std::vector<std::string> diverge = {"train.lr=1e30", "train.warmup_steps=0",
                                            "train.grad_clip=0", "train.on_nan=skip",
                                            "checkpoint.every=1", "checkpoint.keep_last=0"};
  const fs::path a = tmp_ / "a";
  auto sets = diverge;
  sets.push_back("train.max_skipped_steps=3");
  Result r = run(train_args(a, 20, sets));
  EXPECT_NE(r.rc, 0) << r;
  EXPECT_TRUE(has(r.err, "train.max_skipped_steps=3")) << r;
  EXPECT_TRUE(has(r.err, "step_00000001.h5")) << "names the last good checkpoint\n" << r;
  EXPECT_FALSE(has(r.out, "done")) << r;
  // Under the limit the run finishes, and its last (skipped) step is checkpointed.
  const fs::path b = tmp_ / "b";
  r = run(train_args(b, 3, diverge));
  EXPECT_EQ(r.rc, 0) << r;
  EXPECT_TRUE(fs::exists(b / "checkpoints" / "step_00000003.h5")) << r;
}

// ---------------------------------------------------------------- resume under another config

TEST_F(Hardening, ResumeRefusesAChangedConfigUnlessOverridden) {
  const fs::path d = tmp_ / "run";
  ASSERT_EQ(run(train_args(d, 3)).rc, 0);
  Result r = run(train_args(d, 5));  // max_steps changed: another LR schedule
  EXPECT_NE(r.rc, 0) << r;
  EXPECT_TRUE(has(r.err, "train.max_steps (checkpoint 3, now 5)")) << r;
  EXPECT_FALSE(fs::exists(d / "checkpoints" / "step_00000005.h5"));
  r = run(train_args(d, 5, {"model.d_model=96", "train.resume_config=override"}));
  EXPECT_NE(r.rc, 0) << r;
  EXPECT_TRUE(has(r.err, "model.d_model")) << r;
  r = run(train_args(d, 5, {"train.resume_config=override"}));
  EXPECT_EQ(r.rc, 0) << r;
  EXPECT_TRUE(has(r.out, "train.max_steps (checkpoint 3, now 5)")) << "stated in the log\n" << r;
  EXPECT_TRUE(fs::exists(d / "checkpoints" / "step_00000005.h5")) << r;
}

TEST_F(Hardening, InitFromIsReportedAsIgnoredWhenResuming) {
  const fs::path d = tmp_ / "run", ex = tmp_ / "exported";
  ASSERT_EQ(run(train_args(d, 2)).rc, 0);
  ASSERT_EQ(run({"export", "--checkpoint", (d / "checkpoints" / "step_00000002.h5").string(),
                 "--out", ex.string()}).rc, 0);
  Result r = run(train_args(d, 2, {"train.init_from=" + ex.string()}));
  EXPECT_EQ(r.rc, 0) << r;
  EXPECT_TRUE(has(r.out, "train.init_from=" + ex.string() + " is ignored")) << r;
}

TEST_F(Hardening, SecondTrainerOnARunDirIsRefused) {
  const fs::path d = tmp_ / "run";
  fs::create_directories(d);
  ssd::RunDirLock held(d.string());  // this process plays the first trainer
  Result r = run(train_args(d, 2));
  EXPECT_NE(r.rc, 0) << r;
  EXPECT_TRUE(has(r.err, "in use")) << r;
  EXPECT_TRUE(has(r.err, "pid " + std::to_string(getpid()))) << r;
  EXPECT_FALSE(fs::exists(d / "checkpoints" / "step_00000002.h5"));
}

TEST_F(Hardening, UnwritableCheckpointDirFailsBeforeTraining) {
  std::ofstream(tmp_ / "a_file") << "x";
  Result r = run(train_args(tmp_ / "run", 50,
                            {"checkpoint.dir=" + (tmp_ / "a_file" / "ck").string()}));
  EXPECT_NE(r.rc, 0) << r;
  EXPECT_TRUE(has(r.err, "checkpoint.dir")) << r;
  EXPECT_FALSE(has(r.out, "step 1/")) << "it trained before finding out\n" << r;
  EXPECT_FALSE(fs::exists(tmp_ / "run"));
}

// ---------------------------------------------------------------- signals

TEST_F(Hardening, SighupCheckpointsAndSigpipeDoesNotKill) {
  const fs::path d = tmp_ / "run", log = tmp_ / "log.txt";
  pid_t pid = fork();
  if (pid == 0) {
    auto a = train_args(d, 100000);
    std::vector<std::string> all = {SSD_BINARY};
    all.insert(all.end(), a.begin(), a.end());
    std::vector<char*> argv;
    for (auto& s : all) argv.push_back(s.data());
    argv.push_back(nullptr);
    if (!std::freopen(log.c_str(), "w", stdout)) _exit(126);
    dup2(fileno(stdout), 2);
    execv(SSD_BINARY, argv.data());
    _exit(127);
  }
  for (int i = 0; i < 600 && !has(read_file(log), "step 3/"); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  kill(pid, SIGHUP);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status) << "\n" << read_file(log);
  EXPECT_EQ(WEXITSTATUS(status), 0) << read_file(log);
  EXPECT_TRUE(has(read_file(log), "stopped by signal " + std::to_string(SIGHUP))) << read_file(log);
  EXPECT_TRUE(ssd::latest_checkpoint((d / "checkpoints").string()).has_value());

  // `ssdtrain train | head -n 2`: the reader goes away after two lines; the run goes on.
  const fs::path d2 = tmp_ / "run2";
  Result r = run(train_args(d2, 40), "head -n 2");
  EXPECT_EQ(r.rc, 0) << r;
  EXPECT_TRUE(fs::exists(d2 / "checkpoints" / "step_00000040.h5")) << r;
}

// ---------------------------------------------------------------- --help

TEST_F(Hardening, EveryCommandAnswersHelp) {
  const std::vector<std::vector<std::string>> cmds = {
      {"train"}, {"eval"}, {"export"}, {"config"}, {"bench"}, {"bench", "train"}, {"bench", "ssd"}};
  for (const auto& c : cmds)
    for (const char* flag : {"--help", "-h"}) {
      auto args = c;
      args.push_back(flag);
      Result r = run(args);
      std::string name = c[0] + (c.size() > 1 ? " " + c[1] : "");
      EXPECT_EQ(r.rc, 0) << name << " " << flag << "\n" << r;
      EXPECT_TRUE(has(r.out, "usage: ssdtrain " + name)) << name << " " << flag << "\n" << r;
      EXPECT_TRUE(has(r.out, "--")) << "prints its flags: " << name << "\n" << r;
    }
  EXPECT_FALSE(fs::exists(tmp_ / "runs"));
}

// ---------------------------------------------------------------- export

TEST_F(Hardening, ExportReplacesAStaleReference) {
  const fs::path d = tmp_ / "run", out = tmp_ / "exported";
  ASSERT_EQ(run(train_args(d, 2)).rc, 0);
  const std::string ck = (d / "checkpoints" / "step_00000002.h5").string();
  ASSERT_EQ(run({"export", "--checkpoint", ck, "--out", out.string(), "--with-reference"}).rc, 0);
  ASSERT_TRUE(fs::exists(out / "reference.json"));
  // Export again without a reference (other weights: bf16): the old reference must go.
  Result r = run({"export", "--checkpoint", ck, "--out", out.string(), "--dtype", "bf16"});
  ASSERT_EQ(r.rc, 0) << r;
  EXPECT_FALSE(fs::exists(out / "reference.json")) << "a stale reference.json was kept";
  EXPECT_TRUE(fs::exists(out / "model.safetensors"));
  EXPECT_TRUE(temp_files(out).empty());
}

// ---------------------------------------------------------------- diverged checkpoints

// Overwrites /params/<name> of a checkpoint with NaN and fixes its crc32, as a run that
// diverged before writing would have.
void poison(const std::string& path, const std::string& name) {
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  hid_t ds = H5Dopen2(f, ("/params/" + name).c_str(), H5P_DEFAULT);
  ASSERT_GE(ds, 0);
  hid_t space = H5Dget_space(ds);
  std::vector<float> v(static_cast<size_t>(H5Sget_simple_extent_npoints(space)), NAN);
  H5Sclose(space);
  ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0);
  uint32_t crc = ssd::crc32(v.data(), v.size() * sizeof(float));
  hid_t a = H5Aopen(ds, "crc32", H5P_DEFAULT);
  ASSERT_GE(H5Awrite(a, H5T_NATIVE_UINT32, &crc), 0);
  H5Aclose(a);
  H5Dclose(ds);
  H5Fclose(f);
}

TEST_F(Hardening, NonFiniteCheckpointsAndLossesAreErrors) {
  const fs::path d = tmp_ / "run";
  ASSERT_EQ(run(train_args(d, 2)).rc, 0);
  const std::string ck = (d / "checkpoints" / "step_00000002.h5").string();
  poison(ck, "norm_f.weight");
  ASSERT_NO_THROW(ssd::read_checkpoint(ck));  // a well-formed file: the CRCs match
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"eval", "--checkpoint", ck}, train_args(d, 4, {"train.resume_config=override"})}) {
    Result r = run(args);
    EXPECT_EQ(r.rc, 1) << r;
    EXPECT_TRUE(has(r.err, ck)) << r;
    EXPECT_TRUE(has(r.err, "/params/norm_f.weight")) << r;
    EXPECT_TRUE(has(r.err, "non-finite")) << r;
  }
  // Finite but huge weights (lr 1e30 for one step): the eval loss is not finite -> exit 1.
  const fs::path d2 = tmp_ / "run2";
  ASSERT_EQ(run(train_args(d2, 6, {"train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0",
                                   "train.stop_after=1"})).rc, 0);
  Result r = run({"eval", "--checkpoint", (d2 / "checkpoints" / "step_00000001.h5").string()});
  EXPECT_EQ(r.rc, 1) << r;
  EXPECT_TRUE(has(r.err, "not finite")) << r;
}

// An update that makes the parameters non-finite (lr 1e39 is inf in fp32): the checkpoint of
// that step is refused, naming the last good one, on 1 and on 2 ranks (ZeRO-1), before anything
// is committed: no temp file, and the good checkpoint stays the latest.
TEST_F(Hardening, NonFiniteParametersAreNotCheckpointed) {
  for (int np : {1, 2}) {
    const fs::path d = tmp_ / ("run" + std::to_string(np)), ck = d / "checkpoints";
    ASSERT_EQ(run(train_args(d, 4, {"train.stop_after=1"})).rc, 0);
    const std::string good = (ck / "step_00000001.h5").string();
    ASSERT_TRUE(fs::exists(good));
    std::string cmd = "cd " + quote(tmp_.string()) + " && OMP_NUM_THREADS=1 " +
                      quote(SSD_MPIEXEC) + " --allow-run-as-root --oversubscribe -np " +
                      std::to_string(np) + " " + quote(SSD_BINARY);
    for (const auto& a :
         train_args(d, 4, {"train.lr=1e39", "train.warmup_steps=0", "train.grad_clip=0",
                           "train.resume_config=override", "checkpoint.every=1",
                           "parallel.zero=1"}))
      cmd += " " + quote(a);
    cmd += " >stdout.txt 2>stderr.txt </dev/null";
    const int status = std::system(cmd.c_str());
    Result r;
    r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = read_file(tmp_ / "stdout.txt");
    r.err = read_file(tmp_ / "stderr.txt");
    EXPECT_NE(r.rc, 0) << r;
    EXPECT_TRUE(has(r.err, "step 2: the update made the parameters non-finite; no checkpoint "
                           "written. The last good checkpoint is " + good)) << r;
    EXPECT_TRUE(temp_files(d).empty()) << temp_files(d)[0];
    EXPECT_FALSE(fs::exists(ck / "step_00000002.h5")) << r;
    EXPECT_EQ(ssd::latest_checkpoint(ck.string()).value_or(""), good);
  }
}

// ---------------------------------------------------------------- wording

TEST_F(Hardening, CpuBenchPrintsNoMfu) {
  Result r = run({"bench", "train", "--steps", "1", "--set", "train.device=cpu", "--set",
                  "train.micro_batch=2"});
  ASSERT_EQ(r.rc, 0) << r;
  EXPECT_TRUE(has(r.out, "step median")) << r;
  EXPECT_FALSE(has(r.out, "MFU")) << r;
}

TEST_F(Hardening, NoHeldOutDataIsSaid) {
  const fs::path corpus = tmp_ / "corpus.txt";
  {
    std::ofstream f(corpus);
    for (int i = 0; i < 400; ++i) f << "the quick brown fox jumps over the lazy dog " << i << "\n";
  }
  Result r = run(train_args(tmp_ / "run", 2,
                            {"data.kind=text", "data.path=" + corpus.string(), "data.val_fraction=0",
                             "model.vocab_size=256", "train.seq_len=64", "train.micro_batch=2"}));
  ASSERT_EQ(r.rc, 0) << r;
  EXPECT_TRUE(has(r.out, "no held-out data")) << r;
  r = run(train_args(tmp_ / "run3", 2,
                     {"data.kind=text", "data.path=" + corpus.string(), "data.val_fraction=0.1",
                      "model.vocab_size=256", "train.seq_len=64", "train.micro_batch=2"}));
  ASSERT_EQ(r.rc, 0) << r;
  EXPECT_FALSE(has(r.out, "no held-out data")) << r;
}

}  // namespace
