// The `minimax_m3` tool-call parser (spec m3_chat_and_tools.md §3–§4): finds
//   ]<]minimax[>[<tool_call>  ]<]minimax[>[<invoke name="F"> ]<]minimax[>[<arg>value]<]minimax[>[</arg> …
//   ]<]minimax[>[</invoke>  …  ]<]minimax[>[</tool_call>
// in (reasoning-free) model output and turns each invoke into an OpenAI tool call whose arguments are a
// JSON object typed by the request's tool schema.
//
// One incremental state machine serves streaming and non-streaming use (parse() = feed(all) + finish()),
// so streaming deltas concatenate to exactly the non-streaming result however the text is split:
//  - an invoke's header yields a delta with index, id, type and name (arguments "");
//  - each top-level argument yields `{"key": value` / `, "key": value` once its closing tag arrives;
//  - `]<]minimax[>[</invoke>` yields `}` (or `{}` for no arguments).
// Arguments are serialised like Python json.dumps(ensure_ascii=False) (", " and ": " separators), as vLLM
// does. Malformed output never throws: junk where a block expects an invoke turns the text back into
// content (including the block opener when no call was made yet); junk inside an invoke drops the rest of
// that invoke (its committed arguments stay, the call is closed); at the end of the output a truncated
// invoke is closed with what it has, a partial argument included. A repeated top-level argument keeps
// its first value (JSON objects have unique keys; the stream cannot take back the first one).
// Text after a block is content, and a later block is parsed again.
#pragma once

#include <nlohmann/json.hpp>

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace mxlm::text {

inline constexpr std::string_view kToolNamespace = "]<]minimax[>[";

struct ToolCall {
  std::string id;
  std::string name;
  std::string arguments;  // a JSON object
};

struct ToolCallDelta {
  int index = 0;
  std::string id;    // set on the first delta of a call
  std::string name;  // set on the first delta of a call
  std::string arguments;
  bool first = false;  // the delta that opens the call (carries id, type and name)

  // OpenAI `delta.tool_calls[]` entry.
  nlohmann::ordered_json to_json() const;
};

struct ToolParserDelta {
  std::string content;
  std::vector<ToolCallDelta> tool_calls;
};

struct ToolParseResult {
  std::string content;
  std::vector<ToolCall> tool_calls;
};

// Makes tool-call ids; the default gives vLLM-style random "chatcmpl-tool-<32 hex>" ids.
using ToolCallIdGenerator = std::function<std::string()>;
ToolCallIdGenerator random_tool_call_ids();

class ToolCallParser {
 public:
  // `tools`: the request's OpenAI tools array (or null); it supplies the argument schemas.
  explicit ToolCallParser(const nlohmann::ordered_json& tools = nullptr, ToolCallIdGenerator ids = {});
  ~ToolCallParser();
  ToolCallParser(ToolCallParser&&) noexcept;
  ToolCallParser& operator=(ToolCallParser&&) noexcept;

  ToolParserDelta feed(std::string_view text);
  ToolParserDelta finish();

  // Number of calls opened so far (finish_reason becomes "tool_calls" when > 0).
  int calls() const;

  static ToolParseResult parse(std::string_view text, const nlohmann::ordered_json& tools = nullptr,
                               ToolCallIdGenerator ids = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Schema-guided typing of one leaf text (exposed for tests): `schema` may be null.
nlohmann::ordered_json coerce_argument_text(const std::string& text, const nlohmann::ordered_json* schema);

}  // namespace mxlm::text
