// JSON, safetensors, and Hugging Face / mamba_ssm export and import.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <regex>
#include <set>

#include "config/config.h"
#include "io/export.h"
#include "io/json.h"
#include "testutil.h"

namespace fs = std::filesystem;
using namespace ssd;

namespace {

ModelConfig small_model() {
  ModelConfig m;
  m.d_model = 16;
  m.n_layer = 2;
  m.d_state = 8;
  m.headdim = 8;
  m.expand = 2;
  m.ngroups = 1;
  m.d_conv = 4;
  m.chunk_size = 32;
  m.vocab_size = 50;
  m.pad_vocab_size_multiple = 16;
  m.norm_eps = 1e-5;
  return m;
}

// Reference names/shapes of the model, in table order, written out here (not param_table()).
std::vector<HostTensor> make_params(const ModelConfig& m, uint64_t seed) {
  std::vector<std::pair<std::string, Shape>> spec;
  spec.push_back({"embedding.weight", {m.padded_vocab(), m.d_model}});
  for (int i = 0; i < m.n_layer; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    spec.push_back({p + "norm.weight", {m.d_model}});
    spec.push_back({p + "mixer.in_proj.weight", {m.d_in_proj(), m.d_model}});
    spec.push_back({p + "mixer.conv1d.weight", {m.conv_dim(), 1, m.d_conv}});
    spec.push_back({p + "mixer.conv1d.bias", {m.conv_dim()}});
    spec.push_back({p + "mixer.dt_bias", {m.nheads()}});
    spec.push_back({p + "mixer.A_log", {m.nheads()}});
    spec.push_back({p + "mixer.D", {m.nheads()}});
    spec.push_back({p + "mixer.norm.weight", {m.d_inner()}});
    spec.push_back({p + "mixer.out_proj.weight", {m.d_model, m.d_inner()}});
  }
  spec.push_back({"norm_f.weight", {m.d_model}});
  std::vector<HostTensor> out;
  uint64_t s = seed;
  for (auto& [name, shape] : spec)
    out.push_back({name, shape, ssdtest::randn<float>(shape_numel(shape), s++)});
  return out;
}

std::vector<HostTensor> shapes_only(const std::vector<HostTensor>& params) {
  std::vector<HostTensor> out;
  for (const auto& p : params) out.push_back({p.name, p.shape, {}});
  return out;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an ssd::Error";
  return "";
}

#define EXPECT_CONTAINS(haystack, needle)                                          \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos)                 \
      << "message: " << (haystack) << "\nexpected to contain: " << (needle)

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), {});
}

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A raw safetensors file: header length (as given, or the real one), header text, data bytes.
std::string raw_safetensors(const std::string& header, size_t data_bytes,
                            int64_t header_len = -1) {
  std::string h = header;
  while (h.size() % 8) h += ' ';
  uint64_t n = header_len < 0 ? h.size() : static_cast<uint64_t>(header_len);
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + h + std::string(data_bytes, '\x01');
}

// Independent reference for fp32 -> bf16 round-to-nearest-even: pick the nearer of the two
// bf16 neighbours in double arithmetic; on a tie, the one with an even last bit.
uint16_t reference_bf16(float x) {
  if (std::isnan(x)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);  // toward zero
  if ((u & 0xFFFF) == 0) return lo;
  const uint16_t hi = static_cast<uint16_t>(lo + 1);   // away from zero
  auto value = [](uint16_t b) -> double {
    if ((b & 0x7FFF) == 0x7F80) return std::copysign(std::ldexp(1.0, 128), (b & 0x8000) ? -1.0 : 1.0);
    return static_cast<double>(bf16_to_fp32(b));
  };
  const double dlo = std::fabs(static_cast<double>(x) - value(lo));
  const double dhi = std::fabs(static_cast<double>(x) - value(hi));
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) ? hi : lo;
}

class ExportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("ssd_test_export_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

std::vector<std::string> hf_names(const ModelConfig& m) {
  std::vector<std::string> n = {"backbone.embeddings.weight"};
  for (int i = 0; i < m.n_layer; ++i) {
    const std::string p = "backbone.layers." + std::to_string(i) + ".";
    for (const char* x : {"norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight",
                          "mixer.conv1d.bias", "mixer.dt_bias", "mixer.A_log", "mixer.D",
                          "mixer.norm.weight", "mixer.out_proj.weight"})
      n.push_back(p + x);
  }
  n.push_back("backbone.norm_f.weight");
  n.push_back("lm_head.weight");
  return n;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// JSON

TEST(Json, ParseAndDump) {
  const std::string text = R"( {"a": 1, "b": [true, false, null, -2.5e-3, "x\"y\\z\n\u00e9\ud83d\ude00"],
      "c": {"nested": {"deep": [[], {}]}}, "big": 123456789012345678, "neg": -7, "f": 2.0 } )";
  json::Value v = json::parse(text, "test");
  ASSERT_TRUE(v.is_object());
  EXPECT_EQ(v.find("a")->as_int(), 1);
  EXPECT_TRUE(v.find("a")->is_int());
  const auto& b = v.find("b")->items();
  ASSERT_EQ(b.size(), 5u);
  EXPECT_TRUE(b[0].as_bool());
  EXPECT_FALSE(b[1].as_bool());
  EXPECT_TRUE(b[2].is_null());
  EXPECT_DOUBLE_EQ(b[3].as_double(), -2.5e-3);
  EXPECT_EQ(b[4].as_string(), "x\"y\\z\n\xc3\xa9\xf0\x9f\x98\x80");
  EXPECT_EQ(v.find("big")->as_int(), 123456789012345678);
  EXPECT_EQ(v.find("neg")->as_int(), -7);
  EXPECT_FALSE(v.find("f")->is_int());
  EXPECT_EQ(v.find("f")->as_int(), 2);  // integral float accepted as an integer
  EXPECT_EQ(v.find("missing"), nullptr);
  // Keys keep their order; dump -> parse is the identity.
  EXPECT_EQ(v.members()[0].first, "a");
  EXPECT_EQ(v.members()[5].first, "f");
  for (int indent : {-1, 2}) {
    const std::string s = json::dump(v, indent);
    EXPECT_EQ(json::dump(json::parse(s, "again"), -1), json::dump(v, -1)) << s;
  }
  EXPECT_EQ(json::dump(json::parse(R"({"x":[1,2.0,1e-05,0.001,1e+30,-0.5]})", "t")),
            R"({"x":[1,2.0,1e-05,0.001,1e+30,-0.5]})");
}

TEST(Json, Errors) {
  struct Case {
    const char* text;
    const char* what;
  };
  for (const Case& c : {Case{"{\"a\": 1,}", "line 1"}, Case{"{\"a\" 1}", "expected ':'"},
                        Case{"[1, 2", "end of text"}, Case{"{\"a\": 1, \"a\": 2}", "duplicate key"},
                        Case{"\"abc", "unterminated string"}, Case{"01", "after the JSON value"},
                        Case{"{\n  \"a\": tru\n}", "line 2, column 8"}, Case{"", "expected a value"},
                        Case{"[1] x", "after the JSON value"}, Case{"\"\\q\"", "invalid escape"},
                        Case{"-", "invalid number"}}) {
    std::string msg = error_of([&] { json::parse(c.text, "my.json"); });
    EXPECT_CONTAINS(msg, "my.json");
    EXPECT_CONTAINS(msg, c.what);
  }
  std::string deep(100, '[');
  EXPECT_CONTAINS(error_of([&] { json::parse(deep, "d"); }), "nesting");
}

// ---------------------------------------------------------------------------------------------
// bf16

