#include "model/image_preprocess.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace mxlm::model {

namespace {

// ---- Pillow's ImagingResample (libImaging/Resample.c) for 8-bit images, bicubic filter.

constexpr int kPrecisionBits = 32 - 8 - 2;

double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

struct Coefficients {
  int ksize = 0;
  std::vector<int> bounds;  // per output: first input index, count
  std::vector<int32_t> k;   // per output: ksize fixed-point weights
};

// precompute_coeffs + normalize_coeffs_8bpc for the box [0, in_size).
Coefficients precompute_coeffs(int in_size, int out_size) {
  constexpr double kSupport = 2.0;
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  const double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = kSupport * filterscale;
  Coefficients c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(static_cast<size_t>(out_size) * 2);
  c.k.assign(static_cast<size_t>(out_size) * static_cast<size_t>(c.ksize), 0);
  std::vector<double> w(static_cast<size_t>(c.ksize));
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[static_cast<size_t>(x)] = bicubic_filter((x + xmin - center + 0.5) * ss);
      ww += w[static_cast<size_t>(x)];
    }
    int32_t* k = c.k.data() + static_cast<size_t>(xx) * static_cast<size_t>(c.ksize);
    for (int x = 0; x < xmax; ++x) {
      double v = w[static_cast<size_t>(x)];
      if (ww != 0.0) v /= ww;
      k[x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                   : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[static_cast<size_t>(xx) * 2] = xmin;
    c.bounds[static_cast<size_t>(xx) * 2 + 1] = xmax;
  }
  return c;
}

uint8_t clip8(int32_t in) {
  if (in >= (1 << kPrecisionBits << 8)) return 255;
  if (in <= 0) return 0;
  return static_cast<uint8_t>(in >> kPrecisionBits);
}

// Rows [row0, row0 + rows) of `in` resampled horizontally to `out_w` columns.
RgbImage resample_horizontal(const RgbImage& in, int row0, int rows, int out_w, const Coefficients& c) {
  RgbImage out{out_w, rows, std::vector<uint8_t>(static_cast<size_t>(out_w) * static_cast<size_t>(rows) * 3)};
  const size_t in_stride = static_cast<size_t>(in.width) * 3;
#pragma omp parallel for schedule(static) if (static_cast <int64_t>(rows) * out_w > 65536)
  for (int y = 0; y < rows; ++y) {
    const uint8_t* src = in.pixels.data() + static_cast<size_t>(row0 + y) * in_stride;
    uint8_t* dst = out.pixels.data() + static_cast<size_t>(y) * static_cast<size_t>(out_w) * 3;
    for (int xx = 0; xx < out_w; ++xx) {
      const int xmin = c.bounds[static_cast<size_t>(xx) * 2];
      const int xmax = c.bounds[static_cast<size_t>(xx) * 2 + 1];
      const int32_t* k = c.k.data() + static_cast<size_t>(xx) * static_cast<size_t>(c.ksize);
      int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int x = 0; x < xmax; ++x) {
        const uint8_t* p = src + static_cast<size_t>(x + xmin) * 3;
        s0 += p[0] * k[x];
        s1 += p[1] * k[x];
        s2 += p[2] * k[x];
      }
      dst[xx * 3 + 0] = clip8(s0);
      dst[xx * 3 + 1] = clip8(s1);
      dst[xx * 3 + 2] = clip8(s2);
    }
  }
  return out;
}

// Vertical pass; `bounds` already shifted to `in`'s first row.
RgbImage resample_vertical(const RgbImage& in, int out_h, const Coefficients& c, int row_shift) {
  RgbImage out{in.width, out_h, std::vector<uint8_t>(static_cast<size_t>(in.width) * static_cast<size_t>(out_h) * 3)};
  const size_t stride = static_cast<size_t>(in.width) * 3;
#pragma omp parallel for schedule(static) if (static_cast <int64_t>(out_h) * in.width > 65536)
  for (int yy = 0; yy < out_h; ++yy) {
    const int ymin = c.bounds[static_cast<size_t>(yy) * 2] - row_shift;
    const int ymax = c.bounds[static_cast<size_t>(yy) * 2 + 1];
    const int32_t* k = c.k.data() + static_cast<size_t>(yy) * static_cast<size_t>(c.ksize);
    uint8_t* dst = out.pixels.data() + static_cast<size_t>(yy) * stride;
    for (size_t i = 0; i < stride; ++i) {
      int32_t s = 1 << (kPrecisionBits - 1);
      for (int y = 0; y < ymax; ++y) s += in.pixels[static_cast<size_t>(ymin + y) * stride + i] * k[y];
      dst[i] = clip8(s);
    }
  }
  return out;
}

}  // namespace

