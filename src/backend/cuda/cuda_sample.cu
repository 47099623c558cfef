// Token sampling on the device (Backend::sample_rows): the algorithm of backend/sampling.h, with its arithmetic from
// sampling_math.h, so that a row gives the token the CPU reference gives. One CTA per row, no per-row sort:
//   1. one pass for the best order key (z descending, id ascending) and so z_max;
//   2. top-k and top-p thresholds by radix select over the 64-bit order key (digits of 11/11/10/10/11/11 bits,
//      high first), each pass a shared-memory histogram of the candidates' count and integer weight under the prefix
//      chosen so far; the scan over a histogram is a block scan, and a select stops as soon as the chosen bin holds one
//      candidate (usually after the second digit). Integer sums: the same result in any order, as on the host;
//   3. the draw: per-warp weight totals over contiguous column ranges, a scan of the 32 totals, then the warp whose
//      range holds the drawn point walks it 32 columns at a time.
// Every pass recomputes z, the key and the weight from the logits (cheap), so no scratch memory is needed.
#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "backend/cuda/cuda_kernels.h"
#include "backend/sampling_math.h"

namespace mxlm::backend::cuda {

namespace {

namespace sm = mxlm::backend::sampling;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2048;  // 2 per thread in the scan

struct RowState {
  const float* x;
  uint32_t cols;
  float inv_t;
  float min_p;
  float z_max;
  uint32_t best_fkey;
};

struct Token {
  uint64_t key;
  uint64_t weight;
  bool min_p_ok;
};

// need_weight false: only the key and min-p (the weight stays 0, and min-p costs the exp only when min_p > 0).
__device__ __forceinline__ Token token_at(const RowState& r, uint32_t c, bool need_weight = true) {
  const float z = sm::scaled_logit(r.x[c], r.inv_t);
  Token t;
  t.key = sm::order_key(z, c);
  t.weight = 0;
  t.min_p_ok = true;
  if (need_weight || r.min_p > 0.0f) {
    const float rel = sm::relative_prob(z, r.z_max, static_cast<uint32_t>(t.key >> 32) == r.best_fkey);
    t.weight = sm::integer_weight(rel);
    t.min_p_ok = rel >= r.min_p;
  }
  return t;
}

__device__ __forceinline__ uint64_t shfl_up_u64(uint64_t v, int o) {
  return __shfl_up_sync(0xffffffffu, static_cast<unsigned long long>(v), o);
}

// Exclusive prefix sum of one value per thread in thread order; `total` gets the block's sum. Syncs inside.
__device__ uint64_t block_exclusive_scan(uint64_t v, unsigned long long* warp_sums, uint64_t& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t n = shfl_up_u64(x, o);
    if (lane >= o) x += n;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    uint64_t s = warp_sums[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint64_t n = shfl_up_u64(s, o);
      if (lane >= o) s += n;
    }
    warp_sums[lane] = s;
  }
  __syncthreads();
  total = warp_sums[kWarps - 1];
  const uint64_t before = (warp > 0 ? warp_sums[warp - 1] : 0) + x - v;
  __syncthreads();
  return before;
}

// The histogram lives in dynamic shared memory as `copies` copies (warp w adds to copy w % copies), so that the
// crowded bins of the first digit are contended by fewer warps; the scan sums the copies.
struct SelectShared {
  unsigned long long* mass;  // [copies][kBins]
  unsigned int* count;       // [copies][kBins]
  int copies;
  int aggregate;  // 0: every lane adds; 1: counts per bin and warp, weights per lane; 2: both per bin and warp
  unsigned long long warp_sums[kWarps];
  unsigned long long above;
  unsigned int sel;
  unsigned int sel_count;
};

__device__ __forceinline__ unsigned bin_count(const SelectShared& sh, unsigned b) {
  unsigned n = 0;
  for (int k = 0; k < sh.copies; ++k) n += sh.count[k * kBins + b];
  return n;
}

enum class Cut { TopK, TopP };

// The lowest key tau such that the candidates with key >= tau are the shortest prefix (candidate order) whose mass
// reaches the target; 0 when all candidates are needed. TopK: candidates pass min-p, mass 1 each, target top_k.
// TopP: candidates pass min-p, have key >= tau_k and a positive weight; mass = weight, target ceil(top_p * total).
__device__ uint64_t select_threshold(const RowState& r, Cut cut, uint64_t tau_k, int32_t top_k, float top_p,
                                     SelectShared& sh) {
  uint64_t prefix = 0, prefix_mask = 0, above = 0, target = 0;
  const int t = threadIdx.x;
  int shift = 64;
  for (int d = 0; d < 6; ++d) {
    const int bits = d == 2 || d == 3 ? 10 : 11;  // 11 + 11 + 10 | 10 + 11 + 11: the float key, then the id
    shift -= bits;
    for (int i = t; i < kBins * sh.copies; i += kThreads) sh.count[i] = 0, sh.mass[i] = 0;
    __syncthreads();
    const uint64_t digit_mask = (uint64_t{1} << bits) - 1;
    // Adds per lane (aggregate 0, the default) or warp-aggregated per bin (logits crowd a few bins of the high digits).
    const int lane = t & 31;
    const int copy = (t >> 5) % sh.copies;
    unsigned long long* const mass = sh.mass + copy * kBins;
    unsigned int* const count = sh.count + copy * kBins;
    for (uint32_t c0 = static_cast<uint32_t>(t - lane); c0 < r.cols; c0 += kThreads) {
      const uint32_t c = c0 + static_cast<uint32_t>(lane);
      bool hit = false;
      unsigned b = 0xFFFFFFFFu;
      uint64_t w = 0;
      if (c < r.cols) {
        const Token tok = token_at(r, c, cut == Cut::TopP);
        hit = tok.min_p_ok && (cut == Cut::TopK || (tok.key >= tau_k && tok.weight > 0)) &&
              (tok.key & prefix_mask) == prefix;
        if (hit) b = static_cast<unsigned>((tok.key >> shift) & digit_mask), w = tok.weight;
      }
      if (!__any_sync(0xffffffffu, hit)) continue;  // past the first digit, most warps hold no candidate
      if (sh.aggregate == 0) {                      // every lane adds for itself
        if (hit) {
          atomicAdd(&count[b], 1u);
          atomicAdd(&mass[b], static_cast<unsigned long long>(cut == Cut::TopK ? 1 : w));
        }
        continue;
      }
      const unsigned peers = __match_any_sync(0xffffffffu, b);
      if (hit) {
        const unsigned n = __popc(peers);
        const bool leader = lane == __ffs(peers) - 1;
        if (cut == Cut::TopK) {
          if (leader) atomicAdd(&count[b], n), atomicAdd(&mass[b], static_cast<unsigned long long>(n));
        } else if (sh.aggregate == 1) {  // counts by the bin's leader, weights by every lane
          if (leader) atomicAdd(&count[b], n);
          atomicAdd(&mass[b], static_cast<unsigned long long>(w));
        } else {  // weights <= 2^40: two 20-bit halves, each summed in 32 bits
          const unsigned hi = __reduce_add_sync(peers, static_cast<unsigned>(w >> 20));
          const unsigned lo = __reduce_add_sync(peers, static_cast<unsigned>(w & 0xFFFFFu));
          if (leader) atomicAdd(&count[b], n), atomicAdd(&mass[b], (static_cast<unsigned long long>(hi) << 20) + lo);
        }
      }
    }
    __syncthreads();
    // Bins in descending order: thread t holds j = 2t, 2t + 1, i.e. bins kBins-1-2t and kBins-2-2t.
    const unsigned b0 = kBins - 1 - 2 * t, b1 = kBins - 2 - 2 * t;
    uint64_t m0 = 0, m1 = 0;
    for (int k = 0; k < sh.copies; ++k) m0 += sh.mass[k * kBins + b0], m1 += sh.mass[k * kBins + b1];
    uint64_t total = 0;
    const uint64_t before = above + block_exclusive_scan(m0 + m1, sh.warp_sums, total);
    if (d == 0) {
      target = cut == Cut::TopK ? static_cast<uint64_t>(top_k) : sm::top_p_target(top_p, total);
      if (total <= target) return 0;  // uniform over the block: every candidate stays
    }
    if (before < target && target <= before + m0) {
      sh.sel = b0, sh.above = before, sh.sel_count = bin_count(sh, b0);
    } else if (before + m0 < target && target <= before + m0 + m1) {
      sh.sel = b1, sh.above = before + m0, sh.sel_count = bin_count(sh, b1);
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(sh.sel) << shift;
    prefix_mask |= digit_mask << shift;
    above = sh.above;
    const bool done = sh.sel_count == 1;
    __syncthreads();
    if (done) break;
  }
  return prefix;
}

__device__ __forceinline__ uint64_t warp_sum_u64(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, static_cast<unsigned long long>(v), o);
  return v;
}

__global__ void __launch_bounds__(kThreads) sample_rows_kernel(const float* x, size_t cols, const SampleParams* params,
                                                               int copies, int aggregate, int32_t* out) {
  extern __shared__ unsigned long long histogram[];  // copies * kBins * (8 + 4) bytes
  __shared__ SelectShared sh;
  if (threadIdx.x == 0) {
    sh.copies = copies;
    sh.aggregate = aggregate;
    sh.mass = histogram;
    sh.count = reinterpret_cast<unsigned int*>(histogram + copies * kBins);
  }
  __syncthreads();
  __shared__ unsigned long long best_keys[kWarps];
  __shared__ float best_vals[kWarps];
  __shared__ int best_ids[kWarps];
  const SampleParams p = params[blockIdx.x];
  const float* row = x + blockIdx.x * cols;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t n = static_cast<uint32_t>(cols);

  if (p.temperature == 0.0f) {
    // Greedy: the first index of the largest logit (a strictly larger value replaces the best).
    float bv = -INFINITY;
    int bi = -1;
    for (uint32_t c = threadIdx.x; c < n; c += kThreads) {
      const float v = row[c];
      if (bi < 0 || v > bv) bv = v, bi = static_cast<int>(c);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) bv = ov, bi = oi;
    }
    if (lane == 0) best_vals[warp] = bv, best_ids[warp] = bi;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kWarps; ++w) {
        const float ov = best_vals[w];
        const int oi = best_ids[w];
        if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) bv = ov, bi = oi;
      }
      out[blockIdx.x] = bi;
    }
    return;
  }

  // 1. The best order key.
  RowState r{row, n, sm::inverse_temperature(p.temperature), p.min_p, 0.0f, 0};
  uint64_t best = 0;
  for (uint32_t c = threadIdx.x; c < n; c += kThreads) {
    const uint64_t k = sm::order_key(sm::scaled_logit(row[c], r.inv_t), c);
    best = k > best ? k : best;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t ok = __shfl_xor_sync(0xffffffffu, static_cast<unsigned long long>(best), o);
    best = ok > best ? ok : best;
  }
  if (lane == 0) best_keys[warp] = best;
  __syncthreads();
  best = best_keys[0];
  for (int w = 1; w < kWarps; ++w) best = best_keys[w] > best ? best_keys[w] : best;
  const uint32_t best_id = 0xFFFFFFFFu - static_cast<uint32_t>(best);
  r.z_max = sm::scaled_logit(row[best_id], r.inv_t);
  r.best_fkey = static_cast<uint32_t>(best >> 32);

  // 2. Thresholds.
  uint64_t tau_k = 0, tau_p = 0;
  if (p.top_k > 0) tau_k = select_threshold(r, Cut::TopK, 0, p.top_k, 1.0f, sh);
  if (p.top_p < 1.0f) tau_p = select_threshold(r, Cut::TopP, tau_k, 0, p.top_p, sh);
  const uint64_t tau = tau_k > tau_p ? tau_k : tau_p;

  // 3. The draw, in id order: warp w covers columns [w * span, (w + 1) * span).
  const uint32_t span = ((n + kWarps - 1) / kWarps + 31) / 32 * 32;
  const uint32_t begin = static_cast<uint32_t>(warp) * span;
  const uint32_t end = begin + span < n ? begin + span : n;
  auto kept_weight = [&](uint32_t c) -> uint64_t {
    if (c >= end) return 0;
    const Token tok = token_at(r, c);
    return tok.min_p_ok && tok.key >= tau ? tok.weight : 0;
  };
  uint64_t mine = 0;
  for (uint32_t c = begin + lane; c < end; c += 32) mine += kept_weight(c);
  mine = warp_sum_u64(mine);
  if (lane == 0) sh.warp_sums[warp] = mine;
  __syncthreads();
  // Every thread scans the 32 totals (a broadcast read), so every warp knows whether the point is its own.
  uint64_t total = 0, start = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) start = total;
    total += sh.warp_sums[w];
  }
  const uint64_t point = sm::mul_hi_u64(sm::random_u64(p.seed, p.counter), total);
  if (!(start <= point && point < start + mine)) return;
  uint64_t base = start;
  for (uint32_t c0 = begin; c0 < end; c0 += 32) {
    const uint64_t v = kept_weight(c0 + lane);
    uint64_t incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint64_t nb = shfl_up_u64(incl, o);
      if (lane >= o) incl += nb;
    }
    const unsigned hit = __ballot_sync(0xffffffffu, base + incl > point);
    if (hit) {
      if (lane == 0) out[blockIdx.x] = static_cast<int32_t>(c0 + static_cast<uint32_t>(__ffs(hit) - 1));
      return;
    }
    base += __shfl_sync(0xffffffffu, static_cast<unsigned long long>(incl), 31);
  }
}

}  // namespace

