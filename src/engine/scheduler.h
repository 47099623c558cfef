// Continuous batching over the ModelRunner. One engine thread runs steps; other threads submit requests and read
// their tokens through RequestStreams. Each step:
//   1. drops cancelled requests (their pages go back at once),
//   2. gives every running sequence its next tokens (one decode token, or the next prefill chunk) within the
//      --max-num-batched-tokens budget, preempting the newest running sequences (pages released, recomputed later,
//      mostly from the prefix cache) when the KV cache runs out,
//   3. admits waiting requests while there is budget, room under --max-num-seqs and pages (prefix-cache hits
//      first), so new requests join a running batch and a long prompt is prefilled in chunks between decodes,
//   4. runs the batch and samples the sequences whose tokens are all computed.
// A request's tokens do not depend on what else is in the batch: every row of the model's math is computed
// independently of the other rows (batch-invariant GEMMs, per-sequence attention), and sampling uses the
// request's own RNG.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/error.h"
#include "engine/model_runner.h"
#include "engine/request.h"

namespace mxlm::engine {

struct SchedulerConfig {
  int32_t max_num_seqs = 256;
  int32_t max_num_batched_tokens = 2048;
  int32_t max_model_len = 4096;
  int32_t max_waiting = 1024;  // requests queued beyond the running batch; more are refused (QueueFull)
};

// Thrown by submit() when the waiting queue is full (the server answers 503).
class QueueFull : public Error {
 public:
  using Error::Error;
};

// Cumulative histogram with fixed bucket bounds (seconds), Prometheus style.
struct Histogram {
  static constexpr std::array<double, 14> kBounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                     0.25,  0.5,    1.0,   2.5,  5.0,   10.0, 30.0};
  std::array<uint64_t, kBounds.size()> buckets{};  // counts of observations <= bound (not cumulative)
  uint64_t count = 0;
  double sum = 0.0;
  void observe(double seconds);
};

struct SchedulerStats {
  int32_t running = 0;
  int32_t waiting = 0;
  int32_t pages_total = 0;
  int32_t pages_used = 0;  // held by running sequences (cached-but-unreferenced pages count as free)
  uint64_t requests_submitted = 0;
  uint64_t requests_rejected = 0;
  std::array<uint64_t, 5> requests_finished{};  // by FinishReason
  uint64_t prompt_tokens = 0;                   // computed prompt tokens (not prefix-cache hits)
  uint64_t cached_prompt_tokens = 0;            // prompt tokens reused from the prefix cache
  uint64_t generation_tokens = 0;
  uint64_t preemptions = 0;
  uint64_t steps = 0;
  Histogram time_to_first_token;
  Histogram inter_token_latency;
  Histogram request_latency;
};

class Scheduler {
 public:
  Scheduler(ModelRunner& runner, SchedulerConfig config);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Starts the engine thread. Without it, call step() yourself (tests, offline batches).
  void start();
  // Aborts every request (final Abort events) and joins the engine thread.
  void stop();

  // Queues a request. Errors: QueueFull when max_waiting requests wait already; Error when the request can
  // never run (longer than max_model_len, more pages than the whole cache, bad sampling parameters).
  std::shared_ptr<RequestStream> submit(GenerationRequest request);

  // Runs one step on the calling thread; false when there was nothing to do.
  bool step();
  SchedulerStats stats() const;
  const SchedulerConfig& config() const { return config_; }
  ModelRunner& runner() { return runner_; }

 private:
  struct Active;
  void drain_incoming();
  void finish(Active& a, FinishReason reason, const std::string& error = {});
  void preempt(Active& a);
  void run_loop();

  ModelRunner& runner_;
  SchedulerConfig config_;
  int64_t next_id_ = 1;

  // Submitted requests not yet seen by the engine thread.
  mutable std::mutex incoming_mutex_;
  std::condition_variable incoming_cv_;
  std::vector<std::unique_ptr<Active>> incoming_;
  std::atomic<int32_t> num_waiting_{0};  // incoming + waiting, for the bound

  // Engine-thread state.
  std::deque<std::unique_ptr<Active>> waiting_;
  std::list<std::unique_ptr<Active>> running_;  // admission order; the newest is preempted first

  mutable std::mutex stats_mutex_;
  SchedulerStats stats_;

  std::thread thread_;
  std::atomic<bool> stopping_{false};
};

}  // namespace mxlm::engine
