#include "model/vision_tower.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>

#include "core/dtype.h"
#include "core/error.h"
#include "model/weight_loader.h"

namespace mxlm::model {

using backend::Buffer;
using backend::Weight;
using backend::WeightFormat;

struct VisionTower::Layer {
  std::unique_ptr<Buffer> ln1_w, ln1_b, ln2_w, ln2_b;
  Linear q, k, v, o, fc1, fc2;
};

namespace {

const std::string kTower = "vision_tower.vision_model.";

std::vector<int64_t> shape_of(const io::Checkpoint& ckpt, const std::string& name) {
  if (!ckpt.contains(name)) fail("checkpoint {} has no tensor {}", ckpt.dir().string(), name);
  return ckpt.info(name).shape;
}

}  // namespace

std::vector<std::array<int32_t, 3>> vision_positions(int grid_t, int grid_h, int grid_w, int merge_size) {
  if (grid_h % merge_size != 0 || grid_w % merge_size != 0)
    fail("patch grid {}x{} is not a multiple of the merge size {}", grid_h, grid_w, merge_size);
  std::vector<std::array<int32_t, 3>> pos;
  pos.reserve(static_cast<size_t>(grid_t) * static_cast<size_t>(grid_h) * static_cast<size_t>(grid_w));
  for (int t = 0; t < grid_t; ++t)
    for (int wr = 0; wr < grid_h / merge_size; ++wr)
      for (int wc = 0; wc < grid_w / merge_size; ++wc)
        for (int i = 0; i < merge_size; ++i)
          for (int j = 0; j < merge_size; ++j) pos.push_back({t, wr * merge_size + i, wc * merge_size + j});
  return pos;
}

VisionRotary vision_rotary(int head_dim, double theta, int grid_t, int grid_h, int grid_w, int merge_size) {
  VisionRotary r;
  r.head_dim = head_dim;
  r.axis_dim = 2 * ((head_dim / 3) / 2);
  const int n = r.axis_dim / 2;
  if (n <= 0) fail("vision head_dim {} is too small for a 3D rotary", head_dim);
  // inv_freq = 1 / theta^(arange(0, axis_dim, 2) / axis_dim), in f32 as torch computes it.
  std::vector<float> inv(static_cast<size_t>(n));
  for (int j = 0; j < n; ++j) {
    const float e = static_cast<float>(2 * j) / static_cast<float>(r.axis_dim);
    inv[static_cast<size_t>(j)] = 1.0f / std::pow(static_cast<float>(theta), e);
  }
  const auto pos = vision_positions(grid_t, grid_h, grid_w, merge_size);
  const int P = r.pairs();
  r.cos.resize(pos.size() * static_cast<size_t>(P));
  r.sin.resize(pos.size() * static_cast<size_t>(P));
  for (size_t t = 0; t < pos.size(); ++t)
    for (int axis = 0; axis < 3; ++axis)
      for (int j = 0; j < n; ++j) {
        const float angle = static_cast<float>(pos[t][static_cast<size_t>(axis)]) * inv[static_cast<size_t>(j)];
        const size_t k = t * static_cast<size_t>(P) + static_cast<size_t>(axis * n + j);
        r.cos[k] = std::cos(angle);
        r.sin[k] = std::sin(angle);
      }
  return r;
}

bool has_vision_tower(const io::Checkpoint& checkpoint) {
  return checkpoint.contains(kTower + "embeddings.patch_embedding.weight");
}

VisionTower::VisionTower(const io::ModelConfig& config, const io::Checkpoint& ckpt, backend::Backend& backend,
                         std::optional<WeightFormat> float_format)
    : config_(config), backend_(backend) {
  const io::VisionConfig& vc = config.vision;
  hidden_ = vc.hidden_size;
  heads_ = vc.num_heads;
  merge_ = vc.spatial_merge_size;
  eps_ = static_cast<float>(vc.layer_norm_eps);
  if (hidden_ <= 0 || heads_ <= 0 || hidden_ % heads_ != 0 || vc.num_layers <= 0 || vc.intermediate_size <= 0)
    fail("vision_config: hidden_size {} / {} heads / {} layers / intermediate {} are inconsistent", hidden_, heads_,
         vc.num_layers, vc.intermediate_size);
  head_dim_ = hidden_ / heads_;
  patch_dim_ = vc.num_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size;
  if (backend.tp_size() != 1) fail("the vision tower runs unsharded (tensor-parallel size 1 only for now)");
  WeightLoader load(ckpt, backend, float_format);

  // Conv3d [hidden, C, T, P, P] with stride = kernel is a GEMM over rows laid out [C][T][P][P].
  const std::string pe = kTower + "embeddings.patch_embedding.weight";
  const std::vector<int64_t> pe_shape{hidden_, vc.num_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size};
  if (shape_of(ckpt, pe) != pe_shape)
    fail("tensor {} does not have the shape [{}, {}, {}, {}, {}] of vision_config", pe, hidden_, vc.num_channels,
         vc.temporal_patch_size, vc.patch_size, vc.patch_size);
  {
    const io::TensorInfo& info = ckpt.info(pe);
    if (!is_float(info.dtype)) fail("tensor {} has dtype {}; expected a float type", pe, dtype_name(info.dtype));
    const auto bytes = ckpt.data(pe);
    std::vector<float> w(static_cast<size_t>(hidden_) * static_cast<size_t>(patch_dim_));
    for (size_t i = 0; i < w.size(); ++i) w[i] = load_as_f32(info.dtype, bytes.data() + i * dtype_size(info.dtype));
    patch_embed_ = backend.upload_weight({WeightFormat::F32, hidden_, patch_dim_, w.data(), nullptr});
  }
  pre_norm_w_ = load.vector(kTower + "pre_layrnorm.weight", hidden_);
  pre_norm_b_ = load.vector(kTower + "pre_layrnorm.bias", hidden_);
  auto lin = [&](const std::string& stem, int64_t rows, int64_t cols) {
    Linear l;
    l.w = load.matrix(stem, rows, cols);
    l.b = load.vector(stem + ".bias", rows);
    return l;
  };
  const int64_t H = hidden_, I = vc.intermediate_size;
  for (int i = 0; i < vc.num_layers; ++i) {
    const std::string p = kTower + "encoder.layers." + std::to_string(i) + ".";
    auto layer = std::make_unique<Layer>();
    layer->ln1_w = load.vector(p + "layer_norm1.weight", H);
    layer->ln1_b = load.vector(p + "layer_norm1.bias", H);
    layer->ln2_w = load.vector(p + "layer_norm2.weight", H);
    layer->ln2_b = load.vector(p + "layer_norm2.bias", H);
    layer->q = lin(p + "self_attn.q_proj", H, H);
    layer->k = lin(p + "self_attn.k_proj", H, H);
    layer->v = lin(p + "self_attn.v_proj", H, H);
    layer->o = lin(p + "self_attn.out_proj", H, H);
    layer->fc1 = lin(p + "mlp.fc1", I, H);
    layer->fc2 = lin(p + "mlp.fc2", H, I);
    layers_.push_back(std::move(layer));
  }
  const WeightFormat layer_format = layers_.front()->q.w->format();
  attention_bf16_ = layer_format == WeightFormat::BF16 || layer_format == WeightFormat::MXFP4;
  // Projector and merge: inner sizes from the checkpoint, checked against the tower and the text model.
  const int64_t p1 = shape_of(ckpt, "multi_modal_projector.linear_1.weight").at(0);
  const int64_t p2 = shape_of(ckpt, "multi_modal_projector.linear_2.weight").at(0);
  const int64_t m1 = shape_of(ckpt, "patch_merge_mlp.linear_1.weight").at(0);
  output_ = config.text.hidden_size;
  proj1_ = lin("multi_modal_projector.linear_1", p1, H);
  proj2_ = lin("multi_modal_projector.linear_2", p2, p1);
  merge1_ = lin("patch_merge_mlp.linear_1", m1, p2 * merge_ * merge_);
  merge2_ = lin("patch_merge_mlp.linear_2", output_, m1);
}

VisionTower::~VisionTower() = default;

void VisionTower::linear(const Linear& l, const float* x, size_t m, float* y) {
  const size_t k = static_cast<size_t>(l.w->cols());
  if (l.w->mxfp4()) {  // MXFP4 emulation: activations quantize-dequantized first (DESIGN.md numerics)
    auto tmp = backend_.alloc(m * k);
    backend_.copy(x, tmp->f32(), m * k);
    backend_.qdq_mxfp4(tmp->f32(), m, k);
    backend_.linear(tmp->f32(), m, *l.w, y);
  } else {
    backend_.linear(x, m, *l.w, y);
  }
  backend_.add_bias(y, l.b->f32(), m, static_cast<size_t>(l.w->rows()));
}

std::unique_ptr<Buffer> VisionTower::encode(std::span<const PreprocessedImage* const> images,
                                            std::vector<int32_t>& bounds) {
  if (images.empty()) fail("no images to encode");
  bounds.assign(1, 0);
  size_t N = 0;
  for (const PreprocessedImage* image : images) {
    const size_t n = static_cast<size_t>(image->num_patches());
    if (n == 0) fail("image has no patches");
    if (image->pixel_values.size() != n * static_cast<size_t>(patch_dim_))
      fail("pixel values hold {} floats, expected {} patches x {}", image->pixel_values.size(), n, patch_dim_);
    N += n;
    if (N > static_cast<size_t>(INT32_MAX)) fail("{} patches in one vision batch is too many", N);
    bounds.push_back(static_cast<int32_t>(N));
  }
  const size_t H = static_cast<size_t>(hidden_), P = static_cast<size_t>(patch_dim_);
  const size_t I = static_cast<size_t>(config_.vision.intermediate_size);
  // Rotary tables of every image's rows, and the pixels, stacked.
  std::vector<float> cos, sin;
  int pairs = 0;
  auto px = backend_.alloc(N * P);
  for (size_t i = 0; i < images.size(); ++i) {
    const PreprocessedImage& image = *images[i];
    const VisionRotary rot =
        vision_rotary(head_dim_, config_.vision.rope_theta, image.grid_t, image.grid_h, image.grid_w, merge_);
    pairs = rot.pairs();
    cos.insert(cos.end(), rot.cos.begin(), rot.cos.end());
    sin.insert(sin.end(), rot.sin.begin(), rot.sin.end());
    backend_.upload(*px, static_cast<size_t>(bounds[i]) * P, image.pixel_values.data(), image.pixel_values.size());
  }
  auto cos_b = backend_.alloc(std::max<size_t>(cos.size(), 1)), sin_b = backend_.alloc(std::max<size_t>(sin.size(), 1));
  backend_.upload(*cos_b, 0, cos.data(), cos.size());
  backend_.upload(*sin_b, 0, sin.data(), sin.size());

  auto h = backend_.alloc(N * H), x = backend_.alloc(N * H), q = backend_.alloc(N * H), k = backend_.alloc(N * H),
       v = backend_.alloc(N * H), a = backend_.alloc(N * H), f = backend_.alloc(N * I);
  backend_.linear(px->f32(), N, *patch_embed_, x->f32());
  px.reset();
  backend_.layer_norm(x->f32(), pre_norm_w_->f32(), pre_norm_b_->f32(), h->f32(), N, H, eps_);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
  for (const auto& layer : layers_) {
    backend_.layer_norm(h->f32(), layer->ln1_w->f32(), layer->ln1_b->f32(), x->f32(), N, H, eps_);
    linear(layer->q, x->f32(), N, q->f32());
    linear(layer->k, x->f32(), N, k->f32());
    linear(layer->v, x->f32(), N, v->f32());
    backend_.rope_table(q->f32(), cos_b->f32(), sin_b->f32(), N, heads_, head_dim_, pairs);
    backend_.rope_table(k->f32(), cos_b->f32(), sin_b->f32(), N, heads_, head_dim_, pairs);
    backend_.segment_attention(q->f32(), k->f32(), v->f32(), bounds, heads_, head_dim_, scale, a->f32(),
                               attention_bf16_);
    linear(layer->o, a->f32(), N, x->f32());
    backend_.add(h->f32(), x->f32(), h->f32(), N * H);
    backend_.layer_norm(h->f32(), layer->ln2_w->f32(), layer->ln2_b->f32(), x->f32(), N, H, eps_);
    linear(layer->fc1, x->f32(), N, f->f32());
    backend_.gelu_erf(f->f32(), N * I);
    linear(layer->fc2, f->f32(), N, x->f32());
    backend_.add(h->f32(), x->f32(), h->f32(), N * H);
  }
  return h;
}

std::unique_ptr<Buffer> VisionTower::project_rows(const float* features, size_t rows) {
  const size_t window = static_cast<size_t>(merge_ * merge_);
  if (rows == 0 || rows % window != 0)
    fail("projector input: {} patches (must be a positive multiple of {} patches)", rows, window);
  const size_t p1 = static_cast<size_t>(proj1_.w->rows()), p2 = static_cast<size_t>(proj2_.w->rows());
  const size_t m1 = static_cast<size_t>(merge1_.w->rows()), out_dim = static_cast<size_t>(output_);
  const size_t M = rows / window;
  auto u1 = backend_.alloc(rows * p1), u2 = backend_.alloc(rows * p2), z1 = backend_.alloc(M * m1),
       z2 = backend_.alloc(M * out_dim);
  linear(proj1_, features, rows, u1->f32());
  backend_.gelu_erf(u1->f32(), rows * p1);
  linear(proj2_, u1->f32(), rows, u2->f32());
  // Patches of one merge window are consecutive rows: [N, p2] is already [N / 4, 4 · p2].
  linear(merge1_, u2->f32(), M, z1->f32());
  backend_.gelu_erf(z1->f32(), M * m1);
  linear(merge2_, z1->f32(), M, z2->f32());
  return z2;
}

std::vector<std::vector<float>> VisionTower::features_batch(std::span<const PreprocessedImage* const> images) {
  std::vector<int32_t> bounds;
  auto h = encode(images, bounds);
  const size_t H = static_cast<size_t>(hidden_);
  std::vector<std::vector<float>> out(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    const size_t n = static_cast<size_t>(bounds[i + 1] - bounds[i]);
    out[i].resize(n * H);
    backend_.download(*h, static_cast<size_t>(bounds[i]) * H, out[i].data(), n * H);
  }
  return out;
}

std::vector<std::vector<float>> VisionTower::embed_batch(std::span<const PreprocessedImage* const> images) {
  std::vector<int32_t> bounds;
  auto h = encode(images, bounds);
  const size_t N = static_cast<size_t>(bounds.back()), window = static_cast<size_t>(merge_ * merge_);
  auto z = project_rows(h->f32(), N);  // per-row ops: one projector pass over every image's rows
  const size_t out_dim = static_cast<size_t>(output_);
  std::vector<std::vector<float>> out(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    const size_t first = static_cast<size_t>(bounds[i]) / window;
    const size_t tokens = static_cast<size_t>(bounds[i + 1] - bounds[i]) / window;
    out[i].resize(tokens * out_dim);
    backend_.download(*z, first * out_dim, out[i].data(), tokens * out_dim);
  }
  return out;
}

std::vector<float> VisionTower::features(const PreprocessedImage& image) {
  const PreprocessedImage* one = &image;
  return std::move(features_batch({&one, 1}).front());
}

std::vector<float> VisionTower::embed(const PreprocessedImage& image) {
  const PreprocessedImage* one = &image;
  return std::move(embed_batch({&one, 1}).front());
}

std::vector<float> VisionTower::project(const std::vector<float>& features, int64_t num_patches) {
  const size_t N = static_cast<size_t>(num_patches), H = static_cast<size_t>(hidden_);
  const size_t window = static_cast<size_t>(merge_ * merge_);
  if (N == 0 || N % window != 0 || features.size() != N * H)
    fail("projector input: {} floats for {} patches of {} (must be a multiple of {} patches)", features.size(), N, H,
         window);
  auto in = backend_.alloc(N * H);
  backend_.upload(*in, 0, features.data(), features.size());
  auto z = project_rows(in->f32(), N);
  std::vector<float> out(N / window * static_cast<size_t>(output_));
  backend_.download(*z, 0, out.data(), out.size());
  return out;
}

}  // namespace mxlm::model
