// The `quantization_config` AMD Quark 0.13 writes into config.json for the "mxfp4" scheme in file-to-file mode
// (quark/torch/quantization/file2file_quantization.py `_export_quant_config`, QConfig.to_dict), field for
// field and in Quark's key order. `exclude` is not the pattern list: Quark resolves the patterns against the
// checkpoint and writes the sorted exact names of the excluded linear modules. tools/quark_compare.sh checks
// this against a real Quark run.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace mxlm::quant {

// The Quark version whose export format this reproduces (written as `version`).
inline constexpr std::string_view kQuarkFormatVersion = "0.13";

nlohmann::ordered_json quark_mxfp4_quantization_config(const std::vector<std::string>& excluded_modules);

// The output config.json text: the input config (key order kept) with every nested `quantization_config`
// removed and Quark's appended at the top level; 4-space indent like Quark's json.dump. Error when the input
// is not a JSON object.
std::string quantized_config_json(std::string_view input_config_json, const nlohmann::ordered_json& quantization_config,
                                  const std::string& origin);

}  // namespace mxlm::quant
