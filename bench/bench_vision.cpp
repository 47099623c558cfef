// CPU cost of one image at the default 451,584-pixel cap (672x672 -> 2304 patches -> 576 image tokens):
//   BM_Decode       PNG decode of a 1344x1344 photo-like image (stb_image),
//   BM_Preprocess   smart_resize + Pillow bicubic to 672x672 + normalisation + patches,
//   BM_TowerLayers  the vision tower at the real sizes (hidden 1280, 16 heads of 80, MLP 5120) with
//                   kLayers encoder layers of random BF16 weights (the real tower has 32: scale the per-layer time),
//   BM_Projector    the real projector (1280 -> 6144 -> 6144) and 2x2 merge MLP (24576 -> 6144 -> 6144), BF16,
//   BM_Attention    one layer's segment attention alone (2304 rows, 16 heads of 80: backend::segment_attention).
// The tower, projector and attention report wall time and the process's CPU time (all threads): on a shared
// machine the CPU time is the steadier measure of the work (wall ≈ CPU / cores when the cores are free).
#include <benchmark/benchmark.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBI_WRITE_NO_STDIO
#include <stb/stb_image_write.h>
#pragma GCC diagnostic pop

#include "backend/backend.h"
#include "core/dtype.h"
#include "io/safetensors.h"
#include "model/image_preprocess.h"
#include "model/vision_tower.h"
#include "vision_checkpoint_plan.h"

namespace {

namespace fs = std::filesystem;
using namespace mxlm;

constexpr int kHidden = 1280, kHeads = 16, kInter = 5120, kLayers = 2, kProj = 6144;

model::RgbImage photo(int w, int h) {
  model::RgbImage img{w, h, std::vector<uint8_t>(static_cast<size_t>(w) * static_cast<size_t>(h) * 3)};
  std::mt19937 rng(1);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c)
        img.pixels[(static_cast<size_t>(y) * static_cast<size_t>(w) + static_cast<size_t>(x)) * 3 +
                   static_cast<size_t>(c)] =
            static_cast<uint8_t>(127 + 90 * std::sin(x * 0.01 * (c + 1) + y * 0.013) + (rng() % 16));
  return img;
}

std::vector<uint8_t> png_bytes(const model::RgbImage& img) {
  std::vector<uint8_t> out;
  stbi_write_png_to_func(
      [](void* ctx, void* data, int size) {
        auto* v = static_cast<std::vector<uint8_t>*>(ctx);
        v->insert(v->end(), static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + size);
      },
      &out, img.width, img.height, 3, img.pixels.data(), img.width * 3);
  return out;
}

void BM_Decode(benchmark::State& state) {
  const auto bytes = png_bytes(photo(1344, 1344));
  for (auto _ : state) benchmark::DoNotOptimize(model::decode_image(bytes));
}
BENCHMARK(BM_Decode)->Unit(benchmark::kMillisecond);

void BM_Preprocess(benchmark::State& state) {
  const auto img = photo(1344, 1344);
  for (auto _ : state) {
    auto p = model::preprocess_image(img);
    benchmark::DoNotOptimize(p.pixel_values.data());
    state.counters["patches"] = static_cast<double>(p.num_patches());
  }
}
BENCHMARK(BM_Preprocess)->Unit(benchmark::kMillisecond);

// A vision-only checkpoint of the real sizes, random BF16 (the patch embedding F32, as released).
struct Fixture {
  fs::path dir;
  io::ModelConfig config;
  std::unique_ptr<backend::Backend> backend = backend::make_cpu_backend();
  std::unique_ptr<io::Checkpoint> checkpoint;
  std::unique_ptr<model::VisionTower> tower;

  Fixture() {
    dir = fs::temp_directory_path() / ("mxlm_bench_vision_" + std::to_string(getpid()));
    fs::create_directories(dir);
    config.vision.present = true;
    config.vision.hidden_size = kHidden;
    config.vision.num_heads = kHeads;
    config.vision.intermediate_size = kInter;
    config.vision.num_layers = kLayers;
    config.text.hidden_size = kProj;
    const std::vector<io::PlannedTensor> plan = bench::vision_checkpoint_plan(kLayers, kHidden, kInter, kProj);
    {
      io::SafetensorsWriter w(dir / "model.safetensors", plan);
      std::mt19937 rng(7);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      for (const auto& pt : plan) {
        int64_t n = 1;
        for (auto d : pt.shape) n *= d;
        const float scale = pt.shape.size() == 1 ? 0.1f : 1.0f / std::sqrt(static_cast<float>(n / pt.shape[0]));
        std::vector<uint8_t> bytes(pt.nbytes());
        for (int64_t i = 0; i < n; ++i) {
          const float v = nd(rng) * scale + (pt.shape.size() == 1 && pt.name.find("weight") != std::string::npos);
          if (pt.dtype == DType::F32) {
            std::memcpy(bytes.data() + i * 4, &v, 4);
          } else {
            const uint16_t b = f32_to_bf16(v);
            std::memcpy(bytes.data() + i * 2, &b, 2);
          }
        }
        w.write(pt.name, bytes);
      }
      w.commit();
    }
    checkpoint = std::make_unique<io::Checkpoint>(dir);
    tower = std::make_unique<model::VisionTower>(config, *checkpoint, *backend);
  }
  ~Fixture() {
    tower.reset();
    checkpoint.reset();
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

void BM_TowerLayers(benchmark::State& state) {
  auto& f = fixture();
  const auto p = model::preprocess_image(photo(1344, 1344));
  for (auto _ : state) benchmark::DoNotOptimize(f.tower->features(p));
  state.counters["layers"] = kLayers;
  state.counters["patches"] = static_cast<double>(p.num_patches());
}
BENCHMARK(BM_TowerLayers)->Unit(benchmark::kMillisecond)->Iterations(2)->MeasureProcessCPUTime()->UseRealTime();

void BM_Projector(benchmark::State& state) {
  auto& f = fixture();
  const int64_t n = 2304;
  std::vector<float> feats(static_cast<size_t>(n) * kHidden);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : feats) v = nd(rng);
  for (auto _ : state) benchmark::DoNotOptimize(f.tower->project(feats, n));
  state.counters["tokens"] = static_cast<double>(n / 4);
}
BENCHMARK(BM_Projector)->Unit(benchmark::kMillisecond)->Iterations(2)->MeasureProcessCPUTime()->UseRealTime();

void BM_Attention(benchmark::State& state) {
  auto be = backend::make_cpu_backend();
  const int32_t n = 2304;
  const size_t count = static_cast<size_t>(n) * kHidden;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> q(count), k(count), v(count), o(count);
  for (auto* t : {&q, &k, &v})
    for (auto& x : *t) x = nd(rng);
  const std::vector<int32_t> bounds{0, n};
  for (auto _ : state) {
    be->segment_attention(q.data(), k.data(), v.data(), bounds, kHeads, kHidden / kHeads, 0.1118f, o.data());
    benchmark::DoNotOptimize(o.data());
  }
  const double flop = 4.0 * n * static_cast<double>(n) * kHidden;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flop * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Attention)->Unit(benchmark::kMillisecond)->Iterations(3)->MeasureProcessCPUTime()->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
