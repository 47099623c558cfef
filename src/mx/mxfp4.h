// OCP MX (v1.0) FP4 numerics as AMD Quark exports them and vLLM's emulation runs them
// (spec: shared/spec/mxfp4_numerics.md §3-§5). Blocks are 32 consecutive elements along the last axis.
// Packing: low nibble = even element, high nibble = odd element. Scales: one E8M0 byte per block.
//
// Every function has a scalar reference in mx::ref (mx/mxfp4_ref.cpp) and a runtime-dispatched
// vectorised version here (AVX-512 / AVX2 / scalar) that must agree with it bit for bit.
// The functions are single-threaded; callers parallelise over rows or tensors.
//
// Non-finite inputs (where the sources disagree, spec §3.3-§3.5, §5, §6 — chosen here):
// - quantize_*: a NaN or Inf input is an error (mxlm::Error naming row and column). Quark's exporter
//   writes meaningless codes for them and vLLM cannot use such a weight, so we refuse instead.
// - qdq_*: Quark's float32 fake-quant semantics. A block holding a NaN becomes all NaN (canonical quiet
//   NaN, 0x7FC00000 / 0x7FC0). A block holding +-Inf (and no NaN) gets scale 2^127: the Inf elements
//   stay +-Inf, the finite ones are rounded at that scale (almost always to +-0). vLLM's HIP kernel
//   differs only on such blocks (it saturates Inf to +-6*2^127 and ignores NaN); finite data is identical.
// - dequantize_*: scale byte 255 (E8M0 NaN) gives canonical NaN for the whole block (OCP; the HIP kernel
//   would give +-Inf). Byte 0 is 2^-127 (f32/bf16 subnormal results, no flush to zero). Products that
//   exceed the float range (byte 254 with |code value| >= 2) are +-Inf, as in Quark.
// - Finite blocks whose amax >= 1.75 * 2^127 get e = 127 and their max rounds to 2 * 2^127 = Inf: the
//   even rule's overshoot at the top of the range, as in Quark.
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

// E2M1 code (0..15, bit 3 = sign) to its value; code 8 is -0.0. Codes > 15 are an error.
float e2m1_value(uint8_t code);
// E8M0 byte to 2^(byte-127); 255 is NaN; byte 0 is 2^-127 (a float32 subnormal).
float e8m0_value(uint8_t byte);
// Scale exponent e in [-127, 127] to its E8M0 byte e + 127 (out of range is an error).
uint8_t e8m0_encode(int exponent);
// The scale byte Quark's current exporter writes for exponent e: e + 127 raised to at least 1
// (its safe log2 clamps the scale to >= 2^-126; spec §3.4).
uint8_t export_scale_byte(int exponent);

// Shared scale exponent e (scale = 2^e) of a block whose max |x| is `amax` (finite, >= 0), clamped to
// [-127, 127]; an all-zero block gives -127. +Inf gives 127. NaN or a negative amax is an error.
int scale_exponent(float amax, ScaleRule rule);

// Rounds y (already divided by the block scale) onto the E2M1 grid: nearest, ties to even, saturating
// at +-6. Returns the code with the sign bit set for negative non-zero magnitudes only (Quark's export
// never writes code 8). +-Inf saturate to +-6; NaN gives +-6 by its sign bit (as vLLM's kernel).
uint8_t e2m1_encode(float y);

// Packs n codes (n even, each 0..15) into n/2 bytes: byte j = codes[2j] | codes[2j+1] << 4.
void pack_e2m1(const uint8_t* codes, size_t n, uint8_t* packed);
// The inverse: n/2 bytes to n codes.
void unpack_e2m1(const uint8_t* packed, size_t n, uint8_t* codes);

// Quantizes rows of `k` elements (k % 32 == 0) as Quark's exporter does: packed [rows, k/2] and scale bytes
// [rows, k/32]. The scale byte of a block is e + 127, raised to at least 1 like current Quark (an all-zero
// block is written as byte 1). Input dtypes: f32, bf16 (raw bits), f16 (raw bits).
// Note (Quark quirk, kept): codes are computed with the unraised e, so a nonzero block with e = -127
// (amax < 2^-124) dequantizes to twice its quantized value; no real weight is that small.
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
// For finite blocks, qdq == dequantize(quantize) except that qdq keeps -0.0 where the code is 0 and that
// blocks with e = -127 are not subject to the export quirk above.
void qdq_f32(float* x, size_t n, ScaleRule rule = ScaleRule::Even);
void qdq_bf16(uint16_t* x, size_t n, ScaleRule rule = ScaleRule::Even);

// Which implementation the dispatched functions use on this CPU: "avx512", "avx2" or "scalar".
const char* active_isa();

namespace ref {
// Scalar references with the same contracts as the functions above.
void quantize_f32(const float* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule);
void quantize_bf16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule);
void quantize_f16(const uint16_t* x, size_t rows, size_t k, uint8_t* packed, uint8_t* scales, ScaleRule rule);
void dequantize_f32(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, float* out);
void dequantize_bf16(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, uint16_t* out);
void qdq_f32(float* x, size_t n, ScaleRule rule);
void qdq_bf16(uint16_t* x, size_t n, ScaleRule rule);
}  // namespace ref

}  // namespace mxlm::mx
