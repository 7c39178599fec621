// data.kind=indexed: Megatron indexed datasets (PREFIX.bin/.idx, see indexed_file.h), one or a
// weighted blend.
//
// Splits: the last data.val_fraction of each dataset's documents are held out; the rest is the
// training split. Samples: the training split's tokens, documents concatenated in file order,
// cut into windows of seq_len + 1 tokens that overlap by one: sample k is tokens
// [k*seq_len, k*seq_len + seq_len + 1), so a dataset of T training tokens has
// n = (T - 1) / seq_len samples (the tail that does not fill one is unused). tokens = the
// first seq_len, targets = the last seq_len (every position scored, across document ends).
// Order: the dataset's i-th sample is sample perm_e(i mod n) in epoch e = i / n, where perm_e is
// a bijection of [0, n) seeded by train.seed, the dataset and the epoch: every epoch visits
// every sample once, each in its own order.
// Blends: a fixed period of 4096 global samples is dealt out to the datasets in proportion to
// their weights (greedy, as Megatron's blended index: each slot goes to the dataset furthest
// behind its share); global sample g is slot g mod 4096 of period g / 4096, and is the next
// sample of that slot's dataset. Each global sample is thereby a pure function of its index.
// Evaluation: held-out windows, tiled the same way, taken round-robin over the datasets.
// Document starts (data.reset_at_eos): from the index's document boundaries, the token after
// each document's end-of-document token; a window's flags mark those inside it.
#include <algorithm>
#include <cmath>
#include <memory>
#include <tuple>
#include <utility>

#include "core/error.h"
#include "core/rng.h"
#include "data/blend.h"
#include "data/data.h"
#include "data/indexed_file.h"
#include "data/permutation.h"

