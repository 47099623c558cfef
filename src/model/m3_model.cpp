#include "model/m3_model.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <tuple>

#include "core/error.h"
#include "core/log.h"
#include "model/step_graphs.h"

namespace mxlm::model {

using backend::Buffer;
using backend::Weight;

struct M3Model::Mlp {
  std::unique_ptr<Weight> gate, up, down;
  explicit operator bool() const { return gate != nullptr; }
};

struct M3Model::Layer {
  int index = 0;
  bool moe = false;
  bool sparse = false;
  std::unique_ptr<Buffer> input_norm, post_norm, q_norm, k_norm;
  std::unique_ptr<Weight> q, k, v, o;
  // Lightning indexer (sparse layers).
  std::unique_ptr<Weight> index_q, index_k;
  std::unique_ptr<Buffer> index_q_norm, index_k_norm;
  // Dense MLP, or the shared expert of a MoE layer.
  Mlp dense;
  std::unique_ptr<Weight> router;
  std::unique_ptr<Buffer> router_bias;
  std::vector<std::unique_ptr<Weight>> w1, w3, w2;
  std::vector<const Weight*> w1_ptr, w3_ptr, w2_ptr;
};

// Captured decode steps by (rows, pages, greedy), for one set of layer caches (the graphs hold their addresses).
struct M3Model::Graphs {
  struct Entry {
    std::unique_ptr<backend::StepGraph> graph;
    bool capture_failed = false;
  };
  std::map<std::tuple<int, int, bool>, Entry> entries;
  // The graphs' output by (rows, greedy), shared by every page bucket (a replay's output is read before the next
  // step): ids [rows] with greedy, else logits [rows, vocab].
  std::map<std::pair<int, bool>, std::unique_ptr<Buffer>> outputs;
  std::vector<const float*> caches;
  StepGraphStats stats;
};

namespace {

// Scratch buffer that lives for one forward call.
class Scratch {
 public:
  explicit Scratch(backend::Backend& b) : backend_(b) {}
  float* operator()(size_t n) {
    buffers_.push_back(backend_.alloc(std::max<size_t>(n, 1)));
    return buffers_.back()->f32();
  }
  int32_t* i32(size_t n) {
    buffers_.push_back(backend_.alloc(std::max<size_t>(n, 1)));
    return buffers_.back()->i32();
  }

