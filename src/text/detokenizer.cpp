#include "text/detokenizer.h"

#include <span>

namespace mxlm::text {

namespace {

bool ends_with_replacement(const std::string& s) {
  return s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0;
}

}  // namespace

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string IncrementalDetokenizer::decode_range(size_t begin, size_t end) const {
  return tokenizer_.decode(std::span<const uint32_t>(ids_.data() + begin, end - begin), skip_special_tokens_);
}

std::string IncrementalDetokenizer::add(uint32_t id) {
  ids_.push_back(id);
  // Byte tokens under ByteFallback wait for the end of their run; ids that decode to nothing (a
  // skipped special token, an unknown id) cannot end such a run, so they wait too.
  const bool silent = (skip_special_tokens_ && tokenizer_.is_special(id)) || !tokenizer_.id_to_token(id);
  if (tokenizer_.is_pending_byte(id) || silent) return {};
  const std::string prefix_text = decode_range(prefix_offset_, read_offset_);
  const std::string new_text = decode_range(prefix_offset_, ids_.size());
  // A trailing U+FFFD means the last token ended inside a character: wait for the rest.
  if (new_text.size() <= prefix_text.size() || ends_with_replacement(new_text) ||
      new_text.compare(0, prefix_text.size(), prefix_text) != 0) {
    return {};
  }
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  return new_text.substr(prefix_text.size());
}

std::string IncrementalDetokenizer::flush() {
  const std::string prefix_text = decode_range(prefix_offset_, read_offset_);
  const std::string new_text = decode_range(prefix_offset_, ids_.size());
  prefix_offset_ = read_offset_ = ids_.size();
  if (new_text.size() <= prefix_text.size() || new_text.compare(0, prefix_text.size(), prefix_text) != 0) return {};
  return new_text.substr(prefix_text.size());
}

}  // namespace mxlm::text
