#include "text/pre_tokenizer.h"

#include <nlohmann/json.hpp>

#include <functional>
#include <tuple>

#include "core/error.h"
#include "text/tokenizer_json.h"
#include "text/unicode.h"
#include "text/unicode_regex.h"

namespace mxlm::text {

namespace {

using Findings = std::vector<std::tuple<size_t, size_t, bool>>;

// The GPT-2 pattern of HF's ByteLevel pre-tokenizer (use_regex = true).
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

Findings regex_findings(const UnicodeRegex& regex, std::string_view text, bool invert) {
  Findings out;
  if (text.empty()) return {{0, 0, false}};
  size_t prev = 0;
  for (const auto& [begin, end] : regex.find_all(text)) {
    if (prev != begin) out.emplace_back(prev, begin, invert);
    out.emplace_back(begin, end, !invert);
    prev = end;
  }
  if (prev != text.size()) out.emplace_back(prev, text.size(), invert);
  return out;
}

// Every character for which `is_delimiter` holds is a separate match.
Findings char_findings(std::string_view text, const std::function<bool(char32_t)>& is_delimiter) {
  Findings out;
  if (text.empty()) return {{0, 0, false}};
  size_t last = 0, i = 0;
  while (i < text.size()) {
    const size_t start = i;
    const char32_t cp = next_code_point(text, i);
    if (is_delimiter(cp)) {
      if (last < start) out.emplace_back(last, start, false);
      out.emplace_back(start, i, true);
      last = i;
    }
  }
  if (text.size() > last) out.emplace_back(last, text.size(), false);
  return out;
}

// Splits every piece with `split_one` (which returns byte ranges of that piece).
template <typename F>
void refine(std::vector<PreSplit>& splits, F&& split_one) {
  std::vector<PreSplit> out;
  out.reserve(splits.size() * 2);
  for (auto& split : splits) {
    const auto ranges = split_one(split.text);
    for (const auto& [begin, end] : ranges) {
      if (end <= begin) continue;
      out.push_back({split.text.substr(begin, end - begin), split.at_start && begin == 0});
    }
  }
  splits = std::move(out);
}

class Split final : public PreTokenizer {
 public:
  Split(const std::string& pattern, SplitBehavior behavior, bool invert)
      : regex_(pattern), behavior_(behavior), invert_(invert) {}
  void pre_tokenize(std::vector<PreSplit>& splits) const override {
    refine(splits, [&](const std::string& text) {
      return apply_split_behavior(regex_findings(regex_, text, invert_), behavior_);
    });
  }

 private:
  UnicodeRegex regex_;
  SplitBehavior behavior_;
  bool invert_;
};

class CharSplit final : public PreTokenizer {
 public:
  CharSplit(std::function<bool(char32_t)> is_delimiter, SplitBehavior behavior)
      : is_delimiter_(std::move(is_delimiter)), behavior_(behavior) {}
  void pre_tokenize(std::vector<PreSplit>& splits) const override {
    refine(splits, [&](const std::string& text) {
      return apply_split_behavior(char_findings(text, is_delimiter_), behavior_);
    });
  }

