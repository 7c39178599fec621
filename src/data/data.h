// Training data: a global stream of samples, each a pure function of its index.
// targets[t] is what the model should predict at position t; -1 means "not scored".
// The loader state of a run is one number, the count of training samples consumed (all ranks
// together), so a run resumed on another number of ranks continues the same global stream.
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
  // Training sample number `index` (0, 1, 2, ...) of the global stream, [seqlen] each. The same
  // index gives the same sample on every rank and in every run of the same config.
  virtual void train_sample(int64_t index, int32_t* tokens, int32_t* targets, int64_t seqlen) = 0;
  // Evaluation batch number i: the same data every time it is asked for.
  virtual void eval_batch(int64_t i, int32_t* tokens, int32_t* targets, int64_t batch,
                          int64_t seqlen) = 0;
  virtual std::string describe() const = 0;
  // Whether argmax accuracy is a meaningful metric (MQAR: recall accuracy).
  virtual bool reports_accuracy() const { return false; }
  // True when eval_batch has no held-out data and evaluates on training data instead (text
  // with data.val_fraction 0): the log then says so rather than print it as a held-out loss.
  virtual bool eval_is_training_data() const { return false; }
  // Packed documents (data.reset_at_eos): where the samples' documents begin. reset[t] = 1
  // where token t begins a document, i.e. the token before it ended one (for indexed data, its
  // end-of-document token), else 0; t = 0 counts when a document begins there. Data without
  // documents (MQAR, byte-level text) has none: has_documents() false, all flags 0.
  virtual bool has_documents() const { return false; }
  virtual void train_resets(int64_t index, int32_t* reset, int64_t seqlen);
  virtual void eval_resets(int64_t i, int32_t* reset, int64_t batch, int64_t seqlen);
};

std::unique_ptr<DataSource> make_data_source(const Config& cfg);

// One optimizer step's samples for one data-parallel rank. The step's global samples are
// [position, position + micro_batch * grad_accum * dp); rank r takes the r-th contiguous block
// of micro_batch * grad_accum of them, in micro-batch order. So 1 process with grad_accum 4 and
// 2 ranks with grad_accum 2 train on the same samples. tokens/targets: [grad_accum * micro_batch
// * seqlen]. Ranks of one tensor- or context-parallel group pass the same dp_rank.
// reset (optional, same size): the samples' document starts (DataSource::train_resets).
void fill_step(DataSource& d, int64_t position, int64_t dp_rank, int64_t dp, int64_t micro_batch,
               int64_t grad_accum, int64_t seqlen, int32_t* tokens, int32_t* targets,
               int32_t* reset = nullptr);

}  // namespace ssd
