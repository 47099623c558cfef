// Token sampling from a row of (already penalised) logits, defined exactly so that every backend picks the same token:
// the host reference here, Backend::sample_rows on a device (the CUDA kernel must match it token for token).
//
//   temperature 0: the first index of the largest logit (greedy).
//   otherwise, with z = logit * (1 / temperature) (f32) and the candidates ordered by (z descending, id ascending):
//   1. weights q = floor(2^40 exp(z - z_max)) in f32 with sampling_math.h's exp (integers: no rounding of sums);
//   2. min-p: keep tokens whose exp(z - z_max) >= min_p;
//   3. top-k: keep the first top_k of those in candidate order;
//   4. top-p: keep the shortest prefix of those (candidate order) whose weight reaches ceil(top_p * their weight);
//   5. draw: R = floor(r * Q / 2^64) with Q the kept weight and r the 64 bits of Philox4x32-10 keyed by `seed` at
//      counter `counter`; the token is the kept one, in id order, whose cumulative weight first exceeds R.
// The distribution is that of engine::Sampler::probabilities (f32 softmax, the same filters) up to the weights'
// 2^-40 quantisation and the polynomial exp (a few f32 ulps, < 5e-7 relative).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "backend/sampling_math.h"  // SampleParams

namespace mxlm::backend {

// The reference sampler. An Error for an empty row or parameters outside the ranges above.
int32_t sample_row(std::span<const float> logits, const SampleParams& params);

// The integer weights step 5 draws from (0 for tokens filtered out); greedy: 1 for the argmax. For tests.
std::vector<uint64_t> sample_weights(std::span<const float> logits, const SampleParams& params);

// Checks the ranges above; an Error naming the bad field.
void validate(const SampleParams& params);

}  // namespace mxlm::backend
