#include "train/trainer.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/data.h"
#include "dist/comm.h"
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

std::vector<float> to_host_f32(Backend& be, const Tensor& t) {
  std::vector<float> out(t.numel());
  if (t.dtype == DType::F32) {
    be.download(out.data(), t);
  } else {
    Tensor tmp = be.alloc(t.shape, DType::F32);
    be.convert(t, tmp);
    be.download(out.data(), tmp);
  }
  return out;
}

void from_host_f32(Backend& be, Tensor& t, const std::vector<float>& v) {
  if (t.dtype == DType::F32) {
    be.upload(t, v.data());
  } else {
    Tensor tmp = be.alloc(t.shape, DType::F32);
    be.upload(tmp, v.data());
    be.convert(tmp, t);
  }
}

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
  explicit Trainer(const Config& cfg)
      : cfg_(cfg), grid_(ProcessGrid::world()),
        be_(make_backend_for(cfg, grid_.local_rank())),
        data_(make_data_source(cfg)),
        model_(cfg.model, *be_, cfg.train.micro_batch, cfg.train.seq_len,
               cfg.train.recompute == "layers") {
    const auto& t = model_.table();
    for (size_t i = 0; i < t.size(); ++i) {
      Tensor m = be_->alloc(t[i].shape, be_->accum_dtype());
      Tensor v = be_->alloc(t[i].shape, be_->accum_dtype());
      be_->zero(m);
      be_->zero(v);
      slots_.push_back({model_.params()[i], model_.grads()[i], m, v,
                        t[i].weight_decay ? cfg.train.weight_decay : 0.0});
    }
    stats_ = model_.new_stats();
  }

  TrainResult run();

 private:
  void start_state();
  void save_checkpoint();
  void log(const std::string& s) { if (grid_.is_root()) std::printf("%s\n", s.c_str()), std::fflush(stdout); }
  void metric(const std::string& json) {
    if (!grid_.is_root()) return;
    metrics_ << json << "\n";
    metrics_.flush();
    if (!metrics_)  // e.g. the disk filled up: stop rather than lose the record silently
      fail("cannot write ", cfg_.run.dir, "/metrics.jsonl: ", std::strerror(errno));
  }
  std::pair<double, double> evaluate();

  Config cfg_;
  ProcessGrid& grid_;
  std::unique_ptr<Backend> be_;
  std::unique_ptr<DataSource> data_;
  Mamba2LM model_;
  std::vector<AdamWSlot> slots_;
  Tensor stats_;
  int64_t step_ = 0;           // optimizer steps completed
  int64_t tokens_seen_ = 0;
  int64_t position_ = 0;       // training samples consumed, all ranks together
  std::ofstream metrics_;
  std::string last_ckpt_;
};

void Trainer::start_state() {
  const auto& tc = cfg_.train;
  model_.init(static_cast<uint64_t>(tc.seed));
  std::string resume_from;
  if (tc.resume == "auto") {
    if (auto p = latest_checkpoint(cfg_.checkpoint.dir)) resume_from = *p;
  } else if (tc.resume != "never") {
    resume_from = tc.resume;
  } else if (latest_checkpoint(cfg_.checkpoint.dir)) {
    fail("train.resume=never but '", cfg_.checkpoint.dir,
         "' already holds checkpoints of an earlier run; set run.dir (or checkpoint.dir) to a "
         "new directory, delete the old one, or use train.resume=auto to continue it");
  }

  if (!resume_from.empty()) {
    CheckpointData ck = read_checkpoint(resume_from);
    // The stored config first: "model.d_model differs" says more than a shape mismatch.
    for (const auto& note : check_resume_config(cfg_, ck.config_yaml, resume_from)) log(note);
    check_checkpoint_shapes(ck, param_shapes(model_.table()));
    check_checkpoint_finite(ck);
    if (!tc.init_from.empty())
      log("note: train.init_from=" + tc.init_from + " is ignored: resuming the run from " +
          resume_from + " (init_from only starts a run that has no checkpoint yet)");
    model_.load_params(ck.params);
    for (size_t i = 0; i < slots_.size(); ++i) {
      from_host_f32(*be_, slots_[i].m, ck.adam_m[i].data);
      from_host_f32(*be_, slots_[i].v, ck.adam_v[i].data);
    }
    step_ = ck.step;
    if (auto it = ck.state.find("data.position"); it != ck.state.end() && it->second.size() == 1)
      position_ = static_cast<int64_t>(it->second[0]);
    else
      fail("checkpoint '", resume_from, "' has no data-loader position (data.position)");
    if (auto tk = ck.state.find("tokens_seen"); tk != ck.state.end() && !tk->second.empty())
      tokens_seen_ = static_cast<int64_t>(tk->second[0]);
    last_ckpt_ = resume_from;
    log("resumed from " + resume_from + " at step " + std::to_string(step_));
  } else if (!tc.init_from.empty()) {
    model_.load_params(import_model(tc.init_from, cfg_.model, param_shapes(model_.table())));
    log("initialised weights from " + tc.init_from);
  }
}

