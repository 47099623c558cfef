// Pre-tokenizers of Hugging Face `tokenizer.json`: they cut a normalized piece of text into the
// "words" the model encodes one at a time.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mxlm::text {

struct PreSplit {
  std::string text;
  // Whether this split starts at offset 0 of the original input (Metaspace's prepend_scheme "first").
  bool at_start = false;
};

// What becomes of the delimiters a pattern finds (HF SplitDelimiterBehavior).
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

SplitBehavior parse_split_behavior(const std::string& name);

// A pattern's findings cover `text` in order: (begin, end, is_match). Applies `behavior` and returns
// the resulting non-empty pieces as [begin, end) byte ranges.
std::vector<std::pair<size_t, size_t>> apply_split_behavior(
    const std::vector<std::tuple<size_t, size_t, bool>>& findings, SplitBehavior behavior);

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Replaces `splits` by their refinement; empty splits are dropped.
  virtual void pre_tokenize(std::vector<PreSplit>& splits) const = 0;
};

// Returns nullptr for a JSON null. Unknown or malformed types throw mxlm::Error.
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const nlohmann::json& config);

}  // namespace mxlm::text
