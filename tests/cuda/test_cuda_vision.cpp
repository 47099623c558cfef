// GPU checks of the vision encoder ops (backend.h "vision encoder") against the CPU backend on fresh random inputs
// with ragged segments, and of the whole vision tower + projector on the committed transformers fixtures
// (tests/fixtures/vision: features and merged embeddings, f32 ≤ 1e-4 relative), one image at a time and all
// images in one batch.
#include <nlohmann/json.hpp>

#include <fstream>
#include <string>
#include <vector>

#include "engine/npy.h"
#include "gpu_check.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/vision_tower.h"

namespace mxlm::gpucheck {
namespace {

std::vector<float> run_gpu_inplace(Backend& gpu, const std::vector<float>& host, auto&& op) {
  auto b = up(gpu, host);
  op(b->f32());
  return down(gpu, *b, host.size());
}

void test_vision_ops(Backend& cpu, Backend& gpu) {
  {  // add_bias: one f32 add per element, bit-exact
    const size_t rows = 1000, cols = 1280;
    auto y = randn(rows * cols), b = randn(cols);
    auto want = y;
    cpu.add_bias(want.data(), b.data(), rows, cols);
    auto bd = up(gpu, b);
    const auto got = run_gpu_inplace(gpu, y, [&](float* p) { gpu.add_bias(p, bd->f32(), rows, cols); });
    check_bits("add_bias 1000x1280", got, want);
  }
  for (size_t dim : {20u, 80u, 1280u, 5000u}) {  // layer_norm (offset rows: the variance is taken around the mean)
    const size_t rows = 333;
    auto x = randn(rows * dim, 2.0f), w = randn(dim, 0.5f), b = randn(dim, 0.1f);
    for (auto& v : x) v += 50.0f;
    std::vector<float> want(x.size());
    cpu.layer_norm(x.data(), w.data(), b.data(), want.data(), rows, dim, 1e-5f);
    auto xd = up(gpu, x), wd = up(gpu, w), bd = up(gpu, b), od = gpu.alloc(x.size());
    gpu.layer_norm(xd->f32(), wd->f32(), bd->f32(), od->f32(), rows, dim, 1e-5f);
    check_close("layer_norm " + std::to_string(rows) + "x" + std::to_string(dim), down(gpu, *od, x.size()), want, 2e-5);
    gpu.layer_norm(xd->f32(), wd->f32(), bd->f32(), xd->f32(), rows, dim, 1e-5f);
    check_close("layer_norm in place, dim " + std::to_string(dim), down(gpu, *xd, x.size()), want, 2e-5);
  }
  {  // gelu_erf
    auto x = randn(1 << 20, 3.0f);
    auto want = x;
    cpu.gelu_erf(want.data(), want.size());
    const auto got = run_gpu_inplace(gpu, x, [&](float* p) { gpu.gelu_erf(p, x.size()); });
    check_close("gelu_erf 1M", got, want, 1e-6);
  }
  for (int head_dim : {80, 20}) {  // rope_table: the tower's 3D tables (39 pairs of 80, 9 of 20)
    const int heads = head_dim == 80 ? 16 : 4;
    const auto rot = model::vision_rotary(head_dim, 10000.0, 1, 24, 36);
    const size_t tokens = rot.cos.size() / static_cast<size_t>(rot.pairs());
    auto x = randn(tokens * static_cast<size_t>(heads * head_dim));
    auto want = x;
    cpu.rope_table(want.data(), rot.cos.data(), rot.sin.data(), tokens, heads, head_dim, rot.pairs());
    auto c = up(gpu, rot.cos), s = up(gpu, rot.sin);
    const auto got = run_gpu_inplace(
        gpu, x, [&](float* p) { gpu.rope_table(p, c->f32(), s->f32(), tokens, heads, head_dim, rot.pairs()); });
    check_close("rope_table 3D, head_dim " + std::to_string(head_dim), got, want, 1e-6);
  }
  struct Case {
    int heads, head_dim;
    std::vector<int32_t> bounds;
    const char* what;
  };
  const std::vector<Case> cases = {
      {16, 80, {0, 1, 1, 77, 600, 2904}, "ragged: 1, 0, 76, 523 and 2304 rows, 16x80"},
      {4, 20, {0, 16, 80, 144, 208, 272}, "fixture head size 4x20"},
      {3, 33, {0, 70, 71, 200}, "head_dim 33"},
      {2, 80, {0, 12000}, "12000 rows, 2x80: scores tiled over query rows"},
  };
  for (const auto& c : cases) {
    const size_t n = static_cast<size_t>(c.bounds.back()) * static_cast<size_t>(c.heads * c.head_dim);
    auto q = randn(n, 1.5f), k = randn(n, 1.5f), v = randn(n);
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    std::vector<float> want(n);
    cpu.segment_attention(q.data(), k.data(), v.data(), c.bounds, c.heads, c.head_dim, scale, want.data());
    auto qd = up(gpu, q), kd = up(gpu, k), vd = up(gpu, v), od = gpu.alloc(n);
    gpu.segment_attention(qd->f32(), kd->f32(), vd->f32(), c.bounds, c.heads, c.head_dim, scale, od->f32());
    check_close(std::string("segment_attention ") + c.what, down(gpu, *od, n), want, 2e-5);
    // bf16 products (tensor cores): q, k, v and the probabilities rounded to bf16, vs the CPU's f32.
    gpu.segment_attention(qd->f32(), kd->f32(), vd->f32(), c.bounds, c.heads, c.head_dim, scale, od->f32(), true);
    check_close(std::string("segment_attention bf16 products ") + c.what + " (vs cpu f32)", down(gpu, *od, n), want,
                3e-2);
  }
}

// ---- the whole tower on the transformers fixtures

engine::NpyArray npy(const fs::path& dir, const std::string& stem, size_t i) {
  return engine::read_npy_f32(dir / (stem + "_" + std::to_string(i) + ".npy"));
}

void test_vision_tower(Backend& cpu, Backend& gpu, const fs::path& dir) {
  if (!fs::exists(dir / "reference.json")) {
    report(false, "vision fixture missing: " + dir.string(), 0, 0);
    return;
  }
  std::ifstream f(dir / "reference.json");
  const auto ref = nlohmann::json::parse(f);
  const auto config = io::load_model_config(dir);
  io::Checkpoint checkpoint(dir);
  model::VisionTower tower(config, checkpoint, gpu);
  std::vector<model::PreprocessedImage> images;
  for (size_t i = 0; i < ref.at("images").size(); ++i) {
    const auto grid = ref.at("images")[i].at("grid_thw").get<std::vector<int>>();
    model::PreprocessedImage p;
    p.grid_t = grid[0];
    p.grid_h = grid[1];
    p.grid_w = grid[2];
    p.pixel_values = npy(dir, "pixel_values", i).data;
    images.push_back(std::move(p));
  }
  std::vector<const model::PreprocessedImage*> all;
  for (size_t i = 0; i < images.size(); ++i) {
    all.push_back(&images[i]);
    const auto feats = tower.features(images[i]);
    check_close("vision features image " + std::to_string(i) + " (cuda vs transformers)", feats,
                npy(dir, "features", i).data, 1e-4);
    check_close("vision merged image " + std::to_string(i) + " (cuda vs transformers)",
                tower.project(feats, images[i].num_patches()), npy(dir, "merged", i).data, 1e-4);
  }
  const auto batch = tower.embed_batch(all);
  for (size_t i = 0; i < images.size(); ++i)
    check_close("vision merged image " + std::to_string(i) + ", all images in one batch (cuda vs transformers)",
                batch[i], npy(dir, "merged", i).data, 1e-4);
  // BF16 weights: the GPU rounds activations to bf16 at every linear, the CPU does not; reported, loosely bounded.
  model::VisionTower tower_bf(config, checkpoint, gpu, backend::WeightFormat::BF16);
  model::VisionTower cpu_bf(config, checkpoint, cpu, backend::WeightFormat::BF16);
  const auto got_bf = tower_bf.embed_batch(all);
  const auto want_bf = cpu_bf.embed_batch(all);
  for (size_t i = 0; i < images.size(); ++i)
    check_close("vision merged image " + std::to_string(i) + " bf16 weights (cuda vs cpu bf16)", got_bf[i], want_bf[i],
                5e-2);
}

}  // namespace

MXLM_GPU_CHECK(vision_ops) { test_vision_ops(env.cpu, env.gpu); }
MXLM_GPU_CHECK(vision_tower) { test_vision_tower(env.cpu, env.gpu, env.fixtures / "vision"); }

}  // namespace mxlm::gpucheck
