#include "eval/runner.h"

#include <fmt/chrono.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "eval/chat_client.h"
#include "eval/python_json.h"

namespace mxlm::eval {

double default_retry_wait(int attempt) {
  return std::clamp(0.5 * std::pow(2.0, attempt - 1), 1.0, 10.0);
}

nlohmann::ordered_json make_request_body(const std::vector<ChatMessage>& messages, const EvalOptions& options) {
  nlohmann::ordered_json body;
  auto& list = body["messages"] = nlohmann::ordered_json::array();
  for (const auto& m : messages) list.push_back({{"role", m.role}, {"content", m.content}});
  body["model"] = options.model;
  body["max_tokens"] = options.max_gen_toks;
  body["temperature"] = options.temperature;
  auto stop = gsm8k_stop_sequences();
  if (stop.size() > 4) stop.resize(4);  // the OpenAI API takes at most 4; lm-eval truncates
  body["stop"] = stop;
  body["seed"] = options.seed;
  return body;
}

size_t apply_limit(std::optional<double> limit, size_t total) {
  if (!limit) return total;
  if (!(*limit > 0)) fail("--limit must be positive, got {}", *limit);
  const size_t n = *limit < 1.0 ? static_cast<size_t>(std::ceil(static_cast<double>(total) * *limit))
                                : static_cast<size_t>(*limit);
  return std::min(n, total);
}

namespace {

std::string iso_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  return fmt::format("{:%Y-%m-%dT%H:%M:%SZ}", tm);
}

// Everything the workers share.
struct Shared {
  std::mutex mutex;
  std::vector<SampleRecord> finished;
  std::ofstream samples_file;
  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  std::atomic<size_t> scored{0};
  std::atomic<size_t> strict_right{0};
  std::atomic<size_t> flexible_right{0};
  std::atomic<size_t> failed{0};
  std::atomic<size_t> retried{0};
  std::string abort_reason;
};

bool interrupted(const EvalOptions& options) { return options.interrupt && options.interrupt->load(); }

// Sleeps up to `seconds`, waking early when the run is stopping. Returns false if it stopped.
bool wait_unless_stopping(double seconds, const Shared& shared, const EvalOptions& options) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < until) {
    if (shared.stop || interrupted(options)) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

}  // namespace

