// The CPU backend: shape and dtype checks, then the templated reference kernels of cpu_ops.h.
// One dtype for everything (f32 to train, f64 for gradient checks), host memory.
#include <cblas.h>

#include <cstdlib>
#include <cstring>
#include <utility>

#include "backend/backend.h"
#include "backend/cpu/cpu_ops.h"

namespace ssd {
namespace {

void check_shape(const Tensor& t, const Shape& s, const char* what) {
  SSD_CHECK(t.shape == s, what, " has shape ", shape_str(t.shape), ", expected ", shape_str(s));
}

template <class T>
void rows_op(const ColSlice& src, int64_t src_row, const ColSlice& dst, int64_t dst_row,
             int64_t rows, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* a = src.t.ptr<T>() + (src_row + r) * src.ld() + src.off;
    T* b = dst.t.ptr<T>() + (dst_row + r) * dst.ld() + dst.off;
    for (int64_t c = 0; c < src.width; ++c) b[c] = accumulate ? b[c] + a[c] : a[c];
  }
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(DType dt) : dt_(dt) {
    if (dt != DType::F32 && dt != DType::F64) fail("the CPU backend computes in f32 or f64");
  }
  Device device() const override { return Device::CPU; }
  std::string name() const override { return std::string("cpu-") + dtype_name(dt_); }
  DType compute_dtype() const override { return dt_; }
  DType accum_dtype() const override { return dt_; }

  Tensor alloc(const Shape& shape, DType dtype) override {
    Tensor t;
    t.dtype = dtype;
    t.shape = shape;
    size_t bytes = std::max<size_t>(64, (t.nbytes() + 63) / 64 * 64);
    void* p = std::aligned_alloc(64, bytes);
    if (!p) fail("out of host memory allocating ", bytes, " bytes");
    t.storage = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
    t.data = p;
    return t;
  }
  void zero(Tensor& t) override { std::memset(t.data, 0, t.nbytes()); }
  void upload(Tensor& dst, const void* src) override { std::memcpy(dst.data, src, dst.nbytes()); }
  void download(void* dst, const Tensor& src) override { std::memcpy(dst, src.data, src.nbytes()); }
  void convert(const Tensor& src, Tensor& dst) override {
    SSD_CHECK(src.numel() == dst.numel());
    if (src.dtype == dst.dtype) {
      if (src.data != dst.data) std::memcpy(dst.data, src.data, src.nbytes());
      return;
    }
    auto get = [&](int64_t i) -> double {
      switch (src.dtype) {
        case DType::F32: return static_cast<const float*>(src.data)[i];
        case DType::F64: return static_cast<const double*>(src.data)[i];
        case DType::I32: return static_cast<const int32_t*>(src.data)[i];
        default: fail("CPU convert from ", dtype_name(src.dtype), " is not supported");
      }
    };
    for (int64_t i = 0, n = src.numel(); i < n; ++i) {
      double v = get(i);
      switch (dst.dtype) {
        case DType::F32: static_cast<float*>(dst.data)[i] = static_cast<float>(v); break;
        case DType::F64: static_cast<double*>(dst.data)[i] = v; break;
        case DType::I32: static_cast<int32_t*>(dst.data)[i] = static_cast<int32_t>(v); break;
        default: fail("CPU convert to ", dtype_name(dst.dtype), " is not supported");
      }
    }
  }

  void copy_rows(const ColSlice& src, int64_t src_row, const ColSlice& dst, int64_t dst_row,
                 int64_t rows, bool accumulate) override {
    check_copy_rows(src, src_row, dst, dst_row, rows);
    if (dt_ == DType::F64) rows_op<double>(src, src_row, dst, dst_row, rows, accumulate);
    else rows_op<float>(src, src_row, dst, dst_row, rows, accumulate);
  }

