// Version 4 of the MXFP4 GEMV (laboratory; included by gemv_lab.cu after its helpers).
//
// What the session-3 traces of version 3 said: the weights of a PDL-chained launch land ~1 µs after its predecessor
// ends, then ~1.8 µs go to partial sums and cluster barriers of the K split, and CTAs that share their SM with a
// second CTA of the same launch (40-90 % of them, placement) take twice as long for their math. So here:
//  - one CTA per 16 weight rows over the WHOLE K: no split across CTAs, hence no partials in global or
//    distributed shared memory, no memset, no atomics, no cluster barriers; the CTA's W warps take K / W each and
//    add their partials in shared memory in warp order (deterministic);
//  - many small CTAs (N / 16 = 192 or 384 on the expert shapes, 49 or 25 KB of weights each) instead of one per SM,
//    so an SM that holds two of them simply holds a larger share of equal pieces;
//  - per-lane cp.async of exactly the 16-byte MX blocks a lane multiplies, one commit group per chunk, issued before
//    griddepcontrol.wait (weights never depend on the previous kernel), so the math of chunk c starts as soon as
//    chunk c has landed;
//  - activations of the real tokens only (lanes of tokens >= m feed zeros to the MMA), staged per warp for the
//    warp's own chunks after the wait.
// Math: version 1's (cuda_mxfp4_mma.cuh), swap AB, two accumulator chains.
#pragma once

