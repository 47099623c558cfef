// Paged attention (dense causal and block-sparse) and the lightning indexer's block selection.
//
// Attention is split over the key range (flash decoding): a CTA takes one (row, KV head) and a run of keys, sized so
// that the grid fills the card even for one sequence, and writes (max, sum, unnormalised output) per query head to a
// workspace; a second kernel merges the splits. Inside a CTA the keys stream through a 3-stage cp.async pipeline of
// 32-key tiles (16-byte copies, two tiles in flight while one is computed; every key row's page looked up once per
// tile), and the whole GQA group (up to 16 query heads) is one m16 tensor-core tile: S = Q·Kᵀ and O += P·V are
// mma.sync m16n8k8 TF32 products in the 3xTF32 split (x = big + small, big·big + big·small + small·big), which keeps
// f32 accuracy (relative error ~2^-21 per product, f32 accumulation) while K/V bytes, not FMAs, bound the kernel.
// Each warp owns 8 keys of a tile with its own online softmax; the 4 warps are merged at the end.
#include <cuda_bf16.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "backend/cuda/cuda_kernels.h"

namespace mxlm::backend::cuda {

namespace {

constexpr int kAttnWarps = 4;
constexpr int kTileKeys = 8 * kAttnWarps;  // keys per pipeline stage (8 per warp: one mma n-block)
constexpr int kStages = 3;
constexpr int kMaxGroup = 16;  // query heads per KV head: the mma's 16 rows

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: zero-fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// x = big + small, both TF32 (big: x rounded to 10 mantissa bits; the remainder is exact in f32).
struct Tf32Pair {
  uint32_t big, small;
};
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r & 0xffffe000u;
}
__device__ __forceinline__ Tf32Pair split_tf32(float x) {
  const uint32_t big = to_tf32(x);
  return {big, to_tf32(x - __uint_as_float(big))};
}

__device__ __forceinline__ void mma_tf32(float d[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The cache element: f32, or bf16 bits (exact in TF32, so its small half is zero and one product term drops).
template <typename KV>
struct Kv;
template <>
struct Kv<float> {
  static constexpr int kPad = 4;  // row padding (elements): conflict-free fragment loads, rows 16-byte aligned
  static constexpr bool kExactTf32 = false;
  __device__ static Tf32Pair split(const float* p) { return split_tf32(*p); }
};
template <>
struct Kv<uint16_t> {
  static constexpr int kPad = 8;
  static constexpr bool kExactTf32 = true;
  __device__ static Tf32Pair split(const uint16_t* p) { return {static_cast<uint32_t>(*p) << 16, 0u}; }
};

// d += a · b in 3xTF32 (the small·small term, ~2^-22 relative, is dropped; b.small too when b is exact in TF32).
template <bool kBExact>
__device__ __forceinline__ void mma_split(float d[4], const Tf32Pair a[4], Tf32Pair b0, Tf32Pair b1) {
  mma_tf32(d, a[0].small, a[1].small, a[2].small, a[3].small, b0.big, b1.big);
  if constexpr (!kBExact) mma_tf32(d, a[0].big, a[1].big, a[2].big, a[3].big, b0.small, b1.small);
  mma_tf32(d, a[0].big, a[1].big, a[2].big, a[3].big, b0.big, b1.big);
}

template <int NB>
__host__ __device__ constexpr int q_stride() {  // floats per row of the staged queries
  return 8 * NB + 4;
}
template <int NB, typename KV>
__host__ __device__ constexpr int kv_stride() {  // elements per row of a staged K/V tile
  return 8 * NB + Kv<KV>::kPad;
}

template <int NB, typename KV>
constexpr size_t attention_smem_bytes() {
  return static_cast<size_t>(kMaxGroup) * q_stride<NB>() * sizeof(float) +
         2 * static_cast<size_t>(kStages) * kTileKeys * kv_stride<NB, KV>() * sizeof(KV) +
         static_cast<size_t>(kStages) * kTileKeys * sizeof(int);
}

// Fragment layouts of mma.m16n8k8 (lane = 4 g + t): A rows g, g + 8 and columns t, t + 4; B column g, rows t, t + 4;
// C rows g, g + 8 and columns 2t, 2t + 1. S = Q·Kᵀ has query heads as rows and the warp's 8 keys as columns. For
// O += P·V the key order of P's columns is permuted to (2t, 2t + 1) -> (t, t + 4), so a lane's S accumulators are
// directly its P fragment; V's rows are read in the same permuted order (a sum over keys ignores the order).
template <int NB, typename KV>  // n-blocks of 8 dims: head_dim <= 8 * NB; KV: float or uint16_t (bf16 bits)
__global__ void __launch_bounds__(kAttnWarps * 32, 2)
    attention_split_kernel(const float* __restrict__ q, AttentionRows rows, int num_heads, int num_kv_heads, int D,
                           float scale, const KV* __restrict__ k_cache, const KV* __restrict__ v_cache,
                           const int32_t* __restrict__ blocks, int topk, int keys_per_split, int splits,
                           float* __restrict__ ws) {
  constexpr int QP = q_stride<NB>(), DP = kv_stride<NB, KV>();
  // The merge of the warps reuses the K/V stages.
  static_assert(2 * kStages * kTileKeys * DP * sizeof(KV) >= kAttnWarps * kMaxGroup * (8 * NB + 2) * sizeof(float));
  const int row = blockIdx.x / num_kv_heads, kvh = blockIdx.x % num_kv_heads;
  const int split = blockIdx.y;
  const int G = num_heads / num_kv_heads;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int bs = rows.block_size;
  const int pos = rows.pos[row];
  const int32_t* table = rows.tables + rows.table_offset[row];
  const int32_t* sel = blocks ? blocks + (static_cast<size_t>(row) * num_kv_heads + kvh) * topk : nullptr;
  const int units = blocks ? topk : pos / bs + 1;
  // Virtual keys: v -> unit v / bs (its block: sel[unit] or the unit itself), offset v % bs in the block.
  const int v_begin = split * keys_per_split, v_end = min(units * bs, v_begin + keys_per_split);
  const int tiles = v_end > v_begin ? (v_end - v_begin + kTileKeys - 1) / kTileKeys : 0;
  const size_t width = static_cast<size_t>(num_kv_heads) * D;

  extern __shared__ __align__(16) float smem[];
  float* qs = smem;                                                    // [16][QP], scaled; zero rows >= G
  KV* kbuf = reinterpret_cast<KV*>(qs + kMaxGroup * QP);               // [stages][tile keys][DP]
  KV* vbuf = kbuf + static_cast<size_t>(kStages) * kTileKeys * DP;     // [stages][tile keys][DP]
  int* kvalid = reinterpret_cast<int*>(vbuf + static_cast<size_t>(kStages) * kTileKeys * DP);  // [stages][keys]

  // Loader: 4 threads per key of a tile; thread `sub` copies the 16-byte chunks sub, sub + 4, ... of the key's K and
  // V rows, so 4 neighbouring lanes read 64 contiguous bytes.
  const int lkey = tid >> 2, lsub = tid & 3;
  auto issue = [&](int tile) {
    const int st = tile % kStages;
    const int v = v_begin + tile * kTileKeys + lkey;
    bool valid = false;
    size_t off = 0;
    if (v < v_end) {
      const int u = v / bs, in = v % bs;
      const int b = sel ? sel[u] : u;
      valid = b >= 0 && b * bs + in <= pos;
      if (valid) off = (static_cast<size_t>(table[b]) * bs + in) * width + static_cast<size_t>(kvh) * D;
    }
    char* kd = reinterpret_cast<char*>(kbuf + (static_cast<size_t>(st) * kTileKeys + lkey) * DP);
    char* vd = reinterpret_cast<char*>(vbuf + (static_cast<size_t>(st) * kTileKeys + lkey) * DP);
    const char* ks = reinterpret_cast<const char*>(k_cache + off);
    const char* vs = reinterpret_cast<const char*>(v_cache + off);
    for (int c = lsub; c < D * static_cast<int>(sizeof(KV)) / 16; c += 4) {
      cp_async_16(kd + 16 * c, ks + 16 * c, valid);
      cp_async_16(vd + 16 * c, vs + 16 * c, valid);
    }
    if (lsub == 0) kvalid[st * kTileKeys + lkey] = valid;
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) issue(s);
    cp_async_commit();
  }

  const float* qrow = q + static_cast<size_t>(row) * num_heads * D + static_cast<size_t>(kvh) * G * D;
  {  // The scaled queries as 16-byte chunks, every load of a thread issued before its stores (one memory latency).
    constexpr int kChunks = kMaxGroup * QP / 4, kPer = (kChunks + kAttnWarps * 32 - 1) / (kAttnWarps * 32);
    float4 v[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int j = tid + k * kAttnWarps * 32, h = j / (QP / 4), d = j % (QP / 4) * 4;
      v[k] = j < kChunks && h < G && d < D ? *reinterpret_cast<const float4*>(qrow + static_cast<size_t>(h) * D + d)
                                           : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int j = tid + k * kAttnWarps * 32;
      if (j < kChunks)
        *reinterpret_cast<float4*>(qs + 4 * j) = make_float4(v[k].x * scale, v[k].y * scale, v[k].z * scale, v[k].w * scale);
    }
  }

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // heads g and g + 8
  float o[NB][4];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;

  for (int tile = 0; tile < tiles; ++tile) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `tile` landed for every thread; every warp is done with the stage reloaded next
    if (tile + kStages - 1 < tiles) issue(tile + kStages - 1);
    cp_async_commit();
    const int st = tile % kStages;
    const KV* kt = kbuf + (static_cast<size_t>(st) * kTileKeys + warp * 8) * DP;
    const KV* vt = vbuf + (static_cast<size_t>(st) * kTileKeys + warp * 8) * DP;

    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int kk = 0; kk < NB; ++kk) {
      if (kk * 8 >= D) break;
      const int d0 = kk * 8 + t;
      const Tf32Pair a[4] = {split_tf32(qs[g * QP + d0]), split_tf32(qs[(g + 8) * QP + d0]),
                             split_tf32(qs[g * QP + d0 + 4]), split_tf32(qs[(g + 8) * QP + d0 + 4])};
      mma_split<Kv<KV>::kExactTf32>(s, a, Kv<KV>::split(kt + g * DP + d0), Kv<KV>::split(kt + g * DP + d0 + 4));
    }
    const int* kv = kvalid + st * kTileKeys + warp * 8;
    const bool v0 = kv[2 * t] != 0, v1 = kv[2 * t + 1] != 0;
    float p[4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // r = 0: head g (s[0], s[1]); r = 1: head g + 8 (s[2], s[3])
      const float s0 = v0 ? s[2 * r] : -INFINITY, s1 = v1 ? s[2 * r + 1] : -INFINITY;
      float mx = fmaxf(s0, s1);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = fmaxf(m[r], mx);
      const float corr = mn == -INFINITY ? 1.0f : expf(m[r] - mn);
      p[2 * r] = v0 ? expf(s0 - mn) : 0.0f;
      p[2 * r + 1] = v1 ? expf(s1 - mn) : 0.0f;
      l[r] = l[r] * corr + p[2 * r] + p[2 * r + 1];  // per-lane partial sum, reduced once at the end
      m[r] = mn;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        o[nb][2 * r] *= corr;
        o[nb][2 * r + 1] *= corr;
      }
    }
    // P's A fragment with the permuted key order: column t <- key 2t, column t + 4 <- key 2t + 1.
    const Tf32Pair pa[4] = {split_tf32(p[0]), split_tf32(p[2]), split_tf32(p[1]), split_tf32(p[3])};
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      if (nb * 8 >= D) break;
      const int d = nb * 8 + g;
      mma_split<Kv<KV>::kExactTf32>(o[nb], pa, Kv<KV>::split(vt + (2 * t) * DP + d),
                                    Kv<KV>::split(vt + (2 * t + 1) * DP + d));
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }

  // Merge the warps of this CTA (the stage buffers are free now).
  cp_async_wait<0>();
  __syncthreads();
  float* wstate = reinterpret_cast<float*>(kbuf);  // [warps][16][D + 2]: max, sum, output
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float* st = wstate + (static_cast<size_t>(warp) * kMaxGroup + g + 8 * r) * (D + 2);
    if (t == 0) {
      st[0] = m[r];
      st[1] = l[r];
    }
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      if (nb * 8 >= D) break;
      st[2 + nb * 8 + 2 * t] = o[nb][2 * r];
      st[2 + nb * 8 + 2 * t + 1] = o[nb][2 * r + 1];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * (D + 2); idx += blockDim.x) {
    const int h = idx / (D + 2), c = idx % (D + 2);
    float M = -INFINITY;
    for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, wstate[(static_cast<size_t>(w) * kMaxGroup + h) * (D + 2)]);
    float v = 0.0f;
    if (c == 0) {
      v = M;
    } else if (M != -INFINITY) {
      for (int w = 0; w < kAttnWarps; ++w) {
        const float* st = wstate + (static_cast<size_t>(w) * kMaxGroup + h) * (D + 2);
        if (st[0] != -INFINITY) v += st[c] * expf(st[0] - M);
      }
    }
    const size_t head = static_cast<size_t>(row) * num_heads + static_cast<size_t>(kvh) * G + h;
    ws[(head * splits + split) * (D + 2) + c] = v;
  }
}

