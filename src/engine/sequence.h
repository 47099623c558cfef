// The state of one request as the engine sees it: its tokens so far and where their K/V live.
#pragma once

#include <cstdint>
#include <vector>

namespace mxlm::engine {

struct Sequence {
  int64_t id = 0;
  std::vector<int32_t> tokens;  // prompt + generated so far
  int32_t num_prompt_tokens = 0;
  int32_t num_computed = 0;            // leading tokens whose K/V (and index-K) are in the cache
  std::vector<int32_t> block_table;    // page of logical block b
  std::vector<uint64_t> block_hashes;  // chained hash of each full block registered in the prefix cache

  int32_t num_uncomputed() const { return static_cast<int32_t>(tokens.size()) - num_computed; }
};

}  // namespace mxlm::engine
