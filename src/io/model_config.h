// config.json -> a typed MiniMax-M3 configuration (spec: shared/spec/m3_checkpoint.md §2). Accepts the
// upstream field names (text_config, sparse_attention_config, moe_layer_freq, rotary_dim or
// partial_rotary_factor, ...) and the transformers 5.17 names (layer_types, mlp_layer_types,
// index_n_heads, ...). Impossible shapes are an Error naming the field.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mxlm::io {

struct SparseAttentionConfig {
  bool enabled = false;
  int num_index_heads = 0;
  int index_dim = 0;
  int block_size = 128;
  int topk_blocks = 16;
  int local_blocks = 1;
  int init_blocks = 0;
};

struct VisionConfig {
  bool present = false;
  int hidden_size = 1280;
  int intermediate_size = 5120;
  int num_layers = 32;
  int num_heads = 16;
  int patch_size = 14;
  int num_channels = 3;
  int spatial_merge_size = 2;
  int temporal_patch_size = 2;
  double layer_norm_eps = 1e-5;
  double rope_theta = 10000.0;
};

struct TextConfig {
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int rotary_dim = 0;
  double rope_theta = 10000.0;
  std::optional<nlohmann::json> rope_scaling;  // rope_scaling / non-default rope_parameters, as written
  double rms_norm_eps = 1e-6;
  bool gemma_norm = true;
  bool qk_norm = true;
  int intermediate_size = 0;        // per routed expert
  int dense_intermediate_size = 0;  // dense MLP layers
  int shared_intermediate_size = 0;
  int num_shared_experts = 0;
  int num_experts = 0;
  int experts_per_token = 0;
  double routed_scaling_factor = 1.0;
  bool use_routing_bias = true;
  double swiglu_alpha = 1.702;
  double swiglu_limit = 7.0;
  int max_position_embeddings = 0;
  int bos_token_id = -1;
  std::vector<int> eos_token_ids;
  std::vector<bool> layer_is_moe;     // per layer: MoE block (else dense MLP)
  std::vector<bool> layer_is_sparse;  // per layer: sparse attention with the indexer (else full)
  int num_mtp_modules = 0;            // informational: no MTP weights are shipped or used
  SparseAttentionConfig sparse;
  bool tie_word_embeddings = false;
};

struct ModelConfig {
  std::string model_type;
  std::vector<std::string> architectures;
  TextConfig text;
  VisionConfig vision;
  int image_token_id = -1;
  int video_token_id = -1;
  int projector_hidden_size = 0;
  std::optional<nlohmann::json> quantization_config;
  nlohmann::json raw;  // the whole config.json as read
};

// Missing fields take the transformers 5.17 defaults (the real MiniMax-M3 values), as transformers does.
ModelConfig parse_model_config(const nlohmann::json& config, const std::string& origin = "config.json");
// Reads MODEL_DIR/config.json.
ModelConfig load_model_config(const std::filesystem::path& model_dir);

}  // namespace mxlm::io