constexpr int kMergeThreads = 256;  // 8 groups of 32 lanes: groups take every 8th split, lanes the head dims

__device__ __forceinline__ float block_reduce(float v, bool take_max, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = take_max ? fmaxf(v, w) : v + w;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // scratch may still be read from a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < kMergeThreads / 32; ++w) v = take_max ? fmaxf(v, scratch[w]) : v + scratch[w];
  return v;
}

// One CTA per (row, head): split weights exp(m_s - M) computed once into shared memory, then every group of 32
// lanes sums every 8th split's outputs (independent loads in flight), and the 8 partial sums are added.
__global__ void __launch_bounds__(kMergeThreads) attention_merge_kernel(const float* ws, int splits, int head_dim,
                                                                        float* out) {
  extern __shared__ float msm[];  // [splits] weights, [8][head_dim] partial outputs, [8] reduction scratch
  float* weight = msm;
  float* partial = msm + splits;
  float* scratch = partial + 8 * head_dim;
  const size_t head = blockIdx.x;  // row * num_heads + h
  const size_t stride = static_cast<size_t>(head_dim) + 2;
  const float* base = ws + head * static_cast<size_t>(splits) * stride;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) mx = fmaxf(mx, base[s * stride]);
  const float M = block_reduce(mx, true, scratch);
  float lsum = 0.0f;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    const float ms = base[s * stride];
    const float w = ms == -INFINITY ? 0.0f : expf(ms - M);
    weight[s] = w;
    lsum += w * base[s * stride + 1];
  }
  const float L = block_reduce(lsum, false, scratch);  // its barriers also publish `weight`
  const int group = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // dims lane + 32 j (head_dim <= 256)
  for (int s = group; s < splits; s += 8) {
    const float w = weight[s];
    if (w == 0.0f) continue;
    const float* v = base + s * stride + 2;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (lane + 32 * j < head_dim) acc[j] += w * v[lane + 32 * j];
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (lane + 32 * j < head_dim) partial[group * head_dim + lane + 32 * j] = acc[j];
  __syncthreads();
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
    float a = 0.0f;
    for (int g = 0; g < 8; ++g) a += partial[g * head_dim + c];
    out[head * head_dim + c] = L > 0.0f ? a / L : 0.0f;
  }
}

