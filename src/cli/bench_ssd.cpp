// `ssdtrain bench ssd`: times the CUDA SSD kernels (kernels/ssd_*.cu) on random data.
// Prints the median over --iters timed runs (after --warmup untimed ones) of ssd_fwd and of
// ssd_fwd + ssd_bwd, each bracketed by cudaEvents, then a per-step breakdown (mean over the
// same number of runs) recorded through the SsdProfiler hook. --variant picks the kernel
// variant (ssd_set_variant).
#include "cli/bench_ssd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <string>
#include <vector>

namespace ssd {
namespace {
// Outside the CUDA part: a build without CUDA still answers --help.
const char* kBenchSsdUsage =
    "usage: ssdtrain bench ssd [--batch N] [--seqlen N] [--heads N] [--headdim N]\n"
    "                          [--groups N] [--dstate N] [--chunk N] [--iters N]\n"
    "                          [--warmup N] [--variant 1|2] [--recompute]\n"
    "defaults: 8 2048 48 64 1 128 256, 20 iterations after 5 warm-up runs;\n"
    "--variant: SSD kernel variant (default: SSD_KERNEL_VARIANT, else 2)\n"
    "--recompute: the backward recomputes the forward's intermediates (default: the\n"
    "             forward saves them, as in training)\n";
}  // namespace
}  // namespace ssd

#ifdef SSD_HAVE_CUDA
#include <cuda_runtime.h>

#include "ssd.h"
#include "ssd_common.cuh"
#endif

namespace ssd {

#ifdef SSD_HAVE_CUDA
namespace {

struct Flags {
  int64_t batch = 8, seqlen = 2048, heads = 48, headdim = 64, groups = 1, dstate = 128,
          chunk = 256;
  int iters = 20, warmup = 5;
  int variant = 0;  // 0: as configured (SSD_KERNEL_VARIANT, default 2)
  bool saved = true;  // the forward keeps its intermediates for the backward (as training does)
};

bool parse(int argc, char** argv, Flags& f) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kBenchSsdUsage, stdout);
      return false;
    }
    if (a == "--recompute") {
      f.saved = false;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "bench ssd: %s needs a value\n", a.c_str());
      std::exit(2);
    }
    const char* v = argv[++i];
    char* end = nullptr;
    const long long n = std::strtoll(v, &end, 10);
    if (!end || *end || n <= 0) {
      std::fprintf(stderr, "bench ssd: bad value '%s' for %s\n", v, a.c_str());
      std::exit(2);
    }
    if (a == "--batch") f.batch = n;
    else if (a == "--seqlen") f.seqlen = n;
    else if (a == "--heads") f.heads = n;
    else if (a == "--headdim") f.headdim = n;
    else if (a == "--groups") f.groups = n;
    else if (a == "--dstate") f.dstate = n;
    else if (a == "--chunk") f.chunk = n;
    else if (a == "--iters") f.iters = static_cast<int>(n);
    else if (a == "--warmup") f.warmup = static_cast<int>(n);
    else if (a == "--variant") {
      if (n != 1 && n != 2) {
        std::fprintf(stderr, "bench ssd: --variant must be 1 or 2 (is %lld)\n", n);
        std::exit(2);
      }
      f.variant = static_cast<int>(n);
    }
    else {
      std::fprintf(stderr, "bench ssd: unknown flag %s\n", a.c_str());
      std::exit(2);
    }
  }
  return true;
}

#define BENCH_CUDA(x)                                                                    \
  do {                                                                                   \
    const cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "bench ssd: %s: %s\n", #x, cudaGetErrorString(e_));           \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

// Deterministic pseudo-random numbers, roughly N(0, scale^2) (sum of uniforms).
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  float uni() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return static_cast<float>((s >> 40) * (1.0 / 16777216.0));
  }
  float normal() { return (uni() + uni() + uni() + uni() - 2.f) * 1.7320508f; }
};

uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

