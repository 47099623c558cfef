// The state of one request as the engine sees it: its tokens so far and where their K/V live.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/image_preprocess.h"

namespace mxlm::engine {

// An image's pixels and, once a step has needed them, its vision-tower embeddings. The choices of one request
// share it (the image is encoded once); only the engine thread encodes, after submit() handed it over.
struct ImageData {
  model::PreprocessedImage pixels;
  std::vector<float> embeddings;  // [image tokens, hidden size] once encoded; the pixels are dropped then
};

// An image in a prompt: tokens[begin, begin + length) are its merged image tokens, whose input embeddings are the
// image's rows. `hash` (of the pixels) joins the prefix-cache key of every block the run touches, so two images
// behind identical token ids never share cached K/V.
struct ImageSpan {
  int32_t begin = 0;
  int32_t length = 0;
  uint64_t hash = 0;
  std::shared_ptr<ImageData> data;
};

struct Sequence {
  int64_t id = 0;
  std::vector<int32_t> tokens;  // prompt + generated so far
  int32_t num_prompt_tokens = 0;
  int32_t num_computed = 0;            // leading tokens whose K/V (and index-K) are in the cache
  std::vector<int32_t> block_table;    // page of logical block b
  std::vector<uint64_t> block_hashes;  // chained hash of each full block registered in the prefix cache
  std::vector<ImageSpan> images;       // sorted by begin, disjoint, inside the prompt

  int32_t num_uncomputed() const { return static_cast<int32_t>(tokens.size()) - num_computed; }
};

}  // namespace mxlm::engine