cudaError_t launch_merge(const float* ws, size_t heads, int splits, int head_dim, float* out, cudaStream_t stream) {
  const size_t smem = (static_cast<size_t>(splits) + 8 * static_cast<size_t>(head_dim) + 8) * sizeof(float);
  if (smem > 48 * 1024) {
    static bool configured = false;
    if (!configured) {
      const cudaError_t e =
          cudaFuncSetAttribute(attention_merge_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
      if (e != cudaSuccess) return e;
      configured = true;
    }
  }
  attention_merge_kernel<<<static_cast<unsigned>(heads), kMergeThreads, smem, stream>>>(ws, splits, head_dim, out);
  return cudaGetLastError();
}

// One CTA per (row, index head): block max scores into shared memory, forced blocks, then top-k by repeated
// arg-max (score descending, lower block id first on ties).
__device__ __forceinline__ float cache_value(const float* p) { return *p; }
__device__ __forceinline__ float cache_value(const uint16_t* p) { return __uint_as_float(static_cast<uint32_t>(*p) << 16); }

// Orderable encoding of floats for atomicMax (no NaNs reach it).
__device__ __forceinline__ unsigned ordered(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}
__device__ __forceinline__ float from_ordered(unsigned o) {
  return __uint_as_float((o & 0x80000000u) ? o & 0x7fffffffu : ~o);
}

constexpr int kScoreThreads = 128;
constexpr int kMaxIndexHeads = 8;

// Block max scores of the lightning indexer, spread over the card: CTA (row, chunk) takes `per_cta` blocks of its
// row; each thread scores whole keys (all index heads at once: the index-K row is shared by the heads, so it is read
// once) and folds them into per-(head, block) maxima in shared memory. scores: [rows, heads, stride].
template <typename KV>
__global__ void __launch_bounds__(kScoreThreads)
    index_scores_kernel(const float* __restrict__ iq, AttentionRows rows, int heads, int head_dim,
                        const KV* __restrict__ ik_cache, int per_cta, int stride, float* __restrict__ scores) {
  const int row = blockIdx.x, chunk = blockIdx.y;
  const int bs = rows.block_size, pos = rows.pos[row];
  const int visible = pos / bs + 1;
  const int b0 = chunk * per_cta, b1 = min(visible, b0 + per_cta);
  if (b0 >= b1) return;
  const int32_t* table = rows.tables + rows.table_offset[row];
  extern __shared__ __align__(16) float ismem[];
  float* qs = ismem;                                                      // [heads][head_dim]
  unsigned* best = reinterpret_cast<unsigned*>(qs + heads * head_dim);  // [heads][per_cta]
  for (int i = threadIdx.x; i < heads * head_dim; i += blockDim.x)
    qs[i] = iq[static_cast<size_t>(row) * heads * head_dim + i];
  for (int i = threadIdx.x; i < heads * per_cta; i += blockDim.x) best[i] = ordered(-INFINITY);
  __syncthreads();
  const int kend = min(b1 * bs, pos + 1);
  for (int key = b0 * bs + threadIdx.x; key < kend; key += blockDim.x) {
    const int b = key / bs;
    const KV* kr = ik_cache + (static_cast<size_t>(table[b]) * bs + static_cast<size_t>(key % bs)) * head_dim;
    float acc[kMaxIndexHeads];
#pragma unroll
    for (int h = 0; h < kMaxIndexHeads; ++h) acc[h] = 0.0f;
#pragma unroll 8
    for (int c = 0; c < head_dim; c += 4) {  // unrolled: eight 16-byte loads of the row in flight
      float k4[4];
      if constexpr (sizeof(KV) == 4) {
        const float4 v = *reinterpret_cast<const float4*>(kr + c);
        k4[0] = v.x, k4[1] = v.y, k4[2] = v.z, k4[3] = v.w;
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(kr + c);
        k4[0] = __uint_as_float(v.x << 16), k4[1] = __uint_as_float(v.x & 0xffff0000u);
        k4[2] = __uint_as_float(v.y << 16), k4[3] = __uint_as_float(v.y & 0xffff0000u);
      }
#pragma unroll
      for (int h = 0; h < kMaxIndexHeads; ++h) {
        if (h < heads) {
          const float4 q4 = *reinterpret_cast<const float4*>(qs + h * head_dim + c);
          acc[h] += q4.x * k4[0] + q4.y * k4[1] + q4.z * k4[2] + q4.w * k4[3];
        }
      }
    }
#pragma unroll
    for (int h = 0; h < kMaxIndexHeads; ++h)
      if (h < heads && !isnan(acc[h])) atomicMax(&best[h * per_cta + (b - b0)], ordered(acc[h]));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < heads * (b1 - b0); i += blockDim.x) {
    const int h = i / (b1 - b0), b = b0 + i % (b1 - b0);
    scores[(static_cast<size_t>(row) * heads + h) * stride + b] = from_ordered(best[h * per_cta + (b - b0)]);
  }
}

// Top-k of one (row, index head): block max scores (computed here, one warp per block, when `scores` is null: the
// previous single-kernel path, kept as the benchmark's baseline; else read from index_scores_kernel's output), forced
// blocks, then top-k by repeated arg-max (score descending, lower block id first on ties).
template <typename KV>
__global__ void index_select_kernel(const float* iq, AttentionRows rows, int heads, int head_dim, int topk,
                                    int local_blocks, int init_blocks, const KV* ik_cache, const float* scores,
                                    int stride, int32_t* out) {
  const int row = blockIdx.x / heads, h = blockIdx.x % heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int bs = rows.block_size;
  const int pos = rows.pos[row];
  const int32_t* table = rows.tables + rows.table_offset[row];
  const int visible = pos / bs + 1;
  extern __shared__ float score[];  // [visible], then reduction scratch
  unsigned char* taken = reinterpret_cast<unsigned char*>(score + visible);
  __shared__ float red_s[32];
  __shared__ int red_i[32];
  const float* qh = iq + (static_cast<size_t>(row) * heads + h) * head_dim;

  if (scores) {
    for (int b = threadIdx.x; b < visible; b += blockDim.x) {
      score[b] = scores[(static_cast<size_t>(row) * heads + h) * stride + b];
      taken[b] = 0;
    }
  }
  for (int b = warp; !scores && b < visible; b += nwarps) {
    float best = -INFINITY;
    const size_t page = static_cast<size_t>(table[b]);
    const int kend = min((b + 1) * bs, pos + 1);
    for (int key = b * bs; key < kend; ++key) {
      const KV* kr = ik_cache + (page * bs + static_cast<size_t>(key % bs)) * head_dim;
      float s = 0.0f;
      for (int c = lane; c < head_dim; c += 32) s += qh[c] * cache_value(kr + c);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (!isnan(s)) best = fmaxf(best, s);
    }
    if (lane == 0) {
      score[b] = best;
      taken[b] = 0;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int j = 0; j < local_blocks; ++j) score[max(0, visible - 1 - j)] = INFINITY;
    for (int j = 0; j < min(init_blocks, visible); ++j) score[j] = INFINITY;
  }
  __syncthreads();
  int32_t* o = out + (static_cast<size_t>(row) * heads + h) * topk;
  const int take = min(topk, visible);
  if (visible <= 1024) {
    // Up to 1024 visible blocks: each block's rank in (score descending, id ascending) order by
    // counting, one pass without barriers; the same order as the repeated arg-max below.
    for (int b = threadIdx.x; b < visible; b += blockDim.x) {
      const float sb = score[b];
      int rank = 0;
      for (int c = 0; c < visible; ++c) {
        const float sc = score[c];
        rank += sc > sb || (sc == sb && c < b);
      }
      if (rank < topk) o[rank] = b;
    }
    for (int j = take + threadIdx.x; j < topk; j += blockDim.x) o[j] = -1;
    return;
  }
  for (int j = 0; j < take; ++j) {
    float bsc = -INFINITY;
    int bid = -1;
    for (int b = threadIdx.x; b < visible; b += blockDim.x) {
      if (taken[b]) continue;
      if (bid < 0 || score[b] > bsc) {  // ascending b per thread: equal scores keep the lower id
        bsc = score[b];
        bid = b;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float os = __shfl_xor_sync(0xffffffffu, bsc, off);
      const int oi = __shfl_xor_sync(0xffffffffu, bid, off);
      if (oi >= 0 && (bid < 0 || os > bsc || (os == bsc && oi < bid))) {
        bsc = os;
        bid = oi;
      }
    }
    if (lane == 0) {
      red_s[warp] = bsc;
      red_i[warp] = bid;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float fs = red_s[0];
      int fi = red_i[0];
      for (int w = 1; w < nwarps; ++w)
        if (red_i[w] >= 0 && (fi < 0 || red_s[w] > fs || (red_s[w] == fs && red_i[w] < fi))) {
          fs = red_s[w];
          fi = red_i[w];
        }
      o[j] = fi;
      taken[fi] = 1;
    }
    __syncthreads();
  }
  for (int j = take + threadIdx.x; j < topk; j += blockDim.x) o[j] = -1;
}

template <int NB, typename KV>
cudaError_t launch_split(const float* q, const AttentionRows& rows, int num_heads, int num_kv_heads, int D, float scale,
                         const void* k_cache, const void* v_cache, const int32_t* blocks, int topk,
                         int keys_per_split, int splits, float* ws, cudaStream_t stream) {
  constexpr size_t smem = attention_smem_bytes<NB, KV>();
  static bool configured = false;
  if (!configured) {
    const cudaError_t e =
        cudaFuncSetAttribute(attention_split_kernel<NB, KV>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  const dim3 grid(static_cast<unsigned>(rows.rows * num_kv_heads), static_cast<unsigned>(splits));
  attention_split_kernel<NB, KV><<<grid, kAttnWarps * 32, smem, stream>>>(
      q, rows, num_heads, num_kv_heads, D, scale, static_cast<const KV*>(k_cache), static_cast<const KV*>(v_cache),
      blocks, topk, keys_per_split, splits, ws);
  return cudaGetLastError();
}

// ---- The previous decode attention (SIMT f32 FMAs, one 128-key split per CTA), kept only as the baseline that
// bench/bench_cuda_decode.cc measures the kernel above against in the same run.
constexpr int kSimtWarps = 4;
constexpr int kSimtMaxGroup = 16;
constexpr int kSimtKeysPerSplit = 128;

template <int DPL>  // dims per lane: head_dim <= 32 * DPL
__global__ void __launch_bounds__(kSimtWarps * 32)
    attention_simt_kernel(const float* q, AttentionRows rows, int num_heads, int num_kv_heads, int D, float scale,
                           const float* k_cache, const float* v_cache, const int32_t* blocks, int topk,
                           int units_per_split, int splits, float* ws) {
  const int row = blockIdx.x / num_kv_heads, kvh = blockIdx.x % num_kv_heads;
  const int split = blockIdx.y;
  const int G = num_heads / num_kv_heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int bs = rows.block_size;
  const int pos = rows.pos[row];
  const int32_t* table = rows.tables + rows.table_offset[row];
  const int units = blocks ? topk : pos / bs + 1;
  const int u0 = split * units_per_split, u1 = min(units, u0 + units_per_split);
  const size_t width = static_cast<size_t>(num_kv_heads) * D;

  extern __shared__ float smem[];
  float* qs = smem;                                  // [G][D], pre-scaled
  float* ps = qs + static_cast<size_t>(G) * D;       // [warps][32 keys][kSimtMaxGroup] probabilities
  float* wstate = ps + kSimtWarps * 32 * kSimtMaxGroup;  // [warps][G][D + 2]
  const float* qrow = q + static_cast<size_t>(row) * num_heads * D + static_cast<size_t>(kvh) * G * D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) qs[i] = qrow[i] * scale;
  __syncthreads();

  float m[kSimtMaxGroup], l[kSimtMaxGroup], acc[kSimtMaxGroup][DPL];
#pragma unroll
  for (int h = 0; h < kSimtMaxGroup; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[h][i] = 0.0f;
  }
  float* pw = ps + warp * 32 * kSimtMaxGroup;

  // Tiles of 32 keys per warp: scores with one key per lane (K row read by its lane, q broadcast from shared
  // memory), then P·V with the lanes across the head dims (V rows read coalesced, p broadcast from shared memory).
  for (int u = u0; u < u1; ++u) {
    const int b = blocks ? blocks[(static_cast<size_t>(row) * num_kv_heads + kvh) * topk + u] : u;
    if (b < 0 || b > pos / bs) continue;
    const size_t page = static_cast<size_t>(table[b]);
    const int kbeg = b * bs, kend = min((b + 1) * bs, pos + 1);
    for (int t0 = kbeg + warp * 32; t0 < kend; t0 += kSimtWarps * 32) {
      const int key = t0 + lane;
      const bool valid = key < kend;
      float s[kSimtMaxGroup];
#pragma unroll
      for (int h = 0; h < kSimtMaxGroup; ++h) s[h] = 0.0f;
      if (valid) {
        const float* kr =
            k_cache + (page * bs + static_cast<size_t>(key - kbeg)) * width + static_cast<size_t>(kvh) * D;
        // The K row in groups of 8 float4 loads issued together (one memory latency per 32 dims, not per 4).
#pragma unroll
        for (int d0 = 0; d0 < 32 * DPL; d0 += 32) {
          float4 kk[8];
#pragma unroll
          for (int e = 0; e < 8; ++e)
            kk[e] = d0 + 4 * e < D ? *reinterpret_cast<const float4*>(kr + d0 + 4 * e) : make_float4(0, 0, 0, 0);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (d0 + 4 * e < D) {
#pragma unroll
              for (int h = 0; h < kSimtMaxGroup; ++h) {
                if (h < G) {
                  const float4 qq = *reinterpret_cast<const float4*>(qs + h * D + d0 + 4 * e);
                  s[h] += qq.x * kk[e].x + qq.y * kk[e].y + qq.z * kk[e].z + qq.w * kk[e].w;
                }
              }
            }
          }
        }
      }
#pragma unroll
      for (int h = 0; h < kSimtMaxGroup; ++h) {
        if (h < G) {
          float mt = valid ? s[h] : -INFINITY;
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
          const float mn = fmaxf(m[h], mt);
          const float corr = expf(m[h] - mn);
          const float p = valid ? expf(s[h] - mn) : 0.0f;
          l[h] = l[h] * corr + p;  // per-lane partial sum, reduced once at the end
#pragma unroll
          for (int i = 0; i < DPL; ++i) acc[h][i] *= corr;
          m[h] = mn;
          pw[lane * kSimtMaxGroup + h] = p;
        }
      }
      __syncwarp();
      const int nk = min(32, kend - t0);
      constexpr int kV = 8 / DPL > 0 ? 8 / DPL : 1;  // V rows loaded together (8 floats per lane in flight)
      for (int j0 = 0; j0 < nk; j0 += kV) {
        float vb[kV][DPL];
#pragma unroll
        for (int jj = 0; jj < kV; ++jj) {
          const float* vr = v_cache + (page * bs + static_cast<size_t>(t0 + min(j0 + jj, nk - 1) - kbeg)) * width +
                            static_cast<size_t>(kvh) * D;
#pragma unroll
          for (int i = 0; i < DPL; ++i) vb[jj][i] = lane + 32 * i < D ? vr[lane + 32 * i] : 0.0f;
        }
#pragma unroll
        for (int jj = 0; jj < kV; ++jj) {
          const int j = j0 + jj;
          if (j >= nk) break;
          float vv[DPL];
#pragma unroll
          for (int i = 0; i < DPL; ++i) vv[i] = vb[jj][i];
          float pv[kSimtMaxGroup];
#pragma unroll
          for (int h4 = 0; h4 < kSimtMaxGroup / 4; ++h4) {
            const float4 p4 = *reinterpret_cast<const float4*>(pw + j * kSimtMaxGroup + 4 * h4);
            pv[4 * h4] = p4.x;
            pv[4 * h4 + 1] = p4.y;
            pv[4 * h4 + 2] = p4.z;
            pv[4 * h4 + 3] = p4.w;
          }
#pragma unroll
          for (int h = 0; h < kSimtMaxGroup; ++h)
            if (h < G)
#pragma unroll
              for (int i = 0; i < DPL; ++i) acc[h][i] += pv[h] * vv[i];
        }
      }
      __syncwarp();
    }
  }
#pragma unroll
  for (int h = 0; h < kSimtMaxGroup; ++h)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l[h] += __shfl_xor_sync(0xffffffffu, l[h], o);

      // Merge the warps of this CTA.
#pragma unroll
  for (int h = 0; h < kSimtMaxGroup; ++h) {
    if (h < G) {
      float* st = wstate + (static_cast<size_t>(warp) * G + h) * (D + 2);
      if (lane == 0) {
        st[0] = m[h];
        st[1] = l[h];
      }
#pragma unroll
      for (int i = 0; i < DPL; ++i)
        if (lane + 32 * i < D) st[2 + lane + 32 * i] = acc[h][i];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * (D + 2); idx += blockDim.x) {
    const int h = idx / (D + 2), c = idx % (D + 2);
    float M = -INFINITY;
    for (int w = 0; w < kSimtWarps; ++w) M = fmaxf(M, wstate[(static_cast<size_t>(w) * G + h) * (D + 2)]);
    float v = 0.0f;
    if (c == 0) {
      v = M;
    } else if (M != -INFINITY) {
      for (int w = 0; w < kSimtWarps; ++w) {
        const float* st = wstate + (static_cast<size_t>(w) * G + h) * (D + 2);
        if (st[0] != -INFINITY) v += st[c] * expf(st[0] - M);
      }
    }
    const size_t head = static_cast<size_t>(row) * num_heads + static_cast<size_t>(kvh) * G + h;
    ws[(head * splits + split) * (D + 2) + c] = v;
  }
}

template <int DPL>
cudaError_t launch_simt(const float* q, const AttentionRows& rows, int num_heads, int num_kv_heads, int D, float scale,
                         const float* k_cache, const float* v_cache, const int32_t* blocks, int topk,
                         int units_per_split, int splits, float* ws, cudaStream_t stream) {
  const int G = num_heads / num_kv_heads;
  const size_t smem =
      (static_cast<size_t>(G) * D + kSimtWarps * 32 * kSimtMaxGroup + static_cast<size_t>(kSimtWarps) * G * (D + 2)) *
      sizeof(float);
  static bool configured = false;
  if (!configured) {
    const cudaError_t e =
        cudaFuncSetAttribute(attention_simt_kernel<DPL>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  const dim3 grid(static_cast<unsigned>(rows.rows * num_kv_heads), static_cast<unsigned>(splits));
  attention_simt_kernel<DPL><<<grid, kSimtWarps * 32, smem, stream>>>(
      q, rows, num_heads, num_kv_heads, D, scale, k_cache, v_cache, blocks, topk, units_per_split, splits, ws);
  return cudaGetLastError();
}

}  // namespace

int attention_keys_per_split(int rows, int num_kv_heads, int max_keys, int multiprocessors) {
  // About two CTAs per multiprocessor (the two that are resident: one wave) over all (row, KV head) pairs: the best
  // of a sweep of keys per split on an H100 (bench_cuda_decode "split sweep": 1 x 8K 36 us vs 50 us at four CTAs per
  // multiprocessor, 1 x 64K 171 vs 188 us, 8 x 2K 58 vs 70 us, 32 x 2K 173 vs 185 us).
  const long long items = static_cast<long long>(rows > 0 ? rows : 1) * (num_kv_heads > 0 ? num_kv_heads : 1);
  const long long want = 2LL * (multiprocessors > 0 ? multiprocessors : 1);
  const long long splits = want / items > 1 ? want / items : 1;
  const long long keys = max_keys > 0 ? max_keys : 1;
  const long long per = (keys + splits - 1) / splits;
  return static_cast<int>((per + kTileKeys - 1) / kTileKeys * kTileKeys);
}

size_t attention_workspace_floats(int rows, int num_heads, int head_dim, int splits) {
  return static_cast<size_t>(rows) * static_cast<size_t>(num_heads) * static_cast<size_t>(splits) *
         static_cast<size_t>(head_dim + 2);
}

cudaError_t launch_attention(const float* q, const AttentionRows& rows, int num_heads, int num_kv_heads, int head_dim,
                             float scale, const void* k_cache, const void* v_cache, CacheType cache,
                             const int32_t* blocks, int topk, int max_keys, int keys_per_split, float* workspace,
                             float* out, cudaStream_t stream) {
  if (rows.rows == 0) return cudaSuccess;
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || num_heads / num_kv_heads > kMaxGroup || head_dim <= 0 ||
      head_dim > 256 || head_dim % 8 != 0 || keys_per_split <= 0 || keys_per_split % kTileKeys != 0 ||
      reinterpret_cast<uintptr_t>(q) % 16 != 0)
    return cudaErrorInvalidValue;
  const int splits = max_keys > 0 ? (max_keys + keys_per_split - 1) / keys_per_split : 1;
  cudaError_t e = cudaSuccess;
  const int nb = head_dim / 8;
#define MXLM_ATTENTION_CASE(NB)                                                                                   \
  e = cache == CacheType::BF16                                                                                   \
          ? launch_split<NB, uint16_t>(q, rows, num_heads, num_kv_heads, head_dim, scale, k_cache, v_cache, blocks, \
                                       topk, keys_per_split, splits, workspace, stream)                          \
          : launch_split<NB, float>(q, rows, num_heads, num_kv_heads, head_dim, scale, k_cache, v_cache, blocks,    \
                                    topk, keys_per_split, splits, workspace, stream)
  if (nb <= 4) {
    MXLM_ATTENTION_CASE(4);
  } else if (nb <= 8) {
    MXLM_ATTENTION_CASE(8);
  } else if (nb <= 12) {
    MXLM_ATTENTION_CASE(12);
  } else if (nb <= 16) {
    MXLM_ATTENTION_CASE(16);
  } else {
    MXLM_ATTENTION_CASE(32);
  }
#undef MXLM_ATTENTION_CASE
  if (e != cudaSuccess) return e;
  return launch_merge(workspace, static_cast<size_t>(rows.rows) * num_heads, splits, head_dim, out, stream);
}

// Blocks per scoring CTA: about four CTAs per multiprocessor over all rows.
int index_blocks_per_cta(int rows, int max_visible_blocks, int multiprocessors) {
  const int want = 4 * (multiprocessors > 0 ? multiprocessors : 1);
  const int chunks = want / (rows > 0 ? rows : 1) > 1 ? want / (rows > 0 ? rows : 1) : 1;
  return (max_visible_blocks + chunks - 1) / chunks;
}

template <typename KV>
cudaError_t launch_index_select_as(const float* iq, const AttentionRows& rows, int heads, int head_dim, int topk,
                                   int local_blocks, int init_blocks, int max_visible_blocks, const void* index_k_cache,
                                   float* workspace, int multiprocessors, int32_t* blocks, cudaStream_t stream) {
  const KV* ik = static_cast<const KV*>(index_k_cache);
  const bool split = workspace != nullptr && heads <= kMaxIndexHeads && head_dim % 4 == 0;
  if (split) {
    const int per_cta = index_blocks_per_cta(rows.rows, max_visible_blocks, multiprocessors);
    const size_t smem = (static_cast<size_t>(heads) * head_dim + static_cast<size_t>(heads) * per_cta) * 4;
    static bool configured = false;
    if (!configured) {
      const cudaError_t e =
          cudaFuncSetAttribute(index_scores_kernel<KV>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
      if (e != cudaSuccess) return e;
      configured = true;
    }
    const dim3 grid(static_cast<unsigned>(rows.rows),
                    static_cast<unsigned>((max_visible_blocks + per_cta - 1) / per_cta));
    index_scores_kernel<KV><<<grid, kScoreThreads, smem, stream>>>(iq, rows, heads, head_dim, ik, per_cta,
                                                                    max_visible_blocks, workspace);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  const size_t smem = static_cast<size_t>(max_visible_blocks) * (sizeof(float) + 1) + 16;
  static bool configured = false;
  if (!configured) {
    const cudaError_t e =
        cudaFuncSetAttribute(index_select_kernel<KV>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  index_select_kernel<KV><<<static_cast<unsigned>(rows.rows * heads), 256, smem, stream>>>(
      iq, rows, heads, head_dim, topk, local_blocks, init_blocks, ik, split ? workspace : nullptr, max_visible_blocks,
      blocks);
  return cudaGetLastError();
}

size_t index_select_workspace_floats(int rows, int heads, int max_visible_blocks) {
  return static_cast<size_t>(rows) * static_cast<size_t>(heads) * static_cast<size_t>(max_visible_blocks);
}

cudaError_t launch_index_select(const float* iq, const AttentionRows& rows, int heads, int head_dim, int topk,
                                int local_blocks, int init_blocks, int max_visible_blocks, const void* index_k_cache,
                                CacheType cache, float* workspace, int multiprocessors, int32_t* blocks,
                                cudaStream_t stream) {
  if (rows.rows == 0) return cudaSuccess;
  return cache == CacheType::BF16
             ? launch_index_select_as<uint16_t>(iq, rows, heads, head_dim, topk, local_blocks, init_blocks,
                                                max_visible_blocks, index_k_cache, workspace, multiprocessors, blocks,
                                                stream)
             : launch_index_select_as<float>(iq, rows, heads, head_dim, topk, local_blocks, init_blocks,
                                             max_visible_blocks, index_k_cache, workspace, multiprocessors, blocks,
                                             stream);
}

int attention_simt_splits(int units, int block_size) {
  const int ups = kSimtKeysPerSplit / block_size > 1 ? kSimtKeysPerSplit / block_size : 1;
  return (units + ups - 1) / ups < 1 ? 1 : (units + ups - 1) / ups;
}

cudaError_t launch_attention_simt(const float* q, const AttentionRows& rows, int num_heads, int num_kv_heads,
                                  int head_dim, float scale, const float* k_cache, const float* v_cache,
                                  const int32_t* blocks, int topk, int units, float* workspace, float* out,
                                  cudaStream_t stream) {
  if (rows.rows == 0) return cudaSuccess;
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || num_heads / num_kv_heads > kSimtMaxGroup ||
      head_dim <= 96 || head_dim > 128 || head_dim % 4 != 0)
    return cudaErrorInvalidValue;
  const int ups = kSimtKeysPerSplit / rows.block_size > 1 ? kSimtKeysPerSplit / rows.block_size : 1;
  const int splits = attention_simt_splits(units, rows.block_size);
  const cudaError_t e = launch_simt<4>(q, rows, num_heads, num_kv_heads, head_dim, scale, k_cache, v_cache, blocks,
                                       topk, ups, splits, workspace, stream);
  if (e != cudaSuccess) return e;
  return launch_merge(workspace, static_cast<size_t>(rows.rows) * num_heads, splits, head_dim, out, stream);
}

}  // namespace mxlm::backend::cuda
