// config.json parsing: the real MiniMax-M3 config in both spellings (upstream and transformers 5.17), the
// MXFP4 variant, a tiny text-only config, and validation errors for impossible shapes.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "core/error.h"
#include "io/model_config.h"
#include "io_test_util.h"

namespace mxlm::io {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using testing::ScratchDir;
using testing::write_bytes;

json fixture(const std::string& name) {
  std::ifstream in(std::string(MXLM_SOURCE_DIR) + "/tests/fixtures/configs/" + name);
  EXPECT_TRUE(in) << name;
  return json::parse(in);
}

std::vector<bool> m3_layers() {
  std::vector<bool> flags(60, true);
  flags[0] = flags[1] = flags[2] = false;
  return flags;
}

// Every value m3_checkpoint.md §2 lists for the real model.
void expect_real_m3(const ModelConfig& c) {
  EXPECT_EQ(c.model_type, "minimax_m3_vl");
  const TextConfig& t = c.text;
  EXPECT_EQ(t.vocab_size, 200064);
  EXPECT_EQ(t.hidden_size, 6144);
  EXPECT_EQ(t.num_layers, 60);
  EXPECT_EQ(t.num_heads, 64);
  EXPECT_EQ(t.num_kv_heads, 4);
  EXPECT_EQ(t.head_dim, 128);
  EXPECT_EQ(t.rotary_dim, 64);
  EXPECT_EQ(t.rope_theta, 5e6);
  EXPECT_FALSE(t.rope_scaling.has_value());
  EXPECT_EQ(t.rms_norm_eps, 1e-6);
  EXPECT_TRUE(t.gemma_norm);
  EXPECT_TRUE(t.qk_norm);
  EXPECT_EQ(t.intermediate_size, 3072);
  EXPECT_EQ(t.dense_intermediate_size, 12288);
  EXPECT_EQ(t.shared_intermediate_size, 3072);
  EXPECT_EQ(t.num_shared_experts, 1);
  EXPECT_EQ(t.num_experts, 128);
  EXPECT_EQ(t.experts_per_token, 4);
  EXPECT_EQ(t.routed_scaling_factor, 2.0);
  EXPECT_TRUE(t.use_routing_bias);
  EXPECT_EQ(t.swiglu_alpha, 1.702);
  EXPECT_EQ(t.swiglu_limit, 7.0);
  EXPECT_EQ(t.max_position_embeddings, 524288);
  EXPECT_EQ(t.bos_token_id, 200034);
  EXPECT_EQ(t.eos_token_ids, std::vector<int>{200020});
  EXPECT_EQ(t.layer_is_moe, m3_layers());
  EXPECT_EQ(t.layer_is_sparse, m3_layers());
  EXPECT_TRUE(t.sparse.enabled);
  EXPECT_EQ(t.sparse.num_index_heads, 4);
  EXPECT_EQ(t.sparse.index_dim, 128);
  EXPECT_EQ(t.sparse.block_size, 128);
  EXPECT_EQ(t.sparse.topk_blocks, 16);
  EXPECT_EQ(t.sparse.local_blocks, 1);
  EXPECT_EQ(t.sparse.init_blocks, 0);
  EXPECT_FALSE(t.tie_word_embeddings);
  const VisionConfig& v = c.vision;
  EXPECT_TRUE(v.present);
  EXPECT_EQ(v.hidden_size, 1280);
  EXPECT_EQ(v.intermediate_size, 5120);
  EXPECT_EQ(v.num_layers, 32);
  EXPECT_EQ(v.num_heads, 16);
  EXPECT_EQ(v.patch_size, 14);
  EXPECT_EQ(v.num_channels, 3);
  EXPECT_EQ(v.spatial_merge_size, 2);
  EXPECT_EQ(v.temporal_patch_size, 2);
  EXPECT_EQ(v.layer_norm_eps, 1e-5);
  EXPECT_EQ(v.rope_theta, 10000.0);
  EXPECT_EQ(c.image_token_id, 200025);
  EXPECT_EQ(c.video_token_id, 200026);
  EXPECT_EQ(c.projector_hidden_size, 6144);
}

TEST(ModelConfig, RealUpstreamConfig) {
  const auto c = parse_model_config(fixture("minimax_m3_upstream.json"));
  expect_real_m3(c);
  EXPECT_EQ(c.architectures, std::vector<std::string>{"MiniMaxM3SparseForConditionalGeneration"});
  EXPECT_FALSE(c.quantization_config.has_value());
  EXPECT_EQ(c.raw["text_config"]["scoring_func"], "sigmoid");
}

TEST(ModelConfig, Transformers517Spelling) {
  const auto c = parse_model_config(fixture("minimax_m3_transformers517.json"));
  expect_real_m3(c);
  EXPECT_EQ(c.architectures, std::vector<std::string>{"MiniMaxM3VLForConditionalGeneration"});
}

TEST(ModelConfig, QuarkMxfp4Config) {
  const auto c = parse_model_config(fixture("minimax_m3_mxfp4_quark.json"));
  expect_real_m3(c);
  ASSERT_TRUE(c.quantization_config.has_value());
  EXPECT_EQ((*c.quantization_config)["quant_method"], "quark");
  EXPECT_EQ((*c.quantization_config)["global_quant_config"]["weight"]["dtype"], "fp4");
}

TEST(ModelConfig, TinyTextOnly) {
  const auto c = parse_model_config(fixture("tiny_text_only.json"));
  const TextConfig& t = c.text;
  EXPECT_EQ(t.vocab_size, 512);
  EXPECT_EQ(t.hidden_size, 64);
  EXPECT_EQ(t.num_layers, 4);
  EXPECT_EQ(t.head_dim, 16);
  EXPECT_EQ(t.rotary_dim, 8);  // partial_rotary_factor 0.5 x head_dim 16
  EXPECT_EQ(t.rope_theta, 10000.0);
  EXPECT_EQ(t.num_experts, 8);  // "num_experts" alias
  EXPECT_EQ(t.experts_per_token, 2);
  EXPECT_EQ(t.routed_scaling_factor, 1.5);
  EXPECT_EQ(t.layer_is_moe, (std::vector<bool>{false, true, true, false}));
  EXPECT_EQ(t.layer_is_sparse, (std::vector<bool>{false, true, false, true}));
  EXPECT_EQ(t.sparse.num_index_heads, 2);
  EXPECT_EQ(t.sparse.block_size, 4);
  EXPECT_EQ(t.sparse.topk_blocks, 2);
  EXPECT_EQ(t.bos_token_id, -1);
  EXPECT_EQ(t.eos_token_ids, (std::vector<int>{3, 7}));
  EXPECT_TRUE(t.tie_word_embeddings);
  EXPECT_FALSE(c.vision.present);
  EXPECT_EQ(c.image_token_id, -1);
  EXPECT_EQ(c.projector_hidden_size, 64);
}

TEST(ModelConfig, DefaultsAreTransformers517s) {
  // transformers builds the real model from an empty text_config; so do we.
  const auto c = parse_model_config(json{{"model_type", "minimax_m3_vl"}, {"text_config", json::object()}});
  EXPECT_EQ(c.text.hidden_size, 6144);
  EXPECT_EQ(c.text.rotary_dim, 64);
  EXPECT_EQ(c.text.layer_is_moe, std::vector<bool>(60, true));      // mlp_layer_types default: all sparse
  EXPECT_EQ(c.text.layer_is_sparse, std::vector<bool>(60, false));  // layer_types default: all full
  EXPECT_FALSE(c.text.sparse.enabled);
}

TEST(ModelConfig, RopeParametersAndScaling) {
  json config = fixture("tiny_text_only.json");
  config.erase("rope_theta");
  config.erase("partial_rotary_factor");
  config["rope_parameters"] = {
      {"rope_theta", 123.0}, {"rope_type", "yarn"}, {"factor", 2.0}, {"partial_rotary_factor", 0.25}};
  const auto c = parse_model_config(config);
  EXPECT_EQ(c.text.rope_theta, 123.0);
  EXPECT_EQ(c.text.rotary_dim, 4);
  ASSERT_TRUE(c.text.rope_scaling.has_value());
  EXPECT_EQ((*c.text.rope_scaling)["rope_type"], "yarn");
}

TEST(ModelConfig, EosAsIntOrList) {
  json config = fixture("tiny_text_only.json");
  config["eos_token_id"] = 9;
  EXPECT_EQ(parse_model_config(config).text.eos_token_ids, std::vector<int>{9});
  config["eos_token_id"] = json::array({1, 2, 3});
  EXPECT_EQ(parse_model_config(config).text.eos_token_ids, (std::vector<int>{1, 2, 3}));
  config["eos_token_id"] = "x";
  EXPECT_THROW(parse_model_config(config), Error);
}

// Applies `edit` to a fixture and expects a parse error containing every `part`.
template <typename Edit>
void expect_invalid(const std::string& fixture_name, Edit edit, const std::vector<std::string>& parts) {
  json config = fixture(fixture_name);
  edit(config);
  try {
    parse_model_config(config, "my/config.json");
    ADD_FAILURE() << "accepted; expected: " << parts.front();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("my/config.json"));
    for (const auto& part : parts) EXPECT_THAT(e.what(), HasSubstr(part));
  }
}

