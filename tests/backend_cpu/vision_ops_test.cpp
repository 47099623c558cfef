// The CPU backend's vision encoder ops (add_bias, layer_norm, gelu_erf, rope_table, segment_attention) against
// plain double-precision reference math written here. gelu_erf and segment_attention run with the AVX-512 kernels
// and with the scalar code (forced through the GEMM ISA hook); attention on ragged segments, including empty ones
// and lengths that are not multiples of the 16-lane / 4-row tiles.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/gemm_isa.h"
#include "core/error.h"

namespace mxlm::backend {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float stddev = 1.0f, float mean = 0.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(mean, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

double max_rel(const std::vector<float>& got, const std::vector<double>& want) {
  double e = 0, s = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    e = std::max(e, std::fabs(got[i] - want[i]));
    s = std::max(s, std::fabs(want[i]));
  }
  return e / s;
}

TEST(CpuVisionOps, AddBiasBroadcastsOverRows) {
  auto be = make_cpu_backend();
  const size_t rows = 7, cols = 13;
  auto y = randn(rows * cols, 1), b = randn(cols, 2);
  auto got = y;
  be->add_bias(got.data(), b.data(), rows, cols);
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < cols; ++c) EXPECT_EQ(got[r * cols + c], y[r * cols + c] + b[c]);
}

TEST(CpuVisionOps, LayerNormMatchesDoubleReference) {
  auto be = make_cpu_backend();
  for (size_t dim : {1u, 20u, 80u, 1280u}) {
    const size_t rows = 9;
    // A large common offset checks that the variance is taken around the mean (no E[x²] - E[x]² cancellation).
    auto x = randn(rows * dim, 3, 2.0f, 100.0f), w = randn(dim, 4, 0.5f, 1.0f), b = randn(dim, 5, 0.1f);
    std::vector<float> out(rows * dim);
    be->layer_norm(x.data(), w.data(), b.data(), out.data(), rows, dim, 1e-5f);
    std::vector<double> want(rows * dim);
    for (size_t r = 0; r < rows; ++r) {
      double mean = 0, var = 0;
      for (size_t i = 0; i < dim; ++i) mean += x[r * dim + i];
      mean /= static_cast<double>(dim);
      for (size_t i = 0; i < dim; ++i) var += (x[r * dim + i] - mean) * (x[r * dim + i] - mean);
      var /= static_cast<double>(dim);
      for (size_t i = 0; i < dim; ++i)
        want[r * dim + i] = (x[r * dim + i] - mean) / std::sqrt(var + 1e-5) * w[i] + b[i];
    }
    EXPECT_LT(max_rel(out, want), 2e-5) << "dim " << dim;
    // In place gives the same.
    be->layer_norm(x.data(), w.data(), b.data(), x.data(), rows, dim, 1e-5f);
    EXPECT_EQ(x, out) << "dim " << dim;
  }
}

class ForcedIsa {
 public:
  explicit ForcedIsa(cpu::GemmIsa isa) { cpu::gemm_force_isa(isa); }
  ~ForcedIsa() { cpu::gemm_reset_isa(); }
};

std::vector<cpu::GemmIsa> isas() {
  std::vector<cpu::GemmIsa> v = {cpu::GemmIsa::Scalar};
  if (cpu::gemm_isa_supported(cpu::GemmIsa::Avx512)) v.push_back(cpu::GemmIsa::Avx512);
  return v;
}

TEST(CpuVisionOps, GeluIsTheExactErfForm) {
  auto be = make_cpu_backend();
  auto x = randn(100003, 6, 3.0f);  // not a multiple of 16: the vector path's masked tail
  x[0] = 0.0f;
  x[1] = -10.0f;
  x[2] = 10.0f;
  x[100002] = -1.5f;
  for (auto isa : isas()) {
    ForcedIsa forced(isa);
    auto got = x;
    be->gelu_erf(got.data(), got.size());
    for (size_t i = 0; i < x.size(); ++i) {
      const double v = x[i], want = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
      ASSERT_NEAR(got[i], want, 5e-7 * std::max(1.0, std::fabs(want))) << cpu::gemm_isa_name(isa) << " " << x[i];
    }
    EXPECT_EQ(got[0], 0.0f);
    EXPECT_NEAR(got[1], 0.0f, 1e-20f);
    EXPECT_EQ(got[2], 10.0f);
    // tanh-approximate GELU differs from erf by ~1e-4 around |x| ≈ 2: the op must not be that.
    const double v = 2.0, tanh_form = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
    float two = 2.0f;
    be->gelu_erf(&two, 1);
    EXPECT_GT(std::fabs(two - tanh_form), 1e-5);
  }
}

TEST(CpuVisionOps, RopeTableRotatesPairsAndPassesTheRestThrough) {
  auto be = make_cpu_backend();
  const size_t tokens = 5;
  const int heads = 3, head_dim = 80, pairs = 39;
  auto x = randn(tokens * heads * head_dim, 7);
  auto angle = randn(tokens * pairs, 8, 3.0f);
  std::vector<float> c(angle.size()), s(angle.size());
  for (size_t i = 0; i < angle.size(); ++i) {
    c[i] = static_cast<float>(std::cos(static_cast<double>(angle[i])));
    s[i] = static_cast<float>(std::sin(static_cast<double>(angle[i])));
  }
  auto got = x;
  be->rope_table(got.data(), c.data(), s.data(), tokens, heads, head_dim, pairs);
  for (size_t t = 0; t < tokens; ++t)
    for (int h = 0; h < heads; ++h) {
      const size_t base = (t * heads + static_cast<size_t>(h)) * head_dim;
      for (int k = 0; k < pairs; ++k) {
        const double a = x[base + k], b = x[base + k + pairs], th = angle[t * pairs + static_cast<size_t>(k)];
        EXPECT_NEAR(got[base + k], a * std::cos(th) - b * std::sin(th), 1e-5);
        EXPECT_NEAR(got[base + k + pairs], b * std::cos(th) + a * std::sin(th), 1e-5);
      }
      for (int d = 2 * pairs; d < head_dim; ++d) EXPECT_EQ(got[base + d], x[base + d]);
    }
  EXPECT_THROW(be->rope_table(got.data(), c.data(), s.data(), tokens, heads, head_dim, 41), Error);
}

