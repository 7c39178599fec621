// Checkpoints in HDF5 (C API). Layout of one file (format_version 1):
//
//   /                      attributes format_version (int64), step (int64)
//   /manifest              JSON string: {"params": [names in table order], "optimizer": bool,
//                                        "state": [keys]} — the order and the set of datasets
//   /config_yaml           string: the full resolved config
//   /params/<name>         float32, the full tensor shape   (name = reference name, dots and all)
//   /adam_m/<name>         float32, same names and shapes as /params (when "optimizer")
//   /adam_v/<name>
//   /state/<key>           uint64, 1-D
//
// Every dataset is contiguous (so its bytes can be located with H5Dget_offset) and carries a
// "crc32" attribute: the CRC-32 of its little-endian bytes, verified by read_checkpoint. The
// file is created with library-version bounds >= 1.8, so HDF5's own metadata (superblock v2,
// object headers v2) is checksummed too.
#include "io/checkpoint.h"

#include <fcntl.h>
#include <hdf5.h>
#if H5_VERSION_GE(1, 13, 2)
#include <H5FDdevelop.h>  // H5FD_class_t moved here from H5FDpublic.h
#endif
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>

#include "core/error.h"
#include "io/json.h"

namespace fs = std::filesystem;

namespace ssd {

static_assert(std::endian::native == std::endian::little,
              "checkpoint and export code assume a little-endian host");

// ---------------------------------------------------------------------------------------------
// CRC-32, slicing-by-8

namespace {
struct CrcTables {
  uint32_t t[8][256];
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (int k = 1; k < 8; ++k)
      for (int i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFF];
  }
};
const CrcTables& crc_tables() {
  static const CrcTables tables;
  return tables;
}
}  // namespace

uint32_t crc32(const void* data, size_t n, uint32_t crc) {
  const auto& t = crc_tables().t;
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = ~crc;
  while (n >= 8) {
    uint32_t a, b;
    std::memcpy(&a, p, 4);
    std::memcpy(&b, p + 4, 4);
    a ^= c;
    c = t[7][a & 0xFF] ^ t[6][(a >> 8) & 0xFF] ^ t[5][(a >> 16) & 0xFF] ^ t[4][a >> 24] ^
        t[3][b & 0xFF] ^ t[2][(b >> 8) & 0xFF] ^ t[1][(b >> 16) & 0xFF] ^ t[0][b >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = t[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
  return ~c;
}

// ---------------------------------------------------------------------------------------------
// Atomic files

namespace {
std::string errno_str(int e) { return std::strerror(e); }

void fsync_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open ", path, " to fsync it: ", errno_str(errno));
  if (::fsync(fd) != 0) {
    int e = errno;
    ::close(fd);
    fail("fsync of ", path, " failed: ", errno_str(e));
  }
  ::close(fd);
}

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail("cannot open directory ", dir, " to fsync it: ", errno_str(errno));
  // Some filesystems cannot fsync a directory (EINVAL); the rename is then as durable as it gets.
  if (::fsync(fd) != 0 && errno != EINVAL && errno != EROFS) {
    int e = errno;
    ::close(fd);
    fail("fsync of directory ", dir, " failed: ", errno_str(e));
  }
  ::close(fd);
}

std::string parent_dir(const std::string& path) {
  std::string p = fs::path(path).parent_path().string();
  return p.empty() ? "." : p;
}
}  // namespace

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0 || !buf[0]) return "localhost";
  return buf;
}

std::string temp_path(const std::string& path) {
  return path + ".tmp." + host_name() + "." + std::to_string(static_cast<long long>(::getpid()));
}

void commit_file(const std::string& tmp, const std::string& path) {
  try {
    fsync_file(tmp);
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
      fail("cannot rename ", tmp, " to ", path, ": ", errno_str(errno));
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  fsync_dir(parent_dir(path));
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = temp_path(path);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot create ", tmp, " (for ", path, "): ", errno_str(errno));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      fail("cannot write ", tmp, " (for ", path, "): ", errno_str(e));
    }
    done += static_cast<size_t>(w);
  }
  if (::close(fd) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    fail("cannot write ", tmp, " (for ", path, "): ", errno_str(e));
  }
  commit_file(tmp, path);
}

// ---------------------------------------------------------------------------------------------
// HDF5 helpers

namespace {

// Turns off HDF5's automatic error printing for the lifetime of the object (we produce our own
// messages) and restores the previous handler afterwards.
class QuietHdf5 {
 public:
  QuietHdf5() {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietHdf5() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }
  QuietHdf5(const QuietHdf5&) = delete;
  QuietHdf5& operator=(const QuietHdf5&) = delete;

 private:
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

// The most specific message on HDF5's error stack (then clears the stack).
std::string h5_detail() {
  std::string msg;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_UPWARD,
      [](unsigned n, const H5E_error2_t* err, void* data) -> herr_t {
        if (n == 0 && err && err->desc) *static_cast<std::string*>(data) = err->desc;
        return 0;
      },
      &msg);
  H5Eclear2(H5E_DEFAULT);
  return msg.empty() ? std::string("unknown HDF5 error") : msg;
}

// An owned hid_t with its close function.
class H5 {
 public:
  H5() = default;
  H5(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~H5() { reset(); }
  H5(H5&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = H5I_INVALID_HID; }
  H5& operator=(H5&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      close_ = o.close_;
      o.id_ = H5I_INVALID_HID;
    }
    return *this;
  }
  H5(const H5&) = delete;
  H5& operator=(const H5&) = delete;
  hid_t get() const { return id_; }
  bool ok() const { return id_ >= 0; }
  // Closes now and reports whether closing succeeded.
  bool close() {
    if (id_ < 0) return true;
    herr_t r = close_(id_);
    id_ = H5I_INVALID_HID;
    return r >= 0;
  }
  void reset() {
    if (id_ >= 0 && close_) close_(id_);
    id_ = H5I_INVALID_HID;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  herr_t (*close_)(hid_t) = nullptr;
};

void check_name(const std::string& what, const std::string& name, const std::string& path) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      name.find('\0') != std::string::npos)
    fail("cannot write checkpoint ", path, ": invalid ", what, " name \"", name,
         "\" (must be non-empty and contain no '/')");
}

