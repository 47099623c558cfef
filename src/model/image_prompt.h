// Turns a tokenized chat prompt with one image placeholder per image into what the text model consumes: the
// expanded token ids (start + one image token per 2x2 merge window + end, m3_vision.md §2.6), the rows of the
// image tokens and the vision embeddings that replace theirs (model::ForwardBatch::embedding_rows/embeddings),
// and per-image content hashes for prefix-cache keys.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "model/image_preprocess.h"
#include "model/vision_tower.h"

namespace mxlm::model {

struct ImagePrompt {
  std::vector<int32_t> tokens;          // expanded prompt
  std::vector<int32_t> embedding_rows;  // positions of the image tokens in `tokens`, in order
  std::vector<float> embeddings;        // [embedding_rows.size(), tower.output_size()]
  std::vector<uint64_t> image_hashes;   // per image, PreprocessedImage::content_hash
  std::vector<int32_t> image_begins;    // per image, the position of its first image token in `tokens`
};

// The expansion alone, without the tower (`embeddings` stays empty): what a server needs to count, schedule and
// cache-key the prompt before the engine encodes the images.
ImagePrompt expand_image_prompt(std::span<const int32_t> ids, std::span<const PreprocessedImage> images,
                                const ImageTokens& tokens = {});

// The k-th `tokens.image` placeholder of `ids` takes images[k]; each image is encoded on its own (attention never
// crosses images). An Error when the placeholder count differs from the number of images.
ImagePrompt build_image_prompt(std::span<const int32_t> ids, std::span<const PreprocessedImage> images,
                               VisionTower& tower, const ImageTokens& tokens = {});

}  // namespace mxlm::model
