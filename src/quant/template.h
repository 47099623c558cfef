// Quantization templates, modelled on AMD Quark's LLMTemplate: a model type with its q layer, kv layers and the
// default exclude list. `minimax_m3_vl` is the template the amd/MiniMax-M3-MXFP4 seed script registers (its
// exclude list differs from Quark 0.13's own built-in one: `*self_attn.index_*` instead of `*self_attn*`).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mxlm::quant {

struct QuantTemplate {
  std::string model_type;
  std::vector<std::string> kv_layers_name;
  std::vector<std::string> q_layer_name;
  std::vector<std::string> exclude_layers_name;
};

// Built-in templates: "minimax_m3_vl" and "default" (generic: only `*lm_head` excluded).
const std::vector<QuantTemplate>& builtin_templates();
// Error listing the available names when unknown.
const QuantTemplate& find_template(std::string_view model_type);

// The exclude list Quark's template.get_config(scheme, exclude_layers=...) puts into the config: the caller's
// list REPLACES the template's whenever one is given (even an empty one); only without one does the
// template's default apply.
std::vector<std::string> effective_excludes(const QuantTemplate& tmpl,
                                            const std::optional<std::vector<std::string>>& exclude_layers);

// The schemes this quantizer writes (Quark scheme names).
bool is_supported_scheme(std::string_view scheme);

}  // namespace mxlm::quant
