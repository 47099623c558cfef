// The M3 forward pass against transformers 5.17 reference logits (tests/fixtures/m3, tools/gen_m3_fixtures.py):
// whole-sequence prefill, token-by-token decode through the paged cache, and several sequences in one batch.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "engine/model_runner.h"
#include "engine/npy.h"
#include "model/m3_model.h"

namespace mxlm {
namespace {

namespace fs = std::filesystem;

fs::path fixture_dir(const std::string& name) { return fs::path(MXLM_SOURCE_DIR) / "tests/fixtures/m3" / name; }

struct Reference {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<engine::NpyArray> logits;
};

Reference load_reference(const std::string& name) {
  Reference r;
  std::ifstream f(fixture_dir(name) / "reference.json");
  const auto j = nlohmann::json::parse(f);
  for (const auto& seq : j.at("tokens")) r.tokens.push_back(seq.get<std::vector<int32_t>>());
  for (size_t i = 0; i < r.tokens.size(); ++i)
    r.logits.push_back(engine::read_npy_f32(fixture_dir(name) / ("logits_" + std::to_string(i) + ".npy")));
  return r;
}

// Max |a - b| over max |b|: the error relative to the logits' scale.
double relative_error(std::span<const float> got, std::span<const float> want) {
  double err = 0.0, scale = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, static_cast<double>(std::fabs(got[i] - want[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(want[i])));
  }
  return err / scale;
}

struct Harness {
  std::unique_ptr<backend::Backend> backend = backend::make_cpu_backend();
  std::unique_ptr<model::M3Model> model;
  std::unique_ptr<engine::ModelRunner> runner;

  explicit Harness(const std::string& name, model::ModelOptions options = {}, int32_t pages = 64) {
    model = model::load_m3_model(fixture_dir(name), *backend, options);
    engine::CacheConfig cc;
    cc.block_size = model->has_sparse_layers() ? model->text().sparse.block_size : 4;
    cc.num_pages = pages;
    cc.prefix_caching = false;
    runner = std::make_unique<engine::ModelRunner>(*model, cc);
  }