 private:
  backend::Backend& backend_;
  std::vector<std::unique_ptr<Buffer>> buffers_;
};

}  // namespace

M3Model::M3Model(const io::ModelConfig& config, const io::Checkpoint& ckpt, backend::Backend& backend,
                 ModelOptions options)
    : config_(config), backend_(backend), options_(options) {
  WeightLoader load(ckpt, backend, options_.float_format);
  bind(load);
}

M3Model::M3Model(const io::ModelConfig& config, WeightSource& weights, backend::Backend& backend, ModelOptions options)
    : config_(config), backend_(backend), options_(options) {
  bind(weights);
}

void M3Model::bind(WeightSource& load) {
  const io::TextConfig& t = config_.text;
  const TensorParallel& tp = options_.tp;
  if (tp.size < 1 || tp.rank < 0 || tp.rank >= tp.size) fail("invalid tensor-parallel rank {} of {}", tp.rank, tp.size);
  if (tp.size != backend_.tp_size() || tp.rank != backend_.tp_rank())
    fail("model bound for TP rank {}/{} but the backend is rank {}/{}", tp.rank, tp.size, backend_.tp_rank(),
         backend_.tp_size());
  if (t.hidden_size <= 0 || t.num_layers <= 0 || t.num_heads <= 0 || t.num_kv_heads <= 0 || t.head_dim <= 0 ||
      t.vocab_size <= 0)
    fail("config: hidden_size, num_hidden_layers, heads, head_dim and vocab_size must be positive");
  if (t.num_heads % t.num_kv_heads != 0)
    fail("config: {} heads is not a multiple of {} KV heads", t.num_heads, t.num_kv_heads);
  if (static_cast<int>(t.layer_is_moe.size()) != t.num_layers ||
      static_cast<int>(t.layer_is_sparse.size()) != t.num_layers)
    fail("config: per-layer MoE/sparse flags do not cover {} layers", t.num_layers);
  if (t.num_heads % tp.size != 0) fail("{} attention heads cannot be split over {} ranks", t.num_heads, tp.size);
  local_heads_ = t.num_heads / tp.size;
  int kv_begin = 0;
  if (tp.size <= t.num_kv_heads) {
    if (t.num_kv_heads % tp.size != 0) fail("{} KV heads cannot be split over {} ranks", t.num_kv_heads, tp.size);
    local_kv_heads_ = t.num_kv_heads / tp.size;
    kv_begin = tp.rank * local_kv_heads_;
  } else {
    local_kv_heads_ = 1;  // replicated: rank r serves the KV head of its query heads
    kv_begin = tp.rank * t.num_kv_heads / tp.size;
  }
  const int64_t H = t.hidden_size, D = t.head_dim;
  const std::string lm = "language_model.";

  const Shard vocab = Shard::even_rows(t.vocab_size, tp);
  vocab_begin_ = vocab.split == Shard::Split::None ? 0 : vocab.begin;
  local_vocab_ = vocab.split == Shard::Split::None ? t.vocab_size : vocab.count;
  embed_ = load.matrix(lm + "model.embed_tokens", t.vocab_size, H, vocab);
  bytes_.embedding = load.bytes_loaded();
  final_norm_ = load.vector(lm + "model.norm.weight", H);
  if (load.has(lm + "lm_head.weight")) {
    lm_head_ = load.matrix(lm + "lm_head", t.vocab_size, H, vocab);
  } else if (t.tie_word_embeddings) {
    lm_head_ = load.matrix(lm + "model.embed_tokens", t.vocab_size, H, vocab);
  } else {
    fail("checkpoint {} has no tensor {}lm_head.weight (and tie_word_embeddings is false)", load.origin(), lm);
  }

  const Shard q_rows = Shard::even_rows(t.num_heads * D, tp);
  const Shard o_cols = Shard::even_cols(t.num_heads * D, tp);
  const Shard kv_rows = tp.size == 1 ? Shard::whole() : Shard::rows(kv_begin * D, local_kv_heads_ * D);
  const auto& sp = t.sparse;
  for (int i = 0; i < t.num_layers; ++i) {
    auto layer = std::make_unique<Layer>();
    const std::string p = lm + "model.layers." + std::to_string(i) + ".";
    layer->moe = t.layer_is_moe[static_cast<size_t>(i)];
    layer->sparse = t.layer_is_sparse[static_cast<size_t>(i)];
    layer->input_norm = load.vector(p + "input_layernorm.weight", H);
    layer->post_norm = load.vector(p + "post_attention_layernorm.weight", H);
    layer->q = load.matrix(p + "self_attn.q_proj", t.num_heads * D, H, q_rows);
    layer->k = load.matrix(p + "self_attn.k_proj", t.num_kv_heads * D, H, kv_rows);
    layer->v = load.matrix(p + "self_attn.v_proj", t.num_kv_heads * D, H, kv_rows);
    layer->o = load.matrix(p + "self_attn.o_proj", H, t.num_heads * D, o_cols);
    if (t.qk_norm) {
      layer->q_norm = load.vector(p + "self_attn.q_norm.weight", D);
      layer->k_norm = load.vector(p + "self_attn.k_norm.weight", D);
    }
    if (layer->sparse) {
      if (sp.num_index_heads != t.num_kv_heads)
        fail(
            "layer {}: the indexer has {} heads but there are {} KV heads; index head h selects the blocks of KV "
            "head h, so they must match",
            i, sp.num_index_heads, t.num_kv_heads);
      const int64_t Di = sp.index_dim;
      const Shard iq_rows = tp.size == 1 ? Shard::whole() : Shard::rows(kv_begin * Di, local_kv_heads_ * Di);
      layer->index_q = load.matrix(p + "self_attn.index_q_proj", sp.num_index_heads * Di, H, iq_rows);
      layer->index_k = load.matrix(p + "self_attn.index_k_proj", Di, H);
      layer->index_q_norm = load.vector(p + "self_attn.index_q_norm.weight", Di);
      layer->index_k_norm = load.vector(p + "self_attn.index_k_norm.weight", Di);
    }
    if (!layer->moe) {
      const int64_t I = t.dense_intermediate_size;
      layer->dense.gate = load.matrix(p + "mlp.gate_proj", I, H, Shard::even_rows(I, tp));
      layer->dense.up = load.matrix(p + "mlp.up_proj", I, H, Shard::even_rows(I, tp));
      layer->dense.down = load.matrix(p + "mlp.down_proj", H, I, Shard::even_cols(I, tp));
    } else {
      const std::string m = p + "block_sparse_moe.";
      const int E = t.num_experts;
      if (E <= 0 || t.experts_per_token <= 0 || t.experts_per_token > E)
        fail("config: {} experts with {} per token", E, t.experts_per_token);
      layer->router = load.matrix(m + "gate", E, H, Shard::whole(), /*force_f32=*/true);
      if (t.use_routing_bias) layer->router_bias = load.vector(m + "e_score_correction_bias", E);
      const int64_t I = t.intermediate_size;
      const uint64_t before_experts = load.bytes_loaded();
      for (int e = 0; e < E; ++e) {
        const std::string x = m + "experts." + std::to_string(e) + ".";
        layer->w1.push_back(load.matrix(x + "w1", I, H, Shard::even_rows(I, tp)));
        layer->w3.push_back(load.matrix(x + "w3", I, H, Shard::even_rows(I, tp)));
        layer->w2.push_back(load.matrix(x + "w2", H, I, Shard::even_cols(I, tp)));
        if (layer->w1.back()->mxfp4() != layer->w1.front()->mxfp4() ||
            layer->w2.back()->mxfp4() != layer->w1.front()->mxfp4() ||
            layer->w3.back()->mxfp4() != layer->w1.front()->mxfp4())
          fail("layer {}: experts mix MXFP4 and float weights", i);
        layer->w1_ptr.push_back(layer->w1.back().get());
        layer->w3_ptr.push_back(layer->w3.back().get());
        layer->w2_ptr.push_back(layer->w2.back().get());
      }
      bytes_.routed_experts += load.bytes_loaded() - before_experts;
      bytes_.one_expert = (load.bytes_loaded() - before_experts) / static_cast<uint64_t>(E);
      if (t.num_shared_experts > 0) {
        const int64_t S = static_cast<int64_t>(t.shared_intermediate_size) * t.num_shared_experts;
        layer->dense.gate = load.matrix(m + "shared_experts.gate_proj", S, H, Shard::even_rows(S, tp));
        layer->dense.up = load.matrix(m + "shared_experts.up_proj", S, H, Shard::even_rows(S, tp));
        layer->dense.down = load.matrix(m + "shared_experts.down_proj", H, S, Shard::even_cols(S, tp));
      }
    }
    layer->index = i;
    layers_.push_back(std::move(layer));
  }
  bytes_.total = load.bytes_loaded();
}

M3Model::~M3Model() {
  // Graphs before the weights and scratch they refer to; no replay may still run.
  graphs_.reset();
}

const StepGraphStats& M3Model::step_graph_stats() const {
  static const StepGraphStats none;
  return graphs_ ? graphs_->stats : none;
}

bool M3Model::layer_is_sparse(int layer) const { return layers_.at(static_cast<size_t>(layer))->sparse; }

bool M3Model::has_sparse_layers() const {
  return std::any_of(layers_.begin(), layers_.end(), [](const auto& l) { return l->sparse; });
}

int64_t M3Model::kv_width() const { return static_cast<int64_t>(local_kv_heads_) * config_.text.head_dim; }

int64_t M3Model::index_width() const { return has_sparse_layers() ? config_.text.sparse.index_dim : 0; }

void M3Model::linear(const float* x, size_t m, const Weight& w, float* y) {
  if (!w.mxfp4()) {
    backend_.linear(x, m, w, y);
    return;
  }
  // MXFP4 emulation: the activations are quantize-dequantized per token in groups of 32 along K.
  auto tmp = backend_.alloc(m * static_cast<size_t>(w.cols()));
  backend_.copy(x, tmp->f32(), m * static_cast<size_t>(w.cols()));
  backend_.qdq_mxfp4(tmp->f32(), m, static_cast<size_t>(w.cols()));
  backend_.linear(tmp->f32(), m, w, y);
}

void M3Model::linears(const float* x, size_t m, std::initializer_list<const Weight*> ws, std::initializer_list<float*> ys) {
  bool quantized = false;
  for (const Weight* w : ws) quantized = quantized || w->mxfp4();
  if (!quantized) {
    backend_.linears(x, m, std::span<const Weight* const>(ws.begin(), ws.size()),
                     std::span<float* const>(ys.begin(), ys.size()));
    return;
  }
  auto y = ys.begin();
  for (const Weight* w : ws) linear(x, m, *w, *y++);
}

void M3Model::mlp(const Mlp& f, const float* x, size_t m, float* out) {
  const size_t inter = static_cast<size_t>(f.gate->rows());
  Scratch s(backend_);
  float* g = s(m * inter);
  float* u = s(m * inter);
  linears(x, m, {f.gate.get(), f.up.get()}, {g, u});
  backend_.swiglu_oai(g, u, g, m * inter,
                      {static_cast<float>(config_.text.swiglu_alpha), static_cast<float>(config_.text.swiglu_limit)});
  linear(g, m, *f.down, out);
}

void M3Model::moe(const Layer& layer, const float* x, size_t m, float* out) {
  const io::TextConfig& t = config_.text;
  const int k = t.experts_per_token;
  Scratch s(backend_);
  int32_t* ids = s.i32(m * static_cast<size_t>(k));
  float* weights = s(m * static_cast<size_t>(k));
  backend_.router(x, m, *layer.router, layer.router_bias ? layer.router_bias->f32() : nullptr, k,
                  static_cast<float>(t.routed_scaling_factor), ids, weights);
  if (routing_observer_) {
    auto host = backend_.alloc(m * static_cast<size_t>(k));
    backend_.copy(reinterpret_cast<const float*>(ids), host->f32(), m * static_cast<size_t>(k));
    std::vector<int32_t> h(m * static_cast<size_t>(k));
    backend_.download(*host, 0, reinterpret_cast<float*>(h.data()), h.size());
    routing_observer_(layer.index, h, k);
  }
  // The shared expert goes with the routed ones (out = routed + shared, added last): a backend may run it inside
  // the routed experts' launches (CUDA native) instead of as the separate MLP + add it was before.
  const backend::SharedExpert shared{layer.dense.gate.get(), layer.dense.up.get(), layer.dense.down.get()};
  backend_.moe_experts(x, m, ids, weights, k, layer.w1_ptr, layer.w3_ptr, layer.w2_ptr, 0,
                       {static_cast<float>(t.swiglu_alpha), static_cast<float>(t.swiglu_limit)},
                       layer.w1.front()->mxfp4(), layer.dense ? &shared : nullptr, out);
}

void M3Model::attention(const Layer& layer, const LayerCache& cache, const backend::AttentionBatch& batch,
                        const float* x, float* out) {
  const io::TextConfig& t = config_.text;
  const size_t T = static_cast<size_t>(batch.num_tokens);
  const int D = t.head_dim;
  const float eps = static_cast<float>(t.rms_norm_eps);
  const float theta = static_cast<float>(t.rope_theta);
  Scratch s(backend_);
  const size_t qw = static_cast<size_t>(local_heads_) * static_cast<size_t>(D);
  const size_t kw = static_cast<size_t>(kv_width());
  float* q = s(T * qw);
  float* k = s(T * kw);
  float* v = s(T * kw);
  // The indexer's q / k read the same x: one call with the attention's (sparse layers).
  const int Di = layer.sparse ? t.sparse.index_dim : 0;
  float* iq = layer.sparse ? s(T * static_cast<size_t>(local_kv_heads_) * static_cast<size_t>(Di)) : nullptr;
  float* ik = layer.sparse ? s(T * static_cast<size_t>(Di)) : nullptr;
  if (layer.sparse) {
    linears(x, T, {layer.q.get(), layer.k.get(), layer.v.get(), layer.index_q.get(), layer.index_k.get()},
            {q, k, v, iq, ik});
  } else {
    linears(x, T, {layer.q.get(), layer.k.get(), layer.v.get()}, {q, k, v});
  }
  // The per-head norms + RoPE of q / k and of the indexer's q / k, and the cache writes of K / V / index K: one call
  // each where the shapes allow (Backend::rms_norm_ropes, cache_writes).
  std::vector<backend::Backend::HeadRows> normed;
  if (layer.q_norm) {
    normed = {{q, layer.q_norm->f32(), local_heads_}, {k, layer.k_norm->f32(), local_kv_heads_}};
  } else {
    backend_.rope(q, batch.positions, local_heads_, D, t.rotary_dim, theta);
    backend_.rope(k, batch.positions, local_kv_heads_, D, t.rotary_dim, theta);
  }
  std::vector<backend::Backend::CacheRows> written{{k, kw, cache.k}, {v, kw, cache.v}};
  if (layer.sparse) {
    if (!cache.index_k) fail("sparse layer without an index-K cache");
    // The indexer shares the main attention's partial RoPE (transformers slices cos/sin to the index dim).
    const int index_rotary = std::min(t.rotary_dim, Di);
    const std::vector<backend::Backend::HeadRows> index_rows{{iq, layer.index_q_norm->f32(), local_kv_heads_},
                                                             {ik, layer.index_k_norm->f32(), 1}};
    if (!normed.empty() && Di == D && index_rotary == t.rotary_dim) {
      normed.insert(normed.end(), index_rows.begin(), index_rows.end());
    } else {
      backend_.rms_norm_ropes(index_rows, batch.positions, Di, eps, t.gemma_norm, index_rotary, theta);
    }
    written.push_back({ik, static_cast<size_t>(Di), cache.index_k});
  }
  if (!normed.empty()) backend_.rms_norm_ropes(normed, batch.positions, D, eps, t.gemma_norm, t.rotary_dim, theta);
  backend_.cache_writes(written, batch.slots);
  const backend::AttentionShape shape{local_heads_, local_kv_heads_, D, 1.0f / std::sqrt(static_cast<float>(D))};
  float* attn = s(T * qw);
  if (layer.sparse) {
    const auto& sp = t.sparse;
    const backend::IndexerShape ishape{local_kv_heads_, Di, sp.topk_blocks, sp.local_blocks, sp.init_blocks};
    int32_t* blocks = s.i32(T * static_cast<size_t>(local_kv_heads_) * static_cast<size_t>(sp.topk_blocks));
    backend_.index_select(iq, batch, ishape, cache.index_k, blocks);
    backend_.sparse_attention(q, batch, shape, cache.k, cache.v, blocks, sp.topk_blocks, attn);
  } else {
    backend_.attention(q, batch, shape, cache.k, cache.v, attn);
  }
  linear(attn, T, *layer.o, out);
  backend_.all_reduce_sum(out, T * static_cast<size_t>(t.hidden_size));
}

std::vector<float> M3Model::forward(const ForwardBatch& batch, std::span<const LayerCache> caches) {
  if (Buffer* out = graph_step(batch, caches, false)) {
    // Rows 0 .. T-1 of the graph's logits are the step's own (padding rows come after them).
    const size_t T = batch.tokens.size(), V = static_cast<size_t>(vocab_size()), n = batch.logit_rows.size();
    std::vector<float> all(T * V);
    backend_.download(*out, 0, all.data(), all.size());
    bool identity = n == T;
    for (size_t j = 0; identity && j < n; ++j) identity = batch.logit_rows[j] == static_cast<int32_t>(j);
    if (identity) return all;
    std::vector<float> picked(n * V);
    for (size_t j = 0; j < n; ++j)
      std::copy_n(all.begin() + static_cast<ptrdiff_t>(static_cast<size_t>(batch.logit_rows[j]) * V), V,
                  picked.begin() + static_cast<ptrdiff_t>(j * V));
    return picked;
  }
  auto all = logits_on_device(batch, caches);
  std::vector<float> logits(all ? all->size() : 0);
  if (all) backend_.download(*all, 0, logits.data(), logits.size());
  return logits;
}

std::vector<int32_t> M3Model::forward_greedy(const ForwardBatch& batch, std::span<const LayerCache> caches) {
  if (Buffer* out = graph_step(batch, caches, true)) {
    std::vector<int32_t> all(batch.tokens.size());
    backend_.download(*out, 0, reinterpret_cast<float*>(all.data()), all.size());
    std::vector<int32_t> ids(batch.logit_rows.size());
    for (size_t j = 0; j < ids.size(); ++j) ids[j] = all[static_cast<size_t>(batch.logit_rows[j])];
    return ids;
  }
  auto all = logits_on_device(batch, caches);
  std::vector<int32_t> ids(all ? batch.logit_rows.size() : 0);
  if (ids.empty()) return ids;
  auto d = backend_.alloc(ids.size());
  backend_.argmax_rows(all->f32(), ids.size(), static_cast<size_t>(config_.text.vocab_size), d->i32());
  backend_.download(*d, 0, reinterpret_cast<float*>(ids.data()), ids.size());
  return ids;
}

void M3Model::validate(const ForwardBatch& batch, std::span<const LayerCache> caches) const {
  const io::TextConfig& t = config_.text;
  const auto& ab = batch.attention;
  const size_t T = batch.tokens.size();
  if (static_cast<size_t>(ab.num_tokens) != T || ab.positions.size() != T || ab.slots.size() != T)
    fail("forward batch: {} tokens but {} positions / {} slots / num_tokens {}", T, ab.positions.size(),
         ab.slots.size(), ab.num_tokens);
  if (caches.size() != layers_.size()) fail("forward: {} layer caches for {} layers", caches.size(), layers_.size());
  if (has_sparse_layers() && ab.block_size != t.sparse.block_size)
    fail("KV page size {} differs from the sparse attention block size {}", ab.block_size, t.sparse.block_size);
  for (int32_t id : batch.tokens)
    if (id < 0 || id >= t.vocab_size) fail("token id {} outside the vocabulary [0, {})", id, t.vocab_size);
  for (int32_t r : batch.logit_rows)
    if (r < 0 || static_cast<size_t>(r) >= T) fail("logit row {} outside the batch of {} tokens", r, T);
}

std::vector<int32_t> M3Model::forward_sample(const ForwardBatch& batch, std::span<const LayerCache> caches,
                                             std::span<const backend::SampleParams> params) {
  if (params.size() != batch.logit_rows.size())
    fail("forward_sample: {} sampling parameter sets for {} logit rows", params.size(), batch.logit_rows.size());
  // A decode step with its logit rows in row order draws from the captured step's logits (rows 0 .. T-1).
  bool in_order = batch.logit_rows.size() == batch.tokens.size();
  for (size_t j = 0; in_order && j < batch.logit_rows.size(); ++j)
    in_order = batch.logit_rows[j] == static_cast<int32_t>(j);
  if (Buffer* out = in_order ? graph_step(batch, caches, false) : nullptr) {
    std::vector<int32_t> ids(batch.logit_rows.size());
    auto d = backend_.alloc(ids.size());
    backend_.sample_rows(out->f32(), ids.size(), static_cast<size_t>(config_.text.vocab_size), params, d->i32());
    backend_.download(*d, 0, reinterpret_cast<float*>(ids.data()), ids.size());
    return ids;
  }
  auto all = logits_on_device(batch, caches);
  std::vector<int32_t> ids(all ? batch.logit_rows.size() : 0);
  if (ids.empty()) return ids;
  auto d = backend_.alloc(ids.size());
  backend_.sample_rows(all->f32(), ids.size(), static_cast<size_t>(config_.text.vocab_size), params, d->i32());
  backend_.download(*d, 0, reinterpret_cast<float*>(ids.data()), ids.size());
  return ids;
}

std::unique_ptr<Buffer> M3Model::logits_on_device(const ForwardBatch& batch, std::span<const LayerCache> caches) {
  if (batch.tokens.empty()) return nullptr;
  validate(batch, caches);
  // The step's token ids, positions, slots and block tables go to the device once, not per op.
  auto binding = backend_.bind_step(batch.attention, batch.tokens);
  std::unique_ptr<Buffer> all;
  if (!batch.logit_rows.empty()) all = backend_.alloc(batch.logit_rows.size() * static_cast<size_t>(vocab_size()));
  run_layers(batch, caches, all ? all->f32() : nullptr);
  return all;
}

void M3Model::run_layers(const ForwardBatch& batch, std::span<const LayerCache> caches, float* logits) {
  const io::TextConfig& t = config_.text;
  const auto& ab = batch.attention;
  const size_t T = batch.tokens.size();
  const size_t H = static_cast<size_t>(t.hidden_size);
  const float eps = static_cast<float>(t.rms_norm_eps);
  Scratch s(backend_);
  float* h = s(T * H);
  float* x = s(T * H);
  float* y = s(T * H);
  backend_.embedding(*embed_, batch.tokens, vocab_begin_, h);
  if (backend_.tp_size() > 1) backend_.all_reduce_sum(h, T * H);
  if (!batch.embedding_rows.empty()) {
    const size_t n = batch.embedding_rows.size();
    if (batch.embeddings.size() != n * H)
      fail("forward batch: {} embedding rows but {} embedding floats (hidden size {})", n, batch.embeddings.size(), H);
    auto given = backend_.alloc(n * H);
    backend_.upload(*given, 0, batch.embeddings.data(), n * H);
    for (size_t i = 0; i < n; ++i) {
      const int32_t r = batch.embedding_rows[i];
      if (r < 0 || static_cast<size_t>(r) >= T) fail("embedding row {} outside the batch of {} tokens", r, T);
      backend_.copy(given->f32() + i * H, h + static_cast<size_t>(r) * H, H);
    }
  }
  // Each residual add goes with the norm after it (Backend::add_rms_norm); the last layer's add stands alone (the final
  // norm runs on the logit rows only).
  if (!layers_.empty()) backend_.rms_norm(h, layers_.front()->input_norm->f32(), x, T, H, eps, t.gemma_norm);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& layer = *layers_[i];
    attention(layer, caches[i], ab, x, y);
    backend_.add_rms_norm(h, y, layer.post_norm->f32(), x, T, H, eps, t.gemma_norm);
    if (layer.moe) {
      moe(layer, x, T, y);
    } else {
      mlp(layer.dense, x, T, y);
    }
    backend_.all_reduce_sum(y, T * H);
    if (i + 1 < layers_.size()) {
      backend_.add_rms_norm(h, y, layers_[i + 1]->input_norm->f32(), x, T, H, eps, t.gemma_norm);
    } else {
      backend_.add(h, y, h, T * H);
    }
  }

