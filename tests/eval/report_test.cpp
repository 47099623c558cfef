// Aggregation against Python's arithmetic, lm-eval's printed table (captured from lm-eval 0.4.13's
// make_table), the paired comparison, endpoint parsing and reply parsing.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "eval/chat_client.h"
#include "eval/metrics.h"
#include "eval/report.h"

namespace mxlm::eval {
namespace {

TEST(Metrics, MeanAndStderrBitExactWithPython) {
  std::vector<double> a(20, 0.0);
  for (int i = 0; i < 11; ++i) a[i] = 1.0;
  EXPECT_EQ(mean(a), 0.55);
  EXPECT_EQ(*mean_stderr(a), 0.11413288653790232);
  std::vector<double> b;
  for (int i = 0; i < 1319; ++i) b.push_back(i % 3 == 0 ? 1.0 : 0.0);
  EXPECT_EQ(mean(b), 0.33358605003790753);
  EXPECT_EQ(*mean_stderr(b), 0.012987282131410809);
  EXPECT_FALSE(mean_stderr({1.0}).has_value());
}

nlohmann::ordered_json results_with(nlohmann::ordered_json strict, nlohmann::ordered_json strict_se,
                                    nlohmann::ordered_json flex, nlohmann::ordered_json flex_se) {
  nlohmann::ordered_json r;
  r["results"]["gsm8k"] = {{"alias", "gsm8k"},
                           {"exact_match,strict-match", strict},
                           {"exact_match_stderr,strict-match", strict_se},
                           {"exact_match,flexible-extract", flex},
                           {"exact_match_stderr,flexible-extract", flex_se}};
  r["versions"]["gsm8k"] = 3.0;
  r["n-shot"]["gsm8k"] = 5;
  r["higher_is_better"]["gsm8k"] = {{"exact_match", true}};
  return r;
}

TEST(Report, TableMatchesLmEvalMakeTable) {
  EXPECT_EQ(results_table(results_with(0.55, 0.1141, 0.5, 0.11)),
            "|Tasks|Version|     Filter     |n-shot|  Metric   |   |Value|   |Stderr|\n"
            "|-----|------:|----------------|-----:|-----------|---|----:|---|-----:|\n"
            "|gsm8k|      3|flexible-extract|     5|exact_match|↑  | 0.50|±  |0.1100|\n"
            "|     |       |strict-match    |     5|exact_match|↑  | 0.55|±  |0.1141|\n");
  EXPECT_EQ(results_table(results_with(0.9287338893100834, 0.00708, 0.9302501895375284, 0.0070)),
            "|Tasks|Version|     Filter     |n-shot|  Metric   |   |Value |   |Stderr|\n"
            "|-----|------:|----------------|-----:|-----------|---|-----:|---|-----:|\n"
            "|gsm8k|      3|flexible-extract|     5|exact_match|↑  |0.9303|±  |0.0070|\n"
            "|     |       |strict-match    |     5|exact_match|↑  |0.9287|±  |0.0071|\n");
  EXPECT_EQ(results_table(results_with(1.0, 0.0, 0.0, 0.0)),
            "|Tasks|Version|     Filter     |n-shot|  Metric   |   |Value|   |Stderr|\n"
            "|-----|------:|----------------|-----:|-----------|---|----:|---|-----:|\n"
            "|gsm8k|      3|flexible-extract|     5|exact_match|↑  |    0|±  |     0|\n"
            "|     |       |strict-match    |     5|exact_match|↑  |    1|±  |     0|\n");
  EXPECT_EQ(results_table(results_with(0.123456, "N/A", 0.5, "N/A")),
            "|Tasks|Version|     Filter     |n-shot|  Metric   |   |Value |   |Stderr|\n"
            "|-----|------:|----------------|-----:|-----------|---|-----:|---|------|\n"
            "|gsm8k|      3|flexible-extract|     5|exact_match|↑  |0.5000|±  |   N/A|\n"
            "|     |       |strict-match    |     5|exact_match|↑  |0.1235|±  |   N/A|\n");
}

TEST(Metrics, PairedRecovery) {
  // Baseline right on 8 of 10, current loses doc 0 and gains doc 9.
  const std::vector<double> base = {1, 1, 1, 1, 1, 1, 1, 1, 0, 0};
  const std::vector<double> cur = {0, 1, 1, 1, 1, 1, 1, 1, 0, 1};
  const Recovery r = paired_recovery(base, cur);
  EXPECT_EQ(r.lost, 1u);
  EXPECT_EQ(r.gained, 1u);
  EXPECT_DOUBLE_EQ(r.ratio, 1.0);
  EXPECT_DOUBLE_EQ(r.difference, 0.0);
  // d_i = cur_i - base_i: one -1, one +1, eight 0 -> sd = sqrt(2/9), se = sd/sqrt(10); ratio se = se/0.8.
  const double se = std::sqrt(2.0 / 9.0) / std::sqrt(10.0);
  EXPECT_NEAR(r.ratio_high - r.ratio, 1.959963984540054 * se / 0.8, 1e-12);
  // Identical runs: zero width.
  const Recovery same = paired_recovery(base, base);
  EXPECT_DOUBLE_EQ(same.ratio_low, 1.0);
  EXPECT_DOUBLE_EQ(same.ratio_high, 1.0);
  EXPECT_THROW(paired_recovery({1}, {1, 0}), Error);
}

TEST(ChatClient, EndpointForms) {
  EXPECT_EQ(parse_endpoint("http://127.0.0.1:8000/v1/chat/completions").url(), "http://127.0.0.1:8000/v1/chat/completions");
  EXPECT_EQ(parse_endpoint("http://127.0.0.1:8000/v1").url(), "http://127.0.0.1:8000/v1/chat/completions");
  EXPECT_EQ(parse_endpoint("http://127.0.0.1:8000/v1/").url(), "http://127.0.0.1:8000/v1/chat/completions");
  EXPECT_EQ(parse_endpoint("https://host").url(), "https://host/v1/chat/completions");
  EXPECT_EQ(parse_endpoint("http://h:1/custom/path").path, "/custom/path");
  EXPECT_THROW(parse_endpoint("127.0.0.1:8000"), Error);
  EXPECT_THROW(parse_endpoint("ftp://h/v1"), Error);
  EXPECT_THROW(parse_endpoint("http:///v1"), Error);
}

TEST(ChatClient, ReplyParsing) {
  const ChatReply ok = parse_chat_reply(
      R"({"model":"srv","choices":[{"index":0,"message":{"role":"assistant","content":"#### 5"},"finish_reason":"stop"}],)"
      R"("usage":{"prompt_tokens":10,"completion_tokens":3}})");
  EXPECT_EQ(ok.content, "#### 5");
  EXPECT_FALSE(ok.content_missing);
  EXPECT_EQ(ok.model, "srv");
  EXPECT_EQ(ok.prompt_tokens, 10);
  EXPECT_EQ(ok.completion_tokens, 3);
  EXPECT_EQ(ok.finish_reason, "stop");
  const ChatReply null_content = parse_chat_reply(R"({"choices":[{"index":0,"message":{"content":null}}]})");
  EXPECT_EQ(null_content.content, "");
  EXPECT_TRUE(null_content.content_missing);
  EXPECT_TRUE(parse_chat_reply(R"({"error":"filtered"})").content_missing);
  EXPECT_THROW(parse_chat_reply("<html>"), Error);
}

}  // namespace
}  // namespace mxlm::eval
