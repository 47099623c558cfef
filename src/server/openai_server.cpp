#include "server/openai_server.h"

#include "server/http.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <random>

#include "core/error.h"
#include "core/log.h"
#include "model/image_prompt.h"
#include "server/metrics.h"
#include "server/stop_strings.h"
#include "server/tool_choice.h"
#include "text/detokenizer.h"
#include "text/output_parser.h"

namespace mxlm::server {
namespace {

using json = nlohmann::ordered_json;
using engine::FinishReason;

// A request the server refuses, with the HTTP status and OpenAI error type to answer with.
struct ApiError : std::runtime_error {
  int status;
  std::string type;
  std::string param;
  ApiError(int s, std::string t, const std::string& message, std::string p = {})
      : std::runtime_error(message), status(s), type(std::move(t)), param(std::move(p)) {}
};

[[noreturn]] void bad_request(const std::string& message, const std::string& param = {}) {
  throw ApiError(400, "BadRequestError", message, param);
}

json error_body(int status, const std::string& type, const std::string& message, const std::string& param) {
  return {{"error",
           {{"message", message},
            {"type", type},
            {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", status}}}};
}

void set_json(httplib::Response& res, const json& body, int status = 200) {
  res.status = status;
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

// Request fields: absent and null mean "not given"; a wrong type or range is a 400 naming the field.
const json* field(const json& body, const char* key) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<double> get_number(const json& body, const char* key, double lo, double hi) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  if (!v->is_number()) bad_request(fmt::format("'{}' must be a number", key), key);
  const double d = v->get<double>();
  if (!std::isfinite(d) || d < lo || d > hi)
    bad_request(fmt::format("'{}' must be in [{}, {}], got {}", key, lo, hi, d), key);
  return d;
}

std::optional<int64_t> get_int(const json& body, const char* key, int64_t lo, int64_t hi) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(hi))
    bad_request(fmt::format("'{}' must be at most {}, got {}", key, hi, v->get<uint64_t>()), key);
  if (!v->is_number_integer()) {
    // 5.0 is an integer in JSON's eyes too (Python clients may send floats).
    if (v->is_number_float() && std::isfinite(v->get<double>()) && std::floor(v->get<double>()) == v->get<double>() &&
        std::fabs(v->get<double>()) < 9e15) {
      const auto i = static_cast<int64_t>(v->get<double>());
      if (i < lo || i > hi) bad_request(fmt::format("'{}' must be in [{}, {}], got {}", key, lo, hi, i), key);
      return i;
    }
    bad_request(fmt::format("'{}' must be an integer", key), key);
  }
  const int64_t i = v->get<int64_t>();
  if (i < lo || i > hi) bad_request(fmt::format("'{}' must be in [{}, {}], got {}", key, lo, hi, i), key);
  return i;
}

std::optional<bool> get_bool(const json& body, const char* key) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) bad_request(fmt::format("'{}' must be a boolean", key), key);
  return v->get<bool>();
}

std::optional<std::string> get_string(const json& body, const char* key) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) bad_request(fmt::format("'{}' must be a string", key), key);
  return v->get<std::string>();
}

std::string random_hex(size_t n) {
  static std::mutex mutex;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard<std::mutex> lock(mutex);
  static const char* digits = "0123456789abcdef";
  std::string s(n, '0');
  for (auto& c : s) c = digits[rng() & 15];
  return s;
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// What chat and completion requests share: sampling, stop, n, streaming, logprobs.
struct CommonParams {
  engine::SamplingParams sampling;
  int n = 1;
  bool stream = false;
  bool include_usage = false;
  std::vector<std::string> stop;
  bool include_stop_str = false;
  bool ignore_eos = false;
  bool skip_special_tokens = true;
  int32_t top_logprobs = -1;
  std::optional<int64_t> max_tokens;
};

CommonParams parse_common(const json& body, const SamplingDefaults& defaults, int64_t max_model_len) {
  CommonParams p;
  auto& s = p.sampling;
  s.temperature =
      static_cast<float>(get_number(body, "temperature", 0.0, 100.0).value_or(defaults.temperature.value_or(1.0f)));
  s.top_p = static_cast<float>(get_number(body, "top_p", 0.0, 1.0).value_or(defaults.top_p.value_or(1.0f)));
  if (s.top_p <= 0.0f) bad_request("'top_p' must be in (0, 1]", "top_p");
  s.top_k = static_cast<int32_t>(get_int(body, "top_k", -1, 1 << 30).value_or(defaults.top_k.value_or(0)));
  if (s.top_k < 0) s.top_k = 0;
  s.min_p = static_cast<float>(get_number(body, "min_p", 0.0, 1.0).value_or(defaults.min_p.value_or(0.0f)));
  s.presence_penalty = static_cast<float>(get_number(body, "presence_penalty", -2.0, 2.0).value_or(0.0));
  s.frequency_penalty = static_cast<float>(get_number(body, "frequency_penalty", -2.0, 2.0).value_or(0.0));
  s.repetition_penalty = static_cast<float>(
      get_number(body, "repetition_penalty", 1e-6, 100.0).value_or(defaults.repetition_penalty.value_or(1.0f)));
  if (auto seed = get_int(body, "seed", INT64_MIN, INT64_MAX)) s.seed = static_cast<uint64_t>(*seed);
  p.n = static_cast<int>(get_int(body, "n", 1, 128).value_or(1));
  p.stream = get_bool(body, "stream").value_or(false);
  if (const json* so = field(body, "stream_options")) {
    if (!so->is_object()) bad_request("'stream_options' must be an object", "stream_options");
    p.include_usage = get_bool(*so, "include_usage").value_or(false);
  }
  if (const json* stop = field(body, "stop")) {
    if (stop->is_string()) {
      p.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const auto& x : *stop) {
        if (!x.is_string()) bad_request("'stop' must be a string or a list of strings", "stop");
        p.stop.push_back(x.get<std::string>());
      }
    } else {
      bad_request("'stop' must be a string or a list of strings", "stop");
    }
  }
  if (const json* ids = field(body, "stop_token_ids")) {
    if (!ids->is_array()) bad_request("'stop_token_ids' must be a list of integers", "stop_token_ids");
    for (const auto& x : *ids) {
      if (!x.is_number_integer()) bad_request("'stop_token_ids' must be a list of integers", "stop_token_ids");
      s.stop_token_ids.push_back(x.get<int32_t>());
    }
  }
  p.include_stop_str = get_bool(body, "include_stop_str_in_output").value_or(false);
  p.ignore_eos = get_bool(body, "ignore_eos").value_or(false);
  p.skip_special_tokens = get_bool(body, "skip_special_tokens").value_or(true);
  // Token counts beyond the context are refused later with the context-length message; past this bound they
  // are absurd (and would overflow).
  const int64_t absurd = int64_t{1} << 40;
  auto mt = get_int(body, "max_completion_tokens", 0, absurd);
  if (!mt) mt = get_int(body, "max_tokens", 0, absurd);
  if (mt && *mt < 1) bad_request("'max_tokens' must be at least 1", "max_tokens");
  if (mt && *mt > max_model_len)
    bad_request(fmt::format("'max_tokens' is {}, more than the maximum model length {}", *mt, max_model_len),
                "max_tokens");
  p.max_tokens = mt;
  return p;
}

