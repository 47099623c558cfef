// (Named .cc so the CI benchmark glob bench/bench_*.cpp, built without CUDA, does not pick it up.)
// GPU benchmark of the CUDA backend, measured against the card's own ceilings in the same run: device copy
// bandwidth and the cuBLAS bf16 rate. Random data generated on the GPU (no downloads). Built and run by
// scripts/gpu_check (not part of the CI benchmark build). Prints a table at the end; `--quick` for fewer reps.
//
// Weight sets are rotated so that one call's weights are not in L2 from the previous call (H100 L2 = 50 MB).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_kernels.h"
#include "cuda_bench_util.h"

namespace {

using namespace mxlm;
namespace cu = mxlm::backend::cuda;
using namespace mxlm::cudabench;

void bench_gemv(cublasHandle_t h, const Ceilings& c, int sms, bool quick) {
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CB(cublasSetStream(h, stream));
  for (auto [n, k] : std::vector<std::pair<int, int>>{{3072, 6144}, {6144, 3072}}) {
    const size_t nk = static_cast<size_t>(n) * k;
    const size_t wbytes = nk / 2 + nk / 32;
    const int sets = 8;  // 8 x 10 MB > L2
    std::vector<uint8_t*> wq(sets), ws(sets);
    for (int s = 0; s < sets; ++s) {
      wq[static_cast<size_t>(s)] = static_cast<uint8_t*>(dalloc(nk / 2));
      ws[static_cast<size_t>(s)] = static_cast<uint8_t*>(dalloc(nk / 32));
      CK(cu::launch_fill_random_bytes(wq[static_cast<size_t>(s)], nk / 2, 10 + s, 0, 255, nullptr));
      CK(cu::launch_fill_random_bytes(ws[static_cast<size_t>(s)], nk / 32, 20 + s, 118, 124, nullptr));
    }
    const int bsets = 3;  // bf16 copies: 3 x 36 MB > L2
    std::vector<uint16_t*> wb(bsets);
    for (int s = 0; s < bsets; ++s) {
      wb[static_cast<size_t>(s)] = static_cast<uint16_t*>(dalloc(nk * 2));
      CK(cu::launch_dequant_mxfp4_bf16(wq[static_cast<size_t>(s)], ws[static_cast<size_t>(s)], static_cast<size_t>(n),
                                       static_cast<size_t>(k), wb[static_cast<size_t>(s)], nullptr));
    }
    auto* x = static_cast<uint16_t*>(dalloc(size_t{16} * k * 2));
    auto* y = static_cast<float*>(dalloc(size_t{16} * n * 4));
    CK(cu::launch_fill_random_bf16(x, size_t{16} * k, 5, 1.0f, nullptr));
    const size_t ws_floats = size_t{16} * static_cast<size_t>(n) * static_cast<size_t>(k / 128 + 1);
    const size_t counters_len = size_t{1} << 16;
    auto* workspace = static_cast<float*>(dalloc(ws_floats * 4));
    auto* counters = static_cast<int*>(dalloc(counters_len * 4));
    CK(cudaMemset(counters, 0, counters_len * 4));
    CK(cudaDeviceSynchronize());
    // Can a PDL launch be captured into a graph here? (Checked without aborting: the PDL variants are skipped
    // otherwise, and the backend is told to launch without PDL.)
    bool pdl_ok = true;
    {
      const cu::Mxfp4GemvPlan plan = cu::mxfp4_gemv_plan(n, k, 1, 1, sms);
      const cu::Mxfp4GemvGroup one{wq[0], ws[0], x, y, 1, n};
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      cudaError_t e = cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed);
      for (int i = 0; i < 2 && e == cudaSuccess; ++i)
        e = cu::launch_mxfp4_gemv2(one, n, k, plan, true, workspace, counters, stream);
      const cudaError_t e2 = cudaStreamEndCapture(stream, &graph);
      if (e == cudaSuccess) e = e2;
      if (e == cudaSuccess) e = cudaGraphInstantiate(&exec, graph, 0);
      if (e == cudaSuccess) e = cudaGraphLaunch(exec, stream);
      if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
      if (exec) cudaGraphExecDestroy(exec);
      if (graph) cudaGraphDestroy(graph);
      if (e != cudaSuccess) {
        pdl_ok = false;
        (void)cudaGetLastError();
        setenv("MXLM_CUDA_NO_PDL", "1", 1);
        row("PDL launch in a CUDA graph failed (%s): PDL variants skipped, MXLM_CUDA_NO_PDL=1", cudaGetErrorString(e));
      }
    }
    {
      // Ceiling for one call: stream-read the packed weights + scales of a set once (64 calls, rotated sets).
      auto* sink = static_cast<unsigned*>(dalloc(4));
      const double pms = graph_ms(
          stream,
          [&](int i) {
            CK(cu::launch_read_probe(wq[static_cast<size_t>(i % sets)], nk / 2, sink, sms, stream));
            CK(cu::launch_read_probe(ws[static_cast<size_t>(i % sets)], nk / 32, sink, sms, stream));
          },
          quick ? 5 : 15, 64);
      row("read probe N=%d K=%d (packed + scales, 2 streaming kernels): %6.2f us per call = %5.0f GB/s = %3.0f%% of copy",
          n, k, pms * 1e3, static_cast<double>(wbytes) / (pms * 1e-3) / 1e9,
          100.0 * static_cast<double>(wbytes) / (pms * 1e-3) / 1e9 / c.copy_gbs);
      const double pms1 = graph_ms(
          stream,
          [&](int i) { CK(cu::launch_read_probe(wq[static_cast<size_t>(i % sets)], nk / 2, sink, sms, stream)); },
          quick ? 5 : 15, 64);
      row("read probe N=%d K=%d (packed only, 1 kernel): %6.2f us per call = %5.0f GB/s = %3.0f%% of copy", n, k,
          pms1 * 1e3, static_cast<double>(nk / 2) / (pms1 * 1e-3) / 1e9,
          100.0 * static_cast<double>(nk / 2) / (pms1 * 1e-3) / 1e9 / c.copy_gbs);
      CK(cudaFree(sink));
    }
    for (int m : {1, 2, 4, 8, 12, 16}) {
      std::vector<cu::Mxfp4GemvGroup> g(sets);
      for (int s = 0; s < sets; ++s)
        g[static_cast<size_t>(s)] = {wq[static_cast<size_t>(s)], ws[static_cast<size_t>(s)], x, y, m, n};
      auto* dg = static_cast<cu::Mxfp4GemvGroup*>(dalloc(sizeof(cu::Mxfp4GemvGroup) * sets));
      CK(cudaMemcpy(dg, g.data(), sizeof(cu::Mxfp4GemvGroup) * sets, cudaMemcpyHostToDevice));
      const int split = cu::mxfp4_gemv_k_split(n, k, 1, sms);
      const double ms = graph_ms(
          stream,
          [&](int i) {
            if (split > 1) CK(cudaMemsetAsync(y, 0, static_cast<size_t>(m) * n * 4, stream));
            CK(cu::launch_mxfp4_gemv(dg + (i % sets), 1, m, n, k, split, stream));
          },
          quick ? 5 : 15, 64);
      const double bms = graph_ms(
          stream, [&](int i) { gemm_bf16(h, wb[static_cast<size_t>(i % bsets)], x, y, n, m, k); }, quick ? 5 : 15, 24);
      g_time_stream = stream;
      const double ms_stream = time_ms(
          [&](int i) {
            if (split > 1) CK(cudaMemsetAsync(y, 0, static_cast<size_t>(m) * n * 4, stream));
            CK(cu::launch_mxfp4_gemv(dg + (i % sets), 1, m, n, k, split, stream));
          },
          quick ? 5 : 15, 50);
      const double gbs = static_cast<double>(wbytes) / (ms * 1e-3) / 1e9;
      row("MXFP4 GEMV N=%d K=%d M=%2d split=%2d: %6.2f us (graph; %6.2f us stream-launched), %5.0f GB/s weights = "
          "%3.0f%% of copy; cuBLAS bf16 %6.2f us -> %.2fx",
          n, k, m, split, ms * 1e3, ms_stream * 1e3, gbs, 100.0 * gbs / c.copy_gbs, bms * 1e3, bms / ms);
      CK(cudaFree(dg));
      // Version 4 (the backend's choice at these sizes), PDL; at K <= 3072 its default 8-warp CTAs and the 4-warp ones
      // of the grouped MoE form.
      for (const char* warps : {"", "4"}) {
        if (!cu::mxfp4_gemv4_supports(k, m) || (warps[0] != '\0' && k > 3072)) continue;
        if (warps[0] != '\0') setenv("MXLM_CUDA_GEMV4_WARPS", warps, 1);
        const double ms4 = graph_ms(
            stream,
            [&](int i) {
              const cu::Mxfp4GemvGroup one{wq[static_cast<size_t>(i % sets)], ws[static_cast<size_t>(i % sets)], x, y,
                                           m, n};
              CK(cu::launch_mxfp4_gemv4(one, n, k, pdl_ok, stream));
            },
            quick ? 5 : 15, 64);
        unsetenv("MXLM_CUDA_GEMV4_WARPS");
        const double gbs4 = static_cast<double>(wbytes) / (ms4 * 1e-3) / 1e9;
        row("GEMV4 N=%d K=%d M=%2d pdl=%d%s: %6.2f us (graph), %5.0f GB/s = %3.0f%% of copy (target 80%%); %.2fx cuBLAS "
            "bf16 (target 3x), %.2fx v1",
            n, k, m, pdl_ok ? 1 : 0, warps[0] != '\0' ? " 4-warp CTAs" : "", ms4 * 1e3, gbs4,
            100.0 * gbs4 / c.copy_gbs, bms / ms4, ms / ms4);
      }
      // Diagnostic: version 4 on one weight set (10 MB, resident in L2 after the first call): how fast the kernel's SM
      // side goes when DRAM is out of the way.
      if (cu::mxfp4_gemv4_supports(k, m)) {
        const double ms_l2 = graph_ms(
            stream,
            [&](int) {
              const cu::Mxfp4GemvGroup one{wq[0], ws[0], x, y, m, n};
              CK(cu::launch_mxfp4_gemv4(one, n, k, pdl_ok, stream));
            },
            quick ? 5 : 15, 64);
        const double gbs_l2 = static_cast<double>(wbytes) / (ms_l2 * 1e-3) / 1e9;
        row("GEMV4 N=%d K=%d M=%2d pdl=%d, weights resident in L2 (diagnostic): %6.2f us (graph), %5.0f GB/s = %3.0f%% "
            "of DRAM copy",
            n, k, m, pdl_ok ? 1 : 0, ms_l2 * 1e3, gbs_l2, 100.0 * gbs_l2 / c.copy_gbs);
      }
      // Version 2 (cp.async slice, PDL, memset-free deterministic split-K): CTA size, CTAs per SM, PDL, variant
      // flags (1 row-contiguous copies, 8 math per landed group; diagnostics 2 no math, 4 no activations).
      double best = 1e30;
      std::string best_name;
      struct Variant {
        int warps, cps, pdl, flags;
      };
      const std::vector<Variant> variants = {{8, 2, 1, 9},  {8, 2, 1, 0}, {8, 2, 1, 1},  {8, 2, 1, 8},
                                             {8, 2, 0, 9},  {4, 4, 1, 9}, {8, 6, 1, 9},  {4, 2, 1, 9},
                                             {8, 2, 1, 11}, {8, 2, 1, 13}, {8, 2, 1, 15}};
      // MXLM_BENCH_GEMV2=0 leaves version 2's sweep out (a shorter device run).
      const char* v2_env = std::getenv("MXLM_BENCH_GEMV2");
      const bool sweep_v2 = v2_env == nullptr || std::strcmp(v2_env, "0") != 0;
      for (const Variant& v : variants) {
        if (!sweep_v2) break;
        const bool pdl = v.pdl != 0;
        if (pdl && !pdl_ok) continue;
        cu::Mxfp4GemvConfig cfg;
        cfg.warps = v.warps;
        cfg.ctas_per_sm = v.cps;
        cfg.flags = v.flags;
        const cu::Mxfp4GemvPlan plan = cu::mxfp4_gemv_plan(n, k, 1, m, sms, cfg);
        if (cu::mxfp4_gemv_workspace_floats(plan, n, m) > ws_floats || cu::mxfp4_gemv_counters(plan, 1) > counters_len) {
          row("GEMV2 N=%d K=%d M=%2d: workspace too small for warps=%d cps=%d", n, k, m, v.warps, v.cps);
          continue;
        }
        auto launch2 = [&](int i) {
          const cu::Mxfp4GemvGroup one{wq[static_cast<size_t>(i % sets)], ws[static_cast<size_t>(i % sets)], x, y, m,
                                       n};
          CK(cu::launch_mxfp4_gemv2(one, n, k, plan, pdl, workspace, counters, stream));
        };
        const double ms2 = graph_ms(stream, launch2, quick ? 5 : 15, 64);
        const double gbs2 = static_cast<double>(wbytes) / (ms2 * 1e-3) / 1e9;
        const bool diagnostic = (v.flags & 6) != 0;
        row("GEMV2 N=%d K=%d M=%2d warps=%d cps=%d pdl=%d flags=%2d%s splits=%2d cta_chunks=%2d smem=%3zuK: %6.2f us "
            "(graph), %5.0f GB/s = %3.0f%% of copy; %.2fx cuBLAS bf16, %.2fx v1",
            n, k, m, v.warps, v.cps, v.pdl, v.flags, diagnostic ? " (diagnostic)" : "", plan.splits,
            plan.chunks_per_cta, plan.smem_bytes >> 10, ms2 * 1e3, gbs2, 100.0 * gbs2 / c.copy_gbs, bms / ms2, ms / ms2);
        if (!diagnostic && ms2 < best) {
          best = ms2;
          best_name = "warps=" + std::to_string(v.warps) + " cps=" + std::to_string(v.cps) +
                      " pdl=" + std::to_string(v.pdl) + " flags=" + std::to_string(v.flags);
        }
      }
      const double best_gbs = static_cast<double>(wbytes) / (best * 1e-3) / 1e9;
      if (sweep_v2)
        row("GEMV2 best N=%d K=%d M=%2d (%s): %6.2f us = %3.0f%% of copy (target 80%%), %.2fx cuBLAS bf16 (target 3x), "
          "v1 %6.2f us",
          n, k, m, best_name.c_str(), best * 1e3, 100.0 * best_gbs / c.copy_gbs, bms / best, ms * 1e3);
    }
    // Large M: our path (dequantize to bf16 + cuBLAS) against cuBLAS on resident bf16 weights.
    const int M = 4096;
    auto* xl = static_cast<uint16_t*>(dalloc(size_t{2} * M * k));
    auto* yl = static_cast<float*>(dalloc(size_t{4} * M * n));
    CK(cu::launch_fill_random_bf16(xl, size_t{1} * M * k, 6, 1.0f, nullptr));
    auto* tmp = static_cast<uint16_t*>(dalloc(nk * 2));
    const double flops = 2.0 * M * static_cast<double>(nk);
    const double ref = graph_ms(
        stream, [&](int i) { gemm_bf16(h, wb[static_cast<size_t>(i % bsets)], xl, yl, n, M, k); }, quick ? 5 : 10, 4);
    const double ours = graph_ms(
        stream,
        [&](int i) {
          CK(cu::launch_dequant_mxfp4_bf16(wq[static_cast<size_t>(i % sets)], ws[static_cast<size_t>(i % sets)],
                                           static_cast<size_t>(n), static_cast<size_t>(k), tmp, stream));
          gemm_bf16(h, tmp, xl, yl, n, M, k);
        },
        quick ? 5 : 10, 4);
    row("MXFP4 GEMM N=%d K=%d M=4096 (dequant->bf16 + cuBLAS): %.3f ms %.0f TFLOP/s; cuBLAS bf16 %.3f ms %.0f TFLOP/s "
        "-> %.0f%%",
        n, k, ours, flops / (ours * 1e-3) / 1e12, ref, flops / (ref * 1e-3) / 1e12, 100.0 * ref / ours);
    // Medium M (the shared expert and the dense MXFP4 linears of a decode batch): version-1 token tiles of 16 in
    // one launch (the native linear up to kMxfp4GemvMaxTokens) against dequantize + cuBLAS, same weights.
    for (int mm : {32, 64, 128, 192, 256}) {
      const int split = cu::mxfp4_gemv_k_split(n, k, cu::mxfp4_gemv_token_tiles(mm), sms);
      const double tiled = graph_ms(
          stream,
          [&](int i) {
            if (split > 1) CK(cudaMemsetAsync(yl, 0, size_t{4} * mm * n, stream));
            const cu::Mxfp4GemvGroup g{wq[static_cast<size_t>(i % sets)], ws[static_cast<size_t>(i % sets)], xl, yl, mm,
                                       n};
            CK(cu::launch_mxfp4_gemv_one(g, n, k, split, stream));
          },
          quick ? 5 : 10, 16);
      const double deq = graph_ms(
          stream,
          [&](int i) {
            CK(cu::launch_dequant_mxfp4_bf16(wq[static_cast<size_t>(i % sets)], ws[static_cast<size_t>(i % sets)],
                                             static_cast<size_t>(n), static_cast<size_t>(k), tmp, stream));
            gemm_bf16(h, tmp, xl, yl, n, mm, k);
          },
          quick ? 5 : 10, 16);
      const double bf = graph_ms(
          stream, [&](int i) { gemm_bf16(h, wb[static_cast<size_t>(i % bsets)], xl, yl, n, mm, k); }, quick ? 5 : 10, 16);
      row("MXFP4 linear N=%d K=%d M=%3d: token-tiled GEMV %7.2f us (%4.0f%% of copy), dequant + cuBLAS %7.2f us, "
          "cuBLAS on bf16 weights %7.2f us -> tiled %.2fx dequant%s",
          n, k, mm, tiled * 1e3, 100.0 * static_cast<double>(wbytes) / (tiled * 1e-3) / 1e9 / c.copy_gbs, deq * 1e3,
          bf * 1e3, deq / tiled, mm <= cu::kMxfp4GemvMaxTokens ? " (backend: tiled)" : " (backend: dequant)");
    }
    for (auto* p : wq) CK(cudaFree(p));
    for (auto* p : ws) CK(cudaFree(p));
    for (auto* p : wb) CK(cudaFree(p));
    for (void* p : {static_cast<void*>(x), static_cast<void*>(y), static_cast<void*>(xl), static_cast<void*>(yl),
                    static_cast<void*>(tmp), static_cast<void*>(workspace), static_cast<void*>(counters)})
      CK(cudaFree(p));
  }
  CB(cublasSetStream(h, nullptr));
  g_time_stream = nullptr;
  CK(cudaStreamDestroy(stream));
}

