// Data parallelism against one process (run by ctest under mpirun -np 4, CPU backend, fp32):
// at the same train.global_batch, dp=2 and dp=4 with zero 0 and 1 give the one-process loss and
// gradients; 20 training steps give its losses; a run resumed on another number of ranks
// continues the uninterrupted one-process run. Layouts run side by side on sub-communicators of
// the job; the one-process references run on MPI_COMM_SELF.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iterator>
#include <random>
#include <numeric>

#include "config/config.h"
#include "data/data.h"
#include "data/indexed_file.h"
#include "dist/grid.h"
#include "io/export.h"
#include "model/mamba2.h"
#include "layout_checks.h"
#include "layout_step.h"
#include "mpi_main.h"
#include "testutil.h"
#include "train/grad_sync.h"
#include "train/trainer.h"

using namespace ssd;
namespace fs = std::filesystem;

namespace {

const char* kSmall =
    "model: {d_model: 16, n_layer: 2, d_state: 8, headdim: 8, chunk_size: 8, vocab_size: 48}\n"
    "train: {device: cpu, seq_len: 24, micro_batch: 2, global_batch: 8, lr: 0.01, min_lr: 0.001,\n"
    "        warmup_steps: 2}\n"
    "data: {kind: mqar, mqar_num_pairs: 2, mqar_key_vocab: 16, mqar_value_vocab: 16}\n"
    "run: {log_every: 5, eval_batches: 4}\n"
    "parallel: {bucket_mb: 0.004}\n";  // about 1000 gradients a bucket: several buckets

std::string tmpdir(const std::string& name) {
  return "/tmp/ssdtrain_mpitest_layouts/" + name;
}

Config config(const std::vector<std::string>& sets) { return parse_config(kSmall, sets, "mpitest"); }

using Grads = LayoutGrads;

// One step's loss and reduced gradients at `position` under `cfg` over the ranks of `comm`.
Grads step_gradients(const Config& cfg, MPI_Comm comm, int64_t position) {
  auto be = make_cpu_backend(DType::F32);
  return layout_step(cfg, comm, *be, cfg.train.seed, position);
}

// |a - b| <= 1e-5 * max|b| over each tensor.
void expect_close(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b,
                  const std::string& what) {
  ASSERT_EQ(a.size(), b.size());
  double worst = 0;  // largest |a - b| / max|b| of any tensor, reported for the record
  struct Report {
    const std::string& what;
    double& worst;
    ~Report() {
      if (world_rank() == 0) std::printf("%s: largest gradient difference %.2e of max|g|\n", what.c_str(), worst);
    }
  } report{what, worst};
  auto table = param_table(config({}).model);
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].size(), b[i].size());
    double mx = 0, diff = 0;
    for (float x : b[i]) mx = std::max(mx, std::fabs(double(x)));
    ASSERT_GT(mx, 0) << table[i].name << " has no gradient";
    for (size_t j = 0; j < a[i].size(); ++j) diff = std::max(diff, std::fabs(double(a[i][j]) - b[i][j]));
    worst = std::max(worst, diff / mx);
    for (size_t j = 0; j < a[i].size(); ++j)
      ASSERT_LE(std::fabs(double(a[i][j]) - b[i][j]), 1e-5 * mx)
          << what << ": " << table[i].name << "[" << j << "] " << a[i][j] << " vs " << b[i][j];
  }
}

void clean() {
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) fs::remove_all("/tmp/ssdtrain_mpitest_layouts");
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace

TEST(Layouts, LossAndGradientsEqualOneProcess) {
  ASSERT_EQ(process_info().size, 4) << "run under mpirun -np 4";
  for (int64_t position : {0, 40}) {
    const Grads ref = step_gradients(config({}), MPI_COMM_SELF, position);
    for (int dp : {2, 4})
      for (int zero : {0, 1}) {
        MPI_Comm c = groups_of(dp);
        Grads got = step_gradients(config({"parallel.zero=" + std::to_string(zero)}), c, position);
        const std::string what = "dp=" + std::to_string(dp) + " zero=" + std::to_string(zero);
        EXPECT_NEAR(got.loss, ref.loss, 1e-5 * ref.loss) << what;
        expect_close(got.g, ref.g, what);
        MPI_Comm_free(&c);
      }
  }
}

