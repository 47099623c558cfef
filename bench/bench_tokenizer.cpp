// Tokenizer throughput on the gpt-oss tokenizer (o200k pattern): encode MB/s over the GSM8K test
// questions and answers (data/gsm8k/test.jsonl; the hand-written tokenizer corpus when absent),
// one call per line on one thread, the way the server encodes prompts. tools/bench_tokenizer_hf.py
// measures Hugging Face `tokenizers` on the same corpus.
#include <benchmark/benchmark.h>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "text/detokenizer.h"
#include "text/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using mxlm::text::Tokenizer;

fs::path source_dir() {
  if (const char* env = std::getenv("MXLM_SOURCE_DIR")) return env;
  return fs::path(__FILE__).parent_path().parent_path();
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) mxlm::fail("cannot read {}", path.string());
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string xz_decompress(const fs::path& path) {
  const std::string command = "xz -dc '" + path.string() + "'";
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) mxlm::fail("cannot run {}", command);
  std::string out;
  char buffer[1 << 16];
  size_t n = 0;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) out.append(buffer, n);
  if (pclose(pipe) != 0) mxlm::fail("{} failed", command);
  return out;
}

const Tokenizer& gptoss() {
  static const Tokenizer tokenizer = [] {
    const fs::path dir = source_dir() / "tests/fixtures/tokenizers/gptoss";
    return Tokenizer::from_json(xz_decompress(dir / "tokenizer.json.xz"), read_file(dir / "tokenizer_config.json"));
  }();
  return tokenizer;
}

const std::vector<std::string>& corpus() {
  static const std::vector<std::string> lines = [] {
    std::vector<std::string> out;
    const fs::path gsm8k = source_dir() / "data/gsm8k/test.jsonl";
    std::istringstream in(fs::exists(gsm8k) ? read_file(gsm8k)
                                            : read_file(source_dir() / "tests/fixtures/tokenizer_corpus.txt"));
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') continue;
      const auto value = nlohmann::json::parse(line);
      if (value.is_object()) {
        out.push_back(value["question"].get<std::string>());
        out.push_back(value["answer"].get<std::string>());
      } else {
        out.push_back(value.get<std::string>());
      }
    }
    return out;
  }();
  return lines;
}

size_t corpus_bytes() {
  size_t bytes = 0;
  for (const auto& line : corpus()) bytes += line.size();
  return bytes;
}

void BM_EncodeGsm8k(benchmark::State& state) {
  const Tokenizer& tokenizer = gptoss();
  size_t tokens = 0;
  for (auto _ : state) {
    for (const auto& line : corpus()) {
      auto ids = tokenizer.encode(line);
      tokens += ids.size();
      benchmark::DoNotOptimize(ids.data());
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * corpus_bytes()));
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsRate);
  state.counters["lines"] = static_cast<double>(corpus().size());
}
BENCHMARK(BM_EncodeGsm8k)->Unit(benchmark::kMillisecond);

// The whole corpus as one text: long inputs, one regex scan.
void BM_EncodeGsm8kOneText(benchmark::State& state) {
  const Tokenizer& tokenizer = gptoss();
  std::string text;
  for (const auto& line : corpus()) text += line + "\n";
  for (auto _ : state) {
    auto ids = tokenizer.encode(text);
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
}
BENCHMARK(BM_EncodeGsm8kOneText)->Unit(benchmark::kMillisecond);

void BM_DecodeGsm8k(benchmark::State& state) {
  const Tokenizer& tokenizer = gptoss();
  std::vector<std::vector<uint32_t>> encoded;
  size_t tokens = 0;
  for (const auto& line : corpus()) {
    encoded.push_back(tokenizer.encode(line));
    tokens += encoded.back().size();
  }
  for (auto _ : state) {
    for (const auto& ids : encoded) benchmark::DoNotOptimize(tokenizer.decode(ids));
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * tokens));
}
BENCHMARK(BM_DecodeGsm8k)->Unit(benchmark::kMillisecond);

// Streaming: one add() per generated token, as the server does.
void BM_IncrementalDetokenizeGsm8k(benchmark::State& state) {
  const Tokenizer& tokenizer = gptoss();
  std::vector<std::vector<uint32_t>> encoded;
  size_t tokens = 0;
  for (const auto& line : corpus()) {
    encoded.push_back(tokenizer.encode(line));
    tokens += encoded.back().size();
  }
  for (auto _ : state) {
    for (const auto& ids : encoded) {
      mxlm::text::IncrementalDetokenizer detokenizer(tokenizer);
      for (uint32_t id : ids) benchmark::DoNotOptimize(detokenizer.add(id));
      benchmark::DoNotOptimize(detokenizer.flush());
    }
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * tokens));
}
BENCHMARK(BM_IncrementalDetokenizeGsm8k)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
