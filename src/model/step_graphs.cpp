#include "model/step_graphs.h"

#include <algorithm>

#include "core/error.h"

namespace mxlm::model {

namespace {
// The block table of a padding row: page 0, which it only reads (its slot is -1).
constexpr int32_t kPaddingTable[1] = {0};
}  // namespace

int step_graph_rows(int rows, int max_rows) {
  if (rows <= 0 || rows > max_rows) return 0;
  // 1, 2, 4, 8, then 16 .. 32 in steps of 8, then powers of two and 1.5 times them.
  int bucket = 1;
  while (bucket < rows) {
    if (bucket < 8) {
      bucket *= 2;
    } else if (bucket < 32) {
      bucket = bucket == 8 ? 16 : bucket + 8;
    } else {
      const int pow2 = 1 << (31 - __builtin_clz(static_cast<unsigned>(bucket)));
      bucket = bucket == pow2 ? pow2 + pow2 / 2 : 2 * pow2;
    }
  }
  return std::min(bucket, std::max(max_rows, rows));
}

int step_graph_pages(int pages) {
  if (pages <= 1) return 1;
  if (pages <= 2) return 2;
  int pow2 = 2;
  while (true) {
    if (pages <= pow2 + pow2 / 2) return pow2 + pow2 / 2;
    if (pages <= 2 * pow2) return 2 * pow2;
    pow2 *= 2;
  }
}

bool is_decode_step(const ForwardBatch& batch) {
  const auto& a = batch.attention;
  if (batch.tokens.empty() || !batch.embedding_rows.empty()) return false;
  if (a.sequences.size() != batch.tokens.size()) return false;
  return std::all_of(a.sequences.begin(), a.sequences.end(), [](const auto& s) { return s.count == 1; });
}

int step_pages_needed(const ForwardBatch& batch) {
  const auto& a = batch.attention;
  if (a.block_size <= 0) fail("attention with block size {}", a.block_size);
  int pages = 1;
  for (const auto& s : a.sequences) pages = std::max(pages, (s.start_pos + s.count + a.block_size - 1) / a.block_size);
  return pages;
}

ForwardBatch pad_decode_step(const ForwardBatch& batch, int rows) {
  const size_t T = batch.tokens.size(), R = static_cast<size_t>(rows);
  if (!is_decode_step(batch)) fail("only decode steps (one token per sequence) are padded");
  if (R < T) fail("a decode step of {} rows padded to {}", T, R);
  ForwardBatch p;
  p.tokens = batch.tokens;
  p.tokens.resize(R, 0);
  auto& a = p.attention;
  a = batch.attention;
  a.num_tokens = rows;
  a.positions.resize(R, 0);
  a.slots.resize(R, -1);
  for (size_t r = T; r < R; ++r)
    a.sequences.push_back({static_cast<int32_t>(r), 1, 0, std::span<const int32_t>(kPaddingTable)});
  p.logit_rows.resize(R);
  for (size_t r = 0; r < R; ++r) p.logit_rows[r] = static_cast<int32_t>(r);
  return p;
}

}  // namespace mxlm::model
