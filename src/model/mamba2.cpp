#include "model/mamba2.h"

#include <algorithm>
#include <array>

namespace ssd {

CpCombine cp_combine_of(const ParallelConfig& p) {
  if (p.cp_combine == "ring") return CpCombine::Ring;
  if (p.cp_combine == "allgather") return CpCombine::AllGather;
  fail("config key 'parallel.cp_combine' must be ring or allgather, got '", p.cp_combine, "'");
}

Mamba2LM::Mamba2LM(const ModelConfig& cfg, Backend& be, int64_t batch, int64_t seqlen,
                   bool recompute_activations, int64_t flat_align, int64_t tp, int64_t tp_rank,
                   bool sequence_parallel, bool master_in_shards)
    : cfg_(cfg), be_(be), batch_(batch), seqlen_(seqlen), T_(batch * seqlen),
      master_in_shards_(master_in_shards), recompute_(recompute_activations) {
  table_ = param_table(cfg_);
  tpd_ = ssd::tp_dims(cfg_, tp, tp_rank);
  sp_ = sequence_parallel && tp > 1;
  if (sp_ && T_ % tp != 0)
    fail("parallel.sequence_parallel: the ", T_, " tokens of a micro-batch do not split over "
         "parallel.tp=", tp, " ranks");
  Tl_ = sp_ ? T_ / tp : T_;
  for (const auto& spec : table_) shards_.push_back(shard_layout(spec, tpd_, cfg_));
  if (std::string why = be_.ssd_unsupported(ssd_dims()); !why.empty())
    fail("the ", be_.name(), " backend cannot run this model: ", why);
  const DType acc = be_.accum_dtype(), cmp = be_.compute_dtype();
  // Flat layout in backward order: by ready stage, then table order.
  std::vector<int> order(table_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return ready_stage(a) < ready_stage(b); });
  flat_off_.assign(table_.size(), 0);
  int64_t flat_total = 0;
  for (int i : order) {
    flat_off_[i] = flat_total;
    flat_total += (shape_numel(shards_[i].local_shape) + flat_align - 1) / flat_align * flat_align;
  }
  grad_flat_ = be_.alloc({flat_total}, acc);
  be_.zero(grad_flat_);
  if (!master_in_shards_) {
    param_flat_ = be_.alloc({flat_total}, acc);
    be_.zero(param_flat_);
  }
  // The weights the GEMMs read, in the flat layout too, so that ZeRO-1 can all-gather them by
  // bucket ranges. One buffer with the master when the dtypes agree and the master is here.
  if (param_flat_.defined() && cmp == acc) {
    compute_flat_ = param_flat_;
  } else {
    compute_flat_ = be_.alloc({flat_total}, cmp);
    be_.zero(compute_flat_);
  }
  // Master in shards: the non-GEMM parameters (read by the kernels in accum dtype) get full
  // accum copies of their own, compact (a small part of the model). The CPU, whose compute
  // buffer would do, keeps them too: its tests then run the GPU's algorithm.
  std::vector<int64_t> small_off(table_.size(), -1);
  if (master_in_shards_) {
    int64_t n_small = 0;
    for (int i : order)
      if (!table_[i].gemm_weight) {
        small_off[i] = n_small;
        n_small += (shape_numel(shards_[i].local_shape) + 63) / 64 * 64;
      }
    accum_small_ = be_.alloc({std::max<int64_t>(n_small, 1)}, acc);
    be_.zero(accum_small_);
  }
  for (size_t i = 0; i < table_.size(); ++i) {
    const Shape& sh = shards_[i].local_shape;
    const int64_t n = shape_numel(sh);
    grads_.push_back(grad_flat_.rows(flat_off_[i], n).view(sh));
    Tensor c = compute_flat_.rows(flat_off_[i], n).view(sh);
    if (!master_in_shards_)
      params_.push_back(param_flat_.rows(flat_off_[i], n).view(sh));
    else if (table_[i].gemm_weight)
      params_.push_back(Tensor{});  // its fp32 master is in GradSync's shards only
    else
      params_.push_back(accum_small_.rows(small_off[i], n).view(sh));
    // GEMMs read the compute-dtype view; the other parameters are read in accum dtype.
    compute_.push_back(table_[i].gemm_weight ? c : params_.back());
  }
  auto find = [&](const std::string& name) {
    for (size_t i = 0; i < table_.size(); ++i)
      if (table_[i].name == name) return static_cast<int>(i);
    fail("internal: parameter ", name, " missing from the table");
  };
  emb_ = find("embedding.weight");
  norm_f_ = find("norm_f.weight");
  for (int i = 0; i < cfg_.n_layer; ++i) {
    std::string p = "layers." + std::to_string(i) + ".";
    std::string m = p + "mixer.";
    lp_.push_back({find(p + "norm.weight"), find(m + "in_proj.weight"), find(m + "conv1d.weight"),
                   find(m + "conv1d.bias"), find(m + "dt_bias"), find(m + "A_log"), find(m + "D"),
                   find(m + "norm.weight"), find(m + "out_proj.weight")});
  }

