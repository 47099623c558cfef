// The OpenAI-compatible HTTP API (vLLM's routes and JSON shapes) over a running Scheduler:
//   GET /health, /v1/models, /metrics; POST /tokenize, /detokenize, /v1/completions, /v1/chat/completions.
// Handlers tokenize (through the chat template for chat; image content parts are loaded, preprocessed and expanded
// into their image tokens, which the engine fills with the vision tower's embeddings), submit one engine request
// per choice, and turn the token events into text with the incremental detokenizer, stop strings and the
// MiniMax-M3 reasoning and tool-call parsers; streaming answers are server-sent events. A streaming client that goes
// away cancels its requests (the engine frees their pages on its next step). Errors are OpenAI error objects.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/scheduler.h"
#include "model/image_preprocess.h"
#include "server/media.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace mxlm::server {

// Sampling defaults of the model (generation_config.json under --generation-config auto); request fields win.
struct SamplingDefaults {
  std::optional<float> temperature, top_p, min_p, repetition_penalty;
  std::optional<int32_t> top_k;
};

struct ServerConfig {
  std::string host = "127.0.0.1";
  int port = 8000;
  std::string served_model_name;
  std::string model_root;         // reported as `root` in /v1/models
  std::string api_key;            // empty: no authentication
  bool tool_call_parser = false;  // --tool-call-parser minimax_m3
  bool enable_auto_tool_choice = false;
  bool reasoning_parser = false;  // --reasoning-parser minimax_m3
  int32_t max_model_len = 4096;
  size_t max_body_bytes = 16u << 20;
  int num_threads = 64;  // HTTP worker threads (each open request holds one)
  std::vector<int32_t> eos_token_ids;
  SamplingDefaults defaults;
  std::optional<std::string> scripted_output;  // testing aid: every completion is this text
  // Image input (a model with a vision tower): the placeholder ids the chat template emits and the expansion
  // uses, the model's image processor, and where image bytes may come from. No image_tokens: image parts are a 400.
  std::optional<model::ImageTokens> image_tokens;
  model::ImageProcessorConfig image_processor;
  MediaOptions media;
  int64_t max_images_per_prompt = 999;  // --limit-mm-per-prompt image (vLLM's default)
};

class OpenAIServer {
 public:
  OpenAIServer(ServerConfig config, const text::Tokenizer& tokenizer, std::optional<text::ChatTemplate> chat_template,
               engine::Scheduler& scheduler);
  ~OpenAIServer();

  // Binds and serves until stop(); an Error when the address cannot be bound. Port 0 picks a free port.
  void listen();
  // The bound port once listening (or the configured one before).
  int port() const;
  bool running() const;
  // Stops accepting connections and ends listen(); open streams see their requests aborted.
  void stop();
  // Open HTTP requests (for graceful shutdown).
  int in_flight() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mxlm::server
