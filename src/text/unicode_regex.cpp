#define PCRE2_CODE_UNIT_WIDTH 8
#include "text/unicode_regex.h"

#include <pcre2.h>

#include "core/error.h"
#include "text/unicode.h"

namespace mxlm::text {

namespace {

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return reinterpret_cast<const char*>(buffer);
}

// Long whitespace or letter runs make the JIT backtrack deeply; its default 32 KiB stack is too small
// for megabyte inputs, so every thread gets a growable one.
struct ThreadScratch {
  pcre2_jit_stack* stack = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_match_data* data = nullptr;
  ThreadScratch() {
    stack = pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, nullptr);
    context = pcre2_match_context_create(nullptr);
    pcre2_jit_stack_assign(context, nullptr, stack);
    data = pcre2_match_data_create(16, nullptr);
  }
  ~ThreadScratch() {
    pcre2_match_data_free(data);
    pcre2_match_context_free(context);
    pcre2_jit_stack_free(stack);
  }
};

ThreadScratch& scratch() {
  thread_local ThreadScratch s;
  return s;
}

// Oniguruma's Unicode classes, spelled out. PCRE2's \s also matches U+180E (MONGOLIAN VOWEL
// SEPARATOR, no longer a space since Unicode 6.3); its \w lacks marks and includes Nl/No digits.
constexpr const char* kSpace = R"(\t-\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";
constexpr const char* kWord = R"(\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D})";

// Rewrites \s, \S, \w, \W so PCRE2 matches what Oniguruma (HF's regex engine) matches.
std::string oniguruma_classes(const std::string& pattern) {
  std::string out;
  out.reserve(pattern.size() + 64);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      if (e == 's') {
        out += in_class ? fmt::format("{}", kSpace) : fmt::format("[{}]", kSpace);
      } else if (e == 'S') {
        out += in_class ? std::string(R"(\S\x{180E})") : fmt::format("[^{}]", kSpace);
      } else if (e == 'w') {
        out += in_class ? fmt::format("{}", kWord) : fmt::format("[{}]", kWord);
      } else if (e == 'W' && !in_class) {
        out += fmt::format("[^{}]", kWord);
      } else {
        out.push_back(c);
        out.push_back(e);
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out.push_back(pattern[++i]);
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out.push_back(pattern[++i]);
      continue;
    }
    if (in_class && c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
      const size_t close = pattern.find(":]", i + 2);
      if (close != std::string::npos) {
        out.append(pattern, i, close + 2 - i);
        i = close + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out.push_back(c);
  }
  return out;
}

}  // namespace

struct UnicodeRegex::Impl {
  pcre2_code* code = nullptr;
  bool jit = false;
};

UnicodeRegex::UnicodeRegex(const std::string& pattern) : pattern_(pattern), impl_(std::make_unique<Impl>()) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  const std::string translated = oniguruma_classes(pattern);
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(), PCRE2_UTF | PCRE2_UCP,
                              &error, &offset, nullptr);
  if (impl_->code == nullptr) fail("invalid regex {:?} at offset {}: {}", pattern, offset, pcre2_message(error));
  impl_->jit = pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE) == 0;
}

UnicodeRegex::~UnicodeRegex() {
  if (impl_ && impl_->code) pcre2_code_free(impl_->code);
}

std::string UnicodeRegex::escape(std::string_view literal) {
  std::string out;
  for (char c : literal) {
    const unsigned char u = static_cast<unsigned char>(c);
    const bool word = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (u < 0x80 && !word) {
      if (c == '\n') {
        out += "\\n";
      } else if (c == '\r') {
        out += "\\r";
      } else if (c == '\t') {
        out += "\\t";
      } else if (u < 0x20 || u == 0x7F) {
        out += fmt::format("\\x{{{:x}}}", u);
      } else {
        out.push_back('\\');
        out.push_back(c);
      }
    } else {
      out.push_back(c);
    }
  }
  return out;
}

bool UnicodeRegex::find(std::string_view text, size_t start, size_t& begin, size_t& end) const {
  ThreadScratch& s = scratch();
  const auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  int rc = 0;
  if (impl_->jit) {
    rc = pcre2_jit_match(impl_->code, subject, text.size(), start, 0, s.data, s.context);
  } else {
    rc = pcre2_match(impl_->code, subject, text.size(), start, PCRE2_NO_UTF_CHECK, s.data, s.context);
  }
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) fail("regex {:?} failed on a {}-byte input: {}", pattern_, text.size(), pcre2_message(rc));
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(s.data);
  begin = ovector[0];
  end = ovector[1];
  if (end < begin) end = begin;  // \K tricks can report end < begin; treat as empty
  return true;
}

std::vector<std::pair<size_t, size_t>> UnicodeRegex::find_all(std::string_view text) const {
  std::vector<std::pair<size_t, size_t>> matches;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t begin = 0, end = 0;
    if (!find(text, pos, begin, end)) break;
    matches.emplace_back(begin, end);
    if (end > begin) {
      pos = end;
    } else {
      if (end >= text.size()) break;
      pos = end + utf8_length(static_cast<unsigned char>(text[end]));
    }
  }
  return matches;
}

}  // namespace mxlm::text