TEST(ModelConfig, ImpossibleShapesAreErrors) {
  const std::string up = "minimax_m3_upstream.json";
  auto text = [](auto f) { return [f](json& c) { f(c["text_config"]); }; };
  expect_invalid(up, text([](json& t) { t["num_key_value_heads"] = 5; }),
                 {"num_attention_heads (64) is not a multiple of num_key_value_heads (5)"});
  expect_invalid(up, text([](json& t) { t["rotary_dim"] = 256; }), {"rotary_dim 256 is larger than head_dim 128"});
  expect_invalid(up, text([](json& t) { t["rotary_dim"] = 63; }), {"rotary_dim 63 must be even"});
  expect_invalid(up, text([](json& t) { t["num_experts_per_tok"] = 129; }),
                 {"num_experts_per_tok (129) exceeds the number of experts (128)"});
  expect_invalid(up, text([](json& t) { t["moe_layer_freq"].erase(0); }),
                 {"moe_layer_freq has 59 entries but num_hidden_layers is 60"});
  expect_invalid(up, text([](json& t) { t["sparse_attention_config"]["sparse_attention_freq"].push_back(1); }),
                 {"sparse_attention_freq has 61 entries"});
  expect_invalid(up, text([](json& t) { t["moe_layer_freq"][5] = 2; }), {"moe_layer_freq must hold only 0 or 1"});
  expect_invalid(up, text([](json& t) { t["moe_layer_freq"] = 1; }), {"moe_layer_freq must be a list"});
  expect_invalid(up, text([](json& t) { t["hidden_size"] = "6144"; }), {"text_config.hidden_size must be an integer"});
  expect_invalid(up, text([](json& t) { t["vocab_size"] = -1; }), {"text_config.vocab_size must be positive"});
  expect_invalid(up, text([](json& t) { t["num_local_experts"] = 0; }), {"num_local_experts must be positive"});
  expect_invalid(up, text([](json& t) { t["rms_norm_eps"] = "tiny"; }), {"rms_norm_eps must be a number"});
  expect_invalid(up, text([](json& t) { t["scoring_func"] = "softmax"; }), {"scoring_func 'softmax' is not supported"});
  expect_invalid(up, text([](json& t) { t["hidden_act"] = "gelu"; }), {"hidden_act 'gelu' is not supported"});
  expect_invalid(up, text([](json& t) { t["sparse_attention_config"]["sparse_topk_blocks"] = 0; }),
                 {"top-k blocks must be positive"});
  expect_invalid(up, text([](json& t) { t["sparse_attention_config"]["sparse_index_dim"] = 32; }),
                 {"index head dim 32 is smaller than rotary_dim 64"});
  expect_invalid(up, text([](json& t) { t["sparse_attention_config"]["sparse_disable_index_value"] = false; }),
                 {"sparse_disable_index_value"});
  expect_invalid(up, text([](json& t) { t["n_shared_experts"] = 1, t["shared_intermediate_size"] = 0; }),
                 {"shared_intermediate_size is 0"});
  expect_invalid(up, [](json& c) { c["vision_config"]["num_attention_heads"] = 3; },
                 {"vision_config.hidden_size (1280) is not a multiple of num_attention_heads (3)"});
  expect_invalid(up, [](json& c) { c["text_config"] = 5; }, {"text_config must be an object"});

  const std::string hf = "minimax_m3_transformers517.json";
  expect_invalid(hf, text([](json& t) { t["layer_types"][4] = "sliding_attention"; }),
                 {"layer_types entries must be \"minimax_m3_sparse\" or \"full_attention\""});
  expect_invalid(hf, text([](json& t) { t["mlp_layer_types"].erase(0); }), {"mlp_layer_types has 59 entries"});
  // Both spellings present and contradicting each other.
  expect_invalid(hf, text([](json& t) { t["moe_layer_freq"] = std::vector<int>(60, 1); }),
                 {"moe_layer_freq and mlp_layer_types disagree"});

  const std::string tiny = "tiny_text_only.json";
  expect_invalid(tiny, [](json& c) { c["partial_rotary_factor"] = 0.3; },
                 {"partial_rotary_factor 0.3 x head_dim 16 is not a whole number"});
  expect_invalid(tiny, [](json& c) { c["partial_rotary_factor"] = 1.5; }, {"partial_rotary_factor must be in (0, 1]"});
  expect_invalid(tiny, [](json& c) { c["eos_token_id"] = -4; }, {"eos_token_id must not be negative"});
}

TEST(ModelConfig, NotAnObject) { EXPECT_THROW(parse_model_config(json::array()), Error); }

TEST(ModelConfig, LoadFromDirectory) {
  ScratchDir dir;
  try {
    load_model_config(dir.path());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("config.json: cannot open"));
  }
  write_bytes(dir / "config.json", "{\"hidden_size\": ");
  try {
    load_model_config(dir.path());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("not valid JSON"));
  }
  write_bytes(dir / "config.json", fixture("minimax_m3_upstream.json").dump());
  expect_real_m3(load_model_config(dir.path()));
}

}  // namespace
}  // namespace mxlm::io
