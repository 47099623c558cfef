// OCP MX (v1.0) FP4 numerics as AMD Quark exports them and vLLM's emulation runs them
// (spec: shared/spec/mxfp4_numerics.md §3-§5). Blocks are 32 consecutive elements along the last axis.
// Packing: low nibble = even element, high nibble = odd element. Scales: one E8M0 byte per block.
//
// Every function has a scalar reference in mx::ref (mx/mxfp4_ref.cpp) and a runtime-dispatched
// vectorised version here (AVX-512 / AVX2 / scalar) that must agree with it bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mxlm::mx {

inline constexpr size_t kBlockSize = 32;

// How the shared exponent is chosen from the block's max |x| (spec §2, §3.2).
enum class ScaleRule {
  Even,   // Quark/vLLM default: exponent rounded up when amax >= 1.75 * 2^floor(log2 amax)
  Floor,  // OCP v1.0 text: floor(log2 amax) - 2
};

// E2M1 code (0..15, bit 3 = sign) to its value; code 8 is -0.0.
float e2m1_value(uint8_t code);
// E8M0 byte to 2^(byte-127); 255 is NaN; byte 0 is 2^-127 (a float32 subnormal).
float e8m0_value(uint8_t byte);

// Shared scale exponent e (scale = 2^e) of a block whose max |x| is `amax` (finite, >= 0), clamped to
// [-127, 127]; an all-zero block gives -127. +Inf gives 127.
int scale_exponent(float amax, ScaleRule rule);

// Rounds y (already divided by the block scale) onto the E2M1 grid: nearest, ties to even, saturating
// at +-6. Returns the code with the sign bit set for negative non-zero magnitudes only (Quark's export
// never writes code 8).
uint8_t e2m1_encode(float y);

// Quantizes rows of `k` elements (k % 32 == 0) as Quark's exporter does: packed [rows, k/2] and scale bytes
// [rows, k/32]. The scale byte of a block is e + 127, raised to at least 1 like current Quark (an all-zero
// block is written as byte 1). Input dtypes: f32, bf16 (raw bits), f16 (raw bits).
void quantize_f32(const float* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales,
                  ScaleRule rule = ScaleRule::Even);
void quantize_bf16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales,
                   ScaleRule rule = ScaleRule::Even);
void quantize_f16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales,
                  ScaleRule rule = ScaleRule::Even);

// Dequantizes packed [rows, k/2] + scales [rows, k/32] to f32 or bf16 (exact in both).
void dequantize_f32(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, float* out);
void dequantize_bf16(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, uint16_t* out);

// Quantize-dequantize in place, in groups of 32 consecutive elements (n % 32 == 0), exactly as vLLM's
// emulation (Quark qdq_mxfp4 "even" kernel): sign of zero kept, result exact in the input dtype.
void qdq_f32(float* x, size_t n, ScaleRule rule = ScaleRule::Even);
void qdq_bf16(uint16_t* x, size_t n, ScaleRule rule = ScaleRule::Even);

// Which implementation the dispatched functions use on this CPU: "avx512", "avx2" or "scalar".
const char* active_isa();

namespace ref {
// Scalar references with the same contracts as the functions above.
void quantize_f32(const float* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule);
void quantize_bf16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule);
void dequantize_f32(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, float* out);
void dequantize_bf16(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, uint16_t* out);
void qdq_f32(float* x, size_t n, ScaleRule rule);
void qdq_bf16(uint16_t* x, size_t n, ScaleRule rule);
}  // namespace ref

}  // namespace mxlm::mx
