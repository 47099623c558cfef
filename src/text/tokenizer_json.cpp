#include "text/tokenizer_json.h"

#include "core/error.h"
#include "text/unicode_regex.h"

namespace mxlm::text {

std::string json_string(const nlohmann::json& object, const char* key, std::string_view owner) {
  if (!object.is_object()) fail("tokenizer.json: {} must be an object", owner);
  const auto it = object.find(key);
  if (it == object.end() || !it->is_string()) fail("tokenizer.json: {} needs a string field {:?}", owner, key);
  return it->get<std::string>();
}

const nlohmann::json& json_array(const nlohmann::json& object, const char* key, std::string_view owner) {
  if (!object.is_object()) fail("tokenizer.json: {} must be an object", owner);
  const auto it = object.find(key);
  if (it == object.end() || !it->is_array()) fail("tokenizer.json: {} needs an array field {:?}", owner, key);
  return *it;
}

std::string pattern_regex(const nlohmann::json& object, std::string_view owner) {
  const auto it = object.find("pattern");
  if (it == object.end() || !it->is_object()) fail("tokenizer.json: {} needs a \"pattern\" object", owner);
  if (it->contains("Regex") && (*it)["Regex"].is_string()) return (*it)["Regex"].get<std::string>();
  if (it->contains("String") && (*it)["String"].is_string())
    return UnicodeRegex::escape((*it)["String"].get<std::string>());
  fail("tokenizer.json: {} pattern must be {{\"String\": ...}} or {{\"Regex\": ...}}", owner);
}

std::string replace_all(const UnicodeRegex& regex, std::string_view text, std::string_view content) {
  std::string out;
  size_t last = 0;
  for (const auto& [begin, end] : regex.find_all(text)) {
    out.append(text.substr(last, begin - last));
    out.append(content);
    last = end;
  }
  out.append(text.substr(last));
  return out;
}

}  // namespace mxlm::text
