// The parts of a loaded tokenizer.json, shared by tokenizer_load.cpp (which fills them) and
// tokenizer.cpp (which encodes and decodes with them). Not for use outside the tokenizer.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "data/split_regex.h"
#include "data/tokenizer.h"

namespace ssd {

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

// One pre-tokenizer step, applied to every piece the steps before it made.
struct PreStep {
  enum class Kind { ByteLevel, Split } kind = Kind::ByteLevel;
  // Split's behaviours, as in tokenizers' SplitDelimiterBehavior.
  enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };
  bool add_prefix_space = false;  // ByteLevel
  bool use_regex = true;          // ByteLevel: split with the GPT-2 pattern
  std::shared_ptr<SplitRegex> regex;  // ByteLevel with use_regex, or Split with a Regex pattern
  std::string literal;            // Split with a String pattern
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
};

// An added-token set matched in one pass, leftmost-longest like the reference's Aho-Corasick.
struct AddedSet {
  std::vector<int> tokens;                        // indices into Impl::added
  std::array<std::vector<int>, 256> by_first{};   // by first byte, longest content first
};

struct Tokenizer::Impl {
  std::string path;
  std::vector<AddedToken> added;
  AddedSet raw_set;   // added tokens with normalized=false: matched on the input first
  AddedSet norm_set;  // normalized=true: matched in the gaps the first pass leaves
  std::shared_ptr<SplitRegex> word_char;  // \w, for single_word tokens
  std::vector<PreStep> steps;

  std::unordered_map<std::string, int32_t> vocab;  // byte-level string -> id
  std::vector<std::string> id_to_token;            // model tokens by id ("" where none)
  std::vector<int> added_of_id;                    // id -> index into added, or -1
  std::array<int32_t, 256> byte_id{};              // id of each byte's character, -1 if none
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, new id)
  std::optional<int32_t> unk;
  bool fuse_unk = false;
  bool ignore_merges = false;
  bool byte_level_decoder = true;  // false: decoder null, tokens joined with spaces
  int64_t vocab_size = 0;

  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
};

// UTF-8 of one code point.
std::string utf8_encode(uint32_t cp);

}  // namespace ssd
