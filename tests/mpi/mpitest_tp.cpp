// Tensor parallelism by heads against one process (ctest runs it under mpirun -np 4, CPU
// backend, fp32): for tp = 2 and 4, with sequence parallelism off and on, and every ngroups
// that splits (1, 2, 4, 8: B/C groups owned by one rank, or one group shared by tp / ngroups
// ranks), and for tp x dp, tp x cp and tp with ZeRO-1, one step's loss and every gradient (gathered into full tensors) equal the one-process
// run's; 20 training steps give its losses; runs resume across tp = 2 <-> tp = 1; the full
// tensors a tp = 2 model assembles are bitwise those of one process, and so is their export.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>

#include "config/config.h"
#include "dist/grid.h"
#include "io/export.h"
#include "layout_checks.h"
#include "layout_step.h"
#include "model/mamba2.h"
#include "mpi_main.h"
#include "train/trainer.h"

using namespace ssd;
namespace fs = std::filesystem;

namespace {

// 8 heads of 8 (d_inner 64), so tp = 4 and ngroups = 8 both split it; the padded vocabulary of
// 48 gives 24 rows per rank at tp = 2, 12 at tp = 4.
const char* kSmall =
    "model: {d_model: 32, n_layer: 2, d_state: 8, headdim: 8, chunk_size: 8, vocab_size: 48}\n"
    "train: {device: cpu, seq_len: 24, micro_batch: 2, global_batch: 4, lr: 0.01, min_lr: 0.001,\n"
    "        warmup_steps: 2}\n"
    "data: {kind: mqar, mqar_num_pairs: 2, mqar_key_vocab: 16, mqar_value_vocab: 16}\n"
    "run: {log_every: 5, eval_batches: 2}\n"
    "parallel: {bucket_mb: 0.004}\n";

std::string tmpdir(const std::string& name) { return "/tmp/ssdtrain_mpitest_tp/" + name; }

Config config(std::vector<std::string> sets) { return parse_config(kSmall, sets, "mpitest_tp"); }

LayoutGrads step(const Config& cfg, MPI_Comm comm, int64_t position, DType dt = DType::F32) {
  auto be = make_cpu_backend(dt);
  return layout_step(cfg, comm, *be, cfg.train.seed, position);
}

// Every gradient within tol of its tensor's max |g|; the worst ratio printed for the record.
void expect_close(const LayoutGrads& got, const LayoutGrads& ref, const Config& cfg,
                  const std::string& what, double tol = 1e-5) {
  EXPECT_NEAR(got.loss, ref.loss, tol * ref.loss) << what;
  auto table = param_table(cfg.model);
  ASSERT_EQ(got.g.size(), ref.g.size());
  double worst = 0;
  for (size_t i = 0; i < got.g.size(); ++i) {
    ASSERT_EQ(got.g[i].size(), ref.g[i].size()) << table[i].name;
    double mx = 0, diff = 0;
    for (float x : ref.g[i]) mx = std::max(mx, std::fabs(double(x)));
    ASSERT_GT(mx, 0) << table[i].name << " has no gradient";
    for (size_t j = 0; j < got.g[i].size(); ++j) {
      const double d = std::fabs(double(got.g[i][j]) - ref.g[i][j]);
      diff = std::max(diff, d);
      ASSERT_LE(d, tol * mx) << what << ": " << table[i].name << "[" << j << "] "
                              << got.g[i][j] << " vs " << ref.g[i][j];
    }
    worst = std::max(worst, diff / mx);
  }
  if (world_rank() == 0)
    std::printf("%s: loss %.7f vs %.7f, largest gradient difference %.2e of max|g|\n",
                what.c_str(), got.loss, ref.loss, worst);
}

void clean() {
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) fs::remove_all("/tmp/ssdtrain_mpitest_tp");
  MPI_Barrier(MPI_COMM_WORLD);
}

std::string read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

}  // namespace

// In fp32 the split changes the order of a few sums (out_proj's two partial GEMMs, the LM head's
// vocabulary halves), and gradients that nearly cancel (D's with 8 groups: max |g| 6e-5 from
// terms of 1e-2) then differ by a few 1e-5 of their own maximum; in fp64 every gradient of every
// layout, rounded to fp32, is the one-process value (difference 0 at 1e-10), which shows the
// sharded math is the one-process math. fp32 at 1e-5 is
// checked for ngroups 1, 2 and 4 and in the composition test below.
TEST(TensorParallel, LossAndGradientsEqualOneProcessForEveryGroupCount) {
  ASSERT_EQ(process_info().size, 4) << "run under mpirun -np 4";
  for (DType dt : {DType::F64, DType::F32})
    for (int g : {1, 2, 4, 8}) {
      if (dt == DType::F32 && g == 8) continue;
      const std::string G = "model.ngroups=" + std::to_string(g);
      for (int64_t position : {0, 12}) {
        const LayoutGrads ref = step(config({G}), MPI_COMM_SELF, position, dt);
        for (int tp : {2, 4})
          for (bool sp : {false, true}) {
            MPI_Comm c = groups_of(tp);
            const Config cfg = config({G, "parallel.tp=" + std::to_string(tp),
                                       std::string("parallel.sequence_parallel=") +
                                           (sp ? "true" : "false")});
            expect_close(step(cfg, c, position, dt), ref, cfg,
                         std::string(dt == DType::F64 ? "f64" : "f32") + " tp=" +
                             std::to_string(tp) + (sp ? " sequence-parallel" : "") +
                             " ngroups=" + std::to_string(g) + " position " +
                             std::to_string(position),
                         dt == DType::F64 ? 1e-10 : 1e-5);
            MPI_Comm_free(&c);
          }
      }
    }
}

