// Feeds arbitrary bytes to the MiniMax-M3 output parsers (reasoning + tool calls) both whole and split
// into pieces chosen by the input, and checks the properties every output must have: no crash, streamed
// deltas adding up to exactly the non-streaming result, and every call's arguments a JSON object.
#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "text/output_parser.h"

namespace {

using json = nlohmann::ordered_json;

mxlm::text::ToolCallIdGenerator counting_ids() {
  auto n = std::make_shared<int>(0);
  return [n]() { return "call_" + std::to_string((*n)++); };
}

mxlm::text::OutputParserOptions options(bool enabled) {
  static const json tools =
      json::parse(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"n": {"type": "integer"}, "x": {"type": ["number", "null"]}, "b": {"type": "boolean"},
      "l": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "number"}}}},
      "o": {"type": "object", "additionalProperties": {"type": "integer"}}}}}}])");
  mxlm::text::OutputParserOptions o;
  o.thinking_enabled = enabled;
  o.tools = tools;
  o.ids = counting_ids();
  return o;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const bool enabled = data[0] & 1;
  const unsigned stride = 1 + data[1] % 17;
  std::string text(reinterpret_cast<const char*>(data + 2), size - 2);

  mxlm::text::ParsedOutput whole = mxlm::text::OutputParser::parse(text, options(enabled));
  for (const auto& call : whole.tool_calls) {
    json args = json::parse(call.arguments, nullptr, false);
    if (args.is_discarded() || !args.is_object()) std::abort();
  }

  mxlm::text::OutputParser streaming(options(enabled));
  mxlm::text::ParsedOutput pieces;
  auto take = [&](const mxlm::text::OutputDelta& d) {
    pieces.reasoning += d.reasoning;
    pieces.content += d.content;
    for (const auto& c : d.tool_calls) {
      if (c.first) pieces.tool_calls.push_back({c.id, c.name, ""});
      if (c.index >= static_cast<int>(pieces.tool_calls.size())) std::abort();
      pieces.tool_calls[static_cast<size_t>(c.index)].arguments += c.arguments;
    }
  };
  for (size_t i = 0; i < text.size(); i += stride) take(streaming.feed(std::string_view(text).substr(i, stride)));
  take(streaming.finish());

  if (pieces.reasoning != whole.reasoning || pieces.content != whole.content ||
      pieces.tool_calls.size() != whole.tool_calls.size()) {
    std::abort();
  }
  for (size_t i = 0; i < whole.tool_calls.size(); ++i) {
    if (pieces.tool_calls[i].name != whole.tool_calls[i].name ||
        pieces.tool_calls[i].arguments != whole.tool_calls[i].arguments) {
      std::abort();
    }
  }
  return 0;
}
