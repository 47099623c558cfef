// GPU checks of the decode path: the split-K tensor-core attention kernel at long, ragged decode contexts (dense
// and block-sparse, several splits per row, GQA groups of 1..16, head dims 16..256) against the CPU backend, with f32
// and bf16 KV caches (kv_cache_dtype BF16: compared with the CPU on the bf16-rounded cache), random weights made on
// the device (`--load-format dummy`), and a dummy model decoding through the engine.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "core/dtype.h"
#include "engine/decode_bench.h"
#include "gpu_check.h"
#include "io/model_config.h"
#include "model/dummy_weights.h"
#include "model/m3_model.h"

namespace mxlm::gpucheck {
namespace {

struct AttnCase {
  int heads, kv_heads, hd, bs;
  std::vector<std::array<int, 2>> seqs;  // {start_pos, count}
  int topk;
};

void check_attention_case(Env& env, const AttnCase& c) {
  std::vector<std::vector<int32_t>> tables;
  int pages = 0, total = 0;
  for (auto s : c.seqs) {
    std::vector<int32_t> t(static_cast<size_t>((s[0] + s[1] + c.bs - 1) / c.bs));
    for (auto& v : t) v = pages++;
    tables.push_back(t);
    total += s[1];
  }
  std::vector<int32_t> perm(static_cast<size_t>(pages));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), g_rng);
  for (auto& t : tables)
    for (auto& v : t) v = perm[static_cast<size_t>(v)];
  backend::AttentionBatch batch;
  batch.block_size = c.bs;
  batch.num_tokens = total;
  std::vector<int32_t> blocks;  // sparse selection: the local block first, then random others, -1 padded
  int row = 0;
  for (size_t i = 0; i < c.seqs.size(); ++i) {
    batch.sequences.push_back({row, c.seqs[i][1], c.seqs[i][0], tables[i]});
    for (int j = 0; j < c.seqs[i][1]; ++j) {
      const int pos = c.seqs[i][0] + j;
      batch.positions.push_back(pos);
      batch.slots.push_back(static_cast<int64_t>(tables[i][static_cast<size_t>(pos / c.bs)]) * c.bs + pos % c.bs);
      for (int h = 0; h < c.kv_heads; ++h) {
        const int visible = pos / c.bs + 1;
        std::vector<int32_t> ids(static_cast<size_t>(visible - 1));
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), g_rng);
        blocks.push_back(visible - 1);
        for (int k = 1; k < c.topk; ++k) blocks.push_back(k - 1 < static_cast<int>(ids.size()) ? ids[k - 1] : -1);
      }
    }
    row += c.seqs[i][1];
  }
  const size_t width = static_cast<size_t>(c.kv_heads * c.hd), cache_n = static_cast<size_t>(pages * c.bs) * width;
  const auto kc = randn(cache_n), vc = randn(cache_n), q = randn(static_cast<size_t>(total * c.heads * c.hd));
  const backend::AttentionShape shape{c.heads, c.kv_heads, c.hd, 1.0f / std::sqrt(static_cast<float>(c.hd))};
  std::string what = "decode attention H=" + std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) +
                     " d=" + std::to_string(c.hd) + " bs=" + std::to_string(c.bs) + " ctx";
  for (auto s : c.seqs) what += " " + std::to_string(s[0] + s[1]) + (s[1] > 1 ? "x" + std::to_string(s[1]) : "");
  {  // The indexer at these contexts: block max scores spread over the card, then top-k.
    const auto ik = randn(static_cast<size_t>(pages * c.bs * c.hd)),
               iq = randn(static_cast<size_t>(total * c.kv_heads * c.hd));
    const backend::IndexerShape ishape{c.kv_heads, c.hd, c.topk, 1, 1};
    const size_t nsel = static_cast<size_t>(total * c.kv_heads * c.topk);
    std::vector<int32_t> sel[2];
    Backend* bes[2] = {&env.cpu, &env.gpu};
    for (int i = 0; i < 2; ++i) {
      auto diq = up(*bes[i], iq), dik = up(*bes[i], ik);
      auto b = bes[i]->alloc(nsel);
      bes[i]->index_select(diq->f32(), batch, ishape, dik->f32(), b->i32());
      sel[i] = down_i32(*bes[i], *b, nsel);
    }
    size_t bad = 0;
    for (size_t i = 0; i < nsel; ++i) bad += sel[0][i] != sel[1][i];
    report(bad == 0, what + " index_select (same blocks, same order)", static_cast<double>(bad), 0);
  }
  for (bool sparse : {false, true}) {
    std::vector<float> out[2];
    Backend* bes[2] = {&env.cpu, &env.gpu};
    for (int i = 0; i < 2; ++i) {
      Backend& be = *bes[i];
      auto dq = up(be, q), dk = up(be, kc), dv = up(be, vc), o = be.alloc(q.size());
      if (sparse) {
        auto db = up_i32(be, blocks);
        be.sparse_attention(dq->f32(), batch, shape, dk->f32(), dv->f32(), db->i32(), c.topk, o->f32());
      } else {
        be.attention(dq->f32(), batch, shape, dk->f32(), dv->f32(), o->f32());
      }
      out[i] = down(be, *o, q.size());
    }
    check_close(what + (sparse ? " sparse top" + std::to_string(c.topk) : " dense"), out[1], out[0], 2e-5);
  }
}