  const int64_t D = cfg_.d_model, Di = tpd_.d_inner;
  tokens_ = be_.alloc({T_}, DType::I32);
  targets_ = be_.alloc({T_}, DType::I32);
  reset_ = be_.alloc({T_}, DType::I32);
  // The residual stream: this rank's Tl_ tokens (all T_ without sequence parallelism).
  x_ = be_.alloc({Tl_, D}, cmp);
  for (int i = 0; i < cfg_.n_layer; ++i) {
    residual_.push_back(be_.alloc({Tl_, D}, acc));
    if (recompute_) x_in_.push_back(be_.alloc({Tl_, D}, cmp));
  }
  for (int i = 0; i < (recompute_ ? 1 : cfg_.n_layer); ++i) {
    LayerActs a;
    a.rstd = be_.alloc({Tl_}, acc);
    a.hidden = be_.alloc({T_, D}, cmp);
    a.zxbcdt = be_.alloc({T_, tpd_.d_in_proj}, cmp);
    a.xBC = be_.alloc({T_, tpd_.conv_dim}, cmp);
    a.y = be_.alloc({T_, Di}, cmp);
    a.grstd = be_.alloc({T_, Di / tpd_.norm_group}, acc);
    a.ynorm = be_.alloc({T_, Di}, cmp);
    if (const int64_t sb = be_.ssd_saved_bytes(ssd_dims()); sb > 0)
      a.ssd_saved = be_.alloc({(sb + 3) / 4}, DType::F32);
    acts_.push_back(std::move(a));
  }
  res_f_ = be_.alloc({Tl_, D}, acc);
  rstd_f_ = be_.alloc({Tl_}, acc);
  hidden_f_ = be_.alloc({T_, D}, cmp);
  d_hidden_ = be_.alloc({T_, D}, cmp);
  d_ynorm_ = be_.alloc({T_, Di}, cmp);
  d_y_ = be_.alloc({T_, Di}, cmp);
  d_xBC_ = be_.alloc({T_, tpd_.conv_dim}, cmp);
  d_zxbcdt_ = be_.alloc({T_, tpd_.d_in_proj}, cmp);
  d_res_[0] = be_.alloc({Tl_, D}, acc);
  d_res_[1] = be_.alloc({Tl_, D}, acc);
  d_x_ = cmp == acc ? Tensor{} : be_.alloc({Tl_, D}, cmp);
  if (tpd_.tp > 1) tp_red_ = be_.alloc({T_, D}, acc);
  if (sp_) {
    sp_hidden_ = be_.alloc({Tl_, D}, cmp);
    sp_red_ = be_.alloc({Tl_, D}, acc);
    sp_full_ = be_.alloc({T_, D}, cmp);
  }
}

void Mamba2LM::set_tensor_parallel(Communicator* tp, Communicator* span) {
  if (tpd_.tp == 1) return;
  SSD_CHECK(tp && tp->size() == tpd_.tp && tp->rank() == tpd_.rank, "tensor-parallel group");
  SSD_CHECK(span && span->size() == tpd_.span, "tensor-parallel span group");
  tp_ = tp;
  span_ = tpd_.span > 1 ? span : nullptr;
  vshard_.begin = tpd_.vocab0;
  vshard_.total = cfg_.padded_vocab();
  vshard_.ranks = static_cast<int>(tpd_.tp);
  vshard_.all_gather = [this](const Tensor& local, Tensor& all) {
    tp_->all_gather(local.data, all.data, local.numel(), local.dtype);
    tp_->join();
  };
  nspan_.ranks = tpd_.span;
  nspan_.all_reduce = [this](Tensor& t) {
    span_->all_reduce(t);
    span_->join();
  };
}

void Mamba2LM::tp_sum(Tensor& t) {
  if (t.dtype == tp_red_.dtype) {
    tp_->all_reduce(t);
    tp_->join();
    return;
  }
  be_.convert(t, tp_red_);
  tp_->all_reduce(tp_red_);
  tp_->join();
  be_.convert(tp_red_, t);
}

void Mamba2LM::sp_gather(const Tensor& local, Tensor& full) {
  tp_->all_gather(local.data, full.data, local.numel(), local.dtype);
  tp_->join();
}

void Mamba2LM::sp_reduce_scatter(Tensor& partial, Tensor& local) {
  Tensor& dst = local.dtype == partial.dtype ? local : sp_red_;
  tp_->reduce_scatter(partial.data, dst.data, dst.numel(), partial.dtype);
  tp_->join();
  if (&dst != &local) be_.convert(dst, local);
}

void Mamba2LM::sp_sum_norm_grad(int idx) {
  // Each rank's norm saw its own tokens: the weight's gradient is the sum of the parts.
  if (!sp_ || !reduce_shared_) return;
  tp_->all_reduce(grads_[idx]);
  tp_->join();
}

