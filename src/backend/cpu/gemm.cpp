// Runtime dispatch of the CPU GEMMs, argument checks, and the portable scalar implementation.
#include "backend/cpu/gemm.h"

#include <atomic>

#include "backend/cpu/gemm_isa.h"
#include "backend/cpu/gemm_kernels.h"
#include "core/cpu_features.h"
#include "core/error.h"

namespace mxlm::cpu {
namespace {

constexpr int kNotForced = -1;
std::atomic<int> forced_isa{kNotForced};

void check_args(const char* op, const void* x, size_t m, size_t k, const void* w, size_t n, const void* y) {
  if (m == 0 || n == 0) return;
  if (!y) fail("{}: output is null for a {}x{} result", op, m, n);
  if (k > 0 && (!x || !w)) fail("{}: null input for m={} k={} n={}", op, m, k, n);
}

}  // namespace

void permute_even_odd(const float* x, size_t m, size_t k, float* out) {
  const size_t full = k / 32 * 32;
  for (size_t i = 0; i < m; ++i) {
    const float* src = x + i * k;
    float* dst = out + i * k;
    for (size_t b = 0; b < full; b += 32) {
      for (size_t e = 0; e < 16; ++e) {
        dst[b + e] = src[b + 2 * e];
        dst[b + 16 + e] = src[b + 2 * e + 1];
      }
    }
    for (size_t kk = full; kk < k; ++kk) dst[kk] = src[kk];
  }
}

bool gemm_isa_supported(GemmIsa isa) {
  switch (isa) {
    case GemmIsa::Scalar:
      return true;
    case GemmIsa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    case GemmIsa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && gemm_isa_supported(GemmIsa::Avx2);
  }
  return false;
}

GemmIsa gemm_best_isa() {
  static const GemmIsa best = gemm_isa_supported(GemmIsa::Avx512) ? GemmIsa::Avx512
                              : gemm_isa_supported(GemmIsa::Avx2) ? GemmIsa::Avx2
                                                                  : GemmIsa::Scalar;
  return best;
}

GemmIsa gemm_active_isa() {
  const int forced = forced_isa.load(std::memory_order_relaxed);
  return forced == kNotForced ? gemm_best_isa() : static_cast<GemmIsa>(forced);
}

void gemm_force_isa(GemmIsa isa) {
  if (!gemm_isa_supported(isa)) fail("gemm: this CPU does not support the {} kernels", gemm_isa_name(isa));
  forced_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

void gemm_reset_isa() { forced_isa.store(kNotForced, std::memory_order_relaxed); }

const char* gemm_isa_name(GemmIsa isa) {
  switch (isa) {
    case GemmIsa::Scalar:
      return "scalar";
    case GemmIsa::Avx2:
      return "avx2";
    case GemmIsa::Avx512:
      return "avx512";
  }
  return "unknown";
}

const char* gemm_isa() { return gemm_isa_name(gemm_active_isa()); }

void gemm_f32(const float* x, size_t m, size_t k, const float* w, size_t n, float* y) {
  check_args("gemm_f32", x, m, k, w, n, y);
  if (m == 0 || n == 0) return;
  switch (gemm_active_isa()) {
    case GemmIsa::Avx512:
      return avx512::gemm_f32(x, m, k, w, n, y);
    case GemmIsa::Avx2:
      return avx2::gemm_f32(x, m, k, w, n, y);
    case GemmIsa::Scalar:
      return scalar::gemm_f32(x, m, k, w, n, y);
  }
}

void gemm_bf16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y) {
  check_args("gemm_bf16", x, m, k, w, n, y);
  if (m == 0 || n == 0) return;
  switch (gemm_active_isa()) {
    case GemmIsa::Avx512:
      return avx512::gemm_bf16(x, m, k, w, n, y);
    case GemmIsa::Avx2:
      return avx2::gemm_bf16(x, m, k, w, n, y);
    case GemmIsa::Scalar:
      return scalar::gemm_bf16(x, m, k, w, n, y);
  }
}

void gemm_f16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y) {
  check_args("gemm_f16", x, m, k, w, n, y);
  if (m == 0 || n == 0) return;
  switch (gemm_active_isa()) {
    case GemmIsa::Avx512:
      return avx512::gemm_f16(x, m, k, w, n, y);
    case GemmIsa::Avx2:
      return avx2::gemm_f16(x, m, k, w, n, y);
    case GemmIsa::Scalar:
      return scalar::gemm_f16(x, m, k, w, n, y);
  }
}

void gemm_mxfp4(const float* x, size_t m, size_t k, const uint8_t* w_packed, const uint8_t* w_scales, size_t n,
                float* y) {
  if (k % 32 != 0) fail("gemm_mxfp4: K = {} is not a multiple of the MXFP4 block size 32", k);
  check_args("gemm_mxfp4", x, m, k, w_packed, n, y);
  if (k > 0 && !w_scales) fail("gemm_mxfp4: null scales for n={} k={}", n, k);
  if (m == 0 || n == 0) return;
  switch (gemm_active_isa()) {
    case GemmIsa::Avx512:
      return avx512::gemm_mxfp4(x, m, k, w_packed, w_scales, n, y);
    case GemmIsa::Avx2:
      return avx2::gemm_mxfp4(x, m, k, w_packed, w_scales, n, y);
    case GemmIsa::Scalar:
      return scalar::gemm_mxfp4(x, m, k, w_packed, w_scales, n, y);
  }
}

void gemm_mxfp4_w4a4(const uint8_t* x_packed, const uint8_t* x_scales, size_t m, size_t k, const uint8_t* w_packed,
                     const uint8_t* w_scales, size_t n, float* y) {
  if (k % 32 != 0) fail("gemm_mxfp4_w4a4: K = {} is not a multiple of the MXFP4 block size 32", k);
  check_args("gemm_mxfp4_w4a4", x_packed, m, k, w_packed, n, y);
  if (k > 0 && (!x_scales || !w_scales)) fail("gemm_mxfp4_w4a4: null scales for m={} n={} k={}", m, n, k);
  if (m == 0 || n == 0) return;
  if (gemm_active_isa() == GemmIsa::Avx512 && avx512::has_vnni())
    return avx512::gemm_mxfp4_w4a4(x_packed, x_scales, m, k, w_packed, w_scales, n, y);
  scalar::gemm_mxfp4_w4a4(x_packed, x_scales, m, k, w_packed, w_scales, n, y);
}

}  // namespace mxlm::cpu