  // Logits of every position of `tokens`, run in chunks of `chunk` tokens (0: all at once).
  std::vector<float> run(const std::vector<int32_t>& tokens, int32_t chunk = 0) {
    engine::Sequence seq;
    seq.tokens = tokens;
    runner->admit(seq);
    std::vector<float> all;
    while (seq.num_uncomputed() > 0) {
      const int32_t n = chunk > 0 ? std::min(chunk, seq.num_uncomputed()) : seq.num_uncomputed();
      engine::StepItem item{&seq, n, true};
      auto out = runner->step({&item, 1});
      all.insert(all.end(), out.logits.begin(), out.logits.end());
    }
    runner->release(seq);
    return all;
  }
};

class M3Fixture : public ::testing::TestWithParam<std::string> {};

TEST_P(M3Fixture, PrefillMatchesTransformers) {
  const auto ref = load_reference(GetParam());
  Harness h(GetParam());
  for (size_t i = 0; i < ref.tokens.size(); ++i) {
    const auto got = h.run(ref.tokens[i]);
    ASSERT_EQ(got.size(), ref.logits[i].data.size());
    const double err = relative_error(got, ref.logits[i].data);
    std::printf("[%s] sequence %zu (%zu tokens): prefill max|diff| / max|logit| = %.3g\n", GetParam().c_str(), i,
                ref.tokens[i].size(), err);
    EXPECT_LE(err, 1e-4);
  }
}

TEST_P(M3Fixture, TokenByTokenDecodeMatchesTransformers) {
  const auto ref = load_reference(GetParam());
  Harness h(GetParam());
  const auto got = h.run(ref.tokens[0], 1);
  const double err = relative_error(got, ref.logits[0].data);
  std::printf("[%s] decode max|diff| / max|logit| = %.3g\n", GetParam().c_str(), err);
  EXPECT_LE(err, 1e-4);
  // Chunked prefill (chunks not aligned to pages) goes through the same cache.
  const auto chunked = h.run(ref.tokens[0], 5);
  EXPECT_LE(relative_error(chunked, ref.logits[0].data), 1e-4);
}

TEST_P(M3Fixture, BatchedSequencesMatchSingleOnes) {
  const auto ref = load_reference(GetParam());
  Harness h(GetParam());
  // Sequence A is prefilled up to its last 3 tokens, then decoded while sequence B prefills in the same steps.
  engine::Sequence a, b;
  a.id = 1;
  a.tokens = ref.tokens[0];
  b.id = 2;
  b.tokens = ref.tokens[1];
  h.runner->admit(a);
  h.runner->admit(b);
  const int32_t na = static_cast<int32_t>(a.tokens.size()), nb = static_cast<int32_t>(b.tokens.size());
  std::vector<float> got_a, got_b;
  {
    engine::StepItem item{&a, na - 3, true};
    auto out = h.runner->step({&item, 1});
    got_a = out.logits;
  }
  const int32_t b_chunk = (nb + 2) / 3;
  for (int step = 0; step < 3; ++step) {
    std::vector<engine::StepItem> items;
    items.push_back({&b, std::min(b_chunk, b.num_uncomputed()), true});
    items.push_back({&a, 1, true});
    if (items[0].num_tokens == 0) items.erase(items.begin());
    auto out = h.runner->step(items);
    const size_t ia = items.size() - 1;
    auto ra = out.row(ia);
    got_a.insert(got_a.end(), ra.begin(), ra.end());
    if (items.size() == 2)
      got_b.insert(got_b.end(), out.logits.begin(), out.logits.begin() + out.num_rows[0] * out.vocab);
  }
  while (b.num_uncomputed() > 0) {
    engine::StepItem item{&b, b.num_uncomputed(), true};
    auto out = h.runner->step({&item, 1});
    got_b.insert(got_b.end(), out.logits.begin(), out.logits.end());
  }
  EXPECT_LE(relative_error(got_a, ref.logits[0].data), 1e-4);
  EXPECT_LE(relative_error(got_b, ref.logits[1].data), 1e-4);
  // Same math as running each alone.
  const auto single_a = h.run(ref.tokens[0]);
  EXPECT_LE(relative_error(got_a, single_a), 1e-5);
}

TEST_P(M3Fixture, PrefixCacheReuseGivesTheSameLogits) {
  const auto ref = load_reference(GetParam());
  auto be = backend::make_cpu_backend();
  auto model = model::load_m3_model(fixture_dir(GetParam()), *be);
  engine::CacheConfig cc = engine::cache_config_for(*model, 128, 3, 4);
  cc.prefix_caching = true;
  engine::ModelRunner runner(*model, cc);
  const auto& toks = ref.tokens[0];
  const int32_t n = static_cast<int32_t>(toks.size());
  const int32_t vocab = model->vocab_size();
  // A first request computes the whole sequence; its full pages enter the prefix cache.
  engine::Sequence a;
  a.tokens = toks;
  runner.admit(a);
  ASSERT_EQ(a.num_computed, 0);
  engine::StepItem ia{&a, n, false};
  runner.step({&ia, 1});
  runner.release(a);
  // A second request with the same tokens reuses every full page but the one holding the last token, and
  // computes only the rest: its logits must match the reference at those positions.
  engine::Sequence b;
  b.tokens = toks;
  runner.admit(b);
  const int32_t bs = cc.block_size;
  EXPECT_EQ(b.num_computed, (n - 1) / bs * bs);
  EXPECT_GT(b.num_computed, 0);
  const int32_t start = b.num_computed;
  engine::StepItem ib{&b, b.num_uncomputed(), true};
  const auto out = runner.step({&ib, 1});
  const std::span<const float> want(ref.logits[0].data.data() + static_cast<size_t>(start) * static_cast<size_t>(vocab),
                                    static_cast<size_t>(n - start) * static_cast<size_t>(vocab));
  EXPECT_LE(relative_error(out.logits, want), 1e-4);
  EXPECT_GT(runner.blocks().cache_hits(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, M3Fixture, ::testing::Values("dense", "mixed", "moe16", "mixed_mxfp4"));

}  // namespace
}  // namespace mxlm
