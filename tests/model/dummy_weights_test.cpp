// --load-format dummy: formats from the Quark exclude list, layer slicing of the real MiniMax-M3 config, random
// weights made by the backend (CPU here), and a whole dummy model that runs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>

#include "backend/backend.h"
#include "core/error.h"
#include "io/model_config.h"
#include "model/dummy_weights.h"
#include "model/m3_model.h"

namespace mxlm::model {
namespace {

using backend::WeightFormat;

io::ModelConfig config_file(const std::string& name) {
  std::ifstream in(std::string(MXLM_SOURCE_DIR) + "/tests/fixtures/configs/" + name);
  return io::parse_model_config(nlohmann::json::parse(in), name);
}

// The tiny text-only config with the AMD checkpoint's quantization_config.
io::ModelConfig tiny_mxfp4() {
  io::ModelConfig c = config_file("tiny_text_only.json");
  c.quantization_config = config_file("minimax_m3_mxfp4_quark.json").quantization_config;
  return c;
}

TEST(DummyWeights, FormatsFollowTheQuarkExcludeList) {
  auto cpu = backend::make_cpu_backend();
  const io::ModelConfig real = config_file("minimax_m3_mxfp4_quark.json");
  ASSERT_TRUE(real.quantization_config.has_value());
  DummyWeights w(real, *cpu, std::nullopt);
  const std::string l = "language_model.model.layers.";
  // The AMD checkpoint: routed and shared experts MXFP4; attention, indexer, dense MLP, router, lm_head not.
  EXPECT_EQ(w.format_of(l + "5.block_sparse_moe.experts.17.w1"), WeightFormat::MXFP4);
  EXPECT_EQ(w.format_of(l + "5.block_sparse_moe.experts.17.w2"), WeightFormat::MXFP4);
  EXPECT_EQ(w.format_of(l + "5.block_sparse_moe.shared_experts.down_proj"), WeightFormat::MXFP4);
  EXPECT_EQ(w.format_of(l + "5.self_attn.q_proj"), WeightFormat::BF16);
  EXPECT_EQ(w.format_of(l + "5.self_attn.index_k_proj"), WeightFormat::BF16);
  EXPECT_EQ(w.format_of(l + "1.mlp.gate_proj"), WeightFormat::BF16);
  EXPECT_EQ(w.format_of(l + "1.mlp.down_proj"), WeightFormat::BF16);
  EXPECT_EQ(w.format_of(l + "5.block_sparse_moe.gate"), WeightFormat::BF16);  // excluded (loaded with force_f32)
  EXPECT_EQ(w.format_of(l + "5.block_sparse_moe.gate", /*force_f32=*/true), WeightFormat::F32);
  EXPECT_EQ(w.format_of("language_model.lm_head"), WeightFormat::BF16);
  EXPECT_EQ(w.format_of("language_model.model.embed_tokens"), WeightFormat::BF16);  // not a linear layer
  // Without a quantization_config everything float; float_format overrides BF16.
  const io::ModelConfig upstream = config_file("minimax_m3_upstream.json");
  DummyWeights plain(upstream, *cpu, WeightFormat::F32);
  EXPECT_EQ(plain.format_of(l + "5.block_sparse_moe.experts.17.w1"), WeightFormat::F32);
  EXPECT_TRUE(plain.has("language_model.lm_head.weight"));
  // Other quantization schemes are refused by name.
  io::ModelConfig fp8 = upstream;
  fp8.quantization_config = nlohmann::json{{"quant_method", "fp8"}};
  EXPECT_THROW(DummyWeights(fp8, *cpu, std::nullopt), Error);
}

TEST(DummyWeights, SliceLayersKeepsTheRealLayerKinds) {
  const io::ModelConfig real = config_file("minimax_m3_mxfp4_quark.json");
  ASSERT_EQ(real.text.num_layers, 60);
  const io::ModelConfig first4 = slice_layers(real, 0, 4);
  EXPECT_EQ(first4.text.num_layers, 4);
  EXPECT_EQ(first4.text.layer_is_moe, (std::vector<bool>{false, false, false, true}));
  EXPECT_EQ(first4.text.layer_is_sparse, (std::vector<bool>{false, false, false, true}));
  const io::ModelConfig moe4 = slice_layers(real, 3, 4);
  EXPECT_EQ(moe4.text.layer_is_moe, (std::vector<bool>(4, true)));
  EXPECT_EQ(moe4.text.layer_is_sparse, (std::vector<bool>(4, true)));
  EXPECT_THROW(slice_layers(real, 58, 4), Error);
  EXPECT_THROW(slice_layers(real, -1, 4), Error);
  EXPECT_THROW(slice_layers(real, 0, 0), Error);
}

// Row r of W (out x in) through linear() with one-hot inputs: W[:, c] for each c.
std::vector<float> weight_values(backend::Backend& be, const backend::Weight& w) {
  const auto rows = static_cast<size_t>(w.rows()), cols = static_cast<size_t>(w.cols());
  std::vector<float> eye(cols * cols, 0.0f);
  for (size_t c = 0; c < cols; ++c) eye[c * cols + c] = 1.0f;
  auto x = be.alloc(eye.size());
  be.upload(*x, 0, eye.data(), eye.size());
  auto y = be.alloc(cols * rows);
  be.linear(x->f32(), cols, w, y->f32());
  std::vector<float> out(cols * rows);
  be.download(*y, 0, out.data(), out.size());
  return out;
}

TEST(DummyWeights, BackendRandomWeightsHaveTheDocumentedRanges) {
  auto cpu = backend::make_cpu_backend();
  for (WeightFormat f : {WeightFormat::F32, WeightFormat::BF16, WeightFormat::MXFP4}) {
    SCOPED_TRACE(backend::weight_format_name(f));
    auto a = cpu->random_weight(f, 48, 64, 7);
    auto b = cpu->random_weight(f, 48, 64, 7);
    auto c = cpu->random_weight(f, 48, 64, 8);
    EXPECT_EQ(a->format(), f);
    const auto va = weight_values(*cpu, *a), vb = weight_values(*cpu, *b), vc = weight_values(*cpu, *c);
    EXPECT_EQ(va, vb);  // deterministic in the seed
    EXPECT_NE(va, vc);
    double sum = 0, max_abs = 0;
    for (float v : va) {
      ASSERT_TRUE(std::isfinite(v));
      sum += v;
      max_abs = std::max(max_abs, static_cast<double>(std::fabs(v)));
    }
    // Floats: uniform in +-0.05. MXFP4: codes up to 6 times scales up to 2^-3.
    EXPECT_LE(max_abs, f == WeightFormat::MXFP4 ? 0.75 : 0.0501);  // bf16 rounding may reach 0.05005
    EXPECT_GT(max_abs, f == WeightFormat::MXFP4 ? 0.1 : 0.04);
    EXPECT_LT(std::fabs(sum / static_cast<double>(va.size())), max_abs * 0.1);  // centred
  }
  EXPECT_THROW(cpu->random_weight(WeightFormat::MXFP4, 4, 48, 1), Error);  // K % 32
}

TEST(DummyWeights, BackendArgmaxRowsTakesTheFirstOfEqualMaxima) {
  auto cpu = backend::make_cpu_backend();
  const std::vector<float> x = {1, 5, 5, 2, -INFINITY, -INFINITY, -INFINITY, -INFINITY, 0, -1, 7, 7};
  auto in = cpu->alloc(x.size());
  cpu->upload(*in, 0, x.data(), x.size());
  auto out = cpu->alloc(3);
  cpu->argmax_rows(in->f32(), 3, 4, out->i32());
  std::vector<int32_t> ids(3);
  cpu->download(*out, 0, reinterpret_cast<float*>(ids.data()), 3);
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 0, 2}));
}

