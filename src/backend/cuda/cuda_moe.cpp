// Routed experts on the GPU: tokens sorted by expert, QDQ fused into the gather and the SwiGLU, grouped fused
// MXFP4 kernels (native) or per-expert dequantize + cuBLAS (emulation).
#include "backend/cuda/cuda_backend_impl.h"

namespace mxlm::backend::cuda {

void CudaBackend::moe_experts(const float* x, size_t tokens, const int32_t* ids, const float* weights, int k,
                              std::span<const Weight* const> gate, std::span<const Weight* const> up,
                              std::span<const Weight* const> down, int first_expert, SwigluParams p, bool qdq_inputs,
                              float* out) {
  if (gate.empty() || tokens == 0) return;
  const size_t hidden = static_cast<size_t>(gate[0]->cols());
  const size_t inter = static_cast<size_t>(gate[0]->rows());
  const int num_local = static_cast<int>(gate.size());
  const size_t tk = tokens * static_cast<size_t>(k);
  // Routing decisions to the host to sort tokens by expert.
  std::vector<int32_t> h_ids(tk);
  std::vector<float> h_w(tk);
  MXLM_CUDA_CHECK(cudaMemcpyAsync(h_ids.data(), ids, tk * 4, cudaMemcpyDeviceToHost, stream_));
  MXLM_CUDA_CHECK(cudaMemcpyAsync(h_w.data(), weights, tk * 4, cudaMemcpyDeviceToHost, stream_));
  MXLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  ring_used_ = 0;
  std::vector<std::vector<int32_t>> per_expert(static_cast<size_t>(num_local));
  for (size_t t = 0; t < tokens; ++t)
    for (int j = 0; j < k; ++j) {
      const int e = h_ids[t * static_cast<size_t>(k) + static_cast<size_t>(j)] - first_expert;
      if (e >= 0 && e < num_local)
        per_expert[static_cast<size_t>(e)].push_back(
            static_cast<int32_t>(t * static_cast<size_t>(k) + static_cast<size_t>(j)));
    }
  std::vector<int32_t> gather, first(static_cast<size_t>(num_local) + 1, 0);
  std::vector<float> row_w;
  std::vector<int32_t> combine(tk, -1);
  std::vector<int> filled(tokens, 0);
  // Rows sorted by expert; each token lists its rows in ascending expert order (the CPU backend's sum order).
  for (int e = 0; e < num_local; ++e) {
    first[static_cast<size_t>(e)] = static_cast<int32_t>(gather.size());
    for (int32_t a : per_expert[static_cast<size_t>(e)]) {
      const size_t t = static_cast<size_t>(a) / static_cast<size_t>(k);
      combine[t * static_cast<size_t>(k) + static_cast<size_t>(filled[t]++)] = static_cast<int32_t>(gather.size());
      gather.push_back(static_cast<int32_t>(t));
      row_w.push_back(h_w[static_cast<size_t>(a)]);
    }
  }
  first[static_cast<size_t>(num_local)] = static_cast<int32_t>(gather.size());
  const size_t rows = gather.size();
  if (rows == 0) {
    MXLM_CUDA_CHECK(cudaMemsetAsync(out, 0, tokens * hidden * 4, stream_));
    return;
  }
  Block d_gather = to_device(std::span<const int32_t>(gather));
  Block d_w = to_device(std::span<const float>(row_w));
  Block d_combine = to_device(std::span<const int32_t>(combine));
  Block y(pool_, rows * hidden * 4);

  const bool native = options_.moe_backend == MoeBackend::Native && gate[0]->mxfp4();
  if (native) {
    Block xs(pool_, rows * hidden * 2), g(pool_, rows * inter * 4), u(pool_, rows * inter * 4),
        act(pool_, rows * inter * 2);
    MXLM_CUDA_CHECK(
        launch_gather_qdq_bf16(x, d_gather.as<int32_t>(), rows, hidden, qdq_inputs, xs.as<uint16_t>(), stream_));
    // Gate and up of every active expert in one launch, then down in another; 16-token tiles per expert.
    std::vector<Mxfp4GemvGroup> gu, dn;
    int max_m = 1;
    for (int e = 0; e < num_local; ++e) {
      const int32_t b = first[static_cast<size_t>(e)], c = first[static_cast<size_t>(e) + 1] - b;
      for (int32_t r0 = 0; r0 < c; r0 += 16) {
        const int m = std::min<int32_t>(16, c - r0);
        max_m = std::max(max_m, m);
        const size_t row = static_cast<size_t>(b + r0);
        const DeviceWeight& wg = dev(*gate[static_cast<size_t>(e)]);
        const DeviceWeight& wu = dev(*up[static_cast<size_t>(e)]);
        const DeviceWeight& wd = dev(*down[static_cast<size_t>(e)]);
        const uint16_t* xr = xs.as<uint16_t>() + row * hidden;
        gu.push_back({static_cast<const uint8_t*>(wg.data_), wg.scales_, xr, g.as<float>() + row * inter, m,
                      static_cast<int>(inter)});
        gu.push_back({static_cast<const uint8_t*>(wu.data_), wu.scales_, xr, u.as<float>() + row * inter, m,
                      static_cast<int>(inter)});
        dn.push_back({static_cast<const uint8_t*>(wd.data_), wd.scales_, act.as<uint16_t>() + row * inter,
                      y.as<float>() + row * hidden, m, static_cast<int>(hidden)});
      }
    }
    Block d_gu = to_device(std::span<const Mxfp4GemvGroup>(gu));
    Block d_dn = to_device(std::span<const Mxfp4GemvGroup>(dn));
    const int split1 =
        mxfp4_gemv_k_split(static_cast<int>(inter), static_cast<int>(hidden), static_cast<int>(gu.size()), sms_);
    if (split1 > 1) {
      MXLM_CUDA_CHECK(cudaMemsetAsync(g.as<void>(), 0, rows * inter * 4, stream_));
      MXLM_CUDA_CHECK(cudaMemsetAsync(u.as<void>(), 0, rows * inter * 4, stream_));
    }
    MXLM_CUDA_CHECK(launch_mxfp4_gemv(d_gu.as<Mxfp4GemvGroup>(), static_cast<int>(gu.size()), max_m,
                                      static_cast<int>(inter), static_cast<int>(hidden), split1, stream_));
    MXLM_CUDA_CHECK(launch_swiglu_qdq_bf16(g.as<float>(), u.as<float>(), rows, inter, p.alpha, p.limit, qdq_inputs,
                                           act.as<uint16_t>(), stream_));
    const int split2 =
        mxfp4_gemv_k_split(static_cast<int>(hidden), static_cast<int>(inter), static_cast<int>(dn.size()), sms_);
    if (split2 > 1) MXLM_CUDA_CHECK(cudaMemsetAsync(y.as<void>(), 0, rows * hidden * 4, stream_));
    MXLM_CUDA_CHECK(launch_mxfp4_gemv(d_dn.as<Mxfp4GemvGroup>(), static_cast<int>(dn.size()), max_m,
                                      static_cast<int>(hidden), static_cast<int>(inter), split2, stream_));
  } else {
    // Emulation (and float experts): per expert, the f32 rows (QDQ'd for MXFP4) through linear(), which
    // dequantizes MXFP4 weights to bf16 for cuBLAS in emulation mode.
    Block xs(pool_, rows * hidden * 4), g(pool_, rows * inter * 4), u(pool_, rows * inter * 4);
    MXLM_CUDA_CHECK(
        launch_gather_qdq_f32(x, d_gather.as<int32_t>(), rows, hidden, qdq_inputs, xs.as<float>(), stream_));
    for (int e = 0; e < num_local; ++e) {
      const size_t b = static_cast<size_t>(first[static_cast<size_t>(e)]);
      const size_t c = static_cast<size_t>(first[static_cast<size_t>(e) + 1]) - b;
      if (c == 0) continue;
      linear(xs.as<float>() + b * hidden, c, *gate[static_cast<size_t>(e)], g.as<float>() + b * inter);
      linear(xs.as<float>() + b * hidden, c, *up[static_cast<size_t>(e)], u.as<float>() + b * inter);
    }
    MXLM_CUDA_CHECK(
        launch_swiglu_oai(g.as<float>(), u.as<float>(), g.as<float>(), rows * inter, p.alpha, p.limit, stream_));
    if (qdq_inputs) MXLM_CUDA_CHECK(launch_qdq_f32(g.as<float>(), rows * inter, stream_));
    for (int e = 0; e < num_local; ++e) {
      const size_t b = static_cast<size_t>(first[static_cast<size_t>(e)]);
      const size_t c = static_cast<size_t>(first[static_cast<size_t>(e) + 1]) - b;
      if (c == 0) continue;
      linear(g.as<float>() + b * inter, c, *down[static_cast<size_t>(e)], y.as<float>() + b * hidden);
    }
  }
  MXLM_CUDA_CHECK(
      launch_moe_combine(y.as<float>(), d_combine.as<int32_t>(), d_w.as<float>(), tokens, k, hidden, out, stream_));
}

}  // namespace mxlm::backend::cuda
