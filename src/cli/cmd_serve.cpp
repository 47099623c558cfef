// `mxlm serve [MODEL_DIR]`: loads the model, tokenizer and chat template, starts the engine thread and the
// OpenAI-compatible HTTP server, and shuts down cleanly on SIGINT/SIGTERM (in-flight requests are cancelled,
// their streams end with finish_reason "abort"). Flags follow `vllm serve`.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <pthread.h>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "backend/backend.h"
#include "cli/model_options.h"
#include "cli/registry.h"
#include "core/error.h"
#include "core/log.h"
#include "engine/model_runner.h"
#include "engine/scheduler.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/image_preprocess.h"
#include "model/m3_model.h"
#include "model/vision_tower.h"
#include "server/openai_server.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

#ifndef MXLM_DEFAULT_MODEL_DIR
#define MXLM_DEFAULT_MODEL_DIR "models/default"
#endif

namespace mxlm::cli {

namespace {

struct ServeOptions {
  std::string model;
  std::string host = "127.0.0.1";
  int port = 8000;
  std::string device = "cpu";
  std::string kv_cache_dtype = "auto";
  bool enforce_eager = false;  // decode steps never as CUDA graphs
  int tensor_parallel_size = 1;
  std::optional<int> block_size;  // default: the model's sparse block size (128 without sparse layers)
  int max_model_len = 0;
  int max_num_seqs = 64;
  int max_num_batched_tokens = 2048;
  int max_waiting = 1024;
  int num_kv_pages = 0;
  double kv_cache_memory_gib = 4.0;
  bool no_prefix_caching = false;
  std::string served_model_name;
  std::string tool_call_parser;
  bool enable_auto_tool_choice = false;
  std::string reasoning_parser;
  std::string moe_backend = kDefaultMoeBackend;
  std::string api_key;
  std::string generation_config = "auto";
  std::string dtype = "auto";
  std::string scripted_output;
  size_t max_body_bytes = 16u << 20;
  std::string allowed_local_media_path;
  std::optional<double> image_fetch_timeout;  // default: $VLLM_IMAGE_FETCH_TIMEOUT, else 5 s
  size_t max_image_bytes = 20u << 20;
  std::string limit_mm_per_prompt;
  std::vector<std::string> allowed_media_domains;
};

// vLLM's --limit-mm-per-prompt: JSON ('{"image": 4, "video": 0}') or the older 'image=4,video=0'. Returns the image
// limit (999 when unset); video is never accepted, so its limit only needs to parse.
int64_t image_limit(const std::string& text) {
  int64_t limit = 999;
  if (text.empty()) return limit;
  auto take = [&](const std::string& key, int64_t value) {
    if (value < 0) fail("--limit-mm-per-prompt: the {} limit must be >= 0", key);
    if (key == "image")
      limit = value;
    else if (key != "video" && key != "audio")
      fail("--limit-mm-per-prompt: unknown modality '{}' (image, video, audio)", key);
  };
  if (text.front() == '{') {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      fail("--limit-mm-per-prompt: {}", e.what());
    }
    for (const auto& [k, v] : j.items()) {
      if (!v.is_number_integer()) fail("--limit-mm-per-prompt: '{}' must be an integer", k);
      take(k, v.get<int64_t>());
    }
    return limit;
  }
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos) fail("--limit-mm-per-prompt: expected JSON or 'image=N', got '{}'", text);
    try {
      take(item.substr(0, eq), std::stoll(item.substr(eq + 1)));
    } catch (const std::logic_error&) {
      fail("--limit-mm-per-prompt: '{}' is not a number", item.substr(eq + 1));
    }
  }
  return limit;
}

// The image placeholder ids the chat template emits (tokenizer) and the config names; null when the tokenizer lacks
// one of the three M3 image tokens.
std::optional<model::ImageTokens> image_tokens(const text::Tokenizer& tok, const io::ModelConfig& config) {
  const auto image = tok.token_to_id("]<]image[>[");
  const auto start = tok.token_to_id("]<]start of image[>[");
  const auto end = tok.token_to_id("]<]end of image[>[");
  if (!image || !start || !end) {
    spdlog::warn("the tokenizer lacks the M3 image tokens; image input is disabled");
    return std::nullopt;
  }
  if (config.image_token_id >= 0 && config.image_token_id != static_cast<int>(*image))
    spdlog::warn(
        "config.json image_token_index {} differs from the tokenizer's ]<]image[>[ id {}; using the tokenizer's",
        config.image_token_id, *image);
  return model::ImageTokens{static_cast<int32_t>(*image), static_cast<int32_t>(*start), static_cast<int32_t>(*end)};
}

