#include "backend/sampling.h"

#include <algorithm>
#include <cmath>

#include "backend/backend.h"
#include "backend/sampling_math.h"
#include "core/error.h"

namespace mxlm::backend {

namespace sm = sampling;

void validate(const SampleParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature))
    fail("temperature must be >= 0, got {}", p.temperature);
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) fail("top_p must be in (0, 1], got {}", p.top_p);
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) fail("min_p must be in [0, 1], got {}", p.min_p);
}

namespace {

int32_t first_argmax(std::span<const float> logits) {
  // The device argmax's rule: a strictly larger value replaces the best (NaN never does).
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[static_cast<size_t>(best)]) best = static_cast<int32_t>(i);
  return best;
}

// The first `n` of `candidates` by descending order key (n < candidates.size()): the n-th key, a threshold.
uint64_t nth_key(std::vector<uint64_t>& keys, size_t n) {
  std::nth_element(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(n - 1), keys.end(), std::greater<>());
  return keys[n - 1];
}

// The key of the candidate at which the cumulative weight, in descending key order, first reaches `target`
// (0 < target <= the total weight; keys are unique): a weighted quickselect, O(n) expected, no sort.
uint64_t weighted_cut(std::vector<std::pair<uint64_t, uint64_t>>& cand, uint64_t target) {
  auto lo = cand.begin(), hi = cand.end();
  uint64_t need = target;
  while (true) {
    if (lo == hi) fail("top-p: the candidates' weight never reaches {}", target);
    // Median of three keys as the pivot.
    uint64_t a = lo->first, b = (lo + (hi - lo) / 2)->first, c = (hi - 1)->first;
    const uint64_t pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    const auto above_end = std::partition(lo, hi, [&](const auto& e) { return e.first > pivot; });
    uint64_t above = 0;
    for (auto it = lo; it != above_end; ++it) above += it->second;
    if (above >= need) {
      hi = above_end;
      continue;
    }
    need -= above;
    const auto at = std::partition(above_end, hi, [&](const auto& e) { return e.first == pivot; });
    const uint64_t w = above_end->second;  // exactly one candidate holds the pivot key
    if (w >= need) return pivot;
    need -= w;
    lo = at;
  }
}

// Keys, weights and min-p of every token (the hot loop: FMA instructions where the CPU has them; fma is exact
// either way, so the results are the same bits).
__attribute__((target_clones("fma", "default"))) void weigh(std::span<const float> logits, float inv_t,
                                                            std::vector<uint64_t>& key, std::vector<uint64_t>& w,
                                                            std::vector<char>& keep, float min_p) {
  const size_t n = logits.size();
  uint64_t best_key = 0;
  for (size_t i = 0; i < n; ++i) {
    key[i] = sm::order_key(sm::scaled_logit(logits[i], inv_t), static_cast<uint32_t>(i));
    best_key = std::max(best_key, key[i]);
  }
  const size_t best = 0xFFFFFFFFu - static_cast<uint32_t>(best_key);
  const float z_max = sm::scaled_logit(logits[best], inv_t);
  const uint32_t best_float_key = static_cast<uint32_t>(best_key >> 32);
  for (size_t i = 0; i < n; ++i) {
    const float z = sm::scaled_logit(logits[i], inv_t);
    const float rel = sm::relative_prob(z, z_max, static_cast<uint32_t>(key[i] >> 32) == best_float_key);
    w[i] = sm::integer_weight(rel);
    keep[i] = rel >= min_p;
  }
}

}  // namespace

std::vector<uint64_t> sample_weights(std::span<const float> logits, const SampleParams& p) {
  validate(p);
  const size_t n = logits.size();
  if (n == 0) fail("sampling from an empty vocabulary");
  if (n > 0xFFFFFFFFu) fail("a vocabulary of {} tokens is too large to sample from", n);
  std::vector<uint64_t> w(n, 0);
  if (p.temperature == 0.0f) {
    w[static_cast<size_t>(first_argmax(logits))] = 1;
    return w;
  }
  // 1-2: weights and min-p; `keep` marks candidates. Scratch per thread: a row of 200064 tokens would otherwise
  // page-fault its 2 MB in on every call.
  thread_local std::vector<uint64_t> key;
  thread_local std::vector<char> keep;
  thread_local std::vector<uint64_t> keys;
  thread_local std::vector<std::pair<uint64_t, uint64_t>> cand;  // (key, weight)
  key.resize(n);
  keep.resize(n);
  weigh(logits, sm::inverse_temperature(p.temperature), key, w, keep, p.min_p);
  // 3. top-k: keys at or above the k-th largest key among the candidates.
  if (p.top_k > 0) {
    keys.clear();
    for (size_t i = 0; i < n; ++i)
      if (keep[i]) keys.push_back(key[i]);
    if (static_cast<size_t>(p.top_k) < keys.size()) {
      const uint64_t threshold = nth_key(keys, static_cast<size_t>(p.top_k));
      for (size_t i = 0; i < n; ++i) keep[i] = keep[i] && key[i] >= threshold;
    }
  }
  // 4. top-p over the positive-weight candidates (zero weights never change the cumulative sum, and are never drawn).
  if (p.top_p < 1.0f) {
    uint64_t total = 0;
    cand.clear();
    for (size_t i = 0; i < n; ++i)
      if (keep[i] && w[i] > 0) {
        total += w[i];
        cand.emplace_back(key[i], w[i]);
      }
    const uint64_t target = sm::top_p_target(p.top_p, total);
    const uint64_t threshold = weighted_cut(cand, target);
    for (size_t i = 0; i < n; ++i) keep[i] = keep[i] && key[i] >= threshold;
  }
  for (size_t i = 0; i < n; ++i)
    if (!keep[i]) w[i] = 0;
  return w;
}

int32_t sample_row(std::span<const float> logits, const SampleParams& p) {
  const std::vector<uint64_t> w = sample_weights(logits, p);
  if (p.temperature == 0.0f) return static_cast<int32_t>(std::max_element(w.begin(), w.end()) - w.begin());
  uint64_t total = 0;
  for (uint64_t v : w) total += v;
  const uint64_t r = sm::mul_hi_u64(sm::random_u64(p.seed, p.counter), total);
  uint64_t cum = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    cum += w[i];
    if (cum > r) return static_cast<int32_t>(i);
  }
  fail("sampling: no token drawn (total weight {})", total);
}

void Backend::sample_rows(const float* x, size_t rows, size_t cols, std::span<const SampleParams> params,
                          int32_t* out) {
  if (rows == 0) return;
  if (params.size() != rows) fail("sample_rows: {} parameter sets for {} rows", params.size(), rows);
  if (cols == 0) fail("sampling from rows of 0 columns");
  auto values = alloc(rows * cols);
  copy(x, values->f32(), rows * cols);
  std::vector<float> host(rows * cols);
  download(*values, 0, host.data(), host.size());
  std::vector<int32_t> ids(rows);
  for (size_t r = 0; r < rows; ++r) ids[r] = sample_row({host.data() + r * cols, cols}, params[r]);
  auto result = alloc(rows);
  upload(*result, 0, reinterpret_cast<const float*>(ids.data()), rows);
  copy(result->f32(), reinterpret_cast<float*>(out), rows);
}

}  // namespace mxlm::backend
