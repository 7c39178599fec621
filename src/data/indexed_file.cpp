#include "data/indexed_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"
#include "io/checkpoint.h"

namespace ssd {
namespace {

const char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};
constexpr size_t kHeader = 9 + 8 + 1 + 8 + 8;  // magic, version, dtype, S, D

// Maps a whole file read-only; an empty file maps to nullptr with size 0.
void* map_file(const std::string& path, size_t& size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    fail("cannot stat '", path, "': ", std::strerror(e));
  }
  size = static_cast<size_t>(st.st_size);
  void* p = nullptr;
  if (size > 0) {
    p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      fail("cannot map '", path, "': ", std::strerror(e));
    }
  }
  ::close(fd);
  return p;
}

template <class T>
T load_le(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);  // the hosts ssdtrain runs on are little-endian, as the format
  return v;
}

}  // namespace

int64_t dtype_size(TokenDType t) {
  switch (t) {
    case TokenDType::U8: case TokenDType::I8: return 1;
    case TokenDType::I16: case TokenDType::U16: return 2;
    case TokenDType::I32: case TokenDType::F32: return 4;
    case TokenDType::I64: case TokenDType::F64: return 8;
  }
  return 0;
}

const char* dtype_name(TokenDType t) {
  switch (t) {
    case TokenDType::U8: return "uint8";
    case TokenDType::I8: return "int8";
    case TokenDType::I16: return "int16";
    case TokenDType::I32: return "int32";
    case TokenDType::I64: return "int64";
    case TokenDType::F64: return "float64";
    case TokenDType::F32: return "float32";
    case TokenDType::U16: return "uint16";
  }
  return "?";
}

TokenDType dtype_for_vocab(int64_t vocab_size) {
  return vocab_size <= 65536 ? TokenDType::U16 : TokenDType::I32;
}

// ------------------------------------------------------------------------------------ reading