// Row c of a weight's transpose through linear() with one-hot inputs: every value of W.
std::vector<float> weight_values(Backend& be, const backend::Weight& w) {
  const auto rows = static_cast<size_t>(w.rows()), cols = static_cast<size_t>(w.cols());
  std::vector<float> eye(cols * cols, 0.0f);
  for (size_t c = 0; c < cols; ++c) eye[c * cols + c] = 1.0f;
  auto x = up(be, eye);
  auto y = be.alloc(cols * rows);
  be.linear(x->f32(), cols, w, y->f32());
  return down(be, *y, cols * rows);
}

io::ModelConfig config_file(const fs::path& fixtures, const std::string& name) {
  std::ifstream in(fixtures / "configs" / name);
  return io::parse_model_config(nlohmann::json::parse(in), name);
}

}  // namespace

MXLM_GPU_CHECK(decode_attention) {
  const std::vector<AttnCase> cases = {
      // MiniMax-M3 decode: one token per sequence at long, unequal contexts (many splits per row).
      {64, 4, 128, 128, {{5000, 1}, {17000, 1}, {130, 1}, {0, 1}}, 16},
      {64, 4, 128, 128, {{40000, 1}}, 16},
      // Small pages, a prefill chunk mixed with decode rows, other group sizes and head dims.
      {32, 4, 64, 16, {{1000, 1}, {0, 37}, {333, 1}}, 5},
      {16, 1, 256, 64, {{3000, 1}, {10, 2}}, 4},
      {6, 2, 40, 8, {{77, 1}, {200, 3}}, 3},
      {4, 4, 16, 4, {{9, 1}, {0, 5}}, 2},
  };
  for (const auto& c : cases) check_attention_case(env, c);
}

