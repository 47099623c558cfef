#include "text/tokenizer.h"

#include <utf8proc.h>

#include <nlohmann/json.hpp>

#include <array>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include "core/error.h"
#include "text/bpe.h"
#include "text/decoder.h"
#include "text/normalizer.h"
#include "text/pre_tokenizer.h"
#include "text/tokenizer_post_processor.h"
#include "text/unicode.h"

namespace mxlm::text {

namespace {

// Rust regex `\w`: Alphabetic, marks, decimal digits, connector punctuation, joiners.
bool is_rust_word_char(char32_t cp) {
  if (cp == 0x200C || cp == 0x200D) return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

// Start of the code point that ends at `end` (exclusive).
size_t previous_char_start(std::string_view s, size_t end) {
  size_t start = end - 1;
  while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  return start;
}

// Leftmost-longest literal matching of added tokens (what HF does with Aho-Corasick).
class AddedTokenMatcher {
 public:
  void add(std::string_view pattern, uint32_t token_index) {
    if (pattern.empty()) return;
    uint32_t node = 0;
    for (unsigned char b : pattern) {
      const uint64_t key = (static_cast<uint64_t>(node) << 8) | b;
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        terminal_.push_back(-1);
        it = edges_.emplace(key, static_cast<uint32_t>(terminal_.size() - 1)).first;
      }
      node = it->second;
    }
    if (terminal_[node] < 0) terminal_[node] = static_cast<int32_t>(token_index);
    first_byte_[static_cast<unsigned char>(pattern[0])] = true;
    empty_ = false;
  }

  bool empty() const { return empty_; }

  // Longest pattern starting at `pos`: returns its length (0 if none) and its token index.
  size_t longest_at(std::string_view text, size_t pos, uint32_t& token_index) const {
    if (!first_byte_[static_cast<unsigned char>(text[pos])]) return 0;
    uint32_t node = 0;
    size_t best = 0;
    for (size_t i = pos; i < text.size(); ++i) {
      const auto it = edges_.find((static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(text[i]));
      if (it == edges_.end()) break;
      node = it->second;
      if (terminal_[node] >= 0) {
        best = i + 1 - pos;
        token_index = static_cast<uint32_t>(terminal_[node]);
      }
    }
    return best;
  }

 private:
  std::unordered_map<uint64_t, uint32_t> edges_;
  std::vector<int32_t> terminal_{-1};  // node 0 is the root
  std::array<bool, 256> first_byte_{};
  bool empty_ = true;
};

struct Segment {
  size_t begin, end;
  int64_t token;  // index into added tokens, or -1 for text
};

std::optional<std::string> token_name(const nlohmann::json& config, const char* key) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  fail("tokenizer_config.json: {:?} must be a string, an AddedToken object or null", key);
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read {}", path.string());
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

nlohmann::json parse_json(std::string_view text, std::string_view what) {
  try {
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    fail("{} is not valid JSON: {}", what, e.what());
  }
}

}  // namespace

struct Tokenizer::Impl {
  std::unique_ptr<BpeModel> model;
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<Decoder> decoder;
  std::unique_ptr<PostProcessor> post_processor;
  std::vector<AddedToken> added;
  std::unordered_map<uint32_t, size_t> added_by_id;
  std::unordered_map<std::string, uint32_t> added_by_content;
  AddedTokenMatcher raw_matcher;
  AddedTokenMatcher normalized_matcher;
  TokenizerConfig config;
  uint32_t vocab_size = 0;

  // HF AddedVocabulary::find_matches, including its single_word / lstrip / rstrip rules.
  std::vector<Segment> split_added(std::string_view text, const AddedTokenMatcher& matcher) const {
    std::vector<Segment> out;
    if (text.empty()) return out;
    if (matcher.empty()) {
      out.push_back({0, text.size(), -1});
      return out;
    }
    size_t start_offset = 0;
    size_t pos = 0;
    while (pos < text.size()) {
      uint32_t index = 0;
      const size_t length = matcher.longest_at(text, pos, index);
      if (length == 0) {
        ++pos;
        continue;
      }
      size_t start = pos;
      size_t stop = pos + length;
      pos = stop;  // the matcher resumes after this match, whatever we do with it
      const AddedToken& token = added[index];
      if (token.single_word) {
        bool start_space = start == 0;
        if (!start_space) {
          size_t i = previous_char_start(text, start);
          start_space = !is_rust_word_char(next_code_point(text, i));
        }
        bool stop_space = stop == text.size();
        if (!stop_space) {
          size_t i = stop;
          stop_space = !is_rust_word_char(next_code_point(text, i));
        }
        if (!start_space || !stop_space) continue;
      }
      if (token.lstrip) {
        size_t new_start = start;
        while (new_start > 0) {
          const size_t prev = previous_char_start(text, new_start);
          size_t i = prev;
          if (!is_rust_whitespace(next_code_point(text, i))) break;
          new_start = prev;
        }
        start = std::max(new_start, start_offset);
      }
      if (token.rstrip) {
        while (stop < text.size()) {
          size_t i = stop;
          if (!is_rust_whitespace(next_code_point(text, i))) break;
          stop = i;
        }
      }
      if (start_offset < start) out.push_back({start_offset, start, -1});
      out.push_back({start, stop, static_cast<int64_t>(index)});
      start_offset = stop;
    }
    if (start_offset < text.size()) out.push_back({start_offset, text.size(), -1});
    return out;
  }

