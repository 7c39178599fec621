// Config parsing and validation: the default file, full files, defaults, --set overrides, every
// class of bad input (each must throw ssd::Error naming the key or file), and the YAML round trip.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "config/config.h"
#include "core/error.h"

namespace fs = std::filesystem;
using ssd::Config;
using ssd::parse_config;

namespace {

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << text;
  ASSERT_TRUE(f.good()) << "cannot write " << p;
}

std::string default_yaml() {
  return read_file(fs::path(SSD_SOURCE_DIR) / "configs" / "default.yaml");
}

// Runs fn, expects an ssd::Error whose message contains every one of `needles`; returns it.
template <class F>
std::string expect_error(F&& fn, const std::vector<std::string>& needles) {
  try {
    fn();
  } catch (const ssd::Error& e) {
    std::string msg = e.what();
    for (const auto& n : needles)
      EXPECT_NE(msg.find(n), std::string::npos) << "message does not mention '" << n << "': " << msg;
    return msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected ssd::Error, got another exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected ssd::Error mentioning '" << (needles.empty() ? "" : needles[0])
                << "', nothing was thrown";
  return "";
}

// Parse the default config with these overrides, expect an error naming `key`.
std::string expect_set_error(const std::vector<std::string>& sets,
                             const std::vector<std::string>& needles) {
  return expect_error([&] { parse_config(default_yaml(), sets, "test.yaml"); }, needles);
}

// Every field of two configs, one by one (source is not a config value).
void expect_same(const Config& a, const Config& b) {
#define SAME(f) EXPECT_EQ(a.f, b.f) << #f
#define SAME_D(f) EXPECT_DOUBLE_EQ(a.f, b.f) << #f
  SAME(model.d_model); SAME(model.n_layer); SAME(model.d_state); SAME(model.headdim);
  SAME(model.expand); SAME(model.ngroups); SAME(model.d_conv); SAME(model.chunk_size);
  SAME(model.vocab_size); SAME(model.pad_vocab_size_multiple); SAME_D(model.norm_eps);
  SAME(train.device); SAME(train.seed); SAME(train.seq_len); SAME(train.micro_batch);
  SAME(train.grad_accum); SAME(train.max_steps); SAME_D(train.lr); SAME_D(train.min_lr);
  SAME(train.warmup_steps); SAME_D(train.weight_decay); SAME_D(train.grad_clip);
  SAME_D(train.beta1); SAME_D(train.beta2); SAME_D(train.adam_eps); SAME(train.resume);
  SAME(train.init_from); SAME(train.on_nan);
  SAME(data.kind); SAME(data.path); SAME_D(data.val_fraction); SAME(data.mqar_num_pairs);
  SAME(data.mqar_key_vocab); SAME(data.mqar_value_vocab); SAME(data.reset_at_eos);
  SAME(run.name); SAME(run.dir); SAME(run.log_every); SAME(run.eval_every);
  SAME(run.eval_batches);
  SAME(checkpoint.every); SAME(checkpoint.keep_last); SAME(checkpoint.dir);
#undef SAME
#undef SAME_D
}

class ConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ssd_test_config_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    tmp_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
  fs::path tmp_;
};

// ---------------------------------------------------------------- the default file

