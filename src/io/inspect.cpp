// `mxlm inspect`: what is in a model directory (config summary, tensors, bytes per dtype, which modules are
// MXFP4 and whether their scale tensors fit), computed once as JSON and rendered for humans from that.
#include "io/inspect.h"

#include <algorithm>
#include <cctype>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/error.h"
#include "io/model_config.h"

namespace mxlm::io {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::string_view kWeightSuffix = ".weight";
constexpr std::string_view kScaleSuffix = ".weight_scale";

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// "a.layers.12.experts.3.w1" -> "a.layers.*.experts.*.w1": groups the 23k expert modules into a few lines.
std::string pattern_of(const std::string& name) {
  std::string out;
  size_t i = 0;
  while (i < name.size()) {
    size_t j = name.find('.', i);
    if (j == std::string::npos) j = name.size();
    const std::string_view part(name.data() + i, j - i);
    const bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) {
      return std::isdigit(static_cast<unsigned char>(c));
    });
    out += numeric ? "*" : std::string(part);
    if (j < name.size()) out += '.';
    i = j + 1;
  }
  return out;
}

// The layer index of "...layers.<n>...", or -1.
int layer_of(const std::string& name) {
  const std::string_view key = "layers.";
  size_t at = name.find(key);
  while (at != std::string::npos) {
    if (at == 0 || name[at - 1] == '.') {
      size_t end = at + key.size();
      int value = 0;
      bool digits = false;
      while (end < name.size() && std::isdigit(static_cast<unsigned char>(name[end])) && value < 1'000'000) {
        value = value * 10 + (name[end++] - '0');
        digits = true;
      }
      if (digits && (end == name.size() || name[end] == '.')) return value;
    }
    at = name.find(key, at + 1);
  }
  return -1;
}

std::vector<int> indices_where(const std::vector<bool>& flags, bool value) {
  std::vector<int> out;
  for (size_t i = 0; i < flags.size(); ++i)
    if (flags[i] == value) out.push_back(static_cast<int>(i));
  return out;
}

// [0,1,2,5,7,8] -> "0-2, 5, 7-8"
std::string ranges(const json& list) {
  std::vector<int> v;
  for (const auto& x : list) v.push_back(x.get<int>());
  if (v.empty()) return "none";
  std::string out;
  for (size_t i = 0; i < v.size();) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += j == i ? fmt::format("{}", v[i]) : fmt::format("{}-{}", v[i], v[j]);
    i = j + 1;
  }
  return out;
}

