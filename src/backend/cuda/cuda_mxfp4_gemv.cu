// MXFP4 x bf16 small-M GEMM on bf16 tensor cores (mma.sync m16n8k16), weights dequantized in registers.
//
// "Swap AB": the weight rows are the MMA's M dimension (16 rows per warp) and the tokens its N dimension (8 per
// tile, one or two tiles), so M = 1..16 tokens waste at most one 8-wide tile instead of a 64-wide one.
//
// K is permuted inside each 128-wide chunk so that every thread loads whole MX blocks with one 16-byte load:
// lane (g = lane / 4, t = lane % 4) owns MX block t of the chunk for weight rows g and g + 8. Byte j of that block
// (k = 32 t + 2 j, +1) feeds MMA step s = j / 2 in pair slot t + 4 (j % 2). The activations use the same map, so
// each thread reads 32 consecutive bf16 of its token per chunk (four 16-byte loads). The dot product is a sum over
// k, so the permutation only changes the f32 summation order; every dequantized product is exact, as in the
// emulation (DESIGN.md numerics contract).
//
// E2M1 -> bf16 by two byte-permute lookups (low and high byte of the bf16 pattern of |value|, selected by the
// 3-bit magnitude), the sign bit moved in, then one bf16x2 multiply by the E8M0 scale (exact: power of two).
#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/cuda_kernels.h"

namespace mxlm::backend::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerCta = 16 * kWarps;

__device__ __forceinline__ uint4 load_stream_v4(const void* p) {
  uint4 v;
  // volatile, like the MMA below: the compiler keeps all of a batch's weight loads ahead of its first MMA
  // instead of sinking each load to its use (which left one chunk in flight per warp).
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t scale_bf16x2(uint32_t byte) {
  const uint32_t bits = byte == 255u ? 0x7fc0u : (byte == 0u ? 0x0040u : byte << 7);
  return bits | (bits << 16);
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  __nv_bfloat162 x = *reinterpret_cast<__nv_bfloat162*>(&a);
  __nv_bfloat162 y = *reinterpret_cast<__nv_bfloat162*>(&b);
  __nv_bfloat162 r = __hmul2(x, y);
  return *reinterpret_cast<uint32_t*>(&r);
}

// 8 E2M1 codes (one 32-bit word, element 2i in the low nibble of byte i) to four bf16x2 pairs times the scale.
__device__ __forceinline__ void dequant_word(uint32_t w, uint32_t scale2, uint32_t out[4]) {
  // bf16 patterns of 0, .5, 1, 1.5, 2, 3, 4, 6: low bytes 00 00 80 C0 00 40 80 C0, high bytes 00 3F 3F 3F 40 40 40 40.
  constexpr uint32_t kLo0 = 0xC0800000u, kLo1 = 0xC0804000u, kHi0 = 0x3F3F3F00u, kHi1 = 0x40404040u;
  const uint32_t m = w & 0x77777777u;
  const uint32_t l0 = __byte_perm(kLo0, kLo1, m & 0xffffu), h0 = __byte_perm(kHi0, kHi1, m & 0xffffu);
  const uint32_t l1 = __byte_perm(kLo0, kLo1, m >> 16), h1 = __byte_perm(kHi0, kHi1, m >> 16);
  out[0] = __byte_perm(l0, h0, 0x5140) | ((w << 12) & 0x8000u) | ((w << 24) & 0x80000000u);
  out[1] = __byte_perm(l0, h0, 0x7362) | ((w << 4) & 0x8000u) | ((w << 16) & 0x80000000u);
  out[2] = __byte_perm(l1, h1, 0x5140) | ((w >> 4) & 0x8000u) | ((w << 8) & 0x80000000u);
  out[3] = __byte_perm(l1, h1, 0x7362) | ((w >> 12) & 0x8000u) | (w & 0x80000000u);
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = bf16x2_mul(out[i], scale2);
}

__device__ __forceinline__ void mma_bf16(float d[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Chunks whose weight loads are all issued before the first is used (memory-level parallelism: a warp keeps
// 8 x 32 B per lane in flight instead of one chunk's worth).
constexpr int kBatch = 8;
constexpr int kXStride = kBatch * 16 + 2;  // uint4 per staged token row: 256 B per chunk + 32 B pad (banks)

template <int NT>  // token tiles of 8
__global__ void __launch_bounds__(kWarps * 32, 2)
    mxfp4_gemv_kernel(const Mxfp4GemvGroup* groups, int n, int k, int chunks_per_split) {
  extern __shared__ uint4 xs[];  // [NT * 8 tokens][kXStride]: this CTA's slice of the activations, swizzled
  const Mxfp4GemvGroup grp = groups[blockIdx.z];
  if (grp.m <= 0) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * kRowsPerCta + warp * 16;
  const bool active = row0 < n;  // inactive warps still take part in staging and barriers
  const int ra = row0 + g, rb = row0 + g + 8;
  const bool ok_a = active && ra < n, ok_b = active && rb < n;
  const int kblocks = k / 32;
  const int chunks = (kblocks + 3) / 4;
  const int c0 = blockIdx.y * chunks_per_split;
  const int c1 = min(chunks, c0 + chunks_per_split);
  if (c0 >= c1) return;
  const size_t row_bytes = static_cast<size_t>(k) / 2;
  const uint8_t* wa = grp.w + static_cast<size_t>(ok_a ? ra : 0) * row_bytes;
  const uint8_t* wb = grp.w + static_cast<size_t>(ok_b ? rb : 0) * row_bytes;
  const uint8_t* sa_row = grp.scales + static_cast<size_t>(ok_a ? ra : 0) * static_cast<size_t>(kblocks);
  const uint8_t* sb_row = grp.scales + static_cast<size_t>(ok_b ? rb : 0) * static_cast<size_t>(kblocks);
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;

  for (int cb = c0; cb < c1; cb += kBatch) {
    const int nc = min(kBatch, c1 - cb);
    uint4 a[kBatch], b[kBatch];
    uint32_t sa[kBatch], sb[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      a[i] = b[i] = make_uint4(0, 0, 0, 0);
      sa[i] = sb[i] = 0;
      const int blk = (cb + i) * 4 + t;
      if (i < nc && blk < kblocks) {
        if (ok_a) {
          a[i] = load_stream_v4(wa + static_cast<size_t>(blk) * 16);
          sa[i] = sa_row[blk];
        }
        if (ok_b) {
          b[i] = load_stream_v4(wb + static_cast<size_t>(blk) * 16);
          sb[i] = sb_row[blk];
        }
      }
    }
    // Stage x[tokens][chunks cb .. cb + nc) (zeros past m and past K). Within a chunk, MX block u / 4's 16-byte
    // quarter q is stored at q ^ (bit 1 of the block): lanes t and t + 2 then hit different banks.
    __syncthreads();
    const int per_row = nc * 16;
    for (int idx = threadIdx.x; idx < NT * 8 * per_row; idx += blockDim.x) {
      const int tok = idx / per_row, rem = idx % per_row;
      const int ci = rem / 16, u = rem % 16, blk_in = u / 4, q = u % 4;
      const int kb = (cb + ci) * 4 + blk_in;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (tok < grp.m && kb < kblocks)
        v = __ldg(reinterpret_cast<const uint4*>(grp.x + static_cast<size_t>(tok) * k + static_cast<size_t>(kb) * 32) +
                  q);
      xs[tok * kXStride + ci * 16 + blk_in * 4 + (q ^ ((blk_in >> 1) & 1))] = v;
    }
    __syncthreads();
    if (!active) continue;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (i >= nc) break;
      uint4 xv[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) xv[j][q] = xs[(j * 8 + g) * kXStride + i * 16 + t * 4 + (q ^ ((t >> 1) & 1))];
      const uint32_t sa2 = scale_bf16x2(sa[i]), sb2 = scale_bf16x2(sb[i]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        uint32_t pa[4], pb[4];
        dequant_word(word(a[i], q), sa2, pa);
        dequant_word(word(b[i], q), sb2, pb);
#pragma unroll
        for (int ss = 0; ss < 2; ++ss) {
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const uint32_t b0 = word(xv[j][q], 2 * ss), b1 = word(xv[j][q], 2 * ss + 1);
            mma_bf16(acc[j], pa[2 * ss], pb[2 * ss], pa[2 * ss + 1], pb[2 * ss + 1], b0, b1);
          }
        }
      }
    }
  }
  if (!active) return;

  const bool atomic = gridDim.y > 1;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = j * 8 + 2 * t + (i & 1);
      const int row = (i < 2) ? ra : rb;
      if (tok >= grp.m || row >= n) continue;
      float* dst = grp.y + static_cast<size_t>(tok) * static_cast<size_t>(grp.ldy) + static_cast<size_t>(row);
      if (atomic) {
        atomicAdd(dst, acc[j][i]);
      } else {
        *dst = acc[j][i];
      }
    }
  }
}

}  // namespace