bool is_parser_marker(const std::string& token) {
  return token.find("think") != std::string::npos || token.find("minimax") != std::string::npos ||
         token.find("tool_call") != std::string::npos;
}

// One choice: an engine request and its text pipeline (detokenizer → stop strings → [chat parsers]).
struct Choice {
  int index = 0;
  std::shared_ptr<engine::RequestStream> stream;
  std::unique_ptr<text::IncrementalDetokenizer> detok;
  std::unique_ptr<StopStringMatcher> stop;
  std::unique_ptr<text::OutputParser> parser;  // chat with a reasoning or tool-call parser
  std::vector<int32_t> tokens;
  std::vector<engine::TokenLogprob> logprobs;
  std::string text;  // visible output (stop strings applied)
  bool finished = false;
  std::string finish_reason;
  json stop_reason = nullptr;
  int32_t cached_prompt_tokens = 0;
  std::string error;
};

// Result of consuming a batch of events for a choice: new visible text and the logprobs of the new tokens.
struct ChoiceDelta {
  std::string text;
  std::vector<engine::TokenLogprob> logprobs;
  std::vector<int32_t> tokens;
  bool finished_now = false;
};

}  // namespace

struct OpenAIServer::Impl {
  ServerConfig cfg;
  const text::Tokenizer& tok;
  std::optional<text::ChatTemplate> chat_template;
  engine::Scheduler& sched;
  httplib::Server http;
  std::mutex counters_mutex;
  HttpCounters counters;
  std::atomic<int> in_flight{0};
  std::atomic<bool> stopping{false};
  std::atomic<int> bound_port{0};
  std::shared_ptr<int> listen_socket;
  std::vector<bool> show_special;  // special tokens that stay in the text the parsers see
  std::vector<int32_t> scripted_tokens;
  std::once_flag vocab_once;  // token bytes for tool_choice "required", built on first use
  std::shared_ptr<const engine::TokenBytes> vocab;

  Impl(ServerConfig c, const text::Tokenizer& t, std::optional<text::ChatTemplate> ct, engine::Scheduler& s)
      : cfg(std::move(c)), tok(t), chat_template(std::move(ct)), sched(s) {
    show_special.assign(tok.vocab_size(), false);
    for (const auto& a : tok.added_tokens())
      if (a.special && is_parser_marker(a.content) && a.id < show_special.size()) show_special[a.id] = true;
    if (cfg.scripted_output) {
      for (const uint32_t id : tok.encode(*cfg.scripted_output, false))
        scripted_tokens.push_back(static_cast<int32_t>(id));
      if (scripted_tokens.empty()) fail("--scripted-output: the text encodes to no tokens");
    }
    routes();
  }

  // ---- text pipeline ----

  std::unique_ptr<Choice> start_choice(int index, std::vector<int32_t> prompt, const CommonParams& p,
                                       int64_t max_tokens, const text::OutputParserOptions* parser_options,
                                       std::shared_ptr<const engine::ToolChoiceConstraint> constraint = nullptr,
                                       const std::vector<engine::ImageSpan>& images = {}) {
    auto c = std::make_unique<Choice>();
    c->index = index;
    engine::GenerationRequest r;
    r.prompt = std::move(prompt);
    r.params = p.sampling;
    r.params.max_tokens = static_cast<int32_t>(max_tokens);
    if (p.sampling.seed && p.n > 1) r.params.seed = *p.sampling.seed + static_cast<uint64_t>(index);
    if (!p.ignore_eos)
      for (const int32_t id : cfg.eos_token_ids) r.params.stop_token_ids.push_back(id);
    r.top_logprobs = p.top_logprobs;
    r.scripted = scripted_tokens;
    r.constraint = std::move(constraint);
    r.images = images;  // the choices share each image's data: it is encoded once
    try {
      c->stream = sched.submit(std::move(r));
    } catch (const engine::QueueFull& e) {
      throw ApiError(503, "ServiceUnavailableError", e.what());
    } catch (const Error& e) {
      bad_request(e.what());
    }
    c->detok = std::make_unique<text::IncrementalDetokenizer>(tok, /*skip_special_tokens=*/false);
    c->stop = std::make_unique<StopStringMatcher>(p.stop, p.include_stop_str);
    if (parser_options) c->parser = std::make_unique<text::OutputParser>(*parser_options);
    return c;
  }

  bool visible(int32_t id, bool skip_special) const {
    if (!skip_special || id < 0) return true;
    const auto u = static_cast<uint32_t>(id);
    return !tok.is_special(u) || (u < show_special.size() && show_special[u]);
  }

