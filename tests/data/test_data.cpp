// Data sources: MQAR (token ranges, distinct keys, answers recallable from the context, exact
// query count, determinism, per-rank streams, resumable state, fixed eval batches) and byte-level
// text (next-byte targets, held-out tail never read by training, directories of .txt files,
// resumable state, errors naming the path).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "config/config.h"
#include "core/error.h"
#include "data/data.h"

namespace fs = std::filesystem;
using ssd::Config;

namespace {

struct Batch {
  std::vector<int32_t> tok, tgt;
  bool operator==(const Batch& o) const { return tok == o.tok && tgt == o.tgt; }
};

// The next B samples of d's global stream (each source's position kept here, as the trainer
// keeps it).
std::map<const ssd::DataSource*, int64_t> g_position;
Batch next_train(ssd::DataSource& d, int64_t B, int64_t L) {
  Batch b{std::vector<int32_t>(B * L, -7), std::vector<int32_t>(B * L, -7)};
  int64_t& pos = g_position[&d];
  ssd::fill_step(d, pos, 0, 1, B, 1, L, b.tok.data(), b.tgt.data());
  pos += B;
  return b;
}

// Rank r's part of one step of dp ranks at `position`.
Batch rank_step(ssd::DataSource& d, int64_t position, int64_t r, int64_t dp, int64_t B,
                int64_t A, int64_t L) {
  Batch b{std::vector<int32_t>(A * B * L, -7), std::vector<int32_t>(A * B * L, -7)};
  ssd::fill_step(d, position, r, dp, B, A, L, b.tok.data(), b.tgt.data());
  return b;
}

Batch eval_batch(ssd::DataSource& d, int64_t i, int64_t B, int64_t L) {
  Batch b{std::vector<int32_t>(B * L, -7), std::vector<int32_t>(B * L, -7)};
  d.eval_batch(i, b.tok.data(), b.tgt.data(), B, L);
  return b;
}

Config mqar_config(const std::vector<std::string>& sets = {}) {
  // Default config: vocab 80, 8 pairs, 32 keys, 32 values, seq_len 128.
  std::vector<std::string> s = {"model.vocab_size=80", "data.kind=mqar", "data.mqar_num_pairs=8",
                                "data.mqar_key_vocab=32", "data.mqar_value_vocab=32",
                                "train.seq_len=128"};
  s.insert(s.end(), sets.begin(), sets.end());
  return ssd::parse_config("", s, "mqar_test");
}

// Checks every MQAR invariant of one sequence; returns the number of scored positions.
int64_t check_mqar_row(const int32_t* tok, const int32_t* tgt, int64_t L, const Config& c) {
  const int64_t n = c.data.mqar_num_pairs, K = c.data.mqar_key_vocab, V = c.data.mqar_value_vocab;
  const int64_t vocab = c.model.vocab_size;
  for (int64_t t = 0; t < L; ++t) {
    EXPECT_GE(tok[t], 0) << "t=" << t;
    EXPECT_LT(tok[t], vocab) << "t=" << t;
    EXPECT_LT(tok[t], 2 + K + V) << "t=" << t;
    EXPECT_GE(tgt[t], -1) << "t=" << t;
    EXPECT_LT(tgt[t], vocab) << "t=" << t;
  }
  // Context: n (key, value) pairs with distinct keys, then the separator.
  std::set<int32_t> keys;
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_GE(tok[2 * i], 2) << "key at " << 2 * i;
    EXPECT_LT(tok[2 * i], 2 + K) << "key at " << 2 * i;
    EXPECT_GE(tok[2 * i + 1], 2 + K) << "value at " << 2 * i + 1;
    EXPECT_LT(tok[2 * i + 1], 2 + K + V) << "value at " << 2 * i + 1;
    EXPECT_TRUE(keys.insert(tok[2 * i]).second) << "key " << tok[2 * i] << " repeated";
    EXPECT_EQ(tgt[2 * i], -1);
    EXPECT_EQ(tgt[2 * i + 1], -1);
  }
  EXPECT_EQ(tok[2 * n], 1) << "separator";
  EXPECT_EQ(tgt[2 * n], -1);
  // Queries: a key whose target is the value it was paired with in the context.
  int64_t scored = 0;
  std::set<int32_t> queried;
  for (int64_t t = 0; t < L; ++t) {
    if (tgt[t] < 0) continue;
    ++scored;
    EXPECT_GT(t, 2 * n) << "scored position inside the context";
    int64_t found = -1;
    for (int64_t i = 0; i < n; ++i)
      if (tok[2 * i] == tok[t]) found = i;
    EXPECT_GE(found, 0) << "query at " << t << " asks for key " << tok[t] << " not in context";
    if (found >= 0) EXPECT_EQ(tok[2 * found + 1], tgt[t]) << "wrong answer at " << t;
    EXPECT_TRUE(queried.insert(tok[t]).second) << "key " << tok[t] << " queried twice";
    // The answer is the next input token.
    EXPECT_LT(t + 1, L);
    if (t + 1 < L) EXPECT_EQ(tok[t + 1], tgt[t]);
  }
  return scored;
}

