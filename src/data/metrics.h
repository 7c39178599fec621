// Held-out metrics derived from a mean loss (nats per scored token), for the evaluation lines
// of `ssdtrain eval` and of training: perplexity = exp(loss) for tokenized data (indexed),
// bits per byte = loss / ln 2 for byte-level text (one token per byte). MQAR: none (its
// metric is recall accuracy).
#pragma once
#include <string>

#include "config/config.h"

namespace ssd {

// "perplexity 12.345" / "bits/byte 1.2345" / "" (MQAR), for the caller to join to its line.
std::string eval_metrics_text(const Config& cfg, double mean_loss);

}  // namespace ssd
