// Internal to the CPU backend: the per-ISA GEMM implementations behind the dispatched functions of
// gemm.h. Arguments are already checked (m, n > 0; K % 32 == 0 for MXFP4).
#pragma once

#include <cstddef>
#include <cstdint>

namespace mxlm::cpu {

#define MXLM_GEMM_KERNELS_DECLARE                                                                          \
  void gemm_f32(const float* x, size_t m, size_t k, const float* w, size_t n, float* y);                   \
  void gemm_bf16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y);               \
  void gemm_f16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y);                \
  void gemm_mxfp4(const float* x, size_t m, size_t k, const uint8_t* w_packed, const uint8_t* w_scales, \
                  size_t n, float* y);

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

}  // namespace mxlm::cpu