  void embedding_fwd(const Tensor& tokens, const Tensor& w, Tensor& out,
                     const VocabShard* shard) override {
    check_shape(out, {tokens.numel(), w.size(1)}, "embedding output");
    const auto [vocab, row0] = vocab_rows(shard, w.size(0), "embedding_fwd");
    run([&](auto z) {
      using T = decltype(z);
      cpu::embedding_fwd<T>(tokens.ptr<int32_t>(), tokens.numel(), w.ptr<T>(), vocab, row0,
                            w.size(0), w.size(1), out.ptr<T>());
    });
  }
  void embedding_bwd(const Tensor& tokens, const Tensor& dout, Tensor& dw,
                     const VocabShard* shard) override {
    const auto [vocab, row0] = vocab_rows(shard, dw.size(0), "embedding_bwd");
    run([&](auto z) {
      using T = decltype(z);
      cpu::embedding_bwd<T>(tokens.ptr<int32_t>(), tokens.numel(), dout.ptr<T>(), vocab, row0,
                            dw.size(0), dw.size(1), dw.ptr<T>());
    });
  }

  void add_rmsnorm_fwd(const Tensor& x, const Tensor* res_in, const Tensor& w, double eps,
                       Tensor& res_out, Tensor& y, Tensor& rstd) override {
    const int64_t n = x.size(0), d = x.size(1);
    check_shape(w, {d}, "rmsnorm weight");
    check_shape(rstd, {n}, "rmsnorm rstd");
    run([&](auto z) {
      using T = decltype(z);
      cpu::add_rmsnorm_fwd<T>(x.ptr<T>(), res_in ? res_in->ptr<T>() : nullptr, w.ptr<T>(), n, d,
                              eps, res_out.ptr<T>(), y.ptr<T>(), rstd.ptr<T>());
    });
  }
  void add_rmsnorm_bwd(const Tensor& dy, const Tensor* dres_next, const Tensor& res_out,
                       const Tensor& w, const Tensor& rstd, Tensor& dres, Tensor& dw) override {
    run([&](auto z) {
      using T = decltype(z);
      cpu::add_rmsnorm_bwd<T>(dy.ptr<T>(), dres_next ? dres_next->ptr<T>() : nullptr,
                              res_out.ptr<T>(), w.ptr<T>(), rstd.ptr<T>(), dy.size(0),
                              dy.size(1), dres.ptr<T>(), dw.ptr<T>());
    });
  }

  void linear_fwd(const Tensor& x, const Tensor& w, Tensor& y) override {
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    SSD_CHECK(w.size(1) == K, "linear: x ", shape_str(x.shape), " w ", shape_str(w.shape));
    check_shape(y, {M, N}, "linear output");
    run([&](auto z) {
      using T = decltype(z);
      cpu::linear_fwd<T>(x.ptr<T>(), w.ptr<T>(), M, N, K, y.ptr<T>());
    });
  }
  void linear_bwd(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx,
                  Tensor& dw) override {
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    check_shape(dy, {M, N}, "linear dy");
    run([&](auto z) {
      using T = decltype(z);
      cpu::linear_bwd<T>(x.ptr<T>(), w.ptr<T>(), dy.ptr<T>(), M, N, K,
                         dx ? dx->ptr<T>() : nullptr, dw.ptr<T>());
    });
  }

  void conv1d_silu_fwd(const ColSlice& in, int64_t batch, int64_t seqlen, const Tensor& w,
                       const Tensor& b, Tensor& out, const Tensor* reset) override {
    const int64_t C = w.size(0), K = w.size(-1);
    SSD_CHECK(in.width == C && in.rows() == batch * seqlen);
    check_shape(out, {batch * seqlen, C}, "conv1d output");
    const int32_t* rs = reset_flags(reset, batch * seqlen, "conv1d");
    run([&](auto z) {
      using T = decltype(z);
      cpu::conv1d_silu_fwd<T>(in.t.ptr<T>() + in.off, in.ld(), batch, seqlen, C, w.ptr<T>(),
                              b.ptr<T>(), K, out.ptr<T>(), rs);
    });
  }
  void conv1d_silu_bwd(const ColSlice& in, int64_t batch, int64_t seqlen, const Tensor& w,
                       const Tensor& b, const Tensor& dout, ColSlice& din, Tensor& dw,
                       Tensor& db, const Tensor* reset) override {
    const int64_t C = w.size(0), K = w.size(-1);
    SSD_CHECK(din.width == C && din.rows() == batch * seqlen);
    const int32_t* rs = reset_flags(reset, batch * seqlen, "conv1d");
    run([&](auto z) {
      using T = decltype(z);
      cpu::conv1d_silu_bwd<T>(in.t.ptr<T>() + in.off, in.ld(), batch, seqlen, C, w.ptr<T>(),
                              b.ptr<T>(), K, dout.ptr<T>(), din.t.ptr<T>() + din.off, din.ld(),
                              dw.ptr<T>(), db.ptr<T>(), rs);
    });
  }