namespace gemv4 {

constexpr int kMaxTokens = 8;

template <int N>
__device__ __forceinline__ void cp_async_wait_pending() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
// Wait until commit group c of CH (chunk c) has landed.
template <int CH, int C = 0>
__device__ __forceinline__ void wait_chunk(int c) {
  if constexpr (C < CH) {
    if (c == C) {
      cp_async_wait_pending<CH - 1 - C>();
    } else {
      wait_chunk<CH, C + 1>(c);
    }
  }
}

// Shared memory: weights [W][CH][16 rows][4 uint4] (lane (g, t) copies and reads slots [row g / g + 8][t]), scale
// words [W][CH][16 rows] (4 bytes = the chunk's 4 MX blocks), activations [W][m][XS] (a warp's chunks; kLoad 0/2:
// v1 swizzle, pre-paired; kLoad 3: raw rows); partials [W][16][8] f32 aliasing the weights at the end.
template <int CH>
__host__ __device__ constexpr int x_stride() {
  return CH * 16 + 1;  // uint4 per staged token row; odd, so that token rows fall in different banks
}
template <int W, int CH>
constexpr size_t smem_bytes(int m) {
  return static_cast<size_t>(W) * CH * 64 * 16 + static_cast<size_t>(W) * CH * 16 * 4 +
         static_cast<size_t>(W) * m * x_stride<CH>() * 16;
}

// kLoad 0: weights and scales by per-lane cp.async before griddepcontrol.wait, activations by plain loads after it;
// 2: as 0 but only the first half of the chunks before the wait, the rest after the activation loads are issued;
// 3: as 0 but the activations by one bulk copy (TMA engine) per token row, so that they do not queue behind the
// weights in the SM's load path.
template <int W, int CH, int kLoad>
__global__ void __launch_bounds__(W * 32, 3) gemv4_kernel(Gemv p, int flags) {
  constexpr int XS = x_stride<CH>();
  constexpr int kHalf = (CH + 1) / 2;  // chunks queued before the wait (kLoad 2)
  extern __shared__ __align__(128) uint4 smem[];
  __shared__ __align__(8) uint64_t xbar[W];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16;
  const int c0 = warp * CH;  // this warp's first 128-wide chunk
  const size_t row_bytes = static_cast<size_t>(p.k) / 2;
  const int ra = row0 + g, rb = row0 + g + 8;
  const bool ok_a = ra < p.n, ok_b = rb < p.n;
  uint4* wl = smem + warp * CH * 64;
  uint32_t* sc = reinterpret_cast<uint32_t*>(smem + W * CH * 64) + warp * CH * 16;
  uint4* xw = smem + W * CH * 64 + W * CH * 4 + warp * p.m * XS;

  TRACE(0);
  if (p.trace != nullptr && threadIdx.x == 0) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    p.trace[(static_cast<size_t>(p.launch) * gridDim.x + blockIdx.x) * kTracePoints + 7] = smid;
  }
  if (kLoad == 3 && lane == 0) {
    mbar_init(&xbar[warp], 1u);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  const uint8_t* wa = p.w + static_cast<size_t>(ok_a ? ra : 0) * row_bytes + static_cast<size_t>(c0) * 64 + t * 16;
  const uint8_t* wb = p.w + static_cast<size_t>(ok_b ? rb : 0) * row_bytes + static_cast<size_t>(c0) * 64 + t * 16;
  // Lanes t = 0 / 1 also copy the chunk's scale word of row g / g + 8 into the chunk's group.
  const int srow = t == 0 ? ra : rb;
  const bool s_ok = t < 2 && srow < p.n;
  const uint8_t* sp = p.scales + static_cast<size_t>(s_ok ? srow : 0) * (p.k / 32) + static_cast<size_t>(c0) * 4;
  auto issue_chunks = [&](int from, int to) {
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      if (c < from || c >= to) continue;
      if (ok_a) cp_async_16(wl + c * 64 + g * 4 + t, wa + c * 64);
      if (ok_b) cp_async_16(wl + c * 64 + (g + 8) * 4 + t, wb + c * 64);
      if (s_ok) asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(sc + c * 16 + g + 8 * t)),
                             "l"(sp + c * 4) : "memory");
      asm volatile("cp.async.commit_group;" ::: "memory");
    }
  };
  issue_chunks(0, kLoad == 2 ? kHalf : CH);
  __syncwarp();
  // Where this CTA lets the next kernel's CTAs start (they queue their weights at once): before the wait (default),
  // after this CTA's activation loads are issued (their prefetch then queues behind those loads), after the
  // activations are staged, or after the math.
  const bool trigger_early = !(flags & (kFlagTriggerAfterMath | kFlagTriggerAfterX | kFlagTriggerAfterXStaged));
  if (trigger_early) pdl_launch_dependents();
  pdl_wait();  // activations and the output belong to the previous kernel's world from here on
  TRACE(1);

  if constexpr (kLoad == 3) {
    if (lane == 0) mbar_expect_tx(&xbar[warp], static_cast<uint32_t>(p.m) * CH * 256u);
    __syncwarp();
    if (lane < p.m)
      bulk_copy(xw + lane * XS, p.x + static_cast<size_t>(lane) * p.k + static_cast<size_t>(c0) * 128,
                CH * 256u, &xbar[warp]);
    mbar_wait(&xbar[warp], 0);
  } else {
    // Activations of the warp's chunks, real tokens only: all loads of a batch before its stores.
    const int items = p.m * CH * 16;
    constexpr int kBatch = 8;
    for (int base = 0; base < items; base += 32 * kBatch) {
      uint4 v[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int idx = base + j * 32 + lane;
        v[j] = make_uint4(0, 0, 0, 0);
        if (idx < items) {
          const int tok = idx / (CH * 16), rem = idx % (CH * 16);
          const int c = rem / 16, u = rem % 16, b = u / 4, q = u % 4;
          v[j] = *reinterpret_cast<const uint4*>(p.x + static_cast<size_t>(tok) * p.k +
                                                 static_cast<size_t>(c0 + c) * 128 + b * 32 + q * 8);
        }
      }
      if (base == 0 && (flags & kFlagTriggerAfterX)) pdl_launch_dependents();
      if (kLoad == 2 && base == 0) issue_chunks(kHalf, CH);
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int idx = base + j * 32 + lane;
        if (idx < items) {
          const int tok = idx / (CH * 16), rem = idx % (CH * 16);
          const int c = rem / 16, u = rem % 16, b = u / 4, q = u % 4;
          uint32_t xp[4];
          pair_x(v[j], xp);
          xw[tok * XS + c * 16 + b * 4 + (q ^ ((b >> 1) & 1))] = make_uint4(xp[0], xp[1], xp[2], xp[3]);
        }
      }
    }
    if (items == 0 && (flags & kFlagTriggerAfterX)) pdl_launch_dependents();
    if (kLoad == 2 && items == 0) issue_chunks(kHalf, CH);
  }
  __syncwarp();
  if (flags & kFlagTriggerAfterXStaged) pdl_launch_dependents();
  TRACE(2);

  float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
  const bool has_x = g < p.m;
  if (!(flags & kFlagNoMath)) {
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      wait_chunk<CH>(c);
      __syncwarp();  // the scale words were copied by lanes t = 0, 1
      uint32_t xp[4][4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if constexpr (kLoad == 3) {
          const uint4 v = has_x ? xw[g * XS + c * 16 + t * 4 + q] : make_uint4(0, 0, 0, 0);
          pair_x(v, xp[q]);
        } else {
          const uint4 v = has_x ? xw[g * XS + c * 16 + t * 4 + (q ^ ((t >> 1) & 1))] : make_uint4(0, 0, 0, 0);
          xp[q][0] = v.x;
          xp[q][1] = v.y;
          xp[q][2] = v.z;
          xp[q][3] = v.w;
        }
      }
      const uint4 a = wl[c * 64 + g * 4 + t];
      const uint4 b = wl[c * 64 + (g + 8) * 4 + t];
      const uint32_t sa = (sc[c * 16 + g] >> (8 * t)) & 0xffu;
      const uint32_t sb = (sc[c * 16 + g + 8] >> (8 * t)) & 0xffu;
      const bool capped = scale_capped(sa) || scale_capped(sb);
      auto chunk_math = [&](auto capped_tag) {
        constexpr bool kCapped = decltype(capped_tag)::value;
        const uint32_t fa = scale_first(sa), fb = scale_first(sb);
        const uint32_t ca = kCapped ? scale_second(sa) : 0u, cb = kCapped ? scale_second(sb) : 0u;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          uint32_t pa[4], pb[4];
          dequant_word<kCapped>(word(a, q), fa, ca, pa);
          dequant_word<kCapped>(word(b, q), fb, cb, pb);
#pragma unroll
          for (int ss = 0; ss < 2; ++ss)
            mma_bf16(acc[ss], pa[2 * ss], pb[2 * ss], pa[2 * ss + 1], pb[2 * ss + 1], xp[q][2 * ss],
                     xp[q][2 * ss + 1]);
        }
      };
      if (__any_sync(0xffffffffu, capped)) {
        chunk_math(std::true_type{});
      } else {
        chunk_math(std::false_type{});
      }
    }
  } else {
    asm volatile("cp.async.wait_all;" ::: "memory");
  }
  TRACE(3);
  __syncthreads();  // every warp is done with its weights: the partials reuse that memory
  float* part = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int tok = 2 * t + (i & 1), row = g + (i >= 2 ? 8 : 0);
    part[(warp * 16 + row) * kMaxTokens + tok] = acc[0][i] + acc[1][i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < 16 * p.m; idx += W * 32) {
    const int row = idx % 16, tok = idx / 16;
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < W; ++w) s += part[(w * 16 + row) * kMaxTokens + tok];
    if (row0 + row < p.n) p.y[static_cast<size_t>(tok) * p.ldy + row0 + row] = s;
  }
  if (flags & kFlagTriggerAfterMath) pdl_launch_dependents();
  TRACE(5);
}

