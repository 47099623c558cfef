// The `minimax_m3` reasoning parser (spec m3_chat_and_tools.md §5): splits model output into reasoning
// (between `<mm:think>` and `</mm:think>`) and visible content, as text, incrementally.
//
// It is one state machine for streaming and non-streaming use (parse() = feed(all) + finish()), so the
// concatenated streaming deltas always equal the non-streaming result, however the text is split. A
// trailing partial marker is withheld until it is decided. Segmentation:
//  - thinking_mode "enabled": the prompt already ends with `<mm:think>`, so output starts in reasoning
//    (a repeated leading `<mm:think>` is dropped) and reasoning ends at the first `</mm:think>`;
//  - otherwise a leading `</mm:think>` is dropped (disabled mode, or an adaptive choice not to think)
//    and everything after it is content; else text before the first `<mm:think>` is content, the text
//    up to the next `</mm:think>` is reasoning, and everything after is content (later markers stay
//    visible). Without a closer, reasoning runs to the end (truncated output).
// Known difference from the spec's prose: in enabled mode a `<mm:think>` that is not at the start is
// reasoning text (the spec would re-split around it, which no streaming parser can do consistently).
#pragma once

#include <string>
#include <string_view>

namespace mxlm::text {

inline constexpr std::string_view kThinkBegin = "<mm:think>";
inline constexpr std::string_view kThinkEnd = "</mm:think>";

struct ReasoningDelta {
  std::string reasoning;
  std::string content;
};

struct ReasoningResult {
  std::string reasoning;
  std::string content;
  bool has_reasoning = false;  // a reasoning section was opened (even if empty)
};

class ReasoningParser {
 public:
  explicit ReasoningParser(bool thinking_enabled);

  ReasoningDelta feed(std::string_view text);
  ReasoningDelta finish();
  bool has_reasoning() const { return has_reasoning_; }
  // True once reasoning has ended (closer seen or content started): later text is all content.
  bool reasoning_done() const { return state_ == State::ContentAfter; }

  static ReasoningResult parse(std::string_view text, bool thinking_enabled);

 private:
  enum class State { Start, ContentBefore, ReasoningStart, Reasoning, ContentAfter };
  void process(bool final, ReasoningDelta& out);

  State state_;
  std::string buf_;
  bool has_reasoning_ = false;
};

// Longest suffix of `text` that is a proper prefix of `marker` (what a streaming parser must hold back).
size_t partial_marker_suffix(std::string_view text, std::string_view marker);

}  // namespace mxlm::text
