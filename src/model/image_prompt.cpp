#include "model/image_prompt.h"

#include "core/error.h"

namespace mxlm::model {

ImagePrompt expand_image_prompt(std::span<const int32_t> ids, std::span<const PreprocessedImage> images,
                                const ImageTokens& tokens) {
  std::vector<int64_t> counts;
  for (const auto& img : images) counts.push_back(img.num_image_tokens());
  ImagePrompt out;
  out.tokens = expand_image_placeholders(ids, counts, tokens);
  // Every placeholder was expanded, so each image id left in the prompt is one merged image token, and the
  // images' runs follow each other in order.
  for (size_t r = 0; r < out.tokens.size(); ++r)
    if (out.tokens[r] == tokens.image) out.embedding_rows.push_back(static_cast<int32_t>(r));
  size_t row = 0;
  for (const auto& img : images) {
    if (img.num_image_tokens() <= 0 || row >= out.embedding_rows.size())
      fail("image {} has no image tokens in the expanded prompt", out.image_begins.size());
    out.image_begins.push_back(out.embedding_rows[row]);
    out.image_hashes.push_back(img.content_hash);
    row += static_cast<size_t>(img.num_image_tokens());
  }
  if (row != out.embedding_rows.size())
    fail("the expanded prompt has {} image tokens but the images take {}", out.embedding_rows.size(), row);
  return out;
}

ImagePrompt build_image_prompt(std::span<const int32_t> ids, std::span<const PreprocessedImage> images,
                               VisionTower& tower, const ImageTokens& tokens) {
  ImagePrompt out = expand_image_prompt(ids, images, tokens);
  size_t next_image = 0;
  for (const auto& img : images) {
    const auto e = tower.embed(img);
    if (e.size() != static_cast<size_t>(img.num_image_tokens()) * static_cast<size_t>(tower.output_size()))
      fail("image {}: the tower gave {} floats for {} image tokens", next_image, e.size(), img.num_image_tokens());
    out.embeddings.insert(out.embeddings.end(), e.begin(), e.end());
    ++next_image;
  }
  if (out.embedding_rows.size() * static_cast<size_t>(tower.output_size()) != out.embeddings.size())
    fail("the expanded prompt has {} image tokens but the images give {} embeddings", out.embedding_rows.size(),
         out.embeddings.size() / static_cast<size_t>(tower.output_size()));
  return out;
}

}  // namespace mxlm::model
