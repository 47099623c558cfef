// The GSM8K task as lm-eval's `gsm8k.yaml` (task version 3) defines it: the data, the prompt text, the
// few-shot draws (one `random.Random(seed).sample(train, k)` per test document, in document order, from a
// single generator) and the chat messages of the `--apply_chat_template [--fewshot_as_multiturn]` paths.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mxlm::eval {

struct Gsm8kDoc {
  std::string question;
  std::string answer;  // worked solution ending in "#### <number>"
};

struct Gsm8kData {
  std::string dir;
  std::vector<Gsm8kDoc> test;   // evaluation split (1319 rows)
  std::vector<Gsm8kDoc> train;  // few-shot pool (7473 rows)
};

// Where the data lives when no --data-dir is given: $MXLM_GSM8K_DIR, else the repository's data/gsm8k
// (baked in at build time).
std::string default_gsm8k_dir();

// Loads `<dir>/test.jsonl` and `<dir>/train.jsonl` (each may instead be stored as `.jsonl.xz`).
Gsm8kData load_gsm8k(const std::string& dir);

// One document per non-empty line, each an object with string fields "question" and "answer".
std::vector<Gsm8kDoc> parse_gsm8k_jsonl(const std::string& text, const std::string& what);

// lm-eval's doc_to_text and doc_to_target for gsm8k.
std::string doc_to_text(const Gsm8kDoc& doc);
std::string doc_to_target(const Gsm8kDoc& doc);

// Indices into the train split for the first `num_docs` test documents: lm-eval's default sampler with
// the few-shot seed (CLI default 1234). The few-shot split differs from the test split, so exactly `k`
// are drawn per document and none is excluded.
std::vector<std::vector<size_t>> fewshot_draws(size_t num_docs, size_t train_size, size_t k, uint64_t seed);

struct ChatMessage {
  std::string role;
  std::string content;
  bool operator==(const ChatMessage&) const = default;
};

// The messages lm-eval sends. Multi-turn: one user/assistant pair per shot (no delimiters), then the
// question. Single-turn: one user message, "<q> <a>\n\n" per shot followed by the question.
std::vector<ChatMessage> build_chat(const Gsm8kDoc& doc, const std::vector<const Gsm8kDoc*>& shots, bool multiturn);

// Fixed settings of the task (gsm8k.yaml).
inline constexpr double kTaskVersion = 3.0;
inline constexpr int kDefaultNumFewshot = 5;
inline const std::vector<std::string>& gsm8k_stop_sequences() {
  static const std::vector<std::string> stop{"Question:", "</s>", "<|im_end|>"};
  return stop;
}

}  // namespace mxlm::eval
