// Elementwise, normalisation, MX numerics, router and MoE helper kernels. Memory-bound: one pass each, and
// the QDQ is fused into the producer of a GEMM's bf16 input (gather, SwiGLU) so activations are written once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "backend/cuda/cuda_device_math.cuh"
#include "backend/cuda/cuda_kernels.h"
#include "backend/cuda/cuda_launch.cuh"

namespace mxlm::backend::cuda {

namespace {

constexpr int kThreads = 256;

unsigned blocks_for(size_t n, int per_block = kThreads) {
  size_t b = (n + static_cast<size_t>(per_block) - 1) / static_cast<size_t>(per_block);
  if (b > 1u << 30) b = 1u << 30;
  return static_cast<unsigned>(b == 0 ? 1 : b);
}

__global__ void add_kernel(const float* a, const float* b, float* out, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = a[i] + b[i];
}

__global__ void scale_kernel(float* x, float f, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    x[i] *= f;
}

__global__ void f32_to_bf16_kernel(const float* x, uint16_t* out, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = to_bf16_bits(x[i]);
}

__global__ void bf16_to_f32_kernel(const uint16_t* x, float* out, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = __uint_as_float(static_cast<uint32_t>(x[i]) << 16);
}

__global__ void f16_to_f32_kernel(const uint16_t* x, float* out, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = __half2float(__ushort_as_half(x[i]));
}

// One CTA per row; f32 sum of squares. Rows of up to kRmsNormCached elements per thread are read once (kept in registers for the scaling
// pass; a decode step's norms are latency-bound: ncu H100, 6144 wide, 7 us per call with the second read).
// kAdd: the row is x + y first (the residual add, as add_kernel), written back to x. The plain, fused-add and
// fused-RoPE kernels below all run this routine with the same thread count (rms_norm_threads), so they sum the squares
// in the same order and produce the same bits.
constexpr int kRmsNormCached = 16;
__host__ __device__ constexpr int rms_norm_threads(size_t dim) { return dim >= 1024 ? 512 : (dim >= 256 ? 256 : 64); }

// 1 / sqrt(mean of squares + eps) from each thread's partial sum s (the CTA's threads all take part).
__device__ __forceinline__ float rms_norm_inverse(float s, size_t dim, float eps) {
  __shared__ float part[32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
    if (threadIdx.x == 0) part[0] = t;
  }
  __syncthreads();
  return 1.0f / sqrtf(part[0] / static_cast<float>(dim) + eps);
}

template <bool kAdd>
__device__ __forceinline__ void rms_norm_row(float* xr, const float* yr, const float* w, float* o, size_t dim,
                                             float eps, bool add_one) {
  const bool cached = dim <= static_cast<size_t>(blockDim.x) * kRmsNormCached;
  float s = 0.0f;
  if (cached) {
    // Every load before the first store: the compiler cannot tell xr (written back by the fused add) from yr / w,
    // and a store between two loads kept one load in flight per thread (ncu H100: 13.5 us per 6144-wide add + norm).
    float v[kRmsNormCached], wv[kRmsNormCached];
#pragma unroll
    for (int j = 0; j < kRmsNormCached; ++j) {
      const size_t i = threadIdx.x + static_cast<size_t>(j) * blockDim.x;
      v[j] = i < dim ? xr[i] : 0.0f;
      if constexpr (kAdd) v[j] += i < dim ? yr[i] : 0.0f;
      wv[j] = i < dim ? (add_one ? 1.0f + w[i] : w[i]) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kRmsNormCached; ++j) s += v[j] * v[j];
    if constexpr (kAdd) {
#pragma unroll
      for (int j = 0; j < kRmsNormCached; ++j) {
        const size_t i = threadIdx.x + static_cast<size_t>(j) * blockDim.x;
        if (i < dim) xr[i] = v[j];
      }
    }
    const float inv = rms_norm_inverse(s, dim, eps);
#pragma unroll
    for (int j = 0; j < kRmsNormCached; ++j) {
      const size_t i = threadIdx.x + static_cast<size_t>(j) * blockDim.x;
      if (i < dim) o[i] = v[j] * inv * wv[j];
    }
    return;
  }
  for (size_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float a = xr[i];
    if constexpr (kAdd) {
      a += yr[i];
      xr[i] = a;
    }
    s += a * a;
  }
  const float inv = rms_norm_inverse(s, dim, eps);
  for (size_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * inv * (add_one ? 1.0f + w[i] : w[i]);
}

__global__ void rms_norm_kernel(const float* x, const float* w, float* out, size_t dim, float eps, bool add_one) {
  // In place (out == x) is allowed: a thread overwrites only elements that it alone reads, after reading them. The
  // routine's row pointer is writable for the fused add; without it nothing is written through it.
  rms_norm_row<false>(const_cast<float*>(x) + blockIdx.x * dim, nullptr, w, out + blockIdx.x * dim, dim, eps, add_one);
}

// h += y, then out = rms_norm(h): a layer's residual add and the norm after it in one launch. PDL: the next kernel
// (a GEMV that queues its weights before its own wait) may start at once; this one waits for its predecessor.
__global__ void add_rms_norm_kernel(float* h, const float* y, const float* w, float* out, size_t dim, float eps,
                                    bool add_one) {
  pdl_launch_dependents();
  pdl_wait();
  rms_norm_row<true>(h + blockIdx.x * dim, y + blockIdx.x * dim, w, out + blockIdx.x * dim, dim, eps, add_one);
}

// NeoX RoPE's rotation of the pair (v[j], v[j + half]) by the angle whose sine and cosine are s and c.
__device__ __forceinline__ void rope_rotate(float* v, int j, int half, float s, float c) {
  const float a = v[j], b = v[j + half];
  v[j] = a * c - b * s;
  v[j + half] = b * c + a * s;
}

// RoPE of one head row v[head_dim] in place, pairs (j, j + half) for j < half; angles as rope_kernel's.
__device__ __forceinline__ void rope_row(float* v, float pos, int half, const float* inv_freq) {
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    float s, c;
    sincosf(pos * inv_freq[j], &s, &c);
    rope_rotate(v, j, half, s, c);
  }
}

// One CTA per (token, head) row of the tensors x[i] [tokens, heads[i], head_dim] (the rows of tensor 0, then of tensor
// 1, ...): rms_norm over head_dim, then RoPE on the first 2 * half dims, in place (the q / k norm and the partial RoPE
// of attention and of the indexer). PDL as add_rms_norm_kernel. The tensor lists are __grid_constant__: indexed by the
// CTA's tensor, they are read in place instead of copied to local memory.
__global__ void rms_norm_rope_kernel(const __grid_constant__ NormRopeTensors t, size_t tokens, size_t head_dim,
                                     float eps, bool add_one, const int32_t* positions, int half,
                                     const float* inv_freq) {
  pdl_launch_dependents();
  pdl_wait();
  size_t r = blockIdx.x;  // this CTA's row within tensor i
  int i = 0;
  while (i + 1 < t.count) {
    const size_t rows = tokens * static_cast<size_t>(t.heads[i]);
    if (r < rows) break;
    r -= rows;
    ++i;
  }
  float* row = t.x[i] + r * head_dim;
  rms_norm_row<false>(row, nullptr, t.w[i], row, head_dim, eps, add_one);
  if (half == 0) return;
  __syncthreads();  // the rotation pairs elements that other threads normalised
  rope_row(row, static_cast<float>(positions[r / static_cast<size_t>(t.heads[i])]), half, inv_freq);
}

// One block per token; threads over (head, j). Where the block is a multiple of half, a thread keeps one j for all
// its heads and computes its sin / cos once (sincosf per (head, j) made a decode step's RoPE ~6 us per call).
__global__ void rope_kernel(float* x, const int32_t* positions, int heads, int head_dim, int half,
                            const float* inv_freq) {
  const size_t t = blockIdx.x;
  const float pos = static_cast<float>(positions[t]);
  const bool fixed_j = blockDim.x % half == 0;
  float s_fixed = 0.0f, c_fixed = 0.0f;
  if (fixed_j) sincosf(pos * inv_freq[threadIdx.x % half], &s_fixed, &c_fixed);
  for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
    const int h = i / half, j = i % half;
    float s = s_fixed, c = c_fixed;
    if (!fixed_j) sincosf(pos * inv_freq[j], &s, &c);
    rope_rotate(x + (t * static_cast<size_t>(heads) + static_cast<size_t>(h)) * static_cast<size_t>(head_dim), j, half,
                s, c);
  }
}

__global__ void swiglu_kernel(const float* gate, const float* up, float* out, size_t n, float alpha, float limit) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = swiglu(gate[i], up[i], alpha, limit);
}

