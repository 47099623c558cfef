// `mxlm chat-template`: renders a model's chat template for a conversation and prints the prompt
// byte for byte (no newline added), so it can be compared with transformers/Jinja2.
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>

#include "cli/registry.h"
#include "core/error.h"
#include "text/chat_template.h"

namespace mxlm::cli {
namespace {

using json = nlohmann::ordered_json;

struct ChatTemplateOptions {
  std::string model;
  std::string template_file;
  std::string messages_file;
  std::string tools_file;
  bool add_generation_prompt = false;
  std::string kwargs = "{}";
  bool raw = false;
  std::string content_format = "auto";
};

json read_json_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read {} file {}", what, path);
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    fail("{} file {} is not valid JSON: {}", what, path, e.what());
  }
}

void run(const ChatTemplateOptions& o) {
  if (o.model.empty() && o.template_file.empty()) fail("chat-template needs --model DIR or --template FILE");
  std::unique_ptr<text::ChatTemplate> tmpl;
  if (!o.template_file.empty()) {
    std::ifstream in(o.template_file, std::ios::binary);
    if (!in) fail("cannot read template file {}", o.template_file);
    std::stringstream ss;
    ss << in.rdbuf();
    json tokens = json::object();
    if (!o.model.empty()) {
      auto config = std::filesystem::path(o.model) / "tokenizer_config.json";
      if (std::filesystem::exists(config))
        tokens = text::special_tokens_from_config(read_json_file(config.string(), "tokenizer config"));
    }
    tmpl = std::make_unique<text::ChatTemplate>(ss.str(), tokens, o.template_file);
  } else {
    tmpl = std::make_unique<text::ChatTemplate>(text::ChatTemplate::from_model_dir(o.model));
  }
  if (o.content_format == "string") {
    tmpl->set_content_format(text::ContentFormat::String);
  } else if (o.content_format == "openai") {
    tmpl->set_content_format(text::ContentFormat::OpenAI);
  } else if (o.content_format != "auto") {
    fail("--content-format must be auto, string or openai");
  }
  text::ChatRequest request;
  request.messages = read_json_file(o.messages_file, "messages");
  if (request.messages.is_object() && request.messages.contains("messages")) {
    request.messages = json(request.messages["messages"]);
  }
  if (!o.tools_file.empty()) request.tools = read_json_file(o.tools_file, "tools");
  request.add_generation_prompt = o.add_generation_prompt;
  try {
    request.chat_template_kwargs = json::parse(o.kwargs);
  } catch (const json::exception& e) {
    fail("--chat-template-kwargs is not valid JSON: {}", e.what());
  }
  std::string prompt = tmpl->render(request, !o.raw);
  std::fwrite(prompt.data(), 1, prompt.size(), stdout);
  std::fflush(stdout);
}

void add_chat_template(CLI::App& app) {
  auto options = std::make_shared<ChatTemplateOptions>();
  auto* cmd = app.add_subcommand("chat-template", "Render a model's chat template for a conversation (byte-exact)");
  cmd->add_option("--model", options->model, "Model directory (chat_template.jinja or tokenizer_config.json)");
  cmd->add_option("--template", options->template_file, "Render this Jinja template file instead");
  cmd->add_option("--messages", options->messages_file, "JSON file: an array of messages")->required();
  cmd->add_option("--tools", options->tools_file, "JSON file: an array of OpenAI tool definitions");
  cmd->add_flag("--add-generation-prompt", options->add_generation_prompt, "Append the assistant turn header");
  cmd->add_option("--chat-template-kwargs", options->kwargs, "JSON object of extra template variables");
  cmd->add_flag("--raw-messages", options->raw, "Pass messages to the template unchanged (no server normalisation)");
  cmd->add_option("--content-format", options->content_format,
                  "auto|string|openai: how list content reaches the template");
  cmd->callback([options]() { run(*options); });
}

const bool registered = register_command("chat-template", add_chat_template);

}  // namespace
}  // namespace mxlm::cli