RgbImage resize_bicubic(const RgbImage& image, int width, int height) {
  if (image.width <= 0 || image.height <= 0 ||
      image.pixels.size() != static_cast<size_t>(image.width) * static_cast<size_t>(image.height) * 3)
    fail("resize: invalid {}x{} RGB image", image.width, image.height);
  if (width <= 0 || height <= 0) fail("resize: invalid target size {}x{}", width, height);
  if (width == image.width && height == image.height) return image;
  const Coefficients horiz = precompute_coeffs(image.width, width);
  const Coefficients vert = precompute_coeffs(image.height, height);
  const bool need_horizontal = width != image.width;
  const bool need_vertical = height != image.height;
  if (!need_horizontal) return resample_vertical(image, height, vert, 0);
  if (!need_vertical) return resample_horizontal(image, 0, image.height, width, horiz);
  // Always horizontal first, as Pillow <= 12.3 does. Pillow 13 goes vertical first when the height shrinks by more
  // than twice as many pixels as the width; that order rounds the intermediate differently (up to ~15 levels),
  // while horizontal-first stays within 2 levels of the reference processor's torchvision resize.
  // Pillow resamples horizontally only the rows the vertical pass reads.
  const int first = vert.bounds[0];
  const int last = vert.bounds[static_cast<size_t>(height) * 2 - 2] + vert.bounds[static_cast<size_t>(height) * 2 - 1];
  return resample_vertical(resample_horizontal(image, first, last - first, width, horiz), height, vert, first);
}

std::pair<int, int> smart_resize(int height, int width, int factor, int64_t min_pixels, int64_t max_pixels) {
  if (height <= 0 || width <= 0) fail("image size {}x{} has no pixels", width, height);
  if (factor <= 0 || min_pixels < 0 || max_pixels <= 0 || min_pixels > max_pixels)
    fail("invalid resize bounds: factor {}, min_pixels {}, max_pixels {}", factor, min_pixels, max_pixels);
  const double H = height, W = width, f = factor;
  if (std::max(H, W) / std::min(H, W) > 200)
    fail("image aspect ratio must be at most 200, got {}x{} ({:.1f})", width, height, std::max(H, W) / std::min(H, W));
  // Python's round() is round-half-to-even, as is nearbyint under the default rounding mode.
  int64_t h = std::max<int64_t>(factor, static_cast<int64_t>(std::nearbyint(H / f)) * factor);
  int64_t w = std::max<int64_t>(factor, static_cast<int64_t>(std::nearbyint(W / f)) * factor);
  if (h * w > max_pixels) {
    const double beta = std::sqrt(H * W / static_cast<double>(max_pixels));
    h = static_cast<int64_t>(std::floor(H / beta / f)) * factor;
    w = static_cast<int64_t>(std::floor(W / beta / f)) * factor;
  } else if (h * w < min_pixels) {
    const double beta = std::sqrt(static_cast<double>(min_pixels) / (H * W));
    h = static_cast<int64_t>(std::ceil(H * beta / f)) * factor;
    w = static_cast<int64_t>(std::ceil(W * beta / f)) * factor;
  }
  if (h <= 0 || w <= 0 || h > INT32_MAX || w > INT32_MAX)
    fail("image {}x{} cannot be resized within {}..{} pixels", width, height, min_pixels, max_pixels);
  return {static_cast<int>(h), static_cast<int>(w)};
}