// One warp per 32-block; n % 32 == 0 so whole warps are active or not.
__global__ void qdq_kernel(float* x, size_t n) {
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  x[i] = qdq_lane(x[i]);
}

__global__ void gather_qdq_bf16_kernel(const float* x, const int32_t* gather, size_t rows, size_t k, bool qdq,
                                       uint16_t* out) {
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * k) return;  // rows * k % 32 == 0 when qdq, so warps stay whole
  const size_t r = i / k, c = i % k;
  const size_t src = gather ? static_cast<size_t>(gather[r]) : r;
  float v = x[src * k + c];
  if (qdq) v = qdq_lane(v);
  out[i] = to_bf16_bits(v);
}

__global__ void gather_qdq_f32_kernel(const float* x, const int32_t* gather, size_t rows, size_t k, bool qdq,
                                      float* out) {
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * k) return;
  const size_t r = i / k, c = i % k;
  const size_t src = gather ? static_cast<size_t>(gather[r]) : r;
  float v = x[src * k + c];
  if (qdq) v = qdq_lane(v);
  out[i] = v;
}

__global__ void swiglu_qdq_bf16_kernel(const float* gate, const float* up, size_t n, float alpha, float limit, bool qdq,
                                       uint16_t* out) {
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  float v = swiglu(gate[i], up[i], alpha, limit);
  if (qdq) v = qdq_lane(v);
  out[i] = to_bf16_bits(v);
}

