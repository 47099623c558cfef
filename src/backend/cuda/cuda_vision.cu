// Kernels of the vision encoder ops (backend.h "vision encoder"): bias, LayerNorm, exact GELU, the table rotary
// and the row softmax between the two cuBLAS batched GEMMs of segment attention (cuda_vision.cpp; f32 in, f32 or
// bf16 probabilities out). All
// memory-bound single passes in f32, like the CPU backend's versions (cpu_vision_ops.cpp).
#include <cuda_bf16.h>

#include <cfloat>
#include <cstdint>

#include "backend/cuda/cuda_kernels.h"

namespace mxlm::backend::cuda {

namespace {

constexpr int kThreads = 256;

unsigned grid_for(size_t n) {
  size_t b = (n + kThreads - 1) / kThreads;
  if (b > (1u << 20)) b = 1u << 20;  // grid-stride loops cover the rest
  return static_cast<unsigned>(b == 0 ? 1 : b);
}

// Block-wide sum (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* part) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();  // `part` may still be read from a previous call
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = (threadIdx.x & 31) < (blockDim.x >> 5) ? part[threadIdx.x & 31] : 0.0f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
  return t;
}

__device__ __forceinline__ float block_max(float v, float* part) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = (threadIdx.x & 31) < (blockDim.x >> 5) ? part[threadIdx.x & 31] : -FLT_MAX;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, off));
  return t;
}

__global__ void add_bias_kernel(float* y, const float* bias, size_t rows, size_t cols) {
  const size_t n = rows * cols;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    y[i] += bias[i % cols];
}

// One block per row: mean, then the variance around it (two passes, as the CPU backend), then the output.
__global__ void layer_norm_kernel(const float* x, const float* w, const float* b, float* out, size_t dim, float eps) {
  __shared__ float part[32];
  const float* xr = x + blockIdx.x * dim;
  float* o = out + blockIdx.x * dim;
  float s = 0.0f;
  for (size_t i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i];
  const float mean = block_sum(s, part) / static_cast<float>(dim);
  float v = 0.0f;
  for (size_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float d = xr[i] - mean;
    v += d * d;
  }
  const float var = block_sum(v, part) / static_cast<float>(dim);
  const float inv = 1.0f / sqrtf(var + eps);
  for (size_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = (xr[i] - mean) * inv * w[i] + b[i];
}

__global__ void gelu_erf_kernel(float* x, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
  }
}

// One block per token; threads over (head, pair).
__global__ void rope_table_kernel(float* x, const float* cos, const float* sin, int heads, int head_dim, int pairs) {
  const size_t t = blockIdx.x;
  const float* c = cos + t * static_cast<size_t>(pairs);
  const float* s = sin + t * static_cast<size_t>(pairs);
  for (int i = threadIdx.x; i < heads * pairs; i += blockDim.x) {
    const int h = i / pairs, k = i % pairs;
    float* v = x + (t * static_cast<size_t>(heads) + static_cast<size_t>(h)) * static_cast<size_t>(head_dim);
    const float a = v[k], bb = v[k + pairs];
    v[k] = a * c[k] - bb * s[k];
    v[k + pairs] = bb * c[k] + a * s[k];
  }
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(uint16_t* p, float v) { *p = __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

// Rows too long for registers: max, Σ exp(x - max), then y = exp(x - max) / Σ; the row stays in L1/L2 between the
// three passes. y may be x (f32 in place).
template <typename Out>
__global__ void softmax_rows_kernel(const float* x, Out* y, size_t cols) {
  __shared__ float part[32];
  const float* xr = x + blockIdx.x * cols;
  Out* yr = y + blockIdx.x * cols;
  float m = -FLT_MAX;
  for (size_t i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, xr[i]);
  m = block_max(m, part);
  float s = 0.0f;
  for (size_t i = threadIdx.x; i < cols; i += blockDim.x) s += expf(xr[i] - m);
  const float inv = 1.0f / block_sum(s, part);
  for (size_t i = threadIdx.x; i < cols; i += blockDim.x) store(yr + i, expf(xr[i] - m) * inv);
}

// Rows of up to kPerThread * blockDim.x values: the row is read once into registers, then written once.
template <int kPerThread, typename Out>
__global__ void softmax_rows_regs_kernel(const float* x, Out* y, size_t cols) {
  __shared__ float part[32];
  const float* xr = x + blockIdx.x * cols;
  Out* yr = y + blockIdx.x * cols;
  float v[kPerThread];
  float m = -FLT_MAX;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const size_t i = threadIdx.x + static_cast<size_t>(j) * blockDim.x;
    v[j] = i < cols ? xr[i] : -FLT_MAX;
    m = fmaxf(m, v[j]);
  }
  m = block_max(m, part);
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const size_t i = threadIdx.x + static_cast<size_t>(j) * blockDim.x;
    v[j] = i < cols ? expf(v[j] - m) : 0.0f;
    s += v[j];
  }
  const float inv = 1.0f / block_sum(s, part);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const size_t i = threadIdx.x + static_cast<size_t>(j) * blockDim.x;
    if (i < cols) store(yr + i, v[j] * inv);
  }
}