 private:
  std::function<bool(char32_t)> is_delimiter_;
  SplitBehavior behavior_;
};

class ByteLevel final : public PreTokenizer {
 public:
  ByteLevel(bool add_prefix_space, bool use_regex)
      : add_prefix_space_(add_prefix_space),
        regex_(use_regex ? std::make_unique<UnicodeRegex>(kGpt2Pattern) : nullptr) {}
  void pre_tokenize(std::vector<PreSplit>& splits) const override {
    if (add_prefix_space_ || regex_) {
      refine(splits, [&](std::string& text) {
        if (add_prefix_space_ && (text.empty() || text[0] != ' ')) text.insert(0, " ");
        if (!regex_) return std::vector<std::pair<size_t, size_t>>{{0, text.size()}};
        return apply_split_behavior(regex_findings(*regex_, text, false), SplitBehavior::kIsolated);
      });
    }
    for (auto& split : splits) {
      std::string mapped;
      mapped.reserve(split.text.size() * 2);
      for (unsigned char b : split.text) append_utf8(mapped, byte_to_char(b));
      split.text = std::move(mapped);
    }
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<UnicodeRegex> regex_;
};

class Metaspace final : public PreTokenizer {
 public:
  enum class Prepend { kAlways, kFirst, kNever };
  Metaspace(char32_t replacement, Prepend prepend, bool split)
      : replacement_(replacement), prepend_(prepend), split_(split) {
    append_utf8(replacement_text_, replacement);
  }
  void pre_tokenize(std::vector<PreSplit>& splits) const override {
    for (auto& split : splits) {
      std::string replaced;
      replaced.reserve(split.text.size() + 3);
      for (char c : split.text) {
        if (c == ' ') {
          replaced += replacement_text_;
        } else {
          replaced.push_back(c);
        }
      }
      const bool starts_with_replacement = replaced.compare(0, replacement_text_.size(), replacement_text_) == 0;
      const bool prepend = prepend_ == Prepend::kAlways || (prepend_ == Prepend::kFirst && split.at_start);
      if (prepend && !starts_with_replacement) replaced.insert(0, replacement_text_);
      split.text = std::move(replaced);
    }
    if (!split_) return;
    refine(splits, [&](const std::string& text) {
      return apply_split_behavior(char_findings(text, [&](char32_t c) { return c == replacement_; }),
                                  SplitBehavior::kMergedWithNext);
    });
  }

