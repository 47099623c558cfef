#include "text/output_parser.h"

namespace mxlm::text {
namespace {

// Length of the longest prefix of `s` that does not end inside a UTF-8 sequence.
size_t complete_utf8_prefix(std::string_view s) {
  size_t n = s.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    unsigned char c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back for the lead byte
    size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    return need > back ? n - back : n;
  }
  return n;
}

}  // namespace

bool thinking_enabled(const nlohmann::ordered_json& kwargs) {
  return kwargs.is_object() && kwargs.contains("thinking_mode") && kwargs["thinking_mode"] == "enabled";
}

OutputParser::OutputParser(OutputParserOptions options)
    : options_(std::move(options)), reasoning_(options_.thinking_enabled), tools_(options_.tools, options_.ids) {}

void OutputParser::route(const ReasoningDelta& r, bool final, OutputDelta& out) {
  out.reasoning += r.reasoning;
  if (!options_.parse_tool_calls) {
    out.content += r.content;
    return;
  }
  for (ToolParserDelta t : {tools_.feed(r.content), final ? tools_.finish() : ToolParserDelta{}}) {
    out.content += t.content;
    for (auto& c : t.tool_calls) out.tool_calls.push_back(std::move(c));
  }
}

OutputDelta OutputParser::feed(std::string_view text) {
  utf8_tail_.append(text);
  size_t n = complete_utf8_prefix(utf8_tail_);
  std::string ready = utf8_tail_.substr(0, n);
  utf8_tail_.erase(0, n);
  OutputDelta out;
  if (options_.parse_reasoning) {
    route(reasoning_.feed(ready), false, out);
  } else {
    route(ReasoningDelta{"", ready}, false, out);
  }
  return out;
}

OutputDelta OutputParser::finish() {
  std::string rest = std::move(utf8_tail_);
  utf8_tail_.clear();
  OutputDelta out;
  if (options_.parse_reasoning) {
    ReasoningDelta r = reasoning_.feed(rest);
    ReasoningDelta f = reasoning_.finish();
    r.reasoning += f.reasoning;
    r.content += f.content;
    route(r, true, out);
  } else {
    route(ReasoningDelta{"", rest}, true, out);
  }
  return out;
}

ParsedOutput OutputParser::parse(std::string_view text, OutputParserOptions options) {
  OutputParser parser(std::move(options));
  ParsedOutput result;
  for (OutputDelta d : {parser.feed(text), parser.finish()}) {
    result.reasoning += d.reasoning;
    result.content += d.content;
    for (auto& c : d.tool_calls) {
      if (c.first) result.tool_calls.push_back({c.id, c.name, ""});
      result.tool_calls[static_cast<size_t>(c.index)].arguments += c.arguments;
    }
  }
  result.has_reasoning = options.parse_reasoning && parser.reasoning_.has_reasoning();
  return result;
}

}  // namespace mxlm::text
