// Request serialisation (Python json.dumps), data loading, message layout and the few-shot draws.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "eval/gsm8k.h"
#include "eval/python_json.h"
#include "eval/runner.h"
#include "eval/xz.h"

namespace mxlm::eval {
namespace {

const std::string kDataDir = std::string(MXLM_SOURCE_DIR) + "/data/gsm8k";

TEST(PythonJson, DumpsLikePython) {
  // python3 -c 'import json; print(json.dumps({"b": [1, 0.0, None, True], "a": "x\u2019\n\"\\\u00e9\U0001F600\x7f\x01"}))'
  nlohmann::ordered_json j;
  j["b"] = {1, 0.0, nullptr, true};
  j["a"] = "x\xE2\x80\x99\n\"\\\xC3\xA9\xF0\x9F\x98\x80\x7f\x01";
  EXPECT_EQ(python_json_dumps(j), R"({"b": [1, 0.0, null, true], "a": "x\u2019\n\"\\\u00e9\ud83d\ude00\u007f\u0001"})");
  EXPECT_EQ(python_json_dumps(nlohmann::ordered_json::object()), "{}");
  EXPECT_EQ(python_json_dumps(nlohmann::ordered_json::array()), "[]");
}

TEST(PythonJson, FloatReprMatchesPython) {
  // python3 -c 'print([repr(x) for x in (0.0, 0.7, 1.0, 1e16, 1e-5, 0.0001, 123456789.125, 1.5e300, -2.5)])'
  EXPECT_EQ(python_float_repr(0.0), "0.0");
  EXPECT_EQ(python_float_repr(0.7), "0.7");
  EXPECT_EQ(python_float_repr(1.0), "1.0");
  EXPECT_EQ(python_float_repr(1e16), "1e+16");
  EXPECT_EQ(python_float_repr(1e-5), "1e-05");
  EXPECT_EQ(python_float_repr(0.0001), "0.0001");
  EXPECT_EQ(python_float_repr(123456789.125), "123456789.125");
  EXPECT_EQ(python_float_repr(1.5e300), "1.5e+300");
  EXPECT_EQ(python_float_repr(-2.5), "-2.5");
}

TEST(Gsm8k, LoadsCommittedDataWithCountsAndXz) {
  const Gsm8kData data = load_gsm8k(kDataDir);
  ASSERT_EQ(data.test.size(), 1319u);
  ASSERT_EQ(data.train.size(), 7473u);
  EXPECT_EQ(data.test[0].question.substr(0, 22), "Janet\xE2\x80\x99s ducks lay 16");
  EXPECT_EQ(data.test[0].answer.substr(data.test[0].answer.size() - 8), "\n#### 18");
  EXPECT_EQ(data.train[6374].question.substr(0, 18), "Jen and Tyler are ");
}

TEST(Gsm8k, MultiturnLayoutOfDocZero) {
  const Gsm8kData data = load_gsm8k(kDataDir);
  const auto draws = fewshot_draws(2, data.train.size(), 5, 1234);
  ASSERT_EQ(draws[0], (std::vector<size_t>{6374, 3610, 957, 61, 742}));
  std::vector<const Gsm8kDoc*> shots;
  for (size_t i : draws[0]) shots.push_back(&data.train[i]);
  const auto messages = build_chat(data.test[0], shots, true);
  ASSERT_EQ(messages.size(), 11u);
  for (size_t i = 0; i < 10; ++i) {
    EXPECT_EQ(messages[i].role, i % 2 ? "assistant" : "user");
    const Gsm8kDoc& shot = data.train[draws[0][i / 2]];
    EXPECT_EQ(messages[i].content, i % 2 ? shot.answer : "Question: " + shot.question + "\nAnswer:");
  }
  EXPECT_EQ(messages[10].content, "Question: " + data.test[0].question + "\nAnswer:");
  const auto single = build_chat(data.test[0], shots, false);
  ASSERT_EQ(single.size(), 1u);
  EXPECT_EQ(single[0].content.substr(0, messages[0].content.size() + 1), messages[0].content + " ");
  EXPECT_NE(single[0].content.find(messages[1].content + "\n\nQuestion: "), std::string::npos);
}

TEST(Gsm8k, RequestBodyKeyOrderAndValues) {
  EvalOptions o;
  o.model = "m";
  o.max_gen_toks = 16384;
  const auto body = make_request_body({{"user", "Question: caf\xC3\xA9\nAnswer:"}}, o);
  EXPECT_EQ(python_json_dumps(body),
            R"({"messages": [{"role": "user", "content": "Question: caf\u00e9\nAnswer:"}], "model": "m", )"
            R"("max_tokens": 16384, "temperature": 0.0, "stop": ["Question:", "</s>", "<|im_end|>"], "seed": 1234})");
}

TEST(Gsm8k, LimitRuleAndBadData) {
  EXPECT_EQ(apply_limit(std::nullopt, 1319), 1319u);
  EXPECT_EQ(apply_limit(20.0, 1319), 20u);
  EXPECT_EQ(apply_limit(0.01, 1319), 14u);  // ceil(13.19)
  EXPECT_EQ(apply_limit(5000.0, 1319), 1319u);
  EXPECT_THROW(apply_limit(0.0, 1319), Error);
  EXPECT_THROW(parse_gsm8k_jsonl("{\"question\": 1, \"answer\": \"a\"}\n", "x"), Error);
  EXPECT_THROW(parse_gsm8k_jsonl("not json\n", "x"), Error);
  EXPECT_THROW(load_gsm8k("/nonexistent/gsm8k"), Error);
  EXPECT_THROW(xz_decompress("definitely not xz", "x"), Error);
  EXPECT_THROW(fewshot_draws(1, 3, 5, 1234), Error);
}

}  // namespace
}  // namespace mxlm::eval
