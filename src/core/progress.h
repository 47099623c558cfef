// A terminal progress bar with done/total, rate and ETA, shared by the quantizer (bytes) and the
// evaluator (requests). Thread-safe: workers call advance() from any thread. Redraws at most every
// 100 ms, and only when stderr is a terminal unless forced, so logs in CI stay readable.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>

namespace mxlm {

class Progress {
 public:
  enum class Unit { Bytes, Items };

  Progress(std::string label, uint64_t total, Unit unit, bool enabled);
  ~Progress();

  void advance(uint64_t amount);
  // Extra text after the rate (e.g. "acc 0.812"); called under the redraw lock.
  void set_suffix(std::function<std::string()> suffix);
  void finish();

  uint64_t done() const { return done_.load(); }
  double elapsed_seconds() const;

 private:
  void draw(bool final_line);

  std::string label_;
  uint64_t total_;
  Unit unit_;
  bool enabled_;
  std::atomic<uint64_t> done_{0};
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
  std::function<std::string()> suffix_;
  std::mutex mutex_;
  bool finished_ = false;
};

// "1.23 GB", "512 B" (decimal units, as disk sizes are quoted).
std::string format_bytes(double bytes);
// "1h02m", "3m05s", "12s".
std::string format_duration(double seconds);

}  // namespace mxlm
