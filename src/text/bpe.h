// The BPE model of Hugging Face `tokenizer.json` ("model": {"type": "BPE"}): merges by rank with a
// priority queue over a linked list of symbols per word, and a cache of word -> ids.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mxlm::text {

class BpeModel {
 public:
  // Reads vocab, merges ("a b" strings or ["a", "b"] pairs), unk_token, byte_fallback, fuse_unk,
  // ignore_merges, continuing_subword_prefix and end_of_word_suffix. Throws mxlm::Error on bad input.
  explicit BpeModel(const nlohmann::json& model);
  ~BpeModel();
  BpeModel(const BpeModel&) = delete;
  BpeModel& operator=(const BpeModel&) = delete;

  // Appends the ids of one pre-tokenized word. Thread-safe.
  void encode_word(std::string_view word, std::vector<uint32_t>& ids) const;

  std::optional<uint32_t> token_to_id(std::string_view token) const;
  const std::string* id_to_token(uint32_t id) const;
  // One past the largest id of the model vocabulary.
  uint32_t vocab_end() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mxlm::text