void Mamba2LM::reduce_shared_grads(int i) {
  if (!span_ || !reduce_shared_) return;
  // The B and C rows shared by the span's ranks: each rank's backward gave the part of its heads.
  const auto& p = lp_[i];
  for (int idx : {p.in_proj, p.conv_w, p.conv_b}) {
    const auto& blocks = shards_[idx].blocks;
    int64_t lo = -1, hi = -1;
    for (const auto& b : blocks)
      if (b.shared) {
        if (lo < 0) lo = b.local_row;
        hi = b.local_row + b.rows;
      }
    SSD_CHECK(lo >= 0);
    Tensor rows = grads_[idx].rows(lo, hi - lo);
    span_->all_reduce(rows);
  }
  span_->join();
}

int Mamba2LM::ready_stage(int i) const {
  const int layer = table_[i].layer;
  if (layer >= 0) return 1 + static_cast<int>(cfg_.n_layer - 1 - layer);
  return table_[i].name == "norm_f.weight" ? 0 : static_cast<int>(cfg_.n_layer) + 1;
}

void Mamba2LM::init(uint64_t seed) {
  std::vector<std::vector<float>> host;
  std::vector<float> full;
  for (size_t i = 0; i < table_.size(); ++i) {
    full.resize(shape_numel(table_[i].shape));
    init_param(table_[i], cfg_, seed, full.data());
    host.emplace_back(shape_numel(shards_[i].local_shape));
    shards_[i].to_local(full.data(), host.back().data());
  }
  params_from_host(host);
}

namespace {

// Host fp32 values into a tensor of any float dtype on the backend; bf16 goes through a bounded
// fp32 staging tensor (the backend's conversion, as refresh_compute_weights rounds).
void upload_values(Backend& be, Tensor& dst, const float* src) {
  const int64_t n = dst.numel();
  if (dst.dtype == DType::F32) return be.upload(dst, src);
  if (dst.dtype == DType::F64) {
    std::vector<double> tmp(src, src + n);
    return be.upload(dst, tmp.data());
  }
  Tensor flat = dst.view({n});
  const int64_t chunk = std::min<int64_t>(n, int64_t(1) << 22);
  Tensor stage = be.alloc({std::max<int64_t>(chunk, 1)}, DType::F32);
  for (int64_t k = 0; k < n; k += chunk) {
    const int64_t len = std::min(chunk, n - k);
    Tensor s = stage.rows(0, len), d = flat.rows(k, len);
    be.upload(s, src + k);
    be.convert(s, d);
  }
}

}  // namespace

std::vector<std::vector<float>> Mamba2LM::params_to_host() {
  SSD_CHECK(!master_in_shards_, "the master weights are in ZeRO-1 shards: gather them with "
            "GradSync::params_to_root");
  std::vector<std::vector<float>> out;
  for (auto& p : params_) {
    out.emplace_back(p.numel());
    if (p.dtype == DType::F32) {
      be_.download(out.back().data(), p);
    } else {  // f64 (gradient-check models): go through a host f64 buffer
      std::vector<double> tmp(p.numel());
      be_.download(tmp.data(), p);
      for (size_t i = 0; i < tmp.size(); ++i) out.back()[i] = static_cast<float>(tmp[i]);
    }
  }
  return out;
}

void Mamba2LM::params_from_host(const std::vector<std::vector<float>>& values) {
  SSD_CHECK(values.size() == params_.size());
  SSD_CHECK(!master_in_shards_ || master_loader_,
            "internal: the master weights are in shards but nothing keeps them (GradSync)");
  for (size_t i = 0; i < params_.size(); ++i) {
    SSD_CHECK(static_cast<int64_t>(values[i].size()) == compute_[i].numel(), table_[i].name);
    // With the master in shards, what the forward reads: compute_ (= params_ for non-GEMM).
    upload_values(be_, master_in_shards_ ? compute_[i] : params_[i], values[i].data());
  }
  if (master_in_shards_)
    master_loader_(values);
  else
    refresh_compute_weights();
}

std::vector<HostTensor> Mamba2LM::named_params_to_host() {
  SSD_CHECK(tpd_.tp == 1, "named_params_to_host of a tensor-parallel model: use gather_full");
  auto values = params_to_host();
  std::vector<HostTensor> out;
  for (size_t i = 0; i < table_.size(); ++i)
    out.push_back({table_[i].name, table_[i].shape, std::move(values[i])});
  return out;
}

