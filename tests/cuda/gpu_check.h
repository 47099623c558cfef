// Shared pieces of the GPU checks (scripts/gpu_check): result reporting, comparisons, random inputs, buffer
// round trips, and the registry every tests/cuda/test_cuda_*.cpp file adds its checks to with MXLM_GPU_CHECK.
// Each check compares the CUDA backend with the CPU backend (or mx::ref / a double reference) on fresh random
// inputs; main() runs them all (or those named on the command line) and exits non-zero on any failure.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace mxlm::gpucheck {

using backend::Backend;
using backend::Buffer;
namespace fs = std::filesystem;

struct Env {
  Backend& cpu;
  Backend& gpu;      // native MoE
  Backend& gpu_emu;  // emulation MoE
  int multiprocessors = 0;
  fs::path fixtures;  // tests/fixtures (m3/, vision/ below it)
};

using CheckFn = void (*)(Env&);
struct Registered {
  const char* name;
  CheckFn fn;
};
inline std::vector<Registered>& registry() {
  static std::vector<Registered> checks;
  return checks;
}
struct Registrar {
  Registrar(const char* name, CheckFn fn) { registry().push_back({name, fn}); }
};

#define MXLM_GPU_CHECK(name)                                                         \
  static void gpu_check_##name(::mxlm::gpucheck::Env& env);                          \
  static const ::mxlm::gpucheck::Registrar gpu_check_registrar_##name(#name, gpu_check_##name); \
  static void gpu_check_##name([[maybe_unused]] ::mxlm::gpucheck::Env& env)

inline int g_failures = 0;
inline int g_checks = 0;
inline std::mt19937 g_rng(20261126);

inline void report(bool ok, const std::string& what, double err, double tol) {
  ++g_checks;
  if (!ok) ++g_failures;
  std::printf("%-4s %-70s err %.3g (tol %.3g)\n", ok ? "ok" : "FAIL", what.c_str(), err, tol);
  std::fflush(stdout);
}

// max |a - b| / max |b|; NaN anywhere in `got` where `want` is finite fails (returns inf).
inline double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return INFINITY;
  double e = 0, s = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(got[i]) != std::isnan(want[i])) return INFINITY;
    if (std::isnan(want[i])) continue;
    e = std::max(e, std::fabs(static_cast<double>(got[i]) - want[i]));
    s = std::max(s, std::fabs(static_cast<double>(want[i])));
  }
  return s > 0 ? e / s : e;
}

inline void check_close(const std::string& what, const std::vector<float>& got, const std::vector<float>& want, double tol) {
  const double e = rel_err(got, want);
  report(e <= tol, what, e, tol);
}

inline void check_bits(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
  size_t bad = got.size() == want.size() ? 0 : 1;
  for (size_t i = 0; got.size() == want.size() && i < want.size(); ++i)
    if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(want[i])) ++bad;
  report(bad == 0, what + " (bit-exact)", static_cast<double>(bad), 0);
}

inline std::vector<float> randn(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g_rng);
  return v;
}

// Random MXFP4 weight: random codes, scale bytes around 2^-4 .. 2^1 (rows x k).
struct Mx {
  std::vector<uint8_t> packed, scales;
  int64_t rows = 0, k = 0;
};
inline Mx random_mx(int64_t rows, int64_t k, int lo = 120, int hi = 128) {
  Mx m;
  m.rows = rows;
  m.k = k;
  m.packed.resize(static_cast<size_t>(rows * k / 2));
  m.scales.resize(static_cast<size_t>(rows * k / 32));
  std::uniform_int_distribution<int> byte(0, 255), sc(lo, hi);
  for (auto& b : m.packed) b = static_cast<uint8_t>(byte(g_rng));
  for (auto& s : m.scales) s = static_cast<uint8_t>(sc(g_rng));
  return m;
}

inline std::unique_ptr<Buffer> up(Backend& b, const std::vector<float>& v) {
  auto buf = b.alloc(v.size());
  b.upload(*buf, 0, v.data(), v.size());
  return buf;
}
inline std::unique_ptr<Buffer> up_i32(Backend& b, const std::vector<int32_t>& v) {
  auto buf = b.alloc(v.size());
  b.upload(*buf, 0, reinterpret_cast<const float*>(v.data()), v.size());
  return buf;
}
inline std::vector<float> down(Backend& b, const Buffer& buf, size_t n) {
  std::vector<float> v(n);
  b.download(buf, 0, v.data(), n);
  return v;
}
inline std::vector<int32_t> down_i32(Backend& b, const Buffer& buf, size_t n) {
  auto f = down(b, buf, n);
  std::vector<int32_t> v(n);
  std::memcpy(v.data(), f.data(), n * 4);
  return v;
}

}  // namespace mxlm::gpucheck
