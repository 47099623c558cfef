// Internal to the CPU backend: the per-ISA GEMM implementations behind the dispatched functions of
// gemm.h. Arguments are already checked (m, n > 0; K % 32 == 0 for MXFP4).
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>

namespace mxlm::cpu {

#define MXLM_GEMM_KERNELS_DECLARE                                                                                 \
  void gemm_f32(const float* x, size_t m, size_t k, const float* w, size_t n, float* y);                          \
  void gemm_bf16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y);                      \
  void gemm_f16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y);                       \
  void gemm_mxfp4(const float* x, size_t m, size_t k, const uint8_t* w_packed, const uint8_t* w_scales, size_t n, \
                  float* y);

// Same summation order as cpu::ref (bit-identical results), with OpenMP over outputs.
namespace scalar {
MXLM_GEMM_KERNELS_DECLARE
}
namespace avx2 {
MXLM_GEMM_KERNELS_DECLARE
}
namespace avx512 {
MXLM_GEMM_KERNELS_DECLARE
}

#undef MXLM_GEMM_KERNELS_DECLARE

// W4A4: a scalar version (same order as cpu::ref) and an AVX-512 VNNI one; AVX2 CPUs use the scalar one.
namespace scalar {
void gemm_mxfp4_w4a4(const uint8_t* x_packed, const uint8_t* x_scales, size_t m, size_t k, const uint8_t* w_packed,
                     const uint8_t* w_scales, size_t n, float* y);
}
namespace avx512 {
bool has_vnni();
void gemm_mxfp4_w4a4(const uint8_t* x_packed, const uint8_t* x_scales, size_t m, size_t k, const uint8_t* w_packed,
                     const uint8_t* w_scales, size_t n, float* y);
}  // namespace avx512

// The SIMD kernels widen bf16 pairs and MXFP4 bytes into one vector of even-k and one of odd-k weights.
// Rather than re-interleaving the weights, they read x in the same order: within each full block of 32
// (k0..k0+31) the 16 even-k values first, then the 16 odd-k values; a tail of k % 32 stays in place.
// Writes m rows of k into `out` (row stride k).
void permute_even_odd(const float* x, size_t m, size_t k, float* out);

// E8M0 byte -> 2^(byte-127) as f32, exact: byte 0 is the subnormal 2^-127, 255 a quiet NaN.
inline constexpr std::array<float, 256> kE8m0Values = [] {
  std::array<float, 256> values{};
  for (uint32_t byte = 0; byte < 256; ++byte)
    values[byte] = std::bit_cast<float>(byte == 255 ? 0x7fc00000u : byte == 0 ? 0x00400000u : byte << 23);
  return values;
}();
// E2M1 codes 0..15 as f32.
inline constexpr float kE2m1Values[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                          -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

}  // namespace mxlm::cpu