// The SSD state combines of context parallelism (parallel.cp_combine): every context-parallel
// check runs with each.
const char* const kCombines[] = {"ring", "allgather"};
std::string combine_key(const char* combine) { return std::string("parallel.cp_combine=") + combine; }

// Context-parallel layouts: how many ranks, and the keys that make the layout.
struct CpCase {
  int n;
  std::vector<std::string> sets;
};

// One step of each case under each combine at positions 0 and 40 equals the one-process step
// under `base` (the keys every run shares).
void expect_cp_cases_equal_one_process(const std::vector<std::string>& base,
                                       const std::vector<CpCase>& cases, const std::string& label) {
  for (int64_t position : {0, 40}) {
    const Grads ref = step_gradients(config(base), MPI_COMM_SELF, position);
    for (const char* combine : kCombines)
      for (const CpCase& k : cases) {
        std::vector<std::string> sets = base;
        sets.insert(sets.end(), k.sets.begin(), k.sets.end());
        sets.push_back(combine_key(combine));
        MPI_Comm c = groups_of(k.n);
        Grads got = step_gradients(config(sets), c, position);
        std::string what = label + "np=" + std::to_string(k.n) + " " + combine_key(combine);
        for (const auto& x : k.sets) what += " " + x;
        EXPECT_NEAR(got.loss, ref.loss, 1e-5 * ref.loss) << what;
        expect_close(got.g, ref.g, what);
        MPI_Comm_free(&c);
      }
  }
}

// Context parallelism: sequences of 32 tokens in segments of 16 (cp=2) or 8 (cp=4, one chunk
// each), the SSD state passed from segment to segment (ring) or combined from every earlier
// segment's summary (all-gather), the conv halo handed on; with data and tensor parallelism,
// ZeRO-1 and recomputation.
TEST(Layouts, ContextParallelLossAndGradientsEqualOneProcess) {
  expect_cp_cases_equal_one_process(
      {"train.seq_len=32"},
      {CpCase{2, {"parallel.cp=2"}}, CpCase{4, {"parallel.cp=4"}},
       CpCase{4, {"parallel.cp=2", "parallel.zero=1"}},
       CpCase{4, {"parallel.cp=2", "parallel.tp=2"}},
       CpCase{4, {"parallel.cp=2", "train.recompute=layers"}}},
      "");
}

// Packed documents under context parallelism: an indexed dataset whose documents begin at
// fixed offsets of a 96-token pattern (three 32-token samples), among them exactly on the
// segment boundaries of cp=2 (16) and cp=4 (8, 16, 24), inside the conv halo just before them
// (15, 22, 23, 14), inside chunks, and on consecutive tokens. With data.reset_at_eos (the
// default for indexed data) no state crosses a document start, also from rank to rank: loss and
// gradients equal the one-process run's.
void write_packed_dataset(const std::string& prefix);

// Written by rank 0 for all (the sample order depends on the dataset's path).
std::string packed_dataset() {
  const std::string prefix = "/tmp/ssdtrain_mpitest_docs/docs";
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) write_packed_dataset(prefix);
  MPI_Barrier(MPI_COMM_WORLD);
  return prefix;
}

void write_packed_dataset(const std::string& prefix) {
  fs::create_directories(fs::path(prefix).parent_path());
  const int64_t starts[] = {0, 5, 15, 16, 22, 24, 29, 33, 34, 40, 50, 55, 72, 78, 87, 96};
  IndexedWriter w(prefix, TokenDType::U16);
  std::mt19937 g(5);
  for (int rep = 0; rep < 24; ++rep)
    for (size_t k = 0; k + 1 < std::size(starts); ++k) {
      std::vector<int32_t> ids(starts[k + 1] - starts[k]);
      for (auto& id : ids) id = static_cast<int32_t>(g() % 48);
      w.add_document(ids.data(), static_cast<int64_t>(ids.size()));
    }
  w.finish();
}

