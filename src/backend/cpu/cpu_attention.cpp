// Paged attention on the CPU: dense causal GQA, the lightning indexer's block selection and block-sparse
// attention (m3_sparse_attention.md). Pages hold block_size token slots; logical block b of a sequence is
// page block_table[b], so block ids are absolute positions // block_size.
//
// GCC 12 warns inside its own avx512fintrin.h (the self-initialised __Y of _mm512_undefined_*, GCC bug
// 105593) wherever those intrinsics are inlined; the warning is about the header, not this code.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "backend/cpu/cpu_attention_isa.h"
#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

namespace mxlm::backend::cpu {

namespace {

struct Row {
  const SequenceSlice* seq;
  int32_t row;  // row in the step
  int32_t pos;  // absolute position
};

std::vector<Row> rows_of(const AttentionBatch& batch) {
  std::vector<Row> rows;
  rows.reserve(static_cast<size_t>(batch.num_tokens));
  for (const auto& s : batch.sequences) {
    const int32_t needed = (s.start_pos + s.count + batch.block_size - 1) / batch.block_size;
    if (static_cast<int32_t>(s.block_table.size()) < needed)
      fail("sequence needs {} cache pages for {} tokens but its block table has {}", needed, s.start_pos + s.count,
           s.block_table.size());
    for (int32_t i = 0; i < s.count; ++i) rows.push_back({&s, s.begin + i, s.start_pos + i});
  }
  return rows;
}

// Enough multiply-adds to be worth waking the OpenMP team (small decode steps run on the calling thread).
bool worth_threads(const std::vector<Row>& rows, int heads, int dim) {
  int64_t work = 0;
  for (const Row& r : rows) work += static_cast<int64_t>(r.pos + 1) * heads * dim;
  return rows.size() > 1 && work > (1 << 16);
}

inline size_t slot_of(const SequenceSlice& s, int32_t pos, int32_t block_size) {
  return static_cast<size_t>(s.block_table[static_cast<size_t>(pos / block_size)]) * static_cast<size_t>(block_size) +
         static_cast<size_t>(pos % block_size);
}

// The dot products and weighted sums of V are vectorised per instruction set (the build has no -m flags):
// AVX-512 and AVX2 + FMA intrinsics, chosen at run time (cpu_attention_isa.h), and plain loops otherwise. A dot product
// keeps 16 (8) lane sums and adds them in a fixed tree, so its f32 rounding differs from a serial loop's.
#define MXLM_ALWAYS_INLINE inline __attribute__((always_inline))
#define MXLM_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define MXLM_TARGET_AVX2 __attribute__((target("avx2,fma")))

using Isa = AttentionIsa;

constexpr int kNotForced = -1;
std::atomic<int> forced_isa{kNotForced};

Isa best_isa() {
  static const Isa isa = attention_isa_supported(Isa::Avx512) ? Isa::Avx512
                         : attention_isa_supported(Isa::Avx2) ? Isa::Avx2
                                                              : Isa::Baseline;
  return isa;
}

template <Isa kIsa>
float dot(const float* a, const float* b, int n);
// o += p * v
template <Isa kIsa>
void add_scaled(float* o, float p, const float* v, int n);

template <>
MXLM_TARGET_AVX512 inline float dot<Isa::Avx512>(const float* a, const float* b, int n) {
  __m512 acc = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, a + i), _mm512_maskz_loadu_ps(tail, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <>
MXLM_TARGET_AVX512 inline void add_scaled<Isa::Avx512>(float* o, float p, const float* v, int n) {
  const __m512 scale = _mm512_set1_ps(p);
  int i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(o + i, _mm512_fmadd_ps(scale, _mm512_loadu_ps(v + i), _mm512_loadu_ps(o + i)));
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(
        o + i, tail, _mm512_fmadd_ps(scale, _mm512_maskz_loadu_ps(tail, v + i), _mm512_maskz_loadu_ps(tail, o + i)));
  }
}

template <>
MXLM_TARGET_AVX2 inline float dot<Isa::Avx2>(const float* a, const float* b, int n) {
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  float s = _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <>
MXLM_TARGET_AVX2 inline void add_scaled<Isa::Avx2>(float* o, float p, const float* v, int n) {
  const __m256 scale = _mm256_set1_ps(p);
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(o + i, _mm256_fmadd_ps(scale, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
  for (; i < n; ++i) o[i] += p * v[i];
}

template <>
MXLM_ALWAYS_INLINE float dot<Isa::Baseline>(const float* a, const float* b, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <>
MXLM_ALWAYS_INLINE void add_scaled<Isa::Baseline>(float* o, float p, const float* v, int n) {
  for (int i = 0; i < n; ++i) o[i] += p * v[i];
}

// Softmax attention of the query heads [h0, h0 + group) of one row over the key positions `keys`.
template <Isa kIsa>
MXLM_ALWAYS_INLINE void attend_body(const float* q_row, float* out_row, const SequenceSlice& s,
                                    std::span<const int32_t> keys, int h0, int group, int kv_head,
                                    const AttentionShape& shape, int32_t block_size, const float* k_cache,
                                    const float* v_cache, std::vector<float>& scores) {
  const int d = shape.head_dim;
  const size_t width = static_cast<size_t>(shape.num_kv_heads) * static_cast<size_t>(d);
  scores.resize(keys.size());
  // Where each key's row of this KV head is in the caches: computed once for all the group's query heads and
  // both passes (not a page lookup and a division per key, head and pass).
  static thread_local std::vector<size_t> rows;
  rows.resize(keys.size());
  for (size_t j = 0; j < keys.size(); ++j)
    rows[j] = slot_of(s, keys[j], block_size) * width + static_cast<size_t>(kv_head) * static_cast<size_t>(d);
  for (int h = h0; h < h0 + group; ++h) {
    const float* q = q_row + static_cast<size_t>(h) * static_cast<size_t>(d);
    float* o = out_row + static_cast<size_t>(h) * static_cast<size_t>(d);
    float mx = -std::numeric_limits<float>::infinity();
    for (size_t j = 0; j < keys.size(); ++j) {
      scores[j] = dot<kIsa>(q, k_cache + rows[j], d) * shape.scale;
      mx = std::max(mx, scores[j]);
    }
    float sum = 0.0f;
    for (size_t j = 0; j < keys.size(); ++j) {
      scores[j] = std::exp(scores[j] - mx);
      sum += scores[j];
    }
    std::fill(o, o + d, 0.0f);
    for (size_t j = 0; j < keys.size(); ++j) {
      add_scaled<kIsa>(o, scores[j] / sum, v_cache + rows[j], d);
    }
  }
}

// Stamps out name_avx512 / name_avx2 / name_baseline from name_body and a `name` that calls the best one.
#define MXLM_ISA_DISPATCH(name, ARGS, CALL)                                     \
  MXLM_TARGET_AVX512 void name##_avx512 ARGS { name##_body<Isa::Avx512> CALL; } \
  MXLM_TARGET_AVX2 void name##_avx2 ARGS { name##_body<Isa::Avx2> CALL; }       \
  void name##_baseline ARGS { name##_body<Isa::Baseline> CALL; }                \
  void name ARGS {                                                              \
    switch (attention_active_isa()) {                                           \
      case Isa::Avx512:                                                         \
        return name##_avx512 CALL;                                              \
      case Isa::Avx2:                                                           \
        return name##_avx2 CALL;                                                \
      case Isa::Baseline:                                                       \
        return name##_baseline CALL;                                            \
    }                                                                           \
  }

MXLM_ISA_DISPATCH(attend,
                  (const float* q_row, float* out_row, const SequenceSlice& s, std::span<const int32_t> keys, int h0,
                   int group, int kv_head, const AttentionShape& shape, int32_t block_size, const float* k_cache,
                   const float* v_cache, std::vector<float>& scores),
                  (q_row, out_row, s, keys, h0, group, kv_head, shape, block_size, k_cache, v_cache, scores))

// The indexer's score of each visible block for one query head: the max over the block's keys (NaN never wins;
// vLLM treats it as -1e30). `score` holds one -inf per visible block on entry.
template <Isa kIsa>
MXLM_ALWAYS_INLINE void block_scores_body(const float* qh, const float* index_k_cache, const SequenceSlice& s,
                                          int32_t pos, int32_t bs, int d, float* score) {
  for (int32_t block = 0; block <= pos / bs; ++block) {
    const size_t page = static_cast<size_t>(s.block_table[static_cast<size_t>(block)]) * static_cast<size_t>(bs);
    float& b = score[block];
    for (int32_t t = block * bs; t <= pos && t < (block + 1) * bs; ++t) {
      const float v =
          dot<kIsa>(qh, index_k_cache + (page + static_cast<size_t>(t - block * bs)) * static_cast<size_t>(d), d);
      if (!std::isnan(v)) b = std::max(b, v);
    }
  }
}

MXLM_ISA_DISPATCH(block_scores,
                  (const float* qh, const float* index_k_cache, const SequenceSlice& s, int32_t pos, int32_t bs, int d,
                   float* score),
                  (qh, index_k_cache, s, pos, bs, d, score))

void check_shape(const AttentionShape& shape) {
  if (shape.num_kv_heads <= 0 || shape.num_heads % shape.num_kv_heads != 0)
    fail("attention with {} query heads and {} KV heads", shape.num_heads, shape.num_kv_heads);
}

}  // namespace

bool attention_isa_supported(AttentionIsa isa) {
  switch (isa) {
    case AttentionIsa::Avx512:
      return __builtin_cpu_supports("avx512f") && attention_isa_supported(AttentionIsa::Avx2);
    case AttentionIsa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case AttentionIsa::Baseline:
      return true;
  }
  return false;
}

AttentionIsa attention_active_isa() {
  const int forced = forced_isa.load(std::memory_order_relaxed);
  return forced == kNotForced ? best_isa() : static_cast<AttentionIsa>(forced);
}

void attention_force_isa(AttentionIsa isa) {
  if (!attention_isa_supported(isa))
    fail("attention: this CPU lacks the instructions of variant {}", static_cast<int>(isa));
  forced_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

void attention_reset_isa() { forced_isa.store(kNotForced, std::memory_order_relaxed); }

void CpuBackend::attention(const float* q, const AttentionBatch& batch, const AttentionShape& shape,
                           const float* k_cache, const float* v_cache, float* out) {
  check_shape(shape);
  const auto rows = rows_of(batch);
  const int group = shape.num_heads / shape.num_kv_heads;
  const size_t qwidth = static_cast<size_t>(shape.num_heads) * static_cast<size_t>(shape.head_dim);
#pragma omp parallel if (worth_threads(rows, shape.num_heads, shape.head_dim))
  {
    std::vector<float> scores;
    std::vector<int32_t> keys;
#pragma omp for schedule(dynamic)
    for (size_t r = 0; r < rows.size(); ++r) {
      const Row& row = rows[r];
      keys.resize(static_cast<size_t>(row.pos) + 1);
      std::iota(keys.begin(), keys.end(), 0);
      for (int kvh = 0; kvh < shape.num_kv_heads; ++kvh)
        attend(q + static_cast<size_t>(row.row) * qwidth, out + static_cast<size_t>(row.row) * qwidth, *row.seq, keys,
               kvh * group, group, kvh, shape, batch.block_size, k_cache, v_cache, scores);
    }
  }
}

void CpuBackend::index_select(const float* iq, const AttentionBatch& batch, const IndexerShape& shape,
                              const float* index_k_cache, int32_t* blocks) {
  const int selections = shape.num_heads;
  const int d = shape.head_dim;
  const int32_t bs = batch.block_size;
  const auto rows = rows_of(batch);
  const float inf = std::numeric_limits<float>::infinity();
#pragma omp parallel if (worth_threads(rows, shape.num_heads, shape.head_dim))
  {
    std::vector<float> score;
    std::vector<int32_t> order;
#pragma omp for schedule(dynamic)
    for (size_t r = 0; r < rows.size(); ++r) {
      const Row& row = rows[r];
      const int32_t visible = row.pos / bs + 1;
      for (int sel = 0; sel < selections; ++sel) {
        score.assign(static_cast<size_t>(visible), -inf);
        {
          const int h = sel;
          const float* qh =
              iq + (static_cast<size_t>(row.row) * static_cast<size_t>(shape.num_heads) + static_cast<size_t>(h)) *
                       static_cast<size_t>(d);
          block_scores(qh, index_k_cache, *row.seq, row.pos, bs, d, score.data());
        }
        for (int j = 0; j < shape.local_blocks; ++j) score[static_cast<size_t>(std::max(0, visible - 1 - j))] = inf;
        for (int j = 0; j < std::min(shape.init_blocks, visible); ++j) score[static_cast<size_t>(j)] = inf;
        order.resize(static_cast<size_t>(visible));
        std::iota(order.begin(), order.end(), 0);
        const int take = std::min(shape.topk_blocks, visible);
        std::partial_sort(order.begin(), order.begin() + take, order.end(), [&](int32_t a, int32_t b) {
          return score[static_cast<size_t>(a)] > score[static_cast<size_t>(b)] ||
                 (score[static_cast<size_t>(a)] == score[static_cast<size_t>(b)] && a < b);
        });
        int32_t* o =
            blocks + (static_cast<size_t>(row.row) * static_cast<size_t>(selections) + static_cast<size_t>(sel)) *
                         static_cast<size_t>(shape.topk_blocks);
        for (int j = 0; j < shape.topk_blocks; ++j) o[j] = j < take ? order[static_cast<size_t>(j)] : -1;
      }
    }
  }
}

void CpuBackend::sparse_attention(const float* q, const AttentionBatch& batch, const AttentionShape& shape,
                                  const float* k_cache, const float* v_cache, const int32_t* blocks, int topk,
                                  float* out) {
  check_shape(shape);
  const auto rows = rows_of(batch);
  const int group = shape.num_heads / shape.num_kv_heads;
  const int selections = shape.num_kv_heads;
  const int32_t bs = batch.block_size;
  const size_t qwidth = static_cast<size_t>(shape.num_heads) * static_cast<size_t>(shape.head_dim);
#pragma omp parallel if (worth_threads(rows, shape.num_heads, shape.head_dim))
  {
    std::vector<float> scores;
    std::vector<int32_t> keys, chosen;
#pragma omp for schedule(dynamic)
    for (size_t r = 0; r < rows.size(); ++r) {
      const Row& row = rows[r];
      for (int kvh = 0; kvh < shape.num_kv_heads; ++kvh) {
        const int sel = kvh;
        const int32_t* list =
            blocks + (static_cast<size_t>(row.row) * static_cast<size_t>(selections) + static_cast<size_t>(sel)) *
                         static_cast<size_t>(topk);
        chosen.assign(list, list + topk);
        // Keys in position order, so with every block selected this is exactly dense attention.
        std::sort(chosen.begin(), chosen.end());
        keys.clear();
        for (int32_t b : chosen) {
          // -1 pads the list; a block past the query's own cannot hold visible keys.
          if (b < 0 || b > row.pos / bs) continue;
          for (int32_t t = b * bs; t < std::min((b + 1) * bs, row.pos + 1); ++t) keys.push_back(t);
        }
        attend(q + static_cast<size_t>(row.row) * qwidth, out + static_cast<size_t>(row.row) * qwidth, *row.seq, keys,
               kvh * group, group, kvh, shape, bs, k_cache, v_cache, scores);
      }
    }
  }
}

}  // namespace mxlm::backend::cpu
