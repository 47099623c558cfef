// moe_experts with a shared expert (issue #8, sharedfuse): the call that takes the shared expert must give, bit for
// bit, what the model computed before it did (routed experts, then the shared MLP through copy / qdq_mxfp4 / linear /
// swiglu_oai / add), and that must be the spec's out = routed + shared (m3_checkpoint.md §7, a double reference from
// mx::ref dequantization here).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <string>

#include "backend/backend.h"
#include "core/error.h"
#include "mx/mxfp4.h"

namespace mxlm::backend {
namespace {

constexpr SwigluParams kSwiglu{1.702f, 7.0f};

std::vector<float> randn(size_t n, std::mt19937& g, float stddev = 1.0f) {
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

// A random MXFP4 matrix kept on the host too (the reference dequantizes it with mx::ref).
struct Mx {
  int64_t rows = 0, cols = 0;
  std::vector<uint8_t> packed, scales;
  std::unique_ptr<Weight> weight;
  std::vector<float> dequantized() const {
    std::vector<float> w(static_cast<size_t>(rows * cols));
    mx::ref::dequantize_f32(packed.data(), scales.data(), static_cast<size_t>(rows), static_cast<size_t>(cols),
                            w.data());
    return w;
  }
};

Mx random_mx(Backend& be, int64_t rows, int64_t cols, std::mt19937& g) {
  Mx m;
  m.rows = rows;
  m.cols = cols;
  m.packed.resize(static_cast<size_t>(rows * cols / 2));
  m.scales.resize(static_cast<size_t>(rows * cols / 32));
  std::uniform_int_distribution<int> byte(0, 255), scale(120, 126);
  for (auto& b : m.packed) b = static_cast<uint8_t>(byte(g));
  for (auto& s : m.scales) s = static_cast<uint8_t>(scale(g));
  m.weight = be.upload_weight({WeightFormat::MXFP4, rows, cols, m.packed.data(), m.scales.data()});
  return m;
}

struct Layer {
  std::vector<Mx> w1, w3, w2;
  std::vector<const Weight*> p1, p3, p2;
  Mx sg, su, sd;
  SharedExpert shared() const { return {sg.weight.get(), su.weight.get(), sd.weight.get()}; }
};

Layer random_layer(Backend& be, int experts, int hidden, int inter, std::mt19937& g) {
  Layer l;
  for (int e = 0; e < experts; ++e) {
    l.w1.push_back(random_mx(be, inter, hidden, g));
    l.w3.push_back(random_mx(be, inter, hidden, g));
    l.w2.push_back(random_mx(be, hidden, inter, g));
  }
  for (int e = 0; e < experts; ++e) {
    l.p1.push_back(l.w1[static_cast<size_t>(e)].weight.get());
    l.p3.push_back(l.w3[static_cast<size_t>(e)].weight.get());
    l.p2.push_back(l.w2[static_cast<size_t>(e)].weight.get());
  }
  l.sg = random_mx(be, inter, hidden, g);
  l.su = random_mx(be, inter, hidden, g);
  l.sd = random_mx(be, hidden, inter, g);
  return l;
}

// Distinct experts per token ("same": every token picks experts 0..k-1), weights as the router gives them.
void random_routing(size_t tokens, int k, int experts, bool same, std::mt19937& g, std::vector<int32_t>& ids,
                    std::vector<float>& weights) {
  ids.assign(tokens * static_cast<size_t>(k), 0);
  weights.assign(ids.size(), 0.0f);
  std::uniform_real_distribution<float> w(0.05f, 1.0f);
  for (size_t t = 0; t < tokens; ++t) {
    std::vector<int32_t> all(static_cast<size_t>(experts));
    for (int e = 0; e < experts; ++e) all[static_cast<size_t>(e)] = e;
    if (!same) std::shuffle(all.begin(), all.end(), g);
    for (int j = 0; j < k; ++j) {
      ids[t * static_cast<size_t>(k) + static_cast<size_t>(j)] = all[static_cast<size_t>(j)];
      weights[t * static_cast<size_t>(k) + static_cast<size_t>(j)] = 2.0f * w(g);
    }
  }
}

// What M3Model::moe ran before moe_experts took the shared expert: the routed experts, then M3Model::mlp with
// M3Model::linear's copy + QDQ before each MXFP4 linear, then add.
std::vector<float> unfused(Backend& be, const Layer& l, const std::vector<float>& x, size_t tokens,
                           const std::vector<int32_t>& ids, const std::vector<float>& weights, int k) {
  const size_t hidden = static_cast<size_t>(l.sg.cols), inter = static_cast<size_t>(l.sg.rows);
  std::vector<float> out(tokens * hidden), shared(tokens * hidden), g(tokens * inter), u(tokens * inter);
  be.moe_experts(x.data(), tokens, ids.data(), weights.data(), k, l.p1, l.p3, l.p2, 0, kSwiglu, true, nullptr,
                 out.data());
  auto linear = [&](const float* in, size_t cols, const Weight& w, float* y) {
    std::vector<float> tmp(tokens * cols);
    be.copy(in, tmp.data(), tmp.size());
    be.qdq_mxfp4(tmp.data(), tokens, cols);
    be.linear(tmp.data(), tokens, w, y);
  };
  linear(x.data(), hidden, *l.sg.weight, g.data());
  linear(x.data(), hidden, *l.su.weight, u.data());
  be.swiglu_oai(g.data(), u.data(), g.data(), g.size(), kSwiglu);
  linear(g.data(), inter, *l.sd.weight, shared.data());
  be.add(out.data(), shared.data(), out.data(), out.size());
  return out;
}

std::vector<float> fused(Backend& be, const Layer& l, const std::vector<float>& x, size_t tokens,
                         const std::vector<int32_t>& ids, const std::vector<float>& weights, int k) {
  std::vector<float> out(tokens * static_cast<size_t>(l.sg.cols), std::nanf(""));
  const SharedExpert shared = l.shared();
  be.moe_experts(x.data(), tokens, ids.data(), weights.data(), k, l.p1, l.p3, l.p2, 0, kSwiglu, true, &shared,
                 out.data());
  return out;
}

size_t differing_bits(const std::vector<float>& a, const std::vector<float>& b) {
  size_t bad = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    if (std::bit_cast<uint32_t>(a[i]) != std::bit_cast<uint32_t>(b[i])) ++bad;
  return bad;
}

// The spec in double: Σ_j w_j Expert_j(x) + Shared(x), each MXFP4 linear on the QDQ'd input (emulation).
std::vector<double> reference(const Layer& l, const std::vector<float>& x, size_t tokens,
                              const std::vector<int32_t>& ids, const std::vector<float>& weights, int k) {
  const size_t hidden = static_cast<size_t>(l.sg.cols), inter = static_cast<size_t>(l.sg.rows);
  auto mlp = [&](const Mx& gate, const Mx& up, const Mx& down, const float* xt, std::vector<double>& y) {
    const auto wg = gate.dequantized(), wu = up.dequantized(), wd = down.dequantized();
    std::vector<float> xq(xt, xt + hidden), act(inter);
    mx::ref::qdq_f32(xq.data(), hidden, mx::ScaleRule::Even);
    for (size_t i = 0; i < inter; ++i) {
      double g = 0, u = 0;
      for (size_t c = 0; c < hidden; ++c) {
        g += static_cast<double>(wg[i * hidden + c]) * xq[c];
        u += static_cast<double>(wu[i * hidden + c]) * xq[c];
      }
      g = std::min(g, 7.0);
      u = std::clamp(u, -7.0, 7.0);
      act[i] = static_cast<float>((u + 1) * g / (1 + std::exp(-1.702 * g)));
    }
    mx::ref::qdq_f32(act.data(), inter, mx::ScaleRule::Even);
    y.assign(hidden, 0.0);
    for (size_t c = 0; c < hidden; ++c)
      for (size_t i = 0; i < inter; ++i) y[c] += static_cast<double>(wd[c * inter + i]) * act[i];
  };
  std::vector<double> out(tokens * hidden, 0.0), y;
  for (size_t t = 0; t < tokens; ++t) {
    const float* xt = x.data() + t * hidden;
    for (int j = 0; j < k; ++j) {
      const size_t a = t * static_cast<size_t>(k) + static_cast<size_t>(j), e = static_cast<size_t>(ids[a]);
      mlp(l.w1[e], l.w3[e], l.w2[e], xt, y);
      for (size_t c = 0; c < hidden; ++c) out[t * hidden + c] += weights[a] * y[c];
    }
    mlp(l.sg, l.su, l.sd, xt, y);
    for (size_t c = 0; c < hidden; ++c) out[t * hidden + c] += y[c];
  }
  return out;
}

TEST(MoeSharedExpert, FusedCallEqualsTheModelsUnfusedSequenceBitForBit) {
  auto be = make_cpu_backend();
  std::mt19937 g(8);
  const int experts = 8, k = 3, hidden = 64, inter = 96;
  const Layer l = random_layer(*be, experts, hidden, inter, g);
  for (size_t tokens : {size_t{1}, size_t{8}, size_t{13}}) {
    for (bool same : {false, true}) {
      SCOPED_TRACE("tokens " + std::to_string(tokens) + (same ? " same experts" : " random experts"));
      const auto x = randn(tokens * hidden, g);
      std::vector<int32_t> ids;
      std::vector<float> w;
      random_routing(tokens, k, experts, same, g, ids, w);
      const auto got = fused(*be, l, x, tokens, ids, w, k);
      EXPECT_EQ(differing_bits(got, unfused(*be, l, x, tokens, ids, w, k)), 0u);
      // And it is the spec's sum (not, say, the routed part alone or the shared expert scaled).
      const auto want = reference(l, x, tokens, ids, w, k);
      double err = 0, scale = 0;
      for (size_t i = 0; i < want.size(); ++i) {
        err = std::max(err, std::fabs(got[i] - want[i]));
        scale = std::max(scale, std::fabs(want[i]));
      }
      EXPECT_LE(err, 1e-4 * scale);
    }
  }
}

TEST(MoeSharedExpert, ExpertParallelSubsetAddsTheSharedExpertToEveryToken) {
  // Experts 4..7 local: tokens routed elsewhere only get the shared expert.
  auto be = make_cpu_backend();
  std::mt19937 g(9);
  const int k = 2, hidden = 32, inter = 64;
  Layer l = random_layer(*be, 4, hidden, inter, g);
  const size_t tokens = 5;
  const auto x = randn(tokens * hidden, g);
  std::vector<int32_t> ids = {0, 5, 4, 7, 1, 2, 6, 3, 5, 6};
  std::vector<float> w = {0.5f, 1.5f, 0.25f, 1.75f, 1.0f, 1.0f, 0.3f, 1.7f, 0.9f, 1.1f};
  std::vector<float> got(tokens * hidden), routed(tokens * hidden), shared_only(tokens * hidden);
  const SharedExpert shared = l.shared();
  be->moe_experts(x.data(), tokens, ids.data(), w.data(), k, l.p1, l.p3, l.p2, 4, kSwiglu, true, &shared, got.data());
  be->moe_experts(x.data(), tokens, ids.data(), w.data(), k, l.p1, l.p3, l.p2, 4, kSwiglu, true, nullptr,
                  routed.data());
  // No routed expert at all: the shared expert alone (into an output that held garbage).
  std::fill(shared_only.begin(), shared_only.end(), 1e30f);
  be->moe_experts(x.data(), tokens, ids.data(), w.data(), k, {}, {}, {}, 0, kSwiglu, true, &shared, shared_only.data());
  std::vector<float> sum(tokens * hidden);
  be->add(routed.data(), shared_only.data(), sum.data(), sum.size());
  EXPECT_EQ(differing_bits(got, sum), 0u);
  // Token 2 (experts 1 and 2) has no local expert: its row is the shared expert's output alone.
  for (int c = 0; c < hidden; ++c) EXPECT_EQ(got[2 * hidden + c], shared_only[2 * hidden + c]);
  double norm = 0;
  for (float v : shared_only) norm += std::fabs(v);
  EXPECT_GT(norm, 0.0);
}

TEST(MoeSharedExpert, FloatSharedExpertIsNotQuantized) {
  // A float shared expert's linears take their inputs as they are (M3Model::linear QDQs only MXFP4 weights).
  auto be = make_cpu_backend();
  std::mt19937 g(10);
  const int hidden = 32, inter = 32, k = 1;
  Layer l = random_layer(*be, 2, hidden, inter, g);
  const auto rg = randn(inter * hidden, g, 0.2f), ru = randn(inter * hidden, g, 0.2f),
             rd = randn(hidden * inter, g, 0.2f);
  auto fg = be->upload_weight({WeightFormat::F32, inter, hidden, rg.data(), nullptr});
  auto fu = be->upload_weight({WeightFormat::F32, inter, hidden, ru.data(), nullptr});
  auto fd = be->upload_weight({WeightFormat::F32, hidden, inter, rd.data(), nullptr});
  const size_t tokens = 3;
  const auto x = randn(tokens * hidden, g);
  std::vector<int32_t> ids = {0, 1, 0};
  std::vector<float> w = {1.0f, 2.0f, 0.5f};
  std::vector<float> got(tokens * hidden), routed(tokens * hidden);
  const SharedExpert shared{fg.get(), fu.get(), fd.get()};
  be->moe_experts(x.data(), tokens, ids.data(), w.data(), k, l.p1, l.p3, l.p2, 0, kSwiglu, true, &shared, got.data());
  be->moe_experts(x.data(), tokens, ids.data(), w.data(), k, l.p1, l.p3, l.p2, 0, kSwiglu, true, nullptr,
                  routed.data());
  for (size_t t = 0; t < tokens; ++t) {
    std::vector<double> act(inter);
    for (int i = 0; i < inter; ++i) {
      double gg = 0, uu = 0;
      for (int c = 0; c < hidden; ++c) {
        gg += static_cast<double>(rg[static_cast<size_t>(i * hidden + c)]) * x[t * hidden + static_cast<size_t>(c)];
        uu += static_cast<double>(ru[static_cast<size_t>(i * hidden + c)]) * x[t * hidden + static_cast<size_t>(c)];
      }
      gg = std::min(gg, 7.0);
      uu = std::clamp(uu, -7.0, 7.0);
      act[static_cast<size_t>(i)] = (uu + 1) * gg / (1 + std::exp(-1.702 * gg));
    }
    for (int c = 0; c < hidden; ++c) {
      double y = 0;
      for (int i = 0; i < inter; ++i) y += rd[static_cast<size_t>(c * inter + i)] * act[static_cast<size_t>(i)];
      const size_t o = t * hidden + static_cast<size_t>(c);
      // got = routed + shared rounded to f32: the difference carries one rounding of |routed|.
      EXPECT_NEAR(got[o] - routed[o], y, 4e-7 * std::fabs(routed[o]) + 1e-4 * (1 + std::fabs(y)));
    }
  }
}

TEST(MoeSharedExpert, MisshapenSharedExpertIsAnError) {
  auto be = make_cpu_backend();
  std::mt19937 g(11);
  Layer l = random_layer(*be, 2, 32, 64, g);
  const std::vector<float> x(32, 0.5f);
  const std::vector<int32_t> ids = {1};
  const std::vector<float> w = {1.0f};
  std::vector<float> out(32);
  const SharedExpert swapped{l.sd.weight.get(), l.su.weight.get(), l.sg.weight.get()};  // gate [32, 64] on hidden 32
  EXPECT_THROW(
      be->moe_experts(x.data(), 1, ids.data(), w.data(), 1, l.p1, l.p3, l.p2, 0, kSwiglu, true, &swapped, out.data()),
      Error);
  const SharedExpert missing{l.sg.weight.get(), nullptr, l.sd.weight.get()};
  EXPECT_THROW(
      be->moe_experts(x.data(), 1, ids.data(), w.data(), 1, l.p1, l.p3, l.p2, 0, kSwiglu, true, &missing, out.data()),
      Error);
}

}  // namespace
}  // namespace mxlm::backend
