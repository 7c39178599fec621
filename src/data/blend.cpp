#include "data/blend.h"

#include <cmath>
#include <sstream>

#include "core/error.h"

namespace ssd {

std::vector<BlendPart> parse_blend(const std::string& path) {
  std::istringstream in(path);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  if (words.empty()) fail("config key 'data.path' is empty: give a dataset prefix or a blend");
  if (words.size() == 1) return {{1.0, words[0]}};
  if (words.size() % 2 != 0)
    fail("config key 'data.path' ('", path, "'): a blend is pairs of weight and prefix, got ",
         words.size(), " words");
  std::vector<BlendPart> parts;
  double total = 0;
  for (size_t i = 0; i < words.size(); i += 2) {
    size_t used = 0;
    double w = 0;
    try {
      w = std::stod(words[i], &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != words[i].size() || !std::isfinite(w) || !(w > 0))
      fail("config key 'data.path': blend weight ", i / 2 + 1, " ('", words[i],
           "') must be a positive number (the blend is \"W1 PREFIX1 W2 PREFIX2 ...\")");
    parts.push_back({w, words[i + 1]});
    total += w;
  }
  for (auto& p : parts) p.weight /= total;
  return parts;
}

}  // namespace ssd
