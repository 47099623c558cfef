// Stop strings over streamed text (OpenAI `stop`): the text is cut before the first occurrence of any stop
// string, also when the occurrence spans several tokens. While streaming, a tail that could still become a
// stop string (a suffix that is a proper prefix of one) is held back, so text that ends up cut is never sent.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mxlm::server {

class StopStringMatcher {
 public:
  explicit StopStringMatcher(std::vector<std::string> stops, bool include_stop = false);

  // Adds text; returns what can be emitted now. After a match, matched() is set and later feeds return "".
  std::string feed(std::string_view text);
  // End of generation: releases the held-back tail.
  std::string flush();
  // The stop string that ended the text, if any.
  const std::optional<std::string>& matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  bool include_stop_;
  std::string pending_;
  std::optional<std::string> matched_;
};

}  // namespace mxlm::server