// ---------------------------------------------------------------- MQAR

TEST(Mqar, BatchesSatisfyAllInvariants) {
  Config c = mqar_config();
  auto d = ssd::make_data_source(c);
  EXPECT_TRUE(d->reports_accuracy());
  EXPECT_NE(d->describe().find("MQAR"), std::string::npos) << d->describe();
  const int64_t B = 16, L = c.train.seq_len;
  for (int rep = 0; rep < 5; ++rep) {
    Batch b = next_train(*d, B, L);
    for (int64_t r = 0; r < B; ++r) {
      SCOPED_TRACE("batch " + std::to_string(rep) + " row " + std::to_string(r));
      EXPECT_EQ(check_mqar_row(&b.tok[r * L], &b.tgt[r * L], L, c), c.data.mqar_num_pairs);
    }
  }
}

TEST(Mqar, ExactlyNumPairsScoredAtMinimumLength) {
  // 4n+1 is the shortest valid length; every key must still be asked exactly once.
  for (int64_t n : {1, 3, 8, 16}) {
    const int64_t L = 4 * n + 1;
    Config c = mqar_config({"data.mqar_num_pairs=" + std::to_string(n),
                            "train.seq_len=" + std::to_string(L)});
    auto d = ssd::make_data_source(c);
    const int64_t B = 32;
    Batch b = next_train(*d, B, L);
    for (int64_t r = 0; r < B; ++r) {
      SCOPED_TRACE("n=" + std::to_string(n) + " row " + std::to_string(r));
      EXPECT_EQ(check_mqar_row(&b.tok[r * L], &b.tgt[r * L], L, c), n);
    }
    Batch e = eval_batch(*d, 0, B, L);
    for (int64_t r = 0; r < B; ++r) EXPECT_EQ(check_mqar_row(&e.tok[r * L], &e.tgt[r * L], L, c), n);
  }
}

TEST(Mqar, SmallVocabsAndManyPairs) {
  // All keys used (n == K), a single value, and the smallest vocab that fits.
  Config c = mqar_config({"data.mqar_num_pairs=6", "data.mqar_key_vocab=6",
                          "data.mqar_value_vocab=1", "model.vocab_size=9", "train.seq_len=40"});
  auto d = ssd::make_data_source(c);
  Batch b = next_train(*d, 8, 40);
  for (int64_t r = 0; r < 8; ++r) EXPECT_EQ(check_mqar_row(&b.tok[r * 40], &b.tgt[r * 40], 40, c), 6);
}

TEST(Mqar, SameSeedSameBatches) {
  Config c = mqar_config();
  auto a = ssd::make_data_source(c), b = ssd::make_data_source(c);
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(next_train(*a, 4, 128) == next_train(*b, 4, 128)) << i;
}

TEST(Mqar, DifferentSeedDifferentBatches) {
  auto a = ssd::make_data_source(mqar_config({"train.seed=1"}));
  auto b = ssd::make_data_source(mqar_config({"train.seed=2"}));
  EXPECT_FALSE(next_train(*a, 4, 128) == next_train(*b, 4, 128));
}

TEST(Mqar, SuccessiveBatchesDiffer) {
  auto a = ssd::make_data_source(mqar_config());
  Batch b1 = next_train(*a, 4, 128), b2 = next_train(*a, 4, 128);
  EXPECT_FALSE(b1 == b2);
}