// MXLM_BENCH_MOE_TOKENS: comma-separated tokens per step for the MoE rows (default 1,8,32,128); one size alone keeps
// a profiler's launch count small.
std::vector<int> moe_token_counts() {
  const char* env = std::getenv("MXLM_BENCH_MOE_TOKENS");
  if (env == nullptr || env[0] == '\0') return {1, 8, 32, 128};
  std::vector<int> counts;
  for (const char* p = env; *p != '\0';) {
    char* end = nullptr;
    const long v = std::strtol(p, &end, 10);
    if (end == p || v < 1 || v > 4096) {
      std::fprintf(stderr, "MXLM_BENCH_MOE_TOKENS: expected comma-separated counts in 1..4096, got \"%s\"\n", env);
      std::exit(2);
    }
    counts.push_back(static_cast<int>(v));
    p = *end == ',' ? end + 1 : end;
  }
  return counts;
}

// One full-size MoE layer through the backend (router + routed experts + shared expert), both MoE paths. The "MoE
// layer" rows pass the shared expert to moe_experts (native: fused into the routed launches); one row per T runs it
// unfused as the model did before (8 ops after the routed experts), the baseline of the same run.
void bench_moe(const Ceilings& c, bool quick) {
  const int E = 128, K = 4, H = 6144, I = 3072;
  std::vector<std::unique_ptr<backend::Weight>> w1, w3, w2;
  std::vector<const backend::Weight*> p1, p3, p2;
  for (int e = 0; e < E; ++e) {
    w1.push_back(backend::make_random_cuda_weight(backend::WeightFormat::MXFP4, I, H, 1000 + 3 * e));
    w3.push_back(backend::make_random_cuda_weight(backend::WeightFormat::MXFP4, I, H, 1001 + 3 * e));
    w2.push_back(backend::make_random_cuda_weight(backend::WeightFormat::MXFP4, H, I, 1002 + 3 * e));
    p1.push_back(w1.back().get());
    p3.push_back(w3.back().get());
    p2.push_back(w2.back().get());
  }
  auto sg = backend::make_random_cuda_weight(backend::WeightFormat::MXFP4, I, H, 7);
  auto su = backend::make_random_cuda_weight(backend::WeightFormat::MXFP4, I, H, 8);
  auto sd = backend::make_random_cuda_weight(backend::WeightFormat::MXFP4, H, I, 9);
  auto router = backend::make_random_cuda_weight(backend::WeightFormat::F32, E, H, 10);
  const backend::SharedExpert shared_expert{sg.get(), su.get(), sd.get()};
  const double expert_bytes = 3.0 * (static_cast<double>(I) * H / 2 + static_cast<double>(I) * H / 32);
  std::map<int, double> native_ms;   // per T: graph time (device routing) or wall time
  std::map<int, double> experts_ms;  // per T: routed experts alone, graph time
  for (auto mode : {backend::MoeBackend::Native, backend::MoeBackend::Emulation}) {
    backend::CudaOptions options;
    options.moe_backend = mode;
    auto be = backend::make_cuda_backend(options);
    for (int T : moe_token_counts()) {
      std::mt19937 rng(T);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      std::vector<float> hx(static_cast<size_t>(T) * H);
      for (auto& v : hx) v = nd(rng);
      auto x = be->alloc(hx.size());
      be->upload(*x, 0, hx.data(), hx.size());
      auto bias = be->alloc(E);
      auto ids = be->alloc(static_cast<size_t>(T) * K), wts = be->alloc(static_cast<size_t>(T) * K);
      auto out = be->alloc(hx.size()), shared = be->alloc(hx.size());
      auto g = be->alloc(static_cast<size_t>(T) * I), u = be->alloc(static_cast<size_t>(T) * I);
      auto xq = be->alloc(hx.size()), aq = be->alloc(static_cast<size_t>(T) * I);
      float sink = 0;
      // The layer with the shared expert handed to moe_experts (fused where the backend can).
      auto layer_ops = [&]() {
        be->router(x->f32(), static_cast<size_t>(T), *router, bias->f32(), K, 2.0f, ids->i32(), wts->f32());
        be->moe_experts(x->f32(), static_cast<size_t>(T), ids->i32(), wts->f32(), K, p1, p3, p2, 0, {1.702f, 7.0f},
                        true, &shared_expert, out->f32());
      };
      // Baseline: the routed experts, then the shared expert as the model ran it before (QDQ before each MXFP4
      // linear).
      auto layer_ops_unfused = [&]() {
        be->router(x->f32(), static_cast<size_t>(T), *router, bias->f32(), K, 2.0f, ids->i32(), wts->f32());
        be->moe_experts(x->f32(), static_cast<size_t>(T), ids->i32(), wts->f32(), K, p1, p3, p2, 0, {1.702f, 7.0f},
                        true, nullptr, out->f32());
        be->copy(x->f32(), xq->f32(), hx.size());
        be->qdq_mxfp4(xq->f32(), static_cast<size_t>(T), H);
        be->linear(xq->f32(), static_cast<size_t>(T), *sg, g->f32());
        be->linear(xq->f32(), static_cast<size_t>(T), *su, u->f32());
        be->swiglu_oai(g->f32(), u->f32(), aq->f32(), static_cast<size_t>(T) * I, {1.702f, 7.0f});
        be->qdq_mxfp4(aq->f32(), static_cast<size_t>(T), I);
        be->linear(aq->f32(), static_cast<size_t>(T), *sd, shared->f32());
        be->add(out->f32(), shared->f32(), out->f32(), hx.size());
      };
      auto layer = [&]() {
        layer_ops();
        be->download(*out, 0, &sink, 1);
      };
      const double ms = wall_ms(layer, quick ? 5 : 15);
      // Native with tokens * k <= 1024 routes on the device: the whole layer is capturable (a CUDA graph of 4
      // layers, as a graph-captured decode step would run it).
      const bool graphable = mode == backend::MoeBackend::Native && T * K <= 1024;
      double gms = 0.0, unfused_ms = 0.0, fused_default = 0.0;
      if (graphable) {
        unfused_ms = graph_ms(backend::cuda_stream(*be), [&](int) { layer_ops_unfused(); }, quick ? 5 : 10, 4);
        row("MoE layer native T=%3d shared expert unfused (baseline: 8 ops after the routed experts): %7.3f ms graph",
            T, unfused_ms);
        // Routed-expert GEMV: the backend's default (version 4 where it applies), version 1 over device-built
        // lists (MXLM_CUDA_MOE_GEMV=1), version 2 with these plans (MXLM_CUDA_GEMV_CONFIG =
        // warps,ctas_per_sm,k_split); the default first, the best kept.
        // MXLM_CUDA_MOE_GEMV = versions for gate/up and down ("14": v1 gate/up, v4 down).
        for (const char* config : {"default", "v1", "v4", "14", "41", "", "8,4,0,0"}) {
          const bool is_default = std::strcmp(config, "default") == 0, v1 = std::strcmp(config, "v1") == 0;
          const bool v4 = std::strcmp(config, "v4") == 0, mixed = config[0] == '1' || config[0] == '4';
          const bool v2 = !is_default && !v1 && !v4 && !mixed;
          if (v1) setenv("MXLM_CUDA_MOE_GEMV", "1", 1);
          if (v4) setenv("MXLM_CUDA_MOE_GEMV", "4", 1);
          if (mixed) setenv("MXLM_CUDA_MOE_GEMV", config, 1);
          if (v2) {
            setenv("MXLM_CUDA_MOE_GEMV", "2", 1);
            setenv("MXLM_CUDA_GEMV_CONFIG", config, 1);
          }
          const double t = graph_ms(backend::cuda_stream(*be), [&](int) { layer_ops(); }, quick ? 5 : 10, 4);
          unsetenv("MXLM_CUDA_MOE_GEMV");
          unsetenv("MXLM_CUDA_GEMV_CONFIG");
          row("MoE layer native T=%3d routed GEMV %s%s: %7.3f ms graph", T,
              is_default ? "default" : (v2 ? "v2 config " : (mixed ? "gate/up + down versions " : "")),
              is_default ? "" : (v2 && !config[0] ? "default" : config), t);
          if (gms == 0.0 || t < gms) gms = t;
          if (is_default) fused_default = t;
        }
        for (const char* rows : {"8", "16"}) {  // GEMV tile rows forced
          setenv("MXLM_CUDA_MOE_TILE_ROWS", rows, 1);
          const double t = graph_ms(backend::cuda_stream(*be), [&](int) { layer_ops(); }, quick ? 5 : 10, 4);
          row("MoE layer native T=%3d routed GEMV default, tiles of %s rows: %7.3f ms graph", T, rows, t);
          if (t < gms) gms = t;
        }
        unsetenv("MXLM_CUDA_MOE_TILE_ROWS");
        // Version 4's CTAs at K <= 3072 (the down projection): 4 warps (default) or 8.
        setenv("MXLM_CUDA_GEMV4_WARPS", "8", 1);
        const double w8 = graph_ms(backend::cuda_stream(*be), [&](int) { layer_ops(); }, quick ? 5 : 10, 4);
        unsetenv("MXLM_CUDA_GEMV4_WARPS");
        row("MoE layer native T=%3d routed GEMV default, version 4 with 8-warp CTAs at K <= 3072: %7.3f ms graph", T, w8);
        if (w8 < gms) gms = w8;
        setenv("MXLM_CUDA_MOE_PLAIN", "1", 1);  // the small MoE kernels without PDL
        const double plain = graph_ms(backend::cuda_stream(*be), [&](int) { layer_ops(); }, quick ? 5 : 10, 4);
        unsetenv("MXLM_CUDA_MOE_PLAIN");
        row("MoE layer native T=%3d small kernels without PDL: %7.3f ms graph", T, plain);
        const double router_ms = graph_ms(
            backend::cuda_stream(*be),
            [&](int) {
              be->router(x->f32(), static_cast<size_t>(T), *router, bias->f32(), K, 2.0f, ids->i32(), wts->f32());
            },
            quick ? 5 : 10, 4);
        row("MoE router alone T=%3d (f32 [%d, %d] logits + top-k): %7.3f ms graph", T, E, H, router_ms);
        // The routed experts alone (device routing), and the host-sorted path of before as the baseline.
        auto experts = [&]() {
          be->moe_experts(x->f32(), static_cast<size_t>(T), ids->i32(), wts->f32(), K, p1, p3, p2, 0, {1.702f, 7.0f},
                          true, nullptr, out->f32());
        };
        const double eg = graph_ms(backend::cuda_stream(*be), [&](int) { experts(); }, quick ? 5 : 10, 4);
        setenv("MXLM_CUDA_MOE_HOST", "1", 1);
        const double eh = wall_ms(
            [&]() {
              experts();
              be->download(*out, 0, &sink, 1);
            },
            quick ? 5 : 10);
        unsetenv("MXLM_CUDA_MOE_HOST");
        const double eh_dev = wall_ms(
            [&]() {
              experts();
              be->download(*out, 0, &sink, 1);
            },
            quick ? 5 : 10);
        experts_ms[T] = eg;
        row("MoE routed experts only T=%3d: device routing %7.3f ms graph (%7.3f ms wall); host-sorted path %7.3f ms "
            "wall",
            T, eg, eh_dev, eh);
      }
      std::vector<float> idf(static_cast<size_t>(T) * K);
      be->download(*ids, 0, idf.data(), idf.size());
      std::set<int32_t> distinct;
      for (float f : idf) {
        int32_t v;
        std::memcpy(&v, &f, 4);
        distinct.insert(v);
      }
      const double bytes = (static_cast<double>(distinct.size()) + 1.0) * expert_bytes + 4.0 * E * H;
      const double roof_ms = bytes / (c.copy_gbs * 1e9) * 1e3;  // copy GB/s counts read + write: a read-only floor
      const bool native = mode == backend::MoeBackend::Native;
      if (native) native_ms[T] = graphable ? gms : ms;
      if (native && experts_ms.count(T)) {
        const double eb = static_cast<double>(distinct.size()) * expert_bytes;
        const double eroof = eb / (c.copy_gbs * 1e9) * 1e3;
        row("MoE routed experts only T=%3d: %3zu experts = %6.1f MB, roofline %.3f ms -> %3.0f%% of roofline", T,
            distinct.size(), eb / 1e6, eroof, 100.0 * eroof / experts_ms[T]);
      }
      const double emu_ratio = !native && native_ms.count(T) ? ms / native_ms[T] : 0.0;
      row("MoE layer %-9s T=%3d: %7.3f ms wall (synced)%s, %3zu experts + shared = %6.1f MB, roofline %.3f ms -> %3.0f%% "
          "of roofline%s",
          native ? "native" : "emulation", T, ms,
          graphable ? (", " + std::to_string(gms).substr(0, 5) + " ms graph").c_str() : "", distinct.size(),
          bytes / 1e6, roof_ms, 100.0 * roof_ms / (graphable ? gms : ms),
          emu_ratio > 0 ? (", native is " + std::to_string(emu_ratio).substr(0, 5) + "x faster").c_str() : "");
      if (unfused_ms > 0)  // both with the default GEMV settings
        row("MoE layer native T=%3d: shared expert fused %7.3f ms (%3.0f%% of roofline), unfused %7.3f ms (%3.0f%% of "
            "roofline) -> fused %.2fx faster",
            T, fused_default, 100.0 * roof_ms / fused_default, unfused_ms, 100.0 * roof_ms / unfused_ms,
            unfused_ms / fused_default);
    }
  }
}

