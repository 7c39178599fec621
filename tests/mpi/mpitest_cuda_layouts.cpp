// The parallel layouts on the CUDA backend (run by ctest under mpirun -np 4; skips without a
// GPU). NCCL refuses several ranks on one GPU, so the ranks share it over the MPI communicator
// (parallel.comm=mpi, staged through host memory): this checks the CUDA kernels at the shapes a
// layout gives them (SSD segments that start from a handed-on or scanned state and return its
// gradient, the conv halo's row copies) against the one-process CPU reference, at the bf16
// tolerance of the GPU-vs-CPU model test. Tensor parallelism runs the kernels on a rank's heads, with the
// vocabulary-parallel LM head and (ngroups 1) the gated norm spanning ranks.
#include <gtest/gtest.h>

#include <numeric>

#include "config/config.h"
#include "data/data.h"
#include "dist/grid.h"
#include "model/mamba2.h"
#include "layout_step.h"
#include "mpi_main.h"
#include "testutil.h"
#include "train/grad_sync.h"
#include "train/trainer.h"

using namespace ssd;

namespace {

// Sizes the CUDA SSD kernels support (headdim 32, d_state 64, chunk 64), two groups; sequences
// of 256 tokens: 2 segments of 2 chunks, or 4 of one.
const char* kModel =
    "model: {d_model: 64, n_layer: 2, d_state: 64, headdim: 32, ngroups: 2, chunk_size: 64, "
    "vocab_size: 300}\n"
    "train: {seq_len: 256, micro_batch: 2, global_batch: 4}\n"
    "data: {kind: mqar, mqar_num_pairs: 8, mqar_key_vocab: 64, mqar_value_vocab: 64}\n"
    "parallel: {comm: mpi, bucket_mb: 0.1}\n";

using Grads = LayoutGrads;

Grads step(const std::vector<std::string>& sets, MPI_Comm comm, bool gpu) {
  Config cfg = parse_config(kModel, sets, "mpitest");
  auto be = gpu ? make_cuda_backend(0) : make_cpu_backend(DType::F32);
  return layout_step(cfg, comm, *be, 7, 0);
}

}  // namespace

TEST(CudaLayouts, ShardedShapesMatchTheCpuReference) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU here (or built without CUDA)";
  const int r = process_info().rank;
  // model: keys that change the model (its own CPU reference); sets: the layout.
  struct Case { int n; std::vector<std::string> sets; std::vector<std::string> model; };
  const std::vector<std::string> g1 = {"model.ngroups=1"};
  // context parallelism with each SSD state combine (the all-gather's cheap passes, segment
  // decay and scans on the GPU); the other layouts take the default combine
  const std::string ring = "parallel.cp_combine=ring", allgather = "parallel.cp_combine=allgather";
  for (const Case& k : {Case{1, {}, {}}, Case{2, {}, {}}, Case{2, {"parallel.cp=2", ring}, {}},
                        Case{4, {"parallel.cp=4", ring}, {}},
                        Case{2, {"parallel.cp=2", allgather}, {}},
                        Case{4, {"parallel.cp=4", allgather}, {}},
                        Case{4, {"parallel.cp=2", "parallel.zero=1"}, {}},
                        // tensor parallelism: 2 of the 4 heads per rank, one B/C group each,
                        // or (ngroups 1) the group shared, its norm spanning the ranks
                        Case{2, {"parallel.tp=2"}, {}}, Case{4, {"parallel.tp=4"}, {}},
                        Case{4, {"parallel.tp=2", "parallel.cp=2"}, {}},
                        Case{2, {"parallel.tp=2"}, g1}, Case{4, {"parallel.tp=4"}, g1},
                        Case{4, {"parallel.tp=2", "parallel.sequence_parallel=true"}, g1},
                        Case{4, {"parallel.tp=4", "parallel.sequence_parallel=true"}, {}}}) {
    const Grads ref = step(k.model, MPI_COMM_SELF, false);
    MPI_Comm c;
    MPI_Comm_split(MPI_COMM_WORLD, r / k.n, r, &c);
    std::vector<std::string> sets = k.sets;
    sets.insert(sets.end(), k.model.begin(), k.model.end());
    Grads got = step(sets, c, true);
    std::string what = "np=" + std::to_string(k.n);
    for (const auto& s : sets) what += " " + s;
    EXPECT_NEAR(got.loss, ref.loss, 1e-2 * ref.loss) << what;
    const auto table = param_table(parse_config(kModel, k.model, "t").model);
    double worst = 0;
    for (size_t i = 0; i < ref.g.size(); ++i) {
      const double e = ssdtest::rel_err(got.g[i], ref.g[i]);
      worst = std::max(worst, e);
      EXPECT_LT(e, 5e-2) << what << ": " << table[i].name;
    }
    if (r == 0) std::printf("%s: loss %.6f vs CPU %.6f, worst relative gradient error %.3e\n",
                            what.c_str(), got.loss, ref.loss, worst);
    MPI_Comm_free(&c);
  }
}