__device__ __forceinline__ float e2m1_value(uint32_t code) {
  const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float v = mag[code & 7u];
  return (code & 8u) ? -v : v;
}

__device__ __forceinline__ float e8m0_value(uint32_t b) {
  if (b == 255u) return __uint_as_float(0x7fc00000u);
  return b == 0u ? __uint_as_float(0x00400000u) : __uint_as_float(b << 23);
}

// One thread per packed byte (two outputs).
template <typename Out>
__global__ void dequant_kernel(const uint8_t* packed, const uint8_t* scales, size_t bytes, Out* out) {
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i >= bytes) return;
  const uint32_t byte = packed[i];
  const uint32_t sb = scales[i / 16];
  const float s = e8m0_value(sb);
  float lo = e2m1_value(byte & 15u) * s, hi = e2m1_value(byte >> 4) * s;
  if (sb == 255u) lo = hi = __uint_as_float(0x7fc00000u);
  if constexpr (sizeof(Out) == 2) {
    out[2 * i] = to_bf16_bits(lo);
    out[2 * i + 1] = to_bf16_bits(hi);
  } else {
    out[2 * i] = lo;
    out[2 * i + 1] = hi;
  }
}

__global__ void moe_combine_kernel(const float* y, const int32_t* combine, const float* weights, int k, size_t hidden,
                                   float* out) {
  moe_combine_token(y, combine, weights, k, hidden, out);
}

