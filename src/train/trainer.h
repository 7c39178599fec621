// The training loop: data -> model forward/backward -> gradient reduction -> clip -> AdamW,
// with logging, evaluation, checkpoints, resume, and clean stops on signals.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <mpi.h>

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
  std::vector<double> losses;  // every step's training loss, in this invocation
};

// Picks the backend for train.device. auto: CUDA when a GPU is present and its kernels support
// the model's sizes (else the CPU, with a notice); cuda: CUDA or a clear error.
std::unique_ptr<Backend> make_backend_for(const Config& cfg, int local_rank);

// Runs training as configured over the processes of `base` (the whole job by default; tests
// run several layouts side by side on sub-communicators). Throws ssd::Error for user-facing
// failures.
TrainResult train(const Config& cfg, MPI_Comm base = MPI_COMM_WORLD);

class Mamba2LM;
class GradSync;
class ProcessGrid;
class DataSource;
struct Layout;
struct StepResult {
  double loss = 0, accuracy = 0;  // over every scored token of the global batch
};
// One optimizer step's gradients: this rank's samples of the step at `position`, forward and
// backward over its micro-batches, reduced over the data-parallel group (the optimizer not yet
// run). `stats` is a model stats tensor used as scratch. reset_at_eos: no state crosses the
// data's document starts (data.reset_at_eos).
StepResult compute_gradients(Mamba2LM& model, GradSync& sync, ProcessGrid& grid, DataSource& data,
                             const Layout& layout, int64_t position, int64_t seqlen, Tensor& stats,
                             bool reset_at_eos = false);

// The AdamW settings of optimizer step `step` (1-based; `skipped` steps before it were skipped
// for a non-finite loss, so AdamW's own count is step - skipped): train.lr's schedule, the betas
// and eps, and gradient clipping at train.grad_clip given the step's gradient norm.
AdamWHyper adamw_hyper(const TrainConfig& tc, int64_t step, int64_t skipped, double grad_norm);

// Context parallelism: rank r's segment (tokens [r*L/cp, (r+1)*L/cp)) of each of n sequences of
// length L, into stok/stgt.
void take_segment(const std::vector<int32_t>& tok, const std::vector<int32_t>& tgt, int64_t n,
                  int64_t L, int64_t cp, int64_t r, std::vector<int32_t>& stok,
                  std::vector<int32_t>& stgt);
// The same for one array (the reset flags), returned.
std::vector<int32_t> take_segment(const std::vector<int32_t>& v, int64_t n, int64_t L,
                                  int64_t cp, int64_t r);

// Installs SIGTERM/SIGINT/SIGUSR1 handlers that ask the loop to stop after the current step.
void install_stop_handlers();
// True once a stop signal arrived (and which one, for the message).
bool stop_requested(int* signal_number = nullptr);

}  // namespace ssd
