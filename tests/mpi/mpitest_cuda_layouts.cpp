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
#include "dist/counting_comm.h"
#include "dist/grid.h"
#include "dist/mpi_comm.h"
#include "io/export.h"
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

// ZeRO-1 on the GPU, two ranks sharing it over MPI. No rank holds an fp32 master of the GEMM
// weights beyond its shard (each element on one rank, about half per rank); the bf16 weights the
// GEMMs read are the shards converted and gathered, the same on both ranks, and the non-GEMM
// fp32 weights the kernels read are the master values, the same on both; three training steps
// track the one-process CPU run at the bf16 tolerance of the layout test above.
TEST(CudaLayouts, ZeroShardsTheMasterWeights) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU here (or built without CUDA)";
  const int r = process_info().rank;
  MPI_Comm pair;
  MPI_Comm_split(MPI_COMM_WORLD, r / 2, r, &pair);
  int pr = 0;
  MPI_Comm_rank(pair, &pr);
  auto gpu = make_cuda_backend(0);
  auto cpu = make_cpu_backend(DType::F32);
  LayoutRun two(parse_config(kModel, {"parallel.zero=1"}, "mpitest"), pair, *gpu, 7);
  LayoutRun ref(parse_config(kModel, {}, "mpitest"), MPI_COMM_SELF, *cpu, 7);
  ASSERT_EQ(two.layout.dp, 2);
  Mamba2LM& m = *two.model;
  GradSync& s = *two.sync;
  const auto& table = m.table();
  const int64_t total = m.grad_buffer().numel();
  EXPECT_FALSE(m.param_buffer().defined()) << "no full fp32 master in the model";
  EXPECT_EQ(m.compute_buffer().dtype, DType::BF16);
  EXPECT_EQ(m.compute_buffer().numel(), total);
  EXPECT_EQ(s.master_bytes(), total / 2 * 4);
  EXPECT_EQ(s.unsharded_master_bytes(), total * 4);

  // fp32 master bytes of the GEMM weights on this rank: its shard's pieces of them, nothing else.
  int64_t gemm_total = 0, gemm_mine = 0, small_total = 0;
  for (size_t i = 0; i < table.size(); ++i) {
    const int64_t off = m.flat_offset(int(i)), n = shape_numel(m.shard(int(i)).local_shape);
    if (!table[i].gemm_weight) {
      small_total += n;
      EXPECT_EQ(m.params()[i].dtype, DType::F32) << table[i].name;
      continue;
    }
    gemm_total += n;
    EXPECT_FALSE(m.params()[i].defined()) << table[i].name << ": no fp32 copy in the model";
    for (const auto& p : s.parts(pr))
      gemm_mine += std::max<int64_t>(0, std::min(off + n, p.lo + p.len) - std::max(off, p.lo));
  }
  int64_t gemm_sum = gemm_mine;
  MPI_Allreduce(MPI_IN_PLACE, &gemm_sum, 1, MPI_INT64_T, MPI_SUM, pair);
  EXPECT_EQ(gemm_sum, gemm_total) << "each GEMM weight element's master on one rank";
  EXPECT_NEAR(double(gemm_mine), gemm_total / 2.0, double(small_total + 64 * table.size()));
  EXPECT_GE(m.accum_weights_buffer().nbytes(), size_t(small_total * 4));
  if (r == 0)
    std::printf("ZeRO-1 dp=2 on the GPU: fp32 master of the GEMM weights %.3f MiB on this rank of "
                "%.3f MiB (%.4f); fp32 non-GEMM weights %.3f MiB full; bf16 compute %.3f MiB\n",
                gemm_mine * 4 / 1048576.0, gemm_total * 4 / 1048576.0,
                double(gemm_mine) / gemm_total, m.accum_weights_buffer().nbytes() / 1048576.0,
                m.compute_buffer().nbytes() / 1048576.0);

  std::vector<double> lg, lc;
  for (int64_t step = 1; step <= 3; ++step)
    lg.push_back(two.train_step(step)), lc.push_back(ref.train_step(step));
  for (size_t k = 0; k < lg.size(); ++k) {
    EXPECT_NEAR(lg[k], lc[k], 1e-2 * lc[k]) << "step " << k + 1;
    if (r == 0) std::printf("step %zu: loss %.6f vs CPU %.6f\n", k + 1, lg[k], lc[k]);
  }

  std::vector<float> sh(s.master_shard().numel());
  gpu->download(sh.data(), s.master_shard());
  std::vector<uint16_t> comp(total), comp0;
  gpu->download(comp.data(), m.compute_buffer());
  const Tensor& small = m.accum_weights_buffer();
  std::vector<float> acc(small.numel()), acc0;
  gpu->download(acc.data(), small);
  for (const auto& p : s.parts(pr))
    for (int64_t k = 0; k < p.len; ++k)
      ASSERT_EQ(comp[p.lo + k], fp32_to_bf16(sh[p.at + k])) << "flat element " << p.lo + k;
  for (size_t i = 0; i < table.size(); ++i) {
    if (table[i].gemm_weight) continue;
    const Tensor& w = m.params()[i];
    std::vector<float> host(w.numel());
    gpu->download(host.data(), w);
    const int64_t off = m.flat_offset(int(i)), n = w.numel();
    for (const auto& p : s.parts(pr))
      for (int64_t e = std::max(off, p.lo); e < std::min(off + n, p.lo + p.len); ++e)
        ASSERT_EQ(host[e - off], sh[p.at + (e - p.lo)]) << table[i].name << "[" << e - off << "]";
  }
  comp0 = comp, acc0 = acc;
  MPI_Bcast(comp0.data(), int(total), MPI_UINT16_T, 0, pair);
  MPI_Bcast(acc0.data(), int(acc0.size()), MPI_FLOAT, 0, pair);
  EXPECT_TRUE(comp0 == comp) << "the bf16 compute weights differ between the ranks";
  EXPECT_TRUE(acc0 == acc) << "the fp32 non-GEMM weights differ between the ranks";
  MPI_Comm_free(&pair);
}

