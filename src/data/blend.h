// data.path for data.kind=indexed: one dataset prefix ("corpus/train" for corpus/train.idx and
// corpus/train.bin), or a blend written the Megatron way, "W1 PREFIX1 W2 PREFIX2 ...", where
// each weight is a positive number (weights are normalised to sum to 1).
#pragma once
#include <string>
#include <vector>

namespace ssd {

struct BlendPart {
  double weight = 1;  // normalised
  std::string prefix;
};

// Splits data.path; errors name data.path and the offending word. Does not touch the files.
std::vector<BlendPart> parse_blend(const std::string& path);

}  // namespace ssd
