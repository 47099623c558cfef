// (Named .cc so the CI benchmark glob bench/bench_*.cpp, built without CUDA, does not pick it up.)
// GPU benchmark of decoding (issue #8): decode attention against copy bandwidth, the launch overhead of a decode
// step (eager vs CUDA graph), and end-to-end decode tokens/s of the real MiniMax-M3 config with 4 layers and
// random weights made on the GPU (`mxlm bench decode --load-format dummy`'s driver) against the weight-bytes
// roofline. Ceilings measured in the same process. `--quick` for fewer reps; `--config FILE` for another
// config.json (default: tests/fixtures/configs/minimax_m3_mxfp4_quark.json, the real config + AMD's MXFP4 exclude
// list).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_kernels.h"
#include "cuda_bench_util.h"
#include "engine/decode_bench.h"
#include "io/model_config.h"
#include "model/dummy_weights.h"
#include "model/m3_model.h"

namespace {

using namespace mxlm;
namespace cu = mxlm::backend::cuda;
using namespace mxlm::cudabench;

// Decode attention of `batch` sequences at `ctx` tokens each (64 query / 4 KV heads of 128, MiniMax-M3, f32 KV in
// 128-token pages): the split-K tensor-core kernel the backend uses and the previous SIMT kernel, both launched
// directly on the same device rows (graph time per call), and KV bytes read per second against copy bandwidth.
void bench_attention(const Ceilings& c, int sms, bool quick) {
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const int heads = 64, kvh = 4, d = 128, bs = 128, topk = 16;
  const size_t width = static_cast<size_t>(kvh) * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int batch : {1, 8, 32}) {
    for (int ctx : {2048, 8192, 32768, 65536}) {
      if (static_cast<double>(batch) * ctx > 32.0 * 32768) continue;  // <= 4.3 GB of KV
      const int per_seq = ctx / bs, pages = per_seq * batch;
      auto* kc = static_cast<float*>(dalloc(static_cast<size_t>(pages) * bs * width * 4));
      auto* vc = static_cast<float*>(dalloc(static_cast<size_t>(pages) * bs * width * 4));
      CK(cu::launch_fill_random_f32(kc, static_cast<size_t>(pages) * bs * width, 11, 1.0f, stream));
      CK(cu::launch_fill_random_f32(vc, static_cast<size_t>(pages) * bs * width, 12, 1.0f, stream));
      // The same cache in bf16 (the CUDA backend's kv_cache_dtype BF16): half the bytes.
      auto* kb = static_cast<uint16_t*>(dalloc(static_cast<size_t>(pages) * bs * width * 2));
      auto* vb = static_cast<uint16_t*>(dalloc(static_cast<size_t>(pages) * bs * width * 2));
      CK(cu::launch_fill_random_bf16(kb, static_cast<size_t>(pages) * bs * width, 14, 1.0f, stream));
      CK(cu::launch_fill_random_bf16(vb, static_cast<size_t>(pages) * bs * width, 15, 1.0f, stream));
      std::vector<int32_t> tables(static_cast<size_t>(pages)), pos(static_cast<size_t>(batch), ctx - 1),
          offs(static_cast<size_t>(batch));
      std::iota(tables.begin(), tables.end(), 0);
      std::shuffle(tables.begin(), tables.end(), std::mt19937(ctx + batch));
      for (int s = 0; s < batch; ++s) offs[static_cast<size_t>(s)] = s * per_seq;
      // Sparse: each (sequence, KV head) picks 16 random blocks, the local one first.
      std::vector<int32_t> blocks(static_cast<size_t>(batch) * kvh * topk);
      std::mt19937 rng(ctx);
      for (size_t i = 0; i < blocks.size(); i += topk) {
        std::vector<int32_t> ids(static_cast<size_t>(per_seq - 1));
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), rng);
        blocks[i] = per_seq - 1;
        for (int j = 1; j < topk; ++j) blocks[i + static_cast<size_t>(j)] = ids[static_cast<size_t>(j - 1)];
      }
      auto to_dev = [](const std::vector<int32_t>& v) {
        auto* p = static_cast<int32_t*>(dalloc(v.size() * 4));
        CK(cudaMemcpy(p, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
        return p;
      };
      int32_t *d_tables = to_dev(tables), *d_pos = to_dev(pos), *d_offs = to_dev(offs), *d_blocks = to_dev(blocks);
      const cu::AttentionRows rows{d_pos, d_offs, d_tables, batch, bs};
      auto* q = static_cast<float*>(dalloc(static_cast<size_t>(batch) * heads * d * 4));
      auto* out = static_cast<float*>(dalloc(static_cast<size_t>(batch) * heads * d * 4));
      CK(cu::launch_fill_random_f32(q, static_cast<size_t>(batch) * heads * d, 13, 1.0f, stream));
      const int dense_keys = per_seq * bs, sparse_keys = topk * bs;
      const int kps_dense = cu::attention_keys_per_split(batch, kvh, dense_keys, sms);
      const int kps_sparse = cu::attention_keys_per_split(batch, kvh, sparse_keys, sms);
      const int max_splits = std::max(
          {(dense_keys + 31) / 32, cu::attention_simt_splits(per_seq, bs), cu::attention_simt_splits(topk, bs)});
      auto* ws = static_cast<float*>(dalloc(cu::attention_workspace_floats(batch, heads, d, max_splits) * 4));
      const int reps = quick ? 5 : 15;
      auto time = [&](auto launch) {
        return 1e3 * graph_ms(
                         stream, [&](int) { CK(launch()); }, reps, 8);
      };
      const double dense_us = time([&] {
        return cu::launch_attention(q, rows, heads, kvh, d, scale, kc, vc, cu::CacheType::F32, nullptr, 0, dense_keys,
                                    kps_dense, ws, out, stream);
      });
      {  // Keys per split: the heuristic's choice against a sweep (f32, dense).
        std::string sweep;
        for (int kps = 32; kps <= std::min(dense_keys, 8192); kps *= 2) {
          const double us = time([&] {
            return cu::launch_attention(q, rows, heads, kvh, d, scale, kc, vc, cu::CacheType::F32, nullptr, 0,
                                        dense_keys, kps, ws, out, stream);
          });
          char buf[48];
          std::snprintf(buf, sizeof buf, " %d:%.1f", kps, us);
          sweep += buf;
        }
        row("split sweep B=%2d ctx=%5d (keys per split: us):%s; heuristic %d", batch, ctx, sweep.c_str(), kps_dense);
      }
      const double dense_bf16_us = time([&] {
        return cu::launch_attention(q, rows, heads, kvh, d, scale, kb, vb, cu::CacheType::BF16, nullptr, 0, dense_keys,
                                    kps_dense, ws, out, stream);
      });
      const double dense_old_us = time([&] {
        return cu::launch_attention_simt(q, rows, heads, kvh, d, scale, kc, vc, nullptr, 0, per_seq, ws, out, stream);
      });
      const double sparse_us = time([&] {
        return cu::launch_attention(q, rows, heads, kvh, d, scale, kc, vc, cu::CacheType::F32, d_blocks, topk,
                                    sparse_keys, kps_sparse, ws, out, stream);
      });
      const double sparse_bf16_us = time([&] {
        return cu::launch_attention(q, rows, heads, kvh, d, scale, kb, vb, cu::CacheType::BF16, d_blocks, topk,
                                    sparse_keys, kps_sparse, ws, out, stream);
      });
      const double sparse_old_us = time([&] {
        return cu::launch_attention_simt(q, rows, heads, kvh, d, scale, kc, vc, d_blocks, topk, topk, ws, out, stream);
      });
      // Lightning indexer over the index-K cache (one 128-wide key head shared by the 4 index heads).
      auto* ik = static_cast<float*>(dalloc(static_cast<size_t>(pages) * bs * d * 4));
      auto* iq = static_cast<float*>(dalloc(static_cast<size_t>(batch) * kvh * d * 4));
      auto* sel = static_cast<int32_t*>(dalloc(static_cast<size_t>(batch) * kvh * topk * 4));
      auto* iws = static_cast<float*>(dalloc(cu::index_select_workspace_floats(batch, kvh, per_seq) * 4));
      CK(cu::launch_fill_random_f32(ik, static_cast<size_t>(pages) * bs * d, 16, 1.0f, stream));
      CK(cu::launch_fill_random_f32(iq, static_cast<size_t>(batch) * kvh * d, 17, 1.0f, stream));
      const double index_us = time([&] {
        return cu::launch_index_select(iq, rows, kvh, d, topk, 1, 0, per_seq, ik, cu::CacheType::F32, iws, sms, sel,
                                       stream);
      });
      const double index_old_us = time([&] {
        return cu::launch_index_select(iq, rows, kvh, d, topk, 1, 0, per_seq, ik, cu::CacheType::F32, nullptr, sms, sel,
                                       stream);
      });
      const double index_bytes = static_cast<double>(batch) * ctx * d * 4;
      const double dense_bytes = 2.0 * batch * static_cast<double>(ctx) * width * 4;
      const double sparse_bytes = 2.0 * batch * static_cast<double>(std::min(ctx, topk * bs)) * width * 4;
      auto pct = [&](double bytes, double us) { return 100.0 * bytes / us / 1e3 / c.copy_gbs; };
      row("decode attention B=%2d ctx=%5d f32 KV: dense %7.1f us (%6.1f MB, %5.0f GB/s, %4.1f%% of copy; previous "
          "kernel %7.1f us, %4.1f%%), sparse-16 %6.1f us (%4.1f%%; previous %6.1f us, %4.1f%%)",
          batch, ctx, dense_us, dense_bytes / 1e6, dense_bytes / dense_us / 1e3, pct(dense_bytes, dense_us),
          dense_old_us, pct(dense_bytes, dense_old_us), sparse_us, pct(sparse_bytes, sparse_us), sparse_old_us,
          pct(sparse_bytes, sparse_old_us));
      row("decode attention B=%2d ctx=%5d bf16 KV: dense %7.1f us (%6.1f MB, %5.0f GB/s, %4.1f%% of copy), sparse-16 "
          "%6.1f us (%4.1f%%)",
          batch, ctx, dense_bf16_us, dense_bytes / 2e6, dense_bytes / 2 / dense_bf16_us / 1e3,
          pct(dense_bytes / 2, dense_bf16_us), sparse_bf16_us, pct(sparse_bytes / 2, sparse_bf16_us));
      row("indexer top-16 B=%2d ctx=%5d f32 index-K: %7.1f us (%6.1f MB, %4.1f%% of copy); previous kernel %8.1f us "
          "(%4.1f%%)",
          batch, ctx, index_us, index_bytes / 1e6, pct(index_bytes, index_us), index_old_us,
          pct(index_bytes, index_old_us));
      for (void* p : {static_cast<void*>(ik), static_cast<void*>(iq), static_cast<void*>(sel), static_cast<void*>(iws)})
        CK(cudaFree(p));
      for (void* p :
           {static_cast<void*>(kc), static_cast<void*>(vc), static_cast<void*>(kb), static_cast<void*>(vb),
            static_cast<void*>(d_tables), static_cast<void*>(d_pos), static_cast<void*>(d_offs),
            static_cast<void*>(d_blocks), static_cast<void*>(q), static_cast<void*>(out), static_cast<void*>(ws)})
        CK(cudaFree(p));
    }
  }
  CK(cudaStreamDestroy(stream));
}