std::string human_bytes(uint64_t bytes) {
  if (bytes >= 1'000'000'000) return fmt::format("{:.2f} GB", bytes / 1e9);
  if (bytes >= 1'000'000) return fmt::format("{:.2f} MB", bytes / 1e6);
  if (bytes >= 1'000) return fmt::format("{:.2f} kB", bytes / 1e3);
  return fmt::format("{} B", bytes);
}

json config_summary(const ModelConfig& c) {
  const TextConfig& t = c.text;
  json text = {
      {"vocab_size", t.vocab_size},
      {"hidden_size", t.hidden_size},
      {"num_layers", t.num_layers},
      {"num_heads", t.num_heads},
      {"num_kv_heads", t.num_kv_heads},
      {"head_dim", t.head_dim},
      {"rotary_dim", t.rotary_dim},
      {"rope_theta", t.rope_theta},
      {"rope_scaling", t.rope_scaling ? *t.rope_scaling : json(nullptr)},
      {"max_position_embeddings", t.max_position_embeddings},
      {"rms_norm_eps", t.rms_norm_eps},
      {"num_experts", t.num_experts},
      {"experts_per_token", t.experts_per_token},
      {"num_shared_experts", t.num_shared_experts},
      {"intermediate_size", t.intermediate_size},
      {"shared_intermediate_size", t.shared_intermediate_size},
      {"dense_intermediate_size", t.dense_intermediate_size},
      {"routed_scaling_factor", t.routed_scaling_factor},
      {"moe_layers", indices_where(t.layer_is_moe, true)},
      {"dense_mlp_layers", indices_where(t.layer_is_moe, false)},
      {"sparse_attention_layers", indices_where(t.layer_is_sparse, true)},
      {"full_attention_layers", indices_where(t.layer_is_sparse, false)},
      {"index_heads", t.sparse.num_index_heads},
      {"index_head_dim", t.sparse.index_dim},
      {"index_block_size", t.sparse.block_size},
      {"index_topk_blocks", t.sparse.topk_blocks},
      {"index_local_blocks", t.sparse.local_blocks},
      {"tie_word_embeddings", t.tie_word_embeddings},
      {"bos_token_id", t.bos_token_id},
      {"eos_token_ids", t.eos_token_ids},
  };
  json vision = nullptr;
  if (c.vision.present) {
    vision = {{"hidden_size", c.vision.hidden_size},
              {"intermediate_size", c.vision.intermediate_size},
              {"num_layers", c.vision.num_layers},
              {"num_heads", c.vision.num_heads},
              {"patch_size", c.vision.patch_size},
              {"spatial_merge_size", c.vision.spatial_merge_size},
              {"temporal_patch_size", c.vision.temporal_patch_size}};
  }
  return {{"model_type", c.model_type}, {"architectures", c.architectures},   {"text", text},
          {"vision", vision},           {"image_token_id", c.image_token_id}, {"video_token_id", c.video_token_id}};
}

json quant_summary(const json& q) {
  json out = {{"quant_method", q.value("quant_method", "")}};
  auto scheme = [](const json& s) -> json {
    if (!s.is_object()) return nullptr;
    json r;
    for (const char* key :
         {"dtype", "qscheme", "group_size", "scale_format", "scale_calculation_mode", "round_method", "is_dynamic"})
      if (s.contains(key)) r[key] = s[key];
    return r;
  };
  if (q.contains("global_quant_config") && q["global_quant_config"].is_object()) {
    const json& g = q["global_quant_config"];
    out["weight"] = scheme(g.value("weight", json(nullptr)));
    out["input_tensors"] = scheme(g.value("input_tensors", json(nullptr)));
  }
  if (q.contains("exclude")) out["exclude"] = q["exclude"];
  if (q.contains("export") && q["export"].is_object()) out["weight_format"] = q["export"].value("weight_format", "");
  if (q.contains("layer_quant_config") && q["layer_quant_config"].is_object())
    out["layer_overrides"] = q["layer_quant_config"].size();
  return out;
}

std::string scheme_text(const json& s) {
  if (!s.is_object()) return "none";
  std::string out = s.value("dtype", "?");
  if (s.contains("qscheme")) out += " " + s["qscheme"].get<std::string>();
  if (s.contains("group_size") && s["group_size"].is_number())
    out += fmt::format(" g{}", s["group_size"].get<int64_t>());
  if (s.contains("scale_format") && s["scale_format"].is_string())
    out += " scale " + s["scale_format"].get<std::string>();
  if (s.contains("scale_calculation_mode") && s["scale_calculation_mode"].is_string())
    out += " (" + s["scale_calculation_mode"].get<std::string>() + ")";
  if (s.contains("is_dynamic") && s["is_dynamic"].is_boolean())
    out += s["is_dynamic"].get<bool>() ? ", dynamic" : ", static";
  return out;
}

}  // namespace

bool is_mxfp4_module(const Checkpoint& checkpoint, const std::string& module) {
  const std::string weight = module + std::string(kWeightSuffix);
  return checkpoint.contains(weight) && checkpoint.info(weight).dtype == DType::U8 &&
         checkpoint.contains(module + std::string(kScaleSuffix));
}

json inspect_model_dir(const fs::path& model_dir, bool with_tensors) {
  json report;
  report["model_dir"] = model_dir.string();
  std::optional<ModelConfig> config;
  if (fs::exists(model_dir / "config.json")) config = load_model_config(model_dir);
  report["config"] = config ? config_summary(*config) : json(nullptr);
  report["quantization_config"] =
      config && config->quantization_config ? quant_summary(*config->quantization_config) : json(nullptr);

  const Checkpoint checkpoint(model_dir);
  const auto names = checkpoint.tensor_names();
  report["num_files"] = checkpoint.files().size();
  report["num_tensors"] = names.size();
  report["total_bytes"] = checkpoint.total_bytes();
  report["metadata"] = checkpoint.files().front()->metadata();

  json dtypes = json::object();
  for (const auto& name : names) {
    const TensorInfo& info = checkpoint.info(name);
    json& entry = dtypes[std::string(dtype_name(info.dtype))];
    if (entry.is_null()) entry = {{"tensors", 0}, {"bytes", 0}};
    entry["tensors"] = entry["tensors"].get<uint64_t>() + 1;
    entry["bytes"] = entry["bytes"].get<uint64_t>() + info.nbytes();
  }
  report["dtypes"] = dtypes;

  // MXFP4 modules, and scale tensors that do not fit their weights (a bad export or a wrong file).
  std::vector<std::string> modules, problems;
  std::map<std::string, uint64_t> patterns;
  std::set<int> layers;
  for (const auto& name : names) {
    if (!ends_with(name, kScaleSuffix)) continue;
    const std::string module = name.substr(0, name.size() - kScaleSuffix.size());
    const std::string weight_name = module + std::string(kWeightSuffix);
    if (!checkpoint.contains(weight_name)) {
      problems.push_back(fmt::format("{}: has weight_scale but no weight", module));
      continue;
    }
    const TensorInfo& weight = checkpoint.info(weight_name);
    const TensorInfo& scale = checkpoint.info(name);
    if (weight.dtype != DType::U8) {
      problems.push_back(
          fmt::format("{}: weight_scale next to a {} weight (not packed MXFP4)", module, dtype_name(weight.dtype)));
      continue;
    }
    modules.push_back(module);
    patterns[pattern_of(module)] += 1;
    if (int layer = layer_of(module); layer >= 0) layers.insert(layer);
    // weight [..., N, K/2] packed E2M1, scale [..., N, K/32] E8M0.
    const bool fits = scale.dtype == DType::U8 && weight.shape.size() == scale.shape.size() && !weight.shape.empty() &&
                      std::equal(weight.shape.begin(), weight.shape.end() - 1, scale.shape.begin()) &&
                      weight.shape.back() * 2 == scale.shape.back() * 32;
    if (!fits)
      problems.push_back(fmt::format("{}: weight {} [{}] and weight_scale {} [{}] do not fit MXFP4 (K/2 vs K/32)",
                                     module, dtype_name(weight.dtype), fmt::join(weight.shape, ", "),
                                     dtype_name(scale.dtype), fmt::join(scale.shape, ", ")));
  }
  report["mxfp4"] = {{"modules", modules.size()},
                     {"layers", std::vector<int>(layers.begin(), layers.end())},
                     {"patterns", patterns},
                     {"problems", problems}};

  if (with_tensors) {
    json tensors = json::array();
    for (const auto& name : names) {
      const TensorInfo& info = checkpoint.info(name);
      tensors.push_back({{"name", name},
                         {"dtype", std::string(dtype_name(info.dtype))},
                         {"shape", info.shape},
                         {"file", checkpoint.file_of(name).path().filename().string()},
                         {"data_offsets", {info.begin, info.end}}});
    }
    report["tensors"] = std::move(tensors);
  }
  return report;
}

std::string format_inspect_report(const json& r) {
  std::string out = fmt::format("model: {}\n", r["model_dir"].get<std::string>());
  const json& c = r["config"];
  if (c.is_null()) {
    out += "config: none (no config.json)\n";
  } else {
    const json& t = c["text"];
    std::string archs;
    for (const auto& a : c["architectures"]) archs += (archs.empty() ? "" : ", ") + a.get<std::string>();
    out += fmt::format("config: model_type {}{}\n", c["model_type"].get<std::string>(),
                       archs.empty() ? "" : " (" + archs + ")");
    out += fmt::format(
        "  text: {} layers, hidden {}, vocab {}, {} heads ({} KV) x {}, rotary {} (theta {}), max positions {}\n",
        t["num_layers"].get<int>(), t["hidden_size"].get<int>(), t["vocab_size"].get<int>(), t["num_heads"].get<int>(),
        t["num_kv_heads"].get<int>(), t["head_dim"].get<int>(), t["rotary_dim"].get<int>(),
        t["rope_theta"].get<double>(), t["max_position_embeddings"].get<int>());
    if (!t["rope_scaling"].is_null()) out += fmt::format("  rope scaling: {}\n", t["rope_scaling"].dump());
    out += fmt::format("  MoE layers: {} ({} experts, top-{}, {} shared, expert width {}, routed scale {})\n",
                       ranges(t["moe_layers"]), t["num_experts"].get<int>(), t["experts_per_token"].get<int>(),
                       t["num_shared_experts"].get<int>(), t["intermediate_size"].get<int>(),
                       t["routed_scaling_factor"].get<double>());
    out += fmt::format("  dense MLP layers: {} (width {})\n", ranges(t["dense_mlp_layers"]),
                       t["dense_intermediate_size"].get<int>());
    out += fmt::format("  sparse attention layers: {} ({} index heads x {}, block {}, top-{} blocks, {} local)\n",
                       ranges(t["sparse_attention_layers"]), t["index_heads"].get<int>(),
                       t["index_head_dim"].get<int>(), t["index_block_size"].get<int>(),
                       t["index_topk_blocks"].get<int>(), t["index_local_blocks"].get<int>());
    if (!c["vision"].is_null()) {
      const json& v = c["vision"];
      out += fmt::format("  vision: {} layers, hidden {}, {} heads, patch {}, merge {}\n", v["num_layers"].get<int>(),
                         v["hidden_size"].get<int>(), v["num_heads"].get<int>(), v["patch_size"].get<int>(),
                         v["spatial_merge_size"].get<int>());
    }
  }
  const json& q = r["quantization_config"];
  if (!q.is_null()) {
    out += fmt::format("quantization: {}", q.value("quant_method", "?"));
    if (q.contains("weight")) out += fmt::format(", weight {}", scheme_text(q["weight"]));
    if (q.contains("input_tensors")) out += fmt::format(", input {}", scheme_text(q["input_tensors"]));
    out += "\n";
    if (q.contains("exclude")) {
      std::string excluded;
      for (const auto& e : q["exclude"])
        excluded += (excluded.empty() ? "" : " ") + (e.is_string() ? e.get<std::string>() : e.dump());
      out += fmt::format("  exclude: {}\n", excluded);
    }
  }
  out += fmt::format("tensors: {} in {} file(s), {} ({} bytes)\n", r["num_tensors"].get<uint64_t>(),
                     r["num_files"].get<uint64_t>(), human_bytes(r["total_bytes"].get<uint64_t>()),
                     r["total_bytes"].get<uint64_t>());
  for (const auto& [dtype, entry] : r["dtypes"].items())
    out += fmt::format("  {:<8} {:>8} tensors  {:>12}\n", dtype, entry["tensors"].get<uint64_t>(),
                       human_bytes(entry["bytes"].get<uint64_t>()));
  const json& m = r["mxfp4"];
  if (m["modules"].get<uint64_t>() == 0) {
    out += "MXFP4: none\n";
  } else {
    out += fmt::format("MXFP4: {} modules in layers {}\n", m["modules"].get<uint64_t>(), ranges(m["layers"]));
    for (const auto& [pattern, count] : m["patterns"].items())
      out += fmt::format("  {:>8} x {}\n", count.get<uint64_t>(), pattern);
  }
  if (!m["problems"].empty()) {
    out += fmt::format("MXFP4 problems: {}\n", m["problems"].size());
    size_t shown = 0;
    for (const auto& p : m["problems"]) {
      if (shown++ == 20) {
        out += fmt::format("  ... and {} more\n", m["problems"].size() - 20);
        break;
      }
      out += "  " + p.get<std::string>() + "\n";
    }
  }
  return out;
}

void resave_checkpoint(const Checkpoint& checkpoint, const fs::path& out_dir, uint64_t max_shard_bytes) {
  fs::create_directories(out_dir);
  std::vector<PlannedTensor> tensors;
  for (const auto& name : checkpoint.tensor_names()) {
    const TensorInfo& info = checkpoint.info(name);
    tensors.push_back({name, info.dtype, info.shape});
  }
  sort_for_alignment(tensors);
  const auto shards = plan_shards(tensors, max_shard_bytes);
  const auto& metadata = checkpoint.files().front()->metadata();
  for (const auto& shard : shards) {
    SafetensorsWriter writer(out_dir / shard.file_name, shard.tensors, metadata);
    for (const auto& tensor : shard.tensors) writer.write(tensor.name, checkpoint.data(tensor.name));
    writer.commit();
  }
  if (shards.size() > 1) write_index(out_dir, shards);
}

}  // namespace mxlm::io
