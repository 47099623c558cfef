// Device helpers shared by the CUDA kernel files: the bf16 conversion the host uses (core/dtype.h), the MX QDQ of
// one 32-element block held one element per lane (mx::ref::qdq_block), and SwiGLU-OAI. One definition for every
// kernel that fuses them, so fused and plain paths compute the same bits.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace mxlm::backend::cuda {

// RNE; NaN keeps its sign and payload top bits (quiet), as core/dtype.h's f32_to_bf16 (CUDA's conversion would
// return the canonical 0x7FFF).
__device__ __forceinline__ uint16_t to_bf16_bits(float v) {
  if (isnan(v)) return static_cast<uint16_t>((__float_as_uint(v) >> 16) | 0x0040u);
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
// Two floats as one bf16x2 register (lo in the low half), each rounded as to_bf16_bits.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(to_bf16_bits(lo)) | (static_cast<uint32_t>(to_bf16_bits(hi)) << 16);
}

// ---- MX QDQ of one 32-element block held one element per lane (the whole warp takes part).
// Same function as mx::ref::qdq_block: "even" scale from the f32 bits of amax, y = x * 2^-e (exact), RNE onto
// the E2M1 grid with saturation at 6, times 2^e (exact), sign kept (also for zero). A NaN anywhere makes the
// whole block the canonical NaN; an Inf element passes through.
__device__ __forceinline__ float pow2_exact(int k) {
  return k == -127 ? __uint_as_float(0x00400000u) : __uint_as_float(static_cast<uint32_t>(k + 127) << 23);
}

__device__ __forceinline__ float e2m1_round_magnitude(float a) {
  if (a <= 0.25f) return 0.0f;
  if (a < 0.75f) return 0.5f;
  if (a <= 1.25f) return 1.0f;
  if (a < 1.75f) return 1.5f;
  if (a <= 2.5f) return 2.0f;
  if (a < 3.5f) return 3.0f;
  if (a <= 5.0f) return 4.0f;
  return 6.0f;
}

__device__ __forceinline__ float qdq_lane(float v) {
  const unsigned full = 0xffffffffu;
  if (__any_sync(full, isnan(v))) return __uint_as_float(0x7fc00000u);
  float amax = fabsf(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(full, amax, o));
  uint32_t bits = (__float_as_uint(amax) + 0x00200000u) & 0xff800000u;
  const int biased = static_cast<int>(bits >> 23);
  int e = biased >= 255 ? 127 : biased - 129;
  e = e < -127 ? -127 : (e > 127 ? 127 : e);
  const float y = v * pow2_exact(-e);
  if (isinf(y)) return v;
  return copysignf(e2m1_round_magnitude(fabsf(y)) * pow2_exact(e), v);
}

// SwiGLU-OAI (backend.h): (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
__device__ __forceinline__ float swiglu(float gate, float up, float alpha, float limit) {
  const float g = fminf(gate, limit);
  const float u = fminf(fmaxf(up, -limit), limit);
  return (u + 1.0f) * (g * (1.0f / (1.0f + expf(-alpha * g))));
}

// MoE combine for token blockIdx.y over the hidden columns this thread strides across: out[t] = Σ_j w[r] * y[r]
// over the token's rows r = combine[t, j] (-1 = no row; rows listed in ascending expert order, the CPU backend's
// summation order). The plain and the PDL kernels both run this body.
__device__ __forceinline__ void moe_combine_token(const float* y, const int32_t* combine, const float* weights, int k,
                                                  size_t hidden, float* out) {
  const size_t t = blockIdx.y;
  for (size_t c = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; c < hidden;
       c += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int32_t r = combine[t * static_cast<size_t>(k) + static_cast<size_t>(j)];
      if (r < 0) continue;
      acc += weights[r] * y[static_cast<size_t>(r) * hidden + c];
    }
    out[t * hidden + c] = acc;
  }
}

}  // namespace mxlm::backend::cuda
