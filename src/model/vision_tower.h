// The MiniMax-M3 vision tower, projector and 4-patch merge (shared/spec/m3_vision.md §3–§5): Conv3d patch
// embedding as a GEMM, pre-LayerNorm, pre-LN CLIP blocks (biased q/k/v/out, exact erf GELU, bidirectional
// attention within one image, the 3D t/h/w rotary over the first 78 of 80 head dims), no post-LayerNorm, then the
// per-patch projector and the merge MLP over each 2×2 window. Weights are bound by their upstream names.
//
// Everything runs as backend ops on backend memory (linear, add_bias, layer_norm, gelu_erf, rope_table,
// segment_attention), so the same code drives the CPU and CUDA backends. Several images are encoded in one pass
// (embed_batch): their patch rows are stacked and attention is restricted to each image's own rows.
#pragma once

#include <array>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/image_preprocess.h"

namespace mxlm::model {

// The 3D rotary's cos/sin for one image (grid_t × grid_h × grid_w patches in merge-window order): per token,
// rotary_pairs() angles (t-, h-, then w-frequencies).
struct VisionRotary {
  int head_dim = 0;
  int axis_dim = 0;  // 2 · ((head_dim // 3) // 2), 26 for 80
  int pairs() const { return 3 * axis_dim / 2; }
  std::vector<float> cos, sin;  // [tokens, pairs]
};

VisionRotary vision_rotary(int head_dim, double theta, int grid_t, int grid_h, int grid_w, int merge_size = 2);
// The (t, h, w) patch coordinates of each row in merge-window order.
std::vector<std::array<int32_t, 3>> vision_positions(int grid_t, int grid_h, int grid_w, int merge_size = 2);

class VisionTower {
 public:
  // Binds vision_tower.vision_model.*, multi_modal_projector.* and patch_merge_mlp.*; an Error naming the first
  // missing or misshapen tensor. `float_format` as in ModelOptions (the patch embedding always stays f32).
  VisionTower(const io::ModelConfig& config, const io::Checkpoint& checkpoint, backend::Backend& backend,
              std::optional<backend::WeightFormat> float_format = std::nullopt);
  ~VisionTower();
  VisionTower(const VisionTower&) = delete;
  VisionTower& operator=(const VisionTower&) = delete;

  int hidden_size() const { return hidden_; }
  int output_size() const { return output_; }  // the text model's hidden size

  // The last encoder layer's output [num_patches, hidden_size] (no post-LayerNorm).
  std::vector<float> features(const PreprocessedImage& image);
  // Projector + merge over features [num_patches, hidden_size] → [num_patches / 4, output_size].
  std::vector<float> project(const std::vector<float>& features, int64_t num_patches);
  // Both: the embeddings that replace the image's ]<]image[>[ tokens, [image tokens, output_size].
  std::vector<float> embed(const PreprocessedImage& image);

  // Several images (e.g. those one batch step needs) encoded together: one pass of the tower over all their patch
  // rows, each image attending only to itself. Per image, in order: the same values as features() / embed() of
  // that image alone (up to f32 summation order).
  std::vector<std::vector<float>> features_batch(std::span<const PreprocessedImage* const> images);
  std::vector<std::vector<float>> embed_batch(std::span<const PreprocessedImage* const> images);

 private:
  struct Layer;
  struct Linear {
    std::unique_ptr<backend::Weight> w;
    std::unique_ptr<backend::Buffer> b;
  };
  void linear(const Linear& l, const float* x, size_t m, float* y);
  // The last layer's output for the images' stacked patch rows [Σ patches, hidden] in backend memory; `bounds`
  // gets the row offsets of the images (0, n0, n0 + n1, ...).
  std::unique_ptr<backend::Buffer> encode(std::span<const PreprocessedImage* const> images,
                                          std::vector<int32_t>& bounds);
  // Projector + merge of `rows` feature rows in backend memory → [rows / 4, output_size] in backend memory.
  std::unique_ptr<backend::Buffer> project_rows(const float* features, size_t rows);

  io::ModelConfig config_;
  backend::Backend& backend_;
  int hidden_ = 0, heads_ = 0, head_dim_ = 0, patch_dim_ = 0, merge_ = 2, output_ = 0;
  float eps_ = 1e-5f;
  // Attention products in bf16 (backend's choice) when the layers' weights are bf16 / MXFP4: their linears round
  // activations to bf16 on a GPU anyway. F32 weights keep the whole tower in f32.
  bool attention_bf16_ = false;
  std::unique_ptr<backend::Weight> patch_embed_;
  std::unique_ptr<backend::Buffer> pre_norm_w_, pre_norm_b_;
  std::vector<std::unique_ptr<Layer>> layers_;
  Linear proj1_, proj2_, merge1_, merge2_;
};

// Whether a checkpoint carries the vision tower.
bool has_vision_tower(const io::Checkpoint& checkpoint);

}  // namespace mxlm::model
