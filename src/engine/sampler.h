// Picks the next token from a row of logits, in f32, as vLLM orders the steps: repetition penalty (prompt and
// output tokens), presence/frequency penalties (output tokens), then greedy (temperature 0) or temperature,
// min-p, top-k, top-p and a draw from the renormalised distribution with the request's own random stream, so a seed
// gives the same tokens every time. After the penalties this is backend::sample_row (backend/sampling.h): the draw
// is Philox keyed by the seed at counter = the request's draw index, the same on every backend, so a step may as
// well sample on the device (Backend::sample_rows, via device_draw()) and get the same token.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "backend/sampling.h"

namespace mxlm::engine {

struct SamplingParams {
  float temperature = 1.0f;         // 0: greedy
  int32_t top_k = 0;                // <= 0: off
  float top_p = 1.0f;               // (0, 1]
  float min_p = 0.0f;               // [0, 1]
  float repetition_penalty = 1.0f;  // > 0; 1: off
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  std::optional<uint64_t> seed;  // nullopt: a random seed
  std::vector<int32_t> stop_token_ids;
  int32_t max_tokens = 16;

  void validate() const;  // an Error naming the bad field
};

class Sampler {
 public:
  explicit Sampler(SamplingParams params);

  // `prompt` and `output` are the sequence's tokens so far (for the penalties).
  int32_t sample(std::span<const float> logits, std::span<const int32_t> prompt, std::span<const int32_t> output);
  bool is_stop(int32_t token) const;
  // Whether the penalties need the sequence's tokens (then only sample() can draw: the logits come to the host).
  bool needs_token_history() const;
  // The next draw's parameters for Backend::sample_rows (valid without penalties); counts as a draw.
  backend::SampleParams device_draw();
  uint64_t seed() const { return seed_; }
  const SamplingParams& params() const { return params_; }

  // The distribution `sample` draws from (after penalties, temperature and the filters); for tests.
  std::vector<float> probabilities(std::span<const float> logits, std::span<const int32_t> prompt,
                                   std::span<const int32_t> output) const;

 private:
  std::vector<float> penalized(std::span<const float> logits, std::span<const int32_t> prompt,
                               std::span<const int32_t> output) const;
  backend::SampleParams draw_params();
  SamplingParams params_;
  uint64_t seed_ = 0;
  uint64_t draws_ = 0;  // draws so far: the counter of the next one
};

}  // namespace mxlm::engine
