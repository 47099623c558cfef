// engine::TpRanks with CPU ranks (the same driver runs NCCL ranks on GPUs): rank 0's ModelRunner, driven as at
// TP = 1, runs batched steps of two sequences with prefix caching on both ranks and must give the transformers
// reference logits; a rank's load error reaches the caller of attach(); a rank that fails in the middle of a step
// makes rank 0's step fail with its reason instead of leaving rank 0 waiting in a collective forever.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>

#include "backend/cpu/cpu_tp_group.h"
#include "core/error.h"
#include "engine/model_runner.h"
#include "engine/npy.h"
#include "engine/tp_ranks.h"
#include "model/m3_model.h"

namespace mxlm::engine {
namespace {

namespace fs = std::filesystem;

fs::path fixture(const std::string& name) { return fs::path(MXLM_SOURCE_DIR) / "tests/fixtures/m3" / name; }

double rel_err(std::span<const float> got, std::span<const float> want) {
  double e = 0, s = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    e = std::max(e, std::fabs(static_cast<double>(got[i]) - want[i]));
    s = std::max(s, std::fabs(static_cast<double>(want[i])));
  }
  return e / s;
}

// Loads rank `rank` of `tp` of a fixture model.
auto rank_loader(const std::string& name, int tp) {
  return [name, tp](backend::Backend& be, int rank) {
    model::ModelOptions o;
    o.tp = {rank, tp};
    return model::load_m3_model(fixture(name), be, o);
  };
}

struct CpuRanks {
  explicit CpuRanks(int size) : all(backend::cpu::make_cpu_tp_backends(size)) {}
  std::vector<std::unique_ptr<backend::Backend>> all;
  TpRanks::MakeBackend make() {
    return [this](int r) { return std::move(all[static_cast<size_t>(r)]); };
  }
};

TEST(TpRanks, BatchedStepsWithPrefixCachingMatchTheReference) {
  const std::string name = "mixed";  // sparse + dense layers, MoE, 2 KV heads
  std::ifstream f(fixture(name) / "reference.json");
  const auto tokens = nlohmann::json::parse(f).at("tokens").at(0).get<std::vector<int32_t>>();
  const auto ref = read_npy_f32(fixture(name) / "logits_0.npy");
  const int vocab = static_cast<int>(ref.shape.at(1));
  const int tp = 2;
  CpuRanks cpu(tp);
  const auto load = rank_loader(name, tp);
  TpRanks ranks(tp, cpu.make(), load);
  auto be0 = cpu.make()(0);
  auto m0 = load(*be0, 0);
  CacheConfig cc = cache_config_for(*m0, static_cast<int32_t>(tokens.size()), 3);
  ModelRunner runner(*m0, cc);
  ranks.attach(runner);

  // a: the whole prompt in two prefill chunks, then its last token decoded. b: the same prompt later, so its
  // leading full blocks come from the prefix cache (computed by a's steps on every rank).
  const int32_t n = static_cast<int32_t>(tokens.size());
  Sequence a, b;
  a.id = 1;
  a.tokens.assign(tokens.begin(), tokens.end() - 1);
  runner.admit(a);
  StepItem first{&a, n / 2, false};
  runner.step({&first, 1});
  StepItem rest{&a, a.num_uncomputed(), false};
  runner.step({&rest, 1});
  a.tokens.push_back(tokens.back());
  b.id = 2;
  b.tokens = tokens;
  runner.admit(b);
  EXPECT_GT(b.num_computed, 0) << "no prefix-cache hit";
  const int32_t b_first = b.num_computed;
  StepItem both[2] = {{&a, 1, true}, {&b, b.num_uncomputed(), true}};
  const auto out = runner.step(both);
  const auto ref_row = [&](int pos) {
    return std::span<const float>(ref.data).subspan(static_cast<size_t>(pos) * vocab, vocab);
  };
  EXPECT_LE(rel_err(out.row(0), ref_row(n - 1)), 1e-4);
  for (int32_t i = 0; i < out.num_rows[1]; ++i)
    EXPECT_LE(rel_err(out.row(1, i), ref_row(b_first + i)), 1e-4) << "position " << b_first + i;
}

TEST(TpRanks, LoadErrorsReachAttach) {
  CpuRanks cpu(2);
  TpRanks ranks(2, cpu.make(), [](backend::Backend&, int rank) -> std::unique_ptr<model::M3Model> {
    fail("rank {} cannot load", rank);
  });
  auto be0 = cpu.make()(0);
  model::ModelOptions o;
  o.tp = {0, 2};
  auto m0 = model::load_m3_model(fixture("dense"), *be0, o);
  ModelRunner runner(*m0, cache_config_for(*m0, 8));
  try {
    ranks.attach(runner);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank 1 cannot load"), std::string::npos) << e.what();
  }
}

TEST(TpRanks, ARankFailingMidStepAbortsTheGroupInsteadOfHanging) {
  const std::string name = "mixed";
  const int tp = 2;
  CpuRanks cpu(tp);
  const auto load = rank_loader(name, tp);
  ::setenv("MXLM_TP_INJECT_FAILURE", "1:1", 1);  // rank 1 fails its second forward, before its first collective
  TpRanks ranks(tp, cpu.make(), load);
  ::unsetenv("MXLM_TP_INJECT_FAILURE");
  auto be0 = cpu.make()(0);
  auto m0 = load(*be0, 0);
  ModelRunner runner(*m0, cache_config_for(*m0, 64, 1));
  ranks.attach(runner);
  Sequence a;
  a.id = 1;
  a.tokens = {1, 2, 3, 4, 5, 6, 7, 8};
  runner.admit(a);
  StepItem first{&a, 4, false};
  runner.step({&first, 1});  // forward 0: both ranks
  // Forward 1: rank 0 would wait for rank 1 in the first all-reduce forever without the abort; run it on a thread
  // so that a regression fails the test instead of hanging it.
  auto step = std::async(std::launch::async, [&] {
    StepItem rest{&a, 4, false};
    try {
      runner.step({&rest, 1});
      return std::string("no error");
    } catch (const Error& e) {
      return std::string(e.what());
    }
  });
  ASSERT_EQ(step.wait_for(std::chrono::seconds(60)), std::future_status::ready) << "rank 0 hangs";
  const std::string err = step.get();
  EXPECT_NE(err.find("injected failure of rank 1"), std::string::npos) << err;
  EXPECT_EQ(a.num_computed, 4) << "a failed step must not advance the sequence";
  // The group is unusable from now on: the next step fails at once, naming the original failure.
  try {
    StepItem again{&a, 4, false};
    runner.step({&again, 1});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("aborted"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mxlm::engine
