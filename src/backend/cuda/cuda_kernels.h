// Launchers of the CUDA kernels (defined in the .cu files of this folder). Plain host functions over device
// pointers, so the backend class, the GPU tests and the benchmarks (all compiled by the host compiler) call
// the same code. bf16 values travel as uint16_t bit patterns on the host side. Every launcher enqueues on
// `stream` and returns the launch error (cudaSuccess when fine); none synchronises.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mxlm::backend {
struct SampleParams;  // backend/sampling_math.h
}  // namespace mxlm::backend

namespace mxlm::backend::cuda {

// ---- elementwise / conversion
cudaError_t launch_add(const float* a, const float* b, float* out, size_t n, cudaStream_t stream);
cudaError_t launch_scale(float* x, float factor, size_t n, cudaStream_t stream);
cudaError_t launch_f32_to_bf16(const float* x, uint16_t* out, size_t n, cudaStream_t stream);
cudaError_t launch_bf16_to_f32(const uint16_t* x, float* out, size_t n, cudaStream_t stream);
cudaError_t launch_f16_to_f32(const uint16_t* x, float* out, size_t n, cudaStream_t stream);
// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * (add_one ? 1 + w : w).
cudaError_t launch_rms_norm(const float* x, const float* w, float* out, size_t rows, size_t dim, float eps,
                            bool add_one, cudaStream_t stream);
// h += y (as launch_add), then out = rms_norm(h) (the same bits as launch_rms_norm): one launch, with PDL.
cudaError_t launch_add_rms_norm(float* h, const float* y, const float* w, float* out, size_t rows, size_t dim,
                                float eps, bool add_one, cudaStream_t stream);
// Tensors x[i] [tokens, heads[i], head_dim] in place: launch_rms_norm of each head row with w[i] [head_dim], then
// launch_rope (the same bits as the two launches), all tensors in one launch, with PDL (q / k and the indexer's).
constexpr int kMaxNormRopeTensors = 4;
struct NormRopeTensors {
  float* x[kMaxNormRopeTensors] = {};
  const float* w[kMaxNormRopeTensors] = {};
  int heads[kMaxNormRopeTensors] = {};
  int count = 0;
};
cudaError_t launch_rms_norm_ropes(const NormRopeTensors& t, size_t tokens, int head_dim, float eps, bool add_one,
                                  const int32_t* positions, int rotary_dim, const float* inv_freq, cudaStream_t stream);
// NeoX RoPE on the first rotary_dim dims of each head; inv_freq [rotary_dim / 2] and positions [tokens] on device.
cudaError_t launch_rope(float* x, const int32_t* positions, size_t tokens, int heads, int head_dim, int rotary_dim,
                        const float* inv_freq, cudaStream_t stream);
cudaError_t launch_swiglu_oai(const float* gate, const float* up, float* out, size_t n, float alpha, float limit,
                              cudaStream_t stream);

// ---- MX numerics (bit-exact with mx::ref: Quark "even" scale, RNE, sign of zero kept, NaN/Inf as mx::qdq_f32)
// In place on f32, groups of 32 consecutive elements (n % 32 == 0).
cudaError_t launch_qdq_f32(float* x, size_t n, cudaStream_t stream);
// out_bf16 = bf16(qdq ? qdq(x) : x) for rows of k, optionally gathering rows: row r reads x[gather[r]] (gather may
// be null). With qdq the bf16 conversion is exact.
cudaError_t launch_gather_qdq_bf16(const float* x, const int32_t* gather, size_t rows, size_t k, bool qdq,
                                   uint16_t* out, cudaStream_t stream);
// f32 variant: out[r] = qdq?(x[gather[r]]) (gather may be null).
cudaError_t launch_gather_qdq_f32(const float* x, const int32_t* gather, size_t rows, size_t k, bool qdq, float* out,
                                  cudaStream_t stream);
// act = bf16(qdq?(swiglu_oai(gate, up))) for [rows, k] (k % 32 == 0 when qdq).
cudaError_t launch_swiglu_qdq_bf16(const float* gate, const float* up, size_t rows, size_t k, float alpha, float limit,
                                   bool qdq, uint16_t* out, cudaStream_t stream);
// Exact dequantization of packed [rows, k/2] + scales [rows, k/32] to bf16 or f32 (scale byte 255 = NaN).
cudaError_t launch_dequant_mxfp4_bf16(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k,
                                      uint16_t* out, cudaStream_t stream);
cudaError_t launch_dequant_mxfp4_f32(const uint8_t* packed, const uint8_t* scales, size_t rows, size_t k, float* out,
                                     cudaStream_t stream);

// ---- MXFP4 small-M GEMM (decode): y[m, n] (+)= x[m, k] · Wᵀ, W MXFP4 [n, k], x bf16, f32 accumulation on bf16
// tensor cores with the weights dequantized in registers (4.25 bits per parameter read). Several independent
// problems of the same n, k ("groups", e.g. the experts of a MoE layer) run in one launch.
struct Mxfp4GemvGroup {
  const uint8_t* w = nullptr;       // packed [n, k/2]
  const uint8_t* scales = nullptr;  // [n, k/32]
  const uint16_t* x = nullptr;      // bf16 [m, k]
  float* y = nullptr;               // f32 [m, ldy]
  int m = 0;                        // 1..16
  int ldy = 0;
};
// groups: device array of `num_groups`. When k_split > 1 the partial sums are added atomically: y must hold
// zeros first. max_m is the largest m over the groups (picks the kernel variant). k % 32 == 0.
cudaError_t launch_mxfp4_gemv(const Mxfp4GemvGroup* groups, int num_groups, int max_m, int n, int k, int k_split,
                              cudaStream_t stream);
// One problem, descriptor by value (no device copy: safe to capture in a CUDA graph); same rules, except that m may
// exceed 16: the tokens then run as tiles of 16 along the grid's z (each tile reads the weights; the tiles of one
// launch run together, so the re-reads mostly hit L2). k_split from mxfp4_gemv_k_split(n, k, token tiles, SMs).
cudaError_t launch_mxfp4_gemv_one(const Mxfp4GemvGroup& problem, int n, int k, int k_split, cudaStream_t stream);
inline int mxfp4_gemv_token_tiles(int m) { return (m + 15) / 16; }
// The native MXFP4 linear uses the GEMV up to this many tokens and dequantize + cuBLAS above.
constexpr int kMxfp4GemvMaxTokens = 128;
// k_split that fills the card for `ctas_per_split` CTAs of the launch (n / 128 row blocks times the groups).
int mxfp4_gemv_k_split(int n, int k, int num_groups, int multiprocessors);

// Version 2 (cudamoe): the CTA's whole weight slice queued with cp.async at its start (no registers held by
// loads in flight), Programmatic Dependent Launch (`pdl`: the weight loads overlap the previous kernel; the
// activations are read only after it completed), and a K split without memset or output atomics: each split
// writes f32 partials to `workspace` and the last CTA of a row tile adds them in split order (deterministic),
// found with `counters`, which must be zero before the first launch and are left zero again by every launch.
struct Mxfp4GemvConfig {
  int warps = 4;        // 4 or 8 warps per CTA (64 or 128 weight rows)
  int ctas_per_sm = 2;  // automatic K split aims at this many CTAs per SM (2: fastest at M = 1 on H100, run B)
  int k_split = 0;      // > 0: force (clamped to what shared memory allows)
  // Variants: 1 = row-contiguous weight copies, 8 = math per commit group as it lands (both are used by default);
  // diagnostics for benchmarks only (wrong results): 2 = no math, 4 = no activation staging.
  int flags = 1 | 8;
};
struct Mxfp4GemvPlan {
  int warps = 4, nt = 1;   // CTA size, token tiles of 8 (2 when max_m > 8)
  int row_tiles = 0;       // CTAs along n
  int chunks_per_cta = 1;  // 128-wide K chunks per CTA
  int splits = 1;          // CTAs along K
  size_t smem_bytes = 0;
  int flags = 0;  // Mxfp4GemvConfig::flags
};
Mxfp4GemvPlan mxfp4_gemv_plan(int n, int k, int num_problems, int max_m, int multiprocessors,
                              const Mxfp4GemvConfig& config = {});
// The configuration the backend plans with: the defaults, or MXLM_CUDA_GEMV_CONFIG="warps,ctas_per_sm,k_split,flags"
// (read at every call; the benchmark sweeps it).
Mxfp4GemvConfig mxfp4_gemv_backend_config();
// Workspace floats / counters a launch with `plan` needs (0 without a K split). `slots`: partial-sum rows, i.e.
// m for one problem, 16 * num_groups for groups, mats * rows_max for the MoE launch; counters per z: row_tiles.
size_t mxfp4_gemv_workspace_floats(const Mxfp4GemvPlan& plan, int n, int slots);
size_t mxfp4_gemv_counters(const Mxfp4GemvPlan& plan, int num_z);
// One problem, descriptor by value (so its weights can be prefetched before the previous kernel ends). With
// x_f32 (and problem.x null) the activations are f32 [m, k], rounded to bf16 (RNE) while staged: no separate
// conversion launch.
cudaError_t launch_mxfp4_gemv2(const Mxfp4GemvGroup& problem, int n, int k, const Mxfp4GemvPlan& plan, bool pdl,
                               float* workspace, int* counters, cudaStream_t stream, const float* x_f32 = nullptr);
// Device array of problems (read after the previous kernel completed).
cudaError_t launch_mxfp4_gemv2_groups(const Mxfp4GemvGroup* groups, int num_groups, int n, int k,
                                      const Mxfp4GemvPlan& plan, bool pdl, float* workspace, int* counters,
                                      cudaStream_t stream);
// Routed experts from a device-built tile list (launch_moe_route): a fixed grid of max_tiles * mats problems;
// tiles past *num_tiles exit at once. Problem (tile, mat): expert e = tiles[3 tile], rows r0 .. r0 + m - 1 of
// the expert-sorted x / y[mat] (r0 = tiles[3 tile + 1], m = tiles[3 tile + 2] <= 16), weights w[mat][e].
struct Mxfp4MoeTiles {
  const int32_t* tiles = nullptr;
  const int32_t* num_tiles = nullptr;
  const uint8_t* const* w[2] = {nullptr, nullptr};
  const uint8_t* const* scales[2] = {nullptr, nullptr};
  const uint16_t* x = nullptr;  // bf16 [rows, k]
  float* y[2] = {nullptr, nullptr};
  int ldy = 0;
  int mats = 1;
  int rows_max = 0;
  // True when the tile list, its count and the weight tables were written before the kernel launched right before
  // this GEMV started (e.g. route, then gather, then this GEMV): the CTAs then read them and queue their weights
  // before griddepcontrol.wait, overlapping the previous kernel; false: they wait first.
  bool tiles_ready = false;
};
cudaError_t launch_mxfp4_moe_gemv(const Mxfp4MoeTiles& moe, int max_tiles, int n, int k, const Mxfp4GemvPlan& plan,
                                  bool pdl, float* workspace, int* counters, cudaStream_t stream);
// The same tile list by version 1 (max_m: the most rows a tile holds; k_split > 1: y[mat] must hold zeros first).
cudaError_t launch_mxfp4_moe_gemv1(const Mxfp4MoeTiles& moe, int max_tiles, int max_m, int n, int k, int k_split,
                                   cudaStream_t stream);

// Version 4 (session 4): one CTA per 16 weight rows over the whole K (no K split across CTAs: no workspace, memset,
// atomics; deterministic), weights and scales queued with cp.async before griddepcontrol.wait, PDL; tokens in passes
// of 4 over the weights held in shared memory, or 3-8 rows of bf16 activations in one pass (each lane loading its
// token's activations itself). 8 warps per CTA, 4 for K <= 3072. For m <= 16 and K / 512 or K / 1024 in {2, 3, 4,
// 6, 8} (mxfp4_gemv4_supports); activations bf16 (problem.x) or f32 (x_f32, rounded to bf16 while staged). y is
// written, not accumulated.
bool mxfp4_gemv4_supports(int k, int m);
// Version 4 multiplies up to this many rows of bf16 activations in one pass (bf16 problem.x or the MoE form; f32
// activations and more rows run passes of 4).
constexpr int kMxfp4Gemv4OnePassRows = 8;
cudaError_t launch_mxfp4_gemv4(const Mxfp4GemvGroup& problem, int n, int k, bool pdl, cudaStream_t stream,
                               const float* x_f32 = nullptr);
// Routed experts (the tile list of launch_moe_route, as launch_mxfp4_moe_gemv) by version 4; max_m: the most rows a
// tile can hold (<= 16; sizes the activation staging).
cudaError_t launch_mxfp4_moe_gemv4(const Mxfp4MoeTiles& moe, int max_tiles, int max_m, int n, int k, bool pdl,
                                   cudaStream_t stream);

// Benchmark ceiling: stream-read `bytes` (multiple of 16) once with 16-byte loads.
cudaError_t launch_read_probe(const void* data, size_t bytes, unsigned* sink, int multiprocessors, cudaStream_t stream);

// ---- MoE routing on the device (cudamoe): from ids [tokens, k] (global expert ids; those outside
// [first_expert, first_expert + num_local) are another rank's) build, without a host round trip:
//   offsets [num_local + 1]   rows of each local expert in the expert-sorted order,
//   gather [tokens * k]       token of each sorted row (0 past the last row, so fixed-size launches stay in bounds),
//   row_weight [tokens * k]   routing weight of each sorted row,
//   combine [tokens * k]      per token its sorted rows in ascending expert order, then -1,
//   tiles [max_tiles * 3], counts[0] = number of tiles, counts[1] = number of rows.
// Row order inside an expert is not fixed (atomics); results do not depend on it (each row's GEMV column is
// computed independently). num_local <= 1024.
// With shared_expert (sharedfuse) a shared expert every token runs is local expert num_local (num_local + 1 <=
// 1024): its rows come last (row offsets[num_local] + t is token t, weight 1), and each token's combine list has
// k + 1 slots, the shared row in the last (after the routed rows and their -1s); gather / row_weight / combine then
// hold tokens * (k + 1) entries, offsets num_local + 2.
// Rows per GEMV tile (8 or 16: the GEMV variant with one or two token tiles) and the most tiles a step can have
// (with a shared expert: k + 1 and num_local + 1).
int moe_tile_rows(size_t tokens, int k, int num_local);
int moe_max_tiles(size_t tokens, int k, int num_local);
cudaError_t launch_moe_route(const int32_t* ids, const float* weights, size_t tokens, int k, int first_expert,
                             int num_local, int32_t* offsets, int32_t* gather, float* row_weight, int32_t* combine,
                             int32_t* tiles, int32_t* counts, cudaStream_t stream, bool pdl = false,
                             bool shared_expert = false);
// The other small kernels of the device-routed layer, launched with Programmatic Dependent Launch (each waits for
// its predecessor, then releases its successor; cuda_moe_kernels.cu). Same results as launch_gather_qdq_bf16 /
// launch_swiglu_qdq_bf16 / launch_moe_combine; rows at or past counts[1] (the routed rows) are skipped.
cudaError_t launch_moe_gather_qdq_bf16(const float* x, const int32_t* gather, const int32_t* counts, size_t rows,
                                       size_t k, bool qdq, uint16_t* out, cudaStream_t stream);
cudaError_t launch_moe_swiglu_qdq_bf16(const float* gate, const float* up, const int32_t* counts, size_t rows, size_t k,
                                       float alpha, float limit, bool qdq, uint16_t* out, cudaStream_t stream);
cudaError_t launch_moe_combine_pdl(const float* y, const int32_t* combine, const float* weights, size_t tokens, int k,
                                   size_t hidden, float* out, cudaStream_t stream);

// ---- MoE helpers
// out[t] = Σ_j weights[row] · y[row] over rows = combine[t, 0..k-1] (-1 = none), in that order.
cudaError_t launch_moe_combine(const float* y, const int32_t* combine, const float* weights, size_t tokens, int k,
                               size_t hidden, float* out, cudaStream_t stream);
// y[m, n] = x[m, k] · W[n, k]ᵀ in f32 for 1..kF32GemvMaxTokens tokens (k % 4 == 0): the router and other small
// f32 linears (cuBLAS sgemm reads these at a tenth of the bandwidth). Deterministic.
constexpr int kF32GemvMaxTokens = 8;
cudaError_t launch_f32_gemv(const float* w, const float* x, float* y, int n, int m, int k, cudaStream_t stream);
// y[m, n] = bf16(x[m, k]) · W[n, k]ᵀ for bf16 weights and 1..kBf16GemvMaxTokens tokens (cuda_bf16_gemv.cu): the
// f32 activations rounded to bf16 (RNE, as launch_f32_to_bf16) as they are loaded, f32 sums, deterministic. k a
// multiple of 256, x and w 16-byte aligned; sms = the device's multiprocessors (picks the CTA size).
constexpr int kBf16GemvMaxTokens = 8;
bool bf16_gemv_supports(int n, int k, int m);
cudaError_t launch_bf16_gemv(const uint16_t* w, const float* x, float* y, int n, int m, int k, int sms, bool pdl,
                             cudaStream_t stream);
// Up to kBf16GemvMaxGroup such GEMVs over the same x (same k and m) in one launch: y[i] = bf16(x) · W[i]ᵀ (the q / k /
// v projections and the indexer's q / k of a decode step). The CTA size is the group's (by its total rows), so a
// small weight's sums may be split over the warps differently from its launch alone (deterministic either way).
constexpr int kBf16GemvMaxGroup = 6;
struct Bf16GemvGroup {
  const uint16_t* w[kBf16GemvMaxGroup] = {};
  float* y[kBf16GemvMaxGroup] = {};
  int n[kBf16GemvMaxGroup] = {};
  int count = 0;
  int first_cta[kBf16GemvMaxGroup] = {};  // set by the launcher
};
cudaError_t launch_bf16_gemv_group(const Bf16GemvGroup& group, const float* x, int m, int k, int sms, bool pdl,
                                   cudaStream_t stream);
// Router top-k on logits [tokens, experts]: s = sigmoid, choice = s + bias (bias may be null), top-k by choice
// (ties: lower id), weights = s / Σ s * scale. k <= kRouterMaxTopK, experts <= kRouterMaxExperts.
constexpr int kRouterMaxTopK = 16, kRouterMaxExperts = 1024;
cudaError_t launch_router_topk(const float* logits, const float* bias, size_t tokens, int experts, int k, float scale,
                               int32_t* ids, float* weights, cudaStream_t stream);

// ---- random data generated on the device (benchmarks, dummy weights): bytes uniform in [lo, hi] from a counter
// hash of (seed, index); bf16 values uniform in +-amp.
cudaError_t launch_fill_random_bytes(uint8_t* out, size_t n, uint64_t seed, int lo, int hi, cudaStream_t stream);
cudaError_t launch_fill_random_bf16(uint16_t* out, size_t n, uint64_t seed, float amp, cudaStream_t stream);
cudaError_t launch_fill_random_f32(float* out, size_t n, uint64_t seed, float amp, cudaStream_t stream);

// ---- embedding: out[i] = row ids[i] - row_offset of the table (f32, bf16 or MXFP4), zeros outside.
enum class TableFormat : int { F32 = 0, BF16 = 1, MXFP4 = 2 };
cudaError_t launch_embedding(const void* table, const uint8_t* scales, TableFormat format, int64_t rows, int64_t cols,
                             const int32_t* ids, size_t count, int64_t row_offset, float* out, cudaStream_t stream);

// ---- paged attention. Per row of the step: its position, the offset of its sequence's block table in
// `tables`. Caches are [pages, block_size, kv_heads * head_dim] of f32 or bf16 (CacheType; bf16 as raw bits).
struct AttentionRows {
  const int32_t* pos = nullptr;           // [rows]
  const int32_t* table_offset = nullptr;  // [rows]
  const int32_t* tables = nullptr;        // concatenated block tables
  int rows = 0;
  int block_size = 0;
};
enum class CacheType { F32, BF16 };
// cache[i][slots[r]] = x[i][r] for rows r of width[i], tensors i < count in one launch (K, V and the index K of a
// layer): f32 copies, or bf16 (round to nearest even) into a bf16 cache. Rows whose slot is negative are skipped
// (padding rows of a captured decode step).
constexpr int kMaxCacheWrites = 4;
struct CacheWrites {
  const float* x[kMaxCacheWrites] = {};
  size_t width[kMaxCacheWrites] = {};
  void* cache[kMaxCacheWrites] = {};
  int count = 0;
};
cudaError_t launch_cache_writes(const CacheWrites& w, const int64_t* slots, size_t rows, CacheType type,
                                cudaStream_t stream);
// Dense causal (blocks == null) or block-sparse (blocks [rows, kv_heads, topk], -1 padded) GQA attention, split
// over the key range (flash decoding) into splits = ceil(max_keys / keys_per_split) partial results merged by a
// second kernel. `max_keys` is the most keys a row visits, in whole blocks (dense: (max_pos / block_size + 1) *
// block_size; sparse: topk * block_size); keys_per_split from attention_keys_per_split; head_dim % 8 == 0 and
// <= 256; heads per KV head <= 16. workspace: attention_workspace_floats(rows, num_heads, head_dim, splits) floats.
int attention_keys_per_split(int rows, int num_kv_heads, int max_keys, int multiprocessors);
size_t attention_workspace_floats(int rows, int num_heads, int head_dim, int splits);
cudaError_t launch_attention(const float* q, const AttentionRows& rows, int num_heads, int num_kv_heads, int head_dim,
                             float scale, const void* k_cache, const void* v_cache, CacheType cache,
                             const int32_t* blocks, int topk, int max_keys, int keys_per_split, float* workspace,
                             float* out, cudaStream_t stream);
// The previous kernel (SIMT f32, 128-key splits), kept as the benchmark's baseline: f32 caches, 96 < head_dim <= 128;
// `units` as max_keys / block_size; workspace for attention_simt_splits(units, block_size) splits.
int attention_simt_splits(int units, int block_size);
cudaError_t launch_attention_simt(const float* q, const AttentionRows& rows, int num_heads, int num_kv_heads,
                                  int head_dim, float scale, const float* k_cache, const float* v_cache,
                                  const int32_t* blocks, int topk, int units, float* workspace, float* out,
                                  cudaStream_t stream);
// Lightning indexer block selection (see Backend::index_select) over an f32 or bf16 index-K cache: block max
// scores spread over the card (every index head from one read of the shared index-K rows) into `workspace`
// (index_select_workspace_floats), then top-k per (row, head). With workspace == null (or more than 8 heads, or
// head_dim % 4 != 0) one CTA per (row, head) scores and selects alone: the previous kernel, the bench's baseline.
size_t index_select_workspace_floats(int rows, int heads, int max_visible_blocks);
cudaError_t launch_index_select(const float* iq, const AttentionRows& rows, int heads, int head_dim, int topk,
                                int local_blocks, int init_blocks, int max_visible_blocks, const void* index_k_cache,
                                CacheType cache, float* workspace, int multiprocessors, int32_t* blocks,
                                cudaStream_t stream);

// ---- decoding (cuda_decode.cu)
// out[r] = the first index of the largest value of row r of x [rows, cols] (std::max_element's choice, NaN included),
// the row spread over CTAs of 2048 columns whose partials (workspace: argmax_rows_workspace_bytes) one warp per row
// merges. rows <= 65535.
size_t argmax_rows_workspace_bytes(size_t rows, size_t cols);
cudaError_t launch_argmax_rows(const float* x, size_t rows, size_t cols, int32_t* out, void* workspace,
                               cudaStream_t stream);

// ---- sampling (cuda_sample.cu)
// out[r] = backend::sample_row(row r of x, params[r]) token for token (backend/sampling.h), one CTA per row; params
// [rows] on the device, validated by the caller; cols < 2^32.
cudaError_t launch_sample_rows(const float* x, size_t rows, size_t cols, const SampleParams* params, int32_t* out,
                               cudaStream_t stream);

// ---- vision encoder (cuda_vision.cu; Backend's "vision encoder" ops)
// y[r, c] += bias[c] over rows of `cols`.
cudaError_t launch_add_bias(float* y, const float* bias, size_t rows, size_t cols, cudaStream_t stream);
// out[r] = (x[r] - mean) / sqrt(var + eps) * w + b (biased variance), one block per row. In place allowed.
cudaError_t launch_layer_norm(const float* x, const float* w, const float* b, float* out, size_t rows, size_t dim,
                              float eps, cudaStream_t stream);
// x = 0.5 x (1 + erf(x / sqrt 2)) in place.
cudaError_t launch_gelu_erf(float* x, size_t n, cudaStream_t stream);
// Rotate-half rotary of pairs (k, k + pairs) by angles given as cos/sin tables [tokens, pairs].
cudaError_t launch_rope_table(float* x, const float* cos, const float* sin, size_t tokens, int heads, int head_dim,
                              int pairs, cudaStream_t stream);
// In-place softmax of `rows` rows of `cols` (row stride `cols`), f32.
cudaError_t launch_softmax_rows(float* x, size_t rows, size_t cols, cudaStream_t stream);
// The same softmax (f32) written as bf16 to `out` (same layout).
cudaError_t launch_softmax_rows_bf16(const float* x, uint16_t* out, size_t rows, size_t cols, cudaStream_t stream);
// Fused attention of one segment (rows [begin, begin + len)) on bf16 tensor cores: q, k, v bf16 [tokens, heads *
// head_dim], out f32; online softmax in f32, probabilities rounded to bf16 for P·V. head_dim 64, 80 or 128.
bool flash_segment_supported(int head_dim);
cudaError_t launch_flash_segment(const uint16_t* q, const uint16_t* k, const uint16_t* v, int heads, int head_dim,
                                 int begin, int len, float scale, float* out, cudaStream_t stream);

}  // namespace mxlm::backend::cuda
