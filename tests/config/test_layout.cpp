// resolve_layout: how a job's processes split into dp x cp x tp, and the named errors for the
// layouts that do not split the model or the batch (checked before any work, on every rank).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "config/config.h"
#include "core/error.h"

namespace {

// 8 heads of 32 (d_inner 256), ngroups 1, padded vocabulary 48.
const char* kModel =
    "model: {d_model: 128, n_layer: 1, d_state: 16, headdim: 32, chunk_size: 16, vocab_size: 48}\n"
    "train: {device: cpu, seq_len: 64, micro_batch: 2}\n"
    "data: {kind: mqar, mqar_num_pairs: 2, mqar_key_vocab: 16, mqar_value_vocab: 16}\n";

std::string layout_error(const std::vector<std::string>& sets, int64_t world) {
  try {
    ssd::resolve_layout(ssd::parse_config(kModel, sets, "t"), world, false);
  } catch (const ssd::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a layout error for world " << world;
  return "";
}

bool has(const std::string& s, const std::string& needle) {
  return s.find(needle) != std::string::npos;
}

}  // namespace

TEST(Layout, TensorParallelSplitsAndItsSpan) {
  struct Case { int64_t ngroups, tp, world, span, dp; };
  for (const Case& k : {Case{1, 2, 2, 2, 1}, Case{1, 4, 8, 4, 2}, Case{2, 4, 4, 2, 1},
                        Case{4, 4, 4, 1, 1}, Case{8, 2, 4, 1, 2}}) {
    const ssd::Layout l = ssd::resolve_layout(
        ssd::parse_config(kModel, {"model.ngroups=" + std::to_string(k.ngroups),
                                   "parallel.tp=" + std::to_string(k.tp)}, "t"),
        k.world, false);
    EXPECT_EQ(l.tp, k.tp);
    EXPECT_EQ(l.tp_span, k.span) << "ngroups " << k.ngroups << " tp " << k.tp;
    EXPECT_EQ(l.dp, k.dp);
  }
}

TEST(Layout, ErrorsNameTheKeysAndNumbers) {
  std::string m = layout_error({"parallel.tp=2"}, 3);
  EXPECT_TRUE(has(m, "3 processes") && has(m, "parallel.tp")) << m;
  m = layout_error({"parallel.tp=3"}, 3);  // 8 heads
  EXPECT_TRUE(has(m, "parallel.tp=3") && has(m, "heads") && has(m, "8")) << m;
  // 12 heads (d_model 192), 3 groups: neither of 2 and 3 divides the other.
  m = layout_error({"model.d_model=192", "model.ngroups=3", "parallel.tp=2"}, 2);
  EXPECT_TRUE(has(m, "model.ngroups=3") && has(m, "parallel.tp=2")) << m;
  // Padded vocabulary 45 (multiple 5) is odd.
  m = layout_error({"model.vocab_size=45", "model.pad_vocab_size_multiple=5", "parallel.tp=2"}, 2);
  EXPECT_TRUE(has(m, "padded vocabulary (45") && has(m, "pad_vocab_size_multiple")) << m;
  // Sequence parallelism: 3 x 66 = 198 tokens over 4 ranks.
  m = layout_error({"parallel.tp=4", "parallel.sequence_parallel=true", "train.micro_batch=3",
                    "train.seq_len=66"}, 4);
  EXPECT_TRUE(has(m, "parallel.sequence_parallel") && has(m, "198")) << m;
  EXPECT_NO_THROW(ssd::resolve_layout(
      ssd::parse_config(kModel, {"parallel.tp=4", "parallel.sequence_parallel=true"}, "t"), 4,
      false));
}
