#include "eval/report.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>

#include "core/error.h"
#include "eval/filters.h"
#include "eval/gsm8k.h"

namespace mxlm::eval {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

Summary summarize(const std::vector<SampleRecord>& samples) {
  Summary s;
  s.n = samples.size();
  std::vector<double> strict, flexible;
  for (const auto& r : samples) {
    strict.push_back(r.strict_score);
    flexible.push_back(r.flexible_score);
    s.failed += r.failed;
    s.retried_docs += r.attempts > 1;
    s.content_missing += !r.failed && r.content_missing;
    if (r.prompt_tokens > 0) s.prompt_tokens += r.prompt_tokens;
    if (r.completion_tokens > 0) s.completion_tokens += r.completion_tokens;
    if (s.server_model.empty() && !r.server_model.empty()) s.server_model = r.server_model;
  }
  s.strict = {std::string(kStrictMatch), mean(strict), mean_stderr(strict)};
  s.flexible = {std::string(kFlexibleExtract), mean(flexible), mean_stderr(flexible)};
  return s;
}

namespace {

// lm-eval's sanitisation of a model name for paths.
std::string sanitize_model_name(const std::string& name) {
  return std::regex_replace(name, std::regex(R"(["<>:/|\\?*\[\]]+)"), "__");
}

ojson score_value(const FilterScore& f, size_t n) { return n == 0 ? ojson("N/A") : ojson(f.value); }
ojson stderr_value(const FilterScore& f) { return f.stderr_value ? ojson(*f.stderr_value) : ojson("N/A"); }

ojson task_config(const EvalOptions& o, const std::string& endpoint) {
  ojson filter_strict = {{"name", "strict-match"},
                         {"filter", ojson::array({{{"function", "regex"}, {"regex_pattern", "#### (\\-?[0-9\\.\\,]+)"}},
                                                  {{"function", "take_first"}}})}};
  ojson filter_flexible = {
      {"name", "flexible-extract"},
      {"filter", ojson::array({{{"function", "regex"}, {"group_select", -1}, {"regex_pattern", "(-?[$0-9.,]{2,})|(-?[0-9]+)"}},
                               {{"function", "take_first"}}})}};
  ojson c;
  c["task"] = "gsm8k";
  c["tag"] = ojson::array({"math_word_problems"});
  c["dataset_path"] = "openai/gsm8k";
  c["dataset_name"] = "main";
  c["training_split"] = "train";
  c["test_split"] = "test";
  c["fewshot_split"] = "train";
  c["doc_to_text"] = "Question: {{question}}\nAnswer:";
  c["doc_to_target"] = "{{answer}}";
  c["unsafe_code"] = false;
  c["description"] = "";
  c["target_delimiter"] = " ";
  c["fewshot_delimiter"] = "\n\n";
  c["fewshot_config"] = {{"sampler", "default"}, {"split", "train"}};
  c["num_fewshot"] = o.num_fewshot;
  c["metric_list"] = ojson::array({{{"metric", "exact_match"},
                                    {"aggregation", "mean"},
                                    {"higher_is_better", true},
                                    {"ignore_case", true},
                                    {"ignore_punctuation", false},
                                    {"regexes_to_ignore", ojson::array({",", "\\$", "(?s).*#### ", "\\.$"})}}});
  c["output_type"] = "generate_until";
  c["generation_kwargs"] = {{"until", gsm8k_stop_sequences()}, {"do_sample", false}, {"temperature", o.temperature}};
  c["repeats"] = 1;
  c["filter_list"] = ojson::array({filter_strict, filter_flexible});
  c["should_decontaminate"] = false;
  c["metadata"] = {{"version", kTaskVersion},
                   {"model", o.model},
                   {"base_url", endpoint},
                   {"num_concurrent", o.num_concurrent},
                   {"max_gen_toks", o.max_gen_toks}};
  return c;
}

}  // namespace

ojson results_json(const EvalRun& run, const Summary& s) {
  const EvalOptions& o = run.options;
  ojson j;
  ojson task;
  task["name"] = "gsm8k";
  task["alias"] = "gsm8k";
  task["sample_len"] = s.n;
  task["exact_match,strict-match"] = score_value(s.strict, s.n);
  task["exact_match_stderr,strict-match"] = stderr_value(s.strict);
  task["exact_match,flexible-extract"] = score_value(s.flexible, s.n);
  task["exact_match_stderr,flexible-extract"] = stderr_value(s.flexible);
  j["results"]["gsm8k"] = task;
  j["group_subtasks"] = ojson::object();
  j["configs"]["gsm8k"] = task_config(o, run.endpoint_url);
  j["versions"]["gsm8k"] = kTaskVersion;
  j["n-shot"]["gsm8k"] = o.num_fewshot;
  j["higher_is_better"]["gsm8k"] = {{"exact_match", true}};
  j["n-samples"]["gsm8k"] = {{"original", run.original_docs}, {"effective", run.selected_docs}};
  ojson config;
  config["model"] = "local-chat-completions";
  config["model_args"] = {{"model", o.model},
                          {"base_url", run.endpoint_url},
                          {"num_concurrent", o.num_concurrent},
                          {"max_gen_toks", o.max_gen_toks}};
  config["batch_size"] = "1";
  config["batch_sizes"] = ojson::array();
  config["device"] = nullptr;
  config["use_cache"] = nullptr;
  config["limit"] = o.limit ? ojson(*o.limit) : ojson(nullptr);
  config["bootstrap_iters"] = 100000;
  config["gen_kwargs"] = ojson::object();
  config["random_seed"] = 0;
  config["numpy_seed"] = 1234;
  config["torch_seed"] = 1234;
  config["fewshot_seed"] = o.fewshot_seed;
  j["config"] = config;
  j["git_hash"] = nullptr;
  j["date"] = static_cast<double>(std::time(nullptr));
  j["model_source"] = "local-chat-completions";
  j["model_name"] = o.model;
  j["model_name_sanitized"] = sanitize_model_name(o.model);
  j["system_instruction"] = nullptr;
  j["system_instruction_sha"] = nullptr;
  j["fewshot_as_multiturn"] = o.fewshot_as_multiturn;
  j["chat_template"] = "";
  j["chat_template_sha"] = nullptr;
  j["total_evaluation_time_seconds"] = fmt::format("{}", run.seconds);

  ojson m;
  m["version"] = "0.1.0";
  m["endpoint"] = run.endpoint_url;
  m["server_model"] = s.server_model;
  m["data_dir"] = run.data_dir;
  m["samples_file"] = "samples_gsm8k.jsonl";
  m["partial"] = !run.complete();
  m["interrupted"] = run.interrupted;
  m["aborted"] = run.aborted ? ojson(run.abort_reason) : ojson(nullptr);
  m["documents"] = {{"selected", run.selected_docs},    {"finished", s.n},
                    {"resumed", run.resumed_docs},      {"failed", s.failed},
                    {"retried", s.retried_docs},        {"content_missing", s.content_missing}};
  m["tokens"] = {{"prompt", s.prompt_tokens}, {"completion", s.completion_tokens}};
  const size_t new_docs = s.n - std::min(s.n, run.resumed_docs);
  m["timing"] = {{"started_at", run.started_at},
                 {"seconds", run.seconds},
                 {"requests_per_second", run.seconds > 0 ? new_docs / run.seconds : 0.0},
                 {"completion_tokens_per_second", run.seconds > 0 ? s.completion_tokens / run.seconds : 0.0}};
  m["settings"] = {{"apply_chat_template", true},
                   {"fewshot_as_multiturn", o.fewshot_as_multiturn},
                   {"num_fewshot", o.num_fewshot},
                   {"num_concurrent", o.num_concurrent},
                   {"max_gen_toks", o.max_gen_toks},
                   {"temperature", o.temperature},
                   {"seed", o.seed},
                   {"fewshot_seed", o.fewshot_seed},
                   {"limit", o.limit ? ojson(*o.limit) : ojson(nullptr)},
                   {"timeout_s", o.timeout_seconds},
                   {"max_retries", o.max_retries},
                   {"fail_fast", o.fail_fast},
                   {"resume", o.resume}};
  j["mxlm"] = m;
  return j;
}

namespace {

size_t display_width(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

// pytablewriter prints a numeric column with the most decimal places any of its values needs.
size_t decimals(const std::string& number) {
  const size_t dot = number.find('.');
  if (dot == std::string::npos) return 0;
  size_t last = number.find_last_not_of('0');
  return last > dot ? last - dot : 0;
}

struct Column {
  std::string header;
  std::vector<std::string> cells;
  bool numeric = false;
};

// Numeric columns are reformatted to one precision and right-aligned; text is left-aligned; headers are
// centred; every column is at least 3 wide.
std::string markdown_table(std::vector<Column> columns) {
  for (auto& c : columns) {
    bool numeric = true;
    size_t places = 0;
    for (const auto& cell : c.cells) {
      if (cell.empty()) continue;
      char* end = nullptr;
      std::strtod(cell.c_str(), &end);
      if (end != cell.c_str() + cell.size()) numeric = false;
      places = std::max(places, decimals(cell));
    }
    c.numeric = numeric;
    if (numeric)
      for (auto& cell : c.cells)
        if (!cell.empty()) cell = fmt::format("{:.{}f}", std::strtod(cell.c_str(), nullptr), places);
  }
  std::vector<size_t> width;
  for (const auto& c : columns) {
    size_t w = std::max<size_t>(3, display_width(c.header));
    for (const auto& cell : c.cells) w = std::max(w, display_width(cell));
    width.push_back(w);
  }
  std::string out = "|";
  for (size_t i = 0; i < columns.size(); ++i) {
    const size_t pad = width[i] - display_width(columns[i].header);
    out += std::string(pad / 2, ' ') + columns[i].header + std::string(pad - pad / 2, ' ') + "|";
  }
  out += "\n|";
  for (size_t i = 0; i < columns.size(); ++i)
    out += (columns[i].numeric ? std::string(width[i] - 1, '-') + ":" : std::string(width[i], '-')) + "|";
  out += "\n";
  const size_t rows = columns.empty() ? 0 : columns[0].cells.size();
  for (size_t r = 0; r < rows; ++r) {
    out += "|";
    for (size_t i = 0; i < columns.size(); ++i) {
      const std::string& cell = columns[i].cells[r];
      const std::string pad(width[i] - display_width(cell), ' ');
      out += (columns[i].numeric ? pad + cell : cell + pad) + "|";
    }
    out += "\n";
  }
  return out;
}

std::string format_metric(const ojson& v) {
  if (v.is_number()) return fmt::format("{:.4f}", v.get<double>());
  if (v.is_string()) return v.get<std::string>() == "N/A" ? "   N/A" : v.get<std::string>();
  return v.dump();
}

}  // namespace

std::string results_table(const ojson& results) {
  std::vector<Column> columns = {{"Tasks", {}}, {"Version", {}}, {"Filter", {}}, {"n-shot", {}}, {"Metric", {}},
                                 {"", {}},      {"Value", {}},   {"", {}},       {"Stderr", {}}};
  for (const auto& [name, metrics] : results.at("results").items()) {
    // lm-eval sorts the "metric,filter" keys, so flexible-extract comes before strict-match.
    std::map<std::string, ojson> sorted;
    for (const auto& [key, value] : metrics.items()) sorted[key] = value;
    const ojson version = results.at("versions").value(name, ojson(nullptr));
    std::string task = metrics.value("alias", name);
    std::string version_text = version.is_number() ? fmt::format("{}", version.get<double>()) : "    N/A";
    for (const auto& [key, value] : sorted) {
      const size_t comma = key.find(',');
      if (comma == std::string::npos) continue;
      const std::string metric = key.substr(0, comma), filter = key.substr(comma + 1);
      if (metric.size() >= 7 && metric.compare(metric.size() - 7, 7, "_stderr") == 0) continue;
      const auto& hib = results.at("higher_is_better").value(name, ojson::object());
      const std::string arrow = hib.contains(metric) ? (hib[metric].get<bool>() ? "↑" : "↓") : "";
      const auto se = sorted.find(metric + "_stderr," + filter);
      columns[0].cells.push_back(task);
      columns[1].cells.push_back(version_text);
      columns[2].cells.push_back(filter);
      columns[3].cells.push_back(std::to_string(results.at("n-shot").value(name, 0)));
      columns[4].cells.push_back(metric);
      columns[5].cells.push_back(arrow);
      columns[6].cells.push_back(format_metric(value));
      columns[7].cells.push_back(se != sorted.end() ? "±" : "");
      columns[8].cells.push_back(se != sorted.end() ? format_metric(se->second) : "");
      task.clear();
      version_text.clear();
    }
  }
  return markdown_table(std::move(columns));
}

namespace {

void write_atomically(const fs::path& path, const std::string& contents) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot write {}", tmp.string());
    out << contents;
    out.flush();
    if (!out) fail("cannot write {}", tmp.string());
  }
  fs::rename(tmp, path);
}

}  // namespace

