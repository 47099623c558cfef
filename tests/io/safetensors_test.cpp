// Single-file safetensors: writer/reader round trips for every dtype, the exact header layout, the
// atomic commit protocol, and one test per kind of malformed header.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "io_test_util.h"

namespace mxlm::io {
namespace {

using ::testing::HasSubstr;
using testing::raw_safetensors;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> bytes(n);
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  return bytes;
}

const std::vector<DType> kAllDTypes = {DType::F64, DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2,
                                       DType::I64, DType::I32, DType::I16, DType::I8,   DType::U8,      DType::BOOL};

TEST(SafetensorsWriter, RoundTripsEveryDtypeAndShape) {
  ScratchDir dir;
  std::vector<PlannedTensor> planned;
  int i = 0;
  for (DType dtype : kAllDTypes) planned.push_back({"t." + std::string(dtype_name(dtype)), dtype, {3, 1 + i++}});
  planned.push_back({"scalar", DType::F32, {}});
  planned.push_back({"empty", DType::BF16, {0, 7}});
  planned.push_back({"big.layer.weight", DType::U8, {64, 33}});

  const auto path = dir / "model.safetensors";
  std::map<std::string, std::vector<uint8_t>> contents;
  {
    SafetensorsWriter writer(path, planned, {{"format", "pt"}, {"quantized_by", "mxlm"}});
    EXPECT_TRUE(std::filesystem::exists(dir / "model.safetensors.partial"));
    EXPECT_FALSE(std::filesystem::exists(path));
    uint32_t seed = 1;
    // Reverse order: the header fixes every offset, so the write order must not matter.
    for (auto it = planned.rbegin(); it != planned.rend(); ++it) {
      contents[it->name] = random_bytes(it->nbytes(), seed++);
      writer.write(it->name, contents[it->name]);
    }
    writer.commit();
    EXPECT_EQ(writer.file_size(), std::filesystem::file_size(path));
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "model.safetensors.partial"));

  SafetensorsFile file(path);
  ASSERT_EQ(file.tensors().size(), planned.size());
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.metadata().at("quantized_by"), "mxlm");
  uint64_t previous_end = 0;
  for (const auto& tensor : file.tensors()) {
    EXPECT_EQ(tensor.begin, previous_end) << "tensors() must be in data order";
    previous_end = tensor.end;
  }
  for (const auto& p : planned) {
    const TensorInfo* info = file.find(p.name);
    ASSERT_NE(info, nullptr) << p.name;
    EXPECT_EQ(info->dtype, p.dtype);
    EXPECT_EQ(info->shape, p.shape);
    EXPECT_EQ(info->nbytes(), p.nbytes());
    const auto data = file.data(*info);
    EXPECT_TRUE(std::equal(data.begin(), data.end(), contents[p.name].begin(), contents[p.name].end())) << p.name;
  }
  EXPECT_EQ(file.find("scalar")->numel(), 1);
  EXPECT_EQ(file.find("empty")->numel(), 0);
  EXPECT_EQ(file.find("nope"), nullptr);
}

TEST(SafetensorsWriter, HeaderLayoutMatchesTheRustCrate) {
  // Expected bytes written out by hand from the format: compact JSON, __metadata__ first, tensors in data
  // order with fields dtype, shape, data_offsets; padded with spaces to a multiple of 8.
  const std::vector<PlannedTensor> tensors = {{"b", DType::F32, {2, 2}}, {"a", DType::U8, {3}}};
  const std::string json = R"({"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                           R"("a":{"dtype":"U8","shape":[3],"data_offsets":[16,19]}})";
  std::string padded = json + std::string((8 - json.size() % 8) % 8, ' ');
  const std::string header = serialize_header(tensors, {{"format", "pt"}});
  ASSERT_EQ(header.size(), 8 + padded.size());
  EXPECT_EQ(header.size() % 8, 0u);
  EXPECT_EQ(header.substr(8), padded);
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | static_cast<uint8_t>(header[i]);
  EXPECT_EQ(length, padded.size());

  // No metadata: no __metadata__ key at all (what the Python package writes for metadata=None).
  EXPECT_EQ(serialize_header({{"x", DType::BOOL, {1}}}, {}).substr(8),
            R"({"x":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}} )");  // 55 bytes + 1 space
}

