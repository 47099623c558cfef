// `mxlm bench decode`'s driver on the CPU backend with a tiny dummy model: the step accounting (contexts, experts
// touched, bytes) against the configuration, and the copy-bandwidth probe.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <string>

#include "backend/backend.h"
#include "core/error.h"
#include "engine/decode_bench.h"
#include "engine/model_runner.h"
#include "io/model_config.h"
#include "model/dummy_weights.h"

namespace mxlm::engine {
namespace {

io::ModelConfig config_file(const std::string& name) {
  std::ifstream in(std::string(MXLM_SOURCE_DIR) + "/tests/fixtures/configs/" + name);
  return io::parse_model_config(nlohmann::json::parse(in), name);
}

TEST(DecodeBench, AccountsStepsExpertsAndBytes) {
  auto cpu = backend::make_cpu_backend();
  io::ModelConfig c = config_file("tiny_text_only.json");
  c.quantization_config = config_file("minimax_m3_mxfp4_quark.json").quantization_config;
  auto m = model::make_dummy_m3_model(c, *cpu, {}, 3);
  DecodeBenchOptions o;
  o.prompt_len = 5;
  o.warmup_steps = 2;
  o.steps = 3;
  const double bw = 1e10;
  const int batch = 3;
  const DecodeBenchResult r = run_decode_bench(*m, batch, o, bw);
  EXPECT_EQ(r.batch, batch);
  // Warm-up steps, one untimed step (where a decode-step graph would be captured), then the timed ones.
  EXPECT_EQ(r.context_first, o.prompt_len + o.warmup_steps + 2);
  EXPECT_EQ(r.context_last, o.prompt_len + o.warmup_steps + 1 + o.steps);
  EXPECT_EQ(r.graph_replays, 0u);  // the CPU backend captures nothing
  EXPECT_GT(r.step_p50_s, 0);
  EXPECT_LE(r.step_p10_s, r.step_p50_s);
  EXPECT_LE(r.step_p50_s, r.step_p90_s);
  EXPECT_DOUBLE_EQ(r.tokens_per_s, batch / r.step_p50_s);
  const io::TextConfig& t = c.text;
  // Each token picks k distinct experts: between k and min(E, batch k) per layer and step.
  EXPECT_GE(r.distinct_experts, t.experts_per_token);
  EXPECT_LE(r.distinct_experts, std::min(t.num_experts, batch * t.experts_per_token));
  const model::WeightBytes& wb = m->weight_bytes_by_kind();
  int moe = 0;
  for (bool b : t.layer_is_moe) moe += b ? 1 : 0;
  const double want = static_cast<double>(wb.total - wb.embedding - wb.routed_experts) +
                      static_cast<double>(wb.embedding) / t.vocab_size * batch +
                      r.distinct_experts * moe * static_cast<double>(wb.one_expert);
  EXPECT_NEAR(static_cast<double>(r.weight_bytes), want, 1.0);
  EXPECT_LT(r.weight_bytes, wb.total);
  // KV: full layers read the whole context, sparse layers index-K plus at most topk blocks (all of it here).
  uint64_t kv = 0;
  for (int ctx = r.context_first; ctx <= r.context_last; ++ctx)
    for (int l = 0; l < m->num_layers(); ++l) {
      const uint64_t kvrow = static_cast<uint64_t>(m->kv_width()) * 4;
      const int sel = std::min(ctx, t.sparse.topk_blocks * t.sparse.block_size);
      kv += batch * (m->layer_is_sparse(l) ? static_cast<uint64_t>(m->index_width()) * 4 * ctx + 2 * kvrow * sel
                                           : 2 * kvrow * ctx);
    }
  EXPECT_EQ(r.kv_bytes, kv / static_cast<uint64_t>(o.steps));
  EXPECT_EQ(r.logits_bytes, static_cast<uint64_t>(batch) * t.vocab_size * 4);
  EXPECT_DOUBLE_EQ(r.roofline_s, static_cast<double>(r.weight_bytes + r.kv_bytes) / bw);
  EXPECT_DOUBLE_EQ(r.roofline_fraction, r.roofline_s / r.step_p50_s);
  EXPECT_THROW(run_decode_bench(*m, 0, o, bw), Error);
}

TEST(DecodeBench, DeviceGreedyDecodesTheSameTokensAsHostArgmax) {
  auto cpu = backend::make_cpu_backend();
  const io::ModelConfig c = config_file("tiny_text_only.json");
  auto m = model::make_dummy_m3_model(c, *cpu, {}, 4);
  CacheConfig cache = cache_config_for(*m, 16, 2);
  cache.prefix_caching = false;
  std::vector<int32_t> produced[2];
  for (int greedy = 0; greedy < 2; ++greedy) {
    ModelRunner runner(*m, cache);
    Sequence a, b;
    a.id = 1, b.id = 2;
    a.tokens = {5, 9, 13, 2, 77};
    b.tokens = {100, 3};
    runner.admit(a);
    runner.admit(b);
    std::vector<StepItem> items = {{&a, 5, false}, {&b, 2, false}};
    for (int step = 0; step < 4; ++step) {
      const StepOutput out = runner.step(items, greedy == 1);
      for (size_t i = 0; i < items.size(); ++i) {
        int32_t next;
        if (greedy) {
          ASSERT_TRUE(out.logits.empty());
          next = out.tokens[i];
          EXPECT_THROW(out.row(i), Error);
        } else {
          const auto row = out.row(i);
          next = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
        }
        items[i].seq->tokens.push_back(next);
        items[i].num_tokens = 1;
        produced[greedy].push_back(next);
      }
    }
  }
  EXPECT_EQ(produced[0], produced[1]);
}

TEST(DecodeBench, CopyBandwidthIsPositive) {
  auto cpu = backend::make_cpu_backend();
  const double bw = measure_copy_bandwidth(*cpu, size_t{8} << 20, 3);
  EXPECT_GT(bw, 1e8);  // any machine copies 8 MiB faster than 100 MB/s
}

}  // namespace
}  // namespace mxlm::engine
