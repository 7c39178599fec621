// Megatron indexed datasets (.bin/.idx): the byte layout read back field by field, files of an
// independent writer (tests/data/megatron_indexed_ref.py: numpy after megatron-core's layout, or
// megatron-core itself where it is importable) read, ours read by it, damaged indexes refused
// naming the file and field; and the data.kind=indexed source: packed windows, held-out
// documents, every sample of an epoch exactly once over dp = 1, 2, 4 and across a resume,
// blends in proportion, named errors.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <sstream>

#include "config/config.h"
#include "core/error.h"
#include "data/data.h"
#include "data/indexed_file.h"
#include "data/metrics.h"
#include "data/permutation.h"
#include "io/json.h"

namespace fs = std::filesystem;

namespace {

using Docs = std::vector<std::vector<int32_t>>;

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

template <class T>
T at(const std::string& bytes, size_t off) {
  T v;
  std::memcpy(&v, bytes.data() + off, sizeof v);
  return v;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const ssd::Error& e) {
    return e.what();
  }
  return "(no error)";
}

class Indexed : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ssd_test_indexed_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const Docs& docs,
                    ssd::TokenDType dt = ssd::TokenDType::U16) {
    const std::string prefix = (dir_ / name).string();
    ssd::IndexedWriter w(prefix, dt);
    for (const auto& d : docs) w.add_document(d.data(), static_cast<int64_t>(d.size()));
    w.finish();
    return prefix;
  }
  // Documents whose tokens count up 0, 1, 2, ... through the concatenation, so every token
  // says where it came from.
  static Docs counting(const std::vector<int>& lengths, int32_t start = 0) {
    Docs d;
    int32_t next = start;
    for (int n : lengths) {
      d.emplace_back(n);
      for (auto& t : d.back()) t = next++;
    }
    return d;
  }
  ssd::Config config(const std::string& path, int64_t L, double val,
                     const std::vector<std::string>& more = {}) {
    std::vector<std::string> s = {"data.kind=indexed", "data.path=" + path,
                                  "train.seq_len=" + std::to_string(L),
                                  "data.val_fraction=" + std::to_string(val),
                                  "model.vocab_size=65536"};
    s.insert(s.end(), more.begin(), more.end());
    return ssd::parse_config("", s, "indexed_test");
  }
  fs::path dir_;
};

TEST_F(Indexed, ByteLayoutIsMegatrons) {
  const Docs docs = {{5, 6, 7}, {65535}, {1, 2}};
  const std::string prefix = write("layout", docs);
  const std::string idx = slurp(prefix + ".idx"), bin = slurp(prefix + ".bin");
  ASSERT_EQ(idx.size(), 9u + 8 + 1 + 8 + 8 + 3 * 4 + 3 * 8 + 4 * 8);
  EXPECT_EQ(idx.substr(0, 9), std::string("MMIDIDX\0\0", 9));
  EXPECT_EQ(at<uint64_t>(idx, 9), 1u);   // version
  EXPECT_EQ(uint8_t(idx[17]), 8);        // uint16
  EXPECT_EQ(at<uint64_t>(idx, 18), 3u);  // sequences
  EXPECT_EQ(at<uint64_t>(idx, 26), 4u);  // document index entries
  const int32_t lens[] = {3, 1, 2};
  const int64_t ptrs[] = {0, 6, 8};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(at<int32_t>(idx, 34 + 4 * i), lens[i]) << i;
    EXPECT_EQ(at<int64_t>(idx, 46 + 8 * i), ptrs[i]) << i;
  }
  for (int d = 0; d < 4; ++d) EXPECT_EQ(at<int64_t>(idx, 70 + 8 * d), d) << d;
  ASSERT_EQ(bin.size(), 12u);
  const uint16_t want[] = {5, 6, 7, 65535, 1, 2};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(at<uint16_t>(bin, 2 * i), want[i]) << i;

  // int32 tokens: code 4, 4-byte pointers steps.
  const std::string p32 = write("layout32", {{70000, 1}, {2}}, ssd::TokenDType::I32);
  const std::string idx32 = slurp(p32 + ".idx"), bin32 = slurp(p32 + ".bin");
  EXPECT_EQ(uint8_t(idx32[17]), 4);
  EXPECT_EQ(at<int64_t>(idx32, 34 + 2 * 4 + 8), 8);  // second pointer
  EXPECT_EQ(at<int32_t>(bin32, 0), 70000);
  EXPECT_FALSE(fs::exists(prefix + ".bin.tmp." + std::to_string(::getpid())));
  EXPECT_EQ(ssd::dtype_for_vocab(65536), ssd::TokenDType::U16);
  EXPECT_EQ(ssd::dtype_for_vocab(65537), ssd::TokenDType::I32);
}

