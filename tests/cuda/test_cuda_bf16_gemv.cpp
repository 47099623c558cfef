// GPU check of the bf16-weight GEMV for decode-sized steps (launch_bf16_gemv, cuda_bf16_gemv.cu) against a double
// reference on the bf16-rounded activations, and of the backend's linear() taking it for 1..8 tokens.
#include <cuda_runtime.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend/cuda/cuda_kernels.h"
#include "core/dtype.h"
#include "device_allocs.h"
#include "gpu_check.h"

namespace mxlm::gpucheck {
namespace {

namespace cu = backend::cuda;

void check_kernel(int sms) {
  cudaStream_t stream = nullptr;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  constexpr int kMaxM = cu::kBf16GemvMaxTokens;
  // MiniMax-M3's decode projections (q, k / v, o), ragged and tiny shapes; 6400 = 25 blocks of 256 (a partial batch).
  const std::vector<std::pair<int, int>> shapes = {{8192, 6144}, {512, 6144}, {6144, 8192}, {17, 256},
                                                   {1, 512},     {520, 2048}, {100, 6400}};
  for (auto [n, k] : shapes) {
    std::vector<uint16_t> w(static_cast<size_t>(n) * k);
    const auto wf = randn(w.size(), 0.05f);
    for (size_t i = 0; i < w.size(); ++i) w[i] = f32_to_bf16(wf[i]);
    const auto x = randn(static_cast<size_t>(kMaxM) * k, 2.0f);
    DeviceAllocs d;
    uint16_t* dw = d.put(w);
    float* dx = d.put(x);
    const size_t ylen = static_cast<size_t>(kMaxM + 1) * n;  // one token row more than any m: stays poison
    float* dy = d.get<float>(ylen);
    std::vector<float> want_all(static_cast<size_t>(kMaxM) * n);  // token t of the reference: rows [t * n, t * n + n)
    for (int t = 0; t < kMaxM; ++t)
      for (int r = 0; r < n; ++r) {
        double s = 0;
        for (int c = 0; c < k; ++c)
          s += static_cast<double>(bf16_to_f32(w[static_cast<size_t>(r) * k + c])) *
               bf16_to_f32(f32_to_bf16(x[static_cast<size_t>(t) * k + c]));
        want_all[static_cast<size_t>(t) * n + r] = static_cast<float>(s);
      }
    for (int m = 1; m <= kMaxM; ++m) {
      const std::string tag =
          "bf16 gemv n=" + std::to_string(n) + " k=" + std::to_string(k) + " m=" + std::to_string(m);
      const std::vector<float> want(want_all.begin(), want_all.begin() + static_cast<std::ptrdiff_t>(m) * n);
      std::vector<float> first;
      for (int run = 0; run < 3; ++run) {  // 0: PDL, 1: again (run to run), 2: without PDL
        cudaMemset(dy, 0xff, ylen * 4);
        const cudaError_t e = cu::launch_bf16_gemv(dw, dx, dy, n, m, k, sms, run != 2, stream);
        const cudaError_t e2 = cudaStreamSynchronize(stream);
        if (e != cudaSuccess || e2 != cudaSuccess) {
          report(false, tag + " launch: " + cudaGetErrorString(e != cudaSuccess ? e : e2), 0, 0);
          break;
        }
        auto got = fetch(dy, ylen);
        if (run == 0) {
          bool untouched = true;
          for (size_t i = static_cast<size_t>(m) * n; i < ylen; ++i)
            untouched = untouched && std::bit_cast<uint32_t>(got[i]) == 0xffffffffu;
          report(untouched, tag + " tokens past m untouched", 0, 0);
        }
        got.resize(static_cast<size_t>(m) * n);
        if (run == 0) {
          check_close(tag, got, want, 2e-6 * std::sqrt(static_cast<double>(k)));
          first = got;
        } else {
          check_bits(tag + (run == 1 ? " run to run" : " without PDL == with PDL"), got, first);
        }
      }
    }
  }
  DeviceAllocs d;
  float* dummy = d.get<float>(1 << 14);
  report(!cu::bf16_gemv_supports(64, 6144, 9) && !cu::bf16_gemv_supports(64, 6000, 1) &&
             cu::launch_bf16_gemv(reinterpret_cast<const uint16_t*>(dummy), dummy + 1, dummy, 64, 1, 256, sms, true,
                                  stream) == cudaErrorInvalidValue,
         "bf16 gemv refuses 9 tokens, k % 256 != 0, unaligned activations", 0, 0);
  (void)cudaGetLastError();
  cudaStreamDestroy(stream);
}

// linear() with bf16 weights: the GEMV (default, up to 8 tokens) against the cuBLAS path (MXLM_CUDA_BF16_GEMV=0) and
// the CPU backend; 9 tokens (cuBLAS either way) against the CPU only.
void check_linear(Backend& cpu, Backend& gpu) {
  for (auto [n, k] : std::vector<std::pair<int, int>>{{512, 6144}, {300, 1024}}) {
    const auto wf = randn(static_cast<size_t>(n) * k, 0.05f);
    std::vector<uint16_t> w(wf.size());
    for (size_t i = 0; i < w.size(); ++i) w[i] = f32_to_bf16(wf[i]);
    for (int m : {1, 3, 8, 9}) {
      const auto x = randn(static_cast<size_t>(m) * k);
      auto run = [&](Backend& be) {
        auto wt = be.upload_weight({backend::WeightFormat::BF16, n, k, w.data(), nullptr});
        auto dx = up(be, x);
        auto y = be.alloc(static_cast<size_t>(m) * n);
        be.linear(dx->f32(), static_cast<size_t>(m), *wt, y->f32());
        return down(be, *y, static_cast<size_t>(m) * n);
      };
      const std::string tag =
          "linear bf16 n=" + std::to_string(n) + " k=" + std::to_string(k) + " m=" + std::to_string(m);
      const auto ours = run(gpu);
      if (m <= cu::kBf16GemvMaxTokens) {
        setenv("MXLM_CUDA_BF16_GEMV", "0", 1);
        const auto cublas = run(gpu);
        unsetenv("MXLM_CUDA_BF16_GEMV");
        check_close(tag + " default vs cuBLAS path", ours, cublas, 1e-5);
      }
      // The CPU multiplies the f32 activations (the GPU rounds them to bf16 first): a bf16-sized tolerance.
      check_close(tag + " vs CPU", ours, run(cpu), 1e-2);
    }
  }
}

}  // namespace

MXLM_GPU_CHECK(bf16_gemv) {
  check_kernel(env.multiprocessors);
  check_linear(env.cpu, env.gpu);
}

}  // namespace mxlm::gpucheck