cudaError_t launch_sample_rows(const float* x, size_t rows, size_t cols, const SampleParams* params, int32_t* out,
                               cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  // Histogram copies (1..8) and the warp aggregation of its adds (0..2): MXLM_CUDA_SAMPLE_COPIES /
  // MXLM_CUDA_SAMPLE_AGGREGATE override them, for the benchmark. H100 (bench_cuda_sample, 200064-token rows): one
  // copy with every lane adding for itself is the fastest (top-p 0.9 at 1 row 0.44 ms; aggregate 2: 1.03 ms; 8 copies:
  // no gain). The same per-lane adds into a static __shared__ array (ATOMS instead of these generic atomics) took
  // 0.98 ms in another run: keep this form.
  int copies = 1, aggregate = 0;
  if (const char* env = std::getenv("MXLM_CUDA_SAMPLE_COPIES")) copies = std::clamp(std::atoi(env), 1, 8);
  if (const char* env = std::getenv("MXLM_CUDA_SAMPLE_AGGREGATE")) aggregate = std::clamp(std::atoi(env), 0, 2);
  const size_t smem = static_cast<size_t>(copies) * kBins * (8 + 4);
  // Per device context, so set on every call (a cheap driver call next to the kernel).
  const cudaError_t e =
      cudaFuncSetAttribute(sample_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  sample_rows_kernel<<<static_cast<unsigned>(rows), kThreads, smem, stream>>>(x, cols, params, copies, aggregate, out);
  return cudaGetLastError();
}

}  // namespace mxlm::backend::cuda