TEST(Layouts, ContextParallelPackedDocumentsEqualOneProcess) {
  const std::string data = packed_dataset();
  const std::vector<std::string> base = {"train.seq_len=32", "data.kind=indexed",
                                         "data.path=" + data, "data.val_fraction=0"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), base.begin(), base.end());
    return config(extra);
  };
  ASSERT_TRUE(with({}).data.reset_at_eos) << "the default for indexed data";
  for (int64_t position : {0, 40}) {
    // The flags matter here: without them the one-process step is another one.
    const Grads ref = step_gradients(with({}), MPI_COMM_SELF, position);
    const Grads leaky = step_gradients(with({"data.reset_at_eos=false"}), MPI_COMM_SELF, position);
    double differ = 0;
    for (size_t i = 0; i < ref.g.size(); ++i) differ = std::max(differ, ssdtest::rel_err(leaky.g[i], ref.g[i]));
    EXPECT_GT(differ, 1e-3);
  }
  expect_cp_cases_equal_one_process(
      base,
      {CpCase{2, {"parallel.cp=2"}}, CpCase{4, {"parallel.cp=4"}},
       CpCase{4, {"parallel.cp=2", "train.recompute=layers"}}},
      "packed documents, ");
}

TEST(Layouts, ContextParallelTrainsOneProcessLossesAndResumesOnOne) {
  clean();
  const int r = world_rank();
  auto cfg = [&](const std::string& dir, std::vector<std::string> extra) {
    extra.push_back("train.seq_len=32");
    extra.push_back("train.max_steps=20");
    extra.push_back("run.dir=" + tmpdir(dir));
    return config(extra);
  };
  TrainResult one = train(cfg("cp_one_r" + std::to_string(r), {}), MPI_COMM_SELF);
  ASSERT_EQ(one.losses.size(), 20u);
  for (const char* combine : kCombines) {
    const std::string c = combine;
    TrainResult four = train(cfg("cp4_" + c, {"parallel.cp=4", combine_key(combine)}), MPI_COMM_WORLD);
    expect_losses_close(four.losses, one.losses, "cp=4, " + c + ", 20 steps");
    TrainResult mixed = train(cfg("cp2dp2_" + c, {"parallel.cp=2", combine_key(combine)}), MPI_COMM_WORLD);
    expect_losses_close(mixed.losses, one.losses, "cp=2 x dp=2, " + c + ", 20 steps");
  }
  // cp=2 for 10 steps, then one process resumes it.
  MPI_Comm pairs = groups_of(2);
  const std::string first = "cp2_g" + std::to_string(r / 2);
  TrainResult a = train(cfg(first, {"parallel.cp=2", "train.stop_after=10"}), pairs);
  EXPECT_EQ(a.steps_done, 10);
  MPI_Barrier(MPI_COMM_WORLD);
  fs::copy(tmpdir(first), tmpdir("cp_solo_r" + std::to_string(r)), fs::copy_options::recursive);
  TrainResult solo = train(cfg("cp_solo_r" + std::to_string(r), {}), MPI_COMM_SELF);
  expect_losses_close(solo.losses, std::vector<double>(one.losses.begin() + 10, one.losses.end()),
                      "cp=2 -> 1 process");
  MPI_Comm_free(&pairs);
  clean();
}

TEST(Layouts, TrainingGivesOneProcessLossesAndKeepsRanksInStep) {
  clean();
  const int r = world_rank();
  std::vector<std::string> base = {"train.max_steps=20"};
  auto with = [&](std::vector<std::string> extra, const std::string& dir) {
    extra.insert(extra.begin(), base.begin(), base.end());
    extra.push_back("run.dir=" + tmpdir(dir));
    return config(extra);
  };
  TrainResult one = train(with({}, "one_r" + std::to_string(r)), MPI_COMM_SELF);
  ASSERT_EQ(one.losses.size(), 20u);
  EXPECT_LT(one.last_loss, one.first_loss);
  for (int dp : {2, 4})
    for (int zero : {0, 1}) {
      MPI_Comm c = groups_of(dp);
      const std::string name = "dp" + std::to_string(dp) + "_z" + std::to_string(zero) + "_g" +
                               std::to_string(r / dp);
      TrainResult res = train(with({"parallel.zero=" + std::to_string(zero)}, name), c);
      expect_losses_close(res.losses, one.losses, name);
      // Every rank of the layout ends with bitwise the same parameters.
      double lo = res.param_sumsq, hi = res.param_sumsq;
      MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_DOUBLE, MPI_MIN, c);
      MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_DOUBLE, MPI_MAX, c);
      EXPECT_EQ(lo, hi) << name;
      EXPECT_NEAR(res.param_sumsq, one.param_sumsq, 1e-4 * one.param_sumsq) << name;
      MPI_Comm_free(&c);
    }
  clean();
}