TEST(ConfigDefault, DefaultYamlValues) {
  Config c = parse_config(default_yaml(), {}, "configs/default.yaml");
  EXPECT_EQ(c.model.d_model, 128);
  EXPECT_EQ(c.model.n_layer, 1);
  EXPECT_EQ(c.model.d_state, 64);
  EXPECT_EQ(c.model.headdim, 32);
  EXPECT_EQ(c.model.expand, 2);
  EXPECT_EQ(c.model.ngroups, 1);
  EXPECT_EQ(c.model.d_conv, 4);
  EXPECT_EQ(c.model.chunk_size, 64);
  EXPECT_EQ(c.model.vocab_size, 48);
  EXPECT_EQ(c.model.pad_vocab_size_multiple, 16);
  EXPECT_EQ(c.model.padded_vocab(), 48);
  EXPECT_EQ(c.model.d_inner(), 256);
  EXPECT_EQ(c.model.nheads(), 8);
  EXPECT_EQ(c.train.device, "auto");
  EXPECT_EQ(c.train.seed, 1234);
  EXPECT_EQ(c.train.seq_len, 64);
  EXPECT_EQ(c.train.micro_batch, 32);
  EXPECT_EQ(c.train.grad_accum, 1);
  EXPECT_EQ(c.train.max_steps, 1000);
  EXPECT_DOUBLE_EQ(c.train.lr, 1e-2);
  EXPECT_DOUBLE_EQ(c.train.min_lr, 1e-3);
  EXPECT_EQ(c.train.warmup_steps, 100);
  EXPECT_DOUBLE_EQ(c.train.weight_decay, 0.1);
  EXPECT_DOUBLE_EQ(c.train.grad_clip, 1.0);
  EXPECT_EQ(c.data.kind, "mqar");
  EXPECT_EQ(c.data.mqar_num_pairs, 4);
  EXPECT_EQ(c.data.mqar_key_vocab, 16);
  EXPECT_EQ(c.data.mqar_value_vocab, 16);
  EXPECT_EQ(c.run.name, "default");
  EXPECT_EQ(c.run.log_every, 50);
  EXPECT_EQ(c.run.eval_every, 500);
  EXPECT_EQ(c.checkpoint.every, 500);
  EXPECT_EQ(c.checkpoint.keep_last, 2);
  // Keys the file leaves out take the struct defaults.
  EXPECT_DOUBLE_EQ(c.model.norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.train.beta1, 0.9);
  EXPECT_DOUBLE_EQ(c.train.beta2, 0.95);
  EXPECT_DOUBLE_EQ(c.train.adam_eps, 1e-8);
  EXPECT_EQ(c.train.resume, "auto");
  EXPECT_EQ(c.train.init_from, "");
  EXPECT_EQ(c.train.on_nan, "stop");
  EXPECT_EQ(c.data.path, "");
  EXPECT_DOUBLE_EQ(c.data.val_fraction, 0.05);
  EXPECT_EQ(c.run.eval_batches, 4);
  EXPECT_EQ(c.run.dir, "runs/default");
  EXPECT_EQ(c.checkpoint.dir, "runs/default/checkpoints");
  EXPECT_EQ(c.source, "configs/default.yaml");
}

TEST(ConfigDefault, EmbeddedDefaultMatchesFile) {
  Config file = parse_config(default_yaml(), {}, "default");
  Config embedded = parse_config(ssd::cli::default_config_yaml(), {}, "default");
  expect_same(file, embedded);
}

TEST_F(ConfigTest, LoadDefaultFromDisk) {
  Config c = ssd::load_config((fs::path(SSD_SOURCE_DIR) / "configs" / "default.yaml").string(), {});
  EXPECT_EQ(c.model.d_model, 128);
  EXPECT_EQ(c.run.name, "default");  // set in the file
}

TEST_F(ConfigTest, EmptyFileGivesStructDefaults) {
  for (const char* text : {"", "# only a comment\n", "model:\n"}) {
    SCOPED_TRACE(text);
    Config c = parse_config(text, {}, "somewhere/my_experiment.yaml");
    Config d;  // the struct defaults
    d.run.name = "my_experiment";
    d.run.dir = "runs/my_experiment";
    d.checkpoint.dir = "runs/my_experiment/checkpoints";
    expect_same(c, d);
  }
}

