// Options shared by the subcommands that load a model (logits, generate, serve, bench): token lists, the
// weight dtype override and the backend a --device / --moe-backend pair selects.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace mxlm::cli {

// "1,2,3" -> {1, 2, 3}; an Error naming the bad entry.
std::vector<int32_t> parse_token_list(const std::string& text);
// "auto" (as stored), "float32" or "bfloat16".
std::optional<backend::WeightFormat> parse_weight_dtype(const std::string& dtype);
// device: cpu | cuda; moe_backend: native | emulation (MXFP4 experts on CUDA; the CPU backend always computes the
// emulation math exactly).
std::unique_ptr<backend::Backend> make_backend(const std::string& device, const std::string& moe_backend);
std::unique_ptr<backend::Backend> make_backend(const std::string& device);

}  // namespace mxlm::cli
