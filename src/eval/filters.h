// gsm8k's answer extraction and scoring, with the results Python's `re` gives for its fixed patterns:
//  - strict-match:     re.findall(r"#### (\-?[0-9\.\,]+)", s)[0], stripped; "[invalid]" if none.
//  - flexible-extract: re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", s)[-1], its non-empty group; "[invalid]".
//  - exact_match: re.sub("", ...) of ",", r"\$", r"(?s).*#### ", r"\.$" in that order on both sides, then
//    lower-case, then string equality.
// The patterns only involve ASCII, so matching on UTF-8 bytes finds the same substrings as Python on code
// points (continuation bytes never fall in an ASCII class).
#pragma once

#include <string>
#include <string_view>

namespace mxlm::eval {

inline constexpr std::string_view kInvalidAnswer = "[invalid]";
inline constexpr std::string_view kStrictMatch = "strict-match";
inline constexpr std::string_view kFlexibleExtract = "flexible-extract";

std::string strict_match(std::string_view response);
std::string flexible_extract(std::string_view response);

// Applies gsm8k's regexes_to_ignore and ignore_case to one string.
std::string normalize_for_exact_match(std::string_view text);

// 1.0 if the prediction equals the reference (the full gold answer) after normalisation, else 0.0.
double exact_match(std::string_view prediction, std::string_view reference);

}  // namespace mxlm::eval
