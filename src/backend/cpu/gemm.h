// CPU matrix products for the model: y[M, N] = x[M, K] · W[N, K]ᵀ with f32 activations and f32
// accumulation, for the weight formats a checkpoint holds. M = 1 (decode) is a GEMV and is memory-bound;
// these kernels stream W once per call and use every core (OpenMP over N).
// AVX-512 with AVX2 and scalar fallbacks, chosen at run time (gemm_isa.h can force one for tests); all
// agree with the scalar reference within f32 summation-order rounding. Activations stay f32: bf16 weights
// are widened to f32 in registers (no vdpbf16ps, which would round x to bf16), and MXFP4 weights are
// dequantized exactly in registers, so every product is the reference product. (The AVX-512 MXFP4 kernel
// multiplies x by the E2M1 values and applies each power-of-two block scale to a partial sum, and uses
// vdpbf16ps for rows of x that are exactly bf16, as QDQ'd activations are: still exact products, only the
// summation order differs; gemm_avx512_mxfp4.cpp says when each path applies.)
// Each output's summation order depends only on K, the ISA and (MXFP4 on AVX-512) that row of x's own
// values, not on M, N, the other rows of x or the thread count: a row computed in a batch is bit-identical
// to the same row computed alone.
// y must not alias x or W; its previous contents are ignored.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mxlm::cpu {

void gemm_f32(const float* x, size_t m, size_t k, const float* w, size_t n, float* y);
// W as raw bf16 bits.
void gemm_bf16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y);
// W as raw f16 bits.
void gemm_f16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y);
// W in MXFP4: packed [N, K/2] (low nibble = even k) and E8M0 scales [N, K/32]; K % 32 == 0. The weights are
// dequantized exactly; x is used as given (callers QDQ it first where the emulation semantics require it).
void gemm_mxfp4(const float* x, size_t m, size_t k, const uint8_t* w_packed, const uint8_t* w_scales, size_t n,
                float* y);

// W4A4: x already in MXFP4 too (packed [M, K/2], scales [M, K/32], the layout of W), as after the per-token
// QDQ of the emulation semantics. Twice an E2M1 value is an integer in [-12, 12], so each 32-element block
// product is an exact integer dot product (AVX-512 VNNI where present) times 2^(bx - 127) * 2^(bw - 127) / 4;
// only the f32 accumulation across blocks rounds. Same result class as gemm_mxfp4 on the dequantized x
// (exact products, f32 sums) whenever 2^(bx + bw - 256) >= 2^-149 and bw >= 20 (true for any real
// activation and weight scales); below that, products underflow as any f32 product would.
void gemm_mxfp4_w4a4(const uint8_t* x_packed, const uint8_t* x_scales, size_t m, size_t k, const uint8_t* w_packed,
                     const uint8_t* w_scales, size_t n, float* y);

// Which implementation the dispatched kernels use on this CPU ("avx512", "avx2", "scalar").
const char* gemm_isa();

namespace ref {
// Straightforward scalar versions: the test oracle for the kernels above.
void gemm_f32(const float* x, size_t m, size_t k, const float* w, size_t n, float* y);
void gemm_bf16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y);
void gemm_f16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y);
void gemm_mxfp4(const float* x, size_t m, size_t k, const uint8_t* w_packed, const uint8_t* w_scales, size_t n,
                float* y);
// Block by block: the integer dot product of the doubled E2M1 values, times (sx * (sw / 4)), added in order.
void gemm_mxfp4_w4a4(const uint8_t* x_packed, const uint8_t* x_scales, size_t m, size_t k, const uint8_t* w_packed,
                     const uint8_t* w_scales, size_t n, float* y);
}  // namespace ref

}  // namespace mxlm::cpu