TEST_F(ConfigTest, FullFile) {
  fs::path corpus = tmp_ / "corpus.txt";
  write_file(corpus, std::string(4096, 'x'));
  fs::path init = tmp_ / "exported";
  fs::create_directories(init);
  fs::path file = tmp_ / "full.yaml";
  write_file(file,
             "model:\n"
             "  d_model: 96\n"
             "  n_layer: 3\n"
             "  d_state: 32\n"
             "  headdim: 24\n"
             "  expand: 2\n"
             "  ngroups: 2\n"
             "  d_conv: 3\n"
             "  chunk_size: 16\n"
             "  vocab_size: 260\n"
             "  pad_vocab_size_multiple: 8\n"
             "  norm_eps: 1.0e-6\n"
             "train:\n"
             "  device: cpu\n"
             "  seed: 7\n"
             "  seq_len: 64\n"
             "  micro_batch: 4\n"
             "  grad_accum: 2\n"
             "  max_steps: 50\n"
             "  lr: 1e-3\n"
             "  min_lr: 0\n"
             "  warmup_steps: 0\n"
             "  weight_decay: 0.01\n"
             "  grad_clip: 0\n"
             "  beta1: 0.8\n"
             "  beta2: 0.99\n"
             "  adam_eps: 1.0e-6\n"
             "  resume: never\n"
             "  init_from: " + init.string() + "\n"
             "  on_nan: skip\n"
             "data:\n"
             "  kind: text\n"
             "  path: " + corpus.string() + "\n"
             "  val_fraction: 0.25\n"
             "  mqar_num_pairs: 4\n"
             "  mqar_key_vocab: 10\n"
             "  mqar_value_vocab: 11\n"
             "run:\n"
             "  name: full_run\n"
             "  dir: " + (tmp_ / "rundir").string() + "\n"
             "  log_every: 5\n"
             "  eval_every: 25\n"
             "  eval_batches: 2\n"
             "checkpoint:\n"
             "  every: 10\n"
             "  keep_last: 0\n"
             "  dir: " + (tmp_ / "ckpts").string() + "\n");
  Config c = ssd::load_config(file.string(), {});
  EXPECT_EQ(c.source, file.string());
  EXPECT_EQ(c.model.d_model, 96);
  EXPECT_EQ(c.model.n_layer, 3);
  EXPECT_EQ(c.model.d_state, 32);
  EXPECT_EQ(c.model.headdim, 24);
  EXPECT_EQ(c.model.expand, 2);
  EXPECT_EQ(c.model.ngroups, 2);
  EXPECT_EQ(c.model.nheads(), 8);
  EXPECT_EQ(c.model.d_conv, 3);
  EXPECT_EQ(c.model.chunk_size, 16);
  EXPECT_EQ(c.model.vocab_size, 260);
  EXPECT_EQ(c.model.pad_vocab_size_multiple, 8);
  EXPECT_EQ(c.model.padded_vocab(), 264);
  EXPECT_DOUBLE_EQ(c.model.norm_eps, 1e-6);
  EXPECT_EQ(c.train.device, "cpu");
  EXPECT_EQ(c.train.seed, 7);
  EXPECT_EQ(c.train.seq_len, 64);
  EXPECT_EQ(c.train.micro_batch, 4);
  EXPECT_EQ(c.train.grad_accum, 2);
  EXPECT_EQ(c.train.max_steps, 50);
  EXPECT_DOUBLE_EQ(c.train.lr, 1e-3);
  EXPECT_DOUBLE_EQ(c.train.min_lr, 0.0);
  EXPECT_EQ(c.train.warmup_steps, 0);
  EXPECT_DOUBLE_EQ(c.train.weight_decay, 0.01);
  EXPECT_DOUBLE_EQ(c.train.grad_clip, 0.0);
  EXPECT_DOUBLE_EQ(c.train.beta1, 0.8);
  EXPECT_DOUBLE_EQ(c.train.beta2, 0.99);
  EXPECT_DOUBLE_EQ(c.train.adam_eps, 1e-6);
  EXPECT_EQ(c.train.resume, "never");
  EXPECT_EQ(c.train.init_from, init.string());
  EXPECT_EQ(c.train.on_nan, "skip");
  EXPECT_EQ(c.data.kind, "text");
  EXPECT_EQ(c.data.path, corpus.string());
  EXPECT_DOUBLE_EQ(c.data.val_fraction, 0.25);
  EXPECT_EQ(c.data.mqar_num_pairs, 4);
  EXPECT_EQ(c.data.mqar_key_vocab, 10);
  EXPECT_EQ(c.data.mqar_value_vocab, 11);
  EXPECT_EQ(c.run.name, "full_run");
  EXPECT_EQ(c.run.dir, (tmp_ / "rundir").string());
  EXPECT_EQ(c.run.log_every, 5);
  EXPECT_EQ(c.run.eval_every, 25);
  EXPECT_EQ(c.run.eval_batches, 2);
  EXPECT_EQ(c.checkpoint.every, 10);
  EXPECT_EQ(c.checkpoint.keep_last, 0);
  EXPECT_EQ(c.checkpoint.dir, (tmp_ / "ckpts").string());
}

TEST_F(ConfigTest, RunDirDefaultsToFileStem) {
  fs::path file = tmp_ / "my_exp.yaml";
  write_file(file, "model:\n  d_model: 32\n");
  Config c = ssd::load_config(file.string(), {});
  EXPECT_EQ(c.run.name, "my_exp");
  EXPECT_EQ(c.run.dir, "runs/my_exp");
  EXPECT_EQ(c.checkpoint.dir, "runs/my_exp/checkpoints");

  // run.dir given: checkpoints go under it.
  c = ssd::load_config(file.string(), {"run.dir=/somewhere/else"});
  EXPECT_EQ(c.run.name, "my_exp");
  EXPECT_EQ(c.run.dir, "/somewhere/else");
  EXPECT_EQ(c.checkpoint.dir, "/somewhere/else/checkpoints");

  // run.name given: run.dir follows the name.
  c = ssd::load_config(file.string(), {"run.name=other"});
  EXPECT_EQ(c.run.dir, "runs/other");
  EXPECT_EQ(c.checkpoint.dir, "runs/other/checkpoints");

  // checkpoint.dir given explicitly is kept.
  c = ssd::load_config(file.string(), {"checkpoint.dir=/ck"});
  EXPECT_EQ(c.run.dir, "runs/my_exp");
  EXPECT_EQ(c.checkpoint.dir, "/ck");
}

