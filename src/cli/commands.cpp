#include "cli/commands.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>

#include "backend/backend.h"
#include "cli/bench_ssd.h"
#include "core/error.h"
#include "data/data.h"
#include "data/metrics.h"
#include "dist/grid.h"
#include "io/checkpoint.h"
#include "train/grad_sync.h"
#include "io/export.h"
#include "model/mamba2.h"
#include "config/sizes.h"
#include "train/run_dir.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace ssd::cli {
namespace {

// Pulls "--name value" out of args; returns "" when absent.
std::string take(std::vector<std::string>& args, const std::string& name, bool* found = nullptr) {
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == name) {
      if (i + 1 >= args.size()) fail("option ", name, " needs a value");
      std::string v = args[i + 1];
      args.erase(args.begin() + i, args.begin() + i + 2);
      if (found) *found = true;
      return v;
    }
  }
  if (found) *found = false;
  return "";
}

bool take_flag(std::vector<std::string>& args, const std::string& name) {
  auto it = std::find(args.begin(), args.end(), name);
  if (it == args.end()) return false;
  args.erase(it);
  return true;
}

// A positive integer option value; the error names the option.
int64_t parse_count(const char* name, const std::string& v) {
  size_t used = 0;
  long long n = 0;
  try {
    n = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || n <= 0) fail("option ", name, " needs a positive integer, got '", v, "'");
  return n;
}

void no_more(const std::vector<std::string>& args, const char* cmd) {
  if (!args.empty()) fail("unexpected argument '", args[0], "' for '", cmd, "' (see --help)");
}

// `--help` or `-h` anywhere among a command's arguments: print its usage to stdout, exit 0.
bool help(const std::vector<std::string>& args, const char* usage) {
  for (const auto& a : args)
    if (a == "--help" || a == "-h") {
      std::fputs(usage, stdout);
      return true;
    }
  return false;
}

const char* kTrainUsage =
    "usage: ssdtrain train [--config FILE] [--set section.key=value ...]\n"
    "Trains on train.device (auto: GPU when present). Writes <run.dir>/config.yaml,\n"
    "metrics.jsonl and checkpoints; resumes from the newest checkpoint (train.resume=auto).\n"
    "SIGTERM/SIGINT/SIGHUP/SIGUSR1 finish the step, write a checkpoint and exit.\n"
    "  --config FILE          YAML config (default: the built-in configs/default.yaml)\n"
    "  --set section.key=V    override one key (repeatable)\n";
const char* kEvalUsage =
    "usage: ssdtrain eval --checkpoint FILE [--set section.key=value ...]\n"
    "Loss and accuracy of a checkpoint on run.eval_batches batches of its evaluation data\n"
    "(held-out data; the training data when there is none). Exits 1 if the loss is not finite.\n"
    "  --checkpoint FILE      a step_*.h5 file\n"
    "  --set section.key=V    override a key of the checkpoint's stored config (repeatable)\n";
const char* kExportUsage =
    "usage: ssdtrain export --checkpoint FILE --out DIR [--dtype fp32|bf16] [--format hf|mamba_ssm]\n"
    "                       [--with-reference]\n"
    "Writes DIR/model.safetensors and DIR/config.json (Hugging Face Mamba2ForCausalLM or\n"
    "mamba_ssm), replacing the files an earlier export left there.\n"
    "  --checkpoint FILE      a step_*.h5 file\n"
    "  --out DIR              output directory (created if needed)\n"
    "  --dtype fp32|bf16      weight dtype (default fp32)\n"
    "  --format hf|mamba_ssm  parameter names and config.json layout (default hf)\n"
    "  --with-reference       also write DIR/reference.json: logits on fixed tokens, for\n"
    "                         scripts/check_hf_export.py\n";
const char* kConfigUsage =
    "usage: ssdtrain config [--config FILE] [--set section.key=value ...]\n"
    "Prints the fully resolved config (every key, defaults included) and checks it.\n"
    "  --config FILE          YAML config (default: the built-in configs/default.yaml)\n"
    "  --set section.key=V    override one key (repeatable)\n";