TEST(SafetensorsWriter, SortForAlignmentPutsWideTypesFirstThenNames) {
  std::vector<PlannedTensor> tensors = {{"z", DType::U8, {1}},   {"b", DType::F32, {1}}, {"a", DType::F32, {1}},
                                        {"c", DType::BF16, {1}}, {"d", DType::F64, {1}}, {"e", DType::BOOL, {1}}};
  sort_for_alignment(tensors);
  std::vector<std::string> names;
  for (const auto& t : tensors) names.push_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"d", "a", "b", "c", "z", "e"}));
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    EXPECT_EQ(offset % dtype_size(t.dtype), 0u) << t.name;
    offset += t.nbytes();
  }
}

TEST(SafetensorsWriter, StreamsPartsFromSeveralThreads) {
  ScratchDir dir;
  std::vector<PlannedTensor> planned;
  for (int i = 0; i < 8; ++i) planned.push_back({"w" + std::to_string(i), DType::BF16, {100, 50 + i}});
  std::map<std::string, std::vector<uint8_t>> contents;
  for (size_t i = 0; i < planned.size(); ++i) contents[planned[i].name] = random_bytes(planned[i].nbytes(), 100 + i);
  const auto path = dir / "out.safetensors";
  {
    SafetensorsWriter writer(path, planned);
    std::vector<std::thread> threads;
    for (const auto& p : planned) {
      threads.emplace_back([&, name = p.name] {
        const auto& bytes = contents[name];
        // Pieces of 1000 bytes, last piece first.
        const size_t pieces = (bytes.size() + 999) / 1000;
        for (size_t k = pieces; k-- > 0;) {
          const size_t begin = k * 1000, size = std::min<size_t>(1000, bytes.size() - begin);
          writer.write_part(name, begin, std::span(bytes).subspan(begin, size));
        }
      });
    }
    for (auto& t : threads) t.join();
    writer.commit();
  }
  SafetensorsFile file(path);
  for (const auto& p : planned) {
    const auto data = file.data(*file.find(p.name));
    EXPECT_TRUE(std::equal(data.begin(), data.end(), contents[p.name].begin(), contents[p.name].end()));
  }
}

TEST(SafetensorsWriter, RefusesToCommitIncompleteFilesAndCleansUp) {
  ScratchDir dir;
  const auto path = dir / "model.safetensors";
  {
    SafetensorsWriter writer(path, {{"a", DType::F32, {4}}, {"b", DType::F32, {4}}});
    writer.write("a", random_bytes(16, 1));
    writer.write_part("b", 0, random_bytes(8, 2));
    try {
      writer.commit();
      FAIL() << "commit of an incomplete file succeeded";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("'b' got 8 of its 16 bytes"));
    }
    EXPECT_FALSE(std::filesystem::exists(path));
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "model.safetensors.partial"));
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(SafetensorsWriter, DestructorRemovesUncommittedPartialFile) {
  ScratchDir dir;
  {
    SafetensorsWriter writer(dir / "x.safetensors", {{"a", DType::U8, {4}}});
    writer.write("a", random_bytes(4, 1));
    EXPECT_TRUE(std::filesystem::exists(dir / "x.safetensors.partial"));
  }
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

TEST(SafetensorsWriter, RejectsBadWrites) {
  ScratchDir dir;
  SafetensorsWriter writer(dir / "x.safetensors", {{"a", DType::F32, {4}}});
  EXPECT_THROW(writer.write("missing", random_bytes(16, 1)), Error);
  EXPECT_THROW(writer.write("a", random_bytes(15, 1)), Error);
  EXPECT_THROW(writer.write_part("a", 10, random_bytes(7, 1)), Error);
  EXPECT_THROW(writer.write_part("a", 17, random_bytes(0, 1)), Error);
  EXPECT_THROW(SafetensorsWriter(dir / "y.safetensors", {{"a", DType::F32, {1}}, {"a", DType::F32, {1}}}), Error);
  EXPECT_THROW(SafetensorsWriter(dir / "z.safetensors", {{"__metadata__", DType::F32, {1}}}), Error);
  EXPECT_THROW(SafetensorsWriter(dir / "no_such_dir" / "w.safetensors", {{"a", DType::F32, {1}}}), Error);
  EXPECT_FALSE(std::filesystem::exists(dir / "y.safetensors.partial"));
}

TEST(SafetensorsWriter, EmptyFileRoundTrips) {
  ScratchDir dir;
  {
    SafetensorsWriter writer(dir / "e.safetensors", {}, {});
    writer.commit();
  }
  SafetensorsFile file(dir / "e.safetensors");
  EXPECT_TRUE(file.tensors().empty());
  EXPECT_TRUE(file.metadata().empty());
}

// ---- malformed files: each one an Error that names the file (and the tensor when there is one) ----

class MalformedFile : public ::testing::Test {
 protected:
  // Writes `bytes` and expects opening it to fail with a message containing the path and `expected`.
  void expect_error(const std::string& bytes, const std::string& expected) {
    const auto path = dir_ / "bad.safetensors";
    write_bytes(path, bytes);
    try {
      SafetensorsFile file(path);
      ADD_FAILURE() << "opened a malformed file; expected: " << expected;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(path.string()));
      EXPECT_THAT(e.what(), HasSubstr(expected));
    }
  }
  ScratchDir dir_;
};