ImageProcessorConfig load_image_processor_config(const std::filesystem::path& model_dir) {
  ImageProcessorConfig c;
  const auto path = model_dir / "preprocessor_config.json";
  if (!std::filesystem::exists(path)) return c;
  std::ifstream in(path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: invalid JSON ({})", path.string(), e.what());
  }
  if (!j.is_object()) fail("{}: expected a JSON object", path.string());
  auto get_int = [&](const nlohmann::json& o, const char* key, auto& out) {
    if (!o.contains(key) || o[key].is_null()) return false;
    if (!o[key].is_number_integer() || o[key].get<int64_t>() <= 0)
      fail("{}: '{}' must be a positive integer", path.string(), key);
    out = static_cast<std::remove_reference_t<decltype(out)>>(o[key].get<int64_t>());
    return true;
  };
  get_int(j, "patch_size", c.patch_size);
  get_int(j, "merge_size", c.merge_size);
  get_int(j, "temporal_patch_size", c.temporal_patch_size);
  const bool have_min = get_int(j, "min_pixels", c.min_pixels);
  const bool have_max = get_int(j, "max_pixels", c.max_pixels);
  // transformers 5.17 stores the bounds as size.{shortest_edge, longest_edge} (in pixels, despite the names).
  if (j.contains("size") && j["size"].is_object()) {
    const auto& s = j["size"];
    if (!have_min) get_int(s, "shortest_edge", c.min_pixels);
    if (!have_max) get_int(s, "longest_edge", c.max_pixels);
  }
  auto get_triple = [&](const char* key, float* out) {
    if (!j.contains(key) || j[key].is_null()) return;
    const auto& a = j[key];
    if (!a.is_array() || a.size() != 3 || !std::all_of(a.begin(), a.end(), [](const auto& v) { return v.is_number(); }))
      fail("{}: '{}' must be a list of 3 numbers", path.string(), key);
    for (size_t i = 0; i < 3; ++i) out[i] = a[i].template get<float>();
  };
  get_triple("image_mean", c.mean);
  get_triple("image_std", c.std);
  if (c.min_pixels > c.max_pixels)
    fail("{}: min_pixels {} exceeds max_pixels {}", path.string(), c.min_pixels, c.max_pixels);
  return c;
}

float normalize_sample(uint8_t value, float mean, float std) {
  // transformers folds rescale (1/255) into mean and std in f32, then computes (x - mean) / std in f32.
  const float m = mean * 255.0f;
  const float s = std * 255.0f;
  return (static_cast<float>(value) - m) / s;
}

int PreprocessedImage::patch_dim() const {
  return static_cast<int>(pixel_values.size() / static_cast<size_t>(std::max<int64_t>(num_patches(), 1)));
}

PreprocessedImage preprocess_image(const RgbImage& image, const ImageProcessorConfig& config) {
  const auto [h, w] = smart_resize(image.height, image.width, config.factor(), config.min_pixels, config.max_pixels);
  PreprocessedImage out;
  out.resized = resize_bicubic(image, w, h);
  const int p = config.patch_size, m = config.merge_size, tp = config.temporal_patch_size;
  out.grid_t = 1;
  out.grid_h = h / p;
  out.grid_w = w / p;
  const size_t dim = static_cast<size_t>(3 * tp * p * p);
  out.pixel_values.resize(static_cast<size_t>(out.num_patches()) * dim);
  // Normalisation table per channel and byte value.
  float table[3][256];
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v)
      table[c][v] = normalize_sample(static_cast<uint8_t>(v), config.mean[c], config.std[c]);
  const size_t stride = static_cast<size_t>(w) * 3;
  size_t row = 0;
  for (int wr = 0; wr < out.grid_h / m; ++wr)
    for (int wc = 0; wc < out.grid_w / m; ++wc)
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < m; ++j, ++row) {
          const int y0 = (wr * m + i) * p, x0 = (wc * m + j) * p;
          float* dst = out.pixel_values.data() + row * dim;
          for (int c = 0; c < 3; ++c)
            for (int t = 0; t < tp; ++t)  // a still image fills every temporal slot with the same frame
              for (int py = 0; py < p; ++py)
                for (int px = 0; px < p; ++px)
                  *dst++ = table[c][out.resized.pixels[static_cast<size_t>(y0 + py) * stride +
                                                       static_cast<size_t>(x0 + px) * 3 + static_cast<size_t>(c)]];
        }
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  const int32_t dims[2] = {h, w};
  XXH3_64bits_update(st, dims, sizeof(dims));
  XXH3_64bits_update(st, out.resized.pixels.data(), out.resized.pixels.size());
  out.content_hash = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return out;
}

std::vector<int32_t> expand_image_placeholders(std::span<const int32_t> ids, std::span<const int64_t> image_tokens,
                                               const ImageTokens& tokens) {
  const auto count = static_cast<size_t>(std::count(ids.begin(), ids.end(), tokens.image));
  if (count != image_tokens.size())
    fail("the prompt has {} image placeholder(s) but {} image(s) were given", count, image_tokens.size());
  std::vector<int32_t> out;
  size_t next = 0;
  for (int32_t id : ids) {
    if (id != tokens.image) {
      out.push_back(id);
      continue;
    }
    out.push_back(tokens.start);
    out.insert(out.end(), static_cast<size_t>(image_tokens[next++]), tokens.image);
    out.push_back(tokens.end);
  }
  return out;
}

}  // namespace mxlm::model
