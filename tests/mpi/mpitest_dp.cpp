// Data parallelism over MPI (run by ctest under `mpirun -np 2`): the gradient all-reduce equals
// the gradients of the combined batch computed in one process, and a data-parallel training run
// keeps every rank's parameters identical.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <filesystem>

#include "backend/backend.h"
#include "config/config.h"
#include "data/data.h"
#include "dist/comm.h"
#include "model/mamba2.h"
#include "train/trainer.h"

using namespace ssd;

namespace {

const char* kSmall =
    "model: {d_model: 16, n_layer: 2, d_state: 8, headdim: 8, chunk_size: 8, vocab_size: 48}\n"
    "train: {device: cpu, seq_len: 24, micro_batch: 2, lr: 0.01, min_lr: 0.001, warmup_steps: 2}\n"
    "data: {kind: mqar, mqar_num_pairs: 2, mqar_key_vocab: 16, mqar_value_vocab: 16}\n"
    "run: {log_every: 5, eval_batches: 1}\n";

}  // namespace

TEST(DataParallel, AllreduceSums) {
  auto& g = ProcessGrid::world();
  ASSERT_EQ(g.size(), 2) << "run under mpirun -np 2";
  std::vector<double> v = {1.0 + g.rank(), 10.0 * g.rank()};
  g.allreduce_sum(v.data(), 2);
  EXPECT_EQ(v[0], 3.0);
  EXPECT_EQ(v[1], 10.0);
  EXPECT_TRUE(g.any(g.rank() == 1));
  EXPECT_FALSE(g.any(false));
}

TEST(DataParallel, ReducedGradientsEqualTheCombinedBatch) {
  auto& g = ProcessGrid::world();
  Config c = parse_config(kSmall, {}, "mpitest");
  auto be = make_cpu_backend(DType::F64);
  const int64_t B = c.train.micro_batch, L = c.train.seq_len;
  auto data = make_data_source(c);
  std::vector<std::vector<int32_t>> tok(2, std::vector<int32_t>(B * L)), tgt = tok;
  for (int r = 0; r < 2; ++r) data->eval_batch(r, tok[r].data(), tgt[r].data(), B, L);

  // Each rank: its own batch, then the all-reduce.
  Mamba2LM m(c.model, *be, B, L);
  m.init(5);
  m.zero_grads();
  Tensor s = m.new_stats();
  m.forward_backward(tok[g.rank()].data(), tgt[g.rank()].data(), 1.0, s);
  for (auto& gr : m.grads()) g.allreduce_sum(*be, gr);

  // Reference: both batches in one process.
  Mamba2LM ref(c.model, *be, B, L);
  ref.init(5);
  ref.zero_grads();
  Tensor s2 = ref.new_stats();
  for (int r = 0; r < 2; ++r) ref.forward_backward(tok[r].data(), tgt[r].data(), 1.0, s2);
  for (size_t i = 0; i < m.grads().size(); ++i) {
    const double* a = m.grads()[i].ptr<double>();
    const double* b = ref.grads()[i].ptr<double>();
    for (int64_t j = 0; j < m.grads()[i].numel(); ++j)
      ASSERT_NEAR(a[j], b[j], 1e-12 + 1e-10 * std::fabs(b[j])) << m.table()[i].name;
  }
}

TEST(DataParallel, TrainingKeepsRanksInStep) {
  auto& g = ProcessGrid::world();
  std::string dir = "/tmp/ssdtrain_mpitest_dp";
  if (g.is_root()) std::filesystem::remove_all(dir);
  g.barrier();
  Config c = parse_config(kSmall, {"train.max_steps=12", "run.dir=" + dir}, "mpitest");
  TrainResult r = train(c);
  EXPECT_EQ(r.steps_done, 12);
  EXPECT_LT(r.last_loss, r.first_loss);
  // Every rank ends with bitwise the same parameters.
  double lo = r.param_sumsq, hi = r.param_sumsq;
  MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  EXPECT_EQ(lo, hi);
  EXPECT_GT(lo, 0);
  // The checkpoint rank 0 wrote resumes on both ranks; with no steps left both stop at 12.
  Config c2 = parse_config(kSmall, {"train.max_steps=12", "run.dir=" + dir}, "mpitest");
  TrainResult r2 = train(c2);
  EXPECT_EQ(r2.steps_done, 12);
  g.barrier();
  if (g.is_root()) std::filesystem::remove_all(dir);
}

TEST(DataParallel, ResumeContinuesEveryRanksDataStream) {
  auto& g = ProcessGrid::world();
  const std::string a = "/tmp/ssdtrain_mpitest_resume_a", b = "/tmp/ssdtrain_mpitest_resume_b";
  if (g.is_root()) std::filesystem::remove_all(a), std::filesystem::remove_all(b);
  g.barrier();
  TrainResult ra = train(parse_config(kSmall, {"train.max_steps=10", "run.dir=" + a}, "m"));
  // The same run in two invocations: 4 steps, then the rest after a resume.
  TrainResult rb1 = train(parse_config(
      kSmall, {"train.max_steps=10", "run.dir=" + b, "train.stop_after=4"}, "m"));
  EXPECT_TRUE(rb1.stopped_early);
  EXPECT_EQ(rb1.steps_done, 4);
  TrainResult rb2 = train(parse_config(kSmall, {"train.max_steps=10", "run.dir=" + b}, "m"));
  EXPECT_EQ(rb2.steps_done, 10);
  EXPECT_EQ(rb2.last_loss, ra.last_loss);
  EXPECT_EQ(rb2.param_sumsq, ra.param_sumsq);
  g.barrier();
  if (g.is_root()) std::filesystem::remove_all(a), std::filesystem::remove_all(b);
}

int main(int argc, char** argv) {
  ProcessGrid::world();  // MPI_Init
  ::testing::InitGoogleTest(&argc, argv);
  if (ProcessGrid::world().rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int rc = RUN_ALL_TESTS();
  int any = rc;
  MPI_Allreduce(&rc, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any;
}
