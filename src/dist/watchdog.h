// The job never hangs: a background thread ends every rank when a collective has not finished
// within parallel.timeout_s (a peer that died, stopped or went off the network), or when a device
// communicator reports an asynchronous error. It prints which rank, group and operation, runs the
// abort hooks (ncclCommAbort), then MPI_Abort ends the whole job; mpirun kills the other ranks.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace ssd::watchdog {

// Starts the thread (once) or changes the timeout; `who` names this process in messages
// ("rank 3 (host n2)").
void configure(double timeout_s, const std::string& who);
double timeout_s();

// A blocking host-side operation in progress on the calling thread, for as long as it lives.
class Scope {
 public:
  Scope(const std::string& group, const char* op, int64_t count);
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
};

// Called every tick; returns "" while all is well, else what went wrong (the job then ends).
// Device communicators register one to check their in-flight operations and async errors.
int add_poller(std::function<std::string()> poll);
void remove_poller(int id);
// Run before MPI_Abort, in registration order (never throw).
int add_abort_hook(std::function<void()> hook);
void remove_abort_hook(int id);

// Ends the job now from any thread: message on stderr, abort hooks, MPI_Abort.
[[noreturn]] void abort_job(const std::string& why);

}  // namespace ssd::watchdog