TEST(Bf16, RoundToNearestEvenMatchesReference) {
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 3.14159265f, 1e-40f, -1e-45f,
                           std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                           std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::min()};
  // Exact ties: halfway between two bf16 values, even below and odd below.
  for (uint32_t bits : {0x3F808000u, 0x3F818000u, 0xBF808000u, 0xBF818000u, 0x7F7F8000u,
                        0x7F7F7FFFu, 0x00008000u, 0x00018000u, 0x3F80FFFFu, 0x3F807FFFu}) {
    float f;
    std::memcpy(&f, &bits, 4);
    xs.push_back(f);
  }
  std::mt19937 g(7);
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits = g();
    float f;
    std::memcpy(&f, &bits, 4);
    if (!std::isnan(f)) xs.push_back(f);
  }
  for (float x : xs) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    ASSERT_EQ(fp32_to_bf16(x), reference_bf16(x)) << std::hex << "bits 0x" << u;
  }
  // Specific known answers.
  EXPECT_EQ(fp32_to_bf16(1.0f), 0x3F80);
  float t;
  uint32_t tie_even = 0x3F808000u, tie_odd = 0x3F818000u, to_inf = 0x7F7F8000u;
  std::memcpy(&t, &tie_even, 4);
  EXPECT_EQ(fp32_to_bf16(t), 0x3F80);
  std::memcpy(&t, &tie_odd, 4);
  EXPECT_EQ(fp32_to_bf16(t), 0x3F82);
  std::memcpy(&t, &to_inf, 4);
  EXPECT_EQ(fp32_to_bf16(t), 0x7F80);
  EXPECT_TRUE(std::isnan(bf16_to_fp32(fp32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(bf16_to_fp32(fp32_to_bf16(-std::numeric_limits<float>::signaling_NaN()))));
  EXPECT_EQ(bf16_to_fp32(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_fp32(0xC040), -3.0f);
}

// ---------------------------------------------------------------------------------------------
// safetensors

TEST_F(ExportTest, SafetensorsRoundTrip) {
  std::vector<SafeTensor> ts;
  auto add = [&](std::string name, std::string dtype, Shape shape, uint64_t seed) {
    SafeTensor t{std::move(name), std::move(dtype), std::move(shape), {}};
    const size_t n = static_cast<size_t>(shape_numel(t.shape)) * (t.dtype == "F32" ? 4 : 2);
    std::mt19937 g(static_cast<unsigned>(seed));
    for (size_t i = 0; i < n; ++i) t.bytes.push_back(static_cast<uint8_t>(g()));
    ts.push_back(std::move(t));
  };
  add("a.weight", "F32", {3, 5}, 1);
  add("b", "BF16", {7}, 2);
  add("scalar", "F32", {}, 3);
  add("empty", "BF16", {0, 4}, 4);
  add("z.3d", "F32", {2, 1, 3}, 5);
  const std::string p = path("t.safetensors");
  write_safetensors(p, ts, {{"format", "pt"}, {"note", "quote \" and newline \n"}});

  // The layout: 8-byte LE length, header padded to 8, then the data.
  const std::string raw = slurp(p);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(raw[i]);
  EXPECT_EQ(n % 8, 0u);
  size_t data = 0;
  for (const auto& t : ts) data += t.bytes.size();
  EXPECT_EQ(raw.size(), 8 + n + data);
  json::Value header = json::parse(raw.substr(8, n), "header");
  EXPECT_EQ(header.find("__metadata__")->find("format")->as_string(), "pt");
  EXPECT_EQ(header.find("__metadata__")->find("note")->as_string(), "quote \" and newline \n");
  EXPECT_EQ(header.find("b")->find("dtype")->as_string(), "BF16");
  EXPECT_EQ(json::dump(*header.find("a.weight")->find("shape")), "[3,5]");
  EXPECT_EQ(json::dump(*header.find("a.weight")->find("data_offsets")), "[0,60]");

  const auto back = read_safetensors(p);
  ASSERT_EQ(back.size(), ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    EXPECT_EQ(back[i].name, ts[i].name);
    EXPECT_EQ(back[i].dtype, ts[i].dtype);
    EXPECT_EQ(back[i].shape, ts[i].shape);
    EXPECT_EQ(back[i].bytes, ts[i].bytes);
  }
  const auto hdr = read_safetensors_header(p);
  ASSERT_EQ(hdr.size(), ts.size());
  EXPECT_EQ(hdr[0].shape, ts[0].shape);
  EXPECT_TRUE(hdr[0].bytes.empty());
  for (const auto& e : fs::directory_iterator(dir_))
    EXPECT_EQ(e.path().filename(), "t.safetensors");  // no temp files left
}

TEST_F(ExportTest, SafetensorsWriteRejectsBadInput) {
  const std::string p = path("bad.safetensors");
  SafeTensor t{"x", "F16", {2}, std::vector<uint8_t>(4)};
  EXPECT_CONTAINS(error_of([&] { write_safetensors(p, {t}, {}); }), "F16");
  t.dtype = "F32";
  EXPECT_CONTAINS(error_of([&] { write_safetensors(p, {t}, {}); }), "\"x\" has 4 bytes");
  t.bytes.resize(8);
  EXPECT_CONTAINS(error_of([&] { write_safetensors(p, {t, t}, {}); }), "twice");
  EXPECT_FALSE(fs::exists(p));
}

TEST_F(ExportTest, MalformedSafetensorsAreRejected) {
  const std::string p = path("m.safetensors");
  struct Case {
    std::string file;
    std::vector<std::string> expect;
  };
  const std::string ok_a = R"("a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
  std::vector<Case> cases = {
      {raw_safetensors("{" + ok_a + "}", 8, 4096), {"header length 4096", "past the end"}},
      {std::string("\x10\0\0", 3), {"too short"}},
      {raw_safetensors(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12),
       {"\"b\"", "overlaps", "\"a\""}},
      {raw_safetensors(R"({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}})", 8),
       {"\"a\"", "\"Q7\""}},
      {raw_safetensors(R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8),
       {"\"a\"", "[3]", "8 bytes"}},
      {raw_safetensors(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4),
       {"\"a\"", "past the end of the data"}},
      {raw_safetensors(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})", 16),
       {"gap of 8 bytes", "\"a\""}},
      {raw_safetensors("{" + ok_a + "}", 12), {"4 bytes after the last tensor"}},
      {raw_safetensors(R"({"a": {"dtype": "F32", "shape": [2]}})", 8), {"\"a\"", "data_offsets"}},
      {raw_safetensors(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})", 8),
       {"invalid JSON"}},
      {raw_safetensors(R"([1, 2])", 0), {"expected an object"}},
  };
  for (const auto& c : cases) {
    spit(p, c.file);
    std::string msg = error_of([&] { read_safetensors(p); });
    EXPECT_CONTAINS(msg, p);
    for (const auto& e : c.expect) EXPECT_CONTAINS(msg, e);
  }
  EXPECT_CONTAINS(error_of([&] { read_safetensors(path("none.safetensors")); }), "does not exist");
}

