// GPU check of the bf16-weight GEMV for decode-sized steps (launch_bf16_gemv, cuda_bf16_gemv.cu) against a double
// reference on the bf16-rounded activations, and of the backend's linear() taking it for 1..8 tokens.
#include <cuda_runtime.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/cuda_kernels.h"
#include "core/dtype.h"
#include "device_allocs.h"
#include "gpu_check.h"

namespace mxlm::gpucheck {
namespace {

namespace cu = backend::cuda;

// Weights of the bf16 GEMV checks: random, bf16-rounded.
std::vector<uint16_t> random_bf16_weights(size_t count) {
  const auto wf = randn(count, 0.05f);
  std::vector<uint16_t> w(wf.size());
  for (size_t i = 0; i < w.size(); ++i) w[i] = f32_to_bf16(wf[i]);
  return w;
}

// The double reference: y[t * n + r] = Σ_c w[r, c] · bf16(x[t, c]) for tokens t < m (the GEMV rounds x to bf16).
std::vector<float> reference_bf16_gemv(const std::vector<uint16_t>& w, const std::vector<float>& x, int n, int k,
                                       int m) {
  std::vector<float> y(static_cast<size_t>(m) * n);
  for (int t = 0; t < m; ++t)
    for (int r = 0; r < n; ++r) {
      double s = 0;
      for (int c = 0; c < k; ++c)
        s += static_cast<double>(bf16_to_f32(w[static_cast<size_t>(r) * k + c])) *
             bf16_to_f32(f32_to_bf16(x[static_cast<size_t>(t) * k + c]));
      y[static_cast<size_t>(t) * n + r] = static_cast<float>(s);
    }
  return y;
}

void check_kernel(int sms) {
  cudaStream_t stream = nullptr;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  constexpr int kMaxM = cu::kBf16GemvMaxTokens;
  // MiniMax-M3's decode projections (q, k / v, o), ragged and tiny shapes; 6400 = 25 blocks of 256 (a partial batch).
  const std::vector<std::pair<int, int>> shapes = {{8192, 6144}, {512, 6144}, {6144, 8192}, {17, 256},
                                                   {1, 512},     {520, 2048}, {100, 6400}};
  for (auto [n, k] : shapes) {
    const auto w = random_bf16_weights(static_cast<size_t>(n) * k);
    const auto x = randn(static_cast<size_t>(kMaxM) * k, 2.0f);
    DeviceAllocs d;
    uint16_t* dw = d.put(w);
    float* dx = d.put(x);
    const size_t ylen = static_cast<size_t>(kMaxM + 1) * n;  // one token row more than any m: stays poison
    float* dy = d.get<float>(ylen);
    const auto want_all = reference_bf16_gemv(w, x, n, k, kMaxM);  // token t: rows [t * n, t * n + n)
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

// Groups (launch_bf16_gemv_group): a decode step's q / k / v / index q / index k over one x, at 8-warp CTAs (the
// group fills the card) and at 16-warp ones (three small weights), each output against the double reference; a weight
// whose own launch takes the group's CTA size gets the same bits alone (the group's CTA-to-weight mapping moves no
// sum); outputs' tails untouched; refusals.
void check_group(int sms) {
  cudaStream_t stream = nullptr;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  constexpr int kMaxM = cu::kBf16GemvMaxTokens;
  struct Case {
    int k;
    std::vector<int> rows;
    std::vector<int> same_cta_size;  // weights whose launch alone takes the group's CTA size
  };
  // 6144: the group (616 CTAs) and q alone (512) take 8 warps, k / v / index alone 16. 1024: 24 CTAs, all 16 warps.
  for (const Case& c :
       std::vector<Case>{{6144, {8192, 512, 512, 512, 128}, {0}}, {1024, {300, 17, 40}, {0, 1, 2}}}) {
    const int k = c.k, count = static_cast<int>(c.rows.size());
    DeviceAllocs d;
    const auto x = randn(static_cast<size_t>(kMaxM) * k, 2.0f);
    float* dx = d.put(x);
    std::vector<std::vector<uint16_t>> w(static_cast<size_t>(count));
    cu::Bf16GemvGroup group;
    group.count = count;
    for (int i = 0; i < count; ++i) {
      const int n = c.rows[static_cast<size_t>(i)];
      auto& wi = w[static_cast<size_t>(i)];
      wi = random_bf16_weights(static_cast<size_t>(n) * k);
      group.w[i] = d.put(wi);
      group.y[i] = d.get<float>(static_cast<size_t>(kMaxM + 1) * n);
      group.n[i] = n;
    }
    for (int m : {1, 3, 8}) {
      for (int i = 0; i < count; ++i)
        cudaMemset(group.y[i], 0xff, static_cast<size_t>(kMaxM + 1) * c.rows[static_cast<size_t>(i)] * 4);
      const cudaError_t e = cu::launch_bf16_gemv_group(group, dx, m, k, sms, true, stream);
      const cudaError_t e2 = cudaStreamSynchronize(stream);
      const std::string tag = "bf16 gemv group of " + std::to_string(count) + " k=" + std::to_string(k) +
                              " m=" + std::to_string(m);
      if (e != cudaSuccess || e2 != cudaSuccess) {
        report(false, tag + " launch: " + cudaGetErrorString(e != cudaSuccess ? e : e2), 0, 0);
        continue;
      }
      std::vector<std::vector<float>> grouped(static_cast<size_t>(count));
      for (int i = 0; i < count; ++i) {
        const int n = c.rows[static_cast<size_t>(i)];
        const auto want = reference_bf16_gemv(w[static_cast<size_t>(i)], x, n, k, m);
        auto got = fetch(group.y[i], static_cast<size_t>(kMaxM + 1) * n);
        bool untouched = true;
        for (size_t j = static_cast<size_t>(m) * n; j < got.size(); ++j)
          untouched = untouched && std::bit_cast<uint32_t>(got[j]) == 0xffffffffu;
        got.resize(static_cast<size_t>(m) * n);
        const std::string wtag = tag + " weight " + std::to_string(i) + " (" + std::to_string(n) + " rows)";
        check_close(wtag, got, want, 2e-6 * std::sqrt(static_cast<double>(k)));
        report(untouched, wtag + " tokens past m untouched", 0, 0);
        grouped[static_cast<size_t>(i)] = std::move(got);
      }
      for (int i : c.same_cta_size) {
        const int n = c.rows[static_cast<size_t>(i)];
        const cudaError_t ea = cu::launch_bf16_gemv(group.w[i], dx, group.y[i], n, m, k, sms, true, stream);
        const cudaError_t eb = cudaStreamSynchronize(stream);
        report(ea == cudaSuccess && eb == cudaSuccess, tag + " weight " + std::to_string(i) + " alone: launch", 0, 0);
        check_bits(tag + " weight " + std::to_string(i) + ": grouped == alone", grouped[static_cast<size_t>(i)],
                   fetch(group.y[i], static_cast<size_t>(m) * n));
      }
    }
    cu::Bf16GemvGroup bad = group;
    bad.count = 0;
    const bool none = cu::launch_bf16_gemv_group(bad, dx, 1, k, sms, true, stream) == cudaErrorInvalidValue;
    bad.count = cu::kBf16GemvMaxGroup + 1;
    const bool many = cu::launch_bf16_gemv_group(bad, dx, 1, k, sms, true, stream) == cudaErrorInvalidValue;
    bad = group;
    bad.y[count - 1] = nullptr;
    const bool no_out = cu::launch_bf16_gemv_group(bad, dx, 1, k, sms, true, stream) == cudaErrorInvalidValue;
    report(none && many && no_out, "bf16 gemv group k=" + std::to_string(k) + " refuses 0 / 7 weights and a null output",
           0, 0);
    (void)cudaGetLastError();
  }
  cudaStreamDestroy(stream);
}

// Backend::linears: the CUDA backend's grouped launch against one linear per weight (MXLM_CUDA_LINEAR_GROUPS=0) and the
// CPU backend.
void check_linears(Backend& cpu, Backend& gpu) {
  const int k = 2048;
  const std::vector<int> rows = {1024, 256, 256};
  std::vector<std::vector<uint16_t>> w;
  for (int n : rows) w.push_back(random_bf16_weights(static_cast<size_t>(n) * k));
  for (int m : {1, 5, 8, 9}) {
    const auto x = randn(static_cast<size_t>(m) * k);
    auto run = [&](Backend& be) {
      std::vector<std::unique_ptr<backend::Weight>> owned;
      std::vector<const backend::Weight*> ws;
      std::vector<std::unique_ptr<backend::Buffer>> outs;
      std::vector<float*> ys;
      for (size_t i = 0; i < rows.size(); ++i) {
        owned.push_back(be.upload_weight({backend::WeightFormat::BF16, rows[i], k, w[i].data(), nullptr}));
        ws.push_back(owned.back().get());
        outs.push_back(be.alloc(static_cast<size_t>(m) * rows[i]));
        ys.push_back(outs.back()->f32());
      }
      auto dx = up(be, x);
      be.linears(dx->f32(), static_cast<size_t>(m), ws, ys);
      std::vector<float> all;
      for (size_t i = 0; i < rows.size(); ++i) {
        const auto part = down(be, *outs[i], static_cast<size_t>(m) * rows[i]);
        all.insert(all.end(), part.begin(), part.end());
      }
      return all;
    };
    const std::string tag = "linears bf16 x3 k=" + std::to_string(k) + " m=" + std::to_string(m);
    const auto grouped = run(gpu);
    setenv("MXLM_CUDA_LINEAR_GROUPS", "0", 1);
    const auto each = run(gpu);
    unsetenv("MXLM_CUDA_LINEAR_GROUPS");
    check_close(tag + " grouped vs one linear each", grouped, each, 1e-5);
    check_close(tag + " vs CPU", grouped, run(cpu), 1e-2);
  }
}

// linear() with bf16 weights: the GEMV (default, up to 8 tokens) against the cuBLAS path (MXLM_CUDA_BF16_GEMV=0) and
// the CPU backend; 9 tokens (cuBLAS either way) against the CPU only.
void check_linear(Backend& cpu, Backend& gpu) {
  for (auto [n, k] : std::vector<std::pair<int, int>>{{512, 6144}, {300, 1024}}) {
    const auto w = random_bf16_weights(static_cast<size_t>(n) * k);
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
  check_group(env.multiprocessors);
  check_linear(env.cpu, env.gpu);
  check_linears(env.cpu, env.gpu);
}

}  // namespace mxlm::gpucheck