 private:
  char32_t replacement_;
  std::string replacement_text_;
  Prepend prepend_;
  bool split_;
};

class Sequence final : public PreTokenizer {
 public:
  explicit Sequence(std::vector<std::unique_ptr<PreTokenizer>> steps) : steps_(std::move(steps)) {}
  void pre_tokenize(std::vector<PreSplit>& splits) const override {
    for (const auto& step : steps_) step->pre_tokenize(splits);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

char32_t single_char(const std::string& s, std::string_view owner) {
  size_t i = 0;
  if (s.empty()) fail("tokenizer.json: {} needs a one-character string", owner);
  const char32_t cp = next_code_point(s, i);
  if (i != s.size()) fail("tokenizer.json: {} needs a one-character string, got {:?}", owner, s);
  return cp;
}

bool is_bert_punctuation(char32_t c) {
  return (c < 0x80 &&
          ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126))) ||
         is_unicode_punctuation(c);
}

// Rust regex classes: \w is Alphabetic + M + Nd + Pc + Join_Control; \s is White_Space.
constexpr const char* kRustWord = R"(\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D})";
constexpr const char* kRustSpace =
    R"(\t-\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

}  // namespace

SplitBehavior parse_split_behavior(const std::string& name) {
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  fail("tokenizer.json: unknown split behavior {:?}", name);
}

std::vector<std::pair<size_t, size_t>> apply_split_behavior(const Findings& findings, SplitBehavior behavior) {
  // (begin, end, remove)
  std::vector<std::tuple<size_t, size_t, bool>> pieces;
  pieces.reserve(findings.size());
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const auto& [b, e, m] : findings) pieces.emplace_back(b, e, false);
      break;
    case SplitBehavior::kRemoved:
      for (const auto& [b, e, m] : findings) pieces.emplace_back(b, e, m);
      break;
    case SplitBehavior::kContiguous: {
      bool previous = false;
      for (const auto& [b, e, m] : findings) {
        if (m == previous && !pieces.empty()) {
          std::get<1>(pieces.back()) = e;
        } else {
          pieces.emplace_back(b, e, false);
        }
        previous = m;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool previous = false;
      for (const auto& [b, e, m] : findings) {
        if (m && !previous && !pieces.empty()) {
          std::get<1>(pieces.back()) = e;
        } else {
          pieces.emplace_back(b, e, false);
        }
        previous = m;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous = false;
      for (auto it = findings.rbegin(); it != findings.rend(); ++it) {
        const auto& [b, e, m] = *it;
        if (m && !previous && !pieces.empty()) {
          std::get<0>(pieces.back()) = b;
        } else {
          pieces.emplace_back(b, e, false);
        }
        previous = m;
      }
      std::reverse(pieces.begin(), pieces.end());
      break;
    }
  }
  std::vector<std::pair<size_t, size_t>> out;
  out.reserve(pieces.size());
  for (const auto& [b, e, remove] : pieces) {
    if (!remove) out.emplace_back(b, e);
  }
  return out;
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const nlohmann::json& config) {
  if (config.is_null()) return nullptr;
  const std::string type = json_string(config, "type", "pre_tokenizer");
  if (type == "Split") {
    return std::make_unique<Split>(pattern_regex(config, "pre_tokenizer Split"),
                                   parse_split_behavior(json_string(config, "behavior", "pre_tokenizer Split")),
                                   config.value("invert", false));
  }
  if (type == "ByteLevel") {
    return std::make_unique<ByteLevel>(config.value("add_prefix_space", true), config.value("use_regex", true));
  }
  if (type == "Digits") {
    return std::make_unique<CharSplit>(is_rust_numeric, config.value("individual_digits", false)
                                                            ? SplitBehavior::kIsolated
                                                            : SplitBehavior::kContiguous);
  }
  if (type == "Metaspace") {
    const char32_t replacement = single_char(json_string(config, "replacement", "pre_tokenizer Metaspace"),
                                             "pre_tokenizer Metaspace replacement");
    Metaspace::Prepend prepend =
        config.value("add_prefix_space", true) ? Metaspace::Prepend::kAlways : Metaspace::Prepend::kNever;
    if (config.contains("prepend_scheme") && config["prepend_scheme"].is_string()) {
      const std::string scheme = config["prepend_scheme"].get<std::string>();
      if (scheme == "always") {
        prepend = Metaspace::Prepend::kAlways;
      } else if (scheme == "first") {
        prepend = Metaspace::Prepend::kFirst;
      } else if (scheme == "never") {
        prepend = Metaspace::Prepend::kNever;
      } else {
        fail("tokenizer.json: unknown Metaspace prepend_scheme {:?}", scheme);
      }
    }
    return std::make_unique<Metaspace>(replacement, prepend, config.value("split", true));
  }
  if (type == "Whitespace") {
    const std::string pattern = fmt::format("[{0}]+|[^{0}{1}]+", kRustWord, kRustSpace);
    return std::make_unique<Split>(pattern, SplitBehavior::kRemoved, true);
  }
  if (type == "WhitespaceSplit") return std::make_unique<CharSplit>(is_rust_whitespace, SplitBehavior::kRemoved);
  if (type == "Punctuation") {
    return std::make_unique<CharSplit>(is_bert_punctuation, parse_split_behavior(config.value("behavior", "Isolated")));
  }
  if (type == "BertPreTokenizer") {
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    steps.push_back(std::make_unique<CharSplit>(is_rust_whitespace, SplitBehavior::kRemoved));
    steps.push_back(std::make_unique<CharSplit>(is_bert_punctuation, SplitBehavior::kIsolated));
    return std::make_unique<Sequence>(std::move(steps));
  }
  if (type == "CharDelimiterSplit") {
    const char32_t delimiter = single_char(json_string(config, "delimiter", "pre_tokenizer CharDelimiterSplit"),
                                           "pre_tokenizer CharDelimiterSplit delimiter");
    return std::make_unique<CharSplit>([delimiter](char32_t c) { return c == delimiter; }, SplitBehavior::kRemoved);
  }
  if (type == "Sequence") {
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    for (const auto& step : json_array(config, "pretokenizers", "pre_tokenizer Sequence")) {
      if (auto p = make_pre_tokenizer(step)) steps.push_back(std::move(p));
    }
    return std::make_unique<Sequence>(std::move(steps));
  }
  fail("tokenizer.json: unsupported pre_tokenizer type {:?}", type);
}

}  // namespace mxlm::text