// A bf16 KV cache: cache_write rounds to nearest even; attention, sparse attention and the indexer read it and agree
// with the CPU backend given the same (rounded) values.
MXLM_GPU_CHECK(decode_attention_bf16_cache) {
  backend::CudaOptions options;
  options.kv_cache_dtype = DType::BF16;
  auto gpu = backend::make_cuda_backend(options);
  report(gpu->cache_dtype() == DType::BF16, "bf16 cache backend reports cache_dtype BF16", 0, 0);
  struct Case {
    int heads, kv_heads, hd, bs;
    std::vector<std::array<int, 2>> seqs;
    int topk;
  };
  for (const Case& c :
       std::vector<Case>{{64, 4, 128, 128, {{5000, 1}, {300, 1}}, 16}, {8, 2, 32, 16, {{100, 1}, {0, 7}}, 3}}) {
    int pages = 0, total = 0;
    std::vector<std::vector<int32_t>> tables;
    for (auto s : c.seqs) {
      std::vector<int32_t> t(static_cast<size_t>((s[0] + s[1] + c.bs - 1) / c.bs));
      for (auto& v : t) v = pages++;
      std::shuffle(t.begin(), t.end(), g_rng);
      tables.push_back(t);
      total += s[1];
    }
    backend::AttentionBatch batch;
    batch.block_size = c.bs;
    batch.num_tokens = total;
    int row = 0;
    for (size_t i = 0; i < c.seqs.size(); ++i) {
      batch.sequences.push_back({row, c.seqs[i][1], c.seqs[i][0], tables[i]});
      for (int j = 0; j < c.seqs[i][1]; ++j) {
        const int pos = c.seqs[i][0] + j;
        batch.positions.push_back(pos);
        batch.slots.push_back(static_cast<int64_t>(tables[i][static_cast<size_t>(pos / c.bs)]) * c.bs + pos % c.bs);
      }
      row += c.seqs[i][1];
    }
    const size_t slots = static_cast<size_t>(pages * c.bs), width = static_cast<size_t>(c.kv_heads * c.hd);
    auto kc = randn(slots * width), vc = randn(slots * width), ik = randn(slots * static_cast<size_t>(c.hd));
    const auto q = randn(static_cast<size_t>(total * c.heads * c.hd));
    const auto iq = randn(static_cast<size_t>(total * c.kv_heads * c.hd));
    // The GPU fills its bf16 caches through cache_write from the f32 values; the CPU gets the rounded values.
    std::vector<int64_t> all(slots);
    std::iota(all.begin(), all.end(), 0);
    auto fill = [&](const std::vector<float>& x, size_t w) {
      auto src = up(*gpu, x);
      auto cache = gpu->alloc_cache(slots * w);
      gpu->cache_write(src->f32(), w, all, cache->f32());
      return cache;
    };
    auto gk = fill(kc, width), gv = fill(vc, width), gik = fill(ik, static_cast<size_t>(c.hd));
    auto rounded = [](std::vector<float> x) {
      for (auto& v : x) v = bf16_to_f32(f32_to_bf16(v));
      return x;
    };
    {
      const auto raw = down(*gpu, *gk, slots * width / 2);
      std::vector<float> got(slots * width);
      for (size_t i = 0; i < got.size(); ++i) {
        uint16_t b;
        std::memcpy(&b, reinterpret_cast<const char*>(raw.data()) + 2 * i, 2);
        got[i] = bf16_to_f32(b);
      }
      check_bits("cache_write bf16 (round to nearest even)", got, rounded(kc));
    }
    kc = rounded(kc), vc = rounded(vc), ik = rounded(ik);
    const backend::AttentionShape shape{c.heads, c.kv_heads, c.hd, 1.0f / std::sqrt(static_cast<float>(c.hd))};
    const backend::IndexerShape ishape{c.kv_heads, c.hd, c.topk, 1, 0};
    const size_t nsel = static_cast<size_t>(total * c.kv_heads * c.topk);
    const std::string what = "bf16 KV H=" + std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) +
                             " d=" + std::to_string(c.hd) + " rows=" + std::to_string(total);
    auto cq = up(env.cpu, q), ck = up(env.cpu, kc), cv = up(env.cpu, vc), cik = up(env.cpu, ik), ciq = up(env.cpu, iq);
    auto co = env.cpu.alloc(q.size()), cb = env.cpu.alloc(nsel);
    auto gq = up(*gpu, q), giq = up(*gpu, iq), go = gpu->alloc(q.size()), gb = gpu->alloc(nsel);
    env.cpu.index_select(ciq->f32(), batch, ishape, cik->f32(), cb->i32());
    gpu->index_select(giq->f32(), batch, ishape, gik->f32(), gb->i32());
    const auto want_blocks = down_i32(env.cpu, *cb, nsel), got_blocks = down_i32(*gpu, *gb, nsel);
    size_t bad = 0;
    for (size_t i = 0; i < nsel; ++i) bad += want_blocks[i] != got_blocks[i];
    report(bad == 0, what + " index_select (same blocks, same order)", static_cast<double>(bad), 0);
    env.cpu.attention(cq->f32(), batch, shape, ck->f32(), cv->f32(), co->f32());
    gpu->attention(gq->f32(), batch, shape, gk->f32(), gv->f32(), go->f32());
    check_close(what + " dense", down(*gpu, *go, q.size()), down(env.cpu, *co, q.size()), 2e-5);
    env.cpu.sparse_attention(cq->f32(), batch, shape, ck->f32(), cv->f32(), cb->i32(), c.topk, co->f32());
    auto gsel = up_i32(*gpu, want_blocks);
    gpu->sparse_attention(gq->f32(), batch, shape, gk->f32(), gv->f32(), gsel->i32(), c.topk, go->f32());
    check_close(what + " sparse", down(*gpu, *go, q.size()), down(env.cpu, *co, q.size()), 2e-5);
  }
}