// ---------------------------------------------------------------------------------------------
// Export / import

TEST_F(ExportTest, HuggingFaceNamesShapesAndConfig) {
  const ModelConfig m = small_model();
  const auto params = make_params(m, 11);
  const std::string out = path("hf");
  export_model(m, params, out, ExportFormat::HuggingFace, ExportDType::F32);

  std::set<std::string> files;
  for (const auto& e : fs::directory_iterator(out)) files.insert(e.path().filename());
  EXPECT_EQ(files, (std::set<std::string>{"config.json", "model.safetensors"}));

  const auto ts = read_safetensors(out + "/model.safetensors");
  std::vector<std::string> names;
  for (const auto& t : ts) names.push_back(t.name);
  EXPECT_EQ(names, hf_names(m));
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(ts[i].shape, params[i].shape) << ts[i].name;
    EXPECT_EQ(ts[i].dtype, "F32");
    EXPECT_EQ(std::memcmp(ts[i].bytes.data(), params[i].data.data(), ts[i].bytes.size()), 0);
  }
  EXPECT_EQ(ts.back().bytes, ts.front().bytes);  // lm_head = embedding
  EXPECT_EQ(ts.back().shape, ts.front().shape);

  // transformers needs __metadata__.format == "pt".
  const std::string raw = slurp(out + "/model.safetensors");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(raw[i]);
  EXPECT_EQ(json::parse(raw.substr(8, n), "h").find("__metadata__")->find("format")->as_string(),
            "pt");

  const json::Value c = json::parse(slurp(out + "/config.json"), "config.json");
  EXPECT_EQ(c.find("architectures")->items().at(0).as_string(), "Mamba2ForCausalLM");
  EXPECT_EQ(c.find("model_type")->as_string(), "mamba2");
  EXPECT_EQ(c.find("hidden_size")->as_int(), 16);
  EXPECT_EQ(c.find("num_hidden_layers")->as_int(), 2);
  EXPECT_EQ(c.find("state_size")->as_int(), 8);
  EXPECT_EQ(c.find("head_dim")->as_int(), 8);
  EXPECT_EQ(c.find("num_heads")->as_int(), 4);
  EXPECT_EQ(c.find("expand")->as_int(), 2);
  EXPECT_EQ(c.find("n_groups")->as_int(), 1);
  EXPECT_EQ(c.find("conv_kernel")->as_int(), 4);
  EXPECT_EQ(c.find("chunk_size")->as_int(), 32);
  EXPECT_EQ(c.find("vocab_size")->as_int(), 64);  // padded
  EXPECT_DOUBLE_EQ(c.find("layer_norm_epsilon")->as_double(), 1e-5);
  EXPECT_FALSE(c.find("layer_norm_epsilon")->is_int());
  EXPECT_TRUE(c.find("tie_word_embeddings")->as_bool());
  EXPECT_TRUE(c.find("rms_norm")->as_bool());
  EXPECT_TRUE(c.find("residual_in_fp32")->as_bool());
  EXPECT_FALSE(c.find("use_bias")->as_bool());
  EXPECT_TRUE(c.find("use_conv_bias")->as_bool());
  EXPECT_EQ(c.find("hidden_act")->as_string(), "silu");
  EXPECT_EQ(c.find("torch_dtype")->as_string(), "float32");
  EXPECT_EQ(c.find("time_step_limit")->size(), 2u);
  EXPECT_FALSE((*c.find("time_step_limit"))[0].is_int());  // 0.0, a float for Python
  EXPECT_GT((*c.find("time_step_limit"))[1].as_double(), 1e29);
  for (const char* k : {"pad_token_id", "bos_token_id", "eos_token_id"})
    EXPECT_EQ(c.find(k)->as_int(), 0) << k;
  for (const char* k : {"time_step_min", "time_step_max", "time_step_floor"})
    EXPECT_TRUE(c.find(k) && !c.find(k)->is_int()) << k;
}

