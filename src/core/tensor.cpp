#include "core/tensor.h"

#include <sstream>

namespace ssd {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::BF16: return 2;
    case DType::I32: return 4;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F64: return "f64";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
  }
  return "?";
}

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

Tensor Tensor::view(Shape new_shape) const {
  SSD_CHECK(shape_numel(new_shape) == numel(), "view ", shape_str(shape), " as ",
            shape_str(new_shape));
  Tensor t = *this;
  t.shape = std::move(new_shape);
  return t;
}

Tensor Tensor::rows(int64_t start, int64_t len) const {
  SSD_CHECK(dim() >= 1 && start >= 0 && start + len <= shape[0]);
  Tensor t = *this;
  int64_t row_elems = shape[0] ? numel() / shape[0] : 0;
  t.data = static_cast<char*>(data) + start * row_elems * dtype_size(dtype);
  t.shape[0] = len;
  return t;
}

Tensor borrow(void* data, DType dtype, Shape shape, Device device) {
  Tensor t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.shape = std::move(shape);
  return t;
}

void check_copy_rows(const ColSlice& src, int64_t src_row, const ColSlice& dst, int64_t dst_row,
                     int64_t rows) {
  SSD_CHECK(src.t.dtype == dst.t.dtype && src.width == dst.width, "copy_rows: ",
            dtype_name(src.t.dtype), " x ", src.width, " into ", dtype_name(dst.t.dtype), " x ",
            dst.width);
  SSD_CHECK(rows >= 0 && src_row >= 0 && dst_row >= 0 && src_row + rows <= src.rows() &&
                dst_row + rows <= dst.rows() && src.off + src.width <= src.ld() &&
                dst.off + dst.width <= dst.ld(),
            "copy_rows out of range");
}

}  // namespace ssd