TEST_F(Indexed, UnfinishedWriterLeavesNothing) {
  const std::string prefix = (dir_ / "half").string();
  {
    ssd::IndexedWriter w(prefix, ssd::TokenDType::U16);
    const int32_t ids[] = {1, 2, 3};
    w.add_document(ids, 3);
    const int32_t too_big[] = {70000};
    EXPECT_NE(error_of([&] { w.add_document(too_big, 1); }).find("uint16"), std::string::npos);
  }
  EXPECT_TRUE(fs::is_empty(dir_)) << "files left behind by an unfinished writer";
}

// Runs the Python helper; false (test skipped) when numpy is missing.
bool python(const std::string& args) {
  const std::string script = std::string(SSD_SOURCE_DIR) + "/tests/data/megatron_indexed_ref.py";
  const int rc = std::system(("python3 '" + script + "' " + args).c_str());
  if (WIFEXITED(rc) && WEXITSTATUS(rc) == 3) return false;
  EXPECT_EQ(rc, 0) << script << " " << args;
  return true;
}

TEST_F(Indexed, ReadsFilesOfAnIndependentWriter) {
  int checked = 0;
  for (const char* dt : {"uint16", "int32", "uint8", "int16", "int64"}) {
    SCOPED_TRACE(dt);
    const std::string prefix = (dir_ / dt).string();
    if (!python("write '" + prefix + "' " + dt + " 11")) GTEST_SKIP() << "numpy is not importable";
    const auto j = ssd::json::parse(slurp(prefix + ".json"), prefix + ".json");
    ssd::IndexedFile f(prefix);
    EXPECT_STREQ(ssd::dtype_name(f.dtype()), dt);
    const auto& docs = j.find("documents")->items();
    ASSERT_EQ(f.documents(), static_cast<int64_t>(docs.size()));
    int64_t seq = 0;
    for (size_t d = 0; d < docs.size(); ++d) {
      EXPECT_EQ(f.document_start(d), seq);
      for (const auto& s : docs[d].items()) {
        ASSERT_EQ(f.sequence_length(seq), static_cast<int32_t>(s.size()));
        for (size_t k = 0; k < s.size(); ++k) EXPECT_EQ(f.token(seq, k), s[k].as_int());
        ++seq;
      }
    }
    EXPECT_EQ(f.sequences(), seq);
    ++checked;
    std::printf("%s: written by %s\n", dt, j.find("writer")->as_string().c_str());
  }
  EXPECT_EQ(checked, 5);
}

TEST_F(Indexed, IndependentReaderReadsOurFiles) {
  const Docs docs = {{1, 2, 3}, {4}, {65535, 0, 7, 8}};
  const std::string prefix = write("ours", docs);
  if (!python("read '" + prefix + "' '" + prefix + ".read.json'")) GTEST_SKIP() << "numpy is not importable";
  const auto j = ssd::json::parse(slurp(prefix + ".read.json"), "read.json");
  EXPECT_EQ(j.find("dtype")->as_string(), "uint16");
  const auto& got = j.find("documents")->items();
  ASSERT_EQ(got.size(), docs.size());
  for (size_t d = 0; d < docs.size(); ++d) {
    ASSERT_EQ(got[d].size(), 1u) << "one sequence per document";
    std::vector<int32_t> seq;
    for (const auto& t : got[d][0].items()) seq.push_back(static_cast<int32_t>(t.as_int()));
    EXPECT_EQ(seq, docs[d]) << d;
  }
}