void bench_attention(const Ceilings& c, bool quick) {
  auto be = backend::make_cuda_backend({});
  const int heads = 64, kvh = 4, d = 128, bs = 128;
  const size_t width = static_cast<size_t>(kvh) * d;
  for (int ctx : {2048, 8192, 32768, 65536}) {
    const int pages = ctx / bs;
    auto kc = be->alloc(static_cast<size_t>(pages) * bs * width),
         vc = be->alloc(static_cast<size_t>(pages) * bs * width);
    CK(cu::launch_fill_random_f32(kc->f32(), kc->size(), 11, 1.0f, nullptr));
    CK(cu::launch_fill_random_f32(vc->f32(), vc->size(), 12, 1.0f, nullptr));
    CK(cudaDeviceSynchronize());
    std::vector<int32_t> table(static_cast<size_t>(pages));
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(ctx));
    backend::AttentionBatch batch;
    batch.block_size = bs;
    batch.num_tokens = 1;
    batch.sequences.push_back({0, 1, ctx - 1, table});
    batch.positions = {ctx - 1};
    batch.slots = {static_cast<int64_t>(table.back()) * bs + (ctx - 1) % bs};
    auto q = be->alloc(static_cast<size_t>(heads) * d), out = be->alloc(static_cast<size_t>(heads) * d);
    CK(cu::launch_fill_random_f32(q->f32(), q->size(), 13, 1.0f, nullptr));
    const backend::AttentionShape shape{heads, kvh, d, 1.0f / std::sqrt(static_cast<float>(d))};
    float sink = 0;
    cudaStream_t bs_stream = backend::cuda_stream(*be);
    const double wall = wall_ms(
        [&] {
          be->attention(q->f32(), batch, shape, kc->f32(), vc->f32(), out->f32());
          be->download(*out, 0, &sink, 1);
        },
        quick ? 5 : 20);
    const double ms = graph_ms(
        bs_stream, [&](int) { be->attention(q->f32(), batch, shape, kc->f32(), vc->f32(), out->f32()); },
        quick ? 5 : 15, 20);
    const double kv = 2.0 * ctx * static_cast<double>(width) * 4;
    row("decode attention dense  ctx=%5d (f32 KV, 64/4 heads, d=128): %7.1f us graph (%6.1f us wall, synced), KV %6.1f "
        "MB -> %5.0f GB/s = %3.0f%% of copy",
        ctx, ms * 1e3, wall * 1e3, kv / 1e6, kv / (ms * 1e-3) / 1e9, 100.0 * kv / (ms * 1e-3) / 1e9 / c.copy_gbs);
    // Sparse: 16 selected blocks per KV head (M3: sparse_topk_blocks = 16, local block forced).
    const int topk = 16;
    std::vector<int32_t> blocks(static_cast<size_t>(kvh) * topk);
    std::mt19937 rng(ctx + 1);
    for (int h = 0; h < kvh; ++h) {
      std::vector<int32_t> all(static_cast<size_t>(pages));
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end() - 1, rng);
      blocks[static_cast<size_t>(h) * topk] = pages - 1;
      for (int j = 1; j < topk; ++j) blocks[static_cast<size_t>(h) * topk + j] = all[static_cast<size_t>(j - 1)];
    }
    auto db = be->alloc(blocks.size());
    be->upload(*db, 0, reinterpret_cast<const float*>(blocks.data()), blocks.size());
    const double sms = graph_ms(
        bs_stream,
        [&](int) { be->sparse_attention(q->f32(), batch, shape, kc->f32(), vc->f32(), db->i32(), topk, out->f32()); },
        quick ? 5 : 15, 20);
    const double skv = 2.0 * std::min(ctx, topk * bs) * static_cast<double>(width) * 4;
    row("decode attention sparse ctx=%5d (16 blocks of 128):           %7.1f us graph, KV %6.1f MB -> %5.0f GB/s", ctx,
        sms * 1e3, skv / 1e6, skv / (sms * 1e-3) / 1e9);
  }
}