void Mamba2LM::load_params(const std::vector<HostTensor>& tensors) {
  SSD_CHECK(tensors.size() == table_.size(), "got ", tensors.size(), " tensors");
  std::vector<std::vector<float>> values;
  for (size_t i = 0; i < tensors.size(); ++i) {
    SSD_CHECK(tensors[i].name == table_[i].name, tensors[i].name, " where ", table_[i].name,
              " belongs");
    SSD_CHECK(static_cast<int64_t>(tensors[i].data.size()) == shape_numel(table_[i].shape),
              table_[i].name);
    if (tpd_.tp == 1) {
      values.push_back(tensors[i].data);
    } else {
      values.emplace_back(shape_numel(shards_[i].local_shape));
      shards_[i].to_local(tensors[i].data.data(), values.back().data());
    }
  }
  params_from_host(values);
}

void Mamba2LM::refresh_compute_weights() {
  SSD_CHECK(!master_in_shards_, "internal: refresh_compute_weights with the master in shards");
  // Every parameter in one conversion (the GEMMs read only their own weights' part of it).
  if (compute_flat_.data != param_flat_.data) be_.convert(param_flat_, compute_flat_);
}

void Mamba2LM::zero_grads() { be_.zero(grad_flat_); }

int64_t Mamba2LM::non_gemm_bytes() const {
  int64_t n = 0;
  for (size_t i = 0; i < table_.size(); ++i)
    if (!table_[i].gemm_weight) n += shape_numel(shards_[i].local_shape);
  return n * static_cast<int64_t>(dtype_size(be_.accum_dtype()));
}

Tensor Mamba2LM::new_stats() {
  Tensor s = be_.alloc({3}, DType::F64);
  be_.zero(s);
  return s;
}

std::array<double, 3> Mamba2LM::read_stats(const Tensor& stats) {
  std::array<double, 3> out{};
  be_.download(out.data(), stats);
  return out;
}

SsdDims Mamba2LM::ssd_dims() const {
  SsdDims d;
  d.batch = batch_;
  d.seqlen = seqlen_;
  d.nheads = tpd_.nheads;
  d.headdim = cfg_.headdim;
  d.ngroups = tpd_.ngroups;
  d.dstate = cfg_.d_state;
  d.chunk = cfg_.chunk_size;
  return d;
}

SsdInputs Mamba2LM::ssd_inputs(int i, LayerActs& a) {
  const auto& p = lp_[i];
  SsdInputs in;
  in.xBC = a.xBC;
  in.dt = cols(a.zxbcdt, tpd_.d_inner + tpd_.conv_dim, tpd_.nheads);
  in.dt_bias = params_[p.dt_bias];
  in.A_log = params_[p.A_log];
  in.D = params_[p.D];
  if (a.ssd_saved.defined()) in.saved = &a.ssd_saved;
  if (cp_ && cp_rank_ > 0) in.initial_state = &cp_init_[i];
  in.reset = reset();  // a reset at our first token also drops the incoming state
  return in;
}

void Mamba2LM::upload_tokens(const int32_t* tokens, const int32_t* targets,
                             const int32_t* reset) {
  be_.upload(tokens_, tokens);
  if (targets) be_.upload(targets_, targets);
  has_reset_ = reset != nullptr;
  if (!reset) return;
  be_.upload(reset_, reset);
  if (!cp_) return;
  // Context parallelism: the conv of our first tokens reads the previous rank's last d_conv-1
  // inputs, and a document may begin among them, so their flags come from that rank (once per
  // micro-batch; every layer's halo shares them).
  const int64_t H = cfg_.d_conv - 1, L = seqlen_;
  std::vector<int32_t> halo(batch_ * H, 0);
  if (cp_rank_ + 1 < cp_size_) {
    for (int64_t b = 0; b < batch_; ++b)
      std::copy_n(reset + b * L + L - H, H, halo.begin() + b * H);
    be_.upload(cp_flags_send_, halo.data());
    cp_->send(cp_flags_send_.data, cp_flags_send_.numel(), DType::I32, cp_rank_ + 1);
  }
  if (cp_rank_ > 0)
    cp_->recv(cp_flags_recv_.data, cp_flags_recv_.numel(), DType::I32, cp_rank_ - 1);
  cp_->join();
  if (cp_rank_ == 0) return;
  be_.download(halo.data(), cp_flags_recv_);
  std::vector<int32_t> ext(batch_ * (L + H));  // per sequence: the halo's flags, then ours
  for (int64_t b = 0; b < batch_; ++b) {
    std::copy_n(halo.begin() + b * H, H, ext.begin() + b * (L + H));
    std::copy_n(reset + b * L, L, ext.begin() + b * (L + H) + H);
  }
  be_.upload(reset_ext_, ext.data());
}