namespace ssd {
namespace {

constexpr int64_t kPeriod = 4096;

// A run of sequences read as one token stream.
struct Split {
  int64_t first_seq = 0;
  std::vector<int64_t> offset;  // offset[i]: tokens before sequence first_seq + i; back() = total
  std::vector<int64_t> doc_offset;  // tokens before each document of the split (ascending)
  int64_t tokens() const { return offset.back(); }
  int64_t documents = 0;
};

struct Part {
  std::unique_ptr<IndexedFile> file;
  double weight = 1;
  Split train, val;
  int64_t samples = 0;      // training samples per epoch
  int64_t val_windows = 0;  // held-out windows
  uint64_t seed = 0;
};

Split make_split(const IndexedFile& f, int64_t doc0, int64_t doc1) {
  Split s;
  s.first_seq = f.document_start(doc0);
  const int64_t last = f.document_start(doc1);
  s.offset.reserve(last - s.first_seq + 1);
  s.offset.push_back(0);
  for (int64_t q = s.first_seq; q < last; ++q) s.offset.push_back(s.offset.back() + f.sequence_length(q));
  s.documents = doc1 - doc0;
  s.doc_offset.reserve(s.documents);
  for (int64_t d = doc0; d < doc1; ++d) s.doc_offset.push_back(s.offset[f.document_start(d) - s.first_seq]);
  return s;
}

// Tokens [at, at + n) of a split, as int32, checked against the vocabulary.
void read_span(const IndexedFile& f, const Split& s, int64_t at, int64_t n, int32_t* out,
               int64_t vocab) {
  SSD_CHECK(at >= 0 && at + n <= s.tokens());
  // The sequence holding token `at`: the last offset <= at.
  size_t i = std::upper_bound(s.offset.begin(), s.offset.end(), at) - s.offset.begin() - 1;
  while (n > 0) {
    const int64_t in_seq = at - s.offset[i];
    const int64_t take = std::min(n, s.offset[i + 1] - at);
    f.read(s.first_seq + static_cast<int64_t>(i), in_seq, take, out, vocab);
    out += take;
    at += take;
    n -= take;
    ++i;
  }
}

class Indexed final : public DataSource {
 public:
  Indexed(const Config& cfg, uint64_t seed)
      : seqlen_(cfg.train.seq_len), vocab_(cfg.model.vocab_size) {
    const double vf = cfg.data.val_fraction;
    for (const BlendPart& bp : parse_blend(cfg.data.path)) {
      Part p;
      p.file = std::make_unique<IndexedFile>(bp.prefix);
      p.weight = bp.weight;
      const IndexedFile& f = *p.file;
      const int64_t docs = f.documents();
      int64_t total = 0;
      for (int64_t q = 0; q < f.sequences(); ++q) total += f.sequence_length(q);
      if (docs == 0 || total == 0)
        fail("data.path: dataset '", bp.prefix, "' is empty (", docs, " documents, ", total,
             " tokens)");
      int64_t nval = 0;
      if (vf > 0) {
        nval = std::max<int64_t>(1, std::llround(docs * vf));
        if (nval >= docs)
          fail("data.val_fraction=", vf, " holds out ", nval, " of the ", docs, " documents of '",
               bp.prefix, "', leaving none to train on");
      }
      p.train = make_split(f, 0, docs - nval);
      p.val = make_split(f, docs - nval, docs);
      if (p.train.tokens() < seqlen_ + 1)
        fail("data.path: the training split of '", bp.prefix, "' has ", p.train.tokens(),
             " tokens, fewer than one sample of train.seq_len + 1 = ", seqlen_ + 1);
      p.samples = (p.train.tokens() - 1) / seqlen_;
      if (nval > 0) {
        if (p.val.tokens() < seqlen_ + 1)
          fail("data.val_fraction=", vf, ": the ", nval, " held-out documents of '", bp.prefix,
               "' have ", p.val.tokens(), " tokens, fewer than one evaluation window of "
               "train.seq_len + 1 = ", seqlen_ + 1, "; raise data.val_fraction");
        p.val_windows = (p.val.tokens() - 1) / seqlen_;
      }
      uint64_t h = seed ^ (hash_name(bp.prefix) * 0x9E3779B97F4A7C15ull);
      p.seed = splitmix64(h);
      parts_.push_back(std::move(p));
    }
    // Deal one period of global samples out to the datasets.
    std::vector<int64_t> count(parts_.size(), 0);
    for (int64_t s = 0; s < (parts_.size() == 1 ? 1 : kPeriod); ++s) {
      size_t best = 0;
      double best_gap = -1e300;
      for (size_t i = 0; i < parts_.size(); ++i) {
        const double gap = parts_[i].weight * (s + 1) - count[i];
        if (gap > best_gap) best_gap = gap, best = i;
      }
      slot_part_.push_back(static_cast<int32_t>(best));
      slot_rank_.push_back(count[best]++);
    }
    per_period_ = count;
    for (size_t i = 0; i < parts_.size(); ++i)
      if (count[i] == 0)
        fail("config key 'data.path': blend weight of '", parts_[i].file->prefix(), "' (",
             parts_[i].weight, " after normalising) is below 1/", kPeriod,
             ", too small to draw any sample");
  }

  void train_sample(int64_t index, int32_t* tokens, int32_t* targets, int64_t seqlen) override {
    SSD_CHECK(seqlen == seqlen_, "samples were cut for train.seq_len ", seqlen_);
    const auto [p, sample] = train_window(index);
    window(*p, p->train, sample, tokens, targets);
  }

  void eval_batch(int64_t i, int32_t* tokens, int32_t* targets, int64_t batch,
                  int64_t seqlen) override {
    SSD_CHECK(seqlen == seqlen_, "windows were cut for train.seq_len ", seqlen_);
    for (int64_t b = 0; b < batch; ++b) {
      const auto [p, s, k] = eval_window(i * batch + b);
      window(*p, *s, k, tokens + b * seqlen, targets + b * seqlen);
    }
  }

