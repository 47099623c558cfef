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

}  // namespace

struct UnicodeRegex::Impl {
  pcre2_code* code = nullptr;
  bool jit = false;
};

UnicodeRegex::UnicodeRegex(const std::string& pattern) : pattern_(pattern), impl_(std::make_unique<Impl>()) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
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
