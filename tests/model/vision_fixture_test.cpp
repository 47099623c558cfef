// The M3 image path against transformers 5.17 with the spec's 3D vision rotary (tests/fixtures/vision,
// tools/gen_vision_fixtures.py): preprocessing vs the Pillow-path and reference-processor pixel values, tower
// features, projector+merge embeddings, and the language model's logits with the image embeddings in place.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "engine/npy.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/image_preprocess.h"
#include "model/image_prompt.h"
#include "model/m3_model.h"
#include "model/vision_tower.h"

namespace mxlm {
namespace {

namespace fs = std::filesystem;

const fs::path kDir = fs::path(MXLM_SOURCE_DIR) / "tests/fixtures/vision";

nlohmann::json reference() {
  std::ifstream f(kDir / "reference.json");
  return nlohmann::json::parse(f);
}

engine::NpyArray npy(const std::string& stem, size_t i) {
  return engine::read_npy_f32(kDir / (stem + "_" + std::to_string(i) + ".npy"));
}

double relative_error(std::span<const float> got, std::span<const float> want) {
  double err = 0.0, scale = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, static_cast<double>(std::fabs(got[i] - want[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(want[i])));
  }
  return err / scale;
}

model::RgbImage read_image(size_t i) {
  std::ifstream f(kDir / ("image_" + std::to_string(i) + ".png"), std::ios::binary);
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return model::decode_image(bytes);
}

TEST(VisionFixture, PreprocessingMatchesPillowPathAndReferenceProcessor) {
  const auto ref = reference();
  const auto& images = ref.at("images");
  ASSERT_GE(images.size(), 4u);
  // One LSB of a channel after normalisation is 1 / (255 · std) ≤ 0.0151.
  const float lsb = 1.0f / (255.0f * 0.26130258f);
  for (size_t i = 0; i < images.size(); ++i) {
    const auto p = model::preprocess_image(read_image(i));
    const auto grid = images[i].at("grid_thw").get<std::vector<int>>();
    EXPECT_EQ(p.grid_t, grid[0]);
    EXPECT_EQ(p.grid_h, grid[1]);
    EXPECT_EQ(p.grid_w, grid[2]);
    const auto pillow = npy("pixel_values", i);               // Pillow 12.3 resize on the GPU machine
    const auto processor = npy("processor_pixel_values", i);  // transformers' own (torchvision) processor
    ASSERT_EQ(pillow.data.size(), p.pixel_values.size());
    ASSERT_EQ(processor.data.size(), p.pixel_values.size());
    size_t differ_pillow = 0, differ_processor = 0;
    float max_processor = 0.0f;
    for (size_t k = 0; k < p.pixel_values.size(); ++k) {
      differ_pillow += p.pixel_values[k] != pillow.data[k];
      const float d = std::fabs(p.pixel_values[k] - processor.data[k]);
      differ_processor += d > 0.0f;
      max_processor = std::max(max_processor, d);
    }
    EXPECT_EQ(differ_pillow, 0u) << "image " << i;
    // torchvision's antialiased bicubic rounds a few pixels differently (m3_vision.md §2.3): ≤ 2 levels, < 1 %.
    EXPECT_LE(max_processor, 2.0f * lsb + 1e-5f) << "image " << i;
    EXPECT_LT(static_cast<double>(differ_processor), 0.01 * static_cast<double>(p.pixel_values.size())) << i;
  }
}

struct TowerHarness {
  std::unique_ptr<backend::Backend> backend = backend::make_cpu_backend();
  io::ModelConfig config = io::load_model_config(kDir);
  io::Checkpoint checkpoint{kDir};
  model::VisionTower tower{config, checkpoint, *backend};
};

model::PreprocessedImage fixture_input(const nlohmann::json& entry, size_t i) {
  model::PreprocessedImage p;
  const auto grid = entry.at("grid_thw").get<std::vector<int>>();
  p.grid_t = grid[0];
  p.grid_h = grid[1];
  p.grid_w = grid[2];
  p.pixel_values = npy("pixel_values", i).data;
  return p;
}

TEST(VisionFixture, FeaturesAndMergedEmbeddingsMatchTransformers) {
  TowerHarness h;
  ASSERT_TRUE(model::has_vision_tower(h.checkpoint));
  const auto ref = reference();
  const auto& images = ref.at("images");
  for (size_t i = 0; i < images.size(); ++i) {
    const auto input = fixture_input(images[i], i);
    const auto features = h.tower.features(input);
    const auto want_f = npy("features", i);
    ASSERT_EQ(features.size(), want_f.data.size()) << i;
    EXPECT_LE(relative_error(features, want_f.data), 1e-4) << "features of image " << i;
    const auto merged = h.tower.project(features, input.num_patches());
    const auto want_m = npy("merged", i);
    ASSERT_EQ(merged.size(), want_m.data.size()) << i;
    EXPECT_LE(relative_error(merged, want_m.data), 1e-4) << "merged embeddings of image " << i;
  }
}

TEST(VisionFixture, ImagesEncodedTogetherMatchTransformersOneByOne) {
  // One tower pass over every fixture image (attention segments per image) gives each image's own reference.
  TowerHarness h;
  const auto ref = reference();
  const auto& images = ref.at("images");
  std::vector<model::PreprocessedImage> inputs;
  for (size_t i = 0; i < images.size(); ++i) inputs.push_back(fixture_input(images[i], i));
  std::vector<const model::PreprocessedImage*> all;
  for (const auto& p : inputs) all.push_back(&p);
  const auto features = h.tower.features_batch(all);
  const auto merged = h.tower.embed_batch(all);
  ASSERT_EQ(features.size(), inputs.size());
  ASSERT_EQ(merged.size(), inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto want_f = npy("features", i), want_m = npy("merged", i);
    ASSERT_EQ(features[i].size(), want_f.data.size()) << i;
    ASSERT_EQ(merged[i].size(), want_m.data.size()) << i;
    EXPECT_LE(relative_error(features[i], want_f.data), 1e-4) << "features of image " << i << " in a batch";
    EXPECT_LE(relative_error(merged[i], want_m.data), 1e-4) << "merged embeddings of image " << i << " in a batch";
  }
}

TEST(VisionFixture, RotaryIsThreeDimensionalOverAllButTwoDims) {
  // head_dim 80: 26 dims per axis, 39 rotated pairs (t, h, w), dims 78 and 79 untouched.
  const auto r = model::vision_rotary(80, 10000.0, 1, 4, 6);
  EXPECT_EQ(r.axis_dim, 26);
  EXPECT_EQ(r.pairs(), 39);
  const auto pos = model::vision_positions(1, 4, 6);
  // Merge-window order: (0,0,0) (0,0,1) (0,1,0) (0,1,1) (0,0,2) ...
  EXPECT_EQ(pos[1], (std::array<int32_t, 3>{0, 0, 1}));
  EXPECT_EQ(pos[2], (std::array<int32_t, 3>{0, 1, 0}));
  EXPECT_EQ(pos[4], (std::array<int32_t, 3>{0, 0, 2}));
  // Token 1 differs from token 0 only in w: only the w pairs (26..38) change; t and h pairs stay at angle 0.
  for (int k = 0; k < 26; ++k) EXPECT_EQ(r.sin[39 + static_cast<size_t>(k)], 0.0f) << k;
  EXPECT_NEAR(r.sin[39 + 26], std::sin(1.0f), 1e-7);
  // Token 2 differs only in h.
  EXPECT_NEAR(r.sin[2 * 39 + 13], std::sin(1.0f), 1e-7);
  EXPECT_EQ(r.sin[2 * 39 + 26], 0.0f);
  EXPECT_NEAR(r.sin[4 * 39 + 27], std::sin(2.0f * 0.49238826f), 1e-6);
}

TEST(VisionFixture, LogitsWithImageEmbeddingsMatchTransformers) {
  TowerHarness h;
  auto model = std::make_unique<model::M3Model>(h.config, h.checkpoint, *h.backend);
  const auto ref = reference();
  const int32_t image_token = ref.at("image_token").get<int32_t>();
  const int32_t start = ref.at("start_token").get<int32_t>(), end = ref.at("end_token").get<int32_t>();
  const auto& images = ref.at("images");
  const int32_t block = 128;
  for (size_t i = 0; i < images.size(); ++i) {
    // The prompt as the chat template gives it (one placeholder per image), expanded by build_image_prompt.
    const auto want_tokens = images[i].at("tokens").get<std::vector<int32_t>>();
    std::vector<int32_t> placeholder_ids;
    for (int32_t id : want_tokens) {
      if (id == start || id == end) continue;
      if (id == image_token && !placeholder_ids.empty() && placeholder_ids.back() == image_token) continue;
      placeholder_ids.push_back(id);
    }
    auto input = fixture_input(images[i], i);
    const auto prompt = model::build_image_prompt(placeholder_ids, std::span(&input, 1), h.tower,
                                                  model::ImageTokens{image_token, start, end});
    ASSERT_EQ(prompt.tokens, want_tokens) << i;
    const auto& tokens = prompt.tokens;
    const int32_t T = static_cast<int32_t>(tokens.size());
    const int32_t pages = (T + block - 1) / block;
    std::vector<std::unique_ptr<backend::Buffer>> storage;
    std::vector<model::LayerCache> caches;
    for (int l = 0; l < model->num_layers(); ++l) {
      storage.push_back(h.backend->alloc(static_cast<size_t>(pages * block * model->kv_width())));
      storage.push_back(h.backend->alloc(static_cast<size_t>(pages * block * model->kv_width())));
      caches.push_back({storage[storage.size() - 2]->f32(), storage.back()->f32(), nullptr});
    }
    std::vector<int32_t> table(static_cast<size_t>(pages));
    for (int32_t p = 0; p < pages; ++p) table[static_cast<size_t>(p)] = p;
    model::ForwardBatch batch;
    batch.tokens = tokens;
    batch.attention.sequences.push_back({0, T, 0, table});
    batch.attention.num_tokens = T;
    batch.attention.block_size = block;
    for (int32_t t = 0; t < T; ++t) {
      batch.attention.positions.push_back(t);
      batch.attention.slots.push_back(t);
      batch.logit_rows.push_back(t);
    }
    batch.embedding_rows = prompt.embedding_rows;
    batch.embeddings = prompt.embeddings;
    ASSERT_EQ(prompt.embedding_rows.size(), static_cast<size_t>(input.num_image_tokens()));
    ASSERT_EQ(batch.embeddings.size(), batch.embedding_rows.size() * static_cast<size_t>(h.config.text.hidden_size));
    const auto logits = model->forward(batch, caches);
    const auto want = npy("logits", i);
    ASSERT_EQ(logits.size(), want.data.size());
    EXPECT_LE(relative_error(logits, want.data), 1e-4) << "logits of image " << i;
  }
}

TEST(VisionFixture, ContentHashSeparatesImages) {
  const auto a = model::preprocess_image(read_image(0));
  const auto b = model::preprocess_image(read_image(0));
  const auto c = model::preprocess_image(read_image(4));
  EXPECT_EQ(a.content_hash, b.content_hash);
  EXPECT_NE(a.content_hash, c.content_hash);
  auto d = read_image(0);
  d.pixels[100] ^= 1;  // one level of one pixel
  EXPECT_NE(model::preprocess_image(d).content_hash, a.content_hash);
}

TEST(VisionFixture, PromptExpansion) {
  const std::vector<int32_t> ids{1, 200025, 7, 200025, 9};
  const std::vector<int64_t> counts{2, 3};
  const auto out = model::expand_image_placeholders(ids, counts);
  const std::vector<int32_t> want{1, 200029, 200025, 200025, 200030, 7, 200029, 200025, 200025, 200025, 200030, 9};
  EXPECT_EQ(out, want);
  EXPECT_THROW(model::expand_image_placeholders(ids, std::vector<int64_t>{2}), Error);
}

TEST(VisionFixture, BadImagesAreErrorsNamingThePart) {
  const std::vector<uint8_t> empty;
  try {
    model::decode_image(empty, "image 2 of message 1");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("image 2 of message 1"), std::string::npos);
  }
  const std::vector<uint8_t> junk{'G', 'I', 'F', '8', '9', 'a', 1, 2};
  EXPECT_THROW(model::decode_image(junk, "x"), Error);
  EXPECT_THROW(model::smart_resize(1, 201, 28, 3136, 451584), Error);
}

}  // namespace
}  // namespace mxlm
