// MoE routing on the device: per-expert counts, offsets, gather / combine lists and the GEMV tile list built by one
// CTA from the router's ids, so a MoE layer needs no host round trip and can be captured in a CUDA graph.
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/cuda_kernels.h"
#include "backend/cuda/cuda_launch.cuh"

namespace mxlm::backend::cuda {

namespace {

constexpr int kRouteThreads = 1024;

__global__ void __launch_bounds__(kRouteThreads)
    moe_route_kernel(const int32_t* ids, const float* weights, int tokens, int k, int first_expert, int num_local,
                     bool shared, int tile_rows, int32_t* offsets, int32_t* gather, float* row_weight, int32_t* combine,
                     int32_t* tiles, int32_t* counts) {
  using Scan = cub::BlockScan<int, kRouteThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int count[kRouteThreads], fill[kRouteThreads], first_row[kRouteThreads];
  // Under PDL: wait for the router, then let the gather launch (its CTAs wait for this kernel in turn).
  pdl_wait();
  pdl_launch_dependents();
  const int tid = threadIdx.x;
  const int total = tokens * k;  // routed assignments
  // The shared expert: local expert num_local, every token once, in the last of k + 1 combine slots per token.
  const int experts = num_local + (shared ? 1 : 0), slots = k + (shared ? 1 : 0);
  count[tid] = 0;
  fill[tid] = 0;
  __syncthreads();
  for (int a = tid; a < total; a += kRouteThreads) {
    const int e = ids[a] - first_expert;
    if (e >= 0 && e < num_local) atomicAdd(&count[e], 1);
  }
  for (int a = tid; a < tokens * slots; a += kRouteThreads) {
    combine[a] = -1;
    gather[a] = 0;
  }
  if (shared && tid == 0) count[num_local] = tokens;
  __syncthreads();
  const int c = tid < experts ? count[tid] : 0;
  int row0 = 0, rows = 0;
  Scan(scan_tmp).ExclusiveSum(c, row0, rows);
  first_row[tid] = row0;
  __syncthreads();
  const int nt = (c + tile_rows - 1) / tile_rows;
  int tile0 = 0, ntiles = 0;
  Scan(scan_tmp).ExclusiveSum(nt, tile0, ntiles);
  if (tid < experts) offsets[tid] = row0;
  if (tid == 0) {
    offsets[experts] = rows;
    counts[0] = ntiles;
    counts[1] = rows;
  }
  for (int i = 0; i < nt; ++i) {
    tiles[3 * (tile0 + i)] = tid;
    tiles[3 * (tile0 + i) + 1] = row0 + i * tile_rows;
    tiles[3 * (tile0 + i) + 2] = min(tile_rows, c - i * tile_rows);
  }
  __syncthreads();
  for (int a = tid; a < total; a += kRouteThreads) {
    const int e = ids[a] - first_expert;
    if (e < 0 || e >= num_local) continue;
    const int r = first_row[e] + atomicAdd(&fill[e], 1);
    const int t = a / k, j = a - t * k;
    gather[r] = t;
    row_weight[r] = weights[a];
    // Position among the token's local rows in ascending expert order (the CPU backend's summation order).
    int slot = 0;
    for (int jj = 0; jj < k; ++jj) {
      const int e2 = ids[t * k + jj] - first_expert;
      if (e2 >= 0 && e2 < num_local && (e2 < e || (e2 == e && jj < j))) ++slot;
    }
    combine[t * slots + slot] = r;
  }
  if (shared) {
    // Rows in token order; each token's last slot, so its sum adds the shared expert after the routed ones.
    for (int t = tid; t < tokens; t += kRouteThreads) {
      const int r = first_row[num_local] + t;
      gather[r] = t;
      row_weight[r] = 1.0f;
      combine[t * slots + k] = r;
    }
  }
}

}  // namespace

int moe_tile_rows(size_t tokens, int k, int num_local) {
  // 8 while an expert holds at most 8 rows (a token picks an expert once) or up to ~6 on average: the GEMV then
  // runs its one-token-tile variant (half the MMAs and staging); a rare 9th row only costs a second tile. On H100
  // (run C) 8-row tiles took the T = 128 layer (4 rows per expert on average) from 2.31 to 1.81 ms.
  const size_t total = tokens * static_cast<size_t>(k);
  // MXLM_CUDA_MOE_TILE_ROWS=8 / 16 overrides (benchmark sweep).
  if (const char* v = std::getenv("MXLM_CUDA_MOE_TILE_ROWS")) {
    if (std::strcmp(v, "8") == 0) return 8;
    if (std::strcmp(v, "16") == 0) return 16;
  }
  return tokens <= 8 || total <= 6 * static_cast<size_t>(std::max(num_local, 1)) ? 8 : 16;
}

int moe_max_tiles(size_t tokens, int k, int num_local) {
  const long total = static_cast<long>(tokens) * k;
  const int tile_rows = moe_tile_rows(tokens, k, num_local);
  return static_cast<int>((total + tile_rows - 1) / tile_rows + std::min<long>(num_local, total));
}

cudaError_t launch_moe_route(const int32_t* ids, const float* weights, size_t tokens, int k, int first_expert,
                             int num_local, int32_t* offsets, int32_t* gather, float* row_weight, int32_t* combine,
                             int32_t* tiles, int32_t* counts, cudaStream_t stream, bool pdl, bool shared_expert) {
  if (tokens == 0) return cudaSuccess;
  const int experts = num_local + (shared_expert ? 1 : 0), slots = k + (shared_expert ? 1 : 0);
  if (num_local < 1 || experts > kRouteThreads || k < 1 || tokens * static_cast<size_t>(slots) > (1u << 30))
    return cudaErrorInvalidValue;
  const int tile_rows = moe_tile_rows(tokens, slots, experts);
  return launch_kernel(moe_route_kernel, dim3(1), dim3(kRouteThreads), 0, stream, pdl, ids, weights,
                       static_cast<int>(tokens), k, first_expert, num_local, shared_expert, tile_rows, offsets, gather,
                       row_weight, combine, tiles, counts);
}

}  // namespace mxlm::backend::cuda
