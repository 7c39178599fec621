// A seeded bijection of [0, n) computed one element at a time, so the shuffled order of an
// epoch needs no table: a 6-round Feistel network on the smallest even number of bits that
// holds n, walked along its cycle until the value falls back into [0, n) (the domain is < 4n,
// so under 4 steps on average).
#pragma once
#include <cstdint>

#include "core/rng.h"

namespace ssd {

class Permutation {
 public:
  Permutation(uint64_t n, uint64_t seed) : n_(n) {
    while ((uint64_t{1} << bits_) < n_) bits_ += 2;
    half_ = bits_ / 2;
    uint64_t x = seed;
    for (auto& k : keys_) k = splitmix64(x);
  }
  uint64_t operator()(uint64_t i) const {
    uint64_t x = i;
    do x = round_trip(x);
    while (x >= n_);
    return x;
  }

 private:
  uint64_t round_trip(uint64_t x) const {
    const uint64_t mask = (uint64_t{1} << half_) - 1;
    uint64_t l = x >> half_, r = x & mask;
    for (uint64_t k : keys_) {
      uint64_t h = r ^ k;
      const uint64_t f = splitmix64(h) & mask;
      const uint64_t nl = r;
      r = l ^ f;
      l = nl;
    }
    return (l << half_) | r;
  }
  uint64_t n_;
  int bits_ = 2, half_ = 1;
  uint64_t keys_[6];
};

}  // namespace ssd