TEST(Mqar, RanksSplitTheGlobalBatch) {
  // dp ranks of one step take disjoint blocks of the step's samples; together (in rank order)
  // they are exactly what one process with the same global batch trains on, at every step.
  Config c = mqar_config();
  auto d = ssd::make_data_source(c);
  const int64_t B = 2, L = 128;
  for (int64_t pos : {0, 8, 800}) {
    Batch one = rank_step(*d, pos, 0, 1, B, 4, L);  // 1 process, grad_accum 4
    for (int64_t dp : {2, 4}) {
      std::vector<int32_t> joined;
      for (int64_t r = 0; r < dp; ++r) {
        Batch part = rank_step(*d, pos, r, dp, B, 4 / dp, L);
        joined.insert(joined.end(), part.tok.begin(), part.tok.end());
      }
      EXPECT_EQ(joined, one.tok) << "dp=" << dp << " position " << pos;
    }
    // No two samples of the step are the same.
    for (int i = 0; i < 8; ++i)
      for (int j = i + 1; j < 8; ++j)
        EXPECT_FALSE(std::equal(one.tok.begin() + i * L, one.tok.begin() + (i + 1) * L,
                                one.tok.begin() + j * L))
            << i << " " << j;
  }
}

TEST(Mqar, SampleIsAPureFunctionOfItsIndex) {
  // What a resumed run relies on: sample i is the same from any source of the config, whatever
  // was drawn before, so a position is the whole loader state.
  Config c = mqar_config();
  auto a = ssd::make_data_source(c);
  next_train(*a, 4, 128);
  next_train(*a, 4, 128);
  std::vector<Batch> expected;
  for (int i = 0; i < 3; ++i) expected.push_back(next_train(*a, 4, 128));
  auto b = ssd::make_data_source(c);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(rank_step(*b, 8 + 4 * i, 0, 1, 4, 1, 128) == expected[i]) << i;
  auto other = ssd::make_data_source(mqar_config({"train.seed=999"}));
  EXPECT_FALSE(rank_step(*other, 8, 0, 1, 4, 1, 128) == expected[0]);
}

TEST(Mqar, EvalBatchIsFixed) {
  Config c = mqar_config();
  auto a = ssd::make_data_source(c);
  Batch e0 = eval_batch(*a, 0, 8, 128), e1 = eval_batch(*a, 1, 8, 128);
  EXPECT_FALSE(e0 == e1);
  EXPECT_TRUE(eval_batch(*a, 0, 8, 128) == e0);
  next_train(*a, 8, 128);
  EXPECT_TRUE(eval_batch(*a, 0, 8, 128) == e0);
  EXPECT_TRUE(eval_batch(*a, 1, 8, 128) == e1);
  // Another source of the same config agrees.
  auto b = ssd::make_data_source(c);
  EXPECT_TRUE(eval_batch(*b, 1, 8, 128) == e1);
  for (int64_t r = 0; r < 8; ++r) EXPECT_EQ(check_mqar_row(&e0.tok[r * 128], &e0.tgt[r * 128], 128, c), 8);
  // Eval data is not the training data.
  auto fresh = ssd::make_data_source(c);
  EXPECT_FALSE(next_train(*fresh, 8, 128) == e0);
}

// ---------------------------------------------------------------- text

class TextData : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ssd_test_data_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    tmp_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
  static void write(const fs::path& p, const std::string& s) {
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f << s;
    ASSERT_TRUE(f.good());
  }
  // Random letters from [lo, lo+26): windows of 32+ of them are unique in practice.
  static std::string letters(size_t n, char lo, uint64_t seed) {
    std::mt19937_64 g(seed);
    std::string s(n, ' ');
    for (auto& ch : s) ch = static_cast<char>(lo + g() % 26);
    return s;
  }
  Config text_config(const fs::path& path, int64_t seq_len, double val_fraction,
                     const std::vector<std::string>& extra = {}) {
    std::vector<std::string> s = {"data.kind=text", "data.path=" + path.string(),
                                  "model.vocab_size=256", "train.seq_len=" + std::to_string(seq_len),
                                  "data.val_fraction=" + std::to_string(val_fraction)};
    s.insert(s.end(), extra.begin(), extra.end());
    return ssd::parse_config("", s, "text_test");
  }
  // Finds the window (tokens plus last target) in corpus; checks it lies in [lo, hi) and that
  // every target is the next byte. Returns the offset.
  static int64_t locate(const std::string& corpus, const int32_t* tok, const int32_t* tgt,
                        int64_t L, int64_t lo, int64_t hi) {
    std::string w;
    for (int64_t t = 0; t < L; ++t) {
      EXPECT_GE(tok[t], 0);
      EXPECT_LT(tok[t], 256);
      w.push_back(static_cast<char>(tok[t]));
    }
    EXPECT_GE(tgt[L - 1], 0) << "-1 target although the next byte exists";
    if (tgt[L - 1] >= 0) w.push_back(static_cast<char>(tgt[L - 1]));
    size_t off = corpus.find(w);
    EXPECT_NE(off, std::string::npos) << "window not found in the corpus";
    if (off == std::string::npos) return -1;
    EXPECT_GE(static_cast<int64_t>(off), lo);
    EXPECT_LE(static_cast<int64_t>(off + w.size()), hi) << "window reads past its part";
    for (int64_t t = 0; t < L; ++t) {
      EXPECT_EQ(tok[t], static_cast<uint8_t>(corpus[off + t])) << t;
      // The next byte, or -1 only where the corpus part ends.
      if (static_cast<int64_t>(off) + t + 1 < hi)
        EXPECT_EQ(tgt[t], static_cast<uint8_t>(corpus[off + t + 1])) << t;
      else
        EXPECT_EQ(tgt[t], -1) << t;
    }
    return static_cast<int64_t>(off);
  }
  fs::path tmp_;
};

