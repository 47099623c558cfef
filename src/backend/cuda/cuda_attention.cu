// Paged attention (dense causal and block-sparse) and the lightning indexer's block selection.
//
// Attention is split over the key range (flash decoding): a CTA takes one (row, KV head) and a run of key
// blocks, keeps an online softmax per query head of the GQA group (the K/V rows are read once for the whole
// group), and writes (max, sum, unnormalised output) to a workspace; a second kernel merges the splits. Decode
// at long context then spreads over the whole card even for one sequence.
#include <cfloat>
#include <cstdint>

#include "backend/cuda/cuda_kernels.h"

namespace mxlm::backend::cuda {

namespace {

constexpr int kAttnWarps = 4;
constexpr int kMaxGroup = 16;
constexpr int kKeysPerSplit = 128;

template <int DPL>  // dims per lane: head_dim <= 32 * DPL
__global__ void __launch_bounds__(kAttnWarps * 32)
    attention_split_kernel(const float* q, AttentionRows rows, int num_heads, int num_kv_heads, int D, float scale,
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
  float* ps = qs + static_cast<size_t>(G) * D;       // [warps][32 keys][kMaxGroup] probabilities
  float* wstate = ps + kAttnWarps * 32 * kMaxGroup;  // [warps][G][D + 2]
  const float* qrow = q + static_cast<size_t>(row) * num_heads * D + static_cast<size_t>(kvh) * G * D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) qs[i] = qrow[i] * scale;
  __syncthreads();

  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][DPL];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[h][i] = 0.0f;
  }
  float* pw = ps + warp * 32 * kMaxGroup;

  // Tiles of 32 keys per warp: scores with one key per lane (K row read by its lane, q broadcast from shared
  // memory), then P·V with the lanes across the head dims (V rows read coalesced, p broadcast from shared memory).
  for (int u = u0; u < u1; ++u) {
    const int b = blocks ? blocks[(static_cast<size_t>(row) * num_kv_heads + kvh) * topk + u] : u;
    if (b < 0 || b > pos / bs) continue;
    const size_t page = static_cast<size_t>(table[b]);
    const int kbeg = b * bs, kend = min((b + 1) * bs, pos + 1);
    for (int t0 = kbeg + warp * 32; t0 < kend; t0 += kAttnWarps * 32) {
      const int key = t0 + lane;
      const bool valid = key < kend;
      float s[kMaxGroup];
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) s[h] = 0.0f;
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
              for (int h = 0; h < kMaxGroup; ++h) {
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
      for (int h = 0; h < kMaxGroup; ++h) {
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
          pw[lane * kMaxGroup + h] = p;
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
          float pv[kMaxGroup];
#pragma unroll
          for (int h4 = 0; h4 < kMaxGroup / 4; ++h4) {
            const float4 p4 = *reinterpret_cast<const float4*>(pw + j * kMaxGroup + 4 * h4);
            pv[4 * h4] = p4.x;
            pv[4 * h4 + 1] = p4.y;
            pv[4 * h4 + 2] = p4.z;
            pv[4 * h4 + 3] = p4.w;
          }
#pragma unroll
          for (int h = 0; h < kMaxGroup; ++h)
            if (h < G)
#pragma unroll
              for (int i = 0; i < DPL; ++i) acc[h][i] += pv[h] * vv[i];
        }
      }
      __syncwarp();
    }
  }
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l[h] += __shfl_xor_sync(0xffffffffu, l[h], o);

      // Merge the warps of this CTA.
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
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
    for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, wstate[(static_cast<size_t>(w) * G + h) * (D + 2)]);
    float v = 0.0f;
    if (c == 0) {
      v = M;
    } else if (M != -INFINITY) {
      for (int w = 0; w < kAttnWarps; ++w) {
        const float* st = wstate + (static_cast<size_t>(w) * G + h) * (D + 2);
        if (st[0] != -INFINITY) v += st[c] * expf(st[0] - M);
      }
    }
    const size_t head = static_cast<size_t>(row) * num_heads + static_cast<size_t>(kvh) * G + h;
    ws[(head * splits + split) * (D + 2) + c] = v;
  }
}

__global__ void attention_merge_kernel(const float* ws, int splits, int head_dim, float* out) {
  const size_t head = blockIdx.x;  // row * num_heads + h
  const float* base = ws + head * splits * static_cast<size_t>(head_dim + 2);
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, base[static_cast<size_t>(s) * (head_dim + 2)]);
  float L = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = base[static_cast<size_t>(s) * (head_dim + 2)];
    if (ms != -INFINITY) L += base[static_cast<size_t>(s) * (head_dim + 2) + 1] * expf(ms - M);
  }
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ms = base[static_cast<size_t>(s) * (head_dim + 2)];
      if (ms != -INFINITY) a += base[static_cast<size_t>(s) * (head_dim + 2) + 2 + c] * expf(ms - M);
    }
    out[head * head_dim + c] = L > 0.0f ? a / L : 0.0f;
  }
}

