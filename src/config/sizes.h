// Memory estimates of a config, computed in long double from the raw keys so that absurd sizes
// (a typo'd d_model) are reported by key instead of overflowing int64 or failing an allocation.
#pragma once
#include "config/config.h"

namespace ssd {

struct SizeEstimate {
  long double params = 0;            // parameter count
  long double param_state_bytes = 0; // parameters, gradients and AdamW moments in fp32
  long double activation_bytes = 0;  // activations kept for the backward, one micro-batch
};
SizeEstimate estimate_sizes(const Config& c);

// Refuses sizes no machine has (more than kMaxConfigBytes), naming the keys. Called by validate.
inline constexpr long double kMaxConfigBytes = 1125899906842624.0L;  // 1 PiB
void check_sizes_sane(const Config& c);

// Refuses a run whose estimate exceeds this host's physical memory: all of it when training on
// the CPU, the host copy of parameters and moments (checkpoints) on a GPU.
void check_fits_host_memory(const Config& c, bool on_cpu);

}  // namespace ssd
