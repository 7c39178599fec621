#include "train/run_dir.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "core/error.h"
#include "io/checkpoint.h"

namespace fs = std::filesystem;

namespace ssd {
namespace {

// ---- writable paths ----

void check_writable(const char* key, const std::string& dir) {
  std::error_code ec;
  fs::path p = fs::absolute(dir, ec);
  if (ec) fail("config key '", key, "': cannot resolve '", dir, "': ", ec.message());
  // The nearest existing ancestor decides: a file there means the directory cannot be made.
  fs::path existing = p;
  while (!fs::exists(existing, ec) && existing.has_parent_path() && existing != existing.parent_path())
    existing = existing.parent_path();
  if (!fs::is_directory(existing, ec))
    fail("config key '", key, "': '", dir, "' cannot be created: '", existing.string(),
         "' is not a directory");
  // Permission bits do not tell (root ignores them; read-only mounts): write a probe file.
  std::string probe = (existing / ".ssdtrain-write-probe-XXXXXX").string();
  int fd = ::mkstemp(probe.data());
  if (fd < 0)
    fail("config key '", key, "': '", dir, "' is not writable: cannot create a file in '",
         existing.string(), "' (", std::strerror(errno), ")");
  ::close(fd);
  ::unlink(probe.c_str());
}

// ---- temp files ----

bool pid_alive(long pid) {
  if (pid <= 0) return false;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

bool all_digits(const std::string& s) {
  if (s.empty()) return false;
  for (char ch : s)
    if (ch < '0' || ch > '9') return false;
  return true;
}

// ---- stored config ----

// section.key -> scalar text of a config YAML (as config_to_yaml writes it).
std::map<std::string, std::string> flatten(const std::string& yaml, const std::string& origin) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    fail(origin, ": the stored config is not valid YAML: ", e.what());
  }
  std::map<std::string, std::string> out;
  if (!root.IsMap()) return out;
  for (auto s = root.begin(); s != root.end(); ++s) {
    if (!s->second.IsMap()) continue;
    for (auto k = s->second.begin(); k != s->second.end(); ++k)
      if (k->second.IsScalar()) out[s->first.Scalar() + "." + k->first.Scalar()] = k->second.Scalar();
  }
  return out;
}

// Keys that steer only this invocation: how and where it runs, logs and checkpoints.
bool free_to_change(const std::string& key) {
  static const std::set<std::string> free_keys = {
      "train.device", "train.resume", "train.init_from", "train.on_nan",
      "train.max_skipped_steps", "train.resume_config", "train.recompute", "train.stop_after"};
  return free_keys.count(key) || key.rfind("run.", 0) == 0 || key.rfind("checkpoint.", 0) == 0 ||
         key.rfind("parallel.", 0) == 0;
}

}  // namespace

void check_run_paths_writable(const Config& c) {
  check_writable("run.dir", c.run.dir);
  check_writable("checkpoint.dir", c.checkpoint.dir);
}

RunDirLock::RunDirLock(const std::string& run_dir)
    : path_((fs::path(run_dir) / "ssdtrain.lock").string()) {
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) fail("cannot open the run-directory lock ", path_, ": ", std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int e = errno;
    char holder[256] = {};
    ssize_t n = ::pread(fd_, holder, sizeof holder - 1, 0);
    std::string who = n > 0 ? std::string(holder, static_cast<size_t>(n)) : "";
    while (!who.empty() && (who.back() == '\n' || who.back() == ' ')) who.pop_back();
    ::close(fd_);
    fd_ = -1;
    if (e == EWOULDBLOCK)
      fail("run directory ", run_dir, " is in use by another trainer (",
           who.empty() ? std::string("holder unknown") : who, ", lock ", path_,
           "); wait for it to finish, stop it, or set run.dir to another directory");
    fail("cannot lock ", path_, ": ", std::strerror(e));
  }
  const std::string me = "host " + host_name() + " pid " + std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, me.data(), me.size(), 0) != (ssize_t)me.size())
    fail("cannot write the run-directory lock ", path_, ": ", std::strerror(errno));
}