const char* kBenchUsage =
    "usage: ssdtrain bench ssd|train [options]\n"
    "  ssd     times the CUDA SSD kernels ('ssdtrain bench ssd --help' for its flags)\n"
    "  train   times whole training steps ('ssdtrain bench train --help' for its flags)\n";
const char* kBenchTrainUsage =
    "usage: ssdtrain bench train [--config FILE] [--set section.key=value ...] [--steps N]\n"
    "                            [--breakdown] [--preload]\n"
    "Times whole optimizer steps (reading the step's batch from the configured data, forward,\n"
    "backward, AdamW) on the configured backend, and the data loading on its own.\n"
    "  --config FILE          YAML config (default: the built-in configs/default.yaml)\n"
    "  --set section.key=V    override one key (repeatable)\n"
    "  --steps N              timed steps after 2 warm-up steps (default 10)\n"
    "  --breakdown            per-op device times (CUDA backend)\n"
    "  --preload              read every step's batch before timing, so the steps run on the\n"
    "                         same data with no loading at all (the loader's cost is the\n"
    "                         difference in tokens/s from a run without it)\n";

std::vector<std::string> take_sets(std::vector<std::string>& args) {
  std::vector<std::string> sets;
  for (size_t i = 0; i < args.size();) {
    if (args[i] == "--set") {
      if (i + 1 >= args.size()) fail("option --set needs section.key=value");
      sets.push_back(args[i + 1]);
      args.erase(args.begin() + i, args.begin() + i + 2);
    } else if (args[i].rfind("--set=", 0) == 0) {
      sets.push_back(args[i].substr(6));
      args.erase(args.begin() + i);
    } else {
      ++i;
    }
  }
  return sets;
}

}  // namespace

Config config_from_args(const std::vector<std::string>& in, std::vector<std::string>* rest) {
  std::vector<std::string> args = in;
  auto sets = take_sets(args);
  bool has = false;
  std::string path = take(args, "--config", &has);
  if (rest) *rest = args;
  if (has) return load_config(path, sets);
  return parse_config(default_config_yaml(), sets, "default");
}

int cmd_train(const std::vector<std::string>& in) {
  std::vector<std::string> args;
  if (help(in, kTrainUsage)) return 0;
  Config cfg;
  // Every rank checks the config; an error on any rank ends every rank, printed once.
  agree(MPI_COMM_WORLD, [&] {
    cfg = config_from_args(in, &args);
    no_more(args, "train");
    // Before any work: every path the run writes (rank 0 alone writes them), and the memory
    // the model needs.
    if (process_info().rank == 0) check_run_paths_writable(cfg);
    check_fits_host_memory(cfg, cfg.train.device == "cpu" || cuda_device_count() == 0);
  });
  install_stop_handlers();
  TrainResult r = train(cfg);
  (void)r;
  return 0;
}

int cmd_eval(const std::vector<std::string>& in) {
  if (help(in, kEvalUsage)) return 0;
  std::vector<std::string> args = in;
  auto sets = take_sets(args);
  std::string ckpt = take(args, "--checkpoint");
  no_more(args, "eval");
  if (ckpt.empty()) fail("eval needs --checkpoint FILE");
  CheckpointData ck = read_checkpoint(ckpt);
  Config cfg = parse_config(ck.config_yaml, sets, ckpt + " (stored config)");
  check_checkpoint_shapes(ck, param_shapes(param_table(cfg.model)));
  check_checkpoint_finite(ck);
  auto be = make_backend_for(cfg, process_info().local_rank);
  Mamba2LM model(cfg.model, *be, cfg.train.micro_batch, cfg.train.seq_len);
  model.load_params(ck.params);
  auto data = make_data_source(cfg);
  const int64_t B = cfg.train.micro_batch, L = cfg.train.seq_len;
  std::vector<int32_t> tok(B * L), tgt(B * L), reset(B * L);
  Tensor stats = model.new_stats();
  for (int64_t i = 0; i < cfg.run.eval_batches; ++i) {
    data->eval_batch(i, tok.data(), tgt.data(), B, L);
    if (cfg.data.reset_at_eos) data->eval_resets(i, reset.data(), B, L);
    model.forward_loss(tok.data(), tgt.data(), stats,
                       cfg.data.reset_at_eos ? reset.data() : nullptr);
  }
  auto s = model.read_stats(stats);
  const double loss = s[0] / std::max(1.0, s[1]);
  std::printf("eval %s (step %lld): %s\n", ckpt.c_str(), (long long)ck.step,
              data->describe().c_str());
  std::string extra = eval_metrics_text(cfg, loss);
  if (!extra.empty()) extra = ", " + extra;
  std::printf("eval %s (step %lld): loss %.4f%s, accuracy %.4f over %.0f tokens\n", ckpt.c_str(),
              (long long)ck.step, loss, extra.c_str(),
              s[2] / std::max(1.0, s[1]), s[1]);
  if (data->eval_is_training_data()) std::printf("(no held-out data: evaluated on training data)\n");
  if (!std::isfinite(loss))
    fail("the loss of ", ckpt, " is not finite (", loss, "): the model has diverged");
  return 0;
}

