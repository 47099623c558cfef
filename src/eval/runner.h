// `mxlm eval` as a library call: builds every request exactly as lm-eval's local-chat-completions does for
// gsm8k, sends them through a pool of `num_concurrent` connections with lm-eval's time limit and retries,
// scores the replies and keeps every finished document (appending to the samples file as it goes).
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "eval/gsm8k.h"
#include "eval/samples.h"

namespace mxlm::eval {

struct EvalOptions {
  std::string base_url;  // full chat-completions URL, or a base ending in /v1
  std::string model;     // the request's "model" field
  std::string api_key;   // sent as "Authorization: Bearer <key>", empty allowed (as lm-eval does)
  std::string data_dir;  // empty: default_gsm8k_dir()
  int num_fewshot = kDefaultNumFewshot;
  int num_concurrent = 32;
  int max_gen_toks = 256;  // lm-eval's default for API models
  bool fewshot_as_multiturn = true;
  std::optional<double> limit;  // >= 1: first N documents; < 1: that fraction (rounded up), as lm-eval
  std::string output_path;      // empty: nothing written
  bool resume = false;
  bool fail_fast = false;
  double timeout_seconds = 300;
  int max_retries = 3;  // attempts per request
  uint64_t fewshot_seed = 1234;
  int64_t seed = 1234;  // the request's "seed" field
  double temperature = 0.0;
  bool show_progress = true;  // drawn only when stderr is a terminal
  // Set from outside (Ctrl-C) to stop: in-flight requests are aborted, finished documents are kept.
  const std::atomic<bool>* interrupt = nullptr;
  // Wait before retry `attempt` (1-based); default: tenacity's wait_exponential(multiplier=0.5, min=1, max=10).
  std::function<double(int attempt)> retry_wait;
};

struct EvalRun {
  EvalOptions options;
  std::string endpoint_url;
  std::string data_dir;
  size_t original_docs = 0;  // documents in the test split
  size_t selected_docs = 0;  // after --limit
  size_t resumed_docs = 0;   // taken from an earlier run's samples file
  std::vector<SampleRecord> samples;  // finished documents (including failed ones), by doc_id
  bool interrupted = false;
  bool aborted = false;  // --fail-fast stopped the run
  std::string abort_reason;
  double seconds = 0;
  std::string started_at;  // ISO 8601 UTC
  bool complete() const { return samples.size() == selected_docs; }
};

// lm-eval's tenacity wait before the retry that follows attempt `attempt`: 0.5 * 2^(attempt-1) in [1, 10].
double default_retry_wait(int attempt);

// The request body for one document (key order messages, model, max_tokens, temperature, stop, seed).
nlohmann::ordered_json make_request_body(const std::vector<ChatMessage>& messages, const EvalOptions& options);

// Number of documents a --limit selects from `total` (lm-eval's rule).
size_t apply_limit(std::optional<double> limit, size_t total);

EvalRun run_gsm8k(const EvalOptions& options);

}  // namespace mxlm::eval
