// Picks the next token from a row of logits, in f32, as vLLM orders the steps: repetition penalty (prompt and
// output tokens), presence/frequency penalties (output tokens), then greedy (temperature 0) or temperature,
// top-k, top-p, min-p and a draw from the renormalised distribution with the request's own RNG, so a seed gives
// the same tokens every time.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <vector>

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
  const SamplingParams& params() const { return params_; }

  // The distribution `sample` draws from (after penalties, temperature and the filters); for tests.
  std::vector<float> probabilities(std::span<const float> logits, std::span<const int32_t> prompt,
                                   std::span<const int32_t> output) const;

 private:
  std::vector<float> penalized(std::span<const float> logits, std::span<const int32_t> prompt,
                               std::span<const int32_t> output) const;
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace mxlm::engine