template <typename Out>
cudaError_t softmax_rows(const float* x, Out* y, size_t rows, size_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(rows);
  if (cols <= 256) {
    softmax_rows_regs_kernel<8, Out><<<grid, 32, 0, stream>>>(x, y, cols);
  } else if (cols <= 2048) {
    softmax_rows_regs_kernel<8, Out><<<grid, 256, 0, stream>>>(x, y, cols);
  } else if (cols <= 4096) {
    softmax_rows_regs_kernel<16, Out><<<grid, 256, 0, stream>>>(x, y, cols);
  } else {
    softmax_rows_kernel<Out><<<grid, 512, 0, stream>>>(x, y, cols);
  }
  return cudaGetLastError();
}

// ---- fused attention within one segment on bf16 tensor cores (mma.sync m16n8k16, f32 accumulation), flash
// style: each warp owns 16 query rows, keys stream through shared memory in tiles of 64, the softmax is online
// (running max and sum per row in f32) and the probabilities go from the score accumulators straight into the
// A fragments of the P·V product, so the scores never touch memory. D = head_dim, a multiple of 16 up to 128.
constexpr int kFlashWarps = 4, kFlashRows = 16 * kFlashWarps, kFlashKeys = 64;

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// grid (ceil(len / 64), heads); q, k, v bf16 [tokens, W] (W = heads * D), rows [begin, begin + len) of one segment.
template <int D>
__global__ void __launch_bounds__(32 * kFlashWarps)
    flash_segment_kernel(const uint16_t* q, const uint16_t* k, const uint16_t* v, int W, int begin, int len,
                         float scale_log2, float* out) {
  constexpr int KS = D / 16;  // k-steps of Q·Kᵀ
  constexpr int NT = D / 8;   // n-tiles of the output
  constexpr int KP = D + 8;   // padded K row (bf16): conflict-free fragment loads
  constexpr int VP = kFlashKeys + 8;
  __shared__ __align__(16) uint16_t ks[kFlashKeys * KP];
  __shared__ __align__(16) uint16_t vt[D * VP];  // V transposed: [dim][key]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y;
  const int row0 = blockIdx.x * kFlashRows + warp * 16;  // this warp's first query row within the segment
  const size_t hoff = static_cast<size_t>(h) * D;

  // Q fragments for all k-steps (rows beyond the segment are zero).
  uint32_t qa[KS][4];
  {
    const int ra = row0 + g, rb = row0 + g + 8;
    const uint32_t* qra =
        ra < len ? reinterpret_cast<const uint32_t*>(q + (static_cast<size_t>(begin + ra)) * W + hoff) : nullptr;
    const uint32_t* qrb =
        rb < len ? reinterpret_cast<const uint32_t*>(q + (static_cast<size_t>(begin + rb)) * W + hoff) : nullptr;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      qa[kk][0] = qra ? qra[kk * 8 + t] : 0u;
      qa[kk][1] = qrb ? qrb[kk * 8 + t] : 0u;
      qa[kk][2] = qra ? qra[kk * 8 + 4 + t] : 0u;
      qa[kk][3] = qrb ? qrb[kk * 8 + 4 + t] : 0u;
    }
  }
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;  // rows g and g + 8

  for (int key0 = 0; key0 < len; key0 += kFlashKeys) {
    __syncthreads();  // the previous tile is no longer read
    // K tile [64][D] and V tile transposed, 16-byte chunks (8 values), zeros beyond the segment.
    for (int c = threadIdx.x; c < kFlashKeys * (D / 8); c += blockDim.x) {
      const int key = c / (D / 8), d8 = (c % (D / 8)) * 8;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (key0 + key < len) {
        const size_t off = static_cast<size_t>(begin + key0 + key) * W + hoff + d8;
        kv = *reinterpret_cast<const uint4*>(k + off);
        vv = *reinterpret_cast<const uint4*>(v + off);
      }
      *reinterpret_cast<uint4*>(ks + key * KP + d8) = kv;
      const uint16_t* ve = reinterpret_cast<const uint16_t*>(&vv);
#pragma unroll
      for (int e = 0; e < 8; ++e) vt[(d8 + e) * VP + key] = ve[e];
    }
    __syncthreads();
    // S = Q·Kᵀ for 16 rows x 64 keys (8 n-tiles of 8 keys).
    float sc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
      const uint16_t* kr = ks + (n * 8 + g) * KP;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr + kk * 16 + 2 * t);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + kk * 16 + 8 + 2 * t);
        mma_bf16(sc[n], qa[kk], b0, b1);
      }
    }
    // Online softmax in the log2 domain; keys beyond the segment get -inf.
    float mx_a = m_a, mx_b = m_b;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const int key = key0 + n * 8 + 2 * t;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool ok = key + e < len;
        sc[n][e] = ok ? sc[n][e] * scale_log2 : -INFINITY;
        sc[n][2 + e] = ok ? sc[n][2 + e] * scale_log2 : -INFINITY;
        mx_a = fmaxf(mx_a, sc[n][e]);
        mx_b = fmaxf(mx_b, sc[n][2 + e]);
      }
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
    }
    // A row whose every key so far is masked keeps max -inf: use 0 so exp2 gives 0, not NaN.
    const float base_a = mx_a == -INFINITY ? 0.0f : mx_a, base_b = mx_b == -INFINITY ? 0.0f : mx_b;
    const float alpha_a = exp2f(m_a - base_a), alpha_b = exp2f(m_b - base_b);
    m_a = mx_a;
    m_b = mx_b;
    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      sc[n][0] = exp2f(sc[n][0] - base_a);
      sc[n][1] = exp2f(sc[n][1] - base_a);
      sc[n][2] = exp2f(sc[n][2] - base_b);
      sc[n][3] = exp2f(sc[n][3] - base_b);
      sum_a += sc[n][0] + sc[n][1];
      sum_b += sc[n][2] + sc[n][3];
    }
    l_a = l_a * alpha_a + sum_a;  // lane-partial sums; reduced over the quad at the end
    l_b = l_b * alpha_b + sum_b;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      o[j][0] *= alpha_a;
      o[j][1] *= alpha_a;
      o[j][2] *= alpha_b;
      o[j][3] *= alpha_b;
    }
    // O += P·V: P's score fragments are the A fragments (keys 16kk .. 16kk + 15 = n-tiles 2kk, 2kk + 1).
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                              pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint16_t* vr = vt + (j * 8 + g) * VP + kk * 16;
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(vr + 2 * t);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(vr + 8 + 2 * t);
        mma_bf16(o[j], pa, b0, b1);
      }
    }
  }
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
  }
  const int ra = row0 + g, rb = row0 + g + 8;
  const float inv_a = 1.0f / l_a, inv_b = 1.0f / l_b;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int d = j * 8 + 2 * t;
    if (ra < len) {
      float* orow = out + static_cast<size_t>(begin + ra) * W + hoff + d;
      orow[0] = o[j][0] * inv_a;
      orow[1] = o[j][1] * inv_a;
    }
    if (rb < len) {
      float* orow = out + static_cast<size_t>(begin + rb) * W + hoff + d;
      orow[0] = o[j][2] * inv_b;
      orow[1] = o[j][3] * inv_b;
    }
  }
}

}  // namespace

