// Options shared by the subcommands that load a model (logits, generate, serve, bench): token lists, the
// weight dtype override, the backend a --device / --moe-backend pair selects and the model's tensor-parallel ranks.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "engine/model_runner.h"
#include "engine/tp_ranks.h"
#include "model/m3_model.h"

namespace CLI {
class App;
}

namespace mxlm::cli {

// --moe-backend of every command that loads a model (logits, generate, serve, bench decode): one default and one
// help text, so that no command serves through a different MoE path by accident (serve once defaulted to emulation).
inline constexpr const char* kDefaultMoeBackend = "native";
void add_moe_backend_option(CLI::App& cmd, std::string& moe_backend);

// "1,2,3" -> {1, 2, 3}; an Error naming the bad entry.
std::vector<int32_t> parse_token_list(const std::string& text);
// "auto" (as stored), "float32" or "bfloat16".
std::optional<backend::WeightFormat> parse_weight_dtype(const std::string& dtype);
// device: cpu | cuda; moe_backend: native | emulation (MXFP4 experts on CUDA; the CPU backend always computes the
// emulation math exactly).
// --kv-cache-dtype: auto (the backend's own, float32), float32 or bfloat16 (CUDA only: half the bytes decode attention
// reads); an Error naming the flag otherwise, or for bfloat16 on the CPU.
DType parse_kv_cache_dtype(const std::string& kv_cache_dtype, const std::string& device);
std::unique_ptr<backend::Backend> make_backend(const std::string& device, const std::string& moe_backend,
                                               const std::string& kv_cache_dtype = "auto");
std::unique_ptr<backend::Backend> make_backend(const std::string& device);

// A model on --tensor-parallel-size ranks of one --device (load_model.cpp). Rank 0's backend and model are the
// caller's, driven like a TP = 1 model; ranks 1.. load at the same time on threads of their own (engine::TpRanks:
// CPU ranks meet in a thread group, CUDA ranks are GPUs 0 .. size-1 with NCCL). attach() every ModelRunner made on
// `model` before its first step, so that its steps run on all ranks.
struct LoadedModel {
  std::unique_ptr<backend::Backend> backend;  // rank 0's
  std::unique_ptr<model::M3Model> model;      // rank 0's
  std::unique_ptr<engine::TpRanks> ranks;     // null at TP = 1
  int tensor_parallel_size() const { return ranks ? ranks->size() : 1; }
  void attach(engine::ModelRunner& runner) {
    if (ranks) ranks->attach(runner);
  }
};
// Loads one rank's model on its backend (options.tp says which rank).
using RankLoader = std::function<std::unique_ptr<model::M3Model>(backend::Backend&, const model::ModelOptions&)>;
LoadedModel load_model(const std::string& device, const std::string& moe_backend, int tensor_parallel_size,
                       const model::ModelOptions& options, const RankLoader& load,
                       const std::string& kv_cache_dtype = "auto");
// A model directory (config.json + safetensors).
LoadedModel load_model(const std::string& device, const std::string& moe_backend, int tensor_parallel_size,
                       const model::ModelOptions& options, const std::string& model_dir,
                       const std::string& kv_cache_dtype = "auto");

}  // namespace mxlm::cli
