#include "model/params.h"

#include <algorithm>
#include <cmath>

#include "core/rng.h"
#include "dist/comm.h"

namespace ssd {

std::vector<ParamSpec> param_table(const ModelConfig& m) {
  std::vector<ParamSpec> t;
  const int64_t V = m.padded_vocab(), D = m.d_model, Di = m.d_inner(), H = m.nheads();
  const int64_t conv_dim = m.conv_dim();
  t.push_back({"embedding.weight", {V, D}, Init::Normal002, 0, true, true, Shard::Vocab, -1});
  for (int i = 0; i < m.n_layer; ++i) {
    std::string p = "layers." + std::to_string(i) + ".";
    t.push_back({p + "norm.weight", {D}, Init::Ones, 0, false, false, Shard::Replicated, i});
    p += "mixer.";
    t.push_back({p + "in_proj.weight", {m.d_in_proj(), D}, Init::UniformFanIn, D, true, true,
                 Shard::InProj, i});
    t.push_back({p + "conv1d.weight", {conv_dim, 1, m.d_conv}, Init::UniformFanIn, m.d_conv,
                 true, false, Shard::ConvChannels, i});
    t.push_back({p + "conv1d.bias", {conv_dim}, Init::UniformFanIn, m.d_conv, false, false,
                 Shard::ConvChannels, i});
    t.push_back({p + "dt_bias", {H}, Init::DtBias, 0, false, false, Shard::Heads, i});
    t.push_back({p + "A_log", {H}, Init::ALog, 0, false, false, Shard::Heads, i});
    t.push_back({p + "D", {H}, Init::Ones, 0, false, false, Shard::Heads, i});
    t.push_back({p + "norm.weight", {Di}, Init::Ones, 0, false, false, Shard::Heads, i});
    t.push_back({p + "out_proj.weight", {D, Di}, Init::UniformFanInDepth, Di, true, true,
                 Shard::OutProjRows, i});
  }
  t.push_back({"norm_f.weight", {D}, Init::Ones, 0, false, false, Shard::Replicated, -1});
  return t;
}

void init_param(const ParamSpec& spec, const ModelConfig& m, uint64_t seed, float* out) {
  Rng rng(seed ^ hash_name(spec.name));
  const int64_t n = shape_numel(spec.shape);
  switch (spec.init) {
    case Init::Normal002:
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(0.02 * rng.normal());
      break;
    case Init::UniformFanIn:
    case Init::UniformFanInDepth: {
      double bound = 1.0 / std::sqrt(static_cast<double>(spec.fan_in));
      double scale = spec.init == Init::UniformFanInDepth ? 1.0 / std::sqrt(double(m.n_layer)) : 1.0;
      for (int64_t i = 0; i < n; ++i)
        out[i] = static_cast<float>(rng.uniform(-bound, bound) * scale);
      break;
    }
    case Init::DtBias: {
      const double lo = std::log(1e-3), hi = std::log(1e-1), floor = 1e-4;
      for (int64_t i = 0; i < n; ++i) {
        double dt = std::max(std::exp(rng.uniform(lo, hi)), floor);
        out[i] = static_cast<float>(dt + std::log(-std::expm1(-dt)));  // softplus^-1(dt)
      }
      break;
    }
    case Init::ALog:
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(std::log(rng.uniform(1.0, 16.0)));
      break;
    case Init::Ones:
      for (int64_t i = 0; i < n; ++i) out[i] = 1.0f;
      break;
  }
}

std::vector<HostTensor> param_shapes(const std::vector<ParamSpec>& table) {
  std::vector<HostTensor> out;
  for (const auto& s : table) out.push_back({s.name, s.shape, {}});
  return out;
}

int64_t count_params(const std::vector<ParamSpec>& table) {
  int64_t n = 0;
  for (const auto& p : table) n += shape_numel(p.shape);
  return n;
}

TpDims tp_dims(const ModelConfig& m, int64_t tp, int64_t rank) {
  TpDims d;
  d.tp = tp;
  d.rank = rank;
  const int64_t H = m.nheads(), G = m.ngroups, V = m.padded_vocab(), N = m.d_state;
  if (H % tp != 0 || (G % tp != 0 && tp % G != 0) || V % tp != 0 || rank < 0 || rank >= tp)
    fail("parallel.tp=", tp, " does not split this model (", H, " heads, model.ngroups=", G,
         ", padded vocabulary ", V, ")");
  d.span = G % tp == 0 ? 1 : tp / G;
  d.nheads = H / tp;
  d.ngroups = G % tp == 0 ? G / tp : 1;
  d.d_inner = d.nheads * m.headdim;
  d.conv_dim = d.d_inner + 2 * d.ngroups * N;
  d.d_in_proj = 2 * d.d_inner + 2 * d.ngroups * N + d.nheads;
  d.vocab = V / tp;
  d.head0 = rank * d.nheads;
  d.group0 = G % tp == 0 ? rank * d.ngroups : rank / d.span;
  d.vocab0 = rank * d.vocab;
  d.norm_group = m.d_inner() / G / d.span;
  return d;
}

ShardLayout shard_layout(const ParamSpec& spec, const TpDims& d, const ModelConfig& m) {
  ShardLayout s;
  s.full_shape = spec.shape;
  s.local_shape = spec.shape;
  const int64_t rows = spec.shape[0];
  if (d.tp == 1) {
    s.blocks = {{0, 0, rows, false}};
    return s;
  }
  const int64_t Di = m.d_inner(), Dl = d.d_inner, GN = m.ngroups * m.d_state;
  const int64_t gn = d.ngroups * m.d_state, g0 = d.group0 * m.d_state;
  const bool shared = d.span > 1;
  switch (spec.shard) {
    case Shard::Replicated:
      s.blocks = {{0, 0, rows, false}};
      s.replicas = d.tp;
      break;
    case Shard::InProj:  // [z | x | B | C | dt] rows
      s.blocks = {{d.rank * Dl, 0, Dl, false},
                  {Di + d.rank * Dl, Dl, Dl, false},
                  {2 * Di + g0, 2 * Dl, gn, shared},
                  {2 * Di + GN + g0, 2 * Dl + gn, gn, shared},
                  {2 * Di + 2 * GN + d.head0, 2 * Dl + 2 * gn, d.nheads, false}};
      s.local_shape[0] = d.d_in_proj;
      break;
    case Shard::ConvChannels:  // [x | B | C] channels
      s.blocks = {{d.rank * Dl, 0, Dl, false},
                  {Di + g0, Dl, gn, shared},
                  {Di + GN + g0, Dl + gn, gn, shared}};
      s.local_shape[0] = d.conv_dim;
      break;
    case Shard::Heads:
    case Shard::Vocab: {
      const int64_t n = rows / d.tp;
      s.blocks = {{d.rank * n, 0, n, false}};
      s.local_shape[0] = n;
      break;
    }
    case Shard::OutProjRows:  // [d_model, d_inner]: this rank's input columns
      SSD_CHECK(spec.shape.size() == 2);
      s.blocks = {{0, 0, rows, false}};
      s.col0 = d.rank * Dl;
      s.cols = Dl;
      s.local_shape[1] = Dl;
      break;
  }
  return s;
}

void ShardLayout::to_local(const float* full, float* local) const {
  const int64_t row = shape_numel(full_shape) / std::max<int64_t>(1, full_shape[0]);
  if (cols > 0) {
    for (int64_t r = 0; r < full_shape[0]; ++r)
      std::copy_n(full + r * row + col0, cols, local + r * cols);
    return;
  }
  for (const auto& b : blocks)
    std::copy_n(full + b.full_row * row, b.rows * row, local + b.local_row * row);
}

void ShardLayout::to_full(const float* local, float* full) const {
  const int64_t row = shape_numel(full_shape) / std::max<int64_t>(1, full_shape[0]);
  if (cols > 0) {
    for (int64_t r = 0; r < full_shape[0]; ++r)
      std::copy_n(local + r * cols, cols, full + r * row + col0);
    return;
  }
  for (const auto& b : blocks)
    std::copy_n(local + b.local_row * row, b.rows * row, full + b.full_row * row);
}

std::vector<ShardLayout::CountedRange> ShardLayout::counted_ranges(int64_t span) const {
  const int64_t n = shape_numel(local_shape);
  if (replicas > 1 || cols > 0) return {{0, n, replicas}};
  const int64_t row = n / std::max<int64_t>(1, local_shape[0]);
  std::vector<CountedRange> out;
  for (const auto& b : blocks) out.push_back({b.local_row * row, b.rows * row, b.shared ? span : 1});
  return out;
}

std::vector<float> gather_full(Communicator& tp, const ParamSpec& spec, const ModelConfig& m,
                               const std::vector<float>& local) {
  const int64_t size = tp.size(), me = tp.rank();
  if (me != 0) {
    tp.send(local.data(), static_cast<int64_t>(local.size()), DType::F32, 0);
    return {};
  }
  std::vector<float> full(shape_numel(spec.shape), 0.f);
  shard_layout(spec, tp_dims(m, size, 0), m).to_full(local.data(), full.data());
  std::vector<float> part;
  for (int64_t q = 1; q < size; ++q) {
    const ShardLayout sl = shard_layout(spec, tp_dims(m, size, q), m);
    part.resize(shape_numel(sl.local_shape));
    tp.recv(part.data(), static_cast<int64_t>(part.size()), DType::F32, static_cast<int>(q));
    sl.to_full(part.data(), full.data());
  }
  return full;
}

std::vector<std::vector<float>> gather_full(Communicator& tp, const std::vector<ParamSpec>& table,
                                            const ModelConfig& m,
                                            const std::vector<std::vector<float>>& local) {
  SSD_CHECK(local.size() == table.size());
  std::vector<std::vector<float>> full;
  for (size_t i = 0; i < table.size(); ++i) {
    std::vector<float> t = gather_full(tp, table[i], m, local[i]);
    if (tp.rank() == 0) full.push_back(std::move(t));
  }
  return full;
}

}  // namespace ssd
