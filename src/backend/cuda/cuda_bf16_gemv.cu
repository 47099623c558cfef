// bf16-weight GEMV for decode-sized steps (1..kBf16GemvMaxTokens tokens): y = bf16(x) · Wᵀ with the weights read
// straight into the registers that feed the tensor cores (a bf16 weight needs no decode, so each lane loads exactly
// the A fragments it multiplies), the first batch of them before griddepcontrol.wait (Programmatic Dependent Launch:
// the previous kernel still runs), the next batch while the current one is multiplied; the f32 activations are rounded
// to bf16 as they are loaded (no conversion kernel in front). cuBLAS took ~10 us (split-K + its reduce kernel) for
// the 6 MB projections of a MiniMax-M3 decode step and needed that conversion kernel before every GEMM.
//
// CTA = 8 (or 16) warps on 16 weight rows; warp w takes its share of K and adds its partials in shared memory in warp
// order (deterministic). Within a 32-wide block of K, lane (g, t) loads 8 consecutive weights of rows g and g + 8 at 8t
// .. 8t + 7 and the activations of token g at the same columns; the first MMA takes columns 8t .. 8t + 3 of every lane,
// the second 8t + 4 .. 8t + 7 (a permutation of K inside the block, the same for both operands).
#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/cuda_device_math.cuh"
#include "backend/cuda/cuda_kernels.h"
#include "backend/cuda/cuda_launch.cuh"
#include "backend/cuda/cuda_mxfp4_mma.cuh"

namespace mxlm::backend::cuda {

namespace {

// Warps per CTA: 8, or 16 where the weight rows give fewer than two 8-warp CTAs per SM (the k / v projections: 32
// CTAs for 512 rows), so that those few SMs hold twice the loads in flight. Blocks of 32 columns per lane per batch:
// 2 x 4 uint4 of weights in flight.
constexpr int kWarps = 8, kWideWarps = 16, kBatch = 4;

// A group's weight for this CTA: the last problem whose first CTA is at or before it (selects over the parameter
// arrays: a runtime index into them would copy them to local memory).
template <int W>
__global__ void __launch_bounds__(W * 32, 16 / W)
    bf16_gemv_kernel(Bf16GemvGroup group, const float* x, int m, int k) {
  const uint16_t* w = group.w[0];
  float* y = group.y[0];
  int n = group.n[0], first = 0;
#pragma unroll
  for (int i = 1; i < kBf16GemvMaxGroup; ++i) {
    if (i < group.count && static_cast<int>(blockIdx.x) >= group.first_cta[i]) {
      w = group.w[i];
      y = group.y[i];
      n = group.n[i];
      first = group.first_cta[i];
    }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = (static_cast<int>(blockIdx.x) - first) * 16;
  const int ra = min(row0 + g, n - 1), rb = min(row0 + g + 8, n - 1);  // rows past n load row n - 1, unused
  const int kw = k / W, blocks = kw / 32;
  const size_t kbeg = static_cast<size_t>(warp) * kw + 8 * t;
  const uint16_t* pa = w + static_cast<size_t>(ra) * k + kbeg;
  const uint16_t* pb = w + static_cast<size_t>(rb) * k + kbeg;
  uint4 cur_a[kBatch], cur_b[kBatch], nxt_a[kBatch], nxt_b[kBatch];
  auto load = [&](uint4* a, uint4* b, int blk0) {
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int blk = min(blk0 + j, blocks - 1);  // past the slice: a repeat, not multiplied
      a[j] = load_stream_v4(pa + blk * 32);
      b[j] = load_stream_v4(pb + blk * 32);
    }
  };
  load(cur_a, cur_b, 0);
  pdl_wait();
  pdl_launch_dependents();
  const bool has_x = g < m;
  const float* xr = x + static_cast<size_t>(has_x ? g : 0) * k + kbeg;
  float acc0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int blk0 = 0; blk0 < blocks; blk0 += kBatch) {
    if (blk0 + kBatch < blocks) load(nxt_a, nxt_b, blk0 + kBatch);
    float4 xlo[kBatch], xhi[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      xlo[j] = xhi[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (has_x && blk0 + j < blocks) {
        xlo[j] = *reinterpret_cast<const float4*>(xr + (blk0 + j) * 32);
        xhi[j] = *reinterpret_cast<const float4*>(xr + (blk0 + j) * 32 + 4);
      }
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (blk0 + j >= blocks) break;
      mma_bf16(acc0, cur_a[j].x, cur_b[j].x, cur_a[j].y, cur_b[j].y, pack_bf16x2(xlo[j].x, xlo[j].y),
               pack_bf16x2(xlo[j].z, xlo[j].w));
      mma_bf16(acc1, cur_a[j].z, cur_b[j].z, cur_a[j].w, cur_b[j].w, pack_bf16x2(xhi[j].x, xhi[j].y),
               pack_bf16x2(xhi[j].z, xhi[j].w));
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      cur_a[j] = nxt_a[j];
      cur_b[j] = nxt_b[j];
    }
  }
  // D: rows g, g + 8 x tokens 2t, 2t + 1.
  __shared__ float part[W][16][8];
#pragma unroll
  for (int i = 0; i < 4; ++i) part[warp][g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = acc0[i] + acc1[i];
  __syncthreads();
  for (int idx = threadIdx.x; idx < 16 * m; idx += W * 32) {
    const int row = idx % 16, tok = idx / 16;
    float s = 0.0f;
#pragma unroll
    for (int wi = 0; wi < W; ++wi) s += part[wi][row][tok];
    if (row0 + row < n) y[static_cast<size_t>(tok) * n + row0 + row] = s;
  }
}

}  // namespace

bool bf16_gemv_supports(int n, int k, int m) {
  return n >= 1 && m >= 1 && m <= kBf16GemvMaxTokens && k >= 32 * kWarps && k % (32 * kWarps) == 0;
}

cudaError_t launch_bf16_gemv_group(const Bf16GemvGroup& group, const float* x, int m, int k, int sms, bool pdl,
                                   cudaStream_t stream) {
  if (group.count < 1 || group.count > kBf16GemvMaxGroup || reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return cudaErrorInvalidValue;
  Bf16GemvGroup g = group;
  unsigned ctas = 0;
  for (int i = 0; i < g.count; ++i) {
    if (!bf16_gemv_supports(g.n[i], k, m) || reinterpret_cast<uintptr_t>(g.w[i]) % 16 != 0 || g.y[i] == nullptr)
      return cudaErrorInvalidValue;
    g.first_cta[i] = static_cast<int>(ctas);
    ctas += static_cast<unsigned>((g.n[i] + 15) / 16);
  }
  if (ctas < 2u * static_cast<unsigned>(sms) && k % (32 * kWideWarps) == 0)
    return launch_kernel(bf16_gemv_kernel<kWideWarps>, dim3(ctas), dim3(kWideWarps * 32), 0, stream, pdl, g, x, m, k);
  return launch_kernel(bf16_gemv_kernel<kWarps>, dim3(ctas), dim3(kWarps * 32), 0, stream, pdl, g, x, m, k);
}

cudaError_t launch_bf16_gemv(const uint16_t* w, const float* x, float* y, int n, int m, int k, int sms, bool pdl,
                             cudaStream_t stream) {
  Bf16GemvGroup one;
  one.w[0] = w;
  one.y[0] = y;
  one.n[0] = n;
  one.count = 1;
  return launch_bf16_gemv_group(one, x, m, k, sms, pdl, stream);
}

}  // namespace mxlm::backend::cuda