// Version 4, 8-row CTAs ("rows8"): the same pipeline with the MMA not swapped (activations as A, tokens 0..7 in its
// rows; weights as B, 8 weight rows in its columns), so a CTA owns 8 weight rows over the whole K: twice the CTAs
// (384 / 768 on the expert shapes), half the math per CTA, for an even spread over 132 SMs (192 CTAs of 16 rows put
// two on 60 SMs and one on the rest, and the doubled math on those sets the launch's time).
template <int W, int CH>
__global__ void __launch_bounds__(W * 32, W >= 12 ? 2 : 4) gemv4r8_kernel(Gemv p, int flags) {
  constexpr int XS = x_stride<CH>();
  extern __shared__ __align__(128) uint4 smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 8;
  const int c0 = warp * CH;
  const size_t row_bytes = static_cast<size_t>(p.k) / 2;
  const int row = row0 + g;
  const bool ok = row < p.n;
  uint4* wl = smem + warp * CH * 32;
  uint32_t* sc = reinterpret_cast<uint32_t*>(smem + W * CH * 32) + warp * CH * 8;
  uint4* xw = smem + W * CH * 32 + W * CH * 2 + warp * p.m * XS;

  TRACE(0);
  if (p.trace != nullptr && threadIdx.x == 0) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    p.trace[(static_cast<size_t>(p.launch) * gridDim.x + blockIdx.x) * kTracePoints + 7] = smid;
  }
  const uint8_t* wr = p.w + static_cast<size_t>(ok ? row : 0) * row_bytes + static_cast<size_t>(c0) * 64 + t * 16;
  const uint8_t* sp = p.scales + static_cast<size_t>(ok ? row : 0) * (p.k / 32) + static_cast<size_t>(c0) * 4;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    if (ok) cp_async_16(wl + c * 32 + g * 4 + t, wr + c * 64);
    if (ok && t == 0)
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(sc + c * 8 + g)), "l"(sp + c * 4)
                   : "memory");
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  const bool trigger_early = !(flags & (kFlagTriggerAfterMath | kFlagTriggerAfterX | kFlagTriggerAfterXStaged));
  if (trigger_early) pdl_launch_dependents();
  pdl_wait();
  TRACE(1);
  {
    const int items = p.m * CH * 16;
    constexpr int kBatch = 8;
    for (int base = 0; base < items; base += 32 * kBatch) {
      uint4 v[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int idx = base + j * 32 + lane;
        v[j] = make_uint4(0, 0, 0, 0);
        if (idx < items) {
          const int tok = idx / (CH * 16), rem = idx % (CH * 16);
          v[j] = *reinterpret_cast<const uint4*>(p.x + static_cast<size_t>(tok) * p.k + static_cast<size_t>(c0) * 128 +
                                                 static_cast<size_t>(rem) * 8);
        }
      }
      if (base == 0 && (flags & kFlagTriggerAfterX)) pdl_launch_dependents();
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int idx = base + j * 32 + lane;
        if (idx < items) {
          const int tok = idx / (CH * 16), rem = idx % (CH * 16);
          const int c = rem / 16, u = rem % 16, b = u / 4, q = u % 4;
          uint32_t xp[4];
          pair_x(v[j], xp);
          xw[tok * XS + c * 16 + b * 4 + (q ^ ((b >> 1) & 1))] = make_uint4(xp[0], xp[1], xp[2], xp[3]);
        }
      }
    }
  }
  __syncwarp();
  if (flags & kFlagTriggerAfterXStaged) pdl_launch_dependents();
  TRACE(2);
  float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
  const bool has_x = g < p.m;
  if (!(flags & kFlagNoMath)) {
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      wait_chunk<CH>(c);
      __syncwarp();  // the scale words were copied by lanes t = 0
      uint4 xv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q)
        xv[q] = has_x ? xw[g * XS + c * 16 + t * 4 + (q ^ ((t >> 1) & 1))] : make_uint4(0, 0, 0, 0);
      const uint4 wv = wl[c * 32 + g * 4 + t];
      const uint32_t sw = (sc[c * 8 + g] >> (8 * t)) & 0xffu;
      auto chunk_math = [&](auto capped_tag) {
        constexpr bool kCapped = decltype(capped_tag)::value;
        const uint32_t f = scale_first(sw), f2 = kCapped ? scale_second(sw) : 0u;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          uint32_t pw[4];
          dequant_word<kCapped>(word(wv, q), f, f2, pw);
          const uint32_t xq[4] = {xv[q].x, xv[q].y, xv[q].z, xv[q].w};
#pragma unroll
          for (int ss = 0; ss < 2; ++ss) mma_bf16(acc[ss], xq[2 * ss], 0u, xq[2 * ss + 1], 0u, pw[2 * ss], pw[2 * ss + 1]);
        }
      };
      if (__any_sync(0xffffffffu, scale_capped(sw))) {
        chunk_math(std::true_type{});
      } else {
        chunk_math(std::false_type{});
      }
    }
  } else {
    asm volatile("cp.async.wait_all;" ::: "memory");
  }
  TRACE(3);
  __syncthreads();
  float* part = reinterpret_cast<float*>(smem);  // [W][8 rows][8 tokens], aliasing the weights
  if (g < kMaxTokens) {
    part[(warp * 8 + 2 * t) * kMaxTokens + g] = acc[0][0] + acc[1][0];
    part[(warp * 8 + 2 * t + 1) * kMaxTokens + g] = acc[0][1] + acc[1][1];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < 8 * p.m; idx += W * 32) {
    const int r = idx % 8, tok = idx / 8;
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < W; ++w) s += part[(w * 8 + r) * kMaxTokens + tok];
    if (row0 + r < p.n) p.y[static_cast<size_t>(tok) * p.ldy + row0 + r] = s;
  }
  if (flags & kFlagTriggerAfterMath) pdl_launch_dependents();
  TRACE(5);
}

