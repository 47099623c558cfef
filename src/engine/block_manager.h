// KV-cache pages: each page holds block_size token slots of K, V and index-K for every layer. The manager hands
// pages to sequences, takes them back, and keeps a prefix cache: a full page is registered under the chained
// hash of its tokens (hash of block b = XXH3(tokens of b, seed = hash of block b-1)), so a new sequence with the
// same leading blocks reuses those pages instead of recomputing them. A block that holds image tokens also hashes
// the content hash and offset of every image run it touches (as vLLM's extra keys): identical token ids with
// different pixels make different keys. Unreferenced cached pages stay reusable
// until the allocator needs them (least recently released first).
#pragma once

#include <cstdint>
#include <list>
#include <span>
#include <unordered_map>
#include <vector>

#include "engine/sequence.h"

namespace mxlm::engine {

// `extra`: 0 for a text-only block, else block_image_key().
uint64_t hash_block(uint64_t parent, std::span<const int32_t> tokens, uint64_t extra = 0);
// The images of seq that overlap tokens [begin, end): a hash of their content hashes and their offsets from
// `begin`; 0 when there are none.
uint64_t block_image_key(const Sequence& seq, int32_t begin, int32_t end);

class BlockManager {
 public:
  BlockManager(int32_t num_pages, int32_t block_size, bool prefix_caching = true);

  int32_t block_size() const { return block_size_; }
  int32_t num_pages() const { return static_cast<int32_t>(pages_.size()); }
  // Pages that an allocation can take now (free or cached-but-unreferenced).
  int32_t num_available() const;

  // Reuses cached pages for the longest run of full leading blocks of seq.tokens, leaving at least one token
  // to compute (the step that samples the next token needs its logits). seq must hold no pages yet. Returns
  // the number of tokens reused, which becomes seq.num_computed.
  int32_t match_prefix(Sequence& seq);
  // Gives seq enough pages for `num_tokens` tokens. Returns false, changing nothing, when too few are available.
  bool reserve(Sequence& seq, int32_t num_tokens);
  // Registers seq's full, computed blocks in the prefix cache.
  void commit(Sequence& seq);
  // Returns seq's pages (cached ones stay reusable).
  void release(Sequence& seq);

  int32_t ref_count(int32_t page) const { return pages_.at(static_cast<size_t>(page)).refs; }
  uint64_t cache_hits() const { return cache_hits_; }

 private:
  struct Page {
    int32_t refs = 0;
    bool cached = false;
    uint64_t hash = 0;
    std::vector<int32_t> tokens;  // of a cached page, to rule out hash collisions
    uint64_t image_key = 0;       // likewise
    std::list<int32_t>::iterator lru;
  };
  int32_t take_page();
  void unref(int32_t page);

  int32_t block_size_;
  bool prefix_caching_;
  std::vector<Page> pages_;
  std::vector<int32_t> free_;                      // never cached or evicted
  std::list<int32_t> evictable_;                   // cached with refs == 0, oldest first
  std::unordered_map<uint64_t, int32_t> by_hash_;  // cached pages
  uint64_t cache_hits_ = 0;
};

}  // namespace mxlm::engine
