// The CUDA backend: bf16 compute dtype, fp32 accum dtype. Host glue: shape and dtype checks,
// a caching device allocator, one stream, cuBLASLt GEMMs (gemm.h) and the kernels of
// kernels/ops.h and kernels/ssd.h. Every op is enqueued on the backend's stream and returns
// without waiting, except upload, download, sum_squares and synchronize.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>
#include <algorithm>

#include "backend/backend.h"
#include "backend/cuda/gemm.h"
#include "ops.h"
#include "ssd.h"

namespace ssd {
namespace cuda {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("CUDA error in ", what, ": ", cudaGetErrorString(e));
}

// ---------------------------------------------------------------------------------------------
// Caching allocator: blocks are kept in per-size free lists and reused, so once the sizes of a
// training step have been seen no further cudaMalloc happens. All work runs on one stream, so a
// block freed on the host while kernels that use it are still queued can be handed out again at
// once: the next user's work is queued behind them.
class Allocator {
 public:
  explicit Allocator(int device) : device_(device) {}
  ~Allocator() { release_cached(); }

  // Size classes: 512-byte steps up to 1 MiB, then four classes per power of two.
  static size_t round(size_t bytes) {
    if (bytes <= (1u << 20)) return std::max<size_t>(512, (bytes + 511) & ~size_t(511));
    size_t p = size_t(1) << (63 - __builtin_clzll(bytes));
    size_t step = p / 4;
    return (bytes + step - 1) / step * step;
  }

