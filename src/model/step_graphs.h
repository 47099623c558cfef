// Host side of captured decode steps (CUDA graphs, vLLM's way; the backend's half is Backend::make_step_graph and
// friends): which steps qualify, the row and page counts they are padded to, and the padded batch.
//
// A decode step (every sequence adds one token, no image rows) of T rows runs as the captured graph of the
// smallest row bucket R >= T (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, ...) and the smallest page bucket
// P >= the longest sequence's pages (1, 2, 3, 4, 6, 8, 12, 16, ...: powers of two and 1.5 times them, so the
// attention grids, sized for P pages, are at most 1.5x the step's context). Rows T .. R-1 are padding: token 0 at
// position 0, KV slot -1 (written nowhere), a one-page block table {0} (read only); their outputs are dropped.
// (vLLM pads the same way; its dummy slot is a reserved page, ours writes nothing at all.)
#pragma once

#include <cstdint>
#include <vector>

#include "model/m3_model.h"

namespace mxlm::model {

// The row bucket for `rows` rows, or 0 when rows > max_rows (no graph: the step runs eagerly).
int step_graph_rows(int rows, int max_rows);
// The page bucket for a step whose longest sequence needs `pages` pages (>= 1).
int step_graph_pages(int pages);
// Whether `batch` is a decode step: as many rows as sequences, one token each, no given embeddings.
bool is_decode_step(const ForwardBatch& batch);
// KV pages the longest sequence of the step needs (its new token included).
int step_pages_needed(const ForwardBatch& batch);

// `batch` padded to `rows` rows (>= its own) with every logit row 0 .. rows-1 in order. The block tables of the real
// sequences stay the caller's (spans), so the padded batch is valid while `batch` is.
ForwardBatch pad_decode_step(const ForwardBatch& batch, int rows);

}  // namespace mxlm::model
