// Scalar reference GEMMs: one output at a time, products summed in k order in f32. Deliberately plain;
// the kernels in gemm.cpp and gemm_avx*.cpp are tested against these.
#include <cmath>

#include "backend/cpu/gemm.h"
#include "core/dtype.h"
#include "mx/mxfp4.h"

namespace mxlm::cpu::ref {
namespace {

using mx::e2m1_value;
using mx::e8m0_value;

template <typename LoadW>
void gemm(const float* x, size_t m, size_t k, size_t n, float* y, LoadW load_w) {
  for (size_t i = 0; i < m; ++i) {
    for (size_t j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (size_t kk = 0; kk < k; ++kk) acc += x[i * k + kk] * load_w(j, kk);
      y[i * n + j] = acc;
    }
  }
}

}  // namespace

void gemm_f32(const float* x, size_t m, size_t k, const float* w, size_t n, float* y) {
  gemm(x, m, k, n, y, [&](size_t j, size_t kk) { return w[j * k + kk]; });
}

void gemm_bf16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y) {
  gemm(x, m, k, n, y, [&](size_t j, size_t kk) { return bf16_to_f32(w[j * k + kk]); });
}

void gemm_f16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y) {
  gemm(x, m, k, n, y, [&](size_t j, size_t kk) { return f16_to_f32(w[j * k + kk]); });
}

void gemm_mxfp4(const float* x, size_t m, size_t k, const uint8_t* w_packed, const uint8_t* w_scales, size_t n,
                float* y) {
  gemm(x, m, k, n, y, [&](size_t j, size_t kk) {
    const uint8_t byte = w_packed[j * (k / 2) + kk / 2];
    const uint8_t code = (kk % 2 == 0) ? (byte & 0xf) : (byte >> 4);
    return e2m1_value(code) * e8m0_value(w_scales[j * (k / 32) + kk / 32]);
  });
}

void gemm_mxfp4_w4a4(const uint8_t* x_packed, const uint8_t* x_scales, size_t m, size_t k, const uint8_t* w_packed,
                     const uint8_t* w_scales, size_t n, float* y) {
  // Twice the E2M1 value of each code: an integer.
  const auto doubled = [](uint8_t code) { return static_cast<int>(2 * e2m1_value(code)); };
  const size_t blocks = k / 32;
  for (size_t i = 0; i < m; ++i) {
    for (size_t j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (size_t b = 0; b < blocks; ++b) {
        int dot = 0;
        for (size_t e = 0; e < 16; ++e) {
          const uint8_t xb = x_packed[i * (k / 2) + b * 16 + e], wb = w_packed[j * (k / 2) + b * 16 + e];
          dot += doubled(xb & 0xf) * doubled(wb & 0xf) + doubled(xb >> 4) * doubled(wb >> 4);
        }
        const float scale = e8m0_value(x_scales[i * blocks + b]) * (e8m0_value(w_scales[j * blocks + b]) * 0.25f);
        acc += static_cast<float>(dot) * scale;
      }
      y[i * n + j] = acc;
    }
  }
}

}  // namespace mxlm::cpu::ref