TEST_F(ExportTest, MambaSsmNamesAndConfig) {
  const ModelConfig m = small_model();
  const auto params = make_params(m, 12);
  const std::string out = path("ms");
  export_model(m, params, out, ExportFormat::MambaSsm, ExportDType::BF16);
  const auto ts = read_safetensors_header(out + "/model.safetensors");
  auto want = hf_names(m);
  want.front() = "backbone.embedding.weight";
  std::vector<std::string> names;
  for (const auto& t : ts) {
    names.push_back(t.name);
    EXPECT_EQ(t.dtype, "BF16");
  }
  EXPECT_EQ(names, want);

  const json::Value c = json::parse(slurp(out + "/config.json"), "config.json");
  // Exactly the fields of mamba_ssm's MambaConfig (it rejects unknown ones).
  std::set<std::string> keys;
  for (const auto& [k, v] : c.members()) keys.insert(k);
  EXPECT_EQ(keys, (std::set<std::string>{"d_model", "d_intermediate", "n_layer", "vocab_size",
                                         "ssm_cfg", "attn_layer_idx", "attn_cfg", "rms_norm",
                                         "residual_in_fp32", "fused_add_norm",
                                         "pad_vocab_size_multiple", "tie_embeddings"}));
  EXPECT_EQ(c.find("d_model")->as_int(), 16);
  EXPECT_EQ(c.find("d_intermediate")->as_int(), 0);
  EXPECT_EQ(c.find("n_layer")->as_int(), 2);
  EXPECT_EQ(c.find("vocab_size")->as_int(), 50);  // unpadded: mamba_ssm pads it
  EXPECT_EQ(c.find("pad_vocab_size_multiple")->as_int(), 16);
  EXPECT_TRUE(c.find("tie_embeddings")->as_bool());
  EXPECT_TRUE(c.find("fused_add_norm")->as_bool());
  const json::Value& s = *c.find("ssm_cfg");
  EXPECT_EQ(s.find("layer")->as_string(), "Mamba2");
  EXPECT_EQ(s.find("d_state")->as_int(), 8);
  EXPECT_EQ(s.find("d_conv")->as_int(), 4);
  EXPECT_EQ(s.find("expand")->as_int(), 2);
  EXPECT_EQ(s.find("headdim")->as_int(), 8);
  EXPECT_EQ(s.find("ngroups")->as_int(), 1);
  EXPECT_EQ(s.find("chunk_size")->as_int(), 32);
}

