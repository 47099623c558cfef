// What a run reports: lm-eval's results layout (results.json), its printed table, our samples file in
// document order, and the recovery of this run against a baseline results file.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

#include "eval/metrics.h"
#include "eval/runner.h"

namespace mxlm::eval {

struct FilterScore {
  std::string filter;  // "strict-match" / "flexible-extract"
  double value = 0;
  std::optional<double> stderr_value;  // nullopt: "N/A"
};

struct Summary {
  size_t n = 0;
  size_t failed = 0;
  size_t retried_docs = 0;  // documents that needed more than one attempt
  size_t content_missing = 0;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  std::string server_model;
  FilterScore strict;
  FilterScore flexible;
};

Summary summarize(const std::vector<SampleRecord>& samples);

// results.json: lm-eval's keys (results, configs, versions, n-shot, higher_is_better, n-samples, config,
// ...) plus an "mxlm" object with what lm-eval does not record (failures, tokens, timings, partial runs).
nlohmann::ordered_json results_json(const EvalRun& run, const Summary& summary);

// lm-eval's printed results table (pytablewriter's markdown layout) for a results object.
std::string results_table(const nlohmann::ordered_json& results);

// Writes `<dir>/results.json` and rewrites `<dir>/samples_gsm8k.jsonl` in document order (both atomically).
void write_outputs(const std::string& dir, const nlohmann::ordered_json& results, const std::vector<SampleRecord>& samples);

struct Comparison {
  std::string baseline_path;
  std::string baseline_samples;  // per-document scores used, empty when unpaired
  std::vector<std::pair<std::string, Recovery>> filters;
};

// Compares this run with BASELINE.json (ours or lm-eval's). Per-document scores are taken from the samples
// file next to it when one is found (ours: samples_gsm8k.jsonl; lm-eval: samples_gsm8k_<timestamp>.jsonl).
Comparison compare_with_baseline(const std::string& baseline_path, const std::vector<SampleRecord>& samples,
                                 const Summary& summary);
std::string comparison_table(const Comparison& comparison);
nlohmann::ordered_json comparison_json(const Comparison& comparison);

}  // namespace mxlm::eval