  void* get(size_t bytes) {
    const size_t size = round(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(size);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_ -= size;
      in_use_ += size;
      peak_ = std::max(peak_, in_use_);
      return p;
    }
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, size);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the (non-sticky) out-of-memory error
      cudaDeviceSynchronize();
      release_cached_locked();
      e = cudaMalloc(&p, size);
      if (e != cudaSuccess) {
        cudaGetLastError();
        fail("CUDA out of memory on device ", device_, ": cannot allocate ", size,
             " bytes (", in_use_ >> 20, " MiB in use by tensors): ", cudaGetErrorString(e),
             ". Reduce the micro-batch size or sequence length.");
      }
    }
    in_use_ += size;
    peak_ = std::max(peak_, in_use_);
    return p;
  }

  size_t peak() const { return peak_; }

  void put(void* p, size_t bytes) {
    const size_t size = round(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    free_[size].push_back(p);
    in_use_ -= size;
    cached_ += size;
  }

  void release_cached() {
    std::lock_guard<std::mutex> lock(mu_);
    release_cached_locked();
  }

 private:
  void release_cached_locked() {
    for (auto& [size, list] : free_)
      for (void* p : list) cudaFree(p);  // errors ignored: may run at process exit
    free_.clear();
    cached_ = 0;
  }

  int device_;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0, in_use_ = 0, peak_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Checks.
std::string desc(const Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  return std::string(dtype_name(t.dtype)) + shape_str(t.shape) + " on " + device_name(t.device);
}

std::string dtypes_str(std::initializer_list<DType> dts) {
  std::string s;
  for (DType d : dts) s += (s.empty() ? "" : " or ") + std::string(dtype_name(d));
  return s;
}

void need(const char* op, const char* name, const Tensor& t, std::initializer_list<DType> dts,
          const Shape& shape) {
  bool dt_ok = false;
  for (DType d : dts) dt_ok |= t.dtype == d;
  if (!t.defined() || t.device != Device::CUDA || !dt_ok || t.shape != shape)
    fail("cuda ", op, ": ", name, " must be ", dtypes_str(dts), shape_str(shape),
         " on cuda, got ", desc(t));
}

void need(const char* op, const char* name, const Tensor& t, DType dt, const Shape& shape) {
  need(op, name, t, {dt}, shape);
}

// A 2-D tensor of the given dtype(s): returns its shape for further checks.
void need_2d(const char* op, const char* name, const Tensor& t,
             std::initializer_list<DType> dts) {
  bool dt_ok = false;
  for (DType d : dts) dt_ok |= t.dtype == d;
  if (!t.defined() || t.device != Device::CUDA || !dt_ok || t.dim() != 2)
    fail("cuda ", op, ": ", name, " must be a 2-D ", dtypes_str(dts), " tensor on cuda, got ",
         desc(t));
}

void need_slice(const char* op, const char* name, const ColSlice& s, DType dt, int64_t rows,
                int64_t width) {
  if (!s.t.defined() || s.t.device != Device::CUDA || s.t.dtype != dt || s.t.dim() != 2)
    fail("cuda ", op, ": ", name, " must be a column slice of a 2-D ", dtype_name(dt),
         " tensor on cuda, got ", desc(s.t));
  if (s.rows() != rows || s.width != width || s.off < 0 || s.off + s.width > s.ld())
    fail("cuda ", op, ": ", name, " must be ", rows, " rows x ", width,
         " columns, got columns [", s.off, ", ", s.off + s.width, ") of ", desc(s.t));
}

template <class T>
T* slice_ptr(const ColSlice& s) {
  return static_cast<T*>(s.t.data) + s.off;
}

template <class T>
T* p(const Tensor& t) {
  return static_cast<T*>(t.data);
}
template <class T>
T* p(const Tensor* t) {
  return t ? static_cast<T*>(t->data) : nullptr;
}

// ---------------------------------------------------------------------------------------------
class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : dev_(device) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    gpu_name_ = prop.name;
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    alloc_ = std::make_shared<Allocator>(device);
    gemm_ = std::make_unique<Gemm>(stream_);
    if (const char* env = std::getenv("SSD_CUDA_CE_BLOCK_TOKENS")) ce_block_tokens_ = std::atoll(env);
    sumsq_out_ = alloc({1}, DType::F64);
  }

  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    for (auto& sp : spans_) free_events_.insert(free_events_.end(), {sp.a, sp.b});
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
    sq_table_ = Tensor();
    adam_table_ = Tensor();
    sumsq_out_ = Tensor();
    gemm_.reset();
    cudaStreamDestroy(stream_);
  }

  Device device() const override { return Device::CUDA; }
  int64_t peak_memory_bytes() const override { return static_cast<int64_t>(alloc_->peak()); }
  int64_t ssd_saved_bytes(const SsdDims& d) const override {
    return static_cast<int64_t>(cuda::ssd_saved_bytes(d));
  }
  std::string ssd_unsupported(const SsdDims& d) const override {
    return cuda::ssd_unsupported_reason(d);
  }
  std::string name() const override { return "cuda:" + std::to_string(dev_) + " (" + gpu_name_ + ")"; }
  DType compute_dtype() const override { return DType::BF16; }
  DType accum_dtype() const override { return DType::F32; }

  // ---- memory ----
  Tensor alloc(const Shape& shape, DType dtype) override {
    for (auto d : shape)
      if (d < 0) fail("cuda alloc: negative size in shape ", shape_str(shape));
    Tensor t;
    t.dtype = dtype;
    t.device = Device::CUDA;
    t.shape = shape;
    const size_t bytes = std::max<size_t>(t.nbytes(), 1);
    void* ptr = alloc_->get(bytes);
    std::shared_ptr<Allocator> a = alloc_;
    t.storage = std::shared_ptr<void>(ptr, [a, bytes](void* q) { a->put(q, bytes); });
    t.data = ptr;
    return t;
  }

  void zero(Tensor& t) override {
    on_device("zero", "t", t);
    auto prof = profile("zero");
    check_cuda(cudaMemsetAsync(t.data, 0, t.nbytes(), stream_), "zero");
  }

  void upload(Tensor& dst, const void* host_src) override {
    on_device("upload", "dst", dst);
    if (dst.nbytes() == 0) return;
    check_cuda(cudaMemcpyAsync(dst.data, host_src, dst.nbytes(), cudaMemcpyHostToDevice, stream_),
               "upload");
    check_cuda(cudaStreamSynchronize(stream_), "upload");
  }

  void download(void* host_dst, const Tensor& src) override {
    on_device("download", "src", src);
    if (src.nbytes() == 0) return;
    check_cuda(cudaMemcpyAsync(host_dst, src.data, src.nbytes(), cudaMemcpyDeviceToHost, stream_),
               "download");
    check_cuda(cudaStreamSynchronize(stream_), "download");
  }

  void convert(const Tensor& src, Tensor& dst) override {
    on_device("convert", "src", src);
    on_device("convert", "dst", dst);
    if (src.numel() != dst.numel())
      fail("cuda convert: src ", desc(src), " and dst ", desc(dst), " differ in size");
    auto prof = profile("convert");
    if (src.dtype == dst.dtype) {
      if (src.data != dst.data && src.nbytes())
        check_cuda(cudaMemcpyAsync(dst.data, src.data, src.nbytes(), cudaMemcpyDeviceToDevice,
                                   stream_),
                   "convert");
      return;
    }
    cuda::convert(src.data, src.dtype, dst.data, dst.dtype, src.numel(), stream_);
  }

  void copy_rows(const ColSlice& src, int64_t src_row, const ColSlice& dst, int64_t dst_row,
                 int64_t rows, bool accumulate) override {
    on_device("copy_rows", "src", src.t);
    on_device("copy_rows", "dst", dst.t);
    check_copy_rows(src, src_row, dst, dst_row, rows);
    auto prof = profile("copy_rows");
    const size_t es = dtype_size(src.t.dtype);
    cuda::copy_rows(static_cast<const char*>(src.t.data) + (src_row * src.ld() + src.off) * es,
                    src.ld(), static_cast<char*>(dst.t.data) + (dst_row * dst.ld() + dst.off) * es,
                    dst.ld(), rows, src.width, src.t.dtype, accumulate, stream_);
  }

  void synchronize() override {
    check_cuda(cudaStreamSynchronize(stream_), "synchronize (an earlier kernel failed)");
  }
  void* native_stream() override { return stream_; }
  int device_index() const override { return dev_; }

  // ---- profiling ----
  void set_profiling(bool on) override { profiling_ = on; }

  std::vector<OpTime> profile_take() override {
    synchronize();
    std::map<std::string, OpTime> by_label;
    for (auto& sp : spans_) {
      float ms = 0;
      check_cuda(cudaEventElapsedTime(&ms, sp.a, sp.b), "profile_take");
      OpTime& o = by_label[sp.label];
      o.label = sp.label;
      o.seconds += ms * 1e-3;
      o.calls += 1;
      free_events_.insert(free_events_.end(), {sp.a, sp.b});
    }
    spans_.clear();
    std::vector<OpTime> out;
    for (auto& [label, o] : by_label) out.push_back(o);
    std::sort(out.begin(), out.end(),
              [](const OpTime& x, const OpTime& y) { return x.seconds > y.seconds; });
    return out;
  }

  // ---- layers ----
  void embedding_fwd(const Tensor& tokens, const Tensor& weight, Tensor& out,
                     const VocabShard* shard) override {
    const char* op = "embedding_fwd";
    auto prof = profile(op);
    need(op, "tokens", tokens, DType::I32, tokens.shape);
    need_2d(op, "weight", weight, {DType::BF16, DType::F32});
    const int64_t T = tokens.numel(), V = weight.size(0), D = weight.size(1);
    need(op, "out", out, {DType::BF16, DType::F32}, {T, D});
    const int64_t row0 = shard_begin(op, shard, V);
    cuda::embedding_fwd(p<int32_t>(tokens), T, weight.data, weight.dtype, row0, V, D, out.data,
                        out.dtype, stream_);
  }

  void embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dweight,
                     const VocabShard* shard) override {
    const char* op = "embedding_bwd";
    auto prof = profile(op);
    need(op, "tokens", tokens, DType::I32, tokens.shape);
    need_2d(op, "dweight", dweight, {DType::F32});
    const int64_t T = tokens.numel(), V = dweight.size(0), D = dweight.size(1);
    need(op, "dout", dout, {DType::BF16, DType::F32}, {T, D});
    const int64_t row0 = shard_begin(op, shard, V);
    if (T == 0) return;
    auto ws = scratch(cuda::embedding_bwd_workspace_bytes(T, V));
    cuda::embedding_bwd(p<int32_t>(tokens), T, dout.data, dout.dtype, row0, V, D,
                        p<float>(dweight), ws.get(), stream_);
  }

  void add_rmsnorm_fwd(const Tensor& x, const Tensor* residual_in, const Tensor& weight,
                       double eps, Tensor& residual_out, Tensor& y, Tensor& rstd) override {
    const char* op = "add_rmsnorm_fwd";
    auto prof = profile(op);
    need_2d(op, "x", x, {DType::BF16, DType::F32});
    const int64_t T = x.size(0), D = x.size(1);
    if (residual_in) need(op, "residual_in", *residual_in, DType::F32, {T, D});
    need(op, "weight", weight, DType::F32, {D});
    need(op, "residual_out", residual_out, DType::F32, {T, D});
    need(op, "y", y, {DType::BF16, DType::F32}, {T, D});
    need(op, "rstd", rstd, DType::F32, {T});
    cuda::add_rmsnorm_fwd(x.data, x.dtype, p<float>(residual_in), p<float>(weight), T, D,
                          static_cast<float>(eps), p<float>(residual_out), y.data, y.dtype,
                          p<float>(rstd), stream_);
  }

  void add_rmsnorm_bwd(const Tensor& dy, const Tensor* dresidual_next,
                       const Tensor& residual_out, const Tensor& weight, const Tensor& rstd,
                       Tensor& d_residual, Tensor& dweight) override {
    const char* op = "add_rmsnorm_bwd";
    auto prof = profile(op);
    need_2d(op, "residual_out", residual_out, {DType::F32});
    const int64_t T = residual_out.size(0), D = residual_out.size(1);
    need(op, "dy", dy, {DType::BF16, DType::F32}, {T, D});
    if (dresidual_next) need(op, "dresidual_next", *dresidual_next, DType::F32, {T, D});
    need(op, "weight", weight, DType::F32, {D});
    need(op, "rstd", rstd, DType::F32, {T});
    need(op, "d_residual", d_residual, DType::F32, {T, D});
    need(op, "dweight", dweight, DType::F32, {D});
    if (T == 0) return;
    auto ws = scratch(cuda::add_rmsnorm_bwd_workspace_bytes(T, D));
    cuda::add_rmsnorm_bwd(dy.data, dy.dtype, p<float>(dresidual_next), p<float>(residual_out),
                          p<float>(weight), p<float>(rstd), T, D, p<float>(d_residual),
                          p<float>(dweight), ws.get(), stream_);
  }

  void linear_fwd(const Tensor& x, const Tensor& w, Tensor& y) override {
    const char* op = "linear_fwd";
    need_2d(op, "x", x, {DType::BF16});
    need_2d(op, "w", w, {DType::BF16});
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    need(op, "w", w, DType::BF16, {N, K});
    need(op, "y", y, {DType::BF16, DType::F32}, {M, N});
    auto prof = profile(op, M, N, K);
    gemm_->nt(M, N, K, p<bf16>(x), K, p<bf16>(w), K, y.data, y.dtype, N, 1.f, 0.f);
  }

  void linear_bwd(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx,
                  Tensor& dw) override {
    const char* op = "linear_bwd";
    need_2d(op, "x", x, {DType::BF16});
    need_2d(op, "w", w, {DType::BF16});
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    need(op, "w", w, DType::BF16, {N, K});
    need(op, "dy", dy, {DType::BF16, DType::F32}, {M, N});
    if (dx) need(op, "dx", *dx, {DType::BF16, DType::F32}, {M, K});
    need(op, "dw", dw, DType::F32, {N, K});
    auto prof = profile(op, M, N, K);
    const bf16* dyp = p<bf16>(dy);
    std::shared_ptr<void> dy16;
    if (dy.dtype != DType::BF16) {  // an fp32 gradient (the residual stream's): round once
      dy16 = scratch(dy.numel() * sizeof(bf16));
      cuda::convert(dy.data, dy.dtype, dy16.get(), DType::BF16, dy.numel(), stream_);
      dyp = static_cast<const bf16*>(dy16.get());
    }
    if (dx) gemm_->nn(M, K, N, dyp, N, p<bf16>(w), K, dx->data, dx->dtype, K, 1.f, 0.f);
    gemm_->tn(N, K, M, dyp, N, p<bf16>(x), K, dw.data, DType::F32, K, 1.f, 1.f);
  }

  void conv1d_silu_fwd(const ColSlice& in, int64_t batch, int64_t seqlen, const Tensor& w,
                       const Tensor& bias, Tensor& out, const Tensor* reset) override {
    const char* op = "conv1d_silu_fwd";
    auto prof = profile(op);
    const auto [C, K] = conv_dims(op, w);
    const int64_t T = batch * seqlen;
    need_slice(op, "in", in, DType::BF16, T, C);
    need(op, "bias", bias, DType::F32, {C});
    need(op, "out", out, DType::BF16, {T, C});
    if (reset) need(op, "reset", *reset, DType::I32, {T});
    cuda::conv1d_silu_fwd(slice_ptr<bf16>(in), in.ld(), batch, seqlen, C, p<float>(w),
                          p<float>(bias), static_cast<int>(K), p<bf16>(out), stream_,
                          p<int32_t>(reset));
  }

  void conv1d_silu_bwd(const ColSlice& in, int64_t batch, int64_t seqlen, const Tensor& w,
                       const Tensor& bias, const Tensor& dout, ColSlice& din, Tensor& dw,
                       Tensor& dbias, const Tensor* reset) override {
    const char* op = "conv1d_silu_bwd";
    auto prof = profile(op);
    const auto [C, K] = conv_dims(op, w);
    const int64_t T = batch * seqlen;
    need_slice(op, "in", in, DType::BF16, T, C);
    need(op, "bias", bias, DType::F32, {C});
    need(op, "dout", dout, DType::BF16, {T, C});
    need_slice(op, "din", din, DType::BF16, T, C);
    need(op, "dw", dw, DType::F32, w.shape);
    need(op, "dbias", dbias, DType::F32, {C});
    if (reset) need(op, "reset", *reset, DType::I32, {T});
    if (T == 0) return;
    auto ws = scratch(cuda::conv1d_silu_bwd_workspace_bytes(T, C, static_cast<int>(K)));
    cuda::conv1d_silu_bwd(slice_ptr<bf16>(in), in.ld(), batch, seqlen, C, p<float>(w),
                          p<float>(bias), static_cast<int>(K), p<bf16>(dout),
                          slice_ptr<bf16>(din), din.ld(), p<float>(dw), p<float>(dbias),
                          ws.get(), stream_, p<int32_t>(reset));
  }

  void ssd_fwd(const SsdDims& d, const SsdInputs& in, Tensor& y, Tensor* final_state) override {
    const char* op = "ssd_fwd";
    SsdSteps prof(this, op);
    check_ssd(op, d, in);
    need(op, "y", y, DType::BF16, {d.tokens(), d.d_inner()});
    const Shape st{d.batch, d.nheads, d.headdim, d.dstate};
    if (final_state) need(op, "final_state", *final_state, DType::F32, st);
    if (d.tokens() == 0) return;
    auto ws = scratch(cuda::ssd_workspace_bytes(d));
    cuda::ssd_fwd(d, p<bf16>(in.xBC), slice_ptr<bf16>(in.dt), in.dt.ld(), p<float>(in.dt_bias),
                  p<float>(in.A_log), p<float>(in.D), p<float>(in.initial_state), p<bf16>(y),
                  p<float>(final_state), ws.get(), in.saved ? in.saved->data : nullptr,
                  stream_, p<int32_t>(in.reset));
  }

  void ssd_bwd(const SsdDims& d, const SsdInputs& in, const Tensor& dy,
               const Tensor* dfinal_state, SsdGrads& g) override {
    const char* op = "ssd_bwd";
    SsdSteps prof(this, op);
    check_ssd(op, d, in);
    const Shape st{d.batch, d.nheads, d.headdim, d.dstate};
    need(op, "dy", dy, DType::BF16, {d.tokens(), d.d_inner()});
    if (dfinal_state) need(op, "dfinal_state", *dfinal_state, DType::F32, st);
    need(op, "dxBC", g.dxBC, DType::BF16, {d.tokens(), d.conv_dim()});
    need_slice(op, "ddt", g.ddt, DType::BF16, d.tokens(), d.nheads);
    need(op, "d_dt_bias", g.d_dt_bias, DType::F32, {d.nheads});
    need(op, "dA_log", g.dA_log, DType::F32, {d.nheads});
    need(op, "dD", g.dD, DType::F32, {d.nheads});
    if (g.d_initial_state) need(op, "d_initial_state", *g.d_initial_state, DType::F32, st);
    if (d.tokens() == 0) return;
    auto ws = scratch(cuda::ssd_workspace_bytes(d));
    cuda::ssd_bwd(d, p<bf16>(in.xBC), slice_ptr<bf16>(in.dt), in.dt.ld(), p<float>(in.dt_bias),
                  p<float>(in.A_log), p<float>(in.D), p<float>(in.initial_state), p<bf16>(dy),
                  p<float>(dfinal_state), p<bf16>(g.dxBC), slice_ptr<bf16>(g.ddt), g.ddt.ld(),
                  p<float>(g.d_dt_bias), p<float>(g.dA_log), p<float>(g.dD),
                  p<float>(g.d_initial_state), ws.get(), in.saved ? in.saved->data : nullptr,
                  stream_, p<int32_t>(in.reset));
  }

  void ssd_final_state(const SsdDims& d, const SsdInputs& in, Tensor& final_state) override {
    const char* op = "ssd_final_state";
    SsdSteps prof(this, op);
    check_ssd(op, d, in);
    need(op, "final_state", final_state, DType::F32, {d.batch, d.nheads, d.headdim, d.dstate});
    if (d.tokens() == 0) return;
    auto ws = scratch(cuda::ssd_workspace_bytes(d));
    cuda::ssd_final_state(d, p<bf16>(in.xBC), slice_ptr<bf16>(in.dt), in.dt.ld(),
                          p<float>(in.dt_bias), p<float>(in.A_log), p<float>(in.initial_state),
                          p<float>(final_state), ws.get(), stream_, p<int32_t>(in.reset));
  }

  void ssd_dinitial(const SsdDims& d, const SsdInputs& in, const Tensor& dy,
                    const Tensor* dfinal_state, Tensor& d_initial_state) override {
    const char* op = "ssd_dinitial";
    SsdSteps prof(this, op);
    check_ssd(op, d, in);
    const Shape st{d.batch, d.nheads, d.headdim, d.dstate};
    need(op, "dy", dy, DType::BF16, {d.tokens(), d.d_inner()});
    if (dfinal_state) need(op, "dfinal_state", *dfinal_state, DType::F32, st);
    need(op, "d_initial_state", d_initial_state, DType::F32, st);
    if (d.tokens() == 0) return;
    auto ws = scratch(cuda::ssd_workspace_bytes(d));
    cuda::ssd_dinitial(d, p<bf16>(in.xBC), slice_ptr<bf16>(in.dt), in.dt.ld(),
                       p<float>(in.dt_bias), p<float>(in.A_log), p<bf16>(dy),
                       p<float>(dfinal_state), p<float>(d_initial_state), ws.get(),
                       in.saved ? in.saved->data : nullptr, stream_, p<int32_t>(in.reset));
  }

  void ssd_segment_decay(const SsdDims& d, const SsdInputs& in, Tensor& decay) override {
    const char* op = "ssd_segment_decay";
    SsdSteps prof(this, op);
    check_ssd(op, d, in);
    need(op, "decay", decay, DType::F32, {d.batch, d.nheads});
    if (d.tokens() == 0) return;
    auto ws = scratch(cuda::ssd_workspace_bytes(d));
    cuda::ssd_segment_decay(d, slice_ptr<bf16>(in.dt), in.dt.ld(), p<float>(in.dt_bias),
                            p<float>(in.A_log), p<float>(decay), ws.get(), stream_,
                            p<int32_t>(in.reset));
  }

  void cp_state_scan(const SsdDims& d, const Tensor& summaries, int64_t k, bool reverse,
                     Tensor& out) override {
    const char* op = "cp_state_scan";
    auto prof = profile(op);
    const int64_t BH = d.batch * d.nheads;
    need_2d(op, "summaries", summaries, {DType::F32});
    if (summaries.size(1) != BH * d.headdim * d.dstate + BH)
      fail("cuda ", op, ": summaries must be f32[n, ", BH * d.headdim * d.dstate + BH,
           "] (states then decays per row), got ", desc(summaries));
    need(op, "out", out, DType::F32, {d.batch, d.nheads, d.headdim, d.dstate});
    cuda::cp_state_scan(d, p<float>(summaries), static_cast<int>(summaries.size(0)),
                        static_cast<int>(k), reverse, p<float>(out), stream_);
  }

  void gated_rmsnorm_fwd(const Tensor& y, const ColSlice& z, const Tensor& weight,
                         int64_t group_size, double eps, Tensor& out, Tensor& rstd,
                         const NormSpan* span) override {
    const char* op = "gated_rmsnorm_fwd";
    auto prof = profile(op);
    need_2d(op, "y", y, {DType::BF16});
    const int64_t T = y.size(0), D = y.size(1);
    check_group(op, D, group_size);
    need_slice(op, "z", z, DType::BF16, T, D);
    need(op, "weight", weight, DType::F32, {D});
    need(op, "out", out, DType::BF16, {T, D});
    need(op, "rstd", rstd, DType::F32, {T, D / group_size});
    if (span) {  // sums of squares, the all-reduce over the span, then the norm
      check_span(op, span);
      Tensor sums = alloc({T, D / group_size}, DType::F32);
      cuda::gated_rmsnorm_fwd_sumsq(p<bf16>(y), slice_ptr<bf16>(z), z.ld(), T, D, group_size,
                                    p<float>(sums), stream_);
      span->all_reduce(sums);
      cuda::gated_rmsnorm_fwd_apply(p<bf16>(y), slice_ptr<bf16>(z), z.ld(), p<float>(weight), T,
                                    D, group_size, group_size * span->ranks,
                                    static_cast<float>(eps), p<float>(sums), p<bf16>(out),
                                    p<float>(rstd), stream_);
      return;
    }
    cuda::gated_rmsnorm_fwd(p<bf16>(y), slice_ptr<bf16>(z), z.ld(), p<float>(weight), T, D,
                            group_size, static_cast<float>(eps), p<bf16>(out), p<float>(rstd),
                            stream_);
  }

  void gated_rmsnorm_bwd(const Tensor& dout, const Tensor& y, const ColSlice& z,
                         const Tensor& weight, int64_t group_size, const Tensor& rstd,
                         Tensor& dy, ColSlice& dz, Tensor& dweight,
                         const NormSpan* span) override {
    const char* op = "gated_rmsnorm_bwd";
    auto prof = profile(op);
    need_2d(op, "y", y, {DType::BF16});
    const int64_t T = y.size(0), D = y.size(1);
    check_group(op, D, group_size);
    need(op, "dout", dout, DType::BF16, {T, D});
    need_slice(op, "z", z, DType::BF16, T, D);
    need(op, "weight", weight, DType::F32, {D});
    need(op, "rstd", rstd, DType::F32, {T, D / group_size});
    need(op, "dy", dy, DType::BF16, {T, D});
    need_slice(op, "dz", dz, DType::BF16, T, D);
    need(op, "dweight", dweight, DType::F32, {D});
    if (span) {  // dot products, the all-reduce over the span, then the gradients
      check_span(op, span);
      Tensor dots = alloc({T, D / group_size}, DType::F32);
      cuda::gated_rmsnorm_bwd_dot(p<bf16>(dout), p<bf16>(y), slice_ptr<bf16>(z), z.ld(),
                                  p<float>(weight), p<float>(rstd), T, D, group_size,
                                  p<float>(dots), stream_);
      span->all_reduce(dots);
      auto ws = scratch(cuda::gated_rmsnorm_bwd_workspace_bytes(T, D));
      cuda::gated_rmsnorm_bwd_apply(p<bf16>(dout), p<bf16>(y), slice_ptr<bf16>(z), z.ld(),
                                    p<float>(weight), p<float>(rstd), T, D, group_size,
                                    group_size * span->ranks, p<float>(dots), p<bf16>(dy),
                                    slice_ptr<bf16>(dz), dz.ld(), p<float>(dweight), ws.get(),
                                    stream_);
      return;
    }
    if (T == 0) return;
    auto ws = scratch(cuda::gated_rmsnorm_bwd_workspace_bytes(T, D));
    cuda::gated_rmsnorm_bwd(p<bf16>(dout), p<bf16>(y), slice_ptr<bf16>(z), z.ld(),
                            p<float>(weight), p<float>(rstd), T, D, group_size, p<bf16>(dy),
                            slice_ptr<bf16>(dz), dz.ld(), p<float>(dweight), ws.get(), stream_);
  }

  void lm_head_ce(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                  double grad_scale, Tensor& stats, Tensor* dhidden, Tensor* dweight,
                  const VocabShard* shard) override {
    const char* op = "lm_head_ce";
    need_2d(op, "hidden", hidden, {DType::BF16});
    need_2d(op, "weight", weight, {DType::BF16});
    const int64_t T = hidden.size(0), Dm = hidden.size(1), V = weight.size(0);
    need(op, "weight", weight, DType::BF16, {V, Dm});
    need(op, "targets", targets, DType::I32, targets.shape);
    if (targets.numel() != T)
      fail("cuda lm_head_ce: targets ", desc(targets), " must hold one target per row of hidden ",
           desc(hidden));
    need(op, "stats", stats, DType::F64, {3});
    // With a shard, dhidden is this rank's part of a sum over the ranks: f32 keeps the sum
    // from adding bf16 roundings.
    if (dhidden && shard) need(op, "dhidden", *dhidden, {DType::BF16, DType::F32}, {T, Dm});
    else if (dhidden) need(op, "dhidden", *dhidden, DType::BF16, {T, Dm});
    if (dweight) need(op, "dweight", *dweight, DType::F32, {V, Dm});
    const int64_t row0 = shard_begin(op, shard, V);
    if (shard) {
      if (V == 0) fail("cuda lm_head_ce: a vocabulary shard of no rows");
      if (shard->total > (int64_t(1) << 24))
        fail("cuda lm_head_ce: vocabulary ", shard->total,
             " too large for the f32 partial statistics of a shard (at most 2^24)");
      if (!shard->all_gather) fail("cuda lm_head_ce: vocabulary shard without all_gather");
    }
    if (T == 0 || V == 0) return;
    const bool grad = dhidden != nullptr;  // as the CPU reference: dweight only with dhidden

    // Rows per block: the fp32 logits block stays under ~1 GiB (unless overridden). Larger
    // blocks mean fewer read-modify-write passes of the GEMM that accumulates dweight. With a
    // shard, from the even share of the vocabulary: every rank cuts the same blocks (one
    // all_gather each).
    const int64_t Vb = shard ? (shard->total + shard->ranks - 1) / shard->ranks : V;
    int64_t tb = ce_block_tokens_ > 0 ? ce_block_tokens_
                                      : std::max<int64_t>(1, (int64_t(1) << 30) / (Vb * 4));
    if (ce_block_tokens_ <= 0 && tb >= 128) tb = tb / 64 * 64;
    tb = std::min(tb, T);
    auto logits = scratch(static_cast<size_t>(tb) * V * sizeof(float));
    auto ce_ws = scratch(shard ? cuda::ce_shard_workspace_bytes(tb)
                               : cuda::ce_block_workspace_bytes(tb));
    std::shared_ptr<void> part, all;  // this rank's partial statistics, every rank's
    if (shard) {
      part = scratch(static_cast<size_t>(tb) * 4 * sizeof(float));
      all = scratch(static_cast<size_t>(shard->ranks) * tb * 4 * sizeof(float));
    }
    float* L = static_cast<float*>(logits.get());
    const bf16* H = p<bf16>(hidden);
    const bf16* W = p<bf16>(weight);
    const int32_t* tg = p<int32_t>(targets);
    for (int64_t r0 = 0; r0 < T; r0 += tb) {
      const int64_t rows = std::min(tb, T - r0);
      {
        auto prof = profile("lm_head_ce: logits gemm");
        gemm_->nt(rows, V, Dm, H + r0 * Dm, Dm, W, Dm, L, DType::F32, V, 1.f, 0.f);
      }
      if (shard) {
        {
          auto prof = profile("lm_head_ce: softmax");
          cuda::ce_shard_partial(L, rows, V, row0, shard->total, tg + r0,
                                 static_cast<float*>(part.get()), stream_);
        }
        Tensor local = borrow(part.get(), DType::F32, {rows, 4}, Device::CUDA);
        Tensor every = borrow(all.get(), DType::F32, {shard->ranks, rows, 4}, Device::CUDA);
        {
          auto prof = profile("lm_head_ce: all_gather");
          shard->all_gather(local, every);
        }
        auto prof = profile("lm_head_ce: softmax");
        cuda::ce_shard_finish(L, rows, V, row0, shard->total, tg + r0,
                              static_cast<const float*>(all.get()), shard->ranks,
                              static_cast<float>(grad_scale), p<double>(stats), grad,
                              ce_ws.get(), stream_);
      } else {
        auto prof = profile("lm_head_ce: softmax");
        cuda::ce_block(L, rows, V, tg + r0, static_cast<float>(grad_scale), p<double>(stats),
                       grad, ce_ws.get(), stream_);
      }
      if (!grad) continue;
      const bf16* dl = reinterpret_cast<const bf16*>(L);  // bf16 [rows, V], row stride 2V
      if (dhidden) {
        auto prof = profile("lm_head_ce: dhidden gemm");
        gemm_->nn(rows, Dm, V, dl, 2 * V, W, Dm,
                  static_cast<char*>(dhidden->data) + r0 * Dm * dtype_size(dhidden->dtype),
                  dhidden->dtype, Dm, 1.f, 0.f);
      }
      if (dweight) {
        auto prof = profile("lm_head_ce: dweight gemm");
        gemm_->tn(V, Dm, rows, dl, 2 * V, H + r0 * Dm, Dm, dweight->data, DType::F32, Dm, 1.f,
                  1.f);
      }
    }
  }

  // ---- optimizer ----
  double sum_squares(std::span<const Tensor> ts) override {
    std::vector<SqTensor> table;
    table.reserve(ts.size());
    int64_t tiles = 0;
    for (size_t i = 0; i < ts.size(); ++i) {
      const Tensor& t = ts[i];
      if (!t.defined() || t.device != Device::CUDA ||
          (t.dtype != DType::F32 && t.dtype != DType::BF16 && t.dtype != DType::F64))
        fail("cuda sum_squares: tensor ", i, " must be f32, bf16 or f64 on cuda, got ", desc(t));
      SqTensor s;
      s.p = t.data;
      s.n = t.numel();
      s.tile0 = tiles;
      s.dtype = static_cast<int32_t>(t.dtype);
      tiles += (s.n + kTile - 1) / kTile;
      table.push_back(s);
    }
    sync_table(table, sq_host_, sq_table_);
    auto prof = profile("sum_squares");
    cuda::sum_squares(p<SqTensor>(sq_table_), static_cast<int>(table.size()), tiles,
                      p<double>(sumsq_out_), scratch(sum_squares_workspace_bytes()).get(),
                      stream_);
    double r = 0;
    check_cuda(cudaMemcpyAsync(&r, sumsq_out_.data, sizeof(double), cudaMemcpyDeviceToHost,
                               stream_),
               "sum_squares");
    check_cuda(cudaStreamSynchronize(stream_), "sum_squares");
    return r;
  }

  void adamw_step(std::span<AdamWSlot> slots, const AdamWHyper& h) override {
    if (h.step < 1) fail("cuda adamw_step: step must be >= 1, got ", h.step);
    std::vector<AdamWTensor> table;
    table.reserve(slots.size());
    int64_t tiles = 0;
    for (size_t i = 0; i < slots.size(); ++i) {
      AdamWSlot& s = slots[i];
      const Shape& sh = s.param.shape;
      need("adamw_step", "param", s.param, DType::F32, sh);
      need("adamw_step", "grad", s.grad, DType::F32, sh);
      need("adamw_step", "m", s.m, DType::F32, sh);
      need("adamw_step", "v", s.v, DType::F32, sh);
      AdamWTensor a;
      a.p = p<float>(s.param);
      a.g = p<float>(s.grad);
      a.m = p<float>(s.m);
      a.v = p<float>(s.v);
      a.n = s.param.numel();
      a.tile0 = tiles;
      a.weight_decay = static_cast<float>(s.weight_decay);
      tiles += (a.n + kTile - 1) / kTile;
      table.push_back(a);
    }
    if (table.empty()) return;
    sync_table(table, adam_host_, adam_table_);
    auto prof = profile("adamw_step");
    AdamWScalars sc;
    sc.lr = static_cast<float>(h.lr);
    sc.beta1 = static_cast<float>(h.beta1);
    sc.beta2 = static_cast<float>(h.beta2);
    sc.eps = static_cast<float>(h.eps);
    sc.grad_scale = static_cast<float>(h.grad_scale);
    const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
    const double bc2 = 1.0 - std::pow(h.beta2, static_cast<double>(h.step));
    sc.step_size = static_cast<float>(h.lr / bc1);
    sc.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
    cuda::adamw(p<AdamWTensor>(adam_table_), static_cast<int>(table.size()), tiles, sc, stream_);
  }

 private:
  // One timed op: events recorded on the stream around the op's launches when profiling is on.
  struct Span {
    std::string label;
    cudaEvent_t a = nullptr, b = nullptr;
  };
  class ProfileScope {
   public:
    ProfileScope() = default;
    ProfileScope(CudaBackend* be, std::string label) : be_(be) {
      idx_ = be_->spans_.size();
      be_->spans_.push_back({std::move(label), be_->event(), be_->event()});
      check_cuda(cudaEventRecord(be_->spans_[idx_].a, be_->stream_), "profile");
    }
    ProfileScope(const ProfileScope&) = delete;
    ProfileScope& operator=(const ProfileScope&) = delete;
    ~ProfileScope() {
      if (be_) cudaEventRecord(be_->spans_[idx_].b, be_->stream_);
    }

   private:
    CudaBackend* be_ = nullptr;
    size_t idx_ = 0;
  };

  // While profiling, the SSD op's own steps (the marks of kernels/ssd.h's SsdProfiler hook)
  // are recorded as "<op>: <step>" spans instead of one span for the whole op.
  class SsdSteps : public cuda::SsdProfiler {
   public:
    SsdSteps(CudaBackend* be, const char* op) : be_(be->profiling_ ? be : nullptr), op_(op) {
      if (be_) cuda::ssd_set_profiler(this);
    }
    SsdSteps(const SsdSteps&) = delete;
    SsdSteps& operator=(const SsdSteps&) = delete;
    ~SsdSteps() override {
      if (!be_) return;
      cuda::ssd_set_profiler(nullptr);
      if (open_) be_->free_events_.push_back(open_);
    }
    void mark(const char* step, cudaStream_t st) override {
      cudaEvent_t end = be_->event();
      cudaEventRecord(end, st);
      if (open_) be_->spans_.push_back({std::string(op_) + ": " + step, open_, end});
      else be_->free_events_.push_back(end);
      open_ = be_->event();
      cudaEventRecord(open_, st);
    }

   private:
    CudaBackend* be_;
    const char* op_;
    cudaEvent_t open_ = nullptr;
  };

  ProfileScope profile(const char* op) {
    if (!profiling_) return {};
    return {this, op};
  }
  // GEMM ops carry their shape (M rows, N outputs, K inputs) so that layers can be told apart.
  ProfileScope profile(const char* op, int64_t M, int64_t N, int64_t K) {
    if (!profiling_) return {};
    return {this, std::string(op) + " " + std::to_string(M) + "x" + std::to_string(N) + "x" +
                      std::to_string(K)};
  }

  cudaEvent_t event() {
    if (!free_events_.empty()) {
      cudaEvent_t e = free_events_.back();
      free_events_.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    check_cuda(cudaEventCreate(&e), "cudaEventCreate");
    return e;
  }

  void on_device(const char* op, const char* name, const Tensor& t) {
    if (!t.defined() || t.device != Device::CUDA)
      fail("cuda ", op, ": ", name, " must be a tensor on cuda, got ", desc(t));
  }

  std::pair<int64_t, int64_t> conv_dims(const char* op, const Tensor& w) {
    if (!w.defined() || w.device != Device::CUDA || w.dtype != DType::F32 ||
        (!(w.dim() == 3 && w.size(1) == 1) && w.dim() != 2))
      fail("cuda ", op, ": w must be f32 [C, 1, K] on cuda, got ", desc(w));
    const int64_t C = w.size(0), K = w.size(-1);
    if (K < 1 || K > kMaxConvWidth)
      fail("cuda ", op, ": conv kernel width ", K, " is not supported (1..", kMaxConvWidth, ")");
    return {C, K};
  }

  // The token of weight row 0: shard->begin, after checking the shard (0 without one).
  int64_t shard_begin(const char* op, const VocabShard* shard, int64_t rows) {
    if (!shard) return 0;
    if (shard->ranks < 1 || shard->begin < 0 || shard->begin + rows > shard->total)
      fail("cuda ", op, ": vocabulary shard rows [", shard->begin, ", ", shard->begin + rows,
           ") of ", shard->total, " over ", shard->ranks, " ranks is not valid");
    return shard->begin;
  }

  void check_span(const char* op, const NormSpan* span) {
    if (span->ranks < 1) fail("cuda ", op, ": norm span over ", span->ranks, " ranks");
    if (!span->all_reduce) fail("cuda ", op, ": norm span without all_reduce");
  }

  void check_group(const char* op, int64_t D, int64_t group) {
    if (group <= 0 || D % group != 0)
      fail("cuda ", op, ": group_size ", group, " must divide the width ", D);
  }

  void check_ssd(const char* op, const SsdDims& d, const SsdInputs& in) {
    if (d.batch < 0 || d.seqlen < 0 || d.nheads <= 0 || d.headdim <= 0 || d.ngroups <= 0 ||
        d.dstate <= 0 || d.chunk <= 0 || d.nheads % d.ngroups != 0)
      fail("cuda ", op, ": bad dims (batch ", d.batch, ", seqlen ", d.seqlen, ", nheads ",
           d.nheads, ", headdim ", d.headdim, ", ngroups ", d.ngroups, ", dstate ", d.dstate,
           ", chunk ", d.chunk, ")");
    need(op, "xBC", in.xBC, DType::BF16, {d.tokens(), d.conv_dim()});
    need_slice(op, "dt", in.dt, DType::BF16, d.tokens(), d.nheads);
    need(op, "dt_bias", in.dt_bias, DType::F32, {d.nheads});
    need(op, "A_log", in.A_log, DType::F32, {d.nheads});
    need(op, "D", in.D, DType::F32, {d.nheads});
    if (in.initial_state)
      need(op, "initial_state", *in.initial_state, DType::F32,
           {d.batch, d.nheads, d.headdim, d.dstate});
    if (in.reset) need(op, "reset", *in.reset, DType::I32, {d.tokens()});
    if (in.saved) {
      on_device(op, "saved", *in.saved);
      if (in.saved->nbytes() < cuda::ssd_saved_bytes(d))
        fail("cuda ", op, ": saved holds ", in.saved->nbytes(), " bytes, these sizes need ",
             cuda::ssd_saved_bytes(d));
    }
  }

  // Device scratch from the cache, returned to it when the last reference goes (stream order
  // makes an early return safe).
  std::shared_ptr<void> scratch(size_t bytes) {
    bytes = std::max<size_t>(bytes, 1);
    void* ptr = alloc_->get(bytes);
    std::shared_ptr<Allocator> a = alloc_;
    return std::shared_ptr<void>(ptr, [a, bytes](void* q) { a->put(q, bytes); });
  }

  // Keeps a device copy of a descriptor table; uploads only when it changed (in steady-state
  // training the same parameters are passed every step, so nothing is copied).
  template <class Desc>
  void sync_table(const std::vector<Desc>& table, std::vector<Desc>& host, Tensor& dev) {
    const size_t bytes = table.size() * sizeof(Desc);
    if (bytes == 0) return;
    if (host.size() == table.size() && std::memcmp(host.data(), table.data(), bytes) == 0) return;
    if (!dev.defined() || dev.nbytes() < bytes)
      dev = alloc({static_cast<int64_t>((bytes + 7) / 8)}, DType::F64);
    host = table;
    check_cuda(cudaMemcpyAsync(dev.data, host.data(), bytes, cudaMemcpyHostToDevice, stream_),
               "descriptor upload");
    check_cuda(cudaStreamSynchronize(stream_), "descriptor upload");
  }

  int dev_;
  std::string gpu_name_;
  cudaStream_t stream_ = nullptr;
  std::shared_ptr<Allocator> alloc_;
  std::unique_ptr<Gemm> gemm_;
  int64_t ce_block_tokens_ = 0;
  Tensor sumsq_out_;
  std::vector<SqTensor> sq_host_;
  Tensor sq_table_;
  std::vector<AdamWTensor> adam_host_;
  Tensor adam_table_;
  bool profiling_ = false;
  std::vector<Span> spans_;
  std::vector<cudaEvent_t> free_events_;
};

}  // namespace
}  // namespace cuda

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    fail("train.device=cuda: no usable CUDA GPU (", cudaGetErrorString(e), ")");
  }
  if (n == 0) fail("train.device=cuda: no CUDA GPU is visible");
  if (device_index < 0 || device_index >= n)
    fail("train.device=cuda: GPU index ", device_index, " is out of range (", n,
         " GPU(s) visible)");
  return std::make_unique<cuda::CudaBackend>(device_index);
}

}  // namespace ssd
