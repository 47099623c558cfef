#include "quant/quark_config.h"

#include "core/error.h"

namespace mxlm::quant {
namespace {

using ojson = nlohmann::ordered_json;

// OCP_MXFP4Spec(ch_axis=-1, is_dynamic=...).to_quantization_spec() as QTensorConfig.to_dict() writes it.
ojson mxfp4_tensor_spec(bool is_dynamic) {
  ojson spec;
  spec["dtype"] = "fp4";
  spec["is_dynamic"] = is_dynamic;
  spec["qscheme"] = "per_group";
  spec["ch_axis"] = -1;
  spec["group_size"] = 32;
  spec["block_size"] = nullptr;
  spec["symmetric"] = nullptr;
  spec["round_method"] = "half_even";
  spec["scale_type"] = "float";
  spec["zero_point_type"] = "int32";
  spec["scale_format"] = "e8m0";
  spec["scale_calculation_mode"] = "even";
  spec["mx_element_dtype"] = nullptr;
  spec["observer_cls"] = "PerBlockMXObserver";
  spec["is_scale_quant"] = false;
  spec["enable_buffer_reuse"] = false;
  spec["max_input_numel"] = 4194304;
  return spec;
}

void remove_quantization_config(ojson& value) {
  if (!value.is_object()) return;
  value.erase("quantization_config");
  for (auto& [key, child] : value.items()) remove_quantization_config(child);
}

}  // namespace

ojson quark_mxfp4_quantization_config(const std::vector<std::string>& excluded_modules) {
  ojson global;
  global["input_tensors"] = mxfp4_tensor_spec(true);
  global["output_tensors"] = nullptr;
  global["weight"] = mxfp4_tensor_spec(false);
  global["bias"] = nullptr;
  global["target_device"] = nullptr;

  ojson config;
  config["global_quant_config"] = std::move(global);
  config["exclude"] = excluded_modules;
  config["algo_config"] = nullptr;
  config["softmax_quant_spec"] = nullptr;
  config["quant_method"] = "quark";
  config["layer_type_quant_config"] = ojson::object();
  config["layer_quant_config"] = ojson::object();
  config["kv_cache_quant_config"] = ojson::object();
  config["kv_cache_post_rope"] = false;
  config["quant_mode"] = "eager_mode";
  config["version"] = std::string(kQuarkFormatVersion);
  config["export"] = ojson{{"kv_cache_group", ojson::array()},
                           {"min_kv_scale", 0.0},
                           {"pack_method", "reorder"},
                           {"weight_format", "real_quantized"},
                           {"weight_merge_groups", nullptr}};
  return config;
}

std::string quantized_config_json(std::string_view input_config_json, const ojson& quantization_config,
                                  const std::string& origin) {
  ojson config;
  try {
    config = ojson::parse(input_config_json);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON ({})", origin, e.what());
  }
  if (!config.is_object()) fail("{}: expected a JSON object", origin);
  remove_quantization_config(config);
  config["quantization_config"] = quantization_config;
  try {
    return config.dump(4, ' ', false);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: cannot write the quantized config ({})", origin, e.what());
  }
}

}  // namespace mxlm::quant
