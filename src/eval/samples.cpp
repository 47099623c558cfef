#include "eval/samples.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>

#include "core/error.h"
#include "eval/filters.h"

namespace mxlm::eval {

void SampleRecord::score() {
  strict = strict_match(response);
  flexible = flexible_extract(response);
  strict_score = exact_match(strict, target);
  flexible_score = exact_match(flexible, target);
}

nlohmann::ordered_json SampleRecord::to_json() const {
  using json = nlohmann::ordered_json;
  json j;
  j["doc_id"] = doc_id;
  j["fewshot_ids"] = fewshot_ids;
  j["request"] = request;
  j["target"] = target;
  j["response"] = response;
  j["filtered"] = json{{std::string(kStrictMatch), strict}, {std::string(kFlexibleExtract), flexible}};
  j["exact_match"] = json{{std::string(kStrictMatch), strict_score}, {std::string(kFlexibleExtract), flexible_score}};
  j["failed"] = failed;
  j["error"] = failed ? json(error) : json(nullptr);
  j["attempts"] = attempts;
  j["content_missing"] = content_missing;
  j["finish_reason"] = finish_reason;
  j["server_model"] = server_model;
  j["usage"] = json{{"prompt_tokens", prompt_tokens >= 0 ? json(prompt_tokens) : json(nullptr)},
                    {"completion_tokens", completion_tokens >= 0 ? json(completion_tokens) : json(nullptr)}};
  j["latency_s"] = latency_seconds;
  return j;
}

std::string SampleRecord::to_line() const {
  return to_json().dump(-1, ' ', true, nlohmann::json::error_handler_t::replace) + "\n";
}

SampleRecord SampleRecord::from_json(const nlohmann::ordered_json& j, const std::string& what) {
  try {
    SampleRecord r;
    r.doc_id = j.at("doc_id").get<size_t>();
    r.fewshot_ids = j.at("fewshot_ids").get<std::vector<size_t>>();
    r.request = j.at("request");  // ordered: key order is part of what was sent
    r.target = j.at("target").get<std::string>();
    r.response = j.at("response").get<std::string>();
    r.failed = j.at("failed").get<bool>();
    if (r.failed && j.at("error").is_string()) r.error = j.at("error").get<std::string>();
    r.attempts = j.value("attempts", 0);
    r.content_missing = j.value("content_missing", false);
    r.finish_reason = j.value("finish_reason", "");
    r.server_model = j.value("server_model", "");
    if (auto usage = j.find("usage"); usage != j.end() && usage->is_object()) {
      if (usage->contains("prompt_tokens") && (*usage)["prompt_tokens"].is_number_integer())
        r.prompt_tokens = (*usage)["prompt_tokens"].get<int64_t>();
      if (usage->contains("completion_tokens") && (*usage)["completion_tokens"].is_number_integer())
        r.completion_tokens = (*usage)["completion_tokens"].get<int64_t>();
    }
    r.latency_seconds = j.value("latency_s", 0.0);
    r.score();  // recomputed, never trusted from the file
    return r;
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed sample record ({})", what, e.what());
  }
}

namespace {

// Calls `on_line(json, what)` for each line; a torn last line is skipped.
template <typename F>
void for_each_json_line(const std::string& path, F on_line) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open {}", path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string what = fmt::format("{} line {}", path, i + 1);
    nlohmann::ordered_json j;
    try {
      j = nlohmann::ordered_json::parse(lines[i]);
    } catch (const nlohmann::json::exception&) {
      if (i + 1 == lines.size()) break;  // written when the run was killed
      fail("{}: not valid JSON", what);
    }
    on_line(j, what);
  }
}

}  // namespace

std::vector<SampleRecord> read_samples(const std::string& path) {
  std::vector<SampleRecord> records;
  for_each_json_line(path, [&](const nlohmann::ordered_json& j, const std::string& what) {
    records.push_back(SampleRecord::from_json(j, what));
  });
  return records;
}

std::vector<DocScores> read_doc_scores(const std::string& path) {
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  std::map<size_t, DocScores> by_doc;
  for_each_json_line(path, [&](const nlohmann::ordered_json& j, const std::string& what) {
    if (!j.is_object() || !j.contains("doc_id")) fail("{}: no doc_id", what);
    const size_t doc_id = j["doc_id"].get<size_t>();
    auto [it, inserted] = by_doc.try_emplace(doc_id, DocScores{doc_id, kNaN, kNaN});
    (void)inserted;
    const auto& em = j.contains("exact_match") ? j["exact_match"] : nlohmann::ordered_json();
    if (em.is_object()) {  // mxlm: both filters on one line
      if (em.contains(std::string(kStrictMatch))) it->second.strict = em[std::string(kStrictMatch)].get<double>();
      if (em.contains(std::string(kFlexibleExtract))) it->second.flexible = em[std::string(kFlexibleExtract)].get<double>();
    } else if (em.is_number() && j.contains("filter") && j["filter"].is_string()) {  // lm-eval: a line per filter
      const std::string filter = j["filter"].get<std::string>();
      if (filter == kStrictMatch) it->second.strict = em.get<double>();
      if (filter == kFlexibleExtract) it->second.flexible = em.get<double>();
    } else {
      fail("{}: no exact_match score", what);
    }
  });
  std::vector<DocScores> out;
  for (const auto& [id, scores] : by_doc) out.push_back(scores);
  return out;
}

}  // namespace mxlm::eval
