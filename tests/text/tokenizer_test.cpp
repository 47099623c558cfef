// Unit tests of the tokenizer pieces on tiny hand-made tokenizer.json files. Expected values were
// produced by Hugging Face `tokenizers` 0.23.3 (Python) on the same JSON, strings and components;
// tests/py/test_tokenizer_hf.py compares the real tokenizers live.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "text/decoder.h"
#include "text/detokenizer.h"
#include "text/normalizer.h"
#include "text/pre_tokenizer.h"
#include "text/tokenizer.h"
#include "text/unicode.h"
#include "text/unicode_regex.h"

namespace mxlm::text {
namespace {

using json = nlohmann::json;
using Ids = std::vector<uint32_t>;

json bpe_model(json vocab, json merges) {
  return {{"type", "BPE"},
          {"dropout", nullptr},
          {"unk_token", nullptr},
          {"continuing_subword_prefix", nullptr},
          {"end_of_word_suffix", nullptr},
          {"fuse_unk", false},
          {"byte_fallback", false},
          {"ignore_merges", false},
          {"vocab", vocab},
          {"merges", merges}};
}

json tokenizer_json(json model) {
  return {{"version", "1.0"},
          {"added_tokens", json::array()},
          {"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "WhitespaceSplit"}}},
          {"post_processor", nullptr},
          {"decoder", nullptr},
          {"model", model}};
}

const json kVocab = {{"a", 0}, {"b", 1}, {"c", 2}, {"d", 3}, {"ab", 4}, {"bc", 5}, {"abc", 6}, {"cd", 7}, {"aa", 8}};

std::vector<std::string> pre_tokenize(const json& config, const std::string& text) {
  auto pre = make_pre_tokenizer(config);
  std::vector<PreSplit> splits{{text, true}};
  pre->pre_tokenize(splits);
  std::vector<std::string> out;
  for (auto& s : splits) out.push_back(s.text);
  return out;
}

std::string normalize(const json& config, const std::string& text) { return make_normalizer(config)->normalize(text); }

std::string decode(const json& config, std::vector<std::string> tokens) {
  std::string out;
  for (const auto& t : make_decoder(config)->decode_chain(std::move(tokens))) out += t;
  return out;
}

TEST(TokByteLevel, Gpt2Alphabet) {
  EXPECT_EQ(byte_to_char(' '), U'\u0120');   // "Ġ"
  EXPECT_EQ(byte_to_char('\n'), U'\u010A');  // "Ċ"
  EXPECT_EQ(byte_to_char('A'), U'A');
  EXPECT_EQ(byte_to_char(0xAD), U'\u0143');  // soft hyphen is not printable: moved up
  EXPECT_EQ(byte_to_char(0xFF), U'\u00FF');
  for (int b = 0; b < 256; ++b) EXPECT_EQ(char_to_byte(byte_to_char(static_cast<uint8_t>(b))), b);
  EXPECT_EQ(char_to_byte(U'\u4E2D'), -1);
}

TEST(TokUtf8, LossyReplacesMaximalSubparts) {
  EXPECT_EQ(utf8_lossy("ab\xFF"
                       "c"),
            "ab\xEF\xBF\xBD"
            "c");
  EXPECT_EQ(utf8_lossy("\xE4\xB8"), "\xEF\xBF\xBD");                              // one truncated character
  EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate: 3 bytes, 3 marks
  EXPECT_EQ(utf8_lossy("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");                  // overlong
  EXPECT_TRUE(is_valid_utf8("\xEF\xBF\xBD ok \xF0\x9F\x98\x80"));
  EXPECT_EQ(complete_utf8_prefix("a\xE4\xB8"), 1u);
  EXPECT_EQ(complete_utf8_prefix("a\xE4\xB8\xAD"), 4u);
}

TEST(TokUnicodeRegex, ClassesFollowOniguruma) {
  using Matches = std::vector<std::pair<size_t, size_t>>;
  // U+180E (3 bytes) is not White_Space: Oniguruma's \s skips it, PCRE2's own \s would not.
  EXPECT_EQ(UnicodeRegex("\\s+").find_all("a \u180e\u3000b"), (Matches{{1, 2}, {5, 8}}));
  EXPECT_EQ(UnicodeRegex("[^\\s]+").find_all("a \u180e"), (Matches{{0, 1}, {2, 5}}));
  EXPECT_EQ(UnicodeRegex("\\S+").find_all("\u180e x"), (Matches{{0, 3}, {4, 5}}));
  EXPECT_EQ(UnicodeRegex("\\w+").find_all("e\u0301t\u00b2"), (Matches{{0, 4}}));  // marks are word chars, ² is not
  EXPECT_EQ(UnicodeRegex("\\s+(?!\\S)|\\s+").find_all("a   b"), (Matches{{1, 3}, {3, 4}}));
  EXPECT_EQ(UnicodeRegex("x*").find_all("ab"), (Matches{{0, 0}, {1, 1}, {2, 2}}));  // empty matches advance
  EXPECT_EQ(UnicodeRegex(UnicodeRegex::escape("a.b*(c)")).find_all("xa.b*(c)"), (Matches{{1, 8}}));
}

TEST(TokBpe, MergesByRank) {
  const Tokenizer t =
      Tokenizer::from_json(tokenizer_json(bpe_model(kVocab, {"b c", "a b", "ab c", "c d", "a a"})).dump());
  EXPECT_EQ(t.encode("abcd"), (Ids{0, 5, 3}));
  EXPECT_EQ(t.encode("abcbcd"), (Ids{0, 5, 5, 3}));
  EXPECT_EQ(t.encode("dcba"), (Ids{3, 2, 1, 0}));
  EXPECT_EQ(t.encode("aabb"), (Ids{0, 4, 1}));
  EXPECT_EQ(t.encode("aaa"), (Ids{8, 0}));
  EXPECT_EQ(t.encode("aaaa"), (Ids{8, 8}));
  EXPECT_EQ(t.encode("abc abc"), (Ids{0, 5, 0, 5}));
  EXPECT_EQ(t.encode("a b  c"), (Ids{0, 1, 2}));
}

TEST(TokBpe, MergesAsPairsEqualStrings) {
  const json merges = json::array({{"b", "c"}, {"a", "b"}, {"ab", "c"}, {"c", "d"}, {"a", "a"}});
  const Tokenizer t = Tokenizer::from_json(tokenizer_json(bpe_model(kVocab, merges)).dump());
  EXPECT_EQ(t.encode("abcbcd"), (Ids{0, 5, 5, 3}));
}

TEST(TokBpe, UnknownTokensFuseOrNot) {
  json vocab = kVocab;
  vocab["<unk>"] = 9;
  json model = bpe_model(vocab, {"a b"});
  model["unk_token"] = "<unk>";
  model["fuse_unk"] = true;
  EXPECT_EQ(Tokenizer::from_json(tokenizer_json(model).dump()).encode("xyab zz"), (Ids{9, 4, 9}));
  model["fuse_unk"] = false;
  EXPECT_EQ(Tokenizer::from_json(tokenizer_json(model).dump()).encode("xyab zz"), (Ids{9, 9, 4, 9, 9}));
}

TEST(TokBpe, ByteFallbackAndLlamaDecoder) {
  json vocab = {{"▁", 0}, {"H", 1}, {"▁H", 2}, {"x", 3}};
  for (int b = 0; b < 256; ++b) vocab[fmt::format("<0x{:02X}>", b)] = 10 + b;
  json model = bpe_model(vocab, {"▁ H"});
  model["byte_fallback"] = true;
  json config = tokenizer_json(model);
  config["pre_tokenizer"] = {
      {"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", false}};
  config["decoder"] = {{"type", "Sequence"},
                       {"decoders",
                        {{{"type", "ByteFallback"}},
                         {{"type", "Fuse"}},
                         {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}}}}};
  const Tokenizer t = Tokenizer::from_json(config.dump());
  const Ids ids = t.encode("Hé x");
  EXPECT_EQ(ids, (Ids{2, 10 + 0xC3, 10 + 0xA9, 0, 3}));
  // HF's Metaspace decoder drops every "▁" of the first token, and after Fuse there is only one.
  EXPECT_EQ(t.decode(ids), "Héx");
  // ByteFallback decodes a run of byte tokens as one string: "A" + 0xE4 is invalid, so both bytes
  // become U+FFFD. Streaming must not show "A" before the run is over.
  const Ids run{10 + 'A', 10 + 0xE4, 3};
  EXPECT_EQ(t.decode(run), "\uFFFD\uFFFDx");
  IncrementalDetokenizer d(t);
  EXPECT_EQ(d.add(run[0]), "");
  EXPECT_EQ(d.add(run[1]), "");
  EXPECT_EQ(d.add(run[2]), "\uFFFD\uFFFDx");
  EXPECT_EQ(d.flush(), "");
  config["decoder"]["decoders"] = {{{"type", "ByteFallback"}},
                                   {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}},
                                   {{"type", "Fuse"}}};
  EXPECT_EQ(Tokenizer::from_json(config.dump()).decode(ids), "Hé x");
}

TEST(TokBpe, BadMergeIsAnError) {
  EXPECT_THROW(Tokenizer::from_json(tokenizer_json(bpe_model(kVocab, {"a z"})).dump()), Error);
  EXPECT_THROW(Tokenizer::from_json(tokenizer_json(bpe_model(kVocab, {"c c"})).dump()), Error);  // "cc" not in vocab
  EXPECT_THROW(Tokenizer::from_json("{not json"), Error);
}

Tokenizer added_token_tokenizer() {
  const json vocab = {{"h", 0},   {"i", 1},   {" ", 2}, {"x", 3}, {"<s>", 4},
                      {"[M]", 5}, {"tok", 6}, {"t", 7}, {"o", 8}, {"k", 9}};
  json config = tokenizer_json(bpe_model(vocab, json::array()));
  config["pre_tokenizer"] = nullptr;
  config["normalizer"] = {{"type", "Lowercase"}};
  config["added_tokens"] = {{{"id", 4},
                             {"content", "<s>"},
                             {"single_word", false},
                             {"lstrip", false},
                             {"rstrip", false},
                             {"normalized", false},
                             {"special", true}},
                            {{"id", 5},
                             {"content", "[M]"},
                             {"single_word", false},
                             {"lstrip", true},
                             {"rstrip", true},
                             {"normalized", false},
                             {"special", true}},
                            {{"id", 6},
                             {"content", "tok"},
                             {"single_word", true},
                             {"lstrip", false},
                             {"rstrip", false},
                             {"normalized", true},
                             {"special", false}}};
  return Tokenizer::from_json(config.dump());
}

TEST(TokAddedTokens, StripSingleWordAndNormalized) {
  const Tokenizer t = added_token_tokenizer();
  EXPECT_EQ(t.encode("hi<s>hi"), (Ids{0, 1, 4, 0, 1}));
  EXPECT_EQ(t.encode("hi  [M]  hi"), (Ids{0, 1, 5, 0, 1}));  // lstrip + rstrip swallow the spaces
  EXPECT_EQ(t.encode("[M] x"), (Ids{5, 3}));
  EXPECT_EQ(t.encode("tok"), (Ids{6}));
  EXPECT_EQ(t.encode("x tok x"), (Ids{3, 2, 6, 2, 3}));
  EXPECT_EQ(t.encode("xtok"), (Ids{3, 7, 8, 9}));  // single_word: not inside a word
  EXPECT_EQ(t.encode("tokx"), (Ids{7, 8, 9, 3}));
  EXPECT_EQ(t.encode("TOK"), (Ids{6}));  // normalized token matches the lowercased text
  EXPECT_EQ(t.encode("x TOK"), (Ids{3, 2, 6}));
  EXPECT_EQ(t.encode("<s><s>"), (Ids{4, 4}));
  EXPECT_EQ(t.encode("h<S>"), (Ids{0}));  // not normalized: "<S>" is no match; unknown chars dropped
  const Ids ids{0, 4, 1, 5, 6};
  EXPECT_EQ(t.decode(ids, true), "h i tok");
  EXPECT_EQ(t.decode(ids, false), "h <s> i [M] tok");
  EXPECT_TRUE(t.is_special(4));
  EXPECT_FALSE(t.is_special(6));
}

TEST(TokPreTokenizers, SplitBehaviours) {
  const auto split = [](const char* behavior, bool invert) {
    return pre_tokenize({{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", behavior}, {"invert", invert}},
                        "the-final--countdown-");
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(split("Removed", false), (V{"the", "final", "countdown"}));
  EXPECT_EQ(split("Removed", true), (V{"-", "-", "-", "-"}));
  EXPECT_EQ(split("Isolated", false), (V{"the", "-", "final", "-", "-", "countdown", "-"}));
  EXPECT_EQ(split("MergedWithPrevious", false), (V{"the-", "final-", "-", "countdown-"}));
  EXPECT_EQ(split("MergedWithPrevious", true), (V{"the", "-final", "-", "-countdown", "-"}));
  EXPECT_EQ(split("MergedWithNext", false), (V{"the", "-final", "-", "-countdown", "-"}));
  EXPECT_EQ(split("MergedWithNext", true), (V{"the-", "final-", "-", "countdown-"}));
  EXPECT_EQ(split("Contiguous", false), (V{"the", "-", "final", "--", "countdown", "-"}));
  EXPECT_EQ(
      pre_tokenize({{"type", "Split"}, {"pattern", {{"Regex", "\\p{N}+"}}}, {"behavior", "Isolated"}}, "ab12cd345"),
      (V{"ab", "12", "cd", "345"}));
}

TEST(TokPreTokenizers, Others) {
  using V = std::vector<std::string>;
  EXPECT_EQ(pre_tokenize({{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}, "Hello world\n!!"),
            (V{"ĠHello", "Ġworld", "Ċ", "!!"}));
  EXPECT_EQ(pre_tokenize({{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}, "é x"),
            (V{"Ã©Ġx"}));
  EXPECT_EQ(pre_tokenize({{"type", "Digits"}, {"individual_digits", true}}, "a123b"), (V{"a", "1", "2", "3", "b"}));
  EXPECT_EQ(pre_tokenize({{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "always"}, {"split", true}},
                         "Hey  friend"),
            (V{"▁Hey", "▁", "▁friend"}));
  EXPECT_EQ(pre_tokenize({{"type", "Punctuation"}, {"behavior", "Isolated"}}, "Hi, there!?"),
            (V{"Hi", ",", " there", "!", "?"}));
  EXPECT_EQ(pre_tokenize({{"type", "Whitespace"}}, "Hi, there!? a_b"), (V{"Hi", ",", "there", "!?", "a_b"}));
  EXPECT_THROW(make_pre_tokenizer({{"type", "NoSuchThing"}}), Error);
  EXPECT_THROW(make_pre_tokenizer({{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}}),
               Error);
}

TEST(TokNormalizers, MatchHf) {
  const std::string text = "  Ｈéllo İ ﬁ  World ";
  EXPECT_EQ(normalize({{"type", "NFKC"}}, text), "  Héllo İ fi  World ");
  EXPECT_EQ(normalize({{"type", "NFD"}}, text), "  Ｈe\u0301llo I\u0307 ﬁ  World ");
  EXPECT_EQ(normalize({{"type", "Lowercase"}}, text), "  ｈéllo i̇ ﬁ  world ");
  EXPECT_EQ(normalize({{"type", "Replace"}, {"pattern", {{"Regex", "\\s+"}}}, {"content", "_"}}, text),
            "_Ｈéllo_İ_ﬁ_World_");
  EXPECT_EQ(normalize({{"type", "Prepend"}, {"prepend", "▁"}}, text), "▁  Ｈéllo İ ﬁ  World ");
  EXPECT_EQ(normalize({{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}}, text), "Ｈéllo İ ﬁ  World");
  EXPECT_EQ(normalize({{"type", "Sequence"},
                       {"normalizers", {{{"type", "NFD"}}, {{"type", "StripAccents"}}, {{"type", "Lowercase"}}}}},
                      text),
            "  ｈello i ﬁ  world ");
}

TEST(TokDecoders, MatchHf) {
  EXPECT_EQ(decode({{"type", "Sequence"},
                    {"decoders",
                     {{{"type", "ByteFallback"}},
                      {{"type", "Fuse"}},
                      {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "always"}}}}},
                   {"▁H", "<0xC3>", "<0xA9>", "▁x", "<0xFF>", "y"}),
            "Héx\uFFFDy");
  EXPECT_EQ(decode({{"type", "Sequence"},
                    {"decoders",
                     {{{"type", "Replace"}, {"pattern", {{"String", "▁"}}}, {"content", " "}},
                      {{"type", "ByteFallback"}},
                      {{"type", "Fuse"}},
                      {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}},
                   {"▁a", "▁b"}),
            "a b");
  EXPECT_EQ(decode({{"type", "ByteLevel"}}, {"Ġhello", "Ċ", "Ã", "©", "<|x|>", "ä¸"}), " hello\né<|x|>\uFFFD");
}

TEST(TokDetokenizer, HoldsBackSplitCharacters) {
  // Byte-level tokens: "Ã" and "©" are the two bytes of "é"; "ä¸" + "Ń" the three bytes of "中".
  json vocab = {{"Ġhi", 0}, {"Ã", 1}, {"©", 2}, {"ä¸", 3}, {"Ń", 4}, {"<eos>", 5}};
  json config = tokenizer_json(bpe_model(vocab, json::array()));
  config["decoder"] = {{"type", "ByteLevel"}};
  config["added_tokens"] = {{{"id", 5}, {"content", "<eos>"}, {"special", true}, {"normalized", false}}};
  const Tokenizer t = Tokenizer::from_json(config.dump());
  IncrementalDetokenizer d(t, /*skip_special_tokens=*/true);
  EXPECT_EQ(d.add(0), " hi");
  EXPECT_EQ(d.add(1), "");
  EXPECT_EQ(d.add(2), "é");
  EXPECT_EQ(d.add(3), "");
  EXPECT_EQ(d.add(4), "中");
  EXPECT_EQ(d.add(5), "");
  EXPECT_EQ(d.add(3), "");
  EXPECT_EQ(d.flush(), "\uFFFD");  // an unfinished character at the end decodes as decode() does
  EXPECT_EQ(t.decode(d.ids(), true), " hié中\uFFFD");
}

TEST(TokTokenizerConfig, SpecialTokensAndTemplate) {
  json config = tokenizer_json(bpe_model({{"a", 0}, {"<s>", 1}, {"</s>", 2}}, json::array()));
  config["added_tokens"] = {{{"id", 1}, {"content", "<s>"}, {"special", true}, {"normalized", false}},
                            {{"id", 2}, {"content", "</s>"}, {"special", true}, {"normalized", false}}};
  const json tc = {
      {"add_bos_token", true},
      {"add_eos_token", true},
      {"bos_token", {{"content", "<s>"}}},
      {"eos_token", "</s>"},
      {"chat_template", {{{"name", "default"}, {"template", "{{ x }}"}}, {{"name", "tool_use"}, {"template", "T"}}}}};
  const Tokenizer t = Tokenizer::from_json(config.dump(), tc.dump());
  EXPECT_EQ(t.encode("aa", true), (Ids{1, 0, 0, 2}));
  EXPECT_EQ(t.encode("aa", false), (Ids{0, 0}));
  EXPECT_EQ(t.config().chat_template.value_or(""), "{{ x }}");
  EXPECT_EQ(t.config().named_chat_templates.at("tool_use"), "T");
  // A TemplateProcessing post-processor that already adds BOS is not doubled.
  config["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}};
  const Tokenizer t2 = Tokenizer::from_json(config.dump(), json{{"add_bos_token", true}, {"bos_token", "<s>"}}.dump());
  EXPECT_EQ(t2.encode("a", true), (Ids{1, 0}));
}

}  // namespace
}  // namespace mxlm::text
