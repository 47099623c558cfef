// The file-to-file quantizer on small synthetic checkpoints written with the io writer: sharded input, F32/F16/
// BF16 weights, excluded/selected tensors, incompatible shapes, NaN, truncation, broken indexes, resume after a
// simulated interruption, --verify, and the refusal cases. Quantized bytes are checked against the scalar MX
// reference (mx::ref) and, for a hand-computed block, against values derived by hand from the spec.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "mx/mxfp4.h"
#include "quant/quantizer.h"

namespace mxlm::quant {
namespace {

namespace fs = std::filesystem;

struct InputTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_file(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

InputTensor random_tensor(std::string name, DType dtype, std::vector<int64_t> shape, uint32_t seed) {
  InputTensor t{std::move(name), dtype, std::move(shape), {}};
  size_t n = 1;
  for (auto d : t.shape) n *= static_cast<size_t>(d);
  t.bytes.resize(n * dtype_size(dtype));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  for (size_t i = 0; i < n; ++i) {
    const float v = normal(rng);
    if (dtype == DType::BF16) {
      const uint16_t b = f32_to_bf16(v);
      std::memcpy(&t.bytes[2 * i], &b, 2);
    } else if (dtype == DType::F16) {
      const uint16_t b = f32_to_f16(v);
      std::memcpy(&t.bytes[2 * i], &b, 2);
    } else if (dtype == DType::F32) {
      std::memcpy(&t.bytes[4 * i], &v, 4);
    } else {
      t.bytes[i * dtype_size(dtype)] = static_cast<uint8_t>(rng());
    }
  }
  return t;
}

// Writes `tensors` as `shards` safetensors files plus an index (or one model.safetensors), config.json and a
// few non-weight files.
void write_checkpoint(const fs::path& dir, const std::vector<InputTensor>& tensors, size_t shards) {
  fs::create_directories(dir);
  std::vector<io::ShardPlan> plans(shards);
  for (size_t i = 0; i < tensors.size(); ++i) {
    auto& plan = plans[i * shards / tensors.size()];
    plan.tensors.push_back({tensors[i].name, tensors[i].dtype, tensors[i].shape});
    plan.data_bytes += tensors[i].bytes.size();
  }
  for (size_t s = 0; s < shards; ++s) {
    plans[s].file_name =
        shards == 1 ? "model.safetensors" : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards);
    io::SafetensorsWriter writer(dir / plans[s].file_name, plans[s].tensors);
    for (const auto& planned : plans[s].tensors)
      for (const auto& t : tensors)
        if (t.name == planned.name) writer.write(t.name, t.bytes);
    writer.commit();
  }
  if (shards > 1) io::write_index(dir, plans);
  write_file(dir / "config.json", R"({"model_type": "toy", "hidden_size": 64, "torch_dtype": "bfloat16"})");
  write_file(dir / "tokenizer.json", R"({"model": {"type": "BPE"}})");
  write_file(dir / "chat_template.jinja", "{{ messages }}");
  write_file(dir / "README.md", "model card of the input");
  fs::create_directories(dir / "extra");
  write_file(dir / "extra" / "modeling_toy.py", "# remote code\n");
}

std::vector<InputTensor> toy_tensors() {
  std::vector<InputTensor> t;
  t.push_back(random_tensor("model.embed_tokens.weight", DType::BF16, {96, 64}, 1));
  t.push_back(random_tensor("model.layers.0.input_layernorm.weight", DType::BF16, {64}, 2));
  t.push_back(random_tensor("model.layers.0.self_attn.q_proj.weight", DType::BF16, {64, 64}, 3));
  t.push_back(random_tensor("model.layers.0.mlp.gate.weight", DType::F32, {4, 64}, 4));
  t.push_back(random_tensor("model.layers.0.mlp.experts.0.w1.weight", DType::BF16, {40, 64}, 5));
  t.push_back(random_tensor("model.layers.0.mlp.experts.0.w2.weight", DType::F16, {64, 96}, 6));
  t.push_back(random_tensor("model.layers.0.mlp.experts.1.w1.weight", DType::F32, {24, 128}, 7));
  t.push_back(random_tensor("model.layers.0.mlp.experts.1.w2.weight", DType::BF16, {1000, 32}, 8));
  t.push_back(random_tensor("model.layers.0.mlp.bias_table", DType::I64, {3, 5}, 9));
  t.push_back(random_tensor("lm_head.weight", DType::BF16, {96, 64}, 10));
  return t;
}

const std::vector<std::string> kToyExcludes = {"*lm_head", "*self_attn*", "*mlp.gate"};

class QuantizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / fmt::format("mxlm_quant_{}_{}", ::getpid(),
                                                    ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }

