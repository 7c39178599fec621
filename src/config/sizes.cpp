#include "config/sizes.h"

#include <unistd.h>

#include <cstdio>
#include <string>

#include "core/error.h"

namespace ssd {
namespace {

std::string human_bytes(long double b) {
  char buf[64];
  if (b >= 1099511627776.0L * 1024) std::snprintf(buf, sizeof buf, "%.3Lg bytes", b);
  else if (b >= 1073741824.0L) std::snprintf(buf, sizeof buf, "%.1Lf GiB", b / 1073741824.0L);
  else std::snprintf(buf, sizeof buf, "%.1Lf MiB", b / 1048576.0L);
  return buf;
}

std::string count_str(long double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3Lg", x);
  return buf;
}

std::string model_keys(const ModelConfig& m) {
  return "model.d_model=" + std::to_string(m.d_model) + ", model.n_layer=" +
         std::to_string(m.n_layer) + ", model.expand=" + std::to_string(m.expand) +
         ", model.d_state=" + std::to_string(m.d_state) + ", model.ngroups=" +
         std::to_string(m.ngroups) + ", model.vocab_size=" + std::to_string(m.vocab_size);
}

std::string batch_keys(const Config& c) {
  return "train.micro_batch=" + std::to_string(c.train.micro_batch) +
         ", train.seq_len=" + std::to_string(c.train.seq_len) + ", " + model_keys(c.model);
}

}  // namespace

SizeEstimate estimate_sizes(const Config& c) {
  using LD = long double;
  const auto& m = c.model;
  const LD d = m.d_model, layers = m.n_layer, di = LD(m.expand) * d, n = m.d_state;
  const LD g = m.ngroups, heads = m.headdim > 0 ? di / m.headdim : di, k = m.d_conv;
  const LD mult = m.pad_vocab_size_multiple > 0 ? m.pad_vocab_size_multiple : 1;
  const LD vocab = (LD(m.vocab_size) + mult - 1) / mult * mult;
  const LD conv = di + 2 * g * n, in_proj = 2 * di + 2 * g * n + heads;
  // Per layer: in_proj, conv weight + bias, dt_bias/A_log/D, gated norm, out_proj, block norm.
  const LD per_layer = d * in_proj + conv * k + conv + 3 * heads + di + di * d + d;
  SizeEstimate e;
  e.params = vocab * d + layers * per_layer + d;
  e.param_state_bytes = e.params * 4 * 4;
  // Kept per layer and token: in_proj output, conv output, SSD output, gated norm, residual.
  const LD tokens = LD(c.train.micro_batch) * LD(c.train.seq_len);
  e.activation_bytes = tokens * layers * (in_proj + 2 * conv + 3 * di + 4 * d) * 4;
  return e;
}

void check_sizes_sane(const Config& c) {
  const SizeEstimate e = estimate_sizes(c);
  if (e.param_state_bytes > kMaxConfigBytes)
    fail("config keys ", model_keys(c.model), ": the model would have about ",
         count_str(e.params), " parameters, ", human_bytes(e.param_state_bytes),
         " with gradients and AdamW moments (more than any machine holds; is a size mistyped?)");
  if (e.activation_bytes > kMaxConfigBytes)
    fail("config keys ", batch_keys(c), ": one micro-batch would keep about ",
         human_bytes(e.activation_bytes),
         " of activations (more than any machine holds; is a size mistyped?)");
}

void check_fits_host_memory(const Config& c, bool on_cpu) {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return;  // unknown: nothing to compare with
  const long double host = static_cast<long double>(pages) * page;
  const SizeEstimate e = estimate_sizes(c);
  // On a GPU the host holds parameters and both moments for each checkpoint (3 x fp32).
  const long double need =
      on_cpu ? e.param_state_bytes + e.activation_bytes : e.params * 4 * 3;
  if (need > host)
    fail("config keys ", on_cpu ? batch_keys(c) : model_keys(c.model), ": ",
         on_cpu ? "training on the CPU" : "the host copy of the parameters and moments",
         " needs about ", human_bytes(need), " of memory but this host has ", human_bytes(host),
         " (make the model or train.micro_batch smaller)");
}

}  // namespace ssd
