// MiniMax-M3 reasoning and tool-call parsers against hand-recorded outputs (tests/fixtures/m3_outputs),
// replayed whole, split at every byte position, and split at random points: the streaming deltas must add
// up to the non-streaming result, which must equal the expected values worked out from the spec.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "text/output_parser.h"

namespace mxlm::text {
namespace {

using json = nlohmann::ordered_json;

const std::filesystem::path kFixtures = std::filesystem::path(MXLM_SOURCE_DIR) / "tests/fixtures/m3_outputs";

std::string read(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ToolCallIdGenerator counting_ids() {
  auto n = std::make_shared<int>(0);
  return [n]() { return "call_" + std::to_string((*n)++); };
}

OutputParserOptions options_for(const json& expect, const json& tools) {
  OutputParserOptions o;
  o.thinking_enabled = expect["thinking_enabled"].get<bool>();
  o.tools = tools;
  o.ids = counting_ids();
  return o;
}

// Feeds `text` in pieces cut at `cuts` (sorted positions) and accumulates the deltas.
ParsedOutput stream(const std::string& text, const std::vector<size_t>& cuts, OutputParserOptions o) {
  OutputParser parser(std::move(o));
  ParsedOutput r;
  auto take = [&](const OutputDelta& d) {
    r.reasoning += d.reasoning;
    r.content += d.content;
    for (const auto& c : d.tool_calls) {
      if (c.first) {
        EXPECT_EQ(c.index, static_cast<int>(r.tool_calls.size())) << "calls open in order";
        r.tool_calls.push_back({c.id, c.name, ""});
      }
      EXPECT_LT(c.index, static_cast<int>(r.tool_calls.size())) << "arguments only after the call opened";
      if (c.index < static_cast<int>(r.tool_calls.size()))
        r.tool_calls[static_cast<size_t>(c.index)].arguments += c.arguments;
    }
  };
  size_t prev = 0;
  for (size_t cut : cuts) {
    take(parser.feed(std::string_view(text).substr(prev, cut - prev)));
    prev = cut;
  }
  take(parser.feed(std::string_view(text).substr(prev)));
  take(parser.finish());
  return r;
}

void expect_same(const ParsedOutput& a, const ParsedOutput& b, const std::string& where) {
  EXPECT_EQ(a.reasoning, b.reasoning) << where;
  EXPECT_EQ(a.content, b.content) << where;
  ASSERT_EQ(a.tool_calls.size(), b.tool_calls.size()) << where;
  for (size_t i = 0; i < a.tool_calls.size(); ++i) {
    EXPECT_EQ(a.tool_calls[i].id, b.tool_calls[i].id) << where;
    EXPECT_EQ(a.tool_calls[i].name, b.tool_calls[i].name) << where;
    EXPECT_EQ(a.tool_calls[i].arguments, b.tool_calls[i].arguments) << where;
  }
}

class M3RecordedOutputs : public ::testing::TestWithParam<std::string> {};

TEST_P(M3RecordedOutputs, NonStreamingMatchesExpected) {
  const json all = json::parse(read(kFixtures / "expected.json"));
  const json tools = json::parse(read(kFixtures / "tools.json"));
  const json& expect = all[GetParam()];
  const std::string text = read(kFixtures / (GetParam() + ".txt"));
  ParsedOutput r = OutputParser::parse(text, options_for(expect, tools));
  if (expect["reasoning"].is_null()) {
    EXPECT_FALSE(r.has_reasoning);
    EXPECT_EQ(r.reasoning, "");
  } else {
    EXPECT_TRUE(r.has_reasoning);
    EXPECT_EQ(r.reasoning, expect["reasoning"].get<std::string>());
  }
  EXPECT_EQ(r.content, expect["content"].get<std::string>());
  ASSERT_EQ(r.tool_calls.size(), expect["tool_calls"].size());
  for (size_t i = 0; i < r.tool_calls.size(); ++i) {
    EXPECT_EQ(r.tool_calls[i].name, expect["tool_calls"][i]["name"].get<std::string>());
    EXPECT_EQ(r.tool_calls[i].id, "call_" + std::to_string(i));
    json args = json::parse(r.tool_calls[i].arguments);  // must be valid JSON
    EXPECT_EQ(args, expect["tool_calls"][i]["arguments"]) << r.tool_calls[i].arguments;
  }
}

TEST_P(M3RecordedOutputs, EverySingleSplitStreamsTheSameResult) {
  const json all = json::parse(read(kFixtures / "expected.json"));
  const json tools = json::parse(read(kFixtures / "tools.json"));
  const json& expect = all[GetParam()];
  const std::string text = read(kFixtures / (GetParam() + ".txt"));
  const ParsedOutput whole = OutputParser::parse(text, options_for(expect, tools));
  for (size_t cut = 0; cut <= text.size(); ++cut) {
    expect_same(stream(text, {cut}, options_for(expect, tools)), whole, "split at " + std::to_string(cut));
  }
  // Byte by byte: every position is a split.
  std::vector<size_t> all_cuts;
  for (size_t i = 1; i < text.size(); ++i) all_cuts.push_back(i);
  expect_same(stream(text, all_cuts, options_for(expect, tools)), whole, "byte by byte");
}

TEST_P(M3RecordedOutputs, RandomMultiSplitsStreamTheSameResult) {
  const json all = json::parse(read(kFixtures / "expected.json"));
  const json tools = json::parse(read(kFixtures / "tools.json"));
  const json& expect = all[GetParam()];
  const std::string text = read(kFixtures / (GetParam() + ".txt"));
  const ParsedOutput whole = OutputParser::parse(text, options_for(expect, tools));
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<size_t> cuts;
    int n = 1 + static_cast<int>(rng() % 12);
    for (int i = 0; i < n; ++i) cuts.push_back(rng() % (text.size() + 1));
    std::sort(cuts.begin(), cuts.end());
    expect_same(stream(text, cuts, options_for(expect, tools)), whole, "trial " + std::to_string(trial));
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, M3RecordedOutputs, ::testing::ValuesIn([] {
                           std::vector<std::string> names;
                           json all = json::parse(read(kFixtures / "expected.json"));
                           for (auto it = all.begin(); it != all.end(); ++it) names.push_back(it.key());
                           return names;
                         }()),
                         [](const auto& info) { return info.param; });

TEST(M3ToolParser, ArgumentsAreSerialisedLikePythonJsonDumps) {
  const std::string ns(kToolNamespace);
  json tools = json::parse(R"([{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{
      "x":{"type":"number"},"s":{"type":"string"},"b":{"type":"boolean"},"o":{"type":"object"}}}}}])");
  std::string text = ns + "<tool_call>\n" + ns + "<invoke name=\"f\">" + ns + "<x>2.50" + ns + "</x>" + ns +
                     "<s>é \"q\"\n" + ns + "</s>" + ns + "<b>yes" + ns + "</b>" + ns + "<o>{\"k\": [1, 2]}" + ns +
                     "</o>" + ns + "</invoke>\n" + ns + "</tool_call>";
  ToolParseResult r = ToolCallParser::parse(text, tools, counting_ids());
  ASSERT_EQ(r.tool_calls.size(), 1u);
  EXPECT_EQ(r.tool_calls[0].arguments, "{\"x\": 2.5, \"s\": \"é \\\"q\\\"\\n\", \"b\": true, \"o\": {\"k\": [1, 2]}}");
}