TEST_F(TextData, TrainTargetsAreNextBytesAndValTailHeldOut) {
  // 9000 lowercase training bytes, then a 1000-byte uppercase tail: val_fraction 0.1 holds
  // out exactly the tail, so no training window may contain an uppercase byte.
  const std::string train = letters(9000, 'a', 1), tail = letters(1000, 'A', 2);
  const std::string corpus = train + tail;
  fs::path file = tmp_ / "corpus.txt";
  write(file, corpus);
  const int64_t L = 48, B = 16;
  Config c = text_config(file, L, 0.1);
  auto d = ssd::make_data_source(c);
  EXPECT_FALSE(d->reports_accuracy());
  EXPECT_NE(d->describe().find("9000"), std::string::npos) << d->describe();
  EXPECT_NE(d->describe().find("1000"), std::string::npos) << d->describe();
  std::set<int64_t> offsets;
  for (int rep = 0; rep < 40; ++rep) {
    Batch b = next_train(*d, B, L);
    for (int64_t r = 0; r < B; ++r) {
      for (int64_t t = 0; t < L; ++t) {
        ASSERT_TRUE(b.tok[r * L + t] >= 'a' && b.tok[r * L + t] <= 'z') << "read the held-out tail";
        ASSERT_TRUE(b.tgt[r * L + t] >= 'a' && b.tgt[r * L + t] <= 'z') << "target in the tail";
      }
      offsets.insert(locate(corpus, &b.tok[r * L], &b.tgt[r * L], L, 0, 9000));
    }
  }
  EXPECT_GT(offsets.size(), 500u) << "training offsets are not spread over the corpus";
  EXPECT_LT(*offsets.begin(), 1000);
  EXPECT_GT(*offsets.rbegin(), 8000 - L);

  // Evaluation windows tile the held-out tail in order and are the same every call.
  Batch e0 = eval_batch(*d, 0, 4, L);
  EXPECT_TRUE(eval_batch(*d, 0, 4, L) == e0);
  for (int64_t r = 0; r < 4; ++r) {
    int64_t off = locate(corpus, &e0.tok[r * L], &e0.tgt[r * L], L, 9000, 10000);
    EXPECT_EQ(off, 9000 + r * L);
  }
  Batch e1 = eval_batch(*d, 1, 4, L);
  EXPECT_FALSE(e0 == e1);
  for (int64_t r = 0; r < 4; ++r) locate(corpus, &e1.tok[r * L], &e1.tgt[r * L], L, 9000, 10000);
  // Far past the number of windows it wraps around, never reading outside the tail.
  Batch e9 = eval_batch(*d, 1000, 4, L);
  for (int64_t r = 0; r < 4; ++r) locate(corpus, &e9.tok[r * L], &e9.tgt[r * L], L, 9000, 10000);
}

TEST_F(TextData, SmallestCorpusUsesEveryWindow) {
  // Exactly 2*(L+1) bytes, no held-out part: training offsets are 0..size-L-1 and the last
  // window's final target is the corpus's last byte.
  const int64_t L = 8;
  const std::string corpus = letters(2 * (L + 1), 'a', 3);
  fs::path file = tmp_ / "small.txt";
  write(file, corpus);
  auto d = ssd::make_data_source(text_config(file, L, 0.0));
  std::set<int64_t> offsets;
  for (int rep = 0; rep < 200; ++rep) {
    Batch b = next_train(*d, 1, L);
    offsets.insert(locate(corpus, b.tok.data(), b.tgt.data(), L, 0, corpus.size()));
  }
  EXPECT_EQ(offsets.size(), corpus.size() - L);
  // With nothing held out, eval falls back to the training bytes.
  Batch e = eval_batch(*d, 0, 1, L);
  locate(corpus, e.tok.data(), e.tgt.data(), L, 0, corpus.size());
}