// Greedy sampling on the device: the first index of the largest value, as std::max_element (the CPU sampler).
// Backend::cache_writes: K, V and index K of a layer in one launch (more tensors than one launch takes: two), at
// permuted slots with padding rows (slot -1: written nowhere), into f32 and bf16 caches: bit for bit one cache_write
// per tensor, and the f32 cache equal to the CPU backend's.
MXLM_GPU_CHECK(cache_writes) {
  backend::CudaOptions bf16_options;
  bf16_options.kv_cache_dtype = DType::BF16;
  auto bf16_gpu = backend::make_cuda_backend(bf16_options);
  const size_t slots = 96;
  for (const std::vector<size_t>& widths :
       std::vector<std::vector<size_t>>{{512, 512, 128}, {64, 8, 200, 64, 24}, {1}}) {
    std::vector<int64_t> at(slots);
    std::iota(at.begin(), at.end(), 0);
    std::shuffle(at.begin(), at.end(), g_rng);
    at.resize(37);
    at[5] = -1;
    at[36] = -1;
    std::vector<std::vector<float>> xs, caches;
    for (size_t w : widths) {
      xs.push_back(randn(at.size() * w));
      caches.push_back(randn(slots * w));  // f32 caches start from random contents, so unwritten slots are seen
    }
    const std::string what = "cache_writes of " + std::to_string(widths.size()) + " tensors";
    // Returns each tensor's cache after the writes (bf16 caches as their values).
    auto run = [&](Backend& be, bool grouped) {
      const bool bf16 = be.cache_dtype() == DType::BF16;
      std::vector<std::unique_ptr<backend::Buffer>> src, dst;
      std::vector<Backend::CacheRows> rows;
      for (size_t i = 0; i < widths.size(); ++i) {
        src.push_back(up(be, xs[i]));
        dst.push_back(bf16 ? be.alloc_cache(slots * widths[i]) : up(be, caches[i]));
        rows.push_back({src.back()->f32(), widths[i], dst.back()->f32()});
      }
      if (grouped) {
        be.cache_writes(rows, at);
      } else {
        for (const auto& r : rows) be.cache_write(r.x, r.width, at, r.cache);
      }
      std::vector<float> all;
      for (size_t i = 0; i < widths.size(); ++i) {
        const size_t n = slots * widths[i];
        if (!bf16) {
          const auto got = down(be, *dst[i], n);
          all.insert(all.end(), got.begin(), got.end());
          continue;
        }
        const auto raw = down(be, *dst[i], (n + 1) / 2);
        for (size_t e = 0; e < n; ++e) {
          uint16_t b;
          std::memcpy(&b, reinterpret_cast<const char*>(raw.data()) + 2 * e, 2);
          all.push_back(bf16_to_f32(b));
        }
      }
      return all;
    };
    const auto f32_grouped = run(env.gpu, true);
    check_bits(what + " (f32 cache) == one cache_write each", f32_grouped, run(env.gpu, false));
    check_bits(what + " (f32 cache) vs CPU", f32_grouped, run(env.cpu, false));
    check_bits(what + " (bf16 cache) == one cache_write each", run(*bf16_gpu, true), run(*bf16_gpu, false));
  }
}

MXLM_GPU_CHECK(argmax_rows) {
  // Rows are spread over CTAs of 2048 columns: sizes around that split too.
  for (size_t cols : {size_t{1}, size_t{7}, size_t{1000}, size_t{2048}, size_t{2049}, size_t{6145}, size_t{200064}}) {
    const size_t rows = 6;
    auto x = randn(rows * cols);
    if (cols > 1) {
      x[0 * cols + cols - 1] = 50.0f, x[0 * cols + cols / 2] = 50.0f;  // a tie: the lower index wins
      for (size_t c = 0; c < cols; ++c) x[1 * cols + c] = -INFINITY;   // all -inf: index 0
      x[2 * cols + cols - 1] = 1e30f;                                  // the last column
      x[3 * cols] = NAN;                                               // NaN first: index 0 (std::max_element)
      x[4 * cols + cols / 3] = NAN;                                    // NaN elsewhere: never the answer
      x[4 * cols + cols - 2] = 40.0f;
    }
    std::vector<float> want(rows), got(rows);
    for (size_t r = 0; r < rows; ++r)
      want[r] = static_cast<float>(std::max_element(x.begin() + static_cast<std::ptrdiff_t>(r * cols),
                                                    x.begin() + static_cast<std::ptrdiff_t>((r + 1) * cols)) -
                                   (x.begin() + static_cast<std::ptrdiff_t>(r * cols)));
    auto dx = up(env.gpu, x);
    auto out = env.gpu.alloc(rows);
    env.gpu.argmax_rows(dx->f32(), rows, cols, out->i32());
    const auto ids = down_i32(env.gpu, *out, rows);
    for (size_t r = 0; r < rows; ++r) got[r] = static_cast<float>(ids[r]);
    check_bits("argmax_rows cols=" + std::to_string(cols), got, want);
  }
}