TEST(Layouts, ResumeOnAnotherNumberOfRanksContinuesTheOneProcessRun) {
  clean();
  const int r = world_rank();
  auto cfg = [&](const std::string& dir, std::vector<std::string> extra) {
    extra.push_back("train.max_steps=16");
    extra.push_back("checkpoint.every=0");
    extra.push_back("run.dir=" + tmpdir(dir));
    return config(extra);
  };
  TrainResult one = train(cfg("one_r" + std::to_string(r), {}), MPI_COMM_SELF);
  ASSERT_EQ(one.losses.size(), 16u);
  const std::vector<double> tail(one.losses.begin() + 8, one.losses.end());

  // dp=2 with ZeRO-1 (moments sharded in memory, full in the file) for 8 steps.
  MPI_Comm pairs = groups_of(2);
  const std::string first = "dp2_g" + std::to_string(r / 2);
  TrainResult a = train(cfg(first, {"train.stop_after=8", "parallel.zero=1"}), pairs);
  EXPECT_TRUE(a.stopped_early);
  EXPECT_EQ(a.steps_done, 8);
  expect_losses_close(a.losses, std::vector<double>(one.losses.begin(), one.losses.begin() + 8),
                      "dp=2 first half");
  MPI_Barrier(MPI_COMM_WORLD);
  // Each rank copies its pair's run to resume it alone; rank 0 copies pair 0's for dp=4.
  fs::copy(tmpdir(first), tmpdir("solo_r" + std::to_string(r)), fs::copy_options::recursive);
  if (r == 0) fs::copy(tmpdir(first), tmpdir("dp4"), fs::copy_options::recursive);
  MPI_Barrier(MPI_COMM_WORLD);

  TrainResult solo = train(cfg("solo_r" + std::to_string(r), {}), MPI_COMM_SELF);
  EXPECT_EQ(solo.steps_done, 16);
  expect_losses_close(solo.losses, tail, "dp=2 -> 1 process");
  TrainResult four = train(cfg("dp4", {"parallel.zero=1"}), MPI_COMM_WORLD);
  EXPECT_EQ(four.steps_done, 16);
  expect_losses_close(four.losses, tail, "dp=2 -> dp=4 (zero=1)");
  EXPECT_NEAR(four.param_sumsq, one.param_sumsq, 1e-4 * one.param_sumsq);
  // Written once, by rank 0: one checkpoint of step 16 in the dp=4 run.
  if (r == 0) EXPECT_TRUE(fs::exists(tmpdir("dp4") + "/checkpoints/step_00000016.h5"));
  MPI_Comm_free(&pairs);
  clean();
}