TEST_F(TextData, DirectoryOfTxtFiles) {
  fs::path dir = tmp_ / "corpus_dir";
  fs::create_directories(dir / "sub");
  const std::string a = letters(700, 'a', 10), b = letters(600, 'a', 11), c = letters(500, 'a', 12);
  write(dir / "b.txt", b);
  write(dir / "a.txt", a);
  write(dir / "sub" / "c.txt", c);
  // Hidden files and directories are skipped.
  fs::create_directories(dir / ".git");
  write(dir / ".git" / "HEAD", std::string(5000, '#'));
  write(dir / ".cache", std::string(5000, '#'));
  const std::string all = a + b + c;  // concatenated in path order
  const int64_t L = 40;
  auto d = ssd::make_data_source(text_config(dir, L, 0.0));
  EXPECT_NE(d->describe().find(std::to_string(all.size())), std::string::npos) << d->describe();
  for (int rep = 0; rep < 30; ++rep) {
    Batch bt = next_train(*d, 8, L);
    for (int64_t r = 0; r < 8; ++r) {
      for (int64_t t = 0; t < L; ++t) ASSERT_NE(bt.tok[r * L + t], '#') << "read a hidden file";
      locate(all, &bt.tok[r * L], &bt.tgt[r * L], L, 0, all.size());
    }
  }
}

TEST_F(TextData, SamplesArePureFunctionsOfIndexAndRanksSplitTheStep) {
  fs::path file = tmp_ / "corpus.txt";
  write(file, letters(5000, 'a', 4));
  Config c = text_config(file, 32, 0.05);
  auto a = ssd::make_data_source(c), b = ssd::make_data_source(c);
  next_train(*a, 4, 32);
  Batch second = next_train(*a, 4, 32);
  EXPECT_TRUE(rank_step(*b, 4, 0, 1, 4, 1, 32) == second);
  Batch one = rank_step(*b, 4, 0, 1, 2, 2, 32);
  Batch r0 = rank_step(*b, 4, 0, 2, 2, 1, 32), r1 = rank_step(*b, 4, 1, 2, 2, 1, 32);
  EXPECT_FALSE(r0 == r1);
  r0.tok.insert(r0.tok.end(), r1.tok.begin(), r1.tok.end());
  EXPECT_EQ(r0.tok, one.tok);
  auto other = ssd::make_data_source(text_config(file, 32, 0.05, {"train.seed=77"}));
  EXPECT_FALSE(rank_step(*other, 4, 0, 1, 4, 1, 32) == second);
}

TEST_F(TextData, TooSmallCorpusNamesPath) {
  fs::path file = tmp_ / "tiny_corpus.txt";
  write(file, std::string(100, 'x'));
  Config c = text_config(file, 64, 0.0);  // needs 2*(64+1) = 130 bytes
  try {
    ssd::make_data_source(c);
    FAIL() << "no error for a 100-byte corpus with seq_len 64";
  } catch (const ssd::Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(file.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("130"), std::string::npos) << msg;
  }
  // An empty file.
  fs::path empty = tmp_ / "empty.txt";
  write(empty, "");
  try {
    ssd::make_data_source(text_config(empty, 8, 0.0));
    FAIL() << "no error for an empty corpus";
  } catch (const ssd::Error& e) {
    EXPECT_NE(std::string(e.what()).find(empty.string()), std::string::npos) << e.what();
  }
  // Big enough overall but the held-out part leaves too little for training.
  fs::path mid = tmp_ / "mid.txt";
  write(mid, std::string(200, 'x'));
  try {
    ssd::make_data_source(text_config(mid, 64, 0.9));
    FAIL() << "no error when the training part is shorter than seq_len+1";
  } catch (const ssd::Error& e) {
    EXPECT_NE(std::string(e.what()).find(mid.string()), std::string::npos) << e.what();
  }
}

TEST_F(TextData, EmptyDirectoryNamesPath) {
  fs::path dir = tmp_ / "no_text_here";
  fs::create_directories(dir);
  try {
    ssd::make_data_source(text_config(dir, 16, 0.0));
    FAIL() << "no error for an empty directory";
  } catch (const ssd::Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir.string()), std::string::npos) << e.what();
  }
  // Only hidden files.
  write(dir / ".hidden", std::string(1000, 'x'));
  try {
    ssd::make_data_source(text_config(dir, 16, 0.0));
    FAIL() << "no error for a directory holding only hidden files";
  } catch (const ssd::Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir.string()), std::string::npos) << e.what();
  }
}

}  // namespace
