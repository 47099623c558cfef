// Host side of captured decode steps (model/step_graphs.h): buckets, which steps qualify, padding; and that a backend
// without captured steps (the CPU's) runs every step as before whatever ModelOptions::step_graphs says.
#include "model/step_graphs.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include "backend/backend.h"
#include "core/error.h"
#include "engine/model_runner.h"
#include "engine/sequence.h"
#include "model/m3_model.h"

namespace mxlm::model {
namespace {

TEST(StepGraphBuckets, RowBucketsAreTheSmallestListedSizeAtLeastTheRows) {
  const std::vector<int> listed = {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256};
  for (int rows = 1; rows <= 256; ++rows) {
    const int want = *std::lower_bound(listed.begin(), listed.end(), rows);
    EXPECT_EQ(step_graph_rows(rows, 256), want) << rows;
  }
  EXPECT_EQ(step_graph_rows(257, 256), 0);
  EXPECT_EQ(step_graph_rows(0, 256), 0);
  // A smaller cap is a bucket of its own.
  EXPECT_EQ(step_graph_rows(97, 100), 100);
  EXPECT_EQ(step_graph_rows(96, 100), 96);
  EXPECT_EQ(step_graph_rows(101, 100), 0);
}

TEST(StepGraphBuckets, PageBucketsArePowersOfTwoAndOneAndAHalfTimesThem) {
  const std::vector<int> listed = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024};
  for (int pages = 1; pages <= 1024; ++pages) {
    const int want = *std::lower_bound(listed.begin(), listed.end(), pages);
    EXPECT_EQ(step_graph_pages(pages), want) << pages;
    EXPECT_LE(step_graph_pages(pages), pages + pages / 2 + 1);  // grids at most ~1.5x the context
  }
}

// A decode step of sequences with the given positions (of the new token) and block tables.
struct Step {
  std::vector<std::vector<int32_t>> tables;
  ForwardBatch batch;
  Step(const std::vector<int32_t>& positions, int block_size) {
    tables.resize(positions.size());
    for (size_t i = 0; i < positions.size(); ++i)
      for (int b = 0; b <= positions[i] / block_size; ++b) tables[i].push_back(static_cast<int32_t>(10 * i + b + 1));
    auto& a = batch.attention;
    a.block_size = block_size;
    a.num_tokens = static_cast<int32_t>(positions.size());
    for (size_t i = 0; i < positions.size(); ++i) {
      a.sequences.push_back({static_cast<int32_t>(i), 1, positions[i], tables[i]});
      a.positions.push_back(positions[i]);
      a.slots.push_back(static_cast<int64_t>(tables[i].back()) * block_size + positions[i] % block_size);
      batch.tokens.push_back(static_cast<int32_t>(100 + i));
      batch.logit_rows.push_back(static_cast<int32_t>(i));
    }
  }
};

TEST(StepGraphPadding, DecodeStepsQualifyPrefillAndImageStepsDoNot) {
  Step s({5, 17, 0}, 4);
  EXPECT_TRUE(is_decode_step(s.batch));
  EXPECT_EQ(step_pages_needed(s.batch), 5);  // position 17 in pages of 4: page 4 is its fifth
  ForwardBatch prefill = s.batch;
  prefill.attention.sequences[0].count = 2;
  EXPECT_FALSE(is_decode_step(prefill));
  ForwardBatch image = s.batch;
  image.embedding_rows = {1};
  EXPECT_FALSE(is_decode_step(image));
  EXPECT_FALSE(is_decode_step(ForwardBatch{}));
}

TEST(StepGraphPadding, PaddingRowsWriteNowhereAndReadPageZero) {
  Step s({5, 17, 0}, 4);
  const ForwardBatch p = pad_decode_step(s.batch, 8);
  const auto& a = p.attention;
  ASSERT_EQ(p.tokens.size(), 8u);
  EXPECT_EQ(a.num_tokens, 8);
  EXPECT_EQ(a.block_size, 4);
  ASSERT_EQ(a.sequences.size(), 8u);
  for (size_t r = 0; r < 3; ++r) {  // the step's own rows are unchanged, their tables the caller's
    EXPECT_EQ(p.tokens[r], s.batch.tokens[r]);
    EXPECT_EQ(a.positions[r], s.batch.attention.positions[r]);
    EXPECT_EQ(a.slots[r], s.batch.attention.slots[r]);
    EXPECT_EQ(a.sequences[r].block_table.data(), s.tables[r].data());
    EXPECT_EQ(a.sequences[r].start_pos, s.batch.attention.sequences[r].start_pos);
  }
  for (size_t r = 3; r < 8; ++r) {
    EXPECT_EQ(p.tokens[r], 0);
    EXPECT_EQ(a.positions[r], 0);
    EXPECT_EQ(a.slots[r], -1);
    EXPECT_EQ(a.sequences[r].begin, static_cast<int32_t>(r));
    EXPECT_EQ(a.sequences[r].count, 1);
    EXPECT_EQ(a.sequences[r].start_pos, 0);
    ASSERT_EQ(a.sequences[r].block_table.size(), 1u);
    EXPECT_EQ(a.sequences[r].block_table[0], 0);
  }
  ASSERT_EQ(p.logit_rows.size(), 8u);
  for (size_t r = 0; r < 8; ++r) EXPECT_EQ(p.logit_rows[r], static_cast<int32_t>(r));
  EXPECT_TRUE(is_decode_step(p));
  EXPECT_EQ(step_pages_needed(p), 5);
  EXPECT_THROW(pad_decode_step(s.batch, 2), Error);
}

// The CPU backend has no captured steps: a model asked for them decodes exactly as one that is not.
TEST(StepGraphPadding, CpuBackendIgnoresStepGraphs) {
  auto be = backend::make_cpu_backend();
  EXPECT_FALSE(be->supports_step_graphs());
  const auto dir = std::filesystem::path(MXLM_SOURCE_DIR) / "tests/fixtures/m3/mixed";
  ModelOptions on;
  on.step_graphs = StepGraphs::On;
  auto a = load_m3_model(dir, *be, on);
  auto b = load_m3_model(dir, *be, {});
  std::vector<std::vector<float>> out[2];
  M3Model* models[2] = {a.get(), b.get()};
  for (int m = 0; m < 2; ++m) {
    engine::CacheConfig cc = engine::cache_config_for(*models[m], 64, 2, 4);
    engine::ModelRunner runner(*models[m], cc);
    std::vector<engine::Sequence> seqs(2);
    seqs[0].tokens = {1, 2, 3, 4, 5};
    seqs[1].tokens = {7, 8};
    for (auto& s : seqs) {
      s.num_prompt_tokens = static_cast<int32_t>(s.tokens.size());
      runner.admit(s);
    }
    std::vector<engine::StepItem> items = {{&seqs[0], 5, false}, {&seqs[1], 2, false}};
    out[m].push_back(runner.step(items).logits);
    for (int step = 0; step < 3; ++step) {
      for (auto& s : seqs) s.tokens.push_back(static_cast<int32_t>(10 + step));
      items = {{&seqs[0], 1, false}, {&seqs[1], 1, false}};
      out[m].push_back(runner.step(items).logits);
    }
  }
  ASSERT_EQ(out[0].size(), out[1].size());
  for (size_t i = 0; i < out[0].size(); ++i) EXPECT_EQ(out[0][i], out[1][i]) << "step " << i;
  EXPECT_EQ(a->step_graph_stats().captures + a->step_graph_stats().padded_eager, 0u);
}

}  // namespace
}  // namespace mxlm::model