io::ModelConfig read_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    std::exit(2);
  }
  return io::parse_model_config(nlohmann::json::parse(in), path);
}

// Device time (ms per call, median of `reps` replays) of `fn` captured as one CUDA graph, or a negative value when
// it cannot be captured (an op synchronises with the host); `why` says why.
template <typename Fn>
double try_graph_ms(cudaStream_t stream, Fn fn, int reps, std::string& why) {
  fn();
  fn();
  CK(cudaStreamSynchronize(stream));
  cudaGraph_t graph = nullptr;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
  try {
    fn();
  } catch (const std::exception& e) {
    why = e.what();
  }
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  if (why.empty() && end != cudaSuccess) why = cudaGetErrorString(end);
  (void)cudaGetLastError();
  if (!why.empty()) {
    if (graph) cudaGraphDestroy(graph);
    return -1.0;
  }
  cudaGraphExec_t exec;
  CK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  CK(cudaGraphLaunch(exec, stream));
  CK(cudaStreamSynchronize(stream));
  std::vector<float> ts;
  for (int r = 0; r < reps; ++r) {
    CK(cudaEventRecord(a, stream));
    CK(cudaGraphLaunch(exec, stream));
    CK(cudaEventRecord(b, stream));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return ts[ts.size() / 2];
}

// Launch overhead of a decode step: layers [first, first + count) of the real config, one decode step of `batch`
// sequences at 512 tokens, run eagerly (host-timed, closed by a sync) and as one CUDA graph of the same forward
// (no logit rows: the forward ends on the device; the lm_head is in the end-to-end numbers). Dense layers 0-2 have
// no host round trip; MoE layers are capturable only where the backend routes on the device.
void bench_step_overhead(const io::ModelConfig& full, int first, int count, bool quick) {
  const io::ModelConfig cfg = model::slice_layers(full, first, count);
  auto be = backend::make_cuda_backend({});
  const cudaStream_t stream = backend::cuda_stream(*be);
  auto m = model::make_dummy_m3_model(cfg, *be, {}, 1);
  for (int batch : {1, 32}) {
    const int ctx = 512, bs = 128, pages_per_seq = ctx / bs;
    std::vector<std::unique_ptr<backend::Buffer>> store;
    std::vector<model::LayerCache> caches;
    const size_t slots = static_cast<size_t>(pages_per_seq) * batch * bs;
    for (int l = 0; l < m->num_layers(); ++l) {
      model::LayerCache lc;
      store.push_back(be->alloc_cache(slots * static_cast<size_t>(m->kv_width())));
      lc.k = store.back()->f32();
      store.push_back(be->alloc_cache(slots * static_cast<size_t>(m->kv_width())));
      lc.v = store.back()->f32();
      if (m->layer_is_sparse(l)) {
        store.push_back(be->alloc_cache(slots * static_cast<size_t>(m->index_width())));
        lc.index_k = store.back()->f32();
      }
      caches.push_back(lc);
    }
    std::vector<int32_t> tables(static_cast<size_t>(pages_per_seq) * batch);
    std::iota(tables.begin(), tables.end(), 0);
    model::ForwardBatch fb;
    fb.attention.block_size = bs;
    fb.attention.num_tokens = batch;
    for (int s = 0; s < batch; ++s) {
      const std::span<const int32_t> table(tables.data() + static_cast<size_t>(s) * pages_per_seq,
                                           static_cast<size_t>(pages_per_seq));
      fb.attention.sequences.push_back({s, 1, ctx - 1, table});
      fb.attention.positions.push_back(ctx - 1);
      fb.attention.slots.push_back(static_cast<int64_t>(table.back()) * bs + (ctx - 1) % bs);
      fb.tokens.push_back(1000 + 7 * s);
    }
    auto sink_buf = be->alloc(1);
    float sink = 0;
    const double eager_ms = wall_ms(
        [&] {
          m->forward(fb, caches);
          be->download(*sink_buf, 0, &sink, 1);
        },
        quick ? 5 : 20, 3);
    be->download(*sink_buf, 0, &sink, 1);  // empties the staging ring: the capture must not wrap it
    std::string why;
    const double graph = try_graph_ms(
        stream, [&] { m->forward(fb, caches); }, quick ? 5 : 20, why);
    if (graph < 0) {
      row("decode step, real config layers %d-%d, B=%2d ctx=%d: eager %.3f ms (host timed); not capturable as a CUDA "
          "graph (%s)",
          first, first + count - 1, batch, ctx, eager_ms, why.c_str());
      be->download(*sink_buf, 0, &sink, 1);
      continue;
    }
    row("decode step, real config layers %d-%d, B=%2d ctx=%d: eager %.3f ms (host timed), CUDA graph %.3f ms -> "
        "launch overhead %.3f ms per step (%.1f us per layer, %.0f%% of the eager step)",
        first, first + count - 1, batch, ctx, eager_ms, graph, eager_ms - graph,
        1e3 * (eager_ms - graph) / m->num_layers(), 100.0 * (eager_ms - graph) / eager_ms);
  }
}

// End to end: `mxlm bench decode --model-config CONFIG --load-format dummy --layers 4 [--first-layer F] --batch 1,32`.
void bench_end_to_end(const io::ModelConfig& full, int first_layer, bool quick) {
  auto be = backend::make_cuda_backend({});
  const io::ModelConfig cfg = model::slice_layers(full, first_layer, 4);
  auto m = model::make_dummy_m3_model(cfg, *be, {}, 1);
  const double bw = engine::measure_copy_bandwidth(*be, size_t{1} << 30);
  const model::WeightBytes& wb = m->weight_bytes_by_kind();
  row("end to end, real config layers %d-%d (dummy weights %.2f GB, routed experts MXFP4 %.2f GB), backend copy %.0f "
      "GB/s",
      first_layer, first_layer + 3, wb.total / 1e9, wb.routed_experts / 1e9, bw / 1e9);
  engine::DecodeBenchOptions o;
  o.prompt_len = 128;
  o.steps = quick ? 8 : 32;
  for (int batch : {1, 32}) {
    for (bool greedy : {false, true}) {
      o.device_greedy = greedy;
      const engine::DecodeBenchResult r = engine::run_decode_bench(*m, batch, o, bw);
      row("  B=%2d %s ctx %d-%d: step %.3f ms (p10 %.3f, p90 %.3f) = %.1f tokens/s; touched %.3f GB weights (%.1f "
          "experts per MoE layer) + %.1f MB KV -> roofline %.3f ms = %.1f tokens/s; achieved %.1f%% of roofline "
          "(logits D2H %.1f MB/step, host argmax %.3f ms)",
          batch, greedy ? "device greedy" : "host logits  ", r.context_first, r.context_last, r.step_p50_s * 1e3,
          r.step_p10_s * 1e3, r.step_p90_s * 1e3, r.tokens_per_s, r.weight_bytes / 1e9, r.distinct_experts,
          r.kv_bytes / 1e6, r.roofline_s * 1e3, batch / r.roofline_s, 100.0 * r.roofline_fraction, r.logits_bytes / 1e6,
          r.host_argmax_s * 1e3);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::string config = "tests/fixtures/configs/minimax_m3_mxfp4_quark.json";
  std::vector<std::string> only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
    } else if (a == "--config" && i + 1 < argc) {
      config = argv[++i];
    } else {
      only.push_back(a);  // section names: attention, overhead, e2e
    }
  }
  auto want = [&](const char* s) { return only.empty() || std::find(only.begin(), only.end(), s) != only.end(); };
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cublasHandle_t h;
  CB(cublasCreate(&h));
  const Ceilings c = measure_ceilings(h, quick);
  CB(cublasDestroy(h));
  try {
    const io::ModelConfig full = read_config(config);
    if (want("attention")) bench_attention(c, prop.multiProcessorCount, quick);
    if (want("overhead")) {
      bench_step_overhead(full, 0, 3, quick);
      bench_step_overhead(full, 3, 4, quick);
    }
    if (want("e2e")) {
      bench_end_to_end(full, 0, quick);
      bench_end_to_end(full, 3, quick);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_decode: %s\n", e.what());
    print_summary(prop.name);
    return 1;
  }
  print_summary(prop.name);
  return 0;
}
