// Runs batched forward steps of the model over the paged KV cache. The scheduler (or a CLI) owns the
// Sequences, appends tokens to them and decides which run in a step; a step runs each chosen sequence's next
// `num_tokens` uncomputed tokens (a whole prompt, a prefill chunk, or one decode token) in one batch and
// returns logits.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "engine/block_manager.h"
#include "engine/sequence.h"
#include "model/m3_model.h"
#include "model/vision_tower.h"

namespace mxlm::engine {

class TpRanks;

struct CacheConfig {
  int32_t block_size = 128;  // tokens per page; must equal the sparse block size when the model has sparse layers
  int32_t num_pages = 0;
  bool prefix_caching = true;
};

struct StepItem {
  Sequence* seq = nullptr;
  int32_t num_tokens = 0;   // run seq->tokens[num_computed, num_computed + num_tokens)
  bool all_logits = false;  // logits of every run token (else only of the last one)
};

struct StepOutput {
  std::vector<float> logits;       // [rows, vocab] (empty for a greedy_on_device step)
  std::vector<int32_t> tokens;     // greedy_on_device / sampling on the device: per row, its token (no logits)
  std::vector<int32_t> first_row;  // per item, its first row in `logits`
  std::vector<int32_t> num_rows;   // per item
  int32_t vocab = 0;
  std::span<const float> row(size_t item, int32_t i = -1) const;  // i = -1: the item's last row
};

class ModelRunner {
 public:
  ModelRunner(model::M3Model& model, CacheConfig cache);

  BlockManager& blocks() { return blocks_; }
  const CacheConfig& cache_config() const { return cache_; }
  model::M3Model& model() { return model_; }

  // The tower that encodes sequences' images (null: the model takes no images). Its output size must be the text
  // model's hidden size.
  void set_vision_tower(model::VisionTower* tower);
  model::VisionTower* vision_tower() const { return vision_; }

  // Prepares a new sequence: reuses cached prefix pages (sets num_computed). Call once before its first step.
  void admit(Sequence& seq);
  // Encodes, in one pass of the tower, the images whose tokens fall in the items' next tokens and have no
  // embeddings yet (an image wholly inside cached prefix pages is never encoded; choices sharing an image encode it
  // once). Nothing is assigned when it fails. step() calls it too; the scheduler calls it first, and per sequence
  // when the batch fails, so that a failing image fails only its own request.
  void encode_images(std::span<const StepItem> items);
  void encode_images(Sequence& seq, int32_t num_tokens);
  // Reserves pages, runs the batch (image tokens take their image's embedding rows, wherever the chunk boundaries
  // fall), advances num_computed and registers full blocks in the prefix cache. An Error when the cache has too few
  // pages (nothing is changed then).
  // greedy_on_device: only each row's argmax token comes back (StepOutput::tokens), not its logits.
  StepOutput step(std::span<const StepItem> items, bool greedy_on_device = false);
  // Sampling on the backend: sample[i] draws item i's token from its logit row (Backend::sample_rows; no item may ask
  // for all_logits); only the tokens come back (StepOutput::tokens), the logits stay where they were computed.
  StepOutput step(std::span<const StepItem> items, std::span<const backend::SampleParams> sample);
  void release(Sequence& seq) { blocks_.release(seq); }
  // Every step eagerly, never as a captured graph (ForwardBatch::enforce_eager), whatever the model's options say.
  void set_enforce_eager(bool eager) { enforce_eager_ = eager; }

  // Tensor parallelism (tp_ranks.h): ranks 1.. of the model's group run every step's forward on their own threads.
  // TpRanks::attach sets it; null at TP = 1.
  void set_tp_ranks(TpRanks* ranks) { tp_ranks_ = ranks; }
  // Another rank's side of rank 0's step: one forward of the batch over this runner's cache, through the same
  // collectives as rank 0's forward or forward_greedy (the lm_head all-gather included), but only the argmax ids come
  // back to the host, not [rows, vocab] logits (a copy rank 0 would wait for: 26 MB per step at batch 32).
  void peer_forward(const model::ForwardBatch& batch) { (void)model_.forward_greedy(batch, layers_); }

 private:
  StepOutput run_step(std::span<const StepItem> items, bool greedy_on_device,
                      std::span<const backend::SampleParams> sample);
  model::M3Model& model_;
  model::VisionTower* vision_ = nullptr;
  CacheConfig cache_;
  BlockManager blocks_;
  std::vector<std::unique_ptr<backend::Buffer>> storage_;
  std::vector<model::LayerCache> layers_;
  TpRanks* tp_ranks_ = nullptr;
  bool enforce_eager_ = false;
};

// Pages needed to hold `tokens` tokens.
inline int32_t pages_for(int32_t tokens, int32_t block_size) { return (tokens + block_size - 1) / block_size; }

// A cache for `num_seqs` sequences of up to `max_tokens` tokens each: pages of the model's sparse block size
// (or `dense_block_size` for a model without sparse layers).
CacheConfig cache_config_for(const model::M3Model& model, int32_t max_tokens, int32_t num_seqs = 1,
                             int32_t dense_block_size = 128);

}  // namespace mxlm::engine