// ZeRO-1 keeps the fp32 master weights as each rank's part of every bucket only. At dp=4 the
// shard is a quarter of the flat buffers, each element on exactly one rank, in a buffer of its
// own (the model holds no master: on the CPU only the fp32 weights it computes with); after
// training steps it holds the one-process run's parameters of its ranges, and the weights every
// rank computes with are the gathered shards, bitwise.
TEST(Layouts, ZeroShardsTheMasterWeights) {
  auto be = make_cpu_backend(DType::F32);
  const int r = world_rank();
  LayoutRun four(config({"parallel.zero=1"}), MPI_COMM_WORLD, *be, 11);
  LayoutRun one(config({}), MPI_COMM_SELF, *be, 11);
  ASSERT_EQ(four.layout.dp, 4);
  Mamba2LM& m = *four.model;
  GradSync& s = *four.sync;
  const int64_t total = m.grad_buffer().numel();
  ASSERT_EQ(total, one.model->grad_buffer().numel());
  for (size_t i = 0; i < m.table().size(); ++i)
    ASSERT_EQ(m.flat_offset(int(i)), one.model->flat_offset(int(i))) << "the same flat layout";

  EXPECT_FALSE(m.param_buffer().defined()) << "no full master in the model";
  for (size_t i = 0; i < m.table().size(); ++i)
    if (m.table()[i].gemm_weight) EXPECT_FALSE(m.params()[i].defined()) << m.table()[i].name;
  EXPECT_EQ(s.master_shard().numel(), total / 4);
  EXPECT_EQ(s.master_bytes(), total / 4 * 4);
  EXPECT_EQ(s.unsharded_master_bytes(), total * 4);
  EXPECT_EQ(s.moment_bytes(), 2 * s.master_bytes());
  const Tensor& shard = s.master_shard();
  const char* c0 = static_cast<const char*>(m.compute_buffer().data);
  const char* s0 = static_cast<const char*>(shard.data);
  EXPECT_TRUE(s0 + shard.nbytes() <= c0 || s0 >= c0 + m.compute_buffer().nbytes())
      << "the shard is a buffer of its own";
  std::vector<int> holders(total, 0);
  for (int q = 0; q < 4; ++q) {
    int64_t held = 0, at = 0;
    for (const auto& p : s.parts(q)) {
      EXPECT_EQ(p.at, at) << "the parts one after the other";
      at += p.len, held += p.len;
      for (int64_t k = 0; k < p.len; ++k) ++holders[p.lo + k];
    }
    EXPECT_EQ(held, total / 4) << "rank " << q;
  }
  EXPECT_EQ(std::count(holders.begin(), holders.end(), 1), total) << "each element on one rank";

  std::vector<double> la, lb;
  for (int64_t step = 1; step <= 3; ++step)
    la.push_back(four.train_step(step)), lb.push_back(one.train_step(step));
  expect_losses_close(la, lb, "ZeRO-1 dp=4, 3 steps by hand");
  std::vector<float> sh(shard.numel()), comp(total), ref(total);
  be->download(sh.data(), shard);
  be->download(comp.data(), m.compute_buffer());
  be->download(ref.data(), one.model->param_buffer());
  double mx = 0, worst = 0;
  for (float x : ref) mx = std::max(mx, std::fabs(double(x)));
  for (const auto& p : s.parts(r))
    for (int64_t k = 0; k < p.len; ++k) {
      ASSERT_EQ(sh[p.at + k], comp[p.lo + k]) << "flat element " << p.lo + k;
      worst = std::max(worst, std::fabs(double(sh[p.at + k]) - ref[p.lo + k]));
    }
  EXPECT_LE(worst, 1e-5 * mx) << "the shard holds the one-process parameters of its ranges";
  for (int64_t k = 0; k < total; ++k)
    ASSERT_LE(std::fabs(double(comp[k]) - ref[k]), 1e-5 * mx) << "flat element " << k;
  // The non-GEMM weights the kernels read: full fp32 copies of their own, the master values,
  // the same on every rank.
  const Tensor& small = m.accum_weights_buffer();
  ASSERT_TRUE(small.defined());
  std::vector<float> sm(small.numel()), sm0;
  be->download(sm.data(), small);
  for (size_t i = 0; i < m.table().size(); ++i) {
    if (m.table()[i].gemm_weight) continue;
    const Tensor& w = m.params()[i];
    const char* w0 = static_cast<const char*>(w.data);
    ASSERT_TRUE(w0 >= static_cast<const char*>(small.data) &&
                w0 + w.nbytes() <= static_cast<const char*>(small.data) + small.nbytes())
        << m.table()[i].name;
    const int64_t off = m.flat_offset(int(i));
    for (int64_t k = 0; k < w.numel(); ++k)
      ASSERT_EQ(w.ptr<float>()[k], comp[off + k]) << m.table()[i].name << "[" << k << "]";
  }
  sm0 = sm;
  MPI_Bcast(sm0.data(), int(sm0.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
  EXPECT_TRUE(sm0 == sm) << "the non-GEMM weights differ between the ranks";
  // Gathered for a checkpoint: the full master, equal to what every rank computes with.
  auto full = s.params_to_root();
  ASSERT_EQ(full.size(), r == 0 ? m.table().size() : 0u);
  for (size_t i = 0; i < full.size(); ++i)
    for (size_t k = 0; k < full[i].size(); ++k)
      ASSERT_EQ(full[i][k], comp[m.flat_offset(int(i)) + k]) << m.table()[i].name;
  if (r == 0)
    std::printf("ZeRO-1 dp=4: master shard %lld of %lld elements per rank; largest difference "
                "from the one-process parameters %.2e of max|p|\n",
                (long long)shard.numel(), (long long)total, worst / mx);
}

// A checkpoint of a ZeRO-1 dp=4 run (its master shards gathered into full tensors) resumed by
// one process, and one process's checkpoint resumed by ZeRO-1 dp=4 (cut into shards), continue
// the uninterrupted one-process run.
TEST(Layouts, ZeroCheckpointsResumeAcrossLayouts) {
  clean();
  const int r = world_rank();
  auto cfg = [&](const std::string& dir, std::vector<std::string> extra) {
    extra.push_back("train.max_steps=12");
    extra.push_back("checkpoint.every=0");
    extra.push_back("run.dir=" + tmpdir(dir));
    return config(extra);
  };
  TrainResult one = train(cfg("zone_r" + std::to_string(r), {}), MPI_COMM_SELF);
  ASSERT_EQ(one.losses.size(), 12u);
  const std::vector<double> head(one.losses.begin(), one.losses.begin() + 6);
  const std::vector<double> tail(one.losses.begin() + 6, one.losses.end());

  TrainResult a = train(cfg("z4", {"parallel.zero=1", "train.stop_after=6"}), MPI_COMM_WORLD);
  EXPECT_EQ(a.steps_done, 6);
  expect_losses_close(a.losses, head, "ZeRO-1 dp=4 first half");
  TrainResult b = train(cfg("zsolo_r" + std::to_string(r), {"train.stop_after=6"}), MPI_COMM_SELF);
  EXPECT_EQ(b.steps_done, 6);
  MPI_Barrier(MPI_COMM_WORLD);
  fs::copy(tmpdir("z4"), tmpdir("z4to1_r" + std::to_string(r)), fs::copy_options::recursive);
  if (r == 0) fs::copy(tmpdir("zsolo_r0"), tmpdir("z1to4"), fs::copy_options::recursive);
  MPI_Barrier(MPI_COMM_WORLD);

  TrainResult solo = train(cfg("z4to1_r" + std::to_string(r), {}), MPI_COMM_SELF);
  EXPECT_EQ(solo.steps_done, 12);
  expect_losses_close(solo.losses, tail, "ZeRO-1 dp=4 -> 1 process");
  TrainResult four = train(cfg("z1to4", {"parallel.zero=1"}), MPI_COMM_WORLD);
  EXPECT_EQ(four.steps_done, 12);
  expect_losses_close(four.losses, tail, "1 process -> ZeRO-1 dp=4");
  EXPECT_NEAR(four.param_sumsq, one.param_sumsq, 1e-4 * one.param_sumsq);
  EXPECT_NEAR(solo.param_sumsq, one.param_sumsq, 1e-4 * one.param_sumsq);

  // train.init_from (an export) reaches the master shards too: at a learning rate of nothing
  // the run ends on the exported weights, not on its seed's.
  const std::string exported = tmpdir("zexport");
  double want = 0;
  if (r == 0) {
    auto be = make_cpu_backend(DType::F32);
    Mamba2LM src(config({}).model, *be, 1, 24);
    src.init(77);
    export_model(config({}).model, src.named_params_to_host(), exported,
                 ExportFormat::HuggingFace, ExportDType::F32);
    want = be->sum_squares(src.params());
  }
  MPI_Bcast(&want, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  TrainResult imported = train(config({"parallel.zero=1", "train.max_steps=1",
                                       "train.init_from=" + exported, "train.lr=1e-12",
                                       "train.min_lr=0", "train.warmup_steps=0",
                                       "run.dir=" + tmpdir("zimport")}),
                               MPI_COMM_WORLD);
  EXPECT_EQ(imported.steps_done, 1);
  EXPECT_NEAR(imported.param_sumsq, want, 1e-6 * want);
  clean();
}
