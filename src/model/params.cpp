#include "model/params.h"

#include <cmath>

#include "core/rng.h"

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

}  // namespace ssd
