// Learning-rate schedule: linear warmup to lr, then cosine decay to min_lr at max_steps.
#pragma once
#include <cmath>
#include <cstdint>

namespace ssd {

// step is 1-based (the step about to be taken).
inline double lr_at(int64_t step, double lr, double min_lr, int64_t warmup, int64_t max_steps) {
  if (warmup > 0 && step <= warmup) return lr * static_cast<double>(step) / warmup;
  if (max_steps <= warmup) return lr;
  double progress = static_cast<double>(step - warmup) / static_cast<double>(max_steps - warmup);
  progress = std::fmin(1.0, std::fmax(0.0, progress));
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(3.141592653589793 * progress));
}

}  // namespace ssd
