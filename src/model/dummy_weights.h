// `--load-format dummy` (vLLM's name): a model built from config.json alone, with random weights made by the
// backend (on the GPU for the CUDA backend), to benchmark full-size configurations without downloading them.
// Formats follow the checkpoint the config describes: with a Quark MXFP4 `quantization_config`, every linear
// weight that its `exclude` list does not match is MXFP4 (the AMD checkpoint: routed and shared experts), the
// rest BF16 (the upstream dtype; the router F32 as upstream) or `float_format` when given.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/model_config.h"
#include "model/m3_model.h"
#include "model/weight_loader.h"
#include "quant/pattern.h"

namespace mxlm::model {

class DummyWeights final : public WeightSource {
 public:
  // Seeds derive from `seed` and each tensor's name, so a tensor's values do not depend on load order.
  DummyWeights(const io::ModelConfig& config, backend::Backend& backend,
               std::optional<backend::WeightFormat> float_format, uint64_t seed = 0);

  std::unique_ptr<backend::Weight> matrix(const std::string& stem, int64_t rows, int64_t cols,
                                          Shard shard = Shard::whole(), bool force_f32 = false) override;
  // Norm weights and router biases: small random values (uniform in +-0.05) made on the host.
  std::unique_ptr<backend::Buffer> vector(const std::string& name, int64_t n) override;
  // Every tensor the config implies exists; lm_head only when the embeddings are not tied.
  bool has(const std::string& name) const override;
  uint64_t bytes_loaded() const override { return bytes_loaded_; }
  std::string origin() const override { return "dummy weights"; }

  // The format `<stem>.weight` gets (before sharding), as the rules above decide.
  backend::WeightFormat format_of(const std::string& stem, bool force_f32 = false) const;

 private:
  uint64_t seed_of(const std::string& name) const;

  backend::Backend& backend_;
  std::optional<backend::WeightFormat> float_format_;
  uint64_t seed_;
  bool tied_;
  bool mxfp4_ = false;  // the config's quantization_config is Quark MXFP4 (fp4 weights in groups of 32)
  std::vector<quant::LayerPattern> exclude_;
  uint64_t bytes_loaded_ = 0;
};

// The config restricted to layers [first, first + count) of the model, renumbered from 0 with their kinds (dense
// or MoE MLP, full or sparse attention) kept: e.g. the real MiniMax-M3 with 4 layers. An Error outside the model.
io::ModelConfig slice_layers(const io::ModelConfig& config, int first, int count);

// A model of `config` with dummy weights on `backend`.
std::unique_ptr<M3Model> make_dummy_m3_model(const io::ModelConfig& config, backend::Backend& backend,
                                             ModelOptions options = {}, uint64_t seed = 0);

}  // namespace mxlm::model
