// Megatron-LM's indexed dataset: PREFIX.bin holds the tokens of every sequence back to back,
// PREFIX.idx describes them. The .idx layout (megatron/core/datasets/indexed_dataset.py), all
// little-endian:
//   9 bytes   magic "MMIDIDX\0\0"
//   uint64    version, 1
//   uint8     dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
//             8 uint16
//   uint64    sequence count S
//   uint64    document count D (entries of the document index, one more than the documents)
//   int32[S]  sequence lengths, in tokens
//   int64[S]  sequence pointers, byte offsets into .bin
//   int64[D]  document index: sequence numbers where documents start, 0 first, S last
// (multimodal files add int8[S] sequence modes; they are accepted and ignored).
// ssdtrain writes one sequence per document, its last token the end-of-document token.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ssd {

enum class TokenDType : uint8_t { U8 = 1, I8 = 2, I16 = 3, I32 = 4, I64 = 5, F64 = 6, F32 = 7, U16 = 8 };
int64_t dtype_size(TokenDType t);
const char* dtype_name(TokenDType t);

// A read-only, memory-mapped PREFIX.idx + PREFIX.bin, checked when opened: a bad magic,
// version or dtype code, a truncated file, pointers or lengths outside .bin, a document index
// that does not run 0..S in order -> ssd::Error naming the file and the field (and its entry).
class IndexedFile {
 public:
  explicit IndexedFile(const std::string& prefix);
  ~IndexedFile();
  IndexedFile(const IndexedFile&) = delete;
  IndexedFile& operator=(const IndexedFile&) = delete;

  const std::string& prefix() const { return prefix_; }
  std::string bin_path() const { return prefix_ + ".bin"; }
  TokenDType dtype() const { return dtype_; }
  int64_t sequences() const { return nseq_; }
  int64_t documents() const { return ndoc_ - 1; }
  int32_t sequence_length(int64_t s) const;
  int64_t sequence_pointer(int64_t s) const;
  // Sequence number where document d starts (d in [0, documents()]).
  int64_t document_start(int64_t d) const;
  // Token j of sequence s, as an integer (integer dtypes only; checked when opened).
  int64_t token(int64_t s, int64_t j) const;
  // Copies n tokens of sequence s from its token j into out (int32); any id outside
  // [0, vocab) is an error naming the .bin file and the token's position in it.
  void read(int64_t s, int64_t j, int64_t n, int32_t* out, int64_t vocab) const;

 private:
  std::string prefix_;
  TokenDType dtype_ = TokenDType::U16;
  int64_t nseq_ = 0, ndoc_ = 0;
  // The arrays inside the mapped .idx. The 34-byte header leaves them unaligned, so they are
  // read with memcpy, never through typed pointers.
  const unsigned char* lengths_ = nullptr;
  const unsigned char* pointers_ = nullptr;
  const unsigned char* doc_index_ = nullptr;
  const unsigned char* bin_ = nullptr;
  size_t idx_size_ = 0, bin_size_ = 0;
  void* idx_map_ = nullptr;
  void* bin_map_ = nullptr;
};

// Writes PREFIX.bin and PREFIX.idx atomically: both go to temporary names and are renamed
// when finish() succeeds; destroyed unfinished (an error on the way), it removes them.
class IndexedWriter {
 public:
  IndexedWriter(const std::string& prefix, TokenDType dtype);
  ~IndexedWriter();
  // One document as one sequence. Ids must fit the dtype (checked).
  void add_document(const int32_t* ids, int64_t n);
  void finish();
  int64_t bytes_written() const { return bin_bytes_; }
  int64_t tokens_written() const;

 private:
  std::string prefix_, bin_tmp_, idx_tmp_;
  TokenDType dtype_;
  int fd_ = -1;
  int64_t bin_bytes_ = 0;
  std::vector<int32_t> lengths_;
  std::vector<char> buf_;
  bool done_ = false;
};

// The dtype ssdtrain writes for a vocabulary: uint16 when every id fits, else int32.
TokenDType dtype_for_vocab(int64_t vocab_size);

}  // namespace ssd
