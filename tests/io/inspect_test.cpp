// The inspect report (MXFP4 detection, dtype totals, config summary, human rendering) and resave.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "core/error.h"
#include "io/inspect.h"
#include "io_test_util.h"

namespace mxlm::io {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;

std::vector<uint8_t> pattern_bytes(uint64_t n, int salt) {
  std::vector<uint8_t> b(n);
  for (uint64_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(i * 13 + salt);
  return b;
}

// A tiny quantized-looking checkpoint: layer 1 has MXFP4 experts (K = 64: weight [8, 32], scale [8, 2]),
// layer 0 a BF16 dense MLP, plus one broken module whose scale does not fit.
void write_tiny(const std::filesystem::path& dir, bool with_problem) {
  json config =
      json::parse(std::ifstream(std::string(MXLM_SOURCE_DIR) + "/tests/fixtures/configs/tiny_text_only.json"));
  config["quantization_config"] = {{"quant_method", "quark"},
                                   {"global_quant_config",
                                    {{"weight",
                                      {{"dtype", "fp4"},
                                       {"qscheme", "per_group"},
                                       {"group_size", 32},
                                       {"scale_format", "e8m0"},
                                       {"scale_calculation_mode", "even"},
                                       {"is_dynamic", false}}},
                                     {"input_tensors", {{"dtype", "fp4"}, {"is_dynamic", true}}}}},
                                   {"exclude", {"*lm_head", "*self_attn*"}},
                                   {"export", {{"weight_format", "real_quantized"}}}};
  write_bytes(dir / "config.json", config.dump(2));
  std::vector<PlannedTensor> tensors = {
      {"model.embed_tokens.weight", DType::BF16, {512, 64}},
      {"model.layers.0.mlp.gate_proj.weight", DType::BF16, {96, 64}},
      {"model.layers.1.block_sparse_moe.gate.weight", DType::F32, {8, 64}},
  };
  for (int e = 0; e < 2; ++e) {
    for (const char* w : {"w1", "w3"}) {
      const std::string m = "model.layers.1.block_sparse_moe.experts." + std::to_string(e) + "." + w;
      tensors.push_back({m + ".weight", DType::U8, {32, 32}});
      tensors.push_back({m + ".weight_scale", DType::U8, {32, 2}});
    }
  }
  if (with_problem) {
    tensors.push_back({"model.layers.3.mlp.down_proj.weight", DType::U8, {8, 16}});
    tensors.push_back({"model.layers.3.mlp.down_proj.weight_scale", DType::U8, {8, 3}});
    tensors.push_back({"model.layers.2.mlp.up_proj.weight", DType::BF16, {8, 16}});
    tensors.push_back({"model.layers.2.mlp.up_proj.weight_scale", DType::U8, {8, 1}});
  }
  sort_for_alignment(tensors);
  SafetensorsWriter writer(dir / "model.safetensors", tensors);
  int salt = 0;
  for (const auto& t : tensors) writer.write(t.name, pattern_bytes(t.nbytes(), salt++));
  writer.commit();
}

TEST(Inspect, ReportsDtypesConfigAndMxfp4Modules) {
  ScratchDir dir;
  write_tiny(dir.path(), false);
  const json r = inspect_model_dir(dir.path(), true);
  EXPECT_EQ(r["num_files"], 1);
  EXPECT_EQ(r["num_tensors"], 11);
  EXPECT_EQ(r["dtypes"]["BF16"]["tensors"], 2);
  EXPECT_EQ(r["dtypes"]["BF16"]["bytes"], (512 * 64 + 96 * 64) * 2);
  EXPECT_EQ(r["dtypes"]["F32"]["bytes"], 8 * 64 * 4);
  EXPECT_EQ(r["dtypes"]["U8"]["tensors"], 8);
  EXPECT_EQ(r["total_bytes"], (512 * 64 + 96 * 64) * 2 + 8 * 64 * 4 + 4 * (32 * 32 + 32 * 2));
  EXPECT_EQ(r["mxfp4"]["modules"], 4);
  EXPECT_EQ(r["mxfp4"]["layers"], json::array({1}));
  EXPECT_EQ(r["mxfp4"]["patterns"]["model.layers.*.block_sparse_moe.experts.*.w1"], 2);
  EXPECT_EQ(r["mxfp4"]["patterns"]["model.layers.*.block_sparse_moe.experts.*.w3"], 2);
  EXPECT_TRUE(r["mxfp4"]["problems"].empty());
  EXPECT_EQ(r["config"]["text"]["moe_layers"], json::array({1, 2}));
  EXPECT_EQ(r["config"]["text"]["rotary_dim"], 8);
  EXPECT_EQ(r["quantization_config"]["weight"]["scale_calculation_mode"], "even");
  EXPECT_EQ(r["metadata"]["format"], "pt");
  ASSERT_EQ(r["tensors"].size(), 11u);
  EXPECT_EQ(r["tensors"][0]["file"], "model.safetensors");

  const Checkpoint checkpoint(dir.path());
  EXPECT_TRUE(is_mxfp4_module(checkpoint, "model.layers.1.block_sparse_moe.experts.0.w1"));
  EXPECT_FALSE(is_mxfp4_module(checkpoint, "model.layers.0.mlp.gate_proj"));
  EXPECT_FALSE(is_mxfp4_module(checkpoint, "nothing"));

  const std::string text = format_inspect_report(r);
  EXPECT_THAT(text, HasSubstr("text: 4 layers, hidden 64, vocab 512, 4 heads (2 KV) x 16, rotary 8"));
  EXPECT_THAT(text, HasSubstr("MoE layers: 1-2 (8 experts, top-2, 1 shared"));
  EXPECT_THAT(text, HasSubstr("dense MLP layers: 0, 3 (width 96)"));
  EXPECT_THAT(text,
              HasSubstr("quantization: quark, weight fp4 per_group g32 scale e8m0 (even), static, input fp4, dynamic"));
  EXPECT_THAT(text, HasSubstr("exclude: *lm_head *self_attn*"));
  EXPECT_THAT(text, HasSubstr("tensors: 11 in 1 file(s)"));
  EXPECT_THAT(text, HasSubstr("MXFP4: 4 modules in layers 1"));
  EXPECT_THAT(text, HasSubstr("2 x model.layers.*.block_sparse_moe.experts.*.w1"));
  EXPECT_THAT(text, ::testing::Not(HasSubstr("problems")));
}

TEST(Inspect, FlagsScalesThatDoNotFit) {
  ScratchDir dir;
  write_tiny(dir.path(), true);
  const json r = inspect_model_dir(dir.path(), false);
  EXPECT_FALSE(r.contains("tensors"));
  ASSERT_EQ(r["mxfp4"]["problems"].size(), 2u);
  EXPECT_THAT(r["mxfp4"]["problems"][0].get<std::string>(),
              HasSubstr("model.layers.2.mlp.up_proj: weight_scale next to a BF16 weight"));
  EXPECT_THAT(r["mxfp4"]["problems"][1].get<std::string>(),
              HasSubstr("model.layers.3.mlp.down_proj: weight U8 [8, 16] and weight_scale U8 [8, 3] do not fit"));
  EXPECT_EQ(r["mxfp4"]["layers"], json::array({1, 3}));
  EXPECT_THAT(format_inspect_report(r), HasSubstr("MXFP4 problems: 2"));
}

TEST(Inspect, WorksWithoutConfigAndFailsOnBadConfig) {
  ScratchDir dir;
  write_tiny(dir.path(), false);
  std::filesystem::remove(dir / "config.json");
  const json r = inspect_model_dir(dir.path(), false);
  EXPECT_TRUE(r["config"].is_null());
  EXPECT_THAT(format_inspect_report(r), HasSubstr("config: none"));
  write_bytes(dir / "config.json", R"({"text_config": {"num_attention_heads": 6, "num_key_value_heads": 4}})");
  EXPECT_THROW(inspect_model_dir(dir.path(), false), Error);
}

TEST(Resave, SingleFileIsByteIdenticalAndShardsRoundTrip) {
  ScratchDir dir;
  std::filesystem::create_directories(dir / "in");
  write_tiny(dir / "in", false);
  const Checkpoint input(dir / "in");
  resave_checkpoint(input, dir / "one", 1'000'000);
  EXPECT_EQ(read_bytes(dir / "one" / "model.safetensors"), read_bytes(dir / "in" / "model.safetensors"));

  resave_checkpoint(input, dir / "many", 10'000);
  ASSERT_TRUE(std::filesystem::exists(dir / "many" / "model.safetensors.index.json"));
  const Checkpoint sharded(dir / "many");
  EXPECT_GT(sharded.files().size(), 2u);
  EXPECT_EQ(sharded.tensor_names(), input.tensor_names());
  for (const auto& name : input.tensor_names()) {
    const auto a = input.data(name), b = sharded.data(name);
    EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << name;
  }
}

}  // namespace
}  // namespace mxlm::io