void Mamba2LM::layer_forward(int i, bool with_output, bool exchange) {
  const double eps = cfg_.norm_eps;
  const int64_t Di = tpd_.d_inner;
  auto& a = acts(i);
  const auto& p = lp_[i];
  const Tensor* res_in = i == 0 ? nullptr : &residual_[i - 1];
  if (sp_) {  // the norm on this rank's tokens, then every token for the column-parallel in_proj
    be_.add_rmsnorm_fwd(input(i), res_in, params_[p.norm], eps, residual_[i], sp_hidden_, a.rstd);
    sp_gather(sp_hidden_, a.hidden);
  } else {
    be_.add_rmsnorm_fwd(input(i), res_in, params_[p.norm], eps, residual_[i], a.hidden, a.rstd);
  }
  be_.linear_fwd(a.hidden, w(p.in_proj), a.zxbcdt);
  conv_forward(i, a, exchange);
  // Context parallelism: start from the state the previous segment ended with (the ring: from
  // the previous rank, which then waits for ours; the all-gather: scanned from every earlier
  // rank's summary).
  const bool ring = cp_ && cp_combine_ == CpCombine::Ring;
  const bool hand_on = ring && exchange && cp_rank_ + 1 < cp_size_;
  if (ring && exchange && cp_rank_ > 0) {
    cp_->recv(cp_init_[i].data, cp_init_[i].numel(), cp_init_[i].dtype, cp_rank_ - 1);
    cp_->join();
  }
  if (cp_ && !ring && exchange) cp_gather_state(i, a);
  be_.ssd_fwd(ssd_dims(), ssd_inputs(i, a), a.y, hand_on ? &cp_final_ : nullptr);
  if (hand_on) {
    cp_->send(cp_final_.data, cp_final_.numel(), cp_final_.dtype, cp_rank_ + 1);
    cp_->join();
  }
  be_.gated_rmsnorm_fwd(a.y, cols(a.zxbcdt, 0, Di), params_[p.gnorm], tpd_.norm_group, eps,
                        a.ynorm, a.grstd, span_ ? &nspan_ : nullptr);
  if (!with_output) return;
  if (!tp_) {
    be_.linear_fwd(a.ynorm, w(p.out_proj), input(i + 1));
    return;
  }
  // Row-parallel out_proj: each rank's heads give a part of the output; their sum is it.
  Tensor& out = input(i + 1);
  if (sp_) {  // summed and scattered: each rank keeps its tokens' rows
    be_.linear_fwd(a.ynorm, w(p.out_proj), tp_red_);
    sp_reduce_scatter(tp_red_, out);
  } else if (out.dtype == tp_red_.dtype) {
    be_.linear_fwd(a.ynorm, w(p.out_proj), out);
    tp_sum(out);
  } else {  // sum the fp32 parts, round once (as the tp = 1 GEMM does)
    be_.linear_fwd(a.ynorm, w(p.out_proj), tp_red_);
    tp_->all_reduce(tp_red_);
    tp_->join();
    be_.convert(tp_red_, out);
  }
}

void Mamba2LM::build_conv_ext(int i, LayerActs& a) {
  const int64_t H = cfg_.d_conv - 1, L = seqlen_;
  const ColSlice pre = cols(a.zxbcdt, tpd_.d_inner, tpd_.conv_dim);
  for (int64_t b = 0; b < batch_; ++b) {
    be_.copy_rows(all_cols(cp_halo_[i]), b * H, all_cols(cp_ext_), b * (L + H), H, false);
    be_.copy_rows(pre, b * L, all_cols(cp_ext_), b * (L + H) + H, L, false);
  }
}

void Mamba2LM::conv_forward(int i, LayerActs& a, bool exchange) {
  const auto& p = lp_[i];
  const ColSlice pre = cols(a.zxbcdt, tpd_.d_inner, tpd_.conv_dim);
  if (cp_ && exchange) {
    // The last d_conv-1 inputs of every sequence go to the next rank; ours come from the last.
    const int64_t H = cfg_.d_conv - 1, L = seqlen_;
    if (cp_rank_ + 1 < cp_size_) {
      for (int64_t b = 0; b < batch_; ++b)
        be_.copy_rows(pre, b * L + L - H, all_cols(cp_send_), b * H, H, false);
      cp_->send(cp_send_.data, cp_send_.numel(), cp_send_.dtype, cp_rank_ + 1);
    }
    if (cp_rank_ > 0)
      cp_->recv(cp_halo_[i].data, cp_halo_[i].numel(), cp_halo_[i].dtype, cp_rank_ - 1);
    cp_->join();
  }
  if (!cp_ || cp_rank_ == 0) {  // the sequence's start: zero history, the plain causal conv
    be_.conv1d_silu_fwd(pre, batch_, seqlen_, params_[p.conv_w], params_[p.conv_b], a.xBC,
                        reset());
    return;
  }
  const int64_t H = cfg_.d_conv - 1, L = seqlen_;
  build_conv_ext(i, a);
  be_.conv1d_silu_fwd(all_cols(cp_ext_), batch_, L + H, params_[p.conv_w], params_[p.conv_b],
                      cp_ext_out_, reset_ext());
  for (int64_t b = 0; b < batch_; ++b)
    be_.copy_rows(all_cols(cp_ext_out_), b * (L + H) + H, all_cols(a.xBC), b * L, L, false);
}