// y[t, r] = Σ_k w[r, k] x[t, k] in f32 for a few tokens (m <= kF32GemvMaxTokens): one CTA per weight row, its
// threads striding the row by float4 with all of a thread's weight loads issued before the first use, per-token
// partial sums added over the CTA in a fixed order (deterministic). cuBLAS's sgemm took 13-20 µs for the router's
// [128, 6144] at 1-8 tokens (H100), a tenth of the bandwidth. Launched with PDL: the first 8 float4 of weights per
// thread (the whole row up to k = 8192) are loaded before the wait, while the previous kernel (the norm that makes x)
// still runs.
constexpr int kF32GemvThreads = 256, kF32GemvUnroll = 8;
__global__ void __launch_bounds__(kF32GemvThreads)
    f32_gemv_kernel(const float* w, const float* x, float* y, int n, int m, int k) {
  const int row = blockIdx.x, tid = threadIdx.x;
  const int k4 = k / 4;
  const float4* wr = reinterpret_cast<const float4*>(w + static_cast<size_t>(row) * k);
  float acc[kF32GemvMaxTokens] = {};
  float4 wv[kF32GemvUnroll];
  auto load_weights = [&](const int base) {
#pragma unroll
    for (int u = 0; u < kF32GemvUnroll; ++u) {
      const int i = base + u * kF32GemvThreads + tid;
      wv[u] = i < k4 ? __ldcs(wr + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  };
  load_weights(0);
  pdl_wait();
  pdl_launch_dependents();
  for (int base = 0; base < k4; base += kF32GemvThreads * kF32GemvUnroll) {
    if (base > 0) load_weights(base);
#pragma unroll
    for (int t = 0; t < kF32GemvMaxTokens; ++t) {
      if (t >= m) break;
      const float4* xr = reinterpret_cast<const float4*>(x + static_cast<size_t>(t) * k);
#pragma unroll
      for (int u = 0; u < kF32GemvUnroll; ++u) {
        const int i = base + u * kF32GemvThreads + tid;
        if (i < k4) {
          const float4 xv = xr[i];
          acc[t] = fmaf(wv[u].x, xv.x, fmaf(wv[u].y, xv.y, fmaf(wv[u].z, xv.z, fmaf(wv[u].w, xv.w, acc[t]))));
        }
      }
    }
  }
  __shared__ float part[kF32GemvThreads / 32][kF32GemvMaxTokens];
  const int warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int t = 0; t < kF32GemvMaxTokens; ++t) {
    float v = acc[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) part[warp][t] = v;
  }
  __syncthreads();
  if (tid < m) {
    float s = 0.0f;
#pragma unroll
    for (int wi = 0; wi < kF32GemvThreads / 32; ++wi) s += part[wi][tid];
    y[static_cast<size_t>(tid) * n + row] = s;
  }
}

// One warp per token: the sigmoid scores and their biased copies computed once into shared memory (one pass over
// the logits), then k arg-max rounds over shared memory, ties to the lower expert id (the CPU backend's order).
// Launched with PDL (the logits come from the previous kernel).
__global__ void router_topk_kernel(const float* logits, const float* bias, size_t tokens, int experts, int k,
                                   float scale, int32_t* ids, float* weights) {
  pdl_wait();
  pdl_launch_dependents();
  const size_t t = blockIdx.x * static_cast<size_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (t >= tokens) return;
  extern __shared__ float topk_smem[];  // per warp: sigmoid [experts], biased [experts]
  float* sig = topk_smem + static_cast<size_t>(threadIdx.x / 32) * 2 * static_cast<size_t>(experts);
  float* biased = sig + experts;
  const float* l = logits + t * static_cast<size_t>(experts);
  for (int e = lane; e < experts; e += 32) {
    const float s = 1.0f / (1.0f + expf(-l[e]));
    sig[e] = s;
    biased[e] = bias ? s + bias[e] : s;
  }
  __syncwarp();
  uint32_t taken = 0;  // bit j: this lane's j-th expert (lane + 32 j) was picked; experts <= 1024 (launcher)
  float picked[kRouterMaxTopK];
  int picked_id[kRouterMaxTopK];
  float sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    float best = -INFINITY;
    int best_id = experts;
    for (int e = lane, b = 0; e < experts; e += 32, ++b) {
      if (taken & (1u << b)) continue;
      const float c = biased[e];
      if (best_id == experts || c > best || (c == best && e < best_id)) {
        best = c;
        best_id = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_id, o);
      if (oi != experts && (best_id == experts || ob > best || (ob == best && oi < best_id))) {
        best = ob;
        best_id = oi;
      }
    }
    if ((best_id & 31) == lane) taken |= 1u << (best_id / 32);
    const float s = sig[best_id];
    if (j < kRouterMaxTopK) {
      picked[j] = s;
      picked_id[j] = best_id;
    }
    sum += s;
  }
  if (lane == 0)
    for (int j = 0; j < k && j < kRouterMaxTopK; ++j) {
      ids[t * static_cast<size_t>(k) + static_cast<size_t>(j)] = picked_id[j];
      weights[t * static_cast<size_t>(k) + static_cast<size_t>(j)] = picked[j] / sum * scale;
    }
}

