// Multi-query associative recall (Zoology, Arora et al. 2023): a sequence first lists key-value
// pairs, then asks for keys again; the model must output each key's value. Only the answers are
// scored, so the loss and the accuracy measure recall alone.
//
// Token ids: 0 filler, 1 separator, keys [2, 2+K), values [2+K, 2+K+V).
#include <algorithm>
#include <numeric>

#include "core/error.h"
#include "core/rng.h"
#include "data/data.h"

namespace ssd {
namespace {

class Mqar final : public DataSource {
 public:
  Mqar(const DataConfig& d, uint64_t seed) : d_(d), seed_(seed) {}

  void train_sample(int64_t index, int32_t* tokens, int32_t* targets, int64_t seqlen) override {
    Rng r(sample_seed(seed_, index));
    make(r, tokens, targets, seqlen);
  }
  void eval_batch(int64_t i, int32_t* tokens, int32_t* targets, int64_t batch,
                  int64_t seqlen) override {
    Rng r(seed_ ^ 0x5eed0e7a1ull ^ (static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull));
    for (int64_t b = 0; b < batch; ++b) make(r, tokens + b * seqlen, targets + b * seqlen, seqlen);
  }
  std::string describe() const override {
    return "MQAR (" + std::to_string(d_.mqar_num_pairs) + " pairs, " +
           std::to_string(d_.mqar_key_vocab) + " keys, " + std::to_string(d_.mqar_value_vocab) +
           " values)";
  }
  bool reports_accuracy() const override { return true; }

 private:
  void make(Rng& r, int32_t* tok, int32_t* tgt, int64_t L) const {
    const int64_t n = d_.mqar_num_pairs, K = d_.mqar_key_vocab, V = d_.mqar_value_vocab;
    std::fill(tok, tok + L, 0);
    std::fill(tgt, tgt + L, -1);
    // n distinct keys (partial Fisher-Yates), values drawn freely.
    std::vector<int32_t> keys(K);
    std::iota(keys.begin(), keys.end(), 0);
    for (int64_t i = 0; i < n; ++i) std::swap(keys[i], keys[i + r.below(K - i)]);
    std::vector<int32_t> vals(n);
    for (auto& v : vals) v = static_cast<int32_t>(r.below(V));
    for (int64_t i = 0; i < n; ++i) {
      tok[2 * i] = 2 + keys[i];
      tok[2 * i + 1] = static_cast<int32_t>(2 + K + vals[i]);
    }
    tok[2 * n] = 1;
    // Queries: each key once, in random order, at random slots of the rest of the sequence.
    // A query occupies two positions (key, then its value as the next input token).
    const int64_t first = 2 * n + 1, slots = (L - first) / 2;
    std::vector<int64_t> slot(slots);
    std::iota(slot.begin(), slot.end(), 0);
    const int64_t q = std::min(n, slots);
    for (int64_t i = 0; i < q; ++i) std::swap(slot[i], slot[i + r.below(slots - i)]);
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    for (int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[r.below(i + 1)]);
    for (int64_t i = 0; i < q; ++i) {
      int64_t pos = first + 2 * slot[i], k = order[i];
      tok[pos] = 2 + keys[k];
      tgt[pos] = static_cast<int32_t>(2 + K + vals[k]);
      tok[pos + 1] = tgt[pos];
    }
  }

  DataConfig d_;
  uint64_t seed_;
};

}  // namespace

std::unique_ptr<DataSource> make_mqar_source(const DataConfig& d, uint64_t seed) {
  return std::make_unique<Mqar>(d, seed);
}

}  // namespace ssd