int cmd_export(const std::vector<std::string>& in) {
  if (help(in, kExportUsage)) return 0;
  std::vector<std::string> args = in;
  std::string ckpt = take(args, "--checkpoint");
  std::string out = take(args, "--out");
  std::string dtype = take(args, "--dtype");
  std::string format = take(args, "--format");
  bool with_ref = take_flag(args, "--with-reference");
  no_more(args, "export");
  if (ckpt.empty() || out.empty()) fail("export needs --checkpoint FILE and --out DIR");
  if (dtype.empty()) dtype = "fp32";
  if (format.empty()) format = "hf";
  if (dtype != "fp32" && dtype != "bf16") fail("--dtype must be fp32 or bf16, got '", dtype, "'");
  if (format != "hf" && format != "mamba_ssm")
    fail("--format must be hf or mamba_ssm, got '", format, "'");
  CheckpointData ck = read_checkpoint(ckpt);
  Config cfg = parse_config(ck.config_yaml, {}, ckpt + " (stored config)");
  check_checkpoint_shapes(ck, param_shapes(param_table(cfg.model)));
  check_checkpoint_finite(ck);
  if (format == "mamba_ssm" && cfg.model.norm_eps != 1e-5)
    std::fprintf(stderr, "warning: model.norm_eps is %g but mamba_ssm always uses 1e-5; the "
                 "exported model will compute slightly different outputs there\n", cfg.model.norm_eps);
  if (format == "hf" && cfg.model.ngroups > 1)
    std::fprintf(stderr, "warning: model.ngroups is %lld; transformers' Mamba2 (torch path) "
                 "normalises the gated RMSNorm over all of d_inner, not per group as mamba_ssm and "
                 "ssdtrain do, so its outputs will differ\n", (long long)cfg.model.ngroups);
  // A reference.json of an earlier export into this directory would describe other weights
  // (scripts/check_hf_export.py would then fail a correct export): remove it before anything
  // else, so no moment pairs it with the new files. Rewritten below with --with-reference.
  {
    const fs::path stale = fs::path(out) / "reference.json";
    std::error_code ec;
    if (fs::remove(stale, ec); ec)
      fail("cannot remove the earlier export's ", stale.string(), ": ", ec.message());
  }
  export_model(cfg.model, ck.params, out,
               format == "hf" ? ExportFormat::HuggingFace : ExportFormat::MambaSsm,
               dtype == "bf16" ? ExportDType::BF16 : ExportDType::F32);
  std::printf("exported %s (step %lld) to %s (%s, %s)\n", ckpt.c_str(), (long long)ck.step,
              out.c_str(), format.c_str(), dtype.c_str());
  if (with_ref) {
    // Logits of the CPU fp32 model on fixed tokens, for scripts/check_hf_export.py.
    const int64_t L = 24;
    auto be = make_cpu_backend(DType::F32);
    Mamba2LM model(cfg.model, *be, 1, L);
    std::vector<HostTensor> weights = ck.params;
    if (dtype == "bf16")  // the reference sees the weights the export holds
      for (auto& t : weights)
        for (auto& x : t.data) x = bf16_to_fp32(fp32_to_bf16(x));
    model.load_params(weights);
    std::vector<int32_t> tok(L);
    for (int64_t t = 0; t < L; ++t) tok[t] = static_cast<int32_t>((t * 7 + 3) % cfg.model.vocab_size);
    auto logits = model.logits(tok.data());
    const int64_t V = cfg.model.padded_vocab();
    fs::path ref = fs::path(out) / "reference.json";
    std::ostringstream f;
    f << "{\"tokens\": [";
    for (int64_t t = 0; t < L; ++t) f << (t ? ", " : "") << tok[t];
    f << "], \"logits\": [";
    char buf[32];
    for (int64_t t = 0; t < L; ++t) {
      f << (t ? ", " : "") << "[";
      for (int64_t v = 0; v < V; ++v) {
        std::snprintf(buf, sizeof buf, "%.8g", logits[t * V + v]);
        f << (v ? ", " : "") << buf;
      }
      f << "]";
    }
    f << "]}\n";
    write_file_atomic(ref.string(), f.str());
    std::printf("wrote %s\n", ref.string().c_str());
  }
  return 0;
}