// One CTA per (row, index head): block max scores into shared memory, forced blocks, then top-k by repeated
// arg-max (score descending, lower block id first on ties).
__global__ void index_select_kernel(const float* iq, AttentionRows rows, int heads, int head_dim, int topk,
                                    int local_blocks, int init_blocks, const float* ik_cache, int32_t* out) {
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

  for (int b = warp; b < visible; b += nwarps) {
    float best = -INFINITY;
    const size_t page = static_cast<size_t>(table[b]);
    const int kend = min((b + 1) * bs, pos + 1);
    for (int key = b * bs; key < kend; ++key) {
      const float* kr = ik_cache + (page * bs + static_cast<size_t>(key % bs)) * head_dim;
      float s = 0.0f;
      for (int c = lane; c < head_dim; c += 32) s += qh[c] * kr[c];
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

template <int DPL>
cudaError_t launch_split(const float* q, const AttentionRows& rows, int num_heads, int num_kv_heads, int D, float scale,
                         const float* k_cache, const float* v_cache, const int32_t* blocks, int topk,
                         int units_per_split, int splits, float* ws, cudaStream_t stream) {
  const int G = num_heads / num_kv_heads;
  const size_t smem =
      (static_cast<size_t>(G) * D + kAttnWarps * 32 * kMaxGroup + static_cast<size_t>(kAttnWarps) * G * (D + 2)) *
      sizeof(float);
  static bool configured = false;
  if (!configured) {
    const cudaError_t e =
        cudaFuncSetAttribute(attention_split_kernel<DPL>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  const dim3 grid(static_cast<unsigned>(rows.rows * num_kv_heads), static_cast<unsigned>(splits));
  attention_split_kernel<DPL><<<grid, kAttnWarps * 32, smem, stream>>>(
      q, rows, num_heads, num_kv_heads, D, scale, k_cache, v_cache, blocks, topk, units_per_split, splits, ws);
  return cudaGetLastError();
}

}  // namespace

int attention_units_per_split(int block_size) {
  const int u = kKeysPerSplit / (block_size > 0 ? block_size : 1);
  return u < 1 ? 1 : u;
}

size_t attention_workspace_floats(int rows, int num_heads, int head_dim, int splits) {
  return static_cast<size_t>(rows) * static_cast<size_t>(num_heads) * static_cast<size_t>(splits) *
         static_cast<size_t>(head_dim + 2);
}

cudaError_t launch_attention(const float* q, const AttentionRows& rows, int num_heads, int num_kv_heads, int head_dim,
                             float scale, const float* k_cache, const float* v_cache, const int32_t* blocks, int topk,
                             int units, float* workspace, float* out, cudaStream_t stream) {
  if (rows.rows == 0) return cudaSuccess;
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || num_heads / num_kv_heads > kMaxGroup || head_dim <= 0 ||
      head_dim > 256 || head_dim % 4 != 0)
    return cudaErrorInvalidValue;
  const int ups = attention_units_per_split(rows.block_size);
  const int splits = (units + ups - 1) / ups < 1 ? 1 : (units + ups - 1) / ups;
  cudaError_t e = cudaSuccess;
  const int dpl = (head_dim + 31) / 32;
  switch (dpl) {
    case 1:
      e = launch_split<1>(q, rows, num_heads, num_kv_heads, head_dim, scale, k_cache, v_cache, blocks, topk, ups,
                          splits, workspace, stream);
      break;
    case 2:
      e = launch_split<2>(q, rows, num_heads, num_kv_heads, head_dim, scale, k_cache, v_cache, blocks, topk, ups,
                          splits, workspace, stream);
      break;
    case 3:
      e = launch_split<3>(q, rows, num_heads, num_kv_heads, head_dim, scale, k_cache, v_cache, blocks, topk, ups,
                          splits, workspace, stream);
      break;
    case 4:
      e = launch_split<4>(q, rows, num_heads, num_kv_heads, head_dim, scale, k_cache, v_cache, blocks, topk, ups,
                          splits, workspace, stream);
      break;
    case 5:
    case 6:
    case 7:
    case 8:
      e = launch_split<8>(q, rows, num_heads, num_kv_heads, head_dim, scale, k_cache, v_cache, blocks, topk, ups,
                          splits, workspace, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (e != cudaSuccess) return e;
  attention_merge_kernel<<<static_cast<unsigned>(rows.rows * num_heads), 128, 0, stream>>>(workspace, splits, head_dim,
                                                                                           out);
  return cudaGetLastError();
}

cudaError_t launch_index_select(const float* iq, const AttentionRows& rows, int heads, int head_dim, int topk,
                                int local_blocks, int init_blocks, int max_visible_blocks, const float* index_k_cache,
                                int32_t* blocks, cudaStream_t stream) {
  if (rows.rows == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(max_visible_blocks) * (sizeof(float) + 1) + 16;
  static bool configured = false;
  if (!configured) {
    const cudaError_t e =
        cudaFuncSetAttribute(index_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  index_select_kernel<<<static_cast<unsigned>(rows.rows * heads), 256, smem, stream>>>(
      iq, rows, heads, head_dim, topk, local_blocks, init_blocks, index_k_cache, blocks);
  return cudaGetLastError();
}

}  // namespace mxlm::backend::cuda