// ---------------------------------------------------------------- --set overrides

TEST(ConfigOverride, IntsFloatsStrings) {
  Config c = parse_config(default_yaml(),
                          {"model.d_model=96", "train.lr=3e-4", "train.min_lr=1e-5",
                           "model.norm_eps=0.5", "train.device=cpu", "run.name=abc",
                           "train.max_steps=7", "data.val_fraction=0"},
                          "default");
  EXPECT_EQ(c.model.d_model, 96);
  EXPECT_DOUBLE_EQ(c.train.lr, 3e-4);
  EXPECT_DOUBLE_EQ(c.train.min_lr, 1e-5);
  EXPECT_DOUBLE_EQ(c.model.norm_eps, 0.5);
  EXPECT_EQ(c.train.device, "cpu");
  EXPECT_EQ(c.run.name, "abc");
  EXPECT_EQ(c.run.dir, "runs/abc");
  EXPECT_EQ(c.train.max_steps, 7);
  EXPECT_DOUBLE_EQ(c.data.val_fraction, 0.0);
  // Untouched keys keep the file's values.
  EXPECT_EQ(c.model.n_layer, 1);
  EXPECT_EQ(c.train.seq_len, 64);
}

TEST(ConfigOverride, IntegerLiteralForFloatKey) {
  Config c = parse_config(default_yaml(), {"train.lr=1", "train.grad_clip=2"}, "default");
  EXPECT_DOUBLE_EQ(c.train.lr, 1.0);
  EXPECT_DOUBLE_EQ(c.train.grad_clip, 2.0);
}

TEST(ConfigOverride, WinsOverFileAndLastOneWins) {
  Config c = parse_config("model:\n  d_model: 64\ntrain:\n  lr: 0.01\n",
                          {"model.d_model=128", "train.lr=2e-3", "model.d_model=32"}, "x.yaml");
  EXPECT_EQ(c.model.d_model, 32);
  EXPECT_DOUBLE_EQ(c.train.lr, 2e-3);
}

TEST(ConfigOverride, SectionAbsentOrEmptyInFile) {
  // The file has no run: section at all, and an empty model: section.
  Config c = parse_config("model:\ntrain:\n  seq_len: 64\n",
                          {"run.log_every=3", "model.d_model=32"}, "x.yaml");
  EXPECT_EQ(c.run.log_every, 3);
  EXPECT_EQ(c.model.d_model, 32);
  EXPECT_EQ(c.train.seq_len, 64);
}

TEST(ConfigOverride, StringValueWithEqualsSignAndSlashes) {
  Config c = parse_config(default_yaml(), {"run.dir=/tmp/a=b/c"}, "default");
  EXPECT_EQ(c.run.dir, "/tmp/a=b/c");
  EXPECT_EQ(c.checkpoint.dir, "/tmp/a=b/c/checkpoints");
}

TEST(ConfigOverride, UnknownKeyNamesKeyAndListsSection) {
  expect_set_error({"model.d_modle=3"}, {"model.d_modle", "d_model", "n_layer", "chunk_size"});
  expect_set_error({"train.learning_rate=0.1"}, {"train.learning_rate", "lr"});
}

TEST(ConfigOverride, UnknownSection) {
  expect_set_error({"optim.lr=1"}, {"optim.lr"});
  expect_set_error({"nodot=1"}, {"nodot"});
}

TEST(ConfigOverride, Malformed) {
  expect_set_error({"model.d_model"}, {"model.d_model", "="});
  expect_set_error({"=5"}, {"=5"});
}

TEST(ConfigOverride, WrongTypeNamesKey) {
  expect_set_error({"model.d_model=big"}, {"model.d_model", "integer", "big"});
  expect_set_error({"train.lr=fast"}, {"train.lr", "number"});
  expect_set_error({"model.d_model=[1,2]"}, {"model.d_model", "list"});
  expect_set_error({"model.d_model=1.5"}, {"model.d_model"});
  expect_set_error({"model.d_model="}, {"model.d_model"});
}