  void encode_words(std::string_view text, bool at_start, std::vector<uint32_t>& ids) const {
    if (text.empty()) return;
    if (!pre_tokenizer) {
      model->encode_word(text, ids);
      return;
    }
    std::vector<PreSplit> splits{{std::string(text), at_start}};
    pre_tokenizer->pre_tokenize(splits);
    for (const auto& split : splits) model->encode_word(split.text, ids);
  }

  void encode_piece(std::string_view piece, bool at_start, std::vector<uint32_t>& ids) const {
    std::string normalized_storage;
    std::string_view normalized = piece;
    if (normalizer) {
      normalized_storage = normalizer->normalize(piece);
      normalized = normalized_storage;
    }
    for (const auto& segment : split_added(normalized, normalized_matcher)) {
      if (segment.token >= 0) {
        ids.push_back(added[static_cast<size_t>(segment.token)].id);
      } else {
        encode_words(normalized.substr(segment.begin, segment.end - segment.begin), at_start && segment.begin == 0,
                     ids);
      }
    }
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_json(std::string_view tokenizer_json, std::string_view tokenizer_config_json) {
  auto impl = std::make_unique<Impl>();
  const nlohmann::json root = parse_json(tokenizer_json, "tokenizer.json");
  if (!root.is_object()) fail("tokenizer.json must be a JSON object");
  if (!root.contains("model")) fail("tokenizer.json has no \"model\"");
  impl->model = std::make_unique<BpeModel>(root["model"]);
  const auto field = [&](const char* key) { return root.contains(key) ? root[key] : nlohmann::json(); };
  impl->normalizer = make_normalizer(field("normalizer"));
  impl->pre_tokenizer = make_pre_tokenizer(field("pre_tokenizer"));
  impl->decoder = make_decoder(field("decoder"));
  impl->post_processor = make_post_processor(field("post_processor"));
  impl->vocab_size = impl->model->vocab_end();

  const nlohmann::json added = field("added_tokens");
  if (!added.is_null() && !added.is_array()) fail("tokenizer.json: \"added_tokens\" must be an array");
  for (const auto& entry : added.is_array() ? added : nlohmann::json::array()) {
    AddedToken token;
    if (!entry.is_object() || !entry.contains("id") || !entry["id"].is_number_unsigned() ||
        !entry.contains("content") || !entry["content"].is_string()) {
      fail("tokenizer.json: every added token needs an unsigned \"id\" and a string \"content\"");
    }
    token.id = entry["id"].get<uint32_t>();
    token.content = entry["content"].get<std::string>();
    token.single_word = entry.value("single_word", false);
    token.lstrip = entry.value("lstrip", false);
    token.rstrip = entry.value("rstrip", false);
    token.special = entry.value("special", false);
    token.normalized = entry.value("normalized", !token.special);
    if (token.content.empty()) continue;  // HF ignores empty added tokens
    const size_t index = impl->added.size();
    impl->added_by_id[token.id] = index;
    impl->added_by_content[token.content] = token.id;
    impl->vocab_size = std::max(impl->vocab_size, token.id + 1);
    impl->added.push_back(std::move(token));
  }
  for (size_t i = 0; i < impl->added.size(); ++i) {
    const AddedToken& token = impl->added[i];
    if (token.normalized) {
      const std::string pattern = impl->normalizer ? impl->normalizer->normalize(token.content) : token.content;
      impl->normalized_matcher.add(pattern, static_cast<uint32_t>(i));
    } else {
      impl->raw_matcher.add(token.content, static_cast<uint32_t>(i));
    }
  }

  if (!tokenizer_config_json.empty()) {
    const nlohmann::json config = parse_json(tokenizer_config_json, "tokenizer_config.json");
    if (!config.is_object()) fail("tokenizer_config.json must be a JSON object");
    TokenizerConfig& c = impl->config;
    const auto flag = [&](const char* key) {
      const auto it = config.find(key);
      return it != config.end() && it->is_boolean() && it->get<bool>();
    };
    c.add_bos_token = flag("add_bos_token");
    c.add_eos_token = flag("add_eos_token");
    c.bos_token = token_name(config, "bos_token");
    c.eos_token = token_name(config, "eos_token");
    c.pad_token = token_name(config, "pad_token");
    c.unk_token = token_name(config, "unk_token");
    if (config.contains("chat_template")) {
      const auto& t = config["chat_template"];
      if (t.is_string()) {
        c.chat_template = t.get<std::string>();
      } else if (t.is_array()) {
        for (const auto& named : t) {
          if (!named.is_object() || !named.contains("name") || !named.contains("template") ||
              !named["name"].is_string() || !named["template"].is_string()) {
            fail("tokenizer_config.json: a chat_template list holds {{\"name\", \"template\"}} objects");
          }
          c.named_chat_templates[named["name"].get<std::string>()] = named["template"].get<std::string>();
        }
        const auto it = c.named_chat_templates.find("default");
        if (it != c.named_chat_templates.end()) c.chat_template = it->second;
      } else if (!t.is_null()) {
        fail("tokenizer_config.json: chat_template must be a string or a list");
      }
    }
  }
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::load(const std::filesystem::path& model_dir) {
  const auto tokenizer_path = model_dir / "tokenizer.json";
  if (!std::filesystem::exists(tokenizer_path)) fail("{} not found", tokenizer_path.string());
  const auto config_path = model_dir / "tokenizer_config.json";
  const std::string config = std::filesystem::exists(config_path) ? read_file(config_path) : std::string();
  Tokenizer tokenizer = from_json(read_file(tokenizer_path), config);
  const auto template_path = model_dir / "chat_template.jinja";
  if (std::filesystem::exists(template_path)) tokenizer.impl_->config.chat_template = read_file(template_path);
  return tokenizer;
}

std::vector<uint32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::string repaired;
  if (!is_valid_utf8(text)) {
    repaired = utf8_lossy(text);
    text = repaired;
  }
  std::vector<uint32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  for (const auto& segment : impl_->split_added(text, impl_->raw_matcher)) {
    if (segment.token >= 0) {
      ids.push_back(impl_->added[static_cast<size_t>(segment.token)].id);
    } else {
      impl_->encode_piece(text.substr(segment.begin, segment.end - segment.begin), segment.begin == 0, ids);
    }
  }
  if (add_special_tokens) {
    impl_->post_processor->add_special_tokens(ids);
    if (impl_->config.add_bos_token) {
      if (const auto bos = bos_id(); bos && (ids.empty() || ids.front() != *bos)) ids.insert(ids.begin(), *bos);
    }
    if (impl_->config.add_eos_token) {
      if (const auto eos = eos_id(); eos && (ids.empty() || ids.back() != *eos)) ids.push_back(*eos);
    }
  }
  return ids;
}

std::string Tokenizer::decode(std::span<const uint32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (uint32_t id : ids) {
    const auto added = impl_->added_by_id.find(id);
    if (added != impl_->added_by_id.end()) {
      const AddedToken& token = impl_->added[added->second];
      if (skip_special_tokens && token.special) continue;
      tokens.push_back(token.content);
    } else if (const std::string* token = impl_->model->id_to_token(id)) {
      tokens.push_back(*token);
    }
  }
  if (!impl_->decoder) {
    std::string joined;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i) joined += ' ';
      joined += tokens[i];
    }
    return joined;
  }
  std::string text;
  for (const auto& piece : impl_->decoder->decode_chain(std::move(tokens))) text += piece;
  return text;
}

std::optional<uint32_t> Tokenizer::token_to_id(std::string_view token) const {
  const auto it = impl_->added_by_content.find(std::string(token));
  if (it != impl_->added_by_content.end()) return it->second;
  return impl_->model->token_to_id(token);
}

std::optional<std::string> Tokenizer::id_to_token(uint32_t id) const {
  const auto it = impl_->added_by_id.find(id);
  if (it != impl_->added_by_id.end()) return impl_->added[it->second].content;
  if (const std::string* token = impl_->model->id_to_token(id)) return *token;
  return std::nullopt;
}

bool Tokenizer::is_special(uint32_t id) const {
  const auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

bool Tokenizer::is_pending_byte(uint32_t id) const {
  if (!impl_->decoder || !impl_->decoder->merges_byte_tokens() || impl_->added_by_id.count(id)) return false;
  const std::string* token = impl_->model->id_to_token(id);
  return token && token->size() == 6 && token->compare(0, 3, "<0x") == 0 && token->back() == '>';
}

uint32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }

const TokenizerConfig& Tokenizer::config() const { return impl_->config; }

std::optional<uint32_t> Tokenizer::bos_id() const {
  return impl_->config.bos_token ? token_to_id(*impl_->config.bos_token) : std::nullopt;
}

std::optional<uint32_t> Tokenizer::eos_id() const {
  return impl_->config.eos_token ? token_to_id(*impl_->config.eos_token) : std::nullopt;
}

}  // namespace mxlm::text
