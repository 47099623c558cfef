// Scheduler: continuous batching, chunked prefill, preemption, aborts and prefix caching on the `mixed` M3 fixture
// (dense + MoE layers, full + sparse attention). The reference for every output is the same prompt run alone
// through the ModelRunner with one whole-prompt prefill and greedy argmax decoding, without the scheduler.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <random>
#include <thread>

#include "backend/backend.h"
#include "engine/model_runner.h"
#include "engine/scheduler.h"
#include "mixed_fixture.h"
#include "model/m3_model.h"

namespace mxlm::engine {
namespace {

namespace fs = std::filesystem;

using testing::make_prompts;
testing::MixedFixture& fixture() { return testing::mixed_fixture(); }

// Greedy decoding of one prompt alone, straight on the runner.
std::vector<int32_t> reference(const std::vector<int32_t>& prompt, int max_tokens) {
  auto& f = fixture();
  ModelRunner runner(*f.model, cache_config_for(*f.model, static_cast<int32_t>(prompt.size()) + max_tokens));
  Sequence seq;
  seq.tokens = prompt;
  seq.num_prompt_tokens = static_cast<int32_t>(prompt.size());
  runner.admit(seq);
  std::vector<int32_t> out;
  for (int i = 0; i < max_tokens; ++i) {
    StepItem item{&seq, seq.num_uncomputed(), false};
    const auto o = runner.step({&item, 1});
    const auto row = o.row(0);
    const auto next = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
    out.push_back(next);
    seq.tokens.push_back(next);
  }
  return out;
}

GenerationRequest greedy(const std::vector<int32_t>& prompt, int max_tokens) {
  GenerationRequest r;
  r.prompt = prompt;
  r.params.temperature = 0.0f;
  r.params.max_tokens = max_tokens;
  return r;
}

struct Collected {
  std::vector<int32_t> tokens;
  FinishReason finish = FinishReason::None;
  int32_t cached = 0;
};

void collect(RequestStream& s, Collected& c, std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) {
  for (auto& e : s.wait(timeout)) {
    c.tokens.insert(c.tokens.end(), e.tokens.begin(), e.tokens.end());
    if (e.cached_prompt_tokens) c.cached = e.cached_prompt_tokens;
    if (e.finish != FinishReason::None) c.finish = e.finish;
  }
}

// Runs all requests to the end on the calling thread, submitting request i before step `arrival[i]`.
std::vector<Collected> run_all(Scheduler& s, const std::vector<GenerationRequest>& reqs,
                               std::vector<int> arrival = {}) {
  if (arrival.empty()) arrival.assign(reqs.size(), 0);
  std::vector<std::shared_ptr<RequestStream>> streams(reqs.size());
  std::vector<Collected> out(reqs.size());
  for (int step = 0;; ++step) {
    for (size_t i = 0; i < reqs.size(); ++i)
      if (arrival[i] == step) streams[i] = s.submit(reqs[i]);
    const bool worked = s.step();
    bool done = true;
    for (size_t i = 0; i < reqs.size(); ++i) {
      if (!streams[i]) {
        done = false;
        continue;
      }
      collect(*streams[i], out[i]);
      done = done && out[i].finish != FinishReason::None;
    }
    if (done) break;
    if (!worked && step > *std::max_element(arrival.begin(), arrival.end()) + 2) ADD_FAILURE() << "scheduler stalled";
    if (step > 100000) break;
  }
  return out;
}

int32_t pages_in_use(ModelRunner& r) { return r.blocks().num_pages() - r.blocks().num_available(); }

TEST(Scheduler, ContinuousBatchingWithChunkedPrefillMatchesSoloRuns) {
  auto& f = fixture();
  const auto prompts = make_prompts(10, 1);
  const int max_tokens = 6;
  ModelRunner runner(*f.model, cache_config_for(*f.model, 64, 10));
  SchedulerConfig cfg;
  cfg.max_num_seqs = 4;
  cfg.max_num_batched_tokens = 9;  // prompts of up to 32 tokens go in chunks next to decodes
  Scheduler s(runner, cfg);
  std::vector<GenerationRequest> reqs;
  std::vector<int> arrival;
  for (size_t i = 0; i < prompts.size(); ++i) {
    reqs.push_back(greedy(prompts[i], max_tokens));
    arrival.push_back(static_cast<int>(i * 3));  // new requests join running batches
  }
  const auto out = run_all(s, reqs, arrival);
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(out[i].tokens, reference(prompts[i], max_tokens)) << "request " << i;
    EXPECT_EQ(out[i].finish, FinishReason::Length);
  }
  EXPECT_EQ(pages_in_use(runner), 0);
  const auto st = s.stats();
  EXPECT_EQ(st.generation_tokens, prompts.size() * max_tokens);
  EXPECT_EQ(st.requests_finished[static_cast<size_t>(FinishReason::Length)], prompts.size());
  EXPECT_EQ(st.time_to_first_token.count, prompts.size());
}

TEST(Scheduler, MaxNumSeqsAndBudgetAreRespected) {
  auto& f = fixture();
  const auto prompts = make_prompts(6, 2);
  ModelRunner runner(*f.model, cache_config_for(*f.model, 64, 6));
  SchedulerConfig cfg;
  cfg.max_num_seqs = 2;
  cfg.max_num_batched_tokens = 5;
  Scheduler s(runner, cfg);
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const auto& p : prompts) streams.push_back(s.submit(greedy(p, 3)));
  int32_t max_running = 0;
  for (int i = 0; i < 500 && s.step(); ++i) max_running = std::max(max_running, s.stats().running);
  EXPECT_EQ(max_running, 2);
  EXPECT_EQ(s.stats().requests_finished[static_cast<size_t>(FinishReason::Length)], prompts.size());
}