TEST(M3ToolParser, StreamingDeltasHaveOpenAIShape) {
  const std::string ns(kToolNamespace);
  ToolCallParser parser(nullptr, counting_ids());
  ToolParserDelta d =
      parser.feed("Hi " + ns + "<tool_call>\n" + ns + "<invoke name=\"g\">" + ns + "<a>1" + ns + "</a>");
  EXPECT_EQ(d.content, "Hi ");
  ASSERT_EQ(d.tool_calls.size(), 1u);
  EXPECT_EQ(d.tool_calls[0].to_json().dump(),
            R"({"index":0,"id":"call_0","type":"function","function":{"name":"g","arguments":"{\"a\": \"1\""}})");
  d = parser.feed(ns + "</invoke>\n" + ns + "</tool_call>");
  ASSERT_EQ(d.tool_calls.size(), 1u);
  EXPECT_EQ(d.tool_calls[0].to_json().dump(), R"({"index":0,"function":{"arguments":"}"}})");
  EXPECT_EQ(parser.calls(), 1);
}

TEST(M3ToolParser, PartialMarkerIsHeldBackNotEmitted) {
  ToolCallParser parser(nullptr, counting_ids());
  ToolParserDelta d = parser.feed("text ]<]mini");
  EXPECT_EQ(d.content, "text ");
  d = parser.feed("x");  // no longer a marker prefix
  EXPECT_EQ(d.content, "]<]minix");
  EXPECT_EQ(parser.finish().content, "");
}

