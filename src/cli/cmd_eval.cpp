// `mxlm eval`: GSM8K exactly as `lm_eval --model local-chat-completions --tasks gsm8k --apply_chat_template
// --fewshot_as_multiturn` runs it, against any OpenAI-compatible chat-completions endpoint (src/eval/).
// Flag names follow lm-eval's (dashes for underscores; its model_args num_concurrent, max_gen_toks,
// timeout and max_retries become flags). Exit codes: 0 done, 1 error, 3 some requests failed (scored as
// wrong and listed in the report), 130 interrupted (a partial report is written).
#include <CLI/CLI.hpp>

#include <fmt/format.h>

#include <atomic>
#include <cctype>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include "cli/registry.h"
#include "core/error.h"
#include "eval/report.h"
#include "eval/runner.h"

namespace mxlm::cli {
namespace {

std::atomic<bool> g_interrupt{false};

extern "C" void on_sigint(int) {
  // The first Ctrl-C stops the run and writes a partial report; a second one quits at once.
  if (g_interrupt.exchange(true)) _exit(130);
  static const char kMessage[] = "\ninterrupted: finishing up and writing a partial report (Ctrl-C again to quit)\n";
  (void)!write(STDERR_FILENO, kMessage, sizeof(kMessage) - 1);
}

struct Flags {
  eval::EvalOptions options;
  std::string tasks = "gsm8k";
  double limit = 0;
  bool apply_chat_template = false;
  std::vector<std::string> fewshot_as_multiturn;  // bare flag: {""}
  bool no_progress = false;
  std::string compare;
};

void run(Flags& f, const CLI::App& cmd) {
  auto& o = f.options;
  if (f.tasks != "gsm8k") fail("--tasks {}: only gsm8k is implemented", f.tasks);
  // lm-eval 0.4.13: --fewshot_as_multiturn defaults to on with --apply_chat_template; a value other than
  // true/1/yes turns it off; on without --apply_chat_template is an error.
  bool multiturn = true;
  if (cmd.count("--fewshot-as-multiturn")) {
    std::string v = f.fewshot_as_multiturn.empty() ? "" : f.fewshot_as_multiturn[0];
    for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    multiturn = v.empty() || v == "true" || v == "1" || v == "yes";
    if (multiturn && !f.apply_chat_template)
      fail("--fewshot-as-multiturn needs --apply-chat-template (as in lm-eval)");
  }
  if (!f.apply_chat_template)
    fail("--apply-chat-template is required: mxlm eval sends chat-completions requests, which lm-eval's "
         "local-chat-completions only builds with --apply_chat_template");
  o.fewshot_as_multiturn = multiturn;
  if (cmd.count("--limit")) o.limit = f.limit;
  if (!cmd.count("--api-key")) {
    const char* key = std::getenv("OPENAI_API_KEY");
    o.api_key = key ? key : "";
  }
  o.show_progress = !f.no_progress;
  o.interrupt = &g_interrupt;

  g_interrupt = false;
  struct sigaction action{}, previous{};
  action.sa_handler = on_sigint;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, &previous);
  eval::EvalRun result;
  try {
    result = eval::run_gsm8k(o);
  } catch (...) {
    sigaction(SIGINT, &previous, nullptr);
    throw;
  }
  sigaction(SIGINT, &previous, nullptr);

  const eval::Summary summary = eval::summarize(result.samples);
  auto results = eval::results_json(result, summary);
  std::string compare_text;
  if (!f.compare.empty()) {
    if (summary.n == 0) fail("--compare: no finished documents to compare");
    const auto comparison = eval::compare_with_baseline(f.compare, result.samples, summary);
    results["mxlm"]["compare"] = eval::comparison_json(comparison);
    compare_text = eval::comparison_table(comparison);
  }
  if (!o.output_path.empty()) eval::write_outputs(o.output_path, results, result.samples);

