// GPU checks of the shared expert fused into the device-routed MoE launches (sharedfuse, issue #8): the routing lists
// with the shared expert as local expert num_local (against a host re-derivation), and moe_experts with a shared
// expert - fused on the native path - against the same backend's unfused sequence (routed experts, then the shared
// MLP as M3Model ran it), the CPU backend and the emulation path, plus a graph-node count showing that the fused
// call adds no launches to the routed experts' (the unfused one adds about ten).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_kernels.h"
#include "device_allocs.h"
#include "gpu_check.h"
#include "moe_tile_check.h"

namespace {

using namespace mxlm;
using namespace mxlm::gpucheck;
namespace cu = mxlm::backend::cuda;

constexpr backend::SwigluParams kSwiglu{1.702f, 7.0f};

// Distinct experts per token: random, or every token on experts 0..k-1 ("same").
std::vector<int32_t> make_ids(int tokens, int k, int experts, bool same) {
  std::vector<int32_t> ids(static_cast<size_t>(tokens) * static_cast<size_t>(k)), pool(static_cast<size_t>(experts));
  for (int e = 0; e < experts; ++e) pool[static_cast<size_t>(e)] = e;
  for (int t = 0; t < tokens; ++t) {
    if (!same) std::shuffle(pool.begin(), pool.end(), g_rng);
    for (int j = 0; j < k; ++j)
      ids[static_cast<size_t>(t) * static_cast<size_t>(k) + static_cast<size_t>(j)] = pool[static_cast<size_t>(j)];
  }
  return ids;
}

// launch_moe_route with the shared expert: routed lists as without it (rows, tiles, ascending combine slots), the
// shared expert's rows last (token t at offsets[num_local] + t, weight 1.0) and in each token's last slot.
void check_route_shared() {
  struct Case {
    int tokens, k, experts, first, num_local;
    bool same;
  };
  const std::vector<Case> cases = {{1, 4, 128, 0, 128, false},  {8, 4, 128, 0, 128, false},
                                   {33, 4, 128, 0, 128, false}, {130, 4, 128, 0, 128, false},
                                   {33, 4, 128, 0, 128, true},  {33, 4, 64, 16, 32, false},
                                   {7, 1, 8, 0, 8, false},      {300, 4, 1023, 0, 1023, false}};
  for (const auto& c : cases) {
    const std::string tag = "moe_route shared T=" + std::to_string(c.tokens) + " k=" + std::to_string(c.k) +
                            " E=" + std::to_string(c.experts) + " local " + std::to_string(c.first) + "+" +
                            std::to_string(c.num_local) + (c.same ? " same" : " random");
    const auto ids = make_ids(c.tokens, c.k, c.experts, c.same);
    const std::vector<float> w = randn(ids.size());
    const int slots = c.k + 1, experts = c.num_local + 1;
    const size_t T = static_cast<size_t>(c.tokens), rows_max = T * static_cast<size_t>(slots);
    const int max_tiles = cu::moe_max_tiles(T, slots, experts);
    const int tile_rows = cu::moe_tile_rows(T, slots, experts);
    DeviceAllocs d;
    int32_t* dids = d.put(ids);
    float* dw = d.put(w);
    auto* offsets = d.get<int32_t>(static_cast<size_t>(experts) + 1);
    auto* gather = d.get<int32_t>(rows_max);
    auto* roww = d.get<float>(rows_max);
    auto* combine = d.get<int32_t>(rows_max);
    auto* tiles = d.get<int32_t>(static_cast<size_t>(max_tiles) * 3);
    auto* counts = d.get<int32_t>(2);
    cudaError_t e = cu::launch_moe_route(dids, dw, T, c.k, c.first, c.num_local, offsets, gather, roww, combine, tiles,
                                         counts, nullptr, false, /*shared_expert=*/true);
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e != cudaSuccess) {
      report(false, tag + ": " + cudaGetErrorString(e), 0, 0);
      continue;
    }
    const auto off = fetch(offsets, static_cast<size_t>(experts) + 1);
    const auto cnt = fetch(counts, 2);
    const auto g = fetch(gather, rows_max);
    const auto rw = fetch(roww, rows_max);
    const auto cb = fetch(combine, rows_max);
    const auto tl = fetch(tiles, static_cast<size_t>(max_tiles) * 3);
    int bad = 0;
    // Routed rows per local expert, from the ids.
    std::vector<std::vector<std::pair<int, float>>> want(static_cast<size_t>(experts));
    for (size_t a = 0; a < ids.size(); ++a) {
      const int x = ids[a] - c.first;
      if (x >= 0 && x < c.num_local) want[static_cast<size_t>(x)].push_back({static_cast<int>(a) / c.k, w[a]});
    }
    for (int t = 0; t < c.tokens; ++t) want[static_cast<size_t>(c.num_local)].push_back({t, 1.0f});
    int rows = 0;
    for (int x = 0; x < experts; ++x) {
      auto& wx = want[static_cast<size_t>(x)];
      if (off[static_cast<size_t>(x)] != rows) ++bad;
      std::vector<std::pair<int, float>> got;
      for (int r = rows; r < rows + static_cast<int>(wx.size()) && r < static_cast<int>(rows_max); ++r)
        got.push_back({g[static_cast<size_t>(r)], rw[static_cast<size_t>(r)]});
      if (x == c.num_local) {  // the shared rows are in token order
        if (got != wx) ++bad;
      } else {
        std::sort(got.begin(), got.end());
        std::sort(wx.begin(), wx.end());
        if (got != wx) ++bad;
      }
      rows += static_cast<int>(wx.size());
    }
    if (off[static_cast<size_t>(experts)] != rows || cnt[1] != rows) ++bad;
    // Tiles cover every row (shared ones included) exactly once, within one expert, at most tile_rows each.
    bad += tile_list_errors(tl, cnt[0], max_tiles, experts, tile_rows, off, rows);
    // Combine: k + 1 slots per token: its routed rows in ascending expert order, -1, and the shared row last.
    for (int t = 0; t < c.tokens; ++t) {
      std::vector<int> local;
      for (int j = 0; j < c.k; ++j) {
        const int x = ids[static_cast<size_t>(t) * static_cast<size_t>(c.k) + static_cast<size_t>(j)] - c.first;
        if (x >= 0 && x < c.num_local) local.push_back(x);
      }
      std::sort(local.begin(), local.end());
      const size_t base = static_cast<size_t>(t) * static_cast<size_t>(slots);
      for (int j = 0; j < c.k; ++j) {
        const int r = cb[base + static_cast<size_t>(j)];
        if (j >= static_cast<int>(local.size())) {
          if (r != -1) ++bad;
          continue;
        }
        const int x = local[static_cast<size_t>(j)];
        if (r < off[static_cast<size_t>(x)] || r >= off[static_cast<size_t>(x) + 1] || g[static_cast<size_t>(r)] != t)
          ++bad;
      }
      if (cb[base + static_cast<size_t>(c.k)] != off[static_cast<size_t>(c.num_local)] + t) ++bad;
    }
    report(bad == 0, tag, bad, 0);
  }
}

