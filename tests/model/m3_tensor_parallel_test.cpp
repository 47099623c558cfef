// The tensor-parallel sharding rules, run as TP = 2 and TP = 4 groups of CPU ranks (threads): every rank's logits
// must match the transformers reference, including KV/index heads replicated when TP exceeds their count.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <thread>

#include "backend/cpu/cpu_tp_group.h"
#include "core/error.h"
#include "engine/model_runner.h"
#include "engine/npy.h"
#include "model/m3_model.h"

namespace mxlm {
namespace {

namespace fs = std::filesystem;

fs::path fixture_dir(const std::string& name) { return fs::path(MXLM_SOURCE_DIR) / "tests/fixtures/m3" / name; }

class TensorParallel : public ::testing::TestWithParam<int> {};

TEST_P(TensorParallel, EveryRankMatchesTheReference) {
  const int tp = GetParam();
  const std::string name = "mixed";  // 4 heads, 2 KV heads: TP 4 replicates KV and index heads
  std::ifstream f(fixture_dir(name) / "reference.json");
  const auto tokens = nlohmann::json::parse(f).at("tokens").at(0).get<std::vector<int32_t>>();
  const auto ref = engine::read_npy_f32(fixture_dir(name) / "logits_0.npy");
  const io::ModelConfig config = io::load_model_config(fixture_dir(name));
  const io::Checkpoint checkpoint(fixture_dir(name));
  auto backends = backend::cpu::make_cpu_tp_backends(tp);
  std::vector<std::vector<float>> logits(static_cast<size_t>(tp));
  std::vector<std::string> errors(static_cast<size_t>(tp));
  std::vector<std::thread> ranks;
  for (int r = 0; r < tp; ++r)
    ranks.emplace_back([&, r] {
      try {
        model::ModelOptions o;
        o.tp = {r, tp};
        model::M3Model m(config, checkpoint, *backends[static_cast<size_t>(r)], o);
        engine::ModelRunner runner(m, engine::cache_config_for(m, static_cast<int32_t>(tokens.size())));
        engine::Sequence s;
        s.tokens = tokens;
        runner.admit(s);
        // Prefill all but 2 tokens, then decode them: both paths go through the collectives.
        engine::StepItem a{&s, static_cast<int32_t>(tokens.size()) - 2, true};
        logits[static_cast<size_t>(r)] = runner.step({&a, 1}).logits;
        for (int i = 0; i < 2; ++i) {
          engine::StepItem d{&s, 1, true};
          const auto out = runner.step({&d, 1}).logits;
          logits[static_cast<size_t>(r)].insert(logits[static_cast<size_t>(r)].end(), out.begin(), out.end());
        }
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : ranks) t.join();
  for (int r = 0; r < tp; ++r) {
    ASSERT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
    ASSERT_EQ(logits[static_cast<size_t>(r)].size(), ref.data.size());
    double err = 0, scale = 0;
    for (size_t i = 0; i < ref.data.size(); ++i) {
      err = std::max(err, static_cast<double>(std::fabs(logits[static_cast<size_t>(r)][i] - ref.data[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(ref.data[i])));
    }
    std::printf("TP %d rank %d: max|diff| / max|logit| = %.3g\n", tp, r, err / scale);
    EXPECT_LE(err / scale, 1e-4);
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, TensorParallel, ::testing::Values(2, 4));

TEST(TensorParallelRules, UnsplittableShapesAreClearErrors) {
  // mixed_mxfp4's shared expert has 32 intermediate rows: at TP 2 its MXFP4 down_proj would split 16 columns,
  // which is not a whole number of 32-element scale blocks.
  const io::ModelConfig config = io::load_model_config(fixture_dir("mixed_mxfp4"));
  const io::Checkpoint checkpoint(fixture_dir("mixed_mxfp4"));
  auto backends = backend::cpu::make_cpu_tp_backends(2);
  model::ModelOptions o;
  o.tp = {0, 2};
  try {
    model::M3Model m(config, checkpoint, *backends[0], o);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot be split at column"), std::string::npos) << e.what();
  }
  // 4 attention heads over 3 ranks.
  auto three = backend::cpu::make_cpu_tp_backends(3);
  o.tp = {0, 3};
  EXPECT_THROW(
      model::M3Model(io::load_model_config(fixture_dir("mixed")), io::Checkpoint(fixture_dir("mixed")), *three[0], o),
      Error);
}

}  // namespace
}  // namespace mxlm
