// Encodes arbitrary bytes with two small tokenizers (GPT-2 style byte-level BPE with added tokens;
// Llama style Metaspace + byte fallback + normalizers) and decodes arbitrary ids. Must never crash.
// Invalid UTF-8 is replaced by U+FFFD first: HF `tokenizers` only accepts valid text (a Python str
// or a Rust &str), so callers there decode bytes with errors="replace", which is what we mirror.
// Properties checked: byte-level decode(encode(x)) == lossy(x) (unless a space-stripping added
// token matched), and the streaming deltas
// concatenate to decode().
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/error.h"
#include "text/detokenizer.h"
#include "text/tokenizer.h"
#include "text/unicode.h"

namespace {

using mxlm::text::Tokenizer;
using nlohmann::json;

json added(uint32_t id, const char* content, bool lstrip, bool rstrip, bool single_word, bool normalized,
           bool special) {
  return {{"id", id},          {"content", content},         {"lstrip", lstrip},
          {"rstrip", rstrip},  {"single_word", single_word}, {"normalized", normalized},
          {"special", special}};
}

Tokenizer byte_level() {
  json vocab = json::object();
  uint32_t next = 0;
  for (int b = 0; b < 256; ++b) {
    std::string s;
    mxlm::text::append_utf8(s, mxlm::text::byte_to_char(static_cast<uint8_t>(b)));
    vocab[s] = next++;
  }
  const std::vector<std::pair<std::string, std::string>> merges = {{"Ġ", "t"}, {"h", "e"},  {"Ġt", "he"}, {"i", "n"},
                                                                   {"Ġ", "a"}, {"e", "r"},  {"Ã", "©"},   {"ä", "¸"},
                                                                   {"Ġ", "Ġ"}, {"ĠĠ", "ĠĠ"}};
  json merge_list = json::array();
  for (const auto& [a, b] : merges) {
    if (!vocab.contains(a + b)) vocab[a + b] = next++;
    merge_list.push_back(a + " " + b);
  }
  json config = {
      {"added_tokens",
       {added(next, "<|end|>", false, false, false, false, true),
        added(next + 1, "<mask>", true, true, false, false, true),
        added(next + 2, "word", false, false, true, true, false)}},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern",
            {{"Regex", R"('s|'t|'re| ?\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
           {"behavior", "Isolated"},
           {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}}},
      {"post_processor", {{"type", "ByteLevel"}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merge_list}, {"ignore_merges", true}}}};
  return Tokenizer::from_json(config.dump());
}

Tokenizer llama_like() {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"▁", 3}, {"a", 4}, {"▁a", 5}, {"1", 6}};
  for (int b = 0; b < 256; ++b) vocab[fmt::format("<0x{:02X}>", b)] = 10 + b;
  json config = {
      {"added_tokens",
       {added(1, "<s>", false, false, false, false, true), added(2, "</s>", false, false, false, false, true)}},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         {{{"type", "NFKC"}},
          {{"type", "Lowercase"}},
          {{"type", "Replace"}, {"pattern", {{"String", "  "}}}, {"content", " "}}}}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Digits"}, {"individual_digits", true}},
          {{"type", "Punctuation"}, {"behavior", "MergedWithPrevious"}},
          {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", true}}}}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single",
         {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         {{{"type", "Replace"}, {"pattern", {{"String", "▁"}}}, {"content", " "}},
          {{"type", "ByteFallback"}},
          {{"type", "Fuse"}},
          {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
      {"model",
       {{"type", "BPE"},
        {"vocab", vocab},
        {"merges", {"▁ a"}},
        {"unk_token", "<unk>"},
        {"byte_fallback", true},
        {"fuse_unk", true}}}};
  return Tokenizer::from_json(config.dump());
}

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "property violated: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Tokenizer bytes = byte_level();
  static const Tokenizer llama = llama_like();
  const std::string input(reinterpret_cast<const char*>(data), size);

  const auto ids = bytes.encode(input, true);
  // "<mask>" strips the spaces around it (lstrip/rstrip), so only texts without it round-trip.
  if (input.find("<mask>") == std::string::npos) {
    check(bytes.decode(ids) == mxlm::text::utf8_lossy(input), "byte-level decode(encode(x)) == lossy(x)");
  }
  const auto llama_ids = llama.encode(input, true);
  (void)llama.decode(llama_ids, true);

  // Arbitrary ids (including unknown ones) through decode and the streaming detokenizer.
  for (const Tokenizer* t : {&bytes, &llama}) {
    std::vector<uint32_t> raw;
    for (size_t i = 0; i + 1 < size && raw.size() < 64; i += 2)
      raw.push_back((data[i] | (data[i + 1] << 8)) % (t->vocab_size() + 3));
    const std::string full = t->decode(raw, true);
    mxlm::text::IncrementalDetokenizer detokenizer(*t, true);
    std::string streamed;
    for (uint32_t id : raw) {
      const std::string delta = detokenizer.add(id);
      check(mxlm::text::is_valid_utf8(delta), "deltas are valid UTF-8");
      streamed += delta;
    }
    streamed += detokenizer.flush();
    check(streamed == full, "streamed deltas concatenate to decode()");
  }
  return 0;
}
