#include <gtest/gtest.h>

#include <numeric>
#include <set>

#include "core/error.h"
#include "engine/block_manager.h"

namespace mxlm::engine {
namespace {

Sequence make_seq(int64_t id, int32_t n, int32_t first = 0) {
  Sequence s;
  s.id = id;
  s.tokens.resize(static_cast<size_t>(n));
  std::iota(s.tokens.begin(), s.tokens.end(), first);
  return s;
}

TEST(BlockManager, AllocatesDistinctPagesAndFreesThem) {
  BlockManager bm(8, 4, /*prefix_caching=*/false);
  Sequence a = make_seq(1, 9), b = make_seq(2, 4);
  ASSERT_TRUE(bm.reserve(a, 9));
  ASSERT_TRUE(bm.reserve(b, 4));
  EXPECT_EQ(a.block_table.size(), 3u);
  EXPECT_EQ(b.block_table.size(), 1u);
  std::set<int32_t> pages(a.block_table.begin(), a.block_table.end());
  pages.insert(b.block_table.begin(), b.block_table.end());
  EXPECT_EQ(pages.size(), 4u);
  EXPECT_EQ(bm.num_available(), 4);
  // Growing within the last page needs nothing new; the next token past it does.
  ASSERT_TRUE(bm.reserve(a, 12));
  EXPECT_EQ(a.block_table.size(), 3u);
  ASSERT_TRUE(bm.reserve(a, 13));
  EXPECT_EQ(a.block_table.size(), 4u);
  // Too many: refused and nothing changes.
  Sequence c = make_seq(3, 20);
  EXPECT_FALSE(bm.reserve(c, 20));
  EXPECT_TRUE(c.block_table.empty());
  EXPECT_EQ(bm.num_available(), 3);
  bm.release(a);
  bm.release(b);
  EXPECT_EQ(bm.num_available(), 8);
  EXPECT_TRUE(a.block_table.empty());
}

TEST(BlockManager, RejectsBadGeometry) {
  EXPECT_THROW(BlockManager(0, 4), Error);
  EXPECT_THROW(BlockManager(4, 0), Error);
}

TEST(BlockManager, PrefixCacheReusesFullBlocksOfTheSameTokens) {
  BlockManager bm(16, 4);
  Sequence a = make_seq(1, 10);
  EXPECT_EQ(bm.match_prefix(a), 0);
  ASSERT_TRUE(bm.reserve(a, 10));
  a.num_computed = 10;
  bm.commit(a);  // blocks 0 and 1 are full -> cached
  EXPECT_EQ(a.block_hashes.size(), 2u);

  // Same first 8 tokens, different afterwards: reuses both full blocks.
  Sequence b = make_seq(2, 11);
  b.tokens[9] = 999;
  EXPECT_EQ(bm.match_prefix(b), 8);
  ASSERT_EQ(b.block_table.size(), 2u);
  EXPECT_EQ(b.block_table[0], a.block_table[0]);
  EXPECT_EQ(b.block_table[1], a.block_table[1]);
  EXPECT_EQ(bm.ref_count(a.block_table[0]), 2);

  // A different token inside block 1 stops the match after block 0 (chained hashes).
  Sequence c = make_seq(3, 12);
  c.tokens[5] = 777;
  EXPECT_EQ(bm.match_prefix(c), 4);
  // The same block-1 tokens after a different block 0 do not match either.
  Sequence d = make_seq(4, 12);
  d.tokens[0] = 555;
  EXPECT_EQ(bm.match_prefix(d), 0);

  // Exactly 8 tokens: at least one must be computed, so only block 0 is reused.
  Sequence e = make_seq(5, 8);
  EXPECT_EQ(bm.match_prefix(e), 4);
}

TEST(BlockManager, CachedPagesSurviveReleaseUntilEvicted) {
  BlockManager bm(3, 2);
  Sequence a = make_seq(1, 4);
  ASSERT_TRUE(bm.reserve(a, 4));
  a.num_computed = 4;
  bm.commit(a);
  const auto pages = a.block_table;
  bm.release(a);
  EXPECT_EQ(bm.num_available(), 3);
  // Still cached: a new sequence with the same prefix gets the same page back.
  Sequence b = make_seq(2, 5);
  EXPECT_EQ(bm.match_prefix(b), 4);
  EXPECT_EQ(b.block_table, pages);
  bm.release(b);
  // Filling the cache with other tokens evicts the cached pages.
  Sequence c = make_seq(3, 6, 100);
  ASSERT_TRUE(bm.reserve(c, 6));
  bm.release(c);
  Sequence d = make_seq(4, 5);
  EXPECT_EQ(bm.match_prefix(d), 0);
}

TEST(BlockManager, HashIsChainedOverBlocks) {
  const std::vector<int32_t> t = {1, 2, 3, 4};
  EXPECT_EQ(hash_block(0, t), hash_block(0, t));
  EXPECT_NE(hash_block(0, t), hash_block(1, t));
  const std::vector<int32_t> u = {1, 2, 3, 5};
  EXPECT_NE(hash_block(0, t), hash_block(0, u));
}

}  // namespace
}  // namespace mxlm::engine
