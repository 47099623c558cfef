// gsm8k filters and exact_match against results printed by Python's `re` (tests/py/test_eval_filters.py
// checks a larger generated table live).
#include <gtest/gtest.h>

#include "eval/filters.h"

namespace mxlm::eval {
namespace {

struct Case {
  const char* response;
  const char* strict;
  const char* flexible;
};

TEST(Filters, MatchPythonRe) {
  // re.findall(r"#### (\-?[0-9\.\,]+)", s)[0] and re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", s)[-1].
  const Case cases[] = {
      {"#### 18", "18", "18"},
      {"The answer is $1,234.50.\n#### 1,234", "1,234", "1,234"},
      {"#### -5 and #### 7", "-5", "7"},
      {"####  3", "[invalid]", "3"},
      {"#### -", "[invalid]", "[invalid]"},
      {"#### -.", "-.", "[invalid]"},
      {"foo -12 bar", "[invalid]", "-12"},
      {"no number here", "[invalid]", "[invalid]"},
      {"costs $5. Then 3.", "[invalid]", "3."},
      {"a-3-4", "[invalid]", "-4"},
      {"$.", "[invalid]", "$."},
      {"1,000,000 and then ...", "[invalid]", "..."},
      {"x\n#### 42.\n", "42.", "42."},
      {"-", "[invalid]", "[invalid]"},
      {"--7", "[invalid]", "-7"},
      {"3.14.15", "[invalid]", "3.14.15"},
      {"#### 5\nAnswer: 6 apples", "5", "6"},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(strict_match(c.response), c.strict) << c.response;
    EXPECT_EQ(flexible_extract(c.response), c.flexible) << c.response;
  }
}

TEST(Filters, NormalisationMatchesPythonReSub) {
  const std::pair<const char*, const char*> cases[] = {
      {"1,234", "1234"},         {"$18.", "18"},         {"42.\n", "42\n"}, {"a #### b #### 7", "7"},
      {"#### #### 5", "5"},      {"3..", "3."},          {"[INVALID]", "[invalid]"}, {"Ab.C", "ab.c"},
      {".\n", "\n"},             {"x.\n\n", "x.\n\n"},   {"Janet sells 16.\n#### 1,018", "1018"},
  };
  for (const auto& [in, out] : cases) EXPECT_EQ(normalize_for_exact_match(in), out) << in;
}

TEST(Filters, ExactMatchAgainstFullGoldAnswer) {
  const std::string gold = "She makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018";
  EXPECT_EQ(exact_match("1,018", gold), 1.0);
  EXPECT_EQ(exact_match("$1018.", gold), 1.0);
  EXPECT_EQ(exact_match("1018.00", gold), 0.0);
  EXPECT_EQ(exact_match("[invalid]", gold), 0.0);
  EXPECT_EQ(exact_match("-1018", gold), 0.0);
}

}  // namespace
}  // namespace mxlm::eval
