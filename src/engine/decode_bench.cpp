#include "engine/decode_bench.h"

#include <algorithm>
#include <chrono>
#include <random>
#include <set>

#include "core/error.h"
#include "engine/model_runner.h"
#include "engine/tp_ranks.h"

namespace mxlm::engine {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5)];
}

// KV bytes one sequence's new token reads at `context` tokens (itself included), over all layers.
uint64_t kv_bytes_at(const model::M3Model& m, int64_t context) {
  const io::TextConfig& t = m.text();
  const auto kv_row = static_cast<uint64_t>(m.kv_width()) * 4;  // one token's K (or V) row, f32
  uint64_t bytes = 0;
  for (int l = 0; l < m.num_layers(); ++l) {
    if (!m.layer_is_sparse(l)) {
      bytes += 2 * kv_row * static_cast<uint64_t>(context);
      continue;
    }
    const int64_t bs = t.sparse.block_size;
    const int64_t selected = std::min<int64_t>(context, static_cast<int64_t>(t.sparse.topk_blocks) * bs);
    bytes += static_cast<uint64_t>(m.index_width()) * 4 * static_cast<uint64_t>(context) +
             2 * kv_row * static_cast<uint64_t>(selected);
  }
  return bytes;
}

}  // namespace

double measure_copy_bandwidth(backend::Backend& backend, size_t bytes, int reps) {
  const size_t n = std::max<size_t>(bytes / 4, 1);
  auto a = backend.alloc(n);
  auto b = backend.alloc(n);
  float probe = 0;
  std::vector<double> ts;
  for (int r = 0; r <= reps; ++r) {
    backend.download(*b, 0, &probe, 1);
    const auto t0 = Clock::now();
    backend.copy(a->f32(), b->f32(), n);
    backend.download(*b, n - 1, &probe, 1);
    if (r > 0) ts.push_back(seconds_since(t0));
  }
  return 2.0 * static_cast<double>(n * 4) / quantile(ts, 0.5);
}

