// config.json -> ModelConfig. Two spellings exist for the same model: the upstream MiniMax release
// (sparse_attention_config, moe_layer_freq, ...) and transformers 5.17 (layer_types, mlp_layer_types,
// index_*), and a config saved by transformers carries both. Each quantity is read from whichever is
// present; when both are, they must agree. Defaults are transformers 5.17's (the real model's values).
#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/log.h"
#include "io/model_config.h"

namespace mxlm::io {
namespace {

using nlohmann::json;

const json& empty_object() {
  static const json empty = json::object();
  return empty;
}

// Reads typed fields of one JSON object and names "<origin>: <section>.<field>" in every error.
class Fields {
 public:
  Fields(const json& object, std::string origin, std::string section)
      : object_(object), origin_(std::move(origin)), section_(std::move(section)) {}

  std::string where(std::string_view key) const {
    return section_.empty() ? fmt::format("{}: {}", origin_, key) : fmt::format("{}: {}.{}", origin_, section_, key);
  }
  const json* find(std::string_view key) const {
    auto it = object_.find(key);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(std::string_view key) const { return find(key) != nullptr; }

  int64_t integer(std::string_view key, int64_t fallback) const {
    const json* value = find(key);
    if (!value) return fallback;
    return as_integer(*value, key);
  }
  int64_t as_integer(const json& value, std::string_view key) const {
    if (value.is_number_integer()) {
      if (value.is_number_unsigned() && value.get<uint64_t>() > static_cast<uint64_t>(INT32_MAX))
        fail("{} = {} is out of range", where(key), value.dump());
      const auto v = value.get<int64_t>();
      if (v < INT32_MIN || v > INT32_MAX) fail("{} = {} is out of range", where(key), v);
      return v;
    }
    // Some writers emit 4.0 for 4; accept whole floats, nothing else.
    if (value.is_number_float()) {
      const double v = value.get<double>();
      if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) <= INT32_MAX) return static_cast<int64_t>(v);
    }
    fail("{} must be an integer, got {}", where(key), value.dump());
  }
  int positive(std::string_view key, int64_t fallback) const {
    const int64_t v = integer(key, fallback);
    if (v <= 0) fail("{} must be positive, got {}", where(key), v);
    return static_cast<int>(v);
  }
  int non_negative(std::string_view key, int64_t fallback) const {
    const int64_t v = integer(key, fallback);
    if (v < 0) fail("{} must not be negative, got {}", where(key), v);
    return static_cast<int>(v);
  }
  double number(std::string_view key, double fallback) const {
    const json* value = find(key);
    if (!value) return fallback;
    if (!value->is_number()) fail("{} must be a number, got {}", where(key), value->dump());
    const double v = value->get<double>();
    if (!std::isfinite(v)) fail("{} must be finite", where(key));
    return v;
  }
  bool boolean(std::string_view key, bool fallback) const {
    const json* value = find(key);
    if (!value) return fallback;
    if (value->is_boolean()) return value->get<bool>();
    if (value->is_number_integer() && (value->get<int64_t>() == 0 || value->get<int64_t>() == 1))
      return value->get<int64_t>() == 1;
    fail("{} must be true or false, got {}", where(key), value->dump());
  }
  std::string string(std::string_view key, std::string fallback) const {
    const json* value = find(key);
    if (!value) return fallback;
    if (!value->is_string()) fail("{} must be a string, got {}", where(key), value->dump());
    return value->get<std::string>();
  }
  const json* object(std::string_view key) const {
    const json* value = find(key);
    if (value && !value->is_object()) fail("{} must be an object", where(key));
    return value;
  }
  const json* array(std::string_view key) const {
    const json* value = find(key);
    if (value && !value->is_array()) fail("{} must be a list", where(key));
    return value;
  }

