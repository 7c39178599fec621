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

void validate_for_write(const std::string& path, const CheckpointData& c) {
  std::set<std::string> seen;
  for (const auto& t : c.params) {
    check_name("parameter", t.name, path);
    if (!seen.insert(t.name).second)
      fail("cannot write checkpoint ", path, ": parameter ", t.name, " appears twice");
    for (int64_t d : t.shape)
      if (d < 0) fail("cannot write checkpoint ", path, ": parameter ", t.name, " has shape ",
                      shape_str(t.shape));
    if (static_cast<int64_t>(t.data.size()) != shape_numel(t.shape))
      fail("cannot write checkpoint ", path, ": parameter ", t.name, " has ", t.data.size(),
           " values for shape ", shape_str(t.shape));
  }
  const bool has_opt = !c.adam_m.empty() || !c.adam_v.empty();
  if (has_opt) {
    for (const auto* group : {&c.adam_m, &c.adam_v}) {
      const char* gname = group == &c.adam_m ? "adam_m" : "adam_v";
      if (group->size() != c.params.size())
        fail("cannot write checkpoint ", path, ": ", gname, " has ", group->size(),
             " tensors but there are ", c.params.size(), " parameters");
      for (size_t i = 0; i < c.params.size(); ++i) {
        const auto& t = (*group)[i];
        if (t.name != c.params[i].name || t.shape != c.params[i].shape)
          fail("cannot write checkpoint ", path, ": ", gname, "[", i, "] is ", t.name, " ",
               shape_str(t.shape), " but parameter ", i, " is ", c.params[i].name, " ",
               shape_str(c.params[i].shape));
        if (static_cast<int64_t>(t.data.size()) != shape_numel(t.shape))
          fail("cannot write checkpoint ", path, ": ", gname, " ", t.name, " has ",
               t.data.size(), " values for shape ", shape_str(t.shape));
      }
    }
  }
  for (const auto& [key, v] : c.state) check_name("state", key, path);
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

void write_contents(const Writer& w, const CheckpointData& ckpt) {
  w.attr_i64(w.file, "format_version", kCheckpointFormatVersion);
  w.attr_i64(w.file, "step", ckpt.step);

  const bool has_opt = !ckpt.adam_m.empty();
  json::Value manifest = json::Value::object();
  json::Value names = json::Value::array();
  for (const auto& t : ckpt.params) names.push(t.name);
  json::Value keys = json::Value::array();
  for (const auto& [k, v] : ckpt.state) keys.push(k);
  manifest.set("params", std::move(names));
  manifest.set("optimizer", has_opt);
  manifest.set("state", std::move(keys));
  w.string("manifest", json::dump(manifest));
  w.string("config_yaml", ckpt.config_yaml);

  {
    H5 g = w.make_group("params");
    for (const auto& t : ckpt.params) w.tensor(g.get(), "params", t);
  }
  if (has_opt) {
    H5 gm = w.make_group("adam_m");
    for (const auto& t : ckpt.adam_m) w.tensor(gm.get(), "adam_m", t);
    H5 gv = w.make_group("adam_v");
    for (const auto& t : ckpt.adam_v) w.tensor(gv.get(), "adam_v", t);
  }
  {
    H5 g = w.make_group("state");
    for (const auto& [key, v] : ckpt.state)
      w.dataset(g.get(), key, "/state/" + key, H5T_STD_U64LE, H5T_NATIVE_UINT64,
                Shape{static_cast<int64_t>(v.size())}, v.data(), v.size() * sizeof(uint64_t));
  }
}

}  // namespace

// Each tensor goes from the caller's buffer to the temp file (H5Dwrite, then the driver's
// pwrite): no copy of the file is held in memory. Then fsync, rename, fsync the directory.
void write_checkpoint(const std::string& path, const CheckpointData& ckpt) {
  validate_for_write(path, ckpt);
  QuietHdf5 quiet;
  const std::string tmp = temp_path(path);
  CheckedIo io;
  try {
    H5 fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
    const CheckedFapl info{&io};
    if (!fapl.ok() || H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_LATEST) < 0 ||
        H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG) < 0 || checked_driver() < 0 ||
        H5Pset_driver(fapl.get(), checked_driver(), &info) < 0)
      fail("cannot set HDF5 file properties: ", h5_detail());
    H5 file(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
    if (!file.ok()) {
      if (io.open_error) fail("cannot create ", tmp, ": ", errno_str(io.open_error));
      fail("cannot create ", tmp, ": ", h5_detail());
    }
    write_contents(Writer{file.get()}, ckpt);
    // The driver fails no call, so HDF5 closes the file whatever the disk did.
    if (!file.close()) fail("closing ", tmp, " failed: ", h5_detail());
    if (io.error) fail("cannot write ", tmp, ": ", errno_str(io.error));
  } catch (const Error& e) {
    ::unlink(tmp.c_str());
    // A failed write is the cause of whatever HDF5 said after it.
    if (io.error) fail("cannot write checkpoint ", path, ": cannot write ", tmp, ": ",
                       errno_str(io.error));
    fail("cannot write checkpoint ", path, ": ", e.what());
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  try {
    commit_file(tmp, path);  // removes tmp when it fails
  } catch (const Error& e) {
    fail("cannot write checkpoint ", path, ": ", e.what());
  }
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
