// Placeholder while the avx512 kernels are written: forwards to the scalar implementation.
#include "backend/cpu/gemm_kernels.h"

namespace mxlm::cpu::avx512 {

void gemm_f32(const float* x, size_t m, size_t k, const float* w, size_t n, float* y) {
  scalar::gemm_f32(x, m, k, w, n, y);
}
void gemm_bf16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y) {
  scalar::gemm_bf16(x, m, k, w, n, y);
}
void gemm_f16(const float* x, size_t m, size_t k, const uint16_t* w, size_t n, float* y) {
  scalar::gemm_f16(x, m, k, w, n, y);
}
void gemm_mxfp4(const float* x, size_t m, size_t k, const uint8_t* w_packed, const uint8_t* w_scales, size_t n,
                float* y) {
  scalar::gemm_mxfp4(x, m, k, w_packed, w_scales, n, y);
}

}  // namespace mxlm::cpu::avx512
