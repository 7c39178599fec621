// Training data: a source of (tokens, targets) batches with a saveable position.
// targets[t] is what the model should predict at position t; -1 means "not scored".
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"

namespace ssd {

class DataSource {
 public:
  virtual ~DataSource() = default;
  // Next training batch, [batch*seqlen] each, batch-major.
  virtual void next_train(int32_t* tokens, int32_t* targets, int64_t batch, int64_t seqlen) = 0;
  // Evaluation batch number i: the same data every time it is asked for.
  virtual void eval_batch(int64_t i, int32_t* tokens, int32_t* targets, int64_t batch,
                          int64_t seqlen) = 0;
  // Position in the training stream, for checkpoints.
  virtual std::vector<uint64_t> state() const = 0;
  virtual void set_state(const std::vector<uint64_t>& s) = 0;
  virtual std::string describe() const = 0;
  // Whether argmax accuracy is a meaningful metric (MQAR: recall accuracy).
  virtual bool reports_accuracy() const { return false; }
};

// rank/world: data-parallel ranks draw disjoint streams.
std::unique_ptr<DataSource> make_data_source(const Config& cfg, int rank, int world);

}  // namespace ssd