const std::string kEntry = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

TEST_F(MalformedFile, ValidBaselineOpens) {
  write_bytes(dir_ / "ok.safetensors", raw_safetensors(kEntry, std::string(8, 'x')));
  SafetensorsFile file(dir_ / "ok.safetensors");
  EXPECT_EQ(file.tensors().size(), 1u);
}

TEST_F(MalformedFile, TooShortForTheLength) { expect_error("abc", "too short"); }
TEST_F(MalformedFile, EmptyFile) { expect_error("", "too short"); }

TEST_F(MalformedFile, HeaderLengthLargerThanFile) {
  expect_error(raw_safetensors(kEntry, std::string(8, 'x'), kEntry.size() + 100), "larger than the");
}

TEST_F(MalformedFile, HeaderLengthOverLimit) {
  expect_error(raw_safetensors(kEntry, std::string(8, 'x'), 200'000'000), "exceeds the 100000000 byte limit");
  expect_error(raw_safetensors(kEntry, "", ~uint64_t{0}), "exceeds");
}

TEST_F(MalformedFile, HeaderNotJson) { expect_error(raw_safetensors("{\"w\": [1, 2", ""), "not valid JSON"); }
TEST_F(MalformedFile, EmptyHeader) { expect_error(raw_safetensors("", ""), "not valid JSON"); }
TEST_F(MalformedFile, HeaderNotAnObject) { expect_error(raw_safetensors("[1,2,3] ", ""), "not a JSON object"); }
TEST_F(MalformedFile, BinaryGarbage) {
  expect_error(raw_safetensors(std::string("\xff\xfe\x00\x01", 4), ""), "not valid JSON");
}

TEST_F(MalformedFile, UnknownDtype) {
  expect_error(raw_safetensors(R"({"w":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,8]}})", std::string(8, 'x')),
               "tensor 'w' has unknown dtype 'Q4_K'");
}

TEST_F(MalformedFile, MissingFields) {
  expect_error(raw_safetensors(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", std::string(8, 'x')), "'w' has no dtype");
  expect_error(raw_safetensors(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", std::string(8, 'x')),
               "'w' has no shape");
  expect_error(raw_safetensors(R"({"w":{"dtype":"F32","shape":[2]}})", std::string(8, 'x')), "'w' needs data_offsets");
  expect_error(raw_safetensors(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}})", std::string(8, 'x')),
               "'w' needs data_offsets");
  expect_error(raw_safetensors(R"({"w":[1,2]})", ""), "entry 'w' is not an object");
}

TEST_F(MalformedFile, BadShapesAndOffsets) {
  expect_error(raw_safetensors(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", std::string(8, 'x')),
               "'w' has a negative dimension");
  expect_error(raw_safetensors(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", std::string(8, 'x')),
               "'w' has a shape entry that is not an integer");
  expect_error(raw_safetensors(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,-8]}})", std::string(8, 'x')),
               "'w' has a data offset");
  expect_error(raw_safetensors(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", std::string(8, 'x')),
               "end before begin");
  expect_error(raw_safetensors(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                               std::string(8, 'x')),
               "'w' has an absurdly large shape");
  expect_error(raw_safetensors(R"({"w":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]}})",
                               std::string(8, 'x')),
               "'w' has an absurdly large shape");
}

TEST_F(MalformedFile, ShapeDtypeMismatch) {
  expect_error(raw_safetensors(R"({"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,8]}})", std::string(8, 'x')),
               "'w' has 8 bytes at [0, 8) but BF16 x [2] needs 4");
}

TEST_F(MalformedFile, OverlappingTensors) {
  expect_error(raw_safetensors(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},)"
                               R"("b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                               std::string(8, 'x')),
               "'b' at [4, 8) overlaps");
}