void Mamba2LM::conv_backward(int i, LayerActs& a) {
  const auto& p = lp_[i];
  const int64_t Di = tpd_.d_inner, conv_dim = tpd_.conv_dim;
  const ColSlice pre = cols(a.zxbcdt, Di, conv_dim);
  ColSlice din = cols(d_zxbcdt_, Di, conv_dim);
  const int64_t H = cfg_.d_conv - 1, L = seqlen_;
  if (!cp_ || cp_rank_ == 0) {
    be_.conv1d_silu_bwd(pre, batch_, seqlen_, params_[p.conv_w], params_[p.conv_b], d_xBC_, din,
                        grads_[p.conv_w], grads_[p.conv_b], reset());
  } else {
    // The halo rows' outputs belong to the previous rank: their output gradient is zero here.
    build_conv_ext(i, a);
    be_.zero(cp_ext_out_);
    for (int64_t b = 0; b < batch_; ++b)
      be_.copy_rows(all_cols(d_xBC_), b * L, all_cols(cp_ext_out_), b * (L + H) + H, L, false);
    ColSlice dext = all_cols(cp_ext_grad_);
    be_.conv1d_silu_bwd(all_cols(cp_ext_), batch_, L + H, params_[p.conv_w], params_[p.conv_b],
                        cp_ext_out_, dext, grads_[p.conv_w], grads_[p.conv_b], reset_ext());
    for (int64_t b = 0; b < batch_; ++b) {
      be_.copy_rows(dext, b * (L + H) + H, din, b * L, L, false);
      be_.copy_rows(dext, b * (L + H), all_cols(cp_send_), b * H, H, false);
    }
    // The halo's gradient goes back to the rank whose inputs it was.
    cp_->send(cp_send_.data, cp_send_.numel(), cp_send_.dtype, cp_rank_ - 1);
  }
  if (cp_ && cp_rank_ + 1 < cp_size_) {
    cp_->recv(cp_recv_.data, cp_recv_.numel(), cp_recv_.dtype, cp_rank_ + 1);
    cp_->join();
    for (int64_t b = 0; b < batch_; ++b)
      be_.copy_rows(all_cols(cp_recv_), b * H, din, b * L + L - H, H, true);
  } else if (cp_) {
    cp_->join();
  }
}

void Mamba2LM::cp_scan(bool reverse, Tensor& out) {
  cp_->all_gather(cp_summary_.data, cp_gathered_.data, cp_summary_.numel(), cp_summary_.dtype);
  cp_->join();
  be_.cp_state_scan(ssd_dims(), cp_gathered_, cp_rank_, reverse, out);
}

void Mamba2LM::cp_gather_state(int i, LayerActs& a) {
  // Our summary from a zero start (the last rank's reaches no one: its row is not read).
  SsdInputs in = ssd_inputs(i, a);
  in.initial_state = nullptr;
  in.saved = nullptr;
  if (cp_rank_ + 1 < cp_size_) {
    be_.ssd_final_state(ssd_dims(), in, cp_sum_state_);
    be_.ssd_segment_decay(ssd_dims(), in, cp_sum_decay_);
  }
  cp_scan(false, cp_init_[i]);  // rank 0: zero, and not used
}

const Tensor* Mamba2LM::cp_gather_state_grad(int i, LayerActs& a) {
  // D_r: our entering state's gradient through our outputs alone (rank 0's is no one's), with
  // the decay that carries the later ranks' gradients through our segment.
  const SsdInputs in = ssd_inputs(i, a);
  if (cp_rank_ > 0) {
    be_.ssd_dinitial(ssd_dims(), in, d_y_, nullptr, cp_sum_state_);
    be_.ssd_segment_decay(ssd_dims(), in, cp_sum_decay_);
  }
  cp_scan(true, cp_dfinal_);
  return cp_rank_ + 1 < cp_size_ ? &cp_dfinal_ : nullptr;
}

int64_t Mamba2LM::cp_state_bytes_per_layer() const {
  if (!cp_) return 0;
  if (cp_combine_ == CpCombine::Ring) return 2 * static_cast<int64_t>(cp_final_.nbytes());
  return 2 * (cp_size_ - 1) * static_cast<int64_t>(cp_summary_.nbytes());
}

