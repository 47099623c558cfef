// One finished document of a run: what was sent, what came back, what the filters made of it. Written as
// one JSON line per document to `samples_gsm8k.jsonl`, appended as documents finish (so an interrupted
// run keeps its work) and rewritten in document order at the end; `--resume` reads it back.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "eval/gsm8k.h"

namespace mxlm::eval {

struct SampleRecord {
  size_t doc_id = 0;
  std::vector<size_t> fewshot_ids;
  nlohmann::ordered_json request;  // the request body, as sent
  std::string target;              // the gold answer (doc_to_target)
  std::string response;            // raw completion text ("" for null content or a failed request)
  bool failed = false;             // no usable reply after every attempt; scored as wrong
  std::string error;               // last attempt's error when failed
  int attempts = 0;
  bool content_missing = false;
  std::string finish_reason;
  std::string server_model;
  int64_t prompt_tokens = -1;
  int64_t completion_tokens = -1;
  double latency_seconds = 0;
  std::string strict;    // strict-match extraction
  std::string flexible;  // flexible-extract extraction
  double strict_score = 0;
  double flexible_score = 0;

  // Filters and scores `response` against `target`.
  void score();
  nlohmann::ordered_json to_json() const;
  // One line of the samples file, "\n" included. Non-ASCII is escaped so that no reader splitting on
  // Unicode line separators (Python's str.splitlines) can tear a record.
  std::string to_line() const;
  // Throws mxlm::Error naming `what` on a malformed record.
  static SampleRecord from_json(const nlohmann::ordered_json& json, const std::string& what);
};

// Reads a samples file; a torn last line (a run killed mid-write) is skipped, other bad lines are errors.
std::vector<SampleRecord> read_samples(const std::string& path);

// Per-document scores of a finished run for the comparison: ours or lm-eval's `--log_samples` files
// (one line per document and filter). Keyed by doc_id; value {strict, flexible}; a filter absent from
// the file is NaN.
struct DocScores {
  size_t doc_id;
  double strict;
  double flexible;
};
std::vector<DocScores> read_doc_scores(const std::string& path);

}  // namespace mxlm::eval