TEST(CudaLayouts, NcclOperationsAreTimedOnTheirStream) {
  // The collective timing `bench train` prints, on the NCCL path: each rank makes an NCCL
  // communicator of its own (a world of one; NCCL refuses two ranks of one communicator on one
  // GPU), and the counting wrapper must get one device time per operation, by kind.
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU here (or built without CUDA)";
  auto gpu = make_cuda_backend(0);
  MpiComm self(MPI_COMM_SELF, "self");
  CountingComm c(make_nccl_comm(self, *gpu));
  ASSERT_TRUE(c.device_timed());
  Tensor buf = gpu->alloc({1 << 20}, DType::F32), out = gpu->alloc({1 << 20}, DType::F32);
  gpu->zero(buf);
  c.all_reduce(buf.data, buf.numel(), buf.dtype, ReduceOp::Sum);  // before timing: not timed
  c.start_timing();
  for (int i = 0; i < 3; ++i) c.all_reduce(buf.data, buf.numel(), buf.dtype, ReduceOp::Sum);
  c.all_gather(buf.data, out.data, 1 << 20, DType::F32);
  c.join();
  const CommTimes t = c.take_times();
  EXPECT_EQ(t.calls[static_cast<int>(CommOp::AllReduce)], 3);
  EXPECT_EQ(t.calls[static_cast<int>(CommOp::AllGather)], 1);
  EXPECT_EQ(t.calls[static_cast<int>(CommOp::ReduceScatter)], 0);
  EXPECT_GT(t.seconds[static_cast<int>(CommOp::AllReduce)], 0);
  EXPECT_GT(t.seconds[static_cast<int>(CommOp::AllGather)], 0);
  // 4 MiB over a world of one takes far less than a second.
  EXPECT_LT(t.seconds[static_cast<int>(CommOp::AllReduce)], 1.0);
  c.all_reduce(buf.data, buf.numel(), buf.dtype, ReduceOp::Sum);  // after the take: not timed
  EXPECT_EQ(c.take_times().calls[static_cast<int>(CommOp::AllReduce)], 0);
  gpu->synchronize();
}
