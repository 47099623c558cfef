// Decoding helpers on the device: greedy sampling (row argmax), so a decode step brings back token ids instead of
// [rows, vocab] logits.
#include <cfloat>
#include <cstdint>

#include "backend/cuda/cuda_kernels.h"

namespace mxlm::backend::cuda {

namespace {

constexpr int kArgmaxThreads = 1024;

// (value, index) pairs ordered as std::max_element scans: a larger value wins, equal values keep the lower index;
// index -1 is "nothing yet" (so a row of -inf still answers its first index).
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  return bi < 0 || v > bv || (v == bv && i < bi);
}

__global__ void __launch_bounds__(kArgmaxThreads) argmax_rows_kernel(const float* x, size_t cols, int32_t* out) {
  const float* row = x + blockIdx.x * cols;
  float bv = -INFINITY;
  int bi = -1;
  for (size_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = row[c];
    if (bi < 0 || v > bv) bv = v, bi = static_cast<int>(c);  // ascending c per thread: the first of equal maxima
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (oi >= 0 && better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  __shared__ float sv[kArgmaxThreads / 32];
  __shared__ int si[kArgmaxThreads / 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) sv[warp] = bv, si[warp] = bi;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w)
      if (si[w] >= 0 && better(sv[w], si[w], bv, bi)) bv = sv[w], bi = si[w];
    out[blockIdx.x] = bi;
  }
}

}  // namespace

cudaError_t launch_argmax_rows(const float* x, size_t rows, size_t cols, int32_t* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  argmax_rows_kernel<<<static_cast<unsigned>(rows), kArgmaxThreads, 0, stream>>>(x, cols, out);
  return cudaGetLastError();
}

}  // namespace mxlm::backend::cuda
