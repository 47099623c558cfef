#include "core/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace mxlm {

std::string format_bytes(double bytes) {
  static const char* kUnits[] = {"B", "kB", "MB", "GB", "TB"};
  int unit = 0;
  while (bytes >= 1000.0 && unit < 4) {
    bytes /= 1000.0;
    ++unit;
  }
  return unit == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.2f} {}", bytes, kUnits[unit]);
}

std::string format_duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e7) return "--";
  const auto s = static_cast<long long>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
  if (s >= 60) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

Progress::Progress(std::string label, uint64_t total, Unit unit, bool enabled)
    : label_(std::move(label)),
      total_(total),
      unit_(unit),
      enabled_(enabled),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

Progress::~Progress() { finish(); }

double Progress::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::set_suffix(std::function<std::string()> suffix) {
  std::lock_guard lock(mutex_);
  suffix_ = std::move(suffix);
}

void Progress::advance(uint64_t amount) {
  done_.fetch_add(amount);
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  std::unique_lock lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock() || finished_ || now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  draw(false);
}

void Progress::finish() {
  std::lock_guard lock(mutex_);
  if (finished_) return;
  finished_ = true;
  if (enabled_) draw(true);
}

void Progress::draw(bool final_line) {
  const uint64_t done = done_.load();
  const double elapsed = elapsed_seconds();
  const double rate = elapsed > 0 ? done / elapsed : 0.0;
  const double fraction = total_ ? static_cast<double>(done) / total_ : 1.0;
  constexpr int kWidth = 28;
  const int filled = static_cast<int>(fraction * kWidth);
  std::string bar(static_cast<size_t>(std::clamp(filled, 0, kWidth)), '#');
  bar.resize(kWidth, '.');
  const double eta = rate > 0 && total_ > done ? (total_ - done) / rate : 0.0;
  std::string counts, rate_text;
  if (unit_ == Unit::Bytes) {
    counts = fmt::format("{}/{}", format_bytes(done), format_bytes(total_));
    rate_text = format_bytes(rate) + "/s";
  } else {
    counts = fmt::format("{}/{}", done, total_);
    rate_text = fmt::format("{:.2f}/s", rate);
  }
  std::string line = fmt::format("\r{} [{}] {:5.1f}% {} {} ETA {}", label_, bar, 100.0 * fraction, counts,
                                 rate_text, final_line ? format_duration(elapsed) + " total" : format_duration(eta));
  if (suffix_) line += " " + suffix_();
  line += "\x1b[K";
  if (final_line) line += "\n";
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
}

}  // namespace mxlm