TEST(TensorParallel, ComposesWithDataAndContextParallelismAndZero) {
  for (int g : {1, 2}) {
    const std::string G = "model.ngroups=" + std::to_string(g);
    const LayoutGrads ref = step(config({G, "train.seq_len=32"}), MPI_COMM_SELF, 4);
    struct Case { std::vector<std::string> sets; std::string what; };
    for (const Case& k : {Case{{"parallel.tp=2"}, "tp=2 x dp=2"},
                          Case{{"parallel.tp=2", "parallel.zero=1"}, "tp=2 x dp=2, ZeRO-1"},
                          Case{{"parallel.tp=2", "parallel.cp=2"}, "tp=2 x cp=2"},
                          Case{{"parallel.tp=2", "train.recompute=layers"},
                               "tp=2 x dp=2, recompute"},
                          Case{{"parallel.tp=2", "parallel.sequence_parallel=true"},
                               "tp=2 x dp=2, sequence parallel"},
                          Case{{"parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero=1"},
                               "tp=2 x dp=2, sequence parallel, ZeRO-1"},
                          Case{{"parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true"},
                               "tp=2 x cp=2, sequence parallel"},
                          Case{{"parallel.tp=2", "parallel.sequence_parallel=true",
                                "train.recompute=layers"},
                               "tp=2 x dp=2, sequence parallel, recompute"},
                          Case{{"parallel.tp=4", "parallel.sequence_parallel=true"},
                               "tp=4, sequence parallel"}}) {
      std::vector<std::string> sets = k.sets;
      sets.push_back(G);
      sets.push_back("train.seq_len=32");
      const Config cfg = config(sets);
      expect_close(step(cfg, MPI_COMM_WORLD, 4), ref, cfg, k.what + " ngroups=" + std::to_string(g));
    }
  }
}

// Training compares losses at 1e-5 for 20 steps. AdamW's update of an element is about
// lr * sign(g) while |g| >> adam_eps, so an element whose gradient is ~1e-7 of the tensor's
// largest (and changes sign under fp32 reordering) moves by lr one way or the other; with the
// default eps 1e-8 one such element of out_proj (ngroups 2) sent the tp=2 losses 1e-4 away for
// a few steps. eps 1e-6 (still far below the gradients that matter) keeps the comparison about
// the layout, not about that amplification.
TEST(TensorParallel, TrainsTheOneProcessLossesAndKeepsReplicasEqual) {
  clean();
  const int r = world_rank();
  auto cfg = [&](const std::string& dir, std::vector<std::string> extra) {
    extra.push_back("train.max_steps=20");
    extra.push_back("train.adam_eps=1e-6");
    extra.push_back("run.dir=" + tmpdir(dir));
    return config(extra);
  };
  TrainResult one = train(cfg("one_r" + std::to_string(r), {}), MPI_COMM_SELF);
  ASSERT_EQ(one.losses.size(), 20u);
  EXPECT_LT(one.last_loss, one.first_loss);
  struct Case { std::vector<std::string> sets; std::string name; };
  for (const Case& k : {Case{{"parallel.tp=4"}, "tp4"}, Case{{"parallel.tp=2"}, "tp2dp2"},
                        Case{{"parallel.tp=4", "parallel.sequence_parallel=true"}, "tp4_sp"},
                        Case{{"parallel.tp=2", "model.ngroups=2", "parallel.zero=1"},
                             "tp2dp2_g2_zero"}}) {
    // ngroups=2 changes the model: its own one-process reference.
    const bool g2 = k.name == "tp2dp2_g2_zero";
    TrainResult ref = g2 ? train(cfg("one_g2_r" + std::to_string(r), {"model.ngroups=2"}),
                                 MPI_COMM_SELF)
                         : one;
    TrainResult res = train(cfg(k.name, k.sets), MPI_COMM_WORLD);
    expect_losses_close(res.losses, ref.losses, k.name + ", 20 steps");
    // The norms' copies and the shared B/C rows stay bitwise equal: the parameter sum of
    // squares (each copy counted once) is the same on every rank.
    double lo = res.param_sumsq, hi = res.param_sumsq;
    MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    EXPECT_EQ(lo, hi) << k.name;
    EXPECT_NEAR(res.param_sumsq, ref.param_sumsq, 1e-4 * ref.param_sumsq) << k.name;
  }
  clean();
}