// ---------------------------------------------------------------- bad input in files

TEST(ConfigErrors, UnknownKeyListsSectionKeys) {
  std::string msg = expect_error(
      [] { parse_config("model:\n  d_modle: 64\n", {}, "exp.yaml"); },
      {"model.d_modle", "exp.yaml", "d_model", "n_layer", "d_state", "headdim", "expand",
       "ngroups", "d_conv", "chunk_size", "vocab_size", "norm_eps"});
  // Lists the keys of its own section only.
  EXPECT_EQ(msg.find("seq_len"), std::string::npos) << msg;
  expect_error([] { parse_config("train:\n  epochs: 3\n", {}, "exp.yaml"); },
               {"train.epochs", "seq_len", "micro_batch", "lr"});
  expect_error([] { parse_config("checkpoint:\n  path: x\n", {}, "exp.yaml"); },
               {"checkpoint.path", "every", "keep_last", "dir"});
}

TEST(ConfigErrors, UnknownSection) {
  expect_error([] { parse_config("optimizer:\n  lr: 1\n", {}, "exp.yaml"); },
               {"optimizer", "exp.yaml"});
}

TEST(ConfigErrors, WrongType) {
  expect_error([] { parse_config("model:\n  d_model: big\n", {}, "exp.yaml"); },
               {"model.d_model", "integer", "big", "exp.yaml"});
  expect_error([] { parse_config("train:\n  seq_len: [1, 2]\n", {}, "exp.yaml"); },
               {"train.seq_len", "list"});
  expect_error([] { parse_config("train:\n  lr: {a: 1}\n", {}, "exp.yaml"); },
               {"train.lr", "mapping"});
  expect_error([] { parse_config("train:\n  device: [cpu]\n", {}, "exp.yaml"); },
               {"train.device", "list"});
  expect_error([] { parse_config("train:\n  lr: fast\n", {}, "exp.yaml"); },
               {"train.lr", "number"});
  expect_error([] { parse_config("model:\n  d_model:\n", {}, "exp.yaml"); },
               {"model.d_model", "null"});
  expect_error([] { parse_config("model:\n  n_layer: 2.5\n", {}, "exp.yaml"); },
               {"model.n_layer"});
}

TEST(ConfigErrors, SectionOrTopLevelNotAMapping) {
  expect_error([] { parse_config("model: 5\n", {}, "exp.yaml"); }, {"model", "mapping"});
  expect_error([] { parse_config("model: [1, 2]\n", {}, "exp.yaml"); }, {"model", "mapping"});
  expect_error([] { parse_config("- a\n- b\n", {}, "exp.yaml"); }, {"exp.yaml", "mapping"});
  expect_error([] { parse_config("just a string\n", {}, "exp.yaml"); }, {"exp.yaml"});
}

TEST(ConfigErrors, InvalidYaml) {
  expect_error([] { parse_config("model: {d_model: 64\n", {}, "broken.yaml"); },
               {"broken.yaml", "YAML"});
  expect_error([] { parse_config("model:\n  d_model: [1, 2\n", {}, "broken.yaml"); },
               {"broken.yaml"});
}

TEST_F(ConfigTest, MissingConfigFile) {
  fs::path missing = tmp_ / "does_not_exist.yaml";
  expect_error([&] { ssd::load_config(missing.string(), {}); }, {missing.string()});
}

// Regression: std::ifstream opens a directory without error, which once made
// `--config some_dir/` train on the defaults.
TEST_F(ConfigTest, DirectoryIsNotAConfigFile) {
  expect_error([&] { ssd::load_config(tmp_.string(), {}); }, {tmp_.string()});
}

// Regression: --set into a section that is a scalar or a list must name the section.
TEST(ConfigErrors, OverrideIntoSectionThatIsNotAMapping) {
  expect_error([] { parse_config("model: 5\n", {"model.d_model=32"}, "exp.yaml"); },
               {"model", "mapping"});
  expect_error([] { parse_config("model: [1, 2]\n", {"model.d_model=32"}, "exp.yaml"); },
               {"model", "mapping"});
}

// Regression: a non-scalar mapping key must give ssd::Error naming the file.
TEST(ConfigErrors, NonScalarKeys) {
  expect_error([] { parse_config("? [a, b]\n: 1\n", {}, "exp.yaml"); }, {"exp.yaml"});
  expect_error([] { parse_config("model:\n  ? [a, b]\n  : 1\n", {}, "exp.yaml"); },
               {"exp.yaml"});
}