__global__ void embedding_kernel(const void* table, const uint8_t* scales, int format, int64_t rows, int64_t cols,
                                 const int32_t* ids, int64_t row_offset, float* out) {
  const size_t i = blockIdx.y;
  const int64_t r = static_cast<int64_t>(ids[i]) - row_offset;
  float* o = out + i * static_cast<size_t>(cols);
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    if (r >= 0 && r < rows) {
      const size_t idx = static_cast<size_t>(r * cols + c);
      if (format == 0) {
        v = static_cast<const float*>(table)[idx];
      } else if (format == 1) {
        v = __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(table)[idx]) << 16);
      } else {
        const uint32_t byte = static_cast<const uint8_t*>(table)[idx / 2];
        const uint32_t sb = scales[idx / 32];
        v = sb == 255u ? __uint_as_float(0x7fc00000u) : e2m1_value((idx & 1) ? byte >> 4 : byte & 15u) * e8m0_value(sb);
      }
    }
    o[c] = v;
  }
}

// Grid: x over a row's columns, y over rows, z over the tensors (the list __grid_constant__, as in
// rms_norm_rope_kernel).
template <CacheType kType>
__global__ void cache_writes_kernel(const __grid_constant__ CacheWrites w, const int64_t* slots) {
  const size_t r = blockIdx.y;
  const int i = static_cast<int>(blockIdx.z);
  if (slots[r] < 0) return;  // a padding row of a captured decode step: writes nowhere
  const size_t slot = static_cast<size_t>(slots[r]), width = w.width[i];
  const float* x = w.x[i] + r * width;
  for (size_t c = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; c < width;
       c += static_cast<size_t>(gridDim.x) * blockDim.x) {
    if constexpr (kType == CacheType::BF16) {
      static_cast<uint16_t*>(w.cache[i])[slot * width + c] = __bfloat16_as_ushort(__float2bfloat16_rn(x[c]));
    } else {
      static_cast<float*>(w.cache[i])[slot * width + c] = x[c];
    }
  }
}

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__global__ void fill_bytes_kernel(uint8_t* out, size_t n, uint64_t seed, int lo, int hi) {
  const uint32_t span = static_cast<uint32_t>(hi - lo + 1);
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<uint8_t>(lo + static_cast<int>(mix64(seed * 0x9e3779b97f4a7c15ull + i) % span));
}

__device__ __forceinline__ float uniform_pm(uint64_t seed, size_t i) {
  return static_cast<float>(mix64(seed * 0x9e3779b97f4a7c15ull + i) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

__global__ void fill_bf16_kernel(uint16_t* out, size_t n, uint64_t seed, float amp) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = to_bf16_bits(amp * uniform_pm(seed, i));
}

__global__ void fill_f32_kernel(float* out, size_t n, uint64_t seed, float amp) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = amp * uniform_pm(seed, i);
}

}  // namespace

cudaError_t launch_fill_random_bytes(uint8_t* out, size_t n, uint64_t seed, int lo, int hi, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  fill_bytes_kernel<<<blocks_for(n), kThreads, 0, stream>>>(out, n, seed, lo, hi);
  return cudaGetLastError();
}

cudaError_t launch_fill_random_bf16(uint16_t* out, size_t n, uint64_t seed, float amp, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  fill_bf16_kernel<<<blocks_for(n), kThreads, 0, stream>>>(out, n, seed, amp);
  return cudaGetLastError();
}

cudaError_t launch_fill_random_f32(float* out, size_t n, uint64_t seed, float amp, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  fill_f32_kernel<<<blocks_for(n), kThreads, 0, stream>>>(out, n, seed, amp);
  return cudaGetLastError();
}

cudaError_t launch_add(const float* a, const float* b, float* out, size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  add_kernel<<<blocks_for(n), kThreads, 0, stream>>>(a, b, out, n);
  return cudaGetLastError();
}