void write_outputs(const std::string& dir, const ojson& results, const std::vector<SampleRecord>& samples) {
  fs::create_directories(dir);
  std::string lines;
  for (const auto& r : samples) lines += r.to_line();
  write_atomically(fs::path(dir) / "samples_gsm8k.jsonl", lines);
  write_atomically(fs::path(dir) / "results.json",
                   results.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
}

namespace {

// The per-document scores that belong to a baseline results file, or "" when none is found.
std::string find_baseline_samples(const fs::path& results_path, const nlohmann::json& results) {
  const fs::path dir = results_path.parent_path().empty() ? fs::path(".") : results_path.parent_path();
  if (results.contains("mxlm") && results["mxlm"].contains("samples_file")) {
    const fs::path p = dir / results["mxlm"]["samples_file"].get<std::string>();
    if (fs::exists(p)) return p.string();
  }
  const std::string name = results_path.filename().string();
  std::smatch m;
  static const std::regex kLmEvalName(R"(results_(.*)\.json)");
  if (std::regex_match(name, m, kLmEvalName)) {
    const fs::path p = dir / ("samples_gsm8k_" + m[1].str() + ".jsonl");
    if (fs::exists(p)) return p.string();
  }
  std::vector<fs::path> candidates;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string f = entry.path().filename().string();
    if (f.rfind("samples_gsm8k", 0) == 0 && entry.path().extension() == ".jsonl") candidates.push_back(entry.path());
  }
  return candidates.size() == 1 ? candidates[0].string() : "";
}

double number_or_nan(const nlohmann::json& v) {
  return v.is_number() ? v.get<double>() : std::numeric_limits<double>::quiet_NaN();
}

}  // namespace

