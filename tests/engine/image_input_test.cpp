// Image input through the engine on the vision fixture (tests/fixtures/vision, transformers 5.17 with the spec's
// 3D rotary): the runner puts each image embedding row at its token's position whatever the prefill chunks, the
// prefix cache keys blocks by image content (different pixels behind identical token ids never share K/V, the same
// pixels do), and the scheduler runs image requests in chunks next to others. References: the fixture's logits
// for the unchunked prompt, and each prompt run alone in one step on a fresh runner without prefix caching.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "backend/backend.h"
#include "core/error.h"
#include "engine/block_manager.h"
#include "engine/model_runner.h"
#include "engine/npy.h"
#include "engine/scheduler.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/image_preprocess.h"
#include "model/image_prompt.h"
#include "model/m3_model.h"
#include "model/vision_tower.h"

namespace mxlm::engine {
namespace {

namespace fs = std::filesystem;

const fs::path kDir = fs::path(MXLM_SOURCE_DIR) / "tests/fixtures/vision";

struct VisionFixture {
  std::unique_ptr<backend::Backend> be = backend::make_cpu_backend();
  io::ModelConfig config = io::load_model_config(kDir);
  io::Checkpoint checkpoint{kDir};
  model::VisionTower tower{config, checkpoint, *be};
  model::M3Model model{config, checkpoint, *be};
  nlohmann::json reference = nlohmann::json::parse(std::ifstream(kDir / "reference.json"));
  model::ImageTokens ids{reference.at("image_token").get<int32_t>(), reference.at("start_token").get<int32_t>(),
                         reference.at("end_token").get<int32_t>()};
};

VisionFixture& fixture() {
  static VisionFixture f;
  return f;
}

model::RgbImage read_image(size_t i) {
  std::ifstream f(kDir / ("image_" + std::to_string(i) + ".png"), std::ios::binary);
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return model::decode_image(bytes);
}

// Fixture image i's prompt (placeholders expanded) with the image spans, as the server builds it.
struct Prompt {
  std::vector<int32_t> tokens;
  std::vector<ImageSpan> images;
};

Prompt make_prompt(size_t i, const model::RgbImage& image) {
  auto& f = fixture();
  const auto want = f.reference.at("images")[i].at("tokens").get<std::vector<int32_t>>();
  std::vector<int32_t> placeholders;
  for (const int32_t id : want) {
    if (id == f.ids.start || id == f.ids.end) continue;
    if (id == f.ids.image && !placeholders.empty() && placeholders.back() == f.ids.image) continue;
    placeholders.push_back(id);
  }
  auto data = std::make_shared<ImageData>();
  data->pixels = model::preprocess_image(image);
  const auto expanded = model::expand_image_prompt(placeholders, std::span(&data->pixels, 1), f.ids);
  EXPECT_EQ(expanded.tokens, want);
  Prompt p;
  p.tokens = expanded.tokens;
  p.images.push_back({expanded.image_begins[0], static_cast<int32_t>(data->pixels.num_image_tokens()),
                      expanded.image_hashes[0], data});
  return p;
}

Sequence make_seq(int64_t id, const Prompt& p) {
  Sequence s;
  s.id = id;
  s.tokens = p.tokens;
  s.num_prompt_tokens = static_cast<int32_t>(p.tokens.size());
  for (const auto& img : p.images) {
    ImageSpan copy = img;
    copy.data = std::make_shared<ImageData>(*img.data);  // unencoded, as a new request brings it
    s.images.push_back(copy);
  }
  return s;
}

// Logits of the last prompt token, prefilled in chunks of `chunk` tokens (0: all at once) on `runner`.
std::vector<float> prefill(ModelRunner& runner, Sequence& seq, int32_t chunk) {
  runner.admit(seq);
  std::vector<float> last;
  while (seq.num_uncomputed() > 0) {
    const int32_t n = chunk > 0 ? std::min(chunk, seq.num_uncomputed()) : seq.num_uncomputed();
    StepItem item{&seq, n, false};
    const auto out = runner.step({&item, 1});
    last.assign(out.row(0).begin(), out.row(0).end());
  }
  return last;
}

std::vector<float> solo(const Prompt& p) {
  auto& f = fixture();
  CacheConfig c = cache_config_for(f.model, static_cast<int32_t>(p.tokens.size()) + 1);
  c.prefix_caching = false;
  ModelRunner runner(f.model, c);
  runner.set_vision_tower(&f.tower);
  Sequence s = make_seq(1, p);
  return prefill(runner, s, 0);
}

double relative_error(std::span<const float> got, std::span<const float> want) {
  double err = 0.0, scale = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, static_cast<double>(std::fabs(got[i] - want[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(want[i])));
  }
  return err / scale;
}

// A different picture of the same size: identical prompt token ids.
model::RgbImage inverted(model::RgbImage image) {
  for (auto& v : image.pixels) v = static_cast<uint8_t>(255 - v);
  return image;
}

TEST(ImageInput, BlockKeysIncludeImageContentAndOffset) {
  Sequence a;
  a.tokens.assign(16, 7);
  a.images.push_back({5, 6, 0x1234, nullptr});
  Sequence b = a;
  b.images[0].hash = 0x5678;
  Sequence c = a;
  c.images[0].begin = 6;  // the same picture one token later
  // Blocks of 4: block 0 has no image, blocks 1-2 touch it, block 3 is past it.
  EXPECT_EQ(block_image_key(a, 0, 4), 0u);
  EXPECT_NE(block_image_key(a, 4, 8), 0u);
  EXPECT_NE(block_image_key(a, 4, 8), block_image_key(a, 8, 12));  // other offset within the block
  EXPECT_EQ(block_image_key(a, 12, 16), 0u);
  EXPECT_NE(block_image_key(a, 4, 8), block_image_key(b, 4, 8));
  EXPECT_NE(block_image_key(a, 4, 8), block_image_key(c, 4, 8));
  const std::vector<int32_t> toks(4, 7);
  EXPECT_EQ(hash_block(9, toks, 0), hash_block(9, toks));
  EXPECT_NE(hash_block(9, toks, block_image_key(a, 4, 8)), hash_block(9, toks, block_image_key(b, 4, 8)));
}

TEST(ImageInput, PrefixCacheSharesBlocksOnlyForTheSamePixels) {
  BlockManager bm(16, 4);
  auto with_image = [](int64_t id, uint64_t hash) {
    Sequence s;
    s.id = id;
    s.tokens = {1, 2, 3, 4, 5, 100, 9, 9, 9, 9, 9, 9, 101, 6, 7, 8, 10, 11};
    s.images.push_back({6, 6, hash, nullptr});
    return s;
  };
  Sequence a = with_image(1, 111);
  ASSERT_TRUE(bm.reserve(a, 18));
  a.num_computed = 18;
  bm.commit(a);
  ASSERT_EQ(a.block_hashes.size(), 4u);
  // Another image behind the same ids: only the text block before it is shared.
  Sequence b = with_image(2, 222);
  EXPECT_EQ(bm.match_prefix(b), 4);
  EXPECT_EQ(b.block_table[0], a.block_table[0]);
  // The same image: every full block but the one holding the last token.
  Sequence c = with_image(3, 111);
  EXPECT_EQ(bm.match_prefix(c), 16);
  EXPECT_EQ(std::vector<int32_t>(a.block_table.begin(), a.block_table.begin() + 4), c.block_table);
  // Without images the same ids match nothing past block 0 either: text-only keys differ from image keys.
  Sequence d = with_image(4, 0);
  d.images.clear();
  EXPECT_EQ(bm.match_prefix(d), 4);
  bm.release(b);
  bm.release(c);
  bm.release(d);
  bm.release(a);
  EXPECT_EQ(bm.num_available(), 16);
}

TEST(ImageInput, ChunkedPrefillPlacesEmbeddingRowsAndMatchesTransformers) {
  auto& f = fixture();
  const size_t n_images = f.reference.at("images").size();
  for (size_t i = 0; i < n_images; ++i) {
    const Prompt p = make_prompt(i, read_image(i));
    const auto want = read_npy_f32(kDir / ("logits_" + std::to_string(i) + ".npy"));
    const auto vocab = static_cast<size_t>(f.model.vocab_size());
    ASSERT_EQ(want.data.size(), p.tokens.size() * vocab);
    const std::span<const float> want_last(want.data.data() + want.data.size() - vocab, vocab);
    const auto whole = solo(p);
    EXPECT_LE(relative_error(whole, want_last), 1e-4) << "image " << i;
    // Chunks of 3 and 5 tokens start and end inside the image's run.
    for (const int32_t chunk : {3, 5}) {
      CacheConfig c = cache_config_for(f.model, static_cast<int32_t>(p.tokens.size()) + 1, 1, 4);
      c.prefix_caching = false;
      ModelRunner runner(f.model, c);
      runner.set_vision_tower(&f.tower);
      Sequence s = make_seq(1, p);
      const auto got = prefill(runner, s, chunk);
      EXPECT_LE(relative_error(got, whole), 1e-5) << "image " << i << ", chunks of " << chunk;
    }
  }
}

TEST(ImageInput, RunnerPrefixCacheKeepsDifferentImagesApart) {
  auto& f = fixture();
  const size_t k = 3;  // 250x180: 54 image tokens after 7 text tokens
  const Prompt a = make_prompt(k, read_image(k));
  const Prompt b = make_prompt(k, inverted(read_image(k)));
  ASSERT_EQ(a.tokens, b.tokens);
  ASSERT_NE(a.images[0].hash, b.images[0].hash);
  const auto ref_a = solo(a), ref_b = solo(b);
  ASSERT_GT(relative_error(ref_a, ref_b), 1e-3) << "the two images should give different logits";

  ModelRunner runner(f.model, cache_config_for(f.model, 128, 4, 4));
  runner.set_vision_tower(&f.tower);
  const int32_t n = static_cast<int32_t>(a.tokens.size());
  Sequence sa = make_seq(1, a);
  EXPECT_LE(relative_error(prefill(runner, sa, 7), ref_a), 1e-5);
  // Same ids, other pixels: only the full text blocks before the image (7 text tokens: one block of 4) are reused.
  Sequence sb = make_seq(2, b);
  EXPECT_LE(relative_error(prefill(runner, sb, 7), ref_b), 1e-5);
  EXPECT_EQ(sb.block_table[0], sa.block_table[0]);
  for (size_t blk = 1; blk < sa.block_table.size(); ++blk) EXPECT_NE(sb.block_table[blk], sa.block_table[blk]) << blk;
  // The same pixels again: everything but the last block comes from the cache, and the image, wholly cached, is
  // never encoded.
  Sequence sa2 = make_seq(3, a);
  runner.admit(sa2);
  EXPECT_EQ(sa2.num_computed, (n - 1) / 4 * 4);
  StepItem item{&sa2, sa2.num_uncomputed(), false};
  const auto out = runner.step({&item, 1});
  EXPECT_LE(relative_error(out.row(0), ref_a), 1e-5);
  EXPECT_TRUE(sa2.images[0].data->embeddings.empty());
  EXPECT_FALSE(sa2.images[0].data->pixels.pixel_values.empty());
  runner.release(sa);
  runner.release(sb);
  runner.release(sa2);
}

TEST(ImageInput, RunnerWithoutTowerRefusesImages) {
  auto& f = fixture();
  ModelRunner runner(f.model, cache_config_for(f.model, 64));
  Sequence s = make_seq(1, make_prompt(0, read_image(0)));
  runner.admit(s);
  StepItem item{&s, s.num_uncomputed(), false};
  EXPECT_THROW(runner.step({&item, 1}), Error);
  EXPECT_EQ(s.num_computed, 0);
  Scheduler sched(runner, {});
  GenerationRequest r;
  r.prompt = s.tokens;
  r.params.max_tokens = 1;
  r.images = s.images;
  EXPECT_THROW(sched.submit(r), Error);
}

std::vector<Prompt> scheduler_prompts() {
  auto& f = fixture();
  std::vector<Prompt> prompts;
  for (size_t i = 0; i < f.reference.at("images").size(); ++i) prompts.push_back(make_prompt(i, read_image(i)));
  prompts.push_back(make_prompt(3, inverted(read_image(3))));
  prompts.push_back({{5, 6, 7, 8, 9, 10, 11}, {}});
  return prompts;
}

std::vector<int32_t> greedy_solo(const Prompt& p, int max_tokens) {
  auto& f = fixture();
  CacheConfig c = cache_config_for(f.model, static_cast<int32_t>(p.tokens.size()) + max_tokens);
  c.prefix_caching = false;
  ModelRunner runner(f.model, c);
  runner.set_vision_tower(&f.tower);
  Sequence s = make_seq(1, p);
  std::vector<int32_t> out;
  auto logits = prefill(runner, s, 0);
  for (int t = 0; t < max_tokens; ++t) {
    const auto next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.push_back(next);
    if (t + 1 == max_tokens) break;
    s.tokens.push_back(next);
    StepItem item{&s, 1, false};
    const auto o = runner.step({&item, 1});
    logits.assign(o.row(0).begin(), o.row(0).end());
  }
  return out;
}

// Runs every prompt through the scheduler (greedy) to the end; the tokens of each.
std::vector<std::vector<int32_t>> run_scheduler(Scheduler& sched, const std::vector<Prompt>& prompts, int max_tokens) {
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const auto& p : prompts) {
    GenerationRequest r;
    r.prompt = p.tokens;
    r.params.temperature = 0.0f;
    r.params.max_tokens = max_tokens;
    r.images = make_seq(0, p).images;
    streams.push_back(sched.submit(std::move(r)));
  }
  std::vector<std::vector<int32_t>> got(prompts.size());
  std::vector<bool> done(prompts.size(), false);
  for (int step = 0; step < 5000 && std::count(done.begin(), done.end(), false) > 0; ++step) {
    sched.step();
    for (size_t i = 0; i < prompts.size(); ++i)
      for (auto& e : streams[i]->wait(std::chrono::milliseconds(0))) {
        got[i].insert(got[i].end(), e.tokens.begin(), e.tokens.end());
        if (e.finish != FinishReason::None) {
          EXPECT_EQ(e.finish, FinishReason::Length) << i << ": " << e.error;
          done[i] = true;
        }
      }
  }
  EXPECT_EQ(std::count(done.begin(), done.end(), false), 0);
  return got;
}

// Greedy tokens of image prompts interleaved with a text prompt under small chunks, against solo runs.
TEST(ImageInput, SchedulerRunsImageRequestsInChunks) {
  auto& f = fixture();
  const auto prompts = scheduler_prompts();
  const int max_tokens = 4;
  ModelRunner runner(f.model, cache_config_for(f.model, 96, 8, 4));
  runner.set_vision_tower(&f.tower);
  SchedulerConfig cfg;
  cfg.max_num_seqs = 3;
  cfg.max_num_batched_tokens = 11;
  Scheduler sched(runner, cfg);
  const auto got = run_scheduler(sched, prompts, max_tokens);
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(got[i], greedy_solo(prompts[i], max_tokens)) << i;
  EXPECT_EQ(runner.blocks().num_pages(), runner.blocks().num_available());
}

// Too few pages for the batch: sequences are preempted and recomputed (their images from the kept embeddings or
// the prefix cache) with the same tokens.
TEST(ImageInput, PreemptedImageRequestsKeepTheirOutputs) {
  auto& f = fixture();
  const auto prompts = scheduler_prompts();
  const int max_tokens = 6;
  CacheConfig cache = cache_config_for(f.model, 80, 1, 4);
  cache.num_pages = 30;  // two or three sequences at a time
  ModelRunner runner(f.model, cache);
  runner.set_vision_tower(&f.tower);
  SchedulerConfig cfg;
  cfg.max_num_seqs = 8;
  cfg.max_num_batched_tokens = 64;
  Scheduler sched(runner, cfg);
  const auto got = run_scheduler(sched, prompts, max_tokens);
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(got[i], greedy_solo(prompts[i], max_tokens)) << i;
  EXPECT_GT(sched.stats().preemptions, 0u);
  EXPECT_EQ(runner.blocks().num_pages(), runner.blocks().num_available());
}

TEST(ImageInput, AFailingImageFailsOnlyItsRequest) {
  auto& f = fixture();
  auto prompts = scheduler_prompts();
  ModelRunner runner(f.model, cache_config_for(f.model, 96, 8, 4));
  runner.set_vision_tower(&f.tower);
  SchedulerConfig cfg;
  cfg.max_num_batched_tokens = 256;  // every prompt in the first step: the images are encoded in one batch
  Scheduler sched(runner, cfg);
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerationRequest r;
    r.prompt = prompts[i].tokens;
    r.params.temperature = 0.0f;
    r.params.max_tokens = 2;
    r.images = make_seq(0, prompts[i]).images;
    if (i == 1) r.images[0].data->pixels.grid_w += 2;  // pixels that do not fit the image's token run
    streams.push_back(sched.submit(std::move(r)));
  }
  for (int step = 0; step < 20; ++step) sched.step();
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::vector<int32_t> got;
    FinishReason finish = FinishReason::None;
    std::string error;
    for (auto& e : streams[i]->wait(std::chrono::milliseconds(0))) {
      got.insert(got.end(), e.tokens.begin(), e.tokens.end());
      if (e.finish != FinishReason::None) finish = e.finish, error = e.error;
    }
    if (i == 1) {
      EXPECT_EQ(finish, FinishReason::Error);
      EXPECT_NE(error.find("image tokens"), std::string::npos) << error;
    } else {
      EXPECT_EQ(finish, FinishReason::Length) << i;
      EXPECT_EQ(got, greedy_solo(prompts[i], 2)) << i;
    }
  }
  EXPECT_EQ(runner.blocks().num_pages(), runner.blocks().num_available());
}

}  // namespace
}  // namespace mxlm::engine