  ChoiceDelta consume(Choice& c, std::vector<engine::RequestEvent> events, bool skip_special) {
    ChoiceDelta d;
    for (auto& e : events) {
      if (c.finished) break;
      if (e.cached_prompt_tokens) c.cached_prompt_tokens = e.cached_prompt_tokens;
      for (size_t i = 0; i < e.tokens.size() && !c.finished; ++i) {
        const int32_t t = e.tokens[i];
        c.tokens.push_back(t);
        d.tokens.push_back(t);
        if (i < e.logprobs.size()) {
          c.logprobs.push_back(e.logprobs[i]);
          d.logprobs.push_back(e.logprobs[i]);
        }
        const bool is_stop_token = e.stopped_by_token && i + 1 == e.tokens.size();
        if (is_stop_token) {
          c.stop_reason = t;
          continue;
        }
        if (!visible(t, skip_special)) continue;
        d.text += c.stop->feed(c.detok->add(static_cast<uint32_t>(t)));
        if (c.stop->matched()) {
          // A stop string ends the request here; the engine frees its pages on its next step.
          c.stream->cancel();
          c.finished = true;
          c.finish_reason = "stop";
          c.stop_reason = *c.stop->matched();
        }
      }
      if (!c.finished && e.finish != FinishReason::None) {
        d.text += c.stop->feed(c.detok->flush());
        if (c.stop->matched()) {
          c.finish_reason = "stop";
          c.stop_reason = *c.stop->matched();
        } else {
          d.text += c.stop->flush();
          c.finish_reason = engine::finish_reason_name(e.finish);
        }
        c.finished = true;
        c.error = e.error;
      }
    }
    if (c.finished) d.finished_now = true;
    c.text += d.text;
    return d;
  }

  // Waits for the next events of any unfinished choice (up to `timeout`).
  std::vector<std::pair<Choice*, ChoiceDelta>> poll(std::vector<std::unique_ptr<Choice>>& choices, bool skip_special,
                                                    std::chrono::milliseconds timeout) {
    std::vector<std::pair<Choice*, ChoiceDelta>> out;
    bool waited = false;
    for (auto& c : choices) {
      if (c->finished) continue;
      auto events = c->stream->wait(waited ? std::chrono::milliseconds(0) : timeout);
      if (!events.empty()) waited = true;
      if (events.empty()) continue;
      out.emplace_back(c.get(), consume(*c, std::move(events), skip_special));
    }
    return out;
  }

  static bool all_finished(const std::vector<std::unique_ptr<Choice>>& choices) {
    for (const auto& c : choices)
      if (!c->finished) return false;
    return true;
  }

  static void cancel_all(const std::vector<std::unique_ptr<Choice>>& choices) {
    for (const auto& c : choices)
      if (c->stream) c->stream->cancel();
  }

  void check_errors(const std::vector<std::unique_ptr<Choice>>& choices) {
    for (const auto& c : choices) {
      if (c->finish_reason == "error") throw ApiError(500, "InternalServerError", "generation failed: " + c->error);
      if (c->finish_reason == "abort") throw ApiError(503, "ServiceUnavailableError", "the server is shutting down");
    }
  }

  json token_json(int32_t id) const {
    const uint32_t u[1] = {static_cast<uint32_t>(id)};
    return tok.decode(u, false);
  }

  json byte_list(const std::string& s) const {
    json b = json::array();
    for (const unsigned char ch : s) b.push_back(static_cast<int>(ch));
    return b;
  }

  std::string token_text(int32_t id) const {
    const uint32_t u[1] = {static_cast<uint32_t>(id)};
    return tok.decode(u, false);
  }

  json chat_logprobs(const std::vector<engine::TokenLogprob>& lps) const {
    json content = json::array();
    for (const auto& lp : lps) {
      const std::string t = token_text(lp.token);
      json top = json::array();
      for (const auto& [id, l] : lp.top) {
        const std::string s = token_text(id);
        top.push_back({{"token", s}, {"logprob", l}, {"bytes", byte_list(s)}});
      }
      content.push_back({{"token", t}, {"logprob", lp.logprob}, {"bytes", byte_list(t)}, {"top_logprobs", top}});
    }
    return {{"content", content}};
  }

  json completion_logprobs(const std::vector<engine::TokenLogprob>& lps, size_t text_offset) const {
    json tokens = json::array(), token_lps = json::array(), tops = json::array(), offsets = json::array();
    for (const auto& lp : lps) {
      const std::string t = token_text(lp.token);
      tokens.push_back(t);
      token_lps.push_back(lp.logprob);
      json top = json::object();
      for (const auto& [id, l] : lp.top) top[token_text(id)] = l;
      tops.push_back(top);
      offsets.push_back(text_offset);
      text_offset += t.size();
    }
    return {{"text_offset", offsets}, {"token_logprobs", token_lps}, {"tokens", tokens}, {"top_logprobs", tops}};
  }

  // ---- prompt handling ----

  void check_model(const json& body) const {
    if (const json* m = field(body, "model")) {
      if (!m->is_string()) bad_request("'model' must be a string", "model");
      if (m->get<std::string>() != cfg.served_model_name)
        throw ApiError(404, "NotFoundError", fmt::format("The model `{}` does not exist.", m->get<std::string>()),
                       "model");
    }
  }

  int64_t resolve_max_tokens(const CommonParams& p, size_t prompt_len) const {
    const auto len = static_cast<int64_t>(prompt_len);
    if (len >= cfg.max_model_len)
      bad_request(
          fmt::format("This model's maximum context length is {} tokens. However, your prompt has {} tokens. "
                      "Please reduce the length of the prompt.",
                      cfg.max_model_len, len));
    const int64_t max_tokens = p.max_tokens.value_or(cfg.max_model_len - len);
    if (len + max_tokens > cfg.max_model_len)
      bad_request(
          fmt::format("This model's maximum context length is {} tokens. However, you requested {} tokens ({} "
                      "in the messages, {} in the completion). Please reduce the length of the messages or "
                      "completion.",
                      cfg.max_model_len, len + max_tokens, len, max_tokens));
    return max_tokens;
  }

  // An image content part: where its bytes are and how to name it in errors.
  struct ImagePart {
    std::string what;  // "messages[1].content[2]"
    std::string url;
  };

