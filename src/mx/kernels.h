// Internal to src/mx: the per-ISA kernel tables behind the dispatched functions, and the scalar pieces
// every implementation shares (scale exponent from amax bits, powers of two, input validation).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

#include "mx/dispatch.h"
#include "mx/mxfp4.h"

namespace mxlm::mx::detail {

struct Kernels {
  Isa isa;
  void (*quantize_f32)(const float*, size_t, size_t, uint8_t*, uint8_t*, ScaleRule);
  void (*quantize_bf16)(const uint16_t*, size_t, size_t, uint8_t*, uint8_t*, ScaleRule);
  void (*quantize_f16)(const uint16_t*, size_t, size_t, uint8_t*, uint8_t*, ScaleRule);
  void (*dequantize_f32)(const uint8_t*, const uint8_t*, size_t, size_t, float*);
  void (*dequantize_bf16)(const uint8_t*, const uint8_t*, size_t, size_t, uint16_t*);
  void (*qdq_f32)(float*, size_t, ScaleRule);
  void (*qdq_bf16)(uint16_t*, size_t, ScaleRule);
};

extern const Kernels kScalarKernels;
// Null where the compiler cannot build that ISA.
extern const Kernels* const kAvx2Kernels;
extern const Kernels* const kAvx512Kernels;

inline constexpr uint32_t kF32QuietNan = 0x7fc00000u;
inline constexpr uint16_t kBf16QuietNan = 0x7fc0u;

// Scale exponent from the float32 bits of amax (sign clear; +Inf allowed; NaN is the caller's job).
// Even (Quark even_round): add half of the dropped FP4 mantissa range, keep sign and exponent.
// Zero and float32-subnormal maxima clamp to -127; a carry into exponent 255 (or Inf) gives 127.
inline int scale_exponent_from_bits(uint32_t amax_bits, ScaleRule rule) {
  uint32_t bits = amax_bits;
  if (rule == ScaleRule::Even) bits = (bits + 0x00200000u) & 0xff800000u;
  const int biased = static_cast<int>(bits >> 23);
  if (biased >= 255) return 127;
  const int e = biased - 127 - 2;
  return e < -127 ? -127 : (e > 127 ? 127 : e);
}

// 2^k for k in [-127, 127] (2^-127 is a float32 subnormal).
inline float pow2(int k) {
  if (k == -127) return std::bit_cast<float>(0x00400000u);
  return std::bit_cast<float>(static_cast<uint32_t>(k + 127) << 23);
}

// Argument checks shared by every implementation (each throws mxlm::Error).
void check_rows(const char* what, size_t k);
void check_groups(const char* what, size_t n);
// Throws the error for a non-finite quantizer input at element `index` of a row-major [rows, k] tensor.
[[noreturn]] void fail_non_finite(const char* what, size_t index, size_t k, float value);

}  // namespace mxlm::mx::detail