TEST(Scheduler, PreemptionWhenPagesRunOutKeepsOutputs) {
  auto& f = fixture();
  const auto prompts = make_prompts(8, 3);
  const int max_tokens = 12;
  CacheConfig cache = cache_config_for(*f.model, 48, 1);  // pages for ~one long sequence: the batch must preempt
  cache.num_pages = 14;
  ModelRunner runner(*f.model, cache);
  SchedulerConfig cfg;
  cfg.max_num_seqs = 8;
  cfg.max_num_batched_tokens = 64;
  Scheduler s(runner, cfg);
  std::vector<GenerationRequest> reqs;
  for (const auto& p : prompts) reqs.push_back(greedy(p, max_tokens));
  const auto out = run_all(s, reqs);
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(out[i].tokens, reference(prompts[i], max_tokens)) << i;
  EXPECT_GT(s.stats().preemptions, 0u);
  EXPECT_EQ(pages_in_use(runner), 0);
}

TEST(Scheduler, AbortFreesPagesAtTheNextStep) {
  auto& f = fixture();
  const auto prompts = make_prompts(4, 4);
  ModelRunner runner(*f.model, cache_config_for(*f.model, 64, 4));
  Scheduler s(runner, SchedulerConfig{});
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const auto& p : prompts) streams.push_back(s.submit(greedy(p, 40)));
  for (int i = 0; i < 3; ++i) s.step();
  const int32_t before = pages_in_use(runner);
  EXPECT_GT(before, 0);
  streams[0]->cancel();
  streams[2]->cancel();
  s.step();
  Collected c0, c1;
  collect(*streams[0], c0);
  collect(*streams[1], c1);
  EXPECT_EQ(c0.finish, FinishReason::Abort);
  EXPECT_EQ(c1.finish, FinishReason::None);
  EXPECT_EQ(s.stats().running, 2);
  streams[1]->cancel();
  streams[3]->cancel();
  s.step();
  EXPECT_EQ(pages_in_use(runner), 0);
  EXPECT_EQ(s.stats().requests_finished[static_cast<size_t>(FinishReason::Abort)], 4u);
}

TEST(Scheduler, PrefixCacheReusesSharedPromptBlocks) {
  auto& f = fixture();
  auto prompt = make_prompts(1, 5)[0];
  while (prompt.size() < 30) prompt.push_back(7);
  ModelRunner runner(*f.model, cache_config_for(*f.model, 64, 2));
  Scheduler s(runner, SchedulerConfig{});
  const auto first = run_all(s, {greedy(prompt, 5)});
  const auto second = run_all(s, {greedy(prompt, 5)});
  const auto ref = reference(prompt, 5);
  EXPECT_EQ(first[0].tokens, ref);
  EXPECT_EQ(second[0].tokens, ref);
  EXPECT_EQ(first[0].cached, 0);
  EXPECT_GE(second[0].cached, 24);  // whole blocks of 4 tokens
  EXPECT_GT(s.stats().cached_prompt_tokens, 0u);
}

