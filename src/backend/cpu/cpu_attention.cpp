// Paged attention on the CPU: dense causal GQA, the lightning indexer's block selection and block-sparse
// attention (m3_sparse_attention.md). Pages hold block_size token slots; logical block b of a sequence is
// page block_table[b], so block ids are absolute positions // block_size.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

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

inline float dot(const float* a, const float* b, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Softmax attention of the query heads [h0, h0 + group) of one row over the key positions `keys`.
void attend(const float* q_row, float* out_row, const SequenceSlice& s, std::span<const int32_t> keys, int h0,
            int group, int kv_head, const AttentionShape& shape, int32_t block_size, const float* k_cache,
            const float* v_cache, std::vector<float>& scores) {
  const int d = shape.head_dim;
  const size_t width = static_cast<size_t>(shape.num_kv_heads) * static_cast<size_t>(d);
  scores.resize(keys.size());
  for (int h = h0; h < h0 + group; ++h) {
    const float* q = q_row + static_cast<size_t>(h) * static_cast<size_t>(d);
    float* o = out_row + static_cast<size_t>(h) * static_cast<size_t>(d);
    float mx = -std::numeric_limits<float>::infinity();
    for (size_t j = 0; j < keys.size(); ++j) {
      const float* k =
          k_cache + slot_of(s, keys[j], block_size) * width + static_cast<size_t>(kv_head) * static_cast<size_t>(d);
      scores[j] = dot(q, k, d) * shape.scale;
      mx = std::max(mx, scores[j]);
    }
    float sum = 0.0f;
    for (size_t j = 0; j < keys.size(); ++j) {
      scores[j] = std::exp(scores[j] - mx);
      sum += scores[j];
    }
    std::fill(o, o + d, 0.0f);
    for (size_t j = 0; j < keys.size(); ++j) {
      const float* v =
          v_cache + slot_of(s, keys[j], block_size) * width + static_cast<size_t>(kv_head) * static_cast<size_t>(d);
      const float p = scores[j] / sum;
      for (int c = 0; c < d; ++c) o[c] += p * v[c];
    }
  }
}

void check_shape(const AttentionShape& shape) {
  if (shape.num_kv_heads <= 0 || shape.num_heads % shape.num_kv_heads != 0)
    fail("attention with {} query heads and {} KV heads", shape.num_heads, shape.num_kv_heads);
}

}  // namespace

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
          for (int32_t t = 0; t <= row.pos; ++t) {
            const float s = dot(qh, index_k_cache + slot_of(*row.seq, t, bs) * static_cast<size_t>(d), d);
            float& b = score[static_cast<size_t>(t / bs)];
            // NaN scores never win (vLLM treats them as -1e30).
            if (!std::isnan(s)) b = std::max(b, s);
          }
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