int mxfp4_gemv_k_split(int n, int k, int num_groups, int multiprocessors) {
  const int row_blocks = (n + kRowsPerCta - 1) / kRowsPerCta;
  const int chunks = (k / 32 + 3) / 4;
  const long ctas = static_cast<long>(row_blocks) * num_groups;
  const long target = 2L * multiprocessors;  // two CTAs of 8 warps fit per SM (<= 128 registers)
  if (ctas >= target) return 1;
  int split = static_cast<int>((target + ctas - 1) / ctas);
  if (split > chunks) split = chunks;
  const int per = (chunks + split - 1) / split;
  return (chunks + per - 1) / per;
}

cudaError_t launch_mxfp4_gemv(const Mxfp4GemvGroup* groups, int num_groups, int max_m, int n, int k, int k_split,
                              cudaStream_t stream) {
  if (num_groups == 0 || n == 0) return cudaSuccess;
  if (k % 32 != 0 || max_m < 1 || max_m > 16 || k_split < 1) return cudaErrorInvalidValue;
  const int chunks = (k / 32 + 3) / 4;
  const int per = (chunks + k_split - 1) / k_split;
  const dim3 grid((n + kRowsPerCta - 1) / kRowsPerCta, (chunks + per - 1) / per, num_groups);
  if (max_m <= 8) {
    mxfp4_gemv_kernel<1><<<grid, kWarps * 32, 8 * kXStride * sizeof(uint4), stream>>>(groups, n, k, per);
  } else {
    mxfp4_gemv_kernel<2><<<grid, kWarps * 32, 16 * kXStride * sizeof(uint4), stream>>>(groups, n, k, per);
  }
  return cudaGetLastError();
}

}  // namespace mxlm::backend::cuda
