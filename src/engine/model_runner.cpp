#include "engine/model_runner.h"

#include <algorithm>

#include "core/error.h"
#include "engine/tp_ranks.h"

namespace mxlm::engine {

std::span<const float> StepOutput::row(size_t item, int32_t i) const {
  if (item >= first_row.size()) fail("step output has no item {}", item);
  if (logits.empty()) fail("the step sampled on the device: it returned tokens, no logits");
  if (i < 0) i = num_rows[item] - 1;
  if (i < 0 || i >= num_rows[item]) fail("step item {} has no logit row {}", item, i);
  return {logits.data() + static_cast<size_t>(first_row[item] + i) * static_cast<size_t>(vocab),
          static_cast<size_t>(vocab)};
}

CacheConfig cache_config_for(const model::M3Model& model, int32_t max_tokens, int32_t num_seqs,
                             int32_t dense_block_size) {
  if (max_tokens <= 0 || num_seqs <= 0) fail("cache for {} sequences of {} tokens", num_seqs, max_tokens);
  CacheConfig c;
  c.block_size = model.has_sparse_layers() ? model.text().sparse.block_size : dense_block_size;
  c.num_pages = pages_for(max_tokens, c.block_size) * num_seqs;
  return c;
}

ModelRunner::ModelRunner(model::M3Model& model, CacheConfig cache)
    : model_(model), cache_(cache), blocks_(cache.num_pages, cache.block_size, cache.prefix_caching) {
  if (model.has_sparse_layers() && cache.block_size != model.text().sparse.block_size)
    fail("KV cache block size {} must equal the sparse attention block size {} (one sparse block is one page)",
         cache.block_size, model.text().sparse.block_size);
  auto& be = model.backend();
  const size_t slots = static_cast<size_t>(cache.num_pages) * static_cast<size_t>(cache.block_size);
  for (int i = 0; i < model.num_layers(); ++i) {
    model::LayerCache lc;
    storage_.push_back(be.alloc_cache(slots * static_cast<size_t>(model.kv_width())));
    lc.k = storage_.back()->f32();
    storage_.push_back(be.alloc_cache(slots * static_cast<size_t>(model.kv_width())));
    lc.v = storage_.back()->f32();
    if (model.layer_is_sparse(i)) {
      storage_.push_back(be.alloc_cache(slots * static_cast<size_t>(model.index_width())));
      lc.index_k = storage_.back()->f32();
    }
    layers_.push_back(lc);
  }
}

void ModelRunner::set_vision_tower(model::VisionTower* tower) {
  if (tower && tower->output_size() != model_.text().hidden_size)
    fail("the vision tower gives embeddings of {} floats but the text model's hidden size is {}", tower->output_size(),
         model_.text().hidden_size);
  vision_ = tower;
}

void ModelRunner::encode_images(std::span<const StepItem> items) {
  const auto hidden = static_cast<size_t>(model_.text().hidden_size);
  std::vector<ImageData*> todo;
  std::vector<const model::PreprocessedImage*> pixels;
  for (const auto& it : items) {
    const Sequence& seq = *it.seq;
    const int32_t begin = seq.num_computed, end = seq.num_computed + it.num_tokens;
    for (const auto& img : seq.images) {
      if (img.begin >= end) break;
      if (img.begin + img.length <= begin) continue;
      if (!img.data) fail("sequence {}: the image at token {} has no data", seq.id, img.begin);
      ImageData& d = *img.data;
      if (d.embeddings.size() == static_cast<size_t>(img.length) * hidden) continue;
      if (std::find(todo.begin(), todo.end(), &d) != todo.end()) continue;  // choices of one request share it
      if (!vision_) fail("sequence {} has image input but the model has no vision tower", seq.id);
      if (d.pixels.num_image_tokens() != img.length)
        fail("sequence {}: the image at token {} has {} image tokens, its pixels give {}", seq.id, img.begin,
             img.length, d.pixels.num_image_tokens());
      todo.push_back(&d);
      pixels.push_back(&d.pixels);
    }
  }
  if (todo.empty()) return;
  auto out = vision_->embed_batch(pixels);
  if (out.size() != todo.size()) fail("the vision tower encoded {} of {} images", out.size(), todo.size());
  for (size_t i = 0; i < todo.size(); ++i)
    if (out[i].size() != static_cast<size_t>(pixels[i]->num_image_tokens()) * hidden)
      fail("the vision tower gave {} floats for {} image tokens", out[i].size(), pixels[i]->num_image_tokens());
  for (size_t i = 0; i < todo.size(); ++i) {
    todo[i]->embeddings = std::move(out[i]);
    todo[i]->pixels.pixel_values = {};  // not needed again: preemption and recomputation reuse the embeddings
    todo[i]->pixels.resized.pixels = {};
  }
}

void ModelRunner::encode_images(Sequence& seq, int32_t num_tokens) {
  const StepItem item{&seq, num_tokens, false};
  encode_images({&item, 1});
}

void ModelRunner::admit(Sequence& seq) {
  if (seq.tokens.empty()) fail("sequence {} has no tokens", seq.id);
  blocks_.match_prefix(seq);
}

StepOutput ModelRunner::step(std::span<const StepItem> items, bool greedy_on_device) {
  return run_step(items, greedy_on_device, {});
}

StepOutput ModelRunner::step(std::span<const StepItem> items, std::span<const backend::SampleParams> sample) {
  if (sample.size() != items.size()) fail("step: {} sampling parameter sets for {} items", sample.size(), items.size());
  for (const auto& it : items)
    if (it.all_logits) fail("step: sampling on the backend takes one logit row per item (no all_logits)");
  return run_step(items, false, sample);
}

StepOutput ModelRunner::run_step(std::span<const StepItem> items, bool greedy_on_device,
                                 std::span<const backend::SampleParams> sample) {
  // Reserve first, all or nothing, so a failed step leaves every sequence as it was.
  std::vector<size_t> table_sizes;
  for (const auto& it : items) {
    if (!it.seq) fail("step item without a sequence");
    if (it.num_tokens <= 0 || it.num_tokens > it.seq->num_uncomputed())
      fail("sequence {}: cannot run {} tokens ({} uncomputed)", it.seq->id, it.num_tokens, it.seq->num_uncomputed());
    table_sizes.push_back(it.seq->block_table.size());
  }
  encode_images(items);
  for (size_t i = 0; i < items.size(); ++i) {
    if (!blocks_.reserve(*items[i].seq, items[i].seq->num_computed + items[i].num_tokens)) {
      for (size_t j = 0; j <= i; ++j) {
        auto& table = items[j].seq->block_table;
        Sequence tail;
        tail.block_table.assign(table.begin() + static_cast<std::ptrdiff_t>(table_sizes[j]), table.end());
        table.resize(table_sizes[j]);
        blocks_.release(tail);
      }
      fail("KV cache full: {} pages available, the step needs more", blocks_.num_available());
    }
  }
  model::ForwardBatch fb;
  fb.enforce_eager = enforce_eager_;
  auto& ab = fb.attention;
  ab.block_size = cache_.block_size;
  StepOutput out;
  out.vocab = model_.vocab_size();
  const auto hidden = static_cast<size_t>(model_.text().hidden_size);
  int32_t row = 0;
  for (const auto& it : items) {
    Sequence& s = *it.seq;
    // Image rows of this chunk: a chunk may start or end inside an image's run, so rows map by position.
    for (const auto& img : s.images) {
      const int32_t lo = std::max(img.begin, s.num_computed);
      const int32_t hi = std::min(img.begin + img.length, s.num_computed + it.num_tokens);
      for (int32_t pos = lo; pos < hi; ++pos) {
        fb.embedding_rows.push_back(row + pos - s.num_computed);
        const float* e = img.data->embeddings.data() + static_cast<size_t>(pos - img.begin) * hidden;
        fb.embeddings.insert(fb.embeddings.end(), e, e + hidden);
      }
    }
    backend::SequenceSlice slice;
    slice.begin = row;
    slice.count = it.num_tokens;
    slice.start_pos = s.num_computed;
    slice.block_table = s.block_table;
    ab.sequences.push_back(slice);
    out.first_row.push_back(static_cast<int32_t>(fb.logit_rows.size()));
    out.num_rows.push_back(it.all_logits ? it.num_tokens : 1);
    for (int32_t i = 0; i < it.num_tokens; ++i) {
      const int32_t pos = s.num_computed + i;
      fb.tokens.push_back(s.tokens[static_cast<size_t>(pos)]);
      ab.positions.push_back(pos);
      ab.slots.push_back(static_cast<int64_t>(s.block_table[static_cast<size_t>(pos / cache_.block_size)]) *
                             cache_.block_size +
                         pos % cache_.block_size);
      if (it.all_logits || i == it.num_tokens - 1) fb.logit_rows.push_back(row + i);
    }
    row += it.num_tokens;
  }
  ab.num_tokens = row;
  const auto run_forward = [&] {
    if (!sample.empty())
      out.tokens = model_.forward_sample(fb, layers_, sample);
    else if (greedy_on_device)
      out.tokens = model_.forward_greedy(fb, layers_);
    else
      out.logits = model_.forward(fb, layers_);
  };
  if (tp_ranks_) {
    // Every rank runs the same batch; rank 0's logits are the step's (the lm_head all-gather gives every rank the
    // same bits). A rank's error is rethrown only after all ranks have left the forward.
    tp_ranks_->begin_forward(fb);
    try {
      run_forward();
    } catch (const std::exception& e) {
      // The other ranks may wait in a collective that this rank will not reach.
      model_.backend().abort_collectives(std::string("rank 0 failed: ") + e.what());
      try {
        tp_ranks_->end_forward();
      } catch (...) {
      }
      throw;
    }
    tp_ranks_->end_forward();
  } else {
    run_forward();
  }
  for (const auto& it : items) {
    it.seq->num_computed += it.num_tokens;
    blocks_.commit(*it.seq);
  }
  return out;
}

}  // namespace mxlm::engine