TEST_F(Indexed, DamagedIndexesAreRefusedByName) {
  const std::string good = write("good", {{1, 2, 3}, {4, 5}});
  const std::string idx = slurp(good + ".idx"), bin = slurp(good + ".bin");
  int n = 0;
  auto check = [&](std::string bytes, const std::string& needle, const std::string& bin_bytes) {
    const std::string p = (dir_ / ("bad" + std::to_string(n++))).string();
    std::ofstream(p + ".idx", std::ios::binary) << bytes;
    std::ofstream(p + ".bin", std::ios::binary) << bin_bytes;
    const std::string e = error_of([&] { ssd::IndexedFile f(p); });
    EXPECT_NE(e.find(needle), std::string::npos) << "case " << n - 1 << ": " << e;
    EXPECT_NE(e.find(p + ".idx"), std::string::npos) << "case " << n - 1 << ": " << e;
  };
  auto patch = [&](size_t off, const void* v, size_t len) {
    std::string b = idx;
    std::memcpy(b.data() + off, v, len);
    return b;
  };
  const uint64_t two = 2, huge = 1ull << 40;
  const uint8_t code9 = 9, code7 = 7;
  const int32_t neg = -1, long_len = 100;
  const int64_t far = 4000, one = 1, odd = 1;
  check("MMIDIDY" + idx.substr(7), "bad magic", bin);
  check(patch(9, &two, 8), "version (byte 9) is 2", bin);
  check(patch(17, &code9, 1), "dtype code (byte 17) is 9", bin);
  check(patch(17, &code7, 1), "float32", bin);
  check(idx.substr(0, 20), "truncated", bin);
  check(idx.substr(0, idx.size() - 4), "truncated", bin);
  check(patch(18, &huge, 8), "sequence count", bin);
  check(idx + "xyz", "unexpected bytes", bin);
  check(patch(34, &neg, 4), "sequence length 0 is -1", bin);
  check(patch(38, &long_len, 4), "sequence 1", bin);           // length past the end of .bin
  check(patch(42 + 8, &far, 8), "reaches past the end", bin);  // pointer past the end
  check(patch(42 + 8, &odd, 8), "not aligned", bin);
  check(patch(58, &one, 8), "document index entry 0 is 1", bin);
  check(patch(58 + 16, &one, 8), "last document index entry", bin);
  check(idx, "reaches past the end", bin.substr(0, 5));  // .bin truncated
  const std::string e = error_of([&] { ssd::IndexedFile f((dir_ / "absent").string()); });
  EXPECT_NE(e.find("absent.idx"), std::string::npos) << e;
}

TEST(Permutation, IsABijection) {
  for (uint64_t n : {1ull, 2ull, 3ull, 5ull, 16ull, 17ull, 1000ull, 4097ull}) {
    for (uint64_t seed : {1ull, 99ull}) {
      ssd::Permutation p(n, seed);
      std::vector<int> hit(n, 0);
      for (uint64_t i = 0; i < n; ++i) {
        const uint64_t v = p(i);
        ASSERT_LT(v, n);
        ++hit[v];
      }
      EXPECT_EQ(std::count(hit.begin(), hit.end(), 1), static_cast<long>(n)) << n;
    }
  }
  // Shuffled: not the identity, and another seed gives another order.
  ssd::Permutation a(1000, 1), b(1000, 2);
  int fixed = 0, same = 0;
  for (uint64_t i = 0; i < 1000; ++i) fixed += a(i) == i, same += a(i) == b(i);
  EXPECT_LT(fixed, 20);
  EXPECT_LT(same, 20);
}

// The sample a window's tokens came from (the tokens count up through the training split).
int64_t sample_of(const std::vector<int32_t>& tok, const std::vector<int32_t>& tgt, int64_t row,
                  int64_t L) {
  const int32_t first = tok[row * L];
  for (int64_t t = 0; t < L; ++t) {
    EXPECT_EQ(tok[row * L + t], first + t) << "not a contiguous window";
    EXPECT_EQ(tgt[row * L + t], first + t + 1) << "targets are not the next tokens";
  }
  EXPECT_EQ(first % L, 0) << "window not at a multiple of seq_len";
  return first / L;
}

