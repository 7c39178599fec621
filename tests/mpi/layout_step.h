// A config's layout over the ranks of a communicator, for the layout tests: one optimizer
// step's loss and reduced gradients (what they compare with the one-process run, MPI_COMM_SELF),
// or whole training steps with the model and its gradient reduction at hand.
#pragma once
#include <mpi.h>

#include <memory>
#include <numeric>
#include <vector>

#include "config/config.h"
#include "data/data.h"
#include "dist/grid.h"
#include "model/mamba2.h"
#include "train/grad_sync.h"
#include "train/trainer.h"

struct LayoutGrads {
  double loss = 0;
  std::vector<std::vector<float>> g;  // full tensors, table order
};

// The model, grid and GradSync of `cfg`'s layout over `comm`, set up as the trainer does
// (ZeRO-1's master in shards with parallel.zero=1), initialised from init_seed.
struct LayoutRun {
  ssd::Config cfg;
  ssd::Layout layout;
  std::unique_ptr<ssd::ProcessGrid> grid;
  std::unique_ptr<ssd::DataSource> data;
  std::unique_ptr<ssd::Mamba2LM> model;
  std::unique_ptr<ssd::GradSync> sync;
  ssd::Tensor stats;

  LayoutRun(const ssd::Config& c, MPI_Comm comm, ssd::Backend& be, uint64_t init_seed)
      : cfg(c) {
    using namespace ssd;
    int n = 1;
    MPI_Comm_size(comm, &n);
    layout = resolve_layout(cfg, n, be.device() == Device::CUDA);
    grid = std::make_unique<ProcessGrid>(layout, comm);
    grid->attach(be);
    data = make_data_source(cfg);
    model = std::make_unique<Mamba2LM>(cfg.model, be, layout.micro_batch,
                                       cfg.train.seq_len / layout.cp,
                                       cfg.train.recompute == "layers",
                                       std::lcm<int64_t>(64, layout.dp * layout.cp), layout.tp,
                                       grid->tp_rank(), cfg.parallel.sequence_parallel,
                                       cfg.parallel.zero == 1);
    model->set_context_parallel(&grid->dev(Group::Cp), cp_combine_of(cfg.parallel));
    model->set_tensor_parallel(&grid->dev(Group::Tp), &grid->dev(Group::TpSpan));
    sync = std::make_unique<GradSync>(*model, be, *grid, cfg.parallel, cfg.train.weight_decay);
    model->init(init_seed);
    stats = model->new_stats();
  }

  // One step's loss and reduced gradients at `position` (the optimizer not run).
  double gradients(int64_t position) {
    return ssd::compute_gradients(*model, *sync, *grid, *data, layout, position,
                                  cfg.train.seq_len, stats, cfg.data.reset_at_eos)
        .loss;
  }
  // Optimizer step `step` (1-based) as training takes it: its batch, the gradients, AdamW.
  double train_step(int64_t step) {
    const double loss = gradients((step - 1) * layout.global_batch);
    sync->step(ssd::adamw_hyper(cfg.train, step, 0, sync->grad_norm()));
    return loss;
  }
  // The reduced gradients as full tensors (tensor-parallel parts gathered), on every rank.
  std::vector<std::vector<float>> full_grads() {
    using namespace ssd;
    auto g = sync->gathered_grads();
    if (layout.tp == 1) return g;
    Communicator& tp = grid->host(Group::Tp);
    auto full = gather_full(tp, model->table(), cfg.model, g);
    full.resize(model->table().size());
    for (size_t i = 0; i < full.size(); ++i) {
      full[i].resize(shape_numel(model->table()[i].shape));
      tp.broadcast(full[i].data(), static_cast<int64_t>(full[i].size()), DType::F32, 0);
    }
    return full;
  }
};

inline LayoutGrads layout_step(const ssd::Config& cfg, MPI_Comm comm, ssd::Backend& be,
                               uint64_t init_seed, int64_t position) {
  LayoutRun run(cfg, comm, be, init_seed);
  LayoutGrads out;
  out.loss = run.gradients(position);
  out.g = run.full_grads();
  return out;
}