  void ssd_fwd(const SsdDims& d, const SsdInputs& in, Tensor& y, Tensor* final_state) override {
    check_ssd(d, in);
    check_shape(y, {d.tokens(), d.d_inner()}, "ssd output");
    run([&](auto z) {
      using T = decltype(z);
      cpu::ssd_fwd<T>(d, in.xBC.ptr<T>(), in.dt.t.ptr<T>() + in.dt.off, in.dt.ld(),
                      in.dt_bias.ptr<T>(), in.A_log.ptr<T>(), in.D.ptr<T>(),
                      in.initial_state ? in.initial_state->ptr<T>() : nullptr, y.ptr<T>(),
                      final_state ? final_state->ptr<T>() : nullptr,
                      reset_flags(in.reset, d.tokens(), "ssd"));
    });
  }
  void ssd_bwd(const SsdDims& d, const SsdInputs& in, const Tensor& dy,
               const Tensor* dfinal, SsdGrads& g) override {
    check_ssd(d, in);
    check_shape(g.dxBC, in.xBC.shape, "ssd dxBC");
    run([&](auto z) {
      using T = decltype(z);
      cpu::ssd_bwd<T>(d, in.xBC.ptr<T>(), in.dt.t.ptr<T>() + in.dt.off, in.dt.ld(),
                      in.dt_bias.ptr<T>(), in.A_log.ptr<T>(), in.D.ptr<T>(),
                      in.initial_state ? in.initial_state->ptr<T>() : nullptr, dy.ptr<T>(),
                      dfinal ? dfinal->ptr<T>() : nullptr, g.dxBC.ptr<T>(),
                      g.ddt.t.ptr<T>() + g.ddt.off, g.ddt.ld(), g.d_dt_bias.ptr<T>(),
                      g.dA_log.ptr<T>(), g.dD.ptr<T>(),
                      g.d_initial_state ? g.d_initial_state->ptr<T>() : nullptr,
                      reset_flags(in.reset, d.tokens(), "ssd"));
    });
  }