// bf16-weight GEMV for decode-sized steps (launch_bf16_gemv, f32 activations) against cuBLAS bf16 on the same
// weights, with and without the f32 -> bf16 conversion kernel the cuBLAS path of linear() runs first. Shapes: a
// MiniMax-M3 decode step's q / o projections, its k / v projection, and the lm_head. Weight sets rotated past L2.
void bench_bf16_gemv(cublasHandle_t h, const Ceilings& c, int sms, bool quick) {
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CB(cublasSetStream(h, stream));
  g_time_stream = stream;
  struct Shape {
    int n, k;
    const char* what;
  };
  for (const Shape& s : {Shape{8192, 6144, "q_proj"}, Shape{6144, 8192, "o_proj"}, Shape{512, 6144, "k/v_proj"},
                         Shape{200064, 6144, "lm_head"}}) {
    const size_t wbytes = size_t{2} * s.n * s.k;
    const int sets = static_cast<int>(std::max<size_t>(1, std::min<size_t>(16, (size_t{160} << 20) / wbytes)));
    std::vector<uint16_t*> ws;
    for (int i = 0; i < sets; ++i) {
      ws.push_back(static_cast<uint16_t*>(dalloc(wbytes)));
      CK(cu::launch_fill_random_bf16(ws.back(), wbytes / 2, 50 + i, 0.05f, stream));
    }
    const int kMaxM = cu::kBf16GemvMaxTokens;
    auto* x = static_cast<float*>(dalloc(size_t{4} * kMaxM * s.k));
    auto* xb = static_cast<uint16_t*>(dalloc(size_t{2} * kMaxM * s.k));
    auto* y = static_cast<float*>(dalloc(size_t{4} * kMaxM * s.n));
    CK(cu::launch_fill_random_f32(x, size_t{1} * kMaxM * s.k, 9, 1.0f, stream));
    const int inner = s.n > 100000 ? 4 : 32;
    for (int m : {1, 2, 4, 8}) {
      const double ours = graph_ms(
          stream, [&](int i) { CK(cu::launch_bf16_gemv(ws[static_cast<size_t>(i % sets)], x, y, s.n, m, s.k, sms, true, stream)); },
          quick ? 5 : 15, inner);
      const double cublas = graph_ms(
          stream, [&](int i) { gemm_bf16(h, ws[static_cast<size_t>(i % sets)], xb, y, s.n, m, s.k); }, quick ? 5 : 15,
          inner);
      const double cublas_conv = graph_ms(
          stream,
          [&](int i) {
            CK(cu::launch_f32_to_bf16(x, xb, static_cast<size_t>(m) * s.k, stream));
            gemm_bf16(h, ws[static_cast<size_t>(i % sets)], xb, y, s.n, m, s.k);
          },
          quick ? 5 : 15, inner);
      const double gbs = static_cast<double>(wbytes) / (ours * 1e-3) / 1e9;
      row("bf16 GEMV %-8s N=%6d K=%d M=%d: %8.2f us (graph) = %3.0f%% of copy; cuBLAS %8.2f us (%3.0f%%), with the "
          "conversion %8.2f us -> %.2fx",
          s.what, s.n, s.k, m, ours * 1e3, 100.0 * gbs / c.copy_gbs, cublas * 1e3,
          100.0 * static_cast<double>(wbytes) / (cublas * 1e-3) / 1e9 / c.copy_gbs, cublas_conv * 1e3,
          cublas_conv / ours);
    }
    for (auto* p : ws) CK(cudaFree(p));
    CK(cudaFree(x));
    CK(cudaFree(xb));
    CK(cudaFree(y));
  }
  CB(cublasSetStream(h, nullptr));
  g_time_stream = nullptr;
  CK(cudaStreamDestroy(stream));
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  if (!backend::cuda_device_available()) {
    std::printf("SKIP: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  cublasHandle_t h;
  CB(cublasCreate(&h));
  const Ceilings c = measure_ceilings(h, quick);
  // MXLM_BENCH_SECTIONS: comma-separated subset of gemv, bf16, attention, moe (default all).
  const char* sections = std::getenv("MXLM_BENCH_SECTIONS");
  auto want = [&](const char* s) { return sections == nullptr || std::strstr(sections, s) != nullptr; };
  if (want("gemv")) bench_gemv(h, c, prop.multiProcessorCount, quick);
  if (want("bf16")) bench_bf16_gemv(h, c, prop.multiProcessorCount, quick);
  if (want("attention")) bench_attention(c, quick);
  if (want("moe")) bench_moe(c, quick);
  cublasDestroy(h);
  print_summary(prop.name);
  return 0;
}
