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

}  // namespace mxlm::backend::cuda
