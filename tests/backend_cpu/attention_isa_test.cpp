// The CPU attention ops under every vector variant this CPU supports (AVX-512, AVX2 + FMA, plain loops), with
// a head size that covers the vector loops and their tails (76 = 4 x 16 + 12 = 9 x 8 + 4), against double-precision
// references written here.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_attention_isa.h"

namespace mxlm::backend {
namespace {

using cpu::AttentionIsa;

std::vector<float> randn(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

std::vector<AttentionIsa> supported() {
  std::vector<AttentionIsa> isas;
  for (AttentionIsa isa : {AttentionIsa::Avx512, AttentionIsa::Avx2, AttentionIsa::Baseline})
    if (cpu::attention_isa_supported(isa)) isas.push_back(isa);
  return isas;
}

struct Forced {
  explicit Forced(AttentionIsa isa) { cpu::attention_force_isa(isa); }
  ~Forced() { cpu::attention_reset_isa(); }
  Forced(const Forced&) = delete;
  Forced& operator=(const Forced&) = delete;
};

// One sequence of n tokens on pages in reverse order.
struct Paged {
  std::vector<int32_t> table;
  AttentionBatch batch;
  Paged(int32_t n, int32_t bs) {
    for (int32_t p = (n + bs - 1) / bs - 1; p >= 0; --p) table.push_back(p);
    batch.block_size = bs;
    batch.num_tokens = n;
    batch.sequences.push_back({0, n, 0, table});
    for (int32_t i = 0; i < n; ++i) {
      batch.positions.push_back(i);
      batch.slots.push_back(static_cast<int64_t>(table[static_cast<size_t>(i / bs)]) * bs + i % bs);
    }
  }
};

TEST(CpuAttentionIsa, DenseAndSparseAttentionMatchDoubleReferenceInEveryVariant) {
  const int n = 37, heads = 4, kvh = 2, d = 76, bs = 8, topk = 5;
  const float scale = 0.12f;
  Paged ps(n, bs);
  auto q = randn(static_cast<size_t>(n * heads * d), 21), k = randn(static_cast<size_t>(n * kvh * d), 22),
       v = randn(static_cast<size_t>(n * kvh * d), 23);
  std::vector<float> kc(static_cast<size_t>(5 * bs * kvh * d)), vc(kc.size());
  auto be = make_cpu_backend();
  be->cache_write(k.data(), static_cast<size_t>(kvh * d), ps.batch.slots, kc.data());
  be->cache_write(v.data(), static_cast<size_t>(kvh * d), ps.batch.slots, vc.data());
  // Reference: causal softmax attention in double.
  std::vector<double> want(q.size());
  for (int t = 0; t < n; ++t)
    for (int h = 0; h < heads; ++h) {
      const int g = h / (heads / kvh);
      std::vector<double> s(static_cast<size_t>(t + 1));
      double mx = -1e300, z = 0;
      for (int j = 0; j <= t; ++j) {
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += double{q[(t * heads + h) * d + c]} * k[(j * kvh + g) * d + c];
        s[static_cast<size_t>(j)] = dot * scale;
        mx = std::max(mx, s[static_cast<size_t>(j)]);
      }
      for (auto& e : s) z += e = std::exp(e - mx);
      for (int c = 0; c < d; ++c) {
        double o = 0;
        for (int j = 0; j <= t; ++j) o += s[static_cast<size_t>(j)] / z * v[(j * kvh + g) * d + c];
        want[static_cast<size_t>((t * heads + h) * d + c)] = o;
      }
    }
  // Every visible block selected (in reverse order, padded with -1): sparse attention is dense attention.
  std::vector<int32_t> all(static_cast<size_t>(n * kvh * topk), -1);
  for (int t = 0; t < n; ++t)
    for (int g = 0; g < kvh; ++g) {
      auto* list = all.data() + (t * kvh + g) * topk;
      std::iota(list, list + t / bs + 1, 0);
      std::reverse(list, list + t / bs + 1);
    }
  for (AttentionIsa isa : supported()) {
    Forced forced(isa);
    const std::string name = "variant " + std::to_string(static_cast<int>(isa));
    std::vector<float> dense(q.size()), sparse(q.size());
    be->attention(q.data(), ps.batch, {heads, kvh, d, scale}, kc.data(), vc.data(), dense.data());
    be->sparse_attention(q.data(), ps.batch, {heads, kvh, d, scale}, kc.data(), vc.data(), all.data(), topk,
                         sparse.data());
    for (size_t i = 0; i < q.size(); ++i) {
      ASSERT_NEAR(dense[i], want[i], 2e-5) << name << " at " << i;
      ASSERT_NEAR(sparse[i], want[i], 2e-5) << name << " at " << i;
    }
  }
}

TEST(CpuAttentionIsa, IndexerSelectsTheReferenceBlocksInEveryVariant) {
  const int n = 45, bs = 4, heads = 3, d = 76, topk = 4;
  Paged ps(n, bs);
  auto iq = randn(static_cast<size_t>(n * heads * d), 31), ik = randn(static_cast<size_t>(n * d), 32);
  std::vector<float> cache(static_cast<size_t>(12 * bs * d));
  auto be = make_cpu_backend();
  be->cache_write(ik.data(), static_cast<size_t>(d), ps.batch.slots, cache.data());
  for (AttentionIsa isa : supported()) {
    Forced forced(isa);
    std::vector<int32_t> blocks(static_cast<size_t>(n * heads * topk));
    be->index_select(iq.data(), ps.batch, {heads, d, topk, 1, 1}, cache.data(), blocks.data());
    for (int t = 0; t < n; ++t)
      for (int h = 0; h < heads; ++h) {
        const int visible = t / bs + 1;
        std::vector<double> score(static_cast<size_t>(visible), -1e300);
        for (int j = 0; j <= t; ++j) {
          double s = 0;
          for (int c = 0; c < d; ++c) s += double{iq[(t * heads + h) * d + c]} * ik[j * d + c];
          score[static_cast<size_t>(j / bs)] = std::max(score[static_cast<size_t>(j / bs)], s);
        }
        score[static_cast<size_t>(visible - 1)] = 1e300;  // the local block
        score[0] = 1e300;                                 // the initial block
        std::vector<int> order(static_cast<size_t>(visible));
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(),
                  [&](int a, int b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
        for (int j = 0; j < topk; ++j)
          EXPECT_EQ(blocks[static_cast<size_t>((t * heads + h) * topk + j)], j < visible ? order[j] : -1)
              << "variant " << static_cast<int>(isa) << " t " << t << " h " << h << " slot " << j;
      }
  }
}

}  // namespace
}  // namespace mxlm::backend
