// The training loop: data -> model forward/backward -> gradient reduction -> clip -> AdamW,
// with logging, evaluation, checkpoints, resume, and clean stops on signals.
#pragma once
#include <memory>
#include <string>

#include "backend/backend.h"
#include "config/config.h"

namespace ssd {

struct TrainResult {
  int64_t steps_done = 0;
  double last_loss = 0;
  double first_loss = 0;
  double last_eval_loss = -1;
  double last_eval_acc = -1;
  bool stopped_by_signal = false;
  bool stopped_early = false;  // by a signal or by train.stop_after
  double param_sumsq = 0;  // sum of squared parameters at the end (a cheap fingerprint)
};

// Picks the backend for train.device. auto: CUDA when a GPU is present and its kernels support
// the model's sizes (else the CPU, with a notice); cuda: CUDA or a clear error.
std::unique_ptr<Backend> make_backend_for(const Config& cfg, int local_rank);

// Runs training as configured. Throws ssd::Error for user-facing failures.
TrainResult train(const Config& cfg);

// Installs SIGTERM/SIGINT/SIGUSR1 handlers that ask the loop to stop after the current step.
void install_stop_handlers();
// True once a stop signal arrived (and which one, for the message).
bool stop_requested(int* signal_number = nullptr);

}  // namespace ssd