IndexedFile::IndexedFile(const std::string& prefix) : prefix_(prefix) {
  const std::string idx = prefix + ".idx", bin = prefix + ".bin";
  idx_map_ = map_file(idx, idx_size_);
  try {
    bin_map_ = map_file(bin, bin_size_);
    bin_ = static_cast<const unsigned char*>(bin_map_);
    const auto* p = static_cast<const unsigned char*>(idx_map_);
    if (idx_size_ < kHeader)
      fail("'", idx, "': truncated: ", idx_size_, " bytes, the header alone is ", kHeader);
    if (std::memcmp(p, kMagic, 9) != 0)
      fail("'", idx, "': bad magic at byte 0 (expected \"MMIDIDX\\0\\0\"): not a Megatron indexed "
           "dataset index");
    const uint64_t version = load_le<uint64_t>(p + 9);
    if (version != 1) fail("'", idx, "': version (byte 9) is ", version, ", only version 1 is known");
    const uint8_t code = p[17];
    if (code < 1 || code > 8) fail("'", idx, "': dtype code (byte 17) is ", int(code), ", not 1..8");
    dtype_ = static_cast<TokenDType>(code);
    if (dtype_ == TokenDType::F32 || dtype_ == TokenDType::F64)
      fail("'", idx, "': dtype code (byte 17) is ", int(code), " (", dtype_name(dtype_),
           "): token ids must be integers");
    const uint64_t S = load_le<uint64_t>(p + 18), D = load_le<uint64_t>(p + 26);
    // Sizes in 64 bits with overflow in mind: a damaged count must not wrap the arithmetic.
    const uint64_t limit = idx_size_;
    if (S > limit / 12 || D > limit / 8)
      fail("'", idx, "': truncated or damaged: sequence count ", S, " and document count ", D,
           " need more than the file's ", idx_size_, " bytes");
    const uint64_t need = kHeader + 4 * S + 8 * S + 8 * D;
    if (idx_size_ < need)
      fail("'", idx, "': truncated: ", idx_size_, " bytes, the header's counts (", S,
           " sequences, ", D, " document index entries) need ", need);
    if (idx_size_ != need && idx_size_ != need + S)  // + S: multimodal sequence modes
      fail("'", idx, "': ", idx_size_ - need, " unexpected bytes after the document index (", S,
           " sequences, ", D, " document index entries need ", need, " bytes)");
    if (D < 1) fail("'", idx, "': document count (byte 26) is 0; the document index starts with 0");
    nseq_ = static_cast<int64_t>(S);
    ndoc_ = static_cast<int64_t>(D);
    lengths_ = p + kHeader;
    pointers_ = p + kHeader + 4 * S;
    doc_index_ = p + kHeader + 12 * S;
    const int64_t item = dtype_size(dtype_);
    for (int64_t s = 0; s < nseq_; ++s) {
      const int32_t len = sequence_length(s);
      if (len < 0) fail("'", idx, "': sequence length ", s, " is ", len, " (negative)");
      const int64_t ptr = sequence_pointer(s);
      if (ptr < 0 || ptr % item != 0 || static_cast<uint64_t>(ptr) > bin_size_ ||
          static_cast<uint64_t>(len) * item > bin_size_ - static_cast<uint64_t>(ptr))
        fail("'", idx, "': sequence ", s, " (pointer ", ptr, ", length ", len, " x ",
             item, " bytes) reaches past the end of '", bin, "' (", bin_size_, " bytes)",
             ptr % item ? " or is not aligned to the token size" : "");
    }
    if (document_start(0) != 0)
      fail("'", idx, "': document index entry 0 is ", document_start(0), ", must be 0");
    for (int64_t d = 1; d < ndoc_; ++d)
      if (document_start(d) < document_start(d - 1) || document_start(d) > nseq_)
        fail("'", idx, "': document index entry ", d, " is ", document_start(d),
             ", must be in [", document_start(d - 1), ", ", nseq_, "] (non-decreasing, at most the "
             "sequence count)");
    if (document_start(ndoc_ - 1) != nseq_)
      fail("'", idx, "': the last document index entry (", ndoc_ - 1, ") is ",
           document_start(ndoc_ - 1), ", must be the sequence count ", nseq_);
  } catch (...) {
    if (idx_map_) ::munmap(idx_map_, idx_size_);
    if (bin_map_) ::munmap(bin_map_, bin_size_);
    throw;
  }
}

IndexedFile::~IndexedFile() {
  if (idx_map_) ::munmap(idx_map_, idx_size_);
  if (bin_map_) ::munmap(bin_map_, bin_size_);
}

int32_t IndexedFile::sequence_length(int64_t s) const { return load_le<int32_t>(lengths_ + 4 * s); }
int64_t IndexedFile::sequence_pointer(int64_t s) const { return load_le<int64_t>(pointers_ + 8 * s); }
int64_t IndexedFile::document_start(int64_t d) const { return load_le<int64_t>(doc_index_ + 8 * d); }

int64_t IndexedFile::token(int64_t s, int64_t j) const {
  const unsigned char* p = bin_ + sequence_pointer(s) + j * dtype_size(dtype_);
  switch (dtype_) {
    case TokenDType::U8: return *p;
    case TokenDType::I8: return static_cast<int8_t>(*p);
    case TokenDType::I16: return load_le<int16_t>(p);
    case TokenDType::U16: return load_le<uint16_t>(p);
    case TokenDType::I32: return load_le<int32_t>(p);
    case TokenDType::I64: return load_le<int64_t>(p);
    default: SSD_CHECK(false, "float token dtype");
  }
  return 0;
}

