// CPU backend ops (other than the GEMM kernels) against straightforward reference math written here.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "backend/backend.h"

namespace mxlm::backend {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

TEST(CpuOps, GemmaRmsNormScalesByOnePlusWeight) {
  auto be = make_cpu_backend();
  const size_t rows = 3, dim = 8;
  auto x = randn(rows * dim, 1), w = randn(dim, 2, 0.3f);
  std::vector<float> out(rows * dim), plain(rows * dim);
  be->rms_norm(x.data(), w.data(), out.data(), rows, dim, 1e-6f, true);
  be->rms_norm(x.data(), w.data(), plain.data(), rows, dim, 1e-6f, false);
  for (size_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (size_t i = 0; i < dim; ++i) ss += x[r * dim + i] * x[r * dim + i];
    const double inv = 1.0 / std::sqrt(ss / dim + 1e-6);
    for (size_t i = 0; i < dim; ++i) {
      EXPECT_NEAR(out[r * dim + i], x[r * dim + i] * inv * (1.0 + w[i]), 1e-5);
      EXPECT_NEAR(plain[r * dim + i], x[r * dim + i] * inv * w[i], 1e-5);
    }
  }
}

TEST(CpuOps, PartialNeoxRopeRotatesPairsDAndDPlusHalf) {
  auto be = make_cpu_backend();
  const int heads = 2, head_dim = 12, rotary = 8;
  const std::vector<int32_t> pos = {0, 5, 1000};
  auto x = randn(pos.size() * heads * head_dim, 3);
  auto y = x;
  be->rope(y.data(), pos, heads, head_dim, rotary, 10000.0f);
  for (size_t t = 0; t < pos.size(); ++t)
    for (int h = 0; h < heads; ++h) {
      const float* a = x.data() + (t * heads + h) * head_dim;
      const float* b = y.data() + (t * heads + h) * head_dim;
      for (int j = 0; j < rotary / 2; ++j) {
        const double ang = pos[t] * std::pow(10000.0, -2.0 * j / rotary);
        EXPECT_NEAR(b[j], a[j] * std::cos(ang) - a[j + rotary / 2] * std::sin(ang), 2e-4);
        EXPECT_NEAR(b[j + rotary / 2], a[j + rotary / 2] * std::cos(ang) + a[j] * std::sin(ang), 2e-4);
      }
      for (int d = rotary; d < head_dim; ++d) EXPECT_EQ(b[d], a[d]);
    }
}

TEST(CpuOps, SwigluOaiClampsGateAboveAndUpBothWays) {
  auto be = make_cpu_backend();
  std::vector<float> g = {-3.0f, 0.5f, 9.0f, 2.0f}, u = {1.0f, -8.0f, 0.0f, 10.0f}, o(4);
  be->swiglu_oai(g.data(), u.data(), o.data(), 4, {1.702f, 7.0f});
  auto ref = [](float gate, float up) {
    const double gg = std::min(gate, 7.0f), uu = std::clamp(up, -7.0f, 7.0f);
    return (uu + 1.0) * gg / (1.0 + std::exp(-1.702 * gg));
  };
  for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(o[i], ref(g[i], u[i]), 1e-5) << i;
}

TEST(CpuOps, RouterChoosesByBiasedScoreButWeighsUnbiased) {
  auto be = make_cpu_backend();
  // One token, hidden 1 = 1.0: router logits are the weights themselves.
  std::vector<float> w = {2.0f, 1.0f, 0.0f, -1.0f};
  auto weight = be->upload_weight({WeightFormat::F32, 4, 1, w.data(), nullptr});
  std::vector<float> bias = {0.0f, 0.0f, 0.5f, 0.0f};
  const float x = 1.0f;
  int32_t ids[2];
  float wts[2];
  be->router(&x, 1, *weight, bias.data(), 2, 2.0f, ids, wts);
  auto sig = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  // Biased scores: s0 = .881, s1 = .731, s2 = .5 + .5 = 1.0 -> experts 2 and 0.
  EXPECT_EQ(ids[0], 2);
  EXPECT_EQ(ids[1], 0);
  const double sum = sig(0.0) + sig(2.0);
  EXPECT_NEAR(wts[0], 2.0 * sig(0.0) / sum, 1e-6);
  EXPECT_NEAR(wts[1], 2.0 * sig(2.0) / sum, 1e-6);
}

// One sequence of `n` tokens on pages given in reverse order (to catch page/slot mix-ups).
struct PagedSeq {
  int32_t block_size;
  std::vector<int32_t> table;
  AttentionBatch batch;
  PagedSeq(int32_t n, int32_t bs) : block_size(bs) {
    const int32_t pages = (n + bs - 1) / bs;
    for (int32_t p = pages - 1; p >= 0; --p) table.push_back(p);
    batch.block_size = bs;
    batch.num_tokens = n;
    batch.sequences.push_back({0, n, 0, table});
    for (int32_t i = 0; i < n; ++i) {
      batch.positions.push_back(i);
      batch.slots.push_back(static_cast<int64_t>(table[static_cast<size_t>(i / bs)]) * bs + i % bs);
    }
  }
};

TEST(CpuOps, PagedAttentionMatchesDenseCausalGqa) {
  auto be = make_cpu_backend();
  const int n = 11, heads = 4, kvh = 2, d = 8, bs = 4;
  PagedSeq ps(n, bs);
  auto q = randn(n * heads * d, 4), k = randn(n * kvh * d, 5), v = randn(n * kvh * d, 6);
  std::vector<float> kc(16 * bs * kvh * d), vc(kc.size()), out(q.size());
  be->cache_write(k.data(), kvh * d, ps.batch.slots, kc.data());
  be->cache_write(v.data(), kvh * d, ps.batch.slots, vc.data());
  const AttentionShape shape{heads, kvh, d, 0.35f};
  be->attention(q.data(), ps.batch, shape, kc.data(), vc.data(), out.data());
  for (int t = 0; t < n; ++t)
    for (int h = 0; h < heads; ++h) {
      const int g = h / (heads / kvh);
      std::vector<double> s(t + 1);
      double mx = -1e30, z = 0;
      for (int j = 0; j <= t; ++j) {
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += q[(t * heads + h) * d + c] * k[(j * kvh + g) * d + c];
        s[j] = dot * 0.35;
        mx = std::max(mx, s[j]);
      }
      for (auto& e : s) z += e = std::exp(e - mx);
      for (int c = 0; c < d; ++c) {
        double o = 0;
        for (int j = 0; j <= t; ++j) o += s[j] / z * v[(j * kvh + g) * d + c];
        EXPECT_NEAR(out[(t * heads + h) * d + c], o, 1e-5);
      }
    }
}

TEST(CpuOps, CacheWritesSkipPaddingRowsAndMatchOneWriteEach) {
  auto be = make_cpu_backend();
  const std::vector<int64_t> slots{3, -1, 0, 5};
  const auto k = randn(4 * 6, 7), ik = randn(4 * 2, 8);
  std::vector<float> kc(8 * 6, -7.0f), ic(8 * 2, -7.0f);
  const Backend::CacheRows rows[] = {{k.data(), 6, kc.data()}, {ik.data(), 2, ic.data()}};
  be->cache_writes(rows, slots);
  for (size_t slot = 0; slot < 8; ++slot) {
    const auto row = std::find(slots.begin(), slots.end(), static_cast<int64_t>(slot));
    for (size_t c = 0; c < 6; ++c)
      EXPECT_EQ(kc[slot * 6 + c], row == slots.end() ? -7.0f : k[static_cast<size_t>(row - slots.begin()) * 6 + c]);
    for (size_t c = 0; c < 2; ++c)
      EXPECT_EQ(ic[slot * 2 + c], row == slots.end() ? -7.0f : ik[static_cast<size_t>(row - slots.begin()) * 2 + c]);
  }
}

TEST(CpuOps, IndexerSelectsTopBlocksPerHeadWithForcedLocalBlock) {
  auto be = make_cpu_backend();
  const int n = 20, bs = 4, heads = 2, d = 4, topk = 3;
  PagedSeq ps(n, bs);
  auto iq = randn(n * heads * d, 7), ik = randn(n * d, 8);
  std::vector<float> cache(8 * bs * d);
  be->cache_write(ik.data(), d, ps.batch.slots, cache.data());
  std::vector<int32_t> blocks(n * heads * topk);
  be->index_select(iq.data(), ps.batch, {heads, d, topk, 1, 0}, cache.data(), blocks.data());
  for (int t = 0; t < n; ++t)
    for (int h = 0; h < heads; ++h) {
      const int visible = t / bs + 1;
      std::vector<double> score(visible, -1e300);
      for (int j = 0; j <= t; ++j) {
        double s = 0;
        for (int c = 0; c < d; ++c) s += iq[(t * heads + h) * d + c] * ik[j * d + c];
        score[j / bs] = std::max(score[j / bs], s);
      }
      score[visible - 1] = 1e300;
      std::vector<int> order(visible);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
      for (int j = 0; j < topk; ++j) {
        const int want = j < visible ? order[j] : -1;
        EXPECT_EQ(blocks[(t * heads + h) * topk + j], want) << "t " << t << " h " << h << " slot " << j;
      }
    }
}

TEST(CpuOps, SparseAttentionOverAllBlocksIsDenseAndDropsUnselectedBlocks) {
  auto be = make_cpu_backend();
  const int n = 10, heads = 2, kvh = 1, d = 4, bs = 4, topk = 3;
  PagedSeq ps(n, bs);
  auto q = randn(n * heads * d, 9), k = randn(n * kvh * d, 10), v = randn(n * kvh * d, 11);
  std::vector<float> kc(8 * bs * kvh * d), vc(kc.size()), dense(q.size()), sparse(q.size());
  be->cache_write(k.data(), kvh * d, ps.batch.slots, kc.data());
  be->cache_write(v.data(), kvh * d, ps.batch.slots, vc.data());
  const AttentionShape shape{heads, kvh, d, 0.5f};
  be->attention(q.data(), ps.batch, shape, kc.data(), vc.data(), dense.data());
  std::vector<int32_t> all(n * kvh * topk);
  for (int t = 0; t < n; ++t)
    for (int j = 0; j < topk; ++j) all[t * topk + j] = j <= t / bs ? t / bs - j : -1;
  be->sparse_attention(q.data(), ps.batch, shape, kc.data(), vc.data(), all.data(), topk, sparse.data());
  for (size_t i = 0; i < q.size(); ++i) EXPECT_NEAR(sparse[i], dense[i], 1e-6);
  // Only the local block for the last token: equals attention over positions 8..9 alone.
  std::vector<int32_t> local(n * kvh * topk, -1);
  for (int t = 0; t < n; ++t) local[t * topk] = t / bs;
  be->sparse_attention(q.data(), ps.batch, shape, kc.data(), vc.data(), local.data(), topk, sparse.data());
  const int t = 9;
  for (int h = 0; h < heads; ++h) {
    double s[2], z = 0;
    for (int j = 0; j < 2; ++j) {
      double dot = 0;
      for (int c = 0; c < d; ++c) dot += q[(t * heads + h) * d + c] * k[(8 + j) * d + c];
      s[j] = dot * 0.5;
    }
    const double mx = std::max(s[0], s[1]);
    for (auto& e : s) z += e = std::exp(e - mx);
    for (int c = 0; c < d; ++c)
      EXPECT_NEAR(sparse[(t * heads + h) * d + c], (s[0] * v[8 * d + c] + s[1] * v[9 * d + c]) / z, 1e-5);
  }
}

TEST(CpuOps, MoeExpertsSumWeightedExpertOutputs) {
  auto be = make_cpu_backend();
  const int hidden = 32, inter = 32, experts = 3, tokens = 4, k = 2;
  std::vector<std::unique_ptr<Weight>> w1, w3, w2;
  std::vector<std::vector<float>> raw1, raw3, raw2;
  for (int e = 0; e < experts; ++e) {
    raw1.push_back(randn(inter * hidden, 20 + e, 0.2f));
    raw3.push_back(randn(inter * hidden, 30 + e, 0.2f));
    raw2.push_back(randn(hidden * inter, 40 + e, 0.2f));
    w1.push_back(be->upload_weight({WeightFormat::F32, inter, hidden, raw1.back().data(), nullptr}));
    w3.push_back(be->upload_weight({WeightFormat::F32, inter, hidden, raw3.back().data(), nullptr}));
    w2.push_back(be->upload_weight({WeightFormat::F32, hidden, inter, raw2.back().data(), nullptr}));
  }
  std::vector<const Weight*> p1, p3, p2;
  for (int e = 0; e < experts; ++e) p1.push_back(w1[e].get()), p3.push_back(w3[e].get()), p2.push_back(w2[e].get());
  auto x = randn(tokens * hidden, 50);
  std::vector<int32_t> ids = {0, 2, 1, 0, 2, 1, 2, 0};
  std::vector<float> wts = {0.7f, 0.3f, 0.5f, 0.5f, 1.2f, 0.8f, 0.1f, 1.9f};
  std::vector<float> out(tokens * hidden);
  be->moe_experts(x.data(), tokens, ids.data(), wts.data(), k, p1, p3, p2, 0, {1.702f, 7.0f}, false, nullptr,
                  out.data());
  for (int t = 0; t < tokens; ++t) {
    std::vector<double> want(hidden, 0.0);
    for (int j = 0; j < k; ++j) {
      const int e = ids[t * k + j];
      std::vector<double> act(inter);
      for (int i = 0; i < inter; ++i) {
        double g = 0, u = 0;
        for (int c = 0; c < hidden; ++c) {
          g += raw1[e][i * hidden + c] * x[t * hidden + c];
          u += raw3[e][i * hidden + c] * x[t * hidden + c];
        }
        g = std::min(g, 7.0);
        u = std::clamp(u, -7.0, 7.0);
        act[i] = (u + 1) * g / (1 + std::exp(-1.702 * g));
      }
      for (int c = 0; c < hidden; ++c) {
        double y = 0;
        for (int i = 0; i < inter; ++i) y += raw2[e][c * inter + i] * act[i];
        want[c] += wts[t * k + j] * y;
      }
    }
    for (int c = 0; c < hidden; ++c) EXPECT_NEAR(out[t * hidden + c], want[c], 1e-4);
  }
}

}  // namespace
}  // namespace mxlm::backend
