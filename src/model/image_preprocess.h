// Image input for MiniMax-M3 (shared/spec/m3_vision.md §2): decoding, the reference processor's smart_resize,
// Pillow's antialiased bicubic resampling (byte for byte on uint8), CLIP normalisation and 14×14 patches in
// merge-window order, with a still image duplicated over the temporal axis.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace mxlm::model {

// 8-bit RGB, row-major, 3 bytes per pixel.
struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> pixels;
};

// Largest decoded image accepted (Pillow's DecompressionBombError threshold: 2 × MAX_IMAGE_PIXELS).
inline constexpr int64_t kMaxDecodedPixels = 2 * 89'478'485LL;

// Decodes PNG, JPEG, BMP, GIF (first frame) and WebP. Images with an alpha channel are composited on white
// with Pillow's rounding (vLLM's rgba_to_rgb). `what` names the input in errors ("image 2 of message 1").
RgbImage decode_image(std::span<const uint8_t> bytes, const std::string& what = "image");

// The resize bounds and normalisation of the model's image processor.
struct ImageProcessorConfig {
  int patch_size = 14;
  int merge_size = 2;
  int temporal_patch_size = 2;
  int64_t min_pixels = 3'136;    // 4 · 28²
  int64_t max_pixels = 451'584;  // 672²
  float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
  float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
  int factor() const { return patch_size * merge_size; }
};

// MODEL_DIR/preprocessor_config.json when present (min_pixels/max_pixels, else size.shortest_edge/longest_edge;
// patch_size, merge_size, temporal_patch_size, image_mean, image_std), else the defaults above.
ImageProcessorConfig load_image_processor_config(const std::filesystem::path& model_dir);

// The official processor's smart_resize (area mode): returns {height, width}, both multiples of `factor`.
// An aspect ratio above 200 is an Error.
std::pair<int, int> smart_resize(int height, int width, int factor, int64_t min_pixels, int64_t max_pixels);

// Pillow 12.3's Image.resize(size, Image.BICUBIC) on an RGB image (ImagingResample: separable, horizontal pass then
// vertical, support scaled by the downscale factor, 22-bit fixed-point coefficients, clipping). Same size: a copy.
// Pillow 13 changed the pass order for images whose height shrinks most; we keep 12.3's, which is what the
// reference processor's torchvision resize agrees with (tests/fixtures/vision).
RgbImage resize_bicubic(const RgbImage& image, int width, int height);

struct PreprocessedImage {
  int grid_t = 1;
  int grid_h = 0;  // patches
  int grid_w = 0;
  RgbImage resized;
  // [grid_t · grid_h · grid_w, 3 · temporal_patch_size · patch_size²] rows in merge-window order; each row is laid
  // out [channel][temporal][py][px].
  std::vector<float> pixel_values;
  uint64_t content_hash = 0;  // of the resized pixels and their size: prefix-cache keys use it

  int64_t num_patches() const { return static_cast<int64_t>(grid_t) * grid_h * grid_w; }
  int patch_dim() const;
  // Image tokens after the 2×2 merge.
  int64_t num_image_tokens(int merge_size = 2) const { return num_patches() / (merge_size * merge_size); }
};

PreprocessedImage preprocess_image(const RgbImage& image, const ImageProcessorConfig& config = {});

// Normalises one 8-bit sample as the transformers fast path does (rescale and normalise fused in f32).
float normalize_sample(uint8_t value, float mean, float std);

// The M3 image token ids (m3_checkpoint.md §3).
struct ImageTokens {
  int32_t image = 200025;
  int32_t start = 200029;
  int32_t end = 200030;
};

// Replaces the i-th `tokens.image` placeholder with start + image_tokens[i] × image + end. The number of
// placeholders must equal image_tokens.size() (an Error otherwise). Returns the expanded ids.
std::vector<int32_t> expand_image_placeholders(std::span<const int32_t> ids, std::span<const int64_t> image_tokens,
                                               const ImageTokens& tokens = {});

}  // namespace mxlm::model