  void ssd_final_state(const SsdDims& d, const SsdInputs& in, Tensor& final_state) override {
    check_ssd(d, in);
    check_shape(final_state, state_shape(d), "ssd final state");
    run([&](auto z) {
      using T = decltype(z);
      cpu::ssd_final_state<T>(d, in.xBC.ptr<T>(), in.dt.t.ptr<T>() + in.dt.off, in.dt.ld(),
                              in.dt_bias.ptr<T>(), in.A_log.ptr<T>(),
                              in.initial_state ? in.initial_state->ptr<T>() : nullptr,
                              final_state.ptr<T>(), reset_flags(in.reset, d.tokens(), "ssd"));
    });
  }
  void ssd_dinitial(const SsdDims& d, const SsdInputs& in, const Tensor& dy,
                    const Tensor* dfinal, Tensor& d_initial_state) override {
    check_ssd(d, in);
    check_shape(dy, {d.tokens(), d.d_inner()}, "ssd dy");
    check_shape(d_initial_state, state_shape(d), "ssd d_initial_state");
    run([&](auto z) {
      using T = decltype(z);
      cpu::ssd_dinitial<T>(d, in.xBC.ptr<T>(), in.dt.t.ptr<T>() + in.dt.off, in.dt.ld(),
                           in.dt_bias.ptr<T>(), in.A_log.ptr<T>(), dy.ptr<T>(),
                           dfinal ? dfinal->ptr<T>() : nullptr, d_initial_state.ptr<T>(),
                           reset_flags(in.reset, d.tokens(), "ssd"));
    });
  }
  void ssd_segment_decay(const SsdDims& d, const SsdInputs& in, Tensor& decay) override {
    SSD_CHECK(in.dt.width == d.nheads && in.dt.rows() == d.tokens());
    check_shape(decay, {d.batch, d.nheads}, "ssd segment decay");
    run([&](auto z) {
      using T = decltype(z);
      cpu::ssd_segment_decay<T>(d, in.dt.t.ptr<T>() + in.dt.off, in.dt.ld(), in.dt_bias.ptr<T>(),
                                in.A_log.ptr<T>(), decay.ptr<T>(),
                                reset_flags(in.reset, d.tokens(), "ssd"));
    });
  }
  void cp_state_scan(const SsdDims& d, const Tensor& summaries, int64_t k, bool reverse,
                     Tensor& out) override {
    const int64_t BH = d.batch * d.nheads, PN = d.headdim * d.dstate;
    SSD_CHECK(summaries.dim() == 2 && summaries.size(1) == BH * PN + BH, "cp_state_scan: summaries ",
              shape_str(summaries.shape), " for ", BH, " x ", PN, " states");
    check_shape(out, state_shape(d), "cp_state_scan output");
    run([&](auto z) {
      using T = decltype(z);
      cpu::cp_state_scan<T>(summaries.size(0), BH, PN, summaries.ptr<T>(), k, reverse,
                            out.ptr<T>());
    });
  }

  void gated_rmsnorm_fwd(const Tensor& y, const ColSlice& z, const Tensor& w, int64_t gs,
                         double eps, Tensor& out, Tensor& rstd, const NormSpan* span) override {
    const int64_t n = y.size(0), d = y.size(1);
    SSD_CHECK(z.width == d && d % gs == 0);
    check_shape(rstd, {n, d / gs}, "gated norm rstd");
    run([&](auto zz) {
      using T = decltype(zz);
      if (span)
        cpu::gated_rmsnorm_fwd_span<T>(y.ptr<T>(), z.t.ptr<T>() + z.off, z.ld(), w.ptr<T>(), n,
                                       d, gs, eps, out.ptr<T>(), rstd.ptr<T>(), *span);
      else
        cpu::gated_rmsnorm_fwd<T>(y.ptr<T>(), z.t.ptr<T>() + z.off, z.ld(), w.ptr<T>(), n, d,
                                  gs, eps, out.ptr<T>(), rstd.ptr<T>());
    });
  }
  void gated_rmsnorm_bwd(const Tensor& dout, const Tensor& y, const ColSlice& z,
                         const Tensor& w, int64_t gs, const Tensor& rstd, Tensor& dy,
                         ColSlice& dz, Tensor& dw, const NormSpan* span) override {
    const int64_t n = y.size(0), d = y.size(1);
    run([&](auto zz) {
      using T = decltype(zz);
      if (span)
        cpu::gated_rmsnorm_bwd_span<T>(dout.ptr<T>(), y.ptr<T>(), z.t.ptr<T>() + z.off, z.ld(),
                                       w.ptr<T>(), rstd.ptr<T>(), n, d, gs, dy.ptr<T>(),
                                       dz.t.ptr<T>() + dz.off, dz.ld(), dw.ptr<T>(), *span);
      else
        cpu::gated_rmsnorm_bwd<T>(dout.ptr<T>(), y.ptr<T>(), z.t.ptr<T>() + z.off, z.ld(),
                                  w.ptr<T>(), rstd.ptr<T>(), n, d, gs, dy.ptr<T>(),
                                  dz.t.ptr<T>() + dz.off, dz.ld(), dw.ptr<T>());
    });
  }

