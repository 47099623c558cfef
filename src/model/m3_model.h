// The MiniMax-M3 text model (shared/spec/m3_checkpoint.md §4, §7 and m3_sparse_attention.md), written once
// against backend::Backend and bound to the upstream checkpoint names through tensor-parallel sharding rules
// (column-parallel q/k/v/gate/up/index-q, row-parallel o/down with an all-reduce, KV and index heads replicated
// when TP exceeds their count, experts split on the intermediate dimension, vocab-parallel embedding and lm_head).
// A single device is TP = 1.
#pragma once

#include <filesystem>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/weight_loader.h"

namespace mxlm::model {

// Decode steps as captured graphs (model/step_graphs.h) on backends that have them (CUDA): Off runs every step
// eagerly (`--enforce-eager`); On pads decode steps to their row / page bucket, runs a bucket's first step eagerly,
// captures it and replays it afterwards; EagerPadded pads and binds the same way but never captures (the eager
// path the replays are checked against). Steps while a routing observer is set, and buckets whose capture failed,
// run padded and eagerly; whether a step is padded depends only on the batch and these options, so that
// tensor-parallel ranks agree.
enum class StepGraphs { Off, On, EagerPadded };

struct ModelOptions {
  // Store float weights in this format (F32 or BF16); nullopt keeps each tensor's checkpoint dtype. MXFP4 stays.
  std::optional<backend::WeightFormat> float_format;
  TensorParallel tp;
  StepGraphs step_graphs = StepGraphs::Off;  // the CLI turns it On for CUDA unless --enforce-eager
  int max_graph_rows = 256;                  // larger decode steps run eagerly
};

// What the captured-step path did so far (tests and benchmarks).
struct StepGraphStats {
  uint64_t captures = 0;          // graphs captured
  uint64_t replays = 0;           // steps run by replaying a graph
  uint64_t padded_eager = 0;      // padded steps run eagerly (a bucket's first step, EagerPadded)
  uint64_t capture_failures = 0;  // buckets whose capture failed (they run padded, eagerly)
};

// One layer's cache pages: [num_pages, block_size, width] elements of the backend's cache_dtype() (f32 unless
// configured otherwise; allocate with Backend::alloc_cache; the pointers are handles). index_k is null on
// full-attention layers.
struct LayerCache {
  float* k = nullptr;
  float* v = nullptr;
  float* index_k = nullptr;
};

// One step over several sequences: rows are the new tokens of every sequence, laid out as `attention` says.
struct ForwardBatch {
  backend::AttentionBatch attention;
  std::vector<int32_t> tokens;      // per row
  std::vector<int32_t> logit_rows;  // rows whose logits to return, in this order
  // Rows whose input embedding is given instead of looked up (image tokens get the vision tower's output):
  // embeddings is [embedding_rows.size(), hidden_size] f32 on the host.
  std::vector<int32_t> embedding_rows;
  std::vector<float> embeddings;
  bool enforce_eager = false;  // never a captured step, whatever ModelOptions::step_graphs says
};

// Bytes of the stored weights (this rank's), split the way a decode step touches them: the embedding table is
// read one row per token, routed experts only where the routing sends tokens, everything else whole every step.
struct WeightBytes {
  uint64_t total = 0;
  uint64_t embedding = 0;       // the input embedding table
  uint64_t routed_experts = 0;  // every routed expert of every MoE layer
  uint64_t one_expert = 0;      // one routed expert (gate + up + down)
};

// Sees each MoE layer's routing: ids [tokens, k] (expert ids) on the host. For benchmarks that count the experts a
// step touches; each call costs a download, so leave it unset otherwise.
using RoutingObserver = std::function<void(int layer, std::span<const int32_t> ids, int k)>;

class M3Model {
 public:
  M3Model(const io::ModelConfig& config, const io::Checkpoint& checkpoint, backend::Backend& backend,
          ModelOptions options = {});
  // Weights from any source (e.g. DummyWeights: random, made by the backend).
  M3Model(const io::ModelConfig& config, WeightSource& weights, backend::Backend& backend, ModelOptions options = {});
  ~M3Model();
  M3Model(const M3Model&) = delete;
  M3Model& operator=(const M3Model&) = delete;

