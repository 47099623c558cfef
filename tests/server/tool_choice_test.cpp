// The server's token-byte table and tool-choice constraint on the serve-tiny tokenizer (byte-level BPE): the
// bytes of the tokens of any text add up to the text's UTF-8 bytes, also where a token holds part of a character;
// and the constraints spell the M3 tool-call prefix of the spec, token by token.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <random>
#include <set>
#include <string>

#include "server/tool_choice.h"

namespace mxlm::server {
namespace {

const text::Tokenizer& tokenizer() {
  static const auto t = text::Tokenizer::load(std::filesystem::path(MXLM_SOURCE_DIR) / "tests/fixtures/serve-tiny");
  return t;
}

TEST(ToolChoice, TokenBytesConcatenateToTheText) {
  const auto bytes = token_bytes(tokenizer());
  ASSERT_EQ(bytes.size(), tokenizer().vocab_size());
  for (const std::string text : {"get_weather\">", "caf\xC3\xA9 \xE6\x9D\xB1\xE4\xBA\xAC \xF0\x9F\x99\x82 ok",
                                 "]<]minimax[>[<tool_call>\n]<]minimax[>[<invoke name=\""}) {
    std::string joined;
    for (const uint32_t id : tokenizer().encode(text)) joined += bytes[id];
    EXPECT_EQ(joined, text);
  }
}

// Greedy decoding on random logits under the constraint until it lets go; returns the bytes generated.
std::string run(const engine::ToolChoiceConstraint& c, const engine::TokenBytes& bytes, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<int32_t> out;
  std::string text;
  while (c.active(out) && out.size() < 200) {
    std::vector<float> logits(bytes.size());
    for (auto& l : logits) l = d(rng);
    c.apply(logits, out);
    const auto t = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.push_back(t);
    text += bytes[static_cast<size_t>(t)];
  }
  return text;
}

const std::string kOpen = "]<]minimax[>[<tool_call>\n]<]minimax[>[<invoke name=\"";

TEST(ToolChoice, ConstraintsSpellTheToolCallPrefixOfTheSpec) {
  const auto bytes = std::make_shared<const engine::TokenBytes>(token_bytes(tokenizer()));
  const auto tools = nlohmann::ordered_json::parse(
      R"([{"type": "function", "function": {"name": "get"}}, {"type": "function", "function": {"name": "get_weather"}},
          {"type": "function", "function": {"name": "caf\u00e9_\u6771"}}])");
  const auto named = make_tool_choice_constraint(tokenizer(), bytes, tools, "get_weather", false);
  EXPECT_EQ(run(*named, *bytes, 1), kOpen + "get_weather\">");
  const auto required = make_tool_choice_constraint(tokenizer(), bytes, tools, "", false);
  std::set<std::string> seen;
  for (uint32_t seed = 0; seed < 40; ++seed) {
    const std::string text = run(*required, *bytes, seed);
    ASSERT_EQ(text.compare(0, kOpen.size(), kOpen), 0) << text;
    const std::string rest = text.substr(kOpen.size());
    const auto end = rest.find("\">");
    ASSERT_NE(end, std::string::npos) << text;
    const std::string name = rest.substr(0, end);
    EXPECT_TRUE(name == "get" || name == "get_weather" || name == "caf\xC3\xA9_\xE6\x9D\xB1") << name;
    seen.insert(name);
  }
  EXPECT_GE(seen.size(), 2u);  // random logits reach different names
}

}  // namespace
}  // namespace mxlm::server
