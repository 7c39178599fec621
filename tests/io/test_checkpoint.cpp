// Checkpoints: HDF5 round trip, atomic writes, and a clear error for every kind of bad file.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "config/config.h"
#include "io/checkpoint.h"
#include "testutil.h"

namespace fs = std::filesystem;
using namespace ssd;

namespace {

// Parameter names and shapes of a 2-layer model, written out here so the test does not depend
// on the parameter table.
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

ModelConfig small_model() {
  ModelConfig m;
  m.d_model = 16;
  m.n_layer = 2;
  m.d_state = 8;
  m.headdim = 8;
  m.vocab_size = 50;
  m.pad_vocab_size_multiple = 16;
  return m;
}

CheckpointData make_ckpt(uint64_t seed) {
  ModelConfig m = small_model();
  CheckpointData c;
  c.step = 1234;
  c.config_yaml = "model:\n  d_model: 16\n  n_layer: 2\ntrain:\n  lr: 0.003  # \"quoted\" text\n";
  c.params = make_params(m, seed);
  c.adam_m = make_params(m, seed + 1000);
  c.adam_v = make_params(m, seed + 2000);
  for (auto& t : c.adam_v)
    for (auto& x : t.data) x = x * x;
  // Special values survive bit for bit.
  auto& d = c.params[0].data;
  d[0] = -0.0f;
  d[1] = std::numeric_limits<float>::infinity();
  d[2] = std::numeric_limits<float>::denorm_min();
  d[3] = std::numeric_limits<float>::quiet_NaN();
  c.state["rng"] = {1, 2, 3, std::numeric_limits<uint64_t>::max()};
  c.state["data.position"] = {987654321};
  c.state["empty"] = {};
  return c;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void expect_same_tensors(const std::vector<HostTensor>& a, const std::vector<HostTensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    EXPECT_EQ(a[i].shape, b[i].shape) << a[i].name;
    EXPECT_TRUE(same_bits(a[i].data, b[i].data)) << a[i].name;
  }
}

// The message of the ssd::Error that f throws ("" and a test failure if it throws nothing).
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

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("ssd_test_ckpt_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::vector<std::string> listing() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_)) out.push_back(e.path().filename());
    std::sort(out.begin(), out.end());
    return out;
  }
  fs::path dir_;
};

void flip_byte(const std::string& file, uint64_t offset) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f.good());
  f.seekg(static_cast<std::streamoff>(offset));
  char c;
  f.read(&c, 1);
  c ^= 0x10;
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

uint64_t dataset_offset(const std::string& file, const std::string& dataset) {
  hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  EXPECT_GE(f, 0);
  hid_t d = H5Dopen2(f, dataset.c_str(), H5P_DEFAULT);
  EXPECT_GE(d, 0) << dataset;
  haddr_t off = H5Dget_offset(d);
  EXPECT_NE(off, HADDR_UNDEF);
  H5Dclose(d);
  H5Fclose(f);
  return off;
}

}  // namespace

TEST(Crc32, KnownValue) {
  const char* s = "123456789";
  EXPECT_EQ(crc32(s, 9), 0xCBF43926u);
  EXPECT_EQ(crc32(s + 4, 5, crc32(s, 4)), 0xCBF43926u);  // continues
  EXPECT_EQ(crc32(nullptr, 0), 0u);
}

TEST(CheckpointPath, Format) {
  EXPECT_EQ(checkpoint_path("runs/x/ckpt", 1234), "runs/x/ckpt/step_00001234.h5");
  EXPECT_EQ(checkpoint_path("d", 0), "d/step_00000000.h5");
  EXPECT_EQ(checkpoint_path("d", 123456789), "d/step_123456789.h5");
}

TEST_F(CheckpointTest, RoundTripIsExact) {
  const CheckpointData c = make_ckpt(7);
  const std::string p = path("step_00001234.h5");
  write_checkpoint(p, c);
  const CheckpointData r = read_checkpoint(p);
  EXPECT_EQ(r.format_version, kCheckpointFormatVersion);
  EXPECT_EQ(r.step, c.step);
  EXPECT_EQ(r.config_yaml, c.config_yaml);
  EXPECT_EQ(r.source, p);
  expect_same_tensors(r.params, c.params);
  expect_same_tensors(r.adam_m, c.adam_m);
  expect_same_tensors(r.adam_v, c.adam_v);
  EXPECT_EQ(r.state, c.state);
  // Nothing but the checkpoint is left behind.
  EXPECT_EQ(listing(), std::vector<std::string>{"step_00001234.h5"});
}