cudaError_t launch_add_bias(float* y, const float* bias, size_t rows, size_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  add_bias_kernel<<<grid_for(rows * cols), kThreads, 0, stream>>>(y, bias, rows, cols);
  return cudaGetLastError();
}

cudaError_t launch_layer_norm(const float* x, const float* w, const float* b, float* out, size_t rows, size_t dim,
                              float eps, cudaStream_t stream) {
  if (rows == 0 || dim == 0) return cudaSuccess;
  const int threads = dim >= 1024 ? 256 : (dim >= 256 ? 128 : 32);
  layer_norm_kernel<<<static_cast<unsigned>(rows), threads, 0, stream>>>(x, w, b, out, dim, eps);
  return cudaGetLastError();
}

cudaError_t launch_gelu_erf(float* x, size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  gelu_erf_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, n);
  return cudaGetLastError();
}

cudaError_t launch_rope_table(float* x, const float* cos, const float* sin, size_t tokens, int heads, int head_dim,
                              int pairs, cudaStream_t stream) {
  if (tokens == 0 || pairs == 0) return cudaSuccess;
  rope_table_kernel<<<static_cast<unsigned>(tokens), 128, 0, stream>>>(x, cos, sin, heads, head_dim, pairs);
  return cudaGetLastError();
}

cudaError_t launch_softmax_rows(float* x, size_t rows, size_t cols, cudaStream_t stream) {
  return softmax_rows<float>(x, x, rows, cols, stream);
}

cudaError_t launch_softmax_rows_bf16(const float* x, uint16_t* out, size_t rows, size_t cols, cudaStream_t stream) {
  return softmax_rows<uint16_t>(x, out, rows, cols, stream);
}

bool flash_segment_supported(int head_dim) { return head_dim == 64 || head_dim == 80 || head_dim == 128; }

cudaError_t launch_flash_segment(const uint16_t* q, const uint16_t* k, const uint16_t* v, int heads, int head_dim,
                                 int begin, int len, float scale, float* out, cudaStream_t stream) {
  if (len <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((len + kFlashRows - 1) / kFlashRows), static_cast<unsigned>(heads));
  const int W = heads * head_dim;
  const float scale_log2 = scale * 1.4426950408889634f;
  switch (head_dim) {
    case 64:
      flash_segment_kernel<64><<<grid, 32 * kFlashWarps, 0, stream>>>(q, k, v, W, begin, len, scale_log2, out);
      break;
    case 80:
      flash_segment_kernel<80><<<grid, 32 * kFlashWarps, 0, stream>>>(q, k, v, W, begin, len, scale_log2, out);
      break;
    case 128:
      flash_segment_kernel<128><<<grid, 32 * kFlashWarps, 0, stream>>>(q, k, v, W, begin, len, scale_log2, out);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace mxlm::backend::cuda
