#include "model/dummy_weights.h"

#include <xxhash.h>

#include "core/error.h"
#include "quant/plan.h"

namespace mxlm::model {

using backend::WeightFormat;

namespace {

size_t stored_bytes(WeightFormat f, int64_t rows, int64_t cols) {
  const auto n = static_cast<size_t>(rows) * static_cast<size_t>(cols);
  switch (f) {
    case WeightFormat::F32:
      return n * 4;
    case WeightFormat::BF16:
    case WeightFormat::F16:
      return n * 2;
    case WeightFormat::MXFP4:
      return n / 2 + n / 32;
  }
  return 0;
}

}  // namespace

DummyWeights::DummyWeights(const io::ModelConfig& config, backend::Backend& backend,
                           std::optional<WeightFormat> float_format, uint64_t seed)
    : backend_(backend), float_format_(float_format), seed_(seed), tied_(config.text.tie_word_embeddings) {
  if (float_format_ && *float_format_ != WeightFormat::F32 && *float_format_ != WeightFormat::BF16)
    fail("dummy weights: float weights must be float32 or bfloat16, not {}",
         backend::weight_format_name(*float_format_));
  if (!config.quantization_config) return;
  const nlohmann::json& q = *config.quantization_config;
  const std::string method = q.value("quant_method", "");
  const nlohmann::json weight = q.contains("global_quant_config") && q["global_quant_config"].is_object()
                                    ? q["global_quant_config"].value("weight", nlohmann::json())
                                    : nlohmann::json();
  const bool fp4 = weight.is_object() && weight.value("dtype", "") == "fp4" && weight.value("group_size", 0) == 32;
  if (method != "quark" || !fp4)
    fail(
        "dummy weights: quantization_config (quant_method '{}') is not Quark MXFP4 (global_quant_config.weight: fp4 "
        "in groups of 32), the only quantized format this project loads",
        method);
  mxfp4_ = true;
  if (q.contains("exclude")) {
    if (!q["exclude"].is_array()) fail("dummy weights: quantization_config.exclude is not a list");
    for (const auto& p : q["exclude"]) {
      if (!p.is_string()) fail("dummy weights: quantization_config.exclude has a non-string entry {}", p.dump());
      exclude_.emplace_back(p.get<std::string>());
    }
  }
}

WeightFormat DummyWeights::format_of(const std::string& stem, bool force_f32) const {
  if (force_f32) return WeightFormat::F32;
  if (mxfp4_ && quant::is_linear_weight_name(stem + ".weight") && !quant::matches_any(exclude_, stem))
    return WeightFormat::MXFP4;
  return float_format_.value_or(WeightFormat::BF16);
}

uint64_t DummyWeights::seed_of(const std::string& name) const {
  return XXH3_64bits_withSeed(name.data(), name.size(), seed_);
}

std::unique_ptr<backend::Weight> DummyWeights::matrix(const std::string& stem, int64_t rows, int64_t cols, Shard shard,
                                                      bool force_f32) {
  int64_t r0 = 0, nr = rows, c0 = 0, nc = cols;
  if (shard.split == Shard::Split::Rows) r0 = shard.begin, nr = shard.count;
  if (shard.split == Shard::Split::Cols) c0 = shard.begin, nc = shard.count;
  if (r0 < 0 || nr <= 0 || r0 + nr > rows || c0 < 0 || nc <= 0 || c0 + nc > cols)
    fail("shard [{}+{}, {}+{}] outside {}.weight [{}, {}]", r0, nr, c0, nc, stem, rows, cols);
  const WeightFormat f = format_of(stem, force_f32);
  if (f == WeightFormat::MXFP4 && (cols % 32 != 0 || nc % 32 != 0))
    fail("dummy MXFP4 weight {}.weight has {} input columns (shard {}), not a multiple of 32", stem, cols, nc);
  // The rank's piece is its own random draw: seeded by the name and the piece's offset.
  const uint64_t seed = seed_of(stem) ^ (static_cast<uint64_t>(r0) * 0x100000001B3ull + static_cast<uint64_t>(c0));
  bytes_loaded_ += stored_bytes(f, nr, nc);
  return backend_.random_weight(f, nr, nc, seed);
}

std::unique_ptr<backend::Buffer> DummyWeights::vector(const std::string& name, int64_t n) {
  if (n <= 0) fail("dummy vector {} of {} elements", name, n);
  uint64_t state = seed_of(name);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;  // LCG: the top 24 bits are plenty here
    x = (static_cast<float>(state >> 40) / 16777216.0f * 2.0f - 1.0f) * 0.05f;
  }
  return backend_.upload_vector(v);
}

bool DummyWeights::has(const std::string& name) const {
  const std::string head = "lm_head.weight";
  const bool lm_head = name.size() >= head.size() && name.compare(name.size() - head.size(), head.size(), head) == 0;
  return !lm_head || !tied_;
}

io::ModelConfig slice_layers(const io::ModelConfig& config, int first, int count) {
  io::ModelConfig c = config;
  io::TextConfig& t = c.text;
  if (first < 0 || count <= 0 || first + count > t.num_layers)
    fail("layers {}..{} requested but the model has {} layers", first, first + count - 1, t.num_layers);
  if (static_cast<int>(t.layer_is_moe.size()) != t.num_layers ||
      static_cast<int>(t.layer_is_sparse.size()) != t.num_layers)
    fail("config: per-layer MoE/sparse flags do not cover {} layers", t.num_layers);
  t.layer_is_moe.assign(config.text.layer_is_moe.begin() + first, config.text.layer_is_moe.begin() + first + count);
  t.layer_is_sparse.assign(config.text.layer_is_sparse.begin() + first,
                           config.text.layer_is_sparse.begin() + first + count);
  t.num_layers = count;
  return c;
}

std::unique_ptr<M3Model> make_dummy_m3_model(const io::ModelConfig& config, backend::Backend& backend,
                                             ModelOptions options, uint64_t seed) {
  DummyWeights weights(config, backend, options.float_format, seed);
  return std::make_unique<M3Model>(config, weights, backend, options);
}

}  // namespace mxlm::model