TEST_F(ConfigTest, ErrorsInAFileNameTheFile) {
  fs::path file = tmp_ / "bad_key.yaml";
  write_file(file, "model:\n  dmodel: 64\n");
  expect_error([&] { ssd::load_config(file.string(), {}); }, {file.string(), "model.dmodel"});
  write_file(file, "model:\n  headdim: 24\n");
  expect_error([&] { ssd::load_config(file.string(), {}); }, {file.string(), "model.headdim"});
}

TEST(ConfigErrors, HeaddimMustDivideDInner) {
  // d_inner = 2 * 128 = 256; 24 does not divide it.
  expect_set_error({"model.headdim=24"}, {"model.headdim", "256"});
  expect_set_error({"model.d_model=40", "model.headdim=32"}, {"model.headdim", "80"});
  // 32 divides 256: fine.
  EXPECT_NO_THROW(parse_config(default_yaml(), {"model.headdim=32"}, "default"));
}

TEST(ConfigErrors, NgroupsMustDivideNheads) {
  // 4 heads (headdim 32 of d_inner 128, pinned: the default's head count may change); 3 groups
  // does not divide them, 2 and 4 do.
  const std::string d = "model.d_model=64", h = "model.headdim=32";
  expect_set_error({d, h, "model.ngroups=3"}, {"model.ngroups", "4"});
  EXPECT_NO_THROW(parse_config(default_yaml(), {d, h, "model.ngroups=2"}, "default"));
  EXPECT_NO_THROW(parse_config(default_yaml(), {d, h, "model.ngroups=4"}, "default"));
  expect_set_error({d, h, "model.ngroups=8"}, {"model.ngroups"});
}

class PositiveKey : public ::testing::TestWithParam<const char*> {};

TEST_P(PositiveKey, ZeroAndNegativeRejected) {
  const std::string key = GetParam();
  for (const char* v : {"0", "-1", "-64"}) {
    SCOPED_TRACE(key + "=" + v);
    expect_set_error({key + "=" + v}, {key, "positive"});
  }
}

INSTANTIATE_TEST_SUITE_P(
    Config, PositiveKey,
    ::testing::Values("model.d_model", "model.n_layer", "model.d_state", "model.headdim",
                      "model.expand", "model.ngroups", "model.d_conv", "model.chunk_size",
                      "model.vocab_size", "model.pad_vocab_size_multiple", "model.norm_eps",
                      "train.seq_len", "train.micro_batch", "train.grad_accum",
                      "train.max_steps", "train.lr", "train.adam_eps",
                      "data.mqar_num_pairs", "data.mqar_key_vocab", "data.mqar_value_vocab",
                      "run.log_every", "run.eval_batches"),
    [](const ::testing::TestParamInfo<const char*>& info) {
      std::string s = info.param;
      for (auto& ch : s)
        if (ch == '.') ch = '_';
      return s;
    });

class NonNegativeKey : public ::testing::TestWithParam<const char*> {};

TEST_P(NonNegativeKey, NegativeRejectedZeroAccepted) {
  const std::string key = GetParam();
  expect_set_error({key + "=-1"}, {key});
  EXPECT_NO_THROW(parse_config(default_yaml(), {key + "=0"}, "default")) << key;
}

INSTANTIATE_TEST_SUITE_P(
    Config, NonNegativeKey,
    ::testing::Values("train.min_lr", "train.warmup_steps", "train.weight_decay",
                      "train.grad_clip", "run.eval_every", "checkpoint.every",
                      "checkpoint.keep_last"),
    [](const ::testing::TestParamInfo<const char*>& info) {
      std::string s = info.param;
      for (auto& ch : s)
        if (ch == '.') ch = '_';
      return s;
    });

TEST(ConfigErrors, FractionalSizesRejectedAsPositive) {
  expect_set_error({"train.lr=-3e-4"}, {"train.lr"});
  expect_set_error({"model.norm_eps=-1e-5"}, {"model.norm_eps"});
  expect_set_error({"train.lr=.nan"}, {"train.lr"});
}

TEST(ConfigErrors, Device) {
  for (const char* ok : {"auto", "cpu", "cuda"})
    EXPECT_NO_THROW(parse_config(default_yaml(), {std::string("train.device=") + ok}, "d")) << ok;
  expect_set_error({"train.device=gpu"}, {"train.device", "gpu"});
  expect_set_error({"train.device=CPU"}, {"train.device"});
  expect_set_error({"train.device="}, {"train.device"});
}