MXLM_GPU_CHECK(dummy_weights) {
  for (auto f : {backend::WeightFormat::F32, backend::WeightFormat::BF16, backend::WeightFormat::MXFP4}) {
    const std::string what = std::string("random_weight ") + backend::weight_format_name(f);
    auto a = env.gpu.random_weight(f, 96, 64, 5), b = env.gpu.random_weight(f, 96, 64, 5),
         c = env.gpu.random_weight(f, 96, 64, 6);
    const auto va = weight_values(env.gpu, *a), vb = weight_values(env.gpu, *b), vc = weight_values(env.gpu, *c);
    check_bits(what + " deterministic in the seed", va, vb);
    double max_abs = 0, sum = 0;
    size_t same = 0;
    bool finite = true;
    for (size_t i = 0; i < va.size(); ++i) {
      finite = finite && std::isfinite(va[i]);
      max_abs = std::max(max_abs, static_cast<double>(std::fabs(va[i])));
      sum += va[i];
      same += va[i] == vc[i];
    }
    // Floats uniform in +-0.05 (bf16 rounding may reach 0.05005); MXFP4 codes up to 6 times scales up to 2^-3.
    const double limit = f == backend::WeightFormat::MXFP4 ? 0.75 : 0.0501;
    report(finite && max_abs <= limit && max_abs > 0.8 * limit, what + " range (max |w|)", max_abs, limit);
    report(std::fabs(sum / static_cast<double>(va.size())) < 0.1 * max_abs, what + " centred (mean)",
           sum / static_cast<double>(va.size()), 0.1 * max_abs);
    report(same < va.size() / 4, what + " another seed differs (equal values)", static_cast<double>(same),
           static_cast<double>(va.size() / 4));
  }
}

MXLM_GPU_CHECK(dummy_decode) {
  // The tiny config with the AMD checkpoint's quantization_config (MXFP4 experts) decoding through the engine.
  io::ModelConfig c = config_file(env.fixtures, "tiny_text_only.json");
  c.quantization_config = config_file(env.fixtures, "minimax_m3_mxfp4_quark.json").quantization_config;
  auto m = model::make_dummy_m3_model(c, env.gpu, {}, 9);
  engine::DecodeBenchOptions o;
  o.prompt_len = 11;
  o.warmup_steps = 2;
  o.steps = 4;
  const engine::DecodeBenchResult r = engine::run_decode_bench(*m, 5, o, 1e12);
  report(r.step_p50_s > 0 && std::isfinite(r.tokens_per_s), "dummy model decode through the engine (tokens/s)",
         r.tokens_per_s, 0);
  // Device greedy decodes the tokens host argmax does.
  engine::DecodeBenchOptions og = o;
  og.device_greedy = true;
  const engine::DecodeBenchResult rg = engine::run_decode_bench(*m, 5, og, 1e12);
  report(rg.step_p50_s > 0 && rg.logits_bytes == 0, "dummy model decode with device greedy (tokens/s)", rg.tokens_per_s,
         0);
  // The same through a backend with a bf16 KV cache (the model allocates its cache with alloc_cache).
  backend::CudaOptions bf;
  bf.kv_cache_dtype = DType::BF16;
  auto gpu16 = backend::make_cuda_backend(bf);
  auto m16 = model::make_dummy_m3_model(c, *gpu16, {}, 9);
  const engine::DecodeBenchResult r16 = engine::run_decode_bench(*m16, 5, o, 1e12);
  report(r16.step_p50_s > 0 && std::isfinite(r16.tokens_per_s), "dummy model decode with a bf16 KV cache (tokens/s)",
         r16.tokens_per_s, 0);
  report(r.distinct_experts >= c.text.experts_per_token &&
             r.distinct_experts <= std::min(c.text.num_experts, 5 * c.text.experts_per_token),
         "dummy model decode: experts touched per MoE layer in [k, min(E, B k)]", r.distinct_experts,
         c.text.num_experts);
}

}  // namespace mxlm::gpucheck
