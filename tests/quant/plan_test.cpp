// The quantization plan on the real MiniMax-M3 tensor inventory (all 23,416 names, shapes and dtypes of
// shared/spec/m3_checkpoint.md §4, generated here), with the seed's template and exclude list; and the glob
// semantics against Python's fnmatch (expected values computed with Python 3.11 fnmatch.fnmatchcase).
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "quant/pattern.h"
#include "quant/plan.h"
#include "quant/quark_config.h"
#include "quant/template.h"

namespace mxlm::quant {
namespace {

using io::TensorInfo;

std::vector<TensorInfo> m3_inventory() {
  std::vector<TensorInfo> t;
  auto add = [&](std::string name, std::vector<int64_t> shape, DType dtype = DType::BF16) {
    TensorInfo info{std::move(name), dtype, std::move(shape), 0, 0};
    info.end = static_cast<uint64_t>(info.numel()) * dtype_size(dtype);
    t.push_back(std::move(info));
  };
  const std::string p = "language_model.model.";
  add(p + "embed_tokens.weight", {200064, 6144});
  add(p + "norm.weight", {6144});
  add("language_model.lm_head.weight", {200064, 6144});
  for (int i = 0; i < 60; ++i) {
    const std::string l = p + "layers." + std::to_string(i) + ".";
    add(l + "input_layernorm.weight", {6144});
    add(l + "post_attention_layernorm.weight", {6144});
    add(l + "self_attn.q_proj.weight", {8192, 6144});
    add(l + "self_attn.k_proj.weight", {512, 6144});
    add(l + "self_attn.v_proj.weight", {512, 6144});
    add(l + "self_attn.o_proj.weight", {6144, 8192});
    add(l + "self_attn.q_norm.weight", {128});
    add(l + "self_attn.k_norm.weight", {128});
    if (i < 3) {
      add(l + "mlp.gate_proj.weight", {12288, 6144});
      add(l + "mlp.up_proj.weight", {12288, 6144});
      add(l + "mlp.down_proj.weight", {6144, 12288});
      continue;
    }
    add(l + "self_attn.index_q_proj.weight", {512, 6144});
    add(l + "self_attn.index_k_proj.weight", {128, 6144});
    add(l + "self_attn.index_q_norm.weight", {128});
    add(l + "self_attn.index_k_norm.weight", {128});
    const std::string m = l + "block_sparse_moe.";
    add(m + "gate.weight", {128, 6144}, DType::F32);
    add(m + "e_score_correction_bias", {128}, DType::F32);
    for (int e = 0; e < 128; ++e) {
      const std::string x = m + "experts." + std::to_string(e) + ".";
      add(x + "w1.weight", {3072, 6144});
      add(x + "w3.weight", {3072, 6144});
      add(x + "w2.weight", {6144, 3072});
    }
    add(m + "shared_experts.gate_proj.weight", {3072, 6144});
    add(m + "shared_experts.up_proj.weight", {3072, 6144});
    add(m + "shared_experts.down_proj.weight", {6144, 3072});
  }
  const std::string v = "vision_tower.vision_model.";
  add(v + "embeddings.patch_embedding.weight", {1280, 3, 2, 14, 14});
  add(v + "pre_layrnorm.weight", {1280});
  add(v + "pre_layrnorm.bias", {1280});
  for (int j = 0; j < 32; ++j) {
    const std::string e = v + "encoder.layers." + std::to_string(j) + ".";
    for (const char* proj : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
      add(e + "self_attn." + proj + ".weight", {1280, 1280});
      add(e + "self_attn." + proj + ".bias", {1280});
    }
    for (const char* norm : {"layer_norm1", "layer_norm2"}) {
      add(e + norm + ".weight", {1280});
      add(e + norm + ".bias", {1280});
    }
    add(e + "mlp.fc1.weight", {5120, 1280});
    add(e + "mlp.fc1.bias", {5120});
    add(e + "mlp.fc2.weight", {1280, 5120});
    add(e + "mlp.fc2.bias", {1280});
  }
  for (const char* proj : {"multi_modal_projector", "patch_merge_mlp"}) {
    const std::string b = proj;
    add(b + ".linear_1.weight", {6144, b == "patch_merge_mlp" ? 24576 : 1280});
    add(b + ".linear_1.bias", {6144});
    add(b + ".linear_2.weight", {6144, 6144});
    add(b + ".linear_2.bias", {6144});
  }
  return t;
}

// The seed script's exclude_layers (shared/seed/model-card-amd-minimax-m3-mxfp4.txt).
const std::vector<std::string> kSeedExcludes = {
    "*lm_head",          "*vision_tower*",         "*multi_modal_projector*",
    "*patch_merge_mlp*", "*block_sparse_moe.gate", "*self_attn*",
    "*mlp.gate_proj",    "*mlp.up_proj",           "*mlp.down_proj"};

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST(QuantPlan, InventoryMatchesSpecCounts) {
  const auto inv = m3_inventory();
  EXPECT_EQ(inv.size(), 23416u);
  EXPECT_EQ(std::count_if(inv.begin(), inv.end(), [](const TensorInfo& t) { return t.dtype == DType::F32; }), 114);
}

TEST(QuantPlan, SeedListsQuantizeExactlyRoutedAndSharedExperts) {
  const auto& tmpl = find_template("minimax_m3_vl");
  const auto exclude = effective_excludes(tmpl, kSeedExcludes);
  EXPECT_EQ(exclude, kSeedExcludes);  // replaces the template's list, as Quark's get_config does
  const QuantPlan plan = make_plan(m3_inventory(), {exclude, false});

  EXPECT_EQ(plan.quantized_count, 57u * 128 * 3 + 57u * 3);
  EXPECT_EQ(plan.copied_count, 23416u - plan.quantized_count);
  for (const auto& t : plan.tensors) {
    const bool expert =
        contains(t.name, ".block_sparse_moe.experts.") || contains(t.name, ".block_sparse_moe.shared_experts.");
    EXPECT_EQ(t.action == TensorAction::Quantize, expert) << t.name;
    if (t.action == TensorAction::Copy) {
      // Everything kept stays BF16 or F32 as it was: attention (incl. index_*), router, dense MLPs, lm_head,
      // embeddings, norms, vision tower and projectors.
      EXPECT_FALSE(expert) << t.name;
    }
  }
  // The exact module names Quark writes as `exclude`: the linear weights the patterns matched.
  const size_t expected_excluded = 1 /*lm_head*/ + 60 * 4 /*q,k,v,o*/ + 57 * 2 /*index q,k*/ + 57 /*router*/ +
                                   9 /*dense MLPs*/ + 32 * 6 /*vision linears*/ + 4 /*projectors*/;
  EXPECT_EQ(plan.excluded_modules.size(), expected_excluded);
  EXPECT_TRUE(std::is_sorted(plan.excluded_modules.begin(), plan.excluded_modules.end()));
  const std::set<std::string> excluded(plan.excluded_modules.begin(), plan.excluded_modules.end());
  for (const char* name :
       {"language_model.lm_head", "language_model.model.layers.3.self_attn.index_q_proj",
        "language_model.model.layers.59.block_sparse_moe.gate", "language_model.model.layers.2.mlp.down_proj",
        "patch_merge_mlp.linear_1", "vision_tower.vision_model.encoder.layers.31.mlp.fc2"})
    EXPECT_TRUE(excluded.count(name)) << name;
  // Not linear weights (Quark's name rule): embeddings, norms, the Conv3d patch embedding, biases.
  for (const char* name : {"language_model.model.embed_tokens", "vision_tower.vision_model.embeddings.patch_embedding",
                           "language_model.model.norm", "language_model.model.layers.3.self_attn.q_norm"})
    EXPECT_FALSE(excluded.count(name)) << name;

  // Sizes: experts 2 x 3072 x 6144 + 6144 x 3072 BF16 -> packed + scales.
  const uint64_t w13 = 3072ull * 3072 + 3072ull * 192, w2 = 6144ull * 1536 + 6144ull * 96;
  const uint64_t quantized_out = 57ull * 129 * (2 * w13 + w2);
  EXPECT_EQ(plan.bytes_in - plan.quantized_bytes_in, plan.bytes_out - quantized_out);
  EXPECT_EQ(plan.quantized_bytes_in, 57ull * 129 * 3 * 3072 * 6144 * 2);
  // ~855 GB in, ~240 GB out.
  EXPECT_NEAR(static_cast<double>(plan.bytes_in) / 1e9, 855.0, 15.0);
  EXPECT_NEAR(static_cast<double>(plan.bytes_out) / 1e9, 240.0, 15.0);

  const auto out = plan.output_tensors();
  EXPECT_EQ(out.size(), 23416u + plan.quantized_count);
  const auto it = std::find_if(out.begin(), out.end(), [](const io::PlannedTensor& t) {
    return t.name == "language_model.model.layers.3.block_sparse_moe.experts.0.w2.weight_scale";
  });
  ASSERT_NE(it, out.end());
  EXPECT_EQ(it->dtype, DType::U8);
  EXPECT_EQ(it->shape, (std::vector<int64_t>{6144, 96}));
  EXPECT_EQ((it - 1)->shape, (std::vector<int64_t>{6144, 1536}));
}

TEST(QuantPlan, TemplateDefaultsApplyWithoutUserList) {
  // Without --exclude-layers the seed's template list applies: q/k/v/o and the dense MLPs become MXFP4 too.
  const auto exclude = effective_excludes(find_template("minimax_m3_vl"), std::nullopt);
  const QuantPlan plan = make_plan(m3_inventory(), {exclude, false});
  EXPECT_EQ(plan.quantized_count, 57u * 129 * 3 + 60 * 4 + 9);
  // An empty user list excludes nothing: every linear weight is selected, and all of M3's have K % 32 == 0.
  const QuantPlan all = make_plan(
      m3_inventory(), {effective_excludes(find_template("minimax_m3_vl"), std::vector<std::string>{}), false});
  EXPECT_TRUE(all.excluded_modules.empty());
  EXPECT_EQ(all.quantized_count, plan.quantized_count + 1 + 114 + 57 + 192 + 4);
}

TEST(QuantPlan, IncompatibleSelectedTensorsAreErrorsUnlessSkipped) {
  std::vector<TensorInfo> t = {
      {"a.proj.weight", DType::BF16, {16, 48}, 0, 16 * 48 * 2},
      {"b.proj.weight", DType::BF16, {4, 16, 64}, 0, 4 * 16 * 64 * 2},
      {"c.proj.weight", DType::I8, {16, 64}, 0, 16 * 64},
      {"d.proj.weight", DType::BF16, {16, 64}, 0, 16 * 64 * 2},
      {"e.proj.weight", DType::BF16, {16, 48}, 0, 16 * 48 * 2},
  };
  try {
    make_plan(t, {{"e.*"}, false});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_TRUE(contains(m, "3 tensor(s)")) << m;
    EXPECT_TRUE(contains(m, "'a.proj.weight'") && contains(m, "K = 48")) << m;
    EXPECT_TRUE(contains(m, "'b.proj.weight'") && contains(m, "3 dimensions")) << m;
    EXPECT_TRUE(contains(m, "'c.proj.weight'") && contains(m, "I8")) << m;
    EXPECT_FALSE(contains(m, "e.proj")) << m;
  }
  const QuantPlan plan = make_plan(t, {{"e.*"}, true});
  EXPECT_EQ(plan.quantized_count, 1u);
  EXPECT_EQ(plan.skipped, (std::vector<std::string>{"a.proj.weight", "b.proj.weight", "c.proj.weight"}));
  // Kept weights must be declared unquantized to loaders.
  EXPECT_EQ(plan.excluded_modules, (std::vector<std::string>{"a.proj", "b.proj", "c.proj", "e.proj"}));
}

TEST(QuantPlan, AlreadyQuantizedInputIsRefused) {
  std::vector<TensorInfo> t = {{"x.weight", DType::BF16, {2, 32}, 0, 128},
                               {"x.weight_scale", DType::U8, {2, 1}, 128, 130}};
  EXPECT_THROW(make_plan(t, {{}, false}), Error);
}

TEST(QuantPlan, LinearWeightNameRuleIsQuarks) {
  EXPECT_TRUE(is_linear_weight_name("model.layers.0.mlp.up_proj.weight"));
  EXPECT_FALSE(is_linear_weight_name("model.layers.0.mlp.up_proj.bias"));
  EXPECT_FALSE(is_linear_weight_name("model.layers.0.input_layernorm.weight"));
  EXPECT_FALSE(is_linear_weight_name("model.norm.weight"));
  EXPECT_FALSE(is_linear_weight_name("model.embed_tokens.weight"));
  EXPECT_FALSE(is_linear_weight_name("weight"));
  EXPECT_TRUE(is_linear_weight_name("model.norm_proj.weight"));
  EXPECT_EQ(module_name_of("a.b.weight"), "a.b");
}

struct GlobCase {
  const char* name;
  const char* pattern;
  bool expected;
};

TEST(LayerPattern, MatchesPythonFnmatch) {
  const GlobCase cases[] = {
      {"language_model.lm_head", "*lm_head", true},
      {"lm_head", "*lm_head", true},
      {"language_model.lm_head", "lm_head", false},
      {"language_model.model.layers.3.block_sparse_moe.gate", "*block_sparse_moe.gate", true},
      {"language_model.model.layers.3.block_sparse_moe.gate_x", "*block_sparse_moe.gate", false},
      {"language_model.model.layers.3.block_sparse_moe.shared_experts.gate_proj", "*mlp.gate_proj", false},
      {"language_model.model.layers.0.mlp.gate_proj", "*mlp.gate_proj", true},
      {"language_model.model.layers.3.self_attn.index_q_proj", "*self_attn.index_*", true},
      {"a.b.c", "a?b?c", true},
      {"a.b.c", "a[.]b[!x]c", true},
      {"a.bxc", "a[.]b[!x]c", false},
      {"layer7", "layer[0-5]", false},
      {"layer3", "layer[0-5]", true},
      {"a[b", "a[b", true},
      {"a]", "a[]]", true},
      {"a-", "a[a-]", true},
      {"ab", "a[!]b]", false},
      {"a]", "a[!]b]", false},
      {"", "*", true},
      {"abc", "a**c", true},
      {"x.self_attn.q", "*self_attn*", true},
      {"layer9", "layer[5-0]", false},
      {"a.b", "a.b*", true},
      {"aXb", "a.b", false},
  };
  for (const auto& c : cases) EXPECT_EQ(fnmatch(c.name, c.pattern), c.expected) << c.name << " ~ " << c.pattern;
}

TEST(LayerPattern, RegexPrefixMatchesFromTheStart) {
  const LayerPattern p("re:.*experts\\.[0-3]\\.w[13]");
  EXPECT_TRUE(p.matches("m.layers.4.block_sparse_moe.experts.2.w1"));
  EXPECT_TRUE(p.matches("m.layers.4.block_sparse_moe.experts.2.w3_extra"));  // re.match: prefix match
  EXPECT_FALSE(p.matches("m.layers.4.block_sparse_moe.experts.5.w1"));
  EXPECT_FALSE(LayerPattern("re:experts").matches("m.experts"));
  EXPECT_THROW(LayerPattern("re:(unclosed"), Error);
}

TEST(QuarkConfig, FieldsAndOrderAsQuark013) {
  const auto qc = quark_mxfp4_quantization_config({"a.q_proj", "b.lm_head"});
  std::vector<std::string> keys;
  for (const auto& [k, v] : qc.items()) keys.push_back(k);
  EXPECT_EQ(keys, (std::vector<std::string>{"global_quant_config", "exclude", "algo_config", "softmax_quant_spec",
                                            "quant_method", "layer_type_quant_config", "layer_quant_config",
                                            "kv_cache_quant_config", "kv_cache_post_rope", "quant_mode", "version",
                                            "export"}));
  EXPECT_EQ(qc["quant_method"], "quark");
  EXPECT_EQ(qc["global_quant_config"]["weight"]["is_dynamic"], false);
  EXPECT_EQ(qc["global_quant_config"]["input_tensors"]["is_dynamic"], true);
  EXPECT_EQ(qc["global_quant_config"]["weight"]["scale_format"], "e8m0");
  EXPECT_EQ(qc["export"]["pack_method"], "reorder");

  const std::string out = quantized_config_json(
      R"({"model_type":"m","quantization_config":{"quant_method":"fp8"},"text_config":{"quantization_config":1,"h":2}})",
      qc, "config.json");
  const auto parsed = nlohmann::ordered_json::parse(out);
  EXPECT_EQ(parsed["quantization_config"], qc);
  EXPECT_FALSE(parsed["text_config"].contains("quantization_config"));
  EXPECT_EQ(parsed.begin().key(), "model_type");
  EXPECT_THROW(quantized_config_json("[1]", qc, "config.json"), Error);
}

}  // namespace
}  // namespace mxlm::quant
