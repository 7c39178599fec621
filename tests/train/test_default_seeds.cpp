// The default run (configs/default.yaml, what `scripts/run.sh` trains) reaches the recall
// accuracy the README advertises for other seeds, not only for the shipped one: five seeds, each
// the full default run on the CPU, two at a time (the suite's one long test, a few minutes on
// 2 cores).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

// What README.md states for the default run: recall accuracy at least 0.95 for every seed
// (every seed measured ended at 1.000).
constexpr double kEverySeedAccuracy = 0.95;

// eval_acc of the last evaluation line of a metrics.jsonl; -1 if none.
double last_eval_acc(const fs::path& metrics) {
  std::ifstream f(metrics);
  std::string line;
  double acc = -1;
  while (std::getline(f, line))
    if (auto p = line.find("\"eval_acc\": "); p != std::string::npos)
      acc = std::stod(line.substr(p + 12));
  return acc;
}

pid_t spawn(const fs::path& dir, int seed) {
  pid_t pid = fork();
  if (pid == 0) {
    std::vector<std::string> args = {SSD_BINARY, "train", "--set", "train.device=cpu", "--set",
                                     "train.seed=" + std::to_string(seed), "--set",
                                     "run.dir=" + dir.string()};
    std::vector<char*> argv;
    for (auto& s : args) argv.push_back(s.data());
    argv.push_back(nullptr);
    if (!std::freopen((dir.string() + ".log").c_str(), "w", stdout)) _exit(126);
    dup2(fileno(stdout), 2);
    setenv("OMP_NUM_THREADS", "1", 1);  // two runs share the 2 cores
    execv(SSD_BINARY, argv.data());
    _exit(127);
  }
  return pid;
}

TEST(DefaultRun, ReachesTheAdvertisedAccuracyForEverySeed) {
  const fs::path root = fs::temp_directory_path() / ("ssd_test_seeds_" + std::to_string(getpid()));
  fs::remove_all(root);
  fs::create_directories(root);
  const std::vector<int> seeds = {1, 2, 3, 4, 5};
  std::map<pid_t, int> running;
  std::map<int, int> status_of;
  size_t next = 0;
  while (next < seeds.size() || !running.empty()) {
    while (next < seeds.size() && running.size() < 2) {
      const int s = seeds[next++];
      running[spawn(root / ("seed" + std::to_string(s)), s)] = s;
    }
    int status = 0;
    pid_t done = wait(&status);
    ASSERT_GT(done, 0);
    status_of[running[done]] = status;
    running.erase(done);
  }
  for (int s : seeds) {
    const fs::path dir = root / ("seed" + std::to_string(s));
    EXPECT_TRUE(WIFEXITED(status_of[s]) && WEXITSTATUS(status_of[s]) == 0)
        << "seed " << s << " failed; log " << dir.string() << ".log";
    const double acc = last_eval_acc(dir / "metrics.jsonl");
    std::printf("[ info ] seed %d: final recall accuracy %.3f\n", s, acc);
    EXPECT_GE(acc, kEverySeedAccuracy) << "seed " << s;
  }
  if (!HasFailure()) fs::remove_all(root);
}

}  // namespace
