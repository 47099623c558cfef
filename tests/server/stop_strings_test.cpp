// Stop strings over streamed text: for every way of splitting a text into pieces, the emitted pieces concatenate
// to the text cut before the first stop-string occurrence (the reference: std::string::find on the whole text),
// and nothing past the cut is ever emitted.
#include <gtest/gtest.h>

#include "server/metrics.h"
#include "server/stop_strings.h"

namespace mxlm::server {
namespace {

std::string reference_cut(const std::string& text, const std::vector<std::string>& stops, bool include,
                          std::optional<std::string>* which) {
  size_t best = std::string::npos;
  std::string hit;
  for (const auto& s : stops) {
    const size_t at = text.find(s);
    if (at != std::string::npos && (at < best || (at == best && s.size() > hit.size()))) {
      best = at;
      hit = s;
    }
  }
  if (best == std::string::npos) return text;
  *which = hit;
  return text.substr(0, best + (include ? hit.size() : 0));
}

void check_all_splits(const std::string& text, const std::vector<std::string>& stops, bool include = false) {
  std::optional<std::string> expected_stop;
  const std::string expected = reference_cut(text, stops, include, &expected_stop);
  // Every split into two or three pieces, and byte by byte.
  for (size_t a = 0; a <= text.size(); ++a) {
    for (size_t b = a; b <= text.size(); b += 3) {
      StopStringMatcher m(stops, include);
      std::string out = m.feed(text.substr(0, a));
      EXPECT_TRUE(expected.compare(0, out.size(), out) == 0);
      out += m.feed(text.substr(a, b - a));
      out += m.feed(text.substr(b));
      out += m.flush();
      ASSERT_EQ(out, expected) << "split " << a << "," << b;
      EXPECT_EQ(m.matched(), expected_stop);
    }
  }
  StopStringMatcher m(stops, include);
  std::string out;
  for (const char c : text) {
    out += m.feed(std::string(1, c));
    EXPECT_TRUE(expected.compare(0, out.size(), out) == 0) << "emitted text past a stop string";
  }
  out += m.flush();
  EXPECT_EQ(out, expected);
}

TEST(StopStrings, CutsAtTheFirstOccurrenceAcrossPieces) {
  check_all_splits("The answer is 42.\nQuestion: next", {"Question:"});
  check_all_splits("aaab", {"aab"});
  check_all_splits("abcabd", {"abd", "ca"});
  check_all_splits("no stop here", {"xyz", "</s>"});
  check_all_splits("héllo wörld ünïcode", {"wö", "ü"});
  check_all_splits("keep the stop: END tail", {"END"}, /*include=*/true);
}

TEST(StopStrings, EmptyStopListPassesEverythingAndEmptyStringsAreIgnored) {
  StopStringMatcher m({}, false);
  EXPECT_EQ(m.feed("abc"), "abc");
  StopStringMatcher e({""}, false);
  EXPECT_EQ(e.feed("abc"), "abc");
  EXPECT_FALSE(e.matched());
}

TEST(StopStrings, HoldsBackOnlyAPossibleStopPrefix) {
  StopStringMatcher m({"Question:"}, false);
  EXPECT_EQ(m.feed("x Que"), "x ");
  EXPECT_EQ(m.feed("ry"), "Query");
  EXPECT_EQ(m.feed(" Quest"), " ");
  EXPECT_EQ(m.feed("ion: y"), "");
  ASSERT_TRUE(m.matched());
  EXPECT_EQ(*m.matched(), "Question:");
  EXPECT_EQ(m.feed("more"), "");
}

TEST(Metrics, PrometheusTextHasCumulativeBuckets) {
  engine::SchedulerStats s;
  s.pages_total = 10;
  s.pages_used = 3;
  s.waiting = 2;
  s.time_to_first_token.observe(0.003);
  s.time_to_first_token.observe(0.2);
  s.time_to_first_token.observe(100.0);
  const std::string text = render_metrics(s, {}, "m");
  EXPECT_NE(text.find("mxlm:kv_cache_pages_used{model_name=\"m\"} 3\n"), std::string::npos);
  EXPECT_NE(text.find("mxlm:num_requests_waiting{model_name=\"m\"} 2\n"), std::string::npos);
  EXPECT_NE(text.find("mxlm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"0.0025\"} 0\n"),
            std::string::npos);
  EXPECT_NE(text.find("mxlm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"0.005\"} 1\n"), std::string::npos);
  EXPECT_NE(text.find("mxlm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"0.25\"} 2\n"), std::string::npos);
  EXPECT_NE(text.find("mxlm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"30\"} 2\n"), std::string::npos);
  EXPECT_NE(text.find("mxlm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"+Inf\"} 3\n"), std::string::npos);
  EXPECT_NE(text.find("mxlm:time_to_first_token_seconds_count{model_name=\"m\"} 3\n"), std::string::npos);
  EXPECT_NE(text.find("# TYPE mxlm:time_to_first_token_seconds histogram\n"), std::string::npos);
}

}  // namespace
}  // namespace mxlm::server
