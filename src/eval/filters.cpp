#include "eval/filters.h"

#include <optional>

namespace mxlm::eval {

namespace {

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool in_strict_class(char c) { return is_digit(c) || c == '.' || c == ','; }     // [0-9\.\,]
bool in_flexible_class(char c) { return in_strict_class(c) || c == '$'; }        // [$0-9.,]

size_t run_length(std::string_view s, size_t from, bool (*in_class)(char)) {
  size_t end = from;
  while (end < s.size() && in_class(s[end])) ++end;
  return end - from;
}

}  // namespace

std::string strict_match(std::string_view response) {
  // The leftmost "#### " followed by an optional '-' and at least one class character. If a '-' is not
  // followed by a class character the optional '-' backtracks to empty, and then '-' itself must match
  // the class, which it cannot: that position fails.
  constexpr std::string_view kMarker = "#### ";
  for (size_t at = response.find(kMarker); at != std::string_view::npos; at = response.find(kMarker, at + 1)) {
    size_t start = at + kMarker.size();
    size_t body = start;
    if (body < response.size() && response[body] == '-') ++body;
    const size_t n = run_length(response, body, in_strict_class);
    if (n > 0) return std::string(response.substr(start, body + n - start));
  }
  return std::string(kInvalidAnswer);
}

std::string flexible_extract(std::string_view response) {
  // findall scans left to right; at each position alternative 1 (-?[$0-9.,]{2,}) is tried before
  // alternative 2 (-?[0-9]+). Both quantifiers are greedy over a single class, so each match is the
  // longest run; the scan resumes after it. Only the last match counts.
  std::optional<std::string_view> last;
  size_t pos = 0;
  while (pos < response.size()) {
    const bool minus = response[pos] == '-';
    const size_t body = pos + (minus ? 1 : 0);
    size_t n = run_length(response, body, in_flexible_class);
    if (n >= 2) {
      last = response.substr(pos, body + n - pos);
      pos = body + n;
      continue;
    }
    // Without the '-' alternative 1 would start at '-' itself, which is not in the class.
    n = run_length(response, body, is_digit);
    if (n >= 1) {
      last = response.substr(pos, body + n - pos);
      pos = body + n;
      continue;
    }
    ++pos;
  }
  return last ? std::string(*last) : std::string(kInvalidAnswer);
}

std::string normalize_for_exact_match(std::string_view text) {
  std::string s;
  for (char c : text)
    if (c != ',') s += c;  // ","
  std::string t;
  for (char c : s)
    if (c != '$') t += c;  // r"\$"
  // r"(?s).*#### ": the greedy .* backtracks to the last "#### "; nothing after it can match again.
  if (const size_t at = t.rfind("#### "); at != std::string::npos) t.erase(0, at + 5);
  // r"\.$": '$' matches at the very end and just before a final "\n".
  if (!t.empty() && t.back() == '.') {
    t.pop_back();
  } else if (t.size() >= 2 && t[t.size() - 1] == '\n' && t[t.size() - 2] == '.') {
    t.erase(t.size() - 2, 1);
  }
  // ignore_case. ASCII lowering is exact here: filtered predictions are ASCII, so a non-ASCII reference
  // can never equal one after str.lower() except through case mappings onto letters of "[invalid]",
  // and no Unicode letter lower-cases to those.
  for (char& c : t)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return t;
}

double exact_match(std::string_view prediction, std::string_view reference) {
  return normalize_for_exact_match(prediction) == normalize_for_exact_match(reference) ? 1.0 : 0.0;
}

}  // namespace mxlm::eval
