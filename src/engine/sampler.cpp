#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <unordered_map>

#include "core/error.h"

namespace mxlm::engine {

void SamplingParams::validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) fail("temperature must be >= 0, got {}", temperature);
  if (!(top_p > 0.0f && top_p <= 1.0f)) fail("top_p must be in (0, 1], got {}", top_p);
  if (!(min_p >= 0.0f && min_p <= 1.0f)) fail("min_p must be in [0, 1], got {}", min_p);
  if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty))
    fail("repetition_penalty must be > 0, got {}", repetition_penalty);
  if (!std::isfinite(presence_penalty)) fail("presence_penalty must be finite");
  if (!std::isfinite(frequency_penalty)) fail("frequency_penalty must be finite");
  if (max_tokens < 0) fail("max_tokens must be >= 0, got {}", max_tokens);
}

Sampler::Sampler(SamplingParams params) : params_(std::move(params)) {
  params_.validate();
  if (params_.seed) {
    seed_ = *params_.seed;
  } else {
    std::random_device rd;
    seed_ = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }
}

bool Sampler::needs_token_history() const {
  return params_.repetition_penalty != 1.0f || params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f;
}

backend::SampleParams Sampler::draw_params() {
  backend::SampleParams p;
  p.temperature = params_.temperature;
  p.top_k = params_.top_k;
  p.top_p = params_.top_p;
  p.min_p = params_.min_p;
  p.seed = seed_;
  p.counter = draws_++;
  return p;
}

backend::SampleParams Sampler::device_draw() {
  if (needs_token_history()) fail("a request with penalties samples on the host");
  return draw_params();
}

bool Sampler::is_stop(int32_t token) const {
  return std::find(params_.stop_token_ids.begin(), params_.stop_token_ids.end(), token) != params_.stop_token_ids.end();
}

std::vector<float> Sampler::penalized(std::span<const float> logits, std::span<const int32_t> prompt,
                                      std::span<const int32_t> output) const {
  std::vector<float> l(logits.begin(), logits.end());
  const int64_t vocab = static_cast<int64_t>(l.size());
  auto valid = [&](int32_t t) { return t >= 0 && t < vocab; };
  if (params_.repetition_penalty != 1.0f) {
    std::vector<bool> seen(l.size(), false);
    for (int32_t t : prompt)
      if (valid(t)) seen[static_cast<size_t>(t)] = true;
    for (int32_t t : output)
      if (valid(t)) seen[static_cast<size_t>(t)] = true;
    for (size_t i = 0; i < l.size(); ++i)
      if (seen[i]) l[i] = l[i] > 0 ? l[i] / params_.repetition_penalty : l[i] * params_.repetition_penalty;
  }
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f) {
    std::unordered_map<int32_t, int32_t> counts;
    for (int32_t t : output)
      if (valid(t)) ++counts[t];
    for (const auto& [t, c] : counts)
      l[static_cast<size_t>(t)] -= params_.frequency_penalty * static_cast<float>(c) + params_.presence_penalty;
  }
  return l;
}

std::vector<float> Sampler::probabilities(std::span<const float> logits, std::span<const int32_t> prompt,
                                          std::span<const int32_t> output) const {
  std::vector<float> l = penalized(logits, prompt, output);
  const size_t n = l.size();
  std::vector<float> p(n, 0.0f);
  if (n == 0) fail("sampling from an empty vocabulary");
  if (params_.temperature == 0.0f) {
    p[static_cast<size_t>(std::max_element(l.begin(), l.end()) - l.begin())] = 1.0f;
    return p;
  }
  for (float& v : l) v /= params_.temperature;
  // Candidates by descending logit (ties: lower id first).
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return l[static_cast<size_t>(a)] > l[static_cast<size_t>(b)]; });
  // Full softmax first: min-p compares against the most likely token of the whole distribution (vLLM applies
  // min-p before top-k/top-p).
  const float mx = l[static_cast<size_t>(order[0])];
  std::vector<float> e(n);
  float sum = 0.0f;
  for (size_t i = 0; i < n; ++i) {
    e[i] = std::exp(l[static_cast<size_t>(order[i])] - mx);
    sum += e[i];
  }
  for (float& v : e) v /= sum;
  size_t keep = n;
  if (params_.min_p > 0.0f) {
    const float threshold = params_.min_p * e[0];
    size_t k = 1;
    while (k < keep && e[k] >= threshold) ++k;
    keep = k;
  }
  if (params_.top_k > 0) keep = std::min(keep, static_cast<size_t>(params_.top_k));
  if (params_.top_p < 1.0f) {
    // Smallest prefix of the renormalised candidates whose mass reaches top_p (the most likely token stays).
    float total = 0.0f;
    for (size_t i = 0; i < keep; ++i) total += e[i];
    float cum = 0.0f;
    size_t k = 0;
    while (k < keep) {
      cum += e[k++] / total;
      if (cum >= params_.top_p) break;
    }
    keep = k;
  }
  float kept = 0.0f;
  for (size_t i = 0; i < keep; ++i) kept += e[i];
  for (size_t i = 0; i < keep; ++i) p[static_cast<size_t>(order[i])] = e[i] / kept;
  return p;
}

int32_t Sampler::sample(std::span<const float> logits, std::span<const int32_t> prompt,
                        std::span<const int32_t> output) {
  if (logits.empty()) fail("sampling from an empty vocabulary");
  const backend::SampleParams p = draw_params();
  if (!needs_token_history()) return backend::sample_row(logits, p);
  const std::vector<float> l = penalized(logits, prompt, output);
  return backend::sample_row(l, p);
}

}  // namespace mxlm::engine
