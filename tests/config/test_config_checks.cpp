// Config checks added by the hardening work (issue #13): repeated keys and sections, non-finite
// numbers, sizes no machine holds, errors that blame the --set that caused them, and wording.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "config/config.h"
#include "config/sizes.h"
#include "core/error.h"

namespace {

// The message of the ssd::Error parse_config throws ("" and a failure if none).
std::string error_of(const std::string& yaml, const std::vector<std::string>& sets = {},
                     const std::string& origin = "my.yaml") {
  try {
    ssd::parse_config(yaml, sets, origin);
  } catch (const ssd::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an error for:\n" << yaml;
  return "";
}

bool has(const std::string& s, const std::string& needle) {
  return s.find(needle) != std::string::npos;
}

TEST(ConfigChecks, DuplicateKeyIsRefusedByName) {
  const std::string msg = error_of("train:\n  lr: 0.1\n  seed: 3\n  lr: 0.2\n");
  EXPECT_TRUE(has(msg, "train.lr")) << msg;
  EXPECT_TRUE(has(msg, "twice")) << msg;
  EXPECT_TRUE(has(msg, "my.yaml")) << msg;
}

TEST(ConfigChecks, DuplicateSectionIsRefusedByName) {
  const std::string msg = error_of("train:\n  lr: 0.1\nmodel:\n  d_model: 32\ntrain:\n  seed: 4\n");
  EXPECT_TRUE(has(msg, "section 'train'")) << msg;
  EXPECT_TRUE(has(msg, "twice")) << msg;
  // Repeated keys in different sections are not duplicates.
  EXPECT_NO_THROW(ssd::parse_config("train:\n  seed: 1\ndata:\n  kind: mqar\n", {}, "ok"));
}

TEST(ConfigChecks, NonFiniteNumbersAreRefusedNamingTheKey) {
  for (const char* v : {".inf", "-.inf", ".nan", ".Inf", ".NaN"}) {
    std::string msg = error_of(std::string("train:\n  lr: ") + v + "\n");
    EXPECT_TRUE(has(msg, "train.lr")) << v << ": " << msg;
    EXPECT_TRUE(has(msg, "finite")) << v << ": " << msg;
  }
  std::string msg = error_of("", {"train.weight_decay=.inf"});
  EXPECT_TRUE(has(msg, "train.weight_decay")) << msg;
  msg = error_of("", {"parallel.timeout_s=.inf"});
  EXPECT_TRUE(has(msg, "parallel.timeout_s")) << msg;
  // A Config built in code (not parsed) is held to the same rule by validate.
  ssd::Config c = ssd::parse_config("", {}, "x");
  c.train.grad_clip = INFINITY;
  try {
    ssd::validate(c);
    ADD_FAILURE() << "validate accepted grad_clip = inf";
  } catch (const ssd::Error& e) {
    EXPECT_TRUE(has(e.what(), "train.grad_clip")) << e.what();
  }
}

TEST(ConfigChecks, AbsurdSizesNameTheKeyWithoutOverflow) {
  // 1e9 wide: ~1e19 parameters (int64 products of it overflow); must be named, not allocated.
  std::string msg = error_of("", {"model.d_model=1000000000", "model.headdim=8"});
  EXPECT_TRUE(has(msg, "model.d_model=1000000000")) << msg;
  EXPECT_TRUE(has(msg, "parameters")) << msg;
  msg = error_of("", {"model.vocab_size=4000000000000000000"});
  EXPECT_TRUE(has(msg, "model.vocab_size")) << msg;
  msg = error_of("", {"train.micro_batch=100000000000", "train.seq_len=100000000"});
  EXPECT_TRUE(has(msg, "train.micro_batch")) << msg;
  // The published sizes pass.
  EXPECT_NO_THROW(ssd::parse_config("", {"model.d_model=2560", "model.n_layer=64",
                                         "model.vocab_size=50277", "model.d_state=128"}, "x"));
}

TEST(ConfigChecks, HostMemoryCheckNamesTheKeys) {
  ssd::Config c = ssd::parse_config("", {"model.d_model=65536", "model.n_layer=64",
                                         "model.headdim=64"}, "x");
  // ~800G parameters: more than any test machine's memory, fewer than the sane bound.
  try {
    ssd::check_fits_host_memory(c, /*on_cpu=*/true);
    ADD_FAILURE() << "a ~1e12-parameter model fit this host's memory";
  } catch (const ssd::Error& e) {
    EXPECT_TRUE(has(e.what(), "model.d_model=65536")) << e.what();
    EXPECT_TRUE(has(e.what(), "this host has")) << e.what();
  }
  EXPECT_NO_THROW(ssd::check_fits_host_memory(ssd::parse_config("", {}, "x"), true));
}

TEST(ConfigChecks, SetErrorsBlameTheSetNotTheFile) {
  std::string msg = error_of("train:\n  seed: 3\n", {"train.lr=-1"}, "file.yaml");
  EXPECT_TRUE(has(msg, "--set train.lr=-1")) << msg;
  EXPECT_FALSE(has(msg, "file.yaml")) << msg;
  msg = error_of("train:\n  seed: 3\n", {"train.seq_len=long"}, "file.yaml");
  EXPECT_TRUE(has(msg, "--set train.seq_len=long")) << msg;
  EXPECT_FALSE(has(msg, "file.yaml")) << msg;
  // An error in the file itself still names the file.
  msg = error_of("train:\n  lr: -1\n", {"train.seed=5"}, "file.yaml");
  EXPECT_TRUE(has(msg, "file.yaml")) << msg;
  EXPECT_FALSE(has(msg, "--set")) << msg;
}

TEST(ConfigChecks, TypeErrorsUseTheRightArticle) {
  std::string msg = error_of("train:\n  seq_len: long\n");
  EXPECT_TRUE(has(msg, "expected an integer")) << msg;
  msg = error_of("train:\n  lr: fast\n");
  EXPECT_TRUE(has(msg, "expected a number")) << msg;
}

TEST(ConfigChecks, NewTrainKeysAreChecked) {
  EXPECT_EQ(ssd::parse_config("", {}, "x").train.max_skipped_steps, 10);
  EXPECT_EQ(ssd::parse_config("", {}, "x").train.resume_config, "check");
  std::string msg = error_of("", {"train.resume_config=maybe"});
  EXPECT_TRUE(has(msg, "train.resume_config")) << msg;
  msg = error_of("", {"train.max_skipped_steps=-1"});
  EXPECT_TRUE(has(msg, "train.max_skipped_steps")) << msg;
}

}  // namespace
