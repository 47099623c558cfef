// The one-launch router of decode steps (launch_router_f32: f32 GEMV rows, top-k by the last CTA) against the
// two-launch path it replaces (launch_f32_gemv + launch_router_topk) and against the CPU backend's router.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_kernels.h"
#include "gpu_check.h"

namespace {

using namespace mxlm;
using namespace mxlm::gpucheck;
namespace cu = mxlm::backend::cuda;

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* p = nullptr;
  cudaMalloc(&p, std::max<size_t>(v.size(), 1) * sizeof(T));
  cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return p;
}
template <typename T>
std::vector<T> to_host(const T* p, size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}
std::vector<float> as_floats(const std::vector<int32_t>& ids) { return {ids.begin(), ids.end()}; }

void check_router_fused(Backend& cpu) {
  struct Case {
    int experts, hidden, tokens, k;
    bool bias;
  };
  for (const Case c : {Case{128, 6144, 1, 4, true}, Case{128, 6144, 8, 4, true}, Case{128, 6144, 5, 4, false},
                       Case{16, 96, 3, 2, true}, Case{40, 256, 7, 8, true}}) {
    const std::string what = "router_f32 E=" + std::to_string(c.experts) + " H=" + std::to_string(c.hidden) +
                             " T=" + std::to_string(c.tokens) + " k=" + std::to_string(c.k) +
                             (c.bias ? " bias" : " no bias");
    const auto x = randn(static_cast<size_t>(c.tokens) * c.hidden);
    const auto w = randn(static_cast<size_t>(c.experts) * c.hidden, 0.05f);
    const auto bias = randn(static_cast<size_t>(c.experts), 0.05f);
    float *dx = to_device(x), *dw = to_device(w), *db = c.bias ? to_device(bias) : nullptr;
    const size_t tk = static_cast<size_t>(c.tokens) * c.k, tl = static_cast<size_t>(c.tokens) * c.experts;
    float *logits = nullptr, *wts = nullptr, *wts2 = nullptr;
    int32_t *ids = nullptr, *ids2 = nullptr;
    int* counter = nullptr;
    cudaMalloc(&logits, tl * 4);
    cudaMalloc(&wts, tk * 4);
    cudaMalloc(&wts2, tk * 4);
    cudaMalloc(&ids, tk * 4);
    cudaMalloc(&ids2, tk * 4);
    cudaMalloc(&counter, 4);
    cudaMemset(counter, 0, 4);
    // Two launches of the fused kernel (the first must leave its counter at zero for the second), then the old path.
    cudaError_t e = cudaSuccess;
    for (int rep = 0; rep < 2 && e == cudaSuccess; ++rep)
      e = cu::launch_router_f32(dw, dx, db, c.experts, c.tokens, c.hidden, c.k, 2.0f, logits, counter, ids, wts,
                                nullptr);
    if (e == cudaSuccess) e = cu::launch_f32_gemv(dw, dx, logits, c.experts, c.tokens, c.hidden, nullptr);
    if (e == cudaSuccess)
      e = cu::launch_router_topk(logits, db, static_cast<size_t>(c.tokens), c.experts, c.k, 2.0f, ids2, wts2, nullptr);
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    report(e == cudaSuccess, what + " launches", 0, 0);
    if (e == cudaSuccess) {
      check_bits(what + " ids == two-launch path", as_floats(to_host(ids, tk)), as_floats(to_host(ids2, tk)));
      check_bits(what + " weights == two-launch path", to_host(wts, tk), to_host(wts2, tk));
      report(to_host(counter, 1)[0] == 0, what + " counter left zero", 0, 0);
      // The CPU backend's router on the same inputs: same experts, weights within f32 rounding.
      auto hx = cpu.alloc(x.size());
      cpu.upload(*hx, 0, x.data(), x.size());
      auto hw = cpu.upload_weight({backend::WeightFormat::F32, c.experts, c.hidden, w.data(), nullptr});
      auto hb = cpu.upload_vector(bias);
      auto hids = cpu.alloc(tk), hwts = cpu.alloc(tk);
      cpu.router(hx->f32(), static_cast<size_t>(c.tokens), *hw, c.bias ? hb->f32() : nullptr, c.k, 2.0f,
                 hids->i32(), hwts->f32());
      std::vector<int32_t> want_ids(tk);
      std::vector<float> want_w(tk);
      cpu.download(*hids, 0, reinterpret_cast<float*>(want_ids.data()), tk);
      cpu.download(*hwts, 0, want_w.data(), tk);
      check_bits(what + " ids == CPU", as_floats(to_host(ids, tk)), as_floats(want_ids));
      check_close(what + " weights vs CPU", to_host(wts, tk), want_w, 1e-5);
    }
    // Refused: more tokens than one launch takes.
    report(cu::launch_router_f32(dw, dx, db, c.experts, cu::kF32GemvMaxTokens + 1, c.hidden, c.k, 2.0f, logits,
                                 counter, ids, wts, nullptr) == cudaErrorInvalidValue,
           what + " refuses " + std::to_string(cu::kF32GemvMaxTokens + 1) + " tokens", 0, 0);
    for (void* p : {static_cast<void*>(dx), static_cast<void*>(dw), static_cast<void*>(db), static_cast<void*>(logits),
                    static_cast<void*>(wts), static_cast<void*>(wts2), static_cast<void*>(ids), static_cast<void*>(ids2),
                    static_cast<void*>(counter)})
      cudaFree(p);
  }
}

}  // namespace

MXLM_GPU_CHECK(router_fused) { check_router_fused(env.cpu); }
