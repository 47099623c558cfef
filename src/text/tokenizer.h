// A Hugging Face `tokenizer.json` tokenizer whose encoding equals the `tokenizers` library's:
// added tokens are matched first (raw, then normalized), each remaining piece is normalized,
// pre-tokenized and encoded by the BPE model, and a post-processor may add special tokens.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace mxlm::text {

struct AddedToken {
  uint32_t id = 0;
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  bool special = false;
};

// What `tokenizer_config.json` (transformers) adds on top of `tokenizer.json`.
struct TokenizerConfig {
  bool add_bos_token = false;
  bool add_eos_token = false;
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
  std::optional<std::string> pad_token;
  std::optional<std::string> unk_token;
  // The default chat template: `chat_template.jinja` in the model directory if present, else the
  // `chat_template` of tokenizer_config.json (a string, or the entry named "default" of a list).
  std::optional<std::string> chat_template;
  // Every named template of a list-valued `chat_template` (e.g. "tool_use").
  std::map<std::string, std::string> named_chat_templates;
};

class Tokenizer {
 public:
  // Reads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json and DIR/chat_template.jinja.
  static Tokenizer load(const std::filesystem::path& model_dir);
  // From the text of a tokenizer.json (and optionally of a tokenizer_config.json).
  static Tokenizer from_json(std::string_view tokenizer_json, std::string_view tokenizer_config_json = {});

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // add_special_tokens = false: exactly HF `Tokenizer.encode(text, add_special_tokens=False)`.
  // add_special_tokens = true: HF `encode(text, add_special_tokens=True)` (the post-processor), then,
  // as transformers does for tokenizers configured with add_bos_token / add_eos_token, the BOS / EOS
  // token is prepended / appended unless the post-processor already put it there.
  // Invalid UTF-8 in `text` is replaced by U+FFFD first (what Python does for lossy bytes).
  std::vector<uint32_t> encode(std::string_view text, bool add_special_tokens = false) const;

  // HF `Tokenizer.decode(ids, skip_special_tokens)`. Unknown ids are skipped, as HF does.
  std::string decode(std::span<const uint32_t> ids, bool skip_special_tokens = false) const;

  std::optional<uint32_t> token_to_id(std::string_view token) const;
  std::optional<std::string> id_to_token(uint32_t id) const;
  bool is_special(uint32_t id) const;
  // Whether decoding `id` may still change once later ids arrive: a "<0xXX>" byte token under a
  // ByteFallback decoder (a run of them is decoded as one byte string).
  bool is_pending_byte(uint32_t id) const;
  // One past the largest id (model vocabulary and added tokens).
  uint32_t vocab_size() const;
  const std::vector<AddedToken>& added_tokens() const;

  const TokenizerConfig& config() const;
  std::optional<uint32_t> bos_id() const;
  std::optional<uint32_t> eos_id() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mxlm::text