void Trainer::save_checkpoint() {
  // Every rank holds the same parameters and moments: only rank 0 copies them out and writes.
  if (grid_.is_root()) {
    CheckpointData ck;
    ck.step = step_;
    ck.config_yaml = config_to_yaml(cfg_);
    ck.params = model_.named_params_to_host();
    if (!std::isfinite(be_->sum_squares(model_.params())))
      fail("step ", step_, ": the update made the parameters non-finite; no checkpoint written. "
           "The last good checkpoint is ", last_ckpt_.empty() ? std::string("(none written yet)")
           : last_ckpt_, ". Lower train.lr.");
    for (size_t i = 0; i < ck.params.size(); ++i) {
      ck.adam_m.push_back({ck.params[i].name, ck.params[i].shape, to_host_f32(*be_, slots_[i].m)});
      ck.adam_v.push_back({ck.params[i].name, ck.params[i].shape, to_host_f32(*be_, slots_[i].v)});
    }
    ck.state["data.position"] = {static_cast<uint64_t>(position_)};
    ck.state["tokens_seen"] = {static_cast<uint64_t>(tokens_seen_)};
    fs::create_directories(cfg_.checkpoint.dir);
    std::string path = checkpoint_path(cfg_.checkpoint.dir, step_);
    write_checkpoint(path, ck);
    prune_checkpoints(cfg_.checkpoint.dir, cfg_.checkpoint.keep_last);
    last_ckpt_ = path;
    log("checkpoint " + path);
  }
  grid_.barrier();
}

std::pair<double, double> Trainer::evaluate() {
  const int64_t B = cfg_.train.micro_batch, L = cfg_.train.seq_len;
  std::vector<int32_t> tok(B * L), tgt(B * L);
  Tensor stats = model_.new_stats();
  for (int64_t i = 0; i < cfg_.run.eval_batches; ++i) {
    data_->eval_batch(i * grid_.size() + grid_.rank(), tok.data(), tgt.data(), B, L);
    model_.forward_loss(tok.data(), tgt.data(), stats);
  }
  auto s = model_.read_stats(stats);
  grid_.allreduce_sum(s.data(), 3);
  return {s[0] / std::max(1.0, s[1]), s[2] / std::max(1.0, s[1])};
}