  // Turns an image content part into the template's {"type": "image"} (one placeholder), or refuses the part.
  void take_content_part(json& part, const std::string& what, std::vector<ImagePart>& images) const {
    const std::string type = part["type"].get<std::string>();
    if (type == "video_url" || type == "video" || type == "input_video")
      bad_request(fmt::format("{}: video input is not supported", what), "messages");
    if (type == "input_audio" || type == "audio_url" || type == "audio")
      bad_request(fmt::format("{}: audio input is not supported", what), "messages");
    if (type != "image_url" && type != "input_image" && type != "image" && type != "image_embeds" &&
        type != "image_pil")
      return;
    if (!cfg.image_tokens)
      bad_request(
          fmt::format("{}: the model `{}` takes no image input (it has no vision tower)", what, cfg.served_model_name),
          "messages");
    // vLLM's forms: {"type": "image_url", "image_url": {"url": ...}} (or a bare string), and the Responses API's
    // {"type": "input_image", "image_url": "..."}.
    std::string url;
    auto it = part.find("image_url");
    if ((type == "image_url" || type == "input_image") && it != part.end()) {
      if (it->is_string())
        url = it->get<std::string>();
      else if (it->is_object() && it->contains("url") && (*it)["url"].is_string())
        url = (*it)["url"].get<std::string>();
    }
    if (url.empty()) {
      if (type == "image_url" || type == "input_image")
        bad_request(fmt::format("{}: an image part needs \"image_url\": {{\"url\": \"data:...|http(s)://...|"
                                "file://...\"}}",
                                what),
                    "messages");
      bad_request(fmt::format("{}: content part type '{}' is not supported; send the image as image_url", what, type),
                  "messages");
    }
    images.push_back({what, std::move(url)});
    part = json{{"type", "image"}};
  }

  json chat_messages(const json& body, std::vector<ImagePart>& images) const {
    const json* m = field(body, "messages");
    if (!m) bad_request("'messages' is required", "messages");
    if (!m->is_array() || m->empty()) bad_request("'messages' must be a non-empty list", "messages");
    json messages = json::array();
    for (size_t mi = 0; mi < m->size(); ++mi) {
      const json& msg = (*m)[mi];
      if (!msg.is_object()) bad_request("each message must be an object", "messages");
      auto role = msg.find("role");
      if (role == msg.end() || !role->is_string()) bad_request("each message needs a string 'role'", "messages");
      auto content = msg.find("content");
      if (content != msg.end() && !content->is_null() && !content->is_string() && !content->is_array())
        bad_request("message 'content' must be a string or a list of content parts", "messages");
      if (content != msg.end() && content->is_array())
        for (const auto& part : *content)
          if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
            bad_request("each content part must be an object with a string 'type'", "messages");
      json copy = msg;
      if (copy.contains("content") && copy["content"].is_array())
        for (size_t pi = 0; pi < copy["content"].size(); ++pi)
          take_content_part(copy["content"][pi], fmt::format("messages[{}].content[{}]", mi, pi), images);
      // Reasoning of earlier turns comes back as `reasoning` (vLLM's current name) or `reasoning_content`, which
      // is what the template reads.
      if (!copy.contains("reasoning_content") && copy.contains("reasoning"))
        copy["reasoning_content"] = copy["reasoning"];
      messages.push_back(std::move(copy));
    }
    if (static_cast<int64_t>(images.size()) > cfg.max_images_per_prompt)
      bad_request(fmt::format("At most {} image(s) may be provided in one prompt (--limit-mm-per-prompt); got {}",
                              cfg.max_images_per_prompt, images.size()),
                  "messages");
    return messages;
  }

  // A chat prompt: token ids with every image placeholder expanded, and the images' runs of image tokens.
  struct ChatPrompt {
    std::vector<int32_t> tokens;
    std::vector<engine::ImageSpan> images;
  };

  // Loads, decodes and preprocesses each image part (in content order), then expands the placeholders.
  void add_images(ChatPrompt& prompt, const std::vector<ImagePart>& parts) const {
    std::vector<model::PreprocessedImage> pixels;
    for (const auto& part : parts) {
      try {
        const auto bytes = load_media(part.url, cfg.media);
        pixels.push_back(model::preprocess_image(model::decode_image(bytes, part.what), cfg.image_processor));
      } catch (const Error& e) {
        const std::string msg = e.what();
        bad_request(msg.rfind(part.what, 0) == 0 ? msg : part.what + ": " + msg, "messages");
      }
    }
    model::ImagePrompt expanded;
    try {
      expanded = model::expand_image_prompt(prompt.tokens, pixels, *cfg.image_tokens);
    } catch (const Error& e) {
      bad_request(fmt::format("image placeholders: {} (an image part in a message the chat template drops, or the "
                              "placeholder text typed in a message?)",
                              e.what()),
                  "messages");
    }
    prompt.tokens = std::move(expanded.tokens);
    for (size_t i = 0; i < pixels.size(); ++i) {
      const auto length = static_cast<int32_t>(pixels[i].num_image_tokens());
      auto data = std::make_shared<engine::ImageData>();
      data->pixels = std::move(pixels[i]);
      prompt.images.push_back({expanded.image_begins[i], length, expanded.image_hashes[i], std::move(data)});
    }
  }

  ChatPrompt render_chat(const json& body, const json& tools) const {
    if (!chat_template) bad_request("the model has no chat template");
    text::ChatRequest req;
    std::vector<ImagePart> images;
    req.messages = chat_messages(body, images);
    req.tools = tools;
    req.add_generation_prompt = get_bool(body, "add_generation_prompt").value_or(true);
    if (const json* kw = field(body, "chat_template_kwargs")) {
      if (!kw->is_object()) bad_request("'chat_template_kwargs' must be an object", "chat_template_kwargs");
      req.chat_template_kwargs = *kw;
    }
    std::string prompt;
    try {
      prompt = chat_template->render(req);
    } catch (const Error& e) {
      bad_request(fmt::format("chat template: {}", e.what()));
    }
    ChatPrompt out;
    for (const uint32_t id : tok.encode(prompt, get_bool(body, "add_special_tokens").value_or(false)))
      out.tokens.push_back(static_cast<int32_t>(id));
    if (!images.empty()) add_images(out, images);
    return out;
  }

