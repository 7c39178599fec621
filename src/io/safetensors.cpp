// safetensors (https://github.com/huggingface/safetensors), written and read by hand:
//   8 bytes   N, little-endian uint64: the header's length
//   N bytes   JSON {"__metadata__": {str: str}, "<name>": {"dtype": "F32"|"BF16",
//             "shape": [...], "data_offsets": [begin, end]}, ...}, padded with spaces to a
//             multiple of 8
//   the rest  the tensors' little-endian bytes; offsets are relative to the start of this
//             buffer, and the tensors tile it exactly (no gaps, no overlaps)
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>

#include "core/error.h"
#include "io/export.h"
#include "io/json.h"

namespace ssd {

namespace {

// The header is bounded like the reference implementation bounds it (100 MB).
constexpr uint64_t kMaxHeader = 100ull * 1000 * 1000;

int64_t dtype_bytes(const std::string& dtype) {
  if (dtype == "F32") return 4;
  if (dtype == "BF16") return 2;
  return 0;
}

// numel of a shape, or -1 on overflow past int64 / negative dims.
int64_t checked_numel(const Shape& shape) {
  __int128 n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    n *= d;
    if (n > std::numeric_limits<int64_t>::max()) return -1;
  }
  return static_cast<int64_t>(n);
}

void write_all(int fd, const void* data, size_t n, const std::string& tmp) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail("cannot write ", tmp, ": ", std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void read_all(int fd, void* data, size_t n, uint64_t offset, const std::string& path) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) fail("cannot read ", path, ": ", std::strerror(errno));
    if (r == 0) fail("safetensors file ", path, ": unexpected end of file");
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() {
    int f = fd_;
    fd_ = -1;
    return f;
  }

 private:
  int fd_;
};

struct Entry {
  SafeTensor t;
  uint64_t begin = 0, end = 0;
};

