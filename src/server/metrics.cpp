#include "server/metrics.h"

#include <fmt/format.h>

namespace mxlm::server {
namespace {

void metric(std::string& out, const std::string& name, const char* type, const char* help) {
  out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

void histogram(std::string& out, const std::string& name, const char* help, const std::string& labels,
               const engine::Histogram& h) {
  metric(out, name, "histogram", help);
  uint64_t cumulative = 0;
  for (size_t i = 0; i < h.kBounds.size(); ++i) {
    cumulative += h.buckets[i];
    out += fmt::format("{}_bucket{{{},le=\"{}\"}} {}\n", name, labels, h.kBounds[i], cumulative);
  }
  out += fmt::format("{}_bucket{{{},le=\"+Inf\"}} {}\n", name, labels, h.count);
  out += fmt::format("{}_sum{{{}}} {}\n{}_count{{{}}} {}\n", name, labels, h.sum, name, labels, h.count);
}

}  // namespace

std::string render_metrics(const engine::SchedulerStats& s, const HttpCounters& http, const std::string& model) {
  std::string out;
  const std::string l = fmt::format("model_name=\"{}\"", model);
  auto gauge = [&](const char* name, const char* help, double v) {
    metric(out, name, "gauge", help);
    out += fmt::format("{}{{{}}} {}\n", name, l, v);
  };
  auto counter = [&](const char* name, const char* help, uint64_t v) {
    metric(out, name, "counter", help);
    out += fmt::format("{}{{{}}} {}\n", name, l, v);
  };
  gauge("mxlm:num_requests_running", "Requests in the running batch.", s.running);
  gauge("mxlm:num_requests_waiting", "Requests waiting to be scheduled (the queue length).", s.waiting);
  gauge("mxlm:kv_cache_pages_used", "KV-cache pages held by requests.", s.pages_used);
  gauge("mxlm:kv_cache_pages_total", "KV-cache pages in the cache.", s.pages_total);
  gauge("mxlm:kv_cache_usage_perc", "Fraction of KV-cache pages in use.",
        s.pages_total ? static_cast<double>(s.pages_used) / s.pages_total : 0.0);
  counter("mxlm:requests_submitted_total", "Generation requests accepted by the engine.", s.requests_submitted);
  counter("mxlm:requests_rejected_total", "Generation requests refused because the queue was full.",
          s.requests_rejected);
  metric(out, "mxlm:request_success_total", "counter", "Finished generation requests by finish reason.");
  const char* reasons[] = {"none", "stop", "length", "abort", "error"};
  for (size_t i = 1; i < s.requests_finished.size(); ++i)
    out += fmt::format("mxlm:request_success_total{{{},finished_reason=\"{}\"}} {}\n", l, reasons[i],
                       s.requests_finished[i]);
  counter("mxlm:prompt_tokens_total", "Prompt tokens computed (prefix-cache hits excluded).", s.prompt_tokens);
  counter("mxlm:prefix_cache_hit_tokens_total", "Prompt tokens reused from the prefix cache.", s.cached_prompt_tokens);
  counter("mxlm:generation_tokens_total", "Generated tokens.", s.generation_tokens);
  counter("mxlm:num_preemptions_total", "Sequences preempted because the KV cache was full.", s.preemptions);
  counter("mxlm:engine_steps_total", "Engine steps run.", s.steps);
  counter("mxlm:http_requests_total", "HTTP requests answered.", http.requests);
  counter("mxlm:http_client_errors_total", "HTTP requests answered with a 4xx status.", http.client_errors);
  counter("mxlm:http_server_errors_total", "HTTP requests answered with a 5xx status.", http.server_errors);
  histogram(out, "mxlm:time_to_first_token_seconds", "Time from submission to the first token.", l,
            s.time_to_first_token);
  histogram(out, "mxlm:inter_token_latency_seconds", "Time between consecutive tokens of a request.", l,
            s.inter_token_latency);
  histogram(out, "mxlm:e2e_request_latency_seconds", "Time from submission to the end of a request.", l,
            s.request_latency);
  return out;
}

}  // namespace mxlm::server