void Mamba2LM::set_context_parallel(Communicator* cp, CpCombine combine) {
  cp_ = cp && cp->size() > 1 ? cp : nullptr;
  cp_combine_ = combine;
  if (!cp_) return;
  cp_rank_ = cp_->rank();
  cp_size_ = cp_->size();
  const int64_t H = cfg_.d_conv - 1, L = seqlen_;
  if (L < H || L % cfg_.chunk_size != 0)
    fail("context parallelism: each segment (", L, " tokens) must be a multiple of "
         "model.chunk_size (", cfg_.chunk_size, ") and at least model.d_conv - 1 long");
  const DType acc = be_.accum_dtype(), cmp = be_.compute_dtype();
  const Shape st = {batch_, tpd_.nheads, cfg_.headdim, cfg_.d_state};
  for (int i = 0; i < cfg_.n_layer; ++i) {
    cp_init_.push_back(be_.alloc(st, acc));
    be_.zero(cp_init_.back());
    cp_halo_.push_back(be_.alloc({batch_ * H, tpd_.conv_dim}, cmp));
    be_.zero(cp_halo_.back());
  }
  cp_final_ = be_.alloc(st, acc);
  cp_dfinal_ = be_.alloc(st, acc);
  cp_dinit_ = be_.alloc(st, acc);
  for (Tensor* t : {&cp_ext_, &cp_ext_out_, &cp_ext_grad_})
    *t = be_.alloc({batch_ * (L + H), tpd_.conv_dim}, cmp);
  cp_send_ = be_.alloc({batch_ * H, tpd_.conv_dim}, cmp);
  cp_recv_ = be_.alloc({batch_ * H, tpd_.conv_dim}, cmp);
  reset_ext_ = be_.alloc({batch_ * (L + H)}, DType::I32);
  cp_flags_send_ = be_.alloc({batch_ * H}, DType::I32);
  cp_flags_recv_ = be_.alloc({batch_ * H}, DType::I32);
  if (cp_combine_ == CpCombine::AllGather) {
    const int64_t S = shape_numel(st), G = batch_ * tpd_.nheads;
    cp_summary_ = be_.alloc({S + G}, acc);
    be_.zero(cp_summary_);  // the rows no rank fills stay finite (the scans skip them anyway)
    cp_sum_state_ = cp_summary_.rows(0, S).view(st);
    cp_sum_decay_ = cp_summary_.rows(S, G).view({batch_, tpd_.nheads});
    cp_gathered_ = be_.alloc({cp_size_, S + G}, acc);
  }
}

void Mamba2LM::forward() {
  if (sp_) {  // the lookups of the vocabulary slices, summed and scattered by tokens
    be_.embedding_fwd(tokens_, w(emb_), sp_full_, &vshard_);
    if (sp_full_.dtype == tp_red_.dtype) {
      sp_reduce_scatter(sp_full_, input(0));
    } else {
      be_.convert(sp_full_, tp_red_);
      sp_reduce_scatter(tp_red_, input(0));
    }
  } else if (tp_) {  // each rank looks up its vocabulary rows (zeros elsewhere): the sum is the lookup
    be_.embedding_fwd(tokens_, w(emb_), input(0), &vshard_);
    tp_sum(input(0));
  } else {
    be_.embedding_fwd(tokens_, w(emb_), input(0));
  }
  for (int i = 0; i < cfg_.n_layer; ++i) layer_forward(i, true);
  be_.add_rmsnorm_fwd(x_, &residual_.back(), params_[norm_f_], cfg_.norm_eps, res_f_,
                      sp_ ? sp_hidden_ : hidden_f_, rstd_f_);
  if (sp_) sp_gather(sp_hidden_, hidden_f_);  // the vocabulary-parallel head needs every token
}

void Mamba2LM::forward_loss(const int32_t* tokens, const int32_t* targets, Tensor& stats,
                            const int32_t* reset) {
  upload_tokens(tokens, targets, reset);
  forward();
  be_.lm_head_ce(hidden_f_, w(emb_), targets_, 1.0, stats, nullptr, nullptr,
                 tp_ ? &vshard_ : nullptr);
}

std::vector<float> Mamba2LM::logits(const int32_t* tokens, const int32_t* reset) {
  SSD_CHECK(tpd_.tp == 1, "logits of a tensor-parallel model");
  upload_tokens(tokens, nullptr, reset);
  forward();
  const int64_t V = cfg_.padded_vocab();
  Tensor out = be_.alloc({T_, V}, be_.compute_dtype());
  be_.linear_fwd(hidden_f_, w(emb_), out);
  Tensor out_acc = be_.alloc({T_, V}, be_.accum_dtype());
  be_.convert(out, out_acc);
  std::vector<float> result(T_ * V);
  if (out_acc.dtype == DType::F32) {
    be_.download(result.data(), out_acc);
  } else {
    std::vector<double> tmp(T_ * V);
    be_.download(tmp.data(), out_acc);
    for (size_t i = 0; i < tmp.size(); ++i) result[i] = static_cast<float>(tmp[i]);
  }
  return result;
}