  bool has_documents() const override { return true; }
  void train_resets(int64_t index, int32_t* reset, int64_t seqlen) override {
    SSD_CHECK(seqlen == seqlen_, "samples were cut for train.seq_len ", seqlen_);
    const auto [p, sample] = train_window(index);
    window_resets(p->train, sample, reset);
  }
  void eval_resets(int64_t i, int32_t* reset, int64_t batch, int64_t seqlen) override {
    SSD_CHECK(seqlen == seqlen_, "windows were cut for train.seq_len ", seqlen_);
    for (int64_t b = 0; b < batch; ++b) {
      const auto [p, s, k] = eval_window(i * batch + b);
      window_resets(*s, k, reset + b * seqlen);
    }
  }

  std::string describe() const override {
    std::string out = "indexed data";
    for (const Part& p : parts_) {
      char w[32];
      std::snprintf(w, sizeof w, "%.3g", p.weight);
      out += (parts_.size() > 1 ? std::string(" [weight ") + w + "]" : std::string()) + " '" +
             p.file->prefix() + "' (" + dtype_name(p.file->dtype()) + "): " +
             std::to_string(p.train.documents) + " documents / " + std::to_string(p.train.tokens()) +
             " tokens / " + std::to_string(p.samples) + " samples per epoch for training, " +
             (p.val_windows > 0 ? std::to_string(p.val.documents) + " documents / " +
                                      std::to_string(p.val.tokens()) + " tokens held out"
                                : std::string("none held out (eval reads training windows)")) +
             ";";
    }
    out.pop_back();
    return out;
  }

 private:
  // Training sample `index` of the global stream: its dataset and window of the training split.
  std::pair<const Part*, int64_t> train_window(int64_t index) const {
    SSD_CHECK(index >= 0);
    const int64_t period = static_cast<int64_t>(slot_part_.size());
    const int64_t slot = index % period;
    const Part& p = parts_[slot_part_[slot]];
    const int64_t local = index / period * per_period_[slot_part_[slot]] + slot_rank_[slot];
    const int64_t epoch = local / p.samples;
    uint64_t es = p.seed ^ (static_cast<uint64_t>(epoch) * 0xD1B54A32D192ED03ull);
    const Permutation perm(static_cast<uint64_t>(p.samples), splitmix64(es));
    return {&p, static_cast<int64_t>(perm(static_cast<uint64_t>(local % p.samples)))};
  }
  // Evaluation window j: round-robin over the datasets; without held-out documents
  // (val_fraction 0) it reads training windows.
  std::tuple<const Part*, const Split*, int64_t> eval_window(int64_t j) const {
    const Part& p = parts_[j % parts_.size()];
    const int64_t k = j / static_cast<int64_t>(parts_.size());
    if (p.val_windows > 0) return {&p, &p.val, k % p.val_windows};
    return {&p, &p.train, k % p.samples};
  }
  // reset[t] = 1 where token t of window k begins a document.
  void window_resets(const Split& s, int64_t k, int32_t* reset) const {
    std::fill_n(reset, seqlen_, 0);
    const int64_t at = k * seqlen_;
    for (auto it = std::lower_bound(s.doc_offset.begin(), s.doc_offset.end(), at);
         it != s.doc_offset.end() && *it < at + seqlen_; ++it)
      reset[*it - at] = 1;
  }
  // A local buffer, so samples can be made from several threads at once.
  void window(const Part& p, const Split& s, int64_t k, int32_t* tok, int32_t* tgt) const {
    std::vector<int32_t> buf(seqlen_ + 1);
    read_span(*p.file, s, k * seqlen_, seqlen_ + 1, buf.data(), vocab_);
    std::copy(buf.begin(), buf.end() - 1, tok);
    std::copy(buf.begin() + 1, buf.end(), tgt);
  }

  int64_t seqlen_, vocab_;
  std::vector<Part> parts_;
  std::vector<int32_t> slot_part_;
  std::vector<int64_t> slot_rank_, per_period_;
};

}  // namespace

std::unique_ptr<DataSource> make_indexed_source(const Config& cfg, uint64_t seed) {
  return std::make_unique<Indexed>(cfg, seed);
}

}  // namespace ssd