TEST(M3ToolParser, SchemaCoercion) {
  auto s = [](const char* schema) { return json::parse(schema); };
  json t = s(R"({"type":"integer"})");
  EXPECT_EQ(coerce_argument_text(" 42 ", &t), json(42));
  EXPECT_EQ(coerce_argument_text("4.2", &t), json("4.2"));  // not an integer: stays text
  t = s(R"({"type":"number"})");
  EXPECT_EQ(coerce_argument_text("3.0", &t), json(3));
  EXPECT_EQ(coerce_argument_text("1e-5", &t), json(1e-5));
  t = s(R"({"type":["boolean","null"]})");
  EXPECT_EQ(coerce_argument_text("NULL", &t), json(nullptr));
  EXPECT_EQ(coerce_argument_text("off", &t), json(false));
  t = s(R"({"type":"string"})");
  EXPECT_EQ(coerce_argument_text("null", &t), json("null"));
  t = s(R"({"type":"array"})");
  EXPECT_EQ(coerce_argument_text("", &t), json::array());
  t = s(R"({"anyOf":[{"type":"integer"},{"type":"string"}]})");
  EXPECT_EQ(coerce_argument_text("7", &t), json(7));
  EXPECT_EQ(coerce_argument_text("seven", &t), json("seven"));
  EXPECT_EQ(coerce_argument_text("7", nullptr), json("7"));
}

TEST(M3ReasoningParser, Segmentation) {
  auto r = ReasoningParser::parse("before<mm:think>mid</mm:think>after</mm:think>", false);
  EXPECT_EQ(r.content, "beforeafter</mm:think>");
  EXPECT_EQ(r.reasoning, "mid");
  r = ReasoningParser::parse("<mm:think>never closed", false);
  EXPECT_EQ(r.reasoning, "never closed");
  EXPECT_EQ(r.content, "");
  r = ReasoningParser::parse("a </mm:think> b", false);  // no opener and not at start: all content
  EXPECT_EQ(r.content, "a </mm:think> b");
  EXPECT_FALSE(r.has_reasoning);
  r = ReasoningParser::parse("</mm:think>", true);  // enabled with an immediate closer: empty reasoning
  EXPECT_EQ(r.reasoning, "");
  EXPECT_TRUE(r.has_reasoning);
  EXPECT_EQ(r.content, "");
}

TEST(M3OutputParser, Utf8IsNeverSplitInDeltas) {
  OutputParserOptions o;
  o.ids = counting_ids();
  OutputParser parser(o);
  std::string text = "é🌍";
  OutputDelta d1 = parser.feed(text.substr(0, 1));
  EXPECT_EQ(d1.content, "");
  OutputDelta d2 = parser.feed(text.substr(1, 3));
  EXPECT_EQ(d2.content, "é");
  OutputDelta d3 = parser.feed(text.substr(4));
  EXPECT_EQ(d3.content, "🌍");
}

TEST(M3OutputParser, ToolCallsOnlyInContentNotInReasoning) {
  const std::string ns(kToolNamespace);
  OutputParserOptions o;
  o.ids = counting_ids();
  std::string text = "<mm:think>I might write " + ns + "<tool_call> here</mm:think>ok";
  ParsedOutput r = OutputParser::parse(text, o);
  EXPECT_EQ(r.reasoning, "I might write " + ns + "<tool_call> here");
  EXPECT_EQ(r.content, "ok");
  EXPECT_TRUE(r.tool_calls.empty());
}

TEST(M3ToolParser, GarbageNeverCrashesAndArgumentsStayValidJson) {
  const std::string ns(kToolNamespace);
  const std::vector<std::string> pieces = {ns,
                                           "<tool_call>",
                                           "</tool_call>",
                                           "<invoke name=\"f\">",
                                           "</invoke>",
                                           "<a>",
                                           "</a>",
                                           "<item>",
                                           "</item>",
                                           "x",
                                           "\n",
                                           " ",
                                           "\"",
                                           "<",
                                           ">",
                                           "1"};
  std::mt19937 rng(7);
  for (int trial = 0; trial < 3000; ++trial) {
    std::string text;
    int n = 1 + static_cast<int>(rng() % 40);
    for (int i = 0; i < n; ++i) text += pieces[rng() % pieces.size()];
    ToolParseResult r = ToolCallParser::parse(text, nullptr, counting_ids());
    for (const auto& c : r.tool_calls) {
      json args = json::parse(c.arguments, nullptr, false);
      ASSERT_FALSE(args.is_discarded()) << text << " -> " << c.arguments;
      ASSERT_TRUE(args.is_object());
    }
  }
}

}  // namespace
}  // namespace mxlm::text
