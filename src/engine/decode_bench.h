// `mxlm bench decode`: decode throughput of a model (real or `--load-format dummy`) at fixed batch sizes against
// the memory-bandwidth roofline. Each run prefills `batch` random prompts in one step, then decodes all of them
// together for warm-up + timed steps (greedy or --temperature/--top-p/--top-k sampling, on the host from the logits
// the runner returns or on the device), each step timed wall-clock as the engine sees it (the logits download
// included; the host's sampling is timed apart).
//
// Roofline: a decode step must read every weight it uses once: all non-expert weights, one embedding row per
// token, and for each MoE layer the routed experts its batch touches (counted from the routing of the warm-up
// steps), plus the KV cache it attends over (the whole context on full-attention layers; the index-K cache and the
// selected blocks on sparse ones). Bytes / measured copy bandwidth is the fastest the step can be.
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "model/m3_model.h"

namespace mxlm::engine {

class TpRanks;

struct DecodeBenchOptions {
  int prompt_len = 128;
  int warmup_steps = 3;  // their routing gives the distinct experts per step
  int steps = 32;        // timed decode steps
  uint32_t seed = 0;
  bool device_greedy = false;  // sample on the device (only token ids come back), else logits to the host
  // Sampling of the decode steps (backend/sampling.h; temperature 0: greedy); each sequence its own seed.
  float temperature = 0.0f;
  float top_p = 1.0f;
  int32_t top_k = 0;
  TpRanks* tp_ranks = nullptr;  // the model's other tensor-parallel ranks (tp_ranks.h); null at TP = 1
  // Every step eagerly, even where the model captures decode steps (ModelOptions::step_graphs). Either way one
  // untimed decode step runs between the warm-up and the timed steps (where a graph is captured).
  bool enforce_eager = false;
};

struct DecodeBenchResult {
  int batch = 0;
  int context_first = 0;  // tokens in each sequence at the first / last timed step (the new one included)
  int context_last = 0;
  double prefill_s = 0;
  double step_p10_s = 0, step_p50_s = 0, step_p90_s = 0;
  double tokens_per_s = 0;        // batch / median step
  double host_argmax_s = 0;       // host sampling (argmax or draw), median per step, not in the step time (0 on device)
  double distinct_experts = 0;    // routed experts touched per MoE layer per step (warm-up mean); 0 without MoE
  uint64_t graph_replays = 0;     // timed steps that replayed a captured graph (rank 0's model)
  uint64_t weight_bytes = 0;      // weight bytes a step reads (as above)
  uint64_t kv_bytes = 0;          // KV/index-K bytes a step reads (mean over the timed steps)
  uint64_t logits_bytes = 0;      // bytes of logits each step brings back to the host (0 with device_greedy)
  double roofline_weights_s = 0;  // weight_bytes / copy bandwidth
  double roofline_s = 0;          // (weight_bytes + kv_bytes) / copy bandwidth
  double roofline_fraction = 0;   // roofline_s / step_p50_s
};

// Bytes per second of a device-to-device copy of `bytes` through backend.copy (read + write counted), median of
// `reps` after one warm-up; each copy is closed by a one-element download so that it has finished.
double measure_copy_bandwidth(backend::Backend& backend, size_t bytes, int reps = 5);

// One run at `batch` sequences; copy_bytes_per_s from measure_copy_bandwidth.
DecodeBenchResult run_decode_bench(model::M3Model& model, int batch, const DecodeBenchOptions& options,
                                   double copy_bytes_per_s);

}  // namespace mxlm::engine