server::SamplingDefaults read_generation_config(const std::filesystem::path& dir, const std::string& mode) {
  server::SamplingDefaults d;
  if (mode == "vllm" || mode == "none") return d;
  std::filesystem::path file =
      mode == "auto" ? dir / "generation_config.json" : std::filesystem::path(mode) / "generation_config.json";
  if (!std::filesystem::exists(file)) {
    if (mode != "auto") fail("--generation-config {}: no generation_config.json there", mode);
    return d;
  }
  std::ifstream in(file);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: {}", file.string(), e.what());
  }
  auto num = [&](const char* k) -> std::optional<float> {
    if (j.contains(k) && j[k].is_number()) return j[k].get<float>();
    return std::nullopt;
  };
  d.temperature = num("temperature");
  d.top_p = num("top_p");
  d.min_p = num("min_p");
  d.repetition_penalty = num("repetition_penalty");
  if (j.contains("top_k") && j["top_k"].is_number_integer()) d.top_k = j["top_k"].get<int32_t>();
  return d;
}

void run_serve(ServeOptions o) {
  // Signals go to one waiting thread (blocked everywhere else), which shuts down in order: the engine cancels
  // every request (their streams end), then the HTTP server stops. Blocked before anything starts a thread
  // (tensor-parallel ranks, NCCL, OpenMP), so that every thread inherits the mask.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  if (o.model.empty()) {
    o.model = MXLM_DEFAULT_MODEL_DIR;
    if (!std::filesystem::exists(std::filesystem::path(o.model) / "config.json"))
      fail(
          "no MODEL_DIR given and the bundled default model is not at {} (train or copy it there, or pass a model "
          "directory)",
          o.model);
  }
  if (!std::filesystem::is_directory(o.model)) fail("model directory {} does not exist", o.model);
  if (!o.tool_call_parser.empty() && o.tool_call_parser != "minimax_m3")
    fail("--tool-call-parser must be minimax_m3, got '{}'", o.tool_call_parser);
  if (!o.reasoning_parser.empty() && o.reasoning_parser != "minimax_m3")
    fail("--reasoning-parser must be minimax_m3, got '{}'", o.reasoning_parser);
  if (o.enable_auto_tool_choice && o.tool_call_parser.empty())
    fail("--enable-auto-tool-choice needs --tool-call-parser");
  if (o.block_size && *o.block_size <= 0) fail("--block-size must be positive");

  auto tokenizer = text::Tokenizer::load(o.model);
  std::optional<text::ChatTemplate> chat_template;
  try {
    chat_template.emplace(text::ChatTemplate::from_model_dir(o.model));
  } catch (const Error& e) {
    spdlog::warn("no chat template ({}); /v1/chat/completions will refuse requests", e.what());
  }

  model::ModelOptions mo;
  mo.float_format = parse_weight_dtype(o.dtype);
  mo.step_graphs = o.enforce_eager ? model::StepGraphs::Off : model::StepGraphs::On;  // on cuda
  LoadedModel lm = load_model(o.device, o.moe_backend, o.tensor_parallel_size, mo, o.model, o.kv_cache_dtype);
  auto& model = lm.model;
  if (!o.block_size) o.block_size = model->has_sparse_layers() ? model->text().sparse.block_size : 128;
  const int block_size = *o.block_size;
  if (model->has_sparse_layers() && block_size != model->text().sparse.block_size)
    fail("--block-size {} must equal the model's sparse attention block size {} (one sparse block is one KV page)",
         block_size, model->text().sparse.block_size);
  const int max_pos = model->text().max_position_embeddings;
  if (o.max_model_len <= 0) o.max_model_len = max_pos > 0 ? max_pos : 4096;
  if (max_pos > 0 && o.max_model_len > max_pos)
    fail("--max-model-len {} exceeds the model's max_position_embeddings {}", o.max_model_len, max_pos);

  engine::CacheConfig cache;
  cache.block_size = block_size;
  cache.prefix_caching = !o.no_prefix_caching;
  int64_t floats_per_page = 0;
  for (int l = 0; l < model->num_layers(); ++l)
    floats_per_page += 2 * model->kv_width() + (model->layer_is_sparse(l) ? model->index_width() : 0);
  const int64_t page_bytes = floats_per_page * block_size * 4;
  const int64_t wanted = static_cast<int64_t>(engine::pages_for(o.max_model_len, block_size)) * o.max_num_seqs;
  if (o.num_kv_pages > 0) {
    cache.num_pages = o.num_kv_pages;
  } else {
    const auto fit = static_cast<int64_t>(o.kv_cache_memory_gib * (1ull << 30)) / std::max<int64_t>(page_bytes, 1);
    cache.num_pages = static_cast<int32_t>(std::min(wanted, fit));
  }
  if (cache.num_pages < engine::pages_for(o.max_model_len, block_size))
    fail(
        "the KV cache ({} pages of {} tokens) cannot hold one sequence of --max-model-len {}; lower --max-model-len "
        "or raise --kv-cache-memory-gib / --num-kv-pages",
        cache.num_pages, block_size, o.max_model_len);
  spdlog::info("KV cache: {} pages of {} tokens ({:.1f} MiB)", cache.num_pages, block_size,
               static_cast<double>(cache.num_pages) * static_cast<double>(page_bytes) / (1 << 20));
  engine::ModelRunner runner(*model, cache);
  lm.attach(runner);

  // The vision tower, when the checkpoint has one: it encodes images on the engine thread.
  std::unique_ptr<backend::Backend> tower_backend;
  std::unique_ptr<model::VisionTower> tower;
  std::optional<model::ImageTokens> image_ids;
  {
    const io::Checkpoint checkpoint(o.model);
    if (model::has_vision_tower(checkpoint)) {
      const io::ModelConfig config = io::load_model_config(o.model);
      image_ids = image_tokens(tokenizer, config);
      if (image_ids) {
        // The tower runs unsharded: at TP > 1 on a TP = 1 backend of its own (rank 0's device).
        if (lm.tensor_parallel_size() > 1) tower_backend = make_backend(o.device, o.moe_backend);
        tower = std::make_unique<model::VisionTower>(config, checkpoint, tower_backend ? *tower_backend : *lm.backend,
                                                     mo.float_format);
        runner.set_vision_tower(tower.get());
        spdlog::info("vision tower loaded: image input enabled");
      }
    }
  }

  engine::SchedulerConfig sc;
  sc.max_num_seqs = o.max_num_seqs;
  sc.max_num_batched_tokens = o.max_num_batched_tokens;
  sc.max_model_len = o.max_model_len;
  sc.max_waiting = o.max_waiting;
  engine::Scheduler scheduler(runner, sc);

  server::ServerConfig cfg;
  cfg.host = o.host;
  cfg.port = o.port;
  cfg.served_model_name = o.served_model_name.empty() ? o.model : o.served_model_name;
  cfg.model_root = o.model;
  cfg.api_key = o.api_key;
  if (cfg.api_key.empty())
    if (const char* k = std::getenv("VLLM_API_KEY")) cfg.api_key = k;
  cfg.tool_call_parser = !o.tool_call_parser.empty();
  cfg.enable_auto_tool_choice = o.enable_auto_tool_choice;
  cfg.reasoning_parser = !o.reasoning_parser.empty();
  cfg.max_model_len = o.max_model_len;
  cfg.max_body_bytes = o.max_body_bytes;
  cfg.num_threads = o.max_num_seqs + std::min(o.max_waiting, 256) + 16;
  for (const int id : model->text().eos_token_ids) cfg.eos_token_ids.push_back(id);
  if (tokenizer.eos_id()) cfg.eos_token_ids.push_back(static_cast<int32_t>(*tokenizer.eos_id()));
  cfg.defaults = read_generation_config(o.model, o.generation_config);
  cfg.image_tokens = image_ids;
  if (image_ids) cfg.image_processor = model::load_image_processor_config(o.model);
  cfg.media.allowed_local_path = o.allowed_local_media_path;
  if (!o.allowed_local_media_path.empty() && !std::filesystem::is_directory(o.allowed_local_media_path))
    fail("--allowed-local-media-path {} is not a directory", o.allowed_local_media_path);
  if (!o.image_fetch_timeout) {
    o.image_fetch_timeout = 5.0;
    if (const char* t = std::getenv("VLLM_IMAGE_FETCH_TIMEOUT")) {
      try {
        o.image_fetch_timeout = std::stod(t);
      } catch (const std::exception&) {
        fail("VLLM_IMAGE_FETCH_TIMEOUT must be a number of seconds, got '{}'", t);
      }
    }
  }
  if (!(*o.image_fetch_timeout > 0.0)) fail("--image-fetch-timeout must be positive");
  cfg.media.fetch_timeout_s = *o.image_fetch_timeout;
  if (o.max_image_bytes == 0) fail("--max-image-bytes must be positive");
  cfg.media.max_bytes = o.max_image_bytes;
  cfg.max_images_per_prompt = image_limit(o.limit_mm_per_prompt);
  cfg.media.allowed_domains = o.allowed_media_domains;
  if (!o.scripted_output.empty()) {
    std::ifstream in(o.scripted_output, std::ios::binary);
    if (!in) fail("--scripted-output: cannot read {}", o.scripted_output);
    std::stringstream ss;
    ss << in.rdbuf();
    cfg.scripted_output = ss.str();
    spdlog::warn("--scripted-output: every completion is the text of {} (testing aid, not the model's output)",
                 o.scripted_output);
  }

  server::OpenAIServer srv(cfg, tokenizer, std::move(chat_template), scheduler);
  scheduler.start();
  std::thread waiter([&] {
    int sig = 0;
    sigwait(&set, &sig);
    spdlog::info("signal {}: shutting down ({} requests open)", sig, srv.in_flight());
    scheduler.stop();
    srv.stop();
  });
  try {
    srv.listen();
  } catch (...) {
    pthread_kill(waiter.native_handle(), SIGTERM);
    waiter.join();
    throw;
  }
  waiter.join();
  scheduler.stop();
  spdlog::info("server stopped");
}

