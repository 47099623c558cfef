// UTF-8 and Unicode helpers for the tokenizer. Character classes follow the Rust standard library
// (char::is_whitespace, is_numeric, ...) because Hugging Face `tokenizers` is written in Rust and we
// must split text exactly where it does.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace mxlm::text {

// Decodes the code point at s[i] and advances i. Invalid or truncated sequences yield U+FFFD and
// advance by one maximal invalid subpart (the WHATWG / Rust from_utf8_lossy rule).
char32_t next_code_point(std::string_view s, size_t& i);

void append_utf8(std::string& out, char32_t cp);

// Number of bytes the lead byte announces (1 for an invalid lead byte).
inline size_t utf8_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xE) return 3;
  if ((lead >> 3) == 0x1E) return 4;
  return 1;
}

bool is_valid_utf8(std::string_view s);

// Replaces every maximal invalid subsequence by U+FFFD, exactly as Rust's String::from_utf8_lossy.
std::string utf8_lossy(std::string_view bytes);

// Length of the longest prefix of `s` that ends on a complete UTF-8 character, when the rest could
// still become valid with more bytes (a truncated but so-far-valid sequence at the end).
size_t complete_utf8_prefix(std::string_view s);

// GPT-2 byte-level alphabet: every byte maps to one printable code point.
char32_t byte_to_char(uint8_t b);
// Returns -1 for code points outside the byte-level alphabet.
int char_to_byte(char32_t cp);

// Rust char predicates (Unicode general categories / White_Space).
bool is_rust_whitespace(char32_t cp);
bool is_rust_numeric(char32_t cp);         // categories Nd, Nl, No
bool is_rust_alphabetic(char32_t cp);      // approximates the Alphabetic property: L*, Nl, Mn/Mc letters
bool is_unicode_punctuation(char32_t cp);  // categories P*
bool is_combining_mark(char32_t cp);       // categories Mn, Mc, Me

// Rust char::to_lowercase / to_uppercase (full mappings where they differ from simple ones).
void append_lowercase(std::string& out, char32_t cp);
void append_uppercase(std::string& out, char32_t cp);

enum class NormalForm { kNFC, kNFD, kNFKC, kNFKD };
std::string unicode_normalize(std::string_view s, NormalForm form);

}  // namespace mxlm::text