TEST(ConfigErrors, OtherEnumsAndRanges) {
  expect_set_error({"train.on_nan=ignore"}, {"train.on_nan", "ignore"});
  expect_set_error({"data.kind=images"}, {"data.kind", "images"});
  expect_set_error({"train.beta1=1"}, {"train.beta1"});
  expect_set_error({"train.beta2=-0.1"}, {"train.beta2"});
  expect_set_error({"train.resume="}, {"train.resume"});
  expect_set_error({"train.resume=/no/such/checkpoint.h5"},
                   {"train.resume", "/no/such/checkpoint.h5"});
  expect_set_error({"train.init_from=/no/such/export_dir"},
                   {"train.init_from", "/no/such/export_dir"});
  EXPECT_NO_THROW(parse_config(default_yaml(), {"train.resume=never"}, "d"));
}

TEST_F(ConfigTest, TextDataNeedsAnExistingFile) {
  fs::path missing = tmp_ / "missing_corpus.txt";
  expect_set_error({"data.kind=text", "model.vocab_size=256", "data.path=" + missing.string()},
                   {"data.path", missing.string()});
  expect_set_error({"data.kind=text", "model.vocab_size=256"}, {"data.path"});
  fs::path corpus = tmp_ / "corpus.txt";
  write_file(corpus, std::string(1000, 'a'));
  Config c = parse_config(default_yaml(),
                          {"data.kind=text", "model.vocab_size=256", "data.path=" + corpus.string()},
                          "d");
  EXPECT_EQ(c.data.path, corpus.string());
  // Byte-level text needs 256 token ids.
  expect_set_error({"data.kind=text", "model.vocab_size=255", "data.path=" + corpus.string()},
                   {"model.vocab_size", "256"});
  expect_set_error({"data.kind=text", "model.vocab_size=256", "data.path=" + corpus.string(),
                    "data.val_fraction=1"},
                   {"data.val_fraction"});
}

TEST(ConfigErrors, MqarSeqLenTooShort) {
  // 4 pairs need 4*4+1 = 17 positions.
  expect_set_error({"train.seq_len=16"}, {"train.seq_len", "17"});
  EXPECT_NO_THROW(parse_config(default_yaml(), {"train.seq_len=17"}, "d"));
  expect_set_error({"data.mqar_num_pairs=16", "train.seq_len=64"}, {"train.seq_len", "65"});
}

TEST(ConfigErrors, MqarVocabTooSmall) {
  // 2 + 16 keys + 16 values = 34 token ids.
  expect_set_error({"model.vocab_size=33"}, {"model.vocab_size", "34"});
  EXPECT_NO_THROW(parse_config(default_yaml(), {"model.vocab_size=34"}, "d"));
  expect_set_error({"data.mqar_value_vocab=50"}, {"model.vocab_size", "68"});
  // More pairs than distinct keys.
  expect_set_error({"data.mqar_num_pairs=17", "train.seq_len=128"},
                   {"data.mqar_num_pairs", "data.mqar_key_vocab"});
}

// ---------------------------------------------------------------- round trip

void expect_round_trip(const Config& c) {
  std::string y1 = ssd::config_to_yaml(c);
  Config back = parse_config(y1, {}, "roundtrip.yaml");
  expect_same(back, c);
  EXPECT_EQ(ssd::config_to_yaml(back), y1);
}

TEST(ConfigRoundTrip, Default) {
  expect_round_trip(parse_config(default_yaml(), {}, "default"));
}

TEST(ConfigRoundTrip, EveryKeyIsWritten) {
  std::string y = ssd::config_to_yaml(parse_config(default_yaml(), {}, "default"));
  for (const char* k :
       {"d_model", "n_layer", "d_state", "headdim", "expand", "ngroups", "d_conv", "chunk_size",
        "vocab_size", "pad_vocab_size_multiple", "norm_eps", "device", "seed", "seq_len",
        "micro_batch", "grad_accum", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay",
        "grad_clip", "beta1", "beta2", "adam_eps", "resume", "init_from", "on_nan", "kind",
        "path", "val_fraction", "reset_at_eos", "mqar_num_pairs", "mqar_key_vocab", "mqar_value_vocab", "name",
        "dir", "log_every", "eval_every", "eval_batches", "every", "keep_last"})
    EXPECT_NE(y.find(std::string(k) + ":"), std::string::npos) << k << " missing from\n" << y;
}

