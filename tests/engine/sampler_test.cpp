// Sampler against straightforward reference math written independently here (softmax, filters, penalties), and
// its determinism per seed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "core/error.h"
#include "engine/sampler.h"

namespace mxlm::engine {
namespace {

std::vector<float> random_logits(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, 2.0f);
  std::vector<float> l(n);
  for (auto& v : l) v = d(g);
  return l;
}

std::vector<double> softmax(const std::vector<float>& l, double temperature) {
  double mx = *std::max_element(l.begin(), l.end());
  std::vector<double> p(l.size());
  double s = 0;
  for (size_t i = 0; i < l.size(); ++i) s += p[i] = std::exp((l[i] - mx) / temperature);
  for (auto& v : p) v /= s;
  return p;
}

TEST(Sampler, GreedyPicksArgmax) {
  SamplingParams sp;
  sp.temperature = 0.0f;
  Sampler s(sp);
  auto l = random_logits(100, 1);
  const int32_t want = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
  EXPECT_EQ(s.sample(l, {}, {}), want);
}

TEST(Sampler, TemperatureTopKTopPMinPMatchReference) {
  const auto l = random_logits(200, 2);
  for (float temp : {0.5f, 1.0f, 1.7f})
    for (int top_k : {0, 10})
      for (float top_p : {1.0f, 0.8f})
        for (float min_p : {0.0f, 0.05f}) {
          SamplingParams sp;
          sp.temperature = temp;
          sp.top_k = top_k;
          sp.top_p = top_p;
          sp.min_p = min_p;
          sp.seed = 1;
          const auto got = Sampler(sp).probabilities(l, {}, {});
          // Reference: full softmax; min-p vs its max; top-k; top-p over the renormalised survivors; renormalise.
          auto p = softmax(l, temp);
          std::vector<size_t> order(p.size());
          std::iota(order.begin(), order.end(), 0);
          std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return p[a] > p[b]; });
          std::vector<bool> keep(p.size(), true);
          for (size_t i = 0; i < p.size(); ++i) {
            if (p[i] < min_p * p[order[0]]) keep[i] = false;
          }
          if (top_k > 0)
            for (size_t r = static_cast<size_t>(top_k); r < order.size(); ++r) keep[order[r]] = false;
          if (top_p < 1.0f) {
            double total = 0;
            for (size_t i = 0; i < p.size(); ++i)
              if (keep[i]) total += p[i];
            double cum = 0;
            bool reached = false;
            for (size_t r = 0; r < order.size(); ++r) {
              if (!keep[order[r]]) continue;
              if (reached) keep[order[r]] = false;
              cum += p[order[r]] / total;
              if (cum >= top_p) reached = true;
            }
          }
          double total = 0;
          for (size_t i = 0; i < p.size(); ++i)
            if (keep[i]) total += p[i];
          for (size_t i = 0; i < p.size(); ++i) {
            const double want = keep[i] ? p[i] / total : 0.0;
            ASSERT_NEAR(got[i], want, 1e-5)
                << "temp " << temp << " top_k " << top_k << " top_p " << top_p << " min_p " << min_p << " token " << i;
          }
        }
}

TEST(Sampler, PenaltiesFollowVllmDefinitions) {
  std::vector<float> l = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f};
  SamplingParams sp;
  sp.temperature = 0.0f;
  sp.repetition_penalty = 2.0f;
  sp.presence_penalty = 0.5f;
  sp.frequency_penalty = 0.25f;
  Sampler s(sp);
  const std::vector<int32_t> prompt = {0, 1};
  const std::vector<int32_t> output = {3, 3, 4};
  // Expected logits: repetition on prompt+output tokens (divide positive, multiply negative), then output-only
  // counts: token 3 seen twice, token 4 once.
  std::vector<float> want = {2.0f / 2, -1.0f * 2, 0.5f, 3.0f / 2 - 0.25f * 2 - 0.5f, -2.0f * 2 - 0.25f - 0.5f};
  sp.temperature = 1.0f;
  const auto p = Sampler(sp).probabilities(l, prompt, output);
  std::vector<double> ref(want.size());
  double z = 0;
  for (size_t i = 0; i < want.size(); ++i) z += ref[i] = std::exp(static_cast<double>(want[i]));
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(p[i], ref[i] / z, 1e-6) << i;
  EXPECT_EQ(s.sample(l, prompt, output), 0);  // 1.0 beats 0.5, 0.5 (token 3 after penalties)
}

TEST(Sampler, SameSeedSameTokensAndFrequenciesFollowProbabilities) {
  const auto l = random_logits(20, 3);
  SamplingParams sp;
  sp.temperature = 1.0f;
  sp.seed = 42;
  Sampler a(sp), b(sp);
  std::vector<int32_t> sa, sb;
  for (int i = 0; i < 200; ++i) {
    sa.push_back(a.sample(l, {}, {}));
    sb.push_back(b.sample(l, {}, {}));
  }
  EXPECT_EQ(sa, sb);
  sp.seed = 43;
  Sampler c(sp);
  std::vector<int32_t> sc;
  for (int i = 0; i < 200; ++i) sc.push_back(c.sample(l, {}, {}));
  EXPECT_NE(sa, sc);
  // Empirical frequencies over many draws approach the probabilities.
  const auto p = a.probabilities(l, {}, {});
  std::map<int32_t, int> counts;
  const int n = 40000;
  for (int i = 0; i < n; ++i) ++counts[a.sample(l, {}, {})];
  for (size_t t = 0; t < p.size(); ++t)
    EXPECT_NEAR(counts[static_cast<int32_t>(t)] / static_cast<double>(n), p[t], 0.015) << t;
}

TEST(Sampler, StopTokensAndValidation) {
  SamplingParams sp;
  sp.stop_token_ids = {7, 9};
  Sampler s(sp);
  EXPECT_TRUE(s.is_stop(9));
  EXPECT_FALSE(s.is_stop(8));
  SamplingParams bad;
  bad.top_p = 0.0f;
  EXPECT_THROW(Sampler{bad}, Error);
  bad = {};
  bad.temperature = -1.0f;
  EXPECT_THROW(Sampler{bad}, Error);
  bad = {};
  bad.min_p = 1.5f;
  EXPECT_THROW(Sampler{bad}, Error);
}

}  // namespace
}  // namespace mxlm::engine