int cmd_config(const std::vector<std::string>& in) {
  if (help(in, kConfigUsage)) return 0;
  std::vector<std::string> args;
  Config cfg = config_from_args(in, &args);
  no_more(args, "config");
  std::fputs(config_to_yaml(cfg).c_str(), stdout);
  return 0;
}

namespace {

// `bench train --breakdown`: `steps` more steps with per-op device timing, as a table of
// milliseconds per step. The events around each op add a little host time; the step median
// printed before is measured without them.
template <class StepFn>
void print_breakdown(Backend& be, int64_t steps, double step_median, StepFn&& one_step) {
  be.profile_take();  // drop anything recorded before
  be.set_profiling(true);
  for (int64_t s = 0; s < steps; ++s) one_step();
  be.set_profiling(false);
  auto ops = be.profile_take();
  if (ops.empty()) {
    std::printf("no per-op breakdown: the %s backend does not time its ops\n",
                be.name().c_str());
    return;
  }
  double total = 0;
  for (const auto& o : ops) total += o.seconds;
  const double ms_step = 1e3 / steps;
  std::printf("\nper-op device time, mean over %lld steps (GEMM labels: MxNxK)\n",
              (long long)steps);
  std::printf("%-36s %10s %10s %8s\n", "op", "calls/step", "ms/step", "share");
  for (const auto& o : ops)
    std::printf("%-36s %10.1f %10.3f %7.1f%%\n", o.label.c_str(), double(o.calls) / steps,
                o.seconds * ms_step, 100 * o.seconds / total);
  std::printf("%-36s %10s %10.3f %7.1f%%\n", "sum of ops", "", total * ms_step, 100.0);
  std::printf("%-36s %10s %10.3f\n", "step median (untimed run)", "", step_median * 1e3);
}

// Times whole optimizer steps (forward, backward, AdamW) on the configured backend.
int bench_train(const std::vector<std::string>& in) {
  if (help(in, kBenchTrainUsage)) return 0;
  std::vector<std::string> args;
  Config cfg = config_from_args(in, &args);
  std::string steps_s = take(args, "--steps");
  const bool breakdown = take_flag(args, "--breakdown");
  const bool preload = take_flag(args, "--preload");
  no_more(args, "bench train");
  const int64_t steps = steps_s.empty() ? 10 : parse_count("--steps", steps_s);
  // The real step of the configured layout: under mpirun, every rank runs its part and the
  // gradients go through the grid's communicators (a world of one without mpirun).
  std::unique_ptr<Backend> be;
  Layout layout;
  const ProcessInfo& me = process_info();
  agree(MPI_COMM_WORLD, [&] {
    be = make_backend_for(cfg, me.local_rank);
    layout = resolve_layout(cfg, me.size, be->device() == Device::CUDA);
  });
  if (breakdown && layout.world > 1) fail_all("bench train --breakdown times one process; run it without mpirun");
  ProcessGrid grid(layout);
  const int64_t align = std::lcm<int64_t>(64, layout.dp * layout.cp);
  Mamba2LM model(cfg.model, *be, cfg.train.micro_batch, cfg.train.seq_len / layout.cp,
                 cfg.train.recompute == "layers", align, layout.tp, grid.tp_rank(),
                 cfg.parallel.sequence_parallel, cfg.parallel.zero == 1);
  grid.attach(*be);
  model.set_context_parallel(&grid.dev(Group::Cp), cp_combine_of(cfg.parallel));
  model.set_tensor_parallel(&grid.dev(Group::Tp), &grid.dev(Group::TpSpan));
  GradSync sync(model, *be, grid, cfg.parallel, 0.0);
  model.init(cfg.train.seed);  // with ZeRO-1 the master shard (in sync) takes its part too
  auto data = make_data_source(cfg);
  const int64_t B = cfg.train.micro_batch, L = cfg.train.seq_len / layout.cp, T = B * L;
  std::vector<int32_t> full_tok(B * cfg.train.seq_len), full_tgt(B * cfg.train.seq_len);
  std::vector<int32_t> full_reset(B * cfg.train.seq_len);
  const bool resets = cfg.data.reset_at_eos;  // timed as training runs it
  // One step's batch as this rank's model takes it.
  struct Batch {
    std::vector<int32_t> tok, tgt, reset;
  };
  // Each step reads its own batch (the next B * dp samples of the stream), as training does;
  // the host time of that is timed on its own too. With --preload, the batches of every step
  // are read before timing and a step only picks its own.
  int64_t position = 0;
  auto read_batch = [&](Batch& out) {
    fill_step(*data, position, grid.dp_rank(), layout.dp, B, 1, cfg.train.seq_len,
              full_tok.data(), full_tgt.data(), resets ? full_reset.data() : nullptr);
    take_segment(full_tok, full_tgt, B, cfg.train.seq_len, layout.cp, grid.cp_rank(), out.tok,
                 out.tgt);
    out.reset = take_segment(full_reset, B, cfg.train.seq_len, layout.cp, grid.cp_rank());
    position += B * layout.dp;
  };
  const int64_t warmup = 2;
  std::vector<Batch> batches(preload ? warmup + steps : 1);
  if (preload)
    for (Batch& b : batches) read_batch(b);
  const Batch* cur = &batches[0];
  int64_t step_no = 0;
  auto load = [&] {
    if (preload)
      cur = &batches[step_no % batches.size()];
    else
      read_batch(batches[0]);
  };
  Tensor stats = model.new_stats();
  std::vector<double> times, load_times;
  // wait (optional): the device is synchronized once the backward is enqueued, and the time
  // from its end to the end of the gradient reductions still in flight is stored there (the
  // slowest rank's): what the step waits for communication the backward did not hide.
  auto one_step = [&](double* wait = nullptr) {
    using Clock = std::chrono::steady_clock;
    be->synchronize();
    grid.host(Group::World).barrier();
    auto t0 = Clock::now();
    load();
    load_times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    model.zero_grads();
    sync.before_micro_batch(true);
    model.forward_backward(cur->tok.data(), cur->tgt.data(), 1.0 / T, stats,
                           resets ? cur->reset.data() : nullptr);
    Clock::time_point backward_done;
    if (wait) be->synchronize(), backward_done = Clock::now();
    sync.finish_backward();
    if (wait) {
      be->synchronize();
      *wait = std::chrono::duration<double>(Clock::now() - backward_done).count();
      grid.host(Group::World).all_reduce(wait, 1, DType::F64, ReduceOp::Max);
    }
    AdamWHyper h;
    h.lr = 1e-4;
    h.step = ++step_no;
    h.grad_scale = std::min(1.0, 1.0 / (sync.grad_norm() + 1e-6));
    sync.step(h);
    be->synchronize();
    double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    grid.host(Group::World).all_reduce(&t, 1, DType::F64, ReduceOp::Max);  // the slowest rank
    return t;
  };
  const std::vector<std::pair<Group, const char*>> groups = {
      {Group::DpCp, "dp x cp (gradients)"}, {Group::Tp, "tp"}, {Group::TpSpan, "tp span"},
      {Group::Cp, "cp"}};
  for (int64_t s = 0; s < warmup + steps; ++s) {
    if (s == warmup)
      for (auto [g, _] : groups) grid.counted(g).reset_counts();
    const double t = one_step();
    if (s >= warmup) times.push_back(t);
  }
  // The wait for the gradient reductions, in separate steps: the synchronization after the
  // backward changes the timing a little.
  double wait_med = 0;
  if (layout.dp * layout.cp > 1) {
    std::vector<double> waits(steps);
    for (double& w : waits) one_step(&w);
    std::sort(waits.begin(), waits.end());
    wait_med = waits[waits.size() / 2];
  }
  // The time of each group's collectives, in steps of their own too (timing events).
  std::vector<CommTimes> comm_times;
  if (layout.world > 1) {
    for (auto [g, _] : groups) grid.counted(g).start_timing();
    for (int64_t s = 0; s < steps; ++s) one_step();
    for (auto [g, _] : groups) comm_times.push_back(grid.counted(g).take_times());
  }
  if (!grid.is_root()) return 0;
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];
  // The timed steps' loading (the extra steps after them load too).
  std::vector<double> lt(load_times.begin() + warmup, load_times.begin() + warmup + steps);
  std::sort(lt.begin(), lt.end());
  const double load_med = lt[lt.size() / 2];
  const auto& m = cfg.model;
  const double params = static_cast<double>(count_params(model.table()));
  const double ssd_flops = m.n_layer * 3.0 * 2.0 * m.nheads() *
                           (m.chunk_size * m.headdim + 2.0 * m.d_state * m.headdim);
  const double tok_s = T * layout.dp * layout.cp / med;
  const double mfu = (6 * params + ssd_flops) * tok_s / layout.world / 790e12;
  std::printf("bench train: backend %s, %.0f params, batch %lld x seqlen %lld per rank, recompute %s, "
              "%lld rank(s)%s\n",
              be->name().c_str(), params, (long long)B, (long long)L, cfg.train.recompute.c_str(),
              (long long)layout.world, layout.world > 1 ? (layout.comm_nccl ? " over NCCL" : " over MPI") : "");
  auto mib = [](double bytes) { return bytes / 1048576.0; };
  std::printf("AdamW moments %.1f MiB per rank (%s; unsharded %.1f MiB: parallel.zero=1 saves "
              "%.1f MiB per rank at dp=%lld)\n",
              mib(sync.moment_bytes()), cfg.parallel.zero ? "ZeRO-1" : "not sharded",
              mib(sync.unsharded_moment_bytes()),
              mib(sync.unsharded_moment_bytes() * (1.0 - 1.0 / layout.dp)), (long long)layout.dp);
  {
    // The fp32 master weights: the shard under ZeRO-1. Beside it the model keeps what the
    // forward reads: the compute copies (bf16 on CUDA; on the CPU the fp32 weights themselves,
    // which makes the shard an extra) and, with ZeRO-1, full fp32 copies of the non-GEMM ones.
    const double full = sync.unsharded_master_bytes();
    const double small = model.accum_weights_buffer().defined()
                             ? double(model.accum_weights_buffer().nbytes())
                             : double(model.non_gemm_bytes());
    const bool separate = model.compute_buffer().data != model.param_buffer().data;
    const bool fp32_compute = be->compute_dtype() == be->accum_dtype();
    std::printf("fp32 master weights %.1f MiB per rank (%s; unsharded %.1f MiB", mib(sync.master_bytes()),
                cfg.parallel.zero ? "ZeRO-1 shard" : "not sharded", mib(full));
    if (!fp32_compute)
      std::printf(": parallel.zero=1 saves %.1f MiB per rank at dp=%lld, keeping %.1f MiB of "
                  "non-GEMM weights full in fp32)", mib(full * (1.0 - 1.0 / layout.dp) - small),
                  (long long)layout.dp, mib(small));
    else
      std::printf("; the %s backend computes with full fp32 weights)", be->name().c_str());
    std::printf("; %s compute weights %.1f MiB per rank%s\n", dtype_name(be->compute_dtype()),
                mib(model.compute_buffer().nbytes()), separate ? "" : " (the master itself)");
  }
  if (layout.cp > 1)
    std::printf("context parallel: cp=%lld, segments of %lld tokens, parallel.cp_combine=%s; per "
                "layer and step each rank sends %.1f KiB for the SSD state and %.1f KiB of conv "
                "halo (%.1f KiB)\n", (long long)layout.cp, (long long)L,
                cfg.parallel.cp_combine.c_str(), model.cp_state_bytes_per_layer() / 1024.0,
                model.cp_halo_bytes_per_layer() / 1024.0, model.cp_bytes_per_layer() / 1024.0);
  if (layout.tp > 1)
    std::printf("tensor parallel: tp=%lld (%lld heads, %lld B/C group(s) per rank; a group shared "
                "by %lld rank(s)); parameters %.1f MiB per rank\n",
                (long long)layout.tp, (long long)model.tp_dims().nheads,
                (long long)model.tp_dims().ngroups, (long long)layout.tp_span,
                mib(sync.unsharded_master_bytes()));
  // What rank 0 handed to each kind of collective per step, by group.
  for (auto [g, label] : groups) {
    const CommBytes& c = grid.counted(g).counts();
    std::string line;
    for (int k = 0; k < kCommOps; ++k)
      if (c.calls[k] > 0) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "%s%s %.2f MiB in %.0f call(s)", line.empty() ? "" : ", ",
                      comm_op_name(static_cast<CommOp>(k)), mib(double(c.bytes[k]) / steps),
                      double(c.calls[k]) / steps);
        line += buf;
      }
    if (!line.empty()) std::printf("collectives per step, %s: %s\n", label, line.c_str());
  }
  // Rank 0's time in them: from an operation's start on the communicator's stream to its end
  // on GPUs (waiting for the other ranks included), the call on host communicators.
  for (size_t i = 0; i < comm_times.size(); ++i) {
    const CommTimes& c = comm_times[i];
    std::string line;
    for (int k = 0; k < kCommOps; ++k)
      if (c.calls[k] > 0) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "%s%s %.3f ms (%.1f us a call)", line.empty() ? "" : ", ",
                      comm_op_name(static_cast<CommOp>(k)), c.seconds[k] * 1e3 / steps,
                      c.seconds[k] * 1e6 / c.calls[k]);
        line += buf;
      }
    if (!line.empty())
      std::printf("time in collectives per step (rank 0, %lld more steps), %s: %s\n",
                  (long long)steps, groups[i].second, line.c_str());
  }
  std::printf("step median %.3f ms over %lld steps | %.0f tokens/s", med * 1e3, (long long)steps, tok_s);
  if (be->device() == Device::CUDA) std::printf(" | MFU %.1f%% (of 790 TFLOP/s per GPU)", mfu * 100);
  if (int64_t peak = be->peak_memory_bytes(); peak > 0)
    std::printf(" | peak tensor memory %.1f GiB", peak / 1073741824.0);
  std::printf("\n");
  // A timing of broken arithmetic is worthless: the loss of the steps must be finite.
  const auto st = model.read_stats(stats);
  const double mean_loss = st[0] / std::max(1.0, st[1]);
  if (preload)
    std::printf("data (%s): every step's batch was read before timing (--preload)\n",
                cfg.data.kind.c_str());
  else
    std::printf("data (%s): loading a step's batch on the host takes %.3f ms (median), %.2f%% of "
                "the step\n", cfg.data.kind.c_str(), load_med * 1e3, 100.0 * load_med / med);
  std::printf("mean loss of the steps %.4f\n", mean_loss);
  if (!std::isfinite(mean_loss)) fail("bench train: the loss is not finite (", mean_loss, ")");
  if (layout.dp * layout.cp > 1) {
    std::printf("gradient reductions: after the backward, a step waits %.3f ms (median of %lld "
                "more steps, slowest rank) for those still in flight, %.2f%% of the step\n",
                wait_med * 1e3, (long long)steps, 100.0 * wait_med / med);
  }
  if (breakdown) print_breakdown(*be, steps, med, [&] { return one_step(); });
  return 0;
}

}  // namespace

int cmd_bench(const std::vector<std::string>& args, int argc, char** argv) {
  if (!args.empty() && (args[0] == "--help" || args[0] == "-h")) return help(args, kBenchUsage), 0;
  if (args.empty()) fail("bench needs a target: ssd or train");
  if (args[0] == "ssd") return run_bench_ssd(argc - 1, argv + 1);
  if (args[0] == "train") return bench_train({args.begin() + 1, args.end()});
  fail("unknown bench target '", args[0], "' (ssd or train)");
}

}  // namespace ssd::cli
