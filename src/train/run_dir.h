// The run directory's safety rules, checked before and around training (trainer.cpp calls
// them): every path the run writes is writable before any work; one trainer per run directory
// (an advisory lock); temp files of dead writers removed; a resumed checkpoint's stored config
// compared with the current one.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"

namespace ssd {

// Fails naming the config key when run.dir or checkpoint.dir cannot be created or written
// (an ancestor that is a file, a read-only or permission-denied directory). Creates nothing:
// the nearest existing ancestor is probed with a temp file that is removed again.
void check_run_paths_writable(const Config& c);

// An exclusive advisory flock on <run_dir>/ssdtrain.lock, held for the object's lifetime. The
// file names the holder ("host <name> pid <pid>"); a second trainer is refused naming it. The
// kernel drops the lock when the holder dies, so a stale lock file never blocks a run.
class RunDirLock {
 public:
  explicit RunDirLock(const std::string& run_dir);
  ~RunDirLock();
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

// Removes temp files in dir (not recursive) that a dead process of this host left behind:
// "<name>.tmp.<host>.<pid>" with host == this host (or "<name>.tmp.<pid>", the older form)
// whose pid is not alive, and the pid-less "config.yaml.tmp" / "metrics.jsonl.tmp" of older
// versions. Temp files of live processes and of other hosts are kept. Returns what it removed.
std::vector<std::string> remove_stale_temp_files(const std::string& dir);

// Compares the config a checkpoint was trained with (stored_yaml) with the current one. Keys
// that only steer this invocation (device, logging, checkpoint cadence, parallel layout...) may
// change freely. A differing model key is always refused; any other differing key (schedule,
// optimiser, batch, seed, data) is refused unless train.resume_config=override, in which case
// the returned lines say what changed (for the log). Errors name every differing key.
std::vector<std::string> check_resume_config(const Config& current, const std::string& stored_yaml,
                                             const std::string& checkpoint);

// What the root rank holds while it trains: the lock, and the notes to log.
struct RunDir {
  std::unique_ptr<RunDirLock> lock;
  std::vector<std::string> notes;
};
// Creates run.dir and checkpoint.dir, takes the lock, removes stale temp files in both.
RunDir open_run_dir(const Config& c);

}  // namespace ssd
