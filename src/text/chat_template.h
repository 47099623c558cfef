// A model's chat template: the Jinja source from the model directory rendered with the variables
// transformers and vLLM pass (messages, tools, add_generation_prompt, the special tokens of
// tokenizer_config.json, and any chat_template_kwargs), after the request normalisation an
// OpenAI-compatible server applies.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <memory>
#include <string>

#include "text/jinja.h"

namespace mxlm::text {

// How a template expects list-valued message content (vLLM's "content format"): `String` templates
// treat content as text, so text parts are joined with "\n"; `OpenAI` templates iterate the parts
// themselves and get {"type": "text", "text": ...}, {"type": "image"}, {"type": "video"} parts.
enum class ContentFormat { Auto, String, OpenAI };

struct ChatRequest {
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  nlohmann::ordered_json tools;  // null when the request has none
  bool add_generation_prompt = false;
  nlohmann::ordered_json chat_template_kwargs = nlohmann::ordered_json::object();
};

class ChatTemplate {
 public:
  // `special_tokens` maps names such as bos_token/eos_token to strings (tokenizer_config.json).
  ChatTemplate(std::string source, nlohmann::ordered_json special_tokens = nlohmann::ordered_json::object(),
               std::string name = "chat_template");

  // chat_template.jinja if present, else tokenizer_config.json's chat_template (a string, or a list
  // of {name, template} where "default" is used). Throws mxlm::Error when there is none.
  static ChatTemplate from_model_dir(const std::filesystem::path& dir);

  // Renders the prompt. With `normalize` the messages first get the server normalisation
  // (normalize_messages); without it they reach the template exactly as given.
  std::string render(const ChatRequest& request, bool normalize = true, const jinja::RenderLimits& limits = {}) const;

  // vLLM-style normalisation: list content per content_format(), and tool-call arguments given as
  // JSON strings parsed into objects (templates such as MiniMax-M3's iterate them as mappings).
  nlohmann::ordered_json normalize_messages(const nlohmann::ordered_json& messages) const;

  ContentFormat content_format() const { return content_format_; }
  void set_content_format(ContentFormat format);
  const std::string& source() const { return source_; }

 private:
  std::string source_;
  nlohmann::ordered_json special_tokens_;
  std::shared_ptr<jinja::Template> template_;
  ContentFormat content_format_ = ContentFormat::String;
};

// Reads bos/eos/unk/pad token strings from a tokenizer_config.json object (plain strings or
// AddedToken objects with "content"); null tokens are left out, as transformers does.
nlohmann::ordered_json special_tokens_from_config(const nlohmann::ordered_json& tokenizer_config);

}  // namespace mxlm::text
