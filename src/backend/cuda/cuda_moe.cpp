// Routed experts on the GPU: tokens sorted by expert, QDQ fused into the gather and the SwiGLU, grouped fused
// MXFP4 kernels (native) or per-expert dequantize + cuBLAS (emulation).
//
// Native decode-sized steps (tokens * k <= kDeviceRoutingRows) never leave the device: the routing lists and
// the GEMV tile list are built by one kernel (launch_moe_route), and the grouped GEMVs run over a fixed grid
// that reads them, so the layer is six launches (route, gather+QDQ, gate/up GEMV, SwiGLU+QDQ, down GEMV,
// combine) with no synchronisation, capturable in a CUDA graph, all with Programmatic Dependent Launch (each
// kernel's CTAs are resident while its predecessor finishes; the GEMVs queue their weights meanwhile). Larger steps and
// the emulation path sort on the host (the split-K workspace of the fixed grid grows with the rows).
//
// The MoE layer's shared expert (moe_experts' `shared`) rides in the device-routed launches as one more local expert
// (sharedfuse, as SGLang fuses DeepSeek's shared experts): every token routed to it with weight 1, its rows gathered
// and QDQ'd by the same gather, its tiles inside the same two grouped GEMVs, and its output added by the same combine
// in each token's last slot, after the routed experts: out = routed + shared with the unfused summation order. Paths
// that do not fuse it (host-sorted, emulation, float or odd-shaped shared experts) run it unfused afterwards.
#include <cstdlib>

#include "backend/cuda/cuda_backend_impl.h"