  std::vector<int32_t> token_ids(const json& arr, const char* what) const {
    std::vector<int32_t> ids;
    for (const auto& x : arr) {
      if (!x.is_number_integer()) bad_request(fmt::format("'{}' must hold integers", what), what);
      const int64_t v = x.get<int64_t>();
      if (v < 0 || v >= static_cast<int64_t>(tok.vocab_size()))
        bad_request(fmt::format("token id {} is outside the vocabulary (size {})", v, tok.vocab_size()), what);
      ids.push_back(static_cast<int32_t>(v));
    }
    return ids;
  }

  // ---- routes ----

  void routes() {
    http.set_payload_max_length(cfg.max_body_bytes);
    listen_socket = remember_listen_socket(http);
    const int threads = std::max(cfg.num_threads, 8);
    http.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
    http.set_keep_alive_timeout(2);
    http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (cfg.api_key.empty() || req.path.rfind("/v1", 0) != 0) return httplib::Server::HandlerResponse::Unhandled;
      if (req.get_header_value("Authorization") == "Bearer " + cfg.api_key)
        return httplib::Server::HandlerResponse::Unhandled;
      set_json(res, error_body(401, "AuthenticationError", "invalid or missing API key", ""), 401);
      return httplib::Server::HandlerResponse::Handled;
    });
    http.set_error_handler(
        httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
          if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
          std::string message = fmt::format("{} {}: HTTP status {}", req.method, req.path, res.status);
          if (res.status == 413) message = "the request body is larger than the server accepts";
          if (res.status == 404) message = fmt::format("no route {} {}", req.method, req.path);
          set_json(res, error_body(res.status, res.status == 404 ? "NotFoundError" : "BadRequestError", message, ""),
                   res.status);
          return httplib::Server::HandlerResponse::Handled;
        }));
    http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string message = "internal error";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        message = e.what();
      } catch (...) {
      }
      set_json(res, error_body(500, "InternalServerError", message, ""), 500);
    });
    http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
      std::lock_guard<std::mutex> lock(counters_mutex);
      ++counters.requests;
      if (res.status >= 400 && res.status < 500) ++counters.client_errors;
      if (res.status >= 500) ++counters.server_errors;
      spdlog::debug("{} {} -> {}", req.method, req.path, res.status);
    });

    http.Get("/health", [this](const httplib::Request&, httplib::Response& res) { res.status = stopping ? 503 : 200; });
    http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      set_json(res, {{"object", "list"},
                     {"data",
                      {{{"id", cfg.served_model_name},
                        {"object", "model"},
                        {"created", unix_now()},
                        {"owned_by", "mxlm"},
                        {"root", cfg.model_root},
                        {"parent", nullptr},
                        {"max_model_len", cfg.max_model_len}}}}});
    });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      HttpCounters c;
      {
        std::lock_guard<std::mutex> lock(counters_mutex);
        c = counters;
      }
      res.set_content(render_metrics(sched.stats(), c, cfg.served_model_name), "text/plain; version=0.0.4");
    });
    post("/tokenize", [this](const json& body, httplib::Response& res) { tokenize(body, res); });
    post("/detokenize", [this](const json& body, httplib::Response& res) { detokenize(body, res); });
    post("/v1/completions", [this](const json& body, httplib::Response& res) { completions(body, res); });
    post("/v1/chat/completions", [this](const json& body, httplib::Response& res) { chat(body, res); });
  }

  template <typename F>
  void post(const char* path, F handler) {
    http.Post(path, [this, handler](const httplib::Request& req, httplib::Response& res) {
      ++in_flight;
      try {
        json body;
        try {
          body = json::parse(req.body);
        } catch (const json::exception& e) {
          bad_request(fmt::format("the body is not valid JSON: {}", e.what()));
        }
        if (!body.is_object()) bad_request("the body must be a JSON object");
        handler(body, res);
      } catch (const ApiError& e) {
        set_json(res, error_body(e.status, e.type, e.what(), e.param), e.status);
      } catch (const json::exception& e) {
        set_json(res, error_body(400, "BadRequestError", e.what(), ""), 400);
      } catch (const Error& e) {
        set_json(res, error_body(400, "BadRequestError", e.what(), ""), 400);
      }
      --in_flight;
    });
  }

  void tokenize(const json& body, httplib::Response& res) {
    check_model(body);
    std::vector<int32_t> ids;
    if (field(body, "messages")) {
      ids = render_chat(body, field(body, "tools") ? body["tools"] : json(nullptr)).tokens;
    } else {
      const auto prompt = get_string(body, "prompt");
      if (!prompt) bad_request("give 'prompt' (a string) or 'messages'", "prompt");
      for (const uint32_t id : tok.encode(*prompt, get_bool(body, "add_special_tokens").value_or(true)))
        ids.push_back(static_cast<int32_t>(id));
    }
    json strs = nullptr;
    if (get_bool(body, "return_token_strs").value_or(false)) {
      strs = json::array();
      for (const int32_t id : ids) strs.push_back(tok.id_to_token(static_cast<uint32_t>(id)).value_or(""));
    }
    set_json(res, {{"count", ids.size()}, {"max_model_len", cfg.max_model_len}, {"tokens", ids}, {"token_strs", strs}});
  }

  void detokenize(const json& body, httplib::Response& res) {
    check_model(body);
    const json* t = field(body, "tokens");
    if (!t || !t->is_array()) bad_request("'tokens' must be a list of token ids", "tokens");
    std::vector<uint32_t> ids;
    for (const int32_t id : token_ids(*t, "tokens")) ids.push_back(static_cast<uint32_t>(id));
    set_json(res, {{"prompt", tok.decode(ids, false)}});
  }

  json usage_json(int64_t prompt, int64_t completion, int64_t cached) const {
    json u = {{"prompt_tokens", prompt}, {"total_tokens", prompt + completion}, {"completion_tokens", completion}};
    u["prompt_tokens_details"] = {{"cached_tokens", cached}};
    return u;
  }

  // Runs `choices` to the end, streaming SSE chunks made by `on_delta` (and `on_finish`) when streaming.
  template <typename OnDelta, typename OnEnd>
  void stream_response(httplib::Response& res, std::shared_ptr<std::vector<std::unique_ptr<Choice>>> choices,
                       bool skip_special, OnDelta on_delta, OnEnd on_end) {
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, choices, skip_special, on_delta, on_end](size_t, httplib::DataSink& sink) {
          auto send = [&](const json& chunk) {
            const std::string s = "data: " + chunk.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
            return sink.write(s.data(), s.size());
          };
          std::vector<json> pending;
          while (!all_finished(*choices)) {
            auto deltas = poll(*choices, skip_special, std::chrono::milliseconds(50));
            for (auto& [c, d] : deltas) on_delta(*c, d, pending);
            for (const auto& chunk : pending)
              if (!send(chunk)) {
                cancel_all(*choices);  // the client went away
                return false;
              }
            pending.clear();
            if (deltas.empty() && !sink.is_writable()) {
              cancel_all(*choices);
              return false;
            }
          }
          on_end(pending);
          for (const auto& chunk : pending)
            if (!send(chunk)) return false;
          const std::string done = "data: [DONE]\n\n";
          sink.write(done.data(), done.size());
          sink.done();
          return true;
        },
        [choices](bool) { cancel_all(*choices); });
  }

  void completions(const json& body, httplib::Response& res) {
    check_model(body);
    if (field(body, "suffix")) bad_request("'suffix' is not supported", "suffix");
    const CommonParams p = [&] {
      CommonParams c = parse_common(body, cfg.defaults, cfg.max_model_len);
      if (auto lp = get_int(body, "logprobs", 0, 20)) c.top_logprobs = static_cast<int32_t>(*lp);
      return c;
    }();
    const bool echo = get_bool(body, "echo").value_or(false);
    if (echo && p.top_logprobs >= 0)
      bad_request("'echo' together with 'logprobs' (prompt logprobs) is not supported", "echo");
    const json* prompt = field(body, "prompt");
    if (!prompt) bad_request("'prompt' is required", "prompt");
    std::vector<std::vector<int32_t>> prompts;
    const bool add_special = get_bool(body, "add_special_tokens").value_or(true);
    auto encode = [&](const std::string& s) {
      std::vector<int32_t> ids;
      for (const uint32_t id : tok.encode(s, add_special)) ids.push_back(static_cast<int32_t>(id));
      return ids;
    };
    if (prompt->is_string()) {
      prompts.push_back(encode(prompt->get<std::string>()));
    } else if (prompt->is_array() && !prompt->empty() && (*prompt)[0].is_number()) {
      prompts.push_back(token_ids(*prompt, "prompt"));
    } else if (prompt->is_array() && !prompt->empty()) {
      for (const auto& x : *prompt) {
        if (x.is_string())
          prompts.push_back(encode(x.get<std::string>()));
        else if (x.is_array())
          prompts.push_back(token_ids(x, "prompt"));
        else
          bad_request("'prompt' must be a string, a list of strings, a list of token ids or a list of those", "prompt");
      }
    } else {
      bad_request("'prompt' must be a string, a list of strings, a list of token ids or a list of those", "prompt");
    }
    for (const auto& ids : prompts)
      if (ids.empty()) bad_request("the prompt is empty", "prompt");

    auto choices = std::make_shared<std::vector<std::unique_ptr<Choice>>>();
    std::vector<std::string> echo_text;
    int64_t prompt_tokens = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      const int64_t max_tokens = resolve_max_tokens(p, prompts[i].size());
      prompt_tokens += static_cast<int64_t>(prompts[i].size());
      std::vector<uint32_t> u(prompts[i].begin(), prompts[i].end());
      const std::string ptext = echo ? tok.decode(u, false) : std::string();
      try {
        for (int j = 0; j < p.n; ++j) {
          choices->push_back(start_choice(static_cast<int>(i) * p.n + j, prompts[i], p, max_tokens, nullptr));
          echo_text.push_back(ptext);
        }
      } catch (...) {
        cancel_all(*choices);
        throw;
      }
    }
    const std::string id = "cmpl-" + random_hex(32);
    const int64_t created = unix_now();
    const std::string model = cfg.served_model_name;

    if (p.stream) {
      auto echoed = std::make_shared<std::vector<bool>>(choices->size(), false);
      auto offsets = std::make_shared<std::vector<size_t>>(echo_text.size());
      for (size_t i = 0; i < echo_text.size(); ++i) (*offsets)[i] = echo_text[i].size();
      auto chunk = [id, created, model](json choice) {
        return json{{"id", id},
                    {"object", "text_completion"},
                    {"created", created},
                    {"model", model},
                    {"choices", json::array({std::move(choice)})}};
      };
      const bool want_lp = p.top_logprobs >= 0;
      stream_response(
          res, choices, p.skip_special_tokens,
          [this, chunk, echoed, offsets, echo_text, want_lp](Choice& c, ChoiceDelta& d, std::vector<json>& out) {
            std::string text = d.text;
            const auto k = static_cast<size_t>(c.index);
            if (!(*echoed)[k]) {
              text = echo_text[k] + text;
              (*echoed)[k] = true;
            }
            if (text.empty() && !d.finished_now && d.logprobs.empty()) return;
            json ch = {{"index", c.index},
                       {"text", text},
                       {"logprobs", nullptr},
                       {"finish_reason", nullptr},
                       {"stop_reason", nullptr}};
            if (want_lp) {
              ch["logprobs"] = completion_logprobs(d.logprobs, (*offsets)[k]);
              for (const auto& lp : d.logprobs) (*offsets)[k] += token_text(lp.token).size();
            }
            if (d.finished_now) {
              ch["finish_reason"] = c.finish_reason;
              ch["stop_reason"] = c.stop_reason;
            }
            out.push_back(chunk(std::move(ch)));
          },
          [this, choices, id, created, model, prompt_tokens, include = p.include_usage](std::vector<json>& out) {
            if (!include) return;
            int64_t completion = 0;
            for (const auto& c : *choices) completion += static_cast<int64_t>(c->tokens.size());
            out.push_back({{"id", id},
                           {"object", "text_completion"},
                           {"created", created},
                           {"model", model},
                           {"choices", json::array()},
                           {"usage", usage_json(prompt_tokens, completion, 0)}});
          });
      return;
    }

    while (!all_finished(*choices)) poll(*choices, p.skip_special_tokens, std::chrono::milliseconds(100));
    check_errors(*choices);
    json out_choices = json::array();
    int64_t completion = 0;
    for (size_t i = 0; i < choices->size(); ++i) {
      const Choice& c = *(*choices)[i];
      completion += static_cast<int64_t>(c.tokens.size());
      json lp = nullptr;
      if (p.top_logprobs >= 0) lp = completion_logprobs(c.logprobs, echo_text[i].size());
      out_choices.push_back({{"index", c.index},
                             {"text", echo_text[i] + c.text},
                             {"logprobs", lp},
                             {"finish_reason", c.finish_reason},
                             {"stop_reason", c.stop_reason}});
    }
    set_json(res, {{"id", id},
                   {"object", "text_completion"},
                   {"created", created},
                   {"model", model},
                   {"choices", out_choices},
                   {"usage", usage_json(prompt_tokens, completion, 0)}});
  }

  void chat(const json& body, httplib::Response& res) {
    check_model(body);
    CommonParams p = parse_common(body, cfg.defaults, cfg.max_model_len);
    if (get_bool(body, "logprobs").value_or(false)) {
      p.top_logprobs = static_cast<int32_t>(get_int(body, "top_logprobs", 0, 20).value_or(0));
    } else if (field(body, "top_logprobs") && get_int(body, "top_logprobs", 0, 20).value_or(0) > 0) {
      bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs");
    }

    // Tools and tool_choice (vLLM rules: "auto" needs --enable-auto-tool-choice and a parser).
    json tools = nullptr;
    if (const json* t = field(body, "tools")) {
      if (!t->is_array()) bad_request("'tools' must be a list", "tools");
      for (const auto& tool : *t)
        if (!tool.is_object() || !tool.contains("function") || !tool["function"].is_object() ||
            !tool["function"].contains("name") || !tool["function"]["name"].is_string())
          bad_request("each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}", "tools");
      if (!t->empty()) tools = *t;
    }
    std::string tool_choice = tools.is_null() ? "none" : "auto";
    std::string named_tool;
    if (const json* tc = field(body, "tool_choice")) {
      if (tc->is_string()) {
        tool_choice = tc->get<std::string>();
        if (tool_choice != "none" && tool_choice != "auto" && tool_choice != "required")
          bad_request("'tool_choice' must be none, auto, required or a named function", "tool_choice");
      } else if (tc->is_object() && tc->contains("function") && (*tc)["function"].is_object() &&
                 (*tc)["function"].contains("name") && (*tc)["function"]["name"].is_string()) {
        tool_choice = "named";
        named_tool = (*tc)["function"]["name"].get<std::string>();
      } else {
        bad_request(
            "'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            "tool_choice");
      }
      if (tool_choice != "none" && tools.is_null()) bad_request("'tool_choice' needs 'tools'", "tool_choice");
    }
    if (tool_choice == "auto" && !tools.is_null() && !(cfg.enable_auto_tool_choice && cfg.tool_call_parser))
      bad_request("\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set",
                  "tool_choice");
    if ((tool_choice == "required" || tool_choice == "named") && !cfg.tool_call_parser)
      bad_request(
          "tool_choice \"required\" or a named function needs --tool-call-parser (the constrained output is the "
          "parser's tool-call format)",
          "tool_choice");
    if (tool_choice == "named") {
      bool found = false;
      for (const auto& t : tools) found = found || t["function"]["name"] == named_tool;
      if (!found)
        bad_request(fmt::format("tool_choice names '{}', which is not among the tools", named_tool), "tool_choice");
    }

    const ChatPrompt chat_prompt = render_chat(body, tools);
    const std::vector<int32_t>& prompt = chat_prompt.tokens;
    const int64_t max_tokens = resolve_max_tokens(p, prompt.size());

    const bool parse_tools = cfg.tool_call_parser && !tools.is_null() && tool_choice != "none";
    std::optional<text::OutputParserOptions> popts;
    if (cfg.reasoning_parser || parse_tools) {
      text::OutputParserOptions o;
      o.parse_reasoning = cfg.reasoning_parser;
      const json* kw = field(body, "chat_template_kwargs");
      o.thinking_enabled = kw && kw->is_object() && text::thinking_enabled(*kw);
      o.parse_tool_calls = parse_tools;
      o.tools = tools;
      popts = o;
    }

    // "required" and named choices constrain decoding so that the output opens a tool call.
    const bool forced_tool = tool_choice == "required" || tool_choice == "named";
    std::shared_ptr<const engine::ToolChoiceConstraint> constraint;
    if (forced_tool) {
      if (tool_choice == "required")
        std::call_once(vocab_once, [this] { vocab = std::make_shared<const engine::TokenBytes>(token_bytes(tok)); });
      constraint = make_tool_choice_constraint(tok, vocab, tools, named_tool, popts && popts->thinking_enabled);
    }

    auto choices = std::make_shared<std::vector<std::unique_ptr<Choice>>>();
    try {
      for (int j = 0; j < p.n; ++j)
        choices->push_back(
            start_choice(j, prompt, p, max_tokens, popts ? &*popts : nullptr, constraint, chat_prompt.images));
    } catch (...) {
      cancel_all(*choices);
      throw;
    }
    const std::string id = "chatcmpl-" + random_hex(32);
    const int64_t created = unix_now();
    const std::string model = cfg.served_model_name;
    const auto prompt_tokens = static_cast<int64_t>(prompt.size());
    const bool want_lp = p.top_logprobs >= 0;

    if (p.stream) {
      auto chunk = [id, created, model](json choice) {
        return json{{"id", id},
                    {"object", "chat.completion.chunk"},
                    {"created", created},
                    {"model", model},
                    {"choices", json::array({std::move(choice)})}};
      };
      auto started = std::make_shared<std::vector<bool>>(choices->size(), false);
      auto tool_counts = std::make_shared<std::vector<int>>(choices->size(), 0);
      stream_response(
          res, choices, p.skip_special_tokens,
          [this, chunk, started, tool_counts, want_lp, forced_tool](Choice& c, ChoiceDelta& d, std::vector<json>& out) {
            const auto k = static_cast<size_t>(c.index);
            if (!(*started)[k]) {
              (*started)[k] = true;
              out.push_back(chunk({{"index", c.index},
                                   {"delta", {{"role", "assistant"}, {"content", ""}}},
                                   {"logprobs", nullptr},
                                   {"finish_reason", nullptr}}));
            }
            text::OutputDelta od;
            if (c.parser) {
              od = c.parser->feed(d.text);
              if (d.finished_now) {
                auto f = c.parser->finish();
                od.reasoning += f.reasoning;
                od.content += f.content;
                for (auto& t : f.tool_calls) od.tool_calls.push_back(std::move(t));
              }
            } else {
              od.content = d.text;
            }
            (*tool_counts)[k] += static_cast<int>(
                std::count_if(od.tool_calls.begin(), od.tool_calls.end(), [](const auto& t) { return t.first; }));
            json lp = want_lp && !d.logprobs.empty() ? chat_logprobs(d.logprobs) : json(nullptr);
            if (!od.empty() || !lp.is_null()) {
              json delta = json::object();
              if (!od.reasoning.empty()) {
                delta["reasoning_content"] = od.reasoning;
                delta["reasoning"] = od.reasoning;
              }
              if (!od.content.empty()) delta["content"] = od.content;
              if (!od.tool_calls.empty()) {
                json calls = json::array();
                for (const auto& t : od.tool_calls) calls.push_back(t.to_json());
                delta["tool_calls"] = calls;
              }
              out.push_back(
                  chunk({{"index", c.index}, {"delta", delta}, {"logprobs", lp}, {"finish_reason", nullptr}}));
            }
            if (d.finished_now) {
              std::string reason = c.finish_reason;
              if ((*tool_counts)[k] > 0 && (reason == "stop" || (forced_tool && reason == "length")))
                reason = "tool_calls";
              out.push_back(chunk({{"index", c.index},
                                   {"delta", json::object()},
                                   {"logprobs", nullptr},
                                   {"finish_reason", reason},
                                   {"stop_reason", c.stop_reason}}));
            }
          },
          [this, choices, id, created, model, prompt_tokens, include = p.include_usage](std::vector<json>& out) {
            if (!include) return;
            int64_t completion = 0, cached = 0;
            for (const auto& c : *choices) {
              completion += static_cast<int64_t>(c->tokens.size());
              cached = std::max<int64_t>(cached, c->cached_prompt_tokens);
            }
            out.push_back({{"id", id},
                           {"object", "chat.completion.chunk"},
                           {"created", created},
                           {"model", model},
                           {"choices", json::array()},
                           {"usage", usage_json(prompt_tokens, completion, cached)}});
          });
      return;
    }

    while (!all_finished(*choices)) poll(*choices, p.skip_special_tokens, std::chrono::milliseconds(100));
    check_errors(*choices);
    json out_choices = json::array();
    int64_t completion = 0, cached = 0;
    for (const auto& cp : *choices) {
      const Choice& c = *cp;
      completion += static_cast<int64_t>(c.tokens.size());
      cached = std::max<int64_t>(cached, c.cached_prompt_tokens);
      json message = {{"role", "assistant"}};
      std::string reason = c.finish_reason;
      if (popts) {
        auto o = *popts;
        const auto parsed = text::OutputParser::parse(c.text, o);
        message["content"] =
            parsed.content.empty() && !parsed.tool_calls.empty() ? json(nullptr) : json(parsed.content);
        const json reasoning = parsed.has_reasoning ? json(parsed.reasoning) : json(nullptr);
        message["reasoning_content"] = reasoning;
        message["reasoning"] = reasoning;
        json calls = json::array();
        for (const auto& t : parsed.tool_calls)
          calls.push_back(
              {{"id", t.id}, {"type", "function"}, {"function", {{"name", t.name}, {"arguments", t.arguments}}}});
        message["tool_calls"] = calls;
        if (!parsed.tool_calls.empty() && (reason == "stop" || (forced_tool && reason == "length")))
          reason = "tool_calls";
      } else {
        message["content"] = c.text;
        message["reasoning_content"] = nullptr;
        message["reasoning"] = nullptr;
        message["tool_calls"] = json::array();
      }
      out_choices.push_back({{"index", c.index},
                             {"message", message},
                             {"logprobs", want_lp ? chat_logprobs(c.logprobs) : json(nullptr)},
                             {"finish_reason", reason},
                             {"stop_reason", c.stop_reason}});
    }
    set_json(res, {{"id", id},
                   {"object", "chat.completion"},
                   {"created", created},
                   {"model", model},
                   {"choices", out_choices},
                   {"usage", usage_json(prompt_tokens, completion, cached)}});
  }
};

