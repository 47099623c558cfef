// Prometheus text exposition (format 0.0.4) of the engine's counters, gauges and latency histograms, with
// vLLM-like metric names under the `mxlm:` prefix.
#pragma once

#include <cstdint>
#include <string>

#include "engine/scheduler.h"

namespace mxlm::server {

struct HttpCounters {
  uint64_t requests = 0;       // HTTP requests answered
  uint64_t client_errors = 0;  // 4xx answers
  uint64_t server_errors = 0;  // 5xx answers
};

std::string render_metrics(const engine::SchedulerStats& stats, const HttpCounters& http, const std::string& model);

}  // namespace mxlm::server
