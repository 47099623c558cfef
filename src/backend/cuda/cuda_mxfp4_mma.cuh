// The register-level MXFP4 x bf16 tensor-core math of the GEMV kernels (cuda_mxfp4_gemv.cu), shared with the
// standalone laboratory bench/gemv_lab (which includes this header so that it measures the same instructions).
//
// E2M1 -> bf16 by bit placement: the code's e1 e0 m bits go to bf16 bits 8..6 and its sign to bit 15, which is the
// bf16 number value * 2^-126 (code 1 = 0.5 lands on the bf16 subnormal 2^-127, exactly as wanted); one bf16x2
// multiply by 2^126 * scale = 2^(s-1) then gives value * scale exactly (powers of two). Scale bytes 129..254 would
// need 2^(s-1) >= 2^128: such blocks take a second multiply (scale_capped). A register pairs nibbles p and p + 4 of
// a 32-bit word (both halves need the same shift), so the activations are paired the same way (pair_x).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "backend/cuda/cuda_launch.cuh"

namespace mxlm::backend::cuda {

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  __nv_bfloat162 x = *reinterpret_cast<__nv_bfloat162*>(&a);
  __nv_bfloat162 y = *reinterpret_cast<__nv_bfloat162*>(&b);
  __nv_bfloat162 r = __hmul2(x, y);
  return *reinterpret_cast<uint32_t*>(&r);
}

// Multipliers for one E8M0 byte: first = 2^(s-1) (2^126 when that overflows; NaN for 255), second = 2^(s-127)
// when the first was capped, else 1.
__device__ __forceinline__ uint32_t scale_first(uint32_t s) {
  const uint32_t bits = s == 255u ? 0x7fc0u : (s <= 128u ? (s + 126u) << 7 : 253u << 7);
  return bits | (bits << 16);
}
__device__ __forceinline__ bool scale_capped(uint32_t s) { return s - 129u < 126u; }  // 129 .. 254
__device__ __forceinline__ uint32_t scale_second(uint32_t s) {
  const uint32_t bits = scale_capped(s) ? s << 7 : 0x3f80u;
  return bits | (bits << 16);
}

// 8 E2M1 codes (one 32-bit word, element i in nibble i) to four bf16x2 registers: out[p] = (element p, element
// p + 4) times the scale. Each output needs its nibble pair moved by two different shifts (magnitude to bits 6..8,
// sign to bit 15); one multiply by 2^a + 2^b of the masked pair does both, as the two copies cannot overlap (no
// carries), and one mask keeps the magnitude of the first copy and the sign of the second: 13 integer instructions
// per word instead of 16 with shifts.
template <bool kCapped>
__device__ __forceinline__ void dequant_word(uint32_t w, uint32_t first, uint32_t second, uint32_t out[4]) {
  constexpr uint32_t kKeep = 0x81c081c0u;  // bf16 bits 6..8 and 15 of both halves
  const uint32_t hi = w >> 8;              // nibbles 2, 3, 6, 7 where 0, 1, 4, 5 were
  out[0] = ((w & 0x000f000fu) * 0x1040u) & kKeep;
  out[1] = ((w & 0x00f000f0u) * 0x0104u) & kKeep;
  out[2] = ((hi & 0x000f000fu) * 0x1040u) & kKeep;
  out[3] = ((hi & 0x00f000f0u) * 0x0104u) & kKeep;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[i] = bf16x2_mul(out[i], first);
    if (kCapped) out[i] = bf16x2_mul(out[i], second);
  }
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// A lane's two MX blocks (16 bytes each: rows g and g + 8 of its MMA tile, scale bytes sa / sb), word by word: the
// dequantized bf16x2 registers of both rows for word q go to use(q, pa, pb), the kernel's MMAs for that word.
// fa / fb: scale_first of sa / sb, which the caller may have looked up (only the capped path reads sa / sb).
template <bool kCapped, typename Use>
__device__ __forceinline__ void dequant_block_pair(const uint4& a, const uint4& b, uint32_t sa, uint32_t sb,
                                                   uint32_t fa, uint32_t fb, Use&& use) {
  const uint32_t ca = kCapped ? scale_second(sa) : 0u, cb = kCapped ? scale_second(sb) : 0u;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t pa[4], pb[4];
    dequant_word<kCapped>(word(a, q), fa, ca, pa);
    dequant_word<kCapped>(word(b, q), fb, cb, pb);
    use(q, pa, pb);
  }
}
template <bool kCapped, typename Use>
__device__ __forceinline__ void dequant_block_pair(const uint4& a, const uint4& b, uint32_t sa, uint32_t sb, Use&& use) {
  dequant_block_pair<kCapped>(a, b, sa, sb, scale_first(sa), scale_first(sb), use);
}

// math(std::true_type) where any lane of the warp holds a scale byte that needs the second multiply (warp-uniform,
// never on real weights), else math(std::false_type).
template <typename Math>
__device__ __forceinline__ void with_scale_path(bool capped, Math&& math) {
  if (__any_sync(0xffffffffu, capped)) {
    math(std::true_type{});
  } else {
    math(std::false_type{});
  }
}

// Eight bf16 activations (pairs (0,1) .. (6,7) in x..w) re-paired as (0,4), (1,5), (2,6), (3,7) to match.
__device__ __forceinline__ void pair_x(const uint4& v, uint32_t out[4]) {
  out[0] = __byte_perm(v.x, v.z, 0x5410);
  out[1] = __byte_perm(v.x, v.z, 0x7632);
  out[2] = __byte_perm(v.y, v.w, 0x5410);
  out[3] = __byte_perm(v.y, v.w, 0x7632);
}

// A streaming 16-byte weight load. volatile, like the MMA below: the compiler keeps all of a batch's weight loads
// ahead of its first MMA instead of sinking each load to its use (which left one chunk in flight per warp).
__device__ __forceinline__ uint4 load_stream_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void mma_bf16(float d[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Both k16 steps of one dequantized word: rows g (pa) and g + 8 (pb) as A, the word's paired activations xp as B; the
// steps accumulate into d0 and d1 (the same array for one chain).
__device__ __forceinline__ void mma_word(float d0[4], float d1[4], const uint32_t pa[4], const uint32_t pb[4],
                                         const uint32_t xp[4]) {
  mma_bf16(d0, pa[0], pb[0], pa[1], pb[1], xp[0], xp[1]);
  mma_bf16(d1, pa[2], pb[2], pa[3], pb[3], xp[2], xp[3]);
}

}  // namespace mxlm::backend::cuda
