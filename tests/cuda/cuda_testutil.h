// Host-side helpers shared by the CUDA tests: the tests' own bf16 rounding (independent of the
// library's), a small owning device buffer, and the random inputs of the SSD tests. Include
// only where SSD_HAVE_CUDA is defined.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "backend/backend.h"
#include "testutil.h"

#define CUDA_OK(x)                                                       \
  do {                                                                   \
    const cudaError_t e_ = (x);                                          \
    ASSERT_EQ(e_, cudaSuccess) << #x << ": " << cudaGetErrorString(e_);  \
  } while (0)

namespace ssdtest {

// float <-> bf16 bits, round to nearest even.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Rounds v to bf16 in place; returns the bits.
inline std::vector<uint16_t> round_bf16(std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    b[i] = to_bf16(v[i]);
    v[i] = from_bf16(b[i]);
  }
  return b;
}

template <class T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    if (cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)) != cudaSuccess) p = nullptr;
  }
  DevBuf(const DevBuf&) = delete;
  ~DevBuf() { cudaFree(p); }
  void up(const std::vector<T>& h) { cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice); }
  std::vector<T> down() const {
    std::vector<T> h(n);
    cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
};

// Random inputs of one SSD call, as the CUDA SSD tests draw them: xBC ~ N(0, 1), raw dt
// ~ N(0, 0.25) with row stride ld_dt, dt_bias = softplus^-1 of U[0.001, 0.1], A = -U[1, 16]
// (stored as A_log), D ~ N(0, 1), initial state, dy and dfinal ~ N(0, 1). The inputs the
// kernels read in bf16 (xBC, dt, dy) are rounded in place; *_b hold their bf16 bits.
struct SsdTestInputs {
  std::vector<float> xBC, dt_raw, dt_bias, A_log, D, init, dy, dfinal;
  std::vector<uint16_t> xBC_b, dt_b, dy_b;
};
inline SsdTestInputs make_ssd_inputs(const ssd::SsdDims& d, int64_t ld_dt, uint64_t seed) {
  const int64_t T = d.tokens(), H = d.nheads;
  const int64_t SN = d.batch * H * d.headdim * d.dstate;
  SsdTestInputs in;
  in.xBC = randn<float>(T * d.conv_dim(), seed + 1);
  in.dt_raw = randn<float>(T * ld_dt, seed + 2, 0.5);
  in.dt_bias = uniform<float>(H, seed + 3, 0.001, 0.1);
  for (auto& v : in.dt_bias) v = std::log(std::expm1(v));
  in.A_log = uniform<float>(H, seed + 4, 1.0, 16.0);
  for (auto& v : in.A_log) v = std::log(v);
  in.D = randn<float>(H, seed + 5);
  in.init = randn<float>(SN, seed + 6);
  in.dy = randn<float>(T * d.d_inner(), seed + 7);
  in.dfinal = randn<float>(SN, seed + 8);
  in.xBC_b = round_bf16(in.xBC);
  in.dt_b = round_bf16(in.dt_raw);
  in.dy_b = round_bf16(in.dy);
  return in;
}

// Those inputs uploaded to the device (bf16 bits where the kernels read bf16); ok() is false
// when an allocation failed.
struct SsdDevInputs {
  DevBuf<uint16_t> xBC, dt, dy;
  DevBuf<float> dt_bias, A_log, D, init, dfinal;
  explicit SsdDevInputs(const SsdTestInputs& in)
      : xBC(in.xBC_b.size()), dt(in.dt_b.size()), dy(in.dy_b.size()),
        dt_bias(in.dt_bias.size()), A_log(in.A_log.size()), D(in.D.size()),
        init(in.init.size()), dfinal(in.dfinal.size()) {
    if (!ok()) return;
    xBC.up(in.xBC_b);
    dt.up(in.dt_b);
    dy.up(in.dy_b);
    dt_bias.up(in.dt_bias);
    A_log.up(in.A_log);
    D.up(in.D);
    init.up(in.init);
    dfinal.up(in.dfinal);
  }
  bool ok() const {
    return xBC.p && dt.p && dy.p && dt_bias.p && A_log.p && D.p && init.p && dfinal.p;
  }
};

}  // namespace ssdtest