TEST_F(ExportTest, RoundTripBothFormatsBothDtypes) {
  const ModelConfig m = small_model();
  const auto params = make_params(m, 13);
  for (ExportFormat fmt : {ExportFormat::HuggingFace, ExportFormat::MambaSsm}) {
    for (ExportDType dt : {ExportDType::F32, ExportDType::BF16}) {
      const std::string out = path("rt");
      fs::remove_all(out);
      export_model(m, params, out, fmt, dt);
      const auto back = import_model(out, m, shapes_only(params));
      ASSERT_EQ(back.size(), params.size());
      for (size_t i = 0; i < params.size(); ++i) {
        ASSERT_EQ(back[i].name, params[i].name);
        ASSERT_EQ(back[i].shape, params[i].shape);
        ASSERT_EQ(back[i].data.size(), params[i].data.size());
        for (size_t j = 0; j < params[i].data.size(); ++j) {
          const float x = params[i].data[j];
          const float want = dt == ExportDType::F32 ? x : bf16_to_fp32(reference_bf16(x));
          ASSERT_EQ(back[i].data[j], want) << params[i].name << "[" << j << "]";
          if (dt == ExportDType::BF16) {
            ASSERT_LE(std::fabs(back[i].data[j] - x), std::fabs(x) * (1.0f / 256));
          }
        }
      }
    }
  }
}

TEST_F(ExportTest, ImportReportsConfigMismatchNamingTheKey) {
  const ModelConfig m = small_model();
  const auto params = make_params(m, 14);
  const auto expected = shapes_only(params);
  const std::string hf = path("hf"), ms = path("ms");
  export_model(m, params, hf, ExportFormat::HuggingFace, ExportDType::F32);
  export_model(m, params, ms, ExportFormat::MambaSsm, ExportDType::F32);

  ModelConfig other = m;
  other.d_state = 16;
  std::string msg = error_of([&] { import_model(hf, other, expected); });
  EXPECT_CONTAINS(msg, hf + "/config.json");
  EXPECT_CONTAINS(msg, "\"state_size\" is 8");
  EXPECT_CONTAINS(msg, "model.d_state = 16");
  msg = error_of([&] { import_model(ms, other, expected); });
  EXPECT_CONTAINS(msg, ms + "/config.json");
  EXPECT_CONTAINS(msg, "\"ssm_cfg.d_state\" is 8");

  other = m;
  other.vocab_size = 100;
  msg = error_of([&] { import_model(hf, other, expected); });
  EXPECT_CONTAINS(msg, "\"vocab_size\"");
  msg = error_of([&] { import_model(ms, other, expected); });
  EXPECT_CONTAINS(msg, "\"vocab_size\"");

  other = m;
  other.n_layer = 3;
  EXPECT_CONTAINS(error_of([&] { import_model(hf, other, expected); }), "\"num_hidden_layers\"");
  EXPECT_CONTAINS(error_of([&] { import_model(ms, other, expected); }), "\"n_layer\"");

  // Edited config.json files.
  std::string cfg = slurp(hf + "/config.json");
  spit(hf + "/config.json", std::regex_replace(cfg, std::regex("\"hidden_size\": 16"),
                                               "\"hidden_size\": 32"));
  msg = error_of([&] { import_model(hf, m, expected); });
  EXPECT_CONTAINS(msg, "\"hidden_size\" is 32");
  EXPECT_CONTAINS(msg, "model.d_model = 16");
  spit(hf + "/config.json", std::regex_replace(cfg, std::regex("  \"head_dim\": 8,\n"), ""));
  EXPECT_CONTAINS(error_of([&] { import_model(hf, m, expected); }), "missing key \"head_dim\"");
  spit(hf + "/config.json", "{\"hidden_size\": 16,");
  msg = error_of([&] { import_model(hf, m, expected); });
  EXPECT_CONTAINS(msg, hf + "/config.json");
  EXPECT_CONTAINS(msg, "invalid JSON");
  spit(hf + "/config.json", cfg);
  import_model(hf, m, expected);  // fine again
}