DecodeBenchResult run_decode_bench(model::M3Model& model, int batch, const DecodeBenchOptions& o,
                                   double copy_bytes_per_s) {
  if (batch <= 0 || o.prompt_len <= 0 || o.steps <= 0 || o.warmup_steps < 0)
    fail("decode benchmark: batch, prompt length and steps must be positive (got {}, {}, {})", batch, o.prompt_len,
         o.steps);
  const io::TextConfig& t = model.text();
  const int total_len = o.prompt_len + o.warmup_steps + 1 + o.steps;
  CacheConfig cache = cache_config_for(model, total_len, batch);
  cache.prefix_caching = false;
  ModelRunner runner(model, cache);
  runner.set_enforce_eager(o.enforce_eager);
  if (o.tp_ranks) o.tp_ranks->attach(runner);

  std::mt19937 rng(o.seed);
  std::vector<Sequence> seqs(static_cast<size_t>(batch));
  for (int i = 0; i < batch; ++i) {
    Sequence& s = seqs[static_cast<size_t>(i)];
    s.id = i;
    s.tokens.resize(static_cast<size_t>(o.prompt_len));
    for (auto& tok : s.tokens) tok = static_cast<int32_t>(rng() % static_cast<uint32_t>(t.vocab_size));
    s.num_prompt_tokens = o.prompt_len;
    runner.admit(s);
  }
  DecodeBenchResult r;
  r.batch = batch;
  r.logits_bytes = o.device_greedy ? 0 : static_cast<uint64_t>(batch) * static_cast<uint64_t>(t.vocab_size) * 4;

  std::vector<StepItem> items(static_cast<size_t>(batch));
  for (int i = 0; i < batch; ++i) items[static_cast<size_t>(i)] = {&seqs[static_cast<size_t>(i)], o.prompt_len, false};
  auto t0 = Clock::now();
  StepOutput out = runner.step(items, o.device_greedy);
  r.prefill_s = seconds_since(t0);

  // Routing of the warm-up steps: distinct experts per (step, MoE layer).
  std::vector<size_t> distinct;
  model.set_routing_observer([&](int, std::span<const int32_t> ids, int) {
    distinct.push_back(std::set<int32_t>(ids.begin(), ids.end()).size());
  });
  std::vector<double> step_s, argmax_s;
  const bool sampling = o.temperature > 0.0f;
  const auto draw = [&](int seq, int step) {
    backend::SampleParams p;
    p.temperature = o.temperature;
    p.top_p = o.top_p;
    p.top_k = o.top_k;
    p.seed = o.seed + static_cast<uint64_t>(seq);
    p.counter = static_cast<uint64_t>(step);
    return p;
  };
  std::vector<backend::SampleParams> draws(static_cast<size_t>(batch));
  backend::validate(draw(0, 0));
  uint64_t kv_sum = 0;
  // Step `warmup_steps` is untimed too: the first without the routing observer, where a decode-step graph is captured.
  const int first_timed = o.warmup_steps + 1;
  uint64_t replays_before = 0;
  for (int step = 0; step < first_timed + o.steps; ++step) {
    // The routing-counted warm-up steps run unpadded (padding rows would add experts to the count).
    runner.set_enforce_eager(step < o.warmup_steps || o.enforce_eager);
    if (step == o.warmup_steps) model.set_routing_observer(nullptr);
    if (step == first_timed) replays_before = model.step_graph_stats().replays;
    const auto a0 = Clock::now();
    for (int i = 0; i < batch; ++i) {
      int32_t next = 0;
      if (o.device_greedy) {
        next = out.tokens[static_cast<size_t>(i)];
      } else if (sampling) {
        next = backend::sample_row(out.row(static_cast<size_t>(i)), draw(i, step));
      } else {
        const auto row = out.row(static_cast<size_t>(i));
        next = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
      }
      seqs[static_cast<size_t>(i)].tokens.push_back(next);
      items[static_cast<size_t>(i)].num_tokens = 1;
    }
    const double argmax = seconds_since(a0);
    const int context = static_cast<int>(seqs[0].tokens.size());
    t0 = Clock::now();
    if (o.device_greedy && sampling) {
      for (int i = 0; i < batch; ++i) draws[static_cast<size_t>(i)] = draw(i, step + 1);
      out = runner.step(items, draws);
    } else {
      out = runner.step(items, o.device_greedy);
    }
    const double secs = seconds_since(t0);
    if (step >= first_timed) {
      if (step == first_timed) r.context_first = context;
      r.context_last = context;
      step_s.push_back(secs);
      argmax_s.push_back(argmax);
      kv_sum += static_cast<uint64_t>(batch) * kv_bytes_at(model, context);
    }
  }
  model.set_routing_observer(nullptr);
  r.graph_replays = model.step_graph_stats().replays - replays_before;

  r.step_p10_s = quantile(step_s, 0.1);
  r.step_p50_s = quantile(step_s, 0.5);
  r.step_p90_s = quantile(step_s, 0.9);
  r.tokens_per_s = batch / r.step_p50_s;
  r.host_argmax_s = quantile(argmax_s, 0.5);
  const model::WeightBytes& wb = model.weight_bytes_by_kind();
  double experts = 0;
  for (size_t d : distinct) experts += static_cast<double>(d);
  int moe_layers = 0;
  for (bool m : t.layer_is_moe) moe_layers += m ? 1 : 0;
  r.distinct_experts = distinct.empty() ? 0.0 : experts / static_cast<double>(distinct.size());
  const double embed_row = static_cast<double>(wb.embedding) / static_cast<double>(t.vocab_size);
  r.weight_bytes = wb.total - wb.embedding - wb.routed_experts +
                   static_cast<uint64_t>(embed_row * batch + r.distinct_experts * moe_layers * wb.one_expert);
  r.kv_bytes = kv_sum / static_cast<uint64_t>(o.steps);
  r.roofline_weights_s = static_cast<double>(r.weight_bytes) / copy_bytes_per_s;
  r.roofline_s = static_cast<double>(r.weight_bytes + r.kv_bytes) / copy_bytes_per_s;
  r.roofline_fraction = r.roofline_s / r.step_p50_s;
  return r;
}

}  // namespace mxlm::engine