  void lm_head_ce(const Tensor& hidden, const Tensor& w, const Tensor& targets,
                  double grad_scale, Tensor& stats, Tensor* dhidden, Tensor* dw,
                  const VocabShard* shard) override {
    SSD_CHECK(targets.numel() == hidden.size(0) && w.size(1) == hidden.size(1));
    check_shape(stats, {3}, "ce stats");
    run([&](auto z) {
      using T = decltype(z);
      T* dh = dhidden ? dhidden->ptr<T>() : nullptr;
      T* dwp = dw ? dw->ptr<T>() : nullptr;
      if (shard)
        cpu::lm_head_ce_shard<T>(hidden.ptr<T>(), w.ptr<T>(), targets.ptr<int32_t>(),
                                 hidden.size(0), hidden.size(1), w.size(0), *shard, grad_scale,
                                 stats.ptr<double>(), dh, dwp);
      else
        cpu::lm_head_ce<T>(hidden.ptr<T>(), w.ptr<T>(), targets.ptr<int32_t>(), hidden.size(0),
                           hidden.size(1), w.size(0), grad_scale, stats.ptr<double>(), dh, dwp);
    });
  }

  double sum_squares(std::span<const Tensor> ts) override {
    double s = 0;
    for (const auto& t : ts)
      run([&](auto z) {
        using T = decltype(z);
        s += cpu::sum_squares<T>(t.ptr<T>(), t.numel());
      });
    return s;
  }
  void adamw_step(std::span<AdamWSlot> slots, const AdamWHyper& h) override {
    for (auto& s : slots)
      run([&](auto z) {
        using T = decltype(z);
        cpu::adamw_step<T>(s.param.ptr<T>(), s.grad.ptr<T>(), s.m.ptr<T>(), s.v.ptr<T>(),
                           s.param.numel(), s.weight_decay, h);
      });
  }

 private:
  template <class F>
  void run(F&& f) {
    if (dt_ == DType::F64) f(double{});
    else f(float{});
  }
  // {vocabulary size, token of weight row 0} for an embedding weight of `rows` rows.
  static std::pair<int64_t, int64_t> vocab_rows(const VocabShard* shard, int64_t rows,
                                                const char* op) {
    if (!shard) return {rows, 0};
    SSD_CHECK(shard->begin >= 0 && shard->begin + rows <= shard->total, "cpu ", op,
              ": vocabulary shard rows [", shard->begin, ", ", shard->begin + rows, ") outside [0, ",
              shard->total, ")");
    return {shard->total, shard->begin};
  }
  // The reset flags' data, checked to be int32 [tokens] (null when not given).
  static const int32_t* reset_flags(const Tensor* reset, int64_t tokens, const char* op) {
    if (!reset) return nullptr;
    SSD_CHECK(reset->dtype == DType::I32, op, ": reset flags must be int32");
    check_shape(*reset, {tokens}, "reset flags");
    return reset->ptr<int32_t>();
  }
  static Shape state_shape(const SsdDims& d) { return {d.batch, d.nheads, d.headdim, d.dstate}; }
  static void check_ssd(const SsdDims& d, const SsdInputs& in) {
    SSD_CHECK(d.nheads % d.ngroups == 0 && d.chunk > 0);
    check_shape(in.xBC, {d.tokens(), d.conv_dim()}, "ssd xBC");
    SSD_CHECK(in.dt.width == d.nheads && in.dt.rows() == d.tokens());
  }
  DType dt_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(DType dtype) {
  // The CPU ops parallelise with OpenMP (over heads, rows, blocks) and call GEMMs from inside
  // those regions. A multi-threaded OpenBLAS on top starts its own pool per call: on 2 cores
  // that oversubscribed them (the default run took 60 s instead of 28 s), and its results
  // depended on its thread count (it splits work differently), so losses changed with it.
  // One BLAS thread: every GEMM's arithmetic is fixed, and OpenMP alone decides the threads;
  // the OpenMP reductions use fixed blocks summed in order, so losses do not depend on
  // OMP_NUM_THREADS either (tests/train/test_threads.cpp).
  openblas_set_num_threads(1);
  return std::make_unique<CpuBackend>(dtype);
}

}  // namespace ssd