TEST_F(Indexed, SamplesArePackedWindowsAndValDocumentsHeldOut) {
  // 20 documents of 7..45 tokens; the last 2 (10%) are held out.
  std::vector<int> lens;
  for (int d = 0; d < 20; ++d) lens.push_back(7 + (d * 13) % 39);
  const Docs docs = counting(lens);
  int64_t train_tokens = 0;
  for (int d = 0; d < 18; ++d) train_tokens += lens[d];
  const std::string prefix = write("packed", docs);
  const int64_t L = 16, n = (train_tokens - 1) / L;
  auto src = ssd::make_data_source(config(prefix, L, 0.1));
  EXPECT_NE(src->describe().find(std::to_string(n) + " samples"), std::string::npos) << src->describe();
  std::vector<int32_t> tok(L), tgt(L);
  std::set<int64_t> seen;
  for (int64_t i = 0; i < n; ++i) {
    src->train_sample(i, tok.data(), tgt.data(), L);
    const int64_t k = sample_of(tok, tgt, 0, L);
    EXPECT_LT(tgt[L - 1], train_tokens) << "a training sample reads a held-out document";
    seen.insert(k);
  }
  EXPECT_EQ(static_cast<int64_t>(seen.size()), n);
  EXPECT_EQ(*seen.rbegin(), n - 1);

  // Evaluation: windows of the held-out documents only, the same every time.
  std::vector<int32_t> e1(4 * L), t1(4 * L), e2(4 * L), t2(4 * L);
  src->eval_batch(1, e1.data(), t1.data(), 4, L);
  src->eval_batch(1, e2.data(), t2.data(), 4, L);
  EXPECT_EQ(e1, e2);
  EXPECT_EQ(t1, t2);
  for (int64_t i = 0; i < 4 * L; ++i) EXPECT_GE(e1[i], train_tokens) << "eval reads training data";
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t t = 0; t < L; ++t) EXPECT_EQ(t1[r * L + t], e1[r * L + t] + 1);
}

// data.reset_at_eos: the flags of a sample mark where its documents begin (the token after each
// document's last, its end-of-document token), training and held-out windows alike, and
// fill_step lays them out as the tokens.
TEST_F(Indexed, ResetFlagsMarkDocumentStarts) {
  // Counting tokens (a token's value is its position in the concatenation); documents of 1..13
  // tokens, the last 3 held out.
  const std::vector<int> lens = {3, 1, 7, 2, 5, 12, 1, 1, 9, 4, 13, 6, 2, 8, 3, 5};
  std::set<int32_t> starts;
  int32_t at = 0;
  for (int n : lens) starts.insert(at), at += n;
  const std::string prefix = write("resets", counting(lens));
  const int64_t L = 8;
  const ssd::Config cfg = config(prefix, L, 0.2);
  EXPECT_TRUE(cfg.data.reset_at_eos) << "the default for indexed data";
  auto src = ssd::make_data_source(cfg);
  ASSERT_TRUE(src->has_documents());
  std::vector<int32_t> tok(L), tgt(L), reset(L, -1);
  int64_t flagged = 0;
  for (int64_t i = 0; i < 8; ++i) {
    src->train_sample(i, tok.data(), tgt.data(), L);
    src->train_resets(i, reset.data(), L);
    for (int64_t t = 0; t < L; ++t) {
      EXPECT_EQ(reset[t], starts.count(tok[t]) ? 1 : 0) << "sample " << i << " token " << t;
      flagged += reset[t];
    }
  }
  EXPECT_GT(flagged, 8);
  std::vector<int32_t> e(3 * L), et(3 * L), er(3 * L, -1);
  src->eval_batch(0, e.data(), et.data(), 3, L);
  src->eval_resets(0, er.data(), 3, L);
  for (int64_t j = 0; j < 3 * L; ++j) EXPECT_EQ(er[j], starts.count(e[j]) ? 1 : 0) << j;
  // fill_step: the flags of each sample beside its tokens.
  std::vector<int32_t> ft(2 * 3 * L), fg(2 * 3 * L), fr(2 * 3 * L, -1);
  ssd::fill_step(*src, 4, 1, 2, 3, 1, L, ft.data(), fg.data(), fr.data());
  for (size_t j = 0; j < ft.size() / 2; ++j) EXPECT_EQ(fr[j], starts.count(ft[j]) ? 1 : 0) << j;
}