struct Weights {
  std::vector<std::unique_ptr<backend::Weight>> owned;
  std::vector<const backend::Weight*> gate, up, down;
  backend::SharedExpert shared;
};

// Graph nodes of one call captured on the backend's stream (it must run eagerly once first: tables, pools).
size_t captured_nodes(backend::Backend& be, const std::function<void()>& body) {
  cudaStream_t stream = backend::cuda_stream(be);
  cudaStreamSynchronize(stream);
  cudaGraph_t graph = nullptr;
  if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) return 0;
  body();
  if (cudaStreamEndCapture(stream, &graph) != cudaSuccess || graph == nullptr) return 0;
  size_t n = 0;
  cudaGraphGetNodes(graph, nullptr, &n);
  cudaGraphDestroy(graph);
  return n;
}

void check_moe_shared(Backend& cpu, Backend& gpu, Backend& gpu_emu) {
  struct Case {
    int experts, k, hidden, inter, tokens;
    bool same;
    int first = 0, num_local = 0;  // num_local 0: all experts
  };
  // T = 130 still routes on the device (130 * 4 <= 1024); T = 300 does not (host-sorted, shared expert unfused).
  // H, I in {2048, 3072}: the grouped GEMV is version 4 by default (mxfp4_gemv4_supports), else version 1.
  const std::vector<Case> cases = {
      {16, 4, 256, 128, 1, false},        {16, 4, 256, 128, 8, false}, {32, 4, 256, 96, 33, false},
      {32, 4, 128, 64, 130, false},       {16, 4, 128, 64, 33, true},  {32, 4, 128, 64, 130, true},
      {32, 4, 256, 128, 8, false, 8, 16}, {8, 4, 64, 32, 300, false},  {8, 4, 2048, 3072, 1, false},
      {8, 4, 2048, 3072, 33, false},      {8, 4, 3072, 2048, 8, true}};
  for (const auto& c : cases) {
    const int num_local = c.num_local > 0 ? c.num_local : c.experts;
    const size_t T = static_cast<size_t>(c.tokens), H = static_cast<size_t>(c.hidden), I = static_cast<size_t>(c.inter);
    const auto x = randn(T * H);
    const auto ids = make_ids(c.tokens, c.k, c.experts, c.same);
    std::vector<float> w(ids.size());
    for (auto& v : w) v = std::uniform_real_distribution<float>(0.1f, 2.0f)(g_rng);
    std::vector<Mx> mx;
    for (int e = 0; e < num_local + 1; ++e) {
      mx.push_back(random_mx(c.inter, c.hidden, 118, 124));
      mx.push_back(random_mx(c.inter, c.hidden, 118, 124));
      mx.push_back(random_mx(c.hidden, c.inter, 118, 124));
    }
    const std::string what =
        "moe_shared E=" + std::to_string(c.experts) + " k=" + std::to_string(c.k) + " H=" + std::to_string(c.hidden) +
        " I=" + std::to_string(c.inter) + " T=" + std::to_string(c.tokens) + (c.same ? " same" : " random") +
        (c.num_local > 0 ? " local " + std::to_string(c.first) + "+" + std::to_string(num_local) : std::string());
    auto load = [&](Backend& be) {
      Weights ws;
      for (size_t i = 0; i < mx.size(); ++i)
        ws.owned.push_back(be.upload_weight(
            {backend::WeightFormat::MXFP4, mx[i].rows, mx[i].k, mx[i].packed.data(), mx[i].scales.data()}));
      for (int e = 0; e < num_local; ++e) {
        ws.gate.push_back(ws.owned[static_cast<size_t>(3 * e)].get());
        ws.up.push_back(ws.owned[static_cast<size_t>(3 * e + 1)].get());
        ws.down.push_back(ws.owned[static_cast<size_t>(3 * e + 2)].get());
      }
      const size_t s = static_cast<size_t>(3 * num_local);
      ws.shared = {ws.owned[s].get(), ws.owned[s + 1].get(), ws.owned[s + 2].get()};
      return ws;
    };
    // fused: moe_experts with the shared expert; unfused: without it, then the model's old shared-expert ops.
    auto run = [&](Backend& be, bool fused, size_t* nodes = nullptr, size_t* routed_nodes = nullptr) {
      const Weights ws = load(be);
      auto dx = up(be, x);
      auto dids = up_i32(be, ids);
      auto dw = up(be, w);
      auto out = be.alloc(T * H), xq = be.alloc(T * H), g = be.alloc(T * I), u = be.alloc(T * I), sh = be.alloc(T * H);
      auto routed = [&] {
        be.moe_experts(dx->f32(), T, dids->i32(), dw->f32(), c.k, ws.gate, ws.up, ws.down, c.first, kSwiglu, true,
                       nullptr, out->f32());
      };
      auto body = [&] {
        if (fused) {
          be.moe_experts(dx->f32(), T, dids->i32(), dw->f32(), c.k, ws.gate, ws.up, ws.down, c.first, kSwiglu, true,
                         &ws.shared, out->f32());
          return;
        }
        routed();
        be.copy(dx->f32(), xq->f32(), T * H);
        be.qdq_mxfp4(xq->f32(), T, H);
        be.linear(xq->f32(), T, *ws.shared.gate, g->f32());
        be.linear(xq->f32(), T, *ws.shared.up, u->f32());
        be.swiglu_oai(g->f32(), u->f32(), g->f32(), T * I, kSwiglu);
        be.qdq_mxfp4(g->f32(), T, I);
        be.linear(g->f32(), T, *ws.shared.down, sh->f32());
        be.add(out->f32(), sh->f32(), out->f32(), T * H);
      };
      body();
      auto result = down(be, *out, T * H);
      if (nodes) {
        routed();
        *routed_nodes = captured_nodes(be, routed);
        *nodes = captured_nodes(be, body);
      }
      return result;
    };
    const bool device_routed = T * static_cast<size_t>(c.k) <= 1024;
    const auto want = run(cpu, true);
    check_bits(what + " CPU fused call == CPU unfused ops", run(cpu, false), want);
    size_t fused_nodes = 0, routed_nodes = 0, unfused_nodes = 0, routed_nodes2 = 0;
    const auto fused = run(gpu, true, device_routed ? &fused_nodes : nullptr, &routed_nodes);
    // (The unfused sequence is captured only where its shared linears are GEMVs, not cuBLAS: T <= 128.)
    const auto unfused = run(gpu, false, device_routed && T <= 128 ? &unfused_nodes : nullptr, &routed_nodes2);
    check_close(what + " native fused vs native unfused", fused, unfused, 2e-2);
    check_close(what + " native fused vs CPU", fused, want, 2e-2);
    check_close(what + " emulation vs CPU", run(gpu_emu, true), want, 2e-2);
    if (device_routed) {
      // The fused call is the routed experts' launches (a split-K memset more or less); the unfused one adds ~10
      // (printed: that the count tells the two apart).
      const bool ok = routed_nodes > 0 && fused_nodes > 0 && fused_nodes <= routed_nodes + 3;
      std::printf("     graph nodes: routed only %zu, fused %zu, unfused %zu\n", routed_nodes, fused_nodes,
                  unfused_nodes);
      report(ok, what + " fused into the routed launches (graph nodes)", static_cast<double>(fused_nodes),
             static_cast<double>(routed_nodes + 3));
      // The other device-routed variants: version-4 GEMV (the default where it applies; deterministic: twice the
      // same bits), version 1, version 2 (deterministic too), no PDL.
      const int tile_rows = cu::moe_tile_rows(T, c.k + 1, num_local + 1);
      if (cu::mxfp4_gemv4_supports(c.hidden, tile_rows) && cu::mxfp4_gemv4_supports(c.inter, tile_rows))
        check_bits(what + " native fused GEMV v4 twice", run(gpu, true), fused);
      setenv("MXLM_CUDA_MOE_GEMV", "1", 1);
      const auto v1 = run(gpu, true);
      unsetenv("MXLM_CUDA_MOE_GEMV");
      check_close(what + " native fused GEMV v1 vs CPU", v1, want, 2e-2);
      setenv("MXLM_CUDA_MOE_GEMV", "2", 1);
      const auto v2 = run(gpu, true);
      const auto v2_again = run(gpu, true);
      unsetenv("MXLM_CUDA_MOE_GEMV");
      check_close(what + " native fused GEMV v2 vs CPU", v2, want, 2e-2);
      check_bits(what + " native fused GEMV v2 twice", v2_again, v2);
      setenv("MXLM_CUDA_MOE_PLAIN", "1", 1);
      const auto plain = run(gpu, true);
      unsetenv("MXLM_CUDA_MOE_PLAIN");
      check_close(what + " native fused, small kernels without PDL, vs CPU", plain, want, 2e-2);
    }
  }
}

}  // namespace

MXLM_GPU_CHECK(moe_route_shared) { check_route_shared(); }
MXLM_GPU_CHECK(moe_shared) { check_moe_shared(env.cpu, env.gpu, env.gpu_emu); }