Comparison compare_with_baseline(const std::string& baseline_path, const std::vector<SampleRecord>& samples,
                                 const Summary& summary) {
  std::ifstream in(baseline_path);
  if (!in) fail("--compare: cannot open {}", baseline_path);
  nlohmann::json baseline;
  try {
    baseline = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail("--compare: {} is not JSON ({})", baseline_path, e.what());
  }
  if (!baseline.contains("results") || !baseline["results"].is_object() || baseline["results"].empty())
    fail("--compare: {} has no \"results\" object (expected an lm-eval or mxlm results file)", baseline_path);
  const auto& all = baseline["results"];
  const nlohmann::json& task = all.contains("gsm8k") ? all["gsm8k"] : all.begin().value();
  Comparison c;
  c.baseline_path = baseline_path;
  c.baseline_samples = find_baseline_samples(baseline_path, baseline);

  std::map<size_t, DocScores> base_docs;
  if (!c.baseline_samples.empty())
    for (const auto& d : read_doc_scores(c.baseline_samples)) base_docs[d.doc_id] = d;
  for (const std::string& filter : {std::string(kStrictMatch), std::string(kFlexibleExtract)}) {
    const bool strict = filter == kStrictMatch;
    const std::string key = "exact_match," + filter;
    if (!task.contains(key)) fail("--compare: {} has no \"{}\"", baseline_path, key);
    std::vector<double> b, q;
    for (const auto& r : samples) {
      const auto it = base_docs.find(r.doc_id);
      if (it == base_docs.end()) continue;
      const double v = strict ? it->second.strict : it->second.flexible;
      if (std::isnan(v)) continue;
      b.push_back(v);
      q.push_back(strict ? r.strict_score : r.flexible_score);
    }
    if (!b.empty()) {
      c.filters.emplace_back(filter, paired_recovery(b, q));
    } else {
      c.baseline_samples.clear();
      const FilterScore& cur = strict ? summary.strict : summary.flexible;
      const double base = number_or_nan(task[key]);
      const double base_se = task.contains("exact_match_stderr," + filter)
                                 ? number_or_nan(task["exact_match_stderr," + filter])
                                 : std::numeric_limits<double>::quiet_NaN();
      c.filters.emplace_back(filter, unpaired_recovery(base, base_se, cur.value, cur.stderr_value.value_or(0.0), summary.n));
    }
  }
  return c;
}