struct Variant4 {
  const char* name;
  void (*kernel)(Gemv, int);
  int warps, ch;  // chunks per warp: this variant serves K = warps * ch * 128
  size_t (*smem)(int m);
  int rows = 16;  // weight rows per CTA
};

template <int W, int CH>
Variant4 make_rows8() {
  auto* k = gemv4r8_kernel<W, CH>;
  CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  return {"rows8", k, W, CH,
          [](int m) {
            return static_cast<size_t>(W) * CH * (32 + 2) * 16 + static_cast<size_t>(W) * m * x_stride<CH>() * 16;
          },
          8};
}

template <int W, int CH, int kLoad>
Variant4 make() {
  auto* k = gemv4_kernel<W, CH, kLoad>;
  CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  static const char* names[4] = {"cpasync", "-", "split", "x by TMA"};
  return {names[kLoad], k, W, CH, [](int m) { return smem_bytes<W, CH>(m); }};
}

inline cudaError_t launch(const Variant4& v, const Gemv& p, bool pdl, int flags, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((p.n + v.rows - 1) / v.rows);
  cfg.blockDim = dim3(v.warps * 32);
  cfg.dynamicSmemBytes = v.smem(p.m);
  cfg.stream = stream;
  cudaLaunchAttribute attrs[1];
  attrs[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  cfg.attrs = attrs;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, v.kernel, p, flags);
}

}  // namespace gemv4
