// The tensor list of a vision-only MiniMax-M3 checkpoint (tower, projector, patch-merge MLP) in the upstream names,
// for the vision benchmarks (bench_vision.cpp on CPU, bench_cuda_vision.cc on the GPU), which fill it with random
// values of their own.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/safetensors.h"

namespace mxlm::bench {

// Float tensors in BF16 except the Conv3d patch embedding (F32, as the released checkpoint).
inline std::vector<io::PlannedTensor> vision_checkpoint_plan(int layers, int64_t hidden, int64_t inter, int64_t proj) {
  std::vector<io::PlannedTensor> plan;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, DType dt = DType::BF16) {
    plan.push_back({name, dt, std::move(shape)});
  };
  const std::string t = "vision_tower.vision_model.";
  add(t + "embeddings.patch_embedding.weight", {hidden, 3, 2, 14, 14}, DType::F32);
  add(t + "pre_layrnorm.weight", {hidden});
  add(t + "pre_layrnorm.bias", {hidden});
  for (int l = 0; l < layers; ++l) {
    const std::string p = t + "encoder.layers." + std::to_string(l) + ".";
    for (const char* n : {"layer_norm1", "layer_norm2"}) {
      add(p + n + ".weight", {hidden});
      add(p + n + ".bias", {hidden});
    }
    for (const char* n : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
      add(p + "self_attn." + n + ".weight", {hidden, hidden});
      add(p + "self_attn." + n + ".bias", {hidden});
    }
    add(p + "mlp.fc1.weight", {inter, hidden});
    add(p + "mlp.fc1.bias", {inter});
    add(p + "mlp.fc2.weight", {hidden, inter});
    add(p + "mlp.fc2.bias", {hidden});
  }
  add("multi_modal_projector.linear_1.weight", {proj, hidden});
  add("multi_modal_projector.linear_1.bias", {proj});
  add("multi_modal_projector.linear_2.weight", {proj, proj});
  add("multi_modal_projector.linear_2.bias", {proj});
  add("patch_merge_mlp.linear_1.weight", {proj, 4 * proj});
  add("patch_merge_mlp.linear_1.bias", {proj});
  add("patch_merge_mlp.linear_2.weight", {proj, proj});
  add("patch_merge_mlp.linear_2.bias", {proj});
  return plan;
}

}  // namespace mxlm::bench
