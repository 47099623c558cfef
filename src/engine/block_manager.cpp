#include "engine/block_manager.h"

#include <xxhash.h>

#include "core/error.h"

namespace mxlm::engine {

uint64_t hash_block(uint64_t parent, std::span<const int32_t> tokens, uint64_t extra) {
  const uint64_t h = XXH3_64bits_withSeed(tokens.data(), tokens.size_bytes(), parent);
  return extra == 0 ? h : XXH3_64bits_withSeed(&extra, sizeof(extra), h);
}

uint64_t block_image_key(const Sequence& seq, int32_t begin, int32_t end) {
  uint64_t key = 0;
  for (const auto& img : seq.images) {
    if (img.begin >= end) break;
    if (img.begin + img.length <= begin) continue;
    const int64_t part[2] = {static_cast<int64_t>(img.hash), static_cast<int64_t>(img.begin) - begin};
    key = XXH3_64bits_withSeed(part, sizeof(part), key);
  }
  // 0 means "no image"; a real key of 0 would merely collide with the text-only hash, never with another image.
  return key;
}

BlockManager::BlockManager(int32_t num_pages, int32_t block_size, bool prefix_caching)
    : block_size_(block_size), prefix_caching_(prefix_caching), pages_(static_cast<size_t>(num_pages)) {
  if (num_pages <= 0) fail("the KV cache needs at least one page, got {}", num_pages);
  if (block_size <= 0) fail("the KV page size must be positive, got {}", block_size);
  free_.reserve(static_cast<size_t>(num_pages));
  for (int32_t p = num_pages - 1; p >= 0; --p) free_.push_back(p);
}

int32_t BlockManager::num_available() const { return static_cast<int32_t>(free_.size() + evictable_.size()); }

int32_t BlockManager::take_page() {
  int32_t page;
  if (!free_.empty()) {
    page = free_.back();
    free_.pop_back();
  } else {
    page = evictable_.front();
    evictable_.pop_front();
    Page& p = pages_[static_cast<size_t>(page)];
    by_hash_.erase(p.hash);
    p.cached = false;
    p.tokens.clear();
    p.image_key = 0;
  }
  pages_[static_cast<size_t>(page)].refs = 1;
  return page;
}

void BlockManager::unref(int32_t page) {
  Page& p = pages_[static_cast<size_t>(page)];
  if (p.refs <= 0) fail("KV page {} released more often than taken", page);
  if (--p.refs > 0) return;
  if (p.cached) {
    evictable_.push_back(page);
    p.lru = std::prev(evictable_.end());
  } else {
    free_.push_back(page);
  }
}

int32_t BlockManager::match_prefix(Sequence& seq) {
  if (!seq.block_table.empty()) fail("match_prefix on sequence {} that already holds pages", seq.id);
  seq.block_hashes.clear();
  if (!prefix_caching_) return 0;
  const int32_t n = static_cast<int32_t>(seq.tokens.size());
  const int32_t max_blocks = (n - 1) / block_size_;  // keep >= 1 token to compute
  uint64_t parent = 0;
  for (int32_t b = 0; b < max_blocks; ++b) {
    std::span<const int32_t> toks(seq.tokens.data() + b * block_size_, static_cast<size_t>(block_size_));
    const uint64_t key = block_image_key(seq, b * block_size_, (b + 1) * block_size_);
    const uint64_t h = hash_block(parent, toks, key);
    auto it = by_hash_.find(h);
    if (it == by_hash_.end()) break;
    Page& p = pages_[static_cast<size_t>(it->second)];
    if (p.image_key != key || !std::equal(p.tokens.begin(), p.tokens.end(), toks.begin(), toks.end())) break;
    if (p.refs == 0) evictable_.erase(p.lru);
    ++p.refs;
    seq.block_table.push_back(it->second);
    seq.block_hashes.push_back(h);
    parent = h;
    ++cache_hits_;
  }
  seq.num_computed = static_cast<int32_t>(seq.block_table.size()) * block_size_;
  return seq.num_computed;
}

bool BlockManager::reserve(Sequence& seq, int32_t num_tokens) {
  const int32_t needed = (num_tokens + block_size_ - 1) / block_size_ - static_cast<int32_t>(seq.block_table.size());
  if (needed <= 0) return true;
  if (needed > num_available()) return false;
  for (int32_t i = 0; i < needed; ++i) seq.block_table.push_back(take_page());
  return true;
}

void BlockManager::commit(Sequence& seq) {
  if (!prefix_caching_) return;
  const int32_t full = std::min(seq.num_computed, static_cast<int32_t>(seq.tokens.size())) / block_size_;
  for (int32_t b = static_cast<int32_t>(seq.block_hashes.size()); b < full; ++b) {
    const uint64_t parent = b == 0 ? 0 : seq.block_hashes[static_cast<size_t>(b - 1)];
    std::span<const int32_t> toks(seq.tokens.data() + b * block_size_, static_cast<size_t>(block_size_));
    const uint64_t key = block_image_key(seq, b * block_size_, (b + 1) * block_size_);
    const uint64_t h = hash_block(parent, toks, key);
    seq.block_hashes.push_back(h);
    const int32_t page = seq.block_table[static_cast<size_t>(b)];
    Page& p = pages_[static_cast<size_t>(page)];
    if (p.cached || by_hash_.count(h)) continue;  // already cached (maybe in another page with the same content)
    p.cached = true;
    p.hash = h;
    p.tokens.assign(toks.begin(), toks.end());
    p.image_key = key;
    by_hash_[h] = page;
  }
}

void BlockManager::release(Sequence& seq) {
  for (auto it = seq.block_table.rbegin(); it != seq.block_table.rend(); ++it) unref(*it);
  seq.block_table.clear();
  seq.block_hashes.clear();
  seq.num_computed = 0;
}

}  // namespace mxlm::engine
