// `ssdtrain tokenize` end to end: text files, directories and JSONL become one document each
// (per file / per line) with the end-of-document token after each, ids equal to the tokenizer's
// own encode, the output independent of --threads, the result readable as data.kind=indexed,
// and failures (a JSONL line without the key, no end-of-document token) leave no files.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/indexed_file.h"
#include "data/split_regex.h"
#include "data/tokenizer.h"

#include "testutil.h"

namespace fs = std::filesystem;

namespace {


class TokenizeCli : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!ssd::have_split_regex()) GTEST_SKIP() << "built without PCRE2 (libpcre2-dev)";
    char tmpl[] = "/tmp/ssd_test_tokenize_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    tokenizer_ = std::string(SSD_SOURCE_DIR) + "/data/fixtures/tokenizer.json";
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  int run(const std::string& args, std::string* err = nullptr) {
    const std::string e = (dir_ / "stderr.txt").string();
    const int rc = std::system((std::string("'") + SSD_BINARY + "' tokenize " + args + " >/dev/null 2>'" + e + "'").c_str());
    if (err) *err = ssdtest::read_file(e);
    fs::remove(e);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
  }
  void put(const fs::path& p, const std::string& text) {
    fs::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary) << text;
  }
  fs::path dir_;
  std::string tokenizer_;
};

TEST_F(TokenizeCli, DocumentsAreEncodedAndEndWithEos) {
  const std::string a = "Größe der Straße — 12345678901234567890 😀👍🏽\n", b = "second\tfile   with  spaces";
  const std::string j1 = "the first line ünïcödé", j2 = "line \"two\" with <|endoftext|> inside";
  put(dir_ / "in" / "a.txt", a);
  put(dir_ / "in" / "sub" / "b.txt", b);
  put(dir_ / "in" / ".hidden", "never read");
  put(dir_ / "in" / "empty.txt", "");
  put(dir_ / "docs.jsonl", "{\"text\": \"" + j1 + "\", \"id\": 1}\n\n{\"id\": 2, \"text\": \"line \\\"two\\\" with <|endoftext|> inside\"}\n");
  const std::string out = (dir_ / "out" / "corpus").string();
  std::string err;
  ASSERT_EQ(run("--tokenizer '" + tokenizer_ + "' --input '" + (dir_ / "in").string() + "' '" +
                (dir_ / "docs.jsonl").string() + "' --out '" + out + "' --threads 2", &err), 0) << err;
  EXPECT_NE(err.find("MB/s"), std::string::npos) << err;

  auto tok = ssd::Tokenizer::load(tokenizer_);
  const int32_t eos = *tok->token_to_id("<|endoftext|>");
  ssd::IndexedFile f(out);
  EXPECT_EQ(f.dtype(), ssd::TokenDType::U16);
  // Directory files in name order (a.txt, empty.txt skipped, sub/b.txt), then the JSONL lines.
  const std::vector<std::string> texts = {a, b, j1, j2};
  ASSERT_EQ(f.documents(), 4);
  for (int d = 0; d < 4; ++d) {
    std::vector<int32_t> want = tok->encode(texts[d]);
    want.push_back(eos);
    std::vector<int32_t> got(f.sequence_length(d));
    f.read(d, 0, got.size(), got.data(), tok->vocab_size());
    EXPECT_EQ(got, want) << "document " << d;
    EXPECT_EQ(f.document_start(d), d);
  }

  // One thread writes the same bytes.
  const std::string out1 = (dir_ / "one").string();
  ASSERT_EQ(run("--tokenizer '" + tokenizer_ + "' --input '" + (dir_ / "in").string() + "' '" +
                (dir_ / "docs.jsonl").string() + "' --out '" + out1 + "' --threads 1"), 0);
  EXPECT_EQ(ssdtest::read_file(out1 + ".bin"), ssdtest::read_file(out + ".bin"));
  EXPECT_EQ(ssdtest::read_file(out1 + ".idx"), ssdtest::read_file(out + ".idx"));
}

TEST_F(TokenizeCli, FailuresNameTheCauseAndLeaveNoFiles) {
  put(dir_ / "bad.jsonl", "{\"text\": \"fine\"}\n{\"body\": \"no text key\"}\n");
  const std::string out = (dir_ / "out").string();
  std::string err;
  EXPECT_NE(run("--tokenizer '" + tokenizer_ + "' --input '" + (dir_ / "bad.jsonl").string() +
                "' --out '" + out + "'", &err), 0);
  EXPECT_NE(err.find("bad.jsonl line 2: no key 'text'"), std::string::npos) << err;
  EXPECT_EQ(run("--tokenizer '" + tokenizer_ + "' --input '" + (dir_ / "bad.jsonl").string() +
                "' --out '" + out + "' --jsonl-key body", &err), 1) << err;  // line 1 lacks it
  EXPECT_NE(err.find("line 1: no key 'body'"), std::string::npos) << err;

  // A tokenizer without an end-of-document token.
  std::string j = ssdtest::read_file(tokenizer_);
  const std::string eos = "<|endoftext|>";
  for (size_t p; (p = j.find(eos)) != std::string::npos;) j.replace(p, eos.size(), "<|something|>");
  put(dir_ / "noeos" / "tokenizer.json", j);
  put(dir_ / "t.txt", "text");
  EXPECT_NE(run("--tokenizer '" + (dir_ / "noeos" / "tokenizer.json").string() + "' --input '" +
                (dir_ / "t.txt").string() + "' --out '" + out + "'", &err), 0);
  EXPECT_NE(err.find("no end-of-document token"), std::string::npos) << err;
  EXPECT_NE(err.find("eos_token"), std::string::npos) << err;
  // ...unless one is named.
  EXPECT_EQ(run("--tokenizer '" + (dir_ / "noeos" / "tokenizer.json").string() + "' --input '" +
                (dir_ / "t.txt").string() + "' --out '" + (dir_ / "named").string() +
                "' --eos '<|something|>'", &err), 0) << err;

  for (const auto& e : fs::directory_iterator(dir_)) {
    const std::string name = e.path().filename().string();
    EXPECT_TRUE(name.rfind("out", 0) != 0) << "left behind: " << name;
  }
  EXPECT_EQ(run("--help"), 0);
  EXPECT_NE(run("--tokenizer '" + tokenizer_ + "' --out x", &err), 0);
  EXPECT_NE(err.find("--input"), std::string::npos) << err;
}

}  // namespace