TEST_F(MalformedFile, GapBetweenTensors) {
  expect_error(raw_safetensors(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                               R"("b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})",
                               std::string(8, 'x')),
               "'b' starts at 6 but the previous tensor ends at 4");
}

TEST_F(MalformedFile, TruncatedData) {
  expect_error(raw_safetensors(kEntry, std::string(5, 'x')), "'w' ends at byte 8 of a data section of only 5 bytes");
}

TEST_F(MalformedFile, TrailingBytes) {
  expect_error(raw_safetensors(kEntry, std::string(12, 'x')), "cover 8 bytes but the data section has 12");
}

TEST_F(MalformedFile, DuplicateTensorName) {
  expect_error(raw_safetensors(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                               R"("w":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                               std::string(8, 'x')),
               "lists 'w' twice");
}

TEST_F(MalformedFile, BadMetadata) {
  expect_error(raw_safetensors(R"({"__metadata__":{"format":1}})", ""), "__metadata__ value 'format' is not a string");
  expect_error(raw_safetensors(R"({"__metadata__":"pt"})", ""), "__metadata__ is not an object");
}

TEST(ParseHeader, ToleratesPaddingAndNestedDuplicatesAreNotTopLevel) {
  std::map<std::string, std::string> metadata;
  const auto tensors = parse_header(
      R"({"__metadata__":{"a":"1"},"x":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}   )", 8, "mem", &metadata);
  ASSERT_EQ(tensors.size(), 1u);
  EXPECT_EQ(tensors[0].dtype, DType::I64);
  EXPECT_EQ(metadata.at("a"), "1");
}

TEST(ParseHeader, LargeHeadersParseInLinearTime) {
  // The real checkpoint has 23k tensors. nlohmann's parser callbacks are quadratic (minutes here); ours must
  // stay within a small factor of a plain JSON parse of the same text, whatever the machine and sanitizer.
  std::vector<PlannedTensor> tensors;
  for (int i = 0; i < 20000; ++i)
    tensors.push_back(
        {"model.layers." + std::to_string(i % 60) + ".experts." + std::to_string(i) + ".w1.weight", DType::U8, {2, 2}});
  const std::string header = serialize_header(tensors, {{"format", "pt"}}).substr(8);
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const auto plain = nlohmann::json::parse(header);
  const auto t1 = clock::now();
  const auto parsed = parse_header(header, 20000 * 4, "big", nullptr);
  const auto t2 = clock::now();
  EXPECT_EQ(plain.size(), 20001u);
  EXPECT_EQ(parsed.size(), 20000u);
  const double baseline = std::chrono::duration<double>(t1 - t0).count();
  const double ours = std::chrono::duration<double>(t2 - t1).count();
  EXPECT_LT(ours, 10 * baseline + 0.5) << "plain parse " << baseline << " s, parse_header " << ours << " s";
}

TEST(ParseHeader, RandomMutationsNeverCrash) {
  // A poor man's fuzzer that runs in every CI (the libFuzzer target runs only in the fuzz job): every
  // mutation of a valid header either parses into tensors that tile the data, or is an Error.
  const std::string valid =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
      R"("b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}})";
  std::mt19937 rng(7);
  const std::string alphabet = "{}[],:\"0123456789-.eE abcdtypshF32BU8_";
  int accepted = 0;
  for (int iteration = 0; iteration < 20000; ++iteration) {
    std::string header = valid;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng() % header.size();
      switch (rng() % 3) {
        case 0:
          header[pos] = alphabet[rng() % alphabet.size()];
          break;
        case 1:
          header.erase(pos, 1 + rng() % 3);
          break;
        default:
          header.insert(pos, 1, alphabet[rng() % alphabet.size()]);
          break;
      }
      if (header.empty()) header = "{";
    }
    const uint64_t data_size = rng() % 2 ? 22 : rng() % 64;
    try {
      const auto tensors = parse_header(header, data_size, "fuzz", nullptr);
      uint64_t end = 0;
      for (const auto& t : tensors) {
        ASSERT_EQ(t.begin, end);
        ASSERT_EQ(t.nbytes(), static_cast<uint64_t>(t.numel()) * dtype_size(t.dtype));
        end = t.end;
      }
      ASSERT_EQ(end, data_size);
      ++accepted;
    } catch (const Error&) {
    }
  }
  EXPECT_GT(accepted, 0);
}

}  // namespace
}  // namespace mxlm::io
