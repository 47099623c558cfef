// A generation request as the scheduler sees it, and the thread-safe channel through which the engine thread
// hands its tokens to whoever submitted it (an HTTP handler, a benchmark, a test). The engine never blocks on
// a consumer: it only appends events; the consumer cancels the stream to abort (client gone, stop string hit).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "engine/constraint.h"
#include "engine/sampler.h"
#include "engine/sequence.h"

namespace mxlm::engine {

enum class FinishReason { None, Stop, Length, Abort, Error };
const char* finish_reason_name(FinishReason reason);

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;  // the most likely tokens, best first
};

struct GenerationRequest {
  std::vector<int32_t> prompt;
  SamplingParams params;      // stop_token_ids end the generation (the stop token is reported, not hidden)
  int32_t top_logprobs = -1;  // -1: no logprobs; n >= 0: the sampled token's logprob and the n best
  // Testing aid (mxlm serve --scripted-output): these tokens replace sampling, then the request stops. The
  // model still runs every step, so scheduling, paging and timing are those of a real generation.
  std::vector<int32_t> scripted;
  // Masks the logits before sampling (guaranteed tool calls); null: unconstrained. Logprobs stay the model's.
  std::shared_ptr<const ToolChoiceConstraint> constraint;
  // Images of the prompt (sorted, disjoint runs of image tokens); the engine encodes them when a step first
  // needs their rows. Needs a runner with a vision tower.
  std::vector<ImageSpan> images;
};

struct RequestEvent {
  std::vector<int32_t> tokens;         // newly generated tokens, in order
  std::vector<TokenLogprob> logprobs;  // one per token when requested
  FinishReason finish = FinishReason::None;
  bool stopped_by_token = false;     // the last token is a stop token (not part of the visible text)
  int32_t cached_prompt_tokens = 0;  // on the first event: prompt tokens reused from the prefix cache
  std::string error;
};

class RequestStream {
 public:
  // Engine side.
  void push(RequestEvent event);
  // Consumer side: waits up to `timeout` for events and returns all pending ones (empty on timeout).
  std::vector<RequestEvent> wait(std::chrono::milliseconds timeout);
  // Consumer side: asks the engine to stop this request; it frees its pages at the start of its next step and
  // answers with a final Abort event.
  void cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<RequestEvent> events_;
  std::atomic<bool> cancelled_{false};
};

}  // namespace mxlm::engine