TEST_F(ExportTest, ImportReportsTensorProblems) {
  const ModelConfig m = small_model();
  const auto params = make_params(m, 15);
  const auto expected = shapes_only(params);
  const std::string hf = path("hf");
  export_model(m, params, hf, ExportFormat::HuggingFace, ExportDType::F32);
  const std::string st = hf + "/model.safetensors";
  const auto orig = read_safetensors(st);

  auto ts = orig;
  ts.erase(ts.begin() + 5);  // backbone.layers.0.mixer.dt_bias
  write_safetensors(st, ts, {{"format", "pt"}});
  std::string msg = error_of([&] { import_model(hf, m, expected); });
  EXPECT_CONTAINS(msg, st);
  EXPECT_CONTAINS(msg, "missing tensor backbone.layers.0.mixer.dt_bias");

  ts = orig;
  ts.push_back({"backbone.layers.0.mixer.in_proj.bias", "F32", {2}, std::vector<uint8_t>(8)});
  write_safetensors(st, ts, {});
  EXPECT_CONTAINS(error_of([&] { import_model(hf, m, expected); }),
                  "unexpected tensor backbone.layers.0.mixer.in_proj.bias");

  ts = orig;
  ts.back().bytes[3] ^= 1;  // lm_head no longer equals the embedding
  write_safetensors(st, ts, {});
  EXPECT_CONTAINS(error_of([&] { import_model(hf, m, expected); }), "lm_head.weight differs");

  ts = orig;
  ts[2].shape = {m.d_model, m.d_in_proj()};  // transposed in_proj
  write_safetensors(st, ts, {});
  msg = error_of([&] { import_model(hf, m, expected); });
  EXPECT_CONTAINS(msg, "backbone.layers.0.mixer.in_proj.weight has shape [16, 84]");
  EXPECT_CONTAINS(msg, "[84, 16]");

  ts = orig;
  ts.front().name = "backbone.embedding.weight";  // mamba_ssm names, HF config
  write_safetensors(st, ts, {});
  EXPECT_CONTAINS(error_of([&] { import_model(hf, m, expected); }), "config.json is in the");

  fs::remove(st);
  EXPECT_CONTAINS(error_of([&] { import_model(hf, m, expected); }), "model.safetensors does not exist");
  EXPECT_CONTAINS(error_of([&] { import_model(path("nowhere"), m, expected); }), "does not exist");
}

TEST_F(ExportTest, ExportRejectsBadParams) {
  const ModelConfig m = small_model();
  auto params = make_params(m, 16);
  params.push_back({"layers.0.mixer.mystery", {3}, {1, 2, 3}});
  EXPECT_CONTAINS(error_of([&] {
                    export_model(m, params, path("x"), ExportFormat::HuggingFace, ExportDType::F32);
                  }),
                  "layers.0.mixer.mystery");
  params = make_params(m, 16);
  ModelConfig other = m;
  other.d_model = 32;
  EXPECT_CONTAINS(error_of([&] {
                    export_model(other, params, path("x"), ExportFormat::HuggingFace,
                                 ExportDType::F32);
                  }),
                  "embedding.weight has shape");
  EXPECT_EQ(export_name("layers.3.mixer.A_log", ExportFormat::MambaSsm),
            "backbone.layers.3.mixer.A_log");
  EXPECT_EQ(export_name("embedding.weight", ExportFormat::HuggingFace), "backbone.embeddings.weight");
  EXPECT_CONTAINS(error_of([&] { export_name("layers.x.norm.weight", ExportFormat::HuggingFace); }),
                  "layers.x.norm.weight");
}

TEST_F(ExportTest, DamagedSafetensorsNeverCrash) {
  // Every truncation, and a byte flipped at every header position, either reads back the same
  // tensors (a harmless change, e.g. inside padding) or throws ssd::Error; nothing else.
  std::vector<SafeTensor> ts = {{"a", "F32", {2, 3}, std::vector<uint8_t>(24, 7)},
                                {"b.c", "BF16", {5}, std::vector<uint8_t>(10, 9)}};
  const std::string p = path("d.safetensors");
  write_safetensors(p, ts, {{"format", "pt"}});
  const std::string good = slurp(p);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(good[i]);
  int errors = 0;
  for (size_t keep = 0; keep < good.size(); ++keep) {
    spit(p, good.substr(0, keep));
    EXPECT_THROW(read_safetensors(p), Error) << "truncated to " << keep;
  }
  for (size_t at = 0; at < 8 + n; ++at) {
    for (unsigned char x : {0x01, 0x20, 0x80}) {
      std::string bad = good;
      bad[at] = static_cast<char>(bad[at] ^ x);
      spit(p, bad);
      try {
        const auto back = read_safetensors(p);
        size_t bytes = 0;
        for (const auto& t : back) bytes += t.bytes.size();
        EXPECT_EQ(bytes, 34u) << "flip at " << at;
      } catch (const Error& e) {
        ++errors;
        EXPECT_CONTAINS(e.what(), p);
      }
    }
  }
  EXPECT_GT(errors, 0);
}
