// Decoding helpers on the device: greedy sampling (row argmax), so a decode step brings back token ids instead of
// [rows, vocab] logits.
#include <cfloat>
#include <cstdint>

#include "backend/cuda/cuda_kernels.h"

namespace mxlm::backend::cuda {

namespace {

constexpr int kArgmaxThreads = 256, kArgmaxPerThread = 8;
constexpr size_t kArgmaxSpan = static_cast<size_t>(kArgmaxThreads) * kArgmaxPerThread;  // columns per CTA

// (value, index) pairs ordered as std::max_element scans: a larger value wins, equal values keep the lower index;
// index -1 is "nothing yet". NaNs never win (std::max_element keeps a NaN only where it is the row's first element,
// which the merge checks).
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  return bi < 0 || v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ void warp_best(float& bv, int& bi) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (oi >= 0 && better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
}

// Each CTA: the best of its kArgmaxSpan columns of one row (all of a thread's loads issued before the first compare)
// into the row's partials. One CTA per row read 200064 logits at ~10 GB/s (82 us, ncu H100); spread over the card
// the read is a few microseconds.
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_part_kernel(const float* x, size_t cols, float* part_v, int32_t* part_i) {
  const float* row = x + blockIdx.y * cols;
  const size_t base = blockIdx.x * kArgmaxSpan + threadIdx.x;
  float v[kArgmaxPerThread];
#pragma unroll
  for (int j = 0; j < kArgmaxPerThread; ++j) {
    const size_t c = base + static_cast<size_t>(j) * kArgmaxThreads;
    v[j] = c < cols ? row[c] : NAN;
  }
  float bv = -INFINITY;
  int bi = -1;
#pragma unroll
  for (int j = 0; j < kArgmaxPerThread; ++j)  // ascending columns: the first of equal maxima stays
    if (!isnan(v[j]) && (bi < 0 || v[j] > bv))
      bv = v[j], bi = static_cast<int>(base + static_cast<size_t>(j) * kArgmaxThreads);
  warp_best(bv, bi);
  __shared__ float sv[kArgmaxThreads / 32];
  __shared__ int si[kArgmaxThreads / 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) sv[warp] = bv, si[warp] = bi;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kArgmaxThreads / 32; ++w)
      if (si[w] >= 0 && better(sv[w], si[w], bv, bi)) bv = sv[w], bi = si[w];
    part_v[blockIdx.y * gridDim.x + blockIdx.x] = bv;
    part_i[blockIdx.y * gridDim.x + blockIdx.x] = bi;
  }
}

// One warp per row: the best of the row's partials (the order of a max with this tie rule does not matter), or
// index 0 where the row starts with NaN (what std::max_element answers there).
__global__ void argmax_merge_kernel(const float* x, size_t rows, size_t cols, int parts, const float* part_v,
                                    const int32_t* part_i, int32_t* out) {
  const size_t r = blockIdx.x * static_cast<size_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  float bv = -INFINITY;
  int bi = -1;
  for (int p = lane; p < parts; p += 32) {
    const int i = part_i[r * parts + p];
    if (i >= 0 && better(part_v[r * parts + p], i, bv, bi)) bv = part_v[r * parts + p], bi = i;
  }
  warp_best(bv, bi);
  if (lane == 0) out[r] = bi < 0 || isnan(x[r * cols]) ? 0 : bi;
}

}  // namespace

size_t argmax_rows_workspace_bytes(size_t rows, size_t cols) {
  return rows * ((cols + kArgmaxSpan - 1) / kArgmaxSpan) * (sizeof(float) + sizeof(int32_t));
}

cudaError_t launch_argmax_rows(const float* x, size_t rows, size_t cols, int32_t* out, void* workspace,
                               cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (cols == 0 || cols > (size_t{1} << 31) || rows > 65535) return cudaErrorInvalidValue;
  const size_t parts = (cols + kArgmaxSpan - 1) / kArgmaxSpan;
  float* part_v = static_cast<float*>(workspace);
  int32_t* part_i = reinterpret_cast<int32_t*>(part_v + rows * parts);
  argmax_part_kernel<<<dim3(static_cast<unsigned>(parts), static_cast<unsigned>(rows)), kArgmaxThreads, 0, stream>>>(
      x, cols, part_v, part_i);
  constexpr int kMergeWarps = 4;
  argmax_merge_kernel<<<static_cast<unsigned>((rows + kMergeWarps - 1) / kMergeWarps), kMergeWarps * 32, 0, stream>>>(
      x, rows, cols, static_cast<int>(parts), part_v, part_i, out);
  return cudaGetLastError();
}

}  // namespace mxlm::backend::cuda