  const io::TextConfig& text() const { return config_.text; }
  backend::Backend& backend() { return backend_; }
  int num_layers() const { return config_.text.num_layers; }
  int vocab_size() const { return config_.text.vocab_size; }
  bool layer_is_sparse(int layer) const;
  bool has_sparse_layers() const;
  // Floats per token slot of this rank's K (and V) cache, and of the index-K cache of sparse layers.
  int64_t kv_width() const;
  int64_t index_width() const;
  uint64_t weight_bytes() const { return bytes_.total; }
  const WeightBytes& weight_bytes_by_kind() const { return bytes_; }
  void set_routing_observer(RoutingObserver observer) { routing_observer_ = std::move(observer); }
  StepGraphs step_graphs() const { return options_.step_graphs; }
  void set_step_graphs(StepGraphs mode) { options_.step_graphs = mode; }
  const StepGraphStats& step_graph_stats() const;

  // Writes the batch's K/V/index-K into `caches` (one per layer) at batch.attention.slots, runs every layer and
  // returns the logits of batch.logit_rows as [logit_rows, vocab] f32 on the host.
  std::vector<float> forward(const ForwardBatch& batch, std::span<const LayerCache> caches);
  // The same step, but only the argmax token of each logit row comes back (greedy sampling on the device; the first
  // index of equal maxima, as engine::Sampler). Every tensor-parallel rank runs forward or forward_greedy alike.
  std::vector<int32_t> forward_greedy(const ForwardBatch& batch, std::span<const LayerCache> caches);
  // The same step, but each logit row's token is drawn on the backend with params[row] (backend/sampling.h: every
  // backend draws the same token from the same logits); only the tokens come back.
  std::vector<int32_t> forward_sample(const ForwardBatch& batch, std::span<const LayerCache> caches,
                                      std::span<const backend::SampleParams> params);

 private:
  struct Layer;
  struct Mlp;
  struct Graphs;
  void bind(WeightSource& weights);
  void validate(const ForwardBatch& batch, std::span<const LayerCache> caches) const;
  // The step's logits [logit_rows, vocab] in backend memory (null without logit rows).
  std::unique_ptr<backend::Buffer> logits_on_device(const ForwardBatch& batch, std::span<const LayerCache> caches);
  // Every layer, then the logits of batch.logit_rows into `logits` (backend memory; may be null without logit rows).
  // The step's metadata must be bound (Backend::bind_step) for the backend to read it once.
  void run_layers(const ForwardBatch& batch, std::span<const LayerCache> caches, float* logits);
  // A decode step as a captured graph (step_graphs.h): its output in backend memory, rows 0 .. T-1 the step's own
  // (argmax ids [rows] with greedy, else logits [rows, vocab]), enqueued, not yet read; null when the step does not
  // qualify (run it eagerly).
  backend::Buffer* graph_step(const ForwardBatch& batch, std::span<const LayerCache> caches, bool greedy);
  void linear(const float* x, size_t m, const backend::Weight& w, float* y);
  // linear() of each weight over the same x; one backend call (Backend::linears) when none needs the MXFP4 QDQ.
  void linears(const float* x, size_t m, std::initializer_list<const backend::Weight*> ws,
               std::initializer_list<float*> ys);
  void mlp(const Mlp& mlp, const float* x, size_t m, float* out);
  void attention(const Layer& layer, const LayerCache& cache, const backend::AttentionBatch& batch, const float* x,
                 float* out);
  void moe(const Layer& layer, const float* x, size_t m, float* out);

  io::ModelConfig config_;
  backend::Backend& backend_;
  ModelOptions options_;
  int local_heads_ = 0;
  int local_kv_heads_ = 0;
  int64_t vocab_begin_ = 0;
  int64_t local_vocab_ = 0;
  std::unique_ptr<backend::Weight> embed_;
  std::unique_ptr<backend::Weight> lm_head_;
  std::unique_ptr<backend::Buffer> final_norm_;
  std::vector<std::unique_ptr<Layer>> layers_;
  WeightBytes bytes_;
  RoutingObserver routing_observer_;
  std::unique_ptr<Graphs> graphs_;
};

// Loads config.json and the checkpoint of a model directory and binds the weights.
std::unique_ptr<M3Model> load_m3_model(const std::filesystem::path& dir, backend::Backend& backend,
                                       ModelOptions options = {});

}  // namespace mxlm::model