 private:
  const json& object_;
  std::string origin_;
  std::string section_;
};

// A per-layer list of 0/1 flags (moe_layer_freq, sparse_attention_freq).
std::vector<bool> flag_list(const Fields& fields, std::string_view key) {
  const json* list = fields.find(key);
  if (!list) return {};
  if (!list->is_array()) fail("{} must be a list of 0/1 per layer, got {}", fields.where(key), list->dump());
  std::vector<bool> flags;
  for (const auto& item : *list) {
    if (item.is_boolean()) {
      flags.push_back(item.get<bool>());
    } else if (item.is_number_integer() && (item.get<int64_t>() == 0 || item.get<int64_t>() == 1)) {
      flags.push_back(item.get<int64_t>() == 1);
    } else {
      fail("{} must hold only 0 or 1, got {}", fields.where(key), item.dump());
    }
  }
  return flags;
}

// A per-layer list of names (layer_types, mlp_layer_types): `yes` -> true, `no` -> false.
std::vector<bool> name_list(const Fields& fields, std::string_view key, std::string_view yes, std::string_view no) {
  const json* list = fields.array(key);
  if (!list) return {};
  std::vector<bool> flags;
  for (const auto& item : *list) {
    if (item.is_string() && item.get<std::string>() == yes) {
      flags.push_back(true);
    } else if (item.is_string() && item.get<std::string>() == no) {
      flags.push_back(false);
    } else {
      fail("{} entries must be \"{}\" or \"{}\", got {}", fields.where(key), yes, no, item.dump());
    }
  }
  return flags;
}

// Reconciles the two spellings of one per-layer list; both absent gives `num_layers` x `fallback`.
std::vector<bool> per_layer(std::vector<bool> a, std::string a_name, std::vector<bool> b, std::string b_name,
                            int num_layers, bool fallback, const std::string& origin) {
  for (const auto& [list, name] : {std::pair{&a, &a_name}, std::pair{&b, &b_name}}) {
    if (!list->empty() && static_cast<int>(list->size()) != num_layers)
      fail("{}: {} has {} entries but num_hidden_layers is {}", origin, *name, list->size(), num_layers);
  }
  if (!a.empty() && !b.empty() && a != b) fail("{}: {} and {} disagree", origin, a_name, b_name);
  if (!a.empty()) return a;
  if (!b.empty()) return b;
  return std::vector<bool>(num_layers, fallback);
}

std::vector<int> token_ids(const Fields& fields, std::string_view key, std::vector<int> fallback) {
  const json* value = fields.find(key);
  if (!value) return fallback;
  std::vector<int> ids;
  if (value->is_array()) {
    for (const auto& item : *value) ids.push_back(static_cast<int>(fields.as_integer(item, key)));
  } else {
    ids.push_back(static_cast<int>(fields.as_integer(*value, key)));
  }
  for (int id : ids)
    if (id < 0) fail("{} must not be negative, got {}", fields.where(key), id);
  return ids;
}

TextConfig parse_text(const json& text_json, const json& top_json, const std::string& origin,
                      const std::string& section) {
  const Fields f(text_json, origin, section);
  const Fields top(top_json, origin, "");
  TextConfig t;
  t.vocab_size = f.positive("vocab_size", 200064);
  t.hidden_size = f.positive("hidden_size", 6144);
  t.num_layers = f.positive("num_hidden_layers", 60);
  t.num_heads = f.positive("num_attention_heads", 64);
  t.num_kv_heads = f.positive("num_key_value_heads", 4);
  t.head_dim = f.positive("head_dim", 128);
  if (t.num_heads % t.num_kv_heads != 0)
    fail("{}: num_attention_heads ({}) is not a multiple of num_key_value_heads ({})", origin, t.num_heads,
         t.num_kv_heads);

  // RoPE: rotary_dim (upstream, transformers 5.17) or partial_rotary_factor x head_dim; the theta may also
  // sit in rope_parameters (the transformers 5 spelling).
  const json* rope_parameters = f.object("rope_parameters");
  const Fields rope(rope_parameters ? *rope_parameters : empty_object(), origin, section + ".rope_parameters");
  double factor = f.number("partial_rotary_factor", rope.number("partial_rotary_factor", 0.0));
  if (f.has("partial_rotary_factor") || rope.has("partial_rotary_factor")) {
    if (!(factor > 0.0 && factor <= 1.0)) fail("{}: partial_rotary_factor must be in (0, 1], got {}", origin, factor);
  }
  if (f.has("rotary_dim")) {
    t.rotary_dim = f.positive("rotary_dim", 64);
    if (factor > 0.0 && std::lround(factor * t.head_dim) != t.rotary_dim)
      spdlog::warn("{}: rotary_dim {} disagrees with partial_rotary_factor {} x head_dim {}; using rotary_dim", origin,
                   t.rotary_dim, factor, t.head_dim);
  } else if (factor > 0.0) {
    const double dims = factor * t.head_dim;
    if (dims != std::floor(dims))
      fail("{}: partial_rotary_factor {} x head_dim {} is not a whole number of dimensions", origin, factor,
           t.head_dim);
    t.rotary_dim = static_cast<int>(dims);
  } else {
    t.rotary_dim = 64;  // transformers 5.17 default
  }
  if (t.rotary_dim > t.head_dim) fail("{}: rotary_dim {} is larger than head_dim {}", origin, t.rotary_dim, t.head_dim);
  if (t.rotary_dim % 2 != 0) fail("{}: rotary_dim {} must be even (rotate-half pairs)", origin, t.rotary_dim);
  t.rope_theta = f.number("rope_theta", rope.number("rope_theta", 5000000.0));
  if (!(t.rope_theta > 0.0)) fail("{}: rope_theta must be positive", origin);
  if (const json* scaling = f.find("rope_scaling")) {
    t.rope_scaling = *scaling;
  } else if (rope_parameters && rope.string("rope_type", "default") != "default") {
    t.rope_scaling = *rope_parameters;
  }

  t.rms_norm_eps = f.number("rms_norm_eps", 1e-6);
  if (!(t.rms_norm_eps > 0.0)) fail("{}: rms_norm_eps must be positive", origin);
  t.gemma_norm = f.boolean("use_gemma_norm", true);
  t.qk_norm = f.boolean("use_qk_norm", true);
  const std::string qk_norm_type = f.string("qk_norm_type", "per_head");
  if (t.qk_norm && qk_norm_type != "per_head")
    fail("{}: qk_norm_type '{}' is not supported (only per_head)", origin, qk_norm_type);
  if (f.boolean("attention_output_gate", false)) fail("{}: attention_output_gate is not supported", origin);

  const std::string act = f.string("hidden_act", "swigluoai");
  if (act != "swigluoai" && act != "silu")
    fail("{}: hidden_act '{}' is not supported (MiniMax-M3 uses swigluoai)", origin, act);
  t.swiglu_alpha = f.number("swiglu_alpha", 1.702);
  t.swiglu_limit = f.number("swiglu_limit", 7.0);
  if (!(t.swiglu_limit > 0.0)) fail("{}: swiglu_limit must be positive", origin);
  if (f.has("swiglu_beta") && f.number("swiglu_beta", 1.0) != 1.0)
    fail("{}: swiglu_beta other than 1.0 is not supported", origin);

  // Per-layer structure.
  t.layer_is_moe =
      per_layer(flag_list(f, "moe_layer_freq"), "moe_layer_freq", name_list(f, "mlp_layer_types", "sparse", "dense"),
                "mlp_layer_types", t.num_layers, true, origin);
  const json* sparse_json = f.object("sparse_attention_config");
  const Fields sparse(sparse_json ? *sparse_json : empty_object(), origin, section + ".sparse_attention_config");
  std::vector<bool> sparse_freq = flag_list(sparse, "sparse_attention_freq");
  if (sparse_json && !sparse.boolean("use_sparse_attention", true)) sparse_freq.assign(t.num_layers, false);
  t.layer_is_sparse = per_layer(sparse_freq, "sparse_attention_config.sparse_attention_freq",
                                name_list(f, "layer_types", "minimax_m3_sparse", "full_attention"), "layer_types",
                                t.num_layers, false, origin);

  // MoE.
  const bool any_moe = std::find(t.layer_is_moe.begin(), t.layer_is_moe.end(), true) != t.layer_is_moe.end();
  t.intermediate_size = f.positive("intermediate_size", 3072);
  t.dense_intermediate_size = f.positive("dense_intermediate_size", 12288);
  t.num_shared_experts = f.non_negative("n_shared_experts", 1);
  t.shared_intermediate_size = f.non_negative("shared_intermediate_size", 3072);
  if (any_moe && t.num_shared_experts > 0 && t.shared_intermediate_size == 0)
    fail("{}: n_shared_experts is {} but shared_intermediate_size is 0", origin, t.num_shared_experts);
  const char* experts_key = f.has("num_local_experts") ? "num_local_experts" : "num_experts";
  t.num_experts = f.positive(experts_key, 128);
  t.experts_per_token = f.positive("num_experts_per_tok", 4);
  if (t.experts_per_token > t.num_experts)
    fail("{}: num_experts_per_tok ({}) exceeds the number of experts ({})", origin, t.experts_per_token, t.num_experts);
  t.routed_scaling_factor = f.number("routed_scaling_factor", 2.0);
  t.use_routing_bias = f.boolean("use_routing_bias", true);
  const std::string scoring = f.string("scoring_func", "sigmoid");
  if (scoring != "sigmoid") fail("{}: scoring_func '{}' is not supported (MiniMax-M3 uses sigmoid)", origin, scoring);

  // Sparse attention (indexer). sparse_attention_config wins over index_* as in transformers 5.17.
  auto pick = [&](const char* upstream, const char* hf, int64_t fallback) {
    return sparse.has(upstream) ? sparse.integer(upstream, fallback) : f.integer(hf, fallback);
  };
  auto& s = t.sparse;
  s.enabled = std::find(t.layer_is_sparse.begin(), t.layer_is_sparse.end(), true) != t.layer_is_sparse.end();
  s.num_index_heads = static_cast<int>(pick("sparse_num_index_heads", "index_n_heads", 4));
  s.index_dim = static_cast<int>(pick("sparse_index_dim", "index_head_dim", 128));
  s.block_size = static_cast<int>(pick("sparse_block_size", "index_block_size", 128));
  s.topk_blocks = static_cast<int>(pick("sparse_topk_blocks", "index_topk_blocks", 16));
  s.local_blocks = static_cast<int>(pick("sparse_local_block", "index_local_blocks", 1));
  s.init_blocks = static_cast<int>(pick("sparse_init_block", "index_init_blocks", 0));
  if (s.enabled) {
    if (s.num_index_heads <= 0)
      fail("{}: the number of index heads must be positive, got {}", origin, s.num_index_heads);
    if (s.index_dim <= 0) fail("{}: the index head dim must be positive, got {}", origin, s.index_dim);
    if (s.block_size <= 0) fail("{}: the sparse block size must be positive, got {}", origin, s.block_size);
    if (s.topk_blocks <= 0) fail("{}: the number of top-k blocks must be positive, got {}", origin, s.topk_blocks);
    if (s.local_blocks < 0 || s.init_blocks < 0)
      fail("{}: local/init block counts must not be negative ({} / {})", origin, s.local_blocks, s.init_blocks);
    // The indexer applies the same partial RoPE as the main attention.
    if (t.rotary_dim > s.index_dim)
      fail("{}: index head dim {} is smaller than rotary_dim {}", origin, s.index_dim, t.rotary_dim);
    const std::string score = sparse.string("sparse_score_type", "max");
    if (score != "max") fail("{}: sparse_score_type '{}' is not supported (only max)", origin, score);
    if (!sparse.boolean("sparse_disable_index_value", true))
      fail("{}: sparse_disable_index_value = false (index value/output projections) is not supported", origin);
  }

  // Special tokens and the rest: text_config first, then the top level (both places occur in the wild).
  auto either = [&](const char* key) -> const Fields& { return f.has(key) || !top.has(key) ? f : top; };
  t.max_position_embeddings = either("max_position_embeddings").positive("max_position_embeddings", 524288);
  // An explicit null means "none" (-1 / empty), an absent field the transformers default.
  auto explicitly_null = [&](const char* key) {
    const json& src = text_json.contains(key) ? text_json : top_json;
    return src.contains(key) && src[key].is_null();
  };
  if (explicitly_null("bos_token_id")) {
    t.bos_token_id = -1;
  } else {
    t.bos_token_id = either("bos_token_id").non_negative("bos_token_id", 200034);
  }
  t.eos_token_ids = explicitly_null("eos_token_id") ? std::vector<int>{}
                                                    : token_ids(either("eos_token_id"), "eos_token_id", {200020});
  // transformers 5.17: the composite model ties when either level says so.
  t.tie_word_embeddings = top.boolean("tie_word_embeddings", false) || f.boolean("tie_word_embeddings", false);
  t.num_mtp_modules = f.non_negative("num_mtp_modules", 0);
  return t;
}

VisionConfig parse_vision(const json& vision_json, const std::string& origin) {
  const Fields f(vision_json, origin, "vision_config");
  VisionConfig v;
  v.present = true;
  v.hidden_size = f.positive("hidden_size", 1280);
  v.intermediate_size = f.positive("intermediate_size", 5120);
  v.num_layers = f.positive("num_hidden_layers", 32);
  v.num_heads = f.positive("num_attention_heads", 16);
  v.patch_size = f.positive("patch_size", 14);
  v.num_channels = f.positive("num_channels", 3);
  const json* compression = f.object("img_token_compression_config");
  const Fields c(compression ? *compression : empty_object(), origin, "vision_config.img_token_compression_config");
  v.spatial_merge_size =
      c.has("spatial_merge_size") ? c.positive("spatial_merge_size", 2) : f.positive("spatial_merge_size", 2);
  v.temporal_patch_size =
      c.has("temporal_patch_size") ? c.positive("temporal_patch_size", 2) : f.positive("temporal_patch_size", 2);
  v.layer_norm_eps = f.number("layer_norm_eps", 1e-5);
  v.rope_theta = f.number("rope_theta", 10000.0);
  if (v.hidden_size % v.num_heads != 0)
    fail("{}: vision_config.hidden_size ({}) is not a multiple of num_attention_heads ({})", origin, v.hidden_size,
         v.num_heads);
  if (!(v.layer_norm_eps > 0.0)) fail("{}: vision_config.layer_norm_eps must be positive", origin);
  return v;
}

}  // namespace