EvalRun run_gsm8k(const EvalOptions& options) {
  if (options.model.empty()) fail("--model is required: the model name the server serves");
  if (options.num_concurrent < 1) fail("--num-concurrent must be at least 1, got {}", options.num_concurrent);
  if (options.max_retries < 1) fail("--max-retries must be at least 1, got {}", options.max_retries);
  if (options.max_gen_toks < 1) fail("--max-gen-toks must be at least 1, got {}", options.max_gen_toks);
  if (options.num_fewshot < 0) fail("--num-fewshot must not be negative, got {}", options.num_fewshot);
  if (!(options.timeout_seconds > 0)) fail("--timeout must be positive");
  if (options.resume && options.output_path.empty()) fail("--resume needs --output-path (where the samples are)");

  EvalRun run;
  run.options = options;
  const Endpoint endpoint = parse_endpoint(options.base_url);
  run.endpoint_url = endpoint.url();
  run.data_dir = options.data_dir.empty() ? default_gsm8k_dir() : options.data_dir;
  const Gsm8kData data = load_gsm8k(run.data_dir);
  run.original_docs = data.test.size();
  run.selected_docs = apply_limit(options.limit, data.test.size());
  run.started_at = iso_now();

  const auto draws = fewshot_draws(run.selected_docs, data.train.size(), static_cast<size_t>(options.num_fewshot),
                                   options.fewshot_seed);
  auto build_record = [&](size_t doc_id) {
    SampleRecord r;
    r.doc_id = doc_id;
    r.fewshot_ids = draws[doc_id];
    std::vector<const Gsm8kDoc*> shots;
    for (size_t id : r.fewshot_ids) shots.push_back(&data.train[id]);
    r.request = make_request_body(build_chat(data.test[doc_id], shots, options.fewshot_as_multiturn), options);
    r.target = doc_to_target(data.test[doc_id]);
    return r;
  };

  Shared shared;
  std::vector<bool> done(run.selected_docs, false);
  std::string samples_path;
  if (!options.output_path.empty()) {
    std::filesystem::create_directories(options.output_path);
    samples_path = (std::filesystem::path(options.output_path) / "samples_gsm8k.jsonl").string();
    if (options.resume && std::filesystem::exists(samples_path)) {
      for (SampleRecord& old : read_samples(samples_path)) {
        if (old.failed || old.doc_id >= run.selected_docs || done[old.doc_id]) continue;  // failed ones run again
        const SampleRecord fresh = build_record(old.doc_id);
        if (python_json_dumps(old.request) != python_json_dumps(fresh.request))
          fail("--resume: {} holds doc {} sent with different settings (request differs: model, max tokens, "
               "few-shot or data); use a new --output-path or the same options",
               samples_path, old.doc_id);
        done[old.doc_id] = true;
        shared.finished.push_back(std::move(old));
      }
      run.resumed_docs = shared.finished.size();
      spdlog::info("resume: {} of {} documents already done in {}", run.resumed_docs, run.selected_docs, samples_path);
    }
    // Start the file over with what is kept; new documents are appended as they finish.
    shared.samples_file.open(samples_path, std::ios::binary | std::ios::trunc);
    if (!shared.samples_file) fail("cannot write {}", samples_path);
    for (const auto& r : shared.finished) shared.samples_file << r.to_line();
    shared.samples_file.flush();
  }
  for (const auto& r : shared.finished) {
    ++shared.scored;
    shared.strict_right += r.strict_score > 0.5;
    shared.flexible_right += r.flexible_score > 0.5;
  }

  std::vector<size_t> todo;
  for (size_t i = 0; i < run.selected_docs; ++i)
    if (!done[i]) todo.push_back(i);

  const size_t workers = std::min<size_t>(static_cast<size_t>(options.num_concurrent), std::max<size_t>(todo.size(), 1));
  std::vector<std::unique_ptr<ChatClient>> clients;
  for (size_t w = 0; w < workers; ++w)
    clients.push_back(std::make_unique<ChatClient>(endpoint, options.api_key, options.timeout_seconds));

  Progress progress("gsm8k", todo.size(), Progress::Unit::Items, options.show_progress && isatty(STDERR_FILENO));
  progress.set_suffix([&] {
    const size_t n = shared.scored.load();
    if (n == 0) return std::string();
    std::string s = fmt::format("strict {:.3f} flex {:.3f}", static_cast<double>(shared.strict_right) / n,
                                static_cast<double>(shared.flexible_right) / n);
    if (shared.failed) s += fmt::format(" failed {}", shared.failed.load());
    return s;
  });
  const auto retry_wait = options.retry_wait ? options.retry_wait : default_retry_wait;
  const auto start = std::chrono::steady_clock::now();
  std::atomic<size_t> logged_tenth{0};

  auto worker = [&](ChatClient& client) {
    for (;;) {
      if (shared.stop || interrupted(options)) return;
      const size_t slot = shared.next.fetch_add(1);
      if (slot >= todo.size()) return;
      SampleRecord record = build_record(todo[slot]);
      const std::string body = python_json_dumps(record.request);
      const auto t0 = std::chrono::steady_clock::now();
      bool finished = false;
      for (int attempt = 1; attempt <= options.max_retries; ++attempt) {
        record.attempts = attempt;
        try {
          const ChatReply reply = client.post(body);
          record.response = reply.content;
          record.content_missing = reply.content_missing;
          record.finish_reason = reply.finish_reason;
          record.server_model = reply.model;
          record.prompt_tokens = reply.prompt_tokens;
          record.completion_tokens = reply.completion_tokens;
          finished = true;
          break;
        } catch (const Error& e) {
          if (shared.stop || interrupted(options)) return;  // aborted by Ctrl-C: not a finished document
          record.error = e.what();
          spdlog::debug("doc {} attempt {}/{} failed: {}", record.doc_id, attempt, options.max_retries, record.error);
          if (attempt == options.max_retries) break;
          ++shared.retried;
          if (!wait_unless_stopping(retry_wait(attempt), shared, options)) return;
        }
      }
      record.latency_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (!finished) {
        record.failed = true;
        record.response.clear();
        ++shared.failed;
        spdlog::warn("doc {}: request failed after {} attempts: {}", record.doc_id, record.attempts, record.error);
      }
      record.score();
      {
        std::lock_guard lock(shared.mutex);
        if (shared.samples_file.is_open()) {
          shared.samples_file << record.to_line();
          shared.samples_file.flush();
        }
        if (record.failed && options.fail_fast && !shared.stop) {
          shared.abort_reason = fmt::format("request for doc {} failed after {} attempts: {}", record.doc_id,
                                            record.attempts, record.error);
          shared.stop = true;
        }
        shared.strict_right += record.strict_score > 0.5;
        shared.flexible_right += record.flexible_score > 0.5;
        ++shared.scored;
        shared.finished.push_back(std::move(record));
      }
      progress.advance(1);
      if (!isatty(STDERR_FILENO) && options.show_progress && !todo.empty()) {
        const size_t tenth = progress.done() * 10 / todo.size();
        size_t seen = logged_tenth.load();
        if (tenth > seen && logged_tenth.compare_exchange_strong(seen, tenth))
          spdlog::info("gsm8k: {}/{} done, strict {:.4f} flexible {:.4f}, {} failed", progress.done(), todo.size(),
                   static_cast<double>(shared.strict_right) / shared.scored,
                   static_cast<double>(shared.flexible_right) / shared.scored, shared.failed.load());
      }
    }
  };

  std::atomic<bool> all_done{false};
  std::thread watchdog([&] {
    while (!all_done) {
      const bool stopping = shared.stop || interrupted(options);
      const auto now = std::chrono::steady_clock::now();
      for (auto& c : clients) c->abort_if_overdue(now, stopping);
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  {
    std::vector<std::thread> threads;
    for (auto& c : clients) threads.emplace_back(worker, std::ref(*c));
    for (auto& t : threads) t.join();
  }
  all_done = true;
  watchdog.join();
  progress.finish();

  run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  run.interrupted = interrupted(options);
  run.aborted = !shared.abort_reason.empty();
  run.abort_reason = shared.abort_reason;
  run.samples = std::move(shared.finished);
  std::sort(run.samples.begin(), run.samples.end(),
            [](const SampleRecord& a, const SampleRecord& b) { return a.doc_id < b.doc_id; });
  return run;
}

}  // namespace mxlm::eval
