// Tensor: dtype + shape + pointer + where it lives. Always contiguous, row-major.
// Storage is reference-counted so views (reshape, slices along dim 0) keep it alive;
// the backend that allocated it supplies the deleter.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"

namespace ssd {

enum class DType : uint8_t { F32, F64, BF16, I32 };
enum class Device : uint8_t { CPU, CUDA };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
const char* device_name(Device d);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::F32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::F64; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::I32; };

struct Tensor {
  std::shared_ptr<void> storage;  // owner of the allocation (null for borrowed memory)
  void* data = nullptr;
  DType dtype = DType::F32;
  Device device = Device::CPU;
  Shape shape;

  bool defined() const { return data != nullptr || (storage != nullptr); }
  int64_t numel() const { return shape_numel(shape); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int dim() const { return static_cast<int>(shape.size()); }
  int64_t size(int i) const { return shape.at(i < 0 ? shape.size() + i : i); }

  template <class T>
  T* ptr() const {
    SSD_CHECK(dtype == dtype_of<T>::value, "tensor is ", dtype_name(dtype));
    return static_cast<T*>(data);
  }

  // Same memory, new shape (numel must match).
  Tensor view(Shape new_shape) const;
  // Rows [start, start+len) along dim 0.
  Tensor rows(int64_t start, int64_t len) const;
};

// A named full (unsharded) fp32 tensor on the host: what checkpoints and exports hold.
struct HostTensor {
  std::string name;
  Shape shape;
  std::vector<float> data;
};

// Wraps memory the caller owns (host memory in tests, for example).
Tensor borrow(void* data, DType dtype, Shape shape, Device device = Device::CPU);

// A block of columns [off, off+width) of a row-major 2-D tensor [rows, ld]. Ops that read one
// part of a packed projection (z, xBC or dt of in_proj's output) take one of these, so the
// packed tensor never has to be split into copies.
struct ColSlice {
  Tensor t;
  int64_t off = 0;
  int64_t width = 0;
  int64_t rows() const { return t.size(0); }
  int64_t ld() const { return t.size(1); }
};
inline ColSlice cols(const Tensor& t, int64_t off, int64_t width) { return {t, off, width}; }
inline ColSlice all_cols(const Tensor& t) { return {t, 0, t.size(1)}; }
// Checks the arguments of Backend::copy_rows (same dtype and width, rows in range).
void check_copy_rows(const ColSlice& src, int64_t src_row, const ColSlice& dst, int64_t dst_row,
                     int64_t rows);

}  // namespace ssd
