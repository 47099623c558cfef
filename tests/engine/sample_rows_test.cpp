// The exact sampling op (backend/sampling.h) against independent references: Random123's published Philox4x32-10
// known-answer vectors, engine::Sampler::probabilities (the f32 softmax + filters written independently of the
// integer weights), a chi-square test of the draws against the exact distribution, edge cases (ties, -inf, top-k 1,
// top-p 1, min-p 1), determinism per (seed, counter), and Backend::sample_rows on the CPU backend.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>

#include "backend/backend.h"
#include "backend/sampling.h"
#include "backend/sampling_math.h"
#include "core/error.h"
#include "engine/sampler.h"

namespace mxlm::backend {
namespace {

namespace sm = sampling;

std::vector<float> random_logits(size_t n, uint32_t seed, float sigma = 2.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> l(n);
  for (auto& v : l) v = d(g);
  return l;
}

SampleParams params(float temperature, int top_k = 0, float top_p = 1.0f, float min_p = 0.0f, uint64_t seed = 1,
                    uint64_t counter = 0) {
  SampleParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p;
  p.seed = seed;
  p.counter = counter;
  return p;
}

std::vector<double> normalized(const std::vector<uint64_t>& w) {
  const double total = static_cast<double>(std::accumulate(w.begin(), w.end(), uint64_t{0}));
  std::vector<double> p(w.size());
  for (size_t i = 0; i < w.size(); ++i) p[i] = static_cast<double>(w[i]) / total;
  return p;
}

TEST(SampleRows, PhiloxMatchesRandom123KnownAnswers) {
  // Random123 tests/kat_vectors, "philox4x32 10" lines: ctr[4] key[2] -> result[4].
  struct Kat {
    uint32_t ctr[4], key[2], want[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const auto& k : kats) {
    const sm::Philox4 r = sm::philox4x32_10(sm::Philox4{{k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3]}}, k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(r.v[i], k.want[i]) << "word " << i;
  }
  // The draw's 64 bits are words 0 and 1 of counter (counter, 0, 0) under key (seed).
  EXPECT_EQ(sm::random_u64(0, 0), (uint64_t{0xe169c58d} << 32) | 0x6627e8d5u);
}

TEST(SampleRows, WeightExpIsCloseToExpAndExactAtZero) {
  EXPECT_EQ(sm::weight_exp(0.0f), 1.0f);
  for (float d = -28.0f; d <= 0.0f; d += 0.00731f) {
    const double want = std::exp(static_cast<double>(d));
    EXPECT_NEAR(sm::weight_exp(d) / want, 1.0, 5e-7) << d;  // a few f32 ulps
  }
}

TEST(SampleRows, DistributionMatchesTheSamplersF32Reference) {
  const auto l = random_logits(300, 2);
  for (float temp : {0.4f, 1.0f, 1.7f})
    for (int top_k : {0, 1, 17})
      for (float top_p : {1.0f, 0.9f, 0.5f})
        for (float min_p : {0.0f, 0.03f}) {
          engine::SamplingParams sp;
          sp.temperature = temp;
          sp.top_k = top_k;
          sp.top_p = top_p;
          sp.min_p = min_p;
          const auto want = engine::Sampler(sp).probabilities(l, {}, {});
          const auto got = normalized(sample_weights(l, params(temp, top_k, top_p, min_p)));
          for (size_t i = 0; i < l.size(); ++i)
            ASSERT_NEAR(got[i], want[i], 2e-6)
                << "temp " << temp << " top_k " << top_k << " top_p " << top_p << " min_p " << min_p << " token " << i;
        }
}

// Chi-square of `n` draws (counters 0..n-1 of one seed) against the exact distribution.
double chi_square(std::span<const float> l, const SampleParams& p, int n, int& dof) {
  const auto prob = normalized(sample_weights(l, p));
  std::vector<int> counts(l.size(), 0);
  SampleParams q = p;
  for (int i = 0; i < n; ++i) {
    q.counter = static_cast<uint64_t>(i);
    const int32_t t = sample_row(l, q);
    EXPECT_GT(prob[static_cast<size_t>(t)], 0.0) << "drew filtered-out token " << t;
    ++counts[static_cast<size_t>(t)];
  }
  double chi = 0;
  dof = -1;
  for (size_t i = 0; i < l.size(); ++i) {
    if (prob[i] == 0) continue;
    const double e = prob[i] * n;
    chi += (counts[i] - e) * (counts[i] - e) / e;
    ++dof;
  }
  return chi;
}

TEST(SampleRows, DrawsFollowTheDistribution) {
  const auto l = random_logits(40, 3, 1.0f);
  for (const SampleParams& p : {params(1.0f, 0, 1.0f, 0.0f, 7), params(0.8f, 12, 1.0f, 0.0f, 8),
                                params(1.3f, 0, 0.8f, 0.0f, 9), params(1.0f, 0, 1.0f, 0.1f, 10)}) {
    int dof = 0;
    const double chi = chi_square(l, p, 40000, dof);
    ASSERT_GT(dof, 0);
    // Wilson-Hilferty: the chi-square quantile at z = 4.26 (p = 1e-5) for `dof` degrees of freedom.
    const double k = dof, z = 4.26;
    const double limit = k * std::pow(1.0 - 2.0 / (9 * k) + z * std::sqrt(2.0 / (9 * k)), 3.0);
    EXPECT_LT(chi, limit) << "dof " << dof << " temp " << p.temperature << " top_k " << p.top_k << " top_p " << p.top_p
                          << " min_p " << p.min_p;
  }
}

TEST(SampleRows, EdgeCases) {
  const auto l = random_logits(1000, 4);
  const int32_t argmax = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
  for (uint64_t c = 0; c < 50; ++c) {
    EXPECT_EQ(sample_row(l, params(0.0f, 0, 1.0f, 0.0f, 1, c)), argmax);
    EXPECT_EQ(sample_row(l, params(0.9f, 1, 1.0f, 0.0f, 1, c)), argmax);   // top_k 1 == greedy
    EXPECT_EQ(sample_row(l, params(0.9f, 0, 1e-6f, 0.0f, 1, c)), argmax);  // the best token always stays
    EXPECT_EQ(sample_row(l, params(0.9f, 0, 1.0f, 1.0f, 1, c)), argmax);   // min_p 1: only the maxima
  }
  // Ties: greedy and top_k 1 take the lowest id; min_p 1 keeps every maximum.
  std::vector<float> tie(64, -1.0f);
  tie[40] = tie[9] = tie[51] = 3.0f;
  EXPECT_EQ(sample_row(tie, params(0.0f)), 9);
  EXPECT_EQ(sample_row(tie, params(1.0f, 1)), 9);
  std::map<int32_t, int> seen;
  for (uint64_t c = 0; c < 3000; ++c) ++seen[sample_row(tie, params(1.0f, 0, 1.0f, 1.0f, 5, c))];
  EXPECT_EQ(seen.size(), 3u);
  for (int32_t t : {9, 40, 51}) EXPECT_NEAR(seen[t] / 3000.0, 1.0 / 3, 0.04) << t;
  // top_k 2 with a three-way tie: ids 9 and 40, equally often.
  seen.clear();
  for (uint64_t c = 0; c < 2000; ++c) ++seen[sample_row(tie, params(1.0f, 2, 1.0f, 0.0f, 6, c))];
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_NEAR(seen[9] / 2000.0, 0.5, 0.05);
  // top_p 1 is no filter: every token keeps its weight (sigma-2 logits at T 0.7 are all within 28 nats).
  const auto w1 = sample_weights(l, params(0.7f, 0, 1.0f));
  EXPECT_EQ(std::count(w1.begin(), w1.end(), uint64_t{0}), 0);
  // -inf logits are never drawn; all -inf but one: that one; all -inf: greedy takes token 0 (the first of equal
  // maxima), a draw any token (all tie with the best, as equal finite logits do).
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> some(100, ninf);
  for (int i = 0; i < 100; i += 3) some[static_cast<size_t>(i)] = static_cast<float>(i % 7) * 0.1f;
  for (uint64_t c = 0; c < 500; ++c) EXPECT_EQ(sample_row(some, params(1.0f, 0, 1.0f, 0.0f, 3, c)) % 3, 0);
  std::vector<float> one(100, ninf);
  one[77] = -5.0f;
  for (float t : {0.0f, 0.5f, 2.0f})
    for (uint64_t c = 0; c < 20; ++c) {
      EXPECT_EQ(sample_row(one, params(t, 0, 1.0f, 0.0f, 4, c)), 77);
      EXPECT_EQ(sample_row(one, params(t, 5, 0.3f, 0.2f, 4, c)), 77);
    }
  std::vector<float> none(10, ninf);
  EXPECT_EQ(sample_row(none, params(0.0f)), 0);
  std::set<int32_t> any;
  for (uint64_t c = 0; c < 200; ++c) any.insert(sample_row(none, params(1.0f, 0, 1.0f, 0.0f, 1, c)));
  EXPECT_EQ(any.size(), 10u);
  // Bad input: an Error, not a crash.
  EXPECT_THROW(sample_row({}, params(1.0f)), Error);
  EXPECT_THROW(sample_row(l, params(-1.0f)), Error);
  EXPECT_THROW(sample_row(l, params(1.0f, 0, 0.0f)), Error);
  EXPECT_THROW(sample_row(l, params(1.0f, 0, 1.0f, 2.0f)), Error);
}

TEST(SampleRows, DeterministicPerSeedAndCounter) {
  const auto l = random_logits(5000, 5);
  std::vector<int32_t> a, b, c;
  for (uint64_t i = 0; i < 300; ++i) {
    a.push_back(sample_row(l, params(1.0f, 50, 0.95f, 0.0f, 123, i)));
    b.push_back(sample_row(l, params(1.0f, 50, 0.95f, 0.0f, 123, i)));
    c.push_back(sample_row(l, params(1.0f, 50, 0.95f, 0.0f, 124, i)));
  }
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_GT(std::set<int32_t>(a.begin(), a.end()).size(), 10u);  // the counter moves the stream
}

TEST(SampleRows, CpuBackendSampleRowsIsTheReferencePerRow) {
  auto be = make_cpu_backend();
  const size_t rows = 7, cols = 2003;
  std::vector<float> host;
  std::vector<SampleParams> ps;
  for (size_t r = 0; r < rows; ++r) {
    const auto l = random_logits(cols, 10 + static_cast<uint32_t>(r));
    host.insert(host.end(), l.begin(), l.end());
    ps.push_back(params(r == 0 ? 0.0f : 0.5f + 0.2f * r, static_cast<int>(r % 3) * 20, r % 2 ? 0.9f : 1.0f,
                        r == 5 ? 0.05f : 0.0f, 1000 + r, 3 * r));
  }
  auto x = be->alloc(rows * cols);
  be->upload(*x, 0, host.data(), host.size());
  auto out = be->alloc(rows);
  be->sample_rows(x->f32(), rows, cols, ps, out->i32());
  std::vector<int32_t> got(rows);
  be->download(*out, 0, reinterpret_cast<float*>(got.data()), rows);
  for (size_t r = 0; r < rows; ++r) EXPECT_EQ(got[r], sample_row({host.data() + r * cols, cols}, ps[r])) << "row " << r;
  EXPECT_THROW(be->sample_rows(x->f32(), rows, cols, std::span<const SampleParams>(ps).first(3), out->i32()), Error);
}

}  // namespace
}  // namespace mxlm::backend
