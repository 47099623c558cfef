#include "text/reasoning_parser.h"

#include <algorithm>

namespace mxlm::text {

size_t partial_marker_suffix(std::string_view text, std::string_view marker) {
  size_t max = std::min(text.size(), marker.size() - 1);
  for (size_t k = max; k > 0; --k) {
    if (text.substr(text.size() - k) == marker.substr(0, k)) return k;
  }
  return 0;
}

ReasoningParser::ReasoningParser(bool thinking_enabled)
    : state_(thinking_enabled ? State::ReasoningStart : State::Start), has_reasoning_(thinking_enabled) {}

ReasoningDelta ReasoningParser::feed(std::string_view text) {
  buf_.append(text);
  ReasoningDelta out;
  process(false, out);
  return out;
}

ReasoningDelta ReasoningParser::finish() {
  ReasoningDelta out;
  process(true, out);
  return out;
}

void ReasoningParser::process(bool final, ReasoningDelta& out) {
  while (true) {
    std::string_view b = buf_;
    switch (state_) {
      case State::Start:
        if (b.substr(0, kThinkEnd.size()) == kThinkEnd) {
          buf_.erase(0, kThinkEnd.size());
          state_ = State::ContentAfter;
          continue;
        }
        if (!final && kThinkEnd.substr(0, b.size()) == b) return;  // could still become the closer
        state_ = State::ContentBefore;
        continue;
      case State::ContentBefore: {
        size_t p = b.find(kThinkBegin);
        if (p != std::string_view::npos) {
          out.content.append(b.substr(0, p));
          buf_.erase(0, p + kThinkBegin.size());
          state_ = State::Reasoning;
          has_reasoning_ = true;
          continue;
        }
        size_t keep = final ? 0 : partial_marker_suffix(b, kThinkBegin);
        out.content.append(b.substr(0, b.size() - keep));
        buf_.erase(0, b.size() - keep);
        return;
      }
      case State::ReasoningStart:
        if (b.substr(0, kThinkBegin.size()) == kThinkBegin) {
          buf_.erase(0, kThinkBegin.size());
          state_ = State::Reasoning;
          continue;
        }
        if (!final && kThinkBegin.substr(0, b.size()) == b) return;
        state_ = State::Reasoning;
        continue;
      case State::Reasoning: {
        size_t p = b.find(kThinkEnd);
        if (p != std::string_view::npos) {
          out.reasoning.append(b.substr(0, p));
          buf_.erase(0, p + kThinkEnd.size());
          state_ = State::ContentAfter;
          continue;
        }
        size_t keep = final ? 0 : partial_marker_suffix(b, kThinkEnd);
        out.reasoning.append(b.substr(0, b.size() - keep));
        buf_.erase(0, b.size() - keep);
        return;
      }
      case State::ContentAfter:
        out.content.append(b);
        buf_.clear();
        return;
    }
  }
}

ReasoningResult ReasoningParser::parse(std::string_view text, bool thinking_enabled) {
  ReasoningParser p(thinking_enabled);
  ReasoningDelta a = p.feed(text);
  ReasoningDelta b = p.finish();
  return {a.reasoning + b.reasoning, a.content + b.content, p.has_reasoning()};
}

}  // namespace mxlm::text
