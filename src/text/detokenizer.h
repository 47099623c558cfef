// Incremental detokenization for streaming: feed generated ids one at a time and get text deltas
// that never end inside a UTF-8 character (a byte-level token can carry half of one). The deltas
// concatenated with flush() equal Tokenizer::decode of all ids.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace mxlm::text {

class IncrementalDetokenizer {
 public:
  // `tokenizer` must outlive this object.
  explicit IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens = true);

  // Returns the new complete text (possibly empty while a character is still incomplete).
  std::string add(uint32_t id);
  // Returns whatever is still held back (an incomplete sequence decodes to U+FFFD, as in decode()).
  std::string flush();

  const std::vector<uint32_t>& ids() const { return ids_; }

 private:
  std::string decode_range(size_t begin, size_t end) const;

  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  std::vector<uint32_t> ids_;
  // Text is emitted up to read_offset_; decoding restarts at prefix_offset_ so that decoders that
  // look at neighbouring tokens (leading-space rules, byte merging) see the same context as decode().
  size_t prefix_offset_ = 0;
  size_t read_offset_ = 0;
};

}  // namespace mxlm::text
