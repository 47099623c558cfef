// `mxlm tokenize`: encode text with a model directory's tokenizer.json and print the ids as JSON.
// Special tokens are added by default, like HF `encode(text)` / transformers / vLLM's /tokenize
// (the post-processor, plus BOS/EOS when tokenizer_config.json asks for them);
// --no-add-special-tokens gives the raw encoding. --decode turns id arrays back into text (and
// --incremental shows the streaming deltas), which the tests use to check decoding against HF.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "cli/registry.h"
#include "core/error.h"
#include "text/detokenizer.h"
#include "text/tokenizer.h"

namespace mxlm::cli {

namespace {

struct TokenizeOptions {
  std::string model;
  std::string text;
  std::string file;
  std::string jsonl;
  bool add_special_tokens = true;
  bool decode = false;
  bool incremental = false;
  bool skip_special_tokens = false;
};

std::string dump(const nlohmann::json& value) {
  return value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::vector<uint32_t> parse_ids(const std::string& text, const std::string& where) {
  nlohmann::json value;
  try {
    value = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", where, e.what());
  }
  if (!value.is_array()) fail("{}: expected a JSON array of token ids", where);
  std::vector<uint32_t> ids;
  for (const auto& id : value) {
    if (!id.is_number_unsigned() || id.get<uint64_t>() > 0xFFFFFFFFu)
      fail("{}: token ids must be unsigned integers", where);
    ids.push_back(id.get<uint32_t>());
  }
  return ids;
}

std::string process(const text::Tokenizer& tokenizer, const TokenizeOptions& o, const std::string& input,
                    const std::string& where) {
  if (!o.decode) return dump(tokenizer.encode(input, o.add_special_tokens));
  const auto ids = parse_ids(input, where);
  if (!o.incremental) return dump(tokenizer.decode(ids, o.skip_special_tokens));
  text::IncrementalDetokenizer detokenizer(tokenizer, o.skip_special_tokens);
  nlohmann::json deltas = nlohmann::json::array();
  for (uint32_t id : ids) deltas.push_back(detokenizer.add(id));
  deltas.push_back(detokenizer.flush());
  return dump(deltas);
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read {}", path);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

void run(const TokenizeOptions& o) {
  const int sources = !o.text.empty() + !o.file.empty() + !o.jsonl.empty();
  if (sources != 1) fail("tokenize: give exactly one of --text, --file, --jsonl");
  const text::Tokenizer tokenizer = text::Tokenizer::load(o.model);
  std::string out;
  if (!o.jsonl.empty()) {
    std::ifstream in(o.jsonl, std::ios::binary);
    if (!in) fail("cannot read {}", o.jsonl);
    std::string line;
    size_t number = 0;
    while (std::getline(in, line)) {
      ++number;
      const std::string where = fmt::format("{}:{}", o.jsonl, number);
      std::string input = line;
      if (!o.decode) {
        nlohmann::json value;
        try {
          value = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
          fail("{}: not valid JSON: {}", where, e.what());
        }
        if (!value.is_string()) fail("{}: each --jsonl line must be a JSON string", where);
        input = value.get<std::string>();
      }
      out += process(tokenizer, o, input, where);
      out += '\n';
    }
  } else {
    const std::string input = o.text.empty() ? read_all(o.file) : o.text;
    out = process(tokenizer, o, input, o.text.empty() ? o.file : "--text") + "\n";
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
}

void add_tokenize(CLI::App& app) {
  auto options = std::make_shared<TokenizeOptions>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Encode text with a model's tokenizer.json; prints JSON ids");
  cmd->add_option("--model", options->model, "Model directory with tokenizer.json (+ tokenizer_config.json)")
      ->required();
  cmd->add_option("--text", options->text, "Text to encode");
  cmd->add_option("--file", options->file, "File whose whole content is encoded");
  cmd->add_option("--jsonl", options->jsonl, "File with one JSON string per line; prints one array per line");
  cmd->add_flag("--add-special-tokens,!--no-add-special-tokens", options->add_special_tokens,
                "Add the special tokens the tokenizer asks for (default: yes)");
  cmd->add_flag("--decode", options->decode, "Inputs are JSON arrays of ids; print the decoded text as JSON strings");
  cmd->add_flag("--incremental", options->incremental, "With --decode: print the streaming deltas as a JSON array");
  cmd->add_flag("--skip-special-tokens", options->skip_special_tokens, "With --decode: drop special tokens");
  cmd->callback([options] { run(*options); });
}

const bool registered = register_command("tokenize", add_tokenize);

}  // namespace

}  // namespace mxlm::cli