TEST(TensorParallel, ResumesAcrossTensorParallelLayouts) {
  clean();
  const int r = world_rank();
  auto cfg = [&](const std::string& dir, std::vector<std::string> extra) {
    extra.push_back("train.max_steps=16");
    extra.push_back("train.adam_eps=1e-6");  // see TrainsTheOneProcessLosses...
    extra.push_back("checkpoint.every=0");
    extra.push_back("run.dir=" + tmpdir(dir));
    return config(extra);
  };
  TrainResult one = train(cfg("one_r" + std::to_string(r), {}), MPI_COMM_SELF);
  ASSERT_EQ(one.losses.size(), 16u);
  const std::vector<double> head(one.losses.begin(), one.losses.begin() + 8);
  const std::vector<double> tail(one.losses.begin() + 8, one.losses.end());
  MPI_Comm pairs = groups_of(2);
  // tp=2 for 8 steps (ZeRO off), then one process continues it.
  const std::string a_dir = "tp2_g" + std::to_string(r / 2);
  TrainResult a = train(cfg(a_dir, {"parallel.tp=2", "train.stop_after=8"}), pairs);
  EXPECT_EQ(a.steps_done, 8);
  expect_losses_close(a.losses, head, "tp=2 first half");
  MPI_Barrier(MPI_COMM_WORLD);
  fs::copy(tmpdir(a_dir), tmpdir("solo_r" + std::to_string(r)), fs::copy_options::recursive);
  TrainResult solo = train(cfg("solo_r" + std::to_string(r), {}), MPI_COMM_SELF);
  expect_losses_close(solo.losses, tail, "tp=2 -> tp=1");
  // One process for 8 steps, then tp=2 (x dp=2, ZeRO-1) continues it.
  if (r == 0) {
    TrainResult b = train(cfg("first_one", {"train.stop_after=8"}), MPI_COMM_SELF);
    EXPECT_EQ(b.steps_done, 8);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  TrainResult c = train(cfg("first_one", {"parallel.tp=2", "parallel.zero=1"}), MPI_COMM_WORLD);
  EXPECT_EQ(c.steps_done, 16);
  expect_losses_close(c.losses, tail, "tp=1 -> tp=2 x dp=2 (zero=1)");
  MPI_Comm_free(&pairs);
  clean();
}

// Sharding is exact: a tp=2 model's parts, gathered, are bitwise the one-process tensors (the
// init of any layout, and a full tensor loaded and gathered back), and their export is the
// one-process export byte for byte.
TEST(TensorParallel, GatheredParametersAndExportAreBitwiseTheOneProcessOnes) {
  clean();
  const int r = world_rank();
  const Config cfg1 = config({});
  auto be = make_cpu_backend(DType::F32);
  Mamba2LM one(cfg1.model, *be, 1, 8);
  one.init(7);
  const auto ref = one.named_params_to_host();
  for (int tp : {2, 4}) {
    const Config cfg = config({"parallel.tp=" + std::to_string(tp)});
    MPI_Comm c = groups_of(tp);
    Layout l = resolve_layout(cfg, tp, false);
    ProcessGrid grid(l, c);
    grid.attach(*be);
    Mamba2LM m(cfg.model, *be, 1, 8, false, 64, tp, grid.tp_rank());
    m.init(7);
    auto full = gather_full(grid.host(Group::Tp), m.table(), cfg.model, m.params_to_host());
    if (grid.tp_rank() == 0) {
      ASSERT_EQ(full.size(), ref.size());
      for (size_t i = 0; i < ref.size(); ++i)
        EXPECT_EQ(full[i], ref[i].data) << "tp=" << tp << " init of " << ref[i].name;
    }
    // A different full state (the one-process model after a perturbation) loads and gathers back.
    std::vector<HostTensor> other = ref;
    for (auto& t : other)
      for (size_t k = 0; k < t.data.size(); ++k) t.data[k] += 1e-3f * float(k % 7);
    m.load_params(other);
    full = gather_full(grid.host(Group::Tp), m.table(), cfg.model, m.params_to_host());
    if (grid.tp_rank() == 0)
      for (size_t i = 0; i < other.size(); ++i)
        EXPECT_EQ(full[i], other[i].data) << "tp=" << tp << " load + gather of " << other[i].name;
    if (tp == 2 && r == 0) {
      std::vector<HostTensor> named;
      for (size_t i = 0; i < full.size(); ++i)
        named.push_back({m.table()[i].name, m.table()[i].shape, full[i]});
      const fs::path a = tmpdir("export_tp2"), b = tmpdir("export_tp1");
      export_model(cfg.model, named, a.string(), ExportFormat::HuggingFace, ExportDType::F32);
      export_model(cfg1.model, other, b.string(), ExportFormat::HuggingFace, ExportDType::F32);
      int files = 0;
      for (const auto& e : fs::directory_iterator(b)) {
        ++files;
        EXPECT_EQ(read_all(e.path()), read_all(a / e.path().filename()))
            << e.path().filename() << " differs between the tp=2 and tp=1 exports";
      }
      EXPECT_GE(files, 2);
    }
    MPI_Comm_free(&c);
  }
  clean();
}
