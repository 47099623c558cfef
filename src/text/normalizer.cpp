#include "text/normalizer.h"

#include <nlohmann/json.hpp>

#include <vector>

#include "core/error.h"
#include "text/tokenizer_json.h"
#include "text/unicode.h"
#include "text/unicode_regex.h"

namespace mxlm::text {

namespace {

class UnicodeForm final : public Normalizer {
 public:
  explicit UnicodeForm(NormalForm form) : form_(form) {}
  std::string normalize(std::string_view text) const override { return unicode_normalize(text, form_); }

 private:
  NormalForm form_;
};

class CaseMap final : public Normalizer {
 public:
  explicit CaseMap(bool lower) : lower_(lower) {}
  std::string normalize(std::string_view text) const override {
    std::string out;
    out.reserve(text.size());
    size_t i = 0;
    while (i < text.size()) {
      const char32_t cp = next_code_point(text, i);
      lower_ ? append_lowercase(out, cp) : append_uppercase(out, cp);
    }
    return out;
  }

 private:
  bool lower_;
};

class Replace final : public Normalizer {
 public:
  Replace(const std::string& pattern, std::string content) : regex_(pattern), content_(std::move(content)) {}
  std::string normalize(std::string_view text) const override { return replace_all(regex_, text, content_); }

 private:
  UnicodeRegex regex_;
  std::string content_;
};

class Prepend final : public Normalizer {
 public:
  explicit Prepend(std::string prefix) : prefix_(std::move(prefix)) {}
  std::string normalize(std::string_view text) const override {
    return text.empty() ? std::string() : prefix_ + std::string(text);
  }

 private:
  std::string prefix_;
};

class Append final : public Normalizer {
 public:
  explicit Append(std::string suffix) : suffix_(std::move(suffix)) {}
  std::string normalize(std::string_view text) const override {
    return text.empty() ? std::string() : std::string(text) + suffix_;
  }

 private:
  std::string suffix_;
};

class Strip final : public Normalizer {
 public:
  Strip(bool left, bool right) : left_(left), right_(right) {}
  std::string normalize(std::string_view text) const override {
    size_t begin = 0, end = text.size();
    if (left_) {
      while (begin < end) {
        size_t i = begin;
        if (!is_rust_whitespace(next_code_point(text, i))) break;
        begin = i;
      }
    }
    if (right_) {
      while (end > begin) {
        size_t start = end - 1;
        while (start > begin && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
        size_t i = start;
        if (!is_rust_whitespace(next_code_point(text, i))) break;
        end = start;
      }
    }
    return std::string(text.substr(begin, end - begin));
  }

 private:
  bool left_, right_;
};

class StripAccents final : public Normalizer {
 public:
  std::string normalize(std::string_view text) const override {
    std::string out;
    size_t i = 0;
    while (i < text.size()) {
      const size_t start = i;
      const char32_t cp = next_code_point(text, i);
      if (!is_combining_mark(cp)) out.append(text.substr(start, i - start));
    }
    return out;
  }
};

class ByteLevelNormalizer final : public Normalizer {
 public:
  std::string normalize(std::string_view text) const override {
    std::string out;
    for (unsigned char b : text) append_utf8(out, byte_to_char(b));
    return out;
  }
};

class Sequence final : public Normalizer {
 public:
  explicit Sequence(std::vector<std::unique_ptr<Normalizer>> steps) : steps_(std::move(steps)) {}
  std::string normalize(std::string_view text) const override {
    std::string current(text);
    for (const auto& step : steps_) current = step->normalize(current);
    return current;
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

}  // namespace

std::unique_ptr<Normalizer> make_normalizer(const nlohmann::json& config) {
  if (config.is_null()) return nullptr;
  const std::string type = json_string(config, "type", "normalizer");
  if (type == "NFC") return std::make_unique<UnicodeForm>(NormalForm::kNFC);
  if (type == "NFD") return std::make_unique<UnicodeForm>(NormalForm::kNFD);
  if (type == "NFKC") return std::make_unique<UnicodeForm>(NormalForm::kNFKC);
  if (type == "NFKD") return std::make_unique<UnicodeForm>(NormalForm::kNFKD);
  if (type == "Lowercase") return std::make_unique<CaseMap>(true);
  if (type == "Uppercase") return std::make_unique<CaseMap>(false);
  if (type == "Replace") {
    return std::make_unique<Replace>(pattern_regex(config, "normalizer Replace"),
                                     json_string(config, "content", "normalizer Replace"));
  }
  if (type == "Prepend") return std::make_unique<Prepend>(json_string(config, "prepend", "normalizer Prepend"));
  if (type == "Append") return std::make_unique<Append>(json_string(config, "append", "normalizer Append"));
  if (type == "Strip") {
    return std::make_unique<Strip>(config.value("strip_left", true), config.value("strip_right", true));
  }
  if (type == "StripAccents") return std::make_unique<StripAccents>();
  if (type == "ByteLevel") return std::make_unique<ByteLevelNormalizer>();
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Normalizer>> steps;
    for (const auto& step : json_array(config, "normalizers", "normalizer Sequence")) {
      if (auto n = make_normalizer(step)) steps.push_back(std::move(n));
    }
    return std::make_unique<Sequence>(std::move(steps));
  }
  fail("tokenizer.json: unsupported normalizer type {:?}", type);
}

}  // namespace mxlm::text
