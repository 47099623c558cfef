// ChatTemplate: the MiniMax-M3 template against the layout of spec m3_chat_and_tools.md §2 (written out
// by hand from the spec, independent of the interpreter), request normalisation, model-directory loading,
// and a round trip: tool calls rendered by the template parse back to the same arguments.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/error.h"
#include "text/chat_template.h"
#include "text/tool_parser.h"

namespace mxlm::text {
namespace {

using json = nlohmann::ordered_json;

const std::filesystem::path kRoot(MXLM_SOURCE_DIR);
const std::string NS = "]<]minimax[>[";

json weather_tools() {
  return json::parse(R"([{"type": "function", "function": {"name": "get_weather", "description": "Météo",
      "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
      "opts": {"type": "object", "properties": {"metric": {"type": "boolean"}, "levels": {"type": "array",
      "items": {"type": "number"}}}}}}}}])");
}

TEST(ChatTemplateM3, WorkedSkeletonOfTheSpec) {
  ChatTemplate t = ChatTemplate::from_model_dir(kRoot / "models/minimax-m3");
  ChatRequest r;
  r.messages = json::parse(R"([
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "I should call get_weather.",
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"}])");
  r.tools = weather_tools();
  r.add_generation_prompt = true;
  r.chat_template_kwargs = json{{"thinking_mode", "enabled"}};
  std::string p = t.render(r);
  const std::string identity =
      "Your model version is MiniMax-M3, developed by MiniMax. Knowledge cutoff: January 2026. Founded in early 2022, "
      "MiniMax is a global AI foundation model company committed to advancing the frontiers of AI towards AGI.";
  EXPECT_EQ(p.rfind("]~!b[]~b]system\n" + identity + "\n\n<thinking_instructions>\n", 0), 0u);
  EXPECT_NE(p.find("Current thinking mode: enabled. You MUST think step by step before every response, including after "
                   "receiving function/tool results.\n</thinking_instructions>[e~[\n]~b]developer\nYou are a helpful "
                   "assistant.\n\n# Tools\n"),
            std::string::npos);
  // tool.function as json.dumps(ensure_ascii=False): insertion order, ", " / ": " separators, raw Unicode.
  EXPECT_NE(
      p.find("\n<tools>\n<tool>{\"name\": \"get_weather\", \"description\": \"Météo\", \"parameters\": {\"type\": "
             "\"object\", \"properties\": {\"city\": {\"type\": \"string\"}, "),
      std::string::npos);
  EXPECT_NE(p.find("</tool>\n</tools>\n\n"), std::string::npos);
  EXPECT_NE(p.find("Example:\n\n" + NS + "<tool_call>\n" + NS + "<invoke name=\"tool-name-1\">"), std::string::npos);
  EXPECT_NE(p.find("]~b]user\nWhat is the weather in Paris?[e~[\n"), std::string::npos);
  EXPECT_NE(p.find("]~b]ai\n<mm:think>I should call get_weather.</mm:think>" + NS + "<tool_call>\n" + NS +
                   "<invoke name=\"get_weather\">" + NS + "<city>Paris" + NS + "</city>" + NS + "</invoke>\n" + NS +
                   "</tool_call>[e~[\n"),
            std::string::npos);
  EXPECT_NE(p.find("]~b]tool\n<response>{\"temp\": 21}</response>[e~[\n"), std::string::npos);
  const std::string tail = "]~b]ai\n<mm:think>";
  EXPECT_EQ(p.substr(p.size() - tail.size()), tail);
}

TEST(ChatTemplateM3, RolesContentPartsAndModes) {
  ChatTemplate t = ChatTemplate::from_model_dir(kRoot / "models/minimax-m3");
  ChatRequest r;
  r.messages = json::parse(R"([
    {"role": "root", "content": "ROOT"}, {"role": "developer", "content": "DEV"},
    {"role": "user", "content": [{"type": "text", "text": "look: "}, {"type": "image_url", "image_url": {"url": "x"}},
                                 {"type": "video_url", "video_url": {"url": "y"}}]},
    {"role": "assistant", "content": "<mm:think>\nhmm\n</mm:think>\n\nIt is a cat."},
    {"role": "observer", "content": "dropped"}])");
  r.add_generation_prompt = true;
  r.chat_template_kwargs = json{{"thinking_mode", "disabled"}};
  std::string p = t.render(r);
  EXPECT_EQ(p.rfind("]~!b[]~b]system\nROOT\n\n", 0), 0u);
  EXPECT_NE(p.find("Current thinking mode: disabled. Do not output any thinking process.\n"), std::string::npos);
  EXPECT_NE(p.find("]~b]developer\nDEV[e~[\n"), std::string::npos);
  EXPECT_NE(p.find("]~b]user\nlook: ]<]image[>[]<]video[>[[e~[\n"), std::string::npos);
  EXPECT_NE(p.find("]~b]ai\n<mm:think>hmm</mm:think>It is a cat.[e~[\n"), std::string::npos);
  EXPECT_EQ(p.find("dropped"), std::string::npos);
  EXPECT_EQ(p.substr(p.size() - 18), "]~b]ai\n</mm:think>");
}