cudaError_t launch_scale(float* x, float factor, size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  scale_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, factor, n);
  return cudaGetLastError();
}

cudaError_t launch_f32_to_bf16(const float* x, uint16_t* out, size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  f32_to_bf16_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, out, n);
  return cudaGetLastError();
}

cudaError_t launch_bf16_to_f32(const uint16_t* x, float* out, size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  bf16_to_f32_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, out, n);
  return cudaGetLastError();
}

cudaError_t launch_f16_to_f32(const uint16_t* x, float* out, size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  f16_to_f32_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, out, n);
  return cudaGetLastError();
}

cudaError_t launch_rms_norm(const float* x, const float* w, float* out, size_t rows, size_t dim, float eps,
                            bool add_one, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rms_norm_kernel<<<static_cast<unsigned>(rows), rms_norm_threads(dim), 0, stream>>>(x, w, out, dim, eps, add_one);
  return cudaGetLastError();
}

cudaError_t launch_add_rms_norm(float* h, const float* y, const float* w, float* out, size_t rows, size_t dim,
                                float eps, bool add_one, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return launch_kernel(add_rms_norm_kernel, dim3(static_cast<unsigned>(rows)), dim3(rms_norm_threads(dim)), 0, stream,
                       true, h, y, w, out, dim, eps, add_one);
}

cudaError_t launch_rms_norm_ropes(const NormRopeTensors& t, size_t tokens, int head_dim, float eps, bool add_one,
                                  const int32_t* positions, int rotary_dim, const float* inv_freq,
                                  cudaStream_t stream) {
  if (t.count < 1 || t.count > kMaxNormRopeTensors) return cudaErrorInvalidValue;
  if (rotary_dim % 2 != 0 || rotary_dim > head_dim) return cudaErrorInvalidValue;
  size_t rows = 0;
  for (int i = 0; i < t.count; ++i) rows += tokens * static_cast<size_t>(t.heads[i]);
  if (rows == 0) return cudaSuccess;
  const size_t dim = static_cast<size_t>(head_dim);
  return launch_kernel(rms_norm_rope_kernel, dim3(static_cast<unsigned>(rows)), dim3(rms_norm_threads(dim)), 0, stream,
                       true, t, tokens, dim, eps, add_one, positions, rotary_dim / 2, inv_freq);
}

cudaError_t launch_rope(float* x, const int32_t* positions, size_t tokens, int heads, int head_dim, int rotary_dim,
                        const float* inv_freq, cudaStream_t stream) {
  if (tokens == 0 || rotary_dim == 0) return cudaSuccess;
  rope_kernel<<<static_cast<unsigned>(tokens), 128, 0, stream>>>(x, positions, heads, head_dim, rotary_dim / 2,
                                                                 inv_freq);
  return cudaGetLastError();
}

cudaError_t launch_swiglu_oai(const float* gate, const float* up, float* out, size_t n, float alpha, float limit,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  swiglu_kernel<<<blocks_for(n), kThreads, 0, stream>>>(gate, up, out, n, alpha, limit);
  return cudaGetLastError();
}

cudaError_t launch_qdq_f32(float* x, size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  qdq_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, n);
  return cudaGetLastError();
}

cudaError_t launch_gather_qdq_bf16(const float* x, const int32_t* gather, size_t rows, size_t k, bool qdq,
                                   uint16_t* out, cudaStream_t stream) {
  if (rows * k == 0) return cudaSuccess;
  gather_qdq_bf16_kernel<<<blocks_for(rows * k), kThreads, 0, stream>>>(x, gather, rows, k, qdq, out);
  return cudaGetLastError();
}

cudaError_t launch_gather_qdq_f32(const float* x, const int32_t* gather, size_t rows, size_t k, bool qdq, float* out,
                                  cudaStream_t stream) {
  if (rows * k == 0) return cudaSuccess;
  gather_qdq_f32_kernel<<<blocks_for(rows * k), kThreads, 0, stream>>>(x, gather, rows, k, qdq, out);
  return cudaGetLastError();
}

