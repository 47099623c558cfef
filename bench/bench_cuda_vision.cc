// Vision tower on the GPU at the real MiniMax-M3 sizes (shared/spec/m3_vision.md §3.1: hidden 1280, 16 heads of 80,
// MLP 5120, 32 layers; projector 1280 -> 6144 -> 6144, merge 24576 -> 6144 -> 6144), random BF16 weights (the
// patch embedding F32, as released), one 672x672 image at the default 451,584-pixel cap = 2304 patches = 576
// image tokens. Prints, with the card's ceilings measured in the same process:
//   - image preprocessing (decode excluded: smart_resize + Pillow bicubic + normalisation + patches) on the host;
//   - segment attention alone (one layer: 16 heads x 2304², cuBLAS + softmax), f32 and with bf16 products (what
//     the tower uses for bf16 weights), vs cuBLAS SGEMM's and bf16 GEMM's rates;
//   - the whole tower + projector per image, one image per call and 4 images per call (segments), wall clock
//     including the pixel upload and the embeddings' download.
//   bench_cuda_vision [--quick] [--layers N]
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "core/dtype.h"
#include "cuda_bench_util.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/image_preprocess.h"
#include "model/vision_tower.h"
#include "vision_checkpoint_plan.h"

namespace {

using namespace mxlm;
using namespace mxlm::cudabench;
namespace fs = std::filesystem;

constexpr int kHidden = 1280, kHeads = 16, kHeadDim = 80, kInter = 5120, kProj = 6144;

model::RgbImage photo(int w, int h) {
  model::RgbImage img{w, h, std::vector<uint8_t>(static_cast<size_t>(w) * static_cast<size_t>(h) * 3)};
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c)
        img.pixels[(static_cast<size_t>(y) * static_cast<size_t>(w) + static_cast<size_t>(x)) * 3 +
                   static_cast<size_t>(c)] =
            static_cast<uint8_t>(127 + 90 * std::sin(x * 0.01 * (c + 1) + y * 0.013) + ((x * 7 + y * 13) % 16));
  return img;
}

uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A vision-only checkpoint of the real sizes: weights uniform in ±sqrt(3 / fan_in) (unit-variance outputs), norm
// weights around 1, biases small.
fs::path write_checkpoint(int layers) {
  const fs::path dir = fs::temp_directory_path() / ("mxlm_bench_cuda_vision_" + std::to_string(getpid()));
  fs::create_directories(dir);
  const std::vector<io::PlannedTensor> plan = bench::vision_checkpoint_plan(layers, kHidden, kInter, kProj);
  io::SafetensorsWriter w(dir / "model.safetensors", plan);
  uint64_t seed = 1;
  for (const auto& pt : plan) {
    int64_t n = 1;
    for (auto d : pt.shape) n *= d;
    const bool vec = pt.shape.size() == 1,
               norm_w = vec && pt.name.find("norm") != std::string::npos && pt.name.find("weight") != std::string::npos;
    const float amp = vec ? 0.05f : std::sqrt(3.0f / static_cast<float>(n / pt.shape[0]));
    std::vector<uint8_t> bytes(pt.nbytes());
    ++seed;
    for (int64_t i = 0; i < n; ++i) {
      const float u = static_cast<float>(mix(seed * 0x100000000ull + static_cast<uint64_t>(i)) >> 40) /
                          static_cast<float>(1 << 24) * 2.0f -
                      1.0f;
      const float v = u * amp + (norm_w ? 1.0f : 0.0f);
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
  return dir;
}

double sgemm_tflops(cublasHandle_t h, bool quick) {
  const int n = 4096;
  auto* a = static_cast<float*>(dalloc(size_t{4} * n * n));
  auto* b = static_cast<float*>(dalloc(size_t{4} * n * n));
  auto* c = static_cast<float*>(dalloc(size_t{4} * n * n));
  CK(cu::launch_fill_random_f32(a, size_t{1} * n * n, 5, 1.0f, nullptr));
  CK(cu::launch_fill_random_f32(b, size_t{1} * n * n, 6, 1.0f, nullptr));
  const float one = 1.0f, zero = 0.0f;
  const double ms =
      time_ms([&](int) { CB(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, a, n, b, n, &zero, c, n)); },
              quick ? 3 : 10);
  const double tf = 2.0 * n * n * static_cast<double>(n) / (ms * 1e-3) / 1e12;
  row("cuBLAS SGEMM 4096^3 (f32, no TF32): %.3f ms, %.1f TFLOP/s", ms, tf);
  CK(cudaFree(a));
  CK(cudaFree(b));
  CK(cudaFree(c));
  return tf;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int layers = 32;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    if (std::strcmp(argv[i], "--layers") == 0 && i + 1 < argc) layers = std::atoi(argv[++i]);
  }
  if (!backend::cuda_device_available()) {
    std::printf("SKIP: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cublasHandle_t h;
  CB(cublasCreate(&h));
  const Ceilings c = measure_ceilings(h, quick);
  const double sgemm = sgemm_tflops(h, quick);

  // Host preprocessing of one image (the host CPU of this machine).
  const auto img = photo(1344, 1344);
  model::PreprocessedImage pre;
  const double pre_ms = wall_ms([&] { pre = model::preprocess_image(img); }, quick ? 3 : 7);
  const int64_t patches = pre.num_patches();
  row("preprocess 1344x1344 -> %dx%d (%lld patches, %lld image tokens), host CPU: %.2f ms", pre.resized.width,
      pre.resized.height, static_cast<long long>(patches), static_cast<long long>(pre.num_image_tokens()), pre_ms);

  auto be = backend::make_cuda_backend();
  cudaStream_t stream = backend::cuda_stream(*be);
  g_time_stream = stream;

  {  // segment attention alone: one layer of the tower's attention for one image
    const size_t n = static_cast<size_t>(patches) * kHeads * kHeadDim;
    auto q = be->alloc(n), k = be->alloc(n), v = be->alloc(n), o = be->alloc(n);
    CK(cu::launch_fill_random_f32(q->f32(), n, 11, 1.0f, stream));
    CK(cu::launch_fill_random_f32(k->f32(), n, 12, 1.0f, stream));
    CK(cu::launch_fill_random_f32(v->f32(), n, 13, 1.0f, stream));
    const std::vector<int32_t> one{0, static_cast<int32_t>(patches)};
    const double flop = 4.0 * static_cast<double>(patches) * static_cast<double>(patches) * kHeads * kHeadDim;
    for (bool bf16 : {false, true}) {
      const double ms = time_ms(
          [&](int) {
            be->segment_attention(q->f32(), k->f32(), v->f32(), one, kHeads, kHeadDim, 0.1118f, o->f32(), bf16);
          },
          quick ? 5 : 20);
      const double tf = flop / (ms * 1e-3) / 1e12;
      row("segment_attention %s, %lld rows, 16x80 (1 layer): %.3f ms, %.1f TFLOP/s = %.0f%% of SGEMM, %.0f%% of "
          "bf16 cuBLAS",
          bf16 ? "bf16 products" : "f32", static_cast<long long>(patches), ms, tf, 100.0 * tf / sgemm,
          100.0 * tf / c.bf16_tflops);
    }
  }

  const auto t0 = std::chrono::steady_clock::now();
  const fs::path dir = write_checkpoint(layers);
  io::ModelConfig config;
  config.vision.present = true;
  config.vision.hidden_size = kHidden;
  config.vision.num_heads = kHeads;
  config.vision.intermediate_size = kInter;
  config.vision.num_layers = layers;
  config.text.hidden_size = kProj;
  {
    io::Checkpoint checkpoint(dir);
    model::VisionTower tower(config, checkpoint, *be);
    const double setup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("random checkpoint written and loaded in %.1f s\n", setup_s);
    // Flops per image: linears (patch embed, 4 attention, 2 MLP per layer, projector, merge) + attention.
    const double N = static_cast<double>(patches);
    const double lin = 2.0 * N *
                           (1176.0 * kHidden + layers * (4.0 * kHidden * kHidden + 2.0 * kHidden * kInter) +
                            kHidden * double(kProj) + double(kProj) * kProj) +
                       2.0 * (N / 4) * (4.0 * kProj * kProj + double(kProj) * kProj);
    const double att = layers * 4.0 * N * N * kHeads * kHeadDim;
    const double one_ms = wall_ms([&] { (void)tower.embed(pre); }, quick ? 2 : 5);
    row("vision tower + projector, %d layers, 1 image (%lld patches) per call: %.2f ms per image, %.0f TFLOP/s "
        "(%.1f TFLOP linears + %.1f TFLOP attention, bf16 tensor cores)",
        layers, static_cast<long long>(patches), one_ms, (lin + att) / (one_ms * 1e-3) / 1e12, lin / 1e12, att / 1e12);
    std::vector<const model::PreprocessedImage*> four(4, &pre);
    const double four_ms = wall_ms([&] { (void)tower.embed_batch(four); }, quick ? 2 : 4);
    row("vision tower + projector, %d layers, 4 images per call (segments): %.2f ms per image", layers, four_ms / 4);
    const double feat_ms = wall_ms([&] { (void)tower.features(pre); }, quick ? 2 : 5);
    row("vision tower only (features, no projector), %d layers, 1 image: %.2f ms", layers, feat_ms);
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
  cublasDestroy(h);
  print_summary(prop.name);
  return 0;
}
