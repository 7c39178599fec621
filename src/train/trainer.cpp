#include "train/trainer.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include "data/data.h"
#include "data/metrics.h"
#include <cstring>
#include <numeric>

#include "dist/grid.h"
#include "dist/watchdog.h"
#include "train/grad_sync.h"
#include "io/checkpoint.h"
#include "io/export.h"
#include "model/mamba2.h"
#include "train/run_dir.h"
#include "train/schedule.h"

namespace fs = std::filesystem;

namespace ssd {
namespace {

std::atomic<int> g_stop_signal{0};

void on_stop_signal(int sig) { g_stop_signal.store(sig); }

// Writes a small text file atomically through the checked I/O path (io/checkpoint.h), which
// names errno (ENOSPC...) and removes its temp file on any failure.
void write_text_atomic(const fs::path& path, const std::string& text) {
  write_file_atomic(path.string(), text);
}

// Keeps only the metrics lines of steps <= last_step (a resumed run rewrites what follows).
void truncate_metrics(const fs::path& path, int64_t last_step) {
  if (!fs::exists(path)) return;
  std::ifstream in(path);
  std::ostringstream kept;
  std::string line;
  while (std::getline(in, line)) {
    auto p = line.find("\"step\":");
    if (p == std::string::npos) continue;
    int64_t s = std::atoll(line.c_str() + p + 7);
    if (s <= last_step) kept << line << "\n";
  }
  write_text_atomic(path, kept.str());
}

std::string fmt_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(t / 3600), (long long)(t / 60 % 60), (long long)(t % 60));
  else std::snprintf(buf, sizeof buf, "%lld:%02lld", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

std::string fmt_rate(double r) {
  char buf[32];
  if (r >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", r / 1e6);
  else if (r >= 1e3) std::snprintf(buf, sizeof buf, "%.1fK", r / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", r);
  return buf;
}

class Trainer {
 public:
  Trainer(const Config& cfg, MPI_Comm base) : cfg_(cfg) {
    const ProcessInfo& me = process_info();  // MPI up
    int world = 1;
    MPI_Comm_size(base, &world);
    // Everything that can fail on bad input is checked on every rank before any collective
    // work; a failure ends every rank with one message.
    agree(base, [&] {
      be_ = make_backend_for(cfg_, me.local_rank);
      layout_ = resolve_layout(cfg_, world, be_->device() == Device::CUDA);
    });
    grid_ = std::make_unique<ProcessGrid>(layout_, base);
    if (layout_.world > 1)
      for (const auto& line : grid_->describe_ranks()) log(line);
    watchdog::configure(cfg_.parallel.timeout_s,
                        "rank " + std::to_string(grid_->rank()) + " (host " + me.host + ")");
    agree(base, [&] {
      data_ = make_data_source(cfg_);
      const int64_t align = std::lcm<int64_t>(64, layout_.dp * layout_.cp);
      model_ = std::make_unique<Mamba2LM>(cfg_.model, *be_, layout_.micro_batch,
                                          cfg_.train.seq_len / layout_.cp,
                                          cfg_.train.recompute == "layers", align, layout_.tp,
                                          grid_->tp_rank(), cfg_.parallel.sequence_parallel,
                                          cfg_.parallel.zero == 1);
    });
    grid_->attach(*be_);
    model_->set_context_parallel(&grid_->dev(Group::Cp), cp_combine_of(cfg_.parallel));
    model_->set_tensor_parallel(&grid_->dev(Group::Tp), &grid_->dev(Group::TpSpan));
    sync_ = std::make_unique<GradSync>(*model_, *be_, *grid_, cfg_.parallel, cfg_.train.weight_decay);
    stats_ = model_->new_stats();
  }

  TrainResult run();

 private:
  void start_state();
  void save_checkpoint();
  // The ranks of dp 0 and cp 0: the tensor-parallel group that assembles and spreads full
  // tensors for checkpoints (rank 0 among them).
  bool in_root_tp_group() const { return grid_->dp_rank() == 0 && grid_->cp_rank() == 0; }
  void log(const std::string& s) { if (grid_->is_root()) std::printf("%s\n", s.c_str()), std::fflush(stdout); }
  void metric(const std::string& json) {
    if (!grid_->is_root()) return;
    metrics_ << json << "\n";
    metrics_.flush();
    if (!metrics_)  // e.g. the disk filled up: stop rather than lose the record silently
      fail("cannot write ", cfg_.run.dir, "/metrics.jsonl: ", std::strerror(errno));
  }
  std::pair<double, double> evaluate();
  Communicator& world() { return grid_->host(Group::World); }

  Config cfg_;
  Layout layout_;
  std::unique_ptr<Backend> be_;
  std::unique_ptr<ProcessGrid> grid_;
  std::unique_ptr<DataSource> data_;
  std::unique_ptr<Mamba2LM> model_;
  std::unique_ptr<GradSync> sync_;
  Tensor stats_;
  int64_t step_ = 0;           // optimizer steps completed
  int64_t skipped_ = 0;        // of which skipped (train.on_nan=skip): AdamW's step is the rest
  int64_t tokens_seen_ = 0;
  int64_t position_ = 0;       // training samples consumed, all ranks together
  std::ofstream metrics_;
  std::string last_ckpt_;
};

// A string from rank 0 of comm to every rank.
void broadcast_string(Communicator& c, std::string& s) {
  int32_t n = static_cast<int32_t>(s.size());
  c.broadcast(&n, 1, DType::I32, 0);
  s.resize(n);
  std::vector<int32_t> buf((n + 3) / 4);
  if (c.rank() == 0) std::memcpy(buf.data(), s.data(), n);
  c.broadcast(buf.data(), static_cast<int64_t>(buf.size()), DType::I32, 0);
  std::memcpy(s.data(), buf.data(), n);
}

void Trainer::start_state() {
  const auto& tc = cfg_.train;
  model_->init(static_cast<uint64_t>(tc.seed));
  // Rank 0 decides where to resume from and reads the file; the others receive what it read.
  std::string resume_from;
  agree(grid_->base(), [&] {
    if (!grid_->is_root()) return;
    if (tc.resume == "auto") {
      if (auto p = latest_checkpoint(cfg_.checkpoint.dir)) resume_from = *p;
    } else if (tc.resume != "never") {
      resume_from = tc.resume;
    } else if (latest_checkpoint(cfg_.checkpoint.dir)) {
      fail_all("train.resume=never but '", cfg_.checkpoint.dir,
               "' already holds checkpoints of an earlier run; set run.dir (or checkpoint.dir) to "
               "a new directory, delete the old one, or use train.resume=auto to continue it");
    }
  });
  broadcast_string(world(), resume_from);

  if (!resume_from.empty()) {
    CheckpointData ck;
    // step, position, tokens seen, skipped steps, has moments
    std::vector<double> head(5, 0.0);
    agree(grid_->base(), [&] {
      if (!grid_->is_root()) return;
      ck = read_checkpoint(resume_from);
      // The stored config first: "model.d_model differs" says more than a shape mismatch.
      for (const auto& note : check_resume_config(cfg_, ck.config_yaml, resume_from)) log(note);
      check_checkpoint_shapes(ck, param_shapes(model_->table()));
      check_checkpoint_finite(ck);
      if (!tc.init_from.empty())
        log("note: train.init_from=" + tc.init_from + " is ignored: resuming the run from " +
            resume_from + " (init_from only starts a run that has no checkpoint yet)");
      auto get = [&](const char* key, int64_t fallback) {
        auto it = ck.state.find(key);
        return it != ck.state.end() && it->second.size() == 1 ? static_cast<int64_t>(it->second[0])
                                                              : fallback;
      };
      head[0] = static_cast<double>(ck.step);
      // Written before the loader state was a global position: every step took one global
      // batch, so the position follows from the step.
      head[1] = static_cast<double>(get("data.position", ck.step * layout_.global_batch));
      head[2] = static_cast<double>(get("tokens_seen", 0));
      head[3] = static_cast<double>(get("skipped_steps", 0));
      head[4] = ck.adam_m.empty() ? 0.0 : 1.0;
    });
    world().broadcast(head.data(), 5, DType::F64, 0);
    step_ = static_cast<int64_t>(head[0]);
    position_ = static_cast<int64_t>(head[1]);
    tokens_seen_ = static_cast<int64_t>(head[2]);
    skipped_ = static_cast<int64_t>(head[3]);
    // Full parameters everywhere.
    const auto& table = model_->table();
    std::vector<HostTensor> params;
    for (size_t i = 0; i < table.size(); ++i) {
      HostTensor t{table[i].name, table[i].shape, {}};
      if (grid_->is_root()) t.data = std::move(ck.params[i].data);
      else t.data.resize(shape_numel(table[i].shape));
      world().broadcast(t.data.data(), static_cast<int64_t>(t.data.size()), DType::F32, 0);
      params.push_back(std::move(t));
    }
    model_->load_params(params);
    if (head[4] != 0) {
      std::vector<std::vector<float>> m, v;
      if (grid_->is_root())
        for (size_t i = 0; i < table.size(); ++i)
          m.push_back(std::move(ck.adam_m[i].data)), v.push_back(std::move(ck.adam_v[i].data));
      if (layout_.tp > 1 && in_root_tp_group()) {
        // Rank 0's full moments to its tensor-parallel group; each keeps its part.
        Communicator& tp = grid_->host(Group::Tp);
        for (auto* mv : {&m, &v}) {
          mv->resize(table.size());
          for (size_t i = 0; i < table.size(); ++i) {
            auto& full = (*mv)[i];
            full.resize(shape_numel(table[i].shape));
            tp.broadcast(full.data(), static_cast<int64_t>(full.size()), DType::F32, 0);
            std::vector<float> part(shape_numel(model_->shard(static_cast<int>(i)).local_shape));
            model_->shard(static_cast<int>(i)).to_local(full.data(), part.data());
            full = std::move(part);
          }
        }
      }
      // Every dp x cp group (one per tensor-parallel rank) loads from its own rank 0.
      sync_->moments_from_root(m, v);
    } else {
      log("note: " + resume_from + " holds no optimizer state; the AdamW moments start from zero");
    }
    last_ckpt_ = resume_from;
    if (!ck.state.count("data.position") && grid_->is_root() && step_ > 0)
      log("note: " + resume_from + " predates global data positions; continuing at sample " +
          std::to_string(position_) + " (step x global batch)");
    log("resumed from " + resume_from + " at step " + std::to_string(step_));
  } else if (!tc.init_from.empty()) {
    model_->load_params(import_model(tc.init_from, cfg_.model, param_shapes(model_->table())));
    log("initialised weights from " + tc.init_from);
  }
}

void Trainer::save_checkpoint() {
  // Streamed tensor by tensor: for each parameter of the table, its master values and AdamW
  // moments are gathered to rank 0 of each dp x cp group (the ZeRO shards' pieces of it), then,
  // under tensor parallelism, the root tp group's parts into the full tensor on rank 0, which
  // writes them and drops them. So rank 0 holds one tensor (and its moments) at a time, never
  // the model. After each tensor every rank learns how rank 0's write went (agree): a failure
  // (disk full, a non-finite parameter) ends every rank with its message instead of a hang, the
  // writer removes its temp file and the previous checkpoint stays the latest.
  const std::string path = checkpoint_path(cfg_.checkpoint.dir, step_);
  const auto& table = model_->table();
  std::optional<CheckpointWriter> writer;
  agree(grid_->base(), [&] {
    if (!grid_->is_root()) return;
    std::error_code ec;
    fs::create_directories(cfg_.checkpoint.dir, ec);
    if (ec)
      fail("cannot create checkpoint directory ", cfg_.checkpoint.dir, ": ", ec.message());
    writer.emplace(path, /*optimizer=*/true);
  });
  double sumsq = 0;
  for (size_t i = 0; i < table.size(); ++i) {
    GradSync::TensorState t = sync_->tensor_to_root(static_cast<int>(i));
    if (layout_.tp > 1 && in_root_tp_group()) {  // the full tensor from the tp group's parts
      Communicator& tp = grid_->host(Group::Tp);
      t.param = gather_full(tp, table[i], cfg_.model, t.param);
      t.m = gather_full(tp, table[i], cfg_.model, t.m);
      t.v = gather_full(tp, table[i], cfg_.model, t.v);
    }
    agree(grid_->base(), [&] {
      if (!grid_->is_root()) return;
      for (float x : t.param) sumsq += double(x) * x;
      if (!std::isfinite(sumsq))
        fail_all("step ", step_, ": the update made the parameters non-finite; no checkpoint "
                 "written. The last good checkpoint is ",
                 last_ckpt_.empty() ? std::string("(none written yet)") : last_ckpt_,
                 ". Lower train.lr.");
      writer->add({table[i].name, table[i].shape, std::move(t.param)},
                  {table[i].name, table[i].shape, std::move(t.m)},
                  {table[i].name, table[i].shape, std::move(t.v)});
    });
  }
  agree(grid_->base(), [&] {
    if (!grid_->is_root()) return;
    std::map<std::string, std::vector<uint64_t>> state;
    state["data.position"] = {static_cast<uint64_t>(position_)};
    state["tokens_seen"] = {static_cast<uint64_t>(tokens_seen_)};
    state["skipped_steps"] = {static_cast<uint64_t>(skipped_)};
    writer->finish(step_, config_to_yaml(cfg_), state);
    prune_checkpoints(cfg_.checkpoint.dir, cfg_.checkpoint.keep_last);
  });
  last_ckpt_ = path;
  log("checkpoint " + path);
}

std::pair<double, double> Trainer::evaluate() {
  const int64_t B = layout_.micro_batch, L = cfg_.train.seq_len;
  std::vector<int32_t> tok(B * L), tgt(B * L), stok, stgt, reset(B * L);
  const bool resets = cfg_.data.reset_at_eos;
  Tensor stats = model_->new_stats();
  // The eval batches split over the dp ranks (context- and tensor-parallel ranks share theirs):
  // the same batches as one process evaluates, whatever the layout.
  for (int64_t i = grid_->dp_rank(); i < cfg_.run.eval_batches; i += layout_.dp) {
    data_->eval_batch(i, tok.data(), tgt.data(), B, L);
    take_segment(tok, tgt, B, L, layout_.cp, grid_->cp_rank(), stok, stgt);
    if (resets) data_->eval_resets(i, reset.data(), B, L);
    const auto sreset = resets ? take_segment(reset, B, L, layout_.cp, grid_->cp_rank())
                               : std::vector<int32_t>{};
    model_->forward_loss(stok.data(), stgt.data(), stats, resets ? sreset.data() : nullptr);
  }
  auto s = model_->read_stats(stats);
  grid_->host(Group::DpCp).all_reduce(s.data(), 3, DType::F64, ReduceOp::Sum);
  return {s[0] / std::max(1.0, s[1]), s[2] / std::max(1.0, s[1])};
}

TrainResult Trainer::run() {
  const auto& tc = cfg_.train;
  TrainResult res;
  // The run directory: made only now that the config, data and backend are known good; locked
  // before any checkpoint of it is read (run_dir.h).
  RunDir run_dir;
  agree(grid_->base(), [&] {
    if (grid_->is_root()) run_dir = open_run_dir(cfg_);
  });
  for (const auto& note : run_dir.notes) log(note);
  start_state();

  if (grid_->is_root()) {
    write_text_atomic(fs::path(cfg_.run.dir) / "config.yaml", config_to_yaml(cfg_));
    fs::path mpath = fs::path(cfg_.run.dir) / "metrics.jsonl";
    truncate_metrics(mpath, step_);
    metrics_.open(mpath, std::ios::app);
    if (!metrics_) fail("cannot open '", mpath.string(), "' for writing");
  }

  const int64_t B = layout_.micro_batch, L = tc.seq_len, A = layout_.grad_accum;
  const int64_t tokens_per_step = layout_.global_batch * L;
  log("ssdtrain: " + std::to_string(count_params(model_->table())) + " parameters, backend " +
      be_->name() + ", data " + data_->describe() +
      (cfg_.data.reset_at_eos ? "; no state crosses a document start (data.reset_at_eos)" : ""));
  log("layout: " + std::to_string(layout_.world) + " rank(s) = dp " + std::to_string(layout_.dp) +
      " x cp " + std::to_string(layout_.cp) + " x tp " + std::to_string(layout_.tp) +
      "; global batch " + std::to_string(layout_.global_batch) + " = micro_batch " +
      std::to_string(B) + " x grad_accum " + std::to_string(A) + " x dp " +
      std::to_string(layout_.dp) + (layout_.world > 1 ? (layout_.comm_nccl ? "; NCCL" : "; MPI") : "") +
      (cfg_.parallel.zero ? ", ZeRO-1" : "") + "; " + std::to_string(sync_->num_buckets()) +
      " gradient bucket(s)");
  if (layout_.cp > 1)
    log("context parallel: segments of " + std::to_string(L / layout_.cp) + " tokens, SSD state "
        "combined by " + cfg_.parallel.cp_combine + "; each rank sends " +
        std::to_string(model_->cp_bytes_per_layer() >> 10) + " KiB per layer and step "
        "(SSD state and conv halo, forward and backward)");
  if (layout_.tp > 1) {
    const TpDims& d = model_->tp_dims();
    log("tensor parallel: tp=" + std::to_string(layout_.tp) + ", " + std::to_string(d.nheads) +
        " of " + std::to_string(cfg_.model.nheads()) + " heads, " +
        (d.span > 1 ? "the B/C group shared by " + std::to_string(d.span) + " ranks"
                    : std::to_string(d.ngroups) + " B/C group(s)") +
        " and " + std::to_string(d.vocab) + " vocabulary rows per rank" +
        (cfg_.parallel.sequence_parallel ? "; sequence parallel (the residual stream on " +
                                               std::to_string(layout_.micro_batch *
                                                              (L / layout_.cp) / layout_.tp) +
                                               " tokens per rank)"
                                         : ""));
  }
  if (cfg_.parallel.zero)
    log("ZeRO-1: AdamW moments " + std::to_string(sync_->moment_bytes() >> 20) +
        " MiB on each rank instead of " + std::to_string(sync_->unsharded_moment_bytes() >> 20) +
        " MiB; fp32 master weights " + std::to_string(sync_->master_bytes() >> 20) +
        " MiB instead of " + std::to_string(sync_->unsharded_master_bytes() >> 20) +
        " MiB, beside the weights the forward reads: " +
        std::to_string(model_->compute_buffer().nbytes() >> 20) + " MiB in " +
        dtype_name(be_->compute_dtype()) + " and the non-GEMM ones full in fp32, " +
        std::to_string(model_->accum_weights_buffer().nbytes() >> 20) + " MiB");
  log("run dir " + cfg_.run.dir + "; " + std::to_string(tokens_per_step) +
      " tokens per step; steps " + std::to_string(step_ + 1) + ".." + std::to_string(tc.max_steps));

  auto t_start = std::chrono::steady_clock::now();
  auto t_window = t_start;
  int64_t window_tokens = 0, steps_this_run = 0;
  const bool acc_metric = data_->reports_accuracy();

  while (step_ < tc.max_steps) {
    const int64_t step = step_ + 1;
    const double lr = lr_at(step, tc.lr, tc.min_lr, tc.warmup_steps, tc.max_steps);
    // All micro-batches first: the loss is a mean over every scored token of the step.
    const StepResult sr = compute_gradients(*model_, *sync_, *grid_, *data_, layout_, position_,
                                            L, stats_, cfg_.data.reset_at_eos);
    position_ += layout_.global_batch;
    const double loss = sr.loss, acc = sr.accuracy;

    const double gnorm = sync_->grad_norm();
    if (!std::isfinite(loss) || !std::isfinite(gnorm)) {
      if (tc.on_nan == "stop")
        fail_all("step ", step, ": loss is ", loss, " and gradient norm ", gnorm,
             " (not finite); stopping. The last good checkpoint is ",
             last_ckpt_.empty() ? std::string("(none written yet)") : last_ckpt_,
             ". Lower train.lr, or set train.on_nan=skip to skip such steps.");
      ++skipped_;
      log("warning: step " + std::to_string(step) + " has a non-finite loss/gradient; update skipped (train.on_nan=skip)");
      if (skipped_ > tc.max_skipped_steps)
        fail_all("step ", step, ": ", skipped_, " steps skipped for a non-finite loss or gradient, more "
             "than train.max_skipped_steps=", tc.max_skipped_steps, "; stopping. The last good "
             "checkpoint is ", last_ckpt_.empty() ? std::string("(none written yet)") : last_ckpt_,
             ". Lower train.lr, or raise train.max_skipped_steps.");
      step_ = step;
      if (step == tc.max_steps) save_checkpoint();  // the last step is always saved
      continue;
    }
    sync_->step(adamw_hyper(tc, step, skipped_, gnorm));
    step_ = step;
    ++steps_this_run;
    tokens_seen_ += tokens_per_step;
    window_tokens += tokens_per_step;
    if (steps_this_run == 1) res.first_loss = loss;
    res.last_loss = loss;
    res.losses.push_back(loss);

    if (step % cfg_.run.log_every == 0 || step == tc.max_steps || steps_this_run == 1) {
      be_->synchronize();
      auto now = std::chrono::steady_clock::now();
      double dt = std::chrono::duration<double>(now - t_window).count();
      double rate = window_tokens / std::max(dt, 1e-9);
      double elapsed = std::chrono::duration<double>(now - t_start).count();
      double eta = (tc.max_steps - step) * tokens_per_step / std::max(rate, 1e-9);
      char line[512];
      std::snprintf(line, sizeof line,
                    "step %*lld/%lld | loss %.4f%s | lr %.2e | gnorm %.3f | %s tok/s | ETA %s",
                    (int)std::to_string(tc.max_steps).size(), (long long)step,
                    (long long)tc.max_steps, loss,
                    acc_metric ? (" | acc " + std::to_string(acc).substr(0, 5)).c_str() : "",
                    lr, gnorm, fmt_rate(rate).c_str(), fmt_duration(eta).c_str());
      log(line);
      char js[512];
      std::snprintf(js, sizeof js,
                    "{\"step\": %lld, \"loss\": %.10g, \"acc\": %.6f, \"lr\": %.6e, \"grad_norm\": "
                    "%.6f, \"tokens_per_s\": %.1f, \"tokens\": %lld, \"elapsed_s\": %.3f}",
                    (long long)step, loss, acc, lr, gnorm, rate, (long long)tokens_seen_, elapsed);
      metric(js);
      t_window = now;
      window_tokens = 0;
    }
    const bool last = step == tc.max_steps;
    if ((cfg_.run.eval_every > 0 && step % cfg_.run.eval_every == 0) || last) {
      auto [el, ea] = evaluate();
      res.last_eval_loss = el;
      res.last_eval_acc = ea;
      char line[256];
      std::snprintf(line, sizeof line, "eval step %lld%s | loss %.4f%s", (long long)step,
                    data_->eval_is_training_data()
                        ? " (no held-out data, data.val_fraction=0: on training data)" : "",
                    el, acc_metric ? (" | acc " + std::to_string(ea).substr(0, 5)).c_str() : "");
      const std::string extra = eval_metrics_text(cfg_, el);
      log(std::string(line) + (extra.empty() ? "" : " | " + extra));
      char js[256];
      std::snprintf(js, sizeof js, "{\"step\": %lld, \"eval_loss\": %.6f, \"eval_acc\": %.6f}",
                    (long long)step, el, ea);
      metric(js);
    }
    int sig = 0;
    int stop_flag = stop_requested(&sig) ? 1 : 0;
    world().all_reduce(&stop_flag, 1, DType::I32, ReduceOp::Max);
    const bool stop = stop_flag != 0;
    const bool budget_done = tc.stop_after > 0 && steps_this_run >= tc.stop_after && !last;
    if ((cfg_.checkpoint.every > 0 && step % cfg_.checkpoint.every == 0) || last || stop ||
        budget_done)
      save_checkpoint();
    if (stop || budget_done) {
      log((stop ? "stopped by signal " + std::to_string(sig)
                : "stopped after " + std::to_string(steps_this_run) + " steps (train.stop_after)") +
          " at step " + std::to_string(step) + "; checkpoint " + last_ckpt_ +
          ". Run the same command again to resume.");
      res.stopped_by_signal = stop;
      res.stopped_early = true;
      break;
    }
  }
  res.steps_done = step_;
  res.param_sumsq = sync_->param_sumsq();
  if (steps_this_run == 0 && !res.stopped_early)
    log("nothing to do: the run is already at step " + std::to_string(step_) + " of " +
        std::to_string(tc.max_steps) + " (raise train.max_steps to continue it)");
  else if (!res.stopped_early)
    log("done: " + std::to_string(step_) + " steps, final loss " + std::to_string(res.last_loss));
  return res;
}

}  // namespace

AdamWHyper adamw_hyper(const TrainConfig& tc, int64_t step, int64_t skipped, double grad_norm) {
  AdamWHyper h;
  h.lr = lr_at(step, tc.lr, tc.min_lr, tc.warmup_steps, tc.max_steps);
  h.beta1 = tc.beta1;
  h.beta2 = tc.beta2;
  h.eps = tc.adam_eps;
  h.step = step - skipped;
  h.grad_scale = (tc.grad_clip > 0 && grad_norm > tc.grad_clip) ? tc.grad_clip / (grad_norm + 1e-6)
                                                                 : 1.0;
  return h;
}

void take_segment(const std::vector<int32_t>& tok, const std::vector<int32_t>& tgt, int64_t n,
                  int64_t L, int64_t cp, int64_t r, std::vector<int32_t>& stok,
                  std::vector<int32_t>& stgt) {
  const int64_t S = L / cp;
  stok.resize(n * S);
  stgt.resize(n * S);
  for (int64_t b = 0; b < n; ++b) {
    std::copy_n(tok.begin() + b * L + r * S, S, stok.begin() + b * S);
    std::copy_n(tgt.begin() + b * L + r * S, S, stgt.begin() + b * S);
  }
}

std::vector<int32_t> take_segment(const std::vector<int32_t>& v, int64_t n, int64_t L,
                                  int64_t cp, int64_t r) {
  const int64_t S = L / cp;
  std::vector<int32_t> out(n * S);
  for (int64_t b = 0; b < n; ++b) std::copy_n(v.begin() + b * L + r * S, S, out.begin() + b * S);
  return out;
}

StepResult compute_gradients(Mamba2LM& model, GradSync& sync, ProcessGrid& grid, DataSource& data,
                             const Layout& layout, int64_t position, int64_t seqlen, Tensor& stats,
                             bool reset_at_eos) {
  const int64_t B = layout.micro_batch, A = layout.grad_accum;
  std::vector<int32_t> full_tok(A * B * seqlen), full_tgt(A * B * seqlen), tok, tgt;
  std::vector<int32_t> full_reset(reset_at_eos ? A * B * seqlen : 0), reset;
  fill_step(data, position, grid.dp_rank(), layout.dp, B, A, seqlen, full_tok.data(),
            full_tgt.data(), reset_at_eos ? full_reset.data() : nullptr);
  // Context parallelism: this rank's segment of every sequence. The document starts are cut
  // from the whole sample, so a segment's first token is flagged when a document begins there.
  take_segment(full_tok, full_tgt, A * B, seqlen, layout.cp, grid.cp_rank(), tok, tgt);
  if (reset_at_eos) reset = take_segment(full_reset, A * B, seqlen, layout.cp, grid.cp_rank());
  const int64_t L = seqlen / layout.cp;
  // The loss is the mean over every scored token of the global batch: scale by their count.
  double counted = 0;
  for (auto v : tgt) counted += v >= 0;
  grid.host(Group::DpCp).all_reduce(&counted, 1, DType::F64, ReduceOp::Sum);
  model.zero_grads();
  Backend& be = model.backend();
  be.zero(stats);
  for (int64_t a = 0; a < A; ++a) {
    sync.before_micro_batch(a == A - 1);
    model.forward_backward(tok.data() + a * B * L, tgt.data() + a * B * L,
                           1.0 / std::max(1.0, counted), stats,
                           reset_at_eos ? reset.data() + a * B * L : nullptr);
  }
  sync.finish_backward();
  auto st = model.read_stats(stats);
  grid.host(Group::DpCp).all_reduce(st.data(), 3, DType::F64, ReduceOp::Sum);
  return {st[0] / std::max(1.0, st[1]), st[2] / std::max(1.0, st[1])};
}

std::unique_ptr<Backend> make_backend_for(const Config& cfg, int local_rank) {
  const std::string& device = cfg.train.device;
  if (device == "cpu") return make_cpu_backend(DType::F32);
  int n = cuda_device_count();
  if (device == "cuda") {
#ifndef SSD_HAVE_CUDA
    return make_cuda_backend(0);  // says this build has no CUDA support
#endif
    if (n == 0) fail("train.device=cuda but no CUDA GPU is available");
    return make_cuda_backend(local_rank % n);
  }
  if (n == 0) return make_cpu_backend(DType::F32);
  auto be = make_cuda_backend(local_rank % n);
  SsdDims d;
  d.batch = cfg.train.micro_batch;
  d.seqlen = cfg.train.seq_len;
  d.nheads = cfg.model.nheads();
  d.headdim = cfg.model.headdim;
  d.ngroups = cfg.model.ngroups;
  d.dstate = cfg.model.d_state;
  d.chunk = cfg.model.chunk_size;
  if (std::string why = be->ssd_unsupported(d); !why.empty()) {
    if (local_rank == 0)
      std::printf("note: training on the CPU: the CUDA SSD kernels do not support this model (%s)\n",
                  why.c_str());
    return make_cpu_backend(DType::F32);
  }
  return be;
}

TrainResult train(const Config& cfg, MPI_Comm base) {
  Trainer t(cfg, base);
  return t.run();
}

void install_stop_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGUSR1, &sa, nullptr);
  sigaction(SIGHUP, &sa, nullptr);  // a closed terminal or ssh session: stop like SIGTERM
  // `ssdtrain train | head`: a closed stdout must not kill the run; writes then fail with EPIPE
  // and the log just goes nowhere (checkpoints and metrics.jsonl are files).
  signal(SIGPIPE, SIG_IGN);
}

bool stop_requested(int* sig) {
  int s = g_stop_signal.load();
  if (sig) *sig = s;
  return s != 0;
}

}  // namespace ssd