RunDirLock::~RunDirLock() {
  if (fd_ >= 0) ::close(fd_);  // closing drops the flock; the file stays (harmless)
}

std::vector<std::string> remove_stale_temp_files(const std::string& dir) {
  std::vector<std::string> removed;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return removed;
  const std::string me = host_name();
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    std::error_code ec2;
    if (!entry.is_regular_file(ec2)) continue;
    const std::string name = entry.path().filename().string();
    bool stale = false;
    if (name == "config.yaml.tmp" || name == "metrics.jsonl.tmp") {
      stale = true;  // written by older versions without a pid; the lock says no one is writing
    } else if (auto at = name.rfind(".tmp."); at != std::string::npos) {
      const std::string tail = name.substr(at + 5);  // "<host>.<pid>" or "<pid>"
      const auto dot = tail.rfind('.');
      const std::string pid = dot == std::string::npos ? tail : tail.substr(dot + 1);
      const std::string host = dot == std::string::npos ? me : tail.substr(0, dot);
      stale = all_digits(pid) && host == me && !pid_alive(std::stol(pid));
    }
    if (stale && ::unlink(entry.path().c_str()) == 0) removed.push_back(entry.path().string());
  }
  return removed;
}

std::vector<std::string> check_resume_config(const Config& current, const std::string& stored_yaml,
                                             const std::string& checkpoint) {
  const auto before = flatten(stored_yaml, "checkpoint " + checkpoint);
  const auto now = flatten(config_to_yaml(current), "the current config");
  // With train.global_batch set (and unchanged), micro_batch and grad_accum only split the same
  // step differently (another GPU count or memory budget): the math is the same.
  auto same = [&](const std::string& k) {
    auto a = before.find(k), b = now.find(k);
    return a != before.end() && b != now.end() && a->second == b->second;
  };
  const bool fixed_global =
      same("train.global_batch") && now.at("train.global_batch") != "0";
  std::vector<std::string> model_diffs, other_diffs, notes;
  for (const auto& [key, value] : now) {
    auto it = before.find(key);
    if (it == before.end() || it->second == value || free_to_change(key)) continue;
    if (fixed_global && (key == "train.micro_batch" || key == "train.grad_accum")) continue;
    const std::string d = key + " (checkpoint " + it->second + ", now " + value + ")";
    (key.rfind("model.", 0) == 0 ? model_diffs : other_diffs).push_back(d);
  }
  auto join = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
    return s;
  };
  if (!model_diffs.empty())
    fail("cannot resume from ", checkpoint, ": the model differs from the one it was trained as: ",
         join(model_diffs),
         ". A model key cannot change on resume; restore it, or set run.dir to a new directory "
         "(train.init_from starts a new run from an exported model)");
  if (other_diffs.empty()) return notes;
  if (current.train.resume_config != "override")
    fail("cannot resume from ", checkpoint, ": the config differs from the one the run was "
         "trained with: ", join(other_diffs),
         ". Restore these values, set train.resume_config=override to continue with the new "
         "ones (a changed train.max_steps or lr changes the learning-rate schedule from here on), "
         "or set run.dir to a new directory");
  for (const auto& d : other_diffs)
    notes.push_back("train.resume_config=override: resuming with changed " + d);
  return notes;
}

RunDir open_run_dir(const Config& c) {
  RunDir rd;
  for (const auto& [key, dir] : {std::pair<const char*, std::string>{"run.dir", c.run.dir},
                                 {"checkpoint.dir", c.checkpoint.dir}}) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) fail("config key '", key, "': cannot create '", dir, "': ", ec.message());
  }
  rd.lock = std::make_unique<RunDirLock>(c.run.dir);
  for (const auto& dir : {c.run.dir, c.checkpoint.dir})
    for (const auto& f : remove_stale_temp_files(dir))
      rd.notes.push_back("removed " + f + " (a temp file of a process that no longer runs)");
  return rd;
}

}  // namespace ssd
