// Checkpoint directories (single file, sharded with an index, loose files), shard planning, the index
// file format, parse_size and write_file_atomic.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "io_test_util.h"

namespace mxlm::io {
namespace {

using ::testing::HasSubstr;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;

// Fills tensor `name` with bytes derived from its name, so every tensor's content is recognisable.
std::vector<uint8_t> content_of(const PlannedTensor& t) {
  std::vector<uint8_t> bytes(t.nbytes());
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(i * 31 + t.name.size() * 7 + t.name.back());
  return bytes;
}

void write_file(const std::filesystem::path& path, const std::vector<PlannedTensor>& tensors) {
  SafetensorsWriter writer(path, tensors);
  for (const auto& t : tensors) writer.write(t.name, content_of(t));
  writer.commit();
}

std::vector<PlannedTensor> model_tensors() {
  std::vector<PlannedTensor> tensors;
  tensors.push_back({"model.embed_tokens.weight", DType::BF16, {64, 16}});  // 2048 bytes
  for (int layer = 0; layer < 3; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    tensors.push_back({p + "mlp.experts.0.w1.weight", DType::U8, {32, 8}});        // 256
    tensors.push_back({p + "mlp.experts.0.w1.weight_scale", DType::U8, {32, 1}});  // 32
    tensors.push_back({p + "input_layernorm.weight", DType::BF16, {16}});          // 32
    tensors.push_back({p + "mlp.gate.weight", DType::F32, {4, 16}});               // 256
  }
  tensors.push_back({"lm_head.weight", DType::BF16, {64, 16}});  // 2048
  return tensors;
}

void write_sharded(const std::filesystem::path& dir, uint64_t max_shard_bytes) {
  const auto shards = plan_shards(model_tensors(), max_shard_bytes);
  for (const auto& shard : shards) write_file(dir / shard.file_name, shard.tensors);
  if (shards.size() > 1) write_index(dir, shards);
}

void expect_contents(const Checkpoint& checkpoint) {
  for (const auto& t : model_tensors()) {
    ASSERT_TRUE(checkpoint.contains(t.name)) << t.name;
    EXPECT_EQ(checkpoint.info(t.name).shape, t.shape);
    EXPECT_EQ(checkpoint.info(t.name).dtype, t.dtype);
    const auto data = checkpoint.data(t.name);
    const auto expected = content_of(t);
    EXPECT_TRUE(std::equal(data.begin(), data.end(), expected.begin(), expected.end())) << t.name;
  }
}

template <typename F>
void expect_error(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no error; expected: " << parts.front();
  } catch (const Error& e) {
    for (const auto& part : parts) EXPECT_THAT(e.what(), HasSubstr(part));
  }
}

TEST(Checkpoint, SingleFile) {
  ScratchDir dir;
  write_sharded(dir.path(), 1'000'000);
  EXPECT_TRUE(std::filesystem::exists(dir / "model.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  Checkpoint checkpoint(dir.path());
  EXPECT_EQ(checkpoint.files().size(), 1u);
  const auto names = checkpoint.tensor_names();
  EXPECT_EQ(names.size(), model_tensors().size());
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  expect_contents(checkpoint);
  uint64_t total = 0;
  for (const auto& t : model_tensors()) total += t.nbytes();
  EXPECT_EQ(checkpoint.total_bytes(), total);
  expect_error([&] { checkpoint.info("nope.weight"); }, {"no tensor named 'nope.weight'"});
  expect_error([&] { checkpoint.data("nope.weight"); }, {"nope.weight"});
}

TEST(Checkpoint, ShardedWithIndex) {
  ScratchDir dir;
  write_sharded(dir.path(), 1000);
  Checkpoint checkpoint(dir.path());
  EXPECT_GT(checkpoint.files().size(), 2u);
  expect_contents(checkpoint);
  EXPECT_EQ(checkpoint.file_of("lm_head.weight").path().filename().string().substr(0, 6), "model-");
}

TEST(Checkpoint, LooseFilesWithoutIndex) {
  ScratchDir dir;
  const auto tensors = model_tensors();
  write_file(dir / "a.safetensors", {tensors.begin(), tensors.begin() + 5});
  write_file(dir / "b.safetensors", {tensors.begin() + 5, tensors.end()});
  write_bytes(dir / "notes.txt", "not a tensor file");
  Checkpoint checkpoint(dir.path());
  EXPECT_EQ(checkpoint.files().size(), 2u);
  expect_contents(checkpoint);
}

TEST(Checkpoint, DuplicateTensorAcrossFiles) {
  ScratchDir dir;
  write_file(dir / "a.safetensors", {{"x", DType::F32, {2}}, {"y", DType::F32, {2}}});
  write_file(dir / "b.safetensors", {{"y", DType::F32, {2}}});
  expect_error([&] { Checkpoint c(dir.path()); }, {"tensor 'y' is stored twice", "a.safetensors", "b.safetensors"});

  // With an index that lists y once, the second copy is still a conflict.
  write_bytes(
      dir / "model.safetensors.index.json",
      R"({"metadata":{"total_size":24},"weight_map":{"x":"a.safetensors","y":"a.safetensors","z":"b.safetensors"}})");
  write_file(dir / "b.safetensors", {{"y", DType::F32, {2}}, {"z", DType::F32, {2}}});
  expect_error([&] { Checkpoint c(dir.path()); }, {"tensor 'y' is stored twice"});
}

TEST(Checkpoint, MissingShard) {
  ScratchDir dir;
  write_sharded(dir.path(), 1000);
  std::filesystem::remove(dir / "model-00002-of-00004.safetensors");
  expect_error([&] { Checkpoint c(dir.path()); },
               {dir.path().string(), "shard 'model-00002-of-00004.safetensors'", "does not exist"});
}

TEST(Checkpoint, TensorListedButAbsent) {
  ScratchDir dir;
  write_file(dir / "s1.safetensors", {{"x", DType::F32, {2}}});
  write_bytes(dir / "model.safetensors.index.json",
              R"({"weight_map":{"x":"s1.safetensors","ghost":"s1.safetensors"}})");
  expect_error([&] { Checkpoint c(dir.path()); },
               {"tensor 'ghost' is listed", "'s1.safetensors'", "does not contain it"});
}

TEST(Checkpoint, TensorListedUnderTheWrongShard) {
  ScratchDir dir;
  write_file(dir / "s1.safetensors", {{"x", DType::F32, {2}}});
  write_file(dir / "s2.safetensors", {{"y", DType::F32, {2}}});
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map":{"x":"s2.safetensors","y":"s1.safetensors"}})");
  expect_error([&] { Checkpoint c(dir.path()); }, {"listed in model.safetensors.index.json under", "but stored in"});
}

TEST(Checkpoint, UnlistedTensorsInShardsAreIgnored) {
  ScratchDir dir;
  write_file(dir / "s1.safetensors", {{"x", DType::F32, {2}}, {"extra", DType::F32, {1}}});
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map":{"x":"s1.safetensors"}})");
  Checkpoint checkpoint(dir.path());
  EXPECT_TRUE(checkpoint.contains("x"));
  EXPECT_FALSE(checkpoint.contains("extra"));
}

TEST(Checkpoint, BadIndexFiles) {
  ScratchDir dir;
  write_file(dir / "s1.safetensors", {{"x", DType::F32, {2}}});
  const auto index = dir / "model.safetensors.index.json";
  write_bytes(index, "{not json");
  expect_error([&] { Checkpoint c(dir.path()); }, {index.string(), "not valid JSON"});
  write_bytes(index, R"({"metadata":{}})");
  expect_error([&] { Checkpoint c(dir.path()); }, {"no \"weight_map\""});
  write_bytes(index, R"({"weight_map":{}})");
  expect_error([&] { Checkpoint c(dir.path()); }, {"\"weight_map\" is empty"});
  write_bytes(index, R"({"weight_map":{"x":3}})");
  expect_error([&] { Checkpoint c(dir.path()); }, {"entry 'x' is not a file name"});
  write_bytes(index, R"({"weight_map":{"x":"../s1.safetensors"}})");
  expect_error([&] { Checkpoint c(dir.path()); }, {"not a plain file name"});
}

TEST(Checkpoint, CorruptShardNamesTheShard) {
  ScratchDir dir;
  write_sharded(dir.path(), 1000);
  const auto shard = dir / "model-00003-of-00004.safetensors";
  std::string bytes = read_bytes(shard);
  bytes.resize(bytes.size() - 1);
  write_bytes(shard, bytes);
  expect_error([&] { Checkpoint c(dir.path()); }, {shard.string(), "truncated"});
}

TEST(Checkpoint, EmptyOrMissingDirectory) {
  ScratchDir dir;
  expect_error([&] { Checkpoint c(dir.path()); }, {"no model.safetensors"});
  expect_error([&] { Checkpoint c(dir / "absent"); }, {"not a directory"});
}

TEST(PlanShards, SplitsInOrderAndGivesHugeTensorsTheirOwnShard) {
  const std::vector<PlannedTensor> tensors = {{"a", DType::U8, {40}},
                                              {"b", DType::U8, {50}},
                                              {"c", DType::U8, {20}},
                                              {"huge", DType::U8, {500}},
                                              {"d", DType::U8, {10}}};
  const auto shards = plan_shards(tensors, 100);
  ASSERT_EQ(shards.size(), 4u);
  EXPECT_EQ(shards[0].file_name, "model-00001-of-00004.safetensors");
  EXPECT_EQ(shards[3].file_name, "model-00004-of-00004.safetensors");
  auto names = [](const ShardPlan& s) {
    std::vector<std::string> n;
    for (const auto& t : s.tensors) n.push_back(t.name);
    return n;
  };
  EXPECT_EQ(names(shards[0]), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(names(shards[1]), (std::vector<std::string>{"c"}));
  EXPECT_EQ(names(shards[2]), (std::vector<std::string>{"huge"}));
  EXPECT_EQ(names(shards[3]), (std::vector<std::string>{"d"}));
  EXPECT_EQ(shards[0].data_bytes, 90u);
  EXPECT_EQ(shards[2].data_bytes, 500u);

  const auto one = plan_shards(tensors, 10'000);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].file_name, "model.safetensors");
  EXPECT_THROW(plan_shards(tensors, 0), Error);
}

TEST(WriteIndex, MatchesTransformersLayout) {
  ScratchDir dir;
  const std::vector<PlannedTensor> tensors = {{"b.weight", DType::F32, {2}}, {"a.weight", DType::BF16, {3}}};
  auto shards = plan_shards(tensors, 8);
  ASSERT_EQ(shards.size(), 2u);
  write_index(dir.path(), shards);
  // json.dumps(index, indent=2, sort_keys=True) + "\n", as transformers' save_pretrained writes it.
  EXPECT_EQ(read_bytes(dir / "model.safetensors.index.json"),
            "{\n"
            "  \"metadata\": {\n"
            "    \"total_size\": 14\n"
            "  },\n"
            "  \"weight_map\": {\n"
            "    \"a.weight\": \"model-00002-of-00002.safetensors\",\n"
            "    \"b.weight\": \"model-00001-of-00002.safetensors\"\n"
            "  }\n"
            "}\n");
}

TEST(ParseSize, DecimalAndBinaryUnitsLikeHuggingFace) {
  EXPECT_EQ(parse_size("5GB"), 5'000'000'000u);
  EXPECT_EQ(parse_size("5GiB"), 5ull << 30);
  EXPECT_EQ(parse_size("500MB"), 500'000'000u);
  EXPECT_EQ(parse_size("1.5GiB"), 1'610'612'736u);
  EXPECT_EQ(parse_size("1.5GB"), 1'500'000'000u);
  EXPECT_EQ(parse_size("1024"), 1024u);
  EXPECT_EQ(parse_size("100B"), 100u);
  EXPECT_EQ(parse_size("10KB"), 10'000u);
  EXPECT_EQ(parse_size("10kib"), 10'240u);
  EXPECT_EQ(parse_size("5gb"), 5'000'000'000u);
  EXPECT_EQ(parse_size(" 2 TB "), 2'000'000'000'000u);
  EXPECT_EQ(parse_size("3MiB"), 3u << 20);
  for (const char* bad : {"", "GB", "0", "0GB", "-5GB", "5XB", "5 G B", "1.2.3GB", ".5GB", "5.GB", "abc",
                          "99999999999999999999", "9999999999TB", "5e9"}) {
    EXPECT_THROW(parse_size(bad), Error) << bad;
  }
}

TEST(WriteFileAtomic, WritesAndReplacesWithoutLeftovers) {
  ScratchDir dir;
  const auto path = dir / "config.json";
  write_file_atomic(path, "first");
  EXPECT_EQ(read_bytes(path), "first");
  write_file_atomic(path, std::string("second\0bytes", 12));
  EXPECT_EQ(read_bytes(path), std::string("second\0bytes", 12));
  size_t entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++entries;
  EXPECT_EQ(entries, 1u);
  EXPECT_THROW(write_file_atomic(dir / "missing" / "x", "y"), Error);
}

}  // namespace
}  // namespace mxlm::io
