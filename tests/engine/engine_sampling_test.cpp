// Sampling in the scheduler on the `mixed` M3 fixture: a step samples on the backend (Backend::sample_rows, only
// token ids come back) unless a row needs its logits on the host (logprobs, penalties, a constraint). Both paths must
// give the same tokens: checked against a solo run on the ModelRunner that draws each token with the reference
// backend::sample_row (counter = the request's n-th token), with batches that sample on the device, on the host and
// mixed, plus determinism per seed.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "backend/backend.h"
#include "backend/sampling.h"
#include "engine/model_runner.h"
#include "engine/scheduler.h"
#include "mixed_fixture.h"
#include "model/m3_model.h"

namespace mxlm::engine {
namespace {

namespace fs = std::filesystem;

using testing::make_prompts;
testing::MixedFixture& fixture() { return testing::mixed_fixture(); }

GenerationRequest sampled(const std::vector<int32_t>& prompt, uint64_t seed, int max_tokens) {
  GenerationRequest r;
  r.prompt = prompt;
  r.params.temperature = 1.3f;  // the fixture's logits are flat-ish: draws differ between seeds
  r.params.top_k = 40;
  r.params.top_p = 0.9f;
  r.params.seed = seed;
  r.params.max_tokens = max_tokens;
  return r;
}

// The request alone on the runner, each token drawn with the reference sampler (penalties through Sampler).
std::vector<int32_t> reference(const GenerationRequest& req) {
  auto& f = fixture();
  const auto n = static_cast<int32_t>(req.prompt.size());
  ModelRunner runner(*f.model, cache_config_for(*f.model, n + req.params.max_tokens));
  Sequence seq;
  seq.tokens = req.prompt;
  seq.num_prompt_tokens = n;
  runner.admit(seq);
  Sampler penalised(req.params);
  std::vector<int32_t> out;
  for (int i = 0; i < req.params.max_tokens; ++i) {
    StepItem item{&seq, seq.num_uncomputed(), false};
    const auto o = runner.step({&item, 1});
    backend::SampleParams p;
    p.temperature = req.params.temperature;
    p.top_k = req.params.top_k;
    p.top_p = req.params.top_p;
    p.min_p = req.params.min_p;
    p.seed = *req.params.seed;
    p.counter = static_cast<uint64_t>(i);
    const std::span<const int32_t> prompt(seq.tokens.data(), static_cast<size_t>(n));
    const std::span<const int32_t> output(seq.tokens.data() + n, seq.tokens.size() - static_cast<size_t>(n));
    const int32_t next =
        penalised.needs_token_history() ? penalised.sample(o.row(0), prompt, output) : backend::sample_row(o.row(0), p);
    out.push_back(next);
    seq.tokens.push_back(next);
  }
  return out;
}

std::vector<std::vector<int32_t>> run_all(const std::vector<GenerationRequest>& reqs, int max_num_seqs = 4) {
  auto& f = fixture();
  ModelRunner runner(*f.model, cache_config_for(*f.model, 64, static_cast<int32_t>(reqs.size())));
  SchedulerConfig cfg;
  cfg.max_num_seqs = max_num_seqs;
  cfg.max_num_batched_tokens = 20;
  Scheduler s(runner, cfg);
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const auto& r : reqs) streams.push_back(s.submit(r));
  std::vector<std::vector<int32_t>> out(reqs.size());
  std::vector<bool> done(reqs.size(), false);
  for (int step = 0; step < 10000 && std::find(done.begin(), done.end(), false) != done.end(); ++step) {
    s.step();
    for (size_t i = 0; i < reqs.size(); ++i)
      for (auto& e : streams[i]->wait(std::chrono::milliseconds(0))) {
        out[i].insert(out[i].end(), e.tokens.begin(), e.tokens.end());
        EXPECT_TRUE(e.error.empty()) << e.error;
        if (e.finish != FinishReason::None) done[i] = true;
      }
  }
  return out;
}

TEST(EngineSampling, DeviceHostAndMixedBatchesDrawTheReferenceTokens) {
  const auto prompts = make_prompts(6, 11);
  const int max_tokens = 7;
  std::vector<GenerationRequest> device, host, mixed;
  for (size_t i = 0; i < prompts.size(); ++i) {
    device.push_back(sampled(prompts[i], 500 + i, max_tokens));
    host.push_back(device.back());
    host.back().top_logprobs = 0;  // logprobs need the logits: the whole step goes to the host
    mixed.push_back(i % 2 ? host.back() : device.back());
  }
  const auto d = run_all(device);
  const auto h = run_all(host);
  const auto m = run_all(mixed);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto want = reference(device[i]);
    EXPECT_EQ(d[i], want) << "request " << i << " sampled on the device";
    EXPECT_EQ(h[i], want) << "request " << i << " sampled on the host";
    EXPECT_EQ(m[i], want) << "request " << i << " in mixed batches";
  }
  EXPECT_EQ(run_all(device, 2), d);  // other batches, same tokens
}

TEST(EngineSampling, SameSeedSameTokensOtherSeedOthers) {
  const auto prompts = make_prompts(4, 12);
  std::vector<GenerationRequest> a, b;
  for (size_t i = 0; i < prompts.size(); ++i) {
    a.push_back(sampled(prompts[i], 7, 10));
    b.push_back(sampled(prompts[i], 8, 10));
  }
  const auto ra = run_all(a);
  EXPECT_EQ(run_all(a), ra);
  EXPECT_NE(run_all(b), ra);
}

TEST(EngineSampling, PenalisedRequestsSampleOnTheHostNextToDeviceOnes) {
  const auto prompts = make_prompts(4, 13);
  std::vector<GenerationRequest> reqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    reqs.push_back(sampled(prompts[i], 900 + i, 6));
    if (i % 2) {
      reqs.back().params.repetition_penalty = 1.5f;
      reqs.back().params.frequency_penalty = 0.3f;
    }
  }
  const auto out = run_all(reqs);
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(out[i], reference(reqs[i])) << "request " << i;
}

}  // namespace
}  // namespace mxlm::engine
