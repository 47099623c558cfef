#include "model/vision_tower.h"

#include <algorithm>
#include <array>
#include <cmath>
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

// ---- host helpers for ops the backend interface lacks (f32, as torch computes them on CPU up to rounding).

void layer_norm(const float* x, const float* w, const float* b, float* out, size_t rows, size_t dim, float eps) {
#pragma omp parallel for schedule(static) if (rows > 16)
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    double mean = 0.0;
    for (size_t i = 0; i < dim; ++i) mean += xr[i];
    mean /= static_cast<double>(dim);
    double var = 0.0;
    for (size_t i = 0; i < dim; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= static_cast<double>(dim);
    const float m = static_cast<float>(mean);
    const float inv = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
    float* o = out + r * dim;
    for (size_t i = 0; i < dim; ++i) o[i] = (xr[i] - m) * inv * w[i] + b[i];
  }
}

void add_bias(float* y, const float* b, size_t rows, size_t cols) {
#pragma omp parallel for schedule(static) if (rows > 16)
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < cols; ++c) y[r * cols + c] += b[c];
}

// Exact (erf) GELU.
void gelu(float* x, size_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (size_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
}

void softmax_rows(float* x, size_t rows, size_t cols, float scale) {
#pragma omp parallel for schedule(static) if (rows > 16)
  for (size_t r = 0; r < rows; ++r) {
    float* xr = x + r * cols;
    float mx = -INFINITY;
    for (size_t c = 0; c < cols; ++c) mx = std::max(mx, xr[c] * scale);
    double sum = 0.0;
    for (size_t c = 0; c < cols; ++c) {
      xr[c] = std::exp(xr[c] * scale - mx);
      sum += xr[c];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (size_t c = 0; c < cols; ++c) xr[c] *= inv;
  }
}

// x [tokens, heads, head_dim]: rotate-half over the first 2·pairs dims with the per-token angles.
void apply_rotary(float* x, const VisionRotary& r, size_t tokens, int heads) {
  const int P = r.pairs();
  const size_t D = static_cast<size_t>(r.head_dim);
#pragma omp parallel for schedule(static) if (tokens > 16)
  for (size_t t = 0; t < tokens; ++t) {
    const float* c = r.cos.data() + t * static_cast<size_t>(P);
    const float* s = r.sin.data() + t * static_cast<size_t>(P);
    for (int h = 0; h < heads; ++h) {
      float* v = x + (t * static_cast<size_t>(heads) + static_cast<size_t>(h)) * D;
      for (int k = 0; k < P; ++k) {
        const float a = v[k], b = v[k + P];
        v[k] = a * c[k] - b * s[k];
        v[k + P] = b * c[k] + a * s[k];
      }
    }
  }
}

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
  add_bias(y, l.b->f32(), m, static_cast<size_t>(l.w->rows()));
}

std::vector<float> VisionTower::features(const PreprocessedImage& image) {
  const size_t N = static_cast<size_t>(image.num_patches());
  if (N == 0) fail("image has no patches");
  if (image.pixel_values.size() != N * static_cast<size_t>(patch_dim_))
    fail("pixel values hold {} floats, expected {} patches x {}", image.pixel_values.size(), N, patch_dim_);
  const size_t H = static_cast<size_t>(hidden_), D = static_cast<size_t>(head_dim_);
  const size_t I = static_cast<size_t>(config_.vision.intermediate_size);
  const VisionRotary rot =
      vision_rotary(head_dim_, config_.vision.rope_theta, image.grid_t, image.grid_h, image.grid_w, merge_);
  auto buf = [&](size_t n) { return backend_.alloc(std::max<size_t>(n, 1)); };
  auto px = buf(N * static_cast<size_t>(patch_dim_));
  backend_.upload(*px, 0, image.pixel_values.data(), image.pixel_values.size());
  auto h = buf(N * H), x = buf(N * H), q = buf(N * H), k = buf(N * H), v = buf(N * H), a = buf(N * H);
  auto f = buf(N * I), scores = buf(N * N), qh = buf(N * D), oh = buf(N * D);
  backend_.linear(px->f32(), N, *patch_embed_, x->f32());
  layer_norm(x->f32(), pre_norm_w_->f32(), pre_norm_b_->f32(), h->f32(), N, H, eps_);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> kt(N * D), vt(D * N);
  for (const auto& layer : layers_) {
    layer_norm(h->f32(), layer->ln1_w->f32(), layer->ln1_b->f32(), x->f32(), N, H, eps_);
    linear(layer->q, x->f32(), N, q->f32());
    linear(layer->k, x->f32(), N, k->f32());
    linear(layer->v, x->f32(), N, v->f32());
    apply_rotary(q->f32(), rot, N, heads_);
    apply_rotary(k->f32(), rot, N, heads_);
    // Bidirectional attention over this image's patches, one head at a time as two GEMMs.
    for (size_t hd = 0; hd < static_cast<size_t>(heads_); ++hd) {
      for (size_t t = 0; t < N; ++t)
        for (size_t d = 0; d < D; ++d) {
          qh->f32()[t * D + d] = q->f32()[t * H + hd * D + d];
          kt[t * D + d] = k->f32()[t * H + hd * D + d];
          vt[d * N + t] = v->f32()[t * H + hd * D + d];
        }
      const auto kw = backend_.upload_weight(
          {WeightFormat::F32, static_cast<int64_t>(N), static_cast<int64_t>(D), kt.data(), nullptr});
      const auto vw = backend_.upload_weight(
          {WeightFormat::F32, static_cast<int64_t>(D), static_cast<int64_t>(N), vt.data(), nullptr});
      backend_.linear(qh->f32(), N, *kw, scores->f32());
      softmax_rows(scores->f32(), N, N, scale);
      backend_.linear(scores->f32(), N, *vw, oh->f32());
      for (size_t t = 0; t < N; ++t)
        for (size_t d = 0; d < D; ++d) a->f32()[t * H + hd * D + d] = oh->f32()[t * D + d];
    }
    linear(layer->o, a->f32(), N, x->f32());
    backend_.add(h->f32(), x->f32(), h->f32(), N * H);
    layer_norm(h->f32(), layer->ln2_w->f32(), layer->ln2_b->f32(), x->f32(), N, H, eps_);
    linear(layer->fc1, x->f32(), N, f->f32());
    gelu(f->f32(), N * I);
    linear(layer->fc2, f->f32(), N, x->f32());
    backend_.add(h->f32(), x->f32(), h->f32(), N * H);
  }
  std::vector<float> out(N * H);
  backend_.download(*h, 0, out.data(), out.size());
  return out;
}

std::vector<float> VisionTower::project(const std::vector<float>& features, int64_t num_patches) {
  const size_t N = static_cast<size_t>(num_patches), H = static_cast<size_t>(hidden_);
  const size_t window = static_cast<size_t>(merge_ * merge_);
  if (N == 0 || N % window != 0 || features.size() != N * H)
    fail("projector input: {} floats for {} patches of {} (must be a multiple of {} patches)", features.size(), N, H,
         window);
  const size_t p1 = static_cast<size_t>(proj1_.w->rows()), p2 = static_cast<size_t>(proj2_.w->rows());
  const size_t m1 = static_cast<size_t>(merge1_.w->rows()), out_dim = static_cast<size_t>(output_);
  const size_t M = N / window;
  auto in = backend_.alloc(N * H);
  backend_.upload(*in, 0, features.data(), features.size());
  auto u1 = backend_.alloc(N * p1), u2 = backend_.alloc(N * p2), z1 = backend_.alloc(M * m1),
       z2 = backend_.alloc(M * out_dim);
  linear(proj1_, in->f32(), N, u1->f32());
  gelu(u1->f32(), N * p1);
  linear(proj2_, u1->f32(), N, u2->f32());
  // Patches of one merge window are consecutive rows: [N, p2] is already [N / 4, 4 · p2].
  linear(merge1_, u2->f32(), M, z1->f32());
  gelu(z1->f32(), M * m1);
  linear(merge2_, z1->f32(), M, z2->f32());
  std::vector<float> out(M * out_dim);
  backend_.download(*z2, 0, out.data(), out.size());
  return out;
}

}  // namespace mxlm::model
