// `mxlm generate`: tokenize a prompt (optionally through the model's chat template), prefill it, then decode
// token by token with the sampler, streaming the text to stdout. The CLI is where text (tokenizer, chat
// template) meets the engine; the engine itself never depends on the text layer.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "cli/model_options.h"
#include "cli/registry.h"
#include "core/error.h"
#include "core/log.h"
#include "engine/model_runner.h"
#include "engine/sampler.h"
#include "model/m3_model.h"
#include "text/chat_template.h"
#include "text/detokenizer.h"
#include "text/tokenizer.h"

namespace mxlm::cli {

namespace {

struct GenerateOptions {
  std::string model;
  std::string prompt;
  std::string tokens;
  bool chat = false;
  int max_tokens = 64;
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  std::optional<uint64_t> seed;
  bool ignore_eos = false;
  std::string device = "cpu";
  std::string dtype = "auto";
  std::string kv_cache_dtype = "auto";
  std::string moe_backend = kDefaultMoeBackend;
  bool enforce_eager = false;  // decode steps never as CUDA graphs
  int tensor_parallel_size = 1;
};

void run_generate(const GenerateOptions& o) {
  if (o.prompt.empty() == o.tokens.empty()) fail("give exactly one of --prompt or --tokens");
  if (o.max_tokens < 0) fail("--max-tokens must be >= 0");
  std::optional<text::Tokenizer> tokenizer;
  std::vector<int32_t> prompt;
  if (!o.tokens.empty()) {
    if (o.chat) fail("--chat needs --prompt (a chat template renders text)");
    prompt = parse_token_list(o.tokens);
  } else {
    tokenizer.emplace(text::Tokenizer::load(o.model));
    std::vector<uint32_t> ids;
    if (o.chat) {
      const auto tmpl = text::ChatTemplate::from_model_dir(o.model);
      text::ChatRequest req;
      req.messages.push_back({{"role", "user"}, {"content", o.prompt}});
      req.add_generation_prompt = true;
      ids = tokenizer->encode(tmpl.render(req), /*add_special_tokens=*/false);
    } else {
      ids = tokenizer->encode(o.prompt, /*add_special_tokens=*/true);
    }
    prompt.assign(ids.begin(), ids.end());
  }
  if (prompt.empty()) fail("the prompt encodes to no tokens");

  model::ModelOptions mo;
  mo.float_format = parse_weight_dtype(o.dtype);
  mo.step_graphs = o.enforce_eager ? model::StepGraphs::Off : model::StepGraphs::On;  // on cuda
  LoadedModel lm = load_model(o.device, o.moe_backend, o.tensor_parallel_size, mo, o.model, o.kv_cache_dtype);
  auto& model = lm.model;
  const int32_t total = static_cast<int32_t>(prompt.size()) + o.max_tokens;
  if (model->text().max_position_embeddings > 0 && total > model->text().max_position_embeddings)
    fail("prompt + max tokens = {} exceeds max_position_embeddings {}", total, model->text().max_position_embeddings);
  engine::ModelRunner runner(*model, engine::cache_config_for(*model, total));
  lm.attach(runner);

  engine::SamplingParams sp;
  sp.temperature = o.temperature;
  sp.top_k = o.top_k;
  sp.top_p = o.top_p;
  sp.min_p = o.min_p;
  sp.repetition_penalty = o.repetition_penalty;
  sp.seed = o.seed;
  sp.max_tokens = o.max_tokens;
  if (!o.ignore_eos) {
    sp.stop_token_ids = model->text().eos_token_ids;
    if (tokenizer && tokenizer->eos_id()) sp.stop_token_ids.push_back(static_cast<int32_t>(*tokenizer->eos_id()));
  }
  engine::Sampler sampler(sp);

  engine::Sequence seq;
  seq.tokens = prompt;
  seq.num_prompt_tokens = static_cast<int32_t>(prompt.size());
  runner.admit(seq);
  std::optional<text::IncrementalDetokenizer> detok;
  if (tokenizer) detok.emplace(*tokenizer, /*skip_special_tokens=*/true);
  std::vector<int32_t> output;
  const auto t0 = std::chrono::steady_clock::now();
  auto t_first = t0;
  for (int i = 0; i < o.max_tokens; ++i) {
    engine::StepItem item{&seq, seq.num_uncomputed(), false};
    // Without penalties the token is drawn on the backend (only its id comes back); either way the same token.
    const bool on_device = !sampler.needs_token_history();
    const backend::SampleParams draw = on_device ? sampler.device_draw() : backend::SampleParams{};
    const auto out = on_device ? runner.step({&item, 1}, {&draw, 1}) : runner.step({&item, 1});
    if (i == 0) t_first = std::chrono::steady_clock::now();
    const int32_t next = on_device ? out.tokens[0] : sampler.sample(out.row(0), {prompt.data(), prompt.size()}, output);
    output.push_back(next);
    seq.tokens.push_back(next);
    const bool stop = sampler.is_stop(next);
    if (detok) {
      if (!stop) std::fputs(detok->add(static_cast<uint32_t>(next)).c_str(), stdout);
    } else {
      std::printf("%s%d", i ? "," : "", next);
    }
    std::fflush(stdout);
    if (stop) break;
  }
  if (detok) std::fputs(detok->flush().c_str(), stdout);
  std::fputs("\n", stdout);
  const auto t1 = std::chrono::steady_clock::now();
  const double prefill_s = std::chrono::duration<double>(t_first - t0).count();
  const double decode_s = std::chrono::duration<double>(t1 - t_first).count();
  spdlog::info("prompt {} tokens in {:.3f} s; generated {} tokens, decode {:.2f} tokens/s", prompt.size(), prefill_s,
               output.size(), output.size() > 1 ? static_cast<double>(output.size() - 1) / decode_s : 0.0);
}

void add_generate(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  auto* cmd = app.add_subcommand("generate", "Generate text from a prompt");
  cmd->add_option("--model", o->model, "Model directory")->required();
  cmd->add_option("--prompt", o->prompt, "Prompt text (needs tokenizer.json in the model directory)");
  cmd->add_option("--tokens", o->tokens, "Prompt as comma-separated token ids (prints generated ids)");
  cmd->add_flag("--chat", o->chat, "Wrap the prompt as a user message with the model's chat template");
  cmd->add_option("--max-tokens", o->max_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", o->temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "0 = off")->capture_default_str();
  cmd->add_option("--top-p", o->top_p)->capture_default_str();
  cmd->add_option("--min-p", o->min_p)->capture_default_str();
  cmd->add_option("--repetition-penalty", o->repetition_penalty)->capture_default_str();
  cmd->add_option("--seed", o->seed, "Sampling seed");
  cmd->add_flag("--ignore-eos", o->ignore_eos, "Do not stop at end-of-sequence tokens");
  cmd->add_option("--device", o->device, "cpu|cuda")->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "Weight storage: auto, float32 or bfloat16")->capture_default_str();
  cmd->add_option("--kv-cache-dtype", o->kv_cache_dtype, "KV cache element: auto (float32), float32, bfloat16 (cuda)")
      ->capture_default_str();
  add_moe_backend_option(*cmd, o->moe_backend);
  cmd->add_flag("--enforce-eager", o->enforce_eager,
                "Run decode steps eagerly (default on cuda: captured once per batch size as CUDA graphs and replayed)");
  cmd->add_option("--tensor-parallel-size", o->tensor_parallel_size,
                  "Ranks the model is sharded over (threads on cpu, GPUs 0..N-1 with NCCL on cuda)")
      ->capture_default_str();
  cmd->callback([o] { run_generate(*o); });
}

const bool registered = register_command("generate", add_generate);

}  // namespace
}  // namespace mxlm::cli
