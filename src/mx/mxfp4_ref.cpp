// Scalar references: one element at a time, written for clarity. The vectorised kernels must match these
// bit for bit; tests compare them on every path.
#include <bit>
#include <cmath>

#include "core/dtype.h"
#include "mx/kernels.h"
#include "mx/mxfp4.h"

namespace mxlm::mx::ref {

namespace {

using detail::pow2;

// Exact E2M1 magnitude of |y| (RNE, saturating), as a float.
float rounded_magnitude(float y) { return e2m1_value(e2m1_encode(std::fabs(y))); }

// One block of f32 values (already widened exactly from the input dtype) to packed codes; returns the
// scale byte. `first` is the flat index of the block for error messages.
template <typename Load>
uint8_t quantize_block(Load load, size_t first, size_t k, const char* what, uint8_t* packed, ScaleRule rule) {
  float amax = 0.0f;
  for (size_t i = 0; i < kBlockSize; ++i) {
    const float v = load(i);
    if (!std::isfinite(v)) detail::fail_non_finite(what, first + i, k, v);
    amax = std::fmax(amax, std::fabs(v));
  }
  const int e = scale_exponent(amax, rule);
  const float inv_scale = pow2(-e);
  uint8_t codes[kBlockSize];
  for (size_t i = 0; i < kBlockSize; ++i) codes[i] = e2m1_encode(load(i) * inv_scale);
  pack_e2m1(codes, kBlockSize, packed);
  return export_scale_byte(e);
}

template <typename Load>
void quantize_rows(Load load, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule,
                   const char* what) {
  detail::check_rows(what, k);
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    const size_t first = b * kBlockSize;
    scales[b] =
        quantize_block([&](size_t i) { return load(first + i); }, first, k, what, packed + b * (kBlockSize / 2), rule);
  }
}

// QDQ of one block of f32 values in place, with Quark's float32 fake-quant treatment of NaN and Inf.
void qdq_block(float* v, ScaleRule rule) {
  float amax = 0.0f;
  for (size_t i = 0; i < kBlockSize; ++i) {
    if (std::isnan(v[i])) {
      for (size_t j = 0; j < kBlockSize; ++j) v[j] = std::bit_cast<float>(detail::kF32QuietNan);
      return;
    }
    amax = std::fmax(amax, std::fabs(v[i]));
  }
  const int e = scale_exponent(amax, rule);
  const float scale = pow2(e), inv_scale = pow2(-e);
  for (size_t i = 0; i < kBlockSize; ++i) {
    const float y = v[i] * inv_scale;
    if (std::isinf(y)) continue;  // Inf passes through unquantized (and Inf * scale is Inf)
    v[i] = std::copysign(rounded_magnitude(y) * scale, v[i]);
  }
}

}  // namespace

void quantize_f32(const float* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule) {
  quantize_rows([x](size_t i) { return x[i]; }, rows, k, packed, scales, rule, "quantize_f32");
}

void quantize_bf16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule) {
  quantize_rows([x](size_t i) { return bf16_to_f32(x[i]); }, rows, k, packed, scales, rule, "quantize_bf16");
}

void quantize_f16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule) {
  quantize_rows([x](size_t i) { return f16_to_f32(x[i]); }, rows, k, packed, scales, rule, "quantize_f16");
}

void dequantize_f32(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, float* out) {
  detail::check_rows("dequantize_f32", k);
  const size_t n = rows * k;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t code = (i % 2 == 0) ? (byte & 0x0f) : (byte >> 4);
    const uint8_t scale_byte = scales[i / kBlockSize];
    // E8M0 NaN makes the whole block NaN (not +-Inf, not a NaN that depends on the code).
    out[i] = scale_byte == 255 ? std::bit_cast<float>(detail::kF32QuietNan) : e2m1_value(code) * e8m0_value(scale_byte);
  }
}

void dequantize_bf16(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, uint16_t* out) {
  detail::check_rows("dequantize_bf16", k);
  float block[kBlockSize];
  const size_t blocks = rows * (k / kBlockSize);
  for (size_t b = 0; b < blocks; ++b) {
    dequantize_f32(packed + b * (kBlockSize / 2), scales + b, 1, kBlockSize, block);
    for (size_t i = 0; i < kBlockSize; ++i) out[b * kBlockSize + i] = f32_to_bf16(block[i]);  // exact
  }
}

void qdq_f32(float* x, size_t n, ScaleRule rule) {
  detail::check_groups("qdq_f32", n);
  for (size_t b = 0; b < n / kBlockSize; ++b) qdq_block(x + b * kBlockSize, rule);
}

void qdq_bf16(uint16_t* x, size_t n, ScaleRule rule) {
  detail::check_groups("qdq_bf16", n);
  float block[kBlockSize];
  for (size_t b = 0; b < n / kBlockSize; ++b) {
    uint16_t* v = x + b * kBlockSize;
    for (size_t i = 0; i < kBlockSize; ++i) block[i] = bf16_to_f32(v[i]);
    qdq_block(block, rule);
    for (size_t i = 0; i < kBlockSize; ++i) v[i] = f32_to_bf16(block[i]);  // exact: grid * 2^e fits bf16
  }
}

}  // namespace mxlm::mx::ref

namespace mxlm::mx::detail {

const Kernels kScalarKernels = {Isa::Scalar,         ref::quantize_f32,    ref::quantize_bf16, ref::quantize_f16,
                                ref::dequantize_f32, ref::dequantize_bf16, ref::qdq_f32,       ref::qdq_bf16};

}  // namespace mxlm::mx::detail