void IndexedFile::read(int64_t s, int64_t j, int64_t n, int32_t* out, int64_t vocab) const {
  SSD_CHECK(s >= 0 && s < nseq_ && j >= 0 && j + n <= sequence_length(s));
  for (int64_t k = 0; k < n; ++k) {
    const int64_t v = token(s, j + k);
    if (v < 0 || v >= vocab)
      fail("'", bin_path(), "': token id ", v, " at token ", sequence_pointer(s) / dtype_size(dtype_) + j + k,
           " (sequence ", s, ", offset ", j + k, ") is outside model.vocab_size ", vocab);
    out[k] = static_cast<int32_t>(v);
  }
}

// ------------------------------------------------------------------------------------ writing

IndexedWriter::IndexedWriter(const std::string& prefix, TokenDType dtype)
    : prefix_(prefix), bin_tmp_(temp_path(prefix + ".bin")), idx_tmp_(temp_path(prefix + ".idx")),
      dtype_(dtype) {
  SSD_CHECK(dtype == TokenDType::U16 || dtype == TokenDType::I32);
  fd_ = ::open(bin_tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail("cannot create '", bin_tmp_, "' (for ", prefix, ".bin): ", std::strerror(errno));
}

IndexedWriter::~IndexedWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!done_) {
    ::unlink(bin_tmp_.c_str());
    ::unlink(idx_tmp_.c_str());
  }
}

namespace {
void write_all(int fd, const char* p, size_t n, const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail("cannot write '", path, "': ", std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}
}  // namespace

void IndexedWriter::add_document(const int32_t* ids, int64_t n) {
  SSD_CHECK(!done_ && n >= 0 && n <= INT32_MAX);
  buf_.resize(static_cast<size_t>(n) * dtype_size(dtype_));
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || (dtype_ == TokenDType::U16 && ids[i] > 65535))
      fail("token id ", ids[i], " does not fit ", dtype_name(dtype_), " (", prefix_, ".bin)");
    if (dtype_ == TokenDType::U16) {
      const uint16_t v = static_cast<uint16_t>(ids[i]);
      std::memcpy(buf_.data() + 2 * i, &v, 2);
    } else {
      std::memcpy(buf_.data() + 4 * i, &ids[i], 4);
    }
  }
  write_all(fd_, buf_.data(), buf_.size(), bin_tmp_);
  bin_bytes_ += static_cast<int64_t>(buf_.size());
  lengths_.push_back(static_cast<int32_t>(n));
}

int64_t IndexedWriter::tokens_written() const { return bin_bytes_ / dtype_size(dtype_); }

void IndexedWriter::finish() {
  SSD_CHECK(!done_);
  if (::close(fd_) != 0) {
    fd_ = -1;
    fail("cannot write '", bin_tmp_, "': ", std::strerror(errno));
  }
  fd_ = -1;
  const uint64_t S = lengths_.size(), D = S + 1, version = 1;
  const uint8_t code = static_cast<uint8_t>(dtype_);
  std::string idx(kMagic, 9);
  auto put = [&](const void* p, size_t n) { idx.append(static_cast<const char*>(p), n); };
  put(&version, 8);
  put(&code, 1);
  put(&S, 8);
  put(&D, 8);
  put(lengths_.data(), 4 * S);
  int64_t ptr = 0;
  for (int32_t len : lengths_) {
    put(&ptr, 8);
    ptr += static_cast<int64_t>(len) * dtype_size(dtype_);
  }
  for (uint64_t d = 0; d < D; ++d) {
    const int64_t v = static_cast<int64_t>(d);
    put(&v, 8);
  }
  const int fd = ::open(idx_tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot create '", idx_tmp_, "': ", std::strerror(errno));
  try {
    write_all(fd, idx.data(), idx.size(), idx_tmp_);
  } catch (...) {
    ::close(fd);
    throw;
  }
  if (::close(fd) != 0) fail("cannot write '", idx_tmp_, "': ", std::strerror(errno));
  // .bin first: a reader finds the new .idx only once the data it describes is in place.
  commit_file(bin_tmp_, prefix_ + ".bin");
  commit_file(idx_tmp_, prefix_ + ".idx");
  done_ = true;
}

}  // namespace ssd
