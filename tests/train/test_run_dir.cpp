// The run directory's safety rules (src/train/run_dir.h): writable paths checked up front, one
// trainer per run directory, stale temp files of dead processes removed, and the stored config
// of a resumed checkpoint compared with the current one.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "config/config.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "train/run_dir.h"

namespace fs = std::filesystem;

namespace {

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const ssd::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an ssd::Error";
  return "";
}

bool has(const std::string& s, const std::string& needle) {
  return s.find(needle) != std::string::npos;
}

// A pid that is certainly not alive: a child that has exited and been reaped.
pid_t dead_pid() {
  pid_t p = fork();
  if (p == 0) _exit(0);
  waitpid(p, nullptr, 0);
  return p;
}

class RunDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("ssd_test_rundir_" + std::to_string(getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  ssd::Config config(const std::vector<std::string>& sets = {}) {
    std::vector<std::string> all = {"run.dir=" + (dir_ / "run").string()};
    all.insert(all.end(), sets.begin(), sets.end());
    return ssd::parse_config("", all, "test");
  }
  fs::path dir_;
};

TEST_F(RunDirTest, UnwritablePathsAreFoundBeforeAnyWork) {
  { std::ofstream(dir_ / "a_file") << "x"; }
  std::string msg = error_of([&] {
    ssd::check_run_paths_writable(config({"checkpoint.dir=" + (dir_ / "a_file" / "ck").string()}));
  });
  EXPECT_TRUE(has(msg, "checkpoint.dir")) << msg;
  EXPECT_TRUE(has(msg, "not a directory")) << msg;
  // /proc refuses new files even to root (permission bits alone would not tell).
  msg = error_of([&] { ssd::check_run_paths_writable(config({"run.dir=/proc/ssd_run"})); });
  EXPECT_TRUE(has(msg, "run.dir")) << msg;
  EXPECT_TRUE(has(msg, "not writable")) << msg;
  // A good config passes and creates nothing.
  ssd::check_run_paths_writable(config());
  EXPECT_FALSE(fs::exists(dir_ / "run"));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);  // a_file
}

TEST_F(RunDirTest, SecondLockIsRefusedNamingTheHolder) {
  auto first = std::make_unique<ssd::RunDirLock>(dir_.string());
  std::string msg = error_of([&] { ssd::RunDirLock second(dir_.string()); });
  EXPECT_TRUE(has(msg, "in use")) << msg;
  EXPECT_TRUE(has(msg, "pid " + std::to_string(getpid()))) << msg;
  EXPECT_TRUE(has(msg, "host " + ssd::host_name())) << msg;
  first.reset();  // released: the next trainer gets it
  EXPECT_NO_THROW(ssd::RunDirLock third(dir_.string()));
}

TEST_F(RunDirTest, LockOfAKilledProcessDoesNotBlock) {
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  pid_t child = fork();
  if (child == 0) {
    ssd::RunDirLock held(dir_.string());
    char c = 1;
    (void)!write(ready[1], &c, 1);
    pause();
    _exit(0);
  }
  char c;
  ASSERT_EQ(read(ready[0], &c, 1), 1);
  std::string msg = error_of([&] { ssd::RunDirLock second(dir_.string()); });
  EXPECT_TRUE(has(msg, "pid " + std::to_string(child))) << msg;
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  EXPECT_NO_THROW(ssd::RunDirLock after(dir_.string()));
}

