// Mixture-of-experts on the CPU: the sigmoid router with biased top-k choice (m3_checkpoint.md §7) and the
// routed experts, grouped by expert so each expert's weights are streamed once per step.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

namespace mxlm::backend::cpu {

void CpuBackend::router(const float* x, size_t tokens, const Weight& w, const float* bias, int k, float scale,
                        int32_t* ids, float* weights) {
  const size_t experts = static_cast<size_t>(w.rows());
  if (k <= 0 || static_cast<size_t>(k) > experts) fail("router top-k {} with {} experts", k, experts);
  std::vector<float> logits(tokens * experts);
  linear(x, tokens, w, logits.data());
  for (size_t t = 0; t < tokens; ++t) {
    std::vector<float> s(experts), choice(experts);
    for (size_t e = 0; e < experts; ++e) {
      s[e] = 1.0f / (1.0f + std::exp(-logits[t * experts + e]));
      choice[e] = bias ? s[e] + bias[e] : s[e];
    }
    std::vector<int32_t> order(experts);
    std::iota(order.begin(), order.end(), 0);
    // Highest biased score first; ties keep the lower expert id.
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return choice[static_cast<size_t>(a)] > choice[static_cast<size_t>(b)] ||
             (choice[static_cast<size_t>(a)] == choice[static_cast<size_t>(b)] && a < b);
    });
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += s[static_cast<size_t>(order[static_cast<size_t>(j)])];
    for (int j = 0; j < k; ++j) {
      const size_t e = static_cast<size_t>(order[static_cast<size_t>(j)]);
      ids[t * static_cast<size_t>(k) + static_cast<size_t>(j)] = static_cast<int32_t>(e);
      weights[t * static_cast<size_t>(k) + static_cast<size_t>(j)] = s[e] / sum * scale;
    }
  }
}

void CpuBackend::moe_experts(const float* x, size_t tokens, const int32_t* ids, const float* weights, int k,
                             std::span<const Weight* const> gate, std::span<const Weight* const> up,
                             std::span<const Weight* const> down, int first_expert, SwigluParams p, bool qdq_inputs,
                             const SharedExpert* shared, float* out) {
  if (gate.empty() && !shared) return;
  const Weight* first = gate.empty() ? shared->gate : gate[0];
  if (!first) fail("shared expert without its gate weight");
  const size_t hidden = static_cast<size_t>(first->cols());
  if (shared) check_shared_expert(*shared, hidden);
  std::fill(out, out + tokens * hidden, 0.0f);
  const int num_local = static_cast<int>(gate.size());
  // Tokens per local expert, in token order (so every token sums its experts in ascending id order).
  std::vector<std::vector<std::pair<size_t, float>>> routed(static_cast<size_t>(num_local));
  for (size_t t = 0; t < tokens; ++t)
    for (int j = 0; j < k; ++j) {
      const int e = ids[t * static_cast<size_t>(k) + static_cast<size_t>(j)] - first_expert;
      if (e < 0 || e >= num_local) continue;
      routed[static_cast<size_t>(e)].push_back({t, weights[t * static_cast<size_t>(k) + static_cast<size_t>(j)]});
    }
  std::vector<float> xs, g, u, y;
  for (int e = 0; e < num_local; ++e) {
    const auto& list = routed[static_cast<size_t>(e)];
    if (list.empty()) continue;
    const size_t n = list.size();
    const size_t inter = static_cast<size_t>(gate[static_cast<size_t>(e)]->rows());
    xs.resize(n * hidden);
    for (size_t i = 0; i < n; ++i)
      std::copy(x + list[i].first * hidden, x + (list[i].first + 1) * hidden, xs.data() + i * hidden);
    if (qdq_inputs) qdq_mxfp4(xs.data(), n, hidden);
    g.resize(n * inter);
    u.resize(n * inter);
    linear(xs.data(), n, *gate[static_cast<size_t>(e)], g.data());
    linear(xs.data(), n, *up[static_cast<size_t>(e)], u.data());
    swiglu_oai(g.data(), u.data(), g.data(), n * inter, p);
    if (qdq_inputs) qdq_mxfp4(g.data(), n, inter);
    y.resize(n * hidden);
    linear(g.data(), n, *down[static_cast<size_t>(e)], y.data());
    for (size_t i = 0; i < n; ++i) {
      float* o = out + list[i].first * hidden;
      const float w = list[i].second;
      for (size_t c = 0; c < hidden; ++c) o[c] += w * y[i * hidden + c];
    }
  }
  // The shared expert unfused, after the routed sum: the reference the fused CUDA path is checked against.
  if (shared) add_shared_expert(x, tokens, hidden, *shared, p, out);
}

}  // namespace mxlm::backend::cpu