// Reference: each row attends to the rows of its own segment only (no mask inside), softmax in double.
std::vector<double> reference_attention(const std::vector<float>& q, const std::vector<float>& k,
                                        const std::vector<float>& v, const std::vector<int32_t>& bounds, int heads,
                                        int head_dim, double scale) {
  const size_t W = static_cast<size_t>(heads * head_dim), D = static_cast<size_t>(head_dim);
  std::vector<double> out(static_cast<size_t>(bounds.back()) * W, 0.0);
  for (size_t seg = 0; seg + 1 < bounds.size(); ++seg)
    for (int32_t i = bounds[seg]; i < bounds[seg + 1]; ++i)
      for (size_t h = 0; h < static_cast<size_t>(heads); ++h) {
        std::vector<double> p;
        double mx = -INFINITY;
        for (int32_t j = bounds[seg]; j < bounds[seg + 1]; ++j) {
          double dot = 0;
          for (size_t d = 0; d < D; ++d) dot += static_cast<double>(q[i * W + h * D + d]) * k[j * W + h * D + d];
          p.push_back(dot * scale);
          mx = std::max(mx, p.back());
        }
        double sum = 0;
        for (auto& x : p) sum += (x = std::exp(x - mx));
        for (size_t d = 0; d < D; ++d) {
          double o = 0;
          for (int32_t j = bounds[seg]; j < bounds[seg + 1]; ++j)
            o += p[static_cast<size_t>(j - bounds[seg])] * v[j * W + h * D + d];
          out[i * W + h * D + d] = o / sum;
        }
      }
  return out;
}

TEST(CpuVisionOps, SegmentAttentionMatchesReferenceOnRaggedSegments) {
  auto be = make_cpu_backend();
  struct Case {
    int heads, head_dim;
    std::vector<int32_t> bounds;
  };
  const std::vector<Case> cases = {
      {3, 80, {0, 1, 1, 38, 103}},  // one-row segment, an empty one, lengths not multiples of 16 or 4
      {4, 20, {0, 16, 80}},         // the vision fixture's head size
      {2, 33, {0, 70, 71, 200}},    // head_dim not a multiple of 16
      {1, 128, {0, 257}},
  };
  uint32_t seed = 100;
  for (const auto& c : cases) {
    const size_t n = static_cast<size_t>(c.bounds.back()) * static_cast<size_t>(c.heads * c.head_dim);
    // Scores of several units of magnitude: a peaked softmax, where a poor exp or max handling shows.
    auto q = randn(n, seed++, 1.5f), k = randn(n, seed++, 1.5f), v = randn(n, seed++);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
    const auto want = reference_attention(q, k, v, c.bounds, c.heads, c.head_dim, scale);
    for (auto isa : isas()) {
      ForcedIsa forced(isa);
      std::vector<float> out(n, -1.0f);
      be->segment_attention(q.data(), k.data(), v.data(), c.bounds, c.heads, c.head_dim, static_cast<float>(scale),
                            out.data());
      EXPECT_LT(max_rel(out, want), 1e-5) << cpu::gemm_isa_name(isa) << " heads " << c.heads << " dim " << c.head_dim;
    }
  }
}

TEST(CpuVisionOps, SegmentAttentionKeepsImagesApart) {
  // The same rows attended as one segment or as two must differ, and two segments must equal two separate calls.
  auto be = make_cpu_backend();
  const int heads = 2, dim = 16;
  const size_t W = heads * dim;
  auto q = randn(40 * W, 1), k = randn(40 * W, 2), v = randn(40 * W, 3);
  std::vector<float> split(40 * W), joint(40 * W), first(24 * W), second(16 * W);
  be->segment_attention(q.data(), k.data(), v.data(), std::vector<int32_t>{0, 24, 40}, heads, dim, 0.25f, split.data());
  be->segment_attention(q.data(), k.data(), v.data(), std::vector<int32_t>{0, 40}, heads, dim, 0.25f, joint.data());
  be->segment_attention(q.data(), k.data(), v.data(), std::vector<int32_t>{0, 24}, heads, dim, 0.25f, first.data());
  be->segment_attention(q.data() + 24 * W, k.data() + 24 * W, v.data() + 24 * W, std::vector<int32_t>{0, 16}, heads,
                        dim, 0.25f, second.data());
  EXPECT_NE(split, joint);
  EXPECT_TRUE(std::equal(first.begin(), first.end(), split.begin()));
  EXPECT_TRUE(std::equal(second.begin(), second.end(), split.begin() + 24 * W));
  EXPECT_THROW(be->segment_attention(q.data(), k.data(), v.data(), std::vector<int32_t>{0, 30, 20}, heads, dim, 1.0f,
                                     split.data()),
               Error);
  EXPECT_THROW(
      be->segment_attention(q.data(), k.data(), v.data(), std::vector<int32_t>{4, 20}, heads, dim, 1.0f, split.data()),
      Error);
}

}  // namespace
}  // namespace mxlm::backend
