// Byte-level BPE tokenizer: ids equal Hugging Face `tokenizers` (tests/data/hf_tokenizer_ref.py
// trains tokenizers and dumps their ids; the shipped fixture data/fixtures/ has ids committed
// alongside, so one test needs no Python), decode inverts encode, the byte map is GPT-2's, and
// malformed tokenizer.json files are refused naming the key.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/error.h"
#include "data/split_regex.h"
#include "data/tokenizer.h"
#include "io/json.h"

#include "testutil.h"

namespace fs = std::filesystem;

namespace {


std::string unhex(const std::string& h) {
  std::string out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out += static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16));
  return out;
}

std::string show(const std::vector<int32_t>& v) {
  std::string s;
  for (auto x : v) s += std::to_string(x) + " ";
  return s;
}

// Compares every case of a cases.json with the C++ tokenizer; returns the number checked.
int check_cases(const fs::path& tokenizer, const fs::path& cases_file) {
  auto tok = ssd::Tokenizer::load(tokenizer.string());
  auto j = ssd::json::parse(ssdtest::read_file(cases_file), cases_file.string());
  const bool roundtrip = j.find("roundtrip")->as_bool();
  int n = 0, bad = 0;
  ssd::BpeCache cache;  // one cache over all cases: cached and fresh merges must agree
  for (const auto& c : j.find("cases")->items()) {
    const std::string text = unhex(c.find("text_hex")->as_string());
    std::vector<int32_t> want;
    for (const auto& v : c.find("ids")->items()) want.push_back(static_cast<int32_t>(v.as_int()));
    std::vector<int32_t> got;
    tok->encode(text, got, &cache);
    if (got != want && ++bad <= 5)
      ADD_FAILURE() << tokenizer << ": ids differ for text '" << text << "'\n  hf:  " << show(want)
                    << "\n  got: " << show(got);
    EXPECT_EQ(tok->encode(text), got) << "uncached encode differs for '" << text << "'";
    EXPECT_EQ(tok->decode(want), unhex(c.find("decoded_hex")->as_string()))
        << tokenizer << ": decode differs for '" << text << "'";
    if (roundtrip) EXPECT_EQ(tok->decode(want, false), text) << tokenizer << ": decode(encode(s)) != s";
    ++n;
  }
  return n;
}

TEST(Tokenizer, ByteMapIsGpt2s) {
  std::set<uint32_t> seen;
  for (int b = 0; b < 256; ++b) seen.insert(ssd::byte_to_codepoint(static_cast<uint8_t>(b)));
  EXPECT_EQ(seen.size(), 256u);
  EXPECT_EQ(ssd::byte_to_codepoint('A'), uint32_t('A'));
  EXPECT_EQ(ssd::byte_to_codepoint(' '), 0x120u);   // 'Ġ'
  EXPECT_EQ(ssd::byte_to_codepoint('\n'), 0x10Au);  // 'Ċ'
  EXPECT_EQ(ssd::byte_to_codepoint(0), 0x100u);
  EXPECT_EQ(ssd::byte_to_codepoint(0xAD), 0x143u);  // soft hyphen, the last unprintable Latin-1
  EXPECT_EQ(ssd::byte_to_codepoint(0xFF), 0xFFu);
}

TEST(Tokenizer, ShippedFixtureMatchesCommittedReference) {
  const fs::path dir = fs::path(SSD_SOURCE_DIR) / "data" / "fixtures";
  if (!ssd::have_split_regex()) GTEST_SKIP() << "built without PCRE2 (libpcre2-dev)";
  EXPECT_GT(check_cases(dir / "tokenizer.json", dir / "tokenizer.ref.json"), 10);
}

TEST(Tokenizer, IdsEqualHuggingFaceTokenizers) {
  if (!ssd::have_split_regex()) GTEST_SKIP() << "built without PCRE2 (libpcre2-dev)";
  const fs::path out = fs::temp_directory_path() / ("ssd_hf_tok_" + std::to_string(::getpid()));
  fs::remove_all(out);
  const std::string script = std::string(SSD_SOURCE_DIR) + "/tests/data/hf_tokenizer_ref.py";
  const int rc = std::system(("python3 '" + script + "' '" + out.string() + "'").c_str());
  if (WIFEXITED(rc) && WEXITSTATUS(rc) == 3)
    GTEST_SKIP() << "the Python package 'tokenizers' is not importable (pip install tokenizers)";
  ASSERT_EQ(rc, 0) << script << " failed";
  int variants = 0;
  for (const char* v : {"gpt2", "gpt2_legacy_merges", "prefix_space", "no_regex", "added_tokens",
                        "llama3_split", "llama3_ignore_merges"}) {
    SCOPED_TRACE(v);
    EXPECT_GT(check_cases(out / v / "tokenizer.json", out / v / "cases.json"), 200);
    ++variants;
  }
  EXPECT_EQ(variants, 7);
  fs::remove_all(out);
}

class TokenizerErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("ssd_tok_err_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  // A minimal byte-level tokenizer.json (256 byte tokens and "ab") with the given parts
  // spliced in: extra model keys, a pre_tokenizer, extra top-level keys.
  std::string write(const std::string& model_extra, const std::string& pre = "",
                    const std::string& top_extra = "") {
    // Every byte's character (two-byte UTF-8 at most: the map stays below U+0800).
    std::string vocab;
    for (int b = 0; b < 256; ++b) {
      const uint32_t cp = ssd::byte_to_codepoint(static_cast<uint8_t>(b));
      std::string u;
      if (cp < 0x80) {
        u += static_cast<char>(cp);
      } else {
        u += static_cast<char>(0xC0 | (cp >> 6));
        u += static_cast<char>(0x80 | (cp & 0x3F));
      }
      vocab += (b ? ", " : "") + ssd::json::dump(ssd::json::Value(u)) + ": " + std::to_string(b);
    }
    const std::string text =
        "{" + top_extra + "\"pre_tokenizer\": " +
        (pre.empty() ? "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": true}" : pre) +
        ", \"model\": {\"type\": \"BPE\", \"vocab\": {" + vocab + ", \"ab\": 256}" + model_extra + "}}";
    const fs::path p = dir_ / ("t" + std::to_string(n_++) + ".json");
    std::ofstream(p) << text;
    return p.string();
  }
  std::string error_of(const std::string& path) {
    try {
      ssd::Tokenizer::load(path);
    } catch (const ssd::Error& e) {
      return e.what();
    }
    return "";
  }
  fs::path dir_;
  int n_ = 0;
};

TEST_F(TokenizerErrors, EachNamesTheKey) {
  if (!ssd::have_split_regex()) GTEST_SKIP() << "built without PCRE2 (libpcre2-dev)";
  // The valid base loads and merges a b -> ab.
  auto ok = ssd::Tokenizer::load(write(", \"merges\": [\"a b\"]"));
  EXPECT_EQ(ok->encode("ab"), std::vector<int32_t>{256});
  EXPECT_EQ(ok->vocab_size(), 257);

  auto expect = [&](const std::string& path, const std::string& a, const std::string& b) {
    const std::string e = error_of(path);
    EXPECT_NE(e.find(a), std::string::npos) << e;
    EXPECT_NE(e.find(b), std::string::npos) << e;
    EXPECT_NE(e.find(path), std::string::npos) << e;
  };
  expect(write(", \"merges\": [\"a c\"]"), "model.merges[0]", "'ac'");
  expect(write(", \"merges\": [\"a b\", \"ab\"]"), "model.merges[1]", "two tokens");
  expect(write(", \"merges\": [[\"a\", 5]]"), "model.merges[0]", "[\"a\",5]");
  expect(write(", \"merges\": [\"a zz\"]"), "model.merges[0]", "'zz'");
  expect(write(", \"merges\": [], \"dropout\": 0.1"), "model.dropout", "random");
  expect(write(", \"merges\": []", "{\"type\": \"Whitespace\"}"), "pre_tokenizer.type", "Whitespace");
  expect(write(", \"merges\": []", "", "\"normalizer\": {\"type\": \"NFC\"}, "), "normalizer", "NFC");
  expect(write(", \"merges\": []",
               "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, \"behavior\": \"Isolated\"}"),
         "pre_tokenizer.pattern.Regex", "does not compile");
  expect(write(", \"merges\": [], \"unk_token\": \"<unk>\""), "model.unk_token", "<unk>");
  expect(write("", "", "\"added_tokens\": [{\"content\": \"x\", \"id\": -1}], "), "added_tokens[0].id", "-1");
  const std::string e = error_of((dir_ / "missing.json").string());
  EXPECT_NE(e.find("missing.json"), std::string::npos) << e;
}

TEST(Tokenizer, DecodeRefusesUnknownIds) {
  const fs::path dir = fs::path(SSD_SOURCE_DIR) / "data" / "fixtures";
  if (!ssd::have_split_regex()) GTEST_SKIP() << "built without PCRE2 (libpcre2-dev)";
  auto tok = ssd::Tokenizer::load((dir / "tokenizer.json").string());
  try {
    tok->decode({1, 2, static_cast<int32_t>(tok->vocab_size())});
    FAIL() << "no error";
  } catch (const ssd::Error& e) {
    EXPECT_NE(std::string(e.what()).find("position 2"), std::string::npos) << e.what();
  }
}

}  // namespace
