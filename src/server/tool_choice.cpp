#include "server/tool_choice.h"

#include <array>
#include <optional>

#include "core/error.h"
#include "text/tool_parser.h"

namespace mxlm::server {

namespace {

std::vector<int32_t> encode(const text::Tokenizer& tokenizer, const std::string& s) {
  std::vector<int32_t> out;
  for (const uint32_t id : tokenizer.encode(s, false)) out.push_back(static_cast<int32_t>(id));
  return out;
}

// GPT-2 byte-level alphabet, inverted: code point -> byte (-1: not a byte-level character).
const std::array<int16_t, 324>& byte_level_inverse() {
  static const auto table = [] {
    std::array<int16_t, 324> inv;
    inv.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      inv[static_cast<size_t>(printable ? b : 256 + n++)] = static_cast<int16_t>(b);
    }
    return inv;
  }();
  return table;
}

// The bytes a byte-level BPE piece ("Ġn", "Ã") stands for; nullopt when it is not one.
std::optional<std::string> byte_level_bytes(const std::string& piece) {
  std::string out;
  for (size_t i = 0; i < piece.size();) {
    const auto c0 = static_cast<unsigned char>(piece[i]);
    uint32_t cp = 0;
    size_t len = 1;
    if (c0 < 0x80) {
      cp = c0;
    } else if ((c0 & 0xE0) == 0xC0 && i + 1 < piece.size()) {
      cp = ((c0 & 0x1Fu) << 6) | (static_cast<unsigned char>(piece[i + 1]) & 0x3Fu);
      len = 2;
    } else {
      return std::nullopt;
    }
    if (cp >= byte_level_inverse().size() || byte_level_inverse()[cp] < 0) return std::nullopt;
    out.push_back(static_cast<char>(byte_level_inverse()[cp]));
    i += len;
  }
  return out;
}

// "<0xAB>" (ByteFallback) -> the byte.
std::optional<std::string> fallback_byte(const std::string& piece) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return std::nullopt;
  try {
    return std::string(1, static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16)));
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

}  // namespace

engine::TokenBytes token_bytes(const text::Tokenizer& tokenizer) {
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
  engine::TokenBytes out(tokenizer.vocab_size());
  for (uint32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    const uint32_t one[] = {id};
    std::string text = tokenizer.decode(one, false);
    // A piece holding part of a UTF-8 character decodes to U+FFFD on its own: take its bytes from the piece.
    if (text.find(kReplacement) != std::string::npos) {
      if (const auto piece = tokenizer.id_to_token(id)) {
        if (auto b = fallback_byte(*piece))
          text = *b;
        else if (auto bl = byte_level_bytes(*piece))
          text = *bl;
      }
    }
    out[id] = std::move(text);
  }
  return out;
}

std::shared_ptr<const engine::ToolChoiceConstraint> make_tool_choice_constraint(
    const text::Tokenizer& tokenizer, std::shared_ptr<const engine::TokenBytes> vocab,
    const nlohmann::ordered_json& tools, const std::string& named, bool thinking_enabled) {
  const std::string ns(text::kToolNamespace);
  const std::string open = ns + "<tool_call>\n" + ns + "<invoke name=\"";
  std::vector<int32_t> trigger;
  if (thinking_enabled) trigger = encode(tokenizer, "</mm:think>");
  if (!named.empty())
    return std::make_shared<const engine::ToolChoiceConstraint>(
        std::move(trigger), encode(tokenizer, open + named + "\">"), std::vector<std::string>{}, nullptr);
  std::vector<std::string> names;
  for (const auto& t : tools) names.push_back(t["function"]["name"].get<std::string>() + "\">");
  if (names.empty()) fail("tool_choice \"required\" needs at least one tool");
  return std::make_shared<const engine::ToolChoiceConstraint>(std::move(trigger), encode(tokenizer, open),
                                                              std::move(names), std::move(vocab));
}

}  // namespace mxlm::server
