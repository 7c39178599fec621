// Byte-level text: every byte is a token (vocab 256). data.path is a file, or a directory whose
// files (all of them, recursively) are concatenated in name order. Training windows are drawn at random
// offsets of the training part of the corpus; evaluation windows tile the held-out tail.
#include <algorithm>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "core/rng.h"
#include "data/data.h"

namespace fs = std::filesystem;

namespace ssd {
namespace {

std::string read_corpus(const std::string& path) {
  std::vector<fs::path> files;
  if (fs::is_directory(path)) {
    // Every regular file below the directory, in name order (hidden files skipped).
    for (const auto& e : fs::recursive_directory_iterator(path)) {
      const std::string rel = fs::relative(e.path(), path).string();
      if (rel.find("/.") != std::string::npos || rel.rfind('.', 0) == 0) continue;
      if (e.is_regular_file()) files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    if (files.empty()) fail("data.path '", path, "': directory holds no files");
  } else {
    files.push_back(path);
  }
  std::string all;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) fail("data.path: cannot read '", f.string(), "'");
    all.append(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return all;
}

class TextBytes final : public DataSource {
 public:
  TextBytes(const DataConfig& d, int64_t seqlen, uint64_t seed)
      : path_(d.path), seed_(seed) {
    std::string all = read_corpus(d.path);
    const int64_t need = 2 * (seqlen + 1);
    if (static_cast<int64_t>(all.size()) < need)
      fail("data.path '", d.path, "': corpus has ", all.size(), " bytes, need at least ", need,
           " for train.seq_len=", seqlen);
    int64_t nval = static_cast<int64_t>(all.size() * d.val_fraction);
    if (nval > 0) nval = std::max(nval, seqlen + 1);
    train_.assign(all.begin(), all.end() - nval);
    val_.assign(all.end() - nval, all.end());
    if (static_cast<int64_t>(train_.size()) < seqlen + 1)
      fail("data.path '", d.path, "': training part too small for seq_len ", seqlen);
  }

  void train_sample(int64_t index, int32_t* tokens, int32_t* targets, int64_t seqlen) override {
    Rng r(sample_seed(seed_, index));
    window(train_, r.below(static_cast<int64_t>(train_.size()) - seqlen), tokens, targets, seqlen);
  }
  void eval_batch(int64_t i, int32_t* tokens, int32_t* targets, int64_t batch,
                  int64_t seqlen) override {
    const auto& src = val_.size() > static_cast<size_t>(seqlen) ? val_ : train_;
    const int64_t nwin = std::max<int64_t>(1, (static_cast<int64_t>(src.size()) - 1) / seqlen);
    for (int64_t b = 0; b < batch; ++b) {
      int64_t w = (i * batch + b) % nwin;
      window(src, w * seqlen, tokens + b * seqlen, targets + b * seqlen, seqlen);
    }
  }
  bool eval_is_training_data() const override { return val_.empty(); }  // nval is 0 or > seqlen
  std::string describe() const override {
    return "bytes of '" + path_ + "' (" + std::to_string(train_.size()) + " train, " +
           std::to_string(val_.size()) + " held out)";
  }

 private:
  static void window(const std::vector<uint8_t>& src, int64_t off, int32_t* tok, int32_t* tgt,
                     int64_t L) {
    for (int64_t t = 0; t < L; ++t) {
      tok[t] = src[off + t];
      tgt[t] = off + t + 1 < static_cast<int64_t>(src.size()) ? src[off + t + 1] : -1;
    }
  }
  std::string path_;
  std::vector<uint8_t> train_, val_;
  uint64_t seed_;
};

}  // namespace

std::unique_ptr<DataSource> make_mqar_source(const DataConfig& d, uint64_t seed);
std::unique_ptr<DataSource> make_indexed_source(const Config& cfg, uint64_t seed);  // indexed.cpp

std::unique_ptr<DataSource> make_data_source(const Config& cfg) {
  uint64_t seed = static_cast<uint64_t>(cfg.train.seed) * 0x100000001B3ull + 0xda7a;
  if (cfg.data.kind == "mqar") return make_mqar_source(cfg.data, seed);
  if (cfg.data.kind == "indexed") return make_indexed_source(cfg, seed);
  return std::make_unique<TextBytes>(cfg.data, cfg.train.seq_len, seed);
}

void fill_step(DataSource& d, int64_t position, int64_t dp_rank, int64_t dp, int64_t micro_batch,
               int64_t grad_accum, int64_t seqlen, int32_t* tokens, int32_t* targets,
               int32_t* reset) {
  SSD_CHECK(dp_rank >= 0 && dp_rank < dp);
  const int64_t per_rank = micro_batch * grad_accum;
  const int64_t first = position + dp_rank * per_rank;
  for (int64_t i = 0; i < per_rank; ++i) {
    d.train_sample(first + i, tokens + i * seqlen, targets + i * seqlen, seqlen);
    if (reset) d.train_resets(first + i, reset + i * seqlen, seqlen);
  }
}

void DataSource::train_resets(int64_t, int32_t* reset, int64_t seqlen) {
  std::fill_n(reset, seqlen, 0);
}
void DataSource::eval_resets(int64_t, int32_t* reset, int64_t batch, int64_t seqlen) {
  std::fill_n(reset, batch * seqlen, 0);
}

}  // namespace ssd
