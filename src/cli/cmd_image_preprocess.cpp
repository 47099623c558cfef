// `mxlm image-preprocess`: decodes an image and runs the M3 image processor (smart_resize, Pillow bicubic,
// normalisation, patches), writing the resized uint8 pixels and the pixel values as .npy (f32) files and a JSON
// summary on stdout. With --resize WxH it only decodes and resizes (for comparisons with Pillow).
#include <CLI/CLI.hpp>

#include <fstream>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/registry.h"
#include "core/error.h"
#include "engine/npy.h"
#include "model/image_preprocess.h"

namespace mxlm::cli {
namespace {

struct ImagePreprocessOptions {
  std::string image;
  std::string model;
  int64_t min_pixels = -1;
  int64_t max_pixels = -1;
  std::string resize;
  std::string resized_output;
  std::string pixel_values_output;
};

void write_rgb(const std::string& path, const model::RgbImage& img) {
  std::vector<float> f(img.pixels.begin(), img.pixels.end());
  engine::write_npy_f32(path, {img.height, img.width, 3}, f.data());
}

void run(const ImagePreprocessOptions& o) {
  std::ifstream in(o.image, std::ios::binary);
  if (!in) fail("cannot read {}", o.image);
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const model::RgbImage img = model::decode_image(bytes, o.image);
  nlohmann::json summary{{"width", img.width}, {"height", img.height}};
  if (!o.resize.empty()) {
    int w = 0, h = 0;
    char x = 0, extra = 0;
    if (std::sscanf(o.resize.c_str(), "%d%c%d%c", &w, &x, &h, &extra) != 3 || x != 'x')
      fail("--resize must be WIDTHxHEIGHT, got '{}'", o.resize);
    const model::RgbImage out = model::resize_bicubic(img, w, h);
    if (!o.resized_output.empty()) write_rgb(o.resized_output, out);
    summary["resized_width"] = out.width;
    summary["resized_height"] = out.height;
    std::cout << summary.dump() << "\n";
    return;
  }
  model::ImageProcessorConfig config;
  if (!o.model.empty()) config = model::load_image_processor_config(o.model);
  if (o.min_pixels >= 0) config.min_pixels = o.min_pixels;
  if (o.max_pixels >= 0) config.max_pixels = o.max_pixels;
  const model::PreprocessedImage p = model::preprocess_image(img, config);
  if (!o.resized_output.empty()) write_rgb(o.resized_output, p.resized);
  if (!o.pixel_values_output.empty())
    engine::write_npy_f32(o.pixel_values_output, {p.num_patches(), p.patch_dim()}, p.pixel_values.data());
  summary["resized_width"] = p.resized.width;
  summary["resized_height"] = p.resized.height;
  summary["grid_thw"] = {p.grid_t, p.grid_h, p.grid_w};
  summary["image_tokens"] = p.num_image_tokens(config.merge_size);
  summary["content_hash"] = p.content_hash;
  std::cout << summary.dump() << "\n";
}

void add_image_preprocess(CLI::App& app) {
  auto o = std::make_shared<ImagePreprocessOptions>();
  auto* cmd = app.add_subcommand("image-preprocess", "Decode and preprocess an image as the M3 image processor does");
  cmd->add_option("--image", o->image, "Image file (PNG, JPEG, WebP, BMP, GIF)")->required();
  cmd->add_option("--model", o->model, "Model directory (its preprocessor_config.json, if any, sets the bounds)");
  cmd->add_option("--min-pixels", o->min_pixels, "Override the minimum pixel count");
  cmd->add_option("--max-pixels", o->max_pixels, "Override the maximum pixel count");
  cmd->add_option("--resize", o->resize, "Only resize to WIDTHxHEIGHT with Pillow's bicubic filter");
  cmd->add_option("--resized-output", o->resized_output, "Write the resized RGB pixels ([H, W, 3] f32 .npy)");
  cmd->add_option("--pixel-values-output", o->pixel_values_output, "Write the pixel values ([patches, 1176] f32 .npy)");
  cmd->callback([o] { run(*o); });
}

const bool registered = register_command("image-preprocess", add_image_preprocess);

}  // namespace
}  // namespace mxlm::cli
