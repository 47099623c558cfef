// Normalizers of Hugging Face `tokenizer.json` ("normalizer" field): string -> string transforms
// applied to each piece of the input that is not an added token.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <string>
#include <string_view>

namespace mxlm::text {

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual std::string normalize(std::string_view text) const = 0;
};

// Returns nullptr for a JSON null. Unknown or malformed types throw mxlm::Error.
std::unique_ptr<Normalizer> make_normalizer(const nlohmann::json& config);

}  // namespace mxlm::text