TEST(ResetAtEos, OnlyIndexedDataHasDocuments) {
  const ssd::Config mqar = ssd::parse_config("", {}, "t");
  EXPECT_FALSE(mqar.data.reset_at_eos);
  auto src = ssd::make_data_source(mqar);
  EXPECT_FALSE(src->has_documents());
  std::vector<int32_t> r(5, 7);
  src->train_resets(0, r.data(), 5);
  EXPECT_EQ(r, std::vector<int32_t>(5, 0));
}

// Every sample of the epoch exactly once, over steps of micro_batch * grad_accum * dp global
// samples split with fill_step, with a resume (a fresh source from a saved position) halfway.
TEST_F(Indexed, EachEpochSeesEverySampleOnceOverDpAndResume) {
  const std::string prefix = write("epoch", counting(std::vector<int>(40, 25)));  // 1000 tokens
  const int64_t L = 8, n = (1000 - 1) / L;  // 124 samples
  const int64_t B = 2, A = 2;
  std::vector<int64_t> reference;
  for (int64_t dp : {1, 2, 4}) {
    SCOPED_TRACE("dp=" + std::to_string(dp));
    const int64_t per_step = B * A * dp;
    std::map<int64_t, int> count;  // sample -> times seen, over two epochs
    std::vector<int64_t> order;
    int64_t position = 0;
    auto src = ssd::make_data_source(config(prefix, L, 0.0));
    for (int64_t step = 0; position + per_step <= 2 * n + per_step; ++step) {
      if (step == 7) {  // resume: a new source, the loader state is the position alone
        src = ssd::make_data_source(config(prefix, L, 0.0));
      }
      for (int64_t r = 0; r < dp; ++r) {
        std::vector<int32_t> tok(A * B * L), tgt(A * B * L);
        ssd::fill_step(*src, position, r, dp, B, A, L, tok.data(), tgt.data());
        for (int64_t row = 0; row < A * B; ++row) order.push_back(sample_of(tok, tgt, row, L));
      }
      position += per_step;
    }
    ASSERT_GE(static_cast<int64_t>(order.size()), 2 * n);
    for (int e = 0; e < 2; ++e) {
      std::set<int64_t> epoch(order.begin() + e * n, order.begin() + (e + 1) * n);
      EXPECT_EQ(static_cast<int64_t>(epoch.size()), n) << "epoch " << e << " repeats a sample";
      EXPECT_EQ(*epoch.rbegin(), n - 1);
    }
    EXPECT_FALSE(std::equal(order.begin(), order.begin() + n, order.begin() + n))
        << "both epochs in the same order";
    order.resize(2 * n);
    if (reference.empty()) reference = order;
    EXPECT_EQ(order, reference) << "the global stream depends on dp";
  }
  // Another seed, another order.
  auto other = ssd::make_data_source(config(prefix, L, 0.0, {"train.seed=7"}));
  std::vector<int32_t> tok(L), tgt(L);
  int same = 0;
  for (int64_t i = 0; i < n; ++i) {
    other->train_sample(i, tok.data(), tgt.data(), L);
    same += sample_of(tok, tgt, 0, L) == reference[i];
  }
  EXPECT_LT(same, n / 4);
}

