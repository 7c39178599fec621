// A compiled Unicode regular expression (PCRE2, UTF + UCP) for the split patterns of Hugging Face
// tokenizers, which are written for the Oniguruma engine. The classes those patterns use (\s,
// \p{L}, \p{N}) match the same characters in both engines; tests/data compares them on NEL,
// NBSP, U+2028, U+3000, U+180E, U+200B and control characters (Oniguruma's \s, like PCRE2's,
// leaves out U+0085).
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ssd {

class SplitRegex {
 public:
  // Throws ssd::Error naming `origin` (the tokenizer file and key) when the pattern does not
  // compile, or when this ssdtrain was built without PCRE2.
  SplitRegex(const std::string& pattern, const std::string& origin);
  ~SplitRegex();
  SplitRegex(const SplitRegex&) = delete;
  SplitRegex& operator=(const SplitRegex&) = delete;

  // The [begin, end) byte ranges of every non-overlapping match in text, left to right; empty
  // matches are skipped. Invalid UTF-8 never matches a pattern character (PCRE2_MATCH_INVALID_UTF),
  // so such bytes end up between matches. Safe to call from several threads at once.
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Whether this build has PCRE2 (SSD_HAVE_PCRE2).
bool have_split_regex();

}  // namespace ssd
