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
// E2M1 -> bf16 by bit placement: the code's e1 e0 m bits go to bf16 bits 8..6 and its sign to bit 15, which is
// the bf16 number value * 2^-126 (code 1 = 0.5 lands on the bf16 subnormal 2^-127, exactly as wanted); one bf16x2
// multiply by 2^126 * scale = 2^(s-1) then gives value * scale exactly (powers of two). Scale bytes 129..254 would
// need 2^(s-1) >= 2^128: such chunks take a second multiply (warp-uniform branch, never taken on real weights).
// A register pairs nibbles p and p + 4 of a 32-bit word (both halves need the same shift), so the activations are
// paired the same way (four byte-permutes per 8 values after the shared-memory load).
//
// The activation slice of a batch is staged with cp.async issued before the weight loads, so it arrives ahead of
// the weight stream and every chunk's math can start as soon as that chunk's weights land.
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

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
__device__ __forceinline__ bool scale_capped(uint32_t s) { return s > 128u && s != 255u; }
__device__ __forceinline__ uint32_t scale_second(uint32_t s) {
  const uint32_t bits = scale_capped(s) ? s << 7 : 0x3f80u;
  return bits | (bits << 16);
}

// 8 E2M1 codes (one 32-bit word, element i in nibble i) to four bf16x2 registers: out[p] = (element p, element
// p + 4) times the scale.
template <bool kCapped>
__device__ __forceinline__ void dequant_word(uint32_t w, uint32_t first, uint32_t second, uint32_t out[4]) {
  constexpr uint32_t kMag = 0x01c001c0u, kSign = 0x80008000u;
  out[0] = ((w << 6) & kMag) | ((w << 12) & kSign);
  out[1] = ((w << 2) & kMag) | ((w << 8) & kSign);
  out[2] = ((w >> 2) & kMag) | ((w << 4) & kSign);
  out[3] = ((w >> 6) & kMag) | (w & kSign);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[i] = bf16x2_mul(out[i], first);
    if (kCapped) out[i] = bf16x2_mul(out[i], second);
  }
}

// Eight bf16 activations (pairs (0,1) .. (6,7) in x..w) re-paired as (0,4), (1,5), (2,6), (3,7) to match.
__device__ __forceinline__ void pair_x(const uint4& v, uint32_t out[4]) {
  out[0] = __byte_perm(v.x, v.z, 0x5410);
  out[1] = __byte_perm(v.x, v.z, 0x7632);
  out[2] = __byte_perm(v.y, v.w, 0x5410);
  out[3] = __byte_perm(v.y, v.w, 0x7632);
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: zero-fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

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

// Chunks whose weight loads are all issued before the first is used (memory-level parallelism). Four keep the
// kernel at <= 80 registers, so three CTAs of 8 warps share an SM: with two (kBatch 8, 124 registers) Nsight
// Compute showed 0.8 eligible warps per scheduler and 25 % of DRAM bandwidth.
constexpr int kBatch = 4;
constexpr int kXStride = kBatch * 16 + 2;  // uint4 per staged token row: 256 B per chunk + 32 B pad (banks)

template <int NT>  // token tiles of 8
__global__ void __launch_bounds__(kWarps * 32, 3)
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
    // Stage x[tokens][chunks cb .. cb + nc) (zeros past m and past K) first: the copies queue ahead of this
    // batch's weight loads. Within a chunk, MX block u / 4's 16-byte quarter q is stored at q ^ (bit 1 of the
    // block): lanes t and t + 2 then hit different banks.
    __syncthreads();  // the previous batch's readers are done with xs
    const int per_row = nc * 16;
    for (int idx = threadIdx.x; idx < NT * 8 * per_row; idx += blockDim.x) {
      const int tok = idx / per_row, rem = idx % per_row;
      const int ci = rem / 16, u = rem % 16, blk_in = u / 4, q = u % 4;
      const int kb = (cb + ci) * 4 + blk_in;
      const bool valid = tok < grp.m && kb < kblocks;
      const uint16_t* src = valid ? grp.x + static_cast<size_t>(tok) * k + static_cast<size_t>(kb) * 32 + q * 8 : grp.x;
      cp_async_16(&xs[tok * kXStride + ci * 16 + blk_in * 4 + (q ^ ((blk_in >> 1) & 1))], src, valid);
    }
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
    cp_async_wait_all();
    __syncthreads();
    if (!active) continue;
    bool capped = false;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) capped |= scale_capped(sa[i]) || scale_capped(sb[i]);
    auto batch_math = [&](auto capped_tag) {
      constexpr bool kCapped = decltype(capped_tag)::value;
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        if (i >= nc) break;
        uint4 xv[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int q = 0; q < 4; ++q) xv[j][q] = xs[(j * 8 + g) * kXStride + i * 16 + t * 4 + (q ^ ((t >> 1) & 1))];
        const uint32_t fa = scale_first(sa[i]), fb = scale_first(sb[i]);
        const uint32_t ca = kCapped ? scale_second(sa[i]) : 0u, cb2 = kCapped ? scale_second(sb[i]) : 0u;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          uint32_t pa[4], pb[4];
          dequant_word<kCapped>(word(a[i], q), fa, ca, pa);
          dequant_word<kCapped>(word(b[i], q), fb, cb2, pb);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            uint32_t xp[4];
            pair_x(xv[j][q], xp);
#pragma unroll
            for (int ss = 0; ss < 2; ++ss)
              mma_bf16(acc[j], pa[2 * ss], pb[2 * ss], pa[2 * ss + 1], pb[2 * ss + 1], xp[2 * ss], xp[2 * ss + 1]);
          }
        }
      }
    };
    if (__any_sync(0xffffffffu, capped)) {
      batch_math(std::true_type{});
    } else {
      batch_math(std::false_type{});
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
  const long target = 3L * multiprocessors;  // three CTAs of 8 warps fit per SM (<= 80 registers)
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
