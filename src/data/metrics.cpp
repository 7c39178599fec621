#include "data/metrics.h"

#include <cmath>
#include <cstdio>

namespace ssd {

std::string eval_metrics_text(const Config& cfg, double mean_loss) {
  char buf[64];
  if (cfg.data.kind == "indexed") {
    std::snprintf(buf, sizeof buf, "perplexity %.3f", std::exp(mean_loss));
    return buf;
  }
  if (cfg.data.kind == "text") {
    std::snprintf(buf, sizeof buf, "bits/byte %.4f", mean_loss / std::log(2.0));
    return buf;
  }
  return "";
}

}  // namespace ssd
