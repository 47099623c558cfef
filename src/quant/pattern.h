// Layer-name patterns as Quark and vLLM read the `exclude` list: shell globs with Python fnmatch semantics
// (`*` and `?` cross dots, `[seq]`, `[!seq]`, matched against the whole module name), or a regular expression
// after a `re:` prefix (matched from the start of the name, as Python's re.match).
#pragma once

#include <memory>
#include <regex>
#include <string>
#include <string_view>
#include <vector>

namespace mxlm::quant {

// Python's fnmatch.fnmatchcase(name, pattern) (fnmatch.fnmatch on POSIX, which is what Quark calls).
bool fnmatch(std::string_view name, std::string_view pattern);

class LayerPattern {
 public:
  // Errors on an invalid `re:` expression, naming the pattern.
  explicit LayerPattern(std::string text);
  bool matches(std::string_view module_name) const;
  const std::string& text() const { return text_; }

 private:
  std::string text_;
  std::shared_ptr<const std::regex> regex_;  // set for `re:` patterns
};

// True when any pattern matches.
bool matches_any(const std::vector<LayerPattern>& patterns, std::string_view module_name);

}  // namespace mxlm::quant
