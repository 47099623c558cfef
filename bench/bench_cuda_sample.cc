// (Named .cc so the CI benchmark glob bench/bench_*.cpp, built without CUDA, does not pick it up.)
// GPU benchmark of sampling on the device (issue #8): launch_sample_rows over [rows, 200064] f32 logits (MiniMax-M3's
// vocabulary) for greedy, temperature, top-p, top-k + top-p and min-p rows, against (a) the greedy argmax kernel,
// (b) the logits' read time at copy bandwidth (the floor of any kernel that reads them once), and (c) the host path
// the engine used before: download the logits (pageable, as Backend::download) and sample every row on the CPU
// with backend::sample_row. `--quick` for fewer reps.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <string>
#include <vector>

#include "backend/cuda/cuda_kernels.h"
#include "backend/sampling.h"
#include "cuda_bench_util.h"

namespace {

using namespace mxlm;
using namespace mxlm::cudabench;
using backend::SampleParams;

struct Case {
  const char* name;
  SampleParams p;
};

SampleParams make(float temperature, int top_k, float top_p, float min_p) {
  SampleParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p;
  p.seed = 1234;
  return p;
}

void bench_sampling(const Ceilings& c, bool quick) {
  const size_t vocab = 200064;
  const int reps = quick ? 10 : 30;
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  g_time_stream = stream;
  const Case cases[] = {
      {"greedy (T 0)", make(0.0f, 0, 1.0f, 0.0f)},    {"T 1.0", make(1.0f, 0, 1.0f, 0.0f)},
      {"T 0.7 top-p 0.9", make(0.7f, 0, 0.9f, 0.0f)}, {"T 0.6 top-k 20 top-p 0.95", make(0.6f, 20, 0.95f, 0.0f)},
      {"T 1.0 top-k 50", make(1.0f, 50, 1.0f, 0.0f)}, {"T 0.8 min-p 0.05", make(0.8f, 0, 1.0f, 0.05f)},
  };
  for (const int rows : {1, 8, 32, 64}) {
    const size_t n = static_cast<size_t>(rows) * vocab;
    auto* x = static_cast<float*>(dalloc(n * 4));
    auto* ids = static_cast<int32_t*>(dalloc(static_cast<size_t>(rows) * 4));
    auto* dp = static_cast<SampleParams*>(dalloc(static_cast<size_t>(rows) * sizeof(SampleParams)));
    void* argmax_ws = dalloc(cu::argmax_rows_workspace_bytes(static_cast<size_t>(rows), vocab));
    // Logits uniform in +-8 (the kernel's passes do not depend much on the shape; a flat shape keeps many tokens
    // inside the top-p mass, the slower case for the cut).
    CK(cu::launch_fill_random_f32(x, n, 7, 8.0f, stream));
    const double floor_ms = static_cast<double>(n) * 4 / (c.copy_gbs * 1e9 / 2) * 1e3;  // one read at copy speed
    const double argmax_ms =
        time_ms([&](int) { CK(cu::launch_argmax_rows(x, static_cast<size_t>(rows), vocab, ids, argmax_ws, stream)); },
                reps);
    row("rows %2d: logits %.1f MB, read floor %.4f ms; argmax kernel %.4f ms", rows, n * 4 / 1e6, floor_ms, argmax_ms);
    // The host path: download + CPU sampling of every row.
    std::vector<float> host(n);
    std::vector<SampleParams> ps(static_cast<size_t>(rows));
    for (const Case& cs : cases) {
      for (int r = 0; r < rows; ++r) {
        ps[static_cast<size_t>(r)] = cs.p;
        ps[static_cast<size_t>(r)].seed = 1000 + static_cast<uint64_t>(r);
      }
      CK(cudaMemcpy(dp, ps.data(), ps.size() * sizeof(SampleParams), cudaMemcpyHostToDevice));
      const double dev_ms = time_ms(
          [&](int i) {
            (void)i;
            CK(cu::launch_sample_rows(x, static_cast<size_t>(rows), vocab, dp, ids, stream));
          },
          reps);
      double download_ms = 0;
      const double host_ms = wall_ms(
          [&] {
            const auto t0 = std::chrono::steady_clock::now();
            CK(cudaMemcpyAsync(host.data(), x, n * 4, cudaMemcpyDeviceToHost, stream));
            CK(cudaStreamSynchronize(stream));
            download_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            for (int r = 0; r < rows; ++r)
              (void)backend::sample_row({host.data() + static_cast<size_t>(r) * vocab, vocab},
                                        ps[static_cast<size_t>(r)]);
          },
          quick ? 3 : 5, 1);
      row("rows %2d %-26s device %.4f ms (%.1fx argmax, %.1fx read floor) | host path %.2f ms (download %.2f) = "
          "%.0fx device",
          rows, cs.name, dev_ms, dev_ms / argmax_ms, dev_ms / floor_ms, host_ms, download_ms, host_ms / dev_ms);
    }
    CK(cudaFree(x));
    CK(cudaFree(ids));
    CK(cudaFree(dp));
    CK(cudaFree(argmax_ws));
  }
  CK(cudaStreamDestroy(stream));
  g_time_stream = nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--quick") quick = true;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cublasHandle_t h;
  CB(cublasCreate(&h));
  const Ceilings c = measure_ceilings(h, quick);
  CB(cublasDestroy(h));
  bench_sampling(c, quick);
  print_summary(prop.name);
  return 0;
}