TEST_F(CheckpointTest, WithoutOptimizerStateAndOverwrite) {
  CheckpointData c = make_ckpt(3);
  c.adam_m.clear();
  c.adam_v.clear();
  c.config_yaml = "";
  const std::string p = path("a.h5");
  write_checkpoint(p, make_ckpt(1));
  write_checkpoint(p, c);  // replaces the first
  const CheckpointData r = read_checkpoint(p);
  expect_same_tensors(r.params, c.params);
  EXPECT_TRUE(r.adam_m.empty());
  EXPECT_TRUE(r.adam_v.empty());
  EXPECT_EQ(r.config_yaml, "");
  EXPECT_EQ(listing(), std::vector<std::string>{"a.h5"});
}

TEST_F(CheckpointTest, FailedWriteWhenParentIsAFileLeavesNothing) {
  { std::ofstream(path("plain_file")) << "x"; }
  const std::string p = path("plain_file") + "/step_00000001.h5";
  std::string msg = error_of([&] { write_checkpoint(p, make_ckpt(1)); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(p));
  EXPECT_EQ(listing(), std::vector<std::string>{"plain_file"});
}

TEST_F(CheckpointTest, FailedRenameOntoDirectoryLeavesNoFileOrTemp) {
  const std::string p = path("step_00000001.h5");
  fs::create_directories(p);
  std::string msg = error_of([&] { write_checkpoint(p, make_ckpt(1)); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_TRUE(fs::is_directory(p));  // still the directory, no file under that name
  EXPECT_EQ(listing(), std::vector<std::string>{"step_00000001.h5"});  // no *.tmp.*
}

// A write that fails at any byte of the file (here: the file-size limit, EFBIG, standing in for
// a full disk) is reported with errno and the checkpoint's name, leaves no file or temp file,
// and leaves HDF5 usable: the next write and read in the same process work.
TEST_F(CheckpointTest, WriteFailingAtAnyOffsetLeavesNothingAndHdf5Works) {
  const std::string good = path("good.h5"), p = path("step_00000002.h5");
  write_checkpoint(good, make_ckpt(1));
  const auto size = static_cast<rlim_t>(fs::file_size(good));
  std::vector<rlim_t> limits = {0, 1, 4096};
  for (rlim_t at = size / 23; at < size; at += size / 23) limits.push_back(at);
  for (rlim_t back = 1; back <= 8192 && back < size; back *= 2) limits.push_back(size - back);
  rlimit old;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  auto* old_handler = std::signal(SIGXFSZ, SIG_IGN);  // write() then fails with EFBIG
  for (rlim_t limit : limits) {
    rlimit lim = old;
    lim.rlim_cur = limit;
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
    std::string msg = error_of([&] { write_checkpoint(p, make_ckpt(2)); });
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old), 0);
    EXPECT_NE(msg.find(p), std::string::npos) << "limit " << limit << ": " << msg;
    EXPECT_NE(msg.find(std::strerror(EFBIG)), std::string::npos) << "limit " << limit << ": " << msg;
    EXPECT_EQ(listing(), std::vector<std::string>{"good.h5"}) << "limit " << limit;
  }
  std::signal(SIGXFSZ, old_handler);
  write_checkpoint(p, make_ckpt(2));
  expect_same_tensors(read_checkpoint(p).adam_v, make_ckpt(2).adam_v);
  expect_same_tensors(read_checkpoint(good).params, make_ckpt(1).params);
}

TEST_F(CheckpointTest, WriteRejectsMismatchedOptimizerState) {
  CheckpointData c = make_ckpt(1);
  c.adam_v[3].name = "bogus";
  const std::string p = path("x.h5");
  std::string msg = error_of([&] { write_checkpoint(p, c); });
  EXPECT_NE(msg.find("adam_v"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(p));
  c = make_ckpt(1);
  c.params[2].data.pop_back();
  msg = error_of([&] { write_checkpoint(p, c); });
  EXPECT_NE(msg.find(c.params[2].name), std::string::npos) << msg;
  c = make_ckpt(1);
  c.state["a/b"] = {1};
  msg = error_of([&] { write_checkpoint(p, c); });
  EXPECT_NE(msg.find("a/b"), std::string::npos) << msg;
  EXPECT_TRUE(listing().empty());
}

TEST_F(CheckpointTest, MissingFile) {
  const std::string p = path("nope.h5");
  std::string msg = error_of([&] { read_checkpoint(p); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
}

TEST_F(CheckpointTest, NotAnHdf5File) {
  const std::string p = path("junk.h5");
  { std::ofstream(p) << "this is not a checkpoint\n"; }
  std::string msg = error_of([&] { read_checkpoint(p); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("not an HDF5 file"), std::string::npos) << msg;
}

TEST_F(CheckpointTest, TruncatedFile) {
  const std::string p = path("t.h5");
  write_checkpoint(p, make_ckpt(1));
  const auto size = fs::file_size(p);
  for (uintmax_t keep : {size / 2, size - 1, uintmax_t{4}}) {
    write_checkpoint(p, make_ckpt(1));
    fs::resize_file(p, keep);
    std::string msg = error_of([&] { read_checkpoint(p); });
    EXPECT_NE(msg.find(p), std::string::npos) << msg;
    EXPECT_TRUE(msg.find("truncated") != std::string::npos) << msg;
  }
}

TEST_F(CheckpointTest, FlippedDataByteIsDetected) {
  const std::string p = path("f.h5");
  for (std::string ds : {"/params/layers.1.mixer.in_proj.weight", "/adam_v/embedding.weight",
                         "/params/layers.0.mixer.D", "/state/rng"}) {
    write_checkpoint(p, make_ckpt(1));
    flip_byte(p, dataset_offset(p, ds) + 5);
    std::string msg = error_of([&] { read_checkpoint(p); });
    EXPECT_NE(msg.find(p), std::string::npos) << msg;
    EXPECT_NE(msg.find(ds), std::string::npos) << msg;
    EXPECT_NE(msg.find("checksum mismatch"), std::string::npos) << msg;
  }
}

TEST_F(CheckpointTest, MissingDataset) {
  const std::string p = path("m.h5");
  for (std::string ds : {"/adam_v/layers.0.mixer.D", "/params/norm_f.weight", "/state/rng",
                         "/config_yaml"}) {
    write_checkpoint(p, make_ckpt(1));
    {
      hid_t f = H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
      ASSERT_GE(f, 0);
      ASSERT_GE(H5Ldelete(f, ds.c_str(), H5P_DEFAULT), 0) << ds;
      H5Fclose(f);
    }
    std::string msg = error_of([&] { read_checkpoint(p); });
    EXPECT_NE(msg.find(p), std::string::npos) << msg;
    EXPECT_NE(msg.find("missing dataset " + ds), std::string::npos) << msg;
  }
}

TEST_F(CheckpointTest, OptimizerNamesMustMatchParams) {
  const std::string p = path("x.h5");
  write_checkpoint(p, make_ckpt(1));
  {
    // An extra tensor in /adam_m that is not a parameter.
    hid_t f = H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    hsize_t dims[1] = {3};
    hid_t space = H5Screate_simple(1, dims, nullptr);
    hid_t d = H5Dcreate2(f, "/adam_m/layers.7.bogus", H5T_IEEE_F32LE, space, H5P_DEFAULT,
                         H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(d, 0);
    H5Dclose(d);
    H5Sclose(space);
    H5Fclose(f);
  }
  std::string msg = error_of([&] { read_checkpoint(p); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("/adam_m/layers.7.bogus"), std::string::npos) << msg;
}

TEST_F(CheckpointTest, NewerFormatVersion) {
  const std::string p = path("v.h5");
  write_checkpoint(p, make_ckpt(1));
  {
    hid_t f = H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    hid_t a = H5Aopen(f, "format_version", H5P_DEFAULT);
    ASSERT_GE(a, 0);
    int64_t v = kCheckpointFormatVersion + 1;
    ASSERT_GE(H5Awrite(a, H5T_NATIVE_INT64, &v), 0);
    H5Aclose(a);
    H5Fclose(f);
  }
  std::string msg = error_of([&] { read_checkpoint(p); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("written by a newer ssdtrain"), std::string::npos) << msg;
}

TEST_F(CheckpointTest, MissingAttribute) {
  const std::string p = path("a.h5");
  write_checkpoint(p, make_ckpt(1));
  {
    hid_t f = H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    ASSERT_GE(H5Adelete(f, "step"), 0);
    H5Fclose(f);
  }
  std::string msg = error_of([&] { read_checkpoint(p); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("missing attribute step"), std::string::npos) << msg;
}

TEST_F(CheckpointTest, ShapeChecks) {
  const std::string p = path("s.h5");
  write_checkpoint(p, make_ckpt(1));
  const CheckpointData c = read_checkpoint(p);
  std::vector<HostTensor> expected;
  for (const auto& t : c.params) expected.push_back({t.name, t.shape, {}});
  check_checkpoint_shapes(c, expected);  // matches

  auto wrong = expected;
  wrong[3].shape = {7, 7};
  std::string msg = error_of([&] { check_checkpoint_shapes(c, wrong); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find(wrong[3].name), std::string::npos) << msg;
  EXPECT_NE(msg.find(shape_str({7, 7})), std::string::npos) << msg;
  EXPECT_NE(msg.find(shape_str(c.params[3].shape)), std::string::npos) << msg;

  auto extra = expected;
  extra.push_back({"layers.9.norm.weight", {16}, {}});
  msg = error_of([&] { check_checkpoint_shapes(c, extra); });
  EXPECT_NE(msg.find("missing parameter layers.9.norm.weight"), std::string::npos) << msg;

  auto fewer = expected;
  fewer.pop_back();
  msg = error_of([&] { check_checkpoint_shapes(c, fewer); });
  EXPECT_NE(msg.find("unexpected parameter " + expected.back().name), std::string::npos) << msg;
}

TEST_F(CheckpointTest, LatestAndPrune) {
  const std::string d = dir_.string();
  EXPECT_FALSE(latest_checkpoint(d).has_value());
  EXPECT_FALSE(latest_checkpoint(path("no_such_dir")).has_value());
  CheckpointData small;
  small.params.push_back({"w", {2}, {1.f, 2.f}});
  for (int64_t s : {5, 10, 2}) write_checkpoint(checkpoint_path(d, s), small);
  // Noise that must be ignored.
  { std::ofstream(path("step_00000099.h5.tmp.4242")) << "partial"; }
  { std::ofstream(path("step_99.h5")) << "x"; }
  { std::ofstream(path("step_0000001x.h5")) << "x"; }
  { std::ofstream(path("notes.txt")) << "x"; }
  fs::create_directories(path("step_00000500.h5"));
  EXPECT_EQ(latest_checkpoint(d), checkpoint_path(d, 10));

  prune_checkpoints(d, 0);  // keeps all
  EXPECT_TRUE(fs::exists(checkpoint_path(d, 2)));
  prune_checkpoints(d, 2);
  EXPECT_FALSE(fs::exists(checkpoint_path(d, 2)));
  EXPECT_TRUE(fs::exists(checkpoint_path(d, 5)));
  EXPECT_TRUE(fs::exists(checkpoint_path(d, 10)));
  EXPECT_TRUE(fs::exists(path("step_00000099.h5.tmp.4242")));
  EXPECT_TRUE(fs::exists(path("step_99.h5")));
  EXPECT_TRUE(fs::exists(path("notes.txt")));
  prune_checkpoints(d, 1);
  EXPECT_FALSE(fs::exists(checkpoint_path(d, 5)));
  EXPECT_EQ(latest_checkpoint(d), checkpoint_path(d, 10));
  EXPECT_EQ(read_checkpoint(*latest_checkpoint(d)).params[0].data, small.params[0].data);
}

TEST_F(CheckpointTest, WriteFileAtomic) {
  const std::string p = path("c.json");
  write_file_atomic(p, "{\"a\": 1}\n");
  write_file_atomic(p, "{}\n");
  std::ifstream f(p);
  std::string s((std::istreambuf_iterator<char>(f)), {});
  EXPECT_EQ(s, "{}\n");
  EXPECT_EQ(listing(), std::vector<std::string>{"c.json"});
  std::string msg = error_of([&] { write_file_atomic(path("c.json/x"), "y"); });
  EXPECT_NE(msg.find("c.json/x"), std::string::npos) << msg;
}