ModelConfig parse_model_config(const json& config, const std::string& origin) {
  if (!config.is_object()) fail("{}: the model config must be a JSON object", origin);
  const Fields top(config, origin, "");
  ModelConfig m;
  m.raw = config;
  m.model_type = top.string("model_type", "");
  if (const json* archs = top.array("architectures")) {
    for (const auto& a : *archs) {
      if (!a.is_string()) fail("{}: architectures must be a list of strings", origin);
      m.architectures.push_back(a.get<std::string>());
    }
  }
  // A composite (vision-language) config nests the text model; a text-only config is flat.
  if (const json* text = top.object("text_config")) {
    m.text = parse_text(*text, config, origin, "text_config");
  } else {
    m.text = parse_text(config, config, origin, "");
  }
  if (const json* vision = top.object("vision_config")) m.vision = parse_vision(*vision, origin);

  auto token = [&](const char* index_key, const char* id_key) -> int {
    const char* key = top.has(id_key) ? id_key : index_key;
    const int64_t id = top.integer(key, -1);
    if (id < -1) fail("{}: {} must not be negative", origin, key);
    return static_cast<int>(id);
  };
  m.image_token_id = token("image_token_index", "image_token_id");
  m.video_token_id = token("video_token_index", "video_token_id");
  m.projector_hidden_size = top.positive("projector_hidden_size", m.text.hidden_size);
  if (const json* quant = top.object("quantization_config")) {
    m.quantization_config = *quant;
  } else if (const json* text = top.object("text_config"); text && text->contains("quantization_config")) {
    m.quantization_config = (*text)["quantization_config"];
  }
  return m;
}

ModelConfig load_model_config(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open (is {} a model directory?)", path.string(), model_dir.string());
  std::stringstream buffer;
  buffer << in.rdbuf();
  json config;
  try {
    config = json::parse(buffer.str());
  } catch (const json::exception& e) {
    fail("{}: not valid JSON ({})", path.string(), e.what());
  }
  return parse_model_config(config, path.string());
}

}  // namespace mxlm::io