TEST(ChatTemplateM3, ToolWithoutCallRaisesTheTemplatesError) {
  ChatTemplate t = ChatTemplate::from_model_dir(kRoot / "models/minimax-m3");
  ChatRequest r;
  r.messages = json::parse(R"([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])");
  try {
    t.render(r);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "Message has tool role, but there was no previous assistant message with a tool call!"),
              std::string::npos);
  }
}

TEST(ChatTemplateM3, RenderedToolCallsParseBackToTheSameArguments) {
  ChatTemplate t = ChatTemplate::from_model_dir(kRoot / "models/minimax-m3");
  const json args =
      json::parse(R"({"city": "Zürich <b>", "days": 3, "opts": {"metric": true, "levels": [1.5, 2, -3]}})");
  ChatRequest r;
  r.messages = json::array(
      {json{{"role", "user"}, {"content", "q"}},
       json{{"role", "assistant"},
            {"content", ""},
            {"tool_calls", json::array({json{{"type", "function"},
                                             {"function", {{"name", "get_weather"}, {"arguments", args}}}}})}}});
  r.tools = weather_tools();
  std::string p = t.render(r);
  size_t begin = p.rfind(NS + "<tool_call>");
  size_t end = p.rfind("[e~[");
  ASSERT_NE(begin, std::string::npos);
  ToolParseResult parsed = ToolCallParser::parse(p.substr(begin, end - begin), r.tools);
  ASSERT_EQ(parsed.tool_calls.size(), 1u);
  EXPECT_EQ(parsed.tool_calls[0].name, "get_weather");
  EXPECT_EQ(json::parse(parsed.tool_calls[0].arguments), args);
  EXPECT_EQ(parsed.content, "");
}

TEST(ChatTemplateNormalisation, ContentFormatsAndArguments) {
  ChatTemplate qwen = ChatTemplate::from_model_dir(kRoot / "tests/fixtures/chat_templates/qwen3");
  EXPECT_EQ(qwen.content_format(), ContentFormat::String);
  ChatTemplate m3 = ChatTemplate::from_model_dir(kRoot / "models/minimax-m3");
  EXPECT_EQ(m3.content_format(), ContentFormat::OpenAI);
  json messages = json::parse(R"([{"role": "user", "content": [{"type": "text", "text": "a"},
      {"type": "image_url", "image_url": {"url": "u"}}, {"type": "text", "text": "b"}]},
      {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"x\": [1]}"}}]}])");
  json q = qwen.normalize_messages(messages);
  EXPECT_EQ(q[0]["content"], "a\nb");
  EXPECT_EQ(q[1]["tool_calls"][0]["function"]["arguments"], json::parse(R"({"x": [1]})"));
  json m = m3.normalize_messages(messages);
  EXPECT_EQ(m[0]["content"],
            json::parse(R"([{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}])"));
  json bad =
      json::parse(R"([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}])");
  EXPECT_THROW(m3.normalize_messages(bad), Error);
}

TEST(ChatTemplateLoading, TokenizerConfigTemplatesAndSpecialTokens) {
  ChatTemplate ds = ChatTemplate::from_model_dir(kRoot / "tests/fixtures/chat_templates/deepseek_v3");
  ChatRequest r;
  r.messages = json::parse(R"([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])");
  r.add_generation_prompt = true;
  EXPECT_EQ(ds.render(r), "<｜begin▁of▁sentence｜>S<｜User｜>U<｜Assistant｜>");
  ChatTemplate qwen = ChatTemplate::from_model_dir(kRoot / "tests/fixtures/chat_templates/qwen3");
  r.chat_template_kwargs = json{{"enable_thinking", false}};
  EXPECT_EQ(qwen.render(r),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
            "<think>\n\n</think>\n\n");
  EXPECT_THROW(ChatTemplate::from_model_dir(kRoot / "tests/fixtures"), Error);
}

}  // namespace
}  // namespace mxlm::text