std::string comparison_table(const Comparison& c) {
  std::string out;
  const bool paired = !c.filters.empty() && c.filters[0].second.paired;
  out += fmt::format("Recovery against {} ({}, {} documents):\n", c.baseline_path,
                     paired ? "paired per document with " + c.baseline_samples
                            : "unpaired: no per-document baseline scores found",
                     c.filters.empty() ? 0 : c.filters[0].second.n);
  std::vector<Column> columns = {{"Filter", {}},   {"Baseline", {}}, {"Current", {}}, {"Recovery", {}},
                                 {"95% CI", {}},   {"Delta", {}},    {"Lost", {}},    {"Gained", {}}};
  for (const auto& [filter, r] : c.filters) {
    columns[0].cells.push_back(filter);
    columns[1].cells.push_back(fmt::format("{:.4f}", r.baseline));
    columns[2].cells.push_back(fmt::format("{:.4f}", r.current));
    columns[3].cells.push_back(fmt::format("{:.2f}%", 100 * r.ratio));
    columns[4].cells.push_back(fmt::format("[{:.2f}%, {:.2f}%]", 100 * r.ratio_low, 100 * r.ratio_high));
    columns[5].cells.push_back(fmt::format("{:+.4f} ± {:.4f}", r.difference, r.difference_stderr));
    columns[6].cells.push_back(r.paired ? std::to_string(r.lost) : "-");
    columns[7].cells.push_back(r.paired ? std::to_string(r.gained) : "-");
  }
  out += markdown_table(std::move(columns));
  return out;
}

ojson comparison_json(const Comparison& c) {
  ojson j;
  j["baseline"] = c.baseline_path;
  j["baseline_samples"] = c.baseline_samples.empty() ? ojson(nullptr) : ojson(c.baseline_samples);
  for (const auto& [filter, r] : c.filters) {
    j["filters"][filter] = {{"paired", r.paired},          {"n", r.n},
                            {"baseline", r.baseline},      {"current", r.current},
                            {"recovery", r.ratio},         {"recovery_ci95", {r.ratio_low, r.ratio_high}},
                            {"difference", r.difference},  {"difference_stderr", r.difference_stderr},
                            {"lost", r.lost},              {"gained", r.gained}};
  }
  return j;
}

}  // namespace mxlm::eval
