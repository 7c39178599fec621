// One optimizer step's loss and reduced gradients under a config's layout over the ranks of a
// communicator: what the layout tests compare with the one-process run (MPI_COMM_SELF).
#pragma once
#include <mpi.h>

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

inline LayoutGrads layout_step(const ssd::Config& cfg, MPI_Comm comm, ssd::Backend& be,
                               uint64_t init_seed, int64_t position) {
  using namespace ssd;
  int n = 1;
  MPI_Comm_size(comm, &n);
  Layout l = resolve_layout(cfg, n, be.device() == Device::CUDA);
  ProcessGrid grid(l, comm);
  grid.attach(be);
  auto data = make_data_source(cfg);
  Mamba2LM model(cfg.model, be, l.micro_batch, cfg.train.seq_len / l.cp,
                 cfg.train.recompute == "layers",
                 std::lcm<int64_t>(64, l.dp * l.cp), l.tp, grid.tp_rank(),
                 cfg.parallel.sequence_parallel);
  model.init(init_seed);
  model.set_context_parallel(&grid.dev(Group::Cp), cp_combine_of(cfg.parallel));
  model.set_tensor_parallel(&grid.dev(Group::Tp), &grid.dev(Group::TpSpan));
  GradSync sync(model, be, grid, cfg.parallel, cfg.train.weight_decay);
  Tensor stats = model.new_stats();
  LayoutGrads out;
  out.loss = compute_gradients(model, sync, grid, *data, l, position, cfg.train.seq_len, stats,
                               cfg.data.reset_at_eos).loss;
  out.g = sync.gathered_grads();
  if (l.tp > 1) {  // the tensor-parallel parts as full tensors, on every rank of the group
    Communicator& tp = grid.host(Group::Tp);
    auto full = gather_full(tp, model.table(), cfg.model, out.g);
    full.resize(model.table().size());
    for (size_t i = 0; i < full.size(); ++i) {
      full[i].resize(shape_numel(model.table()[i].shape));
      tp.broadcast(full[i].data(), static_cast<int64_t>(full[i].size()), DType::F32, 0);
    }
    out.g = std::move(full);
  }
  return out;
}
