#include "engine/scheduler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/log.h"

namespace mxlm::engine {

using Clock = std::chrono::steady_clock;

void Histogram::observe(double seconds) {
  for (size_t i = 0; i < kBounds.size(); ++i) {
    if (seconds <= kBounds[i]) {
      ++buckets[i];
      break;
    }
  }
  ++count;
  sum += seconds;
}

struct Scheduler::Active {
  GenerationRequest request;
  std::shared_ptr<RequestStream> stream;
  Sequence seq;
  Sampler sampler;
  int32_t num_generated = 0;
  bool reported_cache_hits = false;
  bool admitted_once = false;
  int32_t cached_prompt_tokens = 0;  // prefix-cache hits at the first admission
  Clock::time_point submitted;
  Clock::time_point last_token;

  Active(GenerationRequest r, std::shared_ptr<RequestStream> s)
      : request(std::move(r)), stream(std::move(s)), sampler(request.params) {}
};

Scheduler::Scheduler(ModelRunner& runner, SchedulerConfig config) : runner_(runner), config_(config) {
  if (config_.max_num_seqs <= 0) fail("--max-num-seqs must be positive (got {})", config_.max_num_seqs);
  if (config_.max_num_batched_tokens <= 0)
    fail("--max-num-batched-tokens must be positive (got {})", config_.max_num_batched_tokens);
  if (config_.max_model_len <= 0) fail("--max-model-len must be positive (got {})", config_.max_model_len);
  if (config_.max_waiting < 0) fail("the waiting-queue bound must be >= 0 (got {})", config_.max_waiting);
  stats_.pages_total = runner_.blocks().num_pages();
}

Scheduler::~Scheduler() { stop(); }

void Scheduler::start() {
  if (thread_.joinable()) return;
  stopping_ = false;
  thread_ = std::thread([this] { run_loop(); });
}

void Scheduler::stop() {
  stopping_ = true;
  incoming_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  drain_incoming();
  for (auto& a : running_) finish(*a, FinishReason::Abort);
  for (auto& a : waiting_) finish(*a, FinishReason::Abort);
  running_.clear();
  waiting_.clear();
  num_waiting_ = 0;
}

std::shared_ptr<RequestStream> Scheduler::submit(GenerationRequest request) {
  const auto prompt_len = static_cast<int32_t>(request.prompt.size());
  if (prompt_len == 0) fail("the prompt is empty");
  request.params.validate();
  const int64_t total = static_cast<int64_t>(prompt_len) + std::max(request.params.max_tokens, 0);
  if (total > config_.max_model_len)
    fail("{} prompt tokens + {} to generate exceed the maximum model length {}", prompt_len, request.params.max_tokens,
         config_.max_model_len);
  const int32_t bs = runner_.blocks().block_size();
  if (pages_for(static_cast<int32_t>(total), bs) > runner_.blocks().num_pages())
    fail("{} tokens need more KV-cache pages than the cache holds ({} pages of {} tokens)", total,
         runner_.blocks().num_pages(), bs);
  for (const int32_t t : request.prompt)
    if (t < 0 || t >= runner_.model().vocab_size())
      fail("prompt token {} is outside the vocabulary (size {})", t, runner_.model().vocab_size());
  if (request.top_logprobs > runner_.model().vocab_size()) request.top_logprobs = runner_.model().vocab_size();
  if (!request.images.empty() && !runner_.vision_tower()) fail("the model has no vision tower: it takes no images");
  int32_t images_end = 0;
  for (const auto& img : request.images) {
    if (!img.data) fail("image at token {} without data", img.begin);
    if (img.length <= 0 || img.begin < images_end || img.begin + img.length > prompt_len)
      fail("image tokens [{}, {}) are not a sorted, disjoint run inside the {}-token prompt", img.begin,
           img.begin + img.length, prompt_len);
    images_end = img.begin + img.length;
  }

  auto stream = std::make_shared<RequestStream>();
  {
    std::lock_guard<std::mutex> lock(incoming_mutex_);
    if (stopping_) fail("the server is shutting down");
    if (num_waiting_.load() >= config_.max_waiting) {
      std::lock_guard<std::mutex> s(stats_mutex_);
      ++stats_.requests_rejected;
      throw QueueFull(fmt::format("the request queue is full ({} requests waiting); retry later", config_.max_waiting));
    }
    auto a = std::make_unique<Active>(std::move(request), stream);
    a->seq.id = next_id_++;
    a->seq.tokens = a->request.prompt;
    a->seq.num_prompt_tokens = prompt_len;
    a->seq.images = std::move(a->request.images);
    a->submitted = Clock::now();
    incoming_.push_back(std::move(a));
    ++num_waiting_;
  }
  {
    std::lock_guard<std::mutex> s(stats_mutex_);
    ++stats_.requests_submitted;
  }
  incoming_cv_.notify_all();
  return stream;
}

void Scheduler::drain_incoming() {
  std::lock_guard<std::mutex> lock(incoming_mutex_);
  for (auto& a : incoming_) waiting_.push_back(std::move(a));
  incoming_.clear();
}

void Scheduler::finish(Active& a, FinishReason reason, const std::string& error) {
  runner_.release(a.seq);
  RequestEvent e;
  e.finish = reason;
  e.error = error;
  a.stream->push(std::move(e));
  std::lock_guard<std::mutex> s(stats_mutex_);
  ++stats_.requests_finished[static_cast<size_t>(reason)];
  stats_.request_latency.observe(std::chrono::duration<double>(Clock::now() - a.submitted).count());
}

void Scheduler::preempt(Active& a) {
  // Recompute later: the pages go back (full blocks stay in the prefix cache, so most are found again).
  runner_.release(a.seq);
  std::lock_guard<std::mutex> s(stats_mutex_);
  ++stats_.preemptions;
}

bool Scheduler::step() {
  drain_incoming();
  auto& blocks = runner_.blocks();

  // 1. Cancelled requests leave first, so their pages serve this step.
  for (auto it = running_.begin(); it != running_.end();) {
    if ((*it)->stream->cancelled()) {
      finish(**it, FinishReason::Abort);
      it = running_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    if ((*it)->stream->cancelled()) {
      finish(**it, FinishReason::Abort);
      it = waiting_.erase(it);
      --num_waiting_;
    } else {
      ++it;
    }
  }

  // 2. Running sequences, oldest first; on a full cache the newest are preempted.
  int32_t budget = config_.max_num_batched_tokens;
  std::vector<Active*> scheduled;
  std::vector<StepItem> items;
  bool preempted = false;
  for (auto it = running_.begin(); it != running_.end() && budget > 0;) {
    Active& a = **it;
    const int32_t n = std::min(a.seq.num_uncomputed(), budget);
    bool self_preempted = false;
    while (!blocks.reserve(a.seq, a.seq.num_computed + n)) {
      auto victim = std::prev(running_.end());
      preempted = true;
      preempt(**victim);
      if (victim == it) {
        self_preempted = true;
        break;
      }
      waiting_.push_front(std::move(*victim));
      ++num_waiting_;
      running_.erase(victim);
    }
    if (self_preempted) {
      waiting_.push_front(std::move(*it));
      ++num_waiting_;
      it = running_.erase(it);
      break;
    }
    scheduled.push_back(&a);
    items.push_back({&a.seq, n, false});
    budget -= n;
    ++it;
  }

  // 3. Admission while there is budget, a free slot and pages (never past a preemption in the same step).
  while (!preempted && budget > 0 && !waiting_.empty() &&
         static_cast<int32_t>(running_.size()) < config_.max_num_seqs) {
    Active& a = *waiting_.front();
    runner_.admit(a.seq);
    const int32_t n = std::min(a.seq.num_uncomputed(), budget);
    if (!blocks.reserve(a.seq, a.seq.num_computed + n)) {
      runner_.release(a.seq);
      break;
    }
    if (!a.admitted_once) {
      a.admitted_once = true;
      a.cached_prompt_tokens = std::min(a.seq.num_computed, a.seq.num_prompt_tokens);
      std::lock_guard<std::mutex> s(stats_mutex_);
      stats_.cached_prompt_tokens += static_cast<uint64_t>(a.cached_prompt_tokens);
    }
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    --num_waiting_;
    scheduled.push_back(&a);
    items.push_back({&a.seq, n, false});
    budget -= n;
  }

  if (items.empty()) {
    std::lock_guard<std::mutex> s(stats_mutex_);
    stats_.running = static_cast<int32_t>(running_.size());
    stats_.waiting = num_waiting_.load();
    stats_.pages_used = blocks.num_pages() - blocks.num_available();
    return false;
  }

  // Images whose rows this step needs are encoded now, together; when that fails, request by request, so that an
  // image that fails ends only its own request.
  bool encoded = false;
  try {
    runner_.encode_images(items);
    encoded = true;
  } catch (const std::exception& e) {
    spdlog::warn("batched image encoding failed ({}); encoding request by request", e.what());
  }
  for (size_t i = 0; !encoded && i < scheduled.size();) {
    try {
      runner_.encode_images(scheduled[i]->seq, items[i].num_tokens);
      ++i;
    } catch (const std::exception& e) {
      Active* a = scheduled[i];
      spdlog::error("request {}: image encoding failed: {}", a->seq.id, e.what());
      finish(*a, FinishReason::Error, e.what());
      running_.remove_if([&](const std::unique_ptr<Active>& p) { return p.get() == a; });
      scheduled.erase(scheduled.begin() + static_cast<std::ptrdiff_t>(i));
      items.erase(items.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }
  if (items.empty()) return true;

  uint64_t prompt_tokens = 0;
  for (const auto& item : items) {
    const int32_t prompt_left = item.seq->num_prompt_tokens - item.seq->num_computed;
    prompt_tokens += static_cast<uint64_t>(std::clamp(prompt_left, 0, item.num_tokens));
  }

  // Sampling on the backend (only token ids come back) unless a row that samples this step needs its logits on the
  // host: logprobs, a tool-call constraint, or penalties (they need the sequence's tokens). Both paths draw the same
  // token (backend/sampling.h); rows that sample nothing (mid-prefill, scripted) take a greedy placeholder.
  bool on_device = true;
  for (size_t i = 0; i < scheduled.size() && on_device; ++i) {
    const Active& a = *scheduled[i];
    if (items[i].num_tokens < a.seq.num_uncomputed() || !a.request.scripted.empty()) continue;
    const std::span<const int32_t> output(a.seq.tokens.data() + a.seq.num_prompt_tokens,
                                          a.seq.tokens.size() - static_cast<size_t>(a.seq.num_prompt_tokens));
    if (a.request.top_logprobs >= 0 || a.sampler.needs_token_history() ||
        (a.request.constraint && a.request.constraint->active(output)))
      on_device = false;
  }
  std::vector<backend::SampleParams> draws;
  if (on_device) {
    for (size_t i = 0; i < scheduled.size(); ++i) {
      Active& a = *scheduled[i];
      const bool samples = items[i].num_tokens == a.seq.num_uncomputed() && a.request.scripted.empty();
      draws.push_back(samples ? a.sampler.device_draw() : backend::SampleParams{});
    }
  }

  StepOutput out;
  try {
    out = on_device ? runner_.step(items, draws) : runner_.step(items);
  } catch (const std::exception& e) {
    spdlog::error("engine step failed: {}", e.what());
    for (Active* a : scheduled) {
      finish(*a, FinishReason::Error, e.what());
      running_.remove_if([&](const std::unique_ptr<Active>& p) { return p.get() == a; });
    }
    return true;
  }

  // 4. Sample every sequence whose tokens are all computed.
  const auto now = Clock::now();
  uint64_t generated = 0;
  std::vector<double> ttfts, itls;
  std::vector<Active*> done;
  std::vector<FinishReason> done_reason;
  std::vector<std::string> done_error;  // error texts by index into `done` (missing entries: no error)
  for (size_t i = 0; i < scheduled.size(); ++i) {
    Active& a = *scheduled[i];
    if (a.seq.num_uncomputed() > 0) continue;  // mid-prefill
    const auto logits = on_device ? std::span<const float>() : out.row(i);
    const std::span<const int32_t> prompt(a.seq.tokens.data(), static_cast<size_t>(a.seq.num_prompt_tokens));
    const std::span<const int32_t> output(a.seq.tokens.data() + a.seq.num_prompt_tokens,
                                          a.seq.tokens.size() - static_cast<size_t>(a.seq.num_prompt_tokens));
    RequestEvent e;
    if (!a.reported_cache_hits) {
      e.cached_prompt_tokens = a.cached_prompt_tokens;
      a.reported_cache_hits = true;
    }
    const auto& script = a.request.scripted;
    if (!script.empty() && static_cast<size_t>(a.num_generated) >= script.size()) {
      a.stream->push(std::move(e));
      done.push_back(&a);
      done_reason.push_back(FinishReason::Stop);
      continue;
    }
    int32_t token = 0;
    if (!script.empty()) {
      token = script[static_cast<size_t>(a.num_generated)];
    } else if (on_device) {
      token = out.tokens[i];
    } else if (a.request.constraint && a.request.constraint->active(output)) {
      std::vector<float> masked(logits.begin(), logits.end());
      try {
        a.request.constraint->apply(masked, output);
      } catch (const std::exception& ex) {
        a.stream->push(std::move(e));
        done.push_back(&a);
        done_reason.push_back(FinishReason::Error);
        done_error.resize(done.size());
        done_error.back() = ex.what();
        continue;
      }
      token = a.sampler.sample(masked, prompt, output);
    } else {
      token = a.sampler.sample(logits, prompt, output);
    }
    if (a.request.top_logprobs >= 0) {
      // Log-probabilities of the model's own distribution (raw logits), as vLLM reports them by default.
      const float mx = *std::max_element(logits.begin(), logits.end());
      double z = 0.0;
      for (const float l : logits) z += std::exp(static_cast<double>(l - mx));
      const float log_z = mx + static_cast<float>(std::log(z));
      TokenLogprob lp;
      lp.token = token;
      lp.logprob = logits[static_cast<size_t>(token)] - log_z;
      std::vector<int32_t> idx(logits.size());
      std::iota(idx.begin(), idx.end(), 0);
      const auto k = static_cast<size_t>(a.request.top_logprobs);
      std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(),
                        [&](int32_t x, int32_t y) {
                          const float lx = logits[static_cast<size_t>(x)], ly = logits[static_cast<size_t>(y)];
                          return lx > ly || (lx == ly && x < y);
                        });
      for (size_t j = 0; j < k; ++j) lp.top.emplace_back(idx[j], logits[static_cast<size_t>(idx[j])] - log_z);
      e.logprobs.push_back(std::move(lp));
    }
    a.seq.tokens.push_back(token);
    ++a.num_generated;
    ++generated;
    e.tokens.push_back(token);
    if (a.num_generated == 1)
      ttfts.push_back(std::chrono::duration<double>(now - a.submitted).count());
    else
      itls.push_back(std::chrono::duration<double>(now - a.last_token).count());
    a.last_token = now;

    FinishReason reason = FinishReason::None;
    if (!script.empty() && static_cast<size_t>(a.num_generated) >= script.size()) {
      reason = FinishReason::Stop;
    } else if (script.empty() && a.sampler.is_stop(token)) {
      reason = FinishReason::Stop;
      e.stopped_by_token = true;
    } else if (a.num_generated >= a.request.params.max_tokens ||
               static_cast<int32_t>(a.seq.tokens.size()) >= config_.max_model_len) {
      reason = FinishReason::Length;
    }
    a.stream->push(std::move(e));
    if (reason != FinishReason::None) {
      done.push_back(&a);
      done_reason.push_back(reason);
    }
  }
  for (size_t i = 0; i < done.size(); ++i) {
    finish(*done[i], done_reason[i], i < done_error.size() ? done_error[i] : std::string());
    running_.remove_if([&](const std::unique_ptr<Active>& p) { return p.get() == done[i]; });
  }

  std::lock_guard<std::mutex> s(stats_mutex_);
  ++stats_.steps;
  stats_.prompt_tokens += prompt_tokens;
  stats_.generation_tokens += generated;
  for (const double t : ttfts) stats_.time_to_first_token.observe(t);
  for (const double t : itls) stats_.inter_token_latency.observe(t);
  stats_.running = static_cast<int32_t>(running_.size());
  stats_.waiting = num_waiting_.load();
  stats_.pages_used = blocks.num_pages() - blocks.num_available();
  return true;
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> s(stats_mutex_);
  return stats_;
}

void Scheduler::run_loop() {
  while (!stopping_) {
    bool worked = false;
    try {
      worked = step();
    } catch (const std::exception& e) {
      spdlog::error("scheduler: {}", e.what());
    }
    if (worked) continue;
    std::unique_lock<std::mutex> lock(incoming_mutex_);
    // Idle: sleep until a request arrives (the timeout also notices cancellations of waiting requests).
    incoming_cv_.wait_for(lock, std::chrono::milliseconds(20), [&] { return stopping_.load() || !incoming_.empty(); });
  }
}

}  // namespace mxlm::engine