TEST_F(Indexed, BlendDrawsInProportionAndCoversEachDataset) {
  // Tokens of dataset A count from 0, of B from 30000: each sample says where it came from.
  const std::string a = write("a", counting(std::vector<int>(10, 41)));
  const std::string b = write("b", counting(std::vector<int>(10, 41), 30000));
  const int64_t L = 10, na = (410 - 1) / L;
  auto src = ssd::make_data_source(config("3 " + a + " 1 " + b, L, 0.0));
  std::vector<int32_t> tok(L), tgt(L);
  int64_t from_a = 0;
  std::vector<int64_t> a_samples;
  const int64_t N = 4096 * 2;
  for (int64_t i = 0; i < N; ++i) {
    src->train_sample(i, tok.data(), tgt.data(), L);
    if (tok[0] < 30000) {
      ++from_a;
      a_samples.push_back(tok[0] / L);
    }
  }
  EXPECT_NEAR(double(from_a) / N, 0.75, 0.001);
  // Dataset A's own stream: every na consecutive draws of it are one epoch of its samples.
  for (int64_t e = 0; e + 1 < 3; ++e) {
    std::set<int64_t> ep(a_samples.begin() + e * na, a_samples.begin() + (e + 1) * na);
    EXPECT_EQ(static_cast<int64_t>(ep.size()), na) << "epoch " << e << " of dataset a";
  }
  // Eval alternates between the datasets.
  std::vector<int32_t> et(2 * L), eg(2 * L);
  src->eval_batch(0, et.data(), eg.data(), 2, L);
  EXPECT_LT(et[0], 30000);
  EXPECT_GE(et[L], 30000);
}

TEST_F(Indexed, ErrorsNameTheFileKeyAndPosition) {
  const std::string prefix = write("big_ids", {{1, 2, 3, 4, 5, 6, 300, 8, 9, 10, 11, 12}});
  auto src = ssd::make_data_source(config(prefix, 4, 0.0, {"model.vocab_size=256"}));
  std::vector<int32_t> tok(4), tgt(4);
  std::string e;
  for (int64_t i = 0; i < 4 && e.empty(); ++i) {
    std::string x = error_of([&] { src->train_sample(i, tok.data(), tgt.data(), 4); });
    if (x != "(no error)") e = x;
  }
  EXPECT_NE(e.find("big_ids.bin"), std::string::npos) << e;
  EXPECT_NE(e.find("token id 300 at token 6"), std::string::npos) << e;
  EXPECT_NE(e.find("model.vocab_size 256"), std::string::npos) << e;

  const std::string empty = write("empty", {});
  e = error_of([&] { ssd::make_data_source(config(empty, 4, 0.0)); });
  EXPECT_NE(e.find("empty"), std::string::npos) << e;
  EXPECT_NE(e.find("is empty"), std::string::npos) << e;

  const std::string small = write("small", {{1, 2, 3}, {4}});
  e = error_of([&] { ssd::make_data_source(config(small, 4, 0.0)); });
  EXPECT_NE(e.find("fewer than one sample"), std::string::npos) << e;
  EXPECT_NE(e.find("train.seq_len"), std::string::npos) << e;

  const std::string two = write("two", {{1, 2, 3, 4, 5, 6, 7, 8, 9}, {1, 2}});
  e = error_of([&] { ssd::make_data_source(config(two, 4, 0.5)); });
  EXPECT_NE(e.find("data.val_fraction"), std::string::npos) << e;

  e = error_of([&] { config((dir_ / "nope").string(), 4, 0.0); });
  EXPECT_NE(e.find("nope.idx' does not exist"), std::string::npos) << e;
  e = error_of([&] { config("0.5 " + two + " x " + two, 4, 0.0); });
  EXPECT_NE(e.find("blend weight 2 ('x')"), std::string::npos) << e;
  e = error_of([&] { config("0.5 " + two + " 1", 4, 0.0); });
  EXPECT_NE(e.find("pairs of weight and prefix"), std::string::npos) << e;
  e = error_of([&] { ssd::parse_config("", {"data.kind=indexed"}, "t"); });
  EXPECT_NE(e.find("data.path' is required"), std::string::npos) << e;
}

}  // namespace

namespace {

TEST(EvalMetrics, PerplexityForTokensBitsPerByteForText) {
  ssd::Config c;
  c.data.kind = "indexed";
  EXPECT_EQ(ssd::eval_metrics_text(c, 2.0), "perplexity 7.389");  // e^2
  c.data.kind = "text";
  EXPECT_EQ(ssd::eval_metrics_text(c, 1.5 * 0.6931471805599453), "bits/byte 1.5000");
  c.data.kind = "mqar";
  EXPECT_EQ(ssd::eval_metrics_text(c, 1.0), "");
}

}  // namespace
