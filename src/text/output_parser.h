// Model output → OpenAI message parts for MiniMax-M3: the reasoning parser runs first and the tool-call
// parser sees only the content it leaves (spec m3_chat_and_tools.md §4.1, §5). Streaming and
// non-streaming share the same state machines, so streamed deltas always add up to the parse() result.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>
#include <vector>

#include "text/reasoning_parser.h"
#include "text/tool_parser.h"

namespace mxlm::text {

struct OutputParserOptions {
  bool parse_reasoning = true;    // --reasoning-parser minimax_m3
  bool thinking_enabled = false;  // chat_template_kwargs.thinking_mode == "enabled"
  bool parse_tool_calls = true;   // --tool-call-parser minimax_m3 with tools in the request
  nlohmann::ordered_json tools;   // the request's tools (argument schemas)
  ToolCallIdGenerator ids;        // default: random vLLM-style ids
};

struct OutputDelta {
  std::string reasoning;
  std::string content;
  std::vector<ToolCallDelta> tool_calls;
  bool empty() const { return reasoning.empty() && content.empty() && tool_calls.empty(); }
};

struct ParsedOutput {
  std::string reasoning;
  bool has_reasoning = false;
  std::string content;
  std::vector<ToolCall> tool_calls;
};

// thinking_mode == "enabled" in a request's chat_template_kwargs (the only switch the M3 template reads).
bool thinking_enabled(const nlohmann::ordered_json& chat_template_kwargs);

class OutputParser {
 public:
  explicit OutputParser(OutputParserOptions options);

  // Text pieces may split UTF-8 characters; emitted text never does.
  OutputDelta feed(std::string_view text);
  OutputDelta finish();
  int tool_calls() const { return tools_.calls(); }

  static ParsedOutput parse(std::string_view text, OutputParserOptions options);

 private:
  void route(const ReasoningDelta& r, bool final, OutputDelta& out);

  OutputParserOptions options_;
  ReasoningParser reasoning_;
  ToolCallParser tools_;
  std::string utf8_tail_;
};

}  // namespace mxlm::text