void* dev_random_bf16(size_t n, uint64_t seed, float scale) {
  std::vector<uint16_t> h(n);
  Rng r(seed);
  for (auto& v : h) v = bf16_bits(r.normal() * scale);
  void* p = nullptr;
  BENCH_CUDA(cudaMalloc(&p, n * 2));
  BENCH_CUDA(cudaMemcpy(p, h.data(), n * 2, cudaMemcpyHostToDevice));
  return p;
}
float* dev_floats(const std::vector<float>& h) {
  void* p = nullptr;
  BENCH_CUDA(cudaMalloc(&p, h.size() * 4));
  BENCH_CUDA(cudaMemcpy(p, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  return static_cast<float*>(p);
}

// Records one cudaEvent per mark; step times are the gaps between consecutive marks.
class EventProfiler : public cuda::SsdProfiler {
 public:
  ~EventProfiler() override {
    for (auto e : pool_) cudaEventDestroy(e);
  }
  void mark(const char* step, cudaStream_t st) override {
    if (used_ == pool_.size()) {
      cudaEvent_t e;
      BENCH_CUDA(cudaEventCreate(&e));
      pool_.push_back(e);
    }
    BENCH_CUDA(cudaEventRecord(pool_[used_], st));
    names_.push_back(step);
    ++used_;
  }
  // Adds this run's step times to `acc` (first-seen order kept in `order`), then resets.
  void collect(std::map<std::string, double>& acc, std::vector<std::string>& order) {
    BENCH_CUDA(cudaDeviceSynchronize());
    for (size_t i = 1; i < used_; ++i) {
      if (names_[i] == "start") continue;
      float ms = 0;
      BENCH_CUDA(cudaEventElapsedTime(&ms, pool_[i - 1], pool_[i]));
      if (!acc.count(names_[i])) order.push_back(names_[i]);
      acc[names_[i]] += ms;
    }
    used_ = 0;
    names_.clear();
  }

 private:
  std::vector<cudaEvent_t> pool_;
  std::vector<std::string> names_;
  size_t used_ = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

int run_bench_ssd(int argc, char** argv) {
  Flags f;
  if (!parse(argc, argv, f)) return 0;
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "bench ssd: no CUDA GPU visible\n");
    return 2;
  }
  SsdDims d;
  d.batch = f.batch;
  d.seqlen = f.seqlen;
  d.nheads = f.heads;
  d.headdim = f.headdim;
  d.ngroups = f.groups;
  d.dstate = f.dstate;
  d.chunk = f.chunk;
  const int64_t T = d.tokens(), H = d.nheads, SN = d.batch * H * d.headdim * d.dstate;
  if (f.variant) cuda::ssd_set_variant(f.variant);  // before sizing the workspace
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("bench ssd on %s: kernel variant %d, batch %lld seqlen %lld heads %lld headdim "
              "%lld groups %lld dstate %lld chunk %lld (%d warm-up, %d timed)\n",
              prop.name, cuda::ssd_variant(), (long long)d.batch, (long long)d.seqlen, (long long)H,
              (long long)d.headdim, (long long)d.ngroups, (long long)d.dstate,
              (long long)d.chunk, f.warmup, f.iters);

  using bf = cuda::bf16;
  auto* xBC = static_cast<bf*>(dev_random_bf16(T * d.conv_dim(), 1, 1.f));
  auto* dt = static_cast<bf*>(dev_random_bf16(T * H, 2, 0.5f));
  auto* dy = static_cast<bf*>(dev_random_bf16(T * d.d_inner(), 3, 1.f));
  std::vector<float> bias(H), alog(H), Dh(H);
  Rng r(4);
  for (int64_t h = 0; h < H; ++h) {
    const float dt0 = 0.001f + 0.099f * r.uni();
    bias[h] = std::log(std::expm1(dt0));
    alog[h] = std::log(1.f + 15.f * r.uni());
    Dh[h] = r.normal();
  }
  float* g_bias = dev_floats(bias);
  float* g_alog = dev_floats(alog);
  float* g_D = dev_floats(Dh);
  float* g_init = dev_floats(std::vector<float>(SN, 0.f));
  float *g_fs, *g_dinit, *g_dbias, *g_dalog, *g_dD;
  bf *y, *dxBC, *ddt;
  BENCH_CUDA(cudaMalloc(&g_fs, SN * 4));
  BENCH_CUDA(cudaMalloc(&g_dinit, SN * 4));
  BENCH_CUDA(cudaMalloc(&g_dbias, H * 4));
  BENCH_CUDA(cudaMalloc(&g_dalog, H * 4));
  BENCH_CUDA(cudaMalloc(&g_dD, H * 4));
  BENCH_CUDA(cudaMalloc(&y, T * d.d_inner() * 2));
  BENCH_CUDA(cudaMalloc(&dxBC, T * d.conv_dim() * 2));
  BENCH_CUDA(cudaMalloc(&ddt, T * H * 2));
  void* ws = nullptr;
  const size_t wsb = cuda::ssd_workspace_bytes(d);
  BENCH_CUDA(cudaMalloc(&ws, wsb));
  void* saved = nullptr;
  const size_t savedb = cuda::ssd_saved_bytes(d);
  if (f.saved) BENCH_CUDA(cudaMalloc(&saved, savedb));
  std::printf("workspace %.1f MiB; %s\n", wsb / 1048576.0,
              f.saved ? ("forward intermediates saved for the backward: " +
                         std::to_string(savedb >> 20) + " MiB").c_str()
                      : "the backward recomputes the forward's intermediates");

  cudaStream_t st;
  BENCH_CUDA(cudaStreamCreate(&st));
  auto fwd = [&] {
    cuda::ssd_fwd(d, xBC, dt, H, g_bias, g_alog, g_D, g_init, y, g_fs, ws, saved, st);
  };
  auto bwd = [&] {
    cuda::ssd_bwd(d, xBC, dt, H, g_bias, g_alog, g_D, g_init, dy, nullptr, dxBC, ddt, H,
                  g_dbias, g_dalog, g_dD, g_dinit, ws, saved, st);
  };
  cudaEvent_t e0, e1;
  BENCH_CUDA(cudaEventCreate(&e0));
  BENCH_CUDA(cudaEventCreate(&e1));
  auto time_it = [&](auto&& fn) {
    for (int i = 0; i < f.warmup; ++i) fn();
    BENCH_CUDA(cudaStreamSynchronize(st));
    std::vector<double> ms;
    for (int i = 0; i < f.iters; ++i) {
      BENCH_CUDA(cudaEventRecord(e0, st));
      fn();
      BENCH_CUDA(cudaEventRecord(e1, st));
      BENCH_CUDA(cudaEventSynchronize(e1));
      float t = 0;
      BENCH_CUDA(cudaEventElapsedTime(&t, e0, e1));
      ms.push_back(t);
    }
    return median(ms);
  };
  const double t_fwd = time_it(fwd);
  const double t_all = time_it([&] {
    fwd();
    bwd();
  });
  std::printf("ssd_fwd          median %.4f ms\n", t_fwd);
  std::printf("ssd_fwd+ssd_bwd  median %.4f ms  (bwd ~ %.4f ms)\n", t_all, t_all - t_fwd);

  // per-step breakdown
  EventProfiler prof;
  cuda::ssd_set_profiler(&prof);
  for (const char* which : {"fwd", "bwd"}) {
    std::map<std::string, double> acc;
    std::vector<std::string> order;
    for (int i = 0; i < f.iters; ++i) {
      if (which[0] == 'f') {
        fwd();
      } else {
        cuda::ssd_set_profiler(nullptr);
        fwd();
        cuda::ssd_set_profiler(&prof);
        bwd();
      }
      prof.collect(acc, order);
    }
    std::printf("%s steps (mean ms, events between launches):\n", which);
    double total = 0;
    for (const auto& n : order) {
      std::printf("  %-24s %.4f\n", n.c_str(), acc[n] / f.iters);
      total += acc[n] / f.iters;
    }
    std::printf("  %-24s %.4f\n", "sum", total);
  }
  cuda::ssd_set_profiler(nullptr);

  BENCH_CUDA(cudaDeviceSynchronize());
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaStreamDestroy(st);
  for (void* p : std::initializer_list<void*>{xBC, dt, dy, g_bias, g_alog, g_D, g_init, g_fs,
                                              g_dinit, g_dbias, g_dalog, g_dD, y, dxBC, ddt, ws, saved})
    cudaFree(p);
  return 0;
}

#else  // !SSD_HAVE_CUDA

int run_bench_ssd(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h"))
      return std::fputs(kBenchSsdUsage, stdout), 0;
  std::fprintf(stderr, "bench ssd: this ssdtrain was built without CUDA support\n");
  return 2;
}

#endif

}  // namespace ssd
