// The MiniMax-M3 vision tower, projector and 4-patch merge (shared/spec/m3_vision.md §3–§5): Conv3d patch
// embedding as a GEMM, pre-LayerNorm, pre-LN CLIP blocks (biased q/k/v/out, exact erf GELU, bidirectional
// attention within one image, the 3D t/h/w rotary over the first 78 of 80 head dims), no post-LayerNorm, then the
// per-patch projector and the merge MLP over each 2×2 window. Weights are bound by their upstream names.
//
// Linear layers go through backend::Backend::linear. LayerNorm, bias, GELU, the rotary and the softmax have no
// backend op yet and run as host loops on the activation buffers, so this needs host-addressable buffers (the CPU
// backend).
#pragma once

#include <memory>
#include <optional>
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
  std::vector<float> embed(const PreprocessedImage& image) { return project(features(image), image.num_patches()); }

 private:
  struct Layer;
  struct Linear {
    std::unique_ptr<backend::Weight> w;
    std::unique_ptr<backend::Buffer> b;
  };
  void linear(const Linear& l, const float* x, size_t m, float* y);

  io::ModelConfig config_;
  backend::Backend& backend_;
  int hidden_ = 0, heads_ = 0, head_dim_ = 0, patch_dim_ = 0, merge_ = 2, output_ = 0;
  float eps_ = 1e-5f;
  std::unique_ptr<backend::Weight> patch_embed_;
  std::unique_ptr<backend::Buffer> pre_norm_w_, pre_norm_b_;
  std::vector<std::unique_ptr<Layer>> layers_;
  Linear proj1_, proj2_, merge1_, merge2_;
};

// Whether a checkpoint carries the vision tower.
bool has_vision_tower(const io::Checkpoint& checkpoint);

}  // namespace mxlm::model
