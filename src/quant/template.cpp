#include "quant/template.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/error.h"

namespace mxlm::quant {

const std::vector<QuantTemplate>& builtin_templates() {
  static const std::vector<QuantTemplate> templates = {
      // shared/seed/model-card-amd-minimax-m3-mxfp4.txt, "Register template".
      {"minimax_m3_vl",
       {"*language_model.*k_proj", "*language_model.*v_proj"},
       {"*language_model.*q_proj"},
       {"*lm_head", "*vision_tower*", "*multi_modal_projector*", "*patch_merge_mlp*", "*block_sparse_moe.gate",
        "*self_attn.index_*"}},
      // Generic: Quark's llama-family defaults, with the lm_head pattern also matching nested heads.
      {"default", {"*k_proj", "*v_proj"}, {"*q_proj"}, {"*lm_head"}},
  };
  return templates;
}

const QuantTemplate& find_template(std::string_view model_type) {
  std::vector<std::string> names;
  for (const auto& t : builtin_templates()) {
    if (t.model_type == model_type) return t;
    names.push_back(t.model_type);
  }
  fail("unknown quantization template '{}' (available: {})", model_type, fmt::join(names, ", "));
}

std::vector<std::string> effective_excludes(const QuantTemplate& tmpl,
                                            const std::optional<std::vector<std::string>>& exclude_layers) {
  return exclude_layers ? *exclude_layers : tmpl.exclude_layers_name;
}

bool is_supported_scheme(std::string_view scheme) { return scheme == "mxfp4"; }

}  // namespace mxlm::quant