TEST_F(ConfigTest, NonDefaultValues) {
  fs::path corpus = tmp_ / "corpus with space.txt";
  write_file(corpus, std::string(1000, 'a'));
  Config c = parse_config(
      default_yaml(),
      {"model.d_model=96", "model.headdim=24", "model.ngroups=2", "model.norm_eps=1e-6",
       "model.vocab_size=300", "train.lr=3e-4", "train.min_lr=0", "train.beta2=0.999",
       "train.adam_eps=1e-12", "train.weight_decay=0.123456789", "train.seed=-5",
       "train.device=cpu", "train.on_nan=skip", "train.resume=never", "data.kind=text",
       "data.path=" + corpus.string(), "data.val_fraction=0.1", "checkpoint.every=7"},
      "x.yaml");
  // --set values are parsed as YAML, so strings with ': ' or ' #' are set directly here.
  c.run.name = "exp: one";
  c.run.dir = (tmp_ / "run #1").string();
  c.checkpoint.dir = c.run.dir + "/ckpt: x";
  expect_round_trip(c);
}

TEST(ConfigRoundTrip, AwkwardDoublesSurvive) {
  Config c = parse_config(default_yaml(), {}, "default");
  c.train.lr = 1.0 / 3.0;
  c.train.min_lr = 0.1 + 0.2;      // 0.30000000000000004: needs 17 significant digits
  c.train.weight_decay = 1e-300;
  c.model.norm_eps = 2.2250738585072014e-308;
  c.data.val_fraction = 0.05;
  Config back = parse_config(ssd::config_to_yaml(c), {}, "rt");
  EXPECT_EQ(back.train.lr, c.train.lr);
  EXPECT_EQ(back.train.min_lr, c.train.min_lr);
  EXPECT_EQ(back.train.weight_decay, c.train.weight_decay);
  EXPECT_EQ(back.model.norm_eps, c.model.norm_eps);
}

TEST(ConfigRoundTrip, StringsThatLookLikeOtherYaml) {
  // Strings YAML would read as numbers, booleans or null must come back as the same strings.
  for (const char* name : {"123", "1e3", "true", "yes", "null", "~", "- x", "a: b", "#c", "'q'"}) {
    SCOPED_TRACE(name);
    Config c = parse_config(default_yaml(), {}, "default");
    c.run.name = name;
    Config back;
    try {
      back = parse_config(ssd::config_to_yaml(c), {}, "rt");
    } catch (const ssd::Error& e) {
      ADD_FAILURE() << "round trip of run.name '" << name << "' failed: " << e.what() << "\n"
                    << ssd::config_to_yaml(c);
      continue;
    }
    EXPECT_EQ(back.run.name, c.run.name);
  }
}

}  // namespace

TEST(ConfigErrors, RecomputeMustBeNoneOrLayers) {
  expect_set_error({"train.recompute=all"}, {"train.recompute", "all"});
  EXPECT_NO_THROW(parse_config(default_yaml(), {"train.recompute=layers"}, "d"));
}

TEST(ConfigErrors, CpCombineMustBeRingOrAllgather) {
  expect_set_error({"parallel.cp_combine=tree"}, {"parallel.cp_combine", "ring or allgather", "tree"});
  EXPECT_EQ(parse_config(default_yaml(), {}, "d").parallel.cp_combine,
            ssd::ParallelConfig{}.cp_combine);
  for (const char* c : {"ring", "allgather"})
    EXPECT_EQ(parse_config(default_yaml(), {std::string("parallel.cp_combine=") + c}, "d")
                  .parallel.cp_combine, c);
}

// data.reset_at_eos: a boolean, true by default for indexed data only, refused by name where the
// data has no documents, and written back as given.
TEST(ConfigErrors, ResetAtEosNeedsDocuments) {
  EXPECT_FALSE(parse_config(default_yaml(), {}, "d").data.reset_at_eos);  // mqar
  EXPECT_FALSE(parse_config(default_yaml(), {"data.reset_at_eos=false"}, "d").data.reset_at_eos);
  expect_set_error({"data.reset_at_eos=true"}, {"data.reset_at_eos", "data.kind=mqar"});
  expect_set_error({"data.reset_at_eos=maybe"}, {"data.reset_at_eos", "boolean"});
  const std::string yaml = "data: {kind: mqar, reset_at_eos: true}\n";
  expect_error([&] { parse_config(yaml, {}, "f.yaml"); }, {"f.yaml", "data.reset_at_eos"});
  Config off = parse_config(default_yaml(), {"data.reset_at_eos=no"}, "d");
  EXPECT_NE(ssd::config_to_yaml(off).find("reset_at_eos: false"), std::string::npos);
}
