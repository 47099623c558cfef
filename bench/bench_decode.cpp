// CPU decode throughput of a small-but-not-tiny random MiniMax-M3 (written to a temporary checkpoint in the
// upstream layout, then loaded like any model): tokens/s of single-sequence decode steps at a few context
// lengths, with BF16 weights and with MXFP4 experts (emulation: QDQ'd activations).
//   Model: hidden 1024, 4 layers (1 dense/full + 3 MoE/sparse), 16 heads / 4 KV heads of 64 (rotary 32),
//   16 experts of 512 (top-4) + shared 512, dense MLP 2048, vocab 8192, sparse blocks of 64 (top-4).
#include <benchmark/benchmark.h>

#include <nlohmann/json.hpp>

#include <unistd.h>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>

#include "backend/backend.h"
#include "core/dtype.h"
#include "engine/model_runner.h"
#include "io/safetensors.h"
#include "model/m3_model.h"
#include "mx/mxfp4.h"

namespace {

namespace fs = std::filesystem;
using namespace mxlm;

constexpr int kHidden = 1024, kLayers = 4, kHeads = 16, kKv = 4, kHeadDim = 64, kExperts = 16, kInter = 512,
              kDenseInter = 2048, kVocab = 8192, kBlock = 64, kIndexDim = 64;

nlohmann::json config() {
  nlohmann::json t = {{"vocab_size", kVocab},
                      {"hidden_size", kHidden},
                      {"num_hidden_layers", kLayers},
                      {"num_attention_heads", kHeads},
                      {"num_key_value_heads", kKv},
                      {"head_dim", kHeadDim},
                      {"intermediate_size", kInter},
                      {"dense_intermediate_size", kDenseInter},
                      {"shared_intermediate_size", kInter},
                      {"n_shared_experts", 1},
                      {"num_local_experts", kExperts},
                      {"num_experts_per_tok", 4},
                      {"routed_scaling_factor", 2.0},
                      {"moe_layer_freq", {0, 1, 1, 1}},
                      {"rotary_dim", 32},
                      {"rope_theta", 5000000.0},
                      {"rms_norm_eps", 1e-6},
                      {"max_position_embeddings", 65536},
                      {"sparse_attention_config",
                       {{"use_sparse_attention", true},
                        {"sparse_attention_freq", {0, 1, 1, 1}},
                        {"sparse_num_index_heads", kKv},
                        {"sparse_index_dim", kIndexDim},
                        {"sparse_block_size", kBlock},
                        {"sparse_topk_blocks", 4},
                        {"sparse_local_block", 1},
                        {"sparse_init_block", 0}}}};
  return {{"architectures", {"MiniMaxM3SparseForConditionalGeneration"}},
          {"model_type", "minimax_m3_vl"},
          {"text_config", t}};
}

// Removes the temporary checkpoints when the benchmark exits.
struct TempDirs {
  std::vector<fs::path> dirs;
  ~TempDirs() {
    for (const auto& d : dirs) fs::remove_all(d);
  }
} temp_dirs;

// Writes the random checkpoint once per variant; returns its directory.
fs::path make_checkpoint(bool mxfp4_experts) {
  const fs::path dir = fs::temp_directory_path() /
                       ("mxlm_bench_decode_" + std::to_string(::getpid()) + (mxfp4_experts ? "_mxfp4" : "_bf16"));
  if (fs::exists(dir / "model.safetensors")) return dir;
  fs::create_directories(dir);
  temp_dirs.dirs.push_back(dir);
  std::ofstream(dir / "config.json") << config().dump(2);
  std::mt19937 rng(1);
  std::map<std::string, std::vector<uint8_t>> data;
  std::vector<io::PlannedTensor> plan;
  auto add_float = [&](const std::string& name, std::vector<int64_t> shape, float stddev, bool f32 = false) {
    size_t n = 1;
    for (auto d : shape) n *= static_cast<size_t>(d);
    std::normal_distribution<float> dist(0.0f, stddev);
    std::vector<uint8_t> bytes(n * (f32 ? 4 : 2));
    for (size_t i = 0; i < n; ++i) {
      const float v = dist(rng);
      if (f32) {
        std::memcpy(bytes.data() + 4 * i, &v, 4);
      } else {
        const uint16_t b = f32_to_bf16(v);
        std::memcpy(bytes.data() + 2 * i, &b, 2);
      }
    }
    plan.push_back({name, f32 ? DType::F32 : DType::BF16, shape});
    data[name] = std::move(bytes);
  };
  auto add_linear = [&](const std::string& stem, int64_t rows, int64_t cols, bool mx) {
    const float sd = 1.0f / std::sqrt(static_cast<float>(cols));
    if (!mx) return add_float(stem + ".weight", {rows, cols}, sd);
    std::normal_distribution<float> dist(0.0f, sd);
    std::vector<float> w(static_cast<size_t>(rows * cols));
    for (auto& v : w) v = dist(rng);
    std::vector<uint8_t> packed(w.size() / 2), scales(w.size() / 32);
    mx::quantize_f32(w.data(), static_cast<size_t>(rows), static_cast<size_t>(cols), packed.data(), scales.data());
    plan.push_back({stem + ".weight", DType::U8, {rows, cols / 2}});
    plan.push_back({stem + ".weight_scale", DType::U8, {rows, cols / 32}});
    data[stem + ".weight"] = std::move(packed);
    data[stem + ".weight_scale"] = std::move(scales);
  };
  const std::string lm = "language_model.";
  add_float(lm + "model.embed_tokens.weight", {kVocab, kHidden}, 1.0f);
  add_float(lm + "model.norm.weight", {kHidden}, 0.1f);
  add_linear(lm + "lm_head", kVocab, kHidden, false);
  for (int i = 0; i < kLayers; ++i) {
    const std::string p = lm + "model.layers." + std::to_string(i) + ".";
    add_float(p + "input_layernorm.weight", {kHidden}, 0.1f);
    add_float(p + "post_attention_layernorm.weight", {kHidden}, 0.1f);
    add_linear(p + "self_attn.q_proj", kHeads * kHeadDim, kHidden, false);
    add_linear(p + "self_attn.k_proj", kKv * kHeadDim, kHidden, false);
    add_linear(p + "self_attn.v_proj", kKv * kHeadDim, kHidden, false);
    add_linear(p + "self_attn.o_proj", kHidden, kHeads * kHeadDim, false);
    add_float(p + "self_attn.q_norm.weight", {kHeadDim}, 0.1f);
    add_float(p + "self_attn.k_norm.weight", {kHeadDim}, 0.1f);
    if (i == 0) {
      add_linear(p + "mlp.gate_proj", kDenseInter, kHidden, false);
      add_linear(p + "mlp.up_proj", kDenseInter, kHidden, false);
      add_linear(p + "mlp.down_proj", kHidden, kDenseInter, false);
      continue;
    }
    add_linear(p + "self_attn.index_q_proj", kKv * kIndexDim, kHidden, false);
    add_linear(p + "self_attn.index_k_proj", kIndexDim, kHidden, false);
    add_float(p + "self_attn.index_q_norm.weight", {kIndexDim}, 0.1f);
    add_float(p + "self_attn.index_k_norm.weight", {kIndexDim}, 0.1f);
    const std::string m = p + "block_sparse_moe.";
    add_float(m + "gate.weight", {kExperts, kHidden}, 0.05f, true);
    add_float(m + "e_score_correction_bias", {kExperts}, 0.01f, true);
    for (int e = 0; e < kExperts; ++e) {
      const std::string x = m + "experts." + std::to_string(e) + ".";
      add_linear(x + "w1", kInter, kHidden, mxfp4_experts);
      add_linear(x + "w3", kInter, kHidden, mxfp4_experts);
      add_linear(x + "w2", kHidden, kInter, mxfp4_experts);
    }
    add_linear(m + "shared_experts.gate_proj", kInter, kHidden, mxfp4_experts);
    add_linear(m + "shared_experts.up_proj", kInter, kHidden, mxfp4_experts);
    add_linear(m + "shared_experts.down_proj", kHidden, kInter, mxfp4_experts);
  }
  io::SafetensorsWriter w(dir / "model.safetensors", plan);
  for (const auto& t : plan) w.write(t.name, data[t.name]);
  w.commit();
  return dir;
}

void BM_Decode(benchmark::State& state) {
  const bool mx = state.range(0) != 0;
  const int32_t context = static_cast<int32_t>(state.range(1));
  const fs::path dir = make_checkpoint(mx);
  auto be = backend::make_cpu_backend();
  auto model = model::load_m3_model(dir, *be);
  const int32_t steps_per_seq = 64;
  engine::ModelRunner runner(*model, engine::cache_config_for(*model, context + steps_per_seq + 1));
  std::mt19937 rng(7);
  engine::Sequence seq;
  int32_t decoded = steps_per_seq;
  int64_t tokens = 0;
  for (auto _ : state) {
    if (decoded == steps_per_seq) {
      // A fresh sequence prefilled to `context` tokens (not timed).
      state.PauseTiming();
      runner.release(seq);
      seq = engine::Sequence{};
      for (int32_t i = 0; i < context; ++i) seq.tokens.push_back(static_cast<int32_t>(rng() % kVocab));
      runner.admit(seq);
      engine::StepItem prefill{&seq, context, false};
      runner.step({&prefill, 1});
      decoded = 0;
      state.ResumeTiming();
    }
    seq.tokens.push_back(static_cast<int32_t>(rng() % kVocab));
    engine::StepItem item{&seq, 1, false};
    auto out = runner.step({&item, 1});
    benchmark::DoNotOptimize(out.logits.data());
    ++decoded;
    ++tokens;
  }
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsRate);
  state.counters["weight_MB"] = static_cast<double>(model->weight_bytes()) / 1e6;
  state.SetLabel(mx ? "mxfp4 experts" : "bf16");
}

BENCHMARK(BM_Decode)
    ->ArgNames({"mxfp4", "context"})
    ->Args({0, 128})
    ->Args({0, 2048})
    ->Args({1, 128})
    ->Args({1, 2048})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
