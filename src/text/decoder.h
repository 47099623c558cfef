// Decoders of Hugging Face `tokenizer.json`: turn a list of token strings back into text.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <string>
#include <vector>

namespace mxlm::text {

class Decoder {
 public:
  virtual ~Decoder() = default;
  // One step of HF's decode chain: tokens in, tokens out (joined by the caller).
  virtual std::vector<std::string> decode_chain(std::vector<std::string> tokens) const = 0;
  // Whether this decoder (or one in its sequence) is ByteFallback, which decodes a whole run of
  // "<0xXX>" tokens at once: text before the run ends is not final.
  virtual bool merges_byte_tokens() const { return false; }
};

// Returns nullptr for a JSON null. Unknown or malformed types throw mxlm::Error.
std::unique_ptr<Decoder> make_decoder(const nlohmann::json& config);

}  // namespace mxlm::text