std::vector<Entry> parse_header(const std::string& path, int fd, uint64_t file_size,
                                uint64_t* data_start) {
  const std::string where = "safetensors file " + path;
  if (file_size < 8)
    fail(where, " is too short (", file_size, " bytes) to hold the 8-byte header length");
  unsigned char lenbuf[8];
  read_all(fd, lenbuf, 8, 0, path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | lenbuf[i];
  if (n > file_size - 8)
    fail(where, ": header length ", n, " runs past the end of the file (", file_size,
         " bytes): truncated or not a safetensors file");
  if (n > kMaxHeader) fail(where, ": header length ", n, " is larger than 100 MB");
  std::string text(static_cast<size_t>(n), '\0');
  read_all(fd, text.data(), text.size(), 8, path);
  *data_start = 8 + n;
  const uint64_t buffer = file_size - 8 - n;

  const json::Value header = json::parse(text, where + " header");
  if (!header.is_object()) fail(where, ": the header is a JSON ", header.kind_name(),
                                ", expected an object");
  std::vector<Entry> entries;
  for (const auto& [name, info] : header.members()) {
    if (name == "__metadata__") {
      if (!info.is_object()) fail(where, ": __metadata__ is not an object");
      for (const auto& [k, v] : info.members())
        if (!v.is_string()) fail(where, ": __metadata__ value of \"", k, "\" is not a string");
      continue;
    }
    const std::string tw = where + ": tensor \"" + name + "\"";
    if (!info.is_object()) fail(tw, " is described by a JSON ", info.kind_name(),
                                ", expected an object");
    const json::Value* dtype = info.find("dtype");
    const json::Value* shape = info.find("shape");
    const json::Value* offs = info.find("data_offsets");
    if (!dtype || !dtype->is_string()) fail(tw, " lacks a string \"dtype\"");
    if (!shape || !shape->is_array()) fail(tw, " lacks a \"shape\" array");
    if (!offs || !offs->is_array() || offs->size() != 2)
      fail(tw, " lacks \"data_offsets\" [begin, end]");
    Entry e;
    e.t.name = name;
    e.t.dtype = dtype->as_string();
    const int64_t esize = dtype_bytes(e.t.dtype);
    if (esize == 0)
      fail(tw, " has dtype \"", e.t.dtype, "\"; ssdtrain reads only F32 and BF16");
    for (const auto& d : shape->items()) {
      if (!d.is_int() || d.as_int() < 0) fail(tw, " has an invalid shape entry");
      e.t.shape.push_back(d.as_int());
    }
    for (int i = 0; i < 2; ++i)
      if (!(*offs)[i].is_int() || (*offs)[i].as_int() < 0)
        fail(tw, " has invalid data_offsets");
    e.begin = static_cast<uint64_t>((*offs)[0].as_int());
    e.end = static_cast<uint64_t>((*offs)[1].as_int());
    if (e.begin > e.end)
      fail(tw, " has data_offsets [", e.begin, ", ", e.end, "] with begin > end");
    if (e.end > buffer)
      fail(tw, " has data_offsets [", e.begin, ", ", e.end, "] past the end of the data (",
           buffer, " bytes): truncated file?");
    const int64_t numel = checked_numel(e.t.shape);
    if (numel < 0) fail(tw, " has an impossibly large shape ", shape_str(e.t.shape));
    const __int128 want = static_cast<__int128>(numel) * esize;
    if (want != static_cast<__int128>(e.end - e.begin))
      fail(tw, " has shape ", shape_str(e.t.shape), " and dtype ", e.t.dtype, " (",
           static_cast<long long>(numel * esize), " bytes) but data_offsets [", e.begin, ", ",
           e.end, "] hold ", e.end - e.begin, " bytes");
    entries.push_back(std::move(e));
  }
  // The tensors must tile the data buffer: sorted by offset, each starts where the last ended.
  std::vector<Entry*> order;
  for (auto& e : entries) order.push_back(&e);
  std::stable_sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t pos = 0;
  const Entry* prev = nullptr;
  for (const Entry* e : order) {
    if (e->begin < pos)
      fail(where, ": tensor \"", e->t.name, "\" (data_offsets [", e->begin, ", ", e->end,
           "]) overlaps tensor \"", prev->t.name, "\" (data_offsets [", prev->begin, ", ",
           prev->end, "])");
    if (e->begin > pos)
      fail(where, ": gap of ", e->begin - pos, " bytes before tensor \"", e->t.name,
           "\" (data_offsets [", e->begin, ", ", e->end, "])");
    pos = e->end;
    prev = e;
  }
  if (pos != buffer)
    fail(where, ": ", buffer - pos, " bytes after the last tensor are not described by the "
         "header");
  std::vector<Entry> sorted;
  for (Entry* e : order) sorted.push_back(std::move(*e));
  return sorted;
}

std::vector<SafeTensor> read_impl(const std::string& path, bool with_data) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ENOENT) fail("safetensors file ", path, " does not exist");
    fail("cannot open safetensors file ", path, ": ", std::strerror(errno));
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) fail("cannot stat ", path, ": ", std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail("safetensors file ", path, " is not a regular file");
  uint64_t data_start = 0;
  std::vector<Entry> entries =
      parse_header(path, fd.get(), static_cast<uint64_t>(st.st_size), &data_start);
  std::vector<SafeTensor> out;
  out.reserve(entries.size());
  for (auto& e : entries) {
    if (with_data) {
      e.t.bytes.resize(static_cast<size_t>(e.end - e.begin));
      read_all(fd.get(), e.t.bytes.data(), e.t.bytes.size(), data_start + e.begin, path);
    }
    out.push_back(std::move(e.t));
  }
  return out;
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<SafeTensor>& tensors,
                       const std::vector<std::pair<std::string, std::string>>& metadata) {
  json::Value header = json::Value::object();
  if (!metadata.empty()) {
    json::Value meta = json::Value::object();
    for (const auto& [k, v] : metadata) meta.set(k, v);
    header.set("__metadata__", std::move(meta));
  }
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    const std::string tw = "cannot write " + path + ": tensor \"" + t.name + "\"";
    if (t.name.empty() || t.name == "__metadata__") fail(tw, " has an invalid name");
    if (!names.insert(t.name).second) fail(tw, " appears twice");
    const int64_t esize = dtype_bytes(t.dtype);
    if (esize == 0) fail(tw, " has unsupported dtype \"", t.dtype, "\" (F32 or BF16)");
    const int64_t numel = checked_numel(t.shape);
    if (numel < 0) fail(tw, " has invalid shape ", shape_str(t.shape));
    if (static_cast<uint64_t>(numel) * esize != t.bytes.size())
      fail(tw, " has ", t.bytes.size(), " bytes but shape ", shape_str(t.shape), " and dtype ",
           t.dtype, " need ", numel * esize);
    json::Value shape = json::Value::array();
    for (int64_t d : t.shape) shape.push(d);
    json::Value offs = json::Value::array();
    offs.push(offset);
    offs.push(offset + t.bytes.size());
    offset += t.bytes.size();
    json::Value info = json::Value::object();
    info.set("dtype", t.dtype);
    info.set("shape", std::move(shape));
    info.set("data_offsets", std::move(offs));
    header.set(t.name, std::move(info));
  }
  std::string text = json::dump(header);
  while (text.size() % 8 != 0) text += ' ';

  const std::string tmp = temp_path(path);
  try {
    Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) fail("cannot create ", tmp, " (for ", path, "): ", std::strerror(errno));
    unsigned char lenbuf[8];
    uint64_t n = text.size();
    for (int i = 0; i < 8; ++i) lenbuf[i] = static_cast<unsigned char>(n >> (8 * i));
    write_all(fd.get(), lenbuf, 8, tmp);
    write_all(fd.get(), text.data(), text.size(), tmp);
    for (const auto& t : tensors) write_all(fd.get(), t.bytes.data(), t.bytes.size(), tmp);
    if (::close(fd.release()) != 0) fail("cannot write ", tmp, ": ", std::strerror(errno));
    commit_file(tmp, path);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
}

std::vector<SafeTensor> read_safetensors(const std::string& path) { return read_impl(path, true); }

std::vector<SafeTensor> read_safetensors_header(const std::string& path) {
  return read_impl(path, false);
}

}  // namespace ssd