OpenAIServer::OpenAIServer(ServerConfig config, const text::Tokenizer& tokenizer,
                           std::optional<text::ChatTemplate> chat_template, engine::Scheduler& scheduler)
    : impl_(std::make_unique<Impl>(std::move(config), tokenizer, std::move(chat_template), scheduler)) {}

OpenAIServer::~OpenAIServer() = default;

void OpenAIServer::listen() {
  auto& c = impl_->cfg;
  if (c.port == 0) {
    const int port = impl_->http.bind_to_any_port(c.host);
    if (port <= 0) fail("cannot listen on {} (no free port)", c.host);
    impl_->bound_port = port;
  } else {
    if (!impl_->http.bind_to_port(c.host, c.port))
      fail("cannot listen on {}:{} (address in use or not available)", c.host, c.port);
    impl_->bound_port = c.port;
  }
  if (!raise_listen_backlog(impl_->listen_socket)) spdlog::warn("could not raise the listen backlog");
  spdlog::info("serving {} on http://{}:{}", c.served_model_name, c.host, impl_->bound_port.load());
  impl_->http.listen_after_bind();
}

void OpenAIServer::stop() {
  impl_->stopping = true;
  impl_->http.stop();
}

int OpenAIServer::in_flight() const { return impl_->in_flight.load(); }

int OpenAIServer::port() const { return impl_->bound_port ? impl_->bound_port.load() : impl_->cfg.port; }

bool OpenAIServer::running() const { return impl_->http.is_running(); }

}  // namespace mxlm::server