TEST(DummyWeights, DummyModelRunsAndIsDeterministic) {
  auto cpu = backend::make_cpu_backend();
  const io::ModelConfig c = tiny_mxfp4();
  auto m1 = make_dummy_m3_model(c, *cpu, {}, 1);
  auto m2 = make_dummy_m3_model(c, *cpu, {}, 1);
  auto m3 = make_dummy_m3_model(c, *cpu, {}, 2);
  const io::TextConfig& t = c.text;
  const auto H = static_cast<uint64_t>(t.hidden_size), I = static_cast<uint64_t>(t.intermediate_size);
  const WeightBytes& wb = m1->weight_bytes_by_kind();
  EXPECT_EQ(wb.embedding, static_cast<uint64_t>(t.vocab_size) * H * 2);  // BF16
  EXPECT_EQ(wb.one_expert, 3 * (I * H / 2 + I * H / 32));                // MXFP4 gate, up, down
  int moe = 0;
  for (bool b : t.layer_is_moe) moe += b ? 1 : 0;
  EXPECT_EQ(wb.routed_experts, static_cast<uint64_t>(moe * t.num_experts) * wb.one_expert);
  EXPECT_GT(wb.total, wb.embedding + wb.routed_experts);

  // One sequence of 6 tokens through the paged cache.
  const int bs = t.sparse.block_size, tokens = 6, pages = (tokens + bs - 1) / bs;
  std::vector<int32_t> table(static_cast<size_t>(pages));
  for (int p = 0; p < pages; ++p) table[static_cast<size_t>(p)] = p;
  ForwardBatch fb;
  fb.attention.block_size = bs;
  fb.attention.num_tokens = tokens;
  fb.attention.sequences.push_back({0, tokens, 0, table});
  for (int i = 0; i < tokens; ++i) {
    fb.tokens.push_back(3 + 5 * i);
    fb.attention.positions.push_back(i);
    fb.attention.slots.push_back(i);
  }
  fb.logit_rows = {tokens - 1};
  auto run = [&](M3Model& m) {
    std::vector<std::unique_ptr<backend::Buffer>> store;
    std::vector<LayerCache> caches;
    const size_t slots = static_cast<size_t>(pages * bs);
    for (int l = 0; l < m.num_layers(); ++l) {
      LayerCache lc;
      store.push_back(cpu->alloc(slots * static_cast<size_t>(m.kv_width())));
      lc.k = store.back()->f32();
      store.push_back(cpu->alloc(slots * static_cast<size_t>(m.kv_width())));
      lc.v = store.back()->f32();
      if (m.layer_is_sparse(l)) {
        store.push_back(cpu->alloc(slots * static_cast<size_t>(m.index_width())));
        lc.index_k = store.back()->f32();
      }
      caches.push_back(lc);
    }
    return m.forward(fb, caches);
  };
  int routed = 0;
  m1->set_routing_observer([&](int layer, std::span<const int32_t> ids, int k) {
    EXPECT_TRUE(t.layer_is_moe[static_cast<size_t>(layer)]);
    EXPECT_EQ(k, t.experts_per_token);
    EXPECT_EQ(ids.size(), static_cast<size_t>(tokens * k));
    for (int32_t e : ids) EXPECT_TRUE(e >= 0 && e < t.num_experts) << e;
    ++routed;
  });
  const auto l1 = run(*m1), l2 = run(*m2), l3 = run(*m3);
  {  // forward_greedy: the argmax of the same logits (the first of equal maxima).
    m1->set_routing_observer(nullptr);
    std::vector<std::unique_ptr<backend::Buffer>> store;
    std::vector<LayerCache> caches;
    const size_t slots = static_cast<size_t>(pages * bs);
    for (int l = 0; l < m1->num_layers(); ++l) {
      LayerCache lc;
      store.push_back(cpu->alloc_cache(slots * static_cast<size_t>(m1->kv_width())));
      lc.k = store.back()->f32();
      store.push_back(cpu->alloc_cache(slots * static_cast<size_t>(m1->kv_width())));
      lc.v = store.back()->f32();
      if (m1->layer_is_sparse(l)) {
        store.push_back(cpu->alloc_cache(slots * static_cast<size_t>(m1->index_width())));
        lc.index_k = store.back()->f32();
      }
      caches.push_back(lc);
    }
    ForwardBatch all_rows = fb;
    all_rows.logit_rows = {0, 3, tokens - 1};
    const auto ids = m1->forward_greedy(all_rows, caches);
    const auto logits = m1->forward(all_rows, caches);
    ASSERT_EQ(ids.size(), 3u);
    for (size_t r = 0; r < ids.size(); ++r) {
      const float* row = logits.data() + r * static_cast<size_t>(t.vocab_size);
      EXPECT_EQ(ids[r], std::max_element(row, row + t.vocab_size) - row) << r;
    }
  }
  EXPECT_EQ(routed, moe);
  ASSERT_EQ(l1.size(), static_cast<size_t>(t.vocab_size));
  for (float v : l1) ASSERT_TRUE(std::isfinite(v));
  EXPECT_EQ(l1, l2);
  EXPECT_NE(l1, l3);
}

}  // namespace
}  // namespace mxlm::model
