// Small helpers shared by the tests: random data, error measures, finite differences.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <random>
#include <vector>

namespace ssdtest {

// f rounded to the nearest bfloat16 (ties to even), as a float: what a bf16 tensor holds.
inline float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

template <class T>
std::vector<T> randn(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(d(g));
  return v;
}

template <class T>
std::vector<T> uniform(size_t n, uint64_t seed, double lo, double hi) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(d(g));
  return v;
}

// max |a-b| / max(max|b|, tiny): one relative error for a whole tensor. NaN anywhere -> inf.
template <class A, class B>
double rel_err(const std::vector<A>& a, const std::vector<B>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return INFINITY;
    num = std::max(num, std::fabs(x - y));
    den = std::max(den, std::fabs(y));
  }
  return num / std::max(den, 1e-30);
}

// Central finite difference of a scalar function f with respect to every entry of x.
inline std::vector<double> finite_diff(std::vector<double>& x, const std::function<double()>& f,
                                       double eps = 1e-6) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    double keep = x[i];
    x[i] = keep + eps;
    double fp = f();
    x[i] = keep - eps;
    double fm = f();
    x[i] = keep;
    g[i] = (fp - fm) / (2 * eps);
  }
  return g;
}

// sum(w * y) for a fixed random weighting w: turns a tensor output into a scalar loss whose
// gradient with respect to y is w.
inline double dot(const std::vector<double>& w, const std::vector<double>& y) {
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += w[i] * y[i];
  return s;
}

// step -> loss of the training lines of a run's metrics.jsonl.
// The whole of a file as bytes ("" when it cannot be read).
inline std::string read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline std::map<int, double> read_losses(const std::filesystem::path& metrics) {
  std::map<int, double> out;
  std::ifstream f(metrics);
  std::string line;
  while (std::getline(f, line)) {
    auto s = line.find("\"step\": "), l = line.find("\"loss\": ");
    if (s != std::string::npos && l != std::string::npos)
      out[std::stoi(line.substr(s + 8))] = std::stod(line.substr(l + 8));
  }
  return out;
}

}  // namespace ssdtest