// ---- writing ----

// Writes the datasets of one checkpoint into an open HDF5 file. Its errors name the dataset;
// write_checkpoint adds the file.
struct Writer {
  hid_t file;

  [[noreturn]] void h5fail(const std::string& what) const { fail(what, ": ", h5_detail()); }

  H5 make_group(const std::string& name) const {
    H5 g(H5Gcreate2(file, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
    if (!g.ok()) h5fail("cannot create group /" + name);
    return g;
  }

  void attr_u32(hid_t obj, const char* name, uint32_t v, const std::string& where) const {
    H5 space(H5Screate(H5S_SCALAR), H5Sclose);
    H5 a(H5Acreate2(obj, name, H5T_STD_U32LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    if (!a.ok() || H5Awrite(a.get(), H5T_NATIVE_UINT32, &v) < 0)
      h5fail("cannot write attribute " + std::string(name) + " of " + where);
  }

  void attr_i64(hid_t obj, const char* name, int64_t v) const {
    H5 space(H5Screate(H5S_SCALAR), H5Sclose);
    H5 a(H5Acreate2(obj, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    if (!a.ok() || H5Awrite(a.get(), H5T_NATIVE_INT64, &v) < 0)
      h5fail(std::string("cannot write attribute ") + name);
  }

  // A contiguous dataset of the given file/memory types with a crc32 attribute over `bytes`.
  void dataset(hid_t loc, const std::string& name, const std::string& full, hid_t file_type,
               hid_t mem_type, const Shape& shape, const void* data, size_t nbytes) const {
    H5 space;
    if (shape.empty()) {
      space = H5(H5Screate(H5S_SCALAR), H5Sclose);
    } else {
      std::vector<hsize_t> dims(shape.begin(), shape.end());
      space = H5(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
    }
    if (!space.ok()) h5fail("cannot create the dataspace of " + full);
    H5 dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    if (!dcpl.ok() || H5Pset_layout(dcpl.get(), H5D_CONTIGUOUS) < 0 ||
        H5Pset_alloc_time(dcpl.get(), H5D_ALLOC_TIME_EARLY) < 0)
      h5fail("cannot set the layout of " + full);
    H5 ds(H5Dcreate2(loc, name.c_str(), file_type, space.get(), H5P_DEFAULT, dcpl.get(),
                     H5P_DEFAULT),
          H5Dclose);
    if (!ds.ok()) h5fail("cannot create dataset " + full);
    if (nbytes > 0 &&
        H5Dwrite(ds.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
      h5fail("cannot write dataset " + full);
    attr_u32(ds.get(), "crc32", crc32(data, nbytes), full);
  }

  void tensor(hid_t group, const std::string& group_name, const HostTensor& t) const {
    const std::string full = "/" + group_name + "/" + t.name;
    dataset(group, t.name, full, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, t.shape, t.data.data(),
            t.data.size() * sizeof(float));
  }

  void string(const std::string& name, const std::string& s) const {
    const std::string full = "/" + name;
    H5 type(H5Tcopy(H5T_C_S1), H5Tclose);
    if (!type.ok() || H5Tset_size(type.get(), std::max<size_t>(1, s.size())) < 0 ||
        H5Tset_strpad(type.get(), H5T_STR_NULLPAD) < 0)
      h5fail("cannot make the string type of " + full);
    std::string buf = s.empty() ? std::string(1, '\0') : s;
    // The dataset is scalar; its one element is the whole string. crc over the string's bytes.
    H5 space(H5Screate(H5S_SCALAR), H5Sclose);
    H5 dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    H5Pset_layout(dcpl.get(), H5D_CONTIGUOUS);
    H5 ds(H5Dcreate2(file, name.c_str(), type.get(), space.get(), H5P_DEFAULT, dcpl.get(),
                     H5P_DEFAULT),
          H5Dclose);
    if (!ds.ok()) h5fail("cannot create dataset " + full);
    if (H5Dwrite(ds.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) < 0)
      h5fail("cannot write dataset " + full);
    attr_u32(ds.get(), "crc32", crc32(s.data(), s.size()), full);
  }
};

// Checks parameter `i` of a checkpoint and, when given, its AdamW moments, before any of them is
// written. `seen` holds the names of the parameters before it.
void validate_entry(const std::string& path, size_t i, const HostTensor& t, const HostTensor* m,
                    const HostTensor* v, std::set<std::string>& seen) {
  check_name("parameter", t.name, path);
  if (!seen.insert(t.name).second)
    fail("cannot write checkpoint ", path, ": parameter ", t.name, " appears twice");
  for (int64_t d : t.shape)
    if (d < 0) fail("cannot write checkpoint ", path, ": parameter ", t.name, " has shape ",
                    shape_str(t.shape));
  if (static_cast<int64_t>(t.data.size()) != shape_numel(t.shape))
    fail("cannot write checkpoint ", path, ": parameter ", t.name, " has ", t.data.size(),
         " values for shape ", shape_str(t.shape));
  for (const auto& [gname, g] : {std::pair<const char*, const HostTensor*>{"adam_m", m},
                                 {"adam_v", v}}) {
    if (!g) continue;
    if (g->name != t.name || g->shape != t.shape)
      fail("cannot write checkpoint ", path, ": ", gname, "[", i, "] is ", g->name, " ",
           shape_str(g->shape), " but parameter ", i, " is ", t.name, " ", shape_str(t.shape));
    if (static_cast<int64_t>(g->data.size()) != shape_numel(g->shape))
      fail("cannot write checkpoint ", path, ": ", gname, " ", g->name, " has ", g->data.size(),
           " values for shape ", shape_str(g->shape));
  }
}

void validate_state_keys(const std::string& path,
                         const std::map<std::string, std::vector<uint64_t>>& state) {
  for (const auto& [key, v] : state) check_name("state", key, path);
}

// Everything validate_entry checks, for a whole checkpoint, before the file is created.
void validate_for_write(const std::string& path, const CheckpointData& c) {
  const bool has_opt = !c.adam_m.empty() || !c.adam_v.empty();
  if (has_opt)
    for (const auto* group : {&c.adam_m, &c.adam_v})
      if (group->size() != c.params.size())
        fail("cannot write checkpoint ", path, ": ", group == &c.adam_m ? "adam_m" : "adam_v",
             " has ", group->size(), " tensors but there are ", c.params.size(), " parameters");
  std::set<std::string> seen;
  for (size_t i = 0; i < c.params.size(); ++i)
    validate_entry(path, i, c.params[i], has_opt ? &c.adam_m[i] : nullptr,
                   has_opt ? &c.adam_v[i] : nullptr, seen);
  validate_state_keys(path, c.state);
}

// ---- reading ----

struct Reader {
  hid_t file;
  const std::string& path;

  [[noreturn]] void corrupt(const std::string& what) const {
    fail("checkpoint ", path, ": ", what);
  }
  [[noreturn]] void h5fail(const std::string& what) const {
    fail("checkpoint ", path, ": ", what, ": ", h5_detail(), " (the file is corrupt)");
  }

  bool exists(hid_t loc, const std::string& name) const {
    htri_t r = H5Lexists(loc, name.c_str(), H5P_DEFAULT);
    if (r < 0) h5fail("cannot look up " + name);
    return r > 0;
  }

  H5 open_group(const std::string& name) const {
    if (!exists(file, name)) corrupt("missing group /" + name);
    H5 g(H5Gopen2(file, name.c_str(), H5P_DEFAULT), H5Gclose);
    if (!g.ok()) h5fail("cannot open group /" + name);
    return g;
  }

  int64_t attr_i64(const char* name) const {
    htri_t e = H5Aexists(file, name);
    if (e < 0) h5fail(std::string("cannot look up attribute ") + name);
    if (e == 0)
      corrupt(std::string("missing attribute ") + name + " (not an ssdtrain checkpoint?)");
    H5 a(H5Aopen(file, name, H5P_DEFAULT), H5Aclose);
    if (!a.ok()) h5fail(std::string("cannot open attribute ") + name);
    H5 type(H5Aget_type(a.get()), H5Tclose);
    if (H5Tget_class(type.get()) != H5T_INTEGER)
      corrupt(std::string("attribute ") + name + " is not an integer");
    int64_t v = 0;
    if (H5Aread(a.get(), H5T_NATIVE_INT64, &v) < 0)
      h5fail(std::string("cannot read attribute ") + name);
    return v;
  }

  void verify_crc(hid_t ds, const std::string& full, const void* data, size_t nbytes) const {
    htri_t e = H5Aexists(ds, "crc32");
    if (e < 0) h5fail("cannot look up the crc32 attribute of dataset " + full);
    if (e == 0) corrupt("dataset " + full + " has no crc32 attribute");
    H5 a(H5Aopen(ds, "crc32", H5P_DEFAULT), H5Aclose);
    uint32_t stored = 0;
    if (!a.ok() || H5Aread(a.get(), H5T_NATIVE_UINT32, &stored) < 0)
      h5fail("cannot read the crc32 attribute of dataset " + full);
    uint32_t actual = crc32(data, nbytes);
    if (stored != actual) {
      char buf[96];
      std::snprintf(buf, sizeof(buf), " (stored crc32 %08x, computed %08x)", stored, actual);
      corrupt("checksum mismatch in dataset " + full + buf +
              ": the file is corrupt; use an older checkpoint");
    }
  }

  H5 open_dataset(hid_t loc, const std::string& name, const std::string& full) const {
    if (!exists(loc, name)) corrupt("missing dataset " + full);
    H5 ds(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), H5Dclose);
    if (!ds.ok()) h5fail("cannot open dataset " + full);
    return ds;
  }

  Shape dataset_shape(hid_t ds, const std::string& full) const {
    H5 space(H5Dget_space(ds), H5Sclose);
    if (!space.ok()) h5fail("cannot read the shape of dataset " + full);
    int rank = H5Sget_simple_extent_ndims(space.get());
    if (rank < 0) h5fail("cannot read the shape of dataset " + full);
    std::vector<hsize_t> dims(rank);
    if (rank > 0 && H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr) < 0)
      h5fail("cannot read the shape of dataset " + full);
    return Shape(dims.begin(), dims.end());
  }

  void check_type(hid_t ds, const std::string& full, H5T_class_t cls, size_t size,
                  const char* want) const {
    H5 type(H5Dget_type(ds), H5Tclose);
    if (!type.ok()) h5fail("cannot read the type of dataset " + full);
    if (H5Tget_class(type.get()) != cls || H5Tget_size(type.get()) != size)
      corrupt("dataset " + full + " is not " + want);
  }

  HostTensor tensor(hid_t group, const std::string& group_name, const std::string& name) const {
    const std::string full = "/" + group_name + "/" + name;
    H5 ds = open_dataset(group, name, full);
    check_type(ds.get(), full, H5T_FLOAT, 4, "float32");
    HostTensor t;
    t.name = name;
    t.shape = dataset_shape(ds.get(), full);
    t.data.resize(static_cast<size_t>(shape_numel(t.shape)));
    if (!t.data.empty() &&
        H5Dread(ds.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data.data()) < 0)
      h5fail("cannot read dataset " + full);
    verify_crc(ds.get(), full, t.data.data(), t.data.size() * sizeof(float));
    return t;
  }

  std::vector<uint64_t> u64(hid_t group, const std::string& key) const {
    const std::string full = "/state/" + key;
    H5 ds = open_dataset(group, key, full);
    check_type(ds.get(), full, H5T_INTEGER, 8, "uint64");
    Shape shape = dataset_shape(ds.get(), full);
    if (shape.size() != 1) corrupt("dataset " + full + " is not 1-D");
    std::vector<uint64_t> v(static_cast<size_t>(shape[0]));
    if (!v.empty() &&
        H5Dread(ds.get(), H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()) < 0)
      h5fail("cannot read dataset " + full);
    verify_crc(ds.get(), full, v.data(), v.size() * sizeof(uint64_t));
    return v;
  }

  std::string string(const std::string& name) const {
    const std::string full = "/" + name;
    H5 ds = open_dataset(file, name, full);
    H5 ftype(H5Dget_type(ds.get()), H5Tclose);
    if (!ftype.ok() || H5Tget_class(ftype.get()) != H5T_STRING ||
        H5Tis_variable_str(ftype.get()) != 0)
      corrupt("dataset " + full + " is not a fixed-length string");
    size_t size = H5Tget_size(ftype.get());
    H5 mtype(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mtype.get(), size);
    H5Tset_strpad(mtype.get(), H5T_STR_NULLPAD);
    std::string buf(size, '\0');
    if (H5Dread(ds.get(), mtype.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) < 0)
      h5fail("cannot read dataset " + full);
    while (!buf.empty() && buf.back() == '\0') buf.pop_back();
    verify_crc(ds.get(), full, buf.data(), buf.size());
    return buf;
  }

  // Fails if the group holds a link not in `names`.
  void no_extras(hid_t group, const std::string& group_name,
                 const std::vector<std::string>& names) const {
    H5G_info_t info;
    if (H5Gget_info(group, &info) < 0) h5fail("cannot list group /" + group_name);
    if (info.nlinks == names.size()) return;  // every name was found, so no extras
    std::set<std::string> want(names.begin(), names.end());
    for (hsize_t i = 0; i < info.nlinks; ++i) {
      ssize_t n = H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0,
                                     H5P_DEFAULT);
      if (n < 0) h5fail("cannot list group /" + group_name);
      std::string name(static_cast<size_t>(n) + 1, '\0');
      H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(),
                         H5P_DEFAULT);
      name.resize(static_cast<size_t>(n));
      if (!want.count(name))
        corrupt("unexpected dataset /" + group_name + "/" + name +
                (group_name == "params" ? std::string(" (not in the manifest)")
                                        : std::string(" (not a parameter in /params)")));
    }
  }
};

std::vector<std::string> manifest_list(const json::Value& m, const char* key,
                                       const std::string& path) {
  const json::Value* v = m.find(key);
  if (!v || !v->is_array()) fail("checkpoint ", path, ": /manifest lacks the list \"", key, "\"");
  std::vector<std::string> out;
  for (const auto& x : v->items()) {
    if (!x.is_string()) fail("checkpoint ", path, ": /manifest \"", key, "\" has a non-string");
    out.push_back(x.as_string());
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// A checked file driver: HDF5 writes the checkpoint straight into its temp file, one tensor at
// a time, and never sees an I/O error.
//
// When HDF5's own POSIX driver hit ENOSPC, the failed H5Fclose left the file half-closed inside
// the library, which then crashed in its atexit shutdown (exit 139 after the error message).
// Building the whole file in memory first avoided that but cost a copy of every tensor (97 GB
// on the writer for 2.7B with its optimizer state). This driver does the POSIX I/O itself: the
// first failed write records errno and from then on writes go nowhere on disk, so HDF5 always
// finishes and closes cleanly; write_checkpoint then reports the errno and removes the temp
// file. Metadata written after the failure is kept in memory so that HDF5 reads back what it
// wrote (its metadata cache may evict and reload entries); raw data is never read back.

namespace {

struct CheckedIo {
  int error = 0;       // the first errno of a failed write, truncate or close; 0 if none
  int open_error = 0;  // errno of the last failed open (HDF5 tries several flag sets)
  std::map<haddr_t, std::string> after_error;  // metadata written once error was set
};

struct CheckedFile {
  H5FD_t pub;  // first: HDF5 casts between the two
  int fd = -1;
  haddr_t eoa = 0, eof = 0;
  CheckedIo* io = nullptr;
};

// The driver's fapl info: where the writer wants errors recorded.
struct CheckedFapl {
  CheckedIo* io;
};

constexpr haddr_t kMaxAddr = (haddr_t{1} << (8 * sizeof(off_t) - 1)) - 1;

CheckedFile* as_file(H5FD_t* f) { return reinterpret_cast<CheckedFile*>(f); }
const CheckedFile* as_file(const H5FD_t* f) { return reinterpret_cast<const CheckedFile*>(f); }

// Pushes an error on HDF5's stack: only for misuse by HDF5 itself (out-of-range addresses),
// never for a failure of the disk.
herr_t bad_address(const char* what) {
  H5Epush2(H5E_DEFAULT, __FILE__, "checked driver", __LINE__, H5E_ERR_CLS, H5E_VFL, H5E_OVERFLOW,
           "%s", what);
  return -1;
}

H5FD_t* checked_open(const char* name, unsigned flags, hid_t fapl, haddr_t maxaddr) {
  if (!name || !*name || maxaddr == 0) return nullptr;
  const auto* info = static_cast<const CheckedFapl*>(H5Pget_driver_info(fapl));
  if (!info || !info->io) return nullptr;
  int o = (flags & H5F_ACC_RDWR) ? O_RDWR : O_RDONLY;
  if (flags & H5F_ACC_TRUNC) o |= O_TRUNC;
  if (flags & H5F_ACC_CREAT) o |= O_CREAT;
  if (flags & H5F_ACC_EXCL) o |= O_EXCL;
  const int fd = ::open(name, o | O_CLOEXEC, 0644);
  if (fd < 0) {
    info->io->open_error = errno;
    H5Epush2(H5E_DEFAULT, __FILE__, "checked driver", __LINE__, H5E_ERR_CLS, H5E_FILE,
             H5E_CANTOPENFILE, "%s", std::strerror(errno));
    return nullptr;
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    info->io->open_error = errno;
    ::close(fd);
    return nullptr;
  }
  info->io->open_error = 0;
  auto* f = new CheckedFile;
  std::memset(&f->pub, 0, sizeof f->pub);
  f->fd = fd;
  f->eof = static_cast<haddr_t>(st.st_size);
  f->io = info->io;
  return &f->pub;
}

herr_t checked_close(H5FD_t* file) {
  CheckedFile* f = as_file(file);
  if (::close(f->fd) != 0 && !f->io->error) f->io->error = errno;
  delete f;
  return 0;
}

herr_t checked_query(const H5FD_t*, unsigned long* flags) {
  // What HDF5's POSIX and core drivers declare: metadata and small raw data aggregated into
  // blocks, metadata accumulated, raw data sieved.
  if (flags)
    *flags = H5FD_FEAT_AGGREGATE_METADATA | H5FD_FEAT_ACCUMULATE_METADATA | H5FD_FEAT_DATA_SIEVE |
             H5FD_FEAT_AGGREGATE_SMALLDATA;
  return 0;
}

haddr_t checked_get_eoa(const H5FD_t* file, H5FD_mem_t) { return as_file(file)->eoa; }
herr_t checked_set_eoa(H5FD_t* file, H5FD_mem_t, haddr_t addr) {
  if (addr > kMaxAddr) return bad_address("address beyond the largest file offset");
  as_file(file)->eoa = addr;
  return 0;
}
haddr_t checked_get_eof(const H5FD_t* file, H5FD_mem_t) { return as_file(file)->eof; }

herr_t checked_get_handle(H5FD_t* file, hid_t, void** handle) {
  if (!handle) return -1;
  *handle = &as_file(file)->fd;
  return 0;
}

herr_t checked_read(H5FD_t* file, H5FD_mem_t, hid_t, haddr_t addr, size_t size, void* buf) {
  CheckedFile* f = as_file(file);
  if (addr == HADDR_UNDEF || addr > kMaxAddr || addr + size > f->eoa)
    return bad_address("read beyond the end of the allocated file");
  auto* out = static_cast<unsigned char*>(buf);
  size_t done = 0;
  while (done < size) {
    const ssize_t r = ::pread(f->fd, out + done, size - done, static_cast<off_t>(addr + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;  // past the end of what reached the disk: zeros, as POSIX reads give
    done += static_cast<size_t>(r);
  }
  std::memset(out + done, 0, size - done);
  // Metadata written after a failure lives in memory only: lay it over what the disk returned.
  for (const auto& [at, bytes] : f->io->after_error) {
    const haddr_t lo = std::max(at, addr), hi = std::min(at + bytes.size(), addr + size);
    if (lo < hi) std::memcpy(out + (lo - addr), bytes.data() + (lo - at), hi - lo);
  }
  return 0;
}

herr_t checked_write(H5FD_t* file, H5FD_mem_t type, hid_t, haddr_t addr, size_t size,
                     const void* buf) {
  CheckedFile* f = as_file(file);
  if (addr == HADDR_UNDEF || addr > kMaxAddr || addr + size > f->eoa)
    return bad_address("write beyond the end of the allocated file");
  const auto* in = static_cast<const unsigned char*>(buf);
  size_t done = 0;
  while (!f->io->error && done < size) {
    const ssize_t w = ::pwrite(f->fd, in + done, size - done, static_cast<off_t>(addr + done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      f->io->error = w < 0 ? errno : EIO;
      break;
    }
    done += static_cast<size_t>(w);
  }
  if (f->io->error && type != H5FD_MEM_DRAW && done < size)
    f->io->after_error[addr + done] = std::string(reinterpret_cast<const char*>(in + done),
                                                  size - done);
  f->eof = std::max(f->eof, addr + size);
  return 0;
}

herr_t checked_truncate(H5FD_t* file, hid_t, hbool_t) {
  CheckedFile* f = as_file(file);
  if (f->eoa != f->eof && !f->io->error) {
    if (::ftruncate(f->fd, static_cast<off_t>(f->eoa)) != 0) f->io->error = errno;
  }
  f->eof = f->eoa;
  return 0;
}

// The driver, registered once. Members are set by name: H5FD_class_t grew fields in 1.13.
hid_t checked_driver() {
  static const hid_t id = [] {
    static H5FD_class_t c;
    std::memset(&c, 0, sizeof c);
#if H5_VERSION_GE(1, 13, 2)
    c.version = H5FD_CLASS_VERSION;
    c.value = 500;  // a value for drivers that are not registered with The HDF Group
#endif
    c.name = "ssdtrain_checked";
    c.maxaddr = kMaxAddr;
    c.fc_degree = H5F_CLOSE_STRONG;
    c.fapl_size = sizeof(CheckedFapl);
    c.open = checked_open;
    c.close = checked_close;
    c.query = checked_query;
    c.get_eoa = checked_get_eoa;
    c.set_eoa = checked_set_eoa;
    c.get_eof = checked_get_eof;
    c.get_handle = checked_get_handle;
    c.read = checked_read;
    c.write = checked_write;
    c.truncate = checked_truncate;
    const H5FD_mem_t map[H5FD_MEM_NTYPES] = H5FD_FLMAP_DICHOTOMY;
    std::copy(map, map + H5FD_MEM_NTYPES, c.fl_map);
    return H5FDregister(&c);
  }();
  return id;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The streaming writer. Each tensor goes from the caller's buffer to the temp file (H5Dwrite,
// then the driver's pwrite): no copy of the file is held in memory. The groups /params, /adam_m
// and /adam_v are open from the start, so a parameter and its moments are written together; the
// attributes, /manifest (the names, collected as they came), /config_yaml and /state are written
// by finish, which then fsyncs, renames and fsyncs the directory.

struct CheckpointWriter::Impl {
  std::string path, tmp;
  bool optimizer = false;
  CheckedIo io;  // the driver holds its address: Impl lives on the heap and never moves
  H5 file, params, adam_m, adam_v;
  std::vector<std::string> names;
  std::set<std::string> seen;
  bool failed = false;  // a call threw: the temp file is gone, nothing more is written
  bool done = false;    // finish ran: the temp file was renamed (or removed by commit_file)

  ~Impl() {
    if (!done) close_and_remove();
  }

  // Closes what is open and removes the temp file; never throws.
  void close_and_remove() noexcept {
    QuietHdf5 quiet;
    adam_v.reset();
    adam_m.reset();
    params.reset();
    file.reset();
    ::unlink(tmp.c_str());
    H5Eclear2(H5E_DEFAULT);
  }

  void check_usable() const {
    if (done) fail("internal: checkpoint ", path, " was already finished");
    if (failed) fail("cannot write checkpoint ", path, ": an earlier write to it failed");
  }

  // Runs fn (validation: its message stands as it is) and removes the temp file if it throws.
  template <class F>
  void checked(F&& fn) {
    try {
      fn();
    } catch (...) {
      failed = true;
      close_and_remove();
      throw;
    }
  }

  // Runs fn (HDF5 work on the temp file), then checks the driver for a failed write. On any
  // error: removes the temp file and throws naming the checkpoint (and errno of a failed write).
  template <class F>
  void io_step(F&& fn) {
    QuietHdf5 quiet;
    try {
      fn();
      if (io.error) fail("cannot write ", tmp, ": ", errno_str(io.error));
    } catch (const Error& e) {
      failed = true;
      close_and_remove();
      // A failed write is the cause of whatever HDF5 said after it.
      if (io.error)
        fail("cannot write checkpoint ", path, ": cannot write ", tmp, ": ", errno_str(io.error));
      fail("cannot write checkpoint ", path, ": ", e.what());
    } catch (...) {
      failed = true;
      close_and_remove();
      throw;
    }
  }

  void add(const HostTensor& p, const HostTensor* m, const HostTensor* v) {
    check_usable();
    checked([&] {
      if (optimizer != (m != nullptr))
        fail("cannot write checkpoint ", path, ": parameter ", p.name,
             optimizer ? " comes without its AdamW moments" : " comes with AdamW moments",
             " (the checkpoint was started ", optimizer ? "with" : "without", " optimizer state)");
      validate_entry(path, names.size(), p, m, v, seen);
    });
    io_step([&] {
      const Writer w{file.get()};
      w.tensor(params.get(), "params", p);
      if (m) {
        w.tensor(adam_m.get(), "adam_m", *m);
        w.tensor(adam_v.get(), "adam_v", *v);
      }
    });
    names.push_back(p.name);
  }

  void finish(int64_t step, const std::string& config_yaml,
              const std::map<std::string, std::vector<uint64_t>>& state) {
    check_usable();
    checked([&] { validate_state_keys(path, state); });
    io_step([&] {
      const Writer w{file.get()};
      w.attr_i64(file.get(), "format_version", kCheckpointFormatVersion);
      w.attr_i64(file.get(), "step", step);
      json::Value manifest = json::Value::object();
      json::Value list = json::Value::array();
      for (const auto& n : names) list.push(n);
      json::Value keys = json::Value::array();
      for (const auto& [k, v] : state) keys.push(k);
      manifest.set("params", std::move(list));
      manifest.set("optimizer", optimizer);
      manifest.set("state", std::move(keys));
      w.string("manifest", json::dump(manifest));
      w.string("config_yaml", config_yaml);
      {
        H5 g = w.make_group("state");
        for (const auto& [key, v] : state)
          w.dataset(g.get(), key, "/state/" + key, H5T_STD_U64LE, H5T_NATIVE_UINT64,
                    Shape{static_cast<int64_t>(v.size())}, v.data(), v.size() * sizeof(uint64_t));
      }
      adam_v.reset();
      adam_m.reset();
      params.reset();
      // The driver fails no call, so HDF5 closes the file whatever the disk did.
      if (!file.close()) fail("closing ", tmp, " failed: ", h5_detail());
    });
    done = true;  // commit_file removes the temp file itself when it fails
    try {
      commit_file(tmp, path);
    } catch (const Error& e) {
      fail("cannot write checkpoint ", path, ": ", e.what());
    }
  }
};

CheckpointWriter::CheckpointWriter(const std::string& path, bool optimizer)
    : impl_(std::make_unique<Impl>()) {
  Impl& w = *impl_;
  w.path = path;
  w.tmp = temp_path(path);
  w.optimizer = optimizer;
  w.io_step([&] {
    H5 fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
    const CheckedFapl info{&w.io};
    if (!fapl.ok() || H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_LATEST) < 0 ||
        H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG) < 0 || checked_driver() < 0 ||
        H5Pset_driver(fapl.get(), checked_driver(), &info) < 0)
      fail("cannot set HDF5 file properties: ", h5_detail());
    w.file = H5(H5Fcreate(w.tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
    if (!w.file.ok()) {
      if (w.io.open_error) fail("cannot create ", w.tmp, ": ", errno_str(w.io.open_error));
      fail("cannot create ", w.tmp, ": ", h5_detail());
    }
    const Writer wr{w.file.get()};
    w.params = wr.make_group("params");
    if (optimizer) {
      w.adam_m = wr.make_group("adam_m");
      w.adam_v = wr.make_group("adam_v");
    }
  });
}

CheckpointWriter::~CheckpointWriter() = default;

void CheckpointWriter::add(const HostTensor& param) { impl_->add(param, nullptr, nullptr); }

void CheckpointWriter::add(const HostTensor& param, const HostTensor& m, const HostTensor& v) {
  impl_->add(param, &m, &v);
}

void CheckpointWriter::finish(int64_t step, const std::string& config_yaml,
                              const std::map<std::string, std::vector<uint64_t>>& state) {
  impl_->finish(step, config_yaml, state);
}

const std::string& CheckpointWriter::path() const { return impl_->path; }

// All checks first (nothing is created for a malformed checkpoint), then the streaming writer.
void write_checkpoint(const std::string& path, const CheckpointData& ckpt) {
  validate_for_write(path, ckpt);
  const bool has_opt = !ckpt.adam_m.empty();
  CheckpointWriter w(path, has_opt);
  for (size_t i = 0; i < ckpt.params.size(); ++i) {
    if (has_opt)
      w.add(ckpt.params[i], ckpt.adam_m[i], ckpt.adam_v[i]);
    else
      w.add(ckpt.params[i]);
  }
  w.finish(ckpt.step, ckpt.config_yaml, ckpt.state);
}

CheckpointData read_checkpoint(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) fail("checkpoint ", path, " does not exist");
    fail("cannot access checkpoint ", path, ": ", errno_str(errno));
  }
  if (S_ISDIR(st.st_mode)) fail("checkpoint ", path, " is a directory, not a checkpoint file");
  {
    // Tell "not HDF5 at all" apart from "HDF5 but damaged" by the signature at offset 0.
    static const unsigned char sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
    unsigned char head[8] = {};
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) fail("cannot open checkpoint ", path, ": ", errno_str(errno));
    size_t n = std::fread(head, 1, 8, f);
    std::fclose(f);
    if (n < 8 || std::memcmp(head, sig, 8) != 0)
      fail("checkpoint ", path, " is not an HDF5 file (", static_cast<long long>(st.st_size),
           " bytes, no HDF5 signature): not a checkpoint, or truncated to nothing");
  }

  QuietHdf5 quiet;
  H5 fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG);
  H5 file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), H5Fclose);
  if (!file.ok())
    fail("cannot open checkpoint ", path, ": ", h5_detail(),
         " (the file is truncated or corrupt; use an older checkpoint)");

  Reader r{file.get(), path};
  CheckpointData c;
  c.source = path;
  c.format_version = r.attr_i64("format_version");
  if (c.format_version > kCheckpointFormatVersion)
    fail("checkpoint ", path, " has format_version ", c.format_version,
         ": it was written by a newer ssdtrain (this build reads format_version <= ",
         kCheckpointFormatVersion, "); upgrade ssdtrain to resume from it");
  if (c.format_version < 1)
    fail("checkpoint ", path, " has invalid format_version ", c.format_version);
  c.step = r.attr_i64("step");

  const json::Value manifest = json::parse(r.string("manifest"), "checkpoint " + path + " /manifest");
  if (!manifest.is_object()) fail("checkpoint ", path, ": /manifest is not a JSON object");
  const std::vector<std::string> names = manifest_list(manifest, "params", path);
  const std::vector<std::string> keys = manifest_list(manifest, "state", path);
  const json::Value* opt = manifest.find("optimizer");
  if (!opt || !opt->is_bool()) fail("checkpoint ", path, ": /manifest lacks \"optimizer\"");
  c.config_yaml = r.string("config_yaml");

  {
    H5 g = r.open_group("params");
    for (const auto& n : names) c.params.push_back(r.tensor(g.get(), "params", n));
    r.no_extras(g.get(), "params", names);
  }
  if (opt->as_bool()) {
    for (const char* gname : {"adam_m", "adam_v"}) {
      auto& dst = std::string(gname) == "adam_m" ? c.adam_m : c.adam_v;
      H5 g = r.open_group(gname);
      for (size_t i = 0; i < names.size(); ++i) {
        dst.push_back(r.tensor(g.get(), gname, names[i]));
        if (dst.back().shape != c.params[i].shape)
          fail("checkpoint ", path, ": dataset /", gname, "/", names[i], " has shape ",
               shape_str(dst.back().shape), " but /params/", names[i], " has shape ",
               shape_str(c.params[i].shape));
      }
      r.no_extras(g.get(), gname, names);
    }
  }
  {
    H5 g = r.open_group("state");
    for (const auto& k : keys) c.state[k] = r.u64(g.get(), k);
    r.no_extras(g.get(), "state", keys);
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// Checkpoint directories

std::string checkpoint_path(const std::string& dir, int64_t step) {
  SSD_CHECK(step >= 0, "negative step ", step);
  char name[48];
  std::snprintf(name, sizeof(name), "step_%08lld.h5", static_cast<long long>(step));
  return (fs::path(dir) / name).string();
}

namespace {
// Step number of a file named step_########.h5 (8 or more digits); nullopt for anything else.
std::optional<int64_t> parse_checkpoint_name(const std::string& name) {
  const std::string pre = "step_", suf = ".h5";
  if (name.size() < pre.size() + 8 + suf.size()) return std::nullopt;
  if (name.compare(0, pre.size(), pre) != 0) return std::nullopt;
  if (name.compare(name.size() - suf.size(), suf.size(), suf) != 0) return std::nullopt;
  const char* b = name.data() + pre.size();
  const char* e = name.data() + name.size() - suf.size();
  for (const char* p = b; p < e; ++p)
    if (*p < '0' || *p > '9') return std::nullopt;
  int64_t step = 0;
  auto r = std::from_chars(b, e, step);
  if (r.ec != std::errc() || r.ptr != e) return std::nullopt;
  return step;
}

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  fs::directory_iterator it(dir, ec);
  if (ec) fail("cannot list checkpoint directory ", dir, ": ", ec.message());
  for (const auto& entry : it) {
    std::error_code ec2;
    if (!entry.is_regular_file(ec2)) continue;
    auto step = parse_checkpoint_name(entry.path().filename().string());
    if (step) out.emplace_back(*step, entry.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace

std::optional<std::string> latest_checkpoint(const std::string& dir) {
  auto all = list_checkpoints(dir);
  if (all.empty()) return std::nullopt;
  return all.back().second;
}

void prune_checkpoints(const std::string& dir, int64_t keep_last) {
  if (keep_last <= 0) return;
  auto all = list_checkpoints(dir);
  if (static_cast<int64_t>(all.size()) <= keep_last) return;
  for (size_t i = 0; i + static_cast<size_t>(keep_last) < all.size(); ++i) {
    if (::unlink(all[i].second.c_str()) != 0 && errno != ENOENT)
      fail("cannot delete old checkpoint ", all[i].second, ": ", errno_str(errno));
  }
  fsync_dir(dir);
}

void check_checkpoint_shapes(const CheckpointData& ckpt, const std::vector<HostTensor>& expected) {
  const std::string where =
      ckpt.source.empty() ? std::string("checkpoint") : "checkpoint " + ckpt.source;
  const char* hint = " (was it written with a different model config?)";
  std::map<std::string, const HostTensor*> have;
  for (const auto& t : ckpt.params) have[t.name] = &t;
  std::set<std::string> want;
  for (const auto& e : expected) {
    want.insert(e.name);
    auto it = have.find(e.name);
    if (it == have.end()) fail(where, ": missing parameter ", e.name, hint);
    if (it->second->shape != e.shape)
      fail(where, ": parameter ", e.name, " has shape ", shape_str(it->second->shape),
           " but the model expects ", shape_str(e.shape), hint);
  }
  for (const auto& t : ckpt.params)
    if (!want.count(t.name)) fail(where, ": unexpected parameter ", t.name, hint);
  for (const auto* group : {&ckpt.adam_m, &ckpt.adam_v}) {
    if (group->empty()) continue;
    const char* gname = group == &ckpt.adam_m ? "adam_m" : "adam_v";
    if (group->size() != ckpt.params.size())
      fail(where, ": ", gname, " has ", group->size(), " tensors for ", ckpt.params.size(),
           " parameters");
    for (size_t i = 0; i < group->size(); ++i)
      if ((*group)[i].name != ckpt.params[i].name || (*group)[i].shape != ckpt.params[i].shape)
        fail(where, ": ", gname, " tensor ", (*group)[i].name, " ",
             shape_str((*group)[i].shape), " does not match parameter ", ckpt.params[i].name,
             " ", shape_str(ckpt.params[i].shape));
  }
}

void check_checkpoint_finite(const CheckpointData& ckpt) {
  const std::string where =
      ckpt.source.empty() ? std::string("checkpoint") : "checkpoint " + ckpt.source;
  for (const auto& [gname, group] : {std::pair<const char*, const std::vector<HostTensor>*>{
                                         "params", &ckpt.params},
                                     {"adam_m", &ckpt.adam_m}, {"adam_v", &ckpt.adam_v}})
    for (const auto& t : *group)
      for (size_t i = 0; i < t.data.size(); ++i)
        if (!std::isfinite(t.data[i]))
          fail(where, ": dataset /", gname, "/", t.name, " holds a non-finite value (",
               t.data[i], " at index ", i, "): the run had diverged when it was written; "
               "resume from an older checkpoint");
}

}  // namespace ssd
