#include "quant/pattern.h"

#include <optional>

#include "core/error.h"

namespace mxlm::quant {
namespace {

// Matches one bracket expression of `pattern` starting at `pos` (the '[') against `c`. Returns the position
// after the closing ']' and whether `c` is in the set, or nullopt when the '[' is not closed: Python then
// treats the '[' as a literal character.
struct BracketResult {
  size_t end;
  bool matched;
};

std::optional<BracketResult> match_bracket(std::string_view pattern, size_t pos, char c) {
  size_t i = pos + 1;
  bool negate = false;
  if (i < pattern.size() && pattern[i] == '!') {
    negate = true;
    ++i;
  }
  const size_t first = i;
  // A ']' right after '[' or '[!' is a literal member (Python: "j = j+1 if pat[j] == ']'").
  if (i < pattern.size() && pattern[i] == ']') ++i;
  while (i < pattern.size() && pattern[i] != ']') ++i;
  if (i >= pattern.size()) return std::nullopt;
  const std::string_view set = pattern.substr(first, i - first);
  bool in = false;
  for (size_t k = 0; k < set.size(); ++k) {
    if (k + 2 < set.size() && set[k + 1] == '-') {
      // Python drops ranges whose end is below their start (they match nothing).
      if (set[k] <= c && c <= set[k + 2]) in = true;
      k += 2;
    } else if (set[k] == c) {
      in = true;
    }
  }
  return BracketResult{i + 1, in != negate};
}

// Iterative glob matcher with single-star backtracking; correct for fnmatch because '*' matches any run
// of characters (including '.' and '/', as in Python's translate(): '*' -> '.*' with DOTALL).
bool glob_match(std::string_view name, std::string_view pattern) {
  size_t n = 0, p = 0;
  size_t star_p = std::string_view::npos, star_n = 0;
  while (n < name.size()) {
    if (p < pattern.size()) {
      const char pc = pattern[p];
      if (pc == '*') {
        star_p = p++;
        star_n = n;
        continue;
      }
      if (pc == '?') {
        ++p;
        ++n;
        continue;
      }
      if (pc == '[') {
        if (auto bracket = match_bracket(pattern, p, name[n])) {
          if (bracket->matched) {
            p = bracket->end;
            ++n;
            continue;
          }
        } else if (name[n] == '[') {  // unclosed '[' is literal
          ++p;
          ++n;
          continue;
        }
      } else if (pc == name[n]) {
        ++p;
        ++n;
        continue;
      }
    }
    if (star_p == std::string_view::npos) return false;
    p = star_p + 1;
    n = ++star_n;
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

}  // namespace

bool fnmatch(std::string_view name, std::string_view pattern) { return glob_match(name, pattern); }

LayerPattern::LayerPattern(std::string text) : text_(std::move(text)) {
  if (text_.rfind("re:", 0) == 0) {
    try {
      regex_ = std::make_shared<const std::regex>(text_.substr(3), std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      fail("layer pattern '{}': invalid regular expression ({})", text_, e.what());
    }
  }
}

bool LayerPattern::matches(std::string_view module_name) const {
  if (regex_) {
    return std::regex_search(module_name.begin(), module_name.end(), *regex_, std::regex_constants::match_continuous);
  }
  return glob_match(module_name, text_);
}

bool matches_any(const std::vector<LayerPattern>& patterns, std::string_view module_name) {
  for (const auto& pattern : patterns)
    if (pattern.matches(module_name)) return true;
  return false;
}

}  // namespace mxlm::quant
