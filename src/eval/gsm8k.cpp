#include "eval/gsm8k.h"

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>

#include "core/error.h"
#include "eval/python_random.h"
#include "eval/xz.h"

#ifndef MXLM_GSM8K_DIR
#define MXLM_GSM8K_DIR "data/gsm8k"
#endif

namespace mxlm::eval {

std::string default_gsm8k_dir() {
  if (const char* env = std::getenv("MXLM_GSM8K_DIR"); env && *env) return env;
  return MXLM_GSM8K_DIR;
}

std::vector<Gsm8kDoc> parse_gsm8k_jsonl(const std::string& text, const std::string& what) {
  std::vector<Gsm8kDoc> docs;
  size_t line_number = 0;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    start = end + 1;
    ++line_number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json row;
    try {
      row = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail("{} line {}: not valid JSON ({})", what, line_number, e.what());
    }
    if (!row.is_object() || !row.contains("question") || !row.contains("answer") || !row["question"].is_string() ||
        !row["answer"].is_string())
      fail("{} line {}: expected an object with string fields \"question\" and \"answer\"", what, line_number);
    docs.push_back({row["question"].get<std::string>(), row["answer"].get<std::string>()});
  }
  return docs;
}

namespace {

std::vector<Gsm8kDoc> load_split(const std::string& dir, const std::string& split) {
  namespace fs = std::filesystem;
  const fs::path plain = fs::path(dir) / (split + ".jsonl");
  const fs::path xz = fs::path(dir) / (split + ".jsonl.xz");
  std::string path;
  if (fs::exists(plain)) {
    path = plain.string();
  } else if (fs::exists(xz)) {
    path = xz.string();
  } else {
    fail("GSM8K {} split not found: neither {} nor {} exists (set --data-dir or MXLM_GSM8K_DIR)", split,
         plain.string(), xz.string());
  }
  auto docs = parse_gsm8k_jsonl(read_file_maybe_xz(path), path);
  if (docs.empty()) fail("{} holds no documents", path);
  return docs;
}

}  // namespace

Gsm8kData load_gsm8k(const std::string& dir) {
  Gsm8kData data;
  data.dir = dir;
  data.test = load_split(dir, "test");
  data.train = load_split(dir, "train");
  return data;
}

std::string doc_to_text(const Gsm8kDoc& doc) { return "Question: " + doc.question + "\nAnswer:"; }

std::string doc_to_target(const Gsm8kDoc& doc) { return doc.answer; }

std::vector<std::vector<size_t>> fewshot_draws(size_t num_docs, size_t train_size, size_t k, uint64_t seed) {
  if (k > train_size) fail("--num-fewshot {} exceeds the {} documents of the few-shot split", k, train_size);
  PythonRandom rnd(seed);
  std::vector<std::vector<size_t>> draws(num_docs);
  // lm-eval returns early for k == 0 without touching the generator.
  if (k == 0) return draws;
  for (auto& draw : draws) draw = rnd.sample(train_size, k);
  return draws;
}

std::vector<ChatMessage> build_chat(const Gsm8kDoc& doc, const std::vector<const Gsm8kDoc*>& shots, bool multiturn) {
  std::vector<ChatMessage> messages;
  if (multiturn) {
    for (const Gsm8kDoc* shot : shots) {
      messages.push_back({"user", doc_to_text(*shot)});
      messages.push_back({"assistant", doc_to_target(*shot)});
    }
    messages.push_back({"user", doc_to_text(doc)});
    return messages;
  }
  // Single turn: lm-eval joins the turns with their plain-text delimiters (target " ", few-shot "\n\n").
  std::string content;
  for (const Gsm8kDoc* shot : shots) content += doc_to_text(*shot) + " " + doc_to_target(*shot) + "\n\n";
  content += doc_to_text(doc);
  messages.push_back({"user", std::move(content)});
  return messages;
}

}  // namespace mxlm::eval
