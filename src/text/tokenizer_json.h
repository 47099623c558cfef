// Small helpers to read `tokenizer.json` fields with errors that name the field and its owner.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>

namespace mxlm::text {

class UnicodeRegex;

std::string json_string(const nlohmann::json& object, const char* key, std::string_view owner);
const nlohmann::json& json_array(const nlohmann::json& object, const char* key, std::string_view owner);

// A `{"String": s}` or `{"Regex": r}` pattern as regex source (a String is escaped to match itself).
std::string pattern_regex(const nlohmann::json& object, std::string_view owner);

// Replaces every match of `regex` in `text` by `content` (literally: no group references).
std::string replace_all(const UnicodeRegex& regex, std::string_view text, std::string_view content);

}  // namespace mxlm::text
