#include "eval/metrics.h"

#include <cmath>
#include <limits>

#include "core/error.h"

namespace mxlm::eval {

namespace {
constexpr double kZ95 = 1.959963984540054;
}

double mean(const std::vector<double>& values) {
  if (values.empty()) return std::numeric_limits<double>::quiet_NaN();
  double sum = 0;
  for (double v : values) sum += v;
  return sum / static_cast<double>(values.size());
}

std::optional<double> mean_stderr(const std::vector<double>& values) {
  if (values.size() < 2) return std::nullopt;
  const double mu = mean(values);
  double squares = 0;
  for (double v : values) squares += (v - mu) * (v - mu);
  const double n = static_cast<double>(values.size());
  return std::sqrt(squares / (n - 1)) / std::sqrt(n);
}

Recovery paired_recovery(const std::vector<double>& baseline, const std::vector<double>& current) {
  if (baseline.size() != current.size()) fail("paired_recovery: {} vs {} scores", baseline.size(), current.size());
  Recovery r;
  r.n = baseline.size();
  if (r.n == 0) fail("no documents are scored in both runs");
  r.baseline = mean(baseline);
  r.current = mean(current);
  r.difference = r.current - r.baseline;
  std::vector<double> diff(r.n);
  for (size_t i = 0; i < r.n; ++i) {
    diff[i] = current[i] - baseline[i];
    if (baseline[i] > 0.5 && current[i] < 0.5) ++r.lost;
    if (baseline[i] < 0.5 && current[i] > 0.5) ++r.gained;
  }
  r.difference_stderr = mean_stderr(diff).value_or(0.0);
  if (r.baseline > 0) {
    r.ratio = r.current / r.baseline;
    std::vector<double> residual(r.n);
    for (size_t i = 0; i < r.n; ++i) residual[i] = current[i] - r.ratio * baseline[i];
    const double se = mean_stderr(residual).value_or(0.0) / r.baseline;
    r.ratio_low = r.ratio - kZ95 * se;
    r.ratio_high = r.ratio + kZ95 * se;
  } else {
    r.ratio = r.ratio_low = r.ratio_high = std::numeric_limits<double>::quiet_NaN();
  }
  return r;
}

Recovery unpaired_recovery(double baseline, double baseline_stderr, double current, double current_stderr, size_t n) {
  Recovery r;
  r.paired = false;
  r.n = n;
  r.baseline = baseline;
  r.current = current;
  r.difference = current - baseline;
  r.difference_stderr = std::sqrt(baseline_stderr * baseline_stderr + current_stderr * current_stderr);
  if (baseline > 0) {
    r.ratio = current / baseline;
    // Delta method for c/b with independent c and b.
    const double d_current = current_stderr / baseline;
    const double d_baseline = current * baseline_stderr / (baseline * baseline);
    const double se = std::sqrt(d_current * d_current + d_baseline * d_baseline);
    r.ratio_low = r.ratio - kZ95 * se;
    r.ratio_high = r.ratio + kZ95 * se;
  } else {
    r.ratio = r.ratio_low = r.ratio_high = std::numeric_limits<double>::quiet_NaN();
  }
  return r;
}

}  // namespace mxlm::eval
