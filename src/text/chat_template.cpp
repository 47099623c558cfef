#include "text/chat_template.h"

#include <fstream>
#include <regex>
#include <sstream>

#include "core/error.h"

namespace mxlm::text {
namespace {

using json = nlohmann::ordered_json;

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read {}", path.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A template handles part lists itself when it loops over message content or type-checks it
// (like vLLM's detection, which looks for iteration over `message['content']`).
ContentFormat detect_content_format(const std::string& source) {
  static const std::regex loops_over_content(R"(\{%-?\s*for\s+\w+\s+in\s+[\w.\[\]'"]*content\b)");
  static const std::regex checks_content_type(R"(content\s+is\s+(not\s+)?(string|iterable|sequence|mapping))");
  if (std::regex_search(source, loops_over_content) || std::regex_search(source, checks_content_type)) {
    return ContentFormat::OpenAI;
  }
  return ContentFormat::String;
}

json normalize_part(const json& part) {
  if (!part.is_object()) return part;
  std::string type = part.value("type", "");
  if (type == "text" || type == "input_text") return json{{"type", "text"}, {"text", part.value("text", "")}};
  if (type == "image_url" || type == "image" || type == "input_image" || type == "image_pil" ||
      type == "image_embeds") {
    return json{{"type", "image"}};
  }
  if (type == "video_url" || type == "video") return json{{"type", "video"}};
  if (type == "input_audio" || type == "audio_url" || type == "audio") return json{{"type", "audio"}};
  return part;
}

}  // namespace

json special_tokens_from_config(const json& config) {
  json tokens = json::object();
  for (const char* name : {"bos_token", "eos_token", "unk_token", "pad_token"}) {
    if (!config.contains(name)) continue;
    const json& t = config[name];
    if (t.is_string()) {
      tokens[name] = t;
    } else if (t.is_object() && t.contains("content") && t["content"].is_string()) {
      tokens[name] = t["content"];
    }
  }
  return tokens;
}

ChatTemplate::ChatTemplate(std::string source, json special_tokens, std::string name)
    : source_(std::move(source)),
      special_tokens_(std::move(special_tokens)),
      template_(std::make_shared<jinja::Template>(source_, std::move(name))),
      content_format_(detect_content_format(source_)) {}

ChatTemplate ChatTemplate::from_model_dir(const std::filesystem::path& dir) {
  json config = json::object();
  const auto config_path = dir / "tokenizer_config.json";
  if (std::filesystem::exists(config_path)) {
    try {
      config = json::parse(read_file(config_path));
    } catch (const json::exception& e) {
      fail("{}: invalid JSON: {}", config_path.string(), e.what());
    }
  }
  const json tokens = special_tokens_from_config(config);
  const auto jinja_path = dir / "chat_template.jinja";
  if (std::filesystem::exists(jinja_path)) return ChatTemplate(read_file(jinja_path), tokens, jinja_path.string());
  if (config.contains("chat_template")) {
    const json& t = config["chat_template"];
    if (t.is_string()) return ChatTemplate(t.get<std::string>(), tokens, config_path.string());
    if (t.is_array()) {
      for (const auto& entry : t) {
        if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template")) {
          return ChatTemplate(entry["template"].get<std::string>(), tokens, config_path.string());
        }
      }
    }
    fail("{}: chat_template is neither a string nor a list with a \"default\" entry", config_path.string());
  }
  fail("no chat template in {} (neither chat_template.jinja nor tokenizer_config.json's chat_template)", dir.string());
}

void ChatTemplate::set_content_format(ContentFormat format) {
  content_format_ = format == ContentFormat::Auto ? detect_content_format(source_) : format;
}

json ChatTemplate::normalize_messages(const json& messages) const {
  if (!messages.is_array()) fail("messages must be a JSON array");
  json out = json::array();
  for (size_t i = 0; i < messages.size(); ++i) {
    json m = messages[i];
    if (!m.is_object()) fail("messages[{}] must be a JSON object", i);
    if (m.contains("content") && m["content"].is_array()) {
      const json& parts = m["content"];
      if (content_format_ == ContentFormat::String) {
        std::string text;
        bool first = true;
        for (const auto& p : parts) {
          std::string piece;
          if (p.is_string()) {
            piece = p.get<std::string>();
          } else if (p.is_object() && (p.value("type", "") == "text" || p.value("type", "") == "input_text") &&
                     p.contains("text") && p["text"].is_string()) {
            piece = p["text"].get<std::string>();
          } else {
            continue;
          }
          if (!first) text += "\n";
          first = false;
          text += piece;
        }
        m["content"] = text;
      } else {
        json normalized = json::array();
        for (const auto& p : parts) normalized.push_back(normalize_part(p));
        m["content"] = normalized;
      }
    }
    if (m.value("role", "") == "assistant" && m.contains("tool_calls") && m["tool_calls"].is_array()) {
      for (size_t k = 0; k < m["tool_calls"].size(); ++k) {
        json& call = m["tool_calls"][k];
        if (!call.is_object() || !call.contains("function") || !call["function"].is_object()) continue;
        json& fn = call["function"];
        if (fn.contains("arguments") && fn["arguments"].is_string()) {
          try {
            fn["arguments"] = json::parse(fn["arguments"].get<std::string>());
          } catch (const json::exception&) {
            fail("messages[{}].tool_calls[{}].function.arguments is not valid JSON", i, k);
          }
        }
      }
    }
    out.push_back(std::move(m));
  }
  return out;
}

std::string ChatTemplate::render(const ChatRequest& request, bool normalize, const jinja::RenderLimits& limits) const {
  json vars = json::object();
  vars["messages"] = normalize ? normalize_messages(request.messages) : request.messages;
  vars["tools"] = request.tools;
  vars["documents"] = nullptr;
  vars["add_generation_prompt"] = request.add_generation_prompt;
  for (auto it = special_tokens_.begin(); it != special_tokens_.end(); ++it) vars[it.key()] = it.value();
  if (!request.chat_template_kwargs.is_null()) {
    if (!request.chat_template_kwargs.is_object()) fail("chat_template_kwargs must be a JSON object");
    for (auto it = request.chat_template_kwargs.begin(); it != request.chat_template_kwargs.end(); ++it) {
      vars[it.key()] = it.value();
    }
  }
  return template_->render(vars, limits);
}

}  // namespace mxlm::text