TEST(Scheduler, StopTokensAndScriptedTokens) {
  auto& f = fixture();
  const auto prompt = make_prompts(1, 6)[0];
  const auto ref = reference(prompt, 5);
  ModelRunner runner(*f.model, cache_config_for(*f.model, 64, 2));
  Scheduler s(runner, SchedulerConfig{});
  auto r = greedy(prompt, 20);
  r.params.stop_token_ids = {ref[2]};
  auto out = run_all(s, {r});
  const auto first_stop = std::find(ref.begin(), ref.end(), ref[2]) - ref.begin();
  EXPECT_EQ(out[0].tokens, std::vector<int32_t>(ref.begin(), ref.begin() + first_stop + 1));
  EXPECT_EQ(out[0].finish, FinishReason::Stop);

  auto scripted = greedy(prompt, 20);
  scripted.scripted = {5, 6, 7};
  out = run_all(s, {scripted});
  EXPECT_EQ(out[0].tokens, (std::vector<int32_t>{5, 6, 7}));
  EXPECT_EQ(out[0].finish, FinishReason::Stop);
}

TEST(Scheduler, ConstraintForcesTokensThenDecodingIsTheModels) {
  auto& f = fixture();
  const auto prompt = make_prompts(1, 8)[0];
  const std::vector<int32_t> forced = {11, 22, 33};
  auto extended = prompt;
  extended.insert(extended.end(), forced.begin(), forced.end());
  const auto ref = reference(extended, 4);  // greedy continuation once the forced tokens are in
  ModelRunner runner(*f.model, cache_config_for(*f.model, 64, 4));
  Scheduler s(runner, SchedulerConfig{});
  auto r = greedy(prompt, 7);
  r.constraint =
      std::make_shared<const ToolChoiceConstraint>(std::vector<int32_t>{}, forced, std::vector<std::string>{}, nullptr);
  auto plain = greedy(prompt, 7);
  const auto out = run_all(s, {r, r, plain});
  auto expected = forced;
  expected.insert(expected.end(), ref.begin(), ref.end());
  EXPECT_EQ(out[0].tokens, expected);
  EXPECT_EQ(out[1].tokens, expected);
  EXPECT_NE(std::vector<int32_t>(out[2].tokens.begin(), out[2].tokens.begin() + 3), forced);
  EXPECT_EQ(out[0].finish, FinishReason::Length);
}

TEST(Scheduler, RejectsWhatCanNeverRunAndBoundsTheQueue) {
  auto& f = fixture();
  ModelRunner runner(*f.model, cache_config_for(*f.model, 32, 1));
  SchedulerConfig cfg;
  cfg.max_model_len = 32;
  cfg.max_waiting = 2;
  Scheduler s(runner, cfg);
  EXPECT_THROW(s.submit(greedy(std::vector<int32_t>(30, 5), 8)), Error);  // beyond max_model_len
  EXPECT_THROW(s.submit(greedy({}, 8)), Error);
  EXPECT_THROW(s.submit(greedy({5, 9999}, 8)), Error);  // outside the vocabulary
  s.submit(greedy({5, 6}, 4));
  s.submit(greedy({5, 6}, 4));
  EXPECT_THROW(s.submit(greedy({5, 6}, 4)), QueueFull);
  EXPECT_EQ(s.stats().requests_rejected, 1u);
}

TEST(Scheduler, EngineThreadServesConcurrentSubmitters) {
  auto& f = fixture();
  const auto prompts = make_prompts(12, 7);
  ModelRunner runner(*f.model, cache_config_for(*f.model, 64, 12));
  SchedulerConfig cfg;
  cfg.max_num_batched_tokens = 16;
  Scheduler s(runner, cfg);
  s.start();
  std::vector<Collected> out(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i)
    threads.emplace_back([&, i] {
      auto stream = s.submit(greedy(prompts[i], 5));
      while (out[i].finish == FinishReason::None) collect(*stream, out[i], std::chrono::milliseconds(50));
    });
  for (auto& t : threads) t.join();
  s.stop();
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(out[i].tokens, reference(prompts[i], 5)) << i;
  EXPECT_EQ(pages_in_use(runner), 0);
}

TEST(Scheduler, StopAbortsEverythingInFlight) {
  auto& f = fixture();
  ModelRunner runner(*f.model, cache_config_for(*f.model, 64, 2));
  Scheduler s(runner, SchedulerConfig{});
  auto a = s.submit(greedy({5, 6, 7}, 50));
  s.step();
  auto b = s.submit(greedy({8, 9}, 50));
  s.stop();
  Collected ca, cb;
  collect(*a, ca);
  collect(*b, cb);
  EXPECT_EQ(ca.finish, FinishReason::Abort);
  EXPECT_EQ(cb.finish, FinishReason::Abort);
  EXPECT_EQ(pages_in_use(runner), 0);
  EXPECT_THROW(s.submit(greedy({5}, 2)), Error);
}

}  // namespace
}  // namespace mxlm::engine
