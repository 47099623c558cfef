// Aggregation as lm-eval computes it (mean = sum/len, stderr = sample stddev (n-1) / sqrt(n), summed in
// document order so the doubles match Python's bit for bit), and the paired comparison of two runs.
#pragma once

#include <optional>
#include <vector>

namespace mxlm::eval {

double mean(const std::vector<double>& values);
// nullopt where lm-eval reports "N/A" (fewer than two values).
std::optional<double> mean_stderr(const std::vector<double>& values);

struct Recovery {
  size_t n = 0;             // documents scored in both runs
  double baseline = 0;      // mean over those documents
  double current = 0;
  double ratio = 0;         // current / baseline
  double ratio_low = 0;     // 95% confidence interval of the ratio
  double ratio_high = 0;
  double difference = 0;    // current - baseline
  double difference_stderr = 0;
  size_t lost = 0;          // right in the baseline, wrong now
  size_t gained = 0;        // wrong in the baseline, right now
  bool paired = true;
};

// Paired over per-document scores (same documents, same order): the ratio's interval comes from the delta
// method on d_i = current_i - ratio * baseline_i, which keeps the correlation between the runs.
Recovery paired_recovery(const std::vector<double>& baseline, const std::vector<double>& current);

// Without per-document baseline scores: treats the runs as independent (a wider interval).
Recovery unpaired_recovery(double baseline, double baseline_stderr, double current, double current_stderr, size_t n);

}  // namespace mxlm::eval