  QuantizeOptions options(const fs::path& in, const fs::path& out) {
    QuantizeOptions o;
    o.model_dir = in;
    o.output_dir = out;
    o.exclude_layers = kToyExcludes;
    o.threads = 2;
    o.progress = false;
    return o;
  }

  fs::path root_;
};

void expect_quantized_like_reference(const io::Checkpoint& out, const InputTensor& t) {
  const size_t rows = static_cast<size_t>(t.shape[0]), k = static_cast<size_t>(t.shape[1]);
  std::vector<uint8_t> packed(rows * k / 2), scales(rows * k / 32);
  if (t.dtype == DType::BF16)
    mx::ref::quantize_bf16(reinterpret_cast<const uint16_t*>(t.bytes.data()), rows, k, packed.data(), scales.data(),
                           mx::ScaleRule::Even);
  if (t.dtype == DType::F16) {
    std::vector<float> f(rows * k);
    for (size_t i = 0; i < f.size(); ++i) {
      uint16_t b;
      std::memcpy(&b, &t.bytes[2 * i], 2);
      f[i] = f16_to_f32(b);  // exact widening: quantizing the f32 values must give the same bytes
    }
    mx::ref::quantize_f32(f.data(), rows, k, packed.data(), scales.data(), mx::ScaleRule::Even);
  } else if (t.dtype == DType::F32) {
    mx::ref::quantize_f32(reinterpret_cast<const float*>(t.bytes.data()), rows, k, packed.data(), scales.data(),
                          mx::ScaleRule::Even);
  }
  const auto& w = out.info(t.name);
  EXPECT_EQ(w.dtype, DType::U8);
  EXPECT_EQ(w.shape, (std::vector<int64_t>{t.shape[0], t.shape[1] / 2}));
  const auto& s = out.info(t.name + "_scale");
  EXPECT_EQ(s.dtype, DType::U8);
  EXPECT_EQ(s.shape, (std::vector<int64_t>{t.shape[0], t.shape[1] / 32}));
  const auto wd = out.data(t.name);
  const auto sd = out.data(t.name + "_scale");
  EXPECT_TRUE(std::equal(wd.begin(), wd.end(), packed.begin(), packed.end())) << t.name;
  EXPECT_TRUE(std::equal(sd.begin(), sd.end(), scales.begin(), scales.end())) << t.name;
}

TEST_F(QuantizerTest, ShardedMixedDtypesMatchReferenceAndCopiesTheRest) {
  const auto tensors = toy_tensors();
  write_checkpoint(root_ / "in", tensors, 3);
  auto o = options(root_ / "in", root_ / "out");
  o.verify = true;
  const QuantizeResult r = quantize_checkpoint(o);
  EXPECT_TRUE(r.verified);
  EXPECT_EQ(r.template_name, "default");
  EXPECT_EQ(r.plan.quantized_count, 4u);
  EXPECT_EQ(r.shards_total, 1u);

  const io::Checkpoint out(root_ / "out");
  for (const auto& t : tensors) {
    if (t.name.find("experts") != std::string::npos) {
      expect_quantized_like_reference(out, t);
    } else {
      const auto& info = out.info(t.name);
      EXPECT_EQ(info.dtype, t.dtype) << t.name;
      EXPECT_EQ(info.shape, t.shape) << t.name;
      const auto d = out.data(t.name);
      EXPECT_TRUE(std::equal(d.begin(), d.end(), t.bytes.begin(), t.bytes.end())) << t.name;
      EXPECT_FALSE(out.contains(t.name + "_scale"));
    }
  }
  EXPECT_EQ(out.tensor_names().size(), tensors.size() + 4);

  // Non-weight files copied (README excepted, as Quark does), config.json carries Quark's quantization_config.
  EXPECT_EQ(read_file(root_ / "out" / "tokenizer.json"), read_file(root_ / "in" / "tokenizer.json"));
  EXPECT_EQ(read_file(root_ / "out" / "chat_template.jinja"), "{{ messages }}");
  EXPECT_EQ(read_file(root_ / "out" / "extra" / "modeling_toy.py"), "# remote code\n");
  EXPECT_FALSE(fs::exists(root_ / "out" / "README.md"));
  EXPECT_FALSE(fs::exists(root_ / "out" / kManifestName));
  const auto config = nlohmann::json::parse(read_file(root_ / "out" / "config.json"));
  EXPECT_EQ(config["model_type"], "toy");
  EXPECT_EQ(config["quantization_config"]["quant_method"], "quark");
  EXPECT_EQ(config["quantization_config"]["exclude"],
            (nlohmann::json{"lm_head", "model.layers.0.mlp.gate", "model.layers.0.self_attn.q_proj"}));
  const auto index = nlohmann::json::parse(read_file(root_ / "out" / "model.safetensors.index.json"));
  EXPECT_EQ(index["weight_map"].size(), tensors.size() + 4);
}

TEST_F(QuantizerTest, HandComputedBlock) {
  // One row of 32 x 1.0 and one of 0, 0.25 (tie -> 0), -7 (amax 7 >= 1.75 * 4: scale 2^1 + ...).
  InputTensor t{"m.experts.0.w1.weight", DType::F32, {2, 32}, std::vector<uint8_t>(2 * 32 * 4)};
  std::vector<float> v(64, 1.0f);
  for (int i = 32; i < 64; ++i) v[i] = 0.0f;
  v[33] = 0.25f;
  v[34] = -7.0f;
  v[35] = 3.0f;
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  write_checkpoint(root_ / "in", {t}, 1);
  quantize_checkpoint(options(root_ / "in", root_ / "out"));
  const io::Checkpoint out(root_ / "out");
  const auto w = out.data(t.name);
  const auto s = out.data(t.name + "_scale");
  // Row 0: amax 1 -> e = 0 - 2, byte 125; 1.0 / 0.25 = 4 -> code 6 in both nibbles.
  EXPECT_EQ(s[0], 125);
  for (int j = 0; j < 16; ++j) EXPECT_EQ(w[j], 0x66) << j;
  // Row 1: amax 7 = 1.75 * 4 rounds up to 8 -> e = 3 - 2 = 1, byte 128. 0.25/2 -> 0; -7/2 = -3.5 -> -4 (code 14);
  // 3/2 = 1.5 -> code 3.
  EXPECT_EQ(s[1], 128);
  EXPECT_EQ(w[16], 0x00);
  EXPECT_EQ(w[17], 0x3E);
  for (int j = 18; j < 32; ++j) EXPECT_EQ(w[j], 0x00) << j;
}

TEST_F(QuantizerTest, ShardsByMaxSizeAndSingleFileInput) {
  const auto tensors = toy_tensors();
  write_checkpoint(root_ / "in", tensors, 1);
  auto o = options(root_ / "in", root_ / "out");
  o.max_shard_bytes = 20000;
  const auto r = quantize_checkpoint(o);
  EXPECT_GT(r.shards_total, 3u);
  EXPECT_TRUE(fs::exists(root_ / "out" / fmt::format("model-00001-of-{:05d}.safetensors", r.shards_total)));
  const auto v = verify_quantized(root_ / "in", root_ / "out", 2);
  EXPECT_EQ(v.quantized, 4u);
  EXPECT_EQ(v.copied, tensors.size() - 4);
}

TEST_F(QuantizerTest, IncompatibleSelectedTensorIsAnErrorUnlessSkipped) {
  auto tensors = toy_tensors();
  tensors.push_back(random_tensor("model.layers.0.mlp.experts.2.w1.weight", DType::BF16, {8, 48}, 11));
  write_checkpoint(root_ / "in", tensors, 2);
  try {
    quantize_checkpoint(options(root_ / "in", root_ / "out"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.mlp.experts.2.w1.weight"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(root_ / "out" / "config.json"));
  auto o = options(root_ / "in", root_ / "out");
  o.skip_incompatible = true;
  o.verify = true;
  const auto r = quantize_checkpoint(o);
  EXPECT_EQ(r.plan.skipped.size(), 1u);
  const auto config = nlohmann::json::parse(read_file(root_ / "out" / "config.json"));
  const auto& exclude = config["quantization_config"]["exclude"];
  EXPECT_NE(std::find(exclude.begin(), exclude.end(), "model.layers.0.mlp.experts.2.w1"), exclude.end());
}

TEST_F(QuantizerTest, NonFiniteWeightIsAnErrorAndLeavesNoCompleteOutput) {
  for (const DType dtype : {DType::BF16, DType::F16, DType::F32}) {
    auto t = random_tensor("m.experts.0.w1.weight", dtype, {4, 64}, 12);
    if (dtype == DType::F32) {
      const float inf = INFINITY;
      std::memcpy(&t.bytes[(2 * 64 + 5) * 4], &inf, 4);
    } else {
      const uint16_t nan = dtype == DType::BF16 ? 0x7fc0 : 0x7e00;
      std::memcpy(&t.bytes[(2 * 64 + 5) * 2], &nan, 2);
    }
    const fs::path in = root_ / fmt::format("in{}", dtype_name(dtype)),
                   out = root_ / fmt::format("out{}", dtype_name(dtype));
    write_checkpoint(in, {t}, 1);
    try {
      quantize_checkpoint(options(in, out));
      FAIL();
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("'m.experts.0.w1.weight'"), std::string::npos) << m;
      EXPECT_NE(m.find("[2, 5]"), std::string::npos) << m;
    }
    EXPECT_FALSE(fs::exists(out / "config.json"));
    EXPECT_FALSE(fs::exists(out / "model.safetensors"));
    EXPECT_FALSE(fs::exists(out / "model.safetensors.partial"));
  }
}

TEST_F(QuantizerTest, BadInputIsAClearError) {
  const auto tensors = toy_tensors();
  // Truncated shard.
  write_checkpoint(root_ / "trunc", tensors, 2);
  const fs::path shard = root_ / "trunc" / "model-00002-of-00002.safetensors";
  fs::resize_file(shard, fs::file_size(shard) - 10);
  try {
    quantize_checkpoint(options(root_ / "trunc", root_ / "out1"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model-00002-of-00002.safetensors"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(root_ / "out1" / "config.json"));

  // A tensor in a shard that the index does not list.
  write_checkpoint(root_ / "unlisted", tensors, 2);
  auto index = nlohmann::json::parse(read_file(root_ / "unlisted" / "model.safetensors.index.json"));
  index["weight_map"].erase("lm_head.weight");
  write_file(root_ / "unlisted" / "model.safetensors.index.json", index.dump());
  try {
    quantize_checkpoint(options(root_ / "unlisted", root_ / "out2"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'lm_head.weight'"), std::string::npos) << e.what();
  }

  // The index lists a tensor that no shard has.
  write_checkpoint(root_ / "ghost", tensors, 2);
  index = nlohmann::json::parse(read_file(root_ / "ghost" / "model.safetensors.index.json"));
  index["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors";
  write_file(root_ / "ghost" / "model.safetensors.index.json", index.dump());
  try {
    quantize_checkpoint(options(root_ / "ghost", root_ / "out3"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.ghost.weight"), std::string::npos) << e.what();
  }

  // Unsupported dtype selected for quantization.
  write_checkpoint(root_ / "int", {random_tensor("m.experts.0.w1.weight", DType::I32, {4, 64}, 13)}, 1);
  EXPECT_THROW(quantize_checkpoint(options(root_ / "int", root_ / "out4")), Error);
  // No config.json.
  write_checkpoint(root_ / "noconfig", tensors, 1);
  fs::remove(root_ / "noconfig" / "config.json");
  EXPECT_THROW(quantize_checkpoint(options(root_ / "noconfig", root_ / "out5")), Error);
  for (int i = 1; i <= 5; ++i) EXPECT_FALSE(fs::exists(root_ / fmt::format("out{}", i) / "config.json"));
}

TEST_F(QuantizerTest, RefusesUnsafeOutputs) {
  write_checkpoint(root_ / "in", toy_tensors(), 2);
  EXPECT_THROW(quantize_checkpoint(options(root_ / "in", root_ / "in")), Error);
  EXPECT_THROW(quantize_checkpoint(options(root_ / "in", root_ / "in" / ".." / "in")), Error);
  EXPECT_THROW(quantize_checkpoint(options(root_ / "in", root_ / "in" / "sub")), Error);
  fs::create_directories(root_ / "busy");
  write_file(root_ / "busy" / "notes.txt", "keep me");
  write_file(root_ / "busy" / "model-00009-of-00009.safetensors", "stale");
  EXPECT_THROW(quantize_checkpoint(options(root_ / "in", root_ / "busy")), Error);
  EXPECT_EQ(read_file(root_ / "busy" / "notes.txt"), "keep me");
  auto o = options(root_ / "in", root_ / "busy");
  o.overwrite = true;
  quantize_checkpoint(o);
  EXPECT_FALSE(fs::exists(root_ / "busy" / "model-00009-of-00009.safetensors"));  // stale shard removed
  EXPECT_EQ(read_file(root_ / "busy" / "notes.txt"), "keep me");
  verify_quantized(root_ / "in", root_ / "busy");
  // A finished output is not silently redone.
  EXPECT_THROW(quantize_checkpoint(options(root_ / "in", root_ / "busy")), Error);
}

TEST_F(QuantizerTest, ResumesFromVerifiedShardsAfterInterruption) {
  write_checkpoint(root_ / "in", toy_tensors(), 2);
  auto o = options(root_ / "in", root_ / "out");
  o.max_shard_bytes = 15000;
  o.threads = 1;
  o.stop_after_shards = 2;
  EXPECT_THROW(quantize_checkpoint(o), Error);
  EXPECT_TRUE(fs::exists(root_ / "out" / kManifestName));
  EXPECT_FALSE(fs::exists(root_ / "out" / "config.json"));
  EXPECT_FALSE(fs::exists(root_ / "out" / "model.safetensors.index.json"));
  size_t complete = 0;
  for (const auto& e : fs::directory_iterator(root_ / "out")) {
    complete += e.path().extension() == ".safetensors";
    EXPECT_NE(e.path().extension(), ".partial");
  }
  EXPECT_EQ(complete, 2u);

  // Different options: the unfinished output is not reused.
  auto other = o;
  other.max_shard_bytes = 30000;
  other.stop_after_shards = SIZE_MAX;
  EXPECT_THROW(quantize_checkpoint(other), Error);

  o.stop_after_shards = SIZE_MAX;
  o.threads = 2;
  const auto r = quantize_checkpoint(o);
  EXPECT_EQ(r.shards_resumed, 2u);
  EXPECT_EQ(r.shards_written + r.shards_resumed, r.shards_total);
  verify_quantized(root_ / "in", root_ / "out");

  // Same bytes as an uninterrupted run.
  auto fresh = options(root_ / "in", root_ / "fresh");
  fresh.max_shard_bytes = 15000;
  quantize_checkpoint(fresh);
  for (const auto& e : fs::directory_iterator(root_ / "fresh"))
    EXPECT_EQ(read_file(e.path()), read_file(root_ / "out" / e.path().filename())) << e.path();
}

TEST_F(QuantizerTest, CorruptedCompletedShardIsRewrittenOnResume) {
  write_checkpoint(root_ / "in", toy_tensors(), 2);
  auto o = options(root_ / "in", root_ / "out");
  o.max_shard_bytes = 15000;
  o.threads = 1;
  o.stop_after_shards = 1;
  EXPECT_THROW(quantize_checkpoint(o), Error);
  fs::path done;
  for (const auto& e : fs::directory_iterator(root_ / "out"))
    if (e.path().extension() == ".safetensors") done = e.path();
  ASSERT_FALSE(done.empty());
  {
    std::fstream f(done, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(done) - 1));
    f.put('\x5a');
  }
  o.stop_after_shards = SIZE_MAX;
  const auto r = quantize_checkpoint(o);
  EXPECT_EQ(r.shards_resumed, 0u);
  verify_quantized(root_ / "in", root_ / "out");
}

TEST_F(QuantizerTest, VerifyDetectsTampering) {
  write_checkpoint(root_ / "in", toy_tensors(), 1);
  quantize_checkpoint(options(root_ / "in", root_ / "out"));
  verify_quantized(root_ / "in", root_ / "out");
  const fs::path shard = root_ / "out" / "model.safetensors";
  const std::string original = read_file(shard);
  {
    // Flip one byte of the last tensor's data (the end of the file).
    std::string bytes = original;
    bytes[bytes.size() - 3] ^= 0x10;
    write_file(shard, bytes);
  }
  EXPECT_THROW(verify_quantized(root_ / "in", root_ / "out"), Error);
  write_file(shard, original);
  // A quantized module listed in `exclude` is inconsistent for loaders.
  auto config = nlohmann::ordered_json::parse(read_file(root_ / "out" / "config.json"));
  config["quantization_config"]["exclude"].push_back("model.layers.0.mlp.experts.0.w1");
  write_file(root_ / "out" / "config.json", config.dump());
  EXPECT_THROW(verify_quantized(root_ / "in", root_ / "out"), Error);
}

TEST_F(QuantizerTest, DryRunWritesNothing) {
  write_checkpoint(root_ / "in", toy_tensors(), 2);
  auto o = options(root_ / "in", root_ / "out");
  o.dry_run = true;
  const auto r = quantize_checkpoint(o);
  EXPECT_EQ(r.plan.quantized_count, 4u);
  EXPECT_GT(r.plan.bytes_in, r.plan.bytes_out);
  EXPECT_FALSE(fs::exists(root_ / "out"));
  EXPECT_NE(describe_plan(r.plan).find("model.layers.*.mlp.experts.*.w1"), std::string::npos);
  o.output_dir.clear();  // a plan needs no output directory
  EXPECT_EQ(quantize_checkpoint(o).plan.quantized_count, 4u);
}

}  // namespace
}  // namespace mxlm::quant