cudaError_t launch_swiglu_qdq_bf16(const float* gate, const float* up, size_t rows, size_t k, float alpha, float limit,
                                   bool qdq, uint16_t* out, cudaStream_t stream) {
  if (rows * k == 0) return cudaSuccess;
  swiglu_qdq_bf16_kernel<<<blocks_for(rows * k), kThreads, 0, stream>>>(gate, up, rows * k, alpha, limit, qdq, out);
  return cudaGetLastError();
}

cudaError_t launch_dequant_mxfp4_bf16(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k,
                                      uint16_t* out, cudaStream_t stream) {
  const size_t bytes = rows * k / 2;
  if (bytes == 0) return cudaSuccess;
  dequant_kernel<uint16_t><<<blocks_for(bytes), kThreads, 0, stream>>>(packed, scales, bytes, out);
  return cudaGetLastError();
}

cudaError_t launch_dequant_mxfp4_f32(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, float* out,
                                     cudaStream_t stream) {
  const size_t bytes = rows * k / 2;
  if (bytes == 0) return cudaSuccess;
  dequant_kernel<float><<<blocks_for(bytes), kThreads, 0, stream>>>(packed, scales, bytes, out);
  return cudaGetLastError();
}

cudaError_t launch_moe_combine(const float* y, const int32_t* combine, const float* weights, size_t tokens, int k,
                               size_t hidden, float* out, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  const dim3 grid(blocks_for(hidden), static_cast<unsigned>(tokens));
  moe_combine_kernel<<<grid, kThreads, 0, stream>>>(y, combine, weights, k, hidden, out);
  return cudaGetLastError();
}

cudaError_t launch_f32_gemv(const float* w, const float* x, float* y, int n, int m, int k, cudaStream_t stream) {
  if (m < 1 || m > kF32GemvMaxTokens || k % 4 != 0 || n < 1) return cudaErrorInvalidValue;
  return launch_kernel(f32_gemv_kernel, dim3(static_cast<unsigned>(n)), dim3(kF32GemvThreads), 0, stream, true, w, x, y,
                       n, m, k);
}

cudaError_t launch_router_topk(const float* logits, const float* bias, size_t tokens, int experts, int k, float scale,
                               int32_t* ids, float* weights, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  if (k < 1 || k > kRouterMaxTopK || experts < k || experts > kRouterMaxExperts) return cudaErrorInvalidValue;
  const int warps = 4;
  const size_t smem = static_cast<size_t>(warps) * 2 * static_cast<size_t>(experts) * sizeof(float);
  return launch_kernel(router_topk_kernel, dim3(blocks_for(tokens, warps)), dim3(warps * 32), smem, stream, true,
                       logits, bias, tokens, experts, k, scale, ids, weights);
}

cudaError_t launch_embedding(const void* table, const uint8_t* scales, TableFormat format, int64_t rows, int64_t cols,
                             const int32_t* ids, size_t count, int64_t row_offset, float* out, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const dim3 grid(blocks_for(static_cast<size_t>(cols)), static_cast<unsigned>(count));
  embedding_kernel<<<grid, kThreads, 0, stream>>>(table, scales, static_cast<int>(format), rows, cols, ids, row_offset,
                                                  out);
  return cudaGetLastError();
}

cudaError_t launch_cache_writes(const CacheWrites& w, const int64_t* slots, size_t rows, CacheType type,
                                cudaStream_t stream) {
  if (w.count < 0 || w.count > kMaxCacheWrites) return cudaErrorInvalidValue;
  size_t widest = 0;
  for (int i = 0; i < w.count; ++i) widest = std::max(widest, w.width[i]);
  if (rows == 0 || widest == 0) return cudaSuccess;
  const dim3 grid(blocks_for(widest), static_cast<unsigned>(rows), static_cast<unsigned>(w.count));
  if (type == CacheType::BF16) {
    cache_writes_kernel<CacheType::BF16><<<grid, kThreads, 0, stream>>>(w, slots);
  } else {
    cache_writes_kernel<CacheType::F32><<<grid, kThreads, 0, stream>>>(w, slots);
  }
  return cudaGetLastError();
}

}  // namespace mxlm::backend::cuda