  std::printf("mxlm eval (model: %s, base_url: %s, num_concurrent: %d, max_gen_toks: %d), limit: %s, num_fewshot: %d, "
              "fewshot_as_multiturn: %s\n",
              o.model.c_str(), result.endpoint_url.c_str(), o.num_concurrent, o.max_gen_toks,
              o.limit ? fmt::format("{}", *o.limit).c_str() : "None", o.num_fewshot,
              o.fewshot_as_multiturn ? "true" : "false");
  std::printf("%s", eval::results_table(results).c_str());
  std::printf("%zu/%zu documents%s, %zu failed, %zu retried, server model %s, %lld prompt + %lld completion tokens, "
              "%.1f s\n",
              summary.n, result.selected_docs,
              result.resumed_docs ? fmt::format(" ({} resumed)", result.resumed_docs).c_str() : "", summary.failed,
              summary.retried_docs, summary.server_model.empty() ? "?" : summary.server_model.c_str(),
              static_cast<long long>(summary.prompt_tokens), static_cast<long long>(summary.completion_tokens),
              result.seconds);
  if (!compare_text.empty()) std::printf("\n%s", compare_text.c_str());
  if (!o.output_path.empty()) std::printf("wrote %s/results.json and samples_gsm8k.jsonl\n", o.output_path.c_str());
  std::fflush(stdout);

  if (result.aborted) fail("--fail-fast: {} (partial report written)", result.abort_reason);
  if (result.interrupted) {
    std::fprintf(stderr, "interrupted: %zu of %zu documents finished; rerun with --resume to complete\n", summary.n,
                 result.selected_docs);
    exit_code() = 130;
  } else if (summary.failed) {
    std::fprintf(stderr,
                 "warning: %zu request(s) failed after %d attempts and were scored as wrong; rerun with --resume to "
                 "retry them\n",
                 summary.failed, o.max_retries);
    exit_code() = 3;
  }
}

void add_eval(CLI::App& app) {
  auto flags = std::make_shared<Flags>();
  auto& o = flags->options;
  CLI::App* cmd = app.add_subcommand("eval", "Run GSM8K as lm-eval does against an OpenAI-compatible server");
  cmd->add_option("--base-url", o.base_url,
                  "chat-completions URL, e.g. http://127.0.0.1:8000/v1/chat/completions (a base ending in /v1 works)")
      ->required();
  cmd->add_option("--model", o.model, "model name sent in each request")->required();
  cmd->add_option("--tasks", flags->tasks, "task (gsm8k)")->capture_default_str();
  cmd->add_option("--num-fewshot", o.num_fewshot, "few-shot examples per question")->capture_default_str();
  cmd->add_option("--num-concurrent", o.num_concurrent, "requests in flight")->capture_default_str();
  cmd->add_option("--max-gen-toks", o.max_gen_toks, "max_tokens of each request (lm-eval's default 256)")
      ->capture_default_str();
  cmd->add_flag("--apply-chat-template", flags->apply_chat_template, "send chat messages (required)");
  cmd->add_option("--fewshot-as-multiturn", flags->fewshot_as_multiturn,
                  "few-shot examples as user/assistant turns (default with --apply-chat-template, as in lm-eval "
                  "0.4.13); 'false' puts them in one user message")
      ->expected(0, 1);
  cmd->add_option("--limit", flags->limit, "only the first N documents (a fraction if < 1)");
  cmd->add_option("--output-path", o.output_path, "directory for results.json and samples_gsm8k.jsonl");
  cmd->add_option("--compare", flags->compare,
                  "baseline results.json (mxlm or lm-eval): print recovery per filter with a paired 95% CI");
  cmd->add_option("--data-dir", o.data_dir, "GSM8K folder with test/train .jsonl[.xz] (default: $MXLM_GSM8K_DIR or "
                                            "the repository's data/gsm8k)");
  cmd->add_option("--api-key", o.api_key, "bearer token (default: $OPENAI_API_KEY, else empty)");
  cmd->add_option("--timeout", o.timeout_seconds, "seconds per request attempt")->capture_default_str();
  cmd->add_option("--max-retries", o.max_retries, "attempts per request")->capture_default_str();
  cmd->add_option("--seed", o.seed, "the requests' \"seed\" field")->capture_default_str();
  cmd->add_option("--fewshot-seed", o.fewshot_seed, "seed of the few-shot draws")->capture_default_str();
  cmd->add_flag("--fail-fast", o.fail_fast, "abort on the first request that fails after its retries (as lm-eval)");
  cmd->add_flag("--resume", o.resume, "skip documents already finished in --output-path's samples file");
  cmd->add_flag("--no-progress", flags->no_progress, "no progress bar or progress log lines");
  cmd->callback([flags, cmd] { run(*flags, *cmd); });
}

const bool registered = register_command("eval", add_eval);

}  // namespace
}  // namespace mxlm::cli
