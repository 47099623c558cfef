// The small kernels of the device-routed MoE layer (cuda_moe.cpp), launched with Programmatic Dependent Launch:
// each waits for its predecessor (griddepcontrol.wait) before touching global memory, then lets its successor
// launch (griddepcontrol.launch_dependents), so the successor's CTAs - in particular the GEMVs, which queue their
// expert weights before their own wait - are resident while this kernel still runs. Triggering only after the
// wait keeps "everything two kernels back has completed" true at a successor's start, which the GEMVs rely on
// to read the tile list early (Mxfp4MoeTiles::tiles_ready).
//
// Same arithmetic as gather_qdq_bf16 / swiglu_qdq_bf16 / moe_combine of cuda_kernels.cu (shared device code in
// cuda_device_math.cuh); rows past the routed count (counts[1]) are skipped.
#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/cuda_device_math.cuh"
#include "backend/cuda/cuda_kernels.h"
#include "backend/cuda/cuda_launch.cuh"

namespace mxlm::backend::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void pdl_wait_then_release() {
  pdl_wait();
  pdl_launch_dependents();
}

// One thread per element of the [rows, k] output; k % 32 == 0, so a warp covers one QDQ block of one row and the
// row test is warp-uniform.
__global__ void gather_qdq_bf16_kernel(const float* x, const int32_t* gather, const int32_t* counts, size_t rows,
                                       size_t k, bool qdq, uint16_t* out) {
  pdl_wait_then_release();
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * k) return;
  const size_t r = i / k, c = i % k;
  if (r >= static_cast<size_t>(counts[1])) return;
  float v = x[static_cast<size_t>(gather[r]) * k + c];
  if (qdq) v = qdq_lane(v);
  out[i] = to_bf16_bits(v);
}

__global__ void swiglu_qdq_bf16_kernel(const float* gate, const float* up, const int32_t* counts, size_t rows, size_t k,
                                       float alpha, float limit, bool qdq, uint16_t* out) {
  pdl_wait_then_release();
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * k) return;
  if (i / k >= static_cast<size_t>(counts[1])) return;
  float v = swiglu(gate[i], up[i], alpha, limit);
  if (qdq) v = qdq_lane(v);
  out[i] = to_bf16_bits(v);
}

__global__ void combine_kernel(const float* y, const int32_t* combine, const float* weights, int k, size_t hidden,
                               float* out) {
  pdl_wait_then_release();
  moe_combine_token(y, combine, weights, k, hidden, out);
}

// Version-1 GEMV problem lists from the tile list: gate/up [2 * max_tiles] and down [max_tiles]; entries past the
// real tile count get m = 0 (the v1 kernel's CTAs return at once for them).
unsigned blocks_for(size_t n) {
  size_t b = (n + kThreads - 1) / kThreads;
  if (b > (1u << 30)) b = 1u << 30;
  return static_cast<unsigned>(b == 0 ? 1 : b);
}

template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, cudaStream_t stream, Args... args) {
  return launch_kernel(kernel, grid, dim3(kThreads), 0, stream, true, args...);
}

}  // namespace

cudaError_t launch_moe_gather_qdq_bf16(const float* x, const int32_t* gather, const int32_t* counts, size_t rows,
                                       size_t k, bool qdq, uint16_t* out, cudaStream_t stream) {
  if (rows * k == 0) return cudaSuccess;
  if (k % 32 != 0) return cudaErrorInvalidValue;
  return launch_pdl(gather_qdq_bf16_kernel, dim3(blocks_for(rows * k)), stream, x, gather, counts, rows, k, qdq, out);
}

cudaError_t launch_moe_swiglu_qdq_bf16(const float* gate, const float* up, const int32_t* counts, size_t rows, size_t k,
                                       float alpha, float limit, bool qdq, uint16_t* out, cudaStream_t stream) {
  if (rows * k == 0) return cudaSuccess;
  if (k % 32 != 0) return cudaErrorInvalidValue;
  return launch_pdl(swiglu_qdq_bf16_kernel, dim3(blocks_for(rows * k)), stream, gate, up, counts, rows, k, alpha, limit,
                    qdq, out);
}

cudaError_t launch_moe_combine_pdl(const float* y, const int32_t* combine, const float* weights, size_t tokens, int k,
                                   size_t hidden, float* out, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  return launch_pdl(combine_kernel, dim3(blocks_for(hidden), static_cast<unsigned>(tokens)), stream, y, combine,
                    weights, k, hidden, out);
}

}  // namespace mxlm::backend::cuda
