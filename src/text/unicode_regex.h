// A compiled PCRE2 pattern in UTF + UCP mode (so \p{L}, \s, \d mean what they mean in Oniguruma, the
// engine Hugging Face `tokenizers` uses), JIT-compiled when the platform allows it. Thread-safe:
// match scratch space is per call / per thread.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mxlm::text {

class UnicodeRegex {
 public:
  // Throws mxlm::Error naming the pattern and PCRE2's message when it does not compile.
  explicit UnicodeRegex(const std::string& pattern);
  ~UnicodeRegex();
  UnicodeRegex(const UnicodeRegex&) = delete;
  UnicodeRegex& operator=(const UnicodeRegex&) = delete;

  // Escapes `literal` so that it matches itself.
  static std::string escape(std::string_view literal);

  // All non-overlapping matches [begin, end) in byte offsets, left to right. After an empty match
  // the search resumes one character later (as Oniguruma's and Rust's find_iter do).
  // `text` must be valid UTF-8.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view text) const;

  // First match at or after `start`; returns false when none.
  bool find(std::string_view text, size_t start, size_t& begin, size_t& end) const;

  const std::string& pattern() const { return pattern_; }

 private:
  struct Impl;
  std::string pattern_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mxlm::text
