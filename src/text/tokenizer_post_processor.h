// Post-processors of Hugging Face `tokenizer.json`: add special tokens around an encoded sequence
// (TemplateProcessing, Bert/Roberta processing; ByteLevel only touches offsets, which we don't keep).
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <memory>
#include <vector>

namespace mxlm::text {

class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  // Called only when special tokens are requested (HF encode(add_special_tokens=True)).
  virtual void add_special_tokens(std::vector<uint32_t>& ids) const = 0;
};

std::unique_ptr<PostProcessor> make_post_processor(const nlohmann::json& config);

}  // namespace mxlm::text