  const size_t R = batch.logit_rows.size();
  if (R == 0) return;
  float* rows = s(R * H);
  for (size_t r = 0; r < R; ++r) backend_.copy(h + static_cast<size_t>(batch.logit_rows[r]) * H, rows + r * H, H);
  backend_.rms_norm(rows, final_norm_->f32(), rows, R, H, eps, t.gemma_norm);
  float* local = s(R * static_cast<size_t>(local_vocab_));
  linear(rows, R, *lm_head_, local);
  backend_.all_gather_cols(local, R, static_cast<size_t>(local_vocab_), logits);
}

Buffer* M3Model::graph_step(const ForwardBatch& batch, std::span<const LayerCache> caches, bool greedy) {
  const StepGraphs mode = options_.step_graphs;
  // Whether a step is padded depends on the batch and the options only, never on this rank's state: tensor-parallel
  // ranks must run collectives of the same sizes.
  if (mode == StepGraphs::Off || batch.enforce_eager || !backend_.supports_step_graphs() || batch.logit_rows.empty() ||
      !is_decode_step(batch))
    return nullptr;
  const int T = static_cast<int>(batch.tokens.size());
  const int R = step_graph_rows(T, options_.max_graph_rows);
  if (R == 0) return nullptr;
  validate(batch, caches);
  const int P = step_graph_pages(step_pages_needed(batch));
  if (!graphs_) graphs_ = std::make_unique<Graphs>();
  Graphs& g = *graphs_;
  std::vector<const float*> cache_ptrs;
  for (const LayerCache& c : caches) cache_ptrs.insert(cache_ptrs.end(), {c.k, c.v, c.index_k});
  if (cache_ptrs != g.caches) {  // other caches: the graphs would write into the old ones
    g.entries.clear();
    g.caches = std::move(cache_ptrs);
  }
  Graphs::Entry& e = g.entries[{R, P, greedy}];
  // A routing observer downloads inside the step: such steps (and buckets whose capture failed) run padded, eagerly.
  const bool capture = mode == StepGraphs::On && !routing_observer_ && !e.capture_failed;
  const size_t V = static_cast<size_t>(vocab_size());
  const ForwardBatch padded = pad_decode_step(batch, R);
  if (!e.graph) e.graph = backend_.make_step_graph(R, P);
  std::unique_ptr<Buffer>& out_buffer = g.outputs[{R, greedy}];
  if (!out_buffer) out_buffer = backend_.alloc(greedy ? static_cast<size_t>(R) : static_cast<size_t>(R) * V);
  backend::StepGraph& graph = *e.graph;
  Buffer& out = *out_buffer;
  const auto body = [&] {
    auto binding = backend_.bind_step(padded.attention, padded.tokens, &graph);
    if (!greedy) {
      run_layers(padded, caches, out.f32());
      return;
    }
    auto all = backend_.alloc(static_cast<size_t>(R) * V);
    run_layers(padded, caches, all->f32());
    backend_.argmax_rows(all->f32(), static_cast<size_t>(R), V, out.i32());
  };
  if (capture && graph.captured()) {
    backend_.replay_step(graph, padded.attention, padded.tokens);
    ++g.stats.replays;
  } else {
    backend_.run_step(graph, body);
    ++g.stats.padded_eager;
    if (capture && !graph.captured()) {
      try {
        backend_.capture_step(graph, body);
        ++g.stats.captures;
      } catch (const Error& err) {
        // This bucket runs padded and eagerly from now on; this step's output (run_step's) stands.
        spdlog::warn("decode steps of {} rows / {} pages run eagerly: {}", R, P, err.what());
        e.capture_failed = true;
        ++g.stats.capture_failures;
      }
    }
  }
  return &out;
}

std::unique_ptr<M3Model> load_m3_model(const std::filesystem::path& dir, backend::Backend& backend,
                                       ModelOptions options) {
  const io::ModelConfig config = io::load_model_config(dir);
  const io::Checkpoint checkpoint(dir);
  return std::make_unique<M3Model>(config, checkpoint, backend, options);
}

}  // namespace mxlm::model
