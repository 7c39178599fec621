#include "dist/watchdog.h"

#include <mpi.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <thread>

namespace ssd::watchdog {
namespace {

using Clock = std::chrono::steady_clock;

struct State {
  std::mutex mu;
  double timeout = 600;
  std::string who = "rank 0";
  // The one blocking operation in progress (collectives are issued from one thread).
  bool busy = false;
  Clock::time_point since;
  std::string what;
  std::map<int, std::function<std::string()>> pollers;
  std::map<int, std::function<void()>> hooks;
  int next_id = 1;
  bool started = false;
};

State& st() {
  static State* s = new State;  // never destroyed: the thread may outlive static destructors
  return *s;
}

std::atomic<bool> g_aborting{false};

void loop() {
  for (;;) {
    double timeout;
    std::string failure;
    std::vector<std::function<std::string()>> polls;
    {
      std::lock_guard<std::mutex> g(st().mu);
      timeout = st().timeout;
      if (st().busy) {
        double waited = std::chrono::duration<double>(Clock::now() - st().since).count();
        if (waited > timeout) {
          char buf[160];
          std::snprintf(buf, sizeof buf, " has not finished after %.0f s (parallel.timeout_s=%g)",
                        waited, timeout);
          failure = st().what + buf + ": a peer process is dead, stopped or unreachable";
        }
      }
      for (auto& [id, p] : st().pollers) polls.push_back(p);
    }
    for (auto& p : polls) {
      if (!failure.empty()) break;
      failure = p();
    }
    if (!failure.empty()) abort_job(failure);
    // Check often enough that a short timeout still ends the job close to it.
    double tick = std::min(1.0, std::max(0.05, timeout / 20));
    std::this_thread::sleep_for(std::chrono::duration<double>(tick));
  }
}

}  // namespace

void configure(double timeout_s, const std::string& who) {
  std::lock_guard<std::mutex> g(st().mu);
  st().timeout = timeout_s;
  st().who = who;
  if (!st().started) {
    st().started = true;
    std::thread(loop).detach();
  }
}

double timeout_s() {
  std::lock_guard<std::mutex> g(st().mu);
  return st().timeout;
}

Scope::Scope(const std::string& group, const char* op, int64_t count) {
  std::lock_guard<std::mutex> g(st().mu);
  st().busy = true;
  st().since = Clock::now();
  st().what = std::string(op) + " on group " + group + " (" + std::to_string(count) + " elements)";
}

Scope::~Scope() {
  std::lock_guard<std::mutex> g(st().mu);
  st().busy = false;
}

int add_poller(std::function<std::string()> poll) {
  std::lock_guard<std::mutex> g(st().mu);
  int id = st().next_id++;
  st().pollers[id] = std::move(poll);
  return id;
}

void remove_poller(int id) {
  std::lock_guard<std::mutex> g(st().mu);
  st().pollers.erase(id);
}

int add_abort_hook(std::function<void()> hook) {
  std::lock_guard<std::mutex> g(st().mu);
  int id = st().next_id++;
  st().hooks[id] = std::move(hook);
  return id;
}

void remove_abort_hook(int id) {
  std::lock_guard<std::mutex> g(st().mu);
  st().hooks.erase(id);
}

void abort_job(const std::string& why) {
  if (g_aborting.exchange(true)) {  // another thread is already ending the job
    for (;;) pause();
  }
  std::string who;
  std::vector<std::function<void()>> hooks;
  {
    // The watchdog may fire while a Scope holds nothing; never block on the lock for long.
    std::unique_lock<std::mutex> g(st().mu, std::try_to_lock);
    who = st().who;
    if (g.owns_lock())
      for (auto& [id, h] : st().hooks) hooks.push_back(h);
  }
  std::fprintf(stderr, "ssdtrain: %s: %s; aborting the job\n", who.c_str(), why.c_str());
  std::fflush(stderr);
  for (auto& h : hooks) h();
  // MPI_Abort needs the launcher; when the network to it is gone it may never return. Exit
  // anyway a few seconds later: the other ranks' watchdogs end them the same way.
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(5));
    _exit(1);
  }).detach();
  int inited = 0;
  MPI_Initialized(&inited);
  if (inited) MPI_Abort(MPI_COMM_WORLD, 1);
  _exit(1);
}

}  // namespace ssd::watchdog