TEST_F(RunDirTest, StaleTempFilesOfDeadProcessesAreRemoved) {
  const std::string host = ssd::host_name();
  const std::string dead = std::to_string(dead_pid()), alive = std::to_string(getpid());
  const std::vector<std::string> stale = {"step_00000005.h5.tmp." + host + "." + dead,
                                          "step_00000005.h5.tmp." + dead,  // older form
                                          "config.yaml.tmp"};
  const std::vector<std::string> kept = {"step_00000006.h5.tmp." + host + "." + alive,
                                         "step_00000006.h5.tmp." + alive,
                                         "step_00000007.h5.tmp.otherhost." + dead,
                                         "step_00000005.h5", "notes.tmp.txt"};
  for (const auto& n : stale) std::ofstream(dir_ / n) << "partial";
  for (const auto& n : kept) std::ofstream(dir_ / n) << "x";
  auto removed = ssd::remove_stale_temp_files(dir_.string());
  EXPECT_EQ(removed.size(), stale.size());
  for (const auto& n : stale) EXPECT_FALSE(fs::exists(dir_ / n)) << n;
  for (const auto& n : kept) EXPECT_TRUE(fs::exists(dir_ / n)) << n;
  // temp_path's own form is recognised (host and pid of this process: kept while it runs).
  const std::string tmp = ssd::temp_path((dir_ / "step_00000009.h5").string());
  std::ofstream(tmp) << "x";
  ssd::remove_stale_temp_files(dir_.string());
  EXPECT_TRUE(fs::exists(tmp));
}

TEST_F(RunDirTest, OpenRunDirLocksAndCleansBothDirectories) {
  ssd::Config c = config({"checkpoint.dir=" + (dir_ / "ck").string()});
  fs::create_directories(dir_ / "ck");
  const std::string t = "step_00000001.h5.tmp." + ssd::host_name() + "." + std::to_string(dead_pid());
  std::ofstream(dir_ / "ck" / t) << "partial";
  ssd::RunDir rd = ssd::open_run_dir(c);
  EXPECT_FALSE(fs::exists(dir_ / "ck" / t));
  ASSERT_EQ(rd.notes.size(), 1u);
  EXPECT_TRUE(has(rd.notes[0], t)) << rd.notes[0];
  EXPECT_TRUE(has(error_of([&] { ssd::open_run_dir(c); }), "in use"));
}

TEST_F(RunDirTest, ResumeConfigComparison) {
  const ssd::Config old_cfg = config({"train.max_steps=600"});
  const std::string stored = ssd::config_to_yaml(old_cfg);
  // Same config, and keys that only steer this invocation: accepted, nothing to say.
  EXPECT_TRUE(ssd::check_resume_config(old_cfg, stored, "ck.h5").empty());
  EXPECT_TRUE(ssd::check_resume_config(config({"train.max_steps=600", "run.log_every=3",
                                               "checkpoint.every=7", "train.device=cpu",
                                               "train.stop_after=2"}),
                                       stored, "ck.h5").empty());
  // A changed schedule: refused naming the key and both values.
  std::string msg = error_of([&] {
    ssd::check_resume_config(config({"train.max_steps=800", "train.lr=0.5"}), stored, "ck.h5");
  });
  EXPECT_TRUE(has(msg, "train.max_steps (checkpoint 600, now 800)")) << msg;
  EXPECT_TRUE(has(msg, "train.lr")) << msg;
  EXPECT_TRUE(has(msg, "ck.h5")) << msg;
  EXPECT_TRUE(has(msg, "train.resume_config=override")) << msg;
  // ... accepted with override, every change returned for the log.
  auto notes = ssd::check_resume_config(
      config({"train.max_steps=800", "train.resume_config=override"}), stored, "ck.h5");
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_TRUE(has(notes[0], "train.max_steps (checkpoint 600, now 800)")) << notes[0];
  // A model key: refused even with override.
  msg = error_of([&] {
    ssd::check_resume_config(
        config({"train.max_steps=600", "model.norm_eps=1e-6", "train.resume_config=override"}),
        stored, "ck.h5");
  });
  EXPECT_TRUE(has(msg, "model.norm_eps")) << msg;
  // With a fixed train.global_batch, micro_batch may change (another GPU count).
  const std::string gb = ssd::config_to_yaml(config({"train.global_batch=16", "train.micro_batch=8"}));
  EXPECT_TRUE(ssd::check_resume_config(config({"train.global_batch=16", "train.micro_batch=4"}),
                                       gb, "ck.h5").empty());
  EXPECT_TRUE(has(error_of([&] {
                    ssd::check_resume_config(config({"train.micro_batch=4"}), stored, "ck.h5");
                  }),
                  "train.micro_batch"));
}

}  // namespace