void Mamba2LM::forward_backward(const int32_t* tokens, const int32_t* targets,
                                double grad_scale, Tensor& stats, const int32_t* reset) {
  upload_tokens(tokens, targets, reset);
  forward();
  const int64_t Di = tpd_.d_inner;
  const int64_t conv_dim = tpd_.conv_dim;
  // Tensor parallelism: the hidden-state gradients (of the LM head, of each in_proj) are
  // per-rank parts, summed over the group in accum dtype in tp_red_.
  Tensor& dh = tp_ ? tp_red_ : d_hidden_;

  // Head + loss: dh = dL/d hidden_f.
  be_.lm_head_ce(hidden_f_, w(emb_), targets_, grad_scale, stats, &dh, &grads_[emb_],
                 tp_ ? &vshard_ : nullptr);
  // The summed hidden-state gradient of this rank's tokens: dh itself, or (sequence
  // parallelism) its rows of dh reduce-scattered into sp_red_.
  auto sum_dh = [&]() -> Tensor& {
    if (sp_) {
      sp_reduce_scatter(dh, sp_red_);
      return sp_red_;
    }
    if (tp_) {
      tp_->all_reduce(dh);
      tp_->join();
    }
    return dh;
  };
  // The residual stream's gradient, ping-ponged between two buffers: d_res_[cur] holds
  // dL/d residual after layer i's add, which is also dL/d (mixer output of layer i-1).
  int cur = 0;
  be_.add_rmsnorm_bwd(sum_dh(), nullptr, res_f_, params_[norm_f_], rstd_f_, d_res_[cur],
                      grads_[norm_f_]);
  sp_sum_norm_grad(norm_f_);
  ready(0);
  for (int i = cfg_.n_layer - 1; i >= 0; --i) {
    // Recomputation: the layer's activations again, from its saved input and residual (same
    // inputs, same ops: the same values). The residual it rewrites is unchanged.
    if (recompute_) layer_forward(i, false, false);
    auto& a = acts(i);
    const auto& p = lp_[i];
    // Mixer output gradient in compute dtype.
    const Tensor* dout = &d_res_[cur];
    if (d_x_.defined()) {
      be_.convert(d_res_[cur], d_x_);
      dout = &d_x_;
    }
    if (sp_) {  // out_proj's output was scattered by tokens: its gradient is gathered back
      sp_gather(*dout, sp_full_);
      dout = &sp_full_;
    }
    be_.linear_bwd(a.ynorm, w(p.out_proj), *dout, &d_ynorm_, grads_[p.out_proj]);
    ColSlice dz = cols(d_zxbcdt_, 0, Di);
    be_.gated_rmsnorm_bwd(d_ynorm_, a.y, cols(a.zxbcdt, 0, Di), params_[p.gnorm],
                          tpd_.norm_group, a.grstd, d_y_, dz, grads_[p.gnorm],
                          span_ ? &nspan_ : nullptr);
    SsdGrads g;
    g.dxBC = d_xBC_;
    g.ddt = cols(d_zxbcdt_, Di + conv_dim, tpd_.nheads);
    g.d_dt_bias = grads_[p.dt_bias];
    g.dA_log = grads_[p.A_log];
    g.dD = grads_[p.D];
    // Context parallelism: the gradient of the state we ended with, from the next rank (the
    // ring, which then sends the gradient of the state we started from to the previous one) or
    // scanned from every later rank's (the all-gather).
    const bool ring = cp_ && cp_combine_ == CpCombine::Ring;
    const Tensor* dfinal = nullptr;
    if (ring && cp_rank_ + 1 < cp_size_) {
      cp_->recv(cp_dfinal_.data, cp_dfinal_.numel(), cp_dfinal_.dtype, cp_rank_ + 1);
      cp_->join();
      dfinal = &cp_dfinal_;
    }
    if (cp_ && !ring) dfinal = cp_gather_state_grad(i, a);
    if (ring && cp_rank_ > 0) g.d_initial_state = &cp_dinit_;
    be_.ssd_bwd(ssd_dims(), ssd_inputs(i, a), d_y_, dfinal, g);
    if (ring && cp_rank_ > 0) {
      cp_->send(cp_dinit_.data, cp_dinit_.numel(), cp_dinit_.dtype, cp_rank_ - 1);
      cp_->join();
    }
    conv_backward(i, a);
    be_.linear_bwd(a.hidden, w(p.in_proj), d_zxbcdt_, &dh, grads_[p.in_proj]);
    Tensor& dhl = sum_dh();
    if (tp_) reduce_shared_grads(i);
    // Through this layer's add + norm: the residual gradient before layer i.
    be_.add_rmsnorm_bwd(dhl, &d_res_[cur], residual_[i], params_[p.norm], a.rstd,
                        d_res_[1 - cur], grads_[p.norm]);
    sp_sum_norm_grad(p.norm);
    cur = 1 - cur;
    ready(1 + static_cast<int>(cfg_.n_layer - 1 - i));
  }
  const Tensor* demb = &d_res_[cur];
  if (d_x_.defined()) {
    be_.convert(d_res_[cur], d_x_);
    demb = &d_x_;
  }
  if (sp_) {  // every token's gradient, for this rank's vocabulary rows
    sp_gather(*demb, sp_full_);
    demb = &sp_full_;
  }
  be_.embedding_bwd(tokens_, *demb, grads_[emb_], tp_ ? &vshard_ : nullptr);
  ready(static_cast<int>(cfg_.n_layer) + 1);
}

}  // namespace ssd