void add_serve(CLI::App& app) {
  auto o = std::make_shared<ServeOptions>();
  auto* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server (flags as vllm serve)");
  cmd->add_option("model", o->model, "Model directory (default: the bundled model at " MXLM_DEFAULT_MODEL_DIR ")");
  cmd->add_option("--host", o->host)->capture_default_str();
  cmd->add_option("--port", o->port)->capture_default_str();
  cmd->add_option("--device", o->device, "cpu|cuda")->capture_default_str();
  cmd->add_option("--tensor-parallel-size", o->tensor_parallel_size,
                  "Ranks the model is sharded over (threads on cpu, GPUs 0..N-1 with NCCL on cuda)")
      ->capture_default_str();
  cmd->add_option("--block-size", o->block_size,
                  "KV page size in tokens; must equal the sparse block size (the default) when the model has sparse "
                  "layers, else 128");
  cmd->add_option("--max-model-len", o->max_model_len, "Context length (default: max_position_embeddings)");
  cmd->add_option("--max-num-seqs", o->max_num_seqs, "Sequences in the running batch")->capture_default_str();
  cmd->add_option("--max-num-batched-tokens", o->max_num_batched_tokens, "Tokens per engine step (prefill chunks)")
      ->capture_default_str();
  cmd->add_option("--max-waiting-requests", o->max_waiting, "Queued requests beyond which new ones get 503")
      ->capture_default_str();
  cmd->add_option("--num-kv-pages", o->num_kv_pages, "KV-cache pages (default: from --kv-cache-memory-gib)");
  cmd->add_option("--kv-cache-memory-gib", o->kv_cache_memory_gib, "KV-cache size cap")->capture_default_str();
  cmd->add_flag("--no-enable-prefix-caching", o->no_prefix_caching, "Disable prefix caching");
  cmd->add_option("--served-model-name", o->served_model_name, "Model name in the API (default: MODEL_DIR)");
  cmd->add_option("--tool-call-parser", o->tool_call_parser, "minimax_m3");
  cmd->add_flag("--enable-auto-tool-choice", o->enable_auto_tool_choice, "Allow tool_choice auto");
  cmd->add_option("--reasoning-parser", o->reasoning_parser, "minimax_m3");
  add_moe_backend_option(*cmd, o->moe_backend);
  cmd->add_option("--kv-cache-dtype", o->kv_cache_dtype, "KV cache element: auto (float32), float32, bfloat16 (cuda)")
      ->capture_default_str();
  cmd->add_flag("--enforce-eager", o->enforce_eager,
                "Run decode steps eagerly (default on cuda: captured once per batch size as CUDA graphs and replayed)");
  cmd->add_option("--api-key", o->api_key, "Require this bearer token on /v1 routes (or $VLLM_API_KEY)");
  cmd->add_option("--generation-config", o->generation_config,
                  "auto (MODEL_DIR/generation_config.json sampling defaults), vllm/none (none), or a folder")
      ->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "Weight storage: auto, float32 or bfloat16")->capture_default_str();
  cmd->add_option("--max-request-bytes", o->max_body_bytes, "Largest accepted request body")->capture_default_str();
  cmd->add_option("--allowed-local-media-path", o->allowed_local_media_path,
                  "Folder whose files image parts may name (file:// URLs or absolute paths); default: none allowed");
  cmd->add_option("--image-fetch-timeout", o->image_fetch_timeout,
                  "Seconds to fetch an http(s) image (default: $VLLM_IMAGE_FETCH_TIMEOUT, else 5)");
  cmd->add_option("--max-image-bytes", o->max_image_bytes, "Largest encoded image accepted from any source")
      ->capture_default_str();
  cmd->add_option("--allowed-media-domains", o->allowed_media_domains,
                  "Hosts that http(s) image URLs may name (redirects are then not followed); default: any");
  cmd->add_option("--limit-mm-per-prompt", o->limit_mm_per_prompt,
                  "Images per prompt, as vLLM: '{\"image\": N}' or 'image=N' (default 999; video is not supported)");
  cmd->add_option("--scripted-output", o->scripted_output,
                  "TESTING AID: replace sampling with the tokens of this file's text (the model still runs every "
                  "step), to drive the reasoning/tool-call parsers end to end");
  cmd->callback([o] { run_serve(*o); });
}

const bool registered = register_command("serve", add_serve);

}  // namespace
}  // namespace mxlm::cli