TrainResult Trainer::run() {
  const auto& tc = cfg_.train;
  TrainResult res;
  // The run directory: made only now that the config, data and backend are known good; locked
  // before any checkpoint of it is read (run_dir.h).
  RunDir run_dir;
  if (grid_.is_root()) run_dir = open_run_dir(cfg_);
  for (const auto& note : run_dir.notes) log(note);
  start_state();

  if (grid_.is_root()) {
    write_text_atomic(fs::path(cfg_.run.dir) / "config.yaml", config_to_yaml(cfg_));
    fs::path mpath = fs::path(cfg_.run.dir) / "metrics.jsonl";
    truncate_metrics(mpath, step_);
    metrics_.open(mpath, std::ios::app);
    if (!metrics_) fail("cannot open '", mpath.string(), "' for writing");
  }

  const int64_t B = tc.micro_batch, L = tc.seq_len, A = tc.grad_accum;
  const int64_t tokens_per_step = B * L * A * grid_.size();
  log("ssdtrain: " + std::to_string(count_params(model_.table())) + " parameters, backend " +
      be_->name() + ", " + std::to_string(grid_.size()) + " rank(s), data " + data_->describe());
  log("run dir " + cfg_.run.dir + "; " + std::to_string(tokens_per_step) +
      " tokens per step; steps " + std::to_string(step_ + 1) + ".." + std::to_string(tc.max_steps));

  std::vector<int32_t> tok(A * B * L), tgt(A * B * L);
  auto t_start = std::chrono::steady_clock::now();
  auto t_window = t_start;
  int64_t window_tokens = 0, steps_this_run = 0, skipped = 0;
  const bool acc_metric = data_->reports_accuracy();

  while (step_ < tc.max_steps) {
    const int64_t step = step_ + 1;
    const double lr = lr_at(step, tc.lr, tc.min_lr, tc.warmup_steps, tc.max_steps);
    // All micro-batches first: the loss is a mean over every scored token of the step.
    fill_step(*data_, position_, grid_.rank(), grid_.size(), B, A, L, tok.data(), tgt.data());
    position_ += B * A * grid_.size();
    double counted = 0;
    for (auto v : tgt) counted += v >= 0;
    grid_.allreduce_sum(&counted, 1);
    const double grad_scale = 1.0 / std::max(1.0, counted);

    model_.zero_grads();
    be_->zero(stats_);
    for (int64_t a = 0; a < A; ++a)
      model_.forward_backward(tok.data() + a * B * L, tgt.data() + a * B * L, grad_scale, stats_);
    grid_.allreduce_sum(*be_, model_.grad_buffer());  // every gradient, one call
    auto st = model_.read_stats(stats_);
    grid_.allreduce_sum(st.data(), 3);
    const double loss = st[0] / std::max(1.0, st[1]);
    const double acc = st[2] / std::max(1.0, st[1]);

    const double gnorm = std::sqrt(be_->sum_squares(model_.grads()));
    if (!std::isfinite(loss) || !std::isfinite(gnorm)) {
      if (tc.on_nan == "stop")
        fail("step ", step, ": loss is ", loss, " and gradient norm ", gnorm,
             " (not finite); stopping. The last good checkpoint is ",
             last_ckpt_.empty() ? std::string("(none written yet)") : last_ckpt_,
             ". Lower train.lr, or set train.on_nan=skip to skip such steps.");
      ++skipped;
      log("warning: step " + std::to_string(step) + " has a non-finite loss/gradient; update skipped (train.on_nan=skip)");
      if (skipped > tc.max_skipped_steps)
        fail("step ", step, ": ", skipped, " steps skipped for a non-finite loss or gradient, more "
             "than train.max_skipped_steps=", tc.max_skipped_steps, "; stopping. The last good "
             "checkpoint is ", last_ckpt_.empty() ? std::string("(none written yet)") : last_ckpt_,
             ". Lower train.lr, or raise train.max_skipped_steps.");
      step_ = step;
      if (step == tc.max_steps) save_checkpoint();  // the last step is always saved
      continue;
    }
    AdamWHyper h;
    h.lr = lr;
    h.beta1 = tc.beta1;
    h.beta2 = tc.beta2;
    h.eps = tc.adam_eps;
    h.step = step - skipped;
    h.grad_scale = (tc.grad_clip > 0 && gnorm > tc.grad_clip) ? tc.grad_clip / (gnorm + 1e-6) : 1.0;
    be_->adamw_step(slots_, h);
    model_.refresh_compute_weights();
    step_ = step;
    ++steps_this_run;
    tokens_seen_ += tokens_per_step;
    window_tokens += tokens_per_step;
    if (steps_this_run == 1) res.first_loss = loss;
    res.last_loss = loss;

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
      log(line);
      char js[256];
      std::snprintf(js, sizeof js, "{\"step\": %lld, \"eval_loss\": %.6f, \"eval_acc\": %.6f}",
                    (long long)step, el, ea);
      metric(js);
    }
    int sig = 0;
    const bool stop = grid_.any(stop_requested(&sig));
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
  res.param_sumsq = be_->sum_squares(model_.params());
  if (steps_this_run == 0 && !res.stopped_early)
    log("nothing to do: the run is already at step " + std::to_string(step_) + " of " +
        std::to_string(tc.max_steps) + " (raise train.max_steps to continue it)");
  else if (!res.stopped_early)
    log("done: " + std::to_string(step_) + " steps, final loss " + std::to_string(res.last_loss));
  return res;
}

}  // namespace

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

TrainResult train(const Config& cfg) {
  Trainer t(cfg);
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
