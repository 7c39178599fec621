// Byte-level BPE tokenizer read from a Hugging Face `tokenizer.json` (GPT-2, GPT-NeoX, Llama-3
// style files). encode() gives the ids Hugging Face `tokenizers` gives for
// `encode(text, add_special_tokens=False)`: added/special tokens are matched first
// (leftmost-longest, honouring lstrip/rstrip/single_word), the rest is pre-tokenized (ByteLevel
// with its GPT-2 split regex and add_prefix_space, or Split + ByteLevel sequences) and each piece
// is merged by rank as the reference BPE model does. decode() inverts the byte-level mapping and
// returns the exact bytes (the reference turns invalid UTF-8 into U+FFFD when it makes a Python
// string; on valid text the two agree).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace ssd {

// Per-thread memo of piece -> ids: text repeats its words, so most pieces are merged once.
struct BpeCache {
  std::unordered_map<std::string, std::vector<int32_t>> pieces;
  size_t max_entries = 1 << 20;  // cleared when full, so memory stays bounded
};

class Tokenizer {
 public:
  // Reads and checks tokenizer.json; errors name the file and the offending key.
  static std::shared_ptr<const Tokenizer> load(const std::string& path);
  ~Tokenizer();

  // Appends the ids of text to out. Thread-safe; pass a cache per thread for speed.
  void encode(std::string_view text, std::vector<int32_t>& out, BpeCache* cache = nullptr) const;
  std::vector<int32_t> encode(std::string_view text) const;
  // Bytes of the tokens; special added tokens are left out when skip_special (the reference's
  // default). An id outside the vocabulary is an error naming it.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = true) const;

  // 1 + the largest id of the vocabulary and the added tokens.
  int64_t vocab_size() const;
  // The id of an added token or vocabulary entry written as in tokenizer.json.
  std::optional<int32_t> token_to_id(std::string_view token) const;
  const std::string& path() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// GPT-2's reversible byte -> printable character map (bytes_to_unicode): the code point that
// stands for byte b in byte-level vocabularies.
uint32_t byte_to_codepoint(uint8_t b);

}  // namespace ssd