namespace mxlm::backend::cuda {

namespace {
constexpr size_t kDeviceRoutingRows = 1024;
constexpr size_t kMoeGemv4MaxTokens = 16;

// MXLM_CUDA_MOE_HOST=1 forces the host-sorted path (benchmark baseline).
bool moe_host_only() {
  const char* force_host = std::getenv("MXLM_CUDA_MOE_HOST");
  return force_host != nullptr && force_host[0] != '\0' && force_host[0] != '0';
}
}  // namespace

const uint8_t* const* CudaBackend::expert_table(std::span<const Weight* const> gate, std::span<const Weight* const> up,
                                                std::span<const Weight* const> down, const SharedExpert* shared) {
  const size_t n = gate.size() + (shared ? 1 : 0);
  std::vector<const void*> host(6 * n);
  for (size_t e = 0; e < n; ++e) {
    const bool s = e == gate.size();  // the shared expert: local expert num_local
    const Weight* const ws[3] = {s ? shared->gate : gate[e], s ? shared->up : up[e], s ? shared->down : down[e]};
    for (size_t i = 0; i < 3; ++i) {
      host[i * n + e] = dev(*ws[i]).data_;
      host[(3 + i) * n + e] = dev(*ws[i]).scales_;
    }
  }
  // Keyed by the shared expert's gate when it is fused in, so a layer's routed-only and fused tables both stay.
  ExpertTable& t = expert_tables_[shared ? shared->gate : gate[0]];
  if (t.host != host) {
    // A kernel still in flight may read the old table: wait before overwriting it.
    MXLM_CUDA_CHECK(cudaStreamSynchronize(stream_));
    t.device = Block(pool_, host.size() * sizeof(void*));
    MXLM_CUDA_CHECK(cudaMemcpy(t.device.as<void>(), host.data(), host.size() * sizeof(void*), cudaMemcpyHostToDevice));
    t.host = std::move(host);
  }
  return t.device.as<const uint8_t* const>();
}

bool CudaBackend::shared_expert_fusable(std::span<const Weight* const> gate, const SharedExpert& shared,
                                        bool qdq_inputs) const {
  // Same math as the unfused shared expert (add_shared_expert) only when the fused gather / SwiGLU QDQ its inputs
  // as that path's MXFP4 linears do (qdq_inputs with MXFP4 weights) and its per-rank shapes are the routed experts'
  // (one tile list and weight table). Tensor parallel: M3Model shards the shared expert like the routed ones
  // (Shard::even_rows of the intermediate size), so the per-rank shapes match when the intermediate sizes do, and
  // each rank adds its partial shared output before the layer's all-reduce either way. An expert-parallel subset
  // (first_expert, num_local) fuses too: the routed part only ever covers this rank's experts, the shared expert
  // is added for every token as the unfused path does. Anything else (float / mixed formats, other sizes): unfused.
  const Weight* const ws[3] = {shared.gate, shared.up, shared.down};
  for (const Weight* w : ws)
    if (!w->mxfp4()) return false;
  return qdq_inputs && gate[0]->mxfp4() && shared.gate->rows() == gate[0]->rows() &&
         shared.gate->cols() == gate[0]->cols() && shared.up->rows() == gate[0]->rows() &&
         shared.up->cols() == gate[0]->cols() && shared.down->rows() == gate[0]->cols() &&
         shared.down->cols() == gate[0]->rows();
}

bool CudaBackend::moe_experts_on_device(const float* x, size_t tokens, const int32_t* ids, const float* weights, int k,
                                        std::span<const Weight* const> gate, std::span<const Weight* const> up,
                                        std::span<const Weight* const> down, int first_expert, SwigluParams p,
                                        bool qdq_inputs, const SharedExpert* shared, float* out) {
  const int num_local = static_cast<int>(gate.size());
  // With a shared expert: one more local expert (num_local) and one more row per token (the last combine slot).
  const int experts = num_local + (shared ? 1 : 0), slots = k + (shared ? 1 : 0);
  // The routed rows decide (tokens take the same path fused or not); the buffers hold the shared rows too.
  if (tokens * static_cast<size_t>(k) > kDeviceRoutingRows || experts > 1024) return false;
  const size_t tk = tokens * static_cast<size_t>(slots);
  const int hidden = static_cast<int>(gate[0]->cols()), inter = static_cast<int>(gate[0]->rows());
  const size_t H = static_cast<size_t>(hidden), I = static_cast<size_t>(inter);
  const int max_tiles = moe_max_tiles(tokens, slots, experts);
  const uint8_t* const* table = expert_table(gate, up, down, shared);  // may synchronise (first call, new weights)
  // MXLM_CUDA_MOE_PLAIN=1: the small kernels without Programmatic Dependent Launch (cuda_kernels.cu's).
  const char* plain_env = std::getenv("MXLM_CUDA_MOE_PLAIN");
  const bool pdl = plain_env == nullptr || plain_env[0] == '\0' || plain_env[0] == '0';
  Block offsets(pool_, (static_cast<size_t>(experts) + 1) * 4), gather(pool_, tk * 4), row_w(pool_, tk * 4),
      combine(pool_, tk * 4), tiles(pool_, static_cast<size_t>(max_tiles) * 12), counts(pool_, 8);
  MXLM_CUDA_CHECK(launch_moe_route(ids, weights, tokens, k, first_expert, num_local, offsets.as<int32_t>(),
                                   gather.as<int32_t>(), row_w.as<float>(), combine.as<int32_t>(), tiles.as<int32_t>(),
                                   counts.as<int32_t>(), stream_, pdl, shared != nullptr));
  // Every buffer is sized for all tk rows; rows past the routed count hold token 0's row (gather pads with 0) or
  // unused values and are read by no tile and no combine entry.
  Block xs(pool_, tk * H * 2), g(pool_, tk * I * 4), u(pool_, tk * I * 4), act(pool_, tk * I * 2), y(pool_, tk * H * 4);
  if (pdl) {
    MXLM_CUDA_CHECK(launch_moe_gather_qdq_bf16(x, gather.as<int32_t>(), counts.as<int32_t>(), tk, H, qdq_inputs,
                                               xs.as<uint16_t>(), stream_));
  } else {
    MXLM_CUDA_CHECK(launch_gather_qdq_bf16(x, gather.as<int32_t>(), tk, H, qdq_inputs, xs.as<uint16_t>(), stream_));
  }
  const size_t n = static_cast<size_t>(experts);
  const int max_m = moe_tile_rows(tokens, slots, experts);
  const int rows_max = static_cast<int>(tk);
  auto swiglu_qdq = [&] {
    if (pdl) {
      MXLM_CUDA_CHECK(launch_moe_swiglu_qdq_bf16(g.as<float>(), u.as<float>(), counts.as<int32_t>(), tk, I, p.alpha,
                                                 p.limit, qdq_inputs, act.as<uint16_t>(), stream_));
    } else {
      MXLM_CUDA_CHECK(launch_swiglu_qdq_bf16(g.as<float>(), u.as<float>(), tk, I, p.alpha, p.limit, qdq_inputs,
                                             act.as<uint16_t>(), stream_));
    }
  };
  auto combine_rows = [&] {
    if (pdl) {
      MXLM_CUDA_CHECK(launch_moe_combine_pdl(y.as<float>(), combine.as<int32_t>(), row_w.as<float>(), tokens, slots, H,
                                             out, stream_));
    } else {
      MXLM_CUDA_CHECK(
          launch_moe_combine(y.as<float>(), combine.as<int32_t>(), row_w.as<float>(), tokens, slots, H, out, stream_));
    }
  };

  // GEMV version per launch: 4 (one CTA per 16 rows of a tile's expert over the whole K, no K split, no memset) for
  // steps of up to kMoeGemv4MaxTokens tokens whose tiles hold at most 8 rows (its one-pass forms; H100, session 5:
  // T = 8 layer 0.403 -> 0.360 ms; at T = 32 1.141 vs 1.169 ms on random routing but a B = 32 decode step 2 % slower
  // than on version 1, T = 128 1.907 vs 1.800 ms: its per-lane activation loads grow with the rows per tile), else 1
  // (the register-batch kernel with atomic K split into zeroed outputs, reading the tile list itself).
  // MXLM_CUDA_MOE_GEMV="<gate/up>[<down>]" with 1, 2 (version 2 over the tile list) or 4 overrides (e.g. "14": version
  // 1 for gate/up, 4 for down). A tile holds at most min(tile rows, tokens) rows: a token picks a routed expert once,
  // the shared expert once.
  const int v4_rows = std::min(max_m, static_cast<int>(tokens));
  const char* gemv_env = std::getenv("MXLM_CUDA_MOE_GEMV");
  const bool env_set = gemv_env != nullptr && gemv_env[0] != '\0';
  const char gu_choice =
      env_set ? gemv_env[0] : (v4_rows <= kMxfp4Gemv4OnePassRows && tokens <= kMoeGemv4MaxTokens ? '4' : '1');
  const char dn_choice = env_set && gemv_env[1] != '\0' ? gemv_env[1] : gu_choice;
  const bool gu_v4 = gu_choice == '4' && mxfp4_gemv4_supports(hidden, v4_rows);
  const bool dn_v4 = dn_choice == '4' && mxfp4_gemv4_supports(inter, v4_rows);
  const bool gu_v2 = gu_choice == '2', dn_v2 = dn_choice == '2';
  Mxfp4MoeTiles gu;
  gu.tiles = tiles.as<int32_t>();
  gu.num_tiles = counts.as<int32_t>();
  gu.w[0] = table;
  gu.w[1] = table + n;
  gu.scales[0] = table + 3 * n;
  gu.scales[1] = table + 4 * n;
  gu.x = xs.as<uint16_t>();
  gu.y[0] = g.as<float>();
  gu.y[1] = u.as<float>();
  gu.ldy = inter;
  gu.mats = 2;
  gu.rows_max = rows_max;
  gu.tiles_ready = true;  // route ran before the gather, the gather right before this GEMV
  Mxfp4MoeTiles dn;
  dn.tiles = tiles.as<int32_t>();
  dn.num_tiles = counts.as<int32_t>();
  dn.w[0] = table + 2 * n;
  dn.scales[0] = table + 5 * n;
  dn.x = act.as<uint16_t>();
  dn.y[0] = y.as<float>();
  dn.ldy = hidden;
  dn.mats = 1;
  dn.rows_max = rows_max;
  dn.tiles_ready = true;
  if (gu_v4) {
    MXLM_CUDA_CHECK(launch_mxfp4_moe_gemv4(gu, max_tiles, v4_rows, inter, hidden, true, stream_));
  } else if (gu_v2) {
    const Mxfp4GemvPlan plan1 = mxfp4_gemv_plan(inter, hidden, max_tiles * 2, max_m, sms_, mxfp4_gemv_backend_config());
    Block ws1(pool_, std::max<size_t>(mxfp4_gemv_workspace_floats(plan1, inter, 2 * rows_max), 1) * 4);
    MXLM_CUDA_CHECK(launch_mxfp4_moe_gemv(gu, max_tiles, inter, hidden, plan1, true, ws1.as<float>(),
                                          gemv_counters(mxfp4_gemv_counters(plan1, max_tiles * 2)), stream_));
  } else {
    const int split1 = mxfp4_gemv_k_split(inter, hidden, 2 * max_tiles, sms_);
    if (split1 > 1) {
      MXLM_CUDA_CHECK(cudaMemsetAsync(g.as<void>(), 0, tk * I * 4, stream_));
      MXLM_CUDA_CHECK(cudaMemsetAsync(u.as<void>(), 0, tk * I * 4, stream_));
    }
    MXLM_CUDA_CHECK(launch_mxfp4_moe_gemv1(gu, max_tiles, max_m, inter, hidden, split1, stream_));
  }
  swiglu_qdq();
  if (dn_v4) {
    MXLM_CUDA_CHECK(launch_mxfp4_moe_gemv4(dn, max_tiles, v4_rows, hidden, inter, true, stream_));
  } else if (dn_v2) {
    const Mxfp4GemvPlan plan2 = mxfp4_gemv_plan(hidden, inter, max_tiles, max_m, sms_, mxfp4_gemv_backend_config());
    Block ws2(pool_, std::max<size_t>(mxfp4_gemv_workspace_floats(plan2, hidden, rows_max), 1) * 4);
    MXLM_CUDA_CHECK(launch_mxfp4_moe_gemv(dn, max_tiles, hidden, inter, plan2, true, ws2.as<float>(),
                                          gemv_counters(mxfp4_gemv_counters(plan2, max_tiles)), stream_));
  } else {
    const int split2 = mxfp4_gemv_k_split(hidden, inter, max_tiles, sms_);
    if (split2 > 1) MXLM_CUDA_CHECK(cudaMemsetAsync(y.as<void>(), 0, tk * H * 4, stream_));
    MXLM_CUDA_CHECK(launch_mxfp4_moe_gemv1(dn, max_tiles, max_m, hidden, inter, split2, stream_));
  }
  combine_rows();
  return true;
}

void CudaBackend::moe_experts(const float* x, size_t tokens, const int32_t* ids, const float* weights, int k,
                              std::span<const Weight* const> gate, std::span<const Weight* const> up,
                              std::span<const Weight* const> down, int first_expert, SwigluParams p, bool qdq_inputs,
                              const SharedExpert* shared, float* out) {
  if (tokens == 0 || (gate.empty() && !shared)) return;
  if (gate.empty()) {  // no routed expert on this rank: the shared expert alone
    if (!shared->gate) fail("shared expert without its gate weight");
    const size_t hidden = static_cast<size_t>(shared->gate->cols());
    MXLM_CUDA_CHECK(cudaMemsetAsync(out, 0, tokens * hidden * 4, stream_));
    add_shared_expert(x, tokens, hidden, *shared, p, out);
    return;
  }
  if (shared) check_shared_expert(*shared, static_cast<size_t>(gate[0]->cols()));
  // The shared expert inside the device-routed launches where that is the same math (shared_expert_fusable) and
  // the step routes on the device; otherwise the routed experts, then the shared expert unfused.
  if (shared && options_.moe_backend == MoeBackend::Native && !moe_host_only() &&
      shared_expert_fusable(gate, *shared, qdq_inputs) &&
      moe_experts_on_device(x, tokens, ids, weights, k, gate, up, down, first_expert, p, qdq_inputs, shared, out))
    return;
  moe_routed(x, tokens, ids, weights, k, gate, up, down, first_expert, p, qdq_inputs, out);
  if (shared) add_shared_expert(x, tokens, static_cast<size_t>(gate[0]->cols()), *shared, p, out);
}

void CudaBackend::moe_routed(const float* x, size_t tokens, const int32_t* ids, const float* weights, int k,
                             std::span<const Weight* const> gate, std::span<const Weight* const> up,
                             std::span<const Weight* const> down, int first_expert, SwigluParams p, bool qdq_inputs,
                             float* out) {
  const size_t hidden = static_cast<size_t>(gate[0]->cols());
  const size_t inter = static_cast<size_t>(gate[0]->rows());
  const int num_local = static_cast<int>(gate.size());
  const size_t tk = tokens * static_cast<size_t>(k);
  if (options_.moe_backend == MoeBackend::Native && gate[0]->mxfp4() && !moe_host_only() &&
      moe_experts_on_device(x, tokens, ids, weights, k, gate, up, down, first_expert, p, qdq_inputs, nullptr, out))
    return;
  // Routing decisions to the host to sort tokens by expert.
  std::vector<int32_t> h_ids(tk);
  std::vector<float> h_w(tk);
  if (options_.tp) MXLM_CUDA_CHECK(cudaStreamSynchronize(stream_));  // TP: no pageable copy behind a collective
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
